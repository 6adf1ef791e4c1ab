"""Recovery in the running supervisor: pure decisions (tables), then the supervisor with the fake daemon.

The fake daemon (tests/fake_ikd.py) installs policies, routes, a rule and an address over
netlink sockets it holds open, as charon does, and updown-style iptables rules through a child
process; another process (``ip``, ``iptables``) adds foreign state of the same kinds, look-alikes
included. The supervisor runs inside the namespace (``ip netns exec``) with
recovery.any_daemon, since the fake is not named charon.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import yaml

from charon_ns import wait_for_status
from supervisor import control, crashreport
from supervisor.kernel import xfrm
from supervisor.kernel.addresses import Address
from supervisor.kernel.common import Action as KAction
from supervisor.kernel.routes import Route
from supervisor.kernel.rules import Rule
from supervisor.kernel.xfrm import XfrmMonitor, XfrmPolicy, XfrmSelector, XfrmTemplate
from supervisor.kernel_state import ReadOptions, read_state
from supervisor.ledger import OWNER_FOREIGN, ledger_path, load_ledger
from supervisor.ownership import is_supervisor_block
from supervisor.policy import Action, ExitClass
from supervisor.crash_snapshots import prune_snapshots, snapshot_name, snapshot_paths
from supervisor.recovery_choice import ADOPT, FLUSH, KEEP, NONE, choose_recovery
from supervisor.snapshot import load_snapshot
from supervisor.strongswan_conf import (SettingsError, as_bool, check_adopt_capability, lookup, parse_settings,
                                        parse_version, read_settings)

from test_flush import SETUP, kernel_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAKE = os.path.join(ROOT, "tests", "fake_ikd.py")


# --- which recovery (pure) ------------------------------------------------------------------

R, S, G, C = Action.RESTART, Action.STOP, Action.GIVE_UP, Action.COOLDOWN


@pytest.mark.parametrize("mode, on_stop, exit_class, decision, can_adopt, expected", [
    ("adopt", "flush", ExitClass.SIGNALED, R, True, (ADOPT, True)),
    ("flush", "flush", ExitClass.SIGNALED, R, True, (FLUSH, True)),
    ("keep", "flush", ExitClass.SIGNALED, R, True, (KEEP, False)),
    ("none", "flush", ExitClass.SIGNALED, R, True, (NONE, False)),
    ("adopt", "flush", ExitClass.SIGNALED, R, False, (FLUSH, True)),          # this strongSwan cannot adopt
    ("adopt", "flush", None, R, True, (ADOPT, True)),                         # found at supervisor start
    # a requested stop follows on_stop; a flush then mirrors a clean charon stop: no blocks
    ("adopt", "flush", ExitClass.REQUESTED_STOP, S, True, (FLUSH, False)),
    ("flush", "keep", ExitClass.REQUESTED_STOP, S, True, (KEEP, False)),
    # a requested restart is a restart
    ("adopt", "flush", ExitClass.REQUESTED_STOP, R, True, (ADOPT, True)),
    # charon will not come back: nothing can adopt; flush stays fail-closed
    ("adopt", "flush", ExitClass.FAILURE, S, True, (KEEP, False)),
    ("flush", "flush", ExitClass.DO_NOT_RESTART, S, True, (FLUSH, True)),
    ("adopt", "flush", ExitClass.SIGNALED, G, True, (KEEP, False)),
    ("flush", "keep", ExitClass.SIGNALED, G, True, (FLUSH, True)),
    # a crash-loop cooldown: down for minutes: fail-closed even in adopt mode (the retry starts clean)
    ("adopt", "flush", ExitClass.FAILURE, C, True, (FLUSH, True)),
    ("adopt", "flush", ExitClass.SIGNALED, C, False, (FLUSH, True)),
    ("flush", "keep", ExitClass.START_TIMEOUT, C, True, (FLUSH, True)),
    ("keep", "flush", ExitClass.FAILURE, C, True, (KEEP, False)),
    ("none", "flush", ExitClass.FAILURE, C, True, (NONE, False)),
])
def test_the_recovery_follows_mode_stop_request_and_what_happens_next(mode, on_stop, exit_class, decision,
                                                                      can_adopt, expected):
    choice = choose_recovery(mode, fail_closed=True, on_stop=on_stop, exit_class=exit_class, decision=decision,
                             can_adopt=can_adopt)
    assert (choice.action, choice.fail_closed) == expected
    assert choice.reason


def test_fail_closed_off_is_respected_for_crashes():
    choice = choose_recovery("flush", fail_closed=False, on_stop="flush", exit_class=ExitClass.SIGNALED,
                             decision=R)
    assert (choice.action, choice.fail_closed) == (FLUSH, False)


def test_recovery_runs_only_for_charon_unless_told_otherwise(caplog):
    from supervisor.commands.run import make_recovery
    from supervisor.config import parse_config
    from supervisor.recovery import KernelRecovery
    from supervisor.starter import NoRecovery
    assert isinstance(make_recovery(parse_config("")), KernelRecovery)
    assert isinstance(make_recovery(parse_config("daemon: {command: [/usr/sbin/charon-systemd], pid_file: null}")),
                      KernelRecovery)
    assert isinstance(make_recovery(parse_config("recovery: {mode: none}")), NoRecovery)
    wrapper = "daemon: {command: [/usr/local/bin/run-charon]}\n"
    assert isinstance(make_recovery(parse_config(wrapper, "/etc/s.yaml")), NoRecovery)
    assert "recovery.any_daemon: true in /etc/s.yaml" in caplog.text
    assert isinstance(make_recovery(parse_config(wrapper + "recovery: {any_daemon: true}")), KernelRecovery)


def test_the_crash_report_waits_for_the_recovery_and_says_when_it_did_not_finish(tmp_path):
    from supervisor.config import parse_config
    from supervisor.policy import Cause, ExitInfo
    from supervisor.recovery import KernelRecovery
    cfg = parse_config(f"recovery: {{timeout: 200ms}}\npaths: {{run_dir: {tmp_path}/run, state_dir: {tmp_path}}}\n")
    rec = KernelRecovery(cfg)
    info = ExitInfo(42, None, 9, False, Cause.NONE, ExitClass.SIGNALED, 1.0, 2.0)
    assert rec.crash_report_section(info) == {"error": "recovery did not finish within 200ms"}
    rec._publish_section((42, 2.0), {"action": "flush", "leftover_total": 3})
    assert rec.crash_report_section(info) == {"action": "flush", "leftover_total": 3}
    assert rec.status()["ledger"] is None and rec.status()["mode"] == "adopt"



def test_a_reload_during_an_exit_does_not_change_what_that_exit_does(tmp_path, monkeypatch):
    # where the recovery runs (here, reading only) and what it does are decided by one reading of
    # the settings: a reload that lands in between (flush instead of adopt) waits for the next exit
    from supervisor import recovery
    from supervisor.config import parse_config
    from supervisor.policy import Cause, Decision, ExitInfo
    from supervisor.recovery_choice import RecoveryChoice
    paths = f"paths: {{run_dir: {tmp_path}/run, state_dir: {tmp_path}}}\n"
    rec = recovery.KernelRecovery(parse_config("recovery: {mode: adopt}\n" + paths))
    reloaded = parse_config("recovery: {mode: flush}\n" + paths)
    where, modes = [], []

    def reads_only(decision, rc, can_adopt):
        where.append(rc.mode)
        rec.on_config(reloaded)             # the supervisor's thread applies a reload now
        return True

    def choose(mode, **kw):
        modes.append(mode)
        return RecoveryChoice(NONE, False, "test")

    sections = []
    real_recover = rec._recover
    monkeypatch.setattr(rec, "_recover", lambda *a, **kw: sections.append(real_recover(*a, **kw)) or sections[-1])

    monkeypatch.setattr(rec, "_reads_only", reads_only)
    monkeypatch.setattr(recovery, "choose_recovery", choose)
    monkeypatch.setattr(rec, "_ike_daemons", lambda *a, **kw: [])
    rec.on_daemon_exit(ExitInfo(42, None, 9, False, Cause.NONE, ExitClass.SIGNALED, 1.0, 2.0),
                       Decision(R, "restart"))
    assert where == modes == ["adopt"]
    assert [s["mode"] for s in sections] == ["adopt"]      # the section says the mode the choice was made in
    assert rec.config.recovery.mode == "flush"      # the next exit decides with the reload

# --- snapshot retention ---------------------------------------------------------------------

def test_snapshots_are_pruned_by_count_and_by_age(tmp_path):
    d = str(tmp_path)
    now = 1_800_000_000.0
    paths = []
    for i in range(6):
        p = os.path.join(d, snapshot_name(now - 600 + i * 100, 40 + i, "exit"))
        with open(p, "w") as fh:
            fh.write("{}")
        os.utime(p, (now - 600 + i * 100,) * 2)
        paths.append(p)
    (tmp_path / ".snapshot-x.tmp").write_text("")           # a write in progress is never touched
    assert snapshot_paths(d) == paths
    assert prune_snapshots(d, keep=4, max_age=0, now=now) == paths[:2]
    assert prune_snapshots(d, keep=4, max_age=250, now=now) == paths[2:4]       # older than 250 s
    assert snapshot_paths(d) == paths[4:] and (tmp_path / ".snapshot-x.tmp").exists()
    assert os.path.basename(paths[0]).startswith("20270115T") and paths[0].endswith("-40-exit.json")


# --- strongswan.conf and the adopt check ----------------------------------------------------

def test_strongswan_conf_is_read_with_includes_overrides_and_quotes(tmp_path):
    (tmp_path / "strongswan.d").mkdir()
    (tmp_path / "strongswan.d" / "a.conf").write_text(
        "charon {\n  plugins {\n    kernel-netlink {\n      policy_update = no\n    }\n  }\n}\n")
    (tmp_path / "strongswan.d" / "b.conf").write_text(
        "charon { plugins { kernel-netlink { policy_update = yes } } }  # later file wins\n")
    (tmp_path / "strongswan.conf").write_text(
        'charon {\n  load_modular = yes # comment\n  x = "a # b\n c"\n  routing_table = 220\n}\n'
        "include strongswan.d/*.conf\n"
        "charon-systemd : charon {\n  routing_table = 100\n}\n")
    s = read_settings(str(tmp_path / "strongswan.conf"))
    assert s["charon.load_modular"] == "yes" and s["charon.x"] == "a # b\n c"
    assert lookup(s, "plugins.kernel-netlink.policy_update") == "yes"
    assert lookup(s, "routing_table") == "220"
    assert lookup(s, "routing_table", "charon-systemd") == "100"                  # its own section first
    assert lookup(s, "plugins.kernel-netlink.policy_update", "charon-systemd") == "yes"   # then charon's
    assert [as_bool(v) for v in ("yes", "No", "1", "maybe", None)] == [True, False, True, None, None]


def test_the_shipped_snippet_sets_policy_update():
    s = parse_settings(open(os.path.join(ROOT, "etc", "strongswan.d", "ipsec-supervisor.conf")).read())
    assert s == {"charon.plugins.kernel-netlink.policy_update": "yes"}


@pytest.mark.parametrize("text, problem", [
    ("charon {\n a = 1\n", "section 'charon' is not closed"),
    ("}\n", "line 1: '}' without an open section"),
    ("charon {\n  a\n}\n", "line 2: expected '=' or '{' after 'a'"),
    ('a = "open\n', "unterminated string"),
])
def test_strongswan_conf_that_is_not_understood_names_file_and_line(text, problem):
    with pytest.raises(SettingsError, match=problem):
        parse_settings(text, "/etc/x.conf")


@pytest.mark.parametrize("version, policy_update, can, message", [
    ((5, 9, 8), True, True, None),
    ((5, 9, 8), None, True, "policy_update is not set"),
    ((5, 9, 8), False, True, "policy_update is not set"),
    ((5, 3, 3), None, True, "policy_update is not set"),
    ((5, 3, 2), True, True, None),
    ((5, 3, 2), False, False, "needs charon.plugins.kernel-netlink.policy_update = yes"),
    ((5, 2, 2), None, False, "needs charon.plugins.kernel-netlink.policy_update = yes"),
    ((5, 2, 1), True, False, "cannot install a policy that already exists"),
    (None, True, True, "version is unknown"),
])
def test_the_adopt_check_knows_which_strongswan_can_take_over_leftover_policies(version, policy_update, can,
                                                                                  message):
    cap = check_adopt_capability(version, policy_update)
    assert cap.can_adopt is can
    texts = cap.problems + cap.warnings
    assert (message is None and not texts) or any(message in t for t in texts)


def test_versions_are_found_in_what_charon_and_swanctl_print():
    assert parse_version("5.9.8") == (5, 9, 8)
    assert parse_version("strongSwan 5.9.8 swanctl") == (5, 9, 8)
    assert parse_version("Linux strongSwan U5.9.14/K6.1.0") == (5, 9, 14)
    assert parse_version("6.0.0beta1") == (6, 0, 0) and parse_version("fake") is None


# --- the supervisor with the fake daemon ------------------------------------------------------

pytestmark_kernel = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("iptables"),
                                       reason="needs root and iptables")

V4 = socket.AF_INET


def pol(src, dst, d, peer, reqid, me="192.0.2.1", priority=383615) -> XfrmPolicy:
    s, sl = src.split("/")
    t, tl = dst.split("/")
    a, b = (me, peer) if d == xfrm.DIR_OUT else (peer, me)
    return XfrmPolicy(XfrmSelector(V4, s, int(sl), t, int(tl)), d, priority=priority,
                      templates=(XfrmTemplate(V4, a, b, reqid=reqid, mode=xfrm.MODE_TUNNEL),))


def child_policies(local, remote, peer, reqid) -> list[XfrmPolicy]:
    return [pol(local, remote, xfrm.DIR_OUT, peer, reqid), pol(remote, local, xfrm.DIR_IN, peer, reqid),
            pol(remote, local, xfrm.DIR_FWD, peer, reqid)]


def updown_argv(reqid, me, peer) -> list[list[str]]:
    """updown's up-client rules (exact shape), inserted by a child process of the daemon."""
    return [["iptables", "-I", "INPUT", "1", "-i", "veth0", "-s", peer, "-d", me, "-m", "policy", "--dir", "in",
             "--pol", "ipsec", "--reqid", str(reqid), "--proto", "esp", "-j", "ACCEPT"],
            ["iptables", "-I", "OUTPUT", "1", "-o", "veth0", "-s", me, "-d", peer, "-m", "policy", "--dir",
             "out", "--pol", "ipsec", "--reqid", str(reqid), "--proto", "esp", "-j", "ACCEPT"]]


SITE_A = child_policies("10.1.0.0/16", "10.2.0.0/16", "192.0.2.2", 1)
SITE_B = child_policies("10.1.0.0/16", "10.3.0.0/16", "192.0.2.3", 2)
ROUTE_A = Route("inet", 220, "10.2.0.0", 16, protocol=4, gateway="192.0.2.2", oif_name="veth0", prefsrc="10.1.0.1")
ROUTE_B = Route("inet", 220, "10.3.0.0", 16, protocol=4, gateway="192.0.2.3", oif_name="veth0", prefsrc="10.1.0.1")
RULE = Rule("inet", 220, table=220)
VIP = Address("inet", "10.99.0.5", 32, None, "lo")


def steps(op, records) -> list:
    return [[op, r.FAMILY, r.to_json(include_keys=True)] for r in records]


DAEMON_RUN = {"kernel": steps("add", SITE_A + SITE_B + [ROUTE_A, ROUTE_B, RULE, VIP]),
              "commands": updown_argv(1, "10.1.0.0/16", "10.2.0.0/16") + updown_argv(2, "10.1.0.0/16",
                                                                                     "10.3.0.0/16")}

# Another process's state, look-alikes of charon's included (band priority, table 220 static,
# a rule at 220, an updown-shaped rule for a reqid charon never had).
FOREIGN = """
ip xfrm policy add src 10.5.0.0/16 dst 10.6.0.0/16 dir out priority 383615 \
  tmpl src 192.0.2.1 dst 192.0.2.5 proto esp reqid 7 mode tunnel
ip xfrm policy add src 10.7.0.0/16 dst 10.8.0.0/16 dir out priority 1000 action block
ip route add 10.4.0.0/16 via 192.0.2.3 dev veth0 proto static table 220
ip route add 10.9.0.0/16 via 192.0.2.3 dev veth0 table 100
ip rule add priority 220 table 220 fwmark 7
ip rule add priority 100 table 100
ip addr add 10.99.0.6/32 dev lo
iptables -I INPUT 1 -i veth0 -s 10.6.0.0/16 -d 10.5.0.0/16 -m policy --dir in --pol ipsec --reqid 7 \
  --proto esp -j ACCEPT
iptables -A INPUT -s 192.0.2.0/24 -j ACCEPT
"""


class Sup:
    """`ipsec-supervisor run` inside a namespace, supervising the fake daemon; files in a short temp dir."""

    def __init__(self, ns, runs: list[dict], recovery: dict, directory: str | None = None):
        self.ns = ns
        self.dir = directory or tempfile.mkdtemp(prefix="ipsv-r-")
        self.p = lambda n: os.path.join(self.dir, n)
        with open(self.p("plan.json"), "w") as fh:
            json.dump({"runs": runs}, fh)
        cfg = {
            "daemon": {"command": [sys.executable, FAKE, "--pid-file", self.p("fake.pid"), "--vici",
                                   self.p("fake.vici"), "--plan", self.p("plan.json"), "--counter",
                                   self.p("counter"), "--events", self.p("events.jsonl")],
                       "pid_file": self.p("fake.pid"), "vici_socket": self.p("fake.vici"), "start_timeout": "10s",
                       "load_commands": [["/bin/true"]]},
            "restart": {"okay_delay": "100ms", "backoff": {"initial": 0, "step": "100ms", "jitter": 0}},
            "health": {"interval": "2s", "timeout": "1s"},
            "stop": {"timeout": "3s"},
            "paths": {"run_dir": self.p("run"), "state_dir": self.p("state")},
            "recovery": {"any_daemon": True, **recovery},
        }
        self.config_path = self.p("supervisor.yaml")
        with open(self.config_path, "w") as fh:
            yaml.safe_dump(cfg, fh)
        self.proc = None
        self._log = None

    def start(self) -> "Sup":
        self._log = open(self.p("supervisor.log"), "a")
        self.proc = subprocess.Popen(["ip", "netns", "exec", self.ns.name, sys.executable, "-m", "supervisor.cli",
                                      "run", "--config", self.config_path], cwd=ROOT, stdout=self._log,
                                     stderr=self._log, env={k: v for k, v in os.environ.items()
                                                            if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")})
        return self

    def status(self) -> dict:
        return control.request(self.p("run"), "status", timeout=5)["status"]

    def wait(self, pred, timeout: float = 20.0, what: str = "condition") -> dict:
        return wait_for_status(self.status, self.proc, pred, timeout, what, self.log, poll=0.03)

    def wait_running(self, restarts: int | None = None) -> dict:
        return self.wait(lambda s: s["state"] == "running" and (restarts is None or s["restarts"] == restarts),
                         what=f"running, restarts={restarts}")

    def wait_recovered(self, timeout: float = 20.0) -> dict:
        def idle(s):
            r = s["recovery"]
            a = r["adoption"]
            return s["state"] == "running" and not r["blocks"] and (a is None or a["state"] == "done")
        return self.wait(idle, timeout, "recovery finished")

    def events(self, kind: str | None = None) -> list[dict]:
        try:
            with open(self.p("events.jsonl")) as fh:
                evs = [json.loads(line) for line in fh if line.strip()]
        except FileNotFoundError:
            return []
        return [e for e in evs if kind is None or e["event"] == kind]

    def reports(self, wait_for: int = 1) -> list[dict]:
        deadline = time.monotonic() + 15
        while True:
            found = [r for _, r in crashreport.read_crash_reports(os.path.join(self.p("state"), "crashes"))]
            if len(found) >= wait_for or time.monotonic() > deadline:
                return found
            time.sleep(0.03)

    def log(self) -> str:
        try:
            with open(self.p("supervisor.log")) as fh:
                return fh.read()
        except FileNotFoundError:
            return ""

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)

    def kill_fakes(self) -> None:
        for e in self.events("start"):
            try:
                with open(f"/proc/{e['pid']}/cmdline", "rb") as fh:
                    cmdline = fh.read()
                if FAKE.encode() in cmdline and self.dir.encode() in cmdline:   # a dead one's pid may be reused
                    os.kill(e["pid"], signal.SIGKILL)
            except (FileNotFoundError, ProcessLookupError):
                pass

    def cleanup(self, remove: bool = True) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.kill_fakes()
        if self._log:
            self._log.close()
        if remove:
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def sup():
    made: list[Sup] = []

    def make(ns, runs, recovery, directory=None) -> Sup:
        s = Sup(ns, runs, recovery, directory)
        made.append(s)
        return s
    yield make
    dirs = {s.dir for s in made}
    for s in made:
        s.cleanup(remove=False)
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


def wait_for_foreign_in_ledger(s: Sup, n: int, timeout: float = 10.0) -> None:
    """The supervisor has seen (and saved) the foreign objects added after the daemon."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            ledger = load_ledger(ledger_path(s.p("run")))
            foreign = [e for e in ledger.entries.get("xfrm_policy", {}).values() if e.owner == OWNER_FOREIGN
                       and e.how == "added"]
            if len(foreign) >= n:
                return
        except Exception:  # noqa: BLE001 - not written yet
            pass
        time.sleep(0.05)
    raise AssertionError(f"the ledger never saw the foreign objects:\n{s.log()}")


def kernel_of(ns):
    with ns.enter():
        return read_state(ReadOptions())


def assert_same_kernel(ns, reference) -> None:
    """NS holds exactly what REFERENCE holds (the admin tools' text; route listings compared as sets,
    since the kernel lists IPv6 multicast routes in interface-creation order)."""
    import difflib
    a, b = kernel_text(ns), kernel_text(reference)
    for name in ("routes v4", "routes v6"):
        a[name], b[name] = sorted(a[name].splitlines()), sorted(b[name].splitlines())
    bad = [name for name in a if a[name] != b[name]]
    if bad:
        def lines(v):
            return v if isinstance(v, list) else v.splitlines()
        raise AssertionError("\n".join(f"{name}:\n" + "\n".join(difflib.unified_diff(lines(b[name]), lines(a[name]),
                                                                                     "reference", "namespace",
                                                                                     lineterm=""))
                                       for name in bad))


@pytestmark_kernel
def test_flush_after_kill_9_removes_exactly_the_daemons_state_and_foreign_state_survives(netns_factory, sup):
    mixed, reference = netns_factory(), netns_factory()
    mixed.sh(SETUP)
    reference.sh(SETUP + FOREIGN)
    s = sup(mixed, [DAEMON_RUN, {}], {"mode": "flush", "block_timeout": "1s"}).start()
    pid = s.wait_running()["daemon"]["pid"]
    mixed.sh(FOREIGN)                                   # after the daemon: look-alikes by another process
    wait_for_foreign_in_ledger(s, 2)
    os.kill(pid, signal.SIGKILL)
    s.wait_running(restarts=1)
    st = s.wait_recovered()
    assert_same_kernel(mixed, reference)
    [report] = s.reports()
    rec = report["recovery"]
    assert (rec["action"], rec["fail_closed"], rec["judged_by"]) == ("flush", True, "ledger and markers")
    assert rec["leftovers"] == {"xfrm_sa": 0, "xfrm_policy": 6, "route": 2, "rule": 1, "address": 1, "firewall": 4}
    assert rec["results"] == {"done": 14 + 4}                # 4 fail-closed blocks (out/fwd of both children)
    snap = load_snapshot(rec["snapshot"])
    assert snap.daemon["pid"] == pid and snap.context["recovery"]["action"] == "flush"
    owned = {f: [snap.objects[f][i] for i, _ in rows] for f, rows in snap.context["owned"].items()}
    assert {r.address for r in owned["address"]} == {"10.99.0.5"}
    assert {r.selector.saddr for r in snap.objects["xfrm_policy"]} >= {"10.5.0.0", "10.7.0.0"}   # context too
    assert st["recovery"]["last"]["snapshot"] == rec["snapshot"]
    assert s.stop() == 0
    assert_same_kernel(mixed, reference)          # on_stop: the fake left nothing this time


@pytestmark_kernel
def test_fail_closed_blocks_stand_from_before_the_first_delete_until_the_daemon_reinstalls(netns, sup):
    netns.sh(SETUP)
    reinstall = {"kernel_later": steps("add", SITE_A), "kernel_delay": 0.5}
    s = sup(netns, [{"kernel": steps("add", SITE_A)}, reinstall], {"mode": "flush", "block_timeout": "60s"}).start()
    pid = s.wait_running()["daemon"]["pid"]
    with netns.enter():
        monitor = XfrmMonitor()
    timeline = []
    with monitor:
        os.kill(pid, signal.SIGKILL)
        s.wait_running(restarts=1)
        s.wait(lambda st: st["recovery"]["blocks"] == 0 and any(e["event"] == "kernel_later_done"
                                                                for e in s.events()), what="blocks removed")
        while select.select([monitor], [], [], 0.3)[0]:
            timeline += monitor.read_events()
    new_pid = s.status()["daemon"]["pid"]
    policies = [e for e in timeline if e.family == "xfrm_policy"]

    def at(pred) -> list[int]:
        return [i for i, e in enumerate(policies) if pred(e)]

    for d in (xfrm.DIR_OUT, xfrm.DIR_FWD):
        block_in = at(lambda e: e.action is KAction.NEW and is_supervisor_block(e.record) and e.record.dir == d)
        block_out = at(lambda e: e.action is KAction.DELETE and is_supervisor_block(e.record) and e.record.dir == d)
        leftover_out = at(lambda e: e.action is KAction.DELETE and not is_supervisor_block(e.record)
                          and e.record.dir == d)
        back = at(lambda e: e.action is KAction.NEW and not is_supervisor_block(e.record) and e.record.dir == d
                  and e.port_id == new_pid)
        assert len(block_in) == len(block_out) == len(leftover_out) == len(back) == 1, (d, policies)
        assert block_in[0] < leftover_out[0] < back[0] < block_out[0]
    first_delete = min(at(lambda e: e.action is KAction.DELETE and not is_supervisor_block(e.record)))
    assert max(at(lambda e: e.action is KAction.NEW and is_supervisor_block(e.record))) < first_delete
    with netns.enter():
        left = xfrm.dump_policies()
    assert sorted((p.dir, p.selector.user) for p in left if not p.per_socket) == [(0, 0), (1, 0), (2, 0)]
    assert s.stop() == 0


ADOPT_CONNS = [
    {"site-a": {"local_addrs": ["%any"], "remote_addrs": ["192.0.2.2"], "unique": "UNIQUE_NO",
                "children": {"net": {"mode": "TUNNEL", "local-ts": ["10.1.0.0/16"], "remote-ts": ["10.2.0.0/16"]}}}},
    {"road": {"local_addrs": ["%any"], "remote_addrs": ["%any"], "unique": "UNIQUE_NO",
              "children": {"hosts": {"mode": "TUNNEL", "local-ts": ["10.1.0.0/16"], "remote-ts": ["10.3.0.0/16"]}}}},
]
SITE_A_IKE = {"site-a": {"uniqueid": "1", "state": "ESTABLISHED", "local-host": "192.0.2.1",
                         "remote-host": "192.0.2.2", "local-vips": ["10.99.0.5"],
                         "child-sas": {"net-1": {"name": "net", "uniqueid": "1", "reqid": "11", "state": "INSTALLED",
                                                 "mode": "TUNNEL", "spi-in": "c0000011", "spi-out": "00000011",
                                                 "local-ts": ["10.1.0.0/16"], "remote-ts": ["10.2.0.0/16"]}}}}


def reqid(policies, new) -> list[XfrmPolicy]:
    return [XfrmPolicy(p.selector, p.dir, priority=p.priority, templates=(
        XfrmTemplate(V4, p.templates[0].saddr, p.templates[0].daddr, reqid=new, mode=xfrm.MODE_TUNNEL),))
        for p in policies]


@pytestmark_kernel
def test_adopt_the_restarted_daemon_claims_part_and_the_grace_period_removes_the_rest(netns_factory, sup):
    mixed, reference = netns_factory(), netns_factory()
    mixed.sh(SETUP)
    reference.sh(SETUP + FOREIGN)
    # The restarted daemon: its rule is in the way (EEXIST, as charon logs); initiating site-a/net
    # installs site-a's policies again (with its new reqid 11) and reports the CHILD_SA and VIP.
    restarted = {"kernel": steps("add", [RULE]), "vici_conns": ADOPT_CONNS,
                 "on_initiate": {"site-a/net": {"kernel": steps("update", reqid(SITE_A, 11)),
                                                "sas": [SITE_A_IKE]}}}
    s = sup(mixed, [DAEMON_RUN, restarted], {"mode": "adopt", "adopt_grace": "1500ms",
                                             "block_timeout": "1s"}).start()
    pid = s.wait_running()["daemon"]["pid"]
    mixed.sh(FOREIGN)
    wait_for_foreign_in_ledger(s, 2)
    os.kill(pid, signal.SIGKILL)
    s.wait_running(restarts=1)
    # while the grace period runs, nothing of site-b is gone yet
    during = kernel_of(mixed)
    assert {p.selector.daddr for p in during.objects["xfrm_policy"] if p.dir == xfrm.DIR_OUT} >= {"10.3.0.0"}
    st = s.wait_recovered()
    assert st["recovery"]["adoption"]["initiated"] == ["site-a/net"]
    [initiate] = [e for e in s.events("vici") if e["command"] == "initiate"]
    assert initiate["args"] == {"child": "net", "ike": "site-a", "timeout": "-1", "init-limits": "no"}
    after = kernel_of(mixed)
    charon = {(p.selector.daddr if p.dir == xfrm.DIR_OUT else p.selector.saddr, p.dir, p.templates[0].reqid)
              for p in after.objects["xfrm_policy"] if p.templates and p.priority == 383615
              and p.selector.saddr != "10.5.0.0"}
    assert charon == {("10.2.0.0", d, 11) for d in (0, 1, 2)}           # site-a: charon's again; site-b gone
    assert not [p for p in after.objects["xfrm_policy"] if is_supervisor_block(p)]
    assert {r.dst for r in after.objects["route"]} == {"10.2.0.0", "10.4.0.0"}   # site-a's kept, foreign kept
    assert {(r.priority, r.fwmark) for r in after.objects["rule"]} == {(220, None), (220, 7)}
    assert {"10.99.0.5", "10.99.0.6"} <= {a.address for a in after.objects["address"]}
    assert {r.updown.reqid for r in after.objects["firewall"] if r.updown} == {7}   # reqids 1, 2: gone
    [report] = s.reports()
    assert report["recovery"]["action"] == "adopt" and report["recovery"]["leftover_total"] == 14
    log = s.log()
    assert "adopt: initiate site-a/net: charon is establishing it" in log
    assert "adoption finished" in log
    # a requested stop removes what the daemon left behind (on_stop flush): foreign state only
    assert s.stop() == 0
    assert_same_kernel(mixed, reference)


@pytestmark_kernel
def test_a_restarted_supervisor_keeps_its_ledger_and_flushes_only_the_dead_daemons_state(netns_factory, sup):
    mixed, reference = netns_factory(), netns_factory()
    mixed.sh(SETUP)
    reference.sh(SETUP + FOREIGN)
    first = sup(mixed, [DAEMON_RUN, {}], {"mode": "flush", "block_timeout": "1s"}).start()
    first.wait_running()
    mixed.sh(FOREIGN)
    wait_for_foreign_in_ledger(first, 2)
    first.proc.kill()                              # the supervisor dies; the daemon with it (here by hand)
    first.proc.wait()
    first.kill_fakes()
    second = sup(mixed, [DAEMON_RUN, {}], {"mode": "flush", "block_timeout": "1s"}, directory=first.dir)
    with open(second.p("counter"), "w") as fh:
        fh.write("1")                              # the next start is the quiet second run
    second.start()
    second.wait_running()
    st = second.wait_recovered()
    last = st["recovery"]["last"]
    assert "found at supervisor start" in last["after"] and last["judged_by"] == "ledger and markers"
    assert last["leftovers"]["xfrm_policy"] == 6 and last["leftover_total"] == 14
    assert_same_kernel(mixed, reference)      # the look-alikes survive: the ledger knew them
    assert second.stop() == 0


@pytestmark_kernel
def test_without_a_ledger_charons_markers_decide_at_supervisor_start(netns, sup):
    netns.sh(SETUP + FOREIGN + """
ip xfrm policy add src 10.1.0.0/16 dst 10.2.0.0/16 dir out priority 383615 \
  tmpl src 192.0.2.1 dst 192.0.2.2 proto esp reqid 1 mode tunnel
ip route add 10.2.0.0/16 via 192.0.2.2 dev veth0 proto static table 220
""")
    s = sup(netns, [{}], {"mode": "flush", "block_timeout": "1s"}).start()
    st = s.wait_recovered()
    assert st["recovery"]["last"]["judged_by"] == "markers only (no ledger)"
    after = kernel_of(netns)
    # by markers the look-alikes are charon's too: that is what markers can tell
    assert not [p for p in after.objects["xfrm_policy"] if p.priority == 383615]
    assert [r.dst for r in after.objects["route"]] == []
    assert {p.priority for p in after.objects["xfrm_policy"] if not p.per_socket} == {1000}
    assert s.stop() == 0


@pytestmark_kernel
def test_keep_mode_leaves_everything_and_still_snapshots_and_reports(netns, sup):
    netns.sh(SETUP)
    s = sup(netns, [{"kernel": steps("add", SITE_A + [ROUTE_A])}, {}], {"mode": "keep", "on_stop": "keep"}).start()
    pid = s.wait_running()["daemon"]["pid"]
    before = kernel_text(netns)
    os.kill(pid, signal.SIGKILL)
    s.wait_running(restarts=1)
    [report] = s.reports()
    assert report["recovery"]["action"] == "keep" and report["recovery"]["leftover_total"] == 4
    assert os.path.exists(report["recovery"]["snapshot"])
    assert s.stop() == 0
    assert kernel_text(netns) == before


# --- reconcile --dry-run -------------------------------------------------------------------------

def run_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "supervisor.cli", *argv], capture_output=True, text=True, cwd=ROOT)


@pytestmark_kernel
def test_reconcile_dry_run_prints_the_plan_for_the_configured_mode_and_changes_nothing(netns, tmp_path):
    netns.sh(SETUP + """
ip xfrm policy add src 10.1.0.0/16 dst 10.2.0.0/16 dir out priority 383615 \
  tmpl src 192.0.2.1 dst 192.0.2.2 proto esp reqid 1 mode tunnel
ip rule add priority 220 table 220
""")
    before = kernel_text(netns)
    for mode, expect in (("flush", "install block SPD entry src=10.1.0.0/16"), ("adopt", "leave SPD entry"),
                         ("keep", "keep SPD entry")):
        cfg = tmp_path / f"{mode}.yaml"
        cfg.write_text(yaml.safe_dump({"paths": {"run_dir": str(tmp_path / "run"), "state_dir": str(tmp_path)},
                                       "recovery": {"mode": mode}}))
        r = run_cli("reconcile", "--dry-run", "--config", str(cfg), "--netns", netns.name)
        assert r.returncode == 0, r.stderr
        assert "dry run, nothing changed" in r.stdout and "markers only (no ledger at" in r.stdout
        assert expect in r.stdout, r.stdout
        assert "no charon runs here" in r.stdout
        doc = json.loads(run_cli("reconcile", "--dry-run", "--json", "--config", str(cfg), "--netns",
                                 netns.name).stdout)
        assert doc["mode"] == mode and doc["plan"]["mode"] == mode and doc["daemon"] is None
    assert kernel_text(netns) == before
    r = run_cli("reconcile", "--netns", netns.name)
    assert r.returncode == 2 and "--dry-run" in r.stderr

