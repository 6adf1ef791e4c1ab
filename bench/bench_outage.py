#!/usr/bin/env python3
"""Outage benchmark: tunnel traffic lost after kill -9 of moon's charon, per recovery mode vs strongSwan's starter.

In the two-namespace lab (lab/), moon runs three tunnels to sun at once: moon initiates one
(auto=start), sun initiates one (moon responds) and one is a trap (auto=route on both sides),
all with 60 s CHILD_SA lifetimes (rekey after 50 s).  Pings cross each tunnel at 5/s.  Each
target gets its own lab and one kill -9 of moon's charon:

  starter          strongSwan's own starter (ipsec.conf), the baseline
  keep|flush|adopt ipsec-supervisor with that recovery.mode (its other settings at their defaults)

and is watched until every tunnel carries traffic again and the dead charon's SAs have
passed their hard lifetime (or --max-window).  Printed per target and tunnel: pings lost
after the kill, the longest gap, when it started (seconds after the kill), stale SAs (no
running charon knows them) 20 s after the kill and at the end, plaintext packets seen on
either outer link, and what sun's own guard stopped (lab.topology.peer_guard_script: a
strongSwan peer leaks for a moment on every INITIAL_CONTACT; "unexpl." counts stopped
packets outside those moments of sun's, which would be a leak of someone else's making);
then the ratios of each mode's losses to the starter's, measured in the same run.

Needs a kernel with ESP: without one it re-runs itself in the real-kernel VM (tools/vm-run).
Usage (root, from the repo): .venv/bin/python bench/bench_outage.py [--targets starter,keep,flush,adopt]
    [--serial] [--max-window 300] [--json]
The targets run side by side by default (one VM boot, the long waits overlap); --serial runs
them one after the other (closer to an idle machine, about four times longer).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lab.preflight import config_mode, esp_available, in_vm, missing_tools  # noqa: E402

TARGETS = ("starter", "keep", "flush", "adopt")
ROLES = ("initiator", "responder", "trap")
CHILD_REKEY, CHILD_LIFE = 50, 60
STALE_PROBE_AFTER = 20.0
# What the old starter did here before (issue 4), for the printout.
PREVIOUS = {"initiator": "1 of 150 lost, 2 replaced SAs stayed",
            "responder": "123 s without an answer",
            "trap": "2.5 s hole at the hard lifetime"}


def scenario_for(target: str, max_window: float):
    from lab.charon import LabSettings
    from lab.scenario import Scenario
    settings = LabSettings(child_rekey=CHILD_REKEY, child_life_time=CHILD_LIFE)
    common = dict(roles=ROLES, settings=settings, warmup=5.0,
                  # Past the dead charon's SAs' hard lifetime: the trap hole happens there.
                  min_observe=CHILD_LIFE + 10.0, settle=5.0, max_observe=max_window,
                  stale_probe_after=STALE_PROBE_AFTER, prefix="ipsvbench")
    if target == "starter":
        return Scenario(moon="starter", **common)
    return Scenario(moon="supervisor", mode=config_mode(target), **common)


def summarize(out) -> dict:
    """Per tunnel numbers of one target (JSON-safe)."""
    from lab.report import peer_guard_check
    res = {"charon_back_s": None if out.ready_again_at is None else round(out.ready_again_at - out.kill_at, 2),
           "observed_s": round(out.observed_s, 1),
           "plaintext": {site: len(p) for site, p in out.plaintext.items()},
           "peer_guard_stopped": len(out.guard_stopped),
           "peer_guard_unexplained": len(peer_guard_check(out)[1]),
           "stale_at_probe": None if out.stale_probe is None else len(out.stale_probe),
           "stale_at_end": len(out.stale_after.get("moon", ())),
           "tunnels": {}}
    for role, p in out.pings.items():
        lost = out.lost_after_kill(role)
        gaps = [(start, n) for start, _, n in p.outages() if start >= out.kill_at - 0.5]
        longest = max(gaps, key=lambda g: g[1], default=None)
        stale = [sa for sa in (out.stale_probe or ()) if sa.reqid == _reqid(out, role)]
        ongoing = bool(lost) and not out.recovered(role)
        res["tunnels"][role] = {
            "sent_after_kill": len([s for s, t in p.sent_at.items() if t >= out.kill_at]),
            "lost": len(lost),
            "longest_gap_s": round(longest[1] * p.interval, 1) if longest else 0.0,
            "gap_open_at_end": ongoing,
            "gap_starts_at_s": round(longest[0] - out.kill_at, 1) if longest else None,
            "recovered": out.recovered(role),
            "stale_at_probe": len(stale),
        }
    return res


def _reqid(out, role: str) -> int:
    return out.lab.tunnel(role).index


def print_table(results: dict, max_window: float) -> None:
    print(f"\nkill -9 of moon's charon; pings at 5/s; CHILD_SA rekey {CHILD_REKEY} s, hard lifetime {CHILD_LIFE} s")
    head = (f"{'target':<9} {'tunnel':<10} {'lost':>5} {'gap s':>6} {'gap at':>7} {'back?':>5} "
            f"{'stale@20s':>9} {'plain':>5} {'guard':>5} {'unexpl.':>7} {'charon back':>11}")
    print(head)
    print("-" * len(head))
    for target, r in results.items():
        if "error" in r:
            print(f"{target:<9} FAILED: {r['error']}")
            continue
        plain = sum(r["plaintext"].values())
        guard, unexplained = r["peer_guard_stopped"], r["peer_guard_unexplained"]
        for i, (role, t) in enumerate(r["tunnels"].items()):
            at = "-" if t["gap_starts_at_s"] is None else f"+{t['gap_starts_at_s']:.1f}"
            back = "yes" if t["recovered"] else "NO"
            charon = f"{r['charon_back_s']:.1f} s" if (i == 0 and r["charon_back_s"] is not None) else ""
            gap = f"{t['longest_gap_s']:.1f}" + ("+" if t.get("gap_open_at_end") else "")
            print(f"{target if i == 0 else '':<9} {role:<10} {t['lost']:>5} {gap:>6} {at:>7} "
                  f"{back:>5} {t['stale_at_probe']:>9} {plain if i == 0 else '':>5} "
                  f"{guard if i == 0 else '':>5} {unexplained if i == 0 else '':>7} {charon:>11}")
    print(f"(gap s: longest run of lost pings, '+' = still open when the window ended; "
          f"gap at: its start, seconds after the kill; back?: traffic flowing at the end of the "
          f"window, which ends when all tunnels are back and settled, at most {max_window:.0f} s; "
          f"stale@20s: SAs of that tunnel in moon no running charon knows, 20 s after the kill; "
          f"plain: ICMP between the subnets on either outer link; guard: packets sun's own guard "
          f"stopped, unexpl.: of those, outside sun's INITIAL_CONTACT gaps)")
    base = results.get("starter")
    if base and "error" not in base:
        print("\nlost pings, mode / starter (same run; < 1 is better):")
        for target, r in results.items():
            if target == "starter" or "error" in r:
                continue
            parts = []
            for role in ROLES:
                a, b = r["tunnels"][role]["lost"], base["tunnels"][role]["lost"]
                parts.append(f"{role} {a}/{b}" + (f" = {a / b:.3f}" if b else (" (starter lost none)")))
            print(f"  {target:<6} " + "; ".join(parts))
    print("\nearlier measurement with the old starter (issue 4): "
          + "; ".join(f"{k}: {v}" for k, v in PREVIOUS.items()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default=",".join(TARGETS), help="comma-separated, from " + ",".join(TARGETS))
    ap.add_argument("--serial", action="store_true", help="one target after the other")
    ap.add_argument("--max-window", type=float, default=300.0, help="longest watch after a kill (s, default 300)")
    ap.add_argument("--json", action="store_true", help="also print the results as JSON")
    ap.add_argument("--keep-files", action="store_true",
                    help="keep the labs' configs, logs and captures (in the VM: copied to its vm-results folder)")
    ap.add_argument("--where", choices=("auto", "here", "vm"), default="auto", help=argparse.SUPPRESS)
    args = ap.parse_args()
    targets = [t for t in args.targets.split(",") if t]
    bad = [t for t in targets if t not in TARGETS]
    if bad or not targets:
        print(f"bench_outage: unknown target(s) {bad}; choose from {', '.join(TARGETS)}", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("bench_outage: needs root (network namespaces)", file=sys.stderr)
        return 4
    missing = missing_tools()
    if missing:
        print("bench_outage: missing tools: " + "; ".join(missing), file=sys.stderr)
        return 5
    if args.where == "vm" or (args.where == "auto" and not in_vm() and not esp_available()):
        print("bench_outage: this kernel has no ESP; running in the real-kernel VM (tools/vm-run)", flush=True)
        budget = (1 if not args.serial else len(targets)) * (args.max_window + 240) + 120
        argv = [os.path.join(ROOT, "tools", "vm-run"), "--timeout", str(int(budget)), "--",
                ".venv/bin/python", "bench/bench_outage.py", "--where", "here", "--targets", ",".join(targets),
                "--max-window", str(args.max_window)] + (["--serial"] if args.serial else []) + \
            (["--json"] if args.json else []) + (["--keep-files"] if args.keep_files else [])
        return subprocess.call(argv, cwd=ROOT)

    from lab.scenario import finish_workdir, report_runs, run_crashes
    t0 = time.monotonic()
    work = tempfile.mkdtemp(prefix="ipsv-bench-outage-")
    try:
        scenarios = {t: scenario_for(t, args.max_window) for t in targets}
        outcomes = run_crashes(scenarios, work, parallel=not args.serial,
                               say=lambda m: print(f"[{time.monotonic() - t0:6.1f}s] {m}", flush=True))
    finally:
        finish_workdir(work, args.keep_files, "bench-outage")
    return report_runs(targets, outcomes, summarize, lambda r: print_table(r, args.max_window),
                       side_by_side=not args.serial, started=t0, as_json=args.json)


if __name__ == "__main__":
    sys.exit(main())
