"""Hard constraints, one module each, and the registry the engine prepares them from."""

from __future__ import annotations

import numpy as np

from recommender.problem import Problem, State
from recommender.rules.affinity import Affinity
from recommender.rules.anti_affinity import AntiAffinity
from recommender.rules.base import BaseConstraint, Constraint, Movers, Violation
from recommender.rules.cpu import CpuHeadroom
from recommender.rules.exclude import Exclude
from recommender.rules.maintenance import Maintenance
from recommender.rules.max_migrations import MaxMigrations
from recommender.rules.memory import MemoryFit
from recommender.rules.node_data import NodeData
from recommender.rules.pin import Pin

# Order matters only for messages: the first rule that rejects a target is named first.
REGISTRY: tuple[type[BaseConstraint], ...] = (
    NodeData,
    Maintenance,
    Exclude,
    Pin,
    Affinity,
    AntiAffinity,
    MemoryFit,
    CpuHeadroom,
    MaxMigrations,
)


def prepare_constraints(problem: Problem) -> list[Constraint]:
    """The constraints that apply to this problem (rules without entries drop out)."""
    out: list[Constraint] = []
    for rule in REGISTRY:
        prepared = rule.prepare(problem)
        if prepared is not None:
            out.append(prepared)
    return out


def allowed_targets(constraints: list[Constraint], state: State, movers: Movers) -> np.ndarray:
    """AND of every constraint's mask; a mover's own node is never a target."""
    mask = np.ones((len(movers), len(state.node_load)), dtype=bool)
    for constraint in constraints:
        mask &= constraint.allowed_targets(state, movers)
    own = movers.source >= 0
    mask[np.flatnonzero(own), movers.source[own]] = False
    return mask


def violations(constraints: list[Constraint], state: State, *, final: bool) -> list[Violation]:
    out: list[Violation] = []
    for constraint in constraints:
        out.extend(constraint.check(state, final=final))
    return out


__all__ = [
    "REGISTRY",
    "Affinity",
    "AntiAffinity",
    "BaseConstraint",
    "Constraint",
    "CpuHeadroom",
    "Exclude",
    "Maintenance",
    "MaxMigrations",
    "MemoryFit",
    "Movers",
    "NodeData",
    "Pin",
    "Violation",
    "allowed_targets",
    "prepare_constraints",
    "violations",
]
