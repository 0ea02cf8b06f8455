"""The balance engine: the few live migrations that bring the imbalance under the target.

`plan_moves(snapshot, config)` starts from the current placement and works in two phases:

1. Forced moves, whatever the imbalance (`recommender.engine.forced`): what the rules make
   move — a node being evacuated, a VM outside its pin, group members sharing a node, a
   split group. One that cannot go anywhere is reported as unplaceable, with the rules that
   stopped it.
2. Balancing, when the overall imbalance (`recommender.engine.measure`) is above `trigger`:
   the fewest migrations reaching `target`, then the least memory copied
   (`recommender.engine.search`: beam search and pilot method over single moves ranked by
   the distance to the target region, tabu search to drop moves, pruning, swaps for less
   memory). On small clusters an exact program (`recommender.engine.exact`, when HiGHS is
   installed) is asked for the target from that plan (or, where nothing reaches it, for the
   lowest imbalance) and the better plan is kept. Hysteresis then drops every move whose
   gain does not pay for the memory it copies (`recommender.engine.held_back`).
3. Where phase 1 repaired a broken rule and the exact program may run, the repairs and the
   balancing are planned again together (`recommender.engine.joint`): the repair chosen
   among all repairs for the best final balance; that plan is kept when it is better.

Everything is a pure function of the snapshot and the config: same inputs, same plan.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from recommender.engine import hysteresis
from recommender.engine.build import build_problem
from recommender.engine.candidates import (
    Candidate,
    PlanRank,
    SearchContext,
    SearchLimits,
    plan_rank,
)
from recommender.engine.exact import Hint, LinearModel, solve_exact
from recommender.engine.exact import available as exact_available
from recommender.engine.forced import Forced, Frozen, forced_moves, frozen_vms
from recommender.engine.frontier import exact_frontier, frontier_size, search_frontier
from recommender.engine.held_back import (
    apply_gain_threshold,
    blocked_moves,
    leave_one_out_gains,
    merge_held_back,
)
from recommender.engine.joint import (
    JointSplit,
    Repairs,
    joint_model,
    joint_units,
    solve_levels,
    split_plan,
)
from recommender.engine.measure import EPSILON, reaches
from recommender.engine.migration_cost import move_cost
from recommender.engine.problem import SPLIT, Problem, State, UnitMove
from recommender.engine.result import EngineResult, Frontier, HeldBack, Method, Move, MoveKind
from recommender.engine.rules import Constraint, prepare_constraints, violations
from recommender.engine.scorer import Scorer, View
from recommender.engine.search import find_plan
from recommender.model import Snapshot

if TYPE_CHECKING:
    from recommender.config import Config

# Largest cluster (active nodes) the exact program is asked about.
EXACT_MAX_NODES = 64


def balance_movable(problem: Problem, constraints: Sequence[Constraint]) -> np.ndarray:
    """(U,) units balancing may move: no member frozen by a rule or held by hysteresis."""
    frozen = frozen_vms(constraints, problem.n_vms)
    return ~problem.unit_flags(frozen.vms | problem.cooldown | problem.bursting)


def plan_moves(snapshot: Snapshot, config: Config, *, exact: bool | None = None) -> EngineResult:
    """The engine's plan for one snapshot. `exact` overrides `balance.exact` (True: use the
    exact solver when it is installed and the cluster is small enough; False: never)."""
    problem = build_problem(snapshot, config)
    constraints = prepare_constraints(problem)
    settings = problem.balance
    warnings = list(problem.warnings)
    for constraint in constraints:
        warnings.extend(constraint.warnings)
    scorer = Scorer(problem)
    start = State.initial(problem)
    before = problem.imbalance(start.node_load)

    frozen = frozen_vms(constraints, problem.n_vms)
    held_units = problem.unit_flags(problem.cooldown | problem.bursting)
    movable = balance_movable(problem, constraints)

    state = start.copy()
    forced = forced_moves(problem, constraints, scorer, state, frozen)
    warnings.extend(forced.warnings)
    after_forced = scorer.view(state.node_load, settings.target)
    triggered = hysteresis.should_plan(before.overall, settings) or hysteresis.should_plan(
        after_forced.overall, settings
    )

    # A unit moved by force is not moved again to balance (that would copy it twice).
    balanceable = movable.copy()
    balanceable[[m.move.unit for m in forced.moves]] = False
    budget = _migration_budget(problem, constraints)
    wanted = settings.exact == "auto" if exact is None else exact
    small = int(movable.sum()) <= settings.exact_max_vms and len(scorer.active) <= EXACT_MAX_NODES
    use_exact = wanted and small and exact_available() and len(scorer.active) > 0
    limits = SearchLimits.for_size(int(movable.sum()), len(scorer.active))
    if use_exact:
        limits = limits.before_exact()
    ctx = SearchContext(problem, constraints, scorer, balanceable, settings.target, limits)
    plan = ctx.candidate(state, (), 0.0)
    held: list[HeldBack] = []
    method: Method = "heuristic" if forced.moves else "none"
    if triggered and not ctx.reached(plan) and len(scorer.active):
        # Where the exact frontier follows, its knee answers a target out of reach.
        frontier_follows = not forced.unplaceable
        plan, method = _balance(ctx, state, budget - state.migrations, use_exact, frontier_follows)
        plan, held = apply_gain_threshold(ctx, state, plan, budget - state.migrations)
    chosen = _Chosen(forced, state, plan, held, method)
    # Also where a forced unit has no place: the program may repair the rule by moving
    # another member (the repair first takes the one it keeps as cheapest to leave).
    if use_exact and (forced.moves or forced.unplaceable):
        together = _joint(ctx, start, frozen, forced, plan, triggered, budget, movable)
        if together is not None:
            chosen = _Chosen(*together, "exact")
    frontier = None
    if triggered and len(scorer.active):
        frontier, chosen = _trade_off(ctx, start, frozen, chosen, movable, budget, use_exact)
    ctx = replace(ctx, movable=_without(movable, chosen.forced))
    plan = chosen.plan
    if triggered and not ctx.reached(plan) and len(scorer.active):
        chosen.held.extend(blocked_moves(ctx, plan, held_units))

    after_forced = scorer.view(chosen.state.node_load, settings.target)
    moves = _expand(ctx, start, chosen.forced, plan, after_forced)
    after = problem.imbalance(plan.state.node_load)
    return EngineResult(
        moves=moves,
        unplaceable=chosen.forced.unplaceable,
        held_back=merge_held_back(chosen.held),
        imbalance_before=before.per_resource,
        imbalance_after=after.per_resource,
        overall_before=before.overall,
        overall_after=after.overall,
        triggered=triggered,
        target_reached=reaches(after.overall, settings.target),
        warnings=warnings,
        method=chosen.method,
        problem=problem,
        unit_moves=tuple(m.move for m in chosen.forced.moves) + plan.moves,
        frontier=frontier,
    )


@dataclass
class _Chosen:
    """The plan so far: forced (or repair) moves, the state after them, the balancing plan
    from there, the moves held back, and how the balancing was found."""

    forced: Forced
    state: State
    plan: Candidate
    held: list[HeldBack]
    method: Method


def _trade_off(
    ctx: SearchContext,
    start: State,
    frozen: Frozen,
    chosen: _Chosen,
    movable: np.ndarray,
    budget: int,
    use_exact: bool,
) -> tuple[Frontier, _Chosen]:
    """The frontier, and the plan taken from it: where the plan reaches its target, the
    frontier's fewest migrations that reach it where they are fewer; where the plan misses
    it, those where the gain threshold held back none of the plan's moves (the plan's own
    program may stop at its node limit before it finds them), else the plan at its knee;
    past the exact program's limit, the searched frontier's knee or point where that
    balances better than the search's plan (`_searched_knee`)."""
    problem = ctx.problem
    size = frontier_size(budget)
    forced = chosen.forced
    start_overall = None if forced.moves else problem.imbalance(start.node_load).overall
    if not (use_exact and not forced.unplaceable):
        base = ctx.candidate(chosen.state, (), 0.0)
        search = replace(ctx, movable=_without(movable, forced))
        frontier = search_frontier(search, base, size, chosen.plan, start_overall)
        return frontier, _searched_knee(search, frontier, chosen)
    units = joint_units(problem, start, movable | _forced_units(forced, len(movable)), forced)
    model = joint_model(problem, ctx.constraints, start, units, frozen)
    frontier = exact_frontier(model, ctx, start, size, start_overall)
    repairs = Repairs.at_start(ctx.constraints, start)
    reaching = (p for p in frontier.points if reaches(p.imbalance, ctx.target) and p.moves)
    target = next(reaching, None)
    if ctx.reached(chosen.plan):
        # The plan's own program may stop at its node limit above the fewest migrations
        # that reach the target, where the frontier's program for that k proves them.
        if target is not None and target.migrations < chosen.plan.state.migrations:
            fewer = _replayed(ctx, start, movable, repairs, target.moves)
            if fewer is not None and ctx.reached(fewer.plan):
                return frontier, fewer
        return frontier, chosen
    # Only where no move was held back for its gain: `min_gain` may stop a plan short.
    if target is not None and not chosen.held:
        reached = _replayed(ctx, start, movable, repairs, target.moves) or _executable(
            ctx, model, start, movable, repairs, ctx.target, None
        )
        if reached is not None:
            return frontier, reached
    point = frontier.at(frontier.knee)
    if point is None:
        return frontier, chosen
    knee = _replayed(ctx, start, movable, repairs, point.moves)
    if knee is not None:
        return frontier, knee
    level = chosen.plan.overall + EPSILON
    fewer = _executable(ctx, model, start, movable, repairs, level, chosen.plan.state.migrations)
    return frontier, fewer or chosen


def _searched_knee(search: SearchContext, frontier: Frontier, chosen: _Chosen) -> _Chosen:
    """Where the plan misses its target and the searched frontier balances better: its knee
    where that is lower in imbalance than the plan (a knee further than the plan is where
    more migrations still pay for their copy), else its point at the plan's migrations where
    that is lower; each only in an order that keeps every rule on the way. The plan stays
    where it reaches the target, and where a knee with fewer migrations balances worse: each
    of the plan's moves passed the gain threshold as it was made."""
    plan = chosen.plan
    if search.reached(plan):
        return chosen
    for point in (frontier.at(frontier.knee), frontier.at(plan.state.migrations)):
        if point is None or not point.moves or point.imbalance >= plan.overall - EPSILON:
            continue
        better = _in_order(search, chosen.state, point.moves)
        if better is not None:
            return _Chosen(chosen.forced, chosen.state, better, [], chosen.method)
    return chosen


# Plans the exact program may answer in turn where the ones before had no safe order.
EXECUTABLE_TRIES = 3


def _executable(
    ctx: SearchContext,
    model: LinearModel,
    start: State,
    movable: np.ndarray,
    repairs: Repairs,
    level: float,
    fewer_than: int | None,
) -> _Chosen | None:
    """Where a frontier point's plan has no order that keeps every rule on the way: the
    fewest migrations reaching `level` among the program's plans that have one (each that
    has none excluded in turn), if fewer than `fewer_than`; None where none is found."""
    for _ in range(EXECUTABLE_TRIES):
        found = model.solve(level, ctx.problem.weights, reach_only=True)
        if not found.moves or (fewer_than is not None and found.migrations >= fewer_than):
            break
        better = _replayed(ctx, start, movable, repairs, found.moves)
        if better is not None:
            return better
        model.exclude(found.moves)
    return None


def _replayed(
    ctx: SearchContext,
    start: State,
    movable: np.ndarray,
    repairs: Repairs,
    moves: tuple[UnitMove, ...],
) -> _Chosen | None:
    """A program's plan as repairs and ordered balancing moves; None where no order of them
    keeps every rule on the way."""
    parts = split_plan(ctx.problem, start, moves, repairs)
    plan = _ordered(ctx, movable, parts)
    return None if plan is None else _Chosen(parts.forced, parts.state, plan, [], "exact")


def _ordered(ctx: SearchContext, movable: np.ndarray, parts: JointSplit) -> Candidate | None:
    """The balancing moves of a program's plan in an order that keeps every rule on the way,
    after its repairs; None where there is none."""
    return _in_order(
        replace(ctx, movable=_without(movable, parts.forced)), parts.state, parts.balance
    )


def _in_order(ctx: SearchContext, state: State, moves: Sequence[UnitMove]) -> Candidate | None:
    """The plan of `moves` from `state` in an order that keeps every rule on the way and at
    its end; None where there is none."""
    plan = ctx.replay(state, moves)
    if plan is None or violations(ctx.constraints, plan.state, final=True):
        return None
    return plan


def _without(movable: np.ndarray, forced: Forced) -> np.ndarray:
    out = movable.copy()
    out[[m.move.unit for m in forced.moves]] = False
    return out


def _total_rank(plan: Candidate, forced: Forced, problem: Problem, target: float) -> PlanRank:
    """The rank of forced moves and a plan together (migrations and memory of both)."""
    memory = plan.memory + sum(float(problem.units.copy_bytes[m.move.unit]) for m in forced.moves)
    return plan_rank(replace(plan, memory=memory), target)


def _joint(
    ctx: SearchContext,
    start: State,
    frozen: Frozen,
    forced: Forced,
    plan: Candidate,
    triggered: bool,
    budget: int,
    movable: np.ndarray,
) -> tuple[Forced, State, Candidate, list[HeldBack]] | None:
    """Repairs and balancing chosen together by the exact program, when that beats
    repairing first (`recommender.engine.joint`), or repairs what repairing first could
    not place; None when it does not."""
    problem = ctx.problem
    every = movable | _forced_units(forced, len(movable))
    units = joint_units(problem, start, every, forced)
    model = joint_model(problem, ctx.constraints, start, units, frozen)
    # Not triggered: the repairs alone, at no worse a balance. Triggered: the target, and
    # where it is out of reach, the separate plan's level in fewer migrations.
    level = plan.overall + EPSILON
    if not triggered:
        levels = [level]
    elif ctx.reached(plan):
        levels = [ctx.target]
    else:
        levels = [ctx.target, level]
    result = solve_levels(model, problem.weights, levels)
    if not result.moves:
        return None
    repairs = Repairs.at_start(ctx.constraints, start)
    parts = split_plan(problem, start, result.moves, repairs)
    balance_ctx = replace(ctx, movable=_without(movable, parts.forced))
    room = budget - parts.state.migrations
    joint = _ordered(ctx, movable, parts)
    if joint is None:
        # The program's balancing has no order that keeps every rule on the way (it swaps
        # VMs between full nodes): its repairs, then the search's balancing from there.
        joint = (
            find_plan(balance_ctx, parts.state, room)
            if triggered and room > 0
            else balance_ctx.candidate(parts.state, (), 0.0)
        )
        if violations(ctx.constraints, joint.state, final=True):
            return None
    if any(c.must_move(joint.state, frozen.vms) for c in ctx.constraints):
        return None
    held: list[HeldBack] = []
    if triggered and joint.moves:
        joint, held = apply_gain_threshold(balance_ctx, parts.state, joint, room)
    # A plan that leaves a rule broken is never preferred to one that repairs it.
    if not forced.unplaceable and _total_rank(joint, parts.forced, problem, ctx.target) >= (
        _total_rank(plan, forced, problem, ctx.target)
    ):
        return None
    return parts.forced, parts.state, joint, held


def _forced_units(forced: Forced, n_units: int) -> np.ndarray:
    out = np.zeros(n_units, dtype=bool)
    out[[m.move.unit for m in forced.moves]] = True
    return out


def _migration_budget(problem: Problem, constraints: Sequence[Constraint]) -> int:
    """The most VM migrations a plan may have: the lowest a rule allows, else every VM once."""
    budgets = [c.migration_budget() for c in constraints]
    return min((b for b in budgets if b is not None), default=problem.n_vms)


def _balance(
    ctx: SearchContext, start: State, budget: int, use_exact: bool, frontier_follows: bool
) -> tuple[Candidate, Method]:
    """The search's plan and, with `use_exact`, the exact program's where it is better
    (only for the target itself when `frontier_follows`: the frontier's knee is the plan
    where the target is out of reach)."""
    if budget <= 0:
        return ctx.candidate(start, (), 0.0), "heuristic"
    plan = find_plan(ctx, start, budget)
    if not (use_exact and plan.moves):
        return plan, "heuristic"
    units = np.flatnonzero(ctx.movable & (start.unit_node >= 0))
    units = units[ctx.problem.active[start.unit_node[units]]]
    hint = Hint(plan.moves, plan.view.per_resource)
    # First the target itself, which the search may have missed (where no plan reaches it,
    # the program answers with its lowest imbalance and the fewest migrations there); if
    # that gives nothing better that can be ordered, the search's own level in fewer
    # migrations.
    if ctx.reached(plan) or frontier_follows:
        levels = [ctx.target]
    else:
        levels = [ctx.target, plan.overall + EPSILON]
    for level in levels:
        result = solve_exact(
            ctx.problem,
            ctx.constraints,
            start,
            units,
            level,
            hint=hint,
            reach_only=frontier_follows,
        )
        exact = ctx.replay(start, result.moves) if result.moves else None
        if exact is not None and ctx.rank(exact) < ctx.rank(plan):
            return exact, "exact"
    return plan, "heuristic"


def _reason(problem: Problem, scorer: Scorer, view: View, move: UnitMove) -> str:
    """The resource the move relieves most on its source, in words."""
    pos = scorer.position[move.source]
    if pos < 0:
        return "moved off an inactive node"
    share = problem.units.load[move.unit, scorer.resources] * scorer.inv_capacity[pos]
    relief = share * scorer.weights
    above = view.util[pos] > view.mean
    if not (relief * above).max() > 0:
        return f"makes room on {problem.nodes[move.source]} for the moves onto it"
    j = int(np.argmax(relief * above))
    name = problem.resources[scorer.resources[j]]
    return (
        f"{name}: {problem.nodes[move.source]} at {view.util[pos, j]:.0%} "
        f"vs cluster {view.mean[j]:.0%}"
    )


def _expand(
    ctx: SearchContext, start: State, forced: Forced, plan: Candidate, view: View
) -> list[Move]:
    """Unit moves as VM migrations, forced ones first, each with its gain and reason."""
    problem = ctx.problem
    units = problem.units
    out: list[Move] = []
    position = start.vm_node.copy()
    rejoined = {r.vm for r in forced.rejoined}

    def emit(vm: int, target: int, gain: float, reason: str, kind: MoveKind, unit: int) -> None:
        source = int(position[vm])
        if source == target:
            return
        position[vm] = target
        out.append(
            Move(
                vm=problem.vms[vm],
                name=problem.vm_display[vm],
                source=problem.nodes[source],
                target=problem.nodes[target],
                gain=gain,
                reason=reason,
                kind=kind,
                group=units.names.get(unit),
                **move_cost(problem, vm),
            )
        )

    for forced_move in forced.moves:
        move = forced_move.move
        for vm in units.members(move.unit):
            if move.source == SPLIT and int(vm) not in rejoined:
                continue
            emit(int(vm), move.target, 0.0, forced_move.reason, forced_move.kind, move.unit)
    gains = leave_one_out_gains(ctx, plan) if plan.moves else np.zeros(0)
    for move, gain in zip(plan.moves, gains, strict=True):
        reason = _reason(problem, ctx.scorer, view, move)
        for vm in units.members(move.unit):
            emit(int(vm), move.target, float(gain), reason, "balance", move.unit)
    return out
