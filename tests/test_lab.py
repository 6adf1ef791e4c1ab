"""The lab's pure parts (ping/tcpdump/iproute2 parsing, timelines, configs), and the lab on this host.

The host has no ESP, so here the lab is only built, its charons started (plain, under the
starter, under the supervisor) and everything removed again; tunnels run in the VM tier
(tests/test_tunnels_realkernel.py).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lab import kernel_view, report, topology, traffic  # noqa: E402
from lab.charon import Charon, LabSettings, ipsec_conf, swanctl_conf  # noqa: E402
from lab.preflight import missing_tools  # noqa: E402
from lab.topology import TUNNELS, build_lab, lab_namespaces_left, make_lab, remove_lab  # noqa: E402

PING_OUTPUT = """\
PING 10.2.1.1 (10.2.1.1) from 10.1.1.1 : 56(84) bytes of data.
[1000.000000] 64 bytes from 10.2.1.1: icmp_seq=1 ttl=64 time=0.500 ms
[1000.200000] 64 bytes from 10.2.1.1: icmp_seq=2 ttl=64 time=0.500 ms
[1000.600000] no answer yet for icmp_seq=3
[1000.800000] no answer yet for icmp_seq=4
[1001.000000] 64 bytes from 10.2.1.1: icmp_seq=6 ttl=64 time=0.500 ms
[1001.200000] 64 bytes from 10.2.1.1: icmp_seq=7 ttl=64 time=0.500 ms

--- 10.2.1.1 ping statistics ---
8 packets transmitted, 4 received, 50% packet loss, time 1400ms
"""


def test_ping_output_gives_lost_pings_their_send_times_and_outages():
    r = traffic.parse_ping(PING_OUTPUT, "10.2.1.1", stopped_at=1010.0)
    assert r.sent == 8
    assert r.answered == {1, 2, 6, 7}
    # seq 5 has no line of its own: its time is interpolated; seq 8 was never answered either.
    assert r.lost == (3, 4, 5, 8)
    assert r.sent_at[3] == pytest.approx(1000.4)
    assert r.sent_at[5] == pytest.approx(1000.8, abs=0.01)
    assert r.outages()[0][2] == 3
    assert r.longest_outage_s() == pytest.approx(0.6)
    assert r.lost_between(1000.5) == (4, 5, 8)


def test_a_ping_in_flight_when_ping_stopped_is_not_lost():
    r = traffic.parse_ping(PING_OUTPUT, stopped_at=1001.6)
    assert 8 not in r.lost and 3 in r.lost


def test_tcpdump_lines_become_packets_and_the_filter_names_both_directions():
    pkts = traffic.parse_tcpdump("1700000000.123456 IP 10.1.2.1 > 10.2.2.1: ICMP echo request, id 1, seq 1\n"
                                 "tcpdump: listening on out0\n")
    assert [(p.at, p.line[:20]) for p in pkts] == [(1700000000.123456, "IP 10.1.2.1 > 10.2.2")]
    f = traffic.plaintext_filter("10.1.0.0/16", "10.2.0.0/16")
    assert f.startswith("icmp and ") and f.count("src net") == 2


XFRM_STATE = """\
src 192.0.2.1 dst 192.0.2.2
\tproto esp spi 0xc5fda615 reqid 1 mode tunnel
\treplay-window 0 flag af-unspec
\taead rfc4106(gcm(aes)) 0x00 128
src 192.0.2.2 dst 192.0.2.1
\tproto esp spi 0xc2613335 reqid 1 mode tunnel
\treplay-window 32 flag af-unspec
src 192.0.2.1 dst 198.51.100.7
\tproto esp spi 0x00007001 reqid 7001 mode tunnel
src 192.0.2.2 dst 192.0.2.1
\tproto esp spi 0xce28e718 reqid 0 mode tunnel
"""
XFRM_POLICY = """\
src 10.1.1.0/24 dst 10.2.1.0/24
\tdir out priority 375423 ptype main
\ttmpl src 192.0.2.1 dst 192.0.2.2
\t\tproto esp reqid 1 mode tunnel
src 10.9.0.0/16 dst 10.8.0.0/16
\tdir out action block priority 1000 ptype main
src 0.0.0.0/0 dst 0.0.0.0/0
\tsocket in priority 0 ptype main
"""


def test_iproute2_listings_parse_into_sas_and_policies_without_socket_policies():
    view = kernel_view.parse_view(
        "### sa\n" + XFRM_STATE + "### policy\n" + XFRM_POLICY +
        "### route220\n10.2.1.0/24 via 192.0.2.2 dev out0 proto static src 10.1.1.1\n"
        "### route100\n### rule\n0:\tfrom all lookup local\n220:\tfrom all lookup 220\n"
        "### fw\n-P INPUT ACCEPT\n-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT\n### addr\n")
    assert [sa.spi for sa in view.sas] == [0xc5fda615, 0xc2613335, 0x7001, 0xce28e718]
    assert [(p.dir, p.priority, p.action, p.reqid) for p in view.policies] == [
        ("out", 375423, "allow", 1), ("out", 1000, "block", None)]
    assert view.counts() == {"SAs": 3, "policies": 1, "table-220 routes": 1, "rule 220": 1, "updown fw rules": 0}
    assert view.firewall == ("-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT",)


def test_stale_sas_are_those_no_charon_reports_except_foreign_and_reserved_spis():
    view = kernel_view.parse_view("### sa\n" + XFRM_STATE)
    known = [{"spi_in": 0xc2613335, "spi_out": 0x1}]
    assert [sa.spi for sa in kernel_view.stale_sas(view, known)] == [0xc5fda615]


def test_foreign_changes_name_what_disappeared():
    before = kernel_view.parse_view("### sa\n" + XFRM_STATE + "### policy\n" + XFRM_POLICY +
                                    "### route100\n10.8.0.0/16 via 192.0.2.9 dev out0\n### rule\n100:\tfrom all to "
                                    "10.8.0.0/16 lookup 100\n### fw\n-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT\n"
                                    "### addr\n1: lo    inet 10.7.7.7/32 scope global lo\n")
    after = kernel_view.parse_view("### sa\n" + XFRM_STATE.split("src 192.0.2.1 dst 198.51.100.7")[0] +
                                   "### policy\n" + XFRM_POLICY + "### route100\n10.8.0.0/16 via 192.0.2.9 dev out0\n"
                                   "### rule\n100:\tfrom all to 10.8.0.0/16 lookup 100\n"
                                   "### fw\n-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT\n"
                                   "### addr\n1: lo    inet 10.7.7.7/32 scope global lo\n")
    assert kernel_view.foreign_changes(before, before) == []
    changes = kernel_view.foreign_changes(before, after)
    assert len(changes) == 1 and changes[0].startswith("SAs gone: SA spi=0x00007001")


SUPERVISOR_LOG = """\
2026-11-28 01:32:10.000 INFO supervisor: state running -> running on okay: earlier
2026-11-28 01:32:11.050 INFO supervisor: state running -> recovering on died: killed by SIGKILL
2026-11-28 01:32:11.060 INFO supervisor.daemon: charon[9]: 00[DMN] noise
2026-11-28 01:32:11.600 INFO supervisor.recovery: snapshot of the leftovers written to /x.json
2026-11-28 01:32:12.000 INFO supervisor.recovery: adopt: initiate resp/resp: charon is establishing it
2026-11-28 01:32:13.000 INFO supervisor: charon (pid 10) is ready after 1.000s
"""


def test_the_timeline_takes_supervisor_and_recovery_lines_after_the_kill():
    kill = time.mktime(time.strptime("2026-11-28 01:32:11", "%Y-%m-%d %H:%M:%S"))
    entries = report.supervisor_timeline(SUPERVISOR_LOG, kill)
    assert [(round(e.offset, 2), e.what) for e in entries] == [
        (0.05, "death seen"), (0.6, "snapshot"), (1.0, "adopt"), (2.0, "charon ready")]
    charon = report.charon_timeline("01:32:12.500 07[IKE] <init|1> CHILD_SA init{1} established with SPIs a_i b_o\n"
                                    "01:32:10.000 07[IKE] <init|1> CHILD_SA init{1} established earlier\n", kill)
    assert [(e.offset, e.what) for e in charon] == [(1.5, "charon")]


SUN_LOG = """\
01:32:10.000 07[IKE] <init|1> CHILD_SA init{1} established with SPIs a_i b_o and TS 10.2.1.0/24 === 10.1.1.0/24
01:32:12.500 12[IKE] <init|1> destroying duplicate IKE_SA for peer 'moon-init', received INITIAL_CONTACT
01:32:12.520 12[IKE] <init|5> CHILD_SA init{5} established with SPIs c_i d_o and TS 10.2.1.0/24 === 10.1.1.0/24
01:32:13.000 07[IKE] <resp|3> destroying duplicate IKE_SA for peer 'moon-resp', received INITIAL_CONTACT
01:32:13.010 07[IKE] <init|5> CHILD_SA init{6} established with SPIs e_i f_o and TS 10.2.1.0/24 === 10.1.1.0/24
"""


def test_the_peers_initial_contact_windows_explain_only_packets_of_their_own_tunnel():
    kill = time.mktime(time.strptime("2026-11-28 01:32:11", "%Y-%m-%d %H:%M:%S"))
    windows = report.initial_contact_windows(SUN_LOG, kill)
    # init: from the destroy to its next established line; resp never came back in this log.
    assert [(w.conn, round(w.start - kill, 3), round(w.end - kill, 3)) for w in windows] == [
        ("init", 1.5, 1.52), ("resp", 2.0, float("inf"))]
    lab = make_lab()

    def pkt(offset: float, src: str, dst: str) -> traffic.CapturedPacket:
        return traffic.CapturedPacket(kill + offset, f"IP {src} > {dst}: ICMP echo reply, id 1, seq 1, length 64")

    inside = pkt(1.51, "10.2.1.1", "10.1.1.1")
    read_late = pkt(1.9, "10.2.1.1", "10.1.1.1")         # the NFLOG copy read 0.38 s after the window
    before = pkt(1.49, "10.2.1.1", "10.1.1.1")           # a copy is never read before its packet
    long_after = pkt(2.1, "10.2.1.1", "10.1.1.1")
    other_tunnel = pkt(1.51, "10.2.3.1", "10.1.3.1")    # trap's subnet, in init's window only
    resp_open = pkt(9.0, "10.2.2.1", "10.1.2.1")         # resp's window is still open
    unparsable = traffic.CapturedPacket(kill + 1.51, "ARP, Request who-has 10.1.1.1")
    got = report.guard_hits_outside_windows(
        [inside, read_late, before, long_after, other_tunnel, resp_open, unparsable], windows, lab.tunnels)
    assert got == [before, long_after, other_tunnel, unparsable]


def test_the_peer_guard_drops_what_leaves_without_a_policy_and_logs_it_to_its_nflog_group():
    script = topology.peer_guard_script(make_lab().sun)
    match = "-s 10.2.0.0/16 -d 10.1.0.0/16 -m policy --dir out --pol none"
    assert script.splitlines() == [
        f"iptables -w -A OUTPUT {match} -j NFLOG --nflog-group {topology.PEER_GUARD_GROUP} --nflog-threshold 1",
        f"iptables -w -A OUTPUT {match} -j DROP"]
    assert traffic.GuardLog("ns", 7, "/nowhere").args == ["-i", "nflog:7"]
    assert traffic.Capture("ns", "10.1.0.0/16", "10.2.0.0/16", "/nowhere").args[:4] == ["-i", "out0", "-Q", "out"]


def test_swanctl_and_ipsec_conf_describe_the_same_tunnels():
    lab = make_lab()
    settings = LabSettings(child_rekey=50, child_life_time=60)
    sw = swanctl_conf(lab.moon, lab.tunnels, settings)
    ic = ipsec_conf(lab.moon, lab.tunnels, settings)
    for t in TUNNELS.values():
        assert f"id = moon-{t.name}" in sw and f"leftid = moon-{t.name}" in ic
        assert f"reqid = {t.index}" in sw and f"reqid = {t.index}" in ic
    assert "start_action = start" in sw and "auto = start" in ic
    assert "start_action = trap" in sw and "auto = route" in ic
    assert "rekey_time = 50s" in sw and "life_time = 60s" in sw
    assert "lifetime = 60s" in ic and "margintime = 10s" in ic


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")
needs_tools = pytest.mark.skipif(bool(missing_tools()), reason=f"lab tools missing: {missing_tools()}")


@needs_root
@needs_tools
@pytest.mark.parametrize("kind", ["plain", "starter", "supervisor"])
def test_the_lab_runs_charon_of_each_kind_privately_and_leaves_nothing(kind):
    lab = make_lab(("initiator",), prefix="ipsvlabt")
    work = tempfile.mkdtemp(prefix="ipsv-labtest-")
    try:
        build_lab(lab, extra={"moon": "ip addr add 10.7.7.7/32 dev lo\n"})
        moon = Charon(lab, lab.moon, work, kind, mode="none").start()
        try:
            pid = moon.wait_ready(timeout=60)
            assert moon.charon_pid() == pid
            assert "init" in moon.loaded_conns()
            # charon's pid file and sockets live in the tree's private /run only.
            assert os.path.exists(os.path.join(moon.run_root, "charon.vici"))
            assert not _names_pid("/run/charon.pid", pid)
        finally:
            rc = moon.stop()
        assert rc == 0, f"{kind} did not stop cleanly on SIGTERM:\n{open(moon.output_log).read()[-2000:]}"
        assert "10.7.7.7/32" in "".join(kernel_view.read_view(lab.moon.netns).addresses)
    finally:
        remove_lab(lab)
        shutil.rmtree(work, ignore_errors=True)
    assert not lab_namespaces_left("ipsvlabt")


def _names_pid(path: str, pid: int) -> bool:
    try:
        with open(path) as fh:
            return fh.read().strip() == str(pid)
    except OSError:
        return False


@needs_root
@needs_tools
def test_the_peer_guard_in_a_namespace_stops_unprotected_tunnel_traffic_and_nothing_else():
    # No IPsec policy in this lab: every packet between the subnets is unprotected, so sun's guard
    # must stop it before the wire and hand a copy to its NFLOG group; other traffic passes.
    lab = make_lab(("initiator",), prefix="ipsvlabg")
    work = tempfile.mkdtemp(prefix="ipsv-labguard-")
    t = lab.tunnel("initiator")
    try:
        build_lab(lab, extra={"sun": topology.peer_guard_script(lab.sun)})
        wire = traffic.Capture(lab.sun.netns, lab.sun.local_nets, lab.sun.remote_nets,
                               os.path.join(work, "wire.txt")).start()
        guard = traffic.GuardLog(lab.sun.netns, topology.PEER_GUARD_GROUP, os.path.join(work, "guard.txt")).start()
        try:
            blocked = topology.run_in(lab.sun.netns, "ping", "-n", "-c", "2", "-i", "0.2", "-W", "1",
                                      "-I", t.sun_host, t.moon_host, check=False)
            outer = topology.run_in(lab.sun.netns, "ping", "-n", "-c", "1", "-W", "5", lab.moon.outer,
                                    check=False)
        finally:
            on_wire, stopped = wire.stop(), guard.stop()
        assert blocked.returncode != 0, blocked.stdout
        assert outer.returncode == 0, f"the guard must not touch other traffic: {outer.stdout}{outer.stderr}"
        assert on_wire == []
        assert [p.line.split(":")[0] for p in stopped] == [f"IP {t.sun_host} > {t.moon_host}"] * 2
    finally:
        remove_lab(lab)
        shutil.rmtree(work, ignore_errors=True)
    assert not lab_namespaces_left("ipsvlabg")


def test_a_scale_lab_alternates_moon_s_roles_on_distinct_subnets_and_refuses_what_its_addressing_cannot_hold():
    tunnels = topology.scale_tunnels(200)
    assert [t.role for t in tunnels[:4]] == ["initiator", "responder", "initiator", "responder"]
    assert len({t.moon_net for t in tunnels} | {t.sun_net for t in tunnels}) == 400
    assert len({t.name for t in tunnels}) == 200 and all(t.sun_action == "none" for t in tunnels)
    conf = swanctl_conf(make_lab().moon, tunnels[:2], LabSettings())
    assert "start_action = start" in conf and "start_action = none" in conf and "reqid = 2" in conf
    for bad in (0, topology.MAX_SCALE_TUNNELS + 1):
        with pytest.raises(ValueError, match="a scale lab has 1..250 tunnels"):
            topology.scale_tunnels(bad)


@pytest.mark.parametrize("count, size, initiators, responders", [
    (200, 20, 10, 10), (50, 10, 5, 5), (3, 20, 2, 1), (201, 5, 3, 2), (1, 20, 1, 0)])
def test_the_ping_sample_spreads_over_both_roles(count, size, initiators, responders):
    sample = topology.ping_sample(topology.scale_tunnels(count), size)
    roles = [t.role for t in sample]
    assert (roles.count("initiator"), roles.count("responder")) == (initiators, responders)
    assert len({t.name for t in sample}) == len(sample)
    assert [t.index for t in sample] == sorted(t.index for t in sample)
    if count >= 50:
        assert sample[-1].index > count // 2     # spread over all, not the first few


def test_the_scale_bench_reads_its_targets_and_the_supervisor_s_adoption_end():
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    import bench_adopt_scale as bench
    assert bench.parse_target("starter") == ("starter", 0) and bench.parse_target("adopt-16") == ("adopt", 16)
    for bad in ("adopt", "adopt-0", "flush-1", "keep"):
        with pytest.raises(ValueError, match="starter or adopt-P"):
            bench.parse_target(bad)
    log = ("2026-12-05 05:16:56.112 INFO supervisor.recovery: adopt: initiate t14/t14: charon is establishing it\n"
           "2026-12-05 05:16:59.401 INFO supervisor.recovery: adoption finished after 54.0s: 80 delete done\n")
    at = bench.adoption_finished_at(log)
    assert at == time.mktime(time.strptime("2026-12-05 05:16:59", "%Y-%m-%d %H:%M:%S")) + 0.401
    assert bench.adoption_finished_at(log.splitlines()[0]) is None


def test_the_scale_bench_watches_the_starter_for_a_multiple_of_adopt_s_convergence():
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    import types
    import bench_adopt_scale as bench
    assert bench.serial_order(["starter", "adopt-1", "adopt-4"]) == ["adopt-1", "adopt-4", "starter"]

    def outcome(back, done, moon="supervisor"):
        return types.SimpleNamespace(kill_at=1000.0, all_back_at=None if back is None else 1000.0 + back,
                                     adoption_done_at=None if done is None else 1000.0 + done, moon_output="",
                                     scenario=types.SimpleNamespace(moon=moon))
    runs = {"adopt-1": outcome(130.0, 140.0), "adopt-4": outcome(120.0, 150.0)}
    assert bench.starter_window(runs, 400.0, 5.5) == 5.5 * 150.0        # the slowest convergence decides
    assert bench.starter_window(runs, 1000.0, 5.5) == 1000.0            # never shorter than --max-window
    assert bench.starter_window(runs, 400.0, 0) == 400.0
    # an adoption that did not converge (or failed) sizes nothing
    assert bench.starter_window({"adopt-1": outcome(None, 140.0), "adopt-4": RuntimeError("x")}, 400.0, 5.5) == 400.0


def test_a_list_sas_answered_too_late_is_no_answer_not_a_failed_run():
    """The vici package unregisters its event stream after a timed-out read and takes the late answer
    for the unregistration's: the lab sees the timeout (OSError, "no answer this time"), not the
    SessionException that hides it (a starter target failed so, with 200 tunnels in the VM)."""
    import vici

    from lab.charon import _listed

    class LateCharon:
        def list_sas(self):
            try:
                raise TimeoutError("timed out")
                yield
            finally:
                raise vici.exception.SessionException("Unexpected response type 1, expected '5' (EVENT_CONFIRM)")

    class Answering:
        def list_sas(self):
            yield {"t1": {}}

    with pytest.raises(OSError, match="did not answer list-sas in time"):
        _listed(LateCharon())
    assert _listed(Answering()) == [{"t1": {}}]
