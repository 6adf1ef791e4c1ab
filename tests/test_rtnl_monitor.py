"""The rtnl monitor: decoded events, sender port ids, overrun, non-blocking use."""

from __future__ import annotations

import select
import struct
import subprocess
import threading
import time

import pytest

from supervisor.kernel.addresses import Address, add_address, delete_address, dump_addresses
from supervisor.kernel.common import Action, KernelEvent
from supervisor.kernel.routes import Route, add_route, delete_route, dump_routes
from supervisor.kernel.rtnl import Rtnl, RtnlMonitor, is_overrun
from supervisor.kernel.rules import Rule, add_rule, delete_rule, dump_rules

SETUP = """
sysctl -qw net.ipv6.conf.default.accept_dad=0 net.ipv6.conf.all.accept_dad=0
ip link add v0 type veth peer name v1
ip link set v0 up
ip link set v1 up
ip addr add 192.0.2.10/24 dev v0
ip -6 addr add 2001:db8::10/64 dev v0 nodad
"""


def collect(monitor: RtnlMonitor, wanted, timeout: float = 10.0) -> list[KernelEvent]:
    """Read events until WANTED(events) holds (generous timeout: no wall-clock assertions)."""
    events: list[KernelEvent] = []
    deadline = time.monotonic() + timeout
    while not wanted(events):
        left = deadline - time.monotonic()
        assert left > 0, f"events never arrived; got {[(e.family, e.action, e.record) for e in events]}"
        ready, _, _ = select.select([monitor], [], [], left)
        if ready:
            events += monitor.read_events()
    return events


def of(events, kind, action, **fields) -> list[KernelEvent]:
    return [e for e in events if e.family == kind and e.action is action
            and all(getattr(e.record, k) == v for k, v in fields.items())]


def run_ip(ns, *argv: str) -> int:
    """Run ip inside NS from this thread and return its pid (its netlink port id)."""
    with ns.enter():
        proc = subprocess.Popen(("ip",) + argv)
        assert proc.wait() == 0
    return proc.pid


@pytest.fixture
def wired(netns):
    netns.sh(SETUP)
    return netns


def test_changes_made_by_ip_carry_ips_port_id(wired):
    with wired.enter():
        monitor = RtnlMonitor()
    with monitor:
        pids = {
            "route4": run_ip(wired, "route", "add", "10.1.0.0/16", "via", "192.0.2.1", "table", "220"),
            "route6": run_ip(wired, "-6", "route", "add", "2001:db8:1::/48", "via", "2001:db8::1",
                             "table", "220"),
            "rule4": run_ip(wired, "rule", "add", "priority", "220", "table", "220"),
            "rule6": run_ip(wired, "-6", "rule", "add", "priority", "220", "table", "220"),
            "addr4": run_ip(wired, "addr", "add", "100.64.0.5/32", "dev", "v0"),
            "del4": run_ip(wired, "route", "del", "10.1.0.0/16", "table", "220"),
        }
        events = collect(monitor, lambda ev: of(ev, "route", Action.DELETE, dst="10.1.0.0"))
    [route4] = of(events, "route", Action.NEW, dst="10.1.0.0")
    [route6] = of(events, "route", Action.NEW, dst="2001:db8:1::")
    [rule4] = of(events, "rule", Action.NEW, family="inet", priority=220)
    [rule6] = of(events, "rule", Action.NEW, family="inet6", priority=220)
    [addr4] = of(events, "address", Action.NEW, address="100.64.0.5")
    [del4] = of(events, "route", Action.DELETE, dst="10.1.0.0")
    got = {"route4": route4, "route6": route6, "rule4": rule4, "rule6": rule6, "addr4": addr4,
           "del4": del4}
    for name, event in got.items():
        assert event.port_id == pids[name] != 0, name
        assert event.port_id != monitor.port_id
    assert route4.record.describe() == "route 10.1.0.0/16 via 192.0.2.1 dev v0 table 220"
    assert route4.record == del4.record
    with wired.enter():
        assert route6.record in dump_routes()
        assert rule4.record in dump_rules(220) and rule6.record in dump_rules(220)
        assert addr4.record in dump_addresses("v0")


def test_kernel_reports_ipv6_address_changes_with_port_id_zero(wired):
    # inet6_ifa_notify() sends no requester port id: IPv6 address ownership cannot come from it.
    with wired.enter():
        monitor = RtnlMonitor()
    with monitor:
        run_ip(wired, "-6", "addr", "add", "2001:db8:5::5/128", "dev", "v0", "nodad")
        events = collect(monitor, lambda ev: of(ev, "address", Action.NEW, address="2001:db8:5::5"))
    [event] = of(events, "address", Action.NEW, address="2001:db8:5::5")
    assert event.port_id == 0
    assert event.record.ifname == "v0"


def test_changes_made_through_our_socket_carry_its_port_id(wired):
    route = Route(family="inet", table=220, dst="10.2.0.0", dst_len=16, gateway="192.0.2.1",
                  oif_name="v0", protocol=4)
    rule = Rule(family="inet", priority=220, table=220)
    vip = Address(family="inet", address="100.64.0.9", prefixlen=32, index=None, ifname="v0")
    with wired.enter(), RtnlMonitor() as monitor, Rtnl() as rtnl:
        assert rtnl.port_id not in (0, monitor.port_id)
        add_route(route, rtnl=rtnl)
        add_rule(rule, rtnl=rtnl)
        add_address(vip, rtnl=rtnl)
        [dumped] = [r for r in dump_routes(rtnl=rtnl) if r.dst == "10.2.0.0"]
        delete_route(dumped, rtnl=rtnl)
        events = collect(monitor, lambda ev: of(ev, "route", Action.DELETE, dst="10.2.0.0"))
        [new_route] = of(events, "route", Action.NEW, dst="10.2.0.0")
        [new_rule] = of(events, "rule", Action.NEW, priority=220)
        [new_addr] = of(events, "address", Action.NEW, address="100.64.0.9")
        [gone] = of(events, "route", Action.DELETE, dst="10.2.0.0")
        for event in (new_route, new_rule, new_addr, gone):
            assert event.port_id == rtnl.port_id
        assert new_route.record == dumped and new_rule.record == rule
        # Each call without rtnl= opens its own socket: its id, neither ours above nor zero.
        delete_rule(rule)
        delete_address(new_addr.record)
        events = collect(monitor, lambda ev: of(ev, "address", Action.DELETE, address="100.64.0.9"))
        [del_rule] = of(events, "rule", Action.DELETE, priority=220)
        [del_addr] = of(events, "address", Action.DELETE, address="100.64.0.9")
        for event in (del_rule, del_addr):
            assert event.port_id not in (0, rtnl.port_id, monitor.port_id)


def test_replace_is_an_update(wired):
    wired.sh("ip route add 10.3.0.0/16 via 192.0.2.1 table 220")
    with wired.enter(), RtnlMonitor() as monitor:
        run_ip(wired, "route", "replace", "10.3.0.0/16", "via", "192.0.2.2", "table", "220")
        events = collect(monitor, lambda ev: of(ev, "route", Action.UPDATE, dst="10.3.0.0"))
    [event] = of(events, "route", Action.UPDATE, dst="10.3.0.0")
    assert event.record.gateway == "192.0.2.2"


def test_interface_created_after_opening_is_named_in_records(wired):
    with wired.enter(), RtnlMonitor() as monitor:
        wired.sh("ip link add v7 type veth peer name v8\nip link set v7 up\n"
                 "ip addr add 198.51.100.7/24 dev v7\n"
                 "ip route add 10.7.0.0/16 via 198.51.100.1 dev v7 table 220")
        events = collect(monitor, lambda ev: of(ev, "route", Action.NEW, dst="10.7.0.0"))
        [event] = of(events, "route", Action.NEW, dst="10.7.0.0")
        assert event.record.oif_name == "v7"
        assert event.record in dump_routes()
        [addr] = of(events, "address", Action.NEW, address="198.51.100.7")
        assert addr.record.ifname == "v7"


def test_read_never_blocks_and_spawns_no_threads(wired):
    threads = threading.active_count()
    with wired.enter(), RtnlMonitor() as monitor:
        assert monitor.read_events() == []
        ready, _, _ = select.select([monitor.fileno()], [], [], 0)
        assert ready == []
        assert threading.active_count() == threads
    with pytest.raises(ValueError):
        monitor.fileno()


def test_monitor_sees_only_its_own_namespace(netns_factory):
    a, b = netns_factory(), netns_factory()
    with a.enter(), RtnlMonitor() as monitor:
        b.sh("ip route add blackhole 10.8.0.0/16 table 220")
        a.sh("ip route add blackhole 10.9.0.0/16 table 220")
        events = collect(monitor, lambda ev: of(ev, "route", Action.NEW, dst="10.9.0.0"))
    assert not of(events, "route", Action.NEW, dst="10.8.0.0")


def test_overrun_is_reported_in_band_and_the_monitor_keeps_working(wired):
    lines = "".join(f"route add blackhole 10.{i // 250}.{i % 250}.0/24 table 220\n" for i in range(2000))
    with wired.enter(), RtnlMonitor(rcvbuf=4096) as monitor:
        wired.run("sh", "-c", f"printf '{lines}' | ip -batch -")
        # A tiny buffer cannot hold 2000 notifications: ENOBUFS must surface as a marker.
        events = collect(monitor, lambda ev: any(is_overrun(e) for e in ev))
        marker = next(e for e in events if is_overrun(e))
        assert (marker.family, marker.record, marker.port_id) == ("rtnl", None, 0)
        assert monitor.overruns >= 1
        assert all(e.family == "route" for e in events if not is_overrun(e))
        while monitor.read_events():  # drain what was queued after the loss
            pass
        run_ip(wired, "route", "add", "blackhole", "10.200.0.0/16", "table", "220")
        events = collect(monitor, lambda ev: of(ev, "route", Action.NEW, dst="10.200.0.0"))
        assert not any(is_overrun(e) for e in events)


def test_unreadable_message_becomes_an_overrun_marker_not_a_crash(wired):
    with wired.enter(), RtnlMonitor() as monitor:
        events: list[KernelEvent] = []
        # An RTM_NEWROUTE header claiming 40 bytes in a 20-byte datagram, then garbage.
        monitor._decode(struct.pack("=IHHII", 40, 24, 0, 1, 77) + bytes(4), events)
        monitor._decode(struct.pack("=IHHII", 20, 24, 0, 1, 77) + bytes(4), events)
    assert [is_overrun(e) for e in events] == [True, True]
    assert monitor.overruns == 2


NOTIFIED_CHANGES = """
ip link add v7 type veth peer name v8
ip link set v7 up
ip addr add 198.51.100.7/24 brd + dev v7 label v7:x
ip addr add 10.9.0.1 peer 10.9.0.2/32 dev v7
ip -6 addr add 2001:db8:7::7/64 dev v7 nodad valid_lft 600 preferred_lft 300
ip route add 10.7.0.0/16 via 198.51.100.1 dev v7 table 220 proto static
ip route add 10.8.0.0/16 table 220 nexthop via 198.51.100.1 dev v7 nexthop via 192.0.2.1 dev v0
ip -6 route add 2001:db8:8::/48 via 2001:db8:7::1 dev v7 metric 5 table 220
ip rule add priority 220 table 220
ip rule add priority 221 from 10.0.0.0/8 iif v7 fwmark 0x10/0xff ipproto tcp dport 443 table 221
ip -6 rule add priority 222 uidrange 100-200 unreachable
ip route replace 10.7.0.0/16 via 198.51.100.2 dev v7 table 220 proto static
ip rule del priority 221
ip route del 10.8.0.0/16 table 220
ip addr del 10.9.0.1 peer 10.9.0.2/32 dev v7
ip link del v7
"""


def test_struct_decoding_of_notifications_matches_pyroute2s(wired):
    """Captured notification datagrams: the monitor's records are those pyroute2's decoding makes."""
    import socket
    from supervisor.kernel import addresses as addresses_mod, routes as routes_mod, rtnl as rtnl_mod
    from supervisor.kernel import rules as rules_mod
    from supervisor.kernel.netlink import walk_messages
    with wired.enter(), RtnlMonitor() as monitor:
        capture = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK,
                                socket.NETLINK_ROUTE)
        with capture:
            capture.bind((0, 0))
            for group in rtnl_mod._MONITOR_GROUPS:
                capture.setsockopt(rtnl_mod.SOL_NETLINK, rtnl_mod.NETLINK_ADD_MEMBERSHIP, group)
            wired.sh(NOTIFIED_CHANGES)
            datagrams = []
            while True:
                try:
                    datagrams.append(capture.recv(1 << 16))
                except BlockingIOError:
                    break
        names = dict(monitor._names)
        ours: list[KernelEvent] = []
        for data in datagrams:
            monitor._decode(data, ours)
    reference = {
        rtnl_mod.RTM_NEWROUTE: routes_mod.route_from_msg, rtnl_mod.RTM_DELROUTE: routes_mod.route_from_msg,
        rtnl_mod.RTM_NEWRULE: rules_mod.rule_from_msg, rtnl_mod.RTM_DELRULE: rules_mod.rule_from_msg,
        rtnl_mod.RTM_NEWADDR: addresses_mod.address_from_msg,
        rtnl_mod.RTM_DELADDR: addresses_mod.address_from_msg,
    }
    classes = {rtnl_mod.RTM_NEWROUTE: rtnl_mod.RouteMsg, rtnl_mod.RTM_DELROUTE: rtnl_mod.RouteMsg,
               rtnl_mod.RTM_NEWRULE: rtnl_mod.RuleMsg, rtnl_mod.RTM_DELRULE: rtnl_mod.RuleMsg,
               rtnl_mod.RTM_NEWADDR: rtnl_mod.AddrMsg, rtnl_mod.RTM_DELADDR: rtnl_mod.AddrMsg,
               rtnl_mod.RTM_NEWLINK: rtnl_mod.LinkMsg, rtnl_mod.RTM_DELLINK: rtnl_mod.LinkMsg}
    theirs = []
    for data in datagrams:
        for off, _len, msg_type, _flags, _seq, pid in walk_messages(data):
            if msg_type not in classes:
                continue
            msg = classes[msg_type](data, offset=off)
            msg.decode()
            if msg_type in (rtnl_mod.RTM_NEWLINK, rtnl_mod.RTM_DELLINK):
                if msg.get_attr("IFLA_IFNAME") is not None:
                    names[msg["index"]] = msg.get_attr("IFLA_IFNAME")
                continue
            record = reference[msg_type](msg, names)
            if record is not None:
                theirs.append((record, pid))
    assert not any(is_overrun(e) for e in ours)
    assert [(e.record, e.port_id) for e in ours] == theirs
    kinds = {(e.family, e.action) for e in ours}
    assert kinds >= {(f, a) for f in ("route", "rule", "address") for a in (Action.NEW, Action.DELETE)}
    assert ("route", Action.UPDATE) in kinds
    assert any(e.record.multipath for e in ours if e.family == "route")
    assert any(e.family == "route" and e.record.oif_name == "v7" for e in ours)


def test_dumps_and_the_monitor_leave_pyroute2_unimported(wired):
    """pyroute2 costs over 20 MB: an idle supervisor (dumps, monitor) must never import it."""
    import sys
    script = ("import sys, supervisor.kernel_state as ks, supervisor.recovery, supervisor.starter\n"
              "assert 'pyroute2' not in sys.modules, 'imported by the modules'\n"
              "state = ks.read_state(ks.ReadOptions(rule_priority=None))\n"
              "with ks.KernelWatch() as watch:\n"
              "    watch.read_events()\n"
              "assert state.counts()['address'] >= 2, state.counts()\n"
              "assert 'pyroute2' not in sys.modules, 'imported by a dump or the monitor'\n")
    wired.run(sys.executable, "-c", script)
