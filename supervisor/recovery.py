"""Kernel-state recovery in the running supervisor: the ledger, snapshots, flush / adopt / keep.

``KernelRecovery`` plugs into the supervisor (``starter.Recovery`` plus its optional
hooks). It keeps the ownership ledger current while charon runs (a ``KernelWatch``
read in the supervisor's loop, attributed by charon's netlink ports), and around
each daemon run it decides with pure functions and acts in one place:

- ``before_start``: at the first start, leftovers of an earlier supervisor (its
  ledger under the run directory) or, without one, by charon's markers; then the
  baseline of the new run (leftovers carried for adoption count as charon's);
- ``on_daemon_exit``: snapshot the owned leftovers with their context, then the
  mode chosen by ``choose_recovery``: flush (fail-closed blocks first), adopt or
  keep; after a requested stop, ``recovery.on_stop``;
- ``on_daemon_ready``: check that this strongSwan can adopt, start the block
  timeout, and start adopting (``adopt.plan_adopt``, one step at a time, in a
  worker of its own so readiness is never delayed).

All kernel work runs in one worker thread (``_Jobs``); the loop thread only
reads notifications and updates the ledger, which is immutable (swapped under
a lock). The ledger is saved atomically under the run directory, debounced.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime as _dt
import logging
import os
import queue
import socket
import struct
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from vici.protocol import Message, Packet

from . import adopt, daemons
from .config import Config, format_duration
from .errors import KernelError, SupervisorError
from .kernel.common import Action as KAction
from .kernel.xfrm import XfrmPolicy
from .metrics import tell
from .kernel_state import KernelState, KernelWatch, ReadOptions, read_state
from .ledger import (HOW_INHERITED, OWNER_DAEMON, DaemonPorts, Ledger, LedgerError, apply_events, ledger_path, load_ledger,
                     resync_ledger, save_ledger, start_ledger)
from .ownership import MarkerConfig, Verdict, decide_ownership, is_supervisor_block
from .policy import Action, Decision, ExitClass, ExitInfo, signal_name
from .reattach import boot_tick, process_start_time
from .reconcile import (ActionResult, DeleteObject, InstallBlockPolicy, Keep, Outcome, Plan,
                        RemoveBlockPolicy, blocks_to_remove, execute, plan_flush, plan_keep)
from .snapshot import take_snapshot, write_snapshot_in
from .trusted_paths import TrustedDir, open_own_subdir, prune_files
from .strongswan_conf import (DEFAULT_PATH as STRONGSWAN_CONF, POLICY_UPDATE, AdoptCapability, SettingsError,
                              as_bool, check_adopt_capability, lookup, parse_version, read_settings)

log = logging.getLogger("supervisor.recovery")

SAVE_DELAY = 1.0            # ledger writes are debounced: at most one per second
ADOPT_POLL = 0.5            # list-sas polling while adopting (kernel events make it sooner)
DRAIN_WAIT = 2.0            # how long on_daemon_exit waits for the loop to read pending events
VICI_TIMEOUT = 5.0

# What recovery does with the leftovers of one daemon run (choose_recovery).
FLUSH, ADOPT, KEEP, NONE = "flush", "adopt", "keep", "none"


# --- deciding (pure) -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RecoveryChoice:
    """What to do with the leftovers of one run: FLUSH/ADOPT/KEEP/NONE, fail-closed or not, and why."""

    action: str
    fail_closed: bool
    reason: str

    def to_json(self) -> dict:
        return {"action": self.action, "fail_closed": self.fail_closed, "reason": self.reason}


def choose_recovery(mode: str, *, fail_closed: bool, on_stop: str, exit_class: ExitClass | None,
                    decision: Action | None, can_adopt: bool = True) -> RecoveryChoice:
    """The recovery for one daemon exit (EXIT_CLASS None, DECISION None: leftovers found at startup).

    A requested stop follows ``on_stop`` (a flush then mirrors a clean charon stop: no
    blocks); a charon that will not come back (not restarted, crash loop) cannot adopt,
    so adopt and keep leave the state as it is; a crash-loop cooldown flushes fail-closed
    (unless keep); a restart follows ``mode``.
    """
    if mode == NONE:
        return RecoveryChoice(NONE, False, "recovery.mode is none")
    if decision is Action.STOP and exit_class is ExitClass.REQUESTED_STOP:
        if on_stop == FLUSH:
            return RecoveryChoice(FLUSH, False, "requested stop: remove what charon left behind "
                                                "(recovery.on_stop flush)")
        return RecoveryChoice(KEEP, False, "requested stop: recovery.on_stop is keep")
    if decision is Action.COOLDOWN:
        # Down for minutes: the dead charon's SAs must not carry traffic nobody rekeys, and nothing
        # may leave in cleartext; the retry then starts on a clean slate (keep stays keep).
        if mode == KEEP:
            return RecoveryChoice(KEEP, False, "crash-loop cooldown: recovery.mode keep")
        return RecoveryChoice(FLUSH, fail_closed, f"crash-loop cooldown: charon stays down; flushed "
                                                  f"{'fail-closed ' if fail_closed else ''}until the next try")
    if decision in (Action.STOP, Action.GIVE_UP):
        why = "gave up (crash loop)" if decision is Action.GIVE_UP else "charon is not restarted"
        if mode == FLUSH:
            return RecoveryChoice(FLUSH, fail_closed, f"{why}: recovery.mode flush")
        return RecoveryChoice(KEEP, False, f"{why}: nothing can adopt the leftovers; left in place "
                                           "(the next start of the supervisor recovers them)")
    if mode == ADOPT and not can_adopt:
        return RecoveryChoice(FLUSH, fail_closed, "recovery.mode adopt, but this strongSwan cannot adopt: "
                                                  "flushing instead")
    if mode == FLUSH:
        return RecoveryChoice(FLUSH, fail_closed, "recovery.mode flush: charon starts on a clean slate")
    if mode == ADOPT:
        return RecoveryChoice(ADOPT, fail_closed, "recovery.mode adopt: left in place for the restarted charon")
    return RecoveryChoice(KEEP, False, "recovery.mode keep")


def leftover_counts(owned: Iterable[tuple[Any, Verdict]]) -> dict[str, int]:
    counts = {family: 0 for family in ("xfrm_sa", "xfrm_policy", "route", "rule", "address", "firewall")}
    for record, _ in owned:
        counts[record.FAMILY] = counts.get(record.FAMILY, 0) + 1
    return counts


def tally_rules(verdicts: Iterable[Verdict]) -> dict[str, int]:
    """How many leftovers each ownership rule made charon's (ledger:* by port id, marker:* by markers)."""
    out: dict[str, int] = {}
    for v in verdicts:
        out[v.rule] = out.get(v.rule, 0) + 1
    return out


def tally(results: Iterable[ActionResult]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in results:
        out[r.outcome.value] = out.get(r.outcome.value, 0) + 1
    return out


def recovery_plan(choice: RecoveryChoice, state: Any, ownership: Any, others: Iterable[Any] = ()) -> Plan:
    """The plan for CHOICE over STATE (KernelState or Snapshot) as judged by OWNERSHIP;
    OTHERS are the other IKE daemons in the namespace (``ownership.deletion_hold``)."""
    if choice.action == FLUSH:
        return plan_flush(state, ownership, fail_closed=choice.fail_closed, others=tuple(others))
    if choice.action == ADOPT:
        return adopt.plan_wait(ownership.owned(), "adopt: left in place while charon restarts; charon "
                                                  "claims it once ready, the rest goes after "
                                                  "recovery.adopt_grace")
    plan = plan_keep(state, ownership)
    return dataclasses.replace(plan, mode=choice.action)


# --- snapshots ------------------------------------------------------------------------------


def snapshot_name(wall: float, pid: int | None, reason: str) -> str:
    stamp = _dt.datetime.fromtimestamp(wall, _dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    return f"{stamp}-{pid or 0}-{reason}.json"


def snapshot_paths(directory: str) -> list[str]:
    """Snapshot files (regular files only), oldest first (names start with a UTC time stamp)."""
    try:
        with open_own_subdir(directory, create=False) as d:
            return [d.join(f.name) for f in d.files(".json")]
    except FileNotFoundError:
        return []


def prune_snapshots(directory: str | TrustedDir, keep: int, max_age: float, now: float,
                    max_bytes: int = 0) -> list[str]:
    """Remove snapshots beyond the newest KEEP, those older than MAX_AGE seconds (0: no limit), then the
    oldest until the rest fit in MAX_BYTES (0: no limit); by name in the checked directory, never via a link."""
    if isinstance(directory, TrustedDir):
        return prune_files(directory, ".json", keep=keep, max_age=max_age, max_bytes=max_bytes, now=now)
    try:
        with open_own_subdir(directory, create=False) as d:
            return prune_files(d, ".json", keep=keep, max_age=max_age, max_bytes=max_bytes, now=now)
    except FileNotFoundError:
        return []


def ownership_context(ownership: Any, state: Any) -> dict:
    """For the snapshot: which objects (index per family) were charon's, by which rule."""
    owned: dict[str, list] = {}
    for family, records in state.objects.items():
        rows = []
        for i, record in enumerate(records):
            v = ownership.verdict_of(record)
            if v is not None and v.owned:
                rows.append([i, v.rule])
        owned[family] = rows
    return owned


# --- VICI (blocking, with a deadline on every read) ----------------------------------------


class ViciError(SupervisorError):
    """charon's VICI socket did not answer as expected."""


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
        if length > 16 << 20:
            raise ViciError(f"{path} sent a {length}-byte packet during {command}")
        return Packet.parse(recv_exact(sock, length))

    def send(sock: socket.socket, packet: bytes) -> None:
        sock.sendall(struct.pack("!I", len(packet)) + packet)

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


# --- the strongSwan installation ---------------------------------------------------------


def _daemon_environment(config: Config) -> dict[str, str]:
    env = dict(os.environ)
    env.update(dict(config.daemon.environment))
    return env


def check_strongswan(config: Config, daemon_version: str | None = None) -> AdoptCapability:
    """Can the installed strongSwan adopt? From charon's version (VICI, else swanctl --version) and settings."""
    version = parse_version(daemon_version)
    if version is None:
        swanctl = next((argv[0] for argv in config.effective_load_commands if os.path.basename(argv[0]) == "swanctl"),
                       "/usr/sbin/swanctl")
        try:
            proc = subprocess.run([swanctl, "--version"], capture_output=True, text=True, timeout=5,
                                  env=_daemon_environment(config))
            # swanctl prints its own version even when no charon answers (to stderr, exit code 2)
            version = parse_version(proc.stdout + "\n" + proc.stderr)
        except (OSError, subprocess.SubprocessError):
            version = None
    path = _daemon_environment(config).get("STRONGSWAN_CONF") or STRONGSWAN_CONF
    namespace = os.path.basename(config.daemon.command[0])
    try:
        settings = read_settings(path)
        return check_adopt_capability(version, as_bool(lookup(settings, POLICY_UPDATE, namespace)))
    except SettingsError as exc:
        return check_adopt_capability(version, None, settings_problem=str(exc))


# --- the worker ---------------------------------------------------------------------------


class _Jobs:
    """One thread for all kernel and VICI work: jobs run one at a time, in order."""

    def __init__(self, name: str):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self.closed = False
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fn, future, what = item
            if what is not None and self.closed:
                future.cancel()         # background work is dropped at exit; waited-for calls still run
                continue
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits, or logged
                future.set_exception(exc)
                if what is not None:
                    log.error("recovery job '%s' failed", what, exc_info=exc)

    def submit(self, fn: Callable[[], None], what: str) -> None:
        """Run FN in the worker, not waiting for it; a failure is logged naming WHAT."""
        if not self.closed:
            self._queue.put((fn, concurrent.futures.Future(), what))

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run FN in the worker and wait for its result (its exception is raised here)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((fn, future, None))
        return future.result()

    def close(self, wait: float = 5.0) -> None:
        self.closed = True
        self._queue.put(None)
        self._thread.join(wait)


@dataclass
class _Adoption:
    """An adoption in progress (mutable; only the jobs thread changes it)."""

    leftovers: tuple[tuple[Any, Verdict], ...]
    started: float
    deadline: float
    resolved: set = dataclasses.field(default_factory=set)
    initiated: dict = dataclasses.field(default_factory=dict)        # (conn, child) -> when
    connecting_since: dict = dataclasses.field(default_factory=dict)  # conn -> first seen being established
    configured: tuple | None = None
    done: bool = False
    steps: int = 0
    counts: dict = dataclasses.field(default_factory=dict)
    last_error: str | None = None
    step_queued: bool = False
    last_ledger: Any = None
    last_active: Any = None
    pending: int | None = None      # leftovers still undecided after the last step
    last_initiated: float | None = None
    queued: int = 0                 # connections waiting their turn to be initiated (they hold the grace)

    def to_json(self, now: float) -> dict:
        return {"state": "done" if self.done else "waiting", "leftovers": len(self.leftovers),
                "resolved": len(self.resolved), "initiated": sorted("/".join(k) for k in self.initiated),
                "grace_left_s": None if self.done or self.deadline == float("inf")
                else round(max(0.0, self.deadline - now), 3), "queued": self.queued,
                "steps": self.steps, "results": dict(self.counts), "last_error": self.last_error,
                "pending": self.pending}


class KernelRecovery:
    """The supervisor's kernel-state recovery (see the module docstring)."""

    def __init__(self, config: Config, *, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time, reader: Callable[..., KernelState] = read_state):
        self.config = config
        self._clock = clock
        self._wall = wall
        self._read = reader
        self._options = ReadOptions()
        self._markers = MarkerConfig()
        self._lock = threading.RLock()
        self._ledger: Ledger | None = None
        self._ports: DaemonPorts | None = None
        self._buffer: list | None = None
        self._daemon_pid: int | None = None               # the running daemon, from its spawn to its death
        self._watch: KernelWatch | None = None
        self._loop = None
        self._loop_thread: int | None = None
        self._wakeup = None
        self._jobs: _Jobs | None = None
        self._save_pending = False
        self._save_lock = threading.Lock()      # one writer at a time, each with the newest ledger
        self._resync_pending = False
        self._save_error: str | None = None
        self._blocks: dict[tuple, XfrmPolicy] = {}
        self._unblocking: set[tuple] = set()
        self._stuck: frozenset[int] = frozenset()   # indexes of leftover policies a flush could not delete
        self._block_initiated: set[str] = set()      # children initiated to replace a held block
        self._block_deadline: float | None = None
        self._carry: list[tuple[Any, Verdict]] = []     # leftovers handed to the next charon
        self._carry_choice: RecoveryChoice | None = None
        self._adoption: _Adoption | None = None
        self._local_addresses: frozenset[str] = frozenset()
        self._started = False
        self._sections: dict[tuple, dict] = {}
        self._section_ready: dict[tuple, threading.Event] = {}
        self._last: dict | None = None
        self._capability: AdoptCapability | None = None
        self._warned: set[str] = set()
        self.observer = None        # metrics: recovered(section, took, abnormal), overrun(monitor)

    # -- wiring (loop thread) ------------------------------------------------------------
    def attach(self, loop) -> None:
        """Register the kernel monitors in the supervisor's loop and start the worker."""
        from .eventloop import ThreadWakeup
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._wakeup = ThreadWakeup(loop)
        self._jobs = _Jobs("recovery-jobs")
        try:
            self._watch = KernelWatch()
        except KernelError as exc:
            log.error("cannot watch kernel changes (%s): ownership falls back to charon's markers", exc)
            return
        loop.add_reader(self._watch.xfrm.fileno(), self._on_kernel)
        loop.add_reader(self._watch.rtnl.fileno(), self._on_kernel)

    def detach(self) -> None:
        """Stop watching, finish the worker (bounded), and save the ledger one last time."""
        if self._jobs is not None:
            self._jobs.close()
        if self._adoption is not None and not self._adoption.done:
            log.warning("supervisor exiting during adoption: %d leftover(s) stay in the ledger for the next "
                        "start", len(self._adoption.leftovers) - len(self._adoption.resolved))
        self._save_now()
        if self._watch is not None and self._loop is not None:
            for fd in (self._watch.xfrm.fileno(), self._watch.rtnl.fileno()):
                self._loop.forget(fd)
            self._watch.close()
            self._watch = None
        if self._wakeup is not None:
            self._wakeup.close()
            self._wakeup = None

    def _in_loop(self, fn: Callable[[], None]) -> None:
        if self._loop is None:
            return
        if threading.get_ident() == self._loop_thread:
            fn()
        elif self._wakeup is not None:
            self._wakeup.post(fn)

    def _submit(self, fn: Callable[[], None], what: str) -> None:
        if self._jobs is not None:
            self._jobs.submit(fn, what)
        else:
            fn()

    def _run(self, fn: Callable[[], Any]) -> Any:
        """Run FN in the worker (all kernel work is serialised there) and wait for it."""
        if self._jobs is None or self._jobs.closed:
            return fn()
        return self._jobs.call(fn)

    def _observe(self, name: str, *args) -> None:
        """Tell the metrics observer (if any) about an event; its errors are logged, never raised."""
        tell(self.observer, name, *args)

    @property
    def ledger(self) -> Ledger | None:
        """The current ownership ledger (immutable: safe to read from any thread)."""
        return self._ledger

    # -- notifications (loop thread) -------------------------------------------------------
    def _on_kernel(self) -> None:
        if self._watch is None:
            return
        try:
            events = self._watch.read_events()
        except KernelError as exc:
            self._observe("overrun", "read-error")
            log.warning("reading kernel notifications failed (%s); re-reading the state", exc)
            with self._lock:
                if self._ledger is not None:
                    self._ledger = dataclasses.replace(self._ledger, stale=frozenset(
                        ("xfrm_sa", "xfrm_policy", "route", "rule", "address")))
            self._schedule_resync()
            return
        if not events:
            return
        for monitor in {e.family for e in events if e.family in ("xfrm", "rtnl")}:   # overrun markers
            self._observe("overrun", monitor)
        with self._lock:
            if self._buffer is not None:
                self._buffer.extend(events)
                return
            if self._ledger is None:
                return
            ports = self._ports.update(events) if self._ports is not None else frozenset()
            self._ledger = apply_events(self._ledger, events, ports)
            stale = bool(self._ledger.stale)
        self._schedule_save()
        if stale:
            self._schedule_resync()
        if self._blocks:
            self._check_blocks(events)
        a = self._adoption
        if a is not None and not a.done and any(e.family in ("xfrm_sa", "xfrm_policy") for e in events):
            self._queue_adopt_step(0.05)

    def on_daemon_spawned(self, pid: int) -> None:
        """From now on, changes through PID's netlink sockets are the daemon's."""
        self._daemon_pid = pid
        ignore = self._watch.port_ids() if self._watch is not None else ()
        try:
            ports = DaemonPorts(pid, ignore=ignore)
        except LedgerError as exc:
            log.warning("cannot read the netlink sockets of %s pid %d (%s); its changes count as foreign "
                        "until it is seen again", self._daemon_name, pid, exc)
            ports = None
        start_time = process_start_time(pid)
        with self._lock:
            self._ports = ports
            if self._ledger is not None:
                self._ledger = dataclasses.replace(self._ledger, daemon_pid=pid, daemon_start_time=start_time)
        # At once, not debounced: a supervisor killed a moment later leaves a ledger naming this daemon
        # (pid and start time), so the next one re-attaches instead of starting a second charon.
        self._save_now()

    def _schedule_save(self) -> None:
        def arm() -> None:
            if self._save_pending or self._loop is None:
                return
            self._save_pending = True

            def fire() -> None:
                self._save_pending = False
                self._submit(self._save_now, "save ledger")
            self._loop.call_later(SAVE_DELAY, fire)
        self._in_loop(arm)

    def _schedule_resync(self) -> None:
        if self._resync_pending:
            return
        self._resync_pending = True
        self._submit(self._resync, "re-read after lost notifications")

    def _drain_events(self) -> None:
        """Have the loop apply every notification already queued (the daemon's last changes)."""
        if self._loop is None or self._watch is None:
            return
        done = threading.Event()

        def drain() -> None:
            try:
                self._on_kernel()
            finally:
                done.set()
        self._in_loop(drain)
        done.wait(DRAIN_WAIT)

    # -- ledger (jobs thread) ---------------------------------------------------------------
    def _save_now(self) -> None:
        with self._save_lock:
            with self._lock:
                ledger = self._ledger
            if ledger is None:
                return
            path = ledger_path(self.config.paths.run_dir)
            try:
                save_ledger(path, ledger)
                self._save_error = None
            except LedgerError as exc:
                if self._save_error != str(exc):
                    log.warning("%s; ownership after a supervisor restart falls back to markers", exc)
                self._save_error = str(exc)

    def restore_files(self) -> None:
        """The run directory was wiped (tmpfiles, an admin): write the ledger again, now."""
        self._submit(self._save_now, "save ledger (run directory restored)")

    def _set_ledger(self, **changes) -> None:
        with self._lock:
            if self._ledger is not None:
                self._ledger = dataclasses.replace(self._ledger, **changes)

    def _resync(self) -> None:
        self._resync_pending = False
        with self._lock:
            stale = set(self._ledger.stale) if self._ledger is not None else set()
        if not stale:
            return
        try:
            state = self._read(self._options, families=sorted(stale))
        except KernelError as exc:
            log.error("cannot re-read %s after lost notifications: %s (will retry with the next one)",
                      ", ".join(sorted(stale)), exc)
            return
        with self._lock:
            if self._ledger is not None:
                self._ledger = resync_ledger(self._ledger, state.objects)
        log.info("re-read %s after lost kernel notifications", ", ".join(sorted(stale)))
        self._schedule_save()

    def _take_baseline(self) -> None:
        """The new run's ledger: what is there now is foreign, except the leftovers carried over."""
        with self._lock:
            self._buffer = []
        try:
            state = self._read(self._options)
        except KernelError as exc:
            with self._lock:
                self._buffer = None
                self._ledger = None
            log.error("cannot read the kernel state for the ownership baseline: %s; ownership of this run "
                      "falls back to charon's markers", exc)
            return
        blocks = {p.key(): p for p in state.objects.get("xfrm_policy", ()) if is_supervisor_block(p)}
        with self._lock:
            # Normally no daemon runs yet; only a before_start over its time limit lets the spawn
            # overtake the baseline, and then its changes meanwhile are still its own.
            ledger = start_ledger(state, self._daemon_pid, claimed=[r for r, _ in self._carry], now=self._wall())
            # Saved before the spawn: a supervisor killed between the spawn and writing the pid down
            # leaves a ledger by which the next one still finds that daemon (reattach._just_spawned).
            ledger = dataclasses.replace(ledger, spawn_tick=boot_tick())
            buffered, self._buffer = self._buffer or [], None
            ports = self._ports.update(buffered) if self._ports is not None and self._daemon_pid else frozenset()
            self._ledger = apply_events(ledger, buffered, ports)
            for key, block in blocks.items():
                self._blocks.setdefault(key, block)
            self._blocks = {k: v for k, v in self._blocks.items() if k in blocks}
        self._local_addresses = frozenset(a.address for a in state.objects.get("address", ()))
        self._save_now()

    # -- hooks (supervisor's recovery worker) ------------------------------------------------
    def on_config(self, config: Config) -> None:
        """A reload applied CONFIG: the next recovery decides with it (not only after a restart)."""
        self.config = config

    def before_start(self, context) -> None:
        """PREPARING: leftovers of an earlier supervisor (first start only), then the baseline."""
        self.config = context.config
        self._run(lambda: self._before_start(context))

    def _before_start(self, context) -> None:
        if not self._started:
            self._started = True
            self._recover_at_startup()
        self._take_baseline()

    def on_daemon_reattached(self, pid: int, start_time: int | None) -> None:
        """PREPARING, instead of before_start: take over the earlier supervisor's ledger for the charon
        it left running (PID), and resume what it had pending (fail-closed blocks, an adoption)."""
        self._run(lambda: self._reattach(pid, start_time))

    def _reattach(self, pid: int, start_time: int | None) -> None:
        self._started = True        # what the ledger holds is the running charon's: no startup recovery
        path = ledger_path(self.config.paths.run_dir)
        try:
            prior: Ledger | None = load_ledger(path)
        except LedgerError as exc:
            log.warning("re-attaching to %s pid %d: %s", self._daemon_name, pid, exc)
            prior = None
        ignore = self._watch.port_ids() if self._watch is not None else ()
        try:
            ports: DaemonPorts | None = DaemonPorts(pid, ignore=ignore)   # its netlink port ids, read anew
        except LedgerError as exc:
            log.warning("cannot read the netlink sockets of %s pid %d (%s)", self._daemon_name, pid, exc)
            ports = None
        with self._lock:
            self._buffer = []
            self._daemon_pid, self._ports = pid, ports
        try:
            state = self._read(self._options)
        except KernelError as exc:
            state = None
            log.error("cannot read the kernel state while re-attaching: %s; the ledger is re-read at the "
                      "next notification", exc)
        with self._lock:
            buffered, self._buffer = self._buffer or [], None
            if prior is not None:
                ledger = resync_ledger(prior, state.objects) if state is not None else \
                    dataclasses.replace(prior, stale=frozenset(("xfrm_sa", "xfrm_policy", "route", "rule", "address")))
                ledger = dataclasses.replace(ledger, daemon_pid=pid, daemon_start_time=start_time)
                self._ledger = apply_events(ledger, buffered, ports.update(buffered) if ports else frozenset())
        if state is not None:
            self._blocks = {p.key(): p for p in state.objects.get("xfrm_policy", ()) if is_supervisor_block(p)}
            self._local_addresses = frozenset(a.address for a in state.objects.get("address", ()))
        pending = []
        if prior is not None and prior.adoption_deadline is not None and self._ledger is not None:
            pending = [(e.record, e.verdict()) for e in self._ledger.owned() if e.how == HOW_INHERITED]
            if pending:
                self._carry = pending
                self._carry_choice = RecoveryChoice(ADOPT, self.config.recovery.fail_closed,
                                                    "an adoption was in progress when the earlier supervisor died")
        log.info("re-attached to %s pid %d: ledger %s%s%s", self._daemon_name, pid,
                 "taken over" if prior is not None else "unusable, ownership by markers",
                 f", {len(self._blocks)} fail-closed block(s) held" if self._blocks else "",
                 f", adoption of {len(pending)} leftover(s) resumed" if pending else "")
        self._save_now()

    def on_daemon_ready(self, context) -> None:
        """LOADING: check that strongSwan can adopt, start the block timeout, start adopting."""
        self.config = context.config
        self._run(lambda: self._on_ready(context))

    def _on_ready(self, context) -> None:
        rc = self.config.recovery
        version = None
        if self.config.daemon.vici_socket:
            try:
                answer, _ = vici_command(self.config.daemon.vici_socket, "version", timeout=2.0)
                version = answer.get("version")
            except ViciError as exc:
                log.debug("no VICI version for the adopt check: %s", exc)
        if rc.mode == ADOPT:
            self._note_capability(check_strongswan(self.config, version))
        self._set_ledger(daemon_loaded=bool(context.load_ok))
        now = self._clock()
        if self._blocks:
            self._block_deadline = now + rc.block_timeout
            self._submit(self._review_blocks, "check blocks")
            self._in_loop(lambda: self._loop.call_later(rc.block_timeout + 0.01, lambda: self._submit(
                self._review_blocks, "block timeout")))
        carry, choice = self._carry, self._carry_choice
        self._carry, self._carry_choice = [], None
        if carry and choice is not None and choice.action == ADOPT:
            # a tuple: adopt.plan_adopt keeps its grouping and matches for the same tuple between steps
            self._adoption = _Adoption(leftovers=tuple(carry), started=now, deadline=now + rc.adopt_grace)
            self._set_ledger(adoption_deadline=self._wall() + rc.adopt_grace)
            log.info("adopting %d leftover(s) of the dead %s: grace period %s", len(carry), self._daemon_name,
                     format_duration(rc.adopt_grace))
            self._queue_adopt_step(0.0)
        self._save_now()        # "loaded" and the adoption on disk now: a supervisor killed next resumes them

    def on_daemon_exit(self, exit_info: ExitInfo, decision: Decision) -> None:
        """RECOVERING: snapshot what the dead daemon left, then flush / carry it for adopt or keep."""
        section: dict = {"error": "recovery did not finish"}
        try:
            section = self._run(lambda: self._on_exit(exit_info, decision))
        except Exception as exc:
            section = {"error": f"{type(exc).__name__}: {exc}"}
            raise
        finally:
            self._publish_section((exit_info.pid, exit_info.died_at), section)

    def crash_report_section(self, exit_info: ExitInfo) -> dict | None:
        """For the crash report: leftover counts, the snapshot and what recovery did (waits for it)."""
        if self.config.recovery.mode == NONE:
            return None
        key = (exit_info.pid, exit_info.died_at)
        with self._lock:
            ready = self._section_ready.setdefault(key, threading.Event())
        if not ready.wait(self.config.recovery.timeout):
            return {"error": f"recovery did not finish within {format_duration(self.config.recovery.timeout)}"}
        with self._lock:
            return self._sections.get(key)

    def _publish_section(self, key: tuple, section: dict) -> None:
        with self._lock:
            self._sections[key] = section
            self._section_ready.setdefault(key, threading.Event()).set()
            for old in list(self._sections)[:-16]:       # only recent exits are ever asked for
                self._sections.pop(old, None)
                self._section_ready.pop(old, None)

    def _on_exit(self, info: ExitInfo, decision: Decision) -> dict:
        rc = self.config.recovery
        if self._adoption is not None and not self._adoption.done:
            left = len(self._adoption.leftovers) - len(self._adoption.resolved)
            log.warning("%s died during adoption; %d leftover(s) not yet decided are leftovers again",
                        self._daemon_name, left)
        self._adoption = None
        self._set_ledger(adoption_deadline=None, daemon_loaded=False)
        self._block_deadline = None
        self._block_initiated.clear()      # a new charon: initiate again if blocks are held
        self._drain_events()
        with self._lock:
            self._daemon_pid = None         # its sockets are gone; nothing more is attributed to it
            self._ports = None
        why = f"{self._daemon_name} pid {info.pid} {info.describe()}"
        running = [d for d in self._ike_daemons(self._netns_inode(), exclude=(info.pid,)) if d.ours]
        if running:
            # e.g. a start that failed because it runs already (charon exits 66): not a dead charon's leftovers
            reason = (f"{daemons.describe_all(running)} runs in this network namespace, not started by this "
                      "supervisor: the state is its own, no recovery")
            log.warning("after %s: %s", why, reason)
            self._carry, self._carry_choice = [], None
            return {"mode": rc.mode, "action": NONE, "fail_closed": False, "reason": reason,
                    "other_daemons": [d.to_json() for d in running]}
        can_adopt = self._capability.can_adopt if self._capability is not None else True
        choice = choose_recovery(rc.mode, fail_closed=rc.fail_closed, on_stop=rc.on_stop,
                                 exit_class=info.classification, decision=decision.action,
                                 can_adopt=can_adopt)
        return self._recover(choice, why, info.pid, info.classification.abnormal, "exit",
                             {"pid": info.pid, "exit": {"code": info.exit_code, "signal": signal_name(info.signal),
                                                        "classification": info.classification.value,
                                                        "uptime_s": round(info.uptime, 3)}})

    # -- the recovery itself (jobs thread) -----------------------------------------------------
    def _recover(self, choice: RecoveryChoice, why: str, pid: int | None, abnormal: bool, reason: str,
                 daemon: dict | None, prior: Ledger | None = None, others: tuple | None = None) -> dict:
        section: dict[str, Any] = {"mode": self.config.recovery.mode, **choice.to_json()}
        if choice.action == NONE:
            return section
        started = self._clock()
        try:
            state = self._read(self._options)
        except KernelError as exc:
            log.error("cannot read the kernel state after %s: %s; nothing recovered (the next start "
                      "tries again)", why, exc)
            section["error"] = str(exc)
            self._observe("recovered", section, self._clock() - started, abnormal)
            return section
        with self._lock:
            ledger = prior if prior is not None else self._ledger
            if ledger is not None and ledger.stale:
                ledger = resync_ledger(ledger, state.objects)
                if prior is None:
                    self._ledger = ledger
        ownership = decide_ownership(state.objects, self._markers, ledger)
        owned = [(r, v) for r, v in ownership.owned()]
        counts = leftover_counts(owned)
        total = sum(counts.values())
        section.update(leftovers=counts, leftover_total=total, judged_by="ledger and markers" if ledger
                       else "markers only (no ledger)", by_rule=tally_rules(v for _, v in owned))
        snapshot = None
        if self.config.snapshots.enabled and (total or abnormal):
            snapshot = self._write_snapshot(state, ownership, choice, why, pid, reason, daemon)
        section["snapshot"] = snapshot
        if total:
            log.warning("%s left %d owned object(s): %s; %s", why, total,
                        ", ".join(f"{n} {f}" for f, n in counts.items() if n), choice.reason)
        if others is None:
            others = self._ike_daemons(state.netns.inode, exclude=(pid,))
        if others:
            section["other_daemons"] = [d.to_json() for d in others]
            log.warning("other IKE daemon(s) in this network namespace: %s; what only charon's markers "
                        "claim is left to them", daemons.describe_all(others))
        plan = recovery_plan(choice, state, ownership, others)
        held = [a for a in plan.actions if isinstance(a, Keep) and choice.action == FLUSH]
        for a in held:
            log.info("keeping %s: %s", a.record.describe(), a.reason)
        carry: list[tuple[Any, Verdict]] = []
        if choice.action == FLUSH and len(plan):
            results = execute(plan)
            section["results"] = tally(results)
            failed_records = set()
            for r in results:
                if isinstance(r.action, InstallBlockPolicy) and r.ok:
                    with self._lock:
                        self._blocks[r.action.block.key()] = r.action.block
                elif isinstance(r.action, RemoveBlockPolicy) and r.ok:
                    with self._lock:
                        self._blocks.pop(r.action.block.key(), None)
                elif isinstance(r.action, DeleteObject) and not r.ok:
                    failed_records.add(id(r.action.record))
            carry = [(rec, v) for rec, v in owned if id(rec) in failed_records]
            # a leftover still there has the key charon's policy will have: not charon's re-install
            self._stuck = frozenset(rec.index for rec, _ in carry if rec.FAMILY == "xfrm_policy")
            bad = [r for r in results if not r.ok]
            log.log(logging.WARNING if bad else logging.INFO, "flush after %s: %s%s", why,
                    ", ".join(f"{n} {o}" for o, n in section["results"].items()),
                    f" ({len(self._blocks)} fail-closed block(s) in place until charon re-installs its "
                    "policies)" if self._blocks else "")
        elif choice.action in (ADOPT, KEEP):
            carry = owned
        self._carry = carry
        self._carry_choice = choice if carry else None
        self._last = {"at": _dt.datetime.fromtimestamp(self._wall(), _dt.timezone.utc)
                      .isoformat(timespec="seconds"), "after": why, **section}
        self._save_now()
        self._observe("recovered", section, self._clock() - started, abnormal)
        return section

    def _write_snapshot(self, state, ownership, choice, why, pid, reason, daemon) -> str | None:
        directory = self.config.snapshot_dir
        snap = take_snapshot(state, daemon=daemon)
        snap = dataclasses.replace(snap, context={
            **snap.context, "recovery": {"why": why, **choice.to_json()},
            "owned": ownership_context(ownership, state)})
        sc = self.config.snapshots
        try:
            with open_own_subdir(directory, what="paths.state_dir") as d:     # checked, created 0700
                path = write_snapshot_in(d, snapshot_name(self._wall(), pid, reason), snap)
                removed = prune_snapshots(d, sc.keep, sc.max_age, self._wall(), sc.max_bytes)
        except (OSError, SupervisorError) as exc:
            log.error("cannot write the snapshot of the leftovers to %s: %s (recovery goes on without it)",
                      directory, getattr(exc, "strerror", None) or exc)
            return None
        log.info("snapshot of the leftovers written to %s%s", path,
                 f" ({len(removed)} old snapshot(s) removed)" if removed else "")
        return path

    def _recover_at_startup(self) -> None:
        """First start: what an earlier supervisor's daemon (ledger) or an unknown charon (markers) left."""
        rc = self.config.recovery
        if rc.mode == NONE:
            return
        path = ledger_path(self.config.paths.run_dir)
        try:
            state = self._read(self._options)
        except KernelError as exc:
            log.error("cannot read the kernel state at start: %s; leftovers of an earlier run stay", exc)
            return
        inode = state.netns.inode
        prior = None
        if os.path.lexists(path):
            try:
                # Trusted only if root's, not writable by others, and naming this namespace.
                prior = load_ledger(path, netns_inode=inode)
            except LedgerError as exc:
                log.warning("%s; judging by charon's markers", exc)
        found = self._ike_daemons(inode)
        ours = [d for d in found if d.ours]
        if ours:
            log.warning("%s already runs in this network namespace (not started by this supervisor); its "
                        "kernel state is left alone", daemons.describe_all(ours))
            if prior is not None:
                # still the running daemon's: carried so a later recovery knows it as charon's
                self._carry = [(e.record, e.verdict()) for e in prior.owned()]
                self._carry_choice = RecoveryChoice(KEEP, False, "the daemon of the earlier run still runs")
            return
        if self._capability is None and rc.mode == ADOPT:
            self._note_capability(check_strongswan(self.config))
        can_adopt = self._capability.can_adopt if self._capability is not None else True
        choice = choose_recovery(rc.mode, fail_closed=rc.fail_closed, on_stop=rc.on_stop, exit_class=None,
                                 decision=Action.RESTART, can_adopt=can_adopt)
        who = (f"{self._daemon_name} pid {prior.daemon_pid} of an earlier supervisor run"
               if prior is not None and prior.daemon_pid else f"an earlier {self._daemon_name}")
        section = self._recover(choice, f"{who} (found at supervisor start)", prior.daemon_pid if prior else None,
                                False, "startup", {"pid": prior.daemon_pid if prior else None, "exit": None},
                                prior=prior, others=found)
        if prior is None and section.get("leftover_total"):
            log.info("no ledger at %s: leftovers judged by charon's markers", path)

    @staticmethod
    def _netns_inode() -> int:
        return os.stat("/proc/thread-self/ns/net").st_ino

    def _ike_daemons(self, inode: int, exclude: Iterable[int | None] = ()) -> tuple:
        """The IKE daemons in the namespace besides our own process and the pids in EXCLUDE (ours
        first); when that cannot be told, one stand-in, so that nothing marker-only goes."""
        try:
            found = daemons.detect(inode, (self.config.daemon.command[0],))
        except (daemons.DetectionError, OSError) as exc:
            log.warning("%s; leaving what only charon's markers claim in place", exc)
            return (daemons.Undetected(str(exc)),)
        return daemons.others(found, exclude=exclude)

    def _note_capability(self, capability: AdoptCapability) -> None:
        self._capability = capability
        for text in capability.problems + capability.warnings:
            if text in self._warned:
                continue
            self._warned.add(text)
            if text in capability.problems:
                log.error("adopt mode: %s; leftovers are flushed instead", text)
            else:
                log.warning("adopt mode: %s", text)

    # -- fail-closed blocks -----------------------------------------------------------------
    def _check_blocks(self, events) -> None:
        """Loop thread: blocks whose selector charon just installed a policy for may go."""
        candidates = [e.record for e in events if e.family == "xfrm_policy" and e.record is not None
                      and e.action in (KAction.NEW, KAction.UPDATE) and not is_supervisor_block(e.record)]
        if not candidates:
            return
        with self._lock:
            blocks = [b for k, b in self._blocks.items() if k not in self._unblocking]
        removable = blocks_to_remove(blocks, candidates, now=0.0, deadline=float("inf"))
        if removable:
            self._remove_blocks(removable)

    def _remove_blocks(self, removable) -> None:
        with self._lock:
            self._unblocking.update(a.block.key() for a in removable)

        def work() -> None:
            results = execute(Plan("unblock", tuple(removable)))
            with self._lock:
                for r in results:
                    self._unblocking.discard(r.action.block.key())
                    if r.ok:
                        self._blocks.pop(r.action.block.key(), None)
            for r in results:
                (log.info if r.ok else log.warning)("fail-closed block %s: %s%s", r.action.block.describe(),
                                                    "removed, " if r.ok else "NOT removed, ",
                                                    r.action.reason + (f" ({r.message})" if r.message else ""))
        self._submit(work, "remove blocks")

    def _review_blocks(self) -> None:
        """Jobs thread: compare the blocks with the kernel's policies; past the deadline those no
        configured child with a known peer wants go (and such children are initiated)."""
        with self._lock:
            blocks = [b for k, b in self._blocks.items() if k not in self._unblocking]
        if not blocks:
            return
        from .kernel import xfrm
        try:
            policies = xfrm.dump_policies()
        except KernelError as exc:
            log.warning("cannot check the fail-closed blocks: %s", exc)
            return
        present = {p.key() for p in policies}
        with self._lock:
            for b in blocks:
                if b.key() not in present:
                    self._blocks.pop(b.key(), None)      # someone removed it already
        blocks = [b for b in blocks if b.key() in present]
        deadline = self._block_deadline if self._block_deadline is not None else float("inf")
        now = self._clock()
        hold = self._blocks_still_wanted(blocks)
        removable = blocks_to_remove(blocks, policies, now=now, deadline=deadline,
                                     leftover_indexes=self._stuck, hold=hold)
        if removable:
            self._remove_blocks(removable)
        if hold and now >= deadline:
            # Past the timeout (before it, the timeout's own review is already scheduled): look again later: charon may install the policy (events remove the block at once)
            # or drop the child from its configuration (then the block goes).
            delay = max(1.0, self.config.recovery.block_timeout)
            self._in_loop(lambda: self._loop.call_later(delay, lambda: self._submit(
                self._review_blocks, "block review")))

    def _blocks_still_wanted(self, blocks) -> dict:
        """Jobs thread: blocks whose traffic a configured child with a known peer covers (key -> child).

        Those stay past the timeout (fail-closed), and the child is initiated once, so the tunnel
        comes back even where charon was the responder (the peer still uses its stale IKE_SA).
        """
        path = self.config.daemon.vici_socket
        if not path:
            return {}
        try:
            configured = list_conns(path)
        except ViciError as exc:
            log.warning("cannot ask charon which children it has configured (%s); fail-closed "
                        "blocks stay until the next review", exc)
            return {b.key(): "unknown (VICI failed)" for b in blocks}
        try:
            # A conn with an IKE_SA is charon's own business already (start_action, the peer):
            # initiating next to it would only make a second IKE_SA.
            busy = {ike.conn for ike in list_sas(path)}
        except ViciError as exc:
            log.debug("fail-closed review: no list-sas (%s)", exc)
            busy = set()
        hold = {}
        for b in blocks:
            child = adopt.configured_for(b, configured)
            # A child with no concrete peer (%any: a responder for road warriors) would hold the
            # block until some peer connects; a freshly started charon has no policy there either,
            # so such blocks go at the timeout as before.
            if child is None or not child.initiable_peer():
                continue
            hold[b.key()] = child.name
            if child.name in self._block_initiated or child.conn in busy:
                continue
            self._block_initiated.add(child.name)
            peer = next((a for a in child.remote_addrs if adopt._peer_kind(a) in ("address", "hostname")), "")
            action = adopt.InitiateChild(child.conn, child.child, peer, (), "fail-closed",
                                         f"{b.describe()} is still blocked and charon has the child configured")
            result = self._initiate(action, None)
            (log.info if result.ok else log.warning)(
                "fail-closed: keeping the block for %s until charon installs its policy (it has %s "
                "configured); initiate %s: %s", b.describe(), child.name, child.name, result.message or result.outcome.value)
        return hold

    # -- adoption (jobs thread) --------------------------------------------------------------
    def _queue_adopt_step(self, delay: float) -> None:
        a = self._adoption
        if a is None or a.done or a.step_queued:
            return
        a.step_queued = True

        def fire() -> None:
            self._submit(lambda: self._adopt_step(a), "adopt")
        self._in_loop(lambda: self._loop.call_later(delay, fire))

    def _adopt_step(self, a: _Adoption) -> None:
        a.step_queued = False
        if a is not self._adoption or a.done:
            return
        rc = self.config.recovery
        path = self.config.daemon.vici_socket
        now = self._clock()
        grace_over = now >= a.deadline
        active = None
        if path:
            if a.configured is None or grace_over:
                try:
                    a.configured = list_conns(path)
                except ViciError as exc:
                    a.last_error = str(exc)
                    log.warning("adopt: %s", exc)
            try:
                active = list_sas(path)
            except ViciError as exc:
                a.last_error = str(exc)
                log.warning("adopt: %s", exc)
        if active is not None:
            busy = {ike.conn for ike in active if ike.state in adopt.BUSY_IKE_STATES}
            a.connecting_since = {conn: a.connecting_since.get(conn, now) for conn in busy}
        with self._lock:
            ledger = self._ledger
        # A place among adopt_initiate_parallel's may free up by the clock alone (INITIATE_WINDOW).
        places_ageing = any(now - t < adopt.INITIATE_WINDOW
                            for t in (*a.initiated.values(), *a.connecting_since.values()))
        if not grace_over and ledger is a.last_ledger and active == a.last_active and not places_ageing:
            # nothing changed since the last step (the ledger is replaced on every change)
            self._queue_adopt_step(min(ADOPT_POLL, max(0.0, a.deadline - now) + 0.01))
            return
        a.last_ledger, a.last_active = ledger, active
        others = self._ike_daemons(self._netns_inode(), exclude=(self._daemon_pid,))
        todo = adopt.plan_adopt(a.leftovers, ledger=ledger, configured=a.configured, active=active, now=now,
                                deadline=a.deadline, resolved=frozenset(a.resolved), initiated=dict(a.initiated),
                                connecting_since=dict(a.connecting_since), parallel=rc.adopt_initiate_parallel,
                                local_addresses=self._local_addresses,
                                markers=self._markers, fail_closed=rc.fail_closed, initiate=rc.adopt_initiate,
                                explain=False, others=others)
        a.steps += 1
        if todo.actions:
            results = execute(todo, handlers={adopt.InitiateChild: self._initiate})
            for r in results:
                a.counts[f"{r.action.KIND} {r.outcome.value}"] = a.counts.get(f"{r.action.KIND} {r.outcome.value}",
                                                                                0) + 1
                action = r.action
                if isinstance(action, adopt.InitiateChild):
                    a.initiated[(action.conn, action.child)] = a.last_initiated = self._clock()
                    (log.info if r.ok else log.warning)("adopt: initiate %s/%s: %s (%s)", action.conn, action.child,
                                                        r.message or r.outcome.value, action.reason)
                elif isinstance(action, InstallBlockPolicy):
                    if r.ok:
                        with self._lock:
                            self._blocks[action.block.key()] = action.block
                elif isinstance(action, (Keep, DeleteObject)):
                    if r.ok or grace_over:
                        a.resolved.add(adopt.leftover_key(action.record))
                    if isinstance(action, Keep):
                        log.info("adopt: keeping %s: %s", action.record.describe(), action.reason)
        # The grace follows progress: from the latest initiation, and not at all while some wait their turn.
        queued = todo.queued
        a.queued = len(queued)
        a.deadline = adopt.adopt_deadline(a.started, rc.adopt_grace, a.last_initiated, a.queued)
        pending = adopt.pending_leftovers(a.leftovers, ledger, frozenset(a.resolved))
        a.pending = len(pending)
        if (grace_over and not queued) or not pending:
            self._set_ledger(adoption_deadline=None)
            self._save_now()        # what charon claimed is on disk before anyone asks (reconcile)
            a.done = True
            adopt.forget()          # the grouping and matches kept between steps
            log.info("adoption finished after %.1fs: %s", now - a.started,
                     ", ".join(f"{n} {k}" for k, n in sorted(a.counts.items())) or "nothing left to do")
            if self._blocks:
                self._block_deadline = now + rc.block_timeout
                self._in_loop(lambda: self._loop.call_later(rc.block_timeout + 0.01, lambda: self._submit(
                    self._review_blocks, "block timeout")))
            return
        self._queue_adopt_step(min(ADOPT_POLL, max(0.0, a.deadline - now) + 0.01))

    def _initiate(self, action: adopt.InitiateChild, session) -> ActionResult:
        path = self.config.daemon.vici_socket
        if not path:
            return ActionResult(action, Outcome.FAILED, "no VICI socket configured (daemon.vici_socket)")
        try:
            return ActionResult(action, Outcome.DONE, initiate_child(path, action.conn, action.child))
        except ViciError as exc:
            return ActionResult(action, Outcome.FAILED, str(exc))

    # -- status (loop thread) ------------------------------------------------------------------
    @property
    def _daemon_name(self) -> str:
        return os.path.basename(self.config.daemon.command[0])

    def status(self) -> dict:
        """The recovery's part of ``ipsec-supervisor status``: quick, JSON-safe."""
        now = self._clock()
        with self._lock:
            ledger = self._ledger
            blocks = len(self._blocks)
        owned = sum(1 for t in ledger.entries.values() for e in t.values() if e.owner == OWNER_DAEMON) \
            if ledger is not None else None
        a = self._adoption
        return {
            "mode": self.config.recovery.mode,
            "watching": self._watch is not None,
            "ledger": None if ledger is None else {
                "path": ledger_path(self.config.paths.run_dir), "daemon_pid": ledger.daemon_pid,
                "owned": owned, "stale": sorted(ledger.stale), "save_error": self._save_error},
            "blocks": blocks,
            "blocks_deadline_in_s": None if self._block_deadline is None or not blocks
            else round(max(0.0, self._block_deadline - now), 3),
            "carried": len(self._carry),
            "adoption": None if a is None else a.to_json(now),
            "strongswan": None if self._capability is None else self._capability.to_json(),
            "last": self._last,
        }
