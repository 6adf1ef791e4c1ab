"""The ``ipsec`` pid file: which supervisor it names, and whether one runs.

Whether a supervisor runs is decided by the lock it holds (``supervisor.runlock``), never by
what the pid file says or by a process's argv: a pid file with no lock held behind it is
stale, whatever its pid runs now. ``inspect_pid_file`` says why it is stale (for the
message), ``remove_pid_file`` removes it only if it still names the pid that was judged.
The file is read and written relative to the checked run directory, never through a symlink.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass

from ..errors import UnsafePathError
from ..trusted_paths import open_trusted_dir

# `typing` is imported for type checkers only: every polled `ipsec status` would pay 3 ms for it.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Sequence

PID_FILE_NAME = "supervisor.pid"
START_LOCK_NAME = "start.lock"

# argv[0..2] of a supervisor process: `ipsec-supervisor run`, `python -m supervisor.cli run`,
# `ipsec start --nofork` (python3 /usr/.../ipsec start --nofork) and the detached child
# `python -m supervisor.ipsec_cli start --nofork`.
_MODULES = ("supervisor.cli", "supervisor.ipsec_cli")


class PidState(enum.Enum):
    ABSENT = "absent"          # no pid file
    RUNNING = "running"        # a supervisor holds the run directory's lock
    GONE = "gone"              # no lock held; names a process that no longer exists (or is a zombie)
    REUSED = "reused"          # no lock held; the pid belongs to a process that is not a running supervisor
    GARBAGE = "garbage"        # unreadable or not a pid

    @property
    def stale(self) -> bool:
        return self in (PidState.GONE, PidState.REUSED, PidState.GARBAGE)


@dataclass(frozen=True, slots=True)
class PidFile:
    """What a pid file says and what /proc says about it."""

    path: str
    state: PidState
    pid: int | None = None
    program: str | None = None   # the command line found for a REUSED pid

    def describe(self) -> str:
        if self.state is PidState.ABSENT:
            return f"no pid file {self.path}"
        if self.state is PidState.RUNNING:
            return f"pid file {self.path} names ipsec-supervisor pid {self.pid} (the supervisor lock is held)"
        if self.state is PidState.GONE:
            return f"stale pid file {self.path}: pid {self.pid} is not running"
        if self.state is PidState.REUSED:
            return (f"stale pid file {self.path}: pid {self.pid} now belongs to another program "
                    f"({self.program}), which holds no supervisor lock")
        return f"stale pid file {self.path}: it does not hold a process id"


def pid_file_path(run_dir: str) -> str:
    return os.path.join(run_dir, PID_FILE_NAME)


def is_supervisor_cmdline(argv: Sequence[str]) -> bool:
    """True for the command lines an ipsec-supervisor process runs under (see _MODULES)."""
    head = list(argv[:4])
    names = [os.path.basename(a) for a in head]
    if "ipsec-supervisor" in names or any(a in _MODULES for a in head):
        return True
    return "ipsec" in names and "start" in argv and "--nofork" in argv


def read_cmdline(pid: int, proc: str = "/proc") -> list[str] | None:
    """argv of PID; None if it does not exist; [] for a zombie or kernel thread."""
    try:
        with open(f"{proc}/{pid}/cmdline", "rb") as fh:
            raw = fh.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return []
    return [a.decode("utf-8", "replace") for a in raw.split(b"\0") if a]


def judge_pid(path: str, text: str | None, cmdline: list[str] | None, locked: bool) -> PidFile:
    """Pure: the pid file's TEXT (None: no file), the named process's argv (None: no process), and
    whether a supervisor holds the lock (LOCKED), which alone makes it RUNNING."""
    if text is None:
        return PidFile(path, PidState.ABSENT)
    try:
        pid: int | None = int(text.strip())
    except ValueError:
        pid = None
    if pid is not None and pid <= 0:
        pid = None
    if locked:
        return PidFile(path, PidState.RUNNING, pid)
    if pid is None:
        return PidFile(path, PidState.GARBAGE)
    if not cmdline:  # gone, or a zombie waiting for its parent
        return PidFile(path, PidState.GONE, pid)
    return PidFile(path, PidState.REUSED, pid, " ".join(cmdline)[:120])


def read_pid_text(path: str) -> str | None:
    """The pid file's first bytes; None if there is none. Unreadable or not ours: "" (garbage)."""
    directory, name = os.path.split(path)
    try:
        with open_trusted_dir(directory, create=False) as run:
            return run.read_bytes(name, 4096).decode("ascii", "replace")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, UnsafePathError):
        return ""


def inspect_pid_file(path: str, locked: bool, proc: str = "/proc") -> PidFile:
    text = read_pid_text(path)
    cmdline = None
    if text is not None and not locked:
        try:
            cmdline = read_cmdline(int(text.strip()), proc)
        except ValueError:
            pass
    return judge_pid(path, text, cmdline, locked)


def write_pid_file(path: str, pid: int) -> None:
    """Write PID atomically (a reader never sees a half-written file) in the checked run directory."""
    directory, name = os.path.split(path)
    with open_trusted_dir(directory, what="paths.run_dir", tighten=True) as run:
        run.write_atomic(name, f"{pid}\n", mode=0o644, prefix=".pid-", durable=False)


def remove_pid_file(path: str, pid: int | None) -> bool:
    """Remove PATH if it still names PID (None: whatever it names); True if removed."""
    text = read_pid_text(path)
    if text is None:
        return False
    if pid is not None:
        try:
            if int(text.strip()) != pid:
                return False
        except ValueError:
            return False
    directory, name = os.path.split(path)
    try:
        with open_trusted_dir(directory, create=False) as run:
            return run.unlink(name)
    except FileNotFoundError:
        return False
