"""Kernel state facade: read every family charon leaves behind, delete any object, watch changes.

The families live in ``supervisor.kernel.*`` (one module each); this module only
knows which exist and dispatches to them.  It reads the calling thread's current
network namespace (wrap calls in ``supervisor.kernel.netns.enter(name)``).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable

if TYPE_CHECKING:
    import selectors

from .errors import KernelError
from .kernel import addresses, firewall, routes, rules, xfrm
from .kernel.common import DeleteResult, KernelEvent
from .kernel.netns import NetnsIdentity, current_identity
from .kernel.rtnl import RtnlMonitor

DEFAULT_ROUTE_TABLE = 220      # charon.routing_table
DEFAULT_RULE_PRIORITY = 220    # charon.routing_table_prio


@dataclass(frozen=True)
class Family:
    """One kernel object family: its record type, how to dump and delete it."""

    name: str
    record_type: type
    dump: Callable[["ReadOptions"], list]
    delete: Callable[[Any], DeleteResult]
    title: str                  # for humans: "XFRM SAs"
    start: Callable[["ReadOptions"], Any] | None = None   # starts a dump to run beside the others


@dataclass(frozen=True)
class ReadOptions:
    route_table: int = DEFAULT_ROUTE_TABLE
    rule_priority: int | None = DEFAULT_RULE_PRIORITY   # None: every rule


# Order matters for deletion elsewhere (SAs before policies is not required by the
# kernel, but policies before routes keeps traffic fail-closed); keep it stable.
FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("xfrm_sa", xfrm.XfrmSA, lambda o: xfrm.dump_sas(), xfrm.delete_sa, "XFRM SAs"),
    Family("xfrm_policy", xfrm.XfrmPolicy, lambda o: xfrm.dump_policies(), xfrm.delete_policy,
           "XFRM policies"),
    Family("route", routes.Route, lambda o: routes.dump_routes(table=o.route_table),
           routes.delete_route, "routes"),
    Family("rule", rules.Rule, lambda o: rules.dump_rules(priority=o.rule_priority),
           rules.delete_rule, "routing rules"),
    Family("address", addresses.Address, lambda o: addresses.dump_addresses(),
           addresses.delete_address, "addresses"),
    Family("firewall", firewall.FirewallRule, lambda o: firewall.dump_firewall_rules(),
           firewall.delete_firewall_rule, "firewall rules",
           start=lambda o: firewall.start_dump_firewall_rules()),
)}


@dataclass(frozen=True)
class KernelState:
    """Everything read in one pass, per family, plus context that is not an object."""

    objects: dict[str, tuple]                  # family name -> records
    netns: NetnsIdentity
    options: ReadOptions
    default_policies: Any = None               # xfrm.XfrmDefaultPolicy, when readable
    context: dict = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        return {name: len(recs) for name, recs in self.objects.items()}


def read_state(options: ReadOptions = ReadOptions(),
               families: Iterable[str] | None = None,
               progress: Callable[[Family, int], None] | None = None) -> KernelState:
    """Dump the families (all by default) of the current namespace; any failed dump raises.

    PROGRESS, if given, is called after each family with its record count.
    """
    names = list(FAMILIES) if families is None else list(families)
    objects = {}
    # The firewall's programs run while netlink is read: the read takes the longer of the two.
    started = {name: FAMILIES[name].start(options) for name in names if FAMILIES[name].start}
    try:
        for name in names:
            objects[name] = tuple(started[name].result() if name in started else FAMILIES[name].dump(options))
            if progress is not None:
                progress(FAMILIES[name], len(objects[name]))
    finally:
        for pending in started.values():
            pending.cancel()
    defaults = xfrm.get_default_policies() if "xfrm_policy" in objects else None
    return KernelState(objects=objects, netns=current_identity(), options=options,
                       default_policies=defaults)


def _xfrm_later(msg_type: int, what: str, decode):
    with xfrm.open_socket() as sock:
        chunks = sock.dump_raw(msg_type, b"", what)
    return lambda share: decode(chunks, share)


def _share_after(records_of: Callable[[], list]) -> Callable[[Any], list]:
    def decode(share):
        records = records_of()
        return records if share is None else [share(r) for r in records]
    return decode


def _firewall_beside() -> Callable[[], list]:
    """Start the firewall dump (programs, not netlink) in a thread in this thread's namespace;
    returns what waits for its rules (or raises its error)."""
    from .kernel.netns import _setns
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    inode = os.fstat(home).st_ino
    box: dict = {}

    def work() -> None:
        try:
            # Only a caller inside ``netns.enter`` needs it: the service never enters a namespace
            # (RestrictNamespaces=yes forbids setns), its threads all share the process's.
            if os.stat("/proc/thread-self/ns/net").st_ino != inode:
                _setns(home, "of the reading thread")
            box["rules"] = firewall.dump_firewall_rules()
        except KernelError as exc:
            box["error"] = exc
        except Exception as exc:  # noqa: BLE001 - raised in the reader, as a failed dump
            box["error"] = KernelError(f"cannot read the firewall rules: {exc}")
        finally:
            os.close(home)
    thread = threading.Thread(target=work, name="firewall-dump", daemon=True)
    thread.start()

    def wait() -> list:
        thread.join()
        if "error" in box:
            raise box["error"]
        return box["rules"]
    return wait


# Dump now, decode later: each returns the decoder of the kernel's answer (see read_state_later).
_LATER: dict[str, Callable[["ReadOptions"], Callable[[Any], list]]] = {
    "xfrm_sa": lambda o: _xfrm_later(xfrm.XFRM_MSG_GETSA, "dump SAD entries (XFRM states)", xfrm.decode_sas),
    "xfrm_policy": lambda o: _xfrm_later(xfrm.XFRM_MSG_GETPOLICY, "dump SPD entries (XFRM policies)",
                                         xfrm.decode_policies),
    "route": lambda o: _share_after(routes.dump_routes_later(table=o.route_table)),
}


def read_state_later(options: ReadOptions = ReadOptions(),
                     families: Iterable[str] | None = None) -> Callable[..., KernelState]:
    """The read of ``read_state`` with the decoding left for later: the kernel's answers are taken
    now (the firewall programs run beside the netlink dumps), and the returned function decodes
    them into the KernelState of this moment (once: each family's answers are dropped as soon as
    they are decoded, so raw and decoded never coexist whole). Any failed dump raises here.
    The decoder's optional SHARE maps each record (``ledger.sharer``: to an equal one held already)."""
    names = list(FAMILIES) if families is None else list(families)
    fw = _firewall_beside() if "firewall" in names else None
    later: dict[str, Callable[[], list]] = {}
    try:
        for name in names:
            if name == "firewall":
                continue
            if name in _LATER:
                later[name] = _LATER[name](options)
            else:
                later[name] = _share_after(lambda records=FAMILIES[name].dump(options): records)
        defaults = xfrm.get_default_policies() if "xfrm_policy" in names else None
        identity = current_identity()
    finally:
        if fw is not None:
            rules = fw()        # its error wins only when the netlink dumps succeeded
    if fw is not None:
        later["firewall"] = lambda share: rules      # no ledger holds firewall rules

    def decode(share: Callable[[Any], Any] | None = None) -> KernelState:
        objects = {name: tuple(later.pop(name)(share)) for name in names}
        return KernelState(objects=objects, netns=identity, options=options, default_policies=defaults)
    return decode


def family_of(record: Any) -> Family:
    return FAMILIES[record.FAMILY]


def delete_object(record: Any) -> DeleteResult:
    """Delete one object of any family: DELETED or ALREADY_GONE, KernelError otherwise."""
    return family_of(record).delete(record)


class KernelWatch:
    """Both monitors (XFRM and rtnetlink) behind one selector-friendly object."""

    def __init__(self) -> None:
        self.xfrm = xfrm.XfrmMonitor()
        try:
            self.rtnl = RtnlMonitor()
        except BaseException:
            self.xfrm.close()
            raise

    def register(self, selector: selectors.BaseSelector, data: Any = None) -> None:
        from selectors import EVENT_READ      # (a watch's: reading a snapshot needs none)
        selector.register(self.xfrm.fileno(), EVENT_READ, data)
        selector.register(self.rtnl.fileno(), EVENT_READ, data)

    def unregister(self, selector: selectors.BaseSelector) -> None:
        selector.unregister(self.xfrm.fileno())
        selector.unregister(self.rtnl.fileno())

    def port_ids(self) -> frozenset[int]:
        """Our own sockets' port ids: changes we make ourselves carry these."""
        return frozenset({self.xfrm.port_id, self.rtnl.port_id})

    def read_events(self) -> list[KernelEvent]:
        return self.xfrm.read_events() + self.rtnl.read_events()

    def close(self) -> None:
        self.xfrm.close()
        self.rtnl.close()

    def __enter__(self) -> "KernelWatch":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
