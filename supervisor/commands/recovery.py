"""``ipsec-supervisor leftovers`` and ``flush``: what charon left in the kernel, and removing it."""

from __future__ import annotations

import json
import logging
import os
import sys

import psutil

from ..errors import ExitCode, NotRootError, SupervisorError
from ..kernel import netns
from ..kernel_state import DEFAULT_ROUTE_TABLE, DEFAULT_RULE_PRIORITY, FAMILIES, ReadOptions, read_state
from ..ledger import Ledger, LedgerError, ledger_path, load_ledger
from ..ownership import MarkerConfig, Ownership, decide_ownership, is_supervisor_block
from ..reconcile import Outcome, execute, plan_flush

log = logging.getLogger(__name__)

DEFAULT_RUN_DIR = "/run/ipsec-supervisor"
DAEMON_NAMES = ("charon", "charon-systemd")


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
                                   "while a charon process runs in the namespace, unless --force. "
                                   "Exit status 1 when any action failed.")
    f.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    f.add_argument("--force", action="store_true", help="flush even while charon runs there")
    f.add_argument("--fail-closed", action="store_true",
                   help="first install block policies for charon's out/fwd policies; they stay "
                        "until a later flush without this option (or the supervisor) removes them")
    f.add_argument("--json", action="store_true", help="print the plan and results as JSON")
    f.set_defaults(func=cmd_flush)


def _common_parser():
    import argparse
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--netns", metavar="NAME", help="network namespace to work in (/run/netns/NAME)")
    p.add_argument("--ledger", metavar="FILE",
                   help=f"ownership ledger (default: {ledger_path(DEFAULT_RUN_DIR)} when present)")
    p.add_argument("--no-ledger", action="store_true", help="judge by the markers only")
    p.add_argument("--virtual-ip", action="append", default=[], metavar="ADDR",
                   help="an address charon installed as a virtual IP (repeatable)")
    p.add_argument("--route-table", type=int, default=DEFAULT_ROUTE_TABLE, metavar="N",
                   help="charon's routing table (default %(default)s)")
    p.add_argument("--rule-priority", type=int, default=DEFAULT_RULE_PRIORITY, metavar="N",
                   help="priority of charon's routing rule (default %(default)s)")
    return p


def _require_root() -> None:
    if os.geteuid() != 0:
        raise NotRootError("reading XFRM state needs root (CAP_NET_ADMIN); run as root")


def _load_ledger(args, inode: int) -> tuple[Ledger | None, str | None]:
    """The ledger to judge with, if one applies to this namespace, and its path."""
    if args.no_ledger:
        return None, None
    path = args.ledger or ledger_path(DEFAULT_RUN_DIR)
    if args.ledger is None and not os.path.exists(path):
        return None, None
    ledger = load_ledger(path)          # an explicit or present but broken ledger is an error
    if ledger.netns_inode is not None and ledger.netns_inode != inode:
        if args.ledger is not None:
            raise LedgerError(f"ledger {path} belongs to another network namespace (inode "
                              f"{ledger.netns_inode}, this one is {inode}); give the right file "
                              "or --no-ledger")
        log.warning("ledger %s belongs to another network namespace; judging by markers only", path)
        return None, None
    return ledger, path


def _judge(args) -> tuple[object, Ownership, str | None, str]:
    options = ReadOptions(route_table=args.route_table, rule_priority=args.rule_priority)
    markers = MarkerConfig(route_table=args.route_table, rule_priority=args.rule_priority)
    with netns.enter(args.netns):
        state = read_state(options)
    ledger, path = _load_ledger(args, state.netns.inode)
    ownership = decide_ownership(state.objects, markers, ledger, args.virtual_ip)
    where = state.netns.name or f"inode {state.netns.inode}"
    return state, ownership, path, where


def cmd_leftovers(args) -> int:
    _require_root()
    state, ownership, path, where = _judge(args)
    blocks = [p for p in state.objects.get("xfrm_policy", ()) if is_supervisor_block(p)]
    counts = ownership.counts()
    foreign = sum(c["foreign"] for c in counts.values()) - len(blocks)
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


def running_daemons(inode: int, names: tuple[str, ...] = DAEMON_NAMES) -> list[tuple[int, str]]:
    """(pid, name) of the IKE daemons running in the network namespace with INODE."""
    found = []
    for proc in psutil.process_iter(["pid", "name"]):
        if proc.info["name"] not in names:
            continue
        try:
            if os.stat(f"/proc/{proc.info['pid']}/ns/net").st_ino == inode:
                found.append((proc.info["pid"], proc.info["name"]))
        except OSError:
            continue        # gone meanwhile
    return found


def cmd_flush(args) -> int:
    _require_root()
    state, ownership, path, where = _judge(args)
    daemons = running_daemons(state.netns.inode)
    if daemons and not args.force and not args.dry_run:
        pids = ", ".join(f"{name} pid {pid}" for pid, name in daemons)
        raise SupervisorError(f"not flushing network namespace {where}: {pids} is running there and "
                              "owns this state; stop it first, or pass --force to pull the state "
                              "from under it", ExitCode.FAILED)
    plan = plan_flush(state, ownership, fail_closed=args.fail_closed)
    head = (f"flush of network namespace {where}: {len(plan)} action(s), {plan.foreign} foreign "
            f"object(s) left alone" + (", fail-closed" if plan.fail_closed else ""))
    if args.dry_run:
        if args.json:
            json.dump({"plan": plan.to_json(), "ledger": path}, sys.stdout, indent=1)
            print()
        else:
            print(head + " (dry run: nothing changed)")
            for pid, name in daemons:
                print(f"note: {name} pid {pid} is running there: a real flush refuses without --force")
            for line in plan.lines():
                print(line)
        return ExitCode.OK
    with netns.enter(args.netns):
        results = execute(plan)
    bad = [r for r in results if not r.ok]
    if args.json:
        json.dump({"plan": plan.to_json(), "ledger": path,
                   "results": [{"outcome": r.outcome.value, "message": r.message,
                                "action": r.action.describe()} for r in results]},
                  sys.stdout, indent=1)
        print()
    else:
        print(head)
        for i, r in enumerate(results, 1):
            label = r.outcome.value.upper() if not r.ok else r.outcome.value
            tail = f": {r.message}" if r.message and r.outcome is not Outcome.DONE else ""
            print(f"{i:>4}. {label:<12} {r.action.describe()}{tail}")
        tally = {o: sum(1 for r in results if r.outcome is o) for o in Outcome}
        print("summary: " + ", ".join(f"{n} {o.value}" for o, n in tally.items() if n) if results
              else "summary: nothing to do")
        if plan.fail_closed and any(r.ok for r in results if r.action.KIND == "install-block"):
            print("fail-closed blocks stay until charon re-installs its policies and they are removed "
                  "(the supervisor does this, or run flush again without --fail-closed)")
    return ExitCode.FAILED if bad else ExitCode.OK
