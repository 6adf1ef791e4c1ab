"""Real charon (Debian's strongSwan) under `ipsec-supervisor run` in a namespace, kill -9, each recovery mode.

charon has a trap policy (3 XFRM policies), its route in table 220 and its rules at priority
220 (IPv4 and IPv6); foreign state of the same kinds sits next to it. The end state after the
restart must be exactly what the mode promises, and charon's own log tells whether it met its
predecessor's leftovers ("policy already exists", "unable to create ... routing table rule").
Uses tests/charon_ns.py, as the real-kernel VM tests do.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from supervisor.kernel_state import ReadOptions, read_state
from supervisor.ownership import is_supervisor_block
from supervisor.snapshot import load_snapshot

from charon_ns import CHARON, SWANCTL, start_supervised_charon
from test_flush import SETUP

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = [
    pytest.mark.skipif(not os.path.exists(CHARON) or not os.path.exists(SWANCTL),
                       reason="needs strongSwan (strongswan-charon, strongswan-swanctl)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
]

SWANCTL_CONF = """
connections {
  test {
    local_addrs = 192.0.2.1
    remote_addrs = 192.0.2.2
    local {
      auth = psk
      id = moon
    }
    remote {
      auth = psk
      id = sun
    }
    children {
      net {
        local_ts = 10.1.0.0/16
        remote_ts = 10.2.0.0/16
        start_action = trap
      }
    }
  }
}
secrets {
  ike-sun {
    id = sun
    secret = "not a secret"
  }
}
"""

FOREIGN = """
ip xfrm policy add src 10.7.0.0/16 dst 10.8.0.0/16 dir out priority 1000 action block
ip route add 10.9.0.0/16 via 192.0.2.9 dev veth0 table 100
ip rule add priority 100 table 100
ip addr add 10.99.0.6/32 dev lo
"""

COMPLAINTS = ("policy already exists", "unable to create IPv4 routing table rule",
              "unable to create IPv6 routing table rule", "unable to install", "unable to add")


@pytest.fixture
def charon(netns, tmp_path_factory):
    netns.sh(SETUP + FOREIGN)
    made = []

    def start(mode: str, **kw):
        workdir = str(tmp_path_factory.mktemp(f"charon-{mode}"))
        sup = start_supervised_charon(netns.name, workdir, swanctl_conf=SWANCTL_CONF, mode=mode, **kw)
        made.append(sup)
        return sup
    yield start
    for sup in made:
        sup.cleanup()


def state_of(netns) -> dict:
    """charon's kind of objects in the namespace, as comparable tuples (per-socket policies left out)."""
    with netns.enter():
        s = read_state(ReadOptions())
    return {
        "policies": sorted((p.dir, p.selector.saddr, p.selector.daddr, p.priority, p.action, p.selector.user)
                           for p in s.objects["xfrm_policy"] if not p.per_socket),
        "indexes": sorted(p.index for p in s.objects["xfrm_policy"] if not p.per_socket),
        "routes": sorted((r.table, r.dst, r.dst_len) for r in s.objects["route"]),
        "rules": sorted((r.family, r.priority, r.table) for r in s.objects["rule"]),
        "addresses": sorted(a.address for a in s.objects["address"] if a.address.startswith("10.99.")),
    }


CHARONS = {
    "policies": [(0, "10.2.0.0", "10.1.0.0", 383616, 0, 0), (1, "10.1.0.0", "10.2.0.0", 383616, 0, 0),
                 (1, "10.7.0.0", "10.8.0.0", 1000, 1, 0), (2, "10.2.0.0", "10.1.0.0", 383616, 0, 0)],
    "routes": [(220, "10.2.0.0", 16)],
    "rules": [("inet", 220, 220), ("inet6", 220, 220)],
    "addresses": ["10.99.0.6"],
}
FOREIGN_ONLY = {"policies": [(1, "10.7.0.0", "10.8.0.0", 1000, 1, 0)], "routes": [], "rules": [],
                "addresses": ["10.99.0.6"]}


def without_indexes(state: dict) -> dict:
    return {k: v for k, v in state.items() if k != "indexes"}


def restarted_log(sup) -> str:
    """charon's log since its last start."""
    text = sup.charon_log()
    return text[text.rfind("Starting IKE charon daemon"):]


def kill_9_and_recover(sup) -> dict:
    pid = sup.kill_charon()
    st = sup.wait_running(restarts=1)
    assert st["daemon"]["pid"] != pid
    return sup.wait_recovered()


def test_flush_gives_the_restarted_charon_a_clean_slate_fail_closed(charon, netns):
    sup = charon("flush")
    assert without_indexes(state_of(netns)) == CHARONS
    st = kill_9_and_recover(sup)
    assert without_indexes(state_of(netns)) == CHARONS            # charon's own again, no block left
    log = restarted_log(sup)
    assert not [c for c in COMPLAINTS if c in log], log
    rec = sup.crash_reports(wait_for=1)[0]["recovery"]
    assert (rec["action"], rec["fail_closed"]) == ("flush", True)
    assert rec["leftovers"] == {"xfrm_sa": 0, "xfrm_policy": 3, "route": 1, "rule": 2, "address": 0, "firewall": 0}
    assert rec["results"] == {"done": 6 + 2}                     # and 2 blocks (out, fwd)
    assert st["recovery"]["last"]["snapshot"] == rec["snapshot"] == sup.snapshots()[-1]
    assert "fail-closed block" in sup.log() and "removed, charon installed" in sup.log()
    assert sup.stop() == 0
    assert without_indexes(state_of(netns)) == FOREIGN_ONLY


def test_adopt_leaves_everything_in_place_and_charon_takes_it_over_without_an_update_error(charon, netns):
    sup = charon("adopt", supervisor={"recovery": {"adopt_grace": "3s"}})
    before = state_of(netns)
    kill_9_and_recover(sup)
    after = state_of(netns)
    assert without_indexes(after) == CHARONS
    assert after["indexes"] == before["indexes"]            # replaced in place (UPDPOLICY): never removed
    log = restarted_log(sup)
    assert "policy already exists" not in log, log          # policy_update = yes (the shipped snippet)
    assert "unable to create IPv4 routing table rule" in log    # expected: charon's rule was kept for it
    slog = sup.log()
    assert "charon installed it again (same key): charon's again" in slog
    assert "an out policy charon installed again routes through it" in slog
    assert "adoption finished" in slog
    rec = sup.crash_reports(wait_for=1)[0]["recovery"]
    assert rec["action"] == "adopt" and rec["leftover_total"] == 6 and "results" not in rec
    snap = load_snapshot(rec["snapshot"])
    assert sum(len(rows) for rows in snap.context["owned"].values()) == 6
    # the dry run sees nothing left to do: all of it is the running charon's
    r = subprocess.run([sys.executable, "-m", "supervisor.cli", "reconcile", "--dry-run", "--json", "--config",
                        sup.config_path, "--netns", netns.name, "--vici", sup.vici_path],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["daemon"]["name"] == "charon" and doc["ledger"].endswith("ledger.json")
    assert {a["kind"] for a in doc["plan"]["actions"]} <= {"keep"}
    assert {a["kind"] for a in doc["at_grace"]["actions"]} <= {"keep"}
    assert sup.stop() == 0
    assert without_indexes(state_of(netns)) == FOREIGN_ONLY


def test_keep_leaves_the_state_as_the_old_starter_did(charon, netns):
    sup = charon("keep", snippet=False, supervisor={"recovery": {"on_stop": "keep"}})
    kill_9_and_recover(sup)
    assert without_indexes(state_of(netns)) == CHARONS
    assert "policy already exists" in restarted_log(sup)     # what the old starter's charon logged too
    rec = sup.crash_reports(wait_for=1)[0]["recovery"]
    assert rec["action"] == "keep" and rec["leftover_total"] == 6 and os.path.exists(rec["snapshot"])
    assert sup.stop() == 0


@pytest.mark.parametrize("on_stop, left", [("flush", FOREIGN_ONLY), ("keep", CHARONS)])
def test_after_a_requested_stop_that_killed_charon_on_stop_decides_what_stays(charon, netns, on_stop, left):
    # stop.signal SIGKILL: charon cannot clean up (what strongswan#990 is about)
    sup = charon("adopt", supervisor={"stop": {"signal": "SIGKILL"}, "recovery": {"on_stop": on_stop}})
    assert sup.stop() == 0
    assert without_indexes(state_of(netns)) == left
    assert not sup.crash_reports()          # a requested stop is no crash
    with netns.enter():
        assert not [p for p in read_state(ReadOptions(), families=["xfrm_policy"]).objects["xfrm_policy"]
                    if is_supervisor_block(p)]


def test_the_namespace_helper_also_runs_a_plain_charon_and_leaves_nothing(netns, tmp_path):
    from charon_ns import start_charon
    netns.sh(SETUP)
    plain = start_charon(netns.name, str(tmp_path), swanctl_conf=SWANCTL_CONF)
    try:
        assert [next(iter(c)) for c in plain.list_conns()] == ["test"]
        assert plain.vici("version")[0]["daemon"] == "charon"
        assert plain.list_sas() == []
    finally:
        plain.cleanup()
    out = subprocess.run(["ip", "netns", "pids", netns.name], capture_output=True, text=True).stdout
    assert out.split() == []


def test_a_recovery_mode_changed_by_a_reload_applies_to_the_next_crash(charon, netns):
    """SIGHUP (or `ipsec update`) from adopt to flush: the very next kill -9 is recovered by flush."""
    sup = charon("adopt")
    cfg = dict(sup.config, recovery={**sup.config["recovery"], "mode": "flush"})
    import yaml
    with open(sup.config_path, "w") as fh:
        yaml.safe_dump(cfg, fh)
    answer = sup.request("reload")
    assert answer["ok"] and "recovery.mode" in answer["message"], answer
    assert sup.status()["recovery"]["mode"] == "flush"
    st = kill_9_and_recover(sup)
    assert st["recovery"]["last"]["action"] == "flush", st["recovery"]["last"]
    assert without_indexes(state_of(netns)) == CHARONS
    assert sup.stop() == 0
