"""Real charon (Debian's strongSwan) under `ipsec-supervisor run`, in a network namespace with a private /run.

The supervisor runs as `ip netns exec NS unshare -m sh -c 'mount -t tmpfs tmpfs /run; exec ...'`, so
charon's /var/run/charon.pid and /var/run/charon.vici are private to the test; the test reaches them
through /proc/<supervisor pid>/root.  The control socket and state live in a temp dir outside /run.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import vici
import yaml

from charon_ns import psk_swanctl_conf, wait_for_status
from supervisor import control, crashreport
from supervisor.errors import ExitCode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHARON = "/usr/lib/ipsec/charon"
CHARON_SYSTEMD = "/usr/sbin/charon-systemd"
SWANCTL = "/usr/sbin/swanctl"

pytestmark = [
    pytest.mark.skipif(not os.path.exists(CHARON) or not os.path.exists(SWANCTL),
                       reason="needs strongSwan (strongswan-charon, strongswan-swanctl)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
]



class Charon:
    """`ipsec-supervisor run` supervising charon inside ``netns`` with a private /run."""

    def __init__(self, netns, overrides: dict | None = None, conns: tuple[str, ...] = ("test-conn",)):
        self.netns = netns
        self.dir = tempfile.mkdtemp(prefix="ipsv-ch-")
        self.p = lambda n: os.path.join(self.dir, n)
        self.write_swanctl(*conns)
        cfg = {
            "daemon": {"load_commands": [[SWANCTL, "--load-all", "--noprompt", "--file", self.p("swanctl.conf")]],
                       "start_timeout": "10s"},
            "restart": {"okay_delay": "200ms"},
            "health": {"interval": "300ms", "timeout": "250ms", "failures": 2, "abort_timeout": "3s"},
            "paths": {"run_dir": self.p("run"), "state_dir": self.p("state")},
        }
        for section, values in (overrides or {}).items():
            cfg.setdefault(section, {}).update(values)
        self.config_path = self.p("supervisor.yaml")
        with open(self.config_path, "w") as fh:
            yaml.safe_dump(cfg, fh)
        self.proc: subprocess.Popen | None = None
        self.log_file = None

    def write_swanctl(self, *names: str, broken: bool = False) -> None:
        text = "".join(psk_swanctl_conf(n, start_action=None) for n in names[:1])
        if len(names) > 1:  # extra connections next to the first
            extra = "".join(f"  {n} {{\n    remote_addrs = 192.0.2.3\n    local {{ auth = psk }}\n"
                            f"    remote {{ auth = psk }}\n  }}\n" for n in names[1:])
            text = text.replace("connections {\n", "connections {\n" + extra, 1)
        if broken:
            # A value charon rejects (swanctl exits 22).  A syntax error would not do: swanctl
            # reports "invalid config file" but exits 0.
            text = text.replace("remote_addrs = 192.0.2.2", "remote_addrs = 192.0.2.2\n    proposals = nonsense", 1)
        with open(self.p("swanctl.conf"), "w") as fh:
            fh.write(text)

    def start(self) -> "Charon":
        self.log_file = open(self.p("supervisor.log"), "w+")
        script = f"mount -t tmpfs tmpfs /run && exec {sys.executable} -m supervisor.cli run --config {self.config_path}"
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "JOURNAL_STREAM")}

        def no_cores():  # SIGABRT must not leave core files in / (core_pattern may be relative)
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        self.proc = subprocess.Popen(["ip", "netns", "exec", self.netns.name, "unshare", "-m", "--propagation",
                                      "private", "sh", "-c", script], cwd=ROOT, env=env, stdout=self.log_file,
                                     stderr=self.log_file, preexec_fn=no_cores)
        return self

    @property
    def run_root(self) -> str:
        """charon's /run, seen from outside its mount namespace."""
        return f"/proc/{self.proc.pid}/root/run"

    def status(self) -> dict:
        return control.request(self.p("run"), "status", timeout=3)["status"]

    def wait(self, pred, timeout: float = 20.0, what: str = "condition") -> dict:
        return wait_for_status(self.status, self.proc, pred, timeout, what, self.log, poll=0.05)

    def wait_running(self, restarts: int | None = None, timeout: float = 20.0) -> dict:
        return self.wait(lambda s: s["state"] == "running" and (restarts is None or s["restarts"] == restarts),
                         timeout, f"running, restarts={restarts}")

    def conns(self) -> list[str]:
        """Connections charon has loaded, asked over its own VICI socket."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(os.path.join(self.run_root, "charon.vici"))
            return sorted(name for conn in vici.Session(sock).list_conns() for name in conn)

    def log(self) -> str:
        try:
            with open(self.p("supervisor.log")) as fh:
                return fh.read()
        except FileNotFoundError:
            return ""

    def reports(self, wait_for: int = 0) -> list[dict]:
        deadline = time.monotonic() + 10
        while True:
            found = [r for _, r in crashreport.read_crash_reports(os.path.join(self.p("state"), "crashes"))]
            if len(found) >= wait_for or time.monotonic() > deadline:
                return found
            time.sleep(0.05)

    def stop(self, timeout: float = 20.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def cleanup(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        # Whatever still runs in the namespace (a charon whose supervisor was killed) goes too.
        pids = subprocess.run(["ip", "netns", "pids", self.netns.name], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        if self.log_file:
            self.log_file.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def charon(netns):
    made: list[Charon] = []

    def make(overrides=None, conns=("test-conn",)) -> Charon:
        c = Charon(netns, overrides, conns)
        made.append(c)
        return c

    yield make
    for c in made:
        c.cleanup()


def _charon_pids(netns) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", netns.name], capture_output=True, text=True).stdout.split()
    pids = []
    for pid in out:
        try:
            with open(f"/proc/{pid}/comm") as fh:
                if fh.read().strip() == "charon":
                    pids.append(int(pid))
        except FileNotFoundError:
            pass
    return pids


def test_charon_is_started_loaded_and_restarted_after_kill_9(charon, netns):
    c = charon().start()
    st = c.wait_running()
    pid = st["daemon"]["pid"]
    assert st["daemon"]["load_ok"] is True
    assert c.conns() == ["test-conn"]
    assert _charon_pids(netns) == [pid]
    with open(os.path.join(c.run_root, "charon.pid")) as fh:
        assert int(fh.read()) == pid

    t_kill = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    st = c.wait_running(restarts=1)
    new = st["daemon"]["pid"]
    assert new != pid and _charon_pids(netns) == [new]
    assert c.conns() == ["test-conn"]                       # configuration loaded again
    le = st["last_exit"]
    assert (le["pid"], le["classification"], le["signal"]) == (pid, "killed-by-signal", "SIGKILL")
    assert 0 <= le["died_at_monotonic"] - t_kill < 2.0
    assert "restart #1 at once" in le["decision"]
    [report] = c.reports(wait_for=1)
    # charon's own lines reach the crash report (stdout is a pty: line-buffered)
    assert any("Starting IKE charon daemon" in line for line in report["last_log_lines"])
    assert any("added vici connection: test-conn" in line for line in report["last_log_lines"])
    assert f"charon[{pid}]: " in c.log()
    assert c.stop() == 0
    assert _charon_pids(netns) == []


def test_sigstop_is_caught_by_the_health_probe(charon, netns):
    c = charon().start()
    pid = c.wait_running()["daemon"]["pid"]
    os.kill(pid, signal.SIGSTOP)
    st = c.wait_running(restarts=1, timeout=30)
    le = st["last_exit"]
    assert le["pid"] == pid and le["classification"] == "hung"
    assert le["signal"] in ("SIGABRT", "SIGKILL")   # SIGABRT + SIGCONT normally ends it
    assert "health probe failed (2 of 2)" in c.log()
    assert c.conns() == ["test-conn"]
    report = c.reports(wait_for=1)[0]
    assert report["classification"] == "hung" and report["health_failures"] == 2
    assert c.stop() == 0


def test_sigusr1_reloads_charons_configuration(charon):
    c = charon().start()
    pid = c.wait_running()["daemon"]["pid"]
    c.write_swanctl("test-conn", "second-conn")
    c.proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 15
    while c.conns() != ["second-conn", "test-conn"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert c.conns() == ["second-conn", "test-conn"]
    assert c.status()["daemon"]["pid"] == pid
    assert c.stop() == 0


def test_bad_swanctl_config_is_reported_and_charon_keeps_running(charon):
    c = charon()
    c.write_swanctl("test-conn", broken=True)
    c.start()
    st = c.wait_running()
    assert st["daemon"]["load_ok"] is False
    assert "swanctl --load-all --noprompt --file" in st["daemon"]["load_error"]
    assert "exited with code 22" in st["daemon"]["load_error"]
    assert "loading charon's configuration failed" in c.log()
    assert c.conns() == []
    # Fixed file + SIGUSR1: loaded, and the failure clears.
    c.write_swanctl("test-conn")
    c.proc.send_signal(signal.SIGUSR1)
    st = c.wait(lambda s: s["daemon"]["load_ok"] is True, what="reload ok")
    assert c.conns() == ["test-conn"]
    assert c.stop() == 0


def test_charon_that_cannot_initialise_exits_66_and_is_not_restarted(charon, netns, tmp_path):
    bad = tmp_path / "strongswan.conf"
    bad.write_text("charon {\n  load = random nonce\n}\n")   # critical plugin features missing
    c = charon({"daemon": {"environment": {"STRONGSWAN_CONF": str(bad)}}}).start()
    assert c.proc.wait(30) == ExitCode.FAILED
    log = c.log()
    assert "exited with code 66" in log and "exit code 66 is in restart.prevent_exit_codes" in log
    assert log.count("state preparing -> starting") == 1
    assert _charon_pids(netns) == []
    assert c.reports(wait_for=1)[0]["classification"] == "do-not-restart"


def test_invalid_supervisor_config_exits_3_before_starting_charon(charon, netns):
    c = charon({"restart": {"polcy": "always"}}).start()
    assert c.proc.wait(30) == ExitCode.CONFIG
    assert "restart.polcy is not a known key; did you mean restart.policy?" in c.log()
    assert _charon_pids(netns) == []


@pytest.mark.skipif(not os.path.exists(CHARON_SYSTEMD), reason="needs charon-systemd")
def test_charon_systemd_works_with_vici_readiness_only(charon, netns):
    c = charon({"daemon": {"command": [CHARON_SYSTEMD], "pid_file": None}}).start()
    st = c.wait_running()
    pid = st["daemon"]["pid"]
    assert c.conns() == ["test-conn"]
    os.kill(pid, signal.SIGKILL)
    st = c.wait_running(restarts=1)
    assert st["daemon"]["pid"] != pid and c.conns() == ["test-conn"]
    assert c.stop() == 0
