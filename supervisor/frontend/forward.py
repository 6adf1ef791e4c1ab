"""The charon commands ``ipsec`` forwards, as strongSwan's script does: table, checks, argv.

strongSwan's script sends them all to charon's stroke socket through /usr/lib/ipsec/stroke
(Debian's charon loads the stroke plugin, and stroke also sees connections loaded over
VICI).  Without a stroke socket the commands that have one go to ``swanctl`` over VICI.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

STROKE = "/usr/lib/ipsec/stroke"
STROKE_SOCKET = "/var/run/charon.ctl"   # compiled into stroke; not configurable
SWANCTL = "/usr/sbin/swanctl"
IPSEC_DIR = "/usr/lib/ipsec"
IPSEC_BINDIR = "/usr/bin"

# Exit codes of forwarded commands (strongSwan's script).
NOT_RUNNING = 7
WRONG_ARGS = 2


@dataclass(frozen=True, slots=True)
class CharonCommand:
    """One forwarded command: how many arguments it takes and what it becomes."""

    name: str
    usage: str = ""                         # argument synopsis for messages
    min_args: int = 0
    max_args: int | None = None             # None: any number
    stroke: str | None = None               # the stroke operation (default: the name)
    # swanctl equivalents, run in order; "{0}" is the first argument.  NAMED is used instead
    # when an argument is given.  None: only stroke can do it.
    swanctl: tuple[tuple[str, ...], ...] | None = None
    named: tuple[tuple[str, ...], ...] | None = None
    pass_args: int | None = None            # only the first N arguments go on (None: all)


def _c(name, usage="", lo=0, hi=None, stroke=None, swanctl=None, named=None, keep=None) -> CharonCommand:
    return CharonCommand(name, usage, lo, hi, stroke, swanctl, named, keep)


_CREDS = (("--load-creds", "--noprompt"),)

COMMANDS: dict[str, CharonCommand] = {c.name: c for c in (
    _c("up", "<connection name>", 1, 1, swanctl=(("--initiate", "--child", "{0}"),)),
    _c("down", "<connection name>", 1, 1, swanctl=(("--terminate", "--ike", "{0}"),)),
    _c("route", "<connection name>", 1, 1, swanctl=(("--install", "--child", "{0}"),)),
    _c("unroute", "<connection name>", 1, 1, swanctl=(("--uninstall", "--child", "{0}"),)),
    _c("down-srcip", "<start> [<end>]", 1, None),
    _c("leases", "[<poolname> [<address>]]", keep=2, swanctl=(("--list-pools", "--leases"),),
       named=(("--list-pools", "--leases", "--name", "{0}"),)),
    _c("secrets", stroke="rereadsecrets", swanctl=_CREDS, keep=0),
    _c("listalgs", "[--utc]", swanctl=(("--list-algs",),)),
    _c("listpubkeys", "[--utc]"),
    _c("listcerts", "[--utc]", swanctl=(("--list-certs",),)),
    _c("listcacerts", "[--utc]", swanctl=(("--list-certs", "--type", "x509ca"),)),
    _c("listaacerts", "[--utc]", swanctl=(("--list-certs", "--type", "x509aa"),)),
    _c("listocspcerts", "[--utc]", swanctl=(("--list-certs", "--type", "x509ocsp"),)),
    _c("listacerts", "[--utc]", swanctl=(("--list-certs", "--type", "x509ac"),)),
    _c("listgroups", "[--utc]"),
    _c("listcainfos", "[--utc]", swanctl=(("--list-authorities",),)),
    _c("listcrls", "[--utc]", swanctl=(("--list-certs", "--type", "x509crl"),)),
    _c("listocsp", "[--utc]"),
    _c("listplugins", "", swanctl=(("--stats",),)),
    _c("listall", "[--utc]", swanctl=(("--list-algs",), ("--list-certs",), ("--list-authorities",))),
    _c("listcounters", "[<name>]", swanctl=(("--counters",),), named=(("--counters", "--name", "{0}"),)),
    _c("resetcounters", "[<name>]", swanctl=(("--counters", "--reset"),),
       named=(("--counters", "--reset", "--name", "{0}"),)),
    _c("rereadsecrets", "", swanctl=_CREDS),
    _c("rereadcacerts", "", swanctl=(("--load-authorities",),)),
    _c("rereadaacerts"), _c("rereadocspcerts"), _c("rereadacerts"),
    _c("rereadcrls", "", swanctl=_CREDS),
    _c("rereadall", "", swanctl=_CREDS),
    _c("purgeocsp"),
    # strongSwan's script drops the arguments of these (and uses only the first of status).
    _c("purgeike", keep=0), _c("purgecrls", keep=0), _c("purgecerts", keep=0),
    _c("status", "[<connection name>]", keep=1, swanctl=(("--list-sas",),),
       named=(("--list-sas", "--ike", "{0}"),)),
    _c("statusall", "[<connection name>]", keep=1,
       swanctl=(("--list-conns",), ("--list-sas",), ("--list-pols",)),
       named=(("--list-conns",), ("--list-sas", "--ike", "{0}"))),
)}

# Programs strongSwan's script runs directly (from /usr/lib/ipsec, or /usr/bin for pki/aikgen).
PASSTHROUGH = ("stroke", "pki", "aikgen", "attest", "conftest", "dumm", "irdumm", "pool",
               "pt-tls-client", "duplicheck", "error-notify", "imv_policy_manager", "load-tester",
               "lookip", "whitelist", "_updown", "_imv_policy")


@dataclass(frozen=True, slots=True)
class Forward:
    """What to do for a forwarded command: run COMMANDS in order, or fail with EXIT_CODE and MESSAGE."""

    commands: tuple[tuple[str, ...], ...] = ()
    exit_code: int = 0
    message: str = ""


def check_arity(cmd: CharonCommand, args: list[str]) -> str | None:
    """A usage message if ARGS is the wrong number of arguments for CMD, else None."""
    if len(args) < cmd.min_args or (cmd.max_args is not None and len(args) > cmd.max_args):
        return f"Usage: ipsec {cmd.name} {cmd.usage}".rstrip()
    return None


def plan_forward(cmd: CharonCommand, args: list[str], *, charon_down: str | None, stroke_socket: bool,
                 vici_uri: str | None = None, stroke: str = STROKE, swanctl: str = SWANCTL) -> Forward:
    """Pure: what CMD ARGS becomes; CHARON_DOWN says why charon is not running (None: it runs)."""
    usage = check_arity(cmd, args)
    if usage:
        return Forward((), WRONG_ARGS, usage)
    if charon_down is not None:
        return Forward((), NOT_RUNNING, f"ipsec {cmd.name}: {charon_down}")
    if cmd.pass_args is not None:
        args = args[:cmd.pass_args]
    if stroke_socket:
        return Forward(((stroke, cmd.stroke or cmd.name, *args),))
    templates = cmd.named if args and cmd.named else cmd.swanctl
    if templates is None:
        return Forward((), 1, f"ipsec {cmd.name}: charon has no stroke socket ({STROKE_SOCKET}: its "
                              f"stroke plugin is not loaded) and swanctl has no equivalent; use swanctl")
    uri = ("--uri", vici_uri) if vici_uri else ()
    return Forward(tuple((swanctl, *(t.format(*args) for t in template), *uri) for template in templates))


def stroke_socket_present(path: str = STROKE_SOCKET) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def passthrough_path(name: str) -> str | None:
    """The program strongSwan's script would run for NAME, if it is one and exists."""
    if name not in PASSTHROUGH:
        return None
    base = IPSEC_BINDIR if name in ("pki", "aikgen") else IPSEC_DIR
    path = os.path.join(base, name)
    return path if os.access(path, os.X_OK) else None
