"""Local search over single moves, evaluated with numpy.

`Scorer` computes the imbalance of `recommender.measure` (same definition, restricted to the
resources with a weight) for a node-load matrix, and for many candidate moves at once: a move
changes only its source and its target, so the new maximum per resource is the largest of the
two changed utilisations and the best of the three top nodes that are neither.

The max-based measure has plateaus (two nodes at the top: moving off one changes nothing), so
moves are ranked first by the *distance to the target region* (`excess_distance`: the total
utilisation above U[r] + z[r] over all nodes, for the best split z of the allowed imbalance;
zero exactly when the plan is under the target), then by the overall imbalance, then by a
smooth objective — the weighted sum of squared utilisation above the cluster mean — then by
memory copied.

`find_plan` builds plans with `beam_search` (extend the best few partial plans by their best
moves) and, on small clusters, `pilot` (try the best few moves, complete each greedily, keep
the move whose completion is best), and from a plan made for a stricter target; `prune`
drops moves the plan does not need; `shrink` drops one move and repairs the rest by tabu
search (`repair`) while the target stays reached; `reduce_memory` swaps moves for ones that
copy less. Every plan is checked to have a feasible order. All effort limits are counts, not
clocks, so the result is deterministic.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from recommender.hysteresis import EPSILON
from recommender.ordering import order_moves
from recommender.problem import Problem, State
from recommender.rules import Constraint, Movers, allowed_targets

# Largest (pairs x resources) block evaluated at once.
BLOCK = 1_500_000


@dataclass(frozen=True)
class View:
    """Utilisation of the active nodes and the measure, for one node-load matrix."""

    util: np.ndarray  # (Na, Rw)
    mean: np.ndarray  # (Rw,)
    per_resource: np.ndarray  # (Rw,)
    overall: float
    smooth: float
    top_value: np.ndarray  # (3, Rw)
    top_index: np.ndarray  # (3, Rw) active positions, -9 for padding
    distance: float  # excess above the target line, minimised over allocations (0: reached)
    levels: np.ndarray  # (Rw,) the allocation z achieving it


def excess_distance(
    util: np.ndarray, mean: np.ndarray, weights: np.ndarray, budget: float
) -> tuple[np.ndarray, np.ndarray]:
    """min over z >= 0 with sum(w z) <= budget of sum_r w_r sum_n (u[n,r] - U[r] - z[r])+.

    `util` is (..., Na, Rw), `mean` (..., Rw). Zero exactly when the overall imbalance is at
    most budget / sum(w). Each resource's excess is convex and piecewise linear in z[r], with
    slope -(nodes above z[r]); spending the budget where most nodes are above the line
    (water-filling) is optimal. Returns (distance (...), levels z (..., Rw))."""
    excess = np.maximum(util - mean[..., None, :], 0.0)
    ordered = -np.sort(-excess, axis=-2)  # descending per resource
    n = ordered.shape[-2]
    if n == 0:  # no active node: nothing is above any line
        return np.zeros(util.shape[:-2]), np.zeros(mean.shape)
    below = np.concatenate([ordered[..., 1:, :], np.zeros_like(ordered[..., :1, :])], axis=-2)
    length = ordered - below  # segment k: count k+1 nodes above the line
    counts = np.arange(1, n + 1, dtype=float)[:, None]
    cost = length * weights
    total = (ordered * weights).sum(axis=(-2, -1))
    # Largest counts first: segment index descending; ties across resources are equivalent.
    cost_f = cost[..., ::-1, :].reshape(*cost.shape[:-2], -1)
    count_f = np.broadcast_to(counts[::-1], cost.shape[-2:]).reshape(-1)
    spent_before = np.cumsum(cost_f, axis=-1) - cost_f
    with np.errstate(divide="ignore", invalid="ignore"):
        take = np.clip((budget - spent_before) / cost_f, 0.0, 1.0)
    take = np.where(cost_f > 0, take, 0.0)
    distance = total - (cost_f * take * count_f).sum(axis=-1)
    lengths_f = length[..., ::-1, :].reshape(cost_f.shape)
    levels = (lengths_f * take).reshape(*cost.shape[:-2], n, -1).sum(axis=-2)
    return np.maximum(distance, 0.0), levels


class Scorer:
    # Up to this many active nodes, each candidate's distance is computed exactly; above it,
    # at the allocation of the state the move starts from (an upper bound).
    EXACT_DISTANCE_NODES = 48

    def __init__(self, problem: Problem) -> None:
        self.problem = problem
        self.active = np.flatnonzero(problem.active)
        self.resources = np.flatnonzero(problem.weights > 0)
        self.weights = problem.weights[self.resources]
        self.weight_sum = float(problem.weights.sum())
        capacity = problem.capacity[np.ix_(self.active, self.resources)]
        self.inv_capacity = 1.0 / np.where(capacity > 0, capacity, np.inf)
        self.capacity_total = np.maximum(capacity.sum(axis=0), 1e-300)
        self.position = np.full(problem.n_nodes, -1, dtype=np.int64)
        self.position[self.active] = np.arange(len(self.active))
        self.budget = problem.balance.target * self.weight_sum

    def view(self, node_load: np.ndarray) -> View:
        load = node_load[np.ix_(self.active, self.resources)]
        util = load * self.inv_capacity
        mean = load.sum(axis=0) / self.capacity_total
        n = len(self.active)
        rw = len(self.resources)
        top_value = np.full((3, rw), -np.inf)
        top_index = np.full((3, rw), -9, dtype=np.int64)
        if n:
            k = min(3, n)
            part = np.argpartition(-util, k - 1, axis=0)[:k] if n > k else np.argsort(-util, 0)
            values = np.take_along_axis(util, part, axis=0)
            order = np.lexsort((part, -values), axis=0)
            top_index[:k] = np.take_along_axis(part, order, axis=0)
            top_value[:k] = np.take_along_axis(values, order, axis=0)
        per_resource = np.maximum(top_value[0] - mean, 0.0) if n else np.zeros(rw)
        overall = float(per_resource @ self.weights / self.weight_sum)
        excess = np.maximum(util - mean, 0.0)
        smooth = float((excess * excess).sum(axis=0) @ self.weights / self.weight_sum)
        distance, levels = excess_distance(util, mean, self.weights, self.budget)
        return View(
            util,
            mean,
            per_resource,
            overall,
            smooth,
            top_value,
            top_index,
            float(distance) / self.weight_sum,
            levels,
        )

    def evaluate(
        self,
        view: View,
        load: np.ndarray,
        source: np.ndarray,
        target: np.ndarray,
        refine: int | None = None,
        overall_only: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(overall, smooth, distance) after each single move: `load` (P, R) from `source` to
        `target`. Sources may be inactive (maintenance): their VMs then join the cluster
        mean. Targets must be active nodes.

        The distance is first taken at the allocation of the current state (an upper bound),
        then, on clusters of up to EXACT_DISTANCE_NODES active nodes, recomputed exactly for
        the `refine` most promising moves (all when None)."""
        out = np.empty((3, len(target)))
        step = max(1, BLOCK // max(1, len(self.resources)))
        for lo in range(0, len(target), step):
            hi = min(len(target), lo + step)
            out[:, lo:hi] = self._evaluate(view, load[lo:hi], source[lo:hi], target[lo:hi], False)
        if len(self.active) <= self.EXACT_DISTANCE_NODES and len(target):
            pick = np.arange(len(target))
            if refine is not None and refine < len(target):
                pick = np.lexsort((np.round(out[0], 9), np.round(out[2], 9)))[:refine]
            step = max(1, BLOCK // (len(self.resources) * max(1, len(self.active))))
            for lo in range(0, len(pick), step):
                part = pick[lo : lo + step]
                out[2, part] = self._evaluate(view, load[part], source[part], target[part], True)[2]
        return out[0], out[1], out[2]

    def _evaluate(
        self,
        view: View,
        load: np.ndarray,
        source: np.ndarray,
        target: np.ndarray,
        exact: bool,
        overall_only: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        w = self.weights
        moved = load[:, self.resources]
        ps = np.where(source >= 0, self.position[np.maximum(source, 0)], -1)
        pt = self.position[target]
        src_active = ps >= 0
        shifted = ~src_active
        mean = view.mean[None, :] + np.where(src_active[:, None], 0.0, moved / self.capacity_total)
        ut_old = view.util[pt]
        ut_new = ut_old + moved * self.inv_capacity[pt]
        psa = np.maximum(ps, 0)
        us_old = view.util[psa]
        us_new = np.where(src_active[:, None], us_old - moved * self.inv_capacity[psa], -np.inf)
        i1, i2 = view.top_index[0][None, :], view.top_index[1][None, :]
        v1, v2, v3 = view.top_value[0], view.top_value[1], view.top_value[2]
        ps_, pt_ = ps[:, None], pt[:, None]
        rest = np.where((i1 != ps_) & (i1 != pt_), v1, np.where((i2 != ps_) & (i2 != pt_), v2, v3))
        top = np.maximum(np.maximum(rest, ut_new), us_new)
        overall = np.maximum(top - mean, 0.0) @ w
        if overall_only:
            nothing = np.zeros(len(target))
            return overall / self.weight_sum, nothing, nothing

        def above(x: np.ndarray, line: np.ndarray, power: int) -> np.ndarray:
            e = np.maximum(x - line, 0.0)
            return (e * e if power == 2 else e) @ w

        us_safe = np.where(src_active[:, None], us_new, 0.0)
        # Smooth: squared excess over the mean; only the two changed nodes differ, unless the
        # mean moved (VMs joining from an inactive node).
        smooth = np.full(len(target), view.smooth * self.weight_sum)
        if shifted.any():
            rows = np.flatnonzero(shifted)
            excess = np.maximum(view.util[None, :, :] - mean[rows][:, None, :], 0.0)
            smooth[rows] = (excess * excess).sum(axis=1) @ w
        smooth += above(ut_new, mean, 2) - above(ut_old, mean, 2)
        smooth += np.where(src_active, above(us_safe, mean, 2) - above(us_old, mean, 2), 0.0)

        if exact:
            util = np.repeat(view.util[None, :, :], len(target), axis=0)
            util[np.arange(len(target)), pt] = ut_new
            rows = np.flatnonzero(src_active)
            util[rows, ps[rows]] = us_new[rows]
            distance, _ = excess_distance(util, mean, w, self.budget)
        else:
            line = mean + view.levels[None, :]
            distance = np.full(len(target), view.distance * self.weight_sum)
            if shifted.any():
                rows = np.flatnonzero(shifted)
                excess = np.maximum(view.util[None, :, :] - line[rows][:, None, :], 0.0)
                distance[rows] = excess.sum(axis=1) @ w
            distance += above(ut_new, line, 1) - above(ut_old, line, 1)
            distance += np.where(src_active, above(us_safe, line, 1) - above(us_old, line, 1), 0)
        scale = 1.0 / self.weight_sum
        return overall * scale, smooth * scale, distance * scale


@dataclass(frozen=True)
class UnitMove:
    unit: int
    source: int
    target: int


@dataclass
class Candidate:
    """A partial plan: the state after its moves, and its score."""

    state: State
    moves: tuple[UnitMove, ...]
    view: View
    memory: float

    @property
    def overall(self) -> float:
        return self.view.overall

    def key(self) -> tuple[float, float, float]:
        return (round(self.overall, 9), self.state.migrations, self.memory)


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


@dataclass
class SearchContext:
    """What a search needs besides the state: the problem, its rules, the scorer, knobs."""

    problem: Problem
    constraints: list[Constraint]
    scorer: Scorer
    movable: np.ndarray  # (U,) units balancing may move
    target: float
    width: int = 8
    branch: int = 8
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
    guide: str = "distance"  # rank moves by distance to the target region, or by "overall"
    tabu: set[int] = field(default_factory=set)
    evaluations: int = 0

    def candidate(self, state: State, moves: tuple[UnitMove, ...], memory: float) -> Candidate:
        return Candidate(state, moves, self.scorer.view(state.node_load), memory)

    # -- candidate moves ---------------------------------------------------------------------

    def source_units(
        self, state: State, view: View, room: int, moved: Iterable[int] = ()
    ) -> np.ndarray:
        """Movable units on the nodes that matter: every node on small clusters, else the
        hottest few per weighted resource; at most `max_units`, the most relieving first.
        Units in `moved` (already moved by the plan) and tabu units are left out."""
        scorer = self.scorer
        units = self.problem.units
        where = state.unit_node
        ok = self.movable & (where >= 0) & (units.size <= room)
        skip = [*self.tabu, *moved]
        if skip:
            ok[skip] = False
        on = np.zeros(self.problem.n_nodes, dtype=bool)
        if len(scorer.active) <= self.hot_all:
            on[scorer.active] = True
        else:
            k = min(self.hot_per_resource, len(scorer.active))
            hot = np.argpartition(-view.util, k - 1, axis=0)[:k]
            on[scorer.active[np.unique(hot)]] = True
        ok &= on[np.maximum(where, 0)]
        chosen = np.flatnonzero(ok)
        if len(chosen) > self.max_units:
            pos = scorer.position[where[chosen]]
            above = view.util[pos] > view.mean[None, :]
            share = units.load[np.ix_(chosen, scorer.resources)] * scorer.inv_capacity[pos]
            relief = (share * above) @ scorer.weights
            keep = np.lexsort((chosen, -relief))[: self.max_units]
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
        if mask.sum() > self.max_pairs:
            mask &= self.target_pool(view, movers, mask)
        rows, targets = np.nonzero(mask)
        overall, smooth, distance = self.scorer.evaluate(
            view, movers.load[rows], movers.source[rows], targets, self.refine
        )
        self.evaluations += len(rows)
        chosen = units[rows]
        copy = self.problem.units.copy_bytes[chosen]
        return Moves(chosen, targets, overall, smooth, distance, copy)

    def sort_key(self, found: Moves, i: int) -> tuple[float, ...]:
        """Ranking key of one move: the guide first, then imbalance, smooth objective."""
        overall = round(float(found.overall[i]), 9)
        if self.guide == "distance":
            return (round(float(found.distance[i]), 9), overall, float(found.smooth[i]))
        return (overall, overall, float(found.smooth[i]))

    def rank(self, found: Moves, top: int | None = None) -> np.ndarray:
        """Indices of the `top` best of `found` (all when None), best first; ties are broken
        by memory, then unit and target."""
        overall = np.round(found.overall, 9)
        first = np.round(found.distance, 9) if self.guide == "distance" else overall
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
        per_row = max(4, self.max_pairs // max(1, len(movers)))
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
        pairs = [(self.problem.units.members(m.unit), m.target) for m in moves]
        ordering = order_moves(self.problem, self.constraints, start, pairs)
        if ordering.stuck:
            return None
        ordered = tuple(moves[s.origin] for s in ordering.steps)
        memory = float(sum(self.problem.units.copy_bytes[m.unit] for m in moves))
        return self.candidate(ordering.state, ordered, memory)

    def reached(self, candidate: Candidate) -> bool:
        return candidate.overall <= self.target + EPSILON

    def retarget(self, target: float) -> None:
        """Aim at another target (views computed before keep the old distance)."""
        self.target = target
        self.scorer.budget = target * self.scorer.weight_sum

    def rescore(self, plan: Candidate) -> Candidate:
        return self.candidate(plan.state, plan.moves, plan.memory)


def beam_search(ctx: SearchContext, start: Candidate, budget: int) -> Candidate:
    """Best plan extending `start` by at most `budget` migrations.

    Each level extends every kept plan by its `branch` best moves and keeps the `width` best
    plans (by the search guide, then overall imbalance, smooth objective and memory). Moves
    need not improve, so a plateau can be crossed. Returns the first plan reaching the target
    with the fewest migrations and least memory, else the best plan seen."""
    base_migrations = start.state.migrations
    level = [start]
    best = start
    for _ in range(budget):
        children: dict[frozenset[tuple[int, int]], tuple] = {}
        for parent in level:
            room = budget - (parent.state.migrations - base_migrations)
            moved = [m.unit for m in parent.moves]
            found = ctx.moves(parent.state, parent.view, room, moved)
            if len(found) == 0:
                continue
            taken = {(m.unit, m.target) for m in parent.moves}
            for i in ctx.rank(found, ctx.branch):
                unit, target = int(found.unit[i]), int(found.target[i])
                key = frozenset(taken | {(unit, target)})
                if key in children:
                    continue
                children[key] = (
                    *ctx.sort_key(found, i),
                    parent.memory + float(found.copy[i]),
                    tuple(sorted(key)),
                    parent,
                    unit,
                    target,
                )
        if not children:
            break
        ranked = sorted(children.values(), key=lambda c: c[:-3])
        reached = [c for c in ranked if c[1] <= ctx.target + EPSILON]
        if reached:
            done = [ctx.apply(c[-3], c[-2], c[-1]) for c in reached]
            return min(done, key=lambda c: (c.state.migrations, c.memory, c.overall))
        level = [ctx.apply(c[-3], c[-2], c[-1]) for c in ranked[: ctx.width]]
        leader = min(level, key=Candidate.key)
        if leader.key() < best.key():
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
            if trial is not None and trial.overall <= goal + EPSILON:
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
    while improved and rounds < ctx.memory_rounds * max(1, len(plan.moves)):
        improved = False
        rounds += 1
        order = sorted(range(len(plan.moves)), key=lambda i: (-copies[plan.moves[i].unit], i))
        for i in order:
            old = plan.moves[i]
            rest = plan.moves[:i] + plan.moves[i + 1 :]
            base = ctx.replay(start, rest)
            if base is None:
                continue
            room = int(ctx.problem.units.size[old.unit])
            found = ctx.moves(base.state, base.view, room, [m.unit for m in rest])
            cheaper = found.copy < copies[old.unit] * (1 - 1e-9)
            better = (found.overall <= goal + EPSILON) & cheaper
            if not better.any():
                continue
            pick = np.flatnonzero(better)
            pick = pick[
                np.lexsort(
                    (
                        found.target[pick],
                        found.unit[pick],
                        found.smooth[pick],
                        np.round(found.overall[pick], 9),
                        found.copy[pick],
                    )
                )[0]
            ]
            unit = int(found.unit[pick])
            move = UnitMove(unit, int(start.unit_node[unit]), int(found.target[pick]))
            trial = ctx.replay(start, (*rest, move))
            if trial is not None and trial.overall <= goal + EPSILON:
                plan, improved = trial, True
                break
    return plan


def _without(ctx: SearchContext, plan: Candidate, index: int) -> Candidate:
    """The plan minus one move, by taking it back on the end state (order not checked)."""
    move = plan.moves[index]
    state = plan.state.copy()
    state.move_unit(ctx.problem, move.unit, move.source, undo=True)
    memory = plan.memory - float(ctx.problem.units.copy_bytes[move.unit])
    return ctx.candidate(state, plan.moves[:index] + plan.moves[index + 1 :], memory)


def _distance_key(candidate: Candidate) -> tuple[float, float, float]:
    return (round(candidate.view.distance, 9), round(candidate.overall, 9), candidate.memory)


def repair(ctx: SearchContext, start: State, plan: Candidate, steps: int) -> Candidate:
    """Tabu search at a fixed number of moves, minimising the distance to the target region.

    Each step replaces one move (of the `repair_width` whose removal hurts least) by the
    single move that leaves the smallest distance (even if it is larger than now); a VM
    taken out of the plan may not come back, and a VM just put
    in may not be taken out, for `tenure` steps. Stops when the target is reached; returns
    the best plan seen."""
    tenure = max(2, len(plan.moves) // 2 + 1)
    removed: dict[int, int] = {}  # unit -> step until which it may not come back
    added: dict[int, int] = {}  # unit -> step until which it stays
    best = plan
    for step in range(steps):
        if ctx.reached(plan):
            return plan
        choice: tuple | None = None
        # Take out only the moves whose removal hurts least (the plan without them is
        # nearest the target region): the others are unlikely to be worth replacing.
        bases = [
            (_distance_key(base), i, base)
            for i, base in ((i, _without(ctx, plan, i)) for i in range(len(plan.moves)))
            if added.get(plan.moves[i].unit, -1) < step
        ]
        for _, i, base in sorted(bases, key=lambda b: b[:2])[: ctx.repair_width]:
            old = plan.moves[i]
            room = int(ctx.problem.units.size[old.unit])
            found = ctx.moves(base.state, base.view, room, [m.unit for m in base.moves])
            if len(found) == 0:
                continue
            waiting = [u for u, until in removed.items() if until >= step]
            banned = np.isin(found.unit, waiting)
            banned |= (found.unit == old.unit) & (found.target == old.target)
            # A banned move is still taken if it reaches the target (aspiration).
            banned &= found.distance > EPSILON
            order = [j for j in ctx.rank(found, 4 + int(banned.sum())) if not banned[j]]
            if not order:
                continue
            j = order[0]
            key = (*ctx.sort_key(found, j), float(found.copy[j]), i)
            if choice is None or key < choice[0]:
                choice = (key, base, old, int(found.unit[j]), int(found.target[j]))
        if choice is None:
            break
        _, base, old, unit, target = choice
        removed[old.unit] = step + tenure
        added[unit] = step + tenure
        plan = ctx.apply(base, unit, target)
        if _distance_key(plan) < _distance_key(best):
            best = plan
    return plan if ctx.reached(plan) else best


def shrink(ctx: SearchContext, start: State, plan: Candidate) -> Candidate:
    """Fewer moves: drop the move whose loss hurts least, repair the rest by local search;
    keep the smaller plan when it reaches the target and has a feasible order."""
    if not ctx.reached(plan):
        return plan
    while len(plan.moves) > 0:
        drops = sorted((_without(ctx, plan, i) for i in range(len(plan.moves))), key=_distance_key)
        improved = False
        for trial in drops[: ctx.shrink_tries]:
            trial = repair(ctx, start, trial, ctx.repair_steps)
            if not ctx.reached(trial):
                continue
            ordered = ctx.replay(start, trial.moves)
            if ordered is not None and ctx.reached(ordered):
                plan, improved = ordered, True
                break
        if not improved:
            break
    return plan


def pilot(
    ctx: SearchContext, start: Candidate, budget: int, breadth: int, best: Candidate
) -> Candidate:
    """Pilot method: at each step try the `breadth` best moves, complete each greedily (never
    longer than the best plan known, `best` to begin with), and commit to the move whose
    completion is best. Returns the best complete plan seen."""
    width, branch = ctx.width, ctx.branch
    ctx.width, ctx.branch = 1, 1
    base = start.state.migrations
    try:
        plan = start
        while not ctx.reached(plan):
            room = budget - (plan.state.migrations - base)
            if ctx.reached(best):
                room = min(room, best.state.migrations - plan.state.migrations - 1)
            if room <= 0:
                break
            found = ctx.moves(plan.state, plan.view, room, [m.unit for m in plan.moves])
            if len(found) == 0:
                break
            trials = []
            for j in ctx.rank(found, breadth):
                child = ctx.apply(plan, int(found.unit[j]), int(found.target[j]))
                left = room - (child.state.migrations - plan.state.migrations)
                done = beam_search(ctx, child, left) if left > 0 else child
                trials.append((_plan_key(ctx, done), len(trials), child, done))
            trials.sort(key=lambda t: t[:2])
            key, _, child, done = trials[0]
            if key < _plan_key(ctx, best):
                best = done
            plan = child
        return best
    finally:
        ctx.width, ctx.branch = width, branch


def _plan_key(ctx: SearchContext, plan: Candidate) -> tuple:
    if ctx.reached(plan):
        return (0, plan.state.migrations, plan.memory, 0.0)
    return (1, round(plan.overall, 9), plan.state.migrations, plan.memory)


def construct(ctx: SearchContext, start: State, budget: int) -> list[Candidate]:
    """Pruned plans from the beam search and, when enabled, the pilot method."""
    base = ctx.candidate(start, (), 0.0)
    plans = [prune(ctx, start, beam_search(ctx, base, budget))]
    if ctx.pilot_breadth > 0:
        found = pilot(ctx, base, budget, ctx.pilot_breadth, plans[0])
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
    target = ctx.target
    try:
        if ctx.overshoot and any(ctx.reached(p) for p in plans):
            # From the other side: a plan well under the target, pruned back up to it.
            ctx.retarget(target * ctx.overshoot)
            deeper = beam_search(ctx, ctx.candidate(start, (), 0.0), budget)
            ctx.retarget(target)
            plans.append(prune(ctx, start, ctx.rescore(deeper)))
        if not any(ctx.reached(p) for p in plans):
            lowest = min(p.overall for p in plans)
            if lowest >= base.overall - EPSILON:
                return base
            ctx.retarget(lowest + EPSILON)
            plans = [ctx.rescore(p) for p in plans]
            if ctx.reconstruct:
                plans += construct(ctx, start, budget)
        plans = [shrink(ctx, start, p) for p in plans]
        best = min(plans, key=lambda p: _plan_key(ctx, p))
        best = reduce_memory(ctx, start, best)
    finally:
        if ctx.target != target:
            ctx.retarget(target)
    return ctx.rescore(best)
