"""charon's view for the metrics, read over VICI at scrape time: never from the event loop.

One scrape asks list-sas, list-conns and list-policies (trap) under one deadline; a charon that
does not answer in time gives a view with ``up`` False (the scrape itself still succeeds). The
last view is reused for ``metrics.vici_cache``, and concurrent scrapes share one read.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping


@dataclass(frozen=True, slots=True)
class ChildSample:
    """One CHILD_SA as list-sas reports it (counters since it was installed)."""

    conn: str
    child: str
    state: str
    local_ts: str
    remote_ts: str
    reqid: str
    bytes_in: int
    bytes_out: int
    packets_in: int
    packets_out: int


@dataclass(frozen=True, slots=True)
class CharonView:
    """What charon said over VICI at ``read_at`` (monotonic), or why it said nothing."""

    up: bool
    error: str | None
    took: float
    read_at: float
    conns: tuple[str, ...] = ()
    ikes: tuple[tuple[str, str], ...] = ()      # (connection, IKE_SA state)
    children: tuple[ChildSample, ...] = ()
    trap_policies: int = 0


def _text(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, list):
        return [_text(v) for v in value]
    if isinstance(value, Mapping):
        return {(k.decode() if isinstance(k, bytes) else k): _text(v) for k, v in value.items()}
    return value


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def parse_sas(events: Iterable[Mapping]) -> tuple[tuple[tuple[str, str], ...], tuple[ChildSample, ...]]:
    """list-sa events -> ((connection, IKE state) per IKE_SA, one ChildSample per CHILD_SA)."""
    ikes, children = [], []
    for event in events:
        for conn, ike in _text(dict(event)).items():
            if not isinstance(ike, dict):
                continue
            ikes.append((conn, str(ike.get("state", "UNKNOWN"))))
            for child in (ike.get("child-sas") or {}).values():
                if not isinstance(child, dict):
                    continue
                children.append(ChildSample(
                    conn=conn, child=str(child.get("name", "")), state=str(child.get("state", "UNKNOWN")),
                    local_ts=",".join(child.get("local-ts") or ()), remote_ts=",".join(child.get("remote-ts") or ()),
                    reqid=str(child.get("reqid", "")),
                    bytes_in=_int(child.get("bytes-in")), bytes_out=_int(child.get("bytes-out")),
                    packets_in=_int(child.get("packets-in")), packets_out=_int(child.get("packets-out"))))
    return tuple(ikes), tuple(children)


def parse_conns(events: Iterable[Mapping]) -> tuple[str, ...]:
    """list-conn events -> the names of the loaded connections."""
    names: list[str] = []
    for event in events:
        names.extend(k.decode() if isinstance(k, bytes) else str(k) for k in event.keys())
    return tuple(dict.fromkeys(names))


def read_view(path: str, timeout: float, clock: Callable[[], float] = time.monotonic) -> CharonView:
    """Ask charon on PATH for its view, all within TIMEOUT; never raises (``up`` False says why)."""
    from ..vici_client import ViciError, vici_command
    start = clock()
    deadline = start + timeout

    def ask(command: str, stream: str, message: dict | None = None) -> list:
        left = deadline - clock()
        if left <= 0:
            raise ViciError(f"no time left for {command} (metrics.vici_timeout {timeout:g}s)")
        return vici_command(path, command, message, stream=stream, timeout=left)[1]

    try:
        ikes, children = parse_sas(ask("list-sas", "list-sa", {"noblock": "yes"}))
        conns = parse_conns(ask("list-conns", "list-conn"))
        traps = len(ask("list-policies", "list-policy", {"trap": "yes"}))
    except ViciError as exc:
        return CharonView(False, str(exc), clock() - start, clock())
    return CharonView(True, None, clock() - start, clock(), conns, ikes, children, traps)


class CharonReader:
    """``read()``: the cached view if it is fresh enough, else one new read shared by all callers."""

    def __init__(self, path: str | None, timeout: float, cache: float,
                 clock: Callable[[], float] = time.monotonic, reader: Callable[..., CharonView] = read_view):
        self.path = path
        self.timeout = timeout
        self.cache = cache
        self._clock = clock
        self._reader = reader
        self._lock = threading.Lock()
        self._view: CharonView | None = None

    def read(self, running: bool = True) -> CharonView:
        """charon's view; RUNNING False (the supervisor says no charon runs) asks nothing."""
        if not self.path:
            return CharonView(False, "no VICI socket configured (daemon.vici_socket)", 0.0, self._clock())
        if not running:
            return CharonView(False, "charon is not running", 0.0, self._clock())
        # A scrape waiting behind another read waits at most one timeout, then gets that read's view.
        if not self._lock.acquire(timeout=self.timeout + 1.0):
            return self._view or CharonView(False, "another scrape is still reading charon's view", 0.0, self._clock())
        try:
            view = self._view
            if view is None or self._clock() - view.read_at >= self.cache:
                view = self._view = self._reader(self.path, self.timeout, self._clock)
            return view
        finally:
            self._lock.release()
