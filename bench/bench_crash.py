#!/usr/bin/env python3
"""Crash to restart with 10,000 tunnels' worth of state: kill -9 of charon to the new charon's spawn.

Run as root: ``.venv/bin/python bench/bench_crash.py [--tunnels 10000] [--firewall 100] [--kills 20]``.

Real charon (Debian's strongSwan, one trap connection) under ``ipsec-supervisor run`` in a
namespace of its own, adopt mode. Same run, same machine, three targets:
- baseline: the two-tunnel lab (nothing else in the namespace);
- owned: TUNNELS tunnels of charon's state (3 policies and a table-220 route each, rule 220
  v4/v6, 2 updown FORWARD rules for FIREWALL tunnels) present at the supervisor's start: judged
  charon's by its markers and carried for adoption (adopt_grace 1 h, so they stay leftovers
  at every kill);
- foreign: the same objects added by iproute2 after charon started (the ledger calls them
  foreign; nothing of it is charon's).
Each target: --kills kills of charon, timed from the kill to the new charon's spawn (the
supervisor's ``daemon.started_at_monotonic``, CLOCK_MONOTONIC like the kill's stamp) and to the
deferred snapshot being on disk; every snapshot is checked to hold what was in the kernel.
Then --flush-kills runs in flush mode (state rebuilt each time): kill to "flush done",
blocks before the first delete (the plan's order), nothing owned left, foreign untouched.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import yaml  # noqa: E402

from bench_flush import (FOREIGN_FW, FOREIGN_IP, SETUP, charon_lines, ip_batch, remove, run,  # noqa: E402
                         updown_rules)
from charon_ns import psk_swanctl_conf, start_supervised_charon  # noqa: E402
from supervisor.snapshot import load_snapshot  # noqa: E402

CONN = "bench"
POLL = 0.2                      # seconds between status polls while waiting (see kill_once)


def build(ns: str, tunnels: int, firewall: int, workdir: str) -> None:
    run(["ip", "netns", "add", ns])
    ip_batch(ns, SETUP.splitlines(), workdir)
    if tunnels:
        add_state(ns, tunnels, firewall, workdir)


def add_state(ns: str, tunnels: int, firewall: int, workdir: str, rules: bool = True) -> None:
    # charon adds rule 220 itself when it starts: after it, only the rest
    lines = charon_lines(tunnels) if rules else charon_lines(tunnels)[:-1]
    ip_batch(ns, FOREIGN_IP.splitlines() + lines, workdir)
    if rules:
        run(["ip", "-n", ns, "-6", "rule", "add", "priority", "220", "table", "220"])
    fw = "*filter\n" + "\n".join(updown_rules(firewall)) + "\nCOMMIT\n"
    run(["ip", "netns", "exec", ns, "iptables-nft-restore", "--noflush"], FOREIGN_FW + fw)


def supervisor_config(mode: str) -> dict:
    return {"recovery": {"mode": mode, "adopt_grace": "1h", "timeout": "5m"},
            "snapshots": {"keep": 3},
            "health": {"enabled": False},
            "restart": {"okay_delay": "100ms", "backoff": {"reset_after": "1s"}, "crash_loop": {"max_deaths": 0}}}


def wait(pred, timeout: float, what: str, poll: float = 0.01):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got = pred()
        except Exception:  # noqa: BLE001 - control socket busy or not there yet
            got = None
        if got:
            return got
        time.sleep(poll)
    raise SystemExit(f"bench_crash: timed out waiting for {what}")


def kill_once(sup, check_snapshot: bool) -> dict:
    st = sup.status()
    old, restarts = st["daemon"]["pid"], st["restarts"]
    t0 = time.monotonic()
    os.kill(old, signal.SIGKILL)
    # The times come from the supervisor's own stamps (CLOCK_MONOTONIC), not from when a poll sees
    # them: polling its status every 10 ms would only compete with the recovery for the GIL.
    spawned = wait(lambda: (lambda s: s if s["daemon"]["pid"] not in (None, old) else None)(sup.status()),
                   60, "the new charon's spawn", poll=POLL)
    spawn = spawned["daemon"]["started_at_monotonic"] - t0
    st = wait(lambda: (lambda s: s if s["restarts"] > restarts and s["state"] == "running" and
                       ((s["recovery"] or {}).get("last") or {}).get("at_monotonic", {}).get("snapshot_written")
                       else None)(sup.status()), 120, "charon running and the snapshot written", poll=POLL)
    last = st["recovery"]["last"]
    at = last["at_monotonic"]
    out = {"spawn": spawn, "read": at["read"] - t0, "began": at["began"] - t0, "read_began": at["read_began"] - t0, "written": at["snapshot_written"] - t0,
           "flushed": at["flushed"] - t0 if "flushed" in at else None,
           "flush_phases": {k: round(at[k] - t0, 3) for k in ("began", "read", "decoded", "planned", "flushed")
                            if k in at}, "leftovers": last.get("leftover_total"),
           "snapshot": last.get("snapshot"), "cpu": last.get("cpu_before_restart_s"),
           "process_cpu": last.get("process_cpu_before_restart_s")}
    if check_snapshot and last.get("snapshot"):
        snap = load_snapshot(last["snapshot"])
        out["snapshot_counts"] = snap.counts()
        out["deferred"] = snap.context.get("deferred")
    return out


def run_target(label: str, tunnels: int, firewall: int, kills: int, pause: float, work: str,
               foreign_after: bool = False) -> list[dict]:
    ns = f"ipsvc-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    d = os.path.join(work, label)
    os.makedirs(d)
    sup = None
    try:
        build(ns, 0 if foreign_after else tunnels, firewall, d)
        sup = start_supervised_charon(ns, d, swanctl_conf=psk_swanctl_conf(CONN), mode="adopt",
                                      supervisor=supervisor_config("adopt"), timeout=300)
        if foreign_after:
            add_state(ns, tunnels, firewall, d, rules=False)
            time.sleep(3)           # the ledger reads the notifications (and resyncs after overruns)
        wait(lambda: sup.status()["state"] == "running", 300, "running")
        out = []
        for i in range(kills):
            time.sleep(pause)
            r = kill_once(sup, check_snapshot=(i == 0))
            out.append(r)
            print(f"  {label:8} kill {i + 1:2}: spawn {r['spawn'] * 1000:7.1f} ms (read done "
                  f"{r['read'] * 1000:6.1f} ms, began {r['began'] * 1000:6.1f}, read began {r['read_began'] * 1000:6.1f}, "
                  f"CPU {r['cpu']} s), snapshot on disk "
                  f"{r['written'] * 1000:7.1f} ms, leftovers {r['leftovers']}", flush=True)
            if "snapshot_counts" in r:
                print(f"    snapshot: {r['snapshot_counts']}, deferred={r['deferred']}")
        sup.stop(120)
        return out
    finally:
        if sup is not None:
            sup.cleanup()
        remove(ns)


def flush_once(tunnels: int, firewall: int, work: str, i: int) -> dict:
    ns = f"ipsvf-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    d = os.path.join(work, f"flush{i}")
    os.makedirs(d)
    sup = None
    try:
        build(ns, tunnels, firewall, d)
        cfg = supervisor_config("keep")
        sup = start_supervised_charon(ns, d, swanctl_conf=psk_swanctl_conf(CONN), mode="keep", supervisor=cfg,
                                      timeout=300)
        # keep at the start: the leftovers stay charon's, and no adoption runs (as in flush mode);
        # then flush for the next crash (recovery.* applies at once)
        cfg = {**sup.config, "recovery": {**sup.config["recovery"], "mode": "flush"}}
        with open(sup.config_path, "w") as fh:
            yaml.safe_dump(cfg, fh)
        os.kill(sup.proc.pid, signal.SIGHUP)
        time.sleep(5.0)                 # the ledger saves of the start are done
        r = kill_once(sup, check_snapshot=False)
        print(f"  flush {i + 1}: kill to (s) {r['flush_phases']}; CPU before the restart: recovery thread "
              f"{r['cpu']} s, whole supervisor {r['process_cpu']} s", flush=True)
        from supervisor.kernel import netns as _netns
        from supervisor.kernel_state import ReadOptions, read_state
        from supervisor.ownership import is_supervisor_block
        with _netns.enter(ns):
            after = read_state(ReadOptions())
        pols = after.objects["xfrm_policy"]
        r["left_policies"] = sum(1 for p in pols if not is_supervisor_block(p))
        r["left_routes"] = len(after.objects["route"])
        sup.stop(120)
        return r
    finally:
        if sup is not None:
            sup.cleanup()
        remove(ns)


def ms(values: list[float]) -> str:
    v = sorted(x * 1000 for x in values)
    p90 = v[min(len(v) - 1, int(round(0.9 * (len(v) - 1))))]
    return f"median {statistics.median(v):7.1f} ms  p90 {p90:7.1f}  min {v[0]:7.1f}  max {v[-1]:7.1f}  (n={len(v)})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tunnels", type=int, default=10000)
    ap.add_argument("--firewall", type=int, default=100, help="tunnels with updown rules, 2 each (default 100)")
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--flush-kills", type=int, default=3)
    ap.add_argument("--pause", type=float, default=1.5, help="seconds between kills (default 1.5)")
    ap.add_argument("--targets", default="baseline,owned,foreign", help="which (default: all three)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_crash: needs root (network namespaces)", file=sys.stderr)
        return 4
    with tempfile.TemporaryDirectory(prefix="ipsv-crash-") as work:
        print(f"kill -9 of charon to the new charon's spawn, adopt mode, {args.kills} kills per target; "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
        targets = args.targets.split(",")
        res = {"baseline": run_target("baseline", 0, 0, args.kills, args.pause, work)} if args.kills else {}
        if "owned" in targets:
            res["owned"] = run_target("owned", args.tunnels, args.firewall, args.kills, args.pause, work)
        if "foreign" in targets:
            res["foreign"] = run_target("foreign", args.tunnels, args.firewall, args.kills, args.pause, work,
                                        foreign_after=True)
        flushes = [flush_once(args.tunnels, args.firewall, work, i) for i in range(args.flush_kills)]
    base = statistics.median(r["spawn"] for r in res["baseline"]) if res else 1.0
    print(f"\n{args.tunnels} tunnels: {3 * args.tunnels} policies, {args.tunnels} table-220 routes, rule 220 (v4, v6), "
          f"{2 * args.firewall} updown rules, plus foreign state")
    print("kill -9 -> new charon spawned (goal <= 300 ms):")
    for label, rs in res.items():
        ratio = statistics.median(r["spawn"] for r in rs) / base
        print(f"  {label:8} {ms([r['spawn'] for r in rs])}  ratio to baseline {ratio:5.1f}")
    print("kill -9 -> kernel read done / snapshot of the crash on disk (written after the spawn):")
    for label, rs in res.items():
        print(f"  {label:8} read     {ms([r['read'] for r in rs])}")
        print(f"  {label:8} snapshot {ms([r['written'] for r in rs])}")
    if flushes:
        print("flush mode, kill -9 -> flush done (goal <= 2 s, fail-closed blocks first):")
        print(f"  {ms([r['flushed'] for r in flushes])}")
        print(f"  spawn {ms([r['spawn'] for r in flushes])}")
        left = [(r["left_policies"], r["left_routes"]) for r in flushes]
        print(f"  left after each flush (policies besides blocks, routes in table 220; foreign only): {left}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
