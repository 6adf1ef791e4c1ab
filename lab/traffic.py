"""Traffic through the lab: pings at 5/s with per-packet outcomes, and a plaintext capture.

Both are plain iputils ``ping`` and ``tcpdump`` processes (cheap in the emulated VM); their
text output is parsed afterwards by pure functions.  Any ICMP between the two sides' inner
subnets seen leaving an outer interface is plaintext: protected packets leave as ESP.
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from dataclasses import dataclass

from .topology import OUTER_IF, LabError, in_netns

PING_INTERVAL = 0.2   # 5 pings per second


@dataclass(frozen=True, slots=True)
class PingResult:
    """What one ping run saw; times are wall-clock seconds (time.time())."""

    target: str
    interval: float
    sent: int
    answered: frozenset[int]           # icmp_seq values that got a reply
    sent_at: dict                      # icmp_seq -> estimated send time
    first_sent_at: float | None
    stopped_at: float | None = None    # when ping was stopped; later replies could not be seen

    @property
    def lost(self) -> tuple[int, ...]:
        """Unanswered pings, except those still in flight when ping was stopped (sent < 1 s before)."""
        cutoff = float("inf") if self.stopped_at is None else self.stopped_at - 1.0
        return tuple(s for s in range(1, self.sent + 1)
                     if s not in self.answered and self.sent_at.get(s, 0.0) < cutoff)

    def answered_after(self, seq: int) -> int:
        """How many pings sent after ``seq`` were answered."""
        return len([s for s in self.answered if s > seq])

    def lost_between(self, start: float, end: float = float("inf")) -> tuple[int, ...]:
        return tuple(s for s in self.lost if start <= self.sent_at.get(s, 0.0) < end)

    def outages(self) -> list[tuple[float, float, int]]:
        """Runs of consecutive lost pings: (first lost send time, last lost send time, count)."""
        runs: list[list[int]] = []
        for s in self.lost:
            if runs and s == runs[-1][-1] + 1:
                runs[-1].append(s)
            else:
                runs.append([s])
        return [(self.sent_at.get(r[0], 0.0), self.sent_at.get(r[-1], 0.0), len(r)) for r in runs]

    def longest_outage_s(self) -> float:
        """Longest run of lost pings as time (count x interval); 0.0 without losses."""
        return max((n * self.interval for _, _, n in self.outages()), default=0.0)

    def last_answered_at(self) -> float | None:
        seqs = sorted(self.answered)
        return self.sent_at.get(seqs[-1]) if seqs else None


_REPLY = re.compile(r"^\[(\d+\.\d+)\] \d+ bytes from [^:]+: icmp_seq=(\d+) ")
_NO_ANSWER = re.compile(r"^\[(\d+\.\d+)\] no answer yet for icmp_seq=(\d+)")
_SUMMARY = re.compile(r"^(\d+) packets transmitted")
_RTT = re.compile(r"time=([\d.]+) ms")


def parse_ping(text: str, target: str = "?", interval: float = PING_INTERVAL,
               started_at: float | None = None, stopped_at: float | None = None) -> PingResult:
    """Parse the output of ``ping -D -O -i INTERVAL`` (possibly still running: no summary yet)."""
    answered: set[int] = set()
    seen: dict[int, float] = {}     # seq -> a send time estimate from a line about it
    sent = 0
    for line in text.splitlines():
        m = _REPLY.match(line)
        if m:
            seq, t = int(m.group(2)), float(m.group(1))
            answered.add(seq)
            rtt = _RTT.search(line)
            seen.setdefault(seq, t - (float(rtt.group(1)) / 1000 if rtt else 0.0))
            sent = max(sent, seq)
            continue
        m = _NO_ANSWER.match(line)
        if m:
            # Printed when the next ping goes out, one interval after this one was sent.
            seq = int(m.group(2))
            seen.setdefault(seq, float(m.group(1)) - interval)
            sent = max(sent, seq)
            continue
        m = _SUMMARY.match(line)
        if m:
            sent = max(sent, int(m.group(1)))
    sent_at = _fill_send_times(seen, sent, interval, started_at)
    first = sent_at.get(1)
    return PingResult(target, interval, sent, frozenset(answered), sent_at, first, stopped_at)


def _fill_send_times(seen: dict[int, float], sent: int, interval: float, started_at: float | None) -> dict:
    """Send time of every seq: known ones as seen, the others interpolated from the nearest known."""
    known = sorted(seen.items())
    if not known and started_at is not None:
        known = [(1, started_at)]
    out: dict[int, float] = {}
    j = 0
    for seq in range(1, sent + 1):
        if seq in seen:
            out[seq] = seen[seq]
            continue
        while j + 1 < len(known) and known[j + 1][0] <= seq:
            j += 1
        if known:
            ref_seq, ref_t = known[j]
            out[seq] = ref_t + (seq - ref_seq) * interval
    return out


class Pinger:
    """``ping`` from ``src`` to ``dst`` inside ``netns`` every 0.2 s until ``stop``."""

    def __init__(self, netns: str, src: str, dst: str, logfile: str, interval: float = PING_INTERVAL):
        self.netns, self.src, self.dst, self.logfile, self.interval = netns, src, dst, logfile, interval
        self.proc: subprocess.Popen | None = None
        self.started_at: float | None = None
        self.stopped_at: float | None = None
        self._fh = None

    def start(self) -> "Pinger":
        self._fh = open(self.logfile, "w")
        # -D: timestamps; -O: report each unanswered ping; -n: no DNS.
        argv = in_netns(self.netns, "ping", "-n", "-D", "-O", "-i", str(self.interval),
                        "-I", self.src, self.dst)
        self.started_at = time.time()
        self.proc = subprocess.Popen(argv, stdout=self._fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        return self

    def read(self) -> PingResult:
        """What ping has reported so far (it keeps running)."""
        with open(self.logfile, errors="replace") as fh:
            return parse_ping(fh.read(), self.dst, self.interval, self.started_at, self.stopped_at)

    def stop(self) -> PingResult:
        if self.proc and self.proc.poll() is None:
            self.stopped_at = time.time()
            self.proc.send_signal(signal.SIGINT)   # SIGINT: ping prints its summary
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._fh:
            self._fh.close()
            self._fh = None
        return self.read()


@dataclass(frozen=True, slots=True)
class CapturedPacket:
    at: float
    line: str


_TCPDUMP_LINE = re.compile(r"^(\d+\.\d+) (.*)$")


def parse_tcpdump(text: str) -> list[CapturedPacket]:
    """Packets from ``tcpdump -tt -n -l`` output (one line each)."""
    out = []
    for line in text.splitlines():
        m = _TCPDUMP_LINE.match(line)
        if m:
            out.append(CapturedPacket(float(m.group(1)), m.group(2)))
    return out


def plaintext_filter(nets_a: str, nets_b: str) -> str:
    """tcpdump filter: ICMP between the two sides' inner subnets (protected traffic is ESP)."""
    return (f"icmp and ((src net {nets_a} and dst net {nets_b}) or "
            f"(src net {nets_b} and dst net {nets_a}))")


class Tcpdump:
    """A tcpdump process inside ``netns`` writing one line per packet to ``logfile``.

    ``args``: interface, direction and filter (the filter last)."""

    def __init__(self, netns: str, logfile: str, args: list[str]):
        self.netns, self.logfile, self.args = netns, logfile, args
        self.proc: subprocess.Popen | None = None
        self._out = self._err = None

    def start(self, timeout: float = 60.0) -> "Tcpdump":
        """Start tcpdump and wait until it listens (its 'listening on' line)."""
        self._out = open(self.logfile, "w")
        self._err = open(self.logfile + ".err", "w+")
        # --immediate-mode -l: no buffering, so a stop right after the traffic loses nothing;
        # -Z root: keep writing our files.
        argv = in_netns(self.netns, "tcpdump", "-n", "-l", "-tt", "--immediate-mode", "-Z", "root", *self.args)
        self.proc = subprocess.Popen(argv, stdout=self._out, stderr=self._err, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._err.seek(0)
            if "listening on" in self._err.read():
                return self
            if self.proc.poll() is not None:
                self._err.seek(0)
                raise LabError(f"tcpdump in {self.netns} exited ({self.proc.returncode}): {self._err.read().strip()}")
            time.sleep(0.05)
        raise LabError(f"tcpdump in {self.netns} did not start listening within {timeout:.0f}s")

    def stop(self) -> list[CapturedPacket]:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for fh in (self._out, self._err):
            if fh:
                fh.close()
        self._out = self._err = None
        return self.read()

    def read(self) -> list[CapturedPacket]:
        try:
            with open(self.logfile, errors="replace") as fh:
                return parse_tcpdump(fh.read())
        except FileNotFoundError:
            return []

    def summary(self) -> str:
        """tcpdump's own counts (captured / dropped by kernel), from its exit message."""
        try:
            with open(self.logfile + ".err") as fh:
                return " ".join(l.strip() for l in fh if "packets" in l)
        except OSError:
            return ""


class Capture(Tcpdump):
    """Plaintext ICMP between the two sides' subnets leaving ``netns`` through ``interface``
    (-Q out: packets leaving only)."""

    def __init__(self, netns: str, nets_a: str, nets_b: str, logfile: str, interface: str = OUTER_IF):
        super().__init__(netns, logfile, ["-i", interface, "-Q", "out", plaintext_filter(nets_a, nets_b)])


class GuardLog(Tcpdump):
    """The packets a guard rule stopped: its NFLOG copies (``-j NFLOG --nflog-group N``), read by
    tcpdump on the ``nflog:N`` pseudo-interface.  The rule itself chooses the packets, so no
    filter; with ``--nflog-threshold 1`` each copy arrives at once, so its time is the packet's
    to within a few milliseconds."""

    def __init__(self, netns: str, group: int, logfile: str):
        super().__init__(netns, logfile, ["-i", f"nflog:{group}"])


def pings_until_answered(netns: str, pairs: list[tuple[str, str]], timeout: float = 60.0) -> None:
    """``ping_until_answered`` for each (src, dst) in turn, in one shell (one process start for all)."""
    tries = max(1, int(timeout))
    loops = "".join(f"i=0; until ping -n -c 1 -W 1 -I {src} {dst} >/dev/null 2>&1; do i=$((i+1)); "
                    f"[ $i -lt {tries} ] || {{ echo {dst}; exit 1; }}; done\n" for src, dst in pairs)
    proc = subprocess.run(in_netns(netns, "sh", "-c", loops), capture_output=True, text=True,
                          timeout=len(pairs) * (timeout * 2 + 30))
    if proc.returncode != 0:
        raise LabError(f"no answer from {proc.stdout.strip() or '?'} to pings from {netns} within about "
                       f"{timeout:.0f}s")


def ping_until_answered(netns: str, src: str, dst: str, timeout: float = 60.0) -> float:
    """One ping a second until one is answered (a trap tunnel needs a packet to come up); returns the wait."""
    t0 = time.monotonic()
    tries = max(1, int(timeout))
    # One shell for the whole loop: each process start is expensive in the emulated VM.
    script = (f"i=0; while [ $i -lt {tries} ]; do ping -n -c 1 -W 1 -I {src} {dst} >/dev/null 2>&1 && exit 0; "
              f"i=$((i+1)); done; exit 1")
    proc = subprocess.run(in_netns(netns, "sh", "-c", script), capture_output=True, timeout=timeout * 2 + 30)
    if proc.returncode != 0:
        raise LabError(f"no answer from {dst} to pings from {src} in {netns} within about {timeout:.0f}s")
    return time.monotonic() - t0
