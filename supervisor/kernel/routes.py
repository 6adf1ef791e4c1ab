"""Routes (IPv4 and IPv6) over rtnetlink: dump, add, delete.

charon installs its routes in table 220 (``charon.routing_table``), protocol
static. A route is deleted by re-sending exactly what the dump returned
(type, scope, protocol, metric, nexthops), so the kernel removes that route
and no look-alike, and a scope guessed wrong cannot make the delete fail.
Dumps, deletes and the monitor's decoding use a raw socket and ``struct``
(thousands of routes, and no pyroute2 in an idle process); adds go through pyroute2.
"""

from __future__ import annotations

import errno
import gc
import socket
import struct
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Iterator

from ..errors import KernelError
from .common import DeleteResult
from .netlink import NETLINK_ROUTE, NLA_TYPE_MASK, NetlinkSocket, NotFound, pack_attr, walk_messages
from .rtnl import (
    FAMILY_NAMES,
    FAMILY_NUMBERS,
    PROTOCOL_NAMES,
    ROUTE_TYPE_NAMES,
    RTM_DELROUTE,
    RTM_GETROUTE,
    RTM_NEWROUTE,
    SCOPE_NAMES,
    Rtnl,
    address_version,
    interface_index,
    interface_names,
    iter_attrs,
    json_addr,
    json_family,
    json_int,
    json_prefixlen,
    json_str,
    name_of,
    table_name,
    using,
)
from .xfrm import _fast_builder

if TYPE_CHECKING:
    from .rtnl import RouteMsg

RTN_UNICAST = 1
RTPROT_BOOT = 3
RTPROT_STATIC = 4
RT_SCOPE_UNIVERSE = 0
RTNH_F_ONLINK = 4
RTM_F_CLONED = 0x200
RTNH_FLAG_NAMES = {1: "dead", 2: "pervasive", 4: "onlink", 8: "offload", 16: "linkdown",
                   32: "unresolved", 64: "trap"}
METRIC_NAMES = ("lock", "mtu", "window", "rtt", "rttvar", "ssthresh", "cwnd", "advmss",
                "reordering", "hoplimit", "initcwnd", "features", "rto_min", "initrwnd",
                "quickack", "cc_algo", "fastopen_no_cookie")
USER_HZ = 100  # rta_cacheinfo.rta_expires is in clock ticks

# Routes that vanish with their device or table answer ESRCH; ENODEV when the device is gone.
_GONE = frozenset({errno.ESRCH, errno.ENOENT, errno.ENODEV})


def hop_text(gateway: str | None, oif: int | None, oif_name: str | None, weight: int) -> str:
    """NextHop.describe of these values (snapshot_typed describes without building a record)."""
    parts = ["nexthop"]
    if gateway:
        parts += ["via", gateway]
    if oif_name or oif:
        parts += ["dev", oif_name or f"if{oif}"]
    parts += ["weight", str(weight)]
    return " ".join(parts)


def dst_prefix_text(family: str, dst: str, dst_len: int) -> str:
    """A route's destination as ``ip route`` prints it: "default", an address, or a prefix."""
    if dst_len == 0 and dst in ("0.0.0.0", "::"):
        return "default"
    full = 32 if family == "inet" else 128
    return dst if dst_len == full else f"{dst}/{dst_len}"


def route_text(family: str, table: int, dst: str, dst_len: int, type: int, gateway: str | None,
               oif: int | None, oif_name: str | None, prefsrc: str | None, src: str | None, src_len: int,
               tos: int, priority: int, hops: list[str], nhid: int | None) -> str:
    """Route.describe of these values, HOPS its nexthops' hop_text."""
    parts = ["route"]
    if type != RTN_UNICAST:
        parts.append(name_of(ROUTE_TYPE_NAMES, type))
    parts.append(dst_prefix_text(family, dst, dst_len))
    if src is not None:
        parts += ["from", f"{src}/{src_len}"]
    if tos:
        parts += ["tos", f"0x{tos:02x}"]
    if nhid is not None:
        parts += ["nhid", str(nhid)]
    if gateway:
        parts += ["via", gateway]
    if oif_name or oif:
        parts += ["dev", oif_name or f"if{oif}"]
    if hops:
        parts += hops
    if prefsrc:
        parts += ["src", prefsrc]
    if priority:
        parts += ["metric", str(priority)]
    parts += ["table", table_name(table)]
    return " ".join(parts)


@dataclass(frozen=True, slots=True)
class NextHop:
    """One path of a multipath route."""

    gateway: str | None
    oif: int | None = None
    oif_name: str | None = None
    weight: int = 1
    flags: int = 0

    def describe(self) -> str:
        return hop_text(self.gateway, self.oif, self.oif_name, self.weight)

    def to_json(self) -> dict:
        return {"gateway": self.gateway, "oif": self.oif, "oif_name": self.oif_name,
                "weight": self.weight, "flags": self.flags}

    @classmethod
    def from_json(cls, d: dict) -> "NextHop":
        if not isinstance(d, dict):
            raise TypeError(f"a nexthop must be an object, not {d!r}")
        return cls(gateway=json_addr(d, "gateway", "inet", optional=True, any_family=True),
                   oif=json_int(d, "oif", optional=True),
                   oif_name=json_str(d, "oif_name", optional=True),
                   weight=json_int(d, "weight", maximum=256),
                   flags=json_int(d, "flags", maximum=0xFF))


@dataclass(frozen=True, slots=True)
class Route:
    """One route as the kernel holds it (``ip route`` terms), plus what deletes it exactly."""

    FAMILY: ClassVar[str] = "route"
    VOLATILE: ClassVar[frozenset[str]] = frozenset({"expires"})

    family: str                     # "inet" | "inet6"
    table: int
    dst: str                        # network address; 0.0.0.0 / :: with dst_len 0 is "default"
    dst_len: int
    type: int = RTN_UNICAST         # RTN_*: unicast, local, blackhole, throw, ...
    protocol: int = RTPROT_BOOT     # RTPROT_*; "ip route add" uses boot, charon static
    scope: int = RT_SCOPE_UNIVERSE
    gateway: str | None = None      # RTA_GATEWAY, or RTA_VIA (an IPv6 gateway of an IPv4 route)
    oif: int | None = None          # output interface index ...
    oif_name: str | None = None     # ... and its name when dumped
    prefsrc: str | None = None      # "src" in ip terms
    src: str | None = None          # source prefix ("from", IPv6 subtrees)
    src_len: int = 0
    tos: int = 0
    priority: int = 0               # "metric"; IPv6 routes added with 0 get 1024
    metrics: tuple[tuple[str, int | str], ...] = ()   # RTAX_* (mtu, advmss, ...), sorted
    multipath: tuple[NextHop, ...] = ()
    nhid: int | None = None         # nexthop object id (then gateway/oif are its info only)
    pref: int | None = None         # IPv6 router preference (RTA_PREF)
    flags: int = 0                  # rtm_flags (RTNH_F_ONLINK, linkdown, ...)
    expires: int | None = None      # seconds left, IPv6 routes with a lifetime

    @property
    def protocol_name(self) -> str:
        return name_of(PROTOCOL_NAMES, self.protocol)

    @property
    def type_name(self) -> str:
        return name_of(ROUTE_TYPE_NAMES, self.type)

    @property
    def scope_name(self) -> str:
        return name_of(SCOPE_NAMES, self.scope)

    @property
    def dst_prefix(self) -> str:
        return dst_prefix_text(self.family, self.dst, self.dst_len)

    def key(self) -> tuple:
        hops = tuple((h.gateway, h.oif, h.weight) for h in self.multipath)
        # IPv4 lets routes differing only in src, protocol or scope coexist (ip route append).
        return (self.family, self.table, self.type, self.dst, self.dst_len, self.src,
                self.src_len, self.tos, self.priority, self.gateway, self.oif, hops, self.nhid,
                self.prefsrc, self.protocol, self.scope)

    def describe(self) -> str:
        return route_text(self.family, self.table, self.dst, self.dst_len, self.type, self.gateway, self.oif,
                          self.oif_name, self.prefsrc, self.src, self.src_len, self.tos, self.priority,
                          [hop.describe() for hop in self.multipath], self.nhid)

    def to_json(self, include_keys: bool = False) -> dict:
        return {
            "family": self.family, "table": self.table, "dst": self.dst, "dst_len": self.dst_len,
            "type": self.type, "type_name": self.type_name,
            "protocol": self.protocol, "protocol_name": self.protocol_name,
            "scope": self.scope, "scope_name": self.scope_name,
            "gateway": self.gateway, "oif": self.oif, "oif_name": self.oif_name,
            "prefsrc": self.prefsrc, "src": self.src, "src_len": self.src_len, "tos": self.tos,
            "priority": self.priority, "metrics": dict(self.metrics),
            "multipath": [hop.to_json() for hop in self.multipath],
            "nhid": self.nhid, "pref": self.pref, "flags": self.flags, "expires": self.expires,
        }

    @classmethod
    def from_json(cls, d: dict) -> "Route":
        if not isinstance(d, dict):
            raise TypeError(f"a route must be an object, not {d!r}")
        family = json_family(d)
        metrics = d.get("metrics", {})
        if not isinstance(metrics, dict):
            raise TypeError(f"metrics must be an object, not {metrics!r}")
        for name, value in metrics.items():
            if name not in METRIC_NAMES:
                raise ValueError(f"unknown route metric {name!r}")
            if not isinstance(value, (int, str)) or isinstance(value, bool):
                raise TypeError(f"metric {name} must be an integer or a string, not {value!r}")
        multipath = d.get("multipath", [])
        if not isinstance(multipath, list):
            raise TypeError(f"multipath must be a list, not {multipath!r}")
        return cls(
            family=family,
            table=json_int(d, "table"),
            dst=json_addr(d, "dst", family),
            dst_len=json_prefixlen(d, "dst_len", family),
            type=json_int(d, "type", maximum=0xFF),
            protocol=json_int(d, "protocol", maximum=0xFF),
            scope=json_int(d, "scope", maximum=0xFF),
            gateway=json_addr(d, "gateway", family, optional=True, any_family=True),
            oif=json_int(d, "oif", optional=True),
            oif_name=json_str(d, "oif_name", optional=True),
            prefsrc=json_addr(d, "prefsrc", family, optional=True),
            src=json_addr(d, "src", family, optional=True),
            src_len=json_prefixlen(d, "src_len", family),
            tos=json_int(d, "tos", maximum=0xFF),
            priority=json_int(d, "priority"),
            metrics=tuple(sorted(metrics.items())),
            multipath=tuple(NextHop.from_json(hop) for hop in multipath),
            nhid=json_int(d, "nhid", optional=True),
            pref=json_int(d, "pref", optional=True, maximum=0xFF),
            flags=json_int(d, "flags"),
            expires=json_int(d, "expires", optional=True),
        )


def _gateway_of(family: int, attrs: Any) -> str | None:
    gateway = attrs.get_attr("RTA_GATEWAY")
    if gateway is None:
        via = attrs.get_attr("RTA_VIA")
        if via is not None:
            gateway = via["addr"] if isinstance(via, dict) else via.get("addr")
    return gateway


def route_from_msg(msg: RouteMsg, names: dict[int, str]) -> Route | None:
    """A Route from pyroute2's decoding of RTM_NEWROUTE/DELROUTE (the reference ``route_at``
    is tested against); None for other families and cached clones."""
    family = FAMILY_NAMES.get(msg["family"])
    if family is None or msg["flags"] & RTM_F_CLONED:
        return None
    table = msg.get_attr("RTA_TABLE")
    if table is None:
        table = msg["table"]
    dst = msg.get_attr("RTA_DST") or ("0.0.0.0" if family == "inet" else "::")
    oif = msg.get_attr("RTA_OIF")
    metrics_nla = msg.get_attr("RTA_METRICS")
    metrics: list[tuple[str, int | str]] = []
    if metrics_nla is not None:
        for attr in metrics_nla["attrs"]:
            metrics.append((attr[0][len("RTAX_"):].lower(), attr[1]))
    hops = []
    for hop in msg.get_attr("RTA_MULTIPATH") or ():
        hop_oif = hop["oif"] or None
        hops.append(NextHop(gateway=_gateway_of(msg["family"], hop), oif=hop_oif,
                            oif_name=names.get(hop_oif) if hop_oif else None,
                            weight=hop["hops"] + 1, flags=hop["flags"]))
    expires = None
    cacheinfo = msg.get_attr("RTA_CACHEINFO")
    if cacheinfo is not None and cacheinfo["rta_expires"] > 0:
        expires = cacheinfo["rta_expires"] // USER_HZ
    return Route(
        family=family,
        table=table,
        dst=dst,
        dst_len=msg["dst_len"],
        type=msg["type"],
        protocol=msg["proto"],
        scope=msg["scope"],
        gateway=_gateway_of(msg["family"], msg),
        oif=oif,
        oif_name=names.get(oif) if oif else None,
        prefsrc=msg.get_attr("RTA_PREFSRC"),
        src=msg.get_attr("RTA_SRC"),
        src_len=msg["src_len"],
        tos=msg["tos"],
        priority=msg.get_attr("RTA_PRIORITY") or 0,
        metrics=tuple(sorted(metrics)),
        multipath=tuple(hops),
        nhid=msg.get_attr("RTA_NH_ID"),
        pref=msg.get_attr("RTA_PREF"),
        flags=msg["flags"],
        expires=expires,
    )


# --- raw rtnetlink: dumps decoded with struct, deletes pipelined ---------------------------
#
# pyroute2 spends about 0.1 ms decoding a route and 0.6 ms per request: a table of
# 10,000 charon routes took a second to read and seconds to clear. Dumps and deletes go
# over a raw socket (Rtnl's own when one is given, so changes carry its port id), with
# records built exactly as route_from_msg builds them from pyroute2's decoding and
# delete requests byte for byte what _route_msg encodes (tests/test_routes.py compares).

RTA_DST, RTA_SRC, RTA_OIF, RTA_GATEWAY, RTA_PRIORITY, RTA_PREFSRC = 1, 2, 4, 5, 6, 7
RTA_METRICS, RTA_MULTIPATH, RTA_CACHEINFO, RTA_TABLE, RTA_VIA, RTA_PREF, RTA_NH_ID = 8, 9, 12, 15, 18, 20, 30
RTAX_CC_ALGO = 16

_RTMSG = struct.Struct("=BBBBBBBBI")        # struct rtmsg
_RTNH = struct.Struct("=HBBi")              # struct rtnexthop
_NLA = struct.Struct("=HH")
_U32 = struct.Struct("=I")
_U16 = struct.Struct("=H")
_I32 = struct.Struct("=i")
_ADDR_LEN = {socket.AF_INET: 4, socket.AF_INET6: 16}


@contextmanager
def _socket(rtnl: Rtnl | None) -> Iterator[NetlinkSocket]:
    """A raw rtnetlink socket: RTNL's own (same port id) or a fresh one in this namespace."""
    if rtnl is not None:
        yield rtnl.sock
        return
    sock = NetlinkSocket(NETLINK_ROUTE, strict_check=True)
    try:
        yield sock
    finally:
        sock.close()


def _ntop(family: int, raw: bytes) -> str:
    return socket.inet_ntop(family, raw[:_ADDR_LEN[family]])


def _via(raw: bytes) -> str:
    """The address of an RTA_VIA (struct rtvia: family, then the address), as pyroute2 gives it."""
    (family,) = _U16.unpack_from(raw, 0)
    addr = raw[2:]
    if _ADDR_LEN.get(family) == len(addr):
        return socket.inet_ntop(family, addr)
    return ":".join(f"{b:02x}" for b in addr)


def _gateway_in(buf: bytes, start: int, end: int, family: int, what: str) -> str | None:
    gateway = via = None
    for attr_type, s, e in iter_attrs(buf, start, end, what):
        if attr_type == RTA_GATEWAY and gateway is None:
            gateway = _ntop(family, buf[s:e])
        elif attr_type == RTA_VIA and via is None:
            via = _via(buf[s:e])
    return gateway if gateway is not None else via


def route_at(buf: bytes, off: int, end: int, names: dict[int, str], what: str) -> Route | None:
    """The Route of the RTM_NEWROUTE/DELROUTE payload BUF[off:end]; None for other families and clones."""
    if end - off < _RTMSG.size:
        raise KernelError(f"cannot {what}: a {end - off}-byte route message is too short")
    af, dst_len, src_len, tos, rtm_table, proto, scope, rtype, flags = _RTMSG.unpack_from(buf, off)
    family = FAMILY_NAMES.get(af)
    if family is None or flags & RTM_F_CLONED:
        return None
    size = _ADDR_LEN[af]
    ntop, intern = socket.inet_ntop, sys.intern
    u32 = _U32.unpack_from
    table = dst = src = gateway = via = oif = prefsrc = priority = nhid = pref = None
    metrics_at = multipath_at = cacheinfo_at = None
    p = off + _RTMSG.size
    try:
        # The first of each attribute counts, as with pyroute2's get_attr().
        while p + 4 <= end:
            length, attr_type = _NLA.unpack_from(buf, p)
            if length < 4 or p + length > end:
                raise KernelError(f"cannot {what}: malformed attribute (length {length}) in a kernel message")
            attr_type &= NLA_TYPE_MASK
            s = p + 4
            if attr_type == RTA_DST:
                if dst is None:
                    dst = ntop(af, buf[s:s + size])
            elif attr_type == RTA_TABLE:
                if table is None:
                    (table,) = u32(buf, s)
            elif attr_type == RTA_OIF:
                if oif is None:
                    (oif,) = u32(buf, s)
            elif attr_type == RTA_GATEWAY:
                if gateway is None:
                    gateway = intern(ntop(af, buf[s:s + size]))     # a few per table: one string each
            elif attr_type == RTA_PREFSRC:
                if prefsrc is None:
                    prefsrc = intern(ntop(af, buf[s:s + size]))
            elif attr_type == RTA_PRIORITY:
                if priority is None:
                    (priority,) = u32(buf, s)
            elif attr_type == RTA_SRC:
                if src is None:
                    src = ntop(af, buf[s:s + size])
            elif attr_type == RTA_VIA:
                if via is None:
                    via = _via(buf[s:p + length])
            elif attr_type == RTA_METRICS:
                metrics_at = metrics_at or (s, p + length)
            elif attr_type == RTA_MULTIPATH:
                multipath_at = multipath_at or (s, p + length)
            elif attr_type == RTA_CACHEINFO:
                cacheinfo_at = cacheinfo_at or s
            elif attr_type == RTA_NH_ID:
                if nhid is None:
                    (nhid,) = u32(buf, s)
            elif attr_type == RTA_PREF:
                if pref is None:
                    pref = buf[s]
            p += (length + 3) & ~3
        metrics: tuple = ()
        if metrics_at is not None:
            found = []
            for attr_type, s, e in iter_attrs(buf, *metrics_at, what):
                if 0 < attr_type <= len(METRIC_NAMES):
                    value: int | str = (bytes(buf[s:e]).split(b"\0", 1)[0].decode("utf-8", "replace")
                                        if attr_type == RTAX_CC_ALGO else u32(buf, s)[0])
                    found.append((METRIC_NAMES[attr_type - 1], value))
            metrics = tuple(sorted(found))
        hops: tuple = ()
        if multipath_at is not None:
            hops = _nexthops(buf, *multipath_at, af, names, what)
        expires = None
        if cacheinfo_at is not None:
            (left,) = _I32.unpack_from(buf, cacheinfo_at + 8)     # rta_expires
            if left > 0:
                expires = left // USER_HZ
    except (ValueError, struct.error, OSError) as exc:
        raise KernelError(f"cannot {what}: undecodable route attribute ({exc})") from None
    return _new_route(family, rtm_table if table is None else table,
                      dst or ("0.0.0.0" if af == socket.AF_INET else "::"), dst_len, rtype, proto, scope,
                      gateway if gateway is not None else via, oif, names.get(oif) if oif else None, prefsrc,
                      src, src_len, tos, priority or 0, metrics, hops, nhid, pref, flags, expires)


# A dump builds thousands of these: field stores without the frozen dataclass's __setattr__.
_new_route = _fast_builder(Route)


def _nexthops(buf: bytes, p: int, end: int, af: int, names: dict[int, str], what: str) -> tuple:
    hops = []
    while p + _RTNH.size <= end:
        length, hop_flags, hop_hops, hop_oif = _RTNH.unpack_from(buf, p)
        if length < _RTNH.size or p + length > end:
            raise KernelError(f"cannot {what}: malformed nexthop (length {length}) in a kernel message")
        hop_oif = hop_oif or None
        hops.append(NextHop(gateway=_gateway_in(buf, p + _RTNH.size, p + length, af, what), oif=hop_oif,
                            oif_name=names.get(hop_oif) if hop_oif else None, weight=hop_hops + 1,
                            flags=hop_flags))
        p += (length + 3) & ~3
    return tuple(hops)


def decode_routes(chunks: list[bytes], names: dict[int, str], table: int | None = None,
                  what: str = "decode routes") -> list[Route]:
    """The routes (of TABLE, unless None) in the datagrams of an RTM_GETROUTE dump."""
    routes = []
    # The records are acyclic: the collector would only rescan a heap that keeps growing.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for data in chunks:
            for off, length, msg_type, _flags, _seq, _pid in walk_messages(data):
                if msg_type == RTM_NEWROUTE:
                    if length < 16 + _RTMSG.size:
                        raise KernelError(f"cannot {what}: a {length}-byte route message is too short")
                    route = route_at(data, off + 16, off + length, names, what)
                    if route is not None and (table is None or route.table == table):
                        routes.append(route)
    finally:
        if gc_was_enabled:
            gc.enable()
    return routes


def _dump(sock: NetlinkSocket, af: int, table: int | None, names: dict[int, str]) -> list[Route]:
    what, chunks = dump_chunks(sock, af, table)
    return decode_routes(chunks, names, table, what)


def _dump_later(sock: NetlinkSocket, af: int, table: int | None, names: dict[int, str]):
    """The dump now, decoded when the returned function is called (a crash's read before the restart)."""
    what, chunks = dump_chunks(sock, af, table)
    return lambda: decode_routes(chunks, names, table, what)


def dump_chunks(sock: NetlinkSocket, af: int, table: int | None) -> tuple[str, list[bytes]]:
    """(what, datagrams) of a route dump of family AF (for decoders of their own, and decode_routes)."""
    payload = _RTMSG.pack(af, 0, 0, 0, 0, 0, 0, 0, 0)
    if table is not None:
        # Filtered in the kernel (strict checking): a full BGP table is not decoded here.
        payload += pack_attr(RTA_TABLE, _U32.pack(table))
    what = f"dump {FAMILY_NAMES[af]} routes" + (f" of table {table_name(table)}" if table is not None else "")
    try:
        return what, sock.dump_raw(RTM_GETROUTE, payload, what)
    except NotFound:
        if table is None:
            raise
        return what, []     # the kernel says "FIB table does not exist": no route in it


def dump_routes(table: int | None = 220, *, rtnl: Rtnl | None = None) -> list[Route]:
    """IPv4 and IPv6 routes of TABLE (None: every table); raises KernelError on failure."""
    with _socket(rtnl) as sock:
        names = interface_names(sock)
        return _dump(sock, socket.AF_INET, table, names) + _dump(sock, socket.AF_INET6, table, names)


def dump_routes_later(table: int | None = 220, *, rtnl: Rtnl | None = None):
    """As ``dump_routes``, but only the kernel's answer is taken now: returns the decoder of it."""
    with _socket(rtnl) as sock:
        names = interface_names(sock)
        v4, v6 = _dump_later(sock, socket.AF_INET, table, names), _dump_later(sock, socket.AF_INET6, table, names)
    return lambda: v4() + v6()


def delete_lookup_accepts(request: Route, candidate: Route) -> bool:
    """Whether the kernel's delete lookup, fed REQUEST's attributes, could take CANDIDATE.

    Zero or absent values are wildcards to the kernel. Errs toward True: a false
    match only makes a delete refuse, a missed one would remove a stranger.
    """
    if ((candidate.family, candidate.table, candidate.dst, candidate.dst_len, candidate.src,
         candidate.src_len) != (request.family, request.table, request.dst, request.dst_len,
                                request.src, request.src_len)):
        return False
    if request.family == "inet":
        # fib_table_delete: tos, type and scope are always sent, prefsrc when set.
        if (candidate.tos, candidate.type, candidate.scope) != (request.tos, request.type, request.scope):
            return False
        if request.prefsrc is not None and candidate.prefsrc != request.prefsrc:
            return False
    if request.priority and candidate.priority != request.priority:
        return False
    if request.protocol and candidate.protocol != request.protocol:
        return False
    if request.nhid is not None:
        return candidate.nhid == request.nhid
    # A single-path request is compared with a multipath route's first hop.
    first = candidate.multipath[0] if candidate.multipath else None
    oif = first.oif if first else candidate.oif
    gateway = first.gateway if first else candidate.gateway
    if request.oif and oif != request.oif:
        return False
    if request.gateway is not None and gateway != request.gateway:
        return False
    if request.multipath and candidate.multipath:
        hops = [(hop.gateway, hop.oif) for hop in candidate.multipath]
        if hops != [(hop.gateway, hop.oif) for hop in request.multipath]:
            return False
    return True


def decide_delete(route: Route, current: list[Route]) -> Route | None:
    """The route in CURRENT (kernel order) that deleting ROUTE removes: None when it is gone.

    Raises KernelError when the kernel would take a different route listed first.
    """
    mine = route.key()
    if not any(c.key() == mine and delete_lookup_accepts(route, c) for c in current):
        return None
    first = next(c for c in current if delete_lookup_accepts(route, c))
    if first.key() != mine:
        raise KernelError(f"cannot delete {route.describe()} exactly: the kernel would remove "
                          f"{first.describe()} instead (listed first, and matching all that a delete "
                          "request can say); both left in place")
    return first


def _lookup_prefix(route: Route) -> tuple:
    """What every route a delete of ROUTE could take shares with it (see delete_lookup_accepts)."""
    return (route.family, route.table, route.dst, route.dst_len, route.src, route.src_len)


def delete_routes(routes: list[Route], *, rtnl: Rtnl | None = None) -> list[DeleteResult | KernelError]:
    """Delete each of ROUTES exactly, pipelined, one dump per table: a result or the error, per route.

    Each decision is ``decide_delete``'s against the dump as the deletes before it left it.
    Only routes of one destination prefix can affect each other's decision; a route whose
    prefix has a delete in flight waits for the next round, after that delete's answer.
    """
    results: list[DeleteResult | KernelError | None] = [None] * len(routes)
    with _socket(rtnl) as sock:
        names: dict[int, str] | None = None
        tables: dict[tuple[str, int], dict[tuple, list[Route]]] = {}
        pending = list(range(len(routes)))
        while pending:
            busy: set[tuple] = set()
            deferred: list[int] = []
            batch: list[tuple[int, Route, list[Route]]] = []
            requests: list[tuple[int, int, bytes]] = []
            for i in pending:
                route = routes[i]
                try:
                    where = (route.family, route.table)
                    by_prefix = tables.get(where)
                    if by_prefix is None:
                        if names is None:
                            names = interface_names(sock)
                        by_prefix = tables[where] = {}
                        for current in _dump(sock, FAMILY_NUMBERS[route.family], route.table, names):
                            by_prefix.setdefault(_lookup_prefix(current), []).append(current)
                    prefix = _lookup_prefix(route)
                    if prefix in busy:
                        deferred.append(i)
                        continue
                    bucket = by_prefix.setdefault(prefix, [])
                    target = decide_delete(route, bucket)
                    if target is None:
                        results[i] = DeleteResult.ALREADY_GONE
                        continue
                    payload = encode_route_delete(route)
                except KernelError as exc:
                    results[i] = exc
                    continue
                busy.add(prefix)
                batch.append((i, target, bucket))
                requests.append((RTM_DELROUTE, 0, payload))
            answers = sock.request_many(requests, lambda k: f"delete {routes[batch[k][0]].describe()}")
            for (i, target, bucket), answer in zip(batch, answers):
                if isinstance(answer, KernelError) and answer.errno not in _GONE:
                    results[i] = answer
                    continue
                results[i] = DeleteResult.DELETED if answer is None else DeleteResult.ALREADY_GONE
                bucket.remove(target)
            pending = deferred
    return results      # type: ignore[return-value]


def _gateway_bytes(route_family: int, gateway: str) -> bytes:
    if route_family == socket.AF_INET and ":" in gateway:
        # an IPv6 next hop of an IPv4 route: RTA_VIA (struct rtvia)
        return pack_attr(RTA_VIA, _U16.pack(socket.AF_INET6) + socket.inet_pton(socket.AF_INET6, gateway))
    return pack_attr(RTA_GATEWAY, socket.inet_pton(route_family, gateway))


def encode_route_delete(route: Route) -> bytes:
    """Payload of RTM_DELROUTE for ROUTE: what ``_route_msg(for_add=False)`` sends, byte for byte."""
    try:
        return _encode_route_delete(route)
    except (OSError, ValueError, struct.error, OverflowError) as exc:
        raise KernelError(f"cannot delete {route.describe()}: it cannot be encoded ({exc})") from None


def _encode_route_delete(route: Route) -> bytes:
    af = FAMILY_NUMBERS[route.family]
    pton = socket.inet_pton
    out = [_RTMSG.pack(af, route.dst_len, route.src_len, route.tos, route.table if route.table < 256 else 0,
                       route.protocol, route.scope, route.type, 0),
           pack_attr(RTA_TABLE, _U32.pack(route.table)),
           pack_attr(RTA_DST, pton(af, route.dst))]
    if route.src is not None:
        out.append(pack_attr(RTA_SRC, pton(af, route.src)))
    if route.priority:
        out.append(pack_attr(RTA_PRIORITY, _U32.pack(route.priority)))
    if route.prefsrc is not None:
        out.append(pack_attr(RTA_PREFSRC, pton(af, route.prefsrc)))
    if route.nhid is not None:
        # The kernel refuses a nexthop id together with gateway/oif/multipath.
        out.append(pack_attr(RTA_NH_ID, _U32.pack(route.nhid)))
        return b"".join(out)
    if route.gateway is not None:
        out.append(_gateway_bytes(af, route.gateway))
    if route.oif:
        out.append(pack_attr(RTA_OIF, _U32.pack(route.oif)))
    if route.multipath:
        hops = []
        for hop in route.multipath:
            inner = _gateway_bytes(af, hop.gateway) if hop.gateway else b""
            hops.append(_RTNH.pack(_RTNH.size + len(inner), hop.flags, hop.weight - 1, hop.oif or 0) + inner)
        out.append(pack_attr(RTA_MULTIPATH, b"".join(hops)))
    return b"".join(out)


def _gateway_attr(route_family: str, gateway: str) -> tuple[str, Any]:
    if route_family == "inet" and address_version(gateway) == 6:
        return ("RTA_VIA", {"family": socket.AF_INET6, "addr": gateway})
    return ("RTA_GATEWAY", gateway)


def _route_msg(route: Route, oif: int | None, hops: list[tuple[NextHop, int | None]],
               for_add: bool) -> RouteMsg:
    from .rtnl import RouteMsg      # pyroute2, imported by the first add
    msg = RouteMsg()
    msg["family"] = FAMILY_NUMBERS[route.family]
    msg["dst_len"] = route.dst_len
    msg["src_len"] = route.src_len
    msg["tos"] = route.tos
    msg["table"] = route.table if route.table < 256 else 0
    msg["proto"] = route.protocol
    msg["scope"] = route.scope
    msg["type"] = route.type
    # Of rtm_flags only "onlink" is a request; the rest is state the kernel reports.
    msg["flags"] = route.flags & RTNH_F_ONLINK if for_add else 0
    attrs: list[tuple[str, Any]] = [("RTA_TABLE", route.table), ("RTA_DST", route.dst)]
    if route.src is not None:
        attrs.append(("RTA_SRC", route.src))
    if route.priority:
        attrs.append(("RTA_PRIORITY", route.priority))
    if route.prefsrc is not None:
        attrs.append(("RTA_PREFSRC", route.prefsrc))
    if route.nhid is not None:
        # The kernel refuses a nexthop id together with gateway/oif/multipath.
        attrs.append(("RTA_NH_ID", route.nhid))
    else:
        if route.gateway is not None:
            attrs.append(_gateway_attr(route.family, route.gateway))
        if oif:
            attrs.append(("RTA_OIF", oif))
        if hops:
            attrs.append(("RTA_MULTIPATH", [
                {"flags": hop.flags & RTNH_F_ONLINK if for_add else hop.flags, "hops": hop.weight - 1,
                 "oif": hop_oif or 0,
                 "attrs": [_gateway_attr(route.family, hop.gateway)] if hop.gateway else []}
                for hop, hop_oif in hops]))
    if for_add:
        if route.metrics:
            attrs.append(("RTA_METRICS", {"attrs": [("RTAX_" + name.upper(), value)
                                                    for name, value in route.metrics]}))
        if route.pref is not None and route.family == "inet6":
            attrs.append(("RTA_PREF", route.pref))
        if route.expires is not None and route.family == "inet6":
            attrs.append(("RTA_EXPIRES", route.expires))
    msg["attrs"] = attrs
    return msg


def delete_route(route: Route, *, rtnl: Rtnl | None = None) -> DeleteResult:
    """Delete exactly ROUTE: ALREADY_GONE, decided from a dump of its table, sends nothing.

    A delete request leaves out what the route lacks (metric 0, no gateway), which the
    kernel reads as "any"; checking first keeps it from removing a look-alike.
    """
    result = delete_routes([route], rtnl=rtnl)[0]
    if isinstance(result, KernelError):
        raise result
    return result


def add_route(route: Route, *, rtnl: Rtnl | None = None, replace: bool = False) -> None:
    """Install ROUTE; interfaces are found by name when one is given (indexes change).

    Raises KernelError (errno EEXIST when it exists and REPLACE is false).
    """
    with using(rtnl) as r:
        names: dict[int, str] | None = None

        def resolve(index: int | None, name: str | None) -> int | None:
            nonlocal names
            if name is None:
                return index
            if names is None:
                names = interface_names(r)
            return interface_index(names, name, f"add {route.describe()}")

        if route.nhid is not None:  # the nexthop object names the device; nothing to resolve
            oif, hops = None, []
        else:
            oif = resolve(route.oif, route.oif_name)
            hops = [(hop, resolve(hop.oif, hop.oif_name)) for hop in route.multipath]
        r.add(_route_msg(route, oif, hops, for_add=True), RTM_NEWROUTE, route.describe(),
              replace=replace)
