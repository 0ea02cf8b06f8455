"""Every end placement of a small cluster that keeps every rule, by enumeration: the truth
the exact program and the frontier are checked against; and every plan one exchange from a
plan, the neighbourhood the frontier's exchanges are checked against."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from recommender.config import Config
from recommender.engine.build import build_problem
from recommender.engine.exchange import placed
from recommender.engine.forced import frozen_vms
from recommender.engine.problem import Problem, State
from recommender.engine.rules import prepare_constraints, violations
from recommender.model import Snapshot


@dataclass(frozen=True)
class Placement:
    """One end placement that keeps every rule: its VM migrations and overall imbalance."""

    migrations: int
    overall: float


def placements(snap: Snapshot, cfg: Config, most: int | None = None) -> Iterator[Placement]:
    """Every end placement keeping every rule (and needing no forced move), with at most
    `most` VM migrations when given."""
    problem = build_problem(snap, cfg)
    constraints = prepare_constraints(problem)
    stuck = frozen_vms(constraints, problem.n_vms).vms
    start = State.initial(problem)
    nodes = np.flatnonzero(problem.receivable)
    for where in itertools.product(nodes, repeat=problem.n_vms):
        moved = int(np.sum(np.asarray(where) != problem.vm_node))
        if most is not None and moved > most:
            continue
        state = start.copy()
        for v, n in enumerate(where):
            state.move_vm(problem, v, int(n))
        if violations(constraints, state, final=True):
            continue
        if any(c.must_move(state, stuck) for c in constraints):
            continue
        yield Placement(state.migrations, problem.imbalance(state.node_load).overall)


def exchanges(
    problem: Problem, start: State, movable: np.ndarray, plan: dict[int, int], most: int
) -> Iterator[tuple[dict[int, int], State]]:
    """Every plan one exchange from `plan` (unit -> node, from `start`): one of its moves
    taken back, or none, and another move made (any movable unit placed whole at the start
    that the rest leaves where it is, to any receivable node but its own), or none; with at
    most `most` VM migrations. Rules are not checked."""
    nodes = np.flatnonzero(problem.receivable)
    for back in [None, *plan]:
        kept = {u: t for u, t in plan.items() if u != back}
        if back is not None:
            yield from _within(problem, start, kept, most)
        for unit in np.flatnonzero(movable & (start.unit_node >= 0)):
            if int(unit) in kept:
                continue
            for target in nodes[nodes != start.unit_node[unit]]:
                yield from _within(problem, start, {**kept, int(unit): int(target)}, most)


def _within(
    problem: Problem, start: State, plan: dict[int, int], most: int
) -> Iterator[tuple[dict[int, int], State]]:
    state = placed(problem, start, plan)
    if state.migrations - start.migrations <= most:
        yield plan, state
