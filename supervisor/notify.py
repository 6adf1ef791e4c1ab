"""systemd integration: sd_notify messages and journald structured logging (systemd-python).

Outside systemd (no NOTIFY_SOCKET) every notification is a no-op; outside journald (stderr
is not the journal stream) logging goes to plain stderr.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Callable, Mapping

# Variables for the supervisor alone; a daemon or hook that inherits them would talk to
# systemd (or the journal) on the supervisor's behalf.
PRIVATE_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID",
               "LISTEN_FDNAMES", "JOURNAL_STREAM", "INVOCATION_ID")


def _sd_notify(message: str) -> bool:
    from systemd import daemon  # imported late: the module is optional at import time for tools
    return bool(daemon.notify(message))


class Notifier:
    """Sends READY/STATUS/RELOADING/STOPPING/WATCHDOG to systemd when NOTIFY_SOCKET is set."""

    def __init__(self, environ: Mapping[str, str] | None = None, send: Callable[[str], bool] | None = None,
                 pid: int | None = None, clock_usec: Callable[[], int] | None = None):
        env = os.environ if environ is None else environ
        self.enabled = bool(env.get("NOTIFY_SOCKET"))
        self._send = send or _sd_notify
        self._pid = os.getpid() if pid is None else pid
        self._usec = clock_usec or (lambda: time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)
        self._watchdog_usec = _watchdog_usec(env, self._pid)
        self._status: str | None = None
        self.ready_sent = False

    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None without a watchdog."""
        if not self.enabled or not self._watchdog_usec:
            return None
        return self._watchdog_usec / 2 / 1_000_000

    def _notify(self, *fields: str) -> None:
        if not self.enabled:
            return
        try:
            self._send("\n".join(fields))
        except OSError as exc:  # systemd going away must not take the supervisor with it
            logging.getLogger(__name__).warning("cannot notify systemd: %s", exc)

    def status(self, text: str) -> None:
        """STATUS= (a one-line summary); repeated identical texts are sent once."""
        text = " ".join(text.split())
        if text != self._status:
            self._status = text
            self._notify(f"STATUS={text}")

    def ready(self, status: str | None = None) -> None:
        if status is not None:
            self._status = " ".join(status.split())
        self._notify("READY=1", *([f"STATUS={self._status}"] if self._status else []))
        self.ready_sent = True

    def reloading(self) -> None:
        self._notify("RELOADING=1", f"MONOTONIC_USEC={self._usec()}")

    def reloaded(self) -> None:
        """READY=1 again after a reload, only if readiness had been reported before."""
        if self.ready_sent:
            self._notify("READY=1", *([f"STATUS={self._status}"] if self._status else []))

    def stopping(self, status: str | None = None) -> None:
        if status is not None:
            self._status = " ".join(status.split())
        self._notify("STOPPING=1", *([f"STATUS={self._status}"] if self._status else []))

    def watchdog(self) -> None:
        self._notify("WATCHDOG=1")


def _watchdog_usec(env: Mapping[str, str], pid: int) -> int | None:
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    wpid = env.get("WATCHDOG_PID")
    if wpid and wpid != str(pid):
        return None  # meant for another process (e.g. a wrapper that exec'd us wrongly)
    return usec if usec > 0 else None


def journal_stream_matches(environ: Mapping[str, str], stat: os.stat_result | None) -> bool:
    """True when stderr is the journal stream systemd announced in JOURNAL_STREAM=dev:ino."""
    value = environ.get("JOURNAL_STREAM", "")
    if not value or stat is None:
        return False
    try:
        dev, ino = (int(x) for x in value.split(":", 1))
    except ValueError:
        return False
    return stat.st_dev == dev and stat.st_ino == ino


class _StderrFormatter(logging.Formatter):
    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatTime(self, record, datefmt=None):  # noqa: N802 - logging's name
        t = time.localtime(record.created)
        return time.strftime("%Y-%m-%d %H:%M:%S", t) + f".{int(record.msecs):03d}"


def configure_logging(verbose: bool = False, environ: Mapping[str, str] | None = None) -> str:
    """Route the root logger to journald (structured) or stderr; returns 'journal' or 'stderr'."""
    env = os.environ if environ is None else environ
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        st = None
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    kind = "stderr"
    handler: logging.Handler
    if journal_stream_matches(env, st):
        try:
            from systemd.journal import JournalHandler
            handler = JournalHandler(SYSLOG_IDENTIFIER="ipsec-supervisor")
            handler.setFormatter(logging.Formatter("%(message)s"))
            kind = "journal"
        except ImportError:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(_StderrFormatter())
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_StderrFormatter())
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    return kind


def fields(**values) -> dict:
    """``extra=`` for a log call: journal fields (upper-case, None dropped)."""
    return {k.upper(): v for k, v in values.items() if v is not None}
