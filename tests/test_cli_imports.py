"""Import budget of the commands users and orchestrators poll: which modules a command loads.

Neutron VPNaaS and Open vSwitch run `ipsec status` for every router on every sync, so the
polled paths import only what they use (bench/bench_cli.py measures the time). These tests
guard the module sets, not times, so a heavy import at a module's top shows up here at once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig

import pytest

from supervisor import cli, commands
from test_ipsec_cli import fake  # noqa: F401 - the fixture: a supervisor.yaml running the fake daemon

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Never needed to answer a status or print help: kernel code, VICI, the YAML parser when no
# file is read, logging, subprocesses, the recovery and supervision machinery; argparse only for
# `ipsec-supervisor` (`ipsec status [NAME] [--json]` is parsed without it).
HEAVY = ("yaml", "logging", "subprocess", "typing", "psutil", "pyroute2", "vici", "tempfile", "platform",
         "shutil", "pathlib", "urllib", "ipaddress", "importlib.metadata", "email", "argparse", "gettext",
         "supervisor.kernel", "supervisor.kernel_state", "supervisor.snapshot", "supervisor.ledger",
         "supervisor.ownership", "supervisor.reconcile", "supervisor.recovery", "supervisor.adopt",
         "supervisor.starter", "supervisor.eventloop", "supervisor.legacy", "supervisor.crashreport",
         "supervisor.policy", "supervisor.frontend.progress", "supervisor.atomicfile")

CHILD = """
import contextlib, io, json, sys
from supervisor import config
config.DEFAULT_PATH = sys.argv[1]           # no configuration file: built-in defaults
from supervisor.{module} import main
out = io.StringIO()
with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
    try:
        rc = main(json.loads(sys.argv[2]))
    except SystemExit as exc:
        rc = exc.code
print(json.dumps({{"rc": rc, "modules": sorted(sys.modules)}}))
"""


def imported_by(module: str, argv: list[str], tmp_path, env: dict | None = None) -> tuple[int, set[str]]:
    """(exit code, modules loaded) of ``supervisor.MODULE.main(ARGV)`` in a fresh interpreter.

    Without site (-S): this checkout's editable install loads an import hook at every start that
    imports pathlib, re, urllib and more, which would hide them here; an installed package has none."""
    e = {k: v for k, v in os.environ.items() if k != "IPSEC_SUPERVISOR_CONFIG"}
    e["PYTHONPATH"] = os.pathsep.join([ROOT, sysconfig.get_path("purelib"), sysconfig.get_path("platlib")])
    e.update(env or {})
    r = subprocess.run([sys.executable, "-S", "-c", CHILD.format(module=module), str(tmp_path / "absent.yaml"),
                        json.dumps(argv)], cwd=ROOT, capture_output=True, text=True, env=e, timeout=60)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout.splitlines()[-1])
    return doc["rc"], set(doc["modules"])


# Light parts of heavy packages: which network namespace this is decides the default run directory.
LIGHT = {"supervisor.kernel", "supervisor.kernel.netns"}


def heavy_in(modules: set[str], allowed: tuple[str, ...] = ()) -> list[str]:
    return sorted(m for m in modules - LIGHT for h in HEAVY
                  if (m == h or m.startswith(h + ".")) and not any(m == a or m.startswith(a + ".") for a in allowed))


def run_dir_config(tmp_path) -> str:
    path = tmp_path / "supervisor.yaml"
    path.write_text(f"paths:\n  run_dir: {tmp_path}/run\n  state_dir: {tmp_path}/state\n"
                    f"daemon:\n  pid_file: {tmp_path}/charon.pid\n  vici_socket: {tmp_path}/charon.vici\n")
    return str(path)


@pytest.mark.parametrize("argv", [["--piddir"], ["--help"], ["up", "home"], ["listall"]],
                         ids=["piddir", "help", "up-charon-down", "listall-charon-down"])
def test_polled_ipsec_commands_import_nothing_heavy(argv, tmp_path):
    rc, modules = imported_by("ipsec_cli", argv, tmp_path)
    assert heavy_in(modules) == []


def test_ipsec_status_of_a_supervisor_that_is_not_running_imports_nothing_heavy(tmp_path):
    rc, modules = imported_by("ipsec_cli", ["--config", run_dir_config(tmp_path), "status"], tmp_path)
    assert rc == 3                                  # not started
    assert heavy_in(modules) == []                  # a plain supervisor.yaml: no PyYAML (plainyaml)
    rc, modules = imported_by("ipsec_cli", ["statusall"], tmp_path)       # no file: no YAML parser either
    assert heavy_in(modules) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_ipsec_status_of_a_running_supervisor_forwarding_to_charon_imports_nothing_heavy(fake, tmp_path):
    """What Neutron polls: the supervisor answers, charon runs, the status is forwarded to a helper."""
    s = fake(overrides={"daemon": {"load_commands": []}})      # the rest of its file is plain YAML
    assert s.ipsec("start").returncode == 0
    rc, modules = imported_by("ipsec_cli", ["--config", s.config, "status"], tmp_path)
    assert rc == 0
    assert heavy_in(modules) == []


def test_a_configuration_beyond_plain_yaml_is_still_read_by_pyyaml(tmp_path):
    path = tmp_path / "supervisor.yaml"
    path.write_text(f"paths: {{run_dir: {tmp_path}/run, state_dir: {tmp_path}/state}}\n")     # a flow mapping
    rc, modules = imported_by("ipsec_cli", ["--config", str(path), "status"], tmp_path)
    assert rc == 3 and "yaml" in modules
    assert heavy_in(modules, allowed=("yaml",)) == []


def test_ipsec_supervisor_help_registers_every_command_without_kernel_or_legacy_code(tmp_path):
    rc, modules = imported_by("cli", ["--help"], tmp_path)
    assert rc == 0
    assert heavy_in(modules, allowed=("logging", "typing", "argparse", "gettext")) == []
    assert {f"supervisor.commands.{m}" for m in commands.MODULE_OF.values()} <= modules


@pytest.mark.parametrize("command", sorted(commands.MODULE_OF))
def test_a_command_imports_only_its_own_command_module(command, tmp_path):
    rc, modules = imported_by("cli", [command, "--help"], tmp_path)
    assert rc == 0
    loaded = {m.rsplit(".", 1)[1] for m in modules if m.startswith("supervisor.commands.")}
    assert loaded == {commands.MODULE_OF[command]}
    assert heavy_in(modules, allowed=("logging", "typing", "argparse", "gettext")) == []


def test_the_command_table_names_the_module_that_registers_each_command():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.choices and isinstance(a.choices, dict))
    registered = {name: p.get_default("func").__module__.rsplit(".", 1)[1] for name, p in sub.choices.items()}
    assert registered == commands.MODULE_OF


def test_help_defaults_equal_the_constants_of_the_modules_that_own_them():
    from supervisor import kernel_state
    from supervisor.config import default_config
    from supervisor.ledger import ledger_path
    from supervisor.legacy import ipsec_conf, loader, secrets, translate
    assert (commands.ROUTE_TABLE, commands.RULE_PRIORITY) == (kernel_state.DEFAULT_ROUTE_TABLE,
                                                              kernel_state.DEFAULT_RULE_PRIORITY)
    assert commands.RUN_DIR == default_config().paths.run_dir
    assert commands.LEDGER == ledger_path(commands.RUN_DIR)
    assert (commands.IPSEC_CONF, commands.IPSEC_SECRETS, commands.IPSEC_DIR) == (
        ipsec_conf.DEFAULT_IPSEC_CONF, secrets.DEFAULT_IPSEC_SECRETS, translate.DEFAULT_IPSEC_DIR)
    assert (commands.VICI_SOCKET, commands.LOAD_TIMEOUT, commands.LOAD_MODES) == (
        loader.DEFAULT_VICI_SOCKET, loader.DEFAULT_TIMEOUT, loader.MODES)


def test_a_configuration_with_a_syntax_error_is_reported_as_before(tmp_path):
    """libyaml composes the file; a syntax error is still worded by the pure-Python parser."""
    from supervisor.config import ConfigError, parse_config
    with pytest.raises(ConfigError, match=r"^cannot parse x.yaml \(line 3 column 4\): mapping values are not "
                                          r"allowed here$"):
        parse_config("daemon:\n- a\n  b: [", "x.yaml")


@pytest.mark.parametrize("columns", [None, "", "0", "-3", "wide", "57", "200"])
def test_the_parsers_measure_the_terminal_as_shutil_does(columns, monkeypatch):
    """argparser.Parser passes argparse the width shutil would give it, without importing shutil."""
    import shutil

    from supervisor.argparser import terminal_columns
    if columns is None:
        monkeypatch.delenv("COLUMNS", raising=False)
    else:
        monkeypatch.setenv("COLUMNS", columns)
    assert terminal_columns() == shutil.get_terminal_size().columns


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_ipsec_status_of_an_answering_supervisor_never_reads_the_kernels_lock_table(fake, monkeypatch):
    """/proc/locks' first read in a process waits 10-25 ms for the kernel: only a silent supervisor needs it."""
    from supervisor import runlock
    from supervisor.config import load_config
    from supervisor.frontend import lifecycle
    s = fake()
    assert s.ipsec("start").returncode == 0
    asked = []
    real = runlock.find_lock_holder

    def spy(run_dir, proc="/proc", **kw):
        asked.append(kw.get("pid", True))
        return real(run_dir, proc, **kw)
    monkeypatch.setattr(lifecycle, "find_lock_holder", spy)
    found = lifecycle.locate(load_config(s.config))
    assert found.status is not None and found.running and found.pid == s.pid()
    assert asked == [False]


@pytest.mark.parametrize("argv", [
    [], ["home"], ["home", "x", "y"], ["--json"], ["home", "--json"], ["--json", "home", "x"], ["home", "x", "--json"],
    ["--config", "/etc/s.yaml"], ["--config", "/etc/s.yaml", "home", "--json"], ["home", "--json", "x"],
    ["--config"], ["--config", "-x"], ["--config", ""], ["--config", "a", "--config", "b"], ["--config=/a"],
    ["--js"], ["-h"], ["--help"], ["--", "home"], ["-"], [""], ["home", ""], ["--json", "--json"], ["-x", "home"],
    ["home", "--config", "/a", "x"], ["--bogus"],
])
def test_ipsec_status_parses_the_polled_forms_without_argparse_as_argparse_does(argv):
    from supervisor import ipsec_cli
    from supervisor.errors import SupervisorError
    plain = ipsec_cli.plain_status_args(argv)
    try:
        parsed = vars(ipsec_cli._status_parser("status").parse_args(argv))
    except (SupervisorError, SystemExit):
        parsed = None               # a usage error, or --help: argparse's own output
    if plain is not None:
        assert vars(plain) == parsed
    assert plain is not None or argv not in ([], ["home"], ["--json"], ["home", "--json"],
                                             ["--config", "/etc/s.yaml", "home", "--json"])
