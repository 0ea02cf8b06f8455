"""The resources the recommender balances, by name and unit, and utilisation.

Shared by the config (which validates weights and capacities against them), the snapshot
model (a column per resource) and the engine, so reading a config needs no data frames.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

RESOURCES: tuple[str, ...] = ("cpu", "memory", "disk_bytes", "disk_ops", "network")

# Node pressure (PSI, from node_exporter): a resource the balance measure counts only when it
# has a weight, so plans, tables and the report of a config without it list the five above.
PRESSURE = "pressure"
PRESSURE_KINDS: tuple[str, ...] = ("cpu", "memory", "io")
BALANCED_RESOURCES: tuple[str, ...] = (*RESOURCES, PRESSURE)

RESOURCE_UNITS: dict[str, str] = {
    "cpu": "cores",
    "memory": "bytes",
    "disk_bytes": "bytes/s",
    "disk_ops": "ops/s",
    "network": "bytes/s",
    # Stall share: the seconds per second some task waited, summed over the PSI kinds read.
    PRESSURE: "stall share",
}
CPU = RESOURCES.index("cpu")
MEM = RESOURCES.index("memory")

GIB = 1024**3


def balanced_resources(weights: Mapping[str, float]) -> tuple[str, ...]:
    """The resources a plan measures: the five always, pressure when it is weighted."""
    return BALANCED_RESOURCES if weights.get(PRESSURE, 0.0) > 0 else RESOURCES


def utilisation(load: np.ndarray, capacity: np.ndarray) -> np.ndarray:
    """Load over capacity where the capacity is known and above zero, NaN elsewhere."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.asarray(load, dtype=float) / np.where(capacity > 0, capacity, np.nan)
