"""Every command that prints, of ``ipsec-supervisor`` and of ``ipsec``: an output that cannot be written
(a closed standard output, a full disk, an encoding without a character) is one line on stderr,
"PROGRAM: cannot write the output: WHY", and exit 1; never a traceback, never the interpreter's
"Exception ignored" at its exit. (tests/test_cli_plain.py holds the snapshot commands to the same.)
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from test_ipsec_cli import fake  # noqa: F401 - the fixture: a supervisor.yaml running the fake daemon

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUPERVISOR = [sys.executable, "-m", "supervisor.cli"]
IPSEC = [sys.executable, "-m", "supervisor.ipsec_cli"]
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

UNWRITABLE = {"/dev/full": ">/dev/full", "closed": ">&-"}
WHY = {"/dev/full": "No space left on device", "closed": "standard output is closed"}


def run_into(stdout: str, argv: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    """ARGV run with its standard output STDOUT ("/dev/full" or "closed"), stderr captured."""
    shell = f'exec "$@" {UNWRITABLE[stdout]}'
    return subprocess.run(["sh", "-c", shell, "sh", *argv], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def assert_one_line(r: subprocess.CompletedProcess, program: str, why: str) -> None:
    assert (r.returncode, r.stderr) == (1, f"{program}: cannot write the output: {why}\n"), (r.returncode, r.stderr)


@pytest.fixture
def files(tmp_path):
    """A configuration (metrics from a textfile) and an ipsec.conf with a conn: commands with output."""
    (tmp_path / "metrics.prom").write_text("# HELP up Up.\n# TYPE up gauge\nup 1\n")
    config = tmp_path / "supervisor.yaml"
    config.write_text(f"paths:\n  run_dir: {tmp_path}/run\n  state_dir: {tmp_path}/state\n"
                      f"metrics:\n  textfile: {tmp_path}/metrics.prom\n")
    (tmp_path / "ipsec.conf").write_text("conn home\n  left=192.0.2.1\n  right=192.0.2.2\n  auto=add\n")
    return {"config": str(config), "conf": str(tmp_path / "ipsec.conf"), "dir": str(tmp_path)}


HOST_COMMANDS = {
    "help": ["--help"], "version": ["--version"], "command-help": ["snapshot", "show", "--help"],
    "crashes": ["crashes", "--config", "{config}"],
    "crashes-json": ["crashes", "--json", "--config", "{config}"],
    "check-config": ["run", "--check-config", "--config", "{config}"],
    "metrics": ["metrics", "--config", "{config}"],
    "metrics-json": ["metrics", "--json", "--config", "{config}"],
    "load-ipsec-conf-dry-run": ["load-ipsec-conf", "--dry-run", "--no-secrets", "--file", "{conf}"],
    "load-ipsec-conf-dry-run-json": ["load-ipsec-conf", "--dry-run", "--json", "--no-secrets", "--file", "{conf}"],
}


@pytest.mark.parametrize("stdout", sorted(UNWRITABLE))
@pytest.mark.parametrize("command", sorted(HOST_COMMANDS))
def test_ipsec_supervisor_commands_that_print_say_why_their_output_failed(files, command, stdout):
    argv = [a.format(**files) for a in HOST_COMMANDS[command]]
    assert subprocess.run(SUPERVISOR + argv, cwd=ROOT, capture_output=True).returncode == 0     # (it prints)
    assert_one_line(run_into(stdout, SUPERVISOR + argv), "ipsec-supervisor", WHY[stdout])


KERNEL_COMMANDS = {
    "leftovers": ["leftovers"], "leftovers-json": ["leftovers", "--json"],
    "flush-dry-run": ["flush", "--dry-run"], "flush-dry-run-json": ["flush", "--dry-run", "--json"],
    "flush": ["flush"], "flush-json": ["flush", "--json"],
    "reconcile": ["reconcile", "--dry-run", "--config", "{config}"],
    "reconcile-json": ["reconcile", "--dry-run", "--json", "--config", "{config}"],
}


@root_only
@pytest.mark.parametrize("stdout", sorted(UNWRITABLE))
@pytest.mark.parametrize("command", sorted(KERNEL_COMMANDS))
def test_kernel_state_commands_say_why_their_output_failed(files, netns, command, stdout):
    argv = [a.format(**files) for a in KERNEL_COMMANDS[command]] + ["--netns", netns.name, "--no-ledger"]
    assert_one_line(run_into(stdout, SUPERVISOR + argv), "ipsec-supervisor", WHY[stdout])


@root_only
@pytest.mark.parametrize("stdout", sorted(UNWRITABLE))
def test_status_of_a_running_supervisor_says_why_its_output_failed(fake, stdout):  # noqa: F811
    s = fake()
    assert s.ipsec("start").returncode == 0
    for argv in (SUPERVISOR + ["status", "--config", s.config], SUPERVISOR + ["status", "--json", "--config", s.config],
                 IPSEC + ["--config", s.config, "status"], IPSEC + ["--config", s.config, "statusall"],
                 IPSEC + ["--config", s.config, "status", "--json"]):
        program = "ipsec" if argv[:3] == IPSEC else "ipsec-supervisor"
        assert_one_line(run_into(stdout, argv), program, WHY[stdout])


IPSEC_COMMANDS = {
    "no-command": [], "help": ["--help"], "versioncode": ["--versioncode"], "piddir": ["--piddir"],
    "version": ["version"], "status": ["status"], "statusall": ["statusall"], "status-json": ["status", "--json"],
    "snapshots": ["snapshots"], "snapshots-json": ["snapshots", "--json"], "start-help": ["start", "--help"],
}


@pytest.mark.parametrize("stdout", sorted(UNWRITABLE))
@pytest.mark.parametrize("command", sorted(IPSEC_COMMANDS))
def test_ipsec_commands_that_print_say_why_their_output_failed(files, command, stdout):
    argv = IPSEC + ["--config", files["config"]] + IPSEC_COMMANDS[command]
    assert subprocess.run(argv, cwd=ROOT, capture_output=True).stdout        # (it prints)
    assert_one_line(run_into(stdout, argv), "ipsec", WHY[stdout])


@pytest.mark.parametrize("stdout", sorted(UNWRITABLE))
def test_ipsec_commands_run_by_ipsec_supervisor_say_it_the_same_way(files, stdout):
    argv = IPSEC + ["--config", files["config"], "crashes"]
    assert_one_line(run_into(stdout, argv), "ipsec-supervisor", WHY[stdout])


def test_an_encoding_without_a_character_is_named_by_every_program(tmp_path):
    odd = tmp_path / "état"
    config = tmp_path / "supervisor.yaml"
    config.write_text(f"paths:\n  run_dir: {tmp_path}/run\n  state_dir: {odd}\n")
    why = "standard output encodes ascii, which has no U+00E9 '\\xe9' (PYTHONIOENCODING=utf-8 has)"
    for argv, program in ((SUPERVISOR + ["crashes", "--config", str(config)], "ipsec-supervisor"),
                          (IPSEC + ["--config", str(config), "snapshots"], "ipsec")):
        r = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONIOENCODING": "ascii"})
        assert_one_line(r, program, why)


def test_a_command_that_prints_nothing_does_not_mind_a_closed_output(tmp_path):
    # ipsec up/down/list* forward to charon's helpers: with charon down, only stderr says so
    config = tmp_path / "supervisor.yaml"
    config.write_text(f"paths:\n  run_dir: {tmp_path}/run\n  state_dir: {tmp_path}/state\n"
                      f"daemon:\n  pid_file: {tmp_path}/charon.pid\n")
    r = run_into("closed", IPSEC + ["--config", str(config), "listall"])
    assert r.returncode == 7 and "charon is not running" in r.stderr and "Traceback" not in r.stderr
