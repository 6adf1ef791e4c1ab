"""Reading version 2 snapshots with msgspec: the record schema checked in C, the rest here.

The structs below mirror what ``snapshot.record_json`` writes for policies and routes (the
families a concentrator has tens of thousands of); the other families keep their
``from_json``. What a type cannot say (an address fits its family, hex is hex) is checked
once per distinct value. The records and the errors (SnapshotError, exit 6) are those of
the json-module path; tests/test_snapshot_typed.py holds both to that.
"""

from __future__ import annotations

import functools
import re
import socket
from typing import Annotated, Any, Literal, Optional, Union

import msgspec
from msgspec import Meta, Raw, Struct

from .kernel import routes as _routes
from .kernel import xfrm as _x

U8 = Annotated[int, Meta(ge=0, le=0xFF)]
U16 = Annotated[int, Meta(ge=0, le=0xFFFF)]
U32 = Annotated[int, Meta(ge=0, le=0xFFFFFFFF)]
I32 = Annotated[int, Meta(ge=-(1 << 31), le=(1 << 31) - 1)]
Text = Annotated[str, Meta(min_length=1)]       # rtnl.json_str: a non-empty string

# An enumeration field takes the name ``ip xfrm`` prints or the number (xfrm._value), and the
# number must fit where the kernel struct keeps it (what XfrmSelector/XfrmTemplate.pack check).
_Family = Union[U16, Literal["unspec", "inet", "inet6"]]
_Proto = Union[U8, Literal["esp", "ah", "comp", "route2", "hao", "any"]]
_Mode = Union[U8, Literal["transport", "tunnel", "ro", "in_trigger", "beet"]]
_Share = Union[U8, Literal["any", "session", "user", "unique"]]


# gc=False: a struct without the cycle collector's header decodes faster, and these hold no cycles.
class Selector(Struct, frozen=True, gc=False):
    family: _Family
    saddr: str
    prefixlen_s: U8
    daddr: str
    prefixlen_d: U8
    proto: U8
    sport: U16
    sport_mask: U16
    dport: U16
    dport_mask: U16
    ifindex: I32
    user: U32


class Lifetime(Struct, frozen=True, gc=False):
    soft_byte_limit: int
    hard_byte_limit: int
    soft_packet_limit: int
    hard_packet_limit: int
    soft_add_expires_seconds: int
    hard_add_expires_seconds: int
    soft_use_expires_seconds: int
    hard_use_expires_seconds: int


class LifetimeCur(Struct, frozen=True, gc=False):
    bytes: int
    packets: int
    add_time: int
    use_time: int


class Template(Struct, frozen=True, gc=False):
    family: _Family
    saddr: str
    daddr: str
    proto: _Proto
    spi: U32
    reqid: U32
    mode: _Mode
    share: _Share
    optional: U8
    aalgos: U32
    ealgos: U32
    calgos: U32


class Mark(Struct, frozen=True, gc=False):
    value: int
    mask: int


class RawAttr(Struct, frozen=True, gc=False):
    type: int
    data: str


class Policy(Struct, frozen=True, gc=False):
    selector: Selector
    dir: Union[int, Literal["in", "out", "fwd", "socket-in", "socket-out", "socket-fwd"]]
    action: Union[int, Literal["allow", "block"]]
    priority: int
    index: int
    flags: int
    share: Union[int, Literal["any", "session", "user", "unique"]]
    mark: Optional[Mark]
    if_id: int
    ptype: Union[int, Literal["main", "sub"]]
    templates: tuple[Template, ...]
    attrs: tuple[RawAttr, ...]
    curlft: LifetimeCur
    # version 2 leaves out the no-limits default; an explicit null is refused, as the json path does
    lifetime: Union[Lifetime, msgspec.UnsetType] = msgspec.UNSET


# The no-limits lifetime version 2 leaves out, as its JSON: the default of snapshot_show's policies,
# which msgspec encodes by copying (the struct took 10 of the 27 ms of encoding 30,000 policies).
# (A Raw is not hashable, so neither is a policy struct holding it: nothing hashes those.)
NO_LIMITS_JSON = Raw(msgspec.json.encode(Lifetime(**_x.NO_LIMITS.to_json())))


class NextHop(Struct, frozen=True, gc=False):
    weight: Annotated[int, Meta(ge=0, le=256)]
    flags: U8
    gateway: Optional[Text] = None
    oif: Optional[U32] = None
    oif_name: Optional[Text] = None


class Route(Struct, frozen=True, gc=False):
    family: Literal["inet", "inet6"]
    table: U32
    dst: Text
    dst_len: U32
    type: U8
    protocol: U8
    scope: U8
    src_len: U32
    tos: U8
    priority: U32
    flags: U32
    gateway: Optional[Text] = None
    oif: Optional[U32] = None
    oif_name: Optional[Text] = None
    prefsrc: Optional[Text] = None
    src: Optional[Text] = None
    metrics: dict[Literal[_routes.METRIC_NAMES], Union[int, str]] = {}
    multipath: tuple[NextHop, ...] = ()
    nhid: Optional[U32] = None
    pref: Optional[U8] = None
    expires: Optional[U32] = None


class Head(Struct):
    """The document around the records; UNSET marks a key the file lacks."""

    schema: Any = msgspec.UNSET
    version: Any = msgspec.UNSET
    created: Any = msgspec.UNSET
    created_unix: Any = msgspec.UNSET
    host: Any = msgspec.UNSET
    kernel: Any = msgspec.UNSET
    netns: Any = msgspec.UNSET
    daemon: Any = msgspec.UNSET
    keys_included: Any = msgspec.UNSET
    context: Any = msgspec.UNSET
    objects: Raw = msgspec.UNSET


class Objects(Struct, forbid_unknown_fields=True):
    xfrm_sa: list = []
    xfrm_policy: list[Policy] = []
    route: list[Route] = []
    rule: list = []
    address: list = []
    firewall: list = []


class Document(Head):
    """The whole document in one pass, for files that turn out valid (the usual case)."""

    objects: Objects = msgspec.UNSET


class Texts(Struct, forbid_unknown_fields=True):
    """The families of Objects, each policy and route left as its JSON text (the file's bytes)."""

    xfrm_sa: list = []
    xfrm_policy: list[Raw] = []
    route: list[Raw] = []
    rule: list = []
    address: list = []
    firewall: list = []


class TextDocument(Head):
    """The whole document, its many records left as text (for comparing two files)."""

    objects: Texts = msgspec.UNSET


HEAD = msgspec.json.Decoder(Head)
DOCUMENT = msgspec.json.Decoder(Document)
TEXT_DOCUMENT = msgspec.json.Decoder(TextDocument)
ITEM = {"xfrm_policy": msgspec.json.Decoder(Policy), "route": msgspec.json.Decoder(Route)}
OBJECTS = msgspec.json.Decoder(dict[str, Raw])
TYPED = {"xfrm_policy": msgspec.json.Decoder(list[Policy]), "route": msgspec.json.Decoder(list[Route])}
GENERIC = msgspec.json.Decoder(list)
ValidationError = msgspec.ValidationError
DecodeError = msgspec.DecodeError

_AT = re.compile(r"`\$\[(\d+)\]([^`]*)`")


def where(exc: ValidationError) -> tuple[int | None, str]:
    """(record index or None, message) of a typed decoding error ("... - at `$[3].selector`")."""
    text = str(exc)
    m = _AT.search(text)
    if m is None:
        return None, text
    inner = m.group(2).lstrip(".")
    return int(m.group(1)), text[:m.start()] + (f"`{inner}`" if inner else "the record")


# --- checks a type cannot express, once per distinct value -----------------------------------

def _names(names: dict[int, str]) -> dict[str, int]:
    return {name: number for number, name in names.items()}


_FAMILY = _names(_x.FAMILY_NAMES)
_DIR = _names(_x.DIR_NAMES)
_ACTION = _names(_x.ACTION_NAMES)
_SHARE = _names(_x.SHARE_NAMES)
_PTYPE = _names(_x.PTYPE_NAMES)
_PROTO = _names(_x.PROTO_NAMES)
_MODE = _names(_x.MODE_NAMES)


def _num(names: dict[str, int], value: str | int) -> int:
    return names[value] if value.__class__ is str else value


class _Checked:
    """Addresses and sub-records seen so far in one load (a snapshot repeats them a lot)."""

    def __init__(self) -> None:
        self.xfrm_addr: set[tuple[int, str]] = set()
        self.ip_version: dict[str, int] = {}
        self.selectors: dict[Selector, _x.XfrmSelector] = {}
        self.templates: dict[tuple[Template, ...], tuple[_x.XfrmTemplate, ...]] = {}
        self.curlft: dict[LifetimeCur, _x.XfrmLifetimeCur] = {}
        self.hops: dict[tuple[NextHop, ...], tuple[_routes.NextHop, ...]] = {}

    def xfrm_address(self, family: int, text: str) -> None:
        """What xfrm._pack_addr accepts for FAMILY (its ValueError otherwise)."""
        if (family, text) not in self.xfrm_addr:
            _x._pack_addr(family, text)
            self.xfrm_addr.add((family, text))

    def version(self, text: str) -> int:
        """4 or 6 for an address ipaddress.ip_address accepts (rtnl.json_addr), else ValueError."""
        v = self.ip_version.get(text)
        if v is None:
            v = _ip_version(text)
            self.ip_version[text] = v
        return v


def _ip_version(text: str) -> int:
    # What inet_ntop writes back unchanged, ipaddress accepts; anything else it decides itself.
    for family, version in ((socket.AF_INET, 4), (socket.AF_INET6, 6)):
        try:
            if socket.inet_ntop(family, socket.inet_pton(family, text)) == text:
                return version
        except OSError:
            pass
    import ipaddress
    return ipaddress.ip_address(text).version


def _selector(c: _Checked, s: Selector) -> _x.XfrmSelector:
    family = _num(_FAMILY, s.family)
    c.xfrm_address(family, s.saddr)
    c.xfrm_address(family, s.daddr)
    sel = c.selectors[s] = _x._new_selector(
        family, s.saddr, s.prefixlen_s, s.daddr, s.prefixlen_d, s.proto, s.sport, s.sport_mask,
        s.dport, s.dport_mask, s.ifindex, s.user)
    return sel


def _templates(c: _Checked, ts: tuple[Template, ...]) -> tuple[_x.XfrmTemplate, ...]:
    built = []
    for t in ts:
        family = _num(_FAMILY, t.family)
        c.xfrm_address(family, t.saddr)
        c.xfrm_address(family, t.daddr)
        built.append(_x._new_template(family, t.saddr, t.daddr, _num(_PROTO, t.proto), t.spi, t.reqid,
                                      _num(_MODE, t.mode), _num(_SHARE, t.share), t.optional, t.aalgos,
                                      t.ealgos, t.calgos))
    out = c.templates[ts] = tuple(built)
    return out


def _curlft(c: _Checked, cur: LifetimeCur) -> _x.XfrmLifetimeCur:
    out = c.curlft[cur] = _x._new_curlft(cur.bytes, cur.packets, cur.add_time, cur.use_time)
    return out


def policy_records(items: list[Policy], fail) -> tuple:
    """The XfrmPolicy records of typed ITEMS; FAIL(index, exception) raises for a bad one."""
    c = _Checked()
    new = _x._new_policy
    no_limits = _x.NO_LIMITS
    selector, templates, curlft = c.selectors.get, c.templates.get, c.curlft.get
    direction, action, share, ptype = _DIR.get, _ACTION.get, _SHARE.get, _PTYPE.get
    out = []
    append = out.append
    for i, p in enumerate(items):
        try:
            m, lft, s, ts, cur, d, a, sh, pt = (p.mark, p.lifetime, p.selector, p.templates, p.curlft, p.dir,
                                                p.action, p.share, p.ptype)
            append(new(selector(s) or _selector(c, s), direction(d, d), action(a, a), p.priority, p.index,
                       p.flags, share(sh, sh),
                       no_limits if lft is msgspec.UNSET or lft is NO_LIMITS_JSON
                       else _x.XfrmLifetime(*msgspec.structs.astuple(lft)),
                       None if m is None else (m.value, m.mask), p.if_id, ptype(pt, pt),
                       templates(ts) or (_templates(c, ts) if ts else ()),
                       tuple((a.type, bytes.fromhex(a.data)) for a in p.attrs) if p.attrs else (),
                       curlft(cur) or _curlft(c, cur)))
        except ValueError as exc:
            fail(i, exc)
    return tuple(out)


_new_route = _x._fast_builder(_routes.Route)
_new_hop = _x._fast_builder(_routes.NextHop)
_FULL = {"inet": 32, "inet6": 128}
_VERSION = {"inet": 4, "inet6": 6}


def _hops(c: _Checked, hops: tuple[NextHop, ...]) -> tuple[_routes.NextHop, ...]:
    out = c.hops.get(hops)
    if out is None:
        for h in hops:
            if h.gateway is not None:
                c.version(h.gateway)
        out = c.hops[hops] = tuple(_new_hop(h.gateway, h.oif, h.oif_name, h.weight, h.flags) for h in hops)
    return out


def _check_route(c: _Checked, r: Route) -> None:
    family = r.family
    want, full, version = _VERSION[family], _FULL[family], c.version
    if version(r.dst) != want:
        raise ValueError(f"dst {r.dst!r} is not an {family} address")
    if r.dst_len > full:
        raise ValueError(f"dst_len must be in 0..{full}, not {r.dst_len}")
    if r.src_len > full:
        raise ValueError(f"src_len must be in 0..{full}, not {r.src_len}")
    for key, value in (("prefsrc", r.prefsrc), ("src", r.src)):
        if value is not None and version(value) != want:
            raise ValueError(f"{key} {value!r} is not an {family} address")
    if r.gateway is not None:
        version(r.gateway)


def route_records(items: list[Route], fail) -> tuple:
    """The Route records of typed ITEMS, checked as Route.from_json checks them."""
    c = _Checked()
    out = []
    append = out.append
    for i, r in enumerate(items):
        try:
            _check_route(c, r)
            metrics = tuple(sorted(r.metrics.items())) if r.metrics else ()
            append(_new_route(r.family, r.table, r.dst, r.dst_len, r.type, r.protocol, r.scope, r.gateway, r.oif,
                              r.oif_name, r.prefsrc, r.src, r.src_len, r.tos, r.priority, metrics,
                              _hops(c, r.multipath) if r.multipath else (), r.nhid, r.pref, r.flags,
                              r.expires))
        except ValueError as exc:
            fail(i, exc)
    return tuple(out)


def check_routes(items: list[Route], fail) -> None:
    """What route_records checks, without building a record."""
    if not _routes_fit(items):
        route_records(items, fail)      # finds the first bad one and says why


def check_policies(items: list[Policy], fail) -> None:
    """What policy_records checks, without building a record."""
    if not _policies_fit(items):
        policy_records(items, fail)     # finds the first bad one and says why


# The checks above and the texts below gather the values of all items first and check each
# distinct one once, in C where they can: 0.5 us a policy (1.5 us item by item), 0.6 us a route
# (1 us). Whatever they doubt goes through the records' builders, which name the first bad
# item and its fault: the error is the one loading the records gives.

def _policies_fit(items: list[Policy]) -> bool:
    """Whether every address fits its family and every raw attribute is hex, in all of ITEMS."""
    by_family: dict[Any, set[str]] = {}
    family, found = None, set()
    for p in items:
        s = p.selector
        if s.family != family:
            family = s.family
            found = by_family.setdefault(family, set())
        found.add(s.saddr)
        found.add(s.daddr)
        for t in p.templates:
            same = found if t.family == family else by_family.setdefault(t.family, set())
            same.add(t.saddr)
            same.add(t.daddr)
        if p.attrs:
            try:
                for a in p.attrs:
                    bytes.fromhex(a.data)
            except ValueError:
                return False
    try:
        for name, found in by_family.items():
            number = _num(_FAMILY, name)
            if number in (socket.AF_INET, socket.AF_INET6):
                # what _pack_addr accepts of these families, in one C loop
                list(map(functools.partial(socket.inet_pton, number), found))
            else:
                for text in found:
                    _x._pack_addr(number, text)
    except (OSError, ValueError):
        return False
    return True


def _routes_fit(items: list[Route]) -> bool:
    """Whether every route of ITEMS passes _check_route and its nexthops' gateways are addresses."""
    own: dict[str, set[str]] = {"inet": set(), "inet6": set()}     # addresses of the route's family
    longest = {"inet": 0, "inet6": 0}
    gateways: set[str] = set()
    for r in items:
        family = r.family
        found = own[family]
        found.add(r.dst)
        if r.prefsrc is not None:
            found.add(r.prefsrc)
        if r.src is not None:
            found.add(r.src)
        length = r.dst_len if r.dst_len > r.src_len else r.src_len
        if length > longest[family]:
            longest[family] = length
        if r.gateway is not None:
            gateways.add(r.gateway)
        for h in r.multipath:
            if h.gateway is not None:
                gateways.add(h.gateway)
    version = _Checked().version
    try:
        for family, found in own.items():
            if longest[family] > _FULL[family]:
                return False
            if not _all_of_family(family, found):
                want = _VERSION[family]
                for text in found:
                    if version(text) != want:
                        return False
        for text in gateways:
            version(text)
    except ValueError:
        return False
    return True


def _all_of_family(family: str, texts: set[str]) -> bool:
    """Whether each of TEXTS is an address of FAMILY as inet_ntop writes it (then _ip_version says
    so too); False when unsure: a text written otherwise is left to _ip_version."""
    number = socket.AF_INET if family == "inet" else socket.AF_INET6
    texts = list(texts)
    try:
        return list(map(functools.partial(socket.inet_ntop, number),
                        map(functools.partial(socket.inet_pton, number), texts))) == texts
    except (OSError, ValueError):
        return False


_DIR_TEXT = {**{name: name for name in _DIR}, **_x.DIR_NAMES}
_PTYPE_TEXT = {**{name: name for name in _PTYPE}, **_x.PTYPE_NAMES, "main": None, _x.PTYPE_MAIN: None}


def policy_texts(items: list[Policy], fail) -> list[str]:
    """What describe() says of each policy policy_records would build of ITEMS (its errors too)."""
    check_policies(items, fail)
    selector_text, policy_text = _x.selector_text, _x.policy_text
    direction, ptype = _DIR_TEXT.get, _PTYPE_TEXT.get
    out = []
    append = out.append
    for p in items:
        s, m, d, pt = p.selector, p.mark, p.dir, p.ptype
        append(policy_text(selector_text(s.saddr, s.prefixlen_s, s.daddr, s.prefixlen_d, s.proto, s.sport,
                                         s.sport_mask, s.dport, s.dport_mask),
                           direction(d, d), ptype(pt, pt), None if m is None else (m.value, m.mask), p.if_id,
                           p.priority, p.index))
    return out


def route_texts(items: list[Route], fail) -> list[str]:
    """What describe() says of each route route_records would build of ITEMS (its errors too)."""
    check_routes(items, fail)
    route_text, hop_text = _routes.route_text, _routes.hop_text
    return [route_text(r.family, r.table, r.dst, r.dst_len, r.type, r.gateway, r.oif, r.oif_name, r.prefsrc,
                       r.src, r.src_len, r.tos, r.priority,
                       [hop_text(h.gateway, h.oif, h.oif_name, h.weight) for h in r.multipath] if r.multipath
                       else (), r.nhid)
            for r in items]


RECORDS = {"xfrm_policy": policy_records, "route": route_records}
CHECKS = {"xfrm_policy": check_policies, "route": check_routes}
TEXTS = {"xfrm_policy": policy_texts, "route": route_texts}
