"""Interface addresses (IPv4 and IPv6) over rtnetlink: dump, add, delete.

charon installs virtual IPs as addresses (``install_virtual_ip``). Deleting
an IPv4 primary address also removes its secondaries unless the interface
has promote_secondaries set: that is the kernel's rule, not ours.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass
from typing import Any, ClassVar

from .common import DeleteResult
from .rtnl import (
    FAMILY_NAMES,
    FAMILY_NUMBERS,
    PROTOCOL_NAMES,
    RTM_DELADDR,
    RTM_GETADDR,
    RTM_NEWADDR,
    SCOPE_NAMES,
    AddrMsg,
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
    """An Address from a decoded RTM_NEWADDR/DELADDR; None for other families."""
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


def dump_addresses(ifname: str | None = None, *, rtnl: Rtnl | None = None) -> list[Address]:
    """IPv4 and IPv6 addresses (of interface IFNAME when given); raises KernelError on failure.

    An IFNAME that does not exist raises KernelError(ENODEV): it is not "no addresses".
    """
    with using(rtnl) as r:
        names = interface_names(r)
        index = interface_index(names, ifname, "dump addresses") if ifname is not None else 0
        addresses: list[Address] = []
        for af in (socket.AF_INET, socket.AF_INET6):
            def request(af: int = af) -> AddrMsg:
                msg = AddrMsg()
                msg["family"] = af
                msg["index"] = index  # filtered in the kernel (strict checking)
                return msg
            what = f"{FAMILY_NAMES[af]} addresses" + (f" of dev {ifname}" if ifname else "")
            for msg in r.dump(request, RTM_GETADDR, what):
                address = address_from_msg(msg, names)
                if address is not None and (not index or address.index == index):
                    addresses.append(address)
        return addresses


def _address_msg(address: Address, index: int, for_add: bool) -> AddrMsg:
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
