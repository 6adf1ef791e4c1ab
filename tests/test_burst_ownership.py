"""Ownership under a burst (small size of bench/bench_burst.py): a real charon installs the trap
policies of 150 connections at once while the ledger watches; every one is attributed to charon
by its netlink port id, a kill -9 judges them all charon's by the ledger, and nothing foreign is."""

from __future__ import annotations

import os

import pytest

from supervisor.kernel_state import ReadOptions, read_state
from supervisor.ledger import OWNER_DAEMON, ledger_path, load_ledger
from supervisor.snapshot import load_snapshot

from charon_ns import CHARON, SWANCTL, start_supervised_charon, trap_conns_conf
from test_flush import SETUP

pytestmark = [
    pytest.mark.skipif(not os.path.exists(CHARON) or not os.path.exists(SWANCTL),
                       reason="needs strongSwan (strongswan-charon, strongswan-swanctl)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
]
CONNS = 150


def traps(ns) -> list:
    with ns.enter():
        pols = read_state(ReadOptions(), families=["xfrm_policy"]).objects["xfrm_policy"]
    return [p for p in pols if not p.per_socket and "172.20." in (p.selector.saddr + p.selector.daddr)]


def test_every_trap_policy_of_a_burst_is_attributed_to_charon_by_the_ledger(netns, tmp_path):
    netns.sh(SETUP + "ip xfrm policy add src 10.7.0.0/16 dst 10.8.0.0/16 dir out priority 1000 action block\n")
    sup = start_supervised_charon(netns.name, str(tmp_path), swanctl_conf=trap_conns_conf(CONNS, lambda i: f"172.20.{i >> 8}.{i & 255}/32"), mode="adopt",
                                  supervisor={"recovery": {"adopt_grace": "10m"}}, timeout=120)
    try:
        sup.wait(lambda s: len(traps(netns)) >= 2 * CONNS, timeout=60, what="the trap policies")
        st = sup.wait(lambda s: not s["recovery"]["ledger"]["stale"] and s["recovery"]["ledger"]["owned"]
                      >= 2 * CONNS, timeout=30, what="the ledger caught up")
        monitor = st["recovery"]["monitor"]
        assert set(monitor) == {"overruns", "resyncs"}
        sup.wait(lambda s: os.path.exists(ledger_path(sup.p("run"))) and
                 len(load_ledger(ledger_path(sup.p("run"))).owned("xfrm_policy")) >= 2 * CONNS,
                 timeout=30, what="the ledger saved")
        ledger = load_ledger(ledger_path(sup.p("run")))
        installed = traps(netns)
        unattributed = [p.describe() for p in installed
                        if (e := ledger.lookup(p)) is None or e.owner != OWNER_DAEMON or e.how != "added"]
        assert unattributed == [] and len(installed) >= 2 * CONNS
        foreign = [e for e in ledger.entries["xfrm_policy"].values() if e.record.priority == 1000]
        assert [e.owner for e in foreign] == ["foreign"]
        pid = sup.kill_charon()
        sup.wait(lambda s: ((s["recovery"]["last"] or {}).get("at_monotonic") or {}).get("snapshot_written")
                 and s["daemon"]["pid"] not in (None, pid), timeout=60, what="the crash's snapshot")
        last = sup.status()["recovery"]["last"]
        snap = load_snapshot(last["snapshot"])
        rules = {}
        for i, rule in snap.context["owned"]["xfrm_policy"]:
            p = snap.objects["xfrm_policy"][i]
            if "172.20." in p.selector.saddr + p.selector.daddr:
                rules[rule] = rules.get(rule, 0) + 1
        assert rules == {"ledger:daemon": len(installed)}          # none by markers alone
        assert not [i for i, _ in snap.context["owned"]["xfrm_policy"]
                    if snap.objects["xfrm_policy"][i].priority == 1000]
        assert sup.stop() == 0
    finally:
        sup.cleanup()
