"""Snapshot documents: build, write (atomic, 0600, keys redacted by default), load and validate, diff.

The document is versioned JSON.  Records are written one per line so that a
snapshot of tens of thousands of objects stays greppable and cheap to produce.
Policies and routes are written by snapshot_lines (straight from the records, or from the
dump's datagrams), other records by msgspec when many and installed, else by the json module:
the same bytes every way. Reading uses msgspec's typed decoding when installed
(snapshot_typed), else the json module; the json module words the errors of a bad JSON file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import sys
import time
from dataclasses import dataclass, field
from itertools import compress, count
from operator import ne
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

if TYPE_CHECKING:
    from mmap import mmap

    from .filemap import MappedFiles
    Buffer = bytes | mmap       # a file's bytes: read, or mapped by MappedFiles

_UNLOADED = object()


def _codec() -> Any:
    """msgspec, imported on first use (taking a snapshot does not need it); None when not installed
    (Debian 12 packages no msgspec: a .deb without it writes the same files and reads them slower).
    Tests set the module attribute ``msgspec`` to None to stand for a system without it."""
    codec = globals().get("msgspec", _UNLOADED)
    if codec is _UNLOADED:
        try:
            import msgspec as codec
        except ImportError:
            codec = None
        globals()["msgspec"] = codec
    return codec


def __getattr__(name: str) -> Any:
    if name == "msgspec":
        return _codec()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

from .atomicfile import write_atomic
from .errors import SnapshotError, SupervisorError
from .kernel.common import without_cycle_collection
from .kernel.xfrm import NO_LIMITS
from .kernel_state import FAMILIES, KernelState, ReadOptions, read_state
from .trusted_paths import TrustedDir

SCHEMA = "ipsec-supervisor/snapshot"
VERSION = 2
READABLE_VERSIONS = (1, 2)
_TOP_KEYS = ("schema", "version", "created", "host", "kernel", "netns", "daemon",
             "keys_included", "context", "objects")


@dataclass(frozen=True)
class Snapshot:
    """A loaded or freshly taken snapshot; ``objects`` maps family name to records."""

    created: float
    host: str
    kernel: str
    netns: dict
    daemon: dict | None
    keys_included: bool
    context: dict
    objects: dict[str, tuple] = field(default_factory=dict)
    # families read as lines to be (snapshot_lines.PolicyDump), written instead of objects[name]
    encoded: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def counts(self) -> dict[str, int]:
        return {name: len(self.encoded[name] if name in self.encoded else self.objects.get(name, ()))
                for name in FAMILIES}


def take_snapshot(state: KernelState, daemon: dict | None = None,
                  include_keys: bool = False, encoded: dict[str, Any] | None = None) -> Snapshot:
    """Wrap a kernel read with its context. ``daemon``: {"pid":..., "exit":{...}} when known;
    ENCODED: families read as lines already (``read_encoded``)."""
    context: dict[str, Any] = {
        "route_table": state.options.route_table,
        "rule_priority": state.options.rule_priority,
        **state.context,
    }
    if state.default_policies is not None:
        context["xfrm_default_policy"] = state.default_policies.to_json()
    return Snapshot(created=time.time(), host=socket.gethostname(), kernel=os.uname().release,
                    netns=state.netns.to_json(), daemon=daemon, keys_included=include_keys,
                    context=context, objects=dict(state.objects), encoded=dict(encoded or {}))


def read_encoded(options: ReadOptions, progress=None, include_keys: bool = False
                 ) -> tuple[KernelState, dict[str, Any]]:
    """read_state for a snapshot file and nothing else: policies and routes stay the dumps'
    datagrams, formatted straight into their lines while the file is written (the bulk of a
    concentrator's state, and no record of them is needed). Returns (state, encoded) for
    take_snapshot."""
    from .kernel import routes, xfrm
    from .snapshot_lines import PolicyDump, RouteDump
    state = read_state(options, [name for name in FAMILIES if name not in ("xfrm_policy", "route")], progress)
    with xfrm.open_socket() as sock:
        chunks = sock.dump_raw(xfrm.XFRM_MSG_GETPOLICY, b"", xfrm._DUMP_POLICIES)
        defaults = xfrm.get_default_policies(sock)
    policies = PolicyDump(chunks, _generic("xfrm_policy", include_keys, many=False))
    if progress is not None:
        progress(FAMILIES["xfrm_policy"], len(policies))
    with routes._socket(None) as sock:      # (strict checking: the kernel filters by table)
        names = routes.interface_names(sock)
        dumps = [routes.dump_chunks(sock, af, options.route_table) for af in (socket.AF_INET, socket.AF_INET6)]
    routes_read = RouteDump(dumps, names, options.route_table, _generic("route", include_keys, many=False))
    if progress is not None:
        progress(FAMILIES["route"], len(routes_read))
    return (dataclasses.replace(state, default_policies=defaults),
            {"xfrm_policy": policies, "route": routes_read})


# Version 2 leaves out what version 1 wrote twice or spelled out for every record; loading
# puts it back before each record's from_json validates it, so the records are the same.
# - names derived from a number next to them (from_json reads the number):
DERIVED = {"route": ("type_name", "protocol_name", "scope_name"),
           "rule": ("action_name", "protocol_name"),
           "address": ("scope_name", "proto_name")}
# - a policy's lifetime when it is the kernel's default (no limits: a third of each line):
NO_LIMITS_JSON = NO_LIMITS.to_json()


def record_json(name: str, record: Any, include_keys: bool) -> dict:
    """One record as version 2 writes it."""
    doc = record.to_json(include_keys=include_keys)
    for key in DERIVED.get(name, ()):
        doc.pop(key, None)
    if name == "xfrm_policy" and doc["lifetime"] == NO_LIMITS_JSON:
        del doc["lifetime"]
    return doc


def _restore(name: str, item: Any) -> Any:
    """What version 2 left out of a record, put back (names are not needed: from_json derives them)."""
    if name == "xfrm_policy" and isinstance(item, dict) and "lifetime" not in item:
        item["lifetime"] = NO_LIMITS_JSON
    return item


def _generic(name: str, include_keys: bool, many: bool = True) -> Callable[[Any], str]:
    """One record's line the generic way: its JSON object, encoded (by msgspec when MANY records
    make its import pay: same bytes)."""
    msgspec = _codec() if many else None
    if msgspec is not None:
        encode_bytes = msgspec.json.Encoder().encode
        return lambda record: encode_bytes(record_json(name, record, include_keys)).decode()
    encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
    return lambda record: encode(record_json(name, record, include_keys))


def _family_lines(name: str, records: tuple, include_keys: bool) -> Iterator[str]:
    from .snapshot_lines import LINES
    generic = _generic(name, include_keys, many=len(records) > 1000 and name not in LINES)
    for start in range(0, len(records), BATCH):
        batch = records[start:start + BATCH]
        with without_cycle_collection():
            lines = LINES[name](batch, generic) if name in LINES else [generic(r) for r in batch]
        yield ",\n   ".join(lines)


# Lines are made and written a batch at a time: a fresh allocation of tens of megabytes (one
# string for a family) costs more in page faults than making its lines (bench_snapshot.py).
BATCH = 2000


def _document_chunks(snap: Snapshot) -> Iterator[str]:
    head = {
        "schema": SCHEMA, "version": VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(snap.created)),
        "created_unix": snap.created, "host": snap.host, "kernel": snap.kernel,
        "netns": snap.netns, "daemon": snap.daemon, "keys_included": snap.keys_included,
        "context": snap.context,
    }
    yield json.dumps(head, indent=1)[:-2] + ',\n "objects": {'
    first_family = True
    for name in FAMILIES:
        yield ("" if first_family else ",") + f"\n  {json.dumps(name)}: ["
        first_family = False
        if name in snap.encoded:
            pieces = (",\n   ".join(lines) for lines in snap.encoded[name].batches() if lines)
        else:
            pieces = _family_lines(name, snap.objects.get(name, ()), snap.keys_included)
        wrote = False
        for piece in pieces:
            yield ",\n   " + piece if wrote else "\n   " + piece
            wrote = True
        yield "\n  ]" if wrote else "]"
    yield "\n }\n}\n"


def write_snapshot_in(d: TrustedDir, name: str, snap: Snapshot, *, pace: Callable[[], None] | None = None) -> str:
    """Write NAME atomically in the checked directory D (relative to its fd), mode 0600; PACE is
    called between chunks (the recovery's writer thread waits there while a crash is handled)."""
    chunks = _document_chunks(snap)
    if pace is not None:
        chunks = (c for c in chunks if pace() or True)
    try:
        return d.write_atomic(name, chunks, mode=0o600, prefix=".snapshot-")
    except OSError as exc:
        raise SupervisorError(f"cannot write snapshot {d.join(name)}: {exc.strerror or exc} (in {d.path}; "
                              "nothing was written)") from None


def write_snapshot(path: str, snap: Snapshot) -> str:
    """Write atomically (temp file in the same directory, fsync, rename), mode 0600."""
    try:
        return write_atomic(path, _document_chunks(snap), mode=0o600, prefix=".snapshot-")
    except OSError as exc:
        where = os.path.dirname(os.path.abspath(path))
        raise SupervisorError(f"cannot write snapshot {path}: {exc.strerror or exc} (in {where}; "
                              "nothing was written)") from None


def _bad(path: str, problem: str) -> SnapshotError:
    return SnapshotError(f"snapshot {path} is not usable: {problem}")


def load_snapshot(path: str) -> Snapshot:
    """Read and validate a snapshot; every problem raises SnapshotError naming file and cause."""
    return load_snapshots(path)[0]


def describe_snapshot(path: str, keep: list | None = None, files: MappedFiles | None = None
                      ) -> tuple[Snapshot, dict[str, list[str]]]:
    """The snapshot at PATH checked as load_snapshot checks it (the same errors), without its
    records, and what each record's describe() says, per family. With msgspec, policies and
    routes are described from the decoded file: tens of thousands of records are never built.
    KEEP, when given, gets what was decoded (see keep_until_exit). FILES: where to read the file
    mapped (filemap), for as long as FILES' scope lasts."""
    raw = _read(path, files)
    with without_cycle_collection():
        found = _typed_document(raw, path) if _codec() is not None else None
        if keep is not None:
            keep.append(found)
        if found is None:
            snap = snapshot_from_document(_parse_slowly(raw, path), path)
            return (dataclasses.replace(snap, objects={}),
                    {name: [r.describe() for r in records] for name, records in snap.objects.items()})
        from .snapshot_typed import TEXTS
        doc, objects = found
        texts = {}
        for name in FAMILIES:           # in load_snapshot's order, which says which error comes first
            items = objects.get(name, [])
            if name in TEXTS:
                texts[name] = TEXTS[name](items, _failing(path, name))
            else:
                texts[name] = [r.describe() for r in _build(name, items, list(range(len(items))),
                                                            doc["version"], path)]
        return _snapshot_of(doc, {}, path), texts


def load_for_json(path: str, keep: list | None = None, raws: list | None = None, files: MappedFiles | None = None
                  ) -> tuple[Snapshot, dict[str, list]] | None:
    """The snapshot at PATH checked as load_snapshot checks it (the same errors), its policies and
    routes left as the structs msgspec decoded (snapshot_show): (the snapshot without them, {family:
    structs}). None without msgspec or for what it does not read as version 2 (a fault, version 1):
    load_snapshot then does (given RAWS, the bytes read, for load_snapshots). KEEP, FILES: as for
    describe_snapshot."""
    msgspec = _codec()
    if msgspec is None:
        return None
    from . import snapshot_show
    from .snapshot_typed import CHECKS
    raw = _read(path, files)
    if raws is not None:
        raws.append(raw)
    with without_cycle_collection():
        try:
            whole = snapshot_show.DOCUMENT.decode(raw)
        except (msgspec.DecodeError, RecursionError):
            return None             # _typed_document's second look says what is wrong, and where
        if keep is not None:
            keep.append(whole)
        doc = _head_of(whole)
        _check_head(doc, path)
        if doc["version"] < 2:
            return None
        loaded, structs = {}, {}
        for name in FAMILIES:           # in load_snapshot's order, which says which error comes first
            items = getattr(whole.objects, name)
            if name in CHECKS:
                CHECKS[name](items, _failing(path, name))
                structs[name] = items
            else:
                loaded[name] = _build(name, items, list(range(len(items))), doc["version"], path)
        return _snapshot_of(doc, loaded, path), structs


def _failing(path: str, name: str) -> Callable[[int, Exception], None]:
    """FAIL(index, exception) for the typed checks: SnapshotError naming the record of family NAME."""
    def fail(i: int, exc: Exception) -> None:
        raise _bad(path, f"objects.{name}[{i}] is invalid: {type(exc).__name__}: {exc}") from None
    return fail


def load_snapshots(*paths: str, raws: Sequence[bytes] = ()) -> list[Snapshot]:
    """Several snapshots, each read and validated as load_snapshot does. With msgspec, a record
    equal to the one at the same place in the first file is that same object, built once
    (diff_snapshots then passes over it without a look). RAWS: the first files' bytes, read
    already by a way that gave up (a pipe gives its bytes once)."""
    out: list[Snapshot] = []
    first: tuple[Snapshot, dict] | None = None
    for k, path in enumerate(paths):
        raw = raws[k] if k < len(raws) else _read(path)
        with without_cycle_collection():
            snap, typed = _load_typed(raw, path, first) if _codec() is not None else (None, None)
            if snap is None:
                snap = snapshot_from_document(_parse_slowly(raw, path), path)
        if not out and typed is not None:
            first = (snap, typed)
        out.append(snap)
    return out


def _load_typed(raw: bytes, path: str, like: tuple[Snapshot, dict] | None = None
                ) -> tuple[Snapshot | None, dict | None]:
    """A version 2 document read by msgspec with the record schemas of snapshot_typed, and its
    typed records; (None, None) for what the json-module path words better (bad JSON, not an
    object) or reads (version 1). LIKE: an earlier (snapshot, typed records) to share records with."""
    found = _typed_document(raw, path)
    if found is None:
        return None, None
    doc, objects = found
    return _snapshot_of(doc, _typed_records(objects, doc["version"], path, like), path), objects


def _typed_document(raw: bytes, path: str) -> tuple[dict, dict[str, list]] | None:
    """(the document's other keys, its typed records per family) of a version 2 document whose
    records have the right types; None for the json-module path (see _load_typed)."""
    from . import snapshot_typed as typed
    msgspec = _codec()
    try:
        whole = typed.DOCUMENT.decode(raw)      # one pass when the file is valid
    except (msgspec.DecodeError, RecursionError):
        whole = None
    if whole is not None:
        doc = _head_of(whole)
        _check_head(doc, path)
        if doc["version"] < 2:
            return None
        return doc, {name: getattr(whole.objects, name) for name in FAMILIES}
    # Something is wrong: a second look, one family at a time, says what and where.
    try:
        head = typed.HEAD.decode(raw)
    except (msgspec.DecodeError, RecursionError):
        return None
    doc = _head_of(head)
    _check_head(doc, path)
    if doc["version"] < 2:
        return None
    # (the head's look left the records' bytes unread: what is not JSON there, such as bytes that
    # are not UTF-8, is for the json-module path to word, as it does for the whole file)
    try:
        raws = typed.OBJECTS.decode(head.objects)
    except msgspec.ValidationError:
        raise _bad(path, "'objects' is not a JSON object") from None
    except (msgspec.DecodeError, RecursionError):
        return None
    _check_families(raws, path)
    objects = {}
    for name, items in raws.items():
        try:
            objects[name] = typed.TYPED.get(name, typed.GENERIC).decode(items)
        except msgspec.ValidationError as exc:
            index, problem = typed.where(exc)
            if index is None:
                raise _bad(path, f"objects.{name} is not a list") from None
            raise _bad(path, f"objects.{name}[{index}] is invalid: ValidationError: {problem}") from None
        except (msgspec.DecodeError, RecursionError):
            return None
    return doc, objects


def _head_of(head: Any) -> dict:
    unset = _codec().UNSET
    return {key: value for key in head.__struct_fields__ if (value := getattr(head, key)) is not unset}


def _typed_records(objects: dict[str, list], version: int, path: str,
                   like: tuple[Snapshot, dict] | None = None) -> dict[str, tuple]:
    loaded: dict[str, tuple] = {}
    for name in FAMILIES:
        items = objects.get(name, [])
        # Only what differs from LIKE's typed record at the same place is checked and built:
        # an equal one is valid and makes the same record.
        base_items, base = (like[1].get(name, []), like[0].objects.get(name, ())) if like else ([], ())
        shared = min(len(items), len(base_items))
        todo = [i for i in range(shared) if items[i] != base_items[i]] + list(range(shared, len(items)))
        built = _build(name, items, todo, version, path)
        if len(todo) == len(items):
            loaded[name] = built
        else:
            records = list(base[:len(items)])
            for i, record in zip(todo, built):
                if i < len(records):
                    records[i] = record
                else:
                    records.append(record)
            loaded[name] = tuple(records)
    return loaded


def _build(name: str, items: list, indices: list[int], version: int, path: str) -> tuple:
    """The records of the typed ITEMS at INDICES, each checked; errors name the item's index."""
    from .snapshot_typed import RECORDS

    def fail(j: int, exc: Exception) -> None:
        raise _bad(path, f"objects.{name}[{indices[j]}] is invalid: {type(exc).__name__}: {exc}") from None

    subset = items if len(indices) == len(items) else [items[i] for i in indices]
    if name in RECORDS:
        return RECORDS[name](subset, fail)
    return _records(name, subset, version, path, indices)


def diff_snapshot_files(path_a: str, path_b: str, keep: list | None = None, files: MappedFiles | None = None
                        ) -> dict[str, FamilyDiff]:
    """diff_snapshots of two snapshot files. With msgspec, both files are checked whole but only
    the records that differ between them are built: one equal to the record at the same place in
    the other file is unchanged (identities are unique within a snapshot). KEEP, FILES: as for
    describe_snapshot."""
    if _codec() is None:
        return diff_snapshots(*load_snapshots(path_a, path_b))
    raws: list = []
    result = _diff_by_text(path_a, path_b, [] if keep is None else keep, raws, files)
    return _diff_typed(path_a, path_b, raws) if result is None else result


def keep_until_exit(keep: list) -> None:
    """Let what KEEP holds live until the process exits, never freed: a program that exits right
    after a show or diff of 30,000 policies saves the 11 ms of freeing 300,000 objects one by one.
    (A cycle the collector never looks at: frozen, see gc.freeze. Not for a long-lived process.)"""
    import gc
    keep.append(keep)
    gc.freeze()


def _diff_by_text(path_a: str, path_b: str, keep: list, raws: list, files: MappedFiles | None
                  ) -> dict[str, FamilyDiff] | None:
    """diff_snapshot_files comparing the JSON text of each policy and route: B's are decoded only
    where they differ from A's at the same place (the same text is the same valid record). None
    when either file has a fault (or is version 1): _diff_typed then says which, in its order (from
    RAWS, the files' bytes read here)."""
    from . import snapshot_typed as typed
    msgspec = _codec()
    with without_cycle_collection():
        raw_a = _read(path_a, files)
        raws.append(raw_a)
        found = _typed_document(raw_a, path_a)
        if found is None:
            return None
        keep.append(found)
        doc_a, objects_a = found
        _snapshot_of(doc_a, {}, path_a)         # as _diff_typed, whose first errors these are
        # A's records checked while they are fresh in the CPU's caches (after reading B and splitting
        # both into texts they are not: 8 ms more); a fault anywhere sends it all to _diff_typed,
        # which says the first in its order
        try:
            for name, check in typed.CHECKS.items():
                check(objects_a.get(name, []), _failing(path_a, name))
        except SnapshotError:
            return None
        raw_b = _read(path_b, files)
        raws.append(raw_b)
        try:
            head_b, text_a, text_b = _head_with_same_records(raw_a, raw_b), None, None
            if head_b is None:
                head_b = text_b = typed.TEXT_DOCUMENT.decode(raw_b)
                text_a = typed.TEXT_DOCUMENT.decode(raw_a)
                keep += (text_a, text_b)
            doc_b = _head_of(head_b)
            _check_head(doc_b, path_b)
            _snapshot_of(doc_b, {}, path_b)
            if doc_b["version"] < 2:
                return None
            result = {}
            for name in FAMILIES:
                a = objects_a.get(name, [])
                if text_b is None:              # the same bytes: the same records
                    ta = tb = a
                else:
                    ta = getattr(text_a.objects, name) if name in typed.ITEM else a
                    tb = getattr(text_b.objects, name)
                shared = min(len(ta), len(tb))
                differ = [] if ta is tb else list(compress(count(), map(ne, ta, tb)))
                only_a, only_b = differ + list(range(shared, len(ta))), differ + list(range(shared, len(tb)))
                if name in typed.CHECKS:
                    b = [None] * len(tb)
                    for i in only_b:
                        b[i] = typed.ITEM[name].decode(tb[i])
                    # Another text of the same value (key order, escapes, a key the format does not
                    # have) is unchanged, as for the typed diff: never matched by identity.
                    same = {i for i in differ if b[i] == a[i]}
                    if same:
                        only_a = [i for i in only_a if i not in same]
                        only_b = [i for i in only_b if i not in same]
                    old = _build(name, a, only_a, doc_a["version"], path_a)
                else:                           # few records: from_json checks them all
                    every = _build(name, a, list(range(len(a))), doc_a["version"], path_a)
                    old = tuple(every[i] for i in only_a)
                    b = tb
                result[name] = _diff_records(old, _build(name, b, only_b, doc_b["version"], path_b))
        except (msgspec.DecodeError, RecursionError, SnapshotError):   # (ValidationError is a DecodeError)
            return None
    return result


_OBJECTS_KEY = b',\n "objects": {'        # where the writer starts the records, its last key


def _head_with_same_records(raw_a: bytes, raw_b: bytes) -> Any:
    """B's document without its records (the typed Head) when B has the same bytes as A from the
    "objects" key on: two snapshots of an unchanged state. None when not, or unsure. Both heads
    must read as a complete object when "objects" is put in their place, so the same bytes follow
    both in the same place of the same grammar: A's records, which were decoded and are checked."""
    from .filemap import same_bytes
    from .snapshot_typed import HEAD
    i, j = raw_a.find(_OBJECTS_KEY), raw_b.find(_OBJECTS_KEY)
    if i < 0 or j < 0 or not same_bytes(raw_a, i, raw_b, j):
        return None
    heads = [HEAD.decode(raw[:at] + b',"objects":0}') for raw, at in ((raw_a, i), (raw_b, j))]
    return heads[1]


def _diff_typed(path_a: str, path_b: str, raws: Sequence[bytes] = ()) -> dict[str, FamilyDiff]:
    """diff_snapshot_files by the typed records of both files, each checked whole (RAWS: the first
    files' bytes, read already)."""
    from .snapshot_typed import CHECKS
    found = []
    got = list(raws)
    with without_cycle_collection():
        for k, path in enumerate((path_a, path_b)):
            if k == len(got):
                got.append(_read(path))
            typed = _typed_document(got[k], path)
            if typed is None:           # version 1, or not JSON: the whole way says what
                return diff_snapshots(*load_snapshots(path_a, path_b, raws=got))
            _snapshot_of(typed[0], {}, path)       # the document's own keys
            found.append(typed)
        (doc_a, objects_a), (doc_b, objects_b) = found
        result = {}
        for name in FAMILIES:
            a, b = objects_a.get(name, []), objects_b.get(name, [])
            shared = min(len(a), len(b))
            same = {i for i in range(shared) if a[i] == b[i]}
            only_a = [i for i in range(len(a)) if i not in same]
            only_b = [i for i in range(len(b)) if i not in same]
            if name in CHECKS:
                def fail(i: int, exc: Exception, name: str = name) -> None:
                    raise _bad(path_a, f"objects.{name}[{i}] is invalid: {type(exc).__name__}: {exc}") from None
                CHECKS[name](a, fail)
                old = _build(name, a, only_a, doc_a["version"], path_a)
            else:                       # few records: from_json checks them all
                every = _build(name, a, list(range(len(a))), doc_a["version"], path_a)
                old = tuple(every[i] for i in only_a)
            # B's records equal to A's are as valid as those
            result[name] = _diff_records(old, _build(name, b, only_b, doc_b["version"], path_b))
    return result


def _read(path: str, files: MappedFiles | None = None) -> Buffer:
    """PATH's bytes (mapped, by FILES, when given and large), or SnapshotError."""
    try:
        if files is not None:
            raw = files.read(path)
        else:
            with open(path, "rb") as f:
                raw = f.read()
    except OSError as exc:
        raise SnapshotError(f"cannot read snapshot {path}: {exc.strerror}") from None
    # (strip() would copy tens of megabytes, and a mapped file has neither: a file this program
    # wrote begins with "{")
    if not raw or (raw[:1].isspace() and bytes(raw).isspace()):
        raise _bad(path, "the file is empty")
    return raw


def _parse_slowly(raw: Buffer, path: str) -> Any:
    """The document by the json module, which names line and column of a problem."""
    try:
        text = str(raw, "utf-8")
    except UnicodeDecodeError as exc:
        raise _bad(path, f"not UTF-8 text (byte {exc.start})") from None
    try:
        doc = json.loads(text, parse_constant=_not_json, parse_float=_finite)
    except json.JSONDecodeError as exc:
        hint = " (truncated?)" if exc.pos >= len(text.rstrip()) - 1 else ""
        raise _bad(path, f"invalid JSON at line {exc.lineno} column {exc.colno}: "
                         f"{exc.msg}{hint}") from None
    except RecursionError:
        raise _bad(path, "JSON nested too deeply (no snapshot nests more than a few levels)") from None
    except ValueError:      # a number JSON has not, or an integer of more digits than Python reads
        raise _bad(path, _odd_number(text)) from None
    if _SURROGATE_ESCAPE.search(text):
        _refuse_lone_surrogates(doc, path)
    return doc


# What msgspec refuses, the json module's path refuses too, so that both read the same files: numbers
# JSON has not (NaN, Infinity, beyond a double's range: the json module's extensions), integers of
# more digits than Python reads (sys.get_int_max_str_digits), and a lone UTF-16 surrogate (\ud800, half
# a pair: no character, nothing UTF-8 can hold). The error names the key or the record, as the
# checks after the parse do.

def _not_json(name: str) -> float:
    raise ValueError(name)


def _finite(text: str) -> float:
    value = float(text)
    if value in (_INFINITY, -_INFINITY):
        raise ValueError(text)
    return value


_INFINITY = float("inf")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")     # the only way a surrogate gets into UTF-8 text


class _Refused:
    """A number the strict parse refused, left in its place to say where it was."""

    def __init__(self, text: str, too_long: bool = False) -> None:
        self.text = text
        self.too_long = too_long


def _marked_int(text: str) -> int | _Refused:
    try:
        return int(text)
    except ValueError:
        return _Refused(text, too_long=True)


def _odd_number(text: str) -> str:
    """Where the number is that the strict parse refused in TEXT, and what it is."""
    doc = json.loads(text, parse_constant=_Refused, parse_int=_marked_int,
                     parse_float=lambda t: _Refused(t) if float(t) in (_INFINITY, -_INFINITY) else float(t))
    where, odd = _first(doc, lambda v: isinstance(v, _Refused))
    if odd is None:
        return "a number is out of range"       # (not reached: the strict parse refused one)
    if odd.too_long:
        return _said(where, f"is a number of {len(odd.text.lstrip('-'))} digits (at most "
                            f"{sys.get_int_max_str_digits()} are read)")
    return _said(where, f"is {odd.text}, not a JSON number (none is NaN, Infinity or beyond ±1.8e308)")


def _refuse_lone_surrogates(doc: Any, path: str) -> None:
    def lone(value: Any) -> bool:
        return isinstance(value, str) and not value.isascii() and not _utf8(value)

    where, found = _first(doc, lone)
    if found is not None:
        char = next(c for c in found if 0xD800 <= ord(c) <= 0xDFFF)
        raise _bad(path, _said(where, f"holds \\u{ord(char):04x}, half of a UTF-16 surrogate pair: no character "
                                      "(a snapshot's text is UTF-8)"))


def _utf8(text: str) -> bool:
    try:
        text.encode()
        return True
    except UnicodeEncodeError:
        return False


def _first(doc: Any, wanted: Callable[[Any], bool]) -> tuple[list, Any]:
    """(the place of the first value or key in DOC that is WANTED, that value), or ([], None); in the
    file's order, but that an object's keys come before its values."""
    todo: list[tuple[list, Any]] = [([], doc)]
    while todo:
        where, value = todo.pop()
        if wanted(value):
            return where, value
        if isinstance(value, dict):
            for key in value:
                if wanted(key):
                    return where + [key], key
            todo += reversed([(where + [k], v) for k, v in value.items()])
        elif isinstance(value, list):
            todo += reversed([(where + [i], v) for i, v in enumerate(value)])
    return [], None


def _said(where: list, what: str) -> str:
    """WHAT said of the value at WHERE: of a record as its checks say it ("objects.route[2] is
    invalid: ..."), else of the key ("'created_unix' ...")."""
    names = [w if isinstance(w, int) or (w.isascii() and w.isprintable()) else json.dumps(w)[1:-1] for w in where]
    if len(names) >= 3 and names[0] == "objects" and isinstance(names[2], int):
        inner = _dotted(names[3:])
        return f"objects.{names[1]}[{names[2]}] is invalid: {inner or 'the record'} {what}"
    return f"'{_dotted(names)}' {what}" if names else f"the document {what}"


def _dotted(names: list) -> str:
    return "".join(f"[{n}]" if isinstance(n, int) else f".{n}" if i else n for i, n in enumerate(names))


def snapshot_from_document(doc: Any, path: str = "<document>") -> Snapshot:
    if not isinstance(doc, dict):
        raise _bad(path, f"top level is a JSON {type(doc).__name__}, not an object")
    _check_head(doc, path)
    objects = doc["objects"]
    if not isinstance(objects, dict):
        raise _bad(path, "'objects' is not a JSON object")
    _check_families(objects, path)
    loaded: dict[str, tuple] = {}
    for name in FAMILIES:
        items = objects.get(name, [])
        if not isinstance(items, list):
            raise _bad(path, f"objects.{name} is not a list")
        loaded[name] = _records(name, items, doc["version"], path)
    return _snapshot_of(doc, loaded, path)


def _check_head(doc: dict, path: str) -> None:
    if doc.get("schema") != SCHEMA:
        raise _bad(path, f"schema is {doc.get('schema')!r}, expected {SCHEMA!r}")
    version = doc.get("version")
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        raise _bad(path, f"version {version!r} is not supported "
                         f"(this ipsec-supervisor reads versions {', '.join(map(str, READABLE_VERSIONS))})")
    missing = [k for k in _TOP_KEYS if k not in doc]
    if missing:
        raise _bad(path, f"missing key(s): {', '.join(missing)}")


def _check_families(objects: dict, path: str) -> None:
    unknown = sorted(set(objects) - set(FAMILIES))
    if unknown:
        raise _bad(path, f"unknown object family {unknown[0]!r} "
                         f"(known: {', '.join(FAMILIES)})")


def _records(name: str, items: list, version: int, path: str, indices: list[int] | None = None) -> tuple:
    """ITEMS of family NAME as records, each checked by its from_json (INDICES: their places in the file)."""
    from_json = FAMILIES[name].record_type.from_json
    records = []
    for i, item in enumerate(items):
        try:
            records.append(from_json(_restore(name, item) if version >= 2 else item))
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            raise _bad(path, f"objects.{name}[{i if indices is None else indices[i]}] is invalid: "
                             f"{type(exc).__name__}: {exc}") from None
    return tuple(records)


# The last second time.strftime's %Y writes in four digits (9999-12-31T23:59:59Z); gmtime, the
# float the document keeps it as and its text take anything from 0 to there.
LAST_CREATED = 253402300799


def _snapshot_of(doc: dict, loaded: dict[str, tuple], path: str) -> Snapshot:
    created = doc.get("created_unix")
    if not isinstance(created, (int, float)) or isinstance(created, bool):
        raise _bad(path, "'created_unix' is missing or not a number")
    if not 0 <= created <= LAST_CREATED:        # (NaN too: not from a file, whose parse refuses it)
        shown = f"a number of {len(str(abs(created)))} digits" if isinstance(created, int) and created > 10 ** 40 \
            else repr(created)
        raise _bad(path, f"'created_unix' is {shown}, not a Unix time from 0 (1970) to {LAST_CREATED} (9999)")
    for key, kind in (("netns", dict), ("context", dict), ("keys_included", bool),
                      ("host", str), ("kernel", str)):
        if not isinstance(doc[key], kind):
            raise _bad(path, f"'{key}' is not a {kind.__name__}")
    if doc["daemon"] is not None and not isinstance(doc["daemon"], dict):
        raise _bad(path, "'daemon' is neither null nor an object")
    return Snapshot(created=float(created), host=doc["host"], kernel=doc["kernel"],
                    netns=doc["netns"], daemon=doc["daemon"], keys_included=doc["keys_included"],
                    context=doc["context"], objects=loaded)


@dataclass(frozen=True)
class FamilyDiff:
    added: tuple = ()
    removed: tuple = ()
    changed: tuple = ()     # (old, new) pairs: same identity, different non-volatile content

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)


def _stable(record: Any) -> dict:
    doc = record.to_json(include_keys=False)
    for key in getattr(record, "VOLATILE", ()):
        doc.pop(key, None)
    return doc


def diff_snapshots(a: Snapshot, b: Snapshot) -> dict[str, FamilyDiff]:
    """Per family: what B has that A has not, what A had that B lacks, what changed."""
    result = {}
    with without_cycle_collection():
        for name in FAMILIES:
            olds, news = a.objects.get(name, ()), b.objects.get(name, ())
            # A record at the same place in both, the same object (load_snapshots shares equal
            # ones) or equal, is unchanged: only the others are matched by identity. (Identities
            # are unique within a snapshot, so this is what matching all of them would give.)
            same = {i for i, (x, y) in enumerate(zip(olds, news)) if x is y or x == y}
            if same:
                olds = [r for i, r in enumerate(olds) if i not in same]
                news = [r for i, r in enumerate(news) if i not in same]
            result[name] = _diff_records(olds, news)
    return result


def _diff_records(olds, news) -> FamilyDiff:
    old = {r.key(): r for r in olds}
    new = {r.key(): r for r in news}
    added = tuple(new[k] for k in new if k not in old)
    removed = tuple(old[k] for k in old if k not in new)
    # Equal records need no field-by-field look; the others are compared without
    # their volatile fields (counters, use times).
    changed = tuple((old[k], new[k]) for k in old if k in new and old[k] != new[k]
                    and _stable(old[k]) != _stable(new[k]))
    return FamilyDiff(added, removed, changed)
