"""End to end: exporter-style metrics of an imbalanced cluster -> a real Prometheus running the
project's rules -> a real Alertmanager running alerts/alertmanager.yml -> a webhook receiver.

What the test changes, and only for time: the alert rules are loaded from a copy of
alerts/vmbalance.alerts.yml whose `for:` durations run 300 times faster (5m -> 1s, 30m -> 6s;
the real holds are covered by the promtool unit tests in alerts/tests); Prometheus scrapes and
evaluates every second and re-sends firing alerts every second (an alert that fires in the
first evaluation, before Prometheus has discovered the Alertmanager, would otherwise wait a
minute); Alertmanager's group_wait and group_interval are 1s and its webhook URLs point at
the test's receiver. The recording rules are the project's file, unchanged.

The cluster is served live by a small HTTP target in the exporter's format. Its counters are
linear in time, and the ten minutes before the test are backfilled with the same functions, so
the 5-minute rates are the target's true rates from the first evaluation on (a fresh series
would need five minutes of scrapes). Three nodes: pve1 hot (disk and network at 88 % of the
default capacities), pve2 quiet, pve3's exporter unable to read its hypervisor
(`vmbalance_up 0`); vmbalance serve reports a VM that fits nowhere.

Checked: the imbalance alert reaches the `team` receiver with the imbalance measure.py gives
for those loads; the critical alert reaches `pager`; the backend alert reaches `team`; once
that is delivered pve3 starts skipping VMs, and that scrape-error alert is inhibited by the
backend alert and never delivered.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import yaml

from devkit.servers import AlertmanagerServer, PrometheusServer, backfill
from recommender.config import BalanceSettings, CapacitySettings
from recommender.engine.measure import imbalance_per_resource, overall_imbalance, weight_vector
from recommender.model import RESOURCES
from tests.promstack import HTTPEndpoint

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "alerts" / "vmbalance.rules.yml"
ALERTS = REPO / "alerts" / "vmbalance.alerts.yml"
ALERTMANAGER = REPO / "alerts" / "alertmanager.yml"

GIB = 1024**3
HISTORY = 600.0  # seconds backfilled before the test
HISTORY_STEP = 5.0
DELIVERY_TIMEOUT = 40.0
TIME_SCALE = 300  # the alerts' `for:` holds run this many times faster

NODES = {
    "pve1": {"cpus": 16, "memory": 64 * GIB, "up": 1},
    "pve2": {"cpus": 16, "memory": 64 * GIB, "up": 1},
    "pve3": {"cpus": 16, "memory": 64 * GIB, "up": 0},
}
# vm -> node, assigned memory and rates (cores, bytes/s, ops/s).
VMS = {
    "101": {
        "node": "pve1",
        "memory": 48 * GIB,
        "cpu": 12.0,
        "read": 8e8,
        "written": 3e8,
        "reads": 4000.0,
        "writes": 1000.0,
        "rx": 6e8,
        "tx": 5e8,
    },
    "102": {
        "node": "pve2",
        "memory": 8 * GIB,
        "cpu": 1.0,
        "read": 1e6,
        "written": 1e6,
        "reads": 100.0,
        "writes": 100.0,
        "rx": 2e6,
        "tx": 1e6,
    },
}
SCRAPE_ERRORS_PER_SECOND = 1.0  # pve3 skips a VM every second once errors start

COUNTERS = {
    "vmbalance_vm_cpu_seconds_total": ("cpu", None),
    "vmbalance_vm_disk_read_bytes_total": ("read", ("disk", "vda")),
    "vmbalance_vm_disk_written_bytes_total": ("written", ("disk", "vda")),
    "vmbalance_vm_disk_reads_completed_total": ("reads", ("disk", "vda")),
    "vmbalance_vm_disk_writes_completed_total": ("writes", ("disk", "vda")),
    "vmbalance_vm_network_receive_bytes_total": ("rx", ("interface", "vnet0")),
    "vmbalance_vm_network_transmit_bytes_total": ("tx", ("interface", "vnet0")),
}


def exporter_samples(
    t: float, t0: float, errors_since: float | None = None
) -> list[tuple[str, str, dict[str, str], float]]:
    """(name, type, labels, value) the exporters of the three nodes publish at time t; pve3
    skips VMs from `errors_since` on (never when None)."""
    out: list[tuple[str, str, dict[str, str], float]] = []
    for node, facts in NODES.items():
        out.append(("vmbalance_node_info", "gauge", {"node": node, "backend": "libvirt"}, 1.0))
        out.append(("vmbalance_node_cpus", "gauge", {"node": node}, float(facts["cpus"])))
        out.append(("vmbalance_node_memory_bytes", "gauge", {"node": node}, facts["memory"]))
        out.append(("vmbalance_up", "gauge", {"node": node}, float(facts["up"])))
        errors = 0
        if node == "pve3" and errors_since is not None:
            errors = max(0, math.floor((t - errors_since) * SCRAPE_ERRORS_PER_SECOND))
        out.append(("vmbalance_vm_scrape_errors_total", "counter", {"node": node}, errors))
    for vm, facts in VMS.items():
        base = {"node": str(facts["node"]), "vm": vm}
        info = {**base, "name": f"vm-{vm}", "uuid": f"00000000-0000-0000-0000-000000000{vm}"}
        out.append(("vmbalance_vm_info", "gauge", {**info, "backend": "libvirt"}, 1.0))
        out.append(("vmbalance_vm_memory_max_bytes", "gauge", base, float(facts["memory"])))
        for name, (key, device) in COUNTERS.items():
            labels = dict(base, **({device[0]: device[1]} if device else {}))
            out.append((name, "counter", labels, float(facts[key]) * (t - t0)))
    return out


def serve_samples(t: float) -> list[tuple[str, str, dict[str, str], float]]:
    return [
        ("vmbalance_recommender_up", "gauge", {}, 1.0),
        ("vmbalance_recommender_unplaceable_vms", "gauge", {}, 1.0),
        ("vmbalance_recommender_planned_migrations", "gauge", {}, 0.0),
        ("vmbalance_recommender_last_success_timestamp_seconds", "gauge", {}, t),
    ]


def _labels(labels: dict[str, str]) -> str:
    inner = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return "{" + inner + "}" if inner else ""


def exposition(samples: list[tuple[str, str, dict[str, str], float]]) -> bytes:
    """Prometheus text format 0.0.4."""
    lines: list[str] = []
    typed: set[str] = set()
    for name, kind, labels, value in samples:
        if name not in typed:
            lines.append(f"# TYPE {name} {kind}")
            typed.add(name)
        lines.append(f"{name}{_labels(labels)} {value!r}")
    return ("\n".join(lines) + "\n").encode()


def openmetrics_history(t0: float, end: float, instance: str) -> str:
    """The exporter's series from t0 to end, and `up`, as Prometheus would have scraped
    them."""
    by_family: dict[str, list[str]] = {}
    kinds: dict[str, str] = {}
    for t in np.arange(t0, end, HISTORY_STEP):
        scraped = [("up", "gauge", {}, 1.0), *exporter_samples(float(t), t0)]
        for name, kind, labels, value in scraped:
            family = name.removesuffix("_total") if kind == "counter" else name
            kinds[family] = kind
            full = {**labels, "instance": instance, "job": "vmbalance-exporter"}
            by_family.setdefault(family, []).append(f"{name}{_labels(full)} {value!r} {t:.3f}")
    lines: list[str] = []
    for family, samples in by_family.items():
        lines.append(f"# TYPE {family} {kinds[family]}")
        # OpenMetrics wants each series' samples together, in time order.
        samples.sort(key=lambda line: line.rsplit(" ", 2)[0])
        lines.extend(samples)
    lines.append("# EOF")
    return "\n".join(lines) + "\n"


def expected_imbalance() -> float:
    """measure.py on the target's loads: pve3 is not active (vmbalance_up 0), capacities and
    weights are the defaults (no serve capacity), memory is assigned memory."""
    active = [n for n, facts in NODES.items() if facts["up"] == 1]
    cap = CapacitySettings()
    capacity = np.array(
        [
            [
                NODES[n]["cpus"],
                NODES[n]["memory"],
                cap.disk_bytes,
                cap.disk_ops,
                cap.network,
            ]
            for n in active
        ],
        dtype=float,
    )
    load = np.zeros_like(capacity)
    for facts in VMS.values():
        i = active.index(str(facts["node"]))
        load[i] += [
            facts["cpu"],
            facts["memory"],
            facts["read"] + facts["written"],
            facts["reads"] + facts["writes"],
            facts["rx"] + facts["tx"],
        ]
    per = imbalance_per_resource(load, capacity)
    weights = weight_vector(BalanceSettings().weights, RESOURCES)
    return overall_imbalance(np.where(weights > 0, per, 0.0), weights)


def _faster(duration: str) -> str:
    """A PromQL duration 300 times shorter (in whole seconds, at least 1s)."""
    match = re.fullmatch(r"([0-9]+)([smh])", duration)
    assert match, duration
    seconds = int(match.group(1)) * {"s": 1, "m": 60, "h": 3600}[match.group(2)]
    return f"{max(1, round(seconds / TIME_SCALE))}s"


def _fast_alert_rules(path: Path) -> Path:
    data = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    for group in data["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                rule["for"] = _faster(rule["for"])
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def _fast_alertmanager_config(webhook: str) -> dict[str, Any]:
    config = yaml.safe_load(ALERTMANAGER.read_text(encoding="utf-8"))
    config["route"]["group_wait"] = "1s"
    config["route"]["group_interval"] = "1s"
    for receiver in config["receivers"]:
        for hook in receiver["webhook_configs"]:
            hook["url"] = f"{webhook}/{receiver['name']}"
    return config


def _delivered(receiver: str, alertname: str, **labels: str) -> Any:
    def match(path: str, body: Any) -> bool:
        if path != f"/{receiver}" or body.get("status") != "firing":
            return False
        return any(
            a["labels"].get("alertname") == alertname
            and all(a["labels"].get(k) == v for k, v in labels.items())
            for a in body["alerts"]
        )

    return match


@dataclass
class Stack:
    prometheus: PrometheusServer
    alertmanager: AlertmanagerServer
    webhook: HTTPEndpoint
    errors_since: list[float]  # empty until the test starts pve3's scrape errors


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    t0 = math.floor(time.time()) - HISTORY
    errors_since: list[float] = []

    def answer(path: str) -> tuple[int, str, bytes]:
        now = time.time()
        if path == "/metrics":
            since = errors_since[0] if errors_since else None
            samples = exporter_samples(now, t0, since)
            return 200, "text/plain; version=0.0.4", exposition(samples)
        if path == "/serve":
            return 200, "text/plain; version=0.0.4", exposition(serve_samples(now))
        return 404, "text/plain", b"not found\n"

    with HTTPEndpoint(answer) as target, HTTPEndpoint() as webhook:
        instance = f"127.0.0.1:{target.port}"
        history = tmp_path / "history.om"
        history.write_text(openmetrics_history(t0, time.time() - 1.0, instance))
        backfill(history, tmp_path / "prom-data")
        alert_rules = _fast_alert_rules(tmp_path / "vmbalance.alerts.fast.yml")
        with AlertmanagerServer(tmp_path, _fast_alertmanager_config(webhook.url)) as am:
            scrape = [
                {"job_name": "vmbalance-exporter", "static_configs": [{"targets": [instance]}]},
                {
                    "job_name": "vmbalance-serve",
                    "metrics_path": "/serve",
                    "static_configs": [{"targets": [instance]}],
                },
            ]
            with PrometheusServer(
                tmp_path,
                scrape_configs=scrape,
                rule_files=[RULES, alert_rules],
                data_dir=tmp_path / "prom-data",
                interval="1s",
                alertmanagers=[f"127.0.0.1:{am.port}"],
                extra_args=["--rules.alert.resend-delay=1s"],
            ) as prometheus:
                yield Stack(prometheus, am, webhook, errors_since)


def test_imbalance_alert_is_delivered(stack: Stack) -> None:
    prometheus, alertmanager, webhook = stack.prometheus, stack.alertmanager, stack.webhook
    expected = expected_imbalance()
    assert expected > BalanceSettings().trigger

    _path, body = webhook.wait_for_post(
        _delivered("team", "VMBalanceImbalanceSustained"), DELIVERY_TIMEOUT
    )
    (alert,) = [
        a for a in body["alerts"] if a["labels"]["alertname"] == "VMBalanceImbalanceSustained"
    ]
    assert alert["labels"]["severity"] == "warning"
    assert alert["annotations"]["runbook_url"] == "docs/runbook.md#vmbalanceimbalancesustained"
    summary = alert["annotations"]["summary"]
    shown = re.search(r"Cluster imbalance ([0-9.]+)%", summary)
    assert shown, summary
    # The alert fires on the first evaluations, which Prometheus runs on the backfilled
    # history before its first scrape (service discovery holds scrapes back ~5 s): the
    # newest sample is then a few seconds old and the 5m rates read up to a few % low.
    assert float(shown.group(1)) / 100 == pytest.approx(expected, rel=0.05), summary
    assert "Worst resource: " in alert["annotations"]["description"]
    # Once scrapes run, the recorded imbalance is measure.py's to the rates' precision.
    prometheus.wait_for(
        "cluster:vmbalance_imbalance:ratio",
        lambda result: (
            bool(result) and float(result[0]["value"][1]) == pytest.approx(expected, rel=0.002)
        ),
        timeout=DELIVERY_TIMEOUT,
    )

    # Critical goes to the pager, the unreadable backend to the team.
    webhook.wait_for_post(_delivered("pager", "VMBalanceUnplaceableVMs"), DELIVERY_TIMEOUT)
    webhook.wait_for_post(
        _delivered("team", "VMBalanceBackendUnreachable", node="pve3"), DELIVERY_TIMEOUT
    )

    # Now pve3 also skips VMs: that alert fires too, but its unreachable backend (already in
    # Alertmanager, as it would be with the real holds of 5m and 15m) inhibits it.
    stack.errors_since.append(time.time())
    deadline = time.monotonic() + DELIVERY_TIMEOUT
    suppressed: list[dict[str, Any]] = []
    while time.monotonic() < deadline and not suppressed:
        response = requests.get(
            alertmanager.url + "/api/v2/alerts",
            params={"filter": 'alertname="VMBalanceVMScrapeErrors"'},
            timeout=10,
        )
        response.raise_for_status()
        suppressed = [a for a in response.json() if a["status"]["state"] == "suppressed"]
        time.sleep(0.2)
    assert suppressed, "VMBalanceVMScrapeErrors never reached Alertmanager"
    (scrape_errors,) = suppressed
    assert scrape_errors["labels"]["node"] == "pve3"
    assert scrape_errors["status"]["inhibitedBy"]
    # One more group interval for a notification that should not come.
    time.sleep(2.0)
    delivered = {
        a["labels"]["alertname"] for _path, body in list(webhook.posts) for a in body["alerts"]
    }
    assert delivered == {
        "VMBalanceImbalanceSustained",
        "VMBalanceNodeHotSpot",
        "VMBalanceBackendUnreachable",
        "VMBalanceUnplaceableVMs",
    }
