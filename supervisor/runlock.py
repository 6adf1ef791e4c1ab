"""The supervisor lock: one supervisor per run directory, and the proof that one runs.

A running supervisor holds an exclusive flock on RUN_DIR/supervisor.lock for its whole
life; the kernel drops it when the process dies, however it dies. So "is a supervisor
running?" is "is the lock held?", never "does some process's argv look like ours?". The
pid written into the lock file (and the pid file) is information only: the holder's pid
comes from the kernel (/proc/locks) and is confirmed by the holder having the lock file
open, before anyone signals it.
"""

from __future__ import annotations

import fcntl
import os
import time
from dataclasses import dataclass

from .errors import SupervisorError
from .trusted_paths import TrustedDir, open_trusted_dir

LOCK_NAME = "supervisor.lock"


@dataclass(frozen=True, slots=True)
class LockHolder:
    """Whether a supervisor holds PATH, and its pid when the kernel says which process it is."""

    path: str
    held: bool
    pid: int | None = None      # confirmed holder (it has the lock file open); None: unknown or not held

    def describe(self) -> str:
        if not self.held:
            return f"no supervisor holds {self.path}"
        return f"a supervisor (pid {self.pid if self.pid is not None else 'unknown'}) holds {self.path}"


def try_lock_at(run: TrustedDir, name: str) -> int | None:
    """An fd holding an exclusive flock on RUN/NAME (created if missing); None if another holds it.

    Holders remove the file as they let go (``release_at``: nothing of ours stays in /run), so a
    lock taken on a file that is no longer at NAME is worthless: then try the one there now.
    """
    while True:
        fd = run.open(name, os.O_RDWR | os.O_CREAT, 0o600)    # O_NOFOLLOW; ours, regular, 1 link
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        try:
            now = os.stat(name, dir_fd=run.fd, follow_symlinks=False)
            if (now.st_dev, now.st_ino) == (lambda st: (st.st_dev, st.st_ino))(os.fstat(fd)):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def release_at(run_dir: str, name: str, fd: int) -> None:
    """Remove RUN_DIR/NAME while still holding its lock (if it is still our file), then let go."""
    path = os.path.join(run_dir, name)
    try:
        st, mine = os.stat(path, follow_symlinks=False), os.fstat(fd)
        if (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino):
            os.unlink(path)
    except OSError:
        pass
    os.close(fd)


def acquire_lock(run: TrustedDir) -> int:
    """Hold RUN's lock for this process's lifetime (fd returned); SupervisorError if another holds it."""
    for attempt in range(5):
        fd = try_lock_at(run, LOCK_NAME)
        if fd is not None:
            break
        time.sleep(0.02)    # a prober's shared lock lasts microseconds; a supervisor's, its life
    else:
        holder = find_lock_holder(run.path)
        who = f"pid {holder.pid}, " if holder.pid else ""
        raise SupervisorError(f"another ipsec-supervisor is running ({who}it holds {run.join(LOCK_NAME)}); "
                              f"use 'ipsec-supervisor status' to see it") from None
    # Only now, holding the lock on a file we checked, is it ours to rewrite.
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def parse_proc_locks(text: str) -> list[tuple[int, int]]:
    """(pid, inode) of every granted FLOCK lock in /proc/locks' TEXT (waiters skipped)."""
    out = []
    for line in text.splitlines():
        words = line.split()
        if len(words) < 6 or words[1] == "->" or words[1] != "FLOCK":
            continue
        try:
            pid = int(words[4])
            inode = int(words[5].rsplit(":", 1)[1])
        except (ValueError, IndexError):
            continue
        out.append((pid, inode))
    return out


def has_open(pid: int, st: os.stat_result, proc: str = "/proc") -> bool:
    """True if process PID has the file ST (dev, inode) open."""
    fd_dir = f"{proc}/{pid}/fd"
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return False
    for name in names:
        try:
            other = os.stat(f"{fd_dir}/{name}")
        except OSError:
            continue
        if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
            return True
    return False


def _pid_in_file(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        pid = int(text)
    except (OSError, ValueError):
        return None
    return pid if pid > 0 else None


def find_lock_holder(run_dir: str, proc: str = "/proc", *, pid: bool = True) -> LockHolder:
    """Who holds RUN_DIR's lock. A missing run directory or lock file: nobody. UnsafePathError if untrustworthy.

    PID=False: only whether it is held (a lock probe), never /proc/locks, whose first read in a process
    waits for an RCU grace period in the kernel (10-25 ms of wall time for every polled `ipsec status`)."""
    path = os.path.join(run_dir, LOCK_NAME)
    try:
        run = open_trusted_dir(run_dir, create=False)
    except FileNotFoundError:
        return LockHolder(path, False)
    with run:
        try:
            fd = run.open(LOCK_NAME, os.O_RDONLY)
        except FileNotFoundError:
            return LockHolder(path, False)
        try:
            if not pid:
                return LockHolder(path, _locked(fd))
            st = os.fstat(fd)
            try:
                with open(f"{proc}/locks", encoding="ascii", errors="replace") as fh:
                    locks: list[int] | None = [pid for pid, inode in parse_proc_locks(fh.read())
                                               if inode == st.st_ino]
            except OSError:
                locks = None
            if locks == []:
                return LockHolder(path, False)      # the kernel lists no lock on it
            for pid in locks or ():
                if pid > 0 and has_open(pid, st, proc):
                    return LockHolder(path, True, pid)
            # No /proc/locks, or its pid is not one we can see (another pid namespace): ask the
            # lock itself, and take the pid the holder wrote only if that process has the file open.
            if not _locked(fd):
                return LockHolder(path, False)
            hint = _pid_in_file(fd)
            return LockHolder(path, True, hint if hint is not None and has_open(hint, st, proc) else None)
        finally:
            os.close(fd)


def held_at(run_dir: str, name: str) -> bool:
    """Whether someone holds the lock RUN_DIR/NAME now (a missing directory or file: nobody); creates nothing."""
    try:
        run = open_trusted_dir(run_dir, create=False)
    except FileNotFoundError:
        return False
    with run:
        try:
            fd = run.open(name, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            return _locked(fd)
        finally:
            os.close(fd)


def _locked(fd: int) -> bool:
    """Whether someone holds an exclusive lock on FD's file: a non-blocking shared lock is refused."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False


def lock_run_dir(run_dir: str) -> int:
    """Check (or create 0700) RUN_DIR and hold its lock; the fd stays open for the process's life."""
    with open_trusted_dir(run_dir, what="paths.run_dir", tighten=True) as run:
        return acquire_lock(run)


def unlock_run_dir(run_dir: str, fd: int) -> None:
    """At exit: remove the lock file while holding it, then let go."""
    release_at(run_dir, LOCK_NAME, fd)
