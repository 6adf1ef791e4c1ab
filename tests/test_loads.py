"""Which load runs when: a pure decision of configuration, trigger and what this charon already got."""

from __future__ import annotations

import pytest

from supervisor.config import SWANCTL_LOAD_ALL, parse_config
from supervisor.loads import (LoadOutcome, LoadPlan, choose_load, load_answer, merge_triggers, restarting_answer,
                              split_daemon_keys, state_path)

STATE = "/run/ipsec-supervisor/ipsec-conf.4242.state"


def cfg(kind: str = "auto", **daemon):
    extra = "".join(f", {k}: {v}" for k, v in daemon.items())
    return parse_config(f"daemon: {{config: {kind}, ipsec_conf: /etc/ipsec.conf{extra}}}")


# (daemon.config, trigger, ipsec.conf defines a conn now, this charon got a load from it) -> (source, mode)
@pytest.mark.parametrize("kind, trigger, defines, loaded, source, mode", [
    # auto: the file decides at every load, not once at start (Open vSwitch starts with no conn)
    ("auto", "start", False, False, "swanctl", None),
    ("auto", "start", True, False, "ipsec.conf", "load"),
    ("auto", "update", True, False, "ipsec.conf", "load"),      # first conn after a swanctl start
    ("auto", "reload", True, False, "ipsec.conf", "load"),
    ("auto", "update", True, True, "ipsec.conf", "update"),
    ("auto", "reload", True, True, "ipsec.conf", "update"),
    ("auto", "update", False, True, "ipsec.conf", "update"),    # all conns gone: the update unloads them
    ("auto", "update", False, False, "swanctl", None),
    # fixed kinds ignore what the file defines
    ("swanctl", "update", True, True, "swanctl", None),
    ("ipsec.conf", "start", False, False, "ipsec.conf", "load"),
    ("ipsec.conf", "update", False, False, "ipsec.conf", "load"),
    ("ipsec.conf", "update", False, True, "ipsec.conf", "update"),
])
def test_the_load_source_and_mode_are_decided_at_every_load(kind, trigger, defines, loaded, source, mode):
    plan = choose_load(cfg(kind), trigger, defines_conns=defines, loaded_from_ipsec_conf=loaded, state_file=STATE)
    assert (plan.source, plan.mode) == (source, mode), plan.why
    if source == "swanctl":
        assert plan.commands == (SWANCTL_LOAD_ALL,)
    else:
        (argv,) = plan.commands
        assert argv[argv.index("--mode") + 1] == mode and argv[argv.index("--state") + 1] == STATE


def test_configured_commands_win_and_reload_commands_default_to_the_load_commands():
    c = cfg("auto", load_commands="[[/bin/true]]")
    assert choose_load(c, "start", defines_conns=True, loaded_from_ipsec_conf=False,
                       state_file=STATE).commands == (("/bin/true",),)
    assert choose_load(c, "reload", defines_conns=True, loaded_from_ipsec_conf=True,
                       state_file=STATE).commands == (("/bin/true",),)
    c = cfg("auto", load_commands="[[/bin/true]]", reload_commands="[[/bin/false]]")
    assert choose_load(c, "update", defines_conns=False, loaded_from_ipsec_conf=False,
                       state_file=STATE).commands == (("/bin/false",),)


def test_the_loader_record_is_named_after_the_charon_it_describes():
    assert state_path("/run/x", 4242) == "/run/x/ipsec-conf.4242.state"


@pytest.mark.parametrize("triggers, merged", [
    (["update"], "update"), (["update", "update"], "update"), (["update", "reload"], "reload"), (["reload"], "reload"),
])
def test_requests_that_wait_for_a_load_merge_into_one(triggers, merged):
    assert merge_triggers(triggers) == merged


def outcome(ok=True, error=None, refused=()):
    plan = LoadPlan("update", "ipsec.conf", "update", (("x",),), "why")
    return LoadOutcome(plan, ok, error, tuple(refused), "2026-12-05T00:00:00+00:00")


def test_answers_say_what_was_loaded_what_was_refused_and_why_a_load_failed():
    assert load_answer(outcome(), "control socket") == {
        "ok": True, "message": "configuration loaded (ipsec.conf, update)", "load": outcome().to_json()}
    a = load_answer(outcome(refused=["broken: failed: invalid proposal"]), "SIGHUP")
    assert a["ok"] and "charon refused 1 conn(s), the others are loaded" in a["message"]
    a = load_answer(outcome(ok=False, error="x exited with code 3: syntax error"), "control socket")
    assert not a["ok"] and a["error"] == ("control socket: loading the configuration failed: "
                                          "x exited with code 3: syntax error")
    a = restarting_answer("charon", "reload", "backoff")
    assert a["ok"] and a["deferred"] and "the new charon loads the current configuration" in a["message"]


def test_changed_daemon_keys_split_into_next_start_and_next_load():
    at_start, at_load = split_daemon_keys(["daemon.command", "daemon.config", "daemon.log_lines", "restart.policy",
                                           "daemon.ipsec_conf"])
    assert at_start == ["daemon.command"] and at_load == ["daemon.config", "daemon.ipsec_conf"]
