"""The supervised daemon's state machine: states, events, one transition table, one step function.

docs/state-machine.md is generated from this table (``python -m supervisor.states``), so the
diagram never drifts from the code.  The supervisor (starter.py) performs the actions of a
state when it enters it; this module only says which moves are legal.
"""

from __future__ import annotations

import enum


class State(enum.Enum):
    STOPPED = "stopped"
    PREPARING = "preparing"
    STARTING = "starting"
    LOADING = "loading"
    SETTLING = "settling"
    RUNNING = "running"
    STOPPING = "stopping"
    ABORTING = "aborting"
    KILLING = "killing"
    RECOVERING = "recovering"
    BACKOFF = "backoff"
    GAVE_UP = "gave-up"
    COOLDOWN = "cooldown"


class Event(enum.Enum):
    START = "start"
    SPAWNED = "spawned"
    ATTACHED = "attached"
    ANSWERED = "answered"
    LOADED = "loaded"
    OKAY = "okay"
    START_TIMEOUT = "start-timeout"
    PROBE_FAILED = "probe-failed"
    STOP = "stop"
    STOP_TIMEOUT = "stop-timeout"
    ABORT_TIMEOUT = "abort-timeout"
    DIED = "died"
    SCHEDULE_RESTART = "schedule-restart"
    STAY_STOPPED = "stay-stopped"
    GIVE_UP = "give-up"
    BACKOFF_ELAPSED = "backoff-elapsed"
    COOL_DOWN = "cool-down"
    COOLDOWN_ELAPSED = "cooldown-elapsed"


STATE_DOCS: dict[State, str] = {
    State.STOPPED: "no daemon and nothing scheduled (initial; the supervisor exits when it gets here)",
    State.PREPARING: "recovery.before_start runs; then the daemon is spawned (first start: or the daemon an "
                     "earlier supervisor started is re-attached, see supervisor/reattach.py)",
    State.STARTING: "daemon spawned; waiting for its pid file and a VICI `version` answer (start timeout; a "
                    "re-attached daemon: VICI only, and silent past the timeout counts as hung)",
    State.LOADING: "daemon answered; load commands run (not for a re-attached daemon whose load had "
                   "finished), then recovery.on_daemon_ready",
    State.SETTLING: "ready (READY=1 sent); the start counts as successful after restart.okay_delay",
    State.RUNNING: "start confirmed; health probes every health.interval",
    State.STOPPING: "stop signal sent; SIGKILL after stop.timeout",
    State.ABORTING: "health probes failed: SIGABRT sent (core dump); SIGKILL after health.abort_timeout",
    State.KILLING: "SIGKILL sent; waiting for the exit",
    State.RECOVERING: "daemon gone: exit classified, restart decided, recovery.on_daemon_exit runs",
    State.BACKOFF: "waiting for the restart delay",
    State.GAVE_UP: "crash-loop limit reached; stays stopped (fail-closed) until told to start",
    State.COOLDOWN: "crash-loop limit reached; stays stopped (fail-closed) for restart.crash_loop.cooldown "
                    "(doubling in a row), then tries again; `start` tries at once",
}

_ALIVE = (State.STARTING, State.LOADING, State.SETTLING, State.RUNNING)

# Self-transitions are listed on purpose: the event is expected there and changes nothing
# (e.g. a second stop request while the daemon is already being stopped).
TRANSITIONS: dict[State, dict[Event, State]] = {
    State.STOPPED: {
        Event.START: State.PREPARING,
        Event.STOP: State.STOPPED,
    },
    State.PREPARING: {
        Event.SPAWNED: State.STARTING,
        Event.ATTACHED: State.STARTING,        # an earlier supervisor's daemon, taken over
        Event.DIED: State.RECOVERING,          # the spawn itself failed
        Event.STOP: State.STOPPED,
    },
    State.STARTING: {
        Event.ANSWERED: State.LOADING,
        Event.START_TIMEOUT: State.KILLING,
        Event.PROBE_FAILED: State.ABORTING,    # a re-attached daemon that does not answer: hung
        Event.STOP: State.STOPPING,
        Event.DIED: State.RECOVERING,
    },
    State.LOADING: {
        Event.LOADED: State.SETTLING,
        Event.STOP: State.STOPPING,
        Event.DIED: State.RECOVERING,
    },
    State.SETTLING: {
        Event.OKAY: State.RUNNING,
        Event.PROBE_FAILED: State.ABORTING,
        Event.STOP: State.STOPPING,
        Event.DIED: State.RECOVERING,
    },
    State.RUNNING: {
        Event.PROBE_FAILED: State.ABORTING,
        Event.STOP: State.STOPPING,
        Event.DIED: State.RECOVERING,
    },
    State.STOPPING: {
        Event.STOP_TIMEOUT: State.KILLING,
        Event.STOP: State.STOPPING,
        Event.DIED: State.RECOVERING,
    },
    State.ABORTING: {
        Event.ABORT_TIMEOUT: State.KILLING,
        Event.STOP: State.ABORTING,
        Event.DIED: State.RECOVERING,
    },
    State.KILLING: {
        Event.STOP: State.KILLING,
        Event.DIED: State.RECOVERING,
    },
    State.RECOVERING: {
        Event.SCHEDULE_RESTART: State.BACKOFF,
        Event.STAY_STOPPED: State.STOPPED,
        Event.GIVE_UP: State.GAVE_UP,
        Event.COOL_DOWN: State.COOLDOWN,
        Event.STOP: State.RECOVERING,
    },
    State.BACKOFF: {
        Event.BACKOFF_ELAPSED: State.PREPARING,
        Event.STOP: State.STOPPED,
    },
    State.GAVE_UP: {
        Event.START: State.PREPARING,
        Event.STOP: State.STOPPED,
    },
    # Its own state, not GAVE_UP with a timer: only here may the pause's timer start the daemon,
    # so a stale one can never restart a supervisor that gave up for good (exit/stay).
    State.COOLDOWN: {
        Event.COOLDOWN_ELAPSED: State.PREPARING,
        Event.START: State.PREPARING,
        Event.STOP: State.STOPPED,
    },
}

DAEMON_ALIVE = frozenset(_ALIVE + (State.STOPPING, State.ABORTING, State.KILLING))
"""States in which a daemon process exists (and may die)."""


class IllegalTransition(RuntimeError):
    """An event arrived in a state whose table row does not list it: a supervisor bug."""

    def __init__(self, state: State, event: Event):
        allowed = ", ".join(e.value for e in TRANSITIONS[state]) or "nothing"
        super().__init__(f"event {event.value!r} is not allowed in state {state.value!r} "
                         f"(allowed there: {allowed})")
        self.state = state
        self.event = event


def step(state: State, event: Event) -> State:
    """The state after ``event`` in ``state``; IllegalTransition if the table has no such move."""
    try:
        return TRANSITIONS[state][event]
    except KeyError:
        raise IllegalTransition(state, event) from None


def _ident(state: State) -> str:
    return state.name


def render_mermaid() -> str:
    """A Mermaid stateDiagram of the table (self-transitions left out of the picture)."""
    lines = ["stateDiagram-v2", f"    [*] --> {_ident(State.STOPPED)}"]
    for state, row in TRANSITIONS.items():
        for event, target in row.items():
            if target is not state:
                lines.append(f"    {_ident(state)} --> {_ident(target)}: {event.value}")
    lines.append(f"    {_ident(State.STOPPED)} --> [*]")
    return "\n".join(lines)


def render_markdown() -> str:
    """The whole docs/state-machine.md page."""
    out = [
        "# Supervisor state machine",
        "",
        "<!-- Generated by `python -m supervisor.states > docs/state-machine.md` from the",
        "     transition table in supervisor/states.py; do not edit by hand (a test checks it). -->",
        "",
        "Every transition goes through `states.step()` and is logged once. An event that a",
        "state's row does not list raises `IllegalTransition`. Timers belong to the state that",
        "set them and are cancelled when it is left, so a stale timer never fires.",
        "",
        "```mermaid",
        render_mermaid(),
        "```",
        "",
        "## States",
        "",
        "| State | Meaning |",
        "|---|---|",
    ]
    out += [f"| `{s.value}` | {STATE_DOCS[s]} |" for s in State]
    out += ["", "## Transitions", "", "| From | Event | To |", "|---|---|---|"]
    for state, row in TRANSITIONS.items():
        for event, target in row.items():
            to = "(stays)" if target is state else f"`{target.value}`"
            out.append(f"| `{state.value}` | `{event.value}` | {to} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(render_markdown(), end="")
