"""XFRM SAs against a kernel with ESP (the real-kernel VM tier: tools/vm-run), iproute2 as referee."""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import time

import pytest

from supervisor.errors import KernelError
from supervisor.kernel import netlink, xfrm
from supervisor.kernel.common import Action, DeleteResult
from supervisor.kernel.xfrm import XfrmAlgorithm, XfrmLifetime, XfrmSA

from test_xfrm_codec import CASES, KEY_AES128, KEY_SHA1, KEY_SHA256, load_fixture
from test_xfrm_policy import INF, PROTO_NAMES, wait_events

pytestmark = pytest.mark.realkernel

KEY_OTHER = "5152535455565758595a5b5c5d5e5f60"

# What charon installs, and what others might: auth+enc, AEAD with NAT-T, ESN, IPComp,
# replay counters, and a "foreign" SA sharing the destination of ours.
SA_SPECS = [
    f"src 192.0.2.1 dst 192.0.2.2 proto esp spi 0xc0000001 reqid 1 mode tunnel replay-window 32 "
    f"flag af-unspec auth-trunc hmac(sha256) 0x{KEY_SHA256} 128 enc cbc(aes) 0x{KEY_AES128} "
    f"mark 0x10 mask 0xff if_id 3",
    "src 192.0.2.1 dst 192.0.2.2 proto esp spi 0xc0000002 reqid 2 mode tunnel "
    "encap espinudp 4500 4500 0.0.0.0 aead rfc4106(gcm(aes)) 0x4142434445464748494a4b4c4d4e4f5051525354 128 "
    "sel src 10.1.0.0/16 dst 10.2.0.0/16 limit time-soft 3000 limit time-hard 3600",
    f"src fd00::1 dst fd01::1 proto esp spi 0x1000 reqid 7 mode transport replay-window 128 flag esn "
    f"auth hmac(sha1) 0x{KEY_SHA1} enc cbc(aes) 0x{KEY_AES128} output-mark 0x20 mask 0xff "
    f"extra-flag dont-encap-dscp",
    f"src 198.51.100.7 dst 192.0.2.2 proto esp spi 0x3000 reqid 99 mode tunnel replay-window 64 "
    f"replay-seq 5 replay-oseq 7 flag noecn decap-dscp enc cbc(aes) 0x{KEY_OTHER} "
    f"auth-trunc hmac(sha256) 0x{KEY_SHA256} 128 sel src 10.9.0.0/24 dst 0.0.0.0/0 proto tcp dport 443",
]
EXTRA_FLAG_BITS = {"dont-encap-dscp": 1, "oseq-may-wrap": 2}


# --- reading `ip -s -o xfrm state list` -------------------------------------

def _lim(text: str) -> int:
    return INF if text == "(INF)" else int(text)


def parse_ip_states(text: str) -> list[dict]:
    """`ip -s -o xfrm state list`: one SA per line, its lines joined by backslashes."""
    out = []
    for line in text.splitlines():
        if not line.strip():
            continue
        d: dict = {"mark": None, "output_mark": None, "if_id": 0, "algs": {}, "encap": None,
                   "replay": None, "sel": None, "extra_flags": 0}
        limits: list[int] = []
        parts = [p.strip() for p in line.split("\\")]
        i = 0
        while i < len(parts):
            part = parts[i]
            w = part.split()
            i += 1
            if not w:
                continue
            head = w[0]
            if head == "src" and "src" not in d:
                d.update(src=w[1], dst=w[3])
            elif head == "proto":
                d.update(proto=w[1], spi=int(w[3].split("(")[0], 16), reqid=int(w[5].split("(")[0]), mode=w[7])
            elif head == "replay-window" and "seq" in w:
                d["replay_window"] = int(w[1])
                d["seq"] = int(w[3], 16)
                d["flags"] = int(re.search(r"\(0x([01]+)\)", part).group(1), 2)
                m = re.search(r"extra_flag (.*?) \(0x", part)
                if m:
                    d["extra_flags"] = sum(EXTRA_FLAG_BITS[f] for f in m.group(1).split())
            elif head in ("mark", "output-mark"):
                v, m_ = w[1].split("/")
                d["mark" if head == "mark" else "output_mark"] = (int(v, 16), int(m_, 16))
            elif head in ("auth", "auth-trunc", "enc", "aead"):
                entry = (w[1], w[2].removeprefix("0x"), int(w[3].lstrip("(")))
                if head in ("auth-trunc", "aead"):
                    entry += (int(w[5]),)
                d["algs"][head] = entry
            elif head == "comp":
                d["algs"]["comp"] = (w[1],)
            elif head == "encap":
                d["encap"] = (w[2], int(w[4]), int(w[6]), w[8])
            elif part.startswith("anti-replay context:"):
                m = re.search(r"seq 0x(\w+), oseq 0x(\w+), bitmap 0x(\w+)", part)
                d["replay"] = ("legacy", int(m.group(1), 16), int(m.group(2), 16), int(m.group(3), 16))
            elif part.startswith("anti-replay esn context:"):
                m1 = re.search(r"seq-hi 0x(\w+), seq 0x(\w+), oseq-hi 0x(\w+), oseq 0x(\w+)", parts[i])
                m2 = re.search(r"replay_window (\d+), bitmap-length (\d+)", parts[i + 1])
                words = tuple(int(x, 16) for x in parts[i + 2].split())
                i += 3
                d["replay"] = ("esn", *(int(g, 16) for g in m1.groups()), int(m2.group(1)),
                               int(m2.group(2)), words)
            elif head == "if_id":
                d["if_id"] = int(w[1], 16)
            elif head == "sel":
                pairs = dict(zip(w[1::2], w[2::2]))
                d["sel"] = {"src": pairs["src"], "dst": pairs["dst"], "proto": pairs.get("proto"),
                            "sport": int(pairs["sport"]) if "sport" in pairs else None,
                            "dport": int(pairs["dport"]) if "dport" in pairs else None,
                            "uid": int(pairs["uid"])}
            elif head in ("limit:", "expire"):
                m = re.search(r"soft (\S+?)\((?:bytes|packets|sec)\), hard (\S+?)\(", part)
                limits += [_lim(m.group(1)), _lim(m.group(2))]
            elif head == "add":
                d["add"] = " ".join(w[1:3])
            elif head == "replay-window" and "failed" in w:
                d["stats"] = (int(w[1]), int(w[3]), int(w[5]))
        d["lifetime"] = tuple(limits)
        out.append(d)
    return out


def as_ip_shows(sa: XfrmSA) -> dict:
    """Our record in the shape parse_ip_states returns: every field ip prints."""
    lft = sa.lifetime
    algs: dict = {}
    # with both, ip prints auth-trunc only (the kernel reports every auth algorithm both ways)
    if sa.auth_trunc is not None:
        a = sa.auth_trunc
        algs["auth-trunc"] = (a.name, a.key, a.key_len_bits, a.icv_len_bits)
    elif sa.auth is not None:
        algs["auth"] = (sa.auth.name, sa.auth.key, sa.auth.key_len_bits)
    if sa.crypt is not None:
        algs["enc"] = (sa.crypt.name, sa.crypt.key, sa.crypt.key_len_bits)
    if sa.aead is not None:
        algs["aead"] = (sa.aead.name, sa.aead.key, sa.aead.key_len_bits, sa.aead.icv_len_bits)
    if sa.comp is not None:
        algs["comp"] = (sa.comp.name,)
    r = sa.replay
    if r is None:
        replay = None
    elif r.esn:
        replay = ("esn", r.seq_hi, r.seq, r.oseq_hi, r.oseq, r.replay_window, r.bmp_len, r.bmp)
    else:
        replay = ("legacy", r.seq, r.oseq, r.bitmap)
    s = sa.selector
    sel = None
    if not sa.flags & 32:      # XFRM_STATE_AF_UNSPEC: ip does not print the selector then
        fam = s.family or sa.family
        any_addr = "0.0.0.0" if fam == xfrm.AF_INET else "::"
        sel = {"src": f"{s.saddr or any_addr}/{s.prefixlen_s}", "dst": f"{s.daddr or any_addr}/{s.prefixlen_d}",
               "proto": PROTO_NAMES.get(s.proto, str(s.proto)) if s.proto else None,
               "sport": s.sport if s.sport_mask else None, "dport": s.dport if s.dport_mask else None,
               "uid": s.user}
    return {
        "src": sa.saddr, "dst": sa.daddr, "proto": xfrm.PROTO_NAMES.get(sa.proto, str(sa.proto)),
        "spi": sa.spi, "reqid": sa.reqid, "mode": xfrm.MODE_NAMES[sa.mode],
        "replay_window": sa.replay_window, "seq": sa.seq, "flags": sa.flags, "extra_flags": sa.extra_flags,
        "mark": sa.mark, "output_mark": sa.output_mark, "if_id": sa.if_id, "algs": algs,
        "encap": None if sa.encap is None else (xfrm.ENCAP_NAMES[sa.encap.type], sa.encap.sport,
                                                  sa.encap.dport, sa.encap.oa),
        "replay": replay, "sel": sel,
        "lifetime": (lft.soft_byte_limit, lft.hard_byte_limit, lft.soft_packet_limit, lft.hard_packet_limit,
                     lft.soft_add_expires_seconds, lft.hard_add_expires_seconds,
                     lft.soft_use_expires_seconds, lft.hard_use_expires_seconds),
        "add": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sa.curlft.add_time)),
        "stats": (sa.stats.replay_window, sa.stats.replay, sa.stats.integrity_failed),
    }


def ip_show(ns) -> list[dict]:
    return parse_ip_states(ns.run("ip", "-s", "-o", "xfrm", "state", "list").stdout)


def ip_add(ns, spec: str) -> None:
    ns.run("ip", "xfrm", "state", "add", *spec.split())


def dump(ns) -> list[XfrmSA]:
    with ns.enter():
        return xfrm.dump_sas()


def stable(sa: XfrmSA) -> XfrmSA:
    """SA without what changes by itself (add time, counters)."""
    return dataclasses.replace(sa, curlft=xfrm.NO_CURLFT, stats=xfrm.NO_STATS, lastused=0)


def by_spi(sas: list[XfrmSA]) -> dict[tuple, XfrmSA]:
    return {(sa.daddr, sa.spi, sa.proto): sa for sa in sas}


OURS = XfrmSA(xfrm.AF_INET, "192.0.2.2", 0xC1234567, xfrm.IPPROTO_ESP, "192.0.2.1", mode=xfrm.MODE_TUNNEL,
              reqid=5, replay_window=32,
              auth_trunc=XfrmAlgorithm("hmac(sha256)", 256, KEY_SHA256, 128),
              crypt=XfrmAlgorithm("cbc(aes)", 128, KEY_AES128))


# --- dumps ------------------------------------------------------------------

def test_dump_matches_ip_state_for_every_field(netns):
    for spec in SA_SPECS:
        ip_add(netns, spec)
    ours = dump(netns)
    theirs = {(d["dst"], d["spi"], d["proto"]): d for d in ip_show(netns)}
    assert len(ours) == len(theirs) == len(SA_SPECS)
    for sa in ours:
        assert as_ip_shows(sa) == theirs[(sa.daddr, sa.spi, xfrm.PROTO_NAMES[sa.proto])], sa.describe()
    esn = next(sa for sa in ours if sa.flags & xfrm.SA_FLAG_ESN)
    assert esn.replay.esn and esn.replay.replay_window == 128 and len(esn.replay.bmp) == esn.replay.bmp_len
    counted = next(sa for sa in ours if sa.spi == 0x3000)
    assert (counted.replay.seq, counted.replay.oseq) == (5, 7)


def test_ipcomp_sa_and_its_tunnel_sa_are_dumped(netns):
    (command, _) = load_fixture("state_add_comp_v4")
    netns.run(*shlex.split(command))
    ours = dump(netns)
    # the kernel adds an IPIP SA (proto 4) carrying the uncompressed packets
    assert sorted(sa.proto for sa in ours) == [4, xfrm.IPPROTO_COMP]
    theirs = {(d["spi"], d["proto"]): d for d in ip_show(netns)}
    for sa in ours:
        assert as_ip_shows(sa) == theirs[(sa.spi, xfrm.PROTO_NAMES.get(sa.proto, str(sa.proto)))]


def test_sas_added_through_api_equal_those_added_by_ip(netns_factory):
    """The kernel stores what our encoder sent exactly as what iproute2 sent, keys included."""
    by_ip, by_api = netns_factory(), netns_factory()
    names = ["state_add_esp_cbc_sha256_tunnel_v4", "state_add_aead_encap_v4",
             "state_add_esp_v6_esn_output_mark", "state_add_comp_v4"]
    for name in names:
        command, _ = load_fixture(name)
        by_ip.run(*shlex.split(command))
        with by_api.enter():
            CASES[name](xfrm.open_socket())
    ours, theirs = dump(by_api), dump(by_ip)
    assert len(ours) == len(theirs) == 5          # IPComp brings its IPIP SA
    assert sorted(map(stable, ours), key=repr) == sorted(map(stable, theirs), key=repr)


def test_json_redacts_keys_unless_asked_and_round_trips(netns):
    for spec in SA_SPECS:
        ip_add(netns, spec)
    sas = dump(netns)
    text = json.dumps(xfrm.to_json_all(sas))
    for key in (KEY_SHA256, KEY_AES128, KEY_SHA1, KEY_OTHER, "4142434445464748494a4b4c4d4e4f50"):
        assert key not in text
    assert all(XfrmSA.from_json(sa.to_json(include_keys=True)) == sa for sa in sas)
    redacted = [XfrmSA.from_json(d) for d in json.loads(text)]
    assert [r.key() for r in redacted] == [sa.key() for sa in sas]
    assert all(alg.key is None for r in redacted for alg in r.algorithms().values())


# --- add / update / delete --------------------------------------------------

def test_add_update_delete_through_api_verified_with_ip(netns):
    with netns.enter(), xfrm.open_socket() as sock:
        xfrm.add_sa(OURS, sock=sock)
        (shown,) = ip_show(netns)
        (dumped,) = xfrm.dump_sas(sock)
        assert shown == as_ip_shows(dumped)
        assert dumped.auth_trunc == OURS.auth_trunc and dumped.crypt == OURS.crypt

        with pytest.raises(netlink.AlreadyExists, match=re.escape(f"cannot add {OURS.describe()}: File exists")):
            xfrm.add_sa(OURS, sock=sock)

        limited = dataclasses.replace(dumped, lifetime=XfrmLifetime(soft_add_expires_seconds=600,
                                                                    hard_add_expires_seconds=900))
        xfrm.update_sa(limited, sock=sock)
        (shown,) = ip_show(netns)
        assert shown["lifetime"][4:6] == (600, 900)

        assert xfrm.delete_sa(OURS, sock=sock) is DeleteResult.DELETED
        assert ip_show(netns) == []
        assert xfrm.delete_sa(OURS, sock=sock) is DeleteResult.ALREADY_GONE


def test_delete_leaves_every_other_sa_untouched(netns):
    for spec in SA_SPECS:
        ip_add(netns, spec)                            # foreign: not added by us
    # keys that differ in one component each (an unmarked SA would match every mark, so the
    # mark neighbours are both marked)
    ours = dataclasses.replace(OURS, mark=(1, 0xFF))
    neighbours = [dataclasses.replace(ours, spi=OURS.spi + 1), dataclasses.replace(ours, daddr="192.0.2.3"),
                  dataclasses.replace(ours, mark=(2, 0xFF)), dataclasses.replace(ours, proto=xfrm.IPPROTO_AH,
                                                                                  crypt=None)]
    with netns.enter():
        for sa in [ours] + neighbours:
            xfrm.add_sa(sa)
        before = xfrm.dump_sas()
        assert len(before) == len(SA_SPECS) + 5
        target = next(sa for sa in before if sa.key() == ours.key())
        assert xfrm.delete_sa(target) is DeleteResult.DELETED
        after = xfrm.dump_sas()
    assert sorted(after, key=repr) == sorted((sa for sa in before if sa is not target), key=repr)
    assert len(ip_show(netns)) == len(SA_SPECS) + 4


def test_delete_of_a_marked_sa_needs_its_mark(netns):
    ip_add(netns, SA_SPECS[0])                         # mark 0x10/0xff
    with netns.enter():
        (sa,) = xfrm.dump_sas()
        assert sa.mark == (0x10, 0xFF)
        assert xfrm.delete_sa(dataclasses.replace(sa, mark=(0x11, 0xFF))) is DeleteResult.ALREADY_GONE
        assert len(xfrm.dump_sas()) == 1
        assert xfrm.delete_sa(sa) is DeleteResult.DELETED
        assert xfrm.delete_sa(sa) is DeleteResult.ALREADY_GONE
        assert xfrm.dump_sas() == []


def test_batch_delete_removes_exactly_the_given_sas_and_reports_each(netns):
    for spec in SA_SPECS:
        ip_add(netns, spec)                            # foreign: not added by us
    ours = [dataclasses.replace(OURS, spi=0xC1000000 + i, daddr=f"192.0.2.{2 + i % 3}",
                                mark=(1 + i % 3, 0xFF) if i % 4 == 0 else None) for i in range(600)]
    with netns.enter(), xfrm.open_socket() as sock:
        for sa in ours:
            xfrm.add_sa(sa, sock=sock)
        before = xfrm.dump_sas(sock)
        mine = [sa for sa in before if sa.spi >= 0xC1000000]
        foreign = [sa for sa in before if sa.spi < 0xC1000000]
        larval = dataclasses.replace(mine[0], spi=0)
        marked = next(sa for sa in mine if sa.mark is not None)
        wrong_mark = dataclasses.replace(marked, mark=(0x77, 0xFF))    # an unmarked SA would match it
        results = xfrm.delete_sas([larval, wrong_mark] + mine, sock=sock)
        assert isinstance(results[0], KernelError) and "larval" in str(results[0])
        assert results[1] is DeleteResult.ALREADY_GONE
        assert results[2:] == [DeleteResult.DELETED] * len(mine)
        assert sorted(xfrm.dump_sas(sock), key=repr) == sorted(foreign, key=repr)
        assert xfrm.delete_sas(mine, sock=sock) == [DeleteResult.ALREADY_GONE] * len(mine)
    assert len(ip_show(netns)) == len(SA_SPECS)


# --- monitor ----------------------------------------------------------------

def test_monitor_reports_sa_changes_with_port_ids_and_whole_records(netns):
    with netns.enter(), xfrm.XfrmMonitor() as mon, xfrm.open_socket() as sock:
        xfrm.add_sa(OURS, sock=sock)
        ip_add(netns, SA_SPECS[1])
        (ours, by_ip) = wait_events(mon, lambda ev: len(ev) >= 2)
        assert (ours.family, ours.action, ours.port_id) == ("xfrm_sa", Action.NEW, sock.port_id)
        assert ours.record.key() == OURS.key() and ours.record.crypt == OURS.crypt   # keys travel too
        assert (by_ip.action, by_ip.port_id, by_ip.record.spi) == (Action.NEW, 0, 0xC0000002)

        (dumped,) = [sa for sa in xfrm.dump_sas(sock) if sa.key() == OURS.key()]
        xfrm.update_sa(dataclasses.replace(dumped, lifetime=XfrmLifetime(hard_add_expires_seconds=900)),
                       sock=sock)
        (upd,) = wait_events(mon, lambda ev: len(ev) >= 1)
        assert (upd.action, upd.port_id, upd.record.lifetime.hard_add_expires_seconds) == \
            (Action.UPDATE, sock.port_id, 900)

        (dumped,) = [sa for sa in xfrm.dump_sas(sock) if sa.key() == OURS.key()]
        xfrm.delete_sa(OURS, sock=sock)
        (gone,) = wait_events(mon, lambda ev: len(ev) >= 1)
        # DELSA carries the id; the whole SA is in XFRMA_SA plus the top-level attributes
        assert (gone.action, gone.port_id) == (Action.DELETE, sock.port_id)
        assert stable(gone.record) == stable(dumped)

        netns.run("ip", "xfrm", "state", "flush")
        (flush,) = wait_events(mon, lambda ev: len(ev) >= 1)
        assert (flush.family, flush.action, flush.record, flush.port_id) == ("xfrm_sa", Action.FLUSH, None, 0)


def test_monitor_reports_sa_expiry_by_the_kernel(netns):
    with netns.enter(), xfrm.XfrmMonitor() as mon:
        # lifetimes are checked against whole seconds: a soft 1 / hard 2 pair can skip the soft
        # warning when the timer runs late, so leave a second of slack
        xfrm.add_sa(dataclasses.replace(OURS, lifetime=XfrmLifetime(soft_add_expires_seconds=1,
                                                                    hard_add_expires_seconds=3)))
        events = wait_events(mon, lambda ev: any(e.action is Action.EXPIRE and e.hard for e in ev))
        expiries = [e for e in events if e.action is Action.EXPIRE]
        assert [e.hard for e in expiries] == [False, True]
        assert all(e.port_id == 0 and e.record.key() == OURS.key() for e in expiries)
        assert xfrm.dump_sas() == []
