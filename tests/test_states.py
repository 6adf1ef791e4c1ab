"""The state machine table: legal moves, precise errors, reachability, generated docs up to date."""

from __future__ import annotations

import os

import pytest

from supervisor import states
from supervisor.starter import Supervisor
from supervisor.states import DAEMON_ALIVE, STATE_DOCS, TRANSITIONS, Event, IllegalTransition, State, step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("state, event, target", [
    (State.STOPPED, Event.START, State.PREPARING),
    (State.PREPARING, Event.SPAWNED, State.STARTING),
    (State.STARTING, Event.ANSWERED, State.LOADING),
    (State.LOADING, Event.LOADED, State.SETTLING),
    (State.SETTLING, Event.OKAY, State.RUNNING),
    (State.RUNNING, Event.DIED, State.RECOVERING),
    (State.RECOVERING, Event.SCHEDULE_RESTART, State.BACKOFF),
    (State.BACKOFF, Event.BACKOFF_ELAPSED, State.PREPARING),
    (State.RUNNING, Event.PROBE_FAILED, State.ABORTING),
    (State.ABORTING, Event.ABORT_TIMEOUT, State.KILLING),
    (State.STARTING, Event.START_TIMEOUT, State.KILLING),
    (State.RUNNING, Event.STOP, State.STOPPING),
    (State.STOPPING, Event.STOP_TIMEOUT, State.KILLING),
    (State.KILLING, Event.DIED, State.RECOVERING),
    (State.RECOVERING, Event.GIVE_UP, State.GAVE_UP),
    (State.GAVE_UP, Event.START, State.PREPARING),
    (State.RECOVERING, Event.STAY_STOPPED, State.STOPPED),
    (State.BACKOFF, Event.STOP, State.STOPPED),
    (State.STOPPING, Event.STOP, State.STOPPING),      # a second stop request changes nothing
    (State.RECOVERING, Event.COOL_DOWN, State.COOLDOWN),
    (State.COOLDOWN, Event.COOLDOWN_ELAPSED, State.PREPARING),
    (State.COOLDOWN, Event.START, State.PREPARING),   # `ipsec start` during a cooldown tries at once
    (State.COOLDOWN, Event.STOP, State.STOPPED),
])
def test_step_follows_the_table(state, event, target):
    assert step(state, event) is target


@pytest.mark.parametrize("state, event", [
    (State.STOPPED, Event.DIED),
    (State.RUNNING, Event.START),
    (State.BACKOFF, Event.DIED),              # no daemon exists in backoff
    (State.GAVE_UP, Event.BACKOFF_ELAPSED),   # a stale timer must never get here
    (State.GAVE_UP, Event.COOLDOWN_ELAPSED),  # nor a cooldown's: gave-up waits for a person
    (State.RUNNING, Event.COOLDOWN_ELAPSED),
    (State.COOLDOWN, Event.DIED),             # no daemon exists in a cooldown
    (State.LOADING, Event.PROBE_FAILED),
])
def test_illegal_transitions_raise_a_precise_error(state, event):
    with pytest.raises(IllegalTransition) as exc:
        step(state, event)
    assert f"event {event.value!r} is not allowed in state {state.value!r}" in str(exc.value)
    assert "allowed there:" in str(exc.value)


def test_every_state_has_a_row_a_doc_and_an_entry_action():
    assert set(TRANSITIONS) == set(State) == set(STATE_DOCS)
    for s in State:
        assert callable(getattr(Supervisor, f"_enter_{s.name.lower()}", None)), s


def test_every_state_is_reachable_and_can_reach_stopped():
    seen, todo = {State.STOPPED}, [State.STOPPED]
    while todo:
        for target in TRANSITIONS[todo.pop()].values():
            if target not in seen:
                seen.add(target)
                todo.append(target)
    assert seen == set(State)
    for s in State:
        reach, todo = {s}, [s]
        while todo:
            for target in TRANSITIONS[todo.pop()].values():
                if target not in reach:
                    reach.add(target)
                    todo.append(target)
        assert State.STOPPED in reach, s


def test_a_daemon_can_die_in_every_state_where_it_exists():
    for s in DAEMON_ALIVE:
        assert step(s, Event.DIED) is State.RECOVERING
    for s in set(State) - DAEMON_ALIVE - {State.PREPARING}:
        assert Event.DIED not in TRANSITIONS[s]


def test_stop_is_accepted_everywhere():
    for s in State:
        step(s, Event.STOP)


def test_docs_diagram_is_generated_from_the_table():
    with open(os.path.join(ROOT, "docs", "state-machine.md"), encoding="utf-8") as fh:
        assert fh.read() == states.render_markdown(), \
            "docs/state-machine.md is stale: run `python -m supervisor.states > docs/state-machine.md`"


def test_diagram_lists_every_real_transition():
    diagram = states.render_mermaid()
    for s, row in TRANSITIONS.items():
        for e, t in row.items():
            line = f"{s.name} --> {t.name}: {e.value}"
            assert (line in diagram) is (t is not s)
