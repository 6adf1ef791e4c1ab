"""Real tunnels in the real-kernel VM: the supervisor (not charon) is killed and started again 5 times.

The lab (lab/): moon's charon under ``ipsec-supervisor run``, sun's plain, two tunnels (moon initiator
and responder), pings across both at 5/s, tcpdump counting plaintext on both outer links. Each time
moon's supervisor is killed with SIGKILL and a new one started beside charon (its namespaces); it must
re-attach: charon's pid never changes, no ping is lost, nothing leaves in the clear.

Run in one VM boot: tools/vm-run -- .venv/bin/pytest -m realkernel tests/test_reattach_realkernel.py
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lab.charon import Charon, LabSettings, tail  # noqa: E402
from lab.preflight import config_mode, missing_tools, recovery_settings  # noqa: E402
from lab.scenario import bring_up_tunnels  # noqa: E402
from lab.topology import build_lab, lab_namespaces_left, make_lab, remove_lab  # noqa: E402
from lab.traffic import Capture, Pinger  # noqa: E402

pytestmark = [
    pytest.mark.realkernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
    pytest.mark.skipif(bool(missing_tools()), reason=f"lab tools missing: {missing_tools()}"),
]

KILLS = 5
PREFIX = "ipsvreat"


def _supervisor_status(moon: Charon) -> dict:
    from supervisor import control
    return control.request(moon.run_dir, "status", timeout=5)["status"]


def _restart_beside(moon: Charon, charon_pid: int) -> None:
    """A new supervisor in the namespaces of the running charon (network, and mount: its /run)."""
    argv = ["nsenter", "-t", str(charon_pid), "-n", "-m", sys.executable, "-m", "supervisor.cli", "run",
            "--config", moon.path("supervisor.yaml")]
    moon.proc = subprocess.Popen(argv, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                 stdin=subprocess.DEVNULL, stdout=moon._out, stderr=subprocess.STDOUT)


def test_killing_the_supervisor_5_times_loses_no_ping_and_leaves_charon_alone():
    workdir = tempfile.mkdtemp(prefix="ipsv-reattach-")
    settings = LabSettings(recovery=recovery_settings({"adopt_grace": "5s", "block_timeout": "10s"}))
    lab = make_lab(("initiator", "responder"), prefix=PREFIX)
    moon = sun = None
    pingers: dict[str, Pinger] = {}
    captures: dict[str, Capture] = {}
    try:
        build_lab(lab)
        sun = Charon(lab, lab.sun, workdir, "plain", settings=settings).start()
        moon = Charon(lab, lab.moon, workdir, "supervisor", settings=settings, mode=config_mode("adopt"))
        sun.wait_ready(timeout=180)
        moon.start()
        charon_pid = moon.wait_ready(timeout=300)
        bring_up_tunnels(lab, moon, sun)
        for site in lab.sites:
            captures[site.name] = Capture(site.netns, site.local_nets, site.remote_nets,
                                          os.path.join(workdir, f"capture-{site.name}.txt")).start()
        for t in lab.tunnels:
            pingers[t.role] = Pinger(lab.moon.netns, t.moon_host, t.sun_host,
                                     os.path.join(workdir, f"ping-{t.role}.txt")).start()
        time.sleep(2.0)
        reattach_s = []
        for i in range(KILLS):
            sup_pid = _supervisor_status(moon)["supervisor"]["pid"]
            os.kill(sup_pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while os.path.exists(f"/proc/{sup_pid}") and time.monotonic() < deadline:
                time.sleep(0.01)
            t0 = time.monotonic()
            _restart_beside(moon, charon_pid)
            while True:
                try:
                    st = _supervisor_status(moon)
                    if st["state"] in ("settling", "running"):
                        break
                except Exception:   # noqa: BLE001 - not up yet
                    pass
                assert moon.proc.poll() is None, tail(moon.output_log)
                assert time.monotonic() - t0 < 60, tail(moon.output_log)
                time.sleep(0.02)
            reattach_s.append(time.monotonic() - t0)
            assert st["daemon"]["pid"] == charon_pid and st["daemon"]["reattached"], st["summary"]
            time.sleep(2.0)
        for p in pingers.values():
            p.stop()
        time.sleep(0.5)
        plaintext = {name: c.stop() for name, c in captures.items()}
        pings = {role: p.read() for role, p in pingers.items()}
        print(f"re-attached {KILLS} times in {', '.join(f'{s:.2f}s' for s in reattach_s)} (supervisor start "
              f"to ready); pings lost: {({r: len(p.lost) for r, p in pings.items()})}; plaintext: "
              f"{({n: len(v) for n, v in plaintext.items()})}")
        assert {r: p.lost for r, p in pings.items()} == {r: () for r in pings}
        assert all(len(p.answered) > 20 for p in pings.values())
        assert {n: len(v) for n, v in plaintext.items()} == {n: 0 for n in plaintext}
        assert moon.charon_pid() == charon_pid
        assert moon.stop() == 0
    finally:
        for p in pingers.values():
            p.stop()
        for c in captures.values():
            c.stop()
        for d in (moon, sun):
            if d is not None:
                d.stop(timeout=15)
        remove_lab(lab)
    assert not lab_namespaces_left(PREFIX), "the lab left namespaces behind"
