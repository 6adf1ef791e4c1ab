"""Snapshots: taken from a real namespace, written atomically 0600, validated on load, diffed."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

from supervisor.errors import ExitCode, SnapshotError
from supervisor.kernel_state import ReadOptions, read_state
from supervisor.snapshot import (
    SCHEMA, VERSION, diff_snapshots, load_snapshot, take_snapshot, write_snapshot,
)

CHARON_LIKE = """
ip link add veth0 type veth peer name veth1
ip link set veth0 up
ip link set veth1 up
ip addr add 192.0.2.1/24 dev veth0
ip addr add 10.1.0.1/32 dev lo
ip xfrm policy add src 10.1.0.0/16 dst 10.2.0.0/16 dir out priority 375423 \
  tmpl src 192.0.2.1 dst 192.0.2.2 proto esp reqid 1 mode tunnel
ip xfrm policy add src 10.2.0.0/16 dst 10.1.0.0/16 dir in priority 375423 \
  tmpl src 192.0.2.2 dst 192.0.2.1 proto esp reqid 1 mode tunnel
ip xfrm policy add src 10.2.0.0/16 dst 10.1.0.0/16 dir fwd priority 375423 \
  tmpl src 192.0.2.2 dst 192.0.2.1 proto esp reqid 1 mode tunnel
ip route add 10.2.0.0/16 via 192.0.2.2 dev veth0 src 10.1.0.1 proto static table 220
ip rule add priority 220 table 220
iptables -I INPUT 1 -i veth0 -s 10.2.0.0/16 -d 10.1.0.0/16 -m policy --dir in --pol ipsec --reqid 1 --proto esp -j ACCEPT
iptables -I OUTPUT 1 -o veth0 -s 10.1.0.0/16 -d 10.2.0.0/16 -m policy --dir out --pol ipsec --reqid 1 --proto esp -j ACCEPT
"""


def snapshot_of(ns, **kw):
    with ns.enter():
        return take_snapshot(read_state(ReadOptions()), **kw)


def run_cli(*argv):
    return subprocess.run([sys.executable, "-m", "supervisor.cli", *argv],
                          capture_output=True, text=True)


def test_snapshot_holds_every_family_of_charon_like_state(netns, tmp_path):
    netns.sh(CHARON_LIKE)
    snap = snapshot_of(netns)
    counts = snap.counts()
    assert counts["xfrm_policy"] == 3
    assert counts["route"] == 1
    assert counts["rule"] == 1
    assert counts["firewall"] >= 2
    assert any(a.to_json().get("ifname") == "lo" or "10.1.0.1" in a.describe()
               for a in snap.objects["address"])
    assert snap.netns["name"] == netns.name


def test_snapshot_file_is_0600_and_round_trips(netns, tmp_path):
    netns.sh(CHARON_LIKE)
    snap = snapshot_of(netns, daemon={"pid": 1234, "exit": {"signal": 9}})
    path = str(tmp_path / "snap.json")
    write_snapshot(path, snap)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    doc = json.load(open(path))
    assert doc["schema"] == SCHEMA and doc["version"] == VERSION
    assert doc["daemon"] == {"pid": 1234, "exit": {"signal": 9}}
    loaded = load_snapshot(path)
    assert loaded.counts() == snap.counts()
    assert not any(diff_snapshots(snap, loaded).values())
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".snapshot-")]


def test_diff_reports_added_removed_per_family(netns):
    netns.sh(CHARON_LIKE)
    before = snapshot_of(netns)
    netns.sh("ip rule del priority 220 table 220\n"
             "ip route add 10.3.0.0/16 via 192.0.2.2 dev veth0 proto static table 220")
    after = snapshot_of(netns)
    d = diff_snapshots(before, after)
    assert len(d["rule"].removed) == 1 and not d["rule"].added
    assert len(d["route"].added) == 1 and not d["route"].removed
    assert not d["xfrm_policy"]


@pytest.mark.parametrize("content, problem", [
    (b"", "empty"),
    (b'{"schema": "ipsec-supervisor/snapshot", "version": 1, "objects": {', "invalid JSON"),
    (b"[1, 2]", "not an object"),
    (b'{"schema": "something-else", "version": 1}', "schema"),
    (b'{"schema": "ipsec-supervisor/snapshot", "version": 99}', "version 99"),
    (b'{"schema": "ipsec-supervisor/snapshot", "version": 1}', "missing key"),
    (b"\xff\xfe\x00garbage", "UTF-8"),
])
def test_corrupt_snapshot_gives_clear_error_naming_file(tmp_path, content, problem):
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(SnapshotError) as err:
        load_snapshot(str(path))
    assert str(path) in str(err.value) and problem in str(err.value)
    result = run_cli("snapshot", "show", str(path))
    assert result.returncode == ExitCode.BAD_SNAPSHOT
    assert "Traceback" not in result.stderr and str(path) in result.stderr


def test_invalid_record_names_family_and_index(netns, tmp_path):
    netns.sh(CHARON_LIKE)
    path = str(tmp_path / "s.json")
    write_snapshot(path, snapshot_of(netns))
    doc = json.load(open(path))
    doc["objects"]["xfrm_policy"][1] = {"nonsense": True}
    open(path, "w").write(json.dumps(doc))
    with pytest.raises(SnapshotError, match=r"objects\.xfrm_policy\[1\] is invalid"):
        load_snapshot(path)


def test_cli_snapshot_show_and_diff(netns, tmp_path):
    netns.sh(CHARON_LIKE)
    a, b = str(tmp_path / "a.json"), str(tmp_path / "b.json")
    r = run_cli("snapshot", "--netns", netns.name, "--output", a, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["path"] == a and out["counts"]["xfrm_policy"] == 3
    netns.sh("ip xfrm policy del src 10.1.0.0/16 dst 10.2.0.0/16 dir out")
    r = run_cli("snapshot", "--netns", netns.name, "-o", b)
    assert r.returncode == 0, r.stderr
    assert "XFRM policies" in r.stdout
    r = run_cli("snapshot", "show", a)
    assert r.returncode == 0 and "10.1.0.0/16" in r.stdout
    r = run_cli("snapshot", "diff", a, b, "--json")
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["xfrm_policy"]["removed"]) == 1


def test_cli_errors_have_documented_exit_codes(tmp_path):
    r = run_cli("snapshot", "--netns", "ipsv-does-not-exist", "-o", str(tmp_path / "x.json"))
    assert r.returncode == ExitCode.NO_NETNS and "does not exist" in r.stderr
    r = run_cli("snapshot", "-o", "/nonexistent-dir/x.json", "--netns", "ipsv-nope")
    assert r.returncode == ExitCode.NO_NETNS
    r = run_cli("snapshot", "--bogus")
    assert r.returncode == ExitCode.USAGE


def test_unwritable_output_is_reported_and_nothing_written(netns, tmp_path):
    r = run_cli("snapshot", "--netns", netns.name, "-o", "/nonexistent-dir/x.json")
    assert r.returncode == ExitCode.FAILED
    assert "cannot write snapshot /nonexistent-dir/x.json" in r.stderr
    assert "Traceback" not in r.stderr


def test_not_root_is_refused_with_exit_code_4(tmp_path):
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                        sys.executable, "-m", "supervisor.cli", "snapshot", "-o",
                        str(tmp_path / "x.json")],
                       capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert r.returncode == ExitCode.NOT_ROOT, r.stderr
    assert "root" in r.stderr


def test_snapshot_shows_progress_on_a_terminal_only(netns, tmp_path):
    netns.sh(CHARON_LIKE)
    import pty
    out = str(tmp_path / "t.json")
    main, sub = pty.openpty()
    try:
        r = subprocess.run([sys.executable, "-m", "supervisor.cli", "snapshot", "--netns", netns.name,
                            "-o", out], stdout=subprocess.PIPE, stderr=sub, text=True, timeout=60)
        os.close(sub)
        sub = -1
        seen = b""
        while True:
            try:
                chunk = os.read(main, 4096)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    finally:
        if sub >= 0:
            os.close(sub)
        os.close(main)
    assert r.returncode == 0
    assert b"read 3 XFRM policies" in seen and b"writing" in seen
    r = run_cli("snapshot", "--netns", netns.name, "-o", out)
    assert r.returncode == 0 and r.stderr == ""          # not a terminal: no progress
