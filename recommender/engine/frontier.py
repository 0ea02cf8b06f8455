"""The trade-off frontier: the lowest overall imbalance reachable with k migrations.

When the target is out of reach, a plan stops where its moves stop paying for their memory
copy, and the operator still wants to know what more moves would buy. For k = 1, 2, ... the
frontier holds the lowest imbalance of a plan with at most k VM migrations that keeps every
rule (and repairs those broken at the start), with a proven lower bound:

* On small clusters the exact program (`recommender.engine.exact`, the joint model of
  `recommender.engine.joint`) minimises the imbalance under a budget of k, once per k; its
  answer is exact where HiGHS proves it within the nodes left to it (one budget for the
  frontier, `FRONTIER_NODES`), and its dual bound otherwise.
* On large clusters a beam search aimed at zero imbalance gives the best plan found per
  number of migrations, each improved by single exchanges and by the plans one move
  shorter than the next (`recommender.engine.exchange`), and the bound is
  `recommender.engine.bound`: a migration takes one VM off one node, so k migrations in all
  can bring every node under a utilisation t only if the fewest VMs each node must shed to
  get there sum to at most k.

The knee is the last k whose marginal gain over the point before still pays for the memory a
migration of that plan copies (`recommender.engine.hysteresis.gain_threshold`). Every limit
is a count, so the frontier is a pure function of the snapshot and the config.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from recommender.engine import hysteresis
from recommender.engine.bound import LowerBounds, lower_bound
from recommender.engine.candidates import Candidate, Moves, SearchContext
from recommender.engine.exact import CUT_POOL, ExactResult, Hint, LinearModel
from recommender.engine.exchange import exchange, placed, shorter
from recommender.engine.measure import EPSILON
from recommender.engine.problem import Problem, State, UnitMove
from recommender.engine.result import Frontier, FrontierPoint
from recommender.engine.rules import violations

# Most points of the frontier (k = 1 ... this, or the rule's migration budget if lower).
FRONTIER_POINTS = 20
# Branch-and-bound nodes of the exact frontier (without HiGHS's root restart, whose second
# root cost more than these nodes): each point takes at most FRONTIER_MAX_NODES of what the
# batches before it left of FRONTIER_NODES, so a point proven early leaves its nodes to the
# later, harder ones, and a frontier's cost has a ceiling. Points solved at once, each in
# its own thread: FRONTIER_BATCH, the same batches on any machine (on one core they share
# it), so the same frontier. On 200 seeded small clusters (bench/bench_engine_frontier.py),
# points within 2 % of the optimum: one point at a time, 500 nodes a point and no shared
# limit 97.8 %, 1,000 of 2,000 98.3 %; two at a time, 1,000 of 2,000 98.0 %, 1,200 of 2,400
# 98.2 %, 1,500 of 3,000 98.4 %. Plan time p90, each plan alone on two cores, one point at a
# time and 1,000 of 2,000: wall 4.0 s; two at a time: 2.2 s, and with 1,500 of 3,000 2.5 s
# (CPU time 3.4 and 3.9 s; one machine, side by side in one process). With HiGHS's cut
# pool at 100 rows (`exact.CUT_POOL`), 2,000 of 4,000: 98.9 %, against 98.4 % for the
# defaults and 1,500 of 3,000, at the same CPU time p90 (2.49 against 2.44 s) and a lower
# max (4.42 against 4.89 s), side by side with the small pool on every program of the plan
# (the frontier's alone, in the benchmark's own run: CPU p90 2.31 s, max 4.27 s).
FRONTIER_MAX_NODES = 2000
FRONTIER_NODES = 4000
FRONTIER_BATCH = 2
# Where the search's point is further than this share above the linear bound, the bound is
# tightened with whole pieces (`recommender.engine.bound`).
BOUND_GAP = 0.02


def frontier_size(budget: int) -> int:
    return max(0, min(FRONTIER_POINTS, budget))


def exact_frontier(
    model: LinearModel,
    ctx: SearchContext,
    start: State,
    size: int,
    start_overall: float | None,
) -> Frontier:
    """The frontier by the exact program, from `start` (the snapshot's placement).

    The points are solved FRONTIER_BATCH at a time, at once in threads, each program started
    from the best point before its batch and given an equal share of the nodes left; which
    program gets what depends only on the points before, never on which thread ends first.
    Once a point is at the proven lower bound for the largest k (`lower_bound` over the
    program's units), no later k does better: the later points are that point, and their
    programs are not run (as once a point balances the cluster)."""
    weights = ctx.problem.weights
    modelled = np.zeros(len(ctx.problem.units), dtype=bool)
    modelled[model.units] = True
    floor = max(lower_bound(ctx.problem, start, modelled, size), 0.0)
    points: list[FrontierPoint] = []
    left = FRONTIER_NODES
    with ThreadPoolExecutor(max_workers=FRONTIER_BATCH) as pool:
        for first in range(1, size + 1, FRONTIER_BATCH):
            batch = range(first, min(first + FRONTIER_BATCH, size + 1))
            before = points[-1] if points else None
            hint = None if before is None else _hint(ctx, start, before.moves)
            nodes = max(1, min(FRONTIER_MAX_NODES, left // len(batch)))
            runs = [
                pool.submit(
                    model.lowest,
                    weights,
                    k,
                    max_nodes=nodes,
                    restart=False,
                    hint=hint,
                    cut_pool=CUT_POOL,
                )
                for k in batch
            ]
            for k, run in zip(batch, runs, strict=True):
                found = run.result()
                left -= found.nodes
                point = _point(ctx, start, k, found, points[-1] if points else None)
                if point is not None:
                    points.append(point)
            if points and points[-1].imbalance <= floor + EPSILON:
                # No plan of up to `size` migrations does better: every later point is this one.
                last = points[-1]
                points.extend(
                    FrontierPoint(
                        m, last.imbalance, last.imbalance, last.memory_bytes, True, last.moves
                    )
                    for m in range(last.migrations + 1, size + 1)
                )
                break
    return _finish(ctx.problem, points, start_overall)


def _point(
    ctx: SearchContext,
    start: State,
    k: int,
    found: ExactResult,
    before: FrontierPoint | None,
) -> FrontierPoint | None:
    """The point for k from the program's answer; the point before stands in where the
    program found nothing better within its limit (a plan of k - 1 is one of k)."""
    if found.status not in ("optimal", "limit") or (not found.moves and found.status == "limit"):
        if before is None:
            return None
        return FrontierPoint(k, before.imbalance, 0.0, before.memory_bytes, False, before.moves)
    overall = _overall(ctx, start, found.moves)
    bound = min(max(found.bound, 0.0), overall) if np.isfinite(found.bound) else 0.0
    if before is not None and before.imbalance < overall - EPSILON:
        return FrontierPoint(k, before.imbalance, bound, before.memory_bytes, False, before.moves)
    optimal = found.status == "optimal"
    return FrontierPoint(
        k, overall, overall if optimal else bound, found.memory, optimal, found.moves
    )


def _overall(ctx: SearchContext, start: State, moves: tuple[UnitMove, ...]) -> float:
    state = placed(ctx.problem, start, {m.unit: m.target for m in moves})
    return ctx.scorer.view(state.node_load, ctx.target).overall


def _hint(ctx: SearchContext, start: State, moves: tuple[UnitMove, ...]) -> Hint:
    state = placed(ctx.problem, start, {m.unit: m.target for m in moves})
    return Hint(moves, ctx.scorer.view(state.node_load, ctx.target).per_resource)


def search_frontier(
    ctx: SearchContext,
    start: Candidate,
    size: int,
    plan: Candidate,
    start_overall: float | None,
) -> Frontier:
    """The frontier by a beam search aimed at zero imbalance from `start` (the state after
    forced moves), with the shedding bound over the migrations after them; `plan` (the chosen
    plan) is a point too."""
    aim = ctx.aiming_at(0.0)
    base = start.state.migrations
    best: dict[int, Candidate] = {base: start} if base else {}
    level = [start]
    for _ in range(size):
        children: list[Candidate] = []
        for parent in level:
            room = size - (parent.state.migrations - base)
            found = aim.moves(parent.state, parent.view, room, [m.unit for m in parent.moves])
            for i in _picked(aim, found):
                children.append(aim.apply(parent, int(found.unit[i]), int(found.target[i])))
        if not children:
            break
        children.sort(key=lambda c: (round(c.overall, 9), c.state.migrations, c.memory))
        level = children[: max(ctx.limits.width, 1)]
        for child in children:
            k = child.state.migrations
            if k not in best or child.overall < best[k].overall - EPSILON:
                best[k] = child
    _add_prefixes(ctx, aim, start, plan, best)
    offered = _Offers(ctx, start.state, best)
    bounds = LowerBounds(
        ctx.problem, start.state, ctx.movable, size, whole_pieces=ctx.limits.whole_piece_bound
    )
    _improve(offered, bounds, size)
    points: list[FrontierPoint] = []
    for k in range(1, size + 1):
        top = offered.top(k)
        if top is None:
            continue
        proven = bounds.at(k - base, (1.0 - BOUND_GAP) * top.overall)
        bound = min(proven, top.overall)
        exact = bound >= top.overall - EPSILON
        points.append(FrontierPoint(k, top.overall, bound, top.memory, exact, top.moves))
    return _finish(ctx.problem, points, start_overall)


def _improve(offered: _Offers, bounds: LowerBounds, size: int) -> None:
    """The beam's best plan per number of migrations improved by exchanges, from the fewest
    up so that a better plan for k is where k + 1 starts, then by the plans one move shorter
    than each, from the most down; passes of both (`SearchLimits.frontier_passes`) while one
    improves a point. A point within BOUND_GAP of the linear bound is not exchanged: its
    exchanges could gain little, and cost as much as a search step per move of it."""
    ctx, start, best = offered.ctx, offered.start, offered.best
    if ctx.limits.frontier_passes <= 0:
        return
    linear = {k: bounds.at(k - start.migrations, -math.inf) for k in range(1, size + 1)}
    exchanged: set[tuple[int, tuple[UnitMove, ...]]] = set()  # what a pass before did
    for _ in range(ctx.limits.frontier_passes):
        changed = False
        for k in range(1, size + 1):
            top = offered.top(k)
            if top is None or (k, top.moves) in exchanged:
                continue
            if top.overall * (1.0 - BOUND_GAP) <= linear[k] + EPSILON:
                continue
            exchanged.add((k, top.moves))
            changed |= offered.offer(k, exchange(ctx, start, k - start.migrations, top.moves))
        for k in sorted(best, reverse=True):
            for rest, state in shorter(ctx.problem, start, best[k].moves):
                changed |= offered.offer(state.migrations, rest, state)
        if not changed:
            break


class _Offers:
    """The best plan known per number of migrations (`best`, keyed by the migrations of the
    state, forced ones included), and plans offered for at most k: kept where they keep
    every rule and beat every plan known with at most k."""

    def __init__(self, ctx: SearchContext, start: State, best: dict[int, Candidate]) -> None:
        self.ctx, self.start, self.best = ctx, start, best

    def top(self, k: int) -> Candidate | None:
        """The best plan known with at most `k` migrations."""
        known = [c for m, c in self.best.items() if m <= k]
        return min(known, key=lambda c: (round(c.overall, 9), c.memory)) if known else None

    def offer(self, k: int, moves: tuple[UnitMove, ...], state: State | None = None) -> bool:
        """Whether the plan of `moves` (ending in `state`) is kept for at most `k`."""
        ctx = self.ctx
        if state is None:
            state = placed(ctx.problem, self.start, {m.unit: m.target for m in moves})
        if state.migrations > k:
            return False
        copy = float(sum(ctx.problem.units.copy_bytes[m.unit] for m in moves))
        plan = ctx.candidate(state, moves, copy)
        known = self.top(k)
        if known is not None and plan.overall >= known.overall - EPSILON:
            return False
        if violations(ctx.constraints, state, final=True):
            return False
        self.best[state.migrations] = plan
        return True


def _add_prefixes(
    ctx: SearchContext,
    aim: SearchContext,
    start: Candidate,
    plan: Candidate,
    best: dict[int, Candidate],
) -> None:
    """The chosen plan and each run of its first moves as points (where better): the beam
    keeps few plans a level, and a longer plan's first moves often beat what it kept."""
    prefix = start
    for move in plan.moves:
        prefix = aim.apply(prefix, move.unit, move.target)
        k = prefix.state.migrations
        if (k not in best or prefix.overall < best[k].overall - EPSILON) and not violations(
            ctx.constraints, prefix.state, final=True
        ):
            best[k] = prefix


def _picked(aim: SearchContext, found: Moves) -> np.ndarray:
    """The guide's best moves, and the move lowest in imbalance itself: the guide (distance
    to zero) may rank it low, and a frontier point is the imbalance at its k."""
    picked = aim.best_moves(found, aim.limits.branch)
    if len(found):
        lowest = int(np.lexsort((found.copy, np.round(found.overall, 9)))[0])
        if lowest not in picked:
            picked = np.append(picked, lowest)
    return picked


def _finish(problem: Problem, points: list[FrontierPoint], start_overall: float | None) -> Frontier:
    """Bounds made monotone (a bound for k holds for fewer migrations too) and the knee."""
    fixed = list(points)
    for i in range(len(fixed) - 2, -1, -1):
        later = fixed[i + 1].lower_bound
        if later > fixed[i].lower_bound:
            p = fixed[i]
            exact = later >= p.imbalance - EPSILON
            fixed[i] = FrontierPoint(
                p.migrations, p.imbalance, min(later, p.imbalance), p.memory_bytes, exact, p.moves
            )
    return Frontier(tuple(fixed), knee(problem, fixed, start_overall))


def knee(problem: Problem, points: list[FrontierPoint], start_overall: float | None) -> int:
    """The last k whose gain over the point before pays for the memory one migration of its
    plan copies. `start_overall` is the imbalance of making no migration, None where the
    start breaks a rule (then the knee is at least the first point, the least repair)."""
    if not points:
        return 0
    if start_overall is None:
        chosen, previous, rest = points[0].migrations, points[0].imbalance, points[1:]
    else:
        chosen, previous, rest = 0, start_overall, points
    for p in rest:
        gain = previous - p.imbalance
        copy = p.memory_bytes / max(len(p.moves), 1)
        threshold = float(hysteresis.gain_threshold(copy, problem.balance))
        if gain > EPSILON and gain >= threshold - EPSILON:
            chosen = p.migrations
        previous = p.imbalance
    return chosen
