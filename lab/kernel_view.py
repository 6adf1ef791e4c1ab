"""The lab's kernel state as iproute2/iptables print it: SAs, policies, table-220 routes, rules.

One shell process per look (process starts are expensive in the emulated VM), parsed by pure
functions.  Deliberately independent of the supervisor's own kernel layer: the tests judge
the supervisor with a second opinion.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .topology import OUTER_IF, sh_in

SECTIONS = {
    "sa": "ip xfrm state",
    "policy": "ip xfrm policy",
    "route220": "ip route show table 220",
    "route100": "ip route show table 100",
    "rule": "ip rule",
    "fw": "iptables -S",
    "addr": "ip -o addr show dev lo",
}


@dataclass(frozen=True, slots=True)
class SA:
    src: str
    dst: str
    proto: str
    spi: int
    reqid: int

    def describe(self) -> str:
        return f"SA spi=0x{self.spi:08x} {self.src}->{self.dst} reqid {self.reqid}"


@dataclass(frozen=True, slots=True)
class Policy:
    src: str
    dst: str
    dir: str
    priority: int
    action: str         # allow | block
    reqid: int | None   # of the first template, if any

    def describe(self) -> str:
        tmpl = f" reqid {self.reqid}" if self.reqid is not None else ""
        return f"policy {self.src}->{self.dst} dir {self.dir} prio {self.priority} {self.action}{tmpl}"


@dataclass(frozen=True, slots=True)
class SiteView:
    """One namespace's state at one moment."""

    sas: tuple[SA, ...]
    policies: tuple[Policy, ...]          # per-socket policies left out
    routes220: tuple[str, ...]
    routes100: tuple[str, ...]
    rules: tuple[str, ...]
    firewall: tuple[str, ...]             # iptables -S lines
    addresses: tuple[str, ...]            # addresses on lo

    def counts(self) -> dict[str, int]:
        """Counts of what a charon installs (the leftover families the report shows)."""
        return {
            "SAs": len([sa for sa in self.sas if not is_foreign_sa(sa)]),
            "policies": len([p for p in self.policies if not is_foreign_policy(p)]),
            "table-220 routes": len([r for r in self.routes220 if not is_foreign_line(r)]),
            "rule 220": len([r for r in self.rules if r.startswith("220:")]),
            "updown fw rules": len([r for r in self.firewall if "--pol ipsec" in r and not is_foreign_line(r)]),
        }


def read_view(netns: str) -> SiteView:
    script = "".join(f"echo '### {name}'; {cmd} 2>&1 || true\n" for name, cmd in SECTIONS.items())
    return parse_view(sh_in(netns, script).stdout)


def split_sections(text: str) -> dict[str, str]:
    out: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("### "):
            current = line[4:].strip()
            out[current] = []
        elif current is not None:
            out[current].append(line)
    return {k: "\n".join(v) for k, v in out.items()}


def _blocks(text: str) -> list[str]:
    """iproute2 xfrm output: a block starts with an unindented line."""
    blocks: list[list[str]] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        if not line[0].isspace() or not blocks:
            blocks.append([line])
        else:
            blocks[-1].append(line)
    return ["\n".join(b) for b in blocks]


_SA_HEAD = re.compile(r"^src (\S+) dst (\S+)")
_SA_ID = re.compile(r"proto (\w+) spi (0x[0-9a-f]+) reqid (\d+)")
_POL_HEAD = re.compile(r"^src (\S+) dst (\S+)")
_POL_DIR = re.compile(r"^\s*dir (\w+) (?:action \w+ )?priority (\d+)")
_POL_ACTION = re.compile(r"action (\w+)")
_POL_REQID = re.compile(r"reqid (\d+)")


def parse_sas(text: str) -> tuple[SA, ...]:
    out = []
    for b in _blocks(text):
        h, i = _SA_HEAD.match(b), _SA_ID.search(b)
        if h and i:
            out.append(SA(h.group(1), h.group(2), i.group(1), int(i.group(2), 16), int(i.group(3))))
    return tuple(out)


def parse_policies(text: str) -> tuple[Policy, ...]:
    out = []
    for b in _blocks(text):
        lines = b.splitlines()
        h = _POL_HEAD.match(lines[0])
        d = next((m for m in (_POL_DIR.match(l) for l in lines[1:]) if m), None)
        if not h or not d:
            continue   # per-socket policies print "socket in", not "dir in"
        a = _POL_ACTION.search(b)
        r = _POL_REQID.search(b)
        out.append(Policy(h.group(1), h.group(2), d.group(1), int(d.group(2)),
                          a.group(1) if a else "allow", int(r.group(1)) if r else None))
    return tuple(out)


def parse_view(text: str) -> SiteView:
    s = split_sections(text)

    def lines(name: str) -> tuple[str, ...]:
        return tuple(l.strip() for l in s.get(name, "").splitlines() if l.strip())

    return SiteView(
        sas=parse_sas(s.get("sa", "")),
        policies=parse_policies(s.get("policy", "")),
        routes220=lines("route220"),
        routes100=lines("route100"),
        rules=lines("rule"),
        firewall=tuple(l for l in lines("fw") if l.startswith("-A ")),
        addresses=lines("addr"),
    )


def stale_sas(view: SiteView, child_sas: list[dict]) -> tuple[SA, ...]:
    """ESP SAs in the kernel that the running charon does not report (leftovers of a dead one).

    SAs with reqid 0 are left out: the lab configures reqids, so those are SPIs charon
    reserved (GETSPI) for an exchange that never finished; the kernel expires them itself."""
    known = {c["spi_in"] for c in child_sas} | {c["spi_out"] for c in child_sas}
    return tuple(sa for sa in view.sas if sa.proto == "esp" and sa.spi not in known
                 and not is_foreign_sa(sa) and sa.reqid != 0)


# --- foreign state: another tool's objects in moon, which recovery must never touch -------------
#
# Two sets.  FOREIGN_SCRIPT runs before the supervisor starts and matches none of charon's
# markers (at its first start, without a ledger, the supervisor may judge leftovers by
# markers alone).  LOOKALIKE_SCRIPT runs while the supervisor watches and looks exactly like
# charon's state (SPI range, priority band, table 220 with protocol static, updown rule):
# only the ledger's attribution (who added it) can tell.

FOREIGN_SPIS = (0x00007001, 0xc0007002)
FOREIGN_PEER = "198.51.100.7"
FOREIGN_SCRIPT = f"""
ip xfrm state add src 192.0.2.1 dst {FOREIGN_PEER} proto esp spi {FOREIGN_SPIS[0]:#010x} reqid 7001 mode tunnel \\
    aead 'rfc4106(gcm(aes))' 0x{'42' * 20} 128
ip xfrm policy add src 10.9.0.0/16 dst 10.8.0.0/16 dir out priority 1000 action block
ip route add 10.8.0.0/16 via 192.0.2.9 dev {OUTER_IF} table 100
ip rule add priority 100 to 10.8.0.0/16 table 100
ip addr add 10.7.7.7/32 dev lo
iptables -A INPUT -p tcp --dport 22 -j ACCEPT
iptables -I FORWARD 1 -s 10.8.0.0/16 -d 10.9.0.0/16 -m policy --dir in --pol ipsec --reqid 7001 --proto esp -j ACCEPT
"""
LOOKALIKE_SCRIPT = f"""
ip xfrm state add src {FOREIGN_PEER} dst 192.0.2.1 proto esp spi {FOREIGN_SPIS[1]:#010x} reqid 7002 mode tunnel \\
    aead 'rfc4106(gcm(aes))' 0x{'43' * 20} 128
ip xfrm policy add src 10.9.1.0/24 dst 10.8.1.0/24 dir out priority 375423 \\
    tmpl src 192.0.2.1 dst {FOREIGN_PEER} proto esp reqid 7002 mode tunnel
ip route add 10.8.1.0/24 via 192.0.2.9 dev {OUTER_IF} proto static table 220
iptables -I INPUT 1 -i {OUTER_IF} -s 10.8.1.0/24 -d 10.9.1.0/24 -m policy --dir in --pol ipsec --reqid 7002 --proto esp -j ACCEPT
"""


def add_foreign_state(netns: str) -> None:
    """Another tool's SA, policy, route, rule, address and firewall rules, unlike charon's."""
    sh_in(netns, FOREIGN_SCRIPT)


def add_lookalike_state(netns: str) -> None:
    """Another tool's state shaped like charon's (add it while the supervisor watches)."""
    sh_in(netns, LOOKALIKE_SCRIPT)


def is_foreign_sa(sa: SA) -> bool:
    return sa.spi in FOREIGN_SPIS


def is_foreign_policy(p: Policy) -> bool:
    return p.src.startswith("10.9.")


def is_foreign_line(line: str) -> bool:
    """A route or firewall rule line of the foreign sets."""
    return "10.8." in line or "--dport 22" in line


def foreign_objects(view: SiteView) -> dict[str, tuple]:
    """The foreign objects as they appear in ``view`` (compare before and after)."""
    return {
        "SAs": tuple(sa for sa in view.sas if is_foreign_sa(sa)),
        "policies": tuple(p for p in view.policies if is_foreign_policy(p)),
        "routes": tuple(r for r in view.routes100 + view.routes220 if is_foreign_line(r)),
        "rule 100": tuple(r for r in view.rules if r.startswith("100:")),
        "address 10.7.7.7": tuple(a for a in view.addresses if "10.7.7.7/32" in a),
        "firewall": tuple(r for r in view.firewall if is_foreign_line(r)),
    }


def foreign_changes(before: SiteView, after: SiteView) -> list[str]:
    """What happened to the foreign objects between two views: [] when all are intact."""
    a, b = foreign_objects(before), foreign_objects(after)
    out = []
    for kind in a:
        gone = [x.describe() if hasattr(x, "describe") else str(x) for x in a[kind] if x not in b[kind]]
        if not a[kind]:
            out.append(f"{kind}: none there at the start (the lab's foreign state is incomplete)")
        elif gone:
            out.append(f"{kind} gone: {'; '.join(gone)}")
    return out
