"""filemap: large regular files are read mapped under a read lease that keeps writers waiting until
the scope ends; everything else (small files, pipes, files a lease cannot be had on) is read as
before, with the same bytes. And the snapshot commands read the same things, mapped or not."""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import sys
import time

import pytest

from supervisor import snapshot
from supervisor.errors import SnapshotError
from supervisor.filemap import MappedFiles, mounted_filesystems, same_bytes

from test_snapshot_typed import CORRUPT, V2, _changed_copy  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _leases_on(path: str) -> list[str]:
    """The lines of /proc/locks that are leases on PATH's inode."""
    inode = os.stat(path).st_ino
    with open("/proc/locks") as fh:
        return [line for line in fh if "LEASE" in line and line.split()[5].endswith(f":{inode}")]


def _leases_enabled() -> bool:
    try:
        with open("/proc/sys/fs/leases-enable") as fh:
            return fh.read().strip() != "0"
    except OSError:
        return False


pytestmark = pytest.mark.skipif(not _leases_enabled(), reason="file leases are disabled (/proc/sys/fs/leases-enable)")


@pytest.fixture
def big(tmp_path) -> str:
    path = str(tmp_path / "big.bin")
    with open(path, "wb") as fh:
        fh.write(os.urandom(3 << 20))
    return path


def test_a_large_regular_file_is_mapped_under_a_lease_released_when_the_scope_ends(big):
    with open(big, "rb") as fh:
        expected = fh.read()
    with MappedFiles() as files:
        data = files.read(big)
        assert isinstance(data, mmap.mmap)
        assert data[:] == expected
        assert len(_leases_on(big)) == 1
    assert _leases_on(big) == []
    assert data[:] == expected          # the mapping outlives the lease


def test_small_files_pipes_and_missing_files_are_read_as_before(tmp_path):
    small = tmp_path / "small.json"
    small.write_bytes(b'{"a": 1}')
    r, w = os.pipe()
    os.write(w, b"piped bytes")
    os.close(w)
    with MappedFiles() as files:
        assert files.read(str(small)) == b'{"a": 1}'
        assert files.read(f"/proc/self/fd/{r}") == b"piped bytes"
        with pytest.raises(FileNotFoundError):
            files.read(str(tmp_path / "missing.json"))
    os.close(r)
    assert _leases_on(str(small)) == []


# The reader runs in a process of its own: were the lease's break announced by a signal that ends
# it (SIGIO, the default), that process dies, not the test run.
_READER = """
import os, subprocess, sys, time
from supervisor.filemap import MappedFiles
path = sys.argv[1]
with MappedFiles() as files:
    data = files.read(path)
    assert type(data).__name__ == "mmap", type(data)
    writer = subprocess.Popen([sys.executable, "-c", f"open({path!r}, 'wb').close()"])
    time.sleep(0.5)
    assert writer.poll() is None, "the truncation did not wait for the lease"
    assert len(data[:]) == 3 << 20          # every page still readable
assert writer.wait(timeout=30) == 0         # released at the scope's end, not at lease-break-time
print("ok", os.path.getsize(path))
"""


def test_a_writer_waits_for_the_scope_to_end_and_the_reader_is_not_hurt(big):
    """Truncating a mapped file would end the reader with SIGBUS: the lease holds the truncation back,
    and its break is announced by a signal the reader ignores."""
    out = subprocess.run([sys.executable, "-c", _READER, big], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, f"the reader ended with {out.returncode} (a negative number is a signal): {out.stderr}"
    assert out.stdout.split() == ["ok", "0"]


def test_a_file_on_a_filesystem_a_lease_does_not_cover_is_read_not_mapped(tmp_path):
    """overlayfs: its upper file is written past the merged one the lease is on. Mapped from nowhere
    but LEASED's local filesystems (here: a real overlay mount, in a mount namespace of its own)."""
    for d in ("lower", "upper", "work", "merged"):
        (tmp_path / d).mkdir()
    (tmp_path / "upper" / "big.bin").write_bytes(b"x" * (3 << 20))
    code = ("from supervisor.filemap import MappedFiles\n"
            f"with MappedFiles() as f: d = f.read({str(tmp_path / 'merged' / 'big.bin')!r})\n"
            "print(type(d).__name__, len(d))")
    mount = (f"mount -t overlay overlay -o lowerdir={tmp_path}/lower,upperdir={tmp_path}/upper,"
             f"workdir={tmp_path}/work {tmp_path}/merged")
    out = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                          f'{mount} || exit 99; exec "$0" -c "$1"', sys.executable, code],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    if out.returncode == 99:
        pytest.skip(f"no overlay mount here: {out.stderr.strip()}")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["bytes", str(3 << 20)]


def test_the_filesystem_types_come_from_mountinfo(tmp_path):
    info = tmp_path / "mountinfo"
    info.write_text("27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n"
                    "61 27 0:53 / /var/lib/x rw,relatime shared:30 master:2 - overlay overlay rw,lowerdir=/l\n"
                    "not a line of the format\n"
                    "62 27 0:54 / /srv/9p rw - 9p share rw\n")
    assert mounted_filesystems(str(info)) == {os.makedev(254, 0): "ext4", os.makedev(0, 53): "overlay",
                                              os.makedev(0, 54): "9p"}
    assert mounted_filesystems(str(tmp_path / "missing")) == {}


def test_a_file_someone_has_open_for_writing_is_read_not_mapped(big):
    with open(big, "ab"), MappedFiles() as files:
        data = files.read(big)
        assert isinstance(data, bytes) and len(data) == 3 << 20
        assert _leases_on(big) == []


def test_a_file_a_lease_cannot_be_had_on_is_read_not_mapped(big):
    """Neither its owner nor allowed to lease what it does not own (no CAP_LEASE): the lease is
    refused, the file is read."""
    os.chown(big, 65534, 65534)
    code = (f"from supervisor.filemap import MappedFiles\nwith MappedFiles() as f: d = f.read({big!r})\n"
            "print(type(d).__name__, len(d))")
    out = subprocess.run(["setpriv", "--bounding-set=-lease", "--inh-caps=-lease", sys.executable, "-c", code],
                         capture_output=True, text=True,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["bytes", str(3 << 20)]


def test_same_bytes_compares_any_buffers_from_their_offsets(big):
    with open(big, "rb") as fh:
        raw = fh.read()
    with MappedFiles() as files:
        mapped = files.read(big)
        assert same_bytes(mapped, 10, raw, 10, size=4096)
        assert same_bytes(b"xx" + raw, 12, mapped, 10)
        assert not same_bytes(mapped, 10, raw, 11)             # other lengths
        changed = bytearray(raw)
        changed[(3 << 20) - 1] ^= 1
        assert not same_bytes(mapped, 0, bytes(changed), 0, size=4096)


# --- the snapshot readers: mapped or read, the same results and the same errors -----------------

def _outcome(call, *args, **kwargs):
    try:
        return "ok", call(*args, **kwargs)
    except SnapshotError as exc:
        return "error", str(exc)


def _documents(tmp_path) -> dict[str, str]:
    with open(V2) as fh:
        text = fh.read()
    doc = json.loads(text)
    files = {"v2": V2, "changed": _changed_copy(tmp_path)}
    for what, edit, _ in CORRUPT[:6]:
        bad = json.loads(text)
        edit(bad)
        files[what] = str(tmp_path / f"corrupt-{len(files)}.json")
        with open(files[what], "w") as fh:
            json.dump(bad, fh)
    for name, data in (("truncated", text[:len(text) // 2]), ("blank", " \n" * 1000), ("indented", "\n \t" + text),
                       ("other head", json.dumps({**doc, "host": "elsewhere"}, indent=1))):
        files[name] = str(tmp_path / f"{name.replace(' ', '-')}.json")
        with open(files[name], "w") as fh:
            fh.write(data)
    return files


def test_show_show_json_and_diff_read_the_same_mapped_as_read(tmp_path):
    docs = _documents(tmp_path)
    with MappedFiles(min_size=1) as files:     # (a file may begin with white space: only all of it is empty)
        assert _outcome(snapshot.describe_snapshot, docs["indented"], files=files)[0] == "ok"
    for name, path in docs.items():
        with MappedFiles(min_size=1) as files:
            assert isinstance(files.read(path), mmap.mmap), name
            mapped = _outcome(snapshot.describe_snapshot, path, files=files)
            assert mapped == _outcome(snapshot.describe_snapshot, path), name
            assert repr(_outcome(snapshot.load_for_json, path, files=files)) == \
                repr(_outcome(snapshot.load_for_json, path)), name
    pairs = [("v2", "changed"), ("changed", "v2"), ("v2", "v2"), ("v2", "other head"), ("other head", "v2")]
    pairs += [("v2", name) for name in docs if name not in ("v2", "changed")]
    pairs += [(name, "v2") for name in docs if name not in ("v2", "changed")]
    for a, b in pairs:
        with MappedFiles(min_size=1) as files:
            assert _outcome(snapshot.diff_snapshot_files, docs[a], docs[b], files=files) == \
                _outcome(snapshot.diff_snapshot_files, docs[a], docs[b]), (a, b)


@pytest.mark.parametrize("command", [["show", "A"], ["show", "--json", "A"], ["diff", "A", "FEW"]])
def test_the_lease_ends_before_the_output_a_slow_reader_holds(tmp_path, command):
    """`snapshot show big.json | less`: the command may wait on its output for long, and a writer
    of the file must not wait with it (the lease covers the reading, not the printing)."""
    from test_snapshot_describe import _many
    files = {"A": str(tmp_path / "many.json"), "FEW": str(tmp_path / "few.json")}
    for name, count in (("A", 3000), ("FEW", 1)):
        with open(files[name], "w") as fh:
            json.dump(_many(count), fh)
    path = files["A"]
    assert os.path.getsize(path) > 1 << 20      # mapped
    argv = [sys.executable, "-c", "import sys; from supervisor.cli import main; sys.exit(main())", "snapshot",
            *[files.get(word, word) for word in command]]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not _waits_on_its_output(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _waits_on_its_output(proc.pid), "the command never filled its output pipe"
        assert not [line for line in _leases_on(path) if line.split()[4] == str(proc.pid)]
        subprocess.run([sys.executable, "-c", f"open({path!r}, 'wb').close()"], timeout=20, check=True)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, err
    assert len(out) > 1 << 16


def _waits_on_its_output(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/wchan") as fh:
            return "pipe_write" in fh.read()
    except FileNotFoundError:
        return False
