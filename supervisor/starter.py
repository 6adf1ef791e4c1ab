"""The supervisor: runs the IKE daemon under the restart policy in one event loop.

Everything arrives as an event in one selectors loop (eventloop.Loop): the daemon's death
through a pidfd, signals through a wakeup fd, daemon output through a pipe, VICI answers
through a non-blocking socket, timers as loop deadlines.  State changes go through
``states.step``; decisions come from ``policy``; this module only acts.

The sequence after a death is: classify and decide (policy.decide), recover
(``Recovery.on_daemon_exit``, the kernel-state hook point), then restart (or stay stopped).
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import dataclasses
import datetime as _dt
import itertools
import logging
import os
import queue
import random
import shutil
import signal
import struct
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Callable, Protocol

from . import __version__
from . import crashreport, daemons, presence, reattach, runfiles
from .config import Config, Hook, changed_keys, format_duration, load_config
from .control import LOCK_NAME, SOCKET_NAME, ControlServer, Deferred, lock_run_dir, unlock_run_dir
from .frontend.pidfile import PID_FILE_NAME, write_pid_file
from .errors import ConfigError, ExitCode, SupervisorError, printable
from .trusted_paths import open_trusted_dir
from .metrics import tell
from .eventloop import Loop, SignalWakeup, ThreadWakeup, Timer
from .jobs import AttachedProcess, Child, Job, JobResult
from .ledger import LEDGER_FILE
from .loads import RELOAD, UPDATE, ConfigLoads, LoadOutcome, restarting_answer, split_daemon_keys
from .notify import PRIVATE_ENV, Notifier, fields
from .policy import (Action, Cause, Decision, ExitInfo, cooldowns_in_a_row, decide, deaths_in_window, exit_info,
                     format_wait, prune_history, signal_name)
from .states import DAEMON_ALIVE, Event, State, step
from .vici_probe import ProbeResult, ViciProbe

RESTORE_DELAY = 0.05        # after the first sign of a wiped run directory
RUN_DIR_CHECK = 2.0         # the run directory is looked at this often besides inotify
# Standard signals an inherited SIG_IGN is reset for at start; not Python's own ignores (SIGPIPE,
# SIGXFSZ: restore_signals resets them in each child) nor those that cannot be caught.
RESET_IF_IGNORED = tuple(s for s in signal.Signals if s < 32 and s not in (
    signal.SIGKILL, signal.SIGSTOP, signal.SIGPIPE, signal.SIGXFSZ))

log = logging.getLogger("supervisor")
STATUS_REFRESH = 10.0     # seconds between STATUS= updates while a cooldown counts down
daemon_log = logging.getLogger("supervisor.daemon")
job_log = logging.getLogger("supervisor.job")


# ---------------------------------------------------------------------------
# The recovery hook point (filled in by the kernel-state recovery work).

@dataclass(frozen=True, slots=True)
class StartContext:
    """Given to ``Recovery.before_start``: which start this is and what ended the last run."""

    attempt: int                 # 1 = first start of this supervisor, then +1 per restart
    last_exit: ExitInfo | None   # None on the first start
    config: Config


@dataclass(frozen=True, slots=True)
class ReadyContext:
    """Given to ``Recovery.on_daemon_ready``: the daemon answers VICI and its config is loaded."""

    pid: int
    started_at: float            # monotonic
    ready_at: float
    load_ok: bool
    last_exit: ExitInfo | None
    config: Config


class Recovery(Protocol):
    """Kernel-state recovery around daemon runs.

    Every method runs in the supervisor's worker thread (never in the loop thread), one at a
    time and in order, each within ``recovery.timeout``; the loop waits for it in the state
    shown.  An exception is logged and the sequence goes on.
    """

    def before_start(self, context: StartContext) -> None:
        """PREPARING: before the daemon is spawned (e.g. snapshot what a dead daemon left)."""

    def on_daemon_ready(self, context: ReadyContext) -> None:
        """LOADING, after the load commands: adopt or flush leftovers now charon is back."""

    def on_daemon_exit(self, exit_info: ExitInfo, decision: Decision) -> None:
        """RECOVERING: the daemon is dead; ``decision`` says restart, stop or give up (fail closed)."""


# Optional Recovery methods, called only when the object has them (NoRecovery has none):
#   attach(loop) / detach()        loop thread, once at the start / end of run(): e.g. register
#                                  fds (kernel monitors) in the loop; detach runs before it closes
#   on_daemon_spawned(pid)         loop thread, right after the spawn; must not block (attribution
#                                  of kernel changes by the daemon's netlink ports starts here)
#   crash_report_section(info)     reports thread, before a crash report for INFO is written; may
#                                  wait (bounded) for on_daemon_exit; its dict goes under "recovery"
#   status()                       loop thread, for the control socket's status; must be quick
#   on_daemon_reattached(pid, start_time)  recovery worker, instead of before_start when the supervisor
#                                  takes over the daemon an earlier one started (supervisor/reattach.py)
#   restore_files()                loop thread: the run directory was wiped; write what recovery keeps there
#   adoption_coming()              loop thread, as a start load begins: leftovers wait for the new daemon's
#                                  adoption (its start load is then paced: supervisor/vici_relay.py)
OPTIONAL_RECOVERY_HOOKS = ("attach", "detach", "on_daemon_spawned", "on_daemon_reattached", "on_config",
                           "crash_report_section", "restore_files", "status", "adoption_coming")


class NoRecovery:
    """The default: recovery does nothing."""

    def before_start(self, context: StartContext) -> None:
        pass

    def on_daemon_ready(self, context: ReadyContext) -> None:
        pass

    def on_daemon_exit(self, exit_info: ExitInfo, decision: Decision) -> None:
        pass


class _Worker:
    """One background thread running calls in order; results come back through the loop."""

    def __init__(self, wakeup: ThreadWakeup, name: str):
        self._wakeup = wakeup
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], None], done: Callable[[BaseException | None], None]) -> None:
        self._queue.put((fn, done))

    def _serve(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fn, done = item
            try:
                fn()
                exc = None
            except BaseException as e:  # noqa: BLE001 - reported through the loop
                exc = e
            self._wakeup.post(lambda done=done, exc=exc: done(exc))

    def close(self) -> None:
        self._queue.put(None)


# ---------------------------------------------------------------------------
# Pid file / socket appearance without polling.

class DirWatch:
    """inotify on the directories of the pid file and VICI socket; ``changed(name)`` per event."""

    IN_MODIFY, IN_CLOSE_WRITE, IN_MOVED_TO, IN_CREATE = 0x2, 0x8, 0x80, 0x100
    IN_MOVED_FROM, IN_DELETE, IN_DELETE_SELF, IN_MOVE_SELF, IN_IGNORED = 0x40, 0x200, 0x400, 0x800, 0x8000
    APPEAR = IN_CREATE | IN_CLOSE_WRITE | IN_MOVED_TO | IN_MODIFY
    VANISH = IN_DELETE | IN_MOVED_FROM | IN_DELETE_SELF | IN_MOVE_SELF
    IN_NONBLOCK, IN_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC
    _EVENT = struct.Struct("iIII")

    def __init__(self, loop: Loop, changed: Callable[[str, str], None]):
        self._loop = loop
        self._changed = changed
        self._wds: dict[int, str] = {}
        self.fd = -1
        try:
            self._libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
            fd = self._libc.inotify_init1(self.IN_NONBLOCK | self.IN_CLOEXEC)
        except (OSError, AttributeError):
            return
        if fd >= 0:
            self.fd = fd
            loop.add_reader(fd, self._read)

    @property
    def available(self) -> bool:
        return self.fd >= 0

    def watch(self, directory: str, mask: int = APPEAR) -> bool:
        if self.fd < 0:
            return False
        if directory in self._wds.values():
            return True
        wd = self._libc.inotify_add_watch(self.fd, os.fsencode(directory), mask)
        if wd < 0:
            return False
        self._wds[wd] = directory
        return True

    def unwatch_all(self) -> None:
        """Stop watching (an idle supervisor should not wake up for every change in /run)."""
        for wd in list(self._wds):
            self._libc.inotify_rm_watch(self.fd, wd)
        self._wds.clear()

    def _read(self) -> None:
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        off = 0
        seen = set()
        while off + self._EVENT.size <= len(data):
            wd, mask, _cookie, length = self._EVENT.unpack_from(data, off)
            name = data[off + self._EVENT.size: off + self._EVENT.size + length].split(b"\0", 1)[0]
            off += self._EVENT.size + length
            key = (self._wds.get(wd, ""), os.fsdecode(name))
            if mask & self.IN_IGNORED:
                self._wds.pop(wd, None)      # the directory itself is gone: watch it again when it is back
            if key not in seen:
                seen.add(key)
                self._changed(*key)

    def close(self) -> None:
        if self.fd >= 0:
            self._loop.forget(self.fd)
            os.close(self.fd)
            self.fd = -1


def uptime_text(seconds: float) -> str:
    """'3h12m', '2d4h', '45s': how long a daemon has been up, for people."""
    s = int(seconds)
    d, h, m = s // 86400, s % 86400 // 3600, s % 3600 // 60
    if d:
        return f"{d}d{h}h"
    if h:
        return f"{h}h{m:02d}m"
    if m:
        return f"{m}m{s % 60:02d}s"
    return f"{s}s"


def _read_pid(path: str) -> int | None:
    try:
        with open(path, encoding="ascii", errors="replace") as fh:
            return int(fh.read().strip() or "x")
    except (OSError, ValueError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _zombie(pid: int) -> bool:
    fields = reattach.stat_fields(pid)
    return fields is not None and fields[0] in ("Z", "X")


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as fh:
            return fh.read().strip()
    except OSError:
        return ""


# ---------------------------------------------------------------------------

@dataclass
class _Run:
    """The daemon run in progress (mutable, owned by the loop)."""

    child: Child
    started_at: float
    ready_at: float | None = None
    okay_at: float | None = None
    cause: Cause = Cause.NONE


class Supervisor:
    """Runs the daemon under ``config`` until stopped; ``run()`` returns the exit code.

    ``recovery`` is the kernel-state hook object (see Recovery); ``clock``/``wall_clock``/``rand``
    are injectable for tests; ``reload_config`` is what SIGHUP calls (default: load_config(config_path)).
    """

    def __init__(self, config: Config, *, config_path: str | None = None, recovery: Recovery | None = None,
                 notifier: Notifier | None = None, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time, rand: Callable[[], float] = random.random,
                 reload_config: Callable[[], Config] | None = None, environ: dict[str, str] | None = None,
                 observer: object | None = None):
        self.config = config
        # Metrics (supervisor.metrics.MetricsObserver): told of events through _observe, never decides.
        self.observer = observer
        self.recovery: Recovery = recovery or NoRecovery()
        self.notifier = notifier or Notifier()
        self._clock = clock
        self._wall = wall_clock
        self._rand = rand
        self._reload_fn = reload_config or (lambda: load_config(config_path))
        self._environ = dict(os.environ if environ is None else environ)
        self.state = State.STOPPED
        self._state_since = clock()
        self._events: collections.deque = collections.deque()
        self._stepping = False
        self._state_timers: list[Timer] = []
        self._run: _Run | None = None
        self._history: list[ExitInfo] = []
        self._last_exit: ExitInfo | None = None
        self._decision: Decision | None = None
        self._restarts = 0
        self._starts = 0
        self._cooldowns = 0                 # crash-loop cooldowns in a row (policy.cooldowns_in_a_row)
        self._starter_pid: str | None = None
        self._next_start_at: float | None = None
        self._stop_requested = False
        self._finishing = False
        self._exit_code = int(ExitCode.OK)
        self._ring: collections.deque[str] = collections.deque(maxlen=config.daemon.log_lines)
        self._loads: ConfigLoads | None = None
        self._hooks: set[Job] = set()
        self._probe: ViciProbe | None = None
        self._health_timer: Timer | None = None
        self._health_failures = 0
        self._last_probe_ok_at: float | None = None
        self._ready_retry = 0.01
        self._tokens = itertools.count(1)
        self._pending_recovery: int | None = None
        self._config_loaded_at = wall_clock()
        self._reload_error: str | None = None
        self._last_report: str | None = None
        self._loop: Loop | None = None
        self._worker: _Worker | None = None
        self._reports: _Worker | None = None
        self._pending_reports = 0
        self._dirwatch: DirWatch | None = None
        self._reattach: reattach.ReattachDecision | None = None  # this run's daemon was re-attached
        self._first_reattach: reattach.ReattachDecision | None = None  # run()'s decision for the first start
        self._lock_fd = -1
        self._control_server: ControlServer | None = None
        self._run_files: dict[str, tuple[int, int]] = {}        # name in run_dir -> (dev, ino) we made
        self._pid_file_mine = False
        self._runwatch: DirWatch | None = None
        self._restore_timer: Timer | None = None

    # -- running ---------------------------------------------------------
    def run(self) -> int:
        """Start the daemon and supervise it until stopped or given up; returns the exit code."""
        self._check_daemon_binary()
        run_dir = self.config.paths.run_dir
        # Found by its process, not by files in run_dir: those may have been wiped under it.
        others = presence.running_supervisors(run_dir)
        if others:
            raise SupervisorError(f"already running (pid {others[0]}, holding {run_dir}'s lock); nothing was "
                                  "started", ExitCode.OK)
        try:
            self._lock_fd = lock_run_dir(run_dir)
        except OSError as exc:
            raise SupervisorError(f"cannot use the run directory {run_dir}: {exc.strerror or exc} "
                                  f"(paths.run_dir in {self.config.source})") from None
        try:
            # Checked (and created 0700) now, so an unsafe one is refused before charon starts,
            # not found out when the first crash report cannot be written.
            open_trusted_dir(self.config.paths.state_dir, what="paths.state_dir").close()
            self._pid_file_mine = _read_pid(os.path.join(run_dir, PID_FILE_NAME)) == os.getpid()
            # Decided once, holding the lock, before anything else looks at a running charon: one that may
            # be re-attached is ours to take over, not "another daemon" to refuse (the first PREPARING acts).
            self._first_reattach = (self._reattach_verdict() if hasattr(self.recovery, "on_daemon_reattached")
                                    else None)
            running = None if self._first_reattach is not None and self._first_reattach.attach \
                else self._daemon_already_running()
            if running:
                raise SupervisorError(f"not starting {self._daemon_name}: {running}; a second one would take over "
                                      "the running one's control sockets and then fail. Nothing was changed; stop "
                                      "it first, then start the supervisor", ExitCode.FAILED)
        except BaseException as exc:
            unlock_run_dir(run_dir, self._lock_fd)
            if isinstance(exc, OSError):
                raise SupervisorError(f"cannot use the state directory {self.config.paths.state_dir}: "
                                      f"{exc.strerror or exc} (paths.state_dir in {self.config.source})") from None
            raise
        # Children inherit the spawning thread's signal mask: make sure it is empty.  Ignored
        # dispositions survive exec too: SIGCHLD inherited as SIG_IGN would make the kernel reap our
        # children before waitpid() can, and a start from a script's background job (SIGINT, SIGQUIT
        # ignored) or nohup (SIGHUP) would hand them on to charon.
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        for sig in RESET_IF_IGNORED:
            if signal.getsignal(sig) == signal.SIG_IGN:
                signal.signal(sig, signal.SIG_DFL)
        loop = self._loop = Loop(self._clock)
        signals = wakeup = control = None
        try:
            signals = SignalWakeup(loop, {
                signal.SIGTERM: lambda s: self.request_stop(f"received {signal_name(s)}"),
                signal.SIGINT: lambda s: self.request_stop(f"received {signal_name(s)}"),
                signal.SIGHUP: lambda s: self._sighup(),
                signal.SIGUSR1: lambda s: self.reload_daemon("SIGUSR1", RELOAD),
            })
            wakeup = ThreadWakeup(loop)
            self._worker = _Worker(wakeup, "recovery")
            self._reports = _Worker(wakeup, "reports")
            self._dirwatch = DirWatch(loop, self._dir_changed)
            self._loads = ConfigLoads(loop, config=lambda: self.config, env=self._daemon_env,
                                      daemon_name=lambda: self._daemon_name, changed=self._publish_status,
                                      wall_clock=self._wall, start_relay=self._start_relay)
            self._recovery_hook("attach", loop)
            self._observe("attach", loop, self)
            control = self._control_server = ControlServer(loop, run_dir, self._control)
            try:
                control.start()
            except OSError as exc:
                raise SupervisorError(f"cannot listen on {control.path}: {exc.strerror or exc} "
                                      f"(paths.run_dir in {self.config.source})") from None
            self._starter_pid = runfiles.claim_starter_pid(runfiles.starter_pid_path(self.config.daemon.pid_file),
                                                           os.getpid())
            self._note_run_files()
            self._runwatch = DirWatch(loop, lambda d, n: self._run_dir_changed())
            self._runwatch.watch(run_dir, DirWatch.VANISH)
            self._check_run_dir_later()
            interval = self.notifier.watchdog_interval()
            if interval:
                self._watchdog(interval)
            log.info("ipsec-supervisor %s starting %s (config: %s)", __version__,
                     " ".join(self.config.daemon.command), self.config.source)
            self._fire(Event.START, "supervisor started")
            while not self._done():
                loop.run_once()
            log.info("ipsec-supervisor exiting with code %d", self._exit_code)
            return self._exit_code
        except BaseException:
            # A bug (or KeyboardInterrupt outside the loop): never leave the daemon unsupervised.
            if self._run is not None:
                log.critical("supervisor failed; killing %s (pid %d)", self._daemon_name, self._run.child.pid)
                self._run.child.close()
            raise
        finally:
            for job in list(self._hooks):
                job.cancel()
            if self._loads:
                self._loads.close()
                self._loads.remove_records()
            if self._probe:
                self._probe.cancel()
            if self._control_server:
                self._control_server.close()
            if self._dirwatch:
                self._dirwatch.close()
            if self._runwatch:
                self._runwatch.close()
            self._observe("detach")
            runfiles.release_starter_pid(self._starter_pid, os.getpid())
            if self._run is None:
                self._remove_stale_daemon_files()
            self._recovery_hook("detach")
            for worker in (self._worker, self._reports):
                if worker:
                    worker.close()
            if wakeup:
                wakeup.close()
            if signals:
                signals.close()
            loop.close()
            unlock_run_dir(run_dir, self._lock_fd)

    def _sighup(self) -> None:
        """strongSwan's SIGHUP: re-read the configuration, then apply what changed to the daemon."""
        ok, _msg = self.reload_config("SIGHUP")
        if ok:
            self.reload_daemon("SIGHUP", UPDATE)

    def _done(self) -> bool:
        return self._finishing and not self._hooks and not self._pending_reports and self._run is None

    def _check_daemon_binary(self) -> None:
        argv0 = self.config.daemon.command[0]
        path = argv0 if "/" in argv0 else shutil.which(argv0, path=self._environ.get("PATH"))
        if not path or not os.path.isfile(path) or not os.access(path, os.X_OK):
            raise SupervisorError(f"daemon {argv0} is missing or not executable (daemon.command in "
                                  f"{self.config.source}); install strongSwan or fix the path",
                                  ExitCode.NO_DAEMON)

    def _daemon_already_running(self) -> str | None:
        """Which daemon of ours (the configured binary, as root) runs in our network namespace without
        being our child, in words; None when there is none (or it cannot be told: the daemon refuses
        to run twice itself)."""
        argv0 = self.config.daemon.command[0]
        binary = argv0 if "/" in argv0 else shutil.which(argv0, path=self._environ.get("PATH")) or argv0
        try:
            found = daemons.detect(os.stat("/proc/self/ns/net").st_ino, (binary,))
        except (daemons.DetectionError, OSError) as exc:
            log.warning("cannot tell whether %s already runs here: %s", self._daemon_name, exc)
            return None
        mine = self._run.child.pid if self._run is not None else None
        running = [d for d in found if d.ours and d.pid != mine]
        if not running:
            return None
        return (f"{daemons.describe_all(running)} already runs in this network namespace, not started by this "
                "supervisor")

    @property
    def _daemon_name(self) -> str:
        return os.path.basename(self.config.daemon.command[0])

    def _now(self) -> float:
        return self._clock()

    # -- state machine ---------------------------------------------------
    def _fire(self, event: Event, why: str = "") -> None:
        """Queue ``event``; events are stepped one at a time, in order, each logged once."""
        self._events.append((event, why))
        if self._stepping:
            return
        self._stepping = True
        try:
            while self._events:
                ev, reason = self._events.popleft()
                old = self.state
                new = step(old, ev)
                if new is old:
                    log.debug("%s in state %s: nothing to change (%s)", ev.value, old.value, reason)
                    continue
                for t in self._state_timers:
                    t.cancel()
                self._state_timers.clear()
                self._pending_recovery = None  # a recovery call belongs to the state that made it
                self.state = new
                self._state_since = self._now()
                log.info("state %s -> %s on %s%s", old.value, new.value, ev.value, f": {reason}" if reason else "",
                         extra=fields(supervisor_state=new.value,
                                      daemon_pid=self._run.child.pid if self._run else None))
                self._leave(old, new)
                getattr(self, f"_enter_{new.name.lower()}")()
                self._publish_status()
                self._observe("transition", old, new)
        finally:
            self._stepping = False

    def _timer(self, delay: float, callback: Callable[[], None]) -> Timer:
        """A timer that dies with the current state."""
        assert self._loop is not None
        t = self._loop.call_later(delay, callback)
        self._state_timers.append(t)
        return t

    def _leave(self, old: State, new: State) -> None:
        if old is State.STARTING and self._dirwatch:
            self._dirwatch.unwatch_all()
        if new not in (State.SETTLING, State.RUNNING):
            self._stop_health()
        if new not in DAEMON_ALIVE and old in DAEMON_ALIVE and self._loads:
            # Waiting clients: a restart's load reads the files anyway; a stop leaves nothing to load.
            self._loads.end_run(restarting=self._restarting())

    # PREPARING: recovery.before_start, then spawn
    def _enter_preparing(self) -> None:
        self._next_start_at = None
        self._starts += 1
        if self._starts > 1:
            self._restarts += 1
        self._reattach = None
        verdict, self._first_reattach = self._first_reattach, None
        if verdict is not None and self._starts == 1:
            if verdict.attach:
                self._call_recovery("on_daemon_reattached", (verdict.pid, verdict.start_time),
                                    lambda: self._attach(verdict))
                return
        ctx = StartContext(self._starts, self._last_exit, self.config)
        self._call_recovery("before_start", (ctx,), self._spawn)

    def _reattach_verdict(self) -> reattach.ReattachDecision:
        """May this first start take over the daemon an earlier supervisor left running?"""
        try:
            verdict = reattach.decide_reattach(reattach.gather_facts(self.config, path_env=self._environ.get("PATH")))
        except OSError as exc:
            return reattach.ReattachDecision(False, f"cannot tell: {exc}")
        (log.info if verdict.attach else log.debug)("re-attach: %s", verdict.reason)
        return verdict

    def _attach(self, verdict: reattach.ReattachDecision) -> None:
        """Take over the running daemon: watched by a pidfd, its configuration and kernel state left as they are."""
        if self.state is not State.PREPARING:
            return
        assert verdict.pid is not None
        now = self._now()
        up = reattach.seconds_since_start(verdict.start_time) if verdict.start_time is not None else None
        started_at = now - (up or 0.0)
        try:
            child = AttachedProcess(self._loop, verdict.pid, start_time=verdict.start_time,
                                    on_exit=self._daemon_exited, start_time_of=reattach.process_start_time)
        except OSError as exc:
            # It died between the check and now: a death of the re-attached daemon like any other.
            log.warning("%s pid %d is gone before it could be re-attached (%s)", self._daemon_name, verdict.pid, exc)
            self._record_death(exit_info(self.config.restart, pid=verdict.pid, wait_status=None, cause=Cause.NONE,
                                         started_at=started_at, died_at=now, status_unknown=True))
            return
        self._reattach = verdict
        self._ring = collections.deque(maxlen=self.config.daemon.log_lines)
        self._run = _Run(child, started_at=started_at)
        assert self._loads is not None
        self._loads.begin_run(child.pid, keep_records=True)
        self._recovery_hook("on_daemon_spawned", child.pid)
        log.warning("re-attached to %s pid %d (up %s), started by an earlier supervisor: neither its "
                    "configuration nor its kernel state is touched; its output goes to its own log now",
                    self._daemon_name, child.pid, uptime_text(up or 0.0),
                    extra=fields(daemon_pid=child.pid))
        self._fire(Event.ATTACHED, f"{self._daemon_name} pid {child.pid}: {verdict.reason}")

    def _spawn(self) -> None:
        if self.state is not State.PREPARING:
            return
        cfg = self.config.daemon
        now = self._now()
        running = self._daemon_already_running()
        if running:
            # Never a second one: it would replace the running one's charon.vici before it exits.
            reason = f"{running}; not started a second time"
            log.error("cannot start %s: %s", self._daemon_name, reason)
            self._record_death(exit_info(self.config.restart, pid=0, wait_status=None, cause=Cause.NONE,
                                         started_at=now, died_at=now, spawn_error=reason))
            return
        self._clear_stale_pid_file()
        self._ring = collections.deque(maxlen=cfg.log_lines)
        try:
            argv = self.config.effective_daemon_command
        except SupervisorError as exc:   # ipsec.conf mode: charondebug unreadable
            # charon runs all the same (as after a crash, IPsec must not stay down for a typo); the
            # load then fails with the same error, which `ipsec start` reports as exit 2.
            log.error("cannot read charon's options from ipsec.conf: %s; starting %s without them",
                      printable(str(exc)), self._daemon_name)
            argv = cfg.command
        try:
            child = Child(self._loop, argv, self._daemon_env(), on_line=self._daemon_line,
                          on_exit=self._daemon_exited, pty=cfg.output == "pty")
        except (OSError, subprocess.SubprocessError) as exc:
            reason = f"{cfg.command[0]}: {getattr(exc, 'strerror', None) or exc}"
            log.error("cannot start %s: %s", self._daemon_name, reason)
            self._record_death(exit_info(self.config.restart, pid=0, wait_status=None, cause=Cause.NONE,
                                         started_at=now, died_at=now, spawn_error=reason))
            return
        self._run = _Run(child, started_at=now)
        assert self._loads is not None
        self._loads.begin_run(child.pid)
        self._recovery_hook("on_daemon_spawned", child.pid)
        self._fire(Event.SPAWNED, f"{' '.join(argv)} is pid {child.pid}")

    def _daemon_env(self) -> dict[str, str]:
        env = {k: v for k, v in self._environ.items() if k not in PRIVATE_ENV}
        env.update(dict(self.config.daemon.environment))
        return env

    def _clear_stale_pid_file(self) -> None:
        """Remove a pid file whose process is gone, so an old file never looks like readiness."""
        path = self.config.daemon.pid_file
        if not path or not os.path.exists(path):
            return
        pid = _read_pid(path)
        # A zombie is dead (a re-attached charon waits for its reaper, not us): charon itself would take
        # it for alive and refuse to start, so its pid file goes.
        if pid is not None and _pid_alive(pid) and not _zombie(pid) and _comm(pid) == self._daemon_name[:15]:
            log.warning("pid file %s names a running %s (pid %d) not started by this supervisor; "
                        "starting anyway (the daemon will refuse if it is really running)",
                        path, self._daemon_name, pid)
            return
        try:
            os.unlink(path)
            log.info("removed stale pid file %s (pid %s is not running)", path, pid)
        except OSError as exc:
            log.warning("cannot remove stale pid file %s: %s", path, exc.strerror)

    # STARTING: wait for the pid file and a VICI answer, within the start timeout
    def _enter_starting(self) -> None:
        cfg = self.config.daemon
        self._timer(cfg.start_timeout, self._start_timed_out)
        self._ready_retry = 0.01
        for path in (cfg.pid_file, cfg.vici_socket):
            if path and self._dirwatch and not self._dirwatch.watch(os.path.dirname(path)):
                log.debug("cannot watch %s; falling back to timed re-checks", os.path.dirname(path))
        self._check_ready()

    def _dir_changed(self, directory: str, name: str) -> None:
        if self.state is not State.STARTING:
            return
        cfg = self.config.daemon
        for path in (cfg.pid_file, cfg.vici_socket):
            if path and os.path.dirname(path) == directory and os.path.basename(path) == name:
                self._check_ready()
                return

    def _check_ready(self) -> None:
        if self.state is not State.STARTING or self._run is None or self._probe is not None:
            return
        cfg = self.config.daemon
        # A re-attached daemon is past its start: its pid file may have been wiped with /run; VICI decides.
        if cfg.pid_file and not self._run.child.attached:
            pid = _read_pid(cfg.pid_file)
            if pid != self._run.child.pid:
                if not (self._dirwatch and self._dirwatch.available):
                    self._retry_ready()
                return
        if not cfg.vici_socket:
            self._fire(Event.ANSWERED, f"pid file {cfg.pid_file} written")
            return
        self._probe = ViciProbe(self._loop, cfg.vici_socket, min(1.0, cfg.start_timeout), self._ready_probe_done)
        self._probe.start()

    def _ready_probe_done(self, result: ProbeResult) -> None:
        self._probe = None
        if self.state is not State.STARTING:
            return
        if result.ok:
            self._fire(Event.ANSWERED, f"VICI answered ({result.detail})")
        else:
            log.debug("not ready yet: %s", result.detail)
            self._retry_ready()

    def _retry_ready(self) -> None:
        # Bounded re-checks while starting (the socket can exist a moment before charon listens).
        delay, self._ready_retry = self._ready_retry, min(self._ready_retry * 2, 0.25)
        self._timer(delay, self._check_ready)

    def _start_timed_out(self) -> None:
        assert self._run is not None
        if self._run.child.attached:
            self._run.cause = Cause.HUNG
            self._fire(Event.PROBE_FAILED, f"re-attached {self._daemon_name} did not answer on "
                                           f"{self.config.daemon.vici_socket} within "
                                           f"{format_duration(self.config.daemon.start_timeout)}: handled as hung")
            return
        self._run.cause = Cause.START_TIMEOUT
        what = []
        if self.config.daemon.pid_file and _read_pid(self.config.daemon.pid_file) != self._run.child.pid:
            what.append(f"no pid file {self.config.daemon.pid_file}")
        if self.config.daemon.vici_socket:
            what.append(f"no VICI answer on {self.config.daemon.vici_socket}")
        self._fire(Event.START_TIMEOUT, f"not ready within {format_duration(self.config.daemon.start_timeout)} "
                                        f"({', '.join(what) or 'not ready'})")

    # LOADING: load commands, then recovery.on_daemon_ready
    def _enter_loading(self) -> None:
        assert self._run is not None
        self._run.ready_at = self._now()
        assert self._loads is not None
        if self._run.child.attached and self._reattach is not None and self._reattach.loaded:
            log.info("%s (pid %d) answers; its configuration was loaded by the supervisor that started it: "
                     "not loading it again", self._daemon_name, self._run.child.pid)
            self._after_load(True)
            return
        log.info("%s (pid %d) answers after %.3fs; loading its configuration", self._daemon_name,
                 self._run.child.pid, self._run.ready_at - self._run.started_at)
        self._loads.initial(self._loaded)

    def _loaded(self, outcome: LoadOutcome) -> None:
        self._after_load(outcome.ok)

    def _after_load(self, ok: bool) -> None:
        if self.state is not State.LOADING or self._run is None:
            return
        if not ok:
            log.error("(fix the configuration and run 'ipsec reload' or send SIGUSR1)")
        run = self._run
        ctx = ReadyContext(run.child.pid, run.started_at, run.ready_at or self._now(), ok, self._last_exit,
                           self.config)
        self._call_recovery("on_daemon_ready", (ctx,),
                            lambda: self._fire(Event.LOADED, "configuration loaded" if ok else "configuration load failed"))

    # SETTLING: ready; okay-delay
    def _enter_settling(self) -> None:
        assert self._run is not None
        if not self.notifier.ready_sent:
            self.notifier.ready(self._status_line())
        log.info("%s (pid %d) is ready after %.3fs", self._daemon_name, self._run.child.pid,
                 self._now() - self._run.started_at, extra=fields(daemon_pid=self._run.child.pid,
                                                                 restart_count=self._restarts))
        self._timer(self.config.restart.okay_delay, lambda: self._fire(
            Event.OKAY, f"up {format_duration(self.config.restart.okay_delay)} since ready"))
        self._start_health()

    def _enter_running(self) -> None:
        assert self._run is not None
        self._run.okay_at = self._now()

    # Health probes
    def _start_health(self) -> None:
        if self._health_timer is None and self.config.health.enabled and self.config.daemon.vici_socket:
            self._health_failures = 0
            self._health_timer = self._loop.call_later(self.config.health.interval, self._health_probe)

    def _stop_health(self) -> None:
        if self._health_timer:
            self._health_timer.cancel()
            self._health_timer = None
        if self._probe:
            self._probe.cancel()
            self._probe = None

    def _health_probe(self) -> None:
        self._health_timer = None
        if self.state not in (State.SETTLING, State.RUNNING) or not self.config.daemon.vici_socket:
            return
        self._probe = ViciProbe(self._loop, self.config.daemon.vici_socket, self.config.health.timeout,
                                self._health_done)
        self._probe.start()

    def _health_done(self, result: ProbeResult) -> None:
        self._probe = None
        self._observe("probe", result)
        if self.state not in (State.SETTLING, State.RUNNING):
            return
        h = self.config.health
        if result.ok:
            if self._health_failures:
                log.info("health probe answered again after %d failure(s)", self._health_failures)
            self._health_failures = 0
            self._last_probe_ok_at = self._now()
        else:
            self._health_failures += 1
            log.warning("health probe failed (%d of %d): %s", self._health_failures, h.failures, result.detail,
                        extra=fields(daemon_pid=self._run.child.pid if self._run else None))
            if self._health_failures >= h.failures:
                self._fire(Event.PROBE_FAILED, f"{self._health_failures} health probes failed; last: {result.detail}")
                return
        if self.config.health.enabled:
            self._health_timer = self._loop.call_later(h.interval, self._health_probe)

    # Stopping and killing
    def _enter_stopping(self) -> None:
        assert self._run is not None
        sig = signal.Signals[self.config.stop.signal]
        self._run.child.send(sig)
        self._run.child.send(signal.SIGCONT)  # a stopped process would never see the signal
        log.info("sent %s to %s (pid %d); SIGKILL in %s", sig.name, self._daemon_name, self._run.child.pid,
                 format_duration(self.config.stop.timeout))
        self._timer(self.config.stop.timeout, lambda: self._fire(
            Event.STOP_TIMEOUT, f"still running {format_duration(self.config.stop.timeout)} after {sig.name}"))

    def _enter_aborting(self) -> None:
        assert self._run is not None
        self._run.cause = Cause.HUNG
        self._run.child.send(signal.SIGABRT)  # SIGABRT first: the daemon dumps core where it hangs
        self._run.child.send(signal.SIGCONT)
        log.error("%s (pid %d) is not answering; sent SIGABRT, SIGKILL in %s", self._daemon_name,
                  self._run.child.pid, format_duration(self.config.health.abort_timeout),
                  extra=fields(daemon_pid=self._run.child.pid))
        self._timer(self.config.health.abort_timeout, lambda: self._fire(
            Event.ABORT_TIMEOUT, f"still running {format_duration(self.config.health.abort_timeout)} after SIGABRT"))

    def _enter_killing(self) -> None:
        assert self._run is not None
        self._run.child.send(signal.SIGKILL)
        log.warning("sent SIGKILL to %s (pid %d)", self._daemon_name, self._run.child.pid)

    # Death: classify, decide, report -> RECOVERING
    def _daemon_line(self, line: str) -> None:
        self._ring.append(line)
        pid = self._run.child.pid if self._run else 0
        daemon_log.info("%s[%d]: %s", self._daemon_name, pid, line, extra=fields(daemon_pid=pid or None))

    def _daemon_exited(self, status: int | None) -> None:
        run = self._run
        assert run is not None
        info = exit_info(self.config.restart, pid=run.child.pid, wait_status=status, cause=run.cause,
                         started_at=run.started_at, died_at=run.child.exited_at or self._now(),
                         ready_at=run.ready_at, okay_at=run.okay_at, status_unknown=status is None)
        self._run = None
        self._record_death(info)

    def _record_death(self, info: ExitInfo) -> None:
        now = self._now()
        self._history.append(info)
        self._history = prune_history(self.config.restart, self._history, now)
        self._cooldowns = cooldowns_in_a_row(self.config.restart, self._cooldowns, info)
        decision = decide(self.config.restart, self._history, now, self._rand, stopping=self._stop_requested,
                          cooldowns=self._cooldowns)
        self._last_exit, self._decision = info, decision
        self._observe("death", info, decision)
        level = logging.WARNING if info.classification.abnormal else logging.INFO
        log.log(level, "%s (pid %d) %s [%s], up %.3fs; %s", self._daemon_name, info.pid, info.describe(),
                info.classification.value, info.uptime, decision.describe(),
                extra=fields(daemon_pid=info.pid or None, exit_classification=info.classification.value,
                             exit_code=info.exit_code, exit_signal=signal_name(info.signal),
                             core_dumped=int(info.core_dumped), restart_count=self._restarts,
                             decision=decision.action.value))
        if info.classification.abnormal:
            self._report_crash(info, decision, now)
        self._fire(Event.DIED, info.describe())

    def _report_crash(self, info: ExitInfo, decision: Decision, now: float) -> None:
        """Write the crash report off the restart path (it fsyncs), then run the on_crash hooks."""
        assert self._reports is not None
        self._pending_reports += 1
        written: list[str] = []
        if self.config.crash_reports.enabled:
            report = crashreport.build_crash_report(
                info, decision, list(self._ring), daemon_command=self.config.daemon.command,
                restarts=self._restarts, mono_now=now, wall_now=self._wall(), health_failures=self._health_failures)
            if info.status_unknown:
                report["last_log_lines_missing"] = (
                    f"{self._daemon_name} was re-attached: its output went to the supervisor that started it "
                    f"(gone); see {self._daemon_name}'s own log (syslog or filelog in strongswan.conf)")
            directory, wall, keep = self.config.crash_dir, self._wall(), self.config.crash_reports.keep
            max_bytes = self.config.snapshots.max_bytes
            section = getattr(self.recovery, "crash_report_section", None)

            def work() -> None:
                if section is not None:
                    try:
                        extra = section(info)
                    except Exception as exc:  # noqa: BLE001 - the report goes out regardless
                        extra = {"error": f"{type(exc).__name__}: {exc}"}
                    if extra is not None:
                        report["recovery"] = extra
                written.append(crashreport.write_crash_report(directory, report, wall, keep=keep,
                                                                   max_bytes=max_bytes))
        else:
            work = lambda: None

        def done(exc: BaseException | None) -> None:
            self._pending_reports -= 1
            if written:
                self._last_report = written[0]
                log.info("crash report written to %s", written[0])
            elif exc is not None:
                log.error("cannot write crash report to %s: %s (going on without it)", self.config.crash_dir,
                          getattr(exc, "strerror", None) or exc)
            self._run_hooks("on_crash", "crash", info, decision, written[0] if written else "")

        self._reports.submit(work, done)

    def _run_hooks(self, which: str, event: str, info: ExitInfo, decision: Decision, report: str) -> None:
        hooks: tuple[Hook, ...] = self.config.hooks.resolved(which)
        if not hooks:
            return
        env = {k: v for k, v in self._environ.items() if k not in PRIVATE_ENV}
        env.update({
            "IPSEC_SUPERVISOR_EVENT": event,
            "IPSEC_SUPERVISOR_DAEMON": self.config.daemon.command[0],
            "IPSEC_SUPERVISOR_DAEMON_PID": str(info.pid),
            "IPSEC_SUPERVISOR_EXIT_CLASS": info.classification.value,
            "IPSEC_SUPERVISOR_EXIT_CODE": "" if info.exit_code is None else str(info.exit_code),
            "IPSEC_SUPERVISOR_SIGNAL": signal_name(info.signal) or "",
            "IPSEC_SUPERVISOR_CORE_DUMPED": "1" if info.core_dumped else "0",
            "IPSEC_SUPERVISOR_UPTIME": f"{info.uptime:.3f}",
            "IPSEC_SUPERVISOR_DESCRIPTION": info.describe(),
            "IPSEC_SUPERVISOR_RESTARTS": str(self._restarts),
            "IPSEC_SUPERVISOR_DECISION": decision.action.value,
            "IPSEC_SUPERVISOR_RESTART_DELAY": f"{decision.delay:.3f}",
            "IPSEC_SUPERVISOR_REASON": decision.reason,
            "IPSEC_SUPERVISOR_CRASH_REPORT": report,
        })
        for hook in hooks:
            self._start_hook(f"hook {which}", hook, env)

    def _start_hook(self, label: str, hook: Hook, env: dict[str, str]) -> None:
        job: Job | None = None

        def done(result: JobResult) -> None:
            self._hooks.discard(job)
            (job_log.info if result.ok else job_log.warning)("%s %s", label, result.detail)

        job = Job(self._loop, label, hook.command, env, hook.timeout, done)
        self._hooks.add(job)

    # RECOVERING: recovery.on_daemon_exit, then act on the decision
    def _enter_recovering(self) -> None:
        assert self._last_exit is not None and self._decision is not None
        info, decision = self._last_exit, self._decision
        self._call_recovery("on_daemon_exit", (info, decision), self._recovered)

    def _recovered(self) -> None:
        decision = self._decision
        assert decision is not None
        if self._stop_requested:
            self._fire(Event.STAY_STOPPED, "stop requested")
        elif decision.action is Action.RESTART:
            self._fire(Event.SCHEDULE_RESTART, decision.describe())
        elif decision.action is Action.GIVE_UP:
            self._fire(Event.GIVE_UP, decision.reason)
        elif decision.action is Action.COOLDOWN:
            self._fire(Event.COOL_DOWN, decision.describe())
        else:
            self._fire(Event.STAY_STOPPED, decision.reason)

    def _enter_backoff(self) -> None:
        assert self._decision is not None
        delay = self._decision.delay
        self._next_start_at = self._now() + delay
        self._timer(delay, lambda: self._fire(Event.BACKOFF_ELAPSED, f"restart #{self._decision.attempt}"))

    def _enter_stopped(self) -> None:
        self._next_start_at = None
        if self._stop_requested or self._decision is None:
            self._exit_code = int(ExitCode.OK)
        else:
            self._exit_code = int(self._decision.exit_code)
        self._finishing = True
        self.notifier.stopping(self._status_line())

    def _enter_gave_up(self) -> None:
        assert self._last_exit is not None and self._decision is not None
        log.error("giving up on %s: %s; it stays stopped (fail-closed)%s", self._daemon_name, self._decision.reason,
                  "; exiting" if self.config.restart.crash_loop.action == "exit" else
                  "; 'start' on the control socket tries again",
                  extra=fields(exit_classification=self._last_exit.classification.value,
                               restart_count=self._restarts))
        self._remove_stale_daemon_files()
        self._give_up_hooks()
        if self.config.restart.crash_loop.action == "exit":
            self._exit_code = int(ExitCode.GAVE_UP)
            self._finishing = True
            self.notifier.stopping(self._status_line())

    def _give_up_hooks(self) -> None:
        info, decision = self._last_exit, self._decision
        assert info is not None and decision is not None and self._reports is not None
        # Behind the pending crash report in the same queue, so the hooks can read it.
        self._pending_reports += 1

        def after_report(exc: BaseException | None) -> None:
            self._pending_reports -= 1
            self._run_hooks("on_give_up", "give-up", info, decision, self._last_report or "")

        self._reports.submit(lambda: None, after_report)

    # COOLDOWN: the crash-loop limit with action cooldown: stopped and fail-closed for a pause, then again
    def _enter_cooldown(self) -> None:
        d = self._decision
        assert self._last_exit is not None and d is not None
        self._cooldowns = d.attempt
        self._next_start_at = self._now() + d.delay
        log.error("crash loop: %s stays stopped (%s) for %s, cooldown #%d in a row (%s); it tries again "
                  "then, 'ipsec start' at once", self._daemon_name, self._down_how, format_duration(d.delay),
                  d.attempt, d.reason, extra=fields(exit_classification=self._last_exit.classification.value,
                                         restart_count=self._restarts))
        self._remove_stale_daemon_files()
        self._give_up_hooks()
        if not self.notifier.ready_sent:
            # The supervisor is up and doing its job (fail-closed, retrying): systemd must not kill it
            # at TimeoutStartSec and restart into the same loop; STATUS= says charon is not running.
            self.notifier.ready(self._status_line())
        self._timer(d.delay, lambda: self._try_again(Event.COOLDOWN_ELAPSED,
                                                     f"cooldown of {format_duration(d.delay)} over"))

        def refresh() -> None:      # STATUS= says how long is left
            self._publish_status()
            self._timer(STATUS_REFRESH, refresh)
        self._timer(STATUS_REFRESH, refresh)

    @property
    def _down_how(self) -> str:
        """What recovery makes of a crash-loop pause (recovery.choose_recovery's rule for COOLDOWN)."""
        rc = self.config.recovery
        if isinstance(self.recovery, NoRecovery):
            return "no kernel-state recovery"
        if rc.mode not in ("adopt", "flush"):
            return f"recovery.mode {rc.mode}"
        return "fail-closed" if rc.fail_closed else "flushed; recovery.fail_closed is false"

    def _try_again(self, event: Event, why: str) -> None:
        """Start after a crash-loop pause (its timer, or a start request) with a new crash-loop tally."""
        if self.state not in (State.COOLDOWN, State.GAVE_UP) or self._stop_requested:
            return      # a timer or request that arrives after the state moved on no longer matters
        self._history.clear()
        self._fire(event, why)

    def _remove_stale_daemon_files(self) -> None:
        cfg = self.config.daemon
        for what in runfiles.remove_stale_daemon_files(cfg.pid_file, cfg.vici_socket, self._daemon_name):
            log.info("removed stale %s", what)

    # Recovery calls in the worker thread
    def _call_recovery(self, name: str, args: tuple, then: Callable[[], None]) -> None:
        token = next(self._tokens)
        self._pending_recovery = token
        method = getattr(self.recovery, name)
        limit = self.config.recovery.timeout

        def finished(exc: BaseException | None) -> None:
            if self._pending_recovery != token:
                return  # the state moved on (stop, death, time limit): the result no longer matters
            self._pending_recovery = None
            if exc is not None:
                log.error("recovery.%s failed: %r; going on", name, exc)
            then()

        def too_slow() -> None:
            if self._pending_recovery == token:
                log.error("recovery.%s did not finish within %s; going on without it", name, format_duration(limit))
                finished(None)

        self._timer(limit, too_slow)
        assert self._worker is not None
        self._worker.submit(lambda: method(*args), finished)

    # -- the run directory (wiped under a running supervisor) --------------
    def _note_run_files(self) -> None:
        """Remember the identity of the lock and the control socket we made (to notice them gone or replaced)."""
        run_dir = self.config.paths.run_dir
        st = os.fstat(self._lock_fd)
        self._run_files = {LOCK_NAME: (st.st_dev, st.st_ino)}
        try:
            st = os.stat(os.path.join(run_dir, SOCKET_NAME))
            self._run_files[SOCKET_NAME] = (st.st_dev, st.st_ino)
        except OSError:
            pass

    def _run_file_missing(self, name: str) -> bool:
        try:
            st = os.stat(os.path.join(self.config.paths.run_dir, name))
        except OSError:
            return True
        return self._run_files.get(name) != (st.st_dev, st.st_ino)

    def _run_dir_changed(self) -> None:
        if self._restore_timer is None and self._loop is not None:
            # A moment later: an `rm -rf` is over by then, and one restore covers all its events.
            self._restore_timer = self._loop.call_later(RESTORE_DELAY, self._restore_run_dir)

    def _check_run_dir_later(self) -> None:
        # inotify is the fast path; this catches what it cannot see (a bind mount over run_dir...).
        assert self._loop is not None
        self._loop.call_later(RUN_DIR_CHECK, lambda: (self._run_dir_changed(), self._check_run_dir_later()))

    def _restore_run_dir(self) -> None:
        """Recreate what is gone from the run directory: lock, control socket, pid file, ledger."""
        self._restore_timer = None
        if self._finishing and self._run is None:
            return
        run_dir = self.config.paths.run_dir
        restored = []
        try:
            if self._run_file_missing(LOCK_NAME):
                fd = lock_run_dir(run_dir)      # creates the directory (0700) and takes the new lock
                os.close(self._lock_fd)         # the old one held a deleted file; this one is what others see
                self._lock_fd = fd
                restored.append(f"the lock {LOCK_NAME}")
            if self._run_file_missing(SOCKET_NAME) and self._control_server is not None:
                self._control_server.relisten()
                restored.append(f"the control socket {SOCKET_NAME}")
            self._note_run_files()
            pid_path = os.path.join(run_dir, PID_FILE_NAME)
            if self._pid_file_mine and _read_pid(pid_path) != os.getpid():
                write_pid_file(pid_path, os.getpid())
                restored.append(f"the pid file {PID_FILE_NAME}")
        except (OSError, SupervisorError) as exc:
            restored.clear()
            log.error("cannot restore the run directory %s: %s (trying again in %s)", run_dir,
                      getattr(exc, "strerror", None) or exc, format_duration(RUN_DIR_CHECK))
        if restored and self._runwatch is not None:
            self._runwatch.unwatch_all()        # the old directory's watch died with it
            self._runwatch.watch(run_dir, DirWatch.VANISH)
        if restored or not os.path.exists(os.path.join(run_dir, LEDGER_FILE)):
            self._recovery_hook("restore_files")        # (a no-op without a ledger)
        if restored:
            log.warning("%s was removed under the running supervisor: restored %s and the ledger", run_dir,
                        ", ".join(restored))

    # -- requests (signals and control socket) ----------------------------
    def request_stop(self, why: str) -> None:
        """Stop the daemon gracefully and exit (SIGTERM/SIGINT, control 'stop')."""
        if not self._stop_requested:
            self._stop_requested = True
            log.info("stopping: %s", why)
            self.notifier.stopping(f"stopping: {why}")
        if self._run is not None and self._run.cause in (Cause.NONE, Cause.RESTART):
            self._run.cause = Cause.STOP
        self._fire(Event.STOP, why)

    def request_restart(self) -> tuple[bool, str]:
        if self._stop_requested:
            return False, "the supervisor is stopping"
        if self.state in (State.STARTING, State.LOADING, State.SETTLING, State.RUNNING) and self._run:
            self._run.cause = Cause.RESTART
            self._fire(Event.STOP, "restart requested")
            return True, "restarting"
        if self.state is State.BACKOFF:
            self._fire(Event.BACKOFF_ELAPSED, "restart requested")
            return True, "restarting now"
        if self.state in (State.GAVE_UP, State.COOLDOWN):
            return self.request_start()
        return False, f"cannot restart in state {self.state.value}"

    def request_start(self) -> tuple[bool, str]:
        if self.state not in (State.GAVE_UP, State.COOLDOWN) or self._stop_requested:
            return False, f"already started (state {self.state.value})"
        self._try_again(Event.START, "start requested")   # a manual start begins a new crash-loop tally
        return True, "starting"

    def reload_config(self, source: str) -> tuple[bool, str]:
        """Re-read the configuration; an invalid file keeps the running one (SIGHUP)."""
        self.notifier.reloading()
        try:
            try:
                new = self._reload_fn()
            except ConfigError as exc:
                self._reload_error = str(exc)
                log.error("configuration reload (%s) failed, keeping the running configuration: %s", source, exc)
                return False, str(exc)
            except Exception as exc:  # noqa: BLE001 - a bad reload must never take the running pair down
                self._reload_error = f"{type(exc).__name__}: {exc}"
                log.exception("configuration reload (%s) failed unexpectedly, keeping the running configuration",
                              source)
                return False, self._reload_error
            changed = changed_keys(self.config, new)
            fixed = [k for k in changed if k.startswith("paths.")]
            if fixed:
                log.warning("%s changed; takes effect when the supervisor restarts", ", ".join(fixed))
                new = dataclasses.replace(new, paths=self.config.paths)
            old, self.config = self.config, new
            self._recovery_hook("on_config", new)
            self._reload_error = None
            self._config_loaded_at = self._wall()
            if self._ring.maxlen != new.daemon.log_lines:
                self._ring = collections.deque(self._ring, maxlen=new.daemon.log_lines)
            if old.health != new.health and self.state in (State.SETTLING, State.RUNNING):
                self._stop_health()
                self._start_health()
            at_start, at_load = split_daemon_keys(changed)
            msg = f"configuration reloaded from {new.source} ({source}): " + \
                (", ".join(k for k in changed if k not in fixed) or "no changes")
            if at_load:
                msg += f"; {', '.join(at_load)} apply from the next load of {self._daemon_name}'s configuration"
            if at_start and self._run is not None:
                msg += f"; {', '.join(at_start)} apply from the next start of {self._daemon_name}"
            log.info("%s", msg)
            return True, msg
        finally:
            self._publish_status()
            self._observe("reload", self._reload_error is None)
            self.notifier.reloaded()

    def reload_daemon(self, source: str, trigger: str = RELOAD,
                      reply: Callable[[dict], None] | None = None) -> dict | None:
        """Load the daemon's configuration again (ipsec reload/update, SIGUSR1/SIGHUP).

        Ready: load now (merged with a running load).  Restarting: the new daemon's own load reads
        the current files, so the request is satisfied.  Stopped: not running.  Returns the answer,
        or None when ``reply`` will get it once the load finished.
        """
        name = self._daemon_name
        if self.state in (State.SETTLING, State.RUNNING) and self._loads is not None:
            return self._loads.request(trigger, source, reply)
        if self.state is State.LOADING and self._loads is not None:
            # The first load may have read the files before the change: one more load after it.
            return self._loads.request(trigger, source, reply)
        if self._restarting():
            answer = restarting_answer(name, trigger, self.state.value)
            log.info("%s: %s", source, answer["message"])
            return answer
        msg = f"{source} ignored: {name} is not running (state {self.state.value})"
        log.warning("%s", msg)
        return {"ok": False, "error": msg, "not_running": True}

    def _restarting(self) -> bool:
        """A new daemon is on its way (its own load will read the current files)."""
        if self._stop_requested:
            return False
        if self.state in (State.PREPARING, State.STARTING, State.BACKOFF, State.COOLDOWN):
            return True
        return self.state is State.RECOVERING and self._decision is not None \
            and self._decision.action in (Action.RESTART, Action.COOLDOWN)

    def _control(self, req: dict) -> dict | Deferred:
        cmd = req["command"]
        if cmd == "status":
            return {"ok": True, "status": self.status()}
        if cmd == "stop":
            self.request_stop("stop requested on the control socket")
            return {"ok": True, "state": self.state.value}
        if cmd == "reload-daemon":
            trigger = UPDATE if req.get("mode") == UPDATE else RELOAD
            if not req.get("wait"):
                answer = self.reload_daemon("control socket", trigger)
                assert answer is not None
                return {**answer, "state": self.state.value}
            later = Deferred(self.config.daemon.load_timeout * 2 + 30.0)
            answer = self.reload_daemon("control socket", trigger,
                                        lambda a: later.answer({**a, "state": self.state.value}))
            return later if answer is None else {**answer, "state": self.state.value}
        handlers = {"start": self.request_start, "restart": self.request_restart,
                    "reload": lambda: self.reload_config("control socket")}
        ok, msg = handlers[cmd]()
        return {"ok": ok, ("message" if ok else "error"): msg, "state": self.state.value}

    def _watchdog(self, interval: float) -> None:
        self.notifier.watchdog()
        self._loop.call_later(interval, lambda: self._watchdog(interval))

    # -- status ------------------------------------------------------------
    def _wall_of(self, mono: float | None) -> str | None:
        if mono is None:
            return None
        wall = self._wall() - (self._now() - mono)
        return _dt.datetime.fromtimestamp(wall, _dt.timezone.utc).isoformat(timespec="milliseconds")

    def status(self) -> dict:
        """Everything ``ipsec-supervisor status`` shows, JSON-safe."""
        now = self._now()
        run = self._run
        last = self._last_exit
        last_load = self._loads.last if self._loads else None
        backoff = None
        if self._decision and self._decision.action is Action.RESTART and self.state in (
                State.RECOVERING, State.BACKOFF, State.PREPARING, State.STARTING, State.LOADING, State.SETTLING):
            backoff = {"attempt": self._decision.attempt, "delay_s": round(self._decision.delay, 3)}
        return {
            "supervisor": {"pid": os.getpid(), "version": __version__},
            "state": self.state.value,
            "state_for_s": round(now - self._state_since, 3),
            "daemon": {
                "command": list(self.config.daemon.command),
                "pid": run.child.pid if run else None,
                "reattached": bool(run and run.child.attached),
                "started_at": self._wall_of(run.started_at) if run else None,
                "started_at_monotonic": run.started_at if run else None,
                "uptime_s": round(now - run.started_at, 3) if run else None,
                "ready": bool(run and run.ready_at is not None and self.state in (State.SETTLING, State.RUNNING)),
                "ready_at_monotonic": run.ready_at if run else None,
                "start_confirmed": bool(run and run.okay_at is not None),
                "load_ok": last_load.ok if last_load else None,
                "load_error": last_load.error if last_load else None,
                "load": last_load.to_json() if last_load else None,
            },
            "starts": self._starts,
            "restarts": self._restarts,
            "last_exit": None if last is None else {
                "pid": last.pid,
                "classification": last.classification.value,
                "description": last.describe(),
                "exit_code": last.exit_code,
                "signal": signal_name(last.signal),
                "core_dumped": last.core_dumped,
                "uptime_s": round(last.uptime, 3),
                "at": self._wall_of(last.died_at),
                "ago_s": round(now - last.died_at, 3),
                "died_at_monotonic": last.died_at,
                "decision": self._decision.describe() if self._decision else None,
            },
            "backoff": backoff,
            "next_restart_at": self._wall_of(self._next_start_at),
            "next_restart_in_s": None if self._next_start_at is None else round(max(0.0, self._next_start_at - now), 3),
            "crash_loop": {"deaths_in_window": deaths_in_window(self.config.restart, self._history, now),
                           "max_deaths": self.config.restart.crash_loop.max_deaths,
                           "window_s": self.config.restart.crash_loop.window,
                           "action": self.config.restart.crash_loop.action,
                           "cooldowns_in_a_row": self._cooldowns,
                           "cooldown": None if self.state is not State.COOLDOWN or not self._decision else {
                               "number": self._decision.attempt, "duration_s": self._decision.delay,
                               "deaths": self._decision.deaths}},
            "health": {"enabled": self.config.health.enabled and bool(self.config.daemon.vici_socket),
                       "consecutive_failures": self._health_failures,
                       "last_ok_at": self._wall_of(self._last_probe_ok_at)},
            "config": {"source": self.config.source,
                       "loaded_at": _dt.datetime.fromtimestamp(self._config_loaded_at, _dt.timezone.utc)
                       .isoformat(timespec="seconds"),
                       "last_reload_error": self._reload_error},
            "last_crash_report": self._last_report,
            # Exceptions in event-loop callbacks, logged with their tracebacks; the loop went on.
            "callback_errors": self._loop.callback_errors if self._loop is not None else 0,
            "recovery": self._recovery_status(),
            "summary": self._status_line(),
        }

    def _recovery_status(self) -> dict | None:
        status = getattr(self.recovery, "status", None)
        if status is None:
            return None
        try:
            return status()
        except Exception as exc:  # noqa: BLE001 - status must answer whatever recovery does
            return {"error": f"{type(exc).__name__}: {exc}"}

    def _start_relay(self, plan):
        """The start load of an adoption goes through a relay pacing charon's own initiations (or None)."""
        from . import vici_relay
        coming = getattr(self.recovery, "adoption_coming", None)
        return vici_relay.relay_for_load(plan, self.config, adoption_coming=bool(coming is not None and coming()))

    def _recovery_hook(self, name: str, *args) -> None:
        """Call an optional Recovery hook (see OPTIONAL_RECOVERY_HOOKS); errors are logged, never raised."""
        hook = getattr(self.recovery, name, None)
        if hook is None:
            return
        try:
            hook(*args)
        except Exception:  # noqa: BLE001 - recovery trouble must not stop supervision
            log.exception("recovery.%s failed; going on", name)

    def _observe(self, name: str, *args) -> None:
        """Tell the metrics observer (if any) about an event; its errors are logged, never raised."""
        tell(self.observer, name, *args)

    def _status_line(self) -> str:
        name = self._daemon_name
        run = self._run
        s = self.state
        restarts = f", {self._restarts} restart{'s' if self._restarts != 1 else ''}" if self._restarts else ""
        last = f"; last exit: {self._last_exit.describe()}" if self._last_exit else ""
        if s in (State.SETTLING, State.RUNNING) and run:
            last_load = self._loads.last if self._loads else None
            load = ""
            if last_load is not None and not last_load.ok:
                load = "; configuration load FAILED"
            elif last_load is not None and last_load.refused:
                load = f"; {len(last_load.refused)} conn(s) refused"
            if run.child.attached:
                return (f"{name} running, re-attached ({name} pid {run.child.pid}, up "
                        f"{uptime_text(self._now() - run.started_at)}){restarts}{load}")
            return f"{name} running (pid {run.child.pid}){restarts}{load}"
        if s in (State.STARTING, State.LOADING) and run and run.child.attached:
            return f"re-attaching to {name} (pid {run.child.pid})"
        if s in (State.PREPARING, State.STARTING, State.LOADING):
            return f"{name} starting (start #{self._starts}){restarts}{last}"
        if s is State.BACKOFF and self._decision:
            return f"{name} restarting in {self._decision.delay:.1f}s{restarts}{last}"
        if s is State.GAVE_UP and self._decision:
            return f"gave up on {name}: {self._decision.reason}{last}"
        if s is State.COOLDOWN and self._decision and self._next_start_at is not None:
            d = self._decision
            return (f"crash loop: {d.deaths} deaths in {format_duration(self.config.restart.crash_loop.window)}; "
                    f"next try in {format_wait(self._next_start_at - self._now())} ({name} stays stopped, "
                    f"{self._down_how}; cooldown #{d.attempt}){last}")
        if s in (State.STOPPING, State.KILLING):
            return f"stopping {name}"
        if s is State.ABORTING:
            return f"{name} hung; aborting it"
        if s is State.RECOVERING:
            return f"{name} died{last}; recovering"
        return f"{name} stopped{last}"

    def _publish_status(self) -> None:
        self.notifier.status(self._status_line())
