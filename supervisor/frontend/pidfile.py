"""The ``ipsec`` pid file: which supervisor it names, and whether that one still runs.

A pid file is stale when its process is gone or the pid now belongs to another program
(checked through /proc/PID/cmdline): ``inspect_pid_file`` says which, ``remove_pid_file``
removes it only if it still names the pid that was judged.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass

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
    RUNNING = "running"        # names a live supervisor process
    GONE = "gone"              # names a process that no longer exists (or is a zombie)
    REUSED = "reused"          # the pid now belongs to another program
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
            return f"pid file {self.path} names ipsec-supervisor pid {self.pid}"
        if self.state is PidState.GONE:
            return f"stale pid file {self.path}: pid {self.pid} is not running"
        if self.state is PidState.REUSED:
            return (f"stale pid file {self.path}: pid {self.pid} now belongs to another program "
                    f"({self.program})")
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


def judge_pid(path: str, text: str | None, cmdline: list[str] | None) -> PidFile:
    """Pure: the pid file's TEXT (None: no file) and the named process's argv (None: no process)."""
    if text is None:
        return PidFile(path, PidState.ABSENT)
    try:
        pid = int(text.strip())
    except ValueError:
        return PidFile(path, PidState.GARBAGE)
    if pid <= 0:
        return PidFile(path, PidState.GARBAGE)
    if not cmdline:  # gone, or a zombie waiting for its parent
        return PidFile(path, PidState.GONE, pid)
    if is_supervisor_cmdline(cmdline):
        return PidFile(path, PidState.RUNNING, pid)
    return PidFile(path, PidState.REUSED, pid, " ".join(cmdline)[:120])


def inspect_pid_file(path: str, proc: str = "/proc") -> PidFile:
    try:
        with open(path, encoding="ascii", errors="replace") as fh:
            text: str | None = fh.read(64)
    except FileNotFoundError:
        text = None
    except OSError:
        text = ""
    cmdline = None
    if text is not None:
        try:
            cmdline = read_cmdline(int(text.strip()), proc)
        except ValueError:
            pass
    return judge_pid(path, text, cmdline)


def write_pid_file(path: str, pid: int) -> None:
    """Write PID atomically (a reader never sees a half-written file)."""
    from ..atomicfile import write_atomic    # tempfile and shutil: only the writer needs them
    write_atomic(path, f"{pid}\n", mode=0o644, prefix=".pid-", durable=False)


def remove_pid_file(path: str, pid: int | None) -> bool:
    """Remove PATH if it still names PID (None: whatever it names); True if removed."""
    if pid is not None:
        current = inspect_pid_file(path)
        if current.pid != pid:
            return False
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False
