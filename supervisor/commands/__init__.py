"""CLI subcommands of ``ipsec-supervisor``: one module per command group.

Each module defines ``register(subparsers)``, which adds its parsers and sets
``func=handler`` on each; ``handler(args) -> int`` returns the exit code and
raises ``SupervisorError`` for failures.  Modules here are discovered
automatically by ``supervisor.cli``.  A module imports at its top only what
``register`` needs: ``--help`` registers every module, so kernel, VICI and
ipsec.conf code is imported inside the handlers (tests/test_cli_imports.py).
"""

from .. import errors

# Which module registers which command: `ipsec-supervisor status` imports only its own module.
# A command missing here still works (every module is registered); the test keeps this complete.
MODULE_OF = {
    "run": "run",
    "status": "status",
    "crashes": "status",
    "snapshot": "snapshot",
    "leftovers": "recovery",
    "flush": "recovery",
    "reconcile": "recovery",
    "load-ipsec-conf": "legacy",
    "metrics": "metrics",
}

# Commands whose module parses their usual argument forms by hand (``parse_plain(argv)``: the
# namespace argparse would give, or None to leave the rest to argparse; a test compares the two).
PLAIN_PARSERS = frozenset({"snapshot"})
# Commands that leave no thread or file behind: the program exits without the interpreter's teardown;
# their paths log through lazylog.Logger (logging is imported only when something is shown).
QUICK_EXIT = frozenset({"snapshot"})

# Defaults shown in --help, kept here so that --help imports no kernel or legacy module;
# the test checks each against the constant of the module that owns it.
ROUTE_TABLE = 220                         # kernel_state.DEFAULT_ROUTE_TABLE (charon.routing_table)
RULE_PRIORITY = 220                       # kernel_state.DEFAULT_RULE_PRIORITY
RUN_DIR = "/run/ipsec-supervisor"         # config: paths.run_dir
LEDGER = "/run/ipsec-supervisor/ledger.json"    # ledger.ledger_path(RUN_DIR)
IPSEC_CONF = "/etc/ipsec.conf"            # legacy.ipsec_conf.DEFAULT_IPSEC_CONF
IPSEC_SECRETS = "/etc/ipsec.secrets"      # legacy.secrets.DEFAULT_IPSEC_SECRETS
IPSEC_DIR = "/etc/ipsec.d"                # legacy.translate.DEFAULT_IPSEC_DIR
VICI_SOCKET = "/var/run/charon.vici"      # legacy.loader.DEFAULT_VICI_SOCKET
LOAD_TIMEOUT = 10.0                       # legacy.loader.DEFAULT_TIMEOUT
LOAD_MODES = ("load", "update", "reload")  # legacy.loader.MODES


# Around writing a command's output (every command module imports it from here).
writing_output = errors.writing_output


def uint32(text: str) -> int:
    """argparse type: a whole number from 0 to 2**32-1 (route tables, rule priorities)."""
    import argparse
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= value <= 0xFFFFFFFF:
        raise argparse.ArgumentTypeError(f"{value} is out of range (0 to 4294967295)")
    return value
