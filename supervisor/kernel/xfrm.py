"""XFRM SAs (SAD), policies (SPD) and default policies over raw netlink, and the XFRM monitor.

Layouts are those of <linux/xfrm.h> on this ABI (x86_64: xfrm_usersa_info is 224
bytes, xfrm_userpolicy_info 168, xfrm_user_tmpl 64, xfrm_userpolicy_type 6).
Dumps decode straight from the receive buffers with precompiled ``struct``
formats; attributes this module does not understand are kept raw, in order,
so that re-encoding a record sends the kernel what it reported.

Records hold kernel values (ints); ``to_json`` spells the small enumerations
(dir, action, mode, proto, share, ptype, family) the way ``ip xfrm`` does.
"""

from __future__ import annotations

import errno
import gc
import socket
import struct
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any, Callable, ClassVar, Iterator, Sequence

from ..errors import KernelError
from ..lazylog import Logger
from .common import Action, DeleteResult, KernelEvent
from .netlink import (DEFAULT_RCVBUF, NETLINK_XFRM, NLMSG_OVERRUN, NetlinkMessage, NetlinkSocket, NotFound,
                      iter_attrs, pack_attr)

log = Logger(__name__)     # (logging imported when something is logged: lazylog)

# --- <linux/xfrm.h> constants ----------------------------------------------

XFRM_MSG_NEWSA = 0x10
XFRM_MSG_DELSA = 0x11
XFRM_MSG_GETSA = 0x12
XFRM_MSG_NEWPOLICY = 0x13
XFRM_MSG_DELPOLICY = 0x14
XFRM_MSG_GETPOLICY = 0x15
XFRM_MSG_ACQUIRE = 0x17
XFRM_MSG_EXPIRE = 0x18
XFRM_MSG_UPDPOLICY = 0x19
XFRM_MSG_UPDSA = 0x1A
XFRM_MSG_POLEXPIRE = 0x1B
XFRM_MSG_FLUSHSA = 0x1C
XFRM_MSG_FLUSHPOLICY = 0x1D
XFRM_MSG_GETDEFAULT = 0x28

XFRMA_ALG_AUTH = 1
XFRMA_ALG_CRYPT = 2
XFRMA_ALG_COMP = 3
XFRMA_ENCAP = 4
XFRMA_TMPL = 5
XFRMA_SA = 6
XFRMA_POLICY = 7
XFRMA_SEC_CTX = 8
XFRMA_REPLAY_VAL = 10
XFRMA_SRCADDR = 13
XFRMA_LASTUSED = 15
XFRMA_POLICY_TYPE = 16
XFRMA_ALG_AEAD = 18
XFRMA_ALG_AUTH_TRUNC = 20
XFRMA_MARK = 21
XFRMA_REPLAY_ESN_VAL = 23
XFRMA_SA_EXTRA_FLAGS = 24
XFRMA_PAD = 27
XFRMA_SET_MARK = 29
XFRMA_SET_MARK_MASK = 30
XFRMA_IF_ID = 31

XFRMNLGRP_ACQUIRE = 1
XFRMNLGRP_EXPIRE = 2
XFRMNLGRP_SA = 3
XFRMNLGRP_POLICY = 4

XFRM_INF = 2**64 - 1

AF_UNSPEC = 0
AF_INET = socket.AF_INET
AF_INET6 = socket.AF_INET6

DIR_IN, DIR_OUT, DIR_FWD = 0, 1, 2
XFRM_POLICY_MAX = 3             # dirs >= this are per-socket policies (dir - 3 is the real one)
ACTION_ALLOW, ACTION_BLOCK = 0, 1
PTYPE_MAIN, PTYPE_SUB = 0, 1
MODE_TRANSPORT, MODE_TUNNEL, MODE_BEET = 0, 1, 4
IPPROTO_ESP, IPPROTO_AH, IPPROTO_COMP = 50, 51, 108
POLICY_FLAG_LOCALOK, POLICY_FLAG_ICMP = 1, 2
SA_FLAG_ESN = 128
DEFAULT_BLOCK, DEFAULT_ACCEPT = 1, 2

FAMILY_NAMES = {AF_UNSPEC: "unspec", AF_INET: "inet", AF_INET6: "inet6"}
DIR_NAMES = {0: "in", 1: "out", 2: "fwd", 3: "socket-in", 4: "socket-out", 5: "socket-fwd"}
ACTION_NAMES = {ACTION_ALLOW: "allow", ACTION_BLOCK: "block"}
PTYPE_NAMES = {PTYPE_MAIN: "main", PTYPE_SUB: "sub"}
SHARE_NAMES = {0: "any", 1: "session", 2: "user", 3: "unique"}
MODE_NAMES = {0: "transport", 1: "tunnel", 2: "ro", 3: "in_trigger", 4: "beet"}
PROTO_NAMES = {IPPROTO_ESP: "esp", IPPROTO_AH: "ah", IPPROTO_COMP: "comp", 43: "route2", 60: "hao",
               255: "any"}
ENCAP_NAMES = {1: "espinudp-nonike", 2: "espinudp", 7: "espintcp"}
DEFAULT_NAMES = {0: "unspec", DEFAULT_BLOCK: "block", DEFAULT_ACCEPT: "accept"}

# --- wire layouts -----------------------------------------------------------

_SEL = "16s16sHHHHHBBB3xiI"                     # xfrm_selector (ports are big-endian)
_LFT = "8Q"                                     # xfrm_lifetime_cfg
_CUR = "4Q"                                     # xfrm_lifetime_cur
_POLICY_INFO = struct.Struct("=" + _SEL + _LFT + _CUR + "IIBBBB4x")
_POLICY_ID = struct.Struct("=" + _SEL + "IB3x")
_SA_INFO = struct.Struct("=" + _SEL + "16sIB3x" "16s" + _LFT + _CUR + "III" "IIHBBB7x")
_SA_ID = struct.Struct("=16sIHBx")
_TMPL = struct.Struct("=16sIB3xH2x16sIBBBxIII")
_POLICY_TYPE = struct.Struct("=BxHBx")
_MARK = struct.Struct("=II")
_U32 = struct.Struct("=I")
_U64 = struct.Struct("=Q")
_ALGO = struct.Struct("=64sI")
_ALGO_X = struct.Struct("=64sII")                # xfrm_algo_auth / xfrm_algo_aead
_ENCAP = struct.Struct("=HHH2x16s")
_REPLAY = struct.Struct("=III")
_REPLAY_ESN = struct.Struct("=IIIIII")
_DEFAULT = struct.Struct("=BBB")
_HDR_LT = struct.Struct("=IH")
_NLA = struct.Struct("=HH")
assert (_POLICY_INFO.size, _POLICY_ID.size, _SA_INFO.size, _SA_ID.size, _TMPL.size,
        _POLICY_TYPE.size, _ENCAP.size) == (168, 64, 224, 24, 64, 6, 24)

_SA_EXPIRE_SIZE = 232         # xfrm_user_expire: xfrm_usersa_info + u8 hard, padded
_POLEXPIRE_SIZE = 176         # xfrm_user_polexpire: xfrm_userpolicy_info + u8 hard, padded
_ACQUIRE_SIZE = 280           # xfrm_user_acquire
_ACQUIRE_HEAD = struct.Struct("=16sIB3x16s")    # its xfrm_id and saddr
_ZERO16 = bytes(16)

_ntop = socket.inet_ntop
# Addresses repeat across tens of thousands of records (local subnets, peers): one string each
# (about 4 MB less for 10,000 tunnels held in the ledger).
_intern = sys.intern
_pton = socket.inet_pton
_ntohs = socket.ntohs
_ntohl = socket.ntohl


def _addr(family: int, raw: bytes) -> str:
    if family == AF_INET:
        return _ntop(AF_INET, raw[:4])
    if family == AF_INET6:
        return _ntop(AF_INET6, raw)
    # AF_UNSPEC (e.g. the selector of an SA added without "sel"): keep any bytes, exactly
    return "" if raw == _ZERO16 else raw.hex()


def _pack_addr(family: int, text: str) -> bytes:
    try:
        if family == AF_INET:
            return _pton(AF_INET, text) + bytes(12)
        if family == AF_INET6:
            return _pton(AF_INET6, text)
    except OSError:
        raise ValueError(f"{text!r} is not an {FAMILY_NAMES[family]} address") from None
    return bytes.fromhex(text).ljust(16, b"\0") if text else _ZERO16


def _name(names: dict[int, str], value: int) -> str | int:
    return names.get(value, value)


_NAME_TO_INT: dict[int, dict[str, int]] = {}


def _value(names: dict[int, str], value: Any, what: str) -> int:
    """Inverse of _name: accepts the name or the raw int."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    reverse = _NAME_TO_INT.get(id(names))
    if reverse is None:
        reverse = _NAME_TO_INT[id(names)] = {v: k for k, v in names.items()}
    if isinstance(value, str) and value in reverse:
        return reverse[value]
    raise ValueError(f"{what} must be one of {sorted(reverse)} or an integer, not {value!r}")


def _int(d: dict, key: str) -> int:
    value = d[key]
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{key} must be an integer, not {value!r}")
    return value


def _str(d: dict, key: str) -> str:
    value = d[key]
    if not isinstance(value, str):
        raise TypeError(f"{key} must be a string, not {value!r}")
    return value


def _mark_json(mark: tuple[int, int] | None) -> dict | None:
    return None if mark is None else {"value": mark[0], "mask": mark[1]}


def _mark_from(d: Any) -> tuple[int, int] | None:
    if d is None:
        return None
    return (_int(d, "value"), _int(d, "mask"))


def _attrs_json(attrs: tuple[tuple[int, bytes], ...]) -> list[dict]:
    return [{"type": t, "data": data.hex()} for t, data in attrs]


def _attrs_from(items: Any) -> tuple[tuple[int, bytes], ...]:
    return tuple((_int(a, "type"), bytes.fromhex(_str(a, "data"))) for a in items)


def _mark_text(mark: tuple[int, int] | None) -> str:
    return "" if mark is None else f" mark={mark[0]:#x}/{mark[1]:#x}"


def selector_text(saddr: str, prefixlen_s: int, daddr: str, prefixlen_d: int, proto: int, sport: int,
                  sport_mask: int, dport: int, dport_mask: int) -> str:
    """XfrmSelector.describe of these values (snapshot_typed describes without building a selector)."""
    text = f"src={saddr}/{prefixlen_s} dst={daddr}/{prefixlen_d}"
    if not (proto or sport_mask or dport_mask):       # (most of charon's: the line is done)
        return text
    if proto:
        text += f" proto={proto}"
    if proto in (1, 58) and (sport_mask or dport_mask):
        return text + f" type={sport} code={dport}"   # ICMP keeps them in the ports
    if sport_mask:
        text += f" sport={sport}"
    if dport_mask:
        text += f" dport={dport}"
    return text


def policy_text(selector: str, dir: str | int, ptype: str | int | None, mark: tuple[int, int] | None,
                if_id: int, priority: int, index: int) -> str:
    """XfrmPolicy.describe of these values: DIR and PTYPE as named (PTYPE None for main)."""
    if ptype is None and mark is None and not if_id:       # (nearly all: one format)
        return f"SPD entry {selector} dir={dir} priority={priority} index={index}"
    text = f"SPD entry {selector} dir={dir}"
    if ptype is not None:
        text += f" ptype={ptype}"
    if mark is not None:
        text += _mark_text(mark)
    if if_id:
        text += f" if_id={if_id:#x}"
    return f"{text} priority={priority} index={index}"


# --- records ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class XfrmSelector:
    """struct xfrm_selector: which traffic a policy or SA applies to."""

    family: int
    saddr: str
    prefixlen_s: int
    daddr: str
    prefixlen_d: int
    proto: int = 0                  # upper-layer protocol (6 tcp, 17 udp, ...); 0 = any
    sport: int = 0
    sport_mask: int = 0
    dport: int = 0                  # for ICMP: sport/dport carry type/code
    dport_mask: int = 0
    ifindex: int = 0
    user: int = 0

    def describe(self) -> str:
        return selector_text(self.saddr, self.prefixlen_s, self.daddr, self.prefixlen_d, self.proto,
                             self.sport, self.sport_mask, self.dport, self.dport_mask)

    def to_json(self) -> dict:
        return {"family": FAMILY_NAMES.get(self.family, self.family),
                "saddr": self.saddr, "prefixlen_s": self.prefixlen_s,
                "daddr": self.daddr, "prefixlen_d": self.prefixlen_d,
                "proto": self.proto, "sport": self.sport, "sport_mask": self.sport_mask,
                "dport": self.dport, "dport_mask": self.dport_mask,
                "ifindex": self.ifindex, "user": self.user}

    @classmethod
    def from_json(cls, d: dict) -> "XfrmSelector":
        family = _value(FAMILY_NAMES, d["family"], "selector family")
        sel = cls(family, _str(d, "saddr"), _int(d, "prefixlen_s"), _str(d, "daddr"),
                  _int(d, "prefixlen_d"), _int(d, "proto"), _int(d, "sport"), _int(d, "sport_mask"),
                  _int(d, "dport"), _int(d, "dport_mask"), _int(d, "ifindex"), _int(d, "user"))
        sel.pack()          # rejects addresses that do not fit the family
        return sel

    def pack(self) -> bytes:
        try:
            return struct.pack(
                "=16s16s4HHBBB3xiI", _pack_addr(self.family, self.daddr),
                _pack_addr(self.family, self.saddr), socket.htons(self.dport),
                socket.htons(self.dport_mask), socket.htons(self.sport), socket.htons(self.sport_mask),
                self.family, self.prefixlen_d, self.prefixlen_s, self.proto, self.ifindex, self.user)
        except (OSError, ValueError, struct.error, OverflowError) as exc:
            raise ValueError(f"selector {self.describe()} (family {self.family}) cannot be "
                             f"encoded: {exc}") from None


ANY_SELECTOR = XfrmSelector(AF_UNSPEC, "", 0, "", 0)


@dataclass(frozen=True, slots=True)
class XfrmLifetime:
    """struct xfrm_lifetime_cfg. The default is "no limits": INF bytes/packets, 0 seconds."""

    soft_byte_limit: int = XFRM_INF
    hard_byte_limit: int = XFRM_INF
    soft_packet_limit: int = XFRM_INF
    hard_packet_limit: int = XFRM_INF
    soft_add_expires_seconds: int = 0
    hard_add_expires_seconds: int = 0
    soft_use_expires_seconds: int = 0
    hard_use_expires_seconds: int = 0

    _FIELDS: ClassVar[tuple[str, ...]] = (
        "soft_byte_limit", "hard_byte_limit", "soft_packet_limit", "hard_packet_limit",
        "soft_add_expires_seconds", "hard_add_expires_seconds",
        "soft_use_expires_seconds", "hard_use_expires_seconds")

    def astuple(self) -> tuple[int, ...]:
        return (self.soft_byte_limit, self.hard_byte_limit, self.soft_packet_limit,
                self.hard_packet_limit, self.soft_add_expires_seconds, self.hard_add_expires_seconds,
                self.soft_use_expires_seconds, self.hard_use_expires_seconds)

    def to_json(self) -> dict:
        return {"soft_byte_limit": self.soft_byte_limit, "hard_byte_limit": self.hard_byte_limit,
                "soft_packet_limit": self.soft_packet_limit, "hard_packet_limit": self.hard_packet_limit,
                "soft_add_expires_seconds": self.soft_add_expires_seconds,
                "hard_add_expires_seconds": self.hard_add_expires_seconds,
                "soft_use_expires_seconds": self.soft_use_expires_seconds,
                "hard_use_expires_seconds": self.hard_use_expires_seconds}

    @classmethod
    def from_json(cls, d: dict) -> "XfrmLifetime":
        return cls(*(_int(d, name) for name in cls._FIELDS))


NO_LIMITS = XfrmLifetime()


@dataclass(frozen=True, slots=True)
class XfrmLifetimeCur:
    """struct xfrm_lifetime_cur: counters and add/use times (volatile)."""

    bytes: int = 0
    packets: int = 0
    add_time: int = 0
    use_time: int = 0

    def to_json(self) -> dict:
        return {"bytes": self.bytes, "packets": self.packets,
                "add_time": self.add_time, "use_time": self.use_time}

    @classmethod
    def from_json(cls, d: dict) -> "XfrmLifetimeCur":
        return cls(_int(d, "bytes"), _int(d, "packets"), _int(d, "add_time"), _int(d, "use_time"))


NO_CURLFT = XfrmLifetimeCur()


@dataclass(frozen=True, slots=True)
class XfrmTemplate:
    """struct xfrm_user_tmpl: the SA a policy requires ("tmpl ..." in ip xfrm)."""

    family: int
    saddr: str
    daddr: str
    proto: int = IPPROTO_ESP
    spi: int = 0
    reqid: int = 0
    mode: int = MODE_TRANSPORT
    share: int = 0
    optional: int = 0               # "level use"
    aalgos: int = 0xFFFFFFFF
    ealgos: int = 0xFFFFFFFF
    calgos: int = 0xFFFFFFFF

    def to_json(self) -> dict:
        return {"family": FAMILY_NAMES.get(self.family, self.family), "saddr": self.saddr,
                "daddr": self.daddr, "proto": PROTO_NAMES.get(self.proto, self.proto), "spi": self.spi,
                "reqid": self.reqid, "mode": MODE_NAMES.get(self.mode, self.mode),
                "share": SHARE_NAMES.get(self.share, self.share),
                "optional": self.optional, "aalgos": self.aalgos, "ealgos": self.ealgos,
                "calgos": self.calgos}

    @classmethod
    def from_json(cls, d: dict) -> "XfrmTemplate":
        t = cls(_value(FAMILY_NAMES, d["family"], "template family"), _str(d, "saddr"),
                _str(d, "daddr"), _value(PROTO_NAMES, d["proto"], "template proto"), _int(d, "spi"),
                _int(d, "reqid"), _value(MODE_NAMES, d["mode"], "template mode"),
                _value(SHARE_NAMES, d["share"], "template share"), _int(d, "optional"),
                _int(d, "aalgos"), _int(d, "ealgos"), _int(d, "calgos"))
        t.pack()
        return t

    def pack(self) -> bytes:
        try:
            return _TMPL.pack(_pack_addr(self.family, self.daddr), socket.htonl(self.spi), self.proto,
                              self.family, _pack_addr(self.family, self.saddr), self.reqid, self.mode,
                              self.share, self.optional, self.aalgos, self.ealgos, self.calgos)
        except (OSError, ValueError, struct.error, OverflowError) as exc:
            raise ValueError(f"template src={self.saddr} dst={self.daddr} cannot be encoded: "
                             f"{exc}") from None


@dataclass(frozen=True, slots=True)
class XfrmPolicy:
    """One SPD entry (struct xfrm_userpolicy_info plus its attributes)."""

    FAMILY: ClassVar[str] = "xfrm_policy"
    VOLATILE: ClassVar[frozenset[str]] = frozenset({"curlft"})

    selector: XfrmSelector
    dir: int
    action: int = ACTION_ALLOW
    priority: int = 0
    index: int = 0                  # kernel-assigned unless given; not part of the identity
    flags: int = 0
    share: int = 0
    lifetime: XfrmLifetime = NO_LIMITS
    mark: tuple[int, int] | None = None     # (value, mask)
    if_id: int = 0
    ptype: int = PTYPE_MAIN
    templates: tuple[XfrmTemplate, ...] = ()
    attrs: tuple[tuple[int, bytes], ...] = ()   # attributes not decoded above, raw, in order
    curlft: XfrmLifetimeCur = NO_CURLFT

    @property
    def per_socket(self) -> bool:
        """A socket's own policy (setsockopt IP_XFRM_POLICY): netlink can neither add nor delete it."""
        return self.dir >= XFRM_POLICY_MAX

    @property
    def sec_ctx(self) -> bytes | None:
        for attr_type, data in self.attrs:
            if attr_type == XFRMA_SEC_CTX:
                return data
        return None

    def key(self) -> tuple:
        """What the kernel looks a policy up by: type, direction, selector, mark, if_id, context."""
        mark = self.mark if self.mark and self.mark != (0, 0) else None
        return (self.ptype, self.dir, self.selector, mark, self.if_id, self.sec_ctx)

    def describe(self) -> str:
        return policy_text(self.selector.describe(), _name(DIR_NAMES, self.dir),
                           None if self.ptype == PTYPE_MAIN else _name(PTYPE_NAMES, self.ptype), self.mark,
                           self.if_id, self.priority, self.index)

    def to_json(self, include_keys: bool = False) -> dict:
        mark = self.mark
        return {"selector": self.selector.to_json(), "dir": DIR_NAMES.get(self.dir, self.dir),
                "action": ACTION_NAMES.get(self.action, self.action), "priority": self.priority,
                "index": self.index, "flags": self.flags, "share": SHARE_NAMES.get(self.share, self.share),
                "lifetime": self.lifetime.to_json(),
                "mark": None if mark is None else {"value": mark[0], "mask": mark[1]},
                "if_id": self.if_id, "ptype": PTYPE_NAMES.get(self.ptype, self.ptype),
                "templates": [t.to_json() for t in self.templates],
                "attrs": _attrs_json(self.attrs) if self.attrs else [], "curlft": self.curlft.to_json()}

    @classmethod
    def from_json(cls, d: dict) -> "XfrmPolicy":
        return cls(
            XfrmSelector.from_json(d["selector"]), _value(DIR_NAMES, d["dir"], "dir"),
            _value(ACTION_NAMES, d["action"], "action"), _int(d, "priority"), _int(d, "index"),
            _int(d, "flags"), _value(SHARE_NAMES, d["share"], "share"),
            XfrmLifetime.from_json(d["lifetime"]), _mark_from(d["mark"]), _int(d, "if_id"),
            _value(PTYPE_NAMES, d["ptype"], "ptype"),
            tuple(XfrmTemplate.from_json(t) for t in d["templates"]), _attrs_from(d["attrs"]),
            XfrmLifetimeCur.from_json(d["curlft"]))


@dataclass(frozen=True, slots=True)
class XfrmAlgorithm:
    """struct xfrm_algo / xfrm_algo_auth / xfrm_algo_aead; ``key`` is hex, None when redacted."""

    name: str
    key_len_bits: int
    key: str | None = field(default=None, repr=False)
    icv_len_bits: int | None = None     # alg_trunc_len (auth-trunc) or alg_icv_len (aead)

    def to_json(self, include_keys: bool = False) -> dict:
        return {"name": self.name, "key_len_bits": self.key_len_bits,
                "key": self.key if include_keys else None, "icv_len_bits": self.icv_len_bits}

    @classmethod
    def from_json(cls, d: dict) -> "XfrmAlgorithm":
        key = d["key"]
        if key is not None:
            bytes.fromhex(_str(d, "key"))
        icv = d["icv_len_bits"]
        return cls(_str(d, "name"), _int(d, "key_len_bits"), key,
                   None if icv is None else _int(d, "icv_len_bits"))

    def pack(self, with_icv: bool) -> bytes:
        if self.key is None:
            raise ValueError(f"the key of {self.name} is redacted")
        name = self.name.encode()
        if len(name) >= 64:
            raise ValueError(f"algorithm name {self.name!r} is longer than 63 bytes")
        key = bytes.fromhex(self.key)
        if with_icv:
            return _ALGO_X.pack(name, self.key_len_bits, self.icv_len_bits or 0) + key
        return _ALGO.pack(name, self.key_len_bits) + key


@dataclass(frozen=True, slots=True)
class XfrmEncap:
    """struct xfrm_encap_tmpl: UDP (or TCP) encapsulation of ESP."""

    type: int
    sport: int
    dport: int
    oa: str                 # original address (NAT-OA), in the SA's family

    def to_json(self) -> dict:
        return {"type": _name(ENCAP_NAMES, self.type), "sport": self.sport, "dport": self.dport,
                "oa": self.oa}

    @classmethod
    def from_json(cls, d: dict) -> "XfrmEncap":
        return cls(_value(ENCAP_NAMES, d["type"], "encap type"), _int(d, "sport"), _int(d, "dport"),
                   _str(d, "oa"))


@dataclass(frozen=True, slots=True)
class XfrmReplayState:
    """XFRMA_REPLAY_VAL (oseq, seq, bitmap) or, with ``esn``, XFRMA_REPLAY_ESN_VAL."""

    oseq: int = 0
    seq: int = 0
    bitmap: int = 0                 # legacy only
    esn: bool = False
    bmp_len: int = 0                # ESN only: bitmap length in 32-bit words
    oseq_hi: int = 0
    seq_hi: int = 0
    replay_window: int = 0
    bmp: tuple[int, ...] = ()

    def to_json(self) -> dict:
        return {"oseq": self.oseq, "seq": self.seq, "bitmap": self.bitmap, "esn": self.esn,
                "bmp_len": self.bmp_len, "oseq_hi": self.oseq_hi, "seq_hi": self.seq_hi,
                "replay_window": self.replay_window, "bmp": list(self.bmp)}

    @classmethod
    def from_json(cls, d: dict) -> "XfrmReplayState":
        esn = d["esn"]
        if not isinstance(esn, bool):
            raise TypeError(f"esn must be true or false, not {esn!r}")
        bmp = d["bmp"]
        if not isinstance(bmp, list):
            raise TypeError(f"bmp must be a list, not {bmp!r}")
        return cls(_int(d, "oseq"), _int(d, "seq"), _int(d, "bitmap"), esn, _int(d, "bmp_len"),
                   _int(d, "oseq_hi"), _int(d, "seq_hi"), _int(d, "replay_window"),
                   tuple(_int({"bmp": w}, "bmp") for w in bmp))

    def pack_attr(self) -> bytes:
        if self.esn:
            return pack_attr(XFRMA_REPLAY_ESN_VAL, _REPLAY_ESN.pack(
                self.bmp_len, self.oseq, self.seq, self.oseq_hi, self.seq_hi, self.replay_window)
                + struct.pack(f"={len(self.bmp)}I", *self.bmp))
        return pack_attr(XFRMA_REPLAY_VAL, _REPLAY.pack(self.oseq, self.seq, self.bitmap))


@dataclass(frozen=True, slots=True)
class XfrmStats:
    """struct xfrm_stats (volatile)."""

    replay_window: int = 0
    replay: int = 0
    integrity_failed: int = 0

    def to_json(self) -> dict:
        return {"replay_window": self.replay_window, "replay": self.replay,
                "integrity_failed": self.integrity_failed}

    @classmethod
    def from_json(cls, d: dict) -> "XfrmStats":
        return cls(_int(d, "replay_window"), _int(d, "replay"), _int(d, "integrity_failed"))


NO_STATS = XfrmStats()

_ALG_FIELDS = ("auth", "auth_trunc", "crypt", "aead", "comp")


@dataclass(frozen=True, slots=True)
class XfrmSA:
    """One SAD entry (struct xfrm_usersa_info plus its attributes)."""

    FAMILY: ClassVar[str] = "xfrm_sa"
    VOLATILE: ClassVar[frozenset[str]] = frozenset({"curlft", "stats", "replay", "lastused"})

    family: int
    daddr: str
    spi: int
    proto: int
    saddr: str
    mode: int = MODE_TRANSPORT
    reqid: int = 0
    flags: int = 0
    extra_flags: int = 0
    replay_window: int = 0
    selector: XfrmSelector = ANY_SELECTOR
    lifetime: XfrmLifetime = NO_LIMITS
    auth: XfrmAlgorithm | None = None
    auth_trunc: XfrmAlgorithm | None = None
    crypt: XfrmAlgorithm | None = None
    aead: XfrmAlgorithm | None = None
    comp: XfrmAlgorithm | None = None
    encap: XfrmEncap | None = None
    mark: tuple[int, int] | None = None
    if_id: int = 0
    output_mark: tuple[int, int] | None = None    # XFRMA_SET_MARK / XFRMA_SET_MARK_MASK
    seq: int = 0
    replay: XfrmReplayState | None = None
    attrs: tuple[tuple[int, bytes], ...] = ()
    curlft: XfrmLifetimeCur = NO_CURLFT
    stats: XfrmStats = NO_STATS
    lastused: int = 0

    @property
    def larval(self) -> bool:
        """An acquire placeholder (no SPI yet): netlink cannot address it; it expires by itself."""
        return self.spi == 0 and self.proto in (IPPROTO_ESP, IPPROTO_AH, IPPROTO_COMP)

    def key(self) -> tuple:
        """What the kernel looks an SA up by: (family, daddr, spi, proto, mark)."""
        mark = self.mark if self.mark and self.mark != (0, 0) else None
        return (self.family, self.daddr, self.spi, self.proto, mark)

    def describe(self) -> str:
        return (f"SAD entry spi={self.spi:#010x} dst={self.daddr} proto={_name(PROTO_NAMES, self.proto)}"
                + _mark_text(self.mark))

    def algorithms(self) -> dict[str, XfrmAlgorithm]:
        return {name: alg for name in _ALG_FIELDS if (alg := getattr(self, name)) is not None}

    def to_json(self, include_keys: bool = False) -> dict:
        def alg(a: XfrmAlgorithm | None) -> dict | None:
            return None if a is None else a.to_json(include_keys)
        return {"family": _name(FAMILY_NAMES, self.family), "daddr": self.daddr, "spi": self.spi,
                "proto": _name(PROTO_NAMES, self.proto), "saddr": self.saddr,
                "mode": _name(MODE_NAMES, self.mode), "reqid": self.reqid, "flags": self.flags,
                "extra_flags": self.extra_flags, "replay_window": self.replay_window,
                "selector": self.selector.to_json(), "lifetime": self.lifetime.to_json(),
                "auth": alg(self.auth), "auth_trunc": alg(self.auth_trunc), "crypt": alg(self.crypt),
                "aead": alg(self.aead), "comp": alg(self.comp),
                "encap": None if self.encap is None else self.encap.to_json(),
                "mark": _mark_json(self.mark), "if_id": self.if_id,
                "output_mark": _mark_json(self.output_mark), "seq": self.seq,
                "replay": None if self.replay is None else self.replay.to_json(),
                "attrs": _attrs_json(self.attrs), "curlft": self.curlft.to_json(),
                "stats": self.stats.to_json(), "lastused": self.lastused}

    @classmethod
    def from_json(cls, d: dict) -> "XfrmSA":
        def alg(name: str) -> XfrmAlgorithm | None:
            return None if d[name] is None else XfrmAlgorithm.from_json(d[name])
        family = _value(FAMILY_NAMES, d["family"], "family")
        sa = cls(family, _str(d, "daddr"), _int(d, "spi"), _value(PROTO_NAMES, d["proto"], "proto"),
                 _str(d, "saddr"), _value(MODE_NAMES, d["mode"], "mode"), _int(d, "reqid"),
                 _int(d, "flags"), _int(d, "extra_flags"), _int(d, "replay_window"),
                 XfrmSelector.from_json(d["selector"]), XfrmLifetime.from_json(d["lifetime"]),
                 alg("auth"), alg("auth_trunc"), alg("crypt"), alg("aead"), alg("comp"),
                 None if d["encap"] is None else XfrmEncap.from_json(d["encap"]),
                 _mark_from(d["mark"]), _int(d, "if_id"), _mark_from(d["output_mark"]),
                 _int(d, "seq"), None if d["replay"] is None else XfrmReplayState.from_json(d["replay"]),
                 _attrs_from(d["attrs"]), XfrmLifetimeCur.from_json(d["curlft"]),
                 XfrmStats.from_json(d["stats"]), _int(d, "lastused"))
        for address in (sa.daddr, sa.saddr):
            _pack_addr(family, address)         # rejects addresses not of the SA's family
        return sa


@dataclass(frozen=True, slots=True)
class XfrmDefaultPolicy:
    """What the kernel does with traffic no policy matches, per direction (block or accept)."""

    FAMILY: ClassVar[str] = "xfrm_default_policy"
    VOLATILE: ClassVar[frozenset[str]] = frozenset()

    inbound: int = DEFAULT_ACCEPT
    forward: int = DEFAULT_ACCEPT
    outbound: int = DEFAULT_ACCEPT

    def key(self) -> tuple:
        return ()

    def describe(self) -> str:
        return (f"XFRM default policy in={_name(DEFAULT_NAMES, self.inbound)} "
                f"fwd={_name(DEFAULT_NAMES, self.forward)} out={_name(DEFAULT_NAMES, self.outbound)}")

    def to_json(self, include_keys: bool = False) -> dict:
        return {"in": _name(DEFAULT_NAMES, self.inbound), "fwd": _name(DEFAULT_NAMES, self.forward),
                "out": _name(DEFAULT_NAMES, self.outbound)}

    @classmethod
    def from_json(cls, d: dict) -> "XfrmDefaultPolicy":
        return cls(*(_value(DEFAULT_NAMES, d[k], f"default policy {k}") for k in ("in", "fwd", "out")))


@dataclass(frozen=True, slots=True)
class XfrmAcquire:
    """An ACQUIRE: traffic hit a policy whose template has no SA (e.g. a trap policy)."""

    daddr: str
    saddr: str
    proto: int
    selector: XfrmSelector          # the packet's flow
    policy: XfrmPolicy              # the policy that matched, with its templates
    seq: int

    def describe(self) -> str:
        return (f"acquire for {_name(PROTO_NAMES, self.proto)} SA src={self.saddr} dst={self.daddr} "
                f"(flow {self.selector.describe()}, seq {self.seq})")


# --- decoding ---------------------------------------------------------------


def _fast_builder(cls):
    """A positional constructor for frozen slotted dataclass CLS, for the decode hot path.

    A frozen dataclass sets each field through object.__setattr__ (~70 ns a field);
    decoding 30,000 policies builds over a million fields. The builder fills a
    mutable twin with the same slots (plain stores) and then gives the object its
    real class, which CPython allows because the layouts are identical. The result
    is an ordinary CLS instance: equal, hashable and frozen like one from CLS(...).
    """
    names = [f.name for f in fields(cls)]
    twin = type(f"_{cls.__name__}Builder", (), {"__slots__": cls.__slots__})
    body = "".join(f"    o.{n} = {n}\n" for n in names)
    namespace = {"new": object.__new__, "twin": twin, "cls": cls}
    exec(f"def build({', '.join(names)}):\n    o = new(twin)\n{body}    o.__class__ = cls\n    return o\n",
         namespace)
    return namespace["build"]


_new_policy = _fast_builder(XfrmPolicy)
_new_selector = _fast_builder(XfrmSelector)
_new_template = _fast_builder(XfrmTemplate)
_new_curlft = _fast_builder(XfrmLifetimeCur)
_new_sa = _fast_builder(XfrmSA)
_new_algorithm = _fast_builder(XfrmAlgorithm)
_new_stats = _fast_builder(XfrmStats)
_new_replay = _fast_builder(XfrmReplayState)

# Sub-records repeat a lot (in/fwd share selectors and templates, lifetimes are
# nearly always the default, policies installed in the same second share their
# curlft), so within one dump identical raw bytes map to the same immutable record.
_CACHE_LIMIT = 1 << 16
_NO_LIMITS_RAW = struct.pack("=8Q", *NO_LIMITS.astuple())
_sel_cache: dict[bytes, XfrmSelector] = {}
_lft_cache: dict[bytes, XfrmLifetime] = {_NO_LIMITS_RAW: NO_LIMITS}
_cur_cache: dict[bytes, XfrmLifetimeCur] = {}
_tmpl_cache: dict[bytes, XfrmTemplate] = {}
# Numbers above 256 are a new object each time they are unpacked: every template's algorithm masks
# (0xffffffff) and most priorities repeat (1.5 MB of duplicates at 10,000 tunnels held).
_int_cache: dict[int, int] = {}
_same_int = _int_cache.setdefault
_SEL_STRUCT = struct.Struct("=" + _SEL)
_LFT_STRUCT = struct.Struct("=" + _LFT)
_CUR_STRUCT = struct.Struct("=" + _CUR)
_POLICY_TAIL = struct.Struct("=IIBBBB")


def _clear_caches() -> None:
    for cache in (_sel_cache, _lft_cache, _cur_cache, _tmpl_cache, _int_cache):
        cache.clear()
    _lft_cache[_NO_LIMITS_RAW] = NO_LIMITS


def _selector_at(buf: bytes, off: int) -> XfrmSelector:
    raw = buf[off:off + 56]
    sel = _sel_cache.get(raw)
    if sel is None:
        (daddr, saddr, dport, dport_mask, sport, sport_mask, family, plen_d, plen_s, proto,
         ifindex, user) = _SEL_STRUCT.unpack_from(buf, off)
        if family == AF_INET:
            saddr, daddr = _intern(_ntop(AF_INET, saddr[:4])), _intern(_ntop(AF_INET, daddr[:4]))
        else:
            saddr, daddr = _intern(_addr(family, saddr)), _intern(_addr(family, daddr))
        if sport or sport_mask or dport or dport_mask:
            sport, sport_mask, dport, dport_mask = (_ntohs(sport), _ntohs(sport_mask), _ntohs(dport),
                                                    _ntohs(dport_mask))
        sel = _new_selector(family, saddr, plen_s, daddr, plen_d, proto, sport, sport_mask, dport,
                            dport_mask, ifindex, user)
        if len(_sel_cache) >= _CACHE_LIMIT:
            _sel_cache.clear()
        if len(_int_cache) >= _CACHE_LIMIT:
            _int_cache.clear()
        _sel_cache[raw] = sel
    return sel


def _lifetime_at(buf: bytes, off: int) -> XfrmLifetime:
    raw = buf[off:off + 64]
    lft = _lft_cache.get(raw)
    if lft is None:
        lft = XfrmLifetime(*_LFT_STRUCT.unpack_from(buf, off))
        if len(_lft_cache) >= _CACHE_LIMIT:
            _lft_cache.clear()
        _lft_cache[raw] = lft
    return lft


def _curlft_at(buf: bytes, off: int) -> XfrmLifetimeCur:
    raw = buf[off:off + 32]
    cur = _cur_cache.get(raw)
    if cur is None:
        cur = _new_curlft(*_CUR_STRUCT.unpack_from(buf, off))
        if len(_cur_cache) >= _CACHE_LIMIT:
            _cur_cache.clear()
        _cur_cache[raw] = cur
    return cur


def _template_at(buf: bytes, off: int) -> XfrmTemplate:
    raw = buf[off:off + 64]
    tmpl = _tmpl_cache.get(raw)
    if tmpl is None:
        daddr, spi, proto, family, saddr, reqid, mode, share, optional, aalgos, ealgos, calgos = \
            _TMPL.unpack_from(buf, off)
        if family == AF_INET:
            saddr, daddr = _intern(_ntop(AF_INET, saddr[:4])), _intern(_ntop(AF_INET, daddr[:4]))
        else:
            saddr, daddr = _intern(_addr(family, saddr)), _intern(_addr(family, daddr))
        tmpl = _new_template(family, saddr, daddr, proto, _ntohl(spi) if spi else 0, _same_int(reqid, reqid),
                             mode, share, optional, _same_int(aalgos, aalgos), _same_int(ealgos, ealgos),
                             _same_int(calgos, calgos))
        if len(_tmpl_cache) >= _CACHE_LIMIT:
            _tmpl_cache.clear()
        if len(_int_cache) >= _CACHE_LIMIT:     # (notifications: no dump clears it; a new value
            _int_cache.clear()                  # mostly comes with a new selector or template)
        _tmpl_cache[raw] = tmpl
    return tmpl


def _policy_at(buf: bytes, info: int, attrs: int, end: int) -> XfrmPolicy:
    """The policy whose xfrm_userpolicy_info is at INFO, with attributes in BUF[attrs:end]."""
    priority, index, direction, action, flags, share = _POLICY_TAIL.unpack_from(buf, info + 152)
    templates: tuple[XfrmTemplate, ...] = ()
    mark = None
    if_id = 0
    ptype = PTYPE_MAIN
    raw: list[tuple[int, bytes]] | None = None
    off = attrs
    while off + 4 <= end:
        length, attr_type = _NLA.unpack_from(buf, off)
        if length < 4 or off + length > end:
            raise KernelError(f"malformed XFRM policy attribute (length {length}) in a kernel message")
        attr_type &= 0x3FFF
        if attr_type == XFRMA_TMPL:
            if length == 68:        # the usual single template
                templates = (_template_at(buf, off + 4),)
            else:
                templates = tuple(_template_at(buf, t) for t in range(off + 4, off + length - 63, 64))
        elif attr_type == XFRMA_POLICY_TYPE:
            ptype = buf[off + 4]
        elif attr_type == XFRMA_MARK:
            mark = _MARK.unpack_from(buf, off + 4)
        elif attr_type == XFRMA_IF_ID:
            (if_id,) = _U32.unpack_from(buf, off + 4)
        elif attr_type != XFRMA_PAD and attr_type != XFRMA_POLICY:
            if raw is None:
                raw = []
            raw.append((attr_type, bytes(buf[off + 4:off + length])))
        off += (length + 3) & ~3
    return _new_policy(_selector_at(buf, info), direction, action, _same_int(priority, priority), index, flags,
                       share, _lifetime_at(buf, info + 56), mark, if_id, ptype, templates,
                       tuple(raw) if raw else (), _curlft_at(buf, info + 120))


def _algo_at(buf, start: int, stop: int, extended: bool) -> XfrmAlgorithm:
    if extended:
        name, key_bits, icv = _ALGO_X.unpack_from(buf, start)
        key_start = start + 72
    else:
        name, key_bits = _ALGO.unpack_from(buf, start)
        icv = None
        key_start = start + 68
    key = bytes(buf[key_start:min(stop, key_start + (key_bits + 7) // 8)]).hex()
    return _new_algorithm(name.split(b"\0", 1)[0].decode(errors="replace"), key_bits, key, icv)


def _sa_at(buf, info: int, attrs: int, end: int) -> XfrmSA:
    """The SA whose xfrm_usersa_info is at INFO, with attributes in BUF[attrs:end]."""
    v = _SA_INFO.unpack_from(buf, info)
    # v: selector 0-11, id daddr/spi/proto 12-14, saddr 15, lft 16-23, cur 24-27, stats 28-30,
    #    seq 31, reqid 32, family 33, mode 34, replay_window 35, flags 36
    family = v[33]
    alg: dict[str, XfrmAlgorithm] = {}
    encap = mark = output_mark = replay = None
    if_id = extra_flags = lastused = 0
    set_mark = set_mask = None
    raw: list[tuple[int, bytes]] = []
    off = attrs
    while off + 4 <= end:
        length, attr_type = _NLA.unpack_from(buf, off)
        if length < 4:
            raise KernelError(f"malformed XFRM SA attribute (length {length}) in a kernel message")
        attr_type &= 0x3FFF
        start, stop = off + 4, off + length
        if attr_type == XFRMA_ALG_AUTH:
            alg["auth"] = _algo_at(buf, start, stop, False)
        elif attr_type == XFRMA_ALG_AUTH_TRUNC:
            alg["auth_trunc"] = _algo_at(buf, start, stop, True)
        elif attr_type == XFRMA_ALG_CRYPT:
            alg["crypt"] = _algo_at(buf, start, stop, False)
        elif attr_type == XFRMA_ALG_AEAD:
            alg["aead"] = _algo_at(buf, start, stop, True)
        elif attr_type == XFRMA_ALG_COMP:
            alg["comp"] = _algo_at(buf, start, stop, False)
        elif attr_type == XFRMA_ENCAP:
            etype, sport, dport, oa = _ENCAP.unpack_from(buf, start)
            encap = XfrmEncap(etype, _ntohs(sport), _ntohs(dport), _addr(family, oa))
        elif attr_type == XFRMA_MARK:
            mark = _MARK.unpack_from(buf, start)
        elif attr_type == XFRMA_IF_ID:
            (if_id,) = _U32.unpack_from(buf, start)
        elif attr_type == XFRMA_SET_MARK:
            (set_mark,) = _U32.unpack_from(buf, start)
        elif attr_type == XFRMA_SET_MARK_MASK:
            (set_mask,) = _U32.unpack_from(buf, start)
        elif attr_type == XFRMA_SA_EXTRA_FLAGS:
            (extra_flags,) = _U32.unpack_from(buf, start)
        elif attr_type == XFRMA_REPLAY_VAL:
            replay = _new_replay(*_REPLAY.unpack_from(buf, start), False, 0, 0, 0, 0, ())
        elif attr_type == XFRMA_REPLAY_ESN_VAL:
            bmp_len, oseq, seq, oseq_hi, seq_hi, window = _REPLAY_ESN.unpack_from(buf, start)
            words = min(bmp_len, (stop - start - 24) // 4)
            bmp = struct.unpack_from(f"={words}I", buf, start + 24) if words > 0 else ()
            replay = _new_replay(oseq, seq, 0, True, bmp_len, oseq_hi, seq_hi, window, bmp)
        elif attr_type == XFRMA_LASTUSED:
            (lastused,) = _U64.unpack_from(buf, start)
        elif attr_type not in (XFRMA_PAD, XFRMA_SA):
            raw.append((attr_type, bytes(buf[start:stop])))
        off += (length + 3) & ~3
    if set_mark is not None or set_mask is not None:
        output_mark = (set_mark or 0, 0xFFFFFFFF if set_mask is None else set_mask)
    spi = v[13]
    return _new_sa(
        family, _addr(family, v[12]), _ntohl(spi) if spi else 0, v[14], _addr(family, v[15]),
        v[34], v[32], v[36], extra_flags, v[35], _selector_at(buf, info), _lifetime_at(buf, info + 96),
        alg.get("auth"), alg.get("auth_trunc"), alg.get("crypt"), alg.get("aead"), alg.get("comp"),
        encap, mark, if_id, output_mark, v[31], replay, tuple(raw),
        _curlft_at(buf, info + 160), _new_stats(*v[28:31]), lastused)


def _find_attr(buf, start: int, end: int, wanted: int) -> tuple[int, int] | None:
    for attr_type, s, e in iter_attrs(buf, start, end):
        if attr_type == wanted:
            return s, e
    return None


def _decode_messages(chunks: list[bytes], msg_type: int, size: int, decode, what: str, usual=None) -> list:
    # the caches live for one dump: bounded memory, and every dump pays for its own decoding
    # The records are acyclic: collecting garbage while building 100,000 of them
    # only rescans the growing heap (about a fifth of the decode time).
    gc_was_enabled = gc.isenabled()
    gc.disable()
    _clear_caches()
    try:
        return _decode_all(chunks, msg_type, size, decode, what, usual)
    finally:
        _clear_caches()
        if gc_was_enabled:
            gc.enable()


def _decode_all(chunks: list[bytes], msg_type: int, size: int, decode, what: str, usual=None) -> list:
    out = []
    append = out.append
    unpack = _HDR_LT.unpack_from
    for data in chunks:
        off = 0 if usual is None else usual(data, out)      # a datagram's usual messages in one go
        end = len(data)
        while off < end:
            length, mtype = unpack(data, off)
            if mtype == msg_type:
                if length < 16 + size:
                    raise KernelError(f"cannot {what}: the kernel sent a {length}-byte message, "
                                      f"shorter than its {size}-byte header (ABI mismatch?)")
                append(decode(data, off + 16, off + 16 + size, off + length))
            off += (length + 3) & ~3
    return out


def to_json_all(records, include_keys: bool = False) -> list[dict]:
    """``[r.to_json(include_keys) for r in records]``, without cycle collection meanwhile.

    Building 150,000 acyclic dicts for 30,000 policies with the collector on costs
    twice the conversion itself (it keeps rescanning the growing young generation).
    """
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        return [r.to_json(include_keys) for r in records]
    finally:
        if gc_was_enabled:
            gc.enable()


# --- encoding ---------------------------------------------------------------


def _policy_type_attr(ptype: int) -> bytes:
    # iproute2 sends XFRMA_POLICY_TYPE only for non-main types; the kernel defaults to main
    return pack_attr(XFRMA_POLICY_TYPE, _POLICY_TYPE.pack(ptype, 0, 0)) if ptype != PTYPE_MAIN else b""


def encode_policy(p: XfrmPolicy) -> bytes:
    """Payload of XFRM_MSG_NEWPOLICY/UPDPOLICY for P (attribute order as iproute2's)."""
    try:
        info = p.selector.pack() + struct.pack("=8Q32xIIBBBB4x", *p.lifetime.astuple(), p.priority,
                                               p.index, p.dir, p.action, p.flags, p.share)
    except (struct.error, OverflowError) as exc:
        raise ValueError(f"{p.describe()} cannot be encoded: {exc}") from None
    out = [info, _policy_type_attr(p.ptype)]
    if p.templates:
        out.append(pack_attr(XFRMA_TMPL, b"".join(t.pack() for t in p.templates)))
    if p.mark is not None:
        out.append(pack_attr(XFRMA_MARK, _MARK.pack(*p.mark)))
    if p.if_id:
        out.append(pack_attr(XFRMA_IF_ID, _U32.pack(p.if_id)))
    out.extend(pack_attr(t, data) for t, data in p.attrs)
    return b"".join(out)


def encode_policy_id(p: XfrmPolicy) -> bytes:
    """Payload of XFRM_MSG_DELPOLICY: found by selector, dir, type, mark, if_id (and context)."""
    out = [p.selector.pack() + struct.pack("=IB3x", 0, p.dir), _policy_type_attr(p.ptype)]
    if p.mark is not None:
        out.append(pack_attr(XFRMA_MARK, _MARK.pack(*p.mark)))
    ctx = p.sec_ctx
    if ctx is not None:
        out.append(pack_attr(XFRMA_SEC_CTX, ctx))
    if p.if_id:
        out.append(pack_attr(XFRMA_IF_ID, _U32.pack(p.if_id)))
    return b"".join(out)


def encode_sa(sa: XfrmSA) -> bytes:
    """Payload of XFRM_MSG_NEWSA/UPDSA for SA (attribute order as iproute2's)."""
    try:
        info = sa.selector.pack() + struct.pack(
            "=16sIB3x16s8Q32x12xIIHBBB7x", _pack_addr(sa.family, sa.daddr), socket.htonl(sa.spi),
            sa.proto, _pack_addr(sa.family, sa.saddr), *sa.lifetime.astuple(), sa.seq, sa.reqid,
            sa.family, sa.mode, sa.replay_window, sa.flags)
        out = [info]
        if sa.encap is not None:
            e = sa.encap
            out.append(pack_attr(XFRMA_ENCAP, _ENCAP.pack(e.type, socket.htons(e.sport),
                                                          socket.htons(e.dport), _pack_addr(sa.family, e.oa))))
        for name, attr_type, extended in (("aead", XFRMA_ALG_AEAD, True), ("auth", XFRMA_ALG_AUTH, False),
                                          ("auth_trunc", XFRMA_ALG_AUTH_TRUNC, True),
                                          ("crypt", XFRMA_ALG_CRYPT, False), ("comp", XFRMA_ALG_COMP, False)):
            alg = getattr(sa, name)
            if alg is not None:
                out.append(pack_attr(attr_type, alg.pack(extended)))
        if sa.replay is not None:
            out.append(sa.replay.pack_attr())
        if sa.extra_flags:
            out.append(pack_attr(XFRMA_SA_EXTRA_FLAGS, _U32.pack(sa.extra_flags)))
        if sa.mark is not None:
            out.append(pack_attr(XFRMA_MARK, _MARK.pack(*sa.mark)))
        if sa.if_id:
            out.append(pack_attr(XFRMA_IF_ID, _U32.pack(sa.if_id)))
        if sa.output_mark is not None:
            out.append(pack_attr(XFRMA_SET_MARK, _U32.pack(sa.output_mark[0])))
            out.append(pack_attr(XFRMA_SET_MARK_MASK, _U32.pack(sa.output_mark[1])))
        out.extend(pack_attr(t, data) for t, data in sa.attrs)
    except (OSError, ValueError, struct.error, OverflowError) as exc:
        raise ValueError(f"{sa.describe()} cannot be encoded: {exc}") from None
    return b"".join(out)


def encode_sa_id(sa: XfrmSA) -> bytes:
    """Payload of XFRM_MSG_DELSA: found by daddr, spi, proto, family and mark."""
    out = [_SA_ID.pack(_pack_addr(sa.family, sa.daddr), socket.htonl(sa.spi), sa.family, sa.proto),
           # the source only matters for protocols without SPI; iproute2 always sends it
           pack_attr(XFRMA_SRCADDR, _pack_addr(sa.family, sa.saddr))]
    if sa.mark is not None:
        out.append(pack_attr(XFRMA_MARK, _MARK.pack(*sa.mark)))
    return b"".join(out)


# --- operations -------------------------------------------------------------


def open_socket() -> NetlinkSocket:
    """An XFRM netlink socket in the calling thread's namespace; pass it as ``sock=`` to reuse it."""
    return NetlinkSocket(NETLINK_XFRM)


@contextmanager
def _using(sock: NetlinkSocket | None) -> Iterator[NetlinkSocket]:
    if sock is not None:
        yield sock
        return
    with open_socket() as s:
        yield s


def dump_policies(sock: NetlinkSocket | None = None) -> list[XfrmPolicy]:
    """Every SPD entry, per-socket ones included (``per_socket`` tells them apart)."""
    with _using(sock) as s:
        chunks = s.dump_raw(XFRM_MSG_GETPOLICY, b"", _DUMP_POLICIES)
    return decode_policies(chunks)


def dump_sas(sock: NetlinkSocket | None = None) -> list[XfrmSA]:
    """Every SAD entry, with key material (redacted only in ``to_json``)."""
    with _using(sock) as s:
        chunks = s.dump_raw(XFRM_MSG_GETSA, b"", _DUMP_SAS)
    return decode_sas(chunks)


_DUMP_POLICIES = "dump SPD entries (XFRM policies)"
_DUMP_SAS = "dump SAD entries (XFRM states)"


def decode_policies(chunks: list[bytes], share: Callable[[Any], Any] | None = None) -> list[XfrmPolicy]:
    """The policies in the datagrams of a GETPOLICY dump (``NetlinkSocket.dump_raw``); SHARE, if
    given, maps each record as it is decoded (e.g. to an equal one already held: ``ledger.sharer``)."""
    return _decode_messages(chunks, XFRM_MSG_NEWPOLICY, 168, _sharing(_policy_at, share), _DUMP_POLICIES,
                            lambda data, out: _usual_policies(data, out, share))


# charon's usual policy message (264 bytes: the header, xfrm_userpolicy_info, one template, the
# policy type) in the fields _policy_at reads: length and type, selector, lifetime limits and
# counters as their raw bytes (the caches' keys), priority ... share, the template attribute's
# header and the template, the policy type attribute's header and the type.
_USUAL_POLICY = struct.Struct("=IH10x56s64s32sIIBBBB4x4s64s4sB7x")
_USUAL_TMPL_HEADER = _NLA.pack(68, XFRMA_TMPL)
_USUAL_PTYPE_HEADER = _NLA.pack(10, XFRMA_POLICY_TYPE)


def _usual_policies(data: bytes, out: list, share: Callable[[Any], Any] | None) -> int:
    """Decode the run of usual policy messages DATA starts with into OUT, as _policy_at does (the
    same records, from one C loop over the datagram); the offset where the run ends (0: none)."""
    size = _USUAL_POLICY.size
    if len(data) % size:
        return 0
    append, off = out.append, 0
    sels, lfts, curs, tmpls, same_int = _sel_cache, _lft_cache, _cur_cache, _tmpl_cache, _same_int
    for (length, mtype, sel, lft, cur, priority, index, direction, action, flags, pshare,
         tmpl_header, tmpl, ptype_header, ptype) in _USUAL_POLICY.iter_unpack(data):
        if (length != size or mtype != XFRM_MSG_NEWPOLICY or tmpl_header != _USUAL_TMPL_HEADER
                or ptype_header != _USUAL_PTYPE_HEADER):
            break
        info = off + 16
        policy = _new_policy(sels.get(sel) or _selector_at(data, info), direction, action,
                             same_int(priority, priority), index, flags, pshare,
                             lfts.get(lft) or _lifetime_at(data, info + 56), None, 0, ptype,
                             (tmpls.get(tmpl) or _template_at(data, info + 172),), (),
                             curs.get(cur) or _curlft_at(data, info + 120))
        append(policy if share is None else share(policy))
        off += size
    return off


def decode_sas(chunks: list[bytes], share: Callable[[Any], Any] | None = None) -> list[XfrmSA]:
    """The SAs in the datagrams of a GETSA dump (``NetlinkSocket.dump_raw``); SHARE as for policies."""
    return _decode_messages(chunks, XFRM_MSG_NEWSA, 224, _sharing(_sa_at, share), _DUMP_SAS)


def _sharing(decode, share):
    # one record at a time: a duplicate of what is held already is freed before the next is built
    if share is None:
        return decode
    return lambda buf, info, attrs, end: share(decode(buf, info, attrs, end))


def get_default_policies(sock: NetlinkSocket | None = None) -> XfrmDefaultPolicy:
    """The in/fwd/out default actions (kernel 5.16+; older kernels raise KernelError)."""
    with _using(sock) as s:
        reply = s.query(XFRM_MSG_GETDEFAULT, 0, bytes(3), "read the XFRM default policies")
    if len(reply.payload) < 3:
        raise KernelError("cannot read the XFRM default policies: the kernel's reply is "
                          f"{len(reply.payload)} bytes, expected 3")
    return XfrmDefaultPolicy(*_DEFAULT.unpack_from(reply.payload, 0))


def _per_socket_error(p: XfrmPolicy, verb: str) -> KernelError:
    return KernelError(
        f"cannot {verb} {p.describe()}: it is a per-socket policy, owned by the socket that set "
        "it (setsockopt IP_XFRM_POLICY) and gone when that socket closes; netlink cannot "
        f"{verb} it, so leave it alone", errno.EINVAL)


def _refuse_per_socket(p: XfrmPolicy, verb: str) -> None:
    if p.per_socket:
        raise _per_socket_error(p, verb)


def _encode_policy_or_fail(p: XfrmPolicy, verb: str) -> bytes:
    _refuse_per_socket(p, verb)
    try:
        return encode_policy(p)
    except (ValueError, struct.error, OverflowError) as exc:
        raise KernelError(f"cannot {verb} {p.describe()}: {exc}") from None


def add_policy(p: XfrmPolicy, sock: NetlinkSocket | None = None) -> None:
    """Install P; raises AlreadyExists if a policy with its key is there."""
    payload = _encode_policy_or_fail(p, "add")
    with _using(sock) as s:
        s.request(XFRM_MSG_NEWPOLICY, 0, payload, f"add {p.describe()}")


def update_policy(p: XfrmPolicy, sock: NetlinkSocket | None = None) -> None:
    """Install P, replacing the policy with its key if there is one."""
    payload = _encode_policy_or_fail(p, "update")
    with _using(sock) as s:
        s.request(XFRM_MSG_UPDPOLICY, 0, payload, f"update {p.describe()}")


def delete_policy(p: XfrmPolicy, sock: NetlinkSocket | None = None) -> DeleteResult:
    """Remove the policy with P's key (selector, dir, ptype, mark, if_id; not the index)."""
    _refuse_per_socket(p, "delete")
    try:
        payload = encode_policy_id(p)
    except (ValueError, struct.error, OverflowError) as exc:
        raise KernelError(f"cannot delete {p.describe()}: {exc}") from None
    with _using(sock) as s:
        try:
            s.request(XFRM_MSG_DELPOLICY, 0, payload, f"delete {p.describe()}")
        except NotFound:
            return DeleteResult.ALREADY_GONE
    return DeleteResult.DELETED


def _encode_sa_or_fail(sa: XfrmSA, verb: str) -> bytes:
    redacted = [name for name, alg in sa.algorithms().items() if alg.key is None]
    if redacted:
        raise KernelError(f"cannot {verb} {sa.describe()}: the key of its {', '.join(redacted)} "
                          "algorithm is redacted (the record came from a snapshot taken without keys)")
    try:
        return encode_sa(sa)
    except ValueError as exc:
        raise KernelError(f"cannot {verb} {sa.describe()}: {exc}") from None


def add_sa(sa: XfrmSA, sock: NetlinkSocket | None = None) -> None:
    """Install SA; raises AlreadyExists if an SA with its key is there."""
    payload = _encode_sa_or_fail(sa, "add")
    with _using(sock) as s:
        s.request(XFRM_MSG_NEWSA, 0, payload, f"add {sa.describe()}")


def update_sa(sa: XfrmSA, sock: NetlinkSocket | None = None) -> None:
    """Replace the SA with SA's key (the kernel only allows some fields to change)."""
    payload = _encode_sa_or_fail(sa, "update")
    with _using(sock) as s:
        s.request(XFRM_MSG_UPDSA, 0, payload, f"update {sa.describe()}")


def _sa_id_or_fail(sa: XfrmSA) -> bytes:
    if sa.larval:
        # the kernel finds SAs by SPI; a larval one has none, so it would answer "not found"
        raise KernelError(
            f"cannot delete {sa.describe()}: it is a larval (acquire) state without SPI, which "
            "netlink cannot address; the kernel drops it by itself after net.core.xfrm_acq_expires "
            "seconds (30 by default)", errno.EINVAL)
    try:
        return encode_sa_id(sa)
    except (ValueError, struct.error, OverflowError) as exc:
        raise KernelError(f"cannot delete {sa.describe()}: {exc}") from None


def delete_sa(sa: XfrmSA, sock: NetlinkSocket | None = None) -> DeleteResult:
    """Remove the SA with SA's key (daddr, spi, proto, family, mark)."""
    payload = _sa_id_or_fail(sa)
    with _using(sock) as s:
        try:
            s.request(XFRM_MSG_DELSA, 0, payload, f"delete {sa.describe()}")
        except NotFound:
            return DeleteResult.ALREADY_GONE
    return DeleteResult.DELETED


# --- batches ----------------------------------------------------------------
#
# Thousands of objects (a crashed charon with 10,000 tunnels leaves 30,000 policies) go
# through NetlinkSocket.request_many: many requests to a datagram, answers matched by
# sequence number, one result per object, one failure never stopping the rest.

BATCH_CHUNK = 512       # policies looked up by index, then deleted, per round trip pair


def _delete_result(answer: Any) -> DeleteResult | KernelError:
    if answer is None:
        return DeleteResult.DELETED
    if isinstance(answer, NotFound):
        return DeleteResult.ALREADY_GONE
    return answer


def encode_policy_index(p: XfrmPolicy) -> bytes:
    """Payload of XFRM_MSG_GETPOLICY/DELPOLICY finding P by its index (and dir, type, mark, if_id)."""
    out = [_ZERO_SELECTOR_AND_INDEX.pack(p.index, p.dir), _policy_type_attr(p.ptype)]
    if p.mark is not None:
        out.append(pack_attr(XFRMA_MARK, _MARK.pack(*p.mark)))
    if p.if_id:
        out.append(pack_attr(XFRMA_IF_ID, _U32.pack(p.if_id)))
    return b"".join(out)


_ZERO_SELECTOR_AND_INDEX = struct.Struct("=56xIB3x")    # xfrm_userpolicy_id, selector unused


def _findable_by_index(p: XfrmPolicy) -> bool:
    # The kernel keeps the direction in an index's low 3 bits and refuses a mismatch. A
    # security context is only compared by a lookup by selector: those go that way.
    return p.index != 0 and p.index & 7 == p.dir and p.sec_ctx is None


def _still_there(reply: Any, p: XfrmPolicy, selector: bytes) -> bool:
    """Whether REPLY (to a GETPOLICY by P's index) is the policy with P's key (SELECTOR: P's, packed).

    The kernel found it by index, direction, type, mark and if_id; what is left of the key
    is the selector and the security context (P has none).
    """
    if not isinstance(reply, NetlinkMessage) or reply.msg_type != XFRM_MSG_NEWPOLICY:
        return False
    payload = reply.payload
    end = len(payload)
    if end < 168 or payload[:56] != selector:
        return False
    _priority, index, direction = _INDEX_AND_DIR.unpack_from(payload, 152)
    if (index, direction) != (p.index, p.dir):
        return False
    off = 168
    while off + 4 <= end:
        length, attr_type = _NLA.unpack_from(payload, off)
        if length < 4 or attr_type & 0x3FFF == XFRMA_SEC_CTX:
            return False
        off += (length + 3) & ~3
    return True


_INDEX_AND_DIR = struct.Struct("=IIB")


def delete_policies(policies: Sequence[XfrmPolicy],
                    sock: NetlinkSocket | None = None) -> list[DeleteResult | KernelError]:
    """Remove each of POLICIES as ``delete_policy`` does, pipelined: a result or the error, per policy.

    A dumped policy is found by its index (a hash lookup; a lookup by selector walks the
    kernel's list of inexact policies, about 0.3 ms each at 30,000) once a GETPOLICY by that
    index shows the policy with the record's key still sits there; else by key, as always.
    """
    results: list[DeleteResult | KernelError] = [DeleteResult.DELETED] * len(policies)
    with _using(sock) as s:
        for start in range(0, len(policies), BATCH_CHUNK):
            _delete_policy_chunk(s, policies, range(start, min(start + BATCH_CHUNK, len(policies))),
                                 results)
    return results


def _delete_policy_chunk(s: NetlinkSocket, policies: Sequence[XfrmPolicy], chunk: range,
                         results: list) -> None:
    # Index reuse: the kernel hands out indexes from one counter growing by 8 (the low bits
    # carry the direction; per namespace in recent kernels), skipping those in use, so an
    # index comes back only after 2**29 further policies or when someone installs a policy
    # with that index explicitly (NEWPOLICY honours a free one). Asking first, one round
    # trip before the delete, turns even that into a lookup by key: a policy found at the
    # index but with another key is never removed through the index. (An update keeps the
    # index, but also the key: it is the policy a delete by selector would remove too.)
    by_index = [i for i in chunk if _findable_by_index(policies[i]) and not policies[i].per_socket]
    confirmed: dict[int, bytes] = {}        # policy -> its by-index payload
    if by_index:
        lookups = [encode_policy_index(policies[i]) for i in by_index]
        answers = s.request_many([(XFRM_MSG_GETPOLICY, 0, payload) for payload in lookups],
                                 lambda k: f"look up {policies[by_index[k]].describe()} by index",
                                 want_reply=True)
        packed: dict[int, bytes] = {}      # in and fwd policies share their selector object
        for i, answer, lookup in zip(by_index, answers, lookups):
            p = policies[i]
            selector = packed.get(id(p.selector))
            if selector is None:
                try:
                    selector = packed[id(p.selector)] = p.selector.pack()
                except ValueError:
                    continue
            if _still_there(answer, p, selector):
                confirmed[i] = lookup
    sent: list[int] = []
    requests: list[tuple[int, int, bytes]] = []
    for i in chunk:
        p = policies[i]
        if p.per_socket:
            results[i] = _per_socket_error(p, "delete")
            continue
        payload = confirmed.get(i)
        if payload is None:
            try:
                payload = encode_policy_id(p)
            except (ValueError, struct.error, OverflowError) as exc:
                results[i] = KernelError(f"cannot delete {p.describe()}: {exc}")
                continue
        sent.append(i)
        requests.append((XFRM_MSG_DELPOLICY, 0, payload))
    answers = s.request_many(requests, lambda k: f"delete {policies[sent[k]].describe()}")
    for i, answer in zip(sent, answers):
        results[i] = _delete_result(answer)


def add_policies(policies: Sequence[XfrmPolicy],
                 sock: NetlinkSocket | None = None) -> list[KernelError | None]:
    """Install each of POLICIES as ``add_policy`` does, pipelined: None or the error (AlreadyExists
    when a policy with its key is there), per policy."""
    results: list[KernelError | None] = [None] * len(policies)
    sent: list[int] = []
    requests: list[tuple[int, int, bytes]] = []
    for i, p in enumerate(policies):
        try:
            requests.append((XFRM_MSG_NEWPOLICY, 0, _encode_policy_or_fail(p, "add")))
        except KernelError as exc:
            results[i] = exc
            continue
        sent.append(i)
    with _using(sock) as s:
        answers = s.request_many(requests, lambda k: f"add {policies[sent[k]].describe()}")
    for i, answer in zip(sent, answers):
        results[i] = answer if isinstance(answer, KernelError) else None
    return results


def delete_sas(sas: Sequence[XfrmSA], sock: NetlinkSocket | None = None) -> list[DeleteResult | KernelError]:
    """Remove each of SAS as ``delete_sa`` does (by key: the kernel hashes SAs by SPI), pipelined."""
    results: list[DeleteResult | KernelError] = [DeleteResult.DELETED] * len(sas)
    sent: list[int] = []
    requests: list[tuple[int, int, bytes]] = []
    for i, sa in enumerate(sas):
        try:
            requests.append((XFRM_MSG_DELSA, 0, _sa_id_or_fail(sa)))
        except KernelError as exc:
            results[i] = exc
            continue
        sent.append(i)
    with _using(sock) as s:
        answers = s.request_many(requests, lambda k: f"delete {sas[sent[k]].describe()}")
    for i, answer in zip(sent, answers):
        results[i] = _delete_result(answer)
    return results


# --- monitor ----------------------------------------------------------------

# Lost notifications: the caller must re-dump both families. KernelEvent's Action
# has no dedicated member yet, so an overrun is a FLUSH whose family is "xfrm"
# (real flushes say "xfrm_sa" or "xfrm_policy"); see is_overrun().
OVERRUN_FAMILY = "xfrm"
_OVERRUN_ACTION = getattr(Action, "OVERRUN", Action.FLUSH)

MONITOR_GROUPS = (XFRMNLGRP_SA, XFRMNLGRP_POLICY, XFRMNLGRP_EXPIRE, XFRMNLGRP_ACQUIRE)


def is_overrun(event: KernelEvent) -> bool:
    """True for the event saying notifications were lost (re-dump SAs and policies)."""
    return event.family == OVERRUN_FAMILY


def decode_event(msg_type: int, seq: int, pid: int, payload) -> KernelEvent | None:
    """One XFRM notification as a KernelEvent; None for types the monitor does not report."""
    payload = bytes(payload)        # the decoders' caches key on slices: bytes, not views
    end = len(payload)

    def need(size: int) -> None:
        if end < size:
            raise KernelError(f"cannot decode XFRM notification type {msg_type}: {end} bytes, "
                              f"expected at least {size}")

    if msg_type in (XFRM_MSG_NEWSA, XFRM_MSG_UPDSA):
        need(224)
        action = Action.NEW if msg_type == XFRM_MSG_NEWSA else Action.UPDATE
        return KernelEvent("xfrm_sa", action, _sa_at(payload, 0, 224, end), pid, seq)
    if msg_type == XFRM_MSG_DELSA:
        need(24)
        # the id comes first; the whole SA is in XFRMA_SA, its other attributes at top level
        where = _find_attr(payload, 24, end, XFRMA_SA)
        if where is None or where[1] - where[0] < 224:
            raise KernelError("cannot decode XFRM DELSA notification: no XFRMA_SA attribute")
        buf = bytes(payload[where[0]:where[0] + 224]) + bytes(payload[24:end])
        sa = _sa_at(buf, 0, 224, len(buf))
        return KernelEvent("xfrm_sa", Action.DELETE, sa, pid, seq)
    if msg_type == XFRM_MSG_EXPIRE:
        need(_SA_EXPIRE_SIZE)
        sa = _sa_at(payload, 0, _SA_EXPIRE_SIZE, end)
        return KernelEvent("xfrm_sa", Action.EXPIRE, sa, pid, seq, hard=bool(payload[224]))
    if msg_type in (XFRM_MSG_NEWPOLICY, XFRM_MSG_UPDPOLICY):
        need(168)
        action = Action.NEW if msg_type == XFRM_MSG_NEWPOLICY else Action.UPDATE
        return KernelEvent("xfrm_policy", action, _policy_at(payload, 0, 168, end), pid, seq)
    if msg_type == XFRM_MSG_DELPOLICY:
        need(64)
        where = _find_attr(payload, 64, end, XFRMA_POLICY)
        if where is None or where[1] - where[0] < 168:
            raise KernelError("cannot decode XFRM DELPOLICY notification: no XFRMA_POLICY attribute")
        # re-base: the info from the attribute, then the top-level attributes (tmpl, mark, ...)
        buf = bytes(payload[where[0]:where[0] + 168]) + bytes(payload[64:end])
        return KernelEvent("xfrm_policy", Action.DELETE, _policy_at(buf, 0, 168, len(buf)), pid, seq)
    if msg_type == XFRM_MSG_POLEXPIRE:
        need(_POLEXPIRE_SIZE)
        policy = _policy_at(payload, 0, _POLEXPIRE_SIZE, end)
        return KernelEvent("xfrm_policy", Action.EXPIRE, policy, pid, seq, hard=bool(payload[168]))
    if msg_type == XFRM_MSG_ACQUIRE:
        need(_ACQUIRE_SIZE)
        daddr, _spi, proto, saddr = _ACQUIRE_HEAD.unpack_from(payload, 0)
        policy = _policy_at(payload, 96, _ACQUIRE_SIZE, end)
        flow = _selector_at(payload, 40)
        family = flow.family or policy.selector.family
        (acq_seq,) = _U32.unpack_from(payload, 276)
        record = XfrmAcquire(_addr(family, daddr), _addr(family, saddr), proto, flow, policy, acq_seq)
        return KernelEvent("xfrm_sa", Action.ACQUIRE, record, pid, seq)
    if msg_type == XFRM_MSG_FLUSHSA:
        return KernelEvent("xfrm_sa", Action.FLUSH, None, pid, seq)
    if msg_type == XFRM_MSG_FLUSHPOLICY:
        return KernelEvent("xfrm_policy", Action.FLUSH, None, pid, seq)
    return None


class XfrmMonitor:
    """Multicast listener for SA, policy, expire and acquire notifications (non-blocking reads)."""

    def __init__(self, groups: tuple[int, ...] = MONITOR_GROUPS, rcvbuf: int = DEFAULT_RCVBUF):
        self._sock = NetlinkSocket(NETLINK_XFRM, groups, rcvbuf)
        self.overruns = 0

    @property
    def port_id(self) -> int:
        """The monitor socket's own port id (requests go through other sockets: see open_socket)."""
        return self._sock.port_id

    def fileno(self) -> int:
        return self._sock.fileno()

    def read_events(self) -> list[KernelEvent]:
        """Every queued notification, decoded, without blocking; [] when none."""
        events = []
        for msg in self._sock.read_notifications():
            if msg.msg_type != NLMSG_OVERRUN:
                try:
                    event = decode_event(msg.msg_type, msg.seq, msg.pid, msg.payload)
                except (KernelError, ValueError, struct.error) as exc:
                    # an event we cannot read is an event lost: same remedy, re-dump
                    log.warning("cannot decode XFRM notification type %d from port %d (%s); "
                                "reporting lost notifications", msg.msg_type, msg.pid, exc)
                else:
                    if event is not None:
                        events.append(event)
                    continue
            self.overruns += 1
            events.append(KernelEvent(OVERRUN_FAMILY, _OVERRUN_ACTION, None, 0))
        return events

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "XfrmMonitor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
