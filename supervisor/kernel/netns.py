"""Network namespace identity, and running code inside a named namespace.

``enter(name)`` moves the calling thread into ``/run/netns/NAME`` (as
``ip netns exec`` would) and always moves it back; sockets opened and
programs started inside belong to that namespace.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

from ..errors import NetnsError

# Every `ipsec status` asks which namespace it runs in (for its default paths); only entering
# one needs libc, and ctypes.util alone imports subprocess, shutil and tempfile.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Iterator

NETNS_RUN_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000

_libc = None


@dataclass(frozen=True, slots=True)
class NetnsIdentity:
    """Which network namespace: its inode, and its /run/netns name when it has one."""

    inode: int              # inode of /proc/self/ns/net: unique while the namespace lives
    name: str | None        # name under /run/netns, when it has one

    def to_json(self) -> dict:
        return {"inode": self.inode, "name": self.name}


def _setns(fd: int, what: str) -> None:
    global _libc
    import ctypes
    if _libc is None:
        # The interpreter's own symbols include libc's; ctypes.util.find_library("c") would run
        # ldconfig (8 ms) on every command that enters a namespace.
        _libc = ctypes.CDLL(None, use_errno=True)
        if not hasattr(_libc, "setns"):
            _libc = ctypes.CDLL("libc.so.6", use_errno=True)
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NetnsError(f"cannot enter network namespace {what}: {os.strerror(err)}")


# Where the host's names are when our own /run is private (Neutron's netns wrapper bind-mounts a
# router's directory over /var/run): PID 1's view of the file system.
HOST_NETNS_RUN_DIR = "/proc/1/root/run/netns"


def _name_in(directory: str, st: os.stat_result) -> str | None:
    with contextlib.suppress(OSError):
        for entry in sorted(os.listdir(directory)):
            with contextlib.suppress(OSError):
                other = os.stat(os.path.join(directory, entry))
                if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
                    return entry
    return None


def current_identity() -> NetnsIdentity:
    """The calling thread's network namespace, and its name if /run/netns (ours or the host's) has one."""
    st = os.stat("/proc/thread-self/ns/net")
    name = _name_in(NETNS_RUN_DIR, st) or _name_in(HOST_NETNS_RUN_DIR, st)
    return NetnsIdentity(inode=st.st_ino, name=name)


@contextlib.contextmanager
def enter(name: str | None) -> Iterator[None]:
    """Run the body inside network namespace NAME (``None``: stay where we are)."""
    if name is None:
        yield
        return
    if "/" in name or name in (".", ".."):
        raise NetnsError(f"network namespace name {name!r} is not valid (no '/' allowed)")
    path = os.path.join(NETNS_RUN_DIR, name)
    try:
        target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NetnsError(f"network namespace {name!r} does not exist ({path} not found; "
                         "create it with 'ip netns add')") from None
    except OSError as exc:
        raise NetnsError(f"cannot open network namespace {name!r} ({path}): {exc.strerror}") from None
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(target, repr(name))
        try:
            yield
        finally:
            _setns(home, "of origin (the supervisor cannot continue safely)")
    finally:
        os.close(target)
        os.close(home)
