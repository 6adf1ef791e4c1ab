"""What the lab needs from this machine, asked before building anything."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import uuid

# tool -> Debian package that provides it
TOOLS = {
    "ip": "iproute2",
    "ping": "iputils-ping",
    "tcpdump": "tcpdump",
    "iptables": "iptables",
    "nsenter": "util-linux",
    "unshare": "util-linux",
    "/usr/lib/ipsec/charon": "strongswan-charon",
    "/usr/lib/ipsec/starter": "strongswan-starter",
    "/usr/sbin/swanctl": "strongswan-swanctl",
}


def missing_tools() -> list[str]:
    """'tool (package)' for every tool the lab needs that is not installed."""
    out = []
    for tool, pkg in TOOLS.items():
        found = os.access(tool, os.X_OK) if tool.startswith("/") else shutil.which(tool)
        if not found:
            out.append(f"{tool} (Debian package {pkg})")
    return out


def in_vm() -> bool:
    """True inside the real-kernel VM (tools/vm-run sets IPSV_REALKERNEL=1)."""
    return os.environ.get("IPSV_REALKERNEL") == "1"


def esp_available() -> bool:
    """Can this kernel hold an ESP SA?  Tried in a throwaway namespace, never the host's."""
    name = f"ipsvlab-probe-{os.getpid()}-{uuid.uuid4().hex[:4]}"
    if subprocess.run(["ip", "netns", "add", name], capture_output=True).returncode != 0:
        return False
    try:
        proc = subprocess.run(
            ["ip", "-n", name, "xfrm", "state", "add", "src", "192.0.2.1", "dst", "192.0.2.2", "proto", "esp",
             "spi", "0x00000101", "mode", "tunnel", "aead", "rfc4106(gcm(aes))", "0x" + "11" * 20, "128"],
            capture_output=True)
        return proc.returncode == 0
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def supervisor_recovery_keys() -> set[str]:
    """Keys the installed supervisor accepts in its ``recovery`` section."""
    from supervisor import config
    return {f.name for f in dataclasses.fields(config.RecoveryConfig)}


def supervisor_modes() -> tuple[str, ...]:
    from supervisor import config
    return tuple(config.RECOVERY_MODES)


def config_mode(mode: str) -> str:
    """The recovery.mode value for ``mode``: 'keep' was called 'none' before the recovery modes landed."""
    modes = supervisor_modes()
    if mode == "keep" and "keep" not in modes and "none" in modes:
        return "none"
    return mode


def recovery_settings(wanted: dict) -> dict:
    """``wanted`` recovery keys, minus those this supervisor does not know yet."""
    known = supervisor_recovery_keys()
    return {k: v for k, v in wanted.items() if k in known}
