"""The daemon's files in /run: derived paths, stale pid files and sockets removed, live ones never touched."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest

from supervisor import runfiles


@pytest.mark.parametrize("pid_file, starter, stroke", [
    ("/var/run/charon.pid", "/var/run/starter.charon.pid", "/var/run/charon.ctl"),   # strongSwan's names
    ("/run/x/fake.pid", "/run/x/starter.fake.pid", "/run/x/fake.ctl"),
    ("/run/x/daemon", "/run/x/starter.daemon", "/run/x/daemon.ctl"),
    (None, None, None),                                                          # charon-systemd: no pid file
])
def test_starter_pid_file_and_stroke_socket_sit_next_to_the_daemon_s_pid_file(pid_file, starter, stroke):
    assert runfiles.starter_pid_path(pid_file) == starter
    assert runfiles.stroke_socket_path(pid_file) == stroke


def _stale_socket(path: str) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()           # the file stays, nobody listens: what a crashed (or cleanly stopped) charon leaves


def test_stale_pid_file_and_sockets_go_and_what_is_not_a_socket_stays(tmp_path):
    pid_file, vici, ctl, other = (str(tmp_path / n) for n in ("charon.pid", "charon.vici", "charon.ctl", "x.txt"))
    dead = subprocess.Popen(["/bin/true"])
    dead.wait()
    (tmp_path / "charon.pid").write_text(f"{dead.pid}\n")
    _stale_socket(vici)
    _stale_socket(ctl)
    (tmp_path / "x.txt").write_text("not a socket")
    removed = runfiles.remove_stale_daemon_files(pid_file, other, "charon")   # vici_socket names a plain file
    assert sorted(os.listdir(tmp_path)) == ["charon.vici", "x.txt"]
    assert removed == [f"{pid_file} (pid {dead.pid} is not a running charon)", f"{ctl} (nobody listens on it)"]
    assert runfiles.remove_stale_daemon_files(pid_file, vici, "charon") == [f"{vici} (nobody listens on it)"]
    assert runfiles.remove_stale_daemon_files(pid_file, vici, "charon") == []    # nothing left: nothing to say


def test_a_live_daemon_s_files_and_a_listened_socket_are_never_removed(tmp_path):
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        pid_file, vici = str(tmp_path / "sleep.pid"), str(tmp_path / "sleep.vici")
        (tmp_path / "sleep.pid").write_text(f"{sleeper.pid}\n")
        _stale_socket(vici)
        assert runfiles.remove_stale_daemon_files(pid_file, vici, "sleep") == []     # its pid file: all its own
        assert os.path.exists(pid_file) and os.path.exists(vici)
        os.unlink(vici)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
            live.bind(vici)
            live.listen(1)
            assert runfiles.socket_listened(vici) is True
            # another program's pid in the file: stale for "charon", but the socket has a listener
            assert runfiles.remove_stale_daemon_files(pid_file, vici, "charon") == \
                [f"{pid_file} (pid {sleeper.pid} is not a running charon)"]
            assert os.path.exists(vici)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_starter_pid_file_names_us_and_is_removed_only_while_it_still_does(tmp_path):
    path = str(tmp_path / "starter.charon.pid")
    assert runfiles.claim_starter_pid(path, 4242) == path
    assert open(path).read() == "4242\n" and oct(os.stat(path).st_mode & 0o777) == "0o644"
    runfiles.release_starter_pid(path, 1234)             # another process's file now: left alone
    assert os.path.exists(path)
    runfiles.release_starter_pid(path, 4242)
    assert not os.path.exists(path)
    assert runfiles.claim_starter_pid(None, 4242) is None
    assert runfiles.claim_starter_pid(str(tmp_path / "no" / "dir" / "x.pid"), 4242) is None   # logged, not fatal


def test_lock_files_are_removed_by_their_holder_and_a_lock_on_a_removed_file_is_not_taken(tmp_path):
    from supervisor.runlock import release_at, try_lock_at
    from supervisor.trusted_paths import open_trusted_dir
    path = str(tmp_path / "supervisor.lock")
    with open_trusted_dir(str(tmp_path)) as run:
        fd = try_lock_at(run, "supervisor.lock")
        assert fd is not None and try_lock_at(run, "supervisor.lock") is None   # one holder at a time
        stale = os.open(path, os.O_RDWR)                 # a waiter that opened the file before it went
        release_at(str(tmp_path), "supervisor.lock", fd)
        assert not os.path.exists(path)                  # nothing stays in /run
        import fcntl
        fcntl.flock(stale, fcntl.LOCK_EX | fcntl.LOCK_NB)  # it gets the old inode's lock: worthless...
        fd2 = try_lock_at(run, "supervisor.lock")        # ...because the next one locks the file at PATH
        assert fd2 is not None and os.fstat(fd2).st_ino == os.stat(path).st_ino
        os.close(stale)
        release_at(str(tmp_path), "supervisor.lock", fd2)
