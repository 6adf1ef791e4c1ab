"""Who runs an IKE daemon in a network namespace: found by what it holds, never by its name.

A process in the namespace is an IKE daemon when it holds an XFRM netlink socket
(it can add and delete SAs and policies: charon, charon-nm, pluto, ...) or a UDP
socket on port 500 or 4500 (IKE). Each one found is either *ours*, the configured
daemon binary run by root, or an *other* IKE daemon: NetworkManager's charon-nm,
pluto, a charon of another container, anything else. A process name is never
evidence: anyone can call a ``sleep`` "charon", only root can run our binary as
root. Our own process, its children that are not daemons, and ipsec-supervisor processes
(whose kernel monitor holds an XFRM socket) are never counted.

The socket tables (/proc/PID/net/netlink, udp, udp6) are read through a process
of that namespace, so this works from any namespace; socket inodes are matched to
/proc/PID/fd. Reading is one pass over /proc; deciding (``classify``) is pure.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Iterable, Sequence

from .errors import SupervisorError, printable
from .ledger import NETLINK_XFRM, LedgerError, parse_proc_netlink, socket_inodes

IKE_PORTS = (500, 4500)
CAP_NET_ADMIN = 12
# The daemons `ipsec-supervisor flush` (which reads no configuration) treats as ours.
DEFAULT_DAEMON_BINARIES = ("/usr/lib/ipsec/charon", "/usr/sbin/charon-systemd")
DELETED = " (deleted)"


class DetectionError(SupervisorError):
    """The socket tables of a namespace cannot be read: who runs there is unknown."""


@dataclass(frozen=True, slots=True)
class ProcessFacts:
    """What /proc says about one process of the namespace (the input of ``classify``)."""

    pid: int
    ppid: int
    name: str                   # /proc/PID/comm: for messages only, never evidence
    exe: str | None             # the /proc/PID/exe link as read (None: unreadable, e.g. a kernel thread)
    exe_id: tuple[int, int] | None   # (st_dev, st_ino) of the running binary
    uid: int                    # effective uid
    net_admin: bool             # CAP_NET_ADMIN effective, in our own user namespace
    start_time: int             # clock ticks after boot (/proc/PID/stat field 22)
    xfrm_sockets: int           # XFRM netlink sockets it holds in this namespace
    ike_ports: tuple[int, ...]  # UDP ports among IKE_PORTS it has bound in this namespace
    argv: tuple[str, ...] = ()  # /proc/PID/cmdline


@dataclass(frozen=True, slots=True)
class IkeDaemon:
    """One IKE daemon found in a namespace, ours (the configured binary as root) or another."""

    pid: int
    name: str
    exe: str | None
    uid: int
    start_time: int
    xfrm_sockets: int
    ike_ports: tuple[int, ...]
    ours: bool

    def holds(self) -> str:
        """What made it an IKE daemon, in words."""
        parts = []
        if self.xfrm_sockets:
            parts.append("an XFRM netlink socket" if self.xfrm_sockets == 1
                         else f"{self.xfrm_sockets} XFRM netlink sockets")
        if self.ike_ports:
            parts.append("UDP port " + "/".join(map(str, self.ike_ports)))
        return " and ".join(parts)

    def describe(self) -> str:
        return f"{self.name} pid {self.pid}"

    def to_json(self) -> dict:
        return {"pid": self.pid, "name": self.name, "exe": self.exe, "uid": self.uid,
                "start_time": self.start_time, "xfrm_sockets": self.xfrm_sockets,
                "ike_ports": list(self.ike_ports), "ours": self.ours}


@dataclass(frozen=True, slots=True)
class Undetected:
    """Stands in for the daemons of a namespace whose socket tables could not be read."""

    reason: str
    pid: int = 0
    ours: bool = False

    def holds(self) -> str:
        return f"IKE sockets for all we know ({self.reason})"

    def describe(self) -> str:
        return "an unknown process"

    def to_json(self) -> dict:
        return {"pid": None, "unknown": self.reason}


@dataclass(frozen=True, slots=True)
class Binary:
    """A daemon binary as configured: its real path and, when it exists, its file identity."""

    path: str
    file_id: tuple[int, int] | None

    @classmethod
    def of(cls, path: str) -> "Binary":
        real = os.path.realpath(path)
        try:
            st = os.stat(real)
            return cls(real, (st.st_dev, st.st_ino))
        except OSError:
            return cls(real, None)


# --- deciding (pure) ---------------------------------------------------------------------


def runs_file(exe: str | None, exe_id: tuple[int, int] | None, path: str, file_id: tuple[int, int] | None) -> bool:
    """Whether a process whose /proc/PID/exe reads EXE (file EXE_ID) runs the binary at PATH (file FILE_ID):
    same path and the same file, or the path of a binary replaced since it started (" (deleted)", an upgrade)."""
    if exe is None:
        return False
    deleted = exe.endswith(DELETED)
    if deleted:
        exe = exe[:-len(DELETED)]
    if os.path.normpath(exe) != path:
        return False
    # Same path but another file: a charon of a container with its own root, not ours.
    return deleted or (exe_id is not None and exe_id == file_id)


def runs_binary(facts: ProcessFacts, binary: Binary) -> bool:
    """Whether the process runs BINARY (``runs_file``)."""
    return runs_file(facts.exe, facts.exe_id, binary.path, binary.file_id)


def is_supervisor(facts: ProcessFacts, interpreter: tuple[int, int] | None) -> bool:
    """An ipsec-supervisor process (root, our own interpreter, running our program): its kernel
    monitor holds an XFRM socket, but it installs nothing."""
    return (facts.uid == 0 and interpreter is not None and facts.exe_id == interpreter
            and any(os.path.basename(a) == "ipsec-supervisor" or a == "supervisor.cli" for a in facts.argv[1:4]))


def classify(facts: ProcessFacts, binaries: Sequence[Binary], *, self_pid: int,
             interpreter: tuple[int, int] | None = None) -> IkeDaemon | None:
    """FACTS as an IKE daemon (ours or other), or None: it holds no IKE socket, or it is us
    (SELF_PID), a child of ours that is not one of our daemons, or a supervisor (``is_supervisor``;
    INTERPRETER is the file identity of the Python running us)."""
    if facts.pid == self_pid or not (facts.xfrm_sockets or facts.ike_ports) or is_supervisor(facts, interpreter):
        return None
    # Root, or a daemon run with charon.user (it keeps CAP_NET_ADMIN in our user namespace).
    ours = (facts.uid == 0 or facts.net_admin) and any(runs_binary(facts, b) for b in binaries)
    if not ours and facts.ppid == self_pid:
        return None         # e.g. a load command or a hook of ours
    return IkeDaemon(pid=facts.pid, name=facts.name, exe=facts.exe, uid=facts.uid,
                     start_time=facts.start_time, xfrm_sockets=facts.xfrm_sockets,
                     ike_ports=facts.ike_ports, ours=ours)


def parse_proc_udp(text: str) -> list[tuple[int, int]]:
    """(local port, socket inode) of each socket in /proc/.../net/udp or udp6."""
    lines = text.splitlines()
    if not lines:
        return []
    header = lines[0].split()
    try:
        local, inode = header.index("local_address"), header.index("inode")
    except ValueError:
        raise ValueError(f"UDP socket table header not understood: {lines[0]!r}") from None
    # "tx_queue rx_queue" and "tm->when" are one column each in the body, two words in the header
    shift = sum(1 for w in header[:inode] if w in ("rx_queue", "tm->when"))
    out = []
    for lineno, line in enumerate(lines[1:], 2):
        words = line.split()
        if not words:
            continue
        try:
            port = int(words[local].rsplit(":", 1)[1], 16)
            out.append((port, int(words[inode - shift])))
        except (IndexError, ValueError):
            raise ValueError(f"UDP socket table line {lineno} not understood: {line!r}") from None
    return out


def others(daemons: Iterable[IkeDaemon], *, exclude: Iterable[int | None] = ()) -> tuple[IkeDaemon, ...]:
    """The daemons that may own what the markers call charon's, besides ours (pids in EXCLUDE)."""
    skip = set(exclude)
    return tuple(d for d in daemons if d.pid not in skip)


def describe_all(daemons: Iterable[IkeDaemon]) -> str:
    return ", ".join(f"{d.describe()} ({d.exe or 'exe unknown'}, uid {d.uid}, holds {d.holds()})"
                     for d in daemons)


# --- reading /proc -------------------------------------------------------------------------


def _read(path: str) -> str | None:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return None


def _status_fields(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def _sockets_of_namespace(pid: int, proc: str) -> tuple[set[int], dict[int, int]] | None:
    """(XFRM netlink socket inodes, UDP socket inode -> IKE port) of PID's network namespace;
    None when PID is gone meanwhile."""
    base = os.path.join(proc, str(pid), "net")
    text = _read(os.path.join(base, "netlink"))
    if text is None:
        return None
    # port id 0: the kernel's own end of the protocol, held by no process
    xfrm = {s.inode for s in parse_proc_netlink(text) if s.protocol == NETLINK_XFRM and s.port_id != 0}
    udp: dict[int, int] = {}
    for table in ("udp", "udp6"):
        text = _read(os.path.join(base, table))
        if text:        # no udp6 table without IPv6
            udp.update({inode: port for port, inode in parse_proc_udp(text) if port in IKE_PORTS})
    return xfrm, udp


def _facts(pid: int, proc: str, inodes: frozenset[int], xfrm: set[int], udp: dict[int, int],
           user_ns: int | None) -> ProcessFacts | None:
    """What /proc says about PID; None when it holds no IKE socket (the rest is not read) or is gone."""
    d = os.path.join(proc, str(pid))
    xfrm_sockets = len(inodes & xfrm)
    ike_ports = tuple(sorted({udp[i] for i in inodes if i in udp}))
    if not xfrm_sockets and not ike_ports:
        return None
    stat = _read(os.path.join(d, "stat"))
    status = _read(os.path.join(d, "status"))
    if stat is None or status is None:
        return None         # gone meanwhile
    rest = stat[stat.rfind(")") + 2:].split()       # after "pid (comm) ": field 3 onwards
    try:
        ppid, start_time = int(rest[1]), int(rest[19])
        fields = _status_fields(status)
        uid = int(fields["Uid"].split()[1])
        cap_eff = int(fields.get("CapEff", "0"), 16)
    except (IndexError, KeyError, ValueError):
        return None
    exe: str | None = None
    exe_id: tuple[int, int] | None = None
    try:
        exe = printable(os.readlink(os.path.join(d, "exe")))
        st = os.stat(os.path.join(d, "exe"))
        exe_id = (st.st_dev, st.st_ino)
    except OSError:
        pass            # a kernel thread, a zombie, or gone meanwhile: never our binary
    try:
        same_user_ns = user_ns is not None and os.stat(os.path.join(d, "ns", "user")).st_ino == user_ns
    except OSError:
        same_user_ns = False
    name = printable((_read(os.path.join(d, "comm")) or "?").strip())     # any user names its processes
    argv = tuple((_read(os.path.join(d, "cmdline")) or "").split("\0")[:4])
    return ProcessFacts(pid=pid, ppid=ppid, name=name, exe=exe, exe_id=exe_id, uid=uid, argv=argv,
                        net_admin=same_user_ns and bool(cap_eff >> CAP_NET_ADMIN & 1),
                        start_time=start_time, xfrm_sockets=xfrm_sockets, ike_ports=ike_ports)


def detect(netns_inode: int, binaries: Iterable[str] = DEFAULT_DAEMON_BINARIES, *, proc: str = "/proc",
           self_pid: int | None = None) -> tuple[IkeDaemon, ...]:
    """The IKE daemons in the network namespace with NETNS_INODE, ours (BINARIES run as root) first."""
    me = os.getpid() if self_pid is None else self_pid
    wanted = [Binary.of(b) for b in binaries]
    interpreter = Binary.of(sys.executable).file_id
    try:
        user_ns: int | None = os.stat(os.path.join(proc, str(me), "ns", "user")).st_ino
    except OSError:
        user_ns = None
    members = []
    for entry in os.listdir(proc):
        if not entry.isdigit():
            continue
        try:
            if os.stat(os.path.join(proc, entry, "ns", "net")).st_ino == netns_inode:
                members.append(int(entry))
        except OSError:
            continue        # gone meanwhile, or a kernel thread without access
    tables = None
    found: list = []
    seen: set[int] = set()
    for pid in members:
        if tables is None:
            try:
                tables = _sockets_of_namespace(pid, proc)
            except ValueError as exc:
                raise DetectionError(f"cannot tell which IKE daemons run in network namespace inode "
                                     f"{netns_inode}: {exc}") from None
            if tables is None:
                continue
            if not tables[0] and not tables[1]:
                return ()       # nobody holds an IKE socket here
        try:
            inodes = socket_inodes(pid, proc)
        except LedgerError:
            continue        # gone meanwhile (or not ours to inspect: see below)
        seen |= inodes
        facts = _facts(pid, proc, inodes, *tables, user_ns)
        if facts is None:
            continue
        daemon = classify(facts, wanted, self_pid=me, interpreter=interpreter)
        if daemon is not None:
            found.append(daemon)
    found.sort(key=lambda d: (not d.ours, d.pid))
    if tables is not None:
        unseen = (set(tables[0]) | set(tables[1])) - seen
        if unseen:
            unseen -= _held_outside(proc, unseen, members)
        if unseen:
            # Under the hardened unit (three capabilities, no CAP_SYS_PTRACE) the /proc entries of
            # a more privileged process (NetworkManager's charon-nm, pluto) cannot be read: its
            # sockets are there, its name is not. It counts as another IKE daemon all the same.
            found.append(Undetected(f"{len(unseen)} IKE socket(s) in this namespace held by a process "
                                    "whose /proc entries cannot be read"))
    return tuple(found)


def _held_outside(proc: str, inodes: set[int], members: Sequence[int]) -> set[int]:
    """Those of INODES held by readable processes outside the namespace (a socket is where it was
    made: a test or a tool that entered the namespace for a moment holds one)."""
    held: set[int] = set()
    skip = set(members)
    for entry in os.listdir(proc):
        if not entry.isdigit() or int(entry) in skip:
            continue
        try:
            held |= socket_inodes(int(entry), proc) & inodes
        except LedgerError:
            continue
        if held == inodes:
            break
    return held
