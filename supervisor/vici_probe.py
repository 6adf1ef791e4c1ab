"""A VICI request (normally ``version``) driven by the event loop, never blocking it.

Encoding and decoding use the official ``vici`` package's protocol classes; only the I/O is
ours, so a hung daemon costs the loop nothing but a deadline.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Callable

from vici.protocol import Message, Packet

from .eventloop import Loop

_HEADER = struct.Struct("!I")
MAX_RESPONSE = 512 * 1024


class ViciProtocolError(Exception):
    """The peer answered something that is not a VICI command response."""


def encode_request(command: str, message: dict | None = None) -> bytes:
    """A framed VICI CMD_REQUEST (4-byte length, then the packet)."""
    payload = Packet.request(command, Message.serialize(message) if message else None)
    return _HEADER.pack(len(payload)) + payload


def split_frame(buf: bytes) -> tuple[bytes | None, bytes]:
    """(one complete packet or None, the rest of ``buf``)."""
    if len(buf) < _HEADER.size:
        return None, buf
    (length,) = _HEADER.unpack_from(buf)
    if length > MAX_RESPONSE:
        raise ViciProtocolError(f"response of {length} bytes is larger than {MAX_RESPONSE}")
    end = _HEADER.size + length
    if len(buf) < end:
        return None, buf
    return buf[_HEADER.size:end], buf[end:]


def _text(value):
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, list):
        return [_text(v) for v in value]
    if isinstance(value, dict):
        return {k: _text(v) for k, v in value.items()}
    return value


def parse_response(packet: bytes) -> dict:
    """The answer of a CMD_RESPONSE packet as a dict of strings; ViciProtocolError otherwise."""
    if not packet:
        raise ViciProtocolError("empty packet")
    try:
        parsed = Packet.parse(packet)
    except Exception as exc:  # the vici package raises struct.error and friends
        raise ViciProtocolError(f"undecodable packet: {exc}") from None
    if parsed.response_type == Packet.CMD_UNKNOWN:
        raise ViciProtocolError("the daemon does not know this command")
    if parsed.response_type != Packet.CMD_RESPONSE:
        raise ViciProtocolError(f"unexpected packet type {parsed.response_type}")
    try:
        return _text(dict(Message.deserialize(parsed.payload)))
    except Exception as exc:
        raise ViciProtocolError(f"undecodable response: {exc}") from None


@dataclass(frozen=True, slots=True)
class ProbeResult:
    ok: bool
    detail: str                      # "charon 5.9.8" or why it failed
    elapsed: float
    answer: dict = field(default_factory=dict)


class ViciProbe:
    """One request over a non-blocking Unix socket; ``on_done(ProbeResult)`` is called exactly once."""

    def __init__(self, loop: Loop, path: str, timeout: float, on_done: Callable[[ProbeResult], None],
                 command: str = "version"):
        self._loop = loop
        self._path = path
        self._timeout = timeout
        self._on_done = on_done
        self._request = encode_request(command)
        self._sock: socket.socket | None = None
        self._timer = None
        self._buf = b""
        self._started = 0.0
        self.done = False

    def start(self) -> None:
        self._started = self._loop.clock()
        self._timer = self._loop.call_later(self._timeout, self._on_timeout)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        self._sock = sock
        err = sock.connect_ex(self._path)
        if err in (0, errno.EINPROGRESS):
            self._loop.add_writer(sock.fileno(), self._send)
        elif err == errno.EAGAIN:
            # A full backlog means nobody accepts: that is what a hung daemon looks like.
            self._loop.call_soon(lambda: self._finish(False, "VICI socket backlog is full (not accepting)"))
        else:
            self._loop.call_soon(lambda: self._finish(
                False, f"cannot connect to {self._path}: {os.strerror(err)}"))

    def _send(self) -> None:
        assert self._sock is not None
        try:
            sent = self._sock.send(self._request)
        except BlockingIOError:
            return
        except OSError as exc:
            self._finish(False, f"cannot send to {self._path}: {exc.strerror or exc}")
            return
        self._request = self._request[sent:]
        if not self._request:
            self._loop.remove_writer(self._sock.fileno())
            self._loop.add_reader(self._sock.fileno(), self._receive)

    def _receive(self) -> None:
        assert self._sock is not None
        try:
            chunk = self._sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as exc:
            self._finish(False, f"cannot read from {self._path}: {exc.strerror or exc}")
            return
        if not chunk:
            self._finish(False, f"{self._path} closed the connection without answering")
            return
        self._buf += chunk
        try:
            packet, _ = split_frame(self._buf)
            if packet is None:
                return
            answer = parse_response(packet)
        except ViciProtocolError as exc:
            self._finish(False, f"bad answer on {self._path}: {exc}")
            return
        detail = " ".join(str(answer.get(k, "")) for k in ("daemon", "version")).strip() or "answered"
        self._finish(True, detail, answer)

    def _on_timeout(self) -> None:
        self._finish(False, f"no answer on {self._path} within {self._timeout:g}s")

    def cancel(self) -> None:
        """Stop without calling on_done (the result no longer matters)."""
        self._close()
        self.done = True

    def _close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._sock is not None:
            self._loop.forget(self._sock.fileno())
            self._sock.close()
            self._sock = None

    def _finish(self, ok: bool, detail: str, answer: dict | None = None) -> None:
        if self.done:
            return
        self.done = True
        self._close()
        self._on_done(ProbeResult(ok, detail, self._loop.clock() - self._started, answer or {}))


def vici_request(path: str, command: str = "version", timeout: float = 2.0) -> dict:
    """Blocking one-shot request (for tests, tools and benchmarks; not used by the loop)."""
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(encode_request(command))
        buf = b""
        while True:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            chunk = sock.recv(65536)
            if not chunk:
                raise ViciProtocolError(f"{path} closed the connection without answering")
            buf += chunk
            packet, _ = split_frame(buf)
            if packet is not None:
                return parse_response(packet)
