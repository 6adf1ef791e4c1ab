"""Routing policy rules (IPv4 and IPv6) over rtnetlink: dump, add, delete.

charon adds ``220: from all lookup 220`` (``charon.routing_table_prio``).
The kernel finds a rule to delete by every selector the request carries, so
a delete re-sends all of them: a look-alike at the same priority survives.
"""

from __future__ import annotations

import errno
import socket
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import KernelError
from .common import DeleteResult
from .netlink import pack_attr, walk_messages
from .rtnl import (
    AttrReader,
    FAMILY_NAMES,
    FAMILY_NUMBERS,
    PROTOCOL_NAMES,
    RTM_DELRULE,
    RTM_GETRULE,
    RTM_NEWRULE,
    Rtnl,
    json_addr,
    json_family,
    json_int,
    json_prefixlen,
    json_str,
    name_of,
    table_name,
    using,
)

if TYPE_CHECKING:
    from .rtnl import RuleMsg

FR_ACT_TO_TBL = 1
FR_ACT_GOTO = 2
ACTION_NAMES = {0: "unspec", 1: "to_tbl", 2: "goto", 3: "nop", 6: "blackhole",
                7: "unreachable", 8: "prohibit"}
FIB_RULE_INVERT = 0x2
# FIB_RULE_PERMANENT, _UNRESOLVED, _IIF/OIF_DETACHED: state the kernel reports, not selectors.
_STATE_FLAGS = 0x1 | 0x4 | 0x8 | 0x10
_UNSET = 0xFFFFFFFF  # suppress_prefixlen / suppress_ifgroup "not set"

_GONE = frozenset({errno.ENOENT})


def _range_json(d: dict, key: str, maximum: int) -> tuple[int, int] | None:
    value = d.get(key)
    if value is None:
        return None
    if (not isinstance(value, list) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise TypeError(f"{key} must be [start, end], not {value!r}")
    if not 0 <= value[0] <= value[1] <= maximum:
        raise ValueError(f"{key} must satisfy 0 <= start <= end <= {maximum}, not {value!r}")
    return (value[0], value[1])


@dataclass(frozen=True, slots=True)
class Rule:
    """One policy routing rule (``ip rule`` terms) with every selector the kernel reports."""

    FAMILY: ClassVar[str] = "rule"
    VOLATILE: ClassVar[frozenset[str]] = frozenset()

    family: str                         # "inet" | "inet6"
    priority: int
    table: int = 0                      # lookup table (action to_tbl)
    action: int = FR_ACT_TO_TBL         # FR_ACT_*: to_tbl, goto, nop, blackhole, unreachable, prohibit
    src: str | None = None              # "from" (None: all)
    src_len: int = 0
    dst: str | None = None              # "to"
    dst_len: int = 0
    tos: int = 0
    iif: str | None = None              # interface names: rules hold names, not indexes
    oif: str | None = None
    fwmark: int | None = None
    fwmask: int | None = None
    goto: int | None = None             # target priority of action goto
    flow: int | None = None             # realms (FRA_FLOW)
    protocol: int = 0                   # RTPROT_*: who added it
    flags: int = 0                      # FIB_RULE_*: invert ("not"), detached, ...
    suppress_prefixlen: int | None = None
    suppress_ifgroup: int | None = None
    l3mdev: int | None = None
    uid_range: tuple[int, int] | None = None
    ip_proto: int | None = None
    sport_range: tuple[int, int] | None = None
    dport_range: tuple[int, int] | None = None
    tun_id: int | None = None

    @property
    def action_name(self) -> str:
        return name_of(ACTION_NAMES, self.action)

    @property
    def protocol_name(self) -> str:
        return name_of(PROTOCOL_NAMES, self.protocol)

    def key(self) -> tuple:
        return (self.family, self.priority, self.table, self.action, self.src, self.src_len,
                self.dst, self.dst_len, self.tos, self.iif, self.oif, self.fwmark, self.fwmask,
                self.goto, self.flow, self.flags & ~_STATE_FLAGS, self.suppress_prefixlen,
                self.suppress_ifgroup, self.l3mdev, self.uid_range, self.ip_proto,
                self.sport_range, self.dport_range, self.tun_id)

    def describe(self) -> str:
        parts = [f"rule {self.priority}" + (" (IPv6):" if self.family == "inet6" else ":")]
        if self.flags & FIB_RULE_INVERT:
            parts.append("not")
        parts += ["from", f"{self.src}/{self.src_len}" if self.src is not None else "all"]
        if self.dst is not None:
            parts += ["to", f"{self.dst}/{self.dst_len}"]
        if self.tos:
            parts += ["tos", f"0x{self.tos:02x}"]
        if self.fwmark is not None:
            mark = f"0x{self.fwmark:x}"
            if self.fwmask is not None and self.fwmask != 0xFFFFFFFF:
                mark += f"/0x{self.fwmask:x}"
            parts += ["fwmark", mark]
        for word, value in (("iif", self.iif), ("oif", self.oif)):
            if value is not None:
                parts += [word, value]
        if self.ip_proto is not None:
            parts += ["ipproto", str(self.ip_proto)]
        for word, rng in (("sport", self.sport_range), ("dport", self.dport_range),
                          ("uidrange", self.uid_range)):
            if rng is not None:
                parts += [word, f"{rng[0]}-{rng[1]}"]
        if self.action == FR_ACT_TO_TBL:
            parts += ["lookup", table_name(self.table)]
        elif self.action == FR_ACT_GOTO:
            parts += ["goto", str(self.goto)]
        else:
            parts.append(self.action_name)
        if self.suppress_prefixlen is not None:
            parts += ["suppress_prefixlength", str(self.suppress_prefixlen)]
        return " ".join(parts)

    def to_json(self, include_keys: bool = False) -> dict:
        return {
            "family": self.family, "priority": self.priority, "table": self.table,
            "action": self.action, "action_name": self.action_name,
            "src": self.src, "src_len": self.src_len, "dst": self.dst, "dst_len": self.dst_len,
            "tos": self.tos, "iif": self.iif, "oif": self.oif,
            "fwmark": self.fwmark, "fwmask": self.fwmask, "goto": self.goto, "flow": self.flow,
            "protocol": self.protocol, "protocol_name": self.protocol_name, "flags": self.flags,
            "suppress_prefixlen": self.suppress_prefixlen,
            "suppress_ifgroup": self.suppress_ifgroup, "l3mdev": self.l3mdev,
            "uid_range": list(self.uid_range) if self.uid_range else None,
            "ip_proto": self.ip_proto,
            "sport_range": list(self.sport_range) if self.sport_range else None,
            "dport_range": list(self.dport_range) if self.dport_range else None,
            "tun_id": self.tun_id,
        }

    @classmethod
    def from_json(cls, d: dict) -> "Rule":
        if not isinstance(d, dict):
            raise TypeError(f"a rule must be an object, not {d!r}")
        family = json_family(d)
        return cls(
            family=family,
            priority=json_int(d, "priority"),
            table=json_int(d, "table"),
            action=json_int(d, "action", maximum=0xFF),
            src=json_addr(d, "src", family, optional=True),
            src_len=json_prefixlen(d, "src_len", family),
            dst=json_addr(d, "dst", family, optional=True),
            dst_len=json_prefixlen(d, "dst_len", family),
            tos=json_int(d, "tos", maximum=0xFF),
            iif=json_str(d, "iif", optional=True),
            oif=json_str(d, "oif", optional=True),
            fwmark=json_int(d, "fwmark", optional=True),
            fwmask=json_int(d, "fwmask", optional=True),
            goto=json_int(d, "goto", optional=True),
            flow=json_int(d, "flow", optional=True),
            protocol=json_int(d, "protocol", maximum=0xFF),
            flags=json_int(d, "flags"),
            suppress_prefixlen=json_int(d, "suppress_prefixlen", optional=True),
            suppress_ifgroup=json_int(d, "suppress_ifgroup", optional=True),
            l3mdev=json_int(d, "l3mdev", optional=True, maximum=0xFF),
            uid_range=_range_json(d, "uid_range", 0xFFFFFFFF),
            ip_proto=json_int(d, "ip_proto", optional=True, maximum=0xFF),
            sport_range=_range_json(d, "sport_range", 0xFFFF),
            dport_range=_range_json(d, "dport_range", 0xFFFF),
            tun_id=json_int(d, "tun_id", optional=True, maximum=2**64 - 1),
        )


def _range(value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    start, end = str(value).split(":")
    return (int(start), int(end))


def _unset_is_none(value: int | None) -> int | None:
    return None if value is None or value == _UNSET else value


def rule_from_msg(msg: RuleMsg, names: dict[int, str] | None = None) -> Rule | None:
    """A Rule from pyroute2's decoding of RTM_NEWRULE/DELRULE (the reference ``rule_at`` is
    tested against); None for families other than IPv4/IPv6."""
    family = FAMILY_NAMES.get(msg["family"])
    if family is None:  # RTNL_FAMILY_IPMR/IP6MR multicast rules share the dump
        return None
    table = msg.get_attr("FRA_TABLE")
    return Rule(
        family=family,
        priority=msg.get_attr("FRA_PRIORITY") or 0,
        table=table if table is not None else msg["table"],
        action=msg["action"],
        src=msg.get_attr("FRA_SRC"),
        src_len=msg["src_len"],
        dst=msg.get_attr("FRA_DST"),
        dst_len=msg["dst_len"],
        tos=msg["tos"],
        iif=msg.get_attr("FRA_IIFNAME"),
        oif=msg.get_attr("FRA_OIFNAME"),
        fwmark=msg.get_attr("FRA_FWMARK"),
        fwmask=msg.get_attr("FRA_FWMASK"),
        goto=msg.get_attr("FRA_GOTO"),
        flow=msg.get_attr("FRA_FLOW"),
        protocol=msg.get_attr("FRA_PROTOCOL") or 0,
        flags=msg["flags"],
        suppress_prefixlen=_unset_is_none(msg.get_attr("FRA_SUPPRESS_PREFIXLEN")),
        suppress_ifgroup=_unset_is_none(msg.get_attr("FRA_SUPPRESS_IFGROUP")),
        l3mdev=msg.get_attr("FRA_L3MDEV"),
        uid_range=_range(msg.get_attr("FRA_UID_RANGE")),
        ip_proto=msg.get_attr("FRA_IP_PROTO"),
        sport_range=_range(msg.get_attr("FRA_SPORT_RANGE")),
        dport_range=_range(msg.get_attr("FRA_DPORT_RANGE")),
        tun_id=msg.get_attr("FRA_TUN_ID"),
    )


# --- struct decoding (linux/fib_rules.h), record for record what rule_from_msg makes ---

FRA_DST, FRA_SRC, FRA_IIFNAME, FRA_GOTO, FRA_PRIORITY = 1, 2, 3, 4, 6
FRA_FWMARK, FRA_FLOW, FRA_TUN_ID, FRA_SUPPRESS_IFGROUP, FRA_SUPPRESS_PREFIXLEN = 10, 11, 12, 13, 14
FRA_TABLE, FRA_FWMASK, FRA_OIFNAME, FRA_L3MDEV, FRA_UID_RANGE = 15, 16, 17, 19, 20
FRA_PROTOCOL, FRA_IP_PROTO, FRA_SPORT_RANGE, FRA_DPORT_RANGE = 21, 22, 23, 24

_FIB_RULE_HDR = struct.Struct("=BBBBBBBBI")     # struct fib_rule_hdr
_BE64 = struct.Struct(">Q")
_UID_RANGE = struct.Struct("=II")               # struct fib_rule_uid_range
_PORT_RANGE = struct.Struct("=HH")              # struct fib_rule_port_range


def rule_at(buf: bytes, off: int, end: int, names: dict[int, str] | None, what: str) -> Rule | None:
    """The Rule of the RTM_NEWRULE/DELRULE payload BUF[off:end]; None for other families."""
    if end - off < _FIB_RULE_HDR.size:
        raise KernelError(f"cannot {what}: a {end - off}-byte rule message is too short")
    af, dst_len, src_len, tos, hdr_table, _res1, _res2, action, flags = _FIB_RULE_HDR.unpack_from(buf, off)
    family = FAMILY_NAMES.get(af)
    if family is None:  # RTNL_FAMILY_IPMR/IP6MR multicast rules share the dump
        return None
    attrs = AttrReader(buf, off + _FIB_RULE_HDR.size, end, what)
    try:
        u32, u8, text, address, pair = attrs.u32, attrs.u8, attrs.text, attrs.address, attrs.unpack
        table = u32(FRA_TABLE)
        tun_id = attrs.unpack(FRA_TUN_ID, _BE64)
        return Rule(
            family=family,
            priority=u32(FRA_PRIORITY) or 0,
            table=table if table is not None else hdr_table,
            action=action,
            src=address(FRA_SRC),
            src_len=src_len,
            dst=address(FRA_DST),
            dst_len=dst_len,
            tos=tos,
            iif=text(FRA_IIFNAME),
            oif=text(FRA_OIFNAME),
            fwmark=u32(FRA_FWMARK),
            fwmask=u32(FRA_FWMASK),
            goto=u32(FRA_GOTO),
            flow=u32(FRA_FLOW),
            protocol=u8(FRA_PROTOCOL) or 0,
            flags=flags,
            suppress_prefixlen=_unset_is_none(u32(FRA_SUPPRESS_PREFIXLEN)),
            suppress_ifgroup=_unset_is_none(u32(FRA_SUPPRESS_IFGROUP)),
            l3mdev=u8(FRA_L3MDEV),
            uid_range=pair(FRA_UID_RANGE, _UID_RANGE),
            ip_proto=u8(FRA_IP_PROTO),
            sport_range=pair(FRA_SPORT_RANGE, _PORT_RANGE),
            dport_range=pair(FRA_DPORT_RANGE, _PORT_RANGE),
            tun_id=None if tun_id is None else tun_id[0],
        )
    except (ValueError, struct.error, OSError) as exc:
        raise KernelError(f"cannot {what}: undecodable rule attribute ({exc})") from None


def decode_rules(chunks: list[bytes], what: str = "decode routing rules") -> list[Rule]:
    """The IPv4/IPv6 rules in the datagrams of an RTM_GETRULE dump, in the kernel's order."""
    rules = []
    for data in chunks:
        for off, length, msg_type, _flags, _seq, _pid in walk_messages(data):
            if msg_type == RTM_NEWRULE:
                rule = rule_at(data, off + 16, off + length, None, what)
                if rule is not None:
                    rules.append(rule)
    return rules


def _dump(r: Rtnl, af: int) -> list[Rule]:
    what = f"dump {FAMILY_NAMES[af]} routing rules"
    return decode_rules(r.dump_raw(RTM_GETRULE, _FIB_RULE_HDR.pack(af, 0, 0, 0, 0, 0, 0, 0, 0), what), what)


def dump_rules(priority: int | None = None, *, rtnl: Rtnl | None = None) -> list[Rule]:
    """IPv4 and IPv6 rules (only those at PRIORITY when given); raises KernelError on failure."""
    with using(rtnl) as r:
        rules = _dump(r, socket.AF_INET) + _dump(r, socket.AF_INET6)
        return [rule for rule in rules if priority is None or rule.priority == priority]


def delete_lookup_accepts(request: Rule, candidate: Rule) -> bool:
    """Whether the kernel's rule lookup (rule_find), fed REQUEST's selectors, takes CANDIDATE.

    Unset selectors are wildcards to the kernel, and it ignores "not" (the invert flag).
    """
    if candidate.family != request.family or candidate.priority != request.priority:
        return False
    wildcard_if_falsy = (
        ("action", request.action), ("table", request.table), ("iif", request.iif),
        ("oif", request.oif), ("fwmark", request.fwmark), ("fwmask", request.fwmask),
        ("tun_id", request.tun_id), ("l3mdev", request.l3mdev), ("ip_proto", request.ip_proto),
        ("protocol", request.protocol), ("tos", request.tos), ("uid_range", request.uid_range),
        ("sport_range", request.sport_range), ("dport_range", request.dport_range),
    )
    for field, wanted in wildcard_if_falsy:
        if wanted and getattr(candidate, field) != wanted:
            return False
    for field in ("suppress_prefixlen", "suppress_ifgroup", "flow"):
        wanted = getattr(request, field)
        if wanted is not None and getattr(candidate, field) != wanted:
            return False
    if request.src_len and (candidate.src_len, candidate.src) != (request.src_len, request.src):
        return False
    if request.dst_len and (candidate.dst_len, candidate.dst) != (request.dst_len, request.dst):
        return False
    return True


def decide_delete(rule: Rule, current: list[Rule]) -> Rule | None:
    """The rule in CURRENT (kernel order) that deleting RULE removes: None when it is gone.

    Raises KernelError when the kernel would take a different rule listed first.
    """
    mine = rule.key()
    if not any(c.key() == mine for c in current):
        return None
    first = next(c for c in current if delete_lookup_accepts(rule, c))
    if first.key() != mine:
        raise KernelError(f"cannot delete {rule.describe()} exactly: the kernel would remove "
                          f"{first.describe()} instead (listed first, and matching every selector "
                          "the rule has); both left in place")
    return first


def _rule_msg(rule: Rule) -> RuleMsg:
    from .rtnl import RuleMsg      # pyroute2, imported by the first add or delete
    msg = RuleMsg()
    msg["family"] = FAMILY_NUMBERS[rule.family]
    msg["dst_len"] = rule.dst_len
    msg["src_len"] = rule.src_len
    msg["tos"] = rule.tos
    msg["table"] = rule.table if rule.table < 256 else 0
    msg["action"] = rule.action
    msg["flags"] = rule.flags & ~_STATE_FLAGS
    attrs: list[tuple[str, Any]] = [("FRA_PRIORITY", rule.priority)]
    optional = (
        ("FRA_TABLE", rule.table or None),
        ("FRA_SRC", rule.src), ("FRA_DST", rule.dst),
        ("FRA_IIFNAME", rule.iif), ("FRA_OIFNAME", rule.oif),
        ("FRA_FWMARK", rule.fwmark), ("FRA_FWMASK", rule.fwmask),
        ("FRA_GOTO", rule.goto), ("FRA_FLOW", rule.flow),
        ("FRA_PROTOCOL", rule.protocol or None),
        ("FRA_SUPPRESS_PREFIXLEN", rule.suppress_prefixlen),
        ("FRA_SUPPRESS_IFGROUP", rule.suppress_ifgroup),
        ("FRA_L3MDEV", rule.l3mdev),
        ("FRA_UID_RANGE", "%d:%d" % rule.uid_range if rule.uid_range else None),
        ("FRA_IP_PROTO", rule.ip_proto),
        ("FRA_SPORT_RANGE", "%d:%d" % rule.sport_range if rule.sport_range else None),
        ("FRA_DPORT_RANGE", "%d:%d" % rule.dport_range if rule.dport_range else None),
        ("FRA_TUN_ID", rule.tun_id),
    )
    attrs += [(name, value) for name, value in optional if value is not None]
    msg["attrs"] = attrs
    return msg


def encode_rule_delete(rule: Rule) -> bytes:
    """Payload of RTM_DELRULE for RULE: what ``_rule_msg`` encodes, byte for byte, without pyroute2
    (its import costs a crash's flush 0.1 s and the supervisor 13 MB)."""
    try:
        return _encode_rule(rule)
    except (OSError, ValueError, struct.error, OverflowError) as exc:
        raise KernelError(f"cannot delete {rule.describe()}: it cannot be encoded ({exc})") from None


def _encode_rule(rule: Rule) -> bytes:
    af = FAMILY_NUMBERS[rule.family]
    u32, u8 = struct.Struct("=I").pack, struct.Struct("=B").pack
    out = [_FIB_RULE_HDR.pack(af, rule.dst_len, rule.src_len, rule.tos, rule.table if rule.table < 256 else 0,
                              0, 0, rule.action, rule.flags & ~_STATE_FLAGS),
           pack_attr(FRA_PRIORITY, u32(rule.priority))]
    optional = (
        (FRA_TABLE, rule.table or None, u32),
        (FRA_SRC, rule.src, lambda a: socket.inet_pton(af, a)),
        (FRA_DST, rule.dst, lambda a: socket.inet_pton(af, a)),
        (FRA_IIFNAME, rule.iif, lambda t: t.encode() + b"\0"),
        (FRA_OIFNAME, rule.oif, lambda t: t.encode() + b"\0"),
        (FRA_FWMARK, rule.fwmark, u32), (FRA_FWMASK, rule.fwmask, u32),
        (FRA_GOTO, rule.goto, u32), (FRA_FLOW, rule.flow, u32),
        (FRA_PROTOCOL, rule.protocol or None, u8),
        (FRA_SUPPRESS_PREFIXLEN, rule.suppress_prefixlen, u32),
        (FRA_SUPPRESS_IFGROUP, rule.suppress_ifgroup, u32),
        (FRA_L3MDEV, rule.l3mdev, u8),
        (FRA_UID_RANGE, rule.uid_range, lambda r: _UID_RANGE.pack(*r)),
        (FRA_IP_PROTO, rule.ip_proto, u8),
        (FRA_SPORT_RANGE, rule.sport_range, lambda r: _PORT_RANGE.pack(*r)),
        (FRA_DPORT_RANGE, rule.dport_range, lambda r: _PORT_RANGE.pack(*r)),
        (FRA_TUN_ID, rule.tun_id, _BE64.pack),
    )
    out += [pack_attr(kind, encode(value)) for kind, value, encode in optional if value is not None]
    return b"".join(out)


def delete_rule(rule: Rule, *, rtnl: Rtnl | None = None) -> DeleteResult:
    """Delete exactly RULE: ALREADY_GONE, decided from a dump, sends nothing.

    The kernel deletes the first rule matching the selectors a request carries; for
    "from all lookup 220" that is any rule at 220 using table 220, hence the check first.
    """
    with using(rtnl) as r:
        if decide_delete(rule, _dump(r, FAMILY_NUMBERS[rule.family])) is None:
            return DeleteResult.ALREADY_GONE
        return r.delete(encode_rule_delete(rule), RTM_DELRULE, rule.describe(), _GONE)


def add_rule(rule: Rule, *, rtnl: Rtnl | None = None) -> None:
    """Install RULE; raises KernelError (errno EEXIST when an identical rule exists)."""
    with using(rtnl) as r:
        r.add(_rule_msg(rule), RTM_NEWRULE, rule.describe())
