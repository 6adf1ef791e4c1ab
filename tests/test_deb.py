"""`make deb` and `make install IPSEC_DIVERT=yes`: built here, installed and removed only inside
a real-systemd container (tests/nspawn.py: a writable overlay of this machine's root, so
`dpkg -i`, the diversion of /usr/sbin/ipsec and the unit never touch the host).

Also Debian's own strongswan-starter.service (`ipsec start --nofork`, `ipsec reload`, SIGTERM
to the whole unit) with /usr/sbin/ipsec diverted to ours.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import tarfile
import tomllib

import pytest

import nspawn
from charon_ns import psk_swanctl_conf
from test_install import build_wheel
from waiting import wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "build", "test-deb")
PREFIX = "/usr/lib/ipsec-supervisor"
UNIT = "ipsec-supervisor.service"
STARTER = "strongswan-starter.service"
SBIN_IPSEC = "/usr/sbin/ipsec"
DIVERTED = "/usr/sbin/ipsec.strongswan"
with open(os.path.join(ROOT, "pyproject.toml"), "rb") as _fh:
    VERSION = tomllib.load(_fh)["project"]["version"]

needs_dpkg = pytest.mark.skipif(shutil.which("dpkg-deb") is None or not os.path.exists("/usr/bin/python3"),
                                reason="needs Debian's dpkg-deb and /usr/bin/python3")
why_not = nspawn.available() or next((f"needs {p}" for p in ("/usr/lib/ipsec/charon", SBIN_IPSEC, "/usr/sbin/swanctl")
                                      if not os.path.exists(p)), None)
container_tier = pytest.mark.skipif(why_not is not None, reason=why_not or "")


@pytest.fixture(scope="module")
def deb() -> str:
    """The package, built once for the module into build/test-deb (tools/deb/build.sh)."""
    if shutil.which("dpkg-deb") is None:
        pytest.skip("needs dpkg-deb")
    r = subprocess.run(["bash", "tools/deb/build.sh"], cwd=ROOT, env={**os.environ, "OUT": OUT},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    debs = [f for f in os.listdir(OUT) if f.endswith(".deb")]
    assert len(debs) == 1, debs
    return os.path.join(OUT, debs[0])


def _field(deb: str, name: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", deb, name], capture_output=True, text=True, check=True).stdout.strip()


def _member(deb: str, path: str) -> tuple[tarfile.TarInfo, bytes | None] | None:
    """PATH in the package's data: its tar entry and, for a file, its contents."""
    r = subprocess.run(["dpkg-deb", "--fsys-tarfile", deb], capture_output=True, check=True)
    with tarfile.open(fileobj=io.BytesIO(r.stdout)) as tf:
        for m in tf.getmembers():
            if m.name.lstrip(".") == path:
                return m, (tf.extractfile(m).read() if m.isfile() else None)
    return None


# ---------------------------------------------------------------------------
# The package as built

@needs_dpkg
def test_package_depends_on_debians_python_libraries_and_bundles_the_rest(deb):
    assert _field(deb, "Package") == "ipsec-supervisor" and _field(deb, "Architecture") == "all"
    depends = [d.strip() for d in _field(deb, "Depends").split(",")]
    assert {"python3 (>= 3.11)", "python3 (<< 3.12)", "python3-psutil (>= 5.9)", "python3-systemd (>= 235)",
            "python3-yaml (>= 6.0)", "python3-prometheus-client (>= 0.16)", "strongswan-charon", "strongswan-swanctl"} == set(depends)
    files = subprocess.run(["dpkg-deb", "-c", deb], capture_output=True, text=True, check=True).stdout
    site = f"{PREFIX}/lib/python3.11/site-packages"
    for bundled in ("supervisor/ipsec_cli.py", "pyroute2/__init__.py", "vici/__init__.py"):
        assert f".{site}/{bundled}" in files
    for from_debian in ("psutil", "systemd/", "yaml/"):
        assert f"site-packages/{from_debian}" not in files
    names = [line.split()[-1] for line in files.splitlines()]
    assert not [n for n in names if n.endswith(".so") or "__pycache__" in n or n.endswith(".pyc")]
    conffiles = subprocess.run(["dpkg-deb", "-I", deb, "conffiles"], capture_output=True, text=True).stdout.split()
    assert conffiles == ["/etc/ipsec-supervisor/supervisor.yaml", "/etc/strongswan.d/ipsec-supervisor.conf"]
    link, _ = _member(deb, SBIN_IPSEC)
    assert link.issym() and os.path.normpath(os.path.join("/usr/sbin", link.linkname)) == f"{PREFIX}/bin/ipsec"
    script = _member(deb, f"{PREFIX}/bin/ipsec")[1].decode()
    assert script.startswith(f"#!{PREFIX}/bin/python3\n") and "supervisor.ipsec_cli" in script
    cfg = _member(deb, f"{PREFIX}/pyvenv.cfg")[1].decode()
    assert "include-system-site-packages = true" in cfg and OUT not in cfg


@needs_dpkg
def test_packaged_unit_is_the_repository_unit_with_the_package_paths(deb):
    shipped = open(os.path.join(ROOT, "etc", UNIT)).read()
    unit = _member(deb, f"/lib/systemd/system/{UNIT}")[1].decode()
    assert unit == shipped.replace("/usr/local/bin/ipsec-supervisor", f"{PREFIX}/bin/ipsec-supervisor") \
                          .replace("/usr/local/share/doc/", "/usr/share/doc/")
    assert f"\nExecStart={PREFIX}/bin/ipsec-supervisor run\n" in unit
    assert "\nConflicts=strongswan-starter.service strongswan.service\n" in unit
    assert _member(deb, "/usr/share/doc/ipsec-supervisor/README.md") is not None
    rules = open(os.path.join(ROOT, "etc", "prometheus", "ipsec-supervisor-rules.yml"), "rb").read()
    assert _member(deb, "/usr/share/doc/ipsec-supervisor/ipsec-supervisor-rules.yml")[1] == rules


@needs_dpkg
@pytest.mark.skipif(shutil.which("lintian") is None, reason="needs lintian (tools/setup.sh installs it)")
def test_lintian_finds_nothing_that_is_not_justified_in_the_overrides(deb):
    # --fail-on info would also count lintian 2.116's classification tags (C:, facts, not
    # problems): info tags are caught from the output instead.
    r = subprocess.run(["lintian", "--display-info", "--display-experimental", "--pedantic", "--fail-on",
                        "error,warning,pedantic", deb], capture_output=True, text=True, timeout=300)
    tags = [line for line in r.stdout.splitlines() if line[:2] in ("E:", "W:", "I:", "P:", "X:")]
    assert r.returncode == 0 and tags == [], r.stdout + r.stderr


def test_ipsec_divert_is_refused_for_a_staged_install(tmp_path):
    r = subprocess.run(["make", "--no-print-directory", "-f", "tools/install.mk", "install",
                        f"DESTDIR={tmp_path}", "IPSEC_DIVERT=yes"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "IPSEC_DIVERT=yes changes this system's /usr/sbin/ipsec: not with DESTDIR" in r.stderr
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------
# Installed in a real systemd container

def _sha(c: nspawn.Container, path: str) -> str | None:
    p = c.path(path)
    if not os.path.exists(p):
        return None
    with open(p, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def _diversion(c: nspawn.Container) -> str:
    return c.run(["dpkg-divert", "--list", SBIN_IPSEC]).stdout.strip()


def _charon_pid(c: nspawn.Container) -> int | None:
    r = c.run(["cat", "/run/charon.pid"], check=False)
    pid = int(r.stdout) if r.returncode == 0 and r.stdout.strip() else None
    return pid if pid and c.run(["kill", "-0", str(pid)], check=False).returncode == 0 else None


def _wait(pred, timeout=30.0, what="condition"):
    return wait_for(pred, timeout, what, poll=0.1)


def _conns(c: nspawn.Container) -> str:
    return c.run(["swanctl", "--list-conns"], check=False).stdout


@pytest.fixture
def box(tmp_path):
    """A booted container with a swanctl connection, no ipsec-supervisor configuration yet."""
    c = nspawn.Container(prefix="ipsvdeb", log_path=str(tmp_path / "nspawn.log"))
    c.start()
    try:
        # Nothing of an earlier install on the host may shape this one; a policy-rc.d that
        # forbids starts (build machines have one) is this machine's, not a target's.
        c.run(["rm", "-rf", "/etc/ipsec-supervisor", "/var/lib/ipsec-supervisor", "/run/ipsec-supervisor",
               "/usr/sbin/policy-rc.d"])
        c.write("/etc/swanctl/conf.d/ipsvdeb.conf", psk_swanctl_conf("ipsvdeb"), 0o600)
        c.write("/etc/ipsec.conf", "config setup\n")          # no conn: daemon.config auto loads swanctl
        c.original_ipsec = _sha(c, SBIN_IPSEC)                   # type: ignore[attr-defined]
        assert c.original_ipsec and _diversion(c) == ""
        yield c
    finally:
        c.poweroff()


IPSEC_CONF = """\
config setup

conn ipsvdeb-legacy
    right=192.0.2.4
    leftid=moon
    rightid=sun
    authby=psk
    keyexchange=ikev2
    auto=add
"""


def _dpkg(c: nspawn.Container, *args: str) -> subprocess.CompletedProcess:
    r = c.run(["dpkg", *args], check=False, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


@container_tier
def test_dpkg_install_diverts_ipsec_and_remove_gives_it_back(box, deb):
    box.systemctl("enable", STARTER)             # strongSwan's starter in use: ours stays off
    r = _dpkg(box, "-i", deb)
    assert f"{STARTER} is enabled or running: {UNIT} was left disabled and stopped" in r.stdout
    assert _diversion(box) == f"diversion of {SBIN_IPSEC} to {DIVERTED} by ipsec-supervisor"
    assert _sha(box, DIVERTED) == box.original_ipsec
    assert box.run(["readlink", "-f", SBIN_IPSEC]).stdout.strip() == f"{PREFIX}/bin/ipsec"
    assert box.systemctl("is-enabled", UNIT, check=False).stdout.strip() == "disabled"
    assert box.systemctl("is-active", UNIT, check=False).stdout.strip() == "inactive"

    # /usr/sbin/ipsec is ours, on Debian's python3 and its python3-psutil/-systemd/-yaml.
    r = box.run([SBIN_IPSEC, "--help"], check=False)
    assert r.returncode == 0 and "exit codes:" in r.stdout
    assert f"ipsec-supervisor {VERSION} " in box.run([SBIN_IPSEC, "version"]).stdout
    where = box.run([f"{PREFIX}/bin/python3", "-c", "import psutil, systemd.journal, yaml, pyroute2, supervisor; "
                     "print(psutil.__file__, systemd.journal.__file__, yaml.__file__, pyroute2.__file__, "
                     "supervisor.__file__)"]).stdout.split()
    assert all(p.startswith("/usr/lib/python3/dist-packages/") for p in where[:3]), where
    assert all(p.startswith(f"{PREFIX}/lib/") for p in where[3:]), where

    # The packaged unit starts charon with nothing from this checkout.
    box.systemctl("start", UNIT)
    main = box.show(UNIT, "MainPID")["MainPID"]
    cmdline = open(box.path(f"/proc/{main}/cmdline"), "rb").read().split(b"\0")
    assert cmdline[:3] == [f"{PREFIX}/bin/python3".encode(), f"{PREFIX}/bin/ipsec-supervisor".encode(), b"run"]
    charon = _charon_pid(box)
    assert charon and "ipsvdeb" in _conns(box)
    r = box.run([SBIN_IPSEC, "status"], check=False)
    assert r.returncode == 0 and f"charon running (pid {charon})" in r.stdout and "ROUTED" in r.stdout
    # ipsec.conf gets a conn (as ovs-monitor-ipsec writes it): the package's loader, a
    # `python -m supervisor.cli` child of the sandboxed service, loads it.
    box.write("/etc/ipsec.conf", IPSEC_CONF)
    r = box.run([SBIN_IPSEC, "update"], check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ipsvdeb-legacy" in _conns(box)

    # Removal stops it and gives /usr/sbin/ipsec back to strongSwan.
    _dpkg(box, "-r", "ipsec-supervisor")
    assert box.run(["kill", "-0", str(charon)], check=False).returncode != 0
    assert _diversion(box) == "" and _sha(box, SBIN_IPSEC) == box.original_ipsec
    assert not os.path.lexists(box.path(DIVERTED))
    assert not os.path.exists(box.path(f"/lib/systemd/system/{UNIT}"))
    assert not os.path.exists(box.path(PREFIX))                  # no byte-code left behind either
    assert box.show(UNIT, "LoadState")["LoadState"] in ("not-found", "masked")
    assert os.path.exists(box.path("/etc/ipsec-supervisor/supervisor.yaml"))   # conffile until purge
    _dpkg(box, "--purge", "ipsec-supervisor")
    assert not os.path.exists(box.path("/etc/ipsec-supervisor"))
    assert not os.path.exists(box.path("/etc/strongswan.d/ipsec-supervisor.conf"))


@container_tier
def test_first_install_without_strongswan_units_enables_and_starts_it(box, deb):
    box.systemctl("disable", STARTER, "strongswan.service")
    r = _dpkg(box, "-i", deb)
    assert "was left disabled" not in r.stdout
    assert box.systemctl("is-enabled", UNIT, check=False).stdout.strip() == "enabled"
    assert box.systemctl("is-active", UNIT, check=False).stdout.strip() == "active"
    charon = _wait(lambda: _charon_pid(box), what="charon")
    assert "ipsvdeb" in _conns(box)

    # Installing it again (an upgrade, for dpkg): the diversion stays, the running supervisor
    # is restarted on the new files, the operator's enablement is kept.
    main = box.show(UNIT, "MainPID")["MainPID"]
    _dpkg(box, "-i", deb)
    assert _diversion(box) == f"diversion of {SBIN_IPSEC} to {DIVERTED} by ipsec-supervisor"
    p = box.show(UNIT, "ActiveState", "MainPID")
    assert p["ActiveState"] == "active" and p["MainPID"] not in ("0", main), p
    charon = _wait(lambda: _charon_pid(box), what="charon after the upgrade")
    box.systemctl("disable", UNIT)
    _dpkg(box, "-i", deb)
    assert box.systemctl("is-enabled", UNIT, check=False).stdout.strip() == "disabled"

    _dpkg(box, "--purge", "ipsec-supervisor")
    assert box.run(["kill", "-0", str(charon)], check=False).returncode != 0
    assert box.systemctl("is-enabled", UNIT, check=False).stdout.strip() in ("", "not-found")
    assert _sha(box, SBIN_IPSEC) == box.original_ipsec


SECOND_CONN = """\
connections {
  ipsvdeb-second {
    remote_addrs = 192.0.2.3
    local { auth = psk }
    remote { auth = psk }
  }
}
"""


def _ours_in_run(c: nspawn.Container) -> list[str]:
    """What of charon's and ipsec-supervisor's stays in /run after a stop (the ledger may: it
    is kept on purpose, to survive restarts, and names the charon it describes)."""
    left = [f"/run/{n}" for n in ("charon.pid", "charon.ctl", "charon.vici", "starter.charon.pid")
            if os.path.lexists(c.path(f"/run/{n}"))]
    run_dir = c.path("/run/ipsec-supervisor")
    if os.path.isdir(run_dir):
        left += [f"/run/ipsec-supervisor/{n}" for n in sorted(os.listdir(run_dir)) if n != "ledger.json"]
    return left


def _start_debians_unit(box: nspawn.Container, deb: str) -> tuple[str, int]:
    """The package installed, Debian's strongswan-starter.service started: (MainPID, charon's pid)."""
    box.systemctl("enable", STARTER)
    _dpkg(box, "-i", deb)
    unit = box.run(["systemctl", "cat", STARTER]).stdout
    assert "ExecStart=/usr/sbin/ipsec start --nofork" in unit and "ExecReload=/usr/sbin/ipsec reload" in unit
    assert box.show(STARTER, "KillMode")["KillMode"] == "control-group"
    box.systemctl("start", STARTER)
    charon = _wait(lambda: _charon_pid(box), what="charon under strongswan-starter.service")
    _wait(lambda: "ipsvdeb" in _conns(box), what="swanctl connection loaded")
    main = box.show(STARTER, "MainPID")["MainPID"]
    cmdline = open(box.path(f"/proc/{main}/cmdline"), "rb").read().split(b"\0")
    assert cmdline[1:4] == [SBIN_IPSEC.encode(), b"start", b"--nofork"], cmdline
    return main, charon


@container_tier
def test_debians_strongswan_starter_unit_runs_our_ipsec(box, deb):
    """Debian's own unit file, unchanged: ExecStart=/usr/sbin/ipsec start --nofork, ExecReload=
    /usr/sbin/ipsec reload, default KillMode (SIGTERM to every process of the unit)."""
    main, charon = _start_debians_unit(box, deb)
    r = box.run([SBIN_IPSEC, "status"], check=False)
    assert r.returncode == 0 and f"charon running (pid {charon})" in r.stdout and "ROUTED" in r.stdout

    # reload: ExecReload exits 0 (systemctl reload would fail otherwise) and charon has the new conn.
    box.write("/etc/swanctl/conf.d/ipsvdeb-second.conf", SECOND_CONN, 0o600)
    box.systemctl("reload", STARTER)
    _wait(lambda: "ipsvdeb-second" in _conns(box), timeout=15, what="second connection after reload")
    p = box.show(STARTER, "ActiveState", "MainPID", "NRestarts")
    assert (p["ActiveState"], p["MainPID"], p["NRestarts"]) == ("active", main, "0")
    assert _charon_pid(box) == charon                           # reloaded, not restarted

    # stop: SIGTERM to the whole unit; charon goes and the unit ends cleanly.
    box.systemctl("stop", STARTER)
    p = box.show(STARTER, "ActiveState", "Result", "ExecMainStatus")
    assert (p["ActiveState"], p["Result"], p["ExecMainStatus"]) == ("inactive", "success", "0"), p
    assert box.run(["kill", "-0", str(charon)], check=False).returncode != 0
    assert box.run([SBIN_IPSEC, "status"], check=False).returncode == 3
    assert box.run(["ip", "xfrm", "policy"]).stdout.strip() == ""
    _dpkg(box, "--purge", "ipsec-supervisor")


@container_tier
def test_removal_stops_a_supervisor_that_debians_strongswan_starter_runs(box, deb):
    _main, charon = _start_debians_unit(box, deb)
    r = _dpkg(box, "-r", "ipsec-supervisor")
    assert "/usr/sbin/ipsec is strongSwan's again" in r.stdout
    assert box.run(["kill", "-0", str(charon)], check=False).returncode != 0
    assert box.systemctl("is-active", STARTER, check=False).stdout.strip() == "inactive"
    assert _sha(box, SBIN_IPSEC) == box.original_ipsec


@container_tier
def test_debians_strongswan_starter_stop_leaves_nothing_of_ours_in_run(box, deb):
    _main, charon = _start_debians_unit(box, deb)
    box.systemctl("stop", STARTER)
    assert box.run(["kill", "-0", str(charon)], check=False).returncode != 0
    assert _ours_in_run(box) == []


@container_tier
def test_make_install_ipsec_divert_replaces_usr_sbin_ipsec_and_uninstall_restores_it(box, tmp_path):
    wheel = build_wheel(tmp_path / "wheels")
    # tmp_path is not in the container (its /tmp is its own): copy the wheel in through its overlay.
    inside = f"/var/tmp/{os.path.basename(wheel)}"
    shutil.copy(wheel, box.path(inside))
    make = ["make", "--no-print-directory", "-C", ROOT, "-f", "tools/install.mk"]
    args = ["IPSEC_DIVERT=yes", f"INSTALL_FROM={inside}", "PIP_ARGS=--no-deps --no-index"]
    r = box.run([*make, "install", *args], check=False, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{SBIN_IPSEC} is ours (strongSwan's script: {DIVERTED})" in r.stdout
    assert _diversion(box) == f"local diversion of {SBIN_IPSEC} to {DIVERTED}"
    assert os.readlink(box.path(SBIN_IPSEC)) == "/opt/ipsec-supervisor/bin/ipsec"
    assert _sha(box, DIVERTED) == box.original_ipsec
    # Twice is fine (the diversion is already ours).
    r = box.run([*make, "install", *args], check=False, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr

    r = box.run([*make, "uninstall"], check=False, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{SBIN_IPSEC} is strongSwan's again" in r.stdout
    assert _diversion(box) == "" and _sha(box, SBIN_IPSEC) == box.original_ipsec
    assert not os.path.lexists(box.path(DIVERTED))
    assert not os.path.exists(box.path("/opt/ipsec-supervisor"))
    assert not os.path.lexists(box.path("/usr/local/sbin/ipsec-supervisor"))
    assert os.path.exists(box.path("/etc/ipsec-supervisor/supervisor.yaml"))      # configuration kept


@container_tier
def test_make_install_ipsec_divert_without_dpkg_renames_and_uninstall_renames_back(box, tmp_path):
    wheel = build_wheel(tmp_path / "wheels")
    inside = f"/var/tmp/{os.path.basename(wheel)}"
    shutil.copy(wheel, box.path(inside))
    box.run(["mv", "/usr/bin/dpkg-divert", "/usr/bin/dpkg-divert.hidden"])     # a system without dpkg
    make = ["make", "--no-print-directory", "-C", ROOT, "-f", "tools/install.mk"]
    r = box.run([*make, "install", "IPSEC_DIVERT=yes", f"INSTALL_FROM={inside}", "PIP_ARGS=--no-deps --no-index"],
                check=False, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert os.readlink(box.path(SBIN_IPSEC)) == "/opt/ipsec-supervisor/bin/ipsec"
    assert _sha(box, DIVERTED) == box.original_ipsec
    r = box.run([*make, "uninstall"], check=False, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert _sha(box, SBIN_IPSEC) == box.original_ipsec and not os.path.lexists(box.path(DIVERTED))


@container_tier
def test_make_install_ipsec_divert_refuses_when_the_package_diverted_it(box, deb, tmp_path):
    _dpkg(box, "-i", deb)
    r = box.run(["make", "--no-print-directory", "-C", ROOT, "-f", "tools/install.mk", "install",
                 "IPSEC_DIVERT=yes", "INSTALL_FROM=/nonexistent"], check=False, timeout=120)
    assert r.returncode != 0
    assert f"{SBIN_IPSEC} is already diverted by the package ipsec-supervisor" in r.stderr
