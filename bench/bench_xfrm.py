#!/usr/bin/env python3
"""How fast we read the SPD (or SAD) compared with iproute2, measured in the same run.

Run as root: ``.venv/bin/python bench/bench_xfrm.py`` (policies) or ``--sas``
(needs ESP, i.e. the real-kernel VM). The script makes its own network
namespace, installs the objects with ``ip -batch`` and removes the namespace.
Reported: best of --runs for ``ip xfrm policy list > /dev/null`` and for our
phases (netlink dump only, decode into records, to_json, json.dumps), and the
ratios against iproute2.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from supervisor.kernel import netns, xfrm  # noqa: E402

KEY_SHA256 = "0x" + "0102030405060708090a0b0c0d0e0f10" * 2
KEY_AES128 = "0x" + "1112131415161718191a1b1c1d1e1f20"


def policy_lines(tunnels: int) -> list[str]:
    """Three policies (out/in/fwd) per tunnel, shaped like charon's."""
    lines = []
    for i in range(tunnels):
        local, remote = f"10.{i >> 8 & 255}.{i & 255}.0/24", f"172.{16 + (i >> 16)}.{i >> 8 & 255}.{i & 255}/32"
        peer = f"192.0.{2 + (i >> 8) % 200}.{i & 255}"
        tmpl_out = f"tmpl src 198.51.100.1 dst {peer} proto esp reqid {i + 1} mode tunnel"
        tmpl_in = f"tmpl src {peer} dst 198.51.100.1 proto esp reqid {i + 1} mode tunnel"
        lines.append(f"xfrm policy add src {local} dst {remote} dir out priority 375423 {tmpl_out}")
        lines.append(f"xfrm policy add src {remote} dst {local} dir in priority 375423 {tmpl_in}")
        lines.append(f"xfrm policy add src {remote} dst {local} dir fwd priority 375423 {tmpl_in}")
    return lines


def sa_lines(count: int) -> list[str]:
    lines = []
    for i in range(count):
        peer = f"192.0.{2 + (i >> 8) % 200}.{i & 255}"
        src, dst = ("198.51.100.1", peer) if i % 2 else (peer, "198.51.100.1")
        lines.append(f"xfrm state add src {src} dst {dst} proto esp spi {0xC0000000 + i:#x} reqid {i // 2 + 1} "
                     f"mode tunnel replay-window 32 auth-trunc hmac(sha256) {KEY_SHA256} 128 "
                     f"enc cbc(aes) {KEY_AES128}")
    return lines


def best(fn, runs: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(runs):
        gc.collect()
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sas", action="store_true", help="benchmark SAs instead of policies (needs ESP)")
    parser.add_argument("--count", type=int, help="tunnels (policies = 3x; default 10000) or SAs (default 20000)")
    parser.add_argument("--runs", type=int, default=5, help="runs per measurement; the best counts")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_xfrm: needs root (creates a network namespace)", file=sys.stderr)
        return 4

    ns = f"ipsv-bench-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        if args.sas:
            subprocess.run(["ip", "netns", "exec", ns, "sh", "-c",
                            "modprobe -q esp4 2>/dev/null; modprobe -q xfrm_user 2>/dev/null; true"])
            count = args.count or 20000
            lines, what, kind = sa_lines(count), "state", "SAs"
        else:
            count = args.count or 10000
            lines, what, kind = policy_lines(count), "policy", "policies"
        with tempfile.NamedTemporaryFile("w", suffix=".batch") as batch:
            batch.write("\n".join(lines) + "\n")
            batch.flush()
            start = time.perf_counter()
            proc = subprocess.run(["ip", "-n", ns, "-batch", batch.name], capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"bench_xfrm: installing {kind} failed: {proc.stderr.strip()[:300]}"
                      + (" (SAs need ESP: run this in the real-kernel VM)" if args.sas else ""), file=sys.stderr)
                return 1
            install = time.perf_counter() - start
        print(f"installed {len(lines)} {kind} with ip -batch in {install:.2f}s; best of {args.runs} runs:")

        def ip_list():
            subprocess.run(["ip", "-n", ns, "xfrm", what, "list"], stdout=subprocess.DEVNULL, check=True)
        t_ip, _ = best(ip_list, args.runs)

        msg_type = xfrm.XFRM_MSG_GETSA if args.sas else xfrm.XFRM_MSG_GETPOLICY
        decode = xfrm.decode_sas if args.sas else xfrm.decode_policies
        dump = xfrm.dump_sas if args.sas else xfrm.dump_policies
        with netns.enter(ns), xfrm.open_socket() as sock:
            t_dump, chunks = best(lambda: sock.dump_raw(msg_type), args.runs)
            t_decode, records = best(lambda: decode(chunks), args.runs)
            t_both, _ = best(lambda: dump(sock), args.runs)
            t_json_plain, _ = best(lambda: [r.to_json() for r in records], args.runs)
            t_json, dicts = best(lambda: xfrm.to_json_all(records), args.runs)
            t_dumps, text = best(lambda: json.dumps(dicts), args.runs)
            t_all, _ = best(lambda: json.dumps(xfrm.to_json_all(dump(sock))), args.runs)
        assert len(records) == len(lines), (len(records), len(lines))

        rows = [
            (f"ip xfrm {what} list > /dev/null", t_ip),
            ("ours: netlink dump only (dump_raw)", t_dump),
            ("ours: decode into records", t_decode),
            (f"ours: dump_{'sas' if args.sas else 'policies'}() (dump + decode)", t_both),
            ("ours: [r.to_json() for r in records]", t_json_plain),
            ("ours: to_json_all(records) (same, collector paused)", t_json),
            (f"ours: json.dumps ({len(text) / 1e6:.1f} MB)", t_dumps),
            ("ours: dump + decode + to_json + json.dumps", t_all),
        ]
        for label, t in rows:
            print(f"  {label:<52} {t:8.3f}s  {t / t_ip:6.2f}x ip")
        print(f"ratio dump+decode / ip: {t_both / t_ip:.2f}  (goal <= 3)")
        print(f"ratio everything / ip:  {t_all / t_ip:.2f}")
        return 0
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


if __name__ == "__main__":
    sys.exit(main())
