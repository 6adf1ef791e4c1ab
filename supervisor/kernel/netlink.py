"""The shared netlink transport: one raw AF_NETLINK socket, requests, dumps, notifications.

errno is mapped here, once: EEXIST -> ``AlreadyExists``, ESRCH/ENOENT ->
``NotFound``, anything else -> ``KernelError``; all carry the errno text and
the kernel's extended-ack message when it sent one. Object families build
payloads and decode replies; this module knows nothing about them.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
import sys
from typing import Callable, Iterable, Iterator, NamedTuple, Sequence

from ..errors import KernelError

# <linux/netlink.h>
NETLINK_ROUTE = 0
NETLINK_XFRM = 6

NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLMSG_OVERRUN = 4       # also used by read_notifications() to report lost notifications

NLM_F_REQUEST = 0x01
NLM_F_MULTI = 0x02
NLM_F_ACK = 0x04
NLM_F_ECHO = 0x08
NLM_F_DUMP_INTR = 0x10
NLM_F_ROOT = 0x100
NLM_F_MATCH = 0x200
NLM_F_DUMP = NLM_F_ROOT | NLM_F_MATCH
NLM_F_REPLACE = 0x100
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLM_F_CAPPED = 0x100      # on NLMSG_ERROR: the request was not echoed back
NLM_F_ACK_TLVS = 0x200    # on NLMSG_ERROR/NLMSG_DONE: extended-ack attributes follow

SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11
NETLINK_GET_STRICT_CHK = 12
SO_RCVBUFFORCE = 33

NLMSGERR_ATTR_MSG = 1

NLA_F_NESTED = 0x8000
NLA_F_NET_BYTEORDER = 0x4000
NLA_TYPE_MASK = ~(NLA_F_NESTED | NLA_F_NET_BYTEORDER) & 0xFFFF

NLMSG_HDR = struct.Struct("=IHHII")      # len, type, flags, seq, pid
NLA_HDR = struct.Struct("=HH")           # len, type
_ERRNO = struct.Struct("=i")
_NATIVE_LITTLE = sys.byteorder == "little"
_RECV_FLAGS = int(socket.MSG_TRUNC | socket.MSG_DONTWAIT)     # a plain int: enum "|" is slow per call

DEFAULT_RCVBUF = 4 << 20      # multicast bursts (a flush of 30k policies) must not overrun
REQUEST_TIMEOUT = 30.0        # the kernel always answers; this only guards against a wedged socket
DUMP_RETRIES = 10
# request_many(): requests per datagram, and receive-buffer bytes set aside per answer (an
# ACK's socket buffer costs well under 1 KiB; a reply such as a policy up to a page and more)
BATCH_BYTES = 32 << 10
BATCH_MAX_REQUESTS = 1024
ACK_BUDGET = 2 << 10
REPLY_BUDGET = 8 << 10


class AlreadyExists(KernelError):
    """The kernel answered EEXIST."""


class NotFound(KernelError):
    """The kernel answered ESRCH or ENOENT: the object is not there."""


class NetlinkMessage(NamedTuple):
    msg_type: int
    flags: int
    seq: int
    pid: int            # sender's port id: the requesting socket for notifications, 0 for the kernel
    payload: memoryview


class _Truncated(Exception):
    """A datagram did not fit the receive buffer (now enlarged); it is lost."""


def error_for(err: int, what: str, detail: str | None = None) -> KernelError:
    """The exception for a negative kernel answer to WHAT (positive errno)."""
    text = os.strerror(err)
    message = f"cannot {what}: {text}" + (f" (kernel says: {detail})" if detail else "")
    if err == errno.EEXIST:
        return AlreadyExists(message, err)
    if err in (errno.ESRCH, errno.ENOENT):
        return NotFound(message, err)
    return KernelError(message, err)


def encode_message(msg_type: int, flags: int, seq: int, payload: bytes, pid: int = 0) -> bytes:
    """One netlink message: header + payload."""
    return NLMSG_HDR.pack(NLMSG_HDR.size + len(payload), msg_type, flags, seq, pid) + payload


def nla_align(length: int) -> int:
    return (length + 3) & ~3


def pack_attr(attr_type: int, data: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes."""
    length = NLA_HDR.size + len(data)
    return NLA_HDR.pack(length, attr_type) + data + b"\0" * (nla_align(length) - length)


def iter_attrs(buf, offset: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(type, payload start, payload end) of each attribute in BUF[offset:end]."""
    unpack = NLA_HDR.unpack_from
    while offset + 4 <= end:
        length, attr_type = unpack(buf, offset)
        if length < 4 or offset + length > end:
            raise ValueError(f"malformed netlink attribute at offset {offset} (length {length})")
        yield attr_type & NLA_TYPE_MASK, offset + 4, offset + length
        offset += (length + 3) & ~3


def parse_attrs(buf, offset: int = 0, end: int | None = None) -> dict[int, bytes]:
    """Attributes of BUF[offset:end] as {type: payload bytes} (the last one wins)."""
    if end is None:
        end = len(buf)
    return {t: bytes(buf[s:e]) for t, s, e in iter_attrs(buf, offset, end)}


def _extack_message(buf, offset: int, end: int) -> str | None:
    try:
        for attr_type, start, stop in iter_attrs(buf, offset, end):
            if attr_type == NLMSGERR_ATTR_MSG:
                return bytes(buf[start:stop]).split(b"\0", 1)[0].decode(errors="replace") or None
    except ValueError:
        pass
    return None


def _error_of(buf, offset: int, length: int, flags: int) -> tuple[int, str | None]:
    """(positive errno or 0, extack message) of an NLMSG_ERROR message at OFFSET."""
    (err,) = _ERRNO.unpack_from(buf, offset + 16)
    detail = None
    if flags & NLM_F_ACK_TLVS:
        # struct nlmsgerr = error + the request's header, plus its payload unless capped
        skip = 16 + 4 + 16
        if not flags & NLM_F_CAPPED:
            (req_len,) = struct.unpack_from("=I", buf, offset + 20)
            skip = 16 + 4 + nla_align(req_len)
        detail = _extack_message(buf, offset + skip, offset + length)
    return -err, detail


class NetlinkSocket:
    """A raw netlink socket of one protocol, optionally subscribed to multicast groups.

    It lives in the network namespace of the thread that opened it. Use it from one
    thread at a time.
    """

    def __init__(self, protocol: int, groups: Iterable[int] = (), rcvbuf: int = DEFAULT_RCVBUF,
                 strict_check: bool = False):
        try:
            self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, protocol)
        except OSError as exc:
            raise KernelError(f"cannot open netlink socket (protocol {protocol}): {exc.strerror} "
                              "(is the kernel's netlink support for it missing?)", exc.errno) from None
        try:
            try:
                self._sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
            except PermissionError:
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            # Short ACKs (no echoed request) and the kernel's human-readable reason on errors.
            for opt in (NETLINK_CAP_ACK, NETLINK_EXT_ACK):
                try:
                    self._sock.setsockopt(SOL_NETLINK, opt, 1)
                except OSError:
                    pass
            if strict_check:
                # rtnetlink then filters dumps by the request's attributes (a route table)
                self._sock.setsockopt(SOL_NETLINK, NETLINK_GET_STRICT_CHK, 1)
            self._sock.bind((0, 0))
            for group in groups:
                self._sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)
        except OSError as exc:
            self._sock.close()
            raise KernelError(f"cannot open netlink socket (protocol {protocol}): {exc.strerror}",
                              exc.errno) from None
        self._setup()

    @classmethod
    def borrow(cls, fileno: int) -> "NetlinkSocket":
        """A NetlinkSocket on a duplicate of FILENO, an open and bound netlink socket (another
        library's): same port id, same namespace, same receive queue; its options stay as they are.

        Use it only while the owner is not reading: both would consume the same answers.
        """
        borrowed = cls.__new__(cls)
        try:
            borrowed._sock = socket.socket(fileno=os.dup(fileno))
        except OSError as exc:
            raise KernelError(f"cannot use netlink socket fd {fileno}: {exc.strerror}", exc.errno) from None
        if borrowed._sock.family != socket.AF_NETLINK:
            borrowed._sock.close()
            raise KernelError(f"cannot use fd {fileno} as a netlink socket: it is of family "
                              f"{borrowed._sock.family}", errno.ENOTSOCK)
        borrowed._setup()
        return borrowed

    def _setup(self) -> None:
        self._port_id = self._sock.getsockname()[0]
        self._seq = 0
        self._buf = bytearray(1 << 16)    # kernel dump datagrams are at most ~32 KiB
        self._pending: list[NetlinkMessage] = []
        self._poll = select.poll()
        self._poll.register(self._sock, select.POLLIN)
        # what the kernel actually granted (it doubles the requested value for its bookkeeping)
        self._rcvbuf = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)

    # -- plumbing ---------------------------------------------------------

    @property
    def port_id(self) -> int:
        """This socket's netlink port id. Requests carry it in nlmsg_pid, so notifications
        they cause carry it too (XFRM copies nlmsg_pid; rtnetlink uses the sender's port)."""
        return self._port_id

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "NetlinkSocket":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _send(self, msg_type: int, flags: int, payload: bytes) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF or 1
        try:
            # nlmsg_pid is ours to fill: XFRM copies it into the notifications the request
            # causes, which is how listeners tell who changed what (iproute2 sends 0)
            self._sock.sendto(encode_message(msg_type, flags, self._seq, payload, self._port_id), (0, 0))
        except OSError as exc:
            raise KernelError(f"cannot send netlink message type {msg_type}: {exc.strerror}",
                              exc.errno) from None
        return self._seq

    def _recv(self, wait: bool) -> bytes:
        """One datagram; raises _Truncated if it did not fit (the buffer is then enlarged),
        BlockingIOError if nothing is queued and WAIT is false."""
        if wait and not self._poll.poll(REQUEST_TIMEOUT * 1000):
            raise TimeoutError()
        n = self._sock.recv_into(self._buf, len(self._buf), _RECV_FLAGS)
        if n > len(self._buf):
            self._buf = bytearray(max(n, 2 * len(self._buf)))
            raise _Truncated()
        return bytes(memoryview(self._buf)[:n])

    def _recv_or_fail(self, what: str) -> bytes:
        while True:
            try:
                return self._recv(wait=True)
            except (BlockingIOError, InterruptedError):
                continue
            except TimeoutError:
                raise KernelError(f"cannot {what}: no answer from the kernel within "
                                  f"{REQUEST_TIMEOUT:.0f}s") from None
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:      # lost multicast: tell read_notifications()
                    self._pending.append(_overrun())
                    continue
                raise KernelError(f"cannot {what}: {exc.strerror}", exc.errno) from None

    # -- requests ---------------------------------------------------------

    def request(self, msg_type: int, flags: int, payload: bytes, what: str | None = None) -> None:
        """Send one request and wait for its ACK; a negative ACK raises (see ``error_for``)."""
        self._transact(msg_type, flags | NLM_F_REQUEST | NLM_F_ACK, payload,
                       what or f"send netlink request type {msg_type}", want_reply=False)

    def query(self, msg_type: int, flags: int, payload: bytes, what: str | None = None) -> NetlinkMessage:
        """Send one GET-style request and return the kernel's single reply."""
        reply = self._transact(msg_type, flags | NLM_F_REQUEST | NLM_F_ACK, payload,
                               what or f"query netlink message type {msg_type}", want_reply=True)
        assert reply is not None
        return reply

    def _transact(self, msg_type: int, flags: int, payload: bytes, what: str,
                  want_reply: bool) -> NetlinkMessage | None:
        seq = self._send(msg_type, flags, payload)
        reply: NetlinkMessage | None = None
        while True:
            try:
                data = self._recv_or_fail(what)
            except _Truncated:
                raise KernelError(f"cannot {what}: the kernel's answer did not fit the receive "
                                  "buffer (enlarged; try again)") from None
            for off, length, mtype, mflags, mseq, mpid in _walk(data):
                if mtype == NLMSG_ERROR:
                    if mseq != seq:
                        continue        # the late answer to an earlier request that timed out
                    err, detail = _error_of(data, off, length, mflags)
                    if err:
                        raise error_for(err, what, detail)
                    if want_reply and reply is None:
                        raise KernelError(f"cannot {what}: the kernel acknowledged without a reply")
                    return reply
                if mtype in (NLMSG_NOOP, NLMSG_DONE):
                    continue
                msg = _message(data, off, length, mtype, mflags, mseq, mpid)
                if want_reply and reply is None and mseq == seq and mpid == self._port_id:
                    reply = msg
                else:
                    # a notification (this socket is subscribed to groups): keep it for its reader
                    self._pending.append(msg)

    def request_many(self, requests: Sequence[tuple[int, int, bytes]], what: Callable[[int], str],
                     want_reply: bool = False) -> list[NetlinkMessage | KernelError | None]:
        """Send REQUESTS ((msg_type, flags, payload)) many to a datagram; per request: None
        (acknowledged), its reply (WANT_REPLY), or the error ``error_for`` makes of its errno.

        One request's failure never stops the others. WHAT(i) names request i in error
        messages; it is only called for failures. With WANT_REPLY (GET-style requests) no
        ACK is asked for: the reply, or the error, is the one answer to each request.
        """
        results: list[NetlinkMessage | KernelError | None] = [None] * len(requests)
        # The kernel handles a datagram of requests inside sendmsg() and queues every answer
        # at once: a batch must leave room for all of them, or answers are dropped (ENOBUFS).
        per_answer = REPLY_BUDGET if want_reply else ACK_BUDGET
        limit = max(1, min(BATCH_MAX_REQUESTS, self._rcvbuf // 2 // per_answer))
        encode = NLMSG_HDR.pack
        port_id = self._port_id
        keep = ~NLM_F_ACK if want_reply else ~0
        ask = NLM_F_REQUEST if want_reply else NLM_F_REQUEST | NLM_F_ACK
        start = 0
        while start < len(requests):
            parts: list[bytes] = []
            outstanding: dict[int, int] = {}        # seq -> request index
            size = 0
            end = start
            while end < len(requests) and end - start < limit:
                msg_type, flags, payload = requests[end]
                length = NLMSG_HDR.size + len(payload)
                if parts and size + length > BATCH_BYTES:
                    break
                self._seq = (self._seq + 1) & 0xFFFFFFFF or 1
                parts.append(encode(length, msg_type, flags & keep | ask, self._seq, port_id))
                parts.append(payload)
                padding = (-length) & 3
                if padding:
                    parts.append(bytes(padding))
                size += length + padding
                outstanding[self._seq] = end
                end += 1
            try:
                self._sock.sendto(b"".join(parts), (0, 0))
            except OSError as exc:
                for i in outstanding.values():
                    results[i] = KernelError(f"cannot {what(i)}: {exc.strerror}", exc.errno)
            else:
                self._collect(outstanding, results, what, want_reply)
            start = end
        return results

    def _collect(self, outstanding: dict[int, int], results: list, what: Callable[[int], str],
                 want_reply: bool) -> None:
        """Read the answers to OUTSTANDING (seq -> request index) into RESULTS.

        Tens of thousands of answers, one datagram each: they are parsed in the receive
        buffer, and only replies and notifications are copied out of it.
        """
        unpack = NLMSG_HDR.unpack_from
        port_id = self._port_id
        lost: OSError | None = None
        while outstanding:
            buf = self._buf
            try:
                n = self._sock.recv_into(buf, len(buf), _RECV_FLAGS)
            except BlockingIOError:
                # after an overrun nothing more is coming: what was queued has been read
                if lost is not None:
                    break
                if not self._poll.poll(REQUEST_TIMEOUT * 1000):
                    lost = OSError(errno.ETIMEDOUT, f"no answer from the kernel within {REQUEST_TIMEOUT:.0f}s")
                    break
                continue
            except InterruptedError:
                continue
            except OSError as exc:
                lost = exc
                if exc.errno == errno.ENOBUFS:
                    continue
                break
            if n > len(buf):
                self._buf = bytearray(max(n, 2 * len(buf)))
                continue            # not one of our answers (they are small): nothing of ours lost
            off = 0
            while off + 16 <= n:
                length, mtype, mflags, mseq, mpid = unpack(buf, off)
                if length < 16 or off + length > n:
                    raise KernelError(f"malformed netlink message at offset {off} (length {length}, "
                                      f"datagram {n} bytes)")
                if mtype == NLMSG_ERROR:
                    i = outstanding.pop(mseq, None)
                    if i is not None:       # else the late answer to a request that timed out
                        err, detail = _error_of(buf, off, length, mflags)
                        if err:
                            results[i] = error_for(err, what(i), detail)
                elif mtype != NLMSG_NOOP and mtype != NLMSG_DONE:
                    data = bytes(buf[off:off + length])
                    msg = NetlinkMessage(mtype, mflags, mseq, mpid, memoryview(data)[16:])
                    i = outstanding.pop(mseq, None) if want_reply and mpid == port_id else None
                    if i is None:
                        self._pending.append(msg)     # a notification: keep it for its reader
                    else:
                        results[i] = msg
                off += (length + 3) & ~3
        if outstanding:
            assert lost is not None
            text = ("its answer was lost (the receive buffer overflowed): the outcome is unknown"
                    if lost.errno == errno.ENOBUFS else lost.strerror)
            for i in outstanding.values():
                results[i] = KernelError(f"cannot {what(i)}: {text}", lost.errno)

    # -- dumps ------------------------------------------------------------

    def dump_raw(self, msg_type: int, payload: bytes = b"", what: str | None = None) -> list[bytes]:
        """A complete, consistent dump as the datagrams the kernel sent (for decoders that
        ``unpack_from`` the buffers directly); every message in them belongs to the dump.

        An interrupted dump (NLM_F_DUMP_INTR: the table changed meanwhile) is redone.
        """
        what = what or f"dump netlink message type {msg_type}"
        for _ in range(DUMP_RETRIES):
            chunks = self._dump_once(msg_type, payload, what)
            if chunks is not None:
                return chunks
        raise KernelError(f"cannot {what}: the dump was interrupted by concurrent changes "
                          f"{DUMP_RETRIES} times in a row (will retry on the next pass)")

    def _dump_once(self, msg_type: int, payload: bytes, what: str) -> list[bytes] | None:
        seq = self._send(msg_type, NLM_F_REQUEST | NLM_F_DUMP, payload)
        chunks: list[bytes] = []
        consistent = True
        truncated = False
        while True:
            try:
                data = self._recv_or_fail(what)
            except _Truncated:
                truncated = True     # part of the dump is lost: finish reading it, then redo it
                continue
            if _uniform(data, seq, self._port_id):
                chunks.append(data)
                continue
            ours_end = 0
            done = False
            for off, length, mtype, mflags, mseq, mpid in _walk(data):
                if mseq != seq or mpid != self._port_id:
                    self._pending.append(_message(data, off, length, mtype, mflags, mseq, mpid))
                    continue
                if mflags & NLM_F_DUMP_INTR:
                    consistent = False
                if mtype == NLMSG_DONE:
                    (err,) = _ERRNO.unpack_from(data, off + 16) if length >= 20 else (0,)
                    if err < 0:
                        detail = _extack_message(data, off + 20, off + length) \
                            if mflags & NLM_F_ACK_TLVS else None
                        raise error_for(-err, what, detail)
                    done = True
                    break
                if mtype == NLMSG_ERROR:
                    err, detail = _error_of(data, off, length, mflags)
                    raise error_for(err or errno.EPROTO, what, detail)
                ours_end = off + length
            if ours_end:
                chunks.append(data if ours_end == len(data) else data[:ours_end])
            if done:
                return chunks if consistent and not truncated else None

    def dump(self, msg_type: int, payload: bytes = b"", what: str | None = None) -> Iterator[NetlinkMessage]:
        """The messages of a complete dump: (msg_type, flags, seq, pid, payload memoryview)."""
        for data in self.dump_raw(msg_type, payload, what):
            for off, length, mtype, mflags, mseq, mpid in _walk(data):
                if mtype not in (NLMSG_DONE, NLMSG_NOOP):
                    yield _message(data, off, length, mtype, mflags, mseq, mpid)

    # -- notifications ----------------------------------------------------

    def read_notifications(self, max_datagrams: int = 4096) -> list[NetlinkMessage]:
        """What is queued, without blocking (at most MAX_DATAGRAMS reads, so a flood cannot
        starve the caller; the rest stays readable). Lost notifications (ENOBUFS, or a datagram
        too big for the buffer) appear as an NLMSG_OVERRUN message: the caller must re-dump."""
        out, self._pending = self._pending, []
        for _ in range(max_datagrams):
            try:
                data = self._recv(wait=False)
            except (BlockingIOError, InterruptedError):
                return out
            except _Truncated:
                out.append(_overrun())
                continue
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    out.append(_overrun())
                    continue
                raise KernelError(f"cannot read netlink notifications: {exc.strerror}", exc.errno) from None
            for off, length, mtype, mflags, mseq, mpid in _walk(data):
                if mtype != NLMSG_NOOP:
                    out.append(_message(data, off, length, mtype, mflags, mseq, mpid))
        return out


def _overrun() -> NetlinkMessage:
    return NetlinkMessage(NLMSG_OVERRUN, 0, 0, 0, memoryview(b""))


def _message(data: bytes, off: int, length: int, mtype: int, mflags: int, mseq: int, mpid: int) -> NetlinkMessage:
    return NetlinkMessage(mtype, mflags, mseq, mpid, memoryview(data)[off + 16:off + length])


_HEADS: dict[int, struct.Struct] = {}     # message length -> the headers of a run of such messages


def _uniform(data: bytes, seq: int, port_id: int) -> bool:
    """Whether DATA is messages of one length, all of this dump (SEQ, PORT_ID), none of them the
    end, an error or interrupted: what _dump_once's walk keeps whole. (A dump of policies is such
    runs of 264-byte messages: their headers are read in one C loop, not one at a time.)"""
    end = len(data)
    if end < 16:
        return False
    length = int.from_bytes(data[:4], "little" if _NATIVE_LITTLE else "big")
    if length < 16 or length & 3 or end % length:
        return False
    heads = _HEADS.get(length)
    if heads is None:
        heads = _HEADS[length] = struct.Struct(f"=IHHII{length - 16}x")
    found = set(heads.iter_unpack(data))
    if len(found) != 1:
        return False
    _, mtype, mflags, mseq, mpid = found.pop()
    return (mseq == seq and mpid == port_id and not mflags & NLM_F_DUMP_INTR
            and mtype not in (NLMSG_DONE, NLMSG_ERROR, NLMSG_NOOP, NLMSG_OVERRUN))


def _walk(data) -> Iterator[tuple[int, int, int, int, int, int]]:
    """(offset, length, type, flags, seq, pid) of each message in one datagram."""
    off = 0
    end = len(data)
    unpack = NLMSG_HDR.unpack_from
    while off + 16 <= end:
        length, mtype, mflags, mseq, mpid = unpack(data, off)
        if length < 16 or off + length > end:
            raise KernelError(f"malformed netlink message at offset {off} (length {length}, "
                              f"datagram {end} bytes)")
        yield off, length, mtype, mflags, mseq, mpid
        off += (length + 3) & ~3


def walk_messages(data) -> Iterator[tuple[int, int, int, int, int, int]]:
    """(offset, length, type, flags, seq, pid) of each message in a datagram from ``dump_raw``."""
    return _walk(data)
