"""A VICI relay that paces the initiations charon starts itself while an adoption waits for it.

After a crash in adopt mode the start load (``swanctl --load-all``) would have charon queue the
initiation of every ``start_action = start`` child at once: hundreds of IKE_SAs side by side, with
updown scripts run under charon's bus lock, so the peer installs its new SAs (and drops the old
ones on INITIAL_CONTACT) long before this side does, and those tunnels drop packets meanwhile.
The relay changes nothing in what charon loads, only when: swanctl talks to a socket of ours, every
packet goes on to charon's socket unchanged, and a ``load-conn`` whose conn starts a child waits
while ``recovery.adopt_initiate_parallel`` conns let through earlier have no CHILD_SA up yet (a
place frees when charon reports one up, the IKE_SA down, or after ``adopt.INITIATE_WINDOW``).
The configuration is not rewritten (start_action stays): a child_cfg that differs would be
replaced by the next direct load and initiated a second time.

Whatever goes wrong here (charon's events unavailable, a packet we cannot parse, a bug) turns the
relay into a plain pass-through; the pacing also ends early enough for the load to finish within
``daemon.load_timeout``.

Threads: ``start()`` and ``close()`` run on the supervisor's event loop and never wait on charon
(start only connects and binds, neither of which blocks; close waits CLOSE_WAIT at most). Everything
that can wait on a peer happens in the relay's own thread, which alone closes its sockets: close()
only shuts them down (their fds stay valid, so no number the supervisor opens meanwhile is ever
written to by this thread).
"""

from __future__ import annotations

import logging
import os
import selectors
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from .config import SWANCTL_LOAD_ALL

log = logging.getLogger("supervisor")

SOCKET_NAME = "swanctl-load.vici"
WRITE_TIMEOUT = 60.0        # a peer that takes this long to read is hung; the load's time limit ends it anyway
CONNECT_TIMEOUT = 2.0       # also the whole event registration's: swanctl waits at most this long for it
GET_CONNS_TIMEOUT = 0.5     # at least this long for charon to list its conns, after the registrations
CLOSE_WAIT = 0.5            # close() waits this long for the thread to end (on the supervisor's loop thread)
# Pacing ends this share of daemon.load_timeout after the load began: the rest is let through at
# once, so swanctl still finishes within its time limit (and no conn is left unloaded).
BUDGET_SHARE = 0.8
EVENTS = ("child-updown", "ike-updown")


# --- deciding (pure) -----------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class PaceDecision:
    """Whether a load goes through the relay, and why (or why not)."""

    pace: bool
    why: str


def decide_pacing(trigger: str, commands: Sequence[Sequence[str]], *, adoption_coming: bool,
                  vici_socket: str | None, parallel: int) -> PaceDecision:
    """Pure: pace the load only for a start whose leftovers charon's adoption will claim, and only
    for the default swanctl command (a custom load_commands may talk to charon in ways we cannot see)."""
    if trigger != "start":
        return PaceDecision(False, f"a {trigger} load (only the load after a start is paced)")
    if tuple(map(tuple, commands)) != (SWANCTL_LOAD_ALL,):
        return PaceDecision(False, "not the default swanctl --load-all (daemon.load_commands or ipsec.conf)")
    if not adoption_coming:
        return PaceDecision(False, "no leftovers wait for adoption")
    if not vici_socket:
        return PaceDecision(False, "no daemon.vici_socket to relay to")
    return PaceDecision(True, f"an adoption waits for this charon: its start_action=start conns are let "
                              f"through {parallel} being established at a time (recovery.adopt_initiate_parallel)")


def paced_commands(uri_path: str) -> tuple[tuple[str, ...], ...]:
    """The default load, talking to the relay's socket instead of charon's."""
    return (SWANCTL_LOAD_ALL + ("--uri", f"unix://{uri_path}"),)


def pacing_budget(load_timeout: float) -> float:
    """Seconds after the load began during which the relay may hold requests."""
    return BUDGET_SHARE * load_timeout


def _value(v: Any) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, (bytes, bytearray)) else str(v)


def start_initiations(message: Mapping) -> tuple[str, ...]:
    """Pure: the conns of a ``load-conn`` message that charon initiates as it loads them (a child's
    start_action is ``start`` or includes it, as ``trap|start`` of strongSwan 6)."""
    out = []
    for conn, body in message.items():
        if not isinstance(body, Mapping):
            continue
        children = body.get("children")
        if not isinstance(children, Mapping):
            continue
        for child in children.values():
            if isinstance(child, Mapping) and "start" in _value(child.get("start_action", "")).split("|"):
                out.append(_value(conn))
                break
    return tuple(out)


def updown_conns(event: str, message: Mapping) -> tuple[str, ...]:
    """Pure: the conns whose place a ``child-updown`` (a CHILD_SA up) or ``ike-updown`` (an IKE_SA
    down) event frees; every other event frees none."""
    up = _value(message.get("up", "")) == "yes"
    if (event == "child-updown" and up) or (event == "ike-updown" and not up):
        return tuple(_value(k) for k, v in message.items() if isinstance(v, Mapping))
    return ()


class Pacer:
    """Which held request may go now: pure state, the clock is passed in."""

    def __init__(self, parallel: int, window: float, until: float):
        self.parallel = max(1, parallel)
        self.window = window
        self.until = until
        self.in_flight: dict[str, float] = {}       # conn -> when it was let through
        self.freed = {"up": 0, "down": 0, "window": 0}

    def _expire(self, now: float) -> None:
        for conn, at in list(self.in_flight.items()):
            if now - at >= self.window:
                del self.in_flight[conn]
                self.freed["window"] += 1

    def may_pass(self, now: float) -> bool:
        """True when a request with an initiation may go on to charon now."""
        self._expire(now)
        return now >= self.until or len(self.in_flight) < self.parallel

    def passed(self, conns: Sequence[str], now: float) -> None:
        for conn in conns:
            self.in_flight[conn] = now

    def settled(self, conns: Sequence[str], how: str) -> None:
        """CONNS got a CHILD_SA up ("up") or lost their IKE_SA ("down"): their places are free."""
        for conn in conns:
            if self.in_flight.pop(conn, None) is not None:
                self.freed[how] += 1

    def next_change(self, now: float) -> float:
        """When a place frees by the clock alone (or pacing ends)."""
        return min([self.until] + [at + self.window for at in self.in_flight.values()])


# --- the relay (its own thread) ------------------------------------------------------------

class _Pair:
    """One client connection (swanctl) and its connection to charon."""

    def __init__(self, client: socket.socket, upstream: socket.socket):
        self.client = client
        self.upstream = upstream
        self.inbuf = b""
        self.held_since: float | None = None     # a framed load-conn waits at the head of inbuf


class PacingRelay:
    """Listens on RUN_DIR/swanctl-load.vici and relays to charon's VICI socket; ``start()`` then ``close()``."""

    def __init__(self, run_dir: str, charon_socket: str, *, parallel: int, window: float, budget: float,
                 clock: Callable[[], float] = time.monotonic, name: str = SOCKET_NAME):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, name)
        self._name = name
        self.charon_socket = charon_socket
        self._clock = clock
        self.pacer = Pacer(parallel, window, clock() + budget)
        self.passthrough: str | None = None      # why the relay stopped pacing
        self._sel = selectors.DefaultSelector()
        self._listen: socket.socket | None = None
        self._events: socket.socket | None = None
        self._asking: socket.socket | None = None     # get-conns' connection, while it is asked
        self._event_buf = b""
        self._pairs: list[_Pair] = []
        self._wake_r, self._wake_w = socket.socketpair()
        self._stop = False
        self._bound = False
        self._thread: threading.Thread | None = None
        # Held while a socket is closed and while close() shuts sockets down or wakes the thread, so
        # that close() never touches an fd number the thread has already given back; and while the
        # thread makes get-conns' connection, so that close() either shuts it down or comes first
        # (tests/test_vici_relay.py forces each interleaving).
        self._lock = threading.Lock()
        self._ended = False         # every socket is closed (by the thread as it ended, or by start failing)
        self.stats = {"requests": 0, "initiations": 0, "held": 0, "longest_wait_s": 0.0, "already_loaded": 0}
        self.already: frozenset[str] = frozenset()   # the conns charon had as the relay began (get-conns)
        self.released: list[tuple[float, str]] = []     # (when, conn) each initiation went on to charon

    # -- life ----------------------------------------------------------------------------
    def start(self) -> str:
        """Connect to charon's socket and listen on ours (neither waits), start the thread; returns
        the socket path. Raises OSError or SupervisorError when either fails (the caller then loads
        without us). The thread registers for charon's events; if that fails it passes everything."""
        try:
            self._connect_events()
            self._bind()
            self._sel.register(self._wake_r, selectors.EVENT_READ, self._woken)
        except BaseException:
            self._close_all()
            raise
        self._thread = threading.Thread(target=self._run, name="vici-relay", daemon=True)
        self._thread.start()
        return self.path

    def close(self, wait: float = CLOSE_WAIT) -> dict:
        """Stop relaying (the load finished, or charon is gone): no new client can connect, every
        connection is shut down, the thread closes them as it ends; the report (see ``report``)."""
        self._stop = True
        if self._bound:
            try:
                os.unlink(self.path)
            except OSError:
                pass
        with self._lock:
            if not self._ended:
                # shutdown, not close: a read or write the thread is blocked in returns at once,
                # and the fd stays the thread's until it closes it
                pairs = [s for p in list(self._pairs) for s in (p.client, p.upstream)]
                for sock in [self._events, self._asking] + pairs:
                    if sock is not None and sock.fileno() != -1:
                        try:
                            sock.shutdown(socket.SHUT_RDWR)
                        except OSError:
                            pass
                try:
                    self._wake_w.send(b"x")
                except OSError:
                    pass
        if self._thread is None:
            self._close_all()
        else:
            self._thread.join(wait)
        return self.report()

    def report(self) -> dict:
        """What the pacing did; ``unfinished`` says why the counts may miss the thread's last steps."""
        out = {**self.stats, "freed": dict(self.pacer.freed), "passthrough": self.passthrough,
               "longest_wait_s": round(self.stats["longest_wait_s"], 3)}
        if self._stop and self._thread is not None and self._thread.is_alive():
            out["unfinished"] = (f"the relay thread had not ended {CLOSE_WAIT:g}s after the relay was closed; "
                                 "it closes its connections itself when it ends, and the counts are as of the close")
        return out

    def _connect_events(self) -> None:
        """Connect the event session without waiting: a socket that accepts no connection now fails."""
        self._events = self._connect()

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            sock.connect(self.charon_socket)
        except BlockingIOError:
            sock.close()
            raise OSError(f"{self.charon_socket} accepts no connection now (its backlog is full)") from None
        except BaseException:
            sock.close()
            raise
        return sock

    def _exchange(self, sock: socket.socket, packet: bytes, deadline: float, what: str
                  ) -> tuple[int, str, bytes]:
        """Send PACKET on SOCK and read charon's answer by DEADLINE: (kind, name, payload). An event
        coming first (charon runs already) is passed over: no place is taken before the load; on the
        event session what follows the answer stays for _read_events. close() shuts SOCK down, which
        ends the wait at once."""
        from vici.protocol import Packet

        from .vici_client import ViciError, packet_name, split_frames
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        sock.sendall(packet)
        buf = b""
        while True:
            packets, buf = split_frames(buf)
            for i, framed in enumerate(packets):
                kind, name, payload = packet_name(framed[4:])
                if kind != Packet.EVENT:
                    if sock is self._events:
                        self._event_buf = b"".join(packets[i + 1:]) + buf
                    return kind, name, payload
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            chunk = sock.recv(65536)
            if not chunk:
                raise ViciError(f"{self.charon_socket} closed the connection during {what}")
            buf += chunk

    def _register_events(self, deadline: float) -> None:
        """The thread, first: register for EVENTS by DEADLINE; else pass through."""
        from vici.protocol import Packet

        from .vici_client import ViciError, frame
        sock = self._events
        if sock is None:
            return
        event = EVENTS[0]
        try:
            for event in EVENTS:
                kind, _, _ = self._exchange(sock, frame(Packet.register_event(event)), deadline,
                                            f"the registration for {event} events")
                if kind != Packet.EVENT_CONFIRM:
                    raise ViciError(f"charon refused to send {event} events on {self.charon_socket} "
                                    f"(packet type {kind})")
        except socket.timeout:
            if self._stop:
                return
            self._degrade(f"charon did not confirm its {event} events on {self.charon_socket} within "
                          f"{CONNECT_TIMEOUT:g}s")
            return
        except (OSError, ViciError) as exc:
            if self._stop:
                return      # close() shut it down
            self._degrade(f"cannot register for charon's {event} events: {getattr(exc, 'strerror', None) or exc}")
            return
        sock.setblocking(False)
        self._sel.register(sock, selectors.EVENT_READ, self._read_events)

    def _learn_conns(self, deadline: float) -> None:
        """The conns charon has already (a re-attached supervisor loads again), asked on a connection
        of their own that close() can cut short. charon initiates a conn loaded again only if its
        configuration changed: an unchanged one takes no place. (A changed one is initiated without a
        place, and one still connecting from the killed supervisor's load holds none: both rare, at
        worst one initiation beside the paced ones.)"""
        from vici.protocol import Packet

        from .vici_client import decode_message, frame
        try:
            with self._lock:
                if self._stop:
                    return          # close() came first (and shut down what there was)
                self._asking = self._connect()
            kind, _, payload = self._exchange(self._asking, frame(Packet.request("get-conns")), deadline, "get-conns")
            conns = decode_message(payload).get("conns") if kind == Packet.CMD_RESPONSE else None
        except Exception as exc:    # noqa: BLE001 - OSError, ViciError, or what the vici package raises on garbage
            if not self._stop:
                log.info("VICI relay: cannot ask charon which conns it has (%s); every start conn takes a place",
                         getattr(exc, "strerror", None) or exc)
            return
        finally:
            asking, self._asking = self._asking, None
            if asking is not None:
                self._close_sock(asking)
        if isinstance(conns, list):
            self.already = frozenset(map(_value, conns))

    def _bind(self) -> None:
        from .trusted_paths import open_trusted_dir
        with open_trusted_dir(self.run_dir, what="paths.run_dir", tighten=True) as run:
            run.unlink(self._name)      # a stale one of ours: the run-dir lock proves no other supervisor uses it
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
            try:
                # through the checked directory's fd: a path swapped meanwhile cannot move it
                where = f"/proc/self/fd/{run.fd}/{self._name}"
                sock.bind(where if len(where) < 100 and os.path.isdir(f"/proc/self/fd/{run.fd}") else self.path)
                self._bound = True
                # chmod, not umask (process-wide: other threads create files meanwhile); the 0700
                # run directory keeps everyone else out before it anyway
                os.chmod(self._name, 0o600, dir_fd=run.fd)
            except BaseException:
                sock.close()
                if self._bound:
                    run.unlink(self._name)
                    self._bound = False
                raise
        sock.listen(8)
        self._listen = sock
        self._sel.register(sock, selectors.EVENT_READ, self._accept)

    def _close_sock(self, sock: socket.socket) -> None:
        """Close one of the thread's sockets (never while close() shuts it down)."""
        try:
            self._sel.unregister(sock)
        except (KeyError, ValueError):
            pass
        with self._lock:
            sock.close()

    def _close_all(self) -> None:
        """Close every socket (the thread as it ends, or start() failing before there is a thread)."""
        with self._lock:
            if self._ended:
                return
            for pair in self._pairs:
                pair.client.close()
                pair.upstream.close()
            self._pairs = []
            for sock in (self._listen, self._events, self._asking, self._wake_r, self._wake_w):
                if sock is not None:
                    sock.close()
            self._listen = self._events = self._asking = None
            self._sel.close()
            self._ended = True

    # -- the thread ----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            deadline = time.monotonic() + CONNECT_TIMEOUT
            if not self._stop:
                self._register_events(deadline)
            if not self._stop and self.passthrough is None:
                # its own short wait: a charon slow to list its conns costs their places, not the pacing
                self._learn_conns(time.monotonic() + max(GET_CONNS_TIMEOUT, deadline - time.monotonic()))
            self._serve()
        finally:
            self._close_all()

    def _serve(self) -> None:
        failures = 0
        while not self._stop:
            try:
                self._step()
                failures = 0
            except Exception:   # noqa: BLE001 - a bug here must not block the load
                failures += 1
                log.exception("the VICI relay of the start load failed (%d in a row)", failures)
                self._degrade("the relay failed (see the traceback)")
                if failures >= 3:
                    # not even plain forwarding works: swanctl sees charon close (the load fails, is
                    # logged, and charon keeps what it got; 'ipsec reload' loads it again)
                    for pair in list(self._pairs):
                        self._drop(pair)
                    return

    def _step(self) -> None:
        now = self._clock()
        timeout = None if self.passthrough else max(0.0, self.pacer.next_change(now) - now) + 0.001
        for key, _ in self._sel.select(timeout):
            if self._stop:
                return
            try:
                key.data(key.fileobj)
            except OSError as exc:
                self._drop_for(key.fileobj, exc)
        if not self._stop:      # close() shut the connections down meanwhile: nothing goes on
            self._release()

    def _woken(self, sock) -> None:
        sock.recv(64)

    def _accept(self, sock) -> None:
        try:
            client, _ = sock.accept()
        except BlockingIOError:
            return
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            upstream.settimeout(CONNECT_TIMEOUT)
            upstream.connect(self.charon_socket)
        except OSError as exc:
            # swanctl sees what it would have seen connecting to charon itself: a closed connection
            log.warning("VICI relay: cannot connect to %s: %s; closing swanctl's connection",
                        self.charon_socket, exc.strerror or exc)
            upstream.close()
            client.close()
            return
        for s in (client, upstream):
            s.settimeout(WRITE_TIMEOUT)    # reads happen only when select says readable
        pair = _Pair(client, upstream)
        self._pairs.append(pair)
        self._sel.register(client, selectors.EVENT_READ, lambda s, p=pair: self._from_client(p))
        self._sel.register(upstream, selectors.EVENT_READ, lambda s, p=pair: self._from_charon(p))

    def _drop(self, pair: _Pair) -> None:
        if pair in self._pairs:
            self._pairs.remove(pair)
        for s in (pair.client, pair.upstream):
            self._close_sock(s)

    def _drop_for(self, sock, exc: Exception) -> None:
        if self._stop:      # close() shut everything down: nothing failed
            for pair in list(self._pairs):
                if sock in (pair.client, pair.upstream):
                    self._drop(pair)
            return
        if sock is self._events:
            self._degrade(f"charon's event session failed: {exc}")
            return
        for pair in list(self._pairs):
            if sock in (pair.client, pair.upstream):
                log.warning("VICI relay: a connection failed (%s); closing it", exc)
                self._drop(pair)

    def _from_charon(self, pair: _Pair) -> None:
        data = pair.upstream.recv(65536)
        if not data:
            self._drop(pair)       # charon closed: swanctl sees it close too
            return
        pair.client.sendall(data)   # unchanged, as it came

    def _from_client(self, pair: _Pair) -> None:
        data = pair.client.recv(65536)
        if not data:
            # swanctl is gone (done, or killed at the load's time limit): what it still had held goes
            # nowhere, as a direct load killed there would have stopped there too
            self._drop(pair)
            return
        pair.inbuf += data
        self._forward(pair)

    def _forward(self, pair: _Pair) -> None:
        """Send the complete packets at the head of PAIR's buffer on to charon, until one must wait."""
        from .vici_client import ViciError, split_frames
        while pair.inbuf:
            try:
                packets, _ = split_frames(pair.inbuf)
            except ViciError as exc:
                self._degrade(str(exc))
                packets = []
            if self.passthrough:
                self._waited(pair)
                pair.upstream.sendall(pair.inbuf)
                pair.inbuf = b""
                return
            if not packets:
                return
            packet = packets[0]
            request, conns, already = self._inspect(packet)
            now = self._clock()
            if conns and not self.passthrough and not self.pacer.may_pass(now):
                if pair.held_since is None:
                    pair.held_since = now
                    self.stats["held"] += 1
                return
            self._waited(pair)
            pair.upstream.sendall(packet)       # counted below once it has gone on
            pair.inbuf = pair.inbuf[len(packet):]
            self.stats["requests"] += request
            self.stats["already_loaded"] += already
            if conns:
                self.pacer.passed(conns, now)
                self.stats["initiations"] += len(conns)
                self.released += [(now, c) for c in conns]

    def _waited(self, pair: _Pair) -> None:
        if pair.held_since is not None:
            self.stats["longest_wait_s"] = max(self.stats["longest_wait_s"], self._clock() - pair.held_since)
            pair.held_since = None

    def _inspect(self, packet: bytes) -> tuple[int, tuple[str, ...], int]:
        """PACKET: (1 if a request, else 0; the conns charon initiates as it loads it; how many more
        it had already). A held packet is inspected again at every try: counted once it goes."""
        if self.passthrough:
            return 0, (), 0
        from vici.protocol import Packet

        from .vici_client import decode_message, packet_name
        try:
            kind, name, payload = packet_name(packet[4:])
            if kind != Packet.CMD_REQUEST or name != "load-conn":
                return int(kind == Packet.CMD_REQUEST), (), 0
            conns = start_initiations(decode_message(payload))
        except Exception as exc:    # noqa: BLE001 - the vici package raises what it likes on garbage
            self._degrade(f"cannot parse a request swanctl sent: {exc}")
            return 0, (), 0
        new = tuple(c for c in conns if c not in self.already)
        return 1, new, len(conns) - len(new)

    def _read_events(self, sock) -> None:
        from vici.protocol import Packet

        from .vici_client import decode_message, packet_name, split_frames
        data = sock.recv(65536)
        if not data:
            self._degrade("charon closed the event session")
            return
        try:
            packets, self._event_buf = split_frames(self._event_buf + data)
            for packet in packets:
                kind, name, payload = packet_name(packet[4:])
                if kind == Packet.EVENT and name in EVENTS:
                    conns = updown_conns(name, decode_message(payload))
                    self.pacer.settled(conns, "up" if name == "child-updown" else "down")
        except Exception as exc:    # noqa: BLE001
            self._degrade(f"cannot parse charon's {EVENTS} events: {exc}")

    def _degrade(self, why: str) -> None:
        if self.passthrough is None and not self._stop:     # at close() the shut-down session is no failure
            self.passthrough = why
            log.warning("VICI relay: %s; letting everything through to charon unpaced from now on", why)
        if self._events is not None:
            events, self._events = self._events, None
            self._close_sock(events)

    def _release(self) -> None:
        """Held requests go on in the order they came as places free (or pacing ends)."""
        now = self._clock()
        if self.passthrough is None and now >= self.pacer.until:
            self.passthrough = "the pacing budget of the load's time limit is used up"
            log.warning("VICI relay: %s; the remaining conns go to charon at once", self.passthrough)
        for pair in sorted((p for p in self._pairs if p.held_since is not None), key=lambda p: p.held_since):
            try:
                self._forward(pair)
            except OSError as exc:      # charon or swanctl went away while it waited
                self._drop_for(pair.upstream, exc)
                continue
            if pair.held_since is not None and not self.passthrough:
                break   # still no place: the later ones wait behind it

    @property
    def commands(self) -> tuple[tuple[str, ...], ...]:
        return paced_commands(self.path)

    def close_and_log(self) -> dict:
        """``close()``, and one line saying what the pacing did."""
        r = self.close()
        freed = r["freed"]
        log.info("start load paced: %d initiation(s) let through at most %d at a time, %d waited (longest "
                 "%.1fs); places freed by a CHILD_SA up %d, an IKE_SA down %d, the %gs window %d%s%s%s",
                 r["initiations"], self.pacer.parallel, r["held"], r["longest_wait_s"], freed["up"],
                 freed["down"], self.pacer.window, freed["window"],
                 f"; {r['already_loaded']} start conn(s) charon had already, not paced" if r["already_loaded"] else "",
                 f"; unpaced since: {r['passthrough']}" if r["passthrough"] else "",
                 f"; {r['unfinished']}" if "unfinished" in r else "")
        return r


def relay_for_load(plan, cfg, *, adoption_coming: bool) -> PacingRelay | None:
    """A started relay for PLAN (a ``loads.LoadPlan``) when ``decide_pacing`` says so; None: load directly."""
    rc = cfg.recovery
    d = decide_pacing(plan.trigger, plan.commands, adoption_coming=adoption_coming,
                      vici_socket=cfg.daemon.vici_socket, parallel=rc.adopt_initiate_parallel)
    _remove_stale(cfg.paths.run_dir)
    if not d.pace:
        log.debug("start load not paced: %s", d.why)
        return None
    from . import adopt
    from .errors import SupervisorError
    relay = PacingRelay(cfg.paths.run_dir, cfg.daemon.vici_socket, parallel=rc.adopt_initiate_parallel,
                        window=adopt.INITIATE_WINDOW, budget=pacing_budget(cfg.daemon.load_timeout))
    try:
        relay.start()
    except (OSError, SupervisorError) as exc:
        log.warning("cannot pace the start load through %s (%s); loading directly: charon initiates every "
                    "start_action=start conn at once", relay.path, getattr(exc, "strerror", None) or exc)
        return None
    log.info("start load through the VICI relay %s: %s", relay.path, d.why)
    return relay


def _remove_stale(run_dir: str) -> None:
    """Remove the socket of a relay whose supervisor was killed during its paced load (the run-dir
    lock proves no other supervisor uses it; a paced load replaces it anyway as it binds)."""
    from .errors import SupervisorError
    from .trusted_paths import open_trusted_dir
    path = os.path.join(run_dir, SOCKET_NAME)
    try:
        with open_trusted_dir(run_dir, create=False, what="paths.run_dir") as run:
            removed = run.unlink(SOCKET_NAME)
    except FileNotFoundError:
        return      # no run directory yet: nothing left in it
    except (OSError, SupervisorError) as exc:
        log.warning("cannot remove the stale VICI relay socket %s: %s (nothing connects to it)", path,
                    getattr(exc, "strerror", None) or exc)
        return
    if removed:
        log.info("removed the VICI relay socket %s a killed supervisor left", path)
