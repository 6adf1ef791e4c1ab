"""Recovery plans from snapshot fixtures (pure, table tests), block policies, and when blocks go.

The fixtures in tests/fixtures/snapshots/ were read from real namespaces by
make_snapshots.py (SAs are synthetic: this kernel has no ESP); its docstring
lists the charon priorities used.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket

import pytest

from supervisor.kernel import xfrm
from supervisor.kernel.xfrm import XfrmPolicy, XfrmSelector, XfrmTemplate
from supervisor.ledger import HOW_ADDED, OWNER_DAEMON, OWNER_FOREIGN, Ledger, LedgerEntry
from supervisor.ownership import SUPERVISOR_BLOCK_UID, decide_ownership, is_supervisor_block
from supervisor.reconcile import (DeleteObject, InstallBlockPolicy, Keep, Plan, RemoveBlockPolicy,
                                  block_policy_for, blocks_to_remove, covered_key, needs_block,
                                  plan_flush, plan_keep)
from supervisor.snapshot import load_snapshot

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "snapshots")
DIRS = {0: "in", 1: "out", 2: "fwd"}


def fixture(name: str):
    return load_snapshot(os.path.join(FIXTURES, f"{name}.json"))


def short(record) -> str:
    """A compact name for a record, for table rows."""
    family = record.FAMILY
    if family == "xfrm_policy":
        s = record.selector
        return f"{DIRS[record.dir]} {s.saddr}/{s.prefixlen_s}>{s.daddr}/{s.prefixlen_d}"
    if family == "xfrm_sa":
        return f"sa {record.spi:#x}"
    if family == "route":
        return f"route {record.dst}/{record.dst_len}"
    if family == "rule":
        return f"rule {record.family} {record.priority}"
    if family == "address":
        return f"address {record.address}"
    return f"fw {record.backend} {record.chain} {record.updown.direction} {record.updown.reqid}"


def summary(action) -> str:
    if isinstance(action, InstallBlockPolicy):
        return f"block {short(action.covers)} @{action.block.priority}"
    if isinstance(action, RemoveBlockPolicy):
        return f"unblock {short(action.block)}"
    if isinstance(action, Keep):
        return f"keep {short(action.record)}"
    return f"delete {short(action.record)}"


TRAP_DELETES = {"delete in 10.2.0.0/16>10.1.0.0/16", "delete out 10.1.0.0/16>10.2.0.0/16",
                "delete fwd 10.2.0.0/16>10.1.0.0/16", "delete route 10.2.0.0/16", "delete rule inet 220"}
TRAP_BLOCKS = {"block out 10.1.0.0/16>10.2.0.0/16 @383615", "block fwd 10.2.0.0/16>10.1.0.0/16 @383615"}

TUNNEL_BLOCKS = {
    "block out 10.1.0.0/16>10.2.0.0/16 @383614", "block fwd 10.2.0.0/16>10.1.0.0/16 @383614",
    "block out fd00:1::/64>fd00:2::/64 @334462", "block fwd fd00:2::/64>fd00:1::/64 @334462",
    "block out 10.1.0.0/16>10.66.0.0/16 @183614",          # charon's drop shunt must stay closed
}
TUNNEL_DELETES = {
    "delete sa 0xc1234567", "delete sa 0xbadf00d", "delete sa 0x1234", "delete sa 0xc7654321",
    "delete sa 0xc0ffee", "delete sa 0xcabba6e5", "delete sa 0xbeef",
    "delete out 10.1.0.0/16>10.2.0.0/16", "delete in 10.2.0.0/16>10.1.0.0/16",
    "delete fwd 10.2.0.0/16>10.1.0.0/16", "delete out fd00:1::/64>fd00:2::/64",
    "delete in fd00:2::/64>fd00:1::/64", "delete fwd fd00:2::/64>fd00:1::/64",
    "delete out 10.1.0.0/16>192.168.0.0/24", "delete out 10.1.0.0/16>10.66.0.0/16",
    "delete out 10.1.0.0/16>10.3.0.0/16",
    "delete fw iptables-nft INPUT in 1", "delete fw iptables-nft OUTPUT out 1",
    "delete fw iptables-nft FORWARD in 1", "delete fw iptables-nft FORWARD out 1",
    "delete fw ip6tables-nft INPUT in 2", "delete fw ip6tables-nft OUTPUT out 2",
    "delete fw ip6tables-nft FORWARD in 2", "delete fw ip6tables-nft FORWARD out 2",
    "delete route 10.2.0.0/16", "delete route fd00:2::/64", "delete rule inet 220", "delete rule inet6 220",
}


@pytest.mark.parametrize("name, fail_closed, vips, expected, foreign", [
    ("trap-crash", True, (), TRAP_BLOCKS | TRAP_DELETES, 11),
    ("trap-crash", False, (), TRAP_DELETES, 11),
    ("tunnels-crash", True, (), TUNNEL_BLOCKS | TUNNEL_DELETES, 19),
    ("tunnels-crash", False, (), TUNNEL_DELETES | {"unblock out 10.1.0.0/16>10.3.0.0/16"}, 19),
    ("tunnels-crash", True, ("10.99.0.5",), TUNNEL_BLOCKS | TUNNEL_DELETES | {"delete address 10.99.0.5"}, 18),
    ("foreign-only", True, (), set(), 13),
    ("foreign-only", False, (), set(), 13),
])
def test_flush_plan_from_snapshot(name, fail_closed, vips, expected, foreign):
    snap = fixture(name)
    plan = plan_flush(snap, decide_ownership(snap.objects, virtual_ips=vips), fail_closed)
    got = [summary(a) for a in plan.actions]
    assert len(got) == len(set(got)), "an action appears twice"
    assert set(got) == expected
    assert plan.foreign == foreign and plan.fail_closed is fail_closed and plan.mode == "flush"


@pytest.mark.parametrize("name", ["trap-crash", "tunnels-crash"])
def test_flush_order_is_blocks_then_sas_policies_firewall_routes_rules_addresses(name):
    snap = fixture(name)
    plan = plan_flush(snap, decide_ownership(snap.objects, virtual_ips=["10.99.0.5"]), True)
    rank = {"install-block": 0, "xfrm_sa": 1, "xfrm_policy": 2, "firewall": 3, "route": 4, "rule": 5,
            "address": 6, "remove-block": 7}
    ranks = [rank[a.KIND] if not isinstance(a, DeleteObject) else rank[a.record.FAMILY] for a in plan.actions]
    assert ranks == sorted(ranks)


def test_each_covered_policy_delete_waits_for_its_own_block():
    snap = fixture("tunnels-crash")
    plan = plan_flush(snap, decide_ownership(snap.objects), True)
    for action in plan.actions:
        if isinstance(action, DeleteObject) and action.record.FAMILY == "xfrm_policy":
            if needs_block(action.record) and short(action.record) != "out 10.1.0.0/16>10.3.0.0/16":
                [i] = action.after
                assert plan.actions[i].covers == action.record
            else:
                # pass shunts and inbound policies need none; 10.3 has an earlier flush's block
                assert action.after == ()


def test_every_action_names_the_rule_that_made_its_object_charons():
    snap = fixture("tunnels-crash")
    plan = plan_flush(snap, decide_ownership(snap.objects), True)
    rules = {summary(a): a.rule for a in plan.actions}
    assert rules["delete sa 0xc1234567"] == "marker:spi-range"
    assert rules["delete sa 0xbeef"] == "marker:reqid"
    assert rules["delete fw iptables-nft INPUT in 1"] == "marker:updown-reqid"
    assert rules["block out 10.1.0.0/16>10.2.0.0/16 @383614"] == "marker:priority-band"
    assert all(a.reason for a in plan.actions)
    text = "\n".join(plan.lines())
    assert "[marker:spi-range: inbound SPI 0xc1234567 in charon's range" in text
    json.dumps(plan.to_json())          # JSON-safe, for --json and crash reports


def test_ledger_verdicts_flow_into_the_plan():
    snap = fixture("trap-crash")
    out = next(p for p in snap.objects["xfrm_policy"] if short(p) == "out 10.1.0.0/16>10.2.0.0/16")
    fwd = next(p for p in snap.objects["xfrm_policy"] if short(p) == "fwd 10.2.0.0/16>10.1.0.0/16")
    ledger = Ledger(None, None, 0.0, entries={"xfrm_policy": {
        out.key(): LedgerEntry(OWNER_DAEMON, HOW_ADDED, 99, out),
        fwd.key(): LedgerEntry(OWNER_FOREIGN, HOW_ADDED, 0, fwd)}})
    plan = plan_flush(snap, decide_ownership(snap.objects, ledger=ledger), True)
    by = {summary(a): a for a in plan.actions}
    assert by["delete out 10.1.0.0/16>10.2.0.0/16"].rule == "ledger:daemon"
    assert "delete fwd 10.2.0.0/16>10.1.0.0/16" not in by
    assert "block fwd 10.2.0.0/16>10.1.0.0/16 @383615" not in by
    assert by["delete in 10.2.0.0/16>10.1.0.0/16"].rule == "marker:priority-band"


def test_keep_plan_lists_every_owned_object_and_changes_nothing():
    snap = fixture("tunnels-crash")
    plan = plan_keep(snap, decide_ownership(snap.objects))
    assert {summary(a) for a in plan.actions} == {s.replace("delete", "keep") for s in TUNNEL_DELETES}
    assert all(isinstance(a, Keep) and a.reason.startswith("recovery mode keep") for a in plan.actions)
    assert plan.mode == "keep" and plan.foreign == 19      # our own block is not counted as foreign


def test_objects_without_a_verdict_are_left_alone():
    snap = fixture("trap-crash")
    judged = decide_ownership({"route": snap.objects["route"]})
    plan = plan_flush(snap, judged, True)
    assert [summary(a) for a in plan.actions] == ["delete route 10.2.0.0/16"]


# --- block policies ---------------------------------------------------------------------

SEL = XfrmSelector(socket.AF_INET, "10.1.0.0", 16, "10.2.0.0", 16, proto=6, dport=443, dport_mask=0xFFFF,
                   ifindex=3)
TMPL = (XfrmTemplate(socket.AF_INET, "192.0.2.1", "192.0.2.2", reqid=1, mode=xfrm.MODE_TUNNEL),)


def leftover(**kw) -> XfrmPolicy:
    base = dict(selector=SEL, dir=xfrm.DIR_OUT, priority=383615, index=17, templates=TMPL,
                mark=(0x10, 0xFF), if_id=7, attrs=((xfrm.XFRMA_SEC_CTX, b"ctx"), (99, b"other")))
    base.update(kw)
    return XfrmPolicy(**base)


def test_block_covers_the_same_traffic_under_a_key_of_its_own():
    p = leftover()
    b = block_policy_for(p)
    assert b.selector == dataclasses.replace(SEL, user=SUPERVISOR_BLOCK_UID)
    assert (b.dir, b.mark, b.if_id, b.ptype) == (p.dir, p.mark, p.if_id, p.ptype)
    assert (b.action, b.priority, b.templates, b.index) == (xfrm.ACTION_BLOCK, 383614, (), 0)
    assert b.attrs == ((xfrm.XFRMA_SEC_CTX, b"ctx"),)          # the context restricts matching: kept
    assert b.key() != p.key() and covered_key(b) == p.key()
    assert is_supervisor_block(b) and not is_supervisor_block(p)
    assert block_policy_for(leftover(priority=0)).priority == 0


@pytest.mark.parametrize("policy, needed", [
    (leftover(), True),
    (leftover(dir=xfrm.DIR_FWD), True),
    (leftover(dir=xfrm.DIR_IN), False),
    (leftover(templates=(), action=xfrm.ACTION_BLOCK), True),     # drop shunt
    (leftover(templates=()), False),                                # pass shunt
    (leftover(dir=4), False),                                       # per-socket
])
def test_which_leftovers_need_a_block(policy, needed):
    assert needs_block(policy) is needed


def current(**kw) -> XfrmPolicy:
    return leftover(index=kw.pop("index", 500), **kw)


BLOCK = block_policy_for(leftover())


@pytest.mark.parametrize("policies, now, leftovers, expected", [
    ([], 1.0, frozenset(), None),
    ([current()], 1.0, frozenset(), "charon installed"),
    ([current(priority=383616)], 1.0, frozenset(), "charon installed"),     # a trap, say
    ([], 10.0, frozenset(), "timeout"),
    ([current(index=17)], 1.0, frozenset({17}), None),                      # the leftover whose delete failed
    ([current(index=17)], 10.0, frozenset({17}), "timeout"),
    ([current(mark=(0x20, 0xFF))], 1.0, frozenset(), None),                 # other traffic
    ([current(if_id=8)], 1.0, frozenset(), None),
    ([current(selector=dataclasses.replace(SEL, dport=80))], 1.0, frozenset(), None),
    ([current(dir=xfrm.DIR_FWD)], 1.0, frozenset(), None),
    ([BLOCK], 1.0, frozenset(), None),                                       # itself
])
def test_blocks_go_when_charon_reinstalled_the_selector_or_at_the_deadline(policies, now, leftovers, expected):
    result = blocks_to_remove([BLOCK], [BLOCK, *policies], now=now, deadline=5.0, leftover_indexes=leftovers)
    if expected is None:
        assert result == ()
    else:
        [action] = result
        assert action.block == BLOCK and expected in action.reason


def test_blocks_to_remove_ignores_policies_that_are_not_our_blocks():
    assert blocks_to_remove([leftover()], [current()], now=10.0, deadline=5.0) == ()


def test_plan_lines_and_len():
    plan = Plan("flush", (RemoveBlockPolicy(BLOCK, "because"),))
    assert len(plan) == 1
    assert plan.lines()[0].startswith("   1. remove block SPD entry src=10.1.0.0/16")
    assert plan.lines()[0].endswith("[supervisor-block: because]")


def test_blocks_still_wanted_by_a_configured_child_outlive_the_timeout():
    """Past the deadline a block goes only when no configured child wants its traffic."""
    from supervisor.kernel.xfrm import DIR_OUT, XfrmPolicy, XfrmSelector
    from supervisor.reconcile import block_policy_for, blocks_to_remove

    def leftover(dst: str) -> XfrmPolicy:
        return XfrmPolicy(selector=XfrmSelector(family=2, saddr="10.1.0.0", prefixlen_s=16, daddr=dst,
                                                prefixlen_d=16), dir=DIR_OUT, priority=375423)

    wanted, unwanted = block_policy_for(leftover("10.2.0.0")), block_policy_for(leftover("10.3.0.0"))
    hold = {wanted.key(): "home/net"}
    assert blocks_to_remove([wanted, unwanted], [], now=5.0, deadline=10.0, hold=hold) == ()
    removed = blocks_to_remove([wanted, unwanted], [], now=10.0, deadline=10.0, hold=hold)
    assert [r.block for r in removed] == [unwanted]
    # charon re-installing the policy still releases a held block at once
    removed = blocks_to_remove([wanted], [leftover("10.2.0.0")], now=0.0, deadline=10.0, hold=hold)
    assert [r.block for r in removed] == [wanted]



def test_a_large_batch_is_logged_as_one_line_naming_what_and_by_which_rule():
    from types import SimpleNamespace
    from supervisor.reconcile import describe_batch
    pol = SimpleNamespace(FAMILY="xfrm_policy", describe=lambda: "policy")
    route = SimpleNamespace(FAMILY="route", describe=lambda: "route")
    actions = [DeleteObject(pol, "ledger:daemon", "why")] * 3 + [DeleteObject(route, "marker:table", "why")]
    assert describe_batch(actions) == ("deleting 3 xfrm_policy, 1 route (one batch; charon's by ledger:daemon 3, "
                                       "marker:table 1)")
    assert describe_batch([InstallBlockPolicy(pol, pol, "r", "w")] * 2).startswith("installing 2 fail-closed")
