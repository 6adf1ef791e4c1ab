#!/usr/bin/env python3
"""Adopt at scale: N real tunnels, kill -9 of moon's charon, adopt mode against strongSwan's starter.

In the two-namespace lab (lab/) moon and sun run N tunnels (one connection each, its own
subnets and IKE identities): moon initiates the odd ones, sun the even ones, so one kill
crashes moon both as initiator and as responder.  Pings at 5/s cross a sample of 20 tunnels
(half of each role).  Each target gets its own lab and one kill -9 of moon's charon:

  starter       strongSwan's own starter (ipsec.conf), the baseline
  adopt-P       ipsec-supervisor, recovery.mode adopt, recovery.adopt_initiate_parallel P

and is watched until moon's new charon has every CHILD_SA again, the supervisor's adoption
has decided every leftover, and the sampled pings are settled (or --max-window).  Printed per
target: when charon answered again, when every tunnel was back, when every leftover was
decided (claimed by charon or removed), convergence (the later of the two), pings lost per
sampled tunnel, stale SAs in moon and sun at the end (SAs no running charon knows), plaintext
seen on the outer links, and the CPU time moon's supervisor (or starter) process used from the
kill to the end; then adopt's convergence as a fraction of the starter's (the goal: at most 1/5).

Needs a kernel with ESP: without one it re-runs itself in the real-kernel VM (tools/vm-run).
Usage (root, from the repo): .venv/bin/python bench/bench_adopt_scale.py [--tunnels 50]
    [--targets starter,adopt-1,adopt-4] [--side-by-side] [--max-window 400] [--json]
The targets run one after the other by default (each lab has 2N IKE_SAs: side by side they
would share the emulated CPU and blur each other's times).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lab.preflight import esp_available, in_vm, missing_tools, recovery_settings  # noqa: E402

SAMPLE = 20
_FINISHED = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\.(\d{3}) \w+ [\w.]+: adoption finished after")


def parse_target(target: str) -> tuple[str, int]:
    """("starter", 0) or ("adopt", P) from "starter" / "adopt-P"; ValueError otherwise."""
    if target == "starter":
        return "starter", 0
    m = re.fullmatch(r"adopt-(\d+)", target)
    if not m or not 1 <= int(m.group(1)) <= 10000:
        raise ValueError(f"unknown target {target!r}: starter or adopt-P (P = adopt_initiate_parallel, 1..10000)")
    return "adopt", int(m.group(1))


def scenario_for(target: str, tunnels: int, max_window: float, grace: str | None):
    from lab.charon import LabSettings
    from lab.scenario import Scenario
    kind, parallel = parse_target(target)
    extra = {"adopt_initiate_parallel": parallel}
    if grace:
        extra["adopt_grace"] = grace
    # Loading N connections while charon starts half of them takes minutes under emulation, and
    # its VICI answers stall meanwhile: limits that grow with N (the lab's are for a few tunnels).
    slow = {"daemon": {"load_timeout": f"{max(60, 2 * tunnels)}s"},
            "health": {"interval": f"{max(5, tunnels // 10)}s", "timeout": f"{max(5, tunnels // 10)}s"}} \
        if tunnels > 50 else {}
    settings = LabSettings(recovery=recovery_settings(extra) if kind == "adopt" else {}, supervisor=slow)
    common = dict(tunnels=tunnels, ping_sample=SAMPLE, settings=settings, warmup=3.0, min_observe=10.0,
                  settle=3.0, max_observe=max_window, until_all_back=True, prefix="ipsvscale")
    if kind == "starter":
        return Scenario(moon="starter", **common)
    return Scenario(moon="supervisor", mode="adopt", **common)


def adoption_finished_at(log_text: str) -> float | None:
    """Wall-clock time of the supervisor's 'adoption finished' line (the first), or None."""
    for line in log_text.splitlines():
        m = _FINISHED.match(line)
        if m:
            return time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1000
    return None


def summarize(out) -> dict:
    """The numbers of one target (JSON-safe; times in seconds after the kill)."""
    def since_kill(t):
        return None if t is None else round(t - out.kill_at, 1)

    done_at = adoption_finished_at(out.moon_output) or out.adoption_done_at
    back = since_kill(out.all_back_at)
    decided = since_kill(done_at)
    converged = None if back is None or (out.scenario.moon == "supervisor" and decided is None) else \
        max(back, decided or 0.0)
    if out.all_back_at is not None:
        out.back_counts.append((out.all_back_at, len(out.lab.tunnels)))
    roles = {t.name: t.role for t in out.lab.tunnels}
    sampled = {}
    for name, p in out.pings.items():
        lost = out.lost_after_kill(name)
        sampled[name] = {"role": roles[name], "lost": len(lost),
                         "longest_gap_s": round(out.outage_s(name), 1), "recovered": out.recovered(name)}
    adoption = ((out.status or {}).get("recovery") or {}).get("adoption") or {}
    return {
        "tunnels": len(out.lab.tunnels),
        "setup_s": round(out.setup_s, 1), "tunnels_up_s": round(out.tunnels_up_s, 1),
        "charon_back_s": since_kill(out.ready_again_at),
        "all_back_s": back, "leftovers_decided_s": decided, "converged_s": converged,
        "observed_s": round(out.observed_s, 1),
        "back_at_end": out.back_counts[-1][1] if out.back_counts else (len(out.lab.tunnels) if out.all_back_at else 0),
        "back_curve": [(round(t - out.kill_at, 1), n) for t, n in out.back_counts],
        "sampled": sampled,
        "max_lost": max((s["lost"] for s in sampled.values()), default=0),
        "over_1_lost": sorted((n for n, s in sampled.items() if s["lost"] > 1), key=lambda n: int(n[1:])),
        "stale_moon": len(out.stale_after.get("moon", ())), "stale_sun": len(out.stale_after.get("sun", ())),
        "plaintext": sum(len(p) for p in out.plaintext.values()),
        "cpu_after_kill_s": None if out.cpu_at_end is None or out.cpu_at_kill is None
        else round(out.cpu_at_end - out.cpu_at_kill, 2),
        "cpu_total_s": None if out.cpu_at_end is None else round(out.cpu_at_end, 2),
        "adoption": {k: adoption.get(k) for k in ("leftovers", "resolved", "pending", "steps", "results")}
        if adoption else None,
        # the start load's pacing of charon's own start_action initiations (supervisor/vici_relay.py)
        "paced": (((out.status or {}).get("daemon") or {}).get("load") or {}).get("paced"),
    }


def _role_max(r: dict, role: str) -> str:
    lost = [s["lost"] for s in r["sampled"].values() if s["role"] == role]
    gaps = [s["longest_gap_s"] for s in r["sampled"].values() if s["role"] == role]
    return f"{max(lost, default=0)} / {max(gaps, default=0.0):.1f}"


def print_table(results: dict, tunnels: int) -> None:
    print(f"\n{tunnels} tunnels (moon initiates the odd ones, responds to the even ones); kill -9 of moon's charon; "
          f"pings at 5/s on {SAMPLE} of them")
    head = (f"{'target':<10} {'charon':>7} {'all back':>9} {'decided':>8} {'converged':>9} "
            f"{'init lost/gap':>13} {'resp lost/gap':>13} {'>1 lost':>7} {'stale m/s':>9} {'plain':>5} "
            f"{'cpu s':>6}")
    print(head)
    print("-" * len(head))

    def s(v):
        return "-" if v is None else f"{v:.1f}"
    for target, r in results.items():
        if "error" in r:
            print(f"{target:<10} FAILED: {r['error']}")
            continue
        back = s(r["all_back_s"]) if r["all_back_s"] is not None else f">{r['observed_s']:.0f}"
        conv = s(r["converged_s"]) if r["converged_s"] is not None else f">{r['observed_s']:.0f}"
        print(f"{target:<10} {s(r['charon_back_s']):>7} {back:>9} {s(r['leftovers_decided_s']):>8} "
              f"{conv:>9} {_role_max(r, 'initiator'):>13} {_role_max(r, 'responder'):>13} "
              f"{len(r['over_1_lost']):>7} {r['stale_moon']:>4}/{r['stale_sun']:<4} {r['plaintext']:>5} "
              f"{s(r['cpu_after_kill_s']):>6}")
    print("(seconds after the kill: charon = the new charon answers with its connections loaded; all back = it "
          "reports every tunnel's CHILD_SA installed; decided = the supervisor's adoption has claimed or removed "
          "every leftover; converged = the later of the two. lost/gap: most pings lost on one sampled tunnel of "
          "that role / longest gap in s; >1 lost: sampled tunnels that lost more than one ping; stale m/s: SAs in "
          "moon/sun no running charon knows, at the end; cpu s: CPU time of moon's supervisor or starter process "
          "from the kill to the end)")
    for target, r in results.items():
        if "error" not in r and r["all_back_s"] is None:
            print(f"{target}: {r['back_at_end']} of {r['tunnels']} tunnels back in moon's new charon when the window "
                  f"ended ({r['observed_s']:.0f} s); the rest still run on the dead charon's SAs (or not at all) "
                  "until the peer's DPD or rekeying. Tunnels back over time: "
                  + " ".join(f"{t:.0f}s:{n}" for t, n in r["back_curve"][::max(1, len(r["back_curve"]) // 12)]))
    base = results.get("starter")
    if base and "error" not in base:
        # The starter not converged within the window: its time is more than the window (a bound).
        b, bound = (base["converged_s"], "") if base["converged_s"] else (base["observed_s"], "< ")
        print(f"\nconvergence, adopt / starter (same run; the goal is at most 0.2"
              + (f"; the starter had not converged when its {b:.0f} s window ended" if bound else "") + "):")
        for target, r in results.items():
            if target != "starter" and "error" not in r and r["converged_s"] is not None:
                print(f"  {target:<9} {r['converged_s']:.1f} / {'>' if bound else ''}{b:.1f} = {bound}"
                      f"{r['converged_s'] / b:.3f}")
    for target, r in results.items():
        if "error" not in r:
            print(f"{target}: lab set up in {r['setup_s']:.0f} s, tunnels up in {r['tunnels_up_s']:.0f} s more"
                  + (f"; adoption {r['adoption']}" if r.get("adoption") else "")
                  + (f"; start load paced {r['paced']}" if r.get("paced") else ""))


def serial_order(targets: list[str]) -> list[str]:
    """The adopt targets first, then the starter: its window is sized by their convergence."""
    return [t for t in targets if t != "starter"] + [t for t in targets if t == "starter"]


def starter_window(outcomes: dict, max_window: float, factor: float) -> float:
    """The starter's watch: at least FACTOR x the slowest adopt convergence measured before it
    (a starter that has not converged when it ends shows adopt/starter < 1/FACTOR), else MAX_WINDOW."""
    converged = [summarize_converged(o) for o in outcomes.values() if not isinstance(o, Exception)]
    converged = [c for c in converged if c is not None]
    if not factor or not converged:
        return max_window
    return max(max_window, factor * max(converged))


def summarize_converged(out) -> float | None:
    """Seconds from the kill until every tunnel was back and every leftover decided (None: never)."""
    done_at = adoption_finished_at(out.moon_output) or out.adoption_done_at
    if out.all_back_at is None or (out.scenario.moon == "supervisor" and done_at is None):
        return None
    return max(out.all_back_at, done_at or 0.0) - out.kill_at


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tunnels", type=int, default=50, help="tunnels in each lab (1..250, default 50)")
    ap.add_argument("--targets", default="starter,adopt-1,adopt-4",
                    help="comma-separated: starter, adopt-P (P = recovery.adopt_initiate_parallel)")
    ap.add_argument("--grace", default=None, help="recovery.adopt_grace for the adopt targets (default: its default)")
    ap.add_argument("--side-by-side", action="store_true", help="all targets at once (shares the CPU)")
    ap.add_argument("--max-window", type=float, default=400.0, help="longest watch after a kill (s, default 400)")
    ap.add_argument("--starter-factor", type=float, default=5.5, metavar="F",
                    help="one after the other, the adopt targets run first and the starter is watched for at "
                         "least F x their slowest convergence (default %(default)s; 0: --max-window)")
    ap.add_argument("--starter-max", type=float, default=3600.0, metavar="S",
                    help="but never longer than S seconds (default %(default)s)")
    ap.add_argument("--json", action="store_true", help="also print the results as JSON")
    ap.add_argument("--keep-files", action="store_true",
                    help="keep the labs' configs, logs and captures (in the VM: copied to its vm-results folder)")
    ap.add_argument("--where", choices=("auto", "here", "vm"), default="auto", help=argparse.SUPPRESS)
    args = ap.parse_args()
    targets = [t for t in args.targets.split(",") if t]
    try:
        for t in targets:
            parse_target(t)
        from lab.topology import scale_tunnels
        scale_tunnels(args.tunnels)
    except ValueError as exc:
        print(f"bench_adopt_scale: {exc}", file=sys.stderr)
        return 2
    if not targets:
        print("bench_adopt_scale: no targets", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("bench_adopt_scale: needs root (network namespaces)", file=sys.stderr)
        return 4
    missing = missing_tools()
    if missing:
        print("bench_adopt_scale: missing tools: " + "; ".join(missing), file=sys.stderr)
        return 5
    if args.where == "vm" or (args.where == "auto" and not in_vm() and not esp_available()):
        print("bench_adopt_scale: this kernel has no ESP; running in the real-kernel VM (tools/vm-run)", flush=True)
        # set-up grows with the tunnels (about 2 s each under emulation), then the watch window
        per_target = args.max_window + 120 + 3 * args.tunnels
        budget = (1 if args.side_by_side else len(targets)) * per_target + 120
        if "starter" in targets and not args.side_by_side and args.starter_factor:
            budget += min(args.starter_max, args.starter_factor * args.max_window) - args.max_window
        argv = [os.path.join(ROOT, "tools", "vm-run"), "--timeout", str(int(budget)), "--memory", "2G", "--",
                ".venv/bin/python", "bench/bench_adopt_scale.py", "--where", "here", "--targets", ",".join(targets),
                "--tunnels", str(args.tunnels), "--max-window", str(args.max_window),
                "--starter-factor", str(args.starter_factor), "--starter-max", str(args.starter_max)] + \
            (["--grace", args.grace] if args.grace else []) + \
            (["--side-by-side"] if args.side_by_side else []) + (["--json"] if args.json else []) + \
            (["--keep-files"] if args.keep_files else [])
        return subprocess.call(argv, cwd=ROOT)

    from lab.scenario import finish_workdir, report_runs, run_crashes
    t0 = time.monotonic()
    work = tempfile.mkdtemp(prefix="ipsv-bench-scale-")

    def say(m: str) -> None:
        print(f"[{time.monotonic() - t0:6.1f}s] {m}", flush=True)
    try:
        if args.side_by_side:
            scenarios = {t: scenario_for(t, args.tunnels, args.max_window, args.grace) for t in targets}
            outcomes = run_crashes(scenarios, work, parallel=True, say=say)
        else:
            outcomes = {}
            for t in serial_order(targets):
                window = args.max_window
                if t == "starter":
                    window = min(args.starter_max, starter_window(outcomes, args.max_window, args.starter_factor))
                    if window > args.max_window:
                        say(f"starter: watching up to {window:.0f} s ({args.starter_factor} x adopt's slowest "
                            "convergence), so a starter that does not converge in it shows a ratio below 1/5")
                outcomes.update(run_crashes({t: scenario_for(t, args.tunnels, window, args.grace)}, work,
                                            parallel=False, say=say))
    finally:
        finish_workdir(work, args.keep_files, "bench-adopt-scale")
    return report_runs(targets, outcomes, summarize, lambda r: print_table(r, args.tunnels),
                       side_by_side=args.side_by_side, started=t0, as_json=args.json)


if __name__ == "__main__":
    sys.exit(main())
