"""The metrics observer: counts the supervisor's events, serves /metrics, writes the textfile.

Threads: the Supervisor calls the observer's hooks in its loop thread (they only count, and
schedule one status snapshot for the textfile after a burst of changes: never blocking, nothing
on the restart path); KernelRecovery calls ``recovered``/``overrun`` from its
own threads; the HTTP listener answers scrapes in threads of its own and reads charon over VICI
there; the textfile is written by one writer thread. Collectors read only immutable snapshots:
a scrape asks the loop for a fresh one (bounded wait), and falls back to the last one.
"""

from __future__ import annotations

import logging
import os
import selectors
import socketserver
import threading
import time
from typing import Any, Callable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (CollectorRegistry, Counter, Histogram, ProcessCollector, disable_created_metrics,
                               generate_latest, make_wsgi_app)

from ..atomicfile import write_atomic
from ..config import Config
from ..policy import Action, ExitClass
from ..states import State
from .charon import CharonReader
from .families import LEFTOVER_FAMILIES, P, Snapshot, charon_families, disk_families, supervisor_families

log = logging.getLogger("supervisor.metrics")

# *_created series double every counter for little use; they would also churn in the textfile.
disable_created_metrics()

SNAPSHOT_WAIT = 0.5          # a scrape waits this long for the loop's fresh snapshot
TEXTFILE_DELAY = 0.1         # changes within this time make one textfile write
RECOVERY_ACTIONS = ("flush", "adopt", "keep")
RECOVERY_OUTCOMES = ("ok", "failed", "error")
MONITORS = ("xfrm", "rtnl", "read-error")
FAST = (.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1.0, 2.5)
SLOW = (.01, .025, .05, .1, .25, .5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


def recovery_outcome(section: dict) -> tuple[str, str]:
    """(action, outcome) of one recovery run from its crash-report section."""
    action = section.get("action", "none")
    if section.get("error"):
        return action, "error"
    return action, "failed" if (section.get("results") or {}).get("failed") else "ok"


class _Forward:
    """A collector that yields another registry's metrics (one set of counters, two outputs)."""

    def __init__(self, registry: CollectorRegistry):
        self._registry = registry

    def collect(self):
        yield from self._registry.collect()


class _SnapshotCollector:
    def __init__(self, observer: "MetricsObserver"):
        self._observer = observer

    def collect(self):
        o = self._observer
        snap = o.snapshot(fresh=o.scraping.get())
        yield from supervisor_families(snap, o.clock())
        yield from disk_families(o.config.crash_dir, o.config.snapshot_dir)


class _CharonCollector:
    def __init__(self, observer: "MetricsObserver"):
        self._observer = observer

    def collect(self):
        o = self._observer
        state = o.snapshot().status.get("state")
        view = o.charon.read(running=state in ("loading", "settling", "running"))
        yield from charon_families(view, o.config.metrics.max_children)


class _Flag(threading.local):
    """Per thread: is this collect() a scrape (fresh snapshot wanted) or the textfile writer?"""

    value = False

    def get(self) -> bool:
        return self.value


class MetricsObserver:
    """Observer of a Supervisor (see starter.Supervisor._observe) and of KernelRecovery."""

    def __init__(self, config: Config, *, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time):
        self.config = config
        self.clock = clock
        self._wall = wall
        self._lock = threading.Lock()
        self._sup: Any = None
        self._loop = None
        self._wakeup = None
        self._write_pending = False
        self._snap = Snapshot({"state": State.STOPPED.value}, clock(), wall())
        self._last_leftovers: dict[str, int] | None = None
        self._last_rules: dict[str, int] = {}
        self._death_seen_at: float | None = None
        self.scraping = _Flag()
        m = config.metrics
        self.charon = CharonReader(config.daemon.vici_socket, m.vici_timeout, m.vici_cache)
        self.core = CollectorRegistry(auto_describe=False)
        r = self.core
        self.exits = Counter(P + "charon_exits", "Exits of charon by classification (crash reports have the "
                             "details)", ["classification"], registry=r)
        self.restarts = Counter(P + "restarts", "Restarts of charon the restart policy decided, by the "
                                "classification of the exit that caused them", ["classification"], registry=r)
        for c in ExitClass:
            self.exits.labels(c.value)
            self.restarts.labels(c.value)
        self.death_to_ready = Histogram(P + "death_to_ready_seconds", "Seconds from charon's death being seen to "
                                        "the restarted charon being ready (configuration loaded)", buckets=SLOW,
                                        registry=r)
        self.detection = Histogram(P + "death_detection_seconds", "Seconds from charon's exit waking the "
                                   "supervisor (pidfd) to the exit being classified and the restart decided",
                                   buckets=FAST, registry=r)
        self.probe_seconds = Histogram(P + "health_probe_duration_seconds", "Seconds a VICI health probe took "
                                       "(failed ones: until the failure or health.timeout)", buckets=FAST, registry=r)
        self.probe_failures = Counter(P + "health_probe_failures", "Health probes that failed (no answer in "
                                      "health.timeout, refused, garbage)", registry=r)
        self.reloads = Counter(P + "config_reloads", "Re-readings of supervisor.yaml (SIGHUP, ipsec update) by "
                               "result", ["result"], registry=r)
        for result in ("success", "failure"):
            self.reloads.labels(result)
        self.recoveries = Counter(P + "recoveries", "Recovery runs (after an abnormal exit, or that found "
                                  "leftovers) by the action taken and their outcome (ok; failed: some action "
                                  "failed; error: the kernel state could not be read)",
                                  ["action", "outcome"], registry=r)
        for action in RECOVERY_ACTIONS:
            for outcome in RECOVERY_OUTCOMES:
                self.recoveries.labels(action, outcome)
        self.recovery_seconds = Histogram(P + "recovery_duration_seconds", "Seconds one recovery run took "
                                          "(read, snapshot, plan, execute)", ["action"], buckets=SLOW, registry=r)
        self.overruns = Counter(P + "monitor_overruns", "Kernel notifications lost by the ownership monitors "
                                "(the families are re-read)", ["monitor"], registry=r)
        for monitor in MONITORS:
            self.overruns.labels(monitor)
        r.register(_SnapshotCollector(self))
        self.http_registry = CollectorRegistry(auto_describe=False)
        self.http_registry.register(_Forward(self.core))
        self.http_registry.register(_CharonCollector(self))
        ProcessCollector(registry=self.http_registry)
        self._server: _Server | None = None
        self._writer: _TextfileWriter | None = None

    # -- snapshots --------------------------------------------------------------------------
    def _take(self) -> None:
        """Loop thread: a new snapshot of the supervisor's status."""
        if self._sup is None:
            return
        status = self._sup.status()
        ledger = getattr(self._sup.recovery, "ledger", None)
        with self._lock:
            leftovers = dict(self._last_leftovers) if self._last_leftovers is not None else None
            rules = dict(self._last_rules)
        self._snap = Snapshot(status, self.clock(), self._wall(), ledger, leftovers, rules)

    def snapshot(self, fresh: bool = False) -> Snapshot:
        """The last snapshot; FRESH: ask the loop for a new one first (waits at most SNAPSHOT_WAIT)."""
        wakeup = self._wakeup
        if fresh and wakeup is not None:
            done = threading.Event()

            def take() -> None:
                try:
                    self._take()
                finally:
                    done.set()
            wakeup.post(take)
            if not done.wait(SNAPSHOT_WAIT):
                log.warning("the supervisor's loop did not hand over a snapshot within %gs; this scrape shows the "
                            "last one", SNAPSHOT_WAIT)
        return self._snap

    def _changed(self) -> None:
        """Loop thread: something changed: rewrite the textfile from a new snapshot, TEXTFILE_DELAY later.

        status() walks the ledger: a burst of transitions (a restart) costs one snapshot after it,
        not one per transition on the restart path. Scrapes take their own snapshot anyway.
        """
        if self._writer is None or self._loop is None or self._write_pending:
            return
        self._write_pending = True

        def write() -> None:
            self._write_pending = False
            if self._writer is not None:
                self._take()
                self._writer.dirty()
        self._loop.call_later(TEXTFILE_DELAY, write)

    def exposition(self, http: bool = True) -> bytes:
        """The text exposition: HTTP, what a scrape gets (fresh snapshot, charon's view); else the
        textfile's part from the last snapshot (taken at the change that asked for the write)."""
        self.scraping.value = http
        try:
            return generate_latest(self.http_registry if http else self.core)
        finally:
            self.scraping.value = False

    # -- Supervisor hooks (loop thread) -----------------------------------------------------
    def attach(self, loop, supervisor) -> None:
        from ..eventloop import ThreadWakeup
        self._sup = supervisor
        self._loop = loop
        self.clock = loop.clock
        self._wakeup = ThreadWakeup(loop)
        self._take()
        m = self.config.metrics
        if m.listen:
            try:
                self._server = _Server(m.listen, self)
                log.info("serving Prometheus metrics on http://%s/metrics", m.listen)
            except OSError as exc:
                log.error("cannot listen on %s for Prometheus metrics (metrics.listen in %s): %s; the supervisor "
                          "runs without it (textfile: %s)", m.listen, self.config.source, exc.strerror or exc,
                          m.textfile or "none")
        if m.textfile:
            self._writer = _TextfileWriter(m.textfile, self)
            self._writer.dirty()

    def detach(self) -> None:
        wakeup, self._wakeup = self._wakeup, None
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._writer is not None:
            self._take()
            writer, self._writer = self._writer, None
            writer.close()                # writes the final state once more
        if wakeup is not None:
            wakeup.close()

    def transition(self, old: State, new: State) -> None:
        if new is State.SETTLING and self._death_seen_at is not None:
            self.death_to_ready.observe(max(0.0, self.clock() - self._death_seen_at))
            self._death_seen_at = None
        elif new in (State.STOPPED, State.GAVE_UP):
            self._death_seen_at = None
        self._changed()

    def death(self, info, decision) -> None:
        cls = info.classification.value
        self.exits.labels(cls).inc()
        if decision.action is Action.RESTART:
            self.restarts.labels(cls).inc()
            self._death_seen_at = info.died_at
        if info.pid:
            self.detection.observe(max(0.0, self.clock() - info.died_at))

    def probe(self, result) -> None:
        self.probe_seconds.observe(result.elapsed)
        if not result.ok:
            self.probe_failures.inc()

    def reload(self, ok: bool) -> None:
        self.reloads.labels("success" if ok else "failure").inc()
        new = getattr(self._sup, "config", None)
        if ok and new is not None and new.metrics != self.config.metrics:
            log.warning("metrics.* changed in %s; takes effect when the supervisor restarts", new.source)
        self._changed()

    # -- KernelRecovery hooks (its threads) -------------------------------------------------
    def recovered(self, section: dict, took: float, abnormal: bool) -> None:
        action, outcome = recovery_outcome(section)
        if abnormal or section.get("leftover_total") or outcome != "ok":
            # a clean stop or a supervisor start that found nothing is not worth a count
            self.recoveries.labels(action, outcome).inc()
            self.recovery_seconds.labels(action).observe(took)
        if abnormal:
            counts = section.get("leftovers") or {}
            with self._lock:
                self._last_leftovers = {f: int(counts.get(f, 0)) for f in LEFTOVER_FAMILIES}
                self._last_rules = dict(section.get("by_rule") or {})
        wakeup = self._wakeup
        if wakeup is not None:
            wakeup.post(self._changed)

    def overrun(self, monitor: str) -> None:
        self.overruns.labels(monitor if monitor in MONITORS else "read-error").inc()


# ---------------------------------------------------------------------------------------------

class _QuietHandler(WSGIRequestHandler):
    timeout = 30          # a client that connects and sends nothing does not keep its thread forever

    def log_message(self, format, *args):  # noqa: A002 - scrapes are not worth a log line each
        pass


class _ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


def split_listen(listen: str) -> tuple[str, int]:
    """'127.0.0.1:9089' -> ('127.0.0.1', 9089); '[::1]:9089' -> ('::1', 9089); ':9089' -> ('', 9089)."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


class _Server:
    """/metrics over HTTP in a thread of its own; blocks in poll() until a client comes (idle: no wake-ups)."""

    def __init__(self, listen: str, observer: MetricsObserver):
        import socket
        host, port = split_listen(listen)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        server_class = type("_Server", (_ThreadingServer,), {"address_family": family})
        app = make_wsgi_app(observer.http_registry)
        self._observer = observer

        def scrape_app(environ, start_response):
            observer.scraping.value = True
            try:
                return app(environ, start_response)
            finally:
                observer.scraping.value = False
        self.httpd = make_server(host or ("::" if family == socket.AF_INET6 else "0.0.0.0"), port, scrape_app,
                                 server_class, handler_class=_QuietHandler)
        self._r, self._w = os.pipe2(os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._serve, name="metrics-http", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def _serve(self) -> None:
        with selectors.PollSelector() as sel:
            sel.register(self.httpd, selectors.EVENT_READ)
            sel.register(self._r, selectors.EVENT_READ)
            while True:
                ready = sel.select()
                if any(key.fileobj == self._r for key, _ in ready):
                    return
                self.httpd.handle_request()

    def close(self) -> None:
        os.write(self._w, b"x")
        self._thread.join(2.0)
        self.httpd.server_close()
        os.close(self._r)
        os.close(self._w)


class _TextfileWriter:
    """Rewrites the textfile after changes, in a thread of its own; bursts of changes make one write."""

    def __init__(self, path: str, observer: MetricsObserver):
        self.path = path
        self._observer = observer
        self._event = threading.Event()
        self._closing = False
        self._error: str | None = None
        self._thread = threading.Thread(target=self._serve, name="metrics-textfile", daemon=True)
        self._thread.start()

    def dirty(self) -> None:
        self._event.set()

    def _serve(self) -> None:
        while True:
            self._event.wait()
            self._event.clear()
            closing = self._closing     # read before writing: a close during the write writes once more
            self.write()
            if closing:
                return

    def write(self) -> None:
        text = self._observer.exposition(http=False).decode()
        try:
            # 0644: node_exporter does not run as root; no fsync: a lost write is replaced by the next one
            write_atomic(self.path, text, mode=0o644, prefix=".ipsec-supervisor-", durable=False)
            if self._error:
                log.info("metrics textfile %s written again", self.path)
            self._error = None
        except OSError as exc:
            if self._error != str(exc):
                log.error("cannot write the metrics textfile %s (metrics.textfile): %s; trying again at the next "
                          "change", self.path, exc.strerror or exc)
            self._error = str(exc)

    def close(self) -> None:
        self._closing = True
        self._event.set()
        self._thread.join(5.0)
