"""``ipsec-supervisor``: the daemon and admin tool (subcommands in ``supervisor.commands``)."""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__
from . import commands
from .argparser import Parser
from .errors import ExitCode, SupervisorError

EXIT_CODE_HELP = "exit codes:\n" + "\n".join(
    f"  {code.value}  {code.name.lower().replace('_', '-')}" for code in ExitCode
)


class _Parser(Parser):
    def error(self, message: str):  # argparse exits 2 on usage errors too; keep its text
        self.print_usage(sys.stderr)
        self.exit(ExitCode.USAGE, f"{self.prog}: error: {message}\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; with COMMAND, only the module that registers it (else every module)."""
    parser = _Parser(
        prog="ipsec-supervisor",
        description="Crash-recovery supervisor for strongSwan's charon.",
        epilog=EXIT_CODE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    if command in commands.MODULE_OF:
        names = [commands.MODULE_OF[command]]
    else:
        import pkgutil
        names = sorted(info.name for info in pkgutil.iter_modules(commands.__path__))
    for name in names:
        importlib.import_module(f"{commands.__name__}.{name}").register(sub)
    return parser


def command_of(argv: list[str]) -> str | None:
    """The subcommand ARGV names (the global options take no values), or None."""
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(command_of(argv))
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return ExitCode.USAGE
    import logging
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                            format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return int(args.func(args))
    except SupervisorError as exc:
        print(f"ipsec-supervisor: {exc}", file=sys.stderr)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
