"""Addresses: dump compared field by field with iproute2, exact deletes, adds, JSON."""

from __future__ import annotations

import errno
import json

import pytest

from supervisor.errors import KernelError
from supervisor.kernel.addresses import Address, add_address, delete_address, dump_addresses
from supervisor.kernel.common import DeleteResult

# accept_dad=0 first: link-local addresses must not change flags (tentative) mid-test.
ADDRESSES = """
sysctl -qw net.ipv6.conf.default.accept_dad=0 net.ipv6.conf.all.accept_dad=0
ip link add v0 type veth peer name v1
ip link set v0 up
ip link set v1 up
ip addr add 192.0.2.10/24 brd + dev v0
ip addr add 192.0.2.11/24 dev v0 label v0:sec
ip addr add 10.0.0.1 peer 10.0.0.2/32 dev v0
ip addr add 198.18.0.1/24 dev v0 metric 50
ip addr add 203.0.113.7/32 dev lo valid_lft 300 preferred_lft 200
ip addr add 192.0.2.10/24 dev v1
ip -6 addr add 2001:db8::10/64 dev v0 nodad noprefixroute
ip -6 addr add 2001:db8:1::1/128 dev lo
ip -6 addr add 2001:db8:2::1/64 dev v1 nodad valid_lft 600 preferred_lft 0
"""

FLAG_WORDS = {0x02: "nodad", 0x04: "optimistic", 0x08: "dadfailed", 0x10: "home",
              0x20: "deprecated", 0x40: "tentative", 0x100: "mngtmpaddr", 0x200: "noprefixroute",
              0x400: "autojoin", 0x800: "stable-privacy"}
SCOPES = {0: "global", 200: "site", 253: "link", 254: "host"}
FOREVER = 4294967295

from caps import without_net_admin


def ip_addresses(ns) -> dict[str, list[dict]]:
    """ifname -> `ip -d -j addr show` entries, lifetimes left out (they count down)."""
    links = json.loads(ns.run("ip", "-d", "-j", "addr", "show").stdout)
    out = {}
    for link in links:
        entries = []
        for info in link["addr_info"]:
            info = dict(info)
            info["valid_life_time"] = info["valid_life_time"] == FOREVER
            info["preferred_life_time"] = info["preferred_life_time"] == FOREVER
            entries.append(info)
        out[link["ifname"]] = sorted(entries, key=lambda e: (e["family"], e["local"]))
    return out


def as_ip_json(a: Address) -> dict:
    """What `ip -d -j addr show` prints for A (iproute2 6.1), lifetimes as "is forever"."""
    d: dict = {"family": a.family, "local": a.address}
    if a.peer is not None:
        d["address"] = a.peer
    d["prefixlen"] = a.prefixlen
    if a.broadcast is not None:
        d["broadcast"] = a.broadcast
    if a.rt_priority is not None:
        d["metric"] = a.rt_priority
    d["scope"] = SCOPES[a.scope]
    if not a.flags & 0x80:
        d["dynamic"] = True
    if a.flags & 0x01:
        d["secondary" if a.family == "inet" else "temporary"] = True
    for bit, word in FLAG_WORDS.items():
        if a.flags & bit:
            d[word] = True
    if a.label is not None:
        d["label"] = a.label
    d["valid_life_time"] = a.valid_lft is None
    d["preferred_life_time"] = a.preferred_lft is None
    return d


def grouped(addresses: list[Address]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for a in addresses:
        out.setdefault(a.ifname, []).append(as_ip_json(a))
    return {name: sorted(v, key=lambda e: (e["family"], e["local"])) for name, v in out.items()}


def keys(ns) -> set[tuple]:
    with ns.enter():
        return {a.key() for a in dump_addresses()}


@pytest.fixture
def addressed(netns):
    netns.sh(ADDRESSES)
    _settled(netns)
    return netns


def _settled(ns, timeout: float = 10.0) -> None:
    """Wait for the kernel's own addresses: the veths' link-local ones come a moment after the
    links are up (from a work queue), so a dump and `ip` a moment apart could see different sets."""
    import time
    deadline = time.monotonic() + timeout
    while True:
        links = {link["ifname"]: link for link in json.loads(ns.run("ip", "-j", "addr", "show").stdout)}
        if all(any(a.get("scope") == "link" and a["family"] == "inet6" and not a.get("tentative")
                   for a in links[name]["addr_info"]) for name in ("v0", "v1")):
            return
        assert time.monotonic() < deadline, f"no link-local addresses on v0/v1 after {timeout} s: {links}"
        time.sleep(0.05)


def find(addresses: list[Address], address: str, ifname: str) -> Address:
    return next(a for a in addresses if a.address == address and a.ifname == ifname)


def test_dump_matches_ip_field_by_field(addressed):
    with addressed.enter():
        addresses = dump_addresses()
    assert grouped(addresses) == ip_addresses(addressed)


def test_records_carry_index_name_label_peer_and_lifetimes(addressed):
    v0 = int(addressed.run("cat", "/sys/class/net/v0/ifindex").stdout)
    with addressed.enter():
        addresses = dump_addresses()
    secondary = find(addresses, "192.0.2.11", "v0")
    assert (secondary.index, secondary.label, secondary.flag_names) == (v0, "v0:sec", ["secondary", "permanent"])
    assert secondary.describe() == "address 192.0.2.11/24 dev v0 label v0:sec"
    peer = find(addresses, "10.0.0.1", "v0")
    assert peer.describe() == "address 10.0.0.1 peer 10.0.0.2/32 dev v0"
    timed = find(addresses, "203.0.113.7", "lo")
    assert 290 <= timed.valid_lft <= 300 and 190 <= timed.preferred_lft <= 200
    assert find(addresses, "2001:db8:2::1", "v1").preferred_lft == 0


def test_dump_of_one_interface_and_of_a_missing_one(addressed):
    with addressed.enter():
        on_v1 = dump_addresses("v1")
        with pytest.raises(KernelError, match="no network interface named 'eth7'") as caught:
            dump_addresses("eth7")
    assert {a.ifname for a in on_v1} == {"v1"}
    assert {a.address for a in on_v1 if a.scope == 0} == {"192.0.2.10", "2001:db8:2::1"}
    assert caught.value.errno == errno.ENODEV


@pytest.mark.parametrize("address, ifname", [
    ("192.0.2.10", "v1"),       # the same address stays on v0
    ("10.0.0.1", "v0"),         # point-to-point
    ("192.0.2.11", "v0"),       # a labelled secondary
    ("203.0.113.7", "lo"),
    ("2001:db8::10", "v0"),
    ("2001:db8:2::1", "v1"),
])
def test_delete_removes_exactly_that_address(addressed, address, ifname):
    before = keys(addressed)
    with addressed.enter():
        target = find(dump_addresses(), address, ifname)
        assert delete_address(target) is DeleteResult.DELETED
        assert delete_address(target) is DeleteResult.ALREADY_GONE
    assert before - keys(addressed) == {target.key()}
    assert keys(addressed) <= before


def test_deleting_a_primary_takes_its_secondaries_unless_promoted(addressed):
    # The kernel's rule, shown here because recovery must not be surprised by it.
    with addressed.enter():
        primary = find(dump_addresses(), "192.0.2.10", "v0")
        assert delete_address(primary) is DeleteResult.DELETED
        assert not [a for a in dump_addresses("v0") if a.address == "192.0.2.11"]
    addressed.sh("ip addr add 192.0.2.10/24 dev v0\nip addr add 192.0.2.11/24 dev v0\n"
                 "sysctl -qw net.ipv4.conf.v0.promote_secondaries=1")
    with addressed.enter():
        primary = find(dump_addresses(), "192.0.2.10", "v0")
        assert delete_address(primary) is DeleteResult.DELETED
        assert [a.address for a in dump_addresses("v0") if a.address == "192.0.2.11"] == ["192.0.2.11"]


def test_address_of_a_vanished_interface_is_already_gone(addressed):
    with addressed.enter():
        target = find(dump_addresses(), "2001:db8:2::1", "v1")
    addressed.run("ip", "link", "del", "v1")
    with addressed.enter():
        assert delete_address(target) is DeleteResult.ALREADY_GONE


def test_add_by_interface_name_is_seen_by_ip_and_twice_is_eexist(addressed):
    vip = Address(family="inet", address="100.64.0.5", prefixlen=32, index=None, ifname="v0")
    vip6 = Address(family="inet6", address="2001:db8:99::5", prefixlen=128, index=None,
                   ifname="v0", flags=0x02 | 0x80)
    labelled = Address(family="inet", address="100.64.1.1", prefixlen=24, index=None, ifname="v0",
                       label="v0:vip", broadcast="100.64.1.255", valid_lft=500, preferred_lft=400)
    with addressed.enter():
        for a in (vip, vip6, labelled):
            add_address(a)
        with pytest.raises(KernelError) as caught:
            add_address(vip)
    assert caught.value.errno == errno.EEXIST
    assert str(caught.value) == "cannot add address 100.64.0.5/32 dev v0: File exists"
    on_v0 = {e["local"]: e for e in ip_addresses(addressed)["v0"]}
    assert on_v0["100.64.0.5"] == {"family": "inet", "local": "100.64.0.5", "prefixlen": 32,
                                   "scope": "global", "label": "v0", "valid_life_time": True,
                                   "preferred_life_time": True}
    assert on_v0["2001:db8:99::5"] == {"family": "inet6", "local": "2001:db8:99::5",
                                       "prefixlen": 128, "scope": "global", "nodad": True,
                                       "valid_life_time": True, "preferred_life_time": True}
    assert on_v0["100.64.1.1"] == {"family": "inet", "local": "100.64.1.1", "prefixlen": 24,
                                   "broadcast": "100.64.1.255", "scope": "global", "dynamic": True,
                                   "label": "v0:vip", "valid_life_time": False,
                                   "preferred_life_time": False}


def test_delete_refused_by_the_kernel_raises_naming_the_address(addressed):
    with addressed.enter():
        target = find(dump_addresses(), "203.0.113.7", "lo")
        with without_net_admin(), pytest.raises(KernelError) as caught:
            delete_address(target)
    assert str(caught.value) == "cannot delete address 203.0.113.7/32 dev lo: Operation not permitted"
    assert caught.value.errno == errno.EPERM
    assert target.key() in keys(addressed)


def test_json_round_trip_of_every_dumped_address(addressed):
    with addressed.enter():
        addresses = dump_addresses()
    for a in addresses:
        assert Address.from_json(json.loads(json.dumps(a.to_json()))) == a
    assert Address.VOLATILE <= set(addresses[0].to_json())


@pytest.mark.parametrize("change, error", [
    ({"family": "inet7"}, ValueError),
    ({"address": "2001:db8::1"}, ValueError),
    ({"address": "not an address"}, ValueError),
    ({"prefixlen": 33}, ValueError),
    ({"index": "3"}, TypeError),
    ({"flags": False}, TypeError),
])
def test_from_json_rejects_bad_input(change, error):
    good = Address(family="inet", address="192.0.2.1", prefixlen=24, index=3, ifname="eth0").to_json()
    with pytest.raises(error):
        Address.from_json({**good, **change})
    with pytest.raises(KeyError):
        Address.from_json({k: v for k, v in good.items() if k != "address"})


def test_struct_decoder_makes_every_address_exactly_as_pyroute2_decoding_does(addressed):
    from supervisor.kernel import addresses as addresses_mod, netlink, rtnl as rtnl_mod
    with addressed.enter(), netlink.NetlinkSocket(netlink.NETLINK_ROUTE, strict_check=True) as sock:
        names = rtnl_mod.interface_names(sock)
        chunks = sock.dump_raw(rtnl_mod.RTM_GETADDR, bytes(8))      # every family
    ours = addresses_mod.decode_addresses(chunks, names)
    theirs = []
    for data in chunks:
        for off, _len, msg_type, *_ in netlink.walk_messages(data):
            if msg_type == rtnl_mod.RTM_NEWADDR:
                msg = rtnl_mod.AddrMsg(data, offset=off)
                msg.decode()
                address = addresses_mod.address_from_msg(msg, names)
                if address is not None:
                    theirs.append(address)
    assert ours == theirs
    for field in ("peer", "label", "broadcast", "proto", "rt_priority", "valid_lft"):
        assert any(getattr(a, field) is not None for a in ours), field
