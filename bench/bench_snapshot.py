#!/usr/bin/env python3
"""`ipsec-supervisor snapshot` of 10,000 tunnels, whole process, against iproute2 in the same run;
reading it back (`snapshot show`, `snapshot diff`); and the cost curve of snapshot, plan and flush.

Run as root: ``.venv/bin/python bench/bench_snapshot.py [--tunnels 10000] [--runs 5]``, or
``--curve 100,1000,10000,30000`` for the cost curve (goal 5 of issue 12), adopt planning
included (``--adopt-max N``: only up to N tunnels). The namespace is
bench_flush.py's charon-like leftovers (out/in/fwd policies and a table-220 route per tunnel,
rule 220, foreign state), made and removed by the script.

Whole-process rows run as child processes, one of each per round (load from elsewhere falls
on all alike): ``ip xfrm policy`` and ``ip route show table 220`` writing their text to a file
(the baseline is their sum), ``ipsec-supervisor snapshot --netns NS --output FILE`` (written
durably: fsync, as always), ``snapshot show FILE`` and ``snapshot diff FILE FILE2`` to
/dev/null. Medians of wall and CPU time (CPU barely moves when other work loads the machine).
The supervisor runs as installed: a pip-installed copy in a temporary virtual environment
(bench_cli.install_copy; ``--as-checkout``: the .venv's editable install, whose import hook
costs every start about 10 ms a user does not pay). Then, in this process, where the time goes: imports, each family's dump and decode, encoding,
writing, parsing and validating, the diff; and the record encoders side by side (goal <= 3x).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import bench_cli  # noqa: E402
import bench_flush  # noqa: E402
from supervisor import snapshot as snapshot_module  # noqa: E402
from supervisor.kernel import netns, xfrm  # noqa: E402
from supervisor.kernel.common import without_cycle_collection  # noqa: E402
from supervisor.kernel_state import FAMILIES, ReadOptions, read_state  # noqa: E402
from supervisor.snapshot import diff_snapshots, load_snapshot, take_snapshot, write_snapshot  # noqa: E402

SUPERVISOR = os.path.join(os.path.dirname(sys.executable), "ipsec-supervisor")
GOAL = 3.0


def child_run(argv: list[str], out: str, env: dict) -> tuple[float, float]:
    """(wall, cpu) seconds of one child process writing its stdout to OUT."""
    t0, c0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(out, "wb") as fh:
        proc = subprocess.run(argv, stdout=fh, stderr=subprocess.PIPE, env=env, cwd=ROOT)
    t1, c1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"bench_snapshot: {' '.join(argv[:5])} ... failed ({proc.returncode}): "
                         f"{proc.stderr.decode(errors='replace').strip()[:300]}")
    return t1 - t0, (c1.ru_utime + c1.ru_stime) - (c0.ru_utime + c0.ru_stime)


def rounds(commands: dict[str, tuple[list[str], str]], runs: int, env: dict) -> dict[str, list[tuple[float, float]]]:
    times: dict[str, list[tuple[float, float]]] = {label: [] for label in commands}
    for i in range(runs + 1):                   # one unmeasured warm-up round
        for label, (argv, out) in commands.items():
            result = child_run(argv, out, env)
            if i:
                times[label].append(result)
    return times


def medians(samples: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(s[0] for s in samples), statistics.median(s[1] for s in samples)


def best(fn, runs: int = 3, clock=time.perf_counter):
    """(least time of RUNS calls by CLOCK, the result)."""
    times, result = [], None
    for _ in range(runs):
        gc.collect()
        start = clock()
        result = fn()
        times.append(clock() - start)
    return min(times), result


def cpu_best(fn, runs: int = 3):
    """best() in CPU time of this process, which barely moves when others load the machine."""
    return best(fn, runs, time.process_time)


def whole_process(ns: str, tunnels: int, runs: int, workdir: str, env: dict, supervisor: str) -> None:
    snap_a, snap_b = os.path.join(workdir, "a.json"), os.path.join(workdir, "b.json")
    for path in (snap_a, snap_b):               # the files show and diff read (and warm-up)
        child_run([supervisor, "snapshot", "--netns", ns, "--output", path], os.devnull, env)
    snap_c = counters_moved(snap_b, os.path.join(workdir, "c.json"))
    commands = {
        "ip xfrm policy > file": (["ip", "-n", ns, "xfrm", "policy"], os.path.join(workdir, "ip-policy.txt")),
        "ip route show table 220 > file": (["ip", "-n", ns, "route", "show", "table", "220"],
                                           os.path.join(workdir, "ip-route.txt")),
        "ipsec-supervisor snapshot --output FILE": (
            [supervisor, "snapshot", "--netns", ns, "--output", os.path.join(workdir, "s.json")], os.devnull),
        "ipsec-supervisor snapshot show FILE": ([supervisor, "snapshot", "show", snap_a], os.devnull),
        "ipsec-supervisor snapshot diff A B": ([supervisor, "snapshot", "diff", snap_a, snap_b], os.devnull),
        "  diff A C (C: B, 3 policies' use_time moved)": ([supervisor, "snapshot", "diff", snap_a, snap_c],
                                                          os.devnull),
        "ipsec-supervisor snapshot show FILE --json": ([supervisor, "snapshot", "show", snap_a, "--json"],
                                                       os.devnull),
    }
    times = rounds(commands, runs, env)
    m = {label: medians(samples) for label, samples in times.items()}
    base = tuple(m["ip xfrm policy > file"][k] + m["ip route show table 220 > file"][k] for k in (0, 1))
    size = os.path.getsize(os.path.join(workdir, "s.json"))
    print(f"whole process, median of {runs} rounds (snapshot file {size / 1e6:.1f} MB, "
          f"{size / (4 * tunnels):.0f} bytes per object):")
    print(f"  {'command':<46} {'wall':>8} {'cpu':>8} {'/ ip wall':>9} {'/ ip cpu':>9}")
    for label, (wall, cpu) in m.items():
        ratio = "" if label.startswith("ip ") else f"{wall / base[0]:8.2f}x {cpu / base[1]:8.2f}x"
        print(f"  {label:<46} {wall * 1000:6.0f}ms {cpu * 1000:6.0f}ms {ratio}")
    print(f"  {'baseline: both ip commands':<46} {base[0] * 1000:6.0f}ms {base[1] * 1000:6.0f}ms   (goal <= {GOAL:.0f}x)")


def counters_moved(path: str, out: str) -> str:
    """OUT: the snapshot at PATH with three policies' use_time moved (traffic between two snapshots;
    nothing that diff reports, but A's and C's records differ in text: diff's general way)."""
    snap = load_snapshot(path)
    policies = list(snap.objects["xfrm_policy"])
    for i in (len(policies) // 100, len(policies) // 2, len(policies) - 2):
        p = policies[i]
        policies[i] = dataclasses.replace(p, curlft=dataclasses.replace(p.curlft, use_time=p.curlft.add_time + 60))
    write_snapshot(out, dataclasses.replace(snap, objects={**snap.objects, "xfrm_policy": tuple(policies)}))
    return out


def phases(ns: str, workdir: str, env: dict) -> None:
    def import_ms(statement: str) -> float:
        code = f"import time; t = time.perf_counter(); {statement}; print(time.perf_counter() - t)"
        out = [float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                                    cwd=ROOT).stdout) for _ in range(5)]
        return statistics.median(out) * 1000

    print("in-process phases (best of 3, CPU time):")
    print(f"  {'imports of the snapshot command':<52} "
          f"{import_ms('import supervisor.cli, supervisor.commands.snapshot, supervisor.snapshot'):6.0f}ms")
    options = ReadOptions()
    with netns.enter(ns):
        for name, family in FAMILIES.items():
            t, records = cpu_best(lambda: family.dump(options))
            print(f"  {'dump + decode ' + name + f' ({len(records)})':<52} {t * 1000:6.0f}ms")
        t, state = cpu_best(lambda: read_state(options))
        print(f"  {'read_state (all families, records)':<52} {t * 1000:6.0f}ms")
        t, (raw_state, encoded) = cpu_best(lambda: snapshot_module.read_encoded(options))
        print(f"  {'read_encoded (policies and routes kept raw)':<52} {t * 1000:6.0f}ms")
    snap = take_snapshot(state)
    path = os.path.join(workdir, "p.json")
    t, _ = cpu_best(lambda: list(snapshot_module._document_chunks(snap)))
    print(f"  {'encode from records (snapshot_lines)':<52} {t * 1000:6.0f}ms")
    t, _ = cpu_best(lambda: write_snapshot(path, snap))
    print(f"  {'write_snapshot from records (encode, write, fsync)':<52} {t * 1000:6.0f}ms")
    t, _ = cpu_best(lambda: write_snapshot(path, take_snapshot(raw_state, encoded=encoded)))
    print(f"  {'write_snapshot from the datagrams (the command)':<52} {t * 1000:6.0f}ms")
    with open(path, "rb") as fh:
        raw = fh.read()
    from supervisor import snapshot_typed
    with without_cycle_collection():         # as load_snapshot parses
        t, _ = cpu_best(lambda: snapshot_module.msgspec.json.decode(raw))
        print(f"  {'parse (msgspec, untyped)':<52} {t * 1000:6.0f}ms")
        t, _ = cpu_best(lambda: snapshot_typed.DOCUMENT.decode(raw))
        print(f"  {'parse and check types (msgspec, snapshot_typed)':<52} {t * 1000:6.0f}ms")
    t, loaded = cpu_best(lambda: load_snapshot(path))
    print(f"  {'load_snapshot (typed, then records)':<52} {t * 1000:6.0f}ms")
    codec = snapshot_module.msgspec
    snapshot_module.msgspec = None
    try:
        t, _ = cpu_best(lambda: load_snapshot(path))
        print(f"  {'load_snapshot without msgspec (json module, from_json)':<52} {t * 1000:6.0f}ms")
    finally:
        snapshot_module.msgspec = codec
    t, _ = cpu_best(lambda: snapshot_module.describe_snapshot(path))
    print(f"  {'describe_snapshot (show: checked, described, no record)':<52} {t * 1000:6.0f}ms")
    other = os.path.join(workdir, "p2.json")
    shutil.copyfile(path, other)
    t, _ = cpu_best(lambda: snapshot_module.diff_snapshot_files(path, other))
    print(f"  {'diff_snapshot_files, the same records':<52} {t * 1000:6.0f}ms")
    moved = counters_moved(path, os.path.join(workdir, "p3.json"))
    t, _ = cpu_best(lambda: snapshot_module.diff_snapshot_files(path, moved))
    print(f"  {'diff_snapshot_files, 3 counters moved (by text)':<52} {t * 1000:6.0f}ms")
    t, pair = cpu_best(lambda: snapshot_module.load_snapshots(path, path))
    print(f"  {'load_snapshots of two equal files':<52} {t * 1000:6.0f}ms")
    t, _ = cpu_best(lambda: diff_snapshots(*pair))
    print(f"  {'diff_snapshots of them (records shared)':<52} {t * 1000:6.0f}ms")
    t, _ = cpu_best(lambda: diff_snapshots(loaded, snap))
    print(f"  {'diff_snapshots of equal records, not shared':<52} {t * 1000:6.0f}ms")

    policies = snap.objects["xfrm_policy"]
    with without_cycle_collection():
        docs = [snapshot_module.record_json("xfrm_policy", r, False) for r in policies]
        v1 = [r.to_json() for r in policies]
    from supervisor.snapshot_lines import policy_lines
    encoders = [("json module, one call per record", lambda: ",\n".join(map(json.JSONEncoder(
        separators=(",", ":")).encode, docs)).encode()),
                ("msgspec, one call per record", lambda: b",\n".join(map(snapshot_module.msgspec.json.Encoder()
                                                                       .encode, docs))),
                ("snapshot_lines from the records (incl. to_json's work)", lambda: ",\n".join(
                    policy_lines(policies, None)).encode())]
    try:
        import orjson
        encoders.append(("orjson, one call per record", lambda: b",\n".join(map(orjson.dumps, docs))))
    except ImportError:
        pass
    print(f"encoders for the {len(policies)} policy records (version 2; v1 was "
          f"{len(json.dumps(v1, separators=(',', ':'))) / max(1, len(v1)):.0f} bytes per policy; "
          "the first two get the records' JSON objects ready-made):")
    for label, fn in encoders:
        t, out = cpu_best(fn)
        print(f"  {label:<52} {t * 1000:6.0f}ms  {len(out) / max(1, len(docs)):.0f} bytes per policy")


def adopt_step(state, n: int) -> tuple[tuple, tuple, tuple, int]:
    """(wall, cpu) seconds of adopt planning right after the restart: (the first step, a later step,
    the step after the grace, leftovers). Every owned leftover; one configured child per tunnel (its selectors
    and peer, as list-conns shows them); nothing active. The first step and the sweep start cold
    (configured children indexed, leftovers grouped and keyed: fresh copies each run); a later step
    is what the supervisor's following steps cost (same leftovers and list-conns answer)."""
    from supervisor import adopt
    from supervisor.adopt import ConfiguredChild, parse_ts, plan_adopt
    from supervisor.ownership import decide_ownership
    owned = decide_ownership(state.objects)
    leftovers = [pair for name in state.objects for pair in owned.owned(name)]
    configured = []
    for i in range(n):
        local, remote, peer = bench_flush.tunnel(i)
        configured.append(ConfiguredChild(f"t{i}", "net", "TUNNEL", (parse_ts(local),), (parse_ts(remote),),
                                          (bench_flush.LOCAL,), (peer,)))
    addresses = frozenset(a.address for a in state.objects["address"])
    common = dict(ledger=None, active=[], local_addresses=addresses, explain=False)

    def step(lo, conf, **kw):
        return plan_adopt(lo, configured=conf, **{**common, **kw})

    def best(fn, runs: int = 3):
        """((wall, cpu) of the fastest of RUNS, its result); CPU time barely moves under load."""
        times, result = [], None
        for _ in range(runs):
            gc.collect()
            w, c = time.perf_counter(), time.process_time()
            result = fn()
            times.append((time.perf_counter() - w, time.process_time() - c))
        return min(times), result
    # as the supervisor steps: the plan's own work only (WaitFor actions left out)
    first, plan = best(lambda: step(tuple(leftovers), tuple(configured), now=0.0, deadline=60.0))
    initiations = [a for a in plan.actions if a.KIND == "initiate"]
    if len(initiations) != 1:
        raise SystemExit(f"bench_snapshot: the first adopt step planned {len(initiations)} initiations, not 1")
    same_lo, same_conf = tuple(leftovers), tuple(configured)
    step(same_lo, same_conf, now=0.0, deadline=60.0)
    later, _ = best(lambda: step(same_lo, same_conf, now=1.0, deadline=60.0))
    # after the grace: every leftover swept, fail-closed blocks for every configured out/fwd policy
    swept, _ = best(lambda: step(tuple(leftovers), tuple(configured), now=61.0, deadline=60.0, initiate=False),
                    runs=1)
    adopt.forget()
    return first, later, swept, len(leftovers)


def adopt_curve(sizes: list[int], workdir: str) -> None:
    """Only adopt planning at each size (the namespace is built, read and removed; nothing flushed)."""
    detail = []
    for n in sizes:
        ns = f"ipsv-bsnap-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        try:
            bench_flush.build(ns, n, min(100, n), workdir)
            with netns.enter(ns):
                state = read_state(ReadOptions())
        finally:
            bench_flush.remove(ns)
        detail.append((n, [adopt_step(state, n)], 0))
    print_adopt(detail, max(sizes))


def curve(sizes: list[int], workdir: str, adopt_max: int) -> None:
    """Snapshot, plan and flush at each size (bench_flush.ours, which checks the result), then on a
    fresh copy where the time goes: the kernel's part (netlink dump, iproute2 deleting the same
    objects) against ours (decoding, encoding, writing)."""
    rows, detail = [], []
    for n in sizes:
        fw = min(100, n)
        ns = f"ipsv-bsnap-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        try:
            bench_flush.build(ns, n, fw, workdir)
            t = bench_flush.ours(ns, n, fw, workdir)
        finally:
            bench_flush.remove(ns)
        rows.append((n, [t[k][0] for k in ("read_state", "write_snapshot", "decide_ownership", "plan_flush",
                                           "execute")]))
        ns = f"ipsv-bsnap-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        try:
            bench_flush.build(ns, n, fw, workdir)
            with netns.enter(ns), xfrm.open_socket() as sock:
                t_dump, chunks = best(lambda: sock.dump_raw(xfrm.XFRM_MSG_GETPOLICY))
                with without_cycle_collection():
                    t_decode, _ = best(lambda: xfrm.decode_policies(chunks))
                state = read_state(ReadOptions())
            snap = take_snapshot(state)
            t_encode, chunks = best(lambda: list(snapshot_module._document_chunks(snap)))
            path = os.path.join(workdir, "curve.json")
            t_write, _ = best(lambda: snapshot_module.write_atomic(path, chunks, prefix=".snapshot-"))
            size = os.path.getsize(path)
            t_ip = bench_flush.baseline(ns, n, fw, workdir)["ip -batch"][0]
        finally:
            bench_flush.remove(ns)
        t_adopt = adopt_step(state, n) if n <= adopt_max else None
        detail.append((n, [t_dump, t_decode, t_encode, t_write, t_ip, t_adopt], size))
    print("cost curve (bench_flush phases, one run per size):")
    print(f"  {'tunnels':>8} {'read':>8} {'snapshot':>9} {'ownership':>9} {'plan':>8} {'flush':>8} {'total':>8}"
          f" {'us/tunnel':>10}")
    for n, walls in rows:
        print(f"  {n:>8} " + " ".join(f"{w:8.3f}s" for w in walls) + f" {sum(walls):7.3f}s {sum(walls) / n * 1e6:9.0f}")
    print("where it goes (best of 3; policies only for dump/decode; kernel = netlink dump and iproute2's deletes):")
    print(f"  {'tunnels':>8} {'dump':>8} {'decode':>8} {'encode':>8} {'write+fsync':>11} {'MB':>6} {'ip -batch del':>14}")
    for n, (d, dec, enc, wr, ip, _), size in detail:
        print(f"  {n:>8} {d:7.3f}s {dec:7.3f}s {enc:7.3f}s {wr:10.3f}s {size / 1e6:6.1f} {ip:13.3f}s")
    print_adopt(detail, adopt_max)


def print_adopt(detail: list, adopt_max: int) -> None:
    print("adopt planning (adopt.plan_adopt, no ledger, one configured child per tunnel, nothing active yet; "
          "wall s, us per leftover; best of 3):")
    print(f"  {'tunnels':>8} {'leftovers':>9} {'first step':>10} {'us/left':>8} {'later step':>10} {'us/left':>8} "
          f"{'after grace':>11} {'us/left':>8}")
    for n, (*_, adopt), _ in detail:
        if adopt is None:
            print(f"  {n:>8} (not measured: above --adopt-max {adopt_max})")
            continue
        first, later, swept, count = adopt
        print(f"  {n:>8} {count:>9} " + " ".join(f"{t[0]:{w}.3f}s {t[0] / count * 1e6:8.1f}"
                                                  for t, w in ((first, 9), (later, 9), (swept, 10)))
              + "   cpu " + " / ".join(f"{t[1]:.3f}s" for t in (first, later, swept)))
    print("first step: the supervisor's first step after the restart (indexes list-conns, groups and matches every "
          "leftover, initiates one); later step: the next ones (same leftovers and list-conns: grouping and matches "
          "kept); after grace: the sweep (every leftover deleted, fail-closed blocks for configured selectors)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tunnels", type=int, default=10000, help="tunnels: 3 policies and a route each "
                                                                   "(default %(default)s)")
    parser.add_argument("--runs", type=int, default=5, help="measured rounds (default %(default)s)")
    parser.add_argument("--dir", help="where the files go (default: a new directory under /var/tmp, on disk "
                                      "like /var/lib/ipsec-supervisor)")
    parser.add_argument("--curve", metavar="N,N,...", help="only the cost curve at these tunnel counts")
    parser.add_argument("--adopt-only", action="store_true", help="with --curve: only adopt planning")
    parser.add_argument("--adopt-max", type=int, default=30000, metavar="N",
                        help="time adopt planning in the curve up to N tunnels (default %(default)s)")
    parser.add_argument("--as-checkout", action="store_true",
                        help="run the .venv's console script (an editable install: its import hook costs "
                             "~10 ms a start) instead of a pip-installed copy, as bench_cli.py does")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_snapshot: needs root (creates network namespaces)", file=sys.stderr)
        return 4
    workdir = tempfile.mkdtemp(prefix="ipsv-bsnap-", dir=args.dir or "/var/tmp")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX")}
    env["PYTHONPYCACHEPREFIX"] = os.path.join(workdir, "pycache")     # bytecode cached, as installed
    try:
        if args.curve:
            sizes = [int(n) for n in args.curve.split(",")]
            if args.adopt_only:
                adopt_curve(sizes, workdir)
            else:
                curve(sizes, workdir, args.adopt_max)
            return 0
        ns = f"ipsv-bsnap-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        try:
            start = time.perf_counter()
            bench_flush.build(ns, args.tunnels, min(100, args.tunnels), workdir)
            print(f"{args.tunnels} tunnels ({3 * args.tunnels} policies, {args.tunnels} table-220 routes, "
                  f"rule 220, foreign state) built in {time.perf_counter() - start:.1f}s; load average "
                  f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
            supervisor = SUPERVISOR if args.as_checkout else os.path.join(
                bench_cli.install_copy(os.path.join(workdir, "installed")), "ipsec-supervisor")
            whole_process(ns, args.tunnels, args.runs, workdir, env, supervisor)
            phases(ns, workdir, env)
        finally:
            bench_flush.remove(ns)
        return 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
