"""Adopt planning at scale: the indexed matching decides exactly as the full scan did.

The reference below is the matching as it was before the index (issue 12): every leftover
CHILD_SA compared with every configured child, selectors read with ``ipaddress``. It lives
here, not in supervisor/, and is compared with ``adopt`` on generated cases: random ones
and adversarial ones (overlapping subnets, /0, ranges, dynamic, ports, IPv6, transport
mode, several children per connection, equal rivals, peers as subnets, ranges and names).
"""

from __future__ import annotations

import ipaddress
import random
import socket
from typing import Sequence

import pytest

from supervisor import adopt
from supervisor.adopt import ConfiguredChild, LeftoverChild, Match, parse_list_conns, parse_list_sas, plan_adopt
from supervisor.kernel import xfrm
from supervisor.kernel.xfrm import XfrmPolicy, XfrmSA, XfrmSelector, XfrmTemplate
from supervisor.ownership import Verdict

V4, V6 = socket.AF_INET, socket.AF_INET6
VERDICT = Verdict(True, "ledger", "test")
LOCAL = frozenset({"192.0.2.1", "2001:db8::1"})


# --- the reference: matching before the index ---------------------------------------------

def ref_range_of(address, prefixlen):
    net = ipaddress.ip_network(f"{address}/{prefixlen}", strict=False)
    family = V4 if net.version == 4 else V6
    return family, int(net.network_address), int(net.broadcast_address)


def ref_side(selector, source):
    address, plen = (selector.saddr, selector.prefixlen_s) if source else (selector.daddr, selector.prefixlen_d)
    family, low, high = ref_range_of(address, plen)
    port, mask = (selector.sport, selector.sport_mask) if source else (selector.dport, selector.dport_mask)
    ports = (port, port) if mask == 0xFFFF else ((0, 0xFFFF) if mask == 0 else None)
    return family, low, high, ports


def ref_covered(selector, local_ts, remote_ts):
    lf, llo, lhi, lport = ref_side(selector, True)
    rf, rlo, rhi, rport = ref_side(selector, False)
    local = [ts for ts in local_ts if ts.covers(lf, llo, lhi, selector.proto, lport)]
    remote = [ts for ts in remote_ts if ts.covers(rf, rlo, rhi, selector.proto, rport)]
    if not local or not remote:
        return False, False
    exact = any(ts.equals(lf, llo, lhi) for ts in local) and any(ts.equals(rf, rlo, rhi) for ts in remote)
    return True, exact


def ref_peer_kind(entry):
    e = entry.strip()
    if not e or e.startswith("%any"):
        return "any"
    try:
        ipaddress.ip_address(e)
        return "address"
    except ValueError:
        pass
    try:
        ipaddress.ip_network(e, strict=False)
        return "subnet"
    except ValueError:
        pass
    if "-" in e:
        try:
            for part in e.split("-", 1):
                ipaddress.ip_address(part.strip())
            return "range"
        except ValueError:
            pass
    return "hostname"


def ref_address_in(address, entries):
    if not entries:
        return "unknown"
    addr = ipaddress.ip_address(address)
    verdict = "no"
    for entry in entries:
        kind = ref_peer_kind(entry)
        e = entry.strip()
        if kind == "address" and ipaddress.ip_address(e) == addr:
            return "yes"
        if kind == "subnet" and addr in ipaddress.ip_network(e, strict=False):
            return "yes"
        if kind == "range":
            lo, hi = (ipaddress.ip_address(p.strip()) for p in e.split("-", 1))
            if lo.version == addr.version and lo <= addr <= hi:
                return "yes"
        if kind in ("any", "hostname"):
            verdict = "unknown"
    return verdict


MODES = {xfrm.MODE_TRANSPORT: "TRANSPORT", xfrm.MODE_TUNNEL: "TUNNEL", 4: "BEET"}


def ref_mode_compatible(leftover, child):
    if leftover.mode is None:
        return child.mode in ("TUNNEL", "TRANSPORT", "BEET")
    return child.mode.startswith(MODES.get(leftover.mode, "?"))


def ref_match_leftover(leftover, configured, active=()):
    if not leftover.selectors:
        return Match(leftover, None, "no policy left to tell its traffic selectors")
    reqid_owner = {(c.conn, c.child) for ike in active for c in ike.children if c.reqid == leftover.reqid}
    scored = []
    for child in configured:
        if not ref_mode_compatible(leftover, child):
            continue
        covered = [ref_covered(s, child.local_ts, child.remote_ts) for s in leftover.selectors]
        if not all(c for c, _ in covered):
            continue
        exact = all(e for _, e in covered)
        peer = ref_address_in(leftover.peer, child.remote_addrs) if leftover.peer else "unknown"
        local = ref_address_in(leftover.local, child.local_addrs) if leftover.local else "unknown"
        if peer == "no" or local == "no":
            continue
        same_reqid = (child.conn, child.child) in reqid_owner
        score = (same_reqid, exact, peer == "yes")
        evidence = ["traffic selectors " + ("equal" if exact else "within") + f" {child.name}'s"]
        if peer == "yes":
            evidence.append(f"peer {leftover.peer} in remote_addrs")
        if same_reqid:
            evidence.append(f"charon uses reqid {leftover.reqid} for it again")
        scored.append((score, child, "; ".join(evidence)))
    if not scored:
        return Match(leftover, None, "no configured child covers its traffic selectors, mode and peer")
    scored.sort(key=lambda t: t[0], reverse=True)
    best = scored[0]
    rivals = [c.name for s, c, _ in scored[1:] if s == best[0]]
    if rivals:
        return Match(leftover, None, f"ambiguous: {best[1].name} and {', '.join(rivals)} match equally")
    return Match(leftover, best[1], best[2])


def ref_configured_for(policy, configured):
    if configured is None:
        return None
    selector = policy.selector if policy.dir == xfrm.DIR_OUT else adopt._reversed(policy.selector)
    for child in configured:
        if child.mode in ("PASS", "DROP"):
            continue
        if ref_covered(selector, child.local_ts, child.remote_ts)[0]:
            return child
    return None


def ref_replacement(leftover, child, active):
    for ike in active:
        if ike.conn != child.conn:
            continue
        for c in ike.children:
            if c.child != child.child or not c.live:
                continue
            if {c.spi_in, c.spi_out} & leftover.spis:
                continue
            if c.local_ts and c.remote_ts and not all(
                    ref_covered(s, c.local_ts, c.remote_ts)[0] for s in leftover.selectors):
                continue
            return c
    return None


# --- generated cases -----------------------------------------------------------------------

PEERS = ["192.0.2.2", "192.0.2.3", "2001:db8::2", "%any", "%any6", "192.0.2.0/24", "192.0.2.1-192.0.2.9",
         "2001:db8::/64", "peer.example.org", "10.9.9.9", " 192.0.2.2 ", "2001:db8::1-2001:db8::9"]
LOCALS = [["%any"], ["192.0.2.1"], ["192.0.2.1", "2001:db8::1"], [], ["198.51.100.0/24"], ["gw.example.org"]]


class Cases:
    """Configurations, leftovers and list-sas answers drawn from a small space, so they collide."""

    def __init__(self, seed: int):
        self.r = random.Random(seed)

    def net(self, fam: int) -> tuple[str, int]:
        r = self.r
        if fam == 4:
            return f"10.{r.randint(0, 2)}.{r.randint(0, 3)}.{r.choice([0, 0, 1, 128, 200])}", \
                r.choice([0, 8, 15, 16, 24, 24, 25, 30, 32, 32])
        return f"fd00:{r.randint(0, 2)}::{r.choice(['', '1', '8000:0:0:1'])}", \
            r.choice([0, 32, 48, 64, 64, 127, 128])

    def ts(self, fam: int) -> str:
        r = self.r
        k = r.random()
        if k < .08:
            body = "dynamic"
        elif k < .18:
            a, b = sorted([r.randint(0, 1 << 11), r.randint(0, 1 << 11)])
            body = (f"10.0.{a >> 8}.{a & 255}..10.0.{b >> 8}.{b & 255}" if fam == 4
                    else f"fd00::{a:x}..fd00::{b:x}")
        elif k < .22:
            body = "0.0.0.0/0" if fam == 4 else "::/0"
        else:
            address, plen = self.net(fam)
            body = f"{_fix6(address)}/{plen}"
        k = r.random()
        if k < .12:
            body += "[tcp]"
        elif k < .22:
            body += f"[tcp/{r.choice(['80', '443', '1000-2000', 'http', '0-65535'])}]"
        elif k < .27:
            body += "[udp/53]"
        elif k < .30:
            body += "[icmp/8(0)]"
        elif k < .32:
            body += "[0/53]"
        return body

    def configured(self, n: int) -> tuple[ConfiguredChild, ...]:
        r = self.r
        events = []
        for i in range(n):
            fam = r.choice([4, 4, 4, 6])
            children = {}
            for j in range(r.choice([1, 1, 2, 3])):
                mode = r.choice(["TUNNEL"] * 6 + ["TRANSPORT", "PASS", "DROP", "BEET"])
                children[f"c{j}"] = (mode, [self.ts(fam) for _ in range(r.choice([1, 1, 2]))],
                                     [self.ts(r.choice([fam, fam, 10 - fam])) for _ in range(r.choice([1, 1, 2]))])
            events.append(_conn(f"n{i}", r.sample(PEERS, r.choice([1, 1, 2])), children, r.choice(LOCALS)))
        out = list(parse_list_conns(events))
        # equal rivals: the same child configured twice under another name
        for child in r.sample(out, min(len(out), r.randint(0, 2))):
            out.insert(r.randint(0, len(out)), ConfiguredChild(child.conn + "-twin", child.child, child.mode,
                                                              child.local_ts, child.remote_ts,
                                                              child.local_addrs, child.remote_addrs))
        return tuple(out)

    def selector(self, fam: int, like: ConfiguredChild | None) -> XfrmSelector:
        """A selector of family FAM; with LIKE, mostly one its selectors equal or include."""
        r = self.r
        family = V4 if fam == 4 else V6
        sides = []
        for ts_list in ((like.local_ts, like.remote_ts) if like else ((), ())):
            ts = r.choice(ts_list) if ts_list and r.random() < .85 else None
            if ts is not None and ts.dynamic:
                sides.append(("192.0.2.1", 32) if family == V4 else ("2001:db8::1", 128))
                continue
            if ts is None or ts.family != family:
                address, plen = self.net(fam)
                sides.append((_fix6(address), plen))
                continue
            bits = 32 if family == V4 else 128
            size = ts.high - ts.low + 1
            plen = bits - (size.bit_length() - 1) if size & (size - 1) == 0 else bits
            plen = min(bits, plen + r.choice([0, 0, 0, 1, 8]))      # equal, or narrowed
            low = ts.low + (r.randint(0, size - 1) if plen == bits else 0)
            sides.append((str(ipaddress.ip_address(low)), plen))
        if not sides:
            sides = [(_fix6(a), p) for a, p in (self.net(fam), self.net(fam))]
        proto = r.choice([0, 0, 0, 6, 17, 1])
        dport = r.choice([0, 0, 80, 443, 1500, 53]) if proto in (6, 17) else 0
        sport = r.choice([0, 0, 0, 1234]) if proto in (6, 17) else 0
        if like is not None and r.random() < .7:
            # mostly what LIKE's selectors allow: its protocol, a port in its range
            ts = next((t for t in like.local_ts + like.remote_ts if t.proto), None)
            proto = ts.proto if ts is not None else r.choice([0, 0, 6])
            remote = next((t for t in like.remote_ts if (t.port_low, t.port_high) != (0, 0xFFFF)), None)
            dport = r.randint(remote.port_low, remote.port_high) if remote is not None and \
                remote.port_low <= remote.port_high else 0
            local = next((t for t in like.local_ts if (t.port_low, t.port_high) != (0, 0xFFFF)), None)
            sport = r.randint(local.port_low, local.port_high) if local is not None and \
                local.port_low <= local.port_high else 0
        return XfrmSelector(family, sides[0][0], sides[0][1], sides[1][0], sides[1][1], proto,
                            sport=sport, sport_mask=0xFFFF if sport else 0, dport=dport,
                            dport_mask=r.choice([0xFFFF, 0xFFFF, 0xFF00]) if dport else 0)

    def leftovers(self, n: int, configured: Sequence[ConfiguredChild]) -> list:
        r = self.r
        out = []
        for i in range(n):
            like = r.choice(configured) if configured and r.random() < .8 else None
            fam = r.choice([4, 4, 6])
            if like is not None and like.local_ts and not like.local_ts[0].dynamic:
                fam = 6 if like.local_ts[0].family == V6 else 4
            reqid = r.randint(1, max(2, n))
            s = self.selector(fam, like)
            family = s.family
            mine = "192.0.2.1" if family == V4 else "2001:db8::1"
            peer = (r.choice(["192.0.2.2", "192.0.2.3", "192.0.2.5", "10.9.9.9"]) if family == V4
                    else r.choice(["2001:db8::2", "2001:db8::7", "2001:db9::2"]))
            mode = r.choice([xfrm.MODE_TUNNEL] * 4 + [xfrm.MODE_TRANSPORT, 4])
            if like is not None and r.random() < .7:
                named = [a.strip() for a in like.remote_addrs if adopt._peer_kind(a) == "address"]
                if named and (":" in named[0]) == (family == V6):
                    peer = r.choice(named)
                mode = {"TRANSPORT": xfrm.MODE_TRANSPORT, "BEET": 4}.get(like.mode, xfrm.MODE_TUNNEL)
            t_out = XfrmTemplate(family, mine, peer, reqid=reqid, mode=mode)
            t_in = XfrmTemplate(family, peer, mine, reqid=reqid, mode=mode)
            back = adopt._reversed(s)
            if r.random() < .8:
                out.append((XfrmPolicy(s, xfrm.DIR_OUT, templates=(t_out,)), VERDICT))
            if r.random() < .7:
                out.append((XfrmPolicy(back, xfrm.DIR_IN, templates=(t_in,)), VERDICT))
            if r.random() < .5:
                out.append((XfrmPolicy(back, xfrm.DIR_FWD, templates=(t_in,)), VERDICT))
            if r.random() < .2:                 # a second selector pair for the same CHILD_SA
                s2 = self.selector(fam, like)
                out.append((XfrmPolicy(s2, xfrm.DIR_OUT, templates=(t_out,)), VERDICT))
            if r.random() < .5:
                out.append((XfrmSA(family, peer, 0xc0000000 + i, 50, mine, mode=mode, reqid=reqid), VERDICT))
                out.append((XfrmSA(family, mine, 0xc1000000 + i, 50, peer, mode=mode, reqid=reqid), VERDICT))
        return out

    def active(self, configured: Sequence[ConfiguredChild], reqids: int, leftovers=()):
        """list-sas: a few of CONFIGURED running; some with the reqid of a leftover they match."""
        r = self.r
        events = []
        picked = r.sample(list(configured), min(len(configured), r.randint(0, 5)))
        again = {}
        for group in _groups(leftovers):
            m = ref_match_leftover(group, configured)
            if m.child is not None and r.random() < .5:
                picked.append(m.child)
                again[id(m.child)] = group.reqid
        for k, c in enumerate(picked):
            kids = {}
            for j in range(r.randint(1, 2)):
                narrow = r.random() < .3
                kids[f"x{j}"] = {
                    "name": c.child.encode(), "uniqueid": str(j).encode(),
                    "reqid": str(again.get(id(c), r.randint(1, max(2, reqids)))).encode(),
                    "state": r.choice([b"INSTALLED", b"INSTALLING", b"REKEYED"]), "mode": b"TUNNEL",
                    "spi-in": f"{r.randint(0, 2 ** 32 - 1):08x}".encode(),
                    "spi-out": f"{0xc0000000 + r.randint(0, reqids):08x}".encode(),
                    "local-ts": [(self.ts(4) if narrow else t.text).encode() for t in c.local_ts],
                    "remote-ts": [t.text.encode() for t in c.remote_ts]}
            events.append({c.conn: {"uniqueid": str(k).encode(),
                                    "state": r.choice([b"ESTABLISHED", b"CONNECTING"]),
                                    "local-host": b"192.0.2.1", "remote-host": b"192.0.2.2", "child-sas": kids}})
        return parse_list_sas(events)


def _fix6(address: str) -> str:
    return str(ipaddress.ip_address(address)) if ":" in address else address


def _conn(name, remote_addrs, children, local_addrs):
    return {name: {"local_addrs": [a.encode() for a in local_addrs], "remote_addrs": [a.encode() for a in remote_addrs],
                   "children": {c: {"mode": m.encode(), "local-ts": [t.encode() for t in lts],
                                    "remote-ts": [t.encode() for t in rts]} for c, (m, lts, rts) in children.items()}}}


def _groups(leftovers) -> tuple[LeftoverChild, ...]:
    return adopt.group_leftovers([r for r, _ in leftovers], LOCAL)


# --- the comparisons -------------------------------------------------------------------------

def test_addresses_are_read_as_ipaddress_reads_them():
    r = random.Random(7)
    cases = [("10.1.2.3", 16), ("0.0.0.0", 0), ("255.255.255.255", 32), ("::", 0), ("fd00::1", 64),
             ("::ffff:1.2.3.4", 96), ("2001:db8::", 128), ("10.1.2.3", 33), ("fd00::", 129), ("010.1.2.3", 8),
             ("1.2.3", 8), ("FD00::1", 64), ("::1", -1), ("10.0.0.1", "8"), ("fe80::1%eth0", 64), ("", 0),
             ("1.2.3.4 ", 8), ("fd00:0::1", 64), ("::ffff:0102:0304", 128), ("10.0.0.1", True)]
    for _ in range(3000):
        if r.random() < .5:
            cases.append((str(ipaddress.IPv4Address(r.getrandbits(32))), r.randint(0, 32)))
        else:
            bits = r.choice([128, 40, 16])
            cases.append((str(ipaddress.IPv6Address(r.getrandbits(bits) << r.choice([0, 128 - bits]))),
                          r.randint(0, 128)))
    for address, plen in cases:
        assert _outcome(adopt._range_of, address, plen) == _outcome(ref_range_of, address, plen), (address, plen)


def _outcome(fn, *args):
    try:
        return fn(*args)
    except Exception as exc:        # the same error type counts as the same decision
        return type(exc)


@pytest.mark.parametrize("seed", range(40))
def test_indexed_matching_decides_as_the_full_scan(seed):
    cases = Cases(seed)
    configured = cases.configured(cases.r.randint(0, 40))
    leftovers = cases.leftovers(cases.r.randint(1, 40), configured)
    active = cases.active(configured, len(leftovers), leftovers)
    matched = 0
    for group in _groups(leftovers):
        want = ref_match_leftover(group, configured, active)
        got = adopt.match_leftover(group, configured, active)
        assert (got.child, got.reason) == (want.child, want.reason), group.describe()
        matched += want.child is not None
        if want.child is not None:
            assert adopt._replacement(group, want.child, active) == ref_replacement(group, want.child, active)
    for record, _ in leftovers:
        if record.FAMILY == "xfrm_policy":
            assert adopt.configured_for(record, configured) == ref_configured_for(record, configured)
    # as a list (not indexed between calls) the answers are the same
    for group in _groups(leftovers)[:5]:
        assert adopt.match_leftover(group, list(configured), active) == \
            adopt.match_leftover(group, configured, active)


def test_the_generated_cases_match_often_and_collide():
    """The comparison above is only worth something if the cases exercise every outcome."""
    reasons: dict[str, int] = {}
    for seed in range(40):
        cases = Cases(seed)
        configured = cases.configured(cases.r.randint(0, 40))
        leftovers = cases.leftovers(cases.r.randint(1, 40), configured)
        active = cases.active(configured, len(leftovers), leftovers)
        for group in _groups(leftovers):
            reason = ref_match_leftover(group, configured, active).reason
            kind = ("ambiguous" if reason.startswith("ambiguous") else "no child" if reason.startswith("no configured")
                    else "no policy" if reason.startswith("no policy") else "exact" if "equal " in reason
                    else "within")
            reasons[kind] = reasons.get(kind, 0) + 1
            if "reqid" in reason and "charon uses" in reason:
                reasons["same reqid"] = reasons.get("same reqid", 0) + 1
    print(reasons)
    assert all(reasons.get(k, 0) >= 5 for k in ("ambiguous", "no child", "exact", "within", "same reqid")), reasons


@pytest.mark.parametrize("seed", range(25))
def test_plans_with_the_index_equal_plans_with_the_full_scan(seed, monkeypatch):
    cases = Cases(1000 + seed)
    configured = cases.configured(cases.r.randint(1, 30))
    leftovers = cases.leftovers(cases.r.randint(1, 30), configured)
    active = cases.active(configured, len(leftovers), leftovers)
    runs = [dict(now=0.0, deadline=60.0, parallel=cases.r.randint(1, 3)), dict(now=61.0, deadline=60.0),
            dict(now=61.0, deadline=60.0, configured=None), dict(now=0.0, deadline=60.0, explain=False)]
    common = dict(ledger=None, configured=configured, active=active, local_addresses=LOCAL)
    got = [plan_adopt(leftovers, **{**common, **run}).to_json() for run in runs]
    monkeypatch.setattr(adopt, "_match", lambda leftover, index, owners: ref_match_leftover(
        leftover, index.children, [_Owners(owners, leftover.reqid)]))
    monkeypatch.setattr(adopt, "_replacement_in", lambda leftover, child, live: ref_replacement(
        leftover, child, active))
    monkeypatch.setattr(adopt, "configured_for", ref_configured_for)
    want = [plan_adopt(leftovers, **{**common, **run}).to_json() for run in runs]
    assert got == want


class _Owners:
    """An IKE_SA stand-in whose children run REQID for the (conn, child) pairs given."""

    def __init__(self, owners, reqid):
        self.children = [_Child(conn, child, reqid) for conn, child in owners]


class _Child:
    def __init__(self, conn, child, reqid):
        self.conn, self.child, self.reqid = conn, child, reqid


def test_a_concentrator_leftover_is_compared_with_its_own_child_only():
    """10,000 children with distinct subnets: each leftover gets one candidate from the index."""
    configured = tuple(ConfiguredChild(f"t{i}", "net", "TUNNEL", (adopt.parse_ts(f"10.{i >> 8}.{i & 255}.0/24"),),
                                       (adopt.parse_ts(f"172.16.{i >> 8}.{i & 255}/32"),), ("192.0.2.1",),
                                       (f"192.0.{2 + (i >> 8)}.{i & 255}",)) for i in range(10000))
    index = adopt._child_index(configured)
    assert adopt._child_index(configured) is index          # one list-conns answer, indexed once
    sel = XfrmSelector(V4, "10.3.7.0", 24, "172.16.3.7", 32)
    assert index.candidates((sel,)) == [configured[3 * 256 + 7]]
    wide = ConfiguredChild("all", "any", "TUNNEL", (adopt.parse_ts("0.0.0.0/0"),), (adopt.parse_ts("0.0.0.0/0"),))
    both = configured + (wide,)
    assert adopt._child_index(both).candidates((sel,)) == [configured[3 * 256 + 7], wide]


@pytest.mark.parametrize("seed", range(10))
def test_steps_over_one_adoption_plan_as_if_each_were_the_first(seed):
    """What plan_adopt keeps between the steps of one adoption (the same leftovers tuple) never
    changes a plan: each step equals a plan made from scratch (a list is never kept)."""
    cases = Cases(2000 + seed)
    configured = cases.configured(cases.r.randint(1, 30))
    leftovers = tuple(cases.leftovers(cases.r.randint(1, 30), configured))
    keys = [adopt.leftover_key(r) for r, _ in leftovers]
    resolved: set = set()
    for step in range(5):
        active = cases.active(configured, len(leftovers), leftovers)
        listed = configured if cases.r.random() < .7 else tuple(configured)       # list-conns asked again
        resolved |= set(cases.r.sample(keys, cases.r.randint(0, 3)))
        run = dict(ledger=None, configured=listed, active=active, local_addresses=LOCAL, now=float(step * 30),
                   deadline=60.0, resolved=frozenset(resolved), explain=step % 2 == 0)
        assert plan_adopt(leftovers, **run).to_json() == plan_adopt(list(leftovers), **run).to_json()
    adopt.forget()
