#!/usr/bin/env python3
"""A fake IKE daemon for fast supervisor tests: pid file, a VICI `version` answer, scripted failures.

Usage: fake_ikd.py --pid-file P --vici S --plan PLAN.json --counter N.txt --events EV.jsonl

PLAN.json is {"runs": [behaviour, ...]}: the Nth start uses runs[N] (the last one repeats).
A behaviour is a dict of:
  start_delay   seconds before the pid file and socket appear          (0)
  pid_file      write the pid file                                      (true)
  vici          "answer" | "ignore" (accept, never answer) | "none"     ("answer")
  exit_after    seconds until exit with exit_code                       (never)
  exit_code     code for exit_after                                     (1)
  signal_after  seconds until it kills itself with `signal`             (never)
  signal        e.g. "SIGSEGV"                                          ("SIGSEGV")
  on_term       "exit" | "ignore" | an exit code, for SIGTERM/SIGINT    ("exit")
  ignore_abort  ignore SIGABRT (so only SIGKILL ends a hang)            (false)
  lines         lines printed to stdout at start, then to stderr: stderr_lines
Kernel state, like charon (netlink sockets opened once and held for the process's life):
  kernel        [[op, family, record JSON], ...] done before the pid file appears; op is
                "add" (EEXIST ignored, as charon does for routes and its rule), "update"
                (XFRM UPDPOLICY/UPDSA, route replace) or "delete"
  kernel_later  the same, done kernel_delay seconds (0.2) after the pid file appears
  commands      argv lists run as child processes after `kernel` (updown-style iptables)
VICI beyond `version` (streamed commands send their events, then the answer):
  vici_daemon   the daemon name `version` answers                       ("fake-ikd")
  vici_conns    list-conns: the list-conn event bodies                   ([])
  vici_sas      list-sas: the list-sa event bodies                       ([])
  vici_policies list-policies: the list-policy event bodies              ([])
  on_initiate   {"conn/child": {"kernel": [...], "sas": [list-sa bodies]}}: done when that
                child is initiated (answered at once, as VICI's timeout -1 does); its sas
                are added to what list-sas reports from then on
Every start, signal and VICI request is appended to EV.jsonl as one JSON object per line.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import struct
import sys
import threading
import time

def _fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


# What the process inherited (the supervisor must close everything but 0-2).
INHERITED_FDS = [fd for fd in range(3, 256) if _fd_is_open(fd)]

from vici.protocol import FiniteStream, Message, Packet  # noqa: E402  (the same encoder charon's clients use)

EVENTS_LOCK = threading.Lock()


def record(path: str, **event) -> None:
    event["t"] = time.monotonic()
    event["pid"] = os.getpid()
    with EVENTS_LOCK, open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(event) + "\n")


def _status_field(name: str) -> str:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(name + ":"):
                return line.split(":", 1)[1].strip()
    return ""


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Kernel:
    """The fake's netlink sockets, opened on first use and held open (attribution needs them)."""

    def __init__(self):
        sys.path.insert(0, ROOT)
        from supervisor.kernel import addresses, routes, rules, xfrm
        from supervisor.kernel.netlink import AlreadyExists
        from supervisor.kernel.rtnl import Rtnl
        from supervisor.kernel_state import FAMILIES
        self.families = FAMILIES
        self.exists = AlreadyExists
        self.xs, self.rtnl = xfrm.open_socket(), Rtnl()
        xs, rtnl = self.xs, self.rtnl
        self.ops = {
            ("add", "xfrm_policy"): lambda r: xfrm.add_policy(r, sock=xs),
            ("update", "xfrm_policy"): lambda r: xfrm.update_policy(r, sock=xs),
            ("delete", "xfrm_policy"): lambda r: xfrm.delete_policy(r, sock=xs),
            ("add", "xfrm_sa"): lambda r: xfrm.add_sa(r, sock=xs),
            ("update", "xfrm_sa"): lambda r: xfrm.update_sa(r, sock=xs),
            ("delete", "xfrm_sa"): lambda r: xfrm.delete_sa(r, sock=xs),
            ("add", "route"): lambda r: routes.add_route(r, rtnl=rtnl),
            ("update", "route"): lambda r: routes.add_route(r, rtnl=rtnl, replace=True),
            ("delete", "route"): lambda r: routes.delete_route(r, rtnl=rtnl),
            ("add", "rule"): lambda r: rules.add_rule(r, rtnl=rtnl),
            ("delete", "rule"): lambda r: rules.delete_rule(r, rtnl=rtnl),
            ("add", "address"): lambda r: addresses.add_address(r, rtnl=rtnl),
            ("delete", "address"): lambda r: addresses.delete_address(r, rtnl=rtnl),
        }

    def apply(self, steps, events: str) -> None:
        for op, family, doc in steps:
            obj = self.families[family].record_type.from_json(doc)
            try:
                self.ops[(op, family)](obj)
                result = "done"
            except Exception as exc:  # noqa: BLE001 - EEXIST is what charon ignores; the rest is fatal
                if not isinstance(exc, self.exists) and getattr(exc, "errno", None) != 17:
                    raise
                result = "exists"
            record(events, event="kernel", op=op, family=family, result=result)


_KERNEL: list = []


def kernel() -> Kernel:
    if not _KERNEL:
        _KERNEL.append(Kernel())
    return _KERNEL[0]


def _vici_packet(ptype: int, name: str | None = None, message: dict | None = None) -> bytes:
    body = bytes([ptype])
    if name is not None:
        body += bytes([len(name)]) + name.encode()
    if message is not None:
        body += Message.serialize(message)
    return struct.pack("!I", len(body)) + body


def serve_vici(path: str, mode: str, events: str, behaviour: dict | None = None) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(16)

    def handle(conn: socket.socket) -> None:
        with conn:
            buf = b""
            while True:
                while len(buf) < 4 or len(buf) < 4 + struct.unpack("!I", buf[:4])[0]:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                (length,) = struct.unpack("!I", buf[:4])
                packet, buf = buf[4:4 + length], buf[4 + length:]
                ptype, nlen = packet[0], packet[1]
                name = packet[2:2 + nlen].decode()
                args = {}
                if ptype == Packet.CMD_REQUEST and len(packet) > 2 + nlen:
                    args = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in
                            Message.deserialize(FiniteStream(packet[2 + nlen:])).items()}
                if ptype == Packet.CMD_REQUEST:
                    record(events, event="vici", command=name, mode=mode, **({"args": args} if args else {}))
                if mode == "ignore":
                    threading.Event().wait()  # accepted, never answered: a hung daemon
                conn.sendall(_vici_answer(ptype, name, args, b, events))

    b = behaviour or {}
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


_EXTRA_SAS: list = []


def _vici_answer(ptype: int, name: str, args: dict, b: dict, events: str) -> bytes:
    if ptype in (Packet.EVENT_REGISTER, Packet.EVENT_UNREGISTER):
        return _vici_packet(Packet.EVENT_CONFIRM)
    if ptype != Packet.CMD_REQUEST:
        return _vici_packet(Packet.CMD_UNKNOWN)
    if name == "version":
        return _vici_packet(Packet.CMD_RESPONSE, message={
            "daemon": b.get("vici_daemon", "fake-ikd"), "version": "5.9.8-fake", "sysname": "Linux",
            "release": "test", "machine": "x86_64"})
    if name == "list-conns":
        return b"".join(_vici_packet(Packet.EVENT, "list-conn", c) for c in b.get("vici_conns", [])) + \
            _vici_packet(Packet.CMD_RESPONSE, message={})
    if name == "list-sas":
        return b"".join(_vici_packet(Packet.EVENT, "list-sa", ike)
                        for ike in b.get("vici_sas", []) + _EXTRA_SAS) + _vici_packet(Packet.CMD_RESPONSE, message={})
    if name == "list-policies":
        return b"".join(_vici_packet(Packet.EVENT, "list-policy", p) for p in b.get("vici_policies", [])) + \
            _vici_packet(Packet.CMD_RESPONSE, message={})
    if name == "initiate":
        todo = b.get("on_initiate", {}).get(f"{args.get('ike')}/{args.get('child')}")
        if todo:
            kernel().apply(todo.get("kernel", []), events)
            _EXTRA_SAS.extend(todo.get("sas", []))
        return _vici_packet(Packet.CMD_RESPONSE, message={"success": "yes"})
    return _vici_packet(Packet.CMD_UNKNOWN)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pid-file", required=True)
    ap.add_argument("--vici", required=True)
    ap.add_argument("--plan", required=True)
    ap.add_argument("--counter", required=True)
    ap.add_argument("--events", required=True)
    args = ap.parse_args()

    try:
        with open(args.counter) as fh:
            n = int(fh.read().strip() or 0)
    except FileNotFoundError:
        n = 0
    with open(args.counter, "w") as fh:
        fh.write(str(n + 1))
    with open(args.plan) as fh:
        runs = json.load(fh)["runs"]
    b = runs[min(n, len(runs) - 1)]

    record(args.events, event="start", run=n, sid=os.getsid(0), pgid=os.getpgid(0),
           inherited_fds=INHERITED_FDS, sigblk=_status_field("SigBlk"), sigign=_status_field("SigIgn"),
           cwd=os.getcwd(), notify_socket=os.environ.get("NOTIFY_SOCKET"),
           extra_env=os.environ.get("FAKE_IKD_MARK"))

    def on_signal(signo, frame):
        name = signal.Signals(signo).name
        record(args.events, event="signal", signal=name)
        if signo in (signal.SIGTERM, signal.SIGINT):
            action = b.get("on_term", "exit")
            if action == "ignore":
                return
            os._exit(0 if action == "exit" else int(action))

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, on_signal)
    if b.get("ignore_abort"):
        signal.signal(signal.SIGABRT, signal.SIG_IGN)

    for line in b.get("lines", []):
        print(line, flush=True)
    for line in b.get("stderr_lines", []):
        print(line, file=sys.stderr, flush=True)

    if b.get("start_delay"):
        time.sleep(b["start_delay"])
    if b.get("kernel"):
        kernel().apply(b["kernel"], args.events)
    for argv in b.get("commands", []):
        import subprocess
        subprocess.run(argv, check=True)
        record(args.events, event="command", argv=argv)
    mode = b.get("vici", "answer")
    if mode != "none":
        threading.Thread(target=serve_vici, args=(args.vici, mode, args.events, b), daemon=True).start()
        deadline = time.monotonic() + 5
        while not os.path.exists(args.vici) and time.monotonic() < deadline:
            time.sleep(0.001)
    if b.get("pid_file", True):
        tmp = args.pid_file + ".tmp"
        with open(tmp, "w") as fh:
            fh.write(f"{os.getpid()}\n")
        os.rename(tmp, args.pid_file)

    if b.get("kernel_later"):
        def later():
            kernel().apply(b["kernel_later"], args.events)
            record(args.events, event="kernel_later_done")
        threading.Timer(b.get("kernel_delay", 0.2), later).start()

    if "exit_after" in b:
        def do_exit():
            record(args.events, event="exit", code=b.get("exit_code", 1))
            print(f"fake-ikd exiting with {b.get('exit_code', 1)}", flush=True)
            os._exit(b.get("exit_code", 1))
        threading.Timer(b["exit_after"], do_exit).start()
    if "signal_after" in b:
        def do_kill():
            sig = signal.Signals[b.get("signal", "SIGSEGV")]
            print(f"fake-ikd dying of {sig.name}", flush=True)
            os.kill(os.getpid(), sig)  # only signals without a handler here (SEGV, ABRT, KILL, ...)
        threading.Timer(b["signal_after"], do_kill).start()

    while True:
        signal.pause()


if __name__ == "__main__":
    main()
