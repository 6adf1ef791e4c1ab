"""`snapshot show` describes policies and routes from the decoded file without building their
records, and `snapshot diff` compares their JSON texts: both must say, byte for byte, what the
records say (describe(), the typed diff), and fail on a bad file with the records' error.

Crafted snapshots need no kernel; the real dumps come from a namespace (host tier).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys

import pytest

from supervisor import snapshot
from supervisor.errors import SnapshotError
from supervisor.kernel.routes import NextHop, Route
from supervisor.kernel.xfrm import XfrmPolicy, XfrmSelector, XfrmTemplate
from supervisor.snapshot import describe_snapshot, diff_snapshot_files, load_snapshot, write_snapshot

pytest.importorskip("msgspec")

from test_snapshot_lines import POLICY_SHAPES, ROUTE_SHAPES  # noqa: E402
from test_snapshot_typed import CORRUPT, HIDE_MSGSPEC, V2, _changed_copy  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "snapshots")


def error_of(call, *args) -> str:
    try:
        call(*args)
    except SnapshotError as exc:
        return str(exc)
    raise AssertionError(f"{call.__name__}{args} raised nothing")


def assert_described_as_records(path: str) -> dict[str, list[str]]:
    head, texts = describe_snapshot(path)
    snap = load_snapshot(path)
    assert texts == {name: [r.describe() for r in records] for name, records in snap.objects.items()}
    assert head == dataclasses.replace(snap, objects={})
    return texts


def _selectors() -> list[XfrmSelector]:
    out = []
    for proto in (0, 6, 17, 1, 58, 50):
        for sport, sport_mask, dport, dport_mask in ((0, 0, 0, 0), (500, 0xFFFF, 0, 0), (0, 0, 4500, 0xFFFF),
                                                     (8, 0xFFFF, 0, 0xFFFF), (3, 0, 1, 0)):
            out.append(XfrmSelector(2, "10.1.0.0", 16, "10.2.0.0", 24, proto, sport, sport_mask, dport, dport_mask))
    out += [XfrmSelector(10, "fd00:1::", 64, "fd00:2::1", 128, 58, 128, 0xFFFF, 0, 0xFFFF),
            XfrmSelector(10, "::", 0, "::", 0), XfrmSelector(0, "", 0, "", 0)]
    return out


def crafted_policies() -> tuple[XfrmPolicy, ...]:
    """Every field describe() reads, in every form it prints differently."""
    tmpl4 = XfrmTemplate(2, "192.0.2.1", "192.0.2.2", 50, 0, 1, 1)
    tmpl6 = XfrmTemplate(10, "2001:db8::1", "2001:db8::2", 51, 0x1234, 2, 1)
    out = []
    for i, sel in enumerate(_selectors()):
        out.append(XfrmPolicy(sel, dir=i % 3, priority=375423 + i, index=8 * i + (i % 3),
                              templates=((), (tmpl4,), (tmpl4, tmpl6))[i % 3]))
    base = out[0]
    for d in range(8):                  # named and unnamed directions
        out.append(dataclasses.replace(base, dir=d, index=1000 + d))
    for ptype in (1, 5):
        out.append(dataclasses.replace(base, ptype=ptype, index=1100 + ptype))
    for mark in ((0, 0), (0x2A, 0xFF), (0xFFFFFFFF, 0xFFFFFFFF)):
        out.append(dataclasses.replace(base, mark=mark, index=1200 + mark[1] % 7))
    for if_id in (7, 0xFFFFFFFF):
        out.append(dataclasses.replace(base, if_id=if_id, ptype=1, mark=(1, 1), index=1300 + if_id % 5))
    out.append(dataclasses.replace(base, action=1, priority=0, index=0, flags=3, share=2,
                                   attrs=((8, bytes.fromhex("0102000400000000")),)))
    return tuple(out)


def crafted_routes() -> tuple[Route, ...]:
    hops = (NextHop("192.0.2.2", 3, "veth0", 1, 0), NextHop(None, 4, None, 256, 4), NextHop("fe80::1", None, None, 2, 0))
    return (
        Route("inet", 220, "10.2.0.0", 16, gateway="192.0.2.2", oif=3, oif_name="veth0", prefsrc="192.0.2.1"),
        Route("inet", 220, "10.3.0.1", 32, oif=3),
        Route("inet", 254, "0.0.0.0", 0, type=6),
        Route("inet", 255, "127.0.0.0", 8, type=2, protocol=2, scope=254, oif=1, oif_name="lo"),
        Route("inet", 1000, "10.4.0.0", 16, type=99, tos=0x10, priority=7),
        Route("inet", 220, "10.5.0.0", 16, multipath=hops[:2], nhid=None),
        Route("inet", 220, "10.6.0.0", 16, nhid=12, gateway="192.0.2.2", oif=3, oif_name="veth0"),
        Route("inet", 220, "10.7.0.0", 16, gateway="fe80::1", oif=3, oif_name="veth0"),   # RTA_VIA
        Route("inet6", 220, "::", 0, type=7, priority=1024),
        Route("inet6", 220, "fd00:2::", 64, src="fd00:1::", src_len=64, gateway="2001:db8::2", oif=3,
              oif_name="veth0", prefsrc="2001:db8::1", priority=1024, metrics=(("mtu", 1400),),
              multipath=hops, pref=1, expires=300),
        Route("inet6", 220, "fd00:3::1", 128, src="::", src_len=0, flags=4),
    )


def crafted_file(tmp_path, edit=None) -> str:
    snap = load_snapshot(V2)
    snap = dataclasses.replace(snap, objects={**snap.objects, "xfrm_policy": crafted_policies(),
                                              "route": crafted_routes()})
    path = str(tmp_path / "crafted.json")
    write_snapshot(path, snap)
    if edit is not None:
        with open(path) as fh:
            doc = json.load(fh)
        edit(doc)
        with open(path, "w") as fh:
            json.dump(doc, fh)
    return path


def test_show_describes_the_committed_snapshots_as_their_records_do():
    texts = assert_described_as_records(V2)
    assert len(texts["xfrm_policy"]) == 14 and len(texts["xfrm_sa"]) == 9     # SAs with keys redacted
    for name in ("tunnels-crash", "trap-crash", "foreign-only"):        # version 1: the records' way
        assert_described_as_records(os.path.join(FIXTURES, f"{name}.json"))


def test_show_describes_every_policy_and_route_shape_as_the_records_do(tmp_path):
    texts = assert_described_as_records(crafted_file(tmp_path))
    assert len(texts["xfrm_policy"]) == len(crafted_policies()) and len(texts["route"]) == len(crafted_routes())
    said = "\n".join(texts["xfrm_policy"] + texts["route"])
    for part in ("type=8 code=0", "sport=500", "dport=4500", "dir=7", "ptype=sub", "ptype=5", "mark=0x0/0x0",
                 "if_id=0xffffffff", "route blackhole default", "nexthop dev if4 weight 256", "table local"):
        assert part in said, part


def numbers_for_names(doc) -> None:
    """The file says numbers where the writer says names (a hand-made or older file may)."""
    from supervisor.kernel import xfrm

    def number(names, value):
        return {name: n for n, name in names.items()}.get(value, value)

    for p in doc["objects"]["xfrm_policy"]:
        for key, names in (("dir", xfrm.DIR_NAMES), ("ptype", xfrm.PTYPE_NAMES), ("action", xfrm.ACTION_NAMES),
                           ("share", xfrm.SHARE_NAMES)):
            p[key] = number(names, p[key])
        p["selector"]["family"] = number(xfrm.FAMILY_NAMES, p["selector"]["family"])
        for t in p["templates"]:
            for key, names in (("family", xfrm.FAMILY_NAMES), ("proto", xfrm.PROTO_NAMES),
                               ("mode", xfrm.MODE_NAMES), ("share", xfrm.SHARE_NAMES)):
                t[key] = number(names, t[key])


def test_describe_of_every_shape_is_what_it_was_before_the_text_functions():
    # describe-before-typed.json: these lines as XfrmPolicy/Route.describe() wrote them at 2f2e578,
    # before describe() and the typed path shared selector_text/policy_text/route_text
    with open(os.path.join(FIXTURES, "describe-before-typed.json")) as fh:
        before = json.load(fh)
    assert [r.describe() for r in crafted_policies() + crafted_routes()] == before


def test_show_describes_numbers_in_the_file_as_their_names(tmp_path):
    texts = assert_described_as_records(crafted_file(tmp_path, numbers_for_names))
    assert texts == describe_snapshot(crafted_file(tmp_path))[1]


def test_show_of_a_real_dump_of_every_shape_prints_what_the_records_print(netns, tmp_path):
    netns.sh(POLICY_SHAPES + ROUTE_SHAPES + "ip route add 10.20.0.0/16 via 192.0.2.2 dev veth0 table 220 tos 0x10\n"
             "ip route add unreachable 10.21.0.0/16 table 220 metric 5\n")
    path = str(tmp_path / "dump.json")
    r = subprocess.run([sys.executable, "-m", "supervisor.cli", "snapshot", "--netns", netns.name, "-o", path],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    texts = assert_described_as_records(path)
    assert len(texts["xfrm_policy"]) == 9 and len(texts["route"]) >= 11
    fast = subprocess.run([sys.executable, "-m", "supervisor.cli", "snapshot", "show", path], cwd=ROOT,
                          capture_output=True, text=True)
    slow = subprocess.run([sys.executable, "-c", HIDE_MSGSPEC, "snapshot", "show", path], cwd=ROOT,
                          capture_output=True, text=True)
    assert fast.returncode == slow.returncode == 0 and fast.stdout == slow.stdout, fast.stderr + slow.stderr


@pytest.mark.parametrize("what, edit, record", CORRUPT, ids=[c[0] for c in CORRUPT])
def test_show_and_diff_fail_on_a_corrupt_file_with_the_records_error(tmp_path, what, edit, record):
    with open(V2) as fh:
        doc = json.load(fh)
    edit(doc)
    bad = str(tmp_path / "bad.json")
    with open(bad, "w") as fh:
        json.dump(doc, fh)
    expected = error_of(load_snapshot, bad)
    assert error_of(describe_snapshot, bad) == expected
    for a, b in ((V2, bad), (bad, V2), (bad, bad)):
        assert error_of(diff_snapshot_files, a, b) == error_of(snapshot._diff_typed, a, b)


def _many(count: int, bad_at: int | None = None, bad: str = "10.0.0.256") -> dict:
    with open(V2) as fh:
        doc = json.load(fh)
    first = doc["objects"]["xfrm_policy"][0]
    policies = []
    for i in range(count):
        p = copy.deepcopy(first)
        p["selector"].update(saddr=f"10.{i >> 8}.{i & 255}.0", prefixlen_s=24, family="inet")
        p["index"] = 8 * i + 1
        policies.append(p)
    if bad_at is not None:
        policies[bad_at]["selector"]["daddr"] = bad
    doc["objects"]["xfrm_policy"] = policies
    return doc


@pytest.mark.parametrize("bad", ["10.0.0.256", "fd00::1", "010.1.0.0", "10.1.0.0\u0000", ""])
def test_one_bad_address_among_thousands_is_named_by_its_index(tmp_path, bad):
    path = str(tmp_path / "many.json")
    with open(path, "w") as fh:
        json.dump(_many(3000, 2345, bad), fh)
    expected = error_of(load_snapshot, path)
    assert "objects.xfrm_policy[2345] is invalid" in expected
    assert error_of(describe_snapshot, path) == expected
    good = str(tmp_path / "good.json")
    with open(good, "w") as fh:
        json.dump(_many(3000), fh)
    assert error_of(diff_snapshot_files, good, path) == error_of(snapshot._diff_typed, good, path)
    assert error_of(diff_snapshot_files, path, good) == expected


@pytest.mark.parametrize("field, value", [("dst", "010.1.0.0"), ("dst", "::ffff:10.1.0.0"), ("prefsrc", "fd00::1"),
                                          ("gateway", "not an address"), ("dst_len", 33), ("src_len", 40)])
def test_a_route_the_address_check_doubts_gets_the_records_verdict(tmp_path, field, value):
    with open(V2) as fh:
        doc = json.load(fh)
    doc["objects"]["route"][1][field] = value
    path = str(tmp_path / "route.json")
    with open(path, "w") as fh:
        json.dump(doc, fh)
    try:
        records = load_snapshot(path)
    except SnapshotError as exc:
        assert error_of(describe_snapshot, path) == str(exc)
    else:
        assert describe_snapshot(path)[1]["route"] == [r.describe() for r in records.objects["route"]]


def test_diff_by_text_finds_what_the_typed_diff_finds(tmp_path):
    b = _changed_copy(tmp_path)
    crafted = crafted_file(tmp_path)
    numbered = str(tmp_path / "numbered.json")
    os.rename(crafted_file(tmp_path, numbers_for_names), numbered)
    crafted = crafted_file(tmp_path)
    for x, y in ((V2, b), (b, V2), (V2, V2), (crafted, numbered), (numbered, crafted), (V2, crafted)):
        fast, typed = diff_snapshot_files(x, y), snapshot._diff_typed(x, y)
        assert fast == typed
    assert not any(diff_snapshot_files(crafted, numbered).values())     # other text, the same records


def test_diff_decodes_only_the_policies_and_routes_whose_text_differs(tmp_path, monkeypatch):
    from supervisor import snapshot_typed
    decoded = []

    class Counting:
        def __init__(self, real):
            self.real = real

        def decode(self, raw):
            decoded.append(raw)
            return self.real.decode(raw)

    monkeypatch.setattr(snapshot_typed, "ITEM", {k: Counting(v) for k, v in snapshot_typed.ITEM.items()})
    diff_snapshot_files(V2, V2)
    assert decoded == []
    snap = load_snapshot(V2)
    policies, routes = list(snap.objects["xfrm_policy"]), snap.objects["route"]
    policies[2] = dataclasses.replace(policies[2], priority=policies[2].priority + 1)
    routes += (dataclasses.replace(routes[0], dst="10.99.0.0"),)
    b = str(tmp_path / "b.json")
    write_snapshot(b, dataclasses.replace(snap, created=snap.created + 60,
                                          objects={**snap.objects, "xfrm_policy": tuple(policies), "route": routes}))
    result = diff_snapshot_files(V2, b)
    assert len(result["xfrm_policy"].changed) == 1 and len(result["route"].added) == 1
    assert len(decoded) == 2


def _same_records_other_head(tmp_path, edit_head) -> str:
    """A copy of V2 as the writer writes it, with the head before "objects" edited as text."""
    snap = load_snapshot(V2)
    a = str(tmp_path / "a.json")
    write_snapshot(a, snap)
    raw = open(a, "rb").read()
    at = raw.index(snapshot._OBJECTS_KEY)
    b = str(tmp_path / "b.json")
    with open(b, "wb") as fh:
        fh.write(edit_head(raw[:at]) + raw[at:])
    return a, b


def test_diff_of_two_snapshots_of_the_same_state_compares_bytes_not_records(tmp_path, monkeypatch):
    from supervisor import snapshot_typed
    decoded = []
    real = snapshot_typed.TEXT_DOCUMENT

    class Counting:
        def decode(self, raw):
            decoded.append(len(raw))
            return real.decode(raw)

    monkeypatch.setattr(snapshot_typed, "TEXT_DOCUMENT", Counting())
    a, b = _same_records_other_head(tmp_path, lambda head: head.replace(b'"host": "', b'"host": "other-'))
    assert load_snapshot(b).host.startswith("other-")
    result = diff_snapshot_files(a, b)
    assert not any(result.values()) and decoded == []
    assert result == snapshot._diff_typed(a, b)


@pytest.mark.parametrize("what, edit", [
    ("created_unix a string", lambda h: h.replace(b'"created_unix": ', b'"created_unix": "x", "was": ')),
    ("an unknown version", lambda h: h.replace(b'"version": 2', b'"version": 3')),
    ("version 1", lambda h: h.replace(b'"version": 2', b'"version": 1')),
    ("the head's last object left open", lambda h: h[:h.rindex(b"}")]),
    ("a head that is not JSON", lambda h: h.replace(b'"schema"', b"schema")),
    ("an extra key", lambda h: h + b',\n "extra": [1, {"objects": 2}]'),
])
def test_diff_of_the_same_records_under_another_head_judges_that_head(tmp_path, what, edit):
    a, b = _same_records_other_head(tmp_path, edit)
    for x, y in ((a, b), (b, a)):
        try:
            expected = snapshot._diff_typed(x, y)
        except SnapshotError as exc:
            assert error_of(diff_snapshot_files, x, y) == str(exc)
        else:
            assert diff_snapshot_files(x, y) == expected


@pytest.mark.parametrize("family, index", [("route", 2), ("xfrm_policy", 5)])
def test_another_text_of_the_same_record_is_unchanged_even_when_b_repeats_it(tmp_path, family, index):
    # a key the format does not have: other text, the same value; B repeats that record (a
    # hand-edited file): by value, as the typed diff, the copy is what B added
    doc = json.loads(open(V2).read())
    item = dict(doc["objects"][family][index], zz_extra=1)
    doc["objects"][family][index] = item
    doc["objects"][family].append(item)
    b = tmp_path / "b.json"
    b.write_text(json.dumps(doc, indent=1))
    for x, y in ((V2, str(b)), (str(b), V2)):
        fast, typed = diff_snapshot_files(x, y), snapshot._diff_typed(x, y)
        assert fast == typed and any(fast.values())
