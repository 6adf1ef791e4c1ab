"""The programs that drive strongSwan's `ipsec` today, run unchanged against ours.

Each "node" is a host as such a program sees it: a network namespace, a private /run, a
copy-on-write /etc (overlayfs over the machine's own), and our `ipsec` where strongSwan's script
lives, /usr/sbin/ipsec (what the Debian package's dpkg-divert does, here in a private mount
namespace only). Real charon runs under our supervisor there.
"""

from __future__ import annotations

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
