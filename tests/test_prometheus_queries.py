"""The source's query plan and pure helpers, without a server."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from recommender.config import Config
from recommender.model import make_nodes
from recommender.source.cluster import burst_ratios
from recommender.source.prometheus import PrometheusSource
from recommender.source.queries import RATE_COUNTERS, SnapshotQueries

ROOT = Path(__file__).resolve().parent.parent


def documented_metrics() -> set[str]:
    text = (ROOT / "docs" / "metrics.md").read_text(encoding="utf-8")
    return set(re.findall(r"^\| `(vmbalance_[a-z_]+)` \|", text, re.MULTILINE))


def test_queries_use_only_the_metric_contract() -> None:
    documented = documented_metrics()
    for estimator in ("mean", "quantile"):
        config = Config.model_validate({"query": {"estimator": estimator}})
        for name, promql in SnapshotQueries.for_config(config).queries.items():
            if name.startswith("host_"):  # node_exporter's, not the contract's
                assert "vmbalance_" not in promql and "node_" in promql
                continue
            used = set(re.findall(r"\bvmbalance_[a-z_]+", promql))
            assert used and used <= documented, promql


def test_query_plan_is_fixed_and_follows_the_config() -> None:
    """The queries depend on the config alone (never on the cluster), each answers for every
    VM at once, and their windows are the configured ones."""
    mean = SnapshotQueries.for_config(Config())
    assert mean == SnapshotQueries.for_config(Config())
    for promql in mean.queries.values():
        grouped = r"\bby \((cluster, )?(node|vm|node, vm|node, vm, name)(, [a-z]+)*\)"
        assert re.search(grouped, promql), promql
    assert "[1h]" in mean.queries["load_cpu"] and mean.window == 3600
    # No query steps through the whole history: only the raw samples are read over 24h.
    assert "[24h]" in mean.queries["vm_moved"]
    assert not any("[24h:" in promql for promql in mean.queries.values())
    config = Config.model_validate(
        {
            "query": {
                "window": "2h",
                "short_window": "10m",
                "history": "30m",
                "estimator": "quantile",
                "quantile": 0.9,
            }
        }
    )
    plan = SnapshotQueries.for_config(config)
    # The quantile estimator adds the window means that burst detection compares with.
    assert set(plan.queries) > set(mean.queries)
    # History shorter than the window: VMs that moved are still looked for over the window.
    # Settled on a node: a sample in the window's first two minutes, no subquery.
    assert "[120s] offset 7080000ms" in plan.queries["vm_settled"] and plan.history == 1800
    assert not any(":1m]" in promql and "[2h" in promql for promql in plan.queries.values())
    assert "[2h]" in plan.queries["vm_moved"]
    # The twelve 10-minute rates of the 2 h window, whose quantile the source takes.
    assert plan.queries["load_cpu"].startswith("((sum by (cluster, vm) (increase(")
    assert plan.queries["load_cpu"].endswith(") / 600)[6600000ms:10m]")
    assert {"load_cpu", "load_memory"} <= plan.quantiles and "mean_cpu" not in plan.quantiles


def test_credentials_in_the_url_are_not_shown() -> None:
    config = Config.model_validate({"prometheus": {"url": "https://user:pw@prom.example:9090/"}})
    source = PrometheusSource(config.prometheus)
    assert source.display_url == "https://prom.example:9090/"
    assert source.queries_issued == 0


def test_burst_ratio_is_judged_on_the_busiest_resource() -> None:
    nodes = make_nodes(
        {"a": {"cpu": 10, "disk_bytes": 100.0, "network": 1000.0}, "b": {"cpu": np.nan}}
    )
    mean = pd.DataFrame(
        {
            "node": ["a", "a", "b", "a"],
            "cpu": [5.0, 0.1, 1.0, 0.0],
            "disk_bytes": [1.0, 50.0, 10.0, 0.0],
            "network": [0.0, 10.0, 0.0, 0.0],
        },
        index=pd.Index(["cpu-heavy", "disk-heavy", "unknown-capacity", "idle"], name="vm"),
    )
    short = pd.DataFrame(
        {"cpu": [10.0, 0.1, 4.0, 0.0], "disk_bytes": [9.0, 100.0, 1.0, 0.0], "network": 0.0},
        index=mean.index,
    )
    weights = {"cpu": 1.0, "disk_bytes": 2.0, "network": 2.0}
    ratios = burst_ratios(mean, short, nodes, weights)
    assert ratios["cpu-heavy"] == 2.0  # cpu 50 % of the node beats disk 2 %
    assert ratios["disk-heavy"] == 2.0  # disk 100 % weighted beats cpu 1 %
    assert np.isnan(ratios["unknown-capacity"]) and np.isnan(ratios["idle"])


def test_vm_newer_than_the_last_history_step_is_placed() -> None:
    """A VM whose samples all came after the last whole minute is missing from the history
    subquery; the instant `vm_seen_now` answer must still place it."""
    from recommender.source.cluster import placements as _placements

    plan = SnapshotQueries.for_config(Config())
    at = 1_800_000_030.0  # 30 s past a whole minute
    now_only = [
        {"metric": {"node": "kvm2", "vm": "new", "name": "new"}, "value": [at, str(at - 5)]}
    ]
    assert "new" not in _placements([], [], at, plan)
    places = _placements(now_only, [], at, plan)
    assert places["new"].node == "kvm2"


def test_each_counter_of_a_resource_is_evaluated_once() -> None:
    """Two counters are summed per VM by labelling each, not by `(a + b) or a or b`, which
    evaluates every counter twice (the numbers are checked on both servers in
    test_scrape_grid)."""
    plan = SnapshotQueries.for_config(Config())
    for name, resource in (("load_disk_bytes", "disk_bytes"), ("short_network", "network")):
        for counter in RATE_COUNTERS[resource]:
            assert plan.queries[name].count(counter) == 1
