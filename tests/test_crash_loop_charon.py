"""Real charon (Debian's strongSwan) in a crash loop under `ipsec-supervisor run`, in a namespace with a private /run.

charon runs with a trap policy, is killed with kill -9 and then dies at start 6 times (a
wrapper named charon exits 1 while a counter file says so, then execs the real charon): the
supervisor reaches the crash-loop limit, cools down fail-closed (blocks for charon's out/fwd
selectors, even in adopt mode), answers status with the next try, retries after the cooldown,
and the blocks go once the new charon has installed its policies again.  Throughout, the
kernel always has a policy for charon's selectors (its own, or a block): no cleartext path.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import threading
import time

import pytest

from supervisor.kernel import xfrm
from supervisor.ownership import is_supervisor_block

from charon_ns import CHARON, PLUGINS, SWANCTL, start_supervised_charon, strongswan_conf
from test_flush import SETUP
from test_recovery_charon import SWANCTL_CONF

pytestmark = [
    pytest.mark.skipif(not os.path.exists(CHARON) or not os.path.exists(SWANCTL),
                       reason="needs strongSwan (strongswan-charon, strongswan-swanctl)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
]

OUT = ("10.1.0.0", "10.2.0.0")    # charon's trap: out 10.1/16 -> 10.2/16, fwd and in the other way
FWD = ("10.2.0.0", "10.1.0.0")

WRAPPER = """#!/bin/sh
# A charon that cannot initialise while {count} holds a number above 0 (each start takes one).
n=$(cat {count} 2>/dev/null || echo 0)
if [ "$n" -gt 0 ]; then
  echo $((n - 1)) > {count}
  echo "charon wrapper: failing this start ($n left)"
  exit 1
fi
exec {charon} "$@"
"""


def policies(netns) -> list:
    with netns.enter():
        return [p for p in xfrm.dump_policies() if not p.per_socket]


def covering(pols, direction: int, sel: tuple[str, str]) -> list:
    return [p for p in pols if p.dir == direction and (p.selector.saddr, p.selector.daddr) == sel]


class CleartextWatch:
    """Polls the SPD every 10 ms: any moment without a policy for charon's out or fwd selector is a gap."""

    def __init__(self, netns):
        self.netns = netns
        self.gaps: list[str] = []
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with self.netns.enter():
            while not self._stop.is_set():
                pols = [p for p in xfrm.dump_policies() if not p.per_socket]
                self.samples += 1
                for direction, sel in ((xfrm.DIR_OUT, OUT), (xfrm.DIR_FWD, FWD)):
                    if not covering(pols, direction, sel):
                        self.gaps.append(f"{time.monotonic():.3f}: no policy dir {direction} {sel}")
                self._stop.wait(0.01)

    def __enter__(self) -> "CleartextWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)


def send_cleartext(netns) -> int:
    """errno of a UDP datagram 10.1.0.1 -> 10.2.0.1 (0: the kernel sent it)."""
    code = ("import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.bind(('10.1.0.1', 0))\n"
            "try:\n    s.sendto(b'x', ('10.2.0.1', 9)); print(0)\nexcept OSError as e:\n    print(e.errno)\n")
    r = netns.run("python3", "-c", code)
    return int(r.stdout.strip())


@pytest.fixture
def crash_looping(netns, tmp_path):
    netns.sh(SETUP + "ip route add 10.2.0.0/16 via 192.0.2.2 dev veth0\n")
    count = tmp_path / "count"
    wrapper = tmp_path / "bin" / "charon"
    wrapper.parent.mkdir()
    wrapper.write_text(WRAPPER.format(count=count, charon=CHARON))
    wrapper.chmod(0o755)
    workdir = tmp_path / "sup"
    workdir.mkdir()
    # with the stroke plugin too, so charon.ctl exists as under strongSwan's starter
    conf = strongswan_conf(str(workdir / "charon.log")).replace(PLUGINS, PLUGINS + " stroke")
    sup = start_supervised_charon(netns.name, str(workdir), swanctl_conf=SWANCTL_CONF, mode="adopt", strongswan=conf,
                                  supervisor={
        "daemon": {"command": [str(wrapper)]},
        "restart": {"crash_loop": {"max_deaths": 5, "window": "1m", "cooldown": "4s", "cooldown_max": "8s"}},
        "recovery": {"block_timeout": "1m"},
    })
    try:
        yield sup, count
    finally:
        sup.cleanup()


def test_charon_dying_at_start_cools_down_fail_closed_and_the_retry_brings_it_back(crash_looping, netns):
    sup, count = crash_looping
    pols = policies(netns)
    assert covering(pols, xfrm.DIR_OUT, OUT) and covering(pols, xfrm.DIR_FWD, FWD)
    assert not [p for p in pols if is_supervisor_block(p)]
    sup_pid = sup.proc.pid
    run = sup.run_root
    with open(os.path.join(run, "starter.charon.pid")) as fh:
        assert fh.read() == f"{sup_pid}\n"             # strongSwan's starter's file names the starter: us
    first = sup.charon_pid
    count.write_text("6")
    with CleartextWatch(netns) as watch:
        os.kill(first, signal.SIGKILL)
        st = sup.wait(lambda s: s["state"] == "cooldown", timeout=30, what="cooldown")
        assert st["summary"].startswith("crash loop: 5 deaths in 1m; next try in "), st["summary"]
        assert "(charon stays stopped, fail-closed; cooldown #1)" in st["summary"]
        assert count.read_text().strip() == "2"           # killed once, then 4 failed starts
        # Fail-closed while down: charon's policies flushed, blocks for its out/fwd selectors.
        pols = policies(netns)
        out, fwd = covering(pols, xfrm.DIR_OUT, OUT), covering(pols, xfrm.DIR_FWD, FWD)
        assert [is_supervisor_block(p) for p in out + fwd] == [True, True], pols
        assert not covering(pols, xfrm.DIR_IN, FWD)       # the in policy went with the flush
        assert send_cleartext(netns) == errno.EPERM       # the kernel refuses to send it in the clear
        rec = sup.crash_reports(wait_for=5)[-1]["recovery"]
        assert (rec["action"], rec["fail_closed"]) == ("flush", True), rec
        assert rec["reason"].startswith("crash-loop cooldown")
        # The dead charon's files in its /run are gone; ours (the starter's pid file) stays.
        assert not {"charon.pid", "charon.vici", "charon.ctl"} & set(os.listdir(run)), os.listdir(run)
        assert os.path.exists(os.path.join(run, "starter.charon.pid"))
        st = sup.status()
        assert 0 < st["next_restart_in_s"] <= 4.0
        assert st["recovery"]["blocks"] == 2
        # After the cooldown: two more failed starts (a new tally: no second cooldown), then charon.
        st = sup.wait_running(timeout=60)
        assert count.read_text().strip() == "0"
        assert st["crash_loop"]["cooldowns_in_a_row"] == 1 and st["crash_loop"]["deaths_in_window"] == 2
        st = sup.wait_recovered(timeout=30)               # charon installed its trap again: blocks gone
    assert watch.samples > 50 and watch.gaps == [], watch.gaps[:5]
    pols = policies(netns)
    out, fwd = covering(pols, xfrm.DIR_OUT, OUT), covering(pols, xfrm.DIR_FWD, FWD)
    assert [is_supervisor_block(p) for p in out + fwd] == [False, False], pols
    log = sup.log()
    assert log.count("state recovering -> cooldown") == 1
    assert "state cooldown -> preparing on cooldown-elapsed: cooldown of 4s over" in log
    assert "removed, charon installed" in log
    # `ipsec stop`'s part: the supervisor stops charon and leaves nothing in /run, neither its own
    # files nor charon's sockets (charon leaves those even after a clean stop).  A sleeper keeps
    # the private /run's mount namespace alive to look at it afterwards.
    keeper = subprocess.Popen(["nsenter", "-t", str(sup_pid), "-m", "sleep", "60"])
    try:
        time.sleep(0.2)
        assert {"charon.pid", "charon.vici", "charon.ctl", "starter.charon.pid"} <= set(os.listdir(run))
        assert sup.stop() == 0
        assert os.listdir(f"/proc/{keeper.pid}/root/run") == []
    finally:
        keeper.kill()
        keeper.wait()
    assert sorted(os.listdir(sup.p("run"))) == ["ledger.json"]   # kept on purpose: survives restarts
    out = subprocess.run(["ip", "netns", "pids", netns.name], capture_output=True, text=True).stdout
    assert out.split() == []
