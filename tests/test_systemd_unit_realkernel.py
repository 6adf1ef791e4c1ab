"""The hardened unit with a real tunnel: systemd 252 in a container, ESP in the VM's kernel.

moon is a systemd-nspawn container (tests/nspawn.py) sharing network namespace moon; it
runs etc/ipsec-supervisor.service with its whole sandbox and the test drop-in of
tests/test_systemd_unit.py, and its charon initiates a PSK tunnel to sun, a plain charon in
namespace sun (tests/charon_ns.py).  Pings cross the tunnel as ESP; after a kill -9 of
moon's charon the supervisor restarts it and the tunnel carries traffic again.

Run in the VM tier (the host kernel has no ESP):
tools/vm-run -- .venv/bin/pytest -m realkernel tests/test_systemd_unit_realkernel.py
"""

from __future__ import annotations

import os
import re
import subprocess
import time

import pytest

import nspawn
from charon_ns import start_charon
from test_systemd_unit import (DROP_IN, NET_CAPS, UNIT_NAME, _charon_pid, _proc_status, _props,
                               _supervisor_status, _wait, unit_text)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = [
    pytest.mark.realkernel,
    pytest.mark.skipif(nspawn.available() is not None, reason=nspawn.available() or ""),
]

SECRET = "0sFpZAZqEN6Ti9sqt4ZP5EWcqx"


def _conf(local: str, remote: str, local_ts: str, remote_ts: str, me: str, peer: str, start: bool) -> str:
    action = "\n        start_action = start" if start else ""
    return f"""\
connections {{
  hardened {{
    local_addrs = {local}
    remote_addrs = {remote}
    proposals = aes128-sha256-modp2048
    local {{ auth = psk
            id = {me} }}
    remote {{ auth = psk
             id = {peer} }}
    children {{ net {{
        local_ts = {local_ts}
        remote_ts = {remote_ts}
        esp_proposals = aes128-sha256{action}
    }} }}
  }}
}}
secrets {{ ike-1 {{ id-1 = moon
                  id-2 = sun
                  secret = {SECRET} }} }}
"""


MOON = _conf("192.168.0.1", "192.168.0.2", "10.1.0.1/32", "10.2.0.1/32", "moon", "sun", start=True)
SUN = _conf("192.168.0.2", "192.168.0.1", "10.2.0.1/32", "10.1.0.1/32", "sun", "moon", start=False)
# Emulation is ~40x slower than the host: the health probe gets the built-in (generous) limits.
SUPERVISOR_YAML = "restart:\n  okay_delay: 1s\n"


def _ensure_cgroups() -> None:
    """The VM boots without a cgroup hierarchy; nspawn needs one (a unified one is enough)."""
    if not nspawn._cgroup_roots() and os.environ.get("IPSV_REALKERNEL") == "1":
        subprocess.run(["mount", "-t", "cgroup2", "cgroup2", "/sys/fs/cgroup"], check=True)


def _installed_child(c) -> bool:
    out = c.run(["swanctl", "--list-sas"], check=False).stdout
    return "ESTABLISHED" in out and "INSTALLED" in out


def _ping(ns) -> subprocess.CompletedProcess:
    return ns.run("ping", "-c", "3", "-i", "0.3", "-W", "5", "-I", "10.1.0.1", "10.2.0.1", check=False)


def _esp_packets(ns) -> int:
    states = ns.run("ip", "-s", "xfrm", "state").stdout
    return sum(int(n) for n in re.findall(r"(\d+)\(packets\)", states)) if "proto esp" in states else 0


def test_hardened_unit_brings_up_a_tunnel_and_recovers_it_after_kill_9(netns_factory, tmp_path):
    _ensure_cgroups()
    moon, sun = netns_factory(), netns_factory()
    moon.run("ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1", "netns", sun.name)
    moon.sh("ip addr add 192.168.0.1/24 dev v0 && ip link set v0 up && ip addr add 10.1.0.1/32 dev lo")
    sun.sh("ip addr add 192.168.0.2/24 dev v1 && ip link set v1 up && ip addr add 10.2.0.1/32 dev lo")
    (tmp_path / "sun").mkdir()
    peer = start_charon(sun.name, str(tmp_path / "sun"), swanctl_conf=SUN, timeout=120)   # configuration loaded
    # The guest serves the Python trees from a cached view bound over the originals
    # (tests/vm/guest-init.sh); nspawn binds / alone, so hand those views in again.
    stdlib = os.path.dirname(os.__file__)
    box = nspawn.Container(netns=moon.name, log_path=str(tmp_path / "nspawn.log"),
                           binds=[(ROOT, ROOT), (stdlib, stdlib)])
    try:
        t0 = time.monotonic()
        box.start(timeout=300)
        booted = time.monotonic() - t0
        box.write(f"/etc/systemd/system/{UNIT_NAME}", unit_text())
        box.write(f"/etc/systemd/system/{UNIT_NAME}.d/test.conf", DROP_IN)
        box.write("/etc/ipsec-supervisor/supervisor.yaml", SUPERVISOR_YAML)
        with open(os.path.join(ROOT, "etc", "strongswan.d", "ipsec-supervisor.conf")) as fh:
            box.write("/etc/strongswan.d/ipsec-supervisor.conf", fh.read())      # as `make install` does
        box.write("/etc/swanctl/conf.d/hardened.conf", MOON, 0o600)
        box.systemctl("daemon-reload")
        t0 = time.monotonic()
        box.systemctl("start", UNIT_NAME, timeout=300)
        started = time.monotonic() - t0

        main = int(_props(box, "MainPID")["MainPID"])
        for pid in (main, _charon_pid(box)):
            st = _proc_status(box, pid)
            assert int(st["CapBnd"], 16) == NET_CAPS and st["Seccomp"] == "2" and st["NoNewPrivs"] == "1", st
        _wait(lambda: _installed_child(box), timeout=180, what="CHILD_SA installed under the hardened unit")
        ping = _ping(moon)
        assert ping.returncode == 0, ping.stdout + ping.stderr
        assert _esp_packets(moon) >= 6

        first = _charon_pid(box)
        box.run(["kill", "-9", str(first)])
        st = _wait(lambda: (lambda s: s if s and s["restarts"] == 1 and s["state"] == "running" else None)(
            _supervisor_status(box)), timeout=240, what="charon restarted by the supervisor")
        assert st["daemon"]["pid"] != first and st["last_exit"]["signal"] == "SIGKILL"
        assert _props(box, "NRestarts", "MainPID") == {"NRestarts": "0", "MainPID": str(main)}
        _wait(lambda: _installed_child(box), timeout=180, what="CHILD_SA installed again")
        _wait(lambda: _ping(moon).returncode == 0, timeout=120, what="pings through the tunnel again")
        print(f"container booted in {booted:.1f}s, systemctl start took {started:.1f}s; "
              f"ESP packets on moon: {_esp_packets(moon)}")

        box.systemctl("stop", UNIT_NAME, timeout=300)
        assert _props(box, "Result")["Result"] == "success"
    except BaseException:
        if box.pid1:
            print(box.run(["journalctl", "--no-pager", "-u", UNIT_NAME], check=False).stdout[-6000:])
        print("=== sun ===\n" + peer.charon_log()[-3000:])
        print("=== nspawn ===\n" + box.log())
        raise
    finally:
        box.poweroff()
        peer.cleanup()
