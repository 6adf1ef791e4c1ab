"""netlink._uniform: which datagrams of a dump are kept whole without walking their messages."""

import struct

from supervisor.kernel import netlink

SEQ, PORT = 7, 4242


def _msg(length=264, mtype=0x13, flags=netlink.NLM_F_MULTI, seq=SEQ, pid=PORT, fill=b"\xab") -> bytes:
    return struct.pack("=IHHII", length, mtype, flags, seq, pid) + fill * (length - 16)


def test_a_run_of_equal_messages_of_this_dump_is_uniform():
    assert netlink._uniform(_msg() * 120, SEQ, PORT)
    assert netlink._uniform(_msg(length=20), SEQ, PORT)


def test_anything_the_walk_must_look_at_is_not_uniform():
    run = _msg() * 10
    for odd in (_msg(flags=netlink.NLM_F_MULTI | netlink.NLM_F_DUMP_INTR),   # interrupted: redo the dump
                _msg(mtype=netlink.NLMSG_DONE), _msg(mtype=netlink.NLMSG_ERROR),
                _msg(mtype=netlink.NLMSG_NOOP), _msg(seq=SEQ + 1), _msg(pid=PORT + 1)):
        assert not netlink._uniform(run + odd, SEQ, PORT)
        assert not netlink._uniform(odd * 11, SEQ, PORT)
    assert not netlink._uniform(_msg(mtype=netlink.NLMSG_DONE, length=20), SEQ, PORT)
    # lengths that do not tile the datagram, or are not messages at all
    assert not netlink._uniform(_msg() + _msg(length=268), SEQ, PORT)
    assert not netlink._uniform(_msg() + b"\0" * 4, SEQ, PORT)
    assert not netlink._uniform(_msg(length=18, fill=b"\0")[:18] * 2, SEQ, PORT)
    assert not netlink._uniform(b"\0" * 12, SEQ, PORT)
    assert not netlink._uniform(struct.pack("=IHHII", 0, 0x13, 2, SEQ, PORT) * 4, SEQ, PORT)
