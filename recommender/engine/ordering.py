"""A feasible order for a set of moves: every intermediate state keeps every hard rule.

A move whose target lacks room waits until a move off that target has run. When no pending
move can run (a cycle, e.g. two full nodes swapping VMs), `order_moves` can break the cycle
with a detour through a third node that has room — one more migration — or report the moves
it could not order. Used by the engine to validate plans and by `recommender.plan` to sequence
them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from recommender.engine.problem import Problem, State
from recommender.engine.rules import Constraint, Movers, allowed_targets
from recommender.resources import MEM


@dataclass(frozen=True)
class Request:
    """VMs (one unit, or part of one) that should end on `target`."""

    vms: np.ndarray
    target: int


@dataclass(frozen=True)
class Step:
    """VMs (one unit, or part of one) going to `target` together."""

    vms: np.ndarray
    target: int
    origin: int  # index of the move this step carries out (detours share it)


@dataclass
class Ordering:
    steps: list[Step]
    stuck: list[int]  # indices of moves that could not run
    state: State
    detours: list[int] = field(default_factory=list)  # moves that went through a third node


def order_moves(
    problem: Problem,
    constraints: Sequence[Constraint],
    start: State,
    moves: Sequence[Request],
    *,
    detours: bool = False,
) -> Ordering:
    """Greedy: repeatedly run the first pending move (in the given priority order) that is
    allowed now; when none is, detour the smallest stuck move if `detours`, else stop."""
    state = start.copy()
    pending = list(range(len(moves)))
    steps: list[Step] = []
    detoured: list[int] = []
    while pending:
        groups = [np.asarray(moves[i].vms, dtype=np.int64) for i in pending]
        movers = Movers.of_groups(problem, state, groups)
        mask = allowed_targets(constraints, state, movers)
        targets = np.array([moves[i].target for i in pending])
        ready = mask[np.arange(len(pending)), targets]
        if ready.any():
            pick = int(np.flatnonzero(ready)[0])
            index = pending.pop(pick)
            for vm in groups[pick]:
                state.move_vm(problem, int(vm), int(targets[pick]))
            steps.append(Step(groups[pick], int(targets[pick]), index))
            continue
        if not detours:
            break
        allowed = [i not in detoured for i in pending]
        via = _detour(problem, mask, state, groups, targets, allowed)
        if via is None:
            break
        pick, node = via
        index = pending[pick]
        for vm in groups[pick]:
            state.move_vm(problem, int(vm), node)
        steps.append(Step(groups[pick], node, index))
        detoured.append(index)
    return Ordering(steps, pending, state, detoured)


def _detour(
    problem: Problem,
    mask: np.ndarray,
    state: State,
    groups: list[np.ndarray],
    targets: np.ndarray,
    allowed: list[bool],
) -> tuple[int, int] | None:
    """(pending position, intermediate node) for the smallest stuck move that can park on a
    third node, choosing the node with the most free memory; None when none can."""
    free = problem.limits[:, MEM] - state.node_load[:, MEM]
    order = sorted(range(len(groups)), key=lambda i: (problem.copy_bytes[groups[i]].sum(), i))
    for i in order:
        options = mask[i].copy()
        options[targets[i]] = False
        if allowed[i] and options.any():
            candidates = np.flatnonzero(options)
            return i, int(candidates[np.argmax(free[candidates])])
    return None
