"""etc/ipsec-supervisor.service: `systemd-analyze verify`, and the unit under a real systemd 252.

The container tier (tests/nspawn.py) boots systemd from a read-only view of this machine's
root and runs the unit, sandbox and all, with a real charon and a swanctl configuration.
The test copy of the unit differs only by a drop-in: a 3 s watchdog (the watchdog test
would wait 20 s otherwise) and ProtectHome=read-only (the project's virtual environment
uses an interpreter under /root; `make install` puts it under /opt).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time

import pytest

import nspawn
from charon_ns import psk_swanctl_conf
from waiting import wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNIT = os.path.join(ROOT, "etc", "ipsec-supervisor.service")
CHARON_USER_DROP_IN = os.path.join(ROOT, "etc", "ipsec-supervisor.service.d", "charon-user.conf")
UNIT_NAME = "ipsec-supervisor.service"
PLACEHOLDER = "/usr/local/bin/ipsec-supervisor"
VENV_BIN = os.path.join(ROOT, ".venv", "bin")
SUPERVISOR = os.path.join(VENV_BIN, "ipsec-supervisor")
IPSEC = os.path.join(VENV_BIN, "ipsec")


def unit_text(executable: str = SUPERVISOR) -> str:
    """The unit as `make install` writes it: the placeholder replaced by the real path."""
    with open(UNIT) as fh:
        text = fh.read()
    assert PLACEHOLDER in text
    return text.replace(PLACEHOLDER, executable)


def unit_settings(path: str = UNIT) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    with open(path) as fh:
        for line in fh:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("["):
                current = sections.setdefault(line.strip("[]"), {})
                continue
            key, value = line.split("=", 1)
            current.setdefault(key, []).append(value)
    return sections


# ---------------------------------------------------------------------------
# Static checks

@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (a private mount namespace keeps the host's /run clean)")
def test_unit_passes_systemd_analyze_verify(tmp_path):
    path = tmp_path / UNIT_NAME
    path.write_text(unit_text())
    # verify writes /run/systemd/systemd-units-load: keep that inside a throw-away mount namespace.
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                        'mount -t tmpfs tmpfs /run/systemd && exec systemd-analyze verify "$1"', "verify", str(path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == "" and r.stdout.strip() == "", r.stderr + r.stdout   # warnings do not change rc


def security_exposure(tmp_path, *drop_ins: str) -> tuple[float, str]:
    """`systemd-analyze security --offline=yes` of the unit as installed (plus DROP_INS): score, report."""
    (tmp_path / UNIT_NAME).write_text(unit_text("/opt/ipsec-supervisor/bin/ipsec-supervisor"))
    if drop_ins:
        (tmp_path / f"{UNIT_NAME}.d").mkdir()
        for path in drop_ins:
            (tmp_path / f"{UNIT_NAME}.d" / os.path.basename(path)).write_text(open(path).read())
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                        'mount -t tmpfs tmpfs /run/systemd && cd "$1" && '
                        'exec systemd-analyze security --offline=yes --no-pager "./$2"',
                        "security", str(tmp_path), UNIT_NAME], capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", r.stdout)
    assert m, r.stdout + r.stderr
    return float(m.group(1)), r.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (a private mount namespace keeps the host's /run clean)")
def test_unit_sandbox_scores_ok_in_systemd_analyze_security(tmp_path):
    score, report = security_exposure(tmp_path)
    print(f"systemd-analyze security: {score}")
    assert score <= 4.0, report                     # "OK" or better (5.9 MEDIUM before the sandbox)
    # What is left is what an IKE daemon is: root, the host's network, sockets, CAP_NET_*, and
    # capset and chown (charon drops its capabilities and chowns its sockets at every start).
    left = {line.split()[1] for line in report.splitlines() if line.startswith("✗")}
    assert left <= {"RootDirectory=/RootImage=", "User=/DynamicUser=", "PrivateNetwork=", "PrivateUsers=",
                    "SystemCallFilter=~@privileged",
                    "IPAddressDeny=", "ProtectProc=", "ProcSubset=", "DeviceAllow=",
                    "CapabilityBoundingSet=~CAP_NET_ADMIN", "CapabilityBoundingSet=~CAP_NET_(BIND_SERVICE|BROADCAST|RAW)",
                    "RestrictAddressFamilies=~AF_PACKET", "RestrictAddressFamilies=~AF_NETLINK",
                    "RestrictAddressFamilies=~AF_UNIX", "RestrictAddressFamilies=~AF_(INET|INET6)"}, left


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (a private mount namespace keeps the host's /run clean)")
def test_charon_user_drop_in_keeps_the_score_ok(tmp_path):
    score, report = security_exposure(tmp_path, CHARON_USER_DROP_IN)
    print(f"systemd-analyze security with charon-user.conf: {score}")
    assert score <= 4.0, report


def test_unit_sandbox_leaves_charon_exactly_what_it_needs():
    from supervisor.config import default_config
    s = unit_settings()["Service"]
    assert s["CapabilityBoundingSet"] == ["CAP_NET_ADMIN CAP_NET_RAW CAP_NET_BIND_SERVICE"]
    assert s["ProtectSystem"] == ["strict"]
    rw = " ".join(s["ReadWritePaths"]).split()
    assert rw == ["/run", "-/etc/ipsec.d/crls", "-/etc/resolv.conf", "-/proc/sys/net/core/xfrm_acq_expires"]
    for key in ("ProtectKernelModules", "ProtectKernelTunables", "RestrictNamespaces", "MemoryDenyWriteExecute",
                "NoNewPrivileges", "PrivateMounts", "PrivateDevices", "PrivateTmp", "ProtectHome"):
        assert s[key] == ["yes"], key
    assert s["SystemCallFilter"][0] == "@system-service" and s["SystemCallErrorNumber"] == ["EPERM"]
    assert s["LimitCORE"] == ["0"] and s["UMask"] == ["0077"]
    # systemd makes the supervisor's directories, root-only; the run directory (the ledger)
    # outlives a restart of the service.
    paths = default_config().paths
    assert ["/run/" + s["RuntimeDirectory"][0], "/var/lib/" + s["StateDirectory"][0]] == [paths.run_dir,
                                                                                           paths.state_dir]
    assert s["RuntimeDirectoryMode"] == s["StateDirectoryMode"] == ["0700"]
    assert s["RuntimeDirectoryPreserve"] == ["yes"]
    d = unit_settings(CHARON_USER_DROP_IN)["Service"]
    assert set(d["CapabilityBoundingSet"][0].split()) == {"CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP", "CAP_CHOWN",
                                                         "CAP_DAC_OVERRIDE", "CAP_KILL"}


def test_unit_is_a_notify_service_whose_supervisor_stops_charon_itself():
    s = unit_settings()["Service"]
    assert s["Type"] == ["notify"] and s["NotifyAccess"] == ["main"]
    assert s["ExecStart"] == [f"{PLACEHOLDER} run"]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID", "/bin/kill -USR1 $MAINPID"]
    assert s["KillMode"] == ["mixed"] and s["Restart"] == ["on-failure"]
    assert "WatchdogSec" in s and "TimeoutStopSec" in s
    assert s["RestartPreventExitStatus"] == ["3 8 9"]
    caps = s["CapabilityBoundingSet"][0].split()
    assert {"CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_NET_BIND_SERVICE"} <= set(caps)
    assert "AF_NETLINK" in s["RestrictAddressFamilies"][0] and "AF_PACKET" in s["RestrictAddressFamilies"][0]
    u = unit_settings()["Unit"]
    assert set(u["Conflicts"][0].split()) == {"strongswan-starter.service", "strongswan.service"}


def test_stop_timeout_leaves_room_for_a_graceful_charon_stop_and_recovery():
    from supervisor.config import default_config, parse_duration
    cfg = default_config()
    stop = parse_duration(unit_settings()["Service"]["TimeoutStopSec"][0])
    assert stop > cfg.stop.timeout + cfg.recovery.timeout
    start = parse_duration(unit_settings()["Service"]["TimeoutStartSec"][0])
    assert start > cfg.daemon.start_timeout + cfg.daemon.load_timeout + cfg.recovery.timeout


# ---------------------------------------------------------------------------
# Under a real systemd (container tier)

why_not = nspawn.available() or (None if os.path.exists("/usr/lib/ipsec/charon") else "needs strongSwan's charon")
container_tier = pytest.mark.skipif(why_not is not None, reason=why_not or "")

DROP_IN = """\
[Service]
WatchdogSec=3s
ProtectHome=read-only
"""
# The installed unit runs from /opt; a checkout under /tmp (as CI may clone it) would be hidden
# by the unit's PrivateTmp=yes, so the test copy turns that one setting off there.
if ROOT.startswith("/tmp/") or ROOT.startswith("/var/tmp/"):
    DROP_IN += "PrivateTmp=no\n"

SUPERVISOR_YAML = """\
restart:
  okay_delay: 200ms
health:
  interval: 2s
  timeout: 1s
"""

SWANCTL_CONF = psk_swanctl_conf("ipsv-test")

SECOND_CONN = """\
connections {
  ipsv-second {
    remote_addrs = 192.0.2.3
    local { auth = psk }
    remote { auth = psk }
  }
}
"""


def unit_container(tmp_path_factory, files: dict[str, tuple[str, int]]):
    """A container with the unit (and its test drop-in) installed plus `files` (path -> text, mode)."""
    log = tmp_path_factory.mktemp("nspawn") / "nspawn.log"
    c = nspawn.Container(log_path=str(log))
    c.start()
    try:
        c.write(f"/etc/systemd/system/{UNIT_NAME}", unit_text())
        c.write(f"/etc/systemd/system/{UNIT_NAME}.d/test.conf", DROP_IN)
        for path, (text, mode) in files.items():
            c.write(path, text, mode)
        c.systemctl("daemon-reload")
        yield c
    finally:
        c.poweroff()


@pytest.fixture(scope="module")
def box(tmp_path_factory):
    """One container for the module, the unit installed; each test starts from 'stopped'."""
    yield from unit_container(tmp_path_factory, {
        "/etc/ipsec-supervisor/supervisor.yaml": (SUPERVISOR_YAML, 0o644),
        "/etc/swanctl/conf.d/ipsv-test.conf": (SWANCTL_CONF, 0o600),
    })


@pytest.fixture
def unit(box):
    box.systemctl("stop", UNIT_NAME, check=False)
    box.systemctl("reset-failed", UNIT_NAME, check=False)
    yield box
    if os.environ.get("IPSV_KEEP_JOURNAL"):
        print(box.run(["journalctl", "--no-pager", "-u", UNIT_NAME]).stdout)
    box.systemctl("stop", UNIT_NAME, check=False)


def _props(c, *names) -> dict[str, str]:
    return c.show(UNIT_NAME, *names)


def _charon_pid(c) -> int | None:
    r = c.run(["cat", "/run/charon.pid"], check=False)
    return int(r.stdout) if r.returncode == 0 and r.stdout.strip() else None


def _supervisor_status(c) -> dict | None:
    r = c.run([SUPERVISOR, "status", "--json"], check=False)
    return json.loads(r.stdout) if r.returncode == 0 else None


def _wait(pred, timeout=30.0, what="condition"):
    return wait_for(pred, timeout, what, poll=0.1)


def _charon_policies(c) -> list[str]:
    """charon's XFRM policies (in/out/fwd); per-socket policies (dir 3, 4) are the kernel's."""
    out = c.run(["ip", "xfrm", "policy"]).stdout
    return [line.strip() for line in out.splitlines() if re.search(r"\bdir (in|out|fwd)\b", line)]


def _start(c) -> float:
    t = time.monotonic()
    c.systemctl("start", UNIT_NAME)
    return time.monotonic() - t


@container_tier
def test_systemctl_start_returns_once_charon_is_ready(unit):
    took = _start(unit)
    # No polling: when start returns, charon answers VICI with its configuration loaded.
    p = _props(unit, "ActiveState", "SubState", "StatusText", "MainPID", "NRestarts")
    assert (p["ActiveState"], p["SubState"]) == ("active", "running"), p
    assert p["StatusText"].startswith("charon running")
    assert "ipsv-test" in unit.run(["swanctl", "--list-conns"]).stdout
    assert len(_charon_policies(unit)) >= 3                      # the trap's in/out/fwd policies
    st = _supervisor_status(unit)
    assert st["state"] in ("settling", "running") and st["daemon"]["load_ok"] is True
    assert st["daemon"]["pid"] == _charon_pid(unit)
    assert st["supervisor"]["pid"] == int(p["MainPID"])
    print(f"systemctl start took {took:.2f}s")


@container_tier
def test_kill_9_of_charon_is_recovered_by_the_supervisor_not_by_systemd(unit):
    _start(unit)
    main = _props(unit, "MainPID")["MainPID"]
    first = _charon_pid(unit)
    unit.run(["kill", "-9", str(first)])
    st = _wait(lambda: (lambda s: s if s and s["restarts"] == 1 and s["state"] == "running" else None)(
        _supervisor_status(unit)), what="charon restarted by the supervisor")
    assert st["daemon"]["pid"] != first and st["last_exit"]["signal"] == "SIGKILL"
    p = _props(unit, "NRestarts", "MainPID", "ActiveState")
    assert (p["NRestarts"], p["MainPID"], p["ActiveState"]) == ("0", main, "active")
    assert "ipsv-test" in unit.run(["swanctl", "--list-conns"]).stdout
    # journald has the supervisor's structured fields for the death.
    deaths = [e for e in unit.journal("-u", UNIT_NAME) if e.get("EXIT_CLASSIFICATION") == "killed-by-signal"]
    assert deaths and deaths[-1]["EXIT_SIGNAL"] == "SIGKILL" and deaths[-1]["DAEMON_PID"] == str(first)
    assert deaths[-1]["SYSLOG_IDENTIFIER"] == "ipsec-supervisor" and deaths[-1]["DECISION"] == "restart"
    states = {e.get("SUPERVISOR_STATE") for e in unit.journal("-u", UNIT_NAME)}
    assert {"starting", "loading", "settling", "running", "recovering"} <= states


@container_tier
def test_systemctl_reload_reloads_charons_configuration(unit):
    _start(unit)
    unit.write("/etc/swanctl/conf.d/ipsv-second.conf", SECOND_CONN, 0o600)
    try:
        unit.systemctl("reload", UNIT_NAME)
        # systemd 252 returns once the kill commands ran: poll for the effect.
        _wait(lambda: "ipsv-second" in unit.run(["swanctl", "--list-conns"]).stdout, what="second connection loaded")
        messages = [e.get("MESSAGE", "") for e in unit.journal("-u", UNIT_NAME)]
        assert any("configuration reloaded from /etc/ipsec-supervisor/supervisor.yaml" in m for m in messages)
        assert any("configuration reloaded" in m and "charon" in m for m in messages)
        assert _props(unit, "NRestarts")["NRestarts"] == "0"
    finally:
        unit.run(["rm", "-f", "/etc/swanctl/conf.d/ipsv-second.conf"])


@container_tier
def test_stopped_supervisor_is_killed_by_the_watchdog_and_restarted(unit):
    _start(unit)
    _wait(lambda: (_supervisor_status(unit) or {}).get("state") == "running", what="running")
    before = _props(unit, "MainPID")["MainPID"]
    charon_before = _charon_pid(unit)
    ledger = "/run/ipsec-supervisor/ledger.json"
    _wait(lambda: os.path.exists(unit.path(ledger)), what="ledger written")
    unit.run(["kill", "-STOP", before])
    p = _wait(lambda: (lambda p: p if p["NRestarts"] == "1" and p["ActiveState"] == "active"
                       and p["MainPID"] not in ("0", before) else None)(
        _props(unit, "NRestarts", "MainPID", "ActiveState")), timeout=60, what="watchdog restart")
    messages = [e.get("MESSAGE", "") for e in unit.journal("-u", UNIT_NAME)]
    assert any("Watchdog timeout" in m for m in messages), messages[-20:]
    st = _wait(lambda: (lambda s: s if s and s["state"] == "running" else None)(_supervisor_status(unit)),
               what="new supervisor running")
    assert st["supervisor"]["pid"] == int(p["MainPID"])
    assert st["daemon"]["pid"] != charon_before                # KillMode=mixed: the old charon went too
    assert unit.run(["kill", "-0", str(charon_before)], check=False).returncode != 0
    # RuntimeDirectoryPreserve=yes: the run directory (and the ledger in it) survives the
    # restart; the new supervisor snapshots what the killed charon left and keeps the
    # ledger for its own charon.
    _wait(lambda: json.load(open(unit.path(ledger))).get("daemon_pid") == st["daemon"]["pid"],
          what="ledger of the new charon")
    snaps = json.loads(unit.run([IPSEC, "snapshots", "--json"]).stdout)["snapshots"]
    assert any("startup" in s["id"] for s in snaps), snaps
    assert len(_charon_policies(unit)) == 3                       # adopted, not duplicated


@container_tier
def test_systemctl_restart_is_a_stop_and_a_start_not_a_reattach(unit):
    _start(unit)
    charon_before = _charon_pid(unit)
    unit.systemctl("restart", UNIT_NAME)
    st = _supervisor_status(unit)
    assert st["daemon"]["pid"] not in (None, charon_before) and not st["daemon"]["reattached"], st["summary"]
    assert unit.run(["kill", "-0", str(charon_before)], check=False).returncode != 0
    messages = [e.get("MESSAGE", "") for e in unit.journal("-u", UNIT_NAME)]
    assert any(f"(pid {charon_before}) exited with code 0 on request" in m for m in messages), messages[-20:]
    assert len(_charon_policies(unit)) == 3


@container_tier
def test_kill_9_of_the_supervisor_takes_charon_with_it_and_systemd_starts_clean(unit):
    # KillMode=mixed: nothing of the unit outlives its main process, so there is nothing to re-attach to.
    _start(unit)
    before, charon_before = _props(unit, "MainPID")["MainPID"], _charon_pid(unit)
    unit.run(["kill", "-9", before])
    p = _wait(lambda: (lambda p: p if p["NRestarts"] == "1" and p["ActiveState"] == "active"
                       and p["MainPID"] not in ("0", before) else None)(
        _props(unit, "NRestarts", "MainPID", "ActiveState")), timeout=60, what="systemd restart")
    st = _wait(lambda: (lambda s: s if s and s["state"] == "running" else None)(_supervisor_status(unit)),
               what="new supervisor running")
    assert st["supervisor"]["pid"] == int(p["MainPID"]) and not st["daemon"]["reattached"]
    assert st["daemon"]["pid"] != charon_before
    assert unit.run(["kill", "-0", str(charon_before)], check=False).returncode != 0
    assert len(_charon_policies(unit)) == 3                       # recovered by the ledger, not duplicated


@container_tier
def test_systemctl_stop_is_graceful_and_leaves_no_charon_state(unit):
    _start(unit)
    charon = _charon_pid(unit)
    assert _charon_policies(unit)
    unit.systemctl("stop", UNIT_NAME)
    p = _props(unit, "ActiveState", "Result", "ExecMainStatus")
    assert (p["ActiveState"], p["Result"], p["ExecMainStatus"]) == ("inactive", "success", "0"), p
    assert unit.run(["kill", "-0", str(charon)], check=False).returncode != 0
    messages = [e.get("MESSAGE", "") for e in unit.journal("-u", UNIT_NAME)]
    assert any(f"(pid {charon}) exited with code 0 on request" in m for m in messages), messages[-20:]
    assert _charon_policies(unit) == []
    assert "lookup 220" not in unit.run(["ip", "rule"]).stdout
    assert unit.run(["ip", "route", "show", "table", "220"], check=False).stdout.strip() == ""


@container_tier
def test_ipsec_command_inside_a_systemd_system_goes_through_systemd(unit):
    _start(unit)
    r = unit.run([IPSEC, "status"], check=False)
    assert r.returncode == 0 and "charon running" in r.stdout and "ROUTED" in r.stdout
    r = unit.run([IPSEC, "start"], check=False)
    assert r.returncode == 0 and "already running" in r.stderr
    r = unit.run([IPSEC, "stop"], check=False)
    assert r.returncode == 0 and f"Stopping {UNIT_NAME}" in r.stderr
    assert _props(unit, "ActiveState")["ActiveState"] == "inactive"
    assert unit.run([IPSEC, "status"], check=False).returncode == 3


@container_tier
def test_ipsec_start_outside_the_unit_logs_structured_fields_to_journald(unit):
    # The unit is stopped: `ipsec start` runs a supervisor of its own, logging to journald.
    r = unit.run([IPSEC, "start"], check=False)
    assert r.returncode == 0, r.stderr
    pid = int(unit.run(["cat", "/run/ipsec-supervisor/supervisor.pid"]).stdout)
    try:
        assert _props(unit, "ActiveState")["ActiveState"] == "inactive"
        entries = [e for e in unit.journal("-t", "ipsec-supervisor", f"_PID={pid}")]
        assert {"starting", "running"} & {e.get("SUPERVISOR_STATE") for e in entries}, entries[-5:]
        assert unit.run([IPSEC, "status"], check=False).returncode == 0
    finally:
        r = unit.run([IPSEC, "stop"], check=False)
    assert r.returncode == 0 and f"Stopping ipsec-supervisor (pid {pid})" in r.stderr
    assert unit.run([IPSEC, "status"], check=False).returncode == 3
    assert _charon_policies(unit) == []


# ---------------------------------------------------------------------------
# The sandbox, as the running service sees it

CAP_NET_BIND_SERVICE, CAP_NET_ADMIN, CAP_NET_RAW = 10, 12, 13
NET_CAPS = (1 << CAP_NET_BIND_SERVICE) | (1 << CAP_NET_ADMIN) | (1 << CAP_NET_RAW)


def _proc_status(c, pid) -> dict[str, str]:
    out = c.run(["cat", f"/proc/{pid}/status"]).stdout
    return {k: v.strip() for k, v in (line.split(":", 1) for line in out.splitlines() if ":" in line)}


@container_tier
def test_supervisor_and_charon_run_inside_the_units_sandbox(unit):
    _start(unit)
    main = int(_props(unit, "MainPID")["MainPID"])
    charon = _charon_pid(unit)
    for pid in (main, charon):
        st = _proc_status(unit, pid)
        assert int(st["CapBnd"], 16) == NET_CAPS, (pid, st["CapBnd"])
        assert int(st["CapEff"], 16) & ~NET_CAPS == 0, (pid, st["CapEff"])
        assert (st["Seccomp"], st["NoNewPrivs"]) == ("2", "1"), pid
    # ProtectSystem=strict: / is read-only for the service, /run is not.
    mounts = {fields[4]: fields[5] for fields in (line.split() for line in
                                                  unit.run(["cat", f"/proc/{main}/mountinfo"]).stdout.splitlines())}
    assert mounts["/"].startswith("ro") and mounts["/run"].startswith("rw"), mounts
    # ProtectKernelTunables= leaves charon the one tunable it sets (165 s, kernel default 30 s).
    assert unit.run(["cat", "/proc/sys/net/core/xfrm_acq_expires"]).stdout.strip() == "165"
    # systemd made our directories root-only; UMask=0077 keeps what we write in them private.
    for d in ("/run/ipsec-supervisor", "/var/lib/ipsec-supervisor"):
        info = os.lstat(unit.path(d))
        assert (info.st_uid, oct(info.st_mode & 0o7777)) == (0, "0o700"), d
    _wait(lambda: os.path.exists(unit.path("/run/ipsec-supervisor/ledger.json")), what="ledger written")
    for f in ("ledger.json", "supervisor.lock", "control.sock"):
        assert os.lstat(unit.path(f"/run/ipsec-supervisor/{f}")).st_mode & 0o077 == 0, f
    # RuntimeDirectoryPreserve=yes: a stop leaves the run directory for the next start.
    unit.systemctl("stop", UNIT_NAME)
    assert os.path.isdir(unit.path("/run/ipsec-supervisor"))


def _syscall_groups(c) -> dict[str, list[str]]:
    """systemd's system call groups (`systemd-analyze syscall-filter`), as this systemd knows them."""
    groups: dict[str, list[str]] = {}
    current = None
    for line in c.run(["systemd-analyze", "syscall-filter", "--no-pager"]).stdout.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.split()[0], [])
        elif line.startswith(" ") and line.strip() and not line.strip().startswith("#") and current is not None:
            current.append(line.split()[0])
        elif not line.strip():
            current = None
    return groups


def _allowed_syscalls(groups, filter_lines) -> set[str]:
    """The allow list SystemCallFilter= lines make: the first allows, `~` lines remove, others add."""
    def expand(name, seen=()):
        if not name.startswith("@"):
            return {name}
        return set().union(*(expand(n, seen + (name,)) for n in groups[name] if n not in seen))
    allowed: set[str] = set()
    for line in filter_lines:
        deny = line.startswith("~")
        names = set().union(*(expand(n) for n in line.lstrip("~").split()))
        allowed = allowed - names if deny else allowed | names
    return allowed


TRACED_SYSCALL = re.compile(r"^\d+\s+(?:<\.\.\. )?([a-z_0-9]+)(?:\(| resumed>)")


@container_tier
@pytest.mark.skipif(not os.path.exists("/usr/bin/strace"), reason="needs strace")
def test_every_system_call_the_service_makes_is_in_the_units_filter(tmp_path):
    """Start, kill -9 of charon and its recovery, reload, stop: all under strace, the filter lifted."""
    trace = "/var/lib/ipsec-supervisor/trace"
    with nspawn.Container(log_path=str(tmp_path / "nspawn.log")) as c:
        c.write(f"/etc/systemd/system/{UNIT_NAME}", unit_text())
        c.write(f"/etc/systemd/system/{UNIT_NAME}.d/test.conf", DROP_IN)
        # strace is the main process: READY=1 and the signals go to the supervisor below it.
        c.write(f"/etc/systemd/system/{UNIT_NAME}.d/trace.conf",
                f"[Service]\nNotifyAccess=all\nWatchdogSec=0\nSystemCallFilter=\nExecStart=\n"
                f"ExecStart=/usr/bin/strace -f -qq -o {trace} {SUPERVISOR} run\n")
        c.write("/etc/ipsec-supervisor/supervisor.yaml", SUPERVISOR_YAML)
        c.write("/etc/swanctl/conf.d/ipsv-test.conf", SWANCTL_CONF, 0o600)
        c.systemctl("daemon-reload")
        c.systemctl("start", UNIT_NAME)
        st = _wait(lambda: (lambda s: s if s and s["state"] == "running" else None)(_supervisor_status(c)),
                   what="running")
        supervisor = st["supervisor"]["pid"]
        c.run(["kill", "-9", str(st["daemon"]["pid"])])
        _wait(lambda: (lambda s: s if s and s["restarts"] == 1 and s["state"] == "running" else None)(
            _supervisor_status(c)), timeout=60, what="charon restarted")
        c.run(["kill", "-HUP", str(supervisor)])
        c.run(["kill", "-USR1", str(supervisor)])
        _wait(lambda: any(e.get("MESSAGE", "").startswith("charon's configuration reloaded")
                          for e in c.journal("-u", UNIT_NAME)), what="reloaded")
        c.run(["kill", "-TERM", str(supervisor)])
        _wait(lambda: _props(c, "ActiveState")["ActiveState"] == "inactive", timeout=60, what="stopped")
        assert _props(c, "Result")["Result"] == "success"
        used = set()
        with open(c.path(trace)) as fh:
            for line in fh:
                m = TRACED_SYSCALL.match(line)
                if m:
                    used.add(m.group(1))
        allowed = _allowed_syscalls(_syscall_groups(c), unit_settings()["Service"]["SystemCallFilter"])
    print(f"{len(used)} system calls used: {' '.join(sorted(used))}")
    assert {"capset", "chown", "pidfd_open", "setsid"} <= used          # the trace saw the whole service
    assert used - allowed == set()


@container_tier
def test_charon_as_an_unprivileged_user_needs_the_shipped_drop_in(tmp_path):
    with nspawn.Container(log_path=str(tmp_path / "nspawn.log")) as c:
        c.write(f"/etc/systemd/system/{UNIT_NAME}", unit_text())
        c.write(f"/etc/systemd/system/{UNIT_NAME}.d/test.conf", DROP_IN)
        c.write("/etc/ipsec-supervisor/supervisor.yaml", SUPERVISOR_YAML)
        c.write("/etc/swanctl/conf.d/ipsv-test.conf", SWANCTL_CONF, 0o600)
        c.run(["useradd", "--system", "--no-create-home", "--user-group", "ipsv-charon"])
        c.write("/etc/strongswan.d/charon-user.conf", "charon {\n  user = ipsv-charon\n  group = ipsv-charon\n}\n")
        c.systemctl("daemon-reload")
        # Without the drop-in the sandbox forbids the identity change: charon refuses to start.
        assert c.systemctl("start", UNIT_NAME, check=False).returncode != 0
        deaths = [e for e in c.journal("-u", UNIT_NAME) if e.get("EXIT_CLASSIFICATION")]
        assert deaths and deaths[-1].get("EXIT_CODE") == "66", deaths[-1:]
        c.systemctl("reset-failed", UNIT_NAME, check=False)

        with open(CHARON_USER_DROP_IN) as fh:
            c.write(f"/etc/systemd/system/{UNIT_NAME}.d/charon-user.conf", fh.read())
        c.systemctl("daemon-reload")
        _start(c)
        charon = _charon_pid(c)
        uid = c.run(["id", "-u", "ipsv-charon"]).stdout.strip()
        assert _proc_status(c, charon)["Uid"].split() == [uid] * 4
        c.run(["kill", "-9", str(charon)])
        st = _wait(lambda: (lambda s: s if s and s["restarts"] == 1 and s["state"] == "running" else None)(
            _supervisor_status(c)), what="charon restarted by the supervisor")
        assert _proc_status(c, st["daemon"]["pid"])["Uid"].split() == [uid] * 4
        assert "ipsv-test" in c.run(["swanctl", "--list-conns"]).stdout
        c.systemctl("stop", UNIT_NAME)
        assert _props(c, "Result")["Result"] == "success"
