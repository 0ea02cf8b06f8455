"""The rule files in alerts/: promtool's checks and unit tests, the conventions every alert
follows, the runbook behind them, the fallbacks that must equal the recommender's defaults,
and the example Alertmanager config (amtool)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from recommender.config import BalanceSettings, CapacitySettings
from recommender.model import RESOURCES

REPO = Path(__file__).resolve().parent.parent
ALERTS = REPO / "alerts"
RULES = ALERTS / "vmbalance.rules.yml"
ALERT_RULES = ALERTS / "vmbalance.alerts.yml"
ALERTMANAGER = ALERTS / "alertmanager.yml"
RUNBOOK = REPO / "docs" / "runbook.md"
UNIT_TESTS = sorted((ALERTS / "tests").glob("*.yml"))

PROMTOOL = shutil.which("promtool")
AMTOOL = shutil.which("amtool")

SEVERITIES = {"critical", "warning", "info"}
RECORD_NAME = re.compile(r"^[a-z][a-z0-9_]*:[a-z][a-z0-9_]*:[a-z][a-z0-9_]*$")


def _rules(path: Path) -> list[dict[str, Any]]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    return [rule for group in data["groups"] for rule in group["rules"]]


def _alerts() -> list[dict[str, Any]]:
    return [rule for rule in _rules(ALERT_RULES) if "alert" in rule]


def _record(name: str) -> str:
    (rule,) = [r for r in _rules(RULES) if r.get("record") == name]
    return str(rule["expr"])


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


def _github_anchor(heading: str) -> str:
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed")
def test_promtool_check_rules_is_clean() -> None:
    assert PROMTOOL is not None
    argv = [PROMTOOL, "check", "rules", "--lint=all", "--lint-fatal", str(RULES), str(ALERT_RULES)]
    result = _run(argv)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    for line in output.splitlines():
        stripped = line.strip()
        assert stripped == "" or stripped.startswith(("Checking ", "SUCCESS: ")), output


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed")
def test_promtool_unit_tests_pass() -> None:
    assert PROMTOOL is not None
    assert UNIT_TESTS, "alerts/tests/*.yml is empty"
    result = _run([PROMTOOL, "test", "rules", *map(str, UNIT_TESTS)])
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "FAILED" not in output, output
    assert output.count("SUCCESS") == len(UNIT_TESTS), output


def test_every_alert_is_unit_tested_firing_and_not_firing() -> None:
    firing: set[str] = set()
    silent: set[str] = set()
    for path in UNIT_TESTS:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        for group in data["tests"]:
            for case in group.get("alert_rule_test", []):
                (firing if case.get("exp_alerts") else silent).add(case["alertname"])
    names = {rule["alert"] for rule in _alerts()}
    assert names - firing == set(), "alerts never tested firing"
    assert names - silent == set(), "alerts never tested not firing"
    assert (firing | silent) - names == set(), "tests of alerts that do not exist"


def test_alerts_have_severity_annotations_and_a_runbook_section() -> None:
    anchors = {
        _github_anchor(line.lstrip("#"))
        for line in RUNBOOK.read_text(encoding="utf-8").splitlines()
        if line.startswith("## ")
    }
    alerts = _alerts()
    assert len(alerts) >= 11
    for rule in alerts:
        name = rule["alert"]
        assert rule["labels"]["severity"] in SEVERITIES, name
        annotations = rule["annotations"]
        assert {"summary", "description", "runbook_url"} <= set(annotations), name
        url = annotations["runbook_url"]
        assert url == f"docs/runbook.md#{name.lower()}", name
        assert name.lower() in anchors, f"docs/runbook.md has no section for {name}"
        assert "for" in rule, f"{name} fires on a single evaluation"
        section = RUNBOOK.read_text(encoding="utf-8").split(f"## {name}\n", 1)[1].split("\n## ")[0]
        for part in ("**Meaning.**", "**Impact.**", "**Diagnosis.**", "**Remediation.**"):
            assert part in section, f"runbook section {name} lacks {part}"


def test_recording_rule_names_follow_level_metric_operations() -> None:
    records = [rule["record"] for rule in _rules(RULES) if "record" in rule]
    assert records
    for name in records:
        assert RECORD_NAME.match(name), name
    assert len(set(records)) == len(records)
    # Every alert that reads a recording rule reads one that exists.
    used = set()
    for rule in _alerts():
        used |= set(re.findall(r"[a-z_]+:[a-z0-9_]+:[a-z0-9_]+", rule["expr"]))
    assert used <= set(records)


def test_rules_read_only_documented_metrics() -> None:
    """Every vmbalance_* series the rules read is in docs/metrics.md (exporter or serve)."""
    metrics = (REPO / "docs" / "metrics.md").read_text(encoding="utf-8")
    documented = {
        line.split("`")[1] for line in metrics.splitlines() if line.startswith("| `vmbalance_")
    }
    used: set[str] = set()
    for path in (RULES, ALERT_RULES):
        for rule in _rules(path):
            used |= set(re.findall(r"(?<![\w:])vmbalance_\w+(?![\w:])", rule["expr"]))
            for text in rule.get("annotations", {}).values():
                used |= set(re.findall(r"(?<![\w:])vmbalance_\w+(?![\w:])", text))
    assert used
    assert used - documented == set()


def test_fallbacks_equal_the_recommenders_defaults() -> None:
    """Without vmbalance serve the rules use constants; they must be the config defaults."""
    capacity = CapacitySettings()
    balance = BalanceSettings()
    cap_expr = _record("node_resource:vmbalance_capacity:max")
    found = {
        resource: float(value)
        for value, resource in re.findall(r"\+ ([0-9.e]+), \"resource\", \"(\w+)\"", cap_expr)
    }
    assert found == {
        "disk_bytes": capacity.disk_bytes,
        "disk_ops": capacity.disk_ops,
        "network": capacity.network,
    }
    weights = {
        resource: float(value)
        for value, resource in re.findall(
            r"vector\(([0-9.]+)\), \"resource\", \"(\w+)\"",
            _record("resource:vmbalance_weight:max"),
        )
    }
    assert weights == {r: balance.weights.get(r, 0.0) for r in RESOURCES}
    (trigger,) = re.findall(
        r"vector\(([0-9.]+)\)", _record("cluster:vmbalance_imbalance_trigger:ratio")
    )
    assert float(trigger) == balance.trigger
    # Memory load is assigned memory, as the recommender counts it by default.
    assert balance.memory_mode == "assigned"
    assert "vmbalance_vm_memory_max_bytes" in _record("node:vmbalance_memory_assigned_bytes:sum")


def test_alertmanager_example() -> None:
    config = yaml.safe_load(ALERTMANAGER.read_text(encoding="utf-8"))
    route = config["route"]
    assert {"alertname", "node"} <= set(route["group_by"])
    receivers = {r["name"]: r for r in config["receivers"]}
    assert all(r.get("webhook_configs") for r in receivers.values())
    inhibits = config["inhibit_rules"]
    down = [i for i in inhibits if 'alertname="VMBalanceExporterDown"' in i["source_matchers"]]
    assert down and "VMBalanceVMScrapeErrors" in down[0]["target_matchers"][0]
    # Every alert name an inhibit rule mentions exists.
    names = {rule["alert"] for rule in _alerts()}
    for rule in inhibits:
        for matcher in (*rule["source_matchers"], *rule["target_matchers"]):
            mentioned = re.findall(r"VMBalance\w+", matcher)
            assert set(mentioned) <= names, matcher


@pytest.mark.skipif(AMTOOL is None, reason="amtool is not installed")
def test_amtool_checks_config_and_routes_each_severity() -> None:
    assert AMTOOL is not None
    result = _run([AMTOOL, "check-config", str(ALERTMANAGER)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout, result.stdout
    expected = {"critical": "pager", "warning": "team", "info": "team-low"}
    severities = {rule["labels"]["severity"] for rule in _alerts()}
    assert severities <= set(expected)
    for severity, receiver in expected.items():
        labels = [f"severity={severity}", "alertname=VMBalanceImbalanceSustained"]
        result = _run(
            [AMTOOL, "config", "routes", "test", f"--config.file={ALERTMANAGER}", *labels]
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.strip() == receiver, (severity, result.stdout)
