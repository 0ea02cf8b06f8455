"""Host load beside VM load: what node_exporter saw each host do, minus what its VMs did.

A hyper-converged node runs Ceph OSDs and monitors beside its VMs; their CPU and NIC traffic
is in no VM counter. node_exporter's host totals (joined to the `node` label by the scrape
relabelling in docs/deploy.md) minus the sum of the node's VMs over the same window is the
node's background load, never negative (the two are measured apart and may disagree by a
little). The engine counts it on the node first, so a node busy with Ceph is full before
it receives a VM. A VM that moved inside the window is summed on its current node only, so
its old node shows the part it carried there as background until the window has passed.

Pressure stall information (PSI) comes from node_exporter's pressure collector, which
publishes the "some" line of `/proc/pressure/{cpu,memory,io}` as the counters
`node_pressure_<kind>_waiting_seconds_total` (seconds some task waited). Their rate over the
window is the share of time at least one task stalled on that kind: the kernel's `avg10` /
`avg60` / `avg300`, over the window instead. Host counters are divided by the time
node_exporter's own samples span (`host_elapsed`), so a node_exporter younger than the window
is not read as idle.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from recommender.config import Config, HostSettings
from recommender.model import BACKGROUND_COLUMNS, PRESSURE_COLUMNS, VM_LOAD_ONLY
from recommender.resources import PRESSURE
from recommender.source.answers import Answer, by_label, sample
from recommender.text import and_more

HOST_PRESSURE = "node_pressure_{kind}_waiting_seconds_total"


def host_elapsed(window: str) -> str:
    """Per node, the seconds node_exporter's samples span inside the window: all CPU time over
    the CPUs. A host counter divided by it is its rate also for a series younger than the
    window (a node_exporter started or a node added inside it), where `increase / window` and
    Prometheus' `rate()` would read short; both come from the same scrapes."""
    cpu = 'node_cpu_seconds_total{node!=""}'
    idle = 'node_cpu_seconds_total{node!="",mode="idle"}'  # one series per CPU
    return (
        f"(sum by (cluster, node) (increase({cpu}[{window}])) "
        f"/ count by (cluster, node) (last_over_time({idle}[{window}])))"
    )


def per_host_second(increase: str, window: str, window_s: float) -> str:
    """`increase` (summed by cluster, node) per second the host's samples span, or per second
    of the window where node_exporter publishes no CPU time."""
    return f"({increase}) / {host_elapsed(window)} or ({increase}) / {window_s:g}"


def pressure_queries(host: HostSettings, window: str, window_s: float) -> dict[str, str]:
    """One query for every PSI kind read: per node and kind (a `kind` label), the "some"
    stall share over the window; none when `host.pressure` is empty."""
    parts = []
    for kind in host.pressure:
        counter = f'{HOST_PRESSURE.format(kind=kind)}{{node!=""}}'
        waited = f"sum by (cluster, node) (increase({counter}[{window}]))"
        share = per_host_second(waited, window, window_s)
        parts.append(f'label_replace({share}, "kind", "{kind}", "", "")')
    return {"host_pressure": " or ".join(f"({p})" for p in parts)} if parts else {}


def host_pressure(
    answers: Mapping[str, Answer], nodes: pd.DataFrame, config: Config, warnings: list[str]
) -> pd.DataFrame:
    """`nodes` with a `pressure_<kind>` column per kind read when any PSI series answered
    (else unchanged; a warning when a trigger or the pressure weight wanted them)."""
    kinds = list(config.host.pressure)
    shares: dict[str, dict[str, float]] = {kind: {} for kind in kinds}
    for item in answers.get("host_pressure", []):
        labels = item["metric"]
        if labels.get("kind") in shares and "node" in labels:
            shares[labels["kind"]][labels["node"]] = sample(item)
    wanted = bool(config.host.pressure_trigger) or config.balance.weights.get(PRESSURE, 0.0) > 0
    if not any(shares.values()):
        if wanted:
            warnings.append(
                "no node_pressure_*_waiting_seconds_total series joined to a node (node_exporter's "
                "pressure collector, docs/deploy.md): pressure triggers nothing and weighs nothing"
            )
        return nodes
    frame = nodes.copy()
    for kind in kinds:
        frame[PRESSURE_COLUMNS[kind]] = [
            max(shares[kind].get(str(n), np.nan), 0.0) if str(n) in shares[kind] else np.nan
            for n in frame.index
        ]
    missing = sorted(
        str(n) for n in frame.index if not any(str(n) in shares[kind] for kind in kinds)
    )
    if missing:
        warnings.append(
            f"nodes without node_exporter pressure in the window: {and_more(missing, 8)}"
        )
    return frame


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


__all__ = [
    "HOST_PRESSURE",
    "VM_LOAD_ONLY",
    "host_background",
    "host_elapsed",
    "host_pressure",
    "per_host_second",
    "pressure_queries",
]
