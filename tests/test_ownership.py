"""Ownership: the marker rules per family (tables), the bands from charon's formula, the ledger first."""

from __future__ import annotations

import dataclasses
import socket

import pytest

from supervisor.kernel import xfrm
from supervisor.kernel.firewall import iptables_rule
from supervisor.kernel.addresses import Address
from supervisor.kernel.routes import Route
from supervisor.kernel.rules import Rule
from supervisor.kernel.xfrm import XfrmPolicy, XfrmSA, XfrmSelector, XfrmTemplate
from supervisor.ledger import HOW_ADDED, HOW_BASELINE, OWNER_DAEMON, OWNER_FOREIGN, Ledger, LedgerEntry
from supervisor import ownership as own
from supervisor.ownership import (MarkerConfig, PriorityBand, Verdict, charon_priorities,
                                  charon_priority_bands, classify_address, classify_firewall_rule,
                                  classify_policy, classify_route, classify_rule, classify_sa,
                                  decide_ownership)

V4 = socket.AF_INET
V6 = socket.AF_INET6


def sel(src="10.1.0.0/16", dst="10.2.0.0/16", family=V4, **kw) -> XfrmSelector:
    s, sl = src.split("/")
    d, dl = dst.split("/")
    return XfrmSelector(family, s, int(sl), d, int(dl), **kw)


def policy(priority, dir=xfrm.DIR_OUT, reqid=1, action=xfrm.ACTION_ALLOW, selector=None, **kw) -> XfrmPolicy:
    tmpl = (XfrmTemplate(V4, "192.0.2.1", "192.0.2.2", reqid=reqid, mode=xfrm.MODE_TUNNEL),) if reqid else ()
    return XfrmPolicy(selector or sel(), dir, action=action, priority=priority, templates=tmpl, **kw)


def sa(spi, reqid=0, proto=xfrm.IPPROTO_ESP) -> XfrmSA:
    return XfrmSA(V4, "192.0.2.1", spi, proto, "192.0.2.2", reqid=reqid)


def route(table=220, protocol=4, dst="10.2.0.0") -> Route:
    return Route("inet", table, dst, 16, protocol=protocol, gateway="192.0.2.2", oif=2, oif_name="veth0")


UPDOWN = ("-s 10.2.0.0/16 -d 10.1.0.0/16 -i veth0 -m policy --dir in --pol ipsec "
          "--reqid {} --proto esp -j ACCEPT")


# --- charon's priority formula ----------------------------------------------------

def test_bands_follow_charons_formula_for_the_default_base():
    assert charon_priority_bands() == (
        PriorityBand("pass", 68541, 199999),
        PriorityBand("ipsec", 268541, 400000),
        PriorityBand("fallback", 468541, 599999),
    )


def test_bands_scale_with_a_configured_base():
    bands = MarkerConfig(priority_base=300000).bands()
    assert [(b.low, b.high) for b in bands] == [(168541, 299999), (468541, 600000), (768541, 899999)]


@pytest.mark.parametrize("selector, priority, case", [
    (sel(), 383615, "ipsec"),                                    # /16 + /16: 32 bits * 512
    (sel(), 383616, "trap"),                                     # traps skip the final -1
    (sel(), 183615, "pass"),
    (sel(), 583615, "fallback"),
    (sel(), 383613, "ipsec on an interface"),
    (sel("fd00:1::/64", "fd00:2::/64", V6), 334463, "ipsec"),    # 128 bits * 512
    (sel("10.0.0.1/32", "10.0.0.2/32", proto=17, dport=53, dport_mask=0xFFFF), 366911, "ipsec"),
    (sel("0.0.0.0/0", "0.0.0.0/0"), 399999, "ipsec"),
    (sel("::/0", "::/0", V6, proto=6, sport=1, sport_mask=0xFFFF, dport=2, dport_mask=0xFFFF), 399615,
     "ipsec"),
])
def test_charon_priorities_name_the_case_that_gives_each_value(selector, priority, case):
    assert charon_priorities(selector)[priority] == case


@pytest.mark.parametrize("selector", [
    sel(), sel("fd00:1::/64", "fd00:2::/64", V6), sel("0.0.0.0/0", "10.0.0.0/8"),
    sel("10.0.0.1/32", "10.0.0.2/32", proto=17, sport=500, sport_mask=0xFFFF, dport=0, dport_mask=0xFF00),
    sel("fd00::1/128", "fd00::2/128", V6, proto=6, sport=1, sport_mask=0xFFFF, dport=2, dport_mask=0xFFFF),
])
def test_the_fast_formula_check_agrees_with_the_full_table(selector):
    table = charon_priorities(selector)
    assert len(table) == 8              # 3 classes x (plain, on an interface), plus 2 trap values
    for priority in {p + d for p in table for d in range(-5, 6)}:
        assert own.formula_case(selector, priority) == table.get(priority), priority
    for priority in range(0, 700000, 997):
        assert own.formula_case(selector, priority) == table.get(priority), priority


def test_the_most_specific_selector_reaches_the_bottom_of_each_band():
    s = sel("fd00::1/128", "fd00::2/128", V6, proto=17, sport=500, sport_mask=0xFFFF,
            dport=500, dport_mask=0xFFFF)
    values = charon_priorities(s)
    assert min(values) == 68541 and values[68541] == "pass on an interface"
    assert 268541 in values and 468541 in values


# --- policies -----------------------------------------------------------------------

@pytest.mark.parametrize("p, owned, rule, words", [
    (policy(383615), True, own.RULE_PRIORITY_BAND, "computes for this selector: ipsec"),
    (policy(383616), True, own.RULE_PRIORITY_BAND, "selector: trap"),
    (policy(375423), True, own.RULE_PRIORITY_BAND, "ipsec band 268541..400000"),
    (policy(179519, reqid=0, selector=sel("10.1.0.0/16", "192.168.0.0/24")), True,
     own.RULE_PRIORITY_BAND, "pass band"),
    (policy(183615, reqid=0, action=xfrm.ACTION_BLOCK), True, own.RULE_PRIORITY_BAND, "pass band"),
    (policy(599999), True, own.RULE_PRIORITY_BAND, "fallback band"),
    (policy(1000), False, own.RULE_NO_MARKER, "outside"),
    (policy(250000), False, own.RULE_NO_MARKER, "outside"),       # between the pass and ipsec bands
    (policy(68540), False, own.RULE_NO_MARKER, "outside"),
    (policy(400001), False, own.RULE_NO_MARKER, "outside"),
    (policy(0, dir=4, reqid=0), False, own.RULE_PER_SOCKET, "socket"),
    (policy(383615, dir=3), False, own.RULE_PER_SOCKET, "socket"),      # even inside a band
    (dataclasses.replace(policy(383614, reqid=0, action=xfrm.ACTION_BLOCK),
                         selector=sel(user=own.SUPERVISOR_BLOCK_UID)),
     False, own.RULE_SUPERVISOR_BLOCK, "ipsec-supervisor"),
])
def test_policy_markers(p, owned, rule, words):
    v = classify_policy(p)
    assert (v.owned, v.rule) == (owned, rule)
    assert words in v.detail


def test_exact_priority_mode_refuses_in_band_values_the_formula_never_gives():
    strict = MarkerConfig(exact_priority=True)
    assert classify_policy(policy(383615), strict).owned
    v = classify_policy(policy(375423), strict)
    assert not v.owned and "not the value charon computes" in v.detail


def test_configured_bands_replace_the_derived_ones():
    cfg = MarkerConfig(priority_bands=(PriorityBand("custom", 10, 20),))
    assert classify_policy(policy(15), cfg).owned
    assert not classify_policy(policy(383615), cfg).owned


@pytest.mark.parametrize("kw, message", [
    ({"spi_min": 5, "spi_max": 4}, "spi_min..spi_max"),
    ({"spi_max": 2**32}, "spi_min..spi_max"),
    ({"priority_base": 1000}, "priority_base must exceed"),
    ({"priority_bands": (PriorityBand("x", 5, 1),)}, "empty"),
])
def test_marker_config_rejects_impossible_values(kw, message):
    with pytest.raises(ValueError, match=message):
        MarkerConfig(**kw)


# --- SAs ------------------------------------------------------------------------------

@pytest.mark.parametrize("record, reqids, owned, rule", [
    (sa(0xC0000000), frozenset(), True, own.RULE_SPI_RANGE),
    (sa(0xCFFFFFFF), frozenset(), True, own.RULE_SPI_RANGE),
    (sa(0xC1234567, reqid=7), frozenset(), True, own.RULE_SPI_RANGE),
    (sa(0xBFFFFFFF), frozenset(), False, own.RULE_NO_MARKER),
    (sa(0xD0000000), frozenset(), False, own.RULE_NO_MARKER),
    (sa(0x0BADF00D, reqid=1), frozenset({1}), True, own.RULE_REQID),        # outbound: peer's SPI
    (sa(0x0BADF00D, reqid=2), frozenset({1}), False, own.RULE_NO_MARKER),
    (sa(0x0BADF00D, reqid=0), frozenset({0, 1}), False, own.RULE_NO_MARKER),  # 0 is "no reqid"
    # IPComp CPIs are 16-bit: never judged by the SPI range, only by reqid.
    (sa(0xC0001234, proto=xfrm.IPPROTO_COMP), frozenset(), False, own.RULE_NO_MARKER),
    (sa(0x1234, reqid=1, proto=xfrm.IPPROTO_COMP), frozenset({1}), True, own.RULE_REQID),
])
def test_sa_markers(record, reqids, owned, rule):
    v = classify_sa(record, reqids)
    assert (v.owned, v.rule) == (owned, rule)


def test_spi_range_is_configurable():
    cfg = MarkerConfig(spi_min=0x1000, spi_max=0x1FFF)
    assert classify_sa(sa(0x1800), frozenset(), cfg).owned
    assert not classify_sa(sa(0xC1234567), frozenset(), cfg).owned


# --- routes, rules, addresses, firewall --------------------------------------------------

@pytest.mark.parametrize("record, owned, words", [
    (route(), True, "table 220 with protocol static"),
    (route(protocol=3), False, "protocol boot"),
    (route(table=100), False, "table 100"),
])
def test_route_markers(record, owned, words):
    v = classify_route(record)
    assert v.owned is owned and words in v.detail


def test_route_markers_follow_a_configured_table_and_protocol():
    cfg = MarkerConfig(route_table=100, route_protocol=3)
    assert classify_route(route(table=100, protocol=3), cfg).owned
    assert not classify_route(route(), cfg).owned


@pytest.mark.parametrize("record, owned", [
    (Rule("inet", 220, table=220), True),
    (Rule("inet6", 220, table=220), True),
    (Rule("inet", 220, table=220, fwmark=0x1, fwmask=0x1, flags=2), True),   # "not fwmark" variant
    (Rule("inet", 220, table=100), False),
    (Rule("inet", 221, table=220), False),
    (Rule("inet", 220, action=6), False),                                    # blackhole
])
def test_rule_markers(record, owned):
    assert classify_rule(record).owned is owned


def test_addresses_are_never_claimed_by_markers_alone():
    vip = Address("inet", "10.99.0.5", 32, 1, "lo")
    v = classify_address(vip)
    assert not v.owned and "ledger evidence or a recorded virtual IP" in v.detail
    v = classify_address(vip, frozenset({"10.99.0.5"}))
    assert (v.owned, v.rule) == (True, own.RULE_VIRTUAL_IP)


@pytest.mark.parametrize("spec, reqids, owned, words", [
    (UPDOWN.format(1), frozenset({1}), True, "reqid 1"),
    (UPDOWN.format(1), frozenset({2}), False, "reqid 1 is not charon's"),
    (UPDOWN.format(1).replace("-j ACCEPT", "-m comment --comment mine -j ACCEPT"), frozenset({1}),
     False, "not shaped like an updown rule"),
    ("-s 192.0.2.0/24 -j ACCEPT", frozenset({1}), False, "not shaped"),
])
def test_firewall_markers(spec, reqids, owned, words):
    rule = iptables_rule("iptables-nft", "filter", "INPUT", spec)
    v = classify_firewall_rule(rule, reqids)
    assert v.owned is owned and words in v.detail


# --- the whole state ----------------------------------------------------------------------

def test_reqids_chain_from_policies_and_inbound_sas_to_sas_and_updown_rules():
    objects = {
        "xfrm_policy": (policy(383615, reqid=1), policy(1000, reqid=9, selector=sel("10.7.0.0/16", "10.8.0.0/16"))),
        "xfrm_sa": (sa(0x0BADF00D, reqid=1), sa(0xC0000042, reqid=42), sa(0x0000BEEF, reqid=42),
                    sa(0x00000009, reqid=9)),
        "firewall": tuple(iptables_rule("iptables-nft", "filter", "INPUT", UPDOWN.format(r)) for r in (1, 42, 9)),
    }
    result = decide_ownership(objects)
    assert result.owned_reqids == {1, 42}
    assert [v.owned for _, v in result.verdicts["xfrm_sa"]] == [True, True, True, False]
    assert [v.rule for _, v in result.verdicts["xfrm_sa"]][:3] == [own.RULE_REQID, own.RULE_SPI_RANGE,
                                                                   own.RULE_REQID]
    assert [v.owned for _, v in result.verdicts["firewall"]] == [True, True, False]
    assert result.counts()["xfrm_sa"] == {"owned": 3, "foreign": 1}


def ledger_with(*entries: tuple[object, str, str]) -> Ledger:
    tables: dict = {}
    for record, owner, how in entries:
        tables.setdefault(record.FAMILY, {})[record.key()] = LedgerEntry(owner, how, 77, record)
    return Ledger(daemon_pid=1, netns_inode=1, started=0.0, entries=tables,
                  reqids=frozenset({5}))


def test_the_ledger_decides_before_the_markers():
    lookalike = policy(383615, reqid=1)                    # in charon's band, but the ledger saw ip add it
    theirs = policy(1000, reqid=5, selector=sel("10.5.0.0/16", "10.6.0.0/16"))   # outside, but "charon's"
    table220 = route()
    vip = Address("inet", "10.99.0.5", 32, 1, "lo")
    unknown = policy(383615, reqid=3, selector=sel("10.3.0.0/16", "10.4.0.0/16"))
    ledger = ledger_with((lookalike, OWNER_FOREIGN, HOW_ADDED), (theirs, OWNER_DAEMON, HOW_ADDED),
                         (table220, OWNER_FOREIGN, HOW_BASELINE), (vip, OWNER_DAEMON, HOW_ADDED))
    result = decide_ownership({"xfrm_policy": (lookalike, theirs, unknown), "route": (table220,),
                               "address": (vip,), "xfrm_sa": (sa(0x1, reqid=5),),
                               "firewall": (iptables_rule("iptables-nft", "filter", "INPUT", UPDOWN.format(5)),)},
                              ledger=ledger)
    v = {r.key(): v for fam in result.verdicts.values() for r, v in fam}
    assert v[lookalike.key()] == Verdict(False, own.RULE_LEDGER_FOREIGN,
                                         "added by another process (netlink port 77) while the daemon ran")
    # charon's by port id alone (which the sender writes): recorded, but never deleted (deletion_hold)
    assert v[theirs.key()].owned and v[theirs.key()].rule == own.RULE_LEDGER_PORT_ONLY
    assert v[unknown.key()].rule == own.RULE_PRIORITY_BAND          # unattributed: markers
    assert v[table220.key()] == Verdict(False, own.RULE_LEDGER_BASELINE, "present before the daemon started")
    assert v[vip.key()].owned
    # reqid 5 comes from the ledger (its reqids and charon's policy): the SA and updown rule follow
    assert [x.owned for _, x in result.verdicts["xfrm_sa"]] == [True]
    assert [x.owned for _, x in result.verdicts["firewall"]] == [True]


def test_per_socket_policies_and_our_blocks_are_never_charons_even_if_a_ledger_says_so():
    sock = policy(0, dir=4, reqid=0)
    block = dataclasses.replace(policy(383614, reqid=0, action=xfrm.ACTION_BLOCK),
                                selector=sel(user=own.SUPERVISOR_BLOCK_UID))
    ledger = ledger_with((sock, OWNER_DAEMON, HOW_ADDED), (block, OWNER_DAEMON, HOW_ADDED))
    result = decide_ownership({"xfrm_policy": (sock, block)}, ledger=ledger)
    assert [(v.owned, v.rule) for _, v in result.verdicts["xfrm_policy"]] == [
        (False, own.RULE_PER_SOCKET), (False, own.RULE_SUPERVISOR_BLOCK)]


def test_verdict_of_finds_records_by_family_and_key():
    p = policy(383615)
    result = decide_ownership({"xfrm_policy": (p,)})
    moved = dataclasses.replace(p, index=999)        # the index is not part of the identity
    assert result.verdict_of(moved).owned
    assert result.verdict_of(route()) is None


def test_the_snapshots_owned_rows_are_the_verdicts_in_order_whether_or_not_the_state_judged_is_the_one_written():
    from types import SimpleNamespace

    from supervisor.crash_snapshots import ownership_context
    objects = {"xfrm_policy": (policy(383615), policy(1000, selector=sel("10.7.0.0/16")),
                               policy(383615, dir=xfrm.DIR_IN)),
               "route": (route(), route(protocol=3))}
    judged = own.decide_ownership(objects, MarkerConfig())
    rows = ownership_context(judged, SimpleNamespace(objects=objects))
    assert rows["xfrm_policy"] == [[0, own.RULE_PRIORITY_BAND], [2, own.RULE_PRIORITY_BAND]]
    assert [i for i, _ in rows["route"]] == [0]
    assert judged._by_id == {}                      # no lookup table was needed for that
    # equal records that are other objects (a state re-read) are found by key instead
    copies = {f: tuple(dataclasses.replace(r) for r in recs) for f, recs in objects.items()}
    assert ownership_context(judged, SimpleNamespace(objects=copies)) == rows
