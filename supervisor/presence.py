"""Which supervisor runs for a run directory, found by what cannot be wiped: its process.

A running supervisor holds RUN_DIR/supervisor.lock open (flock) for its whole life. When /run is
wiped (tmpfiles, an admin), the file is gone but the process still holds it: /proc/PID/fd shows
``RUN_DIR/supervisor.lock (deleted)``. So a supervisor starting meanwhile looks for processes of this
network namespace, run by root, with an ipsec-supervisor command line, holding that lock (present or
deleted), and leaves the run directory to them. ``holds_lock`` decides from one process's facts.
"""

from __future__ import annotations

import os

from .frontend.pidfile import is_supervisor_cmdline

# Annotations only: `ipsec status` imports this module when the supervisor does not answer.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Iterable, Sequence

LOCK_NAME = "supervisor.lock"
DELETED = " (deleted)"


def holds_lock(fd_targets: Iterable[str], argv: Sequence[str], uid: int | None, netns: int | None, *,
               lock_path: str, netns_inode: int) -> bool:
    """A supervisor process for LOCK_PATH in this namespace: root, our command line, the lock file open (pure)."""
    if uid != 0 or netns != netns_inode or not is_supervisor_cmdline(list(argv)):
        return False
    return any(t == lock_path or t == lock_path + DELETED for t in fd_targets)


def _argv(pid: int, proc: str) -> list[str]:
    try:
        with open(f"{proc}/{pid}/cmdline", "rb") as fh:
            return [a.decode("utf-8", "replace") for a in fh.read().split(b"\0") if a]
    except OSError:
        return []


def _uid(pid: int, proc: str) -> int | None:
    try:
        with open(f"{proc}/{pid}/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Uid:"):
                    return int(line.split()[2])
    except (OSError, IndexError, ValueError):
        pass
    return None


def _fd_targets(pid: int, proc: str) -> list[str]:
    out = []
    try:
        names = os.listdir(f"{proc}/{pid}/fd")
    except OSError:
        return out
    for name in names:
        try:
            out.append(os.readlink(f"{proc}/{pid}/fd/{name}"))
        except OSError:
            continue
    return out


def running_supervisors(run_dir: str, *, exclude: Iterable[int] = (), proc: str = "/proc") -> list[int]:
    """Pids of the supervisors that hold RUN_DIR's lock in our network namespace (besides EXCLUDE)."""
    lock_path = os.path.join(os.path.realpath(run_dir), LOCK_NAME)
    try:
        netns_inode = os.stat(f"{proc}/thread-self/ns/net").st_ino
    except OSError:
        return []
    skip = set(exclude) | {os.getpid()}
    found = []
    for entry in os.listdir(proc):
        if not entry.isdigit() or int(entry) in skip:
            continue
        pid = int(entry)
        argv = _argv(pid, proc)
        if not argv or not is_supervisor_cmdline(argv):
            continue        # cheap test first: most processes are not ours
        try:
            netns = os.stat(f"{proc}/{pid}/ns/net").st_ino
        except OSError:
            continue
        if holds_lock(_fd_targets(pid, proc), argv, _uid(pid, proc), netns, lock_path=lock_path,
                      netns_inode=netns_inode):
            found.append(pid)
    return sorted(found)
