"""Moves the plan holds back, and why: below their gain threshold, or stopped by a rule.

`apply_gain_threshold` drops every balancing move whose gain does not pay for the memory it
copies (`recommender.engine.hysteresis`) and searches again without the dropped VMs.
`blocked_moves` lists, for a plan that misses its target, the best moves some rule or
hysteresis filter stopped — what the operator could allow to get further.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from recommender.engine import hysteresis
from recommender.engine.candidates import Candidate, SearchContext
from recommender.engine.measure import EPSILON
from recommender.engine.problem import Problem, State, UnitMove
from recommender.engine.result import HeldBack
from recommender.engine.rules import Movers
from recommender.engine.search import beam_search, prune

HELD_BACK_LIMIT = 10
# Units looked at for blocked moves.
BLOCKED_UNITS = 300


def leave_one_out_gains(ctx: SearchContext, plan: Candidate) -> np.ndarray:
    """For each move: the overall imbalance without it minus the plan's."""
    units = ctx.problem.units
    gains = np.zeros(len(plan.moves))
    for i, move in enumerate(plan.moves):
        load = plan.state.node_load.copy()
        load[move.target] -= units.load[move.unit]
        load[move.source] += units.load[move.unit]
        gains[i] = ctx.scorer.view(load, ctx.target).overall - plan.overall
    return gains


def apply_gain_threshold(
    ctx: SearchContext, start: State, plan: Candidate, budget: int
) -> tuple[Candidate, list[HeldBack]]:
    """Drop moves below their gain threshold; after drops, search again without the dropped
    VMs (twice at most), keeping the result only if it is better."""
    held: list[HeldBack] = []
    dropped: set[int] = set()  # units no longer tried
    for attempt in range(3):
        plan, more_dropped = _drop_weak(ctx, start, plan, held)
        dropped |= more_dropped
        room = budget - (plan.state.migrations - start.migrations)
        if not more_dropped or ctx.reached(plan) or room <= 0 or attempt == 2:
            break
        movable = ctx.movable.copy()
        movable[list(dropped)] = False
        again = replace(ctx, movable=movable)
        more = prune(again, start, beam_search(again, plan, room))
        more, more_dropped = _drop_weak(ctx, start, more, held)
        dropped |= more_dropped
        if ctx.rank(more) >= ctx.rank(plan):
            break
        plan = more
    return plan, held


def _drop_weak(
    ctx: SearchContext, start: State, plan: Candidate, held: list[HeldBack]
) -> tuple[Candidate, set[int]]:
    """Drop the move furthest below its gain threshold until every move passes; returns the
    plan and the units dropped (also those whose move lost its feasible order)."""
    problem = ctx.problem
    dropped: set[int] = set()
    while plan.moves:
        gains = leave_one_out_gains(ctx, plan)
        copies = problem.units.copy_bytes[[m.unit for m in plan.moves]]
        worst = hysteresis.weakest_move(gains, hysteresis.gain_threshold(copies, problem.balance))
        if worst is None:
            break
        move = plan.moves[worst]
        needed = float(hysteresis.gain_threshold(copies, problem.balance)[worst])
        held.extend(_held(problem, move, float(gains[worst]), ("min_gain",), needed))
        dropped.add(move.unit)
        plan, lost = ctx.replay_dropping(start, plan.moves[:worst] + plan.moves[worst + 1 :])
        for other in lost:
            held.extend(_held(problem, other, 0.0, ("sequencing",)))
            dropped.add(other.unit)
    return plan, dropped


def _held(
    problem: Problem, move: UnitMove, gain: float, why: tuple[str, ...], needed: float = math.nan
) -> list[HeldBack]:
    members = problem.units.members(move.unit)
    source, target = problem.nodes[move.source], problem.nodes[move.target]
    return [HeldBack(problem.vms[v], source, target, gain, why, needed) for v in members]


def merge_held_back(held: Sequence[HeldBack]) -> list[HeldBack]:
    """One entry per (vm, target) with a positive gain: its largest gain, the gain it needed,
    and every reason it was held back for; the largest gains first."""
    merged: dict[tuple[str, str], HeldBack] = {}
    for h in held:
        if not h.gain > EPSILON:
            continue
        key = (h.vm, h.target)
        seen = merged.get(key)
        if seen is None:
            merged[key] = h
            continue
        best = h if h.gain > seen.gain else seen
        reasons = tuple(dict.fromkeys((*best.blocked_by, *seen.blocked_by, *h.blocked_by)))
        needed = max((x.needed for x in (h, seen) if math.isfinite(x.needed)), default=math.nan)
        merged[key] = replace(best, blocked_by=reasons, needed=needed)
    return sorted(merged.values(), key=lambda h: (-h.gain, h.vm, h.target))


def blocked_moves(ctx: SearchContext, plan: Candidate, held_units: np.ndarray) -> list[HeldBack]:
    """The best moves from the plan's end state that some rule or hysteresis filter stopped:
    per unit its best such move with a gain, the largest gains first."""
    problem = ctx.problem
    state, view = plan.state, plan.view
    every = replace(
        ctx,
        movable=np.ones(len(problem.units), dtype=bool),
        limits=replace(ctx.limits, max_units=BLOCKED_UNITS),
    )
    units = every.source_units(state, view, 10**9, [m.unit for m in plan.moves])
    if len(units) == 0:
        return []
    movers = Movers.of_units(problem, state, units)
    reachable = np.repeat(problem.active[None, :], len(units), axis=0)
    reachable[np.arange(len(units)), np.maximum(movers.source, 0)] = False
    if reachable.sum() > ctx.limits.max_pairs:
        reachable &= ctx.target_pool(view, movers, reachable)
    rows, targets = np.nonzero(reachable)
    if len(rows) == 0:
        return []
    overall, _, _ = ctx.scorer.evaluate(view, movers.load, movers.source, targets, rows=rows)
    gain = view.overall - overall
    threshold = hysteresis.gain_threshold(problem.units.copy_bytes[units[rows]], problem.balance)
    blocked = {c.name: ~c.allowed_targets(state, movers)[rows, targets] for c in ctx.constraints}
    below = gain < threshold
    held = held_units[units[rows]]
    any_block = np.logical_or.reduce([*blocked.values(), below, held])
    # Per unit, its best blocked move with a gain.
    pick = np.flatnonzero((gain > EPSILON) & any_block)
    pick = pick[np.lexsort((targets[pick], -gain[pick], rows[pick]))]
    first = pick[np.r_[True, rows[pick][1:] != rows[pick][:-1]]] if len(pick) else pick
    first = first[np.lexsort((units[rows[first]], -gain[first]))][:HELD_BACK_LIMIT]
    out = []
    for i in first:
        r, t = int(rows[i]), int(targets[i])
        why = [name for name, mask in blocked.items() if mask[i]]
        if held[i]:
            members = problem.units.members(int(units[r]))
            why.append("cooldown" if problem.cooldown[members].any() else "burst")
        if below[i]:
            why.append("min_gain")
        move = UnitMove(int(units[r]), int(movers.source[r]), t)
        out.extend(_held(problem, move, float(gain[i]), tuple(why), float(threshold[i])))
    return out
