"""Atomic file replacement: temp file in the same directory, fsync, rename, fsync the directory.

A reader sees the old file or the new one, never half of one; a crash leaves no partial
file behind. Callers turn the OSError into their own error (which object, what happens next).
"""

from __future__ import annotations

import os
import tempfile
from typing import Iterable


def write_atomic(path: str, chunks: Iterable[str] | str, *, mode: int = 0o600,
                 prefix: str = ".tmp-", durable: bool = True) -> str:
    """Replace PATH with the text CHUNKS, created with MODE; OSError leaves PATH as it was."""
    directory = os.path.dirname(os.path.abspath(path)) or "."
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=directory)   # created 0600
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            for chunk in ([chunks] if isinstance(chunks, str) else chunks):
                out.write(chunk)
            if durable:
                out.flush()
                os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if durable:
        dirfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dirfd)     # the rename itself must survive a power loss
        finally:
            os.close(dirfd)
    return path
