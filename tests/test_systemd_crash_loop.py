"""A crash loop under a real systemd 252 (nspawn container): the shipped unit with each crash_loop.action.

cooldown: `systemctl start` returns (READY=1 once the supervisor pauses fail-closed), the unit is
active and STATUS= says when it tries again.  exit: the supervisor exits 9 and the unit stays
failed: RestartPreventExitStatus keeps systemd from restarting the same loop 2 s later.
"""

from __future__ import annotations

import time

import pytest

import nspawn
from test_systemd_unit import UNIT_NAME, container_tier, unit_container

FAILING = """\
daemon:
  command: [/bin/false]        # dies at every start
  pid_file: null
  vici_socket: null
restart:
  backoff: {{initial: 0, step: 100ms, maximum: 200ms}}
  crash_loop: {{max_deaths: 3, action: {action}, cooldown: 1h}}
health:
  enabled: false
"""


@pytest.fixture(scope="module")
def box(tmp_path_factory):
    yield from unit_container(tmp_path_factory, {})


@pytest.fixture
def unit(box):
    def configure(action: str):
        box.write("/etc/ipsec-supervisor/supervisor.yaml", FAILING.format(action=action))
        return box
    yield configure
    box.systemctl("stop", UNIT_NAME, check=False)
    box.systemctl("reset-failed", UNIT_NAME, check=False)


@container_tier
def test_a_crash_loop_under_systemd_cools_down_with_the_unit_active_and_status_saying_when(unit):
    c = unit("cooldown")
    r = c.systemctl("start", UNIT_NAME, check=False, timeout=60)
    assert r.returncode == 0, r.stderr
    p = c.show(UNIT_NAME, "ActiveState", "StatusText", "NRestarts", "MainPID")
    assert p["ActiveState"] == "active" and p["NRestarts"] == "0", p
    assert p["StatusText"].startswith("crash loop: 3 deaths in 1m; next try in "), p
    assert "(false stays stopped, no kernel-state recovery; cooldown #1)" in p["StatusText"]


@container_tier
def test_exit_9_after_a_crash_loop_is_not_restarted_by_the_shipped_unit(unit):
    c = unit("exit")
    r = c.systemctl("start", UNIT_NAME, check=False, timeout=60)
    assert r.returncode != 0
    time.sleep(3.0)                                        # longer than RestartSec=2s
    p = c.show(UNIT_NAME, "ActiveState", "Result", "ExecMainStatus", "NRestarts")
    assert (p["ActiveState"], p["Result"], p["ExecMainStatus"], p["NRestarts"]) == ("failed", "exit-code", "9", "0"), p
