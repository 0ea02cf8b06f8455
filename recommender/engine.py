"""The balance engine: the few live migrations that bring the imbalance under the target.

`plan_moves(snapshot, config)` starts from the current placement and works in two phases:

1. Forced moves, whatever the imbalance: units on maintenance nodes, pinned VMs outside their
   pin, anti-affinity members sharing a node, split affinity groups. Each goes (largest
   first) to the allowed node that leaves the lowest imbalance; one that cannot go anywhere
   is reported as unplaceable, with the rules that stopped it.
2. Balancing, when the overall imbalance (`recommender.measure`) is above `trigger`: the
   fewest migrations reaching `target`, then the least memory copied (`recommender.search`:
   beam search and pilot method over single moves ranked by the distance to the target
   region, tabu search to drop moves, pruning, swaps for less memory). On small clusters an
   exact program (`recommender.exact`, when HiGHS is installed) is asked for the target from
   that plan (or, where nothing reaches it, for the lowest imbalance) and the better plan
   is kept. Hysteresis then drops every move whose gain does not pay for the
   memory it copies (`recommender.hysteresis`).

Everything is a pure function of the snapshot and the config: same inputs, same plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from recommender import hysteresis
from recommender.config import Config
from recommender.exact import available as exact_available
from recommender.exact import solve_exact
from recommender.hysteresis import EPSILON
from recommender.measure import imbalance_per_resource, overall_imbalance
from recommender.model import Snapshot
from recommender.ordering import order_moves
from recommender.problem import SPLIT, Problem, State, build_problem
from recommender.rules import Constraint, Movers, allowed_targets, prepare_constraints
from recommender.search import (
    Candidate,
    Scorer,
    SearchContext,
    UnitMove,
    View,
    beam_search,
    find_plan,
    prune,
)

HELD_BACK_LIMIT = 10


@dataclass(frozen=True)
class Move:
    """One VM migration."""

    vm: str
    name: str
    source: str
    target: str
    gain: float  # how much higher the plan's overall imbalance would end without this move
    reason: str
    memory_bytes: float  # memory the migration copies (assigned memory)
    kind: str  # balance | evacuate | repair
    group: str | None = None  # affinity group moved as one unit


@dataclass(frozen=True)
class Unplaceable:
    vm: str
    name: str
    node: str
    reason: str


@dataclass(frozen=True)
class HeldBack:
    """A move that would have lowered the imbalance, and what stopped it."""

    vm: str
    source: str
    target: str
    gain: float
    blocked_by: tuple[str, ...]


@dataclass
class EngineResult:
    moves: list[Move]
    unplaceable: list[Unplaceable]
    held_back: list[HeldBack]
    imbalance_before: dict[str, float]
    imbalance_after: dict[str, float]
    overall_before: float
    overall_after: float
    triggered: bool  # the imbalance was above the trigger, so balancing ran
    target_reached: bool
    warnings: list[str]
    method: str  # none | heuristic | exact
    problem: Problem = field(repr=False)
    unit_moves: tuple[UnitMove, ...] = field(default=(), repr=False)

    @property
    def migrations(self) -> int:
        return len(self.moves)

    @property
    def memory_bytes(self) -> float:
        return float(sum(m.memory_bytes for m in self.moves))


def measure_state(problem: Problem, node_load: np.ndarray) -> tuple[dict[str, float], float]:
    """Per-resource and overall imbalance of a state, exactly as `recommender.measure` says."""
    active = problem.active
    per = imbalance_per_resource(node_load[active], problem.capacity[active])
    weights = problem.weights
    overall = overall_imbalance(np.where(weights > 0, per, 0.0), weights)
    return {r: float(v) for r, v in zip(problem.resources, per, strict=True)}, overall


def unit_flags(problem: Problem, per_vm: np.ndarray) -> np.ndarray:
    """(U,) true where any member VM is flagged."""
    return (
        np.bincount(problem.units.of_vm, weights=per_vm.astype(float), minlength=len(problem.units))
        > 0
    )


def frozen_vms(constraints: list[Constraint], n_vms: int) -> tuple[np.ndarray, dict[int, str]]:
    stuck = np.zeros(n_vms, dtype=bool)
    reasons: dict[int, str] = {}
    for constraint in constraints:
        for vm, why in constraint.frozen_vms().items():
            stuck[vm] = True
            reasons.setdefault(vm, why)
    return stuck, reasons


def balance_movable(problem: Problem, constraints: list[Constraint]) -> np.ndarray:
    """(U,) units balancing may move: no member frozen by a rule or held by hysteresis."""
    stuck, _ = frozen_vms(constraints, problem.n_vms)
    held = problem.cooldown | problem.bursting
    return ~unit_flags(problem, stuck | held)


def search_context(
    problem: Problem, constraints: list[Constraint], scorer: Scorer, movable: np.ndarray
) -> SearchContext:
    """Search effort by size: wide beams and many exchanges on small clusters, greedy with a
    bounded number of exchanges on the largest."""
    units = int(movable.sum())
    nodes = len(scorer.active)
    ctx = SearchContext(problem, constraints, scorer, movable, problem.balance.target)
    if units <= 120 and nodes <= 32:
        ctx.width, ctx.branch, ctx.pilot_breadth = 6, 6, 4
        ctx.repair_steps, ctx.shrink_tries, ctx.overshoot = 30, 3, 0.5
    elif units <= 3_000:
        ctx.width, ctx.branch, ctx.repair_steps, ctx.shrink_tries = 2, 2, 4, 1
        ctx.max_pairs, ctx.memory_rounds = 60_000, 1
    else:
        ctx.width, ctx.branch, ctx.repair_steps, ctx.shrink_tries = 1, 1, 1, 1
        ctx.max_pairs, ctx.reconstruct, ctx.memory_rounds = 40_000, False, 1
    return ctx


# --- forced moves --------------------------------------------------------------------------


@dataclass
class _Forced:
    moves: list[tuple[UnitMove, str, str]]  # move, reason, kind
    vm_moves: list[tuple[int, int, int]]  # vm, source, target, for split groups rejoining
    unplaceable: list[Unplaceable]
    warnings: list[str]


def _diagnose(problem: Problem, constraints: list[Constraint], state: State, movers: Movers) -> str:
    """Which rules rule out which nodes for a single mover."""
    blocked: dict[str, list[str]] = {}
    source = int(movers.source[0])
    seen = np.zeros(problem.n_nodes, dtype=bool)
    if source >= 0:
        seen[source] = True
    for constraint in constraints:
        mask = constraint.allowed_targets(state, movers)[0]
        newly = ~mask & ~seen
        if newly.any():
            blocked[constraint.name] = [problem.nodes[n] for n in np.flatnonzero(newly)]
        seen |= ~mask
    if not blocked:
        return "no node to go to"
    parts = []
    for name, nodes in blocked.items():
        shown = ", ".join(nodes[:4]) + (f" and {len(nodes) - 4} more" if len(nodes) > 4 else "")
        parts.append(f"{name} ({shown})")
    return "no node can take it: " + "; ".join(parts)


def _forced_phase(
    problem: Problem,
    constraints: list[Constraint],
    scorer: Scorer,
    state: State,
    stuck: np.ndarray,
    stuck_reasons: dict[int, str],
) -> _Forced:
    units = problem.units
    out = _Forced([], [], [], [])
    handled: set[int] = set()
    kinds = {"maintenance": "evacuate"}
    held = problem.cooldown | problem.bursting
    while True:
        must: dict[int, list[tuple[str, str]]] = {}
        for constraint in constraints:
            for unit, why in constraint.must_move(state, stuck).items():
                if unit not in handled:
                    must.setdefault(unit, []).append((why, constraint.name))
        if not must:
            break
        unit = min(must, key=lambda u: (-units.copy_bytes[u], u))
        handled.add(unit)
        why = "; ".join(text for text, _ in must[unit])
        kind = kinds.get(must[unit][0][1], "repair")
        members = units.members(unit)
        blocked = [int(v) for v in members if stuck[v]]
        if blocked:
            because = stuck_reasons.get(blocked[0], "frozen")
            out.unplaceable.extend(
                _unplaceable(problem, state, members, f"{why}; not moved: {because}")
            )
            continue
        if held[members].any():
            why += "; moved despite " + (
                "cooldown" if problem.cooldown[members].any() else "a burst"
            )
        if state.unit_node[unit] == SPLIT:
            _rejoin(problem, constraints, scorer, state, unit, why, out)
            continue
        movers = Movers.of_units(problem, state, np.array([unit]))
        mask = allowed_targets(constraints, state, movers)[0] & problem.receivable
        targets = np.flatnonzero(mask)
        if len(targets) == 0:
            reason = f"{why}; {_diagnose(problem, constraints, state, movers)}"
            out.unplaceable.extend(_unplaceable(problem, state, members, reason))
            continue
        view = scorer.view(state.node_load)
        k = len(targets)
        overall, smooth, _ = scorer.evaluate(
            view,
            np.repeat(movers.load, k, axis=0),
            np.repeat(movers.source, k),
            targets,
        )
        best = int(targets[np.lexsort((targets, smooth, np.round(overall, 9)))[0]])
        source = int(state.unit_node[unit])
        state.move_unit(problem, unit, best)
        out.moves.append((UnitMove(unit, source, best), why, kind))
    return out


def _rejoin(
    problem: Problem,
    constraints: list[Constraint],
    scorer: Scorer,
    state: State,
    unit: int,
    why: str,
    out: _Forced,
) -> None:
    """Bring a split affinity group together on the node needing the least copying."""
    members = problem.units.members(unit)
    best: tuple | None = None
    for anchor in sorted({int(n) for n in state.vm_node[members]}):
        if not problem.receivable[anchor]:
            continue
        part = members[state.vm_node[members] != anchor]
        movers = Movers.of_groups(problem, state, [part])
        if not allowed_targets(constraints, state, movers)[0, anchor]:
            continue
        trial = state.copy()
        for vm in part:
            trial.move_vm(problem, int(vm), anchor)
        view = scorer.view(trial.node_load)
        key = (float(problem.copy_bytes[part].sum()), round(view.overall, 9), view.smooth, anchor)
        if best is None or key < best[0]:
            best = (key, anchor, part)
    if best is None:
        nodes = ", ".join(sorted({problem.nodes[n] for n in state.vm_node[members]}))
        name = problem.units.names.get(unit, "")
        out.warnings.append(f"affinity {name} cannot be brought together (on {nodes}); {why}")
        stranded = members[problem.maintenance[state.vm_node[members]]]
        reason = f"{why}; affinity {name} cannot be brought together"
        out.unplaceable.extend(_unplaceable(problem, state, stranded, reason))
        return
    _, anchor, part = best
    for vm in part:
        source = int(state.vm_node[vm])
        state.move_vm(problem, int(vm), anchor)
        out.vm_moves.append((int(vm), source, anchor))
    out.moves.append((UnitMove(unit, SPLIT, anchor), why, "repair"))


def _unplaceable(
    problem: Problem, state: State, members: np.ndarray, reason: str
) -> list[Unplaceable]:
    return [
        Unplaceable(problem.vms[v], problem.vm_display[v], problem.nodes[state.vm_node[v]], reason)
        for v in members
    ]


# --- balancing -----------------------------------------------------------------------------


def _loo_gains(ctx: SearchContext, plan: Candidate) -> np.ndarray:
    """For each move: the overall imbalance without it minus the plan's."""
    units = ctx.problem.units
    gains = np.zeros(len(plan.moves))
    for i, move in enumerate(plan.moves):
        load = plan.state.node_load.copy()
        load[move.target] -= units.load[move.unit]
        load[move.source] += units.load[move.unit]
        gains[i] = ctx.scorer.view(load).overall - plan.overall
    return gains


def _replay_dropping(
    ctx: SearchContext, start: State, moves: tuple[UnitMove, ...]
) -> tuple[Candidate, list[UnitMove]]:
    """The plan's moves that still have a feasible order, and those that lost it."""
    pairs = [(ctx.problem.units.members(m.unit), m.target) for m in moves]
    ordering = order_moves(ctx.problem, ctx.constraints, start, pairs)
    kept = tuple(moves[s.origin] for s in ordering.steps)
    memory = float(sum(ctx.problem.units.copy_bytes[m.unit] for m in kept))
    return ctx.candidate(ordering.state, kept, memory), [moves[i] for i in ordering.stuck]


def _apply_hysteresis(
    ctx: SearchContext, start: State, plan: Candidate, budget: int
) -> tuple[Candidate, list[HeldBack]]:
    """Drop moves below their gain threshold; after drops, search again without the dropped
    VMs (twice at most), keeping the result only if it is better."""
    held: list[HeldBack] = []
    for attempt in range(3):
        plan, dropped = _drop_weak(ctx, start, plan, held)
        room = budget - (plan.state.migrations - start.migrations)
        if not dropped or ctx.reached(plan) or room <= 0 or attempt == 2:
            break
        more = prune(ctx, start, beam_search(ctx, plan, room))
        more, _ = _drop_weak(ctx, start, more, held)
        if more.key() >= plan.key():
            break
        plan = more
    return plan, held


def _drop_weak(
    ctx: SearchContext, start: State, plan: Candidate, held: list[HeldBack]
) -> tuple[Candidate, bool]:
    """Drop the move furthest below its gain threshold until every move passes."""
    problem = ctx.problem
    dropped = False
    while plan.moves:
        gains = _loo_gains(ctx, plan)
        copies = problem.units.copy_bytes[[m.unit for m in plan.moves]]
        worst = hysteresis.weakest_move(gains, hysteresis.gain_threshold(copies, problem.balance))
        if worst is None:
            break
        move = plan.moves[worst]
        held.extend(_held(problem, move, float(gains[worst]), ("min_gain",)))
        ctx.tabu.add(move.unit)
        dropped = True
        plan, lost = _replay_dropping(ctx, start, plan.moves[:worst] + plan.moves[worst + 1 :])
        for other in lost:
            held.extend(_held(problem, other, 0.0, ("sequencing",)))
            ctx.tabu.add(other.unit)
    return plan, dropped


def _held(problem: Problem, move: UnitMove, gain: float, why: tuple[str, ...]) -> list[HeldBack]:
    members = problem.units.members(move.unit)
    return [
        HeldBack(problem.vms[v], problem.nodes[move.source], problem.nodes[move.target], gain, why)
        for v in members
    ]


def _blocked_moves(ctx: SearchContext, plan: Candidate, held_units: np.ndarray) -> list[HeldBack]:
    """The best moves from the final state that some rule or hysteresis filter stopped."""
    problem, scorer = ctx.problem, ctx.scorer
    state, view = plan.state, plan.view
    every = np.ones(len(problem.units), dtype=bool)
    saved = ctx.movable, ctx.tabu, ctx.max_units
    ctx.movable, ctx.tabu, ctx.max_units = every, set(), 300
    try:
        units = ctx.source_units(state, view, 10**9, [m.unit for m in plan.moves])
    finally:
        ctx.movable, ctx.tabu, ctx.max_units = saved
    if len(units) == 0:
        return []
    movers = Movers.of_units(problem, state, units)
    masks = {c.name: c.allowed_targets(state, movers) for c in ctx.constraints}
    reachable = np.repeat(problem.active[None, :], len(units), axis=0)
    reachable[np.arange(len(units)), np.maximum(movers.source, 0)] = False
    if reachable.sum() > ctx.max_pairs:
        reachable &= ctx.target_pool(view, movers, reachable)
    rows, targets = np.nonzero(reachable)
    if len(rows) == 0:
        return []
    overall, _, _ = scorer.evaluate(
        view, movers.load[rows], movers.source[rows], targets, overall_only=True
    )
    gain = view.overall - overall
    threshold = hysteresis.gain_threshold(problem.units.copy_bytes[units[rows]], problem.balance)
    blocked = {name: ~mask[rows, targets] for name, mask in masks.items()}
    blocked["min_gain"] = gain < threshold
    held = held_units[units[rows]]
    any_block = np.logical_or.reduce([*blocked.values(), held])
    # Per unit, its best blocked move with a gain.
    pick = np.flatnonzero((gain > EPSILON) & any_block)
    pick = pick[np.lexsort((targets[pick], -gain[pick], rows[pick]))]
    first = pick[np.r_[True, rows[pick][1:] != rows[pick][:-1]]] if len(pick) else pick
    first = first[np.lexsort((units[rows[first]], -gain[first]))][:HELD_BACK_LIMIT]
    out = []
    for i in first:
        r, t = int(rows[i]), int(targets[i])
        why = [name for name in masks if blocked[name][i]]
        if held[i]:
            members = problem.units.members(int(units[r]))
            why.append("cooldown" if problem.cooldown[members].any() else "burst")
        if blocked["min_gain"][i]:
            why.append("min_gain")
        move = UnitMove(int(units[r]), int(movers.source[r]), t)
        out.extend(_held(problem, move, float(gain[i]), tuple(why)))
    return out


def _balance(
    ctx: SearchContext, start: State, budget: int, use_exact: bool
) -> tuple[Candidate, str]:
    base = ctx.candidate(start, (), 0.0)
    if budget <= 0:
        return base, "heuristic"
    plan = find_plan(ctx, start, budget)
    method = "heuristic"
    if use_exact and plan.moves:
        units = np.flatnonzero(ctx.movable & (start.unit_node >= 0))
        units = units[ctx.problem.active[start.unit_node[units]]]
        hint = (plan.moves, plan.view.per_resource)
        # First the target itself, which the search may have missed (where no plan reaches
        # it, the program answers with its lowest imbalance and the fewest migrations there);
        # if that gives nothing better that can be ordered, the search's own level in fewer
        # migrations.
        levels = [ctx.target] if ctx.reached(plan) else [ctx.target, plan.overall + EPSILON]
        for level in levels:
            result = solve_exact(ctx.problem, ctx.constraints, start, units, level, hint=hint)
            exact = ctx.replay(start, result.moves) if result.moves else None
            if exact is not None and _better(ctx, exact, plan):
                plan, method = exact, "exact"
                break
    return plan, method


def _better(ctx: SearchContext, a: Candidate, b: Candidate) -> bool:
    def key(c: Candidate) -> tuple:
        if ctx.reached(c):
            return (0, c.state.migrations, c.memory, round(c.overall, 9))
        return (1, round(c.overall, 9), c.state.migrations, c.memory)

    return key(a) < key(b)


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


# --- entry point ---------------------------------------------------------------------------


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
    before, overall_before = measure_state(problem, start.node_load)

    stuck, stuck_reasons = frozen_vms(constraints, problem.n_vms)
    held_units = unit_flags(problem, problem.cooldown | problem.bursting)
    movable = ~unit_flags(problem, stuck) & ~held_units

    state = start.copy()
    forced = _forced_phase(problem, constraints, scorer, state, stuck, stuck_reasons)
    warnings.extend(forced.warnings)
    after_forced = scorer.view(state.node_load)
    triggered = hysteresis.should_plan(overall_before, settings) or hysteresis.should_plan(
        after_forced.overall, settings
    )

    ctx = search_context(problem, constraints, scorer, movable)
    # A unit moved by force is not moved again to balance (that would copy it twice).
    ctx.movable = movable.copy()
    ctx.movable[[m.unit for m, _, _ in forced.moves]] = False
    plan = ctx.candidate(state, (), 0.0)
    held: list[HeldBack] = []
    method = "heuristic" if forced.moves else "none"
    if triggered and not ctx.reached(plan) and len(scorer.active):
        budget = settings.max_migrations - state.migrations
        wanted = settings.exact == "auto" if exact is None else exact
        small = int(movable.sum()) <= settings.exact_max_vms and len(scorer.active) <= 64
        use_exact = wanted and small and exact_available()
        plan, method = _balance(ctx, state, budget, use_exact)
        plan, held = _apply_hysteresis(ctx, state, plan, budget)
        if not ctx.reached(plan):
            held.extend(_blocked_moves(ctx, plan, held_units))

    moves = _expand(problem, scorer, start, forced, plan, after_forced, ctx)
    after, overall_after = measure_state(problem, plan.state.node_load)
    unit_moves = tuple(m for m, _, _ in forced.moves) + plan.moves
    return EngineResult(
        moves=moves,
        unplaceable=forced.unplaceable,
        held_back=held,
        imbalance_before=before,
        imbalance_after=after,
        overall_before=overall_before,
        overall_after=overall_after,
        triggered=triggered,
        target_reached=hysteresis.target_reached(overall_after, settings),
        warnings=warnings,
        method=method,
        problem=problem,
        unit_moves=unit_moves,
    )


def _expand(
    problem: Problem,
    scorer: Scorer,
    start: State,
    forced: _Forced,
    plan: Candidate,
    view: View,
    ctx: SearchContext,
) -> list[Move]:
    """Unit moves as VM migrations, forced ones first, each with its gain and reason."""
    units = problem.units
    out: list[Move] = []
    position = start.vm_node.copy()
    rejoined = {vm: (source, target) for vm, source, target in forced.vm_moves}

    def emit(vm: int, target: int, gain: float, reason: str, kind: str, unit: int) -> None:
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
                memory_bytes=float(problem.copy_bytes[vm]),
                kind=kind,
                group=units.names.get(unit),
            )
        )

    for move, why, kind in forced.moves:
        for vm in units.members(move.unit):
            if move.source == SPLIT and int(vm) not in rejoined:
                continue
            emit(int(vm), move.target, 0.0, why, kind, move.unit)
    gains = _loo_gains(ctx, plan) if plan.moves else np.zeros(0)
    for move, gain in zip(plan.moves, gains, strict=True):
        reason = _reason(problem, scorer, view, move)
        for vm in units.members(move.unit):
            emit(int(vm), move.target, float(gain), reason, "balance", move.unit)
    return out
