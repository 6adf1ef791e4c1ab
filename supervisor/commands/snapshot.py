"""``ipsec-supervisor snapshot``: take, show and diff snapshots of the kernel state."""

from __future__ import annotations

import json
import os
import sys
import time

from . import ROUTE_TABLE, RULE_PRIORITY, uint32, writing_output
from ..errors import ExitCode, NotRootError

DEFAULT_SNAPSHOT_DIR = "/var/lib/ipsec-supervisor/snapshots"


def register(sub) -> None:
    p = sub.add_parser("snapshot", help="snapshot the kernel state charon may leave behind",
                       description="Take a snapshot of XFRM SAs and policies, routes in the charon "
                                   "table, the charon routing rule, addresses and firewall rules. "
                                   "Key material is redacted unless --include-keys is given.")
    p.add_argument("--output", "-o", metavar="FILE",
                   help=f"where to write it (default: {DEFAULT_SNAPSHOT_DIR}/manual-TIME.json)")
    p.add_argument("--include-keys", action="store_true",
                   help="keep SA key material in the file (redacted by default)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--netns", metavar="NAME", help="read this network namespace (/run/netns/NAME)")
    p.add_argument("--route-table", type=uint32, default=ROUTE_TABLE, metavar="N",
                   help="charon's routing table (default %(default)s)")
    p.add_argument("--rule-priority", type=uint32, default=RULE_PRIORITY, metavar="N",
                   help="priority of charon's routing rule (default %(default)s)")
    p.set_defaults(func=cmd_take)
    actions = p.add_subparsers(dest="snapshot_action", metavar="ACTION")
    show = actions.add_parser("show", help="print a snapshot file")
    show.add_argument("file")
    show.add_argument("--json", action="store_true", help="print the validated document as JSON")
    show.set_defaults(func=cmd_show)
    diff = actions.add_parser("diff", help="compare two snapshot files per object family")
    diff.add_argument("a")
    diff.add_argument("b")
    diff.add_argument("--json", action="store_true")
    diff.set_defaults(func=cmd_diff)


# parse_plain: the options of the snapshot itself, by their exact spelling: dest, takes a value
_TAKE_OPTIONS = {"--output": ("output", True), "-o": ("output", True), "--include-keys": ("include_keys", False),
                 "--json": ("json", False), "--netns": ("netns", True), "--route-table": ("route_table", True),
                 "--rule-priority": ("rule_priority", True)}
_NUMBERS = ("route_table", "rule_priority")


def parse_plain(argv: list[str]):
    """What register()'s parser makes of ARGV in its usual forms (``[-v] snapshot [OPTION ...]``,
    ``snapshot show FILE [--json]``, ``snapshot diff A B [--json]``), each option spelled out and
    given once; None for anything else (argparse then parses it, errors and abbreviations too)."""
    from types import SimpleNamespace
    args = {"verbose": False, "command": "snapshot", "output": None, "include_keys": False, "json": False,
            "netns": None, "route_table": ROUTE_TABLE, "rule_priority": RULE_PRIORITY,
            "snapshot_action": None, "func": cmd_take}
    words = list(argv)
    while words and words[0] in ("-v", "--verbose"):
        if args["verbose"]:
            return None
        args["verbose"] = True
        words.pop(0)
    if not words or words.pop(0) != "snapshot":
        return None
    if words and words[0] in ("show", "diff"):
        action = words.pop(0)
        json_flag = words.count("--json")
        files = [w for w in words if w != "--json"]
        if json_flag > 1 or len(files) != (1 if action == "show" else 2) \
                or any(not f or f.startswith("-") for f in files):
            return None
        args.update(snapshot_action=action, json=bool(json_flag),
                    func=cmd_show if action == "show" else cmd_diff)
        args.update(zip(("file",) if action == "show" else ("a", "b"), files))
        return SimpleNamespace(**args)
    seen: set[str] = set()
    while words:
        option = _TAKE_OPTIONS.get(words.pop(0))
        if option is None or option[0] in seen:
            return None
        dest, takes_value = option
        seen.add(dest)
        if not takes_value:
            args[dest] = True
            continue
        if not words or not words[0] or words[0].startswith("-"):
            return None
        value = words.pop(0)
        if dest in _NUMBERS:
            try:
                value = int(value, 0)
            except ValueError:
                return None
            if not 0 <= value <= 0xFFFFFFFF:
                return None
        args[dest] = value
    return SimpleNamespace(**args)


def require_root() -> None:
    if os.geteuid() != 0:
        raise NotRootError("reading XFRM state needs root (CAP_NET_ADMIN); run as root")


def cmd_take(args) -> int:
    from ..kernel import netns
    from ..kernel_state import ReadOptions
    from ..snapshot import read_encoded, take_snapshot, write_snapshot
    require_root()
    output = args.output
    # On a terminal, say what is being read: tens of thousands of objects take a moment.
    tty = sys.stderr.isatty()

    def progress(family, count: int) -> None:
        print(f"\r\033[Kread {count} {family.title}", end="", file=sys.stderr, flush=True)

    with netns.enter(args.netns):
        state, encoded = read_encoded(ReadOptions(route_table=args.route_table, rule_priority=args.rule_priority),
                                      progress=progress if tty else None, include_keys=args.include_keys)
    snap = take_snapshot(state, include_keys=args.include_keys, encoded=encoded)
    if output is None:
        from ..trusted_paths import initial_netns_inode, instance_dir, netns_instance, open_own_subdir
        # That namespace's supervisor's snapshot directory (per namespace outside the initial one).
        instance = netns_instance(state.netns.inode, state.netns.name, initial_netns_inode())
        directory = os.path.join(instance_dir(os.path.dirname(DEFAULT_SNAPSHOT_DIR), instance),
                                 os.path.basename(DEFAULT_SNAPSHOT_DIR))
        open_own_subdir(directory, what="the state directory").close()   # checked, created 0700
        output = os.path.join(directory, time.strftime("manual-%Y%m%dT%H%M%SZ.json", time.gmtime()))
    if tty:
        print(f"\r\033[Kwriting {sum(snap.counts().values())} objects to {output}", end="",
              file=sys.stderr, flush=True)
    write_snapshot(output, snap)
    if tty:
        print("\r\033[K", end="", file=sys.stderr, flush=True)
    counts = snap.counts()
    with writing_output():
        if args.json:
            json.dump({"path": output, "counts": counts, "keys_included": args.include_keys},
                      sys.stdout)
            print()
        else:
            print(f"snapshot written to {output}" + (" (with key material)" if args.include_keys else ""))
            _print_counts(counts)
    return ExitCode.OK


def _print_counts(counts: dict[str, int]) -> None:
    from ..kernel_state import FAMILIES
    for name, family in FAMILIES.items():
        print(f"  {family.title:<16} {counts.get(name, 0):>7}")


def _print_json(doc) -> None:
    """DOC as json.dump(indent=1) prints it, by msgspec when installed (the json module takes
    seconds for 30,000 records with indentation)."""
    from ..snapshot import msgspec
    with writing_output():
        if msgspec is None:
            json.dump(doc, sys.stdout, indent=1, ensure_ascii=False)
        else:
            sys.stdout.write(msgspec.json.format(msgspec.json.encode(doc), indent=1).decode())
        print()


def _settled(load):
    """LOAD(keep)'s snapshots, kept out of the cycle collector's sight: the records are acyclic, and a
    collection right after loading tens of thousands of them costs 30 ms each time; what LOAD puts
    in KEEP, and what it returns, is never freed (a program only: it exits next)."""
    from ..kernel.common import without_cycle_collection
    from ..snapshot import keep_until_exit
    keep: list = []
    with without_cycle_collection():
        loaded = load(keep)
        keep.append(loaded)
        keep_until_exit(keep)
    return loaded


def _mapped_while(load):
    """LOAD(files)'s result, the snapshot files it reads mapped through FILES, a filemap.MappedFiles
    scope: not copied, and nobody truncates them under the command (a lease) until LOAD is done:
    what the command prints after that (a pager may hold it for long) no longer reads them."""
    from ..filemap import MappedFiles
    with MappedFiles() as files:
        return load(files)


def cmd_show(args) -> int:
    from ..kernel_state import FAMILIES
    from ..snapshot import describe_snapshot
    if args.json:
        return _show_json(args.file)
    snap, texts = _mapped_while(lambda files: _settled(lambda keep: describe_snapshot(args.file, keep, files)))
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(snap.created))
    ns = snap.netns.get("name") or f"inode {snap.netns.get('inode')}"
    with writing_output():
        print(f"snapshot {args.file}\n  taken {when} on {snap.host} (kernel {snap.kernel}), netns {ns}")
        if snap.daemon:
            print(f"  daemon: {json.dumps(snap.daemon)}")
        print(f"  key material: {'included' if snap.keys_included else 'redacted'}")
        for name, family in FAMILIES.items():
            lines = texts.get(name, ())
            print(f"{family.title} ({len(lines)}):")
            if lines:       # (in three pieces: no copy of megabytes to add two spaces and a newline)
                sys.stdout.write("  ")
                sys.stdout.write("\n  ".join(lines))
                sys.stdout.write("\n")
    return ExitCode.OK


def _show_json(path: str) -> int:
    """``show FILE --json``: with msgspec, the document of a version 2 file made without its policy
    and route records (snapshot_show); anything else the way that builds every record."""
    from ..kernel.common import without_cycle_collection
    from ..snapshot import load_for_json, load_snapshots

    def load(files):
        raws: list = []
        found = _settled(lambda keep: load_for_json(path, keep, raws, files))
        if found is not None:
            return found, None
        return None, _settled(lambda keep: load_snapshots(path, raws=raws))[0]     # (a pipe is read once)

    found, snap = _mapped_while(load)
    if snap is not None:
        return _print_records_json(snap)
    from ..snapshot_show import document
    with without_cycle_collection(), writing_output():
        _write_utf8(document(*found))
    return ExitCode.OK


def _print_records_json(snap) -> int:
    """``show --json`` of SNAP from every record's to_json: without msgspec, for version 1 and for a bad
    file (load_snapshot words its fault); the bytes snapshot_show gives too (tests hold it to them)."""
    from ..kernel.common import without_cycle_collection
    with without_cycle_collection():
        doc = {"created": snap.created, "host": snap.host, "kernel": snap.kernel,
               "netns": snap.netns, "daemon": snap.daemon, "keys_included": snap.keys_included,
               "context": snap.context,
               "objects": {n: [r.to_json(include_keys=snap.keys_included) for r in recs]
                           for n, recs in snap.objects.items()}}
    _print_json(doc)
    return ExitCode.OK


def _write_utf8(pieces) -> None:
    """PIECES (bytes of UTF-8 JSON, split where a character ends) and a newline on stdout as
    print(their text) writes them: straight to its buffer when it encodes UTF-8 (no copy of tens of
    megabytes decoded and encoded again)."""
    import codecs
    out = sys.stdout
    buffer = getattr(out, "buffer", None)
    if buffer is None or codecs.lookup(out.encoding).name != "utf-8":
        out.write(b"".join(pieces).decode())       # (one write, as print's: all of it or nothing)
        print()
        return
    out.flush()
    for piece in pieces:
        buffer.write(piece)
    buffer.write(b"\n")


def cmd_diff(args) -> int:
    from ..kernel_state import FAMILIES
    from ..kernel.common import without_cycle_collection
    from ..snapshot import diff_snapshot_files
    result = _mapped_while(lambda files: _settled(lambda keep: diff_snapshot_files(args.a, args.b, keep, files)))
    if args.json:
        with without_cycle_collection():
            doc = {name: {"added": [r.to_json() for r in d.added],
                          "removed": [r.to_json() for r in d.removed],
                          "changed": [{"old": o.to_json(), "new": n.to_json()} for o, n in d.changed]}
                   for name, d in result.items()}
        _print_json(doc)
        return ExitCode.OK
    with writing_output():
        if not any(result.values()):
            print("no differences")
            return ExitCode.OK
        for name, d in result.items():
            if not d:
                continue
            print(f"{FAMILIES[name].title}: +{len(d.added)} -{len(d.removed)} ~{len(d.changed)}")
            for r in d.added:
                print(f"  + {r.describe()}")
            for r in d.removed:
                print(f"  - {r.describe()}")
            for o, n in d.changed:
                print(f"  ~ {n.describe()}")
    return ExitCode.OK
