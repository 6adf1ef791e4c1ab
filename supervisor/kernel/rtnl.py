"""Shared rtnetlink plumbing for routes, rules and addresses, and the rtnl monitor.

Dumps and the monitor decode with ``struct`` on a raw socket (``netlink.py``):
pyroute2 costs over 20 MB of memory once imported, and an idle supervisor only
dumps and listens. Adds, and deletes of rules and addresses, still encode their
requests with pyroute2 (sent on the same raw socket), imported on the first one.
Nothing pyroute2 leaves this package: callers see records and ``KernelEvent``s.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from typing import Any, Iterator

from ..errors import KernelError
from .common import Action, DeleteResult, KernelEvent
from .netlink import NETLINK_ROUTE, NLA_TYPE_MASK, NetlinkSocket, walk_messages

# --- kernel constants (linux/rtnetlink.h, fib_rules.h, if_addr.h, netlink.h) ---

RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_NEWRULE, RTM_DELRULE, RTM_GETRULE = 32, 33, 34

NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE, NLM_F_APPEND = 0x100, 0x200, 0x400, 0x800

SOL_NETLINK = 270
SO_RCVBUFFORCE = 33  # not exported by Python's socket module
NETLINK_ADD_MEMBERSHIP = 1
RTNLGRP_LINK = 1
RTNLGRP_IPV4_IFADDR = 5
RTNLGRP_IPV4_ROUTE = 7
RTNLGRP_IPV4_RULE = 8
RTNLGRP_IPV6_IFADDR = 9
RTNLGRP_IPV6_ROUTE = 11
RTNLGRP_IPV6_RULE = 19

FAMILY_NAMES = {socket.AF_INET: "inet", socket.AF_INET6: "inet6"}
FAMILY_NUMBERS = {name: number for number, name in FAMILY_NAMES.items()}

TABLE_NAMES = {0: "unspec", 253: "default", 254: "main", 255: "local"}
ROUTE_TYPE_NAMES = {
    0: "unspec", 1: "unicast", 2: "local", 3: "broadcast", 4: "anycast", 5: "multicast",
    6: "blackhole", 7: "unreachable", 8: "prohibit", 9: "throw", 10: "nat", 11: "xresolve",
}
# The kernel's own RTPROT_* list; iproute2 prints the same names (rt_protos).
PROTOCOL_NAMES = {
    0: "unspec", 1: "redirect", 2: "kernel", 3: "boot", 4: "static", 8: "gated", 9: "ra",
    10: "mrt", 11: "zebra", 12: "bird", 13: "dnrouted", 14: "xorp", 15: "ntk", 16: "dhcp",
    17: "mrouted", 18: "keepalived", 42: "babel", 99: "openr", 186: "bgp", 187: "isis",
    188: "ospf", 189: "rip", 192: "eigrp",
}
SCOPE_NAMES = {0: "global", 200: "site", 253: "link", 254: "host", 255: "nowhere"}


def name_of(names: dict[int, str], value: int) -> str:
    """The kernel's name for VALUE in NAMES, or the number as text (as iproute2 prints)."""
    return names.get(value, str(value))


def table_name(table: int) -> str:
    return name_of(TABLE_NAMES, table)


# --- pyroute2 message classes (requests only), completed where 0.9.7 lacks attributes ---
#
# Built on first use: ``rtnl.RouteMsg`` etc. import pyroute2 then, and only then.

def _pyroute2_classes() -> dict[str, type]:
    from pyroute2.netlink import nlmsg
    from pyroute2.netlink.rtnl.fibmsg import fibmsg
    from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
    from pyroute2.netlink.rtnl.rtmsg import rtmsg

    class RouteMsg(rtmsg):
        """rtmsg with the attributes newer than pyroute2 0.9.7's map (RTA_NH_ID, ...)."""

        __slots__ = ()
        # RTA_EXPIRES is a u32 number of seconds on input; 0.9.7 maps it as "hex".
        nla_map = rtmsg.nla_map[:23] + (
            ("RTA_EXPIRES", "uint32"),
            ("RTA_PAD", "hex"),
            ("RTA_UID", "uint32"),
            ("RTA_TTL_PROPAGATE", "uint8"),
            ("RTA_IP_PROTO", "uint8"),
            ("RTA_SPORT", "be16"),
            ("RTA_DPORT", "be16"),
            ("RTA_NH_ID", "uint32"),
            ("RTA_FLOWLABEL", "be32"),
        )

    class LinkMsg(nlmsg):
        """ifinfomsg decoding only the name: all we need links for is index -> name."""

        __slots__ = ()
        prefix = "IFLA_"
        fields = (
            ("family", "B"),
            ("__align", "x"),
            ("ifi_type", "H"),
            ("index", "i"),
            ("flags", "I"),
            ("change", "I"),
        )
        nla_map = ((0, "IFLA_UNSPEC", "none"), (3, "IFLA_IFNAME", "asciiz"))

    return {"RouteMsg": RouteMsg, "RuleMsg": fibmsg, "AddrMsg": ifaddrmsg, "LinkMsg": LinkMsg}


def __getattr__(name: str) -> type:
    """``RouteMsg``, ``RuleMsg``, ``AddrMsg``, ``LinkMsg``: imported on first access (PEP 562)."""
    if name in ("RouteMsg", "RuleMsg", "AddrMsg", "LinkMsg"):
        globals().update(_pyroute2_classes())
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def encode_payload(msg: Any) -> bytes:
    """The payload (after the netlink header) of a pyroute2 message, as it would send it."""
    msg.encode()
    return bytes(msg.data[16:])


# --- struct decoding shared by the families ---

NLA = struct.Struct("=HH")
U8 = struct.Struct("=B")
U32 = struct.Struct("=I")
IFLA_IFNAME = 3
_IFINFOMSG_SIZE = 16
_IFINDEX = struct.Struct("=i")              # ifinfomsg.ifi_index, at offset 4


def iter_attrs(buf: bytes, off: int, end: int, what: str) -> Iterator[tuple[int, int, int]]:
    """(type, payload start, payload end) of each attribute in BUF[off:end]; KernelError if malformed."""
    while off + 4 <= end:
        length, attr_type = NLA.unpack_from(buf, off)
        if length < 4 or off + length > end:
            raise KernelError(f"cannot {what}: malformed attribute (length {length}) in a kernel message")
        yield attr_type & NLA_TYPE_MASK, off + 4, off + length
        off += (length + 3) & ~3


def first_attrs(buf: bytes, off: int, end: int, what: str) -> dict[int, tuple[int, int]]:
    """{type: (start, end)} of the attributes in BUF[off:end]; the first of a type counts,
    as with pyroute2's get_attr()."""
    found: dict[int, tuple[int, int]] = {}
    for attr_type, s, e in iter_attrs(buf, off, end, what):
        if attr_type not in found:
            found[attr_type] = (s, e)
    return found


def attr_string(buf: bytes, span: tuple[int, int]) -> str:
    """A NUL-terminated string attribute."""
    return bytes(buf[span[0]:span[1]]).split(b"\0", 1)[0].decode("utf-8", "replace")


def attr_address(buf: bytes, span: tuple[int, int]) -> str:
    """An address attribute; its length tells the family (as pyroute2's "ipaddr" decodes)."""
    raw = bytes(buf[span[0]:span[1]])
    return socket.inet_ntop(socket.AF_INET6 if len(raw) > 8 else socket.AF_INET, raw)


class AttrReader:
    """The attributes of BUF[off:end], read by kind: the first of a type counts (as with
    pyroute2's get_attr()), a missing one reads as None."""

    __slots__ = ("buf", "spans")

    def __init__(self, buf: bytes, off: int, end: int, what: str):
        self.buf = buf
        self.spans = first_attrs(buf, off, end, what)

    def __contains__(self, attr: int) -> bool:
        return attr in self.spans

    def unpack(self, attr: int, layout: struct.Struct) -> tuple | None:
        span = self.spans.get(attr)
        return None if span is None else layout.unpack_from(self.buf, span[0])

    def u8(self, attr: int) -> int | None:
        value = self.unpack(attr, U8)
        return None if value is None else value[0]

    def u32(self, attr: int) -> int | None:
        value = self.unpack(attr, U32)
        return None if value is None else value[0]

    def text(self, attr: int) -> str | None:
        span = self.spans.get(attr)
        return None if span is None else attr_string(self.buf, span)

    def address(self, attr: int) -> str | None:
        span = self.spans.get(attr)
        return None if span is None else attr_address(self.buf, span)


def link_at(buf: bytes, off: int, end: int, what: str) -> tuple[int, str | None]:
    """(index, name or None) of the RTM_NEWLINK/DELLINK payload BUF[off:end]."""
    if end - off < _IFINFOMSG_SIZE:
        raise KernelError(f"cannot {what}: a {end - off}-byte link message is too short")
    (index,) = _IFINDEX.unpack_from(buf, off + 4)
    for attr_type, s, e in iter_attrs(buf, off + _IFINFOMSG_SIZE, end, what):
        if attr_type == IFLA_IFNAME:
            return index, attr_string(buf, (s, e))
    return index, None


# --- request socket ---

class Rtnl:
    """One rtnetlink request socket in the calling thread's current namespace.

    Pass one to the dump/add/delete functions to reuse it; its ``port_id`` is
    what monitor events carry for changes made through it.
    """

    def __init__(self) -> None:
        # strict checking: the kernel filters dumps by the request (a table, an interface).
        self._sock: NetlinkSocket | None = NetlinkSocket(NETLINK_ROUTE, strict_check=True)
        self._port_id = self._sock.port_id

    @property
    def port_id(self) -> int:
        return self._port_id

    @property
    def sock(self) -> NetlinkSocket:
        """The raw socket (requests sent on it carry this Rtnl's port id)."""
        if self._sock is None:
            raise KernelError("rtnetlink socket already closed (programming error)")
        return self._sock

    def close(self) -> None:
        if self._sock is not None:
            sock, self._sock = self._sock, None
            sock.close()

    def __enter__(self) -> "Rtnl":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def dump_raw(self, msg_type: int, payload: bytes, what: str) -> list[bytes]:
        """A complete dump as the kernel's datagrams (see ``NetlinkSocket.dump_raw``)."""
        return self.sock.dump_raw(msg_type, payload, what)

    def request(self, msg: Any, msg_type: int, flags: int) -> int:
        """Send one request (a payload, or a pyroute2 message) and wait for its ack: 0, or the
        errno the kernel answered with."""
        payload = msg if isinstance(msg, (bytes, bytearray)) else encode_payload(msg)
        try:
            self.sock.request(msg_type, flags, bytes(payload))
        except KernelError as exc:
            return exc.errno or errno.EIO
        return 0

    def delete(self, msg: Any, msg_type: int, what: str, gone: frozenset[int]) -> DeleteResult:
        """Send a delete: DELETED, ALREADY_GONE when the kernel answers with an errno in GONE."""
        code = self.request(msg, msg_type, 0)
        if code == 0:
            return DeleteResult.DELETED
        if code in gone:
            return DeleteResult.ALREADY_GONE
        raise KernelError(f"cannot delete {what}: {os.strerror(code)}", errno=code)

    def add(self, msg: Any, msg_type: int, what: str, *, replace: bool = False,
            append: bool = False) -> None:
        """Send a create (exclusive unless REPLACE or APPEND); raises KernelError, EEXIST included."""
        flags = NLM_F_CREATE | (NLM_F_REPLACE if replace else NLM_F_APPEND if append else NLM_F_EXCL)
        code = self.request(msg, msg_type, flags)
        if code:
            raise KernelError(f"cannot add {what}: {os.strerror(code)}", errno=code)


class _Borrowed:
    """Context manager yielding the caller's Rtnl, or a fresh one closed afterwards."""

    def __init__(self, rtnl: Rtnl | None):
        self._given = rtnl
        self._own: Rtnl | None = None

    def __enter__(self) -> Rtnl:
        if self._given is not None:
            return self._given
        self._own = Rtnl()
        return self._own

    def __exit__(self, *exc: object) -> None:
        if self._own is not None:
            self._own.close()


def using(rtnl: Rtnl | None) -> _Borrowed:
    """``with using(rtnl) as r``: R is RTNL, or a temporary socket in the current namespace."""
    return _Borrowed(rtnl)


def interface_names(sock: Rtnl | NetlinkSocket) -> dict[int, str]:
    """Interface index -> name in SOCK's namespace."""
    what = "dump network interfaces"
    names = {}
    for data in sock.dump_raw(RTM_GETLINK, bytes(_IFINFOMSG_SIZE), what):
        for off, length, msg_type, _flags, _seq, _pid in walk_messages(data):
            if msg_type == RTM_NEWLINK:
                index, name = link_at(data, off + 16, off + length, what)
                if name is not None:
                    names[index] = name
    return names


def interface_index(names: dict[int, str], ifname: str, what: str) -> int:
    """The index of IFNAME; raises KernelError(ENODEV) naming WHAT when there is none."""
    for index, name in names.items():
        if name == ifname:
            return index
    raise KernelError(f"cannot {what}: no network interface named {ifname!r} in this namespace",
                      errno=errno.ENODEV)


# --- JSON field checks shared by the record types (from_json raises, never guesses) ---

def json_int(d: dict, key: str, *, optional: bool = False, maximum: int = 0xFFFFFFFF) -> Any:
    value = d[key] if not optional else d.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{key} must be an integer, not {value!r}")
    if not 0 <= value <= maximum:
        raise ValueError(f"{key} must be in 0..{maximum}, not {value}")
    return value


def json_str(d: dict, key: str, *, optional: bool = False) -> Any:
    value = d[key] if not optional else d.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise TypeError(f"{key} must be a non-empty string, not {value!r}")
    return value


def json_family(d: dict) -> str:
    family = json_str(d, "family")
    if family not in FAMILY_NUMBERS:
        raise ValueError(f"family must be 'inet' or 'inet6', not {family!r}")
    return family


def json_addr(d: dict, key: str, family: str, *, optional: bool = False,
              any_family: bool = False) -> Any:
    """An address string of FAMILY (either family when ANY_FAMILY), kept as written."""
    value = json_str(d, key, optional=optional)
    if value is None:
        return None
    parsed = ipaddress.ip_address(value)  # ValueError when not an address
    if not any_family and parsed.version != (4 if family == "inet" else 6):
        raise ValueError(f"{key} {value!r} is not an {family} address")
    return value


def json_prefixlen(d: dict, key: str, family: str) -> int:
    return json_int(d, key, maximum=32 if family == "inet" else 128)


def address_version(address: str) -> int:
    return ipaddress.ip_address(address).version


# --- the monitor ---

# Lost notifications (ENOBUFS, or a message we could not decode): the caller must
# re-dump routes, rules and addresses. As in xfrm.py, Action has no dedicated member
# yet, so an overrun is a FLUSH whose family is "rtnl" (no real family has that name).
OVERRUN_FAMILY = "rtnl"
_OVERRUN_ACTION = getattr(Action, "OVERRUN", Action.FLUSH)


def is_overrun(event: KernelEvent) -> bool:
    """True for the marker read_events() puts where rtnetlink notifications were lost."""
    return event.family == OVERRUN_FAMILY


_MONITOR_GROUPS = (
    RTNLGRP_LINK,  # internal: keeps index -> name current for route and address records
    RTNLGRP_IPV4_IFADDR, RTNLGRP_IPV6_IFADDR,
    RTNLGRP_IPV4_ROUTE, RTNLGRP_IPV6_ROUTE,
    RTNLGRP_IPV4_RULE, RTNLGRP_IPV6_RULE,
)
_NLMSGHDR = struct.Struct("=IHHII")
_RECV_SIZE = 1 << 16


class RtnlMonitor:
    """Route, rule and address notifications of the namespace it was opened in.

    Non-blocking and thread-free: poll ``fileno()``, then call ``read_events()``.
    """

    def __init__(self, *, rcvbuf: int = 4 << 20, read_limit: int = 4096):
        # Imported here: the family modules import this one for Rtnl and helpers.
        from . import addresses, routes, rules
        self._decoders = {
            RTM_NEWROUTE: ("route", routes.route_at),
            RTM_DELROUTE: ("route", routes.route_at),
            RTM_NEWRULE: ("rule", rules.rule_at),
            RTM_DELRULE: ("rule", rules.rule_at),
            RTM_NEWADDR: ("address", addresses.address_at),
            RTM_DELADDR: ("address", addresses.address_at),
        }
        self._read_limit = read_limit
        self.overruns = 0
        sock = socket.socket(socket.AF_NETLINK,
                             socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                             socket.NETLINK_ROUTE)
        try:
            try:
                # As root, exceed net.core.rmem_max: bursts (a flush of thousands of routes) fit.
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
            except PermissionError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.bind((0, 0))
            for group in _MONITOR_GROUPS:
                sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)
            self._port_id = sock.getsockname()[0]
            # Subscribed first, dumped second: a link created in between is still seen.
            with Rtnl() as rtnl:
                self._names = interface_names(rtnl)
        except OSError as exc:
            sock.close()
            raise KernelError(f"cannot open the rtnetlink monitor socket: {exc.strerror or exc}",
                              errno=exc.errno) from None
        except BaseException:
            sock.close()
            raise
        self._sock: socket.socket | None = sock

    @property
    def port_id(self) -> int:
        """This socket's own netlink port id."""
        return self._port_id

    def fileno(self) -> int:
        if self._sock is None:
            raise ValueError("rtnl monitor is closed")
        return self._sock.fileno()

    def close(self) -> None:
        if self._sock is not None:
            sock, self._sock = self._sock, None
            sock.close()

    def __enter__(self) -> "RtnlMonitor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read_events(self) -> list[KernelEvent]:
        """Everything queued now (up to ``read_limit`` datagrams), decoded, without blocking.

        Where notifications were lost there is an overrun marker (``is_overrun``): re-dump.
        """
        if self._sock is None:
            raise ValueError("rtnl monitor is closed")
        events: list[KernelEvent] = []
        for _ in range(self._read_limit):
            try:
                data = self._sock.recv(_RECV_SIZE)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    # Reported before the datagrams still queued: keep reading them.
                    self._overrun(events)
                    continue
                raise KernelError(f"cannot read rtnetlink notifications: {exc.strerror or exc}",
                                  errno=exc.errno) from None
            self._decode(data, events)
        return events

    def _overrun(self, events: list[KernelEvent]) -> None:
        self.overruns += 1
        events.append(KernelEvent(OVERRUN_FAMILY, _OVERRUN_ACTION, None, 0))

    def _decode(self, data: bytes, events: list[KernelEvent]) -> None:
        offset = 0
        while offset + _NLMSGHDR.size <= len(data):
            length, msg_type, flags, seq, port_id = _NLMSGHDR.unpack_from(data, offset)
            if length < _NLMSGHDR.size or offset + length > len(data):
                self._overrun(events)  # truncated: the rest of the datagram is unreadable
                return
            try:
                self._decode_one(data, offset, length, msg_type, flags, seq, port_id, events)
            except Exception:  # a message we cannot read is a lost event, not a crash
                self._overrun(events)
            offset += (length + 3) & ~3

    def _decode_one(self, data: bytes, offset: int, length: int, msg_type: int, flags: int,
                    seq: int, port_id: int, events: list[KernelEvent]) -> None:
        start, end = offset + _NLMSGHDR.size, offset + length
        what = "read rtnetlink notifications"
        if msg_type in (RTM_NEWLINK, RTM_DELLINK):
            index, name = link_at(data, start, end, what)
            # Kept after RTM_DELLINK: IPv6 route deletions for the link may follow it.
            if name is not None:
                self._names[index] = name
            return
        decoder = self._decoders.get(msg_type)
        if decoder is None:
            return
        family, record_at = decoder
        record = record_at(data, start, end, self._names, what)
        if record is None:  # other address families, cached clones
            return
        if msg_type in (RTM_DELROUTE, RTM_DELRULE, RTM_DELADDR):
            action = Action.DELETE
        elif flags & NLM_F_REPLACE:
            action = Action.UPDATE
        else:
            action = Action.NEW
        events.append(KernelEvent(family=family, action=action, record=record,
                                  port_id=port_id, seq=seq))

