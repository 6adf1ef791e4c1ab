"""Reading large files without copying them: mapped from the page cache, under a read lease.

``read()`` puts a 21 MB snapshot (30,000 policies) into fresh memory: 5,000 page faults and a
copy, about 11 ms of CPU a file in a command that takes 60 ms to start (measured: reading two
such files costs a fresh process 22 ms, mapping them 1 ms). A mapped file that shrinks under its
reader ends the reader with SIGBUS, though: so a file is mapped only under a read lease, which
makes whoever opens it for writing or truncates it wait until the lease is released (at most the
kernel's lease-break-time, /proc/sys/fs/lease-break-time). The lease is released when the scope
ends; the mappings stay valid as long as something uses them (a snapshot writer never truncates:
it renames a new file over the old one). A lease holds back only the writers of this kernel that
reach the file through this inode: so files are mapped only on the local filesystems in LEASED
(not overlayfs, whose upper and lower files are written past the merged one, nor NFS, 9p,
virtiofs or FUSE, written from elsewhere). Where no lease can be had (neither owner nor root, a
file open for writing, leases disabled), on any other filesystem and for anything but a large
regular file (a pipe, <(...)), the file is read as before.

What a lease cannot hold back, and ends the reader with SIGBUS (exit 135) where read() would not:
an I/O error on a page (MAP_POPULATE reads every page at once), and a writer still waiting when
lease-break-time runs out (45 s by default) while the reader is stopped before it is done
(Ctrl-Z, a debugger: the reading itself takes a fraction of a second).
"""

from __future__ import annotations

import fcntl
import mmap
import os
import signal
import stat

MIN_MAPPED = 1 << 20     # smaller files: read() costs less than the four calls of mapping
LEASED = frozenset(("ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "tmpfs"))   # filesystems mapped from


class MappedFiles:
    """A scope in which large regular files are read mapped, each under a read lease held until
    the scope ends: ``with MappedFiles() as files: data = files.read(path)``."""

    def __init__(self, min_size: int | None = None) -> None:
        self.min_size = MIN_MAPPED if min_size is None else max(1, min_size)     # (nothing maps 0 bytes)
        self._leased: list[int] = []        # our descriptors of the mapped files, holding their leases
        self._filesystems: dict[int, str] | None = None     # st_dev: type, of this process's mounts

    def read(self, path: str) -> bytes | mmap.mmap:
        """PATH's bytes: an mmap for a large regular file a lease could be had on, else bytes.
        Raises OSError as open() and read() do."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = self._lease(fd)
            if size is not None:
                try:
                    mapped = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE | mmap.MAP_POPULATE, prot=mmap.PROT_READ)
                except (OSError, ValueError):
                    _unlease(fd)
                else:
                    self._leased.append(fd)
                    fd = -1
                    return mapped
            with open(fd, "rb", closefd=False) as f:
                return f.read()
        finally:
            if fd >= 0:
                os.close(fd)

    def _lease(self, fd: int) -> int | None:
        """The size of the file at FD once a read lease holds it still, or None (not to be mapped)."""
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size < self.min_size or self._filesystem(st.st_dev) not in LEASED:
            return None
        try:
            # A lease breaker is announced by a signal, SIGIO unless told: SIGURG's default is to
            # ignore it (the breaker waits all the same), where SIGIO's would end this process.
            fcntl.fcntl(fd, fcntl.F_SETSIG, signal.SIGURG)
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
        except OSError:
            return None
        size = os.fstat(fd).st_size        # (what it is now that nobody can change it)
        if size < self.min_size:
            _unlease(fd)
            return None
        return size

    def _filesystem(self, dev: int) -> str | None:
        """The type of the filesystem mounted as device DEV (/proc/self/mountinfo), None if unknown."""
        if self._filesystems is None:
            self._filesystems = mounted_filesystems()
        return self._filesystems.get(dev)

    def close(self) -> None:
        """Release the leases (the mappings stay valid for whoever still uses them)."""
        leased, self._leased = self._leased, []
        for fd in leased:
            _unlease(fd)
            os.close(fd)

    def __enter__(self) -> MappedFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def mounted_filesystems(path: str = "/proc/self/mountinfo") -> dict[int, str]:
    """{st_dev: filesystem type} of the mounts in PATH (empty when it cannot be read)."""
    found: dict[int, str] = {}
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                fields = line.split()
                try:
                    major, minor = fields[2].split(":")
                    kind = fields[fields.index("-", 6) + 1]
                    found.setdefault(os.makedev(int(major), int(minor)), kind)
                except (IndexError, ValueError):
                    continue        # (not a line of the format: nothing is mapped from it)
    except OSError:
        pass
    return found


def _unlease(fd: int) -> None:
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
    except OSError:
        pass


def same_bytes(a, i: int, b, j: int, size: int = 1 << 20) -> bool:
    """Whether A from I on holds the bytes B holds from J on, for buffers of any kind (an mmap has no
    startswith; comparing memoryviews goes byte by byte): a chunk of SIZE at a time."""
    n = len(a) - i
    if n != len(b) - j:
        return False
    return all(a[i + k:i + k + size] == b[j + k:j + k + size] for k in range(0, n, size))
