"""Our directories and the files in them, used only when nobody but root could have changed them.

Every directory the supervisor creates or reuses (``paths.run_dir``, ``paths.state_dir``,
crashes/, snapshots/) must be a real directory (never a symlink), owned by root (our
effective uid), and not writable by group or others; missing components are created
one at a time with mode 0700 whatever the umask. Existing ancestors must be owned by
root and not writable by others unless sticky (/tmp). Files are then opened relative to
the directory's fd with O_NOFOLLOW, so a name swapped for a symlink cannot redirect a
write, and pruning unlinks by name in that fd (unlink never follows a link).

A check that fails raises ``UnsafePathError`` (exit 10) naming the path, what is wrong
and what to do; nothing is chmod-ed or chown-ed behind the operator's back except the
run directory, which is ours alone and always made 0700.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from dataclasses import dataclass

from .errors import UnsafePathError

# Every polled `ipsec status` reads the pid file through here: typing, logging and the atomic
# writer (secrets, tempfile names) are imported where they are used.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Iterable, Sequence

DIR_MODE = 0o700
# The names the supervisor gives its crash reports and snapshots (UTC stamp, pid, reason):
# pruning removes only these, never a file someone else put there (a manual snapshot).
STAMPED_NAME = re.compile(r"\d{8}T\d{6}\.\d{6}Z-\d+-[A-Za-z0-9_.-]+\.json")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


# --- judging (pure) --------------------------------------------------------------------

def judge_own_dir(st: os.stat_result, uid: int) -> str | None:
    """What is wrong with a directory we keep our files in (None: nothing)."""
    if stat.S_ISLNK(st.st_mode):
        return "is a symlink"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if st.st_uid != uid:
        return f"is owned by uid {st.st_uid}, not {_who(uid)}"
    if st.st_mode & 0o022:
        return f"is writable by {_writers(st.st_mode)} (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def judge_ancestor(st: os.stat_result, uid: int) -> str | None:
    """What is wrong with a directory above ours (None: nothing); sticky ones like /tmp may be shared."""
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if st.st_uid not in (0, uid):
        return f"is owned by uid {st.st_uid}, not {_who(uid)}"
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        return (f"is writable by {_writers(st.st_mode)} without the sticky bit "
                f"(mode {stat.S_IMODE(st.st_mode):04o}): they could rename our directory away")
    return None


def judge_own_file(st: os.stat_result, uid: int) -> str | None:
    """What is wrong with a file of ours (None: nothing)."""
    if stat.S_ISLNK(st.st_mode):
        return "is a symlink"
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if st.st_uid != uid:
        return f"is owned by uid {st.st_uid}, not {_who(uid)}"
    if st.st_mode & 0o022:
        return f"is writable by {_writers(st.st_mode)} (mode {stat.S_IMODE(st.st_mode):04o})"
    if st.st_nlink > 1:
        return f"has {st.st_nlink} hard links (another name could point at a file we must not change)"
    return None


def _who(uid: int) -> str:
    return "root" if uid == 0 else f"uid {uid} (the supervisor's)"


def _writers(mode: int) -> str:
    return " and ".join(w for bit, w in ((0o020, "its group"), (0o002, "others")) if mode & bit)


def _fix(path: str, problem: str, is_dir: bool) -> str:
    if problem.startswith("is a symlink"):
        return f"remove the symlink (rm {path}); the supervisor creates the {'directory' if is_dir else 'file'} itself"
    if problem.startswith("is owned"):
        return f"check what is in it, then remove it or run 'chown root:root {path}'"
    if "writable" in problem:
        return f"run 'chmod go-w {path}' (or 0700) after checking who changed it"
    if problem.startswith("has "):
        return f"remove {path} (the supervisor creates it again)"
    return f"remove {path} or point the setting elsewhere"


def unsafe(path: str, problem: str, *, what: str = "", is_dir: bool = True) -> UnsafePathError:
    """The error for PATH: what is wrong, that we refuse, and what to do."""
    label = f"{what} {path}" if what else path
    return UnsafePathError(f"refusing to use {label}: it {problem}; {_fix(path, problem, is_dir)}")


# --- directories -----------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class DirEntry:
    """A regular file found in a trusted directory."""

    name: str
    size: int
    mtime: float


class TrustedDir:
    """An open directory fd that passed ``judge_own_dir``; files in it are opened relative to it."""

    def __init__(self, path: str, fd: int, what: str = ""):
        self.path = path
        self.fd = fd
        self.what = what

    def __enter__(self) -> "TrustedDir":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def join(self, name: str) -> str:
        return os.path.join(self.path, name)

    def subdir(self, name: str, *, create: bool = True) -> "TrustedDir":
        """NAME in this directory, checked like its parent (created 0700 when missing)."""
        fd = _open_child_dir(self.fd, name, self.join(name), create=create, what="")
        return TrustedDir(self.join(name), fd)

    def open(self, name: str, flags: int, mode: int = 0o600, *, check: bool = True) -> int:
        """os.open of NAME relative to this directory, never through a symlink; CHECK: ours, regular."""
        path = self.join(name)
        try:
            fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, mode, dir_fd=self.fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise unsafe(path, "is a symlink", is_dir=False) from None
            raise
        try:
            problem = judge_own_file(os.fstat(fd), os.geteuid()) if check else None
            if problem:
                raise unsafe(path, problem, is_dir=False)
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def read_bytes(self, name: str, limit: int) -> bytes:
        """NAME's content (at most LIMIT bytes, else ValueError); the file must be ours."""
        fd = self.open(name, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            if size > limit:
                raise ValueError(f"{self.join(name)} is {size} bytes, more than the limit of {limit}")
            chunks, total = [], 0
            while True:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    return b"".join(chunks)
                total += len(chunk)
                if total > limit:
                    raise ValueError(f"{self.join(name)} is more than the limit of {limit} bytes")
                chunks.append(chunk)
        finally:
            os.close(fd)

    def write_atomic(self, name: str, chunks: Iterable[str] | str, *, mode: int = 0o600,
                     prefix: str = ".tmp-", durable: bool = True) -> str:
        from .atomicfile import write_atomic_at
        write_atomic_at(self.fd, name, chunks, mode=mode, prefix=prefix, durable=durable)
        return self.join(name)

    def unlink(self, name: str) -> bool:
        """Remove the entry NAME (a link itself, never its target); False if already gone."""
        try:
            os.unlink(name, dir_fd=self.fd)
            return True
        except FileNotFoundError:
            return False

    def files(self, suffix: str = "") -> list[DirEntry]:
        """Regular files ending in SUFFIX (not hidden), sorted by name; anything else is logged and skipped."""
        out = []
        with os.scandir(self.fd) as it:
            for entry in it:
                if not entry.name.endswith(suffix) or entry.name.startswith("."):
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if not stat.S_ISREG(st.st_mode):
                    from .lazylog import Logger
                    Logger(__name__).warning("skipping %s: not a regular file (a symlink or something else; "
                                "the supervisor neither reads nor removes it)", self.join(entry.name))
                    continue
                out.append(DirEntry(entry.name, st.st_size, st.st_mtime))
        return sorted(out, key=lambda e: e.name)


def files_to_prune(files: Sequence[DirEntry], *, keep: int | None, max_age: float = 0.0,
                   max_bytes: int = 0, now: float = 0.0) -> list[str]:
    """Pure: the names to remove, oldest first (names sort by age): beyond the newest KEEP, older
    than MAX_AGE seconds (0: no limit), then the oldest until the rest total at most MAX_BYTES
    (0: no limit); the newest file is never removed for its size."""
    ordered = sorted(files, key=lambda f: f.name)
    doomed = {f.name for f in ordered[:max(0, len(ordered) - keep)]} if keep is not None else set()
    if max_age > 0:
        doomed |= {f.name for f in ordered if now - f.mtime > max_age}
    if max_bytes > 0:
        left = [f for f in ordered if f.name not in doomed]
        total = sum(f.size for f in left)
        for f in left[:-1]:
            if total <= max_bytes:
                break
            doomed.add(f.name)
            total -= f.size
    return [f.name for f in ordered if f.name in doomed]


def prune_files(d: TrustedDir, suffix: str, *, keep: int | None, max_age: float = 0.0, max_bytes: int = 0,
                now: float = 0.0) -> list[str]:
    """Remove what ``files_to_prune`` picks among D's regular SUFFIX files named by us (STAMPED_NAME),
    by name in D's fd, never through a link; returns the removed paths, oldest first."""
    removed = []
    ours = [f for f in d.files(suffix) if STAMPED_NAME.fullmatch(f.name)]
    for name in files_to_prune(ours, keep=keep, max_age=max_age, max_bytes=max_bytes, now=now):
        if d.unlink(name):
            removed.append(d.join(name))
    return removed


def _open_child_dir(parent_fd: int, name: str, path: str, *, create: bool, what: str) -> int:
    """Open (creating it 0700 if allowed) directory NAME in PARENT_FD, refusing what is not trustworthy."""
    for _ in range(3):      # mkdir/open races with another creator: try again
        try:
            fd = os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=parent_fd)
        except FileNotFoundError:
            if not create:
                raise
            try:
                os.mkdir(name, DIR_MODE, dir_fd=parent_fd)
            except FileExistsError:
                continue
            fd = os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=parent_fd)
            os.fchmod(fd, DIR_MODE)     # the umask may have taken bits off (or a 0777 parent asked for)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
                raise unsafe(path, judge_own_dir(st, os.geteuid()) or "is not a directory", what=what) from None
            raise
        problem = judge_own_dir(os.fstat(fd), os.geteuid())
        if problem:
            os.close(fd)
            raise unsafe(path, problem, what=what)
        return fd
    raise OSError(errno.EAGAIN, "directory keeps appearing and disappearing", path)


def open_trusted_dir(path: str, *, create: bool = True, what: str = "", tighten: bool = False) -> TrustedDir:
    """PATH as a TrustedDir: each missing component created 0700, each one checked (see module doc).

    FileNotFoundError when it is missing and CREATE is False; UnsafePathError when a check
    fails; other OSErrors as they come. TIGHTEN: make it exactly 0700 (the run directory).
    """
    path = os.path.abspath(path)
    parts = [p for p in path.split("/") if p]
    uid = os.geteuid()
    fd = os.open("/", _DIR_FLAGS)
    here = "/"
    try:
        for i, name in enumerate(parts[:-1]):
            here = os.path.join(here, name)
            try:
                # Existing ancestors may be symlinks (/var/run -> /run); what they lead to is checked.
                nfd = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                nfd = _open_child_dir(fd, name, here, create=True, what=what)
            os.close(fd)
            fd = nfd
            problem = judge_ancestor(os.fstat(fd), uid)
            if problem:
                label = f"{what} {path}" if what else path
                raise UnsafePathError(f"refusing to use {label}: its parent {here} {problem}; "
                                      f"{_fix(here, problem, True)}, or choose another place")
        if parts:
            nfd = _open_child_dir(fd, parts[-1], path, create=create, what=what)
            os.close(fd)
            fd = nfd
        if tighten and stat.S_IMODE(os.fstat(fd).st_mode) != DIR_MODE:
            os.fchmod(fd, DIR_MODE)
    except BaseException:
        os.close(fd)
        raise
    return TrustedDir(path, fd, what)


def open_own_subdir(path: str, *, create: bool = True, what: str = "") -> TrustedDir:
    """PATH, a directory of ours inside another of ours (STATE_DIR/crashes): both checked as ours."""
    parent, name = os.path.split(os.path.abspath(path))
    with open_trusted_dir(parent, create=create, what=what) as up:
        d = up.subdir(name, create=create)
    return d


# --- one instance per network namespace ---------------------------------------------------

NETNS_SUBDIR = "netns"


def netns_instance(inode: int, name: str | None, initial_inode: int | None) -> str | None:
    """Pure: None for the initial network namespace (pid 1's); else its name under /run/netns
    (what `ip netns identify` says), or ``inode-N`` for an unnamed one. When pid 1's namespace
    cannot be read (INITIAL_INODE None), a named namespace is taken for a non-initial one."""
    usable = name if name and "/" not in name and name not in (".", "..") else None
    if initial_inode is None:
        return usable
    if inode == initial_inode:
        return None
    return usable or f"inode-{inode}"


def initial_netns_inode(proc: str = "/proc") -> int | None:
    """Inode of pid 1's network namespace; None when it cannot be read (then we count as initial)."""
    try:
        return os.stat(f"{proc}/1/ns/net").st_ino
    except OSError:
        return None


def current_netns_instance() -> str | None:
    """This process's instance name (see ``netns_instance``); None in the initial namespace."""
    from .kernel.netns import current_identity
    ident = current_identity()
    return netns_instance(ident.inode, ident.name, initial_netns_inode())


def instance_dir(default_dir: str, instance: str | None) -> str:
    """DEFAULT_DIR/netns/INSTANCE for a supervisor outside the initial namespace (else DEFAULT_DIR)."""
    return default_dir if instance is None else os.path.join(default_dir, NETNS_SUBDIR, instance)
