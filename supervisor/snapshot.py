"""Snapshot documents: build, write (atomic, 0600, keys redacted by default), load and validate, diff.

The document is versioned JSON.  Records are written one per line so that a
snapshot of tens of thousands of objects stays greppable and cheap to produce.
Records are encoded and parsed by msgspec when it is installed (5-7x faster than the json
module for 30,000 policies, bench/bench_snapshot.py), else by the json module: the same
document either way. The json module words the errors of a bad file.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import platform
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

try:
    import msgspec
except ImportError:     # Debian 12 packages no msgspec: a .deb without it writes the same files, slower
    msgspec = None

from .atomicfile import write_atomic
from .errors import SnapshotError, SupervisorError
from .kernel.xfrm import NO_LIMITS
from .kernel_state import FAMILIES, KernelState
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

    def counts(self) -> dict[str, int]:
        return {name: len(self.objects.get(name, ())) for name in FAMILIES}


def take_snapshot(state: KernelState, daemon: dict | None = None,
                  include_keys: bool = False) -> Snapshot:
    """Wrap a kernel read with its context. ``daemon``: {"pid":..., "exit":{...}} when known."""
    context: dict[str, Any] = {
        "route_table": state.options.route_table,
        "rule_priority": state.options.rule_priority,
        **state.context,
    }
    if state.default_policies is not None:
        context["xfrm_default_policy"] = state.default_policies.to_json()
    return Snapshot(created=time.time(), host=socket.gethostname(), kernel=platform.release(),
                    netns=state.netns.to_json(), daemon=daemon, keys_included=include_keys,
                    context=context, objects=dict(state.objects))


# Version 2 leaves out what version 1 wrote twice or spelled out for every record; loading
# puts it back before each record's from_json validates it, so the records are the same.
# - names derived from a number next to them (from_json reads the number):
DERIVED = {"route": ("type_name", "protocol_name", "scope_name"),
           "rule": ("action_name", "protocol_name"),
           "address": ("scope_name", "proto_name")}
# - a policy's lifetime when it is the kernel's default (no limits: a third of each line):
NO_LIMITS_JSON = NO_LIMITS.to_json()


@contextlib.contextmanager
def no_cycle_collection():
    """Tens of thousands of small acyclic dicts make the cycle collector rescan them over and over."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


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


def _family_lines(name: str, records: tuple, include_keys: bool) -> str:
    with no_cycle_collection():
        if msgspec is not None:
            encode = msgspec.json.Encoder().encode
            lines = b",\n   ".join([encode(record_json(name, r, include_keys)) for r in records]).decode()
        else:
            encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
            lines = ",\n   ".join([encode(record_json(name, r, include_keys)) for r in records])
    return "\n   " + lines if records else ""


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
        records = snap.objects.get(name, ())
        yield ("" if first_family else ",") + f"\n  {json.dumps(name)}: ["
        first_family = False
        yield _family_lines(name, records, snap.keys_included)
        yield "\n  ]" if records else "]"
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
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise SnapshotError(f"cannot read snapshot {path}: {exc.strerror}") from None
    if not raw.strip():
        raise _bad(path, "the file is empty")
    if msgspec is None:
        with no_cycle_collection():
            return snapshot_from_document(_parse_slowly(raw, path), path)
    try:
        with no_cycle_collection():
            doc = msgspec.json.decode(raw)
    except (msgspec.DecodeError, RecursionError):
        doc = _parse_slowly(raw, path)      # the json module says where and what
    return snapshot_from_document(doc, path)


def _parse_slowly(raw: bytes, path: str) -> Any:
    """The document by the json module, which names line and column of a problem."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _bad(path, f"not UTF-8 text (byte {exc.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        hint = " (truncated?)" if exc.pos >= len(text.rstrip()) - 1 else ""
        raise _bad(path, f"invalid JSON at line {exc.lineno} column {exc.colno}: "
                         f"{exc.msg}{hint}") from None
    except RecursionError:
        raise _bad(path, "JSON nested too deeply (no snapshot nests more than a few levels)") from None


def snapshot_from_document(doc: Any, path: str = "<document>") -> Snapshot:
    if not isinstance(doc, dict):
        raise _bad(path, f"top level is a JSON {type(doc).__name__}, not an object")
    if doc.get("schema") != SCHEMA:
        raise _bad(path, f"schema is {doc.get('schema')!r}, expected {SCHEMA!r}")
    version = doc.get("version")
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        raise _bad(path, f"version {version!r} is not supported "
                         f"(this ipsec-supervisor reads versions {', '.join(map(str, READABLE_VERSIONS))})")
    missing = [k for k in _TOP_KEYS if k not in doc]
    if missing:
        raise _bad(path, f"missing key(s): {', '.join(missing)}")
    objects = doc["objects"]
    if not isinstance(objects, dict):
        raise _bad(path, "'objects' is not a JSON object")
    unknown = sorted(set(objects) - set(FAMILIES))
    if unknown:
        raise _bad(path, f"unknown object family {unknown[0]!r} "
                         f"(known: {', '.join(FAMILIES)})")
    loaded: dict[str, tuple] = {}
    for name, family in FAMILIES.items():
        items = objects.get(name, [])
        if not isinstance(items, list):
            raise _bad(path, f"objects.{name} is not a list")
        from_json = family.record_type.from_json
        records = []
        with no_cycle_collection():
            for i, item in enumerate(items):
                try:
                    records.append(from_json(_restore(name, item) if version >= 2 else item))
                except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
                    raise _bad(path, f"objects.{name}[{i}] is invalid: "
                                     f"{type(exc).__name__}: {exc}") from None
        loaded[name] = tuple(records)
    created = doc.get("created_unix")
    if not isinstance(created, (int, float)):
        raise _bad(path, "'created_unix' is missing or not a number")
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
    with no_cycle_collection():
        for name in FAMILIES:
            old = {r.key(): r for r in a.objects.get(name, ())}
            new = {r.key(): r for r in b.objects.get(name, ())}
            added = tuple(new[k] for k in new if k not in old)
            removed = tuple(old[k] for k in old if k not in new)
            # Equal records need no field-by-field look; the others are compared without
            # their volatile fields (counters, use times).
            changed = tuple((old[k], new[k]) for k in old if k in new and old[k] != new[k]
                            and _stable(old[k]) != _stable(new[k]))
            result[name] = FamilyDiff(added, removed, changed)
    return result
