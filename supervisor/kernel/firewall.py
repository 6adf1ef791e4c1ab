"""Firewall rules: iptables/ip6tables (nf_tables and legacy backends) and native nftables.

strongSwan's default updown script (``leftfirewall=yes``) inserts ACCEPT rules
with a ``-m policy --pol ipsec --reqid N`` match and removes them only on
down-client, which a crashed charon never runs. This module dumps every rule
of every backend present, recognises updown's shapes, and deletes exactly one
rule (or many, one restore script per table). Parsing is pure; every program is
started by ``_run``, or by ``_start`` for the listings a dump runs side by side.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar, Iterable, Mapping, Sequence

from ..errors import FirewallError
from ..lazylog import Logger

if TYPE_CHECKING:
    import subprocess
from .common import DeleteResult

log = Logger(__name__)     # (logging imported when something is logged: lazylog)

IPTABLES_BACKENDS = ("iptables-nft", "iptables-legacy", "ip6tables-nft", "ip6tables-legacy")
NFT = "nft"
BACKENDS = IPTABLES_BACKENDS + (NFT,)

# Address family of each iptables backend; for the nf_tables ones it is also
# the nft family whose tables iptables-nft manages.
_BACKEND_FAMILY = {
    "iptables-nft": "ip", "iptables-legacy": "ip",
    "ip6tables-nft": "ip6", "ip6tables-legacy": "ip6",
}

# How long iptables waits for the xtables lock (legacy only; nft ignores -w).
XTABLES_WAIT_SECONDS = 10
COMMAND_TIMEOUT_SECONDS = 60.0

# Where the tools live even when our PATH is minimal (systemd units).
_EXTRA_PATH = ("/usr/sbin", "/sbin", "/usr/bin", "/bin")

# iptables' answer to -D when no rule matches (both backends, 1.8.x); also
# what it says when the chain itself is missing.
_IPTABLES_NO_MATCH = "does a matching rule exist"
_ENOENT_TEXT = "No such file or directory"


# --------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class UpdownMatch:
    """What marks a rule as one strongSwan's updown script inserted."""

    chain: str          # INPUT, OUTPUT or FORWARD
    direction: str      # "in" | "out" (the policy match's --dir)
    reqid: int
    proto: str          # "esp" | "ah"
    source: str         # -s as iptables-save prints it
    destination: str    # -d
    interface: str      # -i for direction in, -o for direction out

    def to_json(self) -> dict:
        return {"chain": self.chain, "direction": self.direction, "reqid": self.reqid,
                "proto": self.proto, "source": self.source,
                "destination": self.destination, "interface": self.interface}

    @classmethod
    def from_json(cls, d: dict) -> "UpdownMatch":
        reqid = d["reqid"]
        if not isinstance(reqid, int) or isinstance(reqid, bool):
            raise TypeError(f"updown reqid must be an integer, not {reqid!r}")
        if d["direction"] not in ("in", "out"):
            raise ValueError(f"updown direction must be 'in' or 'out', not {d['direction']!r}")
        return cls(chain=str(d["chain"]), direction=d["direction"], reqid=reqid,
                   proto=str(d["proto"]), source=str(d["source"]),
                   destination=str(d["destination"]), interface=str(d["interface"]))


@dataclass(frozen=True, slots=True)
class FirewallRule:
    """One rule of one backend, as that backend's own dump shows it.

    iptables rules are identified by their spec (the text after ``-A CHAIN``
    in iptables-save output); identical specs in one chain are told apart by
    ``occurrence`` (0 = first in the chain). nft rules by their handle.
    """

    FAMILY: ClassVar[str] = "firewall"
    # The place in the chain moves whenever someone inserts above us.
    VOLATILE: ClassVar[frozenset[str]] = frozenset({"position"})

    backend: str                 # one of BACKENDS
    family: str                  # iptables: "ip"/"ip6"; nft: ip, ip6, inet, arp, bridge, netdev
    table: str
    chain: str
    rule: str = ""               # iptables only: spec exactly as iptables-save prints it
    occurrence: int = 0          # iptables only: identical specs before this one in the chain
    handle: int | None = None    # nft only
    expr: str = ""               # nft only: the rule's "expr" list as compact JSON text
    comment: str | None = None   # nft only: the rule's comment (iptables keeps it in the spec)
    position: int = 0            # 1-based place in the chain when dumped (0: unknown)
    updown: UpdownMatch | None = field(default=None)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"firewall backend must be one of {', '.join(BACKENDS)}, not {self.backend!r}")
        if not self.table or not self.chain:
            raise ValueError(f"firewall rule needs a table and a chain (got {self.table!r}/{self.chain!r})")
        if self.backend == NFT:
            if not isinstance(self.handle, int) or isinstance(self.handle, bool) or self.handle <= 0:
                raise ValueError(f"nft rule needs a positive integer handle, not {self.handle!r}")
        elif self.handle is not None:
            raise ValueError(f"{self.backend} rules have no handle (got {self.handle!r})")
        if self.occurrence < 0:
            raise ValueError(f"occurrence must be >= 0, not {self.occurrence}")

    @property
    def is_nft(self) -> bool:
        return self.backend == NFT

    @property
    def expressions(self) -> list:
        """The nft expression list, parsed ([] for iptables rules)."""
        return json.loads(self.expr) if self.expr else []

    def key(self) -> tuple:
        if self.is_nft:
            return (NFT, self.family, self.table, self.chain, self.handle)
        return (self.backend, self.table, self.chain, self.rule, self.occurrence)

    def describe(self) -> str:
        if self.is_nft:
            text = f"nft {self.family} {self.table}/{self.chain} rule handle {self.handle}"
            return text + (f" comment {self.comment!r}" if self.comment is not None else "")
        text = f"{self.backend} {self.table}/{self.chain} rule '{self.rule}'"
        return text + (f" (copy {self.occurrence + 1})" if self.occurrence else "")

    def to_json(self, include_keys: bool = False) -> dict:
        d: dict[str, Any] = {"backend": self.backend, "family": self.family,
                             "table": self.table, "chain": self.chain,
                             "position": self.position}
        if self.is_nft:
            d.update(handle=self.handle, expr=self.expressions, comment=self.comment)
        else:
            d.update(rule=self.rule, occurrence=self.occurrence)
        d["updown"] = self.updown.to_json() if self.updown is not None else None
        return d

    @classmethod
    def from_json(cls, d: dict) -> "FirewallRule":
        if not isinstance(d, dict):
            raise TypeError(f"firewall rule must be a JSON object, not {type(d).__name__}")
        updown = d.get("updown")
        common = dict(backend=d["backend"], family=str(d["family"]), table=str(d["table"]),
                      chain=str(d["chain"]), position=_json_int(d.get("position", 0), "position"),
                      updown=UpdownMatch.from_json(updown) if updown is not None else None)
        if d["backend"] == NFT:
            expr = d["expr"]
            if not isinstance(expr, list):
                raise TypeError(f"nft rule expr must be a list, not {type(expr).__name__}")
            comment = d.get("comment")
            return cls(handle=_json_int(d["handle"], "handle"), expr=_compact_json(expr),
                       comment=None if comment is None else str(comment), **common)
        rule = d["rule"]
        if not isinstance(rule, str):
            raise TypeError(f"iptables rule spec must be a string, not {type(rule).__name__}")
        return cls(rule=rule, occurrence=_json_int(d.get("occurrence", 0), "occurrence"), **common)


def _json_int(value: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"firewall rule {name} must be an integer, not {value!r}")
    return value


def _compact_json(value: Any) -> str:
    # Keeps nft's key order: the text is what nft printed, minus whitespace.
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def iptables_rule(backend: str, table: str, chain: str, spec: str,
                  occurrence: int = 0, position: int = 0) -> FirewallRule:
    """An iptables record from its save-format spec, updown match filled in."""
    if backend not in IPTABLES_BACKENDS:
        raise ValueError(f"iptables backend must be one of {', '.join(IPTABLES_BACKENDS)}, not {backend!r}")
    return FirewallRule(backend=backend, family=_BACKEND_FAMILY[backend], table=table,
                        chain=chain, rule=spec, occurrence=occurrence, position=position,
                        updown=parse_updown(table, chain, spec))


# --------------------------------------------------------------------------
# Pure parsing: iptables-save text
# --------------------------------------------------------------------------

def split_rule_spec(spec: str) -> list[str]:
    """Split a save-format spec into argv words the way iptables-restore does.

    Double quotes group words; inside them a backslash takes the next
    character literally (iptables-save writes ``\\"``, ``\\\\`` and ``\\'``).
    """
    words: list[str] = []
    buf: list[str] = []
    in_word = in_quotes = False
    chars = iter(spec)
    for ch in chars:
        if in_quotes:
            if ch == "\\":
                nxt = next(chars, None)
                if nxt is None:
                    raise ValueError(f"rule spec ends inside an escape: {spec!r}")
                buf.append(nxt)
            elif ch == '"':
                in_quotes = False
            else:
                buf.append(ch)
        elif ch == '"':
            in_quotes = in_word = True
        elif ch in " \t\n":
            if in_word:
                words.append("".join(buf))
                buf, in_word = [], False
        else:
            buf.append(ch)
            in_word = True
    if in_quotes:
        raise ValueError(f"rule spec has an unterminated quote: {spec!r}")
    if in_word:
        words.append("".join(buf))
    return words


@dataclass(frozen=True, slots=True)
class IptablesLayout:
    """Which chains one iptables-save listed, with rule counts (tells nft which it covers)."""

    chains: Mapping[tuple[str, str], int]    # (table, chain) -> number of rules listed
    incompatible_tables: frozenset[str]      # tables it said it could not fully list


_INCOMPATIBLE_RE = re.compile(r"^# Table `([^']+)' .*incompatible")


def parse_iptables_save(text: str, backend: str) -> list[FirewallRule]:
    """Every ``-A`` line of iptables-save output as a record, in order."""
    return _parse_save(text, backend)[0]


def parse_iptables_layout(text: str) -> IptablesLayout:
    """The chains iptables-save declared and the tables it called incompatible."""
    return _parse_save(text, None)[1]


def _parse_save(text: str, backend: str | None) -> tuple[list[FirewallRule], IptablesLayout]:
    rules: list[FirewallRule] = []
    chains: dict[tuple[str, str], int] = {}
    incompatible: set[str] = set()
    seen: dict[tuple[str, str, str], int] = {}
    table: str | None = None
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if line.startswith("#"):
            m = _INCOMPATIBLE_RE.match(line)
            if m:
                incompatible.add(m.group(1))
            continue
        if line.startswith("*"):
            table = line[1:].strip()
            continue
        if line == "COMMIT":
            table = None
            continue
        if table is None:
            raise ValueError(f"iptables-save line {lineno} is outside a table: {line!r}")
        if line.startswith(":"):
            chains.setdefault((table, line[1:].split(" ", 1)[0]), 0)
            continue
        if not line.startswith("-A "):
            raise ValueError(f"iptables-save line {lineno} is not understood: {line!r}")
        chain, _, spec = line[3:].partition(" ")
        if not chain:
            raise ValueError(f"iptables-save line {lineno} has no chain: {line!r}")
        position = chains.get((table, chain), 0) + 1
        chains[(table, chain)] = position
        ident = (table, chain, spec)
        occurrence = seen.get(ident, 0)
        seen[ident] = occurrence + 1
        if backend is not None:
            rules.append(iptables_rule(backend, table, chain, spec, occurrence, position))
    return rules, IptablesLayout(chains=chains, incompatible_tables=frozenset(incompatible))


# --------------------------------------------------------------------------
# Pure parsing: updown recognition
# --------------------------------------------------------------------------

_UPDOWN_CHAINS = {"INPUT": ("in",), "OUTPUT": ("out",), "FORWARD": ("in", "out")}
# Matches updown loads implicitly through -p with ports / ICMP types.
_PORT_MATCHES = frozenset({"tcp", "udp", "udplite", "sctp", "dccp", "icmp", "icmp6"})
_PORT_OPTIONS = frozenset({"--sport", "--dport", "--icmp-type", "--icmpv6-type"})
_POLICY_OPTIONS = frozenset({"--dir", "--pol", "--reqid", "--proto"})
_IPSEC_PROTOS = {"esp": "esp", "ah": "ah", "50": "esp", "51": "ah"}


def parse_updown(table: str, chain: str, spec: str) -> UpdownMatch | None:
    """The updown match if SPEC has exactly the shape updown's iptables lines produce.

    Deliberately strict: any extra match (comment, conntrack...), negation or
    target other than ACCEPT means someone else wrote the rule.
    """
    if table != "filter" or chain not in _UPDOWN_CHAINS:
        return None
    try:
        words = split_rule_spec(spec)
    except ValueError:
        return None
    basics: dict[str, str] = {}
    policy: dict[str, str] = {}
    policy_count = 0
    target = None
    module = None
    i = 0
    while i < len(words):
        word = words[i]
        value = words[i + 1] if i + 1 < len(words) else None
        if value is None or word == "!" or value == "!":
            return None
        if word in ("-s", "-d", "-i", "-o", "-p"):
            if word in basics:
                return None
            basics[word] = value
        elif word == "-m":
            module = value
            if module == "policy":
                policy_count += 1
            elif module not in _PORT_MATCHES:
                return None
        elif word == "-j":
            if i + 2 != len(words):
                return None
            target = value
        elif module == "policy" and word in _POLICY_OPTIONS and word not in policy:
            policy[word] = value
        elif module in _PORT_MATCHES and word in _PORT_OPTIONS:
            pass
        else:
            return None
        i += 2
    if target != "ACCEPT" or policy_count != 1 or set(policy) != _POLICY_OPTIONS:
        return None
    direction = policy["--dir"]
    proto = _IPSEC_PROTOS.get(policy["--proto"])
    if policy["--pol"] != "ipsec" or proto is None or not policy["--reqid"].isdigit():
        return None
    if direction not in _UPDOWN_CHAINS[chain]:
        return None
    # updown names the interface on the side traffic arrives (in) or leaves (out).
    iface_opt, other_opt = ("-i", "-o") if direction == "in" else ("-o", "-i")
    if iface_opt not in basics or other_opt in basics or "-s" not in basics or "-d" not in basics:
        return None
    return UpdownMatch(chain=chain, direction=direction, reqid=int(policy["--reqid"]),
                       proto=proto, source=basics["-s"], destination=basics["-d"],
                       interface=basics[iface_opt])


# --------------------------------------------------------------------------
# Pure parsing: nft -j
# --------------------------------------------------------------------------

def parse_nft_json(text: str) -> list[FirewallRule]:
    """Every rule of ``nft -j list ruleset`` output as a record, in order."""
    return _nft_rules(_nft_items(text))


def _nft_items(text: str) -> list:
    try:
        doc = json.loads(text)
        items = doc["nftables"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"nft JSON output is not understood ({exc})") from None
    return items


def _nft_table_families(items: list) -> set:
    """The families of the tables nft listed."""
    return {item["table"].get("family") for item in items
            if isinstance(item, dict) and isinstance(item.get("table"), dict)}


def _nft_rules(items: list) -> list[FirewallRule]:
    rules: list[FirewallRule] = []
    positions: dict[tuple[str, str, str], int] = {}
    for item in items:
        body = item.get("rule") if isinstance(item, dict) else None
        if body is None:
            continue
        where = (body["family"], body["table"], body["chain"])
        positions[where] = positions.get(where, 0) + 1
        rules.append(FirewallRule(backend=NFT, family=body["family"], table=body["table"],
                                  chain=body["chain"], handle=body["handle"],
                                  expr=_compact_json(body.get("expr", [])),
                                  comment=body.get("comment"), position=positions[where]))
    return rules


def select_native_nft_rules(nft_rules: Iterable[FirewallRule],
                            layouts: Mapping[str, IptablesLayout]) -> list[FirewallRule]:
    """The nft rules iptables-nft does not already show, given its layout per family.

    A chain iptables-nft declared is covered, except in a table it called
    incompatible: it still declares the built-in chains there but skips the
    rules of odd base chains, so those count as covered only if the rule
    counts agree.
    """
    rules = list(nft_rules)
    nft_counts: dict[tuple[str, str, str], int] = {}
    for r in rules:
        where = (r.family, r.table, r.chain)
        nft_counts[where] = nft_counts.get(where, 0) + 1
    native = []
    for r in rules:
        layout = layouts.get(r.family)
        listed = None if layout is None else layout.chains.get((r.table, r.chain))
        covered = listed is not None and (
            r.table not in layout.incompatible_tables
            or listed == nft_counts[(r.family, r.table, r.chain)])
        if not covered:
            native.append(r)
    return native


# --------------------------------------------------------------------------
# The one place programs are started
# --------------------------------------------------------------------------

def _find_binary(name: str) -> str | None:
    """NAME's executable in PATH and then the usual sbin directories (shutil.which's answer,
    without shutil's import and its compression modules on a snapshot's start)."""
    for directory in [*os.environ.get("PATH", "").split(os.pathsep), *_EXTRA_PATH]:
        if not os.path.isabs(directory):
            continue        # (empty or relative: the working directory's, never for a root daemon)
        candidate = os.path.join(directory, name)
        if os.access(candidate, os.X_OK) and not os.path.isdir(candidate):
            return candidate
    return None


def _shown(argv: Sequence[str]) -> str:
    """ARGV as a shell would take it, for messages."""
    import shlex
    return shlex.join(argv)


def _run(argv: Sequence[str], stdin: str | None = None) -> subprocess.CompletedProcess:
    """Start one firewall program in this thread's network namespace; never raises on exit status."""
    import subprocess      # (here: reading a snapshot needs this module, not its programs)
    env = dict(os.environ, LC_ALL="C")
    try:
        return subprocess.run(list(argv), input=stdin, capture_output=True, text=True,
                              env=env, timeout=COMMAND_TIMEOUT_SECONDS, check=False)
    except FileNotFoundError:
        raise FirewallError(f"cannot run `{_shown(argv)}`: {argv[0]} not found") from None
    except subprocess.TimeoutExpired:
        raise FirewallError(f"`{_shown(argv)}` did not finish within "
                            f"{COMMAND_TIMEOUT_SECONDS:g}s (killed; retry later)") from None
    except OSError as exc:
        raise FirewallError(f"cannot run `{_shown(argv)}`: {exc.strerror}") from None


def _start(argv: Sequence[str]) -> subprocess.Popen:
    """Start one listing program in this thread's network namespace (``_finish`` waits for it)."""
    import subprocess
    try:
        return subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=dict(os.environ, LC_ALL="C"))
    except FileNotFoundError:
        raise FirewallError(f"cannot run `{_shown(argv)}`: {argv[0]} not found") from None
    except OSError as exc:
        raise FirewallError(f"cannot run `{_shown(argv)}`: {exc.strerror}") from None


def _finish(argv: Sequence[str], proc: subprocess.Popen) -> subprocess.CompletedProcess:
    import subprocess
    try:
        out, err = proc.communicate(timeout=COMMAND_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        _abandon(proc)
        raise FirewallError(f"`{_shown(argv)}` did not finish within "
                            f"{COMMAND_TIMEOUT_SECONDS:g}s (killed; retry later)") from None
    return subprocess.CompletedProcess(list(argv), proc.returncode, out, err)


def _abandon(proc: subprocess.Popen | subprocess.CompletedProcess) -> None:
    subprocess = sys.modules.get("subprocess")      # (no program started: not imported)
    if subprocess is not None and isinstance(proc, subprocess.Popen) and proc.returncode is None:
        proc.kill()
        proc.communicate()


def _failure(what: str, argv: Sequence[str], proc: subprocess.CompletedProcess) -> FirewallError:
    stderr = (proc.stderr or "").strip() or "(no error output)"
    return FirewallError(f"{what}: `{_shown(argv)}` exited with status {proc.returncode}: {stderr}")


def _checked(what: str, argv: Sequence[str], stdin: str | None = None) -> str:
    proc = _run(argv, stdin)
    if proc.returncode != 0:
        raise _failure(what, argv, proc)
    return proc.stdout


# --------------------------------------------------------------------------
# Dump
# --------------------------------------------------------------------------

def _save_text(backend: str) -> str | None:
    """BACKEND's iptables-save output, or None when the tool is not installed."""
    binary = _find_binary(f"{backend}-save")
    if binary is None:
        log.debug("%s-save not installed: skipping %s rules", backend, backend)
        return None
    # Full dump, never -t: asking legacy for a table it has not got creates it.
    return _checked(f"cannot list {backend} rules (the firewall snapshot is incomplete)", [binary])


def _nft_ruleset() -> list[FirewallRule] | None:
    binary = _find_binary(NFT)
    if binary is None:
        log.debug("nft not installed: skipping native nftables rules")
        return None
    return _parse_nft(_checked(_NFT_LIST_FAILED, _nft_list_argv(binary)))


_NFT_LIST_FAILED = "cannot list nftables rules (the firewall snapshot is incomplete)"


def _nft_list_argv(binary: str) -> list[str]:
    # -s (stateless) leaves counter values out, so expressions stay stable.
    return [binary, "-j", "-s", "list", "ruleset"]


def _parse_nft(out: str) -> list[FirewallRule]:
    return _nft_rules_checked(_parsed_nft_items(out))


def _nft_not_understood(exc: Exception) -> FirewallError:
    return FirewallError(f"cannot list nftables rules: `nft -j -s list ruleset` printed "
                         f"output we do not understand ({exc})")


def _parse_checked(text: str, backend: str) -> tuple[list[FirewallRule], IptablesLayout]:
    try:
        return _parse_save(text, backend)
    except ValueError as exc:
        raise FirewallError(f"cannot list {backend} rules: {backend}-save printed "
                            f"output we do not understand ({exc})") from None


def dump_firewall_rules(backends: Iterable[str] = BACKENDS) -> list[FirewallRule]:
    """Every rule of every table of every installed backend, nft minus what iptables-nft shows."""
    return start_dump_firewall_rules(backends).result()


class PendingDump:
    """The listing programs of a dump, started; ``result()`` waits for them and parses."""

    def __init__(self, wanted: tuple[str, ...], jobs: list[tuple[str, list[str], subprocess.Popen]],
                 deferred: list[tuple[str, list[str]]] = ()):
        self._wanted = wanted
        self._jobs = jobs
        self._deferred = list(deferred)     # iptables-nft's, started once nft has listed the tables

    def result(self) -> list[FirewallRule]:
        """What dump_firewall_rules returns; FirewallError if a program failed."""
        outputs: dict[str, str] = {}
        nft_items = None
        try:
            self._finish_jobs(outputs)
            if NFT in outputs:
                nft_items = _parsed_nft_items(outputs[NFT])
            if self._deferred:
                # iptables-nft lists the nf_tables tables of its family: none, nothing to list
                families = _nft_table_families(nft_items) if nft_items is not None else set(_BACKEND_FAMILY.values())
                for backend, argv in self._deferred:
                    if _BACKEND_FAMILY[backend] in families:
                        self._jobs.append((backend, argv, _start(argv)))
                    else:
                        log.debug("no nf_tables table of family %s: %s lists nothing",
                                  _BACKEND_FAMILY[backend], argv[0])
                        outputs[backend] = ""
                self._deferred = []
                self._finish_jobs(outputs)
        finally:
            self.cancel()
        rules: list[FirewallRule] = []
        layouts: dict[str, IptablesLayout] = {}
        for backend in IPTABLES_BACKENDS:
            if backend not in outputs:
                continue
            found, layout = _parse_checked(outputs[backend], backend)
            if backend.endswith("-nft"):
                layouts[_BACKEND_FAMILY[backend]] = layout
            if backend in self._wanted:
                rules.extend(found)
        if nft_items is not None:
            rules.extend(select_native_nft_rules(_nft_rules_checked(nft_items), layouts))
        return rules

    def _finish_jobs(self, outputs: dict[str, str]) -> None:
        for backend, argv, proc in self._jobs:
            if backend in outputs:
                continue
            done = _finish(argv, proc)
            if done.returncode != 0:
                raise _failure(_NFT_LIST_FAILED if backend == NFT else
                               f"cannot list {backend} rules (the firewall snapshot is incomplete)", argv, done)
            outputs[backend] = done.stdout

    def cancel(self) -> None:
        """Stop and reap what still runs (after a failure, or when the result is not wanted)."""
        for _, _, proc in self._jobs:
            _abandon(proc)


def _parsed_nft_items(out: str) -> list:
    try:
        return _nft_items(out)
    except ValueError as exc:
        raise _nft_not_understood(exc) from None


def _nft_rules_checked(items: list) -> list[FirewallRule]:
    try:
        return _nft_rules(items)
    except (ValueError, KeyError, TypeError) as exc:
        raise _nft_not_understood(exc) from None


_LEGACY_TABLE_NAMES = {"iptables-legacy": "ip_tables_names", "ip6tables-legacy": "ip6_tables_names"}


def _legacy_tables_listed(backend: str, proc_net: str = "/proc/thread-self/net") -> bool:
    """Whether BACKEND's save could list anything in this thread's network namespace: it lists
    the tables the kernel names in /proc/net/ip(6)_tables_names, and an absent or empty file means
    none (x_tables not loaded, or no table in this namespace). Unsure (unreadable): True."""
    try:
        with open(os.path.join(proc_net, _LEGACY_TABLE_NAMES[backend]), "rb") as fh:
            return bool(fh.read().strip())
    except FileNotFoundError:
        # (no /proc/thread-self before Linux 3.17: then we cannot tell, and legacy lists)
        return not os.path.isdir(proc_net)
    except OSError:
        return True


def start_dump_firewall_rules(backends: Iterable[str] = BACKENDS) -> PendingDump:
    """Start every listing program a dump needs, side by side; they run while the caller reads
    netlink (each takes a few milliseconds, mostly starting up). A program that would list
    nothing is not started: legacy without tables in this namespace; iptables-nft beside nft,
    once nft has listed no table of its family."""
    wanted = tuple(backends)
    for b in wanted:
        if b not in BACKENDS:
            raise ValueError(f"unknown firewall backend {b!r} (known: {', '.join(BACKENDS)})")
    jobs: list[tuple[str, list[str], subprocess.Popen]] = []
    deferred: list[tuple[str, list[str]]] = []
    nft_runs = NFT in wanted and _find_binary(NFT) is not None
    try:
        for backend in (NFT,) + IPTABLES_BACKENDS:
            # The nf_tables layouts are needed to filter nft's listing even when only nft was asked for.
            if backend not in wanted and not (NFT in wanted and backend.endswith("-nft")):
                continue
            binary = _find_binary(backend if backend == NFT else f"{backend}-save")
            if binary is None:
                log.debug("%s not installed: skipping %s rules", backend if backend == NFT else f"{backend}-save",
                          backend)
                continue
            # Full dump, never -t: asking legacy for a table it has not got creates it.
            argv = _nft_list_argv(binary) if backend == NFT else [binary]
            if backend in _LEGACY_TABLE_NAMES and not _legacy_tables_listed(backend):
                log.debug("no %s table in this network namespace: %s lists nothing", backend, binary)
                continue
            if backend.endswith("-nft") and nft_runs:
                deferred.append((backend, argv))
                continue
            jobs.append((backend, argv, _start(argv)))
    except BaseException:
        PendingDump(wanted, jobs).cancel()
        raise
    return PendingDump(wanted, jobs, deferred)


# --------------------------------------------------------------------------
# Delete / add
# --------------------------------------------------------------------------

def _iptables_binary(rule: FirewallRule, verb: str) -> str:
    binary = _find_binary(rule.backend)
    if binary is None:
        raise FirewallError(f"cannot {verb} {rule.describe()}: {rule.backend} is not installed")
    return binary


def _count_copies(rule: FirewallRule) -> int:
    text = _save_text(rule.backend)
    if text is None:
        raise FirewallError(f"cannot check {rule.describe()}: {rule.backend}-save is not installed")
    found, _ = _parse_checked(text, rule.backend)
    return sum(1 for r in found if (r.table, r.chain, r.rule) == (rule.table, rule.chain, rule.rule))


def _nft_find(rule: FirewallRule) -> FirewallRule | None:
    rules = _nft_ruleset()
    if rules is None:
        raise FirewallError(f"cannot check {rule.describe()}: nft is not installed")
    for r in rules:
        if (r.family, r.table, r.chain, r.handle) == (rule.family, rule.table, rule.chain, rule.handle):
            return r
    return None


def _nft_command(verb: str, rule: FirewallRule, extra: Mapping[str, Any]) -> str:
    body = {"family": rule.family, "table": rule.table, "chain": rule.chain, **extra}
    return json.dumps({"nftables": [{verb: {"rule": body}}]})


def delete_firewall_rule(rule: FirewallRule) -> DeleteResult:
    """Remove exactly RULE; ALREADY_GONE when it is no longer there.

    iptables deletes by spec: with N identical copies in a chain, ``-D``
    removes the first one, and the record with ``occurrence`` k counts as
    present while more than k copies remain (copies are interchangeable).
    """
    if rule.is_nft:
        return _delete_nft(rule)
    return _delete_iptables(rule)


def _delete_iptables(rule: FirewallRule) -> DeleteResult:
    binary = _iptables_binary(rule, "delete")
    if _count_copies(rule) <= rule.occurrence:
        log.debug("%s already gone", rule.describe())
        return DeleteResult.ALREADY_GONE
    log.info("deleting %s", rule.describe())
    argv, proc = _run_delete(binary, rule)
    if proc.returncode == 0:
        return DeleteResult.DELETED
    if _IPTABLES_NO_MATCH in (proc.stderr or "") and _count_copies(rule) <= rule.occurrence:
        # Someone else removed it between our check and our -D.
        return DeleteResult.ALREADY_GONE
    raise _failure(f"cannot delete {rule.describe()}", argv, proc)


def _run_delete(binary: str, rule: FirewallRule) -> tuple[list[str], subprocess.CompletedProcess]:
    """``-D`` with each spelling of RULE until one matches: the last command and its outcome."""
    base = [binary, "-w", str(XTABLES_WAIT_SECONDS), "-t", rule.table, "-D", rule.chain]
    for words in _delete_spellings(rule):
        argv = base + words
        proc = _run(argv)
        if proc.returncode == 0 or _IPTABLES_NO_MATCH not in (proc.stderr or ""):
            break
    return argv, proc


def _delete_listed(rule: FirewallRule) -> DeleteResult:
    """Delete RULE, listed a moment ago (a refused batch, redone): ALREADY_GONE only when no
    copy of its spec is left, since the batch's copies are judged against the one listing."""
    binary = _iptables_binary(rule, "delete")
    argv, proc = _run_delete(binary, rule)
    if proc.returncode == 0:
        return DeleteResult.DELETED
    if _IPTABLES_NO_MATCH in (proc.stderr or "") and _count_copies(rule) == 0:
        return DeleteResult.ALREADY_GONE
    raise _failure(f"cannot delete {rule.describe()}", argv, proc)


def _delete_spellings(rule: FirewallRule) -> list[list[str]]:
    """The argument lists that may name RULE for -D, most likely first.

    ip6tables-legacy remembers that ``-p 0`` was given (updown passes it for
    "any protocol") in a flag ip6tables-save does not print, and -D only
    matches when the flag agrees; so a spec without -p may need ``-p 0``.
    """
    words = split_rule_spec(rule.rule)
    return [prefix + words for prefix in _delete_prefixes(rule, words)]


def _delete_prefixes(rule: FirewallRule, words: list[str]) -> list[list[str]]:
    """What goes before RULE's spec words in each spelling of ``_delete_spellings``."""
    if rule.backend == "ip6tables-legacy" and "-p" not in words:
        return [[], ["-p", "0"]]
    return [[]]


def _delete_nft(rule: FirewallRule) -> DeleteResult:
    binary = _find_binary(NFT)
    if binary is None:
        raise FirewallError(f"cannot delete {rule.describe()}: nft is not installed")
    current = _nft_find(rule)
    if current is None:
        log.debug("%s already gone", rule.describe())
        return DeleteResult.ALREADY_GONE
    if (current.expr, current.comment) != (rule.expr, rule.comment):
        # Handles restart when a table is deleted and re-created: this
        # handle now names somebody else's rule, and ours is gone.
        log.warning("%s is gone; handle %d now holds a different rule, which is left alone",
                    rule.describe(), rule.handle)
        return DeleteResult.ALREADY_GONE
    argv = [binary, "-j", "-f", "-"]
    log.info("deleting %s", rule.describe())
    proc = _run(argv, _nft_command("delete", rule, {"handle": rule.handle}))
    if proc.returncode == 0:
        return DeleteResult.DELETED
    if _ENOENT_TEXT in (proc.stderr or ""):
        return DeleteResult.ALREADY_GONE
    raise _failure(f"cannot delete {rule.describe()}", argv, proc)


def delete_firewall_rules(rules: Sequence[FirewallRule]) -> list[DeleteResult | FirewallError]:
    """Remove each of RULES as ``delete_firewall_rule`` does, batched: a result or the error, per rule.

    One listing per backend, then one ``iptables-restore --noflush`` script of ``-D`` lines
    per backend and table (applied all or nothing), one ``nft -f`` for native rules. Every
    record is judged against that one listing: with N identical copies listed, the records
    with occurrences 0..N-1 all go. A batch the tool refuses is redone one rule at a time,
    which tells which rule failed and why.
    """
    results: list[DeleteResult | FirewallError | None] = [None] * len(rules)
    by_backend: dict[str, list[int]] = {}
    for i, rule in enumerate(rules):
        by_backend.setdefault(rule.backend, []).append(i)
    for backend, indexes in by_backend.items():
        try:
            if backend == NFT:
                _delete_nft_batch(rules, indexes, results)
            else:
                _delete_iptables_batch(backend, rules, indexes, results)
        except FirewallError as exc:     # the listing failed: no rule of this backend was touched
            for i in indexes:
                if results[i] is None:
                    results[i] = FirewallError(f"cannot delete {rules[i].describe()}: {exc}")
    assert all(r is not None for r in results)
    return results      # type: ignore[return-value]


def _delete_iptables_batch(backend: str, rules: Sequence[FirewallRule], indexes: list[int],
                           results: list) -> None:
    if _find_binary(backend) is None:
        raise FirewallError(f"{backend} is not installed")
    text = _save_text(backend)
    if text is None:
        raise FirewallError(f"{backend}-save is not installed")
    found, _ = _parse_checked(text, backend)
    copies: dict[tuple[str, str, str], int] = {}
    for r in found:
        ident = (r.table, r.chain, r.rule)
        copies[ident] = copies.get(ident, 0) + 1
    claimed: set[tuple[str, str, str, int]] = set()
    by_table: dict[str, list[int]] = {}
    for i in indexes:
        rule = rules[i]
        ident = (rule.table, rule.chain, rule.rule)
        if rule.occurrence >= copies.get(ident, 0) or (*ident, rule.occurrence) in claimed:
            log.debug("%s already gone", rule.describe())
            results[i] = DeleteResult.ALREADY_GONE
            continue
        try:
            split_rule_spec(rule.rule)
        except ValueError as exc:
            results[i] = FirewallError(f"cannot delete {rule.describe()}: {exc}")
            continue
        claimed.add((*ident, rule.occurrence))
        by_table.setdefault(rule.table, []).append(i)
    restore = _find_binary(f"{backend}-restore")
    for table, todo in by_table.items():
        batch = [rules[i] for i in todo]
        for rule in batch:
            log.info("deleting %s", rule.describe())
        failure = "not installed" if restore is None else _restore_deletes(restore, table, batch)
        if failure is None:
            for i in todo:
                results[i] = DeleteResult.DELETED
            continue
        log.warning("cannot delete %d %s rule(s) of table %s in one batch (%s-restore: %s); "
                    "deleting them one at a time", len(todo), backend, table, backend, failure)
        for i in todo:
            try:
                results[i] = _delete_listed(rules[i])
            except FirewallError as exc:
                results[i] = exc


def _restore_deletes(restore: str, table: str, batch: list[FirewallRule]) -> str | None:
    """Delete BATCH (rules of one table) with one restore script: None, or why it failed.

    The script commits all or nothing; each spelling of ``_delete_spellings`` is tried in turn.
    """
    prefixes = [_delete_prefixes(rule, split_rule_spec(rule.rule)) for rule in batch]
    argv = [restore, "-w", str(XTABLES_WAIT_SECONDS), "--noflush"]
    failure = ""
    for attempt in range(max(len(p) for p in prefixes)):
        # the spec goes in as iptables-save printed it: restore splits it the same way
        lines = [f"*{table}"]
        lines += [" ".join(["-D", rule.chain, *choices[min(attempt, len(choices) - 1)], rule.rule])
                  for rule, choices in zip(batch, prefixes)]
        lines.append("COMMIT\n")
        proc = _run(argv, "\n".join(lines))
        if proc.returncode == 0:
            return None
        failure = (proc.stderr or "").strip() or f"exit status {proc.returncode}"
    return failure


def _delete_nft_batch(rules: Sequence[FirewallRule], indexes: list[int], results: list) -> None:
    binary = _find_binary(NFT)
    if binary is None:
        raise FirewallError("nft is not installed")
    listed = _nft_ruleset()
    if listed is None:
        raise FirewallError("nft is not installed")
    current = {(r.family, r.table, r.chain, r.handle): r for r in listed}
    todo: list[int] = []
    seen: set[tuple] = set()
    for i in indexes:
        rule = rules[i]
        where = (rule.family, rule.table, rule.chain, rule.handle)
        now = current.get(where)
        if now is None or where in seen:
            log.debug("%s already gone", rule.describe())
            results[i] = DeleteResult.ALREADY_GONE
        elif (now.expr, now.comment) != (rule.expr, rule.comment):
            log.warning("%s is gone; handle %d now holds a different rule, which is left alone",
                        rule.describe(), rule.handle)
            results[i] = DeleteResult.ALREADY_GONE
        else:
            seen.add(where)
            todo.append(i)
    if not todo:
        return
    for i in todo:
        log.info("deleting %s", rules[i].describe())
    commands = [{"delete": {"rule": {"family": rules[i].family, "table": rules[i].table,
                                     "chain": rules[i].chain, "handle": rules[i].handle}}} for i in todo]
    proc = _run([binary, "-j", "-f", "-"], json.dumps({"nftables": commands}))
    if proc.returncode == 0:
        for i in todo:
            results[i] = DeleteResult.DELETED
        return
    log.warning("cannot delete %d nft rule(s) in one batch (%s); deleting them one at a time",
                len(todo), (proc.stderr or "").strip() or f"exit status {proc.returncode}")
    for i in todo:
        try:
            results[i] = _delete_nft(rules[i])
        except FirewallError as exc:
            results[i] = exc


def add_firewall_rule(rule: FirewallRule, position: int | None = None) -> FirewallRule:
    """Append RULE to its chain (or insert it at 1-based POSITION); returns the record as installed.

    The chain and table must exist. For nft the returned record carries the
    new handle; for iptables its occurrence among identical copies.
    """
    if position is not None and position < 1:
        raise ValueError(f"position is 1-based, not {position}")
    if rule.is_nft:
        return _add_nft(rule, position)
    return _add_iptables(rule, position)


def _add_iptables(rule: FirewallRule, position: int | None) -> FirewallRule:
    binary = _iptables_binary(rule, "add")
    where = ["-A", rule.chain] if position is None else ["-I", rule.chain, str(position)]
    argv = [binary, "-w", str(XTABLES_WAIT_SECONDS), "-t", rule.table, *where,
            *split_rule_spec(rule.rule)]
    log.info("adding %s", rule.describe())
    _checked(f"cannot add {rule.describe()}", argv)
    text = _save_text(rule.backend) or ""
    found, _ = _parse_checked(text, rule.backend)
    copies = [r for r in found if (r.table, r.chain, r.rule) == (rule.table, rule.chain, rule.rule)]
    placed = [r for r in copies if position is not None and r.position == position]
    if placed:
        return placed[0]
    if copies:
        # Appended, or iptables normalised the spec differently from what we gave it.
        return copies[-1]
    raise FirewallError(f"added {rule.describe()} but {rule.backend}-save does not show it "
                        "(the spec is not in iptables-save form; dump to see how it was stored)")


def _add_nft(rule: FirewallRule, position: int | None) -> FirewallRule:
    binary = _find_binary(NFT)
    if binary is None:
        raise FirewallError(f"cannot add {rule.describe()}: nft is not installed")
    extra: dict[str, Any] = {"expr": rule.expressions}
    if rule.comment is not None:
        extra["comment"] = rule.comment
    if position is not None:
        # nft's JSON index is 0-based: insert before the rule now at that index.
        extra["index"] = position - 1
    argv = [binary, "-e", "-a", "-j", "-f", "-"]
    log.info("adding %s", rule.describe())
    out = _checked(f"cannot add {rule.describe()}",
                   argv, _nft_command("add" if position is None else "insert", rule, extra))
    try:
        handle = next(iter(json.loads(out)["nftables"][0].values()))["rule"]["handle"]
    except (ValueError, KeyError, TypeError, IndexError, StopIteration) as exc:
        raise FirewallError(f"added {rule.describe()} but nft did not echo its new handle ({exc})") from None
    added = _nft_find(replace(rule, handle=handle))
    if added is None:
        raise FirewallError(f"added {rule.describe()} as handle {handle} but it is not listed any more")
    return added
