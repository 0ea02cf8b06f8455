"""Local search over single moves: the heuristic that finds few migrations reaching the target.

`find_plan` builds plans with `beam_search` (extend the best few partial plans by their best
moves) and, on small clusters, `pilot` (try the best few moves, complete each greedily, keep
the move whose completion is best), and from a plan made for a stricter target; `prune`
drops moves the plan does not need; `shrink` drops one move and repairs the rest by tabu
search (`repair`) while the target stays reached; `reduce_memory` swaps moves for ones that
copy less. Every plan is checked to have a feasible order. All effort limits are counts, not
clocks, so the result is deterministic. What a search works with — candidates, scored moves,
the ranking of plans, the context and its limits — is in `recommender.engine.candidates`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from recommender.engine.candidates import Candidate, MoveKey, PlanRank, SearchContext
from recommender.engine.measure import EPSILON, reaches
from recommender.engine.problem import State, UnitMove


@dataclass(frozen=True)
class _Child:
    """A plan one move longer than `parent`, before the move is applied."""

    # The order children are kept in: the move's key, the plan's memory, its moves.
    key: tuple[MoveKey, float, tuple[tuple[int, int], ...]]
    move: MoveKey
    parent: Candidate
    unit: int
    target: int


def beam_search(ctx: SearchContext, start: Candidate, budget: int) -> Candidate:
    """Best plan extending `start` by at most `budget` migrations.

    Each level extends every kept plan by its `branch` best moves and keeps the `width` best
    plans (by the search guide, then overall imbalance, smooth objective and memory). Moves
    need not improve, so a plateau can be crossed. Returns the best plan reaching the target
    at the first level that has one, else the best plan seen."""
    base_migrations = start.state.migrations
    level = [start]
    best = start
    for _ in range(budget):
        children: dict[frozenset[tuple[int, int]], _Child] = {}
        for parent in level:
            room = budget - (parent.state.migrations - base_migrations)
            moved = [m.unit for m in parent.moves]
            found = ctx.moves(parent.state, parent.view, room, moved)
            if len(found) == 0:
                continue
            taken = {(m.unit, m.target) for m in parent.moves}
            for i in ctx.best_moves(found, ctx.limits.branch):
                unit, target = int(found.unit[i]), int(found.target[i])
                key = frozenset(taken | {(unit, target)})
                if key in children:
                    continue
                memory = parent.memory + float(found.copy[i])
                move = ctx.move_key(found, i)
                rank = (move, memory, tuple(sorted(key)))
                children[key] = _Child(rank, move, parent, unit, target)
        if not children:
            break
        ranked = sorted(children.values(), key=lambda c: c.key)
        reached = [c for c in ranked if reaches(c.move.overall, ctx.target)]
        if reached:
            done = [ctx.apply(c.parent, c.unit, c.target) for c in reached]
            return min(done, key=ctx.rank)
        level = [ctx.apply(c.parent, c.unit, c.target) for c in ranked[: ctx.limits.width]]
        leader = min(level, key=ctx.rank)
        if ctx.rank(leader) < ctx.rank(best):
            best = leader
    return best


def prune(ctx: SearchContext, start: State, plan: Candidate) -> Candidate:
    """Drop moves (largest memory first) while the plan stays at least as good: under the
    target if it was, else no worse than it was."""
    goal = ctx.target if ctx.reached(plan) else plan.overall
    changed = True
    while changed and plan.moves:
        changed = False
        order = sorted(
            range(len(plan.moves)),
            key=lambda i: (-ctx.problem.units.copy_bytes[plan.moves[i].unit], i),
        )
        for i in order:
            trial = ctx.replay(start, plan.moves[:i] + plan.moves[i + 1 :])
            if trial is not None and reaches(trial.overall, goal):
                plan, changed = trial, True
                break
    return plan


def reduce_memory(ctx: SearchContext, start: State, plan: Candidate) -> Candidate:
    """Swap single moves for ones that copy less memory while the plan keeps its standing
    (under the target, or no worse than before)."""
    goal = ctx.target if ctx.reached(plan) else plan.overall
    copies = ctx.problem.units.copy_bytes
    improved = True
    rounds = 0
    while improved and rounds < ctx.limits.memory_rounds * max(1, len(plan.moves)):
        improved = False
        rounds += 1
        order = sorted(range(len(plan.moves)), key=lambda i: (-copies[plan.moves[i].unit], i))
        for i in order:
            trial = _cheaper_swap(ctx, start, plan, i, goal)
            if trial is not None:
                plan, improved = trial, True
                break
    return plan


def _cheaper_swap(
    ctx: SearchContext, start: State, plan: Candidate, i: int, goal: float
) -> Candidate | None:
    """The plan with move `i` replaced by the cheapest single move that keeps it at or under
    `goal` and has a feasible order, or None."""
    copies = ctx.problem.units.copy_bytes
    old = plan.moves[i]
    rest = plan.moves[:i] + plan.moves[i + 1 :]
    base = ctx.replay(start, rest)
    if base is None:
        return None
    room = int(ctx.problem.units.size[old.unit])
    # Only the imbalance, smooth objective and memory of a move choose here, not its
    # distance: the units copying no less need not be scored.
    limit = copies[old.unit] * (1 - 1e-9)
    found = ctx.moves(base.state, base.view, room, [m.unit for m in rest], copies < limit)
    cheaper = found.copy < limit
    better = np.flatnonzero(reaches(found.overall, goal) & cheaper)
    if len(better) == 0:
        return None
    order = np.lexsort(
        (
            found.target[better],
            found.unit[better],
            found.smooth[better],
            np.round(found.overall[better], 9),
            found.copy[better],
        )
    )
    pick = better[order[0]]
    unit = int(found.unit[pick])
    move = UnitMove(unit, int(start.unit_node[unit]), int(found.target[pick]))
    trial = ctx.replay(start, (*rest, move))
    if trial is not None and reaches(trial.overall, goal):
        return trial
    return None


def _without(ctx: SearchContext, plan: Candidate, index: int) -> Candidate:
    """The plan minus one move, by taking it back on the end state (order not checked)."""
    move = plan.moves[index]
    state = plan.state.copy()
    state.move_unit(ctx.problem, move.unit, move.source, undo=True)
    memory = plan.memory - float(ctx.problem.units.copy_bytes[move.unit])
    return ctx.candidate(state, plan.moves[:index] + plan.moves[index + 1 :], memory)


def _nearness(plan: Candidate) -> tuple[float, float, float]:
    """How near a plan that misses the target is to reaching it — the tabu search's
    objective: the distance to the target region, then the imbalance, then memory."""
    return (round(plan.view.distance, 9), round(plan.overall, 9), plan.memory)


@dataclass(frozen=True)
class _Replacement:
    key: tuple[MoveKey, float, int]  # the new move's key, its memory, the dropped move
    base: Candidate  # the plan without the dropped move
    dropped: UnitMove
    unit: int
    target: int


def repair(ctx: SearchContext, plan: Candidate, steps: int) -> Candidate:
    """Tabu search at a fixed number of moves, minimising the distance to the target region.

    Each step replaces one move (of the `repair_width` whose removal hurts least) by the
    single move that leaves the smallest distance (even if it is larger than now); a VM
    taken out of the plan may not come back, and a VM just put in may not be taken out, for
    `tenure` steps. Stops when the target is reached (the caller keeps only such plans)."""
    tenure = max(2, len(plan.moves) // 2 + 1)
    removed: dict[int, int] = {}  # unit -> step until which it may not come back
    added: dict[int, int] = {}  # unit -> step until which it stays
    for step in range(steps):
        if ctx.reached(plan):
            return plan
        waiting = [u for u, until in removed.items() if until >= step]
        choice = _best_replacement(ctx, plan, step, added, waiting)
        if choice is None:
            break
        removed[choice.dropped.unit] = step + tenure
        added[choice.unit] = step + tenure
        plan = ctx.apply(choice.base, choice.unit, choice.target)
    return plan


def _best_replacement(
    ctx: SearchContext, plan: Candidate, step: int, added: dict[int, int], waiting: list[int]
) -> _Replacement | None:
    # Take out only the moves whose removal hurts least (the plan without them is nearest
    # the target region): the others are unlikely to be worth replacing.
    bases = {
        i: _without(ctx, plan, i)
        for i in range(len(plan.moves))
        if added.get(plan.moves[i].unit, -1) < step
    }
    nearest = sorted(bases, key=lambda i: (_nearness(bases[i]), i))
    choice: _Replacement | None = None
    for i in nearest[: ctx.limits.repair_width]:
        base, old = bases[i], plan.moves[i]
        room = int(ctx.problem.units.size[old.unit])
        found = ctx.moves(base.state, base.view, room, [m.unit for m in base.moves])
        if len(found) == 0:
            continue
        banned = np.isin(found.unit, waiting)
        banned |= (found.unit == old.unit) & (found.target == old.target)
        # A banned move is still taken if it reaches the target (aspiration).
        banned &= found.distance > EPSILON
        order = [j for j in ctx.best_moves(found, 4 + int(banned.sum())) if not banned[j]]
        if not order:
            continue
        j = order[0]
        key = (ctx.move_key(found, j), float(found.copy[j]), i)
        if choice is None or key < choice.key:
            choice = _Replacement(key, base, old, int(found.unit[j]), int(found.target[j]))
    return choice


def shrink(ctx: SearchContext, start: State, plan: Candidate) -> Candidate:
    """Fewer moves: drop the move whose loss hurts least, repair the rest by local search;
    keep the smaller plan when it reaches the target and has a feasible order."""
    if not ctx.reached(plan):
        return plan
    while len(plan.moves) > 0:
        drops = sorted((_without(ctx, plan, i) for i in range(len(plan.moves))), key=_nearness)
        improved = False
        for trial in drops[: ctx.limits.shrink_tries]:
            trial = repair(ctx, trial, ctx.limits.repair_steps)
            if not ctx.reached(trial):
                continue
            ordered = ctx.replay(start, trial.moves)
            if ordered is not None and ctx.reached(ordered):
                plan, improved = ordered, True
                break
        if not improved:
            break
    return plan


def pilot(ctx: SearchContext, start: Candidate, budget: int, best: Candidate) -> Candidate:
    """Pilot method: at each step try the `pilot_breadth` best moves, complete each greedily
    (never longer than the best plan known, `best` to begin with), and commit to the move
    whose completion is best. Returns the best complete plan seen."""
    greedy = replace(ctx, limits=replace(ctx.limits, width=1, branch=1))
    base = start.state.migrations
    plan = start
    while not greedy.reached(plan):
        room = budget - (plan.state.migrations - base)
        if greedy.reached(best):
            room = min(room, best.state.migrations - plan.state.migrations - 1)
        if room <= 0:
            break
        found = greedy.moves(plan.state, plan.view, room, [m.unit for m in plan.moves])
        if len(found) == 0:
            break
        trials: list[_Trial] = []
        for j in greedy.best_moves(found, ctx.limits.pilot_breadth):
            child = greedy.apply(plan, int(found.unit[j]), int(found.target[j]))
            left = room - (child.state.migrations - plan.state.migrations)
            done = beam_search(greedy, child, left) if left > 0 else child
            trials.append(_Trial(greedy.rank(done), len(trials), child, done))
        chosen = min(trials, key=lambda t: (t.rank, t.order))
        if chosen.rank < greedy.rank(best):
            best = chosen.done
        plan = chosen.child
    return best


@dataclass(frozen=True)
class _Trial:
    """A first move of the pilot method and the plan its greedy completion reaches."""

    rank: PlanRank  # of `done`
    order: int  # position among the moves tried
    child: Candidate
    done: Candidate


def construct(ctx: SearchContext, start: State, budget: int) -> list[Candidate]:
    """Pruned plans from the beam search and, when enabled, the pilot method."""
    base = ctx.candidate(start, (), 0.0)
    plans = [prune(ctx, start, beam_search(ctx, base, budget))]
    if ctx.limits.pilot_breadth > 0:
        found = pilot(ctx, base, budget, plans[0])
        if found is not plans[0]:
            plans.append(prune(ctx, start, found))
    return plans


def find_plan(ctx: SearchContext, start: State, budget: int) -> Candidate:
    """The search's best plan from `start` within `budget` migrations.

    Constructs with a beam search and, on small clusters, the pilot method; prunes; shrinks
    each by tabu search; keeps the best; then trades moves for ones copying less memory. If
    the target is out of reach, the lowest imbalance found becomes the target and the search
    runs again towards it, so the plan reaches it with as few migrations as it can find."""
    base = ctx.candidate(start, (), 0.0)
    plans = construct(ctx, start, budget)
    if ctx.limits.overshoot and any(ctx.reached(p) for p in plans):
        # From the other side: a plan well under the target, pruned back up to it.
        deeper = ctx.aiming_at(ctx.target * ctx.limits.overshoot)
        plan = beam_search(deeper, deeper.candidate(start, (), 0.0), budget)
        plans.append(prune(ctx, start, ctx.rescore(plan)))
    aim = ctx
    if not any(ctx.reached(p) for p in plans):
        lowest = min(p.overall for p in plans)
        if lowest >= base.overall - EPSILON:
            return base
        aim = ctx.aiming_at(lowest + EPSILON)
        plans = [aim.rescore(p) for p in plans]
        if aim.limits.reconstruct:
            plans += construct(aim, start, budget)
    plans = [shrink(aim, start, p) for p in plans]
    best = reduce_memory(aim, start, min(plans, key=aim.rank))
    return ctx.rescore(best)
