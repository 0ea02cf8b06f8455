"""The resources the recommender balances, by name and unit, and utilisation.

Shared by the config (which validates weights and capacities against them), the snapshot
model (a column per resource) and the engine, so reading a config needs no data frames.
"""

from __future__ import annotations

import numpy as np

RESOURCES: tuple[str, ...] = ("cpu", "memory", "disk_bytes", "disk_ops", "network")

RESOURCE_UNITS: dict[str, str] = {
    "cpu": "cores",
    "memory": "bytes",
    "disk_bytes": "bytes/s",
    "disk_ops": "ops/s",
    "network": "bytes/s",
}
CPU = RESOURCES.index("cpu")
MEM = RESOURCES.index("memory")

GIB = 1024**3


def utilisation(load: np.ndarray, capacity: np.ndarray) -> np.ndarray:
    """Load over capacity where the capacity is known and above zero, NaN elsewhere."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.asarray(load, dtype=float) / np.where(capacity > 0, capacity, np.nan)
