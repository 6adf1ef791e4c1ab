"""XFRM policies against the real kernel, in throw-away namespaces; iproute2 is the referee."""

from __future__ import annotations

import dataclasses
import errno
import re
import select
import shlex
import socket
import struct
import time

import pytest

from supervisor.errors import KernelError
from supervisor.kernel import netlink, xfrm
from supervisor.kernel.common import Action, DeleteResult
from supervisor.kernel.xfrm import XfrmPolicy, XfrmSelector, XfrmTemplate

from test_xfrm_codec import CASES, load_fixture   # the records that match iproute2 fixtures

INF = xfrm.XFRM_INF
PROTO_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 58: "ipv6-icmp", 132: "sctp"}

# A spread of what charon and others install: both families, every direction, templates
# with reqid/proto/mode/level, marks, if_ids, priorities, port/proto selectors, block/allow.
IP_POLICIES = [
    "src 10.1.0.0/16 dst 10.2.0.0/16 dir out priority 375423 "
    "tmpl src 192.0.2.1 dst 192.0.2.2 proto esp reqid 1 mode tunnel",
    "src 10.2.0.0/16 dst 10.1.0.0/16 dir in priority 375423 "
    "tmpl src 192.0.2.2 dst 192.0.2.1 proto esp reqid 1 mode tunnel",
    "src 10.2.0.0/16 dst 10.1.0.0/16 dir fwd priority 375423 "
    "tmpl src 192.0.2.2 dst 192.0.2.1 proto esp reqid 1 mode tunnel level use",
    "src 10.0.0.0/24 dst 10.0.1.0/24 proto tcp sport 1000 dport 22 dir in priority 200 "
    "mark 0x5 mask 0xff if_id 7 action block",
    "src 10.0.0.0/24 dst 10.0.1.0/24 proto udp dport 4500 dir out ptype sub priority 9 "
    "tmpl proto ah reqid 0x20 mode transport",
    "src 10.9.0.0/24 dst 0.0.0.0/0 proto icmp type 8 code 0 dir out flag localok icmp "
    "limit byte-soft 1000 limit packet-hard 99 limit time-soft 3000 limit time-hard 3600 "
    "limit time-use-soft 10 limit time-use-hard 20",
    "src fd00::/64 dst fd01::1/128 proto udp dport 500 dir fwd priority 300 "
    "tmpl src fd00::1 dst fd01::1 proto esp spi 0x123 reqid 9 mode tunnel "
    "tmpl proto comp reqid 9 mode transport",
    "src fd01::/64 dst fd00::/64 dir in priority 1 mark 0x100 mask 0xf00 if_id 0x2a "
    "tmpl src fd01::1 dst fd00::1 proto esp reqid 0x10 mode beet",
    "src ::/0 dst ::/0 proto ipv6-icmp type 135 dir out action allow priority 0",
    "src 192.0.2.0/24 dst 198.51.100.0/24 dir out action block priority 600000",
]


# --- reading `ip -s -o xfrm policy list` ------------------------------------

def _limit(text: str) -> int:
    return INF if text == "(INF)" else int(text)


def parse_ip_policies(text: str) -> list[dict]:
    """`ip -s -o xfrm policy list`: one policy per line, its lines joined by backslashes."""
    out = []
    for line in text.splitlines():
        if not line.strip():
            continue
        d: dict = {"proto": None, "sport": None, "dport": None, "type": None, "code": None,
                   "mark": None, "if_id": 0, "tmpls": []}
        limits: list[int] = []
        for part in (p.strip() for p in line.split("\\")):
            w = part.split()
            if not w:
                continue
            if "src" not in d and w[0] == "src":
                pairs = dict(zip(w[::2], w[1::2]))
                d.update(src=pairs["src"], dst=pairs["dst"], uid=int(pairs["uid"]),
                         proto=pairs.get("proto"))
                for k in ("sport", "dport", "type", "code"):
                    if k in pairs:
                        d[k] = int(pairs[k])
            elif w[0] in ("dir", "socket"):
                d["socket"] = w[0] == "socket"
                d["dir"] = w[1]
                pairs = dict(zip(w[2::2], w[3::2]))
                d.update(action=pairs["action"], index=int(pairs["index"]),
                         priority=int(pairs["priority"]), ptype=pairs["ptype"], share=pairs["share"])
                d["flags"] = int(re.search(r"\(0x([01]+)\)", part).group(1), 2)   # binary digits
            elif w[0] in ("limit:", "expire"):
                m = re.search(r"soft (\S+?)\((?:bytes|packets|sec)\), hard (\S+?)\(", part)
                limits += [_limit(m.group(1)), _limit(m.group(2))]
            elif w[0] == "add":
                d["add"] = " ".join(w[1:3])
                d["use"] = w[4] if w[3:4] == ["use"] and len(w) == 5 else " ".join(w[4:])
            elif w[0] == "mark":
                v, m = w[1].split("/")
                d["mark"] = (int(v, 16), int(m, 16))
            elif w[0] == "if_id":
                d["if_id"] = int(w[1], 16)
            elif w[0] == "tmpl":
                d["tmpls"].append({"src": w[2], "dst": w[4]})
            elif w[0] == "proto":
                t = d["tmpls"][-1]
                t.update(proto=w[1], spi=int(w[3].split("(")[0], 16), reqid=int(w[5].split("(")[0]),
                         mode=w[7])
            elif w[0] == "level":
                d["tmpls"][-1].update(level=w[1], share=w[3])
            elif w[0] == "enc-mask":
                d["tmpls"][-1].update(ealgos=int(w[1], 16), aalgos=int(w[3], 16), calgos=int(w[5], 16))
        d["lifetime"] = tuple(limits)
        out.append(d)
    return out


def as_ip_shows(p: XfrmPolicy) -> dict:
    """Our record in the shape parse_ip_policies returns: every field ip prints."""
    s = p.selector
    icmp = s.proto in (1, 58)
    lft = p.lifetime
    return {
        "src": f"{s.saddr}/{s.prefixlen_s}", "dst": f"{s.daddr}/{s.prefixlen_d}", "uid": s.user,
        "proto": PROTO_NAMES.get(s.proto, str(s.proto)) if s.proto else None,
        "sport": s.sport if s.sport_mask and not icmp else None,
        "dport": s.dport if s.dport_mask and not icmp else None,
        "type": s.sport if s.sport_mask and icmp else None,
        "code": s.dport if s.dport_mask and icmp else None,
        "socket": p.per_socket, "dir": xfrm.DIR_NAMES[p.dir].removeprefix("socket-"),
        "action": xfrm.ACTION_NAMES[p.action], "index": p.index, "priority": p.priority,
        "ptype": xfrm.PTYPE_NAMES[p.ptype], "share": xfrm.SHARE_NAMES[p.share], "flags": p.flags,
        "lifetime": (lft.soft_byte_limit, lft.hard_byte_limit, lft.soft_packet_limit, lft.hard_packet_limit,
                     lft.soft_add_expires_seconds, lft.hard_add_expires_seconds,
                     lft.soft_use_expires_seconds, lft.hard_use_expires_seconds),
        "add": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(p.curlft.add_time)),
        "use": "-" if not p.curlft.use_time else
               time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(p.curlft.use_time)),
        "mark": p.mark, "if_id": p.if_id,
        "tmpls": [{"src": t.saddr, "dst": t.daddr, "proto": xfrm.PROTO_NAMES[t.proto], "spi": t.spi,
                   "reqid": t.reqid, "mode": xfrm.MODE_NAMES[t.mode],
                   "level": "use" if t.optional else "required", "share": xfrm.SHARE_NAMES[t.share],
                   "ealgos": t.ealgos, "aalgos": t.aalgos, "calgos": t.calgos} for t in p.templates],
    }


def ip_show(ns) -> list[dict]:
    return parse_ip_policies(ns.run("ip", "-s", "-o", "xfrm", "policy", "list").stdout)


def ip_batch(ns, tmp_path, lines: list[str]) -> None:
    path = tmp_path / f"batch-{time.monotonic_ns()}"
    path.write_text("\n".join(lines) + "\n")
    ns.run("ip", "-batch", str(path))


def dump(ns) -> list[XfrmPolicy]:
    with ns.enter():
        return xfrm.dump_policies()


def stable(p: XfrmPolicy) -> XfrmPolicy:
    """P without what the kernel assigns (index) or counts (curlft)."""
    return dataclasses.replace(p, index=0, curlft=xfrm.NO_CURLFT)


def wait_events(mon: xfrm.XfrmMonitor, want, timeout: float = 15.0) -> list:
    """Events until WANT(events) holds (generous timeout; the kernel is usually instant)."""
    events: list = []
    deadline = time.monotonic() + timeout
    while not want(events):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"timed out waiting for events; got {events}")
        select.select([mon], [], [], left)
        events += mon.read_events()
    return events


def set_socket_policy(sock: socket.socket, direction: int) -> None:
    """What charon does for its IKE sockets: a per-socket bypass policy (IP_XFRM_POLICY)."""
    sel = bytes(40) + struct.pack("=H14x", socket.AF_INET)
    info = sel + struct.pack("=8Q", INF, INF, INF, INF, 0, 0, 0, 0) + bytes(32) + \
        struct.pack("=IIBBBB4x", 0, 0, direction, xfrm.ACTION_ALLOW, 0, 0)
    sock.setsockopt(socket.IPPROTO_IP, 17, info)     # IP_XFRM_POLICY


# --- dumps ------------------------------------------------------------------

def test_dump_matches_ip_for_every_field(netns):
    for spec in IP_POLICIES:
        netns.run("ip", "xfrm", "policy", "add", *spec.split())
    ours = dump(netns)
    theirs = ip_show(netns)
    assert len(ours) == len(theirs) == len(IP_POLICIES)
    by_index = {d["index"]: d for d in theirs}
    for p in ours:
        assert as_ip_shows(p) == by_index[p.index], p.describe()
    assert {p.selector.family for p in ours} == {xfrm.AF_INET, xfrm.AF_INET6}
    assert {p.dir for p in ours} == {xfrm.DIR_IN, xfrm.DIR_OUT, xfrm.DIR_FWD}


def test_dump_of_thousands_of_policies_spans_many_datagrams(netns, tmp_path):
    lines = [f"xfrm policy add src 10.{i >> 8}.{i & 255}.0/24 dst 10.200.0.0/16 dir out priority {i} "
             f"tmpl src 192.0.2.1 dst 192.0.2.{i % 250 + 2} proto esp reqid {i} mode tunnel"
             for i in range(3000)]
    ip_batch(netns, tmp_path, lines)
    ours = dump(netns)
    assert len(ours) == 3000
    assert sorted(p.priority for p in ours) == list(range(3000))
    assert all(p.templates[0].reqid == p.priority for p in ours)


def test_empty_dump_is_an_empty_list(netns):
    assert dump(netns) == []


def test_policies_added_through_api_equal_those_added_by_ip(netns_factory):
    """The kernel stores what our encoder sent exactly as what iproute2 sent."""
    by_ip, by_api = netns_factory(), netns_factory()
    for name in sorted(n for n in CASES if n.startswith("policy_add_")):
        command, _ = load_fixture(name)
        by_ip.run(*shlex.split(command))
        with by_api.enter():
            CASES[name](xfrm.open_socket())
    ours = sorted(map(stable, dump(by_api)), key=repr)
    theirs = sorted(map(stable, dump(by_ip)), key=repr)
    assert ours == theirs and len(ours) == 5


# --- add / update / delete --------------------------------------------------

OURS = XfrmPolicy(XfrmSelector(xfrm.AF_INET, "10.1.0.0", 16, "10.2.0.0", 16), xfrm.DIR_OUT, priority=375423,
                  templates=(XfrmTemplate(xfrm.AF_INET, "192.0.2.1", "192.0.2.2", reqid=1,
                                          mode=xfrm.MODE_TUNNEL),))


def test_add_update_delete_through_api_verified_with_ip(netns):
    with netns.enter(), xfrm.open_socket() as sock:
        xfrm.add_policy(OURS, sock=sock)
        (shown,) = ip_show(netns)
        (dumped,) = xfrm.dump_policies(sock)
        assert shown == as_ip_shows(dumped) and stable(dumped) == OURS

        with pytest.raises(netlink.AlreadyExists) as info:
            xfrm.add_policy(OURS, sock=sock)
        assert str(info.value) == f"cannot add {OURS.describe()}: File exists"

        moved = dataclasses.replace(OURS, priority=1000, templates=(
            dataclasses.replace(OURS.templates[0], daddr="192.0.2.3", reqid=2),))
        xfrm.update_policy(moved, sock=sock)
        (shown,) = ip_show(netns)
        assert (shown["priority"], shown["tmpls"][0]["dst"], shown["tmpls"][0]["reqid"]) == (1000, "192.0.2.3", 2)
        assert shown["index"] == dumped.index          # an update keeps the kernel's index

        assert xfrm.delete_policy(OURS, sock=sock) is DeleteResult.DELETED   # by key: priority differs
        assert ip_show(netns) == []
        assert xfrm.delete_policy(OURS, sock=sock) is DeleteResult.ALREADY_GONE


def test_delete_leaves_every_other_policy_untouched(netns):
    """Policies whose keys differ from the deleted one in a single component all survive."""
    netns.run("ip", "xfrm", "policy", "add", "src", "10.1.0.0/16", "dst", "10.2.0.0/16", "dir", "out",
              "mark", "0x1", "mask", "0xff", "tmpl", "proto", "esp", "reqid", "99")     # foreign
    netns.run("ip", "xfrm", "policy", "add", "src", "10.1.0.0/16", "dst", "10.2.0.0/16", "dir", "out",
              "ptype", "sub")                                                         # foreign
    neighbours = [dataclasses.replace(OURS, dir=xfrm.DIR_IN), dataclasses.replace(OURS, dir=xfrm.DIR_FWD),
                  dataclasses.replace(OURS, if_id=5),
                  dataclasses.replace(OURS, selector=dataclasses.replace(OURS.selector, prefixlen_d=24))]
    with netns.enter():
        for p in [OURS] + neighbours:
            xfrm.add_policy(p)
        before = xfrm.dump_policies()
        assert len(before) == 7
        target = next(p for p in before if stable(p) == OURS)
        assert xfrm.delete_policy(target) is DeleteResult.DELETED
        after = xfrm.dump_policies()
    assert sorted(after, key=repr) == sorted((p for p in before if p is not target), key=repr)
    assert len(ip_show(netns)) == 6


def test_delete_finds_policies_with_mark_if_id_and_sub_type(netns):
    netns.run("ip", "xfrm", "policy", "add", "src", "fd01::/64", "dst", "fd00::/64", "dir", "in", "ptype", "sub",
              "mark", "0x100", "mask", "0xf00", "if_id", "0x2a", "tmpl", "proto", "esp", "reqid", "3")
    with netns.enter():
        (p,) = xfrm.dump_policies()
        assert (p.ptype, p.mark, p.if_id) == (xfrm.PTYPE_SUB, (0x100, 0xF00), 0x2A)
        assert xfrm.delete_policy(dataclasses.replace(p, mark=None)) is DeleteResult.ALREADY_GONE
        assert xfrm.delete_policy(dataclasses.replace(p, ptype=xfrm.PTYPE_MAIN)) is DeleteResult.ALREADY_GONE
        assert xfrm.delete_policy(p) is DeleteResult.DELETED
        assert xfrm.dump_policies() == []


def test_per_socket_policies_are_dumped_marked_and_never_deleted(netns):
    netns.run("ip", "xfrm", "policy", "add", "src", "10.1.0.0/16", "dst", "10.2.0.0/16", "dir", "out")
    with netns.enter():
        ike = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            set_socket_policy(ike, xfrm.DIR_IN)
            set_socket_policy(ike, xfrm.DIR_OUT)
            policies = xfrm.dump_policies()
            sock_policies = [p for p in policies if p.per_socket]
            assert sorted(p.dir for p in sock_policies) == [xfrm.XFRM_POLICY_MAX + xfrm.DIR_IN,
                                                             xfrm.XFRM_POLICY_MAX + xfrm.DIR_OUT]
            assert [d["socket"] for d in ip_show(netns)].count(True) == 2
            for p in sock_policies:
                with pytest.raises(KernelError, match="per-socket policy"):
                    xfrm.delete_policy(p)
            assert len(xfrm.dump_policies()) == 3
        finally:
            ike.close()
        assert len(xfrm.dump_policies()) == 1      # they die with their socket


def test_default_policies_match_ip(netns):
    with netns.enter():
        assert xfrm.get_default_policies() == xfrm.XfrmDefaultPolicy(xfrm.DEFAULT_ACCEPT, xfrm.DEFAULT_ACCEPT,
                                                                     xfrm.DEFAULT_ACCEPT)
    netns.run("ip", "xfrm", "policy", "setdefault", "in", "block", "fwd", "block")
    shown = dict(re.findall(r"^\s*(in|fwd|out):\s+(\w+)", netns.run("ip", "xfrm", "policy", "getdefault").stdout,
                            re.MULTILINE))
    with netns.enter():
        defaults = xfrm.get_default_policies()
    assert defaults.to_json() == shown == {"in": "block", "fwd": "block", "out": "accept"}
    assert xfrm.XfrmDefaultPolicy.from_json(defaults.to_json()) == defaults


# --- monitor ----------------------------------------------------------------

def test_monitor_attributes_changes_to_the_socket_that_made_them(netns):
    """The kernel copies the request's nlmsg_pid into the notification: we send our port id
    (charon sends its pid); iproute2 sends 0, which looks like the kernel's own changes."""
    with netns.enter(), xfrm.XfrmMonitor() as mon, xfrm.open_socket() as sock, \
            xfrm.open_socket() as other:
        assert mon.read_events() == []
        xfrm.add_policy(OURS, sock=sock)
        xfrm.add_policy(dataclasses.replace(OURS, dir=xfrm.DIR_IN), sock=other)
        netns.run("ip", "xfrm", "policy", "add", "src", "10.5.0.0/16", "dst", "10.6.0.0/16", "dir", "in")
        (ours, others, by_ip) = wait_events(mon, lambda ev: len(ev) >= 3)
        assert (ours.family, ours.action, ours.port_id) == ("xfrm_policy", Action.NEW, sock.port_id)
        assert stable(ours.record) == OURS
        assert (others.action, others.port_id, others.record.dir) == (Action.NEW, other.port_id, xfrm.DIR_IN)
        assert len({0, sock.port_id, other.port_id, mon.port_id}) == 4
        assert (by_ip.action, by_ip.port_id, by_ip.record.selector.saddr) == (Action.NEW, 0, "10.5.0.0")

        xfrm.update_policy(dataclasses.replace(OURS, priority=5), sock=sock)
        (upd,) = wait_events(mon, lambda ev: len(ev) >= 1)
        assert (upd.action, upd.port_id, upd.record.priority) == (Action.UPDATE, sock.port_id, 5)

        (dumped,) = [p for p in xfrm.dump_policies(sock) if p.key() == OURS.key()]
        xfrm.delete_policy(OURS, sock=sock)
        (gone,) = wait_events(mon, lambda ev: len(ev) >= 1)
        # DELPOLICY carries the id; the whole policy (templates too) comes from its attributes
        assert (gone.action, gone.port_id) == (Action.DELETE, sock.port_id)
        assert gone.record == dumped

        netns.run("ip", "xfrm", "policy", "flush")
        (flush,) = wait_events(mon, lambda ev: len(ev) >= 1)
        assert (flush.family, flush.action, flush.record, flush.port_id) == ("xfrm_policy", Action.FLUSH, None, 0)


def test_monitor_reports_expiry_by_the_kernel_with_port_id_zero(netns):
    with netns.enter(), xfrm.XfrmMonitor() as mon:
        # lifetimes are checked against whole seconds: a soft 1 / hard 2 pair can skip the soft
        # warning when the timer runs late, so leave a second of slack
        netns.run("ip", "xfrm", "policy", "add", "src", "10.1.0.0/16", "dst", "10.2.0.0/16", "dir", "out",
                  "limit", "time-soft", "1", "limit", "time-hard", "3")
        events = wait_events(mon, lambda ev: any(e.action is Action.EXPIRE and e.hard for e in ev))
        expiries = [e for e in events if e.action is Action.EXPIRE]
        assert [e.hard for e in expiries] == [False, True]
        assert all(e.port_id == 0 and e.record.selector.saddr == "10.1.0.0" for e in expiries)
        assert xfrm.dump_policies() == []


def test_monitor_reports_lost_notifications_as_overrun(netns, tmp_path):
    with netns.enter(), xfrm.XfrmMonitor(rcvbuf=0) as mon:     # the kernel's minimum buffer
        ip_batch(netns, tmp_path, [f"xfrm policy add src 10.{i >> 8}.{i & 255}.0/24 dst 10.200.0.0/16 dir out"
                                   for i in range(500)])
        events = mon.read_events()
        events += mon.read_events()
    overruns = [e for e in events if xfrm.is_overrun(e)]
    assert overruns and mon.overruns == len(overruns)
    assert all(e.record is None and e.port_id == 0 for e in overruns)
    assert 0 < len([e for e in events if e.action is Action.NEW]) < 500


def test_acquire_reports_the_policy_and_leaves_a_larval_sa(netns):
    """Traffic hitting a policy whose template has no SA: the kernel asks for one (ACQUIRE)."""
    netns.sh("ip link add v0 type veth peer name v1; ip link set v0 up; ip link set v1 up; "
             "ip addr add 10.1.0.1/16 dev v0; ip route add 10.7.0.0/16 dev v0")   # lo never uses XFRM
    netns.run("ip", "xfrm", "policy", "add", "src", "10.1.0.0/16", "dst", "10.7.0.0/16", "dir", "out",
              "tmpl", "src", "10.1.0.1", "dst", "10.7.0.1", "proto", "esp", "reqid", "3", "mode", "tunnel")
    with netns.enter(), xfrm.XfrmMonitor() as mon:
        (policy,) = xfrm.dump_policies()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as app:
            app.bind(("10.1.0.1", 0))
            app.sendto(b"x", ("10.7.0.5", 9))
            sport = app.getsockname()[1]
        (acquire,) = [e for e in wait_events(mon, lambda ev: any(e.action is Action.ACQUIRE for e in ev))
                      if e.action is Action.ACQUIRE]
        acq = acquire.record
        assert (acquire.family, acquire.port_id) == ("xfrm_sa", 0)
        assert (acq.saddr, acq.daddr, acq.proto) == ("10.1.0.1", "10.7.0.1", xfrm.IPPROTO_ESP)
        assert (acq.selector.saddr, acq.selector.daddr, acq.selector.proto, acq.selector.sport,
                acq.selector.dport) == ("10.1.0.1", "10.7.0.5", 17, sport, 9)
        assert stable(acq.policy) == stable(policy) and acq.policy.index == policy.index

        # the kernel parks a larval SA (no SPI) until an SA arrives or it expires
        (larval,) = xfrm.dump_sas()
        assert larval.larval and (larval.daddr, larval.reqid, larval.seq) == ("10.7.0.1", 3, acq.seq)
        assert larval.selector == acq.selector
        shown = netns.run("ip", "xfrm", "state", "list").stdout
        assert "src 10.1.0.1 dst 10.7.0.1" in shown and "proto esp spi 0x00000000 reqid 3 mode tunnel" in shown
        with pytest.raises(KernelError, match="larval"):
            xfrm.delete_sa(larval)


# --- batches ----------------------------------------------------------------

def test_batch_delete_removes_exactly_the_given_policies_across_many_datagrams(netns, tmp_path):
    lines = [f"xfrm policy add src 10.{i >> 8}.{i & 255}.0/24 dst 10.200.0.0/16 dir {d} priority {i} "
             f"tmpl src 192.0.2.1 dst 192.0.2.{i % 250 + 2} proto esp reqid {i} mode tunnel"
             for i in range(1500) for d in ("out", "fwd")]
    ip_batch(netns, tmp_path, lines)
    with netns.enter(), xfrm.open_socket() as sock:
        before = xfrm.dump_policies(sock)
        doomed = [p for p in before if p.priority % 3]
        assert xfrm.delete_policies(doomed, sock=sock) == [DeleteResult.DELETED] * len(doomed)
        after = xfrm.dump_policies(sock)
        assert sorted(after, key=repr) == sorted((p for p in before if p.priority % 3 == 0), key=repr)
        assert xfrm.delete_policies(doomed, sock=sock) == [DeleteResult.ALREADY_GONE] * len(doomed)
    assert len(ip_show(netns)) == 1000


def test_batch_delete_needs_mark_if_id_and_type_like_a_single_delete(netns):
    netns.run("ip", "xfrm", "policy", "add", "src", "fd01::/64", "dst", "fd00::/64", "dir", "in", "ptype", "sub",
              "mark", "0x100", "mask", "0xf00", "if_id", "0x2a", "tmpl", "proto", "esp", "reqid", "3")
    with netns.enter():
        (p,) = xfrm.dump_policies()
        lookalikes = [dataclasses.replace(p, mark=None), dataclasses.replace(p, mark=(0x100, 0xFFF)),
                      dataclasses.replace(p, if_id=0), dataclasses.replace(p, ptype=xfrm.PTYPE_MAIN)]
        assert xfrm.delete_policies(lookalikes) == [DeleteResult.ALREADY_GONE] * 4
        assert xfrm.delete_policies([p, p]) == [DeleteResult.DELETED, DeleteResult.ALREADY_GONE]
        assert xfrm.dump_policies() == []


def test_batch_delete_never_takes_another_policy_that_got_the_index(netns):
    """An index handed out again (explicitly) is not trusted: the key decides, as by selector."""
    netns.run("ip", "xfrm", "policy", "add", *IP_POLICIES[0].split())
    with netns.enter():
        (old,) = xfrm.dump_policies()
    netns.run("ip", "xfrm", "policy", "flush")
    netns.run("ip", "xfrm", "policy", "add", "src", "10.7.0.0/16", "dst", "10.8.0.0/16", "dir", "out",
              "index", str(old.index), "priority", "5")
    with netns.enter():
        (stranger,) = xfrm.dump_policies()
        assert stranger.index == old.index and stranger.key() != old.key()
        assert xfrm.delete_policies([old]) == [DeleteResult.ALREADY_GONE]
        assert xfrm.dump_policies() == [stranger]
        # the same key under a new index is the policy with that key: deleted, as by delete_policy
        xfrm.add_policy(stable(old))
        (again,) = [p for p in xfrm.dump_policies() if p.key() == old.key()]
        assert again.index != old.index
        assert xfrm.delete_policies([old]) == [DeleteResult.DELETED]
        assert xfrm.dump_policies() == [stranger]


def test_batch_delete_uses_the_index_and_falls_back_to_the_selector(netns, monkeypatch):
    """Dumped policies go by index (one GET and one DEL each); others by selector (one DEL)."""
    netns.run("ip", "xfrm", "policy", "add", *IP_POLICIES[0].split())
    netns.run("ip", "xfrm", "policy", "add", *IP_POLICIES[1].split())
    sent: list[list[tuple[int, bytes]]] = []
    real = netlink.NetlinkSocket.request_many

    def spy(self, requests, what, want_reply=False):
        sent.append([(t, p) for t, _, p in requests])
        return real(self, requests, what, want_reply)
    monkeypatch.setattr(netlink.NetlinkSocket, "request_many", spy)
    with netns.enter():
        dumped, other = xfrm.dump_policies()
        assert xfrm.delete_policies([dumped, stable(other)]) == [DeleteResult.DELETED] * 2
    lookups, deletes = sent
    assert lookups == [(xfrm.XFRM_MSG_GETPOLICY, xfrm.encode_policy_index(dumped))]
    assert deletes == [(xfrm.XFRM_MSG_DELPOLICY, xfrm.encode_policy_index(dumped)),
                       (xfrm.XFRM_MSG_DELPOLICY, xfrm.encode_policy_id(other))]
    assert ip_show(netns) == []


def test_batch_reports_per_policy_errors_and_goes_on(netns):
    netns.run("ip", "xfrm", "policy", "add", *IP_POLICIES[0].split())
    netns.run("ip", "xfrm", "policy", "add", *IP_POLICIES[1].split())
    with netns.enter():
        a, b = xfrm.dump_policies()
        per_socket = dataclasses.replace(a, dir=xfrm.DIR_OUT + xfrm.XFRM_POLICY_MAX)
        unencodable = dataclasses.replace(b, selector=dataclasses.replace(b.selector, saddr="fd00::1"), index=0)
        results = xfrm.delete_policies([per_socket, a, unencodable, b])
        assert isinstance(results[0], KernelError) and "per-socket policy" in str(results[0])
        assert isinstance(results[2], KernelError) and "is not an inet address" in str(results[2])
        assert results[1::2] == [DeleteResult.DELETED, DeleteResult.DELETED]
        assert xfrm.dump_policies() == []


def test_batch_add_installs_each_and_reports_duplicates_per_policy(netns):
    neighbours = [OURS, dataclasses.replace(OURS, dir=xfrm.DIR_IN), dataclasses.replace(OURS, if_id=5)]
    with netns.enter(), xfrm.open_socket() as sock:
        assert xfrm.add_policies(neighbours, sock=sock) == [None] * 3
        again = xfrm.add_policies([neighbours[1], dataclasses.replace(OURS, dir=xfrm.DIR_FWD)], sock=sock)
        assert isinstance(again[0], netlink.AlreadyExists) and again[1] is None
        assert str(again[0]) == f"cannot add {neighbours[1].describe()}: File exists"
        assert sorted(map(stable, xfrm.dump_policies(sock)), key=repr) == sorted(
            neighbours + [dataclasses.replace(OURS, dir=xfrm.DIR_FWD)], key=repr)


def test_answers_lost_to_a_full_receive_buffer_are_reported_not_waited_for(netns):
    """Batches are sized to the receive buffer; if answers are dropped anyway, each lost one
    is an error saying its outcome is unknown (never a hang, never a silent success)."""
    policies = [dataclasses.replace(OURS, selector=dataclasses.replace(OURS.selector, prefixlen_d=8 + i % 17),
                                    priority=i) for i in range(17)]
    with netns.enter(), netlink.NetlinkSocket(netlink.NETLINK_XFRM, rcvbuf=2048) as sock:
        sock._rcvbuf = 1 << 24          # pretend the buffer is large: one datagram for everything
        results = xfrm.add_policies(policies, sock=sock)
        lost = [r for r in results if r is not None]
        assert lost and all(r.errno == errno.ENOBUFS and "outcome is unknown" in str(r) for r in lost)
        assert len(xfrm.dump_policies()) == len(policies)     # the kernel did them all


def test_notifications_arriving_amid_a_batch_are_kept_for_their_reader(netns):
    batch = [OURS, dataclasses.replace(OURS, dir=xfrm.DIR_IN), dataclasses.replace(OURS, dir=xfrm.DIR_FWD)]
    with netns.enter(), netlink.NetlinkSocket(netlink.NETLINK_XFRM, groups=(xfrm.XFRMNLGRP_POLICY,)) as sock:
        assert xfrm.add_policies(batch, sock=sock) == [None] * 3
        assert xfrm.delete_policies(xfrm.dump_policies(), sock=sock) == [DeleteResult.DELETED] * 3
        notes = sock.read_notifications()
    assert [m.msg_type for m in notes] == [xfrm.XFRM_MSG_NEWPOLICY] * 3 + [xfrm.XFRM_MSG_DELPOLICY] * 3
    assert {m.pid for m in notes} == {sock.port_id}
