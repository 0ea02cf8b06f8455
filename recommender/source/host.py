"""Host load beside VM load: what node_exporter saw each host do, minus what its VMs did.

A hyper-converged node runs Ceph OSDs and monitors beside its VMs; their CPU and NIC traffic
is in no VM counter. node_exporter's host totals (joined to the `node` label by the scrape
relabelling in docs/deploy.md) minus the sum of the node's VMs over the same window is the
node's background load, never negative (the two are measured apart and may disagree by a
little). The engine counts it on the node first, so a node busy with Ceph is full before
it receives a VM. A VM that moved inside the window is summed on its current node only, so
its old node shows the part it carried there as background until the window has passed.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from recommender.model import BACKGROUND_COLUMNS, VM_LOAD_ONLY
from recommender.source.answers import Answer, by_label
from recommender.text import and_more


def host_background(
    answers: Mapping[str, Answer],
    vm_means: Mapping[str, Mapping[str, float]],
    vm_node: Mapping[str, str],
    nodes: pd.DataFrame,
    warnings: list[str],
) -> pd.DataFrame:
    """`nodes` with the background columns added when any host series answered (else
    unchanged, with a warning that only VM load is balanced).

    `vm_means` is resource -> vm -> window mean, `vm_node` where each VM runs."""
    totals = {
        resource: by_label(answers[f"host_{resource}"], "node")
        for resource in BACKGROUND_COLUMNS
        if f"host_{resource}" in answers
    }
    if not any(totals.values()):
        warnings.append(VM_LOAD_ONLY)
        return nodes
    frame = nodes.copy()
    for resource, column in BACKGROUND_COLUMNS.items():
        host = totals.get(resource, {})
        vm_sum: dict[str, float] = {}
        for vm, load in vm_means.get(resource, {}).items():
            if vm in vm_node and np.isfinite(load):
                vm_sum[vm_node[vm]] = vm_sum.get(vm_node[vm], 0.0) + load
        values = []
        for node in frame.index:
            total = host.get(str(node), np.nan)
            background = total - vm_sum.get(str(node), 0.0)
            values.append(max(background, 0.0) if np.isfinite(background) else 0.0)
        frame[column] = values
        missing = sorted(str(n) for n in frame.index if str(n) not in host)
        if host and missing:
            warnings.append(
                f"nodes without node_exporter {resource} in the window (background "
                f"{resource} counted 0): {and_more(missing, 8)}"
            )
    return frame


__all__ = ["VM_LOAD_ONLY", "host_background"]
