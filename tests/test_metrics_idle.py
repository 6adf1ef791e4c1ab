"""Idle cost of metrics: a supervisor with metrics on (listener + textfile) and nobody scraping costs
no CPU more than one with metrics off, side by side with real charon, over 60 s; RSS is reported."""

from __future__ import annotations

import os
import time

import pytest

from charon_ns import CHARON, SWANCTL, start_supervised_charon
from test_flush import SETUP
from test_recovery_charon import SWANCTL_CONF

pytestmark = [
    pytest.mark.skipif(not os.path.exists(CHARON) or not os.path.exists(SWANCTL),
                       reason="needs strongSwan (strongswan-charon, strongswan-swanctl)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
]

IDLE_SECONDS = 60.0
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of PID and all its threads."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def test_metrics_on_and_unscraped_cost_no_cpu_while_idle(netns_factory, tmp_path_factory):
    sups = {}
    try:
        for name in ("off", "on"):
            ns = netns_factory()
            ns.sh(SETUP)
            workdir = str(tmp_path_factory.mktemp(f"idle-{name}"))
            extra = {"metrics": {"listen": "127.0.0.1:9089",
                                 "textfile": os.path.join(workdir, "ipsec-supervisor.prom")}} if name == "on" else {}
            sups[name] = start_supervised_charon(ns.name, workdir, swanctl_conf=SWANCTL_CONF, mode="adopt",
                                                 supervisor={"health": {"interval": "10s", "timeout": "3s"},
                                                             **extra})
        for s in sups.values():
            s.wait_recovered()
        time.sleep(2.0)          # settle: the okay delay, the ledger's debounced save
        before = {n: cpu_seconds(s.proc.pid) for n, s in sups.items()}
        time.sleep(IDLE_SECONDS)
        used = {n: cpu_seconds(s.proc.pid) - before[n] for n, s in sups.items()}
        rss = {n: rss_bytes(s.proc.pid) for n, s in sups.items()}
        print(f"idle {IDLE_SECONDS:.0f}s: CPU metrics off {used['off']:.2f}s, on {used['on']:.2f}s; "
              f"RSS off {rss['off'] / 2**20:.1f} MiB, on {rss['on'] / 2**20:.1f} MiB "
              f"(+{(rss['on'] - rss['off']) / 2**20:.1f} MiB)")
        assert used["on"] <= used["off"] + 0.05, used
        assert used["on"] <= 0.1, used
        assert rss["on"] - rss["off"] < 16 * 2**20, rss
        assert os.path.exists(os.path.join(sups["on"].dir, "ipsec-supervisor.prom"))
    finally:
        for s in sups.values():
            s.cleanup()
