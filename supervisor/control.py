"""Root-only control socket under the run directory: one JSON request line, one JSON answer line.

Requests: ``{"command": "status" | "stop" | "start" | "restart" | "reload" | "reload-daemon"}``.
Answers: ``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``.  The socket is 0600 in a
0700 directory and every peer's uid is checked (SO_PEERCRED) as well.
"""

from __future__ import annotations

import errno
import json
import os

from .errors import ExitCode, NotRootError, SupervisorError

# `typing` and the event loop are for type checkers only: the client side (ipsec status) needs neither.
# Nor the socket module: its wrapper class pulls in selectors and array, 3 ms of every polled `ipsec
# status`; `request` uses the C module under it, the server (in the supervisor) the socket module.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import socket
    from typing import Callable

    from .eventloop import Loop


def __getattr__(name: str):
    """LOCK_NAME, lock_run_dir and unlock_run_dir, re-exported from runlock on first use (the client needs neither)."""
    if name in ("LOCK_NAME", "lock_run_dir", "unlock_run_dir"):
        from . import runlock
        return getattr(runlock, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


SOCKET_NAME = "control.sock"
MAX_REQUEST = 64 * 1024
CLIENT_TIMEOUT = 5.0
COMMANDS = ("status", "stop", "start", "restart", "reload", "reload-daemon")


def socket_path(run_dir: str) -> str:
    return os.path.join(run_dir, SOCKET_NAME)


def prepare_run_dir(run_dir: str) -> None:
    """Create the run directory as root-only (0700), or check and tighten an existing one."""
    from .trusted_paths import open_trusted_dir
    open_trusted_dir(run_dir, what="paths.run_dir", tighten=True).close()


class Deferred:
    """An answer that comes later: a handler returns it and calls ``answer`` once, within ``timeout``."""

    def __init__(self, timeout: float):
        self.timeout = timeout
        self._client: "_Client | None" = None
        self._answer: dict | None = None

    def answer(self, answer: dict) -> None:
        if self._client is not None:
            self._client.answer(answer)
            self._client = None
        else:
            self._answer = answer       # answered before the client was bound

    def _bind(self, client: "_Client") -> None:
        if self._answer is not None:
            client.answer(self._answer)
        else:
            self._client = client
            client.wait(self.timeout)


def peer_uid(sock: socket.socket) -> int:
    import socket
    import struct
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


class ControlServer:
    """Accepts clients in the loop; ``handler(request) -> answer`` runs in the loop thread."""

    def __init__(self, loop: Loop, run_dir: str, handler: Callable[[dict], dict]):
        self._loop = loop
        self.run_dir = run_dir
        self.path = socket_path(run_dir)
        self._handler = handler
        self._sock: socket.socket | None = None
        self._clients: dict[int, _Client] = {}

    def start(self) -> None:
        from .trusted_paths import open_trusted_dir
        with open_trusted_dir(self.run_dir, what="paths.run_dir", tighten=True) as run:
            run.unlink(SOCKET_NAME)     # stale: the run-dir lock proves nobody else serves it
            import socket
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
            old = os.umask(0o177)
            try:
                # Bound through the checked directory's fd: a path swapped meanwhile cannot move it.
                where = f"/proc/self/fd/{run.fd}/{SOCKET_NAME}"
                sock.bind(where if len(where) < 100 and os.path.isdir(f"/proc/self/fd/{run.fd}") else self.path)
            except BaseException:
                sock.close()
                raise
            finally:
                os.umask(old)
        sock.listen(16)
        self._sock = sock
        self._loop.add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        assert self._sock is not None
        while True:
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            conn.setblocking(False)
            client = _Client(self, conn)
            self._clients[conn.fileno()] = client
            if peer_uid(conn) not in (0, os.geteuid()):
                client.answer({"ok": False, "error": "permission denied: the control socket is for root only"})
                continue
            self._loop.add_reader(conn.fileno(), client.readable)

    def _dispatch(self, client: "_Client", line: bytes) -> None:
        try:
            request = json.loads(line)
            if not isinstance(request, dict) or not isinstance(request.get("command"), str):
                raise ValueError("a request is a JSON object with a 'command' string")
            if request["command"] not in COMMANDS:
                raise ValueError(f"unknown command {request['command']!r} (known: {', '.join(COMMANDS)})")
            answer = self._handler(request)
        except ValueError as exc:
            answer = {"ok": False, "error": str(exc)}
        except RecursionError:
            answer = {"ok": False, "error": "a request is a flat JSON object: this one is nested too deeply"}
        except Exception as exc:  # a bug in a handler must not kill the supervisor
            answer = {"ok": False, "error": f"internal error: {exc!r}"}
        if isinstance(answer, Deferred):
            answer._bind(client)
        else:
            client.answer(answer)

    def _drop(self, client: "_Client") -> None:
        self._clients.pop(client.fd, None)

    def relisten(self) -> None:
        """Bind the socket again (its file was removed with the run directory); clients stay connected."""
        if self._sock is not None:
            self._loop.forget(self._sock.fileno())
            self._sock.close()
            self._sock = None
        self.start()

    def close(self) -> None:
        for client in list(self._clients.values()):
            if client.out and client.conn is not None:
                client.writable()   # an answer that is ready (e.g. to a 'stop' that ends us at once) still goes
            client.close()
        if self._sock is not None:
            self._loop.forget(self._sock.fileno())
            self._sock.close()
            self._sock = None
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


class _Client:
    def __init__(self, server: ControlServer, conn: socket.socket):
        self.server = server
        self.conn = conn
        self.fd = conn.fileno()
        self.buf = b""
        self.out = b""
        self.timer = server._loop.call_later(CLIENT_TIMEOUT, self.close)

    def readable(self) -> None:
        try:
            chunk = self.conn.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            self.close()
            return
        if not chunk:
            self.close()
            return
        self.buf += chunk
        if b"\n" in self.buf:
            line = self.buf.split(b"\n", 1)[0]
            self.server._loop.remove_reader(self.fd)
            self.server._dispatch(self, line)
        elif len(self.buf) > MAX_REQUEST:
            self.answer({"ok": False, "error": f"request longer than {MAX_REQUEST} bytes"})

    def wait(self, timeout: float) -> None:
        """The answer comes later: keep the connection open up to TIMEOUT."""
        self.timer.cancel()
        self.timer = self.server._loop.call_later(timeout, self.close)

    def answer(self, answer: dict) -> None:
        if self.conn is None:
            return          # the client gave up (or timed out) meanwhile
        self.out = (json.dumps(answer, sort_keys=False) + "\n").encode()
        self.server._loop.forget(self.fd)
        self.server._loop.add_writer(self.fd, self.writable)

    def writable(self) -> None:
        try:
            sent = self.conn.send(self.out)
        except BlockingIOError:
            return
        except OSError:
            self.close()
            return
        self.out = self.out[sent:]
        if not self.out:
            self.close()

    def close(self) -> None:
        if self.conn is None:
            return
        self.timer.cancel()
        self.server._loop.forget(self.fd)
        self.server._drop(self)
        self.conn.close()
        self.conn = None  # type: ignore[assignment]


def request(run_dir: str, command: str, timeout: float = CLIENT_TIMEOUT, **args) -> dict:
    """Send one command to the running supervisor; SupervisorError (exit 7) if none runs."""
    import _socket
    path = socket_path(run_dir)
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise SupervisorError(f"ipsec-supervisor is not running (nothing listens on {path})",
                                  ExitCode.NOT_RUNNING) from None
        except PermissionError:
            raise NotRootError(f"cannot connect to {path}: permission denied (the control socket is root-only; "
                               f"run as root)") from None
        except OSError as exc:
            if exc.errno == errno.ENOTDIR:
                raise SupervisorError(f"ipsec-supervisor is not running ({path} is not a socket)",
                                      ExitCode.NOT_RUNNING) from None
            raise SupervisorError(f"cannot connect to {path}: {exc.strerror or exc}") from None
        buf = b""
        try:
            sock.sendall((json.dumps({"command": command, **args}) + "\n").encode())
            while b"\n" not in buf:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                buf += chunk
        except TimeoutError:        # socket.timeout
            raise SupervisorError(f"ipsec-supervisor did not answer on {path} within {timeout:g}s "
                                  f"(it may be busy or hung)") from None
        except (ConnectionResetError, BrokenPipeError):
            # The supervisor exited while answering (e.g. it was stopping): it is gone now.
            raise SupervisorError(f"ipsec-supervisor closed {path} without answering '{command}' "
                                  f"(it is exiting or has exited)", ExitCode.NOT_RUNNING) from None
    finally:
        sock.close()
    try:
        answer = json.loads(buf.split(b"\n", 1)[0])
    except ValueError:
        raise SupervisorError(f"ipsec-supervisor sent an unreadable answer on {path}") from None
    if answer.get("error", "").startswith("permission denied"):
        raise NotRootError(f"{command}: {answer['error']}")
    return answer
