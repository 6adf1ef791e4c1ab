"""A crash's snapshot is written after charon's restart: what it holds, and what a supervisor killed
meanwhile leaves (the intent record, turned into a snapshot that says it was lost and why).

The fake daemon (tests/fake_ikd.py) installs 2,000 objects over its own netlink sockets;
another process adds foreign state next to them. Small sizes of bench/bench_crash.py: behaviour,
not times.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time

import pytest

from supervisor.crash_snapshots import INTENT_PREFIX
from supervisor.kernel import xfrm
from supervisor.kernel.routes import Route
from supervisor.ownership import is_supervisor_block
from supervisor.snapshot import load_snapshot

from test_flush import SETUP
from test_recovery import kernel_of, pol, pytestmark_kernel, steps, sup, wait_for_foreign_in_ledger  # noqa: F401

pytestmark = [pytestmark_kernel]
CHILDREN = 500                  # 3 policies and a route each: 2,000 objects


def child(i: int) -> list:
    remote = f"172.16.{i >> 8}.{i & 255}/32"
    return [pol("10.1.0.0/16", remote, xfrm.DIR_OUT, "192.0.2.2", i + 1),
            pol(remote, "10.1.0.0/16", xfrm.DIR_IN, "192.0.2.2", i + 1),
            pol(remote, "10.1.0.0/16", xfrm.DIR_FWD, "192.0.2.2", i + 1),
            Route("inet", 220, remote.split("/")[0], 32, protocol=4, gateway="192.0.2.2", oif_name="veth0",
                  prefsrc="10.1.0.1")]


DAEMON_RUN = {"kernel": steps("add", [r for i in range(CHILDREN) for r in child(i)])}
FOREIGN = "\n".join(f"ip xfrm policy add src 10.200.{i}.0/24 dst 10.201.{i}.0/24 dir out priority 1000 "
                    "action block" for i in range(200)) + \
    "\nip route add 172.31.0.0/16 via 192.0.2.3 dev veth0 proto static table 220\n"


def comparable(state) -> dict:
    """Per family, the records as JSON (addresses by address: IPv6 flags change as DAD finishes)."""
    out = {}
    for family, records in state.objects.items():
        if family == "address":
            out[family] = sorted((r.address, r.prefixlen) for r in records)
        else:
            out[family] = sorted(json.dumps(r.to_json(), sort_keys=True) for r in records)
    return out


def snapshot_written(s) -> dict:
    return s.wait(lambda st: ((st["recovery"] or {}).get("last") or {}).get("at_monotonic", {})
                  .get("snapshot_written"), what="the deferred snapshot written")["recovery"]["last"]


def intents(s) -> list[str]:
    d = os.path.join(s.p("state"), "snapshots")
    return [n for n in os.listdir(d) if n.startswith(INTENT_PREFIX)] if os.path.isdir(d) else []


def test_the_snapshot_written_after_the_restart_is_the_state_read_at_the_crash(netns, sup):
    netns.sh(SETUP)
    s = sup(netns, [DAEMON_RUN, {}], {"mode": "adopt", "adopt_grace": "2s", "fail_closed": True}).start()
    pid = s.wait_running()["daemon"]["pid"]
    netns.sh(FOREIGN)                               # after the daemon: foreign by the ledger
    wait_for_foreign_in_ledger(s, 200)
    at_crash = kernel_of(netns)
    os.kill(pid, signal.SIGKILL)
    s.wait_running(restarts=1)
    last = snapshot_written(s)
    at = last["at_monotonic"]
    assert at["read"] < at["snapshot_written"] and last["action"] == "adopt"
    snap = load_snapshot(last["snapshot"])
    assert comparable(snap) == comparable(at_crash)             # exactly what the kernel held at the crash
    assert snap.context["deferred"]["complete"] is True and snap.daemon["pid"] == pid
    owned = {f: {json.dumps(snap.objects[f][i].to_json(), sort_keys=True) for i, _ in rows}
             for f, rows in snap.context["owned"].items()}
    assert len(owned["xfrm_policy"]) == 3 * CHILDREN and len(owned["route"]) == CHILDREN
    assert not [p for p in owned["xfrm_policy"] if '"priority": 1000' in p]      # foreign is not charon's
    assert last["leftovers"]["xfrm_policy"] == 3 * CHILDREN and last["leftovers"]["route"] == CHILDREN
    assert intents(s) == []                          # the intent went once the snapshot was there
    [report] = s.reports()
    assert report["recovery"]["snapshot"] == last["snapshot"]
    # every leftover decided: the restarted daemon claims none, the grace period removes them all
    st = s.wait_recovered(timeout=60)
    assert st["recovery"]["adoption"]["pending"] == 0
    after = kernel_of(netns)
    foreign = {p.selector.saddr for p in at_crash.objects["xfrm_policy"] if p.priority == 1000}
    assert {p.selector.saddr for p in after.objects["xfrm_policy"]
            if not p.per_socket and not is_supervisor_block(p)} == foreign
    assert [r.dst for r in after.objects["route"]] == ["172.31.0.0"]           # the foreign look-alike stays
    assert s.stop() == 0


def test_a_supervisor_killed_between_the_spawn_and_the_snapshot_leaves_a_record_the_next_start_completes(
        netns, sup, monkeypatch):
    netns.sh(SETUP)
    monkeypatch.setenv("IPSEC_SUPERVISOR_TEST_SNAPSHOT_DELAY", "60")
    first = sup(netns, [DAEMON_RUN, {}], {"mode": "adopt", "adopt_grace": "10m"}).start()
    pid = first.wait_running()["daemon"]["pid"]
    os.kill(pid, signal.SIGKILL)
    first.wait(lambda st: st["daemon"]["pid"] not in (None, pid), what="charon spawned again")
    [intent] = intents(first)
    name = intent[len(INTENT_PREFIX):]
    snapdir = os.path.join(first.p("state"), "snapshots")
    assert not os.path.exists(os.path.join(snapdir, name))          # the writer is still waiting
    first.proc.kill()                               # kill -9 of the supervisor in that window
    first.proc.wait()
    first.kill_fakes()
    monkeypatch.delenv("IPSEC_SUPERVISOR_TEST_SNAPSHOT_DELAY")
    second = sup(netns, [DAEMON_RUN, {}], {"mode": "adopt", "adopt_grace": "10m"}, directory=first.dir)
    with open(second.p("counter"), "w") as fh:
        fh.write("1")                              # the next start is the quiet second run
    second.start()
    second.wait_running()
    deadline = time.monotonic() + 20
    while not os.path.exists(os.path.join(snapdir, name)) and time.monotonic() < deadline:
        time.sleep(0.05)
    snap = load_snapshot(os.path.join(snapdir, name))
    deferred = snap.context["deferred"]
    assert deferred["complete"] is False and f"(pid {first.proc.pid}) died" in deferred["lost"]
    assert deferred["intended_at"] and snap.daemon["pid"] == pid
    assert snap.context["recovery"]["action"] == "adopt"
    assert len(snap.objects["xfrm_policy"]) >= 3 * CHILDREN        # the state found at this start
    assert intents(second) == []
    assert f"the snapshot {name} of" in second.log() and "was never written" in second.log()
    assert second.stop() == 0


def test_a_supervisor_killed_before_the_new_ledger_is_written_is_replaced_by_one_that_reattaches_and_adopts(
        netns, sup, monkeypatch):
    from supervisor.daemon_record import load_record, record_path
    from supervisor.ledger import ledger_path, load_ledger
    netns.sh(SETUP)
    monkeypatch.setenv("IPSEC_SUPERVISOR_TEST_SNAPSHOT_DELAY", "60")
    recovery = {"mode": "adopt", "adopt_grace": "2s"}
    first = sup(netns, [DAEMON_RUN, {}], recovery).start()
    dead = first.wait_running()["daemon"]["pid"]
    netns.sh(FOREIGN)                               # after the daemon: foreign by the ledger
    wait_for_foreign_in_ledger(first, 200)
    first.wait(lambda st: os.path.exists(ledger_path(first.p("run"))) and
               len(load_ledger(ledger_path(first.p("run"))).owned("xfrm_policy")) >= 3 * CHILDREN,
               what="the daemon's objects in the ledger on disk")
    os.kill(dead, signal.SIGKILL)
    new = first.wait(lambda st: st["daemon"]["pid"] not in (None, dead), what="charon spawned again")["daemon"]["pid"]
    record = load_record(record_path(first.p("run")))          # written at the spawn, at once
    assert (record.daemon_pid, record.spawn_tick is not None) == (new, True)
    assert load_ledger(ledger_path(first.p("run"))).daemon_pid == dead     # the new ledger waits in the writer
    first.proc.kill()                               # kill -9 of the supervisor in that window
    first.proc.wait()
    monkeypatch.delenv("IPSEC_SUPERVISOR_TEST_SNAPSHOT_DELAY")
    second = sup(netns, [DAEMON_RUN, {}], recovery, directory=first.dir).start()
    st = second.wait_running()
    assert st["daemon"]["pid"] == new and st["daemon"]["reattached"] is True
    resumed = re.search(r"ledger still the crashed pid (\d+)'s .* adoption of (\d+) leftover\(s\) resumed", second.log())
    assert resumed and int(resumed[1]) == dead and int(resumed[2]) >= 2000     # what the dead daemon owned
    assert intents(second) == [] and "was never written" in second.log()       # the lost snapshot, said so
    second.wait_recovered(timeout=60)               # the dead daemon's leftovers: decided, none stale
    after = kernel_of(netns)
    assert {p.priority for p in after.objects["xfrm_policy"] if not p.per_socket} == {1000}   # foreign only
    assert [r.dst for r in after.objects["route"]] == ["172.31.0.0"]
    assert second.stop() == 0


def test_a_successor_configured_to_adopt_follows_the_flush_the_killed_supervisor_chose(netns, sup, monkeypatch):
    """The first supervisor flushed (its recovery.mode) before the restart; the new daemon installed its
    objects again; the supervisor is killed before that run's ledger is written. A successor configured
    adopt must not "resume" the flush as an adoption of the new daemon's objects (the crashed daemon's
    ledger calls them inherited): it follows the recorded flush, and they stay."""
    from supervisor.daemon_record import load_record, record_path
    from supervisor.ledger import ledger_path, load_ledger
    netns.sh(SETUP)
    monkeypatch.setenv("IPSEC_SUPERVISOR_TEST_SNAPSHOT_DELAY", "60")
    first = sup(netns, [DAEMON_RUN, DAEMON_RUN], {"mode": "flush", "fail_closed": False}).start()
    dead = first.wait_running()["daemon"]["pid"]
    first.wait(lambda st: os.path.exists(ledger_path(first.p("run"))) and
               len(load_ledger(ledger_path(first.p("run"))).owned("route")) >= CHILDREN,
               what="the daemon's objects in the ledger on disk")
    os.kill(dead, signal.SIGKILL)
    new = first.wait(lambda st: st["daemon"]["pid"] not in (None, dead), what="charon spawned again")["daemon"]["pid"]
    record = load_record(record_path(first.p("run")))
    assert record.daemon_pid == new and record.recovery.action == "flush" and record.recovery.mode == "flush"
    first.wait(lambda st: len(kernel_of(netns).objects["route"]) >= CHILDREN, what="the new daemon's routes")
    assert load_ledger(ledger_path(first.p("run"))).daemon_pid == dead     # the new ledger waits in the writer
    first.proc.kill()                               # kill -9 of the supervisor in that window
    first.proc.wait()
    monkeypatch.delenv("IPSEC_SUPERVISOR_TEST_SNAPSHOT_DELAY")
    second = sup(netns, [DAEMON_RUN, DAEMON_RUN], {"mode": "adopt", "adopt_grace": "1s"}, directory=first.dir).start()
    st = second.wait_recovered()
    assert st["daemon"]["pid"] == new and st["daemon"]["reattached"] is True
    assert st["recovery"]["adoption"] is None, st["recovery"]["adoption"]         # nothing can sweep them
    log = second.log()
    assert "re-attach: the earlier supervisor chose flush" in log and "(this supervisor's recovery.mode is adopt)" in log
    assert "leftover(s) resumed" not in log
    assert len(kernel_of(netns).objects["route"]) >= CHILDREN                     # the new daemon's stay
    assert load_record(record_path(second.p("run"))).recovery.action == "flush"    # for the next successor
    assert second.stop() == 0


def test_the_read_taken_before_the_restart_decodes_to_what_read_state_reads(netns):
    from supervisor.kernel_state import ReadOptions, read_state, read_state_later
    netns.sh(SETUP + FOREIGN + "iptables -I INPUT 1 -s 10.6.0.0/16 -m policy --dir in --pol ipsec --reqid 7 "
             "--proto esp -j ACCEPT\n")
    with netns.enter():
        decode = read_state_later(ReadOptions())
        direct = read_state(ReadOptions())
    later = decode()                                 # decoded elsewhere, afterwards
    assert later.netns == direct.netns
    assert comparable(later) == comparable(direct)
    assert len(later.objects["xfrm_policy"]) >= 200 and later.objects["firewall"]


def test_the_baseline_after_a_flush_is_the_crash_read_minus_what_went_plus_the_blocks():
    from types import SimpleNamespace

    from supervisor.kernel.netns import NetnsIdentity
    from supervisor.kernel_state import KernelState, ReadOptions
    from supervisor.reconcile import ActionResult, DeleteObject, InstallBlockPolicy, Outcome
    from supervisor.crash_snapshots import state_after_flush
    a, b, c = child(0)[:3]
    block = SimpleNamespace(key=lambda: ("block",), FAMILY="xfrm_policy")
    state = KernelState(objects={"xfrm_policy": (a, b, c), "route": ()}, netns=NetnsIdentity(1, None),
                        options=ReadOptions())
    results = [ActionResult(InstallBlockPolicy(block, a, "r", "why"), Outcome.DONE),
               ActionResult(DeleteObject(a, "r", "why"), Outcome.DONE),
               ActionResult(DeleteObject(b, "r", "why"), Outcome.FAILED, "EPERM")]
    after = state_after_flush(state, results)
    assert after.objects["xfrm_policy"] == (b, c, block)          # b failed: still there


# --- memory after a crash: what the read shares, what the writer lets go ---------------------------

def test_the_crash_read_decoded_with_the_ledgers_sharer_holds_the_ledgers_own_objects(netns):
    from supervisor.kernel_state import ReadOptions, read_state, read_state_later
    from supervisor.ledger import sharer, start_ledger
    netns.sh(SETUP + FOREIGN)
    with netns.enter():
        ledger = start_ledger(read_state(ReadOptions()), None)
        netns.sh("ip xfrm policy update src 10.200.0.0/24 dst 10.201.0.0/24 dir out priority 1001 action block\n")
        decode = read_state_later(ReadOptions())
        direct = read_state(ReadOptions())
    later = decode(sharer(ledger))
    assert comparable(later) == comparable(direct)              # the same state, whoever's objects
    held = {id(e.record) for table in ledger.entries.values() for e in table.values()}
    policies = later.objects["xfrm_policy"]
    changed = [p for p in policies if p.priority == 1001]
    assert len(changed) == 1 and id(changed[0]) not in held     # changed since: the read's own object
    assert all(id(p) in held for p in policies if p.priority == 1000)
    assert all(id(r) in held for r in later.objects["route"])
    assert len({id(p) for p in policies}) == len(policies)


def test_the_writer_lets_go_of_a_job_and_what_it_wrote_once_done():
    import gc
    import weakref

    from supervisor.crash_snapshots import Writer

    class State:
        pass
    w = Writer(find_trim=lambda: None)
    state = State()
    gone = weakref.ref(state)
    w.submit(lambda state=state: None, "write a snapshot")
    del state
    assert w.wait_idle(5)
    gc.collect()
    assert gone() is None                          # not kept until the next job
    w.close()


def test_the_writer_gives_the_heap_back_once_when_its_queue_drains():
    import threading

    from supervisor.crash_snapshots import Writer
    calls, lookups = [], []

    def find():
        lookups.append(1)
        return calls.append
    w = Writer(find_trim=find)
    gate = threading.Event()
    w.submit(gate.wait, "the ledger")
    w.submit(lambda: None, "the snapshot")
    w.submit(lambda: None, "a ledger save queued meanwhile")
    assert calls == []                              # not while work is queued
    gate.set()
    assert w.wait_idle(5)
    assert calls == [0] and w.trims == 1            # once, after the last of them
    w.submit(lambda: None, "the next crash")
    assert w.wait_idle(5)
    assert calls == [0, 0] and lookups == [1]       # malloc_trim looked up once
    w.close()


def test_without_malloc_trim_the_writer_works_as_before():
    from supervisor.crash_snapshots import Writer, libc_malloc_trim
    assert libc_malloc_trim() is None or callable(libc_malloc_trim())
    w = Writer(find_trim=lambda: None)              # e.g. musl: no such symbol
    done = []
    w.submit(lambda: done.append(1), "the snapshot")
    assert w.wait_idle(5) and done == [1] and w.trims == 0
    w.close()


def test_give_back_from_two_threads_at_once_looks_up_once_and_never_fails():
    # the writer's thread (its queue drained) and recovery's (after a crash's decode) both call it
    import threading

    from supervisor.crash_snapshots import Writer
    lookups, calls, errors = [], [], []
    slow = threading.Event()

    def find():
        lookups.append(1)
        slow.wait(0.2)                  # the window another thread's call used to fall into
        return calls.append
    w = Writer(find_trim=find)

    def call():
        try:
            w.give_back()
        except Exception as exc:       # noqa: BLE001 - the assertion below names it
            errors.append(exc)
    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert errors == [] and lookups == [1] and calls == [0] * 4 and w.trims == 4
    w.close()


def test_a_failing_trim_does_not_stop_the_writer(caplog):
    from supervisor.crash_snapshots import Writer

    def broken(_pad: int) -> int:
        raise OSError("no")
    w = Writer(find_trim=lambda: broken)
    done = []
    w.submit(lambda: None, "the snapshot")
    assert w.wait_idle(5)
    w.submit(lambda: done.append(1), "the ledger")
    assert w.wait_idle(5) and done == [1]
    assert "returning free memory to the system failed" in caplog.text
    w.close()
