"""``snapshot show FILE --json`` of a version 2 file with msgspec: the document without its records.

The command prints the loaded snapshot as ``msgspec.json.format(msgspec.json.encode(doc), indent=1)``
where each record is its ``to_json()`` (version 1's full records). Building 30,000 policy
records and their dicts cost 9x the time of ``ip xfrm policy``. Here policies are decoded into
PolicyShow, the structs of snapshot_typed with their fields in ``to_json``'s order and the
no-limits lifetime as the default, which msgspec encodes in C to the very bytes of their
records; routes are one format string each. The compact document is the same, so its
formatting is too; whatever a struct does not spell as its record would (a named value given
as its number, hex written otherwise, metrics, nexthops, a string to escape) goes through the
record. tests/test_snapshot_show_json.py holds both ways to the same bytes.
"""

from __future__ import annotations

from itertools import chain
from operator import attrgetter
from typing import Any, Callable

import msgspec

from . import snapshot_typed as typed
from .kernel import routes as _routes
from .kernel import xfrm as _x

# to_json's keys, in its order: a struct encodes its fields in the order they are declared.
_POLICY_KEYS = ("selector", "dir", "action", "priority", "index", "flags", "share", "lifetime", "mark",
                "if_id", "ptype", "templates", "attrs", "curlft")


def _policy_show() -> type:
    """snapshot_typed.Policy with its fields in to_json's order (the same types: it accepts what
    Policy accepts), a missing lifetime read as the kernel's no-limits default."""
    fields = {f.name: f for f in msgspec.structs.fields(typed.Policy)}
    if set(fields) != set(_POLICY_KEYS):
        raise RuntimeError(f"snapshot_typed.Policy's fields {sorted(fields)} are not to_json's keys "
                           f"{sorted(_POLICY_KEYS)}: update snapshot_show")
    no_limits = typed.Lifetime(**_x.NO_LIMITS.to_json())
    spec = [(name, fields[name].type, no_limits) if name == "lifetime" else (name, fields[name].type)
            for name in _POLICY_KEYS]
    # kw_only: a field with a default (lifetime) is followed by required ones; decoding is by name.
    return msgspec.defstruct("PolicyShow", spec, frozen=True, gc=False, kw_only=True)


PolicyShow = _policy_show()


class ObjectsShow(msgspec.Struct, forbid_unknown_fields=True):
    """snapshot_typed.Objects with PolicyShow for its policies."""

    xfrm_sa: list = []
    xfrm_policy: list[PolicyShow] = []        # type: ignore[valid-type]
    route: list[typed.Route] = []
    rule: list = []
    address: list = []
    firewall: list = []


class DocumentShow(typed.Head):
    objects: ObjectsShow = msgspec.UNSET


DOCUMENT = msgspec.json.Decoder(DocumentShow)


def same_schema() -> bool:
    """Whether DOCUMENT reads exactly what snapshot_typed.DOCUMENT reads (the same fields, types
    and defaults but PolicyShow's lifetime): what makes its errors those of load_snapshot."""
    def described(kind: type, skip: str = "") -> dict:
        return {f.name: (f.type, f.required) for f in msgspec.structs.fields(kind) if f.name != skip}
    return (described(PolicyShow, "lifetime") == described(typed.Policy, "lifetime")
            and described(ObjectsShow, "xfrm_policy") == described(typed.Objects, "xfrm_policy")
            and described(DocumentShow, "objects") == described(typed.Document, "objects"))


# --- policies -------------------------------------------------------------------------------

_NAMED = attrgetter("dir", "action", "share", "ptype", "selector.family")
_NAMED_NAMES = (_x.DIR_NAMES, _x.ACTION_NAMES, _x.SHARE_NAMES, _x.PTYPE_NAMES, _x.FAMILY_NAMES)
_TEMPLATES = attrgetter("templates")
_TEMPLATE_NAMED = attrgetter("family", "proto", "mode", "share")
_TEMPLATE_NAMES = (_x.FAMILY_NAMES, _x.PROTO_NAMES, _x.MODE_NAMES, _x.SHARE_NAMES)
_ATTRS = attrgetter("attrs")


def _numbered(values: set[tuple], names: tuple[dict, ...]) -> bool:
    """Whether one of VALUES' fields is a number that has a name (to_json writes the name)."""
    return any(v in n for value in values for v, n in zip(value, names))


def _unlike_record(p: Any) -> bool:
    """Whether policy P's struct encodes otherwise than its record's to_json."""
    if _numbered({_NAMED(p)}, _NAMED_NAMES) or _numbered(set(map(_TEMPLATE_NAMED, p.templates)), _TEMPLATE_NAMES):
        return True
    return any(bytes.fromhex(a.data).hex() != a.data for a in p.attrs)


def policies(items: list, record: Callable[[Any], Any]) -> list:
    """What encodes as the records of policies ITEMS: each struct, or where it would not give the
    record's bytes, RECORD(struct)'s JSON encoded."""
    numbered = (_numbered(set(map(_NAMED, items)), _NAMED_NAMES)
                or _numbered(set(map(_TEMPLATE_NAMED, chain.from_iterable(map(_TEMPLATES, items)))),
                             _TEMPLATE_NAMES))
    if not numbered and not any(map(_ATTRS, items)):
        return items        # (the usual case: a file this program wrote, three C loops)
    encode = msgspec.json.encode
    return [msgspec.Raw(encode(record(p).to_json())) if _unlike_record(p) else p for p in items]


# --- routes ---------------------------------------------------------------------------------

_ROUTE = ('{"family":"%s","table":%d,"dst":%s,"dst_len":%d,"type":%d,"type_name":%s,"protocol":%d,'
          '"protocol_name":%s,"scope":%d,"scope_name":%s,"gateway":%s,"oif":%s,"oif_name":%s,"prefsrc":%s,'
          '"src":%s,"src_len":%d,"tos":%d,"priority":%d,"metrics":{},"multipath":[],"nhid":%s,"pref":%s,'
          '"flags":%d,"expires":%s}')


def _plain(text: str) -> bool:
    """Whether msgspec writes TEXT between quotes as it is."""
    return text.isascii() and text.isprintable() and '"' not in text and "\\" not in text


def routes(items: list, record: Callable[[Any], Any]) -> msgspec.Raw:
    """The JSON list of the records of routes ITEMS (RECORD(struct): the record, for a route with
    metrics or nexthops)."""
    encode = msgspec.json.encode
    quoted: dict[Any, str] = {None: "null"}

    def q(text: str | None) -> str:
        out = quoted.get(text)
        if out is None:
            out = quoted[text] = f'"{text}"' if _plain(text) else encode(text).decode()
        return out

    names: dict[tuple[dict, int], str] = {}

    def name(table: dict, number: int) -> str:
        out = names.get((id(table), number))
        if out is None:
            out = names[(id(table), number)] = q(_routes.name_of(table, number))
        return out

    types, protocols, scopes = _routes.ROUTE_TYPE_NAMES, _routes.PROTOCOL_NAMES, _routes.SCOPE_NAMES
    lines = []
    append = lines.append
    for r in items:
        if r.metrics or r.multipath:
            append(encode(record(r).to_json()).decode())
            continue
        oif, nhid, pref, expires = r.oif, r.nhid, r.pref, r.expires
        append(_ROUTE % (r.family, r.table, q(r.dst), r.dst_len, r.type, name(types, r.type), r.protocol,
                         name(protocols, r.protocol), r.scope, name(scopes, r.scope), q(r.gateway),
                         "null" if oif is None else oif, q(r.oif_name), q(r.prefsrc), q(r.src), r.src_len, r.tos,
                         r.priority, "null" if nhid is None else nhid, "null" if pref is None else pref, r.flags,
                         "null" if expires is None else expires))
    return msgspec.Raw(("[" + ",".join(lines) + "]").encode())


SHOW = {"xfrm_policy": policies, "route": routes}


def _record(name: str) -> Callable[[Any], Any]:
    """The record snapshot_typed builds of one checked struct of family NAME."""
    build = typed.RECORDS[name]

    def fail(i: int, exc: Exception) -> None:      # (checked already: a fault here is a bug)
        raise exc

    return lambda item: build([item], fail)[0]


def document(snap: Any, structs: dict[str, list]) -> bytes:
    """The JSON of SNAP (from snapshot.load_for_json, whose STRUCTS stand for its policies and
    routes), formatted with an indent of 1: the bytes the command prints (without its newline)."""
    from .kernel_state import FAMILIES
    objects: dict[str, Any] = {}
    for name in FAMILIES:
        if name in structs:
            objects[name] = SHOW[name](structs[name], _record(name))
        else:
            objects[name] = [r.to_json(include_keys=snap.keys_included) for r in snap.objects.get(name, ())]
    doc = {"created": snap.created, "host": snap.host, "kernel": snap.kernel, "netns": snap.netns,
           "daemon": snap.daemon, "keys_included": snap.keys_included, "context": snap.context,
           "objects": objects}
    return msgspec.json.format(msgspec.json.encode(doc), indent=1)
