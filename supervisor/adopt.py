"""Adopt mode, pure: what a restarted charon claims of a dead charon's leftovers, and the plan for the rest.

The leftovers (records the dead charon owned, each with the verdict that made it
charon's) are grouped into leftover CHILD_SAs: SAs and policies sharing a reqid.
Each is matched to a child charon has configured now (VICI ``list-conns``) by
traffic selectors, IPsec mode, tunnel peer and, where charon reports one, reqid.
``plan_adopt`` then decides, every time it is asked (level-based: from the
ledger, what charon reports, and the clock, never from remembered events):

- a leftover policy charon installed again (same key, so the ledger saw charon's
  port on it) is charon's again: Keep;
- a matched child whose peer address is known and that charon is not already
  establishing is initiated (``InitiateChild``), so the new IKE_SA carries
  INITIAL_CONTACT and the peer drops the state it still holds for the dead one;
  at most ``parallel`` connections are being established at once (charon's own
  start_action ones count), the leftovers whose SAs expire first go first. The
  peer drops the old SAs on INITIAL_CONTACT, and the tunnel drops packets until
  charon has processed the IKE_AUTH answer and installed the new ones; charon runs
  updown scripts while holding its bus lock, which every other exchange needs, so
  exchanges side by side stretch that window from one round trip to the length of
  another child's updown script (measured: 0.6 s, 3 lost pings at 5/s, in the VM);
- once charon reports an installed CHILD_SA for that configured child, the
  leftover SAs it replaces are deleted (with updown rules of a reqid charon no
  longer uses);
- what charon takes over without the ledger seeing it is charon's again, with the
  evidence: a route an out policy charon installed again routes through (charon
  re-installs routes with NLM_F_REPLACE, and replacing an identical IPv4 route
  raises no notification), charon's routing rule (it tries to create it at every
  start, EEXIST here, and deletes it when it stops), virtual IPs and SPIs charon
  reports (updown rules of a reqid charon uses again are deleted: its updown adds its own copy);
- when ``recovery.adopt_grace`` has passed (``adopt_deadline``: counted from charon
  being ready and from the latest initiation, and never while initiations wait their
  turn), whatever is still unclaimed goes: out/fwd policies for selectors charon still
  has configured behind fail-closed blocks, the rest directly.

Nothing here does I/O: VICI answers come in as plain dicts (``parse_list_conns``,
``parse_list_sas``) and the kernel as a ``Ledger`` and records.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Mapping, Sequence

from .kernel import xfrm
from .kernel.xfrm import XfrmPolicy, XfrmSA, XfrmSelector
from .ledger import HOW_ADDED, OWNER_DAEMON, TRACKED, Ledger
from .ownership import (DEFAULT_MARKERS, MarkerConfig, Verdict, classify_rule, deletion_hold,
                        is_supervisor_block)
from .kernel.common import without_cycle_collection
from .reconcile import (FLUSH_ORDER, DeleteObject, InstallBlockPolicy, Keep, Plan, block_policy_for,
                        needs_block)

# What a leftover is, for the planner, right now.
GONE = "gone"              # no longer in the kernel (expired, deleted by someone)
CLAIMED = "claimed"        # charon installed it again (same key): charon's
UNCLAIMED = "unclaimed"    # still the dead charon's
FOREIGN = "foreign"        # another process replaced it meanwhile: never ours to touch

# charon's CHILD_SA states in which its SAs carry traffic (list-sas "state").
LIVE_CHILD_STATES = frozenset({"INSTALLED", "REKEYING", "REKEYED", "UPDATING"})
# IKE_SA states in which charon is already on its way to a CHILD_SA for that connection.
BUSY_IKE_STATES = frozenset({"CONNECTING", "CREATED", "PASSIVE"})
LIVE_IKE_STATES = frozenset({"ESTABLISHED", "REKEYING", "REKEYED"})
# A connection being established holds one of recovery.adopt_initiate_parallel's places
# for at most this long (an unreachable peer must not stall the others: charon keeps
# retransmitting for minutes); an initiation whose IKE_SA charon does not report yet
# holds it for INITIATE_SETTLE (charon queues the initiation as a job).
INITIATE_WINDOW = 10.0
INITIATE_SETTLE = 1.0

_MODES = {xfrm.MODE_TRANSPORT: "TRANSPORT", xfrm.MODE_TUNNEL: "TUNNEL", 4: "BEET"}


# --- the grace period -------------------------------------------------------------


def adopt_deadline(started: float, grace: float, last_initiated: float | None, queued: int) -> float:
    """When recovery.adopt_grace ends: GRACE after charon was ready (STARTED) or after the latest
    initiation, whichever is later; never while QUEUED connections still wait their turn.

    A grace that ran out while initiations are queued would sweep leftovers whose replacement
    was only waiting for a place; the queue always drains (a place frees within INITIATE_WINDOW,
    and a connection is initiated once), so the adoption still ends: at 1,000 connections one at
    a time, within 1,000 x INITIATE_WINDOW + GRACE at worst."""
    if queued > 0:
        return float("inf")
    return max(started, last_initiated if last_initiated is not None else started) + grace


STEP_PACE = 4.0     # an adoption step's CPU time x this passes before the next: at most 1/5 of a CPU


def step_wait(now: float, last_ended: float | None, last_cpu: float, pace: float = STEP_PACE) -> float:
    """How long the next adoption step waits: none until the last one's CPU time x PACE has passed
    since it ended. Steps are triggered by every kernel event and by polling; at hundreds of
    connections one step (list-sas, planning) costs enough that back to back they would take the
    CPU charon needs to establish the very connections the adoption waits for."""
    if last_ended is None:
        return 0.0
    return max(0.0, last_ended + pace * last_cpu - now)


# --- actions of their own ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InitiateChild:
    """Ask charon (VICI ``initiate``) to establish a configured child that replaces leftovers."""

    KIND: ClassVar[str] = "initiate"
    conn: str
    child: str
    peer: str                      # the remote address the leftovers were for
    reqids: tuple[int, ...]        # the leftover CHILD_SAs this replaces
    rule: str
    reason: str

    def describe(self) -> str:
        return f"initiate child {self.conn}/{self.child} towards {self.peer}"

    def to_json(self) -> dict:
        return {"kind": self.KIND, "conn": self.conn, "child": self.child, "peer": self.peer,
                "reqids": list(self.reqids), "rule": self.rule, "reason": self.reason}


@dataclass(frozen=True, slots=True)
class WaitFor:
    """Leave one leftover in place for now (adopt mode before the grace period ends)."""

    KIND: ClassVar[str] = "wait"
    record: Any
    rule: str
    reason: str

    def describe(self) -> str:
        return f"leave {self.record.describe()} for now"

    def to_json(self) -> dict:
        return {"kind": self.KIND, "family": self.record.FAMILY, "record": self.record.to_json(),
                "rule": self.rule, "reason": self.reason}


# --- traffic selectors as charon prints them --------------------------------------


@dataclass(frozen=True, slots=True)
class TrafficSelector:
    """One traffic selector as VICI prints it ("10.1.0.0/16", "dynamic", "10.0.0.1..10.0.0.9[tcp/80]")."""

    text: str
    dynamic: bool = False
    family: int = 0                 # AF_INET / AF_INET6; 0 for dynamic
    low: int = 0                    # address range, as integers
    high: int = 0
    proto: int = 0                  # 0: any
    port_low: int = 0
    port_high: int = 0xFFFF

    def covers(self, family: int, low: int, high: int, proto: int, port: tuple[int, int] | None) -> bool:
        """Whether this selector includes the address range LOW..HIGH (and protocol/port)."""
        if self.dynamic:
            # charon substitutes its own or the peer's address (or a virtual IP): one host
            if high != low:
                return False
        elif family != self.family or low < self.low or high > self.high:
            return False
        if self.proto and proto != self.proto:
            return False
        if (self.port_low, self.port_high) != (0, 0xFFFF):
            if port is None or port[0] < self.port_low or port[1] > self.port_high:
                return False
        return True

    def equals(self, family: int, low: int, high: int) -> bool:
        return not self.dynamic and (self.family, self.low, self.high) == (family, low, high)


def _proto_number(name: str) -> int:
    if name.isdigit():
        return int(name)
    try:
        return socket.getprotobyname(name)
    except OSError:
        raise ValueError(f"unknown protocol {name!r}") from None


def _port_range(text: str, proto_name: str) -> tuple[int, int]:
    if text == "OPAQUE":
        return (0xFFFF, 0)          # charon's "opaque" ports: matches no real port
    if "(" in text or proto_name in ("icmp", "ipv6-icmp", "1", "58"):
        return (0, 0xFFFF)          # ICMP type/code: not compared here
    if "-" in text:
        lo, hi = text.split("-", 1)
        return int(lo), int(hi)
    if text.isdigit():
        return int(text), int(text)
    try:
        port = socket.getservbyname(text, proto_name if not proto_name.isdigit() else None)
    except OSError:
        raise ValueError(f"unknown service {text!r}") from None
    return port, port


def parse_ts(text: str) -> TrafficSelector:
    """A TrafficSelector from charon's notation; ValueError when it is not understood."""
    body, _, bracket = text.strip().partition("[")
    proto, ports = 0, (0, 0xFFFF)
    if bracket:
        if not bracket.endswith("]"):
            raise ValueError(f"traffic selector {text!r}: unbalanced '['")
        proto_name, _, port_text = bracket[:-1].partition("/")
        proto = _proto_number(proto_name)
        if port_text:
            ports = _port_range(port_text, proto_name)
    if body == "dynamic":
        return TrafficSelector(text, dynamic=True, proto=proto, port_low=ports[0], port_high=ports[1])
    if ".." in body:
        first, last = (ipaddress.ip_address(a) for a in body.split("..", 1))
        if first.version != last.version:
            raise ValueError(f"traffic selector {text!r}: range mixes address families")
        low, high = int(first), int(last)
        family = socket.AF_INET if first.version == 4 else socket.AF_INET6
    else:
        net = ipaddress.ip_network(body, strict=False)
        low, high = int(net.network_address), int(net.broadcast_address)
        family = socket.AF_INET if net.version == 4 else socket.AF_INET6
    return TrafficSelector(text, family=family, low=low, high=high, proto=proto,
                           port_low=ports[0], port_high=ports[1])


def _parse_ts_list(items: Iterable[str]) -> tuple[TrafficSelector, ...]:
    out = []
    for item in items:
        try:
            out.append(parse_ts(item))
        except ValueError:
            continue            # a selector we cannot read matches nothing: never a wrong match
    return tuple(out)


_BITS = {socket.AF_INET: 32, socket.AF_INET6: 128}


def _range_of(address: str, prefixlen: int) -> tuple[int, int, int]:
    """(family, first, last) of ADDRESS/PREFIXLEN; ValueError when it is not an address and prefix."""
    # Fast path for the canonical text the netlink decoder writes (inet_ntop): a concentrator's
    # adoption reads tens of thousands of these per step, and ipaddress takes 5-10x as long.
    # Anything else (non-canonical, odd prefix) takes ipaddress's path and its verdict.
    if type(prefixlen) is int:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        bits = _BITS[family]
        try:
            packed = socket.inet_pton(family, address)
        except (OSError, ValueError):
            packed = None
        if packed is not None and 0 <= prefixlen <= bits and socket.inet_ntop(family, packed) == address:
            host = (1 << (bits - prefixlen)) - 1
            low = int.from_bytes(packed, "big") & ~host
            return family, low, low | host
    net = ipaddress.ip_network(f"{address}/{prefixlen}", strict=False)
    family = socket.AF_INET if net.version == 4 else socket.AF_INET6
    return family, int(net.network_address), int(net.broadcast_address)


def _side(selector: XfrmSelector, source: bool) -> tuple[int, int, int, tuple[int, int] | None]:
    address, plen = (selector.saddr, selector.prefixlen_s) if source else (selector.daddr, selector.prefixlen_d)
    family, low, high = _range_of(address, plen)
    port, mask = (selector.sport, selector.sport_mask) if source else (selector.dport, selector.dport_mask)
    ports = (port, port) if mask == 0xFFFF else ((0, 0xFFFF) if mask == 0 else None)
    return family, low, high, ports


# --- what charon has configured and what it runs (VICI) ------------------------------


def _text(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, list):
        return [_text(v) for v in value]
    if isinstance(value, Mapping):
        return {(_text(k)): _text(v) for k, v in value.items()}
    return value


def _list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, list):
        return [str(v) for v in value]
    return [str(value)]


@dataclass(frozen=True, slots=True)
class ConfiguredChild:
    """One child of one connection as ``list-conns`` shows it."""

    conn: str
    child: str
    mode: str                                   # "TUNNEL", "TRANSPORT", "BEET", "PASS", "DROP"
    local_ts: tuple[TrafficSelector, ...]
    remote_ts: tuple[TrafficSelector, ...]
    local_addrs: tuple[str, ...] = ()
    remote_addrs: tuple[str, ...] = ()
    unique: str = ""

    @property
    def name(self) -> str:
        return f"{self.conn}/{self.child}"

    def initiable_peer(self) -> bool:
        """charon can initiate towards a concrete address or a host name (not %any, not a range)."""
        return any(_peer_kind(a) in ("address", "hostname") for a in self.remote_addrs)


def _peer_kind(entry: str) -> str:
    e = entry.strip()
    if not e or e.startswith("%any"):
        return "any"
    try:
        ipaddress.ip_address(e)
        return "address"
    except ValueError:
        pass
    try:
        ipaddress.ip_network(e, strict=False)
        return "subnet"
    except ValueError:
        pass
    if "-" in e:
        try:
            for part in e.split("-", 1):
                ipaddress.ip_address(part.strip())
            return "range"
        except ValueError:
            pass
    return "hostname"


def _address_in(address: str, entries: Sequence[str]) -> str:
    """"yes" when ADDRESS is one of ENTRIES, "no" when clearly not, "unknown" (wildcards, names)."""
    if not entries:
        return "unknown"
    addr = ipaddress.ip_address(address)
    verdict = "no"
    for entry in entries:
        kind = _peer_kind(entry)
        e = entry.strip()
        if kind == "address" and ipaddress.ip_address(e) == addr:
            return "yes"
        if kind == "subnet" and addr in ipaddress.ip_network(e, strict=False):
            return "yes"
        if kind == "range":
            lo, hi = (ipaddress.ip_address(p.strip()) for p in e.split("-", 1))
            if lo.version == addr.version and lo <= addr <= hi:
                return "yes"
        if kind in ("any", "hostname"):
            verdict = "unknown"
    return verdict


def _ip_int(address: str) -> tuple[int, int] | None:
    """(IP version, integer) of a canonical address text; None for anything else (see _range_of)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        packed = socket.inet_pton(family, address)
    except (OSError, ValueError):
        return None
    if socket.inet_ntop(family, packed) != address:
        return None
    return (6 if family == socket.AF_INET6 else 4), int.from_bytes(packed, "big")


def _parsed_entries(entries: Sequence[str]) -> tuple | None:
    """ENTRIES (local_addrs / remote_addrs) read once for ``_address_in_parsed``: per entry
    (version, first, last) or None (a wildcard or host name: "unknown"); None when one is
    something only ``_address_in`` itself judges the same way (scoped, mixed-family ranges)."""
    out = []
    for entry in entries:
        kind = _peer_kind(entry)
        e = entry.strip()
        if "%" in e and kind != "any":
            return None
        if kind == "address":
            a = ipaddress.ip_address(e)
            out.append((a.version, int(a), int(a)))
        elif kind == "subnet":
            n = ipaddress.ip_network(e, strict=False)
            out.append((n.version, int(n.network_address), int(n.broadcast_address)))
        elif kind == "range":
            lo, hi = (ipaddress.ip_address(p.strip()) for p in e.split("-", 1))
            if lo.version != hi.version:
                return None
            out.append((lo.version, int(lo), int(hi)))
        else:
            out.append(None)
    return tuple(out)


def _address_in_parsed(address: str, entries: Sequence[str], parsed: tuple | None) -> str:
    """_address_in(ADDRESS, ENTRIES) with ENTRIES read beforehand (PARSED, from _parsed_entries)."""
    addr = _ip_int(address) if parsed is not None and entries else None
    if addr is None:
        return _address_in(address, entries)
    verdict = "no"
    version, value = addr
    for p in parsed:
        if p is None:
            verdict = "unknown"
        elif p[0] == version and p[1] <= value <= p[2]:
            return "yes"
    return verdict


def parse_list_conns(events: Iterable[Mapping]) -> tuple[ConfiguredChild, ...]:
    """Every configured child from the ``list-conn`` events of a ``list-conns`` request."""
    out = []
    for event in events:
        for conn, body in _text(dict(event)).items():
            if not isinstance(body, dict):
                continue
            for child, c in (body.get("children") or {}).items():
                if not isinstance(c, dict):
                    continue
                out.append(ConfiguredChild(
                    conn=conn, child=child, mode=str(c.get("mode", "TUNNEL")).upper(),
                    local_ts=_parse_ts_list(_list(c.get("local-ts"))),
                    remote_ts=_parse_ts_list(_list(c.get("remote-ts"))),
                    local_addrs=tuple(_list(body.get("local_addrs"))),
                    remote_addrs=tuple(_list(body.get("remote_addrs"))),
                    unique=str(body.get("unique", ""))))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class ActiveChild:
    """One CHILD_SA charon runs (``list-sas``)."""

    conn: str
    child: str
    uniqueid: int
    reqid: int
    state: str
    mode: str
    spi_in: int | None
    spi_out: int | None
    local_ts: tuple[TrafficSelector, ...] = ()
    remote_ts: tuple[TrafficSelector, ...] = ()

    @property
    def live(self) -> bool:
        return self.state in LIVE_CHILD_STATES

    def describe(self) -> str:
        spis = "/".join(f"{s:08x}" for s in (self.spi_in, self.spi_out) if s is not None)
        return f"CHILD_SA {self.conn}/{self.child} #{self.uniqueid} (reqid {self.reqid}, SPIs {spis or 'none'})"


@dataclass(frozen=True, slots=True)
class ActiveIke:
    """One IKE_SA charon runs (``list-sas``), with its CHILD_SAs."""

    conn: str
    uniqueid: int
    state: str
    local_host: str
    remote_host: str
    local_vips: tuple[str, ...] = ()
    children: tuple[ActiveChild, ...] = ()


def _int(value: Any, base: int = 10) -> int | None:
    try:
        return int(str(value), base)
    except (TypeError, ValueError):
        return None


def parse_list_sas(events: Iterable[Mapping]) -> tuple[ActiveIke, ...]:
    """Every IKE_SA and CHILD_SA from the ``list-sa`` events of a ``list-sas`` request."""
    out = []
    for event in events:
        for conn, body in _text(dict(event)).items():
            if not isinstance(body, dict):
                continue
            children = []
            for c in (body.get("child-sas") or {}).values():
                if not isinstance(c, dict):
                    continue
                children.append(ActiveChild(
                    conn=conn, child=str(c.get("name", "")), uniqueid=_int(c.get("uniqueid")) or 0,
                    reqid=_int(c.get("reqid")) or 0, state=str(c.get("state", "")),
                    mode=str(c.get("mode", "")).upper(), spi_in=_int(c.get("spi-in"), 16),
                    spi_out=_int(c.get("spi-out"), 16),
                    local_ts=_parse_ts_list(_list(c.get("local-ts"))),
                    remote_ts=_parse_ts_list(_list(c.get("remote-ts")))))
            out.append(ActiveIke(conn=conn, uniqueid=_int(body.get("uniqueid")) or 0,
                                 state=str(body.get("state", "")), local_host=str(body.get("local-host", "")),
                                 remote_host=str(body.get("remote-host", "")),
                                 local_vips=tuple(_list(body.get("local-vips"))), children=tuple(children)))
    return tuple(out)


# --- leftover CHILD_SAs ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LeftoverChild:
    """What a dead charon left of one CHILD_SA: its SAs and policies (one reqid)."""

    reqid: int
    mode: int | None
    local: str | None                       # our tunnel address
    peer: str | None                        # the peer's
    selectors: tuple[XfrmSelector, ...]     # local -> remote (out policies, else in/fwd reversed)
    sas: tuple[XfrmSA, ...] = ()
    policies: tuple[XfrmPolicy, ...] = ()

    @property
    def spis(self) -> frozenset[int]:
        return frozenset(sa.spi for sa in self.sas)

    def describe(self) -> str:
        sels = ", ".join(f"{s.saddr}/{s.prefixlen_s} === {s.daddr}/{s.prefixlen_d}" for s in self.selectors)
        return (f"leftover CHILD_SA reqid {self.reqid} ({sels or 'no policies'}"
                + (f", peer {self.peer}" if self.peer else "") + ")")


def _reversed(s: XfrmSelector) -> XfrmSelector:
    return XfrmSelector(s.family, s.daddr, s.prefixlen_d, s.saddr, s.prefixlen_s, s.proto, s.dport,
                        s.dport_mask, s.sport, s.sport_mask, s.ifindex, s.user)


def _reqid_of(record: Any) -> int:
    if record.FAMILY == "xfrm_sa":
        return record.reqid
    return next((t.reqid for t in record.templates if t.reqid), 0)


def group_leftovers(records: Iterable[Any], local_addresses: frozenset[str] = frozenset()
                    ) -> tuple[LeftoverChild, ...]:
    """The leftover CHILD_SAs among RECORDS: SAs and IPsec policies grouped by reqid (in order)."""
    by_reqid: dict[int, list] = {}
    for r in records:
        if r.FAMILY not in ("xfrm_sa", "xfrm_policy") or (r.FAMILY == "xfrm_policy" and not r.templates):
            continue
        reqid = _reqid_of(r)
        if reqid:
            by_reqid.setdefault(reqid, []).append(r)
    out = []
    for reqid, items in by_reqid.items():
        sas = tuple(r for r in items if r.FAMILY == "xfrm_sa")
        policies = tuple(r for r in items if r.FAMILY == "xfrm_policy")
        outs = [p for p in policies if p.dir == xfrm.DIR_OUT]
        selectors = tuple(p.selector for p in outs) or tuple(
            dict.fromkeys(_reversed(p.selector) for p in policies if p.dir in (xfrm.DIR_IN, xfrm.DIR_FWD)))
        local = peer = None
        mode = None
        tmpl = next((p.templates[0] for p in outs if p.templates), None)
        if tmpl is not None:
            mode = tmpl.mode
            if tmpl.mode == xfrm.MODE_TUNNEL and tmpl.daddr not in ("", "0.0.0.0", "::"):
                local, peer = tmpl.saddr, tmpl.daddr
        else:
            tmpl = next((p.templates[0] for p in policies if p.templates), None)
            if tmpl is not None:
                mode = tmpl.mode
                if tmpl.mode == xfrm.MODE_TUNNEL and tmpl.daddr not in ("", "0.0.0.0", "::"):
                    local, peer = tmpl.daddr, tmpl.saddr      # an in/fwd template points at us
        if peer is None and sas:
            mode = sas[0].mode if mode is None else mode
            # the SA whose destination is one of our addresses is inbound; the other goes to the peer
            for sa in sas:
                if sa.daddr in local_addresses:
                    local, peer = sa.daddr, sa.saddr
                    break
                if sa.saddr in local_addresses:
                    local, peer = sa.saddr, sa.daddr
                    break
        if not selectors and sas and mode == xfrm.MODE_TRANSPORT and local and peer:
            family = sas[0].family
            full = 32 if family == socket.AF_INET else 128
            selectors = (XfrmSelector(family, local, full, peer, full),)
        out.append(LeftoverChild(reqid, mode, local, peer, selectors, sas, policies))
    return tuple(out)


# --- matching -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Match:
    """The configured child a leftover CHILD_SA belongs to (None: no match), and the evidence."""

    leftover: LeftoverChild
    child: ConfiguredChild | None
    reason: str


def _covered(selector: XfrmSelector, local_ts: Sequence[TrafficSelector],
             remote_ts: Sequence[TrafficSelector]) -> tuple[bool, bool]:
    """(covered, exactly equal) for a local -> remote SELECTOR against a child's selectors."""
    lf, llo, lhi, lport = _side(selector, True)
    rf, rlo, rhi, rport = _side(selector, False)
    local = [ts for ts in local_ts if ts.covers(lf, llo, lhi, selector.proto, lport)]
    remote = [ts for ts in remote_ts if ts.covers(rf, rlo, rhi, selector.proto, rport)]
    if not local or not remote:
        return False, False
    exact = any(ts.equals(lf, llo, lhi) for ts in local) and any(ts.equals(rf, rlo, rhi) for ts in remote)
    return True, exact


class _SideIndex:
    """One side's traffic selectors of every configured child, by address: which children may
    cover an address range (a superset: protocol and ports are left to ``_covered``)."""

    __slots__ = ("dynamic", "blocks", "prefixes", "ranges")

    def __init__(self) -> None:
        self.dynamic: list[int] = []                          # children with a "dynamic" selector
        self.blocks: dict[tuple[int, int, int], list[int]] = {}   # (family, prefix, first) -> children
        self.prefixes: dict[int, list[int]] = {}             # family -> prefix lengths in use
        self.ranges: list[tuple[int, int, int, int]] = []    # (family, first, last, child): a..b ranges

    def add(self, i: int, ts: TrafficSelector) -> None:
        if ts.dynamic:
            self.dynamic.append(i)
            return
        size = ts.high - ts.low + 1
        bits = _BITS.get(ts.family)
        if bits is None or size <= 0 or size & (size - 1) or ts.low & (size - 1):
            self.ranges.append((ts.family, ts.low, ts.high, i))
            return
        prefix = bits - (size.bit_length() - 1)
        self.blocks.setdefault((ts.family, prefix, ts.low), []).append(i)
        if prefix not in self.prefixes.setdefault(ts.family, []):
            self.prefixes[ts.family].append(prefix)

    def lookup(self, family: int, low: int, high: int) -> list[list[int]]:
        """Lists of the children with a selector on this side whose addresses include LOW..HIGH."""
        out = [self.dynamic] if low == high and self.dynamic else []
        bits = _BITS.get(family, 0)
        for prefix in self.prefixes.get(family, ()):
            host = (1 << (bits - prefix)) - 1
            first = low & ~host
            if high <= first | host:
                hit = self.blocks.get((family, prefix, first))
                if hit:
                    out.append(hit)
        if self.ranges:
            hit = [i for f, lo, hi, i in self.ranges if f == family and lo <= low and high <= hi]
            if hit:
                out.append(hit)
        return out


def _parsed_or_none(entries: Sequence[str]) -> tuple | None:
    try:
        return _parsed_entries(entries)
    except ValueError:
        return None             # _address_in raises the same error when it is asked


class _ChildIndex:
    """Configured children indexed by their traffic selectors, so a leftover is compared with the
    few that can cover it instead of all of them; candidates come in configuration order."""

    __slots__ = ("children", "local", "remote", "addrs", "_initiable")

    def __init__(self, configured: Sequence[ConfiguredChild]) -> None:
        self.children = tuple(configured)
        self.local, self.remote = _SideIndex(), _SideIndex()
        # each child's (local_addrs, remote_addrs), read once; by id: children are compared by value
        self.addrs: dict[int, tuple] = {}
        self._initiable: dict[int, bool] = {}
        for i, child in enumerate(self.children):
            self.addrs[id(child)] = (_parsed_or_none(child.local_addrs), _parsed_or_none(child.remote_addrs))
            for ts in child.local_ts:
                self.local.add(i, ts)
            for ts in child.remote_ts:
                self.remote.add(i, ts)

    def initiable(self, child: ConfiguredChild) -> bool:
        """child.initiable_peer(), asked once per child of this index."""
        known = self._initiable.get(id(child))
        if known is None:
            known = self._initiable[id(child)] = child.initiable_peer()
        return known

    def candidates(self, selectors: Sequence[XfrmSelector]) -> list[ConfiguredChild]:
        """Every child that may cover all of SELECTORS (local -> remote), in configuration order."""
        if not self.children or not selectors:
            return []
        best = None
        # A child must cover every selector on both sides: any one (selector, side) gives a
        # superset; take the smallest.
        for s in selectors:
            for index, source in ((self.local, True), (self.remote, False)):
                family, low, high, _ = _side(s, source)
                hits = index.lookup(family, low, high)
                size = sum(map(len, hits))
                if best is None or size < best[0]:
                    best = (size, hits)
                    if size == 0:
                        return []
        hits = best[1]
        found = hits[0] if len(hits) == 1 else set().union(*hits)
        return [self.children[i] for i in sorted(set(found))]


_INDEX_CACHE: list = [None]      # (configured tuple, its _ChildIndex): the latest list-conns answer


def _child_index(configured: Sequence[ConfiguredChild]) -> _ChildIndex:
    """The index of CONFIGURED; a tuple (immutable, as list-conns gives it) is indexed once."""
    cached = _INDEX_CACHE[0]
    if cached is not None and cached[0] is configured:
        return cached[1]
    index = _ChildIndex(configured)
    if type(configured) is tuple:
        _INDEX_CACHE[0] = (configured, index)      # one slot, replaced whole: no torn pair
    return index


def _mode_compatible(leftover: LeftoverChild, child: ConfiguredChild) -> bool:
    if leftover.mode is None:
        return child.mode in ("TUNNEL", "TRANSPORT", "BEET")
    return child.mode.startswith(_MODES.get(leftover.mode, "?"))


def match_leftover(leftover: LeftoverChild, configured: Sequence[ConfiguredChild],
                   active: Sequence[ActiveIke] = ()) -> Match:
    """The best configured child for LEFTOVER; ambiguity or no candidate gives child None."""
    reqid_owner = frozenset((c.conn, c.child) for ike in active for c in ike.children
                            if c.reqid == leftover.reqid)
    return _match(leftover, _child_index(configured), reqid_owner)


def _match(leftover: LeftoverChild, index: _ChildIndex, reqid_owner: frozenset[tuple[str, str]]) -> Match:
    """match_leftover against INDEX; REQID_OWNER: the (conn, child) charon runs the leftover's reqid for."""
    if not leftover.selectors:
        return Match(leftover, None, "no policy left to tell its traffic selectors")
    scored = []
    for child in index.candidates(leftover.selectors):
        if not _mode_compatible(leftover, child):
            continue
        covered = [_covered(s, child.local_ts, child.remote_ts) for s in leftover.selectors]
        if not all(c for c, _ in covered):
            continue
        exact = all(e for _, e in covered)
        local_addrs, remote_addrs = index.addrs[id(child)]
        peer = _address_in_parsed(leftover.peer, child.remote_addrs, remote_addrs) if leftover.peer else "unknown"
        local = _address_in_parsed(leftover.local, child.local_addrs, local_addrs) if leftover.local else "unknown"
        if peer == "no" or local == "no":
            continue
        same_reqid = (child.conn, child.child) in reqid_owner
        score = (same_reqid, exact, peer == "yes")
        evidence = ["traffic selectors " + ("equal" if exact else "within") + f" {child.name}'s"]
        if peer == "yes":
            evidence.append(f"peer {leftover.peer} in remote_addrs")
        if same_reqid:
            evidence.append(f"charon uses reqid {leftover.reqid} for it again")
        scored.append((score, child, "; ".join(evidence)))
    if not scored:
        return Match(leftover, None, "no configured child covers its traffic selectors, mode and peer")
    scored.sort(key=lambda t: t[0], reverse=True)
    best = scored[0]
    rivals = [c.name for s, c, _ in scored[1:] if s == best[0]]
    if rivals:
        return Match(leftover, None, f"ambiguous: {best[1].name} and {', '.join(rivals)} match equally")
    return Match(leftover, best[1], best[2])


def _replacement(leftover: LeftoverChild, child: ConfiguredChild,
                 active: Sequence[ActiveIke]) -> ActiveChild | None:
    """A live CHILD_SA of CHILD (not one of the leftover's SPIs) that carries the leftover's traffic."""
    return _replacement_in(leftover, child, _live_children(active))


def _live_children(active: Sequence[ActiveIke]) -> dict[tuple[str, str], list[ActiveChild]]:
    """charon's live CHILD_SAs by (connection, child name), in list-sas order."""
    out: dict[tuple[str, str], list[ActiveChild]] = {}
    for ike in active:
        for c in ike.children:
            if c.live:
                out.setdefault((ike.conn, c.child), []).append(c)
    return out


def _replacement_in(leftover: LeftoverChild, child: ConfiguredChild,
                    live: Mapping[tuple[str, str], Sequence[ActiveChild]]) -> ActiveChild | None:
    for c in live.get((child.conn, child.child), ()):
        if {c.spi_in, c.spi_out} & leftover.spis:
            continue
        if c.local_ts and c.remote_ts and not all(
                _covered(s, c.local_ts, c.remote_ts)[0] for s in leftover.selectors):
            continue        # narrowed to other traffic: not this leftover's replacement
        return c
    return None


# --- the plan ---------------------------------------------------------------------------


def leftover_status(record: Any, ledger: Ledger | None) -> str:
    """GONE, CLAIMED, UNCLAIMED or FOREIGN for one leftover, from the current ledger."""
    if ledger is None or record.FAMILY not in TRACKED:
        return UNCLAIMED            # firewall rules: the ledger does not track them
    entry = ledger.lookup(record)
    if entry is None:
        return UNCLAIMED if record.FAMILY in ledger.stale else GONE
    if entry.owner != OWNER_DAEMON:
        return FOREIGN
    return CLAIMED if entry.how == HOW_ADDED else UNCLAIMED


def leftover_key(record: Any) -> tuple:
    return (record.FAMILY, record.key())


def pending_leftovers(leftovers: Sequence[tuple[Any, Verdict]], ledger: Ledger | None,
                      resolved: frozenset[tuple] = frozenset()) -> list[tuple[Any, Verdict, str]]:
    """The leftovers still to decide on: not resolved, not gone, not taken over by someone else."""
    out = []
    for record, verdict in leftovers:
        if leftover_key(record) in resolved:
            continue
        status = leftover_status(record, ledger)
        if status in (GONE, FOREIGN):
            continue
        out.append((record, verdict, status))
    return out


def _charon_out_routes(ledger: Ledger | None) -> set[tuple[int, str, int]]:
    """(family, network, prefix) of the out policies charon itself installed since it started."""
    if ledger is None:
        return set()
    out = set()
    for entry in ledger.entries.get("xfrm_policy", {}).values():
        p = entry.record
        if entry.owner == OWNER_DAEMON and entry.how == HOW_ADDED and p.dir == xfrm.DIR_OUT and p.templates:
            family, low, _ = _range_of(p.selector.daddr, p.selector.prefixlen_d)
            out.add((family, str(ipaddress.ip_address(low)), p.selector.prefixlen_d))
    return out


def _route_key(route: Any) -> tuple[int, str, int]:
    family, low, _ = _range_of(route.dst, route.dst_len)
    return (family, str(ipaddress.ip_address(low)), route.dst_len)


def configured_for(policy: XfrmPolicy, configured: Sequence[ConfiguredChild] | None) -> ConfiguredChild | None:
    """A configured child whose selectors cover POLICY's traffic (in its direction)."""
    if configured is None:
        return None
    selector = policy.selector if policy.dir == xfrm.DIR_OUT else _reversed(policy.selector)
    for child in _child_index(configured).candidates((selector,)):
        if child.mode in ("PASS", "DROP"):
            continue
        if _covered(selector, child.local_ts, child.remote_ts)[0]:
            return child
    return None


def plan_adopt(leftovers: Sequence[tuple[Any, Verdict]], *, ledger: Ledger | None,
               configured: Sequence[ConfiguredChild] | None, active: Sequence[ActiveIke] | None,
               now: float, deadline: float, resolved: frozenset[tuple] = frozenset(),
               initiated: Mapping[tuple[str, str], float] | frozenset[tuple[str, str]] = frozenset(),
               connecting_since: Mapping[str, float] | None = None, parallel: int = 1,
               local_addresses: frozenset[str] = frozenset(), markers: MarkerConfig = DEFAULT_MARKERS,
               fail_closed: bool = True, initiate: bool = True, explain: bool = True,
               others: Sequence[Any] = ()) -> Plan:
    """One step of adoption: what to keep, initiate, delete now, and (after DEADLINE) sweep.

    LEFTOVERS: the dead charon's records with their verdicts. CONFIGURED/ACTIVE: charon's
    list-conns/list-sas now (None: VICI did not answer; then nothing is matched, and at the
    deadline every protecting policy is removed fail-closed). RESOLVED: leftover keys
    already kept or deleted; INITIATED: (conn, child) already initiated, with when (a set:
    long ago). CONNECTING_SINCE: since when each connection charon reports as being
    established has been seen so (unknown: since NOW). PARALLEL: connections being
    established at once, at most (see the module docstring). EXPLAIN False leaves out the
    WaitFor actions (what --dry-run shows; the supervisor's steps need only the rest).
    OTHERS: the other IKE daemons in the namespace; what ``deletion_hold`` protects is kept.
    """
    if not isinstance(initiated, Mapping):
        initiated = dict.fromkeys(initiated, float("-inf"))
    with without_cycle_collection():
        return _plan_adopt(leftovers, ledger, configured, active, now, deadline, resolved, initiated,
                           connecting_since or {}, max(1, parallel), local_addresses, markers, fail_closed,
                           initiate, explain, tuple(others))


def establishing(active: Sequence[ActiveIke], initiated: Mapping[tuple[str, str], float],
                 connecting_since: Mapping[str, float], now: float) -> frozenset[str]:
    """The connections that hold one of adopt_initiate_parallel's places now (see INITIATE_WINDOW)."""
    busy = {ike.conn for ike in active if ike.state in BUSY_IKE_STATES}
    children = {(c.conn, c.child): c.live for ike in active for c in ike.children}
    out = {conn for conn in busy if now - connecting_since.get(conn, now) < INITIATE_WINDOW}
    for (conn, child), at in initiated.items():
        age = now - at
        if conn in out or children.get((conn, child)) or age >= INITIATE_WINDOW:
            continue
        # Not reported at all yet: queued in charon, or failed at once (then it goes after SETTLE).
        if conn in busy or (conn, child) in children or age < INITIATE_SETTLE:
            out.add(conn)
    return frozenset(out)


def _expires_first(leftover: LeftoverChild) -> float:
    """When the first of LEFTOVER's SAs reaches its soft lifetime (wall clock; inf: never/unknown)."""
    times = [sa.curlft.add_time + sa.lifetime.soft_add_expires_seconds for sa in leftover.sas
             if sa.curlft.add_time and sa.lifetime.soft_add_expires_seconds]
    return min(times, default=float("inf"))


class _Memo:
    """What the steps of one adoption share: the leftovers grouped into CHILD_SAs, each record's
    key, and each group's match (kept while the same list-conns answer and reqids are asked about)."""

    __slots__ = ("leftovers", "local_addresses", "groups", "numbers", "number_of", "matches")

    def __init__(self, leftovers: Sequence[tuple[Any, Verdict]], local_addresses: frozenset[str]) -> None:
        self.leftovers = leftovers              # held: the ids below stay the records'
        self.local_addresses = local_addresses
        # Each distinct leftover key gets a number: sets of those are cheaper than sets of keys
        # (a policy's key hashes its whole selector again every time).
        self.numbers: dict[tuple, int] = {}
        self.number_of: dict[int, int] = {}
        for r, _ in leftovers:
            self.number_of[id(r)] = self.numbers.setdefault(leftover_key(r), len(self.numbers))
        self.groups = group_leftovers([r for r, _ in leftovers], local_addresses)
        self.matches: dict[int, tuple[_ChildIndex, frozenset, Match]] = {}

    def number(self, record: Any) -> int:
        """The number of RECORD's leftover key (records with equal keys share it)."""
        n = self.number_of.get(id(record))
        return n if n is not None else self.numbers.setdefault(leftover_key(record), len(self.numbers))

    def match(self, i: int, index: _ChildIndex, owners: frozenset[tuple[str, str]]) -> Match:
        known = self.matches.get(i)
        if known is not None and known[0] is index and known[1] == owners:
            return known[2]
        match = _match(self.groups[i], index, owners)
        self.matches[i] = (index, owners, match)
        return match


_MEMO: list = [None]       # the adoption in progress (its leftovers: a tuple, the same every step)


def _memo_for(leftovers: Sequence[tuple[Any, Verdict]], local_addresses: frozenset[str]) -> _Memo:
    memo = _MEMO[0]
    if memo is not None and memo.leftovers is leftovers and memo.local_addresses == local_addresses:
        return memo
    memo = _Memo(leftovers, local_addresses)
    if type(leftovers) is tuple:
        _MEMO[0] = memo
    return memo


def forget() -> None:
    """Drop what plan_adopt kept between the steps of an adoption (it has ended)."""
    _MEMO[0] = None
    _INDEX_CACHE[0] = None


def _plan_adopt(leftovers, ledger, configured, active, now, deadline, resolved, initiated, connecting_since,
                parallel, local_addresses, markers, fail_closed, initiate, explain, others) -> Plan:
    memo = _memo_for(leftovers, local_addresses)
    key_of = memo.number            # within one plan, a key's number stands for the key
    # resolved keys as numbers: one lookup per resolved key, not one hash of every leftover's key
    done = {memo.numbers[k] for k in resolved if k in memo.numbers}
    pending = []
    for record, verdict in leftovers:
        if key_of(record) in done:
            continue
        status = leftover_status(record, ledger)
        if status not in (GONE, FOREIGN):
            pending.append((record, verdict, status))
    verdict_of = {key_of(r): v for r, v, _ in pending}
    unclaimed = {key_of(r) for r, _, s in pending if s == UNCLAIMED}
    decided: set[tuple] = set()
    keeps: list = []
    initiations: list = []
    deletes: dict[str, list] = {family: [] for family in FLUSH_ORDER}
    active = tuple(active or ())

    def held(record: Any) -> str | None:
        return deletion_hold(record, verdict_of[key_of(record)], others)

    def decide_delete(record: Any, reason: str) -> None:
        hold = held(record)
        if hold is not None:
            keep(record, f"{hold}; not deleted although {reason}")
            return
        deletes[record.FAMILY].append((record, reason))
        decided.add(key_of(record))

    def keep(record: Any, reason: str) -> None:
        keeps.append(Keep(record, verdict_of[key_of(record)].rule, reason))
        decided.add(key_of(record))

    for record, verdict, status in pending:
        if status == CLAIMED:
            keep(record, "charon installed it again (same key): charon's again")

    live_spis = {s for ike in active for c in ike.children for s in (c.spi_in, c.spi_out) if s is not None}
    live_reqids = {c.reqid: c for ike in active for c in ike.children if c.live}
    busy_conns = {ike.conn for ike in active if ike.state in BUSY_IKE_STATES}
    up_conns = {ike.conn for ike in active if ike.state in LIVE_IKE_STATES}
    firewall_by_reqid: dict[int, list] = {}
    for record, _, _ in pending:
        if record.FAMILY == "firewall" and record.updown is not None:
            firewall_by_reqid.setdefault(record.updown.reqid, []).append(record)
    wanted: dict[tuple[str, str], list[LeftoverChild]] = {}
    notes: dict[tuple, str] = {}
    index = _child_index(configured) if configured is not None else None
    live_children = _live_children(active)
    reqid_owners: dict[int, set[tuple[str, str]]] = {}
    for ike in active:
        for c in ike.children:
            reqid_owners.setdefault(c.reqid, set()).add((c.conn, c.child))

    # Every leftover describes its CHILD_SA (policies charon already took back still tell the
    # selectors and the peer); only what is still unclaimed is acted on.
    for i, leftover in enumerate(memo.groups):
        mine = [r for r in leftover.sas + leftover.policies if key_of(r) in unclaimed]
        if not mine:
            continue
        match = memo.match(i, index, frozenset(reqid_owners.get(leftover.reqid, ()))) \
            if index is not None else Match(leftover, None, "charon's configuration is unknown (VICI did not answer)")
        if explain:
            text = f"{leftover.describe()}: " + (f"matches {match.child.name} ({match.reason})"
                                                 if match.child else match.reason)
            for r in mine:
                notes[key_of(r)] = text
        if match.child is None:
            continue
        new = _replacement_in(leftover, match.child, live_children)
        if new is not None:
            for sa in leftover.sas:
                if key_of(sa) in unclaimed and sa.spi not in live_spis and not sa.larval:
                    decide_delete(sa, f"replaced by charon's {new.describe()}")
            if new.reqid != leftover.reqid:
                for rule in firewall_by_reqid.get(leftover.reqid, ()):
                    if key_of(rule) in unclaimed:
                        decide_delete(rule, f"updown rule for reqid {leftover.reqid}, replaced by "
                                            f"{new.describe()}")
            continue
        key = (match.child.conn, match.child.child)
        if key in initiated or not initiate or not leftover.peer:
            continue
        if index.initiable(match.child):
            if match.child.conn in busy_conns:
                if explain:
                    notes.update({key_of(r): f"charon is establishing {match.child.conn} already; waiting"
                                  for r in mine})
            else:
                wanted.setdefault(key, []).append(leftover)

    # One place per connection (its children share the IKE_SA being established); the
    # connection whose leftover SAs expire first goes first.
    by_conn: dict[str, list[tuple[str, str]]] = {}
    for key in sorted(wanted, key=lambda k: min(_expires_first(g) for g in wanted[k])):
        by_conn.setdefault(key[0], []).append(key)
    busy_now = establishing(active, initiated, connecting_since, now) if by_conn else frozenset()
    turn = list(by_conn)[:max(0, parallel - len(busy_now))]
    queued = tuple(list(by_conn)[len(turn):])
    why = (f"waiting its turn: {', '.join(sorted(busy_now | set(turn)))} being established "
           f"(recovery.adopt_initiate_parallel is {parallel})")
    for conn in queued:
        for key in by_conn[conn]:
            for leftover in wanted.pop(key):
                if explain:         # notes only explain WaitFor actions
                    notes.update({key_of(r): why for r in leftover.sas + leftover.policies})

    for conn, child in (key for conn in turn for key in by_conn[conn]):
        group = wanted[(conn, child)]
        first = group[0]
        rule = next(verdict_of[key_of(r)].rule for r in first.sas + first.policies
                    if key_of(r) in verdict_of)
        how = ("a CHILD_SA in its established IKE_SA" if conn in up_conns else
               "a new IKE_SA whose INITIAL_CONTACT makes the peer drop the dead charon's SAs")
        initiations.append(InitiateChild(conn, child, first.peer, tuple(g.reqid for g in group), rule,
                                         f"replaces {', '.join(g.describe() for g in group)} with {how}"))

    # Whatever waits its turn keeps its leftovers, even past DEADLINE (see adopt_deadline).
    grace_over = now >= deadline and not queued
    out_routes = _charon_out_routes(ledger)
    vips = {v for ike in active for v in ike.local_vips}

    def claim(record: Any) -> str | None:
        """Why charon has taken RECORD over although the ledger saw no change to it (None: it has not)."""
        family = record.FAMILY
        if family == "xfrm_sa":
            if record.spi in live_spis:
                return f"charon reports SPI {record.spi:08x} as its own"
        elif family == "route":
            if _route_key(record) in out_routes:
                return ("an out policy charon installed again routes through it (charon re-installs "
                        "its routes with NLM_F_REPLACE: an identical IPv4 route raises no notification) "
                        "and charon removes it when it removes that policy")
        elif family == "rule":
            if classify_rule(record, markers).owned:
                return ("charon's routing rule: charon creates it at every start (this one was in the "
                        "way, EEXIST) and deletes it when it stops")
        elif family == "address":
            if record.address in vips:
                return f"charon reports {record.address} as a virtual IP"
        return None

    def superseded(record: Any) -> str | None:
        """Why a leftover updown rule is a duplicate now (None: it is not)."""
        reqid = record.updown.reqid if record.FAMILY == "firewall" and record.updown is not None else None
        if reqid in live_reqids:
            # charon's updown script runs for that CHILD_SA and inserts the identical rule: keeping
            # the leftover would leave two copies, and down-client removes only one. `-D` removes one
            # copy of an identical rule, so exactly charon's stays.
            return (f"updown rule for reqid {reqid}, which charon's {live_reqids[reqid].describe()} uses "
                    "again: its updown script installs its own copy")
        return None

    blocks: list = []
    waits: list = []
    for record, verdict, status in pending:
        key = key_of(record)
        if key in decided:
            continue
        why = superseded(record)
        if why is not None:
            decide_delete(record, why)
            continue
        why = claim(record)
        if why is not None:
            keep(record, why)
            continue
        if not grace_over:
            if explain:
                waits.append(WaitFor(record, verdict.rule, notes.get(key, "left in place until charon claims "
                                                                          "it or recovery.adopt_grace ends")))
            continue
        grace = "recovery.adopt_grace ended and charon did not claim it"
        if record.FAMILY == "xfrm_sa" and record.larval:
            keep(record, "larval SA: cannot be deleted, expires by itself")
        elif record.FAMILY == "xfrm_policy":
            owner = configured_for(record, configured)
            if fail_closed and needs_block(record) and (configured is None or owner is not None) \
                    and held(record) is None:
                why = (f"still configured for {owner.name}" if owner is not None
                       else "charon's configuration is unknown")
                blocks.append(InstallBlockPolicy(block_policy_for(record), record, verdict.rule,
                                                 f"fail-closed: {why}; no cleartext until charon installs "
                                                 "its own policy"))
            decide_delete(record, grace)
        else:
            decide_delete(record, grace)

    actions: list = list(keeps) + blocks
    block_at = {id(a.covers): i for i, a in enumerate(actions) if isinstance(a, InstallBlockPolicy)}
    for family in FLUSH_ORDER:
        for record, reason in deletes[family]:
            after = (block_at[id(record)],) if id(record) in block_at else ()
            actions.append(DeleteObject(record, verdict_of[key_of(record)].rule, reason, after))
    # Initiations last: the clean-up (iptables runs) does not compete with the exchange for CPU.
    actions.extend(initiations)
    actions.extend(waits)
    return AdoptPlan("adopt", tuple(actions), fail_closed=fail_closed, queued=queued)


@dataclass(frozen=True)
class AdoptPlan(Plan):
    """One step of adoption; ``queued``: connections whose initiation waits its turn (they hold the grace)."""

    queued: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return {**Plan.to_json(self), "queued": list(self.queued)}


def plan_wait(leftovers: Sequence[tuple[Any, Verdict]], reason: str) -> Plan:
    """Adopt mode while no charon runs: every leftover stays where it is."""
    return Plan("adopt", tuple(WaitFor(r, v.rule, reason) for r, v in leftovers
                               if not (r.FAMILY == "xfrm_policy" and is_supervisor_block(r))))
