"""Where the ownership facts go on disk: the daemon record at once, the ledger beside the restart.

A successor supervisor needs two things: which charon runs (``daemon_record``: pid, start time,
spawn tick, loaded, adoption deadline; a few hundred bytes written synchronously whenever they
change) and what charon owns (the ledger: tens of thousands of entries, about a second to write
at 10,000 tunnels). Only the first may stand on the restart path; the ledger is written by the
recovery writer thread (``crash_snapshots.Writer``), one save at a time and always the newest.
Both go through the checked run directory (``trusted_paths``), atomically, mode 0600.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from typing import Callable

from .crash_snapshots import Writer
from .daemon_record import DaemonRecord, DaemonRecordError, remove_record, save_record
from .ledger import Ledger, LedgerError, ledger_path, save_ledger

log = logging.getLogger("supervisor.recovery")

MIN_SAVE_DELAY = 1.0        # ledger writes are debounced: at most one per second, more apart when big


class LedgerStore:
    """The daemon record and the ledger of one run directory, and the writer thread behind them."""

    def __init__(self, run_dir: Callable[[], str], current: Callable[[], Ledger | None]):
        self._run_dir = run_dir             # read at each write: a reload may move paths.run_dir
        self._current = current             # the newest ledger (None: none this run)
        self._save_lock = threading.Lock()  # one ledger write at a time, each with the newest ledger
        self._errors: dict[str, str | None] = {"ledger": None, "record": None}
        self.record = DaemonRecord(None, None)
        self._record_lock = threading.Lock()    # changed from the hook thread and the jobs thread
        self.writer: Writer | None = None
        self._last_cost = 0.0               # CPU seconds of the last ledger write

    @property
    def save_error(self) -> str | None:
        """The last ledger write's failure (None: it worked, or none yet)."""
        return self._errors["ledger"]

    def start(self) -> None:
        self.writer = Writer()

    @contextlib.contextmanager
    def writer_paused(self):
        """The writer waits at its next checkpoint meanwhile (a crash's work before the restart)."""
        writer = self.writer
        if writer is not None:
            writer.pause()
        try:
            yield
        finally:
            if writer is not None:
                writer.resume()

    def save_delay(self) -> float:
        """Seconds to gather changes before the next ledger write: at least MIN_SAVE_DELAY, and ten
        times what the last write cost, so that steady churn at 40,000 entries (rekeying) costs
        at most a tenth of a core rather than all of it."""
        return max(MIN_SAVE_DELAY, 10 * self._last_cost)

    def close(self, daemon_running: bool = False) -> None:
        """Let the writer finish what is queued (bounded), then write the ledger one last time; the
        daemon record goes unless a daemon still runs (nothing of ours stays in /run but the ledger)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        self.save_now()
        if not daemon_running:
            with self._record_lock:
                remove_record(self._run_dir())

    # -- the daemon record: synchronous, small ---------------------------------------------------
    def note_daemon(self, *, write: bool = True, **changes) -> None:
        """Change the daemon record (fields of DaemonRecord) and, with WRITE, put it on disk now."""
        with self._record_lock:         # a change and its write together: never an older record over a newer
            self.record = dataclasses.replace(self.record, **changes)
            if write:
                self._write_record()

    def write_record(self) -> None:
        with self._record_lock:
            self._write_record()

    def _write_record(self) -> None:
        try:
            save_record(self._run_dir(), self.record)
            self._errors["record"] = None
        except DaemonRecordError as exc:
            self._complain("record", str(exc))

    # -- the ledger: in the writer ---------------------------------------------------------------
    def save_later(self) -> None:
        """Write the newest ledger in the writer thread (after what is queued there)."""
        if self.writer is not None:
            self.writer.submit(self.save_now, "save ledger")
        else:
            self.save_now()

    def save_now(self) -> None:
        """Write the newest ledger here, now; a failure is logged once per distinct message."""
        with self._save_lock:
            ledger = self._current()
            if ledger is None:
                return
            cpu = time.thread_time()
            try:
                save_ledger(ledger_path(self._run_dir()), ledger,
                            pace=self.writer.checkpoint if self.writer is not None else None)
                self._errors["ledger"] = None
                self._last_cost = time.thread_time() - cpu
            except LedgerError as exc:
                self._complain("ledger", f"{exc}; ownership after a supervisor restart falls back to markers")

    def restore(self) -> None:
        """The run directory was wiped: the record now, the ledger in the writer."""
        self.write_record()
        self.save_later()

    def _complain(self, what: str, message: str) -> None:
        if self._errors[what] != message:
            log.warning("%s", message)
        self._errors[what] = message
