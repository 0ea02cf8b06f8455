"""Repairs and balancing planned together.

Where rules are broken at the start (members of an anti-affinity group sharing a node, a split
affinity group, a VM outside its pin, a node to evacuate), `recommender.engine.forced` repairs
them one by one before any balancing. That can cost a migration a joint plan does not need:
moving the hot member of a shared pair repairs the rule *and* relieves the node. The exact
program here places the repaired units and the balancing units at once, from the start, with
each rule's repair rows (`Constraint.add_repair_to_model`), so the repair chosen is the one
that leaves the best final balance in the fewest migrations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from recommender.engine.exact import ExactResult, LinearModel
from recommender.engine.forced import Forced, ForcedMove, Frozen, Rejoined
from recommender.engine.problem import NO_NODE, SPLIT, Problem, State, UnitMove
from recommender.engine.rules import Constraint
from recommender.engine.rules.base import ForcedKind


@dataclass(frozen=True)
class Repairs:
    """Units whose move repairs a rule broken at the start, with the reason and kind."""

    reasons: dict[int, tuple[str, ForcedKind]]

    @classmethod
    def at_start(cls, constraints: Sequence[Constraint], start: State) -> Repairs:
        reasons: dict[int, tuple[str, ForcedKind]] = {}
        for constraint in constraints:
            for unit, why in constraint.repair_units(start).items():
                reasons.setdefault(unit, (why, constraint.forced_kind))
        return cls(reasons)


def joint_units(problem: Problem, start: State, movable: np.ndarray, forced: Forced) -> np.ndarray:
    """The units the joint program places: every unit balancing may move that sits on an
    active node, and every unit a rule forces (wherever it is)."""
    where = start.unit_node
    placed = where >= 0
    on_active = np.zeros(len(where), dtype=bool)
    on_active[placed] = problem.active[where[placed]]
    chosen = movable & on_active
    for move in forced.moves:
        if where[move.move.unit] != NO_NODE:
            chosen[move.move.unit] = True
    return np.flatnonzero(chosen)


def joint_model(
    problem: Problem,
    constraints: Sequence[Constraint],
    start: State,
    units: np.ndarray,
    frozen: Frozen,
) -> LinearModel:
    """The exact program over `units` from `start`: every rule's rows, and its repair rows."""
    model = LinearModel(problem, start, units)
    for constraint in constraints:
        constraint.add_to_model(model)
        constraint.add_repair_to_model(model, frozen.vms)
    return model


@dataclass(frozen=True)
class JointSplit:
    """A joint plan as the planner hands it on: the repair moves (as forced moves) with the
    state after them, and the balancing moves that follow."""

    forced: Forced
    state: State
    balance: tuple[UnitMove, ...]


def split_plan(
    problem: Problem, start: State, moves: Sequence[UnitMove], repairs: Repairs
) -> JointSplit:
    """Moves of units that repair a rule become repair moves (carried out on a copy of
    `start`, largest first), the others balancing moves."""
    state = start.copy()
    out = Forced()
    balance: list[UnitMove] = []
    copy = problem.units.copy_bytes
    for move in sorted(moves, key=lambda m: (-copy[m.unit], m.unit)):
        if move.unit not in repairs.reasons:
            balance.append(move)
            continue
        why, kind = repairs.reasons[move.unit]
        members = problem.units.members(move.unit)
        if move.source == SPLIT:
            for vm in members[state.vm_node[members] != move.target]:
                out.rejoined.append(Rejoined(int(vm), int(state.vm_node[vm]), move.target))
        state.move_unit(problem, move.unit, move.target)
        out.moves.append(ForcedMove(move, why, kind))
    return JointSplit(out, state, tuple(balance))


def solve_levels(model: LinearModel, weights: np.ndarray, levels: Sequence[float]) -> ExactResult:
    """The first level's answer that is a plan: fewest migrations under the level (or, where
    none reaches it, the lowest imbalance in the fewest migrations)."""
    result = ExactResult("infeasible", (), False, 0, 0.0)
    for level in levels:
        result = model.solve(level, weights)
        if result.status == "optimal" or result.moves:
            return result
    return result
