"""strongswan.conf read the way charon reads it, and whether the installed strongSwan can adopt.

Only what adopt mode needs: the effective value of a few settings. The reader
follows charon's file syntax: sections ``name { ... }`` (a ``name : ref {``
reference list is accepted and ignored), ``key = value`` up to the end of the
line or a quoted string, ``#`` comments, and ``include GLOB`` relative to the
including file, in order; a later value replaces an earlier one. charon-systemd
looks settings up under ``charon-systemd`` first, then under ``charon``.

Why the version matters (strongSwan's kernel-netlink history):
- before 5.2.2 there is no ``policy_update`` option, and a policy that already
  exists makes charon's install fail ("unable to add policy"): no adoption;
- 5.2.2 added ``charon.plugins.kernel-netlink.policy_update``: with ``yes``
  charon always replaces (XFRM_MSG_UPDPOLICY), so it takes over the leftovers;
- since 5.3.3 charon retries an existing policy as an update by itself, but
  logs "policy already exists, try to update it" and sends it twice; ``yes``
  makes that the first and only request.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass
from typing import Callable, Mapping

DEFAULT_PATH = "/etc/strongswan.conf"
POLICY_UPDATE = "plugins.kernel-netlink.policy_update"
MAX_INCLUDE_DEPTH = 10

TRUE_WORDS = frozenset({"yes", "true", "enabled", "1", "on"})
FALSE_WORDS = frozenset({"no", "false", "disabled", "0", "off"})

FIRST_UPDATE_OPTION = (5, 2, 2)     # charon.plugins.kernel-netlink.policy_update exists
FIRST_RETRY_AS_UPDATE = (5, 3, 3)   # charon retries an existing policy as an update itself


class SettingsError(Exception):
    """strongswan.conf cannot be read or is not understood (the check then says 'unknown')."""


_NAME_END = re.compile(r"[\s{}=#:\"]")


def parse_settings(text: str, source: str = "<string>",
                   include: Callable[[str, str], list[tuple[str, str]]] | None = None,
                   depth: int = 0) -> dict[str, str]:
    """Flat {dotted key: value} of TEXT; INCLUDE(pattern, source) -> [(path, text)] reads includes."""
    values: dict[str, str] = {}
    _parse_into(values, [], text, source, include, depth)
    return values


def _parse_into(values: dict[str, str], stack: list[str], text: str, source: str, include, depth: int) -> None:
    i, n, line = 0, len(text), 1
    base_depth = len(stack)

    def error(msg: str) -> SettingsError:
        return SettingsError(f"{source} line {line}: {msg}")

    while i < n:
        c = text[i]
        if c == "\n":
            line += 1
            i += 1
            continue
        if c in " \t\r,":
            i += 1
            continue
        if c == "#":
            while i < n and text[i] != "\n":
                i += 1
            continue
        if c == "}":
            if len(stack) <= base_depth:
                raise error("'}' without an open section")
            stack.pop()
            i += 1
            continue
        m = _NAME_END.search(text, i)
        end = m.start() if m else n
        name = text[i:end]
        if not name:
            raise error(f"unexpected {c!r}")
        i = end
        # skip blanks on this line
        while i < n and text[i] in " \t\r":
            i += 1
        nxt = text[i] if i < n else "\n"
        if name == "include" and nxt not in "={:":
            eol = text.find("\n", i)
            eol = n if eol < 0 else eol
            pattern = text[i:eol].split("#", 1)[0].strip().strip('"')
            i = eol
            if include is None or not pattern:
                continue
            if depth >= MAX_INCLUDE_DEPTH:
                raise error(f"includes nested deeper than {MAX_INCLUDE_DEPTH}")
            for path, sub in include(pattern, source):
                _parse_into(values, stack, sub, path, include, depth + 1)
            continue
        if nxt == ":":              # section with references: name : a, b {
            brace = text.find("{", i)
            if brace < 0:
                raise error(f"section {name!r} without '{{'")
            line += text.count("\n", i, brace)
            i = brace
            nxt = "{"
        if nxt == "{":
            stack.extend(name.split("."))
            i += 1
            continue
        if nxt == "=":
            i += 1
            while i < n and text[i] in " \t\r":
                i += 1
            if i < n and text[i] == '"':
                value, i, lines = _quoted(text, i + 1, error)
                line += lines
            else:
                eol = text.find("\n", i)
                eol = n if eol < 0 else eol
                raw = text[i:eol].split("#", 1)[0]
                i = eol
                # "key = value }" on one line: the brace closes a section
                closing = 0
                raw = raw.rstrip()
                while raw.endswith("}") and len(stack) - closing > base_depth:
                    raw = raw[:-1].rstrip()
                    closing += 1
                values[".".join(stack + name.split("."))] = raw.strip()
                del stack[len(stack) - closing:]
                continue
            values[".".join(stack + name.split("."))] = value
            continue
        raise error(f"expected '=' or '{{' after {name!r}")
    if len(stack) != base_depth:
        raise SettingsError(f"{source}: section {'.'.join(stack)!r} is not closed")


def _quoted(text: str, i: int, error) -> tuple[str, int, int]:
    out, lines = [], 0
    escapes = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"'}
    while i < len(text):
        c = text[i]
        if c == '"':
            return "".join(out), i + 1, lines
        if c == "\\" and i + 1 < len(text):
            out.append(escapes.get(text[i + 1], text[i + 1]))
            i += 2
            continue
        if c == "\n":
            lines += 1
        out.append(c)
        i += 1
    raise error("unterminated string")


def _file_includes(pattern: str, source: str) -> list[tuple[str, str]]:
    directory = os.path.dirname(source) if os.path.isabs(source) else os.getcwd()
    full = pattern if os.path.isabs(pattern) else os.path.join(directory, pattern)
    out = []
    for path in sorted(glob.glob(full)):
        try:
            with open(path, encoding="utf-8", errors="replace") as fh:
                out.append((path, fh.read()))
        except OSError as exc:
            raise SettingsError(f"cannot read {path} (included from {source}): {exc.strerror}") from None
    return out


def read_settings(path: str = DEFAULT_PATH) -> dict[str, str]:
    """The flat settings of PATH with its includes; SettingsError naming file and line."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            text = fh.read()
    except OSError as exc:
        raise SettingsError(f"cannot read {path}: {exc.strerror}") from None
    return parse_settings(text, os.path.abspath(path), _file_includes)


def lookup(settings: Mapping[str, str], key: str, namespace: str = "charon") -> str | None:
    """KEY (below the daemon's namespace) as charon looks it up: its own section, then charon's."""
    for ns in dict.fromkeys((namespace, "charon")):
        value = settings.get(f"{ns}.{key}")
        if value is not None:
            return value
    return None


def as_bool(value: str | None) -> bool | None:
    if value is None:
        return None
    v = value.strip().lower()
    if v in TRUE_WORDS:
        return True
    if v in FALSE_WORDS:
        return False
    return None


def parse_version(text: str | None) -> tuple[int, int, int] | None:
    """(5, 9, 8) from "5.9.8", "strongSwan 5.9.8 swanctl", "Linux strongSwan U5.9.8/K6.1"; None if absent."""
    if not text:
        return None
    m = re.search(r"(\d+)\.(\d+)\.(\d+)", text)
    return (int(m.group(1)), int(m.group(2)), int(m.group(3))) if m else None


@dataclass(frozen=True, slots=True)
class AdoptCapability:
    """Whether charon takes over leftover policies, and why (or why not)."""

    can_adopt: bool
    version: tuple[int, int, int] | None
    policy_update: bool | None          # None: the setting could not be read
    problems: tuple[str, ...] = ()      # why adoption will not work
    warnings: tuple[str, ...] = ()      # works, but not as intended

    def to_json(self) -> dict:
        return {"can_adopt": self.can_adopt,
                "version": ".".join(map(str, self.version)) if self.version else None,
                "policy_update": self.policy_update, "problems": list(self.problems),
                "warnings": list(self.warnings)}


SNIPPET_HINT = ("install etc/strongswan.d/ipsec-supervisor.conf as /etc/strongswan.d/ipsec-supervisor.conf "
                "(it sets charon.plugins.kernel-netlink.policy_update = yes)")


def check_adopt_capability(version: tuple[int, int, int] | None, policy_update: bool | None,
                           settings_problem: str | None = None) -> AdoptCapability:
    """Pure: can this strongSwan VERSION with this POLICY_UPDATE setting adopt leftover policies?"""
    problems: list[str] = []
    warnings: list[str] = []
    shown = ".".join(map(str, version)) if version else "unknown"
    if settings_problem:
        warnings.append(f"cannot read charon's settings ({settings_problem}); "
                        "charon.plugins.kernel-netlink.policy_update is unknown")
    if version is None:
        warnings.append("strongSwan's version is unknown; assuming it can adopt")
    elif version < FIRST_UPDATE_OPTION:
        problems.append(f"strongSwan {shown} cannot install a policy that already exists (no policy_update "
                        f"option before {'.'.join(map(str, FIRST_UPDATE_OPTION))}): it would fail on every "
                        "leftover policy")
    elif version < FIRST_RETRY_AS_UPDATE and policy_update is not True:
        problems.append(f"strongSwan {shown} needs charon.plugins.kernel-netlink.policy_update = yes to "
                        f"install over leftover policies (it is "
                        f"{'unknown' if policy_update is None else 'no'}); {SNIPPET_HINT}")
    elif policy_update is False or (policy_update is None and not settings_problem):
        warnings.append("charon.plugins.kernel-netlink.policy_update is not set: charon will log "
                        "'policy already exists, try to update it' and send each leftover policy twice; "
                        + SNIPPET_HINT)
    return AdoptCapability(not problems, version, policy_update, tuple(problems), tuple(warnings))
