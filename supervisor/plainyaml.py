"""The plain subset of YAML a supervisor.yaml is written in, read without PyYAML.

Importing PyYAML costs about 10 ms (it compiles its scanner's and resolver's regular
expressions), paid by every ``ipsec status`` that finds a configuration file. ``load``
reads block mappings with simple keys, block and flow sequences of scalars, ``{}``,
plain and quoted scalars and comments, and gives exactly what ``yaml.safe_load`` gives;
for anything else (anchors, tags, multi-line or escaped scalars, nested flow collections,
duplicate keys, numbers in other notations, syntax errors) it gives None and the caller
uses PyYAML, which also words every error. tests/test_plainyaml.py compares the two.
"""

from __future__ import annotations

import re

# What PyYAML's SafeLoader resolves a plain scalar to (YAML 1.1), for the forms read here.
_NULLS = frozenset(("", "~", "null", "Null", "NULL"))
_TRUE = frozenset(("yes", "Yes", "YES", "true", "True", "TRUE", "on", "On", "ON"))
_FALSE = frozenset(("no", "No", "NO", "false", "False", "FALSE", "off", "Off", "OFF"))
_INT = re.compile(r"[-+]?(?:0|[1-9][0-9]*)")
_FLOAT = re.compile(r"[-+]?[0-9]+\.[0-9]*")
_UNITS = re.compile(r"(?:[0-9]+(?:\.[0-9]+)?[A-Za-z]+)+")
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# A plain scalar here: starts with a letter, digit or one of "/._~+-", holds no character that could
# start or end YAML syntax; a leading digit, dot or sign (unless "--x", "-x") must make a number above.
_PLAIN = re.compile(r"[A-Za-z0-9/._~+\-][A-Za-z0-9/._~@%+=^$()\-: ]*")
_NUMERIC_START = frozenset("0123456789+-.")
_NOT_PLAIN_TEXT = re.compile(r"[^\n\x20-\x7e]")      # tabs, CR, control characters, any non-ASCII


class _NotPlain(Exception):
    """The text uses YAML beyond the plain subset: PyYAML reads it."""


def _scalar(text: str, flow: bool = False) -> object:
    """The value of one scalar (TEXT stripped, its comment removed)."""
    if text[:1] == "'":
        if len(text) < 2 or text[-1] != "'" or "'" in text[1:-1]:
            raise _NotPlain
        return text[1:-1]
    if text[:1] == '"':
        if len(text) < 2 or text[-1] != '"' or '"' in text[1:-1] or "\\" in text:
            raise _NotPlain
        return text[1:-1]
    if text in _NULLS:
        return None
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    if text[0] in _NUMERIC_START and not (text[0] in "-+" and (text[1:2].isalpha() or text[1:2] == "-")):
        if _INT.fullmatch(text):
            return int(text)
        if _FLOAT.fullmatch(text):
            return float(text)
        if _UNITS.fullmatch(text) and text[:2] not in ("0x", "0X", "0b", "0B"):
            return text         # 10s, 250ms, 1m30s, 1G: no int, float or timestamp of YAML 1.1
        raise _NotPlain         # octal, hex, 1_000, 1:30, .inf, dates, -x...: PyYAML decides
    if not _PLAIN.fullmatch(text) or ": " in text or text.endswith(":") or (flow and ":" in text):
        raise _NotPlain
    return text


def _strip_comment(line: str) -> str:
    """LINE without its comment ('#' at the start or after a space, outside quotes) and trailing space."""
    if "#" in line:
        if "'" in line or '"' in line:
            quote = None
            for i, ch in enumerate(line):
                if quote:
                    quote = None if ch == quote else quote
                elif ch in "'\"":
                    quote = ch
                elif ch == "#" and (i == 0 or line[i - 1] in " \t"):
                    line = line[:i]
                    break
        else:
            i = line.find(" #")
            line = line[:i] if i >= 0 else ("" if line.lstrip().startswith("#") else line)
    return line.rstrip()


def _value(text: str) -> object:
    """The value after "key: " on one line."""
    if text[:1] == "[":
        if text[-1] != "]":
            raise _NotPlain
        inner = text[1:-1].strip()
        if not inner:
            return []
        if any(c in inner for c in "[]{}\"'"):
            raise _NotPlain
        items = [item.strip() for item in inner.split(",")]
        if not all(items):
            raise _NotPlain     # [a, , b] or a trailing comma
        return [_scalar(item, flow=True) for item in items]
    if text[:1] == "{":
        if text.replace(" ", "") != "{}":
            raise _NotPlain
        return {}
    if text[:1] in "&*!|>%@`?:,]}#" or text == "-" or text.startswith("- "):
        raise _NotPlain
    return _scalar(text)


def load(text: str) -> dict | None:
    """TEXT's top-level mapping ({} for an empty document), or None if PyYAML must read it."""
    # Printable ASCII and newlines only: str.strip() and split() know other spaces and line breaks
    # (NBSP, \x0c, \x85, U+2028) than YAML does, and PyYAML refuses control characters.
    if _NOT_PLAIN_TEXT.search(text) or "\\" in text and '"' in text:
        return None
    lines = []
    for raw in text.split("\n"):
        line = _strip_comment(raw)
        if line:
            lines.append((len(line) - len(line.lstrip(" ")), line.lstrip(" ")))
    try:
        pos, value = _mapping(lines, 0, 0)
    except _NotPlain:
        return None
    if pos != len(lines):
        return None
    return value


def _mapping(lines: list[tuple[int, str]], pos: int, indent: int) -> tuple[int, dict]:
    out: dict = {}
    while pos < len(lines):
        ind, line = lines[pos]
        if ind < indent:
            break
        if ind > indent or line.startswith(("---", "...", "%", "- ")) or line == "-":
            raise _NotPlain
        key, sep, rest = line.partition(":")
        if not sep or not _KEY.fullmatch(key) or key in _NULLS or key in _TRUE or key in _FALSE or key in out:
            raise _NotPlain
        if rest and rest[0] != " ":
            raise _NotPlain
        rest = rest.strip()
        pos += 1
        if rest:
            out[key] = _value(rest)
            continue
        if pos < len(lines):
            nxt_ind, nxt = lines[pos]
            if nxt.startswith("- ") or nxt == "-":
                if nxt_ind >= indent:
                    pos, out[key] = _sequence(lines, pos, nxt_ind)
                    continue
            elif nxt_ind > indent:
                pos, out[key] = _mapping(lines, pos, nxt_ind)
                continue
        out[key] = None
    return pos, out


def _sequence(lines: list[tuple[int, str]], pos: int, indent: int) -> tuple[int, list]:
    out = []
    while pos < len(lines):
        ind, line = lines[pos]
        if ind < indent or not (line.startswith("- ") or line == "-"):
            break
        if ind > indent:
            raise _NotPlain
        item = line[2:].strip()
        if not item or item[:1] in "[{" or item == "-" or item.startswith("- ") or (":" in item and item[:1] not in "'\""):
            raise _NotPlain     # nested collections, mappings in a list (hooks): PyYAML
        out.append(_value(item))
        pos += 1
    return pos, out
