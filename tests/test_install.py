"""`make install` (tools/install.mk, tools/install.sh) into a DESTDIR, without the network.

pip installs a wheel of this tree that the test builds itself (the build backend would need
the package registry); everything else is what a real `make install` does.
"""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import tomllib
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = "/usr/bin/python3"
PREFIX = "/opt/ipsec-supervisor"

pytestmark = pytest.mark.skipif(
    not os.access(PYTHON, os.X_OK) or subprocess.run([PYTHON, "-c", "import ensurepip, venv"]).returncode != 0,
    reason=f"needs {PYTHON} with venv (Debian: python3-venv)")


def build_wheel(directory) -> str:
    """A pure-Python wheel of supervisor/ with the project's metadata and console scripts."""
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
        project = tomllib.load(fh)["project"]
    name, version = project["name"], project["version"]
    dist = f"{name.replace('-', '_')}-{version}"
    files: dict[str, bytes] = {}
    for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, "supervisor")):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for f in filenames:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                with open(path, "rb") as fh:
                    files[os.path.relpath(path, ROOT)] = fh.read()
    scripts = "".join(f"{k} = {v}\n" for k, v in project["scripts"].items())
    files[f"{dist}.dist-info/METADATA"] = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode()
    files[f"{dist}.dist-info/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: test_install\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    files[f"{dist}.dist-info/entry_points.txt"] = f"[console_scripts]\n{scripts}".encode()
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist}.dist-info/RECORD,,")
    files[f"{dist}.dist-info/RECORD"] = ("\n".join(record) + "\n").encode()
    os.makedirs(directory, exist_ok=True)
    wheel = os.path.join(directory, f"{dist}-py3-none-any.whl")
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, data in files.items():
            zf.writestr(path, data)
    return wheel


def make_install(dest, wheel, **extra) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PREFIX", "BINDIR", "IPSEC_LINK", "DESTDIR")}
    env.update({"DESTDIR": str(dest), "INSTALL_FROM": wheel, "PIP_ARGS": "--no-deps --no-index",
                "INSTALL_PYTHON": PYTHON, **extra})
    r = subprocess.run(["make", "--no-print-directory", "-f", "tools/install.mk", "install"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def test_make_install_into_a_destdir(tmp_path):
    wheel = build_wheel(tmp_path / "wheels")
    dest = tmp_path / "root"
    r = make_install(dest, wheel)
    venv = dest / PREFIX.lstrip("/")

    # The package, with scripts that name PREFIX, not the staging directory.
    script = (venv / "bin" / "ipsec-supervisor").read_text()
    assert script.splitlines()[0] in (f"#!{PREFIX}/bin/python", f"#!{PREFIX}/bin/python3") and str(dest) not in script
    assert str(dest) not in (venv / "pyvenv.cfg").read_text()
    site = next((venv / "lib").glob("python3*/site-packages"))
    assert (site / "supervisor" / "ipsec_cli.py").exists()
    assert (venv / "bin" / "ipsec").exists()

    # The unit, the placeholder replaced.
    unit = (dest / "usr/local/lib/systemd/system/ipsec-supervisor.service").read_text()
    shipped = open(os.path.join(ROOT, "etc", "ipsec-supervisor.service")).read()
    assert f"ExecStart={PREFIX}/bin/ipsec-supervisor run" in unit
    assert unit == shipped.replace("/usr/local/bin/ipsec-supervisor", f"{PREFIX}/bin/ipsec-supervisor")

    # Configuration, snippet, docs, commands.
    config = dest / "etc/ipsec-supervisor/supervisor.yaml"
    assert config.read_text() == open(os.path.join(ROOT, "etc", "supervisor.yaml")).read()
    snippet = os.path.join(ROOT, "etc", "strongswan.d", "ipsec-supervisor.conf")
    assert (dest / "etc/strongswan.d/ipsec-supervisor.conf").exists() == os.path.exists(snippet)
    assert (dest / "usr/local/share/doc/ipsec-supervisor/README.md").exists()
    # The charon.user drop-in is shipped next to the README, not enabled.
    drop_in = open(os.path.join(ROOT, "etc", "ipsec-supervisor.service.d", "charon-user.conf")).read()
    assert (dest / "usr/local/share/doc/ipsec-supervisor/charon-user.conf").read_text() == drop_in
    assert not (dest / "usr/local/lib/systemd/system/ipsec-supervisor.service.d").exists()
    # The alert rules are for the Prometheus server: shipped next to the README.
    rules = open(os.path.join(ROOT, "etc", "prometheus", "ipsec-supervisor-rules.yml")).read()
    assert (dest / "usr/local/share/doc/ipsec-supervisor/ipsec-supervisor-rules.yml").read_text() == rules
    assert not (dest / "etc/systemd/system/ipsec-supervisor.service.d").exists()
    assert os.readlink(dest / "usr/local/sbin/ipsec-supervisor") == f"{PREFIX}/bin/ipsec-supervisor"
    assert not (dest / "usr/local/sbin/ipsec").exists()            # Debian's /usr/sbin/ipsec is not shadowed
    assert "not linked onto PATH" in r.stdout

    # The installed package runs (its dependencies borrowed from the development environment).
    deps = next(p for p in sys.path if p.endswith("site-packages"))
    run = subprocess.run([str(venv / "bin" / "python"), "-c",
                          "import supervisor, supervisor.ipsec_cli as c; print(supervisor.__file__); "
                          "raise SystemExit(c.main(['--help']))"],
                         env={"PYTHONPATH": deps, "PATH": "/usr/bin:/bin"}, cwd=tmp_path, capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[0].startswith(str(site)) and "exit codes:" in run.stdout

    # A second install keeps a changed configuration and puts the shipped one next to it.
    config.write_text(config.read_text() + "\n# local change\n")
    r = make_install(dest, wheel, IPSEC_LINK="yes")
    assert "# local change" in config.read_text()
    assert (dest / "etc/ipsec-supervisor/supervisor.yaml.dist").read_text() == \
        open(os.path.join(ROOT, "etc", "supervisor.yaml")).read()
    assert "was changed locally and is kept" in r.stdout
    assert os.readlink(dest / "usr/local/sbin/ipsec") == f"{PREFIX}/bin/ipsec"   # asked for: linked
