"""The programs that drive strongSwan's `ipsec` today, run unchanged against ours.

Each "node" is a host as such a program sees it: a network namespace, a private /run, a
copy-on-write /etc (overlayfs over the machine's own), and our `ipsec` where strongSwan's script
lives, /usr/sbin/ipsec (what the Debian package's dpkg-divert does, here in a private mount
namespace only). Real charon runs under our supervisor there.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid

import pytest

from charon_ns import CHARON, ROOT

OVS_MONITOR = "/usr/share/openvswitch/scripts/ovs-monitor-ipsec"
OUR_IPSEC = os.path.join(os.path.dirname(sys.executable), "ipsec")

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, mounts)"),
    pytest.mark.skipif(not os.path.exists(CHARON), reason="needs strongSwan's charon"),
]


def wait_for(pred, what: str, timeout: float = 20.0, poll: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(poll)


class Node:
    """One host: netns, private /run, overlay /etc, our ipsec at /usr/sbin/ipsec; `program` is its pid 1."""

    def __init__(self, workdir: str, address: str):
        self.dir = workdir
        self.netns = f"rc-{uuid.uuid4().hex[:8]}"
        self.address = address
        for d in ("etc-up", "etc-work", "state"):
            os.makedirs(os.path.join(workdir, d), exist_ok=True)
        subprocess.run(["ip", "netns", "add", self.netns], check=True)
        self.sh_host(f"ip link set lo up; ip link add v0 type veth peer name v1; ip link set v0 up; "
                     f"ip link set v1 up; ip addr add {address}/24 dev v0")
        self.proc: subprocess.Popen | None = None

    def p(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def sh_host(self, script: str) -> None:
        subprocess.run(["ip", "netns", "exec", self.netns, "sh", "-ec", script], check=True)

    def start(self, setup: str, program: list[str], env: dict[str, str] | None = None) -> None:
        """Mounts, our configuration, SETUP (shell), then exec PROGRAM as the node's anchor process."""
        script = f"""
set -e
mount -t tmpfs tmpfs /run
mount -t overlay overlay -o lowerdir=/etc,upperdir={self.p('etc-up')},workdir={self.p('etc-work')} /etc
mount --bind {shlex.quote(OUR_IPSEC)} /usr/sbin/ipsec
mkdir -p /etc/ipsec-supervisor
printf 'paths: {{state_dir: {self.p('state')}}}\\n' > /etc/ipsec-supervisor/supervisor.yaml
{setup}
exec {' '.join(shlex.quote(a) for a in program)}
"""
        self.log = open(self.p("node.log"), "w")
        e = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_SOCKET", "WATCHDOG", "IPSEC_SUP"))}
        e.update(env or {})
        self.proc = subprocess.Popen(["ip", "netns", "exec", self.netns, "unshare", "-m", "--propagation", "private",
                                      "sh", "-c", script], stdout=self.log, stderr=subprocess.STDOUT, env=e,
                                     cwd=self.dir)

    def run(self, *argv: str, check: bool = False, timeout: float = 120) -> subprocess.CompletedProcess:
        """A command inside the node (its mounts and network)."""
        assert self.proc is not None
        res = subprocess.run(["nsenter", "-t", str(self.proc.pid), "-m", "-n", *argv], capture_output=True,
                             text=True, timeout=timeout)
        if check and res.returncode:
            raise AssertionError(f"{argv}: exit {res.returncode}: {res.stdout}{res.stderr}")
        return res

    def read(self, path: str) -> str:
        return self.run("cat", path).stdout

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.run("ipsec", "stop", timeout=60)
        pids = subprocess.run(["ip", "netns", "pids", self.netns], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc is not None:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        subprocess.run(["ip", "netns", "del", self.netns], check=False)


@pytest.fixture
def node(tmp_path):
    made: list[Node] = []

    def make(name: str, address: str) -> Node:
        n = Node(str(tmp_path / name), address)
        made.append(n)
        return n
    yield make
    for n in made:
        n.cleanup()


# ---------------------------------------------------------------------------------------------
# Open vSwitch: ovs-monitor-ipsec --ike-daemon=strongswan (Debian's openvswitch-ipsec)

class OvsNode:
    def __init__(self, n: Node):
        self.n = n
        setup = """
mkdir -p /run/openvswitch
ovsdb-tool create /run/openvswitch/conf.db /usr/share/openvswitch/vswitch.ovsschema
ovsdb-server --remote=punix:/run/openvswitch/db.sock --pidfile=/run/openvswitch/ovsdb-server.pid \
  --detach --log-file={log} /run/openvswitch/conf.db
ovs-vsctl --no-wait init
""".format(log=n.p("ovsdb.log"))
        n.start(setup, [OVS_MONITOR, "--ike-daemon=strongswan", "--pidfile=/run/openvswitch/ovs-monitor-ipsec.pid",
                        f"--log-file={n.p('monitor.log')}", "unix:/run/openvswitch/db.sock"])

    def vsctl(self, *args: str) -> None:
        self.n.run("ovs-vsctl", "--no-wait", *args, check=True)

    def monitor_log(self) -> str:
        try:
            with open(self.n.p("monitor.log")) as fh:
                return fh.read()
        except FileNotFoundError:
            return ""

    def active_conns(self) -> list[str]:
        """What the monitor itself believes is active: its parse of `ipsec status` (tunnels/show)."""
        ctl = f"/run/openvswitch/ovs-monitor-ipsec.{self.n.proc.pid}.ctl"
        out = self.n.run("ovs-appctl", "-t", ctl, "tunnels/show", check=True).stdout
        if "IPsec connections that are active:" not in out:
            return []                               # no tunnel in OVSDB: nothing shown
        part = out.split("IPsec connections that are active:", 1)[1]
        return sorted({m.group(1) for m in re.finditer(r"^\s+(\S+)\{\d+\}:", part, re.M)})

    def swanctl_conns(self) -> set[str]:
        out = self.n.run("swanctl", "--list-conns").stdout
        return set(re.findall(r"^(\S+): IKEv", out, re.M))

    def trap_count(self) -> int:
        out = self.n.run("ip", "xfrm", "policy").stdout
        return len(re.findall(r"proto gre", out))


@pytest.mark.skipif(not os.path.exists(OVS_MONITOR) or not shutil.which("ovsdb-server"),
                    reason="needs Debian's openvswitch-ipsec and openvswitch-switch")
def test_open_vswitch_s_ipsec_monitor_drives_our_ipsec_unchanged(node):
    ovs = OvsNode(node("ovs", "192.0.2.1"))
    n = ovs.n
    # Its start-up: an ipsec.conf with no conn, then `ipsec restart`.
    wait_for(lambda: "Restarting StrongSwan" in ovs.monitor_log(), "the monitor's restart")
    wait_for(lambda: n.run("ipsec", "status").returncode == 0, "charon running after the monitor's restart")
    assert "conn tun" not in n.read("/etc/ipsec.conf")

    started = time.monotonic()
    ovs.vsctl("add-br", "br0", "--", "add-port", "br0", "tun1", "--", "set", "interface", "tun1", "type=gre",
              "options:remote_ip=192.0.2.2", "options:psk=swordfish")
    wait_for(lambda: "tun1-1" in ovs.swanctl_conns(), "tun1-1 in swanctl --list-conns")
    appeared = time.monotonic() - started
    print(f"tun1-1 reached charon {appeared * 1000:.0f} ms after ovs-vsctl")
    wait_for(lambda: ovs.active_conns() == ["tun1-1"], "the monitor to see tun1-1 active")
    assert ovs.trap_count() == 2                    # transport-mode trap: in and out, proto gre

    # A change: the monitor writes version 2 and takes version 1 down.
    ovs.vsctl("set", "interface", "tun1", "options:psk=another-secret")
    wait_for(lambda: ovs.swanctl_conns() == {"tun1-2"}, "tun1-2 replacing tun1-1 in charon")
    wait_for(lambda: ovs.active_conns() == ["tun1-2"], "the monitor to see tun1-2 only")

    # kill -9 of charon: the supervisor restarts it and loads ipsec.conf again; the monitor's view stays right.
    pid = int(n.read("/run/charon.pid"))
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: n.read("/run/charon.pid").strip() not in ("", str(pid)) and "tun1-2" in ovs.swanctl_conns(),
             "charon back with tun1-2")
    wait_for(lambda: ovs.active_conns() == ["tun1-2"], "the monitor's view after the restart")
    assert ovs.trap_count() == 2                    # once: no duplicate after the recovery

    # The tunnel goes away.
    ovs.vsctl("del-port", "br0", "tun1")
    wait_for(lambda: not ovs.swanctl_conns(), "tun1-2 unloaded")
    wait_for(lambda: ovs.active_conns() == [], "the monitor to see nothing active")
    assert ovs.trap_count() == 0
    assert "failed to update configuration" not in ovs.monitor_log(), ovs.monitor_log()


# ---------------------------------------------------------------------------------------------
# OpenStack neutron-vpnaas: its strongSwan driver, through its netns wrapper and rootwrap

NEUTRON_VENV = os.path.join(ROOT, ".cache", "neutron-venv")
NEUTRON_PY = os.path.join(NEUTRON_VENV, "bin", "python")
NEUTRON_DRIVER = os.path.join(ROOT, "tests", "neutron_driver.py")


def run_neutron_routers(tmp_path, routers: list[tuple[str, str, list[str]]], ours: bool) -> dict[str, dict]:
    """One L3-agent-like process per router, all at once, in a mount namespace of their own.

    /etc is a copy-on-write view with rootwrap's vpnaas filters in /etc/neutron (as the
    package installs them), /var/lib/ipsec-supervisor is a scratch directory shared by all
    routers (Neutron shares /var/lib), and /usr/sbin/ipsec is ours or strongSwan's script.
    """
    work = tmp_path / ("ours" if ours else "strongswan")
    for d in ("etc-up", "etc-work", "state", "base"):
        (work / d).mkdir(parents=True)
    os.makedirs("/var/lib/ipsec-supervisor", mode=0o700, exist_ok=True)   # the mount point
    bin_dir = os.path.join(NEUTRON_VENV, "bin")
    script = f"""
set -e
mount -t overlay overlay -o lowerdir=/etc,upperdir={work}/etc-up,workdir={work}/etc-work /etc
mkdir -p /etc/neutron/rootwrap.d
cp {NEUTRON_VENV}/etc/neutron/rootwrap.d/vpnaas.filters /etc/neutron/rootwrap.d/
printf '[DEFAULT]\\nfilters_path=/etc/neutron/rootwrap.d\\nexec_dirs=/sbin,/usr/sbin,/bin,/usr/bin,{bin_dir}\\nuse_syslog=False\\n' \
  > /etc/neutron/rootwrap.conf
{f'mount --bind {shlex.quote(OUR_IPSEC)} /usr/sbin/ipsec' if ours else ': strongSwan script'}
mount --bind {work}/state /var/lib/ipsec-supervisor
pids=
"""
    for rid, ext_ip, extra in routers:
        script += (f"{NEUTRON_PY} {NEUTRON_DRIVER} {rid} {work}/base {ext_ip} 203.0.113.99 {' '.join(extra)} "
                   f"> {work}/{rid}.json 2> {work}/{rid}.log &\npids=\"$pids $!\"\n")
    script += "for p in $pids; do wait $p; done\n"
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}")
    # A PID namespace: the netns wrapper compares its network namespace with /proc/1's, which
    # must be readable (it is not on every machine: here PID 1 is the wrapper's own init).
    subprocess.run(["unshare", "-m", "-p", "-f", "--mount-proc", "--propagation", "private", "sh", "-c", script],
                   check=True, env=env, timeout=600)
    results = {}
    for rid, _ip, _extra in routers:
        text = (work / f"{rid}.json").read_text()
        assert text, (work / f"{rid}.log").read_text()[-3000:]
        results[rid] = json.loads(text)
    return results


@pytest.fixture
def routers():
    made: list[str] = []

    def make(rid: str, ext_ip: str) -> str:
        ns = f"qrouter-{rid}"
        subprocess.run(["ip", "netns", "add", ns], check=True)
        made.append(ns)
        subprocess.run(["ip", "netns", "exec", ns, "sh", "-ec",
                        f"ip link set lo up; ip link add v0 type veth peer name v1; ip link set v0 up; "
                        f"ip link set v1 up; ip addr add {ext_ip}/24 dev v0"], check=True)
        return rid
    yield make
    for ns in made:
        for pid in subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        subprocess.run(["ip", "netns", "del", ns], check=False)


def calls(result: dict) -> list[tuple[str, str, int, bool]]:
    """(step, command without the conn ids' router part, exit code, accepted)."""
    return [(c["step"], re.sub(r"^(stroke up-nb )\w{8}", r"\1ROUTER", c["cmd"]), c["exit"], c["accepted"])
            for c in result["calls"]]


def statuses(result: dict) -> dict[str, dict[str, str]]:
    return {s["step"]: {k[9:]: v for k, v in s["connections"].items()} for s in result["steps"] if "connections" in s}


@pytest.mark.skipif(not os.path.exists(NEUTRON_PY), reason="needs PyPI's neutron-vpnaas in .cache/neutron-venv "
                                                           "(tools/setup.sh makes it)")
def test_neutron_vpnaas_drives_two_routers_at_once_like_strongswans_script(tmp_path, routers):
    a = routers(f"a{uuid.uuid4().hex[:7]}-1111-4222-8333-444444444444", "203.0.113.10")
    b = routers(f"b{uuid.uuid4().hex[:7]}-1111-4222-8333-444444444444", "203.0.113.11")
    base = routers(f"c{uuid.uuid4().hex[:7]}-1111-4222-8333-444444444444", "203.0.113.12")
    # The baseline: strongSwan's own script and starter, same driver, same sequence.
    expected = run_neutron_routers(tmp_path, [(base, "203.0.113.12", [])], ours=False)[base]
    got = run_neutron_routers(tmp_path, [(a, "203.0.113.10", ["kill-charon-after-start"]),
                                         (b, "203.0.113.11", [])], ours=True)
    for rid, result in got.items():
        assert all(s["ok"] for s in result["steps"]), result["steps"]
        assert result["piddir"] == expected["piddir"] == "/var/run"
        mine = [c for c in calls(result) if c[0] != "status-after-kill"]
        assert mine == calls(expected), rid              # same commands, same exit codes, all accepted
        want = statuses(expected)
        assert {k: v for k, v in statuses(result).items() if k != "status-after-kill"} == want, rid
        # the driver's own regex found both sites of this router while charon ran
        assert len(want["status-after-start"]) == 2 and len(want["status-after-restart"]) == 2
    # Router a's charon was killed: the supervisor restarted it and the driver saw both sites again.
    after_kill = statuses(got[a])["status-after-kill"]
    assert len(after_kill) == 2, got[a]["steps"]
    # Each router's files are its own, in the one shared /var/lib (Neutron shares it).
    state = tmp_path / "ours" / "state"
    crashes = {p.parent.parent.name: p for p in state.glob("*/*/crashes/*.json")}
    assert set(crashes) == {f"qrouter-{a}"}, sorted(str(p) for p in state.rglob("*"))
