"""A real charon per lab site: plain, under strongSwan's starter, or under ``ipsec-supervisor run``.

Each runs as ``ip netns exec NS unshare -m sh -c '...'``: a private tmpfs on /run (pid files and
sockets of the two sites cannot collide) and the site's own strongswan.conf, swanctl.conf and
ipsec.conf/ipsec.secrets bind-mounted over /etc in that private mount namespace only, so
nothing is written outside the lab's work folder and everything vanishes with the processes.
From outside, charon's /run is ``/proc/<pid>/root/run``.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

import yaml

from .topology import Lab, LabError, Site, Tunnel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHARON = "/usr/lib/ipsec/charon"
STARTER = "/usr/lib/ipsec/starter"
SWANCTL = "/usr/sbin/swanctl"
UPDOWN = "/usr/lib/ipsec/_updown"
PSK = "lab-secret-not-for-production"
KINDS = ("plain", "starter", "supervisor")


@dataclass(frozen=True, slots=True)
class LabSettings:
    """Knobs shared by both sites (times in seconds)."""

    child_rekey: int = 3600          # CHILD_SA rekey_time
    child_life_time: int = 0         # CHILD_SA hard life_time; 0: 10 % after child_rekey
    ike_rekey: int = 14400
    # A typical site-to-site peer: DPD every 30 s, and a timed-out exchange (DPD or any other)
    # restarts the CHILD_SA under a new IKE_SA.  Without it a responder crash can leave the
    # tunnel down for good: the peer gives up on its rekeying and never comes back.
    dpd_delay: int = 30
    dpd_action: str = "restart"
    moon_updown: bool = True         # moon runs _updown with iptables (leftfirewall): firewall leftovers
    charon_debug: int = 1            # filelog level for ike/cfg/knl/chd
    recovery: dict = field(default_factory=dict)   # extra keys of the supervisor's recovery section
    supervisor: dict = field(default_factory=dict)  # other supervisor config sections (merged)

    @property
    def child_life(self) -> int:
        return self.child_life_time or self.child_rekey + max(1, self.child_rekey // 10)


SUPERVISOR_SNIPPET = os.path.join(ROOT, "etc", "strongswan.d", "ipsec-supervisor.conf")


def strongswan_conf(logfile: str, debug: int, includes: tuple[str, ...] = ()) -> str:
    """strongswan.conf for one site: Debian's plugins, a file log and stderr (the supervisor's pty).

    ``includes``: extra files, e.g. the supervisor's snippet (what `make install` puts into
    /etc/strongswan.d/ on a real machine)."""
    levels = f"default = 1\n      ike = {debug}\n      cfg = {debug}\n      knl = {debug}\n      chd = {debug}"
    return f"""\
charon {{
  load_modular = yes
  plugins {{
    include /etc/strongswan.d/charon/*.conf
  }}
  filelog {{
    lab {{
      path = {logfile}
      time_format = %H:%M:%S
      time_add_ms = yes
      ike_name = yes
      flush_line = yes
      append = yes
      {levels}
    }}
    stderr {{
      ike_name = yes
      {levels}
    }}
  }}
}}
include /etc/strongswan.d/*.conf
""" + "".join(f"include {path}\n" for path in includes)


def swanctl_conf(site: Site, tunnels: tuple[Tunnel, ...], settings: LabSettings) -> str:
    """One connection per tunnel, each with its own IKE identities (separate IKE_SAs)."""
    conns, secrets = [], []
    for t in tunnels:
        me, peer = (("moon", "sun") if site.name == "moon" else ("sun", "moon"))
        local_ts, remote_ts = (t.moon_net, t.sun_net) if site.name == "moon" else (t.sun_net, t.moon_net)
        action = t.moon_action if site.name == "moon" else t.sun_action
        updown = f"\n        updown = {UPDOWN} iptables" if site.name == "moon" and settings.moon_updown else ""
        conns.append(f"""\
  {t.name} {{
    version = 2
    local_addrs = {site.outer}
    remote_addrs = {site.peer}
    proposals = aes128-sha256-x25519
    rekey_time = {settings.ike_rekey}s
    dpd_delay = {settings.dpd_delay}s
    local {{
      auth = psk
      id = {me}-{t.name}
    }}
    remote {{
      auth = psk
      id = {peer}-{t.name}
    }}
    children {{
      {t.name} {{
        local_ts = {local_ts}
        remote_ts = {remote_ts}
        esp_proposals = aes128gcm16
        rekey_time = {settings.child_rekey}s
        life_time = {settings.child_life}s
        start_action = {action}
        dpd_action = {settings.dpd_action}
        reqid = {t.index}{updown}
      }}
    }}
  }}
""")
        secrets.append(f"""\
  ike-{t.name} {{
    id-1 = moon-{t.name}
    id-2 = sun-{t.name}
    secret = "{PSK}"
  }}
""")
    return "connections {\n" + "".join(conns) + "}\nsecrets {\n" + "".join(secrets) + "}\n"


def ipsec_conf(site: Site, tunnels: tuple[Tunnel, ...], settings: LabSettings) -> str:
    """The same connections for strongSwan's starter (ipsec.conf), the baseline."""
    auto = {"start": "start", "none": "add", "trap": "route"}
    margin = settings.child_life - settings.child_rekey
    out = [f"""\
config setup
    uniqueids = yes

conn %default
    keyexchange = ikev2
    ike = aes128-sha256-x25519!
    esp = aes128gcm16!
    authby = secret
    left = {site.outer}
    right = {site.peer}
    ikelifetime = {settings.ike_rekey}s
    lifetime = {settings.child_life}s
    margintime = {margin}s
    rekeyfuzz = 100%
    dpddelay = {settings.dpd_delay}s
    dpdaction = {settings.dpd_action}
"""]
    for t in tunnels:
        me, peer = (("moon", "sun") if site.name == "moon" else ("sun", "moon"))
        local_ts, remote_ts = (t.moon_net, t.sun_net) if site.name == "moon" else (t.sun_net, t.moon_net)
        action = t.moon_action if site.name == "moon" else t.sun_action
        fw = "\n    leftfirewall = yes" if site.name == "moon" and settings.moon_updown else ""
        out.append(f"""
conn {t.name}
    leftid = {me}-{t.name}
    rightid = {peer}-{t.name}
    leftsubnet = {local_ts}
    rightsubnet = {remote_ts}
    reqid = {t.index}
    auto = {auto[action]}{fw}
""")
    return "".join(out)


def ipsec_secrets(tunnels: tuple[Tunnel, ...]) -> str:
    return "".join(f'moon-{t.name} sun-{t.name} : PSK "{PSK}"\n' for t in tunnels)


def supervisor_config(workdir: str, mode: str, settings: LabSettings) -> dict:
    """ipsec-supervisor's configuration for moon: the lab's defaults, generous for the slow VM."""
    daemon: dict = {"start_timeout": "30s", "load_timeout": "60s"}
    if "config" in _daemon_keys():
        daemon["config"] = "swanctl"   # the lab's connections are in swanctl.conf (not "auto")
    cfg: dict = {
        "daemon": daemon,
        # Every kill in the lab is a first crash after a stable run: restart at once.
        "restart": {"okay_delay": "500ms", "crash_loop": {"max_deaths": 0}},
        # The emulated VM can stall a VICI answer for seconds; a false "hung" would spoil a run.
        "health": {"interval": "5s", "timeout": "5s", "failures": 4},
        "paths": {"run_dir": os.path.join(workdir, "run"), "state_dir": os.path.join(workdir, "state")},
        "recovery": {"mode": mode, "timeout": "60s", **settings.recovery},
    }
    for section, values in settings.supervisor.items():
        if isinstance(values, dict):
            cfg.setdefault(section, {}).update(values)
        else:
            cfg[section] = values
    return cfg


def _daemon_keys() -> set[str]:
    """Keys this supervisor accepts under ``daemon`` (they grow as features land)."""
    import dataclasses
    from supervisor import config
    return {f.name for f in dataclasses.fields(config.DaemonConfig)}


def _no_core_dumps() -> None:
    # kill -9 leaves no core, but an abort (health probe) must not drop one into the cwd.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


class Charon:
    """One site's charon (``kind`` plain | starter | supervisor) with its private /run and /etc files."""

    def __init__(self, lab: Lab, site: Site, workdir: str, kind: str = "plain", *,
                 settings: LabSettings = LabSettings(), mode: str = "none"):
        if kind not in KINDS:
            raise ValueError(f"charon kind must be one of {', '.join(KINDS)}, not {kind!r}")
        self.lab, self.site, self.kind, self.settings, self.mode = lab, site, kind, settings, mode
        self.dir = os.path.join(workdir, site.name)
        os.makedirs(self.dir, exist_ok=True)
        self.proc: subprocess.Popen | None = None
        self._out = None
        self.charon_log = self.path("charon.log")
        self.output_log = self.path(f"{kind}.out")   # the tree's stdout/stderr (supervisor log, charon stderr)
        self._write_configs()

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def _write(self, name: str, text: str, mode: int = 0o644) -> str:
        p = self.path(name)
        with open(p, "w") as fh:
            fh.write(text)
        os.chmod(p, mode)
        return p

    def _write_configs(self) -> None:
        s, t = self.site, self.lab.tunnels
        includes = (SUPERVISOR_SNIPPET,) if self.kind == "supervisor" and os.path.exists(SUPERVISOR_SNIPPET) else ()
        self._write("strongswan.conf", strongswan_conf(self.charon_log, self.settings.charon_debug, includes))
        self._write("swanctl.conf", swanctl_conf(s, t, self.settings), 0o600)
        self._write("ipsec.conf", ipsec_conf(s, t, self.settings))
        self._write("ipsec.secrets", ipsec_secrets(t), 0o600)
        if self.kind == "supervisor":
            cfg = supervisor_config(self.dir, self.mode, self.settings)
            self.run_dir = cfg["paths"]["run_dir"]
            self.state_dir = cfg["paths"]["state_dir"]
            self._write("supervisor.yaml", yaml.safe_dump(cfg, sort_keys=False))

    def _script(self) -> str:
        # Each kind sees only the configuration it uses: swanctl's, or the starter's ipsec.conf.
        binds = [("strongswan.conf", "/etc/strongswan.conf")]
        if self.kind == "starter":
            binds += [("ipsec.conf", "/etc/ipsec.conf"), ("ipsec.secrets", "/etc/ipsec.secrets")]
        else:
            binds += [("swanctl.conf", "/etc/swanctl/swanctl.conf")]
        mounts = " && ".join(["mount -t tmpfs -o mode=0755 tmpfs /run"] +
                             [f"mount --bind {self.path(a)} {b}" for a, b in binds])
        command = {
            "plain": CHARON,
            "starter": f"{STARTER} --nofork",
            "supervisor": f"{sys.executable} -m supervisor.cli run --config {self.path('supervisor.yaml')}",
        }[self.kind]
        return f"{mounts} && exec {command}"

    def start(self) -> "Charon":
        """Start the tree (returns at once; see ``wait_ready``)."""
        self._out = open(self.output_log, "w")
        env = {k: v for k, v in os.environ.items()
               if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM", "LISTEN_FDS")}
        # `ip netns exec` (not nsenter) also gives the tree a /sys of its own namespace.
        argv = ["ip", "netns", "exec", self.site.netns, "unshare", "-m", "--propagation", "private",
                "sh", "-c", self._script()]
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=self._out,
                                     stderr=subprocess.STDOUT, preexec_fn=_no_core_dumps)
        return self

    @property
    def run_root(self) -> str:
        """This tree's private /run, seen from outside its mount namespace."""
        return f"/proc/{self.proc.pid}/root/run"

    def charon_pid(self) -> int | None:
        """The live charon's pid (from its pid file), or None."""
        try:
            with open(os.path.join(self.run_root, "charon.pid")) as fh:
                pid = int(fh.read().strip())
            with open(f"/proc/{pid}/comm") as fh:
                return pid if fh.read().strip() == "charon" else None
        except (OSError, ValueError):
            return None

    def vici(self, timeout: float = 10.0):
        """A VICI session to this charon (close it with ``session.transport.socket.close()``)."""
        import vici
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(os.path.join(self.run_root, "charon.vici"))
        except OSError:
            sock.close()
            raise
        return vici.Session(sock)

    def loaded_conns(self, timeout: float = 5.0) -> set[str]:
        """Connection names charon has loaded; empty when it does not answer within TIMEOUT."""
        try:
            s = self.vici(timeout=timeout)
        except OSError:
            return set()
        try:
            return {name for conn in s.list_conns() for name in conn}
        except Exception:
            return set()
        finally:
            _close(s)

    def list_child_sas(self) -> list[dict]:
        """Every CHILD_SA charon knows: {ike, name, state, spi_in, spi_out, reqid} (spis as ints);
        OSError when charon does not answer in time (see _listed)."""
        s = self.vici(timeout=10.0)
        try:
            out = []
            for ike in _listed(s):
                for ike_name, ike_sa in ike.items():
                    for child in (ike_sa.get("child-sas") or {}).values():
                        out.append({
                            "ike": ike_name, "name": _s(child.get("name")), "state": _s(child.get("state")),
                            "reqid": int(_s(child.get("reqid")) or 0),
                            "spi_in": int(_s(child.get("spi-in")) or "0", 16),
                            "spi_out": int(_s(child.get("spi-out")) or "0", 16),
                        })
            return out
        finally:
            _close(s)

    def ike_conns(self) -> set[str]:
        """Connections with an IKE_SA in any state (established or on its way)."""
        s = self.vici(timeout=30.0)
        try:
            return {_s(name) for ike in _listed(s) for name in ike}
        finally:
            _close(s)

    def installed_children(self) -> set[str]:
        """Names of the CHILD_SAs charon reports INSTALLED (one VICI listing for all)."""
        return {c["name"] for c in self.list_child_sas() if c["state"] == "INSTALLED"}

    def initiate_many(self, children: list[str]) -> None:
        """Ask charon to establish each child (connection of the same name) without waiting (VICI timeout -1)."""
        s = self.vici(timeout=60.0)
        try:
            for child in children:
                for _ in s.initiate({"child": child, "ike": child, "timeout": "-1", "init-limits": "no"}):
                    pass
        finally:
            _close(s)

    def cpu_seconds(self) -> float | None:
        """CPU time (user + system) the tree's top process used so far: the supervisor, or the starter."""
        try:
            with open(f"/proc/{self.proc.pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError, AttributeError):
            return None

    def child_installed(self, child: str) -> bool:
        """Does charon report an INSTALLED CHILD_SA named ``child``?"""
        try:
            return any(c["name"] == child and c["state"] == "INSTALLED" for c in self.list_child_sas())
        except OSError:
            return False

    def initiate(self, child: str, timeout: int = 60) -> None:
        """Bring ``child`` up from this side now (swanctl --initiate waits for the result)."""
        r = self.swanctl("--initiate", "--child", child, "--timeout", str(timeout), timeout=timeout + 30)
        if r.returncode != 0:
            raise LabError(f"{self.site.name}: swanctl --initiate --child {child} failed ({r.returncode}): "
                           f"{(r.stderr or r.stdout).strip()[-2000:]}")

    def terminate_ike(self, conn: str) -> None:
        """Drop every IKE_SA of connection ``conn`` at once (no DELETE exchange awaited)."""
        self.swanctl("--terminate", "--ike", conn, "--force", timeout=60)

    def swanctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run swanctl inside this tree's namespaces (its /run and its /etc binds)."""
        argv = ["nsenter", "-t", str(self.proc.pid), "-m", "-n", SWANCTL, *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)

    def wait_ready(self, timeout: float = 90.0) -> int:
        """Wait until charon runs with every lab connection loaded; returns its pid.

        A plain charon gets its swanctl configuration loaded here; the starter and the
        supervisor load their own."""
        want = {t.name for t in self.lab.tunnels}
        deadline = time.monotonic() + timeout
        loaded = False
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise LabError(f"{self.site.name}'s {self.kind} exited ({self.proc.returncode}) before charon "
                               f"was ready:\n{tail(self.output_log)}")
            pid = self.charon_pid()
            if pid and os.path.exists(os.path.join(self.run_root, "charon.vici")):
                if self.kind == "plain" and not loaded:
                    r = self.swanctl("--load-all", "--noprompt")
                    if r.returncode != 0:
                        raise LabError(f"swanctl --load-all in {self.site.name} failed ({r.returncode}): "
                                       f"{r.stderr.strip() or r.stdout.strip()}")
                    loaded = True
                # a hundred connections take the emulated VM's charon seconds to list
                if want <= self.loaded_conns(timeout=30.0 if len(want) > 20 else 5.0):
                    return pid
            time.sleep(0.2)
        raise LabError(f"{self.site.name}'s charon ({self.kind}) not ready with {', '.join(sorted(want))} loaded "
                       f"within {timeout:.0f}s:\n{tail(self.output_log)}")

    def kill_charon(self) -> tuple[int, float]:
        """``kill -9`` this site's charon; returns (its pid, wall-clock time of the kill)."""
        pid = self.charon_pid()
        if pid is None:
            raise LabError(f"{self.site.name} has no running charon to kill")
        t = time.time()
        os.kill(pid, signal.SIGKILL)
        return pid, t

    def stop(self, timeout: float = 30.0) -> int | None:
        """Stop the tree gently (SIGTERM: charon removes its own state), SIGKILL after ``timeout``."""
        rc = None
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                rc = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        elif self.proc:
            rc = self.proc.returncode
        if self._out:
            self._out.close()
            self._out = None
        return rc


def tail(path: str, lines: int = 30) -> str:
    try:
        with open(path, errors="replace") as fh:
            return "".join(fh.readlines()[-lines:])
    except OSError:
        return f"({path} not readable)"


def _s(v) -> str:
    if v is None:
        return ""
    return v.decode() if isinstance(v, (bytes, bytearray)) else str(v)


def _listed(session) -> list:
    """SESSION's list-sas, all of it; OSError when charon does not answer in time. (The vici package
    unregisters its event stream after a timed-out read and takes the late answer for the
    unregistration's: its SessionException hides the timeout, and a busy charon in the emulated VM
    answers a list of 200 tunnels' SAs late.)"""
    try:
        return list(session.list_sas())
    except OSError:
        raise
    except Exception as exc:
        if isinstance(exc.__context__, OSError):
            raise OSError(f"charon did not answer list-sas in time ({exc.__context__!r}, then: {exc})") from exc
        raise


def _close(session) -> None:
    try:
        session.transport.socket.close()
    except Exception:
        pass
