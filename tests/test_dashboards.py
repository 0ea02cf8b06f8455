"""The Grafana dashboards in grafana/dashboards: the conventions every panel follows, and every
panel and variable query run against a real Prometheus holding demo data.

The demo data is a simulated cluster history backfilled up to now, plus what Prometheus
itself and `vmbalance serve` would have added (`up`, `scrape_duration_seconds`,
`vmbalance_recommender_*`). Prometheus runs the project's recording rules on it (they read the
last 5 minutes of the backfilled samples), so panels reading recorded series have data too.
Grafana's macros are replaced as Grafana would for a one-hour range at 60 s samples.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import requests
import yaml

from devkit.servers import PrometheusServer, backfill
from devkit.simulate import ClusterHistory, Series, simulate_cluster, to_openmetrics_blocks
from exporter.samples import BLOCKER_REASONS
from recommender.model import RESOURCES

REPO = Path(__file__).resolve().parent.parent
DASHBOARDS = sorted((REPO / "grafana" / "dashboards").glob("*.json"))
PROVISIONING = REPO / "grafana" / "provisioning"
RULE_FILES = [REPO / "alerts" / "vmbalance.rules.yml", REPO / "alerts" / "vmbalance.alerts.yml"]

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
STEP = 60.0
RANGE_SECONDS = 3600.0
# What Grafana substitutes for a 1 h range of 60 s samples ($__rate_interval: four samples).
MACROS = {
    "$__rate_interval": "4m",
    "$__interval_ms": "60000",
    "$__interval": "1m",
    "$__range_s": "3600",
    "$__range_ms": "3600000",
    "$__range": "1h",
}
RANGE_SELECTOR = re.compile(r"\[([^\]]*)\]")
MATCHER = re.compile(r"\b(cluster|node|vm)\s*(=~|!~|!=|=)\s*\"([^\"]*)\"")
VARIABLE = re.compile(r"\$\{?(\w+)\}?")
LABEL_VALUES = re.compile(r"^label_values\(\s*(?:(.+?)\s*,\s*)?(\w+)\s*\)$")


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def _exprs(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) of every panel target and query variable."""
    for panel in _panels(dashboard):
        for target in panel["targets"]:
            yield f"{dashboard['uid']}/{panel['title']}/{target['refId']}", target["expr"]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            yield f"{dashboard['uid']}/${var['name']}", _variable_query(var)


def _variable_query(var: dict[str, Any]) -> str:
    query = var["query"]
    return str(query["query"] if isinstance(query, dict) else query)


# --- conventions -------------------------------------------------------------------------


def test_there_are_the_four_dashboards() -> None:
    uids = {_load(p)["uid"] for p in DASHBOARDS}
    assert uids == {
        "vmbalance-overview",
        "vmbalance-node",
        "vmbalance-vm",
        "vmbalance-exporters",
    }


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_dashboard_is_provisionable(path: Path) -> None:
    dashboard = _load(path)
    assert dashboard["schemaVersion"] >= 39
    assert dashboard.get("id") is None, "provisioned dashboards carry no database id"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_dashboard_variables_read_the_chosen_datasource(path: Path) -> None:
    variables = _variables(_load(path))
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    for var in variables.values():
        if var["type"] == "query":
            assert var["datasource"] == DATASOURCE, var["name"]
            assert LABEL_VALUES.match(_variable_query(var)), var["name"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_dashboard_panels_say_what_they_show(path: Path) -> None:
    dashboard = _load(path)
    panels = list(_panels(dashboard))
    assert panels
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels:
        title = panel["title"]
        assert panel["type"] in {"timeseries", "stat", "table"}, title
        assert panel["datasource"] == DATASOURCE, title
        unit = panel["fieldConfig"]["defaults"].get("unit")
        assert isinstance(unit, str) and unit, f"{title}: no unit"
        assert panel.get("description"), f"{title}: no description"
        assert panel["targets"], title
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, title


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_dashboard_queries_take_ranges_and_names_from_variables(path: Path) -> None:
    dashboard = _load(path)
    variables = _variables(dashboard)
    for where, expr in _exprs(dashboard):
        for selector in RANGE_SELECTOR.findall(expr):
            assert selector == "$__rate_interval", f"{where}: [{selector}] in {expr}"
        for function in re.findall(r"\b(irate|rate|increase)\s*\(", expr):
            assert "[$__rate_interval]" in expr, f"{where}: {function} without $__rate_interval"
        for label, _op, value in MATCHER.findall(expr):
            assert value.startswith("$"), f"{where}: literal {label} {value!r}"
        for name in VARIABLE.findall(expr):
            if not name.startswith("__"):
                assert name in variables, f"{where}: ${name} is not a variable"
    # Node and VM are chosen with variables, never typed into a query.
    text = json.dumps([e for _, e in _exprs(dashboard)])
    assert not re.search(r"\bpve\d", text)


def _variables(dashboard: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dashboard["templating"]["list"]}


# Series that are one for the whole fleet: the recommender's own, its executed migrations and
# the config's trigger.
FLEET_WIDE = re.compile(
    r"^(vmbalance_(recommender|apply)_\w+|cluster:vmbalance_imbalance_trigger:ratio)$"
)
SERIES = re.compile(r"(?<![\w:\"])((?:[a-z_]+:)?vmbalance_[a-z_]+(?::[a-z0-9_]+)?)(\{[^}]*\})?")


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_every_panel_shows_the_chosen_cluster(path: Path) -> None:
    """Node names repeat across clusters: every exporter series and recorded rule a panel
    reads is narrowed to `$cluster`, the first variable after the data source."""
    dashboard = _load(path)
    names = [v["name"] for v in dashboard["templating"]["list"]]
    assert names[:2] == ["datasource", "cluster"]
    for where, expr in _exprs(dashboard):
        for name, selector in SERIES.findall(expr):
            if FLEET_WIDE.match(name) or where.endswith("/$cluster"):
                continue
            assert 'cluster="$cluster"' in selector, f"{where}: {name}{selector}"


def test_the_overview_shows_the_migration_blockers() -> None:
    overview = _load(REPO / "grafana" / "dashboards" / "vmbalance-overview.json")
    exprs = {title: expr for title, expr in _exprs(overview)}
    blockers = exprs["vmbalance-overview/Migration blockers/A"]
    assert "vmbalance_vm_migration_blocker" in blockers and "reason" in blockers


def test_dashboards_read_only_documented_metrics() -> None:
    """Every series a dashboard reads is in docs/metrics.md, a recording rule of
    alerts/vmbalance.rules.yml, or one Prometheus adds itself."""
    metrics = (REPO / "docs" / "metrics.md").read_text(encoding="utf-8")
    documented = {
        line.split("`")[1] for line in metrics.splitlines() if line.startswith("| `vmbalance_")
    }
    rules = yaml.safe_load(RULE_FILES[0].read_text(encoding="utf-8"))
    recorded = {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}
    for path in DASHBOARDS:
        for where, expr in _exprs(_load(path)):
            for name in re.findall(r"(?<![\w:])vmbalance_\w+(?![\w:])", expr):
                family = re.sub(r"_(bucket|sum|count)$", "", name)  # a histogram's series
                assert name in documented or family in documented, (
                    f"{where}: {name} is not in docs/metrics.md"
                )
            for name in re.findall(r"\b\w*:vmbalance_\w+:\w+", expr):
                assert name in recorded, f"{where}: {name} is not a recording rule"
            for name in re.findall(r"\b(up|scrape_\w+)\{", expr):
                assert name in {"up", "scrape_duration_seconds"}, where


def test_provisioning_points_at_the_dashboards() -> None:
    provider = yaml.safe_load((PROVISIONING / "dashboards" / "vmbalance.yml").read_text())
    (entry,) = provider["providers"]
    assert entry["type"] == "file"
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{entry['options']['path']}:ro" in mounts
    datasources = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"


# --- every query against demo data ------------------------------------------------------


def _serve_and_prometheus_series(history: ClusterHistory, directory: Path) -> None:
    """OpenMetrics for what Prometheus (up, scrape_duration_seconds) and vmbalance serve
    would have recorded over the history."""
    times = history.times.astype(np.int64)
    serve = 'instance="serve:9643",job="vmbalance-serve"'
    lines: list[str] = []

    def gauge(name: str, rows: list[tuple[str, list[float]]], kind: str = "gauge") -> None:
        family = name.removesuffix("_total") if kind == "counter" else name
        lines.append(f"# TYPE {family} {kind}")
        for labels, values in rows:
            lines.extend(
                f"{name}{{{labels}}} {v!r} {t}" for t, v in zip(times, values, strict=True)
            )

    n = len(times)
    wave = 0.05 * np.sin(np.arange(n) / 20.0)
    gauge(
        "up",
        [
            (f'instance="{node.name}:9641",job="vmbalance-exporter"', [1.0] * n)
            for node in history.nodes
        ]
        + [(serve, [1.0] * n)],
    )
    gauge(
        "scrape_duration_seconds",
        [
            (f'instance="{node.name}:9641",job="vmbalance-exporter"', [0.05] * n)
            for node in history.nodes
        ],
    )
    imbalance = [
        (f'{serve},resource="{r}"', (0.12 + wave + 0.01 * i).tolist())
        for i, r in enumerate((*RESOURCES, "overall"))
    ]
    gauge("vmbalance_recommender_imbalance_ratio", imbalance)
    after = [(labels, [v * 0.5 for v in values]) for labels, values in imbalance]
    gauge("vmbalance_recommender_imbalance_after_ratio", after)
    gauge("vmbalance_recommender_trigger_ratio", [(serve, [0.2] * n)])
    gauge("vmbalance_recommender_target_ratio", [(serve, [0.1] * n)])
    capacity = []
    for node in history.nodes:
        caps = (node.cpus, node.memory_bytes, node.disk_bytes, node.disk_ops, node.network)
        for resource, value in zip(RESOURCES, caps, strict=True):
            capacity.append(
                (f'{serve},node="{node.name}",resource="{resource}"', [float(value)] * n)
            )
    gauge("vmbalance_recommender_node_capacity", capacity)
    gauge("vmbalance_recommender_planned_migrations", [(serve, [2.0] * n)])
    gauge("vmbalance_recommender_predicted_gain_ratio", [(serve, (0.06 + wave / 2).tolist())])
    gauge("vmbalance_recommender_unplaceable_vms", [(serve, [0.0] * n)])
    gauge(
        "vmbalance_recommender_last_success_timestamp_seconds",
        [(serve, times.astype(float).tolist())],
    )
    gauge("vmbalance_recommender_up", [(serve, [1.0] * n)])
    gauge("vmbalance_recommender_run_duration_seconds", [(serve, [1.5] * n)])
    gauge(
        "vmbalance_recommender_runs_total", [(serve, np.arange(n, dtype=float).tolist())], "counter"
    )
    gauge("vmbalance_recommender_errors_total", [(serve, [0.0] * n)], "counter")
    # serve's automation executing a migration every 10 minutes, one in 6 failing, 40 s each.
    started = np.arange(n) // 10
    executed = f'{serve},cluster="{CLUSTER}"'  # the executed plans' cluster
    failed = started // 6
    gauge(
        "vmbalance_apply_migrations_total",
        [
            (f'{executed},result="done"', (started - failed).astype(float).tolist()),
            (f'{executed},result="failed"', failed.astype(float).tolist()),
        ],
        "counter",
    )
    gauge(
        "vmbalance_apply_migrations_in_flight",
        [(executed, ((np.arange(n) % 10 == 0) * 1.0).tolist())],
    )
    duration = "vmbalance_apply_migration_duration_seconds"
    lines.append(f"# TYPE {duration} histogram")
    for t, ran in zip(times, started, strict=True):  # one histogram point's samples together
        for le, count in (("30.0", 0), ("60.0", ran), ("+Inf", ran)):
            lines.append(f'{duration}_bucket{{{executed},le="{le}"}} {count} {t}')
        lines.append(f"{duration}_count{{{executed}}} {ran} {t}")
        lines.append(f"{duration}_sum{{{executed}}} {40.0 * ran} {t}")
    lines.append("# EOF")
    (directory / "zz-prometheus-and-serve.om").write_text("\n".join(lines) + "\n", encoding="utf-8")


CLUSTER = "demo"


@dataclass
class InCluster:
    """A simulated history whose series carry the `cluster` label, as every exporter's do."""

    history: ClusterHistory
    cluster: str

    @property
    def times(self) -> np.ndarray:
        return self.history.times

    def series(self) -> Iterator[Series]:
        for s in self.history.series():
            yield dataclasses.replace(s, labels=(("cluster", self.cluster), *s.labels))


def _migration_series(history: ClusterHistory, directory: Path) -> None:
    """What the exporters publish about moving each VM: its disks (one shared, one local),
    HA management and one blocker per VM, on the node it started on."""
    times = history.times.astype(np.int64)
    rows: dict[str, list[tuple[str, float]]] = {}
    for index, sim in enumerate(history.vms):
        node = history.initial_node[sim.vm]
        base = f'cluster="{CLUSTER}",node="{node}",vm="{sim.vm}"'
        rows.setdefault("vmbalance_vm_disk_info", []).extend([
            (f'{base},disk="scsi0",storage="ceph-vm",shared="1"', 1.0),
            (f'{base},disk="virtio1",storage="local-lvm",shared="0"', 1.0),
        ])  # fmt: skip
        rows.setdefault("vmbalance_vm_disk_size_bytes", []).extend(
            [(f'{base},disk="scsi0"', 32.0 * 2**30), (f'{base},disk="virtio1"', 8.0 * 2**30)]
        )
        rows.setdefault("vmbalance_vm_ha_managed", []).append((base, float(index % 2)))
        reason = BLOCKER_REASONS[index % len(BLOCKER_REASONS)]
        rows.setdefault("vmbalance_vm_migration_blocker", []).append(
            (f'{base},reason="{reason}"', 1.0)
        )
    lines = []
    for name, series in rows.items():
        lines.append(f"# TYPE {name} gauge")
        for labels, value in series:
            lines.extend(f"{name}{{{labels}}} {value!r} {t}" for t in times)
    lines.append("# EOF")
    (directory / "zz-migration.om").write_text("\n".join(lines) + "\n", encoding="utf-8")


@dataclass
class Demo:
    history: ClusterHistory
    prometheus: PrometheusServer
    now: float


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    tmp = tmp_path_factory.mktemp("dashboards")
    end = math.floor(time.time() / STEP) * STEP
    history = simulate_cluster(5, nodes=3, vms=12, duration=3 * 3600, step=STEP, end=end)
    data = tmp / "om"
    to_openmetrics_blocks(cast(ClusterHistory, InCluster(history, CLUSTER)), data)
    _serve_and_prometheus_series(history, data)
    _migration_series(history, data)
    backfill(data, tmp / "prom-data")
    with PrometheusServer(
        tmp, rule_files=RULE_FILES, data_dir=tmp / "prom-data", interval="1s"
    ) as prometheus:
        # The recording rules evaluate every second on the last 5 minutes of backfilled data.
        prometheus.wait_for("cluster:vmbalance_imbalance:ratio", bool, timeout=30)
        prometheus.wait_for("node_resource:vmbalance_utilisation:ratio", bool, timeout=30)
        yield Demo(history, prometheus, time.time())


def _api(prometheus: PrometheusServer, path: str, params: dict[str, Any]) -> Any:
    response = requests.post(prometheus.url + path, data=params, timeout=30)
    body = response.json()
    assert response.status_code == 200 and body.get("status") == "success", (params, body)
    assert not body.get("warnings"), (params, body["warnings"])
    return body["data"]


def _variable_values(demo: Demo, query: str) -> list[str]:
    """What Grafana's Prometheus data source lists for a label_values() variable."""
    match = LABEL_VALUES.match(query)
    assert match, query
    metric, label = match.groups()
    params: dict[str, Any] = {"start": demo.now - RANGE_SECONDS, "end": demo.now}
    if metric:
        params["match[]"] = metric
    response = requests.get(
        f"{demo.prometheus.url}/api/v1/label/{label}/values", params=params, timeout=30
    )
    body = response.json()
    assert response.status_code == 200 and body["status"] == "success", body
    return list(body["data"])


def _substitute(expr: str, values: dict[str, str]) -> str:
    for macro, value in MACROS.items():
        expr = expr.replace(macro, value)
    for name, value in values.items():
        expr = expr.replace("${" + name + "}", value).replace("$" + name, value)
    assert "$" not in expr, expr
    return expr


@pytest.mark.slow
@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_every_query_returns_data(demo: Demo, path: Path) -> None:
    dashboard = _load(path)
    values: dict[str, str] = {}
    for var in dashboard["templating"]["list"]:
        if var["type"] != "query":
            continue
        found = _variable_values(demo, _substitute(_variable_query(var), values))
        assert found, f"variable ${var['name']} lists nothing"
        values[var["name"]] = found[0]
    assert values.get("cluster") == CLUSTER
    assert values.get("node", "pve1") in {n.name for n in demo.history.nodes}
    assert values.get("vm", "101") in {v.vm for v in demo.history.vms}
    checked = 0
    for panel in _panels(dashboard):
        for target in panel["targets"]:
            expr = _substitute(target["expr"], values)
            where = f"{panel['title']}/{target['refId']}: {expr}"
            if target.get("instant"):
                data = _api(demo.prometheus, "/api/v1/query", {"query": expr, "time": demo.now})
                assert data["result"], f"no data: {where}"
            else:
                data = _api(
                    demo.prometheus,
                    "/api/v1/query_range",
                    {
                        "query": expr,
                        "start": demo.now - RANGE_SECONDS,
                        "end": demo.now,
                        "step": STEP,
                    },
                )
                assert data["result"], f"no data: {where}"
                assert any(series["values"] for series in data["result"]), where
            checked += 1
    assert checked == sum(len(p["targets"]) for p in _panels(dashboard))
