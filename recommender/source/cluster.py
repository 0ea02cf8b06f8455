"""The answers of the snapshot's queries into a `Snapshot`; pure, so tested without a server.

A VM younger than the window (or an exporter added recently) would be under-counted by
dividing by the whole window, so its load is divided by the time since its first sample
instead: its first sample, read raw (`SnapshotQueries.arrivals`) only for the VMs not on
their node since the window's start (`vm_settled`), known to within one sample spacing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd

from recommender.config import Config, duration_seconds
from recommender.engine.rules.maintenance import MaintenanceSettings
from recommender.model import Snapshot, make_nodes, make_vms
from recommender.source.answers import Answer, by_label, by_node_vm, sample
from recommender.source.grid import MIN_RATE_SAMPLES
from recommender.source.host import host_background, host_pressure
from recommender.source.http import SourceError
from recommender.source.migration import apply_migration_facts
from recommender.source.queries import (
    BURST_RESOURCES,
    HISTORY_STEP,
    RATE_COUNTERS,
    SnapshotQueries,
)
from recommender.text import and_more

# How many ids a grouped warning lists before "and N more".
WARN_IDS = 8


def _ids(ids: Sequence[str]) -> str:
    """Ids as they are: every output escapes what it must (`recommender.quoting`)."""
    return and_more(sorted(ids), WARN_IDS)


class NoVMData(SourceError):
    """No VM was seen in the short window (of the cluster asked for, if one was)."""


@dataclass
class VMPlace:
    node: str
    name: str
    last_seen: float
    first_seen_anywhere: float
    last_migration: float


def last_samples(answer: Answer, at: float) -> Answer:
    """A range answer (raw samples per series, `SnapshotQueries.departures`) as an instant
    answer at `at` holding the time of each series' last sample, labelled by (cluster, node,
    vm, name) as the other presence answers are."""
    out: Answer = []
    for item in answer:
        times = [float(point[0]) for point in item.get("values", ()) if point]
        if times:
            labels = {
                key: value
                for key, value in item["metric"].items()
                if key in ("cluster", "node", "vm", "name")
            }
            out.append({"metric": labels, "value": [at, repr(max(times))]})
    return out


def _place(labels: Mapping[str, str]) -> tuple[str, str, str] | None:
    """(cluster, node, vm) of a presence answer's labels ("" for no cluster); None without
    node or vm."""
    if "node" not in labels or "vm" not in labels:
        return None
    return labels.get("cluster", ""), labels["node"], labels["vm"]


def first_samples(answer: Answer, since: float, at: float) -> Answer:
    """A range answer (raw samples per series, `SnapshotQueries.arrivals` or `departures`)
    as an instant answer at `at` holding, per (cluster, node, vm), the time of its first
    sample at or after `since`."""
    first: dict[tuple[str, str, str], float] = {}
    for item in answer:
        key = _place(item["metric"])
        times = [float(point[0]) for point in item.get("values", ()) if point]
        times = [t for t in times if t >= since]
        if key is not None and times:
            first[key] = min(min(times), first.get(key, math.inf))
    return [
        {
            "metric": {"node": node, "vm": vm, **({"cluster": cluster} if cluster else {})},
            "value": [at, repr(value)],
        }
        for (cluster, node, vm), value in first.items()
    ]


def first_seen(settled: Answer, arrivals: Answer, since: float, at: float) -> Answer:
    """Per (cluster, node, vm), its first sample in the window starting at `since`: `since`
    itself for the VMs settled on that node (`vm_settled`), else the first of the raw
    samples (`first_samples`)."""
    out: dict[tuple[str, str, str], dict[str, Any]] = {}
    for item in first_samples(arrivals, since, at):
        key = _place(item["metric"])
        if key is not None:
            out[key] = item
    for item in settled:
        labels = item["metric"]
        key = _place(labels)
        if key is not None:
            kept = {k: labels[k] for k in ("cluster", "node", "vm") if k in labels}
            out[key] = {"metric": kept, "value": [at, repr(since)]}
    return list(out.values())


def unsettled(seen: Answer, settled: Answer) -> list[str]:
    """The VMs seen (any presence answer) on a node where `vm_settled` does not have them
    since the window's start: the young and those that arrived in the window."""
    on_node = {_place(item["metric"]) for item in settled}
    return sorted(
        {
            key[2]
            for key in (_place(item["metric"]) for item in seen)
            if key is not None and key not in on_node
        }
    )


def placements(
    last_seen: Answer, first_seen: Answer, at: float, plan: SnapshotQueries
) -> dict[str, VMPlace]:
    """Where each VM seen in the short window runs and when it last changed node.

    The node is the one with the VM's latest `vmbalance_vm_info` sample (a tie, as when both
    nodes report the VM during the move, goes to the node where it appeared last). The last
    migration is the last sample on any other node within `query.history`: the move
    happened within one scrape interval after it; this also holds for a VM that went
    A -> B -> A, where the first sample on its current node would be too old.
    """
    latest: dict[tuple[str, str], tuple[float, str]] = {}
    for item in last_seen:
        labels = item["metric"]
        if "node" not in labels or "vm" not in labels:
            continue
        key = (labels["node"], labels["vm"])
        seen = sample(item)
        if key not in latest or seen > latest[key][0]:
            latest[key] = (seen, labels.get("name", labels["vm"]))
    first = by_node_vm(first_seen)
    per_vm: dict[str, dict[str, tuple[float, str]]] = {}
    for (node, vm), entry in latest.items():
        per_vm.setdefault(vm, {})[node] = entry
    presence = max(plan.short, 2 * duration_seconds(HISTORY_STEP))
    places: dict[str, VMPlace] = {}
    for vm, nodes in per_vm.items():
        node = max(nodes, key=lambda n: (nodes[n][0], first.get((n, vm), -math.inf)))
        seen, name = nodes[node]
        if not seen >= at - presence:
            continue
        departures = [s for n, (s, _) in nodes.items() if n != node and s > at - plan.history]
        firsts = [first[(n, vm)] for n in nodes if (n, vm) in first]
        places[vm] = VMPlace(
            node=node,
            name=name,
            last_seen=seen,
            first_seen_anywhere=min(firsts) if firsts else math.nan,
            last_migration=max(departures) if departures else math.nan,
        )
    return places


def burst_ratios(
    mean: pd.DataFrame,
    short: pd.DataFrame,
    nodes: pd.DataFrame,
    weights: Mapping[str, float],
    resources: Sequence[str] = BURST_RESOURCES,
) -> pd.Series:
    """Short-window rate / window rate of each VM's busiest resource.

    `mean` is indexed by vm with a `node` column and one column per resource (window
    rates); `short` holds the short-window rates. The busiest resource is the one with the
    largest weighted share of its node's capacity, so a VM's burst is judged on what it
    actually loads. NaN when no resource has a known capacity and a non-zero rate.
    """
    shares = []
    ratios = []
    node_of = mean["node"]
    for resource in resources:
        rate = pd.to_numeric(mean[resource], errors="coerce").to_numpy(dtype=float)
        capacity = nodes[resource].reindex(node_of).to_numpy(dtype=float)
        with np.errstate(divide="ignore", invalid="ignore"):
            share = float(weights.get(resource, 0.0)) * rate / capacity
            ratio = short[resource].reindex(mean.index).to_numpy(dtype=float) / rate
        share = np.where(np.isfinite(share) & (rate > 0), share, -np.inf)
        shares.append(share)
        ratios.append(np.where(rate > 0, ratio, np.nan))
    if not shares:
        return pd.Series(np.nan, index=mean.index, dtype=float)
    share_matrix = np.vstack(shares)
    ratio_matrix = np.vstack(ratios)
    best = np.argmax(share_matrix, axis=0)
    columns = np.arange(share_matrix.shape[1])
    chosen = ratio_matrix[best, columns]
    known = np.isfinite(share_matrix[best, columns])
    return pd.Series(np.where(known, chosen, np.nan), index=mean.index, dtype=float)


def _nodes(
    config: Config,
    answers: Mapping[str, Answer],
    places: Mapping[str, VMPlace],
    warnings: list[str],
) -> pd.DataFrame:
    """Nodes whose exporter answered in the short window, plus those hosting a VM."""
    window = config.query.window
    up = by_label(answers["node_up"], "node")
    cpus = by_label(answers["node_cpus"], "node")
    memory = by_label(answers["node_memory"], "node")
    node_names = sorted(set(up) | {p.node for p in places.values()})
    maintenance = set(MaintenanceSettings.of(config.rules).maintenance)
    down = sorted(n for n in node_names if up.get(n) == 0)
    if down:
        warnings.append(
            f"nodes whose exporter cannot read the hypervisor (vmbalance_up 0), treated as in "
            f"maintenance: {_ids(down)}"
        )
    rows: dict[str, dict[str, float | bool]] = {}
    for node in node_names:
        row: dict[str, float | bool] = {
            "cpu": cpus.get(node, math.nan),
            "memory": memory.get(node, math.nan),
        }
        row.update(config.capacity.of_node(node))
        row["maintenance"] = node in maintenance or node in down
        rows[node] = row
    for resource, family in (
        ("cpu", "vmbalance_node_cpus"),
        ("memory", "vmbalance_node_memory_bytes"),
    ):
        unknown = [n for n, row in rows.items() if not np.isfinite(float(row[resource]))]
        if unknown:
            warnings.append(
                f"nodes without {family} in the last {window} ({resource} capacity "
                f"unknown): {_ids(unknown)}"
            )
    stray = sorted(set(config.capacity.per_node) - set(node_names))
    if stray:
        warnings.append(f"capacity.per_node names nodes without data: {_ids(stray)}")
    return make_nodes(rows)


def _young_scale(
    places: Mapping[str, VMPlace], at: float, plan: SnapshotQueries
) -> dict[str, float]:
    """Per VM, what its window sums are multiplied by: window over its age when its first
    sample came more than `plan.slot` after the window's start (a VM settled since then is
    not young)."""
    resolution = plan.spacing if math.isfinite(plan.spacing) else duration_seconds(HISTORY_STEP)
    scale: dict[str, float] = {}
    for vm, place in places.items():
        first = place.first_seen_anywhere
        if not first > at - plan.window + plan.slot:
            scale[vm] = 1.0
            continue
        # The VM started within a spacing before its first sample: add half of one.
        age = at - first + resolution / 2
        scale[vm] = plan.window / max(age, resolution)
    return scale


@dataclass
class _Rates:
    loads: dict[str, dict[str, float]]  # resource -> vm -> load estimate
    means: dict[str, dict[str, float]]  # burst resource -> vm -> window mean
    shorts: dict[str, dict[str, float]]  # burst resource -> vm -> short-window rate


def _rates(
    config: Config,
    answers: Mapping[str, Answer],
    places: Mapping[str, VMPlace],
    scale: Mapping[str, float],
) -> _Rates:
    def node_vm_sum(answer: Answer) -> dict[str, float]:
        totals: dict[str, float] = {}
        for (_node, vm), value in by_node_vm(answer).items():
            if vm in places and np.isfinite(value):
                totals[vm] = totals.get(vm, 0.0) + value
        return {vm: value * scale[vm] for vm, value in totals.items()}

    rates = _Rates({}, {}, {})
    for resource in RATE_COUNTERS:
        answer = answers[f"load_{resource}"]
        if config.query.estimator == "mean":
            rates.loads[resource] = node_vm_sum(answer)
            rates.means[resource] = rates.loads[resource]
            continue
        per_vm = by_label(answer, "vm")
        rates.loads[resource] = {vm: v for vm, v in per_vm.items() if vm in places}
        if resource in BURST_RESOURCES:
            rates.means[resource] = node_vm_sum(answers[f"mean_{resource}"])
    for resource in BURST_RESOURCES:
        rates.shorts[resource] = by_label(answers[f"short_{resource}"], "vm")
    return rates


def _uncomputable(answer: Answer, vms: Sequence[str]) -> dict[str, list[str]]:
    """Per rate resource, the VMs that have samples of its counters in the window but no
    series with two of them (`grid.rate_samples_query` answers only those): their rate is
    unknown, not 0."""
    most: dict[tuple[str, str], float] = {}
    for item in answer:
        labels = item["metric"]
        if "vm" in labels and "resource" in labels:
            key = (labels["resource"], labels["vm"])
            most[key] = max(most.get(key, 0.0), sample(item))
    return {
        resource: [vm for vm in vms if most.get((resource, vm), math.inf) < MIN_RATE_SAMPLES]
        for resource in RATE_COUNTERS
    }


def _on_current_node(answer: Answer, places: Mapping[str, VMPlace]) -> dict[str, float]:
    """Each VM's value on the node it runs on now (a level, not a rate)."""
    values = by_node_vm(answer)
    return {
        vm: values[(place.node, vm)]
        for vm, place in places.items()
        if (place.node, vm) in values and np.isfinite(values[(place.node, vm)])
    }


def _vms(
    config: Config,
    answers: Mapping[str, Answer],
    places: Mapping[str, VMPlace],
    rates: _Rates,
    warnings: list[str],
) -> pd.DataFrame:
    memory_used = _on_current_node(answers["load_memory"], places)
    memory_max = _on_current_node(answers["memory_max"], places)
    vm_ids = sorted(places)
    # Samples but no computable rate (one sample in the window): unknown, never 0.
    uncomputable = _uncomputable(answers.get("rate_samples", []), vm_ids)
    rows: dict[str, dict[str, object]] = {}
    for vm in vm_ids:
        place = places[vm]
        row: dict[str, object] = {"name": place.name, "node": place.node}
        # No disk or NIC series means the VM has none: zero load, not unknown.
        row["cpu"] = rates.loads["cpu"].get(vm, math.nan)
        for resource in ("disk_bytes", "disk_ops", "network"):
            row[resource] = rates.loads[resource].get(vm, 0.0)
        for resource, unknown in uncomputable.items():
            if vm in unknown:
                row[resource] = math.nan
        row["memory"] = memory_used.get(vm, math.nan)
        row["memory_max_bytes"] = memory_max.get(vm, math.nan)
        row["last_migration"] = place.last_migration
        rows[vm] = row
    for label, family, mapping in (
        ("cpu", "vmbalance_vm_cpu_seconds_total", rates.loads["cpu"]),
        ("memory", "vmbalance_vm_memory_used_bytes", memory_used),
        ("assigned memory", "vmbalance_vm_memory_max_bytes", memory_max),
    ):
        said = set(uncomputable.get(label, []))
        missing = [vm for vm in vm_ids if vm not in mapping and vm not in said]
        if missing:
            warnings.append(
                f"VMs without {family} in the last {config.query.window} ({label} unknown): "
                f"{_ids(missing)}"
            )
    for resource, unknown in uncomputable.items():
        if unknown:
            warnings.append(
                f"VMs with fewer than {MIN_RATE_SAMPLES} samples of their {resource} counters "
                f"in the last {config.query.window} ({resource} rate unknown): {_ids(unknown)}"
            )
    return make_vms(rows)


def assemble_snapshot(
    config: Config,
    plan: SnapshotQueries,
    answers: Mapping[str, Answer],
    when: datetime,
    source: str,
) -> Snapshot:
    """The snapshot at `when` from the answers of `plan`'s queries; SourceError when no VM
    was seen in the short window."""
    at = when.timestamp()
    q = config.query
    warnings: list[str] = []
    last_seen = answers["vm_departed"] + answers["vm_seen_recently"] + answers["vm_seen_now"]
    places = placements(last_seen, answers["vm_first_seen"], at, plan)
    if not places:
        raise NoVMData(
            f"no VM has data in the last {q.short_window} at "
            f"{when.astimezone(UTC).isoformat(timespec='seconds')} "
            f"(no vmbalance_vm_info series at {source})"
        )
    nodes = _nodes(config, answers, places, warnings)
    rates = _rates(config, answers, places, _young_scale(places, at, plan))
    vms = _vms(config, answers, places, rates, warnings)
    frame = pd.DataFrame
    mean = frame({r: pd.Series(rates.means[r], dtype=float) for r in BURST_RESOURCES})
    mean = mean.reindex(vms.index)
    mean["node"] = vms["node"]
    short = frame({r: pd.Series(rates.shorts[r], dtype=float) for r in BURST_RESOURCES})
    short = short.reindex(vms.index)
    vms["burst_ratio"] = burst_ratios(mean, short, nodes, config.balance.weights).to_numpy()
    vm_means = {
        "cpu": rates.means.get("cpu", rates.loads["cpu"]),
        "network": rates.means.get("network", rates.loads["network"]),
    }
    vm_node = {vm: place.node for vm, place in places.items()}
    nodes = host_background(answers, vm_means, vm_node, nodes, warnings)
    nodes = host_pressure(answers, nodes, config, warnings)
    apply_migration_facts(vms, nodes, answers, warnings)
    return Snapshot(
        nodes=nodes,
        vms=vms,
        taken_at=when.astimezone(UTC),
        source=source,
        window=q.window,
        estimator="mean" if q.estimator == "mean" else f"quantile({q.quantile:g})",
        warnings=warnings,
    )


__all__ = [
    "NoVMData",
    "VMPlace",
    "assemble_snapshot",
    "burst_ratios",
    "first_samples",
    "first_seen",
    "last_samples",
    "placements",
    "unsettled",
]
