"""Error types and the exit codes they map to (one table for every command).

Every error message says what failed, on which object, why, and what happens
next; the CLI prints ``str(error)`` and exits with ``error.exit_code``.
"""

from __future__ import annotations

import enum
import sys


class ExitCode(enum.IntEnum):
    """Exit codes of ``ipsec-supervisor`` (documented in README.md)."""

    OK = 0
    FAILED = 1          # an operation failed (kernel refused, I/O error); partial results were reported
    USAGE = 2           # bad command-line arguments
    CONFIG = 3          # the configuration file is invalid
    NOT_ROOT = 4        # needs root (CAP_NET_ADMIN)
    NO_NETNS = 5        # the named network namespace does not exist
    BAD_SNAPSHOT = 6    # a snapshot file is unreadable, corrupt or of an unknown version
    NOT_RUNNING = 7     # the supervisor/daemon is not running (control commands)
    NO_DAEMON = 8       # the daemon binary is missing or not executable
    GAVE_UP = 9         # crash-loop limit reached: the supervisor gave up (fail-closed)
    UNSAFE_PATH = 10    # a directory or file of ours is not trustworthy (owner, mode, symlink)
    PARTIAL = 11        # load-ipsec-conf: loaded, but charon refused some conns (listed as "refused: ...")


class SupervisorError(Exception):
    """Base class: an error with a complete message and an exit code."""

    exit_code: ExitCode = ExitCode.FAILED

    def __init__(self, message: str, exit_code: ExitCode | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(SupervisorError):
    exit_code = ExitCode.USAGE


class ConfigError(SupervisorError):
    exit_code = ExitCode.CONFIG


class NotRootError(SupervisorError):
    exit_code = ExitCode.NOT_ROOT


class NetnsError(SupervisorError):
    exit_code = ExitCode.NO_NETNS


class SnapshotError(SupervisorError):
    exit_code = ExitCode.BAD_SNAPSHOT


class UnsafePathError(SupervisorError):
    """A directory or file we would use could have been changed by someone other than root."""

    exit_code = ExitCode.UNSAFE_PATH


class KernelError(SupervisorError):
    """A kernel operation (dump, add, delete) failed; never means "nothing there"."""

    def __init__(self, message: str, errno: int | None = None):
        super().__init__(message)
        self.errno = errno


class FirewallError(KernelError):
    """iptables/ip6tables/nft failed."""


class writing_output:
    """Around writing a command's output to STREAM (standard output by default), its final flush
    included: a stream that cannot take it (closed, a full disk, an encoding without a character) is
    a SupervisorError saying why (exit 1), not a traceback; a reader that went away stays
    BrokenPipeError (the programs exit 0). (A class, not contextlib: no import for a polled command.)"""

    def __init__(self, stream=None) -> None:
        self._given = stream

    def __enter__(self) -> None:
        self.stream = sys.stdout if self._given is None else self._given
        if self.stream is None:     # (Python's stand-in for a descriptor closed at start: `cmd >&-`)
            raise SupervisorError("cannot write the output: standard output is closed")

    def __exit__(self, kind, exc, tb) -> bool:
        if exc is None:
            try:
                self.stream.flush()     # what is still buffered fails here, not at the interpreter's exit
                return False
            except OSError as flushed:
                exc = flushed
                if isinstance(exc, BrokenPipeError):
                    raise
        if isinstance(exc, OSError) and not isinstance(exc, BrokenPipeError):
            raise SupervisorError(f"cannot write the output: {exc.strerror or exc}") from None
        if isinstance(exc, UnicodeEncodeError):
            char = exc.object[exc.start]
            raise SupervisorError(f"cannot write the output: standard output encodes {exc.encoding}, which "
                                  f"has no U+{ord(char):04X} {char!a} (PYTHONIOENCODING=utf-8 has)") from None
        return False


def flush_output(stream=None) -> None:
    """Flush STREAM (standard output by default) now, a failure worded as writing_output words it;
    a stream closed at the start has nothing to flush."""
    if (sys.stdout if stream is None else stream) is not None:
        with writing_output(stream):
            pass


_CONTROL = {c: f"\\x{c:02x}" for c in range(32) if c not in (9,)} | {127: "\\x7f"}


def printable(text: str) -> str:
    """TEXT with control characters escaped (\\x1b...): safe to print when it came from a file."""
    return text.translate(_CONTROL)
