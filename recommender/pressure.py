"""Node pressure (PSI) in a plan: the trigger, and pressure as a resource the balance weighs.

The snapshot holds each node's pressure stall share per kind (`pressure_cpu`, `pressure_memory`,
`pressure_io`: seconds per second some task waited, from node_exporter). Two uses:

* Trigger (`host.pressure_trigger`): a node in service whose share of a kind exceeds the
  kind's threshold makes the run plan even when the imbalance is under `balance.trigger`; the
  plan then balances as far as its moves pay for themselves (`min_gain`), not only down to
  `balance.target`.
* Resource (`balance.weights.pressure`, 0 by default): the node's pressure is the sum of its
  kinds' shares, its capacity one per kind read. PSI is measured per node, not per VM, so each
  kind's share is laid on the node's VMs in proportion to the load that stalls on it (CPU
  cores for cpu, the balanced memory for memory, disk operations for io): a VM carries that
  part of its node's pressure when it moves. A node whose VMs carry none of that load keeps
  the share as background, as the host's own work.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from recommender.model import PRESSURE_COLUMNS
from recommender.resources import PRESSURE

if TYPE_CHECKING:
    from recommender.config import PressureKind

# The node column of the pressure no VM carries (the host's own), counted on the node first.
PRESSURE_BACKGROUND = "background_pressure"


def _stalling_load(kind: str, memory_column: str) -> str:
    """The VM load column whose share of the node's carries that part of a kind's pressure."""
    return {"cpu": "cpu", "memory": memory_column, "io": "disk_ops"}[kind]


@dataclass(frozen=True)
class PressuredNode:
    """A node over a pressure trigger."""

    node: str
    kind: str
    share: float
    threshold: float


def pressure_kinds(nodes: pd.DataFrame) -> list[str]:
    """The PSI kinds the snapshot holds."""
    return [kind for kind, column in PRESSURE_COLUMNS.items() if column in nodes.columns]


def pressured_nodes(
    nodes: pd.DataFrame, thresholds: Mapping[PressureKind, float]
) -> list[PressuredNode]:
    """Nodes in service whose share of a kind exceeds that kind's threshold, by node, kind."""
    found = []
    kinds = set(pressure_kinds(nodes))
    in_service = ~nodes["maintenance"].fillna(False).astype(bool)
    for node in nodes.index[in_service.to_numpy()]:
        for kind, threshold in sorted(thresholds.items()):
            if kind not in kinds:
                continue
            share = float(nodes[PRESSURE_COLUMNS[kind]].loc[node])
            if np.isfinite(share) and share > threshold:
                found.append(PressuredNode(str(node), kind, share, float(threshold)))
    return found


def pressure_frames(
    nodes: pd.DataFrame, vms: pd.DataFrame, memory_column: str
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Copies of the frames with the pressure resource: the nodes' capacity (`pressure`, one
    per kind known; NaN with none) and background (`background_pressure`), each VM's load
    (`pressure`, its part of its node's)."""
    nodes, vms = nodes.copy(), vms.copy()
    kinds = pressure_kinds(nodes)
    known = np.zeros(len(nodes))
    background = np.zeros(len(nodes))
    vm_pressure = np.zeros(len(vms))
    node_names = pd.Index([str(n) for n in nodes.index], dtype=object)
    where = node_names.get_indexer(pd.Index(vms["node"].astype(str), dtype=object))
    placed = where >= 0
    for kind in kinds:
        share = nodes[PRESSURE_COLUMNS[kind]].to_numpy(dtype=float)
        seen = np.isfinite(share)
        known += seen
        share = np.where(seen, np.maximum(share, 0.0), 0.0)
        load = vms[_stalling_load(kind, memory_column)].to_numpy(dtype=float)
        load = np.where(np.isfinite(load) & (load > 0) & placed, load, 0.0)
        node_load = np.zeros(len(nodes))
        np.add.at(node_load, where[placed], load[placed])
        background += np.where(node_load > 0, 0.0, share)
        with np.errstate(divide="ignore", invalid="ignore"):
            part = np.where(placed, share[where] * load / node_load[where], 0.0)
        vm_pressure += np.where(np.isfinite(part), part, 0.0)
    nodes[PRESSURE] = np.where(known > 0, known, np.nan)
    nodes[PRESSURE_BACKGROUND] = background
    vms[PRESSURE] = vm_pressure
    return nodes, vms


__all__ = [
    "PRESSURE_BACKGROUND",
    "PressuredNode",
    "pressure_frames",
    "pressure_kinds",
    "pressured_nodes",
]
