"""Policies and routes written straight from the records: the bytes of the generic encoder.

No kernel needed: the records come from tests/fixtures/snapshots/tunnels-crash-v2.json (every
field of a policy and a route used), plus look-alikes with strings JSON must escape.
"""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from supervisor import snapshot
from supervisor.kernel.routes import Route
from supervisor.kernel.xfrm import XfrmSelector
from supervisor.snapshot import load_snapshot, record_json
from supervisor.snapshot_lines import LINES, plain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V2 = os.path.join(ROOT, "tests", "fixtures", "snapshots", "tunnels-crash-v2.json")


def generic(name):
    encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
    return lambda record: encode(record_json(name, record, False))


def odd(name, records):
    """Records whose strings need escaping: they must take the generic way."""
    if name == "route":
        return [dataclasses.replace(records[0], oif_name='ve"th\\0'), dataclasses.replace(records[0], dst="\u00e9")]
    sel = records[0].selector
    return [dataclasses.replace(records[0], selector=dataclasses.replace(sel, saddr="a\nb")),
            dataclasses.replace(records[1], selector=XfrmSelector(0, "\u2603", 0, "", 0))]


@pytest.mark.parametrize("name", sorted(LINES))
def test_lines_are_the_bytes_of_the_generic_encoder(name):
    records = load_snapshot(V2).objects[name]
    records = tuple(records) + tuple(odd(name, records))
    assert LINES[name](records, generic(name)) == [generic(name)(r) for r in records]


@pytest.mark.parametrize("name", sorted(LINES))
def test_with_msgspec_the_same_lines_come_out(name):
    msgspec = pytest.importorskip("msgspec")
    records = load_snapshot(V2).objects[name]
    records = tuple(records) + tuple(odd(name, records))
    encode = msgspec.json.Encoder().encode
    assert LINES[name](records, lambda r: encode(record_json(name, r, False)).decode()) == \
        [generic(name)(r) for r in records]


@pytest.mark.parametrize("text, expected", [
    ("192.0.2.1", True), ("fd00::1", True), ("", True), ('a"b', False), ("a\\b", False), ("a\tb", False),
    ("\x7f", False), ("\u00e9", False)])
def test_plain_strings_are_those_no_encoder_escapes(text, expected):
    assert plain(text) is expected


def test_a_written_snapshot_reads_back_equal_with_and_without_msgspec(tmp_path, monkeypatch):
    snap = load_snapshot(V2)
    routes = snap.objects["route"] + (Route("inet", 220, "10.9.0.0", 16, oif_name='we"ird'),)
    snap = dataclasses.replace(snap, objects={**snap.objects, "route": routes})
    fast, slow = str(tmp_path / "fast.json"), str(tmp_path / "slow.json")
    snapshot.write_snapshot(fast, snap)
    monkeypatch.setattr(snapshot, "msgspec", None)
    snapshot.write_snapshot(slow, snap)
    assert open(fast, "rb").read() == open(slow, "rb").read()
    assert load_snapshot(slow) == snap


POLICY_SHAPES = """
ip xfrm policy add src 10.1.0.0/16 dst 10.2.0.0/16 dir out priority 375423 \
  tmpl src 192.0.2.1 dst 192.0.2.2 proto esp reqid 1 mode tunnel
ip xfrm policy add src 10.2.0.0/16 dst 10.1.0.0/16 dir in priority 375423 \
  tmpl src 192.0.2.2 dst 192.0.2.1 proto esp reqid 1 mode tunnel
ip xfrm policy add src 10.2.0.0/16 dst 10.1.0.0/16 dir fwd priority 375423 \
  tmpl src 192.0.2.2 dst 192.0.2.1 proto esp reqid 1 mode tunnel level use
ip xfrm policy add src 10.3.0.0/16 dst 10.4.0.0/16 proto tcp sport 500 dport 4500 dir out priority 9 \
  mark 0x2a mask 0xff if_id 7 flag localok flag icmp action block
ip xfrm policy add src 10.5.0.0/16 dst 10.6.0.0/16 proto icmp type 8 code 0 dir in ptype sub
ip xfrm policy add src fd00:1::/64 dst fd00:2::/64 dir out priority 334463 \
  tmpl src 2001:db8::1 dst 2001:db8::2 proto esp spi 0x1234 reqid 2 mode tunnel
ip xfrm policy add src 10.7.0.0/16 dst 10.8.0.0/16 dir out limit time-hard 3600 limit byte-soft 100000 \
  tmpl src 192.0.2.1 dst 192.0.2.7 proto esp reqid 3 mode tunnel
ip xfrm policy add src 10.9.0.0/16 dst 10.10.0.0/16 dir out \
  tmpl src 192.0.2.1 dst 192.0.2.9 proto comp reqid 4 mode tunnel \
  tmpl src 192.0.2.1 dst 192.0.2.9 proto esp reqid 4 mode tunnel
ip xfrm policy add dir out
"""


def test_policy_lines_from_a_dump_are_those_of_the_records(netns):
    from supervisor.kernel import xfrm
    from supervisor.snapshot_lines import policy_lines_from_dump
    netns.sh(POLICY_SHAPES)
    with netns.enter(), xfrm.open_socket() as sock:
        chunks = sock.dump_raw(xfrm.XFRM_MSG_GETPOLICY)
    records = xfrm.decode_policies(chunks)
    assert len(records) == 9
    gen = generic("xfrm_policy")
    assert policy_lines_from_dump(chunks, gen) == [gen(r) for r in records]


def test_the_snapshot_command_writes_what_the_records_write(netns, tmp_path):
    import subprocess
    import sys
    from supervisor.kernel_state import ReadOptions, read_state
    netns.sh(POLICY_SHAPES + "ip link add veth0 type veth peer name veth1\nip link set veth0 up\n"
             "ip addr add 192.0.2.1/24 dev veth0\n"
             "ip route add 10.2.0.0/16 via 192.0.2.2 dev veth0 proto static table 220\n")
    path = str(tmp_path / "cli.json")
    r = subprocess.run([sys.executable, "-m", "supervisor.cli", "snapshot", "--netns", netns.name, "-o", path],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    with netns.enter():
        expected = snapshot.take_snapshot(read_state(ReadOptions()))
    written = load_snapshot(path)
    assert written.objects == expected.objects and written.context == expected.context


ROUTE_SHAPES = """
ip link add veth0 type veth peer name veth1
ip link set veth0 up
ip link set veth1 up
ip addr add 192.0.2.1/24 dev veth0
ip -6 addr add 2001:db8::1/64 dev veth0 nodad
ip link add 'we"ird' type veth peer name wp1
ip link set 'we"ird' up
ip route add 10.2.0.0/16 via 192.0.2.2 dev veth0 src 192.0.2.1 proto static table 220
ip route add 10.3.0.0/16 dev veth0 metric 7 table 220
ip route add blackhole 10.4.0.0/16 table 220
ip route add 10.5.0.0/16 via 192.0.2.2 dev veth0 mtu 1400 table 220
ip route add 10.6.0.0/16 table 220 nexthop via 192.0.2.2 dev veth0 nexthop via 192.0.2.3 dev veth0
ip route add 10.7.0.0/16 dev 'we"ird' table 220
ip route add 10.8.0.0/16 via 192.0.2.2 dev veth0 table 221
ip -6 route add fd00:2::/64 via 2001:db8::2 dev veth0 proto static table 220
ip -6 route add fd00:3::/64 from fd00:1::/64 via 2001:db8::2 dev veth0 table 220
ip -6 route add fd00:4::/64 via 2001:db8::2 dev veth0 expires 300 table 220
"""


@pytest.mark.parametrize("table", [220, None])
def test_route_lines_from_a_dump_are_those_of_the_records(netns, table):
    import socket
    from supervisor.kernel import routes
    from supervisor.snapshot_lines import route_lines_from_dump
    netns.sh(ROUTE_SHAPES)
    with netns.enter(), routes._socket(None) as sock:
        names = routes.interface_names(sock)
        dumps = [routes.dump_chunks(sock, af, table) for af in (socket.AF_INET, socket.AF_INET6)]
    # the same datagrams both ways (an expiring route's seconds move on between two dumps)
    records = [r for what, chunks in dumps for r in routes.decode_routes(chunks, names, table, what)]
    assert len(records) >= (9 if table else 12)
    gen = generic("route")
    assert route_lines_from_dump(dumps, names, table, gen) == [gen(r) for r in records]


def test_a_route_dump_counted_first_formats_each_route_once(netns, monkeypatch):
    """A terminal's progress counts the routes before the file is written: the lines made for the
    count are the ones written, not made again."""
    import socket
    from supervisor import snapshot_lines
    from supervisor.kernel import routes
    netns.sh(ROUTE_SHAPES)
    with netns.enter(), routes._socket(None) as sock:
        names = routes.interface_names(sock)
        dumps = [routes.dump_chunks(sock, af, 220) for af in (socket.AF_INET, socket.AF_INET6)]
    gen = generic("route")
    expected = snapshot_lines.route_lines_from_dump(dumps, names, 220, gen)
    made = []
    real = snapshot_lines._route_lines
    monkeypatch.setattr(snapshot_lines, "_route_lines", lambda *a: made.append(a[3].split()[1]) or real(*a))
    dump = snapshot_lines.RouteDump(dumps, names, 220, gen)
    assert len(dump) == len(expected) >= 9
    assert [line for lines in dump.batches() for line in lines] == expected
    assert len(dump) == len(expected)
    assert made == ["inet", "inet6"]            # each family's dump formatted once


def _batch(netns, text: str) -> None:
    """Many `ip` commands at once (one process; too long for a shell's argument list)."""
    import subprocess
    commands = "".join(line[3:] + "\n" for line in text.splitlines() if line.startswith("ip "))
    subprocess.run(["ip", "netns", "exec", netns.name, "ip", "-batch", "-"], input=commands, text=True, check=True)


def _many_policies(count: int) -> str:
    """COUNT tunnels of charon's usual shape (one template, the policy type), IPv4 in IPv4, IPv6 in
    IPv6 and IPv6 in IPv4, two prefix lengths and some counters' worth of variety."""
    lines = []
    for i in range(count):
        a, b = divmod(i, 250)
        plen = 24 if i % 2 else 32
        lines += [f"ip xfrm policy add src 10.{a}.{b}.0/{plen} dst 10.200.{b}.0/24 dir out priority {1000 + i} "
                  f"tmpl src 192.0.2.1 dst 198.51.{a}.{b + 1} proto esp reqid {i + 1} mode tunnel",
                  f"ip xfrm policy add src 10.200.{b}.0/24 dst 10.{a}.{b}.0/{plen} dir fwd priority {1000 + i} "
                  f"tmpl src 198.51.{a}.{b + 1} dst 192.0.2.1 proto esp reqid {i + 1} mode tunnel level use",
                  f"ip xfrm policy add src fd00:{a}:{b}::/64 dst fd01::{b:x}/128 dir in priority {2000 + i} "
                  f"tmpl src 2001:db8::{b + 1:x} dst 2001:db8::1 proto esp reqid {i + 1} mode tunnel",
                  f"ip xfrm policy add src fd02:{a}:{b}::/64 dst fd03::/64 dir out priority {3000 + i} "
                  f"tmpl src 192.0.2.1 dst 198.51.{a}.{b + 1} proto esp reqid {i + 1} mode tunnel"]
    return "\n".join(lines) + "\n"


def _policy_chunks(netns, tunnels: int, shapes: bool = True) -> list[bytes]:
    """The datagrams of a GETPOLICY dump of POLICY_SHAPES (unless not SHAPES) and TUNNELS usual tunnels."""
    from supervisor.kernel import xfrm
    if shapes:
        netns.sh(POLICY_SHAPES)
    _batch(netns, _many_policies(tunnels))
    with netns.enter(), xfrm.open_socket() as sock:
        return sock.dump_raw(xfrm.XFRM_MSG_GETPOLICY)


def _ptype_padded(message: bytes) -> bytes:
    """A usual 264-byte policy MESSAGE with a padding attribute where its policy type was: the same
    length, another layout."""
    from supervisor.kernel import xfrm
    odd = bytearray(message)
    odd[252:256] = xfrm._NLA.pack(12, xfrm.XFRMA_PAD)
    return bytes(odd)


def test_compiled_shapes_give_the_walked_lines_of_many_policies(netns):
    # hundreds of policies of a few shapes: after its first message, each shape is formatted from
    # its compiled format; every line must still be the records' own
    from supervisor import snapshot_lines
    from supervisor.kernel import xfrm
    chunks = _policy_chunks(netns, 300)
    records = xfrm.decode_policies(chunks)
    assert len(records) == 9 + 4 * 300
    compiled = []
    real = snapshot_lines._compile_shape
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(snapshot_lines, "_compile_shape", lambda *a: compiled.append(real(*a)) or compiled[-1])
        gen = generic("xfrm_policy")
        assert snapshot_lines.policy_lines_from_dump(chunks, gen) == [gen(r) for r in records]
    # a handful of shapes for 1,200 policies, each compiled once (none refused)
    assert 4 <= len(compiled) <= 16 and all(compiled)


def test_a_compiled_format_that_misses_the_walked_line_is_never_used(netns):
    from supervisor import snapshot_lines
    from supervisor.kernel import xfrm
    chunks = _policy_chunks(netns, 3, shapes=False)
    buf = chunks[0]
    assert snapshot_lines._compile_shape(buf, 0, "not the line of this message", {}) is None
    first = buf[:xfrm._HDR_LT.unpack_from(buf, 0)[0]]
    line = snapshot_lines.policy_lines_from_dump([first], None)[0]
    assert snapshot_lines._compile_shape(first, 0, line, {}) is not None
    # the same length in another layout (a padding attribute where the policy type was): the walk
    # reads it, the shape is never compiled, whatever the line
    odd = _ptype_padded(first)
    line = snapshot_lines.policy_lines_from_dump([odd], None)[0]
    assert '"ptype":"main"' in line and snapshot_lines._compile_shape(odd, 0, line, {}) is None


def test_compiled_route_shapes_give_the_walked_lines_of_many_routes(netns):
    import socket
    from supervisor import snapshot_lines
    from supervisor.kernel import routes
    netns.sh(ROUTE_SHAPES)
    script = []
    for i in range(400):
        a, b = divmod(i, 200)
        script.append(f"ip route add 10.{100 + a}.{b}.0/{24 + a} via 192.0.2.2 dev veth0 src 192.0.2.1 "
                      f"proto static table 220")
        script.append(f"ip route add fd10:{a}:{b}::/64 via 2001:db8::2 dev veth0 table 220"
                      + (" expires 600" if i % 50 == 0 else ""))
    _batch(netns, "\n".join(script))
    with netns.enter(), routes._socket(None) as sock:
        names = routes.interface_names(sock)
        dumps = [routes.dump_chunks(sock, af, 220) for af in (socket.AF_INET, socket.AF_INET6)]
    records = [r for what, chunks in dumps for r in routes.decode_routes(chunks, names, 220, what)]
    assert len(records) >= 800
    learned = []
    real = snapshot_lines._learn_route
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(snapshot_lines, "_learn_route", lambda *a: learned.append(1) or real(*a))
        gen = generic("route")
        assert snapshot_lines.route_lines_from_dump(dumps, names, 220, gen) == [gen(r) for r in records]
    # the expiring ones (their expiry differs) and the odd shapes walked; the rest compiled
    assert len(learned) < 40


def test_a_short_attribute_keeps_its_route_out_of_the_compiled_shapes():
    # a 12-byte RTA_CACHEINFO (the kernel's is 32) followed by RTA_PREF: a shape's mask over the
    # cache counters would have covered the preference, and a second route of that "shape" would
    # have been written with the first one's (found by review)
    import socket
    import struct

    from supervisor import snapshot_lines
    from supervisor.kernel import routes

    def attr(kind: int, data: bytes) -> bytes:
        a = struct.pack("=HH", 4 + len(data), kind) + data
        return a + bytes(-len(a) % 4)

    def message(dst: str, pref: int) -> bytes:
        body = struct.pack("=BBBBBBBBI", socket.AF_INET6, 64, 0, 0, 254, 3, 0, 1, 0)
        body += attr(routes.RTA_DST, socket.inet_pton(socket.AF_INET6, dst))
        body += attr(routes.RTA_CACHEINFO, struct.pack("=IIi", 0, 0, 0))
        body += attr(routes.RTA_PREF, bytes([pref]))
        body += attr(routes.RTA_TABLE, struct.pack("=I", 254))
        return struct.pack("=IHHII", 16 + len(body), routes.RTM_NEWROUTE, 2, 1, 0) + body

    a, b = message("2001:db8::", 0), message("2001:db8:1::", 3)
    gen = generic("route")
    together = snapshot_lines.route_lines_from_dump([("dump routes", [a + b])], {}, None, gen)
    records = routes.decode_routes([a + b], {}, None, "dump routes")
    assert [r.pref for r in records] == [0, 3]
    assert together == [gen(r) for r in records]


def test_usual_policies_decode_from_one_loop_to_the_walked_records(netns):
    # xfrm._usual_policies reads runs of charon's usual message per datagram: the same records as
    # the attribute walk, shared by ledger.sharer's way (SHARE) alike
    from supervisor.kernel import xfrm
    chunks = _policy_chunks(netns, 300)
    fast = xfrm.decode_policies(chunks)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(xfrm, "_usual_policies", lambda data, out, share: 0)
        walked = xfrm.decode_policies(chunks)
    assert fast == walked and len(fast) == 9 + 4 * 300
    assert sum(1 for data in chunks if xfrm._usual_policies(data, [], None)) >= 1     # (the loop ran)
    seen = []
    assert xfrm.decode_policies(chunks, share=lambda p: seen.append(p) or p) == walked and seen == walked


def test_a_usual_length_message_of_another_layout_is_walked(netns):
    from supervisor.kernel import xfrm
    chunks = _policy_chunks(netns, 3, shapes=False)
    first = chunks[0][:xfrm._HDR_LT.unpack_from(chunks[0], 0)[0]]
    assert len(first) == 264 and xfrm._usual_policies(first * 3, [], None) == 3 * 264
    odd = _ptype_padded(first)
    out: list = []
    assert xfrm._usual_policies(first + bytes(odd) + first, out, None) == 264 and len(out) == 1
    decoded = xfrm.decode_policies([first + bytes(odd) + first])
    assert [p.ptype for p in decoded] == [xfrm.PTYPE_MAIN] * 3 and decoded[0] == decoded[2]
