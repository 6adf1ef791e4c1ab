"""Which kernel objects are charon's: pure decisions, each verdict naming the rule that made it.

Evidence comes first from the ownership ledger (``supervisor.ledger``: who added
the object, by netlink port id, while we watched). Without an answer from the
ledger, documented markers decide:

- SAs: inbound SPI in charon's range (``charon.spi_min``/``spi_max``), or a
  reqid that belongs to a policy (or inbound SA) judged charon's.
- Policies: priority inside one of charon's bands (below), never per-socket
  policies (they belong to sockets, netlink can neither add nor delete them).
- Routes: table 220 (``charon.routing_table``) with protocol static.
- Rules: priority 220 (``charon.routing_table_prio``) looking up table 220.
- Addresses: NEVER by markers alone. A virtual IP looks like any other
  address; it is charon's only with ledger evidence or when it equals a
  virtual IP recorded for a CHILD/IKE_SA (``virtual_ips``).
- Firewall rules: the exact shape of strongSwan's updown script
  (``FirewallRule.updown``) with a reqid charon owns.

charon's policy priorities (kernel-netlink plugin): a base of 200000 per
class (pass 1x, ipsec and trap 2x, fallback 3x), minus 512 per selector prefix
bit (source plus destination, up to 2 * 128), 256 when a protocol is set, 4 per
port-mask bit (up to 2 * 16), 2 when bound to an interface, and 1 for every
policy that is not a trap. So one class spans base*k - 131459 .. base*k (traps
sit on the top value, the rest at least one below). A ``priority=`` configured
in swanctl.conf bypasses the formula and is not recognised by this marker.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from .kernel import xfrm
from .kernel.common import without_cycle_collection
from .kernel.xfrm import XfrmPolicy, XfrmSA

# Our fail-closed block policies carry this in the selector's ``user`` field: the
# kernel compares the whole selector when it looks a policy up by key (so a block
# never collides with charon's own policy for the same traffic) but ignores
# ``user`` when matching packets (so it covers exactly the same traffic).
SUPERVISOR_BLOCK_UID = 0x49505356          # "IPSV"

# Verdict rules. "ledger:*" come from attribution, "marker:*" from the markers.
RULE_LEDGER_DAEMON = "ledger:daemon"          # charon added it while we watched
RULE_LEDGER_PORT_ONLY = "ledger:port-id-only"  # XFRM, sent with charon's port id but without its markers
RULE_LEDGER_INHERITED = "ledger:inherited"    # a previous charon's, carried over at start
RULE_LEDGER_FOREIGN = "ledger:foreign"        # another process added it while we watched
RULE_LEDGER_BASELINE = "ledger:baseline"      # it was there before charon started
RULE_SPI_RANGE = "marker:spi-range"
RULE_REQID = "marker:reqid"
RULE_PRIORITY_BAND = "marker:priority-band"
RULE_ROUTE_TABLE = "marker:route-table"
RULE_RULE_PRIORITY = "marker:rule-priority"
RULE_VIRTUAL_IP = "marker:virtual-ip"
RULE_UPDOWN = "marker:updown-reqid"
RULE_PER_SOCKET = "per-socket"
RULE_SUPERVISOR_BLOCK = "supervisor-block"
RULE_NO_MARKER = "no-marker"

# Verdicts that rest on the markers alone: another IKE daemon in the namespace (charon-nm,
# a container's charon) uses the same ones. Inherited entries count too: they were carried
# over at a daemon start, possibly judged by the markers then.
MARKER_ONLY_RULES = frozenset({RULE_SPI_RANGE, RULE_REQID, RULE_PRIORITY_BAND, RULE_ROUTE_TABLE,
                               RULE_RULE_PRIORITY, RULE_UPDOWN, RULE_LEDGER_INHERITED})

FAMILY_ORDER = ("xfrm_sa", "xfrm_policy", "route", "rule", "address", "firewall")

RTPROT_STATIC = 4
FR_ACT_TO_TBL = 1

# (prefix bits 2*128)*512 + proto 256 + (port bits 2*16)*4 + interface 2 + non-trap 1
MAX_SPECIFICITY = 256 * 512 + 256 + 32 * 4 + 2 + 1     # 131459


@dataclass(frozen=True, slots=True)
class Verdict:
    """Ours or foreign, the rule that decided, and the evidence in words."""

    owned: bool
    rule: str
    detail: str

    def to_json(self) -> dict:
        return {"owned": self.owned, "rule": self.rule, "detail": self.detail}


@dataclass(frozen=True, slots=True)
class PriorityBand:
    """A closed range of XFRM policy priorities charon uses for one class of policy."""

    name: str
    low: int
    high: int

    def __contains__(self, priority: int) -> bool:
        return self.low <= priority <= self.high

    def describe(self) -> str:
        return f"{self.name} band {self.low}..{self.high}"


@functools.lru_cache(maxsize=8)
def charon_priority_bands(base: int = 200000) -> tuple[PriorityBand, ...]:
    """charon's three priority classes for PRIO_BASE = BASE (pass, ipsec/trap, fallback)."""
    return (PriorityBand("pass", base - MAX_SPECIFICITY, base - 1),
            PriorityBand("ipsec", 2 * base - MAX_SPECIFICITY, 2 * base),
            PriorityBand("fallback", 3 * base - MAX_SPECIFICITY, 3 * base - 1))


def _leading_ones(mask: int) -> int:
    bits = 0
    probe = 0x8000
    while bits < 16 and mask & probe:
        bits += 1
        probe >>= 1
    return bits


def _specificity(selector: xfrm.XfrmSelector) -> int:
    return ((selector.prefixlen_s + selector.prefixlen_d) * 512 + (256 if selector.proto else 0)
            + (_leading_ones(selector.sport_mask) + _leading_ones(selector.dport_mask)) * 4)


# What charon subtracts after the specificity -> the case: 2 for an interface, 1 unless a trap.
_TAILS = {0: "trap", 1: "", 2: "trap on an interface", 3: " on an interface"}
_CLASSES = {1: "pass", 2: "ipsec", 3: "fallback"}


def formula_case(selector: xfrm.XfrmSelector, priority: int, base: int = 200000) -> str | None:
    """The case of charon's formula that gives SELECTOR this PRIORITY ("ipsec", "trap", ...), or None."""
    rest = priority + _specificity(selector)
    k, tail = divmod(rest + 3, base)
    tail = 3 - tail
    if k not in _CLASSES or tail not in _TAILS:
        return None
    if tail in (0, 2):
        return _TAILS[tail] if k == 2 else None        # only traps skip the final -1
    return _CLASSES[k] + _TAILS[tail]


def charon_priorities(selector: xfrm.XfrmSelector, base: int = 200000) -> dict[int, str]:
    """Every priority charon's formula can give SELECTOR, with the case that gives it."""
    specificity = _specificity(selector)
    out: dict[int, str] = {}
    for k, name in ((3, "fallback"), (1, "pass"), (2, "ipsec")):
        for iface in (False, True):
            value = k * base - specificity - (2 if iface else 0)
            where = name + (" on an interface" if iface else "")
            out[value - 1] = where
            if k == 2:
                out[value] = "trap" + (" on an interface" if iface else "")
    return out


@dataclass(frozen=True, slots=True)
class MarkerConfig:
    """The markers used when the ledger cannot tell (charon's defaults)."""

    spi_min: int = 0xC0000000                  # charon.spi_min
    spi_max: int = 0xCFFFFFFF                  # charon.spi_max
    priority_base: int = 200000                # PRIO_BASE of kernel-netlink
    priority_bands: tuple[PriorityBand, ...] | None = None   # None: derived from priority_base
    exact_priority: bool = False               # also require charon's exact value for the selector
    route_table: int = 220                     # charon.routing_table
    route_protocol: int = RTPROT_STATIC
    rule_priority: int = 220                   # charon.routing_table_prio

    def __post_init__(self) -> None:
        if not 0 <= self.spi_min <= self.spi_max <= 0xFFFFFFFF:
            raise ValueError(f"spi_min..spi_max must be a range within 0..0xffffffff, not "
                             f"{self.spi_min:#x}..{self.spi_max:#x}")
        if self.priority_base <= MAX_SPECIFICITY:
            raise ValueError(f"priority_base must exceed {MAX_SPECIFICITY} (charon's largest "
                             f"specificity deduction), not {self.priority_base}")
        for band in self.priority_bands or ():
            if band.low > band.high:
                raise ValueError(f"priority band {band.name} is empty: {band.low} > {band.high}")

    def bands(self) -> tuple[PriorityBand, ...]:
        if self.priority_bands is not None:
            return self.priority_bands
        return charon_priority_bands(self.priority_base)


DEFAULT_MARKERS = MarkerConfig()


# --- per-family marker rules ------------------------------------------------------


def is_supervisor_block(policy: XfrmPolicy) -> bool:
    """One of our own fail-closed block policies (tagged in the selector's user field)."""
    return policy.selector.user == SUPERVISOR_BLOCK_UID and policy.action == xfrm.ACTION_BLOCK


def classify_policy(policy: XfrmPolicy, config: MarkerConfig = DEFAULT_MARKERS) -> Verdict:
    """Markers for one SPD entry: charon's priority bands; per-socket policies are never ours."""
    if policy.per_socket:
        return Verdict(False, RULE_PER_SOCKET, "per-socket policy: owned by the socket that set it")
    if is_supervisor_block(policy):
        return Verdict(False, RULE_SUPERVISOR_BLOCK,
                       "fail-closed block installed by ipsec-supervisor (managed separately)")
    band = next((b for b in config.bands() if policy.priority in b), None)
    if band is None:
        return Verdict(False, RULE_NO_MARKER,
                       f"priority {policy.priority} is outside charon's bands")
    formula = formula_case(policy.selector, policy.priority, config.priority_base)
    if config.exact_priority and formula is None:
        return Verdict(False, RULE_NO_MARKER,
                       f"priority {policy.priority} is in charon's {band.describe()} but not "
                       "the value charon computes for this selector")
    detail = f"priority {policy.priority} in charon's {band.describe()}"
    if formula is not None:
        detail += f" (exactly what charon computes for this selector: {formula})"
    return Verdict(True, RULE_PRIORITY_BAND, detail)


def policy_reqids(policy: XfrmPolicy) -> frozenset[int]:
    return frozenset(t.reqid for t in policy.templates if t.reqid)


def classify_sa(sa: XfrmSA, owned_reqids: frozenset[int] = frozenset(),
                config: MarkerConfig = DEFAULT_MARKERS) -> Verdict:
    """Markers for one SAD entry: charon's inbound SPI range, or a reqid charon owns."""
    if sa.proto != xfrm.IPPROTO_COMP and config.spi_min <= sa.spi <= config.spi_max:
        return Verdict(True, RULE_SPI_RANGE,
                       f"inbound SPI {sa.spi:#010x} in charon's range "
                       f"{config.spi_min:#010x}..{config.spi_max:#010x}")
    if sa.reqid and sa.reqid in owned_reqids:
        return Verdict(True, RULE_REQID, f"reqid {sa.reqid} belongs to a policy or SA of charon's")
    if sa.reqid:
        return Verdict(False, RULE_NO_MARKER,
                       f"SPI {sa.spi:#010x} outside charon's inbound range and reqid {sa.reqid} "
                       "is not charon's")
    return Verdict(False, RULE_NO_MARKER,
                   f"SPI {sa.spi:#010x} outside charon's inbound range and no reqid")


def classify_route(route: Any, config: MarkerConfig = DEFAULT_MARKERS) -> Verdict:
    """Markers for one route: charon's table with protocol static."""
    if route.table != config.route_table:
        return Verdict(False, RULE_NO_MARKER, f"table {route.table} is not charon's ({config.route_table})")
    if route.protocol != config.route_protocol:
        return Verdict(False, RULE_NO_MARKER,
                       f"in charon's table {config.route_table} but protocol {route.protocol_name}, "
                       "not static")
    return Verdict(True, RULE_ROUTE_TABLE,
                   f"table {config.route_table} with protocol {route.protocol_name}")


def classify_rule(rule: Any, config: MarkerConfig = DEFAULT_MARKERS) -> Verdict:
    """Markers for one routing rule: charon's priority, looking up charon's table."""
    if rule.priority != config.rule_priority:
        return Verdict(False, RULE_NO_MARKER, f"priority {rule.priority} is not charon's ({config.rule_priority})")
    if rule.action != FR_ACT_TO_TBL or rule.table != config.route_table:
        return Verdict(False, RULE_NO_MARKER,
                       f"priority {config.rule_priority} but it does not look up table {config.route_table}")
    return Verdict(True, RULE_RULE_PRIORITY,
                   f"priority {config.rule_priority} looking up table {config.route_table}")


def classify_address(address: Any, virtual_ips: frozenset[str] = frozenset()) -> Verdict:
    """An address is charon's only when it is a recorded virtual IP (markers alone never claim one)."""
    if address.address in virtual_ips:
        return Verdict(True, RULE_VIRTUAL_IP, f"{address.address} is a virtual IP charon negotiated")
    return Verdict(False, RULE_NO_MARKER,
                   "addresses are claimed only with ledger evidence or a recorded virtual IP")


def classify_firewall_rule(rule: Any, owned_reqids: frozenset[int] = frozenset()) -> Verdict:
    """updown's exact rule shape with a reqid charon owns."""
    updown = rule.updown
    if updown is None:
        return Verdict(False, RULE_NO_MARKER, "not shaped like an updown rule")
    if updown.reqid not in owned_reqids:
        return Verdict(False, RULE_NO_MARKER,
                       f"updown shape but reqid {updown.reqid} is not charon's")
    return Verdict(True, RULE_UPDOWN,
                   f"updown {updown.chain} rule (--dir {updown.direction}) for charon's reqid {updown.reqid}")


# --- the whole state --------------------------------------------------------------


@dataclass(frozen=True)
class Ownership:
    """A verdict for every object of a state, per family, in the state's order."""

    verdicts: Mapping[str, tuple[tuple[Any, Verdict], ...]]
    owned_reqids: frozenset[int]
    _by_id: dict = field(init=False, repr=False, compare=False)
    _by_key: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_id", {})
        object.__setattr__(self, "_by_key", {})

    def verdict_of(self, record: Any) -> Verdict | None:
        """RECORD's verdict (found by family and key), None for an object not judged."""
        if not self._by_id:
            # On first use (a plan): a crash that only keeps or adopts never needs it, and at 40,000
            # objects it is 4 MB more at the crash's peak. The records judged are held in ``verdicts``,
            # so their ids stay unique meanwhile; a plan is built from the very state judged.
            self._by_id.update({id(r): v for pairs in self.verdicts.values() for r, v in pairs})
        v = self._by_id.get(id(record))
        if v is not None:
            return v
        if not self._by_key:
            self._by_key.update({(family, r.key()): v for family, pairs in self.verdicts.items()
                                 for r, v in pairs})
        return self._by_key.get((record.FAMILY, record.key()))

    def owned(self, family: str | None = None) -> list[tuple[Any, Verdict]]:
        return [(r, v) for name in ([family] if family else FAMILY_ORDER)
                for r, v in self.verdicts.get(name, ()) if v.owned]

    def foreign(self, family: str | None = None) -> list[tuple[Any, Verdict]]:
        return [(r, v) for name in ([family] if family else FAMILY_ORDER)
                for r, v in self.verdicts.get(name, ()) if not v.owned]

    def counts(self) -> dict[str, dict[str, int]]:
        out = {}
        for name in FAMILY_ORDER:
            pairs = self.verdicts.get(name, ())
            owned = sum(1 for _, v in pairs if v.owned)
            out[name] = {"owned": owned, "foreign": len(pairs) - owned}
        return out


def _ledger_verdict(ledger: Any, record: Any) -> Verdict | None:
    if ledger is None:
        return None
    entry = ledger.lookup(record)
    if entry is None:
        return None
    return entry.verdict()


def decide_ownership(objects: Mapping[str, Iterable[Any]], config: MarkerConfig = DEFAULT_MARKERS,
                     ledger: Any = None, virtual_ips: Iterable[str] = ()) -> Ownership:
    """Judge every object: the ledger where it has an answer, the markers elsewhere.

    OBJECTS maps family name to records (``KernelState.objects``/``Snapshot.objects``).
    LEDGER is a ``supervisor.ledger.Ledger`` or None. Reqids chain: an SA or updown rule
    is charon's when its reqid is on a policy or SA judged charon's. An SA or policy the
    ledger gives charon without charon's markers is ``RULE_LEDGER_PORT_ONLY`` (see
    ``deletion_hold``).
    """
    with without_cycle_collection():
        return _decide(objects, config, ledger, frozenset(virtual_ips))


def _decide(objects: Mapping[str, Iterable[Any]], config: MarkerConfig, ledger: Any,
            vips: frozenset[str]) -> Ownership:
    verdicts: dict[str, tuple[tuple[Any, Verdict], ...]] = {}
    owned_reqids: set[int] = set(ledger.reqids) if ledger is not None else set()
    marked_reqids: set[int] = set()     # on policies and SAs whose markers say charon's too

    policies = []
    for p in objects.get("xfrm_policy", ()):
        v = _ledger_verdict(ledger, p)
        if v is None or p.per_socket or is_supervisor_block(p):
            v = classify_policy(p, config)
        elif v.owned:
            markers = classify_policy(p, config)
            v = v if markers.owned else _port_id_only(v, markers)
        policies.append((p, v))
        if v.owned and v.rule != RULE_LEDGER_PORT_ONLY:     # then its markers say charon's too
            owned_reqids |= policy_reqids(p)
            marked_reqids |= policy_reqids(p)
    verdicts["xfrm_policy"] = tuple(policies)

    sas = list(objects.get("xfrm_sa", ()))
    ledger_sa = [_ledger_verdict(ledger, sa) for sa in sas]
    # First pass: SAs that are charon's on their own (ledger or SPI range) lend their reqids;
    # one the ledger gives charon lends its reqid only when the markers back it (see _port_id_only).
    in_range = [classify_sa(sa, frozenset(), config).owned for sa in sas]
    marked_reqids |= {sa.reqid for sa, v, r in zip(sas, ledger_sa, in_range)
                      if r and sa.reqid and (v is None or v.owned)}
    for sa, v, r in zip(sas, ledger_sa, in_range):
        own = r if v is None else v.owned and (r or sa.reqid in marked_reqids)
        if own and sa.reqid:
            owned_reqids.add(sa.reqid)
    reqids = frozenset(owned_reqids)
    marked = frozenset(marked_reqids)

    def sa_verdict(sa: Any, v: Verdict | None) -> Verdict:
        if v is None:
            return classify_sa(sa, reqids, config)
        if not v.owned:
            return v
        markers = classify_sa(sa, marked, config)
        return v if markers.owned else _port_id_only(v, markers)
    verdicts["xfrm_sa"] = tuple((sa, sa_verdict(sa, v)) for sa, v in zip(sas, ledger_sa))

    verdicts["route"] = tuple((r, _ledger_verdict(ledger, r) or classify_route(r, config))
                              for r in objects.get("route", ()))
    verdicts["rule"] = tuple((r, _ledger_verdict(ledger, r) or classify_rule(r, config))
                             for r in objects.get("rule", ()))
    verdicts["address"] = tuple((a, _ledger_verdict(ledger, a) or classify_address(a, vips))
                                for a in objects.get("address", ()))
    # Firewall rules are made by updown (a child process): the ledger never sees them.
    verdicts["firewall"] = tuple((r, classify_firewall_rule(r, reqids))
                                 for r in objects.get("firewall", ()))
    return Ownership(verdicts=verdicts, owned_reqids=reqids)


def _port_id_only(ledger: Verdict, markers: Verdict) -> Verdict:
    """An XFRM object the ledger gives charon by the sender's port id, which its markers do not back.

    XFRM notifications echo the nlmsg_pid the sender wrote, and any root process can write
    charon's pid there: such an object stays charon's for the record, but no plan deletes it.
    """
    return Verdict(True, RULE_LEDGER_PORT_ONLY,
                   f"{ledger.detail}, but {markers.detail}: a netlink port id alone is what the sender "
                   "wrote, so it is never deleted without charon's markers as well")


def deletion_hold(record: Any, verdict: Verdict, others: Sequence[Any] = ()) -> str | None:
    """Why no plan may delete the owned RECORD now (None: it may go).

    OTHERS are the other IKE daemons found in the namespace (anything with ``describe()``
    and ``holds()``, e.g. ``supervisor.daemons.IkeDaemon``): while one is there, what only
    the markers call charon's may be that daemon's, since it uses the same ones.
    """
    if verdict.rule == RULE_LEDGER_PORT_ONLY:
        return "port-id-only: the ledger's only evidence is the netlink port id the sender wrote"
    if others and verdict.rule in MARKER_ONLY_RULES:
        first = others[0]
        more = f" (and {len(others) - 1} more)" if len(others) > 1 else ""
        return f"marker-only: {first.describe()} holds {first.holds()} here{more}"
    return None


def replace_selector_user(policy: XfrmPolicy, user: int) -> XfrmPolicy:
    return dataclasses.replace(policy, selector=dataclasses.replace(policy.selector, user=user))
