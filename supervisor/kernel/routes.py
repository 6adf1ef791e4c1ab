"""Routes (IPv4 and IPv6) over rtnetlink: dump, add, delete.

charon installs its routes in table 220 (``charon.routing_table``), protocol
static. A route is deleted by re-sending exactly what the dump returned
(type, scope, protocol, metric, nexthops), so the kernel removes that route
and no look-alike, and a scope guessed wrong cannot make the delete fail.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass
from typing import Any, ClassVar

from ..errors import KernelError
from .common import DeleteResult
from .rtnl import (
    FAMILY_NAMES,
    FAMILY_NUMBERS,
    PROTOCOL_NAMES,
    ROUTE_TYPE_NAMES,
    RTM_DELROUTE,
    RTM_GETROUTE,
    RTM_NEWROUTE,
    SCOPE_NAMES,
    RouteMsg,
    Rtnl,
    address_version,
    interface_index,
    interface_names,
    json_addr,
    json_family,
    json_int,
    json_prefixlen,
    json_str,
    name_of,
    table_name,
    using,
)

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


@dataclass(frozen=True, slots=True)
class NextHop:
    """One path of a multipath route."""

    gateway: str | None
    oif: int | None = None
    oif_name: str | None = None
    weight: int = 1
    flags: int = 0

    def describe(self) -> str:
        parts = ["nexthop"]
        if self.gateway:
            parts += ["via", self.gateway]
        if self.oif_name or self.oif:
            parts += ["dev", self.oif_name or f"if{self.oif}"]
        parts += ["weight", str(self.weight)]
        return " ".join(parts)

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
        if self.dst_len == 0 and self.dst in ("0.0.0.0", "::"):
            return "default"
        full = 32 if self.family == "inet" else 128
        return self.dst if self.dst_len == full else f"{self.dst}/{self.dst_len}"

    def key(self) -> tuple:
        hops = tuple((h.gateway, h.oif, h.weight) for h in self.multipath)
        # IPv4 lets routes differing only in src, protocol or scope coexist (ip route append).
        return (self.family, self.table, self.type, self.dst, self.dst_len, self.src,
                self.src_len, self.tos, self.priority, self.gateway, self.oif, hops, self.nhid,
                self.prefsrc, self.protocol, self.scope)

    def describe(self) -> str:
        parts = ["route"]
        if self.type != RTN_UNICAST:
            parts.append(self.type_name)
        parts.append(self.dst_prefix)
        if self.src is not None:
            parts += ["from", f"{self.src}/{self.src_len}"]
        if self.tos:
            parts += ["tos", f"0x{self.tos:02x}"]
        if self.nhid is not None:
            parts += ["nhid", str(self.nhid)]
        if self.gateway:
            parts += ["via", self.gateway]
        if self.oif_name or self.oif:
            parts += ["dev", self.oif_name or f"if{self.oif}"]
        parts += [hop.describe() for hop in self.multipath]
        if self.prefsrc:
            parts += ["src", self.prefsrc]
        if self.priority:
            parts += ["metric", str(self.priority)]
        parts += ["table", table_name(self.table)]
        return " ".join(parts)

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
    """A Route from a decoded RTM_NEWROUTE/DELROUTE; None for other families and cached clones."""
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


def _dump(r: Rtnl, af: int, table: int | None, names: dict[int, str]) -> list[Route]:
    def request() -> RouteMsg:
        msg = RouteMsg()
        msg["family"] = af
        if table is not None:
            # Filtered in the kernel (strict checking): a full BGP table is not decoded here.
            msg["attrs"] = [("RTA_TABLE", table)]
        return msg
    what = f"{FAMILY_NAMES[af]} routes" + (f" of table {table_name(table)}" if table is not None else "")
    routes = []
    for msg in r.dump(request, RTM_GETROUTE, what):
        route = route_from_msg(msg, names)
        if route is not None and (table is None or route.table == table):
            routes.append(route)
    return routes


def dump_routes(table: int | None = 220, *, rtnl: Rtnl | None = None) -> list[Route]:
    """IPv4 and IPv6 routes of TABLE (None: every table); raises KernelError on failure."""
    with using(rtnl) as r:
        names = interface_names(r)
        return _dump(r, socket.AF_INET, table, names) + _dump(r, socket.AF_INET6, table, names)


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


def delete_routes(routes: list[Route], *, rtnl: Rtnl | None = None) -> list[DeleteResult | KernelError]:
    """Delete each of ROUTES exactly, one dump per table: a result or the error, per route."""
    results: list[DeleteResult | KernelError] = []
    with using(rtnl) as r:
        names: dict[int, str] | None = None
        tables: dict[tuple[str, int], list[Route]] = {}
        for route in routes:
            try:
                where = (route.family, route.table)
                if where not in tables:
                    if names is None:
                        names = interface_names(r)
                    tables[where] = _dump(r, FAMILY_NUMBERS[route.family], route.table, names)
                current = tables[where]
                target = decide_delete(route, current)
                if target is None:
                    results.append(DeleteResult.ALREADY_GONE)
                    continue
                msg = _route_msg(route, route.oif, [(hop, hop.oif) for hop in route.multipath],
                                 for_add=False)
                results.append(r.delete(msg, RTM_DELROUTE, route.describe(), _GONE))
                current.remove(target)
            except KernelError as exc:
                results.append(exc)
    return results


def _gateway_attr(route_family: str, gateway: str) -> tuple[str, Any]:
    if route_family == "inet" and address_version(gateway) == 6:
        return ("RTA_VIA", {"family": socket.AF_INET6, "addr": gateway})
    return ("RTA_GATEWAY", gateway)


def _route_msg(route: Route, oif: int | None, hops: list[tuple[NextHop, int | None]],
               for_add: bool) -> RouteMsg:
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
