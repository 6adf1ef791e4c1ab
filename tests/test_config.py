"""Configuration: durations, defaults == etc/supervisor.yaml, validation messages with key, rule, value, line."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import yaml

from supervisor import config as C
from supervisor.loads import choose_load
from supervisor.config import (BUILTIN, ENV_VAR, Config, Hook, all_keys, default_config, flatten, format_duration,
                               load_config, parse_config, parse_duration)
from supervisor.errors import ConfigError, ExitCode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ETC = os.path.join(ROOT, "etc", "supervisor.yaml")


def errors_of(text: str, source: str = "/etc/t.yaml") -> str:
    with pytest.raises(ConfigError) as exc:
        parse_config(textwrap.dedent(text), source)
    assert exc.value.exit_code == ExitCode.CONFIG
    return str(exc.value)


# -- durations ------------------------------------------------------------------------------

@pytest.mark.parametrize("value, seconds", [
    (0, 0.0), (10, 10.0), (1.5, 1.5), ("250ms", 0.25), ("30s", 30.0), ("2m", 120.0), ("1h", 3600.0),
    ("1m30s", 90.0), (" 5 s ", 5.0), ("0.5s", 0.5), ("1.5m", 90.0), ("3", 3.0), (".5s", 0.5),
])
def test_parse_duration(value, seconds):
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["5x", "s", "", "ms5", "1 minute", True, None, [1], "nan", "inf", "-1s", "1s 2"])
def test_parse_duration_rejects(value):
    with pytest.raises(ValueError):
        parse_duration(value)


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (0.25, "250ms"), (30, "30s"), (120, "2m"), (90, "90s"),
                                           (1.5, "1.5s")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text
    assert parse_duration(text) == seconds


# -- defaults -------------------------------------------------------------------------------

def test_builtin_defaults_equal_the_documented_file():
    with open(ETC) as fh:
        documented = parse_config(fh.read(), ETC)
    assert documented == default_config()
    assert flatten(documented) == flatten(default_config())


def test_documented_file_shows_every_key():
    with open(ETC) as fh:
        data = yaml.safe_load(fh)

    def keys(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict) and k != "environment":
                yield from keys(v, f"{prefix}{k}.")
            else:
                yield prefix + k
    assert sorted(keys(data)) == sorted(all_keys())


def test_empty_file_means_defaults():
    assert parse_config("", "x") == default_config()
    assert parse_config("# only a comment\n", "x") == default_config()
    assert parse_config("restart:\n  backoff:\n", "x") == default_config()


def test_default_is_charon_with_swanctl_loading_and_adopt_recovery(tmp_path):
    cfg = default_config()
    assert cfg.daemon.command == ("/usr/lib/ipsec/charon",)
    assert cfg.daemon.config == "auto" and cfg.daemon.load_commands is None
    # A stock Debian ipsec.conf has no conn: auto means swanctl.
    stock = tmp_path / "ipsec.conf"
    stock.write_text("config setup\n  # charondebug=\"ike 2\"\n\n#conn sample\n#  left=%any\n")
    cfg = parse_config(f"daemon: {{ipsec_conf: {stock}}}")
    assert cfg.config_kind == "swanctl"
    assert cfg.effective_load_commands == (("/usr/sbin/swanctl", "--load-all", "--noprompt"),)
    assert choose_load(cfg, "reload", defines_conns=False, loaded_from_ipsec_conf=False,
                       state_file="/s").commands == cfg.effective_load_commands
    assert cfg.effective_daemon_command == ("/usr/lib/ipsec/charon",)
    assert cfg.recovery.mode == "adopt"
    assert cfg.restart.prevent_exit_codes == (64, 65, 66)
    assert cfg.crash_dir == "/var/lib/ipsec-supervisor/crashes"


def test_values_are_parsed():
    cfg = parse_config(textwrap.dedent("""\
        daemon:
          command: [/usr/sbin/charon-systemd]
          pid_file: null
          environment: {STRONGSWAN_CONF: /etc/x.conf, N: 3}
          start_timeout: 2500ms
          reload_commands: [[/bin/true], [/bin/echo, 1]]
        restart:
          policy: always
          prevent_exit_codes: [66, 64, 66]
          backoff: {initial: 1s, step: 2s, maximum: 1m, jitter: 0}
        stop: {signal: int}
        hooks:
          on_crash:
            - [/usr/bin/logger, crashed]
            - {command: [/bin/mail, root], timeout: 2s}
        """), "f")
    assert cfg.daemon.pid_file is None
    assert cfg.daemon.environment == (("N", "3"), ("STRONGSWAN_CONF", "/etc/x.conf"))
    assert cfg.daemon.start_timeout == 2.5
    assert choose_load(cfg, "reload", defines_conns=False, loaded_from_ipsec_conf=False,
                       state_file="/s").commands == (("/bin/true",), ("/bin/echo", "1"))
    assert cfg.restart.prevent_exit_codes == (64, 66)
    assert cfg.restart.backoff.maximum == 60
    assert cfg.stop.signal == "SIGINT"
    assert cfg.hooks.resolved("on_crash") == (Hook(("/usr/bin/logger", "crashed"), 10.0),
                                              Hook(("/bin/mail", "root"), 2.0))
    assert cfg.source == "f"


# -- validation messages ------------------------------------------------------------------

def test_range_error_names_key_rule_value_and_line():
    msg = errors_of("""\
        restart:
          backoff:
            factor: 0.5
        """)
    assert msg == "invalid configuration /etc/t.yaml: restart.backoff.factor must be >= 1.0, not 0.5 " \
                  "(/etc/t.yaml line 3)"


@pytest.mark.parametrize("text, expected", [
    ("restart:\n  polcy: always\n", "restart.polcy is not a known key; did you mean restart.policy? (/etc/t.yaml line 2)"),
    ("restart:\n  factor: 2\n", "restart.factor is not a known key; did you mean restart.backoff.factor?"),
    ("helth:\n  interval: 1s\n", "helth is not a known key; did you mean health?"),
    ("daemon:\n  comand: [x]\n", "daemon.comand is not a known key; did you mean daemon.command?"),
    ("daemon:\n  start_timout: 1s\n", "did you mean daemon.start_timeout?"),
    ("zzz: 1\n", "zzz is not a known key (/etc/t.yaml line 1)"),
])
def test_unknown_keys_suggest_the_closest(text, expected):
    assert expected in errors_of(text)


@pytest.mark.parametrize("text, expected", [
    ("daemon:\n  start_timeout: soon\n",
     "daemon.start_timeout must be a duration (seconds, or a number with ms, s, m or h), not 'soon' (/etc/t.yaml line 2)"),
    ("daemon:\n  start_timeout: 0\n", "daemon.start_timeout must be > 0, not 0"),
    ("daemon:\n  command: /usr/lib/ipsec/charon\n",
     "daemon.command must be a command as a list of strings (no shell)"),
    ("daemon:\n  command: []\n", "daemon.command must be a non-empty list of strings, not a list"),
    ("daemon:\n  pid_file: run/charon.pid\n", "daemon.pid_file must be an absolute path, not 'run/charon.pid'"),
    ("daemon:\n  load_commands: [swanctl --load-all]\n",
     "daemon.load_commands item 1 must be a command as a list of strings"),
    ("daemon:\n  log_lines: -1\n", "daemon.log_lines must be >= 0, not -1"),
    ("daemon:\n  log_lines: 2.5\n", "daemon.log_lines must be an integer, not 2.5"),
    ("daemon:\n  environment: [A]\n", "daemon.environment must be a mapping of variable names to strings"),
    ("restart:\n  policy: sometimes\n",
     "restart.policy must be one of always, on-failure, on-crash, never, not 'sometimes' (/etc/t.yaml line 2)"),
    ("restart:\n  prevent_exit_codes: [64, 300]\n", "restart.prevent_exit_codes must be a list of exit codes (0-255), not 300"),
    ("restart:\n  backoff:\n    jitter: 1.5\n", "restart.backoff.jitter must be <= 1.0, not 1.5 (/etc/t.yaml line 3)"),
    ("restart:\n  backoff:\n    factor: yes\n", "restart.backoff.factor must be a number, not true"),
    ("restart:\n  crash_loop:\n    action: retry\n", "restart.crash_loop.action must be one of cooldown, exit, stay, not 'retry'"),
    ("restart:\n  crash_loop:\n    cooldown: 10m\n    cooldown_max: 1m\n",
     "restart.crash_loop.cooldown_max must be >= restart.crash_loop.cooldown (10m), not 1m (/etc/t.yaml line 4)"),
    ("restart:\n  crash_loop:\n    cooldown: 0\n", "restart.crash_loop.cooldown must be > 0"),
    ("health:\n  enabled: 1\n", "health.enabled must be true or false, not 1"),
    ("health:\n  failures: 0\n", "health.failures must be >= 1, not 0"),
    ("stop:\n  signal: SIGFOO\n", "stop.signal must be a signal name such as SIGTERM, not 'SIGFOO'"),
    ("hooks:\n  on_crash: [[/bin/true], {command: [/bin/x], timeout: never}]\n",
     "hooks.on_crash item 2 timeout must be a duration (seconds, or a number with ms, s, m or h), not 'never'"),
    ("hooks:\n  on_crash: [{cmd: [/bin/x]}]\n", "hooks.on_crash item 1 must have a command and optionally a timeout, not cmd"),
    ("paths:\n  run_dir: ~\n", "paths.run_dir must be set"),
    ("restart: 5\n", "restart must be a mapping, not 5 (/etc/t.yaml line 1)"),
    ("- a\n- b\n", "the file must be a mapping, not a list"),
])
def test_type_and_range_errors(text, expected):
    assert expected in errors_of(text)


@pytest.mark.parametrize("text, expected", [
    ("restart:\n  backoff:\n    step: 2s\n    maximum: 1s\n",
     "restart.backoff.maximum must be >= restart.backoff.step (2s), not 1s (/etc/t.yaml line 4)"),
    ("restart:\n  backoff:\n    initial: 5s\n",
     "restart.backoff.step must be >= restart.backoff.initial (5s), not 1s (/etc/t.yaml)"),
    ("restart:\n  force_exit_codes: [3, 66]\n",
     "restart.force_exit_codes must not repeat codes of restart.prevent_exit_codes, not 66 (/etc/t.yaml line 2)"),
    ("health:\n  interval: 1s\n  timeout: 2s\n", "health.timeout must be <= health.interval (1s), not 2s (/etc/t.yaml line 3)"),
    ("daemon:\n  vici_socket: null\n", "health.enabled must be false when daemon.vici_socket is null"),
])
def test_cross_key_rules(text, expected):
    assert expected in errors_of(text)


def test_every_problem_is_reported_at_once():
    msg = errors_of("""\
        restart:
          policy: sometimes
          backoff:
            factor: 0
        health:
          intervall: 1s
        """)
    assert msg.startswith("invalid configuration /etc/t.yaml (3 problems):\n")
    assert "line 2" in msg and "line 4" in msg and "line 6" in msg


def test_duplicate_keys_are_errors():
    msg = errors_of("stop:\n  timeout: 1s\n  timeout: 2s\n")
    assert "stop.timeout is given twice (first on line 2) (/etc/t.yaml line 3)" in msg


def test_yaml_syntax_error_names_line_and_column():
    msg = errors_of("restart:\n  policy: [always\n")
    assert msg.startswith("cannot parse /etc/t.yaml (line ")


# -- where the file comes from -------------------------------------------------------------

def test_missing_default_file_means_builtin_defaults(monkeypatch, tmp_path):
    monkeypatch.setattr(C, "DEFAULT_PATH", str(tmp_path / "absent.yaml"))
    cfg = load_config(None, environ={})
    assert cfg == default_config() and cfg.source == BUILTIN


def test_default_file_is_used_when_present(monkeypatch, tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("stop: {timeout: 3s}\n")
    monkeypatch.setattr(C, "DEFAULT_PATH", str(p))
    assert load_config(None, environ={}).stop.timeout == 3


def test_env_var_and_explicit_path(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("stop: {timeout: 1s}\n")
    b.write_text("stop: {timeout: 2s}\n")
    assert load_config(None, environ={ENV_VAR: str(a)}).stop.timeout == 1
    assert load_config(str(b), environ={ENV_VAR: str(a)}).stop.timeout == 2   # --config wins


def test_named_file_must_exist(tmp_path):
    with pytest.raises(ConfigError, match="does not exist .named by IPSEC_SUPERVISOR_CONFIG"):
        load_config(None, environ={ENV_VAR: str(tmp_path / "nope.yaml")})
    with pytest.raises(ConfigError, match="named by --config"):
        load_config(str(tmp_path / "nope.yaml"), environ={})


def test_run_exits_3_with_the_message(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("restart:\n  backoff:\n    factor: 0.5\n")
    r = subprocess.run([sys.executable, "-m", "supervisor.cli", "run", "--config", str(bad)],
                       capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert r.returncode == ExitCode.CONFIG == 3
    assert f"restart.backoff.factor must be >= 1.0, not 0.5 ({bad} line 3)" in r.stderr


def test_check_config_prints_effective_values(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("restart: {policy: always}\n")
    r = subprocess.run([sys.executable, "-m", "supervisor.cli", "run", "--check-config", "--config", str(good)],
                       capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert r.returncode == 0, r.stderr
    import json
    assert json.loads(r.stdout)["values"]["restart.policy"] == "always"


def test_config_is_immutable():
    cfg = Config()
    with pytest.raises(Exception):
        cfg.restart.policy = "never"  # type: ignore[misc]


def test_auto_picks_ipsec_conf_when_it_defines_a_conn_and_loads_it_over_vici(tmp_path):
    conf = tmp_path / "ipsec.conf"
    conf.write_text('config setup\n  charondebug="ike 2, knl 3"\n\n'
                    "conn home\n  left=192.0.2.1\n  right=192.0.2.2\n  authby=secret\n  auto=route\n")
    cfg = parse_config(f"daemon: {{ipsec_conf: {conf}, ipsec_secrets: null, vici_socket: /run/x.vici}}\n"
                       "paths: {run_dir: /run/t}")
    assert cfg.config_kind == "ipsec.conf"
    (load,) = cfg.effective_load_commands
    assert load[1:5] == ("-m", "supervisor.cli", "load-ipsec-conf", "--mode") and load[5] == "load"
    assert ["--file", str(conf)] == list(load[6:8]) and "--no-secrets" in load
    assert load[-2:] == ("--vici", "/run/x.vici")
    (reload,) = choose_load(cfg, "update", defines_conns=True, loaded_from_ipsec_conf=True,
                            state_file="/run/t/ipsec-conf.42.state").commands
    assert reload[5] == "update" and "/run/t/ipsec-conf.42.state" in reload
    assert cfg.effective_daemon_command == ("/usr/lib/ipsec/charon", "--debug-ike", "2", "--debug-knl", "3")
    # Explicit load commands win over daemon.config.
    cfg = parse_config(f"daemon: {{ipsec_conf: {conf}, load_commands: [[/bin/true]]}}")
    assert cfg.effective_load_commands == (("/bin/true",),)
    assert choose_load(cfg, "reload", defines_conns=True, loaded_from_ipsec_conf=True,
                       state_file="/s").commands == (("/bin/true",),)


def test_daemon_config_kind_is_validated():
    with pytest.raises(ConfigError, match=r"daemon\.config"):
        parse_config("daemon: {config: stroke}")
