"""A real systemd 252 as PID 1 of a container, booted by systemd-nspawn from this machine's root.

The recipe of ../shared/notes/real-systemd.md: a private mount namespace with a tmpfs on
/run, a read-only bind of / under it, ``systemd-nspawn --volatile=overlay --register=no
--keep-unit --link-journal=no --console=pipe --private-network --machine=UNIQUE --boot --
--unit=basic.target``, the launcher in a cgroup of its own (removed afterwards), driven
with ``nsenter -t PID1 -a``, powered off with SIGRTMIN+4.  Everything written inside goes
to the overlay and is discarded.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from typing import Sequence

CGROUP_ROOTS = ("/sys/fs/cgroup/systemd", "/sys/fs/cgroup/unified")   # this host: hybrid layout
LAUNCH = """\
set -e
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir /run/root
mount --bind / /run/root
mount -o remount,bind,ro /run/root
exec systemd-nspawn -D /run/root "$@"
"""


def available() -> str | None:
    """Why containers cannot run here (None: they can)."""
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("systemd-nspawn", "nsenter", "unshare"):
        if not shutil.which(tool):
            return f"needs {tool} (Debian: systemd-container, util-linux)"
    if not os.path.exists("/lib/systemd/systemd"):
        return "needs systemd installed (/lib/systemd/systemd)"
    return None


def _cgroup_roots() -> list[str]:
    roots = [r for r in CGROUP_ROOTS if os.path.exists(os.path.join(r, "cgroup.procs"))]
    if not roots and os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
        roots = ["/sys/fs/cgroup"]                 # pure cgroup v2
    return roots


def _remove_tree(path: str) -> None:
    """rmdir a cgroup tree depth-first (cgroup directories only go with rmdir)."""
    if not os.path.isdir(path):
        return
    for entry in os.scandir(path):
        if entry.is_dir(follow_symlinks=False):
            _remove_tree(entry.path)
    for _ in range(50):
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.05)          # the last processes are still leaving
    raise OSError(f"cannot remove cgroup {path}: still busy")


class ContainerError(Exception):
    pass


class Container:
    """One booted container; ``run``/``systemctl``/``journal`` act inside it."""

    def __init__(self, prefix: str = "ipsvt", binds: Sequence[tuple[str, str]] = (),
                 private_network: bool = True, log_path: str | None = None, netns: str | None = None):
        self.machine = f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.binds = list(binds)
        # The container gets fresh /tmp and /run: a checkout there (CI clones anywhere) and its
        # .venv must be bound in at the same path, or the unit's ExecStart does not exist inside.
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        if any(root == top or root.startswith(top + "/") for top in ("/tmp", "/run", "/var/tmp")):
            if all(host != root for host, _ in self.binds):
                self.binds.append((root, root))
        self.private_network = private_network
        # NETNS (a name under /run/netns): the container shares that network namespace.  The
        # launcher enters it with nsenter --net (`ip netns exec` would remount /sys, and with it
        # hide the cgroup hierarchies nspawn needs); nspawn without --private-network keeps it.
        self.netns = netns
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.pid1: int | None = None
        self._log = None
        self._cgroups: list[str] = []

    # -- lifecycle ------------------------------------------------------
    def start(self, timeout: float = 30.0) -> "Container":
        roots = _cgroup_roots()
        self._cgroups = [os.path.join(r, self.machine) for r in roots]
        for path in self._cgroups:
            os.mkdir(path)
        procs = [os.path.join(p, "cgroup.procs") for p in self._cgroups]

        def enter_cgroup():      # runs in the launcher before exec: nspawn's cgroups go below ours
            for path in procs:
                with open(path, "w") as fh:
                    fh.write(str(os.getpid()))

        args = ["--volatile=overlay", "--register=no", "--keep-unit", "--link-journal=no", "--console=pipe",
                f"--machine={self.machine}"]
        if self.netns:
            args.append("--capability=CAP_NET_ADMIN")     # nspawn grants it by itself only to a private network
        elif self.private_network:
            args.append("--private-network")
        args += [f"--bind={host}:{inside}" for host, inside in self.binds]
        args += ["--boot", "--", "--unit=basic.target"]
        self._log = open(self.log_path, "w+") if self.log_path else subprocess.DEVNULL
        try:
            enter = ["nsenter", f"--net=/run/netns/{self.netns}"] if self.netns else []
            self.proc = subprocess.Popen([*enter, "unshare", "--mount", "--propagation", "private", "sh", "-c",
                                          LAUNCH, "launch", *args], stdin=subprocess.DEVNULL, stdout=self._log,
                                         stderr=self._log, preexec_fn=enter_cgroup)
            self.pid1 = self._wait_pid1(timeout)
            self._wait_booted(timeout)
        except BaseException:
            self.poweroff()
            raise
        return self

    def _wait_pid1(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ContainerError(f"systemd-nspawn exited with {self.proc.returncode}: {self.log()}")
            pid = self._find_pid1()
            if pid and os.path.exists(f"/proc/{pid}/root/run/systemd/private"):
                return pid
            time.sleep(0.02)
        raise ContainerError(f"container {self.machine} did not boot within {timeout:g}s: {self.log()}")

    def _find_pid1(self) -> int | None:
        """nspawn's child named systemd (the container's PID 1), seen from here."""
        assert self.proc is not None
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    stat = fh.read()
            except OSError:
                continue
            comm = stat[stat.index("(") + 1:stat.rindex(")")]
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
            if comm == "systemd" and ppid == self.proc.pid:
                return int(entry)
        return None

    def _wait_booted(self, timeout: float) -> None:
        r = self.run(["systemctl", "is-system-running", "--wait"], timeout=timeout, check=False)
        if r.stdout.strip() not in ("running", "degraded"):
            raise ContainerError(f"container {self.machine} is {r.stdout.strip()!r}: {r.stderr}")

    def poweroff(self, timeout: float = 20.0) -> None:
        """SIGRTMIN+4 (poweroff), wait for nspawn; SIGKILL as a fallback; remove our cgroups."""
        try:
            if self.proc is not None and self.proc.poll() is None:
                if self.pid1:
                    try:
                        os.kill(self.pid1, signal.SIGRTMIN + 4)
                    except ProcessLookupError:
                        pass
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    if self.pid1:
                        try:
                            os.kill(self.pid1, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                    try:
                        self.proc.wait(5)
                    except subprocess.TimeoutExpired:
                        self.proc.kill()
                        self.proc.wait()
        finally:
            self._kill_cgroups()
            for path in self._cgroups:
                _remove_tree(path)
            self._cgroups = []
            if self._log not in (None, subprocess.DEVNULL):
                self._log.close()
                self._log = None

    def _kill_cgroups(self) -> None:
        """Anything left in our cgroups (nothing, normally) is killed before the rmdir."""
        for path in self._cgroups:
            for dirpath, _dirs, files in os.walk(path):
                if "cgroup.procs" not in files:
                    continue
                try:
                    with open(os.path.join(dirpath, "cgroup.procs")) as fh:
                        pids = [int(p) for p in fh.read().split()]
                except OSError:
                    continue
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass

    def __enter__(self) -> "Container":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.poweroff()

    # -- acting inside --------------------------------------------------
    def run(self, argv: Sequence[str], *, input: str | None = None, timeout: float = 60.0,
            check: bool = True) -> subprocess.CompletedProcess:
        """Run ARGV in all of the container's namespaces (its systemd, network, /run)."""
        assert self.pid1
        r = subprocess.run(["nsenter", "-t", str(self.pid1), "-a", *argv], input=input, capture_output=True,
                           text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise ContainerError(f"{' '.join(argv)} exited with {r.returncode} in {self.machine}: "
                                 f"{r.stderr.strip() or r.stdout.strip()}")
        return r

    def systemctl(self, *args: str, check: bool = True, timeout: float = 120.0) -> subprocess.CompletedProcess:
        return self.run(["systemctl", *args], check=check, timeout=timeout)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.systemctl("show", unit, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, *args: str) -> list[dict]:
        """journalctl -o json ARGS, one dict per entry."""
        out = self.run(["journalctl", "--no-pager", "-o", "json", *args], check=False).stdout
        entries = []
        for line in out.splitlines():
            try:
                entries.append(json.loads(line))
            except ValueError:
                continue
        return entries

    def path(self, inside: str) -> str:
        """INSIDE (an absolute path in the container) as seen from here, for reading and writing files."""
        assert self.pid1
        return f"/proc/{self.pid1}/root{inside}"

    def write(self, inside: str, text: str, mode: int = 0o644) -> None:
        path = self.path(inside)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as fh:
            fh.write(text)
        os.chmod(path, mode)

    def log(self) -> str:
        if self._log in (None, subprocess.DEVNULL):
            return ""
        self._log.flush()
        self._log.seek(0)
        return self._log.read()[-4000:]
