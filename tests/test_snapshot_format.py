"""The snapshot file format: version 2 (leaner, msgspec-encoded), version 1 still read, bad files exit 6.

No kernel needed: records come from the frozen fixtures (tests/fixtures/snapshots, version 1).
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import subprocess
import sys

import pytest

from supervisor.errors import ExitCode, SnapshotError
from supervisor.kernel.xfrm import XfrmAlgorithm, XfrmLifetime
from supervisor.snapshot import DERIVED, VERSION, load_snapshot, write_snapshot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "snapshots")
NAMES = ("tunnels-crash", "trap-crash", "foreign-only")


def run_cli(*argv):
    return subprocess.run([sys.executable, "-m", "supervisor.cli", *argv], cwd=ROOT, capture_output=True,
                          text=True)


@pytest.mark.parametrize("name", NAMES)
def test_version_1_fixtures_load_and_rewrite_as_version_2_with_the_same_records(name, tmp_path):
    old = load_snapshot(os.path.join(FIXTURES, f"{name}.json"))
    with open(os.path.join(FIXTURES, f"{name}.json")) as fh:
        assert json.load(fh)["version"] == 1
    path = str(tmp_path / "v2.json")
    write_snapshot(path, old)
    with open(path) as fh:
        assert json.load(fh)["version"] == VERSION == 2
    new = load_snapshot(path)
    assert new == old
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_version_2_writes_no_derived_name_and_no_default_lifetime(tmp_path):
    snap = load_snapshot(os.path.join(FIXTURES, "tunnels-crash.json"))
    path = str(tmp_path / "v2.json")
    write_snapshot(path, snap)
    text = open(path).read()
    for keys in DERIVED.values():
        for key in keys:
            assert f'"{key}"' not in text
    with open(path) as fh:
        doc = json.load(fh)
    assert all("lifetime" not in p for p in doc["objects"]["xfrm_policy"])
    assert all("lifetime" in sa for sa in doc["objects"]["xfrm_sa"])        # SAs keep theirs
    lines = text.splitlines()
    assert sum(1 for line in lines if line.startswith("   {")) == sum(snap.counts().values())   # one per line


def test_a_policy_lifetime_with_limits_survives_the_round_trip(tmp_path):
    snap = load_snapshot(os.path.join(FIXTURES, "tunnels-crash.json"))
    policies = list(snap.objects["xfrm_policy"])
    policies[0] = dataclasses.replace(policies[0], lifetime=XfrmLifetime(hard_add_expires_seconds=3600))
    snap = dataclasses.replace(snap, objects={**snap.objects, "xfrm_policy": tuple(policies)})
    path = str(tmp_path / "s.json")
    write_snapshot(path, snap)
    assert load_snapshot(path).objects["xfrm_policy"][0].lifetime.hard_add_expires_seconds == 3600
    assert load_snapshot(path) == snap


def test_key_material_is_redacted_unless_asked_for(tmp_path):
    snap = load_snapshot(os.path.join(FIXTURES, "tunnels-crash.json"))
    key = "5a" * 16
    sas = list(snap.objects["xfrm_sa"])
    sas[0] = dataclasses.replace(sas[0], crypt=XfrmAlgorithm("cbc(aes)", 128, key))
    for include in (False, True):
        s = dataclasses.replace(snap, keys_included=include, objects={**snap.objects, "xfrm_sa": tuple(sas)})
        path = str(tmp_path / f"keys-{include}.json")
        write_snapshot(path, s)
        assert (key in open(path).read()) is include
        assert (load_snapshot(path).objects["xfrm_sa"][0].crypt.key == key) is include


@pytest.mark.parametrize("content, problem", [
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"schema": "ipsec-supervisor/snapshot", "version": 2, "objects": ' + b"[" * 50_000, "nested too deeply"),
    (b'{"schema": "ipsec-supervisor/snapshot", "version": 2, "objects": {"xfrm_policy": [{"selector": {',
     "truncated?"),
    (b'{"schema": "ipsec-supervisor/snapshot", "version": true}', "version True is not supported"),
    (b'{"schema": "ipsec-supervisor/snapshot", "version": 3}', "reads versions 1, 2"),
], ids=["deep-array", "deep-inside", "truncated", "bool-version", "future-version"])
def test_deep_truncated_or_unknown_documents_exit_6_without_a_traceback(tmp_path, content, problem):
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(SnapshotError) as err:
        load_snapshot(str(path))
    assert str(path) in str(err.value) and problem in str(err.value)
    r = run_cli("snapshot", "show", str(path))
    assert r.returncode == ExitCode.BAD_SNAPSHOT, r.stderr
    assert "Traceback" not in r.stderr and problem in r.stderr


def test_a_policy_without_lifetime_is_invalid_in_version_1(tmp_path):
    with open(os.path.join(FIXTURES, "tunnels-crash.json")) as fh:
        doc = json.load(fh)
    del doc["objects"]["xfrm_policy"][2]["lifetime"]
    path = tmp_path / "v1.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(SnapshotError, match=r"objects\.xfrm_policy\[2\] is invalid: KeyError"):
        load_snapshot(str(path))


def test_without_msgspec_the_same_document_is_written_and_read(tmp_path, monkeypatch):
    """msgspec is an accelerator: a system without it (Debian 12 packages none) writes the same bytes."""
    from supervisor import snapshot
    snap = load_snapshot(os.path.join(FIXTURES, "tunnels-crash.json"))
    fast, slow = str(tmp_path / "fast.json"), str(tmp_path / "slow.json")
    write_snapshot(fast, snap)
    monkeypatch.setattr(snapshot, "msgspec", None)
    write_snapshot(slow, snap)
    assert open(fast, "rb").read() == open(slow, "rb").read()
    assert load_snapshot(fast) == load_snapshot(slow) == snap
    bad = tmp_path / "deep.json"
    bad.write_bytes(b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(SnapshotError, match="nested too deeply"):
        load_snapshot(str(bad))


def test_snapshot_show_json_without_msgspec_prints_the_same(tmp_path):
    path = os.path.join(FIXTURES, "trap-crash.json")
    hide = "import sys; sys.modules['msgspec'] = None; from supervisor.cli import main; sys.exit(main())"
    slow = subprocess.run([sys.executable, "-c", hide, "snapshot", "show", path, "--json"], cwd=ROOT,
                          capture_output=True, text=True)
    fast = run_cli("snapshot", "show", path, "--json")
    assert slow.returncode == fast.returncode == 0, slow.stderr
    assert json.loads(slow.stdout) == json.loads(fast.stdout)
