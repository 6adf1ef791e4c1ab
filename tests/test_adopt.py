"""Adopt mode, pure: traffic selectors, VICI answers, leftover CHILD_SAs, matching, and plans (table tests).

The leftovers come from the snapshot fixtures of tests/fixtures/snapshots (what a
crashed charon left: tunnels-crash has CHILD_SAs with reqids 1 (10.1/16 <-> 10.2/16,
peer 192.0.2.2, one inbound and two outbound SAs), 2 (IPv6, peer 2001:db8::2),
3 (an out policy to 10.3/16 via 192.0.2.3), 42 (SAs without policies), two shunts,
table-220 routes, rules at 220 and updown rules for reqids 1 and 2). charon's
list-conns / list-sas answers are written here as VICI delivers them.
"""

from __future__ import annotations

import dataclasses
import socket

import pytest

from supervisor import adopt
from supervisor.adopt import (InitiateChild, WaitFor, group_leftovers, match_leftover, parse_list_conns,
                              parse_list_sas, parse_ts, plan_adopt)
from supervisor.kernel import xfrm
from supervisor.kernel.common import Action, KernelEvent
from supervisor.kernel.xfrm import XfrmPolicy, XfrmSA, XfrmSelector, XfrmTemplate
from supervisor.ledger import apply_events, start_ledger
from supervisor.ownership import SUPERVISOR_BLOCK_UID, Verdict, decide_ownership
from supervisor.reconcile import DeleteObject, InstallBlockPolicy, Keep

from test_plan import fixture, short

DAEMON = 4321
V4, V6 = socket.AF_INET, socket.AF_INET6


# --- traffic selectors ------------------------------------------------------------------

@pytest.mark.parametrize("text, family, first, last, proto, ports", [
    ("10.1.0.0/16", V4, "10.1.0.0", "10.1.255.255", 0, (0, 0xFFFF)),
    ("10.1.2.3/16", V4, "10.1.0.0", "10.1.255.255", 0, (0, 0xFFFF)),       # charon prints the network
    ("fd00:1::/64", V6, "fd00:1::", "fd00:1::ffff:ffff:ffff:ffff", 0, (0, 0xFFFF)),
    ("10.0.0.1..10.0.0.9", V4, "10.0.0.1", "10.0.0.9", 0, (0, 0xFFFF)),
    ("10.1.0.0/16[tcp/http]", V4, "10.1.0.0", "10.1.255.255", 6, (80, 80)),
    ("10.1.0.0/16[udp/1000-2000]", V4, "10.1.0.0", "10.1.255.255", 17, (1000, 2000)),
    ("0.0.0.0/0[icmp/8(0)]", V4, "0.0.0.0", "255.255.255.255", 1, (0, 0xFFFF)),
    ("10.1.0.1/32[47]", V4, "10.1.0.1", "10.1.0.1", 47, (0, 0xFFFF)),
    ("10.1.0.0/16[0/53]", V4, "10.1.0.0", "10.1.255.255", 0, (53, 53)),
])
def test_traffic_selectors_are_read_as_charon_prints_them(text, family, first, last, proto, ports):
    import ipaddress
    ts = parse_ts(text)
    assert (ts.family, ts.low, ts.high, ts.proto, (ts.port_low, ts.port_high)) == (
        family, int(ipaddress.ip_address(first)), int(ipaddress.ip_address(last)), proto, ports)


@pytest.mark.parametrize("text", ["nonsense", "10.1.0.0/16[tcp", "10.1.0.0/40", "10.0.0.1..fd00::1",
                                  "10.1.0.0/16[nosuchproto]", "10.1.0.0/16[tcp/nosuchservice]"])
def test_traffic_selectors_not_understood_raise(text):
    with pytest.raises(ValueError):
        parse_ts(text)


def sel(src, dst, proto=0, dport=None):
    s_addr, s_len = src.split("/")
    d_addr, d_len = dst.split("/")
    family = V6 if ":" in s_addr else V4
    return XfrmSelector(family, s_addr, int(s_len), d_addr, int(d_len), proto,
                        dport=dport or 0, dport_mask=0xFFFF if dport else 0)


@pytest.mark.parametrize("local, remote, selector, covered, exact", [
    (["10.1.0.0/16"], ["10.2.0.0/16"], sel("10.1.0.0/16", "10.2.0.0/16"), True, True),
    (["10.1.0.0/16"], ["10.2.0.0/16"], sel("10.1.5.0/24", "10.2.0.0/16"), True, False),   # narrowed
    (["10.1.0.0/16"], ["10.2.0.0/16"], sel("10.1.0.0/15", "10.2.0.0/16"), False, False),
    (["10.1.0.0/16"], ["10.2.0.0/16"], sel("10.2.0.0/16", "10.1.0.0/16"), False, False),  # reversed
    (["dynamic"], ["10.2.0.0/16"], sel("192.0.2.1/32", "10.2.0.0/16"), True, False),        # our address/VIP
    (["dynamic"], ["10.2.0.0/16"], sel("10.1.0.0/24", "10.2.0.0/16"), False, False),
    (["10.1.0.0/16[tcp]"], ["10.2.0.0/16"], sel("10.1.0.0/16", "10.2.0.0/16"), False, False),
    (["10.1.0.0/16[tcp]"], ["10.2.0.0/16"], sel("10.1.0.0/16", "10.2.0.0/16", proto=6), True, True),
    (["10.1.0.0/16"], ["10.2.0.0/16[tcp/443]"], sel("10.1.0.0/16", "10.2.0.0/16", 6, 443), True, True),
    (["10.1.0.0/16"], ["10.2.0.0/16[tcp/443]"], sel("10.1.0.0/16", "10.2.0.0/16", 6), False, False),
    (["10.1.0.0/16", "fd00:1::/64"], ["fd00:2::/64"], sel("fd00:1::/64", "fd00:2::/64"), True, True),
])
def test_a_configured_child_covers_a_leftover_selector(local, remote, selector, covered, exact):
    got = adopt._covered(selector, [parse_ts(t) for t in local], [parse_ts(t) for t in remote])
    assert got == (covered, exact)


# --- VICI answers -----------------------------------------------------------------------

def conn(name, remote_addrs, children, local_addrs=("%any",), unique="UNIQUE_NO"):
    """One list-conn event body as the vici package delivers it (bytes values)."""
    def b(v):
        return v.encode() if isinstance(v, str) else [x.encode() for x in v]
    return {name: {"local_addrs": b(list(local_addrs)), "remote_addrs": b(list(remote_addrs)),
                   "version": b"IKEv2", "unique": b(unique),
                   "children": {child: {"mode": b(mode), "local-ts": b(lts), "remote-ts": b(rts),
                                        "rekey_time": b"3600"} for child, (mode, lts, rts) in children.items()}}}


def ike(name, state, remote, children=(), local="192.0.2.1", vips=(), uniqueid=1):
    """One list-sa event body; CHILDREN: (name, reqid, state, spi_in, spi_out, local_ts, remote_ts)."""
    body = {"uniqueid": str(uniqueid).encode(), "version": b"2", "state": state.encode(),
            "local-host": local.encode(), "remote-host": remote.encode(),
            "child-sas": {f"{c[0]}-{i + 10}": {"name": c[0].encode(), "uniqueid": str(i + 10).encode(),
                                               "reqid": str(c[1]).encode(), "state": c[2].encode(),
                                               "mode": b"TUNNEL", "protocol": b"ESP",
                                               "spi-in": f"{c[3]:08x}".encode(), "spi-out": f"{c[4]:08x}".encode(),
                                               "local-ts": [t.encode() for t in c[5]],
                                               "remote-ts": [t.encode() for t in c[6]]}
                          for i, c in enumerate(children)}}
    if vips:
        body["local-vips"] = [v.encode() for v in vips]
    return {name: body}


CONNS = parse_list_conns([
    conn("site-a", ["192.0.2.2"], {"net": ("TUNNEL", ["10.1.0.0/16"], ["10.2.0.0/16"])}),
    conn("site-a6", ["2001:db8::2"], {"net6": ("TUNNEL", ["fd00:1::/64"], ["fd00:2::/64"])}),
    conn("road", ["%any"], {"hosts": ("TUNNEL", ["10.1.0.0/16"], ["10.3.0.0/16"])}),
    conn("bypass", ["%any"], {"lan": ("PASS", ["10.1.0.0/16"], ["192.168.0.0/24"])}),
])


def test_list_conns_answers_become_configured_children():
    assert [(c.conn, c.child, c.mode, c.remote_addrs, c.initiable_peer()) for c in CONNS] == [
        ("site-a", "net", "TUNNEL", ("192.0.2.2",), True), ("site-a6", "net6", "TUNNEL", ("2001:db8::2",), True),
        ("road", "hosts", "TUNNEL", ("%any",), False), ("bypass", "lan", "PASS", ("%any",), False)]
    assert [t.text for t in CONNS[0].local_ts] == ["10.1.0.0/16"]


@pytest.mark.parametrize("remote_addrs, initiable", [
    (["vpn.example.org"], True), (["192.0.2.0/24"], False), (["192.0.2.1-192.0.2.9"], False),
    (["%any6"], False), (["%any", "192.0.2.2"], True), ([], False)])
def test_a_child_can_be_initiated_only_towards_a_concrete_peer(remote_addrs, initiable):
    [c] = parse_list_conns([conn("x", remote_addrs, {"c": ("TUNNEL", ["10.1.0.0/16"], ["10.2.0.0/16"])})])
    assert c.initiable_peer() is initiable


def test_list_sas_answers_become_active_ike_and_child_sas():
    [a] = parse_list_sas([ike("site-a", "ESTABLISHED", "192.0.2.2", vips=["10.99.0.5"], children=[
        ("net", 7, "INSTALLED", 0xC9999999, 0x00AA0001, ["10.1.0.0/16"], ["10.2.0.0/16"])])])
    assert (a.conn, a.state, a.remote_host, a.local_vips) == ("site-a", "ESTABLISHED", "192.0.2.2", ("10.99.0.5",))
    [c] = a.children
    assert (c.child, c.reqid, c.spi_in, c.spi_out, c.live) == ("net", 7, 0xC9999999, 0xAA0001, True)
    assert c.describe() == "CHILD_SA site-a/net #10 (reqid 7, SPIs c9999999/00aa0001)"


# --- leftover CHILD_SAs -----------------------------------------------------------------

@pytest.fixture(scope="module")
def tunnels():
    snap = fixture("tunnels-crash")
    return snap, decide_ownership(snap.objects).owned()


def local_addresses(snap):
    return frozenset(a.address for a in snap.objects["address"])


def test_leftovers_group_into_child_sas_by_reqid_with_selectors_and_peer(tunnels):
    snap, owned = tunnels
    groups = {g.reqid: g for g in group_leftovers([r for r, _ in owned], local_addresses(snap))}
    assert sorted(groups) == [1, 2, 3, 42]
    assert (groups[1].local, groups[1].peer, groups[1].mode) == ("192.0.2.1", "192.0.2.2", xfrm.MODE_TUNNEL)
    assert [f"{s.saddr}/{s.prefixlen_s}>{s.daddr}/{s.prefixlen_d}" for s in groups[1].selectors] == [
        "10.1.0.0/16>10.2.0.0/16"]
    assert groups[1].spis == {0xC1234567, 0x0BADF00D, 0x1234}
    assert groups[2].peer == "2001:db8::2" and len(groups[2].policies) == 3
    assert groups[3].peer == "192.0.2.3" and not groups[3].sas
    # no policy left: the SAs still tell the peer (the inbound one ends at one of our addresses)
    assert (groups[42].local, groups[42].peer, groups[42].selectors) == ("192.0.2.1", "192.0.2.3", ())


def test_a_leftover_with_only_in_and_fwd_policies_gets_its_selectors_reversed():
    t = XfrmTemplate(V4, "192.0.2.2", "192.0.2.1", reqid=5, mode=xfrm.MODE_TUNNEL)
    pols = [XfrmPolicy(sel("10.2.0.0/16", "10.1.0.0/16"), d, priority=383615, templates=(t,))
            for d in (xfrm.DIR_IN, xfrm.DIR_FWD)]
    [g] = group_leftovers(pols)
    assert (g.local, g.peer) == ("192.0.2.1", "192.0.2.2")
    assert [(s.saddr, s.daddr) for s in g.selectors] == [("10.1.0.0", "10.2.0.0")]


def test_transport_mode_sas_without_policies_give_host_selectors():
    sas = [XfrmSA(V4, "192.0.2.1", 0xC0000001, xfrm.IPPROTO_ESP, "192.0.2.2", reqid=9),
           XfrmSA(V4, "192.0.2.2", 0x00000101, xfrm.IPPROTO_ESP, "192.0.2.1", reqid=9)]
    [g] = group_leftovers(sas, frozenset({"192.0.2.1"}))
    assert (g.mode, g.local, g.peer) == (xfrm.MODE_TRANSPORT, "192.0.2.1", "192.0.2.2")
    assert [(s.saddr, s.prefixlen_s, s.daddr, s.prefixlen_d) for s in g.selectors] == [
        ("192.0.2.1", 32, "192.0.2.2", 32)]


def child(conn_name, child_name, local, remote, remote_addrs=("192.0.2.2",), mode="TUNNEL"):
    [c] = parse_list_conns([conn(conn_name, list(remote_addrs), {child_name: (mode, local, remote)})])
    return c


@pytest.mark.parametrize("configured, expected", [
    ([child("a", "net", ["10.1.0.0/16"], ["10.2.0.0/16"])], ("a/net", "traffic selectors equal a/net's; peer "
                                                                     "192.0.2.2 in remote_addrs")),
    ([child("a", "net", ["10.0.0.0/8"], ["10.2.0.0/16"], ["%any"])], ("a/net", "traffic selectors within a/net's")),
    # exact selectors win over a wider child; a known peer over a wildcard
    ([child("wide", "n", ["10.0.0.0/8"], ["10.0.0.0/8"]), child("a", "net", ["10.1.0.0/16"], ["10.2.0.0/16"])],
     ("a/net", "traffic selectors equal a/net's; peer 192.0.2.2 in remote_addrs")),
    ([child("any", "n", ["10.1.0.0/16"], ["10.2.0.0/16"], ["%any"]), child("a", "net", ["10.1.0.0/16"],
                                                                         ["10.2.0.0/16"])],
     ("a/net", "traffic selectors equal a/net's; peer 192.0.2.2 in remote_addrs")),
    ([child("other", "net", ["10.1.0.0/16"], ["10.2.0.0/16"], ["192.0.2.9"])],
     (None, "no configured child covers its traffic selectors, mode and peer")),
    ([child("a", "net", ["10.1.0.0/16"], ["10.2.0.0/16"], mode="TRANSPORT")],
     (None, "no configured child covers its traffic selectors, mode and peer")),
    ([child("a", "x", ["10.1.0.0/16"], ["10.2.0.0/16"]), child("b", "y", ["10.1.0.0/16"], ["10.2.0.0/16"])],
     (None, "ambiguous: a/x and b/y match equally")),
    ([child("a", "net", ["10.1.0.0/16"], ["10.2.0.0/16"], ["192.0.2.0/24"])],
     ("a/net", "traffic selectors equal a/net's; peer 192.0.2.2 in remote_addrs")),
])
def test_a_leftover_child_matches_the_best_configured_child(tunnels, configured, expected):
    snap, owned = tunnels
    [g] = [g for g in group_leftovers([r for r, _ in owned], local_addresses(snap)) if g.reqid == 1]
    m = match_leftover(g, configured)
    assert ((m.child.name if m.child else None), m.reason) == expected


def test_charon_using_the_same_reqid_again_decides_between_equal_children(tunnels):
    snap, owned = tunnels
    [g] = [g for g in group_leftovers([r for r, _ in owned], local_addresses(snap)) if g.reqid == 1]
    configured = [child("a", "x", ["10.1.0.0/16"], ["10.2.0.0/16"]), child("b", "y", ["10.1.0.0/16"],
                                                                           ["10.2.0.0/16"])]
    active = parse_list_sas([ike("b", "ESTABLISHED", "192.0.2.2", children=[
        ("y", 1, "INSTALLED", 0xC5555555, 0x5555, ["10.1.0.0/16"], ["10.2.0.0/16"])])])
    m = match_leftover(g, configured, active)
    assert m.child.name == "b/y" and "charon uses reqid 1 for it again" in m.reason


# --- plans --------------------------------------------------------------------------------

def ledger_after(snap, owned, reinstalled=()):
    """The ledger of the restarted charon: leftovers carried over, then REINSTALLED by charon's port."""
    ledger = start_ledger(snap, None, claimed=[r for r, _ in owned], now=0.0)
    events = [KernelEvent(r.FAMILY, Action.UPDATE, r, DAEMON) for r in reinstalled]
    return apply_events(ledger, events, frozenset({DAEMON}))


def reinstalled_reqid_1(snap, new_reqid=7):
    """charon's policies for site-a/net again (same keys, its new reqid in the template)."""
    out = []
    for p in snap.objects["xfrm_policy"]:
        if p.templates and p.templates[0].reqid == 1:
            out.append(dataclasses.replace(p, templates=(dataclasses.replace(p.templates[0], reqid=new_reqid),)))
    return out


def summary(action) -> str:
    if isinstance(action, InitiateChild):
        return f"initiate {action.conn}/{action.child} {list(action.reqids)}"
    if isinstance(action, WaitFor):
        return f"wait {short(action.record)}"
    if isinstance(action, Keep):
        return f"keep {short(action.record)}"
    if isinstance(action, InstallBlockPolicy):
        return f"block {short(action.covers)}"
    return f"delete {short(action.record)}"


SITE_A_UP = [ike("site-a", "ESTABLISHED", "192.0.2.2", children=[
    ("net", 7, "INSTALLED", 0xC9999999, 0x00AA0001, ["10.1.0.0/16"], ["10.2.0.0/16"])])]
REQID_1 = {"delete sa 0xc1234567", "delete sa 0xbadf00d", "delete sa 0x1234"}
FW_1 = {"delete fw iptables-nft INPUT in 1", "delete fw iptables-nft OUTPUT out 1",
        "delete fw iptables-nft FORWARD in 1", "delete fw iptables-nft FORWARD out 1"}
FW_2 = {f.replace("iptables-nft", "ip6tables-nft").replace(" 1", " 2") for f in FW_1}
RULES = {"keep rule inet 220", "keep rule inet6 220"}
POLICIES_1 = {"keep out 10.1.0.0/16>10.2.0.0/16", "keep in 10.2.0.0/16>10.1.0.0/16",
              "keep fwd 10.2.0.0/16>10.1.0.0/16"}


def plan_for(tunnels, *, reinstalled=False, active=(), now=0.0, deadline=60.0, resolved=frozenset(),
             initiated=frozenset(), configured=CONNS, **kw):
    snap, owned = tunnels
    ledger = ledger_after(snap, owned, reinstalled_reqid_1(snap) if reinstalled else ())
    return plan_adopt(owned, ledger=ledger, configured=configured,
                      active=None if active is None else parse_list_sas(active), now=now, deadline=deadline,
                      resolved=resolved, initiated=initiated, local_addresses=local_addresses(snap), **kw)


def test_right_after_the_restart_matched_children_are_initiated_and_everything_else_waits(tunnels):
    plan = plan_for(tunnels, parallel=2)
    got = [summary(a) for a in plan.actions]
    assert {g for g in got if not g.startswith("wait")} == RULES | {
        "initiate site-a/net [1]", "initiate site-a6/net6 [2]"}        # road/hosts: peer %any
    assert not [a for a in plan.actions if isinstance(a, (DeleteObject, InstallBlockPolicy))]
    assert len([g for g in got if g.startswith("wait")]) == 28 - 2
    [init] = [a for a in plan.actions if isinstance(a, InitiateChild) and a.conn == "site-a"]
    assert init.peer == "192.0.2.2" and "INITIAL_CONTACT" in init.reason and init.rule == "marker:spi-range"
    waits = {short(a.record): a.reason for a in plan.actions if isinstance(a, WaitFor)}
    assert "matches road/hosts" in waits["out 10.1.0.0/16>10.3.0.0/16"]
    assert "no policy left to tell its traffic selectors" in waits["sa 0xbeef"]


def test_once_charon_reports_the_new_child_sa_the_leftover_sas_it_replaces_go(tunnels):
    plan = plan_for(tunnels, reinstalled=True, active=SITE_A_UP, initiated=frozenset({("site-a", "net")}))
    got = {summary(a) for a in plan.actions if not isinstance(a, WaitFor)}
    assert got == (POLICIES_1 | RULES | REQID_1 | FW_1 | {"keep route 10.2.0.0/16", "initiate site-a6/net6 [2]"})
    reasons = {summary(a): a.reason for a in plan.actions}
    assert reasons["delete sa 0xc1234567"] == ("replaced by charon's CHILD_SA site-a/net #10 (reqid 7, SPIs "
                                               "c9999999/00aa0001)")
    assert "NLM_F_REPLACE" in reasons["keep route 10.2.0.0/16"]
    assert reasons["keep out 10.1.0.0/16>10.2.0.0/16"] == "charon installed it again (same key): charon's again"


def test_after_the_grace_period_the_unclaimed_rest_goes_fail_closed_where_still_configured(tunnels):
    first = plan_for(tunnels, reinstalled=True, active=SITE_A_UP, initiated=frozenset({("site-a", "net")}))
    resolved = frozenset(adopt.leftover_key(a.record) for a in first.actions if isinstance(a, (Keep, DeleteObject)))
    plan = plan_for(tunnels, reinstalled=True, active=SITE_A_UP, now=61.0, resolved=resolved,
                    initiated=frozenset({("site-a", "net"), ("site-a6", "net6")}))
    got = [summary(a) for a in plan.actions]
    assert not [g for g in got if g.startswith(("wait", "initiate", "keep"))]
    blocks = [g for g in got if g.startswith("block")]
    assert set(blocks) == {"block out fd00:1::/64>fd00:2::/64", "block fwd fd00:2::/64>fd00:1::/64",
                           "block out 10.1.0.0/16>10.3.0.0/16"}           # still configured (site-a6, road)
    assert set(got) - set(blocks) == {
        "delete sa 0xc7654321", "delete sa 0xc0ffee", "delete sa 0xcabba6e5", "delete sa 0xbeef",
        "delete out fd00:1::/64>fd00:2::/64", "delete in fd00:2::/64>fd00:1::/64",
        "delete fwd fd00:2::/64>fd00:1::/64", "delete out 10.1.0.0/16>10.3.0.0/16",
        "delete out 10.1.0.0/16>192.168.0.0/24",          # pass shunt: nothing to keep closed
        "delete out 10.1.0.0/16>10.66.0.0/16",            # drop shunt no longer configured
        "delete route fd00:2::/64"} | FW_2
    # blocks first, every covered delete waits for its block, SAs before policies
    deletes = [a for a in plan.actions if isinstance(a, DeleteObject)]
    for a in deletes:
        if a.record.FAMILY == "xfrm_policy" and summary(a).replace("delete", "block") in blocks:
            [i] = a.after
            assert plan.actions[i].covers is a.record
    order = [a.record.FAMILY for a in deletes]
    assert order == sorted(order, key=["xfrm_sa", "xfrm_policy", "firewall", "route", "rule", "address"].index)
    assert all(a.reason == "recovery.adopt_grace ended and charon did not claim it" for a in deletes)
    block = next(a for a in plan.actions if isinstance(a, InstallBlockPolicy))
    assert block.block.selector.user == SUPERVISOR_BLOCK_UID and "still configured for" in block.reason


def test_without_charons_configuration_every_protecting_policy_goes_fail_closed(tunnels):
    plan = plan_for(tunnels, configured=None, active=None, now=61.0)
    blocks = {summary(a) for a in plan.actions if isinstance(a, InstallBlockPolicy)}
    assert blocks == {"block out 10.1.0.0/16>10.2.0.0/16", "block fwd 10.2.0.0/16>10.1.0.0/16",
                      "block out fd00:1::/64>fd00:2::/64", "block fwd fd00:2::/64>fd00:1::/64",
                      "block out 10.1.0.0/16>10.3.0.0/16", "block out 10.1.0.0/16>10.66.0.0/16"}
    assert not [a for a in plan.actions if isinstance(a, InitiateChild)]
    assert plan_for(tunnels, configured=None, active=None, now=61.0, fail_closed=False).actions and not [
        a for a in plan_for(tunnels, configured=None, active=None, now=61.0, fail_closed=False).actions
        if isinstance(a, InstallBlockPolicy)]


@pytest.mark.parametrize("case, active, initiated, expect_initiate, expect", [
    ("charon is already establishing site-a (start_action)",
     [ike("site-a", "CONNECTING", "192.0.2.2")], frozenset(), {"site-a6/net6"}, "charon is establishing site-a"),
    ("an established IKE_SA without the child: a CHILD_SA in it",
     [ike("site-a", "ESTABLISHED", "192.0.2.2")], frozenset(), {"site-a/net", "site-a6/net6"}, None),
    ("initiated once is enough", [], frozenset({("site-a", "net")}), {"site-a6/net6"}, None),
])
def test_initiation_is_asked_for_once_and_never_next_to_charons_own(tunnels, case, active, initiated,
                                                                    expect_initiate, expect):
    plan = plan_for(tunnels, active=active, initiated=initiated, parallel=2)
    assert {f"{a.conn}/{a.child}" for a in plan.actions if isinstance(a, InitiateChild)} == expect_initiate, case
    if expect:
        assert any(expect in a.reason for a in plan.actions if isinstance(a, WaitFor)), case


def _initiations(plan):
    return [f"{a.conn}/{a.child}" for a in plan.actions if isinstance(a, InitiateChild)]


def _waits(plan):
    return {a.reason for a in plan.actions if isinstance(a, WaitFor)}


def _expiring(tunnels, soon_reqid):
    """TUNNELS with the SAs of SOON_REQID reaching their soft lifetime first."""
    snap, owned = tunnels
    def lifetime(record):
        if record.FAMILY != "xfrm_sa":
            return record
        soft = 100 if record.reqid == soon_reqid else 5000
        return dataclasses.replace(record, curlft=dataclasses.replace(record.curlft, add_time=1_000_000),
                                   lifetime=dataclasses.replace(record.lifetime, soft_add_expires_seconds=soft))
    return snap, [(lifetime(r), v) for r, v in owned]


@pytest.mark.parametrize("soon_reqid, first", [(1, "site-a/net"), (2, "site-a6/net6")])
def test_one_connection_at_a_time_the_one_whose_sas_expire_first_goes_first(tunnels, soon_reqid, first):
    # The peer drops the old SAs when INITIAL_CONTACT arrives; an exchange next to another
    # (whose updown script holds charon's bus lock) would stretch the hole that leaves.
    tunnels = _expiring(tunnels, soon_reqid)
    plan = plan_for(tunnels)
    assert _initiations(plan) == [first]
    assert any(w.startswith(f"waiting its turn: {first.split('/')[0]} being established "
                            "(recovery.adopt_initiate_parallel is 1)") for w in _waits(plan))
    second = {"site-a/net", "site-a6/net6"} - {first}
    conn = first.split("/")[0]
    # charon establishes it (CONNECTING): still its turn
    connecting = [ike(conn, "CONNECTING", "192.0.2.2")]
    assert _initiations(plan_for(tunnels, active=connecting, initiated={tuple(first.split("/")): 0.0},
                                 connecting_since={conn: 0.0}, now=5.0)) == []
    # its CHILD_SA is installed: the next one goes
    up = [ike(conn, "ESTABLISHED", "192.0.2.2", children=[(first.split("/")[1], 7, "INSTALLED", 0xC9999999,
                                                            0x00AA0001, [], [])])]
    assert _initiations(plan_for(tunnels, active=up, initiated={tuple(first.split("/")): 0.0}, now=5.0)) == \
        sorted(second)
    # both at once when two places are configured (ordered by expiry)
    assert _initiations(plan_for(tunnels, parallel=2)) == [first] + sorted(second)


@pytest.mark.parametrize("case, active, since, initiated_at, now, next_goes", [
    ("initiated a moment ago, not reported yet (charon queues it)", [], {}, 0.0, 0.5, False),
    ("initiated, failed at once (nothing reported after a second)", [], {}, 0.0, 1.5, True),
    ("being established for 9 s", [("site-a", "CONNECTING")], {"site-a": 0.0}, 0.0, 9.0, False),
    ("being established for 10 s: the peer does not answer, the next goes",
     [("site-a", "CONNECTING")], {"site-a": 0.0}, 0.0, 10.0, True),
    ("charon's own start_action initiation holds a place too", [("site-a", "CONNECTING")], {"site-a": 3.0},
     None, 4.0, False),
    ("charon's own, for 10 s", [("site-a", "CONNECTING")], {"site-a": 3.0}, None, 13.0, True),
    ("a CHILD_SA being created in an established IKE_SA", [("site-a", "ESTABLISHED", "CREATED")], {}, 0.0, 5.0,
     False),
])
def test_a_place_is_held_while_an_exchange_is_under_way_and_at_most_ten_seconds(
        tunnels, case, active, since, initiated_at, now, next_goes):
    tunnels = _expiring(tunnels, 1)          # site-a first, then site-a6
    sas = [ike(a[0], a[1], "192.0.2.2", children=[("net", 7, a[2], 0xC9999999, 0x00AA0001, [], [])] if len(a) > 2
               else ()) for a in active]
    initiated = {} if initiated_at is None else {("site-a", "net"): initiated_at}
    plan = plan_for(tunnels, active=sas, initiated=initiated, connecting_since=since, now=now)
    assert _initiations(plan) == (["site-a6/net6"] if next_goes else []), case
    if active and not next_goes:
        assert any(w.startswith("waiting its turn: site-a being established") for w in _waits(plan)), case


@pytest.mark.parametrize("case, started, grace, last_initiated, queued, deadline", [
    ("nothing initiated: grace from charon being ready", 100.0, 60.0, None, 0, 160.0),
    ("an initiation restarts the grace", 100.0, 60.0, 130.0, 0, 190.0),
    ("an initiation before charon was ready counts from ready", 100.0, 60.0, 90.0, 0, 160.0),
    ("initiations waiting their turn hold the grace", 100.0, 60.0, 130.0, 1, float("inf")),
    ("... however many, however short the grace", 100.0, 5.0, None, 199, float("inf")),
    ("the queue drained with the last initiation: grace from it", 100.0, 5.0, 400.0, 0, 405.0),
    ("no grace at all", 100.0, 0.0, None, 0, 100.0),
])
def test_the_grace_period_follows_progress_and_never_ends_while_initiations_are_queued(
        case, started, grace, last_initiated, queued, deadline):
    assert adopt.adopt_deadline(started, grace, last_initiated, queued) == deadline, case


def test_a_passed_deadline_sweeps_nothing_while_initiations_wait_their_turn(tunnels):
    # site-a is being established; site-a6 waits for its place: the deadline (a caller's stale
    # one) has passed, but sweeping now would remove leftovers whose replacement only waits.
    tunnels = _expiring(tunnels, 1)
    connecting = [ike("site-a", "CONNECTING", "192.0.2.2")]
    plan = plan_for(tunnels, active=connecting, initiated={("site-a", "net"): 0.0},
                    connecting_since={"site-a": 0.0}, now=70.0 - 62.0, deadline=1.0)
    assert plan.queued == ("site-a6",)
    assert not [a for a in plan.actions if isinstance(a, (DeleteObject, InstallBlockPolicy))]
    # once nothing waits (parallel 2 gives site-a6 its place at once), a passed deadline sweeps
    plan = plan_for(tunnels, active=connecting, initiated={("site-a", "net"): 0.0, ("site-a6", "net6"): 0.0},
                    connecting_since={"site-a": 0.0}, now=8.0, deadline=1.0)
    assert plan.queued == ()
    assert [a for a in plan.actions if isinstance(a, DeleteObject)]


def test_initiations_come_after_the_clean_up_in_a_step(tunnels):
    plan = plan_for(tunnels, reinstalled=True, active=SITE_A_UP, initiated=frozenset({("site-a", "net")}))
    kinds = [type(a).__name__ for a in plan.actions if not isinstance(a, WaitFor)]
    assert kinds.index("InitiateChild") > max(i for i, k in enumerate(kinds) if k == "DeleteObject")


def test_nothing_is_initiated_when_adopt_initiate_is_off(tunnels):
    assert not [a for a in plan_for(tunnels, initiate=False).actions if isinstance(a, InitiateChild)]


def test_a_static_reqid_drops_the_leftover_updown_copy_and_spis_charon_reports_are_never_deleted(tunnels):
    same_reqid = [ike("site-a", "ESTABLISHED", "192.0.2.2", children=[
        ("net", 1, "INSTALLED", 0xC1234567, 0x00AA0001, ["10.1.0.0/16"], ["10.2.0.0/16"])])]
    # (both initiated already: initiations still waiting their turn would hold the grace)
    plan = plan_for(tunnels, reinstalled=True, active=same_reqid, now=61.0,
                    initiated=frozenset({("site-a", "net"), ("site-a6", "net6")}))
    got = {summary(a): a.reason for a in plan.actions}
    for rule in FW_1:
        # charon's updown inserts the identical rule for that CHILD_SA: the leftover copy goes
        assert "installs its own copy" in got[rule]
    assert got["keep sa 0xc1234567"] == "charon reports SPI c1234567 as its own"
    # that child shares an SPI with the leftovers, so it replaces none of them: the grace decides
    assert got["delete sa 0xbadf00d"] == "recovery.adopt_grace ended and charon did not claim it"


def test_a_virtual_ip_charon_reports_again_is_kept_and_gone_or_foreign_leftovers_are_dropped(tunnels):
    snap, owned = tunnels
    vip = next(a for a in snap.objects["address"] if a.address == "10.99.0.5")
    leftovers = owned + [(vip, Verdict(True, "ledger:daemon", "added by the daemon"))]
    ledger = ledger_after(snap, leftovers)
    route = next(r for r, _ in owned if r.FAMILY == "route")
    rule = next(r for r, _ in owned if r.FAMILY == "rule")
    ledger = apply_events(ledger, [KernelEvent("route", Action.DELETE, route, 0),
                                   KernelEvent("rule", Action.NEW, rule, 999)], frozenset({DAEMON}))
    active = parse_list_sas([ike("site-a", "ESTABLISHED", "192.0.2.2", vips=["10.99.0.5"])])
    plan = plan_adopt(leftovers, ledger=ledger, configured=CONNS, active=active, now=61.0, deadline=60.0)
    got = {summary(a): a.reason for a in plan.actions}
    assert got["keep address 10.99.0.5"] == "charon reports 10.99.0.5 as a virtual IP"
    assert "delete route 10.2.0.0/16" not in got and "keep route 10.2.0.0/16" not in got     # gone
    assert "keep rule inet 220" not in got and "delete rule inet 220" not in got            # someone else's now


def test_the_trap_crash_fixture_is_adopted_without_a_delete(tmp_path):
    snap = fixture("trap-crash")
    owned = decide_ownership(snap.objects).owned()
    reinstalled = [p for p, _ in owned if p.FAMILY == "xfrm_policy"]
    ledger = ledger_after(snap, owned, reinstalled)
    conns = parse_list_conns([conn("test", ["192.0.2.2"], {"net": ("TUNNEL", ["10.1.0.0/16"], ["10.2.0.0/16"])})])
    plan = plan_adopt(owned, ledger=ledger, configured=conns, active=(), now=0.0, deadline=60.0)
    assert {summary(a) for a in plan.actions} == {
        "keep out 10.1.0.0/16>10.2.0.0/16", "keep in 10.2.0.0/16>10.1.0.0/16",
        "keep fwd 10.2.0.0/16>10.1.0.0/16", "keep route 10.2.0.0/16", "keep rule inet 220"}


def test_a_plan_while_no_charon_runs_leaves_everything_and_is_json(tunnels):
    _, owned = tunnels
    plan = adopt.plan_wait(owned, "adopt: left in place")
    assert len(plan) == len(owned) and all(isinstance(a, WaitFor) for a in plan.actions)
    doc = plan.to_json()
    assert doc["mode"] == "adopt" and {a["kind"] for a in doc["actions"]} == {"wait"}
    assert plan.lines()[0].startswith("   1. leave SAD entry spi=0xc1234567")


def test_adopt_plans_are_json_safe(tunnels):
    import json
    plan = plan_for(tunnels, reinstalled=True, active=SITE_A_UP, now=61.0)
    doc = json.loads(json.dumps(plan.to_json()))
    assert {a["kind"] for a in doc["actions"]} >= {"keep", "delete", "install-block"}
    init = plan_for(tunnels).to_json()["actions"]
    assert any(a["kind"] == "initiate" and a["conn"] == "site-a" and a["reqids"] == [1] for a in init)


@pytest.mark.parametrize("now, ended, cpu, wait", [
    (10.0, None, 0.0, 0.0),          # the first step: at once
    (10.0, 10.0, 0.002, 0.008),      # a 2 ms step (a small lab): the next 8 ms later, unnoticeable
    (10.0, 9.0, 0.5, 1.0),           # a 0.5 s step: the next no sooner than 2 s after it ended
    (12.0, 9.0, 0.5, 0.0),           # that time has passed
])
def test_adoption_steps_are_paced_by_their_own_cpu_time(now, ended, cpu, wait):
    assert adopt.step_wait(now, ended, cpu) == pytest.approx(wait)
