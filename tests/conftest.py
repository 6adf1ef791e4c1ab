"""Shared fixtures: fresh network namespaces, always removed."""

from __future__ import annotations

import os
import subprocess
import uuid

import pytest

from supervisor.kernel import netns as netns_mod


def _run(*argv: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    if ns is not None:
        argv = ("ip", "netns", "exec", ns) + argv
    return subprocess.run(argv, check=check, capture_output=True, text=True)


class Netns:
    """A network namespace made for one test; ``run`` executes a command in it."""

    def __init__(self, name: str):
        self.name = name

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        return _run(*argv, ns=self.name, check=check)

    def sh(self, script: str, check: bool = True) -> subprocess.CompletedProcess:
        return _run("sh", "-ec", script, ns=self.name, check=check)

    def enter(self):
        """Context manager: this thread inside the namespace (sockets opened there stay there)."""
        return netns_mod.enter(self.name)


def make_netns_name(prefix: str = "ipsvt") -> str:
    return f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@pytest.fixture
def netns():
    """A fresh network namespace with lo up; removed after the test whatever happens."""
    name = make_netns_name()
    _run("ip", "netns", "add", name)
    try:
        _run("ip", "link", "set", "lo", "up", ns=name)
        yield Netns(name)
    finally:
        _run("ip", "netns", "del", name, check=False)


@pytest.fixture
def netns_factory():
    """Make several namespaces in one test; all removed afterwards."""
    made: list[str] = []

    def make() -> Netns:
        name = make_netns_name()
        _run("ip", "netns", "add", name)
        made.append(name)
        _run("ip", "link", "set", "lo", "up", ns=name)
        return Netns(name)

    try:
        yield make
    finally:
        for name in made:
            _run("ip", "netns", "del", name, check=False)


def pytest_collection_modifyitems(config, items):
    """realkernel tests run only inside the VM tier (IPSV_REALKERNEL=1 is set there)."""
    if os.environ.get("IPSV_REALKERNEL") == "1":
        return
    skip = pytest.mark.skip(reason="needs ESP: runs in the real-kernel VM tier (make test-vm)")
    for item in items:
        if "realkernel" in item.keywords:
            item.add_marker(skip)
