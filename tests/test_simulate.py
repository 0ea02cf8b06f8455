"""The simulator: deterministic, faithful to the metric contract, and its truth is coherent."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from devkit.simulate import simulate_cluster, to_openmetrics, to_victoriametrics
from recommender.model import RESOURCES

ROOT = Path(__file__).resolve().parent.parent
END = 1_800_000_000.0

SAMPLE = re.compile(r'^([a-z_]+)\{((?:[a-z_]+="(?:[^"\\]|\\.)*",?)*)\} (\S+) (\S+)$')
LABEL = re.compile(r'([a-z_]+)="((?:[^"\\]|\\.)*)"')


def contract() -> dict[str, set[str]]:
    """metric name -> label names, from the exporter's tables ("Per VM", "Per node") of
    docs/metrics.md."""
    result = {}
    section = ""
    for line in (ROOT / "docs" / "metrics.md").read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            section = line[3:].strip()
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        exporter = section in ("Per VM", "Per node")
        if exporter and len(cells) == 4 and cells[0].startswith("`vmbalance_"):
            result[cells[0].strip("`")] = {label.strip() for label in cells[2].split(",")}
    return result


# What decides whether a VM can move is static per VM and not part of a load history: tests
# that need it publish it beside the simulated series.
NOT_SIMULATED = {
    "vmbalance_vm_disk_info",
    "vmbalance_vm_disk_size_bytes",
    "vmbalance_vm_migration_blocker",
    "vmbalance_vm_ha_managed",
    "vmbalance_vm_memory_dirty_rate_bytes_per_second",
}


def small() -> str:
    history = simulate_cluster(3, nodes=3, vms=6, duration=1800, step=60, end=END, hostile_names=3)
    return str(to_openmetrics(history))


def test_deterministic_for_a_seed() -> None:
    assert small() == small()
    other = simulate_cluster(4, nodes=3, vms=6, duration=1800, step=60, end=END, hostile_names=3)
    assert str(to_openmetrics(other)) != small()


def test_openmetrics_follows_the_contract() -> None:
    text = small()
    assert text.endswith("\n# EOF\n")
    expected = contract()
    seen_families: list[str] = []
    last: dict[str, float] = {}
    for line in text.splitlines()[:-1]:
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split(" ")
            assert kind in ("gauge", "counter")
            assert family not in seen_families, "a family must be contiguous"
            seen_families.append(family)
            continue
        match = SAMPLE.match(line)
        assert match is not None, line
        name, labels, value, timestamp = match.groups()
        assert name in expected, name
        # One cluster without a name: its empty `cluster` label is no label at all.
        assert {k for k, _ in LABEL.findall(labels)} == expected[name] - {"cluster"}, line
        float(value)
        series = f"{name}{{{labels}}}"
        assert float(timestamp) > last.get(series, -math.inf), "samples in time order"
        last[series] = float(timestamp)
    emitted = {series.split("{")[0] for series in last}
    assert emitted == set(expected) - NOT_SIMULATED


def test_victoriametrics_text_has_the_same_samples_in_milliseconds() -> None:
    history = simulate_cluster(3, nodes=3, vms=6, duration=1800, step=60, end=END, hostile_names=3)
    om = [line for line in str(to_openmetrics(history)).splitlines() if not line.startswith("#")]
    vm = str(to_victoriametrics(history)).splitlines()
    assert len(om) == len(vm)
    for a, b in zip(om, vm, strict=True):
        head_a, ts_a = a.rsplit(" ", 1)
        head_b, ts_b = b.rsplit(" ", 1)
        assert head_a == head_b and int(ts_b) == int(ts_a) * 1000


def test_counters_restart_on_the_new_node() -> None:
    history = simulate_cluster(
        9, nodes=3, vms=4, duration=3600, step=15, end=END, migration_offsets=[1800.0], bursts=0
    )
    (move,) = history.migrations
    series = [
        s
        for s in history.series()
        if s.family == "vmbalance_vm_cpu_seconds_total" and dict(s.labels)["vm"] == move.vm
    ]
    assert [dict(s.labels)["node"] for s in series] == sorted([move.source, move.target])
    old = next(s for s in series if dict(s.labels)["node"] == move.source)
    new = next(s for s in series if dict(s.labels)["node"] == move.target)
    assert old.times[-1] < move.time <= new.times[0]
    assert new.values[0] < old.values[0]
    # All the work is in the truth, wherever it ran.
    inc = history.increments(move.vm)["cpu_seconds"]
    assert history.true_load(move.vm, window=3600)["cpu"] == inc.sum() / 3600


def test_truth_snapshot_shape_and_hot_node() -> None:
    history = simulate_cluster(8, nodes=4, vms=60, duration=7200, step=60, end=END)
    snapshot = history.truth_snapshot()
    assert len(snapshot.vms) == 60 and len(snapshot.nodes) == 4
    assert not snapshot.vms[list(RESOURCES)].isna().any().any()
    utilisation = snapshot.vms.groupby("node")["disk_bytes"].sum() / snapshot.nodes["disk_bytes"]
    assert utilisation.idxmax() == history.hot_node
    assert len(history.migrations) == 3
    for move in history.migrations:
        assert snapshot.vms.loc[move.vm, "node"] == history.node_at(move.vm, history.end)
    (burst,) = history.bursts
    assert snapshot.vms.loc[burst.vm, "burst_ratio"] > 3
    # Heavy tail: the busiest VM does far more I/O than the median one.
    disk = snapshot.vms["disk_bytes"]
    assert disk.max() > 20 * np.median(disk)
