"""Restart policy as pure functions of (config, history, now): classify, decide, back off, give up.

Times are monotonic seconds; randomness is injected (``rand() -> float in [0, 1)``), so
every rule here is tested by tables on a fake clock.  The supervisor only acts on what
``decide`` returns.
"""

from __future__ import annotations

import enum
import os
import signal as _signal
from dataclasses import dataclass
from typing import Callable, Sequence

from .config import BackoffConfig, CrashLoopConfig, RestartConfig, format_duration
from .errors import ExitCode


class Cause(enum.Enum):
    """What the supervisor had done to the daemon before it died."""

    NONE = "none"
    STOP = "stop"                     # graceful stop requested (signal, control socket)
    RESTART = "restart"               # restart requested (control socket)
    HUNG = "hung"                     # health probe failed: SIGABRT, then SIGKILL
    START_TIMEOUT = "start-timeout"   # not ready within daemon.start_timeout: SIGKILL


class ExitClass(enum.Enum):
    """How a daemon run ended."""

    REQUESTED_STOP = "requested-stop"
    CLEAN = "clean-exit"
    FAILURE = "failure-exit"
    SIGNALED = "killed-by-signal"
    DO_NOT_RESTART = "do-not-restart"
    HUNG = "hung"
    START_TIMEOUT = "start-timeout"

    @property
    def abnormal(self) -> bool:
        """Abnormal exits get a crash report and the on_crash hooks."""
        return self not in (ExitClass.REQUESTED_STOP, ExitClass.CLEAN)


class Action(enum.Enum):
    RESTART = "restart"
    STOP = "stop"          # stay stopped: the supervisor exits
    GIVE_UP = "give-up"    # crash-loop limit: stay stopped, fail-closed
    COOLDOWN = "cooldown"  # crash-loop limit: stay stopped, fail-closed, try again after a pause


def signal_name(signo: int | None) -> str | None:
    if signo is None:
        return None
    try:
        return _signal.Signals(signo).name
    except ValueError:
        return f"signal {signo}"


def decode_wait_status(status: int) -> tuple[int | None, int | None, bool]:
    """(exit code, signal, core dumped) from a waitpid() status."""
    if os.WIFSIGNALED(status):
        return None, os.WTERMSIG(status), os.WCOREDUMP(status)
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status), None, False
    raise ValueError(f"wait status {status:#x} is neither an exit nor a termination by signal")


def classify_exit(cfg: RestartConfig, exit_code: int | None, signo: int | None, cause: Cause) -> ExitClass:
    """What the supervisor did wins over how the process ended; then signals, then codes."""
    if cause in (Cause.STOP, Cause.RESTART):
        return ExitClass.REQUESTED_STOP
    if cause is Cause.HUNG:
        return ExitClass.HUNG
    if cause is Cause.START_TIMEOUT:
        return ExitClass.START_TIMEOUT
    if signo is not None:
        return ExitClass.SIGNALED
    if exit_code in cfg.prevent_exit_codes:
        return ExitClass.DO_NOT_RESTART
    if exit_code == 0:
        return ExitClass.CLEAN
    return ExitClass.FAILURE


@dataclass(frozen=True, slots=True)
class ExitInfo:
    """One finished daemon run (monotonic times); the history is a sequence of these."""

    pid: int
    exit_code: int | None
    signal: int | None
    core_dumped: bool
    cause: Cause
    classification: ExitClass
    started_at: float
    died_at: float
    ready_at: float | None = None
    okay_at: float | None = None
    spawn_error: str | None = None
    status_unknown: bool = False      # a re-attached daemon: not our child, its exit status is not ours to read

    @property
    def uptime(self) -> float:
        return max(0.0, self.died_at - self.started_at)

    @property
    def start_ok(self) -> bool:
        """True once the start was confirmed (ready, then up for restart.okay_delay)."""
        return self.okay_at is not None

    def describe(self) -> str:
        """One line: how it ended, e.g. 'killed by SIGSEGV (core dumped)'."""
        if self.spawn_error:
            how = f"could not be started: {self.spawn_error}"
        elif self.status_unknown:
            how = ("died, exit status unknown (re-attached: not this supervisor's child)"
                   + ("; counted as a crash" if self.classification is ExitClass.SIGNALED else ""))
        elif self.signal is not None:
            how = f"killed by {signal_name(self.signal)}" + (" (core dumped)" if self.core_dumped else "")
        else:
            how = f"exited with code {self.exit_code}"
        extra = {
            ExitClass.HUNG: "after failing its health probes",
            ExitClass.START_TIMEOUT: "after not becoming ready in time",
            ExitClass.REQUESTED_STOP: "on request",
            ExitClass.DO_NOT_RESTART: "(a do-not-restart code)",
        }.get(self.classification)
        return f"{how} {extra}" if extra else how


def exit_info(cfg: RestartConfig, *, pid: int, wait_status: int | None, cause: Cause, started_at: float,
              died_at: float, ready_at: float | None = None, okay_at: float | None = None,
              spawn_error: str | None = None, status_unknown: bool = False) -> ExitInfo:
    """Build and classify an ExitInfo; a failed spawn is treated like exit code 127 (as shells do), a
    death whose status is unknown (STATUS_UNKNOWN: a re-attached daemon) like a crash."""
    if status_unknown:
        cls = classify_exit(cfg, None, 0, cause)     # no status: SIGNALED unless the cause says otherwise
        return ExitInfo(pid, None, None, False, cause, cls, started_at, died_at, ready_at, okay_at, None, True)
    if wait_status is None:
        code, signo, core = 127, None, False
    else:
        code, signo, core = decode_wait_status(wait_status)
    return ExitInfo(pid, code, signo, core, cause, classify_exit(cfg, code, signo, cause),
                    started_at, died_at, ready_at, okay_at, spawn_error)


def wants_restart(cfg: RestartConfig, info: ExitInfo) -> tuple[bool, str]:
    """Whether the restart policy restarts after ``info``, and why (for the log)."""
    c = info.classification
    if c is ExitClass.REQUESTED_STOP:
        return (True, "restart requested") if info.cause is Cause.RESTART else (False, "stop requested")
    if c is ExitClass.DO_NOT_RESTART:
        return False, f"exit code {info.exit_code} is in restart.prevent_exit_codes"
    if info.signal is None and info.exit_code in cfg.force_exit_codes and c in (ExitClass.CLEAN, ExitClass.FAILURE):
        return True, f"exit code {info.exit_code} is in restart.force_exit_codes"
    restart = {
        "always": True,
        "on-failure": c is not ExitClass.CLEAN,
        "on-crash": c in (ExitClass.SIGNALED, ExitClass.HUNG),
        "never": False,
    }[cfg.policy]
    return restart, f"restart.policy is {cfg.policy} and the daemon {_HOW_IT_ENDED[c]}"


_HOW_IT_ENDED = {
    ExitClass.CLEAN: "exited cleanly",
    ExitClass.FAILURE: "exited with a failure code",
    ExitClass.SIGNALED: "was killed by a signal",
    ExitClass.HUNG: "hung",
    ExitClass.START_TIMEOUT: "did not become ready in time",
}


def is_stable(cfg: RestartConfig, info: ExitInfo) -> bool:
    """A run that was confirmed (okay-delay) and stayed up reset_after resets the backoff."""
    return info.start_ok and info.uptime >= cfg.backoff.reset_after


def restart_attempt(cfg: RestartConfig, history: Sequence[ExitInfo]) -> int:
    """1 for the first restart after a stable run (or ever), 2 for the second in a row, ..."""
    n = 0
    for info in reversed(history):
        n += 1
        if is_stable(cfg, info) or info.classification is ExitClass.REQUESTED_STOP:
            break
    return max(n, 1)


def backoff_delay(cfg: BackoffConfig, attempt: int, rand: Callable[[], float]) -> float:
    """Delay before restart number ``attempt`` (1-based), jittered by +-jitter, never above maximum."""
    if attempt <= 1:
        base = cfg.initial
    else:
        exponent = min(attempt - 2, 1000)
        try:
            base = cfg.step * cfg.factor ** exponent
        except OverflowError:
            base = cfg.maximum
    base = min(base, cfg.maximum)
    if base <= 0:
        return 0.0
    spread = cfg.jitter * (2.0 * rand() - 1.0)  # uniform in [-jitter, +jitter)
    return max(0.0, min(cfg.maximum, base * (1.0 + spread)))


def deaths_in_window(cfg: RestartConfig, history: Sequence[ExitInfo], now: float) -> int:
    """Deaths (not requested stops) within the crash-loop window ending now."""
    since = now - cfg.crash_loop.window
    return sum(1 for i in history
               if i.classification is not ExitClass.REQUESTED_STOP and i.died_at > since)


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do after a death; ``exit_code`` is the supervisor's own if it stops here."""

    action: Action
    reason: str
    delay: float = 0.0
    attempt: int = 0
    exit_code: int = ExitCode.OK
    deaths: int = 0        # COOLDOWN/GIVE_UP: the deaths within the window that reached the limit

    def describe(self) -> str:
        if self.action is Action.RESTART:
            when = "at once" if self.delay == 0 else f"in {self.delay:.2f}s"
            return f"restart #{self.attempt} {when} ({self.reason})"
        if self.action is Action.GIVE_UP:
            return f"giving up ({self.reason})"
        if self.action is Action.COOLDOWN:
            return f"crash-loop cooldown #{self.attempt}: next try in {format_duration(self.delay)} ({self.reason})"
        return f"not restarting ({self.reason})"


def cooldown_duration(cfg: CrashLoopConfig, number: int) -> float:
    """Length of cooldown NUMBER in a row (1-based): ``cooldown``, doubled each time, at most ``cooldown_max``."""
    exponent = min(max(number, 1) - 1, 64)     # 2**64 times any positive cooldown is past every maximum
    return min(cfg.cooldown * 2.0 ** exponent, max(cfg.cooldown_max, cfg.cooldown))


def cooldowns_in_a_row(cfg: RestartConfig, before: int, info: ExitInfo) -> int:
    """Cooldowns in a row after the death INFO: a stable run (``is_stable``) or a stop starts afresh."""
    if is_stable(cfg, info) or info.classification is ExitClass.REQUESTED_STOP:
        return 0
    return before


def decide(cfg: RestartConfig, history: Sequence[ExitInfo], now: float, rand: Callable[[], float],
           stopping: bool = False, cooldowns: int = 0) -> Decision:
    """The decision after the last death in ``history``: restart (with delay), stop, give up or cool down.

    ``cooldowns``: how many cooldowns in a row came before (``cooldowns_in_a_row``).
    """
    info = history[-1]
    failed = ExitCode.OK if info.classification in (ExitClass.REQUESTED_STOP, ExitClass.CLEAN) else ExitCode.FAILED
    if stopping:
        return Decision(Action.STOP, "the supervisor is stopping", exit_code=ExitCode.OK)
    restart, why = wants_restart(cfg, info)
    if not restart:
        return Decision(Action.STOP, why, exit_code=failed)
    if info.cause is Cause.RESTART:
        return Decision(Action.RESTART, why, 0.0, 1)
    limit = cfg.crash_loop.max_deaths
    deaths = deaths_in_window(cfg, history, now)
    if limit and deaths >= limit:
        reason = (f"{deaths} deaths within {format_duration(cfg.crash_loop.window)}, "
                  f"restart.crash_loop.max_deaths is {limit}")
        if cfg.crash_loop.action == "cooldown":
            number = cooldowns + 1
            return Decision(Action.COOLDOWN, reason, cooldown_duration(cfg.crash_loop, number), number,
                            deaths=deaths)
        return Decision(Action.GIVE_UP, reason, exit_code=ExitCode.GAVE_UP, deaths=deaths)
    attempt = restart_attempt(cfg, history)
    return Decision(Action.RESTART, why, backoff_delay(cfg.backoff, attempt, rand), attempt)


def format_wait(seconds: float) -> str:
    """A time left, rounded up to whole seconds: '45s', '4m12s', '1h00m05s'."""
    s = max(0, int(-(-seconds // 1)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s"


def prune_history(cfg: RestartConfig, history: Sequence[ExitInfo], now: float, keep: int = 64) -> list[ExitInfo]:
    """History trimmed to what decisions can still use: the window, and a bounded tail for backoff."""
    tail = list(history[-keep:])
    since = now - cfg.crash_loop.window
    # Entries before the last stable run never matter for the attempt count.
    for idx in range(len(tail) - 1, -1, -1):
        if is_stable(cfg, tail[idx]) or tail[idx].classification is ExitClass.REQUESTED_STOP:
            return [i for j, i in enumerate(tail) if j >= idx or i.died_at > since]
    return tail
