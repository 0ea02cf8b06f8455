"""Two clusters behind one real Prometheus whose nodes have the same names (`pve1`, `pve2`,
`pve3` in each) and whose VMs have the same ids (101, 102, …), as two Proxmox clusters do:
the snapshot keeps every node and VM of each cluster apart, and each cluster's plan moves
only its own VMs, between its own nodes, with its own loads."""

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
from devkit.simulate import ClusterHistory, simulate_cluster, to_openmetrics
from recommender.config import Config
from recommender.model import cluster_snapshot
from recommender.snapshot import load_snapshot
from recommender.source.prometheus import PrometheusSource

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
NODES = ("pve1", "pve2", "pve3")
# Migrations vmbalance executed in each cluster within the last hour, as its apply metrics
# count them (`cluster` is the executed plan's).
EXECUTED = {"west": 2, "east": 5}


def _apply_metrics(path: Path, end: float) -> None:
    lines = ["# TYPE vmbalance_apply_migrations counter"]
    for cluster, done in EXECUTED.items():
        for t in range(int(end) - 2 * 3600, int(end) + 1, 30):
            value = done if t >= end - 40 * 60 else 0
            labels = f'cluster="{cluster}",result="done"'
            lines.append(f"vmbalance_apply_migrations_total{{{labels}}} {value} {t}")
    path.write_text("\n".join([*lines, "# EOF", ""]), encoding="utf-8")


@dataclass
class Twins:
    histories: dict[str, ClusterHistory]
    config: Path
    end: float


@pytest.fixture(scope="module")
def twins(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Twins]:
    tmp = tmp_path_factory.mktemp("twins")
    end = math.floor(time.time() / 300) * 300 - 150.0
    common: dict[str, Any] = {"duration": 2 * 3600, "step": 30, "end": end, "migrations": 0}
    histories = {
        # east's nodes are twice west's: capacities that mixed would show.
        "west": simulate_cluster(21, nodes=3, vms=10, cluster="west", **common),
        "east": simulate_cluster(22, nodes=3, vms=10, cluster="east", node_scales=[2, 2, 2],
                                 **common),
    }  # fmt: skip
    (tmp / "om").mkdir()
    for cluster, history in histories.items():
        assert tuple(n.name for n in history.nodes) == NODES
        to_openmetrics(history, tmp / "om" / f"{cluster}.om")
    _apply_metrics(tmp / "om" / "apply.om", end)
    backfill(tmp / "om", tmp / "prom-data")
    with PrometheusServer(tmp, data_dir=tmp / "prom-data") as prometheus:
        settings = {
            "prometheus": {"url": prometheus.url},
            "balance": {"trigger": 0.0, "target": 0.0, "min_gain": 0.0, "min_gain_per_gib": 0.0},
        }
        config = tmp / "vmbalance.yaml"
        config.write_text(yaml.safe_dump(settings))
        yield Twins(histories, config, end)


def vmbalance(twins: Twins, *args: str) -> subprocess.CompletedProcess[str]:
    at = datetime.fromtimestamp(twins.end, UTC).isoformat()
    return subprocess.run(
        [sys.executable, "-m", "recommender.cli", *args, "-c", str(twins.config), "--at", at],
        capture_output=True, text=True, cwd=REPO, timeout=300, check=False,
        env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip


def test_the_snapshot_keys_nodes_and_vms_by_cluster(twins: Twins) -> None:
    config = Config.model_validate(yaml.safe_load(twins.config.read_text()))
    snapshot = PrometheusSource(config.prometheus).build_snapshot(
        config, datetime.fromtimestamp(twins.end, UTC)
    )
    assert sorted(zip(snapshot.nodes["cluster"], snapshot.nodes.index, strict=True)) == sorted(
        (c, n) for c in twins.histories for n in NODES
    )
    assert not [w for w in snapshot.warnings if "more than one cluster" in w]
    for cluster, history in twins.histories.items():
        part = cluster_snapshot(snapshot, cluster)
        assert part.nodes.index.is_unique and part.vms.index.is_unique
        assert sorted(part.vms.index) == sorted(v.vm for v in history.vms)
        for node in history.nodes:
            assert part.nodes.loc[node.name, "cpu"] == node.cpus
            assert part.nodes.loc[node.name, "memory"] == node.memory_bytes
        for vm in history.vms:
            assert part.vms.loc[vm.vm, "node"] == history.node_at(vm.vm, twins.end)
            assert part.vms.loc[vm.vm, "name"] == vm.name
            truth = history.true_load(vm.vm, twins.end)
            assert part.vms.loc[vm.vm, "cpu"] == pytest.approx(truth["cpu"], rel=0.02)
            assert part.vms.loc[vm.vm, "memory_max_bytes"] == vm.memory_max_bytes


@pytest.mark.parametrize("cluster", ["west", "east"])
def test_each_cluster_plans_its_own_pve1(twins: Twins, cluster: str) -> None:
    history = twins.histories[cluster]
    done = vmbalance(twins, "plan", "-o", "json", "--cluster", cluster, "--maintenance", "pve1")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    on_pve1 = {v.vm for v in history.vms if history.node_at(v.vm, twins.end) == "pve1"}
    assert on_pve1, "the simulated cluster has VMs on pve1"
    evacuated = {m["vm"] for m in doc["migrations"] if m["source"] == "pve1"}
    assert evacuated == on_pve1
    assert {m["target"] for m in doc["migrations"]} <= {"pve2", "pve3"}
    nodes = {n["node"]: n for n in doc["nodes"]}
    assert sorted(nodes) == list(NODES)
    for node in history.nodes:
        assert nodes[node.name]["resources"]["cpu"]["capacity"] == node.cpus
        on_node = [v for v in history.vms if history.node_at(v.vm, twins.end) == node.name]
        assert nodes[node.name]["vms_before"] == len(on_node)
        load = sum(history.true_load(v.vm, twins.end)["cpu"] for v in on_node)
        assert nodes[node.name]["resources"]["cpu"]["load_before"] == pytest.approx(load, rel=0.02)


def test_the_snapshot_file_holds_both_clusters_and_plans_each(twins: Twins, tmp_path: Path) -> None:
    path = tmp_path / "snapshot.json"
    done = vmbalance(twins, "snapshot", "-o", str(path))
    assert done.returncode == 0, done.stderr
    document = json.loads(path.read_text())
    assert sorted((n["cluster"], n["name"]) for n in document["nodes"]) == sorted(
        (c, n) for c in twins.histories for n in NODES
    )
    assert {(v["cluster"], v["vm"]) for v in document["vms"]} == {
        (c, v.vm) for c, h in twins.histories.items() for v in h.vms
    }
    snapshot, _ = load_snapshot(path)
    assert len(snapshot.nodes) == 6 and len(snapshot.vms) == 20
    direct = vmbalance(twins, "plan", "-o", "json", "--cluster", "east")
    offline = vmbalance(twins, "plan", "-o", "json", "--cluster", "east", "--input", str(path))
    assert direct.returncode == 0 and offline.returncode == 0, offline.stderr
    moves = [[(m["vm"], m["source"], m["target"]) for m in json.loads(r.stdout)["migrations"]]
             for r in (direct, offline)]  # fmt: skip
    assert moves[0] == moves[1]


def test_serve_publishes_each_clusters_pve1(twins: Twins) -> None:
    done = vmbalance(twins, "serve", "--once")
    assert done.returncode == 0, done.stderr
    capacity = {
        (s.labels["cluster"], s.labels["node"]): s.value
        for family in text_string_to_metric_families(done.stdout)
        for s in family.samples
        if family.name == "vmbalance_recommender_node_capacity" and s.labels["resource"] == "cpu"
    }
    for cluster, history in twins.histories.items():
        for node in history.nodes:
            assert capacity[(cluster, node.name)] == node.cpus


def _cpu_capacities(markdown: str) -> dict[str, str]:
    """node -> the capacity cell of the report's first node table (CPU)."""
    rows = [line.split("|")[1:-1] for line in markdown.splitlines() if line.startswith("| ")]
    header = next(
        i for i, r in enumerate(rows) if [c.strip() for c in r[:2]] == ["node", "capacity"]
    )
    out: dict[str, str] = {}
    for row in rows[header + 2 :]:  # past the header's separator row
        cells = [c.strip() for c in row]
        if cells[0] not in NODES:
            break
        out[cells[0]] = cells[1]
    return out


def test_each_clusters_report_reads_only_its_own_pve1(twins: Twins, tmp_path: Path) -> None:
    capacities = {}
    for cluster, history in twins.histories.items():
        out = tmp_path / cluster
        done = vmbalance(twins, "report", "--cluster", cluster, "--period", "1h", "--out", str(out))
        assert done.returncode == 0, done.stderr
        markdown = (out / "report.md").read_text(encoding="utf-8")
        capacities[cluster] = _cpu_capacities(markdown)
        # What vmbalance executed there, not in the other cluster.
        assert f"{EXECUTED[cluster]} migration(s) of plans executed by" in markdown
        assert sorted(capacities[cluster]) == list(NODES)
        for node in history.nodes:
            assert float(capacities[cluster][node.name].split()[0]) == node.cpus
        # Its VMs only: the other cluster's VM ids are the same, its names are not.
        other = next(h for c, h in twins.histories.items() if c != cluster)
        assert not {v.name for v in other.vms} - {v.name for v in history.vms} & set(
            markdown.split()
        )
    assert capacities["west"] != capacities["east"]
