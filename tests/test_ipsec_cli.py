"""The `ipsec` command: argument handling and exit codes, pid files, the start lock, forwarding.

Pure parts are tested by tables; start/stop/status run the real command (a subprocess, as
an operator would) with the fake daemon (tests/fake_ikd.py), and with a real charon in a
network namespace with a private /run.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import yaml

from charon_ns import psk_swanctl_conf
from supervisor import control, ipsec_cli
from supervisor.errors import ExitCode, SupervisorError
from supervisor.frontend import forward, lifecycle
from supervisor.frontend.lifecycle import StartOutcome, judge_start, map_run_exit
from supervisor.frontend.pidfile import PidState, is_supervisor_cmdline, judge_pid
from supervisor.frontend.progress import Progress, executor_progress
from supervisor.runlock import find_lock_holder, held_at
from waiting import wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAKE = os.path.join(ROOT, "tests", "fake_ikd.py")
CHARON = "/usr/lib/ipsec/charon"
SWANCTL = "/usr/sbin/swanctl"
IPSEC = [sys.executable, "-m", "supervisor.ipsec_cli"]

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


# ---------------------------------------------------------------------------
# Pure decisions

@pytest.mark.parametrize("argv, ours", [
    (["/opt/ipsec-supervisor/bin/python3", "/opt/ipsec-supervisor/bin/ipsec-supervisor", "run"], True),
    (["/usr/bin/python3", "-m", "supervisor.cli", "run", "--config", "x"], True),
    (["/usr/bin/python3", "/usr/local/sbin/ipsec", "start", "--nofork"], True),
    (["/usr/bin/python3", "-m", "supervisor.ipsec_cli", "--config", "c", "start", "--nofork"], True),
    (["/usr/bin/python3", "/usr/local/sbin/ipsec", "status"], False),        # a client, not the supervisor
    (["/usr/lib/ipsec/starter", "--daemon", "charon", "--nofork"], False),
    (["sleep", "100"], False),
], ids=["console-script", "module", "ipsec-nofork", "detached-child", "ipsec-status", "starter", "sleep"])
def test_supervisor_command_lines_are_recognised(argv, ours):
    assert is_supervisor_cmdline(argv) is ours


@pytest.mark.parametrize("text, cmdline, locked, state, pid", [
    (None, None, False, PidState.ABSENT, None),
    ("", None, False, PidState.GARBAGE, None),
    ("abc\n", None, False, PidState.GARBAGE, None),
    ("-5\n", None, False, PidState.GARBAGE, None),
    ("4242\n", None, False, PidState.GONE, 4242),                       # no such process
    ("4242\n", [], False, PidState.GONE, 4242),                         # a zombie
    ("4242\n", ["sleep", "100"], False, PidState.REUSED, 4242),         # pid reused by another program
    # argv says supervisor, but no lock is held: not a running supervisor (issue 11 point 6)
    ("4242\n", ["python3", "-m", "supervisor.cli", "run"], False, PidState.REUSED, 4242),
    ("4242\n", None, True, PidState.RUNNING, 4242),                     # the lock decides, not argv
    ("abc\n", None, True, PidState.RUNNING, None),
], ids=["absent", "empty", "text", "negative", "gone", "zombie", "reused", "lookalike-without-lock",
        "locked", "locked-garbage"])
def test_pid_file_verdicts_follow_the_supervisor_lock(text, cmdline, locked, state, pid):
    judged = judge_pid("/run/x/supervisor.pid", text, cmdline, locked)
    assert (judged.state, judged.pid) == (state, pid)
    assert judged.state.stale is (state in (PidState.GONE, PidState.REUSED, PidState.GARBAGE))
    if state is PidState.REUSED:
        assert " ".join(cmdline) in judged.describe() and "holds no supervisor lock" in judged.describe()


def _status(state="running", ready=True, load_ok=True, last_exit=None):
    return {"supervisor": {"pid": 10}, "state": state, "summary": f"charon {state}",
            "daemon": {"pid": 11, "ready": ready, "load_ok": load_ok, "load_error": "swanctl exited with code 22"},
            "last_exit": last_exit}


@pytest.mark.parametrize("status, exited, elapsed, outcome, code", [
    (None, None, 0.1, StartOutcome.WAITING, None),                       # control socket not up yet
    (_status("starting", ready=False), None, 1.0, StartOutcome.WAITING, None),
    (_status("backoff", ready=False), None, 1.0, StartOutcome.WAITING, None),   # it died; restarting
    (_status("settling"), None, 1.0, StartOutcome.READY, 0),
    (_status("running"), None, 1.0, StartOutcome.READY, 0),
    (_status("running", load_ok=False), None, 1.0, StartOutcome.CONFIG_FAILED, 2),
    (_status("gave-up", ready=False), None, 1.0, StartOutcome.FAILED, 1),
    (_status("cooldown", ready=False), None, 1.0, StartOutcome.FAILED, 1),    # crash loop: it stays, retries later
    (_status("stopped", ready=False), None, 1.0, StartOutcome.WAITING, None),   # exiting: wait for its code
    (_status("starting", ready=False), None, 30.0, StartOutcome.FAILED, 1),   # time is up
    (None, None, 30.0, StartOutcome.FAILED, 1),
    (None, 3, 0.5, StartOutcome.FAILED, 2),       # invalid supervisor.yaml
    (None, 8, 0.5, StartOutcome.FAILED, 1),       # daemon binary missing
    (None, 1, 0.5, StartOutcome.FAILED, 1),       # charon exited 64/65/66
    (None, 9, 0.5, StartOutcome.FAILED, 1),       # crash loop
    (None, 0, 0.5, StartOutcome.FAILED, 1),       # stopped before it was ready
    (None, -9, 0.5, StartOutcome.FAILED, 1),      # supervisor killed
])
def test_start_verdicts(status, exited, elapsed, outcome, code):
    verdict = judge_start(status, exited, elapsed, timeout=20.0)
    assert (verdict.outcome, verdict.exit_code) == (outcome, code)
    if outcome is StartOutcome.FAILED:
        assert verdict.reason


@pytest.mark.parametrize("run_code, start_code", [(0, 0), (1, 1), (2, 2), (3, 2), (4, 4), (8, 1), (9, 1), (-15, 1)])
def test_run_exit_codes_map_to_start_exit_codes(run_code, start_code):
    assert map_run_exit(run_code) == start_code


def test_failure_explanation_names_the_exit_and_charons_last_lines():
    verdict = judge_start(None, 1, 0.5, 20.0)
    last = {"description": "exited with code 66", "classification": "do-not-restart",
            "decision": "not restarting: exit code 66 is in restart.prevent_exit_codes"}
    report = {"last_log_lines": [f"line {i}" for i in range(30)]}
    lines = lifecycle.explain_failure(verdict, _status("stopped", ready=False, last_exit=last), [report], [],
                                      "/var/lib/ipsec-supervisor/supervisor.log", supervisor_alive=False)
    text = "\n".join(lines)
    assert "exited with code 66 [do-not-restart]" in text
    assert "line 29" in text and "line 19" not in text          # the last ten lines
    assert "ipsec stop" not in text                              # the supervisor is gone: nothing to stop


def _fwd(name, args, charon_down=None, stroke=True, uri=None):
    return forward.plan_forward(forward.COMMANDS[name], args, charon_down=charon_down, stroke_socket=stroke,
                                vici_uri=uri)


@pytest.mark.parametrize("name, args, down, stroke, commands, code", [
    ("up", [], None, True, (), 2),
    ("up", ["a", "b"], None, True, (), 2),
    ("down-srcip", [], None, True, (), 2),
    ("up", ["home"], "charon is not running (no /var/run/charon.pid)", True, (), 7),
    ("listcerts", [], "charon is not running", True, (), 7),
    ("up", ["home"], None, True, (("/usr/lib/ipsec/stroke", "up", "home"),), 0),
    ("listcerts", ["--utc"], None, True, (("/usr/lib/ipsec/stroke", "listcerts", "--utc"),), 0),
    ("purgeike", ["x", "y"], None, True, (("/usr/lib/ipsec/stroke", "purgeike"),), 0),
    ("secrets", [], None, True, (("/usr/lib/ipsec/stroke", "rereadsecrets"),), 0),
    ("leases", ["p", "a", "z"], None, True, (("/usr/lib/ipsec/stroke", "leases", "p", "a"),), 0),
    ("status", ["home", "x"], None, True, (("/usr/lib/ipsec/stroke", "status", "home"),), 0),
    ("up", ["home"], None, False, (("/usr/sbin/swanctl", "--initiate", "--child", "home"),), 0),
    ("down", ["home"], None, False, (("/usr/sbin/swanctl", "--terminate", "--ike", "home"),), 0),
    ("route", ["home"], None, False, (("/usr/sbin/swanctl", "--install", "--child", "home"),), 0),
    ("status", [], None, False, (("/usr/sbin/swanctl", "--list-sas"),), 0),
    ("status", ["home"], None, False, (("/usr/sbin/swanctl", "--list-sas", "--ike", "home"),), 0),
    ("purgeike", [], None, False, (), 1),          # no swanctl equivalent
])
def test_charon_commands_are_forwarded_like_strongswans_script(name, args, down, stroke, commands, code):
    plan = _fwd(name, args, down, stroke)
    assert (plan.commands, plan.exit_code) == (commands, code)
    if code:
        assert plan.message


def test_swanctl_fallback_uses_the_configured_vici_socket():
    plan = _fwd("statusall", [], stroke=False, uri="unix:///tmp/x.vici")
    assert [c[1] for c in plan.commands] == ["--list-conns", "--list-sas", "--list-pols"]
    assert all(c[-2:] == ("--uri", "unix:///tmp/x.vici") for c in plan.commands)


@pytest.mark.parametrize("ident, expect", [
    ("last", "c"), ("2", "b"), ("crash-2026", "c"), ("a-man", "a"), ("b-manual.json", "b"),
])
def test_snapshot_ids_resolve(ident, expect):
    snaps = [{"id": n, "path": f"/s/{n}.json"} for n in ("a-manual", "b-manual", "crash-2026")]
    assert ipsec_cli.resolve_snapshot(ident, snaps) == f"/s/{dict(a='a-manual', b='b-manual', c='crash-2026')[expect]}.json"


@pytest.mark.parametrize("ident", ["zzz", "x"])
def test_unknown_or_ambiguous_snapshot_ids_are_usage_errors(ident):
    snaps = [{"id": n, "path": f"/s/{n}.json"} for n in ("x1", "x2")]
    with pytest.raises(SupervisorError) as err:
        ipsec_cli.resolve_snapshot(ident, snaps)
    assert err.value.exit_code == ExitCode.USAGE


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_is_drawn_on_a_terminal_only():
    tty, pipe = _Tty(), io.StringIO()
    clock = iter(range(100)).__next__
    on, off = Progress("flush", tty, clock=clock), Progress("flush", pipe)
    for i in range(1, 4):
        on.update(i, 3)
        off.update(i, 3)
    on.finish()
    assert "flush: 3/3 (100%)" in tty.getvalue() and tty.getvalue().endswith("\r\x1b[K")
    assert pipe.getvalue() == ""


def test_executor_progress_wraps_the_callback_and_restores_it():
    class Module:
        @staticmethod
        def execute(plan, handlers=None, on_result=None):
            for i in range(len(plan.actions)):
                on_result(i, "ok") if on_result else None
            return ["done"]

    class Plan:
        actions = [1, 2, 3]

    original = Module.execute
    tty = _Tty()
    with executor_progress(Module, Progress("flush", tty, interval=0)):
        assert Module.execute(Plan()) == ["done"]
    assert Module.execute is original
    assert "flush: 3/3" in tty.getvalue()


# ---------------------------------------------------------------------------
# Argument handling and exit codes (in process)

def run_main(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    old = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    try:
        rc = ipsec_cli.main(list(argv))
    finally:
        sys.stdout, sys.stderr = old
    return rc, out.getvalue(), err.getvalue()


def test_help_documents_every_exit_code_table_row():
    rc, out, _ = run_main("--help")
    assert rc == 0
    for cmd, _codes in ipsec_cli.EXIT_CODES:
        assert cmd in out
    assert "7 charon is not running" in out and "3 not started" in out


@pytest.mark.parametrize("argv, code, text", [
    ((), 0, "ipsec command [arguments]"),
    (("frobnicate",), 2, "unknown command `frobnicate'"),
    (("--frobnicate",), 2, "unknown option `--frobnicate'"),
    (("up",), 2, "Usage: ipsec up <connection name>"),
    (("route", "a", "b"), 2, "Usage: ipsec route <connection name>"),
    (("start", "--bogus"), 2, "unrecognized arguments"),
    (("--config",), 2, "--config needs a path"),
])
def test_usage_errors_exit_2_and_say_why(argv, code, text):
    rc, out, err = run_main(*argv)
    assert rc == code
    assert text in out + err


def test_compat_queries_answer_like_strongswans_script():
    assert run_main("--directory")[1].strip() == "/usr/lib/ipsec"
    assert run_main("--confdir")[1].strip() == "/etc"
    assert run_main("--piddir")[1].strip() == "/var/run"
    rc, out, _ = run_main("version")
    assert rc == 0 and "strongSwan U" in out and "ipsec-supervisor" in out


def test_start_and_restart_need_root(monkeypatch, tmp_path):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    for cmd in ("start", "restart"):
        rc, _, err = run_main("--config", str(tmp_path / "none.yaml"), cmd)
        assert rc == 4 and "must be superuser" in err


def test_status_without_permission_exits_4(monkeypatch, tmp_path):
    def refuse(*a, **k):
        raise control.NotRootError("cannot connect: permission denied")
    monkeypatch.setattr(control, "request", refuse)
    cfg = tmp_path / "s.yaml"
    cfg.write_text(yaml.safe_dump({"paths": {"run_dir": str(tmp_path / "run"), "state_dir": str(tmp_path)}}))
    assert run_main("--config", str(cfg), "status")[0] == 4


@root_only
def test_invalid_configuration_exits_2_and_names_the_key(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("restart:\n  backoff:\n    factor: 0.5\n")
    rc, _, err = run_main("--config", str(cfg), "start")
    assert rc == 2 and "restart.backoff.factor" in err


@root_only
def test_missing_daemon_binary_exits_1(tmp_path):
    cfg = tmp_path / "s.yaml"
    cfg.write_text(yaml.safe_dump({"daemon": {"command": ["/nonexistent/charon"]},
                                   "paths": {"run_dir": str(tmp_path / "run"), "state_dir": str(tmp_path)}}))
    rc, _, err = run_main("--config", str(cfg), "start")
    assert rc == 1 and "/nonexistent/charon is missing" in err


# ---------------------------------------------------------------------------
# The real command with the fake daemon

def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class FakeSetup:
    """A supervisor.yaml that runs the fake daemon, everything in one short temp dir."""

    def __init__(self, runs: list[dict] | None = None, overrides: dict | None = None):
        self.dir = tempfile.mkdtemp(prefix="ipsv-i-")   # AF_UNIX paths must stay short
        self.p = lambda n: os.path.join(self.dir, n)
        self.set_runs(runs or [{}])
        cfg = {
            "daemon": {"command": [sys.executable, FAKE, "--pid-file", self.p("fake.pid"), "--vici", self.p("fake.vici"),
                                   "--plan", self.p("plan.json"), "--counter", self.p("counter"),
                                   "--events", self.p("events.jsonl")],
                       "pid_file": self.p("fake.pid"), "vici_socket": self.p("fake.vici"), "start_timeout": "3s",
                       "load_commands": [["/bin/sh", "-c", f"echo loaded >> {self.p('loads')}"]]},
            "restart": {"okay_delay": "100ms", "backoff": {"initial": 0, "step": "100ms", "jitter": 0},
                        "crash_loop": {"max_deaths": 3, "window": "60s"}},
            "health": {"interval": "1s", "timeout": "500ms"},
            "stop": {"timeout": "2s"},
            "paths": {"run_dir": self.p("run"), "state_dir": self.p("state")},
        }
        self.config = self.p("supervisor.yaml")
        with open(self.config, "w") as fh:
            yaml.safe_dump(_deep_merge(cfg, overrides or {}), fh)

    def set_runs(self, runs: list[dict]) -> None:
        with open(self.p("plan.json"), "w") as fh:
            json.dump({"runs": runs}, fh)

    def ipsec(self, *argv, timeout: float = 60.0, env: dict | None = None) -> subprocess.CompletedProcess:
        e = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
        e.update(env or {})
        return subprocess.run([*IPSEC, "--config", self.config, *argv], cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout, env=e)

    def popen(self, *argv) -> subprocess.Popen:
        return subprocess.Popen([*IPSEC, "--config", self.config, *argv], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    @property
    def pid_file(self) -> str:
        return self.p("run/supervisor.pid")

    def pid(self) -> int | None:
        try:
            with open(self.pid_file) as fh:
                return int(fh.read())
        except (FileNotFoundError, ValueError):
            return None

    def status(self) -> dict:
        return control.request(self.p("run"), "status", timeout=2)["status"]

    def events(self, kind: str) -> list[dict]:
        try:
            with open(self.p("events.jsonl")) as fh:
                return [e for e in map(json.loads, fh) if e["event"] == kind]
        except FileNotFoundError:
            return []

    def supervisors(self) -> list[int]:
        """Supervisor processes running with this configuration."""
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/cmdline", "rb") as fh:
                        argv = [a.decode() for a in fh.read().split(b"\0") if a]
                except OSError:
                    continue
                if self.config in argv and is_supervisor_cmdline(argv):
                    found.append(int(entry))
        return found

    def cleanup(self) -> None:
        for pid in self.supervisors():
            _kill(pid)
        for e in self.events("start"):
            _kill(e["pid"])
        shutil.rmtree(self.dir, ignore_errors=True)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def _wait(pred, timeout=10.0, what="condition"):
    return wait_for(pred, timeout, what, poll=0.02)


@pytest.fixture
def fake():
    made: list[FakeSetup] = []

    def make(runs=None, overrides=None) -> FakeSetup:
        s = FakeSetup(runs, overrides)
        made.append(s)
        return s

    yield make
    for s in made:
        s.cleanup()


@root_only
def test_start_status_stop_with_exit_codes(fake):
    s = fake()
    assert s.ipsec("status").returncode == 3                       # never started: no pid file
    r = s.ipsec("start")
    assert r.returncode == 0, r.stderr
    assert "ready" in r.stdout
    pid = s.pid()
    assert pid and s.status()["state"] in ("settling", "running") and s.status()["supervisor"]["pid"] == pid
    daemon = s.status()["daemon"]["pid"]
    r = s.ipsec("start")                                           # already running: 0, nothing new started
    assert r.returncode == 0 and "already running" in r.stderr
    assert len(s.events("start")) == 1
    r = s.ipsec("status")
    assert r.returncode == 0 and f"ipsec-supervisor (pid {pid})" in r.stdout
    r = s.ipsec("stop")
    assert r.returncode == 0 and f"Stopping ipsec-supervisor (pid {pid})" in r.stderr
    assert not _alive(pid) and not _alive(daemon)
    assert not os.path.exists(s.pid_file)
    assert s.ipsec("status").returncode == 3
    r = s.ipsec("stop")                                            # not running: 0 as strongSwan, truth on stderr
    assert r.returncode == 0 and "not running" in r.stderr
    assert s.ipsec("stop", "--strict").returncode == 7


@root_only
def test_concurrent_starts_start_one_supervisor(fake):
    s = fake()
    procs = [s.popen("start") for _ in range(4)]
    results = [(p.wait(60), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    assert [rc for rc, _ in results] == [0, 0, 0, 0], results
    assert sum("already running" in err for _, err in results) == 3
    assert len(s.events("start")) == 1
    assert s.supervisors() == [s.pid()]


@root_only
def test_a_held_start_lock_makes_start_wait_then_give_up(fake):
    s = fake()
    lock = lifecycle.StartLock(s.p("run"))
    try:
        assert lock.acquire(1.0)
        r = s.ipsec("start", "--timeout", "0.5")
        assert r.returncode == 1 and "another 'ipsec start'" in r.stderr
        assert s.events("start") == []
    finally:
        lock.close()


@root_only
def test_stop_during_a_start_waits_for_it_and_stops_what_it_started(fake):
    s = fake()
    start = s.popen("start")
    try:
        # The start holds its lock from before it spawns the supervisor until charon is ready. Held, not
        # merely there: the file exists a moment before its flock is taken.
        _wait(lambda: held_at(s.p("run"), "start.lock") or start.poll() is not None, what="start.lock held")
        r = s.ipsec("stop")
        assert r.returncode == 0, r.stderr
        assert start.wait(60) == 0
    finally:
        start.stdout.close()
        start.stderr.close()
    if "under way" in r.stderr:       # the usual order: the stop came while the start was spawning
        assert "Stopping ipsec-supervisor" in r.stderr
    assert s.supervisors() == [] and not os.path.exists(s.pid_file)


@root_only
def test_stop_after_the_started_supervisor_took_its_lock_still_waits_for_the_start(fake):
    # The order a slow machine makes: the new supervisor already holds its lock (and answers) but
    # charon is not ready yet, so the start is still deciding. Forced here by a charon slow to come up.
    s = fake([{"start_delay": 1.5}], {"daemon": {"start_timeout": "20s"}})    # slow, not too slow
    start = s.popen("start")
    try:
        _wait(lambda: find_lock_holder(s.p("run"), pid=False).held or start.poll() is not None,
              what="the started supervisor's lock")
        assert start.poll() is None and held_at(s.p("run"), "start.lock")
        r = s.ipsec("stop")
        assert r.returncode == 0, r.stderr
        assert start.wait(60) == 0, start.stderr.read()      # the start was not cut short: charon became ready
    finally:
        start.stdout.close()
        start.stderr.close()
    assert "an 'ipsec start' is under way; waiting for it" in r.stderr and "Stopping ipsec-supervisor" in r.stderr
    assert len(s.events("start")) == 1 and s.supervisors() == [] and not os.path.exists(s.pid_file)


@root_only
def test_charon_that_cannot_start_is_explained_and_start_fails(fake):
    s = fake([{"exit_after": 0.05, "exit_code": 66, "pid_file": False,
               "lines": ["00[DMN] integrity check of charon failed"]}])
    r = s.ipsec("start")
    assert r.returncode == 1
    assert "charon could not be started" in r.stderr
    assert "exited with code 66" in r.stderr and "integrity check of charon failed" in r.stderr
    assert s.supervisors() == [] and not os.path.exists(s.pid_file)


@root_only
def test_crash_loop_during_start_fails_with_the_last_exit(fake):
    s = fake([{"signal_after": 0.05, "signal": "SIGSEGV", "pid_file": False, "lines": ["about to crash"]}])
    r = s.ipsec("start")
    assert r.returncode == 1
    assert "crash-loop" in r.stderr and "SIGSEGV" in r.stderr and "about to crash" in r.stderr


@root_only
def test_a_crash_loop_cools_down_and_ipsec_start_then_tries_at_once_and_stop_leaves_run_clean(fake):
    s = fake([{"signal_after": 0.05, "signal": "SIGSEGV", "pid_file": False, "lines": ["about to crash"]}],
             {"restart": {"crash_loop": {"cooldown": "1h"}}})
    r = s.ipsec("start")
    assert r.returncode == 1, r.stderr
    # 1h, seen up to a minute later (a loaded machine may answer the start's status poll seconds late)
    assert re.search(r"crash loop: 3 deaths in 1m; next try in (1h00m00s|59m\d\ds)", r.stderr), r.stderr
    assert "state cooldown (it keeps to its restart policy; 'ipsec stop' ends it)" in r.stderr
    [sup] = s.supervisors()                                       # it stays, fail-closed, and tries again later
    assert s.pid() == sup
    with open(s.p("starter.fake.pid")) as fh:
        assert fh.read() == f"{sup}\n"                           # strongSwan's starter file names the starter
    r = s.ipsec("status")
    assert r.returncode == 0 and f"ipsec-supervisor (pid {sup}): crash loop: 3 deaths in 1m; next try in " in r.stdout
    assert not os.path.exists(s.p("fake.pid")) and not os.path.exists(s.p("fake.vici"))   # the dead one's, gone
    s.set_runs([{}])                                              # charon can run again
    r = s.ipsec("start")
    assert r.returncode == 0, r.stderr
    assert "trying again now" in r.stderr and "charon ready" in r.stdout
    assert s.status()["state"] in ("settling", "running") and s.supervisors() == [sup]
    assert s.ipsec("start").returncode == 0                       # running: as before, already running
    assert s.ipsec("stop").returncode == 0
    assert os.listdir(s.p("run")) == [], os.listdir(s.p("run"))   # no pid file, socket, lock or record
    assert not os.path.exists(s.p("starter.fake.pid"))
    assert not os.path.exists(s.p("fake.vici"))                   # the fake leaves it, as charon does


@root_only
def test_start_nofork_during_a_cooldown_asks_the_paused_supervisor_to_try_again(fake):
    s = fake([{"signal_after": 0.05, "signal": "SIGSEGV", "pid_file": False}],
             {"restart": {"crash_loop": {"cooldown": "1h"}}})
    assert s.ipsec("start").returncode == 1
    [sup] = s.supervisors()
    s.set_runs([{}])
    r = s.ipsec("start", "--nofork", timeout=30)                  # as a service manager's ExecStart runs it
    assert r.returncode == 0, r.stderr
    assert "trying again now" in r.stderr and "charon ready" in r.stdout
    assert s.supervisors() == [sup] and s.status()["state"] in ("settling", "running")
    assert s.ipsec("stop").returncode == 0


@root_only
def test_configuration_load_failure_is_exit_2_and_charon_keeps_running(fake):
    s = fake(overrides={"daemon": {"load_commands": [["/bin/sh", "-c", "exit 22"]]}})
    r = s.ipsec("start")
    assert r.returncode == 2 and "loading charon's configuration failed" in r.stderr
    assert s.status()["state"] in ("settling", "running")
    assert s.ipsec("start").returncode == 0                       # already running


@root_only
def test_garbage_ipsec_conf_is_exit_2_at_once_charon_runs_and_nothing_is_echoed_raw(fake):
    s = fake()
    conf = s.p("ipsec.conf")
    with open(conf, "w") as fh:
        fh.write("config setup\n  charondebug=\"ike 2\"\nconn a\nleft=1\n\x1b]0;owned\x07\x1b[2J\n")
    with open(s.config) as fh:
        cfg = yaml.safe_load(fh)
    cfg["daemon"].update({"config": "ipsec.conf", "ipsec_conf": conf, "ipsec_secrets": None, "load_commands": None})
    with open(s.config, "w") as fh:
        yaml.safe_dump(cfg, fh)
    started = time.monotonic()
    r = s.ipsec("start")
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert time.monotonic() - started < 6           # no crash loop first (it took 7.5 s and said 1)
    assert "syntax error" in r.stderr and "\x1b" not in r.stderr and "\x07" not in r.stderr, r.stderr
    st = s.status()
    assert st["state"] in ("settling", "running") and st["restarts"] == 0 and st["last_exit"] is None
    assert not os.listdir(s.p("state/crashes")) if os.path.isdir(s.p("state/crashes")) else True
    assert s.ipsec("stop").returncode == 0


@root_only
def test_stale_pid_files_are_detected_reported_and_replaced(fake):
    s = fake()
    os.makedirs(s.p("run"), mode=0o700)
    with open(s.pid_file, "w") as fh:
        fh.write("999999\n" if not os.path.exists("/proc/999999") else "4194303\n")
    r = s.ipsec("status")
    assert r.returncode == 1 and "is not running" in r.stderr
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        with open(s.pid_file, "w") as fh:                          # a pid that now belongs to `sleep`
            fh.write(f"{sleeper.pid}\n")
        r = s.ipsec("status")
        assert r.returncode == 1 and "another program (sleep 60)" in r.stderr
        r = s.ipsec("start")
        assert r.returncode == 0 and "removed stale pid file" in r.stderr
        assert s.pid() != sleeper.pid and _alive(sleeper.pid)     # the sleeper was not touched
    finally:
        sleeper.kill()
        sleeper.wait()
    assert s.ipsec("stop").returncode == 0


@root_only
def test_a_pid_file_naming_a_lookalike_process_is_stale_the_lock_decides(fake):
    """Issue 11 point 6: argv saying ipsec-supervisor is not a running supervisor; the lock is."""
    s = fake()
    os.makedirs(s.p("run"), mode=0o700)
    lookalike = subprocess.Popen(["bash", "-c", "exec -a ipsec-supervisor sleep 60"])
    try:
        _wait(lambda: is_supervisor_cmdline(open(f"/proc/{lookalike.pid}/cmdline").read().split("\0")),
              what="lookalike argv")
        with open(s.pid_file, "w") as fh:
            fh.write(f"{lookalike.pid}\n")
        r = s.ipsec("status")
        assert r.returncode == 1 and "holds no supervisor lock" in r.stderr, r.stdout + r.stderr
        r = s.ipsec("start")
        assert r.returncode == 0 and "removed stale pid file" in r.stderr and "already running" not in r.stderr
        pid = s.pid()
        assert pid != lookalike.pid and s.status()["supervisor"]["pid"] == pid
        r = s.ipsec("status")
        assert r.returncode == 0 and f"(pid {pid})" in r.stdout
        assert s.ipsec("stop").returncode == 0
        _wait(lambda: not _alive(pid), what="supervisor gone")
        assert _alive(lookalike.pid)                                 # never signalled
    finally:
        lookalike.kill()
        lookalike.wait()


@root_only
def test_killed_supervisor_leaves_a_stale_pid_file_and_stop_ends_the_orphaned_daemon(fake):
    s = fake()
    assert s.ipsec("start").returncode == 0
    pid, daemon = s.pid(), s.status()["daemon"]["pid"]
    os.kill(pid, signal.SIGKILL)
    _wait(lambda: not _alive(pid), what="supervisor gone")
    r = s.ipsec("status")                                          # the truth: the daemon runs alone
    assert r.returncode == 5 and f"pid {pid} is not running" in r.stderr
    assert f"but {os.path.basename(sys.executable)} is (pid {daemon})" in r.stdout, r.stdout
    r = s.ipsec("start")      # refuses: the daemon runs unsupervised, and no ledger says whose it is
    assert r.returncode == 1 and "without a supervisor" in r.stderr
    r = s.ipsec("stop", "--strict")
    assert r.returncode == 7 and f"(pid {daemon}) runs without" in r.stderr
    assert not _alive(daemon)
    assert s.ipsec("start").returncode == 0 and s.ipsec("stop").returncode == 0


@root_only
def test_a_hung_supervisor_is_reported_and_stopped_anyway(fake):
    s = fake()
    assert s.ipsec("start").returncode == 0
    pid, daemon = s.pid(), s.status()["daemon"]["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        r = s.ipsec("status")                                      # its pid file says it runs: 0, and the truth
        assert r.returncode == 0 and "does not answer" in r.stdout
        r = s.ipsec("stop", "--strict")
        assert r.returncode == 0, r.stderr                         # SIGTERM + SIGCONT: it stopped by itself
        assert not _alive(pid) and not _alive(daemon)
    finally:
        if _alive(pid):
            os.kill(pid, signal.SIGCONT)


@root_only
def test_nofork_runs_in_the_foreground_with_a_pid_file(fake):
    s = fake()
    p = s.popen("start", "--nofork")
    try:
        _wait(lambda: _try_status(s), what="supervisor answering")
        assert s.pid() == p.pid and s.status()["supervisor"]["pid"] == p.pid
        assert s.ipsec("start", "--nofork").returncode == 0        # already running
        p.send_signal(signal.SIGTERM)
        assert p.wait(20) == 0
        assert not os.path.exists(s.pid_file)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stdout.close()
        p.stderr.close()


def _try_status(s):
    try:
        return s.status()["state"] == "running"
    except SupervisorError:
        return False


@root_only
def test_reload_update_and_restart(fake):
    s = fake()
    assert s.ipsec("reload").returncode == 7
    assert s.ipsec("update").returncode == 7
    assert s.ipsec("start").returncode == 0
    _wait(lambda: s.status()["state"] == "running", what="running")
    r = s.ipsec("reload")
    assert r.returncode == 0, r.stderr
    assert open(s.p("loads")).read().count("loaded") == 2       # done when the command returns
    r = s.ipsec("update")
    assert r.returncode == 0 and "no changes" in r.stderr
    assert open(s.p("loads")).read().count("loaded") == 3
    old = s.pid()
    r = s.ipsec("restart")
    assert r.returncode == 0, r.stderr
    assert s.pid() != old and not _alive(old) and len(s.supervisors()) == 1
    assert s.ipsec("stop").returncode == 0


@root_only
def test_charon_commands_exit_7_when_charon_is_not_running_and_status_json(fake):
    s = fake()
    r = s.ipsec("up", "home")
    assert r.returncode == 7 and "not running" in r.stderr
    assert s.ipsec("listcerts").returncode == 7
    assert s.ipsec("start").returncode == 0
    r = s.ipsec("status", "--json")
    doc = json.loads(r.stdout)
    assert r.returncode == 0 and doc["running"] and doc["supervisor"]["state"] in ("settling", "running")
    assert doc["charon"]["running"] is True
    assert s.ipsec("stop").returncode == 0
    doc = json.loads(s.ipsec("status", "--json").stdout)
    assert doc["running"] is False and doc["pid_file"]["state"] == "absent"


@root_only
def test_crashes_and_snapshots_reach_the_supervisors_commands(fake, tmp_path):
    s = fake([{"signal_after": 0.5, "signal": "SIGSEGV"}, {}])
    assert s.ipsec("start").returncode == 0
    _wait(lambda: s.status()["restarts"] == 1 and s.status()["state"] == "running", what="restarted")
    r = s.ipsec("crashes", "--json")
    reports = json.loads(r.stdout)
    assert r.returncode == 0 and [x["signal_name"] for x in reports] == ["SIGSEGV"]
    assert s.ipsec("stop").returncode == 0

    snapdir = os.path.join(s.p("state"), "snapshots")
    os.makedirs(snapdir)
    fixtures = os.path.join(ROOT, "tests", "fixtures", "snapshots")
    for i, name in enumerate(("trap-crash.json", "tunnels-crash.json")):
        shutil.copy(os.path.join(fixtures, name), os.path.join(snapdir, name))
        os.utime(os.path.join(snapdir, name), (1_000_000 + i, 1_000_000 + i))
    r = s.ipsec("snapshots", "--json")
    assert [x["id"] for x in json.loads(r.stdout)["snapshots"]] == ["trap-crash", "tunnels-crash"]
    r = s.ipsec("snapshots")
    assert r.returncode == 0 and "2 snapshot(s)" in r.stdout
    r = s.ipsec("snapshots", "show", "trap", "--json")
    assert r.returncode == 0 and "objects" in json.loads(r.stdout)
    r = s.ipsec("snapshots", "diff", "1", "last")
    assert r.returncode == 0 and r.stdout.strip()
    r = s.ipsec("snapshots", "show", "nope")
    assert r.returncode == 2 and "no snapshot 'nope'" in r.stderr
    assert s.ipsec("snapshots", "diff", "1").returncode == 2


# ---------------------------------------------------------------------------
# leftovers / flush / reconcile in a test namespace

@root_only
def test_leftovers_and_flush_with_progress_in_a_namespace(netns, monkeypatch):
    policies = "\n".join(f"xfrm policy add src 10.0.{i // 250}.{i % 250}/32 dst 10.9.0.0/16 dir out "
                         f"priority 391808 tmpl src 192.0.2.1 dst 192.0.2.2 proto esp reqid {i + 1} mode tunnel"
                         for i in range(300))
    subprocess.run(["ip", "netns", "exec", netns.name, "ip", "-batch", "-"], input=policies + "\n", text=True,
                   check=True)
    netns.sh("ip route add 10.9.0.0/16 dev lo table 220 proto static; ip rule add pref 220 table 220")
    r = subprocess.run([*IPSEC, "leftovers", "--netns", netns.name, "--no-ledger", "--json"], cwd=ROOT,
                       capture_output=True, text=True)
    doc = json.loads(r.stdout)
    assert r.returncode == 0 and doc["counts"]["xfrm_policy"]["owned"] == 300
    rc, out, _ = run_main("flush", "--netns", netns.name, "--no-ledger", "--dry-run")
    assert rc == 0 and "dry run" in out
    tty = _Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    assert ipsec_cli.main(["flush", "--netns", netns.name, "--no-ledger"]) == 0
    assert "flush: 302/302 (100%)" in tty.getvalue()               # 300 policies, a route, a rule
    assert "summary: 302 done" in out.getvalue()
    assert "dir out" not in netns.run("ip", "xfrm", "policy").stdout
    r = subprocess.run([*IPSEC, "reconcile", "--dry-run", "--netns", netns.name, "--no-ledger"], cwd=ROOT,
                       capture_output=True, text=True)
    if ipsec_cli._subparser_options("reconcile") is None:      # not built yet: says so
        assert r.returncode == 2 and "not available" in r.stderr
    else:
        assert r.returncode == 0, r.stderr


# ---------------------------------------------------------------------------
# A real charon in a network namespace

SWANCTL_CONF = psk_swanctl_conf("home")


class RealCharon:
    """`ipsec start` of a real charon in NETNS; charon's /run is a private tmpfs."""

    def __init__(self, netns, swanctl_conf: str = SWANCTL_CONF):
        self.netns = netns
        self.dir = tempfile.mkdtemp(prefix="ipsv-r-")
        self.p = lambda n: os.path.join(self.dir, n)
        with open(self.p("swanctl.conf"), "w") as fh:
            fh.write(swanctl_conf)
        self.config = self.p("supervisor.yaml")
        with open(self.config, "w") as fh:
            yaml.safe_dump({
                "daemon": {"load_commands": [[SWANCTL, "--load-all", "--noprompt", "--file", self.p("swanctl.conf")]]},
                "restart": {"okay_delay": "200ms"},
                "health": {"interval": "2s", "timeout": "1s"},
                "paths": {"run_dir": self.p("run"), "state_dir": self.p("state")}}, fh)
        self.supervisor: int | None = None

    def start(self) -> subprocess.CompletedProcess:
        script = (f"mount -t tmpfs tmpfs /run && exec {sys.executable} -m supervisor.ipsec_cli "
                  f"--config {self.config} start")
        r = subprocess.run(["ip", "netns", "exec", self.netns.name, "unshare", "-m", "--propagation", "private",
                            "sh", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
        try:
            with open(self.p("run/supervisor.pid")) as fh:
                self.supervisor = int(fh.read())
        except FileNotFoundError:
            pass
        return r

    def ipsec(self, *argv) -> subprocess.CompletedProcess:
        """Run `ipsec` inside the supervisor's mount and network namespaces (charon's /run)."""
        assert self.supervisor
        return subprocess.run(["nsenter", "-t", str(self.supervisor), "-m", "-n", *IPSEC, "--config", self.config,
                               *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)

    def status(self) -> dict:
        return control.request(self.p("run"), "status", timeout=3)["status"]

    def charons(self) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.netns.name], capture_output=True, text=True).stdout.split()
        return [int(p) for p in out if lifecycle.comm_of(int(p)) == "charon"]

    def cleanup(self) -> None:
        pids = subprocess.run(["ip", "netns", "pids", self.netns.name], capture_output=True, text=True).stdout.split()
        for pid in pids:
            _kill(int(pid))
        if self.supervisor:
            _kill(self.supervisor)
        shutil.rmtree(self.dir, ignore_errors=True)


real_charon = pytest.mark.skipif(not (os.path.exists(CHARON) and os.path.exists(SWANCTL)) or os.geteuid() != 0,
                                 reason="needs root and strongSwan (strongswan-charon, strongswan-swanctl)")


@pytest.fixture
def charon(netns):
    made: list[RealCharon] = []

    def make(conf: str = SWANCTL_CONF) -> RealCharon:
        c = RealCharon(netns, conf)
        made.append(c)
        return c

    yield make
    for c in made:
        c.cleanup()


@real_charon
def test_real_charon_start_status_commands_stop(charon, netns):
    c = charon()
    r = c.start()
    assert r.returncode == 0, r.stderr
    # start returned: charon answers, its configuration is loaded, its trap policies are in.
    st = c.status()
    assert st["state"] in ("settling", "running") and st["daemon"]["load_ok"] is True
    assert c.charons() == [st["daemon"]["pid"]]
    assert "priority" in netns.run("ip", "xfrm", "policy").stdout
    r = c.ipsec("status")
    assert r.returncode == 0
    assert f"ipsec-supervisor (pid {c.supervisor})" in r.stdout and "net{1}:  ROUTED" in r.stdout
    r = c.ipsec("statusall", "home")
    assert r.returncode == 0 and "state:" in r.stdout and "home:" in r.stdout
    assert c.ipsec("unroute", "net").returncode == 0
    assert "dir out" not in netns.run("ip", "xfrm", "policy").stdout
    assert c.ipsec("route", "net").returncode == 0
    assert "dir out" in netns.run("ip", "xfrm", "policy").stdout
    assert c.ipsec("up").returncode == 2
    assert c.ipsec("reload").returncode == 0
    supervisor, daemon = c.supervisor, st["daemon"]["pid"]
    r = c.ipsec("stop")
    assert r.returncode == 0, r.stderr
    assert not _alive(supervisor) and not _alive(daemon) and c.charons() == []
    # charon stopped gracefully and took its kernel state with it.
    assert "dir out" not in netns.run("ip", "xfrm", "policy").stdout
    assert "lookup 220" not in netns.run("ip", "rule").stdout
    assert netns.run("ip", "route", "show", "table", "220", check=False).stdout.strip() == ""


@real_charon
def test_real_charon_killed_is_restarted_under_ipsec_start(charon, netns):
    c = charon()
    assert c.start().returncode == 0
    first = c.status()["daemon"]["pid"]
    os.kill(first, signal.SIGKILL)
    st = _wait(lambda: (lambda s: s if s["restarts"] == 1 and s["state"] == "running" else None)(c.status()),
               timeout=30, what="charon restarted")
    assert st["daemon"]["pid"] != first and st["last_exit"]["signal"] == "SIGKILL"
    r = c.ipsec("status")
    assert r.returncode == 0 and "1 restart" in r.stdout
    r = c.ipsec("crashes", "--json")
    assert [x["signal_name"] for x in json.loads(r.stdout)] == ["SIGKILL"]
    assert c.ipsec("stop").returncode == 0 and c.charons() == []


@real_charon
def test_real_charon_configuration_that_does_not_load_is_exit_2(charon, netns):
    bad = SWANCTL_CONF.replace("remote_addrs = 192.0.2.2", "remote_addrs = 192.0.2.2\n    proposals = nonsense")
    c = charon(bad)
    r = c.start()
    assert r.returncode == 2 and "loading charon's configuration failed" in r.stderr
    assert c.charons()                                         # charon runs: fix it and `ipsec reload`
    with open(c.p("swanctl.conf"), "w") as fh:
        fh.write(SWANCTL_CONF)
    assert c.ipsec("reload").returncode == 0
    _wait(lambda: c.status()["daemon"]["load_ok"] is True, timeout=20, what="reload loaded the fixed file")
    assert c.ipsec("stop").returncode == 0
