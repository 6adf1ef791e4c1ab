"""Crash reports: one JSON file per abnormal daemon exit, written atomically with mode 0600."""

from __future__ import annotations

import datetime as _dt
import json
import socket
from typing import Sequence

from . import __version__
from .errors import SupervisorError
from .policy import Decision, ExitInfo, signal_name
from .trusted_paths import open_own_subdir, prune_files

REPORT_VERSION = 1
SUFFIX = ".json"
MAX_REPORT_BYTES = 16 * 1024 * 1024     # ours are a few kB; a bigger file is not read


def _iso(wall: float | None) -> str | None:
    if wall is None:
        return None
    return _dt.datetime.fromtimestamp(wall, _dt.timezone.utc).isoformat(timespec="milliseconds")


def build_crash_report(info: ExitInfo, decision: Decision, log_lines: Sequence[str], *,
                       daemon_command: Sequence[str], restarts: int, mono_now: float, wall_now: float,
                       health_failures: int = 0) -> dict:
    """The report as a JSON-safe dict (pure: monotonic times are converted with the given pair)."""
    def wall(mono: float | None) -> str | None:
        return None if mono is None else _iso(wall_now - (mono_now - mono))

    return {
        "report_version": REPORT_VERSION,
        "supervisor_version": __version__,
        "host": socket.gethostname(),
        "daemon": {"command": list(daemon_command), "pid": info.pid},
        "classification": info.classification.value,
        "description": info.describe(),
        "exit_code": info.exit_code,
        "signal": info.signal,
        "signal_name": signal_name(info.signal),
        "core_dumped": info.core_dumped,
        "cause": info.cause.value,
        "spawn_error": info.spawn_error,
        "health_failures": health_failures,
        "timings": {
            "started_at": wall(info.started_at),
            "ready_at": wall(info.ready_at),
            "start_confirmed_at": wall(info.okay_at),
            "died_at": wall(info.died_at),
            "uptime_s": round(info.uptime, 3),
            "time_to_ready_s": None if info.ready_at is None else round(info.ready_at - info.started_at, 3),
        },
        "restarts_before": restarts,
        "decision": {"action": decision.action.value, "reason": decision.reason,
                     "delay_s": round(decision.delay, 3), "attempt": decision.attempt},
        "last_log_lines": list(log_lines),
    }


def report_name(report: dict, wall_now: float) -> str:
    stamp = _dt.datetime.fromtimestamp(wall_now, _dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    return f"{stamp}-{report['daemon']['pid']}-{report['classification']}{SUFFIX}"


def write_crash_report(directory: str, report: dict, wall_now: float, keep: int | None = None,
                       max_bytes: int = 0) -> str:
    """Write ``report`` atomically (temp file, fsync, rename) as 0600 in the checked DIRECTORY
    (STATE_DIR/crashes, created 0700); prune to ``keep`` files and ``max_bytes`` in total."""
    name = report_name(report, wall_now)
    with open_own_subdir(directory, what="paths.state_dir") as d:
        path = d.write_atomic(name, json.dumps(report, indent=2, sort_keys=False) + "\n", mode=0o600,
                              prefix=".crash-")
        if keep is not None or max_bytes:
            prune_files(d, SUFFIX, keep=keep, max_bytes=max_bytes)
    return path


def report_paths(directory: str) -> list[str]:
    """Report files (regular files only), oldest first (names start with a UTC timestamp)."""
    try:
        with open_own_subdir(directory, create=False) as d:
            return [d.join(f.name) for f in d.files(SUFFIX)]
    except FileNotFoundError:
        return []


def prune_crash_reports(directory: str, keep: int, max_bytes: int = 0) -> list[str]:
    """Remove all but the newest ``keep`` reports (and the oldest beyond MAX_BYTES); the removed paths."""
    try:
        with open_own_subdir(directory, create=False) as d:
            return prune_files(d, SUFFIX, keep=keep, max_bytes=max_bytes)
    except FileNotFoundError:
        return []


def read_crash_reports(directory: str) -> list[tuple[str, dict]]:
    """(path, report) for every readable report, oldest first; unreadable files are skipped."""
    out = []
    try:
        d = open_own_subdir(directory, create=False)
    except FileNotFoundError:
        return []
    with d:
        for f in d.files(SUFFIX):
            try:
                report = json.loads(d.read_bytes(f.name, MAX_REPORT_BYTES))
            except (OSError, ValueError, RecursionError, SupervisorError):
                continue
            if isinstance(report, dict):
                out.append((d.join(f.name), report))
    return out
