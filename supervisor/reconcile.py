"""Recovery plans (pure) and the one executor that applies them.

A plan is a tuple of small frozen action records, each carrying the rule that
made its object charon's and the reason for the action. ``plan_flush`` and
``plan_keep`` build plans from a kernel read (or a snapshot) and the ownership
verdicts; ``blocks_to_remove`` decides when fail-closed blocks may go;
``execute`` applies a plan in order, reports every action, and never stops at
the first error.

Fail-closed blocks. Before a flush removes charon's leftover out/fwd policies
(those that protect traffic: IPsec templates or action block), it installs a
block policy for each, so no packet leaves in cleartext while charon is down:

- same selector (addresses, ports, protocol, interface), direction, mark and
  if_id as the leftover, so it covers exactly the same packets;
- priority one below the leftover's (numerically, so it takes precedence over
  the leftover and keeps the leftover's precedence relative to any foreign
  policy; charon's re-installed policy gets the leftover's value again);
- tagged in the selector's ``user`` field (``SUPERVISOR_BLOCK_UID``): the kernel
  compares the whole selector when it finds a policy by key, so the block never
  collides with charon's policy for the same traffic (charon's NEWPOLICY succeeds,
  no "policy already exists", and charon's deletes never hit the block), while
  packet matching ignores ``user``. A ``ptype sub`` block would also win, but needs
  CONFIG_XFRM_SUB_POLICY; the same key as the leftover would make charon log
  "policy already exists" and silently replace the block.

A block keeps winning over charon's re-installed policy (one priority value
better than the leftover, so at least as good as charon's new value for the
selector; on a tie the kernel prefers the older policy, the block), so traffic
stays dropped until ``blocks_to_remove`` sees charon's policy for that selector
and the executor removes the block (or the deadline passes). Pass policies
(allow without templates) get no block: they exist to let traffic through in
the clear. Measured here: the block drops (EPERM) both with the leftover and
with a re-installed policy of equal priority present; a real charon restarted
after such a flush logs neither "policy already exists" nor "unable to create".

Adopt mode builds on the same pieces: ``Keep`` for what the restarted charon
claimed, ``DeleteObject(after=...)`` for "delete the leftover SA once the action
that installs its replacement succeeded", and action types of its own (initiate
a child, wait for a CHILD_SA) with handlers passed to ``execute(handlers=...)``.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Mapping, Sequence

from .errors import KernelError
from .kernel import addresses, firewall, routes, rules, xfrm
from .kernel.common import DeleteResult
from .kernel.netlink import AlreadyExists, NetlinkSocket
from .kernel.rtnl import Rtnl
from .kernel.xfrm import XfrmPolicy, XfrmSelector
from .ownership import (SUPERVISOR_BLOCK_UID, Ownership, deletion_hold, is_supervisor_block,
                        replace_selector_user)
from .kernel.common import without_cycle_collection

log = logging.getLogger(__name__)

# Deletion order of a flush: SAs, policies, firewall rules, routes, rules, addresses.
FLUSH_ORDER = ("xfrm_sa", "xfrm_policy", "firewall", "route", "rule", "address")
BLOCK_DIRECTIONS = (xfrm.DIR_OUT, xfrm.DIR_FWD)
BATCH_LOG_LIMIT = 100       # a larger batch is logged as one line (each action at debug level)

# --- actions ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InstallBlockPolicy:
    """Install a fail-closed block policy standing in for a leftover policy."""

    KIND: ClassVar[str] = "install-block"
    block: XfrmPolicy
    covers: XfrmPolicy
    rule: str                   # the rule that made ``covers`` charon's
    reason: str

    @property
    def selector(self) -> xfrm.XfrmSelector:
        return self.covers.selector

    @property
    def dir(self) -> int:
        return self.block.dir

    def describe(self) -> str:
        return f"install block {_block_text(self.block)} (covers index {self.covers.index})"

    def to_json(self) -> dict:
        return {"kind": self.KIND, "block": self.block.to_json(), "covers": self.covers.to_json(),
                "rule": self.rule, "reason": self.reason}


@dataclass(frozen=True, slots=True)
class DeleteObject:
    """Delete one object; ``after`` lists the actions (plan indexes) that must have succeeded first."""

    KIND: ClassVar[str] = "delete"
    record: Any
    rule: str
    reason: str
    after: tuple[int, ...] = ()

    def describe(self) -> str:
        return f"delete {self.record.describe()}"

    def to_json(self) -> dict:
        return {"kind": self.KIND, "family": self.record.FAMILY, "record": self.record.to_json(),
                "rule": self.rule, "reason": self.reason, "after": list(self.after)}


@dataclass(frozen=True, slots=True)
class RemoveBlockPolicy:
    """Remove one of our fail-closed block policies."""

    KIND: ClassVar[str] = "remove-block"
    block: XfrmPolicy
    reason: str
    rule: str = "supervisor-block"

    def describe(self) -> str:
        return f"remove block {_block_text(self.block)}"

    def to_json(self) -> dict:
        return {"kind": self.KIND, "block": self.block.to_json(), "rule": self.rule,
                "reason": self.reason}


@dataclass(frozen=True, slots=True)
class Keep:
    """Leave one owned object in place (keep mode; what charon claimed; what no plan may delete)."""

    KIND: ClassVar[str] = "keep"
    record: Any
    rule: str
    reason: str

    def describe(self) -> str:
        return f"keep {self.record.describe()}"

    def to_json(self) -> dict:
        return {"kind": self.KIND, "family": self.record.FAMILY, "record": self.record.to_json(),
                "rule": self.rule, "reason": self.reason}


def _block_text(block: XfrmPolicy) -> str:
    return f"{block.describe()} (selector uid {block.selector.user:#x})"


@dataclass(frozen=True)
class Plan:
    """An ordered recovery plan. ``foreign`` counts the objects it leaves alone."""

    mode: str                       # "flush" | "keep" | "adopt" | ... (for humans and logs)
    actions: tuple[Any, ...]
    foreign: int = 0
    fail_closed: bool = False

    def __len__(self) -> int:
        return len(self.actions)

    def lines(self) -> list[str]:
        """Numbered, one action per line, with its rule and reason (what --dry-run prints)."""
        return [f"{i:>4}. {a.describe()}  [{a.rule}: {a.reason}]" for i, a in enumerate(self.actions, 1)]

    def to_json(self) -> dict:
        return {"mode": self.mode, "fail_closed": self.fail_closed, "foreign": self.foreign,
                "actions": [a.to_json() for a in self.actions]}


# --- planning (pure) --------------------------------------------------------------


def block_policy_for(policy: XfrmPolicy) -> XfrmPolicy:
    """The fail-closed block standing in for POLICY (see the module docstring for the choices)."""
    s = policy.selector
    selector = XfrmSelector(s.family, s.saddr, s.prefixlen_s, s.daddr, s.prefixlen_d, s.proto, s.sport,
                            s.sport_mask, s.dport, s.dport_mask, s.ifindex, SUPERVISOR_BLOCK_UID)
    ctx = tuple(a for a in policy.attrs if a[0] == xfrm.XFRMA_SEC_CTX) if policy.attrs else ()
    return XfrmPolicy(selector, policy.dir, action=xfrm.ACTION_BLOCK, priority=max(0, policy.priority - 1),
                      mark=policy.mark, if_id=policy.if_id, ptype=policy.ptype, attrs=ctx)


def needs_block(policy: XfrmPolicy) -> bool:
    """Whether removing POLICY could let its traffic out in the clear (out/fwd, IPsec or drop)."""
    return (policy.dir in BLOCK_DIRECTIONS and not policy.per_socket
            and (bool(policy.templates) or policy.action == xfrm.ACTION_BLOCK))


def _objects_of(state: Any) -> Mapping[str, tuple]:
    return state.objects


def plan_flush(state: Any, verdicts: Ownership, fail_closed: bool = True, others: Sequence[Any] = ()) -> Plan:
    """Remove every owned object of STATE (a KernelState or Snapshot), fail-closed if asked.

    Order: blocks for owned out/fwd leftovers (fail-closed only), then SAs, policies,
    firewall rules, routes, rules, addresses. Deleting a covered policy waits for its
    block. Without fail-closed, blocks already in the kernel are removed at the end.
    What ``deletion_hold`` protects (OTHERS: other IKE daemons present) is kept, saying why.
    """
    with without_cycle_collection():
        return _plan_flush(_objects_of(state), verdicts, fail_closed, tuple(others))


def _plan_flush(objects: Mapping[str, tuple], verdicts: Ownership, fail_closed: bool,
                others: tuple[Any, ...]) -> Plan:
    actions: list[Any] = []
    policies = tuple(objects.get("xfrm_policy", ()))
    existing_blocks = {p.key(): p for p in policies if is_supervisor_block(p)}
    block_index: dict[int, int] = {}        # id(leftover) -> index of its InstallBlockPolicy
    if fail_closed:
        for policy in policies:
            v = verdicts.verdict_of(policy)
            if v is None or not v.owned or not needs_block(policy) or deletion_hold(policy, v, others):
                continue
            block = block_policy_for(policy)
            if existing_blocks and block.key() in existing_blocks:
                continue        # an earlier flush left it; still standing in
            block_index[id(policy)] = len(actions)
            actions.append(InstallBlockPolicy(
                block, policy, v.rule,
                f"fail-closed: no cleartext for this selector while charon is down ({v.detail})"))
    foreign = 0
    for family in FLUSH_ORDER:
        for record in objects.get(family, ()):
            v = verdicts.verdict_of(record)
            if v is None or not v.owned:
                foreign += 1
                continue
            hold = deletion_hold(record, v, others)
            if hold is not None:
                actions.append(Keep(record, v.rule, f"{hold} ({v.detail})"))
                continue
            blocker = block_index.get(id(record)) if family == "xfrm_policy" else None
            after = () if blocker is None else (blocker,)
            actions.append(DeleteObject(record, v.rule, v.detail, after))
    if not fail_closed:
        for block in existing_blocks.values():
            actions.append(RemoveBlockPolicy(block, "flush without fail-closed: no block stays behind"))
    foreign -= len(existing_blocks)     # counted above as foreign, but they are ours
    return Plan("flush", tuple(actions), foreign=max(0, foreign), fail_closed=fail_closed)


def plan_keep(state: Any, verdicts: Ownership) -> Plan:
    """Leave every owned object of STATE in place (recovery.mode keep), each with its rule."""
    objects = _objects_of(state)
    actions = []
    foreign = 0
    for family in FLUSH_ORDER:
        for record in objects.get(family, ()):
            v = verdicts.verdict_of(record)
            if v is None or not v.owned:
                foreign += 1
                continue
            actions.append(Keep(record, v.rule, f"recovery mode keep ({v.detail})"))
    blocks = sum(1 for p in objects.get("xfrm_policy", ()) if is_supervisor_block(p))
    return Plan("keep", tuple(actions), foreign=foreign - blocks)


def covered_key(block: XfrmPolicy) -> tuple:
    """The key of the policy BLOCK stands in for (the same key with the selector's user 0)."""
    return replace_selector_user(block, 0).key()


def blocks_to_remove(blocks: Iterable[XfrmPolicy], current_policies: Iterable[XfrmPolicy],
                     now: float, deadline: float,
                     leftover_indexes: frozenset[int] = frozenset(),
                     hold: Mapping[tuple, str] | None = None) -> tuple[RemoveBlockPolicy, ...]:
    """The blocks that may go now: charon re-installed a policy for the selector, or time is up.

    A policy whose index is in LEFTOVER_INDEXES is the leftover itself (its delete failed),
    not charon's re-installation. NOW and DEADLINE are on the same (monotonic) clock. HOLD maps
    block keys to the configured child that still wants that traffic: such a block outlives the
    deadline, since removing it would send that traffic in cleartext.
    """
    hold = hold or {}
    replacing: dict[tuple, XfrmPolicy] = {}
    for p in current_policies:
        if not p.per_socket and not is_supervisor_block(p) and p.index not in leftover_indexes:
            replacing.setdefault(p.key(), p)
    out = []
    for block in blocks:
        if not is_supervisor_block(block):
            continue
        mine = replacing.get(covered_key(block))
        if mine is not None:
            out.append(RemoveBlockPolicy(block, f"charon installed {mine.describe()} for this selector"))
        elif now >= deadline and block.key() not in hold:
            out.append(RemoveBlockPolicy(block, "fail-closed timeout reached before charon "
                                                "installed a policy for this selector, and charon "
                                                "has no child configured for it"))
    return tuple(out)


# --- the executor -----------------------------------------------------------------


class Outcome(enum.Enum):
    DONE = "done"
    ALREADY_GONE = "already-gone"
    FAILED = "failed"
    SKIPPED = "skipped"         # a prerequisite (``after``) did not succeed; nothing was sent


@dataclass(frozen=True, slots=True)
class ActionResult:
    action: Any
    outcome: Outcome
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.outcome in (Outcome.DONE, Outcome.ALREADY_GONE)

    def to_json(self) -> dict:
        return {"action": self.action.to_json(), "outcome": self.outcome.value, "message": self.message}


class Session:
    """Sockets shared by the actions of one run (opened on first use, in the current namespace)."""

    def __init__(self) -> None:
        self._xfrm: NetlinkSocket | None = None
        self._rtnl: Rtnl | None = None

    @property
    def xfrm(self) -> NetlinkSocket:
        if self._xfrm is None:
            self._xfrm = xfrm.open_socket()
        return self._xfrm

    @property
    def rtnl(self) -> Rtnl:
        if self._rtnl is None:
            self._rtnl = Rtnl()
        return self._rtnl

    def close(self) -> None:
        if self._xfrm is not None:
            self._xfrm.close()
            self._xfrm = None
        if self._rtnl is not None:
            self._rtnl.close()
            self._rtnl = None


Handler = Callable[[Any, Session], ActionResult]


def _gone_or_done(action: Any, result: DeleteResult) -> ActionResult:
    if result is DeleteResult.ALREADY_GONE:
        return ActionResult(action, Outcome.ALREADY_GONE, "was no longer there")
    return ActionResult(action, Outcome.DONE)


def _delete(action: DeleteObject, session: Session) -> ActionResult:
    record = action.record
    family = record.FAMILY
    if family == "xfrm_sa":
        result = xfrm.delete_sa(record, sock=session.xfrm)
    elif family == "xfrm_policy":
        result = xfrm.delete_policy(record, sock=session.xfrm)
    elif family == "route":
        result = routes.delete_route(record, rtnl=session.rtnl)
    elif family == "rule":
        result = rules.delete_rule(record, rtnl=session.rtnl)
    elif family == "address":
        result = addresses.delete_address(record, rtnl=session.rtnl)
    elif family == "firewall":
        result = firewall.delete_firewall_rule(record)
    else:
        raise KernelError(f"cannot delete {record.describe()}: unknown family {family!r}")
    return _gone_or_done(action, result)


def _install_block(action: InstallBlockPolicy, session: Session) -> ActionResult:
    try:
        xfrm.add_policy(action.block, sock=session.xfrm)
    except AlreadyExists:
        return ActionResult(action, Outcome.DONE, "already installed")
    return ActionResult(action, Outcome.DONE)


def _remove_block(action: RemoveBlockPolicy, session: Session) -> ActionResult:
    return _gone_or_done(action, xfrm.delete_policy(action.block, sock=session.xfrm))


def _keep(action: Keep, session: Session) -> ActionResult:
    return ActionResult(action, Outcome.DONE, "left in place")


HANDLERS: dict[type, Handler] = {
    InstallBlockPolicy: _install_block,
    DeleteObject: _delete,
    RemoveBlockPolicy: _remove_block,
    Keep: _keep,
}


# Batch verbs: a run of consecutive actions of one kind goes to the kernel in one pipeline
# (30,000 policy deletes one request at a time take tens of seconds). Each takes the run's
# actions and the session and returns one DeleteResult, None (done) or KernelError per action.
def _delete_sas(actions: list, session: Session) -> list:
    return xfrm.delete_sas([a.record for a in actions], sock=session.xfrm)


def _delete_policies(actions: list, session: Session) -> list:
    return xfrm.delete_policies([a.record for a in actions], sock=session.xfrm)


def _delete_routes(actions: list, session: Session) -> list:
    return routes.delete_routes([a.record for a in actions], rtnl=session.rtnl)


def _delete_firewall_rules(actions: list, session: Session) -> list:
    return firewall.delete_firewall_rules([a.record for a in actions])


_DELETE_BATCHES: dict[str, Callable[[list, Session], list]] = {
    "xfrm_sa": _delete_sas,
    "xfrm_policy": _delete_policies,
    "route": _delete_routes,
    "firewall": _delete_firewall_rules,
}


def _install_blocks(actions: list, session: Session) -> list:
    return xfrm.add_policies([a.block for a in actions], sock=session.xfrm)


def _remove_blocks(actions: list, session: Session) -> list:
    return xfrm.delete_policies([a.block for a in actions], sock=session.xfrm)


def _batch_of(action: Any, table: Mapping[type, Handler]) -> Callable[[list, Session], list] | None:
    """The batch verb for ACTION, or None when it runs alone (no verb, or a handler overridden)."""
    kind = type(action)
    handler = table.get(kind)
    if kind is DeleteObject and handler is _delete:
        return _DELETE_BATCHES.get(action.record.FAMILY)
    if kind is InstallBlockPolicy and handler is _install_block:
        return _install_blocks
    if kind is RemoveBlockPolicy and handler is _remove_block:
        return _remove_blocks
    return None


def _run_length(actions: tuple, start: int, table: Mapping[type, Handler]) -> int:
    """How many actions from START one batch verb can apply (1: the action runs alone)."""
    verb = _batch_of(actions[start], table)
    if verb is None:
        return 1
    end = start + 1
    while end < len(actions) and _batch_of(actions[end], table) is verb:
        after = getattr(actions[end], "after", ())
        if after and max(after) >= start:
            break           # it waits for an action of this run: the run ends before it
        end += 1
    return end - start


def _batch_result(action: Any, outcome: Any) -> ActionResult:
    if isinstance(outcome, AlreadyExists) and isinstance(action, InstallBlockPolicy):
        return ActionResult(action, Outcome.DONE, "already installed")
    if isinstance(outcome, KernelError):
        return ActionResult(action, Outcome.FAILED, str(outcome))
    if isinstance(outcome, DeleteResult):
        return _gone_or_done(action, outcome)
    return ActionResult(action, Outcome.DONE)


def execute(plan: Plan, handlers: Mapping[type, Handler] | None = None,
            on_result: Callable[[int, ActionResult], None] | None = None) -> list[ActionResult]:
    """Apply PLAN in order in the current namespace: one result per action, whatever fails.

    An action whose ``after`` prerequisites did not succeed is SKIPPED (for a covered
    policy: its block is not in place, so the leftover stays, still dropping traffic).
    HANDLERS adds or overrides action types (adopt mode brings its own). Runs of actions
    of one kind go to the kernel as one batch; results are still one per action, in order.
    """
    table = dict(HANDLERS)
    if handlers:
        table.update(handlers)
    results: list[ActionResult] = []
    session = Session()
    actions = plan.actions

    def report(result: ActionResult) -> None:
        i = len(results)
        results.append(result)
        _log_result(i + 1, result)
        if on_result is not None:
            on_result(i, result)

    def skipped(action: Any) -> ActionResult | None:
        after = getattr(action, "after", ())
        if not after:
            return None
        blocked = [n for n in after if n >= len(results) or not results[n].ok]
        if not blocked:
            return None
        first = blocked[0]
        why = (f"action {first + 1} ({actions[first].describe()}) did not succeed"
               if first < len(actions) else f"action {first + 1} does not exist")
        return ActionResult(action, Outcome.SKIPPED, f"not attempted: {why}")

    try:
        i = 0
        while i < len(actions):
            run = _run_length(actions, i, table)
            if run > 1:
                # tens of thousands of small acyclic objects: the collector would only rescan them
                with without_cycle_collection():
                    _execute_batch(actions[i:i + run], table, session, skipped, report)
                i += run
                continue
            action = actions[i]
            i += 1
            skip = skipped(action)
            if skip is not None:
                report(skip)
                continue
            handler = table.get(type(action))
            _log_action(action)
            if handler is None:
                report(ActionResult(action, Outcome.FAILED,
                                    f"no handler for action type {type(action).__name__}"))
                continue
            try:
                report(handler(action, session))
            except KernelError as exc:
                report(ActionResult(action, Outcome.FAILED, str(exc)))
            except Exception as exc:       # a bug in one action must not stop the rest
                log.exception("action %s raised", action.describe())
                report(ActionResult(action, Outcome.FAILED, f"{type(exc).__name__}: {exc}"))
    finally:
        session.close()
    return results


def _execute_batch(run: tuple, table: Mapping[type, Handler], session: Session,
                   skipped: Callable[[Any], ActionResult | None],
                   report: Callable[[ActionResult], None]) -> None:
    """Apply RUN (actions sharing one batch verb, none waiting for another in RUN) in one batch."""
    # Prerequisites all lie before the run, so they are settled now.
    skips = [skipped(action) for action in run]
    todo = [action for action, skip in zip(run, skips) if skip is None]
    if len(todo) > BATCH_LOG_LIMIT:
        # One line for the batch: 60,000 lines per crash at 10,000 tunnels cost half a second of the
        # flush and overrun the journal's rate limit (10,000 per 30 s), which then drops other lines.
        # Each object is in the snapshot; failures are still logged one by one.
        log.info("%s", describe_batch(todo))
        if log.isEnabledFor(logging.DEBUG):
            for action in todo:
                _log_action(action, logging.DEBUG)
    else:
        for action in todo:
            _log_action(action)
    verb = _batch_of(run[0], table)
    assert verb is not None
    try:
        outcomes = verb(todo, session) if todo else []
        if len(outcomes) != len(todo):
            raise RuntimeError(f"batch verb returned {len(outcomes)} results for {len(todo)} actions")
    except KernelError as exc:
        outcomes = [exc] * len(todo)
    except Exception as exc:       # a bug must not stop the rest of the plan
        log.exception("batch of %d actions (first: %s) raised", len(todo), todo[0].describe())
        outcomes = [KernelError(f"{type(exc).__name__}: {exc}")] * len(todo)
    done = iter(outcomes)
    for action, skip in zip(run, skips):
        report(skip if skip is not None else _batch_result(action, next(done)))


def _log_action(action: Any, level: int = logging.INFO) -> None:
    if not log.isEnabledFor(level):
        return          # describe() is not free: 60,000 actions for 10,000 tunnels
    if isinstance(action, InstallBlockPolicy):
        log.log(level, "installing fail-closed block %s for leftover %s", _block_text(action.block),
                action.covers.describe())
    elif isinstance(action, DeleteObject):
        log.log(level, "deleting %s (charon's: %s)", action.record.describe(), action.rule)
    elif isinstance(action, RemoveBlockPolicy):
        log.log(level, "removing fail-closed block %s: %s", _block_text(action.block), action.reason)
    elif isinstance(action, Keep):
        log.debug("keeping %s (%s)", action.record.describe(), action.reason)
    else:
        log.log(level, "%s", action.describe())


def describe_batch(actions: Sequence[Any]) -> str:
    """One line for a batch of actions of one kind: how many, of what, and by which rule (pure)."""
    first = actions[0]
    if isinstance(first, InstallBlockPolicy):
        return f"installing {len(actions)} fail-closed blocks for leftover policies (one batch)"
    if isinstance(first, RemoveBlockPolicy):
        return f"removing {len(actions)} fail-closed blocks (one batch): {first.reason}"
    if isinstance(first, DeleteObject):
        families: dict[str, int] = {}
        rules: dict[str, int] = {}
        for a in actions:
            families[a.record.FAMILY] = families.get(a.record.FAMILY, 0) + 1
            rules[a.rule] = rules.get(a.rule, 0) + 1
        what = ", ".join(f"{n} {f}" for f, n in families.items())
        why = ", ".join(f"{r} {n}" for r, n in sorted(rules.items(), key=lambda x: -x[1]))
        return f"deleting {what} (one batch; charon's by {why})"
    return f"{len(actions)} actions of {type(first).__name__} (one batch), the first: {first.describe()}"


def _log_result(number: int, result: ActionResult) -> None:
    if result.outcome in (Outcome.FAILED, Outcome.SKIPPED):
        log.warning("action %d %s: %s %s", number, result.outcome.value, result.action.describe(),
                    result.message)
    elif result.outcome is Outcome.ALREADY_GONE:
        log.info("action %d: %s was already gone", number, result.action.describe())


def failed(results: Iterable[ActionResult]) -> list[ActionResult]:
    """The results that did not succeed (failed or skipped)."""
    return [r for r in results if not r.ok]
