"""``ipsec-supervisor run``: supervise the IKE daemon in the foreground (what systemd starts)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from . import writing_output
from ..config import flatten, load_config

RUN_EXIT_CODES = """\
exit codes of 'run':
  0  stopped on request (SIGTERM/SIGINT/'stop'), or the daemon exited cleanly and
     restart.policy said not to restart it
  1  the daemon failed and the policy said not to restart it (restart.policy, or an
     exit code in restart.prevent_exit_codes such as charon's 64/65/66)
  3  the configuration file is invalid (the message names key, rule, value, file:line)
  8  the daemon binary (daemon.command) is missing or not executable
  9  crash-loop limit reached (restart.crash_loop) and crash_loop.action is 'exit'
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "run", help="run and supervise the IKE daemon in the foreground",
        description="Run the IKE daemon (charon) under the restart policy until stopped. "
                    "Signals: SIGTERM/SIGINT stop, SIGHUP reloads this configuration, "
                    "SIGUSR1 reloads charon's (swanctl --load-all).",
        epilog=RUN_EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="PATH",
                   help="configuration file (default: $IPSEC_SUPERVISOR_CONFIG, then "
                        "/etc/ipsec-supervisor/supervisor.yaml if it exists, else built-in defaults)")
    p.add_argument("--check-config", action="store_true",
                   help="validate the configuration, print the effective values as JSON and exit (0 or 3)")
    p.set_defaults(func=run)


CHARON_NAMES = ("charon", "charon-systemd")


def make_recovery(cfg):
    """The kernel-state Recovery for ``cfg.recovery.mode``; none (or a daemon that is not charon) gets
    the no-op ``starter.NoRecovery``: ownership markers and settings are charon's."""
    from ..starter import NoRecovery
    if cfg.recovery.mode == "none":
        return NoRecovery()
    name = os.path.basename(cfg.daemon.command[0])
    if name not in CHARON_NAMES and not cfg.recovery.any_daemon:
        logging.getLogger("supervisor").warning(
            "kernel-state recovery is off: daemon.command %s is not charon or charon-systemd (set "
            "recovery.any_daemon: true in %s if it runs charon)", cfg.daemon.command[0], cfg.source)
        return NoRecovery()
    from ..recovery import KernelRecovery
    return KernelRecovery(cfg)


def run(args) -> int:
    cfg = load_config(args.config)  # ConfigError -> exit 3 with the full message
    if args.check_config:
        values = {k: (list(v) if isinstance(v, tuple) else v) for k, v in flatten(cfg).items()}
        with writing_output():
            json.dump({"source": cfg.source, "values": values}, sys.stdout, indent=2, default=list)
            sys.stdout.write("\n")
        return 0
    from ..notify import Notifier, configure_logging
    configure_logging(verbose=getattr(args, "verbose", False))
    from ..starter import Supervisor  # the loop's imports are not needed for --check-config

    recovery = make_recovery(cfg)
    sup = Supervisor(cfg, config_path=args.config, recovery=recovery, notifier=Notifier(),
                     observer=make_observer(cfg, recovery))
    return sup.run()


def make_observer(cfg, recovery):
    """The metrics observer when metrics.listen or metrics.textfile is set (prometheus_client is
    imported only then), told of recovery runs too; else None."""
    if not (cfg.metrics.listen or cfg.metrics.textfile):
        return None
    from ..metrics.exporter import MetricsObserver
    observer = MetricsObserver(cfg)
    if hasattr(recovery, "observer"):
        recovery.observer = observer
    return observer
