"""Who is an IKE daemon in a namespace (supervisor.daemons), and what plans may delete because of it.

Pure decisions first (tables): which process is a daemon, ours or another; which owned object no
plan may delete (marker-only while another IKE daemon is there; XFRM objects the ledger gives
charon by port id alone); the flush and adopt plans that follow. Then real processes in
namespaces: a charon-nm-like foreign daemon (a copy of the Python interpreter named charon-nm
holding an XFRM netlink socket and UDP 4500), an unprivileged sleep named charon, and the real
charon of Debian.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from supervisor import daemons
from supervisor.daemons import Binary, IkeDaemon, ProcessFacts, classify, parse_proc_udp, runs_binary
from supervisor.errors import ExitCode
from supervisor.kernel import xfrm
from supervisor.kernel.xfrm import XfrmPolicy, XfrmSA, XfrmSelector, XfrmTemplate
from supervisor.ledger import HOW_ADDED, HOW_INHERITED, OWNER_DAEMON, Ledger, LedgerEntry
from supervisor import ownership as own
from supervisor.ownership import Verdict, decide_ownership, deletion_hold
from supervisor.reconcile import DeleteObject, InstallBlockPolicy, Keep, plan_flush

from test_plan import fixture, short

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHARON = "/usr/lib/ipsec/charon"
V4 = socket.AF_INET
ME = 1000
BIN = Binary("/usr/lib/ipsec/charon", (8, 42))


# --- who is a daemon (pure) --------------------------------------------------------------------

def facts(pid=812, *, ppid=1, name="charon", exe="/usr/lib/ipsec/charon", exe_id=(8, 42), uid=0,
          net_admin=False, xfrm_sockets=1, ike_ports=(500, 4500), argv=()) -> ProcessFacts:
    return ProcessFacts(pid=pid, ppid=ppid, name=name, exe=exe, exe_id=exe_id, uid=uid, net_admin=net_admin,
                        start_time=4242, xfrm_sockets=xfrm_sockets, ike_ports=ike_ports, argv=argv)


PY = (8, 7)         # our interpreter's file identity
SUP = dict(name="python3", exe="/usr/bin/python3.11", exe_id=PY, ike_ports=())


@pytest.mark.parametrize("case, f, expected", [
    ("our charon as root", facts(), "ours"),
    ("our charon, binary replaced by an upgrade", facts(exe="/usr/lib/ipsec/charon (deleted)", exe_id=(8, 99)),
     "ours"),
    ("our charon dropped to charon.user, keeps CAP_NET_ADMIN", facts(uid=111, net_admin=True), "ours"),
    ("our binary run by a user", facts(uid=1000), "other"),
    ("a container's charon: same path, another file", facts(exe_id=(9, 42)), "other"),
    ("charon-nm, random ports", facts(name="charon-nm", exe="/usr/lib/ipsec/charon-nm", ike_ports=()), "other"),
    ("pluto named charon", facts(name="charon", exe="/usr/libexec/ipsec/pluto"), "other"),
    ("only UDP 4500, no XFRM socket", facts(name="x", exe="/usr/bin/python3", xfrm_sockets=0, ike_ports=(4500,)),
     "other"),
    ("a sleep named charon holds nothing", facts(exe="/tmp/x/charon", uid=65534, xfrm_sockets=0, ike_ports=()),
     None),
    ("our charon binary, no sockets (yet)", facts(xfrm_sockets=0, ike_ports=()), None),
    ("no readable exe (a zombie)", facts(exe=None, exe_id=None, xfrm_sockets=0, ike_ports=()), None),
    ("ourselves", facts(pid=ME, name="python3", exe="/usr/bin/python3.11"), None),
    ("a child of ours that is no daemon", facts(ppid=ME, name="ip", exe="/usr/bin/ip", ike_ports=()), None),
    ("our charon, our child", facts(ppid=ME), "ours"),
    ("a supervisor (its monitor)", facts(**SUP, argv=("python3", "-m", "supervisor.cli", "run")), None),
    ("an installed supervisor", facts(**SUP, argv=("python3", "/usr/local/bin/ipsec-supervisor", "run")), None),
    ("a supervisor's look-alike run by a user", facts(**SUP, uid=1000, argv=("python3", "-m", "supervisor.cli")),
     "other"),
    ("another Python program", facts(**SUP, argv=("python3", "/opt/ike.py")), "other"),
    ("another interpreter", facts(**{**SUP, "exe_id": (8, 9)}, argv=("python3", "-m", "supervisor.cli")), "other"),
])
def test_a_daemon_is_known_by_the_sockets_it_holds_and_ours_by_exe_and_uid(case, f, expected):
    d = classify(f, [BIN], self_pid=ME, interpreter=PY)
    assert (None if d is None else "ours" if d.ours else "other") == expected, case
    if d is not None:
        assert (d.pid, d.name, d.start_time, d.ike_ports) == (f.pid, f.name, 4242, f.ike_ports)


def test_what_a_daemon_holds_is_said_in_words():
    d = classify(facts(xfrm_sockets=2, ike_ports=(500, 4500)), [BIN], self_pid=ME)
    assert d.describe() == "charon pid 812"
    assert d.holds() == "2 XFRM netlink sockets and UDP port 500/4500"
    assert classify(facts(ike_ports=()), [BIN], self_pid=ME).holds() == "an XFRM netlink socket"
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.pid = 1


def test_a_binary_path_is_compared_after_resolving_and_a_missing_one_matches_only_deleted():
    ghost = Binary("/nonexistent/charon", None)
    assert not runs_binary(facts(exe="/nonexistent/charon"), ghost)
    assert runs_binary(facts(exe="/nonexistent/charon (deleted)"), ghost)
    assert Binary.of(sys.executable).path == os.path.realpath(sys.executable)


UDP = """\
   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  120: 00000000:1194 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 31337 2 0000000000000000 0
  300: 0100007F:01F4 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 4711 2 0000000000000000 0
  301: 0100007F:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000   101        0 99 2 0000000000000000 0
"""
UDP6 = """\
  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  120: 00000000000000000000000000000000:1194 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 31338 2 0000000000000000 0
"""


def test_udp_socket_tables_give_port_and_inode():
    assert parse_proc_udp(UDP) == [(4500, 31337), (500, 4711), (53, 99)]
    assert parse_proc_udp(UDP6) == [(4500, 31338)]
    assert parse_proc_udp("") == []
    with pytest.raises(ValueError, match="line 2"):
        parse_proc_udp(UDP.splitlines()[0] + "\n  1: garbage\n")


# --- what no plan may delete (pure) --------------------------------------------------------------

NM = IkeDaemon(pid=812, name="charon-nm", exe="/usr/lib/ipsec/charon-nm", uid=0, start_time=1,
               xfrm_sockets=1, ike_ports=(), ours=False)
PLUTO = dataclasses.replace(NM, pid=900, name="pluto", exe="/usr/libexec/ipsec/pluto", ike_ports=(500, 4500))


@pytest.mark.parametrize("rule, others, expected", [
    (own.RULE_PRIORITY_BAND, (), None),
    (own.RULE_PRIORITY_BAND, (NM,), "marker-only: charon-nm pid 812 holds an XFRM netlink socket here"),
    (own.RULE_SPI_RANGE, (NM, PLUTO), "marker-only: charon-nm pid 812 holds an XFRM netlink socket here "
                                      "(and 1 more)"),
    (own.RULE_REQID, (NM,), "marker-only"),
    (own.RULE_ROUTE_TABLE, (NM,), "marker-only"),
    (own.RULE_RULE_PRIORITY, (NM,), "marker-only"),
    (own.RULE_UPDOWN, (NM,), "marker-only"),
    (own.RULE_LEDGER_INHERITED, (NM,), "marker-only"),       # carried over, maybe judged by markers then
    (own.RULE_LEDGER_DAEMON, (NM,), None),                   # ledger evidence backed by the markers
    (own.RULE_VIRTUAL_IP, (NM,), None),                      # named by the operator
    (own.RULE_LEDGER_PORT_ONLY, (), "port-id-only"),
    (own.RULE_LEDGER_PORT_ONLY, (NM,), "port-id-only"),
])
def test_which_owned_objects_no_plan_may_delete(rule, others, expected):
    got = deletion_hold(None, Verdict(True, rule, "evidence"), others)
    assert (got is None) == (expected is None)
    if expected is not None:
        assert got.startswith(expected)


def test_an_undetectable_namespace_holds_marker_only_objects_too():
    got = deletion_hold(None, Verdict(True, own.RULE_PRIORITY_BAND, ""), (daemons.Undetected("boom"),))
    assert got == "marker-only: an unknown process holds IKE sockets for all we know (boom) here"


def summary(action) -> str:
    kind = {InstallBlockPolicy: "block", Keep: "keep", DeleteObject: "delete"}.get(type(action), "unblock")
    return f"{kind} {short(action.covers if kind == 'block' else getattr(action, 'record', None) or action.block)}"


def test_a_flush_keeps_every_marker_only_leftover_while_another_ike_daemon_is_there():
    snap = fixture("tunnels-crash")
    verdicts = decide_ownership(snap.objects)
    alone = plan_flush(snap, verdicts, fail_closed=True)
    plan = plan_flush(snap, verdicts, fail_closed=True, others=(NM,))
    assert not [a for a in plan.actions if isinstance(a, (DeleteObject, InstallBlockPolicy))]
    deleted = {short(a.record) for a in alone.actions if isinstance(a, DeleteObject)}
    assert {short(a.record) for a in plan.actions if isinstance(a, Keep)} == deleted
    assert plan.foreign == alone.foreign
    keep = next(a for a in plan.actions if isinstance(a, Keep) and a.record.FAMILY == "xfrm_policy")
    assert keep.rule == own.RULE_PRIORITY_BAND
    assert keep.reason.startswith("marker-only: charon-nm pid 812 holds an XFRM netlink socket here (priority")
    assert "[marker:priority-band: marker-only: charon-nm pid 812" in "\n".join(plan.lines())


def ledger_of(*records, how=HOW_ADDED, port=4321) -> Ledger:
    tables: dict = {}
    for r in records:
        tables.setdefault(r.FAMILY, {})[r.key()] = LedgerEntry(OWNER_DAEMON, how, port, r)
    return Ledger(daemon_pid=port, netns_inode=None, started=0.0, entries=tables)


def policy(dst, priority, reqid, d=xfrm.DIR_OUT) -> XfrmPolicy:
    return XfrmPolicy(XfrmSelector(V4, "10.1.0.0", 16, dst, 16), d, priority=priority,
                      templates=(XfrmTemplate(V4, "192.0.2.1", "192.0.2.2", reqid=reqid, mode=xfrm.MODE_TUNNEL),))


def sa(spi, reqid) -> XfrmSA:
    return XfrmSA(V4, "192.0.2.2", spi, xfrm.IPPROTO_ESP, "192.0.2.1", mode=xfrm.MODE_TUNNEL, reqid=reqid)


BAND = policy("10.2.0.0", 383615, 1)            # charon's band and the ledger: charon's
ODD = policy("10.3.0.0", 1000, 2)               # the ledger says charon's, the markers do not
OUT_SA = sa(0x00AA0001, 1)                      # the peer's SPI, reqid of BAND
ODD_SA = sa(0x00BB0001, 2)                      # the peer's SPI, reqid of ODD only
IN_SA = sa(0xC1234567, 1)                       # charon's SPI range


@pytest.mark.parametrize("record, rule", [
    (BAND, own.RULE_LEDGER_DAEMON),
    (ODD, own.RULE_LEDGER_PORT_ONLY),
    (OUT_SA, own.RULE_LEDGER_DAEMON),           # backed by BAND's reqid
    (ODD_SA, own.RULE_LEDGER_PORT_ONLY),        # ODD lends no reqid
    (IN_SA, own.RULE_LEDGER_DAEMON),
])
def test_xfrm_objects_attributed_by_port_id_alone_need_charons_markers_as_well(record, rule):
    objects = {"xfrm_policy": (BAND, ODD), "xfrm_sa": (ODD_SA, OUT_SA, IN_SA)}
    for how in (HOW_ADDED, HOW_INHERITED):
        verdicts = decide_ownership(objects, ledger=ledger_of(BAND, ODD, OUT_SA, ODD_SA, IN_SA, how=how))
        v = verdicts.verdict_of(record)
        expected = rule if how == HOW_ADDED or rule == own.RULE_LEDGER_PORT_ONLY else own.RULE_LEDGER_INHERITED
        assert v.owned and v.rule == expected, (how, v)


def test_a_flush_keeps_what_the_ledger_gives_charon_by_port_id_alone_and_says_why():
    objects = {"xfrm_policy": (BAND, ODD), "xfrm_sa": (ODD_SA, OUT_SA, IN_SA)}
    state = type("State", (), {"objects": objects})()
    verdicts = decide_ownership(objects, ledger=ledger_of(BAND, ODD, OUT_SA, ODD_SA, IN_SA))
    plan = plan_flush(state, verdicts, fail_closed=True)
    got = {summary(a) for a in plan.actions}
    assert got == {"block out 10.1.0.0/16>10.2.0.0/16", "delete out 10.1.0.0/16>10.2.0.0/16",
                   "delete sa 0xaa0001", "delete sa 0xc1234567", "keep out 10.1.0.0/16>10.3.0.0/16",
                   "keep sa 0xbb0001"}
    keep = next(a for a in plan.actions if isinstance(a, Keep) and a.record is ODD)
    assert keep.rule == own.RULE_LEDGER_PORT_ONLY and keep.reason.startswith("port-id-only: ")
    assert "priority 1000 is outside charon's bands" in keep.reason
    # ledger evidence with the markers still goes while charon-nm runs; marker-only would not
    plan = plan_flush(state, verdicts, fail_closed=True, others=(NM,))
    assert {summary(a) for a in plan.actions} == got


def test_adopt_keeps_marker_only_leftovers_after_the_grace_period_while_another_daemon_is_there():
    from test_adopt import plan_for
    tunnels = fixture("tunnels-crash")
    owned = decide_ownership(tunnels.objects).owned()
    alone = plan_for((tunnels, owned), configured=None, active=None, now=61.0)
    assert [a for a in alone.actions if isinstance(a, DeleteObject)]
    plan = plan_for((tunnels, owned), configured=None, active=None, now=61.0, others=(NM,))
    assert not [a for a in plan.actions if isinstance(a, (DeleteObject, InstallBlockPolicy))]
    keeps = {short(a.record): a.reason for a in plan.actions if isinstance(a, Keep)}
    assert {short(a.record) for a in alone.actions if isinstance(a, DeleteObject)} <= set(keeps)
    assert keeps["out 10.1.0.0/16>10.3.0.0/16"] == (
        "marker-only: charon-nm pid 812 holds an XFRM netlink socket here; not deleted although "
        "recovery.adopt_grace ended and charon did not claim it")


# --- real processes in namespaces ------------------------------------------------------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("iptables"),
                                reason="needs root (network namespaces) and iptables")

# What a charon-nm-like daemon holds: an XFRM netlink socket and UDP 4500 (charon-nm's own ports are random).
FOREIGN_DAEMON = """
import os, socket, time
x = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 6)
x.bind((0, 0))
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind(("0.0.0.0", 4500))
print("ready", os.getpid(), flush=True)
time.sleep(600)
"""

BAND_POLICY = """
ip xfrm policy add src 10.1.0.0/16 dst 10.2.0.0/16 dir out priority 383615 \
  tmpl src 192.0.2.1 dst 192.0.2.2 proto esp reqid 1 mode tunnel
"""


@pytest.fixture
def foreign_daemon():
    """Start a charon-nm-like daemon in a namespace: another binary (a copy of this Python named charon-nm),
    or PROGRAM (this Python itself: a daemon of ours for a supervisor of the fake daemon)."""
    home = Path(tempfile.mkdtemp(prefix="charon-nm-"))
    home.chmod(0o755)
    binary = home / "charon-nm"
    shutil.copy(os.path.realpath(sys.executable), binary)
    started: list[tuple[subprocess.Popen, int]] = []

    def start(ns, program: str | None = None) -> int:
        # Through a shell, so that it is no child of ours (our children are never counted)
        proc = subprocess.Popen(["sh", "-c", 'ip netns exec "$0" "$1" -I -c "$2" & wait', ns.name,
                                 program or str(binary), FOREIGN_DAEMON], stdout=subprocess.PIPE, text=True)
        word, pid = proc.stdout.readline().split()
        assert word == "ready"
        started.append((proc, int(pid)))
        return int(pid)
    yield start
    for proc, pid in started:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        proc.wait()
    shutil.rmtree(home)


def stop_foreign(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{pid}/fd") and time.monotonic() < deadline:
        time.sleep(0.02)


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "supervisor.cli", *argv], capture_output=True, text=True, cwd=ROOT)


def inode_of(ns) -> int:
    return os.stat(f"/run/netns/{ns.name}").st_ino


@needs_root
def test_a_foreign_ike_daemon_is_found_by_its_sockets_and_we_are_not(netns, foreign_daemon):
    pid = foreign_daemon(netns)
    with netns.enter():
        mine = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 6)     # we hold one too: not a daemon
    try:
        [d] = daemons.detect(inode_of(netns), (CHARON,))
    finally:
        mine.close()
    assert (d.pid, d.name, d.ours, d.uid, d.xfrm_sockets, d.ike_ports) == (pid, "charon-nm", False, 0, 1,
                                                                          (4500,))
    assert d.exe.endswith("/charon-nm") and d.start_time > 0
    assert d.holds() == "an XFRM netlink socket and UDP port 4500"


@needs_root
def test_flush_keeps_a_marker_only_band_policy_while_a_foreign_ike_daemon_runs(netns, foreign_daemon, tmp_path):
    from test_flush import SETUP, kernel_text
    netns.sh(SETUP + BAND_POLICY + "ip rule add priority 220 table 220\n")
    pid = foreign_daemon(netns)
    before = kernel_text(netns)
    r = run_cli("flush", "--netns", netns.name, "--no-ledger", "--fail-closed")
    assert r.returncode == 0, r.stderr
    assert f"note: charon-nm pid {pid}" in r.stdout and "holds an XFRM netlink socket and UDP port 4500" \
        in r.stdout
    assert "summary: 2 kept" in r.stdout and "delete" not in r.stdout.replace("deleted", "")
    assert "kept         keep SPD entry src=10.1.0.0/16 dst=10.2.0.0/16 dir=out priority=383615" in r.stdout
    assert f": marker-only: charon-nm pid {pid} holds an XFRM netlink socket and UDP port 4500 here" in r.stdout
    assert kernel_text(netns) == before                 # no block either
    cfg = tmp_path / "flush.yaml"
    cfg.write_text(f"paths: {{run_dir: {tmp_path / 'run'}, state_dir: {tmp_path}}}\nrecovery: {{mode: flush}}\n")
    r = run_cli("reconcile", "--dry-run", "--config", str(cfg), "--netns", netns.name)
    assert r.returncode == 0, r.stderr
    assert "keep SPD entry src=10.1.0.0/16" in r.stdout and f"[marker:priority-band: marker-only: charon-nm pid " \
        f"{pid} holds" in r.stdout and "install block" not in r.stdout
    stop_foreign(pid)
    r = run_cli("flush", "--netns", netns.name, "--no-ledger")
    assert r.returncode == 0 and "summary: 2 done" in r.stdout      # now they go
    assert netns.run("ip", "xfrm", "policy").stdout == ""


@needs_root
def test_adopt_keeps_a_marker_only_band_policy_after_the_grace_period_while_a_foreign_daemon_runs(
        netns, foreign_daemon, sup):
    from test_recovery import kernel_of
    from test_flush import SETUP
    netns.sh(SETUP + BAND_POLICY)
    pid = foreign_daemon(netns)
    s = sup(netns, [{}], {"mode": "adopt", "adopt_grace": "500ms", "block_timeout": "1s"}).start()
    st = s.wait_recovered()
    assert st["recovery"]["adoption"]["state"] == "done"
    assert [p.priority for p in kernel_of(netns).objects["xfrm_policy"] if not p.per_socket] == [383615]
    log = s.log()
    assert f"marker-only: charon-nm pid {pid} holds an XFRM netlink socket and UDP port 4500 here" in log
    assert s.stop() == 0      # on_stop flush: still charon-nm's for all we know
    assert [p.priority for p in kernel_of(netns).objects["xfrm_policy"] if not p.per_socket] == [383615]


@needs_root
def test_a_sleep_named_charon_does_not_keep_the_supervisor_from_its_startup_clean_up(netns, fake_charon, sup):
    from test_recovery import kernel_of
    from test_flush import SETUP
    netns.sh(SETUP + BAND_POLICY)
    fake_charon(netns)
    s = sup(netns, [{}], {"mode": "flush", "block_timeout": "1s"}).start()
    st = s.wait_recovered()
    assert st["recovery"]["last"]["leftover_total"] == 1 and "already runs" not in s.log()
    assert not [p for p in kernel_of(netns).objects["xfrm_policy"] if not p.per_socket]
    assert s.stop() == 0


@pytest.mark.skipif(not os.path.exists(CHARON) or os.geteuid() != 0, reason="needs root and strongSwan's charon")
def test_a_real_charon_is_ours_by_its_exe_and_flush_refuses_to_pull_its_state(netns, tmp_path):
    from charon_ns import psk_swanctl_conf, start_charon
    from test_flush import SETUP, kernel_text
    netns.sh(SETUP)
    charon = start_charon(netns.name, str(tmp_path), swanctl_conf=psk_swanctl_conf("moon"))
    try:
        found = daemons.detect(inode_of(netns), daemons.DEFAULT_DAEMON_BINARIES)
        [d] = [d for d in found if d.pid == charon.pid]
        assert (d.ours, d.exe, d.uid, d.name) == (True, CHARON, 0, "charon")
        assert d.xfrm_sockets >= 1 and d.ike_ports == (500, 4500)
        assert [x for x in found if x.pid != charon.pid] == []      # its shell and swanctl are no daemons
        before = kernel_text(netns)
        assert "priority" in before["xfrm policy"]                    # charon's trap policies
        r = run_cli("flush", "--netns", netns.name)
        assert r.returncode == ExitCode.FAILED
        assert f"charon pid {charon.pid} ({CHARON}, uid 0, holds" in r.stderr and "--force" in r.stderr
        assert kernel_text(netns) == before
    finally:
        charon.cleanup()


@needs_root
def test_a_daemon_of_ours_started_behind_the_supervisors_back_is_never_flushed_nor_doubled(
        netns, foreign_daemon, sup):
    # The fake daemon's binary is this Python: another root Python holding an XFRM socket and UDP
    # 4500 here is "a charon of ours not started by this supervisor" (as after a kill -9 of a supervisor).
    from test_recovery import DAEMON_RUN, kernel_of
    from test_flush import SETUP
    netns.sh(SETUP)
    s = sup(netns, [DAEMON_RUN, {}], {"mode": "flush", "block_timeout": "1s"}).start()
    pid = s.wait_running()["daemon"]["pid"]
    before = kernel_of(netns).objects["xfrm_policy"]
    other = foreign_daemon(netns, os.path.realpath(sys.executable))
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while "not started a second time" not in s.log():
        assert time.monotonic() < deadline, s.log()
        time.sleep(0.05)
    log = s.log()
    assert "runs in this network namespace, not started by this supervisor: the state is its own, no recovery" \
        in log and f"pid {other} (" in log
    assert kernel_of(netns).objects["xfrm_policy"] == before            # no flush, no block
    assert len(s.events("start")) == 1                                  # no second daemon
    stop_foreign(other)
    s.wait_running()                                                    # the next try starts one again
    assert len(s.events("start")) == 2
    assert s.stop() == 0


@pytest.mark.skipif(not os.path.exists(CHARON) or os.geteuid() != 0, reason="needs root and strongSwan's charon")
def test_the_supervisor_refuses_to_start_next_to_a_running_charon_and_leaves_its_state(netns, tmp_path):
    from charon_ns import SupervisedCharon, psk_swanctl_conf, start_charon
    from test_flush import SETUP, kernel_text
    netns.sh(SETUP)
    charon = start_charon(netns.name, str(tmp_path / "plain"), swanctl_conf=psk_swanctl_conf("moon"))
    sup = None
    try:
        before = kernel_text(netns)
        assert "priority" in before["xfrm policy"]
        sup = SupervisedCharon(netns.name, str(tmp_path / "sup"), swanctl_conf=psk_swanctl_conf("moon"),
                               mode="flush").start()
        assert sup.proc.wait(60) == ExitCode.FAILED
        log = sup.log()
        assert (f"not starting charon: charon pid {charon.pid} ({CHARON}, uid 0, holds" in log
                and "already runs in this network namespace, not started by this supervisor" in log), log
        assert "Traceback" not in log and "leftover" not in log
        assert kernel_text(netns) == before
        assert charon.vici("version")[0]["daemon"] == "charon"             # still reachable, still running
    finally:
        if sup is not None:
            sup.cleanup()
        charon.cleanup()


from test_flush import fake_charon  # noqa: E402,F401 - fixture
from test_recovery import sup  # noqa: E402,F401 - fixture


@needs_root
@pytest.mark.skipif(not shutil.which("setpriv"), reason="needs setpriv (util-linux)")
def test_a_daemon_we_may_not_inspect_still_counts_as_another_ike_daemon(netns, foreign_daemon):
    """The hardened unit keeps three capabilities: the /proc entries of a process with more (charon-nm,
    pluto) cannot be read. Its sockets are in the namespace's tables all the same."""
    pid = foreign_daemon(netns)
    code = ("import sys; from supervisor import daemons; "
            f"found = daemons.detect({inode_of(netns)}, ({CHARON!r},)); "
            "print(repr([(type(d).__name__, d.ours, d.describe(), d.holds()) for d in found]))")
    res = subprocess.run(["ip", "netns", "exec", netns.name, "setpriv",
                          "--bounding-set=-all,+net_admin,+net_raw,+net_bind_service", "--inh-caps=-all",
                          sys.executable, "-c", code],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    found = eval(res.stdout)
    assert found == [("Undetected", False, "an unknown process",
                      "IKE sockets for all we know (2 IKE socket(s) in this namespace held by a process whose "
                      "/proc entries cannot be read)")], (pid, found)
    # With every capability the same process is named.
    [d] = daemons.detect(inode_of(netns), (CHARON,))
    assert (d.pid, d.name) == (pid, "charon-nm")
