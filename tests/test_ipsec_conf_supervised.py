"""Real charon under `ipsec-supervisor run` with daemon.config: ipsec.conf (no starter, no stroke).

The supervisor loads ipsec.conf/ipsec.secrets over VICI after every start, also after a kill -9,
and its reload applies only what changed (strongSwan's `ipsec update`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from supervisor.kernel import xfrm

from charon_ns import CHARON, ROOT, SWANCTL, SupervisedCharon, start_supervised_charon

pytestmark = [
    pytest.mark.skipif(not os.path.exists(CHARON) or not os.path.exists(SWANCTL),
                       reason="needs strongSwan (strongswan-charon, strongswan-swanctl)"),
]

IPSEC_CONF = """\
config setup
    charondebug="knl 2"

conn %default
    keyexchange=ikev2
    authby=secret
    left=192.0.2.1
    right=192.0.2.2

conn home
    leftsubnet=10.1.0.0/16
    rightsubnet=10.2.0.0/16
    auto=route
"""
SECOND = """
conn office
    leftsubnet=10.1.0.0/16
    rightsubnet=10.3.0.0/16
    auto=route
"""


def trap_selectors(netns) -> set[tuple[str, str]]:
    with netns.enter():
        return {(p.selector.saddr + f"/{p.selector.prefixlen_s}", p.selector.daddr + f"/{p.selector.prefixlen_d}")
                for p in xfrm.dump_policies() if not p.per_socket and p.dir == 1}


def wait_for(pred, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_ipsec_conf_is_loaded_over_vici_after_start_and_after_kill_9_and_updated_on_reload(netns, tmp_path):
    netns.sh("ip link add v0 type veth peer name v1; ip link set v0 up; ip link set v1 up; "
             "ip addr add 192.0.2.1/24 dev v0")
    conf = tmp_path / "ipsec.conf"
    conf.write_text(IPSEC_CONF)
    secrets = tmp_path / "ipsec.secrets"
    secrets.write_text('192.0.2.1 192.0.2.2 : PSK "not-a-real-secret-0123456789"\n')
    os.chmod(secrets, 0o600)
    sup = start_supervised_charon(
        netns.name, str(tmp_path / "moon"), swanctl_conf="", mode="flush",
        supervisor={"daemon": {"config": "ipsec.conf", "ipsec_conf": str(conf),
                               "ipsec_secrets": str(secrets), "load_commands": None}})
    try:
        st = sup.status()
        assert st["daemon"]["load_ok"], st
        assert "home" in {name for c in sup.list_conns() for name in c}
        assert trap_selectors(netns) == {("10.1.0.0/16", "10.2.0.0/16")}
        assert "--debug-knl" in open(f"/proc/{sup.charon_pid}/cmdline").read().split("\0")

        sup.kill_charon()
        sup.wait_running(restarts=1)
        wait_for(lambda: trap_selectors(netns) == {("10.1.0.0/16", "10.2.0.0/16")},
                 "the trap policy after the restart")

        conf.write_text(IPSEC_CONF + SECOND)
        sup.request("reload-daemon")
        wait_for(lambda: trap_selectors(netns) == {("10.1.0.0/16", "10.2.0.0/16"),
                                                   ("10.1.0.0/16", "10.3.0.0/16")},
                 "the new conn to be routed by the update")
        # Like the starter, conns with the same IKE settings share one connection (named after
        # the first); each conn is a child of it.
        children = {child for c in sup.list_conns() for conn in c.values() for child in conn["children"]}
        assert {"home", "office"} <= children
        assert sup.stop() == 0
    finally:
        sup.cleanup()


OVS_START = """\
config setup
    uniqueids=yes

conn %default
    keyexchange=ikev2
    authby=secret
    left=192.0.2.1
    right=192.0.2.2
"""
OVS_HOME = """
conn home
    leftsubnet=10.1.0.0/16
    rightsubnet=10.2.0.0/16
    auto=route
"""
REFUSED = """
conn broken
    leftsubnet=10.1.0.0/16
    rightsubnet=10.4.0.0/16
    esp=nonsense99-nothing
    auto=route
"""


def ipsec(sup, *argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "supervisor.ipsec_cli", *argv, "--config", sup.config_path],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def loaded_children(sup) -> set[str]:
    return {child for c in sup.list_conns() for conn in c.values() for child in conn["children"]}


def test_auto_mode_decides_at_every_update_the_way_open_vswitch_drives_it(netns, tmp_path):
    """OVS: start with no conn (swanctl), then conns appear, one is refused, the file breaks, all go."""
    netns.sh("ip link add v0 type veth peer name v1; ip link set v0 up; ip link set v1 up; "
             "ip addr add 192.0.2.1/24 dev v0")
    conf = tmp_path / "ipsec.conf"
    conf.write_text(OVS_START)
    secrets = tmp_path / "ipsec.secrets"
    secrets.write_text('192.0.2.1 192.0.2.2 : PSK "not-a-real-secret-0123456789"\n')
    os.chmod(secrets, 0o600)
    sup = SupervisedCharon(
        netns.name, str(tmp_path / "moon"), swanctl_conf="", mode="flush",
        supervisor={"daemon": {"config": "auto", "ipsec_conf": str(conf), "ipsec_secrets": str(secrets),
                               "load_commands": None}})
    # A record of an earlier run's loads (another charon's pid) must never make an update "unchanged".
    os.makedirs(sup.p("run"), mode=0o700, exist_ok=True)
    stale = os.path.join(sup.p("run"), "ipsec-conf.4194303.state")
    with open(stale, "w") as fh:
        fh.write('{"version": 1, "conns": {}}')
    sup.start()
    try:
        st = sup.wait_running()
        assert st["daemon"]["load"]["source"] == "swanctl", st["daemon"]["load"]
        assert not os.path.exists(stale)

        conf.write_text(OVS_START + OVS_HOME)
        res = ipsec(sup, "update")
        assert res.returncode == 0, res.stderr
        assert "home" in loaded_children(sup)       # loaded when the command returns: it waited
        assert trap_selectors(netns) == {("10.1.0.0/16", "10.2.0.0/16")}
        load = sup.status()["daemon"]["load"]
        assert (load["source"], load["mode"]) == ("ipsec.conf", "load"), load

        # One conn charon refuses: the others load, exit 0, the refusal is reported (as the starter does).
        conf.write_text(OVS_START + OVS_HOME + REFUSED)
        res = ipsec(sup, "update")
        assert res.returncode == 0, res.stderr
        assert "charon refused conn broken" in res.stderr, res.stderr
        st = sup.status()
        assert st["daemon"]["load"]["mode"] == "update" and st["daemon"]["load"]["refused"], st["daemon"]
        assert "1 conn(s) refused" in st["summary"]
        assert "home" in loaded_children(sup)

        # The file breaks: nothing can be applied, exit 1 with the reason; what charon has stays.
        conf.write_text("conn a\nleft=1\n\x1b[31m\n")
        res = ipsec(sup, "reload")
        assert res.returncode == 1, (res.returncode, res.stderr)
        assert "syntax error" in res.stderr and "\x1b" not in res.stderr, res.stderr
        assert "configuration load FAILED" in sup.status()["summary"]
        assert trap_selectors(netns) == {("10.1.0.0/16", "10.2.0.0/16")}

        # OVS's exit: no conn any more. The update unloads what this charon got from the file.
        conf.write_text(OVS_START)
        res = ipsec(sup, "update")
        assert res.returncode == 0, res.stderr
        assert "home" not in loaded_children(sup)
        assert trap_selectors(netns) == set()

        # A new charon: nothing of the old one's loads applies; no conn -> swanctl again.
        sup.kill_charon()
        st = sup.wait_running(restarts=1)
        assert st["daemon"]["load"]["source"] == "swanctl", st["daemon"]["load"]
        conf.write_text(OVS_START + OVS_HOME)
        res = ipsec(sup, "update")
        assert res.returncode == 0 and "home" in loaded_children(sup), res.stderr
        assert sup.stop() == 0
        assert not [n for n in os.listdir(sup.p("run")) if n.startswith("ipsec-conf.")]
    finally:
        sup.cleanup()
