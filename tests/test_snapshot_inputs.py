"""Snapshot files with what JSON allows but no snapshot holds: every reading command (show, show
--json, diff, diff --json) exits 6 with one line naming the file and the key or record, the same
line with msgspec and without it (the json module's path); never a traceback, never a half output.

- numbers: a created_unix no clock gives (a 400-digit integer, 1e300, -1), numbers JSON has not
  (1e999, NaN, -Infinity: the json module reads them, msgspec does not), integers of more digits
  than Python reads (5000);
- a lone UTF-16 surrogate (``"\\ud800"``): no character, so nothing can print or encode it
  (the json module reads it and failed later, while printing; msgspec refuses it).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("msgspec")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V2 = os.path.join(ROOT, "tests", "fixtures", "snapshots", "tunnels-crash-v2.json")
HIDE_MSGSPEC = "import sys; sys.modules['msgspec'] = None; from supervisor.cli import run; run()"
WAYS = {"msgspec": [sys.executable, "-m", "supervisor.cli"], "json module": [sys.executable, "-c", HIDE_MSGSPEC]}


def head(key: str, value: str):
    """The edit that writes VALUE (JSON text) for the head key KEY."""
    return lambda text: _once(re.sub(rf'"{key}": [^,\n]+', lambda m: f'"{key}": {value}', text, count=1), text)


def replace(old: str, new: str):
    return lambda text: _once(text.replace(old, new, 1), text)


def _once(edited: str, text: str) -> str:
    assert edited != text, "the edit found nothing to change"
    return edited


BIG = "1" + "0" * 400           # a float cannot hold it
HUGE = "9" * 5000               # Python reads at most 4300 digits (sys.get_int_max_str_digits)

# (what, the edit, what the one line on stderr says after "is not usable: ")
HEAD_FAULTS = [
    ("created_unix a 400-digit integer", head("created_unix", BIG),
     "'created_unix' is a number of 401 digits, not a Unix time from 0 (1970) to 253402300799 (9999)"),
    ("created_unix 1e999", head("created_unix", "1e999"),
     "'created_unix' is 1e999, not a JSON number (none is NaN, Infinity or beyond ±1.8e308)"),
    ("created_unix NaN", head("created_unix", "NaN"), "'created_unix' is NaN, not a JSON number"),
    ("created_unix -Infinity", head("created_unix", "-Infinity"), "'created_unix' is -Infinity, not a JSON number"),
    ("created_unix 1e300", head("created_unix", "1e300"), "'created_unix' is 1e+300, not a Unix time from 0"),
    ("created_unix before 1970", head("created_unix", "-1"), "'created_unix' is -1, not a Unix time from 0"),
    ("created_unix of 5000 digits", head("created_unix", HUGE),
     "'created_unix' is a number of 5000 digits (at most 4300 are read)"),
    ("daemon pid NaN", replace('"pid": 4242', '"pid": NaN'), "'daemon.pid' is NaN, not a JSON number"),
    ("context number 1e999", replace('"route_table": 220', '"route_table": 1e999'),
     "'context.route_table' is 1e999, not a JSON number"),
    ("netns inode of 5000 digits", replace('"inode": 4026532000', f'"inode": {HUGE}'),
     "'netns.inode' is a number of 5000 digits"),
    ("host a lone surrogate", head("host", '"\\ud800"'),
     "'host' holds \\ud800, half of a UTF-16 surrogate pair: no character (a snapshot's text is UTF-8)"),
    ("a context key a lone surrogate", replace('"route_table": 220', '"x\\udfff": 220'),
     "'context.x\\udfff' holds \\udfff, half of a UTF-16 surrogate pair"),
    ("a route's interface a lone surrogate", replace('"oif_name":"veth0"', '"oif_name":"\\ud800"'),
     "objects.route[0] is invalid: oif_name holds \\ud800, half of a UTF-16 surrogate pair"),
    ("a policy's address a lone low surrogate", replace('"saddr":"10.1.0.0"', '"saddr":"10\\udc00"'),
     "objects.xfrm_policy[0] is invalid: selector.saddr holds \\udc00, half of a UTF-16 surrogate pair"),
]

COMMANDS = {"show": ["show", "{bad}"], "show --json": ["show", "{bad}", "--json"],
            "diff": ["diff", V2, "{bad}"], "diff --json": ["diff", "{bad}", V2, "--json"]}


def write_edited(tmp_path, edit) -> str:
    with open(V2, encoding="utf-8") as fh:
        text = fh.read()
    path = tmp_path / "bad.json"
    path.write_text(edit(text), encoding="utf-8")
    return str(path)


def run_both(argv: list[str]) -> dict[str, subprocess.CompletedProcess]:
    return {way: subprocess.run(program + ["snapshot", *argv], cwd=ROOT, capture_output=True, text=True, timeout=60)
            for way, program in WAYS.items()}


@pytest.mark.parametrize("what, edit, said", HEAD_FAULTS, ids=[f[0] for f in HEAD_FAULTS])
def test_a_value_no_snapshot_holds_is_one_line_exit_6_the_same_both_ways(tmp_path, what, edit, said):
    bad = write_edited(tmp_path, edit)
    for command, argv in COMMANDS.items():
        for way, r in run_both([a.format(bad=bad) for a in argv]).items():
            assert r.returncode == 6 and r.stdout == "", (command, way, r.stderr)
            assert r.stderr.startswith(f"ipsec-supervisor: snapshot {bad} is not usable: {said}"), (command, way, r.stderr)
            assert r.stderr.count("\n") == 1, (command, way, r.stderr)


RECORD_FAULTS = [
    ("a policy number 1e999", replace('"priority":0', '"priority":1e999'), "objects.xfrm_policy[1] is invalid"),
    ("a policy number of 5000 digits", replace('"priority":0', f'"priority":{HUGE}'),
     "objects.xfrm_policy[1] is invalid"),
    ("a route number NaN", replace('"tos":0', '"tos":NaN'), "objects.route[0] is invalid"),
]


@pytest.mark.parametrize("what, edit, record", RECORD_FAULTS, ids=[f[0] for f in RECORD_FAULTS])
def test_a_record_number_no_snapshot_holds_names_the_record_both_ways(tmp_path, what, edit, record):
    # (msgspec's typed decoding words a record's fault in its own terms, as for every record fault)
    bad = write_edited(tmp_path, edit)
    for command, argv in COMMANDS.items():
        for way, r in run_both([a.format(bad=bad) for a in argv]).items():
            assert r.returncode == 6 and r.stdout == "" and r.stderr.count("\n") == 1, (command, way, r.stderr)
            assert f"snapshot {bad} is not usable: {record}: " in r.stderr, (command, way, r.stderr)


VALID = [
    ("a surrogate pair (one character)", head("host", '"\\ud83d\\ude00"')),
    ("an escaped backslash before ud800", head("host", '"C:\\\\ud800"')),
    ("created_unix 0", head("created_unix", "0")),
    ("created_unix the last second of 9999", head("created_unix", "253402300799")),
    ("a 400-digit integer in the context", replace('"route_table": 220', f'"route_table": 220, "big": {BIG}')),
]


@pytest.mark.parametrize("what, edit", VALID, ids=[v[0] for v in VALID])
def test_what_json_allows_and_a_snapshot_may_hold_prints_the_same_both_ways(tmp_path, what, edit):
    path = write_edited(tmp_path, edit)
    for command, argv in COMMANDS.items():
        runs = run_both([a.format(bad=path) for a in argv])
        assert [r.returncode for r in runs.values()] == [0, 0], (command, [r.stderr for r in runs.values()])
        assert runs["msgspec"].stdout == runs["json module"].stdout, command
