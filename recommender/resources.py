"""The resources the recommender balances, by name and unit.

Plain constants, shared by the config (which validates weights and capacities against them)
and the snapshot model (a column per resource), so reading a config needs no data frames.
"""

from __future__ import annotations

RESOURCES: tuple[str, ...] = ("cpu", "memory", "disk_bytes", "disk_ops", "network")

RESOURCE_UNITS: dict[str, str] = {
    "cpu": "cores",
    "memory": "bytes",
    "disk_bytes": "bytes/s",
    "disk_ops": "ops/s",
    "network": "bytes/s",
}
