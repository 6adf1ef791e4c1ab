"""Just enough X.509 to decide what the stroke plugin decides about certificates.

The stroke plugin replaces a configured identity that a certificate does not contain by
the certificate's subject, and resolves ``leftca="C=.., CN=.."`` to a CA certificate by
its subject.  Doing the same before sending ``load-conn`` needs the subject DN, the
subjectAltNames and the key identifiers of a certificate, and strongSwan's way of
writing and matching identities.  A small DER reader covers that; no crypto.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import re
from dataclasses import dataclass


class CertError(ValueError):
    """Not a readable X.509 certificate."""


# RDN names strongSwan accepts in DN strings -> attribute OIDs (RFC 4519/2985 and friends).
_RDN_OIDS = {
    "nd": "0.2.262.1.10.7.20", "uid": "0.9.2342.19200300.100.1.1", "dc": "0.9.2342.19200300.100.1.25",
    "cn": "2.5.4.3", "sn": "2.5.4.4", "serialnumber": "2.5.4.5", "c": "2.5.4.6", "l": "2.5.4.7",
    "st": "2.5.4.8", "street": "2.5.4.9", "o": "2.5.4.10", "ou": "2.5.4.11", "t": "2.5.4.12",
    "d": "2.5.4.13", "postaladdress": "2.5.4.16", "postalcode": "2.5.4.17", "n": "2.5.4.41",
    "g": "2.5.4.42", "i": "2.5.4.43", "dnqualifier": "2.5.4.46", "dmdname": "2.5.4.54",
    "pseudonym": "2.5.4.65", "id": "2.5.4.45", "en": "2.16.840.1.113730.3.1.3",
    "employeenumber": "2.16.840.1.113730.3.1.3", "e": "1.2.840.113549.1.9.1",
    "email": "1.2.840.113549.1.9.1", "emailaddress": "1.2.840.113549.1.9.1",
    "un": "1.2.840.113549.1.9.2", "unstructuredname": "1.2.840.113549.1.9.2",
    "ua": "1.2.840.113549.1.9.8", "unstructuredaddress": "1.2.840.113549.1.9.8",
}
_SAN_OID = "2.5.29.17"
_SKI_OID = "2.5.29.14"
_BASIC_CONSTRAINTS_OID = "2.5.29.19"


# --- DER ---------------------------------------------------------------------

def _tlv(data: bytes, i: int) -> tuple[int, int, int]:
    """(tag, start of contents, end of contents) of the element at ``i``."""
    if i + 2 > len(data):
        raise CertError("truncated DER")
    tag = data[i]
    length = data[i + 1]
    i += 2
    if length & 0x80:
        n = length & 0x7F
        if n == 0 or n > 4 or i + n > len(data):
            raise CertError("bad DER length")
        length = int.from_bytes(data[i:i + n], "big")
        i += n
    if i + length > len(data):
        raise CertError("truncated DER")
    return tag, i, i + length


def _children(data: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    out = []
    i = start
    while i < end:
        tag, s, e = _tlv(data, i)
        out.append((tag, s, e))
        i = e
    return out


def _oid(raw: bytes) -> str:
    if not raw:
        raise CertError("empty OID")
    parts = [raw[0] // 40, raw[0] % 40]
    value = 0
    for b in raw[1:]:
        value = (value << 7) | (b & 0x7F)
        if not b & 0x80:
            parts.append(value)
            value = 0
    return ".".join(map(str, parts))


_STRING_TAGS = {0x0C: "utf-8", 0x13: "ascii", 0x16: "ascii", 0x14: "latin-1", 0x1E: "utf-16-be",
                0x1C: "utf-32-be"}


def _rdns(data: bytes, start: int, end: int) -> tuple[tuple[str, str], ...]:
    out = []
    for _, s, e in _children(data, start, end):            # SET OF
        for _, s2, e2 in _children(data, s, e):            # AttributeTypeAndValue
            parts = _children(data, s2, e2)
            if len(parts) != 2:
                raise CertError("bad RDN")
            (_, os_, oe), (vtag, vs, ve) = parts
            out.append((_oid(data[os_:oe]), data[vs:ve].decode(_STRING_TAGS.get(vtag, "latin-1"), "replace")))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class Certificate:
    """What strongSwan matches identities against."""

    der: bytes
    subject: tuple[tuple[str, str], ...]          # (attribute OID, value), in order
    dns_names: tuple[str, ...]
    emails: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    dir_names: tuple[tuple[tuple[str, str], ...], ...]
    key_ids: tuple[bytes, ...]                    # SKI, SHA-1 of the key and of its SPKI
    is_ca: bool

    def has_subject(self, ident: str) -> bool:
        """The stroke plugin's ``has_subject``: does this certificate contain ``ident``?"""
        return identity_matches_certificate(ident, self)


def pem_to_der(blob: bytes) -> bytes:
    """DER from PEM or DER input (the first CERTIFICATE block of a PEM file)."""
    text = blob.lstrip()
    if text.startswith(b"-----BEGIN"):
        m = re.search(rb"-----BEGIN ([A-Z0-9 ]+)-----(.*?)-----END \1-----", blob, re.S)
        if not m:
            raise CertError("unterminated PEM block")
        body = re.sub(rb"^[A-Za-z-]+:.*$", b"", m.group(2), flags=re.M)   # PEM headers
        try:
            return base64.b64decode(b"".join(body.split()), validate=True)
        except binascii.Error as exc:
            raise CertError(f"bad base64 in PEM: {exc}") from None
    return blob


def parse_certificate(blob: bytes) -> Certificate:
    """Parse a PEM or DER X.509 certificate; CertError if it is not one."""
    der = pem_to_der(blob)
    try:
        tag, s, e = _tlv(der, 0)
        if tag != 0x30:
            raise CertError("not a SEQUENCE")
        cert_parts = _children(der, s, e)
        tag, ts, te = cert_parts[0]
        tbs = _children(der, ts, te)
        k = 1 if tbs[0][0] == 0xA0 else 0          # optional [0] version
        subject_tlv = tbs[k + 4]
        spki = tbs[k + 5]
        subject = _rdns(der, subject_tlv[1], subject_tlv[2])
        dns, emails, ips, dirs = [], [], [], []
        key_ids = []
        is_ca = False
        spki_parts = _children(der, spki[1], spki[2])
        if len(spki_parts) == 2:
            _, bs, be = spki_parts[1]
            key_ids.append(hashlib.sha1(der[bs + 1:be]).digest())      # skip "unused bits"
        key_ids.append(hashlib.sha1(der[subject_tlv[2]:spki[2]]).digest())   # the whole SPKI
        for tag, xs, xe in tbs[k + 6:]:
            if tag != 0xA3:
                continue
            (_, ls, le), = _children(der, xs, xe)
            for _, es, ee in _children(der, ls, le):
                ext = _children(der, es, ee)
                oid = _oid(der[ext[0][1]:ext[0][2]])
                _, vs, ve = ext[-1]                    # OCTET STRING
                if oid == _SAN_OID:
                    _, gs, ge = _tlv(der, vs)
                    for gtag, ns, ne in _children(der, gs, ge):
                        value = der[ns:ne]
                        if gtag == 0x82:
                            dns.append(value.decode("ascii", "replace"))
                        elif gtag == 0x81:
                            emails.append(value.decode("ascii", "replace"))
                        elif gtag == 0x87 and len(value) in (4, 16):
                            ips.append(str(ipaddress.ip_address(value)))
                        elif gtag == 0xA4:
                            _, ds, de = _tlv(der, ns)
                            dirs.append(_rdns(der, ds, de))
                elif oid == _SKI_OID:
                    _, ks, ke = _tlv(der, vs)
                    key_ids.insert(0, der[ks:ke])
                elif oid == _BASIC_CONSTRAINTS_OID:
                    _, bs2, be2 = _tlv(der, vs)
                    inner = _children(der, bs2, be2)
                    is_ca = bool(inner) and inner[0][0] == 0x01 and der[inner[0][1]:inner[0][2]] != b"\x00"
    except (IndexError, ValueError) as exc:
        if isinstance(exc, CertError):
            raise
        raise CertError(f"not an X.509 certificate ({exc})") from None
    return Certificate(der, subject, tuple(dns), tuple(emails), tuple(ips), tuple(dirs), tuple(key_ids), is_ca)


# --- identities ----------------------------------------------------------------

ANY_IDS = frozenset(("", "%any", "%any6", "0.0.0.0", "*", "::", "0::0"))


def is_any_id(ident: str) -> bool:
    """True for strings strongSwan turns into the wildcard identity (ID_ANY)."""
    return "=" not in ident and "@" not in ident and ident in ANY_IDS


def parse_dn(text: str) -> tuple[tuple[str, str], ...] | None:
    """strongSwan's DN syntax ("C=CH, O=x, CN=y" or "/C=CH/O=x"); None if not a DN it knows."""
    sep = "/" if text.startswith("/") else ","
    body = text[1:] if sep == "/" else text
    out = []
    for part in body.split(sep):
        if not part.strip():
            continue
        name, eq, value = part.partition("=")
        oid = _RDN_OIDS.get(name.strip().lower())
        if not eq or oid is None:
            return None
        out.append((oid, value.strip()))
    return tuple(out) or None


def _dn_matches(cert_dn: tuple[tuple[str, str], ...], wanted: tuple[tuple[str, str], ...]) -> bool:
    # Same RDNs, any order, "*" in the wanted value matches anything; case-insensitive.
    if len(cert_dn) != len(wanted):
        return False
    left = list(cert_dn)
    for oid, value in wanted:
        for k, (c_oid, c_value) in enumerate(left):
            if c_oid == oid and (value == "*" or c_value.lower() == value.lower()):
                del left[k]
                break
        else:
            return False
    return True


def _string_matches(have: str, want: str) -> bool:
    if want.startswith("*"):
        return have.lower().endswith(want[1:].lower())
    return have.lower() == want.lower()


def identity_matches_certificate(ident: str, cert: Certificate) -> bool:
    """Whether ``cert`` contains ``ident`` (subject DN, subjectAltName or key id)."""
    ident = ident.strip()
    if ident.startswith("@#"):
        try:
            return bytes.fromhex(ident[2:]) in cert.key_ids
        except ValueError:
            return False
    if "=" in ident:
        dn = parse_dn(ident)
        if dn is None:
            return False
        return _dn_matches(cert.subject, dn) or any(_dn_matches(d, dn) for d in cert.dir_names)
    if ident.startswith("@@"):
        return any(_string_matches(e, ident[2:]) for e in cert.emails)
    if ident.startswith("@"):
        return any(_string_matches(d, ident[1:]) for d in cert.dns_names)
    if "@" in ident:
        return any(_string_matches(e, ident) for e in cert.emails)
    try:
        net = ipaddress.ip_network(ident, strict=False)
    except ValueError:
        return any(_string_matches(d, ident) for d in cert.dns_names)
    return any(ipaddress.ip_address(a) in net for a in cert.ip_addresses
               if ipaddress.ip_address(a).version == net.version)


def dn_equals(a: str, cert: Certificate) -> bool:
    """Whether the DN string ``a`` names ``cert``'s subject (for leftca= lookups)."""
    dn = parse_dn(a)
    return dn is not None and _dn_matches(cert.subject, dn)
