"""The cluster snapshot: what every stage after the Prometheus source works from.

Two pandas frames and a little metadata. The engine, the renderers and the report see only
this, so they are tested and benchmarked without any server.

`nodes` — index `node` (str); one column per resource holding the node's *capacity* in the
resource's unit (NaN: unknown), `maintenance` (bool), `cluster` (str, "" when the data
names none), and `background_cpu` / `background_network`: the load the host carries besides
its VMs (Ceph, the host itself), counted in the node's load (present when the source read host
load; absent means 0); `pressure_cpu` / `pressure_memory` / `pressure_io`: the node's pressure
stall share of each kind (present when the source read PSI; NaN: not seen).

`vms` — index `vm` (str: Proxmox VMID or libvirt domain name); `name` (display only,
untrusted), `node` (where its latest sample was), one column per resource holding the VM's
*load* (NaN: unknown), `memory_max_bytes` (assigned memory, what a migration copies),
`burst_ratio` (short-window rate over long-window rate of its busiest resource, NaN when
unknown), `last_migration` (unix seconds of the last node change seen, NaN if none), and what
decides whether and how it can move: `blockers` (tuple of reasons it cannot be live-migrated),
`disks` (tuple of `Disk`), `ha_managed` (bool) and `dirty_rate` (bytes of memory dirtied per
second, NaN when unknown); `cluster` (str) only where a node name is in more than one cluster
of the data (`nodes` then repeats that name, once per cluster, and `cluster_snapshot` parts
them).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TypeVar

import numpy as np
import pandas as pd

# Re-exported: the stages read the resource names and units from the model.
from recommender.resources import CPU as CPU
from recommender.resources import GIB as GIB
from recommender.resources import MEM as MEM
from recommender.resources import PRESSURE_KINDS
from recommender.resources import RESOURCE_UNITS as RESOURCE_UNITS
from recommender.resources import RESOURCES as RESOURCES
from recommender.resources import utilisation as array_utilisation

# The units a utilisation is computed on: arrays for the plan, frames for the report.
Loads = TypeVar("Loads", np.ndarray, pd.DataFrame, pd.Series)

# Load a node carries besides its VMs (host total minus the VMs' sum, from node_exporter;
# 0 when unknown): resource -> nodes-frame column.
BACKGROUND_COLUMNS: dict[str, str] = {"cpu": "background_cpu", "network": "background_network"}
# Each node's pressure stall share per PSI kind over the window (node_exporter's "some" line:
# seconds per second at least one task waited), NaN where not read: kind -> nodes-frame column.
PRESSURE_COLUMNS: dict[str, str] = {kind: f"pressure_{kind}" for kind in PRESSURE_KINDS}
NODE_COLUMNS: tuple[str, ...] = (*RESOURCES, "maintenance", "cluster")
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
    "blockers",
    "disks",
    "ha_managed",
    "dirty_rate",
)


@dataclass(frozen=True)
class Disk:
    """One virtual disk: where it lives and whether every node of the cluster reaches it."""

    name: str
    storage: str
    shared: bool
    size_bytes: float  # NaN when unknown


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
    frame["cluster"] = pd.Series(dtype=object)
    frame.index = pd.Index([], name="node", dtype=object)
    return frame


def empty_vms() -> pd.DataFrame:
    columns: dict[str, pd.Series] = {
        "name": pd.Series(dtype=object),
        "node": pd.Series(dtype=object),
    }
    for column in _VM_NUMBERS:
        columns[column] = pd.Series(dtype=float)
    columns["blockers"] = pd.Series(dtype=object)
    columns["disks"] = pd.Series(dtype=object)
    columns["ha_managed"] = pd.Series(dtype=bool)
    frame = pd.DataFrame(columns)[list(VM_COLUMNS)]
    frame.index = pd.Index([], name="vm", dtype=object)
    return frame


_VM_NUMBERS = (*RESOURCES, "memory_max_bytes", "burst_ratio", "last_migration", "dirty_rate")


def make_nodes(rows: Mapping[str, Mapping[str, float | bool | str]]) -> pd.DataFrame:
    """Build a nodes frame from {node: {resource: capacity, "maintenance": bool,
    "cluster": str}}; with `"background_<resource>": load` in any row, the frame has every
    background column (missing values 0), with `"pressure_<kind>": share` in any row that
    kind's column (missing values NaN)."""
    frame = empty_nodes()
    if rows:
        # One frame from columns: adding the rows one at a time costs quadratic time.
        entries = list(rows.values())
        columns: dict[str, pd.Series] = {
            r: pd.Series([float(e.get(r, np.nan)) for e in entries], dtype=float) for r in RESOURCES
        }
        columns["maintenance"] = pd.Series(
            [bool(e.get("maintenance", False)) for e in entries], dtype=bool
        )
        columns["cluster"] = pd.Series([str(e.get("cluster", "")) for e in entries])
        frame = pd.DataFrame(columns)
        frame.index = pd.Index(list(rows), name="node")
    if any(c in values for values in rows.values() for c in BACKGROUND_COLUMNS.values()):
        for column in BACKGROUND_COLUMNS.values():
            frame[column] = [float(values.get(column, 0.0)) for values in rows.values()]
    for column in PRESSURE_COLUMNS.values():
        if any(column in values for values in rows.values()):
            frame[column] = [float(values.get(column, np.nan)) for values in rows.values()]
    return frame


def _items(value: object) -> tuple[object, ...]:
    if value is None or isinstance(value, str):
        return () if value is None else (value,)
    return tuple(value) if isinstance(value, list | tuple | set | frozenset) else ()


def make_vms(rows: dict[str, dict[str, object]]) -> pd.DataFrame:
    """Build a VMs frame from {vm: {"node": ..., resource: load, ...}}; missing loads are NaN."""
    records = []
    for vm, values in rows.items():
        record: dict[str, object] = {
            "vm": str(vm),
            "name": str(values.get("name", vm)),
            "node": str(values["node"]),
        }
        for column in _VM_NUMBERS:
            value = values.get(column, np.nan)
            record[column] = np.nan if value is None else float(value)  # type: ignore[arg-type]
        record["blockers"] = tuple(sorted({str(b) for b in _items(values.get("blockers"))}))
        record["disks"] = tuple(d for d in _items(values.get("disks")) if isinstance(d, Disk))
        record["ha_managed"] = bool(values.get("ha_managed", False))
        records.append(record)
    if not records:
        return empty_vms()
    return pd.DataFrame.from_records(records, index="vm")[list(VM_COLUMNS)]


def local_disk_bytes(disks: tuple[Disk, ...]) -> float:
    """Bytes of the disks a migration has to copy (those not on shared storage); NaN when
    one of them has no known size."""
    return float(sum(d.size_bytes for d in disks if not d.shared))


def clusters_of(nodes: pd.DataFrame) -> list[str]:
    """The distinct cluster names of a nodes frame ("" for nodes of no named cluster)."""
    if "cluster" not in nodes.columns:
        return [""] if len(nodes) else []
    return sorted({c if isinstance(c, str) else "" for c in nodes["cluster"]})


def cluster_snapshot(snapshot: Snapshot, cluster: str) -> Snapshot:
    """The part of `snapshot` in one cluster: its nodes and the VMs on them."""
    nodes = snapshot.nodes
    column = nodes["cluster"] if "cluster" in nodes.columns else pd.Series("", index=nodes.index)
    names = [c if isinstance(c, str) else "" for c in column]
    kept = nodes[[name == cluster for name in names]]
    vms = snapshot.vms
    if "cluster" in vms.columns:  # node names repeat across clusters: each VM says its own
        vms = vms[[c == cluster for c in vms["cluster"]]]
    vms = vms[vms["node"].astype(str).isin(set(map(str, kept.index)))]
    return Snapshot(
        nodes=kept.copy(),
        vms=vms.copy(),
        taken_at=snapshot.taken_at,
        source=snapshot.source,
        window=snapshot.window,
        estimator=snapshot.estimator,
        warnings=list(snapshot.warnings),
    )


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
