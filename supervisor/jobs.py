"""Child processes of the supervisor: the daemon, load/reload commands and hooks.

A ``Child`` runs in its own session, is watched through a pidfd and has its output read line by
line in the event loop; an ``AttachedProcess`` is a daemon an earlier supervisor started, watched
through a pidfd alone.  A ``Job`` is a command with a time limit; a ``CommandSequence`` runs
commands one after another and stops at the first failure.
"""

from __future__ import annotations

import collections
import logging
import os
import signal
import subprocess
import tty
from dataclasses import dataclass
from typing import Callable, Sequence

from .config import format_duration
from .errors import printable
from .eventloop import Loop, Timer
from .policy import signal_name

job_log = logging.getLogger("supervisor.job")

MAX_LINE = 8192
KEEP_LINES = 200        # a job's last output lines, kept for its result


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class Child:
    """A process in its own session with a pidfd and its output captured line by line."""

    attached = False

    def __init__(self, loop: Loop, argv: Sequence[str], env: dict[str, str], *, on_line: Callable[[str], None],
                 on_exit: Callable[[int], None], cwd: str = "/", pty: bool = False):
        self._loop = loop
        self._on_line = on_line
        self._on_exit = on_exit
        if pty:
            # A terminal makes C stdio flush every line; raw mode keeps the bytes as written.
            r, w = os.openpty()
            tty.setraw(w)
        else:
            r, w = os.pipe2(os.O_CLOEXEC)
        try:
            # start_new_session: own session and process group (and no controlling terminal);
            # close_fds: nothing but 0-2; restore_signals: SIGPIPE & co back to default.  The
            # signal mask is inherited from the loop thread, which clears its own (Supervisor.run).
            self.popen = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=w, stderr=w, cwd=cwd,
                                          env=env, close_fds=True, start_new_session=True,
                                          restore_signals=True)
        except BaseException:
            os.close(r)
            os.close(w)
            raise
        os.close(w)
        self.pid = self.popen.pid
        self.pidfd = os.pidfd_open(self.pid)
        self._out = r
        self._partial = b""
        self.exited = False
        self.exited_at: float | None = None
        os.set_blocking(r, False)
        loop.add_reader(r, self._read)
        loop.add_reader(self.pidfd, self._reap)

    def _read(self) -> bool:
        """Read one chunk; False when nothing more is there right now or at end of file."""
        if self._out < 0:
            return False
        try:
            chunk = os.read(self._out, 65536)
        except BlockingIOError:
            return False  # nothing more for now (EOF comes later through the reader)
        except OSError:
            chunk = b""  # EIO: a pty whose other side is closed for good
        if not chunk:
            if self._partial:
                self._emit(self._partial)
                self._partial = b""
            self._loop.forget(self._out)
            os.close(self._out)
            self._out = -1
            return False
        data = self._partial + chunk
        *lines, self._partial = data.split(b"\n")
        for line in lines:
            self._emit(line)
        while len(self._partial) > MAX_LINE:
            self._emit(self._partial[:MAX_LINE])
            self._partial = self._partial[MAX_LINE:]
        return True

    def _emit(self, raw: bytes) -> None:
        self._on_line(raw.decode("utf-8", "replace").rstrip("\r"))

    def _reap(self) -> None:
        self.exited_at = self._loop.clock()  # the moment the pidfd woke us: when death was seen
        # The process is gone; everything it wrote is already in the pipe: read it first so
        # the crash report has its last words.
        for _ in range(64):
            if not self._read():
                break
        try:
            _, status = os.waitpid(self.pid, 0)
        except ChildProcessError:
            logging.getLogger("supervisor").error(
                "pid %d was reaped by someone else; its exit status is lost (counted as exit code 255)", self.pid)
            status = 255 << 8
        self.popen.returncode = status  # keeps subprocess from waiting for it again
        self.exited = True
        self._loop.forget(self.pidfd)
        os.close(self.pidfd)
        self.pidfd = -1
        # Whatever the process left in its session (e.g. an updown script) goes with it; the
        # pgid cannot be reused while any member is alive, so this cannot hit a stranger.
        _kill_group(self.pid)
        self._on_exit(status)

    def send(self, signo: int) -> bool:
        if self.pidfd < 0:
            return False
        try:
            signal.pidfd_send_signal(self.pidfd, signo)
            return True
        except ProcessLookupError:
            return False

    def close(self) -> None:
        """Kill and forget (used on supervisor exit and for abandoned jobs)."""
        if not self.exited and self.pidfd >= 0:
            self.send(signal.SIGKILL)
            _kill_group(self.pid)
            try:
                os.waitpid(self.pid, 0)
            except ChildProcessError:
                pass
            self.popen.returncode = -9
            self._loop.forget(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = -1
            self.exited = True
        if self._out >= 0:
            self._loop.forget(self._out)
            os.close(self._out)
            self._out = -1


class AttachedProcess:
    """A daemon this supervisor did not start (re-attached): the same interface as ``Child`` for the
    Supervisor, but watched through a pidfd only: no waitpid (not our child), no output (its pty went
    with the supervisor that started it). ``on_exit(None)``: the exit status is unknown."""

    attached = True

    def __init__(self, loop: Loop, pid: int, *, start_time: int | None, on_exit: Callable[[int | None], None],
                 start_time_of: Callable[[int], int | None]):
        self._loop = loop
        self._on_exit = on_exit
        self.pid = pid
        self.pidfd = os.pidfd_open(pid)          # ProcessLookupError: gone already
        # The pidfd pins one process; checked after opening it, the start time proves it is the one meant.
        if start_time is not None and start_time_of(pid) != start_time:
            os.close(self.pidfd)
            raise ProcessLookupError(f"pid {pid} is no longer the process that was checked")
        self.exited = False
        self.exited_at: float | None = None
        loop.add_reader(self.pidfd, self._gone)

    def _gone(self) -> None:
        self.exited_at = self._loop.clock()
        self.exited = True
        self._loop.forget(self.pidfd)
        os.close(self.pidfd)
        self.pidfd = -1
        self._on_exit(None)

    def send(self, signo: int) -> bool:
        if self.pidfd < 0:
            return False
        try:
            signal.pidfd_send_signal(self.pidfd, signo)
            return True
        except ProcessLookupError:
            return False

    def close(self) -> None:
        """Kill and forget (supervisor failure: never leave the daemon unsupervised)."""
        if not self.exited and self.pidfd >= 0:
            self.send(signal.SIGKILL)
            self._loop.forget(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = -1
            self.exited = True


@dataclass(frozen=True, slots=True)
class JobResult:
    ok: bool
    detail: str                         # "exited with code 1", "killed after 30s (time limit)"
    exit_code: int | None = None        # None: killed, timed out or never started
    lines: tuple[str, ...] = ()         # its last output lines


class Job:
    """A command with a time limit (load, reload, hook); ``on_done(JobResult)`` once."""

    def __init__(self, loop: Loop, label: str, argv: Sequence[str], env: dict[str, str], timeout: float,
                 on_done: Callable[[JobResult], None]):
        self.label = label
        self.done = False
        self._loop = loop
        self._on_done = on_done
        self._timed_out = False
        self._timeout_s = timeout
        self._started = loop.clock()
        self._timer: Timer | None = None
        self._lines: collections.deque[str] = collections.deque(maxlen=KEEP_LINES)
        self.child: Child | None = None
        try:
            self.child = Child(loop, argv, env, on_line=self._line, on_exit=self._exited)
        except (OSError, subprocess.SubprocessError) as exc:
            why = getattr(exc, "strerror", None) or str(exc)
            loop.call_soon(lambda: self._finish(JobResult(False, f"cannot run {argv[0]}: {why}")))
            return
        job_log.info("%s: running %s (pid %d, time limit %s)", label, " ".join(argv), self.child.pid,
                     format_duration(timeout))
        self._timer = loop.call_later(timeout, self._timeout)

    def _line(self, line: str) -> None:
        pid = self.child.pid if self.child else 0
        self._lines.append(line)
        job_log.info("%s[%d]: %s", self.label, pid, line)

    def _timeout(self) -> None:
        if self.child and not self.child.exited:
            self._timed_out = True
            job_log.warning("%s: still running after its time limit of %s; killing it", self.label,
                            format_duration(self._timeout_s))
            self.child.send(signal.SIGKILL)
            _kill_group(self.child.pid)

    def _exited(self, status: int) -> None:
        if self._timer:
            self._timer.cancel()
        took = self._loop.clock() - self._started
        lines = tuple(self._lines)
        if self._timed_out:
            self._finish(JobResult(False, f"killed after {took:.1f}s (time limit)", None, lines))
        elif os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
            self._finish(JobResult(True, f"succeeded in {took:.2f}s", 0, lines))
        elif os.WIFEXITED(status):
            code = os.WEXITSTATUS(status)
            self._finish(JobResult(False, f"exited with code {code}", code, lines))
        else:
            self._finish(JobResult(False, f"killed by {signal_name(os.WTERMSIG(status))}", None, lines))

    def _finish(self, result: JobResult) -> None:
        if self.done:
            return
        self.done = True
        self._on_done(result)

    def cancel(self) -> None:
        """Kill it; on_done is not called."""
        self.done = True
        if self._timer:
            self._timer.cancel()
        if self.child:
            self.child.close()


REFUSED_PREFIX = "refused: "     # a load command's line naming one conn charon refused


@dataclass(frozen=True, slots=True)
class SequenceResult:
    ok: bool
    detail: str                     # why it failed ("" when ok)
    refused: tuple[str, ...] = ()   # from commands that exited with the partial code


class CommandSequence:
    """Commands run one after another; stops at the first failure; ``on_done(SequenceResult)``.

    ``partial_exit``: the exit code of a command that did its work except for parts it reports on
    lines starting with ``refused: `` (the ipsec.conf loader: some conns refused, the others loaded).
    """

    def __init__(self, loop: Loop, label: str, commands: Sequence[Sequence[str]], env: dict[str, str],
                 timeout: float, on_done: Callable[[SequenceResult], None], *, partial_exit: int | None = None):
        self._loop, self._label, self._env, self._timeout = loop, label, env, timeout
        self._todo = list(commands)
        self._on_done = on_done
        self._partial_exit = partial_exit
        self._refused: list[str] = []
        self._job: Job | None = None
        self.cancelled = False
        self._loop.call_soon(self._next)

    def _next(self) -> None:
        if self.cancelled:
            return
        if not self._todo:
            self._on_done(SequenceResult(True, "", tuple(self._refused)))
            return
        argv = self._todo.pop(0)
        self._job = Job(self._loop, self._label, argv, self._env, self._timeout,
                        lambda r, argv=argv: self._after(argv, r))

    def _after(self, argv: Sequence[str], result: JobResult) -> None:
        if self.cancelled:
            return
        if result.ok:
            self._next()
        elif self._partial_exit is not None and result.exit_code == self._partial_exit:
            self._refused += [line[len(REFUSED_PREFIX):] for line in result.lines if line.startswith(REFUSED_PREFIX)]
            self._next()
        else:
            tail = [printable(line) for line in result.lines if line.strip()][-3:]
            why = f"{' '.join(argv)} {result.detail}" + (f": {' / '.join(tail)}" if tail else "")
            self._on_done(SequenceResult(False, why, tuple(self._refused)))

    def cancel(self) -> None:
        self.cancelled = True
        if self._job:
            self._job.cancel()
