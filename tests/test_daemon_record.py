"""The daemon record (written at once at every spawn) and how a successor takes over the ledger
(written later, beside the restart): pure tables, and the file through the checked run directory."""

from __future__ import annotations

import os
import stat
from types import SimpleNamespace

import pytest

from supervisor.daemon_record import (DaemonRecord, DaemonRecordError, load_record, record_from_document,
                                      record_path, save_record)
from supervisor.kernel.netns import NetnsIdentity
from supervisor.kernel.rules import Rule
from supervisor.kernel_state import KernelState, ReadOptions
from supervisor.ledger import HOW_BASELINE, HOW_INHERITED, OWNER_DAEMON, OWNER_FOREIGN, Ledger, LedgerEntry
from supervisor.reattach import decide_reattach, take_over, with_record

from test_reattach import BIN, BIN_ID, NS, facts, ledger, proc

RULE = Rule("inet", 220, table=220)
OTHER = Rule("inet", 220, table=100)   # the ledger tracks rule priority 220 only


def state(*records) -> KernelState:
    return KernelState(objects={"rule": tuple(records)}, netns=NetnsIdentity(NS, None), options=ReadOptions())


def ledger_of(pid, start, entries) -> Ledger:
    return Ledger(daemon_pid=pid, netns_inode=NS, started=1.0, daemon_start_time=start,
                  entries={"rule": {e.record.key(): e for e in entries}})


def test_the_record_names_the_daemon_over_an_older_ledger():
    record = DaemonRecord(NS, 600, 900, 880, True, None)
    merged = with_record(ledger(pid=500, start=777), record)
    assert (merged.daemon_pid, merged.daemon_start_time, merged.spawn_tick, merged.daemon_loaded) == (600, 900, 880, True)
    assert decide_reattach(facts(led=merged, p=proc(pid=600, start=900))).attach
    alone = with_record(None, record)           # the ledger's first write still pending
    assert alone.daemon_pid == 600 and alone.entries == {}
    assert with_record(ledger(), None) == ledger()


def test_a_record_of_a_spawn_finds_the_one_daemon_started_since():
    record = DaemonRecord(NS, None, None, 800)
    d = decide_reattach(facts(led=with_record(None, record), p=None, spawned=(proc(pid=601, start=805),)))
    assert d.attach and d.pid == 601


@pytest.mark.parametrize("doc, problem", [
    ({"schema": "x"}, "not a ipsec-supervisor/daemon document"),
    ({"schema": "ipsec-supervisor/daemon", "version": 9}, "version 9"),
    ({"schema": "ipsec-supervisor/daemon", "version": 1, "daemon_pid": "42"}, "'daemon_pid'"),
    ({"schema": "ipsec-supervisor/daemon", "version": 1, "daemon_pid": True}, "'daemon_pid'"),
    ({"schema": "ipsec-supervisor/daemon", "version": 1, "spawn_tick": -1}, "'spawn_tick'"),
    ({"schema": "ipsec-supervisor/daemon", "version": 1, "daemon_loaded": 1}, "'daemon_loaded'"),
    ({"schema": "ipsec-supervisor/daemon", "version": 1, "adoption_deadline": "soon"}, "'adoption_deadline'"),
])
def test_a_malformed_record_says_which_field(doc, problem):
    with pytest.raises(DaemonRecordError, match=problem.replace("(", r"\(")):
        record_from_document(doc, "/run/x/daemon.json")


def test_the_record_is_written_0600_atomically_in_the_checked_run_directory(tmp_path):
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    record = DaemonRecord(NS, 42, 4242, 4200, False, 1234.5)
    save_record(str(run), record)
    st = os.stat(record_path(str(run)))
    assert stat.S_IMODE(st.st_mode) == 0o600 and load_record(record_path(str(run))) == record
    assert [n for n in os.listdir(run) if n != "daemon.json"] == []          # no temporary file left
    os.chmod(run, 0o777)
    with pytest.raises(DaemonRecordError, match="writable by"):
        save_record(str(run), record)
    with pytest.raises(DaemonRecordError, match="not trusted"):
        load_record(record_path(str(run)))


def test_a_successor_takes_over_the_ledger_of_the_daemon_it_reattaches_to():
    own = ledger_of(600, 900, [LedgerEntry(OWNER_DAEMON, "added", 7, RULE)])
    t = take_over(own, DaemonRecord(NS, 600, 900, None, True, 5.0), 600, 900, state(RULE), 10.0, adopt_mode=True)
    assert t.how == "taken over" and t.resume_adoption and t.ledger.lookup(RULE).how == "added"
    t = take_over(own, None, 600, 900, None, 10.0, adopt_mode=True)            # kernel unreadable: re-read later
    assert t.ledger.stale and not t.resume_adoption


@pytest.mark.parametrize("loaded, adopt_mode, how, resumes", [
    (False, True, HOW_INHERITED, True),      # killed during the load: the adoption was still to begin
    (True, True, HOW_INHERITED, False),      # loaded, no deadline: the adoption ended (or never was)
    (False, False, HOW_INHERITED, False),    # flush mode adopts nothing
    (False, True, "added", False),           # nothing inherited: nothing to adopt
])
def test_a_successor_of_a_supervisor_killed_before_the_load_finished_begins_the_adoption(loaded, adopt_mode, how,
                                                                                        resumes):
    own = ledger_of(600, 900, [LedgerEntry(OWNER_DAEMON, how, 0, RULE)])
    t = take_over(own, DaemonRecord(NS, 600, 900, None, loaded, None), 600, 900, state(RULE), 10.0,
                  adopt_mode=adopt_mode)
    assert t.how == "taken over" and t.resume_adoption is resumes


def test_a_ledger_still_of_the_crashed_daemon_is_carried_over_and_adopted_again():
    dead = ledger_of(500, 777, [LedgerEntry(OWNER_DAEMON, "added", 7, RULE),
                                LedgerEntry(OWNER_FOREIGN, HOW_BASELINE, 0, OTHER)])
    t = take_over(dead, DaemonRecord(NS, 600, 900), 600, 900, state(RULE, OTHER), 10.0, adopt_mode=True)
    assert "still the crashed pid 500's" in t.how and t.resume_adoption
    assert (t.ledger.daemon_pid, t.ledger.daemon_start_time) == (600, 900)
    assert t.ledger.lookup(RULE).how == HOW_INHERITED and t.ledger.lookup(OTHER).owner == OWNER_FOREIGN
    assert not take_over(dead, None, 600, 900, state(RULE), 10.0, adopt_mode=False).resume_adoption
    assert take_over(dead, None, 600, 900, None, 10.0, adopt_mode=True).ledger is None   # markers then
    assert take_over(None, None, 600, 900, state(RULE), 10.0, adopt_mode=True).ledger is None


def test_the_recovery_writes_the_record_at_the_spawn_and_leaves_the_ledger_to_the_writer(tmp_path, monkeypatch):
    from supervisor import recovery as rec
    from supervisor.config import parse_config
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    cfg = parse_config(f"paths: {{run_dir: {run}, state_dir: {tmp_path}}}\n")
    r = rec.KernelRecovery(cfg)
    saves = []
    r._store.save_later = lambda: saves.append("later")
    monkeypatch.setattr(rec, "DaemonPorts", lambda pid, ignore=(): SimpleNamespace(update=lambda ev: frozenset()))
    r.on_daemon_spawned(os.getpid())
    record = load_record(record_path(str(run)))
    assert (record.daemon_pid, record.daemon_start_time is not None) == (os.getpid(), True)
    assert saves == ["later"] and not os.path.exists(run / "ledger.json")     # nothing big on the spawn path


def test_a_leftover_policy_the_running_charon_installed_again_unwatched_is_its_own():
    # The supervisor died after the spawn, before its ledger recorded the new charon's policies
    # (charon re-installs trap policies of the same key at its load): the successor must not sweep
    # them as the dead charon's at the grace's end (seen in CI: the running charon's traps deleted).
    from supervisor.kernel.xfrm import XfrmLifetimeCur, XfrmPolicy, XfrmSelector

    def policy(net: str, index: int, add_time: int) -> XfrmPolicy:
        return XfrmPolicy(XfrmSelector(2, net, 16, "10.2.0.0", 16), 1, index=index,
                          curlft=XfrmLifetimeCur(add_time=add_time))

    def ledger_with(pid, start, how, records) -> Ledger:
        return Ledger(daemon_pid=pid, netns_inode=NS, started=1.0, daemon_start_time=start,
                      entries={"xfrm_policy": {r.key(): LedgerEntry(OWNER_DAEMON, how, 7, r) for r in records}})

    old = policy("10.1.0.0", 8, 1000)                     # the dead charon's, untouched since
    same_second = policy("10.3.0.0", 16, 1999)            # the dead charon's too, in the restart's second
    again_before, again = policy("10.5.0.0", 24, 1500), policy("10.5.0.0", 40, 1999)   # replaced at the load
    now = KernelState(objects={"xfrm_policy": (old, same_second, again)}, netns=NetnsIdentity(NS, None),
                      options=ReadOptions())
    # the crashed charon's ledger (path "still the crashed pid's"), and the new one's own mid-adoption
    for how, pid, start in (("added", 500, 777), (HOW_INHERITED, 600, 900)):
        prior = ledger_with(pid, start, how, (old, same_second, again_before))
        t = take_over(prior, None, 600, 900, now, 2100.0, adopt_mode=True, daemon_since=1999.6)
        assert t.ledger.lookup(old).how == HOW_INHERITED                 # still the dead charon's leftovers
        assert t.ledger.lookup(same_second).how == HOW_INHERITED
        assert t.ledger.lookup(again).how == "added" and t.ledger.lookup(again).owner == OWNER_DAEMON
        unknown = take_over(prior, None, 600, 900, now, 2100.0, adopt_mode=True)
        assert unknown.ledger.lookup(again).how == HOW_INHERITED        # no start time: as before
