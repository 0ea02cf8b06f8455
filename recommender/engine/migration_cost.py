"""What one live migration copies and how long it takes, and which VMs cannot move at all.

Pre-copy: the first round copies the whole memory M at bandwidth B; while a round runs the
guest dirties memory at rate D, so round k copies M r^k with r = D / B. Rounds stop once what
is left copies within the allowed downtime (B x downtime bytes) — that last round is the
stop-and-copy — or after `max_rounds`. The memory copied is the geometric series
M (1 - r^(n+1)) / (1 - r) over rounds 0..n. A guest with r at or above `max_dirty_fraction`
never converges in practice (each round leaves nearly as much as it copied) and is not
chosen. Local disks (when allowed) are copied once, beside the memory. The duration is
everything copied over B. A VM whose dirty rate is unknown counts as dirtying nothing
(one round).

The estimated bytes are what the engine's cost per GiB (`balance.min_gain_per_gib`) prices:
at one bandwidth, bytes and seconds are proportional, so the gain a move must bring grows
with its duration.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from recommender.model import Disk, local_disk_bytes

if TYPE_CHECKING:
    from recommender.config import MigrationSettings
    from recommender.engine.problem import Problem


@dataclass(frozen=True)
class Precopy:
    """Per VM: memory copied over every round, the rounds after the first, convergence."""

    memory_bytes: np.ndarray  # (V,)
    rounds: np.ndarray  # (V,) int
    converges: np.ndarray  # (V,) bool


def precopy(memory: np.ndarray, dirty_rate: np.ndarray, settings: MigrationSettings) -> Precopy:
    """The pre-copy estimate for memories `memory` (bytes) dirtied at `dirty_rate` (bytes/s,
    NaN: unknown, counted as 0)."""
    memory = np.maximum(np.asarray(memory, dtype=float), 0.0)
    bandwidth = float(settings.bandwidth_bytes_per_second)
    ratio = np.where(np.isfinite(dirty_rate), np.maximum(dirty_rate, 0.0), 0.0) / bandwidth
    converges = ratio < settings.max_dirty_fraction
    left = bandwidth * float(settings.downtime_seconds)
    with np.errstate(divide="ignore", invalid="ignore"):
        needed = np.ceil(np.log(left / memory) / np.log(ratio))
    needed = np.where((memory > left) & (ratio > 0) & np.isfinite(needed), needed, 0.0)
    rounds = np.clip(needed, 0, settings.max_rounds).astype(np.int64)
    r = np.where(converges, ratio, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        series = np.where(r > 0, (1.0 - r ** (rounds + 1)) / (1.0 - r), 1.0)
    return Precopy(memory * series, rounds, converges)


@dataclass(frozen=True)
class MigrationFacts:
    """Per VM what decides whether and how it moves, and what its migration costs."""

    memory_bytes: np.ndarray  # (V,) assigned memory
    local_disk_bytes: np.ndarray  # (V,) bytes on local storage (NaN: a size unknown)
    ha_managed: np.ndarray  # (V,) bool
    dirty_rate: np.ndarray  # (V,) bytes/s, NaN unknown
    blockers: tuple[tuple[str, ...], ...]  # (V,) reasons the hypervisor refuses a live move
    copy_bytes: np.ndarray  # (V,) estimated bytes a migration transfers
    duration_seconds: np.ndarray  # (V,) estimated duration
    converges: np.ndarray  # (V,) bool
    node_cluster: tuple[str, ...]  # (N,) "" for nodes of no named cluster
    local_disks: str  # "allow" or "refuse"
    bandwidth: float
    max_dirty_fraction: float


def _column(frame: pd.DataFrame, name: str, default: object) -> list[object]:
    if name in frame.columns:
        return list(frame[name].to_numpy())
    return [default] * len(frame)


def migration_facts(
    vms: pd.DataFrame,
    nodes: pd.DataFrame,
    memory_bytes: np.ndarray,
    settings: MigrationSettings,
) -> MigrationFacts:
    """The facts of the VMs of `vms` (frames may lack the optional columns: then no VM has a
    blocker, a local disk or HA, and every dirty rate is unknown)."""
    disks: list[tuple[Disk, ...]] = [
        tuple(d) if isinstance(d, tuple | list) else () for d in _column(vms, "disks", ())
    ]
    local = np.array([local_disk_bytes(d) for d in disks], dtype=float)
    dirty = np.array(_column(vms, "dirty_rate", np.nan), dtype=float)
    blockers = tuple(
        tuple(b) if isinstance(b, tuple | list) else () for b in _column(vms, "blockers", ())
    )
    ha = np.array([bool(v) for v in _column(vms, "ha_managed", False)], dtype=bool)
    estimate = precopy(memory_bytes, dirty, settings)
    copy = estimate.memory_bytes + np.where(np.isfinite(local), local, 0.0)
    bandwidth = float(settings.bandwidth_bytes_per_second)
    clusters = tuple(c if isinstance(c, str) else "" for c in _column(nodes, "cluster", ""))
    return MigrationFacts(
        memory_bytes=np.asarray(memory_bytes, dtype=float),
        local_disk_bytes=local,
        ha_managed=ha,
        dirty_rate=dirty,
        blockers=blockers,
        copy_bytes=copy,
        duration_seconds=copy / bandwidth,
        converges=estimate.converges,
        node_cluster=clusters,
        local_disks=settings.local_disks,
        bandwidth=bandwidth,
        max_dirty_fraction=float(settings.max_dirty_fraction),
    )


def move_cost(problem: Problem, vm: int) -> dict[str, Any]:
    """The cost fields of a `Move` of VM `vm`."""
    facts = problem.migration
    if facts is None:
        copy = float(problem.copy_bytes[vm])
        return {"memory_bytes": copy, "copy_bytes": copy}
    local = float(facts.local_disk_bytes[vm])
    return {
        "memory_bytes": float(facts.memory_bytes[vm]),
        "copy_bytes": float(facts.copy_bytes[vm]),
        "duration_seconds": float(facts.duration_seconds[vm]),
        "local_disk_bytes": local if np.isfinite(local) else 0.0,
        "ha_managed": bool(facts.ha_managed[vm]),
    }


def immovable_reason(facts: MigrationFacts, vm: int) -> str | None:
    """Why the hypervisor would refuse (or never finish) a live migration of `vm`, or None."""
    if facts.blockers[vm]:
        return "cannot be live-migrated: " + ", ".join(facts.blockers[vm])
    local = float(facts.local_disk_bytes[vm])
    if local != 0.0:
        if facts.local_disks != "allow":
            return "has disks on local storage (migration.local_disks: refuse)"
        if not np.isfinite(local):
            return "has a disk on local storage of unknown size"
        if facts.ha_managed[vm]:
            return "HA-managed with disks on local storage (ha-manager cannot copy them)"
    if not facts.converges[vm]:
        rate = float(facts.dirty_rate[vm])
        return (
            f"dirties memory at {rate / 1e6:.0f} MB/s, at least "
            f"{facts.max_dirty_fraction:.0%} of the {facts.bandwidth / 1e6:.0f} MB/s "
            "migration bandwidth: would not converge"
        )
    return None


__all__ = [
    "MigrationFacts",
    "Precopy",
    "immovable_reason",
    "migration_facts",
    "move_cost",
    "precopy",
]
