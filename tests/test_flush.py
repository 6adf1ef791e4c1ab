"""The executor on a real kernel: flush removes exactly charon's state, fail-closed, per-action results.

Every test builds its state in throw-away namespaces. Updown firewall rules are
made by strongSwan's own /usr/lib/ipsec/_updown (only its PATH changed, so a test
picks the iptables backend); the fake daemon (tests/test_ledger.py) holds its
netlink sockets open as charon does, and runs updown as a child process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from supervisor import cli
from supervisor import reconcile
from supervisor.errors import ExitCode, KernelError
from supervisor.kernel import xfrm
from supervisor.kernel.addresses import Address
from supervisor.kernel.common import Action
from supervisor.kernel.routes import Route
from supervisor.kernel.rules import Rule
from supervisor.kernel.xfrm import XfrmMonitor, XfrmPolicy, XfrmSelector, XfrmTemplate
from supervisor.kernel_state import KernelWatch, ReadOptions, read_state
from supervisor.ledger import DaemonPorts, apply_events, load_ledger, save_ledger, start_ledger
from supervisor.ownership import SUPERVISOR_BLOCK_UID, decide_ownership, is_supervisor_block
from supervisor.reconcile import (DeleteObject, InstallBlockPolicy, Outcome, Plan, blocks_to_remove,
                                  execute, plan_flush)

from test_ledger import read_events, start_fake_daemon, stop

UPDOWN_SCRIPT = Path("/usr/lib/ipsec/_updown")
TOOLS = ("iptables-nft", "iptables-legacy", "ip6tables-nft", "ip6tables-legacy", "nft")
pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not UPDOWN_SCRIPT.exists()
    or not all(shutil.which(t, path="/usr/sbin:/sbin:/usr/bin:/bin") for t in TOOLS),
    reason="needs root, strongSwan's _updown, iptables-nft/-legacy (v4 and v6) and nft")


@pytest.fixture(scope="module")
def updown(tmp_path_factory):
    """Build argv for strongSwan's _updown with a chosen iptables backend (nft or legacy)."""
    root = tmp_path_factory.mktemp("updown")
    original = UPDOWN_SCRIPT.read_text()
    path_line = 'PATH="/sbin:/bin:/usr/sbin:/usr/bin:/usr/sbin"\n'
    assert original.count(path_line) == 1, "updown's PATH line changed: update this fixture"
    script = root / "updown"
    script.write_text(original.replace(path_line, 'PATH="$FAKEBIN:/sbin:/bin:/usr/sbin:/usr/bin"\n'))
    script.chmod(0o755)
    for flavour in ("nft", "legacy"):
        bin_dir = root / flavour
        bin_dir.mkdir()
        for tool in ("iptables", "ip6tables"):
            (bin_dir / tool).symlink_to(f"/usr/sbin/{tool}-{flavour}")
        (bin_dir / "logger").write_text("#!/bin/sh\nexit 0\n")     # keep tests out of syslog
        (bin_dir / "logger").chmod(0o755)

    def argv(flavour: str, **env) -> list[str]:
        base = {"PLUTO_VERSION": "1.1", "PLUTO_INTERFACE": "veth0", "PLUTO_PROTO": "esp",
                "PLUTO_MY_PROTOCOL": "0", "PLUTO_PEER_PROTOCOL": "0", "PLUTO_MY_PORT": "0",
                "PLUTO_PEER_PORT": "0", "FAKEBIN": str(root / flavour)}
        base.update({f"PLUTO_{k.upper()}": str(v) for k, v in env.items()})
        return ["env", "-i", *(f"{k}={v}" for k, v in base.items()), str(script), "iptables"]
    return argv


# No IPv6 link-local addresses: the kernel adds them (and their routes) asynchronously,
# which would make two namespaces' listings differ by timing alone.
SETUP = """
sysctl -qw net.ipv6.conf.default.accept_dad=0 net.ipv6.conf.all.accept_dad=0
sysctl -qw net.ipv6.conf.default.addr_gen_mode=1
ip link add veth0 address 02:00:00:00:00:01 type veth peer name veth1 address 02:00:00:00:00:02
ip link set veth0 up
ip link set veth1 up
ip addr add 192.0.2.1/24 dev veth0
ip addr add 10.1.0.1/16 dev veth1
ip -6 addr add 2001:db8::1/64 dev veth0 nodad
"""

# charon-like, by markers: priorities from charon's formula, table 220 static, rule 220.
CHARON = """
ip xfrm policy add src 10.1.0.0/16 dst 10.2.0.0/16 dir out priority 383615 \
  tmpl src 192.0.2.1 dst 192.0.2.2 proto esp reqid 1 mode tunnel
ip xfrm policy add src 10.2.0.0/16 dst 10.1.0.0/16 dir in priority 383615 \
  tmpl src 192.0.2.2 dst 192.0.2.1 proto esp reqid 1 mode tunnel
ip xfrm policy add src 10.2.0.0/16 dst 10.1.0.0/16 dir fwd priority 383615 \
  tmpl src 192.0.2.2 dst 192.0.2.1 proto esp reqid 1 mode tunnel
ip xfrm policy add src fd00:1::/64 dst fd00:2::/64 dir out priority 334463 \
  tmpl src 2001:db8::1 dst 2001:db8::2 proto esp reqid 2 mode tunnel
ip xfrm policy add src fd00:2::/64 dst fd00:1::/64 dir in priority 334463 \
  tmpl src 2001:db8::2 dst 2001:db8::1 proto esp reqid 2 mode tunnel
ip xfrm policy add src fd00:2::/64 dst fd00:1::/64 dir fwd priority 334463 \
  tmpl src 2001:db8::2 dst 2001:db8::1 proto esp reqid 2 mode tunnel
ip xfrm policy add src 10.1.0.0/16 dst 10.66.0.0/16 dir out priority 183615 action block
ip route add 10.2.0.0/16 via 192.0.2.2 dev veth0 src 10.1.0.1 proto static table 220
ip -6 route add fd00:2::/64 via 2001:db8::2 dev veth0 proto static table 220
ip rule add priority 220 table 220
ip -6 rule add priority 220 table 220
"""

# Foreign state of the same kinds, in two parts so that it interleaves with charon's.
FOREIGN_1 = """
ip xfrm policy add src 10.7.0.0/16 dst 10.8.0.0/16 dir out priority 1000 \
  tmpl src 192.0.2.1 dst 192.0.2.7 proto esp reqid 1 mode tunnel
ip xfrm policy add src 10.8.0.0/16 dst 10.7.0.0/16 dir in priority 250000 \
  tmpl src 192.0.2.7 dst 192.0.2.1 proto esp reqid 7 mode tunnel
ip route add 10.7.0.0/16 via 192.0.2.7 dev veth0 table 100
ip route add 10.8.0.0/16 via 192.0.2.7 dev veth0 proto static table 100
ip route add 10.9.0.0/16 via 192.0.2.9 dev veth0 table 220
ip rule add priority 100 table 100
iptables-nft -A INPUT -s 192.0.2.0/24 -j ACCEPT
iptables-nft -I INPUT 1 -i veth0 -s 10.8.0.0/16 -d 10.7.0.0/16 -m policy --dir in --pol ipsec \
  --reqid 7 --proto esp -j ACCEPT
"""
FOREIGN_2 = """
ip xfrm policy add src 10.9.0.0/16 dst 10.10.0.0/16 dir fwd priority 50 action block
ip -6 xfrm policy add src fd00:7::/64 dst fd00:8::/64 dir out priority 60000 action block
ip route add 10.2.0.0/16 via 192.0.2.2 dev veth0
ip -6 route add fd00:9::/64 via 2001:db8::9 dev veth0 table 220
ip rule add priority 220 table 100
ip -6 rule add priority 221 table 220
iptables-legacy -A INPUT -i veth0 -s 10.2.0.0/16 -d 10.1.0.0/16 -m policy --dir in --pol ipsec \
  --reqid 1 --proto esp -m comment --comment mine -j ACCEPT
ip6tables-legacy -A INPUT -s 2001:db8::/64 -j DROP
nft add table inet fw
nft add chain inet fw input '{ type filter hook input priority 0; }'
nft add rule inet fw input tcp dport 22 counter accept comment '"ssh in"'
nft add rule inet fw input meta l4proto esp accept
"""


def charon_updown(ns, updown) -> None:
    """updown's rules for charon's two tunnels: IPv4 through iptables-nft, IPv6 through legacy."""
    for argv in updown_commands(updown):
        proc = ns.run(*argv)
        assert proc.stderr == "", proc.stderr


def updown_commands(updown) -> list[list[str]]:
    return [updown("nft", verb="up-client", reqid=1, me="192.0.2.1", peer="192.0.2.2",
                   my_client="10.1.0.0/16", peer_client="10.2.0.0/16", host_access=1),
            updown("legacy", verb="up-client-v6", reqid=2, me="2001:db8::1", peer="2001:db8::2",
                   my_client="fd00:1::/64", peer_client="fd00:2::/64", host_access=1)]


KERNEL_TEXT = {
    "xfrm policy": ["ip", "xfrm", "policy"],
    "routes v4": ["ip", "route", "show", "table", "all"],
    "routes v6": ["ip", "-6", "route", "show", "table", "all"],
    "rules v4": ["ip", "rule"],
    "rules v6": ["ip", "-6", "rule"],
    **{f"{b}-save": [f"{b}-save"] for b in TOOLS[:4]},
    "nft": ["nft", "list", "ruleset"],
}


# iptables-nft creates a base chain the first time a rule goes into it. The empty chains
# updown's rules leave behind (no rules, policy accept) hold nothing anyone owns; they stay.
EMPTY_NFT_CHAIN = re.compile(r"^\tchain \w+ \{\n\t\ttype filter hook \w+ priority filter; policy accept;\n\t\}\n", re.M)


COUNTERS = re.compile(r"(?<=\[)\d+:\d+(?=\])|(?<=packets )\d+ bytes \d+")


def kernel_text(ns) -> dict[str, str]:
    """What the admin tools print, minus iptables-save's time stamps and empty nft base chains."""
    out = {}
    for name, argv in KERNEL_TEXT.items():
        text = ns.run(*argv).stdout
        out[name] = "".join(line for line in text.splitlines(True) if not line.startswith("# "))
    out["nft"] = EMPTY_NFT_CHAIN.sub("", out["nft"].replace("\n\n", "\n"))
    for name in ("routes v4", "routes v6"):
        # routes of one prefix on two devices (ff00::/8, local ones) list in the order the kernel
        # happened to add them, which the load on the machine decides: the set is the state
        entries = re.findall(r"^\S.*\n(?:\s.*\n)*", out[name], re.M)
        assert sum(map(len, entries)) == len(out[name]), out[name]
        out[name] = "".join(sorted(entries))
    # packet counters move with the namespace's own IPv6 chatter: not state
    return {name: COUNTERS.sub("0", text) for name, text in out.items()}


def flush_in(ns, fail_closed: bool, **judge):
    with ns.enter():
        state = read_state(ReadOptions())
        plan = plan_flush(state, decide_ownership(state.objects, **judge), fail_closed)
        return plan, execute(plan)


def test_flush_removes_exactly_charons_state_and_foreign_state_survives_byte_identical(
        netns_factory, updown):
    mixed, reference = netns_factory(), netns_factory()
    mixed.sh(SETUP + FOREIGN_1)
    mixed.sh(CHARON)                     # another process than the foreign ones
    charon_updown(mixed, updown)
    mixed.sh(FOREIGN_2)
    reference.sh(SETUP + FOREIGN_1 + FOREIGN_2)
    expected = kernel_text(reference)
    before = kernel_text(mixed)
    assert all(before[k] != expected[k] for k in ("xfrm policy", "routes v4", "routes v6", "rules v4",
                                                  "rules v6", "iptables-nft-save", "ip6tables-legacy-save"))

    plan, results = flush_in(mixed, fail_closed=False)

    assert [r.outcome for r in results] == [Outcome.DONE] * len(plan)
    kinds = sorted(a.record.FAMILY for a in plan.actions)
    assert kinds == ["firewall"] * 8 + ["route"] * 2 + ["rule"] * 2 + ["xfrm_policy"] * 7
    after = kernel_text(mixed)
    for name in KERNEL_TEXT:
        assert after[name] == expected[name], name


def test_fail_closed_blocks_are_in_place_before_the_first_policy_delete(netns):
    netns.sh(SETUP + CHARON + FOREIGN_2)
    with netns.enter():
        monitor = XfrmMonitor()
    with monitor:
        plan, results = flush_in(netns, fail_closed=True)
        timeline = []
        deadline = time.monotonic() + 30
        while not any(e.action is Action.DELETE for e in timeline) or select.select([monitor], [], [], 0.2)[0]:
            assert time.monotonic() < deadline, "the monitor never reported the deletes"
            select.select([monitor], [], [], 0.5)
            timeline += monitor.read_events()
    assert all(r.ok for r in results)
    policy_events = [e for e in timeline if e.family == "xfrm_policy"]
    blocks = [i for i, e in enumerate(policy_events)
              if e.action is Action.NEW and e.record.selector.user == SUPERVISOR_BLOCK_UID]
    deletes = [i for i, e in enumerate(policy_events) if e.action is Action.DELETE]
    assert len(blocks) == 5             # out+fwd of both tunnels, and the drop shunt
    assert len(deletes) == 7
    assert max(blocks) < min(deletes)
    with netns.enter():
        left = [p for p in xfrm.dump_policies() if is_supervisor_block(p)]
    assert {(p.selector.saddr, p.dir, p.priority) for p in left} == {
        ("10.1.0.0", xfrm.DIR_OUT, 383614), ("10.2.0.0", xfrm.DIR_FWD, 383614),
        ("fd00:1::", xfrm.DIR_OUT, 334462), ("fd00:2::", xfrm.DIR_FWD, 334462),
        ("10.1.0.0", xfrm.DIR_OUT, 183614)}


def send_udp(src: str, dst: str) -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((src, 0))
        try:
            s.sendto(b"cleartext?", (dst, 9))
            return "sent"
        except PermissionError:
            return "blocked"


def test_block_holds_until_removed_even_after_charon_reinstalls_and_never_collides(netns):
    """No EEXIST for charon's re-install, packets dropped until blocks_to_remove lets go."""
    netns.sh(SETUP + CHARON + "ip route add 10.2.0.0/16 via 192.0.2.2 dev veth0\n")
    with netns.enter():
        assert send_udp("10.1.0.1", "10.2.0.5") == "sent"     # the leftover: no SA, larval drop
        plan, results = flush_in(netns, fail_closed=True)
        assert all(r.ok for r in results)
        assert send_udp("10.1.0.1", "10.2.0.5") == "blocked"  # no policy of charon's left: the block
        # charon comes back: an exclusive add (NEWPOLICY, what charon sends first) succeeds
        charon = XfrmPolicy(XfrmSelector(socket.AF_INET, "10.1.0.0", 16, "10.2.0.0", 16), xfrm.DIR_OUT,
                            priority=383615, templates=(XfrmTemplate(socket.AF_INET, "192.0.2.1",
                                                                     "192.0.2.2", reqid=5,
                                                                     mode=xfrm.MODE_TUNNEL),))
        xfrm.add_policy(charon)
        assert send_udp("10.1.0.1", "10.2.0.5") == "blocked"  # the block still wins
        policies = xfrm.dump_policies()
        blocks = [p for p in policies if is_supervisor_block(p)]
        now = time.monotonic()
        removable = blocks_to_remove(blocks, policies, now=now, deadline=now + 60)
        [action] = removable
        assert action.block.selector.saddr == "10.1.0.0" and action.block.dir == xfrm.DIR_OUT
        results = execute(Plan("unblock", removable))
        assert [r.outcome for r in results] == [Outcome.DONE]
        assert send_udp("10.1.0.1", "10.2.0.5") == "sent"     # charon's policy decides again
        remaining = [p for p in xfrm.dump_policies() if is_supervisor_block(p)]
        assert len(remaining) == 4
        late = blocks_to_remove(remaining, xfrm.dump_policies(), now=now + 61, deadline=now + 60)
        assert len(late) == 4 and all("timeout" in a.reason for a in late)
        execute(Plan("unblock", late))
        assert not [p for p in xfrm.dump_policies() if is_supervisor_block(p)]


def test_executor_reports_every_action_and_never_stops_at_the_first_error(netns):
    netns.sh(SETUP + CHARON)
    with netns.enter():
        state = read_state(ReadOptions())
    plan = plan_flush(state, decide_ownership(state.objects), fail_closed=True)
    # the route is already gone when the executor gets there; one policy delete fails
    netns.sh("ip route del 10.2.0.0/16 table 220")
    victim = next(a for a in plan.actions if isinstance(a, DeleteObject)
                  and a.record.FAMILY == "xfrm_policy" and a.record.dir == xfrm.DIR_IN
                  and a.record.selector.saddr == "10.2.0.0")
    # and one block cannot be installed: the policy it covers must then stay
    no_block = next(a for a in plan.actions if isinstance(a, InstallBlockPolicy)
                    and a.covers.selector.saddr == "fd00:1::")

    def failing_delete(action, session):
        if action is victim:
            raise KernelError(f"cannot delete {action.record.describe()}: Operation not permitted")
        return reconcile.HANDLERS[DeleteObject](action, session)

    def failing_install(action, session):
        if action is no_block:
            raise KernelError("cannot add SPD entry: No buffer space available")
        return reconcile.HANDLERS[InstallBlockPolicy](action, session)

    seen = []
    with netns.enter():
        results = execute(plan, handlers={DeleteObject: failing_delete, InstallBlockPolicy: failing_install},
                          on_result=lambda i, r: seen.append(i))
        policies = xfrm.dump_policies()
    assert seen == list(range(len(plan)))
    outcome = {r.action.describe(): r for r in results}
    assert outcome[victim.describe()].outcome is Outcome.FAILED
    assert "Operation not permitted" in outcome[victim.describe()].message
    assert outcome[no_block.describe()].outcome is Outcome.FAILED
    covered = next(r for r in results if isinstance(r.action, DeleteObject) and r.action.record == no_block.covers)
    assert covered.outcome is Outcome.SKIPPED and "did not succeed" in covered.message
    route = next(r for r in results if isinstance(r.action, DeleteObject) and r.action.record.FAMILY == "route"
                 and r.action.record.family == "inet")
    assert route.outcome is Outcome.ALREADY_GONE
    assert sum(1 for r in results if r.outcome is Outcome.DONE) == len(plan) - 4
    # what stayed: the failed delete, and the policy whose block is missing (still fail-closed itself)
    left = {(p.selector.saddr, p.dir) for p in policies if not is_supervisor_block(p)}
    assert left == {("10.2.0.0", xfrm.DIR_IN), ("fd00:1::", xfrm.DIR_OUT)}


def test_daemon_state_attributed_by_the_ledger_is_flushed_after_kill_9_and_lookalikes_survive(
        netns, tmp_path, updown):
    netns.sh(SETUP)
    with netns.enter():
        watch = KernelWatch()
        baseline = start_ledger(read_state(ReadOptions()), None)
    mine = [XfrmPolicy(XfrmSelector(socket.AF_INET, a, 16, b, 16), d, priority=383615,
                       templates=(XfrmTemplate(socket.AF_INET, s, t, reqid=1, mode=xfrm.MODE_TUNNEL),))
            for a, b, d, s, t in (("10.1.0.0", "10.2.0.0", xfrm.DIR_OUT, "192.0.2.1", "192.0.2.2"),
                                  ("10.2.0.0", "10.1.0.0", xfrm.DIR_IN, "192.0.2.2", "192.0.2.1"),
                                  ("10.2.0.0", "10.1.0.0", xfrm.DIR_FWD, "192.0.2.2", "192.0.2.1"))]
    mine += [Route("inet", 220, "10.2.0.0", 16, protocol=4, gateway="192.0.2.2", oif_name="veth0"),
             Rule("inet", 220, table=220), Address("inet", "10.99.0.5", 32, None, "lo")]
    with watch:
        daemon = start_fake_daemon(netns, tmp_path, mine, commands=updown_commands(updown)[:1])
        ports = DaemonPorts(daemon.pid)
        # another process's look-alikes: charon's band, table 220 static, rule 220, an updown shape
        netns.sh("ip xfrm policy add src 10.3.0.0/16 dst 10.4.0.0/16 dir out priority 383615 "
                 "tmpl src 192.0.2.1 dst 192.0.2.3 proto esp reqid 3 mode tunnel\n"
                 "ip route add 10.4.0.0/16 via 192.0.2.3 dev veth0 proto static table 220\n"
                 "ip rule add priority 220 table 220 fwmark 7\n"
                 "ip addr add 10.99.0.6/32 dev lo\n")
        netns.run(*updown("nft", verb="up-client", reqid=3, me="192.0.2.1", peer="192.0.2.3",
                          my_client="10.3.0.0/16", peer_client="10.4.0.0/16", host_access=1))
        events = read_events(watch, lambda evs: sum(1 for e in evs if e.action is Action.NEW and (
            e.family in ("xfrm_policy", "rule") or (e.family == "route" and e.record.table == 220)
            or (e.family == "address" and e.record.address.startswith("10.99.")))) >= 10)
        ledger = apply_events(baseline, events, ports.update(events))
        daemon.send_signal(signal.SIGKILL)
        daemon.wait()
    # the supervisor itself restarts: the ledger comes back from its file
    path = str(tmp_path / "ledger.json")
    save_ledger(path, ledger)
    ledger = load_ledger(path)
    with netns.enter():
        state = read_state(ReadOptions())
    by_markers = decide_ownership(state.objects)
    assert len(by_markers.owned("xfrm_policy")) == 4 and len(by_markers.owned("route")) == 2

    plan, results = flush_in(netns, fail_closed=True, ledger=ledger)

    assert all(r.ok for r in results), [r.message for r in results if not r.ok]
    assert {a.rule for a in plan.actions if isinstance(a, DeleteObject)} == {"ledger:daemon", "marker:updown-reqid"}
    with netns.enter():
        after = read_state(ReadOptions())
    policies = [p for p in after.objects["xfrm_policy"] if not is_supervisor_block(p)]
    assert [p.selector.saddr for p in policies] == ["10.3.0.0"]
    assert [r.dst for r in after.objects["route"]] == ["10.4.0.0"]
    assert [r.fwmark for r in after.objects["rule"]] == [7]
    assert "10.99.0.5" not in {a.address for a in after.objects["address"]}
    assert "10.99.0.6" in {a.address for a in after.objects["address"]}
    assert {r.updown.reqid for r in after.objects["firewall"] if r.updown} == {3}
    assert sum(1 for r in after.objects["firewall"] if r.updown) == 4


# --- the commands ---------------------------------------------------------------------------

def run_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "supervisor.cli", *argv], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def fake_charon(tmp_path):
    """Start an unprivileged sleep named charon in a namespace; all are killed afterwards."""
    started = []
    home = Path(tempfile.mkdtemp(prefix="fake-charon-"))      # not under pytest's 0700 tmp_path
    home.chmod(0o755)
    binary = home / "charon"
    shutil.copy("/bin/sleep", binary)

    def start(ns) -> subprocess.Popen:
        proc = subprocess.Popen(["ip", "netns", "exec", ns.name, "setpriv", "--reuid=65534", "--regid=65534",
                                 "--clear-groups", str(binary), "600"])
        started.append(proc)
        deadline = time.monotonic() + 10
        while _comm(proc.pid) != "charon":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        return proc
    yield start
    for proc in started:
        proc.kill()
        proc.wait()
    shutil.rmtree(home)


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def test_leftovers_lists_owned_objects_with_their_rule_and_counts_foreign(netns, updown):
    netns.sh(SETUP + CHARON + FOREIGN_2)
    charon_updown(netns, updown)
    r = run_cli("leftovers", "--netns", netns.name, "--no-ledger", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert {k: len(v) for k, v in doc["owned"].items()} == {
        "xfrm_sa": 0, "xfrm_policy": 7, "route": 2, "rule": 2, "address": 0, "firewall": 8}
    assert doc["owned"]["xfrm_policy"][0]["rule"] == "marker:priority-band"
    assert doc["foreign"] == sum(c["foreign"] for c in doc["counts"].values())
    assert doc["counts"]["rule"] == {"owned": 2, "foreign": 1}
    r = run_cli("leftovers", "--netns", netns.name, "--no-ledger")
    assert r.returncode == 0 and "[marker:updown-reqid] updown INPUT rule (--dir in) for charon's reqid 1" in r.stdout
    assert "foreign objects (never touched):" in r.stdout


def test_a_process_merely_named_charon_neither_makes_flush_refuse_nor_keeps_anything(netns_factory, fake_charon):
    # Who is a daemon is decided by uid 0 and /proc/PID/exe (tests/test_daemons.py has the real charon
    # that makes flush refuse); an unprivileged renamed sleep holds no IKE socket and is not one.
    target = netns_factory()
    target.sh(SETUP + CHARON)
    proc = fake_charon(target)
    r = run_cli("flush", "--netns", target.name, "--dry-run")
    assert r.returncode == 0 and "(dry run: nothing changed)" in r.stdout
    assert f"pid {proc.pid}" not in r.stdout and "keep " not in r.stdout
    assert "delete rule 220: from all lookup 220" in r.stdout
    r = run_cli("flush", "--netns", target.name, "--fail-closed")
    assert r.returncode == 0, r.stderr
    assert "summary: 16 done" in r.stdout and "fail-closed blocks stay" in r.stdout
    dirs = [line for line in target.run("ip", "xfrm", "policy").stdout.splitlines() if "\tdir " in line]
    assert len(dirs) == 5 and all("action block" in line for line in dirs)   # only our blocks are left
    r = run_cli("flush", "--netns", target.name, "--json")
    doc = json.loads(r.stdout)
    assert [x["outcome"] for x in doc["results"]] == ["done"] * 5     # the blocks go
    assert target.run("ip", "xfrm", "policy").stdout == ""


def test_flush_exits_1_when_an_action_fails(netns, monkeypatch, capsys):
    netns.sh(SETUP + CHARON)

    def refuse(action, session):
        raise KernelError(f"cannot delete {action.record.describe()}: Device or resource busy")
    monkeypatch.setitem(reconcile.HANDLERS, DeleteObject, refuse)
    code = cli.main(["flush", "--netns", netns.name, "--no-ledger"])
    out = capsys.readouterr().out
    assert code == ExitCode.FAILED
    assert "FAILED       delete rule 220: from all lookup 220: cannot delete" in out
    assert "summary: 11 failed" in out


def test_flush_without_root_is_refused():
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable,
                        "-m", "supervisor.cli", "flush", "--dry-run"], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == ExitCode.NOT_ROOT and "root" in r.stderr


# --- a real charon ------------------------------------------------------------------------

CHARON_BIN = "/usr/lib/ipsec/charon"
needs_charon = pytest.mark.skipif(not os.path.exists(CHARON_BIN) or not shutil.which("swanctl"),
                                  reason="needs strongSwan's charon and swanctl")

STRONGSWAN_CONF = """
charon {{
  load = random nonce openssl pem pkcs1 x509 kernel-netlink socket-default vici
  port = 0
  port_nat_t = 0
  filelog {{
    test {{
      path = {log}
      default = 1
      knl = 2
      flush_line = yes
    }}
  }}
  syslog {{
    daemon {{
      default = -1
    }}
  }}
  plugins {{
    vici {{
      socket = unix:///run/charon.vici
    }}
  }}
}}
"""

SWANCTL_CONF = """
connections {
  test {
    local_addrs = 192.0.2.1
    remote_addrs = 192.0.2.2
    local {
      auth = psk
      id = a
    }
    remote {
      auth = psk
      id = b
    }
    children {
      net {
        local_ts = 10.1.0.0/16
        remote_ts = 10.2.0.0/16
        start_action = trap
      }
    }
  }
}
secrets {
  ike-1 {
    id = a
    secret = "not a secret"
  }
}
"""

# One mount namespace per charon with a private /run (pid file, VICI socket); the
# script waits for charon so that kill -9 of charon ends it.
CHARON_SCRIPT = """
mount -t tmpfs tmpfs /run
STRONGSWAN_CONF={conf} {charon} &
pid=$!
i=0
while [ ! -S /run/charon.vici ]; do
  i=$((i+1)); [ $i -lt 400 ] && kill -0 $pid || exit 3; sleep 0.05
done
swanctl --load-all --noprompt --file {swanctl} --uri unix:///run/charon.vici >/dev/null 2>&1
echo "charon $pid"
wait $pid
"""


@pytest.fixture
def real_charon(tmp_path):
    """start(ns, n) runs charon number N in NS with trap policies loaded; returns (script, pid, log)."""
    (tmp_path / "swanctl.conf").write_text(SWANCTL_CONF)
    running = []

    def start(ns, n: int):
        log = tmp_path / f"charon-{n}.log"
        conf = tmp_path / f"strongswan-{n}.conf"
        conf.write_text(STRONGSWAN_CONF.format(log=log))
        script = tmp_path / f"run-{n}.sh"
        script.write_text(CHARON_SCRIPT.format(conf=conf, charon=CHARON_BIN, swanctl=tmp_path / "swanctl.conf"))
        proc = subprocess.Popen(["ip", "netns", "exec", ns.name, "unshare", "-m", "--propagation", "private",
                                 "sh", "-e", str(script)], stdout=subprocess.PIPE, text=True)
        running.append(proc)
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        line = proc.stdout.readline() if ready else ""
        assert line.startswith("charon "), f"charon did not start (log: {log.read_text() if log.exists() else ''})"
        pid = int(line.split()[1])
        running.append(pid)
        with ns.enter():
            deadline = time.monotonic() + 30
            while sum(1 for p in xfrm.dump_policies() if not p.per_socket and p.priority == 383616) < 3:
                assert time.monotonic() < deadline, "charon never installed its trap policies"
                time.sleep(0.05)
        return proc, pid, log

    yield start
    for item in running:
        if isinstance(item, int):
            # The pid may be long gone and reused by an unrelated process: only kill a charon.
            try:
                with open(f"/proc/{item}/comm") as f:
                    if f.read().strip() == "charon":
                        os.kill(item, signal.SIGKILL)
            except (FileNotFoundError, ProcessLookupError):
                pass
        else:
            item.kill()
            item.wait()


def kill_9(proc: subprocess.Popen, pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=30)


COMPLAINTS = ("policy already exists", "unable to create", "unable to install", "unable to add")


@needs_charon
def test_real_charon_after_kill_9_finds_a_clean_slate_after_a_fail_closed_flush(netns, real_charon):
    netns.sh(SETUP)
    proc, pid, _ = real_charon(netns, 1)
    with netns.enter():
        state = read_state(ReadOptions())
    judged = decide_ownership(state.objects)
    # the markers recognise everything charon installed, priorities by charon's exact formula
    assert len(judged.owned("xfrm_policy")) == 3
    assert all("exactly what charon computes for this selector: trap" in v.detail
               for _, v in judged.owned("xfrm_policy"))
    assert [r.dst for r, _ in judged.owned("route")] == ["10.2.0.0"]
    assert sorted(r.family for r, _ in judged.owned("rule")) == ["inet", "inet6"]   # charon adds both
    assert {v.rule for _, v in judged.foreign("xfrm_policy")} == {"per-socket"}   # its IKE sockets'
    kill_9(proc, pid)

    # control: restarted over its leftovers, charon complains (as with the old starter)
    proc, pid, log = real_charon(netns, 2)
    assert "policy already exists" in log.read_text()
    kill_9(proc, pid)

    plan, results = flush_in(netns, fail_closed=True)
    assert all(r.ok for r in results) and sum(1 for a in plan.actions if a.KIND == "install-block") == 2
    with netns.enter():
        assert {r.FAMILY for r in read_state(ReadOptions()).objects["xfrm_policy"]
                if not is_supervisor_block(r)} == set()

    proc, pid, log = real_charon(netns, 3)
    text = log.read_text()
    assert not [c for c in COMPLAINTS if c in text], text
    with netns.enter():
        policies = xfrm.dump_policies()
        now = time.monotonic()
        removable = blocks_to_remove([p for p in policies if is_supervisor_block(p)], policies, now, now + 60)
        assert len(removable) == 2 and all("charon installed" in a.reason for a in removable)
        assert all(r.ok for r in execute(Plan("unblock", removable)))
        after = read_state(ReadOptions())
    assert sorted((p.dir, p.priority) for p in after.objects["xfrm_policy"] if not p.per_socket) == [
        (0, 383616), (1, 383616), (2, 383616)]
    assert len(after.objects["route"]) == 1 and len(after.objects["rule"]) == 2
    kill_9(proc, pid)


# --- SAs (needs ESP: the real-kernel VM tier) -----------------------------------------------

SA_KEYS = "enc 'cbc(aes)' 0x" + "11" * 16 + " auth-trunc 'hmac(sha256)' 0x" + "22" * 32 + " 128"
CHARON_SAS = f"""
ip xfrm state add src 192.0.2.2 dst 192.0.2.1 proto esp spi 0xc1234567 reqid 1 mode tunnel {SA_KEYS}
ip xfrm state add src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x0badf00d reqid 1 mode tunnel {SA_KEYS}
ip xfrm state add src 2001:db8::2 dst 2001:db8::1 proto esp spi 0xc7654321 reqid 2 mode tunnel {SA_KEYS}
"""
FOREIGN_SAS = f"""
ip xfrm state add src 192.0.2.1 dst 192.0.2.7 proto esp spi 0x00001000 mode tunnel {SA_KEYS}
ip xfrm state add src 192.0.2.7 dst 192.0.2.1 proto esp spi 0x00002000 reqid 7 mode tunnel {SA_KEYS}
"""


@pytest.mark.realkernel
def test_flush_removes_charons_sas_by_spi_range_and_reqid_and_leaves_foreign_sas(netns_factory):
    mixed, reference = netns_factory(), netns_factory()
    mixed.sh(SETUP + FOREIGN_1 + FOREIGN_SAS)
    mixed.sh(CHARON + CHARON_SAS)
    reference.sh(SETUP + FOREIGN_1 + FOREIGN_SAS)
    plan, results = flush_in(mixed, fail_closed=True)
    assert all(r.ok for r in results)
    assert {a.record.spi: a.rule for a in plan.actions
            if isinstance(a, DeleteObject) and a.record.FAMILY == "xfrm_sa"} == {
        0xC1234567: "marker:spi-range", 0x0BADF00D: "marker:reqid", 0xC7654321: "marker:spi-range"}
    state_text = lambda ns: ns.run("ip", "xfrm", "state").stdout    # noqa: E731
    assert state_text(mixed) == state_text(reference)
    assert "spi 0x00002000" in state_text(mixed)


@pytest.mark.realkernel
def test_the_ledger_tells_the_daemons_sas_from_lookalikes_in_charons_spi_range(netns, tmp_path):
    netns.sh(SETUP)
    sas = [xfrm.XfrmSA(socket.AF_INET, "192.0.2.1", spi, xfrm.IPPROTO_ESP, "192.0.2.2", mode=xfrm.MODE_TUNNEL,
                       reqid=1, replay_window=32,
                       crypt=xfrm.XfrmAlgorithm("cbc(aes)", 128, "11" * 16),
                       auth_trunc=xfrm.XfrmAlgorithm("hmac(sha256)", 256, "22" * 32, 128))
           for spi in (0xC0000001, 0x0BADF00D)]
    with netns.enter():
        watch = KernelWatch()
        baseline = start_ledger(read_state(ReadOptions()), None)
    with watch:
        daemon = start_fake_daemon(netns, tmp_path, sas)
        try:
            ports = DaemonPorts(daemon.pid)
            netns.sh(f"ip xfrm state add src 192.0.2.3 dst 192.0.2.1 proto esp spi 0xc0000002 reqid 3 "
                     f"mode tunnel {SA_KEYS}")
            events = read_events(watch, lambda evs: sum(1 for e in evs if e.family == "xfrm_sa") >= 3)
            ledger = apply_events(baseline, events, ports.update(events))
        finally:
            stop(daemon)
    plan, results = flush_in(netns, fail_closed=True, ledger=ledger)
    assert all(r.ok for r in results)
    assert sorted(a.record.spi for a in plan.actions) == [0x0BADF00D, 0xC0000001]
    with netns.enter():
        assert [sa.spi for sa in xfrm.dump_sas()] == [0xC0000002]     # charon's range, but ip's


# --- batches ------------------------------------------------------------------------------

def test_executor_batches_runs_of_one_kind_with_per_action_results_in_plan_order(netns, monkeypatch):
    netns.sh(SETUP + CHARON)
    with netns.enter():
        state = read_state(ReadOptions())
    policies = {(p.selector.saddr, p.selector.daddr, p.dir): p for p in state.objects["xfrm_policy"]}
    out, inb, fwd = (policies[("10.1.0.0", "10.2.0.0", xfrm.DIR_OUT)],
                     policies[("10.2.0.0", "10.1.0.0", xfrm.DIR_IN)],
                     policies[("10.2.0.0", "10.1.0.0", xfrm.DIR_FWD)])
    unblockable = reconcile.block_policy_for(dataclasses.replace(fwd, dir=xfrm.DIR_FWD + xfrm.XFRM_POLICY_MAX))
    per_socket = dataclasses.replace(inb, dir=xfrm.DIR_IN + xfrm.XFRM_POLICY_MAX)
    route_v4, route_v6 = state.objects["route"]
    actions = (
        InstallBlockPolicy(reconcile.block_policy_for(out), out, "r", "fail-closed"),       # 0 done
        InstallBlockPolicy(unblockable, fwd, "r", "fail-closed"),                           # 1 failed
        DeleteObject(out, "r", "owned", after=(0,)),                                        # 2 done
        DeleteObject(per_socket, "r", "owned"),                                             # 3 failed
        DeleteObject(fwd, "r", "owned", after=(1,)),                                        # 4 skipped
        DeleteObject(inb, "r", "owned"),                                                    # 5 done
        DeleteObject(inb, "r", "owned"),                                                    # 6 gone
        DeleteObject(route_v4, "r", "owned"),                                               # 7 done
        DeleteObject(route_v4, "r", "owned"),                                               # 8 gone
        DeleteObject(route_v6, "r", "owned"),                                               # 9 done
    )
    batches = []
    real = reconcile._execute_batch
    monkeypatch.setattr(reconcile, "_execute_batch",
                        lambda run, *args: (batches.append(len(run)), real(run, *args))[1])
    seen = []
    with netns.enter():
        results = execute(Plan("flush", actions), on_result=lambda i, r: seen.append(i))
        left = {(p.selector.saddr, p.selector.daddr, p.dir) for p in xfrm.dump_policies()
                if not is_supervisor_block(p)}
        routes_left = read_state(ReadOptions()).objects["route"]
    assert batches == [2, 5, 3]
    assert seen == list(range(len(actions)))
    assert [r.outcome for r in results] == [
        Outcome.DONE, Outcome.FAILED, Outcome.DONE, Outcome.FAILED, Outcome.SKIPPED, Outcome.DONE,
        Outcome.ALREADY_GONE, Outcome.DONE, Outcome.ALREADY_GONE, Outcome.DONE]
    assert "per-socket policy" in results[1].message and "per-socket policy" in results[3].message
    assert results[4].message.startswith("not attempted: action 2 (install block")
    assert results[6].message == "was no longer there"
    assert ("10.2.0.0", "10.1.0.0", xfrm.DIR_FWD) in left                 # its block failed: it stays
    assert not {("10.1.0.0", "10.2.0.0", xfrm.DIR_OUT), ("10.2.0.0", "10.1.0.0", xfrm.DIR_IN)} & left
    assert routes_left == ()


def test_a_batch_that_raises_fails_its_actions_and_the_plan_goes_on(netns, monkeypatch):
    netns.sh(SETUP + CHARON)
    with netns.enter():
        state = read_state(ReadOptions())
    plan = plan_flush(state, decide_ownership(state.objects), fail_closed=False)

    def broken(records, **kwargs):
        raise RuntimeError("bug in a batch verb")
    monkeypatch.setattr(xfrm, "delete_policies", broken)
    with netns.enter():
        results = execute(plan)
    by_family: dict[str, set] = {}
    for r in results:
        by_family.setdefault(r.action.record.FAMILY, set()).add((r.outcome, r.message))
    assert by_family["xfrm_policy"] == {(Outcome.FAILED, "RuntimeError: bug in a batch verb")}
    assert by_family["route"] == {(Outcome.DONE, "")} and by_family["rule"] == {(Outcome.DONE, "")}
