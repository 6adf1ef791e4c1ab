"""Routes: dump compared field by field with iproute2, exact deletes, adds, JSON."""

from __future__ import annotations

import errno
import json

import pytest

from supervisor.errors import KernelError
from supervisor.kernel.common import DeleteResult
from supervisor.kernel.routes import (
    NextHop,
    Route,
    decide_delete,
    delete_lookup_accepts,
    add_route,
    delete_route,
    delete_routes,
    dump_routes,
)
from supervisor.kernel.rtnl import Rtnl

from caps import without_net_admin

LINKS = """
ip link add v0 type veth peer name v1
ip link add v2 type veth peer name v3
for l in v0 v1 v2 v3; do ip link set $l up; done
ip addr add 192.0.2.10/24 dev v0
ip addr add 198.51.100.10/24 dev v2
ip -6 addr add 2001:db8::10/64 dev v0 nodad
ip -6 addr add 2001:db8:2::10/64 dev v2 nodad
"""

TABLE_220 = """
ip route add 10.1.0.0/16 via 192.0.2.1 dev v0 table 220 proto static
ip route add 10.2.0.0/16 via 192.0.2.1 dev v0 src 192.0.2.10 table 220 proto static mtu 1400 advmss 1360
ip route add 10.3.0.0/24 dev v2 scope link table 220
ip route add blackhole 10.4.0.0/16 table 220
ip route add prohibit 10.5.0.0/16 metric 7 table 220
ip route add throw 10.6.0.0/16 table 220 proto 42
ip route add table 220 10.7.0.0/16 nexthop via 192.0.2.1 dev v0 weight 2 nexthop via 198.51.100.1 dev v2
ip route add 10.8.0.0/16 tos 0x10 via 192.0.2.1 dev v0 table 220
ip route add 10.9.9.9 via 192.0.2.1 dev v0 table 220
ip route add 10.10.0.0/16 via 203.0.113.1 dev v0 onlink table 220
ip route add default via 198.51.100.1 dev v2 table 220
ip -6 route add 2001:db8:10::/48 via 2001:db8::1 dev v0 table 220 proto static
ip -6 route add 2001:db8:11::/48 dev v2 metric 50 table 220
ip -6 route add 2001:db8:12::/64 from 2001:db8:2::/64 via 2001:db8::1 dev v0 table 220
ip -6 route add table 220 2001:db8:13::/48 nexthop via 2001:db8::1 dev v0 nexthop via 2001:db8:2::1 dev v2
ip -6 route add unreachable 2001:db8:14::/48 table 220
ip -6 route add 2001:db8:15::/48 via 2001:db8::1 dev v0 pref high table 220
"""

FOREIGN = """
ip route add 10.1.0.0/16 via 198.51.100.1 dev v2 table 100
ip route add 10.1.0.0/16 via 192.0.2.1 dev v0
ip -6 route add 2001:db8:10::/48 via 2001:db8::1 dev v0 table 100
"""

PREF_NAMES = {0: "medium", 1: "high", 3: "low"}
FLAG_NAMES = {1: "dead", 2: "pervasive", 4: "onlink", 8: "offload", 16: "linkdown",
              32: "unresolved", 64: "trap"}


def ip_routes(ns, family: str, table: str = "220") -> list[dict]:
    out = ns.run("ip", family, "-d", "-j", "route", "show", "table", table).stdout
    return json.loads(out)


def as_ip_json(route: Route) -> dict:
    """What `ip -d -j route show` prints for ROUTE (iproute2 6.1's keys)."""
    d: dict = {"type": route.type_name, "dst": route.dst_prefix}
    if route.src is not None:
        d["from"] = f"{route.src}/{route.src_len}"
    if route.tos:
        d["tos"] = f"0x{route.tos:x}"
    if route.gateway is not None:
        if (":" in route.gateway) == (route.family == "inet6"):
            d["gateway"] = route.gateway
        else:
            d["via"] = {"family": "inet6", "host": route.gateway}
    if route.oif_name:
        d["dev"] = route.oif_name
    d["protocol"] = route.protocol_name
    d["scope"] = route.scope_name
    if route.prefsrc:
        d["prefsrc"] = route.prefsrc
    if route.priority:
        d["metric"] = route.priority
    d["flags"] = [name for bit, name in FLAG_NAMES.items() if route.flags & bit]
    if route.metrics:
        d["metrics"] = [dict(route.metrics)]
    if route.pref is not None:
        d["pref"] = PREF_NAMES[route.pref]
    if route.multipath:
        d["nexthops"] = [{"gateway": hop.gateway, "dev": hop.oif_name, "weight": hop.weight,
                          "flags": [n for b, n in FLAG_NAMES.items() if hop.flags & b]}
                         for hop in route.multipath]
    return d


def normalised(entries: list[dict]) -> list[dict]:
    # iproute2 puts metrics before or after other keys; key order does not matter for dicts.
    return sorted((json.dumps(e, sort_keys=True) for e in entries))


@pytest.fixture
def routed(netns):
    netns.sh(LINKS + TABLE_220 + FOREIGN)
    return netns


def all_routes(ns) -> set[tuple]:
    with ns.enter():
        return {r.key() for r in dump_routes(None)}


def test_dump_matches_ip_field_by_field(routed):
    with routed.enter():
        routes = dump_routes()
    assert {r.table for r in routes} == {220}
    ours_v4 = [as_ip_json(r) for r in routes if r.family == "inet"]
    ours_v6 = [as_ip_json(r) for r in routes if r.family == "inet6"]
    assert len(ours_v4) == 11 and len(ours_v6) == 6
    assert normalised(ours_v4) == normalised(ip_routes(routed, "-4"))
    assert normalised(ours_v6) == normalised(ip_routes(routed, "-6"))


def test_dump_records_index_and_name_protocol_number_and_name(routed):
    v0 = int(routed.run("cat", "/sys/class/net/v0/ifindex").stdout)
    with routed.enter():
        route = next(r for r in dump_routes() if r.dst == "10.1.0.0")
    assert (route.oif, route.oif_name) == (v0, "v0")
    assert (route.protocol, route.protocol_name) == (4, "static")
    assert route.describe() == "route 10.1.0.0/16 via 192.0.2.1 dev v0 table 220"


def test_dump_all_tables_includes_foreign_tables(routed):
    with routed.enter():
        tables = {r.table for r in dump_routes(None)}
        main = dump_routes(254)
    assert {100, 220, 254, 255} <= tables
    assert any(r.dst == "10.1.0.0" and r.oif_name == "v0" for r in main)


def test_dump_sees_only_the_calling_threads_namespace(netns_factory):
    a, b = netns_factory(), netns_factory()
    a.sh("ip route add blackhole 10.99.0.0/16 table 220")
    with b.enter():
        assert dump_routes() == []
    with a.enter():
        assert [r.dst for r in dump_routes()] == ["10.99.0.0"]


def test_dump_of_an_empty_or_missing_table_is_empty_not_an_error(netns):
    with netns.enter():
        assert dump_routes(4242) == []


def test_delete_each_route_removes_exactly_it_and_adding_it_back_restores_it(routed):
    before = all_routes(routed)
    ip_before = ip_routes(routed, "-4") + ip_routes(routed, "-6")
    with routed.enter(), Rtnl() as rtnl:
        for route in dump_routes(rtnl=rtnl):
            assert delete_route(route, rtnl=rtnl) is DeleteResult.DELETED, route.describe()
            after = {r.key() for r in dump_routes(None, rtnl=rtnl)}
            assert before - after == {route.key()}, route.describe()
            assert after - before == set()
            assert delete_route(route, rtnl=rtnl) is DeleteResult.ALREADY_GONE
            add_route(route, rtnl=rtnl)
            assert {r.key() for r in dump_routes(None, rtnl=rtnl)} == before
    assert normalised(ip_routes(routed, "-4") + ip_routes(routed, "-6")) == normalised(ip_before)


def test_delete_v4_and_v6_leaves_foreign_tables_untouched(routed):
    before = all_routes(routed)
    with routed.enter():
        ours = [r for r in dump_routes() if r.dst in ("10.1.0.0", "2001:db8:10::")]
        assert len(ours) == 2
        assert delete_routes(ours) == [DeleteResult.DELETED, DeleteResult.DELETED]
        assert delete_routes(ours) == [DeleteResult.ALREADY_GONE, DeleteResult.ALREADY_GONE]
    assert before - all_routes(routed) == {r.key() for r in ours}
    assert ip_routes(routed, "-4", "100") == [
        {"type": "unicast", "dst": "10.1.0.0/16", "gateway": "198.51.100.1", "dev": "v2",
         "protocol": "boot", "scope": "global", "flags": []}]
    assert any(e["dst"] == "10.1.0.0/16" for e in ip_routes(routed, "-4", "main"))
    assert [e["dst"] for e in ip_routes(routed, "-6", "100")] == ["2001:db8:10::/48"]


def test_gone_route_never_takes_a_lookalike_with_another_metric(netns):
    # The kernel reads metric 0 in a delete as "any metric".
    netns.sh(LINKS + "ip route add 10.20.0.0/16 via 192.0.2.1 dev v0 table 220\n")
    with netns.enter():
        [ours] = dump_routes()
        assert delete_route(ours) is DeleteResult.DELETED
        netns.sh("ip route add 10.20.0.0/16 via 192.0.2.1 dev v0 metric 20 table 220")
        assert delete_route(ours) is DeleteResult.ALREADY_GONE
        assert [r.priority for r in dump_routes()] == [20]


def test_lookalike_listed_first_makes_the_delete_refuse(netns):
    # Appended routes share dst/tos/metric; a delete without "src" takes the first with any src.
    netns.sh(LINKS + "ip route add 10.21.0.0/16 via 192.0.2.1 dev v0 src 192.0.2.10 table 220\n"
             "ip route append 10.21.0.0/16 via 192.0.2.1 dev v0 table 220\n")
    with netns.enter():
        first, second = dump_routes()
        assert (first.prefsrc, second.prefsrc) == ("192.0.2.10", None)
        with pytest.raises(KernelError, match="cannot delete route 10.21.0.0/16 via 192.0.2.1 dev v0 "
                                              "table 220 exactly.*src 192.0.2.10"):
            delete_route(second)
        assert len(dump_routes()) == 2
        assert delete_route(first) is DeleteResult.DELETED
        assert delete_route(second) is DeleteResult.DELETED
        assert dump_routes() == []


def test_metric_tells_v6_routes_apart(netns):
    netns.sh(LINKS + "ip -6 route add 2001:db8:30::/48 dev v0 metric 10 table 220\n"
             "ip -6 route add 2001:db8:30::/48 dev v0 metric 20 table 220\n")
    with netns.enter():
        low, high = sorted(dump_routes(), key=lambda r: r.priority)
        assert delete_route(high) is DeleteResult.DELETED
        assert dump_routes() == [low]


def test_nexthop_object_route_is_dumped_deleted_and_added_by_id(netns):
    netns.sh(LINKS + "ip nexthop add id 7 via 192.0.2.1 dev v0\n"
             "ip route add 10.30.0.0/16 nhid 7 table 220\n")
    with netns.enter():
        [route] = dump_routes()
        assert (route.nhid, route.gateway, route.oif_name) == (7, "192.0.2.1", "v0")
        assert delete_route(route) is DeleteResult.DELETED
        add_route(route)
    [entry] = ip_routes(netns, "-4")
    assert entry["nhid"] == 7 and entry["dst"] == "10.30.0.0/16"


def test_add_route_by_interface_name_is_seen_by_ip(netns):
    netns.sh(LINKS)
    route = Route(family="inet", table=220, dst="10.40.0.0", dst_len=16, protocol=4,
                  gateway="192.0.2.1", oif_name="v0", prefsrc="192.0.2.10",
                  metrics=(("mtu", 1300),))
    v6 = Route(family="inet6", table=220, dst="2001:db8:40::", dst_len=48, gateway="2001:db8::1",
               oif_name="v0", priority=300)
    multi = Route(family="inet", table=220, dst="10.41.0.0", dst_len=16, multipath=(
        NextHop(gateway="192.0.2.1", oif_name="v0", weight=3),
        NextHop(gateway="198.51.100.1", oif_name="v2")))
    with netns.enter():
        for r in (route, v6, multi):
            add_route(r)
    assert normalised(ip_routes(netns, "-4")) == normalised([
        {"type": "unicast", "dst": "10.40.0.0/16", "gateway": "192.0.2.1", "dev": "v0",
         "protocol": "static", "scope": "global", "prefsrc": "192.0.2.10", "flags": [],
         "metrics": [{"mtu": 1300}]},
        {"type": "unicast", "dst": "10.41.0.0/16", "protocol": "boot", "scope": "global",
         "flags": [], "nexthops": [
             {"gateway": "192.0.2.1", "dev": "v0", "weight": 3, "flags": []},
             {"gateway": "198.51.100.1", "dev": "v2", "weight": 1, "flags": []}]},
    ])
    [entry] = ip_routes(netns, "-6")
    assert (entry["dst"], entry["gateway"], entry["dev"], entry["metric"]) == \
        ("2001:db8:40::/48", "2001:db8::1", "v0", 300)


def test_add_existing_route_raises_eexist_and_replace_succeeds(netns):
    netns.sh(LINKS + "ip route add 10.50.0.0/16 via 192.0.2.1 dev v0 table 220\n")
    with netns.enter():
        [route] = dump_routes()
        with pytest.raises(KernelError) as caught:
            add_route(route)
        assert caught.value.errno == errno.EEXIST
        assert str(caught.value) == ("cannot add route 10.50.0.0/16 via 192.0.2.1 dev v0 table 220: "
                                     "File exists")
        add_route(Route(family="inet", table=220, dst="10.50.0.0", dst_len=16,
                        gateway="198.51.100.1", oif_name="v2"), replace=True)
        assert [r.gateway for r in dump_routes()] == ["198.51.100.1"]


def test_add_on_a_missing_interface_names_it(netns):
    with netns.enter(), pytest.raises(KernelError, match="no network interface named 'eth9'") as caught:
        add_route(Route(family="inet", table=220, dst="10.0.0.0", dst_len=8, oif_name="eth9"))
    assert caught.value.errno == errno.ENODEV


def test_delete_refused_by_the_kernel_raises_naming_the_route_and_errno(routed):
    with routed.enter():
        route = next(r for r in dump_routes() if r.dst == "10.1.0.0")
        with without_net_admin():
            with pytest.raises(KernelError) as caught:
                delete_route(route)
            [result] = delete_routes([route])
    assert str(caught.value) == ("cannot delete route 10.1.0.0/16 via 192.0.2.1 dev v0 table 220: "
                                 "Operation not permitted")
    assert caught.value.errno == errno.EPERM
    assert isinstance(result, KernelError) and result.errno == errno.EPERM
    assert route.key() in all_routes(routed)


def test_stale_record_with_a_vanished_interface_is_already_gone(routed):
    with routed.enter():
        route = next(r for r in dump_routes() if r.dst == "10.3.0.0")
    routed.run("ip", "link", "del", "v2")
    with routed.enter():
        assert delete_route(route) is DeleteResult.ALREADY_GONE


def test_json_round_trip_of_every_dumped_route(routed):
    with routed.enter():
        routes = dump_routes(None)
    for route in routes:
        data = json.loads(json.dumps(route.to_json()))
        assert Route.from_json(data) == route
    sample = next(r for r in routes if r.multipath)
    assert Route.from_json(sample.to_json()).multipath == sample.multipath


@pytest.mark.parametrize("change, error", [
    ({"family": "inet4"}, ValueError),
    ({"dst": "10.0.0.300"}, ValueError),
    ({"dst": "2001:db8::"}, ValueError),
    ({"dst_len": 33}, ValueError),
    ({"table": True}, TypeError),
    ({"table": "220"}, TypeError),
    ({"metrics": {"colour": 1}}, ValueError),
    ({"multipath": [{"gateway": "192.0.2.1"}]}, KeyError),
    ({"priority": None}, TypeError),
])
def test_from_json_rejects_bad_input(change, error):
    good = Route(family="inet", table=220, dst="10.0.0.0", dst_len=8).to_json()
    assert Route.from_json(good) == Route(family="inet", table=220, dst="10.0.0.0", dst_len=8)
    with pytest.raises(error):
        Route.from_json({**good, **change})
    missing = dict(good)
    del missing["table"]
    with pytest.raises(KeyError):
        Route.from_json(missing)


def test_volatile_fields_are_json_keys():
    assert Route.VOLATILE <= set(Route(family="inet", table=1, dst="0.0.0.0", dst_len=0).to_json())


# --- the delete decision, as a table (kernel semantics checked against a kernel above) ---

def r4(**kw) -> Route:
    base = dict(family="inet", table=220, dst="10.0.0.0", dst_len=8, gateway="192.0.2.1", oif=3)
    return Route(**{**base, **kw})


@pytest.mark.parametrize("request_, candidate, accepts", [
    (r4(), r4(), True),
    (r4(), r4(table=100), False),
    (r4(), r4(priority=20), True),            # metric 0 asks for any metric
    (r4(priority=10), r4(priority=20), False),
    (r4(gateway=None), r4(), True),           # no gateway asks for any gateway
    (r4(), r4(gateway="192.0.2.2"), False),
    (r4(oif=None, gateway=None), r4(oif=7), True),
    (r4(), r4(oif=7), False),
    (r4(protocol=0), r4(protocol=4), True),
    (r4(protocol=3), r4(protocol=4), False),
    (r4(prefsrc=None), r4(prefsrc="192.0.2.10"), True),
    (r4(prefsrc="192.0.2.11"), r4(prefsrc="192.0.2.10"), False),
    (r4(tos=0), r4(tos=16), False),           # tos selects the alias itself
    (r4(type=6, gateway=None, oif=None), r4(), False),
    (r4(nhid=5), r4(nhid=6), False),
    (r4(gateway=None, oif=3), r4(gateway=None, multipath=(NextHop("192.0.2.1", 3),)), True),
    (r4(family="inet6", dst="2001:db8::", gateway="2001:db8::1", priority=1024),
     r4(family="inet6", dst="2001:db8::", gateway="2001:db8::1", priority=1024, scope=253), True),
])
def test_delete_lookup_accepts(request_, candidate, accepts):
    assert delete_lookup_accepts(request_, candidate) is accepts


def test_decide_delete_gone_own_and_refused():
    ours, other = r4(gateway=None), r4(gateway="192.0.2.9")
    assert decide_delete(ours, []) is None
    assert decide_delete(ours, [ours, other]) == ours
    with pytest.raises(KernelError, match="would remove route 10.0.0.0/8 via 192.0.2.9"):
        decide_delete(ours, [other, ours])


# --- the raw codec against pyroute2's (dumps and deletes bypass pyroute2 for speed) ---

ODD_ROUTES = """
ip route add 10.60.0.0/16 via inet6 2001:db8::1 dev v0 table 220
ip route add 10.61.0.0/16 via 192.0.2.1 dev v0 congctl cubic mtu lock 1300 hoplimit 9 table 220
ip route add table 220 10.62.0.0/16 nexthop via 192.0.2.1 dev v0 nexthop via inet6 2001:db8::1 dev v0
ip -6 route add 2001:db8:16::/48 via 2001:db8::1 dev v0 expires 300 table 220
ip nexthop add id 9 via 192.0.2.1 dev v0
ip route add 10.63.0.0/16 nhid 9 table 220
"""


def test_raw_dump_decodes_every_route_exactly_as_pyroute2_does(routed):
    from supervisor.kernel import netlink, rtnl as rtnl_mod, routes as routes_mod
    routed.sh(ODD_ROUTES)
    with routed.enter(), netlink.NetlinkSocket(netlink.NETLINK_ROUTE, strict_check=True) as sock:
        names = rtnl_mod.interface_names(sock)
        theirs_names = {}
        for data in sock.dump_raw(rtnl_mod.RTM_GETLINK, bytes(16)):
            for off, _len, msg_type, *_ in netlink.walk_messages(data):
                if msg_type == rtnl_mod.RTM_NEWLINK:
                    link = rtnl_mod.LinkMsg(data, offset=off)
                    link.decode()
                    theirs_names[link["index"]] = link.get_attr("IFLA_IFNAME")
        assert names == theirs_names
        for af in (2, 10):
            chunks = sock.dump_raw(rtnl_mod.RTM_GETROUTE, bytes([af]) + bytes(11))
            ours = routes_mod.decode_routes(chunks, names)
            theirs = []
            for data in chunks:
                for off, _len, msg_type, *_ in netlink.walk_messages(data):
                    if msg_type == rtnl_mod.RTM_NEWROUTE:
                        msg = rtnl_mod.RouteMsg(data, offset=off)
                        msg.decode()
                        route = routes_mod.route_from_msg(msg, names)
                        if route is not None:
                            theirs.append(route)
            assert ours == theirs and len(ours) > 10
    assert {"lo", "v0", "v1", "v2", "v3"} <= set(names.values())
    shapes = [r for r in ours if r.expires or r.pref is not None]
    assert shapes, "the IPv6 dump has routes with an expiry and a preference"


def test_raw_delete_request_is_byte_for_byte_what_pyroute2_would_send(routed):
    from supervisor.kernel import routes as routes_mod
    routed.sh(ODD_ROUTES)
    with routed.enter():
        every = dump_routes(None)
    assert any(r.multipath for r in every) and any(r.nhid for r in every)
    for route in every:
        msg = routes_mod._route_msg(route, route.oif, [(h, h.oif) for h in route.multipath], for_add=False)
        msg.encode()
        assert routes_mod.encode_route_delete(route) == bytes(msg.data[16:]), route.describe()


def test_batch_delete_decides_each_route_against_what_the_deletes_before_it_left(netns):
    """Appended look-alikes share a prefix: their deletes go one round after the other."""
    netns.sh(LINKS + "ip route add 10.21.0.0/16 via 192.0.2.1 dev v0 src 192.0.2.10 table 220\n"
             "ip route append 10.21.0.0/16 via 192.0.2.1 dev v0 table 220\n"
             "ip route add 10.22.0.0/16 via 192.0.2.1 dev v0 table 220\n")
    with netns.enter():
        first, second, other = dump_routes()
        assert (first.prefsrc, second.prefsrc) == ("192.0.2.10", None)
        # second alone would take first (listed first): refused, the rest goes on
        refused, gone, done = delete_routes([second, first, other])
        assert isinstance(refused, KernelError) and "exactly" in str(refused)
        assert (gone, done) == (DeleteResult.DELETED, DeleteResult.DELETED)
        assert dump_routes() == [second]
    netns.sh("ip route append 10.21.0.0/16 via 192.0.2.1 dev v0 src 192.0.2.10 table 220")
    with netns.enter():
        again = dump_routes()
        assert [r.prefsrc for r in again] == [None, "192.0.2.10"]
        assert delete_routes(again + again) == [DeleteResult.DELETED] * 2 + [DeleteResult.ALREADY_GONE] * 2
        assert dump_routes() == []


def test_batch_delete_of_thousands_of_routes_leaves_foreign_routes(netns, tmp_path):
    lines = [f"route add 10.{i >> 8}.{i & 255}.0/24 via 192.0.2.1 dev v0 proto static table 220"
             for i in range(3000)]
    batch = tmp_path / "routes"
    batch.write_text("\n".join(lines) + "\n")
    netns.sh(LINKS + FOREIGN + "ip route add 10.250.0.0/16 via 192.0.2.1 dev v0 table 220\n")
    netns.run("ip", "-batch", str(batch))
    with netns.enter(), Rtnl() as rtnl:
        ours = [r for r in dump_routes(rtnl=rtnl) if r.protocol == 4]
        assert len(ours) == 3000
        assert delete_routes(ours, rtnl=rtnl) == [DeleteResult.DELETED] * 3000
        assert [r.dst for r in dump_routes(rtnl=rtnl)] == ["10.250.0.0"]
    assert len(ip_routes(netns, "-4", "100")) == 1
