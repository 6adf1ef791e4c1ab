"""charon's VICI socket, blocking, with a deadline on every read (recovery's worker and the commands).

The official ``vici`` package encodes and decodes; the I/O is ours, so a hung charon costs
a caller TIMEOUT at most and every failure is a ``ViciError`` that says which command and socket.
(The event loop's non-blocking ``version`` probe is ``vici_probe``.)
"""

from __future__ import annotations

import socket
import struct
import time
from typing import Mapping

from vici.protocol import FiniteStream, Message, Packet

from . import adopt
from .errors import SupervisorError

VICI_TIMEOUT = 5.0
MAX_PACKET = 16 << 20       # larger than any answer charon sends; a length beyond it is garbage


class ViciError(SupervisorError):
    """charon's VICI socket did not answer as expected."""


# --- framing (pure): 4-byte big-endian length, then the packet ------------------------------

def frame(packet: bytes) -> bytes:
    """PACKET with its length prefix, as it goes on the socket."""
    return struct.pack("!I", len(packet)) + packet


def split_frames(data: bytes) -> tuple[list[bytes], bytes]:
    """The complete framed packets at the start of DATA (each with its prefix) and the rest."""
    out, at = [], 0
    while len(data) - at >= 4:
        (length,) = struct.unpack_from("!I", data, at)
        if length > MAX_PACKET:
            raise ViciError(f"a {length}-byte VICI packet (more than {MAX_PACKET}): not a VICI stream")
        if len(data) - at - 4 < length:
            break
        out.append(data[at:at + 4 + length])
        at += 4 + length
    return out, data[at:]


def packet_name(packet: bytes) -> tuple[int, str | None, bytes]:
    """(type, name, message) of one packet without its prefix; the name is None for unnamed types."""
    if not packet:
        raise ViciError("an empty VICI packet")
    kind = packet[0]
    if kind in (Packet.CMD_REQUEST, Packet.EVENT_REGISTER, Packet.EVENT_UNREGISTER, Packet.EVENT):
        if len(packet) < 2 or len(packet) < 2 + packet[1]:
            raise ViciError(f"a truncated VICI packet of type {kind}")
        return kind, packet[2:2 + packet[1]].decode("utf-8", "replace"), packet[2 + packet[1]:]
    return kind, None, packet[1:]


def decode_message(payload: bytes) -> dict:
    """A packet's message as the vici package decodes it (keys text, values bytes)."""
    return Message.deserialize(FiniteStream(payload))


def vici_command(path: str, command: str, message: Mapping | None = None, *, stream: str | None = None,
                 timeout: float = VICI_TIMEOUT) -> tuple[dict, list[dict]]:
    """One VICI command (with its streamed events when STREAM names them): (answer, events).

    Every read has the overall deadline, so a hung charon costs TIMEOUT at most. The answer
    is decoded to text; events stay raw (the parsers in supervisor.adopt decode them).
    """
    deadline = time.monotonic() + timeout

    def recv_exact(sock: socket.socket, n: int) -> bytes:
        data = b""
        while len(data) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ViciError(f"no answer to {command} on {path} within {timeout:g}s")
            sock.settimeout(left)
            try:
                chunk = sock.recv(n - len(data))
            except socket.timeout:
                raise ViciError(f"no answer to {command} on {path} within {timeout:g}s") from None
            if not chunk:
                raise ViciError(f"{path} closed the connection during {command}")
            data += chunk
        return data

    def recv(sock: socket.socket):
        (length,) = struct.unpack("!I", recv_exact(sock, 4))
        if length > MAX_PACKET:
            raise ViciError(f"{path} sent a {length}-byte packet during {command}")
        return Packet.parse(recv_exact(sock, length))

    def send(sock: socket.socket, packet: bytes) -> None:
        sock.sendall(frame(packet))

    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            sock.connect(path)
            if stream:
                send(sock, Packet.register_event(stream))
                reply = recv(sock)
                if reply.response_type != Packet.EVENT_CONFIRM:
                    raise ViciError(f"charon refused to stream {stream} events on {path}")
            payload = Message.serialize(dict(message)) if message else None
            send(sock, Packet.request(command, payload))
            events: list[dict] = []
            while True:
                reply = recv(sock)
                if reply.response_type == Packet.EVENT:
                    events.append(Message.deserialize(reply.payload))
                    continue
                if reply.response_type == Packet.CMD_UNKNOWN:
                    raise ViciError(f"charon does not know the VICI command {command} ({path})")
                if reply.response_type != Packet.CMD_RESPONSE:
                    raise ViciError(f"unexpected VICI packet type {reply.response_type} for {command}")
                answer = adopt._text(dict(Message.deserialize(reply.payload)))
                break
            if stream:
                send(sock, Packet.unregister_event(stream))
    except OSError as exc:
        raise ViciError(f"cannot talk to charon on {path} ({command}): {exc.strerror or exc}") from None
    except ViciError:
        raise
    except Exception as exc:     # the vici package raises struct.error and friends on garbage
        raise ViciError(f"undecodable VICI answer to {command} on {path}: {exc}") from None
    return answer, events


def list_conns(path: str, timeout: float = VICI_TIMEOUT) -> tuple[adopt.ConfiguredChild, ...]:
    _, events = vici_command(path, "list-conns", stream="list-conn", timeout=timeout)
    return adopt.parse_list_conns(events)


def list_sas(path: str, timeout: float = VICI_TIMEOUT) -> tuple[adopt.ActiveIke, ...]:
    _, events = vici_command(path, "list-sas", stream="list-sa", timeout=timeout)
    return adopt.parse_list_sas(events)


def initiate_child(path: str, conn: str, child: str, timeout: float = VICI_TIMEOUT) -> str:
    """Ask charon to establish CHILD of CONN without waiting for it (VICI timeout -1)."""
    answer, _ = vici_command(path, "initiate", {"child": child, "ike": conn, "timeout": "-1",
                                                "init-limits": "no"}, timeout=timeout)
    if answer.get("success") != "yes":
        raise ViciError(f"charon refused to initiate {conn}/{child}: {answer.get('errmsg') or 'no reason given'}")
    return "charon is establishing it"
