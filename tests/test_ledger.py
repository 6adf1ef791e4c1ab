"""The ownership ledger: pure event application (tables), baseline, resync, persistence, port ids.

The attribution test runs a fake daemon (a Python child holding its netlink
sockets open, as charon does) next to ``ip`` run separately, in a namespace.
"""

from __future__ import annotations

import dataclasses
import json
import os
import select
import socket
import stat
import subprocess
import sys
import time

import pytest

from supervisor.kernel import xfrm
from supervisor.kernel.addresses import Address
from supervisor.kernel.common import Action, KernelEvent
from supervisor.kernel.routes import Route
from supervisor.kernel.rules import Rule
from supervisor.kernel.xfrm import XfrmPolicy, XfrmSA, XfrmSelector, XfrmTemplate
from supervisor.kernel_state import KernelWatch, ReadOptions, read_state
from supervisor.ledger import (HOW_ADDED, HOW_BASELINE, HOW_INHERITED, OWNER_DAEMON, OWNER_FOREIGN,
                               DaemonPorts, Ledger, LedgerEntry, LedgerError, apply_event, apply_events,
                               daemon_netlink_port_ids, load_ledger, parse_proc_netlink,
                               resync_ledger, reuse_records, save_ledger, sharer, start_ledger,
                               unknown_senders)
from supervisor.ownership import decide_ownership

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V4 = socket.AF_INET
DAEMON, OTHER = 1000, 2000


def pol(src="10.1.0.0", dst="10.2.0.0", dir=xfrm.DIR_OUT, reqid=1, priority=383615) -> XfrmPolicy:
    tmpl = (XfrmTemplate(V4, "192.0.2.1", "192.0.2.2", reqid=reqid, mode=xfrm.MODE_TUNNEL),) if reqid else ()
    return XfrmPolicy(XfrmSelector(V4, src, 16, dst, 16), dir, priority=priority, templates=tmpl)


def sa(spi=0xC1234567, reqid=1) -> XfrmSA:
    return XfrmSA(V4, "192.0.2.1", spi, xfrm.IPPROTO_ESP, "192.0.2.2", reqid=reqid)


def rt(table=220, dst="10.2.0.0") -> Route:
    return Route("inet", table, dst, 16, protocol=4, gateway="192.0.2.2", oif=2, oif_name="veth0")


def ev(record, action=Action.NEW, port=DAEMON, family=None, hard=None) -> KernelEvent:
    return KernelEvent(family or record.FAMILY, action, record, port, hard=hard)


EMPTY = Ledger(daemon_pid=42, netns_inode=7, started=0.0)


def owner_of(ledger: Ledger, record) -> tuple[str, str] | None:
    entry = ledger.lookup(record)
    return None if entry is None else (entry.owner, entry.how)


# --- pure: events -----------------------------------------------------------------

@pytest.mark.parametrize("events, record, expected", [
    ([ev(pol())], pol(), (OWNER_DAEMON, HOW_ADDED)),
    ([ev(pol(), port=OTHER)], pol(), (OWNER_FOREIGN, HOW_ADDED)),
    ([ev(pol(), Action.UPDATE)], pol(), (OWNER_DAEMON, HOW_ADDED)),
    # last writer wins: charon re-installing a foreign policy makes it charon's, and back
    ([ev(pol(), port=OTHER), ev(pol(), Action.UPDATE)], pol(), (OWNER_DAEMON, HOW_ADDED)),
    ([ev(pol()), ev(pol(), Action.UPDATE, port=OTHER)], pol(), (OWNER_FOREIGN, HOW_ADDED)),
    # XFRM port 0 is what iproute2 writes into its requests: foreign like any other sender
    ([ev(pol(), port=0)], pol(), (OWNER_FOREIGN, HOW_ADDED)),
    ([ev(pol()), ev(pol(priority=5), Action.UPDATE, port=0)], pol(), (OWNER_DAEMON, HOW_ADDED)),
    # rtnetlink port 0 is the kernel itself: it refreshes what the ledger knows, never attributes
    ([ev(rt(), port=0)], rt(), None),
    ([ev(Address("inet6", "fd00::5", 128, 1, "lo"), port=0)], Address("inet6", "fd00::5", 128, 1, "lo"),
     None),
    ([ev(rt()), ev(rt(), Action.UPDATE, port=0)], rt(), (OWNER_DAEMON, HOW_ADDED)),
    ([ev(rt()), ev(rt(), Action.NEW, port=0)], rt(), (OWNER_DAEMON, HOW_ADDED)),
    ([ev(pol()), ev(pol(), Action.DELETE, port=OTHER)], pol(), None),
    ([ev(sa()), ev(sa(), Action.EXPIRE, port=0, hard=True)], sa(), None),
    ([ev(sa()), ev(sa(), Action.EXPIRE, port=0, hard=False)], sa(), (OWNER_DAEMON, HOW_ADDED)),
    ([ev(rt())], rt(), (OWNER_DAEMON, HOW_ADDED)),
    ([ev(rt(table=254))], rt(table=254), None),                     # outside the tracked table
    ([ev(Rule("inet", 220, table=220))], Rule("inet", 220, table=220), (OWNER_DAEMON, HOW_ADDED)),
    ([ev(Rule("inet", 100, table=220))], Rule("inet", 100, table=220), None),
    ([ev(pol(dir=4))], pol(dir=4), None),                             # per-socket
    ([ev(Address("inet", "10.99.0.5", 32, 1, "lo"))], Address("inet", "10.99.0.5", 32, 1, "lo"),
     (OWNER_DAEMON, HOW_ADDED)),
])
def test_events_attribute_by_sender_port(events, record, expected):
    ledger = apply_events(EMPTY, events, frozenset({DAEMON}))
    assert owner_of(ledger, record) == expected


@pytest.mark.parametrize("event, stale", [
    (KernelEvent("xfrm", Action.FLUSH, None, 0), {"xfrm_sa", "xfrm_policy"}),         # xfrm overrun
    (KernelEvent("rtnl", Action.FLUSH, None, 0), {"route", "rule", "address"}),        # rtnl overrun
    (KernelEvent("xfrm_policy", Action.FLUSH, None, OTHER), {"xfrm_policy"}),
    (KernelEvent("xfrm_sa", Action.ACQUIRE, object(), 0), set()),
])
def test_lost_notifications_and_flushes_mark_families_stale(event, stale):
    assert apply_event(EMPTY, event, frozenset({DAEMON})).stale == stale


def test_reqids_of_the_daemons_policies_and_sas_are_remembered():
    ledger = apply_events(EMPTY, [ev(pol(reqid=3)), ev(sa(reqid=4)), ev(pol("10.5.0.0", reqid=9), port=OTHER)],
                          frozenset({DAEMON}))
    ledger = apply_event(ledger, ev(pol(reqid=3), Action.DELETE), frozenset({DAEMON}))
    assert ledger.reqids == {3, 4}          # grow-only: updown rules may outlive the policy


def test_applying_events_never_changes_the_ledger_given():
    first = apply_event(EMPTY, ev(pol()), frozenset({DAEMON}))
    second = apply_event(first, ev(pol(), Action.DELETE), frozenset({DAEMON}))
    assert owner_of(first, pol()) == (OWNER_DAEMON, HOW_ADDED)
    assert owner_of(second, pol()) is None
    assert EMPTY.entries == {}


def test_unknown_senders_leave_out_the_kernel_and_known_ports():
    events = [ev(pol(), port=0), ev(pol(), port=DAEMON), ev(pol(), port=OTHER),
              KernelEvent("xfrm", Action.FLUSH, None, 5)]
    assert unknown_senders(events, frozenset({DAEMON})) == {OTHER}


# --- pure: baseline and resync ---------------------------------------------------------

class FakeState:
    def __init__(self, objects, inode=7):
        self.objects = objects
        self.options = ReadOptions()
        self.netns = {"inode": inode, "name": "x"}


def test_baseline_is_foreign_unless_inherited_or_claimed():
    mine_before, claimed, stranger = pol(reqid=1), pol("10.3.0.0", reqid=2), pol("10.7.0.0", reqid=9)
    previous = apply_event(EMPTY, ev(mine_before), frozenset({DAEMON}))
    state = FakeState({"xfrm_policy": (mine_before, claimed, stranger), "route": (rt(), rt(table=100))})
    ledger = start_ledger(state, 4242, inherited=previous, claimed=[claimed], now=5.0)
    assert (ledger.daemon_pid, ledger.netns_inode, ledger.started) == (4242, 7, 5.0)
    assert owner_of(ledger, mine_before) == (OWNER_DAEMON, HOW_INHERITED)
    assert owner_of(ledger, claimed) == (OWNER_DAEMON, HOW_INHERITED)
    assert owner_of(ledger, stranger) == (OWNER_FOREIGN, HOW_BASELINE)
    assert owner_of(ledger, rt()) == (OWNER_FOREIGN, HOW_BASELINE)
    assert owner_of(ledger, rt(table=100)) is None
    assert ledger.reqids == {1, 2}


def test_resync_forgets_what_is_gone_and_leaves_newcomers_unattributed():
    ledger = apply_events(EMPTY, [ev(pol()), ev(pol("10.3.0.0"), port=OTHER),
                                  KernelEvent("xfrm", Action.FLUSH, None, 0)], frozenset({DAEMON}))
    assert ledger.stale == {"xfrm_sa", "xfrm_policy"}
    newcomer = pol("10.5.0.0")
    after = resync_ledger(ledger, {"xfrm_policy": (pol(), newcomer), "xfrm_sa": ()})
    assert owner_of(after, pol()) == (OWNER_DAEMON, HOW_ADDED)
    assert owner_of(after, pol("10.3.0.0")) is None
    assert owner_of(after, newcomer) is None
    assert after.stale == frozenset()


def test_resync_keeps_the_entries_of_unchanged_objects_and_replaces_the_changed():
    ledger = apply_events(EMPTY, [ev(pol()), ev(rt())], frozenset({DAEMON}))
    after = resync_ledger(ledger, {"route": (rt(),), "xfrm_policy": (pol(),)})
    assert after.lookup(rt()) is ledger.lookup(rt())           # the same entry object, not a copy
    assert after.lookup(pol()) is ledger.lookup(pol())
    changed = dataclasses.replace(pol(), index=99)              # same key, other values
    again = resync_ledger(after, {"xfrm_policy": (changed,)})
    assert again.lookup(pol()).record is changed and again.lookup(pol()).owner == OWNER_DAEMON


def test_a_reread_shares_the_ledgers_records_where_nothing_changed():
    held, other_held = pol(), pol("10.3.0.0")
    ledger = apply_events(EMPTY, [ev(held), ev(other_held, port=OTHER), ev(rt())], frozenset({DAEMON}))
    fresh, changed, newcomer = pol(), dataclasses.replace(pol("10.3.0.0"), index=7), pol("10.9.0.0")
    fresh_route, untracked = rt(), rt(table=254)
    shared = reuse_records({"xfrm_policy": (fresh, changed, newcomer),
                            "route": (fresh_route, untracked), "firewall": ()}, ledger)
    policies = shared["xfrm_policy"]
    assert policies[0] is held                                # equal: the ledger's own object
    assert policies[1] is changed and policies[2] is newcomer  # changed or unknown: the read's own
    assert shared["route"][0] is ledger.lookup(rt()).record and shared["route"][1] is untracked
    assert shared["firewall"] == ()
    assert sharer(None)(fresh) is fresh                      # no ledger: nothing to share


def test_entries_of_the_same_kind_share_one_verdict():
    a, b = LedgerEntry(OWNER_FOREIGN, HOW_ADDED, 0, pol()), LedgerEntry(OWNER_FOREIGN, HOW_ADDED, 0, rt())
    assert a.verdict() is b.verdict()
    assert a.verdict() == LedgerEntry(OWNER_FOREIGN, HOW_ADDED, 0, sa()).verdict()
    assert LedgerEntry(OWNER_DAEMON, HOW_ADDED, DAEMON, pol()).verdict().detail == (
        f"added by the daemon (netlink port {DAEMON}) while the supervisor watched")


# --- persistence -------------------------------------------------------------------------

def test_ledger_round_trips_through_an_atomic_0600_file(tmp_path):
    ledger = apply_events(EMPTY, [ev(pol()), ev(sa()), ev(rt(), port=OTHER),
                                  ev(Rule("inet6", 220, table=220)),
                                  ev(Address("inet6", "fd00::5", 128, 1, "lo"), port=OTHER)],
                          frozenset({DAEMON}))
    ledger = dataclasses.replace(ledger, stale=frozenset({"route"}))
    path = str(tmp_path / "ledger.json")
    save_ledger(path, ledger)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert os.listdir(tmp_path) == ["ledger.json"]
    assert "key" not in json.dumps(json.load(open(path))["entries"]["xfrm_sa"][0]["record"]["crypt"] or {})
    loaded = load_ledger(path)
    assert loaded.entries == ledger.entries
    assert (loaded.reqids, loaded.stale, loaded.daemon_pid, loaded.netns_inode) == \
        (ledger.reqids, ledger.stale, 42, 7)


def _doc(tmp_path, mutate):
    path = tmp_path / "ledger.json"
    save_ledger(str(path), apply_event(EMPTY, ev(pol()), frozenset({DAEMON})))
    doc = json.loads(path.read_text())
    mutate(doc)
    path.write_text(json.dumps(doc))
    return str(path)


@pytest.mark.parametrize("mutate, problem", [
    (lambda d: d.update(schema="other"), "schema"),
    (lambda d: d.update(version=9), "version 9"),
    (lambda d: d.pop("started_unix"), "started_unix"),
    (lambda d: d.update(reqids=["1"]), "reqids"),
    (lambda d: d.update(stale=["firewall"]), "stale"),
    (lambda d: d["entries"].update(firewall=[]), "unknown family 'firewall'"),
    (lambda d: d["entries"]["xfrm_policy"][0].update(owner="me"), r"entries.xfrm_policy\[0\] is invalid"),
    (lambda d: d["entries"]["xfrm_policy"][0]["record"].pop("selector"), r"xfrm_policy\[0\]"),
    (lambda d: d.update(daemon_pid="x"), "daemon_pid"),
])
def test_a_corrupt_ledger_is_refused_naming_file_and_cause(tmp_path, mutate, problem):
    path = _doc(tmp_path, mutate)
    with pytest.raises(LedgerError, match=problem) as err:
        load_ledger(path)
    assert path in str(err.value)


@pytest.mark.parametrize("content, problem", [(b"", "invalid JSON"), (b"{", "invalid JSON"),
                                              (b"\xff", "UTF-8"), (b"[]", "not an object")])
def test_unreadable_ledger_text_is_refused(tmp_path, content, problem):
    path = tmp_path / "ledger.json"
    path.write_bytes(content)
    with pytest.raises(LedgerError, match=problem):
        load_ledger(str(path))


@pytest.mark.parametrize("mutate, problem", [
    (lambda d: d.update(stale=[[1]]), "stale"),                                   # unhashable: was a TypeError
    (lambda d: d.update(stale={"route": 1}), "stale"),
    (lambda d: d["entries"].update(xfrm_policy=[[1, 2]]), r"xfrm_policy\[0\] is invalid"),
    (lambda d: d["entries"].update(xfrm_policy=["x"]), r"xfrm_policy\[0\] is invalid"),
    (lambda d: d["entries"]["xfrm_policy"][0].update(record=[]), r"xfrm_policy\[0\] is invalid"),
    (lambda d: d["entries"]["xfrm_policy"][0]["record"].update(selector=[[[]]]), r"xfrm_policy\[0\] is invalid"),
    (lambda d: d["entries"]["xfrm_policy"][0].update(owner=[]), r"xfrm_policy\[0\] is invalid"),
    (lambda d: d.update(started_unix=float("inf")), "started_unix"),
    (lambda d: d.update(entries=[]), "entries"),
], ids=["stale-list-in-list", "stale-object", "entry-list", "entry-string", "record-list", "selector-nested",
        "owner-list", "started-inf", "entries-list"])
def test_wrong_element_types_are_ledger_errors_not_type_errors(tmp_path, mutate, problem):
    path = _doc(tmp_path, mutate)
    with pytest.raises(LedgerError, match=problem):
        load_ledger(path)


def test_deep_nesting_and_oversized_ledgers_are_ledger_errors(tmp_path, monkeypatch):
    path = tmp_path / "ledger.json"
    path.write_text('{"schema": ' + "[" * 200000 + "]" * 200000 + "}")
    with pytest.raises(LedgerError, match="nested too deeply|invalid"):
        load_ledger(str(path))
    deep = _doc(tmp_path, lambda d: d["entries"]["xfrm_policy"][0].update(record="HERE"))
    with open(deep) as fh:
        text = fh.read().replace('"HERE"', "[" * 900 + "]" * 900)     # json reads it; the record cannot be one
    with open(deep, "w") as fh:
        fh.write(text)
    with pytest.raises(LedgerError, match=r"xfrm_policy\[0\] is invalid"):
        load_ledger(deep)
    from supervisor import ledger as ledger_mod
    _doc(tmp_path, lambda d: None)
    monkeypatch.setattr(ledger_mod, "MAX_LEDGER_BYTES", 100)
    with pytest.raises(LedgerError, match="larger than 100 bytes"):
        load_ledger(str(path))


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown to another user)")
def test_a_ledger_others_could_write_is_not_trusted(tmp_path):
    from supervisor.ledger import UntrustedLedger
    path = _doc(tmp_path, lambda d: None)
    os.chown(path, 65534, 65534)                   # the forged ledger of the issue: another user's, 0644
    with pytest.raises(UntrustedLedger, match=r"not trusted: .*owned by uid 65534"):
        load_ledger(path, netns_inode=7)
    os.chown(path, 0, 0)
    os.chmod(path, 0o666)
    with pytest.raises(UntrustedLedger, match="writable by its group and others"):
        load_ledger(path, netns_inode=7)
    os.chmod(path, 0o600)
    os.chmod(tmp_path, 0o777)                      # a directory others can write: its files are not ours
    with pytest.raises(UntrustedLedger, match="not trusted"):
        load_ledger(path, netns_inode=7)
    os.chmod(tmp_path, 0o700)
    link = tmp_path / "link.json"
    link.symlink_to(path)
    with pytest.raises(UntrustedLedger, match="symlink"):
        load_ledger(str(link), netns_inode=7)
    assert load_ledger(path, netns_inode=7).netns_inode == 7


def test_a_ledger_must_name_this_network_namespace(tmp_path):
    from supervisor.ledger import UntrustedLedger
    path = _doc(tmp_path, lambda d: d.update(netns_inode=None))
    with pytest.raises(UntrustedLedger, match="names no network namespace"):
        load_ledger(path, netns_inode=7)
    path = _doc(tmp_path, lambda d: d.update(netns_inode=8))
    with pytest.raises(UntrustedLedger, match="another network namespace"):
        load_ledger(path, netns_inode=7)


def test_missing_ledger_and_unwritable_directory_raise(tmp_path):
    with pytest.raises(LedgerError, match="cannot read ledger"):
        load_ledger(str(tmp_path / "nope.json"))
    with pytest.raises(LedgerError, match="cannot write ledger"):
        save_ledger("/nonexistent-dir/ledger.json", EMPTY)


# --- port ids --------------------------------------------------------------------------

PROC_NETLINK = """\
sk               Eth Pid        Groups   Rmem     Wmem     Dump  Locks    Drops    Inode
000000009d4df868 0   0          00000000 0        0        0     2        0        4
00000000d182db20 6   4242       0000000c 0        0        0     2        0        1437
00000000f80394f3 0   4294963200 00000551 0        0        0     2        0        1439
"""


def test_parse_proc_netlink_reads_columns_by_header():
    socks = parse_proc_netlink(PROC_NETLINK)
    assert [(s.protocol, s.port_id, s.groups, s.inode) for s in socks] == [
        (0, 0, 0, 4), (6, 4242, 0xC, 1437), (0, 4294963200, 0x551, 1439)]


@pytest.mark.parametrize("text", ["", "sk Eth\n", "sk Eth Pid Groups Rmem Wmem Dump Locks Drops Inode\nx y\n"])
def test_parse_proc_netlink_refuses_what_it_does_not_understand(text):
    with pytest.raises(ValueError):
        parse_proc_netlink(text)


def test_port_ids_of_this_process_include_its_own_netlink_sockets(netns):
    with netns.enter():
        watch = KernelWatch()
    with watch:
        # /proc/PID/net follows the thread group leader: read from inside the namespace too
        with netns.enter():
            ports = daemon_netlink_port_ids(os.getpid())
            xfrm_only = daemon_netlink_port_ids(os.getpid(), protocols=(6,))
        assert watch.port_ids() <= ports
        assert watch.xfrm.port_id in xfrm_only
        # back home, the table lists the sockets of this namespace: ours are not among them
        assert watch.xfrm.port_id not in daemon_netlink_port_ids(os.getpid())


def test_port_ids_of_a_missing_process_raise():
    with pytest.raises(LedgerError, match="cannot read the netlink sockets of pid"):
        daemon_netlink_port_ids(2**22 + 12345)


def test_daemon_ports_reread_once_per_batch_with_an_unknown_sender():
    calls = []

    def reader(pid):
        calls.append(pid)
        return frozenset({DAEMON, 3000}) if len(calls) > 1 else frozenset({DAEMON})

    ports = DaemonPorts(9, ignore={555}, reader=reader)
    assert ports.ports == {DAEMON, 9}           # the pid too: charon stamps it into XFRM requests
    assert ports.update([ev(pol(), port=DAEMON), ev(pol(), port=555), ev(pol(), port=0)]) == {DAEMON, 9}
    assert len(calls) == 1
    assert ports.update([ev(pol(), port=3000), ev(pol(), port=3001)]) == {DAEMON, 3000, 9}
    assert len(calls) == 2


# --- attribution on a real kernel ----------------------------------------------------------

FAKE_DAEMON = r'''
import json, sys, time
sys.path.insert(0, REPO)
from supervisor.kernel import addresses, routes, rules, xfrm
from supervisor.kernel.rtnl import Rtnl
from supervisor.kernel_state import FAMILIES
spec = json.load(open(sys.argv[1]))
xs, rtnl = xfrm.open_socket(), Rtnl()          # held open for the daemon's life, as charon does
add = {"xfrm_policy": lambda r: xfrm.add_policy(r, sock=xs),
       "xfrm_sa": lambda r: xfrm.add_sa(r, sock=xs),
       "route": lambda r: routes.add_route(r, rtnl=rtnl),
       "rule": lambda r: rules.add_rule(r, rtnl=rtnl),
       "address": lambda r: addresses.add_address(r, rtnl=rtnl)}
for family, doc in spec["objects"]:
    add[family](FAMILIES[family].record_type.from_json(doc))
import subprocess
for argv in spec.get("commands", []):
    subprocess.run(argv, check=True)            # e.g. updown: a child process, like charon's
print("ready", flush=True)
time.sleep(3600)
'''.replace("REPO", repr(REPO))


def start_fake_daemon(ns, tmp_path, objects, commands=()) -> subprocess.Popen:
    """A process in NS that installs OBJECTS over netlink sockets it keeps open, then sleeps."""
    spec = tmp_path / f"daemon-{len(os.listdir(tmp_path))}.json"
    spec.write_text(json.dumps({"objects": [[r.FAMILY, r.to_json(include_keys=True)] for r in objects],
                                "commands": [list(c) for c in commands]}))
    script = tmp_path / "fake_daemon.py"
    script.write_text(FAKE_DAEMON)
    proc = subprocess.Popen(["ip", "netns", "exec", ns.name, sys.executable, str(script), str(spec)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ready, _, _ = select.select([proc.stdout], [], [], 60)
    if not ready or proc.stdout.readline().strip() != "ready":
        proc.kill()
        raise AssertionError(f"fake daemon did not start: {proc.communicate()[1]}")
    return proc


def stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait()


SETUP = """
ip link add veth0 type veth peer name veth1
ip link set veth0 up
ip link set veth1 up
ip addr add 192.0.2.1/24 dev veth0
"""


def read_events(watch: KernelWatch, wanted, timeout: float = 30.0) -> list[KernelEvent]:
    events: list[KernelEvent] = []
    deadline = time.monotonic() + timeout
    while not wanted(events):
        left = deadline - time.monotonic()
        assert left > 0, f"events never arrived: {[(e.family, e.action) for e in events]}"
        select.select([watch.xfrm, watch.rtnl], [], [], min(left, 0.5))
        events += watch.read_events()
    return events


def seen(e: KernelEvent) -> tuple:
    r = e.record
    if e.action is not Action.NEW or r is None:
        return ()
    return (e.family, {"xfrm_policy": lambda: r.selector.saddr, "route": lambda: r.dst,
                       "rule": lambda: r.fwmark, "address": lambda: r.address}.get(e.family, lambda: 0)())


def test_objects_the_daemons_sockets_add_are_its_own_and_ips_are_foreign(netns, tmp_path):
    netns.sh(SETUP)
    with netns.enter():
        watch = KernelWatch()
        baseline = start_ledger(read_state(ReadOptions()), None)
    mine = [pol(reqid=1), Route("inet", 220, "10.2.0.0", 16, protocol=4, gateway="192.0.2.2",
                                oif_name="veth0"),
            Rule("inet", 220, table=220), Address("inet", "10.99.0.5", 32, None, "lo")]
    with watch:
        daemon = start_fake_daemon(netns, tmp_path, mine)
        try:
            # look-alikes by another process: charon's band, table 220 static, a second rule at 220
            netns.sh("ip xfrm policy add src 10.3.0.0/16 dst 10.4.0.0/16 dir out priority 383615 "
                     "tmpl src 192.0.2.1 dst 192.0.2.3 proto esp reqid 7 mode tunnel\n"
                     "ip route add 10.4.0.0/16 via 192.0.2.3 dev veth0 proto static table 220\n"
                     "ip rule add priority 220 table 220 fwmark 7\n"
                     "ip addr add 10.99.0.6/32 dev lo")
            expected = {("xfrm_policy", "10.1.0.0"), ("xfrm_policy", "10.3.0.0"), ("route", "10.2.0.0"),
                        ("route", "10.4.0.0"), ("rule", None), ("rule", 7), ("address", "10.99.0.5"),
                        ("address", "10.99.0.6")}
            events = read_events(watch, lambda evs: expected <= {seen(e) for e in evs})
            ledger = apply_events(baseline, events, DaemonPorts(daemon.pid).update(events))
            with netns.enter():
                state = read_state(ReadOptions())
        finally:
            stop(daemon)
    result = decide_ownership(state.objects, ledger=ledger)

    def verdict(family, pred):
        [v] = [v for r, v in result.verdicts[family] if pred(r)]
        return v.owned, v.rule

    assert verdict("xfrm_policy", lambda p: p.selector.saddr == "10.1.0.0") == (True, "ledger:daemon")
    assert verdict("xfrm_policy", lambda p: p.selector.saddr == "10.3.0.0") == (False, "ledger:foreign")
    assert verdict("route", lambda r: r.dst == "10.2.0.0") == (True, "ledger:daemon")
    assert verdict("route", lambda r: r.dst == "10.4.0.0") == (False, "ledger:foreign")
    assert verdict("rule", lambda r: r.fwmark is None) == (True, "ledger:daemon")
    assert verdict("rule", lambda r: r.fwmark == 7) == (False, "ledger:foreign")
    assert verdict("address", lambda a: a.address == "10.99.0.5") == (True, "ledger:daemon")
    assert verdict("address", lambda a: a.address == "10.99.0.6") == (False, "ledger:foreign")
    assert len(result.owned()) == 4
