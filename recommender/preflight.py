"""What every snapshot must pass before it is planned, wherever it came from (Prometheus or a
file): some VM has data, and its numbers add up to finite loads and utilisations. `plan`,
`serve` and `report` check it; the engine itself stays total (an empty cluster is an empty
plan).

A snapshot whose every load is unknown would otherwise plan to "balanced, nothing to do", and
values near the float limit (`1e308`) would print `inf%`: both are refused with one line, as
the command line promises (exit status 2 when no VM has data).
"""

from __future__ import annotations

import numpy as np

from recommender.errors import CommandError
from recommender.model import RESOURCES, Snapshot, cluster_snapshot, clusters_of
from recommender.quoting import display

# A node carrying a million times its capacity is a wrong number, not a load; beyond this
# the imbalance sums would no longer be meaningful (or finite).
MAX_UTILISATION = 1e6


class SnapshotUnusable(CommandError):
    """The snapshot cannot be planned from; the message is one line."""


class ClusterChoice(CommandError):
    """The data holds several clusters and none was chosen, or not the one chosen."""


def select_cluster(snapshot: Snapshot, cluster: str | None) -> Snapshot:
    """The snapshot of one cluster: `cluster` when given (refused when the data has no such
    cluster), else the only one; data of several clusters without `--cluster` is refused,
    naming them — a plan is always for one cluster."""
    clusters = clusters_of(snapshot.nodes)
    named = ", ".join(display(c) if c else '"" (no cluster label)' for c in clusters)
    if cluster is None:
        if len(clusters) > 1:
            raise ClusterChoice(
                f"the data holds {len(clusters)} clusters ({named}); choose one with --cluster NAME"
            )
        return snapshot
    if cluster not in clusters:
        raise ClusterChoice(f"no cluster {display(cluster)} in the data (clusters: {named})")
    return cluster_snapshot(snapshot, cluster)


def check_snapshot(snapshot: Snapshot) -> None:
    """Raise SnapshotUnusable unless some VM has a load and every sum and ratio is finite."""
    vms = snapshot.vms
    if vms.empty:
        raise SnapshotUnusable(f"no VM has data: the snapshot from {snapshot.source} has no VMs")
    loads = vms[list(RESOURCES)].to_numpy(dtype=float)
    if not np.isfinite(loads).any():
        raise SnapshotUnusable(
            f"no VM has data: every load of the {len(vms)} VM(s) in the snapshot from "
            f"{snapshot.source} is unknown"
        )
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        copy = np.nansum(vms["memory_max_bytes"].to_numpy(dtype=float))
        if not np.isfinite(copy):
            raise SnapshotUnusable("the VMs' memory_max_bytes add up to more than a float holds")
        per_node = vms.groupby("node")[list(RESOURCES)].sum(min_count=1)
        for resource in RESOURCES:
            total = np.nansum(per_node[resource].to_numpy(dtype=float))
            if not np.isfinite(total):
                raise SnapshotUnusable(
                    f"the VMs' {resource} loads add up to more than a float holds"
                )
            capacity = snapshot.nodes[resource].reindex(per_node.index).to_numpy(dtype=float)
            load = per_node[resource].to_numpy(dtype=float)
            known = np.isfinite(capacity) & (capacity > 0) & np.isfinite(load)
            ratio = load[known] / capacity[known]
            bad = np.flatnonzero(~(ratio <= MAX_UTILISATION))
            if bad.size:
                node = per_node.index[np.flatnonzero(known)[bad[0]]]
                raise SnapshotUnusable(
                    f"node {display(node)}: its {resource} load is {ratio[bad[0]]:.3g} times its "
                    "capacity; the snapshot's loads or capacities are wrong"
                )


__all__ = ["ClusterChoice", "SnapshotUnusable", "check_snapshot", "select_cluster"]
