"""One cluster's snapshot read from a store holding several: every selector carries the
cluster's matcher, and the snapshot is the one of the whole store cut to that cluster, on
Prometheus and on VictoriaMetrics."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from devkit.servers import PrometheusServer, VictoriaMetricsServer, backfill
from devkit.simulate import simulate_cluster, to_openmetrics, to_victoriametrics
from recommender.config import Config
from recommender.model import cluster_snapshot
from recommender.source.answers import Answer
from recommender.source.cluster import NoVMData
from recommender.source.prometheus import PrometheusSource
from recommender.source.queries import SnapshotQueries, in_cluster

SELECTOR = re.compile(r"\b(?:vmbalance|node)_[A-Za-z0-9_]*(\{[^}]*\})?")


def test_every_selector_of_every_query_gets_the_matcher() -> None:
    config = Config.model_validate({"host": {"interfaces": ["eth0", 'we"ird}']}})
    plan = SnapshotQueries.for_config(config).for_cluster('c"1')
    for promql in [*plan.queries.values(), *plan.departures(["101", "102"])]:
        selectors = SELECTOR.findall(promql)
        assert selectors, promql
        assert all(s.startswith('{cluster="c\\"1"') for s in selectors), promql
    assert SnapshotQueries.for_config(config).for_cluster(None).queries == (
        SnapshotQueries.for_config(config).queries
    )


def test_matchers_and_quoted_braces_are_kept() -> None:
    assert (
        in_cluster("sum by (node) (vmbalance_up)", "a")
        == 'sum by (node) (vmbalance_up{cluster="a"})'
    )
    assert in_cluster('node_x{mode="}{",node!=""}[1h]', "") == (
        'node_x{cluster="",mode="}{",node!=""}[1h]'
    )
    assert in_cluster("timestamp(vmbalance_vm_info{})", "b") == (
        'timestamp(vmbalance_vm_info{cluster="b"})'
    )
    # Labels and functions are not selectors.
    assert in_cluster("max by (cluster, node, vm) (last_over_time(x[5m]))", "a") == (
        "max by (cluster, node, vm) (last_over_time(x[5m]))"
    )


class Recording(PrometheusSource):
    """A source that keeps every PromQL query it sends."""

    def __init__(self, settings: Any) -> None:
        super().__init__(settings)
        self.sent: list[str] = []

    def query(self, promql: str, at: float) -> Answer:
        self.sent.append(promql)
        return super().query(promql, at)

    def raw(self, promql: str, at: float) -> Answer:
        self.sent.append(promql)
        return super().raw(promql, at)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[float, dict[str, str]]]:
    tmp: Path = tmp_path_factory.mktemp("scope")
    end = math.floor(time.time() / 300) * 300 - 150.0
    common = {"duration": 3 * 3600.0, "step": 30.0, "end": end, "migrations": 3}
    west = simulate_cluster(21, nodes=3, vms=15, cluster="west", node_prefix="w", **common)
    east = simulate_cluster(22, nodes=3, vms=15, cluster="east", node_prefix="e",
                            first_vmid=501, **common)  # fmt: skip
    (tmp / "om").mkdir()
    to_openmetrics(west, tmp / "om" / "a-west.om")
    to_openmetrics(east, tmp / "om" / "b-east.om")
    backfill(tmp / "om", tmp / "prom-data")
    with (
        PrometheusServer(tmp, data_dir=tmp / "prom-data") as prometheus,
        VictoriaMetricsServer(tmp) as victoria,
    ):
        for history in (west, east):
            victoria.import_prometheus(str(to_victoriametrics(history)))
        yield end, {"prometheus": prometheus.url, "victoriametrics": victoria.url}


@pytest.mark.parametrize("server", ["prometheus", "victoriametrics"])
def test_one_clusters_snapshot_is_the_stores_cut_to_it(
    servers: tuple[float, dict[str, str]], server: str
) -> None:
    end, urls = servers
    config = Config.model_validate({"prometheus": {"url": urls[server]}})
    at = datetime.fromtimestamp(end, UTC)
    whole = PrometheusSource(config.prometheus).build_snapshot(config, at=at)
    assert whole.vms["last_migration"].notna().any()
    for cluster in ("west", "east"):
        source = Recording(config.prometheus)
        alone = source.build_snapshot(config, at=at, cluster=cluster)
        # Every query it sent reads only that cluster's series, the data's grid too.
        assert len(source.sent) == source.queries_issued
        for promql in source.sent:
            selectors = SELECTOR.findall(promql)
            assert selectors and all(s.startswith(f'{{cluster="{cluster}"') for s in selectors)
        cut = cluster_snapshot(whole, cluster)
        assert set(alone.nodes["cluster"]) == {cluster}
        pd.testing.assert_frame_equal(alone.nodes, cut.nodes)
        pd.testing.assert_frame_equal(alone.vms, cut.vms)
    with pytest.raises(NoVMData, match="no VM has data"):
        PrometheusSource(config.prometheus).build_snapshot(config, at=at, cluster="north")
