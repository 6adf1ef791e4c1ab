"""ipsec.conf, read the way strongSwan 5.9's starter reads it.

Two layers.  Syntax: sections (``config setup``, ``conn NAME``, ``ca NAME``), indented
``key=value`` settings, comments, quoting with escapes, ``include`` with globs relative to
the including file, sections of the same name merged, ``also=`` linearised and
``%default`` inherited.  A syntax error or an unresolvable ``also=`` rejects the whole
file (``IpsecConfError``), as the starter does.  Semantics: every keyword value is checked
and typed; a conn or ca with a bad value is skipped with a ``Diagnostic`` naming
file:line, section and option, the others stay valid.  Unknown and deprecated keywords
are warnings (the starter loads such conns too).
"""

from __future__ import annotations

import glob
import os
import re
import socket
from dataclasses import dataclass, field
from typing import Callable, Iterator

from ..errors import ConfigError

DEFAULT_IPSEC_CONF = "/etc/ipsec.conf"
MAX_INCLUDE_DEPTH = 10
AUTO_VALUES = ("ignore", "add", "route", "start")


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a section or setting was written."""

    path: str
    line: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass(frozen=True, slots=True)
class Diagnostic:
    """An error (the section is skipped) or a warning (it loads anyway)."""

    severity: str                 # "error" | "warning"
    message: str
    origin: Origin | None = None
    section: str | None = None    # "conn NAME", "ca NAME", "config setup", "ipsec.secrets"
    option: str | None = None

    def __str__(self) -> str:
        where = f"{self.origin}: " if self.origin else ""
        what = self.section or ""
        if self.option:
            what = f"{what}: option '{self.option}'" if what else f"option '{self.option}'"
        return f"{where}{what + ': ' if what else ''}{self.message}"

    def to_json(self) -> dict:
        return {"severity": self.severity, "message": self.message,
                "file": self.origin.path if self.origin else None,
                "line": self.origin.line if self.origin else None,
                "section": self.section, "option": self.option, "text": str(self)}


class IpsecConfError(ConfigError):
    """The whole file is unusable (syntax error, missing also= target, bad config setup)."""

    def __init__(self, diagnostic: Diagnostic):
        super().__init__(f"{diagnostic}; nothing loaded from this file, fix it and retry")
        self.diagnostic = diagnostic


# ---------------------------------------------------------------------------
# Syntax: tokens

NEWLINE, SPACES, EQ, CONFIG_SETUP, CONN, CA, STRING = (
    "newline", "spaces", "'='", "config setup", "conn", "ca", "string")


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str
    value: str | None
    origin: Origin


_VERSION_LINE = re.compile(r"[\t ]*version[^\n]*")
_BLANK = re.compile(r"[\t ]+")
_WORD = re.compile(r'(?:@#)?[^"#= \t\n]+')
_STR_ESCAPES = {"n": "\n", "r": "\r", "t": "\t"}


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8", errors="surrogateescape") as fh:
        return fh.read()


class _Lexer:
    """Turns a file (and everything it includes, inline) into tokens."""

    def __init__(self, read_text: Callable[[str], str], expand: Callable[[str], list[str]]):
        self.read_text = read_text
        self.expand = expand
        self.files: list[str] = []

    def tokens(self, path: str, depth: int = 0, included_from: Origin | None = None) -> Iterator[_Token]:
        try:
            text = self.read_text(path)
        except OSError as exc:
            where = f" (included from {included_from})" if included_from else ""
            raise IpsecConfError(Diagnostic("error", f"cannot read {path}{where}: {exc.strerror or exc}",
                                            included_from)) from None
        self.files.append(path)
        i, line, n = 0, 1, len(text)
        while i < n:
            bol = i == 0 or text[i - 1] == "\n"
            here = Origin(path, line)
            if bol:
                m = _VERSION_LINE.match(text, i)
                if m:  # legacy "version 2" declaration
                    i = m.end()
                    continue
            m = _BLANK.match(text, i)
            if m:
                if m.end() < n and text[m.end()] == "#":
                    i = m.end()
                    continue
                if bol:
                    yield _Token(SPACES, None, here)
                i = m.end()
                continue
            c = text[i]
            if c == "#":
                end = text.find("\n", i)
                i = n if end < 0 else end
                continue
            if c == "\n":
                yield _Token(NEWLINE, None, here)
                line += 1
                i += 1
                continue
            if c == "=":
                yield _Token(EQ, None, here)
                i += 1
                continue
            if c == '"':
                value, i, line = self._quoted(text, i + 1, line, here)
                yield _Token(STRING, value, here)
                continue
            m = _WORD.match(text, i)
            word = m.group(0)
            if bol and text.startswith("config setup", i) and len(word) <= len("config setup"):
                yield _Token(CONFIG_SETUP, None, here)
                i += len("config setup")
                continue
            if bol and word in ("conn", "ca"):
                yield _Token(CONN if word == "conn" else CA, None, here)
                i = m.end()
                continue
            if word == "include":
                ws = _BLANK.match(text, m.end())
                if ws and ws.end() < n and text[ws.end()] != "=":
                    pattern, i, line = self._include_pattern(text, ws.end(), line, here)
                    yield from self._include(path, pattern, depth, here)
                    continue
            yield _Token(STRING, word, here)
            i = m.end()

    @staticmethod
    def _quoted(text: str, i: int, line: int, here: Origin) -> tuple[str, int, int]:
        out: list[str] = []
        n = len(text)
        while i < n:
            c = text[i]
            if c == '"':
                return "".join(out), i + 1, line
            if c == "\\":
                if i + 1 >= n:
                    break
                nxt = text[i + 1]
                if nxt == "\n" or text.startswith("\r\n", i + 1):  # line continuation
                    i += 2 if nxt == "\n" else 3
                    line += 1
                    continue
                out.append(_STR_ESCAPES.get(nxt, nxt))
                i += 2
                continue
            if c == "\n":
                line += 1
            out.append(c)
            i += 1
        raise IpsecConfError(Diagnostic("error", "unterminated string", here))

    def _include_pattern(self, text: str, i: int, line: int, here: Origin) -> tuple[str, int, int]:
        out: list[str] = []
        n = len(text)
        while i < n and text[i] not in "#\n\t ":
            c = text[i]
            if c == '"':
                value, i, line = self._quoted(text, i + 1, line, here)
                return value, i, line
            if c == "\\" and i + 1 < n and text[i + 1] in '"#} ':
                out.append(text[i + 1])
                i += 2
                continue
            out.append(c)
            i += 1
        return "".join(out), i, line

    def _include(self, path: str, pattern: str, depth: int, here: Origin) -> Iterator[_Token]:
        if not pattern:
            return  # the starter ignores an empty pattern too
        if depth >= MAX_INCLUDE_DEPTH:
            raise IpsecConfError(Diagnostic(
                "error", f"include '{pattern}' nested more than {MAX_INCLUDE_DEPTH} levels deep "
                         "(an include loop?)", here))
        full = pattern if os.path.isabs(pattern) else os.path.join(os.path.dirname(path), pattern)
        for name in self.expand(full):
            yield from self.tokens(name, depth + 1, here)


def _expand_glob(pattern: str) -> list[str]:
    # glob(3) order (sorted), regular files only; no match is not an error (as in the starter).
    return [p for p in sorted(glob.glob(pattern)) if os.path.isfile(p)]


# ---------------------------------------------------------------------------
# Syntax: sections

@dataclass(frozen=True, slots=True)
class Setting:
    """``key=value`` as written; ``value`` None for ``key=`` (clears an inherited value)."""

    key: str
    value: str | None
    origin: Origin


@dataclass(slots=True)
class _Section:
    kind: str
    name: str | None
    origin: Origin
    settings: dict[str, Setting] = field(default_factory=dict)
    also: list[Setting] = field(default_factory=list)     # most important first
    parents: list["_Section"] | None = None


@dataclass(frozen=True, slots=True)
class ResolvedSection:
    """A conn or ca with also= and %default applied: settings in the starter's order."""

    kind: str
    name: str
    origin: Origin
    settings: tuple[Setting, ...]


@dataclass(frozen=True, slots=True)
class RawConfig:
    setup: tuple[Setting, ...]
    conns: tuple[ResolvedSection, ...]
    cas: tuple[ResolvedSection, ...]
    files: tuple[str, ...]
    warnings: tuple[Diagnostic, ...]


def _syntax_error(tok: _Token, what: str) -> IpsecConfError:
    return IpsecConfError(Diagnostic("error", f"syntax error: {what}", tok.origin))


def _describe(tok: _Token) -> str:
    return f"unexpected {tok.kind}" + (f" '{tok.value}'" if tok.kind == STRING else "")


def read_sections(path: str = DEFAULT_IPSEC_CONF, *, read_text: Callable[[str], str] = _read_text,
                  expand: Callable[[str], list[str]] = _expand_glob) -> RawConfig:
    """Parse ``path`` and its includes into resolved sections; IpsecConfError if unusable."""
    lexer = _Lexer(read_text, expand)
    tokens = list(lexer.tokens(path))
    setup = _Section("config setup", None, Origin(path, 0))
    sections: dict[str, dict[str, _Section]] = {"conn": {}, "ca": {}}
    order: list[_Section] = []
    warnings: list[Diagnostic] = []
    current: _Section | None = None
    i, n = 0, len(tokens)

    def peek(k: int = 0) -> _Token | None:
        return tokens[i + k] if i + k < n else None

    while i < n:
        tok = tokens[i]
        if tok.kind == NEWLINE:
            i += 1
        elif tok.kind in (CONFIG_SETUP, CONN, CA):
            name = None
            nxt = peek(1)
            if nxt is not None and nxt.kind == STRING:
                name = nxt.value
                i += 1
            i += 1
            if tok.kind == CONFIG_SETUP:
                current = setup
                continue
            if not name:
                raise _syntax_error(tok, "section name missing")
            table = sections[tok.kind]
            current = table.get(name)
            if current is None:
                current = table[name] = _Section(tok.kind, name, tok.origin)
                if tok.kind == CONN:
                    order.append(current)
        elif tok.kind == SPACES:
            i += 1
            key_tok = peek()
            if key_tok is None or key_tok.kind == NEWLINE:
                continue
            if key_tok.kind != STRING:
                raise _syntax_error(key_tok, _describe(key_tok))
            eq = peek(1)
            if eq is None or eq.kind != EQ:
                raise IpsecConfError(Diagnostic("error", f"missing value for setting '{key_tok.value}'",
                                                key_tok.origin))
            i += 2
            words: list[str] = []
            while (t := peek()) is not None and t.kind == STRING:
                words.append(t.value)
                i += 1
            t = peek()
            if t is not None and t.kind != NEWLINE:
                raise _syntax_error(t, _describe(t))
            if not key_tok.value:
                raise IpsecConfError(Diagnostic("error", "setting name can't be empty", key_tok.origin))
            value = " ".join(words) if words else None
            setting = Setting(key_tok.value, value, key_tok.origin)
            if current is None:
                warnings.append(Diagnostic("warning", "setting outside of any section, ignored",
                                           key_tok.origin, option=key_tok.value))
            elif setting.key == "also" and current is not setup:
                if value and value != "%default":   # every section inherits %default anyway
                    current.also.insert(0, setting)
            else:
                current.settings[setting.key] = setting
        else:
            raise _syntax_error(tok, _describe(tok) + " (settings must be indented)")

    for kind, table in sections.items():
        _resolve_also(kind, table)
    conns = tuple(_resolved(s) for s in order if s.name != "%default")
    cas = tuple(_resolved(s) for s in sections["ca"].values() if s.name != "%default")
    return RawConfig(tuple(_sorted_settings(setup)), conns, cas, tuple(lexer.files), tuple(warnings))


def _sorted_settings(section: _Section) -> list[Setting]:
    return [section.settings[k] for k in sorted(section.settings)]


def _resolved(section: _Section) -> ResolvedSection:
    # The starter's enumeration: own settings by key, then each parent's, first occurrence
    # wins; "key=" hides inherited values.  Option handlers run in this order.
    seen: set[str] = set()
    out: list[Setting] = []
    for sec in [section, *(section.parents or [])]:
        for setting in _sorted_settings(sec):
            if setting.key in seen:
                continue
            seen.add(setting.key)
            if setting.value is not None:
                out.append(setting)
    return ResolvedSection(section.kind, section.name, section.origin, tuple(out))


def _resolve_also(kind: str, table: dict[str, _Section]) -> None:
    default = table.get("%default")
    if default is not None:
        default.parents = []   # %default inherits from nothing
    for section in table.values():
        if section.parents is None:
            _resolve_one(kind, table, section, default, [])


def _resolve_one(kind: str, table: dict[str, _Section], section: _Section,
                 default: _Section | None, stack: list[_Section]) -> None:
    # Depth-first, most important parent first, keeping only the last occurrence of a
    # section: conn D (also=C, also=B), B and C (also=A) linearise to D B C A.
    stack.append(section)
    collected: list[_Section] = []
    for also in section.also:
        parent = table.get(also.value)
        if parent is None:
            raise IpsecConfError(Diagnostic("error", f"{kind} '{also.value}' referenced by also= not found",
                                            also.origin, f"{kind} {section.name}", "also"))
        if parent in stack:
            raise IpsecConfError(Diagnostic("error", f"also={also.value} makes a loop",
                                            also.origin, f"{kind} {section.name}", "also"))
        if parent.parents is None:
            _resolve_one(kind, table, parent, default, stack)
        collected.append(parent)
        collected.extend(parent.parents)
    stack.pop()
    if not collected and default is not None:
        collected.append(default)
    section.parents = [s for k, s in enumerate(collected) if s not in collected[k + 1:]]


# ---------------------------------------------------------------------------
# Semantics: typed records

@dataclass(frozen=True, slots=True)
class End:
    """left|right options (starter's ``starter_end_t``)."""

    host: str | None = None          # after %defaultroute -> %any and %-prefix stripping
    allow_any: bool = False
    ikeport: int = 500
    subnet: str | None = None
    protocol: int = 0
    from_port: int = 0
    to_port: int = 0xFFFF
    sourceip: str | None = None
    dns: str | None = None
    firewall: bool = False
    hostaccess: bool = False
    updown: str | None = None        # leftfirewall=yes becomes the default iptables updown
    auth: str | None = None
    auth2: str | None = None
    id: str | None = None
    id2: str | None = None
    sigkey: str | None = None
    cert: str | None = None
    cert2: str | None = None
    cert_policy: str | None = None
    sendcert: str = "ifasked"        # always | ifasked | never
    ca: str | None = None
    ca2: str | None = None
    groups: str | None = None
    groups2: str | None = None


@dataclass(frozen=True, slots=True)
class Setup:
    """``config setup`` keys that still matter to charon."""

    charondebug: str | None = None
    uniqueids: str = "yes"           # no | yes | replace | keep | never
    cachecrls: bool = False
    strictcrlpolicy: str = "no"      # no | yes | ifuri
    origins: tuple[tuple[str, Origin], ...] = ()

    def origin_of(self, key: str) -> Origin | None:
        return dict(self.origins).get(key)


@dataclass(frozen=True, slots=True)
class Conn:
    """One ``conn`` with defaults applied (starter's ``starter_conn_t``); times in seconds."""

    name: str
    origin: Origin
    auto: str = "ignore"
    keyexchange: str = "ike"         # ike | ikev1 | ikev2
    mode: str = "tunnel"             # tunnel | transport | beet | pass | drop
    proxy_mode: bool = False
    compress: bool = False
    install_policy: bool = True
    aggressive: bool = False
    authby: str | None = None
    eap_identity: str | None = None
    aaa_identity: str | None = None
    xauth_identity: str | None = None
    mobike: bool = True
    forceencaps: bool = False
    fragmentation: str = "yes"       # no | accept | yes | force
    ikedscp: str | None = None       # binary digits
    ike_lifetime: int = 10800
    ipsec_lifetime: int = 3600
    rekey_margin: int = 540
    rekey_fuzz: int = 100            # percent
    life_bytes: int = 0
    margin_bytes: int = 0
    life_packets: int = 0
    margin_packets: int = 0
    keying_tries: int = 3            # 0 = %forever
    rekey: bool = True
    reauth: bool = True
    ike: str | None = None
    esp: str | None = None
    ah: str | None = None
    dpd_delay: int = 30
    dpd_timeout: int = 150
    dpd_action: str = "none"         # none | clear | hold | restart
    close_action: str = "none"
    sha256_96: bool = False
    inactivity: int = 0
    modecfg_push: bool = False
    xauth_server: bool = False
    mediation: bool = False
    mediated_by: str | None = None
    me_peerid: str | None = None
    reqid: int = 0
    replay_window: int | None = None
    mark_in: str | None = None
    mark_out: str | None = None
    tfc: str | None = None           # "%mtu" or a number
    left: End = End()
    right: End = End()
    settings: tuple[Setting, ...] = ()

    def origin_of(self, key: str) -> Origin:
        for s in self.settings:
            if s.key == key:
                return s.origin
        return self.origin


@dataclass(frozen=True, slots=True)
class Ca:
    """One ``ca`` section (auto=route/start count as add)."""

    name: str
    origin: Origin
    auto: str = "ignore"
    cacert: str | None = None
    crluri: str | None = None
    crluri2: str | None = None
    ocspuri: str | None = None
    ocspuri2: str | None = None
    certuribase: str | None = None
    settings: tuple[Setting, ...] = ()


@dataclass(frozen=True, slots=True)
class IpsecConf:
    """A parsed ipsec.conf: valid conns and cas, plus what was skipped and why."""

    path: str
    setup: Setup
    conns: tuple[Conn, ...]
    cas: tuple[Ca, ...]
    files: tuple[str, ...]
    errors: tuple[Diagnostic, ...]      # each skipped a conn or ca
    warnings: tuple[Diagnostic, ...]

    def conn(self, name: str) -> Conn:
        for c in self.conns:
            if c.name == name:
                return c
        raise KeyError(name)


# ---------------------------------------------------------------------------
# Semantics: keyword table and value rules

class _Bad(Exception):
    """A value the starter rejects; the message says what was expected."""


def _enum(*allowed: str):
    def parse(value: str):
        if value not in allowed:
            raise _Bad(f"must be one of {', '.join(allowed)}")
        return value
    return parse


def _bool(value: str) -> bool:
    return _enum("no", "yes")(value) == "yes"


def _uint(value: str) -> int:
    if not re.fullmatch(r"\d+", value):
        raise _Bad("must be a non-negative integer")
    return int(value)


def _time(value: str) -> int:
    m = re.fullmatch(r"(\d+)([smhd]?)", value)
    if not m:
        raise _Bad("must be a duration: a number with an optional unit s, m, h or d")
    return int(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def _percent(value: str) -> int:
    m = re.fullmatch(r"(\d+)%", value)
    if not m:
        raise _Bad("must be a percentage like 100%")
    return int(m.group(1))


def _binary(value: str) -> str:
    if not re.fullmatch(r"[01]+", value):
        raise _Bad("must be binary digits, e.g. 000000")
    return value


def _str(value: str) -> str:
    return value


def _c_integer(text: str) -> int | None:
    """strtol(..., 0): decimal, 0x hex or 0 octal; None if not a whole number."""
    m = re.fullmatch(r"(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9]\d*)", text)
    if not m:
        return None
    t = m.group(1)
    return int(t, 16) if t[:2].lower() == "0x" else int(t, 8) if t.startswith("0") and len(t) > 1 else int(t)


def _mark(value: str) -> str:
    m = re.fullmatch(r"(%unique(?:-dir)?|[^/]+)(?:/(.+))?", value)
    ok = bool(m) and (m.group(1).startswith("%unique") or _c_integer(m.group(1)) is not None)
    if ok and m.group(2) is not None:
        ok = _c_integer(m.group(2)) is not None
    if not ok:
        raise _Bad("must be VALUE[/MASK] (numbers, 0x hex allowed) or %unique[-dir][/MASK]")
    return value


def parse_protoport(text: str, ports: tuple[int, int] = (0, 0xFFFF)) -> tuple[int, int, int]:
    """``proto[/port]`` as the starter reads it: (protocol, from_port, to_port).

    Without a port the ``ports`` given stay (a subnet's ``[udp]`` keeps leftprotoport's ports).
    """
    proto_s, sep, port = text.partition("/")
    if proto_s == "%any":
        proto = 0
    else:
        try:
            proto = socket.getprotobyname(proto_s)
        except OSError:
            n = _c_integer(proto_s) if proto_s else 0
            if n is None or n > 0xFF:
                raise _Bad(f"bad protocol '{proto_s}': a name from /etc/protocols, a number or %any") from None
            proto = n
    if not sep or not port:
        return proto, *ports
    if port == "%any":
        return proto, 0, 0xFFFF
    if port == "%opaque":
        return proto, 0xFFFF, 0
    try:
        p = socket.getservbyname(port)
        return proto, p, p
    except OSError:
        pass
    lo_s, dash, hi_s = port.partition("-")
    lo = _c_integer(lo_s)
    hi = _c_integer(hi_s) if dash else lo
    if lo is None or hi is None or lo > 0xFFFF or hi > 0xFFFF:
        raise _Bad(f"bad port '{port}': a service name, a number, a range N-M, %any or %opaque")
    return proto, lo, hi


def _protoport(value: str) -> tuple[int, int, int]:
    return parse_protoport(value)


def _tfc(value: str) -> str:
    if value != "%mtu" and not re.fullmatch(r"\d+", value):
        raise _Bad("must be a number of bytes or %mtu")
    return value


def _keyingtries(value: str) -> int:
    return 0 if value == "%forever" else _uint(value)


_AUTHBY = ("psk", "secret", "pubkey", "rsa", "rsasig", "ecdsa", "ecdsasig", "xauthpsk", "xauthrsasig", "never")

# key -> (field, rule); fields in _SPECIAL get extra handling below.
_SETUP_KEYS = {
    "charondebug": ("charondebug", _str),
    "uniqueids": ("uniqueids", _enum("no", "yes", "replace", "keep", "never")),
    "cachecrls": ("cachecrls", _bool),
    "strictcrlpolicy": ("strictcrlpolicy", _enum("no", "yes", "ifuri")),
}
_CONN_KEYS = {
    "auto": ("auto", _enum(*AUTO_VALUES)),
    "keyexchange": ("keyexchange", _enum("ike", "ikev1", "ikev2")),
    "type": ("mode", _enum("tunnel", "transport", "transport_proxy", "beet", "passthrough", "pass",
                           "drop", "reject")),
    "compress": ("compress", _bool),
    "installpolicy": ("install_policy", _bool),
    "aggressive": ("aggressive", _bool),
    "authby": ("authby", _enum(*_AUTHBY)),
    "eap_identity": ("eap_identity", _str),
    "aaa_identity": ("aaa_identity", _str),
    "xauth_identity": ("xauth_identity", _str),
    "mobike": ("mobike", _bool),
    "forceencaps": ("forceencaps", _bool),
    "fragmentation": ("fragmentation", _enum("no", "accept", "yes", "force")),
    "ikedscp": ("ikedscp", _binary),
    "ikelifetime": ("ike_lifetime", _time),
    "lifetime": ("ipsec_lifetime", _time),
    "keylife": ("ipsec_lifetime", _time),
    "rekeymargin": ("rekey_margin", _time),
    "margintime": ("rekey_margin", _time),
    "lifebytes": ("life_bytes", _uint),
    "marginbytes": ("margin_bytes", _uint),
    "lifepackets": ("life_packets", _uint),
    "marginpackets": ("margin_packets", _uint),
    "keyingtries": ("keying_tries", _keyingtries),
    "rekeyfuzz": ("rekey_fuzz", _percent),
    "rekey": ("rekey", _bool),
    "reauth": ("reauth", _bool),
    "ike": ("ike", _str),
    "esp": ("esp", _str),
    "ah": ("ah", _str),
    "dpddelay": ("dpd_delay", _time),
    "dpdtimeout": ("dpd_timeout", _time),
    "dpdaction": ("dpd_action", _enum("none", "clear", "hold", "restart")),
    "closeaction": ("close_action", _enum("none", "clear", "hold", "restart")),
    "sha256_96": ("sha256_96", _bool),
    "inactivity": ("inactivity", _time),
    "modeconfig": ("modecfg_push", _enum("push", "pull")),
    "xauth": ("xauth_server", _enum("server", "client")),
    "mediation": ("mediation", _bool),
    "mediated_by": ("mediated_by", _str),
    "me_peerid": ("me_peerid", _str),
    "reqid": ("reqid", _uint),
    "replay_window": ("replay_window", _uint),
    "mark": ("mark", _mark),
    "mark_in": ("mark_in", _mark),
    "mark_out": ("mark_out", _mark),
    "tfc": ("tfc", _tfc),
}
_END_KEYS = {
    "": ("host", _str),
    "ikeport": ("ikeport", _uint),
    "subnet": ("subnet", _str),
    "subnetwithin": ("subnet", _str),
    "protoport": ("protoport", _protoport),
    "sourceip": ("sourceip", _str),
    "dns": ("dns", _str),
    "firewall": ("firewall", _bool),
    "hostaccess": ("hostaccess", _bool),
    "allowany": ("allow_any", _bool),
    "updown": ("updown", _str),
    "auth": ("auth", _str),
    "auth2": ("auth2", _str),
    "id": ("id", _str),
    "id2": ("id2", _str),
    "sigkey": ("sigkey", _str),
    "rsasigkey": ("sigkey", _str),
    "cert": ("cert", _str),
    "cert2": ("cert2", _str),
    "certpolicy": ("cert_policy", _str),
    "sendcert": ("sendcert", _enum("always", "ifasked", "never", "yes", "no")),
    "ca": ("ca", _str),
    "ca2": ("ca2", _str),
    "groups": ("groups", _str),
    "groups2": ("groups2", _str),
}
_CA_KEYS = {
    "auto": ("auto", _enum(*AUTO_VALUES)),
    "cacert": ("cacert", _str),
    "crluri": ("crluri", _str),
    "crluri1": ("crluri", _str),
    "crluri2": ("crluri2", _str),
    "ocspuri": ("ocspuri", _str),
    "ocspuri1": ("ocspuri", _str),
    "ocspuri2": ("ocspuri2", _str),
    "certuribase": ("certuribase", _str),
}
_DEPRECATED_SETUP = frozenset((
    "interfaces", "dumpdir", "charonstart", "plutostart", "klipsdebug", "plutodebug", "prepluto",
    "postpluto", "plutostderrlog", "fragicmp", "packetdefault", "hidetos", "overridemtu",
    "crlcheckinterval", "nocrsend", "nat_traversal", "keep_alive", "force_keepalive",
    "virtual_private", "pkcs11module", "pkcs11initargs", "pkcs11keepstate", "pkcs11proxy"))
_DEPRECATED_CONN = {"pfs": "PFS is enabled by a DH group in esp=", "pfsgroup": "PFS is enabled by a DH group in esp=",
                    "eap": "use leftauth/rightauth=eap-...", "leftnexthop": "", "rightnexthop": ""}
_DEPRECATED_CA = frozenset(("ldaphost", "ldapbase"))

FIREWALL_UPDOWN = "ipsec _updown iptables"


def _classify(key: str) -> tuple[str, str | None, tuple | None]:
    """(scope, end, entry): scope is setup|conn|ca|end|deprecated|unknown."""
    if key in _SETUP_KEYS:
        return "setup", None, _SETUP_KEYS[key]
    if key in _DEPRECATED_SETUP:
        return "deprecated-setup", None, None
    if key in _DEPRECATED_CONN:
        return "deprecated-conn", None, None
    if key in _DEPRECATED_CA:
        return "deprecated-ca", None, None
    if key in _CONN_KEYS:
        return "conn", None, _CONN_KEYS[key]
    for end in ("left", "right"):
        if key.startswith(end) and key[len(end):] in _END_KEYS:
            return "end", end, _END_KEYS[key[len(end):]]
    if key in _CA_KEYS:
        return "ca", None, _CA_KEYS[key]
    return "unknown", None, None


# ---------------------------------------------------------------------------
# Semantics: building the records

def _build_setup(settings: tuple[Setting, ...], warnings: list[Diagnostic]) -> Setup:
    values: dict = {}
    origins = []
    for s in settings:
        scope, _, entry = _classify(s.key)
        if scope == "unknown":
            warnings.append(Diagnostic("warning", "unknown keyword, ignored", s.origin, "config setup", s.key))
            continue
        if scope == "deprecated-setup":
            warnings.append(Diagnostic("warning", "deprecated keyword, ignored", s.origin, "config setup", s.key))
            continue
        if scope != "setup":
            # The starter counts this as a fatal error: it refuses the whole file.
            raise IpsecConfError(Diagnostic("error", "keyword not allowed in config setup", s.origin,
                                            "config setup", s.key))
        name, rule = entry
        try:
            values[name] = rule(s.value)
        except _Bad as exc:
            raise IpsecConfError(Diagnostic("error", f"bad value '{s.value}': {exc}", s.origin,
                                            "config setup", s.key)) from None
        origins.append((s.key, s.origin))
    return Setup(origins=tuple(origins), **values)


def _build_conn(section: ResolvedSection, errors: list[Diagnostic],
                warnings: list[Diagnostic]) -> Conn | None:
    label = f"conn {section.name}"
    conn: dict = {}
    ends: dict[str, dict] = {"left": {}, "right": {}}
    failed = False

    def error(s: Setting, message: str) -> None:
        nonlocal failed
        failed = True
        errors.append(Diagnostic("error", message, s.origin, label, s.key))

    for s in section.settings:
        scope, end, entry = _classify(s.key)
        if scope == "unknown":
            warnings.append(Diagnostic("warning", "unknown keyword, ignored (the starter ignores it too)",
                                       s.origin, label, s.key))
            continue
        if scope.startswith("deprecated"):
            hint = _DEPRECATED_CONN.get(s.key) or ""
            warnings.append(Diagnostic("warning", "deprecated keyword, ignored" + (f"; {hint}" if hint else ""),
                                       s.origin, label, s.key))
            continue
        if scope not in ("conn", "end"):
            error(s, f"keyword not allowed in a conn (it belongs in {scope})")
            continue
        name, rule = entry
        try:
            value = rule(s.value)
        except _Bad as exc:
            error(s, f"bad value '{s.value}': {exc}")
            continue
        if scope == "end":
            _apply_end(conn, ends[end], name, value)
            continue
        _apply_conn(conn, name, value)

    for side in ("left", "right"):
        e = ends[side]
        if e.pop("firewall", False):
            if e.get("updown") is not None:
                failed = True
                errors.append(Diagnostic("error", f"cannot have both {side}firewall and {side}updown",
                                         section.origin, label, f"{side}firewall"))
            else:
                e["updown"] = FIREWALL_UPDOWN
                e["firewall"] = True
    if failed:
        return None
    return Conn(name=section.name, origin=section.origin, left=End(**ends["left"]),
                right=End(**ends["right"]), settings=section.settings, **conn)


def _apply_end(conn: dict, end: dict, name: str, value) -> None:
    if name == "host":
        if value.startswith("%"):
            if value == "%defaultroute":
                value = "%any"
            if value not in ("%any", "%any4", "%any6"):
                end["allow_any"] = True
                value = value[1:]
        end["host"] = value
    elif name == "protoport":
        end["protocol"], end["from_port"], end["to_port"] = value
    elif name == "sourceip":
        end["sourceip"] = value
        conn["mode"], conn["proxy_mode"] = "tunnel", False   # a virtual IP forces tunnel mode
    elif name == "sendcert":
        end["sendcert"] = {"yes": "always", "no": "never"}.get(value, value)
    else:
        end[name] = value


def _apply_conn(conn: dict, name: str, value) -> None:
    if name == "mode":
        conn["proxy_mode"] = value == "transport_proxy"
        conn["mode"] = {"transport_proxy": "transport", "passthrough": "pass", "reject": "drop"}.get(value, value)
    elif name == "mark":
        conn["mark_in"] = conn["mark_out"] = value
    elif name == "modecfg_push":
        conn[name] = value == "push"
    elif name == "xauth_server":
        conn[name] = value == "server"
    else:
        conn[name] = value


def _build_ca(section: ResolvedSection, errors: list[Diagnostic], warnings: list[Diagnostic]) -> Ca | None:
    label = f"ca {section.name}"
    values: dict = {}
    failed = False
    for s in section.settings:
        scope, _, entry = _classify(s.key)
        if s.key == "auto":
            scope, entry = "ca", _CA_KEYS["auto"]
        if scope == "unknown":
            warnings.append(Diagnostic("warning", "unknown keyword, ignored", s.origin, label, s.key))
            continue
        if scope.startswith("deprecated"):
            warnings.append(Diagnostic("warning", "deprecated keyword, ignored", s.origin, label, s.key))
            continue
        if scope != "ca":
            failed = True
            errors.append(Diagnostic("error", "keyword not allowed in a ca section", s.origin, label, s.key))
            continue
        name, rule = entry
        try:
            values[name] = rule(s.value)
        except _Bad as exc:
            failed = True
            errors.append(Diagnostic("error", f"bad value '{s.value}': {exc}", s.origin, label, s.key))
    if failed:
        return None
    if values.get("auto", "ignore") != "ignore":
        values["auto"] = "add"
    return Ca(name=section.name, origin=section.origin, settings=section.settings, **values)


def from_sections(raw: RawConfig, path: str) -> IpsecConf:
    """Type and check every section of ``raw``; bad conns/cas become errors, not exceptions."""
    errors: list[Diagnostic] = []
    warnings = list(raw.warnings)
    setup = _build_setup(raw.setup, warnings)
    conns = []
    for section in raw.conns:
        before = len(errors)
        conn = _build_conn(section, errors, warnings)
        if conn is None:
            count = len(errors) - before
            errors.append(Diagnostic("error", f"conn skipped ({count} error{'s' if count != 1 else ''} above)",
                                     section.origin, f"conn {section.name}"))
        else:
            conns.append(conn)
    cas = [ca for s in raw.cas if (ca := _build_ca(s, errors, warnings)) is not None]
    return IpsecConf(path, setup, tuple(conns), tuple(cas), raw.files, tuple(errors), tuple(warnings))


def load_ipsec_conf(path: str = DEFAULT_IPSEC_CONF, *, read_text: Callable[[str], str] = _read_text,
                    expand: Callable[[str], list[str]] = _expand_glob) -> IpsecConf:
    """Read and check ``path`` (and its includes); IpsecConfError if the file is unusable."""
    return from_sections(read_sections(path, read_text=read_text, expand=expand), path)


def parse_ipsec_conf(text: str, path: str = "ipsec.conf", files: dict[str, str] | None = None) -> IpsecConf:
    """Parse ``text`` as if it were ``path``; ``files`` holds included files (tests, dry runs)."""
    table = dict(files or {})
    table[path] = text

    def read(p: str) -> str:
        try:
            return table[p]
        except KeyError:
            raise FileNotFoundError(2, "No such file or directory", p) from None

    return load_ipsec_conf(path, read_text=read, expand=lambda pattern: glob_names(table, pattern))


def glob_names(names, pattern: str) -> list[str]:
    """glob(3) over a set of path names: wildcards do not cross '/' (tests, dry runs)."""
    import fnmatch
    want = os.path.normpath(pattern).split("/")
    return sorted(n for n in names if len(n.split("/")) == len(want)
                  and all(fnmatch.fnmatchcase(a, b) for a, b in zip(n.split("/"), want)))


def has_loadable_conns(path: str = DEFAULT_IPSEC_CONF) -> bool:
    """True when ``path`` exists and defines a conn the starter would load (auto != ignore)."""
    try:
        conf = load_ipsec_conf(path)
    except (IpsecConfError, OSError):
        return False
    return any(c.auto != "ignore" for c in conf.conns)

