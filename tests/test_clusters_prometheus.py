"""Two clusters in one real Prometheus (history backfilled with promtool), with the migration
facts the exporter publishes: the snapshot reads them, a plan is for one cluster, and no
move crosses clusters."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from devkit.servers import PrometheusServer, backfill
from devkit.simulate import ClusterHistory, SimDisk, SimFacts, simulate_cluster, to_openmetrics
from recommender.config import Config
from recommender.faces.serve import Recommender
from recommender.model import GIB, Disk
from recommender.source.grid import GRID_QUERIES
from recommender.source.prometheus import PrometheusSource
from recommender.source.queries import SnapshotQueries

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
LOCAL_DISK = SimDisk("scsi0", "local-lvm", False, 32 * GIB)
SHARED_DISK = SimDisk("scsi1", "ceph", True, 100 * GIB)
WEST_FACTS = {
    "101": SimFacts(blockers=("pci_passthrough", "lock")),
    "102": SimFacts(disks=(LOCAL_DISK, SHARED_DISK)),
    "103": SimFacts(ha_managed=True, dirty_rate=2e6, disks=(SHARED_DISK,)),
}


@dataclass
class Fleet:
    west: ClusterHistory
    east: ClusterHistory
    prometheus: PrometheusServer
    config: Path
    end: float


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("clusters")
    end = math.floor(time.time() / 300) * 300 - 150.0
    common: dict[str, Any] = {"duration": 2 * 3600, "step": 30, "end": end, "migrations": 0}
    west = simulate_cluster(
        11, nodes=3, vms=12, cluster="west", node_prefix="w", facts=WEST_FACTS, **common
    )
    east = simulate_cluster(12, nodes=3, vms=12, cluster="east", node_prefix="e",
                            first_vmid=501, **common)  # fmt: skip
    (tmp / "om").mkdir()
    to_openmetrics(west, tmp / "om" / "a-west.om")
    to_openmetrics(east, tmp / "om" / "b-east.om")
    backfill(tmp / "om", tmp / "prom-data")
    with PrometheusServer(tmp, data_dir=tmp / "prom-data") as prometheus:
        per_node: dict[str, Any] = {}
        for history in (west, east):
            per_node.update(history.capacity_settings()["per_node"])  # type: ignore[call-overload]
        settings = {
            "prometheus": {"url": prometheus.url},
            "capacity": {"per_node": per_node},
            "balance": {"trigger": 0.0, "target": 0.0, "min_gain": 0.0, "min_gain_per_gib": 0.0},
        }
        config = tmp / "vmbalance.yaml"
        config.write_text(yaml.safe_dump(settings))
        yield Fleet(west, east, prometheus, config, end)


def vmbalance(fleet: Fleet, *args: str) -> subprocess.CompletedProcess[str]:
    at = datetime.fromtimestamp(fleet.end, UTC).isoformat()
    return subprocess.run(
        [sys.executable, "-m", "recommender.cli", *args, "-c", str(fleet.config), "--at", at],
        capture_output=True, text=True, cwd=REPO, timeout=300, check=False,
        env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip


def test_the_snapshot_reads_clusters_blockers_disks_ha_and_dirty_rate(fleet: Fleet) -> None:
    config = Config.model_validate(yaml.safe_load(fleet.config.read_text()))
    source = PrometheusSource(config.prometheus)
    snapshot = source.build_snapshot(config, datetime.fromtimestamp(fleet.end, UTC))
    # The data's grid, then the fixed queries (no VM moved, so no departures query).
    assert source.queries_issued == len(SnapshotQueries.for_config(config).queries) + GRID_QUERIES
    clusters = snapshot.nodes["cluster"].to_dict()
    assert clusters == {"w1": "west", "w2": "west", "w3": "west",
                        "e1": "east", "e2": "east", "e3": "east"}  # fmt: skip
    vms = snapshot.vms
    assert vms.loc["101", "blockers"] == ("lock", "pci_passthrough")
    assert vms.loc["102", "disks"] == (
        Disk("scsi0", "local-lvm", False, float(32 * GIB)),
        Disk("scsi1", "ceph", True, float(100 * GIB)),
    )
    assert bool(vms.loc["103", "ha_managed"]) and vms.loc["103", "dirty_rate"] == 2e6
    assert vms.loc["104", "blockers"] == () and not vms.loc["104", "ha_managed"]
    assert math.isnan(vms.loc["104", "dirty_rate"])


def test_a_plan_over_two_clusters_is_refused_naming_them(fleet: Fleet) -> None:
    done = vmbalance(fleet, "plan", "-o", "json")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        "vmbalance: the data holds 2 clusters (east, west); choose one with --cluster NAME"
    ]


@pytest.mark.parametrize("cluster", ["west", "east"])
def test_each_cluster_is_planned_on_its_own(fleet: Fleet, cluster: str) -> None:
    history = fleet.west if cluster == "west" else fleet.east
    evacuated = history.node_at("101" if cluster == "west" else "501", fleet.end)
    done = vmbalance(fleet, "plan", "-o", "json", "--cluster", cluster, "--maintenance", evacuated)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    prefix = cluster[0]
    assert {n["node"][0] for n in doc["nodes"]} == {prefix}
    assert doc["migrations"], "the evacuation moves VMs"
    for m in doc["migrations"]:
        assert m["source"][0] == prefix and m["target"][0] == prefix
        assert m["duration_seconds"] > 0
    if cluster == "west":
        moved = {m["vm"] for m in doc["migrations"]}
        assert "101" not in moved
        (stuck,) = [u for u in doc["unplaceable"] if u["vm"] == "101"]
        assert "lock, pci_passthrough" in stuck["reason"]
        assert "102" not in moved  # local disks refused by default
        for m in doc["migrations"]:
            if m["vm"] == "103":
                assert m["command"] == f"ha-manager migrate vm:103 {m['target']}"


def test_an_unknown_cluster_is_one_line(fleet: Fleet) -> None:
    done = vmbalance(fleet, "plan", "--cluster", "north")
    assert done.returncode == 2
    expected = "vmbalance: no cluster north in the data (clusters: east, west)"
    assert done.stderr.strip() == expected


def test_serve_plans_every_cluster_with_one_snapshot_and_labels_its_metrics(fleet: Fleet) -> None:
    done = vmbalance(fleet, "serve", "--once")
    assert done.returncode == 0, done.stderr
    families = {
        (family.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(done.stdout)
        for s in family.samples
    }
    for cluster in ("west", "east"):
        key = ("vmbalance_recommender_planned_migrations", (("cluster", cluster),))
        assert key in families
        overall = (("cluster", cluster), ("resource", "overall"))
        assert ("vmbalance_recommender_imbalance_ratio", overall) in families
        assert ("vmbalance_recommender_plan_duration_seconds", (("cluster", cluster),)) in families
    nodes = {
        (dict(labels)["cluster"], dict(labels)["node"])
        for (name, labels) in families
        if name == "vmbalance_recommender_node_maintenance"
    }
    assert nodes == {("west", f"w{i}") for i in (1, 2, 3)} | {("east", f"e{i}") for i in (1, 2, 3)}


def test_serve_issues_the_same_queries_for_one_cluster_or_two(fleet: Fleet) -> None:
    config = Config.model_validate(yaml.safe_load(fleet.config.read_text()))
    at = datetime.fromtimestamp(fleet.end, UTC)
    source = PrometheusSource(config.prometheus)
    recommender = Recommender(config, lambda c: source.build_snapshot(c, at))
    try:
        assert recommender.run_once()
    finally:
        recommender.close()
    latest = recommender.latest()
    assert sorted(latest.plans) == ["east", "west"]
    # The data's grid, then the fixed queries (no VM moved, so no departures query).
    assert source.queries_issued == len(SnapshotQueries.for_config(config).queries) + GRID_QUERIES
    for cluster, plan in latest.plans.items():
        prefix = cluster[0]
        assert all(m.source[0] == prefix == m.target[0] for m in plan.migrations)
        assert {str(n)[0] for n in plan.nodes_before.index} == {prefix}


def test_the_report_is_for_one_cluster(fleet: Fleet, tmp_path: Path) -> None:
    refused = vmbalance(fleet, "report", "--period", "1h", "--out", str(tmp_path / "all"))
    assert refused.returncode == 2
    assert refused.stderr.strip().endswith("choose one with --cluster NAME")
    out = tmp_path / "west"
    done = vmbalance(fleet, "report", "--period", "1h", "--cluster", "west", "--out", str(out))
    assert done.returncode == 0, done.stderr
    text = (out / "report.md").read_text()
    assert "| w1 " in text and "| e1 " not in text


def test_planning_workers_make_the_plans_made_in_process(fleet: Fleet) -> None:
    """Two workers plan the two clusters side by side: the same documents as one process."""
    base = yaml.safe_load(fleet.config.read_text())
    at = datetime.fromtimestamp(fleet.end, UTC)
    snapshot = PrometheusSource(Config.model_validate(base).prometheus).build_snapshot(
        Config.model_validate(base), at
    )
    documents = {}
    for workers in (1, 2):
        config = Config.model_validate({**base, "serve": {"plan_workers": workers}})
        recommender = Recommender(config, lambda c: snapshot)
        try:
            assert recommender.run_once()
            assert (recommender._pool is not None) == (workers > 1)
            assert recommender.run_once()  # the workers serve the next run too
        finally:
            recommender.close()
        assert recommender._pool is None
        documents[workers] = {
            cluster: {key: value for key, value in document.items() if key != "generated_at"}
            for cluster, document in recommender.latest().plan_documents.items()
        }
    assert sorted(documents[2]) == ["east", "west"]
    assert documents[2] == documents[1]
