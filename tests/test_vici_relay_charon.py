"""The pacing VICI relay between real swanctl and real charon (Debian's strongSwan) in namespaces.

Two charons with nothing loaded get the same swanctl.conf (six start conns to a peer that never
answers, two trap conns): one directly, one through the relay with parallel 2. Both must end up
with the same conns, swanctl must say and exit the same, and through the relay charon must have
begun its initiations two at a time, a window apart (nothing comes up: only the window frees).
"""

from __future__ import annotations

import os
import re
import subprocess
import time

import pytest

from supervisor.vici_relay import PacingRelay

from charon_ns import CHARON, SWANCTL, start_charon, start_supervised_charon
from test_flush import SETUP

pytestmark = [
    pytest.mark.skipif(not os.path.exists(CHARON) or not os.path.exists(SWANCTL),
                       reason="needs strongSwan (strongswan-charon, strongswan-swanctl)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
]

EMPTY = "connections {\n}\n"
STARTS, TRAPS, WINDOW = 6, 2, 1.5


def conf(starts: int = STARTS, traps: int = TRAPS) -> str:
    conns = []
    for i in range(starts + traps):
        action = "start" if i < starts else "trap"
        conns.append(f"""  c{i} {{
    local_addrs = 192.0.2.1
    remote_addrs = 192.0.2.2
    local {{ auth = psk
            id = moon }}
    remote {{ auth = psk
             id = sun{i} }}
    children {{ net {{ local_ts = 10.1.0.0/16
                     remote_ts = 10.{100 + i}.0.0/16
                     start_action = {action} }} }}
  }}""")
    return "connections {\n" + "\n".join(conns) + "\n}\nsecrets { ike-sun { id = moon\n secret = 0sFpZAZqEN6Ti9sqt4ZP5EWcqx } }\n"


def swanctl_load(conf_path: str, uri: str) -> subprocess.CompletedProcess:
    return subprocess.run([SWANCTL, "--load-all", "--noprompt", "--file", conf_path, "--uri", uri],
                          capture_output=True, text=True, timeout=60)


def initiations(log: str) -> list[float]:
    """Seconds of the day of charon's 'initiating IKE_SA' lines (the file log's %H:%M:%S.ms stamps)."""
    out = []
    for m in re.finditer(r"^(\d\d):(\d\d):(\d\d)\.(\d{3}) .*initiating IKE_SA c\d+\[", log, re.M):
        h, mi, s, ms = map(int, m.groups())
        out.append(h * 3600 + mi * 60 + s + ms / 1000)
    return sorted(out)


def conns_of(charon) -> list[dict]:
    return sorted(charon.list_conns(), key=lambda e: sorted(e))


def test_a_load_through_the_relay_loads_what_a_direct_load_does_with_initiations_in_windows(
        netns_factory, tmp_path):
    made = []
    try:
        charons = {}
        for side in ("direct", "relay"):
            ns = netns_factory()
            ns.sh(SETUP)
            workdir = tmp_path / side
            workdir.mkdir()
            charons[side] = c = start_charon(ns.name, str(workdir), swanctl_conf=EMPTY)
            made.append(c)
            c.write_swanctl(conf())
        run = tmp_path / "run"
        run.mkdir(mode=0o700)

        direct = charons["direct"]
        plain = swanctl_load(direct.swanctl, f"unix://{direct.vici_path}")

        paced = charons["relay"]
        relay = PacingRelay(str(run), paced.vici_path, parallel=2, window=WINDOW, budget=30.0)
        relay.start()
        began = time.monotonic()
        try:
            relayed = swanctl_load(paced.swanctl, f"unix://{relay.path}")
            took = time.monotonic() - began
        finally:
            report = relay.close()

        # charon creates a start conn's IKE_SA before it answers its load-conn (the adoption, which
        # begins after the load, therefore finds each one being established and initiates none again)
        assert ike_sas_by_conn(paced) == {f"c{i}": 1 for i in range(STARTS)}
        assert (relayed.returncode, relayed.stdout) == (plain.returncode, plain.stdout) == (0, plain.stdout)
        assert f"successfully loaded {STARTS + TRAPS} connections" in plain.stdout
        assert conns_of(paced) == conns_of(direct)

        # the relay let them through two per window; charon began each initiation as it got the conn
        released = [t - began for t, _ in relay.released]
        assert sorted(c for _, c in relay.released) == sorted(f"c{i}" for i in range(STARTS))
        for k, t in enumerate(released):
            assert (k // 2) * WINDOW - 0.1 <= t <= (k // 2) * WINDOW + 1.0, (k, released)
        assert 2 * WINDOW - 0.1 <= took < 2 * WINDOW + 5
        assert report["passthrough"] is None and report["freed"]["window"] >= STARTS - 2

        deadline = time.monotonic() + 10
        while len(initiations(paced.charon_log())) < STARTS and time.monotonic() < deadline:
            time.sleep(0.1)
        at = initiations(paced.charon_log())
        assert len(at) == STARTS
        rel = [t - at[0] for t in at]
        assert rel[1] < 0.5 and rel[2] >= WINDOW - 0.2 and rel[4] >= 2 * WINDOW - 0.2, rel
        at_once = initiations(direct.charon_log())
        assert len(at_once) == STARTS and at_once[-1] - at_once[0] < 1.0       # the direct load: all at once
    finally:
        for c in made:
            c.cleanup()


def test_after_a_crash_in_adopt_mode_the_supervisor_paces_its_start_load_then_adopts(netns, tmp_path):
    netns.sh(SETUP)
    sup = start_supervised_charon(netns.name, str(tmp_path / "moon"), swanctl_conf=conf(3, 1), mode="adopt",
                                  supervisor={"recovery": {"adopt_grace": "5s", "adopt_initiate_parallel": 2}},
                                  default_load=True)
    try:
        assert "start load through the VICI relay" not in sup.log()       # the first start adopts nothing
        sup.kill_charon()           # leaves c3's trap policies: leftovers for the adoption
        sup.wait_running(restarts=1, timeout=60)
        log = sup.log()
        assert "start load through the VICI relay" in log, log
        assert re.search(r"start load paced: 3 initiation\(s\) let through at most 2 at a time, 1 waited", log), log
        assert sorted(n for e in sup.list_conns() for n in e) == ["c0", "c1", "c2", "c3"]
        paced = sup.status()["daemon"]["load"]["paced"]
        assert (paced["initiations"], paced["held"], paced["passthrough"]) == (3, 1, None), paced
        at = initiations(sup.charon_log().split("Starting IKE charon daemon")[-1])     # the restarted one
        assert len(at) == 3 and at[1] - at[0] < 1.0 and at[2] - at[0] > 9.0, at       # the third after the window
        assert sup.wait_recovered(timeout=60)
        assert sup.stop() == 0
        assert not os.path.exists(os.path.join(sup.p("run"), "swanctl-load.vici"))
    finally:
        sup.cleanup()


def ike_sas_by_conn(charon) -> dict[str, int]:
    counts: dict[str, int] = {}
    for event in charon.list_sas():
        for name in event:
            counts[name] = counts.get(name, 0) + 1
    return counts


def test_a_supervisor_killed_while_its_relay_holds_a_start_conn_harms_no_charon_and_the_next_loads_all(
        netns, tmp_path):
    netns.sh(SETUP)
    sup = start_supervised_charon(netns.name, str(tmp_path / "moon"), swanctl_conf=conf(3, 2), mode="adopt",
                                  supervisor={"recovery": {"adopt_grace": "5s", "adopt_initiate_parallel": 1}},
                                  default_load=True)
    relay_path = os.path.join(sup.p("run"), "swanctl-load.vici")
    try:
        first = sup.charon_pid
        # c3's and c4's trap policies are left behind; c4 is no longer configured: its are the
        # adoption's to remove at the end of the grace, whichever supervisor does it
        sup.write_swanctl(conf(3, 1))
        assert "10.104.0.0/16" in netns.sh("ip xfrm policy").stdout
        sup.kill_charon()
        deadline = time.monotonic() + 60
        pid = None
        while time.monotonic() < deadline:
            # c0 let through (charon initiates it; its peer never answers), c1 held for c0's 10 s window
            log = sup.charon_log().split("Starting IKE charon daemon")[-1]
            if len(initiations(log)) == 1 and "start load through the VICI relay" in sup.log():
                pid = sup.charon_pid
                if pid != first and sorted(n for e in sup.list_conns() for n in e) == ["c0"]:
                    break
            time.sleep(0.1)
        else:
            raise AssertionError(f"the relay never held c1\n{sup.log()[-3000:]}")
        time.sleep(0.5)
        sup.proc.kill()
        sup.proc.wait(10)
        assert os.path.exists(f"/proc/{pid}") and os.path.exists(relay_path)     # charon runs on; a stale socket

        sup.start(beside=pid)
        st = sup.wait_running(timeout=90)
        assert st["daemon"]["pid"] == pid and st["daemon"]["reattached"], st["summary"]
        assert sorted(n for e in sup.list_conns() for n in e) == ["c0", "c1", "c2", "c3"]
        assert ike_sas_by_conn(sup) == {"c0": 1, "c1": 1, "c2": 1}, sup.list_sas()    # charon kept c0's
        load = st["daemon"]["load"]
        assert load["ok"] and load["trigger"] == "start", load
        # paced again (the adoption is still to come), c0 without a place: charon had it already
        paced = load["paced"]
        assert (paced["initiations"], paced["already_loaded"], paced["held"]) == (2, 1, 1), paced
        assert "adoption of 10 leftover(s) resumed" in sup.log()
        sup.wait_recovered(timeout=60)
        assert ike_sas_by_conn(sup) == {"c0": 1, "c1": 1, "c2": 1}      # nor did the adoption add one
        policies = netns.sh("ip xfrm policy").stdout
        assert "10.104.0.0/16" not in policies and "10.103.0.0/16" in policies, policies
        assert sup.charon_pid == pid
        assert sup.stop() == 0
        assert not os.path.exists(relay_path)
    finally:
        sup.cleanup()
