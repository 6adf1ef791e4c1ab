"""Starting and stopping the supervisor for ``ipsec start|stop|restart``.

``judge_start`` and ``map_run_exit`` decide (pure, tested by tables); ``start_detached``,
``start_foreground`` and ``stop_supervisor`` act.  A detached start runs
``ipsec start --nofork`` in its own session, writes the pid file, holds the start lock
until the supervisor reports charon ready (control socket status) or fails, and explains
a failure with the last exit and charon's last log lines.
"""

from __future__ import annotations

import enum
import os
import select
import signal
import sys
import time
from dataclasses import dataclass

from .. import control, presence
from ..config import Config
from ..errors import ExitCode, NotRootError, SupervisorError
from ..runlock import LockHolder, find_lock_holder, held_at, release_at, try_lock_at
from ..trusted_paths import open_trusted_dir
from .pidfile import (START_LOCK_NAME, PidFile, inspect_pid_file, is_supervisor_cmdline, pid_file_path,
                      read_cmdline, remove_pid_file, write_pid_file)

# `typing` is imported for type checkers only: every polled `ipsec status` would pay 3 ms for it.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Callable, TextIO

    from .. import reattach

# `ipsec start` exit codes (strongSwan's starter: LSB codes).
START_OK, START_FAILED, START_BAD_CONFIG, START_NOT_ROOT = 0, 1, 2, 4

LOG_NAME = "supervisor.log"
LOG_ROTATE_BYTES = 10 * 1024 * 1024
READY_STATES = ("settling", "running")
PAUSED_STATES = ("cooldown", "gave-up")    # charon stopped after a crash loop; `ipsec start` tries again


class StartOutcome(enum.Enum):
    WAITING = "waiting"
    READY = "ready"
    CONFIG_FAILED = "config-failed"   # charon runs, but loading its configuration failed
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class StartVerdict:
    """Where a detached start stands (judge_start)."""

    outcome: StartOutcome
    exit_code: int | None = None
    reason: str = ""


def map_run_exit(code: int) -> int:
    """`ipsec-supervisor run`'s exit code as an `ipsec start` exit code (0, 1 or 2)."""
    if code == ExitCode.OK:
        return START_OK
    if code in (ExitCode.CONFIG, ExitCode.USAGE):
        return START_BAD_CONFIG
    if code == ExitCode.NOT_ROOT:
        return START_NOT_ROOT
    return START_FAILED


def describe_run_exit(code: int) -> str:
    """Why a supervisor that exited with CODE (negative: killed by that signal) did so."""
    if code < 0:
        try:
            return f"the supervisor was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"the supervisor was killed by signal {-code}"
    return {
        0: "the supervisor stopped before charon was ready (stopped on request, or charon exited "
           "cleanly and restart.policy says not to restart it)",
        1: "charon failed and the restart policy does not restart it (or another supervisor "
           "holds the run directory)",
        3: "the supervisor's configuration file is invalid",
        8: "the daemon binary is missing or not executable",
        9: "charon kept dying: the crash-loop limit was reached and the supervisor gave up",
        10: "a directory or file of the supervisor is unsafe to use (see its log)",
    }.get(code, f"the supervisor exited with code {code}")


def judge_start(status: dict | None, exited: int | None, elapsed: float, timeout: float) -> StartVerdict:
    """Pure: where a detached start stands, from the last STATUS answer and the child's exit code."""
    if exited is not None:
        return StartVerdict(StartOutcome.FAILED, map_run_exit(exited) or START_FAILED, describe_run_exit(exited))
    if status is not None:
        state = status.get("state")
        daemon = status.get("daemon") or {}
        if state in READY_STATES and daemon.get("ready"):
            if daemon.get("load_ok") is False:
                return StartVerdict(StartOutcome.CONFIG_FAILED, START_BAD_CONFIG,
                                    f"loading charon's configuration failed: {daemon.get('load_error')}")
            return StartVerdict(StartOutcome.READY, START_OK, status.get("summary", ""))
        if state in PAUSED_STATES:
            return StartVerdict(StartOutcome.FAILED, START_FAILED, status.get("summary", state))
        # "stopped": the supervisor is about to exit (crash report, hooks); its exit code says why.
    if elapsed >= timeout:
        where = f"state {status.get('state')}: {status.get('summary')}" if status else \
            "the supervisor never answered on its control socket"
        return StartVerdict(StartOutcome.FAILED, START_FAILED,
                            f"charon was not ready within {timeout:g}s ({where})")
    return StartVerdict(StartOutcome.WAITING)


def default_start_timeout(cfg: Config) -> float:
    """How long `ipsec start` waits: one start, its loads, recovery, and a margin."""
    loads = max(1, len(cfg.effective_load_commands))
    return cfg.daemon.start_timeout + loads * cfg.daemon.load_timeout + cfg.recovery.timeout + 5.0


def default_stop_timeout(cfg: Config) -> float:
    return cfg.stop.timeout + cfg.recovery.timeout + 5.0


# ---------------------------------------------------------------------------
# Finding the running supervisor

@dataclass(frozen=True, slots=True)
class Located:
    """The supervisor for a run directory: its status answer, its lock, and what its pid file says."""

    status: dict | None
    pid_file: PidFile
    error: str | None = None       # why there is no status (not running / not answering)
    lock: LockHolder | None = None
    holder: int | None = None      # a supervisor process holding the lock, found by its process (presence):
                                   # when the run directory was wiped under it

    @property
    def pid(self) -> int | None:
        """The supervisor's pid as its own answer or the kernel's lock table says (never the pid file alone)."""
        if self.status is not None:
            return self.status.get("supervisor", {}).get("pid")
        if self.lock is not None and self.lock.held and self.lock.pid is not None:
            return self.lock.pid
        return self.holder

    @property
    def running(self) -> bool:
        return self.status is not None or (self.lock is not None and self.lock.held) or self.holder is not None

    @property
    def daemon_pid(self) -> int | None:
        return (self.status or {}).get("daemon", {}).get("pid")


def locate(cfg: Config, timeout: float = 3.0) -> Located:
    """Ask the control socket; the supervisor lock says whether one runs, else the supervisor's process
    (its run directory may have been wiped under it).  NotRootError when not allowed."""
    try:    # whether it is held; the holder's pid only when the supervisor does not answer (_without_status)
        lock = find_lock_holder(cfg.paths.run_dir, pid=False)
    except PermissionError:
        lock = LockHolder(os.path.join(cfg.paths.run_dir, "supervisor.lock"), False)
    pid_file = inspect_pid_file(pid_file_path(cfg.paths.run_dir), lock.held)
    try:
        answer = control.request(cfg.paths.run_dir, "status", timeout=timeout)
    except NotRootError:
        raise
    except SupervisorError as exc:
        return _without_status(cfg, pid_file, str(exc), lock)
    except OSError as exc:     # it went away while answering
        return _without_status(cfg, pid_file, f"the control socket failed: {exc.strerror or exc}", lock)
    if not answer.get("ok"):
        return _without_status(cfg, pid_file, str(answer.get("error")), lock)
    return Located(answer["status"], pid_file, None, lock)


def _without_status(cfg: Config, pid_file: PidFile, error: str, lock: LockHolder) -> Located:
    if lock.held and lock.pid is None:
        try:
            lock = find_lock_holder(cfg.paths.run_dir)
        except PermissionError:
            pass
    found = Located(None, pid_file, error, lock)
    if found.running:
        return found
    holders = presence.running_supervisors(cfg.paths.run_dir)
    return Located(None, pid_file, error, lock, holders[0]) if holders else found


def systemd_unit_of(pid: int, proc: str = "/proc") -> str | None:
    """The systemd service whose main process PID is, when systemd runs this system."""
    import shutil
    import subprocess
    if not os.path.isdir("/run/systemd/system") or not shutil.which("systemctl"):
        return None
    try:
        with open(f"{proc}/{pid}/cgroup", encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None
    unit = None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) == 3 and (parts[1] in ("", "name=systemd")):
            for piece in reversed(parts[2].split("/")):
                if piece.endswith(".service"):
                    unit = piece
                    break
        if unit:
            break
    if unit is None:
        return None
    # A supervisor started by `ipsec start` from inside some other service shares its
    # cgroup; only the service's own main process is managed by systemd.
    try:
        main = subprocess.run(["systemctl", "show", "-p", "MainPID", "--value", unit],
                              capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return unit if main == str(pid) else None


def wait_pid_exit(pid: int, timeout: float) -> bool:
    """Wait until PID (not our child) is gone; True if it went within TIMEOUT."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    except OSError:
        fd = -1
    try:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if fd >= 0:
                ready, _, _ = select.select([fd], [], [], max(0.0, left))
                if ready:
                    return True
            else:
                if read_cmdline(pid) in (None, []):
                    return True
                time.sleep(min(0.05, max(0.0, left)))
            if left <= 0:
                return False
    finally:
        if fd >= 0:
            os.close(fd)


def comm_of(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as fh:
            stat = fh.read()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[1])


def unsupervised_daemon(cfg: Config) -> int | None:
    """The pid of a daemon (per daemon.pid_file) that runs without any supervisor or starter.

    What a supervisor killed by SIGKILL leaves: charon, reparented to init.  A charon under
    Debian's starter or under another ipsec-supervisor is not one.
    """
    path = cfg.daemon.pid_file
    name = os.path.basename(cfg.daemon.command[0])
    if not path:
        return None
    try:
        with open(path, encoding="ascii", errors="replace") as fh:
            pid = int(fh.read().strip())
    except (OSError, ValueError):
        return None
    if comm_of(pid) != name[:15] or not read_cmdline(pid):
        return None
    try:        # a pid reused by a charon of another network namespace (a container's) is not ours
        if os.stat(f"/proc/{pid}/ns/net").st_ino != os.stat("/proc/self/ns/net").st_ino:
            return None
    except OSError:
        return None
    parent = _ppid(pid)
    if parent is None:
        return None
    if parent > 1 and (comm_of(parent) == "starter" or is_supervisor_cmdline(read_cmdline(parent) or [])):
        return None
    return pid


def daemon_children(pid: int, name: str) -> list[int]:
    """Child processes of PID called NAME (charon; comm is cut at 15 characters)."""
    found = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as fh:
                stat = fh.read()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        if ppid == pid and comm == name[:15]:
            found.append(int(entry))
    return found


# ---------------------------------------------------------------------------
# Start

class StartLock:
    """The start lock in the run directory: one `ipsec start` at a time decides and starts."""

    def __init__(self, run_dir: str):
        with open_trusted_dir(run_dir, what="paths.run_dir", tighten=True) as run:
            self.path = run.join(START_LOCK_NAME)
        self.run_dir = run_dir
        self.fd = -1

    def acquire(self, timeout: float, on_wait: Callable[[], None] | None = None) -> bool:
        deadline = time.monotonic() + timeout
        waited = False
        while True:
            with open_trusted_dir(self.run_dir, what="paths.run_dir", tighten=True) as run:
                fd = try_lock_at(run, START_LOCK_NAME)
            if fd is not None:
                self.fd = fd
                return True
            if not waited and on_wait:
                on_wait()
            waited = True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def close(self) -> None:
        if self.fd >= 0:
            release_at(self.run_dir, START_LOCK_NAME, self.fd)   # removes the file and releases the lock
            self.fd = -1


@dataclass(frozen=True, slots=True)
class LogSink:
    """Where a detached supervisor's output goes: journald (structured) or a file."""

    fd: int
    where: str                 # "the journal (identifier ipsec-supervisor)" or the file path
    env: dict[str, str]
    path: str | None = None    # the file, if it is one
    offset: int = 0            # its size before this start


def open_log_sink(state_dir: str) -> LogSink:
    """journald's stream socket when journald runs, else STATE_DIR/supervisor.log (rotated at 10 MB)."""
    if os.path.exists("/run/systemd/journal/stdout"):
        try:
            from systemd import journal
            stream = journal.stream("ipsec-supervisor")
            fd = os.dup(stream.fileno())
            stream.close()
            st = os.fstat(fd)
            # notify.configure_logging then logs structured fields through JournalHandler.
            return LogSink(fd, "the journal (journalctl -t ipsec-supervisor)",
                           {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        except (ImportError, OSError):
            pass
    with open_trusted_dir(state_dir, what="paths.state_dir") as state:
        path = state.join(LOG_NAME)
        try:
            if os.stat(LOG_NAME, dir_fd=state.fd, follow_symlinks=False).st_size > LOG_ROTATE_BYTES:
                os.replace(LOG_NAME, LOG_NAME + ".1", src_dir_fd=state.fd, dst_dir_fd=state.fd)
        except FileNotFoundError:
            pass
        fd = state.open(LOG_NAME, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)   # O_NOFOLLOW, ours
    return LogSink(fd, path, {}, path, os.fstat(fd).st_size)


def tail_of(path: str, offset: int, lines: int) -> list[str]:
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read()[-65536:]
    except OSError:
        return []
    return data.decode("utf-8", "replace").splitlines()[-lines:]


def crash_reports_since(cfg: Config, wall: float) -> list[dict]:
    """Crash reports written after WALL (a start's own), oldest first."""
    from ..crashreport import read_crash_reports
    out = []
    try:
        reports = read_crash_reports(cfg.crash_dir)
    except SupervisorError:     # an unsafe directory: the start's own error says more
        return out
    for path, report in reports:
        try:
            if os.path.getmtime(path) >= wall - 1.0:
                out.append(report)
        except OSError:
            continue
    return out


def explain_failure(verdict: StartVerdict, last_status: dict | None, reports: list[dict],
                    log_tail: list[str], log_where: str | None, supervisor_alive: bool,
                    lines: int = 10) -> list[str]:
    """Pure: the lines `ipsec start` prints when charon did not come up."""
    out = [f"ipsec start: charon could not be started: {verdict.reason}"]
    last = (last_status or {}).get("last_exit")
    report = reports[-1] if reports else None
    if last:
        out.append(f"  last exit:   {last['description']} [{last['classification']}]; {last.get('decision')}")
    elif report:
        out.append(f"  last exit:   {report.get('description')} [{report.get('classification')}]; "
                   f"{(report.get('decision') or {}).get('reason')}")
    if last_status and supervisor_alive:
        out.append(f"  supervisor:  pid {last_status['supervisor']['pid']}, state {last_status['state']} "
                   f"(it keeps to its restart policy; 'ipsec stop' ends it)")
    log_lines = (report or {}).get("last_log_lines") or []
    if log_lines:
        out.append("  charon's last lines (crash report):")
        out += [f"    {line}" for line in log_lines[-lines:]]
    elif log_tail:
        out.append(f"  supervisor's last lines ({log_where}):")
        out += [f"    {line}" for line in log_tail[-lines:]]
    elif log_where:
        out.append(f"  supervisor log: {log_where}")
    return out


def child_argv(config_path: str | None, verbose: bool) -> list[str]:
    argv = [sys.executable, "-m", "supervisor.ipsec_cli"]
    if config_path:
        argv += ["--config", os.path.abspath(config_path)]
    if verbose:
        argv.append("--verbose")
    # --raw-exit: the parent explains the supervisor's own exit code (9 = crash loop, ...).
    return argv + ["start", "--nofork", "--raw-exit"]


def _progress_note(status: dict | None, seen: set[str]) -> str | None:
    """A line worth showing while waiting (charon died, restarting), once each."""
    if not status:
        return None
    last = status.get("last_exit")
    if last and last.get("died_at_monotonic") is not None:
        key = f"exit-{last['died_at_monotonic']}"
        if key not in seen:
            seen.add(key)
            return f"charon {last['description']} [{last['classification']}]; {last.get('decision')}"
    return None


def start_detached(cfg: Config, config_path: str | None, *, timeout: float, verbose: bool,
                   out: TextIO, err: TextIO, poll: float = 0.05) -> int:
    """`ipsec start`: detach a supervisor, wait for charon ready; the `ipsec start` exit code."""
    import subprocess
    run_dir = cfg.paths.run_dir
    lock = StartLock(run_dir)
    try:
        if not lock.acquire(timeout, lambda: print("ipsec start: another 'ipsec start' is running; "
                                                   "waiting for it", file=err)):
            print(f"ipsec start: another 'ipsec start' still holds {lock.path} after {timeout:g}s", file=err)
            return START_FAILED
        found = locate(cfg)
        if found.running and (found.status or {}).get("state") in PAUSED_STATES:
            return _start_again(cfg, found, timeout=timeout, out=out, err=err, poll=poll)
        if found.running:
            _say_already_running(found, err)
            return START_OK
        _clear_stale(found.pid_file, err)
        open_trusted_dir(cfg.paths.state_dir, what="paths.state_dir").close()   # unsafe: exit 10, said here
        orphan = unsupervised_daemon(cfg)
        verdict = _reattach_verdict(cfg) if orphan is not None else None
        name = os.path.basename(cfg.daemon.command[0])
        if verdict is not None and verdict.attach and verdict.pid == orphan:
            print(f"ipsec start: {name} (pid {orphan}) runs without a supervisor (the one that started it died); "
                  "the new supervisor re-attaches to it", file=err)
        elif orphan is not None:
            print(f"ipsec start: {name} (pid {orphan}, {cfg.daemon.pid_file}) is already running without "
                  f"a supervisor (the one that started it died); 'ipsec stop' stops it, then start again",
                  file=err)
            return START_FAILED
        sink = open_log_sink(cfg.paths.state_dir)
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID",
                                                                 "JOURNAL_STREAM", "LISTEN_FDS", "LISTEN_PID")}
        env.update(sink.env)
        started_wall = time.time()
        t0 = time.monotonic()
        try:
            child = subprocess.Popen(child_argv(config_path, verbose), stdin=subprocess.DEVNULL, stdout=sink.fd,
                                     stderr=sink.fd, cwd="/", env=env, close_fds=True, start_new_session=True)
        finally:
            os.close(sink.fd)
        write_pid_file(pid_file_path(run_dir), child.pid)
        if err.isatty():
            print(f"Starting ipsec-supervisor (pid {child.pid}), log: {sink.where}", file=err)
        verdict, last_status, exited = _wait_decided(run_dir, child.poll, t0, timeout, poll, err)
        if exited is None and verdict.outcome is StartOutcome.FAILED and cfg.restart.crash_loop.action == "exit":
            try:                # it gave up and exits: its exit code and crash report say more
                exited = child.wait(5.0)
                verdict = judge_start(None, exited, 0.0, timeout)
            except subprocess.TimeoutExpired:
                pass
        if exited is not None:
            remove_pid_file(pid_file_path(run_dir), child.pid)
            other = locate(cfg)
            if other.running:   # lost a race against a supervisor started another way
                _say_already_running(other, err)
                return START_OK
        said = _say_ready(verdict, last_status, f"ipsec-supervisor started (pid {child.pid})",
                          time.monotonic() - t0, out, err)
        if said is not None:
            return said
        reports = crash_reports_since(cfg, started_wall)
        tail = tail_of(sink.path, sink.offset, 10) if sink.path else []
        for line in explain_failure(verdict, last_status, reports, tail, sink.where, exited is None):
            print(line, file=err)
        return verdict.exit_code or START_FAILED
    finally:
        lock.close()


def _start_again(cfg: Config, found: Located, *, timeout: float, out: TextIO, err: TextIO, poll: float) -> int:
    """`ipsec start` while the supervisor pauses after a crash loop: it tries at once; wait as a start does."""
    run_dir, pid = cfg.paths.run_dir, found.pid
    assert found.status is not None
    print(f"ipsec-supervisor (pid {pid}): {found.status.get('summary')}; trying again now", file=err)
    try:
        control.request(run_dir, "start", timeout=3.0)   # refused only if it already started again
    except (SupervisorError, OSError) as exc:
        print(f"ipsec start: cannot ask ipsec-supervisor (pid {pid}) to start charon: {exc}", file=err)
        return START_FAILED

    def exited() -> int | None:
        return START_FAILED if read_cmdline(pid) in (None, []) else None
    t0 = time.monotonic()
    verdict, last_status, gone = _wait_decided(run_dir, exited, t0, timeout, poll, err, found.status)
    if gone is not None:
        print(f"ipsec start: ipsec-supervisor (pid {pid}) exited while charon was starting again "
              f"(its log and 'ipsec crashes' say why)", file=err)
        return START_FAILED
    said = _say_ready(verdict, last_status, f"ipsec-supervisor (pid {pid})", time.monotonic() - t0, out, err)
    if said is not None:
        return said
    for line in explain_failure(verdict, last_status, [], [], None, True):
        print(line, file=err)
    return verdict.exit_code or START_FAILED


def _wait_decided(run_dir: str, exited: Callable[[], int | None], t0: float, timeout: float, poll: float,
                  err: TextIO, last_status: dict | None = None) -> tuple[StartVerdict, dict | None, int | None]:
    """Poll the supervisor's status until a start is decided: (verdict, last status seen, exit code or None)."""
    seen: set[str] = set()
    while True:
        code = exited()
        status = None
        if code is None:
            try:
                answer = control.request(run_dir, "status", timeout=2.0)
                if answer.get("ok"):
                    status = last_status = answer["status"]
            except (SupervisorError, OSError):    # not up yet, or exiting while answering
                pass
        verdict = judge_start(status, code, time.monotonic() - t0, timeout)
        note = _progress_note(status, seen)
        if note and err.isatty():
            print(f"  {note}", file=err)
        if verdict.outcome is not StartOutcome.WAITING:
            return verdict, last_status, code
        time.sleep(poll)


def _say_ready(verdict: StartVerdict, last_status: dict | None, who: str, took: float,
               out: TextIO, err: TextIO) -> int | None:
    """Say a start's good or config-failed outcome; its exit code, or None for a failure still to explain."""
    if verdict.outcome is StartOutcome.READY:
        daemon = (last_status or {}).get("daemon") or {}
        print(f"{who}: charon ready (pid {daemon.get('pid')}) in {took:.1f}s", file=out)
        return START_OK
    if verdict.outcome is StartOutcome.CONFIG_FAILED:
        print(f"ipsec start: charon runs (pid {last_status['daemon']['pid']}), but {verdict.reason}; "
              f"fix it and run 'ipsec reload'", file=err)
        return START_BAD_CONFIG
    return None


def _reattach_verdict(cfg: Config) -> reattach.ReattachDecision | None:
    """Whether the supervisor about to start will re-attach to the charon that runs alone."""
    from .. import reattach      # the ledger and ownership code: only a start needs them
    try:
        return reattach.decide_reattach(reattach.gather_facts(cfg))
    except OSError:
        return None


def _say_already_running(found: Located, err: TextIO) -> None:
    summary = (found.status or {}).get("summary")
    what = f": {summary}" if summary else f" (not answering on its control socket: {found.error})"
    print(f"ipsec-supervisor is already running (pid {found.pid}){what}", file=err)


def _clear_stale(pid_file: PidFile, err: TextIO) -> None:
    if pid_file.state.stale:
        if remove_pid_file(pid_file.path, pid_file.pid):
            print(f"ipsec: removed {pid_file.describe()}", file=err)


def start_foreground(cfg: Config, config_path: str | None, *, verbose: bool, out: TextIO, err: TextIO,
                     run: Callable[[list[str]], int], raw_exit: bool = False, timeout: float = 30.0) -> int:
    """`ipsec start --nofork`: run the supervisor in this process (pid file kept meanwhile).

    Returns the `ipsec start` exit code, or with RAW_EXIT the supervisor's own. A supervisor
    pausing after a crash loop is asked to try again at once, as `ipsec start` does.
    """
    found = locate(cfg)
    if found.running and found.pid != os.getpid() and (found.status or {}).get("state") in PAUSED_STATES:
        return _start_again(cfg, found, timeout=timeout, out=out, err=err, poll=0.05)
    if found.running and found.pid != os.getpid():
        _say_already_running(found, err)
        return START_OK
    _clear_stale(found.pid_file, err)
    control.prepare_run_dir(cfg.paths.run_dir)
    path = pid_file_path(cfg.paths.run_dir)
    write_pid_file(path, os.getpid())
    try:
        argv = (["--verbose"] if verbose else []) + ["run"] + (["--config", config_path] if config_path else [])
        code = run(argv)
        return code if raw_exit else map_run_exit(code)
    finally:
        remove_pid_file(path, os.getpid())


# ---------------------------------------------------------------------------
# Stop

@dataclass(frozen=True, slots=True)
class StopResult:
    """What `ipsec stop` did; CLEAN is False when something had to be killed."""

    was_running: bool
    clean: bool
    lines: tuple[str, ...]


def stop_supervisor(cfg: Config, *, timeout: float, err: TextIO,
                    systemctl: Callable[[list[str]], int] | None = None) -> StopResult:
    """Stop the supervisor (control socket, else SIGTERM), wait, kill if it must; never raises for 'not running'."""
    if _start_under_way(cfg.paths.run_dir):
        # An `ipsec start` is deciding: its supervisor may not hold its lock yet, or may hold it while
        # charon is not ready. Stopping now would cut that start short (it would fail, exit 1), or
        # miss a supervisor not yet locked: let the start finish, then stop what it started. Asked
        # before locate: a start that finishes between the two would otherwise be missed.
        print("ipsec stop: an 'ipsec start' is under way; waiting for it to finish", file=err)
        deadline = time.monotonic() + timeout
        while _start_under_way(cfg.paths.run_dir) and time.monotonic() < deadline:
            time.sleep(0.05)
    found = locate(cfg)
    lines: list[str] = []
    if not found.running:
        if found.pid_file.state.stale:
            _clear_stale(found.pid_file, err)
        orphan = unsupervised_daemon(cfg)
        if orphan is None:
            return StopResult(False, True, ("ipsec-supervisor is not running",))
        name = os.path.basename(cfg.daemon.command[0])
        print(f"ipsec-supervisor is not running, but {name} (pid {orphan}) runs without it "
              f"(its supervisor died); stopping {name}...", file=err)
        return StopResult(False, False, tuple(_stop_daemon(orphan, name, "runs without a supervisor")))
    pid = found.pid
    if pid is None:     # the lock is held, but by a process we cannot see (another pid namespace)
        return StopResult(True, False, (f"{found.lock.describe() if found.lock else 'a supervisor runs'}, but "
                                        "its pid cannot be confirmed from here; nothing was signalled "
                                        "(stop it where it runs)",))
    unit = systemd_unit_of(pid)
    if unit:
        print(f"Stopping {unit} (ipsec-supervisor pid {pid}) through systemd...", file=err)
        rc = (systemctl or _systemctl)(["stop", unit])
        gone = wait_pid_exit(pid, 1.0)
        return StopResult(True, rc == 0 and gone, () if rc == 0 else (f"systemctl stop {unit} exited with {rc}",))
    daemon_name = os.path.basename(cfg.daemon.command[0])
    daemons = [found.daemon_pid] if found.daemon_pid else daemon_children(pid, daemon_name)
    what = f" and {daemon_name} (pid {', '.join(map(str, daemons))})" if daemons else ""
    print(f"Stopping ipsec-supervisor (pid {pid}){what}...", file=err)
    asked = False
    if found.status is not None:
        try:
            asked = bool(control.request(cfg.paths.run_dir, "stop", timeout=3.0).get("ok"))
        except (SupervisorError, OSError):
            asked = False
    if not asked:
        try:
            os.kill(pid, signal.SIGTERM)
            os.kill(pid, signal.SIGCONT)     # a stopped supervisor would never see the SIGTERM
        except ProcessLookupError:
            pass
    clean = wait_pid_exit(pid, timeout)
    if not clean:
        lines.append(f"ipsec-supervisor (pid {pid}) did not stop within {timeout:g}s; killed it (SIGKILL)")
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        wait_pid_exit(pid, 5.0)
    # A charon outliving its supervisor would be unsupervised: it goes too. One the supervisor
    # re-attached to is not its child: the pid file names it, now without a supervisor.
    orphan = unsupervised_daemon(cfg)
    if orphan is not None and orphan not in daemons:
        daemons.append(orphan)
    for dpid in daemons:
        if comm_of(dpid) == daemon_name[:15] and read_cmdline(dpid):
            lines += _stop_daemon(dpid, daemon_name, "outlived its supervisor")
            clean = False
    remove_pid_file(pid_file_path(cfg.paths.run_dir), pid)
    return StopResult(True, clean, tuple(lines))


def _start_under_way(run_dir: str) -> bool:
    """Whether an `ipsec start` holds the start lock; False where we may not look (locate then says why)."""
    try:
        return held_at(run_dir, START_LOCK_NAME)
    except PermissionError:
        return False


def _stop_daemon(pid: int, name: str, why: str, timeout: float = 10.0) -> list[str]:
    """SIGTERM (charon then removes its kernel state), SIGKILL after TIMEOUT."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return []
    if wait_pid_exit(pid, timeout):
        return [f"{name} (pid {pid}) {why}; stopped it with SIGTERM"]
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    wait_pid_exit(pid, 2.0)
    return [f"{name} (pid {pid}) {why} and did not stop within {timeout:g}s of SIGTERM; killed it "
            "(its kernel state stays: 'ipsec flush' removes it)"]


def _systemctl(args: list[str]) -> int:
    import subprocess
    try:
        return subprocess.run(["systemctl", *args]).returncode
    except OSError as exc:
        print(f"ipsec: cannot run systemctl: {exc.strerror}", file=sys.stderr)
        return 1

