"""The supervisor's YAML configuration: schema, built-in defaults, loading and validation.

Every key is a field of one of the frozen dataclasses below; the field's default is the
built-in default (documented, key by key, in etc/supervisor.yaml) and its metadata holds
the rule that validates it.  Errors name the key, the rule, the value found and file:line.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import signal
import sys
from dataclasses import dataclass, field

from .errors import ConfigError

# `typing` is imported for type checkers only: every polled `ipsec status` would pay 3 ms for it.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable

    import yaml       # imported on first parse: commands that find no file never pay for it

DEFAULT_PATH = "/etc/ipsec-supervisor/supervisor.yaml"
ENV_VAR = "IPSEC_SUPERVISOR_CONFIG"
BUILTIN = "built-in defaults"

RESTART_POLICIES = ("always", "on-failure", "on-crash", "never")
GIVE_UP_ACTIONS = ("cooldown", "exit", "stay")
RECOVERY_MODES = ("adopt", "flush", "keep", "none")
STOP_ACTIONS = ("flush", "keep")
DAEMON_OUTPUTS = ("pty", "pipe")
DAEMON_CONFIG_KINDS = ("auto", "swanctl", "ipsec.conf")
SWANCTL_LOAD_ALL = ("/usr/sbin/swanctl", "--load-all", "--noprompt")


# ---------------------------------------------------------------------------
# Value rules.  Each turns a YAML value into a Python value or raises _Invalid
# with the rule ("must be ...") so the caller can add key, value and line.

class _Invalid(Exception):
    def __init__(self, rule: str, shown: str | None = None):
        super().__init__(rule)
        self.rule = rule
        self.shown = shown  # overrides how the offending value is printed


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, (list, dict)):
        return "a list" if isinstance(value, list) else "a mapping"
    return str(value)


_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: Any) -> float:
    """Seconds from a number or a string such as '250ms', '30s', '2m', '1m30s'; ValueError if not."""
    if isinstance(value, bool):
        raise ValueError("a boolean is not a duration")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        pos, seconds, parts = 0, 0.0, 0
        for m in _DURATION_PART.finditer(text):
            if m.start() != pos and text[pos:m.start()].strip():
                raise ValueError(f"not a duration: {value!r}")
            seconds += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
            pos, parts = m.end(), parts + 1
        if parts == 0 or text[pos:].strip():
            try:
                seconds = float(text)  # a quoted plain number
            except ValueError:
                raise ValueError(f"not a duration: {value!r}") from None
    else:
        raise ValueError(f"not a duration: {value!r}")
    if math.isnan(seconds) or math.isinf(seconds):
        raise ValueError(f"not a finite duration: {value!r}")
    return seconds


def format_duration(seconds: float) -> str:
    """The shortest of '250ms', '30s', '2m' that states ``seconds`` exactly."""
    if seconds == 0:
        return "0s"
    if seconds < 1 and round(seconds * 1000, 6).is_integer():
        return f"{int(round(seconds * 1000))}ms"
    if seconds >= 60 and (seconds / 60).is_integer():
        return f"{int(seconds // 60)}m"
    if float(seconds).is_integer():
        return f"{int(seconds)}s"
    return f"{seconds:g}s"


@dataclass(frozen=True)
class Rule:
    """How one key is validated: a parser plus an optional doc of the rule."""

    parse: Callable[[Any], Any]
    nullable: bool = False

    def __call__(self, value: Any) -> Any:
        if value is None:
            if self.nullable:
                return None
            raise _Invalid("must be set")
        return self.parse(value)


def duration(minimum: float = 0.0, maximum: float | None = None, *, positive: bool = False,
             nullable: bool = False) -> Rule:
    def parse(value):
        try:
            seconds = parse_duration(value)
        except ValueError:
            raise _Invalid("must be a duration (seconds, or a number with ms, s, m or h)") from None
        if positive and seconds <= 0:
            raise _Invalid("must be > 0")
        if seconds < minimum:
            raise _Invalid(f"must be >= {format_duration(minimum)}")
        if maximum is not None and seconds > maximum:
            raise _Invalid(f"must be <= {format_duration(maximum)}")
        return seconds
    return Rule(parse, nullable)


def number(minimum: float | None = None, maximum: float | None = None, *, integer: bool = False) -> Rule:
    def parse(value):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Invalid("must be an integer" if integer else "must be a number")
        if integer and not isinstance(value, int):
            raise _Invalid("must be an integer")
        if math.isnan(value) or math.isinf(value):
            raise _Invalid("must be a finite number")
        if minimum is not None and value < minimum:
            raise _Invalid(f"must be >= {minimum}")
        if maximum is not None and value > maximum:
            raise _Invalid(f"must be <= {maximum}")
        return value if integer else float(value)
    return Rule(parse)


_SIZE = re.compile(r"(\d+)\s*([kKMGT]?)i?B?")
_SIZE_UNITS = {"": 1, "k": 1 << 10, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def size() -> Rule:
    """Bytes: an integer, or a number with k, M, G or T (powers of 1024)."""
    def parse(value):
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
        m = _SIZE.fullmatch(value.strip()) if isinstance(value, str) else None
        if m is None:
            raise _Invalid("must be a size in bytes (an integer, or a number with k, M, G or T)")
        return int(m.group(1)) * _SIZE_UNITS[m.group(2)]
    return Rule(parse)


def boolean() -> Rule:
    def parse(value):
        if not isinstance(value, bool):
            raise _Invalid("must be true or false")
        return value
    return Rule(parse)


def choice(options: tuple[str, ...]) -> Rule:
    def parse(value):
        if value not in options:
            raise _Invalid("must be one of " + ", ".join(options))
        return value
    return Rule(parse)


def abs_path(nullable: bool = False) -> Rule:
    def parse(value):
        if not isinstance(value, str) or not value.startswith("/"):
            raise _Invalid("must be an absolute path")
        return os.path.normpath(value)
    return Rule(parse, nullable)


def listen_address(nullable: bool = False) -> Rule:
    """HOST:PORT for a TCP listener: an IPv4 address, [IPv6], localhost, or empty (all addresses)."""
    def parse(value):
        text = value if isinstance(value, str) else ""
        m = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[0-9.]*|localhost):(\d{1,5})", text.strip())
        if not m or not 1 <= int(m.group(2)) <= 65535:
            raise _Invalid("must be HOST:PORT (e.g. 127.0.0.1:9089, [::1]:9089, :9089 for all addresses)")
        host = m.group(1).strip("[]")
        if host and host != "localhost":
            import ipaddress
            try:
                ipaddress.ip_address(host)
            except ValueError:
                raise _Invalid("must be HOST:PORT with an IP address as HOST") from None
        return text.strip()
    return Rule(parse, nullable)


def prom_file(nullable: bool = False) -> Rule:
    def parse(value):
        path = abs_path()(value)
        if not path.endswith(".prom"):
            raise _Invalid("must be an absolute path ending in .prom (node_exporter's textfile collector "
                           "reads only *.prom)")
        return path
    return Rule(parse, nullable)


def _argv(value) -> tuple[str, ...]:
    if isinstance(value, str):
        raise _Invalid("must be a command as a list of strings (no shell), e.g. [swanctl, --load-all]")
    if not isinstance(value, list) or not value:
        raise _Invalid("must be a non-empty list of strings")
    if not all(isinstance(a, (str, int, float)) and not isinstance(a, bool) for a in value):
        raise _Invalid("must be a list of strings")
    argv = tuple(str(a) for a in value)
    if not argv[0]:
        raise _Invalid("must name a program first")
    return argv


def command(nullable: bool = False) -> Rule:
    return Rule(_argv, nullable)


def commands(nullable: bool = False) -> Rule:
    def parse(value):
        if not isinstance(value, list):
            raise _Invalid("must be a list of commands (each a list of strings)")
        out = []
        for i, item in enumerate(value):
            try:
                out.append(_argv(item))
            except _Invalid as exc:
                raise _Invalid(f"item {i + 1} {exc.rule}", _show(item)) from None
        return tuple(out)
    return Rule(parse, nullable)


def exit_codes() -> Rule:
    def parse(value):
        if not isinstance(value, list):
            raise _Invalid("must be a list of exit codes (0-255)")
        for code in value:
            if isinstance(code, bool) or not isinstance(code, int) or not 0 <= code <= 255:
                raise _Invalid("must be a list of exit codes (0-255)", _show(code))
        return tuple(sorted(set(value)))
    return Rule(parse)


def signal_name() -> Rule:
    def parse(value):
        name = value.upper() if isinstance(value, str) else value
        if isinstance(name, str) and not name.startswith("SIG"):
            name = "SIG" + name
        try:
            signal.Signals[name]
        except (KeyError, TypeError):
            raise _Invalid("must be a signal name such as SIGTERM") from None
        return name
    return Rule(parse)


def environment() -> Rule:
    def parse(value):
        if not isinstance(value, dict):
            raise _Invalid("must be a mapping of variable names to strings")
        out = []
        for k, v in value.items():
            if not isinstance(k, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k):
                raise _Invalid("must use variable names ([A-Za-z_][A-Za-z0-9_]*) as keys", _show(k))
            if v is None or isinstance(v, (list, dict)):
                raise _Invalid(f"must map {k} to a string", _show(v))
            out.append((k, str(v) if not isinstance(v, bool) else ("1" if v else "0")))
        return tuple(sorted(out))
    return Rule(parse)


@dataclass(frozen=True, slots=True)
class Hook:
    """One hook command (argv) and its time limit in seconds."""

    command: tuple[str, ...]
    timeout: float


def hooks() -> Rule:
    """A list of hooks: each an argv list, or {command: [...], timeout: 5s}; timeout None = hooks.timeout."""
    def parse(value):
        if not isinstance(value, list):
            raise _Invalid("must be a list of commands (argv lists or {command, timeout} mappings)")
        out = []
        for i, item in enumerate(value):
            if isinstance(item, dict):
                unknown = set(item) - {"command", "timeout"}
                if unknown or "command" not in item:
                    raise _Invalid(f"item {i + 1} must have a command and optionally a timeout",
                                   ", ".join(sorted(map(str, unknown))) or "no command")
                try:
                    argv = _argv(item["command"])
                except _Invalid as exc:
                    raise _Invalid(f"item {i + 1} command {exc.rule}", exc.shown or _show(item["command"])) from None
                try:
                    timeout = None if item.get("timeout") is None else duration(positive=True)(item["timeout"])
                except _Invalid as exc:
                    raise _Invalid(f"item {i + 1} timeout {exc.rule}", _show(item["timeout"])) from None
                out.append((argv, timeout))
            else:
                try:
                    out.append((_argv(item), None))
                except _Invalid as exc:
                    raise _Invalid(f"item {i + 1} {exc.rule}", _show(item)) from None
        return tuple(out)
    return Rule(parse)


def _key(rule: Rule, default: Any, doc: str):
    return field(default=default, metadata={"rule": rule, "doc": doc})


def _section(cls, doc: str):
    return field(default_factory=cls, metadata={"doc": doc})


# ---------------------------------------------------------------------------
# The schema.  Defaults here ARE the built-in defaults; etc/supervisor.yaml
# documents the same values (a test keeps them equal).

@dataclass(frozen=True, slots=True)
class DaemonConfig:
    """daemon: the supervised IKE daemon."""

    command: tuple[str, ...] = _key(command(), ("/usr/lib/ipsec/charon",),
                                    "the IKE daemon's argv (charon, or charon-systemd with pid_file: null)")
    pid_file: str | None = _key(abs_path(nullable=True), "/var/run/charon.pid",
                                "written by the daemon once initialised; null: readiness by VICI alone")
    vici_socket: str | None = _key(abs_path(nullable=True), "/var/run/charon.vici",
                                   "VICI socket for readiness and health probes; null: no probes")
    environment: tuple[tuple[str, str], ...] = _key(environment(), (), "extra environment variables")
    output: str = _key(choice(DAEMON_OUTPUTS), "pty",
                       "pty: stdio line-buffers, so the last lines before a crash arrive; pipe: a plain pipe")
    start_timeout: float = _key(duration(positive=True), 10.0, "time to become ready (pid file + VICI)")
    config: str = _key(choice(DAEMON_CONFIG_KINDS), "auto",
                       "where connections come from: swanctl, ipsec.conf, or auto (ipsec.conf when it "
                       "defines a conn to load, else swanctl)")
    ipsec_conf: str = _key(abs_path(), "/etc/ipsec.conf", "ipsec.conf read when daemon.config is ipsec.conf")
    ipsec_secrets: str | None = _key(abs_path(nullable=True), "/etc/ipsec.secrets",
                                     "ipsec.secrets loaded with ipsec.conf; null: none")
    load_commands: tuple[tuple[str, ...], ...] | None = _key(
        commands(nullable=True), None,
        "run in order once the daemon answers, then the supervisor reports ready; "
        "null: by daemon.config")
    load_timeout: float = _key(duration(positive=True), 30.0, "time limit of each load command")
    reload_commands: tuple[tuple[str, ...], ...] | None = _key(
        commands(nullable=True), None, "run by ipsec reload/update (SIGUSR1/SIGHUP); null: the load commands")
    log_lines: int = _key(number(0, 100000, integer=True), 200, "daemon output lines kept for crash reports")


@dataclass(frozen=True, slots=True)
class BackoffConfig:
    """restart.backoff: delays between restarts."""

    initial: float = _key(duration(), 0.0, "delay of the first restart after a stable run (0: at once)")
    step: float = _key(duration(), 1.0, "delay of the second restart in a row; times factor for each further one")
    factor: float = _key(number(1.0, 100.0), 2.0, "growth of the delay per consecutive restart")
    maximum: float = _key(duration(), 30.0, "upper bound of any delay")
    jitter: float = _key(number(0.0, 1.0), 0.1, "each delay is moved by up to this fraction, randomly")
    reset_after: float = _key(duration(), 60.0, "uptime after which the next restart counts as the first again")


@dataclass(frozen=True, slots=True)
class CrashLoopConfig:
    """restart.crash_loop: when to give up."""

    max_deaths: int = _key(number(0, 10000, integer=True), 5, "deaths within window that make us give up; 0: never")
    window: float = _key(duration(positive=True), 60.0, "the sliding window for max_deaths")
    action: str = _key(choice(GIVE_UP_ACTIONS), "cooldown",
                       "cooldown: stay up fail-closed and try again after a cooldown; exit: exit 9 (for a "
                       "service manager to decide); stay: wait for 'ipsec start'")
    cooldown: float = _key(duration(positive=True), 300.0, "first pause after the limit (action cooldown)")
    cooldown_max: float = _key(duration(positive=True), 3600.0,
                               "each further pause in a row doubles, up to this; a stable run resets it")


@dataclass(frozen=True, slots=True)
class RestartConfig:
    """restart: the restart policy."""

    policy: str = _key(choice(RESTART_POLICIES), "on-failure", "when to restart")
    prevent_exit_codes: tuple[int, ...] = _key(exit_codes(), (64, 65, 66), "exit codes that are never restarted")
    force_exit_codes: tuple[int, ...] = _key(exit_codes(), (), "exit codes that are always restarted")
    okay_delay: float = _key(duration(), 1.0, "a start counts as successful after staying up this long once ready")
    backoff: BackoffConfig = _section(BackoffConfig, "delays between restarts")
    crash_loop: CrashLoopConfig = _section(CrashLoopConfig, "when to give up")


@dataclass(frozen=True, slots=True)
class HealthConfig:
    """health: the VICI health probe."""

    enabled: bool = _key(boolean(), True, "probe the daemon over VICI while it runs")
    interval: float = _key(duration(positive=True), 10.0, "time between probes")
    timeout: float = _key(duration(positive=True), 3.0, "time a probe may take")
    failures: int = _key(number(1, 1000, integer=True), 3, "consecutive failed probes that mean 'hung'")
    abort_timeout: float = _key(duration(positive=True), 5.0, "after SIGABRT, time to die before SIGKILL")


@dataclass(frozen=True, slots=True)
class StopConfig:
    """stop: the graceful stop."""

    signal: str = _key(signal_name(), "SIGTERM", "graceful stop signal")
    timeout: float = _key(duration(positive=True), 10.0, "time to exit before SIGKILL")


@dataclass(frozen=True, slots=True)
class HooksConfig:
    """hooks: commands run on events."""

    timeout: float = _key(duration(positive=True), 10.0, "time limit of a hook without its own")
    on_crash: tuple = _key(hooks(), (), "run after every abnormal exit")
    on_give_up: tuple = _key(hooks(), (), "run when the crash-loop limit is reached")

    def resolved(self, which: str) -> tuple[Hook, ...]:
        """The hooks of ``which`` ('on_crash' or 'on_give_up') with their time limits filled in."""
        return tuple(Hook(argv, self.timeout if t is None else t) for argv, t in getattr(self, which))


@dataclass(frozen=True, slots=True)
class PathsConfig:
    """paths: where the supervisor keeps its files."""

    run_dir: str = _key(abs_path(), "/run/ipsec-supervisor", "control socket and lock (root only)")
    state_dir: str = _key(abs_path(), "/var/lib/ipsec-supervisor",
                          "crash reports go to STATE_DIR/crashes, snapshots to STATE_DIR/snapshots")


@dataclass(frozen=True, slots=True)
class CrashReportsConfig:
    """crash_reports: one JSON report per abnormal exit."""

    enabled: bool = _key(boolean(), True, "write a JSON report per abnormal exit")
    keep: int = _key(number(1, 100000, integer=True), 100, "newest reports kept; older ones are removed")


@dataclass(frozen=True, slots=True)
class SnapshotsConfig:
    """snapshots: of the kernel state a dead daemon left."""

    enabled: bool = _key(boolean(), True, "snapshot the kernel state a dead daemon left, before recovery acts")
    keep: int = _key(number(1, 100000, integer=True), 50, "newest snapshots kept; older ones are removed")
    max_age: float = _key(duration(), 30 * 86400.0, "snapshots older than this are removed; 0: no age limit")
    max_bytes: int = _key(size(), 1 << 30, "total size of the snapshots, and of the crash reports, each kept "
                                           "below this (oldest removed first, the newest always kept); 0: no limit")


@dataclass(frozen=True, slots=True)
class RecoveryConfig:
    """recovery: what happens to the kernel state a dead daemon left."""

    mode: str = _key(choice(RECOVERY_MODES), "adopt", "what to do with the kernel state a dead daemon left")
    timeout: float = _key(duration(positive=True), 60.0, "time limit of each recovery step")
    fail_closed: bool = _key(boolean(), True, "block policies stand in for removed out/fwd policies")
    block_timeout: float = _key(duration(positive=True), 30.0,
                                "blocks charon did not replace are removed this long after it is ready")
    adopt_grace: float = _key(duration(), 60.0,
                              "time charon has to claim leftovers once ready or since the last initiation, "
                              "not counting while initiations wait their turn (adopt)")
    adopt_initiate: bool = _key(boolean(), True, "initiate matched children with a known peer (adopt)")
    adopt_initiate_parallel: int = _key(number(1, 10000, integer=True), 1,
                                        "IKE_SAs being established at once while adopting (adopt)")
    on_stop: str = _key(choice(STOP_ACTIONS), "flush", "after a requested stop: remove what charon left behind")
    any_daemon: bool = _key(boolean(), False,
                            "recover for a daemon.command not named charon/charon-systemd (a wrapper)")


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """metrics: Prometheus metrics."""

    listen: str | None = _key(listen_address(nullable=True), None,
                              "HOST:PORT serving /metrics for Prometheus (e.g. 127.0.0.1:9089); null: off")
    textfile: str | None = _key(prom_file(nullable=True), None,
                                "*.prom file for node_exporter's textfile collector, rewritten after every change")
    vici_timeout: float = _key(duration(0.05, 30.0), 2.0, "time charon's VICI answers may take during a scrape")
    vici_cache: float = _key(duration(0.0, 300.0), 1.0, "charon's VICI view is reused this long between scrapes")
    max_children: int = _key(number(1, 100000, integer=True), 100,
                             "above this many CHILD_SAs, per-child series are summed per connection")


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration (``source``: the file it was read from, or BUILTIN)."""

    daemon: DaemonConfig = _section(DaemonConfig, "the supervised IKE daemon")
    restart: RestartConfig = _section(RestartConfig, "restart policy")
    health: HealthConfig = _section(HealthConfig, "health probe")
    stop: StopConfig = _section(StopConfig, "graceful stop")
    hooks: HooksConfig = _section(HooksConfig, "commands run on events")
    paths: PathsConfig = _section(PathsConfig, "where the supervisor keeps its files")
    crash_reports: CrashReportsConfig = _section(CrashReportsConfig, "crash reports")
    recovery: RecoveryConfig = _section(RecoveryConfig, "kernel state recovery")
    snapshots: SnapshotsConfig = _section(SnapshotsConfig, "snapshots of leftover kernel state")
    metrics: MetricsConfig = _section(MetricsConfig, "Prometheus metrics")
    source: str = field(default=BUILTIN, compare=False, metadata={"internal": True})

    @property
    def crash_dir(self) -> str:
        return os.path.join(self.paths.state_dir, "crashes")

    @property
    def snapshot_dir(self) -> str:
        return os.path.join(self.paths.state_dir, "snapshots")

    @property
    def config_kind(self) -> str:
        """swanctl or ipsec.conf: daemon.config with auto resolved by what exists now."""
        kind = self.daemon.config
        if kind == "auto":
            from .legacy.ipsec_conf import has_loadable_conns
            kind = "ipsec.conf" if has_loadable_conns(self.daemon.ipsec_conf) else "swanctl"
        return kind

    def ipsec_conf_loader(self, mode: str, state_file: str) -> tuple[str, ...]:
        """The ipsec.conf loader's argv; STATE_FILE records what it loaded into one charon."""
        argv = [sys.executable, "-m", "supervisor.cli", "load-ipsec-conf", "--mode", mode,
                "--file", self.daemon.ipsec_conf, "--state", state_file]
        argv += ["--secrets", self.daemon.ipsec_secrets] if self.daemon.ipsec_secrets else ["--no-secrets"]
        if self.daemon.vici_socket:
            argv += ["--vici", self.daemon.vici_socket]
        return tuple(argv)

    @property
    def effective_load_commands(self) -> tuple[tuple[str, ...], ...]:
        """The commands of a load after a start, as decided now (see loads.choose_load)."""
        if self.daemon.load_commands is not None:
            return self.daemon.load_commands
        if self.config_kind == "ipsec.conf":
            return (self.ipsec_conf_loader("load", os.path.join(self.paths.run_dir, "ipsec-conf.PID.state")),)
        return (SWANCTL_LOAD_ALL,)

    @property
    def effective_daemon_command(self) -> tuple[str, ...]:
        """daemon.command, plus charondebug's --debug-TYPE LEVEL pairs in ipsec.conf mode."""
        if self.config_kind != "ipsec.conf":
            return self.daemon.command
        from .legacy.loader import daemon_options
        extra, _settings = daemon_options(self.daemon.ipsec_conf)
        return self.daemon.command + tuple(extra)


def default_config() -> Config:
    """The built-in defaults (used when no configuration file exists)."""
    return Config()


def _is_section(f: dataclasses.Field) -> bool:
    return "rule" not in f.metadata and not f.metadata.get("internal")


def _fields(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if not f.metadata.get("internal")]


def all_keys(cls=Config, prefix: str = "") -> list[str]:
    """Every dotted key of the schema, in declaration order."""
    out = []
    for f in _fields(cls):
        if _is_section(f):
            out.extend(all_keys(_section_type(cls, f), f"{prefix}{f.name}."))
        else:
            out.append(prefix + f.name)
    return out


def all_sections(cls=Config, prefix: str = "") -> list[str]:
    """Every dotted section name ('restart', 'restart.backoff', ...)."""
    out = []
    for f in _fields(cls):
        if _is_section(f):
            out.append(prefix + f.name)
            out.extend(all_sections(_section_type(cls, f), f"{prefix}{f.name}."))
    return out


def _section_type(cls, f: dataclasses.Field):
    return type(f.default_factory())


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted key: value} of a config object (handy for diffs and docs)."""
    out: dict[str, Any] = {}
    for f in _fields(type(cfg)):
        value = getattr(cfg, f.name)
        if _is_section(f):
            out.update(flatten(value, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = value
    return out


def changed_keys(old: Config, new: Config) -> list[str]:
    a, b = flatten(old), flatten(new)
    return [k for k in a if a[k] != b[k]]


# ---------------------------------------------------------------------------
# Loading.

def _construct(node: yaml.Node) -> Any:
    import yaml
    loader = yaml.SafeLoader("")  # used only to build Python values of leaf nodes
    try:
        return loader.construct_object(node, deep=True)
    finally:
        loader.dispose()


class _Problems:
    def __init__(self, source: str):
        self.source = source
        self.items: list[str] = []

    def add(self, key: str, rule: str, shown: str | None, node: yaml.Node | None):
        where = f" ({self.source} line {node.start_mark.line + 1})" if node is not None else f" ({self.source})"
        found = "" if shown is None else f", not {shown}"
        self.items.append(f"{key} {rule}{found}{where}")


def _suggest(key: str, known: list[str]) -> str:
    import difflib      # only a config with an unknown key needs it
    leaf = key.rsplit(".", 1)[-1]
    same_leaf = [k for k in known if k.rsplit(".", 1)[-1] == leaf]
    close = same_leaf or difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if not close:
        leaves = {k.rsplit(".", 1)[-1]: k for k in known}
        close = [leaves[m] for m in difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.7)]
    return f"; did you mean {close[0]}?" if close else ""


def _build(cls, node: yaml.Node | None, prefix: str, problems: _Problems, known: list[str]):
    import yaml
    values: dict[str, Any] = {}
    if node is None:
        return cls()
    if not isinstance(node, yaml.MappingNode):
        shown = "a list" if isinstance(node, yaml.SequenceNode) else _show(_construct(node))
        problems.add(prefix.rstrip(".") or "the file", "must be a mapping", shown, node)
        return cls()
    by_name = {f.name: f for f in _fields(cls)}
    seen: dict[str, yaml.Node] = {}
    for knode, vnode in node.value:
        name = knode.value if isinstance(knode, yaml.ScalarNode) else None
        full = prefix + str(name)
        if name is None or name not in by_name:
            problems.add(full, "is not a known key" + _suggest(full, known), None, knode)
            continue
        if name in seen:
            problems.add(full, f"is given twice (first on line {seen[name].start_mark.line + 1})", None, knode)
            continue
        seen[name] = knode
        f = by_name[name]
        if _is_section(f):
            sub = vnode
            if isinstance(vnode, yaml.ScalarNode) and vnode.tag == "tag:yaml.org,2002:null":
                sub = None  # "backoff:" with nothing under it: all defaults
            values[name] = _build(_section_type(cls, f), sub, full + ".", problems, known)
            continue
        try:
            raw = _construct(vnode)
        except yaml.YAMLError as exc:
            problems.add(full, f"cannot be read ({exc})", None, vnode)
            continue
        try:
            values[name] = f.metadata["rule"](raw)
        except _Invalid as exc:
            problems.add(full, exc.rule, exc.shown if exc.shown is not None else _show(raw), vnode)
    return cls(**values)


def _line_of(root: yaml.Node | None, dotted: str) -> yaml.Node | None:
    import yaml
    node = root
    for part in dotted.split("."):
        if not isinstance(node, yaml.MappingNode):
            return None
        for knode, vnode in node.value:
            if isinstance(knode, yaml.ScalarNode) and knode.value == part:
                node = vnode
                break
        else:
            return None
    return node


def _cross_check(cfg: Config, root: yaml.Node | None, problems: _Problems):
    def bad(key: str, rule: str, value: Any):
        problems.add(key, rule, _show(value) if not isinstance(value, float) else format_duration(value),
                     _line_of(root, key))

    b = cfg.restart.backoff
    if b.step < b.initial:
        bad("restart.backoff.step", f"must be >= restart.backoff.initial ({format_duration(b.initial)})", b.step)
    if b.maximum < b.step:
        bad("restart.backoff.maximum", f"must be >= restart.backoff.step ({format_duration(b.step)})", b.maximum)
    c = cfg.restart.crash_loop
    if c.cooldown_max < c.cooldown:
        bad("restart.crash_loop.cooldown_max",
            f"must be >= restart.crash_loop.cooldown ({format_duration(c.cooldown)})", c.cooldown_max)
    both = set(cfg.restart.prevent_exit_codes) & set(cfg.restart.force_exit_codes)
    if both:
        problems.add("restart.force_exit_codes", "must not repeat codes of restart.prevent_exit_codes",
                     ", ".join(map(str, sorted(both))), _line_of(root, "restart.force_exit_codes"))
    if cfg.health.timeout > cfg.health.interval:
        bad("health.timeout", f"must be <= health.interval ({format_duration(cfg.health.interval)})",
            cfg.health.timeout)
    if cfg.health.enabled and cfg.daemon.vici_socket is None:
        problems.add("health.enabled", "must be false when daemon.vici_socket is null (nothing to probe)",
                     "true", _line_of(root, "health.enabled"))


def _compose(text: str) -> yaml.Node | None:
    """The YAML node tree, by libyaml when present (20x faster: every `ipsec status` reads the file)."""
    import yaml
    fast = getattr(yaml, "CSafeLoader", None)
    if fast is not None:
        try:
            return yaml.compose(text, Loader=fast)
        except yaml.YAMLError:
            pass          # the pure-Python loader words syntax errors as the messages document them
    return yaml.compose(text, Loader=yaml.SafeLoader)


MAX_CONFIG_BYTES = 1024 * 1024


def _build_plain(cls, data: Any):
    """CLS from plain values (plainyaml); _Invalid on the first problem: PyYAML's path then words them all."""
    if not isinstance(data, dict):
        raise _Invalid("must be a mapping")
    by_name = {f.name: f for f in _fields(cls)}
    values: dict[str, Any] = {}
    for name, raw in data.items():
        f = by_name.get(name)
        if f is None:
            raise _Invalid("is not a known key")
        if _is_section(f):
            values[name] = _build_plain(_section_type(cls, f), {} if raw is None else raw)
        else:
            values[name] = f.metadata["rule"](raw)
    return cls(**values)


def _parse_plain(text: str, source: str) -> Config | None:
    """The Config of a valid file in plain YAML, read without PyYAML (10 ms of every `ipsec status`);
    None for any other file or any problem: parse_config's PyYAML path reads it and words the errors."""
    from . import plainyaml
    data = plainyaml.load(text)
    if data is None:
        return None
    try:
        cfg = _build_plain(Config, data)
    except _Invalid:
        return None
    problems = _Problems(source)
    _cross_check(cfg, None, problems)
    return None if problems.items else dataclasses.replace(cfg, source=source)


def parse_config(text: str, source: str = "<string>") -> Config:
    """A validated Config from YAML text; ConfigError lists every problem with its line."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{source} is {len(text)} characters long; a configuration file is at most "
                          f"{MAX_CONFIG_BYTES} (nothing was applied)")
    plain = _parse_plain(text, source)
    if plain is not None:
        return plain
    import yaml
    try:
        root = _compose(text)
    except RecursionError:
        raise ConfigError(f"cannot parse {source}: nested too deeply (a configuration is a few levels of "
                          "mappings; nothing was applied)") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1} column {mark.column + 1}" if mark else "unknown position"
        raise ConfigError(f"cannot parse {source} ({where}): {exc.problem or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot parse {source}: {exc}") from None
    if isinstance(root, yaml.ScalarNode) and root.tag == "tag:yaml.org,2002:null":
        root = None  # an empty file (or only comments): all defaults
    problems = _Problems(source)
    cfg = _build(Config, root, "", problems, all_keys() + all_sections())
    if not problems.items:
        _cross_check(cfg, root, problems)
    if problems.items:
        head = f"invalid configuration {source}: " if len(problems.items) == 1 else \
            f"invalid configuration {source} ({len(problems.items)} problems):\n  "
        raise ConfigError(head + "\n  ".join(problems.items))
    return dataclasses.replace(cfg, source=source)


def resolve_path(explicit: str | None, environ: dict[str, str] | None = None) -> tuple[str | None, bool]:
    """(path, required): --config, then $IPSEC_SUPERVISOR_CONFIG, then the default path (optional)."""
    env = os.environ if environ is None else environ
    if explicit:
        return explicit, True
    if env.get(ENV_VAR):
        return env[ENV_VAR], True
    return DEFAULT_PATH, False


def per_netns_paths(cfg: Config, instance: str | None) -> Config:
    """CFG with default paths.run_dir/state_dir moved to DIR/netns/INSTANCE (None: unchanged), so that
    supervisors in different network namespaces never share a lock, pid file, ledger or crash report."""
    from .trusted_paths import instance_dir
    default = PathsConfig()
    paths = dataclasses.replace(
        cfg.paths,
        run_dir=instance_dir(cfg.paths.run_dir, instance) if cfg.paths.run_dir == default.run_dir else cfg.paths.run_dir,
        state_dir=(instance_dir(cfg.paths.state_dir, instance) if cfg.paths.state_dir == default.state_dir
                   else cfg.paths.state_dir))
    return dataclasses.replace(cfg, paths=paths)


def load_config(explicit: str | None = None, environ: dict[str, str] | None = None) -> Config:
    """Load the configuration the command line / environment / default path names.

    A missing default file means built-in defaults; a missing named file is an error.
    Outside the initial network namespace, default paths are per namespace (``per_netns_paths``).
    """
    from .trusted_paths import current_netns_instance
    return per_netns_paths(_load_config(explicit, environ), current_netns_instance())


def _load_config(explicit: str | None, environ: dict[str, str] | None) -> Config:
    path, required = resolve_path(explicit, environ)
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        if required:
            raise ConfigError(f"configuration file {path} does not exist "
                              f"(named by {'--config' if explicit else ENV_VAR}); fix the path") from None
        return default_config()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read configuration file {path}: {exc}") from None
    return parse_config(text, path)
