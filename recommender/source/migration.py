"""The answers that say whether and how each VM can move, and which cluster each node is in:
blockers, disks (storage, shared, size), HA, the dirty rate, the node's `cluster` label.

Pure functions over the answers of `migration_queries`, applied to the frames
`recommender.source.cluster` built; a VM or node without such series keeps the defaults (no
blocker, no disk, not HA-managed, dirty rate unknown, no cluster).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import pandas as pd

from recommender.config import QuerySettings
from recommender.model import Disk
from recommender.source.answers import Answer, sample
from recommender.text import and_more

MIGRATION_FAMILIES = (
    "vmbalance_vm_migration_blocker",
    "vmbalance_vm_disk_info",
    "vmbalance_vm_disk_size_bytes",
    "vmbalance_vm_ha_managed",
    "vmbalance_vm_memory_dirty_rate_bytes_per_second",
)


def migration_queries(q: QuerySettings) -> dict[str, str]:
    """Five queries for the VMs' migration facts and one for the nodes' clusters, whatever
    the number of VMs or clusters."""
    short, window = q.short_window, q.window
    return {
        "vm_blockers": (
            "max by (cluster, node, vm, reason) "
            f"(last_over_time(vmbalance_vm_migration_blocker[{short}]))"
        ),
        "vm_disks": (
            "max by (cluster, node, vm, disk, storage, shared) "
            f"(last_over_time(vmbalance_vm_disk_info[{short}]))"
        ),
        "vm_disk_size": (
            "max by (cluster, node, vm, disk) "
            f"(last_over_time(vmbalance_vm_disk_size_bytes[{window}]))"
        ),
        "vm_ha": f"max by (cluster, node, vm) (last_over_time(vmbalance_vm_ha_managed[{short}]))",
        "vm_dirty_rate": (
            "max by (cluster, node, vm) "
            f"(avg_over_time(vmbalance_vm_memory_dirty_rate_bytes_per_second[{window}]))"
        ),
        "node_cluster": (f"max by (cluster, node) (last_over_time(vmbalance_node_cpus[{window}]))"),
    }


def _on_node(answer: Answer, where: Mapping[str, str]) -> list[tuple[str, dict[str, str], float]]:
    """(vm, labels, value) of the series of each VM on the node it runs on now."""
    out = []
    for item in answer:
        labels = item.get("metric", {})
        vm = labels.get("vm")
        if vm is not None and where.get(vm) == labels.get("node"):
            out.append((vm, labels, sample(item)))
    return out


def node_clusters(answer: Answer, nodes: pd.Index, warnings: list[str]) -> list[str]:
    """The `cluster` label of each node ("" where none); a node name seen in several
    clusters keeps the first (sorted) and is named in a warning."""
    seen: dict[str, set[str]] = {}
    for item in answer:
        labels = item.get("metric", {})
        if "node" in labels:
            seen.setdefault(labels["node"], set()).add(labels.get("cluster", ""))
    twice = sorted(n for n, found in seen.items() if len(found) > 1)
    if twice:
        warnings.append(
            "node names seen in more than one cluster (plan each cluster on its own with "
            f"--cluster): {and_more(twice)}"
        )
    return [sorted(seen.get(str(n), {""}))[0] for n in nodes]


def apply_migration_facts(
    vms: pd.DataFrame, nodes: pd.DataFrame, answers: Mapping[str, Answer], warnings: list[str]
) -> None:
    """Fill the frames' `blockers`, `disks`, `ha_managed`, `dirty_rate` and `cluster` columns
    from the answers (in place)."""
    where = {str(vm): str(node) for vm, node in vms["node"].items()}
    blockers: dict[str, set[str]] = {}
    for vm, labels, value in _on_node(answers["vm_blockers"], where):
        if value >= 1 and labels.get("reason"):
            blockers.setdefault(vm, set()).add(labels["reason"])
    sizes = {
        (vm, labels.get("disk", "")): value
        for vm, labels, value in _on_node(answers["vm_disk_size"], where)
    }
    disks: dict[str, list[Disk]] = {}
    for vm, labels, value in _on_node(answers["vm_disks"], where):
        if value >= 1:
            name = labels.get("disk", "")
            size = sizes.get((vm, name), math.nan)
            shared = labels.get("shared") == "1"
            disks.setdefault(vm, []).append(Disk(name, labels.get("storage", ""), shared, size))
    ha = {vm for vm, _, value in _on_node(answers["vm_ha"], where) if value >= 1}
    dirty = {
        vm: value
        for vm, _, value in _on_node(answers["vm_dirty_rate"], where)
        if math.isfinite(value) and value >= 0
    }
    index = [str(v) for v in vms.index]
    vms["blockers"] = pd.Series(
        [tuple(sorted(blockers.get(v, ()))) for v in index], index=vms.index, dtype=object
    )
    vms["disks"] = pd.Series(
        [tuple(sorted(disks.get(v, ()), key=lambda d: d.name)) for v in index],
        index=vms.index,
        dtype=object,
    )
    vms["ha_managed"] = [v in ha for v in index]
    vms["dirty_rate"] = [dirty.get(v, math.nan) for v in index]
    nodes["cluster"] = node_clusters(answers["node_cluster"], nodes.index, warnings)


__all__ = ["MIGRATION_FAMILIES", "apply_migration_facts", "migration_queries", "node_clusters"]
