"""The imbalance measure — defined here once and documented in docs/imbalance.md.

For resource r, node n with capacity C[n,r] and summed VM load L[n,r]:

    utilisation   u[n,r] = L[n,r] / C[n,r]
    cluster mean  U[r]   = sum_n L[n,r] / sum_n C[n,r]          (active nodes only)
    imbalance     I[r]   = max_n u[n,r] - U[r]                 (>= 0)
    overall       I      = sum_r w[r] * I[r] / sum_r w[r]

I[r] reads "the hottest node runs I[r] utilisation points above the cluster average". It is
zero when every node is equally loaded relative to its size, does not blow up when the
cluster is idle, and makes "under the target" a set of linear constraints
(u[n,r] <= U[r] + slack[r]), which is what lets an exact solver check the engine.
Nodes in maintenance are not active: their capacity does not count and their VMs count
toward the active nodes they will land on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import overload

import numpy as np

from recommender.resources import utilisation

# Imbalances closer than this are equal: "under the target" allows it, rankings round to it.
EPSILON = 1e-9


@dataclass(frozen=True)
class Imbalance:
    per_resource: dict[str, float]  # I[r], every resource (weighted or not)
    overall: float  # I over the weighted resources


def node_utilisation(load: np.ndarray, capacity: np.ndarray) -> np.ndarray:
    """u = load / capacity per (node, resource); a zero capacity gives 0 (no load) or inf."""
    return np.where(capacity > 0, utilisation(load, capacity), np.where(load > 0, np.inf, 0.0))


def cluster_mean(load: np.ndarray, capacity: np.ndarray) -> np.ndarray:
    """U[r] = sum_n L[n,r] / sum_n C[n,r] over the nodes given (0 without capacity)."""
    total_capacity = capacity.sum(axis=-2)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(total_capacity > 0, load.sum(axis=-2) / total_capacity, 0.0)


def imbalance_per_resource(load: np.ndarray, capacity: np.ndarray) -> np.ndarray:
    """I[r] for a (nodes x resources) load and capacity matrix of the active nodes."""
    if load.shape[0] == 0:
        return np.zeros(load.shape[1])
    util = node_utilisation(load, capacity)
    per_resource: np.ndarray = np.maximum(util.max(axis=0) - cluster_mean(load, capacity), 0.0)
    return per_resource


def overall_imbalance(per_resource: np.ndarray, weights: np.ndarray) -> float:
    """Weighted mean of the per-resource imbalance."""
    total = float(weights.sum())
    if total <= 0:
        return 0.0
    return float((per_resource * weights).sum() / total)


@overload
def reaches(overall: float, target: float) -> bool: ...
@overload
def reaches(overall: np.ndarray, target: float) -> np.ndarray: ...
def reaches(overall: float | np.ndarray, target: float) -> bool | np.ndarray:
    """An overall imbalance at or under the target (within EPSILON): the plan is done. For
    an array, element by element."""
    return overall <= target + EPSILON


def weight_vector(weights: Mapping[str, float], resources: Sequence[str]) -> np.ndarray:
    return np.array([float(weights.get(r, 0.0)) for r in resources], dtype=float)


def needed_resources(weights: Mapping[str, float], resources: Sequence[str]) -> list[str]:
    """Resources whose capacity a node must have to count: the weighted ones, and CPU and
    memory, which the hard limits need."""
    return [r for r in resources if weights.get(r, 0.0) > 0 or r in ("cpu", "memory")]
