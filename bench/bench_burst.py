#!/usr/bin/env python3
"""Ownership under a burst: 1,000 children trap-installed at once while the ledger watches.

Run as root: ``.venv/bin/python bench/bench_burst.py [--conns 1000] [--tunnels 10000]``.

Real charon under ``ipsec-supervisor run`` in a namespace of its own. charon loads --conns
connections (one child each, start_action trap, distinct subnets): 3 trap policies each,
installed within seconds of the load. Printed:
- how long the burst took (load start to the last trap policy in the kernel);
- attribution: every charon policy in the kernel looked up in the supervisor's ledger
  (``daemon``, by netlink port id); those the ledger does not know fall back to the markers,
  counted with the reason (lost notifications: the family was re-read after an overrun);
- monitor overruns and re-reads (the supervisor's status), and that none stays stale;
- the supervisor's RSS and CPU: after the burst, then with --tunnels tunnels' worth of state
  (3 policies + 1 route each, added by iproute2: the ledger holds them all), after a kill -9 of
  charon with that state (snapshot, baseline: RSS 3 s after the snapshot is written, and the peak
  since the kill; CPU and wall time of that work), and CPU over --idle seconds afterwards.
Baseline of the same run: ``ip xfrm policy`` listing the same policies (a process), and the
supervisor's RSS with nothing but charon's one-connection lab.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import psutil  # noqa: E402
import yaml  # noqa: E402

from bench_flush import SETUP, charon_lines, ip_batch, remove, run  # noqa: E402
from charon_ns import start_supervised_charon, trap_conns_conf  # noqa: E402
from supervisor.kernel import netns as _netns  # noqa: E402
from supervisor.kernel_state import ReadOptions, read_state  # noqa: E402
from supervisor.ledger import OWNER_DAEMON, ledger_path, load_ledger  # noqa: E402


def trap_policies(ns: str) -> list:
    with _netns.enter(ns):
        pols = read_state(ReadOptions(), families=["xfrm_policy"]).objects["xfrm_policy"]
    return [p for p in pols if not p.per_socket and p.selector.daddr.startswith("172.20.")
            or p.selector.saddr.startswith("172.20.")]


def rss_mb(pid: int) -> tuple[float, float]:
    with open(f"/proc/{pid}/status") as fh:
        fields = dict(line.split(":", 1) for line in fh)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def ledger_entries(sup) -> int:
    return sum(len(t) for t in load_ledger(ledger_path(sup.p("run"))).entries.values())


def reset_peak(pid: int) -> None:
    """Start VmHWM afresh at the current RSS (proc(5) clear_refs): the crash's own peak, not the burst's."""
    with open(f"/proc/{pid}/clear_refs", "w") as fh:
        fh.write("5")


def cpu_s(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def wait_for(pred, timeout: float, what: str, poll: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got = pred()
        except Exception:  # noqa: BLE001
            got = None
        if got:
            return got
        time.sleep(poll)
    raise SystemExit(f"bench_burst: timed out waiting for {what}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conns", type=int, default=1000)
    ap.add_argument("--tunnels", type=int, default=10000, help="state held afterwards (default 10000)")
    ap.add_argument("--idle", type=float, default=30.0, help="idle CPU window, seconds (default 30)")
    ap.add_argument("--log", help="copy the supervisor's log here")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_burst: needs root (network namespaces)", file=sys.stderr)
        return 4
    ns = f"ipsvb-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    sup = None
    with tempfile.TemporaryDirectory(prefix="ipsv-burst-") as work:
        try:
            run(["ip", "netns", "add", ns])
            ip_batch(ns, SETUP.splitlines(), work)
            t0 = time.monotonic()
            conf = trap_conns_conf(args.conns, lambda i: f"172.20.{i >> 8}.{i & 255}/32", local_ts="10.0.0.0/8",
                                   local="198.51.100.1", remote="198.51.100.2")
            sup = start_supervised_charon(ns, work, swanctl_conf=conf, mode="adopt",
                                          supervisor={"health": {"enabled": False},
                                                      "snapshots": {"keep": 2},
                                                      "daemon": {"load_timeout": "5m"},
                                                      "recovery": {"adopt_grace": "20s"}}, timeout=600)
            ready = time.monotonic()
            spid = sup.proc.pid
            want = 2 * args.conns           # trap: out and in (fwd only on a gateway's fwd path)
            traps = wait_for(lambda: (lambda t: t if len(t) >= want else None)(trap_policies(ns)), 300,
                             f"{want} trap policies")
            burst = time.monotonic()
            time.sleep(2.0)                 # the ledger reads what is queued, re-reads after overruns
            st = wait_for(lambda: (lambda s: s if not s["recovery"]["ledger"]["stale"] else None)(sup.status()),
                          60, "a ledger with no stale family")
            ledger = load_ledger(ledger_path(sup.p("run")))
            traps = trap_policies(ns)
            attributed = fallback = 0
            for p in traps:
                e = ledger.lookup(p)
                if e is not None and e.owner == OWNER_DAEMON and e.how == "added":
                    attributed += 1
                else:
                    fallback += 1
            mon = st["recovery"]["monitor"]
            rss_burst = rss_mb(spid)
            t_ip = time.monotonic()
            subprocess.run(["ip", "-n", ns, "xfrm", "policy"], capture_output=True, check=True)
            t_ip = time.monotonic() - t_ip
            print(f"{args.conns} connections, start_action trap: {len(traps)} trap policies")
            print(f"  supervisor start to charon ready with all conns loaded: {ready - t0:6.2f} s; "
                  f"to the last trap policy seen: {burst - t0:6.2f} s")
            print(f"  attributed by the ledger (daemon, netlink port id): {attributed}; fell back to the "
                  f"markers: {fallback}" + (" (notifications lost in an overrun: re-read, unknown to the "
                                             "ledger)" if fallback else ""))
            print(f"  monitor overruns: {mon['overruns'] or 'none'}; re-reads after them: {mon['resyncs']}; "
                  f"stale families now: {st['recovery']['ledger']['stale'] or 'none'}")
            print(f"  supervisor RSS {rss_burst[0]:.1f} MB (peak {rss_burst[1]:.1f} MB); "
                  f"`ip xfrm policy` listing the same: {t_ip * 1000:.0f} ms")
            # 10k tunnels' worth of state in the ledger, then a crash with it
            ip_batch(ns, charon_lines(args.tunnels)[:-1], work)
            time.sleep(3.0)
            st = wait_for(lambda: (lambda s: s if not s["recovery"]["ledger"]["stale"] else None)(sup.status()),
                          120, "the ledger caught up")
            rss_state = rss_mb(spid)
            entries_state = ledger_entries(sup)
            c0 = cpu_s(spid)
            time.sleep(args.idle)
            idle_state = cpu_s(spid) - c0
            # keep mode for the crash: adoption planning with 1,000 configured children is goal 3's
            # (adopt.plan_adopt is not linear); this measures the crash's own memory
            cfg = {**sup.config, "recovery": {**sup.config.get("recovery", {}), "mode": "keep"}}
            with open(sup.config_path, "w") as fh:
                yaml.safe_dump(cfg, fh)
            os.kill(spid, signal.SIGHUP)
            time.sleep(2.0)
            old = st["daemon"]["pid"]
            rss_before = rss_mb(spid)
            reset_peak(spid)
            c_kill = cpu_s(spid)
            os.kill(old, signal.SIGKILL)
            last = wait_for(lambda: (lambda s: s["recovery"]["last"] if s["state"] == "running" and
                                     s["daemon"]["pid"] != old and
                                     ((s["recovery"]["last"] or {}).get("at_monotonic") or {}).get("snapshot_written")
                                     else None)(sup.status()), 300, "charon back and the snapshot written")
            crash_cpu = cpu_s(spid) - c_kill       # (includes the status polls, a few ms)
            at = last["at_monotonic"]
            time.sleep(3.0)
            rss_crash = rss_mb(spid)
            entries_crash = ledger_entries(sup)
            c0 = cpu_s(spid)
            time.sleep(args.idle)
            idle = cpu_s(spid) - c0
            mon = sup.status()["recovery"]["monitor"]
            print(f"with {args.tunnels} tunnels' state more ({3 * args.tunnels} policies, foreign by the ledger):")
            print(f"  supervisor RSS {rss_state[0]:.1f} MB (peak so far {rss_before[1]:.1f} MB); after a kill -9 of charon "
                  f"(keep mode: snapshot, baseline), 3 s after the snapshot is written: {rss_crash[0]:.1f} MB, "
                  f"the crash's own peak {rss_crash[1]:.1f} MB  (goal <= 80 MB after the crash: "
                  f"{'met' if rss_crash[0] <= 80 else 'NOT met'}; README: 66-74 MB, peak 76-90 MB)")
            print(f"  ledger entries (its file): {entries_state} before the kill, {entries_crash} after (what was added "
                  "while notifications were lost is unknown to the ledger until the next baseline)")
            print(f"  the crash's work, kill to snapshot written: {at['snapshot_written'] - at['died']:.2f} s, "
                  f"supervisor CPU {crash_cpu:.2f} s")
            print(f"  idle with that state, before the kill: {idle_state:.2f} s CPU over {args.idle:.0f} s")
            print(f"  idle after the kill (keep mode): {idle:.2f} s CPU over {args.idle:.0f} s ({100 * idle / args.idle:.2f}%); "
                  f"monitor overruns {mon['overruns'] or 'none'}, re-reads {mon['resyncs']}")
            sup.stop(300)
        finally:
            if args.log:
                with open(args.log, "w") as fh:
                    fh.write(sup.log() if sup is not None else "")
            if sup is not None:
                sup.cleanup()
            remove(ns)
    return 0


if __name__ == "__main__":
    sys.exit(main())
