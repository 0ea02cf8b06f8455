"""The rules: one module each, registered once in `RULES`.

Adding a rule is adding a module with one `Constraint` subclass (see `base`) and its entry in
`RULES`. The order of `RULES` is the order of the keys of the `rules:` config section and
the order in which rules are asked: the first rule that rejects a target is named first.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from recommender.engine.problem import Problem, State
from recommender.engine.rules.affinity import Affinity
from recommender.engine.rules.anti_affinity import AntiAffinity
from recommender.engine.rules.base import Constraint, Movers, Violation, compose_settings
from recommender.engine.rules.cpu import CpuHeadroom
from recommender.engine.rules.exclude import Exclude
from recommender.engine.rules.maintenance import Maintenance
from recommender.engine.rules.max_migrations import MaxMigrations
from recommender.engine.rules.memory import MemoryFit
from recommender.engine.rules.migratable import Migratable
from recommender.engine.rules.node_data import NodeData
from recommender.engine.rules.pin import Pin
from recommender.engine.rules.same_cluster import SameCluster

RULES: tuple[type[Constraint], ...] = (
    NodeData,
    SameCluster,
    Migratable,
    Pin,
    Exclude,
    Affinity,
    AntiAffinity,
    Maintenance,
    MemoryFit,
    CpuHeadroom,
    MaxMigrations,
)

# The `rules:` section of the config: the settings of every rule in RULES.
RuleSettings = compose_settings(RULES)


def prepare_constraints(problem: Problem) -> tuple[Constraint, ...]:
    """The constraints of the rules the problem was built with that apply to it (rules
    without entries drop out)."""
    prepared = (rule.prepare(problem) for rule in problem.rule_types)
    return tuple(c for c in prepared if c is not None)


def allowed_targets(constraints: Sequence[Constraint], state: State, movers: Movers) -> np.ndarray:
    """AND of every constraint's mask; a mover's own node is never a target."""
    mask = np.ones((len(movers), len(state.node_load)), dtype=bool)
    for constraint in constraints:
        mask &= constraint.allowed_targets(state, movers)
    own = movers.source >= 0
    mask[np.flatnonzero(own), movers.source[own]] = False
    return mask


def violations(constraints: Sequence[Constraint], state: State, *, final: bool) -> list[Violation]:
    out: list[Violation] = []
    for constraint in constraints:
        out.extend(constraint.check(state, final=final))
    return out


__all__ = [
    "RULES",
    "Constraint",
    "Movers",
    "RuleSettings",
    "Violation",
    "allowed_targets",
    "prepare_constraints",
    "violations",
]
