"""Real charon under `ipsec-supervisor run` with daemon.config: ipsec.conf (no starter, no stroke).

The supervisor loads ipsec.conf/ipsec.secrets over VICI after every start, also after a kill -9,
and its reload applies only what changed (strongSwan's `ipsec update`).
"""

from __future__ import annotations

import os
import time

import pytest

from supervisor.kernel import xfrm

from charon_ns import CHARON, SWANCTL, start_supervised_charon

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
