"""Smoke test for the real-kernel VM tier: the guest kernel really has ESP."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.realkernel

SPI = "0xc1234567"


def test_esp_sa_can_be_added_listed_and_deleted_in_a_namespace(netns):
    netns.run(
        "ip", "xfrm", "state", "add",
        "src", "192.0.2.1", "dst", "192.0.2.2",
        "proto", "esp", "spi", SPI, "reqid", "1", "mode", "tunnel",
        "aead", "rfc4106(gcm(aes))", "0x" + "11" * 20, "128",
    )

    listed = netns.run("ip", "xfrm", "state", "list").stdout
    assert f"proto esp spi {SPI}" in listed
    assert "rfc4106(gcm(aes))" in listed

    netns.run("ip", "xfrm", "state", "delete", "src", "192.0.2.1", "dst", "192.0.2.2", "proto", "esp", "spi", SPI)
    assert netns.run("ip", "xfrm", "state", "list").stdout.strip() == ""


def test_ipv6_esp_sa_with_cbc_and_hmac_can_be_added(netns):
    netns.run(
        "ip", "xfrm", "state", "add",
        "src", "2001:db8::1", "dst", "2001:db8::2",
        "proto", "esp", "spi", SPI, "mode", "transport",
        "enc", "cbc(aes)", "0x" + "22" * 16,
        "auth-trunc", "hmac(sha256)", "0x" + "33" * 32, "128",
    )

    assert f"proto esp spi {SPI}" in netns.run("ip", "xfrm", "state", "list").stdout


CHARON = "/usr/lib/ipsec/charon"


def test_real_charon_starts_in_a_namespace_with_a_private_run(netns):
    # The tunnel tests run one charon per namespace; a private tmpfs on /run keeps
    # their pid files and control sockets apart. /proc/PID/root shows that tmpfs.
    proc = subprocess.Popen(
        ["ip", "netns", "exec", netns.name, "unshare", "-m", "sh", "-c",
         f"mount -t tmpfs tmpfs /run && exec {CHARON}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        run_dir = Path(f"/proc/{proc.pid}/root/run")
        pid_file = run_dir / "charon.pid"
        deadline = time.monotonic() + 30
        while not _has_content(pid_file):
            assert proc.poll() is None, f"charon exited {proc.returncode} before writing its pid file"
            assert time.monotonic() < deadline, "charon wrote no pid file within 30 s"
            time.sleep(0.1)

        assert int(pid_file.read_text()) == proc.pid
        assert (run_dir / "charon.vici").is_socket()
        assert not Path("/run/charon.pid").exists(), "charon's /run leaked out of its mount namespace"
    finally:
        proc.terminate()
        try:
            output, _ = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
    assert proc.returncode == 0, output
    assert "SIGTERM received, shutting down" in output


def _has_content(path: Path) -> bool:
    try:
        return path.read_text().strip() != ""
    except FileNotFoundError:
        return False
