"""``ipsec-supervisor``: the daemon and admin tool (subcommands in ``supervisor.commands``)."""

from __future__ import annotations

import importlib
import os
import sys

from . import __version__
from . import commands
from .errors import ExitCode, SupervisorError

EXIT_CODE_HELP = "exit codes:\n" + "\n".join(
    f"  {code.value}  {code.name.lower().replace('_', '-')}" for code in ExitCode
)


def _parser_class():
    from .argparser import Parser

    class _Parser(Parser):
        def error(self, message: str):  # argparse exits 2 on usage errors too; keep its text
            self.print_usage(sys.stderr)
            self.exit(ExitCode.USAGE, f"{self.prog}: error: {message}\n")

    return _Parser


def build_parser(command: str | None = None):
    """The argparse parser; with COMMAND, only the module that registers it (else every module)."""
    import argparse
    _Parser = _parser_class()
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


def parse(argv: list[str]):
    """ARGV's arguments: the usual forms of a command that parses them by hand (its module's
    ``parse_plain``: argparse and the parser cost more than the rest of a quick command), else
    argparse's parse (which also prints usage errors and help, and exits)."""
    command = command_of(argv)
    if command in commands.PLAIN_PARSERS:
        module = importlib.import_module(f"{commands.__name__}.{commands.MODULE_OF[command]}")
        args = module.parse_plain(argv)
        if args is not None:
            return args
    return build_parser(command).parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parse(argv)      # (--help and --version print here)
        if not getattr(args, "func", None):
            build_parser(command_of(argv)).print_help(sys.stderr)
            return ExitCode.USAGE
        from . import lazylog
        if command_of(argv) in commands.QUICK_EXIT:
            lazylog.configure_when_used(args.verbose)   # (their paths log through lazylog.Logger)
        else:
            lazylog.configure(args.verbose)
        return int(args.func(args))
    except SupervisorError as exc:
        print(f"ipsec-supervisor: {exc}", file=sys.stderr)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return ExitCode.OK


def run() -> None:
    """The program (console script): main(), then its output flushed where a failure is still an error
    that says why (exit 1), not a message from the interpreter's exit; then, for a command that leaves
    nothing behind, out without tearing the interpreter down: freeing tens of thousands of snapshot
    records one by one costs a whole process milliseconds nobody waits for."""
    quick = command_of(sys.argv[1:]) in commands.QUICK_EXIT
    if quick:
        # Its imports and decoding make tens of thousands of objects and no garbage cycle worth
        # collecting: the collector would only walk them again and again.
        import gc
        gc.disable()
    rc = main()
    if quick and _alone():
        _exit_now(rc)
    sys.exit(_flushed(rc))


def _alone() -> bool:
    threading = sys.modules.get("threading")
    return threading is None or threading.active_count() == 1


def _exit_now(rc: int) -> None:
    """Flush what Python would flush at exit (logging's handlers, standard streams), then exit."""
    if "logging" in sys.modules:
        sys.modules["logging"].shutdown()
    os._exit(_flushed(rc))


def _flushed(rc: int) -> int:
    """RC after flushing the standard streams: 1 (said on stderr) when the output could not be written."""
    for stream in (sys.stdout, sys.stderr):
        if stream is None:
            continue    # started with that descriptor closed: nothing was written to it
        try:
            stream.flush()
        except (BrokenPipeError, ValueError):
            pass        # a reader that went away (as main's BrokenPipeError), a closed stream
        except OSError as exc:
            if rc == ExitCode.OK:       # (a command that failed has said so: the rest of it is no news)
                try:
                    os.write(2, f"ipsec-supervisor: cannot write the output: {exc.strerror}\n".encode())
                except OSError:
                    pass
            rc = rc or ExitCode.FAILED
    return rc


if __name__ == "__main__":
    run()
