"""One crash experiment: build the lab, bring tunnels up, ping, kill -9 moon's charon, watch, tear down.

``run_crash(Scenario(...), workdir)`` returns an ``Outcome`` with everything the demo's
report, the tunnel tests and the outage benchmark need.  It always removes the lab
(namespaces and processes) before returning or raising.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable

from .charon import Charon, LabSettings, tail
from .kernel_view import (FOREIGN_SCRIPT, SA, SiteView, add_lookalike_state, foreign_changes, read_view,
                          stale_sas)
from .topology import PEER_GUARD_GROUP, Lab, LabError, build_lab, make_lab, peer_guard_script, remove_lab
from .traffic import Capture, CapturedPacket, GuardLog, Pinger, PingResult, ping_until_answered

MOON_KINDS = ("supervisor", "starter", "plain")


@dataclass(frozen=True)
class Scenario:
    moon: str = "supervisor"              # supervisor | starter | plain (nothing restarts it)
    mode: str = "adopt"                   # recovery.mode when moon is supervised
    roles: tuple[str, ...] = ("initiator",)
    settings: LabSettings = field(default_factory=LabSettings)
    foreign: bool = True                  # another tool's state in moon, checked at the end
    peer_guard: bool = True               # sun drops (and logs) what would leave unprotected (topology)
    warmup: float = 3.0                   # seconds of traffic before the kill
    min_observe: float = 10.0             # watch at least this long after the kill
    settle: float = 3.0                   # ... and until every tunnel answered this long after its last loss
    max_observe: float = 120.0            # ... but never longer than this
    until_no_stale: bool = False          # ... and until moon holds no stale SA
    stale_probe_after: float = 0.0        # > 0: also count moon's stale SAs this long after the kill
    prefix: str = "ipsvlab"

    @property
    def label(self) -> str:
        return f"supervisor/{self.mode}" if self.moon == "supervisor" else self.moon


@dataclass
class Outcome:
    """What one crash experiment saw (wall-clock times from time.time())."""

    scenario: Scenario
    lab: Lab
    workdir: str
    kill_at: float = 0.0
    killed_pid: int = 0
    restarted_pid: int | None = None
    ready_again_at: float | None = None     # the new charon answered VICI with every connection loaded
    pings: dict[str, PingResult] = field(default_factory=dict)     # by moon's role
    plaintext: dict[str, list[CapturedPacket]] = field(default_factory=dict)   # by site
    guard_stopped: list[CapturedPacket] = field(default_factory=list)   # what sun's peer guard dropped
    capture_stats: dict[str, str] = field(default_factory=dict)
    before: dict[str, SiteView] = field(default_factory=dict)      # just before the kill
    after: dict[str, SiteView] = field(default_factory=dict)       # at the end
    stale_after: dict[str, tuple[SA, ...]] = field(default_factory=dict)
    stale_probe: tuple[SA, ...] | None = None                      # moon's, at stale_probe_after
    stopped_watching_at: float | None = None
    child_sas_after: dict[str, list[dict]] = field(default_factory=dict)
    foreign: list[str] = field(default_factory=list)               # foreign_changes(): [] = intact
    status: dict | None = None                                     # supervisor status at the end
    crash_reports: list[dict] = field(default_factory=list)
    moon_output: str = ""                                          # supervisor log / starter output
    moon_charon_log: str = ""
    sun_charon_log: str = ""
    stop_rc: int | None = None
    left_after_stop: SiteView | None = None                        # moon after a requested stop
    setup_s: float = 0.0
    tunnels_up_s: float = 0.0
    observed_s: float = 0.0

    def lost_after_kill(self, role: str) -> tuple[int, ...]:
        return self.pings[role].lost_between(self.kill_at - 0.5)

    def recovered(self, role: str, answered: int = 5) -> bool:
        """Did the tunnel carry traffic at the end: no loss after the kill, or ``answered`` replies after the last?"""
        lost = self.lost_after_kill(role)
        return not lost or self.pings[role].answered_after(lost[-1]) >= answered

    def outage_s(self, role: str) -> float:
        p = self.pings[role]
        lost = set(self.lost_after_kill(role))
        return max((n * p.interval for start, _, n in p.outages()
                    if start >= self.kill_at - 0.5 and n), default=0.0) if lost else 0.0


def _say_nothing(_msg: str) -> None:
    pass


def run_crash(sc: Scenario, workdir: str, say: Callable[[str], None] = _say_nothing) -> Outcome:
    """Run the whole experiment; the lab is gone afterwards whatever happens."""
    if sc.moon not in MOON_KINDS:
        raise ValueError(f"moon must be one of {', '.join(MOON_KINDS)}, not {sc.moon!r}")
    os.makedirs(workdir, exist_ok=True)
    lab = make_lab(sc.roles, prefix=sc.prefix)
    out = Outcome(sc, lab, workdir)
    t0 = time.monotonic()
    moon = sun = None
    pingers: dict[str, Pinger] = {}
    captures: dict[str, Capture] = {}
    try:
        say(f"building the lab: namespaces {lab.moon.netns} and {lab.sun.netns}, "
            f"tunnels {', '.join(f'{t.name} (moon {t.role})' for t in lab.tunnels)}")
        extra = {"moon": FOREIGN_SCRIPT if sc.foreign else "",
                 "sun": peer_guard_script(lab.sun) if sc.peer_guard else ""}
        build_lab(lab, extra=extra)
        foreign_before = read_view(lab.moon.netns) if sc.foreign else None
        sun = Charon(lab, lab.sun, workdir, "plain", settings=sc.settings).start()
        moon = Charon(lab, lab.moon, workdir, sc.moon, settings=sc.settings, mode=sc.mode)
        # sun's connections must be loaded before moon initiates (an IKE_SA_INIT to a charon
        # without them fails for good); sun's own initiations are retransmitted until moon is up.
        sun.wait_ready(timeout=180)
        say(f"sun: charon ready; starting moon's charon under {sc.label}")
        moon.start()
        moon.wait_ready(timeout=300)
        out.setup_s = time.monotonic() - t0
        say(f"moon: charon ready after {out.setup_s:.1f}s; waiting for the tunnels")
        bring_up_tunnels(lab, moon, sun)
        out.tunnels_up_s = time.monotonic() - t0 - out.setup_s
        say(f"tunnels up after {out.tunnels_up_s:.1f}s more")
        if sc.foreign:
            add_lookalike_state(lab.moon.netns)

        for site in lab.sites:
            captures[site.name] = Capture(site.netns, site.local_nets, site.remote_nets,
                                          os.path.join(workdir, f"capture-{site.name}.txt")).start()
        if sc.peer_guard:
            captures["sun-guard"] = GuardLog(lab.sun.netns, PEER_GUARD_GROUP,
                                             os.path.join(workdir, "guard-sun.txt")).start()
        for t in lab.tunnels:
            pingers[t.role] = Pinger(lab.moon.netns, t.moon_host, t.sun_host,
                                     os.path.join(workdir, f"ping-{t.role}.txt")).start()
        time.sleep(sc.warmup)
        out.before = {"moon": read_view(lab.moon.netns)}
        if foreign_before is not None:
            # The first set must have survived the supervisor's start; both must survive the crash.
            out.foreign = ["before the kill: " + c for c in foreign_changes(foreign_before, out.before["moon"])]

        out.killed_pid, out.kill_at = moon.kill_charon()
        say(f"kill -9 moon's charon (pid {out.killed_pid})")
        _observe(sc, out, moon, pingers, say)

        for p in pingers.values():
            p.stop()
        time.sleep(0.5)   # the last replies' packets have left; let tcpdump see them
        for name, c in captures.items():
            packets = c.stop()
            out.capture_stats[name] = c.summary()
            if name == "sun-guard":
                out.guard_stopped = packets
            else:
                out.plaintext[name] = packets
        out.pings = {role: p.read() for role, p in pingers.items()}
        out.after = {s.name: read_view(s.netns) for s in lab.sites}
        for site, daemon in (("moon", moon), ("sun", sun)):
            try:
                out.child_sas_after[site] = daemon.list_child_sas()
            except OSError:
                out.child_sas_after[site] = []
            out.stale_after[site] = stale_sas(out.after[site], out.child_sas_after[site])
        if foreign_before is not None:
            out.foreign += foreign_changes(out.before["moon"], out.after["moon"])
        if sc.moon == "supervisor":
            out.status = _supervisor_status(moon)
            out.crash_reports = _crash_reports(moon)
        out.stop_rc = moon.stop()
        moon_stopped = moon
        moon = None
        out.left_after_stop = read_view(lab.moon.netns)
        out.moon_output = _read(moon_stopped.output_log)
        out.moon_charon_log = _read(moon_stopped.charon_log)
        out.sun_charon_log = _read(sun.charon_log)
        return out
    finally:
        for p in pingers.values():
            p.stop()
        for c in captures.values():
            c.stop()
        for d in (moon, sun):
            if d is not None:
                d.stop(timeout=15)
        remove_lab(lab)


def bring_up_tunnels(lab: Lab, moon: Charon, sun: Charon, timeout: float = 90.0) -> None:
    """Every tunnel established on both sides (so pings cannot pass in cleartext), then answering."""
    for t in lab.tunnels:
        if t.sun_action == "start" and not sun.child_installed(t.name):
            # sun's first IKE_SA_INIT went out before moon's charon listened, and its next
            # retransmission may be many seconds away: start over now that moon is there.
            sun.terminate_ike(t.name)
            sun.initiate(t.name)
        elif t.sun_action == "trap" or t.moon_action == "trap":
            ping_until_answered(lab.moon.netns, t.moon_host, t.sun_host, timeout=timeout)
    deadline = time.monotonic() + timeout
    for t in lab.tunnels:
        while not (moon.child_installed(t.name) and sun.child_installed(t.name)):
            if time.monotonic() > deadline:
                raise LabError(f"tunnel {t.name} (moon {t.role}) not established on both sides within "
                               f"{timeout:.0f}s:\n{tail(moon.charon_log)}")
            time.sleep(0.5)
        ping_until_answered(lab.moon.netns, t.moon_host, t.sun_host, timeout=timeout)


def _observe(sc: Scenario, out: Outcome, moon: Charon, pingers: dict[str, Pinger],
             say: Callable[[str], None]) -> None:
    """Watch until the tunnels are back and settled (see Scenario), or max_observe."""
    start = time.monotonic()
    stale_zero = not sc.until_no_stale
    last_stale_check = 0.0
    probe_due = sc.stale_probe_after > 0
    while True:
        # Light polling: in the emulated VM every look costs CPU the recovery needs.
        time.sleep(1.0)
        elapsed = time.monotonic() - start
        now = time.time()
        if out.ready_again_at is None:
            pid = moon.charon_pid()
            if pid and pid != out.killed_pid and len(moon.loaded_conns()) >= len(out.lab.tunnels):
                out.restarted_pid, out.ready_again_at = pid, time.time()
                say(f"moon: a new charon (pid {pid}) is ready {out.ready_again_at - out.kill_at:.1f}s after the kill")
        settled = True
        for p in pingers.values():
            r = p.read()
            lost = r.lost_between(out.kill_at - 0.5)
            if lost:
                last_lost = r.sent_at.get(lost[-1], now)
                answered_since = [s for s in r.answered if s > lost[-1]]
                if not answered_since or now - last_lost < sc.settle:
                    settled = False
        if probe_due and now - out.kill_at >= sc.stale_probe_after:
            probe_due = False
            try:
                out.stale_probe = stale_sas(read_view(out.lab.moon.netns), moon.list_child_sas())
            except OSError:
                out.stale_probe = None
        if (sc.until_no_stale and out.ready_again_at is not None and not stale_zero and settled
                and elapsed >= sc.min_observe and time.monotonic() - last_stale_check >= 3.0):
            last_stale_check = time.monotonic()
            try:
                stale_zero = not stale_sas(read_view(out.lab.moon.netns), moon.list_child_sas())
            except OSError:
                stale_zero = False
        done = (elapsed >= sc.min_observe and settled and stale_zero and out.ready_again_at is not None
                and not probe_due)
        if done or elapsed >= sc.max_observe:
            out.observed_s = elapsed
            out.stopped_watching_at = time.time()
            if not done:
                say(f"stopped watching after {elapsed:.0f}s (max_observe) without everything settled")
            return


def _supervisor_status(moon: Charon) -> dict | None:
    from supervisor import control
    from supervisor.errors import SupervisorError
    try:
        return control.request(moon.run_dir, "status", timeout=10)["status"]
    except (SupervisorError, OSError, KeyError):
        return None


def _crash_reports(moon: Charon) -> list[dict]:
    from supervisor import crashreport
    return [r for _, r in crashreport.read_crash_reports(os.path.join(moon.state_dir, "crashes"))]


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as fh:
            return fh.read()
    except OSError:
        return ""


def describe_failure(out: Outcome) -> str:
    """Context for an assertion message: the moon log tails."""
    return (f"--- moon output (last lines) ---\n{out.moon_output[-4000:]}\n"
            f"--- moon charon.log (last lines) ---\n{out.moon_charon_log[-4000:]}")


def run_crashes(scenarios: dict[str, Scenario], workdir: str, parallel: bool = True,
                say: Callable[[str], None] = _say_nothing) -> dict[str, Outcome | Exception]:
    """Run several experiments (each in its own lab and subfolder), side by side when ``parallel``.

    Side by side saves most of the waiting (tunnels, grace periods) on a slow machine; the
    labs share nothing but the CPU.  A failed experiment's entry is its exception."""
    import concurrent.futures

    def one(key: str) -> Outcome | Exception:
        try:
            return run_crash(scenarios[key], os.path.join(workdir, key), say=lambda m: say(f"{key}: {m}"))
        except Exception as exc:   # reported per experiment; the others go on
            return exc

    if not parallel:
        return {key: one(key) for key in scenarios}
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(scenarios)) as pool:
        futures = {key: pool.submit(one, key) for key in scenarios}
        return {key: f.result() for key, f in futures.items()}


def keep_workdir(workdir: str, name: str = "lab") -> str:
    """Keep an experiment's files for reading afterwards; inside the VM (whose /tmp vanishes) they are
    copied to the host-shared results folder.  Returns where they are."""
    import shutil
    shared = os.environ.get("IPSV_VM_RESULTS")
    if os.environ.get("IPSV_REALKERNEL") != "1" or not shared:
        return workdir
    dest = os.path.join(shared, name)
    shutil.copytree(workdir, dest, dirs_exist_ok=True, ignore_dangling_symlinks=True,
                    ignore=shutil.ignore_patterns("*.sock"))
    shutil.rmtree(workdir, ignore_errors=True)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.relpath(dest, root) + " (the same path on the host)"
