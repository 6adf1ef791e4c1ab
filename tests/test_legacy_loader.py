"""Planning and executing load / update / reload (fake VICI client), and the CLI on a real charon."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from supervisor.errors import ExitCode
from supervisor.legacy import loader
from supervisor.legacy.ipsec_conf import parse_ipsec_conf
from supervisor.legacy.secrets import parse_secrets
from supervisor.legacy.translate import TranslateEnv

ROOT = Path(__file__).resolve().parent.parent
IPSEC_D = ROOT / "tests" / "fixtures" / "ipsec_conf" / "ipsec.d"
ENV = TranslateEnv(ipsec_dir=str(IPSEC_D), local_addresses=frozenset({"192.168.0.1"}))

HEAD = "conn %default\n\tauthby=secret\n\tleft=192.168.0.1\n\tright=192.168.0.2\n"


def config(body: str, secrets: str | None = None) -> loader.LegacyConfig:
    conf = parse_ipsec_conf(HEAD + body, "/etc/ipsec.conf")
    sec = parse_secrets(secrets, "/etc/ipsec.secrets", {"/etc/ipsec.d/private/k.pem": b"KEY"}) if secrets else None
    return loader.translate_config(conf, sec, ENV, list(conf.errors) + list(sec.errors if sec else []))


def conn(name: str, *settings: str) -> str:
    return f"conn {name}\n" + "".join(f"\t{s}\n" for s in settings)


class FakeVici:
    """Records requests; ``refuse`` maps a predicate on (command, message) to an error text."""

    def __init__(self, refuse=None):
        self.sent: list[tuple[str, dict]] = []
        self.refuse = refuse or (lambda command, message: None)

    def request(self, command, message=None):
        self.sent.append((command, message))
        why = self.refuse(command, message)
        if why:
            raise loader.CommandFailed(why)
        return {"success": "yes", "id": "aa:bb"} if command == "load-key" else {"success": "yes"}


def steps(plan: loader.Plan) -> list[str]:
    return [s.describe() for s in plan.steps]


def load(cfg: loader.LegacyConfig, previous=None, mode="load", client=None):
    client = client or FakeVici()
    return loader.execute_plan(loader.plan_load(cfg, previous, mode), client), client


# --- load ------------------------------------------------------------------------

V1 = (conn("a", "rightsubnet=10.2.1.0/24", "auto=route")
      + conn("x", "right=192.168.0.9", "auto=route")
      + conn("b", "rightsubnet=10.2.2.0/24", "auto=route")
      + conn("c", "rightsubnet=10.2.3.0/24", "auto=start")
      + conn("i", "rightsubnet=10.2.4.0/24", "auto=ignore"))


def test_load_groups_like_stroke_routes_in_file_order_and_initiates_without_waiting():
    plan = loader.plan_load(config(V1), None, "load")
    assert steps(plan) == ["load-conn connection a", "load-conn connection x", "install conn a",
                           "install conn x", "install conn b", "initiate conn c"]
    (peer, body), = plan.steps[0].message.items()
    assert peer == "a" and list(body["children"]) == ["a", "b", "c"]
    assert plan.steps[-1].message == {"child": "c", "ike": "a", "timeout": -1}
    assert plan.steps[4].message == {"child": "b", "ike": "a"}


def test_credentials_and_pools_come_before_connections():
    cfg = config(conn("s", "right=%any", "rightsourceip=10.3.0.0/24", "auto=add"),
                 "@a : PSK x\n: ECDSA k.pem\n")
    assert steps(loader.plan_load(cfg)) == ["load-shared shared IKE secret 'ipsec.secrets:PSK:@a'",
                                       "load-key private key /etc/ipsec.d/private/k.pem",
                                       "load-pool pool 10.3.0.0/24", "load-conn connection s"]


def test_results_per_conn_and_state():
    report, _ = load(config(V1 + conn("bad", "dpdaction=maybe", "auto=add")))
    assert {r.name: r.status for r in report.results} == {"a": "routed", "b": "routed", "c": "initiated",
                                                          "x": "routed", "bad": "skipped"}
    assert not report.ok
    assert [(p.name, [c.name for c in p.children]) for p in report.state.peers] == [("a", ["a", "b", "c"]),
                                                                                    ("x", ["x"])]
    assert report.state.order == ("a", "x", "b", "c")
    assert loader.LoadedState.from_json(json.loads(json.dumps(report.state.to_json()))) == report.state


def test_charon_refusing_one_merged_child_does_not_take_its_siblings_down():
    bad = lambda cmd, msg: ("invalid value for: esp_proposals" if cmd == "load-conn"
                            and "b" in next(iter(msg.values()))["children"] else None)
    report, client = load(config(V1), client=FakeVici(bad))
    status = {r.name: r.status for r in report.results}
    assert status == {"a": "routed", "b": "failed", "c": "initiated", "x": "routed"}
    assert [c for c, _ in client.sent].count("install") == 2   # b is not routed
    assert [c.name for c in report.state.peers[0].children] == ["a", "c"]


def test_charon_refusing_a_request_is_a_per_conn_failure():
    refuse = lambda cmd, msg: "installing policy failed" if cmd == "install" and msg["child"] == "x" else None
    report, _ = load(config(V1), client=FakeVici(refuse))
    r = {r.name: r for r in report.results}["x"]
    assert r.status == "failed" and "installing policy failed" in r.message and not report.ok


def test_a_broken_socket_stops_the_load_with_a_clear_error():
    class Broken(FakeVici):
        def request(self, command, message=None):
            raise loader.LoaderError("VICI request load-conn to /x failed: EPIPE")
    with pytest.raises(loader.LoaderError):
        load(config(V1), client=Broken())


# --- update ------------------------------------------------------------------------

def test_update_touches_only_what_changed():
    first, _ = load(config(V1))
    v2 = (conn("a", "rightsubnet=10.2.1.0/24", "auto=route")               # unchanged
          + conn("x", "right=192.168.0.9", "auto=route")                   # unchanged
          + conn("b", "rightsubnet=10.2.22.0/24", "auto=route")            # changed
          + conn("d", "rightsubnet=10.2.5.0/24", "auto=add"))              # new, joins a; c removed
    plan = loader.plan_load(config(v2), first.state, "update")
    assert steps(plan) == ["uninstall conn b", "load-conn connection a", "install conn b"]
    assert list(next(iter(plan.steps[1].message.values()))["children"]) == ["a", "b", "d"]
    report = loader.execute_plan(plan, FakeVici())
    assert {r.name: r.status for r in report.results} == {"a": "unchanged", "b": "routed", "d": "loaded",
                                                          "x": "unchanged", "c": "unloaded"}


def test_update_unloads_connections_left_empty():
    first, _ = load(config(V1))
    plan = loader.plan_load(config(conn("a", "rightsubnet=10.2.1.0/24", "auto=route")), first.state, "update")
    assert steps(plan) == ["uninstall conn x", "uninstall conn b", "unload-conn connection x",
                           "load-conn connection a"]


def test_update_without_changes_sends_no_connection_requests():
    first, _ = load(config(V1))
    assert steps(loader.plan_load(config(V1), first.state, "update")) == []


def test_a_changed_conn_with_a_taken_name_renames_the_old_connection():
    # a moves to other IKE settings; b and c stay in the connection named "a" -> it becomes "b"
    first, _ = load(config(V1))
    v2 = (conn("a", "rightsubnet=10.2.1.0/24", "rightid=@other", "auto=route")
          + conn("x", "right=192.168.0.9", "auto=route")
          + conn("b", "rightsubnet=10.2.2.0/24", "auto=route")
          + conn("c", "rightsubnet=10.2.3.0/24", "auto=start"))
    plan = loader.plan_load(config(v2), first.state, "update")
    assert steps(plan) == ["uninstall conn a", "uninstall conn b", "unload-conn connection a",
                           "load-conn connection b", "load-conn connection a", "install conn a", "install conn b"]
    report = loader.execute_plan(plan, FakeVici())
    assert [(p.name, [c.name for c in p.children]) for p in report.state.peers] == [
        ("b", ["b", "c"]), ("x", ["x"]), ("a", ["a"])]


def test_update_refreshes_secrets_and_drops_stale_ones():
    first, _ = load(config(V1, "@a : PSK x\n@b : PSK y\n: ECDSA k.pem\n"))
    plan = loader.plan_load(config(V1, "@a : PSK z\n"), first.state, "update")
    report = loader.execute_plan(plan, client := FakeVici())
    assert [(c, m.get("id")) for c, m in client.sent] == [
        ("load-shared", "ipsec.secrets:PSK:@a"), ("unload-shared", "ipsec.secrets:PSK:@b"), ("unload-key", "aa:bb")]
    assert report.state.shared_ids == ("ipsec.secrets:PSK:@a",) and report.state.key_ids == ()


def test_merged_conn_warns_about_settings_that_do_not_apply():
    plan = loader.plan_load(config(conn("a", "auto=add") + conn("b", "dpdtimeout=20", "rightsubnet=10.9.0.0/16",
                                                           "auto=add")))
    assert len(plan.groups) == 1
    (w,) = plan.warnings
    assert w.section == "conn b" and "dpd_timeout applies instead" in w.message


# --- reload --------------------------------------------------------------------------

def test_reload_takes_everything_down_in_file_order_and_loads_it_again():
    first, _ = load(config(V1))
    assert steps(loader.plan_load(config(V1), first.state, "reload")) == [
        "uninstall conn a", "uninstall conn x", "uninstall conn b", "unload-conn connection a",
        "unload-conn connection x", "load-conn connection a", "load-conn connection x", "install conn a",
        "install conn x", "install conn b", "initiate conn c"]


def test_load_mode_ignores_a_previous_state():
    first, _ = load(config(V1))
    assert steps(loader.plan_load(config(V1), first.state, "load"))[0] == "load-conn connection a"


def test_plan_json_redacts_shared_secrets():
    plan = loader.plan_load(config(conn("a", "auto=add"), "@a : PSK topsecret\n"))
    text = json.dumps(plan.to_json())
    assert "topsecret" not in text and "(redacted)" in text
    assert "dG9wc2VjcmV0" not in json.dumps(plan.to_json())
    assert plan.to_json(secrets=True)["steps"][0]["message"]["data"] == "topsecret"


# --- the CLI -------------------------------------------------------------------------

def run_cli(*args: str, netns: str | None = None) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "supervisor.cli", "load-ipsec-conf", *args]
    if netns:
        argv = ["ip", "netns", "exec", netns, *argv]
    return subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=60)


def test_cli_dry_run_prints_the_requests(tmp_path):
    (tmp_path / "ipsec.conf").write_text('config setup\n\tcharondebug="ike 2"\n' + HEAD + V1)
    (tmp_path / "ipsec.secrets").write_text("@a : PSK secret123\n")
    res = run_cli("--file", str(tmp_path / "ipsec.conf"), "--secrets", str(tmp_path / "ipsec.secrets"),
                  "--dry-run", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert [s["command"] for s in out["steps"]][:2] == ["load-shared", "load-conn"]
    assert out["daemon"] == {"args": ["--debug-ike", "2"], "settings": {}}
    assert "secret123" not in res.stdout
    text = run_cli("--file", str(tmp_path / "ipsec.conf"), "--no-secrets", "--dry-run")
    assert text.stdout.splitlines()[0] == "load-conn connection a"


def test_cli_exit_codes(tmp_path):
    (tmp_path / "bad.conf").write_text("conn a\nleft=1\n")
    res = run_cli("--file", str(tmp_path / "bad.conf"), "--no-secrets", "--dry-run")
    assert res.returncode == ExitCode.CONFIG and "bad.conf:2: syntax error" in res.stderr
    (tmp_path / "skip.conf").write_text(HEAD + conn("a", "dpdaction=maybe", "auto=add"))
    res = run_cli("--file", str(tmp_path / "skip.conf"), "--no-secrets", "--dry-run")
    assert res.returncode == ExitCode.FAILED and "skip.conf:6: conn a: option 'dpdaction'" in res.stderr
    res = run_cli("--file", str(tmp_path / "skip.conf"), "--no-secrets", "--mode", "update")
    assert res.returncode == ExitCode.CONFIG and "needs --state" in res.stderr
    res = run_cli("--file", str(tmp_path / "skip.conf"), "--no-secrets", "--vici", str(tmp_path / "none.vici"))
    assert res.returncode == ExitCode.FAILED and "cannot connect to charon's VICI socket" in res.stderr


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/usr/lib/ipsec/charon"),
                    reason="needs root and strongSwan's charon")
def test_cli_loads_and_updates_a_real_charon(netns, tmp_path):
    sys.path.insert(0, str(ROOT / "tests"))
    from test_legacy_differential import CHARON, Daemon, list_conns
    netns.sh("ip link add v0 type veth peer name v1 && ip addr add 192.168.0.1/24 dev v0 && "
             "ip link set v0 up && ip link set v1 up")
    conf, secrets, state = tmp_path / "ipsec.conf", tmp_path / "ipsec.secrets", tmp_path / "state.json"
    conf.write_text(HEAD + V1)
    secrets.write_text("192.168.0.1 192.168.0.2 : PSK \"x\"\n")
    daemon = Daemon(netns, tmp_path, [CHARON], "    stroke { load = no }")
    try:
        daemon.wait_ready()
        args = ["--file", str(conf), "--secrets", str(secrets), "--vici", daemon.vici, "--state", str(state)]
        res = run_cli(*args, netns=netns.name)
        assert res.returncode == 0, res.stdout + res.stderr
        assert res.stdout.splitlines() == ["a: routed", "b: routed (connection a)", "c: initiated (connection a)",
                                           "x: routed"]
        assert [c for c, _ in list_conns(daemon)["a"]["children"]] == ["a", "b", "c"]

        conf.write_text(HEAD + conn("a", "rightsubnet=10.2.1.0/24", "auto=route"))
        res = run_cli(*args, "--json", netns=netns.name)
        assert res.returncode == 0, res.stdout + res.stderr
        out = json.loads(res.stdout)
        assert {c["conn"]: c["status"] for c in out["conns"]} == {"a": "unchanged", "b": "unloaded",
                                                                  "c": "unloaded", "x": "unloaded"}
        assert list(list_conns(daemon)) == ["a"]
        assert json.loads(state.read_text())["order"] == ["a"]
    finally:
        daemon.stop()


def test_the_state_file_is_written_by_the_atomic_writer_never_through_a_symlink(tmp_path):
    """load-ipsec-conf --state wrote a fixed STATE.tmp with open("w") (issue 11 point 8)."""
    from supervisor.commands.legacy import _read_state, _write_state
    state = load(config(V1))[0].state
    victim = tmp_path / "victim"
    victim.write_text("precious")
    path = tmp_path / "ipsec-conf.state"
    (tmp_path / "ipsec-conf.state.tmp").symlink_to(victim)      # the old fixed temp name
    path.symlink_to(victim)
    old = os.umask(0)
    try:
        _write_state(str(path), state)
    finally:
        os.umask(old)
    assert victim.read_text() == "precious"
    assert not path.is_symlink() and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert _read_state(str(path)) == state
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ipsec-conf.state", "ipsec-conf.state.tmp", "victim"]
