"""The pacing VICI relay of an adoption's start load: the decision (pure), and the relay against a fake charon."""

from __future__ import annotations

import os
import socket
import sys
import threading
import time

import pytest
from vici.protocol import Message, Packet

from supervisor.config import SWANCTL_LOAD_ALL
from supervisor.vici_client import decode_message, frame, packet_name, split_frames
from supervisor.vici_relay import (CLOSE_WAIT, CONNECT_TIMEOUT, Pacer, PacingRelay, decide_pacing, paced_commands,
                                   pacing_budget, start_initiations, updown_conns)

# --- the decision --------------------------------------------------------------------------

DEFAULT = (SWANCTL_LOAD_ALL,)


@pytest.mark.parametrize("trigger, commands, coming, vici, pace", [
    ("start", DEFAULT, True, "/run/charon.vici", True),
    ("start", DEFAULT, False, "/run/charon.vici", False),           # nothing to adopt
    ("reload", DEFAULT, True, "/run/charon.vici", False),          # only the load after a start
    ("start", (("/usr/sbin/swanctl", "--load-all", "--file", "x"),), True, "/run/charon.vici", False),  # custom
    ("start", DEFAULT + (("/bin/true",),), True, "/run/charon.vici", False),
    ("start", DEFAULT, True, None, False),                          # no socket to relay to
])
def test_only_the_default_start_load_of_an_adoption_is_paced(trigger, commands, coming, vici, pace):
    d = decide_pacing(trigger, commands, adoption_coming=coming, vici_socket=vici, parallel=4)
    assert d.pace is pace and d.why


def test_the_paced_load_is_the_default_command_pointed_at_the_relay():
    assert paced_commands("/run/ipsec-supervisor/swanctl-load.vici") == (
        SWANCTL_LOAD_ALL + ("--uri", "unix:///run/ipsec-supervisor/swanctl-load.vici"),)
    assert pacing_budget(30.0) == pytest.approx(24.0)


def test_a_conn_counts_as_one_initiation_when_a_child_starts():
    msg = {"a": {"children": {"x": {"start_action": b"start"}, "y": {"start_action": b"start"}}},
           "b": {"children": {"x": {"start_action": b"trap"}}},
           "c": {"children": {"x": {"start_action": b"trap|start"}}},
           "d": {"children": {"x": {}}},
           "e": {"version": b"2"}}
    assert start_initiations(msg) == ("a", "c")
    assert start_initiations({}) == ()


def test_a_place_frees_on_a_child_up_or_an_ike_down_only():
    assert updown_conns("child-updown", {"up": b"yes", "c1": {"uniqueid": b"1"}}) == ("c1",)
    assert updown_conns("child-updown", {"c1": {"uniqueid": b"1"}}) == ()      # a child went down
    assert updown_conns("ike-updown", {"c2": {"uniqueid": b"2"}}) == ("c2",)   # gave up
    assert updown_conns("ike-updown", {"up": b"yes", "c2": {}}) == ()           # IKE up, no CHILD_SA yet


def test_the_pacer_holds_while_parallel_are_in_flight_and_frees_by_event_or_window():
    p = Pacer(parallel=2, window=10.0, until=100.0)
    assert p.may_pass(0.0)
    p.passed(["a"], 0.0)
    p.passed(["b"], 1.0)
    assert not p.may_pass(2.0)
    p.settled(["a"], "up")
    assert p.may_pass(2.0)
    p.passed(["c"], 2.0)
    assert not p.may_pass(10.5)
    assert p.next_change(10.5) == 11.0
    assert p.may_pass(11.0)           # b's window is over
    p.settled(["zzz"], "down")        # not one of ours: nothing
    assert p.freed == {"up": 1, "down": 0, "window": 1}
    p.passed(["d"], 11.0)
    assert not p.may_pass(11.5)        # c and d in flight
    assert p.may_pass(100.0)          # pacing ends: everything passes


# --- the relay against a fake charon ------------------------------------------------------

class FakeCharon:
    """A VICI server: answers every request, confirms event registrations, emits events on demand.
    EVENTS "refuse": registrations are refused, "silent": never answered; ANSWER False: no request is.
    CONNS: what get-conns answers (the relay asks it on its event session; counted in ``asked_conns``,
    not in ``requests``); CONNS_GATE: get-conns is answered only once this event is set."""

    def __init__(self, path: str, *, events: str = "confirm", answer: bool = True, conns: tuple[str, ...] = (),
                 conns_after: float = 0.0, chatty: bool = False, conns_gate: threading.Event | None = None):
        self.path = path
        self.conns = list(conns)
        self.conns_after = conns_after      # get-conns answered this late
        self.conns_gate = conns_gate
        self.chatty = chatty                # an event follows each confirmation at once (charon is busy)
        self.asked_conns = 0
        self.confirm = events == "confirm"
        self.silent = events == "silent"
        self.answer = answer
        self.requests: list[tuple[float, str, bytes]] = []     # (when, name, framed packet as received)
        self.raw = b""
        self.event_conns: list[socket.socket] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(8)
        self.threads: list[threading.Thread] = []
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        while True:
            try:
                data = conn.recv(65536)
            except OSError:
                return
            if not data:
                return
            buf += data
            packets, buf = split_frames(buf)
            for p in packets:
                kind, name, _ = packet_name(p[4:])
                if kind == Packet.EVENT_REGISTER:
                    if self.silent:
                        continue
                    if self.confirm:
                        self.event_conns.append(conn)
                    reply = frame(bytes([Packet.EVENT_CONFIRM if self.confirm else Packet.EVENT_UNKNOWN]))
                    if self.chatty and self.confirm:
                        # an event of the registration before, ahead of this one's confirmation, and half
                        # of one more after it
                        event = frame(bytes([Packet.EVENT, len(b"child-updown")]) + b"child-updown"
                                      + Message.serialize({"up": "yes", "x": {"uniqueid": "9"}}))
                        reply = event + reply + event[:7]
                        self.chatty_rest = event[7:]
                    conn.sendall(reply)
                elif kind == Packet.CMD_REQUEST and name == "get-conns":
                    self.asked_conns += 1
                    if self.answer:
                        time.sleep(self.conns_after)
                        if self.conns_gate is not None:
                            self.conns_gate.wait(10)
                        try:
                            conn.sendall(frame(bytes([Packet.CMD_RESPONSE]) + Message.serialize({"conns": self.conns})))
                        except OSError:
                            return
                elif kind == Packet.CMD_REQUEST:
                    self.raw += p
                    self.requests.append((time.monotonic(), name, p))
                    if not self.answer:
                        continue
                    # a big answer, to see it pass unchanged
                    try:
                        conn.sendall(frame(bytes([Packet.CMD_RESPONSE]) + Message.serialize(
                            {"success": "yes", "echo": name, "pad": ["x" * 60000, "y" * 60000]})))
                    except OSError:     # the relay shut the connection down
                        return

    def event(self, name: str, message: dict) -> None:
        body = bytes([Packet.EVENT, len(name)]) + name.encode() + Message.serialize(message)
        for c in self.event_conns[:1]:
            c.sendall(getattr(self, "chatty_rest", b"") + frame(body))     # (the half event's rest first)
            self.chatty_rest = b""

    def drop_events(self) -> None:
        for c in self.event_conns:
            c.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.sock.close()


def load_conn(name: str, start: str = "start") -> bytes:
    return frame(Packet.request("load-conn", Message.serialize(
        {name: {"remote_addrs": ["192.0.2.2"], "children": {"net": {"start_action": start}}}})))


class Client:
    """swanctl's side: sends one request and reads its answer (synchronously, as swanctl does)."""

    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.buf = b""

    def call(self, packet: bytes, chunk: int = 0) -> bytes:
        if chunk:
            for i in range(0, len(packet), chunk):
                self.sock.sendall(packet[i:i + chunk])
                time.sleep(0.001)
        else:
            self.sock.sendall(packet)
        while True:
            packets, self.buf = split_frames(self.buf)
            if packets:
                return packets[0]
            data = self.sock.recv(65536)
            assert data, "the relay closed the connection"
            self.buf += data


@pytest.fixture
def fake(tmp_path):
    made = []

    def make(**kw):
        run = tmp_path / "run"
        run.mkdir(mode=0o700, exist_ok=True)
        f = FakeCharon(str(tmp_path / "charon.vici"), **kw)
        made.append(f)
        return f, str(run)
    yield make
    for f in made:
        f.close()


def start_relay(charon, run, **kw) -> PacingRelay:
    kw = {"parallel": 1, "window": 10.0, "budget": 30.0, **kw}
    relay = PacingRelay(run, charon.path, **kw)
    relay.start()
    return relay


def test_every_packet_reaches_charon_unchanged_and_the_answers_come_back_unchanged(fake):
    charon, run = fake()
    relay = start_relay(charon, run, parallel=5)
    try:
        assert oct(os.stat(relay.path).st_mode & 0o777) == "0o600"
        c = Client(relay.path)
        sent = [frame(Packet.request("version")), load_conn("a", "trap"),
                frame(Packet.request("load-shared", Message.serialize({"data": b"\0\xff" * 5000}))),
                load_conn("b")]
        answers = [c.call(p, chunk=7 if i == 2 else 0) for i, p in enumerate(sent)]
        assert charon.raw == b"".join(sent)
        for a, (_, name, _) in zip(answers, charon.requests):
            kind, _, payload = packet_name(a[4:])
            assert kind == Packet.CMD_RESPONSE and decode_message(payload)["echo"] == \
                name.encode()
    finally:
        report = relay.close()
    assert not os.path.exists(relay.path)
    assert report["initiations"] == 1 and report["held"] == 0 and report["passthrough"] is None


def _b_after_a(relay, settle: float):
    """Load start conn "a", then start loading "b" from a thread and give the relay SETTLE seconds:
    (the client, b's answers so far, the thread)."""
    c = Client(relay.path)
    c.call(load_conn("a"))
    got: list[bytes] = []
    t = threading.Thread(target=lambda: got.append(c.call(load_conn("b"))))
    t.start()
    time.sleep(settle)
    return c, got, t


def test_a_start_conn_waits_until_the_one_before_it_has_its_child_up(fake):
    charon, run = fake()
    relay = start_relay(charon, run, parallel=1)
    try:
        c, got, t = _b_after_a(relay, 0.5)
        assert [n for _, n, _ in charon.requests] == ["load-conn"] and not got   # b is held: swanctl waits
        c2 = Client(relay.path)         # anything else passes meanwhile
        c2.call(frame(Packet.request("get-conns")))
        charon.event("child-updown", {"up": "yes", "a": {"uniqueid": "1"}})
        t.join(5)
        assert got
    finally:
        report = relay.close()
    assert report["held"] == 1 and report["freed"]["up"] == 1 and 0.4 < report["longest_wait_s"] < 3


def test_a_start_conn_charon_has_already_takes_no_place(fake):
    # a supervisor re-attached to charon loads again: charon initiates nothing for an unchanged conn
    charon, run = fake(conns=("a",))
    relay = start_relay(charon, run, parallel=1, window=60.0)
    try:
        c = Client(relay.path)
        c.call(load_conn("a"))
        c.call(load_conn("b"))          # the one place is b's, at once
        got: list[bytes] = []
        t = threading.Thread(target=lambda: got.append(c.call(load_conn("c"))))
        t.start()
        time.sleep(0.3)
        assert not got
        charon.event("child-updown", {"up": "yes", "b": {"uniqueid": "1"}})
        t.join(5)
        assert got
    finally:
        report = relay.close()
    assert (report["already_loaded"], report["initiations"], report["held"]) == (1, 2, 1)
    assert charon.asked_conns == 1 and [c for _, c in relay.released] == ["b", "c"]


def test_a_conn_that_never_comes_up_holds_its_place_for_the_window_only(fake):
    charon, run = fake()
    relay = start_relay(charon, run, parallel=2, window=0.4)
    try:
        c = Client(relay.path)
        began = time.monotonic()
        for i in range(6):
            c.call(load_conn(f"c{i}"))
        took = time.monotonic() - began
    finally:
        report = relay.close()
    times = [t - began for t, _ in relay.released]
    assert [c for _, c in relay.released] == [f"c{i}" for i in range(6)]
    # windows of two: 0, 0.4, 0.8 s
    assert times[1] < 0.2 and 0.35 < times[2] < 0.7 and 0.75 < times[4] < 1.3 and took < 2
    assert report["freed"]["window"] >= 4 and report["held"] >= 2


def test_pacing_ends_when_its_share_of_the_load_time_limit_is_used(fake):
    charon, run = fake()
    relay = start_relay(charon, run, parallel=1, window=60.0, budget=0.3)
    try:
        c = Client(relay.path)
        began = time.monotonic()
        for i in range(4):
            c.call(load_conn(f"c{i}"))
        assert time.monotonic() - began < 1.5
    finally:
        report = relay.close()
    assert "budget" in report["passthrough"]


def test_a_charon_that_refuses_its_events_gets_the_load_unpaced(fake):
    charon, run = fake(events="refuse")
    relay = start_relay(charon, run, parallel=1, window=60.0)
    try:
        c = Client(relay.path)
        for name in ("a", "b", "c"):
            c.call(load_conn(name))         # none held: there is no event to free a place
    finally:
        report = relay.close()
    assert "refused" in report["passthrough"] and report["held"] == 0
    assert charon.raw == load_conn("a") + load_conn("b") + load_conn("c")


@pytest.mark.parametrize("answer", [True, False], ids=["answers-requests", "answers-nothing"])
def test_a_charon_that_never_answers_its_event_registration_does_not_hold_up_start(fake, answer):
    charon, run = fake(events="silent", answer=answer)
    relay = PacingRelay(run, charon.path, parallel=1, window=60.0, budget=30.0)
    began = time.monotonic()
    relay.start()
    took = time.monotonic() - began
    try:
        assert took < 1.5, took         # on the supervisor's loop thread (was up to 3 x CONNECT_TIMEOUT)
        c = Client(relay.path)
        if answer:
            for name in ("a", "b"):
                c.call(load_conn(name))
            assert time.monotonic() - began < CONNECT_TIMEOUT + 1.5
        else:
            c.sock.sendall(load_conn("a"))
            deadline = time.monotonic() + CONNECT_TIMEOUT + 3
            while charon.raw != load_conn("a") and time.monotonic() < deadline:
                time.sleep(0.02)
        assert charon.raw == (load_conn("a") + load_conn("b") if answer else load_conn("a"))
    finally:
        report = relay.close(wait=5)    # (the short wait is not the point here)
    assert "did not confirm" in report["passthrough"] and "unfinished" not in report


def _closed_on(monkeypatch) -> dict[int, str]:
    """Record, for every socket closed from now on, the thread that closed it (by the socket's id)."""
    closed: dict[int, str] = {}
    real = socket.socket.close

    def close(sock):
        closed.setdefault(id(sock), threading.current_thread().name)
        real(sock)
    monkeypatch.setattr(socket.socket, "close", close)
    return closed


def _relay_sockets(relay) -> dict[int, str]:
    socks = {"listen": relay._listen, "events": relay._events, "wake_r": relay._wake_r, "wake_w": relay._wake_w}
    for i, p in enumerate(relay._pairs):
        socks.update({f"client{i}": p.client, f"upstream{i}": p.upstream})
    return {id(s): name for name, s in socks.items() if s is not None}


def _in(relay, function: str, timeout: float = 5.0) -> bool:
    """True once the relay's thread is inside FUNCTION (e.g. blocked in a C call it made)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        frame_ = sys._current_frames().get(relay._thread.ident)
        while frame_ is not None:
            if frame_.f_code.co_name == function:
                return True
            frame_ = frame_.f_back
        time.sleep(0.01)
    return False


def _block_writing(relay, client: Client) -> None:
    """The relay's thread blocked writing to CLIENT: 40 answers of 120 kB that it never reads."""
    for _ in range(40):
        client.sock.sendall(frame(Packet.request("version")))
    assert _in(relay, "_from_charon"), "the relay never blocked writing to the client"


def test_close_while_the_thread_is_blocked_writing_returns_at_once_and_only_the_thread_closes_sockets(
        fake, monkeypatch):
    charon, run = fake()
    relay = start_relay(charon, run)
    closed = _closed_on(monkeypatch)
    c = Client(relay.path)
    try:
        _block_writing(relay, c)
        ours = _relay_sockets(relay)
        began = time.monotonic()
        relay.close()
        took = time.monotonic() - began
    finally:
        relay.close()
        relay._thread.join(5)
        c.sock.close()
    # (whether it ended within close()'s short wait is up to the scheduler of a loaded machine)
    assert took < CLOSE_WAIT + 0.5 and not relay._thread.is_alive()
    assert not os.path.exists(relay.path)
    by = {ours[i]: t for i, t in closed.items() if i in ours}
    assert set(by) == set(ours.values()) and set(by.values()) == {"vici-relay"}, by


def test_a_thread_that_has_not_ended_at_close_keeps_its_sockets_and_the_report_says_so(fake, monkeypatch):
    charon, run = fake()
    stuck, gate = threading.Event(), threading.Event()

    def clock() -> float:
        if stuck.is_set() and threading.current_thread().name == "vici-relay":
            gate.wait(10)
        return time.monotonic()
    relay = start_relay(charon, run, clock=clock)
    try:
        closed = _closed_on(monkeypatch)
        stuck.set()
        c = Client(relay.path)          # the thread wakes to accept it and is held in the clock
        assert _in(relay, "clock")
        ours = _relay_sockets(relay)
        began = time.monotonic()
        report = relay.close()
        assert time.monotonic() - began < CLOSE_WAIT + 0.5
        assert "had not ended" in report["unfinished"] and not os.path.exists(relay.path)
        assert not set(closed) & set(ours)          # nothing of the thread's closed under it
    finally:
        gate.set()
    relay._thread.join(5)
    assert not relay._thread.is_alive() and set(ours) <= set(closed)
    assert {closed[i] for i in ours} == {"vici-relay"}
    c.sock.close()


def test_a_close_while_an_event_frees_a_place_lets_nothing_more_through(fake, caplog):
    """close() comes after charon's event freed the held conn's place, before the release: nothing
    more goes on to charon, no failure is logged, and the report counts what went."""
    charon, run = fake()
    relay = PacingRelay(run, charon.path, parallel=1, window=60.0, budget=30.0)
    real = relay._read_events

    def read_events(sock):      # the event is read; the thread goes on only once close() came
        real(sock)
        until = time.monotonic() + 5
        while not relay._stop and time.monotonic() < until:
            time.sleep(0.01)
    relay._read_events = read_events
    relay.start()
    c = Client(relay.path)
    answers: list = []
    t = threading.Thread(target=lambda: answers.append(_call_or_closed(c, load_conn("b"))))
    try:
        with caplog.at_level("WARNING", logger="supervisor"):
            c.call(load_conn("a"))
            t.start()
            deadline = time.monotonic() + 5
            while relay.stats["held"] != 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            charon.event("child-updown", {"up": "yes", "a": {"uniqueid": "1"}})
            assert _in(relay, "read_events")
            report = relay.close(wait=5)
    finally:
        relay.close(wait=5)
        t.join(5)
        c.sock.close()
    assert answers == ["closed"] and [n for _, n, _ in charon.requests] == ["load-conn"]
    assert report["initiations"] == 1 and [n for _, n in relay.released] == ["a"] and report["held"] == 1
    assert "failed" not in caplog.text and "unfinished" not in report


def _call_or_closed(client: Client, packet: bytes):
    try:
        return client.call(packet)
    except (AssertionError, OSError):
        return "closed"


def test_close_during_the_get_conns_charon_never_answers_ends_the_thread_at_once(fake, monkeypatch):
    import supervisor.vici_relay as vici_relay
    monkeypatch.setattr(vici_relay, "CONNECT_TIMEOUT", 30.0)    # (a wait only close() can cut short)
    charon, run = fake(answer=False)
    relay = start_relay(charon, run)
    try:
        deadline = time.monotonic() + 5
        while charon.asked_conns != 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert charon.asked_conns == 1
        report = relay.close(wait=5)
    finally:
        relay.close(wait=5)
    assert not relay._thread.is_alive() and "unfinished" not in report and report["passthrough"] is None


# --- the lock between close() and the relay's thread: forced interleavings -------------------
# close() (the supervisor's loop thread) shuts the thread's sockets down; only the thread closes
# them. Each test below stops one side at the point where the other may run, and lets it run: with
# the lock the other side waits, without it (or with the lock taken in the wrong place) the
# interleaving the lock exists for happens, and the test says which.

class WatchedLock:
    """The relay's own lock, unchanged, telling the test which threads had to wait for it."""

    def __init__(self, inner):
        self.inner = inner
        self.waited: list[str] = []

    def __enter__(self):
        acquire = getattr(self.inner, "acquire", None)
        if acquire is None:         # not a lock at all (e.g. contextlib.nullcontext): nobody waits
            return self.inner.__enter__()
        if not acquire(blocking=False):
            self.waited.append(threading.current_thread().name)
            acquire()
        return self

    def __exit__(self, *exc):
        if getattr(self.inner, "release", None) is None:
            return self.inner.__exit__(*exc)
        self.inner.release()
        return False


def _until(condition, what: str, timeout: float = 10.0) -> None:
    """Wait for CONDITION (a safety limit only: the outcome never depends on how long it takes)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.001)


def _watched_relay(charon, run, **kw) -> tuple[PacingRelay, WatchedLock]:
    relay = PacingRelay(run, charon.path, **{"parallel": 1, "window": 10.0, "budget": 30.0, **kw})
    lock = relay._lock = WatchedLock(relay._lock)
    return relay, lock


def _pause_close_at(monkeypatch, relay, lock: WatchedLock, target: socket.socket, trigger) -> list[str]:
    """close() pauses as it shuts TARGET down (after its own check that TARGET is open; the real
    shutdown(2) runs without the GIL, so the thread may run there): TRIGGER makes the relay's thread
    want to close TARGET, and close() goes on once the thread has closed it or waits for the lock.
    Returns what close() shut down although the thread had closed it (by then the fd number may be a
    socket or file the supervisor opened meanwhile)."""
    closer, late, paused = threading.current_thread(), [], []
    real = socket.socket.shutdown

    def shutdown(sock, how):
        if sock is target and threading.current_thread() is closer and not paused:
            paused.append(True)
            trigger()
            _until(lambda: sock.fileno() == -1 or "vici-relay" in lock.waited or not relay._thread.is_alive(),
                   "the relay's thread neither closed the socket nor waited for the lock")
        if sock.fileno() == -1:
            late.append("the shut-down socket" if sock is target else repr(sock))
        return real(sock, how)
    monkeypatch.setattr(socket.socket, "shutdown", shutdown)
    return late


def _closed_once_by_the_thread(relay, closed: dict[int, str], ours: dict[int, str]) -> None:
    relay._thread.join(5)
    assert not relay._thread.is_alive()
    assert set(ours) <= set(closed) and {closed[i] for i in ours} == {"vici-relay"}, closed


def test_a_close_while_the_thread_ends_never_shuts_down_a_socket_it_closed(fake, monkeypatch):
    """swanctl leaves as close() shuts the event session down: the thread wakes, ends and closes
    everything (_close_all) only after close() is done with the sockets."""
    charon, run = fake()
    relay, lock = _watched_relay(charon, run)
    relay.start()
    c = Client(relay.path)
    c.call(frame(Packet.request("version")))        # a connection pair, the thread serving
    ours = _relay_sockets(relay)
    closed = _closed_on(monkeypatch)
    late = _pause_close_at(monkeypatch, relay, lock, relay._events, trigger=c.sock.close)
    try:
        relay.close(wait=5)
    finally:
        relay.close(wait=5)
    assert late == [], "close() shut down a socket the relay's thread had closed (its fd number may be reused by then)"
    assert "vici-relay" in lock.waited
    _closed_once_by_the_thread(relay, closed, ours)


def test_a_close_as_charon_answers_get_conns_never_shuts_down_the_connection_the_thread_closed(fake, monkeypatch):
    """charon answers get-conns just as close() shuts that connection down: the thread closes it
    (_close_sock) only after close() is done with it."""
    answer = threading.Event()
    charon, run = fake(conns=("a",), conns_gate=answer)
    relay, lock = _watched_relay(charon, run)
    relay.start()
    try:
        _until(lambda: charon.asked_conns == 1, "the relay never asked charon for its conns")
        asking = relay._asking
        assert asking is not None
        ours = {**_relay_sockets(relay), id(asking): "asking"}
        closed = _closed_on(monkeypatch)
        late = _pause_close_at(monkeypatch, relay, lock, asking, trigger=answer.set)
        relay.close(wait=5)
    finally:
        answer.set()
        relay.close(wait=5)
    assert late == [], "close() shut down a socket the relay's thread had closed (its fd number may be reused by then)"
    assert "vici-relay" in lock.waited
    _closed_once_by_the_thread(relay, closed, ours)


def test_a_close_while_swanctl_leaves_a_blocked_write_never_shuts_down_the_socket_the_thread_closed(
        fake, monkeypatch):
    """The thread is blocked writing charon's answers to swanctl; swanctl goes away (killed at the
    load's time limit) as close() shuts that connection down: the thread drops the pair only after."""
    charon, run = fake()
    relay, lock = _watched_relay(charon, run)
    relay.start()
    c = Client(relay.path)
    try:
        _block_writing(relay, c)
        ours = _relay_sockets(relay)
        closed = _closed_on(monkeypatch)
        late = _pause_close_at(monkeypatch, relay, lock, relay._pairs[0].client, trigger=c.sock.close)
        relay.close(wait=5)
    finally:
        relay.close(wait=5)
        c.sock.close()
    assert late == [], "close() shut down a socket the relay's thread had closed (its fd number may be reused by then)"
    assert "vici-relay" in lock.waited
    _closed_once_by_the_thread(relay, closed, ours)


def test_a_close_while_the_thread_connects_for_get_conns_shuts_that_connection_down(fake, monkeypatch):
    """close() comes after the thread checked for it and before get-conns' connection is there:
    close() waits for the connection and shuts it down, so the thread does not wait for charon."""
    import supervisor.vici_relay as vici_relay
    monkeypatch.setattr(vici_relay, "CONNECT_TIMEOUT", 30.0)    # (a wait only close() can cut short)
    charon, run = fake(answer=False)
    relay, lock = _watched_relay(charon, run)
    closer = threading.Thread(target=lambda: relay.close(wait=0), name="closer")
    connect = relay._connect

    def connecting() -> socket.socket:
        if threading.current_thread().name == "vici-relay":      # (start() connects the events on ours)
            closer.start()
            _until(lambda: "closer" in lock.waited or not closer.is_alive(),
                   "close() neither waited for the lock nor finished")
        return connect()
    relay._connect = connecting
    relay.start()
    try:
        _until(lambda: closer.ident is not None, "the thread never connected for get-conns")
        closer.join(5)
        relay._thread.join(5)
        waiting_for_charon = relay._thread.is_alive()
    finally:
        asking = relay._asking
        if asking is not None and asking.fileno() != -1:
            asking.shutdown(socket.SHUT_RDWR)       # (without the lock: ends the thread's 30 s wait)
        relay._thread.join(5)
    assert not waiting_for_charon, \
        "get-conns' connection was made after close() and never shut down: the thread waits for charon"
    assert "closer" in lock.waited


def test_a_charon_slow_to_list_its_conns_costs_their_places_not_the_pacing(fake):
    charon, run = fake(conns=("a",), conns_after=CONNECT_TIMEOUT + 0.5)
    relay = start_relay(charon, run, parallel=1, window=60.0)
    try:
        c, got, t = _b_after_a(relay, 0.5)      # a takes the place (charon's list came too late)
        assert not got
        charon.event("child-updown", {"up": "yes", "a": {"uniqueid": "1"}})
        t.join(5)
        assert got
    finally:
        report = relay.close(wait=5)
    assert report["passthrough"] is None and charon.asked_conns == 1
    assert (report["already_loaded"], report["initiations"], report["held"]) == (0, 2, 1)


def test_events_charon_sends_while_the_relay_registers_are_passed_over(fake):
    charon, run = fake(chatty=True)
    relay = start_relay(charon, run, parallel=1)
    try:
        c, got, t = _b_after_a(relay, 0.5)
        assert not got                  # the early event freed nothing: nothing had a place then
        charon.event("child-updown", {"up": "yes", "a": {"uniqueid": "1"}})
        t.join(5)
        assert got
    finally:
        report = relay.close(wait=5)
    assert report["passthrough"] is None and report["held"] == 1 and report["freed"]["up"] == 1


def test_losing_charons_events_lets_everything_through(fake):
    charon, run = fake()
    relay = start_relay(charon, run, parallel=1, window=60.0)
    try:
        c, got, t = _b_after_a(relay, 0.3)
        assert not got
        charon.drop_events()
        t.join(5)
        assert got
        c.call(load_conn("c"))
    finally:
        report = relay.close()
    assert "event session" in report["passthrough"]


def test_a_request_it_cannot_parse_goes_on_unchanged_and_pacing_stops(fake):
    charon, run = fake()
    relay = start_relay(charon, run, parallel=1, window=60.0)
    try:
        c = Client(relay.path)
        c.call(load_conn("a"))
        bad = frame(bytes([Packet.CMD_REQUEST, 9]) + b"load-conn" + b"\x01\xff")   # a section name past the end
        c.call(bad)
        c.call(load_conn("b"))      # not held: the relay passes everything now
        assert charon.raw == load_conn("a") + bad + load_conn("b")
    finally:
        report = relay.close()
    assert "cannot parse" in report["passthrough"]


# --- the seam in ConfigLoads ---------------------------------------------------------------

class FakeRelay:
    def __init__(self, marker: str):
        self.commands = (("/bin/sh", "-c", f"echo {marker}"),)
        self.closed = 0

    def close_and_log(self) -> dict:
        self.closed += 1
        return {"initiations": 0}


def run_load(loads, loop, trigger="start"):
    done = []
    if trigger == "start":
        loads.initial(done.append)
    else:
        loads.request(trigger, "test", done.append)
    deadline = time.monotonic() + 10
    while not done and time.monotonic() < deadline:
        loop.run_once()
    return done[0]


def test_the_start_load_runs_the_relays_commands_and_closes_it_when_done(tmp_path, caplog):
    from supervisor.config import parse_config
    from supervisor.eventloop import Loop
    from supervisor.loads import ConfigLoads
    cfg = parse_config(f"daemon: {{config: swanctl}}\npaths: {{run_dir: {tmp_path}/run, state_dir: {tmp_path}/s}}")
    loop = Loop()
    relays: list = []

    def start_relay(plan):
        assert plan.trigger == "start" and plan.commands == (SWANCTL_LOAD_ALL,)
        relays.append(FakeRelay("through-the-relay"))
        return relays[-1]
    loads = ConfigLoads(loop, config=lambda: cfg, env=lambda: dict(os.environ), daemon_name=lambda: "charon",
                        changed=lambda: None, wall_clock=time.time, start_relay=start_relay)
    loads.begin_run(os.getpid())
    with caplog.at_level("INFO"):
        outcome = run_load(loads, loop)
    assert outcome.ok and relays[0].closed == 1 and outcome.to_json()["paced"] == {"initiations": 0}
    assert "through-the-relay" in caplog.text
    loop.close()


def test_a_failing_relay_set_up_loads_directly(tmp_path, caplog):
    from supervisor.config import parse_config
    from supervisor.eventloop import Loop
    from supervisor.loads import ConfigLoads
    # a custom load stands in for swanctl (the relay would have replaced it)
    cfg = parse_config(f"daemon: {{load_commands: [[/bin/sh, -c, echo directly]]}}\n"
                       f"paths: {{run_dir: {tmp_path}/run, state_dir: {tmp_path}/s}}")
    loop = Loop()

    def start_relay(plan):
        raise RuntimeError("boom")
    loads = ConfigLoads(loop, config=lambda: cfg, env=lambda: dict(os.environ), daemon_name=lambda: "charon",
                        changed=lambda: None, wall_clock=time.time, start_relay=start_relay)
    loads.begin_run(os.getpid())
    with caplog.at_level("INFO"):
        outcome = run_load(loads, loop)
    assert outcome.ok and "directly" in caplog.text and "loading directly" in caplog.text
    loop.close()


def test_no_relay_when_charon_cannot_be_reached_the_load_goes_direct(tmp_path, caplog):
    from supervisor.config import parse_config
    from supervisor.loads import LoadPlan
    from supervisor.vici_relay import relay_for_load
    cfg = parse_config(f"daemon: {{config: swanctl, vici_socket: {tmp_path}/nobody.vici}}\n"
                       f"paths: {{run_dir: {tmp_path}/run, state_dir: {tmp_path}/s}}")
    plan = LoadPlan("start", "swanctl", None, (SWANCTL_LOAD_ALL,), "test")
    assert relay_for_load(plan, cfg, adoption_coming=False) is None
    with caplog.at_level("WARNING"):
        assert relay_for_load(plan, cfg, adoption_coming=True) is None
    assert "loading directly" in caplog.text
    assert not os.path.exists(f"{tmp_path}/run/swanctl-load.vici")


def test_a_start_load_removes_the_relay_socket_a_killed_supervisor_left(tmp_path, caplog):
    from supervisor.config import parse_config
    from supervisor.loads import LoadPlan
    from supervisor.vici_relay import SOCKET_NAME, relay_for_load
    cfg = parse_config(f"daemon: {{config: swanctl, vici_socket: {tmp_path}/nobody.vici}}\n"
                       f"paths: {{run_dir: {tmp_path}/run, state_dir: {tmp_path}/s}}")
    plan = LoadPlan("start", "swanctl", None, (SWANCTL_LOAD_ALL,), "test")
    assert relay_for_load(plan, cfg, adoption_coming=False) is None      # no run directory yet: quietly nothing
    os.mkdir(f"{tmp_path}/run", 0o700)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(f"{tmp_path}/run/{SOCKET_NAME}")
    stale.close()                   # its supervisor was killed: the file stays, nobody listens
    with caplog.at_level("INFO", logger="supervisor"):
        assert relay_for_load(plan, cfg, adoption_coming=False) is None     # not paced, and still removed
    assert not os.path.exists(f"{tmp_path}/run/{SOCKET_NAME}") and "a killed supervisor left" in caplog.text
    assert "cannot remove" not in caplog.text
