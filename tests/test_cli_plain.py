"""The snapshot command's hand parser gives argparse's namespace, and the program's quick exit
loses no output and no exit code."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from supervisor import cli
from supervisor.commands import snapshot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CASES = [
    ["snapshot"], ["-v", "snapshot"], ["--verbose", "snapshot", "--json"],
    ["snapshot", "--netns", "ns1", "--output", "/tmp/f.json"], ["snapshot", "-o", "f", "--include-keys"],
    ["snapshot", "--route-table", "0x10", "--rule-priority", "7"], ["snapshot", "--route-table", " 5"],
    ["snapshot", "--route-table", "1_000"], ["snapshot", "-o", "show"], ["snapshot", "--netns", "diff"],
    ["snapshot", "show", "a.json"], ["snapshot", "show", "a.json", "--json"], ["snapshot", "show", "--json", "a"],
    ["snapshot", "show", "show"], ["snapshot", "diff", "a", "b"], ["-v", "snapshot", "diff", "--json", "a", "b"],
    ["snapshot", "diff", "a", "--json", "b"],
    # argparse's business (None from the hand parser): abbreviations, = forms, repeats, errors, help
    ["snapshot", "--out", "f"], ["snapshot", "--output=f"], ["snapshot", "-of"], ["snapshot", "--json", "--json"],
    ["snapshot", "--json", "show", "a"], ["snapshot", "--netns", ""], ["snapshot", "--route-table", "-5"],
    ["snapshot", "--route-table", "x"], ["snapshot", "--route-table", "4294967296"], ["snapshot", "-v"],
    ["-v", "-v", "snapshot"], ["snapshot", "show"], ["snapshot", "show", "a", "b"], ["snapshot", "diff", "a"],
    ["snapshot", "show", "-x"], ["snapshot", "show", "--", "-x"], ["snapshot", "show", "a", "--json", "--json"],
    ["snapshot", "--help"], ["snapshot", "show", "--help"], ["snapshot", "--netns"], ["snapshot", "extra"],
]


@pytest.mark.parametrize("argv", CASES, ids=" ".join)
def test_the_hand_parser_gives_argparse_namespace_or_leaves_it_to_argparse(argv, capsys):
    plain = snapshot.parse_plain(argv)
    try:
        expected = vars(cli.build_parser("snapshot").parse_args(argv))
    except SystemExit:
        expected = None                     # a usage error or help: argparse must say it
    capsys.readouterr()
    if plain is not None:
        assert vars(plain) == expected


def test_the_usual_forms_are_parsed_by_hand():
    for argv in (["snapshot", "--netns", "n", "--output", "f"], ["snapshot", "show", "f"],
                 ["snapshot", "diff", "a", "b", "--json"], ["-v", "snapshot", "-o", "f", "--json"]):
        assert snapshot.parse_plain(argv) is not None, argv


def _program(*argv: str) -> subprocess.CompletedProcess:
    code = "import sys; from supervisor.cli import run; sys.argv[0] = 'ipsec-supervisor'; run()"
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=ROOT)


def test_the_quick_exit_keeps_the_output_and_the_exit_code(tmp_path, netns):
    good = tmp_path / "s.json"
    r = _program("snapshot", "--netns", netns.name, "--output", str(good))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"snapshot written to {good}") and "firewall rules" in r.stdout
    shown = _program("snapshot", "show", str(good), "--json")
    assert shown.returncode == 0 and "firewall" in json.loads(shown.stdout)["objects"]
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    r = _program("snapshot", "show", str(bad))
    assert r.returncode == 6 and str(bad) in r.stderr
    r = _program("snapshot", "--route-table", "x")
    assert r.returncode == 2 and "not a whole number" in r.stderr


def test_a_reader_that_goes_away_gets_no_traceback(tmp_path, netns):
    good = tmp_path / "s.json"
    assert _program("snapshot", "--netns", netns.name, "--output", str(good)).returncode == 0
    code = "import sys; from supervisor.cli import run; sys.argv[0] = 'ipsec-supervisor'; run()"
    proc = subprocess.Popen([sys.executable, "-c", code, "snapshot", "show", str(good), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    proc.stdout.read(10)
    proc.stdout.close()
    _, err = proc.communicate(timeout=60)
    assert b"Traceback" not in err


def test_the_snapshot_commands_import_no_logging_unless_they_show_something(tmp_path, netns):
    # lazylog: their paths log through lazylog.Logger, so a run that shows no log line never
    # imports logging; -v still shows the debug lines, in the CLI's format
    good = tmp_path / "s.json"
    code = ("import sys; from supervisor import cli; sys.argv[0] = 'ipsec-supervisor'; rc = cli.main(); "
            "print('LOGGING' if 'logging' in sys.modules else 'NO-LOGGING', file=sys.stderr); sys.exit(rc)")
    for argv in (["snapshot", "--netns", netns.name, "--output", str(good)], ["snapshot", "show", str(good)],
                 ["snapshot", "diff", str(good), str(good)]):
        r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 0 and r.stderr.strip().endswith("NO-LOGGING"), (argv, r.stderr)
    r = subprocess.run([sys.executable, "-c", code, "-v", "snapshot", "--netns", netns.name, "--output", str(good)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "DEBUG supervisor.kernel.firewall: " in r.stderr, r.stderr


def test_a_closed_standard_stream_keeps_the_exit_code(tmp_path):
    # (a cron job or a unit that closes stderr: Python then has sys.stderr None)
    code = "import sys; from supervisor.cli import run; sys.argv[0] = 'ipsec-supervisor'; run()"
    fixture = os.path.join(ROOT, "tests", "fixtures", "snapshots", "tunnels-crash-v2.json")
    for argv, rc in ((["snapshot", "show", fixture], 0), (["snapshot", "show", str(tmp_path / "none.json")], 6)):
        shell = 'code="$1"; shift; exec "$0" -c "$code" "$@" 2>&- >/dev/null'
        r = subprocess.run(["sh", "-c", shell, sys.executable, code, *argv], cwd=ROOT)
        assert r.returncode == rc, argv


@pytest.mark.parametrize("stdout", ["/dev/full", "closed"])
@pytest.mark.parametrize("argv", [["show", "{v2}"], ["show", "{v2}", "--json"], ["diff", "{v2}", "{v1}"],
                                  ["show", "{many}"], ["show", "{many}", "--json"]],
                         ids=["show", "show-json", "diff", "show-large", "show-json-large"])
def test_an_output_that_cannot_be_written_is_one_error_line_and_exit_1(tmp_path, argv, stdout):
    # a full disk (a large output fails while it is written, a small one when it is flushed at exit)
    # or a closed standard output: no traceback, one line saying why
    from supervisor import snapshot as files
    fixtures = os.path.join(ROOT, "tests", "fixtures", "snapshots")
    v2 = os.path.join(fixtures, "tunnels-crash-v2.json")
    many = tmp_path / "many.json"
    snap = files.load_snapshot(v2)
    policies = snap.objects["xfrm_policy"]
    files.write_snapshot(str(many), dataclasses.replace(
        snap, objects={**snap.objects, "xfrm_policy": tuple(
            dataclasses.replace(policies[i % len(policies)], index=8 * i + 1) for i in range(2000))}))
    names = {"v2": v2, "v1": os.path.join(fixtures, "tunnels-crash.json"), "many": str(many)}
    code = "import sys; from supervisor.cli import run; sys.argv[0] = 'ipsec-supervisor'; run()"
    redirect = ">&-" if stdout == "closed" else ">/dev/full"
    shell = f'code="$1"; shift; exec "$0" -c "$code" "$@" {redirect}'
    r = subprocess.run(["sh", "-c", shell, sys.executable, code, "snapshot", *(a.format(**names) for a in argv)],
                       cwd=ROOT, capture_output=True, text=True)
    why = "standard output is closed" if stdout == "closed" else "No space left on device"
    assert (r.returncode, r.stderr) == (1, f"ipsec-supervisor: cannot write the output: {why}\n")


def test_an_output_its_encoding_cannot_hold_is_named(tmp_path):
    from supervisor import snapshot as files
    v2 = os.path.join(ROOT, "tests", "fixtures", "snapshots", "tunnels-crash-v2.json")
    odd = tmp_path / "odd.json"
    files.write_snapshot(str(odd), dataclasses.replace(files.load_snapshot(v2), host="hôte"))
    for extra in ([], ["--json"]):
        r = subprocess.run([sys.executable, "-m", "supervisor.cli", "snapshot", "show", str(odd), *extra], cwd=ROOT,
                           capture_output=True, text=True, env={**os.environ, "PYTHONIOENCODING": "ascii"})
        assert r.returncode == 1 and r.stderr == ("ipsec-supervisor: cannot write the output: standard output "
                                                  "encodes ascii, which has no U+00F4 '\\xf4' (PYTHONIOENCODING=utf-8 has)\n"), \
            r.stderr
