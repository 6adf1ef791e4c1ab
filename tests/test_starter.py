"""The supervisor with real processes: the fake IKE daemon (tests/fake_ikd.py) under `ipsec-supervisor run`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time

import pytest
import yaml

from charon_ns import wait_for_status
from supervisor import control, crashreport
from supervisor.config import parse_config
from supervisor.errors import ExitCode, SupervisorError
from supervisor.notify import Notifier, configure_logging, journal_stream_matches
from supervisor.policy import Action, Cause, ExitClass
from supervisor.starter import Supervisor
from waiting import wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAKE = os.path.join(ROOT, "tests", "fake_ikd.py")
DNAME = os.path.basename(sys.executable)   # how the supervisor names the fake daemon in logs


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class Harness:
    """One supervisor process supervising the fake daemon, all files in a short temp dir."""

    def __init__(self, runs: list[dict], overrides: dict | None = None):
        # Short paths: AF_UNIX socket paths are limited to 108 bytes.
        self.dir = tempfile.mkdtemp(prefix="ipsv-")
        self.p = lambda name: os.path.join(self.dir, name)
        with open(self.p("plan.json"), "w") as fh:
            json.dump({"runs": runs}, fh)
        self.config_path = self.p("supervisor.yaml")
        self.write_config(overrides or {})
        self.proc: subprocess.Popen | None = None
        self.stderr = None

    def base_config(self) -> dict:
        return {
            "daemon": {
                "command": [sys.executable, FAKE, "--pid-file", self.p("fake.pid"), "--vici", self.p("fake.vici"),
                            "--plan", self.p("plan.json"), "--counter", self.p("counter"),
                            "--events", self.p("events.jsonl")],
                "pid_file": self.p("fake.pid"),
                "vici_socket": self.p("fake.vici"),
                "start_timeout": "3s",
                "load_commands": [["/bin/sh", "-c", f"echo loaded >> {self.p('loads')}"]],
                "load_timeout": "5s",
            },
            "restart": {"okay_delay": "100ms",
                        "backoff": {"initial": 0, "step": "100ms", "maximum": "1s", "jitter": 0},
                        "crash_loop": {"max_deaths": 5, "window": "60s"}},
            "health": {"interval": "200ms", "timeout": "150ms", "failures": 2, "abort_timeout": "1s"},
            "stop": {"timeout": "2s"},
            "paths": {"run_dir": self.p("run"), "state_dir": self.p("state")},
        }

    def write_config(self, overrides: dict, raw: str | None = None) -> None:
        with open(self.config_path, "w") as fh:
            fh.write(raw if raw is not None else yaml.safe_dump(deep_merge(self.base_config(), overrides)))

    def start(self, env: dict | None = None, preexec=None) -> "Harness":
        self.stderr = open(self.p("supervisor.log"), "w+")
        e = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "JOURNAL_STREAM")}
        e.update(env or {})
        self.proc = subprocess.Popen([sys.executable, "-m", "supervisor.cli", "run", "--config", self.config_path],
                                     cwd=ROOT, env=e, stdout=self.stderr, stderr=self.stderr, preexec_fn=preexec)
        return self

    @property
    def run_dir(self) -> str:
        return self.p("run")

    def status(self) -> dict:
        return control.request(self.run_dir, "status", timeout=2)["status"]

    def wait(self, pred, timeout: float = 10.0, what: str = "condition") -> dict:
        return wait_for_status(self.status, self.proc, pred, timeout, what, self.log, poll=0.02)

    def wait_running(self, restarts: int | None = None, timeout: float = 10.0) -> dict:
        return self.wait(lambda s: s["state"] == "running" and (restarts is None or s["restarts"] == restarts),
                         timeout, f"running with restarts={restarts}")

    def events(self, kind: str | None = None) -> list[dict]:
        try:
            with open(self.p("events.jsonl")) as fh:
                evs = [json.loads(line) for line in fh if line.strip()]
        except FileNotFoundError:
            return []
        return [e for e in evs if kind is None or e["event"] == kind]

    def send(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"supervisor did not exit:\n{self.log()}") from None

    def wait_file(self, path: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        # PATH must appear whole (its writer renames it into place): a file that exists may
        # still be empty, and no sleep after seeing it is long enough on a loaded machine.
        while not os.path.exists(path):
            if time.monotonic() > deadline:
                raise AssertionError(f"{path} did not appear:\n{self.log()}")
            time.sleep(0.02)
        return path

    def log(self) -> str:
        try:
            with open(self.p("supervisor.log")) as fh:
                return fh.read()
        except FileNotFoundError:
            return ""

    def reports(self, wait_for: int = 0, timeout: float = 10.0) -> list[dict]:
        """The crash reports, after waiting until at least ``wait_for`` exist (they are written async)."""
        deadline = time.monotonic() + timeout
        while True:
            found = [r for _, r in crashreport.read_crash_reports(os.path.join(self.p("state"), "crashes"))]
            if len(found) >= wait_for or time.monotonic() > deadline:
                return found
            time.sleep(0.02)

    def cleanup(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for e in self.events("start"):
            # Only a fake that still runs from this harness: a dead one's pid may belong to anyone now.
            try:
                with open(f"/proc/{e['pid']}/cmdline", "rb") as fh:
                    cmdline = fh.read()
                if FAKE.encode() in cmdline and self.dir.encode() in cmdline:
                    os.kill(e["pid"], signal.SIGKILL)
            except (FileNotFoundError, ProcessLookupError):
                pass
        if self.stderr:
            self.stderr.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def harness():
    made: list[Harness] = []

    def make(runs=None, overrides=None) -> Harness:
        h = Harness(runs or [{}], overrides)
        made.append(h)
        return h

    yield make
    for h in made:
        h.cleanup()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# -- starting -------------------------------------------------------------------------------

def test_starts_the_daemon_loads_its_configuration_and_reports_ready(harness):
    h = harness([{"lines": ["hello from the fake"], "stderr_lines": ["a warning on stderr"]}]).start()
    st = h.wait_running()
    start = h.events("start")[0]
    assert st["daemon"]["pid"] == start["pid"]
    assert st["daemon"]["ready"] and st["daemon"]["load_ok"] is True
    assert open(h.p("loads")).read() == "loaded\n"
    assert st["restarts"] == 0 and st["last_exit"] is None
    log = h.log()
    assert f"{DNAME}[{start['pid']}]: hello from the fake" in log          # stdout, line by line
    assert f"{DNAME}[{start['pid']}]: a warning on stderr" in log          # and stderr
    assert "load: running /bin/sh -c echo loaded" in log
    for line in ("state stopped -> preparing", "state preparing -> starting", "state starting -> loading",
                 "state loading -> settling", "state settling -> running"):
        assert log.count(line) == 1, line                                  # each transition logged once
    h.send(signal.SIGTERM)
    assert h.wait_exit() == 0
    assert not _alive(start["pid"])


def test_daemon_runs_in_its_own_session_with_fds_closed_and_signals_cleared(harness):
    h = harness()
    cmd = h.base_config()["daemon"]["command"]
    probe = h.p("sig.txt")
    wrapped = ["/bin/sh", "-c", f'grep -E "^Sig(Blk|Ign)" /proc/self/status > {probe}; exec "$@"', "sh"] + cmd
    h.write_config({"daemon": {"command": wrapped, "environment": {"FAKE_IKD_MARK": "marked"}}})
    # The supervisor itself starts with a blocked signal and an extra inherited fd.
    extra_r, extra_w = os.pipe()
    os.set_inheritable(extra_r, True)

    def preexec():
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2, signal.SIGHUP})
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)   # would let the kernel reap the daemon
        signal.signal(signal.SIGQUIT, signal.SIG_IGN)   # as in a script's background job: not charon's
    try:
        h.proc = None
        h.stderr = open(h.p("supervisor.log"), "w+")
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET",)}
        env.update({"NOTIFY_SOCKET": h.p("no-such-notify-socket"), "JOURNAL_STREAM": "1:2"})
        h.proc = subprocess.Popen([sys.executable, "-m", "supervisor.cli", "run", "--config", h.config_path], cwd=ROOT,
                                  env=env, stdout=h.stderr, stderr=h.stderr, preexec_fn=preexec, close_fds=False)
    finally:
        os.close(extra_r)
        os.close(extra_w)
    h.wait_running()
    start = h.events("start")[0]
    assert start["sid"] == start["pid"] == start["pgid"]          # own session and process group
    assert start["inherited_fds"] == []                            # nothing but 0, 1, 2
    assert start["sigblk"] == "0000000000000000"                   # signal mask cleared
    assert start["cwd"] == "/"
    assert start["notify_socket"] is None                          # systemd's socket is ours alone
    assert start["extra_env"] == "marked"                          # daemon.environment applies
    sig = dict(line.split(":\t") for line in open(probe).read().splitlines())
    assert sig["SigBlk"] == "0000000000000000"
    # Standard signals (1-31) are not ignored.  Signals 32/33 are glibc's reserved ones: an
    # ignored disposition inherited from whoever started the test cannot be reset from Python
    # (signal.signal refuses them), and charon does not use them.
    assert int(sig["SigIgn"], 16) & 0x7FFFFFFF == 0, sig
    os.kill(start["pid"], signal.SIGKILL)       # death still seen, status still known
    st = h.wait_running(restarts=1)
    assert st["last_exit"]["signal"] == "SIGKILL"


@pytest.mark.parametrize("output, kept", [("pty", True), ("pipe", False)])
def test_pty_output_keeps_the_last_lines_of_a_block_buffering_daemon(harness, output, kept):
    # Python, like charon's stdio logger, block-buffers stdout unless it is a terminal.
    daemon = [sys.executable, "-c", "import os, time; print('last words before the crash'); time.sleep(0.3); "
                                    "os.kill(os.getpid(), 9)"]
    h = harness([{}], {"daemon": {"command": daemon, "pid_file": None, "vici_socket": None, "output": output,
                                  "load_commands": [], "environment": {"PYTHONUNBUFFERED": ""}},
                       "health": {"enabled": False}, "restart": {"policy": "never"}}).start()
    assert h.wait_exit() == ExitCode.FAILED
    [report] = h.reports(wait_for=1)
    assert ("last words before the crash" in report["last_log_lines"]) is kept


def test_stale_pid_file_is_never_taken_for_readiness(harness):
    h = harness([{"pid_file": False}, {}], {"daemon": {"start_timeout": "600ms"}})
    dead = subprocess.Popen(["/bin/true"])
    dead.wait()
    with open(h.p("fake.pid"), "w") as fh:
        fh.write(f"{dead.pid}\n")
    h.start()
    st = h.wait_running(restarts=1)
    assert st["last_exit"]["classification"] == "start-timeout"
    assert "removed stale pid file" in h.log()


# -- dying and restarting ------------------------------------------------------------------

def test_crash_is_restarted_at_once_with_a_crash_report(harness):
    h = harness([{"lines": ["about to crash"], "signal_after": 0.4, "signal": "SIGSEGV"}, {}]).start()
    st = h.wait_running(restarts=1)
    first, second = (e["pid"] for e in h.events("start"))
    assert st["daemon"]["pid"] == second != first
    le = st["last_exit"]
    assert (le["classification"], le["signal"], le["pid"]) == ("killed-by-signal", "SIGSEGV", first)
    assert "restart #1 at once" in le["decision"]
    [report] = h.reports(wait_for=1)
    assert report["classification"] == "killed-by-signal" and report["signal_name"] == "SIGSEGV"
    assert report["core_dumped"] is False and report["daemon"]["pid"] == first
    assert "about to crash" in report["last_log_lines"] and "fake-ikd dying of SIGSEGV" in report["last_log_lines"]
    assert report["timings"]["uptime_s"] > 0.3 and report["decision"]["action"] == "restart"
    path = h.wait(lambda s: s["last_crash_report"], what="report path")["last_crash_report"]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
    assert open(h.p("loads")).read() == "loaded\nloaded\n"   # configuration loaded again after the restart


def test_kill_9_is_noticed_and_the_daemon_is_back(harness):
    h = harness([{}]).start()
    st = h.wait_running()
    pid = st["daemon"]["pid"]
    t_kill = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    st = h.wait_running(restarts=1)
    le = st["last_exit"]
    assert le["pid"] == pid and le["signal"] == "SIGKILL"
    # CLOCK_MONOTONIC is shared between processes: the supervisor saw it die right away.
    assert 0 <= le["died_at_monotonic"] - t_kill < 2.0


def test_backoff_grows_and_status_shows_the_next_restart(harness):
    h = harness([{"exit_after": 0.05, "exit_code": 1}],
                {"restart": {"okay_delay": "1s", "backoff": {"step": "400ms", "maximum": "2s"},
                             "crash_loop": {"max_deaths": 0}}}).start()
    st = h.wait(lambda s: s["state"] == "backoff" and s["backoff"] and s["backoff"]["attempt"] == 3,
                what="third restart in backoff")
    assert st["backoff"]["delay_s"] == pytest.approx(0.8)
    assert 0 < st["next_restart_in_s"] <= 0.8 and st["next_restart_at"]
    assert st["last_exit"]["classification"] == "failure-exit"
    assert st["crash_loop"]["max_deaths"] == 0
    h.send(signal.SIGTERM)
    assert h.wait_exit() == 0      # a stop during backoff: nothing to stop, exit 0


def test_crash_loop_gives_up_runs_hooks_and_exits_9(harness):
    h = harness([{"exit_after": 0.02, "exit_code": 3}])
    hook = ["/bin/sh", "-c", f'env | grep ^IPSEC_SUPERVISOR_ | sort > {h.p("hook")}-$IPSEC_SUPERVISOR_EVENT-$$']
    slow = {"command": ["/bin/sleep", "30"], "timeout": "300ms"}
    h.write_config({"restart": {"crash_loop": {"max_deaths": 3, "window": "1m", "action": "exit"},
                                "backoff": {"step": "50ms"}},
                    "hooks": {"on_crash": [hook, slow], "on_give_up": [hook]}})
    h.start()
    assert h.wait_exit() == ExitCode.GAVE_UP == 9
    assert len(h.events("start")) == 3
    log = h.log()
    assert f"giving up on {DNAME}: 3 deaths within 1m, restart.crash_loop.max_deaths is 3" in log
    assert "hook on_crash: still running after its time limit of 300ms; killing it" in log
    files = sorted(f for f in os.listdir(h.dir) if f.startswith("hook-"))
    assert sum(f.startswith("hook-crash-") for f in files) == 3
    [gave_up] = [f for f in files if f.startswith("hook-give-up-")]
    env = dict(line.split("=", 1) for line in open(h.p(gave_up)).read().splitlines())
    assert env["IPSEC_SUPERVISOR_EVENT"] == "give-up"
    assert env["IPSEC_SUPERVISOR_EXIT_CLASS"] == "failure-exit"
    assert env["IPSEC_SUPERVISOR_EXIT_CODE"] == "3"
    assert env["IPSEC_SUPERVISOR_DECISION"] == "give-up"
    assert env["IPSEC_SUPERVISOR_CRASH_REPORT"].endswith("-failure-exit.json")
    assert len(h.reports()) == 3


def test_give_up_with_action_stay_keeps_serving_and_start_tries_again(harness):
    h = harness([{"exit_after": 0.02, "exit_code": 1}, {"exit_after": 0.02, "exit_code": 1}, {}],
                {"restart": {"crash_loop": {"max_deaths": 2, "action": "stay"}}}).start()
    st = h.wait(lambda s: s["state"] == "gave-up", what="gave-up")
    assert f"gave up on {DNAME}" in st["summary"] and st["daemon"]["pid"] is None
    answer = control.request(h.run_dir, "start")
    assert answer["ok"], answer
    st = h.wait_running()
    assert st["crash_loop"]["deaths_in_window"] == 0      # a manual start begins a new tally
    h.send(signal.SIGINT)
    assert h.wait_exit() == 0


# -- crash-loop cooldown -------------------------------------------------------------------

def _lines_with(log: str, text: str) -> list[str]:
    return [line for line in log.splitlines() if text in line]


def test_crash_loop_cooldown_keeps_serving_status_fail_closed_and_tries_again_after_the_pause(harness):
    h = harness([{"exit_after": 0.02, "exit_code": 1}] * 3 + [{}])
    out = f'{h.p("hook")}-$IPSEC_SUPERVISOR_EVENT'      # renamed into place whole: wait_file may read it at once
    hook = ["/bin/sh", "-c", f'env | grep ^IPSEC_SUPERVISOR_ | sort > {out}.tmp && mv {out}.tmp {out}']
    h.write_config({"restart": {"crash_loop": {"max_deaths": 3, "cooldown": "1500ms", "cooldown_max": "1h"}},
                    "hooks": {"on_give_up": [hook]}})
    h.start()
    st = h.wait(lambda s: s["state"] == "cooldown", what="cooldown")
    entered = time.monotonic()
    assert st["supervisor"]["pid"] == h.proc.pid and st["daemon"]["pid"] is None
    assert st["summary"].startswith("crash loop: 3 deaths in 1m; next try in ")
    # (kernel-state recovery is off for a daemon not named charon: nothing to keep fail-closed)
    assert f"({DNAME} stays stopped, no kernel-state recovery; cooldown #1); last exit: exited with code 1" \
        in st["summary"]
    assert st["crash_loop"]["cooldown"] == {"number": 1, "duration_s": 1.5, "deaths": 3}
    assert 0 < st["next_restart_in_s"] <= 1.5 and st["last_exit"]["decision"].startswith("crash-loop cooldown #1")
    # The dead daemon's pid file and socket are gone (a crashed charon leaves both), ours stay.
    assert not os.path.exists(h.p("fake.pid")) and not os.path.exists(h.p("fake.vici"))
    assert "removed stale " + h.p("fake.vici") + " (nobody listens on it)" in h.log()
    env = dict(line.split("=", 1) for line in open(h.wait_file(h.p("hook-give-up"))).read().splitlines())
    assert (env["IPSEC_SUPERVISOR_DECISION"], env["IPSEC_SUPERVISOR_RESTART_DELAY"]) == ("cooldown", "1.500")
    # reloads while it pauses are answered: the next start loads the current files anyway
    answer = control.request(h.run_dir, "reload-daemon", wait=True)
    assert answer["ok"] and answer.get("deferred") and answer["state"] == "cooldown", answer
    st = h.wait_running(timeout=10)
    waited = time.monotonic() - entered
    assert 1.0 < waited < 3.0, waited                     # after the cooldown, not at once, not much later
    assert len(h.events("start")) == 4 and st["crash_loop"]["cooldowns_in_a_row"] == 1
    assert st["crash_loop"]["deaths_in_window"] == 0      # the retry begins a new crash-loop tally
    log = h.log()
    assert len(_lines_with(log, "state recovering -> cooldown on cool-down")) == 1
    assert len(_lines_with(log, "state cooldown -> preparing on cooldown-elapsed: cooldown of 1.5s over")) == 1
    assert f"crash loop: {DNAME} stays stopped (no kernel-state recovery) for 1.5s, cooldown #1 in a row" in log
    h.send(signal.SIGTERM)
    assert h.wait_exit() == 0


def test_cooldowns_in_a_row_double_and_a_stable_run_resets_them(harness):
    fail = {"exit_after": 0.02, "exit_code": 1}
    h = harness([fail, fail, fail, fail, {}, fail],
                {"restart": {"okay_delay": "50ms", "backoff": {"reset_after": "300ms"},
                             "crash_loop": {"max_deaths": 2, "cooldown": "300ms", "cooldown_max": "500ms"}}}).start()
    st = h.wait_running(timeout=15)                        # 2 deaths, pause 300ms, 2 deaths, pause 500ms (capped)
    assert st["crash_loop"]["cooldowns_in_a_row"] == 2
    log = h.log()
    assert "for 300ms, cooldown #1 in a row" in log and "for 500ms, cooldown #2 in a row" in log
    time.sleep(0.5)                                        # up longer than reset_after: a stable run
    os.kill(st["daemon"]["pid"], signal.SIGKILL)           # then two deaths in a row again
    st = h.wait(lambda s: s["state"] == "cooldown", what="a cooldown after the stable run")
    assert st["crash_loop"]["cooldown"]["number"] == 1 and st["crash_loop"]["cooldown"]["duration_s"] == 0.3
    assert len(_lines_with(h.log(), "state recovering -> cooldown")) == 3
    h.send(signal.SIGTERM)
    assert h.wait_exit() == 0


def test_start_during_a_cooldown_tries_at_once_and_the_cooldown_timer_is_ignored(harness):
    h = harness([{"exit_after": 0.02, "exit_code": 1}] * 2 + [{}],
                {"restart": {"crash_loop": {"max_deaths": 2, "cooldown": "800ms"}}}).start()
    h.wait(lambda s: s["state"] == "cooldown", what="cooldown")
    answer = control.request(h.run_dir, "start")
    assert answer["ok"] and answer["message"] == "starting", answer
    st = h.wait_running()
    assert control.request(h.run_dir, "start")["error"] == "already started (state running)"
    time.sleep(1.2)                                        # past the cooldown: its timer must not act
    st = h.status()
    assert st["state"] == "running" and len(h.events("start")) == 3 and st["restarts"] == 2
    assert "cooldown-elapsed" not in h.log()
    h.send(signal.SIGINT)
    assert h.wait_exit() == 0


def test_stop_during_a_cooldown_exits_0_and_leaves_no_stale_files(harness):
    h = harness([{"exit_after": 0.02, "exit_code": 1}],
                {"restart": {"crash_loop": {"max_deaths": 2, "cooldown": "1h"}}}).start()
    h.wait(lambda s: s["state"] == "cooldown" and "next try in 1h00m00s" in s["summary"]
           or "next try in 59m5" in s["summary"], what="cooldown of 1h")
    starter_pid = h.p("starter.fake.pid")
    assert open(starter_pid).read() == f"{h.proc.pid}\n"   # strongSwan's starter's file, with our pid
    answer = control.request(h.run_dir, "stop")
    assert answer["ok"], answer
    assert h.wait_exit() == 0
    left = sorted(os.listdir(h.dir))
    assert "starter.fake.pid" not in left and "fake.pid" not in left and "fake.vici" not in left, left
    assert os.listdir(h.run_dir) == [], os.listdir(h.run_dir)     # no socket, lock or load record


@pytest.mark.parametrize("run, overrides, rc, classification", [
    ({"exit_after": 0.05, "exit_code": 66}, {}, ExitCode.FAILED, "do-not-restart"),
    ({"exit_after": 0.05, "exit_code": 0}, {}, ExitCode.OK, "clean-exit"),
    ({"signal_after": 0.05}, {"restart": {"policy": "never"}}, ExitCode.FAILED, "killed-by-signal"),
    ({"exit_after": 0.05, "exit_code": 2}, {"restart": {"policy": "on-crash"}}, ExitCode.FAILED, "failure-exit"),
])
def test_policy_says_stop_and_the_supervisor_exits(harness, run, overrides, rc, classification):
    h = harness([run], overrides).start()
    assert h.wait_exit() == rc
    assert len(h.events("start")) == 1
    assert f"[{classification}], up " in h.log() and "; not restarting (" in h.log()


def test_start_timeout_kills_and_counts_as_failed_start(harness):
    h = harness([{"vici": "ignore"}, {}], {"daemon": {"start_timeout": "500ms"}}).start()
    st = h.wait_running(restarts=1)
    assert st["last_exit"]["classification"] == "start-timeout"
    assert st["last_exit"]["signal"] == "SIGKILL"
    assert "not ready within 500ms (no VICI answer on" in h.log()
    assert h.reports(wait_for=1)[0]["classification"] == "start-timeout"


# -- health probe ------------------------------------------------------------------------

def test_sigstop_is_caught_by_the_health_probe_aborted_and_restarted(harness):
    h = harness([{}, {}]).start()
    pid = h.wait_running()["daemon"]["pid"]
    os.kill(pid, signal.SIGSTOP)
    st = h.wait_running(restarts=1)
    le = st["last_exit"]
    # SIGABRT then SIGCONT: the stopped daemon gets the abort (and would dump core).
    assert (le["pid"], le["classification"], le["signal"]) == (pid, "hung", "SIGABRT")
    log = h.log()
    assert "health probe failed (1 of 2)" in log and "health probe failed (2 of 2)" in log
    assert "is not answering; sent SIGABRT, SIGKILL in 1s" in log
    assert h.reports(wait_for=1)[0]["health_failures"] == 2


def test_hung_daemon_ignoring_sigabrt_gets_sigkill(harness):
    h = harness([{"ignore_abort": True}, {}]).start()
    pid = h.wait_running()["daemon"]["pid"]
    os.kill(pid, signal.SIGSTOP)
    st = h.wait_running(restarts=1, timeout=15)
    assert (st["last_exit"]["classification"], st["last_exit"]["signal"]) == ("hung", "SIGKILL")
    assert "state aborting -> killing on abort-timeout" in h.log()


# -- stopping -----------------------------------------------------------------------------

def test_sigterm_stops_a_daemon_that_ignores_it_with_sigkill(harness):
    h = harness([{"on_term": "ignore"}], {"stop": {"timeout": "400ms"}}).start()
    pid = h.wait_running()["daemon"]["pid"]
    h.send(signal.SIGTERM)
    assert h.wait_exit() == 0
    assert [e["signal"] for e in h.events("signal")] == ["SIGTERM"]
    assert "state stopping -> killing on stop-timeout" in h.log()
    assert not _alive(pid)
    assert h.reports() == []     # a requested stop is not a crash


def test_control_stop_and_restart(harness):
    h = harness([{}]).start()
    first = h.wait_running()["daemon"]["pid"]
    assert control.request(h.run_dir, "restart")["ok"]
    st = h.wait(lambda s: s["state"] == "running" and s["daemon"]["pid"] != first, what="restarted")
    assert st["last_exit"]["classification"] == "requested-stop" and st["restarts"] == 1
    assert control.request(h.run_dir, "stop")["ok"]
    assert h.wait_exit() == 0


# -- reloads ------------------------------------------------------------------------------

def test_sighup_reload_applies_a_valid_file_without_restarting_the_daemon(harness):
    h = harness([{}]).start()
    pid = h.wait_running()["daemon"]["pid"]
    h.write_config({"restart": {"crash_loop": {"max_deaths": 9}}})
    h.send(signal.SIGHUP)
    st = h.wait(lambda s: s["crash_loop"]["max_deaths"] == 9, what="reloaded")
    assert st["daemon"]["pid"] == pid and st["config"]["last_reload_error"] is None
    assert "changes: restart.crash_loop.max_deaths" in h.log() or "restart.crash_loop.max_deaths" in h.log()


def test_sighup_with_an_invalid_file_keeps_the_running_configuration(harness):
    h = harness([{}]).start()
    pid = h.wait_running()["daemon"]["pid"]
    h.write_config({}, raw="restart:\n  backoff:\n    factor: 0.5\n")
    h.send(signal.SIGHUP)
    st = h.wait(lambda s: s["config"]["last_reload_error"], what="reload error")
    assert "restart.backoff.factor must be >= 1.0, not 0.5" in st["config"]["last_reload_error"]
    assert "line 3" in st["config"]["last_reload_error"]
    assert st["daemon"]["pid"] == pid and st["state"] == "running"
    assert st["crash_loop"]["max_deaths"] == 5      # the old configuration still applies
    assert "keeping the running configuration" in h.log()
    answer = control.request(h.run_dir, "reload")   # the control socket reports the same error
    assert not answer["ok"] and "factor" in answer["error"]


def test_sigusr1_runs_the_reload_commands(harness):
    h = harness([{}])
    h.write_config({"daemon": {"reload_commands": [["/bin/sh", "-c", f"echo reloaded >> {h.p('reloads')}"]]}})
    h.start()
    pid = h.wait_running()["daemon"]["pid"]
    h.send(signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while not os.path.exists(h.p("reloads")) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert open(h.p("reloads")).read() == "reloaded\n"
    assert h.status()["daemon"]["pid"] == pid


def test_failing_and_slow_load_commands_are_reported_and_the_daemon_keeps_running(harness):
    h = harness([{}], {"daemon": {"load_commands": [["/bin/sh", "-c", "echo broken config >&2; exit 4"]]}}).start()
    st = h.wait_running()
    assert st["daemon"]["load_ok"] is False
    # the command, how it ended, and its last output lines (the reason)
    assert st["daemon"]["load_error"] == "/bin/sh -c echo broken config >&2; exit 4 exited with code 4: broken config"
    assert "configuration load FAILED" in st["summary"]
    h.send(signal.SIGTERM)
    h.wait_exit()

    h2 = harness([{}], {"daemon": {"load_commands": [["/bin/sleep", "30"]], "load_timeout": "300ms"}}).start()
    st = h2.wait_running()
    assert st["daemon"]["load_ok"] is False and "time limit" in st["daemon"]["load_error"]


# -- control socket and CLI ----------------------------------------------------------------

def test_control_socket_is_root_only_and_status_cli_works(harness):
    h = harness([{}]).start()
    h.wait_running()
    assert stat.S_IMODE(os.stat(h.run_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(control.socket_path(h.run_dir)).st_mode) == 0o600
    assert control.request(h.run_dir, "frobnicate")["error"].startswith("unknown command 'frobnicate'")
    cli = [sys.executable, "-m", "supervisor.cli"]
    r = subprocess.run(cli + ["status", "--config", h.config_path], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("state:         running")
    assert "restarts:      0" in r.stdout and "last exit:     -" in r.stdout
    r = subprocess.run(cli + ["status", "--json", "--config", h.config_path], capture_output=True, text=True, cwd=ROOT)
    assert json.loads(r.stdout)["state"] == "running"
    # A second supervisor on the same run directory starts nothing and says which one runs (as `ipsec start`).
    r = subprocess.run(cli + ["run", "--config", h.config_path], capture_output=True, text=True, cwd=ROOT, timeout=20)
    assert r.returncode == ExitCode.OK and f"already running (pid {h.proc.pid}" in r.stderr, r.stderr
    h.send(signal.SIGTERM)
    assert h.wait_exit() == 0
    r = subprocess.run(cli + ["status", "--config", h.config_path], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == ExitCode.NOT_RUNNING == 7 and "is not running" in r.stderr


def test_crashes_cli_lists_reports(harness):
    h = harness([{"signal_after": 0.2, "signal": "SIGBUS"}, {}]).start()
    h.wait_running(restarts=1)
    h.reports(wait_for=1)
    cli = [sys.executable, "-m", "supervisor.cli", "crashes", "--config", h.config_path]
    r = subprocess.run(cli, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "killed-by-signal: killed by SIGBUS" in r.stdout
    r = subprocess.run(cli + ["--json"], capture_output=True, text=True, cwd=ROOT)
    assert [x["signal_name"] for x in json.loads(r.stdout)] == ["SIGBUS"]


def test_missing_daemon_binary_exits_8(harness):
    h = harness([{}], {"daemon": {"command": ["/nonexistent/charon"]}}).start()
    assert h.wait_exit() == ExitCode.NO_DAEMON == 8
    assert "daemon /nonexistent/charon is missing or not executable" in h.log()


# -- systemd notify ------------------------------------------------------------------------

def test_sd_notify_ready_after_loading_status_watchdog_reload_stopping(harness):
    h = harness([{}])
    marker = h.p("loaded-marker")
    h.write_config({"daemon": {"load_commands": [["/bin/sh", "-c", f"sleep 0.3; touch {marker}"]]}})
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(h.p("notify"))
    sock.settimeout(0.1)
    got: list[tuple[str, bool]] = []
    h.start(env={"NOTIFY_SOCKET": h.p("notify"), "WATCHDOG_USEC": "200000"})

    def collect(until, timeout=10.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                msg = sock.recv(4096).decode()
            except socket.timeout:
                continue
            got.append((msg, os.path.exists(marker)))
            if until(msg):
                return
        raise AssertionError(f"no such notification; got {got}\n{h.log()}")

    try:
        collect(lambda m: "READY=1" in m)
        ready_msg, loaded_before_ready = got[-1]
        assert loaded_before_ready, "READY=1 was sent before the load commands finished"
        assert f"STATUS={DNAME} running (pid" in ready_msg
        watchdogs = sum("WATCHDOG=1" in m for m, _ in got)
        collect(lambda m: "WATCHDOG=1" in m)
        assert watchdogs + 1 >= 2
        assert any(m.startswith(f"STATUS={DNAME} starting") for m, _ in got)
        h.send(signal.SIGHUP)
        collect(lambda m: m.startswith("RELOADING=1"))
        assert "MONOTONIC_USEC=" in got[-1][0]
        collect(lambda m: m.startswith("READY=1"))
        h.send(signal.SIGTERM)
        collect(lambda m: m.startswith("STOPPING=1"))
        assert h.wait_exit() == 0
    finally:
        sock.close()
    assert h.events("start")[0]["notify_socket"] is None


def test_notifier_is_silent_outside_systemd():
    sent = []
    n = Notifier(environ={}, send=sent.append)
    n.ready("x"), n.status("y"), n.watchdog(), n.stopping()
    assert sent == [] and n.watchdog_interval() is None


@pytest.mark.parametrize("env, interval", [
    ({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "30000000"}, 15.0),
    ({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),   # for another pid
    ({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}, 15.0),
    ({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "30000000"}, None),
])
def test_watchdog_interval(env, interval):
    assert Notifier(environ=env, send=lambda m: True, pid=4242).watchdog_interval() == interval


def test_notifier_messages():
    sent = []
    n = Notifier(environ={"NOTIFY_SOCKET": "/x"}, send=sent.append, clock_usec=lambda: 123)
    n.status("starting")
    n.status("starting")          # unchanged: not repeated
    n.reloaded()                  # never ready: no READY=1
    n.ready("charon running")
    n.reloading()
    n.reloaded()
    n.stopping("stopping")
    assert sent == ["STATUS=starting", "READY=1\nSTATUS=charon running", "RELOADING=1\nMONOTONIC_USEC=123",
                    "READY=1\nSTATUS=charon running", "STOPPING=1\nSTATUS=stopping"]


def test_journal_is_used_only_when_stderr_is_the_journal_stream(tmp_path, monkeypatch):
    f = tmp_path / "stderr"
    f.write_text("")
    st = os.stat(f)
    assert journal_stream_matches({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, st)
    assert not journal_stream_matches({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"}, st)
    assert not journal_stream_matches({}, st)
    assert not journal_stream_matches({"JOURNAL_STREAM": "garbage"}, st)
    import logging
    root = logging.getLogger()
    saved = list(root.handlers), root.level
    with open(f, "w") as fh:
        monkeypatch.setattr(sys, "stderr", fh)
        try:
            assert configure_logging(environ={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}) == "journal"
            from systemd.journal import JournalHandler
            assert isinstance(root.handlers[0], JournalHandler)
            assert configure_logging(environ={}) == "stderr"
        finally:
            root.handlers[:] = saved[0]
            root.setLevel(saved[1])


# -- the recovery hook point (in-process supervisor) ----------------------------------------

class RecordingRecovery:
    def __init__(self, fail_on: str | None = None):
        self.calls: list[tuple] = []
        self.fail_on = fail_on

    def _rec(self, *item):
        self.calls.append(item + (threading.current_thread() is threading.main_thread(),))
        if item[0] == self.fail_on:
            raise RuntimeError(f"{item[0]} broke on purpose")

    def before_start(self, context):
        self._rec("before_start", context.attempt, context.last_exit.classification if context.last_exit else None)

    def on_daemon_ready(self, context):
        self._rec("on_daemon_ready", context.pid, context.load_ok)

    def on_daemon_exit(self, exit_info, decision):
        self._rec("on_daemon_exit", exit_info.pid, exit_info.classification, decision.action)


@pytest.mark.parametrize("fail_on", [None, "on_daemon_exit"])
def test_recovery_hooks_run_in_order_died_decide_recover_restart(harness, fail_on):
    h = harness([{}, {}])
    cfg = parse_config(open(h.config_path).read(), h.config_path)
    rec = RecordingRecovery(fail_on)
    sup = Supervisor(cfg, recovery=rec, notifier=Notifier(environ={}), environ=dict(os.environ))
    pids: list[int] = []
    errors: list[BaseException] = []

    def drive():
        try:
            pids.append(h.wait_running()["daemon"]["pid"])
            os.kill(pids[0], signal.SIGKILL)
            pids.append(h.wait_running(restarts=1)["daemon"]["pid"])
            control.request(h.run_dir, "stop")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
            os.kill(os.getpid(), signal.SIGTERM)   # make run() return whatever happened

    t = threading.Thread(target=drive)
    t.start()
    rc = sup.run()
    t.join(20)
    if errors:
        raise errors[0]
    assert rc == 0
    main_thread = [c[-1] for c in rec.calls]
    assert not any(main_thread)                       # never in the loop thread
    assert [c[:-1] for c in rec.calls] == [
        ("before_start", 1, None),
        ("on_daemon_ready", pids[0], True),
        ("on_daemon_exit", pids[0], ExitClass.SIGNALED, Action.RESTART),
        ("before_start", 2, ExitClass.SIGNALED),
        ("on_daemon_ready", pids[1], True),
        ("on_daemon_exit", pids[1], ExitClass.REQUESTED_STOP, Action.STOP),
    ]


def test_a_recovery_step_over_its_time_limit_does_not_block_the_restart(harness):
    h = harness([{}])
    h.write_config({"recovery": {"timeout": "300ms"}})
    cfg = parse_config(open(h.config_path).read(), h.config_path)

    class Slow(RecordingRecovery):
        def before_start(self, context):
            super().before_start(context)
            time.sleep(2)

    sup = Supervisor(cfg, recovery=Slow(), notifier=Notifier(environ={}))
    out: list = []

    def drive():
        try:
            out.append(h.wait_running(timeout=10))
        finally:
            control.request(h.run_dir, "stop")

    t = threading.Thread(target=drive)
    t.start()
    assert sup.run() == 0
    t.join(20)
    assert out and out[0]["state"] == "running"


def test_a_raising_event_loop_callback_is_logged_counted_and_charon_keeps_running(harness, caplog):
    """Issue 11 point 9: a bug in one callback (timer, fd reader) must not end the supervisor and charon."""
    h = harness([{}])
    cfg = parse_config(open(h.config_path).read(), h.config_path)
    r, w = os.pipe()

    class Injecting(RecordingRecovery):
        def attach(self, loop):             # the optional hook that hands recovery the running loop
            loop.call_later(0.0, self.timer_breaks)
            loop.add_reader(r, self.reader_breaks)

        def timer_breaks(self):
            raise RuntimeError("timer broke on purpose")

        def reader_breaks(self):
            os.read(r, 1)
            raise ValueError("reader broke on purpose")

    sup = Supervisor(cfg, recovery=Injecting(), notifier=Notifier(environ={}), environ=dict(os.environ))
    seen: list[dict] = []
    errors: list[BaseException] = []

    def drive():
        try:
            first = h.wait_running()
            os.write(w, b"xy")          # two wakeups of the broken reader
            seen.append(h.wait(lambda st: st["callback_errors"] >= 3, what="3 callback errors"))
            seen.insert(0, first)
            control.request(h.run_dir, "stop")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
            if not finished.is_set():
                os.kill(os.getpid(), signal.SIGTERM)     # make run() return whatever happened

    finished = threading.Event()
    t = threading.Thread(target=drive)
    t.start()
    try:
        rc = sup.run()          # before the guard: RuntimeError("timer broke on purpose"), charon killed
    finally:
        finished.set()
        t.join(20)
        os.close(r)
        os.close(w)
    if errors:
        raise errors[0]
    assert rc == 0
    before, after = seen
    assert after["state"] == "running" and after["daemon"]["pid"] == before["daemon"]["pid"]
    assert after["restarts"] == 0 and after["callback_errors"] == 3
    assert "timer broke on purpose" in caplog.text and "reader broke on purpose" in caplog.text
    assert "Traceback" in caplog.text and "the supervisor goes on" in caplog.text


def test_one_failing_posted_callback_does_not_drop_the_ones_queued_after_it():
    from supervisor.eventloop import Loop, ThreadWakeup
    loop = Loop()
    wake = ThreadWakeup(loop)
    ran: list[int] = []
    try:
        wake.post(lambda: 1 / 0)
        wake.post(lambda: ran.append(1))
        loop.call_soon(lambda: ran.append(2))
        loop.run_once()     # the wakeup pipe is readable and call_soon makes select() not wait
    finally:
        wake.close()
        loop.close()
    assert sorted(ran) == [1, 2] and loop.callback_errors == 1


# -- crash report files ---------------------------------------------------------------------

def test_crash_reports_are_atomic_0600_and_pruned(tmp_path):
    from supervisor.policy import Decision, ExitInfo
    info = ExitInfo(7, None, 11, True, Cause.NONE, ExitClass.SIGNALED, 10.0, 12.5, 10.2, 10.3)
    rep = crashreport.build_crash_report(info, Decision(Action.RESTART, "x", 1.5, 2), ["a", "b"],
                                         daemon_command=["/usr/lib/ipsec/charon"], restarts=3, mono_now=20.0,
                                         wall_now=1_700_000_000.0)
    assert rep["timings"]["uptime_s"] == 2.5 and rep["timings"]["time_to_ready_s"] == 0.2
    assert rep["signal_name"] == "SIGSEGV" and rep["core_dumped"] is True
    assert rep["timings"]["died_at"] == "2023-11-14T22:13:12.500+00:00"
    d = str(tmp_path / "crashes")
    paths = [crashreport.write_crash_report(d, rep, 1_700_000_000.0 + i, keep=3) for i in range(5)]
    left = crashreport.report_paths(d)
    assert left == paths[2:]
    assert all(stat.S_IMODE(os.stat(p).st_mode) == 0o600 for p in left)
    assert not [n for n in os.listdir(d) if n.startswith(".")]   # no temp files left behind
    assert crashreport.read_crash_reports(d)[0][1] == json.loads(json.dumps(rep))


# -- loads on request: merged, answered when done, satisfied by a restart ---------------------

def _reload_waiting(run_dir: str, mode: str = "reload") -> dict:
    return control.request(run_dir, "reload-daemon", timeout=30, mode=mode, wait=True)


def test_reloads_during_a_reload_are_merged_and_answered_when_the_merged_load_finished(harness):
    h = harness([{}])
    # The reload runs until the test opens the gate: the others surely arrive while it runs, however
    # slow the machine (a fixed 0.6s run let a late client start a third load).
    gate = h.p("gate")
    slow = (f"echo start >> {h.p('reloads')}; while [ ! -e {gate} ]; do sleep 0.02; done; "
            f"echo end >> {h.p('reloads')}")
    h.write_config({"daemon": {"reload_commands": [["/bin/sh", "-c", slow]]}})
    h.start()
    h.wait_running()
    import concurrent.futures
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        first = pool.submit(_reload_waiting, h.run_dir)
        wait_for(lambda: os.path.exists(h.p("reloads")), what="the first reload running")
        rest = [pool.submit(_reload_waiting, h.run_dir, m) for m in ("reload", "update", "reload", "update")]
        wait_for(lambda: h.log().count("merged into one more load after it") >= 4, what="four merged reloads")
        open(gate, "w").close()
        answers = [first.result()] + [f.result() for f in rest]
    assert all(a["ok"] for a in answers), answers
    # One running reload, then one merged follow-up for the four that came during it; each
    # client was answered after the load that covers its request had finished.
    assert open(h.p("reloads")).read() == "start\nend\nstart\nend\n"
    assert h.log().count("merged into one more load after it") == 4
    assert h.status()["daemon"]["load"]["ok"] is True


def test_a_reload_while_the_daemon_restarts_is_satisfied_by_the_new_daemon_s_load(harness):
    h = harness([{"exit_after": 0.3, "exit_code": 1}, {}],
                {"restart": {"backoff": {"initial": "1500ms", "step": "1500ms", "maximum": "2s"}}}).start()
    h.wait(lambda s: s["state"] == "backoff", what="backoff after the death")
    answer = _reload_waiting(h.run_dir)
    assert answer["ok"] and answer.get("deferred"), answer
    assert "loads the current configuration" in answer["message"]
    h.wait_running(restarts=1)
    assert open(h.p("loads")).read() == "loaded\nloaded\n"   # the new daemon's own load


def test_a_failing_reload_is_answered_with_the_reason_and_the_daemon_keeps_running(harness):
    h = harness([{}])
    h.write_config({"daemon": {"reload_commands": [["/bin/sh", "-c", "echo 'bad: line 3' >&2; exit 3"]]}})
    h.start()
    pid = h.wait_running()["daemon"]["pid"]
    answer = _reload_waiting(h.run_dir)
    assert not answer["ok"] and "exited with code 3: bad: line 3" in answer["error"], answer
    st = h.status()
    assert st["daemon"]["pid"] == pid and st["state"] == "running"
    assert "configuration load FAILED" in st["summary"]


def test_a_reload_of_a_stopped_supervisor_is_not_running(harness):
    h = harness([{"exit_after": 0.05, "exit_code": 66}]).start()   # 66: never restarted
    h.wait_exit()
    with pytest.raises(SupervisorError) as exc:
        _reload_waiting(h.run_dir)
    assert exc.value.exit_code == ExitCode.NOT_RUNNING


def test_sighup_with_a_deeply_nested_file_keeps_the_daemon_and_the_running_configuration(harness):
    h = harness([{}]).start()
    pid = h.wait_running()["daemon"]["pid"]
    h.write_config({}, raw="restart:\n  " + "[" * 5000 + "]" * 5000 + "\n")
    h.send(signal.SIGHUP)
    st = h.wait(lambda s: s["config"]["last_reload_error"], what="reload error")
    assert "nested too deeply" in st["config"]["last_reload_error"]
    assert st["daemon"]["pid"] == pid and st["state"] == "running"
    h.send(signal.SIGTERM)
    assert h.wait_exit() == 0


def test_sighup_also_applies_the_configuration_to_the_daemon_as_strongswan_s_starter_does(harness):
    h = harness([{}])
    h.write_config({"daemon": {"reload_commands": [["/bin/sh", "-c", f"echo update >> {h.p('reloads')}"]]}})
    h.start()
    h.wait_running()
    h.send(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while not os.path.exists(h.p("reloads")) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert open(h.p("reloads")).read() == "update\n"
