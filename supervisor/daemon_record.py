"""The running daemon's record: the few facts a successor needs to re-attach, written at once.

``daemon.json`` in the run directory names the daemon this supervisor runs (pid, /proc start
time, the boot tick before its spawn, whether its configuration was loaded, an adoption's
deadline) and the recovery chosen for the leftovers its run carries. It is written synchronously
at every change of those facts (before and right after a spawn, when charon is ready, when an
adoption ends, when a recovery is chosen): a few hundred bytes, no fsync (it guards
against the supervisor's death, which the page cache survives; /run does not survive a reboot,
and neither does charon). The ledger itself (40,000 entries at 10,000 tunnels: about a second
to write) follows in the recovery writer thread; ``reattach`` reads both and lets the record
name the daemon, and ``Ledger.daemon_pid``/``daemon_start_time`` tell whether the ledger on
disk is already this daemon's or still its predecessor's.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass

from .errors import SupervisorError, UnsafePathError
from .trusted_paths import open_trusted_dir

log = logging.getLogger("supervisor.recovery")

RECORD_FILE = "daemon.json"
SCHEMA = "ipsec-supervisor/daemon"
VERSION = 1
MAX_BYTES = 4096


# recovery_choice's FLUSH/ADOPT/KEEP/NONE, and recovery.mode's values (not imported: reattach and
# the CLI read this module, and recovery_choice pulls in the planners)
RECOVERY_ACTIONS = ("flush", "adopt", "keep", "none")
REASON_CHARS = 400      # the choice's reason as written (the record stays far below MAX_BYTES)


class DaemonRecordError(SupervisorError):
    """The daemon record cannot be written or read, or is not trustworthy."""


@dataclass(frozen=True, slots=True)
class RecordedChoice:
    """The recovery a supervisor chose for a dead daemon's leftovers (the next daemon carries them):
    a successor that re-attaches follows it instead of deciding anew."""

    action: str             # flush / adopt / keep / none (recovery_choice)
    fail_closed: bool
    reason: str
    mode: str               # recovery.mode when it was chosen

    def to_json(self) -> dict:
        return {"action": self.action, "fail_closed": self.fail_closed, "reason": self.reason[:REASON_CHARS],
                "mode": self.mode}


@dataclass(frozen=True, slots=True)
class DaemonRecord:
    """Who runs (or is being spawned) in this run directory's namespace."""

    netns_inode: int | None
    daemon_pid: int | None                 # None: being spawned (see spawn_tick) or none running
    daemon_start_time: int | None = None   # /proc/PID/stat starttime: a reused pid has another
    spawn_tick: int | None = None          # boot tick just before the spawn (pid not known yet)
    daemon_loaded: bool = False            # its configuration load finished
    adoption_deadline: float | None = None  # wall clock: an adoption runs until then
    recovery: RecordedChoice | None = None  # the recovery of the leftovers this run carries (None: none chosen)
    # Read only: why a record that has a 'recovery' field has no usable one (the rest of it still is)
    recovery_problem: str | None = None

    def to_json(self) -> dict:
        return {"schema": SCHEMA, "version": VERSION, "netns_inode": self.netns_inode,
                "daemon_pid": self.daemon_pid, "daemon_start_time": self.daemon_start_time,
                "spawn_tick": self.spawn_tick, "daemon_loaded": self.daemon_loaded,
                "adoption_deadline": self.adoption_deadline,
                "recovery": None if self.recovery is None else self.recovery.to_json()}


def record_path(run_dir: str) -> str:
    return os.path.join(run_dir, RECORD_FILE)


def save_record(run_dir: str, record: DaemonRecord) -> str:
    """Replace RUN_DIR/daemon.json atomically (mode 0600, checked directory, no fsync)."""
    path = record_path(run_dir)
    try:
        with open_trusted_dir(run_dir, create=False, what="the run directory") as d:
            d.write_atomic(RECORD_FILE, json.dumps(record.to_json()), mode=0o600, prefix=".daemon-",
                           durable=False)
    except (OSError, UnsafePathError) as exc:
        raise DaemonRecordError(f"cannot write the daemon record {path}: {getattr(exc, 'strerror', None) or exc} "
                                "(a supervisor started after this one may not find the running charon)") from None
    return path


def remove_record(run_dir: str) -> None:
    """Remove RUN_DIR/daemon.json if it is there (the supervisor stops and no daemon runs)."""
    try:
        with open_trusted_dir(run_dir, create=False, what="the run directory") as d:
            d.unlink(RECORD_FILE)
    except FileNotFoundError:
        pass
    except (OSError, UnsafePathError) as exc:
        log.warning("cannot remove the daemon record %s: %s", record_path(run_dir), getattr(exc, "strerror", None) or exc)


def load_record(path: str) -> DaemonRecord:
    """Read and validate PATH; FileNotFoundError when there is none, DaemonRecordError when unusable."""
    directory, name = os.path.split(os.path.abspath(path))
    try:
        with open_trusted_dir(directory, create=False) as d:
            raw = d.read_bytes(name, MAX_BYTES)
    except FileNotFoundError:
        raise
    except UnsafePathError as exc:
        raise DaemonRecordError(f"daemon record {path} is not trusted: {exc}") from None
    except ValueError:
        raise DaemonRecordError(f"daemon record {path} is larger than {MAX_BYTES} bytes") from None
    except OSError as exc:
        raise DaemonRecordError(f"cannot read daemon record {path}: {exc.strerror or exc}") from None
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise DaemonRecordError(f"daemon record {path} is not usable: not JSON ({exc})") from None
    return record_from_document(doc, path)


def record_from_document(doc: object, path: str = "<document>") -> DaemonRecord:
    """The DaemonRecord in DOC; anything malformed raises DaemonRecordError naming the field (pure)."""
    def bad(problem: str) -> DaemonRecordError:
        return DaemonRecordError(f"daemon record {path} is not usable: {problem}")
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise bad(f"not a {SCHEMA} document")
    if doc.get("version") != VERSION:
        raise bad(f"version {doc.get('version')!r} is not supported (this build reads {VERSION})")
    ints = {}
    for key in ("netns_inode", "daemon_pid", "daemon_start_time", "spawn_tick"):
        value = doc.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise bad(f"'{key}' is not a non-negative integer or null")
        ints[key] = value
    loaded = doc.get("daemon_loaded", False)
    if not isinstance(loaded, bool):
        raise bad("'daemon_loaded' is not true or false")
    deadline = doc.get("adoption_deadline")
    if deadline is not None and (not isinstance(deadline, (int, float)) or isinstance(deadline, bool)
                                 or not math.isfinite(deadline)):
        raise bad("'adoption_deadline' is not a finite number or null")
    recovery, problem = recorded_choice_from(doc)
    return DaemonRecord(ints["netns_inode"], ints["daemon_pid"], ints["daemon_start_time"], ints["spawn_tick"],
                        loaded, deadline, recovery, problem)


def recorded_choice_from(doc: dict) -> tuple[RecordedChoice | None, str | None]:
    """DOC's recovery choice, or None and why it has none to use (pure). Lenient on purpose: a bad
    choice costs only the choice (the successor decides by its own mode), not the re-attach."""
    if "recovery" not in doc:
        return None, "its daemon record has no 'recovery' field (written by an older version)"
    raw = doc["recovery"]
    if raw is None:
        return None, None
    if not isinstance(raw, dict):
        return None, "'recovery' in its daemon record is not an object"
    action, mode, fail_closed, reason = raw.get("action"), raw.get("mode"), raw.get("fail_closed"), raw.get("reason")
    for key, value in (("action", action), ("mode", mode)):
        if value not in RECOVERY_ACTIONS:
            return None, (f"'recovery.{key}' in its daemon record is {value!r}, not one of "
                          f"{', '.join(RECOVERY_ACTIONS)}")
    if not isinstance(fail_closed, bool):
        return None, "'recovery.fail_closed' in its daemon record is not true or false"
    if not isinstance(reason, str):
        return None, "'recovery.reason' in its daemon record is not a string"
    return RecordedChoice(action, fail_closed, reason, mode), None
