"""The recovery report of one crash experiment: timeline, pings lost, plaintext seen, leftovers.

``build_report(outcome)`` is pure (it reads only the Outcome); ``format_report`` renders it
for a terminal.  The timeline comes from the supervisor's own log (its state transitions,
crash report, snapshot and reconcile lines) and charon's log, relative to the kill.
"""

from __future__ import annotations

import ipaddress
import re
import time
from dataclasses import dataclass

from .scenario import Outcome
from .topology import Tunnel
from .traffic import CapturedPacket

# Supervisor log line: "2026-11-28 01:03:29.727 INFO supervisor: message"
_LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\.(\d{3}) (\w+) ([\w.]+): (.*)$")
# charon's file log: "01:03:29.694 12[IKE] <init|1> message"
_CHARON_LINE = re.compile(r"^(\d\d:\d\d:\d\d)\.(\d{3}) \d+\[(\w+)\] (?:<([^>]*)> )?(.*)$")

# (what, pattern) in order of precedence; the first match labels a line of the "supervisor"
# logger; lines of "supervisor.recovery" all count (label "recovery" unless one matches).
_SUPERVISOR_EVENTS = (
    ("death seen", re.compile(r"-> recovering on died")),
    ("exit", re.compile(r"\[[a-z-]+\], up [\d.]+s")),
    ("crash report", re.compile(r"crash report written")),
    ("snapshot", re.compile(r"snapshot", re.I)),
    ("leftovers", re.compile(r"left \d+ owned object")),
    ("restart", re.compile(r"-> starting on")),
    ("charon ready", re.compile(r"is ready after")),
    ("running", re.compile(r"-> running on")),
    ("fail-closed", re.compile(r"block", re.I)),
    ("adopt", re.compile(r"adopt", re.I)),
    ("flush", re.compile(r"flush", re.I)),
    ("stop", re.compile(r"stopping:|-> stopped")),
)
# charon lines worth a place in the timeline (its own view of the tunnels coming back).
_CHARON_EVENTS = (
    ("charon", re.compile(r"CHILD_SA \S+ established|IKE_SA \S+ established|received DELETE|"
                          r"deleting (IKE|CHILD)_SA|unable to|already exists|INITIAL_CONTACT|"
                          r"closing CHILD_SA|failed")),
)


@dataclass(frozen=True, slots=True)
class TimelineEntry:
    offset: float       # seconds after the kill
    what: str
    detail: str


@dataclass(frozen=True, slots=True)
class TunnelTraffic:
    role: str           # moon's role: initiator | responder | trap
    target: str
    sent: int
    lost_before_kill: int
    lost_after_kill: int
    outage_s: float     # longest run of lost pings after the kill, as time


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    label: str
    killed_pid: int
    restarted_pid: int | None
    kill_at: float
    ready_after_s: float | None
    timeline: tuple[TimelineEntry, ...]
    traffic: tuple[TunnelTraffic, ...]
    plaintext: dict                     # site -> packets
    plaintext_samples: tuple[str, ...]
    guard_stopped: int | None           # packets sun's own guard dropped (None: the lab ran without it)
    guard_unexplained: tuple[str, ...]  # ... of those, the ones no INITIAL_CONTACT window of sun explains
    peer_windows: tuple[PeerWindow, ...]
    at_kill: dict                       # moon's charon-installed state just before the kill
    at_end: dict
    stale_after: dict                   # site -> stale SA descriptions
    after_stop: dict | None             # moon after the requested stop
    foreign: tuple[str, ...]            # changes to foreign state ([] = intact)
    crash_report: dict | None           # the newest crash report's recovery-related parts
    observed_s: float


def _local_epoch(date_time: str, millis: str) -> float:
    return time.mktime(time.strptime(date_time, "%Y-%m-%d %H:%M:%S")) + int(millis) / 1000


def supervisor_timeline(log_text: str, kill_at: float, until: float | None = None) -> list[TimelineEntry]:
    """Timeline entries from the supervisor's log from the kill on (daemon output lines skipped)."""
    out = []
    for line in log_text.splitlines():
        m = _LOG_LINE.match(line)
        if not m:
            continue
        at = _local_epoch(m.group(1), m.group(2))
        logger, msg = m.group(4), m.group(5)
        if at < kill_at - 0.5 or (until is not None and at > until):
            continue
        if logger not in ("supervisor", "supervisor.recovery"):
            continue   # charon's own output (its file log is read separately) and load commands
        what = next((w for w, pattern in _SUPERVISOR_EVENTS if pattern.search(msg)),
                    "recovery" if logger == "supervisor.recovery" else None)
        if what:
            out.append(TimelineEntry(at - kill_at, what, msg))
    return out


def charon_lines(log_text: str, since: float, until: float | None = None) -> list[tuple[float, str]]:
    """(time, message) of charon's file log lines (HH:MM:SS.mmm, on the day of ``since``) in the window."""
    day = time.strftime("%Y-%m-%d", time.localtime(since))
    out = []
    for line in log_text.splitlines():
        m = _CHARON_LINE.match(line)
        if not m:
            continue
        at = _local_epoch(f"{day} {m.group(1)}", m.group(2))
        if at >= since and (until is None or at <= until):
            out.append((at, (f"<{m.group(4)}> " if m.group(4) else "") + m.group(5)))
    return out


_DUPLICATE_DESTROYED = re.compile(r"^<([^|>]+)\|\d+> destroying duplicate IKE_SA for peer .*received INITIAL_CONTACT")
_CHILD_ESTABLISHED = re.compile(r"CHILD_SA ([^{\s]+)\{\d+\} established")
_PACKET_SOURCE = re.compile(r"^IP (\d+\.\d+\.\d+\.\d+) > ")


@dataclass(frozen=True, slots=True)
class PeerWindow:
    """A time when the peer's charon had no CHILD_SA for a connection: it destroyed the old one on
    INITIAL_CONTACT and had not yet installed the new one (lab.topology.peer_guard_script says why)."""

    conn: str
    start: float
    end: float          # inf: the connection was not established again in the log


def initial_contact_windows(log_text: str, since: float) -> list[PeerWindow]:
    """The windows in a charon file log from ``since`` on: each 'destroying duplicate IKE_SA ...
    received INITIAL_CONTACT' line up to that connection's next 'CHILD_SA ... established' line
    (in the lab every connection has one child of the same name)."""
    opened: dict[str, float] = {}
    out = []
    for at, msg in charon_lines(log_text, since):
        m = _DUPLICATE_DESTROYED.match(msg)
        if m:
            opened.setdefault(m.group(1), at)
            continue
        m = _CHILD_ESTABLISHED.search(msg)
        if m and m.group(1) in opened:
            out.append(PeerWindow(m.group(1), opened.pop(m.group(1)), at))
    out.extend(PeerWindow(conn, start, float("inf")) for conn, start in opened.items())
    return sorted(out, key=lambda w: w.start)


def guard_hits_outside_windows(packets: list[CapturedPacket], windows: list[PeerWindow],
                               tunnels: tuple[Tunnel, ...], late: float = 0.5) -> list[CapturedPacket]:
    """The packets the peer guard stopped that no window of their own tunnel explains.

    A packet belongs to the tunnel whose sun-side subnet holds its source.  Its time is when
    tcpdump read the NFLOG copy: never before the packet, possibly a little after (``late``);
    the log times are when charon wrote the line, before the destroy and after the install."""
    def explained(pkt: CapturedPacket) -> bool:
        m = _PACKET_SOURCE.match(pkt.line)
        if not m:
            return False
        src = ipaddress.ip_address(m.group(1))
        for t in tunnels:
            if src in ipaddress.ip_network(t.sun_net):
                return any(w.conn == t.name and w.start <= pkt.at <= w.end + late for w in windows)
        return False
    return [p for p in packets if not explained(p)]


def peer_guard_check(out: Outcome) -> tuple[list[PeerWindow], list[CapturedPacket]]:
    """sun's INITIAL_CONTACT windows from the kill on, and what its guard stopped outside them."""
    windows = initial_contact_windows(out.sun_charon_log, out.kill_at - 0.5)
    return windows, guard_hits_outside_windows(out.guard_stopped, windows, out.lab.tunnels)


def charon_timeline(log_text: str, kill_at: float, until: float | None = None) -> list[TimelineEntry]:
    """Key lines of charon's file log from the kill on."""
    out = []
    for at, msg in charon_lines(log_text, kill_at, until):
        for what, pattern in _CHARON_EVENTS:
            if pattern.search(msg):
                out.append(TimelineEntry(at - kill_at, what, msg))
                break
    return out


def _crash_summary(reports: list[dict]) -> dict | None:
    """The newest report's parts about kernel state (keys the recovery code adds), if any."""
    if not reports:
        return None
    r = reports[-1]
    keep = {k: v for k, v in r.items() if any(w in k for w in ("leftover", "snapshot", "recovery", "reconcil"))}
    keep["description"] = r.get("description")
    return keep


def build_report(out: Outcome) -> RecoveryReport:
    end = out.stopped_watching_at or out.kill_at + out.observed_s
    timeline = supervisor_timeline(out.moon_output, out.kill_at, end) + \
        charon_timeline(out.moon_charon_log, out.kill_at, end)
    timeline.append(TimelineEntry(0.0, "kill -9", f"charon (pid {out.killed_pid})"))
    if out.ready_again_at is not None:
        timeline.append(TimelineEntry(out.ready_again_at - out.kill_at, "probe",
                                      f"new charon (pid {out.restarted_pid}) answers VICI with its "
                                      f"connections loaded"))
    timeline.sort(key=lambda e: e.offset)
    traffic = []
    for role, p in out.pings.items():
        after = out.lost_after_kill(role)
        traffic.append(TunnelTraffic(role, p.target, p.sent, len(p.lost) - len(after), len(after),
                                     out.outage_s(role)))
    samples = tuple(f"{site}: {pkt.line}" for site, pkts in out.plaintext.items() for pkt in pkts[:3])
    windows, unexplained = peer_guard_check(out)
    return RecoveryReport(
        label=out.scenario.label, killed_pid=out.killed_pid, restarted_pid=out.restarted_pid,
        kill_at=out.kill_at,
        ready_after_s=None if out.ready_again_at is None else out.ready_again_at - out.kill_at,
        timeline=tuple(timeline), traffic=tuple(traffic),
        plaintext={site: len(p) for site, p in out.plaintext.items()}, plaintext_samples=samples,
        guard_stopped=len(out.guard_stopped) if out.scenario.peer_guard else None,
        guard_unexplained=tuple(f"{p.at - out.kill_at:+.3f}s {p.line}" for p in unexplained),
        peer_windows=tuple(windows),
        at_kill=out.before["moon"].counts() if "moon" in out.before else {},
        at_end=out.after["moon"].counts() if "moon" in out.after else {},
        stale_after={site: tuple(sa.describe() for sa in sas) for site, sas in out.stale_after.items()},
        after_stop=out.left_after_stop.counts() if out.left_after_stop else None,
        foreign=tuple(out.foreign), crash_report=_crash_summary(out.crash_reports),
        observed_s=out.observed_s,
    )


def _counts(c: dict) -> str:
    return ", ".join(f"{n} {k}" for k, n in c.items()) if c else "-"


def group_similar(entries: tuple[TimelineEntry, ...]) -> list[tuple[TimelineEntry, int]]:
    """Consecutive entries of the same kind starting with the same three words, folded: (first, how many more)."""
    out: list[tuple[TimelineEntry, int]] = []
    for e in entries:
        if out and out[-1][0].what == e.what and e.detail.split()[:3] == out[-1][0].detail.split()[:3]:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((e, 0))
    return out


def format_report(r: RecoveryReport, max_timeline: int = 40, detail_width: int = 160) -> str:
    lines = [f"Recovery report: moon's charon under {r.label}, kill -9 at "
             f"{time.strftime('%H:%M:%S', time.localtime(r.kill_at))}"]
    lines.append("")
    lines.append("Timeline (seconds after the kill):")
    grouped = group_similar(r.timeline)
    shown = grouped[:max_timeline]
    for e, more in shown:
        detail = e.detail if len(e.detail) <= detail_width else e.detail[:detail_width - 3] + "..."
        lines.append(f"  {e.offset:+8.3f}  {e.what:<13} {detail}" + (f"  (+{more} like it)" if more else ""))
    if len(grouped) > len(shown):
        lines.append(f"  ... {len(grouped) - len(shown)} more in the logs")
    lines.append("")
    lines.append("Traffic (ping every 0.2 s from moon's subnet to sun's, one per tunnel):")
    for t in r.traffic:
        lines.append(f"  {t.role:<10} -> {t.target:<10} {t.sent:5d} sent, {t.lost_after_kill} lost after the kill"
                     f" (longest gap {t.outage_s:.1f} s){'' if not t.lost_before_kill else f', {t.lost_before_kill} before'}")
    total_plain = sum(r.plaintext.values())
    lines.append("Plaintext ICMP leaving the namespaces on their outer link: "
                 + ", ".join(f"{site} {n}" for site, n in r.plaintext.items())
                 + ("  (none: every packet left as ESP or was dropped)" if total_plain == 0 else "  <-- LEAK"))
    lines.extend(f"    {s}" for s in r.plaintext_samples)
    if r.guard_stopped is not None:
        shown = ", ".join(f"{w.conn} {(w.end - w.start) * 1000:.0f} ms" for w in r.peer_windows
                          if w.end != float("inf"))
        lines.append(f"sun's own guard (drops what would leave it unprotected) stopped {r.guard_stopped} packet(s)"
                     + (f"; sun was without a CHILD_SA after INITIAL_CONTACT for: {shown}" if shown else "")
                     + ("" if not r.guard_unexplained else
                        f"  <-- {len(r.guard_unexplained)} outside those windows"))
        lines.extend(f"    {s}" for s in r.guard_unexplained[:3])
    lines.append("")
    lines.append("Kernel state in moon (charon's kinds; foreign objects not counted):")
    lines.append(f"  at the kill (what the dead charon left): {_counts(r.at_kill)}")
    lines.append(f"  at the end (new charon's + leftovers):   {_counts(r.at_end)}")
    for site, stale in r.stale_after.items():
        lines.append(f"  stale SAs in {site} (no running charon knows them): {len(stale)}"
                     + (f"  {'; '.join(stale[:4])}" if stale else ""))
    if r.after_stop is not None:
        lines.append(f"  after a requested stop of moon:           {_counts(r.after_stop)}")
    lines.append("Foreign state in moon (another tool's SA, policies, route, rule, address, firewall rules): "
                 + ("intact" if not r.foreign else "CHANGED: " + "; ".join(r.foreign)))
    if r.crash_report:
        lines.append("")
        lines.extend(format_crash_summary(r.crash_report))
    return "\n".join(lines)


def format_crash_summary(summary: dict) -> list[str]:
    """The crash report's recovery part, readable (unknown keys shown as they are)."""
    lines = [f"Crash report: {summary.get('description') or '?'}"]
    rec = summary.get("recovery")
    if isinstance(rec, dict):
        left = rec.get("leftovers") or {}
        shown = ", ".join(f"{n} {k}" for k, n in left.items() if n) or "none"
        lines.append(f"  recovery: {rec.get('action', '?')} ({rec.get('reason', '')})")
        lines.append(f"  leftovers: {rec.get('leftover_total', sum(left.values()) if left else 0)} owned object(s): "
                     f"{shown}; judged by {rec.get('judged_by', '?')}")
        if rec.get("results"):
            lines.append("  actions: " + ", ".join(f"{n} {k}" for k, n in rec["results"].items()))
        if rec.get("snapshot"):
            lines.append(f"  snapshot: {rec['snapshot']}")
        rest = {k: v for k, v in rec.items()
                if k not in ("leftovers", "leftover_total", "judged_by", "results", "snapshot", "action", "reason",
                             "mode", "fail_closed")}
        lines.extend(f"  {k}: {v}" for k, v in rest.items())
    for k, v in summary.items():
        if k not in ("recovery", "description"):
            lines.append(f"  {k}: {v}")
    return lines
