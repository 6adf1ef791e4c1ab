"""Real tunnels in the real-kernel VM: kill -9 of the supervised charon in each recovery mode.

The lab (lab/): namespaces moon and sun joined by a veth pair, Debian's charon in each,
moon's under ``ipsec-supervisor run``.  Two tunnels run side by side with separate IKE
identities: moon initiates one (auto=start) and responds on the other (sun initiates).
One ``kill -9`` per mode therefore crashes moon once as initiator and once as responder;
the outcome is computed once per mode and each test below checks one promise of it.
Pings cross both tunnels at 5/s; tcpdump on each outer interface counts ICMP between the
inner subnets, which can only be plaintext (protected packets leave as ESP).  sun has its own
fail-closed guard (lab.topology.peer_guard_script: strongSwan as a responder leaks for a few
milliseconds on every INITIAL_CONTACT, whoever restarts moon); what the guard stops is logged
and must fall into those windows of sun's own.

Run in one VM boot: tools/vm-run -- .venv/bin/pytest -m realkernel tests/test_tunnels_realkernel.py
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
import time

import pytest

# lab/ is a top-level folder of the checkout, not part of the installed package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lab.charon import LabSettings  # noqa: E402
from lab.preflight import config_mode, missing_tools, recovery_settings  # noqa: E402
from lab.report import charon_lines, peer_guard_check  # noqa: E402
from lab.scenario import Outcome, Scenario, describe_failure, run_crashes  # noqa: E402
from lab.topology import lab_namespaces_left  # noqa: E402

pytestmark = [
    pytest.mark.realkernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
    pytest.mark.skipif(bool(missing_tools()), reason=f"lab tools missing: {missing_tools()}"),
]

MODES = ("keep", "flush", "adopt")
ROLES = ("initiator", "responder")
PREFIX = "ipsvtun"


def _settings() -> LabSettings:
    # Short grace and block timeouts: the stale-SA check waits for them.  Lifetimes stay long,
    # so no rekeying blurs which SAs are stale.
    return LabSettings(recovery=recovery_settings({"adopt_grace": "5s", "block_timeout": "10s"}))


@pytest.fixture(scope="module")
def crash():
    """crash(mode) -> the Outcome of one kill -9 in that mode.

    The first call runs all three modes, each in its own lab, side by side (one VM boot, and
    the waits for tunnels and grace periods overlap); IPSV_LAB_SERIAL=1 runs them in turn."""
    done: dict[str, Outcome | Exception] = {}
    workdir = tempfile.mkdtemp(prefix="ipsv-tunnels-")

    def get(mode: str) -> Outcome:
        if not done:
            scenarios = {m: Scenario(moon="supervisor", mode=config_mode(m), roles=ROLES, settings=_settings(),
                                     warmup=2.0, min_observe=6.0, settle=2.0, max_observe=60.0,
                                     until_no_stale=m != "keep", prefix=PREFIX)
                         for m in MODES}
            done.update(run_crashes(scenarios, workdir, parallel=os.environ.get("IPSV_LAB_SERIAL") != "1",
                                    say=_progress))
        result = done[mode]
        if isinstance(result, Exception):
            pytest.fail(f"the {mode} lab failed: {result}", pytrace=False)
        return result

    yield get
    shutil.rmtree(workdir, ignore_errors=True)
    assert not lab_namespaces_left(PREFIX), "the lab left namespaces behind"


def _progress(msg: str) -> None:
    # Shown with -s, and in the captured output of the first test otherwise.
    print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)


@pytest.mark.parametrize("mode", MODES)
def test_no_plaintext_leaves_either_namespace(crash, mode):
    out = crash(mode)
    leaked = {site: [p.line for p in pkts[:5]] for site, pkts in out.plaintext.items() if pkts}
    assert not leaked, f"plaintext ICMP on the outer link in {mode} mode: {leaked}"
    assert set(out.plaintext) == {"moon", "sun"}


@pytest.mark.parametrize("mode", MODES)
def test_sun_s_guard_stopped_nothing_but_its_own_initial_contact_gaps(crash, mode):
    # sun (plain strongSwan) destroys a tunnel's old CHILD_SA on moon's INITIAL_CONTACT before it
    # installs the new one; its guard drops what it sends meanwhile (lab.topology.peer_guard_script).
    # Anything else the guard stopped would be a leak the plaintext check above cannot see.
    out = crash(mode)
    windows, unexplained = peer_guard_check(out)
    # In every mode moon's new charon initiates the initiator tunnel (start_action) with
    # INITIAL_CONTACT, and sun installs the new CHILD_SA: the log reading must find that.
    init = out.lab.tunnel("initiator").name
    assert any(w.conn == init and w.end != float("inf") for w in windows), \
        f"{mode}: no completed INITIAL_CONTACT replacement of {init} in sun's log: {windows}"
    assert not unexplained, (
        f"{mode}: sun's guard stopped packets outside sun's INITIAL_CONTACT windows "
        f"{[(w.conn, round(w.start - out.kill_at, 3), round(w.end - out.kill_at, 3)) for w in windows]}: "
        f"{[(round(p.at - out.kill_at, 3), p.line) for p in unexplained[:5]]}\n" + describe_failure(out))


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("mode", MODES)
def test_traffic_crosses_the_tunnel_again_after_the_kill(crash, mode, role):
    out = crash(mode)
    p = out.pings[role]
    assert p.sent > 0 and p.answered, f"no ping answered at all on the {role} tunnel"
    assert not (set(p.lost) - set(out.lost_after_kill(role))), f"pings lost before the kill: {p.lost}"
    assert out.recovered(role), (
        f"{mode}: the tunnel where moon is {role} did not carry traffic again within {out.observed_s:.0f}s "
        f"of the kill: lost {len(out.lost_after_kill(role))} pings, outages {p.outages()}\n"
        + describe_failure(out))


@pytest.mark.parametrize("mode", ("flush", "adopt"))
def test_no_stale_sas_remain_after_the_grace_period(crash, mode):
    out = crash(mode)
    for site in ("moon", "sun"):
        stale = [sa.describe() for sa in out.stale_after[site]]
        assert not stale, f"{mode}: SAs in {site} no running charon knows: {stale}\n" + describe_failure(out)


@pytest.mark.parametrize("mode", ("flush", "adopt"))
def test_updown_firewall_rules_are_not_duplicated(crash, mode):
    # charon's updown inserts its rules again for the new CHILD_SAs: the dead charon's copies
    # must be gone (flush) or dropped as superseded (adopt), not left next to them.
    out = crash(mode)
    before = out.before["moon"].counts()["updown fw rules"]
    after = out.after["moon"].counts()["updown fw rules"]
    assert before and after == before, f"{mode}: {before} updown rules at the kill, {after} at the end\n" \
        + describe_failure(out)


def test_keep_leaves_the_replaced_sas_behind_like_the_old_starter(crash):
    # keep is the old starter's behaviour: the restarted charon initiates a new CHILD_SA and the
    # dead one's SAs stay until their hard lifetime.  Also shows the stale-SA check sees them.
    out = crash("keep")
    reqid = 1   # the initiator tunnel (lab.topology.TUNNELS["initiator"].index)
    stale = [sa for sa in out.stale_after["moon"] if sa.reqid == reqid]
    assert len(stale) >= 2, f"expected the initiator tunnel's replaced SAs to stay in keep mode: {stale}"


@pytest.mark.parametrize("mode", MODES)
def test_foreign_state_in_moon_is_untouched(crash, mode):
    out = crash(mode)
    assert out.foreign == [], f"{mode}: another tool's state in moon changed: {out.foreign}"


@pytest.mark.parametrize("mode", MODES)
def test_a_requested_stop_leaves_no_charon_state_behind(crash, mode):
    out = crash(mode)
    left = {k: n for k, n in out.left_after_stop.counts().items() if n}
    assert out.stop_rc == 0, f"the supervisor exited {out.stop_rc} on SIGTERM\n" + describe_failure(out)
    assert not left, f"{mode}: after SIGTERM to the supervisor moon still holds {left} (recovery.on_stop flush)"


def test_flush_gives_the_restarted_charon_a_clean_slate(crash):
    out = crash("flush")
    clashes = [msg for _, msg in charon_lines(out.moon_charon_log, out.kill_at)
               if re.search(r"policy already exists|unable to create .*routing table rule", msg)]
    assert not clashes, f"the restarted charon met leftovers in flush mode: {clashes}"


def test_adopt_establishes_one_connection_at_a_time(crash):
    # recovery.adopt_initiate_parallel 1: the restarted charon initiates the initiator tunnel
    # itself (start_action); the supervisor initiates the responder tunnel's child only once
    # that CHILD_SA is installed.  Side by side, charon would process one exchange's answer
    # only after the other child's updown script (it holds charon's bus lock), while the peer
    # has already dropped the old SAs on INITIAL_CONTACT.
    out = crash("adopt")
    lines = charon_lines(out.moon_charon_log, out.kill_at)
    installed = [at for at, msg in lines if re.search(r"CHILD_SA init\{\d+\} established", msg)]
    asked = [at for at, msg in lines if "vici initiate CHILD_SA 'resp'" in msg]
    assert installed and asked, "expected charon's own init and the supervisor's resp initiation:\n" \
        + describe_failure(out)
    assert asked[0] >= installed[0], (f"resp was initiated {installed[0] - asked[0]:.3f}s before init's "
                                      "CHILD_SA was installed\n" + describe_failure(out))
