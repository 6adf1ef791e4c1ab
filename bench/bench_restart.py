#!/usr/bin/env python3
"""Restart benchmark: kill -9 charon, time until it answers VICI with its configuration loaded.

Runs, in the same invocation and on the same machine, charon under ipsec-supervisor and under
strongSwan's own starter (`/usr/lib/ipsec/starter --nofork`), each in a fresh network namespace
with a private /run.  Both are timed by the same external probe (VICI `list-conns` over charon's
socket until the test connection is there, polled every --poll-ms).  Prints the ratio
supervisor/starter, the supervisor's detection latency (kill to pidfd wake-up, both on
CLOCK_MONOTONIC) and the idle supervisor's CPU time and RSS over --idle-seconds.

Usage (root, from the repo): .venv/bin/python bench/bench_restart.py [--runs 5] [--idle-seconds 60]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

import psutil
import vici
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from supervisor import control  # noqa: E402
from supervisor.errors import SupervisorError  # noqa: E402

CONN = "bench-conn"
SWANCTL_CONF = f"""\
connections {{
  {CONN} {{
    remote_addrs = 192.0.2.2
    local {{ auth = psk
            id = moon }}
    remote {{ auth = psk
             id = sun }}
    children {{ net {{ remote_ts = 10.1.0.0/16 }} }}
  }}
}}
secrets {{ ike-sun {{ id = sun
                    secret = 0sFpZAZqEN6Ti9sqt4ZP5EWcqx }} }}
"""
IPSEC_CONF = f"""\
config setup
conn {CONN}
    right=192.0.2.2
    rightsubnet=10.1.0.0/16
    leftid=moon
    rightid=sun
    authby=secret
    auto=add
"""
IPSEC_SECRETS = 'moon sun : PSK "bench-secret"\n'


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=check, capture_output=True, text=True)


class Namespace:
    def __init__(self):
        self.name = f"ipsvb-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        sh("ip", "netns", "add", self.name)
        sh("ip", "netns", "exec", self.name, "ip", "link", "set", "lo", "up")

    def kill_all(self) -> None:
        for pid in sh("ip", "netns", "pids", self.name, check=False).stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass

    def remove(self) -> None:
        self.kill_all()
        sh("ip", "netns", "del", self.name, check=False)


def no_cores():
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


class Target:
    """A process tree in its own netns + private /run that runs charon."""

    label = "?"

    def __init__(self, workdir: str, poll: float):
        self.dir = workdir
        self.poll = poll
        self.ns = Namespace()
        self.proc: subprocess.Popen | None = None
        self.log = open(os.path.join(workdir, f"{self.label}.log"), "w")

    def spawn(self, script: str) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "JOURNAL_STREAM")}
        self.proc = subprocess.Popen(["ip", "netns", "exec", self.ns.name, "unshare", "-m", "--propagation", "private",
                                      "sh", "-c", "mount -t tmpfs tmpfs /run && " + script],
                                     cwd=ROOT, env=env, stdout=self.log, stderr=self.log, preexec_fn=no_cores)

    @property
    def run(self) -> str:
        return f"/proc/{self.proc.pid}/root/run"

    def charon_pid(self) -> int | None:
        try:
            with open(os.path.join(self.run, "charon.pid")) as fh:
                return int(fh.read().strip())
        except (OSError, ValueError):
            return None

    def conn_loaded(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(1.0)
                s.connect(os.path.join(self.run, "charon.vici"))
                return any(CONN in c for c in vici.Session(s).list_conns())
        except (OSError, vici.exception.SessionException, Exception):
            return False

    def wait_loaded(self, old_pid: int | None, timeout: float = 30.0) -> float:
        """Poll until a charon other than ``old_pid`` has the connection loaded; returns the time."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid = self.charon_pid()
            if pid and pid != old_pid and psutil.pid_exists(pid) and self.conn_loaded():
                return time.monotonic()
            time.sleep(self.poll)
        raise RuntimeError(f"{self.label}: charon not back with {CONN} loaded within {timeout}s "
                           f"(log: {self.log.name})")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.ns.remove()
        self.log.close()


class SupervisorTarget(Target):
    label = "supervisor"
    metrics = False         # --metrics: with metrics.listen and metrics.textfile on (nobody scrapes)

    def start(self) -> None:
        conf = os.path.join(self.dir, "swanctl.conf")
        with open(conf, "w") as fh:
            fh.write(SWANCTL_CONF)
        cfg = {
            "daemon": {"load_commands": [["/usr/sbin/swanctl", "--load-all", "--noprompt", "--file", conf]]},
            # Each kill below should be what it is in production: the first crash after a stable
            # run (restart at once).  A short reset_after plus a pause between kills gets there.
            "restart": {"okay_delay": "200ms", "backoff": {"reset_after": "1s"}, "crash_loop": {"max_deaths": 0}},
            "paths": {"run_dir": os.path.join(self.dir, "run"), "state_dir": os.path.join(self.dir, "state")},
        }
        if self.metrics:
            cfg["metrics"] = {"listen": "127.0.0.1:9089", "textfile": os.path.join(self.dir, "ipsec-supervisor.prom")}
        path = os.path.join(self.dir, "supervisor.yaml")
        with open(path, "w") as fh:
            yaml.safe_dump(cfg, fh)
        self.run_dir = cfg["paths"]["run_dir"]
        self.spawn(f"exec {sys.executable} -m supervisor.cli run --config {path}")
        self.wait_loaded(None)
        self.wait_state("running")

    def status(self) -> dict:
        return control.request(self.run_dir, "status", timeout=3)["status"]

    def wait_state(self, state: str, timeout: float = 20) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                st = self.status()
                if st["state"] == state:
                    return st
            except SupervisorError:
                pass
            time.sleep(0.02)
        raise RuntimeError(f"supervisor not {state} within {timeout}s (log: {self.log.name})")


class StarterTarget(Target):
    label = "starter"

    def start(self) -> None:
        conf = os.path.join(self.dir, "ipsec.conf")
        secrets = os.path.join(self.dir, "ipsec.secrets")
        with open(conf, "w") as fh:
            fh.write(IPSEC_CONF)
        with open(secrets, "w") as fh:
            fh.write(IPSEC_SECRETS)
        os.chmod(secrets, 0o600)
        self.spawn(f"mount --bind {conf} /etc/ipsec.conf && mount --bind {secrets} /etc/ipsec.secrets && "
                   f"exec /usr/lib/ipsec/starter --nofork")
        self.wait_loaded(None)


def measure_restarts(target: Target, runs: int, pause: float) -> tuple[list[float], list[float]]:
    """(kill -> loaded again, kill -> death noticed [supervisor only]) per run, seconds."""
    back, detect = [], []
    for _ in range(runs):
        time.sleep(pause)
        pid = target.charon_pid()
        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        t1 = target.wait_loaded(pid)
        back.append(t1 - t0)
        if isinstance(target, SupervisorTarget):
            st = target.wait_state("running")
            detect.append(st["last_exit"]["died_at_monotonic"] - t0)
    return back, detect


def measure_idle(target: SupervisorTarget, seconds: float) -> dict:
    p = psutil.Process(target.proc.pid)
    target.wait_state("running")
    time.sleep(1.0)  # let start-up work settle
    c0, t0 = p.cpu_times(), time.monotonic()
    time.sleep(seconds)
    c1, t1 = p.cpu_times(), time.monotonic()
    cpu = (c1.user - c0.user) + (c1.system - c0.system)
    mem = p.memory_info()
    return {"window_s": round(t1 - t0, 1), "cpu_s": round(cpu, 4), "cpu_percent": round(100 * cpu / (t1 - t0), 4),
            "rss_mb": round(mem.rss / 2**20, 1), "threads": p.num_threads()}


def rss_of_imports(modules: str) -> float:
    """RSS (MB) of a fresh interpreter after importing ``modules``: what each layer costs."""
    code = (f"import {modules}\n" if modules else "") + \
        "print(int(open('/proc/self/status').read().split('VmRSS:')[1].split()[0]))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return round(int(out.stdout) / 1024, 1)


def fmt_ms(values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return f"median {statistics.median(ms):8.1f} ms  (min {min(ms):.1f}, max {max(ms):.1f}, n={len(ms)})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="kills per target (default 5)")
    ap.add_argument("--idle-seconds", type=float, default=60.0, help="idle CPU/RSS window (default 60)")
    ap.add_argument("--poll-ms", type=float, default=5.0, help="external probe interval (default 5 ms)")
    ap.add_argument("--pause", type=float, default=1.5, help="seconds between kills (default 1.5)")
    ap.add_argument("--skip-starter", action="store_true", help="only the supervisor (no ratio)")
    ap.add_argument("--json", action="store_true", help="also print the results as JSON")
    ap.add_argument("--metrics", action="store_true", help="the supervisor with metrics.listen and .textfile on")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_restart: needs root (network namespaces)", file=sys.stderr)
        return 4

    work = tempfile.mkdtemp(prefix="ipsv-bench-")
    results: dict = {}
    targets: list[Target] = []
    try:
        SupervisorTarget.metrics = args.metrics
        sup = SupervisorTarget(work, args.poll_ms / 1000)
        targets.append(sup)
        sup.start()
        back, detect = measure_restarts(sup, args.runs, args.pause)
        results["supervisor"] = {"kill_to_loaded_s": back, "detection_s": detect}
        if args.idle_seconds > 0:
            results["idle"] = measure_idle(sup, args.idle_seconds)
            results["idle"]["rss_breakdown_mb"] = {
                "python alone": rss_of_imports(""),
                "+ supervisor.starter (the supervisor itself)": rss_of_imports("supervisor.starter"),
                "+ every CLI command module (what `run` loads today)":
                    rss_of_imports("supervisor.cli, supervisor.starter; supervisor.cli.build_parser()"),
            }
        sup.stop()
        if not args.skip_starter:
            st = StarterTarget(work, args.poll_ms / 1000)
            targets.append(st)
            st.start()
            back_st, _ = measure_restarts(st, args.runs, args.pause)
            results["starter"] = {"kill_to_loaded_s": back_st}
            st.stop()
    finally:
        for t in targets:
            try:
                t.stop()
            except Exception:
                pass
        shutil.rmtree(work, ignore_errors=True)

    print("kill -9 charon -> charon answers VICI with the connection loaded (same probe for both):")
    print(f"  ipsec-supervisor : {fmt_ms(results['supervisor']['kill_to_loaded_s'])}")
    if "starter" in results:
        print(f"  strongSwan starter: {fmt_ms(results['starter']['kill_to_loaded_s'])}")
        ratio = statistics.median(results["supervisor"]["kill_to_loaded_s"]) / \
            statistics.median(results["starter"]["kill_to_loaded_s"])
        results["ratio_supervisor_to_starter"] = ratio
        print(f"  ratio supervisor/starter: {ratio:.3f}  (goal <= 0.2)")
    print(f"detection latency (kill -> pidfd wake-up): {fmt_ms(results['supervisor']['detection_s'])}  (goal < 10 ms)")
    if "idle" in results:
        i = results["idle"]
        print(f"idle supervisor over {i['window_s']}s: {i['cpu_s']} s CPU ({i['cpu_percent']}%), "
              f"RSS {i['rss_mb']} MB, {i['threads']} threads  (goal: no measurable CPU, < 40 MB)")
        for what, mb in i["rss_breakdown_mb"].items():
            print(f"  RSS {what}: {mb} MB")
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
