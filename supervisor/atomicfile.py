"""Atomic file replacement: temp file in the same directory, fsync, rename, fsync the directory.

A reader sees the old file or the new one, never half of one; a crash leaves no partial
file behind. ``write_atomic_at`` works relative to a directory fd and never follows a
symlink (the one writer; ``write_atomic`` opens PATH's directory and calls it). Callers
turn the OSError into their own error (which object, what happens next).
"""

from __future__ import annotations

import os
from typing import Iterable

_TMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def write_atomic_at(dir_fd: int, name: str, chunks: Iterable[str] | str, *, mode: int = 0o600,
                    prefix: str = ".tmp-", durable: bool = True) -> None:
    """Replace NAME in the directory DIR_FD with the text CHUNKS, created with MODE (umask ignored)."""
    if "/" in name or name in ("", ".", ".."):
        raise ValueError(f"{name!r} is not a plain file name")
    for _ in range(100):
        tmp = f"{prefix}{os.urandom(6).hex()}.tmp"   # (secrets costs 4 ms of imports)
        try:
            fd = os.open(tmp, _TMP_FLAGS, 0o600, dir_fd=dir_fd)   # O_EXCL: never an existing file
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(17, "no unused temporary name", tmp)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            for chunk in ([chunks] if isinstance(chunks, str) else chunks):
                out.write(chunk)
            if durable:
                out.flush()
                os.fsync(out.fileno())
        # rename(2) replaces a symlink named NAME itself; it never writes through it.
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except OSError:
            pass
        raise
    if durable:
        os.fsync(dir_fd)     # the rename itself must survive a power loss


def write_atomic(path: str, chunks: Iterable[str] | str, *, mode: int = 0o600,
                 prefix: str = ".tmp-", durable: bool = True) -> str:
    """Replace PATH with the text CHUNKS, created with MODE; OSError leaves PATH as it was."""
    directory = os.path.dirname(os.path.abspath(path)) or "."
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        write_atomic_at(dir_fd, os.path.basename(path), chunks, mode=mode, prefix=prefix, durable=durable)
    finally:
        os.close(dir_fd)
    return path
