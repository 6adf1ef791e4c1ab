"""Restart policy tables: classification, restart decision, backoff, jitter, reset, okay-delay, give-up, cooldown."""

from __future__ import annotations

import dataclasses
import signal

import pytest

from supervisor.config import BackoffConfig, RestartConfig
from supervisor.errors import ExitCode
from supervisor.policy import (Action, Cause, ExitClass, ExitInfo, backoff_delay, classify_exit, cooldown_duration,
                               cooldowns_in_a_row, deaths_in_window, decide, decode_wait_status, exit_info,
                               format_wait, is_stable, prune_history, restart_attempt, wants_restart)

CFG = RestartConfig()
EXIT_CFG = dataclasses.replace(CFG, crash_loop=dataclasses.replace(CFG.crash_loop, action="exit"))
SEGV, KILL, ABRT = signal.SIGSEGV, signal.SIGKILL, signal.SIGABRT


def cfg(**kw) -> RestartConfig:
    backoff = kw.pop("backoff", {})
    crash = kw.pop("crash_loop", {})
    return dataclasses.replace(CFG, backoff=dataclasses.replace(CFG.backoff, **backoff),
                               crash_loop=dataclasses.replace(CFG.crash_loop, **crash), **kw)


def mid(): return 0.5       # jitter-free random source: 2*0.5-1 == 0
def low(): return 0.0       # the most negative jitter
def high(): return 0.999999  # (almost) the most positive jitter


def death(died_at: float, *, up: float = 1.0, code: int | None = 1, sig: int | None = None,
          cause: Cause = Cause.NONE, ok: bool = True, c: RestartConfig = CFG) -> ExitInfo:
    """A death at ``died_at`` after ``up`` seconds; ``ok``: the start had been confirmed."""
    started = died_at - up
    return ExitInfo(pid=100, exit_code=None if sig else code, signal=sig, core_dumped=False, cause=cause,
                    classification=classify_exit(c, None if sig else code, sig, cause), started_at=started,
                    died_at=died_at, ready_at=started + 0.05, okay_at=(started + 0.1) if ok else None)


# -- exit classification ---------------------------------------------------------------

@pytest.mark.parametrize("code, sig, cause, expected", [
    (0, None, Cause.NONE, ExitClass.CLEAN),
    (1, None, Cause.NONE, ExitClass.FAILURE),
    (127, None, Cause.NONE, ExitClass.FAILURE),
    (None, SEGV, Cause.NONE, ExitClass.SIGNALED),
    (None, KILL, Cause.NONE, ExitClass.SIGNALED),
    (64, None, Cause.NONE, ExitClass.DO_NOT_RESTART),
    (65, None, Cause.NONE, ExitClass.DO_NOT_RESTART),
    (66, None, Cause.NONE, ExitClass.DO_NOT_RESTART),
    (0, None, Cause.STOP, ExitClass.REQUESTED_STOP),
    (None, KILL, Cause.STOP, ExitClass.REQUESTED_STOP),        # needed SIGKILL after the stop timeout
    (66, None, Cause.STOP, ExitClass.REQUESTED_STOP),
    (None, KILL, Cause.RESTART, ExitClass.REQUESTED_STOP),
    (None, ABRT, Cause.HUNG, ExitClass.HUNG),
    (None, KILL, Cause.HUNG, ExitClass.HUNG),
    (0, None, Cause.HUNG, ExitClass.HUNG),                      # even if it exits cleanly once poked
    (None, KILL, Cause.START_TIMEOUT, ExitClass.START_TIMEOUT),
])
def test_classify_exit(code, sig, cause, expected):
    assert classify_exit(CFG, code, sig, cause) is expected


def test_classification_uses_the_configured_prevent_codes():
    c = cfg(prevent_exit_codes=(3,))
    assert classify_exit(c, 3, None, Cause.NONE) is ExitClass.DO_NOT_RESTART
    assert classify_exit(c, 66, None, Cause.NONE) is ExitClass.FAILURE


@pytest.mark.parametrize("status, expected", [
    (0, (0, None, False)),
    (3 << 8, (3, None, False)),
    (signal.SIGSEGV, (None, signal.SIGSEGV, False)),
    (signal.SIGABRT | 0x80, (None, signal.SIGABRT, True)),    # WCOREDUMP bit
    (signal.SIGKILL, (None, signal.SIGKILL, False)),
])
def test_decode_wait_status(status, expected):
    assert decode_wait_status(status) == expected


def test_failed_spawn_is_a_failure_exit_127():
    info = exit_info(CFG, pid=0, wait_status=None, cause=Cause.NONE, started_at=1, died_at=1,
                     spawn_error="/nonexistent: No such file or directory")
    assert (info.exit_code, info.classification) == (127, ExitClass.FAILURE)
    assert "could not be started" in info.describe()


@pytest.mark.parametrize("info, text", [
    (death(10, sig=SEGV), "killed by SIGSEGV"),
    (dataclasses.replace(death(10, sig=ABRT), core_dumped=True), "killed by SIGABRT (core dumped)"),
    (death(10, code=3), "exited with code 3"),
    (death(10, code=66), "exited with code 66 (a do-not-restart code)"),
    (death(10, sig=KILL, cause=Cause.HUNG), "killed by SIGKILL after failing its health probes"),
])
def test_describe_exit(info, text):
    assert info.describe() == text


# -- restart or not ----------------------------------------------------------------------

R, S = True, False


@pytest.mark.parametrize("policy, code, sig, cause, restart", [
    # policy        code  signal  cause                restart?
    ("always",      0,    None,   Cause.NONE,          R),
    ("always",      1,    None,   Cause.NONE,          R),
    ("always",      None, SEGV,   Cause.NONE,          R),
    ("always",      66,   None,   Cause.NONE,          S),   # prevent codes win over the policy
    ("on-failure",  0,    None,   Cause.NONE,          S),
    ("on-failure",  1,    None,   Cause.NONE,          R),
    ("on-failure",  None, SEGV,   Cause.NONE,          R),
    ("on-failure",  None, KILL,   Cause.HUNG,          R),
    ("on-failure",  None, KILL,   Cause.START_TIMEOUT, R),
    ("on-failure",  64,   None,   Cause.NONE,          S),
    ("on-crash",    0,    None,   Cause.NONE,          S),
    ("on-crash",    1,    None,   Cause.NONE,          S),
    ("on-crash",    None, SEGV,   Cause.NONE,          R),
    ("on-crash",    None, KILL,   Cause.HUNG,          R),
    ("on-crash",    None, KILL,   Cause.START_TIMEOUT, S),
    ("never",       None, SEGV,   Cause.NONE,          S),
    ("never",       1,    None,   Cause.NONE,          S),
    ("always",      0,    None,   Cause.STOP,          S),   # a requested stop is never restarted
    ("never",       None, KILL,   Cause.RESTART,       R),   # ... but a requested restart always is
])
def test_wants_restart(policy, code, sig, cause, restart):
    c = cfg(policy=policy)
    info = death(10, code=code, sig=sig, cause=cause, c=c)
    assert wants_restart(c, info)[0] is restart


@pytest.mark.parametrize("policy, code, restart", [
    ("never", 3, R), ("on-crash", 3, R), ("on-failure", 0, R), ("never", 4, S),
])
def test_force_exit_codes_restart_whatever_the_policy(policy, code, restart):
    c = cfg(policy=policy, force_exit_codes=(0, 3))
    assert wants_restart(c, death(10, code=code, c=c))[0] is restart


def test_reason_names_the_rule():
    c = cfg(policy="on-crash")
    assert wants_restart(c, death(10, code=1, c=c))[1] == \
        "restart.policy is on-crash and the daemon exited with a failure code"
    assert wants_restart(CFG, death(10, code=65))[1] == "exit code 65 is in restart.prevent_exit_codes"


# -- backoff -------------------------------------------------------------------------------

B = BackoffConfig()  # initial 0, step 1s, factor 2, maximum 30s, jitter 0.1


@pytest.mark.parametrize("backoff, attempt, expected", [
    (B, 1, 0.0),                      # the first restart happens at once
    (B, 2, 1.0),
    (B, 3, 2.0),
    (B, 4, 4.0),
    (B, 5, 8.0),
    (B, 6, 16.0),
    (B, 7, 30.0),                     # capped at maximum
    (B, 50, 30.0),
    (B, 10_000, 30.0),                # no overflow
    (BackoffConfig(initial=0.5, step=0.5, factor=3, maximum=10), 1, 0.5),
    (BackoffConfig(initial=0.5, step=0.5, factor=3, maximum=10), 3, 1.5),
    (BackoffConfig(initial=0.5, step=0.5, factor=3, maximum=10), 5, 10.0),
    (BackoffConfig(initial=5, step=5, factor=1, maximum=5), 9, 5.0),   # the old starter: fixed 5 s
])
def test_backoff_delay_without_jitter(backoff, attempt, expected):
    assert backoff_delay(backoff, attempt, mid) == pytest.approx(expected)


@pytest.mark.parametrize("attempt, lo, hi", [
    (1, 0.0, 0.0),        # at once stays at once
    (2, 0.9, 1.1),
    (4, 3.6, 4.4),
    (7, 27.0, 30.0),      # jitter never goes above maximum
])
def test_jitter_stays_within_bounds(attempt, lo, hi):
    assert backoff_delay(B, attempt, low) == pytest.approx(lo)
    assert backoff_delay(B, attempt, high) == pytest.approx(hi, abs=1e-4)
    import random
    rng = random.Random(7)
    for _ in range(500):
        assert lo - 1e-9 <= backoff_delay(B, attempt, rng.random) <= hi + 1e-9


def test_zero_jitter_is_exact():
    b = dataclasses.replace(B, jitter=0.0)
    assert {backoff_delay(b, 3, r) for r in (low, mid, high)} == {2.0}


# -- attempt counting: reset after a stable run, okay-delay ------------------------------

@pytest.mark.parametrize("history, attempt", [
    # (died_at, uptime, start confirmed?) oldest first; reset_after is 60 s
    ([(10, 5, True)], 1),                                   # the first death ever
    ([(10, 5, True), (12, 1, True)], 2),
    ([(10, 5, True), (12, 1, True), (15, 1, True)], 3),
    ([(10, 5, True), (12, 1, True), (200, 100, True)], 1),  # stayed up >= reset_after: reset
    ([(10, 5, True), (200, 100, True), (203, 2, True)], 2),  # counting starts again after the reset
    ([(10, 5, True), (12, 1, True), (200, 100, False)], 3),  # long up but never confirmed: no reset
    ([(10, 59.9, True), (12, 1, True)], 2),                 # just short of reset_after
    ([(10, 60, True), (12, 1, True)], 2),                   # exactly reset_after resets (>=) ...
    ([(70, 60, True)], 1),
])
def test_restart_attempt(history, attempt):
    infos = [death(t, up=up, ok=ok) for t, up, ok in history]
    assert restart_attempt(CFG, infos) == attempt


def test_requested_restart_starts_counting_afresh():
    infos = [death(10), death(12), death(14, cause=Cause.RESTART), death(15)]
    assert restart_attempt(CFG, infos) == 2


@pytest.mark.parametrize("up, ok, stable", [
    (100, True, True), (100, False, False), (59, True, False), (60, True, True),
])
def test_is_stable(up, ok, stable):
    assert is_stable(CFG, death(1000, up=up, ok=ok)) is stable


# -- crash-loop limit ---------------------------------------------------------------------

@pytest.mark.parametrize("deaths, now, counted", [
    ([10, 20, 30], 30, 3),
    ([10, 20, 30], 75, 2),            # the death at 10 is out of the 60 s window ending at 75
    ([10, 20, 30], 70, 2),            # window is (now-60, now]
    ([10, 20, 30], 200, 0),
])
def test_deaths_in_window(deaths, now, counted):
    assert deaths_in_window(CFG, [death(t) for t in deaths], now) == counted


def test_requested_stops_do_not_count_toward_the_crash_loop():
    infos = [death(10, cause=Cause.STOP), death(11, cause=Cause.RESTART), death(12)]
    assert deaths_in_window(CFG, infos, 12) == 1


# -- the decision -------------------------------------------------------------------------

@pytest.mark.parametrize("deaths, action, delay, attempt", [
    # died_at times of consecutive short runs (1 s each); max 5 deaths in 60 s
    ([100], Action.RESTART, 0.0, 1),
    ([100, 101], Action.RESTART, 1.0, 2),
    ([100, 101, 103], Action.RESTART, 2.0, 3),
    ([100, 101, 103, 106], Action.RESTART, 4.0, 4),
    ([100, 101, 103, 106, 111], Action.GIVE_UP, 0.0, 0),     # the 5th death within 60 s
    ([10, 40, 100, 130, 170], Action.RESTART, 8.0, 5),        # 5 deaths, never 5 within 60 s
])
def test_decide_backs_off_then_gives_up(deaths, action, delay, attempt):
    infos = [death(t) for t in deaths]
    d = decide(EXIT_CFG, infos, deaths[-1], mid)
    assert (d.action, d.delay, d.attempt) == (action, pytest.approx(delay), attempt)
    if action is Action.GIVE_UP:
        assert d.exit_code == ExitCode.GAVE_UP
        assert d.reason == "5 deaths within 1m, restart.crash_loop.max_deaths is 5"


@pytest.mark.parametrize("action, decided, exit_code", [
    ("cooldown", Action.COOLDOWN, ExitCode.OK),     # the default: the supervisor stays and tries again
    ("exit", Action.GIVE_UP, ExitCode.GAVE_UP),
    ("stay", Action.GIVE_UP, ExitCode.GAVE_UP),
])
def test_the_crash_loop_action_decides_between_cooldown_and_giving_up(action, decided, exit_code):
    c = cfg(crash_loop={"action": action})
    d = decide(c, [death(t) for t in (100, 101, 103, 106, 111)], 111, mid)
    assert (d.action, d.exit_code, d.deaths) == (decided, exit_code, 5)
    assert d.reason == "5 deaths within 1m, restart.crash_loop.max_deaths is 5"


@pytest.mark.parametrize("cooldown, maximum, number, expected", [
    (300, 3600, 1, 300),            # defaults: 5m, 10m, 20m, 40m, then 1h for good
    (300, 3600, 2, 600),
    (300, 3600, 3, 1200),
    (300, 3600, 4, 2400),
    (300, 3600, 5, 3600),
    (300, 3600, 6, 3600),
    (300, 3600, 10_000, 3600),      # no overflow however long the streak
    (300, 3600, 0, 300),            # never shorter than the first
    (2, 2, 7, 2),                   # maximum == cooldown: no doubling
    (0.5, 1.5, 3, 1.5),
])
def test_cooldown_doubles_up_to_its_maximum(cooldown, maximum, number, expected):
    c = dataclasses.replace(CFG.crash_loop, cooldown=cooldown, cooldown_max=maximum)
    assert cooldown_duration(c, number) == pytest.approx(expected)


@pytest.mark.parametrize("before, info, after", [
    (0, death(100), 0),
    (3, death(100), 3),                                   # a short run: the streak goes on
    (3, death(100, up=59.0), 3),                          # just short of backoff.reset_after (1m)
    (3, death(100, up=60.0), 0),                          # a stable run resets it
    (3, death(100, up=600.0, ok=False), 3),               # never confirmed (okay_delay): not stable
    (3, death(100, up=0.5, cause=Cause.STOP), 0),         # a requested stop/restart starts afresh
    (3, death(100, up=0.5, sig=KILL, cause=Cause.RESTART), 0),
])
def test_cooldowns_in_a_row_reset_after_a_stable_run(before, info, after):
    assert cooldowns_in_a_row(CFG, before, info) == after


def test_decide_numbers_cooldowns_and_their_length_from_the_streak():
    infos = [death(t) for t in (100, 101, 103, 106, 111)]
    first = decide(CFG, infos, 111, mid)
    third = decide(CFG, infos, 111, mid, cooldowns=2)
    assert (first.action, first.delay, first.attempt) == (Action.COOLDOWN, 300.0, 1)
    assert (third.action, third.delay, third.attempt) == (Action.COOLDOWN, 1200.0, 3)
    assert third.describe() == ("crash-loop cooldown #3: next try in 20m (5 deaths within 1m, "
                                "restart.crash_loop.max_deaths is 5)")


@pytest.mark.parametrize("seconds, text", [
    (0, "0s"), (0.2, "1s"), (45, "45s"), (59.5, "1m00s"), (252, "4m12s"), (300, "5m00s"), (3600, "1h00m00s"),
    (3725, "1h02m05s"), (-3, "0s"),
])
def test_format_wait_rounds_up_to_whole_seconds(seconds, text):
    assert format_wait(seconds) == text


def test_max_deaths_zero_never_gives_up():
    c = cfg(crash_loop={"max_deaths": 0})
    infos = [death(t) for t in range(100, 200)]
    assert decide(c, infos, 199, mid).action is Action.RESTART


@pytest.mark.parametrize("info, action, exit_code", [
    (death(10, code=0), Action.STOP, ExitCode.OK),               # on-failure: a clean exit stays stopped
    (death(10, code=66), Action.STOP, ExitCode.FAILED),          # do-not-restart: supervisor fails too
    (death(10, code=0, cause=Cause.STOP), Action.STOP, ExitCode.OK),
    (death(10, sig=KILL, cause=Cause.RESTART), Action.RESTART, ExitCode.OK),
])
def test_decide_stop_exit_codes(info, action, exit_code):
    d = decide(CFG, [info], 10, mid)
    assert (d.action, d.exit_code) == (action, exit_code)


def test_requested_restart_is_immediate_and_not_limited():
    infos = [death(t) for t in (100, 101, 102, 103)] + [death(104, sig=KILL, cause=Cause.RESTART)]
    d = decide(CFG, infos, 104, high)
    assert (d.action, d.delay) == (Action.RESTART, 0.0)


def test_stopping_supervisor_never_restarts():
    d = decide(CFG, [death(10, sig=SEGV)], 10, mid, stopping=True)
    assert (d.action, d.exit_code) == (Action.STOP, ExitCode.OK)


def test_decision_describe():
    assert decide(CFG, [death(100)], 100, mid).describe() == \
        "restart #1 at once (restart.policy is on-failure and the daemon exited with a failure code)"


def test_prune_keeps_what_decisions_need():
    infos = [death(t) for t in range(0, 50)] + [death(200, up=100)] + [death(t) for t in (201, 202)]
    pruned = prune_history(CFG, infos, 202)
    assert restart_attempt(CFG, pruned) == restart_attempt(CFG, infos)
    assert deaths_in_window(CFG, pruned, 202) == deaths_in_window(CFG, infos, 202)
    assert len(pruned) == 3
