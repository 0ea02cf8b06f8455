"""The Prometheus source against a real Prometheus (history backfilled with promtool) and a
real VictoriaMetrics (the same samples imported), compared with the simulator's truth."""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from devkit.servers import PrometheusServer, VictoriaMetricsServer, backfill
from devkit.service import free_port
from devkit.simulate import (
    ClusterHistory,
    simulate_cluster,
    to_openmetrics,
    to_victoriametrics,
)
from recommender.config import Config
from recommender.model import NODE_COLUMNS, VM_COLUMNS
from recommender.source.grid import GRID_QUERIES
from recommender.source.host import VM_LOAD_ONLY
from recommender.source.http import SourceError
from recommender.source.prometheus import PrometheusSource
from recommender.source.queries import SnapshotQueries

pytestmark = pytest.mark.slow

MIGRATION_IN_WINDOW = 3 * 3600 - 25 * 60
MIGRATION_BEFORE_WINDOW = 3600
NO_MEMORY_VM = "105"
NO_CPUS_NODE = "pve4"


def _partial(family: str, labels: Mapping[str, str]) -> bool:
    """Series left out to simulate partial data."""
    if family == "vmbalance_vm_memory_used_bytes" and labels.get("vm") == NO_MEMORY_VM:
        return True
    return family == "vmbalance_node_cpus" and labels.get("node") == NO_CPUS_NODE


@dataclass
class Cluster:
    history: ClusterHistory
    prometheus: PrometheusServer
    victoria: VictoriaMetricsServer
    small_end: float
    large_end: float


def _end() -> float:
    # Recent (VictoriaMetrics drops samples older than its retention), on the 15 s grid, and
    # off the 5 min grid so both servers' subqueries see the same steps.
    return math.floor(time.time() / 300) * 300 - 150.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("source")
    end = _end()
    history = simulate_cluster(
        7,
        nodes=4,
        vms=20,
        duration=3 * 3600,
        step=15,
        end=end,
        migration_offsets=[MIGRATION_BEFORE_WINDOW, MIGRATION_IN_WINDOW],
        hostile_names=8,
    )
    to_openmetrics(history, tmp / "history.om", exclude=_partial)
    backfill(tmp / "history.om", tmp / "prom-data")
    # Two more clusters, 5 and 50 VMs, with other ids, earlier in VictoriaMetrics only: the
    # query count of a snapshot must not depend on the number of VMs.
    small_end, large_end = end - 8 * 3600, end - 5 * 3600
    small = simulate_cluster(1, nodes=3, vms=5, duration=3600, step=30, end=small_end)
    large = simulate_cluster(2, nodes=3, vms=50, duration=3600, step=30, end=large_end)
    with (
        PrometheusServer(tmp, data_dir=tmp / "prom-data") as prometheus,
        VictoriaMetricsServer(tmp) as victoria,
    ):
        victoria.import_prometheus(str(to_victoriametrics(history, exclude=_partial)))
        victoria.import_prometheus(str(to_victoriametrics(small)).replace('vm="1', 'vm="s1'))
        victoria.import_prometheus(str(to_victoriametrics(large)).replace('vm="1', 'vm="l1'))
        yield Cluster(history, prometheus, victoria, small_end, large_end)


def config_for(url: str, history: ClusterHistory | None = None, **query: Any) -> Config:
    data: dict[str, Any] = {"prometheus": {"url": url}, "query": query}
    if history is not None:
        data["capacity"] = history.capacity_settings()
    return Config.model_validate(data)


def at_time(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


@pytest.mark.parametrize("server", ["prometheus", "victoriametrics"])
def test_snapshot_matches_the_simulated_truth(cluster: Cluster, server: str) -> None:
    history = cluster.history
    url = cluster.prometheus.url if server == "prometheus" else cluster.victoria.url
    config = config_for(url, history)
    source = PrometheusSource(config.prometheus)
    snapshot = source.build_snapshot(config, at=at_time(history.end))
    truth = history.truth_snapshot()

    # The grid's queries, the fixed ones, and one for when the VMs that moved were last
    # seen where.
    expected = len(SnapshotQueries.for_config(config).queries) + GRID_QUERIES + 1
    assert source.queries_issued == expected
    assert snapshot.taken_at == at_time(history.end)
    assert snapshot.source == url and snapshot.window == "1h" and snapshot.estimator == "mean"
    assert tuple(snapshot.vms.columns) == VM_COLUMNS
    assert tuple(snapshot.nodes.columns) == NODE_COLUMNS
    assert snapshot.vms.index.name == "vm" and snapshot.nodes.index.name == "node"
    assert sorted(snapshot.vms.index) == sorted(truth.vms.index)
    vms = snapshot.vms.loc[truth.vms.index]

    # Names with quotes, newlines and odd unicode come back exactly.
    assert list(vms["name"]) == list(truth.vms["name"])
    # Every VM is on the node of its latest sample, the migrated ones included.
    assert list(vms["node"]) == list(truth.vms["node"])
    late, early = history.migrations[1], history.migrations[0]
    assert vms.loc[late.vm, "node"] == late.target != late.source

    # Loads within 1 % of the truth (0.5 % is the scrape gap of the migrated VM).
    for resource in ("cpu", "disk_bytes", "disk_ops", "network"):
        np.testing.assert_allclose(vms[resource], truth.vms[resource], rtol=0.01, err_msg=resource)
    np.testing.assert_allclose(vms["memory_max_bytes"], truth.vms["memory_max_bytes"])
    memory = vms["memory"].drop(NO_MEMORY_VM)
    np.testing.assert_allclose(memory, truth.vms["memory"].drop(NO_MEMORY_VM), rtol=0.005)

    # The last sample on the node it left: at most one scrape (15 s) before the move.
    for move in (late, early):
        assert move.time - 15 - 1e-6 <= vms.loc[move.vm, "last_migration"] <= move.time
    migrated = {late.vm, early.vm}
    assert vms["last_migration"].drop(list(migrated)).isna().all()

    (burst,) = history.bursts
    assert vms.loc[burst.vm, "burst_ratio"] > config.balance.burst_ratio
    # (The busiest resource of a VM on the node without a CPU count is judged without CPU.)
    known = vms["node"] != NO_CPUS_NODE
    np.testing.assert_allclose(
        vms["burst_ratio"][known], truth.vms["burst_ratio"][known], rtol=0.02
    )
    assert (vms["burst_ratio"].drop(burst.vm) < 2).all()

    # Nodes: cpu/memory from the exporter, the rest from the config; the partial data is
    # reported, not fatal.
    nodes = snapshot.nodes.loc[truth.nodes.index]
    assert not nodes["maintenance"].any()
    assert math.isnan(nodes.loc[NO_CPUS_NODE, "cpu"])
    np.testing.assert_allclose(
        nodes["cpu"].drop(NO_CPUS_NODE), truth.nodes["cpu"].drop(NO_CPUS_NODE)
    )
    for resource in ("memory", "disk_bytes", "disk_ops", "network"):
        np.testing.assert_allclose(nodes[resource], truth.nodes[resource])
    assert math.isnan(vms.loc[NO_MEMORY_VM, "memory"])
    # No node_exporter in this history: the snapshot says it balances VM load only.
    assert len(snapshot.warnings) == 3 and snapshot.warnings[-1] == VM_LOAD_ONLY
    assert "background_cpu" not in snapshot.nodes.columns
    assert any(NO_CPUS_NODE in w and "vmbalance_node_cpus" in w for w in snapshot.warnings)
    assert any(
        NO_MEMORY_VM in w and "vmbalance_vm_memory_used_bytes" in w for w in snapshot.warnings
    )


@pytest.mark.parametrize("server", ["prometheus", "victoriametrics"])
def test_quantile_estimator(cluster: Cluster, server: str) -> None:
    history = cluster.history
    url = cluster.prometheus.url if server == "prometheus" else cluster.victoria.url
    config = config_for(url, history, estimator="quantile", quantile=0.9)
    source = PrometheusSource(config.prometheus)
    snapshot = source.build_snapshot(config, at=at_time(history.end))
    # The grid's queries, the fixed ones, and one for when the VMs that moved were last
    # seen where.
    expected = len(SnapshotQueries.for_config(config).queries) + GRID_QUERIES + 1
    assert source.queries_issued == expected
    assert snapshot.estimator == "quantile(0.9)"
    (burst,) = history.bursts
    moved = history.migrations[1].vm
    for vm in ("101", "110", moved, burst.vm):
        truth = history.true_quantile_load(vm, 0.9)
        # The 5-minute step holding the move misses the scrape gap (up to 15 s of 300 s).
        tolerance = 0.06 if vm == moved else 0.02
        for resource in ("cpu", "disk_bytes", "network"):
            assert snapshot.vms.loc[vm, resource] == pytest.approx(truth[resource], rel=tolerance)
    # One burst in twelve 5-minute steps: the 0.9 quantile sits between the mean and the burst.
    mean = history.true_load(burst.vm)["cpu"]
    assert mean < snapshot.vms.loc[burst.vm, "cpu"] < history.true_short_load(burst.vm)["cpu"]


@pytest.mark.parametrize("server", ["prometheus", "victoriametrics"])
def test_history_shorter_than_the_window(cluster: Cluster, server: str) -> None:
    """20 minutes after the first sample every VM is younger than the 1 h window: loads are
    rates over the time the VMs were seen, not diluted over the whole window."""
    history = cluster.history
    url = cluster.prometheus.url if server == "prometheus" else cluster.victoria.url
    config = config_for(url, history)
    at = history.start + 1200
    snapshot = PrometheusSource(config.prometheus).build_snapshot(config, at=at_time(at))
    for vm in snapshot.vms.index:
        truth = history.true_load(vm, at, 1200)
        assert snapshot.vms.loc[vm, "cpu"] == pytest.approx(truth["cpu"], rel=0.04)
        assert snapshot.vms.loc[vm, "disk_bytes"] == pytest.approx(truth["disk_bytes"], rel=0.04)


def test_query_count_does_not_depend_on_the_number_of_vms(cluster: Cluster) -> None:
    counts = {}
    for label, end, expected in (("small", cluster.small_end, 5), ("large", cluster.large_end, 50)):
        config = config_for(cluster.victoria.url)
        source = PrometheusSource(config.prometheus)
        snapshot = source.build_snapshot(config, at=at_time(end))
        assert len(snapshot.vms) == expected
        counts[label] = source.queries_issued
    assert counts["small"] == counts["large"]


def test_no_data_at_that_time(cluster: Cluster) -> None:
    config = config_for(cluster.prometheus.url)
    at = at_time(cluster.history.start - 86400)
    with pytest.raises(SourceError, match=r"^no VM has data in the last 5m at 20\d\d-") as caught:
        PrometheusSource(config.prometheus).build_snapshot(config, at=at)
    assert "\n" not in str(caught.value)


def test_bad_promql_is_a_source_error(cluster: Cluster) -> None:
    source = PrometheusSource(config_for(cluster.prometheus.url).prometheus)
    with pytest.raises(SourceError) as caught:
        source.query("sum(rate(", cluster.history.end)
    message = str(caught.value)
    assert message.startswith(f"prometheus at {cluster.prometheus.url}: HTTP 400: ")
    assert "\n" not in message


def test_unreachable_port() -> None:
    url = f"http://127.0.0.1:{free_port()}/"
    config = config_for(url)
    with pytest.raises(SourceError) as caught:
        PrometheusSource(config.prometheus).build_snapshot(config)
    assert str(caught.value) == f"prometheus at {url}: connection refused"


class _FakeHandler(BaseHTTPRequestHandler):
    """Answers every query with the server's canned status and body; records requests."""

    def do_GET(self) -> None:
        server: _FakeServer = self.server  # type: ignore[assignment]
        server.requests.append((self.path, dict(self.headers)))
        raw = server.body
        body = raw if isinstance(raw, bytes) else json.dumps(raw).encode()
        self.send_response(server.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Keep the test output clean: requests are recorded instead."""


class _FakeServer(ThreadingHTTPServer):
    def __init__(self, status: int, body: dict[str, Any] | bytes) -> None:
        super().__init__(("127.0.0.1", 0), _FakeHandler)
        self.status = status
        self.body = body
        self.requests: list[tuple[str, dict[str, str]]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def fake_server(request: pytest.FixtureRequest) -> Iterator[_FakeServer]:
    status, body = request.param
    server = _FakeServer(status, body)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.mark.parametrize(
    "fake_server", [(500, {"status": "error", "error": "storage\non fire"})], indirect=True
)
def test_http_500_is_a_source_error(fake_server: _FakeServer) -> None:
    config = config_for(fake_server.url)
    with pytest.raises(SourceError) as caught:
        PrometheusSource(config.prometheus).build_snapshot(config)
    assert str(caught.value).startswith(
        f"prometheus at {fake_server.url}: HTTP 500: storage on fire (query: "
    )
    assert len(fake_server.requests) == 1


@pytest.mark.parametrize(
    ("fake_server", "message"),
    [
        ((200, b"<html>login</html>"), "the answer is not JSON (is this a PromQL API?)"),
        ((200, {"hello": "world"}), "the answer is not a PromQL API response"),
        ((401, b"Unauthorized"), "HTTP 401 (check bearer_token / username and password)"),
    ],
    indirect=["fake_server"],
)
def test_answers_that_are_not_promql(fake_server: _FakeServer, message: str) -> None:
    source = PrometheusSource(config_for(fake_server.url).prometheus)
    with pytest.raises(SourceError) as caught:
        source.query("up", time.time())
    assert str(caught.value).startswith(f"prometheus at {fake_server.url}: {message}")


@pytest.mark.parametrize(
    "fake_server",
    [(200, {"status": "success", "data": {"resultType": "vector", "result": []}})],
    indirect=True,
)
def test_credentials_and_time_are_sent(fake_server: _FakeServer, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    config = Config.model_validate(
        {"prometheus": {"url": fake_server.url, "bearer_token_file": str(token)}}
    )
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    with pytest.raises(SourceError, match="no VM has data"):
        PrometheusSource(config.prometheus).build_snapshot(config, at=at)
    # An empty answer to the latest-sample query: the spacing is not asked for.
    assert len(fake_server.requests) == len(SnapshotQueries.for_config(config).queries) + 1
    for path, headers in fake_server.requests:
        assert path.startswith("/api/v1/query?")
        assert f"time={at.timestamp():.3f}" in path
        assert headers["Authorization"] == "Bearer s3cret"
    basic = Config.model_validate(
        {"prometheus": {"url": fake_server.url, "username": "u", "password": "p"}}
    )
    PrometheusSource(basic.prometheus).query("up", at.timestamp())
    assert fake_server.requests[-1][1]["Authorization"] == "Basic dTpw"
