#!/usr/bin/env python3
"""Flush of 10,000 leftover tunnels: snapshot + ownership + plan + execute, against ``ip -batch``.

Run as root: ``.venv/bin/python bench/bench_flush.py [--tunnels 10000] [--firewall 100] [--runs 1]``.
Each run builds, in a namespace of its own (removed afterwards), charon-like leftovers
of TUNNELS tunnels: out/in/fwd policies with charon's priorities and templates, one
table-220 route (protocol static) each, rule 220 (v4 and v6), updown FORWARD rules for
the first FIREWALL tunnels (iptables-nft), next to foreign state of every kind. It times
``read_state``, ``write_snapshot``, ``decide_ownership``, ``plan_flush`` (fail-closed) and
``execute``, checks that exactly the owned objects went, then rebuilds the namespace and
times iproute2 (``ip -batch``) and ``iptables-restore --noflush`` deleting the same objects:
the same-run baseline. Best of --runs for every phase.
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from supervisor.kernel import netns, xfrm  # noqa: E402
from supervisor.kernel_state import ReadOptions, read_state  # noqa: E402
from supervisor.ownership import charon_priorities, decide_ownership, is_supervisor_block  # noqa: E402
from supervisor.reconcile import Outcome, execute, plan_flush  # noqa: E402
from supervisor.snapshot import take_snapshot, write_snapshot  # noqa: E402

LOCAL = "198.51.100.1"
GATEWAY = "198.51.100.254"

SETUP = f"""\
link set lo up
link add veth0 type veth peer name veth1
link set veth0 up
link set veth1 up
addr add {LOCAL}/24 dev veth0
addr add 2001:db8::1/64 dev veth0 nodad
"""

# Foreign state of every kind: never to be touched.
FOREIGN_IP = f"""\
xfrm policy add src 10.250.0.0/16 dst 10.251.0.0/16 dir out priority 1000 tmpl src {LOCAL} dst 192.0.2.7 proto esp reqid 77777 mode tunnel
xfrm policy add src 10.251.0.0/16 dst 10.250.0.0/16 dir in priority 1000 tmpl src 192.0.2.7 dst {LOCAL} proto esp reqid 77777 mode tunnel
xfrm policy add src 10.252.0.0/16 dst 10.253.0.0/16 dir fwd priority 50 action block
xfrm policy add src fd00:7::/64 dst fd00:8::/64 dir out priority 60000 action block
route add 10.250.0.0/16 via {GATEWAY} dev veth0 table 220
route add 10.251.0.0/16 via {GATEWAY} dev veth0 table 100
route add 10.252.0.0/16 via {GATEWAY} dev veth0 proto static table 100
route add 10.253.0.0/16 via {GATEWAY} dev veth0
route add fd00:9::/64 via 2001:db8::9 dev veth0 table 220
rule add priority 100 table 100
"""
# iproute2 batches take no -6: rules without addresses need it on the command line.
FOREIGN_V6_RULES = [["rule", "add", "priority", "221", "table", "220"]]
FOREIGN_FW = """\
*filter
-A INPUT -s 192.0.2.0/24 -j ACCEPT
-A FORWARD -i veth0 -s 10.251.0.0/16 -d 10.250.0.0/16 -m policy --dir in --pol ipsec --reqid 77777 --proto esp -j ACCEPT
COMMIT
"""
FOREIGN_NFT = """\
add table inet fw
add chain inet fw input { type filter hook input priority 0; }
add rule inet fw input tcp dport 22 accept
"""


def tunnel(i: int) -> tuple[str, str, str]:
    local = f"10.{i >> 8 & 255}.{i & 255}.0/24"
    remote = f"172.{16 + (i >> 16)}.{i >> 8 & 255}.{i & 255}/32"
    peer = f"192.0.{2 + (i >> 8) % 200}.{i & 255}"
    return local, remote, peer


def ipsec_priority(local: str, remote: str) -> int:
    """charon's priority for an IPsec (non-trap) policy of this selector."""
    address, plen = local.split("/")
    rem, rlen = remote.split("/")
    sel = xfrm.XfrmSelector(2, address, int(plen), rem, int(rlen))
    return next(value for value, case in charon_priorities(sel).items() if case == "ipsec")


def charon_lines(tunnels: int) -> list[str]:
    lines = []
    for i in range(tunnels):
        local, remote, peer = tunnel(i)
        prio = ipsec_priority(local, remote)
        out = f"tmpl src {LOCAL} dst {peer} proto esp reqid {i + 1} mode tunnel"
        inb = f"tmpl src {peer} dst {LOCAL} proto esp reqid {i + 1} mode tunnel"
        lines.append(f"xfrm policy add src {local} dst {remote} dir out priority {prio} {out}")
        lines.append(f"xfrm policy add src {remote} dst {local} dir in priority {prio} {inb}")
        lines.append(f"xfrm policy add src {remote} dst {local} dir fwd priority {prio} {inb}")
        lines.append(f"route add {remote} via {GATEWAY} dev veth0 src {LOCAL} proto static table 220")
    lines.append("rule add priority 220 table 220")
    return lines


def updown_rules(count: int) -> list[str]:
    """updown's FORWARD pair per tunnel (``leftfirewall=yes``), as iptables-save prints them."""
    rules = []
    for i in range(count):
        local, remote, _ = tunnel(i)
        rules.append(f"-A FORWARD -s {remote} -d {local} -i veth0 -m policy --dir in --pol ipsec "
                     f"--reqid {i + 1} --proto esp -j ACCEPT")
        rules.append(f"-A FORWARD -s {local} -d {remote} -o veth0 -m policy --dir out --pol ipsec "
                     f"--reqid {i + 1} --proto esp -j ACCEPT")
    return rules


def delete_lines(tunnels: int) -> list[str]:
    """The iproute2 batch removing what charon_lines() installed."""
    lines = []
    for i in range(tunnels):
        local, remote, _ = tunnel(i)
        lines.append(f"xfrm policy delete src {local} dst {remote} dir out")
        lines.append(f"xfrm policy delete src {remote} dst {local} dir in")
        lines.append(f"xfrm policy delete src {remote} dst {local} dir fwd")
        lines.append(f"route del {remote} via {GATEWAY} dev veth0 src {LOCAL} proto static table 220")
    lines.append("rule del priority 220 table 220")
    return lines


def run(argv: list[str], stdin: str | None = None) -> None:
    proc = subprocess.run(argv, input=stdin, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench_flush: `{' '.join(argv[:6])} ...` failed: {proc.stderr.strip()[:400]}")


def ip_batch(ns: str, lines: list[str], workdir: str) -> None:
    path = os.path.join(workdir, "batch")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    run(["ip", "-n", ns, "-batch", path])


def build(ns: str, tunnels: int, firewall: int, workdir: str) -> None:
    run(["ip", "netns", "add", ns])
    ip_batch(ns, SETUP.splitlines() + FOREIGN_IP.splitlines() + charon_lines(tunnels), workdir)
    for argv in FOREIGN_V6_RULES + [["rule", "add", "priority", "220", "table", "220"]]:
        run(["ip", "-n", ns, "-6", *argv])
    fw = "*filter\n" + "\n".join(updown_rules(firewall)) + "\nCOMMIT\n"
    run(["ip", "netns", "exec", ns, "iptables-nft-restore", "--noflush"], FOREIGN_FW + fw)
    run(["ip", "netns", "exec", ns, "nft", "-f", "-"], FOREIGN_NFT)


def remove(ns: str) -> None:
    subprocess.run(["ip", "netns", "del", ns], check=False)


class Clock:
    """Wall time and CPU time (user + system, with the programs we ran; only theirs with
    ONLY_CHILDREN) of what runs inside. CPU time barely moves when other work loads the machine."""

    def __init__(self, only_children: bool = False):
        self.only_children = only_children

    def _cpu(self) -> float:
        t = os.times()
        children = t.children_user + t.children_system
        return children if self.only_children else t.user + t.system + children

    def __enter__(self) -> "Clock":
        gc.collect()
        self.wall, self.cpu = time.perf_counter(), self._cpu()
        return self

    def __exit__(self, *exc) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, self._cpu() - self.cpu


def timed(fn) -> tuple[tuple[float, float], object]:
    with Clock() as clock:
        result = fn()
    return (clock.wall, clock.cpu), result


def ours(ns: str, tunnels: int, firewall: int, workdir: str) -> dict[str, tuple[float, float]]:
    with netns.enter(ns):
        t = {}
        t["read_state"], state = timed(lambda: read_state(ReadOptions()))
        snap_path = os.path.join(workdir, "snapshot.json")
        t["write_snapshot"], _ = timed(lambda: write_snapshot(snap_path, take_snapshot(state)))
        t["decide_ownership"], verdicts = timed(lambda: decide_ownership(state.objects))
        t["plan_flush"], plan = timed(lambda: plan_flush(state, verdicts, fail_closed=True))
        t["execute"], results = timed(lambda: execute(plan))
        after = read_state(ReadOptions())
    bad = [r for r in results if r.outcome is not Outcome.DONE]
    if bad:
        raise SystemExit(f"bench_flush: {len(bad)} actions did not succeed, first: "
                         f"{bad[0].action.describe()}: {bad[0].message}")
    owned = {name: len(verdicts.owned(name)) for name in state.objects}
    expected = {"xfrm_sa": 0, "xfrm_policy": 3 * tunnels, "route": tunnels, "rule": 2,
                "address": 0, "firewall": 2 * firewall}
    if owned != expected:
        raise SystemExit(f"bench_flush: judged owned {owned}, expected {expected}")
    foreign_before = {(name, r.key()) for name in state.objects for r, _ in verdicts.foreign(name)}
    left = {(name, r.key()) for name, recs in after.objects.items() for r in recs
            if not (name == "xfrm_policy" and is_supervisor_block(r))}
    blocks = sum(1 for r in after.objects["xfrm_policy"] if is_supervisor_block(r))
    if left != foreign_before or blocks != 2 * tunnels:
        raise SystemExit(f"bench_flush: after the flush {len(left - foreign_before)} unexpected and "
                         f"{len(foreign_before - left)} missing objects, {blocks} blocks")
    t["actions"] = (len(plan), len(plan))
    return t


def baseline(ns: str, tunnels: int, firewall: int, workdir: str) -> dict[str, tuple[float, float]]:
    with Clock(only_children=True) as ip:
        ip_batch(ns, delete_lines(tunnels), workdir)
        run(["ip", "-n", ns, "-6", "rule", "del", "priority", "220", "table", "220"])
    script = "*filter\n" + "\n".join("-D" + r[2:] for r in updown_rules(firewall)) + "\nCOMMIT\n"
    with Clock(only_children=True) as fw:
        run(["ip", "netns", "exec", ns, "iptables-nft-restore", "--noflush"], script)
    return {"ip -batch": (ip.wall, ip.cpu), "iptables-restore": (fw.wall, fw.cpu)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tunnels", type=int, default=10000, help="leftover tunnels (default 10000)")
    parser.add_argument("--firewall", type=int, default=100,
                        help="tunnels with updown firewall rules, 2 rules each (default 100)")
    parser.add_argument("--runs", type=int, default=1, help="runs; the best of each phase counts")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_flush: needs root (creates a network namespace)", file=sys.stderr)
        return 4
    if args.firewall > args.tunnels:
        parser.error("--firewall cannot exceed --tunnels")
    best: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-flush-") as workdir:
        for _ in range(args.runs):
            for phase, fn in (("ours", ours), ("baseline", baseline)):
                ns = f"ipsv-bench-{os.getpid()}-{uuid.uuid4().hex[:6]}"
                try:
                    build(ns, args.tunnels, args.firewall, workdir)
                    for name, (wall, cpu) in fn(ns, args.tunnels, args.firewall, workdir).items():
                        old_wall, old_cpu = best.get(name, (wall, cpu))
                        best[name] = (min(old_wall, wall), min(old_cpu, cpu))
                finally:
                    remove(ns)
    actions = int(best.pop("actions")[0])
    ip_time, fw_time = best.pop("ip -batch"), best.pop("iptables-restore")
    print(f"{args.tunnels} tunnels: {3 * args.tunnels} policies, {args.tunnels} table-220 routes, "
          f"2 rules, {2 * args.firewall} updown firewall rules, plus foreign state; "
          f"{actions} plan actions (fail-closed); best of {args.runs} run(s); load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"  {'phase':<44} {'wall':>8} {'cpu':>8}")
    for name, (wall, cpu) in best.items():
        print(f"  {name:<44} {wall:7.3f}s {cpu:7.3f}s")
    total = tuple(sum(v[k] for v in best.values()) for k in (0, 1))
    print(f"  {'total: snapshot + plan + flush (goal <= 2 s)':<44} {total[0]:7.3f}s {total[1]:7.3f}s")
    print("same-run baseline deleting the same objects (no fail-closed blocks; cpu = the tools'):")
    print(f"  {'ip -batch (policies, routes, rules)':<44} {ip_time[0]:7.3f}s {ip_time[1]:7.3f}s")
    print(f"  {'iptables-nft-restore --noflush (-D lines)':<44} {fw_time[0]:7.3f}s {fw_time[1]:7.3f}s")
    base = (ip_time[0] + fw_time[0], ip_time[1] + fw_time[1])
    print(f"ratio execute / baseline:  wall {best['execute'][0] / base[0]:5.2f}  cpu {best['execute'][1] / base[1]:5.2f}")
    print(f"ratio total / baseline:    wall {total[0] / base[0]:5.2f}  cpu {total[1] / base[1]:5.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
