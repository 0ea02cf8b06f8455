"""Better plans at a fixed number of migrations: single exchanges, and one move fewer.

A frontier point is the best plan known with at most k VM migrations. Where branch and bound
stops at its node limit, or a beam search keeps too few plans a level, a point can be left
that one exchange improves: take one of its moves back and make another instead (another
unit, or the same unit to another node), or make one more where k allows. `exchange` takes
the exchange lowest in overall imbalance that keeps every rule, round after round, while one
improves. A plan of k + 1 migrations less one of its moves is a plan of at most k, and often
better than what a search kept for k: `shorter` gives those. Every limit is a count.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import numpy as np

from recommender.engine.candidates import SearchContext
from recommender.engine.measure import EPSILON
from recommender.engine.problem import Problem, State, UnitMove
from recommender.engine.rules import violations

# Rounds of `exchange` (each one improving exchange), and per round the exchanges checked
# against every rule, lowest in imbalance first, until one keeps them all.
ROUNDS = 8
CHECKS = 16
# On clusters of more than HOT_ALL active nodes an exchange's new move is one of a VM on the
# node hottest in a weighted resource (HOT_PER_RESOURCE per resource), as a search step's on
# the largest clusters: what lowers a max-based imbalance takes load off those nodes. On 50
# simulated 32 x 40 clusters (bench/bench_engine_speed.py) every source node made the
# frontier's exchanges double the plan's time, these the same points for a few per cent.
HOT_ALL = 8
HOT_PER_RESOURCE = 1


def exchange(
    ctx: SearchContext, start: State, k: int, moves: tuple[UnitMove, ...]
) -> tuple[UnitMove, ...]:
    """The plan of `moves` (at most `k` VM migrations from `start`) exchanged, up to ROUNDS
    times, while an exchange of units of `ctx.movable` lowers the overall imbalance with at
    most `k` migrations and keeps every rule at its end; `moves` itself where none does (or
    a unit of it was split at the start)."""
    if any(m.source < 0 for m in moves):
        return moves
    # Only the imbalance of a move chooses here, not its distance to the target region; on
    # clusters of more than HOT_ALL active nodes only the VMs of the hottest nodes move.
    limits = ctx.limits
    ctx = replace(
        ctx,
        limits=replace(
            limits,
            refine=0,
            hot_all=min(limits.hot_all, HOT_ALL),
            hot_per_resource=min(limits.hot_per_resource, HOT_PER_RESOURCE),
        ),
    )
    plan = {m.unit: m.target for m in moves}
    current = ctx.scorer.view(placed(ctx.problem, start, plan).node_load, 0.0).overall
    for _ in range(ROUNDS):
        found = _better(ctx, start, k, plan, current)
        if found is None:
            break
        current, plan = found
    return as_moves(start, plan)


def _better(
    ctx: SearchContext, start: State, k: int, plan: dict[int, int], current: float
) -> tuple[float, dict[int, int]] | None:
    """The best exchange of `plan` under `current` that keeps every rule, or None."""
    tried: list[tuple[float, float, dict[int, int]]] = []
    for back in [None, *plan]:
        kept = {u: t for u, t in plan.items() if u != back}
        base = placed(ctx.problem, start, kept)
        view = ctx.scorer.view(base.node_load, 0.0)
        if back is not None:
            tried.append((view.overall, 0.0, kept))
        room = k - (base.migrations - start.migrations)
        found = ctx.moves(base, view, room, list(kept))
        order = np.lexsort((found.copy, np.round(found.overall, 9)))[:CHECKS]
        for i in order:
            unit, target = int(found.unit[i]), int(found.target[i])
            if target != start.unit_node[unit]:
                tried.append(
                    (float(found.overall[i]), float(found.copy[i]), {**kept, unit: target})
                )
    tried.sort(key=lambda t: (round(t[0], 9), t[1]))
    for overall, _, candidate in tried[:CHECKS]:
        if overall >= current - EPSILON:
            return None
        state = placed(ctx.problem, start, candidate)
        if state.migrations - start.migrations <= k and not violations(
            ctx.constraints, state, final=True
        ):
            return overall, candidate
    return None


def shorter(
    problem: Problem, start: State, moves: tuple[UnitMove, ...]
) -> Iterator[tuple[tuple[UnitMove, ...], State]]:
    """Each plan of `moves` less one of them, with its end state from `start`."""
    for i in range(len(moves)):
        rest = moves[:i] + moves[i + 1 :]
        yield rest, placed(problem, start, {m.unit: m.target for m in rest})


def placed(problem: Problem, start: State, plan: dict[int, int]) -> State:
    """The state after moving each unit of `plan` (unit -> node) from `start`."""
    state = start.copy()
    for unit, target in plan.items():
        state.move_unit(problem, unit, target)
    return state


def as_moves(start: State, plan: dict[int, int]) -> tuple[UnitMove, ...]:
    return tuple(UnitMove(u, int(start.unit_node[u]), t) for u, t in sorted(plan.items()))
