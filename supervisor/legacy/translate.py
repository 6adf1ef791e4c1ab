"""ipsec.conf conns -> VICI ``load-conn`` messages, as the stroke plugin would have built them.

Pure: everything outside the parsed conn (local addresses for the left/right swap,
name resolution, certificate and key files) comes in through ``TranslateEnv``.

What each option becomes follows strongSwan 5.9's stroke plugin, so that a conn loaded
here and one loaded by the starter look the same to charon (``swanctl --list-conns``).
Where VICI cannot express an option the conn is refused with a ``TranslateError`` naming
file:line, conn and option; the other conns are unaffected.

``config setup``: ``uniqueids`` and ``strictcrlpolicy`` are per-conn settings over VICI
(``unique``, remote ``revocation``) and are applied here; ``charondebug`` becomes daemon
arguments (``daemon_debug_args``) and ``cachecrls`` a strongswan.conf setting
(``daemon_settings``), both to be applied when charon is started.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import ipaddress
import json
import os
from dataclasses import dataclass, field, replace
from typing import Callable

from .ipsec_conf import Ca, Conn, Diagnostic, End, IpsecConf, Origin, Setup, _Bad, parse_protoport
from .x509 import CertError, Certificate, dn_equals, is_any_id, parse_certificate

DEFAULT_IPSEC_DIR = "/etc/ipsec.d"
# IKE settings charon does not compare when it decides whether two configs are equal
MERGE_IGNORED = frozenset(("dpd_timeout", "dscp"))
IKE_PORT = 500

# charondebug subsystems charon accepts as --debug-<type> (strongSwan's debug groups).
DEBUG_TYPES = ("dmn", "mgr", "ike", "chd", "job", "cfg", "knl", "net", "asn", "enc", "tnc", "imc",
               "imv", "pts", "tls", "esp", "lib", "app", "any")


class TranslateError(Exception):
    """A conn (or ca) that cannot be expressed over VICI; carries the diagnostic."""

    def __init__(self, diagnostic: Diagnostic):
        super().__init__(str(diagnostic))
        self.diagnostic = diagnostic


class FileBlob(bytes):
    """File contents sent to charon, remembering where they came from (for --dry-run)."""

    path: str

    def __new__(cls, data: bytes, path: str):
        obj = super().__new__(cls, data)
        obj.path = path
        return obj


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def _no_resolve(name: str) -> tuple[str, ...]:
    return ()


@dataclass(frozen=True)
class TranslateEnv:
    """What the translation may know about the machine; tests pass fakes."""

    ipsec_dir: str = DEFAULT_IPSEC_DIR
    local_addresses: frozenset[str] = frozenset()   # addresses of charon's namespace
    resolve: Callable[[str], tuple[str, ...]] = _no_resolve
    read_file: Callable[[str], bytes] = _read_bytes
    allow_swap: bool = True                         # charon.plugins.stroke.allow_swap
    ca_files: tuple[str, ...] = ()                   # CA certificates leftca= may name


@dataclass(frozen=True)
class ConnMessage:
    """One conn, translated: the IKE part (shared by merged conns) and its CHILD part."""

    name: str
    auto: str
    origin: Origin
    ike: dict
    child: dict
    pools: dict = field(default_factory=dict)        # pool name -> load-pool body
    warnings: tuple[Diagnostic, ...] = ()

    def merge_key(self) -> str:
        """Conns with equal keys share one connection (what charon's peer and IKE configs
        compare: not the DPD timeout nor the DSCP, and any-address virtual IPs of either
        family are equal)."""
        ike = {k: v for k, v in self.ike.items() if k not in MERGE_IGNORED}
        if "vips" in ike:
            ike["vips"] = ["%any" if v in ("0.0.0.0", "::") else v for v in ike["vips"]]
        return canonical(ike)

    def key(self) -> str:
        """Canonical form of the whole conn, to notice changes."""
        return canonical({"ike": self.ike, "child": self.child, "pools": self.pools})


def canonical(value) -> str:
    """A stable text of a message for comparisons: blobs by content, not by file name."""
    return json.dumps(to_jsonable(value, digests=True), sort_keys=True, separators=(",", ":"))


def to_jsonable(value, digests: bool = False):
    """A message as JSON: blobs become {"file", "bytes"}, or {"bytes", "sha256"} with ``digests``."""
    if isinstance(value, dict):
        return {k: to_jsonable(v, digests) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v, digests) for v in value]
    if isinstance(value, bytes):
        out: dict = {"bytes": len(value)}
        if digests:
            out["sha256"] = hashlib.sha256(value).hexdigest()
        elif isinstance(value, FileBlob):
            out["file"] = value.path
        return out
    return value


# ---------------------------------------------------------------------------
# helpers

def _tokens(text: str | None) -> list[str]:
    """strongSwan's enumerator_create_token(text, ",", " "): split at commas, trim blanks."""
    if not text:
        return []
    return [t.strip(" ") for t in text.split(",") if t.strip(" ")]


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


class _Ctx:
    """Per-conn translation context: the conn, its ends after the swap, error helpers."""

    def __init__(self, conn: Conn, env: TranslateEnv):
        self.conn = conn
        self.env = env
        self.warnings: list[Diagnostic] = []

    def fail(self, option: str | None, message: str) -> TranslateError:
        origin = self.conn.origin_of(option) if option else self.conn.origin
        return TranslateError(Diagnostic("error", message, origin, f"conn {self.conn.name}", option))

    def warn(self, option: str | None, message: str) -> None:
        origin = self.conn.origin_of(option) if option else self.conn.origin
        self.warnings.append(Diagnostic("warning", message, origin, f"conn {self.conn.name}", option))

    def read(self, option: str, path: str, what: str) -> FileBlob:
        try:
            return FileBlob(self.env.read_file(path), path)
        except OSError as exc:
            raise self.fail(option, f"cannot read {what} {path}: {exc.strerror or exc}") from None


@functools.lru_cache(maxsize=256)
def _parse_cert_cached(blob: bytes) -> Certificate:
    return parse_certificate(blob)


def _address(host: str | None) -> str:
    return host if host else "%any"


def _resolve_host(token: str, env: TranslateEnv) -> str | None:
    if token in ("%any", "%any4"):
        return "0.0.0.0"
    if token == "%any6":
        return "::"
    try:
        return str(ipaddress.ip_address(token))
    except ValueError:
        found = env.resolve(token)
        return found[0] if found else None


def _is_local(address: str, any_allowed: bool, env: TranslateEnv) -> bool:
    # stroke's is_local(): any token (not a subnet) that is an address of this host.
    for token in _tokens(address):
        if "/" in token:
            continue
        host = _resolve_host(token, env)
        if host is None:
            continue
        if host in env.local_addresses:
            return True
        if any_allowed and ipaddress.ip_address(host).is_unspecified:
            return True
    return False


def swapped_ends(conn: Conn, env: TranslateEnv) -> tuple[End, End, bool]:
    """(local end, remote end, swapped): left is local unless right is one of our addresses."""
    left, right = conn.left, conn.right
    if not left.auth and not right.auth and conn.authby:
        # authby= is applied by the starter to left/right, before charon decides the sides.
        a1, a2_left, a2_right = _authby(conn)
        left, right = _with_auth(left, a1, a2_left), _with_auth(right, a1, a2_right)
    if env.allow_swap and _is_local(_address(right.host), False, env):
        return right, left, True
    return left, right, False


def _side(swapped: bool, local: bool) -> str:
    return "left" if local != swapped else "right"


# ---------------------------------------------------------------------------
# IKE part

def _proposals(ctx: _Ctx, option: str, text: str | None) -> list[str]:
    # A trailing "!" makes the list strict; otherwise charon's defaults are appended.
    if text is None:
        return ["default"]
    strict = text.endswith("!")
    items = [p.strip() for p in (text[:-1] if strict else text).split(",")]
    if any(not p for p in items):
        raise ctx.fail(option, f"empty proposal in '{text}'")
    return items if strict else items + ["default"]


def _addrs(end: End) -> list[str]:
    out = _tokens(_address(end.host))
    if end.allow_any:
        out += ["0.0.0.0/0", "::/0"]
    return out


def _lifetimes(ctx: _Ctx) -> tuple[dict, dict]:
    """(IKE times, CHILD lifetimes) as the stroke plugin computes them from margins and fuzz."""
    c = ctx.conn
    if not c.rekey:   # rekey=no: the starter sends no lifetimes at all
        zero = {"rekey_time": 0, "reauth_time": 0, "over_time": 0, "rand_time": 0}
        child = {k: 0 for k in ("rekey_time", "life_time", "rand_time", "rekey_bytes", "life_bytes",
                                "rand_bytes", "rekey_packets", "life_packets", "rand_packets")}
        return zero, child
    for life, margin, lopt, mopt in ((c.ike_lifetime, c.rekey_margin, "ikelifetime", "rekeymargin"),
                                     (c.ipsec_lifetime, c.rekey_margin, "lifetime", "rekeymargin")):
        if margin > life:
            raise ctx.fail(mopt, f"{mopt} ({margin}s) is longer than {lopt} ({life}s); "
                                 "the starter would send a wrapped-around rekey time")
    for life, margin, lopt, mopt in ((c.life_bytes, c.margin_bytes, "lifebytes", "marginbytes"),
                                     (c.life_packets, c.margin_packets, "lifepackets", "marginpackets")):
        if margin > life:
            raise ctx.fail(mopt, f"{mopt} ({margin}) is larger than {lopt} ({life})")
    jitter = c.rekey_margin * c.rekey_fuzz // 100
    ike = {"over_time": c.rekey_margin, "rand_time": jitter}
    rekey = c.ike_lifetime - c.rekey_margin
    ike["reauth_time"], ike["rekey_time"] = (rekey, 0) if c.reauth else (0, rekey)
    child = {
        "rekey_time": c.ipsec_lifetime - c.rekey_margin, "life_time": c.ipsec_lifetime, "rand_time": jitter,
        "rekey_bytes": c.life_bytes - c.margin_bytes, "life_bytes": c.life_bytes,
        "rand_bytes": c.margin_bytes * c.rekey_fuzz // 100,
        "rekey_packets": c.life_packets - c.margin_packets, "life_packets": c.life_packets,
        "rand_packets": c.margin_packets * c.rekey_fuzz // 100,
    }
    return ike, child


_UNIQUE = {"no": "no", "yes": "replace", "replace": "replace", "keep": "keep", "never": "never"}
_CONFIG_VIPS = ("%modeconfig", "%modecfg", "%config", "%cfg")


def _vips(ctx: _Ctx, me: End, other: End, local_addrs: list[str], side: str) -> list[str]:
    if not me.sourceip:
        return []
    if other.sourceip:
        ctx.warn(f"{side}sourceip", "both leftsourceip and rightsourceip are set; IKE negotiates one "
                                    "virtual IP only, the local one is ignored (as by the starter)")
        return []
    out = []
    for token in _tokens(me.sourceip):
        if token in _CONFIG_VIPS:
            # Same family as the local subnet, else the remote one, else the first local address.
            hint = me.subnet or other.subnet
            if hint:
                out.append("0.0.0.0" if "." in hint else "::")
            else:
                out.append("::" if ":" in local_addrs[0] else "0.0.0.0")
        elif token in ("%config4", "%any", "%any4"):
            out.append("0.0.0.0")
        elif token in ("%config6", "%any6"):
            out.append("::")
        else:
            try:
                out.append(str(ipaddress.ip_address(token)))
            except ValueError:
                raise ctx.fail(f"{side}sourceip", f"'{token}' is not an address or %config "
                                                  "(the starter would drop it silently)") from None
    return out


def _pools(ctx: _Ctx, other: End, side: str) -> tuple[list[str], dict]:
    names: list[str] = []
    bodies: dict = {}
    for token in _tokens(other.sourceip):
        if token in _CONFIG_VIPS or token in ("%config4", "%config6"):
            # The stroke plugin names an empty pool after the conn; over VICI the name is
            # enough (no pool of that name means no address, as with an empty pool).
            if ctx.conn.name not in names:
                names.append(ctx.conn.name)
        elif token.startswith("%"):
            names.append(token[1:])
        else:
            _check_pool_range(ctx, token, f"{side}sourceip")
            names.append(token)
            bodies[token] = {"addrs": token}
    if other.dns:
        dns = []
        for token in _tokens(other.dns):
            try:
                dns.append(str(ipaddress.ip_address(token)))
            except ValueError:
                raise ctx.fail(f"{side}dns", f"'{token}' is not an address") from None
        if not bodies:
            raise ctx.fail(f"{side}dns", f"{side}dns needs an address pool defined in {side}sourceip "
                                         "(CIDR or range) to carry the DNS servers over VICI")
        for body in bodies.values():
            body["dns"] = dns
    return names, bodies


def _check_pool_range(ctx: _Ctx, token: str, option: str) -> None:
    try:
        if "-" in token:
            lo, hi = (ipaddress.ip_address(p.strip()) for p in token.split("-", 1))
            if lo.version != hi.version or lo > hi:
                raise ValueError(token)
        else:
            ipaddress.ip_network(token, strict=False)
    except ValueError:
        raise ctx.fail(option, f"'{token}' is neither a pool (CIDR or FROM-TO range), %config nor "
                               "%poolname (the starter would drop it silently)") from None


_PUBKEY_PREFIXES = ("ike:", "pubkey", "rsa", "ecdsa", "bliss")


def _auth_round(ctx: _Ctx, setup: Setup, me: End, other: End, local: bool, primary: bool,
                side: str) -> dict | None:
    """One auth round as stroke's build_auth_cfg() makes it, or None when there is none."""
    c = ctx.conn
    end, peer = (me, other) if local else (other, me)
    suffix = "" if primary else "2"
    if primary:
        auth, ident = end.auth, end.id if end.id is not None else _address(end.host)
        cert, ca, groups = end.cert, end.ca, end.groups
        if ca == "%same":
            ca = peer.ca
    else:
        auth, ident = end.auth2, end.id2 if end.id2 is not None else (end.id if local else None)
        cert, ca, groups = end.cert2, end.ca2, end.groups2
        if ca == "%same":
            ca = peer.ca2
    id_option = f"{side}id{suffix}"
    if ident and ident.startswith("%") and ident not in ("%any", "%any6"):
        if not local and primary and end.id is None:
            # right=%any4 without rightid: stroke's loose identity "any4" accepts any id,
            # which is what no id does over VICI.
            ident = None
        elif not local:
            raise ctx.fail(id_option, f"'{ident}': a %-prefixed remote identity is accepted loosely by the "
                                      "stroke plugin; VICI has no such option (use the identity without %, "
                                      "or %any)")
        else:
            ident = ident[1:]
    if not auth:
        if primary:
            auth = "pubkey"
        else:
            if cert:
                ctx.warn(f"{side}cert2", f"{side}cert2 without {side}auth2 is not loaded")
            return None
    out: dict = {}
    if auth.startswith(_PUBKEY_PREFIXES):
        kind = "pubkey"
        out["auth"] = auth
    elif auth in ("psk", "secret"):
        kind = "psk"
        out["auth"] = "psk"
    elif auth.startswith("xauth"):
        kind = "xauth"
        out["auth"] = auth
    elif auth.startswith("eap"):
        kind = "eap"
        out["auth"] = auth
    elif auth == "any":
        kind = "any"
    else:
        raise ctx.fail(f"{side}auth{suffix}", f"unknown authentication method '{auth}' (the starter would "
                                               f"fall back to any; write {side}auth{suffix}=any if meant)")

    certs: list[FileBlob] = []
    parsed: list[Certificate] = []
    for name in _tokens(cert):
        if name.startswith("%smartcard"):
            raise ctx.fail(f"{side}cert{suffix}", "smartcard certificates (%smartcard) are not supported")
        path = name if name.startswith("/") else os.path.join(ctx.env.ipsec_dir, "certs", name)
        blob = ctx.read(f"{side}cert{suffix}", path, "certificate")
        try:
            parsed.append(_parse_cert_cached(bytes(blob)))
        except CertError as exc:
            raise ctx.fail(f"{side}cert{suffix}", f"{path} is not an X.509 certificate: {exc}") from None
        certs.append(blob)
    if certs:
        out["certs"] = certs
        # The stroke plugin replaces an identity none of the certificates contains by the
        # first certificate's subject; VICI does the same when no id is given.
        if ident is None or is_any_id(ident) or not any(p.has_subject(ident) for p in parsed):
            ident = None
    pubkey = end.sigkey
    if pubkey and pubkey not in ("%cert", "%dns"):
        out["pubkeys"] = [_pubkey(ctx, pubkey, f"{side}sigkey")]
        if ident is None or is_any_id(ident):
            raise ctx.fail(f"{side}sigkey", f"a raw public key needs {side}id (VICI would name the key "
                                            "by its key id, the starter by %any)")
    if ident is not None and not is_any_id(ident):
        out["id"] = ident
    if ca:
        out["cacerts"] = [_find_ca(ctx, ca, f"{side}ca{suffix}")]
    if groups:
        out["groups"] = _tokens(groups)
    if end.cert_policy:
        out["cert_policy"] = _tokens(end.cert_policy)
    if not local and kind in ("pubkey", "any") and setup.strictcrlpolicy != "no":
        out["revocation"] = "strict" if setup.strictcrlpolicy == "yes" else "ifuri"
    if kind == "eap":
        if c.eap_identity:
            out["eap_id"] = "%any" if c.eap_identity == "%identity" else c.eap_identity
        if c.aaa_identity:
            out["aaa_id"] = c.aaa_identity
    if kind == "xauth" and c.xauth_identity:
        out["xauth_id"] = c.xauth_identity
    out["round"] = 1 if primary else 2
    return out


def _pubkey(ctx: _Ctx, value: str, option: str) -> bytes:
    if value.lower().startswith(("dns:", "ssh:")):
        raise ctx.fail(option, f"'{value[:4]}' public keys are not supported over VICI; use a PEM file")
    if value[:2].lower() in ("0x", "0s"):
        try:
            raw = bytes.fromhex(value[2:]) if value[:2].lower() == "0x" else base64.b64decode(value[2:], validate=True)
        except (ValueError, binascii.Error):
            raise ctx.fail(option, "bad hex/base64 public key") from None
        return FileBlob(raw, f"({option} inline)")
    path = value if value.startswith("/") else os.path.join(ctx.env.ipsec_dir, "certs", value)
    return ctx.read(option, path, "public key")


def _find_ca(ctx: _Ctx, dn: str, option: str) -> FileBlob:
    for path in ctx.env.ca_files:
        try:
            blob = ctx.env.read_file(path)
            cert = _parse_cert_cached(blob)
        except (OSError, CertError):
            continue
        if dn_equals(dn, cert):
            return FileBlob(blob, path)
    raise ctx.fail(option, f"no CA certificate with subject \"{dn}\" in {ctx.env.ipsec_dir}/cacerts or a "
                           "ca section (the starter would silently drop this constraint)")


# ---------------------------------------------------------------------------
# CHILD part

def _ts(ctx: _Ctx, end: End, option: str) -> list[str]:
    out = []
    for token in _tokens(end.subnet):
        proto, lo, hi = end.protocol, end.from_port, end.to_port
        subnet, bracket, rest = token.partition("[")
        if bracket:
            inner = rest.rsplit("]", 1)
            if len(inner) != 2:
                raise ctx.fail(option, f"'{token}': missing ']'")
            try:
                proto, lo, hi = parse_protoport(inner[0], (lo, hi))
            except _Bad as exc:
                raise ctx.fail(option, f"'{token}': {exc}") from None
        if subnet == "%dynamic":
            base = "dynamic"
        else:
            try:
                base = str(ipaddress.ip_network(subnet, strict=False))
            except ValueError:
                raise ctx.fail(option, f"'{subnet}' is not a subnet (CIDR), an address or %dynamic "
                                       "(the starter would drop it silently and widen the policy)") from None
        out.append(base + _protoport_suffix(proto, lo, hi))
    if not out:
        out.append("dynamic" + _protoport_suffix(end.protocol, end.from_port, end.to_port))
    return out


def _protoport_suffix(proto: int, lo: int, hi: int) -> str:
    if proto == 0 and (lo, hi) == (0, 0xFFFF):
        return ""
    if (lo, hi) == (0, 0xFFFF):
        port = ""
    elif (lo, hi) == (0xFFFF, 0):
        port = "/opaque"
    elif lo == hi:
        port = f"/{lo}"
    else:
        port = f"/{lo}-{hi}"
    return f"[{proto}{port}]"


_ACTION = {"none": "none", "clear": "none", "hold": "trap", "restart": "start"}


def _child(ctx: _Ctx, me: End, other: End, lifetimes: dict, swapped: bool) -> dict:
    c = ctx.conn
    out: dict = {"mode": "transport_proxy" if c.mode == "transport" and c.proxy_mode else c.mode}
    out.update(lifetimes)
    out["local_ts"] = _ts(ctx, me, f"{_side(swapped, True)}subnet")
    out["remote_ts"] = _ts(ctx, other, f"{_side(swapped, False)}subnet")
    if c.ah is not None:
        if c.esp is not None:
            ctx.warn("esp", "esp= is ignored because ah= is set (as by the starter)")
        out["ah_proposals"] = _proposals(ctx, "ah", c.ah)
    else:
        # Explicit "default" keeps the stroke plugin's order (classic before AEAD); a
        # child without proposals would get them the other way round.
        out["esp_proposals"] = _proposals(ctx, "esp", c.esp)
    out["dpd_action"] = _ACTION[c.dpd_action]
    out["close_action"] = _ACTION[c.close_action]
    if me.updown:
        out["updown"] = me.updown
    if me.hostaccess:
        out["hostaccess"] = "yes"
    if not c.install_policy:
        out["policies"] = "no"
    if c.compress:
        out["ipcomp"] = "yes"
    if c.sha256_96:
        out["sha256_96"] = "yes"
    if c.inactivity:
        out["inactivity"] = c.inactivity
    if c.reqid:
        out["reqid"] = c.reqid
    if c.replay_window is not None:
        out["replay_window"] = c.replay_window
    if c.mark_in:
        out["mark_in"] = c.mark_in
    if c.mark_out:
        out["mark_out"] = c.mark_out
    if c.tfc:
        out["tfc_padding"] = "mtu" if c.tfc == "%mtu" else int(c.tfc)
    return out


# ---------------------------------------------------------------------------
# public API

def translate_conn(conn: Conn, setup: Setup, env: TranslateEnv = TranslateEnv()) -> ConnMessage:
    """One conn as VICI message parts; TranslateError if VICI cannot express it."""
    ctx = _Ctx(conn, env)
    if conn.name == "%auto":
        raise ctx.fail(None, "conn %auto (numbered by the starter) is not supported; name the conn")
    if conn.mediation or conn.mediated_by or conn.me_peerid:
        opt = "mediation" if conn.mediation else "mediated_by" if conn.mediated_by else "me_peerid"
        raise ctx.fail(opt, "IKEv2 mediation is not supported over VICI by this charon build")
    me, other, swapped = swapped_ends(conn, env)
    lside, rside = _side(swapped, True), _side(swapped, False)
    if not swapped and not _is_local(_address(me.host), True, env):
        ctx.warn("left", "neither left nor right is an address of this host, assuming left=local "
                         "(as the starter does)")
    local_addrs, remote_addrs = _addrs(me), _addrs(other)
    ike_times, child_times = _lifetimes(ctx)

    ike: dict = {
        "version": {"ike": 0, "ikev1": 1, "ikev2": 2}[conn.keyexchange],
        "local_addrs": local_addrs,
        "remote_addrs": remote_addrs,
    }
    if me.ikeport != IKE_PORT:
        ike["local_port"] = me.ikeport
    ike["remote_port"] = other.ikeport
    ike["proposals"] = _proposals(ctx, "ike", conn.ike)
    ike.update({
        "send_certreq": _yes(other.sendcert != "never"),
        "send_cert": me.sendcert,
        "encap": _yes(conn.forceencaps),
        "fragmentation": conn.fragmentation,
        "keyingtries": conn.keying_tries,
        "mobike": _yes(conn.mobike),
        "aggressive": _yes(conn.aggressive),
        "pull": _yes(not conn.modecfg_push),
        # dpdaction=none switches DPD off entirely
        "dpd_delay": 0 if conn.dpd_action == "none" else conn.dpd_delay,
        "dpd_timeout": conn.dpd_timeout,
    })
    if conn.ikedscp:
        ike["dscp"] = conn.ikedscp
    ike.update(ike_times)
    ike["unique"] = _UNIQUE[setup.uniqueids]
    vips = _vips(ctx, me, other, local_addrs, lside)
    if vips:
        ike["vips"] = vips
    pools, pool_bodies = _pools(ctx, other, rside)
    if pools:
        ike["pools"] = pools
    if me.dns:
        ctx.warn(f"{lside}dns", "ignored: charon requests DNS servers for the virtual IPs it asks for")

    rounds = {}
    for local in (True, False):
        side = lside if local else rside
        for primary in (True, False):
            r = _auth_round(ctx, setup, me, other, local, primary, side)
            if r is not None:
                rounds[f"{'local' if local else 'remote'}-{r['round']}"] = r
    ike.update(rounds)

    child = _child(ctx, me, other, child_times, swapped)
    return ConnMessage(conn.name, conn.auto, conn.origin, ike, child, pool_bodies, tuple(ctx.warnings))


def _authby(conn: Conn) -> tuple[str | None, str | None, str | None]:
    """(auth for both ends, left auth2, right auth2) from the legacy authby=."""
    a = conn.authby
    if a in ("rsa", "rsasig", "ecdsa", "ecdsasig", "pubkey"):
        return "pubkey", None, None
    if a in ("secret", "psk"):
        return "psk", None, None
    if a in ("xauthrsasig", "xauthpsk"):
        first = "pubkey" if a == "xauthrsasig" else "psk"
        # The XAuth server authenticates the remote user in a second round.
        return (first, None, "xauth") if conn.xauth_server else (first, "xauth", None)
    return None, None, None   # authby=never: rounds default to pubkey


def _with_auth(end: End, auth: str | None, auth2: str | None) -> End:
    return replace(end, auth=auth, auth2=auth2 if auth2 else end.auth2)


def translate_ca(ca: Ca, env: TranslateEnv = TranslateEnv()) -> dict:
    """A ``ca`` section as a ``load-authority`` message."""
    def fail(option: str, message: str) -> TranslateError:
        origin = next((s.origin for s in ca.settings if s.key == option), ca.origin)
        return TranslateError(Diagnostic("error", message, origin, f"ca {ca.name}", option))

    if not ca.cacert:
        raise fail("cacert", "a ca section needs cacert=")
    if ca.cacert.startswith("%smartcard"):
        raise fail("cacert", "smartcard CA certificates are not supported")
    path = ca.cacert if ca.cacert.startswith("/") else os.path.join(env.ipsec_dir, "cacerts", ca.cacert)
    try:
        blob = FileBlob(env.read_file(path), path)
    except OSError as exc:
        raise fail("cacert", f"cannot read CA certificate {path}: {exc.strerror or exc}") from None
    body: dict = {"cacert": blob}
    crls = [u for u in (ca.crluri, ca.crluri2) if u]
    ocsp = [u for u in (ca.ocspuri, ca.ocspuri2) if u]
    if crls:
        body["crl_uris"] = crls
    if ocsp:
        body["ocsp_uris"] = ocsp
    if ca.certuribase:
        body["cert_uri_base"] = ca.certuribase
    return {ca.name: body}


def ca_cert_paths(conf: IpsecConf, ipsec_dir: str, listdir: Callable[[str], list[str]] = os.listdir) -> tuple[str, ...]:
    """CA certificates a ``leftca=`` may name: ipsec.d/cacerts/* and the ca sections' cacert=."""
    out = []
    cadir = os.path.join(ipsec_dir, "cacerts")
    try:
        out += [os.path.join(cadir, n) for n in sorted(listdir(cadir))]
    except OSError:
        pass
    for ca in conf.cas:
        if ca.cacert and not ca.cacert.startswith("%"):
            out.append(ca.cacert if ca.cacert.startswith("/") else os.path.join(cadir, ca.cacert))
    return tuple(out)


# ---------------------------------------------------------------------------
# config setup

def daemon_debug_args(setup: Setup) -> list[str]:
    """``charondebug="ike 2, knl 3"`` as charon's argv: ``--debug-ike 2 --debug-knl 3``."""
    if not setup.charondebug:
        return []
    args: list[str] = []
    origin = setup.origin_of("charondebug")
    for part in setup.charondebug.split(","):
        words = part.split()
        if not words:
            continue
        bad = len(words) != 2 or words[0] not in DEBUG_TYPES
        level = None
        if not bad:
            try:
                level = int(words[1])
            except ValueError:
                bad = True
        if bad or not -1 <= level <= 4:
            from .ipsec_conf import IpsecConfError
            raise IpsecConfError(Diagnostic(
                "error", f"'{part.strip()}' is not 'TYPE LEVEL' (TYPE one of {', '.join(DEBUG_TYPES)}, "
                         "LEVEL -1..4)", origin, "config setup", "charondebug"))
        args += [f"--debug-{words[0]}", str(level)]
    return args


def daemon_settings(setup: Setup) -> dict[str, str]:
    """strongswan.conf settings equivalent to ``config setup`` keys (cachecrls)."""
    return {"charon.cache_crls": "yes"} if setup.cachecrls else {}


def render_settings_overlay(settings: dict[str, str], include: str = "/etc/strongswan.conf") -> str:
    """A strongswan.conf that includes ``include`` and then sets ``settings`` (for STRONGSWAN_CONF)."""
    lines = [f"include {include}", ""]
    for key, value in sorted(settings.items()):
        *sections, leaf = key.split(".")
        indent = ""
        for s in sections:
            lines.append(f"{indent}{s} {{")
            indent += "  "
        lines.append(f"{indent}{leaf} = {value}")
        for _ in sections:
            indent = indent[:-2]
            lines.append(f"{indent}}}")
    return "\n".join(lines) + "\n"


def setup_unique_policy(setup: Setup) -> str:
    """The VICI ``unique`` value every conn gets from ``uniqueids``."""
    return _UNIQUE[setup.uniqueids]
