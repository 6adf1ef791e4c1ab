"""Loading charon's connection configuration: which source, which loader mode, and the queue of requests.

``choose_load`` decides a load as a pure function of the configuration, the trigger and what this
charon already got; ``ConfigLoads`` runs the loads of one supervisor in the event loop: the first
load after every start, then reloads and updates on request.  A request that arrives while a load
runs is merged into one follow-up load (the running one may have read the files before the change),
and every waiting client is answered when the load that satisfies it has finished.
"""

from __future__ import annotations

import datetime as _dt
import glob
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .config import SWANCTL_LOAD_ALL, Config
from .errors import ExitCode
from .eventloop import Loop
from .jobs import CommandSequence, SequenceResult

log = logging.getLogger("supervisor")

SWANCTL, IPSEC_CONF, CUSTOM = "swanctl", "ipsec.conf", "custom"
START, RELOAD, UPDATE = "start", "reload", "update"
TRIGGERS = (START, RELOAD, UPDATE)
STATE_GLOB = "ipsec-conf.*.state"


def state_path(run_dir: str, daemon_pid: int) -> str:
    """The ipsec.conf loader's record of what it loaded into charon pid DAEMON_PID (never reused)."""
    return os.path.join(run_dir, f"ipsec-conf.{daemon_pid}.state")


@dataclass(frozen=True, slots=True)
class LoadPlan:
    """One load: where the connections come from, the commands, and why."""

    trigger: str                                  # start | reload | update
    source: str                                   # swanctl | ipsec.conf | custom
    mode: str | None                              # the ipsec.conf loader's mode: load | update
    commands: tuple[tuple[str, ...], ...]
    why: str

    def describe(self) -> str:
        what = f"{self.source} ({self.mode})" if self.mode else self.source
        return f"{self.trigger}: {what}: {self.why}"


def choose_load(cfg: Config, trigger: str, *, defines_conns: bool, loaded_from_ipsec_conf: bool,
                state_file: str) -> LoadPlan:
    """Pure: the load for TRIGGER, given whether ipsec.conf defines a conn now and got loaded before.

    ``loaded_from_ipsec_conf``: the loader recorded a load into this very charon (its state file
    exists).  An update compares with that record; without one it is a full load.
    """
    d = cfg.daemon
    if trigger not in TRIGGERS:
        raise ValueError(f"unknown load trigger {trigger!r}")
    custom = d.load_commands if trigger == START else (d.reload_commands or d.load_commands)
    if custom is not None:
        return LoadPlan(trigger, CUSTOM, None, tuple(custom), "daemon.load_commands/reload_commands")
    if d.config == SWANCTL:
        return LoadPlan(trigger, SWANCTL, None, (SWANCTL_LOAD_ALL,), "daemon.config is swanctl")
    if d.config == IPSEC_CONF:
        why = "daemon.config is ipsec.conf"
    elif defines_conns:
        why = f"daemon.config is auto and {d.ipsec_conf} defines a conn"
    elif loaded_from_ipsec_conf:
        # Its conns were loaded into this charon and are gone from the file: the update unloads them.
        why = f"daemon.config is auto; {d.ipsec_conf} defines no conn any more, but this charon got its conns"
    else:
        return LoadPlan(trigger, SWANCTL, None, (SWANCTL_LOAD_ALL,),
                        f"daemon.config is auto and {d.ipsec_conf} defines no conn")
    if trigger != START and loaded_from_ipsec_conf:
        mode, why = UPDATE, why + "; what changed since this charon's last load"
    else:
        mode = "load"
        if trigger != START:
            why += "; nothing was loaded from it into this charon yet: a full load"
    return LoadPlan(trigger, IPSEC_CONF, mode, (cfg.ipsec_conf_loader(mode, state_file),), why)


AT_LOAD = frozenset({"daemon.config", "daemon.load_commands", "daemon.reload_commands", "daemon.load_timeout",
                     "daemon.ipsec_conf", "daemon.ipsec_secrets"})


def split_daemon_keys(changed: Sequence[str]) -> tuple[list[str], list[str]]:
    """Changed daemon.* keys: (those that wait for the next start, those used from the next load)."""
    daemon = [k for k in changed if k.startswith("daemon.") and k != "daemon.log_lines"]
    return [k for k in daemon if k not in AT_LOAD], [k for k in daemon if k in AT_LOAD]


def merge_triggers(triggers: Sequence[str]) -> str:
    """The one follow-up load that satisfies every queued request (a reload covers an update)."""
    return RELOAD if RELOAD in triggers else UPDATE


@dataclass(frozen=True, slots=True)
class LoadOutcome:
    """What the last load did: ok (maybe with conns charon refused) or failed (nothing applied)."""

    plan: LoadPlan
    ok: bool
    error: str | None
    refused: tuple[str, ...]
    at: str
    paced: dict | None = None       # what the start load's VICI relay did (vici_relay), when it ran through one

    def to_json(self) -> dict:
        out = {"trigger": self.plan.trigger, "source": self.plan.source, "mode": self.plan.mode,
               "why": self.plan.why, "ok": self.ok, "error": self.error, "refused": list(self.refused),
               "at": self.at}
        if self.paced is not None:
            out["paced"] = self.paced
        return out


@dataclass
class _Waiter:
    trigger: str
    source: str
    reply: Callable[[dict], None] | None


@dataclass
class _Running:
    plan: LoadPlan
    seq: CommandSequence
    waiters: list[_Waiter] = field(default_factory=list)
    on_done: Callable[[LoadOutcome], None] | None = None
    relay: Any = None           # a vici_relay.PacingRelay the commands talk through


class ConfigLoads:
    """The loads of one supervisor.  Answers are dicts for the control socket (see ``request``)."""

    def __init__(self, loop: Loop, *, config: Callable[[], Config], env: Callable[[], dict[str, str]],
                 daemon_name: Callable[[], str], changed: Callable[[], None],
                 wall_clock: Callable[[], float], start_relay: Callable[[LoadPlan], Any] | None = None):
        self._loop = loop
        # START_RELAY(plan): a started vici_relay.PacingRelay for a start load, or None (load directly)
        self._start_relay = start_relay
        self._config = config
        self._env = env
        self._name = daemon_name
        self._changed = changed
        self._wall = wall_clock
        self._pid: int | None = None
        self._running: _Running | None = None
        self._queued: list[_Waiter] = []
        self.last: LoadOutcome | None = None

    # -- per daemon run ----------------------------------------------------------------
    def begin_run(self, daemon_pid: int, keep_records: bool = False) -> None:
        """A new charon: nothing of the old one's loads applies to it (stale records are removed);
        KEEP_RECORDS: a re-attached charon, whose own record (named by its pid) stays."""
        self._pid = daemon_pid
        self.last = None
        self.remove_records(keep=state_path(self._config().paths.run_dir, daemon_pid) if keep_records else None)

    def remove_records(self, keep: str | None = None) -> None:
        """Remove every loader record in the run directory (a new charon, or a stop), except KEEP."""
        for path in glob.glob(os.path.join(self._config().paths.run_dir, STATE_GLOB)):
            if path == keep:
                continue
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("cannot remove the stale loader record %s: %s (it is never reused: "
                            "its name holds another charon's pid)", path, exc.strerror)

    def end_run(self, restarting: bool) -> None:
        """charon is gone: cancel its loads; the waiting clients get the answer for that case."""
        self._pid = None
        waiters = self._queued
        self._queued = []
        if self._running is not None:
            self._running.seq.cancel()
            _close_relay(self._running)
            waiters = self._running.waiters + waiters
            self._running = None
        for w in waiters:
            if restarting:
                _reply(w, restarting_answer(self._name(), w.trigger, "restarting"))
            else:
                _reply(w, {"ok": False, "error": f"{w.source}: {self._name()} stopped before its "
                                                 "configuration was loaded", "not_running": True})

    def close(self) -> None:
        self.end_run(restarting=False)

    # -- loads -------------------------------------------------------------------------
    def plan(self, trigger: str) -> LoadPlan:
        cfg = self._config()
        assert self._pid is not None
        path = state_path(cfg.paths.run_dir, self._pid)
        defines = False
        if cfg.daemon.config == "auto" and cfg.daemon.load_commands is None:
            from .legacy.ipsec_conf import has_loadable_conns
            defines = has_loadable_conns(cfg.daemon.ipsec_conf)
        return choose_load(cfg, trigger, defines_conns=defines, loaded_from_ipsec_conf=os.path.exists(path),
                           state_file=path)

    def initial(self, on_done: Callable[[LoadOutcome], None]) -> None:
        """The load after a start (state LOADING); ``on_done`` when it finished."""
        self._run(self.plan(START), [], on_done)

    @property
    def busy(self) -> bool:
        return self._running is not None

    def request(self, trigger: str, source: str, reply: Callable[[dict], None] | None) -> dict | None:
        """A reload/update of a ready charon: started now, or merged into the follow-up of a running one.

        Returns the answer at once when there is one; else None, and ``reply`` gets it later.
        """
        waiter = _Waiter(trigger, source, reply)
        if self._running is not None:
            self._queued.append(waiter)
            log.info("%s: a load is running; merged into one more load after it", source)
            return None if reply is not None else {"ok": True, "message": "merged with the load that is running"}
        self._run(self.plan(trigger), [waiter], None)
        return None if reply is not None else {"ok": True, "message": "loading"}

    def _run(self, plan: LoadPlan, waiters: list[_Waiter], on_done: Callable[[LoadOutcome], None] | None) -> None:
        cfg = self._config()
        log.info("loading %s's configuration: %s", self._name(), plan.describe())
        running = _Running(plan, None, waiters, on_done, self._relay_for(plan))  # type: ignore[arg-type]
        commands = plan.commands if running.relay is None else running.relay.commands
        running.seq = CommandSequence(self._loop, "load" if plan.trigger == START else "reload", commands,
                                      self._env(), cfg.daemon.load_timeout,
                                      lambda result: self._finished(running, result),
                                      partial_exit=int(ExitCode.PARTIAL) if plan.source == IPSEC_CONF else None)
        self._running = running

    def _relay_for(self, plan: LoadPlan) -> Any:
        if plan.trigger != START or self._start_relay is None:
            return None
        try:
            return self._start_relay(plan)
        except Exception:   # noqa: BLE001 - pacing is an optimisation: the load itself must run
            log.exception("cannot set up the paced start load; loading directly")
            return None

    def _finished(self, running: _Running, result: SequenceResult) -> None:
        if self._running is not running:
            return
        self._running = None
        paced = _close_relay(running)
        outcome = LoadOutcome(running.plan, result.ok, None if result.ok else result.detail, result.refused,
                              _dt.datetime.fromtimestamp(self._wall(), _dt.timezone.utc).isoformat(timespec="seconds"),
                              paced)
        self.last = outcome
        name = self._name()
        if not outcome.ok:
            log.error("loading %s's configuration failed: %s; %s keeps running with what it had",
                      name, outcome.error, name)
        elif outcome.refused:
            log.warning("%s refused %d conn(s), the others are loaded: %s", name, len(outcome.refused),
                        "; ".join(outcome.refused))
        else:
            log.info("%s's configuration %s (%s)", name, "loaded" if running.plan.trigger == START else "reloaded",
                     running.plan.describe())
        for w in running.waiters:
            _reply(w, load_answer(outcome, w.source))
        if running.on_done is not None:
            running.on_done(outcome)
        self._changed()
        if self._queued and self._pid is not None:
            queued, self._queued = self._queued, []
            self._run(self.plan(merge_triggers([w.trigger for w in queued])), queued, None)

    def status(self) -> dict | None:
        return None if self.last is None else self.last.to_json()


def load_answer(outcome: LoadOutcome, source: str) -> dict:
    """The control answer for a load that finished (pure)."""
    if not outcome.ok:
        return {"ok": False, "error": f"{source}: loading the configuration failed: {outcome.error}",
                "load": outcome.to_json()}
    msg = f"configuration loaded ({outcome.plan.source}" + (f", {outcome.plan.mode})" if outcome.plan.mode else ")")
    if outcome.refused:
        msg += f"; charon refused {len(outcome.refused)} conn(s), the others are loaded"
    return {"ok": True, "message": msg, "load": outcome.to_json()}


def restarting_answer(name: str, trigger: str, state: str) -> dict:
    """A reload/update while charon restarts: the new charon's own load reads the files anyway (pure)."""
    return {"ok": True, "message": f"{name} is restarting (state {state}): the new {name} loads the current "
                                   f"configuration; nothing else to do for this {trigger}", "deferred": True}


def _close_relay(running: _Running) -> dict | None:
    """Close the load's relay, if any; its report."""
    if running.relay is None:
        return None
    relay, running.relay = running.relay, None
    try:
        return relay.close_and_log()
    except Exception:   # noqa: BLE001
        log.exception("closing the start load's VICI relay failed")
        return {"error": "closing the relay failed"}


def _reply(waiter: _Waiter, answer: dict) -> None:
    if waiter.reply is not None:
        waiter.reply(answer)
