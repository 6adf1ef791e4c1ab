"""The lab's network: two namespaces (moon, sun) joined by a veth pair, subnets behind each.

moon 192.0.2.1 (out0) <-> sun 192.0.2.2 (out0).  Each tunnel has its own /24 behind each
side (10.1.N.0/24 behind moon, 10.2.N.0/24 behind sun) with one host address on lo (the
`dummy` link type may be missing).  Plain routes send the other side's subnets over out0,
so a packet no IPsec policy catches leaves in cleartext, where the capture sees it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass

OUTER_IF = "out0"
MOON_OUTER = "192.0.2.1"
SUN_OUTER = "192.0.2.2"
MOON_NETS = "10.1.0.0/16"   # every tunnel's moon-side subnet lies in here
SUN_NETS = "10.2.0.0/16"


@dataclass(frozen=True, slots=True)
class Tunnel:
    """One IPsec tunnel (an IKE_SA with one CHILD_SA) and who starts it."""

    name: str           # also the swanctl connection and child name
    index: int          # N in 10.1.N.0/24 and 10.2.N.0/24; also the configured reqid
    moon_action: str    # swanctl start_action on moon: start | none | trap
    sun_action: str     # the same on sun

    @property
    def moon_net(self) -> str:
        return f"10.1.{self.index}.0/24"

    @property
    def sun_net(self) -> str:
        return f"10.2.{self.index}.0/24"

    @property
    def moon_host(self) -> str:
        return f"10.1.{self.index}.1"

    @property
    def sun_host(self) -> str:
        return f"10.2.{self.index}.1"

    @property
    def role(self) -> str:
        """moon's role in this tunnel: initiator, responder or trap."""
        return {"start": "initiator", "trap": "trap"}.get(self.moon_action, "responder")


# The three cases the tests and the benchmark look at, by moon's role.
TUNNELS = {
    "initiator": Tunnel("init", 1, moon_action="start", sun_action="none"),
    "responder": Tunnel("resp", 2, moon_action="none", sun_action="start"),
    "trap": Tunnel("trap", 3, moon_action="trap", sun_action="trap"),
}


@dataclass(frozen=True, slots=True)
class Site:
    """One side of the lab: a namespace with its outer address and its peer's."""

    name: str       # "moon" | "sun"
    netns: str      # the namespace's name under /run/netns
    outer: str
    peer: str
    local_nets: str   # supernet of this side's tunnel subnets
    remote_nets: str


@dataclass(frozen=True, slots=True)
class Lab:
    moon: Site
    sun: Site
    tunnels: tuple[Tunnel, ...]

    @property
    def sites(self) -> tuple[Site, Site]:
        return (self.moon, self.sun)

    def tunnel(self, role: str) -> Tunnel:
        for t in self.tunnels:
            if t.role == role:
                return t
        raise KeyError(f"the lab has no {role} tunnel (it has {', '.join(t.role for t in self.tunnels)})")


def make_lab(roles: tuple[str, ...] = ("initiator", "responder", "trap"), prefix: str = "ipsvlab") -> Lab:
    """The lab's description with fresh namespace names (nothing is created yet)."""
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:4]}"
    unknown = [r for r in roles if r not in TUNNELS]
    if unknown or not roles:
        raise ValueError(f"tunnel roles must be some of {', '.join(TUNNELS)}, not {roles!r}")
    return Lab(
        moon=Site("moon", f"{prefix}-moon-{tag}", MOON_OUTER, SUN_OUTER, MOON_NETS, SUN_NETS),
        sun=Site("sun", f"{prefix}-sun-{tag}", SUN_OUTER, MOON_OUTER, SUN_NETS, MOON_NETS),
        tunnels=tuple(TUNNELS[r] for r in roles),
    )


MAX_SCALE_TUNNELS = 250   # N of 10.1.N.0/24 stays a byte, clear of the three role tunnels' names


def scale_tunnels(count: int) -> tuple[Tunnel, ...]:
    """COUNT tunnels t1..tN, alternately moon initiator (odd N) and moon responder (even N).

    sun starts none by itself (start_action none): the lab initiates its side once moon's
    charon is up (``lab.scenario.bring_up_many``), instead of waiting out retransmissions
    of a hundred IKE_SA_INITs sent while moon had no charon."""
    if not 1 <= count <= MAX_SCALE_TUNNELS:
        raise ValueError(f"a scale lab has 1..{MAX_SCALE_TUNNELS} tunnels (one /24 per side each), not {count}")
    return tuple(Tunnel(f"t{i}", i, moon_action="start" if i % 2 else "none", sun_action="none")
                 for i in range(1, count + 1))


def ping_sample(tunnels: tuple[Tunnel, ...], size: int) -> tuple[Tunnel, ...]:
    """SIZE tunnels to ping, spread evenly over each of moon's roles (half each, as far as they go)."""
    by_role: dict[str, list[Tunnel]] = {}
    for t in tunnels:
        by_role.setdefault(t.role, []).append(t)
    roles = sorted(by_role)
    out: list[Tunnel] = []
    for i, role in enumerate(roles):
        group = by_role[role]
        want = min(len(group), size // len(roles) + (1 if i < size % len(roles) else 0))
        out += [group[j * len(group) // want] for j in range(want)] if want else []
    return tuple(sorted(out, key=lambda t: t.index))


def make_scale_lab(count: int, prefix: str = "ipsvlab") -> Lab:
    """A lab of COUNT tunnels (``scale_tunnels``) with fresh namespace names."""
    lab = make_lab(("initiator",), prefix=prefix)
    return Lab(lab.moon, lab.sun, scale_tunnels(count))


def in_netns(netns: str, *argv: str) -> list[str]:
    """argv run inside ``netns``.

    nsenter rather than ``ip netns exec``: no remount of /sys, which costs a good part
    of a second per command in the emulated VM."""
    return ["nsenter", f"--net=/run/netns/{netns}", "--", *argv]


def run_in(netns: str, *argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(in_netns(netns, *argv), capture_output=True, text=True, check=check, timeout=timeout)


def sh_in(netns: str, script: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run a shell script inside ``netns``; one process start for many commands (the VM is slow)."""
    proc = run_in(netns, "sh", "-ec", script, check=False, timeout=timeout)
    if check and proc.returncode != 0:
        raise LabError(f"script in namespace {netns} failed (exit {proc.returncode}): "
                       f"{proc.stderr.strip() or proc.stdout.strip()}\nscript:\n{script}")
    return proc


class LabError(RuntimeError):
    """The lab could not be built or driven (the message says which step and why)."""


def site_script(lab: Lab, site: Site) -> str:
    """Shell commands that give ``site``'s namespace its addresses and plain routes."""
    lines = [
        "ip link set lo up",
        f"ip link set {OUTER_IF} up",
        f"ip addr add {site.outer}/24 dev {OUTER_IF}",
        # Cleartext path to the other side's subnets: only IPsec policies keep packets off it.
        f"ip route add {site.remote_nets} via {site.peer} dev {OUTER_IF}",
        # The lab's own sysctls: no redirects or rp_filter surprises on the shared /24.
        "sysctl -qw net.ipv4.conf.all.send_redirects=0 net.ipv4.conf.all.rp_filter=0",
        f"sysctl -qw net.ipv4.conf.{OUTER_IF}.rp_filter=0",
    ]
    for t in lab.tunnels:
        host = t.moon_host if site.name == "moon" else t.sun_host
        lines.append(f"ip addr add {host}/32 dev lo")
    return "\n".join(lines) + "\n"


PEER_GUARD_GROUP = 7   # NFLOG group of the peer guard's copies (lab.traffic.GuardLog reads them)


def peer_guard_script(site: Site) -> str:
    """Shell commands giving ``site`` its own fail-closed guard, the iptables rule strongSwan
    recommends against leaks: a packet between the two sides' subnets that leaves without an IPsec
    policy is dropped (a copy goes to NFLOG group PEER_GUARD_GROUP first, so the lab sees what the
    guard stopped, and when).

    sun gets it because a strongSwan responder leaks by itself whenever moon's charon comes back:
    on an IKE_AUTH with INITIAL_CONTACT it destroys the old IKE_SA with its CHILD_SAs, policies
    included (ike_sa_manager's check_uniqueness, from the ike_auth task), and installs the new
    CHILD_SA only afterwards (the child_create task of the same exchange).  Of those 10-25 ms,
    the moment between removing the policies and the inbound SA (child_sa's destroy does them in
    that order) is a leak: a reply to a packet sun still decrypted takes the plain route.  Whatever restarts moon (strongSwan's
    own starter too) makes sun go through it; moon's supervisor cannot reach into sun's kernel.
    The tests check that the guard stopped nothing but packets of those windows
    (lab.report.guard_hits_outside_windows), so it hides no other leak."""
    match = f"-s {site.local_nets} -d {site.remote_nets} -m policy --dir out --pol none"
    return (f"iptables -w -A OUTPUT {match} -j NFLOG --nflog-group {PEER_GUARD_GROUP} --nflog-threshold 1\n"
            f"iptables -w -A OUTPUT {match} -j DROP\n")


def build_lab(lab: Lab, extra: dict[str, str] | None = None) -> None:
    """Create both namespaces, the veth pair between them, addresses and routes.

    ``extra``: more shell commands per site name, run in the same shell (one process start)."""
    try:
        for site in lab.sites:
            _run("ip", "netns", "add", site.netns)
        _run("ip", "-n", lab.moon.netns, "link", "add", OUTER_IF, "type", "veth",
             "peer", "name", OUTER_IF, "netns", lab.sun.netns)
        for site in lab.sites:
            # one `ip` per tunnel address: under emulation 200 of them can take a minute
            sh_in(site.netns, site_script(lab, site) + (extra or {}).get(site.name, ""),
                  timeout=60 + len(lab.tunnels))
    except BaseException:
        remove_lab(lab)
        raise


def _run(*argv: str) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise LabError(f"{' '.join(argv)} failed (exit {proc.returncode}): {proc.stderr.strip()}")


def netns_pids(netns: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out if p.isdigit()]


def kill_netns_processes(netns: str, wait: float = 5.0) -> None:
    """SIGKILL whatever still runs in ``netns`` (only processes of the lab can be in it)."""
    deadline = time.monotonic() + wait
    while True:
        pids = netns_pids(netns)
        if not pids or time.monotonic() > deadline:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


def remove_lab(lab: Lab) -> None:
    """Kill the lab's processes and delete both namespaces (the veth pair goes with them)."""
    for site in lab.sites:
        if os.path.exists(f"/run/netns/{site.netns}"):
            kill_netns_processes(site.netns)
            subprocess.run(["ip", "netns", "del", site.netns], capture_output=True)


def lab_namespaces_left(prefix: str = "ipsvlab") -> list[str]:
    """Names of namespaces made by labs with ``prefix`` that still exist (for leak checks)."""
    try:
        return sorted(n for n in os.listdir("/run/netns") if n.startswith(prefix + "-"))
    except FileNotFoundError:
        return []
