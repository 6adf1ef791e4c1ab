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

All kernel work runs in one worker thread (``worker.SerialWorker``); the loop thread only
reads notifications and updates the ledger, which is immutable (swapped under
a lock). The ledger is saved atomically under the run directory, debounced.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import os
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from . import adopt, daemons, reattach
from .config import Config, RecoveryConfig, format_duration
from .errors import KernelError, SupervisorError
from .kernel.common import Action as KAction
from .kernel.xfrm import XfrmPolicy
from .ledger_store import LedgerStore
from .metrics import tell
from .kernel_state import KernelState, KernelWatch, ReadOptions, read_state, read_state_later
from .ledger import (HOW_INHERITED, OWNER_DAEMON, DaemonPorts, Ledger, LedgerError, apply_events, ledger_path, load_ledger,
                     resync_ledger, reuse_records, sharer, start_ledger)
from .ownership import MarkerConfig, Verdict, decide_ownership, is_supervisor_block
from .policy import Action, Decision, ExitInfo, signal_name
from .reattach import boot_tick, process_start_time
from .recovery_choice import (ADOPT, FLUSH, KEEP, NONE, RecoveryChoice, choose_recovery, leftover_counts,
                              recovery_plan, tally, tally_rules)
from .vici_client import ViciError, initiate_child, list_conns, list_sas, vici_command
from .worker import SerialWorker
from .reconcile import (ActionResult, DeleteObject, InstallBlockPolicy, Keep, Outcome, Plan,
                        RemoveBlockPolicy, blocks_to_remove, execute)
from .daemon_record import REASON_CHARS, RecordedChoice
from .crash_snapshots import (TEST_DELAY_ENV, PendingCrash, complete_unfinished, finish_intent, ownership_context,
                              prune_snapshots, snapshot_name, state_after_flush, write_intent)
from .snapshot import take_snapshot, write_snapshot_in
from .trusted_paths import open_own_subdir
from .strongswan_conf import (DEFAULT_PATH as STRONGSWAN_CONF, POLICY_UPDATE, AdoptCapability, SettingsError,
                              as_bool, check_adopt_capability, lookup, parse_version, read_settings)

log = logging.getLogger("supervisor.recovery")

ADOPT_POLL = 0.5            # list-sas polling while adopting (kernel events make it sooner)
DRAIN_WAIT = 2.0            # how long on_daemon_exit waits for the loop to read pending events



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
    step_ended: float | None = None     # when the last step ended, and its CPU time (adopt.step_wait)
    step_cpu: float = 0.0
    queued: int = 0                 # connections waiting their turn to be initiated (they hold the grace)

    def to_json(self, now: float) -> dict:
        return {"state": "done" if self.done else "waiting", "leftovers": len(self.leftovers),
                "resolved": len(self.resolved), "initiated": sorted("/".join(k) for k in self.initiated),
                "grace_left_s": None if self.done or self.deadline == float("inf")
                else round(max(0.0, self.deadline - now), 3), "queued": self.queued,
                "steps": self.steps, "results": dict(self.counts), "last_error": self.last_error,
                "pending": self.pending, "last_step_cpu_s": round(self.step_cpu, 4)}


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
        self._daemon_start_time: int | None = None        # its /proc start time (re-attach tells pids apart by it)
        self._watch: KernelWatch | None = None
        self._loop = None
        self._loop_thread: int | None = None
        self._wakeup = None
        self._jobs: SerialWorker | None = None
        self._save_pending = False
        self._resync_pending = False
        # the daemon record at once, the ledger (and the crash's snapshot) in the writer thread
        self._store = LedgerStore(lambda: self.config.paths.run_dir, lambda: self._ledger)
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
        self._pending: PendingCrash | None = None     # a crash's recovery, finished after the restart
        self._finishing = False                         # _finish_pending under way (jobs thread)
        self._exit_began = 0.0
        self._overruns: dict[str, int] = {}      # lost notifications per monitor, and re-reads after them
        self._resyncs = 0
        # (the ledger, weakly: a dead daemon's must not stay in memory for it; how many it calls charon's)
        self._owned_count: tuple[Callable[[], Any], int] = (lambda: None, 0)
        self.observer = None        # metrics: recovered(section, took, abnormal), overrun(monitor)

    # -- wiring (loop thread) ------------------------------------------------------------
    def attach(self, loop) -> None:
        """Register the kernel monitors in the supervisor's loop and start the worker."""
        from .eventloop import ThreadWakeup
        # A crash's kernel read (hundreds of recv calls) runs beside CPU-bound work (decoding,
        # adoption steps): at the default 5 ms, each recv waits up to 5 ms for the GIL.
        sys.setswitchinterval(min(sys.getswitchinterval(), 0.001))
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._wakeup = ThreadWakeup(loop)
        self._jobs = SerialWorker("recovery-jobs")
        self._store.start()
        self._store.note_daemon(write=False, netns_inode=self._netns_inode())   # whose daemon the record names
        try:
            self._watch = KernelWatch()
        except KernelError as exc:
            log.error("cannot watch kernel changes (%s): ownership falls back to charon's markers", exc)
            return
        loop.add_reader(self._watch.xfrm.fileno(), self._on_kernel)
        loop.add_reader(self._watch.rtnl.fileno(), self._on_kernel)

    def detach(self) -> None:
        """Stop watching, finish the worker (bounded), and save the ledger one last time."""
        if self._pending is not None:       # a crash whose restart never came: its snapshot still goes out
            self._run(self._finish_pending)
        if self._jobs is not None:
            self._jobs.close()
        if self._adoption is not None and not self._adoption.done:
            log.warning("supervisor exiting during adoption: %d leftover(s) stay in the ledger for the next "
                        "start", len(self._adoption.leftovers) - len(self._adoption.resolved))
        adopt.forget()
        self._store.close(daemon_running=self._daemon_pid is not None)
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
            self._overruns["read-error"] = self._overruns.get("read-error", 0) + 1
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
            self._overruns[monitor] = self._overruns.get(monitor, 0) + 1
            self._observe("overrun", monitor)
        with self._lock:
            if self._buffer is not None:
                self._buffer.extend(events)
                buffering = True
            elif self._ledger is None:
                return
            else:
                buffering = False
        if buffering:
            if self._blocks:
                self._check_blocks(events)
            return
        with self._lock:
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
        start_time = self._daemon_start_time = process_start_time(pid)
        # At once (a small file, no fsync): a supervisor killed a moment later leaves a record naming
        # this daemon (pid and start time), so the next one re-attaches instead of starting a second charon.
        self._store.note_daemon(daemon_pid=pid, daemon_start_time=start_time)
        with self._lock:
            self._ports = ports
            # After a crash the ledger is still the dead daemon's until _finish_pending replaces it:
            # on disk, a ledger names the daemon whose run it describes (reattach tells them apart).
            if self._ledger is not None and self._pending is None:
                self._ledger = dataclasses.replace(self._ledger, daemon_pid=pid, daemon_start_time=start_time)
        if self._pending is not None:
            # charon is back: now the rest of the crash's recovery (ownership, baseline, snapshot)
            self._submit(self._finish_pending, "recovery after the restart")
        else:
            self._store.save_later()

    def _schedule_save(self) -> None:
        def arm() -> None:
            if self._save_pending or self._loop is None:
                return
            self._save_pending = True

            def fire() -> None:
                self._save_pending = False
                self._store.save_later()    # a crash's recovery never waits behind a save of 40,000 entries
            self._loop.call_later(self._store.save_delay(), fire)
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
    def restore_files(self) -> None:
        """The run directory was wiped (tmpfiles, an admin): write the daemon record and the ledger again."""
        self._store.restore()

    def _set_daemon(self, *, write: bool = True, **changes) -> None:
        """The daemon's facts for a successor (DaemonRecord fields): in the record now (WRITE), and in
        the ledger with its next save."""
        self._store.note_daemon(write=write, **changes)
        with self._lock:
            if self._ledger is not None:
                self._ledger = dataclasses.replace(self._ledger, **changes)

    def _record_choice(self, choice: RecoveryChoice, mode: str) -> None:
        """In the daemon record at once (a few hundred bytes): a successor that re-attaches to the next
        charon follows CHOICE for the leftovers it carries (reattach.decide_resume)."""
        self._store.note_daemon(recovery=RecordedChoice(choice.action, choice.fail_closed,
                                                        choice.reason[:REASON_CHARS], mode))

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
        self._resyncs += 1
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
        # (before the spawn: sharing the old ledger's records, 70 ms at 40,000 objects, is for _finish, after it)
        self._install_baseline(state)
        self._store.save_later()

    def _install_baseline(self, state) -> None:
        """The new run's ledger from STATE plus every change buffered since it was read."""
        blocks = {p.key(): p for p in state.objects.get("xfrm_policy", ()) if is_supervisor_block(p)}
        # Built outside the lock: the loop keeps buffering notifications meanwhile.
        ledger = start_ledger(state, self._daemon_pid, claimed=[r for r, _ in self._carry], now=self._wall())
        with self._lock:
            # The spawn may overtake the baseline (always after a crash, whose baseline is finished
            # once charon runs): its changes meanwhile are still its own. Before the spawn, the tick
            # lets a supervisor killed between the spawn and writing the pid down find that daemon
            # (reattach._just_spawned).
            ledger = dataclasses.replace(ledger, daemon_pid=self._daemon_pid, daemon_start_time=self._daemon_start_time,
                                         spawn_tick=self._store.record.spawn_tick)
            buffered, self._buffer = self._buffer or [], None
            ports = self._ports.update(buffered) if self._ports is not None and self._daemon_pid else frozenset()
            self._ledger = apply_events(ledger, buffered, ports)
            for key, block in blocks.items():
                self._blocks.setdefault(key, block)
            self._blocks = {k: v for k, v in self._blocks.items() if k in blocks}
            stale = bool(self._ledger.stale)
        self._local_addresses = frozenset(a.address for a in state.objects.get("address", ()))
        if stale:
            self._schedule_resync()     # notifications were lost while buffering (e.g. a big flush)

    # -- hooks (supervisor's recovery worker) ------------------------------------------------
    def on_config(self, config: Config) -> None:
        """A reload applied CONFIG: the next recovery decides with it (not only after a restart)."""
        self.config = config

    def before_start(self, context) -> None:
        """PREPARING: leftovers of an earlier supervisor (first start only), then the baseline.

        After a crash the baseline comes from the crash's own read, finished once charon is
        spawned (``_finish_pending``): nothing is read or written here then.
        """
        self.config = context.config
        # Before the spawn: a supervisor killed between the spawn and writing the pid down leaves a
        # record by which the next one still finds that daemon (reattach._just_spawned).
        self._store.note_daemon(daemon_pid=None, daemon_start_time=None, spawn_tick=boot_tick(),
                                daemon_loaded=False, adoption_deadline=None)
        if self._pending is not None:
            return
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
            self._daemon_pid, self._daemon_start_time, self._ports = pid, start_time, ports
        try:
            state = self._read(self._options)
        except KernelError as exc:
            state = None
            log.error("cannot read the kernel state while re-attaching: %s; the ledger is re-read at the "
                      "next notification", exc)
        raw, problem = reattach.read_record(self.config.paths.run_dir)
        record = raw if raw is not None and raw.daemon_pid == pid else None
        # what the dead supervisor chose for the leftovers this charon carries: followed, not decided anew
        recorded, unrecorded_why = reattach.recorded_choice(raw, problem, pid, start_time)
        now = self._wall()
        up = reattach.seconds_since_start(start_time) if start_time is not None else None
        rc = self.config.recovery
        t = reattach.take_over(prior, record, pid, start_time, state, now, mode=rc.mode, fail_closed=rc.fail_closed,
                               recorded=recorded, unrecorded_why=unrecorded_why,
                               daemon_since=None if up is None else now - up)
        with self._lock:
            buffered, self._buffer = self._buffer or [], None
            if t.ledger is not None:
                self._ledger = apply_events(t.ledger, buffered, ports.update(buffered) if ports else frozenset())
        if state is not None:
            self._blocks = {p.key(): p for p in state.objects.get("xfrm_policy", ()) if is_supervisor_block(p)}
            self._local_addresses = frozenset(a.address for a in state.objects.get("address", ()))
            if self.config.snapshots.enabled:       # a crash's snapshot the dead supervisor never wrote
                complete_unfinished(self.config.snapshot_dir, state, self._wall())
        pending = []
        if t.resume.adopt and self._ledger is not None:
            pending = [(e.record, e.verdict()) for e in self._ledger.owned() if e.how == HOW_INHERITED]
            if pending:
                self._carry = pending
                self._carry_choice = RecoveryChoice(ADOPT, t.resume.choice.fail_closed if t.resume.choice
                                                    else rc.fail_closed, f"resumed after a supervisor restart: "
                                                    f"{t.resume.why}")
        # a missing choice is worth a warning only where it decides something
        (log.warning if t.resume.left and not t.resume.recorded else log.info)("re-attach: %s", t.resume.why)
        log.info("re-attached to %s pid %d: ledger %s%s%s", self._daemon_name, pid, t.how,
                 f", {len(self._blocks)} fail-closed block(s) held" if self._blocks else "",
                 f", adoption of {len(pending)} leftover(s) resumed" if pending else "")
        self._store.note_daemon(daemon_pid=pid, daemon_start_time=start_time, spawn_tick=None,
                                daemon_loaded=record.daemon_loaded if record is not None else
                                bool(prior is not None and prior.daemon_loaded),
                                adoption_deadline=None, recovery=t.resume.choice)
        self._store.save_later()

    def adoption_coming(self) -> bool:
        """Loop thread, as the start load begins: leftovers wait for this charon's adoption (which
        begins once the load is done), so the load is paced (vici_relay)."""
        # read in the order _finish writes (pending cleared first, carry set last): a crash being
        # finished right now has no choice to read here, and counts as adopting when adopt is set
        carry, choice, pending, finishing = self._carry, self._carry_choice, self._pending, self._finishing
        if pending is not None:
            return pending.choice.action == ADOPT
        if choice is not None:
            return choice.action == ADOPT and bool(carry)
        return finishing and self.config.recovery.mode == ADOPT

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
        self._set_daemon(daemon_loaded=bool(context.load_ok), write=False)
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
            self._set_daemon(adoption_deadline=self._wall() + rc.adopt_grace, write=False)
            log.info("adopting %d leftover(s) of the dead %s: grace period %s", len(carry), self._daemon_name,
                     format_duration(rc.adopt_grace))
            self._queue_adopt_step(0.0)
        # "loaded" and the adoption on disk now: a supervisor killed next resumes them
        self._store.write_record()
        self._store.save_later()

    def on_daemon_exit(self, exit_info: ExitInfo, decision: Decision) -> None:
        """RECOVERING: snapshot what the dead daemon left, then flush / carry it for adopt or keep."""
        section: dict = {"error": "recovery did not finish"}
        key = (exit_info.pid, exit_info.died_at)
        # One reading of the recovery settings and of the adopt check decides both where the recovery
        # runs and what it does: a reload (on the supervisor's thread) may replace them meanwhile, and
        # a flush must never run here beside an adoption step on the jobs thread.
        rc = self.config.recovery
        can_adopt = self._capability.can_adopt if self._capability is not None else True
        try:
            if self._reads_only(decision, rc, can_adopt):
                # Here, not behind the jobs thread (an adoption step over 30,000 leftovers may be
                # running there): adopt and keep only read the kernel before the restart.
                section = self._on_exit(exit_info, decision, rc, can_adopt)
            else:
                section = self._run(lambda: self._on_exit(exit_info, decision, rc, can_adopt))
        except Exception as exc:
            section = {"error": f"{type(exc).__name__}: {exc}"}
            raise
        finally:
            if self._pending is None or self._pending.key != key:
                self._publish_section(key, section)     # else: once its snapshot is written

    def _reads_only(self, decision: Decision, rc: RecoveryConfig, can_adopt: bool) -> bool:
        """Whether this exit's recovery changes nothing in the kernel before the restart."""
        return (decision.action is Action.RESTART and self._pending is None and not self._finishing
                and self._jobs is not None
                and (rc.mode == KEEP or (rc.mode == ADOPT and can_adopt)))

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

    def _on_exit(self, info: ExitInfo, decision: Decision, rc: RecoveryConfig, can_adopt: bool) -> dict:
        self._exit_began = self._clock()
        if self._pending is not None:
            self._finish_pending()          # the restart failed before spawning: finish the last crash first
        if self._adoption is not None and not self._adoption.done:
            left = len(self._adoption.leftovers) - len(self._adoption.resolved)
            log.warning("%s died during adoption; %d leftover(s) not yet decided are leftovers again",
                        self._daemon_name, left)
        self._adoption = None
        adopt.forget()                      # the dead adoption's grouping and matches
        self._set_daemon(adoption_deadline=None, daemon_loaded=False, write=False)   # it names a dead pid
        self._block_deadline = None
        self._block_initiated.clear()      # a new charon: initiate again if blocks are held
        self._drain_events()
        with self._lock:
            self._daemon_pid = self._daemon_start_time = None   # its sockets are gone; nothing more is its
            self._ports = None
        why = f"{self._daemon_name} pid {info.pid} {info.describe()}"
        running = [d for d in self._ike_daemons(self._netns_inode(), exclude=(info.pid,)) if d.ours]
        if running:
            # e.g. a start that failed because it runs already (charon exits 66): not a dead charon's leftovers
            reason = (f"{daemons.describe_all(running)} runs in this network namespace, not started by this "
                      "supervisor: the state is its own, no recovery")
            log.warning("after %s: %s", why, reason)
            self._carry, self._carry_choice = [], None
            self._record_choice(RecoveryChoice(NONE, False, reason), rc.mode)
            return {"mode": rc.mode, "action": NONE, "fail_closed": False, "reason": reason,
                    "other_daemons": [d.to_json() for d in running]}
        choice = choose_recovery(rc.mode, fail_closed=rc.fail_closed, on_stop=rc.on_stop,
                                 exit_class=info.classification, decision=decision.action,
                                 can_adopt=can_adopt)
        self._record_choice(choice, rc.mode)
        daemon = {"pid": info.pid, "exit": {"code": info.exit_code, "signal": signal_name(info.signal),
                                            "classification": info.classification.value,
                                            "uptime_s": round(info.uptime, 3)}}
        if decision.action is Action.RESTART and choice.action != NONE:
            with self._store.writer_paused():
                return self._recover_before_restart(choice, why, info, daemon, rc.mode)
        return self._recover(choice, why, info.pid, info.classification.abnormal, "exit", daemon, mode=rc.mode)

    # -- the recovery itself (jobs thread) -----------------------------------------------------
    def _recover(self, choice: RecoveryChoice, why: str, pid: int | None, abnormal: bool, reason: str,
                 daemon: dict | None, prior: Ledger | None = None, others: tuple | None = None, *,
                 mode: str) -> dict:
        # MODE: the one CHOICE was made in (a reload may have changed the configuration since)
        section: dict[str, Any] = {"mode": mode, **choice.to_json()}
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
            self._note_flush(results, why)
            failed_records = {id(r.action.record) for r in results if isinstance(r.action, DeleteObject)
                              and not r.ok}
            carry = [(rec, v) for rec, v in owned if id(rec) in failed_records]
            # a leftover still there has the key charon's policy will have: not charon's re-install
            self._stuck = frozenset(rec.index for rec, _ in carry if rec.FAMILY == "xfrm_policy")
        elif choice.action in (ADOPT, KEEP):
            carry = owned
        self._carry = carry
        self._carry_choice = choice if carry else None
        self._last = {"at": _dt.datetime.fromtimestamp(self._wall(), _dt.timezone.utc)
                      .isoformat(timespec="seconds"), "after": why, **section}
        self._store.save_later()
        self._observe("recovered", section, self._clock() - started, abnormal)
        return section

    # -- a crash with a restart: only the read before it, the rest after (see crash_snapshots) ------
    def _recover_before_restart(self, choice: RecoveryChoice, why: str, info: ExitInfo, daemon: dict,
                                mode: str) -> dict:
        """Jobs thread, charon dead: read the state (a flush also acts: charon must start on a clean
        slate), record the snapshot to come, and leave the rest to ``_finish_pending``."""
        section: dict[str, Any] = {"mode": mode, **choice.to_json()}
        started, cpu, process_cpu = self._clock(), time.thread_time(), time.process_time()
        with self._lock:
            if self._buffer is None:
                self._buffer = []       # every change from now on goes on top of this read: the next baseline
        try:
            # the kernel's answers only: decoding 30,000 policies is the bigger part, and waits
            decode = self._read_later()
        except KernelError as exc:
            with self._lock:
                self._buffer = None
            log.error("cannot read the kernel state after %s: %s; nothing recovered (the next start "
                      "tries again)", why, exc)
            section["error"] = str(exc)
            self._observe("recovered", section, self._clock() - started, info.classification.abnormal)
            return section
        at = {"died": info.died_at, "began": self._exit_began, "read_began": started, "read": self._clock()}
        read_at = _dt.datetime.fromtimestamp(self._wall(), _dt.timezone.utc).isoformat(timespec="milliseconds")
        ledger = self._ledger
        ownership, results, state = None, None, None
        if choice.action == FLUSH:
            state = decode()
            decode = lambda: state          # noqa: E731
            at["decoded"] = self._clock()
            with self._lock:
                ledger = self._ledger
                if ledger is not None and ledger.stale:
                    ledger = self._ledger = resync_ledger(ledger, state.objects)
            ownership = decide_ownership(state.objects, self._markers, ledger)
            others = self._ike_daemons(state.netns.inode, exclude=(info.pid,))
            plan = recovery_plan(choice, state, ownership, others)
            at["planned"] = self._clock()
            for a in plan.actions:
                if isinstance(a, Keep):
                    log.info("keeping %s: %s", a.record.describe(), a.reason)
            # Our own 60,000 deletes would come back as notifications the loop decodes while the
            # flush runs; unread, they overrun instead, and the next baseline re-reads those families.
            self._pause_watch(True)
            try:
                results = execute(plan) if len(plan) else []
            finally:
                self._pause_watch(False)
            self._note_flush(results, why)
            at["flushed"] = self._clock()
        name = None
        if self.config.snapshots.enabled and info.classification.abnormal:
            name = snapshot_name(self._wall(), info.pid, "exit")
            try:
                write_intent(self.config.snapshot_dir, name, {
                    "read_at": read_at,
                    "daemon": daemon, "why": why, "recovery": choice.to_json()})
            except (OSError, SupervisorError) as exc:
                log.error("cannot record the snapshot to come in %s: %s (it is still written after the "
                          "restart, unprotected)", self.config.snapshot_dir, getattr(exc, "strerror", None) or exc)
        at["intent"] = self._clock()
        # this thread's, and the whole supervisor's (other threads compete for the GIL); the wall time
        # beyond them is the machine's load
        section["cpu_before_restart_s"] = round(time.thread_time() - cpu, 3)
        section["process_cpu_before_restart_s"] = round(time.process_time() - process_cpu, 3)
        section.update(snapshot=None if name is None else os.path.join(self.config.snapshot_dir, name),
                       at_monotonic=at)
        self._pending = PendingCrash((info.pid, info.died_at), choice, why, info.pid, info.classification.abnormal,
                                 daemon, decode, ledger, ownership, results, name, section, started, read_at)
        return section

    def _pause_watch(self, paused: bool) -> None:
        """Stop (or resume) reading the kernel monitors in the loop; what they lose meanwhile
        arrives as an overrun: the families are re-read."""
        watch, loop = self._watch, self._loop
        if watch is None or loop is None:
            return
        done = threading.Event()

        def switch() -> None:
            try:
                for fd in (watch.xfrm.fileno(), watch.rtnl.fileno()):
                    if paused:
                        loop.forget(fd)
                    else:
                        loop.add_reader(fd, self._on_kernel)
            finally:
                done.set()
        self._in_loop(switch)
        done.wait(DRAIN_WAIT)
        if not paused:
            self._in_loop(self._on_kernel)      # what queued meanwhile (or the overrun), at once

    def _read_later(self) -> Callable[..., KernelState]:
        if self._read is read_state:
            return read_state_later(self._options)
        state = self._read(self._options)       # a reader given for tests decodes at once

        def decode(share: Callable[[Any], Any] | None = None) -> KernelState:
            return state if share is None else dataclasses.replace(state, objects={
                family: tuple(map(share, records)) for family, records in state.objects.items()})
        return decode

    def _finish_pending(self) -> None:
        """Jobs thread, charon spawned again: judge the crash's leftovers, carry them, install the
        new baseline from the crash's read, and hand the snapshot and the ledger to the writer."""
        if self._pending is None:
            return
        # Set before _pending is cleared: a crash meanwhile must not take the read-only path (_reads_only)
        # while this one's baseline and buffer are still being installed.
        self._finishing = True
        try:
            self._finish(self._pending)
        finally:
            self._finishing = False

    def _finish(self, p: PendingCrash) -> None:
        self._pending = None
        choice, section = p.choice, dict(p.section)
        try:
            # Nothing judged by identity yet (a flush's plan was): what the kernel still holds unchanged
            # becomes the dead daemon's ledger's objects as it is decoded, not a second copy of them.
            state = p.decode() if p.ownership is not None else p.decode(sharer(p.ledger))
        except Exception as exc:        # KernelError, or a malformed dump the decoders did not expect
            log.error("cannot decode the kernel state read after %s: %s; no snapshot, leftovers judged at "
                      "the next crash", p.why, exc)
            if p.name is not None:
                finish_intent(self.config.snapshot_dir, p.name)
            self._publish_section(p.key, {**section, "error": str(exc)})
            self._take_baseline()
            return
        section["at_monotonic"] = {"decoded": self._clock(), **section["at_monotonic"]}    # (a flush decoded before)
        if self._store.writer is not None and p.ownership is None:
            # The kernel's answers (9 MB at 10,000 tunnels) were freed in this thread's C heap, which the
            # writer's thread cannot reuse: handed back now, before the snapshot grows its own.
            self._store.writer.give_back()
        # The writer's job below keeps P until the snapshot is written: it must not keep the raw
        # answers, the dead daemon's ledger or a flush's 60,000 results too (the crash's peak RSS).
        ledger, results, p.decode, p.ledger, p.results = p.ledger, p.results or [], None, None, None
        if ledger is not None and ledger.stale and p.ownership is None:
            ledger = resync_ledger(ledger, state.objects)
        ownership = p.ownership or decide_ownership(state.objects, self._markers, ledger)
        owned = list(ownership.owned())
        counts = leftover_counts(owned)
        total = sum(counts.values())
        section.update(leftovers=counts, leftover_total=total, judged_by="ledger and markers" if ledger
                       else "markers only (no ledger)", by_rule=tally_rules(v for _, v in owned))
        if total:
            log.warning("%s left %d owned object(s): %s; %s", p.why, total,
                        ", ".join(f"{n} {f}" for f, n in counts.items() if n), choice.reason)
        others = self._ike_daemons(state.netns.inode, exclude=(p.pid, self._daemon_pid))
        if others:
            section["other_daemons"] = [d.to_json() for d in others]
            log.warning("other IKE daemon(s) in this network namespace: %s; what only charon's markers "
                        "claim is left to them", daemons.describe_all(others))
        after = state
        if choice.action == FLUSH:
            section["results"] = tally(results)
            failed = {id(r.action.record) for r in results if isinstance(r.action, DeleteObject) and not r.ok}
            carry = [(rec, v) for rec, v in owned if id(rec) in failed]
            self._stuck = frozenset(rec.index for rec, _ in carry if rec.FAMILY == "xfrm_policy")
            after = state_after_flush(state, results)
            after = dataclasses.replace(after, objects=reuse_records(after.objects, ledger))
        else:
            carry = owned
        self._carry, self._carry_choice = carry, (choice if carry else None)
        self._install_baseline(after)
        section["at_monotonic"] = {**section["at_monotonic"], "judged": self._clock()}
        self._last = {"at": _dt.datetime.fromtimestamp(self._wall(), _dt.timezone.utc)
                      .isoformat(timespec="seconds"), "after": p.why, **section}
        write = self.config.snapshots.enabled and (total or p.abnormal)

        def beside() -> None:
            delay = float(os.environ.get(TEST_DELAY_ENV) or 0)
            if delay > 0:
                time.sleep(delay)       # tests only: a window in which to kill the supervisor
            self._store.save_now()      # the new run's ledger first: a successor re-attaches by it
            path = None
            if write:
                path = self._write_snapshot(state, ownership, choice, p.why, p.pid, "exit", p.daemon, name=p.name,
                                            deferred={"complete": True, "read_at": p.read_at,
                                                      "written_after_restart": True})
            if p.name is not None and (path is not None or not write):
                finish_intent(self.config.snapshot_dir, p.name)     # else the next start says it was lost
            done = {**section, "snapshot": path,
                    "at_monotonic": {**section["at_monotonic"], "snapshot_written": self._clock()}}
            if self._last is not None and self._last.get("after") == p.why:
                self._last = {**self._last, "snapshot": path, "at_monotonic": done["at_monotonic"]}
            self._observe("recovered", done, self._clock() - p.started, p.abnormal)
            self._publish_section(p.key, done)
        if self._store.writer is not None:
            self._store.writer.submit(beside, "the new ledger and the snapshot of the leftovers")
        else:
            beside()

    def _note_flush(self, results: list[ActionResult], why: str) -> None:
        """Track the blocks a flush installed or removed, and log its outcome."""
        for r in results:
            if isinstance(r.action, InstallBlockPolicy) and r.ok:
                with self._lock:
                    self._blocks[r.action.block.key()] = r.action.block
            elif isinstance(r.action, RemoveBlockPolicy) and r.ok:
                with self._lock:
                    self._blocks.pop(r.action.block.key(), None)
        bad = [r for r in results if not r.ok]
        log.log(logging.WARNING if bad else logging.INFO, "flush after %s: %s%s", why,
                ", ".join(f"{n} {o}" for o, n in tally(results).items()) or "nothing to do",
                f" ({len(self._blocks)} fail-closed block(s) in place until charon re-installs its "
                "policies)" if self._blocks else "")

    def _write_snapshot(self, state, ownership, choice, why, pid, reason, daemon, *, name: str | None = None,
                        deferred: dict | None = None) -> str | None:
        directory = self.config.snapshot_dir
        snap = take_snapshot(state, daemon=daemon)
        snap = dataclasses.replace(snap, context={
            **snap.context, "recovery": {"why": why, **choice.to_json()},
            "owned": ownership_context(ownership, state), **({"deferred": deferred} if deferred else {})})
        sc = self.config.snapshots
        try:
            with open_own_subdir(directory, what="paths.state_dir") as d:     # checked, created 0700
                path = write_snapshot_in(d, name or snapshot_name(self._wall(), pid, reason), snap,
                                         pace=self._store.writer.checkpoint if self._store.writer else None)
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
        if self.config.snapshots.enabled:
            complete_unfinished(self.config.snapshot_dir, state, self._wall())
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
                self._record_choice(self._carry_choice, rc.mode)
            return
        if self._capability is None and rc.mode == ADOPT:
            self._note_capability(check_strongswan(self.config))
        can_adopt = self._capability.can_adopt if self._capability is not None else True
        choice = choose_recovery(rc.mode, fail_closed=rc.fail_closed, on_stop=rc.on_stop, exit_class=None,
                                 decision=Action.RESTART, can_adopt=can_adopt)
        self._record_choice(choice, rc.mode)
        who = (f"{self._daemon_name} pid {prior.daemon_pid} of an earlier supervisor run"
               if prior is not None and prior.daemon_pid else f"an earlier {self._daemon_name}")
        section = self._recover(choice, f"{who} (found at supervisor start)", prior.daemon_pid if prior else None,
                                False, "startup", {"pid": prior.daemon_pid if prior else None, "exit": None},
                                prior=prior, others=found, mode=rc.mode)
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
        wait = adopt.step_wait(self._clock(), a.step_ended, a.step_cpu)
        if wait > 0:
            self._queue_adopt_step(wait)
            return
        cpu = time.thread_time()
        try:
            self._adopt_step_paced(a)
        finally:
            a.step_cpu, a.step_ended = time.thread_time() - cpu, self._clock()

    def _adopt_step_paced(self, a: _Adoption) -> None:
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
            self._set_daemon(adoption_deadline=None)
            self._store.save_now()      # what charon claimed is on disk before anyone asks (reconcile)
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
        # counted once per ledger (it is replaced, never changed): status is polled, and 40,000 entries
        # cost 3-5 ms of the GIL each time
        if ledger is not None and self._owned_count[0]() is not ledger:
            self._owned_count = (weakref.ref(ledger), sum(1 for t in ledger.entries.values() for e in t.values()
                                             if e.owner == OWNER_DAEMON))
        owned = self._owned_count[1] if ledger is not None else None
        a = self._adoption
        return {
            "mode": self.config.recovery.mode,
            "watching": self._watch is not None,
            "ledger": None if ledger is None else {
                "path": ledger_path(self.config.paths.run_dir), "daemon_pid": ledger.daemon_pid,
                "owned": owned, "stale": sorted(ledger.stale), "save_error": self._store.save_error},
            "blocks": blocks,
            "blocks_deadline_in_s": None if self._block_deadline is None or not blocks
            else round(max(0.0, self._block_deadline - now), 3),
            "carried": len(self._carry),
            "monitor": {"overruns": dict(self._overruns), "resyncs": self._resyncs},
            "adoption": None if a is None else a.to_json(now),
            "strongswan": None if self._capability is None else self._capability.to_json(),
            "last": self._last,
        }
