"""`make demo`: a two-namespace IPsec lab, kill -9 of the supervised charon, and the recovery report.

moon and sun each run Debian's charon; moon's runs under ``ipsec-supervisor run``.  Two
tunnels come up (moon initiates one and responds on the other), pings cross both at 5/s,
tcpdump watches for plaintext on the outer link, moon's charon gets ``kill -9``, and the
report shows what the supervisor did and what the traffic saw.  Everything is removed at
the end.  Without ESP in this machine's kernel the whole run happens in the real-kernel VM.

Usage (root, from the project directory): .venv/bin/python -m lab.demo [--mode adopt|flush|keep]
Exit codes: 0 done (report printed), 1 the lab failed, 4 not root, 5 tools missing,
and tools/vm-run's own codes (124 VM timeout, 125 VM set-up failed) when run in the VM.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lab.preflight import config_mode, esp_available, in_vm, missing_tools, recovery_settings  # noqa: E402

VM_TIMEOUT = 600


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="make demo", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", default="adopt", choices=("adopt", "flush", "keep"),
                    help="recovery.mode of moon's supervisor (default adopt, the product's default)")
    ap.add_argument("--where", choices=("auto", "here", "vm"), default="auto",
                    help="auto: here if this kernel has ESP, else in the real-kernel VM (default)")
    ap.add_argument("--keep-files", action="store_true",
                    help="keep the lab's work folder (configs, logs, captures) and print its path")
    args = ap.parse_args(argv)

    if os.geteuid() != 0:
        print("make demo: needs root (it creates network namespaces and runs charon)", file=sys.stderr)
        return 4
    missing = missing_tools()
    if missing:
        print("make demo: missing tools: " + "; ".join(missing) + ". Run `make setup` (tools/setup.sh) "
              "or install the packages named.", file=sys.stderr)
        return 5
    where = args.where
    if where == "auto":
        where = "here" if in_vm() or esp_available() else "vm"
    if where == "vm":
        return run_in_vm(args)
    return run_here(args)


def run_in_vm(args) -> int:
    """Re-run this demo inside tools/vm-run, streaming its output while the VM runs."""
    print("This machine's kernel has no ESP (`ip xfrm state add ... proto esp` is refused), so the lab "
          "runs inside the real-kernel VM: a Debian kernel with ESP booted by tools/vm-run (QEMU, "
          "emulated CPU: Python there is much slower than here). Boot takes a few seconds.", flush=True)
    argv = [os.path.join(ROOT, "tools", "vm-run"), "--timeout", str(VM_TIMEOUT), "--",
            ".venv/bin/python", "-m", "lab.demo", "--where", "here", "--mode", args.mode] + \
        (["--keep-files"] if args.keep_files else [])
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results_dir = None
    shown = 0
    err_lines: list[str] = []
    import threading

    def read_err():
        nonlocal results_dir
        for line in proc.stderr:
            err_lines.append(line)
            m = re.search(r"results in (\S+)", line)
            if m:
                results_dir = os.path.join(ROOT, m.group(1))
            if line.startswith("vm-run: ") and "its output follows" not in line:
                print(line.rstrip(), flush=True)

    t = threading.Thread(target=read_err, daemon=True)
    t.start()
    final_dump: list[str] = []
    out_reader = threading.Thread(target=lambda: final_dump.extend(proc.stdout), daemon=True)
    out_reader.start()
    try:
        while proc.poll() is None:
            shown = _show_new_output(results_dir, shown)
            time.sleep(0.5)
    except KeyboardInterrupt:
        # vm-run got the same SIGINT and stops the VM (and with it the whole lab).
        print("\nmake demo: interrupted; waiting for tools/vm-run to stop the VM", file=sys.stderr)
        proc.wait()
        return 130
    t.join(5)
    out_reader.join(5)
    shown = _show_new_output(results_dir, shown)
    if not shown and final_dump:
        # The live view did not work (no results dir seen): vm-run's own copy at the end.
        sys.stdout.write("".join(final_dump))
    rc = proc.returncode
    if rc not in (0, 1):
        sys.stderr.write("".join(l for l in err_lines if not l.startswith("vm-run: booting")))
    if results_dir:
        print(f"(VM run files: {os.path.relpath(results_dir, ROOT)})")
    return rc


def _show_new_output(results_dir: str | None, shown: int) -> int:
    """Print what the guest appended to its output.log since last time; returns the new offset."""
    if not results_dir:
        return shown
    try:
        with open(os.path.join(results_dir, "output.log"), "rb") as fh:
            fh.seek(shown)
            data = fh.read()
    except FileNotFoundError:
        return shown
    if data:
        # Only whole lines: the rest comes with the next read.
        cut = data.rfind(b"\n") + 1
        if cut:
            sys.stdout.write(data[:cut].decode(errors="replace"))
            sys.stdout.flush()
            return shown + cut
    return shown


def run_here(args) -> int:
    from lab.charon import LabSettings
    from lab.report import build_report, format_report
    from lab.scenario import Scenario, keep_workdir, run_crash
    from lab.topology import LabError, lab_namespaces_left

    t0 = time.monotonic()

    def say(msg: str) -> None:
        print(f"[{time.monotonic() - t0:6.1f}s] {msg}", flush=True)

    settings = LabSettings(recovery=demo_recovery_settings())
    sc = Scenario(moon="supervisor", mode=config_mode(args.mode), roles=("initiator", "responder"), settings=settings,
                  warmup=3.0, min_observe=8.0, settle=3.0, max_observe=150.0,
                  until_no_stale=args.mode in ("adopt", "flush"))
    workdir = tempfile.mkdtemp(prefix="ipsv-demo-")
    rc = 0
    try:
        out = run_crash(sc, workdir, say=say)
        print()
        print(format_report(build_report(out)), flush=True)
    except (LabError, OSError, subprocess.SubprocessError) as exc:
        print(f"make demo: the lab failed: {exc}", file=sys.stderr)
        rc = 1
    finally:
        left = lab_namespaces_left()
        if args.keep_files:
            print(f"lab files kept in {keep_workdir(workdir)}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
            print("(the lab's files, with the snapshot and crash report named above, went with it; "
                  "`make demo DEMO_ARGS=--keep-files` keeps them)")
    if left:
        print(f"make demo: namespaces left behind: {', '.join(left)}", file=sys.stderr)
        rc = rc or 1
    else:
        say("cleaned up: both namespaces, their processes and the lab's files are gone")
    return rc


def demo_recovery_settings() -> dict:
    """Short grace periods, so the demo shows the clean-up within its run (keys the config knows)."""
    return recovery_settings({"adopt_grace": "10s"})


if __name__ == "__main__":
    sys.exit(main())
