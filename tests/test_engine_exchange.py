"""Single exchanges (`recommender.engine.exchange`): from any plan of one migration they
reach the best one, checked by enumerating every end placement; from any plan of k they end
where no single exchange keeping every rule does better, with at most k migrations, every
rule kept and an imbalance no higher than the plan's."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from devkit.instances import Shape, random_cluster
from recommender.config import Config
from recommender.engine.build import build_problem
from recommender.engine.candidates import SearchContext, SearchLimits
from recommender.engine.exchange import exchange, placed, shorter
from recommender.engine.measure import EPSILON
from recommender.engine.planner import balance_movable
from recommender.engine.problem import State, UnitMove
from recommender.engine.rules import RuleSettings, prepare_constraints, violations
from recommender.engine.rules.base import GroupRule
from recommender.engine.scorer import Scorer
from recommender.model import Snapshot
from tests.engine_brute import exchanges, placements
from tests.test_engine import config, hot_nic_cluster


def context(snap: Snapshot, cfg: Config) -> tuple[SearchContext, State]:
    problem = build_problem(snap, cfg)
    constraints = tuple(prepare_constraints(problem))
    movable = balance_movable(problem, constraints)
    scorer = Scorer(problem)
    limits = SearchLimits.for_size(int(movable.sum()), len(scorer.active))
    ctx = SearchContext(problem, constraints, scorer, movable, 0.0, limits)
    return ctx, State.initial(problem)


def cases() -> list[tuple[str, Snapshot, Config]]:
    out = []
    for seed in (3, 7):
        inst = random_cluster(seed, Shape(nodes=(3, 3), vms=(7, 7), rules=False))
        out.append((f"seed {seed}", inst.snapshot, inst.config))
    # 101 to an idle node would be the best single move; the pairs keep it off pve2 and pve3
    # (with 105 and 106), so the best that keeps them moves another VM.
    pairs = RuleSettings(
        anti_affinity=[
            GroupRule(name="one", vms=["101", "105"]),
            GroupRule(name="two", vms=["101", "106"]),
        ]
    )
    out.append(("pairs", hot_nic_cluster(), config(pairs)))
    return out


CASES = cases()


def legal_plans(ctx: SearchContext, start: State, k: int) -> list[tuple[UnitMove, ...]]:
    """Every plan of `k` single moves of distinct movable units that keeps every rule."""
    problem = ctx.problem
    nodes = np.flatnonzero(problem.receivable)
    singles = [
        UnitMove(int(u), int(start.unit_node[u]), int(n))
        for u in np.flatnonzero(ctx.movable & (start.unit_node >= 0))
        for n in nodes
        if n != start.unit_node[u]
    ]
    out = []
    for moves in itertools.combinations(singles, k):
        if len({m.unit for m in moves}) < k:
            continue
        state = placed(problem, start, {m.unit: m.target for m in moves})
        if not violations(ctx.constraints, state, final=True):
            out.append(moves)
    return out


def overall(ctx: SearchContext, start: State, moves: tuple[UnitMove, ...]) -> float:
    state = placed(ctx.problem, start, {m.unit: m.target for m in moves})
    return ctx.scorer.view(state.node_load, 0.0).overall


@pytest.mark.parametrize(("name", "snap", "cfg"), CASES, ids=[c[0] for c in CASES])
def test_from_any_single_move_an_exchange_reaches_the_best_one(
    name: str, snap: Snapshot, cfg: Config
) -> None:
    ctx, start = context(snap, cfg)
    truth = min(p.overall for p in placements(snap, cfg, 1) if p.migrations <= 1)
    plans = legal_plans(ctx, start, 1)
    assert plans, name
    assert any(overall(ctx, start, moves) > truth + EPSILON for moves in plans), name
    for moves in plans:
        better = exchange(ctx, start, 1, moves)
        assert overall(ctx, start, better) == pytest.approx(truth, abs=1e-9), (name, moves)


@pytest.mark.parametrize(("name", "snap", "cfg"), CASES, ids=[c[0] for c in CASES])
def test_after_exchanges_no_single_exchange_does_better(
    name: str, snap: Snapshot, cfg: Config
) -> None:
    ctx, start = context(snap, cfg)
    problem = ctx.problem
    for moves in legal_plans(ctx, start, 2)[::5]:
        better = exchange(ctx, start, 2, moves)
        plan = {m.unit: m.target for m in better}
        state = placed(problem, start, plan)
        assert state.migrations <= 2
        assert not violations(ctx.constraints, state, final=True)
        reached = ctx.scorer.view(state.node_load, 0.0).overall
        assert reached <= overall(ctx, start, moves) + EPSILON
        for _, other in exchanges(problem, start, ctx.movable, plan, 2):
            if violations(ctx.constraints, other, final=True):
                continue
            assert ctx.scorer.view(other.node_load, 0.0).overall >= reached - EPSILON, moves


def test_the_pairs_keep_the_exchange_from_the_best_single_move() -> None:
    """In the "pairs" case the best single move breaks a rule, so the plan the exchanges
    reach (the best that keeps every rule, above) is another, and worse."""
    _, snap, cfg = CASES[2]
    free = min(p.overall for p in placements(snap, config(), 1) if p.migrations <= 1)
    kept = min(p.overall for p in placements(snap, cfg, 1) if p.migrations <= 1)
    assert kept > free + EPSILON
    ctx, start = context(snap, cfg)
    for moves in legal_plans(ctx, start, 1):
        better = exchange(ctx, start, 1, moves)
        state = placed(ctx.problem, start, {m.unit: m.target for m in better})
        assert not violations(ctx.constraints, state, final=True)


def test_the_plans_one_move_shorter() -> None:
    ctx, start = context(CASES[0][1], CASES[0][2])
    moves = legal_plans(ctx, start, 3)[0]
    shorter_plans = list(shorter(ctx.problem, start, moves))
    assert [rest for rest, _ in shorter_plans] == [
        moves[1:],
        (moves[0], moves[2]),
        moves[:2],
    ]
    for rest, state in shorter_plans:
        assert state.migrations == 2
        expected = placed(ctx.problem, start, {m.unit: m.target for m in rest})
        assert np.array_equal(state.node_load, expected.node_load)
