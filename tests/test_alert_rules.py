"""The shipped alert rules: valid for Prometheus (promtool check) and each alert fires when it should (promtool test)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RULES = os.path.join(ROOT, "etc", "prometheus", "ipsec-supervisor-rules.yml")
RULES_TEST = os.path.join(ROOT, "tests", "prometheus", "ipsec-supervisor-rules.test.yml")
PROMTOOL = shutil.which("promtool")

needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="needs promtool (Debian package prometheus)")


def alerts() -> list[dict]:
    with open(RULES) as fh:
        return [r for g in yaml.safe_load(fh)["groups"] for r in g["rules"] if "alert" in r]


@needs_promtool
def test_promtool_accepts_the_rules():
    out = subprocess.run([PROMTOOL, "check", "rules", RULES], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in out.stdout


@needs_promtool
def test_every_alert_fires_from_synthetic_series_and_stays_quiet_otherwise():
    out = subprocess.run([PROMTOOL, "test", "rules", RULES_TEST], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    with open(RULES_TEST) as fh:
        tests = yaml.safe_load(fh)["tests"]
    fired = {t["alertname"] for case in tests for t in case["alert_rule_test"] if t["exp_alerts"]}
    quiet = {t["alertname"] for case in tests for t in case["alert_rule_test"] if not t["exp_alerts"]}
    assert fired == quiet == {a["alert"] for a in alerts()}


def test_every_alert_has_a_summary_and_a_runbook_in_the_readme():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    headings = {re.sub(r"[^a-z0-9-]", "", h.strip().lower().replace(" ", "-"))
                for h in re.findall(r"^#+ (.*)$", readme, re.M)}
    for a in alerts():
        ann = a["annotations"]
        assert ann["summary"] and ann["description"], a["alert"]
        anchor = re.match(r"README\.md#([a-z0-9-]+) ", ann["runbook"]).group(1)
        assert anchor == a["alert"].lower() and anchor in headings, (a["alert"], ann["runbook"])
