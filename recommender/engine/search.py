"""Local search over single moves, scored with numpy (`recommender.engine.scorer`).

The max-based measure has plateaus (two nodes at the top: moving off one changes nothing), so
moves are ranked first by the *distance to the target region* (zero exactly when the plan is
under the target), then by the overall imbalance, then by a smooth objective — the weighted
sum of squared utilisation above the cluster mean — then by memory copied. Plans are ranked
one way everywhere (`plan_rank`): those reaching the target first, by fewest migrations,
least memory, lowest imbalance; the others by lowest imbalance, then migrations and memory.

`find_plan` builds plans with `beam_search` (extend the best few partial plans by their best
moves) and, on small clusters, `pilot` (try the best few moves, complete each greedily, keep
the move whose completion is best), and from a plan made for a stricter target; `prune`
drops moves the plan does not need; `shrink` drops one move and repairs the rest by tabu
search (`repair`) while the target stays reached; `reduce_memory` swaps moves for ones that
copy less. Every plan is checked to have a feasible order. All effort limits are counts, not
clocks, so the result is deterministic. A `SearchContext` and its `SearchLimits` are
immutable: a search with other limits or another target runs on a copy (`replace`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Literal, NamedTuple

import numpy as np

from recommender.engine.measure import EPSILON, reaches
from recommender.engine.ordering import Ordering, Request, order_moves
from recommender.engine.problem import Problem, State, UnitMove
from recommender.engine.rules import Constraint, Movers, allowed_targets
from recommender.engine.scorer import Scorer, View


class MoveKey(NamedTuple):
    """How good a single move is: the search guide first, then imbalance, smooth objective."""

    guide: float
    overall: float
    smooth: float


# The order of plans: (0, migrations, memory, imbalance) for plans reaching the target,
# (1, imbalance, migrations, memory) for the others; imbalances rounded to EPSILON.
PlanRank = tuple[int, float, float, float]


@dataclass(frozen=True)
class SearchLimits:
    """How hard the search tries; counts, so the result does not depend on the clock."""

    width: int = 8  # plans kept per beam level
    branch: int = 8  # moves tried per plan and level
    hot_all: int = 32  # with at most this many active nodes every node is a source
    hot_per_resource: int = 4
    max_units: int = 4000
    max_pairs: int = 200_000
    repair_steps: int = 12  # tabu steps per attempt to drop a move
    repair_width: int = 5  # moves considered for replacement per tabu step
    shrink_tries: int = 3  # attempts (different dropped moves) per plan size
    pilot_breadth: int = 0  # moves tried per step by the pilot method (0: no pilot)
    refine: int = 48  # moves per evaluation whose distance is computed exactly
    reconstruct: bool = True  # search again towards the lowest imbalance when out of reach
    memory_rounds: int = 4  # swaps for less memory, per move of the plan
    overshoot: float = 0.0  # also prune back a plan made for target x overshoot (0: no)
    guide: Literal["distance", "overall"] = "distance"  # what ranks moves first

    @classmethod
    def for_size(cls, movable_units: int, active_nodes: int) -> SearchLimits:
        """Wide beams and many exchanges on small clusters, greedy with a bounded number of
        exchanges on the largest."""
        if movable_units <= 120 and active_nodes <= 32:
            return cls(
                width=6, branch=6, pilot_breadth=4, repair_steps=30, shrink_tries=3, overshoot=0.5
            )
        if movable_units <= 3_000:
            return cls(
                width=2, branch=2, repair_steps=4, shrink_tries=1, max_pairs=60_000, memory_rounds=1
            )
        return cls(
            width=1,
            branch=1,
            repair_steps=1,
            shrink_tries=1,
            max_pairs=40_000,
            reconstruct=False,
            memory_rounds=1,
        )


@dataclass(frozen=True)
class Candidate:
    """A partial plan: the state after its moves, and its score."""

    state: State
    moves: tuple[UnitMove, ...]
    view: View
    memory: float

    @property
    def overall(self) -> float:
        return self.view.overall


def plan_rank(plan: Candidate, target: float) -> PlanRank:
    """The one order of plans (lower is better)."""
    overall = round(plan.overall, 9)
    if reaches(plan.overall, target):
        return (0, plan.state.migrations, plan.memory, overall)
    return (1, overall, plan.state.migrations, plan.memory)


@dataclass(frozen=True)
class Moves:
    """Scored single moves."""

    unit: np.ndarray
    target: np.ndarray
    overall: np.ndarray
    smooth: np.ndarray
    distance: np.ndarray
    copy: np.ndarray

    def __len__(self) -> int:
        return len(self.unit)

    @classmethod
    def empty(cls) -> Moves:
        none = np.zeros(0, dtype=np.int64)
        return cls(none, none, np.zeros(0), np.zeros(0), np.zeros(0), np.zeros(0))


@dataclass(frozen=True)
class SearchContext:
    """What a search needs besides the state: the problem, its rules, the scorer, the units
    it may move, the target and its limits."""

    problem: Problem
    constraints: tuple[Constraint, ...]
    scorer: Scorer
    movable: np.ndarray  # (U,) units the search may move
    target: float
    limits: SearchLimits

    def candidate(self, state: State, moves: tuple[UnitMove, ...], memory: float) -> Candidate:
        return Candidate(state, moves, self.scorer.view(state.node_load, self.target), memory)

    def reached(self, plan: Candidate) -> bool:
        return reaches(plan.overall, self.target)

    def rank(self, plan: Candidate) -> PlanRank:
        return plan_rank(plan, self.target)

    def aiming_at(self, target: float) -> SearchContext:
        return replace(self, target=target)

    def rescore(self, plan: Candidate) -> Candidate:
        """The plan scored against this context's target."""
        return self.candidate(plan.state, plan.moves, plan.memory)

    # -- candidate moves ---------------------------------------------------------------------

    def source_units(
        self, state: State, view: View, room: int, moved: Iterable[int] = ()
    ) -> np.ndarray:
        """Movable units on the nodes that matter: every node on small clusters, else the
        hottest few per weighted resource; at most `max_units`, the most relieving first.
        Units in `moved` (already moved by the plan) are left out."""
        scorer, limits = self.scorer, self.limits
        units = self.problem.units
        where = state.unit_node
        ok = self.movable & (where >= 0) & (units.size <= room)
        skip = list(moved)
        if skip:
            ok[skip] = False
        on = np.zeros(self.problem.n_nodes, dtype=bool)
        if len(scorer.active) <= limits.hot_all:
            on[scorer.active] = True
        else:
            k = min(limits.hot_per_resource, len(scorer.active))
            hot = np.argpartition(-view.util, k - 1, axis=0)[:k]
            on[scorer.active[np.unique(hot)]] = True
        ok &= on[np.maximum(where, 0)]
        chosen = np.flatnonzero(ok)
        if len(chosen) > limits.max_units:
            pos = scorer.position[where[chosen]]
            above = view.util[pos] > view.mean[None, :]
            share = units.load[np.ix_(chosen, scorer.resources)] * scorer.inv_capacity[pos]
            relief = (share * above) @ scorer.weights
            keep = np.lexsort((chosen, -relief))[: limits.max_units]
            chosen = np.sort(chosen[keep])
        return chosen

    def moves(self, state: State, view: View, room: int, moved: Iterable[int] = ()) -> Moves:
        """Every allowed single move of the source units, scored."""
        units = self.source_units(state, view, room, moved)
        if len(units) == 0:
            return Moves.empty()
        movers = Movers.of_units(self.problem, state, units)
        mask = allowed_targets(self.constraints, state, movers)
        mask &= self.problem.receivable[None, :]
        if mask.sum() > self.limits.max_pairs:
            mask &= self.target_pool(view, movers, mask)
        rows, targets = np.nonzero(mask)
        overall, smooth, distance = self.scorer.evaluate(
            view, movers.load[rows], movers.source[rows], targets, self.limits.refine
        )
        chosen = units[rows]
        copy = self.problem.units.copy_bytes[chosen]
        return Moves(chosen, targets, overall, smooth, distance, copy)

    def move_key(self, found: Moves, i: int) -> MoveKey:
        """Ranking key of one move (imbalances rounded to EPSILON)."""
        overall = round(float(found.overall[i]), 9)
        if self.limits.guide == "distance":
            return MoveKey(round(float(found.distance[i]), 9), overall, float(found.smooth[i]))
        return MoveKey(overall, overall, float(found.smooth[i]))

    def best_moves(self, found: Moves, top: int | None = None) -> np.ndarray:
        """Indices of the `top` best of `found` (all when None) by `move_key`, best first;
        ties are broken by memory, then unit and target."""
        overall = np.round(found.overall, 9)
        first = np.round(found.distance, 9) if self.limits.guide == "distance" else overall
        keep = np.arange(len(found))
        if top is not None and top < len(found):
            # Everything tied with the top-th primary key, then the full order on those.
            cut = np.partition(first, top - 1)[top - 1]
            keep = np.flatnonzero(first <= cut)
        order = np.lexsort(
            (
                found.target[keep],
                found.unit[keep],
                found.copy[keep],
                found.smooth[keep],
                overall[keep],
                first[keep],
            )
        )
        return keep[order][:top] if top is not None else keep[order]

    def target_pool(self, view: View, movers: Movers, mask: np.ndarray) -> np.ndarray:
        """Keep, per mover, only its coolest allowed targets (by each weighted resource)."""
        per_row = max(4, self.limits.max_pairs // max(1, len(movers)))
        util = np.full((self.problem.n_nodes, len(self.scorer.resources)), np.inf)
        util[self.scorer.active] = view.util
        keep = np.zeros(self.problem.n_nodes, dtype=bool)
        share = max(1, per_row // max(1, util.shape[1]))
        for r in range(util.shape[1]):
            keep[np.argsort(util[:, r], kind="stable")[:share]] = True
        pool = np.repeat(keep[None, :], len(movers), axis=0)
        # A mover allowed nowhere in the pool (pinned elsewhere) keeps all its targets.
        stranded = ~(mask & pool).any(axis=1)
        pool[stranded] = True
        return pool

    # -- plans -------------------------------------------------------------------------------

    def apply(self, parent: Candidate, unit: int, target: int) -> Candidate:
        state = parent.state.copy()
        source = int(state.unit_node[unit])
        state.move_unit(self.problem, unit, target)
        memory = parent.memory + float(self.problem.units.copy_bytes[unit])
        return self.candidate(state, (*parent.moves, UnitMove(unit, source, target)), memory)

    def replay(self, start: State, moves: Iterable[UnitMove]) -> Candidate | None:
        """The plan's end state if its moves have a feasible order (in that order if possible),
        None otherwise."""
        moves = tuple(moves)
        ordering = self._order(start, moves)
        if ordering.stuck:
            return None
        ordered = tuple(moves[s.origin] for s in ordering.steps)
        memory = float(sum(self.problem.units.copy_bytes[m.unit] for m in moves))
        return self.candidate(ordering.state, ordered, memory)

    def replay_dropping(
        self, start: State, moves: tuple[UnitMove, ...]
    ) -> tuple[Candidate, list[UnitMove]]:
        """The plan of the moves that have a feasible order, and the moves that have none."""
        ordering = self._order(start, moves)
        kept = tuple(moves[s.origin] for s in ordering.steps)
        memory = float(sum(self.problem.units.copy_bytes[m.unit] for m in kept))
        plan = self.candidate(ordering.state, kept, memory)
        return plan, [moves[i] for i in ordering.stuck]

    def _order(self, start: State, moves: tuple[UnitMove, ...]) -> Ordering:
        requests = [Request(self.problem.units.members(m.unit), m.target) for m in moves]
        return order_moves(self.problem, self.constraints, start, requests)


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
    found = ctx.moves(base.state, base.view, room, [m.unit for m in rest])
    cheaper = found.copy < copies[old.unit] * (1 - 1e-9)
    better = np.flatnonzero((found.overall <= goal + EPSILON) & cheaper)
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
        trials = []
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
