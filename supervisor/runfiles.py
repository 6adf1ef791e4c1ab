"""The daemon's files in /run that outlive it, and the starter's pid file, kept as strongSwan's starter does.

The starter writes its own pid to PIDDIR/starter.<daemon>.pid (scripts test it to see whether
IPsec runs; strongSwan's ``ipsec`` sends SIGHUP, SIGUSR1 and SIGTERM to it, which mean the same
to ipsec-supervisor), removes charon.pid whenever charon dies and charon.ctl before each start.
charon leaves charon.ctl and charon.vici behind even after a clean stop: a stale socket or pid
file makes ``ipsec`` and scripts take a dead charon for a running one.  Nothing here removes a
file a live process still uses: a pid file only when its process is gone (or is another
program), a socket only when nobody listens on it.
"""

from __future__ import annotations

import logging
import os
import socket
import stat

from .atomicfile import write_atomic

log = logging.getLogger("supervisor")


def starter_pid_path(daemon_pid_file: str | None) -> str | None:
    """PIDDIR/starter.NAME.pid next to the daemon's pid file (/var/run/starter.charon.pid); None without one."""
    if not daemon_pid_file:
        return None
    directory, base = os.path.split(daemon_pid_file)
    return os.path.join(directory, f"starter.{base}")


def stroke_socket_path(daemon_pid_file: str | None) -> str | None:
    """charon's stroke socket NAME.ctl next to its pid file (/var/run/charon.ctl); None without a pid file."""
    if not daemon_pid_file:
        return None
    directory, base = os.path.split(daemon_pid_file)
    return os.path.join(directory, (base[:-4] if base.endswith(".pid") else base) + ".ctl")


def read_pid(path: str) -> int | None:
    try:
        with open(path, encoding="ascii", errors="replace") as fh:
            pid = int(fh.read(64).strip() or "x")
    except (OSError, ValueError):
        return None
    return pid if pid > 0 else None


def _comm(pid: int) -> str | None:
    """The process's name; None when it does not exist (or is a zombie)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as fh:
            text = fh.read()
    except OSError:
        return None
    name, _, rest = text.partition(" (")[2].rpartition(") ")
    return None if rest.startswith("Z") else name


def pid_file_in_use(path: str, name: str) -> bool:
    """True if PATH names a live process called NAME (what a pid file is for); False if stale or absent."""
    pid = read_pid(path)
    return pid is not None and _comm(pid) == name[:15]


def socket_listened(path: str) -> bool | None:
    """True if someone listens on the unix socket PATH, False if nobody does (stale), None if no socket is there."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return None
    except OSError:
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(0.5)
    try:
        sock.connect(path)
        return True
    except ConnectionRefusedError:
        return False
    except OSError:
        return True         # a full backlog, another socket type, no permission: not provably stale
    finally:
        sock.close()


def _unlink(path: str, why: str) -> str | None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("cannot remove %s (%s): %s; it stays", path, why, exc.strerror or exc)
        return None
    return f"{path} ({why})"


def remove_stale_daemon_files(pid_file: str | None, vici_socket: str | None, name: str) -> list[str]:
    """After the daemon is gone: remove its stale pid file and sockets; returns what was removed.

    A pid file naming a live NAME means another daemon owns these files: then nothing is touched.
    """
    if pid_file and pid_file_in_use(pid_file, name):
        return []
    removed = []
    if pid_file and os.path.lexists(pid_file):
        removed.append(_unlink(pid_file, f"pid {read_pid(pid_file)} is not a running {name}"))
    for path in dict.fromkeys(p for p in (stroke_socket_path(pid_file), vici_socket) if p):
        if socket_listened(path) is False:
            removed.append(_unlink(path, "nobody listens on it"))
    return [r for r in removed if r]


def claim_starter_pid(path: str | None, pid: int) -> str | None:
    """Write PID to the starter's pid file PATH; returns PATH if written (None: no path, or it failed)."""
    if not path:
        return None
    other = read_pid(path)
    if other is not None and other != pid and _comm(other) is not None:
        log.warning("%s names pid %d (%s), which still runs; replacing it with ours (%d)", path, other,
                    _comm(other), pid)
    try:
        write_atomic(path, f"{pid}\n", mode=0o644, prefix=".starter-", durable=False)
    except OSError as exc:
        log.warning("cannot write %s: %s; scripts that look for strongSwan's starter will not find us",
                    path, exc.strerror or exc)
        return None
    return path


def release_starter_pid(path: str | None, pid: int) -> None:
    """Remove the starter's pid file if it still names PID."""
    if path and read_pid(path) == pid:
        _unlink(path, "the supervisor exits")
