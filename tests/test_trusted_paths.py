"""Our directories and files are used only when nobody but root could have changed them (issue 11).

Each test plants what an unprivileged user could plant (a directory of theirs, a symlink, a
0777 state dir) and checks that the supervisor refuses it, names the path and the fix, and
never writes, truncates or deletes through it.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

from supervisor import crashreport
from supervisor.errors import ExitCode, UnsafePathError
from supervisor.frontend.lifecycle import open_log_sink
from supervisor.crash_snapshots import prune_snapshots
from supervisor.runlock import LOCK_NAME, find_lock_holder, lock_run_dir
from supervisor.trusted_paths import DirEntry, files_to_prune, open_own_subdir, open_trusted_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOBODY = 65534
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown to another user)")


def _mode(path: str) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@root_only
def test_a_run_dir_owned_by_another_user_is_refused_with_exit_10(tmp_path):
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    os.chown(run, NOBODY, NOBODY)
    with pytest.raises(UnsafePathError) as err:
        lock_run_dir(str(run))
    assert err.value.exit_code == ExitCode.UNSAFE_PATH == 10
    assert str(run) in str(err.value) and f"owned by uid {NOBODY}" in str(err.value)
    assert "chown root:root" in str(err.value)
    assert os.listdir(run) == []                       # no lock file created in it


def test_a_run_dir_that_is_a_symlink_is_refused_and_not_chmod_ed(tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o755)
    (tmp_path / "run").symlink_to(target)
    with pytest.raises(UnsafePathError, match="is a symlink"):
        lock_run_dir(str(tmp_path / "run"))
    assert _mode(str(target)) == 0o755 and os.listdir(target) == []


def test_a_group_writable_run_dir_is_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    os.chmod(run, 0o770)
    with pytest.raises(UnsafePathError, match=r"writable by its group \(mode 0770\)"):
        lock_run_dir(str(run))


def test_a_planted_lock_symlink_is_refused_and_its_target_not_truncated(tmp_path):
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (run / LOCK_NAME).symlink_to(victim)
    with pytest.raises(UnsafePathError, match="is a symlink"):
        lock_run_dir(str(run))
    assert victim.read_text() == "precious\n"


def test_a_hard_linked_lock_is_refused_and_not_truncated(tmp_path):
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    victim = run / "other"
    victim.write_text("precious\n")
    os.link(victim, run / LOCK_NAME)
    with pytest.raises(UnsafePathError, match="hard links"):
        lock_run_dir(str(run))
    assert victim.read_text() == "precious\n"


def test_missing_directories_are_created_0700_one_by_one_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        with open_own_subdir(str(tmp_path / "a" / "b" / "state" / "crashes")) as d:
            assert d.path.endswith("/crashes")
    finally:
        os.umask(old)
    for p in ("a", "a/b", "a/b/state", "a/b/state/crashes"):
        assert _mode(str(tmp_path / p)) == 0o700, p


def test_a_parent_writable_by_others_without_sticky_bit_is_refused(tmp_path):
    parent = tmp_path / "shared"
    parent.mkdir()
    os.chmod(parent, 0o777)
    with pytest.raises(UnsafePathError, match=r"its parent .*shared is writable by its group and others without "
                                              r"the sticky bit"):
        open_trusted_dir(str(parent / "state"))
    assert os.listdir(parent) == []
    os.chmod(parent, 0o1777)                           # /tmp-like: our own directory in it is fine
    open_trusted_dir(str(parent / "state")).close()
    assert _mode(str(parent / "state")) == 0o700


def test_a_crashes_dir_swapped_for_a_symlink_is_neither_written_nor_pruned(tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    elsewhere = tmp_path / "root-only"
    elsewhere.mkdir(mode=0o700)
    for i in range(3):
        (elsewhere / f"2020010{i}T000000.000000Z-1-crash.json").write_text("{}")
    (state / "crashes").symlink_to(elsewhere)
    report = {"daemon": {"pid": 5}, "classification": "crash"}
    with pytest.raises(UnsafePathError, match="crashes: it is a symlink"):
        crashreport.write_crash_report(str(state / "crashes"), report, 1e9, keep=1)
    with pytest.raises(UnsafePathError):
        crashreport.prune_crash_reports(str(state / "crashes"), keep=0)
    assert len(os.listdir(elsewhere)) == 3


def test_pruning_skips_symlinks_and_never_deletes_their_targets(tmp_path, caplog):
    crashes = tmp_path / "state" / "crashes"
    victim = tmp_path / "victim.json"
    victim.write_text("{}")
    report = {"daemon": {"pid": 5}, "classification": "crash"}
    crashreport.write_crash_report(str(crashes), report, 1e9)
    (crashes / "19990101T000000.000000Z-1-crash.json").symlink_to(victim)   # sorts oldest
    for wall in (1e9 + 1, 1e9 + 2):
        crashreport.write_crash_report(str(crashes), report, wall, keep=2)
    names = sorted(os.listdir(crashes))
    assert victim.exists() and names[0].startswith("1999") and len(names) == 3    # link kept, 2 reports
    assert "not a regular file" in caplog.text
    assert [p for p, _ in crashreport.read_crash_reports(str(crashes))] == [str(crashes / n) for n in names[1:]]


def test_supervisor_log_symlink_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(os.path, "exists", lambda p, _e=os.path.exists: False if "journal" in p else _e(p))
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_text("x")
    (state / "supervisor.log").symlink_to(victim)
    with pytest.raises(UnsafePathError, match="supervisor.log: it is a symlink"):
        open_log_sink(str(state))
    assert victim.read_text() == "x"
    (state / "supervisor.log").unlink()
    sink = open_log_sink(str(state))
    os.close(sink.fd)
    assert _mode(str(state / "supervisor.log")) == 0o600


@pytest.mark.parametrize("sizes, keep, max_bytes, doomed", [
    ([10, 10, 10], None, 0, []),
    ([10, 10, 10], 2, 0, ["f0"]),
    ([10, 10, 10], None, 15, ["f0", "f1"]),           # oldest first until the rest fit
    ([10, 10, 10], None, 20, ["f0"]),
    ([10, 10, 100], None, 50, ["f0", "f1"]),          # the newest stays even when it alone is too big
    ([10, 10, 10], 2, 15, ["f0", "f1"]),              # count first, then size
], ids=["no-limits", "keep", "bytes", "bytes-exact", "newest-kept", "keep-and-bytes"])
def test_files_to_prune_keeps_count_and_total_size(sizes, keep, max_bytes, doomed):
    files = [DirEntry(f"f{i}", size, 0.0) for i, size in enumerate(sizes)]
    assert files_to_prune(files, keep=keep, max_bytes=max_bytes, now=0.0) == doomed


def test_snapshots_are_pruned_to_max_bytes(tmp_path):
    d = tmp_path / "snapshots"
    d.mkdir(mode=0o700)
    for i in range(5):
        (d / f"2026010{i}T000000.000000Z-1-crash.json").write_text("x" * 100)
    removed = prune_snapshots(str(d), keep=50, max_age=0, now=0.0, max_bytes=250)
    assert [os.path.basename(p) for p in removed] == [f"2026010{i}T000000.000000Z-1-crash.json" for i in range(3)]
    assert len(os.listdir(d)) == 2


def test_the_lock_decides_who_runs_not_the_argv(tmp_path):
    run = tmp_path / "run"
    assert not find_lock_holder(str(run)).held                    # no run dir at all
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, %r)\n"
        "from supervisor.runlock import lock_run_dir\n"
        "fd = lock_run_dir(%r); print('locked', flush=True); time.sleep(60)") % (ROOT, str(run))],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        found = find_lock_holder(str(run))
        assert found.held and found.pid == holder.pid
        assert (run / LOCK_NAME).read_text() == f"{holder.pid}\n"
        with pytest.raises(Exception, match=rf"another ipsec-supervisor is running \(pid {holder.pid}, "):
            lock_run_dir(str(run))
    finally:
        holder.kill()
        holder.wait()
    found = find_lock_holder(str(run))
    assert not found.held and found.pid is None                   # the lock file stays; nobody holds it


def test_lock_holder_in_an_unsafe_run_dir_is_an_error_not_an_answer(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    os.chmod(run, 0o777)
    with pytest.raises(UnsafePathError):
        find_lock_holder(str(run))


def test_run_refuses_an_unsafe_state_dir_with_exit_10(tmp_path):
    """End to end: `ipsec-supervisor run` with a 0777 state dir exits 10 naming it (before charon starts)."""
    state = tmp_path / "state"
    state.mkdir()
    os.chmod(state, 0o777)
    cfg = tmp_path / "s.yaml"
    cfg.write_text(json.dumps({"daemon": {"command": ["/bin/true"]},
                               "paths": {"run_dir": str(tmp_path / "run"), "state_dir": str(state)}}))
    r = subprocess.run([sys.executable, "-m", "supervisor.ipsec_cli", "--config", str(cfg), "start"],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 10, r.stderr
    assert f"paths.state_dir {state}: it is writable by its group and others" in r.stderr


# --- one instance per network namespace (issue 10 point 4) -----------------------------------

@pytest.mark.parametrize("inode, name, initial, instance", [
    (5, None, 5, None),                  # the initial namespace keeps the plain paths
    (5, "x", 5, None),                   # even when someone named it
    (6, "router1", 5, "router1"),        # named as `ip netns identify` says
    (6, None, 5, "inode-6"),             # unnamed: by inode
    (6, "../x", 5, "inode-6"),           # never a path
    (6, "router1", None, "router1"),     # pid 1's namespace unreadable (a container): named ones
    (6, None, None, None),               # ... and an unnamed one counts as initial
], ids=["initial", "initial-named", "named", "unnamed", "bad-name", "no-init-named", "no-init-unnamed"])
def test_netns_instance_names(inode, name, initial, instance):
    from supervisor.trusted_paths import netns_instance
    assert netns_instance(inode, name, initial) == instance


def test_default_paths_move_per_namespace_and_explicit_ones_stay():
    from supervisor.config import parse_config, per_netns_paths
    cfg = per_netns_paths(parse_config("", "x"), "router1")
    assert (cfg.paths.run_dir, cfg.paths.state_dir) == ("/run/ipsec-supervisor/netns/router1",
                                                        "/var/lib/ipsec-supervisor/netns/router1")
    assert cfg.crash_dir == "/var/lib/ipsec-supervisor/netns/router1/crashes"
    explicit = parse_config("paths:\n  run_dir: /run/r1\n", "x")
    cfg = per_netns_paths(explicit, "router1")
    assert (cfg.paths.run_dir, cfg.paths.state_dir) == ("/run/r1", "/var/lib/ipsec-supervisor/netns/router1")
    assert per_netns_paths(explicit, None) == explicit


@root_only
def test_two_namespaces_get_two_instances(tmp_path):
    names = [f"ipsvt-{os.getpid()}-tp{i}" for i in range(2)]
    code = ("import sys; sys.path.insert(0, %r)\n"
            "from supervisor.config import load_config\n"
            "c = load_config(%r); print(c.paths.run_dir, c.paths.state_dir)") % (ROOT, str(tmp_path / "none.yaml"))
    (tmp_path / "none.yaml").write_text("")
    try:
        seen = []
        for name in names:
            subprocess.run(["ip", "netns", "add", name], check=True)
            out = subprocess.run(["ip", "netns", "exec", name, sys.executable, "-c", code],
                                 capture_output=True, text=True, check=True).stdout.split()
            seen.append(out)
        assert seen == [[f"/run/ipsec-supervisor/netns/{n}", f"/var/lib/ipsec-supervisor/netns/{n}"] for n in names]
    finally:
        for name in names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def test_pruning_removes_only_files_the_supervisor_named(tmp_path):
    d = tmp_path / "snapshots"
    d.mkdir(mode=0o700)
    ours = [f"2026010{i}T000000.000000Z-1-crash.json" for i in range(3)]
    others = ["manual-20260101T000000Z.json", "notes.json", "2026-01-01.json"]
    for n in ours + others:
        (d / n).write_text("x" * 100)
    removed = prune_snapshots(str(d), keep=1, max_age=0, now=0.0, max_bytes=1)
    assert sorted(os.path.basename(p) for p in removed) == ours[:2]
    assert sorted(os.listdir(d)) == sorted([ours[2]] + others)


@root_only
def test_a_forged_ledger_never_makes_a_foreign_policy_charons(netns, tmp_path):
    """The issue's attack: another user's ledger.json (0644, netns_inode null) claimed a foreign policy."""
    import dataclasses

    from supervisor.kernel_state import ReadOptions, read_state
    from supervisor.ledger import HOW_ADDED, OWNER_DAEMON, Ledger, LedgerEntry, save_ledger
    netns.sh("ip xfrm policy add src 10.3.0.0/16 dst 10.4.0.0/16 dir out priority 1000 "
             "tmpl src 192.0.2.1 dst 192.0.2.3 proto esp reqid 3 mode tunnel")
    with netns.enter():
        state = read_state(ReadOptions())
    (policy,) = state.objects["xfrm_policy"]
    claim = {"xfrm_policy": {policy.key(): LedgerEntry(OWNER_DAEMON, HOW_ADDED, 4242, policy)}}
    forged = Ledger(daemon_pid=4242, netns_inode=None, started=0.0, entries=claim)

    def leftovers(path: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "supervisor.cli", "leftovers", "--netns", netns.name,
                               "--ledger", path, "--json"], capture_output=True, text=True, cwd=ROOT, timeout=60)

    path = str(tmp_path / "ledger.json")
    save_ledger(path, forged)
    os.chown(path, NOBODY, NOBODY)
    os.chmod(path, 0o644)
    r = leftovers(path)
    assert r.returncode == 1 and f"owned by uid {NOBODY}" in r.stderr and "--no-ledger" in r.stderr
    os.chown(path, 0, 0)                               # root's, but naming no namespace: still not trusted
    r = leftovers(path)
    assert r.returncode == 1 and "names no network namespace" in r.stderr
    save_ledger(path, dataclasses.replace(forged, netns_inode=state.netns.inode))    # control: a real ledger counts
    r = leftovers(path)
    assert r.returncode == 0, r.stderr
    # charon's by the ledger (and, having none of charon's markers, never deleted: issue 11 point 3)
    assert [o["rule"] for o in json.loads(r.stdout)["owned"]["xfrm_policy"]] == ["ledger:port-id-only"]
