"""May a starting supervisor take over the charon an earlier supervisor started? Facts, then one pure rule.

A supervisor killed by SIGKILL (the OOM killer, a bug, an admin) leaves its charon running. The next
supervisor re-attaches to it instead of starting a second one (which would take over the running
one's VICI socket, exit 66 and look like "a dead charon with leftovers") when everything says it is
the very process the earlier supervisor started: the ledger names its pid *and* its start time (a
reused pid has another), it runs the configured daemon binary as root in this network namespace, and
charon's pid file (if there is one) names the same pid. ``gather_facts`` reads /proc and the files;
``decide_reattach`` decides from those facts alone (tested by a table).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass

from .daemons import runs_file
from .daemon_record import DaemonRecord, DaemonRecordError, RecordedChoice, load_record, record_path
from .ledger import (HOW_ADDED, HOW_INHERITED, OWNER_DAEMON, Ledger, LedgerEntry, LedgerError, ledger_path,
                     load_ledger, resync_ledger, start_ledger)



@dataclass(frozen=True, slots=True)
class ProcessInfo:
    """What /proc says about one pid (None fields: unreadable)."""

    pid: int
    exe: str | None                     # the /proc/PID/exe link as read (" (deleted)" kept)
    exe_id: tuple[int, int] | None      # (st_dev, st_ino) of the running binary
    uid: int | None                     # effective uid
    start_time: int | None              # clock ticks after boot (/proc/PID/stat field 22)
    netns_inode: int | None
    zombie: bool = False


@dataclass(frozen=True, slots=True)
class ReattachFacts:
    """Everything ``decide_reattach`` looks at."""

    binary: str                             # the configured daemon binary, real path
    binary_id: tuple[int, int] | None       # its file identity (None: missing)
    netns_inode: int                        # this supervisor's network namespace
    ledger: Ledger | None                   # the earlier supervisor's ledger (None: none, or unusable)
    ledger_problem: str | None = None       # why there is no ledger, for the message
    process: ProcessInfo | None = None      # the process at the ledger's daemon pid (None: no such pid)
    pid_file: str | None = None             # charon's pid file (daemon.pid_file)
    pid_file_pid: int | None = None         # what it names (None: absent or not a pid)
    # The ledger names no daemon but a spawn had begun (spawn_tick): the processes of this namespace
    # started since then (read only in that case)
    spawned: tuple[ProcessInfo, ...] = ()


@dataclass(frozen=True, slots=True)
class ReattachDecision:
    attach: bool
    reason: str
    pid: int | None = None
    start_time: int | None = None
    loaded: bool = False                    # the earlier supervisor finished loading its configuration


def decide_reattach(f: ReattachFacts) -> ReattachDecision:
    """Re-attach only to the exact process the ledger names; every "no" says why (pure)."""
    led = f.ledger
    if led is None:
        return ReattachDecision(False, f"no usable ledger ({f.ledger_problem or 'none'})")
    if led.netns_inode is not None and led.netns_inode != f.netns_inode:
        return ReattachDecision(False, f"the ledger belongs to another network namespace (inode "
                                       f"{led.netns_inode}, this one {f.netns_inode})")
    pid = led.daemon_pid
    if pid is None:
        if led.spawn_tick is None:
            return ReattachDecision(False, "the ledger names no daemon (the earlier supervisor had none running)")
        return _just_spawned(f, led.spawn_tick)
    p = f.process
    if p is None or p.zombie:
        return ReattachDecision(False, f"pid {pid} of the ledger is not running")
    if p.netns_inode != f.netns_inode:
        return ReattachDecision(False, f"pid {pid} runs in another network namespace")
    if led.daemon_start_time is None:
        return ReattachDecision(False, f"the ledger has no start time for pid {pid}, so a reused pid cannot "
                                       "be told apart")
    if p.start_time != led.daemon_start_time:
        return ReattachDecision(False, f"pid {pid} was started at tick {p.start_time}, the ledger's daemon at "
                                       f"tick {led.daemon_start_time}: the pid was reused")
    if not runs_file(p.exe, p.exe_id, f.binary, f.binary_id):
        return ReattachDecision(False, f"pid {pid} runs {p.exe or 'an unknown program'}, not {f.binary}")
    if p.uid != 0:
        return ReattachDecision(False, f"pid {pid} runs as uid {p.uid}, not root")
    if f.pid_file_pid is not None and f.pid_file_pid != pid:
        return ReattachDecision(False, f"{f.pid_file} names pid {f.pid_file_pid}, the ledger pid {pid}")
    return ReattachDecision(True, f"pid {pid} is the {os.path.basename(f.binary)} the earlier supervisor "
                                  "started (ledger pid and start time, binary, root, this network namespace)",
                            pid, p.start_time, led.daemon_loaded)


def _just_spawned(f: ReattachFacts, tick: int) -> ReattachDecision:
    """The supervisor died between spawning the daemon and writing its pid down: the one process of
    the binary, as root, in this namespace, started since the spawn began, is that daemon."""
    found = [p for p in f.spawned if not p.zombie and p.netns_inode == f.netns_inode and p.uid == 0
             and p.start_time is not None and p.start_time >= tick
             and runs_file(p.exe, p.exe_id, f.binary, f.binary_id)]
    if not found:
        return ReattachDecision(False, f"the earlier supervisor was spawning a daemon (tick {tick}); none runs")
    if len(found) > 1:
        return ReattachDecision(False, f"{len(found)} processes of {f.binary} started since the earlier "
                                       f"supervisor's spawn (tick {tick}): pids {', '.join(str(p.pid) for p in found)}")
    p = found[0]
    if f.pid_file_pid is not None and f.pid_file_pid != p.pid:
        return ReattachDecision(False, f"{f.pid_file} names pid {f.pid_file_pid}, not pid {p.pid} spawned "
                                       "by the earlier supervisor")
    return ReattachDecision(True, f"pid {p.pid} is the {os.path.basename(f.binary)} the earlier supervisor "
                                  f"was spawning when it died (started since tick {tick}, the only one; binary, "
                                  "root, this network namespace)", p.pid, p.start_time, False)


@dataclass(frozen=True, slots=True)
class Resume:
    """What a re-attaching supervisor does with the dead daemon's leftovers it inherits, and why."""

    adopt: bool                         # adopt them (resume the adoption, or begin it after the load)
    choice: RecordedChoice | None       # the choice they stay under, for the next successor (None: unknown)
    why: str
    recorded: bool                      # CHOICE is the one the earlier supervisor recorded
    left: int = 0                       # inherited leftovers it is about


def decide_resume(recorded: RecordedChoice | None, unrecorded_why: str | None, mode: str, *, fail_closed: bool,
                  left: int, adoption_open: bool, loaded: bool, ledger_current: bool) -> Resume:
    """Pure: the earlier supervisor's recorded choice (RECORDED) decides, not this one's recovery.MODE
    (a flush it chose, e.g. because this strongSwan cannot adopt, is never turned into an adoption;
    an adoption it began is finished even if MODE changed since). Without a record (UNRECORDED_WHY
    says why) the rule from before records: by MODE.

    LEFT: inherited leftovers in the taken-over ledger; ADOPTION_OPEN: an adoption deadline was
    recorded; LOADED: the running daemon's load finished; LEDGER_CURRENT: the ledger on disk was
    already the running daemon's (else still the crashed one's: everything it owned is inherited)."""
    if left == 0:
        return Resume(False, recorded, "nothing the dead daemon owned is left", recorded is not None, 0)
    if recorded is not None:
        r = recorded
        if r.action != "adopt":
            why = (f"the earlier supervisor chose {r.action} for the dead daemon's leftovers ({r.reason}); "
                   f"followed: the {left} left stay as they are, not adopted")
            if mode != r.mode:
                why += f" (this supervisor's recovery.mode is {mode})"
            return Resume(False, r, why, True, left)
        if adoption_open:
            why = f"the earlier supervisor's adoption of {left} leftover(s) was in progress: resumed"
            return Resume(True, r, why, True, left)
        if not loaded or not ledger_current:
            why = (f"the earlier supervisor chose adopt and died before its adoption began: {left} "
                   "leftover(s) adopted after the load")
            return Resume(True, r, why, True, left)
        why = f"the earlier supervisor's adoption had ended; the {left} leftover(s) it left undecided stay"
        return Resume(False, r, why, True, left)
    why = (f"no recovery choice recorded ({unrecorded_why or 'none was made'}); by this supervisor's "
           f"recovery.mode {mode}")
    adopt = (adoption_open or (mode == "adopt" and not loaded)) if ledger_current else mode == "adopt"
    if not adopt:
        return Resume(False, None, f"{why}: {left} leftover(s) not adopted", False, left)
    return Resume(True, RecordedChoice("adopt", fail_closed, f"resumed by a successor: {why}", mode),
                  f"{why}: {left} leftover(s) adopted", False, left)


@dataclass(frozen=True)
class Takeover:
    """The ledger a re-attaching supervisor goes on with, and what becomes of the inherited leftovers."""

    ledger: Ledger | None
    resume: Resume
    how: str                # for the log: "taken over", ...

    @property
    def resume_adoption(self) -> bool:
        return self.resume.adopt


ALL_STALE = frozenset(("xfrm_sa", "xfrm_policy", "route", "rule", "address"))


def _inherited(ledger: Ledger) -> int:
    return sum(1 for family in ledger.entries.values() for e in family.values()
               if e.owner == OWNER_DAEMON and e.how == HOW_INHERITED)


def take_over(prior: Ledger | None, record: DaemonRecord | None, pid: int, start_time: int | None,
              state, now: float, *, mode: str, fail_closed: bool = False, recorded: RecordedChoice | None = None,
              unrecorded_why: str | None = None, daemon_since: float | None = None) -> Takeover:
    """Pure: the running daemon PID's ledger from the one on disk (PRIOR) and the kernel now (STATE,
    None: unreadable). The ledger is written beside the restart, so it may still be the crashed
    predecessor's: then what that one owned is carried over as inherited (the leftovers the dead
    supervisor was recovering); the rest is baseline. Whether the inherited are adopted:
    ``decide_resume`` (RECORDED: the dead supervisor's choice; MODE, FAIL_CLOSED: this one's).

    DAEMON_SINCE: when PID started (wall clock). A leftover policy the kernel replaced since PRIOR
    recorded it, and inserted since then, is PID's: the running charon installed it again while no
    supervisor watched (policy_update replaces one of the same key at its load), and the dead
    supervisor's ledger never saw it (reinstalled_since)."""
    def resume(ledger: Ledger, *, current: bool, loaded: bool) -> Resume:
        adopting = (record.adoption_deadline if record is not None else prior.adoption_deadline) is not None
        return decide_resume(recorded, unrecorded_why, mode, fail_closed=fail_closed, left=_inherited(ledger),
                             adoption_open=adopting, loaded=loaded, ledger_current=current)
    if prior is None:
        return Takeover(None, Resume(False, recorded, "no usable ledger: nothing to adopt by", recorded is not None),
                        "unusable, ownership by markers")
    if prior.daemon_pid is None or (prior.daemon_pid, prior.daemon_start_time) == (pid, start_time):
        ledger = resync_ledger(prior, state.objects) if state is not None else \
            dataclasses.replace(prior, stale=ALL_STALE)
        ledger = reinstalled_since(ledger, prior, daemon_since)
        # Killed before PID's load finished (a paced start load takes minutes at scale): the adoption,
        # which begins after the load, has no deadline yet, but the inherited leftovers wait for it.
        loaded = record.daemon_loaded if record is not None else prior.daemon_loaded
        return Takeover(dataclasses.replace(ledger, daemon_pid=pid, daemon_start_time=start_time),
                        resume(ledger, current=True, loaded=loaded), "taken over")
    if state is None:
        return Takeover(None, Resume(False, recorded, "no usable ledger: nothing to adopt by", recorded is not None),
                        f"still the crashed pid {prior.daemon_pid}'s and the kernel unreadable: ownership by markers")
    ledger = dataclasses.replace(start_ledger(state, pid, inherited=prior, now=now), daemon_start_time=start_time)
    ledger = reinstalled_since(ledger, prior, daemon_since)
    loaded = record.daemon_loaded if record is not None else False
    return Takeover(ledger, resume(ledger, current=False, loaded=loaded),
                    f"still the crashed pid {prior.daemon_pid}'s (this daemon's was not written yet): what that "
                    "one owned is carried over")


def recorded_choice(record: DaemonRecord | None, record_problem: str | None, pid: int,
                    start_time: int | None) -> tuple[RecordedChoice | None, str | None]:
    """Pure: the recovery choice the daemon record holds for the run of PID, or None and why not. The
    choice is written before the spawn, so a record of PID's spawn (no pid yet, the tick before
    PID's start) holds it too."""
    if record is None:
        return None, record_problem or "no daemon record"
    if record.daemon_pid is None:
        if record.spawn_tick is None or start_time is None or start_time < record.spawn_tick:
            return None, f"the daemon record is not of pid {pid}'s run (it names no daemon and no spawn before it)"
    elif record.daemon_pid != pid:
        return None, f"the daemon record names pid {record.daemon_pid}, not {pid}"
    if record.recovery is None:
        return None, record.recovery_problem
    return record.recovery, None


def reinstalled_since(ledger: Ledger, prior: Ledger, since: float | None) -> Ledger:
    """Pure: LEDGER with every inherited XFRM policy that the kernel replaced since PRIOR (the ledger on
    disk) recorded it, at or after SINCE (the running daemon's start, wall clock; None: unknown,
    nothing changes), counted as the running daemon's.

    An adoption resumed by a re-attaching supervisor would otherwise sweep, at its grace's end, the
    very policies the running charon installed again at its load (trap policies: charon never
    reports them as a CHILD_SA) before the dead supervisor's ledger recorded that. A replaced policy
    has another index and the add_time of its insertion (whole seconds: the second the daemon
    started counts; a leftover the ledger holds as it is, e.g. of a child no longer configured,
    stays the dead daemon's)."""
    if since is None or "xfrm_policy" not in ledger.entries:
        return ledger
    floor = int(since)
    before = prior.entries.get("xfrm_policy", {})
    changed = {}
    for key, e in ledger.entries["xfrm_policy"].items():
        if e.owner != OWNER_DAEMON or e.how != HOW_INHERITED or e.record.curlft.add_time < floor:
            continue
        old = before.get(key)
        if old is not None and (old.record.index, old.record.curlft.add_time) != (e.record.index,
                                                                                e.record.curlft.add_time):
            changed[key] = LedgerEntry(OWNER_DAEMON, HOW_ADDED, 0, e.record)
    if not changed:
        return ledger
    return dataclasses.replace(ledger, entries={**ledger.entries,
                                                "xfrm_policy": {**ledger.entries["xfrm_policy"], **changed}})


def boot_tick(proc: str = "/proc") -> int | None:
    """Now, in the clock ticks after boot that /proc/PID/stat's start times count."""
    text = _read(f"{proc}/uptime")
    try:
        return int(float(text.split()[0]) * os.sysconf("SC_CLK_TCK"))
    except (AttributeError, IndexError, ValueError):
        return None


def processes_since(tick: int, netns_inode: int, proc: str = "/proc") -> tuple[ProcessInfo, ...]:
    """The processes of network namespace NETNS_INODE started at or after TICK."""
    out = []
    for entry in os.listdir(proc):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"{proc}/{entry}/ns/net").st_ino != netns_inode:
                continue
        except OSError:
            continue
        start = process_start_time(int(entry), proc)
        if start is None or start < tick:
            continue
        info = process_info(int(entry), proc)
        if info is not None:
            out.append(info)
    return tuple(out)


# --- reading ---------------------------------------------------------------------------------


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read()
    except OSError:
        return None


def stat_fields(pid: int, proc: str = "/proc") -> list[str] | None:
    """/proc/PID/stat from field 3 (state) on; None if there is no such process."""
    text = _read(f"{proc}/{pid}/stat")
    if not text or ")" not in text:
        return None
    return text[text.rfind(")") + 2:].split()


def process_start_time(pid: int, proc: str = "/proc") -> int | None:
    """PID's start time in clock ticks after boot (what makes a pid unique over time)."""
    fields = stat_fields(pid, proc)
    try:
        return int(fields[19]) if fields else None
    except (IndexError, ValueError):
        return None


def seconds_since_start(start_time: int, proc: str = "/proc") -> float | None:
    """How long a process started at START_TIME ticks after boot has been running."""
    text = _read(f"{proc}/uptime")
    try:
        return max(0.0, float(text.split()[0]) - start_time / os.sysconf("SC_CLK_TCK"))
    except (AttributeError, IndexError, ValueError):
        return None


def process_info(pid: int, proc: str = "/proc") -> ProcessInfo | None:
    fields = stat_fields(pid, proc)
    if fields is None:
        return None
    d = f"{proc}/{pid}"
    try:
        exe: str | None = os.readlink(f"{d}/exe")
        st = os.stat(f"{d}/exe")
        exe_id: tuple[int, int] | None = (st.st_dev, st.st_ino)
    except OSError:
        exe, exe_id = None, None
    uid = None
    for line in (_read(f"{d}/status") or "").splitlines():
        if line.startswith("Uid:"):
            try:
                uid = int(line.split()[2])
            except (IndexError, ValueError):
                pass
    try:
        netns = os.stat(f"{d}/ns/net").st_ino
    except OSError:
        netns = None
    try:
        start = int(fields[19])
    except (IndexError, ValueError):
        start = None
    return ProcessInfo(pid, exe, exe_id, uid, start, netns, zombie=fields[0] in ("Z", "X"))


def daemon_binary(argv0: str, path_env: str | None = None) -> tuple[str, tuple[int, int] | None]:
    """The configured daemon's real path and file identity."""
    found = argv0 if "/" in argv0 else shutil.which(argv0, path=path_env) or argv0
    real = os.path.realpath(found)
    try:
        st = os.stat(real)
        return real, (st.st_dev, st.st_ino)
    except OSError:
        return real, None


def _pid_in(path: str | None) -> int | None:
    if not path:
        return None
    text = _read(path)
    try:
        return int(text.strip()) if text else None
    except ValueError:
        return None


def with_record(ledger: Ledger | None, record: DaemonRecord | None) -> Ledger | None:
    """LEDGER with the daemon facts of RECORD, which is written at once and so never older (pure);
    a record without a ledger (its first write still pending) stands alone."""
    if record is None:
        return ledger
    base = ledger if ledger is not None else Ledger(daemon_pid=None, netns_inode=record.netns_inode, started=0.0)
    netns = record.netns_inode if record.netns_inode is not None else base.netns_inode
    return dataclasses.replace(base, netns_inode=netns, daemon_pid=record.daemon_pid,
                               daemon_start_time=record.daemon_start_time, spawn_tick=record.spawn_tick,
                               daemon_loaded=record.daemon_loaded, adoption_deadline=record.adoption_deadline)


def read_record(run_dir: str) -> tuple[DaemonRecord | None, str | None]:
    """The daemon record of RUN_DIR and, when there is none to use, why."""
    try:
        return load_record(record_path(run_dir)), None
    except FileNotFoundError:
        return None, f"no {record_path(run_dir)}"
    except DaemonRecordError as exc:
        return None, str(exc)


def gather_facts(config, *, path_env: str | None = None, proc: str = "/proc") -> ReattachFacts:
    """The facts about the charon an earlier supervisor (by its daemon record and ledger under
    paths.run_dir) left running."""
    binary, binary_id = daemon_binary(config.daemon.command[0], path_env)
    netns = os.stat(f"{proc}/thread-self/ns/net").st_ino
    path = ledger_path(config.paths.run_dir)
    ledger, problem = None, None
    if os.path.exists(path):
        try:
            ledger = load_ledger(path)
        except LedgerError as exc:
            problem = str(exc)
    else:
        problem = f"no {path}"
    record, record_problem = read_record(config.paths.run_dir)
    if record is not None:
        ledger = with_record(ledger, record)
    elif ledger is None:
        problem = f"{problem}; {record_problem}"
    process = process_info(ledger.daemon_pid, proc) if ledger is not None and ledger.daemon_pid else None
    spawned: tuple[ProcessInfo, ...] = ()
    if ledger is not None and ledger.daemon_pid is None and ledger.spawn_tick is not None:
        spawned = processes_since(ledger.spawn_tick, netns, proc)
    return ReattachFacts(binary, binary_id, netns, ledger, problem, process, config.daemon.pid_file,
                         _pid_in(config.daemon.pid_file), spawned)
