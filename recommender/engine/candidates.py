"""What a search works with: plans under construction (`Candidate`), the single moves that
extend them (`Moves`), the one order of plans (`plan_rank`), and the `SearchContext` a search
runs in — the problem, its rules, the scorer, the units it may move, the target and the
effort (`SearchLimits`).

Moves are ranked first by the search guide — the *distance to the target region* (zero
exactly when the plan is under the target), which crosses the plateaus of the max-based
measure, or the overall imbalance — then by the overall imbalance, then by a smooth
objective (the weighted sum of squared utilisation above the cluster mean), then by memory.
Plans are ranked one way everywhere: those reaching the target first, by fewest migrations,
least memory, lowest imbalance; the others by lowest imbalance, then migrations and memory.
A context and its limits are immutable: a search with other limits or another target runs
on a copy (`dataclasses.replace`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Literal, NamedTuple

import numpy as np

from recommender.engine.measure import reaches
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
    # Passes improving the searched frontier's points (`recommender.engine.exchange`), and
    # whether its bound may solve the program with whole pieces (`recommender.engine.bound`).
    frontier_passes: int = 3
    whole_piece_bound: bool = True

    def before_exact(self) -> SearchLimits:
        """Where the exact program follows, the search only seeds it (a warm start) and the
        program finds what the long exchanges would: fewer of them."""
        return replace(
            self,
            pilot_breadth=min(self.pilot_breadth, 2),
            repair_steps=min(self.repair_steps, 6),
            shrink_tries=min(self.shrink_tries, 2),
        )

    @classmethod
    def for_size(cls, movable_units: int, active_nodes: int) -> SearchLimits:
        """Wide beams and many exchanges on small clusters, greedy with a bounded number of
        exchanges on the largest; there the frontier's points are as the search found them
        (an exchange scores every move of thousands of VMs again, per move of the point) and
        their bound the linear program's (the root of the program with whole pieces took
        4.7 s of a 10,000-VM plan's 5.4 s, bench/bench_engine_speed.py)."""
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
            frontier_passes=0,
            whole_piece_bound=False,
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

    def moves(
        self,
        state: State,
        view: View,
        room: int,
        moved: Iterable[int] = (),
        only: np.ndarray | None = None,
    ) -> Moves:
        """Every allowed single move of the source units, scored. With `only` (U,) bool, just
        the moves of those units, chosen as without it (their distances are refined among
        themselves, so only their imbalance and smooth objective are the same numbers)."""
        units = self.source_units(state, view, room, moved)
        if len(units) == 0:
            return Moves.empty()
        movers = Movers.of_units(self.problem, state, units)
        mask = allowed_targets(self.constraints, state, movers)
        mask &= self.problem.receivable[None, :]
        if mask.sum() > self.limits.max_pairs:
            mask &= self.target_pool(view, movers, mask)
        if only is not None:
            mask &= only[units][:, None]
        rows, targets = np.nonzero(mask)
        overall, smooth, distance = self.scorer.evaluate(
            view, movers.load, movers.source, targets, self.limits.refine, rows=rows
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
