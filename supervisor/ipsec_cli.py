"""``ipsec``: strongSwan's ``ipsec`` command for a charon run by ipsec-supervisor.

Same commands and exit codes as strongSwan's script (``ipsec --help`` has the table), with
``start`` starting the supervisor (which runs charon) instead of the starter, and a few
additions that reach the supervisor's own commands (leftovers, flush, reconcile,
snapshots, crashes).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field

from . import __version__, control
from .config import Config, load_config
from .errors import ConfigError, ExitCode, NotRootError, SupervisorError, flush_output, printable, writing_output
from .frontend import forward, lifecycle
from .frontend.pidfile import PidState, read_cmdline

# `typing` is imported for type checkers only: every polled `ipsec status` would pay 3 ms for it;
# argparse (3-4 ms with gettext and locale) only by commands that parse more than `status [NAME]`.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Callable, TextIO

    from .argparser import Parser

PROG = "ipsec"

EXIT_CODES = (
    ("start [--nofork]", "0 started, or already running; 1 charon could not be started (daemon binary "
                         "missing, it died, not ready in time); 2 bad arguments, invalid supervisor.yaml, "
                         "or charon's configuration did not load (charon keeps running); 4 not root"),
    ("stop", "0 always, as strongSwan's script (what happened is on stderr); with --strict: 1 something "
             "had to be killed, 4 not root, 7 not running"),
    ("restart", "as stop, then as start"),
    ("reload, update", "0 loaded (also when charon refused single conns: they are listed on stderr; and "
                       "while charon restarts: the new charon loads the current files); 1 the load failed, "
                       "nothing was applied (the reason is on stderr); 2 update: supervisor.yaml invalid (the "
                       "running one is kept); 7 not running"),
    ("status, statusall", "0 running; 1 not running, a stale pid file is left; 3 not started; "
                          "4 not allowed to ask (not root); 5 charon runs without a supervisor (the one that "
                          "started it died: 'ipsec start' re-attaches to it)"),
    ("up down route unroute NAME, list*, reread*, purge*, leases, ...",
     "7 charon is not running; 2 wrong number of arguments; else stroke's or swanctl's code"),
    ("leftovers, flush, reconcile, snapshots, crashes",
     "as ipsec-supervisor: 0 ok; 1 an action failed; 2 bad arguments; 4 not root; 5 no such network "
     "namespace; 6 bad snapshot file"),
    ("any command whose output cannot be written", "1 (closed, a full disk, an encoding without a "
                                                   "character: one line 'cannot write the output: ...')"),
    ("any other command or option", "2"),
)

COMMAND_HELP = """\
commands:
  start [--nofork] [--config PATH] [--timeout S]
                      start ipsec-supervisor, which starts charon; returns once charon is
                      ready (--nofork: run in the foreground, as a service manager wants)
  stop [--strict]     stop charon gracefully, then the supervisor
  restart             stop, then start
  reload              charon reloads its configuration (swanctl --load-all, SIGUSR1)
  update              the supervisor re-reads supervisor.yaml (SIGHUP), then as reload
  status|statusall [NAME] [--json]
                      the supervisor's state, then charon's (stroke, else swanctl)
  up|down|route|unroute NAME, down-srcip START [END], leases [POOL [ADDR]],
  listalgs|listpubkeys|listcerts|listcacerts|listaacerts|listocspcerts|listacerts|
  listgroups|listcainfos|listcrls|listocsp|listplugins|listall [--utc],
  listcounters|resetcounters [NAME], secrets, rereadsecrets|rereadcacerts|rereadaacerts|
  rereadocspcerts|rereadacerts|rereadcrls|rereadall, purgecerts|purgecrls|purgeike|purgeocsp
                      charon commands, as strongSwan's script runs them (stroke socket;
                      swanctl over VICI where charon has no stroke plugin)
  leftovers [--json]  the kernel state charon owns (ipsec-supervisor leftovers)
  flush [--dry-run] [--json]
                      remove what a dead charon left in the kernel
  reconcile --dry-run [--json]
                      compare the kernel with charon's view (ipsec-supervisor reconcile)
  snapshots [show ID | diff A B] [--json]
                      list, show or compare the kernel-state snapshots
  crashes [--json]    the crash reports of charon's abnormal exits
  version, --versioncode, --directory, --confdir, --piddir
  pki, stroke, _updown, ...   run strongSwan's helper of that name
"""

GLOBAL_HELP = """\
global options (before the command):
  --config PATH       supervisor configuration (default: $IPSEC_SUPERVISOR_CONFIG, then
                      /etc/ipsec-supervisor/supervisor.yaml, else built-in defaults)
  -v, --verbose       debug messages on stderr
"""


def help_text() -> str:
    import textwrap
    table = "\n".join(f"  {cmd}\n" + textwrap.fill(codes, 88, initial_indent=" " * 6, subsequent_indent=" " * 6)
                      for cmd, codes in EXIT_CODES)
    return (f"usage: {PROG} [--config PATH] [-v] COMMAND [ARGUMENTS]\n\n"
            "strongSwan's ipsec command for charon under ipsec-supervisor (crash recovery).\n\n"
            f"{COMMAND_HELP}\n{GLOBAL_HELP}\nexit codes:\n{table}\n")


# ---------------------------------------------------------------------------

@dataclass
class Context:
    """One `ipsec` invocation: its global options, output streams and configuration."""

    config_path: str | None = None
    verbose: bool = False
    out: TextIO = field(default_factory=lambda: sys.stdout)
    err: TextIO = field(default_factory=lambda: sys.stderr)
    _config: Config | None = None

    def config(self) -> Config:
        if self._config is None:
            self._config = load_config(self.config_path)
        return self._config

    def say(self, text: str) -> None:
        print(text, file=self.err)


def _parser(command: str, config: bool = True) -> Parser:
    from .argparser import UsageErrorParser
    p = UsageErrorParser(prog=f"{PROG} {command}", add_help=True)
    if config:
        p.add_argument("--config", metavar="PATH")
    return p


def _merge_config(ctx: Context, args) -> None:
    if getattr(args, "config", None):
        ctx.config_path = args.config
        ctx._config = None


def _is_root() -> bool:
    return os.geteuid() == 0


# ---------------------------------------------------------------------------
# start / stop / restart

def _start_parser(command: str) -> Parser:
    import argparse
    p = _parser(command)
    p.add_argument("--nofork", action="store_true", help="run in the foreground")
    p.add_argument("--timeout", type=float, metavar="S",
                   help="how long to wait for charon to be ready (default: from the configuration)")
    p.add_argument("--raw-exit", action="store_true", help=argparse.SUPPRESS)   # the detached child
    for flag in ("--debug", "--debug-more", "--debug-all"):
        p.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    return p


def _check_daemon_binary(cfg: Config) -> str | None:
    argv0 = cfg.daemon.command[0]
    import shutil
    path = argv0 if "/" in argv0 else shutil.which(argv0)
    if not path or not os.path.isfile(path) or not os.access(path, os.X_OK):
        return (f"daemon {argv0} is missing or not executable (daemon.command in {cfg.source}); "
                "install strongSwan (strongswan-charon) or fix the path")
    return None


def cmd_start(ctx: Context, argv: list[str]) -> int:
    return _start(ctx, _start_parser("start").parse_args(argv), "start")


def _start(ctx: Context, args, what: str) -> int:
    _merge_config(ctx, args)
    ctx.verbose = ctx.verbose or args.debug or args.debug_more or args.debug_all
    if not _is_root():
        ctx.say(f"ipsec {what}: permission denied (must be superuser)")
        return lifecycle.START_NOT_ROOT
    try:
        cfg = ctx.config()
    except ConfigError as exc:
        ctx.say(f"ipsec {what}: {exc}")
        return lifecycle.START_BAD_CONFIG
    missing = _check_daemon_binary(cfg)
    if missing:
        ctx.say(f"ipsec {what}: {missing}")
        return lifecycle.START_FAILED
    if args.nofork:
        from . import cli
        timeout = args.timeout if args.timeout is not None else lifecycle.default_start_timeout(cfg)
        return lifecycle.start_foreground(cfg, ctx.config_path, verbose=ctx.verbose, out=ctx.out, err=ctx.err,
                                          run=cli.main, raw_exit=args.raw_exit, timeout=timeout)
    timeout = args.timeout if args.timeout is not None else lifecycle.default_start_timeout(cfg)
    return lifecycle.start_detached(cfg, ctx.config_path, timeout=timeout, verbose=ctx.verbose,
                                    out=ctx.out, err=ctx.err)


def _stop_parser(command: str) -> Parser:
    p = _parser(command)
    p.add_argument("--timeout", type=float, metavar="S",
                   help="how long to wait for the supervisor to exit before killing it")
    p.add_argument("--strict", action="store_true",
                   help="exit 7 when not running, 1 when something had to be killed")
    return p


def _stop(ctx: Context, timeout: float | None) -> lifecycle.StopResult:
    cfg = ctx.config()
    result = lifecycle.stop_supervisor(
        cfg, timeout=timeout if timeout is not None else lifecycle.default_stop_timeout(cfg), err=ctx.err)
    for line in result.lines:
        ctx.say(f"ipsec stop: {line}" if result.was_running else line)
    return result


def cmd_stop(ctx: Context, argv: list[str]) -> int:
    args = _stop_parser("stop").parse_args(argv)
    _merge_config(ctx, args)
    try:
        result = _stop(ctx, args.timeout)
    except NotRootError as exc:
        ctx.say(f"ipsec stop: {exc}")
        return ExitCode.NOT_ROOT if args.strict else 0
    if not args.strict:
        return 0
    if not result.was_running:
        return ExitCode.NOT_RUNNING
    return 0 if result.clean else 1


def cmd_restart(ctx: Context, argv: list[str]) -> int:
    parser = _start_parser("restart")
    parser.add_argument("--stop-timeout", type=float, metavar="S",
                        help="how long to wait for the supervisor to exit before killing it")
    args = parser.parse_args(argv)
    _merge_config(ctx, args)
    if not _is_root():
        ctx.say("ipsec restart: permission denied (must be superuser)")
        return lifecycle.START_NOT_ROOT
    try:
        found = lifecycle.locate(ctx.config())
    except ConfigError as exc:
        ctx.say(f"ipsec restart: {exc}")
        return lifecycle.START_BAD_CONFIG
    unit = lifecycle.systemd_unit_of(found.pid) if found.pid else None
    if unit:   # a supervisor systemd runs is restarted by systemd, or systemd loses track of it
        ctx.say(f"Restarting {unit} through systemd...")
        import subprocess
        rc = subprocess.run(["systemctl", "restart", unit]).returncode
        return lifecycle.START_OK if rc == 0 else lifecycle.START_FAILED
    _stop(ctx, args.stop_timeout)
    return _start(ctx, args, "restart")


# ---------------------------------------------------------------------------
# reload / update

def _control(ctx: Context, command: str, timeout: float = control.CLIENT_TIMEOUT, **args) -> dict:
    run_dir = ctx.config().paths.run_dir
    try:
        return control.request(run_dir, command, timeout, **args)
    except OSError as exc:      # control.request maps connect errors only
        raise SupervisorError(f"{command}: the control socket in {run_dir} failed: {exc.strerror or exc} "
                              "(the supervisor may be exiting; see 'ipsec status')") from None


def _reload_daemon(ctx: Context, what: str) -> int:
    """Ask for a load of charon's configuration and wait until it has finished."""
    cfg = ctx.config()
    # The supervisor answers once the load (or the follow-up it was merged into) finished.
    timeout = cfg.daemon.load_timeout * 2 + 35.0
    answer = _control(ctx, "reload-daemon", timeout, mode=what, wait=True)
    load = answer.get("load") or {}
    if answer.get("ok"):
        ctx.say(f"ipsec {what}: {answer.get('message')}")
        for refused in load.get("refused") or ():
            ctx.say(f"ipsec {what}: charon refused conn {printable(refused)}")
        return 0
    ctx.say(f"ipsec {what}: {printable(str(answer.get('error')))}")
    if answer.get("not_running") or answer.get("state") not in lifecycle.READY_STATES + ("loading",):
        return ExitCode.NOT_RUNNING
    return ExitCode.FAILED


def cmd_reload(ctx: Context, argv: list[str]) -> int:
    _merge_config(ctx, _parser("reload").parse_args(argv))
    try:
        return _reload_daemon(ctx, "reload")
    except SupervisorError as exc:
        if exc.exit_code == ExitCode.NOT_RUNNING:
            ctx.say(f"Reloading failed: {exc}")
            return ExitCode.NOT_RUNNING
        raise


def cmd_update(ctx: Context, argv: list[str]) -> int:
    _merge_config(ctx, _parser("update").parse_args(argv))
    try:
        answer = _control(ctx, "reload")
        rc = 0
        if answer.get("ok"):
            ctx.say(f"Updating the supervisor's configuration: {answer.get('message')}")
        else:
            ctx.say(f"ipsec update: supervisor.yaml not reloaded, the running configuration stays: "
                    f"{answer.get('error')}")
            rc = ExitCode.USAGE
        return _reload_daemon(ctx, "update") or rc
    except SupervisorError as exc:
        if exc.exit_code == ExitCode.NOT_RUNNING:
            ctx.say(f"Updating failed: {exc}")
            return ExitCode.NOT_RUNNING
        raise


# ---------------------------------------------------------------------------
# status / charon commands

def charon_down(cfg: Config) -> str | None:
    """Why charon is not running (None: it runs), judged by its pid file like strongSwan's script."""
    name = os.path.basename(cfg.daemon.command[0])
    path = cfg.daemon.pid_file
    if path:
        try:
            with open(path, encoding="ascii", errors="replace") as fh:
                pid = int(fh.read().strip() or "x")
        except FileNotFoundError:
            return f"{name} is not running (no {path})"
        except (OSError, ValueError):
            return f"{name} is not running ({path} does not hold a process id)"
        if read_cmdline(pid) in (None, []):
            return f"{name} is not running (stale {path}: pid {pid} is gone)"
        if lifecycle.comm_of(pid) != name[:15]:
            return f"{name} is not running (stale {path}: pid {pid} is {lifecycle.comm_of(pid)})"
        return None
    sock = cfg.daemon.vici_socket
    if sock and os.path.exists(sock):
        return None
    return f"{name} is not running (no pid file configured and no VICI socket {sock})"


def _vici_uri(cfg: Config) -> str | None:
    sock = cfg.daemon.vici_socket
    return f"unix://{sock}" if sock and sock != "/var/run/charon.vici" else None


def _run_helper(argv: list[str]) -> int:
    """Run stroke or swanctl and wait: subprocess.run's exit code, without importing subprocess
    (4 ms of every polled `ipsec status`); our descriptors are close-on-exec already."""
    pid = os.posix_spawnp(argv[0], argv, os.environ)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def _flush(ctx: Context) -> None:
    """Before a helper writes to our standard streams: what we wrote comes first (a stream closed
    at our start is the helper's to find closed)."""
    flush_output(ctx.out)
    if ctx.err is not None:
        ctx.err.flush()


def _run_forward(ctx: Context, plan: forward.Forward) -> int:
    if not plan.commands:
        ctx.say(plan.message)
        return plan.exit_code
    rc = 0
    for argv in plan.commands:
        _flush(ctx)
        try:
            code = _run_helper(list(argv))
        except OSError as exc:
            ctx.say(f"ipsec: cannot run {argv[0]}: {exc.strerror}")
            code = 1
        rc = rc or code
    return rc


def cmd_charon(ctx: Context, name: str, argv: list[str]) -> int:
    cmd = forward.COMMANDS[name]
    usage = forward.check_arity(cmd, argv)
    if usage:
        ctx.say(usage)
        return forward.WRONG_ARGS
    cfg = ctx.config()
    plan = forward.plan_forward(cmd, argv, charon_down=charon_down(cfg),
                                stroke_socket=forward.stroke_socket_present(), vici_uri=_vici_uri(cfg))
    return _run_forward(ctx, plan)


STATUS_UNSUPERVISED = 5


def _status_exit(found: lifecycle.Located, orphan: int | None = None) -> int:
    """0 running; 5 charon runs alone (ORPHAN); 3 nothing and no pid file; 1 a stale pid file."""
    if found.running:
        return 0
    if orphan is not None:
        return STATUS_UNSUPERVISED
    if found.pid_file.state is PidState.ABSENT:
        return 3
    return 1


def _status_line(found: lifecycle.Located, orphan: int | None = None, daemon: str = "charon") -> str:
    if found.status is not None:
        return f"ipsec-supervisor (pid {found.pid}): {found.status['summary']}"
    if found.running:
        return (f"ipsec-supervisor (pid {found.pid}) is running but does not answer on its control "
                f"socket: {found.error}")
    if orphan is not None:
        return (f"ipsec-supervisor is not running, but {daemon} is (pid {orphan}): the supervisor that started "
                f"it died; 'ipsec start' re-attaches to it")
    if found.pid_file.state.stale:
        return f"ipsec-supervisor is not running ({found.pid_file.describe()})"
    return "ipsec-supervisor is not running"


def _decode(value):
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, dict):
        return {_decode(k): _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def _vici_list_sas(cfg: Config, name: str | None) -> list | str:
    """charon's IKE_SAs over VICI (a list), or why they could not be read (a string)."""
    import socket
    import vici
    path = cfg.daemon.vici_socket
    if not path:
        return "no VICI socket configured (daemon.vici_socket)"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(path)
            return [_decode(sa) for sa in vici.Session(sock).list_sas({"ike": name} if name else {})]
    except Exception as exc:  # noqa: BLE001 - OSError, or one of the vici package's own exceptions
        return f"cannot list SAs over {path}: {exc}"


def _status_parser(name: str) -> Parser:
    import argparse
    p = _parser(name)
    p.add_argument("conn", nargs="?", metavar="NAME")
    p.add_argument("extra", nargs="*", help=argparse.SUPPRESS)   # strongSwan's script ignores them
    p.add_argument("--json", action="store_true")
    return p


def plain_status_args(argv: list[str]):
    """What _status_parser makes of the forms polled every few seconds ([NAME...] [--json] [--config PATH],
    names side by side), without argparse; None for anything else (argparse then parses or refuses it)."""
    from types import SimpleNamespace
    names: list[str] = []
    config, as_json, names_ended = None, False, False
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--json":
            as_json = True
        elif a == "--config":
            if config is not None or i + 1 >= len(argv) or not argv[i + 1] or argv[i + 1].startswith("-"):
                return None
            config = argv[i + 1]
            i += 1
        elif a.startswith("-") or not a or names_ended:
            return None     # other options, "-", "--", names split by an option: argparse's rules
        else:
            names.append(a)
        names_ended = names_ended or (bool(names) and a.startswith("-"))
        i += 1
    return SimpleNamespace(config=config, conn=names[0] if names else None, extra=names[1:], json=as_json)


def cmd_status(ctx: Context, name: str, argv: list[str]) -> int:
    args = plain_status_args(argv) or _status_parser(name).parse_args(argv)
    _merge_config(ctx, args)
    cfg = ctx.config()
    try:
        found = lifecycle.locate(cfg)
    except NotRootError as exc:
        ctx.say(f"ipsec {name}: {exc}")
        return ExitCode.NOT_ROOT
    down = charon_down(cfg)
    orphan = lifecycle.unsupervised_daemon(cfg) if not found.running else None
    rc = _status_exit(found, orphan)
    with writing_output(ctx.out):       # (flushed before charon's own status follows)
        if args.json:
            doc = {"running": found.running, "supervisor": found.status, "unsupervised_daemon": orphan,
                   "pid_file": {"path": found.pid_file.path, "state": found.pid_file.state.value,
                                "pid": found.pid_file.pid},
                   "error": found.error if found.status is None else None,
                   "charon": {"running": down is None, "detail": down},
                   "sas": _vici_list_sas(cfg, args.conn) if down is None else []}
            json.dump(doc, ctx.out, indent=1)
            ctx.out.write("\n")
        elif name == "statusall" and found.status is not None:
            from .commands.status import format_status
            print(format_status(found.status), file=ctx.out)
        else:
            print(_status_line(found, orphan, os.path.basename(cfg.daemon.command[0])), file=ctx.out)
    if args.json:
        return rc
    if found.pid_file.state.stale and found.status is None:
        ctx.say(f"ipsec {name}: {found.pid_file.describe()}")
    if down is None:
        cmd = forward.COMMANDS[name]
        plan = forward.plan_forward(cmd, [args.conn] if args.conn else [], charon_down=None,
                                    stroke_socket=forward.stroke_socket_present(), vici_uri=_vici_uri(cfg))
        _run_forward(ctx, plan)
    return rc


# ---------------------------------------------------------------------------
# Additions: the supervisor's own commands

def _subparser_options(name: str) -> set[str] | None:
    """Option strings `ipsec-supervisor NAME` accepts; None if there is no such command."""
    import argparse

    from . import cli
    parser = cli.build_parser(name)
    for action in parser._actions:   # argparse keeps subparsers only here
        if isinstance(action, argparse._SubParsersAction):
            sub = action.choices.get(name)
            return None if sub is None else set(sub._option_string_actions)
    return None


def _delegate(ctx: Context, name: str, argv: list[str], progress_module=None) -> int:
    from . import cli
    options = _subparser_options(name)
    if options is None:
        ctx.say(f"ipsec {name}: not available in this version of ipsec-supervisor ({__version__})")
        return ExitCode.USAGE
    argv = list(argv)
    if ctx.config_path and "--config" in options and "--config" not in argv:
        argv += ["--config", ctx.config_path]
    elif ctx.config_path and "--ledger" in options and not {"--ledger", "--no-ledger"} & set(argv):
        from .ledger import ledger_path
        path = ledger_path(ctx.config().paths.run_dir)
        if os.path.isfile(path) and not os.path.islink(path):   # a planted link: markers only, not an error
            argv += ["--ledger", path]
    head = ["--verbose"] if ctx.verbose else []
    if progress_module is None:
        return cli.main(head + [name] + argv)
    from .frontend.progress import Progress, executor_progress
    with executor_progress(progress_module, Progress(f"{name}", ctx.err)):
        return cli.main(head + [name] + argv)


def cmd_flush(ctx: Context, argv: list[str]) -> int:
    from .commands import recovery
    return _delegate(ctx, "flush", argv, progress_module=recovery)


def snapshot_dir(cfg: Config) -> str:
    return os.path.join(cfg.paths.state_dir, "snapshots")


def list_snapshots(directory: str) -> list[dict]:
    """Snapshot files (oldest first) with id, path, size and modification time."""
    from .trusted_paths import open_own_subdir
    try:
        with open_own_subdir(directory, create=False) as d:    # checked; regular files only
            files = d.files(".json")
    except FileNotFoundError:
        return []
    out = [{"id": f.name[:-5], "path": os.path.join(directory, f.name), "size": f.size, "mtime": f.mtime}
           for f in files]
    out.sort(key=lambda s: (s["mtime"], s["id"]))
    return out


def resolve_snapshot(ident: str, snapshots: list[dict]) -> str:
    """A snapshot's path from a path, an id, a unique id prefix, 'last' or a 1-based index."""
    if os.sep in ident and os.path.exists(ident):
        return ident
    if ident in ("last", "latest") and snapshots:
        return snapshots[-1]["path"]
    if ident.isdigit() and 1 <= int(ident) <= len(snapshots) and not any(s["id"] == ident for s in snapshots):
        return snapshots[int(ident) - 1]["path"]
    exact = [s for s in snapshots if s["id"] == ident or s["id"] + ".json" == ident]
    if exact:
        return exact[0]["path"]
    prefix = [s for s in snapshots if s["id"].startswith(ident)]
    if len(prefix) == 1:
        return prefix[0]["path"]
    if len(prefix) > 1:
        raise SupervisorError(f"snapshot {ident!r} is ambiguous: {', '.join(s['id'] for s in prefix[:5])}"
                              f"{' ...' if len(prefix) > 5 else ''}; give more of its name", ExitCode.USAGE)
    raise SupervisorError(f"no snapshot {ident!r} (list them with 'ipsec snapshots')", ExitCode.USAGE)


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def cmd_snapshots(ctx: Context, argv: list[str]) -> int:
    p = _parser("snapshots")
    p.add_argument("--dir", metavar="DIR", help="snapshot directory (default: STATE_DIR/snapshots)")
    p.add_argument("--json", action="store_true")
    p.add_argument("action", nargs="?", choices=("list", "show", "diff"), default="list")
    p.add_argument("ids", nargs="*", metavar="ID")
    args = p.parse_args(argv)
    _merge_config(ctx, args)
    directory = args.dir or snapshot_dir(ctx.config())
    snaps = list_snapshots(directory)
    want = {"list": 0, "show": 1, "diff": 2}[args.action]
    if len(args.ids) != want:
        raise SupervisorError(f"ipsec snapshots {args.action}: needs {want} snapshot id(s), got {len(args.ids)}",
                              ExitCode.USAGE)
    if args.action == "list":
        with writing_output(ctx.out):
            if args.json:
                json.dump({"directory": directory, "snapshots": snaps}, ctx.out, indent=1)
                ctx.out.write("\n")
            elif not snaps:
                print(f"no snapshots in {directory}", file=ctx.out)
            else:
                print(f"{len(snaps)} snapshot(s) in {directory}:", file=ctx.out)
                for i, s in enumerate(snaps, 1):
                    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["mtime"]))
                    print(f"{i:>4}  {when}  {_size(s['size']):>9}  {s['id']}", file=ctx.out)
        return 0
    paths = [resolve_snapshot(i, snaps) for i in args.ids]
    from .frontend.progress import Progress
    progress = Progress("snapshots", ctx.err)
    for path in paths:
        size = os.path.getsize(path)
        if size > 1024 * 1024:
            progress.message(f"reading {os.path.basename(path)} ({_size(size)})...")
    from . import cli
    return cli.main(["snapshot", args.action, *paths] + (["--json"] if args.json else []))


# ---------------------------------------------------------------------------
# Compatibility: version, directories, helpers

def strongswan_version() -> str:
    import subprocess
    try:
        out = subprocess.run(["/usr/lib/ipsec/charon", "--version"], capture_output=True, text=True,
                             timeout=5).stdout.split()
        return out[-1] if out else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versioncode() -> str:
    import platform
    return f"U{strongswan_version()}/K{platform.release()}"


def cmd_version(ctx: Context, argv: list[str]) -> int:
    import platform
    with writing_output(ctx.out):
        print(f"{platform.system()} strongSwan {versioncode()}", file=ctx.out)
        print(f"ipsec-supervisor {__version__} (this ipsec command starts charon under ipsec-supervisor)",
              file=ctx.out)
    return 0


# ---------------------------------------------------------------------------

HANDLERS: dict[str, Callable[[Context, list[str]], int]] = {
    "start": cmd_start,
    "stop": cmd_stop,
    "restart": cmd_restart,
    "reload": cmd_reload,
    "update": cmd_update,
    "status": lambda ctx, a: cmd_status(ctx, "status", a),
    "statusall": lambda ctx, a: cmd_status(ctx, "statusall", a),
    "leftovers": lambda ctx, a: _delegate(ctx, "leftovers", a),
    "flush": cmd_flush,
    "reconcile": lambda ctx, a: _delegate(ctx, "reconcile", a),
    "crashes": lambda ctx, a: _delegate(ctx, "crashes", a),
    "snapshots": cmd_snapshots,
    "version": cmd_version,
    "--version": cmd_version,
}


def _split_global(argv: list[str]) -> tuple[Context, list[str]]:
    ctx = Context()
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--config":
            if i + 1 >= len(argv):
                raise SupervisorError("ipsec: --config needs a path", ExitCode.USAGE)
            ctx.config_path = argv[i + 1]
            i += 2
        elif a.startswith("--config="):
            ctx.config_path = a.split("=", 1)[1]
            i += 1
        elif a in ("-v", "--verbose"):
            ctx.verbose = True
            i += 1
        else:
            break
    return ctx, argv[i:]


def dispatch(ctx: Context, argv: list[str]) -> int:
    if not argv:
        with writing_output(ctx.out):
            print(f"{PROG} command [arguments]\n\nUse --help for a list of commands, or refer to the "
                  f"{PROG}(8) man page.", file=ctx.out)
        return 0
    command, rest = argv[0], argv[1:]
    if command in ("--help", "-h", "help"):
        with writing_output(ctx.out):
            ctx.out.write(help_text())
        return 0
    simple = {"--versioncode": versioncode, "--directory": lambda: forward.IPSEC_DIR,
              "--confdir": lambda: "/etc", "--piddir": lambda: "/var/run"}
    if command in simple:
        with writing_output(ctx.out):
            print(simple[command](), file=ctx.out)
        return 0
    if command in HANDLERS:
        return HANDLERS[command](ctx, rest)
    if command in forward.COMMANDS:
        return cmd_charon(ctx, command, rest)
    helper = forward.passthrough_path(command)
    if helper:
        _flush(ctx)
        os.execv(helper, [helper, *rest])
    if command.startswith("--"):
        ctx.say(f"{PROG}: unknown option `{command}' (perhaps command name was omitted?)")
        return ExitCode.USAGE
    ctx.say(f"{PROG}: unknown command `{command}' (`{PROG} --help' for list)")
    return ExitCode.USAGE


# What Neutron and Open vSwitch poll for every router on every sync: these paths never log, so
# they skip importing logging (the import-budget test keeps them so).
POLLED_FLAGS = ("--help", "-h", "help", "--versioncode", "--directory", "--confdir", "--piddir")


def _is_polled(argv: list[str]) -> bool:
    return not argv or argv[0] in ("status", "statusall") + POLLED_FLAGS or argv[0] in forward.COMMANDS


def _configure_logging(verbose: bool) -> None:
    import logging
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                            format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        ctx, rest = _split_global(argv)
    except SupervisorError as exc:
        print(str(exc), file=sys.stderr)
        return int(exc.exit_code)
    if ctx.verbose or not _is_polled(rest):
        _configure_logging(ctx.verbose)
    try:
        rc = int(dispatch(ctx, rest))
        flush_output()      # what is still buffered: a failure is an error here, not at the exit
        return rc
    except ConfigError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return ExitCode.USAGE         # strongSwan's code for a bad configuration
    except SupervisorError as exc:
        print(f"{PROG}: {exc}" if not str(exc).startswith(PROG) else str(exc), file=sys.stderr)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
