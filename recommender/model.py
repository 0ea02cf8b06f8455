"""The cluster snapshot: what every stage after the Prometheus source works from.

Two pandas frames and a little metadata. The engine, the renderers and the report see only
this, so they are tested and benchmarked without any server.

`nodes` — index `node` (str); one column per resource holding the node's *capacity* in the
resource's unit (NaN: unknown), `maintenance` (bool), and `background_cpu` /
`background_network`: the load the host carries besides its VMs (Ceph, the host itself),
counted in the node's load (present when the source read host load; absent means 0).

`vms` — index `vm` (str: Proxmox VMID or libvirt domain name); `name` (display only,
untrusted), `node` (where its latest sample was), one column per resource holding the VM's
*load* (NaN: unknown), `memory_max_bytes` (assigned memory, what a migration copies),
`burst_ratio` (short-window rate over long-window rate of its busiest resource, NaN when
unknown) and `last_migration` (unix seconds of the last node change seen, NaN if none).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TypeVar

import numpy as np
import pandas as pd

# Re-exported: the stages read the resource names and units from the model.
from recommender.resources import CPU as CPU
from recommender.resources import GIB as GIB
from recommender.resources import MEM as MEM
from recommender.resources import RESOURCE_UNITS as RESOURCE_UNITS
from recommender.resources import RESOURCES as RESOURCES
from recommender.resources import utilisation as array_utilisation

# The units a utilisation is computed on: arrays for the plan, frames for the report.
Loads = TypeVar("Loads", np.ndarray, pd.DataFrame, pd.Series)

# Load a node carries besides its VMs (host total minus the VMs' sum, from node_exporter;
# 0 when unknown): resource -> nodes-frame column.
BACKGROUND_COLUMNS: dict[str, str] = {"cpu": "background_cpu", "network": "background_network"}
NODE_COLUMNS: tuple[str, ...] = (*RESOURCES, "maintenance")
# The snapshot's warning when the source found no host load; every plan from it repeats it.
VM_LOAD_ONLY = (
    "no node_exporter series joined to a node (node_cpu_seconds_total with a node label, "
    "docs/deploy.md): balancing VM load only"
)
VM_COLUMNS: tuple[str, ...] = (
    "name",
    "node",
    *RESOURCES,
    "memory_max_bytes",
    "burst_ratio",
    "last_migration",
)


@dataclass
class Snapshot:
    """Nodes and VMs at one time, plus where they came from and what was missing."""

    nodes: pd.DataFrame
    vms: pd.DataFrame
    taken_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    source: str = "unknown"
    window: str = "1h"
    estimator: str = "mean"
    warnings: list[str] = field(default_factory=list)


def empty_nodes() -> pd.DataFrame:
    frame = pd.DataFrame({r: pd.Series(dtype=float) for r in RESOURCES})
    frame["maintenance"] = pd.Series(dtype=bool)
    frame.index = pd.Index([], name="node", dtype=object)
    return frame


def empty_vms() -> pd.DataFrame:
    columns: dict[str, pd.Series] = {
        "name": pd.Series(dtype=object),
        "node": pd.Series(dtype=object),
    }
    for column in (*RESOURCES, "memory_max_bytes", "burst_ratio", "last_migration"):
        columns[column] = pd.Series(dtype=float)
    frame = pd.DataFrame(columns)
    frame.index = pd.Index([], name="vm", dtype=object)
    return frame


def make_nodes(rows: dict[str, dict[str, float | bool]]) -> pd.DataFrame:
    """Build a nodes frame from {node: {resource: capacity, "maintenance": bool}}; with
    `"background_<resource>": load` in any row, the frame has every background column
    (missing values 0)."""
    frame = empty_nodes()
    for node, values in rows.items():
        frame.loc[node] = [float(values.get(r, np.nan)) for r in RESOURCES] + [
            bool(values.get("maintenance", False))
        ]
    frame["maintenance"] = frame["maintenance"].astype(bool)
    if any(c in values for values in rows.values() for c in BACKGROUND_COLUMNS.values()):
        for column in BACKGROUND_COLUMNS.values():
            frame[column] = [float(values.get(column, 0.0)) for values in rows.values()]
    return frame


def make_vms(rows: dict[str, dict[str, object]]) -> pd.DataFrame:
    """Build a VMs frame from {vm: {"node": ..., resource: load, ...}}; missing loads are NaN."""
    records = []
    for vm, values in rows.items():
        record: dict[str, object] = {
            "vm": str(vm),
            "name": str(values.get("name", vm)),
            "node": str(values["node"]),
        }
        for column in (*RESOURCES, "memory_max_bytes", "burst_ratio", "last_migration"):
            value = values.get(column, np.nan)
            record[column] = np.nan if value is None else float(value)  # type: ignore[arg-type]
        records.append(record)
    if not records:
        return empty_vms()
    return pd.DataFrame.from_records(records, index="vm")[list(VM_COLUMNS)]


def finite_or_none(value: float | None) -> float | None:
    """A finite float, or None for NaN, infinity and None: the one way "unknown" leaves a
    number on its way into JSON or a table cell."""
    if value is None:
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def utilisation(load: Loads, capacity: Loads) -> Loads:
    """Load over capacity where the capacity is known and above zero, NaN elsewhere (frames
    are aligned by their labels)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        if isinstance(capacity, pd.DataFrame | pd.Series):
            return load / capacity.where(capacity > 0)
        return array_utilisation(load, capacity)
