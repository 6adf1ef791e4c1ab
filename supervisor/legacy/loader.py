"""Load ipsec.conf and ipsec.secrets into charon over VICI: plan (pure), then execute.

``read_legacy_config`` reads and translates everything up front: a conn that cannot be
parsed or translated is skipped with a diagnostic, and nothing is sent before every
message is built.  ``plan`` compares the result with what was loaded last
(``LoadedState``) the way the starter does on ``ipsec update``: conns that disappeared
or changed are unrouted, then removed; new and changed ones are loaded, then routed or
initiated; unchanged ones are not touched.  ``reload`` tears everything down and loads
again (``ipsec reload``).  ``execute`` sends the plan and reports per conn.

Like the stroke plugin, conns whose IKE settings are identical share one charon
connection (named after the first of them) as separate children, so a responder finds
all of them under the same IKE_SA; ``install``/``initiate`` address them as
``ike=<first conn>, child=<conn>``.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from typing import Callable, Iterable

from ..errors import SupervisorError
from .ipsec_conf import DEFAULT_IPSEC_CONF, Diagnostic, IpsecConf, Origin, load_ipsec_conf
from .secrets import DEFAULT_IPSEC_SECRETS, Secrets, load_secrets
from .translate import (DEFAULT_IPSEC_DIR, MERGE_IGNORED, ConnMessage, FileBlob, TranslateEnv, TranslateError,
                        ca_cert_paths, canonical, daemon_debug_args, daemon_settings, to_jsonable,
                        translate_ca, translate_conn)

log = logging.getLogger(__name__)

DEFAULT_VICI_SOCKET = "/var/run/charon.vici"
DEFAULT_TIMEOUT = 10.0
MODES = ("load", "update", "reload")


class LoaderError(SupervisorError):
    """Talking to charon failed (socket gone, timeout, protocol); the load stopped there."""


# ---------------------------------------------------------------------------
# what is loaded

@dataclass(frozen=True, slots=True)
class LoadedChild:
    name: str
    auto: str
    key: str                       # canonical conn (IKE and CHILD parts), to notice changes


@dataclass(frozen=True, slots=True)
class LoadedPeer:
    name: str
    ike_key: str                   # the merge key of its conns
    children: tuple[LoadedChild, ...]


@dataclass(frozen=True, slots=True)
class LoadedState:
    """What this loader put into charon; the base of the next ``update``."""

    peers: tuple[LoadedPeer, ...] = ()
    pools: tuple[tuple[str, str], ...] = ()          # (name, canonical body)
    shared_ids: tuple[str, ...] = ()
    key_ids: tuple[str, ...] = ()
    authorities: tuple[tuple[str, str], ...] = ()    # (name, canonical body)
    order: tuple[str, ...] = ()                      # loaded conns in file order

    def child_names(self) -> list[str]:
        return [c.name for p in self.peers for c in p.children]

    def to_json(self) -> dict:
        return {
            "peers": [{"name": p.name, "ike_key": p.ike_key,
                       "children": [{"name": c.name, "auto": c.auto, "key": c.key} for c in p.children]}
                      for p in self.peers],
            "pools": [list(p) for p in self.pools],
            "shared_ids": list(self.shared_ids),
            "key_ids": list(self.key_ids),
            "authorities": [list(a) for a in self.authorities],
            "order": list(self.order),
        }

    @classmethod
    def from_json(cls, d: dict) -> "LoadedState":
        return cls(
            peers=tuple(LoadedPeer(p["name"], p["ike_key"],
                                   tuple(LoadedChild(c["name"], c["auto"], c["key"]) for c in p["children"]))
                        for p in d["peers"]),
            pools=tuple((str(a), str(b)) for a, b in d.get("pools", [])),
            shared_ids=tuple(map(str, d.get("shared_ids", []))),
            key_ids=tuple(map(str, d.get("key_ids", []))),
            authorities=tuple((str(a), str(b)) for a, b in d.get("authorities", [])),
            order=tuple(map(str, d.get("order", []))),
        )


# ---------------------------------------------------------------------------
# reading and translating

@dataclass(frozen=True)
class LegacyConfig:
    """ipsec.conf + ipsec.secrets, parsed and translated; nothing sent yet."""

    conf: IpsecConf
    secrets: Secrets | None
    messages: tuple[ConnMessage, ...]         # loadable conns (auto != ignore), in file order
    authorities: tuple[tuple[str, dict], ...]
    ca_certs: tuple[FileBlob, ...]            # ipsec.d/cacerts, loaded as trust anchors
    errors: tuple[Diagnostic, ...]            # skipped conns, cas and secrets
    warnings: tuple[Diagnostic, ...]
    skipped: tuple[tuple[str, Diagnostic], ...] = ()   # conn name -> why it is not loaded


def local_addresses() -> frozenset[str]:
    """Addresses of the calling thread's network namespace (for the left/right swap)."""
    from ..kernel.addresses import dump_addresses
    return frozenset(a.address for a in dump_addresses())


def resolve_host(name: str) -> tuple[str, ...]:
    try:
        return tuple(dict.fromkeys(ai[4][0] for ai in socket.getaddrinfo(name, None)))
    except (OSError, UnicodeError):
        return ()


def read_legacy_config(conf_path: str = DEFAULT_IPSEC_CONF, secrets_path: str | None = DEFAULT_IPSEC_SECRETS,
                       *, ipsec_dir: str = DEFAULT_IPSEC_DIR, addresses: frozenset[str] | None = None,
                       resolve: Callable[[str], tuple[str, ...]] = resolve_host,
                       read_file: Callable[[str], bytes] | None = None) -> LegacyConfig:
    """Parse and translate; IpsecConfError when ipsec.conf as a whole is unusable."""
    conf = load_ipsec_conf(conf_path)
    secrets = None
    errors = list(conf.errors)
    if secrets_path is not None:
        try:
            secrets = load_secrets(secrets_path, ipsec_dir=ipsec_dir)
            errors += secrets.errors
        except OSError as exc:
            errors.append(Diagnostic("error", f"cannot read {secrets_path}: {exc.strerror or exc}; no secrets "
                                              "loaded", None, "ipsec.secrets"))
    if addresses is None:
        addresses = local_addresses()
    env_kwargs = {} if read_file is None else {"read_file": read_file}
    env = TranslateEnv(ipsec_dir=ipsec_dir, local_addresses=addresses, resolve=resolve,
                       ca_files=ca_cert_paths(conf, ipsec_dir), **env_kwargs)
    return translate_config(conf, secrets, env, errors)


def translate_config(conf: IpsecConf, secrets: Secrets | None, env: TranslateEnv,
                     errors: list[Diagnostic] | None = None) -> LegacyConfig:
    """Translate every loadable conn and ca of ``conf`` (pure given ``env``)."""
    errors = list(conf.errors) if errors is None else list(errors)
    warnings = list(conf.warnings)
    skipped = [(d.section[5:], d) for d in conf.errors
               if d.section and d.section.startswith("conn ") and d.message.startswith("conn skipped")]
    messages = []
    for conn in conf.conns:
        if conn.auto == "ignore":
            continue
        try:
            msg = translate_conn(conn, conf.setup, env)
        except TranslateError as exc:
            d = replace_message(exc.diagnostic, exc.diagnostic.message + "; conn skipped")
            errors.append(d)
            skipped.append((conn.name, d))
            continue
        messages.append(msg)
        warnings += msg.warnings
    authorities = []
    for ca in conf.cas:
        if ca.auto == "ignore":
            continue
        try:
            authorities.append((ca.name, translate_ca(ca, env)))
        except TranslateError as exc:
            errors.append(replace_message(exc.diagnostic, exc.diagnostic.message + "; ca skipped"))
    ca_certs = []
    cadir = os.path.join(env.ipsec_dir, "cacerts")
    for path in env.ca_files:
        if os.path.dirname(path) != cadir:
            continue   # a ca section's certificate: sent with its load-authority
        try:
            ca_certs.append(FileBlob(env.read_file(path), path))
        except OSError as exc:
            warnings.append(Diagnostic("warning", f"cannot read CA certificate {path}: {exc.strerror or exc}"))
    return LegacyConfig(conf, secrets, tuple(messages), tuple(authorities), tuple(ca_certs),
                        tuple(errors), tuple(warnings), tuple(skipped))


def replace_message(d: Diagnostic, message: str) -> Diagnostic:
    return Diagnostic(d.severity, message, d.origin, d.section, d.option)


# ---------------------------------------------------------------------------
# the plan

@dataclass(frozen=True, slots=True)
class Step:
    """One VICI request of a plan."""

    command: str                  # VICI command
    message: dict
    target: str                   # what it is about, for reports ("conn net", "pool 10.3.0.0/24", ...)
    conns: tuple[str, ...] = ()   # conns whose result depends on this step
    peer: str | None = None

    def describe(self) -> str:
        return f"{self.command} {self.target}"

    def to_json(self, secrets: bool = False) -> dict:
        msg = to_jsonable(self.message)
        if self.command == "load-shared":
            msg["data"] = self.message["data"].decode("utf-8", "backslashreplace") if secrets else "(redacted)"
        return {"command": self.command, "target": self.target, "message": msg}


@dataclass(frozen=True)
class Plan:
    """Steps in execution order, the conns they cover, and what stays untouched."""

    mode: str
    steps: tuple[Step, ...]
    groups: tuple[tuple[str, tuple[ConnMessage, ...]], ...]   # peer name -> children, after the plan
    unchanged: tuple[str, ...]
    removed: tuple[str, ...]
    config: LegacyConfig
    previous: LoadedState
    moved: tuple[str, ...] = ()      # unchanged conns whose connection was renamed (re-routed)
    dirty: frozenset[str] = frozenset()
    warnings: tuple[Diagnostic, ...] = ()

    def to_json(self, secrets: bool = False) -> dict:
        return {"mode": self.mode, "steps": [s.to_json(secrets) for s in self.steps],
                "unchanged": list(self.unchanged), "removed": list(self.removed),
                "errors": [d.to_json() for d in self.config.errors],
                "warnings": [d.to_json() for d in self.config.warnings + self.warnings]}


@dataclass(slots=True)
class _Peer:
    """A connection while planning (mutable scratch; plans hold ``groups``)."""

    name: str
    key: str
    children: list[str]


def conn_message(peer: str, children: Iterable[ConnMessage]) -> dict:
    """The load-conn message for ``peer`` with ``children`` (all with the same IKE part)."""
    children = list(children)
    body = dict(children[0].ike)
    body["children"] = {c.name: c.child for c in children}
    return {peer: body}


def plan_load(config: LegacyConfig, previous: LoadedState | None = None, mode: str = "update",
              initiate_timeout_ms: int = -1) -> Plan:
    """The requests that bring charon from ``previous`` to ``config`` (see module doc).

    ``initiate_timeout_ms`` -1 lets charon negotiate auto=start conns in the background;
    >= 0 waits that long for each and reports a failure to establish as the conn's failure.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    # "load" is for a charon that holds nothing of ours (just started or restarted).
    previous = LoadedState() if mode == "load" or previous is None else previous
    steps: list[Step] = []
    new = {m.name: m for m in config.messages}
    old_peer_of = {c.name: p for p in previous.peers for c in p.children}
    old_child = {c.name: c for p in previous.peers for c in p.children}

    def unchanged(name: str) -> bool:
        if mode != "update" or name not in old_child or name not in new:
            return False
        m, c = new[name], old_child[name]
        return c.key == m.key() and c.auto == m.auto

    keep = [n for n in new if unchanged(n)]
    # in the old file's order, as the starter unroutes them (charon reuses freed reqids)
    rank = {n: i for i, n in enumerate(previous.order)}
    gone = sorted((n for n in old_child if not unchanged(n)), key=lambda n: rank.get(n, len(rank)))

    # stroke's bookkeeping: peers keep their name while any child remains; a new conn joins
    # the first peer with identical IKE settings, else becomes a peer named after itself.
    peers = [_Peer(p.name, p.ike_key, [c.name for c in p.children if c.name in keep]) for p in previous.peers]
    emptied = [p.name for p in peers if not p.children]
    dirty = {p.name for p, q in zip(peers, previous.peers) if p.children and len(p.children) != len(q.children)}
    peers = [p for p in peers if p.children]
    renamed: list[str] = []
    notes: list[Diagnostic] = []
    for name, m in new.items():
        if name in keep:
            continue
        peer = next((p for p in peers if p.key == m.merge_key()), None)
        if peer is not None:
            first = new[peer.children[0]]
            lost = sorted(k for k in MERGE_IGNORED if first.ike.get(k) != m.ike.get(k))
            if lost:
                notes.append(Diagnostic(
                    "warning", f"shares connection '{peer.name}' (same IKE settings), whose "
                               f"{', '.join(lost)} applies instead of its own (as with the starter)",
                    m.origin, f"conn {name}"))
            peer.children.append(name)
            dirty.add(peer.name)
            continue
        clash = next((p for p in peers if p.name == name), None)
        if clash is not None:
            # VICI holds one connection per name (stroke can hold two): the old one moves
            # to the name of its first remaining child.
            renamed.append(clash.name)
            clash.name = clash.children[0]
            dirty.add(clash.name)
        peers.append(_Peer(name, m.merge_key(), [name]))
        dirty.add(name)

    # 1. unroute what goes away or changes; children of renamed peers are re-routed later.
    old_names = {q.name for q in previous.peers}
    moved = [c for p in peers if p.name in dirty and p.name not in old_names for c in p.children if c in keep]
    for name in gone + moved:
        c = old_child[name]
        if c.auto == "route":
            steps.append(Step("uninstall", {"child": name, "ike": old_peer_of[name].name}, f"conn {name}",
                              (name,), old_peer_of[name].name))
    # 2. remove connections left without children (or renamed)
    for name in dict.fromkeys(emptied + renamed):
        steps.append(Step("unload-conn", {"name": name}, f"connection {name}", (), name))

    # 3. credentials before connections: secrets, keys, CA certificates, authorities
    secrets = config.secrets
    shared = secrets.shared_messages() if secrets else []
    for msg in shared:
        steps.append(Step("load-shared", msg, f"shared {msg['type']} secret {msg['id']!r}"))
    for msg, key in zip(secrets.key_messages() if secrets else [], secrets.keys if secrets else []):
        steps.append(Step("load-key", msg, f"private key {key.path}"))
    for blob in config.ca_certs:
        steps.append(Step("load-cert", {"type": "X509", "flag": "CA", "data": blob}, f"CA certificate {blob.path}"))
    for name, msg in config.authorities:
        steps.append(Step("load-authority", msg, f"authority {name}"))
    pools_now: dict[str, dict] = {}
    for m in config.messages:
        pools_now.update(m.pools)
    old_pools = dict(previous.pools)
    for name, body in pools_now.items():
        if mode != "update" or old_pools.get(name) != canonical(body):
            steps.append(Step("load-pool", {name: body}, f"pool {name}"))

    # 4. connections, 5. routes and initiations
    groups = tuple((p.name, tuple(new[c] for c in p.children)) for p in peers)
    for peer, children in groups:
        if peer in dirty:
            steps.append(Step("load-conn", conn_message(peer, children), f"connection {peer}",
                              tuple(c.name for c in children), peer))
    # In file order, as the starter routes them: charon hands out reqids in this order.
    peer_of = {c.name: peer for peer, children in groups for c in children}
    for c in config.messages:
        if c.auto == "route" and (c.name not in keep or c.name in moved):
            steps.append(Step("install", {"child": c.name, "ike": peer_of[c.name]}, f"conn {c.name}",
                              (c.name,), peer_of[c.name]))
        elif c.auto == "start" and c.name not in keep:
            steps.append(Step("initiate", {"child": c.name, "ike": peer_of[c.name], "timeout": initiate_timeout_ms},
                              f"conn {c.name}", (c.name,), peer_of[c.name]))

    # 6. drop credentials and pools nobody refers to any more
    shared_ids = {m["id"] for m in shared}
    for sid in previous.shared_ids:
        if sid not in shared_ids:
            steps.append(Step("unload-shared", {"id": sid}, f"shared secret {sid!r}"))
    authority_names = {n for n, _ in config.authorities}
    for name, _ in previous.authorities:
        if name not in authority_names:
            steps.append(Step("unload-authority", {"name": name}, f"authority {name}"))
    for name in old_pools:
        if name not in pools_now:
            steps.append(Step("unload-pool", {"name": name}, f"pool {name}"))
    return Plan(mode, tuple(steps), groups, tuple(keep), tuple(gone), config, previous, tuple(moved),
                frozenset(dirty), tuple(notes))


# ---------------------------------------------------------------------------
# executing

@dataclass(frozen=True, slots=True)
class ConnResult:
    """What happened to one conn."""

    name: str
    status: str                   # loaded | routed | initiated | unchanged | unloaded | skipped | failed
    peer: str | None = None
    message: str = ""
    origin: Origin | None = None

    @property
    def ok(self) -> bool:
        return self.status not in ("skipped", "failed")

    def to_json(self) -> dict:
        return {"conn": self.name, "status": self.status, "ike": self.peer, "message": self.message,
                "file": self.origin.path if self.origin else None,
                "line": self.origin.line if self.origin else None}


@dataclass(frozen=True)
class LoadReport:
    """Per-conn results, failures of other requests, and the new loaded state."""

    mode: str
    results: tuple[ConnResult, ...]
    failures: tuple[str, ...]             # requests that failed, not tied to one conn
    state: LoadedState
    errors: tuple[Diagnostic, ...]
    warnings: tuple[Diagnostic, ...]

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results) and not self.failures and not self.errors

    def to_json(self) -> dict:
        return {"mode": self.mode, "ok": self.ok, "conns": [r.to_json() for r in self.results],
                "failures": list(self.failures), "errors": [d.to_json() for d in self.errors],
                "warnings": [d.to_json() for d in self.warnings], "state": self.state.to_json()}


class CommandFailed(Exception):
    """charon answered a request with success=no."""


class ViciClient:
    """A blocking VICI session with a timeout; request() raises CommandFailed or LoaderError."""

    def __init__(self, path: str = DEFAULT_VICI_SOCKET, timeout: float = DEFAULT_TIMEOUT):
        import vici
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError as exc:
            self.sock.close()
            raise LoaderError(f"cannot connect to charon's VICI socket {path}: {exc.strerror or exc} "
                              "(is charon running with the vici plugin?)") from None
        self.session = vici.Session(self.sock)

    def request(self, command: str, message: dict | None = None) -> dict:
        import vici.exception
        try:
            answer = self.session.request(command, message)
        except vici.exception.CommandException as exc:
            raise CommandFailed(str(exc).removeprefix("Command failed: ")) from None
        except (OSError, vici.exception.SessionException) as exc:
            raise LoaderError(f"VICI request {command} to {self.path} failed: {exc}; the load stopped "
                              "here, run it again once charon answers") from None
        return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in dict(answer).items()}

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "ViciClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def execute_plan(p: Plan, client) -> LoadReport:
    """Send ``p``'s steps; charon refusing one conn does not stop the others."""
    config = p.config
    failed: dict[str, str] = {}        # conn -> why
    done: dict[str, str] = {}          # conn -> last status
    failures: list[str] = []
    key_ids: list[str] = []
    loaded_peers: dict[str, list[ConnMessage]] = {}
    shared_ok: list[str] = []
    authorities_ok: list[tuple[str, str]] = []
    pools_ok: dict[str, str] = dict(p.previous.pools)
    kept_authorities = {n: b for n, b in p.previous.authorities}
    origin = {m.name: m.origin for m in config.messages}

    def send(step: Step) -> dict | None:
        try:
            return client.request(step.command, step.message)
        except CommandFailed as exc:
            text = f"charon refused {step.describe()}: {exc}"
            if step.conns:
                for name in step.conns:
                    failed.setdefault(name, text)
            else:
                failures.append(text)
            log.warning("%s", text)
            return None

    for step in p.steps:
        if step.command in ("install", "initiate") and step.conns[0] in failed:
            continue
        if step.command == "load-conn":
            _load_conn(step, p, send, client, failed, loaded_peers)
            for name in step.conns:
                if name not in failed and (name not in p.unchanged or name in p.moved):
                    done[name] = "loaded"
            continue
        answer = send(step)
        if answer is None:
            continue
        if step.command == "install":
            done[step.conns[0]] = "routed"
        elif step.command == "initiate":
            done[step.conns[0]] = "initiated"
        elif step.command == "uninstall" or step.command == "unload-conn":
            pass
        elif step.command == "load-key" and answer.get("id"):
            key_ids.append(answer["id"])
        elif step.command == "load-shared":
            shared_ok.append(step.message["id"])
        elif step.command == "load-authority":
            (name, body), = step.message.items()
            authorities_ok.append((name, canonical(body)))
        elif step.command == "load-pool":
            (name, body), = step.message.items()
            pools_ok[name] = canonical(body)
        elif step.command == "unload-pool":
            pools_ok.pop(step.message["name"], None)
        elif step.command == "unload-authority":
            kept_authorities.pop(step.message["name"], None)

    # unloading keys that are no longer listed, now that the new ones are in
    for kid in p.previous.key_ids:
        if kid not in key_ids:
            try:
                client.request("unload-key", {"id": kid})
            except CommandFailed as exc:
                failures.append(f"charon refused unload-key {kid}: {exc}")

    results: list[ConnResult] = []
    peers_final: list[LoadedPeer] = []
    previous_peers = {q.name: q for q in p.previous.peers}
    for peer, children in p.groups:
        if peer in loaded_peers:
            kids = loaded_peers[peer]
        elif peer in p.dirty and peer in previous_peers:
            # charon refused the new version: it still holds the old one
            peers_final.append(previous_peers[peer])
            kids = []
        else:   # untouched peer: everything in it was unchanged
            kids = [c for c in children if c.name in p.unchanged]
        if kids:
            peers_final.append(LoadedPeer(peer, kids[0].merge_key(),
                                          tuple(LoadedChild(c.name, c.auto, c.key()) for c in kids)))
        for c in children:
            if c.name in failed:
                results.append(ConnResult(c.name, "failed", peer, failed[c.name], origin.get(c.name)))
            elif c.name in p.unchanged and c.name not in done:
                results.append(ConnResult(c.name, "unchanged", peer, "", origin.get(c.name)))
            else:
                results.append(ConnResult(c.name, done.get(c.name, "loaded"), peer, "", origin.get(c.name)))
    new_names = {m.name for m in config.messages}
    for name in p.removed:
        if name not in new_names:
            results.append(ConnResult(name, "unloaded", None, "no longer in the configuration"))
    for name, d in config.skipped:
        results.append(ConnResult(name, "skipped", None, str(d), d.origin))
    state = LoadedState(
        peers=tuple(peers_final),
        pools=tuple(sorted(pools_ok.items())),
        shared_ids=tuple(shared_ok),
        key_ids=tuple(key_ids),
        authorities=tuple(sorted({**kept_authorities, **dict(authorities_ok)}.items())),
        order=tuple(m.name for m in config.messages if any(m.name == c.name for q in peers_final
                                                            for c in q.children)),
    )
    return LoadReport(p.mode, tuple(results), tuple(failures), state, config.errors,
                      config.warnings + p.warnings)


def _load_conn(step: Step, p: Plan, send, client, failed: dict, loaded_peers: dict) -> None:
    peer = step.peer
    children = dict(p.groups)[peer]
    if send(step) is not None:
        loaded_peers[peer] = list(children)
        return
    if len(children) == 1:
        return
    # The stroke plugin adds merged conns one at a time, so one bad child does not take
    # its siblings down: retry child by child to find out which ones charon accepts.
    for name in step.conns:
        failed.pop(name, None)
    accepted: list[ConnMessage] = []
    for c in children:
        try:
            client.request("load-conn", conn_message(peer, accepted + [c]))
            accepted.append(c)
        except CommandFailed as exc:
            failed[c.name] = f"charon refused load-conn {c.name}: {exc}"
    if accepted:
        loaded_peers[peer] = accepted


# ---------------------------------------------------------------------------
# one call for the supervisor

def apply(mode: str, conf_path: str = DEFAULT_IPSEC_CONF, secrets_path: str | None = DEFAULT_IPSEC_SECRETS, *,
          vici_socket: str = DEFAULT_VICI_SOCKET, previous: LoadedState | None = None,
          ipsec_dir: str = DEFAULT_IPSEC_DIR, timeout: float = DEFAULT_TIMEOUT,
          addresses: frozenset[str] | None = None, initiate_timeout_ms: int = -1) -> LoadReport:
    """Read, plan and execute: ``load`` into a fresh charon, ``update`` or ``reload``."""
    config = read_legacy_config(conf_path, secrets_path, ipsec_dir=ipsec_dir, addresses=addresses)
    plan = plan_load(config, previous, mode, initiate_timeout_ms)
    if initiate_timeout_ms >= 0:
        timeout = max(timeout, initiate_timeout_ms / 1000 + 5)
    with ViciClient(vici_socket, timeout) as client:
        return execute_plan(plan, client)


def daemon_options(conf_path: str = DEFAULT_IPSEC_CONF) -> tuple[list[str], dict[str, str]]:
    """What ``config setup`` asks of charon's start: (argv additions, strongswan.conf settings).

    ``charondebug`` -> ``--debug-<type> <level>``; ``cachecrls`` -> ``charon.cache_crls``
    (see ``translate.render_settings_overlay``).  IpsecConfError if the file is unusable.
    """
    setup = load_ipsec_conf(conf_path).setup
    return daemon_debug_args(setup), daemon_settings(setup)


def load(conf_path: str = DEFAULT_IPSEC_CONF, secrets_path: str | None = DEFAULT_IPSEC_SECRETS,
         **kwargs) -> LoadReport:
    """Everything into a charon that has none of it yet (after start or restart)."""
    return apply("load", conf_path, secrets_path, **kwargs)


def update(previous: LoadedState, conf_path: str = DEFAULT_IPSEC_CONF,
           secrets_path: str | None = DEFAULT_IPSEC_SECRETS, **kwargs) -> LoadReport:
    """``ipsec update``: only what changed since ``previous``."""
    return apply("update", conf_path, secrets_path, previous=previous, **kwargs)


def reload(previous: LoadedState, conf_path: str = DEFAULT_IPSEC_CONF,
           secrets_path: str | None = DEFAULT_IPSEC_SECRETS, **kwargs) -> LoadReport:
    """``ipsec reload``: unload everything ``previous`` holds, then load all again."""
    return apply("reload", conf_path, secrets_path, previous=previous, **kwargs)
