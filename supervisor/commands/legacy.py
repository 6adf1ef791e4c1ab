"""``ipsec-supervisor load-ipsec-conf``: ipsec.conf and ipsec.secrets into charon over VICI."""

from __future__ import annotations

import json
import os
import sys

from ..errors import ConfigError, ExitCode, SupervisorError
from . import IPSEC_CONF, IPSEC_DIR, IPSEC_SECRETS, LOAD_MODES, LOAD_TIMEOUT, VICI_SOCKET, writing_output

# The parser, translator and loader are imported by the handler: --help must not pay for them.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from ..legacy import loader


def register(sub) -> None:
    p = sub.add_parser(
        "load-ipsec-conf", help="load ipsec.conf and ipsec.secrets into charon over VICI",
        description="Parse ipsec.conf (and ipsec.secrets), translate every conn the way the starter and "
                    "the stroke plugin would, and load them into charon over its VICI socket: install "
                    "auto=route conns, initiate auto=start ones.  Conns that cannot be parsed or "
                    "translated are skipped with an error naming file:line, conn and option; the "
                    "others load.  Exit status: 0 all loaded; 11 loaded, but some conn or request failed "
                    "(each named on a line 'refused: ...'); 1 nothing could be applied (e.g. charon "
                    "does not answer); 3 the file as a whole is unusable (nothing sent).")
    p.add_argument("--file", default=IPSEC_CONF, metavar="PATH", help="ipsec.conf (default %(default)s)")
    p.add_argument("--secrets", default=IPSEC_SECRETS, metavar="PATH",
                   help="ipsec.secrets (default %(default)s)")
    p.add_argument("--no-secrets", action="store_true", help="do not read or load any secrets")
    p.add_argument("--ipsec-dir", default=IPSEC_DIR, metavar="DIR",
                   help="where relative certificate and key paths point (default %(default)s)")
    p.add_argument("--vici", default=VICI_SOCKET, metavar="SOCKET",
                   help="charon's VICI socket (default %(default)s)")
    p.add_argument("--mode", choices=LOAD_MODES, default=None,
                   help="load (charon has nothing of ours), update (only what changed since --state) or "
                        "reload (unload what --state lists, load everything); default: update with "
                        "--state, else load")
    p.add_argument("--state", metavar="FILE",
                   help="JSON file with what was loaded last; read for update/reload, rewritten afterwards")
    p.add_argument("--timeout", type=float, default=LOAD_TIMEOUT, metavar="S",
                   help="per-request timeout in seconds (default %(default)s)")
    p.add_argument("--initiate-timeout", type=int, default=-1, metavar="MS",
                   help="wait up to MS milliseconds for each auto=start conn to come up and report "
                        "failures (default -1: initiate in the background)")
    p.add_argument("--dry-run", action="store_true", help="print the VICI requests, send nothing")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--show-secrets", action="store_true", help="with --dry-run: do not redact shared secrets")
    p.set_defaults(func=cmd_load_ipsec_conf)


def _read_state(path: str | None) -> loader.LoadedState | None:
    from ..legacy import loader
    if not path or not os.path.exists(path):
        return None
    try:
        with open(path) as fh:
            return loader.LoadedState.from_json(json.load(fh))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise ConfigError(f"cannot use state file {path}: {exc}; remove it and load with --mode reload") from None


def _write_state(path: str, state: loader.LoadedState) -> None:
    """The one atomic writer: a fresh O_EXCL temp file (0600, fsync), renamed over PATH (never followed)."""
    from ..atomicfile import write_atomic
    try:
        write_atomic(path, json.dumps(state.to_json(), indent=1), mode=0o600, prefix=".ipsec-conf-state-")
    except OSError as exc:
        raise SupervisorError(f"cannot write state file {path}: {exc.strerror or exc} (the previous one, if any, "
                              "is unchanged; the next load compares with it)") from None


def cmd_load_ipsec_conf(args) -> int:
    from ..legacy import loader
    from ..legacy.translate import daemon_debug_args, daemon_settings
    previous = _read_state(args.state)
    mode = args.mode or ("update" if previous is not None else "load")
    if mode != "load" and previous is None and not args.dry_run:
        raise ConfigError(f"--mode {mode} needs --state FILE from an earlier load (what to compare with)")
    config = loader.read_legacy_config(args.file, None if args.no_secrets else args.secrets,
                                       ipsec_dir=args.ipsec_dir)
    plan = loader.plan_load(config, previous, mode, args.initiate_timeout)
    daemon = {"args": daemon_debug_args(config.conf.setup), "settings": daemon_settings(config.conf.setup)}

    if args.dry_run:
        with writing_output():
            if args.json:
                out = plan.to_json(secrets=args.show_secrets)
                out["daemon"] = daemon
                json.dump(out, sys.stdout, indent=1)
                print()
            else:
                for d in config.errors + config.warnings:
                    print(f"{d.severity}: {d}", file=sys.stderr)
                for step in plan.steps:
                    print(step.describe())
                if daemon["args"] or daemon["settings"]:
                    print(f"# config setup: charon arguments {' '.join(daemon['args']) or '(none)'}, "
                          f"strongswan.conf {daemon['settings'] or '(nothing)'}")
        return ExitCode.FAILED if config.errors else ExitCode.OK

    timeout = max(args.timeout, args.initiate_timeout / 1000 + 5) if args.initiate_timeout >= 0 else args.timeout
    with loader.ViciClient(args.vici, timeout) as client:
        report = loader.execute_plan(plan, client)
    if args.state:
        _write_state(args.state, report.state)
    with writing_output():
        if args.json:
            json.dump(report.to_json(), sys.stdout, indent=1)
            print()
        else:
            for d in report.errors + report.warnings:
                print(f"{d.severity}: {d}", file=sys.stderr)
            for r in report.results:
                line = f"{r.name}: {r.status}" + (f" (connection {r.peer})" if r.peer and r.peer != r.name else "")
                print(line + (f": {r.message}" if r.message and r.status != "skipped" else ""))
            for f in report.failures:
                print(f"failed: {f}", file=sys.stderr)
        if report.ok:
            return ExitCode.OK
        # One line each for the supervisor (jobs.REFUSED_PREFIX): what did not load, the rest did.
        for r in report.results:
            if not r.ok:
                print(f"refused: {r.name}: {r.status}" + (f": {r.message}" if r.message else ""))
        for f in report.failures:
            print(f"refused: {f}")
        for d in report.errors:
            print(f"refused: {d}")
        return ExitCode.PARTIAL
