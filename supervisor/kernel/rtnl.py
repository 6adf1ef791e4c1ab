"""Shared rtnetlink plumbing for routes, rules and addresses, and the rtnl monitor.

Requests and dumps go through pyroute2's ``IPRoute`` (wrapped by ``Rtnl``);
errno handling for them lives here once. The monitor is a plain non-blocking
AF_NETLINK socket (pyroute2 only decodes), because pyroute2 0.9's asyncio
receive path has no way to drain a socket without blocking once it is empty.
Nothing pyroute2 leaves this package: callers see records and ``KernelEvent``s.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from typing import Any, Callable

from pyroute2 import IPRoute
from pyroute2.netlink import (
    NLM_F_ACK,
    NLM_F_APPEND,
    NLM_F_CREATE,
    NLM_F_DUMP,
    NLM_F_EXCL,
    NLM_F_REPLACE,
    NLM_F_REQUEST,
    nlmsg,
)
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.fibmsg import fibmsg
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from ..errors import KernelError
from .common import Action, DeleteResult, KernelEvent

# --- kernel constants (linux/rtnetlink.h, fib_rules.h, if_addr.h, netlink.h) ---

RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_NEWRULE, RTM_DELRULE, RTM_GETRULE = 32, 33, 34

NLM_F_DUMP_INTR = 0x10

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


# --- pyroute2 message classes, completed where 0.9.7 lacks attributes ---

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


RuleMsg = fibmsg
AddrMsg = ifaddrmsg


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


_MSG_CLASSES = {
    RTM_NEWROUTE: RouteMsg, RTM_DELROUTE: RouteMsg,
    RTM_NEWRULE: RuleMsg, RTM_DELRULE: RuleMsg,
    RTM_NEWADDR: AddrMsg, RTM_DELADDR: AddrMsg,
    RTM_NEWLINK: LinkMsg, RTM_DELLINK: LinkMsg,
}

# A dump the kernel flags as interrupted (the table changed under it) is retried.
DUMP_ATTEMPTS = 5


# --- request socket ---

class Rtnl:
    """One rtnetlink request socket in the calling thread's current namespace.

    Pass one to the dump/add/delete functions to reuse it; its ``port_id`` is
    what monitor events carry for changes made through it.
    """

    def __init__(self) -> None:
        try:
            # groups=0: a request socket must not also collect multicast traffic.
            ipr = IPRoute(groups=0, strict_check=True)
        except OSError as exc:
            raise KernelError(f"cannot open an rtnetlink socket: {exc.strerror or exc}",
                              errno=exc.errno) from None
        try:
            # pyroute2 0.9.7: nlm_request() raises KeyError('nlm_generator') without this.
            ipr.asyncore.status["nlm_generator"] = False
            ipr.asyncore.marshal.msg_map.update(_MSG_CLASSES)
            # Bind now (kernel-chosen port) so port_id is known before the first request.
            ipr.asyncore.socket.bind((0, 0))
            self._port_id = ipr.asyncore.socket.getsockname()[0]
        except OSError as exc:
            ipr.close()
            raise KernelError(f"cannot bind an rtnetlink socket: {exc.strerror or exc}",
                              errno=exc.errno) from None
        except BaseException:
            ipr.close()
            raise
        self._ipr: IPRoute | None = ipr

    @property
    def port_id(self) -> int:
        return self._port_id

    def close(self) -> None:
        if self._ipr is not None:
            ipr, self._ipr = self._ipr, None
            ipr.close()

    def __enter__(self) -> "Rtnl":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _live(self) -> IPRoute:
        if self._ipr is None:
            raise KernelError("rtnetlink socket already closed (programming error)")
        return self._ipr

    def dump(self, make_request: Callable[[], nlmsg], msg_type: int, what: str) -> list[nlmsg]:
        """Run a dump request and return the reply messages; raises KernelError, never returns short."""
        reply_type = msg_type - 2  # RTM_GET* -> RTM_NEW*
        for _ in range(DUMP_ATTEMPTS):
            try:
                replies = self._live().nlm_request(
                    make_request(), msg_type=msg_type, msg_flags=NLM_F_REQUEST | NLM_F_DUMP)
            except NetlinkError as exc:
                raise KernelError(f"cannot dump {what}: {os.strerror(exc.code)}", errno=exc.code) from None
            except OSError as exc:
                raise KernelError(f"cannot dump {what}: {exc.strerror or exc}", errno=exc.errno) from None
            if any(msg["header"]["flags"] & NLM_F_DUMP_INTR for msg in replies):
                continue
            result = []
            for msg in replies:
                if msg["header"].get("error") is not None:
                    raise KernelError(f"cannot dump {what}: undecodable reply ({msg['header']['error']})")
                if msg["header"]["type"] == reply_type:
                    result.append(msg)
            return result
        raise KernelError(f"cannot dump {what}: the kernel reported {DUMP_ATTEMPTS} dumps in a row "
                          "as interrupted (the table keeps changing); retry later", errno=errno.EINTR)

    def request(self, msg: nlmsg, msg_type: int, flags: int) -> int:
        """Send one request and wait for its ack: 0, or the errno the kernel answered with."""
        try:
            self._live().nlm_request(msg, msg_type=msg_type, msg_flags=NLM_F_REQUEST | NLM_F_ACK | flags)
        except NetlinkError as exc:
            return exc.code
        except OSError as exc:
            return exc.errno or errno.EIO
        return 0

    def delete(self, msg: nlmsg, msg_type: int, what: str, gone: frozenset[int]) -> DeleteResult:
        """Send a delete: DELETED, ALREADY_GONE when the kernel answers with an errno in GONE."""
        code = self.request(msg, msg_type, 0)
        if code == 0:
            return DeleteResult.DELETED
        if code in gone:
            return DeleteResult.ALREADY_GONE
        raise KernelError(f"cannot delete {what}: {os.strerror(code)}", errno=code)

    def add(self, msg: nlmsg, msg_type: int, what: str, *, replace: bool = False,
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


def interface_names(rtnl: Rtnl) -> dict[int, str]:
    """Interface index -> name in RTNL's namespace."""
    def request() -> nlmsg:
        msg = LinkMsg()
        msg["family"] = socket.AF_UNSPEC
        return msg
    names = {}
    for msg in rtnl.dump(request, RTM_GETLINK, "network interfaces"):
        name = msg.get_attr("IFLA_IFNAME")
        if name is not None:
            names[msg["index"]] = name
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
            RTM_NEWROUTE: ("route", routes.route_from_msg),
            RTM_DELROUTE: ("route", routes.route_from_msg),
            RTM_NEWRULE: ("rule", rules.rule_from_msg),
            RTM_DELRULE: ("rule", rules.rule_from_msg),
            RTM_NEWADDR: ("address", addresses.address_from_msg),
            RTM_DELADDR: ("address", addresses.address_from_msg),
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
                self._decode_one(data, offset, msg_type, flags, seq, port_id, events)
            except Exception:  # a message we cannot read is a lost event, not a crash
                self._overrun(events)
            offset += (length + 3) & ~3

    def _decode_one(self, data: bytes, offset: int, msg_type: int, flags: int, seq: int,
                    port_id: int, events: list[KernelEvent]) -> None:
        if msg_type in (RTM_NEWLINK, RTM_DELLINK):
            msg = LinkMsg(data, offset=offset)
            msg.decode()
            name = msg.get_attr("IFLA_IFNAME")
            # Kept after RTM_DELLINK: IPv6 route deletions for the link may follow it.
            if name is not None:
                self._names[msg["index"]] = name
            return
        decoder = self._decoders.get(msg_type)
        if decoder is None:
            return
        family, from_msg = decoder
        msg = _MSG_CLASSES[msg_type](data, offset=offset)
        msg.decode()
        record = from_msg(msg, self._names)
        if record is None:  # other address families, cloned routes
            return
        if msg_type in (RTM_DELROUTE, RTM_DELRULE, RTM_DELADDR):
            action = Action.DELETE
        elif flags & NLM_F_REPLACE:
            action = Action.UPDATE
        else:
            action = Action.NEW
        events.append(KernelEvent(family=family, action=action, record=record,
                                  port_id=port_id, seq=seq))

