"""ipsec.secrets -> VICI ``load-shared`` and ``load-key`` messages.

Syntax as read by strongSwan 5.9's stroke plugin: ``[IDS] : TYPE SECRET`` one entry per
line, ``#`` comments, ``include PATTERN`` (globs, relative to the including file).
Secrets are "quoted" (taken literally), 0x hex, 0s base64 or a bare word.  PSK, EAP,
XAUTH and NTLM entries become ``load-shared``; RSA, ECDSA, BLISS and PKCS8 entries name a
key file (relative to /etc/ipsec.d/private) whose contents go into ``load-key``.

A bad entry is reported with file:line and skipped; the others still load (the stroke
plugin stops reading the file at the first bad line instead).  Not expressible over VICI,
so refused: passphrase-protected keys (charon cannot decrypt for a VICI client), %prompt,
P12 containers and smartcard PINs.
"""

from __future__ import annotations

import base64
import binascii
import glob
import os
import re
from dataclasses import dataclass
from typing import Callable

from .ipsec_conf import Diagnostic, Origin, glob_names
from .translate import FileBlob

DEFAULT_IPSEC_SECRETS = "/etc/ipsec.secrets"
MAX_RECURSION = 10
SHARED_TYPES = {"PSK": "IKE", "EAP": "EAP", "XAUTH": "XAUTH", "NTLM": "NTLM"}
KEY_TYPES = {"RSA": "rsa", "ECDSA": "ecdsa", "BLISS": "bliss", "PKCS8": "any"}
UNSUPPORTED = {"P12": "PKCS#12 containers", "PIN": "smartcard PINs"}


@dataclass(frozen=True, slots=True)
class SharedSecret:
    """A PSK/EAP/XAUTH/NTLM entry."""

    kind: str                    # PSK | EAP | XAUTH | NTLM
    owners: tuple[str, ...]      # empty: any
    secret: bytes
    origin: Origin

    def message(self, unique_id: str) -> dict:
        msg = {"id": unique_id, "type": SHARED_TYPES[self.kind], "data": self.secret}
        if self.owners:
            msg["owners"] = list(self.owners)
        return msg


@dataclass(frozen=True, slots=True)
class PrivateKey:
    """An RSA/ECDSA/BLISS/PKCS8 entry, with the key file's contents."""

    kind: str
    path: str
    data: bytes
    origin: Origin

    def message(self) -> dict:
        return {"type": KEY_TYPES[self.kind], "data": FileBlob(self.data, self.path)}


@dataclass(frozen=True, slots=True)
class Secrets:
    """A parsed ipsec.secrets: entries in file order and what was skipped."""

    path: str
    shared: tuple[SharedSecret, ...]
    keys: tuple[PrivateKey, ...]
    files: tuple[str, ...]
    errors: tuple[Diagnostic, ...]

    def shared_messages(self) -> list[dict]:
        """load-shared messages with stable ids, so a reload replaces instead of adding."""
        out, seen = [], {}
        for s in self.shared:
            base = f"ipsec.secrets:{s.kind}:{' '.join(s.owners) or '%any'}"
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.append(s.message(base if n == 0 else f"{base}#{n + 1}"))
        return out

    def key_messages(self) -> list[dict]:
        return [k.message() for k in self.keys]


class _EntryError(Exception):
    pass


def _eat(line: str) -> str:
    return line.lstrip(" \t")


def _value(line: str) -> tuple[str, str]:
    """stroke's extract_value: a quoted string or a word; (value, rest)."""
    line = _eat(line)
    if not line or line.startswith("#"):
        return "", ""
    if line[0] in "'\"":
        end = line.find(line[0], 1)
        if end < 0:
            raise _EntryError("missing second delimiter")
        return line[1:end], line[end + 1:]
    m = re.match(r"[^ \t]*", line)
    return m.group(0), line[m.end():]


def _secret(line: str) -> tuple[bytes, str]:
    """stroke's extract_secret: quoted literally, 0x hex, 0s base64, else the word itself."""
    line = _eat(line)
    if not line or line.startswith("#"):
        raise _EntryError("missing secret")
    if line[0] in "'\"":
        end = line.find(line[0], 1)
        if end < 0:
            raise _EntryError("missing second delimiter")
        return line[1:end].encode("utf-8", "surrogateescape"), line[end + 1:]
    m = re.match(r"[^ \t]*", line)
    raw = m.group(0)
    rest = line[m.end():]
    if len(raw) > 2 and raw[:2].lower() == "0x":
        try:
            return bytes.fromhex(raw[2:]), rest
        except ValueError:
            raise _EntryError("bad hex secret after 0x") from None
    if len(raw) > 2 and raw[:2].lower() == "0s":
        try:
            return base64.b64decode(raw[2:], validate=True), rest
        except binascii.Error:
            raise _EntryError("bad base64 secret after 0s") from None
    return raw.encode("utf-8", "surrogateescape"), rest


def _ids(text: str) -> tuple[str, ...]:
    out = []
    rest = text
    while _eat(rest):
        value, rest = _value(rest)
        if value:
            out.append(value)
        elif not rest:
            break
    return tuple(out)


def _is_encrypted(data: bytes) -> bool:
    return b"ENCRYPTED" in data[:4096] and b"-----BEGIN" in data[:4096]


def load_secrets(path: str = DEFAULT_IPSEC_SECRETS, *, ipsec_dir: str = "/etc/ipsec.d",
                 read_text: Callable[[str], str] | None = None,
                 read_file: Callable[[str], bytes] | None = None,
                 expand: Callable[[str], list[str]] | None = None,
                 real: Callable[[str], str] = os.path.realpath) -> Secrets:
    """Read ``path`` and its includes; unreadable top-level file -> OSError.

    Each file is read once (by real path): an include of a file in its own include chain is
    an error naming the file and line; one already read through another include is skipped.
    """
    read_text = read_text or (lambda p: open(p, encoding="utf-8", errors="surrogateescape").read())
    read_file = read_file or (lambda p: open(p, "rb").read())
    expand = expand or (lambda pat: [p for p in sorted(glob.glob(pat)) if os.path.isfile(p)])
    shared: list[SharedSecret] = []
    keys: list[PrivateKey] = []
    errors: list[Diagnostic] = []
    files: list[str] = []

    def err(origin: Origin, message: str) -> None:
        errors.append(Diagnostic("error", f"{message}; entry skipped", origin, "ipsec.secrets"))

    seen: set[str] = set()

    def walk(file: str, level: int, text: str, chain: tuple[str, ...]) -> None:
        files.append(file)
        for n, raw in enumerate(text.split("\n"), 1):
            origin = Origin(file, n)
            line = _eat(raw.rstrip("\r"))
            if not line or line.startswith("#"):
                continue
            if line.startswith("include ") and len(line) > len("include "):
                pattern = line[len("include "):].split(" ", 1)[0]
                if level >= MAX_RECURSION:
                    err(origin, f"include nested more than {MAX_RECURSION} levels deep")
                    continue
                full = pattern if pattern.startswith("/") else os.path.join(os.path.dirname(file), pattern)
                for name in expand(full):
                    here = real(name)
                    if here in chain:
                        loop = " -> ".join(chain[chain.index(here):] + (here,))
                        err(origin, f"include '{pattern}' makes a loop: {name} is already being read "
                                    f"({loop})")
                        continue
                    if here in seen:
                        continue    # read once already: the same secrets again would add nothing
                    seen.add(here)
                    try:
                        walk(name, level + 1, read_text(name), chain + (here,))
                    except OSError as exc:
                        err(origin, f"cannot read included {name}: {exc.strerror or exc}")
                continue
            try:
                entry(line, origin)
            except _EntryError as exc:
                err(origin, str(exc))

    def entry(line: str, origin: Origin) -> None:
        if line.startswith(": "):
            ids, rest = (), line[1:]
        else:
            head, sep, rest = line.partition(" : ")
            if not sep:
                raise _EntryError("missing ' : ' separator between identities and secret")
            ids = _ids(head)
        rest = _eat(rest)
        m = re.match(r"([^ \t]+)[ \t]", rest)
        if not m:
            raise _EntryError("missing secret type (PSK, EAP, XAUTH, NTLM, RSA, ECDSA, BLISS, PKCS8)")
        kind, rest = m.group(1), rest[m.end():]
        if kind in SHARED_TYPES:
            secret, _ = _secret(rest)
            shared.append(SharedSecret(kind, ids, secret, origin))
        elif kind in KEY_TYPES:
            name, rest = _value(rest)
            if not name:
                raise _EntryError("empty key file name")
            key_path = name if name.startswith("/") else os.path.join(ipsec_dir, "private", name)
            passphrase = None
            if _eat(rest) and not _eat(rest).startswith("#"):
                passphrase, _ = _secret(rest)
            if passphrase == b"%prompt":
                raise _EntryError(f"{key_path}: %prompt needs an interactive starter; not supported")
            try:
                data = read_file(key_path)
            except OSError as exc:
                raise _EntryError(f"cannot read private key {key_path}: {exc.strerror or exc}") from None
            if _is_encrypted(data):
                raise _EntryError(f"{key_path} is passphrase-protected; charon cannot decrypt keys loaded "
                                  "over VICI, store it decrypted (mode 0600)")
            keys.append(PrivateKey(kind, key_path, data, origin))
        elif kind in UNSUPPORTED:
            raise _EntryError(f"{kind}: {UNSUPPORTED[kind]} are not supported over VICI")
        else:
            raise _EntryError(f"unknown secret type '{kind}' (PSK, EAP, XAUTH, NTLM, RSA, ECDSA, BLISS, PKCS8)")

    seen.add(real(path))
    walk(path, 0, read_text(path), (real(path),))
    return Secrets(path, tuple(shared), tuple(keys), tuple(files), tuple(errors))


def parse_secrets(text: str, path: str = "ipsec.secrets", files: dict[str, str | bytes] | None = None,
                  ipsec_dir: str = "/etc/ipsec.d") -> Secrets:
    """Parse ``text`` as if it were ``path``; ``files`` holds includes and key files."""
    table: dict = dict(files or {})
    table[path] = text

    def get(p: str):
        try:
            return table[p]
        except KeyError:
            raise FileNotFoundError(2, "No such file or directory", p) from None

    def read_text(p: str) -> str:
        v = get(p)
        return v.decode() if isinstance(v, bytes) else v

    def read_file(p: str) -> bytes:
        v = get(p)
        return v.encode() if isinstance(v, str) else v

    return load_secrets(path, ipsec_dir=ipsec_dir, read_text=read_text, read_file=read_file,
                        expand=lambda pat: glob_names(table, pat), real=os.path.normpath)
