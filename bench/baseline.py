"""The baseline the engine is measured against: the original tool's greedy re-pack.

Every VM that may move is taken off its node; then, heaviest first (weighted load normalised
by the mean node capacity of each resource), each goes to the currently least loaded node
(weighted utilisation) that fits — memory with reserve, CPU headroom, pins, anti-affinity,
maintenance. Affinity groups are placed as one. Frozen VMs (excluded, unknown load) stay.
"""

from __future__ import annotations

import numpy as np

from recommender.engine.planner import balance_movable
from recommender.engine.problem import Problem, State
from recommender.engine.rules import Movers, allowed_targets, prepare_constraints
from recommender.engine.rules.max_migrations import MaxMigrations


def greedy_repack(problem: Problem) -> tuple[State, int, float]:
    """(end state, VM migrations, overall imbalance) of the re-pack from scratch."""
    constraints = [c for c in prepare_constraints(problem) if not isinstance(c, MaxMigrations)]
    start = State.initial(problem)
    state = start.copy()
    units = problem.units
    movable = balance_movable(problem, constraints) & (start.unit_node >= 0)
    movable &= (
        problem.receivable[np.maximum(start.unit_node, 0)]
        | problem.maintenance[np.maximum(start.unit_node, 0)]
    )
    chosen = np.flatnonzero(movable)
    # Take every movable unit off its node.
    for unit in chosen:
        for vm in units.members(unit):
            node = int(state.vm_node[vm])
            state.node_load[node] -= problem.load[vm]
            for s in problem.counted.of_vm(int(vm)):
                state.set_count[s, node] -= 1
            state.vm_node[vm] = -1
        state.unit_node[unit] = -1
    active = problem.active
    weights = problem.weights
    mean_capacity = problem.capacity[active].mean(axis=0)
    size = (units.load[chosen] / np.where(mean_capacity > 0, mean_capacity, 1.0)) @ weights
    capacity = np.where(problem.capacity > 0, problem.capacity, np.inf)
    for unit in chosen[np.lexsort((chosen, -size))]:
        movers = Movers.of_units(problem, state, np.array([unit]))
        fits = allowed_targets(constraints, state, movers)[0] & problem.receivable
        if fits.any():
            util = (state.node_load / capacity) @ weights
            options = np.flatnonzero(fits)
            target = int(options[np.argmin(util[options])])
        else:
            target = int(start.unit_node[unit])  # nowhere fits: it stays
        state.move_unit(problem, int(unit), target)
    migrations = int((state.vm_node != start.vm_node).sum())
    return state, migrations, problem.imbalance(state.node_load).overall
