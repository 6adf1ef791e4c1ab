"""The daemon record (written at once at every spawn) and how a successor takes over the ledger
(written later, beside the restart): pure tables, and the file through the checked run directory."""

from __future__ import annotations

import os
import stat
from types import SimpleNamespace

import pytest

from supervisor.daemon_record import (DaemonRecord, DaemonRecordError, RecordedChoice, load_record,
                                      record_from_document, record_path, save_record)
from supervisor.kernel.netns import NetnsIdentity
from supervisor.kernel.rules import Rule
from supervisor.kernel_state import KernelState, ReadOptions
from supervisor.ledger import HOW_BASELINE, HOW_INHERITED, OWNER_DAEMON, OWNER_FOREIGN, Ledger, LedgerEntry
from supervisor.reattach import decide_reattach, decide_resume, recorded_choice, take_over, with_record

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
    t = take_over(own, DaemonRecord(NS, 600, 900, None, True, 5.0), 600, 900, state(RULE), 10.0, mode="adopt")
    # (an adoption deadline is recorded, but nothing inherited is left: there is nothing to adopt)
    assert t.how == "taken over" and not t.resume_adoption and t.ledger.lookup(RULE).how == "added"
    t = take_over(own, None, 600, 900, None, 10.0, mode="adopt")            # kernel unreadable: re-read later
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
                  mode="adopt" if adopt_mode else "flush")
    assert t.how == "taken over" and t.resume_adoption is resumes


def test_a_ledger_still_of_the_crashed_daemon_is_carried_over_and_adopted_again():
    dead = ledger_of(500, 777, [LedgerEntry(OWNER_DAEMON, "added", 7, RULE),
                                LedgerEntry(OWNER_FOREIGN, HOW_BASELINE, 0, OTHER)])
    t = take_over(dead, DaemonRecord(NS, 600, 900), 600, 900, state(RULE, OTHER), 10.0, mode="adopt")
    assert "still the crashed pid 500's" in t.how and t.resume_adoption
    assert (t.ledger.daemon_pid, t.ledger.daemon_start_time) == (600, 900)
    assert t.ledger.lookup(RULE).how == HOW_INHERITED and t.ledger.lookup(OTHER).owner == OWNER_FOREIGN
    assert not take_over(dead, None, 600, 900, state(RULE), 10.0, mode="flush").resume_adoption
    assert take_over(dead, None, 600, 900, None, 10.0, mode="adopt").ledger is None   # markers then
    assert take_over(None, None, 600, 900, state(RULE), 10.0, mode="adopt").ledger is None


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
        t = take_over(prior, None, 600, 900, now, 2100.0, mode="adopt", daemon_since=1999.6)
        assert t.ledger.lookup(old).how == HOW_INHERITED                 # still the dead charon's leftovers
        assert t.ledger.lookup(same_second).how == HOW_INHERITED
        assert t.ledger.lookup(again).how == "added" and t.ledger.lookup(again).owner == OWNER_DAEMON
        unknown = take_over(prior, None, 600, 900, now, 2100.0, mode="adopt")
        assert unknown.ledger.lookup(again).how == HOW_INHERITED        # no start time: as before


# --- the dead supervisor's recovery choice: recorded at the decision, followed by a successor ---------

FLUSHED = RecordedChoice("flush", True, "recovery.mode adopt, but this strongSwan cannot adopt: flushing instead",
                         "adopt")
ADOPTED = RecordedChoice("adopt", True, "recovery.mode adopt: left in place for the restarted charon", "adopt")
KEPT = RecordedChoice("keep", False, "recovery.mode keep", "keep")

# what is left: (inherited leftovers, an adoption deadline recorded, charon's load finished, the ledger
# on disk already the running charon's)
NOTHING = (0, False, False, True)
ADOPTING = (3, True, True, True)
BEFORE_LOAD = (3, False, False, True)       # killed before charon's load finished: the adoption was to come
AFTER_LOAD = (3, False, True, True)         # loaded, no adoption open: it ended (or never was)
CRASHED_LEDGER = (3, False, True, False)    # killed before the new run's ledger was written


@pytest.mark.parametrize("dead, mode, left, adopts, why", [
    # the dead supervisor's choice decides, whatever this one's mode
    (FLUSHED, "adopt", BEFORE_LOAD, False, "chose flush"),          # the issue: never an adoption of a flush
    (FLUSHED, "adopt", CRASHED_LEDGER, False, "chose flush"),
    (FLUSHED, "adopt", AFTER_LOAD, False, "chose flush"),
    (FLUSHED, "flush", BEFORE_LOAD, False, "chose flush"),
    (KEPT, "adopt", BEFORE_LOAD, False, "chose keep"),
    (KEPT, "adopt", CRASHED_LEDGER, False, "chose keep"),
    (ADOPTED, "flush", ADOPTING, True, "was in progress"),          # finished although this one would flush
    (ADOPTED, "keep", BEFORE_LOAD, True, "died before its adoption began"),
    (ADOPTED, "adopt", BEFORE_LOAD, True, "died before its adoption began"),
    (ADOPTED, "adopt", CRASHED_LEDGER, True, "died before its adoption began"),
    (ADOPTED, "adopt", ADOPTING, True, "was in progress"),
    (ADOPTED, "adopt", AFTER_LOAD, False, "had ended"),
    (ADOPTED, "adopt", NOTHING, False, "nothing the dead daemon owned is left"),
    (FLUSHED, "adopt", NOTHING, False, "nothing the dead daemon owned is left"),
    # no choice recorded (an older supervisor, an unreadable record): by this one's mode, as before
    (None, "adopt", BEFORE_LOAD, True, "no recovery choice recorded"),
    (None, "adopt", CRASHED_LEDGER, True, "no recovery choice recorded"),
    (None, "adopt", AFTER_LOAD, False, "no recovery choice recorded"),
    (None, "flush", BEFORE_LOAD, False, "no recovery choice recorded"),
    (None, "flush", CRASHED_LEDGER, False, "no recovery choice recorded"),
    (None, "flush", ADOPTING, True, "no recovery choice recorded"),  # an open adoption went on before too
])
def test_a_successor_follows_the_recovery_the_dead_supervisor_chose(dead, mode, left, adopts, why):
    count, open_, loaded, current = left
    r = decide_resume(dead, None if dead else "the problem", mode, fail_closed=False, left=count,
                      adoption_open=open_, loaded=loaded, ledger_current=current)
    assert r.adopt is adopts and why in r.why and r.left == count
    assert r.recorded is (dead is not None)
    if dead is not None:
        assert r.choice == dead                     # carried on for the next successor
    else:
        assert "the problem" in r.why and (r.choice.action == "adopt" if adopts else r.choice is None)
    if dead is not None and dead.action != "adopt" and count:
        assert dead.reason in r.why and (f"recovery.mode is {mode}" in r.why) is (mode != dead.mode)


def test_take_over_follows_the_recorded_flush_in_both_kinds_of_ledger():
    own = ledger_of(600, 900, [LedgerEntry(OWNER_DAEMON, HOW_INHERITED, 0, RULE)])      # the new run's
    dead = ledger_of(500, 777, [LedgerEntry(OWNER_DAEMON, "added", 7, RULE)])           # still the crashed one's
    for prior in (own, dead):
        unloaded = DaemonRecord(NS, 600, 900, None, False, None, FLUSHED)
        assert take_over(prior, unloaded, 600, 900, state(RULE), 10.0, mode="adopt").resume_adoption
        t = take_over(prior, unloaded, 600, 900, state(RULE), 10.0, mode="adopt", recorded=FLUSHED)
        assert not t.resume_adoption and t.resume.choice == FLUSHED and t.ledger.lookup(RULE).how == HOW_INHERITED


@pytest.mark.parametrize("record, problem, choice, why", [
    (DaemonRecord(NS, 600, 900, recovery=FLUSHED), None, FLUSHED, None),
    (DaemonRecord(NS, None, None, 880, recovery=FLUSHED), None, FLUSHED, None),      # its spawn: pid not yet known
    (DaemonRecord(NS, None, None, 950, recovery=FLUSHED), None, None, "not of pid 600's run"),   # a later spawn
    (DaemonRecord(NS, 599, 900, recovery=FLUSHED), None, None, "names pid 599, not 600"),
    (DaemonRecord(NS, 600, 900, recovery_problem="written by an older version"), None, None, "older version"),
    (DaemonRecord(NS, 600, 900), None, None, None),                                   # no choice was made
    (None, "daemon record /run/x/daemon.json is not usable: not JSON", None, "not JSON"),
])
def test_the_choice_read_is_the_one_recorded_for_the_running_daemons_run(record, problem, choice, why):
    got, got_why = recorded_choice(record, problem, 600, 900)
    assert got == choice and (got_why is None if why is None else why in got_why)


@pytest.mark.parametrize("recovery, problem", [
    ("flush", "'recovery' in its daemon record is not an object"),
    ({"action": "purge", "fail_closed": True, "reason": "x", "mode": "adopt"}, "'recovery.action' in its daemon "
                                                                              "record is 'purge', not one of"),
    ({"action": "flush", "fail_closed": True, "reason": "x", "mode": None}, "'recovery.mode'"),
    ({"action": "flush", "fail_closed": "yes", "reason": "x", "mode": "adopt"}, "'recovery.fail_closed'"),
    ({"action": "flush", "fail_closed": True, "reason": 7, "mode": "adopt"}, "'recovery.reason'"),
])
def test_a_malformed_recovery_choice_costs_only_the_choice(recovery, problem):
    doc = {**DaemonRecord(NS, 600, 900, None, True).to_json(), "recovery": recovery}
    record = record_from_document(doc)
    assert record.recovery is None and problem in record.recovery_problem
    assert (record.daemon_pid, record.daemon_start_time, record.daemon_loaded) == (600, 900, True)   # still usable


def test_the_choice_is_on_disk_before_the_crashs_recovery_acts(tmp_path, monkeypatch):
    """The decision point: choose_recovery's choice (here flush, as this strongSwan cannot adopt) is in
    the daemon record before the flush and the restart."""
    from supervisor import recovery as rec
    from supervisor.config import parse_config
    from supervisor.policy import Action, Cause, Decision, ExitClass, ExitInfo
    from supervisor.strongswan_conf import AdoptCapability
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    r = rec.KernelRecovery(parse_config(f"recovery: {{mode: adopt}}\npaths: {{run_dir: {run}, state_dir: {tmp_path}}}\n"))
    r._capability = AdoptCapability(False, (5, 9, 8), False, problems=("policy_update is off",))
    monkeypatch.setattr(r, "_ike_daemons", lambda *a, **kw: [])
    seen = []
    monkeypatch.setattr(r, "_recover_before_restart", lambda choice, *a: seen.append(
        (choice.action, load_record(record_path(str(run))).recovery)) or {})
    r.on_daemon_exit(ExitInfo(42, None, 9, False, Cause.NONE, ExitClass.SIGNALED, 1.0, 2.0),
                     Decision(Action.RESTART, "restart"))
    (action, on_disk), = seen
    assert action == "flush" and on_disk.action == "flush" and on_disk.mode == "adopt"
    assert "cannot adopt" in on_disk.reason and on_disk.fail_closed


def _old_record(doc: dict) -> dict:
    return {k: v for k, v in doc.items() if k != "recovery"}


@pytest.mark.parametrize("dead, mode, adopts, logged", [
    (FLUSHED, "adopt", False, "the earlier supervisor chose flush"),
    (ADOPTED, "flush", True, "the earlier supervisor chose adopt and died before its adoption began"),
    ("older", "adopt", True, "no recovery choice recorded (its daemon record has no 'recovery' field"),
    ({"action": "purge"}, "adopt", True, "no recovery choice recorded ('recovery.action' in its daemon record "
                                         "is 'purge'"),
])
def test_a_reattaching_supervisor_follows_the_choice_in_the_daemon_record(tmp_path, monkeypatch, caplog, dead, mode,
                                                                         adopts, logged):
    """Through KernelRecovery's take-over: the dead supervisor's ledger (the running charon's, one inherited
    leftover) and daemon record (killed before charon's load finished) on disk, this one configured MODE."""
    import json

    from supervisor import recovery as rec
    from supervisor.config import parse_config
    from supervisor.ledger import ledger_path, save_ledger
    from supervisor.reattach import process_start_time
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    pid = os.getpid()
    start = process_start_time(pid)
    save_ledger(ledger_path(str(run)), ledger_of(pid, start, [LedgerEntry(OWNER_DAEMON, HOW_INHERITED, 0, RULE)]))
    doc = DaemonRecord(NS, pid, start, None, False, None, dead if isinstance(dead, RecordedChoice) else None).to_json()
    doc = _old_record(doc) if dead == "older" else {**doc, "recovery": dead} if isinstance(dead, dict) else doc
    (run / "daemon.json").write_text(json.dumps(doc))
    os.chmod(run / "daemon.json", 0o600)
    cfg = parse_config(f"recovery: {{mode: {mode}}}\nsnapshots: {{enabled: false}}\n"
                       f"paths: {{run_dir: {run}, state_dir: {tmp_path}}}\n")
    r = rec.KernelRecovery(cfg, reader=lambda options, families=None: state(RULE))
    monkeypatch.setattr(rec, "DaemonPorts", lambda pid, ignore=(): SimpleNamespace(update=lambda ev: frozenset()))
    with caplog.at_level("INFO", logger="supervisor.recovery"):
        r.on_daemon_reattached(pid, start)
    assert logged in caplog.text
    assert r.adoption_coming() is adopts and [c.key() for c, _ in r._carry] == ([RULE.key()] if adopts else [])
    assert r.ledger.lookup(RULE).how == HOW_INHERITED           # the leftover stays the dead daemon's either way
    if isinstance(dead, RecordedChoice):
        assert dead.action in r._carry_choice.reason if adopts else r._carry_choice is None
        warned = [rec_ for rec_ in caplog.records if rec_.levelname == "WARNING" and "re-attach:" in rec_.getMessage()]
        assert not warned
    else:
        assert any(x.levelname == "WARNING" and logged in x.getMessage() for x in caplog.records)
    # what it followed is in its own record: a supervisor killed next follows the same
    again = load_record(record_path(str(run)))
    assert again.daemon_pid == pid and again.recovery is not None
    if isinstance(dead, RecordedChoice):
        assert again.recovery == dead
    else:       # the adoption this one resumed by its own mode
        assert again.recovery.action == "adopt" and again.recovery.mode == mode
