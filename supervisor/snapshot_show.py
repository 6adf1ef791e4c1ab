"""``snapshot show FILE --json`` of a version 2 file with msgspec, without its policy and route records.

The command prints the loaded snapshot as ``msgspec.json.format(msgspec.json.encode(doc), indent=1)``,
each record as its ``to_json()`` (version 1's full records): for 30,000 policies, building the
records and their dicts cost 9x the time of ``ip xfrm policy``. Here policies and routes are
decoded into the structs of snapshot_typed with their fields in ``to_json``'s order (the same
types, so the same documents are accepted; a policy's missing lifetime reads as the no-limits
default) and msgspec encodes them in C to their records' bytes; a route's three derived names are
put in after the encoding, once per distinct (type, protocol, scope). The compact JSON being the
same, so is its formatting, done in C a batch at a time. Whatever a struct spells otherwise than
its record (a named value given as its number, hex written otherwise, metrics out of order) goes
through the record. tests/test_snapshot_show_json.py holds both ways to the same bytes.
"""

from __future__ import annotations

from itertools import chain
from operator import attrgetter
from typing import Any, Callable, Iterator

import msgspec

from . import snapshot_typed as typed
from .kernel import routes as _routes
from .kernel import xfrm as _x


def _reordered(kind: type, name: str, keys: tuple[str, ...], types: dict[str, Any] | None = None,
               defaults: dict[str, Any] | None = None) -> type:
    """KIND with its fields in the order of KEYS (to_json's), each of its type and default but those
    in TYPES and DEFAULTS."""
    fields = {f.name: f for f in msgspec.structs.fields(kind)}
    if set(fields) != set(keys):
        raise RuntimeError(f"{kind.__name__}'s fields {sorted(fields)} are not to_json's keys {sorted(keys)}: "
                           "update snapshot_show")
    spec = []
    for key in keys:
        f = fields[key]
        kind_of = (types or {}).get(key, f.type)
        if defaults and key in defaults:
            spec.append((key, kind_of, defaults[key]))
        elif f.default is not msgspec.NODEFAULT:
            spec.append((key, kind_of, f.default))
        elif f.default_factory is not msgspec.NODEFAULT:
            spec.append((key, kind_of, msgspec.field(default_factory=f.default_factory)))
        else:
            spec.append((key, kind_of))
    # kw_only: a field with a default may come before required ones (decoding is by name anyway)
    return msgspec.defstruct(name, spec, frozen=True, gc=False, kw_only=True)


PolicyShow = _reordered(typed.Policy, "PolicyShow", (
    "selector", "dir", "action", "priority", "index", "flags", "share", "lifetime", "mark", "if_id", "ptype",
    "templates", "attrs", "curlft"), defaults={"lifetime": typed.NO_LIMITS_JSON})
NextHopShow = _reordered(typed.NextHop, "NextHopShow", ("gateway", "oif", "oif_name", "weight", "flags"))
# to_json's keys but type_name, protocol_name and scope_name, which follow type, protocol and scope
RouteShow = _reordered(typed.Route, "RouteShow", (
    "family", "table", "dst", "dst_len", "type", "protocol", "scope", "gateway", "oif", "oif_name", "prefsrc",
    "src", "src_len", "tos", "priority", "metrics", "multipath", "nhid", "pref", "flags", "expires"),
    types={"multipath": tuple[NextHopShow, ...]})      # type: ignore[valid-type]


class ObjectsShow(msgspec.Struct, forbid_unknown_fields=True):
    """snapshot_typed.Objects with the structs above for its policies and routes."""

    xfrm_sa: list = []
    xfrm_policy: list[PolicyShow] = []        # type: ignore[valid-type]
    route: list[RouteShow] = []               # type: ignore[valid-type]
    rule: list = []
    address: list = []
    firewall: list = []


class DocumentShow(typed.Head):
    objects: ObjectsShow = msgspec.UNSET


DOCUMENT = msgspec.json.Decoder(DocumentShow)


def same_schema() -> bool:
    """Whether DOCUMENT reads what snapshot_typed.DOCUMENT reads: the same fields of the same types
    with the same defaults (but a policy's lifetime), so that its errors are load_snapshot's."""
    shown = {PolicyShow: typed.Policy, RouteShow: typed.Route, NextHopShow: typed.NextHop,
             ObjectsShow: typed.Objects, DocumentShow: typed.Document}
    as_typed = {list[PolicyShow]: list[typed.Policy], list[RouteShow]: list[typed.Route],  # type: ignore
                tuple[NextHopShow, ...]: tuple[typed.NextHop, ...], **shown}                # type: ignore

    def described(kind: type) -> tuple:
        config = kind.__struct_config__
        return ((config.forbid_unknown_fields, config.array_like, config.tag, config.tag_field),
                {f.name: (as_typed.get(f.type, f.type), f.encode_name, f.required,
                          (f.default, f.default_factory) if f.name != "lifetime" else None)
                 for f in msgspec.structs.fields(kind)})

    return all(described(show) == described(kind) for show, kind in shown.items())


# --- what a struct spells otherwise than its record ------------------------------------------

_NAMED = attrgetter("dir", "action", "share", "ptype", "selector.family")
_NAMED_NAMES = (_x.DIR_NAMES, _x.ACTION_NAMES, _x.SHARE_NAMES, _x.PTYPE_NAMES, _x.FAMILY_NAMES)
_TEMPLATES = attrgetter("templates")
_TEMPLATE_NAMED = attrgetter("family", "proto", "mode", "share")
_TEMPLATE_NAMES = (_x.FAMILY_NAMES, _x.PROTO_NAMES, _x.MODE_NAMES, _x.SHARE_NAMES)
_ATTRS = attrgetter("attrs")
_METRICS = attrgetter("metrics")


def _numbered(values: set[tuple], names: tuple[dict, ...]) -> bool:
    """Whether a field of one of VALUES is a number that has a name (to_json writes the name)."""
    return any(v in n for value in values for v, n in zip(value, names))


def _policy_unlike_record(p: Any) -> bool:
    """Whether policy P's struct encodes otherwise than its record's to_json."""
    if _numbered({_NAMED(p)}, _NAMED_NAMES) or _numbered(set(map(_TEMPLATE_NAMED, p.templates)), _TEMPLATE_NAMES):
        return True
    return any(bytes.fromhex(a.data).hex() != a.data for a in p.attrs)


def policies(items: list, record: Callable[[Any], Any]) -> list:
    """What encodes as the records of policies ITEMS: each struct or, where it would not give its
    record's bytes, RECORD(struct)'s JSON encoded."""
    numbered = (_numbered(set(map(_NAMED, items)), _NAMED_NAMES)
                or _numbered(set(map(_TEMPLATE_NAMED, chain.from_iterable(map(_TEMPLATES, items)))),
                             _TEMPLATE_NAMES))
    if not numbered and not any(map(_ATTRS, items)):
        return items        # (the usual case: a file this program wrote, three C loops)
    encode = msgspec.json.encode
    return [msgspec.Raw(encode(record(p).to_json())) if _policy_unlike_record(p) else p for p in items]


def routes(items: list, record: Callable[[Any], Any]) -> list:
    """What encodes as the records of routes ITEMS but their derived names (_names_put_in): each struct
    or, for metrics not in the order the record sorts them in, RECORD(struct)'s JSON encoded."""
    if not any(map(_METRICS, items)):
        return items
    encode = msgspec.json.encode
    return [msgspec.Raw(encode(record(r).to_json())) if r.metrics and list(r.metrics) != sorted(r.metrics) else r
            for r in items]


_ROUTE_NAMED = attrgetter("type", "protocol", "scope")
_MANY_NAMES = 8         # more distinct (type, protocol, scope) in a batch: named one route at a time


def _name_token(names: dict[int, str], number: int) -> bytes:
    return msgspec.json.encode(_routes.name_of(names, number))


def _names_put_in(data: bytes, named: set[tuple[int, int, int]]) -> bytes:
    """DATA (routes encoded as RouteShow) with type_name, protocol_name and scope_name after type,
    protocol and scope, of routes whose (type, protocol, scope) are NAMED. What is replaced is found
    only there: a string has no bare quote, and no other object has these keys."""
    for t, p, s in named:
        data = data.replace(b'"type":%d,"protocol":%d,"scope":%d,"gateway":' % (t, p, s),
                            b'"type":%d,"type_name":%s,"protocol":%d,"protocol_name":%s,"scope":%d,"scope_name":%s,'
                            b'"gateway":' % (t, _name_token(_routes.ROUTE_TYPE_NAMES, t),
                                             p, _name_token(_routes.PROTOCOL_NAMES, p),
                                             s, _name_token(_routes.SCOPE_NAMES, s)))
    return data


# --- the document ---------------------------------------------------------------------------

SHOW = {"xfrm_policy": policies, "route": routes}
BATCH = 2000            # records formatted at a time: fresh memory for all costs more in page faults
_NEST, _UNNEST = b"[\n [\n  [\n", b"\n  ]\n ]\n]"      # around items formatted three deep, as in the document


def _record(name: str) -> Callable[[Any], Any]:
    """The record snapshot_typed builds of one checked struct of family NAME."""
    build = typed.RECORDS[name]

    def fail(i: int, exc: Exception) -> None:      # (checked already: a fault here is a bug)
        raise exc

    return lambda item: build([item], fail)[0]


def _formatted(values: list, name: str) -> Iterator[bytes | memoryview]:
    """The items of VALUES (of family NAME) as the document's formatting has them, three deep,
    separated by ",\\n", a batch at a time."""
    encode, format_json = msgspec.json.Encoder().encode, msgspec.json.format
    for start in range(0, len(values), BATCH):
        batch = values[start:start + BATCH]
        named = set(map(_ROUTE_NAMED, (r for r in batch if r.__class__ is RouteShow))) if name == "route" else ()
        if len(named) > _MANY_NAMES:
            batch = [msgspec.Raw(_names_put_in(encode(r), {_ROUTE_NAMED(r)})) if r.__class__ is RouteShow else r
                     for r in batch]
            named = ()
        data = encode([[batch]])
        if named:
            data = _names_put_in(data, named)
        text = format_json(data, indent=1)
        if start:
            yield b",\n"
        yield memoryview(text)[len(_NEST):len(text) - len(_UNNEST)]


def document(snap: Any, structs: dict[str, list]) -> Iterator[bytes | memoryview]:
    """The JSON of SNAP (from snapshot.load_for_json, whose STRUCTS stand for its policies and
    routes) formatted with an indent of 1, in pieces: the bytes the command prints but its newline."""
    from .kernel_state import FAMILIES
    head = msgspec.json.format(msgspec.json.encode(
        {"created": snap.created, "host": snap.host, "kernel": snap.kernel, "netns": snap.netns,
         "daemon": snap.daemon, "keys_included": snap.keys_included, "context": snap.context, "objects": 0}),
        indent=1)
    yield head[:-len(b"0\n}")] + b"{"
    for i, name in enumerate(FAMILIES):
        if name in structs:
            values = SHOW[name](structs[name], _record(name))
        else:
            values = [r.to_json(include_keys=snap.keys_included) for r in snap.objects.get(name, ())]
        yield b'%s\n  "%s": ' % (b"," if i else b"", name.encode())
        if not values:
            yield b"[]"
            continue
        yield b"[\n"
        yield from _formatted(values, name)
        yield b"\n  ]"
    yield b"\n }\n}"
