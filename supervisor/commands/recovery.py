"""``ipsec-supervisor leftovers``, ``flush`` and ``reconcile --dry-run``: what charon left in the kernel,
removing it, and the plan the supervisor would apply now."""

from __future__ import annotations

import json
import logging
import os
import sys

from . import LEDGER, ROUTE_TABLE, RULE_PRIORITY, uint32, writing_output
from ..errors import ExitCode, NotRootError, SupervisorError

# Kernel, ledger, ownership and daemon detection are imported by the handlers:
# `ipsec-supervisor --help` registers this module and must not pay for them.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from ..ledger import Ledger
    from ..ownership import Ownership

log = logging.getLogger(__name__)

DEFAULT_RUN_DIR = "/run/ipsec-supervisor"


def register(sub) -> None:
    common = _common_parser()
    p = sub.add_parser("leftovers", parents=[common],
                       help="list the kernel state charon owns (and count what it does not)",
                       description="List XFRM SAs and policies, routes, rules, addresses and firewall "
                                   "rules judged charon's, each with the rule that made it so; "
                                   "foreign objects are only counted.")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_leftovers)

    f = sub.add_parser("flush", parents=[common], help="remove the kernel state charon left behind",
                       description="Remove every object judged charon's (and nothing else). Refuses "
                                   "while charon (/usr/lib/ipsec/charon or charon-systemd, run as root) "
                                   "runs in the namespace, unless --force; while another IKE daemon "
                                   "(charon-nm, pluto, ...) holds IKE sockets there, keeps what only "
                                   "charon's markers claim. Exit status 1 when any action failed.")
    f.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    f.add_argument("--force", action="store_true",
                   help="flush even while charon runs there (other IKE daemons are still respected)")
    f.add_argument("--fail-closed", action="store_true",
                   help="first install block policies for charon's out/fwd policies; they stay "
                        "until a later flush without this option (or the supervisor) removes them")
    f.add_argument("--json", action="store_true", help="print the plan and results as JSON")
    f.set_defaults(func=cmd_flush)

    r = sub.add_parser("reconcile", parents=[common], help="show the recovery plan the supervisor would apply now",
                       description="Print the plan the supervisor's recovery (recovery.mode in its "
                                   "configuration) would apply now: with no charon running, what it does "
                                   "with the leftovers before charon starts; with charon running, how the "
                                   "leftovers of its predecessor are adopted now and when "
                                   "recovery.adopt_grace ends (asking charon over VICI). Reads the ledger "
                                   "under the run directory when present, else judges by charon's markers. "
                                   "Changes nothing: the supervisor applies plans itself.")
    r.add_argument("--dry-run", action="store_true", required=True,
                   help="print the plan, change nothing (required: only the supervisor applies plans)")
    r.add_argument("--config", metavar="PATH", help="the supervisor's configuration (as for 'run')")
    r.add_argument("--vici", metavar="SOCKET", help="charon's VICI socket (default: daemon.vici_socket)")
    r.add_argument("--json", action="store_true", help="print the plans as JSON")
    r.set_defaults(func=cmd_reconcile)


def execute(plan, handlers=None, on_result=None):
    """reconcile.execute, imported on first use (a name here, so `ipsec flush` can wrap it with progress)."""
    from ..reconcile import execute as run
    return run(plan, handlers, on_result)


def _common_parser():
    from ..argparser import Parser
    p = Parser(add_help=False)
    p.add_argument("--netns", metavar="NAME", help="network namespace to work in (/run/netns/NAME)")
    p.add_argument("--ledger", metavar="FILE",
                   help=f"ownership ledger (default: {LEDGER} when present)")
    p.add_argument("--no-ledger", action="store_true", help="judge by the markers only")
    p.add_argument("--virtual-ip", action="append", default=[], metavar="ADDR",
                   help="an address charon installed as a virtual IP (repeatable)")
    p.add_argument("--route-table", type=uint32, default=ROUTE_TABLE, metavar="N",
                   help="charon's routing table (default %(default)s)")
    p.add_argument("--rule-priority", type=uint32, default=RULE_PRIORITY, metavar="N",
                   help="priority of charon's routing rule (default %(default)s)")
    return p


def _require_root() -> None:
    if os.geteuid() != 0:
        raise NotRootError("reading XFRM state needs root (CAP_NET_ADMIN); run as root")


def _load_ledger(args, inode: int, name: str | None = None) -> tuple[Ledger | None, str | None]:
    """The ledger to judge with, if one applies to this namespace, and its path."""
    from ..ledger import UntrustedLedger, ledger_path, load_ledger
    from ..trusted_paths import initial_netns_inode, instance_dir, netns_instance
    if args.no_ledger:
        return None, None
    # The default: that namespace's own supervisor's (a per-namespace run dir outside the initial one).
    instance = netns_instance(inode, name, initial_netns_inode())
    path = args.ledger or ledger_path(instance_dir(DEFAULT_RUN_DIR, instance))
    if args.ledger is None and not os.path.lexists(path):
        return None, None
    try:
        # Root's, not writable by others, naming this namespace; a broken one is an error.
        return load_ledger(path, netns_inode=inode), path
    except UntrustedLedger as exc:
        if args.ledger is not None:
            raise UntrustedLedger(f"{exc}; give the right file or --no-ledger") from None
        log.warning("%s", exc)
        return None, None


def _judge(args) -> tuple[object, Ownership, str | None, str]:
    from ..kernel import netns
    from ..kernel_state import ReadOptions, read_state
    from ..ownership import MarkerConfig, decide_ownership
    options = ReadOptions(route_table=args.route_table, rule_priority=args.rule_priority)
    markers = MarkerConfig(route_table=args.route_table, rule_priority=args.rule_priority)
    with netns.enter(args.netns):
        state = read_state(options)
    ledger, path = _load_ledger(args, state.netns.inode, state.netns.name)
    ownership = decide_ownership(state.objects, markers, ledger, args.virtual_ip)
    where = state.netns.name or f"inode {state.netns.inode}"
    return state, ownership, path, where


def cmd_leftovers(args) -> int:
    from ..kernel_state import FAMILIES
    from ..ownership import is_supervisor_block
    _require_root()
    state, ownership, path, where = _judge(args)
    blocks = [p for p in state.objects.get("xfrm_policy", ()) if is_supervisor_block(p)]
    counts = ownership.counts()
    foreign = sum(c["foreign"] for c in counts.values()) - len(blocks)
    with writing_output():
        if args.json:
            doc = {"netns": state.netns.to_json(), "ledger": path,
                   "owned": {name: [{"describe": r.describe(), "rule": v.rule, "detail": v.detail,
                                     "record": r.to_json()} for r, v in ownership.owned(name)]
                             for name in FAMILIES},
                   "counts": counts, "foreign": foreign,
                   "blocks": [{"describe": b.describe(), "record": b.to_json()} for b in blocks]}
            json.dump(doc, sys.stdout, indent=1)
            print()
            return ExitCode.OK
        basis = f"ledger {path} and markers" if path else "markers only (no ledger)"
        total = sum(c["owned"] for c in counts.values())
        print(f"charon's leftovers in network namespace {where}: {total} (judged by {basis})")
        for name, family in FAMILIES.items():
            owned = ownership.owned(name)
            print(f"{family.title}: {counts[name]['owned']} owned, {counts[name]['foreign']} foreign")
            for record, verdict in owned:
                print(f"  {record.describe()}\n      [{verdict.rule}] {verdict.detail}")
        if blocks:
            print(f"fail-closed blocks installed by ipsec-supervisor: {len(blocks)}")
            for b in blocks:
                print(f"  {b.describe()}")
        print(f"foreign objects (never touched): {foreign}")
        return ExitCode.OK


def cmd_flush(args) -> int:
    from .. import daemons as ike_daemons
    from ..kernel import netns
    from ..reconcile import Outcome, plan_flush
    _require_root()
    state, ownership, path, where = _judge(args)
    found = ike_daemons.detect(state.netns.inode, ike_daemons.DEFAULT_DAEMON_BINARIES)
    ours = [d for d in found if d.ours]
    if ours and not args.force and not args.dry_run:
        raise SupervisorError(f"not flushing network namespace {where}: {ike_daemons.describe_all(ours)} is "
                              "running there and owns this state; stop it first, or pass --force to pull "
                              "the state from under it", ExitCode.FAILED)
    # --force overrides our daemon only: what other IKE daemons may own stays theirs
    others = tuple(d for d in found if not d.ours)
    plan = plan_flush(state, ownership, fail_closed=args.fail_closed, others=others)
    head = (f"flush of network namespace {where}: {len(plan)} action(s), {plan.foreign} foreign "
            f"object(s) left alone" + (", fail-closed" if plan.fail_closed else ""))
    if args.dry_run:
        with writing_output():
            if args.json:
                json.dump({"plan": plan.to_json(), "ledger": path, "ike_daemons": [d.to_json() for d in found]},
                          sys.stdout, indent=1)
                print()
            else:
                print(head + " (dry run: nothing changed)")
                for d in ours:
                    print(f"note: {d.describe()} ({d.exe}) is running there: a real flush refuses without --force")
                for d in others:
                    print(f"note: {d.describe()} ({d.exe or 'exe unknown'}) holds {d.holds()} there: what only "
                          "charon's markers claim is kept")
                for line in plan.lines():
                    print(line)
        return ExitCode.OK
    with netns.enter(args.netns):
        results = execute(plan)
    bad = [r for r in results if not r.ok]
    with writing_output():
        if args.json:
            json.dump({"plan": plan.to_json(), "ledger": path, "ike_daemons": [d.to_json() for d in found],
                       "results": [{"outcome": r.outcome.value, "message": r.message,
                                    "action": r.action.describe()} for r in results]},
                      sys.stdout, indent=1)
            print()
        else:
            print(head)
            for d in others:
                print(f"note: {d.describe()} ({d.exe or 'exe unknown'}) holds {d.holds()} here: what only "
                      "charon's markers claim is kept")
            labels = []
            for i, r in enumerate(results, 1):
                kept = r.action.KIND == "keep"      # what no flush may delete (ownership.deletion_hold)
                label = "kept" if kept else r.outcome.value.upper() if not r.ok else r.outcome.value
                labels.append(label)
                tail = (f": {r.action.reason}" if kept else
                        f": {r.message}" if r.message and r.outcome is not Outcome.DONE else "")
                print(f"{i:>4}. {label:<12} {r.action.describe()}{tail}")
            order = [o.value for o in Outcome] + ["kept"]
            tally = {name: labels.count(name) + labels.count(name.upper()) for name in order}
            print("summary: " + ", ".join(f"{n} {name}" for name, n in tally.items() if n) if results
                  else "summary: nothing to do")
            if plan.fail_closed and any(r.ok for r in results if r.action.KIND == "install-block"):
                print("fail-closed blocks stay until charon re-installs its policies and they are removed "
                      "(the supervisor does this, or run flush again without --fail-closed)")
    return ExitCode.FAILED if bad else ExitCode.OK


# --- reconcile --dry-run ------------------------------------------------------------------

def _reconcile_ledger(args, run_dir: str, inode: int) -> tuple[Ledger | None, str | None, str | None]:
    from ..ledger import LedgerError, ledger_path, load_ledger
    """(ledger, its path, a note why none is used) for the supervisor's run directory."""
    if args.no_ledger:
        return None, None, "--no-ledger"
    path = args.ledger or ledger_path(run_dir)
    if not os.path.lexists(path):
        if args.ledger is not None:
            raise LedgerError(f"cannot read ledger {path}: No such file or directory")
        return None, None, f"no ledger at {path}"
    try:
        # Trusted only if root's, not writable by others, and naming this namespace.
        return load_ledger(path, netns_inode=inode), path, None
    except LedgerError as exc:
        return None, path, str(exc)


def cmd_reconcile(args) -> int:
    import time as _time

    from .. import adopt
    from .. import daemons as ike_daemons
    from ..config import load_config
    from ..kernel import netns
    from ..kernel_state import ReadOptions, read_state
    from ..ledger import HOW_INHERITED
    from ..ownership import MarkerConfig, decide_ownership
    from ..recovery_choice import ADOPT, NONE, choose_recovery, recovery_plan
    from ..vici_client import ViciError, list_conns, list_sas
    from ..policy import Action

    _require_root()
    cfg = load_config(args.config)
    rc = cfg.recovery
    options = ReadOptions(route_table=args.route_table, rule_priority=args.rule_priority)
    markers = MarkerConfig(route_table=args.route_table, rule_priority=args.rule_priority)
    with netns.enter(args.netns):
        state = read_state(options)
    where = state.netns.name or f"inode {state.netns.inode}"
    ledger, path, why_not = _reconcile_ledger(args, cfg.paths.run_dir, state.netns.inode)
    found = ike_daemons.detect(state.netns.inode, (cfg.daemon.command[0],))
    running = [d for d in found if d.ours]
    doc: dict = {"netns": state.netns.to_json(), "mode": rc.mode, "ledger": path, "ledger_note": why_not,
                 "daemon": None, "ike_daemons": [d.to_json() for d in found], "plan": None, "at_grace": None,
                 "notes": []}
    notes: list[str] = doc["notes"]
    ownership = decide_ownership(state.objects, markers, ledger, args.virtual_ip)
    plan = grace_plan = None
    if rc.mode == NONE:
        notes.append("recovery.mode is none: the supervisor leaves all kernel state alone")
    elif not running:
        choice = choose_recovery(rc.mode, fail_closed=rc.fail_closed, on_stop=rc.on_stop, exit_class=None,
                                 decision=Action.RESTART)
        plan = recovery_plan(choice, state, ownership, found)
        notes.append(f"no charon runs here: before charon starts, {choice.reason}")
    else:
        pid, name = running[0].pid, running[0].name
        doc["daemon"] = {"pid": pid, "name": name}
        if ledger is None:
            notes.append(f"{name} pid {pid} runs; without a ledger every object the markers claim is the "
                         "running charon's: nothing to reconcile")
        elif ledger.daemon_pid not in (None, pid):
            notes.append(f"{name} pid {pid} runs, but the ledger is of pid {ledger.daemon_pid}: a supervisor "
                         "leaves the state of a charon it did not start alone")
        else:
            inherited = [(e.record, e.verdict()) for e in ledger.owned() if e.how == HOW_INHERITED]
            reqids = {r.reqid for r, _ in inherited if r.FAMILY == "xfrm_sa"} | {
                t.reqid for r, _ in inherited if r.FAMILY == "xfrm_policy" for t in r.templates}
            inherited += [(r, v) for r, v in ownership.owned("firewall")
                          if r.updown is not None and r.updown.reqid in reqids]
            configured = active = None
            vici = args.vici or cfg.daemon.vici_socket
            if vici:
                try:
                    configured, active = list_conns(vici), list_sas(vici)
                except ViciError as exc:
                    notes.append(f"{exc}: matching without charon's configuration")
            if rc.mode != ADOPT:
                plan = adopt.plan_wait(inherited, f"recovery.mode {rc.mode}: left in place")
            else:
                common = dict(ledger=ledger, configured=configured, active=active,
                              local_addresses=frozenset(a.address for a in state.objects.get("address", ())),
                              markers=markers, fail_closed=rc.fail_closed, initiate=rc.adopt_initiate,
                              parallel=rc.adopt_initiate_parallel, others=ike_daemons.others(found, exclude=(pid,)))
                now = _time.monotonic()
                plan = adopt.plan_adopt(inherited, now=now, deadline=now + rc.adopt_grace, **common)
                # By the time the grace ends every initiation has gone out (the queue holds it):
                # what is still unclaimed then is what this plan shows going.
                grace_plan = adopt.plan_adopt(inherited, now=now, deadline=now, **{**common, "initiate": False})
            if not inherited:
                notes.append(f"{name} pid {pid} runs and no leftover of its predecessor is left")
    doc["plan"] = plan.to_json() if plan is not None else None
    doc["at_grace"] = grace_plan.to_json() if grace_plan is not None else None
    with writing_output():
        if args.json:
            json.dump(doc, sys.stdout, indent=1)
            print()
            return ExitCode.OK
        basis = f"ledger {path} and markers" if ledger is not None else f"markers only ({why_not})"
        print(f"reconcile in network namespace {where} (recovery.mode {rc.mode}; judged by {basis}) -- dry run, "
              "nothing changed")
        for note in notes:
            print(f"note: {note}")
        for title, p in (("now", plan), ("when recovery.adopt_grace ends", grace_plan)):
            if p is None:
                continue
            print(f"plan {title}: {len(p)} action(s), {p.foreign} foreign object(s) left alone"
                  + (", fail-closed" if p.fail_closed else ""))
            for line in p.lines():
                print(line)
        return ExitCode.OK
