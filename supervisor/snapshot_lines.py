"""Version 2 lines of policies and routes, written straight from the records.

The generic way builds each record's JSON object (``to_json``) and encodes it: for 30,000
policies the objects cost more than the encoding. Here each line is one format string with
the fields in the order ``to_json`` has them, and the sub-records a dump shares (a selector
used by the in and fwd policies, a template, the counters) are encoded once. The bytes are
those of the generic way (tests/test_snapshot_lines.py): a record with anything unusual
(a string that JSON would escape, metrics, nexthops) is left to GENERIC.
"""

from __future__ import annotations

import struct as _struct
from typing import Callable, Iterator

from .kernel import xfrm as _x

Generic = Callable[[object], str]


def plain(text: str) -> bool:
    """Whether TEXT is written between quotes as it is (no escapes, in any encoder)."""
    return text.isascii() and text.isprintable() and '"' not in text and "\\" not in text


def _tokens(names: dict[int, str]) -> dict[int, str]:
    return {number: f'"{name}"' for number, name in names.items()}


_FAMILY = _tokens(_x.FAMILY_NAMES)
_DIR = _tokens(_x.DIR_NAMES)
_ACTION = _tokens(_x.ACTION_NAMES)
_SHARE = _tokens(_x.SHARE_NAMES)
_PTYPE = _tokens(_x.PTYPE_NAMES)
_PROTO = _tokens(_x.PROTO_NAMES)
_MODE = _tokens(_x.MODE_NAMES)


def _selector(s: _x.XfrmSelector) -> str | None:
    if not (plain(s.saddr) and plain(s.daddr)):
        return None
    return (f'{{"family":{_FAMILY.get(s.family) or s.family},"saddr":"{s.saddr}","prefixlen_s":{s.prefixlen_s},'
            f'"daddr":"{s.daddr}","prefixlen_d":{s.prefixlen_d},"proto":{s.proto},"sport":{s.sport},'
            f'"sport_mask":{s.sport_mask},"dport":{s.dport},"dport_mask":{s.dport_mask},"ifindex":{s.ifindex},'
            f'"user":{s.user}}}')


def _template(t: _x.XfrmTemplate) -> str | None:
    if not (plain(t.saddr) and plain(t.daddr)):
        return None
    return (f'{{"family":{_FAMILY.get(t.family) or t.family},"saddr":"{t.saddr}","daddr":"{t.daddr}",'
            f'"proto":{_PROTO.get(t.proto) or t.proto},"spi":{t.spi},"reqid":{t.reqid},'
            f'"mode":{_MODE.get(t.mode) or t.mode},"share":{_SHARE.get(t.share) or t.share},'
            f'"optional":{t.optional},"aalgos":{t.aalgos},"ealgos":{t.ealgos},"calgos":{t.calgos}}}')


def _lifetime(lft: _x.XfrmLifetime) -> str:
    return (f'"lifetime":{{"soft_byte_limit":{lft.soft_byte_limit},"hard_byte_limit":{lft.hard_byte_limit},'
            f'"soft_packet_limit":{lft.soft_packet_limit},"hard_packet_limit":{lft.hard_packet_limit},'
            f'"soft_add_expires_seconds":{lft.soft_add_expires_seconds},'
            f'"hard_add_expires_seconds":{lft.hard_add_expires_seconds},'
            f'"soft_use_expires_seconds":{lft.soft_use_expires_seconds},'
            f'"hard_use_expires_seconds":{lft.hard_use_expires_seconds}}},')


def policy_lines(records: tuple, generic: Generic) -> list[str]:
    """The version 2 line of each XfrmPolicy in RECORDS."""
    # By id(): the records keep every sub-record alive while this runs. None: not plain.
    selectors: dict[int, str | None] = {}
    templates: dict[int, str | None] = {}
    counters: dict[int, str] = {}
    no_limits = _x.NO_LIMITS
    dirs, actions, shares, ptypes = _DIR.get, _ACTION.get, _SHARE.get, _PTYPE.get
    out = []
    append = out.append
    for p in records:
        sel, ts, cur, lft, mark, attrs = p.selector, p.templates, p.curlft, p.lifetime, p.mark, p.attrs
        s = selectors.get(id(sel), "")
        if s == "":
            s = selectors[id(sel)] = _selector(sel)
        if len(ts) == 1:
            t = templates.get(id(ts[0]), "")
            if t == "":
                t = templates[id(ts[0])] = _template(ts[0])
        else:
            parts = [_template(x) for x in ts]
            t = None if None in parts else ",".join(parts)
        c = counters.get(id(cur))
        if c is None:
            c = counters[id(cur)] = (f'{{"bytes":{cur.bytes},"packets":{cur.packets},"add_time":{cur.add_time},'
                                     f'"use_time":{cur.use_time}}}')
        if s is None or t is None:
            append(generic(p))
            continue
        d, a, sh, pt = p.dir, p.action, p.share, p.ptype
        append(f'{{"selector":{s},"dir":{dirs(d) or d},"action":{actions(a) or a},"priority":{p.priority},'
               f'"index":{p.index},"flags":{p.flags},"share":{shares(sh) or sh},'
               f'{"" if lft is no_limits or lft == no_limits else _lifetime(lft)}'
               f'"mark":{"null" if mark is None else f"""{{"value":{mark[0]},"mask":{mark[1]}}}"""},'
               f'"if_id":{p.if_id},"ptype":{ptypes(pt) or pt},"templates":[{t}],'
               f'"attrs":{_attrs(attrs) if attrs else "[]"},"curlft":{c}}}')
    return out


def _attrs(attrs: tuple) -> str:
    return "[" + ",".join([f'{{"type":{a},"data":"{d.hex()}"}}' for a, d in attrs]) + "]"


_ROUTE = ('{"family":"%s","table":%d,"dst":"%s","dst_len":%d,"type":%d,"protocol":%d,"scope":%d,"gateway":%s,'
          '"oif":%s,"oif_name":%s,"prefsrc":%s,"src":%s,"src_len":%d,"tos":%d,"priority":%d,"metrics":{},'
          '"multipath":[],"nhid":%s,"pref":%s,"flags":%d,"expires":%s}')


def route_lines(records: tuple, generic: Generic) -> list[str]:
    """The version 2 line of each Route in RECORDS."""
    quoted: dict[str | None, str | None] = {None: "null"}      # a string's JSON, None if not plain

    def q(text: str | None) -> str | None:
        out = quoted.get(text, "")
        if out == "":
            out = quoted[text] = f'"{text}"' if plain(text) else None
        return out

    out = []
    append = out.append
    for r in records:
        family, dst = r.family, r.dst
        gateway, oif_name, prefsrc, src = q(r.gateway), q(r.oif_name), q(r.prefsrc), q(r.src)
        if (r.metrics or r.multipath or gateway is None or oif_name is None or prefsrc is None or src is None
                or not plain(dst) or q(family) is None):
            append(generic(r))
            continue
        oif, nhid, pref, expires = r.oif, r.nhid, r.pref, r.expires
        append(_ROUTE % (family, r.table, dst, r.dst_len, r.type, r.protocol, r.scope, gateway,
                         "null" if oif is None else str(oif), oif_name, prefsrc, src, r.src_len, r.tos,
                         r.priority, "null" if nhid is None else str(nhid), "null" if pref is None else str(pref),
                         r.flags, "null" if expires is None else str(expires)))
    return out


LINES = {"xfrm_policy": policy_lines, "route": route_lines}


# --- policies straight from a dump's datagrams ------------------------------------------------
#
# The CLI's snapshot needs no policy records, only their lines: the common shape (one template
# or none, default lifetime, the attributes a dump of charon's policies has) is formatted from
# the wire, mirroring xfrm._policy_at; any other message is decoded by _policy_at and left to
# GENERIC. tests/test_snapshot_lines.py compares both ways on real dumps.

def _selector_raw(buf: bytes, off: int, shapes: dict) -> str:
    # What follows the addresses (ports, family, prefix lengths, proto, ifindex, user) is shared by
    # many selectors: formatted once per distinct value.
    key = buf[off + 32:off + 56]
    shape = shapes.get(key)
    if shape is None:
        (_, _, dport, dport_mask, sport, sport_mask, family, plen_d, plen_s, proto, ifindex,
         user) = _x._SEL_STRUCT.unpack_from(buf, off)
        if sport or sport_mask or dport or dport_mask:
            ntohs = _x._ntohs
            sport, sport_mask, dport, dport_mask = ntohs(sport), ntohs(sport_mask), ntohs(dport), ntohs(dport_mask)
        shape = shapes[key] = (
            family, f'{{"family":{_FAMILY.get(family) or family},"saddr":"', f'","prefixlen_s":{plen_s},"daddr":"',
            f'","prefixlen_d":{plen_d},"proto":{proto},"sport":{sport},"sport_mask":{sport_mask},"dport":{dport},'
            f'"dport_mask":{dport_mask},"ifindex":{ifindex},"user":{user}}}')
    family, head, middle, tail = shape
    if family == _x.AF_INET:
        return head + _x._ntop(_x.AF_INET, buf[off + 16:off + 20]) + middle + _x._ntop(_x.AF_INET, buf[off:off + 4]) + tail
    return head + _x._addr(family, buf[off + 16:off + 32]) + middle + _x._addr(family, buf[off:off + 16]) + tail


def _template_raw(buf: bytes, off: int, shapes: dict) -> str:
    key = buf[off + 16:off + 28] + buf[off + 48:off + 64]     # spi, proto, family; mode ... calgos
    shape = shapes.get(key)
    if shape is None:
        _, spi, proto, family, _, _, mode, share, optional, aalgos, ealgos, calgos = _x._TMPL.unpack_from(buf, off)
        shape = shapes[key] = (
            family, f'{{"family":{_FAMILY.get(family) or family},"saddr":"', '","daddr":"',
            f'","proto":{_PROTO.get(proto) or proto},"spi":{_x._ntohl(spi) if spi else 0},"reqid":',
            f',"mode":{_MODE.get(mode) or mode},"share":{_SHARE.get(share) or share},"optional":{optional},'
            f'"aalgos":{aalgos},"ealgos":{ealgos},"calgos":{calgos}}}')
    family, head, middle, before_reqid, tail = shape
    (reqid,) = _x._U32.unpack_from(buf, off + 44)
    if family == _x.AF_INET:
        saddr, daddr = _x._ntop(_x.AF_INET, buf[off + 28:off + 32]), _x._ntop(_x.AF_INET, buf[off:off + 4])
    else:
        saddr, daddr = _x._addr(family, buf[off + 28:off + 44]), _x._addr(family, buf[off:off + 16])
    return f"{head}{saddr}{middle}{daddr}{before_reqid}{reqid}{tail}"


def policy_lines_from_dump(chunks: list[bytes], generic: Generic) -> list[str]:
    """The version 2 line of each policy in the datagrams of a GETPOLICY dump (``dump_raw``)."""
    return [line for lines in iter_policy_lines(chunks, generic) for line in lines]


class PolicyDump:
    """A GETPOLICY dump standing in for its policies in a snapshot being written: the lines are
    made a datagram at a time while the file is written, so tens of megabytes of them never
    exist at once (fresh memory costs more in page faults than making the lines)."""

    def __init__(self, chunks: list[bytes], generic: Generic):
        self.chunks = chunks
        self.generic = generic
        self._count: int | None = None

    def batches(self) -> Iterator[list[str]]:
        count = 0
        for lines in iter_policy_lines(self.chunks, self.generic):
            count += len(lines)
            yield lines
        self._count = count

    def __len__(self) -> int:
        if self._count is None:
            self._count = sum(1 for data in self.chunks for _ in _policy_messages(data))
        return self._count


def _policy_messages(data: bytes) -> Iterator[int]:
    off, end = 0, len(data)
    while off < end:
        length, mtype = _x._HDR_LT.unpack_from(data, off)
        if mtype == _x.XFRM_MSG_NEWPOLICY:
            yield off
        off += (length + 3) & ~3


def iter_policy_lines(chunks: list[bytes], generic: Generic) -> Iterator[list[str]]:
    """policy_lines_from_dump, one datagram's lines at a time."""
    try:
        yield from _policy_lines(chunks, generic)
    finally:
        _x._clear_caches()      # of _policy_at, for the unusual ones


# --- charon's usual policy message, compiled -------------------------------------------------
#
# Nearly every policy charon installs is one 264-byte message: the header, the policy info, one
# template and the policy type. Policies of one "shape" differ only in their addresses, priority,
# index, reqid and counters; the rest of their line is the same text. So the message's bytes with
# those fields zeroed (an int and a mask: one C operation) name the shape, and the shape's line is
# compiled once into a function of the fields that vary. Its text is made of numbers and our own
# name tables only (no string from the message), and it is checked against the line the walk
# makes of the same message: a function that does not give those very bytes is never used (that
# shape keeps the walk).

_USUAL_LENGTH = 16 + 168 + 68 + 12
_SEL_AF, _TMPL_AF = 16 + 40, 16 + 168 + 4 + 24      # the families' offsets in the message
_MAX_SHAPES = 1024          # more distinct shapes than this: the rest are walked


# The usual message in the fields it is read in: the text that is the same for every message of
# a shape (the header, the selector's tail and lifetime limits, the policy's tail and the template
# attribute's header, the template's middle, its tail and the policy type) and, between them, the
# fields that vary: the addresses (16 bytes, whatever the family), the counters, priority and
# index, the reqid. The dump's sequence number and port are skipped.
_USUAL = _struct.Struct("=8s8x16s16s88s4Q2I12s16s12s16sI28s")


def _shape_key(fields: tuple) -> tuple:
    """What every message of one shape has alike: the fields of _USUAL that do not vary."""
    return fields[0], fields[3], fields[10], fields[12], fields[15]


class _Names4(dict):
    """IPv4 address field (16 bytes) -> text, one conversion per distinct address of the dump."""

    __slots__ = ()

    def __missing__(self, raw: bytes, ntop=_x._ntop, af=_x.AF_INET) -> str:
        text = self[raw] = ntop(af, raw[:4])
        return text


class _Names6(dict):
    """IPv6 address -> text, as _Names4."""

    __slots__ = ()

    def __missing__(self, raw: bytes, ntop=_x._ntop, af=_x.AF_INET6) -> str:
        text = self[raw] = ntop(af, raw)
        return text


def _names() -> dict[int, dict[bytes, str]]:
    return {_x.AF_INET: _Names4(), _x.AF_INET6: _Names6()}


_USUAL_TMPL, _USUAL_PTYPE = _x._NLA.pack(68, _x.XFRMA_TMPL), _x._NLA.pack(10, _x.XFRMA_POLICY_TYPE)
_FAMILIES = (_x.AF_INET, _x.AF_INET6)


def _compile_shape(buf: bytes, off: int, line: str, selector_shapes: dict,
                   names: dict[int, dict[bytes, str]] | None = None) -> Callable[[tuple], str] | None:
    """The line function of the shape of the usual message at OFF whose walked line is LINE: a
    function of the message's _USUAL fields; None when it would not give LINE."""
    sel_af = buf[off + _SEL_AF] | buf[off + _SEL_AF + 1] << 8
    tmpl_af = buf[off + _TMPL_AF] | buf[off + _TMPL_AF + 1] << 8
    info, tmpl = off + 16, off + 16 + 168 + 4
    # The layout the fields are read in: the template, then the policy type, and no lifetime
    # limits. (Every message of the shape has these very bytes: only the varying fields differ.)
    if (sel_af not in _FAMILIES or tmpl_af not in _FAMILIES or buf[tmpl - 4:tmpl] != _USUAL_TMPL
            or buf[tmpl + 64:tmpl + 68] != _USUAL_PTYPE or buf[info + 56:info + 120] != _x._NO_LIMITS_RAW):
        return None
    names = names if names is not None else _names()
    _selector_raw(buf, info, selector_shapes)
    _, sel_head, sel_middle, sel_tail = selector_shapes[buf[info + 32:info + 56]]
    _, spi, proto, _, _, _, mode, share, optional, aalgos, ealgos, calgos = _x._TMPL.unpack_from(buf, tmpl)
    _, _, d, act, flags, sh = _x._POLICY_TAIL.unpack_from(buf, info + 152)
    ptype = buf[off + _USUAL_LENGTH - 8]
    # (text, then the expression of the field that follows it; f: the _USUAL fields)
    pieces = [('{"selector":' + sel_head, "ns[f[2]]"), (sel_middle, "ns[f[1]]"),
              (sel_tail + f',"dir":{_DIR.get(d) or d},"action":{_ACTION.get(act) or act},"priority":', "f[8]"),
              (',"index":', "f[9]"),
              (f',"flags":{flags},"share":{_SHARE.get(sh) or sh},"mark":null,"if_id":0,'
               f'"ptype":{_PTYPE.get(ptype) or ptype},"templates":[{{"family":{_FAMILY.get(tmpl_af) or tmpl_af},'
               '"saddr":"', "nt[f[13]]"),
              ('","daddr":"', "nt[f[11]]"),
              (f'","proto":{_PROTO.get(proto) or proto},"spi":{_x._ntohl(spi) if spi else 0},"reqid":', "f[14]"),
              (f',"mode":{_MODE.get(mode) or mode},"share":{_SHARE.get(share) or share},"optional":{optional},'
               f'"aalgos":{aalgos},"ealgos":{ealgos},"calgos":{calgos}}}],"attrs":[],"curlft":{{"bytes":', "f[4]"),
              (',"packets":', "f[5]"), (',"add_time":', "f[6]"), (',"use_time":', "f[7]"), ("}}", None)]
    body = "".join(text.replace("{", "{{").replace("}", "}}") + ("" if expr is None else "{" + expr + "}")
                   for text, expr in pieces)
    namespace = {"ns": names[sel_af], "nt": names[tmpl_af]}
    exec(f"def line(f):\n    return f{body!r}\n", namespace)
    fn = namespace["line"]
    return fn if fn(_USUAL.unpack_from(buf, off)) == line else None


def _policy_lines(chunks: list[bytes], generic: Generic) -> Iterator[list[str]]:
    compiled: dict[tuple, Callable | None] = {}     # a usual message's shape -> its line function, None: walk it
    names = _names()
    read_usual, usual_iter, shape_of, usual_length = _USUAL.unpack_from, _USUAL.iter_unpack, _shape_key, _USUAL_LENGTH
    selectors: dict[bytes, str] = {}
    templates: dict[bytes, str] = {}
    counters: dict[bytes, str] = {}
    shapes: dict[bytes, tuple] = {}     # (selectors' and templates' keys differ in length)
    no_limits = _x._NO_LIMITS_RAW
    tail = _x._POLICY_TAIL.unpack_from
    header = _x._HDR_LT.unpack_from
    nla = _x._NLA.unpack_from
    u32 = _x._U32.unpack_from
    mark_of = _x._MARK.unpack_from
    dirs, actions, shares, ptypes = _DIR.get, _ACTION.get, _SHARE.get, _PTYPE.get
    NEWPOLICY, TMPL, PTYPE, MARK, IF_ID = (_x.XFRM_MSG_NEWPOLICY, _x.XFRMA_TMPL, _x.XFRMA_POLICY_TYPE,
                                            _x.XFRMA_MARK, _x.XFRMA_IF_ID)
    SKIP = (_x.XFRMA_PAD, _x.XFRMA_POLICY)
    usual_tmpl, usual_ptype = _USUAL_TMPL, _USUAL_PTYPE
    for buf in chunks:
        out: list[str] = []
        append = out.append
        off, end = 0, len(buf)
        if compiled and not end % usual_length:
            # A datagram of usual messages only, read in one go while each is of a compiled shape.
            # (A shape's header holds the message's length: the next one starts where it says.)
            for f in usual_iter(buf):
                shape = compiled.get((f[0], f[3], f[10], f[12], f[15]))     # _shape_key(f)
                if not shape:
                    break
                append(shape(f))
                off += usual_length
        while off < end:
            length, mtype = header(buf, off)
            if mtype != NEWPOLICY:
                off += (length + 3) & ~3
                continue
            if length < 16 + 168:
                raise _x.KernelError(f"cannot {_x._DUMP_POLICIES}: the kernel sent a {length}-byte message, "
                                     "shorter than its 168-byte header (ABI mismatch?)")
            start, info, stop = off, off + 16, off + length
            off += (length + 3) & ~3
            key = None
            if length == usual_length:
                fields = read_usual(buf, start)
                key = shape_of(fields)
                shape = compiled.get(key)
                if shape:
                    append(shape(fields))
                    continue
            t, mark, if_id, ptype, usual = "", None, 0, 0, buf[info + 56:info + 120] == no_limits
            a = info + 168
            if usual and stop - a == 80 and buf[a:a + 4] == usual_tmpl and buf[a + 68:a + 72] == usual_ptype:
                # charon's shape (one template, the policy type): no attribute walk
                raw = buf[a + 4:a + 68]
                t = templates.get(raw)
                if t is None:
                    t = templates[raw] = _template_raw(buf, a + 4, shapes)
                ptype = buf[a + 72]
                a = stop
            while usual and a + 4 <= stop:
                alen, atype = nla(buf, a)
                if alen < 4 or a + alen > stop:
                    usual = False       # _policy_at says what is wrong
                    break
                atype &= 0x3FFF
                if atype == TMPL:
                    if alen != 68:
                        usual = False
                        break
                    raw = buf[a + 4:a + 68]
                    t = templates.get(raw)
                    if t is None:
                        t = templates[raw] = _template_raw(buf, a + 4, shapes)
                elif atype == PTYPE:
                    ptype = buf[a + 4]
                elif atype == MARK:
                    mark = mark_of(buf, a + 4)
                elif atype == IF_ID:
                    (if_id,) = u32(buf, a + 4)
                elif atype not in SKIP:
                    usual = False
                    break
                a += (alen + 3) & ~3
            if not usual:
                append(generic(_x._policy_at(buf, info, info + 168, stop)))
                continue
            raw = buf[info:info + 56]
            s = selectors.get(raw)
            if s is None:
                s = selectors[raw] = _selector_raw(buf, info, shapes)
            raw = buf[info + 120:info + 152]
            c = counters.get(raw)
            if c is None:
                cur = _x._CUR_STRUCT.unpack_from(buf, info + 120)
                c = counters[raw] = f'{{"bytes":{cur[0]},"packets":{cur[1]},"add_time":{cur[2]},"use_time":{cur[3]}}}'
            priority, index, d, act, flags, sh = tail(buf, info + 152)
            line = (f'{{"selector":{s},"dir":{dirs(d) or d},"action":{actions(act) or act},"priority":{priority},'
                    f'"index":{index},"flags":{flags},"share":{shares(sh) or sh},'
                    f'"mark":{"null" if mark is None else f"""{{"value":{mark[0]},"mask":{mark[1]}}}"""},'
                    f'"if_id":{if_id},"ptype":{ptypes(ptype) or ptype},"templates":[{t}],"attrs":[],"curlft":{c}}}')
            append(line)
            if key is not None and key not in compiled and len(compiled) < _MAX_SHAPES:
                compiled[key] = _compile_shape(buf, start, line, shapes, names)
        yield out


# --- routes straight from a dump's datagrams ---------------------------------------------------
#
# As for policies: the usual shape (a table-220 route of charon: table, dst, gateway, oif,
# prefsrc, priority, and an IPv6 route's cacheinfo and pref) is formatted from the wire,
# mirroring routes.route_at; any other message is decoded by route_at and left to GENERIC.

def _route_lines(chunks: list[bytes], names: dict[int, str], table: int | None, what: str,
                 generic: Generic) -> Iterator[list[str]]:
    from .kernel import routes as r
    rtmsg, nla, u32, i32 = r._RTMSG.unpack_from, r._NLA.unpack_from, r._U32.unpack_from, r._I32.unpack_from
    family_names, addr_len, ntop = r.FAMILY_NAMES, r._ADDR_LEN, r.socket.inet_ntop
    DST, OIF, GATEWAY, PRIORITY, PREFSRC, TABLE, CACHEINFO, PREF = (
        r.RTA_DST, r.RTA_OIF, r.RTA_GATEWAY, r.RTA_PRIORITY, r.RTA_PREFSRC, r.RTA_TABLE, r.RTA_CACHEINFO, r.RTA_PREF)
    mask, cloned, newroute, hz = r.NLA_TYPE_MASK, r.RTM_F_CLONED, r.RTM_NEWROUTE, r.USER_HZ
    addresses = (DST, GATEWAY, PREFSRC)
    least = {TABLE: 4, OIF: 4, PRIORITY: 4, CACHEINFO: 32, PREF: 1}     # payload bytes (rta_cacheinfo: 32)
    oif_names: dict[int, str | None] = {}      # an interface's JSON, None if not plain
    header = _x._HDR_LT.unpack_from
    from_bytes = int.from_bytes
    layouts: dict[int, list[tuple[int, dict[int, tuple]]]] = {}     # length -> [(mask, {key: shape})]
    learned = 0
    for buf in chunks:
        out: list[str] = []
        off, end = 0, len(buf)
        while off < end:
            length, mtype = header(buf, off)
            start, stop = off + 16, off + length
            off += (length + 3) & ~3
            if mtype != newroute:
                continue
            for mask, shapes in layouts.get(length, ()):
                shape = shapes.get(from_bytes(buf[start - 16:stop], "little") & mask)
                if shape is not None:
                    unpack, af, fmt = shape
                    dst_len, dst = unpack(buf, start - 16)
                    out.append(fmt % (ntop(af, dst), dst_len))
                    break
            else:
                shape = None
            if shape is not None:
                continue
            if length < 16 + 12:
                raise _x.KernelError(f"cannot {what}: a {length}-byte route message is too short")
            af, dst_len, src_len, tos, rtm_table, proto, scope, rtype, flags = rtmsg(buf, start)
            family = family_names.get(af)
            if family is None or flags & cloned:
                continue
            size = addr_len[af]
            tbl = dst = gateway = oif = prefsrc = priority = pref = expires = None
            usual, cacheinfo, dst_at, cacheinfo_at = True, False, 0, 0
            p = start + 12
            try:
                while p + 4 <= stop:
                    alen, atype = nla(buf, p)
                    if alen < 4 or p + alen > stop:
                        usual = False
                        break
                    atype &= mask
                    s = p + 4
                    if atype in addresses and alen - 4 != size or alen - 4 < least.get(atype, 0):
                        # not an address of this family, or shorter than its type (its value would be read
                        # from the next attribute, outside a shape's mask): route_at says what it is
                        usual = False
                        break
                    if atype == DST:
                        if dst is None:
                            dst, dst_at = ntop(af, buf[s:s + size]), s
                    elif atype == TABLE:
                        if tbl is None:
                            (tbl,) = u32(buf, s)
                    elif atype == OIF:
                        if oif is None:
                            (oif,) = u32(buf, s)
                    elif atype == GATEWAY:
                        if gateway is None:
                            gateway = ntop(af, buf[s:s + size])
                    elif atype == PREFSRC:
                        if prefsrc is None:
                            prefsrc = ntop(af, buf[s:s + size])
                    elif atype == PRIORITY:
                        if priority is None:
                            (priority,) = u32(buf, s)
                    elif atype == CACHEINFO:
                        if not cacheinfo:
                            cacheinfo, cacheinfo_at = True, s
                            (left,) = i32(buf, s + 8)
                            expires = left // hz if left > 0 else None
                    elif atype == PREF:
                        if pref is None:
                            pref = buf[s]
                    else:
                        usual = False
                        break
                    p += (alen + 3) & ~3
            except (ValueError, IndexError, _struct.error):
                usual = False      # a malformed attribute: route_at decodes it, or says what is wrong
            if not usual:
                route = r.route_at(buf, start, stop, names, what)
                if route is not None and (table is None or route.table == table):
                    out.append(generic(route))
                continue
            if tbl is None:
                tbl = rtm_table
            if table is not None and tbl != table:
                continue
            name = "null"
            if oif:
                name = oif_names.get(oif, "")
                if name == "":
                    text = names.get(oif)
                    name = oif_names[oif] = "null" if text is None else f'"{text}"' if plain(text) else None
                if name is None:
                    out.append(generic(r.route_at(buf, start, stop, names, what)))
                    continue
            gateway = "null" if gateway is None else '"' + gateway + '"'
            prefsrc = "null" if prefsrc is None else '"' + prefsrc + '"'

            def line(dst, dst_len):
                return (f'{{"family":"{family}","table":{tbl},"dst":"{dst}",'
                        f'"dst_len":{dst_len},"type":{rtype},"protocol":{proto},"scope":{scope},"gateway":{gateway},'
                        f'"oif":{"null" if oif is None else oif},"oif_name":{name},"prefsrc":{prefsrc},"src":null,'
                        f'"src_len":{src_len},"tos":{tos},"priority":{priority or 0},"metrics":{{}},"multipath":[],'
                        f'"nhid":null,"pref":{"null" if pref is None else pref},"flags":{flags},'
                        f'"expires":{"null" if expires is None else expires}}}')

            text = line(dst or ("0.0.0.0" if af == 2 else "::"), dst_len)
            out.append(text)
            if dst_at and learned < _MAX_SHAPES:
                learned += 1
                _learn_route(layouts, buf, start - 16, length, af, dst_at, size, cacheinfo_at,
                             line(_DST, _DST_LEN), text)
        yield out


_DST, _DST_LEN = "\x00dst\x00", "\x00dst_len\x00"      # can be nothing else in a line (not plain)


def _learn_route(layouts: dict, buf: bytes, msg: int, length: int, af: int, dst_at: int, size: int,
                 cacheinfo_at: int, template: str, text: str) -> None:
    """Compile the shape of the route message at MSG (its walked line: TEXT; TEMPLATE: the same
    with the destination and its length left open): routes of one shape differ in nothing else.
    The fields that vary within a shape, masked out of the key: the header's sequence and port, the
    destination and its length, and an IPv6 route's cache counters (not its expiry)."""
    keep = bytearray(b"\xff" * length)
    dst, dst_len = dst_at - msg, 16 + 1
    varying = [(8, 8), (dst_len, 1), (dst, size)]
    if cacheinfo_at:
        ci = cacheinfo_at - msg
        varying += [(ci, 8), (ci + 12, 20)]     # all but rta_expires
    for at, n in varying:
        keep[at:at + n] = bytes(n)
    mask = int.from_bytes(keep, "little")
    fmt = template.replace("%", "%%").replace(_DST, "%s").replace(_DST_LEN, "%d")
    unpack = _struct.Struct(f"={dst_len}xB{dst - dst_len - 1}x{size}s").unpack_from
    shape = (unpack, af, fmt)
    dst_len_value, dst_raw = unpack(buf, msg)
    if fmt % (_x._ntop(af, dst_raw), dst_len_value) != text:
        return
    for known, shapes in layouts.setdefault(length, []):
        if known == mask:
            shapes[int.from_bytes(buf[msg:msg + length], "little") & mask] = shape
            return
    layouts[length].append((mask, {int.from_bytes(buf[msg:msg + length], "little") & mask: shape}))


class RouteDump:
    """Route dumps (one per address family) standing in for their routes, as PolicyDump does."""

    def __init__(self, dumps: list[tuple[str, list[bytes]]], names: dict[int, str], table: int | None,
                 generic: Generic):
        self.dumps, self.names, self.table, self.generic = dumps, names, table, generic
        self._count: int | None = None
        self._kept: list[list[str]] | None = None

    def batches(self) -> Iterator[list[str]]:
        if self._kept is not None:
            yield from self._kept
            return
        count = 0
        for what, chunks in self.dumps:
            for lines in _route_lines(chunks, self.names, self.table, what, self.generic):
                count += len(lines)
                yield lines
        self._count = count

    def __len__(self) -> int:
        # Only the lines say which routes are of the table: counting makes them, and keeps them
        # for the writer (formatting 10,000 routes twice cost a terminal's snapshot 20 ms)
        if self._count is None:
            self._kept = list(self.batches())
        return self._count


def route_lines_from_dump(dumps: list[tuple[str, list[bytes]]], names: dict[int, str], table: int | None,
                          generic: Generic) -> list[str]:
    """The version 2 line of each route (of TABLE unless None) in route dumps (``routes.dump_chunks``)."""
    return [line for lines in RouteDump(dumps, names, table, generic).batches() for line in lines]
