"""Policies and routes written straight from the records: the bytes of the generic encoder.

No kernel needed: the records come from tests/fixtures/snapshots/tunnels-crash-v2.json (every
field of a policy and a route used), plus look-alikes with strings JSON must escape.
"""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from supervisor import snapshot
from supervisor.kernel.routes import Route
from supervisor.kernel.xfrm import XfrmSelector
from supervisor.snapshot import load_snapshot, record_json
from supervisor.snapshot_lines import LINES, plain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V2 = os.path.join(ROOT, "tests", "fixtures", "snapshots", "tunnels-crash-v2.json")


def generic(name):
    encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
    return lambda record: encode(record_json(name, record, False))


def odd(name, records):
    """Records whose strings need escaping: they must take the generic way."""
    if name == "route":
        return [dataclasses.replace(records[0], oif_name='ve"th\\0'), dataclasses.replace(records[0], dst="\u00e9")]
    sel = records[0].selector
    return [dataclasses.replace(records[0], selector=dataclasses.replace(sel, saddr="a\nb")),
            dataclasses.replace(records[1], selector=XfrmSelector(0, "\u2603", 0, "", 0))]


@pytest.mark.parametrize("name", sorted(LINES))
def test_lines_are_the_bytes_of_the_generic_encoder(name):
    records = load_snapshot(V2).objects[name]
    records = tuple(records) + tuple(odd(name, records))
    assert LINES[name](records, generic(name)) == [generic(name)(r) for r in records]


@pytest.mark.parametrize("name", sorted(LINES))
def test_with_msgspec_the_same_lines_come_out(name):
    msgspec = pytest.importorskip("msgspec")
    records = load_snapshot(V2).objects[name]
    records = tuple(records) + tuple(odd(name, records))
    encode = msgspec.json.Encoder().encode
    assert LINES[name](records, lambda r: encode(record_json(name, r, False)).decode()) == \
        [generic(name)(r) for r in records]


@pytest.mark.parametrize("text, expected", [
    ("192.0.2.1", True), ("fd00::1", True), ("", True), ('a"b', False), ("a\\b", False), ("a\tb", False),
    ("\x7f", False), ("\u00e9", False)])
def test_plain_strings_are_those_no_encoder_escapes(text, expected):
    assert plain(text) is expected


def test_a_written_snapshot_reads_back_equal_with_and_without_msgspec(tmp_path, monkeypatch):
    snap = load_snapshot(V2)
    routes = snap.objects["route"] + (Route("inet", 220, "10.9.0.0", 16, oif_name='we"ird'),)
    snap = dataclasses.replace(snap, objects={**snap.objects, "route": routes})
    fast, slow = str(tmp_path / "fast.json"), str(tmp_path / "slow.json")
    snapshot.write_snapshot(fast, snap)
    monkeypatch.setattr(snapshot, "msgspec", None)
    snapshot.write_snapshot(slow, snap)
    assert open(fast, "rb").read() == open(slow, "rb").read()
    assert load_snapshot(slow) == snap
