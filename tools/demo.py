"""Demonstration of the kernel-state layer on a lab namespace (interim `make demo`).

Builds a namespace holding what a crashed charon leaves behind (policies, a
table-220 route, the priority-220 rule, a virtual IP, updown firewall rules)
next to foreign state, snapshots it, deletes charon's objects one by one and
shows the diff: the foreign state is untouched.  Removes the namespace at the end.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from supervisor.kernel import netns  # noqa: E402
from supervisor.kernel_state import ReadOptions, delete_object, read_state  # noqa: E402
from supervisor.snapshot import diff_snapshots, take_snapshot, write_snapshot  # noqa: E402

LAB = """
ip link set lo up
ip link add veth0 type veth peer name veth1
ip link set veth0 up; ip link set veth1 up
ip addr add 192.0.2.1/24 dev veth0
ip addr add 10.1.0.1/32 dev lo                     # charon's virtual IP
for d in out in fwd; do
  if [ $d = out ]; then s=10.1.0.0/16; t=10.2.0.0/16; a=192.0.2.1; b=192.0.2.2;
  else s=10.2.0.0/16; t=10.1.0.0/16; a=192.0.2.2; b=192.0.2.1; fi
  ip xfrm policy add src $s dst $t dir $d priority 375423 tmpl src $a dst $b proto esp reqid 1 mode tunnel
done
ip route add 10.2.0.0/16 via 192.0.2.2 dev veth0 src 10.1.0.1 proto static table 220
ip rule add priority 220 table 220
iptables -I INPUT 1 -i veth0 -s 10.2.0.0/16 -d 10.1.0.0/16 -m policy --dir in --pol ipsec --reqid 1 --proto esp -j ACCEPT
iptables -I OUTPUT 1 -o veth0 -s 10.1.0.0/16 -d 10.2.0.0/16 -m policy --dir out --pol ipsec --reqid 1 --proto esp -j ACCEPT
# foreign state: another tool's policy, route, rule and firewall rule
ip xfrm policy add src 10.9.0.0/16 dst 10.8.0.0/16 dir out priority 1000 action block
ip route add 10.7.0.0/16 via 192.0.2.9 dev veth0 table 100
ip rule add priority 100 table 100
iptables -A INPUT -p tcp --dport 22 -j ACCEPT
"""


def main() -> int:
    name = f"ipsv-demo-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "sh", "-ec", LAB], check=True)
        with tempfile.TemporaryDirectory() as tmp, netns.enter(name):
            opts = ReadOptions(rule_priority=None)
            before = take_snapshot(read_state(opts))
            path = write_snapshot(os.path.join(tmp, "before.json"), before)
            print(f"lab namespace {name}: snapshot {path}")
            for fam, count in before.counts().items():
                print(f"  {fam:<12} {count}")
            print("deleting what charon would own (markers: priority band, table 220, "
                  "rule 220, updown firewall pattern, virtual IP 10.1.0.1):")
            for rec in owned_like(before):
                print(f"  {delete_object(rec).value:<12} {rec.describe()}")
            after = take_snapshot(read_state(opts))
            print("diff (before -> after):")
            for fam, d in diff_snapshots(before, after).items():
                for r in d.removed:
                    print(f"  - {r.describe()}")
            print("left in place (foreign):")
            for fam in ("xfrm_policy", "route", "rule", "firewall"):
                for r in after.objects[fam]:
                    print(f"  = {r.describe()}")
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)
    print(f"removed namespace {name}")
    return 0


def owned_like(snap):
    """A crude stand-in for the ownership ledger of the recovery issue."""
    for r in snap.objects["firewall"]:
        if getattr(r, "updown", None):
            yield r
    for r in snap.objects["xfrm_policy"]:
        if r.priority == 375423:
            yield r
    for r in snap.objects["route"]:
        yield r
    for r in snap.objects["rule"]:
        if r.priority == 220:
            yield r
    for r in snap.objects["address"]:
        if "10.1.0.1" in r.describe():
            yield r


if __name__ == "__main__":
    sys.exit(main())
