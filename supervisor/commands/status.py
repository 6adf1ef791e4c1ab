"""``ipsec-supervisor status`` and ``ipsec-supervisor crashes``: what the supervisor knows."""

from __future__ import annotations

import argparse
import json
import sys

from . import writing_output
from .. import control
from ..config import load_config

STATUS_EXIT_CODES = """\
exit codes:
  0  the supervisor answered (whatever the daemon's state)
  1  the output cannot be written (closed, a full disk, an encoding without a character)
  3  the configuration file (for the run directory) is invalid
  4  not allowed to use the control socket (run as root)
  7  no supervisor is running
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("status", help="show the supervisor's and the daemon's state",
                              epilog=STATUS_EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="PATH", help="configuration file (for paths.run_dir)")
    p.add_argument("--json", action="store_true", help="print the full status as JSON")
    p.set_defaults(func=status)

    c = subparsers.add_parser("crashes", help="list the crash reports of abnormal daemon exits",
                              description="List crash reports (newest last) from STATE_DIR/crashes.")
    c.add_argument("--config", metavar="PATH", help="configuration file (for paths.state_dir)")
    c.add_argument("--json", action="store_true", help="print the reports as a JSON list")
    c.add_argument("-n", "--last", type=int, default=None, metavar="N", help="only the newest N")
    c.set_defaults(func=crashes)


def _age(seconds) -> str:
    if seconds is None:
        return "-"
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def format_status(st: dict) -> str:
    d = st["daemon"]
    lines = [f"state:         {st['state']} (for {_age(st['state_for_s'])})  --  {st['summary']}"]
    if d["pid"]:
        extra = ", ready" if d["ready"] else ""
        extra += "" if d["load_ok"] is not False else f", configuration load FAILED: {d['load_error']}"
        lines.append(f"daemon:        {' '.join(d['command'])}, pid {d['pid']}, up {_age(d['uptime_s'])}{extra}")
    else:
        lines.append(f"daemon:        {' '.join(d['command'])}, not running")
    lines.append(f"restarts:      {st['restarts']}  (deaths in the last {_age(st['crash_loop']['window_s'])}: "
                 f"{st['crash_loop']['deaths_in_window']}, give up at {st['crash_loop']['max_deaths'] or 'never'})")
    le = st["last_exit"]
    if le:
        lines.append(f"last exit:     {le['description']} [{le['classification']}] {_age(le['ago_s'])} ago, "
                     f"after {_age(le['uptime_s'])} up; {le['decision']}")
    else:
        lines.append("last exit:     -")
    b = st["backoff"]
    lines.append(f"backoff:       restart #{b['attempt']}, delay {b['delay_s']:.2f}s" if b else "backoff:       -")
    if st["next_restart_in_s"] is not None:
        lines.append(f"next restart:  in {st['next_restart_in_s']:.2f}s ({st['next_restart_at']})")
    else:
        lines.append("next restart:  -")
    h = st["health"]
    lines.append("health:        " + (f"{h['consecutive_failures']} consecutive failed probe(s)"
                                      if h["enabled"] else "probes disabled"))
    cfg = st["config"]
    lines.append(f"config:        {cfg['source']}" +
                 (f"  (last reload FAILED: {cfg['last_reload_error']})" if cfg["last_reload_error"] else ""))
    if st.get("last_crash_report"):
        lines.append(f"crash report:  {st['last_crash_report']}")
    if st.get("callback_errors"):
        lines.append(f"internal errors: {st['callback_errors']} (event-loop callbacks that raised; logged with "
                     "tracebacks, the supervisor went on: please report them)")
    return "\n".join(lines)


def status(args) -> int:
    cfg = load_config(args.config)
    answer = control.request(cfg.paths.run_dir, "status")
    if not answer.get("ok"):
        print(f"ipsec-supervisor: status failed: {answer.get('error')}", file=sys.stderr)
        return 1
    st = answer["status"]
    with writing_output():
        if args.json:
            json.dump(st, sys.stdout, indent=2)
            sys.stdout.write("\n")
        else:
            print(format_status(st))
    return 0


def crashes(args) -> int:
    from ..crashreport import read_crash_reports
    cfg = load_config(args.config)
    reports = read_crash_reports(cfg.crash_dir)
    if args.last is not None:
        reports = reports[-args.last:] if args.last > 0 else []
    with writing_output():
        _print_crashes(reports, args.json, cfg.crash_dir)
    return 0


def _print_crashes(reports: list, as_json: bool, directory: str) -> None:
    if as_json:
        json.dump([dict(r, path=p) for p, r in reports], sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    if not reports:
        print(f"no crash reports in {directory}")
    for path, r in reports:
        t = r.get("timings", {})
        print(f"{t.get('died_at', '?')}  pid {r.get('daemon', {}).get('pid')}  {r.get('classification')}: "
              f"{r.get('description')}  (up {t.get('uptime_s')}s; {r.get('decision', {}).get('action')})  {path}")
