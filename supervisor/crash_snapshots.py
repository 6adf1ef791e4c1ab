"""Snapshots of what a dead daemon left: names, retention, and the write beside the restart.

Only the kernel read stays before charon's restart; the snapshot is written afterwards by a
thread of its own (``Writer``). So that a supervisor killed in between never loses it
silently, an *intent record* (``.intent-<snapshot name>``: a few hundred bytes naming the
snapshot, the dead daemon and the recovery chosen) is written before the restart and
removed once the snapshot is on disk. The next supervisor start finds an intent without
its snapshot (``unfinished_intents``) and writes, under the intended name, the kernel
state it reads then, saying in ``context.deferred`` that the state at the crash was lost
and why (``lost_snapshot``).

Why an intent and not the state itself: writing 30,000 records before the restart is
what made the restart slow; the intent costs one small file, written without fsync (it
guards against the supervisor's death, which the page cache survives, not the machine's).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import os
import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from .errors import UnsafePathError
from .trusted_paths import STAMPED_NAME, TrustedDir, open_own_subdir, prune_files

log = logging.getLogger("supervisor.recovery")

INTENT_PREFIX = ".intent-"
INTENT_SCHEMA = "ipsec-supervisor/snapshot-intent"
PAUSE_LIMIT = 30.0      # a pause never holds the writer longer (a recovery that never resumes it)
# Tests only: seconds the writer waits before a deferred snapshot (a window to kill the supervisor in).
TEST_DELAY_ENV = "IPSEC_SUPERVISOR_TEST_SNAPSHOT_DELAY"


def snapshot_name(wall: float, pid: int | None, reason: str) -> str:
    stamp = _dt.datetime.fromtimestamp(wall, _dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    return f"{stamp}-{pid or 0}-{reason}.json"


def snapshot_paths(directory: str) -> list[str]:
    """Snapshot files (regular files only), oldest first (names start with a UTC time stamp)."""
    try:
        with open_own_subdir(directory, create=False) as d:
            return [d.join(f.name) for f in d.files(".json")]
    except FileNotFoundError:
        return []


def prune_snapshots(directory: str | TrustedDir, keep: int, max_age: float, now: float,
                    max_bytes: int = 0) -> list[str]:
    """Remove snapshots beyond the newest KEEP, those older than MAX_AGE seconds (0: no limit), then the
    oldest until the rest fit in MAX_BYTES (0: no limit); by name in the checked directory, never via a link."""
    if isinstance(directory, TrustedDir):
        return prune_files(directory, ".json", keep=keep, max_age=max_age, max_bytes=max_bytes, now=now)
    try:
        with open_own_subdir(directory, create=False) as d:
            return prune_files(d, ".json", keep=keep, max_age=max_age, max_bytes=max_bytes, now=now)
    except FileNotFoundError:
        return []


def ownership_context(ownership: Any, state: Any) -> dict:
    """For the snapshot: which objects (index per family) were charon's, by which rule."""
    owned: dict[str, list] = {}
    for family, records in state.objects.items():
        pairs = ownership.verdicts.get(family, ())
        if len(pairs) == len(records) and all(r is judged for r, (judged, _) in zip(records, pairs)):
            # the state judged itself (the usual case): its verdicts in order, no lookup table
            owned[family] = [[i, v.rule] for i, (_, v) in enumerate(pairs) if v.owned]
            continue
        rows = []
        for i, record in enumerate(records):
            v = ownership.verdict_of(record)
            if v is not None and v.owned:
                rows.append([i, v.rule])
        owned[family] = rows
    return owned


# --- a crash between its read (before the restart) and the rest (after it) --------------------

@dataclass
class PendingCrash:
    """A crash's recovery between its kernel read (before the restart) and the rest (after it)."""

    key: tuple                  # (pid, died_at): the crash report waits for this section
    choice: Any                 # recovery.RecoveryChoice
    why: str
    pid: int | None
    abnormal: bool
    daemon: dict
    decode: Callable[..., Any] | None  # the read at the crash (optional SHARE: see kernel_state.read_state_later)
    ledger: Any                     # the dead daemon's, by which the leftovers are judged
    ownership: Any              # already decided when a flush ran before the restart
    results: list | None        # that flush's results
    name: str | None            # the snapshot's file name; its intent record is on disk
    section: dict
    started: float
    read_at: str                # wall clock of the read, ISO 8601


def state_after_flush(state: Any, results: Iterable[Any]) -> Any:
    """STATE as a flush with RESULTS left it: deleted objects gone, blocks added or removed (pure)."""
    from .reconcile import DeleteObject, InstallBlockPolicy, RemoveBlockPolicy
    gone = {id(r.action.record) for r in results if isinstance(r.action, DeleteObject) and r.ok}
    added = [r.action.block for r in results if isinstance(r.action, InstallBlockPolicy) and r.ok]
    unblocked = {r.action.block.key() for r in results if isinstance(r.action, RemoveBlockPolicy) and r.ok}
    objects = {}
    for family, records in state.objects.items():
        kept = tuple(x for x in records if id(x) not in gone
                     and not (family == "xfrm_policy" and unblocked and x.key() in unblocked))
        objects[family] = kept + tuple(added) if family == "xfrm_policy" else kept
    return dataclasses.replace(state, objects=objects)


# --- intent records ----------------------------------------------------------------------------
# Written, read and removed like every file of the root daemon: relative to the checked snapshot
# directory (trusted_paths), never through a symlink, mode 0600, atomically.

def intent_name(name: str) -> str:
    return INTENT_PREFIX + name


def write_intent(directory: str, name: str, record: dict) -> str:
    """Record (before the restart) that snapshot NAME is still to be written; returns its path.
    OSError or UnsafePathError (the directory is not ours) when it cannot."""
    doc = {"schema": INTENT_SCHEMA, "version": 1, "snapshot": name, "supervisor_pid": os.getpid(), **record}
    with open_own_subdir(directory, what="paths.state_dir") as d:     # checked, created 0700
        return d.write_atomic(intent_name(name), json.dumps(doc), mode=0o600, prefix=".intent-tmp-",
                              durable=False)


def finish_intent(directory: str, name: str) -> None:
    """Remove the intent of snapshot NAME (written, or given up); a missing one is already gone."""
    try:
        with open_own_subdir(directory, create=False) as d:
            d.unlink(intent_name(name))
    except FileNotFoundError:
        pass
    except (OSError, UnsafePathError) as exc:
        log.warning("cannot remove the intent record of snapshot %s in %s: %s (the next start completes it "
                    "again)", name, directory, getattr(exc, "strerror", None) or exc)


def unfinished_intents(d: TrustedDir) -> list[tuple[str, dict]]:
    """(intent name, its record) for every intent in D left by a supervisor that died, oldest first;
    an unreadable one gets a record that says so."""
    out = []
    with os.scandir(d.fd) as it:        # hidden names: TrustedDir.files leaves them out
        names = sorted(e.name for e in it if e.name.startswith(INTENT_PREFIX)
                       and not e.name.startswith(".intent-tmp-") and e.is_file(follow_symlinks=False))
    for n in names:
        try:
            doc = json.loads(d.read_bytes(n, 1 << 16))
            if not isinstance(doc, dict) or doc.get("schema") != INTENT_SCHEMA:
                raise ValueError("not an intent record")
        except (OSError, ValueError, UnsafePathError) as exc:
            doc = {"snapshot": n[len(INTENT_PREFIX):], "unreadable": str(exc)}
        out.append((n, doc))
    return out


def lost_snapshot(intent: dict, now_wall: float) -> dict:
    """``context.deferred`` of the snapshot a later start writes for INTENT: what was lost and why."""
    pid = intent.get("supervisor_pid")
    return {
        "complete": False,
        "intended_at": intent.get("read_at"),
        "written_at": _dt.datetime.fromtimestamp(now_wall, _dt.timezone.utc).isoformat(timespec="milliseconds"),
        "lost": (f"the supervisor (pid {pid}) died between restarting charon and writing this snapshot: "
                 "the state read at the crash is gone; these objects are the kernel state at the next "
                 "supervisor start, which the restarted charon may have changed meanwhile"),
        "recovery_at_crash": intent.get("recovery"),
    }


def complete_unfinished(directory: str, state: Any, now_wall: float) -> list[str]:
    """At a supervisor's start: for every intent whose snapshot never came, write that snapshot
    from STATE (the kernel now), saying in ``context.deferred`` what was lost and why; an intent
    whose snapshot made it is only removed. Returns the snapshots written."""
    from .errors import SupervisorError
    from .snapshot import take_snapshot, write_snapshot_in
    written: list[str] = []
    try:
        d = open_own_subdir(directory, create=False, what="paths.state_dir")
    except FileNotFoundError:
        return written
    except (OSError, UnsafePathError) as exc:
        log.error("cannot look for unfinished snapshots in %s: %s", directory, getattr(exc, "strerror", None) or exc)
        return written
    with d:
        for intent_file, intent in unfinished_intents(d):
            name = os.path.basename(str(intent.get("snapshot") or ""))
            if name and not STAMPED_NAME.fullmatch(name):
                name = ""           # not a name we give: the record is only removed
            if name and not os.path.lexists(d.join(name)):
                snap = take_snapshot(state, daemon=intent.get("daemon"))
                snap = dataclasses.replace(snap, context={**snap.context, "recovery": intent.get("recovery"),
                                                          "deferred": lost_snapshot(intent, now_wall)})
                try:
                    written.append(write_snapshot_in(d, name, snap))
                except SupervisorError as exc:
                    log.error("%s; the record of the lost snapshot stays in %s", exc, d.join(intent_file))
                    continue
                log.warning("the snapshot %s of %s was never written (%s); written now with the state found at "
                            "this start instead, see its context.deferred", name, intent.get("why") or "a crash",
                            intent.get("unreadable") or f"supervisor pid {intent.get('supervisor_pid')} died first")
            d.unlink(intent_file)
    return written


# --- the writer thread -------------------------------------------------------------------------

def libc_malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none (musl, others)."""
    try:
        import ctypes
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


class Writer:
    """One thread writing snapshots and records beside the restart; jobs run in order, and
    ``close`` waits for queued ones (bounded), since each is the only copy of what it writes."""

    def __init__(self, name: str = "recovery-writer",
                 find_trim: Callable[[], Callable[[int], int] | None] = libc_malloc_trim):
        self._find_trim = find_trim
        self._trim: Callable[[int], int] | None = None
        self.trims = 0                      # times the heap was handed back (tests, diagnostics)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._idle = threading.Event()
        self._idle.set()
        self._open = threading.Event()     # cleared while a crash's recovery runs before the restart
        self._open.set()
        self._pending = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], None], what: str) -> None:
        with self._lock:
            self._pending += 1
            self._idle.clear()
        self._queue.put((fn, what))

    def _serve(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fn, what = item
            try:
                fn()
            except BaseException:  # noqa: BLE001 - logged; the next job still runs
                log.exception("recovery writer: '%s' failed", what)
            # The job's closure holds a crash's whole state (tens of MB): not until the next job.
            item = fn = None
            with self._lock:
                self._pending -= 1
                drained = not self._pending
            if drained:
                try:
                    self.give_back()
                except Exception:  # noqa: BLE001 - a trim is a nicety; the writer must go on
                    log.exception("recovery writer: returning free memory to the system failed")
                with self._lock:
                    if not self._pending:
                        self._idle.set()

    def give_back(self) -> None:
        """Hand the C heap's free pages back to the system (glibc keeps them: the RSS would stay at
        the crash's peak; 13-19 MB at 10,000 tunnels, under 1 ms). Here once the queue drains, and by
        recovery after decoding a crash's read; never on the restart's path."""
        with self._lock:        # (called by the writer's thread and by recovery's: looked up once)
            if self._find_trim is not None:
                self._trim, self._find_trim = self._find_trim(), None
            trim = self._trim
        if trim is not None:
            trim(0)
            with self._lock:
                self.trims += 1

    def wait_idle(self, timeout: float | None = None) -> bool:
        return self._idle.wait(timeout)

    def pause(self) -> None:
        """Hold the writer at its next checkpoint: a crash's read and flush before the restart must
        not share the GIL with a ledger save of 40,000 entries (it made the flush 3x slower)."""
        self._open.clear()

    def resume(self) -> None:
        self._open.set()

    def checkpoint(self) -> None:
        """Called by the writer's jobs between chunks: wait (GIL released) while paused."""
        if threading.current_thread() is self._thread:
            self._open.wait(PAUSE_LIMIT)

    def close(self, wait: float = 30.0) -> None:
        self._open.set()
        self._queue.put(None)
        self._thread.join(wait)
