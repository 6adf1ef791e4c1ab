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
from .topology import (PEER_GUARD_GROUP, Lab, LabError, Tunnel, build_lab, make_lab, make_scale_lab, peer_guard_script,
                       ping_sample, remove_lab)
from .traffic import Capture, CapturedPacket, GuardLog, Pinger, PingResult, ping_until_answered, pings_until_answered

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
    # > 0: a scale lab instead of ``roles``: that many tunnels, alternately moon initiator and
    # responder (lab.topology.scale_tunnels); pings cross ``ping_sample`` of them, keyed by name.
    tunnels: int = 0
    ping_sample: int = 20
    until_all_back: bool = False          # ... and until moon's charon has every CHILD_SA again
                                          # (and, supervised, the adoption has decided every leftover)

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
    all_back_at: float | None = None       # moon's new charon reports every tunnel's CHILD_SA installed
    back_counts: list[tuple[float, int]] = field(default_factory=list)   # (when, how many it reports) per look
    adoption_done_at: float | None = None  # the supervisor's adoption decided every leftover (status)
    cpu_at_kill: float | None = None       # CPU seconds of moon's supervisor (or starter) process
    cpu_at_end: float | None = None

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
    lab = make_scale_lab(sc.tunnels, prefix=sc.prefix) if sc.tunnels else make_lab(sc.roles, prefix=sc.prefix)
    out = Outcome(sc, lab, workdir)
    t0 = time.monotonic()
    moon = sun = None
    pingers: dict[str, Pinger] = {}
    captures: dict[str, Capture] = {}
    try:
        tunnels = ', '.join(f'{t.name} (moon {t.role})' for t in lab.tunnels) if len(lab.tunnels) <= 4 else \
            f"{lab.tunnels[0].name}..{lab.tunnels[-1].name} (moon initiator of the odd ones, responder of the even ones)"
        say(f"building the lab: namespaces {lab.moon.netns} and {lab.sun.netns}, tunnels {tunnels}")
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
        moon.wait_ready(timeout=300 + 2 * sc.tunnels)     # a scale lab's moon loads N connections
        out.setup_s = time.monotonic() - t0
        say(f"moon: charon ready after {out.setup_s:.1f}s; waiting for the tunnels")
        if sc.tunnels:
            bring_up_many(lab, moon, sun, sc.ping_sample)
        else:
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
        for t in pinged(sc, lab):
            key = ping_key(sc, t)
            pingers[key] = Pinger(lab.moon.netns, t.moon_host, t.sun_host,
                                  os.path.join(workdir, f"ping-{key}.txt")).start()
        time.sleep(sc.warmup)
        out.before = {"moon": read_view(lab.moon.netns)}
        if foreign_before is not None:
            # The first set must have survived the supervisor's start; both must survive the crash.
            out.foreign = ["before the kill: " + c for c in foreign_changes(foreign_before, out.before["moon"])]

        out.cpu_at_kill = moon.cpu_seconds()
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
        out.cpu_at_end = moon.cpu_seconds()
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


def pinged(sc: Scenario, lab: Lab) -> tuple[Tunnel, ...]:
    """The tunnels pings cross: every one, or in a scale lab a sample spread over moon's roles."""
    return ping_sample(lab.tunnels, sc.ping_sample) if sc.tunnels else lab.tunnels


def ping_key(sc: Scenario, t: Tunnel) -> str:
    """Key of a tunnel's pings in Outcome.pings: moon's role, or in a scale lab the tunnel's name."""
    return t.name if sc.tunnels else t.role


def bring_up_many(lab: Lab, moon: Charon, sun: Charon, sample: int = 20, timeout: float = 900.0) -> None:
    """Every tunnel of a scale lab established on both sides.

    moon's charon starts its initiator tunnels by itself (start_action); sun is asked for the
    others now, all at once, without waiting.  A tunnel whose initiator holds no IKE_SA for it
    any more (charon gave up after its retransmissions, e.g. while the emulated CPU was busy)
    is asked again once a minute."""
    want = {t.name for t in lab.tunnels}
    initiator = {t.name: (moon if t.role == "initiator" else sun) for t in lab.tunnels}
    sun.initiate_many([t.name for t in lab.tunnels if t.role == "responder"])
    start = time.monotonic()
    retry_at = start + 60.0
    while True:
        up = moon.installed_children() & sun.installed_children()
        missing = sorted(want - up, key=lambda n: int(n[1:]))
        if not missing:
            break
        now = time.monotonic()
        if now - start > timeout:
            raise LabError(f"{len(missing)} of {len(want)} tunnels not established on both sides within "
                           f"{timeout:.0f}s (first: {', '.join(missing[:5])}):\n{tail(moon.charon_log)}")
        if now >= retry_at:
            retry_at = now + 60.0
            for side in (moon, sun):
                busy = side.ike_conns()
                again = [n for n in missing if initiator[n] is side and n not in busy]
                if again:
                    side.initiate_many(again)
        # Each look lists every SA on both sides (slow Python in the emulated VM): not too often.
        time.sleep(2.0 + len(want) / 50)
    pings_until_answered(lab.moon.netns, [(t.moon_host, t.sun_host) for t in ping_sample(lab.tunnels, sample)])


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
    scale = bool(sc.tunnels)
    want = {t.name for t in out.lab.tunnels}
    next_look = 0.0
    while True:
        # Light polling: in the emulated VM every look costs CPU the recovery needs.
        time.sleep(2.0 if scale else 1.0)
        elapsed = time.monotonic() - start
        now = time.time()
        if sc.until_all_back and out.ready_again_at is not None and elapsed >= next_look:
            next_look = elapsed + 3.0
            _look_all_back(sc, out, moon, want)
        if out.ready_again_at is None:
            pid = moon.charon_pid()
            # A hundred connections take the emulated VM's Python seconds to list: a longer wait.
            if pid and pid != out.killed_pid and \
                    len(moon.loaded_conns(timeout=30.0 if scale else 5.0)) >= len(out.lab.tunnels):
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
        back = not sc.until_all_back or (out.all_back_at is not None and
                                         (sc.moon != "supervisor" or out.adoption_done_at is not None))
        done = (elapsed >= sc.min_observe and settled and stale_zero and out.ready_again_at is not None
                and not probe_due and back)
        if done or elapsed >= sc.max_observe:
            out.observed_s = elapsed
            out.stopped_watching_at = time.time()
            if not done:
                say(f"stopped watching after {elapsed:.0f}s (max_observe) without everything settled")
            return


def _look_all_back(sc: Scenario, out: Outcome, moon: Charon, want: set[str]) -> None:
    """Note when moon's new charon first has every CHILD_SA, and when the adoption is done."""
    now = time.time()
    if out.all_back_at is None:
        try:
            back = want & moon.installed_children()
        except OSError:
            back = set()
        out.back_counts.append((now, len(back)))
        if back == want:
            out.all_back_at = now
    if sc.moon == "supervisor" and out.adoption_done_at is None:
        adoption = ((_supervisor_status(moon) or {}).get("recovery") or {}).get("adoption") or {}
        if adoption.get("state") == "done":
            out.adoption_done_at = now


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


def finish_workdir(workdir: str, keep: bool, name: str) -> None:
    """At the end of a benchmark: keep its lab files (``keep_workdir``, said where) or remove them."""
    import shutil
    if keep:
        print(f"lab files kept in {keep_workdir(workdir, name)}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)


def report_runs(targets, outcomes: dict, summarize: Callable, print_table: Callable[[dict], None], *,
                side_by_side: bool, started: float, as_json: bool) -> int:
    """A benchmark's table over its targets (an Exception outcome is that target's error), how long
    it all took, the JSON when asked; the exit code: 1 if a target failed."""
    import json
    from .preflight import in_vm
    results = {t: {"error": str(outcomes[t])} if isinstance(outcomes[t], Exception) else summarize(outcomes[t])
               for t in targets}
    print_table(results)
    print(f"\n{'side by side' if side_by_side else 'one after the other'}, {time.monotonic() - started:.0f} s in all"
          + (" (inside the real-kernel VM: emulated CPU)" if in_vm() else ""))
    if as_json:
        print(json.dumps(results, indent=2))
    return 0 if not any("error" in r for r in results.values()) else 1
