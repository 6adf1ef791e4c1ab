"""What recovery does with one daemon run's leftovers: the choice and its plan (pure).

``choose_recovery`` turns recovery.mode, the exit and the restart decision into FLUSH, ADOPT,
KEEP or NONE (fail-closed or not, with the reason); ``recovery_plan`` makes the plan for it.
``recovery.KernelRecovery`` and the ``reconcile``/``flush`` commands act on them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable

from . import adopt
from .ownership import Verdict
from .policy import Action, ExitClass
from .reconcile import ActionResult, Plan, plan_flush, plan_keep

# What recovery does with the leftovers of one daemon run (choose_recovery).
FLUSH, ADOPT, KEEP, NONE = "flush", "adopt", "keep", "none"


@dataclass(frozen=True, slots=True)
class RecoveryChoice:
    """What to do with the leftovers of one run: FLUSH/ADOPT/KEEP/NONE, fail-closed or not, and why."""

    action: str
    fail_closed: bool
    reason: str

    def to_json(self) -> dict:
        return {"action": self.action, "fail_closed": self.fail_closed, "reason": self.reason}


def choose_recovery(mode: str, *, fail_closed: bool, on_stop: str, exit_class: ExitClass | None,
                    decision: Action | None, can_adopt: bool = True) -> RecoveryChoice:
    """The recovery for one daemon exit (EXIT_CLASS None, DECISION None: leftovers found at startup).

    A requested stop follows ``on_stop`` (a flush then mirrors a clean charon stop: no
    blocks); a charon that will not come back (not restarted, crash loop) cannot adopt,
    so adopt and keep leave the state as it is; a crash-loop cooldown flushes fail-closed
    (unless keep); a restart follows ``mode``.
    """
    if mode == NONE:
        return RecoveryChoice(NONE, False, "recovery.mode is none")
    if decision is Action.STOP and exit_class is ExitClass.REQUESTED_STOP:
        if on_stop == FLUSH:
            return RecoveryChoice(FLUSH, False, "requested stop: remove what charon left behind "
                                                "(recovery.on_stop flush)")
        return RecoveryChoice(KEEP, False, "requested stop: recovery.on_stop is keep")
    if decision is Action.COOLDOWN:
        # Down for minutes: the dead charon's SAs must not carry traffic nobody rekeys, and nothing
        # may leave in cleartext; the retry then starts on a clean slate (keep stays keep).
        if mode == KEEP:
            return RecoveryChoice(KEEP, False, "crash-loop cooldown: recovery.mode keep")
        return RecoveryChoice(FLUSH, fail_closed, f"crash-loop cooldown: charon stays down; flushed "
                                                  f"{'fail-closed ' if fail_closed else ''}until the next try")
    if decision in (Action.STOP, Action.GIVE_UP):
        why = "gave up (crash loop)" if decision is Action.GIVE_UP else "charon is not restarted"
        if mode == FLUSH:
            return RecoveryChoice(FLUSH, fail_closed, f"{why}: recovery.mode flush")
        return RecoveryChoice(KEEP, False, f"{why}: nothing can adopt the leftovers; left in place "
                                           "(the next start of the supervisor recovers them)")
    if mode == ADOPT and not can_adopt:
        return RecoveryChoice(FLUSH, fail_closed, "recovery.mode adopt, but this strongSwan cannot adopt: "
                                                  "flushing instead")
    if mode == FLUSH:
        return RecoveryChoice(FLUSH, fail_closed, "recovery.mode flush: charon starts on a clean slate")
    if mode == ADOPT:
        return RecoveryChoice(ADOPT, fail_closed, "recovery.mode adopt: left in place for the restarted charon")
    return RecoveryChoice(KEEP, False, "recovery.mode keep")


def leftover_counts(owned: Iterable[tuple[Any, Verdict]]) -> dict[str, int]:
    counts = {family: 0 for family in ("xfrm_sa", "xfrm_policy", "route", "rule", "address", "firewall")}
    for record, _ in owned:
        counts[record.FAMILY] = counts.get(record.FAMILY, 0) + 1
    return counts


def tally_rules(verdicts: Iterable[Verdict]) -> dict[str, int]:
    """How many leftovers each ownership rule made charon's (ledger:* by port id, marker:* by markers)."""
    out: dict[str, int] = {}
    for v in verdicts:
        out[v.rule] = out.get(v.rule, 0) + 1
    return out


def tally(results: Iterable[ActionResult]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in results:
        out[r.outcome.value] = out.get(r.outcome.value, 0) + 1
    return out


def recovery_plan(choice: RecoveryChoice, state: Any, ownership: Any, others: Iterable[Any] = ()) -> Plan:
    """The plan for CHOICE over STATE (KernelState or Snapshot) as judged by OWNERSHIP;
    OTHERS are the other IKE daemons in the namespace (``ownership.deletion_hold``)."""
    if choice.action == FLUSH:
        return plan_flush(state, ownership, fail_closed=choice.fail_closed, others=tuple(others))
    if choice.action == ADOPT:
        return adopt.plan_wait(ownership.owned(), "adopt: left in place while charon restarts; charon "
                                                  "claims it once ready, the rest goes after "
                                                  "recovery.adopt_grace")
    plan = plan_keep(state, ownership)
    return dataclasses.replace(plan, mode=choice.action)
