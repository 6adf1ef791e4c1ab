"""Reading snapshots with msgspec's typed decoding gives what the json-module path gives:
the same records, and for a bad file the same error class, exit code and record named.

No kernel needed: tests/fixtures/snapshots/tunnels-crash-v2.json (make_v2.py) holds a
version 2 document with policies and routes that use every field.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest

from supervisor import snapshot
from supervisor.errors import ExitCode, SnapshotError
from supervisor.snapshot import diff_snapshots, load_snapshot, load_snapshots, write_snapshot

pytest.importorskip("msgspec")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "snapshots")
V2 = os.path.join(FIXTURES, "tunnels-crash-v2.json")
HIDE_MSGSPEC = "import sys; sys.modules['msgspec'] = None; from supervisor.cli import main; sys.exit(main())"


def load_both(path: str, monkeypatch) -> tuple:
    """(typed, json module): each the Snapshot or the SnapshotError message."""
    results = []
    for fast in (True, False):
        with monkeypatch.context() as m:
            if not fast:
                m.setattr(snapshot, "msgspec", None)
            try:
                results.append(load_snapshot(path))
            except SnapshotError as exc:
                results.append(str(exc))
    return tuple(results)


def test_the_committed_version_2_fixture_reads_the_same_both_ways(monkeypatch, tmp_path):
    fast, slow = load_both(V2, monkeypatch)
    assert isinstance(fast, snapshot.Snapshot) and fast == slow
    assert fast.counts()["xfrm_policy"] == 14 and fast.counts()["route"] == 4
    again = str(tmp_path / "again.json")
    write_snapshot(again, fast)
    with open(V2, "rb") as a, open(again, "rb") as b:     # the format did not move
        assert json.loads(a.read()) == json.loads(b.read())


def test_version_1_files_are_read_by_the_json_module_path_with_the_same_records(monkeypatch):
    for name in ("tunnels-crash", "trap-crash", "foreign-only"):
        fast, slow = load_both(os.path.join(FIXTURES, f"{name}.json"), monkeypatch)
        assert fast == slow


def _policy(doc, i=12):
    return doc["objects"]["xfrm_policy"][i]


def _route(doc, i=2):
    return doc["objects"]["route"][i]


# (what is broken, the edit, the record the message must name or None for a document-level problem)
CORRUPT = [
    ("policy field of the wrong type", lambda d: _policy(d).update(priority="high"), "xfrm_policy[12]"),
    ("policy field missing", lambda d: _policy(d).pop("curlft"), "xfrm_policy[12]"),
    ("boolean for an integer", lambda d: _policy(d).update(if_id=True), "xfrm_policy[12]"),
    ("float for an integer", lambda d: _policy(d).update(index=2.0), "xfrm_policy[12]"),
    ("unknown direction name", lambda d: _policy(d).update(dir="sideways"), "xfrm_policy[12]"),
    ("selector address of the other family", lambda d: _policy(d)["selector"].update(saddr="10.1.0.0"),
     "xfrm_policy[12]"),
    ("selector port out of range", lambda d: _policy(d)["selector"].update(sport=70000), "xfrm_policy[12]"),
    ("selector prefix length out of range", lambda d: _policy(d, 0)["selector"].update(prefixlen_d=256),
     "xfrm_policy[0]"),
    ("template family number too big", lambda d: _policy(d)["templates"][1].update(family=70000),
     "xfrm_policy[12]"),
    ("template address garbage", lambda d: _policy(d)["templates"][0].update(daddr="moon"), "xfrm_policy[12]"),
    ("template spi negative", lambda d: _policy(d)["templates"][0].update(spi=-1), "xfrm_policy[12]"),
    ("attribute data not hex", lambda d: _policy(d)["attrs"][0].update(data="zz"), "xfrm_policy[12]"),
    ("lifetime of the wrong shape", lambda d: _policy(d).update(lifetime=[1, 2]), "xfrm_policy[12]"),
    ("lifetime null", lambda d: _policy(d).update(lifetime=None), "xfrm_policy[12]"),
    ("mark without mask", lambda d: _policy(d).update(mark={"value": 1}), "xfrm_policy[12]"),
    ("route dst of the other family", lambda d: _route(d).update(dst="10.0.0.0"), "route[2]"),
    ("route dst not an address", lambda d: _route(d, 0).update(dst="10.2.0.0/16"), "route[0]"),
    ("route dst_len too long", lambda d: _route(d, 0).update(dst_len=33), "route[0]"),
    ("route table negative", lambda d: _route(d).update(table=-1), "route[2]"),
    ("route empty interface name", lambda d: _route(d).update(oif_name=""), "route[2]"),
    ("route unknown metric", lambda d: _route(d)["metrics"].update(speed=1), "route[2]"),
    ("route metric boolean", lambda d: _route(d)["metrics"].update(mtu=True), "route[2]"),
    ("nexthop weight too big", lambda d: _route(d)["multipath"][0].update(weight=257), "route[2]"),
    ("nexthop gateway garbage", lambda d: _route(d)["multipath"][1].update(gateway="fe80::1::2"), "route[2]"),
    ("route not an object", lambda d: d["objects"]["route"].__setitem__(1, [1]), "route[1]"),
    ("SA (json-module records) broken", lambda d: d["objects"]["xfrm_sa"][3].update(spi="x"), "xfrm_sa[3]"),
    ("family not a list", lambda d: d["objects"].update(route={}), None),
    ("unknown family", lambda d: d["objects"].update(tunnels=[]), None),
    ("objects not an object", lambda d: d.update(objects=[]), None),
    ("schema wrong, records broken too", lambda d: (d.update(schema="x"), _policy(d).update(dir=1.5)), None),
    ("created_unix a string", lambda d: d.update(created_unix="now"), None),
    ("host missing", lambda d: d.pop("host"), None),
]


@pytest.mark.parametrize("what, edit, record", CORRUPT, ids=[c[0] for c in CORRUPT])
def test_a_corrupt_version_2_file_fails_the_same_way_on_both_paths(tmp_path, monkeypatch, what, edit, record):
    with open(V2) as fh:
        doc = json.load(fh)
    edit(doc)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    fast, slow = load_both(str(path), monkeypatch)
    assert isinstance(fast, str) and isinstance(slow, str), (fast, slow)
    assert str(path) in fast and str(path) in slow
    if record is None:
        assert fast == slow
    else:
        assert f"objects.{record} is invalid" in fast and f"objects.{record} is invalid" in slow, (fast, slow)


def test_the_cli_exits_6_for_a_corrupt_record_with_and_without_msgspec(tmp_path):
    with open(V2) as fh:
        doc = json.load(fh)
    _policy(doc)["selector"]["daddr"] = "10.0.0.1"
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    for argv in ([sys.executable, "-m", "supervisor.cli"], [sys.executable, "-c", HIDE_MSGSPEC]):
        for command in (["show", str(path)], ["diff", V2, str(path)], ["diff", str(path), V2]):
            r = subprocess.run(argv + ["snapshot", *command], cwd=ROOT, capture_output=True, text=True)
            assert r.returncode == ExitCode.BAD_SNAPSHOT, r.stderr
            assert "objects.xfrm_policy[12] is invalid" in r.stderr and "Traceback" not in r.stderr


def _changed_copy(tmp_path) -> str:
    with open(V2) as fh:
        doc = json.load(fh)
    policies = doc["objects"]["xfrm_policy"]
    policies[1]["curlft"]["use_time"] = 1764299999        # volatile only: not a change
    policies[2]["priority"] += 1                          # changed
    del policies[3]                                       # removed; everything after it moves up
    doc["objects"]["route"].append(copy.deepcopy(doc["objects"]["route"][0]))
    doc["objects"]["route"][-1]["dst"] = "10.99.0.0"      # added
    path = str(tmp_path / "b.json")
    with open(path, "w") as fh:
        json.dump(doc, fh)
    return path


def test_load_snapshots_shares_equal_records_and_diffs_as_separate_loads_do(tmp_path, monkeypatch):
    b = _changed_copy(tmp_path)
    first, second = load_snapshots(V2, b)
    assert first == load_snapshot(V2) and second == load_snapshot(b)
    assert first.objects["xfrm_policy"][0] is second.objects["xfrm_policy"][0]
    shared = diff_snapshots(first, second)
    with monkeypatch.context() as m:
        m.setattr(snapshot, "msgspec", None)
        separate = diff_snapshots(load_snapshot(V2), load_snapshot(b))
    assert shared == separate
    assert len(shared["xfrm_policy"].removed) == 1 and len(shared["xfrm_policy"].changed) == 1
    assert len(shared["route"].added) == 1 and not shared["route"].removed
    assert not shared["xfrm_sa"] and not shared["firewall"]


def test_snapshot_show_and_diff_print_the_same_with_and_without_msgspec(tmp_path):
    b = _changed_copy(tmp_path)
    for command in (["show", V2], ["diff", V2, b], ["diff", b, V2], ["diff", V2, b, "--json"]):
        fast = subprocess.run([sys.executable, "-m", "supervisor.cli", "snapshot", *command], cwd=ROOT,
                              capture_output=True, text=True)
        slow = subprocess.run([sys.executable, "-c", HIDE_MSGSPEC, "snapshot", *command], cwd=ROOT,
                              capture_output=True, text=True)
        assert fast.returncode == slow.returncode == 0, fast.stderr + slow.stderr
        assert fast.stdout == slow.stdout


def test_diff_of_files_builds_only_what_differs_and_says_what_the_records_say(tmp_path, monkeypatch):
    from supervisor.snapshot import diff_snapshot_files
    b = _changed_copy(tmp_path)
    built = []
    real = snapshot._build

    def counting(name, items, indices, version, path):
        built.append((name, len(indices)))
        return real(name, items, indices, version, path)

    monkeypatch.setattr(snapshot, "_build", counting)
    for x, y in ((V2, b), (b, V2), (V2, V2)):
        assert diff_snapshot_files(x, y) == diff_snapshots(load_snapshot(x), load_snapshot(y))
    built.clear()
    diff_snapshot_files(V2, V2)
    assert all(n == 0 for name, n in built if name in ("xfrm_policy", "route"))


def test_diff_of_files_checks_the_records_it_does_not_build(tmp_path):
    from supervisor.snapshot import diff_snapshot_files
    with open(V2) as fh:
        doc = json.load(fh)
    _policy(doc, 0)["selector"]["saddr"] = "not an address"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    for x, y in ((str(bad), str(bad)), (V2, str(bad)), (str(bad), V2)):
        with pytest.raises(SnapshotError, match=r"objects\.xfrm_policy\[0\] is invalid"):
            diff_snapshot_files(x, y)
