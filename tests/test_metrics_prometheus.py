"""A real Prometheus server scrapes a supervisor running real charon in a namespace; kill -9 charon.

Prometheus (Debian's package) runs in the test's network namespace, next to the supervisor,
with a temporary configuration and data directory, scraping every second and loading the
shipped alert rules. Its HTTP API must show the restart and the recovery's result. Also here:
a scrape while charon is stopped (SIGSTOP), and 1,000 trap policies scraped within the label
bound.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request

import pytest

from charon_ns import CHARON, SWANCTL, start_supervised_charon, trap_conns_conf
from test_flush import SETUP
from test_metrics import parse, value
from test_recovery_charon import SWANCTL_CONF

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RULES = os.path.join(ROOT, "etc", "prometheus", "ipsec-supervisor-rules.yml")
PROMETHEUS = shutil.which("prometheus")
METRICS = "127.0.0.1:9089"              # a fresh namespace: the documented port is free
PROM_LISTEN = "127.0.0.1:9090"
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))

pytestmark = [
    pytest.mark.skipif(not os.path.exists(CHARON) or not os.path.exists(SWANCTL),
                       reason="needs strongSwan (strongswan-charon, strongswan-swanctl)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
]


def get(netns, url: str, timeout: float = 10.0) -> bytes:
    """GET URL from inside NETNS (where the supervisor and Prometheus listen)."""
    with netns.enter():
        with NO_PROXY.open(url, timeout=timeout) as resp:
            return resp.read()


def scrape(netns) -> tuple[dict, float]:
    t0 = time.monotonic()
    text = get(netns, f"http://{METRICS}/metrics").decode()
    return parse(text), time.monotonic() - t0


class Prometheus:
    """`prometheus` in NETNS with its own configuration and data directory under WORKDIR."""

    def __init__(self, netns, workdir: str):
        self.netns = netns
        self.dir = workdir
        self.data = os.path.join(workdir, "data")
        config = os.path.join(workdir, "prometheus.yml")
        with open(config, "w") as fh:
            json.dump({"global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
                       "rule_files": [RULES],
                       "scrape_configs": [{"job_name": "ipsec-supervisor",
                                           "static_configs": [{"targets": [METRICS]}]}]}, fh)
        self.log = open(os.path.join(workdir, "prometheus.log"), "w")
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", netns.name, PROMETHEUS, f"--config.file={config}",
             f"--storage.tsdb.path={self.data}", f"--web.listen-address={PROM_LISTEN}", "--log.level=warn"],
            stdout=self.log, stderr=self.log)

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"prometheus exited:\n{self.text()}"
            try:
                get(self.netns, f"http://{PROM_LISTEN}/-/ready", timeout=2)
                return
            except OSError:
                time.sleep(0.2)
        raise AssertionError(f"prometheus not ready:\n{self.text()}")

    def query(self, promql: str) -> list[dict]:
        url = f"http://{PROM_LISTEN}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        answer = json.loads(get(self.netns, url))
        assert answer["status"] == "success", answer
        return answer["data"]["result"]

    def scalar(self, promql: str) -> float | None:
        result = self.query(promql)
        return float(result[0]["value"][1]) if result else None

    def wait_for(self, promql: str, pred, timeout: float = 60.0):
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = self.scalar(promql)
            if last is not None and pred(last):
                return last
            time.sleep(0.5)
        raise AssertionError(f"{promql}: last value {last}\n{self.text()[-3000:]}")

    def text(self) -> str:
        with open(os.path.join(self.dir, "prometheus.log")) as fh:
            return fh.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.data, ignore_errors=True)


@pytest.fixture
def supervised(netns, tmp_path_factory):
    netns.sh(SETUP)
    made = []

    def start(swanctl_conf: str = SWANCTL_CONF, mode: str = "adopt", metrics: dict | None = None, **sup):
        workdir = str(tmp_path_factory.mktemp("metrics-charon"))
        sup.setdefault("health", {"interval": "30s", "timeout": "2s"})
        s = start_supervised_charon(netns.name, workdir, swanctl_conf=swanctl_conf, mode=mode,
                                    supervisor={"metrics": {"listen": METRICS, "vici_timeout": "500ms",
                                                            "vici_cache": 0, **(metrics or {})}, **sup})
        made.append(s)
        return s
    yield start
    for s in made:
        s.cleanup()


@pytest.mark.skipif(PROMETHEUS is None, reason="needs prometheus (Debian package prometheus)")
def test_prometheus_sees_the_restart_and_the_adoption_after_kill_9(supervised, netns, tmp_path):
    sup = supervised(recovery={"adopt_grace": "3s"})
    prom = Prometheus(netns, str(tmp_path))
    try:
        prom.wait_ready()
        # enough scrapes before the kill that the counter's 0 is on record (increase() needs it)
        prom.wait_for('count_over_time(ipsec_supervisor_restarts_total{classification="killed-by-signal"}[1m])',
                      lambda v: v >= 3)
        assert prom.scalar("ipsec_charon_trap_policies") == 1
        assert prom.scalar("ipsec_supervisor_charon_up") == 1
        assert prom.scalar('ipsec_supervisor_build_info{recovery_mode="adopt"}') == 1
        pid = sup.kill_charon()
        st = sup.wait_running(restarts=1)
        assert st["daemon"]["pid"] != pid
        sup.wait_recovered()
        increase = prom.wait_for("sum(increase(ipsec_supervisor_restarts_total[1m]))", lambda v: round(v) == 1)
        assert 0.9 <= increase < 1.5
        assert prom.scalar('ipsec_supervisor_restarts_total{classification="killed-by-signal"}') == 1
        prom.wait_for('ipsec_supervisor_recoveries_total{action="adopt", outcome="ok"}', lambda v: v == 1)
        assert prom.scalar('sum(ipsec_supervisor_recoveries_total{outcome!="ok"})') == 0
        # what charon left (a trap: in/out/fwd policy, its route in table 220, the rules for v4 and v6) ...
        assert prom.scalar('ipsec_supervisor_leftovers{family="xfrm_policy"}') == 3
        assert prom.scalar('ipsec_supervisor_leftovers{family="rule"}') == 2
        # all attributed through charon's netlink ports (the ledger), none by markers alone
        assert prom.scalar('sum(ipsec_supervisor_leftovers_by_rule{rule=~"ledger:.*"})') >= 6
        assert prom.scalar('sum(ipsec_supervisor_leftovers_by_rule{rule=~"marker:.*"})') is None
        # ... was claimed by the restarted charon: nothing removed, nothing pending, nothing stale
        prom.wait_for("ipsec_supervisor_adopt_in_progress", lambda v: v == 0)
        prom.wait_for('ipsec_supervisor_adopt_leftovers{result="claimed"}', lambda v: v >= 3)
        assert prom.scalar('ipsec_supervisor_adopt_leftovers{result="removed"}') == 0
        assert prom.scalar('ipsec_supervisor_adopt_leftovers{result="pending"}') == 0
        assert prom.scalar("ipsec_supervisor_stale_leftovers") == 0
        assert prom.scalar("ipsec_supervisor_death_to_ready_seconds_count") == 1
        assert 0 < prom.scalar("ipsec_supervisor_death_to_ready_seconds_sum") < 30
        assert prom.scalar("ipsec_supervisor_snapshots_on_disk") == 1
        prom.wait_for("ipsec_charon_up", lambda v: v == 1)
        prom.wait_for("ipsec_charon_trap_policies", lambda v: v == 1)
        # the shipped rules load and evaluate against real series
        rules = json.loads(get(netns, f"http://{PROM_LISTEN}/api/v1/rules"))["data"]["groups"]
        assert [r["health"] for g in rules for r in g["rules"]] == ["ok"] * 7
        assert prom.query('ALERTS{alertname=~"IPsecRecoveryFailed|IPsecStaleLeftovers"}') == []
        assert sup.stop() == 0
    finally:
        prom.stop()
    assert not os.path.exists(prom.data)


def test_a_scrape_while_charon_is_stopped_returns_within_the_timeout_with_charon_down(supervised, netns):
    sup = supervised(metrics={"vici_timeout": "800ms"})
    m, _ = scrape(netns)
    assert value(m, "ipsec_charon_up") == 1
    pid = sup.charon_pid
    os.kill(pid, signal.SIGSTOP)
    try:
        for _ in range(3):
            m, took = scrape(netns)
            assert took < 0.8 + 0.5, took
            assert value(m, "ipsec_charon_up") == 0
            assert value(m, "ipsec_supervisor_charon_up") == 1
            assert value(m, "ipsec_supervisor_state", state="running") == 1
    finally:
        os.kill(pid, signal.SIGCONT)
    m, _ = scrape(netns)
    assert value(m, "ipsec_charon_up") == 1
    assert sup.stop() == 0


def test_a_thousand_trap_policies_scrape_in_under_a_second_within_the_label_bound(supervised, netns):
    sup = supervised(swanctl_conf=trap_conns_conf(1000, lambda i: f"10.{2 + i // 250}.{i % 250}.0/24", prefix="t"), mode="flush", metrics={"max_children": 100},
                     daemon={"load_timeout": "120s"})
    m, _ = scrape(netns)               # the first one warms up (imports, sockets)
    times = []
    for _ in range(3):
        m, took = scrape(netns)
        times.append(took)
    assert value(m, "ipsec_charon_trap_policies") == 1000
    assert value(m, "ipsec_charon_connections_loaded") == 1000
    assert value(m, "ipsec_charon_aggregated") == 2
    per_family: dict[str, int] = {}
    for (name, _labels) in m:
        per_family[name] = per_family.get(name, 0) + 1
    assert max(n for name, n in per_family.items() if name.startswith("ipsec_")) <= 100, per_family
    assert max(times) < 1.0, times
    print(f"scrape with 1000 trap policies: {', '.join(f'{t * 1000:.0f} ms' for t in times)}; "
          f"{len(m)} samples")
    assert sup.stop() == 0
