"""A real charon in a network namespace with a private /run: plain, or under `ipsec-supervisor run`.

For the host tests (tests/test_recovery_charon.py) and the real-kernel VM tests alike:

    from charon_ns import start_supervised_charon, start_charon

    sup = start_supervised_charon("moon", workdir, swanctl_conf=SWANCTL, mode="adopt",
                                  supervisor={"recovery": {"adopt_grace": "5s"}})
    sup.wait_running()                     # charon ready, its configuration loaded
    pid = sup.kill_charon()                # kill -9; the supervisor recovers and restarts it
    sup.wait_running(restarts=1)
    sup.wait_recovered()                   # adoption finished, no fail-closed block left
    sup.list_sas(); sup.charon_log(); sup.crash_reports(); sup.snapshots()
    assert sup.stop() == 0                 # SIGTERM to the supervisor (recovery.on_stop applies)
    sup.cleanup()                          # kills whatever is left, always safe to call

    peer = start_charon("sun", workdir2, swanctl_conf=SUN)   # an unsupervised charon

How it runs: ``ip netns exec NS unshare -m --propagation private sh -c 'mount -t tmpfs tmpfs
/run && exec ...'``, so charon's /run/charon.pid and /run/charon.vici are private; from outside
they are under ``/proc/<pid>/root/run`` (``run_root``). Every file lives in WORKDIR:
strongswan.conf (STRONGSWAN_CONF in daemon.environment), swanctl/swanctl.conf (loaded with
``swanctl --load-all --file``), charon.log (charon's file log), supervisor.yaml, supervisor.log,
run/ (control socket, ledger) and state/ (crashes/, snapshots/). Adopt mode includes the
repository's etc/strongswan.d/ipsec-supervisor.conf (policy_update = yes) unless told not to.
Nothing needs the network beyond the namespace; nothing is left behind by ``cleanup``.
"""

from __future__ import annotations

import json
import os
import resource
import select
import signal
import subprocess
import sys
import time
from typing import Callable

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from supervisor import control, crashreport  # noqa: E402
from supervisor.errors import SupervisorError  # noqa: E402

CHARON = "/usr/lib/ipsec/charon"
SWANCTL = "/usr/sbin/swanctl"
SNIPPET = os.path.join(ROOT, "etc", "strongswan.d", "ipsec-supervisor.conf")
PLUGINS = ("random nonce openssl pem pkcs1 x509 revocation constraints pubkey aes sha1 sha2 hmac kdf gmp "
           "kernel-netlink socket-default vici updown")


def psk_swanctl_conf(name: str, *, start_action: str | None = "trap") -> str:
    """swanctl.conf of one PSK connection NAME (moon to sun at 192.0.2.2, child net to 10.1.0.0/16):
    what the real-charon tests load; with START_ACTION trap charon installs trap policies at once."""
    start = f"\n                     start_action = {start_action}" if start_action else ""
    return f"""\
connections {{
  {name} {{
    remote_addrs = 192.0.2.2
    local {{ auth = psk
            id = moon }}
    remote {{ auth = psk
             id = sun }}
    children {{ net {{ remote_ts = 10.1.0.0/16{start} }} }}
  }}
}}
secrets {{ ike-sun {{ id = sun
                    secret = 0sFpZAZqEN6Ti9sqt4ZP5EWcqx }} }}
"""


def trap_conns_conf(n: int, remote_ts, *, local_ts: str = "10.1.0.0/16", local: str = "192.0.2.1",
                    remote: str = "192.0.2.2", prefix: str = "c") -> str:
    """swanctl.conf of N PSK connections PREFIX0.. (moon to sun), each one trap child from LOCAL_TS to
    REMOTE_TS(i): charon installs 3N trap policies as it loads them (scale and burst tests)."""
    conns = "\n".join(f"""  {prefix}{i} {{
    local_addrs = {local}
    remote_addrs = {remote}
    local {{ auth = psk
            id = moon }}
    remote {{ auth = psk
             id = sun }}
    children {{ net {{ local_ts = {local_ts}
                     remote_ts = {remote_ts(i)}
                     start_action = trap }} }}
  }}""" for i in range(n))
    return f"connections {{\n{conns}\n}}\nsecrets {{ ike-sun {{ id = sun\n secret = 0sFpZAZqEN6Ti9sqt4ZP5EWcqx }} }}\n"


def strongswan_conf(log_path: str, *, ike_port: int = 500, nat_port: int = 4500, snippet: bool = True,
                    debug: int = 2, extra: str = "") -> str:
    """strongswan.conf for a test charon: explicit plugins, a file log, VICI under the private /run."""
    include = f"include {SNIPPET}\n" if snippet else ""
    return f"""\
charon {{
  load = {PLUGINS}
  port = {ike_port}
  port_nat_t = {nat_port}
  filelog {{
    test {{
      path = {log_path}
      time_format = %H:%M:%S
      time_add_ms = yes
      flush_line = yes
      append = yes
      default = 1
      knl = {debug}
      cfg = {debug}
      ike = {debug}
      chd = {debug}
    }}
  }}
  syslog {{
    daemon {{
      default = -1
    }}
  }}
  plugins {{
    vici {{
      socket = unix:///run/charon.vici
    }}
  }}
{extra}}}
swanctl {{
  load = pem pkcs1 x509 revocation constraints pubkey openssl random
}}
{include}"""


def wait_for_status(status: Callable[[], dict], proc, pred: Callable[[dict], bool], timeout: float,
                    what: str, log: Callable[[], str], poll: float = 0.05) -> dict:
    """Poll a supervisor's status until PRED holds; fail at once if the supervisor process exits."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"supervisor exited ({proc.returncode}) waiting for {what}:\n{log()}")
        try:
            last = status()
            if pred(last):
                return last
        except SupervisorError:
            pass
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}; last status {json.dumps(last, indent=1)}\n"
                         f"{log()[-6000:]}")


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _no_cores() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "JOURNAL_STREAM")}


class _CharonFiles:
    """The files a charon of ours needs, all under WORKDIR."""

    def __init__(self, workdir: str, swanctl_conf: str, strongswan: str | None, snippet: bool,
                 ike_port: int, nat_port: int):
        self.dir = workdir
        for sub in ("", "x509", "x509ca", "x509ocsp", "x509aa", "x509ac", "x509crl", "pubkey", "private", "rsa",
                    "ecdsa", "bliss", "pkcs8", "pkcs12"):
            os.makedirs(os.path.join(workdir, "swanctl", sub), exist_ok=True)
        self.p: Callable[[str], str] = lambda name: os.path.join(workdir, name)
        self.log_path = self.p("charon.log")
        self.conf = self.p("strongswan.conf")
        with open(self.conf, "w") as fh:
            fh.write(strongswan if strongswan is not None else
                     strongswan_conf(self.log_path, ike_port=ike_port, nat_port=nat_port, snippet=snippet))
        self.swanctl = self.p("swanctl/swanctl.conf")
        self.write_swanctl(swanctl_conf)

    def write_swanctl(self, text: str) -> None:
        with open(self.swanctl, "w") as fh:
            fh.write(text)

    def load_argv(self) -> list[str]:
        return [SWANCTL, "--load-all", "--noprompt", "--file", self.swanctl, "--uri", "unix:///run/charon.vici"]

    def charon_log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as fh:
                return fh.read()
        except FileNotFoundError:
            return ""


class _Namespaced:
    """What both kinds share: the namespace's private /run and VICI through it."""

    proc: subprocess.Popen
    netns: str

    @property
    def run_root(self) -> str:
        """The private /run, seen from outside its mount namespace."""
        return f"/proc/{self.proc.pid}/root/run"

    @property
    def vici_path(self) -> str:
        return os.path.join(self.run_root, "charon.vici")

    def vici(self, command: str, message: dict | None = None, stream: str | None = None,
             timeout: float = 10.0) -> tuple[dict, list[dict]]:
        """One VICI command to this charon: (answer, streamed events)."""
        from supervisor.vici_client import vici_command
        return vici_command(self.vici_path, command, message, stream=stream, timeout=timeout)

    def list_sas(self) -> list[dict]:
        from supervisor.adopt import _text
        return [_text(dict(e)) for e in self.vici("list-sas", stream="list-sa")[1]]

    def list_conns(self) -> list[dict]:
        from supervisor.adopt import _text
        return [_text(dict(e)) for e in self.vici("list-conns", stream="list-conn")[1]]

    def initiate(self, child: str, ike: str | None = None, timeout_ms: int = 10000) -> dict:
        msg = {"child": child, "timeout": str(timeout_ms)}
        if ike:
            msg["ike"] = ike
        return self.vici("initiate", msg, stream="control-log", timeout=timeout_ms / 1000 + 5)[0]

    def _kill_namespace_leftovers(self) -> None:
        # Whatever still runs in the namespace from us (a charon whose parent was killed) goes too.
        out = subprocess.run(["ip", "netns", "pids", self.netns], capture_output=True, text=True).stdout.split()
        for pid in out:
            try:
                with open(f"/proc/{pid}/comm") as fh:
                    comm = fh.read().strip()
                if comm in ("charon", "swanctl", "_updown") or self._ours(int(pid)):
                    os.kill(int(pid), signal.SIGKILL)
            except (FileNotFoundError, ProcessLookupError, ValueError):
                pass

    def _ours(self, pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                return self.dir.encode() in fh.read()
        except FileNotFoundError:
            return False


class PlainCharon(_Namespaced, _CharonFiles):
    """charon alone (no supervisor), configuration loaded; ``pid`` is charon's."""

    def __init__(self, netns: str, workdir: str, *, swanctl_conf: str, strongswan: str | None = None,
                 snippet: bool = False, ike_port: int = 500, nat_port: int = 4500):
        _CharonFiles.__init__(self, workdir, swanctl_conf, strongswan, snippet, ike_port, nat_port)
        self.netns = netns
        self.pid: int | None = None
        load = " ".join(self.load_argv())
        script = (f"mount -t tmpfs tmpfs /run && STRONGSWAN_CONF={self.conf} {CHARON} & pid=$!; i=0; "
                  f"while [ ! -S /run/charon.vici ]; do i=$((i+1)); [ $i -lt 600 ] && kill -0 $pid || exit 3; "
                  f"sleep 0.05; done; {load} >/dev/null 2>&1; echo \"charon $pid\"; wait $pid")
        self.proc = subprocess.Popen(["ip", "netns", "exec", netns, "unshare", "-m", "--propagation", "private",
                                      "sh", "-c", script], stdout=subprocess.PIPE, text=True, env=_clean_env(),
                                     preexec_fn=_no_cores)

    def wait_ready(self, timeout: float = 60.0) -> "PlainCharon":
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line.startswith("charon "):
            raise AssertionError(f"charon in {self.netns} did not start:\n{self.charon_log()}")
        self.pid = int(line.split()[1])
        return self

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.pid is not None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass
        self.proc.wait(30)

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.kill()
        self._kill_namespace_leftovers()


class SupervisedCharon(_Namespaced, _CharonFiles):
    """`ipsec-supervisor run` supervising charon; status and control through its control socket."""

    def __init__(self, netns: str, workdir: str, *, swanctl_conf: str, mode: str = "adopt",
                 supervisor: dict | None = None, strongswan: str | None = None, snippet: bool | None = None,
                 ike_port: int = 500, nat_port: int = 4500, python: str = sys.executable,
                 default_load: bool = False):
        _CharonFiles.__init__(self, workdir, swanctl_conf, strongswan, mode == "adopt" if snippet is None
                              else snippet, ike_port, nat_port)
        self.netns = netns
        self.python = python
        cfg = {
            "daemon": {"command": [CHARON], "environment": {"STRONGSWAN_CONF": self.conf},
                       "load_commands": [self.load_argv()], "start_timeout": "30s"},
            "restart": {"okay_delay": "200ms", "backoff": {"initial": 0, "step": "200ms", "jitter": 0}},
            "health": {"interval": "2s", "timeout": "1500ms"},
            "paths": {"run_dir": self.p("run"), "state_dir": self.p("state")},
            "recovery": {"mode": mode},
        }
        # DEFAULT_LOAD: the supervisor's own `swanctl --load-all --noprompt` (daemon.config swanctl), reading
        # WORKDIR/swanctl bound over /etc/swanctl in the supervisor's mount namespace
        self.default_load = default_load
        if default_load:
            del cfg["daemon"]["load_commands"]
            cfg["daemon"]["config"] = "swanctl"
        self.config = _deep_merge(cfg, supervisor or {})
        self.config_path = self.p("supervisor.yaml")
        with open(self.config_path, "w") as fh:
            yaml.safe_dump(self.config, fh)
        self.proc: subprocess.Popen | None = None
        self._log = None

    def start(self, beside: int | None = None) -> "SupervisedCharon":
        """Run the supervisor; BESIDE: in the namespaces (network, mount: its /run) of that running pid,
        e.g. the charon a killed supervisor left behind."""
        if self._log is None or self._log.closed:
            self._log = open(self.p("supervisor.log"), "a")
        run = [self.python, "-m", "supervisor.cli", "run", "--config", self.config_path]
        if beside is not None:
            argv = ["nsenter", "-t", str(beside), "-n", "-m"] + run
        else:
            argv = ["ip", "netns", "exec", self.netns, "unshare", "-m", "--propagation", "private", "sh", "-c",
                    "mount -t tmpfs tmpfs /run && "
                    + (f"mount --bind {self.p('swanctl')} /etc/swanctl && " if self.default_load else "")
                    + "exec " + " ".join(run)]
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=_clean_env(), stdout=self._log, stderr=self._log,
                                     preexec_fn=_no_cores)
        return self

    # -- reading -------------------------------------------------------------------------
    def status(self) -> dict:
        return control.request(self.p("run"), "status", timeout=5)["status"]

    def wait(self, pred: Callable[[dict], bool], timeout: float = 30.0, what: str = "condition") -> dict:
        return wait_for_status(self.status, self.proc, pred, timeout, what, self.log, poll=0.05)

    def wait_running(self, restarts: int | None = None, timeout: float = 60.0) -> dict:
        """charon ready and its configuration loaded (after RESTARTS restarts, if given)."""
        return self.wait(lambda s: s["state"] == "running" and (restarts is None or s["restarts"] == restarts),
                         timeout, f"running, restarts={restarts}")

    def wait_recovered(self, timeout: float = 60.0) -> dict:
        """Adoption (if any) finished and no fail-closed block left."""
        def idle(s: dict) -> bool:
            r = s.get("recovery") or {}
            adoption = r.get("adoption")
            return s["state"] == "running" and not r.get("blocks") and (adoption is None or adoption["state"] == "done")
        return self.wait(idle, timeout, "recovery finished")

    @property
    def charon_pid(self) -> int:
        return self.status()["daemon"]["pid"]

    def log(self) -> str:
        try:
            with open(self.p("supervisor.log"), errors="replace") as fh:
                return fh.read()
        except FileNotFoundError:
            return ""

    def crash_reports(self, wait_for: int = 0, timeout: float = 30.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            found = [r for _, r in crashreport.read_crash_reports(os.path.join(self.p("state"), "crashes"))]
            if len(found) >= wait_for or time.monotonic() > deadline:
                return found
            time.sleep(0.05)

    def snapshots(self) -> list[str]:
        directory = os.path.join(self.p("state"), "snapshots")
        try:
            return sorted(os.path.join(directory, n) for n in os.listdir(directory) if n.endswith(".json"))
        except FileNotFoundError:
            return []

    # -- acting ----------------------------------------------------------------------------
    def kill_charon(self, sig: int = signal.SIGKILL) -> int:
        """Send SIG to the supervised charon; returns its pid."""
        pid = self.charon_pid
        os.kill(pid, sig)
        return pid

    def request(self, command: str) -> dict:
        """A control-socket command: status, stop, start, restart, reload, reload-daemon."""
        return control.request(self.p("run"), command, timeout=10)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM to the supervisor; its exit code."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc is not None:
            self._kill_namespace_leftovers()
        if self._log:
            self._log.close()


def start_charon(netns: str, workdir: str, *, swanctl_conf: str, strongswan: str | None = None,
                 snippet: bool = False, ike_port: int = 500, nat_port: int = 4500,
                 timeout: float = 60.0) -> PlainCharon:
    """charon alone in NETNS with a private /run, configuration loaded (returns once ready)."""
    return PlainCharon(netns, workdir, swanctl_conf=swanctl_conf, strongswan=strongswan, snippet=snippet,
                       ike_port=ike_port, nat_port=nat_port).wait_ready(timeout)


def start_supervised_charon(netns: str, workdir: str, *, swanctl_conf: str, mode: str = "adopt",
                            supervisor: dict | None = None, strongswan: str | None = None,
                            snippet: bool | None = None, ike_port: int = 500, nat_port: int = 4500,
                            python: str = sys.executable, wait: bool = True,
                            timeout: float = 60.0, default_load: bool = False) -> SupervisedCharon:
    """`ipsec-supervisor run` for charon in NETNS (recovery.mode MODE; SUPERVISOR: more config, merged).

    Returns once charon runs with its configuration loaded (wait=False: right after the start).
    """
    sup = SupervisedCharon(netns, workdir, swanctl_conf=swanctl_conf, mode=mode, supervisor=supervisor,
                           strongswan=strongswan, snippet=snippet, ike_port=ike_port, nat_port=nat_port,
                           python=python, default_load=default_load).start()
    if wait:
        try:
            sup.wait_running(timeout=timeout)
        except BaseException:
            sup.cleanup()
            raise
    return sup
