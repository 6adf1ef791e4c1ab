"""``snapshot show FILE --json`` prints the bytes it printed when it built every record.

The reference is ``commands.snapshot._print_records_json`` of the loaded snapshot (every record's
to_json, encoded and formatted): the way that stays for version 1 files and systems without msgspec. The way of
snapshot_show (structs encoded as they were decoded, no policy or route record) must give the
same stdout, stderr and exit code for every file: written ones of every shape, hand-edited ones
(numbers for names, hex in capitals, keys in another order, escapes) and corrupt ones.
No kernel needed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import subprocess
import sys

import pytest

from supervisor import cli, snapshot
from supervisor.commands import snapshot as command
from supervisor.errors import ExitCode
from supervisor.kernel.addresses import Address
from supervisor.kernel.routes import NextHop, Route
from supervisor.kernel.xfrm import (XfrmAlgorithm, XfrmLifetime, XfrmLifetimeCur, XfrmPolicy, XfrmSelector,
                                    XfrmTemplate)
from supervisor.snapshot import load_snapshot, write_snapshot

msgspec = pytest.importorskip("msgspec")
from supervisor import snapshot_show  # noqa: E402 - needs msgspec
from test_snapshot_typed import CORRUPT  # noqa: E402 - its kinds of damage to a version 2 file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "snapshots")
V2 = os.path.join(FIXTURES, "tunnels-crash-v2.json")
V1 = ("tunnels-crash", "trap-crash", "foreign-only")
REFERENCE = ("import sys; from supervisor.commands import snapshot as s; "
             "from supervisor.snapshot import load_snapshot; "
             "s._show_json = lambda path: s._print_records_json(load_snapshot(path)); "
             "from supervisor.cli import run; run()")
ODD_TEXT = 'é "quoted" back\\slash \x01 tab\t \u2028 \x7f 😀'


def show(path: str, monkeypatch, capsysbinary, reference: bool) -> tuple[bytes, bytes, int]:
    """(stdout, stderr, exit code) of ``snapshot show PATH --json`` in this process."""
    with monkeypatch.context() as m:
        m.setattr(snapshot, "keep_until_exit", lambda keep: None)     # (a test process lives on)
        if reference:
            m.setattr(command, "_show_json", lambda path: command._print_records_json(snapshot.load_snapshot(path)))
        capsysbinary.readouterr()
        rc = cli.main(["snapshot", "show", path, "--json"])
        out, err = capsysbinary.readouterr()
    return out, err, rc


def same_both_ways(path: str, monkeypatch, capsysbinary) -> tuple[bytes, bytes, int]:
    new = show(path, monkeypatch, capsysbinary, reference=False)
    old = show(path, monkeypatch, capsysbinary, reference=True)
    assert new[2] == old[2] and new[1] == old[1]
    assert new[0] == old[0], _first_difference(new[0], old[0])
    return new


def _first_difference(a: bytes, b: bytes) -> str:
    at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"first difference at byte {at}: {a[at - 80:at + 80]!r} != {b[at - 80:at + 80]!r}"


def base() -> snapshot.Snapshot:
    return load_snapshot(V2)


def with_objects(snap: snapshot.Snapshot, **families) -> snapshot.Snapshot:
    return dataclasses.replace(snap, objects={**snap.objects, **{k: tuple(v) for k, v in families.items()}})


SEL4 = XfrmSelector(2, "10.1.0.0", 16, "10.2.0.0", 16)
TMPL4 = XfrmTemplate(2, "192.0.2.1", "192.0.2.2", 50, 0, 1, 1)
POLICIES = (
    XfrmPolicy(SEL4, 1, priority=375423, index=1, templates=(TMPL4,)),
    XfrmPolicy(SEL4, 1, mark=(0xFFFFFFFF, 0xFFFFFFFF), if_id=0xFFFFFFFF, index=2, templates=(TMPL4, TMPL4)),
    XfrmPolicy(SEL4, 0, action=1, priority=2**70, index=-5, flags=2**63, ptype=1,
               lifetime=XfrmLifetime(soft_byte_limit=0, hard_add_expires_seconds=2**64 - 1),
               curlft=XfrmLifetimeCur(2**64 - 1, 2**63, 1764288000, 0)),
    XfrmPolicy(XfrmSelector(0, "0A 0b", 0, "", 0, ifindex=-(2**31)), 5, action=9, share=17, ptype=200,
               attrs=((8, bytes.fromhex("00ff")), (2**16 - 1, b"")), index=3),
    XfrmPolicy(XfrmSelector(10, "fd00:1::", 64, "fd00:2::", 64, 17, 500, 0xFFFF, 4500, 0xFFFF, 3, 1000), 2,
               templates=(XfrmTemplate(10, "2001:db8::1", "2001:db8::2", 255, 0xFFFFFFFF, 7, 4, 3, 1, 0, 0, 0),
                          XfrmTemplate(0, "", "", 60, 0, 0, 9, 9)), index=4),
)
ROUTES = (
    Route("inet", 220, "10.128.0.0", 24, 1, 4, 0, "192.0.2.2", 3, "veth0", "10.99.0.5"),
    Route("inet", 4294967295, "0.0.0.0", 0, 200, 99, 7, None, None, None, None, None, 0, 255, 2**32 - 1,
          nhid=2**32 - 1, pref=255, flags=2**32 - 1, expires=2**32 - 1),
    Route("inet6", 220, "fd00:2::", 64, 1, 4, 0, None, 4, ODD_TEXT, "2001:db8::1", "fd00:1::", 64, 0, 1024,
          (("advmss", 1400), ("cc_algo", ODD_TEXT), ("mtu", 0)),
          (NextHop("2001:db8::2", 3, "veth0", 1, 0), NextHop("fe80::1", None, "ü", 256, 255)), None, 1, 0, 300),
    Route("inet", 220, "10.0.0.0", 8, 6, 4, 253, None, 3, 'e"1', None, None),
    Route("inet", 220, "10.3.0.0", 16, 1, 4, 0, None, None, None, None, None,
          multipath=(NextHop("192.0.2.2", 3, "veth0", 1, 0), NextHop(None, 4, None, 2, 1))),
    Route("inet", 220, "10.4.0.0", 16, 1, 4, 0, "192.0.2.2", 3, "veth0", None, None, metrics=(("mtu", 1400),)),
    Route("inet6", 220, "fe80::1%eth0", 128, 1, 4, 0, "::ffff:1.2.3.4", 3, "eth\\0", None, None),
)


def written(tmp_path, name: str, snap: snapshot.Snapshot) -> str:
    path = str(tmp_path / f"{name}.json")
    write_snapshot(path, snap)
    return path


def odd_small_families(snap: snapshot.Snapshot) -> snapshot.Snapshot:
    addresses = list(snap.objects["address"])
    addresses[0] = dataclasses.replace(addresses[0], label=ODD_TEXT, ifname="wlan-é")
    addresses.append(Address("inet6", "2001:db8::1", 128, None, None, valid_lft=2**32 - 1))
    rules = [dataclasses.replace(r, comment=ODD_TEXT) if r.backend == "nft" else r for r in snap.objects["firewall"]]
    sas = list(snap.objects["xfrm_sa"])
    sas[0] = dataclasses.replace(sas[0], crypt=XfrmAlgorithm("cbc(aes)", 128, "5a" * 16))
    return dataclasses.replace(with_objects(snap, address=addresses, firewall=rules, xfrm_sa=sas), keys_included=True,
                               host="hôte", netns={"inode": 2**40, "name": ODD_TEXT},
                               context={**snap.context, "note": ODD_TEXT, "ratio": 0.1})


WRITTEN = {
    "the committed version 2 fixture": lambda s: s,
    "every family empty": lambda s: dataclasses.replace(s, objects={n: () for n in s.objects}, daemon=None),
    "policies and routes only": lambda s: dataclasses.replace(
        s, objects={n: (recs if n in ("xfrm_policy", "route") else ()) for n, recs in s.objects.items()}),
    "no policies and no routes": lambda s: with_objects(s, xfrm_policy=(), route=()),
    "marks, templates, attributes, lifetimes, large and negative numbers": lambda s: with_objects(
        s, xfrm_policy=POLICIES, route=ROUTES),
    "non-ASCII and escaped strings in the small families, keys included": odd_small_families,
    "a fraction of a second, daemon without exit": lambda s: dataclasses.replace(
        s, created=1764288000.123456, daemon={"pid": 1}),
}


@pytest.mark.parametrize("edit", list(WRITTEN.values()), ids=list(WRITTEN))
def test_a_written_version_2_file_prints_the_same_bytes_as_from_records(edit, tmp_path, monkeypatch,
                                                                         capsysbinary):
    path = written(tmp_path, "s", edit(base()))
    out, _, rc = same_both_ways(path, monkeypatch, capsysbinary)
    assert rc == ExitCode.OK and out.endswith(b"\n}\n")


@pytest.mark.parametrize("batch", [1, 2, 7])
def test_records_formatted_a_few_at_a_time_print_the_same(batch, tmp_path, monkeypatch, capsysbinary):
    monkeypatch.setattr(snapshot_show, "BATCH", batch)
    path = written(tmp_path, "s", with_objects(odd_small_families(base()), xfrm_policy=POLICIES, route=ROUTES))
    same_both_ways(path, monkeypatch, capsysbinary)


@pytest.mark.parametrize("name", V1)
def test_a_version_1_file_prints_the_same_bytes(name, monkeypatch, capsysbinary):
    same_both_ways(os.path.join(FIXTURES, f"{name}.json"), monkeypatch, capsysbinary)


def _policy(doc, i=12):
    return doc["objects"]["xfrm_policy"][i]


def _route(doc, i=0):
    return doc["objects"]["route"][i]


def _reordered(d: dict) -> None:
    items = list(d.items())[::-1]
    d.clear()
    d.update(items)


# Documents this program does not write but reads: each item's struct spells something otherwise than
# its record's to_json, or the document differs from what the writer makes in a way loading accepts.
EDITED = [
    ("policy numbers for named values", lambda d: _policy(d, 0).update(dir=1, action=0, share=0, ptype=0)),
    ("selector family as a number", lambda d: _policy(d, 1)["selector"].update(family=2)),
    ("template numbers for named values", lambda d: _policy(d, 2)["templates"][0].update(
        family=2, proto=50, mode=1, share=0)),
    ("attribute hex in capitals", lambda d: _policy(d)["attrs"][0].update(data="0A0BFF")),
    ("attribute hex with spaces", lambda d: _policy(d)["attrs"][0].update(data="01 02 00 04 00 00 00 00")),
    ("lifetime spelled out as the default", lambda d: _policy(d, 0).update(
        lifetime={**dict.fromkeys(("soft_byte_limit", "hard_byte_limit", "soft_packet_limit", "hard_packet_limit"),
                                  2**64 - 1),
                  **dict.fromkeys(("soft_add_expires_seconds", "hard_add_expires_seconds",
                                   "soft_use_expires_seconds", "hard_use_expires_seconds"), 0)})),
    ("keys in another order", lambda d: [_reordered(x) for x in (_policy(d, 0), _policy(d, 0)["selector"],
                                                                 _route(d), _route(d, 2))]),
    ("an unknown key in a policy and a route", lambda d: (_policy(d, 3).update(extra=[1, {"a": None}]),
                                                          _route(d).update(extra="x"))),
    ("route keys the writer always writes left out", lambda d: [_route(d).pop(k) for k in (
        "metrics", "multipath", "nhid", "pref", "expires", "gateway", "oif", "oif_name", "prefsrc", "src")]),
    ("route numbers without names", lambda d: _route(d).update(type=200, protocol=99, scope=7)),
    ("route metric values as strings", lambda d: _route(d, 2)["metrics"].update(mtu="lock 1400")),
    ("route metrics out of order", lambda d: _reordered(_route(d, 2)["metrics"])),
    ("routes of more kinds than a batch names at once", lambda d: d["objects"]["route"].extend(
        {**_route(d), "type": t, "protocol": p, "scope": sc} for t in (1, 2, 13) for p in (4, 3, 250)
        for sc in (0, 253, 100))),
    ("families left out", lambda d: [d["objects"].pop(n) for n in ("route", "firewall")]),
    ("created_unix an integer", lambda d: d.update(created_unix=1764288000)),
    ("a policy for each name of every field", lambda d: d["objects"]["xfrm_policy"].extend(
        {**_policy(d, 0), "dir": dr, "action": ac, "share": sh, "ptype": pt}
        for dr in range(7) for ac, sh, pt in ((0, 1, 1), (1, 2, 0), (2, 3, 0), (0, 4, 2)))),
]


@pytest.mark.parametrize("edit", [e for _, e in EDITED], ids=[w for w, _ in EDITED])
def test_a_hand_edited_version_2_file_prints_what_its_records_say(edit, tmp_path, monkeypatch, capsysbinary):
    with open(V2) as fh:
        doc = json.load(fh)
    edit(doc)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(doc, indent=1))
    out, _, rc = same_both_ways(str(path), monkeypatch, capsysbinary)
    assert rc == ExitCode.OK


def test_escapes_in_the_file_print_as_their_records_encode_them(tmp_path, monkeypatch, capsysbinary):
    with open(V2, "rb") as fh:
        raw = fh.read()
    raw = raw.replace(b'"oif_name":"veth0"', b'"oif_name":"v\\u0065th\\/0\\u00e9\\ud83d\\ude00"', 1)
    raw = raw.replace(b'"host": "fixture"', b'"host": "fix\\u0074ure \\u2028"', 1)
    raw = raw.replace(b'"priority":1024,', b'"priority":1024,"priority":7,', 1)    # a key twice: the last wins
    assert raw.count(b"\\u0065") == 1
    path = tmp_path / "escaped.json"
    path.write_bytes(raw)
    out, _, _ = same_both_ways(str(path), monkeypatch, capsysbinary)
    assert "veth/0é😀".encode() in out


@pytest.mark.parametrize("edit", [e for _, e, _ in CORRUPT], ids=[w for w, _, _ in CORRUPT])
def test_a_corrupt_file_fails_with_the_same_message_and_exit_code(edit, tmp_path, monkeypatch, capsysbinary):
    with open(V2) as fh:
        doc = json.load(fh)
    edit(doc)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    out, err, rc = same_both_ways(str(path), monkeypatch, capsysbinary)
    assert rc == ExitCode.BAD_SNAPSHOT and out == b"" and b"is not usable" in err


@pytest.mark.parametrize("content", [
    b"", b"  \n", b"{", b"[1, 2]", b"\xff\xfe{}", b'{"schema": "ipsec-supervisor/snapshot", "version": 3}',
    open(V2, "rb").read()[:-30], open(V2, "rb").read().replace(b'"version": 2', b'"version": 1'),
    b"[" * 100_000 + b"]" * 100_000,
], ids=["empty", "blank", "truncated-brace", "a-list", "not-utf8", "future-version", "truncated", "v2-as-v1",
        "deep"])
def test_an_unreadable_file_fails_the_same_way(content, tmp_path, monkeypatch, capsysbinary):
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    _, err, rc = same_both_ways(str(path), monkeypatch, capsysbinary)
    assert rc == ExitCode.BAD_SNAPSHOT and str(path).encode() in err


def test_a_missing_file_or_a_directory_fails_the_same_way(tmp_path, monkeypatch, capsysbinary):
    for path in (str(tmp_path / "none.json"), str(tmp_path)):
        _, err, rc = same_both_ways(path, monkeypatch, capsysbinary)
        assert rc == ExitCode.BAD_SNAPSHOT and b"cannot read snapshot" in err


def test_policies_and_routes_of_a_written_file_are_never_built_as_records(tmp_path, monkeypatch):
    from supervisor import snapshot_typed
    path = written(tmp_path, "s", with_objects(base(), xfrm_policy=POLICIES[:2] * 50, route=ROUTES[:1] * 100))
    for name in ("xfrm_policy", "route"):
        monkeypatch.setitem(snapshot_typed.RECORDS, name, lambda *a: pytest.fail("a record was built"))
    snap, structs = snapshot.load_for_json(path)
    data = b"".join(snapshot_show.document(snap, structs))
    sas = len(snap.objects["xfrm_sa"])         # (SAs have a lifetime too)
    assert data.count(b'"lifetime": {') == 100 + sas and data.count(b'"type_name": "unicast"') == 100


def test_without_msgspec_show_json_is_the_json_module_way(monkeypatch, capsysbinary):
    monkeypatch.setattr(snapshot, "msgspec", None)
    assert snapshot.load_for_json(V2) is None
    out, _, rc = show(V2, monkeypatch, capsysbinary, reference=False)
    monkeypatch.setattr(snapshot, "msgspec", msgspec)
    assert rc == ExitCode.OK and json.loads(out) == json.loads(show(V2, monkeypatch, capsysbinary, True)[0])


def test_the_show_schema_reads_what_the_typed_schema_reads():
    """Its errors are load_snapshot's because it accepts the same documents (a file it refuses goes the
    typed way, which words the fault)."""
    assert snapshot_show.same_schema()


def many_tunnels(n: int) -> snapshot.Snapshot:
    """N tunnels as charon leaves them: out/in/fwd policies and a table-220 route each."""
    policies, routes = [], []
    for i in range(n):
        remote, peer = f"10.{128 + i // 256}.{i % 256}.0", f"198.51.{i // 256}.{i % 256}"
        for d, (src, dst) in enumerate((("10.1.0.0", remote), (remote, "10.1.0.0"), (remote, "10.1.0.0"))):
            t = XfrmTemplate(2, "192.0.2.1" if d == 1 else peer, peer if d == 1 else "192.0.2.1", 50, 0, i + 1, 1)
            policies.append(XfrmPolicy(XfrmSelector(2, src, 16, dst, 24), (1, 0, 2)[d], priority=375423,
                                       index=8 * i + d, templates=(t,), curlft=XfrmLifetimeCur(0, 0, 1764288000 + i, 0)))
        routes.append(Route("inet", 220, remote, 24, 1, 4, 0, "192.0.2.2", 3, "veth0", "10.1.0.1"))
    return with_objects(base(), xfrm_policy=policies, route=routes)


def test_the_program_prints_the_same_bytes_for_2000_tunnels_and_a_corrupt_file(tmp_path):
    """As run: stdout a pipe, written from the formatted bytes, the quick exit."""
    good = written(tmp_path, "many", many_tunnels(2000))
    bad = tmp_path / "bad.json"
    bad.write_bytes(open(good, "rb").read().replace(b'"daddr":"10.128.0.0"', b'"daddr":"10.128.0.999"', 1))
    for path in (good, str(bad)):
        new = subprocess.run([sys.executable, "-m", "supervisor.cli", "snapshot", "show", path, "--json"],
                             cwd=ROOT, capture_output=True)
        old = subprocess.run([sys.executable, "-c", REFERENCE, "snapshot", "show", path, "--json"],
                             cwd=ROOT, capture_output=True)
        assert (new.returncode, new.stderr) == (old.returncode, old.stderr)
        assert new.stdout == old.stdout, _first_difference(new.stdout, old.stdout)
    assert new.returncode == ExitCode.BAD_SNAPSHOT and b"objects.xfrm_policy[0] is invalid" in new.stderr


def test_an_output_encoding_other_than_utf8_prints_the_same(tmp_path):
    path = written(tmp_path, "odd", with_objects(base(), route=ROUTES[:1] + (dataclasses.replace(
        ROUTES[0], oif_name="vé"),)))
    for encoding in ("latin-1", "ascii"):
        env = {**os.environ, "PYTHONIOENCODING": encoding}
        runs = [subprocess.run(argv + ["snapshot", "show", path, "--json"], cwd=ROOT, capture_output=True, env=env)
                for argv in ([sys.executable, "-m", "supervisor.cli"], [sys.executable, "-c", REFERENCE])]
        assert runs[0].returncode == runs[1].returncode and runs[0].stdout == runs[1].stdout
        if encoding == "latin-1":
            assert runs[0].returncode == 0 and "vé".encode("latin-1") in runs[0].stdout


def _through_pipes(*argv_files: str, command: str) -> subprocess.CompletedProcess:
    """``ipsec-supervisor snapshot COMMAND`` as a process, each file given as a pipe (bash's <(cat F)):
    its bytes can be read once."""
    pipes = " ".join(f"<(cat {shlex.quote(f)})" for f in argv_files)
    return subprocess.run(["bash", "-c", f"{shlex.quote(sys.executable)} -m supervisor.cli snapshot {command} {pipes}"
                           + (" --json" if command == "show" else "")],
                          cwd=ROOT, capture_output=True)


@pytest.mark.parametrize("name", V1)
def test_a_version_1_file_through_a_pipe_is_shown_as_from_the_file(name):
    path = os.path.join(FIXTURES, f"{name}.json")
    piped = _through_pipes(path, command="show")
    direct = subprocess.run([sys.executable, "-c", REFERENCE, "snapshot", "show", path, "--json"], cwd=ROOT,
                            capture_output=True)
    assert piped.returncode == direct.returncode == 0, piped.stderr
    assert piped.stdout == direct.stdout and piped.stderr == direct.stderr == b""


def test_a_bad_file_through_a_pipe_gets_its_own_error_not_empty(tmp_path):
    bad = tmp_path / "truncated.json"
    bad.write_bytes(open(V2, "rb").read()[:5000])
    for command, files in (("show", (str(bad),)), ("diff", (str(bad), V2)), ("diff", (V2, str(bad)))):
        r = _through_pipes(*files, command=command)
        assert r.returncode == ExitCode.BAD_SNAPSHOT, r.stderr
        assert b"invalid JSON at line" in r.stderr and b"empty" not in r.stderr, r.stderr


def test_version_1_files_through_pipes_are_diffed_as_the_files():
    a, b = (os.path.join(FIXTURES, f"{n}.json") for n in ("tunnels-crash", "trap-crash"))
    piped = _through_pipes(a, b, command="diff")
    direct = subprocess.run([sys.executable, "-m", "supervisor.cli", "snapshot", "diff", a, b], cwd=ROOT,
                            capture_output=True)
    assert piped.returncode == direct.returncode and piped.stderr == direct.stderr == b"", piped.stderr
    assert piped.stdout == direct.stdout and b"XFRM SAs: +0 -9" in piped.stdout


@pytest.mark.parametrize("command", ["show", "show --json", "diff"])
def test_bytes_that_are_not_utf8_inside_a_record_are_named_not_a_traceback(tmp_path, command):
    raw = open(V2, "rb").read()
    at = raw.index(b'"oif_name":"') + len(b'"oif_name":"')
    bad = tmp_path / "bad.json"
    bad.write_bytes(raw[:at] + b"\xff" + raw[at:])
    argv = [sys.executable, "-m", "supervisor.cli", "snapshot", *command.split()[:1], str(bad)]
    argv += [V2] if command == "diff" else ["--json"] if command.endswith("--json") else []
    r = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == ExitCode.BAD_SNAPSHOT and f"not UTF-8 text (byte {at})" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
