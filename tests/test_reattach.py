"""The supervisor may die at any instant: the next one re-attaches to the running charon and damages nothing.

Pure parts by tables (may I re-attach? who holds the lock? uptime text); a pidfd watch of a process
that is not our child; then real charon in a namespace (tests/charon_ns.py) under `ipsec-supervisor run`:
kill -9 of the supervisor at random moments of each phase, start it again, and the namespace must end
with exactly one charon, supervised, its policies once, rule 220 once, no block, foreign state intact.
IPSEC_REATTACH_TRIES sets the tries per phase (default 3; the issue's campaign is 20).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml

from supervisor.eventloop import Loop
from supervisor.jobs import AttachedProcess
from supervisor.ledger import Ledger, ledger_from_document, ledger_to_document
from supervisor.ownership import is_supervisor_block
from supervisor.policy import Cause, ExitClass, exit_info
from supervisor.config import RestartConfig
from supervisor.presence import holds_lock
from supervisor.reattach import ProcessInfo, ReattachFacts, decide_reattach, process_start_time
from supervisor.starter import uptime_text

from charon_ns import CHARON, SWANCTL, SupervisedCharon
from test_flush import SETUP
from test_recovery_charon import CHARONS, FOREIGN, SWANCTL_CONF, state_of, without_indexes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRIES = int(os.environ.get("IPSEC_REATTACH_TRIES", "3"))

BIN = "/usr/lib/ipsec/charon"
BIN_ID = (1, 100)
NS = 4026531840


def ledger(pid=500, start=777, netns=NS, loaded=True) -> Ledger:
    return Ledger(daemon_pid=pid, netns_inode=netns, started=1.0, daemon_start_time=start, daemon_loaded=loaded)


def proc(pid=500, exe=BIN, exe_id=BIN_ID, uid=0, start=777, netns=NS, zombie=False) -> ProcessInfo:
    return ProcessInfo(pid, exe, exe_id, uid, start, netns, zombie)


def spawning(tick=800) -> Ledger:
    return Ledger(daemon_pid=None, netns_inode=NS, started=1.0, spawn_tick=tick)


def facts(led=ledger(), p=proc(), pid_file_pid=None, problem=None, spawned=()) -> ReattachFacts:
    return ReattachFacts(BIN, BIN_ID, NS, led, problem, p, "/run/charon.pid", pid_file_pid, spawned)


@pytest.mark.parametrize("f, attach, why", [
    (facts(), True, "earlier supervisor started"),
    (facts(pid_file_pid=500), True, "earlier supervisor started"),
    (facts(p=proc(exe=BIN + " (deleted)", exe_id=(1, 999))), True, "earlier supervisor started"),  # upgraded
    (facts(led=None, problem="no /run/x/ledger.json"), False, "no usable ledger (no /run/x/ledger.json)"),
    (facts(led=ledger(pid=None)), False, "names no daemon"),
    (facts(led=ledger(netns=1)), False, "another network namespace"),
    (facts(p=None), False, "pid 500 of the ledger is not running"),
    (facts(p=proc(zombie=True)), False, "is not running"),
    (facts(p=proc(netns=2)), False, "runs in another network namespace"),
    (facts(led=ledger(start=None)), False, "reused pid cannot be told apart"),
    (facts(p=proc(start=778)), False, "the pid was reused"),
    (facts(p=proc(exe="/usr/bin/sleep")), False, "runs /usr/bin/sleep"),
    (facts(p=proc(exe_id=(1, 101))), False, "not /usr/lib/ipsec/charon"),     # same path, another file
    (facts(p=proc(exe=None)), False, "an unknown program"),
    (facts(p=proc(uid=1000)), False, "uid 1000, not root"),
    (facts(pid_file_pid=501), False, "names pid 501, the ledger pid 500"),
    # killed between the spawn and writing the pid down: the one charon started since the spawn began
    (facts(led=spawning(), spawned=(proc(pid=600, start=900),)), True, "was spawning when it died"),
    (facts(led=spawning(), spawned=(proc(pid=600, start=900),), pid_file_pid=600), True, "was spawning"),
    (facts(led=spawning(), spawned=()), False, "was spawning a daemon (tick 800); none runs"),
    (facts(led=spawning(), spawned=(proc(pid=600, start=799),)), False, "none runs"),     # older: not it
    (facts(led=spawning(), spawned=(proc(pid=600, start=900, uid=7),)), False, "none runs"),
    (facts(led=spawning(), spawned=(proc(pid=600, start=900, exe="/bin/sh"),)), False, "none runs"),
    (facts(led=spawning(), spawned=(proc(pid=600, start=900, zombie=True),)), False, "none runs"),
    (facts(led=spawning(), spawned=(proc(pid=600, start=900), proc(pid=601, start=901))), False,
     "2 processes of /usr/lib/ipsec/charon started since"),
    (facts(led=spawning(), spawned=(proc(pid=600, start=900),), pid_file_pid=5), False, "names pid 5, not pid 600"),
])
def test_may_reattach_only_to_the_process_the_ledger_names(f, attach, why):
    d = decide_reattach(f)
    assert d.attach is attach and why in d.reason
    if attach and f.ledger.daemon_pid:
        assert (d.pid, d.start_time, d.loaded) == (500, 777, True)
    elif attach:
        assert (d.pid, d.start_time, d.loaded) == (600, 900, False)


def test_the_ledger_keeps_the_daemon_start_time_and_what_was_pending():
    led = Ledger(daemon_pid=9, netns_inode=NS, started=2.0, daemon_start_time=12345, daemon_loaded=True,
                 adoption_deadline=1700000000.5, spawn_tick=12000)
    back = ledger_from_document(ledger_to_document(led))
    assert (back.daemon_start_time, back.daemon_loaded, back.adoption_deadline, back.spawn_tick) == \
        (12345, True, 1700000000.5, 12000)
    old = ledger_to_document(led)
    for key in ("daemon_start_time", "daemon_loaded", "adoption_deadline_unix", "spawn_tick"):
        del old[key]        # a ledger of an older version: nothing to re-attach by, still readable
    back = ledger_from_document(old)
    assert (back.daemon_start_time, back.daemon_loaded, back.adoption_deadline) == (None, False, None)


LOCK = "/run/ipsec-supervisor/supervisor.lock"
RUN = ["/usr/bin/python3", "-m", "supervisor.cli", "run"]


@pytest.mark.parametrize("targets, argv, uid, netns, held", [
    ([LOCK], RUN, 0, NS, True),
    ([LOCK + " (deleted)"], RUN, 0, NS, True),          # /run wiped under it: still the one running
    (["/dev/null", "socket:[1]"], RUN, 0, NS, False),
    ([LOCK], RUN, 1000, NS, False),
    ([LOCK], RUN, 0, 1, False),                         # another network namespace
    ([LOCK], ["/usr/bin/python3", "cat"], 0, NS, False),
    (["/run/other/supervisor.lock"], RUN, 0, NS, False),
])
def test_a_supervisor_is_found_by_the_lock_it_holds_even_deleted(targets, argv, uid, netns, held):
    assert holds_lock(targets, argv, uid, netns, lock_path=LOCK, netns_inode=NS) is held


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (45.9, "45s"), (61, "1m01s"), (3 * 3600 + 12 * 60 + 5, "3h12m"),
                                           (2 * 86400 + 4 * 3600, "2d4h")])
def test_uptime_reads_like_3h12m(seconds, text):
    assert uptime_text(seconds) == text


def test_a_reattached_death_has_no_status_and_counts_as_a_crash():
    cfg = RestartConfig()
    info = exit_info(cfg, pid=7, wait_status=None, cause=Cause.NONE, started_at=0, died_at=5, status_unknown=True)
    assert info.classification is ExitClass.SIGNALED and info.exit_code is None and info.signal is None
    assert "exit status unknown" in info.describe() and "counted as a crash" in info.describe()
    stopped = exit_info(cfg, pid=7, wait_status=None, cause=Cause.STOP, started_at=0, died_at=5, status_unknown=True)
    assert stopped.classification is ExitClass.REQUESTED_STOP


def test_a_process_that_is_not_our_child_is_watched_by_its_pidfd():
    # sh exits at once: the sleep is re-parented away from us, as charon is after its supervisor died.
    out = subprocess.run(["sh", "-c", "sleep 30 >/dev/null 2>&1 & echo $!"], capture_output=True, text=True)
    pid = int(out.stdout)
    loop = Loop(time.monotonic)
    seen = []
    try:
        with pytest.raises(ProcessLookupError):
            AttachedProcess(loop, pid, start_time=1, on_exit=seen.append, start_time_of=process_start_time)
        p = AttachedProcess(loop, pid, start_time=process_start_time(pid), on_exit=seen.append,
                            start_time_of=process_start_time)
        assert p.attached and not p.exited
        assert p.send(signal.SIGTERM)
        deadline = time.monotonic() + 5
        loop.call_later(5, lambda: None)     # run_once never waits past this
        while not seen and time.monotonic() < deadline:
            loop.run_once()
        assert seen == [None] and p.exited and p.exited_at is not None
        assert not p.send(signal.SIGTERM)
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        loop.close()


# --- real charon ---------------------------------------------------------------------------

needs_charon = pytest.mark.skipif(
    not os.path.exists(CHARON) or not os.path.exists(SWANCTL) or os.geteuid() != 0 or not shutil.which("nsenter"),
    reason="needs strongSwan (strongswan-charon, strongswan-swanctl), root (network namespaces) and nsenter")


def charons_in(netns) -> list[int]:
    """Every process running charon's binary in the namespace."""
    out = subprocess.run(["ip", "netns", "pids", netns.name], capture_output=True, text=True).stdout.split()
    found = []
    for pid in out:
        try:
            if os.readlink(f"/proc/{pid}/exe").removesuffix(" (deleted)") == CHARON:
                found.append(int(pid))
        except OSError:
            pass
    return sorted(found)


def kill_supervisor(sup) -> None:
    sup.proc.kill()
    sup.proc.wait(10)


def start_again(sup, netns) -> dict:
    """The supervisor again, where the old one ran (beside the charon it left, if one runs); ready and idle."""
    alive = charons_in(netns)
    sup.start(beside=alive[0] if alive else None)
    sup.wait_running(timeout=60)
    return sup.wait_recovered(timeout=60)


def assert_converged(sup, netns, what: str) -> dict:
    """Exactly one charon, supervised; its policies once, rule 220 once, no block, foreign state intact."""
    st = sup.status()
    pids = charons_in(netns)
    assert pids == [st["daemon"]["pid"]], f"{what}: charons {pids}, supervised {st['daemon']['pid']}\n{sup.log()[-4000:]}"
    with netns.enter():
        from supervisor.kernel_state import ReadOptions, read_state
        blocks = [p for p in read_state(ReadOptions()).objects["xfrm_policy"] if is_supervisor_block(p)]
    assert not blocks, f"{what}: blocks left: {blocks}"
    assert without_indexes(state_of(netns)) == CHARONS, f"{what}: {state_of(netns)}\n{sup.log()[-4000:]}"
    return st


@pytest.fixture
def ns_charon(netns, tmp_path_factory):
    netns.sh(SETUP + FOREIGN)
    made = []

    def start(mode: str, load_delay: float = 0.0, wait: bool = True, **kw):
        workdir = str(tmp_path_factory.mktemp(f"reattach-{mode}"))
        kw.setdefault("swanctl_conf", SWANCTL_CONF)
        sup = SupervisedCharon(netns.name, workdir, mode=mode, **kw)
        made.append(sup)
        if load_delay:      # a slow load widens the window of a kill during it
            sup.config["daemon"]["load_commands"] = [["sh", "-c", f"sleep {load_delay}; exec \"$@\"", "sh"]
                                                     + sup.load_argv()]
            with open(sup.config_path, "w") as fh:
                yaml.safe_dump(sup.config, fh)
        sup.start()
        if wait:
            sup.wait_running()
        return sup
    yield start
    for sup in made:
        sup.cleanup()


@needs_charon
@pytest.mark.parametrize("mode", ["adopt", "flush"])
def test_a_supervisor_killed_while_charon_runs_is_replaced_by_one_that_reattaches(ns_charon, netns, mode):
    sup = ns_charon(mode)
    st = sup.wait_recovered()
    pid = st["daemon"]["pid"]
    times = []
    for i in range(TRIES):
        time.sleep(random.uniform(0, 0.5))
        kill_supervisor(sup)
        t0 = time.monotonic()
        st = start_again(sup, netns)
        took = time.monotonic() - t0
        assert st["daemon"]["pid"] == pid and st["daemon"]["reattached"], sup.log()[-3000:]
        assert f"re-attached (charon pid {pid}, up " in st["summary"]
        assert st["restarts"] == 0 and st["last_exit"] is None
        assert_converged(sup, netns, f"try {i}")
        assert took < 10, took
        times.append(took)
    print(f"{mode}: {TRIES} supervisor kills, re-attached each time; supervisor start to running "
          f"{min(times):.2f}-{max(times):.2f}s (median {sorted(times)[len(times) // 2]:.2f}s)")
    # charon's own death after a re-attach: a crash with no status and no last lines, recovered as ever
    os.kill(pid, signal.SIGKILL)
    st = sup.wait_running(restarts=1)
    sup.wait_recovered()
    assert "exit status unknown" in st["last_exit"]["description"]
    report = sup.crash_reports(wait_for=1)[-1]
    assert report["last_log_lines"] == [] and "re-attached" in report["last_log_lines_missing"]
    assert_converged(sup, netns, "after the re-attached charon died")
    assert sup.stop() == 0
    assert charons_in(netns) == []


@needs_charon
@pytest.mark.parametrize("phase", ["startup", "load", "recovery-adopt", "recovery-flush"])
def test_a_supervisor_killed_at_a_random_moment_comes_back_to_one_supervised_charon(ns_charon, netns, phase):
    mode = "flush" if phase == "recovery-flush" else "adopt"
    # A short grace, as in the other charon tests: the peer 192.0.2.2 never answers here, so a resumed
    # adoption that initiates waits out its grace (the converged state is charon's trap policies).
    sup = ns_charon(mode, load_delay=0.4 if phase == "load" else 0.0, wait=phase.startswith("recovery"),
                    supervisor={"recovery": {"fail_closed": True, "adopt_grace": "5s"}})
    stats = []
    for i in range(TRIES):
        if phase == "startup":      # from before the spawn to the end of the load
            sup.wait(lambda s: s["state"] in ("preparing", "starting", "loading", "settling", "running"), 30, "up")
            time.sleep(random.uniform(0, 0.5))
        elif phase == "load":
            sup.wait(lambda s: s["state"] == "loading", 30, "loading")
            time.sleep(random.uniform(0, 0.45))
        else:
            sup.wait_recovered()
            os.kill(sup.charon_pid, signal.SIGKILL)
            time.sleep(random.uniform(0, 0.8))
        before = charons_in(netns)
        kill_supervisor(sup)
        st = start_again(sup, netns)
        stats.append("re-attached" if st["daemon"]["reattached"] else "new charon")
        assert_converged(sup, netns, f"{phase} try {i} ({stats[-1]}, charons before the restart {before})")
        if i + 1 < TRIES and phase in ("startup", "load"):
            # the next try kills a supervisor during its own start: stop this pair, start afresh
            assert sup.stop() == 0
            assert charons_in(netns) == [], charons_in(netns)
            sup.start()
    print(f"{phase}: {TRIES} tries: {stats.count('re-attached')} re-attached, {stats.count('new charon')} new charon")


@needs_charon
def test_the_run_directory_removed_under_a_running_supervisor_comes_back_and_a_second_starts_nothing(ns_charon, netns):
    sup = ns_charon("adopt")
    st = sup.wait_recovered()
    pid, run_dir = st["daemon"]["pid"], sup.p("run")
    shutil.rmtree(run_dir)
    t0 = time.monotonic()
    while True:
        try:
            answer = sup.status()
            break
        except Exception:   # noqa: BLE001 - not back yet
            assert time.monotonic() - t0 < 1.0, f"status not answering 1s after rm -rf {run_dir}\n{sup.log()[-3000:]}"
            time.sleep(0.02)
    assert answer["daemon"]["pid"] == pid and answer["state"] == "running"
    for name in ("supervisor.lock", "control.sock", "ledger.json"):
        deadline = time.monotonic() + 3
        while not os.path.exists(os.path.join(run_dir, name)):
            assert time.monotonic() < deadline, f"{name} not restored\n{sup.log()[-3000:]}"
            time.sleep(0.05)
    # A second supervisor started meanwhile finds the first by its process and starts nothing.
    shutil.rmtree(run_dir)
    second = subprocess.run(["nsenter", "-t", str(pid), "-n", "-m", sys.executable, "-m", "supervisor.cli", "run",
                             "--config", sup.config_path], capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert second.returncode == 0 and f"already running (pid {sup.proc.pid}" in second.stderr, second.stderr
    shutil.rmtree(run_dir, ignore_errors=True)
    start = subprocess.run(["nsenter", "-t", str(pid), "-n", "-m", sys.executable, "-m", "supervisor.ipsec_cli",
                            "--config", sup.config_path, "start"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert start.returncode == 0 and f"already running (pid {sup.proc.pid})" in start.stderr, start.stderr
    assert charons_in(netns) == [pid]
    assert_converged(sup, netns, "after two wipes")
    assert sup.stop() == 0


@needs_charon
def test_ipsec_status_tells_the_truth_and_ipsec_start_reattaches(ns_charon, netns):
    sup = ns_charon("flush")
    pid = sup.wait_recovered()["daemon"]["pid"]

    def ipsec(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["nsenter", "-t", str(pid), "-n", "-m", sys.executable, "-m", "supervisor.ipsec_cli",
                               "--config", sup.config_path, *args], capture_output=True, text=True, cwd=ROOT,
                              timeout=60)
    r = ipsec("status")
    assert r.returncode == 0 and f"charon running (pid {pid})" in r.stdout, r.stdout + r.stderr
    kill_supervisor(sup)
    r = ipsec("status")
    assert r.returncode == 5 and f"but charon is (pid {pid})" in r.stdout, r.stdout + r.stderr
    r = ipsec("start")
    assert r.returncode == 0 and "re-attaches to it" in r.stderr, r.stdout + r.stderr
    r = ipsec("status")
    assert r.returncode == 0 and f"re-attached (charon pid {pid}, up " in r.stdout, r.stdout + r.stderr
    assert charons_in(netns) == [pid]
    assert_converged(sup, netns, "after ipsec start")
    r = ipsec("stop")                   # the re-attached charon goes with the supervisor, as a spawned one
    assert r.returncode == 0 and charons_in(netns) == [], r.stderr


@needs_charon
def test_ipsec_stop_that_must_kill_a_hung_reattached_supervisor_stops_its_charon_too(ns_charon, netns):
    sup = ns_charon("flush")
    pid = sup.wait_recovered()["daemon"]["pid"]
    kill_supervisor(sup)
    start_again(sup, netns)                      # re-attached: charon is not the new supervisor's child
    os.kill(sup.proc.pid, signal.SIGSTOP)        # hung: no answer on the control socket
    r = subprocess.run(["nsenter", "-t", str(pid), "-n", "-m", sys.executable, "-m", "supervisor.ipsec_cli",
                        "--config", sup.config_path, "stop", "--timeout", "0"], capture_output=True, text=True,
                       cwd=ROOT, timeout=60)
    assert "killed it (SIGKILL)" in r.stderr, r.stderr
    # Before the SIGKILL the stop sends SIGTERM and SIGCONT (a stopped process never sees a SIGTERM): the
    # supervisor may get as far as stopping charon itself; if not, `ipsec stop` stops the charon it left.
    assert "outlived its supervisor" in r.stderr or "stopping: received SIGTERM" in sup.log(), r.stderr
    assert charons_in(netns) == [], r.stderr


NET2 = """
      net2 {
        local_ts = 10.3.0.0/16
        remote_ts = 10.4.0.0/16
        start_action = trap
      }
"""


@needs_charon
def test_an_adoption_in_progress_is_resumed_by_the_next_supervisor(ns_charon, netns):
    # charon runs with a second child; the restarted charon's files no longer have it, so its trap
    # policies are leftovers that wait for adopt_grace; the supervisor is killed meanwhile.
    with_net2 = SWANCTL_CONF.replace("    children {\n", "    children {\n" + NET2)
    sup = ns_charon("adopt", swanctl_conf=with_net2, supervisor={"recovery": {"adopt_grace": "6s"}})
    sup.wait_recovered()
    sup.write_swanctl(SWANCTL_CONF)
    os.kill(sup.charon_pid, signal.SIGKILL)
    st = sup.wait(lambda s: s["restarts"] == 1 and ((s.get("recovery") or {}).get("adoption") or {}).get("state")
                  == "waiting" and s["state"] == "running", 30, "adopting")
    pid = st["daemon"]["pid"]
    kill_supervisor(sup)
    sup.start(beside=pid)
    st = sup.wait(lambda s: s["state"] == "running" and (s.get("recovery") or {}).get("adoption") is not None,
                  30, "adoption resumed")
    assert st["daemon"]["reattached"] and st["daemon"]["pid"] == pid
    assert st["recovery"]["adoption"]["leftovers"] >= 3, st["recovery"]      # net2's in, out, fwd at least
    assert "leftover(s) resumed" in sup.log()
    sup.wait_recovered(timeout=30)
    assert_converged(sup, netns, "after the resumed adoption")     # net2's policies are gone, charon's stay


@needs_charon
def test_a_reattached_charon_that_does_not_answer_within_its_start_timeout_is_handled_as_hung(ns_charon, netns):
    sup = ns_charon("adopt", supervisor={"daemon": {"start_timeout": "2s"}, "health": {"abort_timeout": "1s"}})
    pid = sup.wait_recovered()["daemon"]["pid"]
    kill_supervisor(sup)
    os.kill(pid, signal.SIGSTOP)
    sup.start(beside=pid)
    st = sup.wait(lambda s: s["restarts"] == 1 and s["state"] == "running", 60, "a new charon after the hung one")
    assert st["daemon"]["pid"] != pid and not st["daemon"]["reattached"]
    assert st["last_exit"]["classification"] == "hung" and "exit status unknown" in st["last_exit"]["description"]
    log = sup.log()
    assert "re-attached charon did not answer" in log and "handled as hung" in log and "sent SIGABRT" in log
    sup.wait_recovered()
    assert_converged(sup, netns, "after the hung re-attached charon")
