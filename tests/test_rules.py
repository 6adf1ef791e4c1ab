"""Routing rules: dump compared field by field with iproute2, exact deletes, adds, JSON."""

from __future__ import annotations

import errno
import json

import pytest

from supervisor.errors import KernelError
from supervisor.kernel import rules as rules_mod
from supervisor.kernel.common import DeleteResult
from supervisor.kernel.rtnl import RTM_NEWRULE, Rtnl
from supervisor.kernel.rules import (
    Rule,
    add_rule,
    decide_delete,
    delete_lookup_accepts,
    delete_rule,
    dump_rules,
)

RULES = """
ip link add v0 type veth peer name v2
ip rule add priority 100 from 10.0.0.0/8 to 10.1.0.0/16 iif v0 oif v2 fwmark 0x10/0xff tos 0x10 table 100 proto static
ip rule add priority 101 not from 10.0.0.0/8 lookup main suppress_prefixlength 0
ip rule add priority 102 ipproto tcp sport 1000-2000 dport 443 uidrange 100-200 blackhole
ip rule add priority 103 goto 220
ip rule add priority 104 fwmark 0x5 nop
ip rule add priority 105 realms 3/4 table 5
ip rule add priority 106 iif lo suppress_ifgroup 5 table 6
ip rule add priority 107 tun_id 7 table 7
ip rule add priority 108 l3mdev prohibit
ip rule add priority 109 from 192.0.2.1 to 198.51.100.7 unreachable
ip rule add priority 220 table 220
ip rule add priority 220 fwmark 0x1 table 220
ip rule add priority 221 table 100000
ip -6 rule add priority 220 table 220
ip -6 rule add priority 221 from 2001:db8::/32 to 2001:db8:1::/48 table 221
ip -6 rule add priority 222 unreachable
"""

TABLE_NAMES = {253: "default", 254: "main", 255: "local"}
PROTOCOLS = {0: "unspec", 2: "kernel", 3: "boot", 4: "static"}
IP_PROTOS = {1: "icmp", 6: "tcp", 17: "udp"}

from caps import without_net_admin


def ip_rules(ns, family: str) -> list[dict]:
    return json.loads(ns.run("ip", family, "-d", "-j", "rule", "show").stdout)


def _port(d: dict, word: str, rng: tuple[int, int] | None) -> None:
    if rng is None:
        return
    if rng[0] == rng[1]:
        d[word] = rng[0]
    else:
        d[f"{word}_start"], d[f"{word}_end"] = rng


def as_ip_json(rule: Rule) -> dict:
    """What `ip -d -j rule show` prints for RULE (iproute2 6.1's keys)."""
    host = 32 if rule.family == "inet" else 128
    d: dict = {"priority": rule.priority}
    if rule.flags & 0x2:
        d["not"] = None
    if rule.src is not None:
        d["src"] = rule.src
        if rule.src_len != host:
            d["srclen"] = rule.src_len
    else:
        d["src"] = "all"
    if rule.dst is not None:
        d["dst"] = rule.dst
        if rule.dst_len != host:
            d["dstlen"] = rule.dst_len
    if rule.tos:
        d["tos"] = f"0x{rule.tos:x}"
    if rule.fwmark is not None:
        d["fwmark"] = f"0x{rule.fwmark:x}"
        if rule.fwmask not in (None, 0xFFFFFFFF):
            d["fwmask"] = f"0x{rule.fwmask:x}"
    if rule.iif is not None:
        d["iif"] = rule.iif
    if rule.oif is not None:
        d["oif"] = rule.oif
    if rule.l3mdev:
        d["l3mdev"] = None
    if rule.uid_range is not None:
        d["uid_start"], d["uid_end"] = rule.uid_range
    if rule.ip_proto is not None:
        d["ipproto"] = IP_PROTOS[rule.ip_proto]
    _port(d, "sport", rule.sport_range)
    _port(d, "dport", rule.dport_range)
    if rule.tun_id is not None:
        d["tun_id"] = rule.tun_id
    if rule.table and rule.action == 1:
        d["table"] = TABLE_NAMES.get(rule.table, str(rule.table))
    if rule.suppress_prefixlen is not None:
        d["suppress_prefixlen"] = rule.suppress_prefixlen
    if rule.suppress_ifgroup is not None:
        d["suppress_ifgroup"] = str(rule.suppress_ifgroup)
    if rule.flow is not None:
        d["flow_from"], d["flow_to"] = str(rule.flow >> 16), str(rule.flow & 0xFFFF)
    if rule.action == 2:
        d["goto"] = rule.goto
    elif rule.action == 3:
        d["nop"] = None
    elif rule.action != 1:
        d["action"] = rule.action_name
    d["protocol"] = PROTOCOLS.get(rule.protocol, str(rule.protocol))
    return d


def keys(ns) -> list[tuple]:
    with ns.enter():
        return [r.key() for r in dump_rules()]


@pytest.fixture
def ruled(netns):
    netns.sh(RULES)
    return netns


def test_dump_matches_ip_field_by_field(ruled):
    with ruled.enter():
        rules = dump_rules()
    v4 = [as_ip_json(r) for r in rules if r.family == "inet"]
    v6 = [as_ip_json(r) for r in rules if r.family == "inet6"]
    assert len(v4) == 16 and len(v6) == 5
    assert v4 == ip_rules(ruled, "-4")  # same order too: the dump is the kernel's list order
    assert v6 == ip_rules(ruled, "-6")


def test_dump_by_priority_and_describe(ruled):
    with ruled.enter():
        at_220 = dump_rules(220)
    assert [r.describe() for r in at_220] == [
        "rule 220: from all lookup 220",
        "rule 220: from all fwmark 0x1 lookup 220",
        "rule 220 (IPv6): from all lookup 220",
    ]
    with ruled.enter():
        big = dump_rules(221)
    assert [(r.family, r.table) for r in big] == [("inet", 100000), ("inet6", 221)]


def test_delete_charons_rule_leaves_every_other_rule(ruled):
    before = keys(ruled)
    with ruled.enter():
        ours = dump_rules(220)[0]
        assert delete_rule(ours) is DeleteResult.DELETED
        assert delete_rule(ours) is DeleteResult.ALREADY_GONE
    after = keys(ruled)
    assert set(before) - set(after) == {ours.key()} and set(after) <= set(before)
    assert [e for e in ip_rules(ruled, "-4") if e["priority"] == 220] == [
        {"priority": 220, "src": "all", "fwmark": "0x1", "table": "220", "protocol": "unspec"}]
    assert [e["priority"] for e in ip_rules(ruled, "-6")] == [0, 220, 221, 222, 32766]


def test_gone_rule_never_takes_a_more_specific_lookalike(netns):
    # "from all lookup 220" sent again would match any rule at 220 using table 220.
    netns.sh("ip rule add priority 220 table 220")
    with netns.enter():
        [ours] = dump_rules(220)
        assert delete_rule(ours) is DeleteResult.DELETED
    netns.sh("ip rule add priority 220 from 10.0.0.0/8 table 220")
    with netns.enter():
        assert delete_rule(ours) is DeleteResult.ALREADY_GONE
        assert [r.describe() for r in dump_rules(220)] == ["rule 220: from 10.0.0.0/8 lookup 220"]


def test_lookalike_listed_first_makes_the_delete_refuse(netns):
    # The kernel ignores "not" when it looks a rule up; only a non-exclusive add makes such pairs.
    netns.sh("ip rule add priority 220 not from 10.0.0.0/8 table 220")
    ours = Rule(family="inet", priority=220, table=220, src="10.0.0.0", src_len=8)
    with netns.enter(), Rtnl() as rtnl:
        rtnl.add(rules_mod._rule_msg(ours), RTM_NEWRULE, ours.describe(), append=True)
        first, second = dump_rules(220, rtnl=rtnl)
        assert second == ours
        with pytest.raises(KernelError, match="cannot delete rule 220: from 10.0.0.0/8 lookup 220 "
                                              "exactly.*rule 220: not from 10.0.0.0/8"):
            delete_rule(ours, rtnl=rtnl)
        assert len(dump_rules(220, rtnl=rtnl)) == 2
        assert delete_rule(first, rtnl=rtnl) is DeleteResult.DELETED
        assert delete_rule(ours, rtnl=rtnl) is DeleteResult.DELETED


def test_add_rule_is_seen_by_ip_and_twice_is_eexist(netns):
    rule = Rule(family="inet", priority=220, table=220, protocol=4)
    v6 = Rule(family="inet6", priority=230, table=230, src="2001:db8::", src_len=32,
              fwmark=0x10, fwmask=0xF0, iif="lo")
    with netns.enter():
        add_rule(rule)
        add_rule(v6)
        with pytest.raises(KernelError) as caught:
            add_rule(rule)
    assert caught.value.errno == errno.EEXIST
    assert str(caught.value) == "cannot add rule 220: from all lookup 220: File exists"
    assert [e for e in ip_rules(netns, "-4") if e["priority"] == 220] == [
        {"priority": 220, "src": "all", "table": "220", "protocol": "static"}]
    assert [e for e in ip_rules(netns, "-6") if e["priority"] == 230] == [
        {"priority": 230, "src": "2001:db8::", "srclen": 32, "fwmark": "0x10", "fwmask": "0xf0",
         "iif": "lo", "table": "230", "protocol": "unspec"}]


def test_delete_refused_by_the_kernel_raises_naming_the_rule(ruled):
    with ruled.enter():
        ours = dump_rules(220)[0]
        with without_net_admin(), pytest.raises(KernelError) as caught:
            delete_rule(ours)
    assert str(caught.value) == "cannot delete rule 220: from all lookup 220: Operation not permitted"
    assert caught.value.errno == errno.EPERM
    assert ours.key() in keys(ruled)


def test_json_round_trip_of_every_dumped_rule(ruled):
    with ruled.enter():
        rules = dump_rules()
    for rule in rules:
        assert Rule.from_json(json.loads(json.dumps(rule.to_json()))) == rule


@pytest.mark.parametrize("change, error", [
    ({"family": "ipv4"}, ValueError),
    ({"src": "2001:db8::"}, ValueError),
    ({"src_len": 40}, ValueError),
    ({"priority": -1}, ValueError),
    ({"iif": ""}, TypeError),
    ({"sport_range": [5, 1]}, ValueError),
    ({"uid_range": "1:2"}, TypeError),
    ({"fwmark": 1.5}, TypeError),
])
def test_from_json_rejects_bad_input(change, error):
    good = Rule(family="inet", priority=220, table=220).to_json()
    assert Rule.from_json(good) == Rule(family="inet", priority=220, table=220)
    with pytest.raises(error):
        Rule.from_json({**good, **change})
    with pytest.raises(KeyError):
        Rule.from_json({k: v for k, v in good.items() if k != "priority"})


def rr(**kw) -> Rule:
    return Rule(**{**dict(family="inet", priority=220, table=220), **kw})


@pytest.mark.parametrize("request_, candidate, accepts", [
    (rr(), rr(), True),
    (rr(), rr(src="10.0.0.0", src_len=8), True),          # "from all" matches any source
    (rr(src="10.0.0.0", src_len=8), rr(), False),
    (rr(), rr(fwmark=1, fwmask=0xFFFFFFFF), True),
    (rr(fwmark=1), rr(fwmark=2), False),
    (rr(), rr(priority=221), False),                       # priority is always sent
    (rr(), rr(table=221), False),
    (rr(src="10.0.0.0", src_len=8), rr(src="10.0.0.0", src_len=8, flags=2), True),  # "not" ignored
    (rr(), rr(family="inet6"), False),
    (rr(iif="eth0"), rr(iif="eth1"), False),
    (rr(suppress_prefixlen=0), rr(), False),
    (rr(), rr(suppress_prefixlen=0), True),
    (rr(protocol=4), rr(protocol=0), False),
])
def test_delete_lookup_accepts(request_, candidate, accepts):
    assert delete_lookup_accepts(request_, candidate) is accepts


def test_decide_delete():
    ours, specific = rr(), rr(src="10.0.0.0", src_len=8)
    assert decide_delete(ours, [specific]) is None
    assert decide_delete(ours, [ours, specific]) == ours
    assert decide_delete(specific, [ours, specific]) == specific
    with pytest.raises(KernelError, match="would remove rule 220: from 10.0.0.0/8 lookup 220"):
        decide_delete(ours, [specific, ours])


# --- the struct decoder against pyroute2's (dumps and the monitor bypass pyroute2) ---

def test_struct_decoder_makes_every_rule_exactly_as_pyroute2_decoding_does(ruled):
    from supervisor.kernel import netlink, rtnl as rtnl_mod
    with ruled.enter(), netlink.NetlinkSocket(netlink.NETLINK_ROUTE, strict_check=True) as sock:
        chunks = sock.dump_raw(rtnl_mod.RTM_GETRULE, bytes(12))     # every family
    ours = rules_mod.decode_rules(chunks)
    theirs = []
    for data in chunks:
        for off, _len, msg_type, *_ in netlink.walk_messages(data):
            if msg_type == rtnl_mod.RTM_NEWRULE:
                msg = rtnl_mod.RuleMsg(data, offset=off)
                msg.decode()
                rule = rules_mod.rule_from_msg(msg)
                if rule is not None:
                    theirs.append(rule)
    assert ours == theirs and len(ours) == 21
    for field in ("iif", "oif", "fwmask", "goto", "flow", "suppress_prefixlen", "suppress_ifgroup",
                  "l3mdev", "uid_range", "ip_proto", "sport_range", "dport_range", "tun_id"):
        assert any(getattr(r, field) is not None for r in ours), field


@pytest.mark.parametrize("rule", [
    rules_mod.Rule("inet", 220, table=220),
    rules_mod.Rule("inet6", 220, table=220),
    rules_mod.Rule("inet", 1000, table=300, src="10.0.0.0", src_len=8, dst="10.1.0.0", dst_len=16, iif="eth0",
                   oif="veth1", fwmark=5, fwmask=255, protocol=4, suppress_prefixlen=0, uid_range=(1, 2),
                   ip_proto=17, sport_range=(1, 3), dport_range=(4, 5), tun_id=7, flow=3),
    rules_mod.Rule("inet", 5, table=0, action=2, goto=10),
    rules_mod.Rule("inet6", 7, table=254, l3mdev=1, suppress_ifgroup=3, src="2001:db8::", src_len=32),
])
def test_a_rule_delete_is_encoded_without_pyroute2_byte_for_byte_as_pyroute2_would(rule):
    from supervisor.kernel.rtnl import encode_payload
    assert rules_mod.encode_rule_delete(rule) == bytes(encode_payload(rules_mod._rule_msg(rule)))
