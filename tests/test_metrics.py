"""Metrics: values after scripted changes of the fake daemon, charon's view over VICI, the label bound.

The exposition is always read back with prometheus_client's own parser: what Prometheus gets.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from supervisor.config import parse_config
from supervisor.errors import ConfigError
from supervisor.metrics import families as fam
from supervisor.metrics.charon import CharonReader, CharonView, ChildSample, parse_sas
from supervisor.metrics.exporter import recovery_outcome

from test_starter import ROOT, Harness, harness  # noqa: F401 - the fixture is used by name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse(text: str) -> dict[tuple, float]:
    """{(sample name, ((label, value), ...)): value} of an exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict, name: str, **labels) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def names(samples: dict, name: str) -> list[dict]:
    return [dict(k[1]) for k in samples if k[0] == name]


NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def scrape(port: int, timeout: float = 10.0) -> dict:
    with NO_PROXY.open(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as resp:
        return parse(resp.read().decode())


def metrics_harness(make, runs, port: int, **overrides) -> Harness:
    metrics = {"listen": f"127.0.0.1:{port}", "vici_timeout": "500ms", "vici_cache": 0}
    metrics.update(overrides.pop("metrics", {}))
    h = make(runs, {"metrics": metrics, **overrides})
    h.write_config({"metrics": dict(metrics, textfile=h.p("supervisor.prom")), **overrides})
    return h


def wait_for(pred, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


SA = {"test": {"state": "ESTABLISHED", "child-sas": {
    "net-1": {"name": "net", "state": "INSTALLED", "reqid": "1", "local-ts": ["10.1.0.0/16"],
              "remote-ts": ["10.2.0.0/16"], "bytes-in": "1000", "bytes-out": "2000", "packets-in": "10",
              "packets-out": "20"}}}}
CONN = {"test": {"local_addrs": ["192.0.2.1"], "children": {"net": {"mode": "TUNNEL"}}},
        "idle": {"local_addrs": ["192.0.2.1"], "children": {"net": {"mode": "TUNNEL"}}}}


# -- the supervisor's metrics with the fake daemon ------------------------------------------------

def test_a_death_and_restart_show_in_counters_histograms_state_and_the_textfile(harness):
    port = free_port()
    h = metrics_harness(harness, [{"signal_after": 0.3, "signal": "SIGSEGV"},
                                  {"vici_sas": [SA], "vici_conns": [CONN]}], port).start()
    h.wait_running(restarts=1)
    m = scrape(port)
    assert value(m, "ipsec_supervisor_restarts_total", classification="killed-by-signal") == 1
    assert value(m, "ipsec_supervisor_restarts_total", classification="failure-exit") == 0   # all exist at 0
    assert value(m, "ipsec_supervisor_charon_exits_total", classification="killed-by-signal") == 1
    assert value(m, "ipsec_supervisor_state", state="running") == 1
    assert sum(v for (n, _), v in m.items() if n == "ipsec_supervisor_state") == 1            # one-hot
    assert value(m, "ipsec_supervisor_charon_up") == 1
    assert value(m, "ipsec_supervisor_charon_config_loaded") == 1
    assert value(m, "ipsec_supervisor_death_to_ready_seconds_count") == 1
    assert 0 < value(m, "ipsec_supervisor_death_to_ready_seconds_sum") < 5
    assert value(m, "ipsec_supervisor_death_detection_seconds_count") == 1
    assert value(m, "ipsec_supervisor_death_detection_seconds_sum") < 0.5
    assert value(m, "ipsec_supervisor_crash_loop_deaths") == 1
    assert value(m, "ipsec_supervisor_crash_loop_active") == 0
    assert value(m, "ipsec_supervisor_crash_reports_on_disk") == 1
    assert value(m, "ipsec_supervisor_crash_reports_on_disk_bytes") > 100
    assert abs(value(m, "ipsec_supervisor_charon_start_time_seconds") - time.time()) < 30
    assert value(m, "process_resident_memory_bytes") > 0
    # charon's view, from the fake's VICI answers
    assert value(m, "ipsec_charon_up") == 1
    assert value(m, "ipsec_charon_connections_loaded") == 2
    assert value(m, "ipsec_charon_connections_established") == 1
    assert value(m, "ipsec_charon_connection_established", connection="idle") == 0
    assert value(m, "ipsec_charon_ike_sas", connection="test", state="ESTABLISHED") == 1
    assert value(m, "ipsec_charon_child_sas", connection="test", child="net", state="INSTALLED") == 1
    ts = dict(connection="test", child="net", local_ts="10.1.0.0/16", remote_ts="10.2.0.0/16", reqid="1")
    assert value(m, "ipsec_charon_child_sa_bytes_total", direction="in", **ts) == 1000
    assert value(m, "ipsec_charon_child_sa_packets_total", direction="out", **ts) == 20
    # the textfile: the supervisor's part, written after the change, without charon's view
    text = wait_for(lambda: (lambda t: t if "running" in t and 'state="running"} 1.0' in t else None)(
        open(h.p("supervisor.prom")).read()) if os.path.exists(h.p("supervisor.prom")) else None,
        what="textfile shows running")
    t = parse(text)
    assert value(t, "ipsec_supervisor_restarts_total", classification="killed-by-signal") == 1
    assert not [k for k in t if k[0].startswith(("ipsec_charon_", "process_"))]
    assert oct(os.stat(h.p("supervisor.prom")).st_mode & 0o777) == "0o644"
    assert not [n for n in os.listdir(h.dir) if n.startswith(".ipsec-supervisor-")]          # no temp left
    h.send(signal.SIGTERM)
    assert h.wait_exit() == 0
    assert value(parse(open(h.p("supervisor.prom")).read()), "ipsec_supervisor_state", state="stopped") == 1


def test_a_crash_loop_shows_as_gave_up_with_its_deaths(harness):
    port = free_port()
    h = metrics_harness(harness, [{"exit_after": 0.05, "exit_code": 1}], port,
                        restart={"crash_loop": {"max_deaths": 3, "window": "60s", "action": "stay"}}).start()
    h.wait(lambda s: s["state"] == "gave-up", 15, "gave up")
    m = scrape(port)
    assert value(m, "ipsec_supervisor_state", state="gave-up") == 1
    assert value(m, "ipsec_supervisor_crash_loop_active") == 1
    assert value(m, "ipsec_supervisor_crash_loop_deaths") == 3
    assert value(m, "ipsec_supervisor_crash_loop_max_deaths") == 3
    assert value(m, "ipsec_supervisor_restarts_total", classification="failure-exit") == 2    # the 3rd gave up
    assert value(m, "ipsec_supervisor_charon_exits_total", classification="failure-exit") == 3
    assert value(m, "ipsec_supervisor_charon_up") == 0
    assert value(m, "ipsec_charon_up") == 0                       # not running: VICI is not even asked
    assert value(m, "ipsec_supervisor_next_restart_seconds") is None


def test_backoff_shows_the_next_restart(harness):
    port = free_port()
    h = metrics_harness(harness, [{"exit_after": 0.05, "exit_code": 1}, {}], port,
                        restart={"backoff": {"initial": "3s", "step": "3s", "maximum": "3s", "jitter": 0}}).start()
    h.wait(lambda s: s["state"] == "backoff", 10, "backoff")
    m = scrape(port)
    assert value(m, "ipsec_supervisor_state", state="backoff") == 1
    assert 1.0 < value(m, "ipsec_supervisor_next_restart_seconds") <= 3.0


def test_a_failed_reload_is_counted_and_the_last_reload_marked_failed(harness):
    port = free_port()
    h = metrics_harness(harness, [{}], port).start()
    h.wait_running()
    good = open(h.config_path).read()
    h.send(signal.SIGHUP)
    wait_for(lambda: value(scrape(port), "ipsec_supervisor_config_reloads_total", result="success") == 1,
             what="a successful reload")
    with open(h.config_path, "a") as fh:
        fh.write("restart: {policy: sometimes}\n")
    h.send(signal.SIGHUP)
    m = wait_for(lambda: (lambda m: m if value(m, "ipsec_supervisor_config_reloads_total", result="failure") == 1
                          else None)(scrape(port)), what="a failed reload")
    assert value(m, "ipsec_supervisor_config_last_reload_successful") == 0
    assert abs(value(m, "ipsec_supervisor_config_last_load_success_timestamp_seconds") - time.time()) < 60
    with open(h.config_path, "w") as fh:
        fh.write(good)
    h.send(signal.SIGHUP)
    wait_for(lambda: value(scrape(port), "ipsec_supervisor_config_last_reload_successful") == 1,
             what="reload ok again")


def test_failed_health_probes_are_counted_with_their_latency(harness):
    port = free_port()
    h = metrics_harness(harness, [{}], port, health={"interval": "100ms", "timeout": "100ms", "failures": 1000})
    h.start()
    h.wait_running()
    m = wait_for(lambda: (lambda m: m if (value(m, "ipsec_supervisor_health_probe_duration_seconds_count") or 0) >= 2
                          else None)(scrape(port)), what="two probes")
    assert value(m, "ipsec_supervisor_health_probe_failures_total") == 0
    pid = h.status()["daemon"]["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        m = wait_for(lambda: (lambda m: m if (value(m, "ipsec_supervisor_health_probe_failures_total") or 0) >= 2
                              else None)(scrape(port)), what="failed probes")
        assert value(m, "ipsec_supervisor_health_probe_consecutive_failures") >= 2
    finally:
        os.kill(pid, signal.SIGCONT)


def test_a_hung_daemon_gives_charon_up_0_within_the_vici_timeout_and_a_good_scrape(harness):
    port = free_port()
    h = metrics_harness(harness, [{"vici_sas": [SA], "vici_conns": [CONN]}], port, health={"enabled": False},
                        metrics={"vici_timeout": "700ms"})
    h.start()
    h.wait_running()
    assert value(scrape(port), "ipsec_charon_up") == 1
    pid = h.status()["daemon"]["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        for _ in range(3):        # again and again: hung connections must not pile up into a slower scrape
            t0 = time.monotonic()
            m = scrape(port, timeout=5)
            took = time.monotonic() - t0
            assert took < 0.7 + 0.5, took
            assert value(m, "ipsec_charon_up") == 0
            assert value(m, "ipsec_supervisor_charon_up") == 1            # the supervisor's part is all there
            assert value(m, "ipsec_charon_child_sas", connection="test", child="net", state="INSTALLED") is None
    finally:
        os.kill(pid, signal.SIGCONT)
    assert value(scrape(port), "ipsec_charon_up") == 1


def test_many_child_sas_are_summed_per_connection_within_the_label_bound(harness):
    port = free_port()
    children = {f"c{i}-{i}": {"name": f"c{i}", "state": "INSTALLED", "reqid": str(i + 1),
                              "local-ts": ["10.1.0.0/16"], "remote-ts": [f"10.{i // 250}.{i % 250}.0/24"],
                              "bytes-in": "5", "bytes-out": "7", "packets-in": "1", "packets-out": "1"}
                for i in range(300)}
    sas = [{"gw": {"state": "ESTABLISHED", "child-sas": children}}]
    h = metrics_harness(harness, [{"vici_sas": sas, "vici_conns": [{"gw": {}}]}], port,
                        metrics={"max_children": 100})
    h.start()
    h.wait_running()
    m = scrape(port)
    assert value(m, "ipsec_charon_aggregated") == 1
    assert value(m, "ipsec_charon_child_sa_count") == 300
    assert names(m, "ipsec_charon_child_sa_bytes_total") == [
        dict(connection="gw", child="", local_ts="", remote_ts="", reqid="", direction=d) for d in ("in", "out")]
    assert value(m, "ipsec_charon_child_sa_bytes_total", connection="gw", child="", local_ts="", remote_ts="",
                 reqid="", direction="in") == 1500
    assert value(m, "ipsec_charon_child_sas", connection="gw", child="", state="INSTALLED") == 300


def test_a_taken_port_is_logged_and_supervision_goes_on_with_the_textfile(harness):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        h = metrics_harness(harness, [{}], port).start()
        h.wait_running()
        assert f"cannot listen on 127.0.0.1:{port} for Prometheus metrics" in h.log()
        wait_for(lambda: os.path.exists(h.p("supervisor.prom")), what="the textfile")


def test_metrics_command_prints_text_and_json(harness):
    port = free_port()
    h = metrics_harness(harness, [{}], port).start()
    h.wait_running()
    run = lambda *a: subprocess.run([sys.executable, "-m", "supervisor.cli", "metrics", "--config", h.config_path,
                                     *a], cwd=ROOT, capture_output=True, text=True, timeout=30)
    text = run()
    assert text.returncode == 0, text.stderr
    assert value(parse(text.stdout), "ipsec_supervisor_state", state="running") == 1
    js = run("--json")
    assert js.returncode == 0, js.stderr
    data = {f["name"]: f for f in json.loads(js.stdout)}
    assert data["ipsec_supervisor_restarts"]["type"] == "counter"
    assert {"name": "ipsec_supervisor_state", "labels": {"state": "running"}, "value": 1.0} in \
        data["ipsec_supervisor_state"]["samples"]
    h.send(signal.SIGTERM)
    h.wait_exit()
    gone = run()
    assert gone.returncode == 7 and "is ipsec-supervisor running" in gone.stderr


def test_metrics_command_reads_the_textfile_and_says_when_metrics_are_off(tmp_path):
    prom = tmp_path / "x.prom"
    prom.write_text("# HELP ipsec_supervisor_charon_up x\n# TYPE ipsec_supervisor_charon_up gauge\n"
                    "ipsec_supervisor_charon_up 1.0\n")
    cfg = tmp_path / "s.yaml"
    cfg.write_text(f"metrics: {{textfile: {prom}}}\n")
    run = lambda c: subprocess.run([sys.executable, "-m", "supervisor.cli", "metrics", "--json", "--config", str(c)],
                                   cwd=ROOT, capture_output=True, text=True, timeout=30)
    r = run(cfg)
    assert r.returncode == 0 and json.loads(r.stdout)[0]["samples"][0]["value"] == 1.0
    off = tmp_path / "off.yaml"
    off.write_text("{}\n")
    r = run(off)
    assert r.returncode == 1 and "metrics are off" in r.stderr


def test_short_commands_do_not_import_prometheus_client():
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "supervisor.cli", "status", "--config",
                          "/nonexistent"], cwd=ROOT, capture_output=True, text=True)
    assert "prometheus_client" not in out.stderr


# -- pure parts -----------------------------------------------------------------------------------

@pytest.mark.parametrize("children, conns, bound, level", [
    (0, 0, 100, fam.PER_CHILD), (100, 1, 100, fam.PER_CHILD), (101, 1, 100, fam.PER_CONNECTION),
    (101, 100, 100, fam.PER_CONNECTION), (5, 101, 100, fam.ALL), (1000, 1000, 100, fam.ALL),
])
def test_aggregation_level(children, conns, bound, level):
    assert fam.aggregation_level(children, conns, bound) == level


def _child(conn, child, i=0, state="INSTALLED"):
    return ChildSample(conn, child, state, "10.1.0.0/16", f"10.2.{i}.0/24", str(i), 10, 20, 1, 2)


def _series(families) -> dict[str, int]:
    out: dict[str, int] = {}
    for f in families:
        out[f.name] = len(f.samples)
    return out


def test_no_charon_family_grows_past_the_bound_whatever_charon_has():
    bound = 10
    conns = tuple(f"conn{i}" for i in range(1000))
    view = CharonView(True, None, 0.01, 0.0, conns, tuple((c, "ESTABLISHED") for c in conns),
                      tuple(_child(c, "net", i) for i, c in enumerate(conns)), 1000)
    sizes = _series(fam.charon_families(view, bound))
    assert max(sizes.values()) <= 2 * 2   # bytes/packets: in + out of one aggregate
    small = CharonView(True, None, 0.01, 0.0, ("a",), (("a", "ESTABLISHED"),),
                       (_child("a", "x", 1), _child("a", "x", 1, "REKEYED")), 0)
    m = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in fam.charon_families(small, bound) for s in f.samples}
    # two SAs of one child during a rekey: one series, summed (duplicate label sets are invalid)
    assert value(m, "ipsec_charon_child_sa_bytes_total", connection="a", child="x", local_ts="10.1.0.0/16",
                 remote_ts="10.2.1.0/24", reqid="1", direction="in") == 20


def test_charon_down_has_only_up_and_duration():
    sizes = _series(fam.charon_families(CharonView(False, "no answer", 0.5, 0.0), 100))
    assert sizes == {"ipsec_charon_up": 1, "ipsec_charon_scrape_duration_seconds": 1}


def test_parse_sas_reads_vici_events_with_bytes_values():
    raw = {b"test": {b"state": b"ESTABLISHED", b"child-sas": {b"net-1": {
        b"name": b"net", b"state": b"INSTALLED", b"reqid": b"3", b"local-ts": [b"10.1.0.0/16"],
        b"remote-ts": [b"10.2.0.0/16", b"10.3.0.0/16"], b"bytes-in": b"7"}}}}
    ikes, children = parse_sas([raw])
    assert ikes == (("test", "ESTABLISHED"),)
    assert children == (ChildSample("test", "net", "INSTALLED", "10.1.0.0/16", "10.2.0.0/16,10.3.0.0/16", "3",
                                    7, 0, 0, 0),)


def test_reader_caches_and_does_not_ask_a_stopped_charon():
    calls = []
    now = [0.0]

    def reader(path, timeout, clock):
        calls.append(path)
        return CharonView(True, None, 0.0, clock())
    r = CharonReader("/x.vici", 1.0, 2.0, clock=lambda: now[0], reader=reader)
    r.read()
    now[0] = 1.0
    r.read()
    assert len(calls) == 1
    now[0] = 2.5
    r.read()
    assert len(calls) == 2
    assert r.read(running=False).up is False and len(calls) == 2
    assert CharonReader(None, 1.0, 0.0).read().error.startswith("no VICI socket")


@pytest.mark.parametrize("last, adoption, stale", [
    (None, None, 0),
    ({"action": "flush", "results": {"done": 3, "failed": 2}}, None, 2),
    ({"action": "adopt"}, {"state": "waiting", "pending": 4, "results": {}}, 0),
    ({"action": "adopt"}, {"state": "done", "pending": 1, "results": {"delete failed": 2, "delete done": 5}}, 3),
])
def test_stale_leftovers_are_what_recovery_failed_to_clear(last, adoption, stale):
    assert fam.stale_leftovers(last, adoption) == stale


@pytest.mark.parametrize("section, expected", [
    ({"action": "flush", "results": {"done": 5}}, ("flush", "ok")),
    ({"action": "flush", "results": {"done": 4, "failed": 1}}, ("flush", "failed")),
    ({"action": "adopt", "leftovers": {}}, ("adopt", "ok")),
    ({"action": "keep", "error": "cannot dump"}, ("keep", "error")),
])
def test_recovery_outcome(section, expected):
    assert recovery_outcome(section) == expected


def test_adoption_results_become_claimed_removed_kept_pending():
    rec = {"mode": "adopt", "blocks": 2, "adoption": {
        "state": "done", "leftovers": 10, "resolved": 3, "pending": 0, "initiated": ["test/net"],
        "results": {"delete done": 2, "keep done": 1, "initiate done": 1, "delete failed": 1}}}
    m = {(s.name, tuple(sorted(s.labels.items()))): s.value
         for f in fam.recovery_families(rec, None, {"xfrm_policy": 3}) for s in f.samples}
    assert value(m, "ipsec_supervisor_adopt_leftovers", result="claimed") == 1 + 7     # re-installed + gone
    assert value(m, "ipsec_supervisor_adopt_leftovers", result="removed") == 2
    assert value(m, "ipsec_supervisor_adopt_leftovers", result="pending") == 0
    assert value(m, "ipsec_supervisor_adopt_initiated_children") == 1
    assert value(m, "ipsec_supervisor_adopt_in_progress") == 0
    assert value(m, "ipsec_supervisor_adopt_actions", action="delete", outcome="failed") == 1
    assert value(m, "ipsec_supervisor_stale_leftovers") == 1
    assert value(m, "ipsec_supervisor_fail_closed_blocks") == 2
    assert value(m, "ipsec_supervisor_leftovers", family="xfrm_policy") == 3
    assert value(m, "ipsec_supervisor_leftovers", family="route") == 0


@pytest.mark.parametrize("text, expected", [
    ("metrics: {listen: 9089}", "metrics.listen must be HOST:PORT"),
    ("metrics: {listen: 'localhost'}", "metrics.listen must be HOST:PORT"),
    ("metrics: {listen: '127.0.0.1:70000'}", "metrics.listen must be HOST:PORT"),
    ("metrics: {listen: 'gateway.example:9089'}", "metrics.listen must be HOST:PORT"),
    ("metrics: {listen: '300.1.1.1:9089'}", "with an IP address as HOST"),
    ("metrics: {textfile: /var/lib/node/ipsec.txt}", "metrics.textfile must be an absolute path ending in .prom"),
    ("metrics: {textfile: ipsec.prom}", "metrics.textfile must be an absolute path"),
    ("metrics: {max_children: 0}", "metrics.max_children must be >= 1"),
    ("metrics: {listn: '127.0.0.1:9089'}", "did you mean metrics.listen"),
])
def test_metrics_configuration_errors(text, expected):
    with pytest.raises(ConfigError, match=expected):
        parse_config(text, "x.yaml")


@pytest.mark.parametrize("listen", ["127.0.0.1:9089", "[::1]:9089", ":9089", "0.0.0.0:9089", "localhost:9089"])
def test_metrics_listen_forms(listen):
    assert parse_config(f"metrics: {{listen: '{listen}'}}", "x").metrics.listen == listen


def test_kernel_recovery_tells_the_observer_of_monitor_overruns():
    from supervisor.config import default_config
    from supervisor.kernel.common import Action, KernelEvent
    from supervisor.recovery import KernelRecovery

    class Watch:
        def __init__(self, batches):
            self.batches = list(batches)

        def read_events(self):
            return self.batches.pop(0)

    seen = []

    class Observer:
        def overrun(self, monitor):
            seen.append(monitor)

    rec = KernelRecovery(default_config())
    rec.observer = Observer()
    rec._watch = Watch([[KernelEvent("xfrm", Action.FLUSH, None, 0), KernelEvent("rtnl", Action.FLUSH, None, 0),
                         KernelEvent("xfrm", Action.FLUSH, None, 0)], []])
    rec._schedule_resync = lambda: None
    rec._on_kernel()
    rec._on_kernel()
    assert sorted(seen) == ["rtnl", "xfrm"]          # one count per monitor and batch
