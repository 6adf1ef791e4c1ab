"""Adopt at scale in the real-kernel VM: 10 real tunnels, kill -9 of the supervised charon.

The lab (lab/) in its scale form: moon and sun with 10 tunnels, one connection each with its
own subnets and IKE identities (10: under emulation each tunnel costs seconds of set-up, and
the whole VM tier stays well under 10 minutes; bench/bench_adopt_scale.py runs 50 and more).
moon initiates the odd ones and responds on the even ones, so one kill crashes moon in both
roles at once.  Pings at 5/s cross 6 of them.  A short ``recovery.adopt_grace`` (2 s) with
two initiations at a time: the 5 connections moon responded on are initiated by the
supervisor in turns, which takes far longer than 2 s, so the grace must follow progress
(``adopt.adopt_deadline``) and not sweep the leftovers of connections still waiting their turn.

Behaviour only, no times: every leftover decided, every tunnel back, nothing stale after
the grace, no plaintext, traffic on every sampled tunnel again, foreign state untouched.
The numbers (outage per tunnel, convergence against the starter, CPU) are the benchmark's.

Run in one VM boot: tools/vm-run -- .venv/bin/pytest -m realkernel tests/test_adopt_scale_realkernel.py
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lab.charon import LabSettings  # noqa: E402
from lab.preflight import missing_tools, recovery_settings  # noqa: E402
from lab.scenario import Outcome, Scenario, describe_failure, run_crash  # noqa: E402
from lab.topology import lab_namespaces_left  # noqa: E402

pytestmark = [
    pytest.mark.realkernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
    pytest.mark.skipif(bool(missing_tools()), reason=f"lab tools missing: {missing_tools()}"),
]

TUNNELS = 10
SAMPLE = 6
PREFIX = "ipsvscl"


@pytest.fixture(scope="module")
def crash():
    """The Outcome of one kill -9 of moon's charon in adopt mode (run once for the module)."""
    workdir = tempfile.mkdtemp(prefix="ipsv-adopt-scale-")
    # sun's DPD stays out of the window (every tunnel moon responded on must come back through the
    # supervisor's initiation, not through sun's dpd_action restart).
    settings = LabSettings(dpd_delay=600, recovery=recovery_settings({"adopt_grace": "2s",
                                                                      "adopt_initiate_parallel": 2}))
    sc = Scenario(moon="supervisor", mode="adopt", tunnels=TUNNELS, ping_sample=SAMPLE, settings=settings,
                  warmup=2.0, min_observe=6.0, settle=2.0, max_observe=240.0, until_all_back=True,
                  until_no_stale=True, prefix=PREFIX)
    try:
        out: Outcome | Exception = run_crash(sc, workdir, say=lambda m: print(f"{time.strftime('%H:%M:%S')} {m}",
                                                                              flush=True))
    except Exception as exc:  # reported by each test
        out = exc
    yield out
    shutil.rmtree(workdir, ignore_errors=True)
    assert not lab_namespaces_left(PREFIX), "the lab left namespaces behind"


def _ok(out) -> Outcome:
    if isinstance(out, Exception):
        pytest.fail(f"the {TUNNELS}-tunnel lab failed: {out}", pytrace=False)
    return out


def test_every_leftover_is_decided_and_every_tunnel_is_back(crash):
    out = _ok(crash)
    adoption = ((out.status or {}).get("recovery") or {}).get("adoption") or {}
    assert adoption.get("state") == "done" and adoption.get("pending") == 0, \
        f"adoption not finished with every leftover decided: {adoption}\n" + describe_failure(out)
    assert out.all_back_at is not None, \
        f"moon's new charon did not report all {TUNNELS} CHILD_SAs within {out.observed_s:.0f}s\n" \
        + describe_failure(out)


def test_the_grace_waits_for_queued_initiations_every_responder_tunnel_is_initiated(crash):
    # Two at a time, 5 initiations take far longer than the 2 s grace: a grace that ran out
    # meanwhile would have swept the rest instead (and left them to the peer's DPD).
    out = _ok(crash)
    adoption = out.status["recovery"]["adoption"]
    responders = {f"{t.name}/{t.name}" for t in out.lab.tunnels if t.role == "responder"}
    missing = responders - set(adoption["initiated"])
    assert not missing, f"not initiated by the supervisor: {sorted(missing)}; adoption {adoption}\n" \
        + describe_failure(out)


def test_no_stale_sas_remain_after_the_grace_period(crash):
    out = _ok(crash)
    for site in ("moon", "sun"):
        stale = [sa.describe() for sa in out.stale_after[site]]
        assert not stale, f"SAs in {site} no running charon knows: {stale[:5]} ({len(stale)})\n" \
            + describe_failure(out)


def test_no_plaintext_leaves_either_namespace(crash):
    out = _ok(crash)
    leaked = {site: [p.line for p in pkts[:5]] for site, pkts in out.plaintext.items() if pkts}
    assert not leaked, f"plaintext ICMP on the outer link: {leaked}"


def test_traffic_crosses_every_sampled_tunnel_again(crash):
    out = _ok(crash)
    assert len(out.pings) == SAMPLE
    down = {name: len(out.lost_after_kill(name)) for name in out.pings if not out.recovered(name)}
    before = {name: p.lost for name, p in out.pings.items() if set(p.lost) - set(out.lost_after_kill(name))}
    assert not before, f"pings lost before the kill: {before}"
    assert not down, f"sampled tunnels without traffic at the end (pings lost): {down}\n" + describe_failure(out)


def test_foreign_state_in_moon_is_untouched(crash):
    out = _ok(crash)
    assert out.foreign == [], f"another tool's state in moon changed: {out.foreign}"


def test_the_start_load_paced_charons_own_initiations(crash):
    # moon initiates the odd tunnels itself (start_action = start): after the crash its start load
    # went through the supervisor's VICI relay, two at a time (supervisor/vici_relay.py)
    out = _ok(crash)
    paced = ((out.status or {}).get("daemon") or {}).get("load", {}).get("paced")
    initiators = sum(1 for t in out.lab.tunnels if t.role == "initiator")
    assert paced and paced["initiations"] == initiators and paced["passthrough"] is None, \
        f"start load not paced as expected: {paced}\n" + describe_failure(out)
