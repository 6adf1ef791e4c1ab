"""Interface addresses (IPv4 and IPv6) over rtnetlink: dump, add, delete.

charon installs virtual IPs as addresses (``install_virtual_ip``). Deleting
an IPv4 primary address also removes its secondaries unless the interface
has promote_secondaries set: that is the kernel's rule, not ours.
"""

from __future__ import annotations

import errno
import socket
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import KernelError
from .common import DeleteResult
from .netlink import walk_messages
from .rtnl import (
    AttrReader,
    FAMILY_NAMES,
    FAMILY_NUMBERS,
    PROTOCOL_NAMES,
    RTM_DELADDR,
    RTM_GETADDR,
    RTM_NEWADDR,
    SCOPE_NAMES,
    Rtnl,
    interface_index,
    interface_names,
    json_addr,
    json_family,
    json_int,
    json_prefixlen,
    json_str,
    name_of,
    using,
)

if TYPE_CHECKING:
    from .rtnl import AddrMsg

IFA_FLAG_NAMES = {
    0x01: "secondary", 0x02: "nodad", 0x04: "optimistic", 0x08: "dadfailed",
    0x10: "homeaddress", 0x20: "deprecated", 0x40: "tentative", 0x80: "permanent",
    0x100: "managetempaddr", 0x200: "noprefixroute", 0x400: "mcautojoin", 0x800: "stable-privacy",
}
# Flags a request may set; the rest (secondary, tentative, permanent, ...) is kernel state.
_REQUEST_FLAGS = 0x02 | 0x04 | 0x10 | 0x100 | 0x200 | 0x400
_FOREVER = 0xFFFFFFFF

# IPv4 and IPv6 both answer EADDRNOTAVAIL; ENODEV when the interface itself is gone.
_GONE = frozenset({errno.EADDRNOTAVAIL, errno.ENODEV})


@dataclass(frozen=True, slots=True)
class Address:
    """One interface address (``ip addr`` terms)."""

    FAMILY: ClassVar[str] = "address"
    VOLATILE: ClassVar[frozenset[str]] = frozenset({"valid_lft", "preferred_lft"})

    family: str                     # "inet" | "inet6"
    address: str                    # this host's address (IFA_LOCAL, else IFA_ADDRESS)
    prefixlen: int
    index: int | None               # interface index ...
    ifname: str | None              # ... and name
    peer: str | None = None         # point-to-point peer (IFA_ADDRESS differing from IFA_LOCAL)
    scope: int = 0
    flags: int = 0                  # IFA_F_* (all 32 bits of IFA_FLAGS)
    label: str | None = None        # IPv4 label (defaults to the interface name)
    broadcast: str | None = None
    proto: int | None = None        # IFA_PROTO: who added it (kernel_lo, kernel_ra, ...)
    rt_priority: int | None = None  # metric of the prefix route
    valid_lft: int | None = None    # seconds left; None = forever
    preferred_lft: int | None = None

    @property
    def scope_name(self) -> str:
        return name_of(SCOPE_NAMES, self.scope)

    @property
    def flag_names(self) -> list[str]:
        return [name for bit, name in IFA_FLAG_NAMES.items() if self.flags & bit]

    def key(self) -> tuple:
        return (self.family, self.index, self.address, self.prefixlen, self.peer)

    def describe(self) -> str:
        parts = ["address"]
        if self.peer is not None:
            parts += [self.address, "peer", f"{self.peer}/{self.prefixlen}"]
        else:
            parts.append(f"{self.address}/{self.prefixlen}")
        parts += ["dev", self.ifname or f"if{self.index}"]
        if self.label is not None and self.label != self.ifname:
            parts += ["label", self.label]
        return " ".join(parts)

    def to_json(self, include_keys: bool = False) -> dict:
        return {
            "family": self.family, "address": self.address, "prefixlen": self.prefixlen,
            "index": self.index, "ifname": self.ifname, "peer": self.peer,
            "scope": self.scope, "scope_name": self.scope_name,
            "flags": self.flags, "flag_names": self.flag_names,
            "label": self.label, "broadcast": self.broadcast, "proto": self.proto,
            "proto_name": name_of(PROTOCOL_NAMES, self.proto) if self.proto is not None else None,
            "rt_priority": self.rt_priority,
            "valid_lft": self.valid_lft, "preferred_lft": self.preferred_lft,
        }

    @classmethod
    def from_json(cls, d: dict) -> "Address":
        if not isinstance(d, dict):
            raise TypeError(f"an address must be an object, not {d!r}")
        family = json_family(d)
        return cls(
            family=family,
            address=json_addr(d, "address", family),
            prefixlen=json_prefixlen(d, "prefixlen", family),
            index=json_int(d, "index", optional=True),
            ifname=json_str(d, "ifname", optional=True),
            peer=json_addr(d, "peer", family, optional=True),
            scope=json_int(d, "scope", maximum=0xFF),
            flags=json_int(d, "flags"),
            label=json_str(d, "label", optional=True),
            broadcast=json_addr(d, "broadcast", family, optional=True),
            proto=json_int(d, "proto", optional=True, maximum=0xFF),
            rt_priority=json_int(d, "rt_priority", optional=True),
            valid_lft=json_int(d, "valid_lft", optional=True),
            preferred_lft=json_int(d, "preferred_lft", optional=True),
        )


def _lifetime(value: int) -> int | None:
    return None if value == _FOREVER else value


def address_from_msg(msg: AddrMsg, names: dict[int, str]) -> Address | None:
    """An Address from pyroute2's decoding of RTM_NEWADDR/DELADDR (the reference
    ``address_at`` is tested against); None for other families."""
    family = FAMILY_NAMES.get(msg["family"])
    if family is None:
        return None
    local = msg.get_attr("IFA_LOCAL")
    remote = msg.get_attr("IFA_ADDRESS")
    address = local if local is not None else remote
    peer = remote if local is not None and remote is not None and remote != local else None
    flags = msg.get_attr("IFA_FLAGS")
    valid = preferred = None
    cacheinfo = msg.get_attr("IFA_CACHEINFO")
    if cacheinfo is not None:
        valid = _lifetime(cacheinfo["ifa_valid"])
        preferred = _lifetime(cacheinfo["ifa_preferred"])
    return Address(
        family=family,
        address=address,
        prefixlen=msg["prefixlen"],
        index=msg["index"],
        ifname=names.get(msg["index"]),
        peer=peer,
        scope=msg["scope"],
        flags=flags if flags is not None else msg["flags"],
        label=msg.get_attr("IFA_LABEL"),
        broadcast=msg.get_attr("IFA_BROADCAST"),
        proto=msg.get_attr("IFA_PROTO"),
        rt_priority=msg.get_attr("IFA_RT_PRIORITY"),
        valid_lft=valid,
        preferred_lft=preferred,
    )


# --- struct decoding (linux/if_addr.h), record for record what address_from_msg makes ---

IFA_ADDRESS, IFA_LOCAL, IFA_LABEL, IFA_BROADCAST, IFA_CACHEINFO = 1, 2, 3, 4, 6
IFA_FLAGS, IFA_RT_PRIORITY, IFA_PROTO = 8, 9, 11

_IFADDRMSG = struct.Struct("=BBBBI")        # struct ifaddrmsg
_IFA_CACHEINFO = struct.Struct("=II")       # ifa_prefered, ifa_valid (then cstamp, tstamp)


def address_at(buf: bytes, off: int, end: int, names: dict[int, str], what: str) -> Address | None:
    """The Address of the RTM_NEWADDR/DELADDR payload BUF[off:end]; None for other families."""
    if end - off < _IFADDRMSG.size:
        raise KernelError(f"cannot {what}: a {end - off}-byte address message is too short")
    af, prefixlen, hdr_flags, scope, index = _IFADDRMSG.unpack_from(buf, off)
    family = FAMILY_NAMES.get(af)
    if family is None:
        return None
    attrs = AttrReader(buf, off + _IFADDRMSG.size, end, what)
    try:
        local = attrs.address(IFA_LOCAL)
        remote = attrs.address(IFA_ADDRESS)
        flags = attrs.u32(IFA_FLAGS)
        valid = preferred = None
        cacheinfo = attrs.unpack(IFA_CACHEINFO, _IFA_CACHEINFO)
        if cacheinfo is not None:
            raw_preferred, raw_valid = cacheinfo
            valid, preferred = _lifetime(raw_valid), _lifetime(raw_preferred)
        return Address(
            family=family,
            address=local if local is not None else remote,
            prefixlen=prefixlen,
            index=index,
            ifname=names.get(index),
            peer=remote if local is not None and remote is not None and remote != local else None,
            scope=scope,
            flags=flags if flags is not None else hdr_flags,
            label=attrs.text(IFA_LABEL),
            broadcast=attrs.address(IFA_BROADCAST),
            proto=attrs.u8(IFA_PROTO),
            rt_priority=attrs.u32(IFA_RT_PRIORITY),
            valid_lft=valid,
            preferred_lft=preferred,
        )
    except (ValueError, struct.error, OSError) as exc:
        raise KernelError(f"cannot {what}: undecodable address attribute ({exc})") from None


def decode_addresses(chunks: list[bytes], names: dict[int, str],
                     what: str = "decode addresses") -> list[Address]:
    """The IPv4/IPv6 addresses in the datagrams of an RTM_GETADDR dump, in the kernel's order."""
    addresses = []
    for data in chunks:
        for off, length, msg_type, _flags, _seq, _pid in walk_messages(data):
            if msg_type == RTM_NEWADDR:
                address = address_at(data, off + 16, off + length, names, what)
                if address is not None:
                    addresses.append(address)
    return addresses


def dump_addresses(ifname: str | None = None, *, rtnl: Rtnl | None = None) -> list[Address]:
    """IPv4 and IPv6 addresses (of interface IFNAME when given); raises KernelError on failure.

    An IFNAME that does not exist raises KernelError(ENODEV): it is not "no addresses".
    """
    with using(rtnl) as r:
        names = interface_names(r)
        index = interface_index(names, ifname, "dump addresses") if ifname is not None else 0
        addresses: list[Address] = []
        for af in (socket.AF_INET, socket.AF_INET6):
            what = f"dump {FAMILY_NAMES[af]} addresses" + (f" of dev {ifname}" if ifname else "")
            # the index is filtered in the kernel (strict checking)
            chunks = r.dump_raw(RTM_GETADDR, _IFADDRMSG.pack(af, 0, 0, 0, index), what)
            addresses += [a for a in decode_addresses(chunks, names, what) if not index or a.index == index]
        return addresses


def _address_msg(address: Address, index: int, for_add: bool) -> AddrMsg:
    from .rtnl import AddrMsg      # pyroute2, imported by the first add or delete
    msg = AddrMsg()
    msg["family"] = FAMILY_NUMBERS[address.family]
    msg["prefixlen"] = address.prefixlen
    msg["scope"] = address.scope
    msg["index"] = index
    attrs: list[tuple[str, Any]] = [
        ("IFA_LOCAL", address.address),
        ("IFA_ADDRESS", address.peer if address.peer is not None else address.address),
    ]
    if address.label is not None:
        attrs.append(("IFA_LABEL", address.label))
    if for_add:
        flags = address.flags & _REQUEST_FLAGS
        msg["flags"] = flags & 0xFF
        attrs.append(("IFA_FLAGS", flags))
        if address.broadcast is not None:
            attrs.append(("IFA_BROADCAST", address.broadcast))
        if address.proto is not None:
            attrs.append(("IFA_PROTO", address.proto))
        if address.rt_priority is not None:
            attrs.append(("IFA_RT_PRIORITY", address.rt_priority))
        if address.valid_lft is not None or address.preferred_lft is not None:
            valid = address.valid_lft if address.valid_lft is not None else _FOREVER
            preferred = address.preferred_lft if address.preferred_lft is not None else valid
            attrs.append(("IFA_CACHEINFO", {"ifa_valid": valid, "ifa_preferred": preferred,
                                            "cstamp": 0, "tstamp": 0}))
    msg["attrs"] = attrs
    return msg


def delete_address(address: Address, *, rtnl: Rtnl | None = None) -> DeleteResult:
    """Delete exactly ADDRESS from its interface (by index)."""
    with using(rtnl) as r:
        if address.index is None:
            names = interface_names(r)
            index = interface_index(names, address.ifname or "", f"delete {address.describe()}")
        else:
            index = address.index
        return r.delete(_address_msg(address, index, for_add=False), RTM_DELADDR,
                        address.describe(), _GONE)


def add_address(address: Address, *, rtnl: Rtnl | None = None) -> None:
    """Add ADDRESS; the interface is found by name when one is given (indexes change).

    Raises KernelError (errno EEXIST when it is already there).
    """
    with using(rtnl) as r:
        if address.ifname is not None:
            index = interface_index(interface_names(r), address.ifname, f"add {address.describe()}")
        elif address.index is not None:
            index = address.index
        else:
            raise ValueError(f"cannot add {address.describe()}: neither interface name nor index given")
        r.add(_address_msg(address, index, for_add=True), RTM_NEWADDR, address.describe())
