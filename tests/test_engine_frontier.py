"""The trade-off frontier: monotone, each point the exact optimum for its number of
migrations (checked by enumerating every end placement on small clusters), the plan on it."""

from __future__ import annotations

import itertools
import math
import threading
import time
from typing import Any

import numpy as np
import pytest

from devkit.instances import HeavyShape, Shape, heavy_tailed_cluster, random_cluster
from recommender.config import Config
from recommender.engine import exact as exact_module
from recommender.engine import frontier as frontier_module
from recommender.engine import planner as planner_module
from recommender.engine.bound import LowerBounds
from recommender.engine.build import build_problem
from recommender.engine.exact import LinearModel
from recommender.engine.exact import available as exact_available
from recommender.engine.forced import frozen_vms
from recommender.engine.joint import joint_model
from recommender.engine.measure import EPSILON
from recommender.engine.planner import balance_movable, plan_moves
from recommender.engine.problem import State
from recommender.engine.rules import RuleSettings, prepare_constraints, violations
from recommender.engine.rules.base import GroupRule
from recommender.engine.scorer import Scorer
from recommender.model import Snapshot
from recommender.plan import build_plan
from tests.engine_brute import exchanges, placements
from tests.test_engine import NIC, config, hot_nic_cluster, node, replay, snapshot, vm

pytestmark = pytest.mark.skipif(not exact_available(), reason="needs highspy")


def lowest_per_k(snap: Snapshot, cfg: Config, most: int) -> dict[int, float]:
    """k -> the lowest overall imbalance of an end placement keeping every rule with at
    most k VM migrations, by enumerating every placement."""
    best: dict[int, float] = {}
    for placement in placements(snap, cfg, most):
        moved = placement.migrations
        best[moved] = min(best.get(moved, np.inf), placement.overall)
    return {
        k: min(v for m, v in best.items() if m <= k)
        for k in range(1, most + 1)
        if any(m <= k for m in best)
    }


def small_clusters() -> list[tuple[str, Snapshot, Config]]:
    out = []
    unreachable = dict(target=0.005, trigger=0.01, min_gain=0.002, min_gain_per_gib=0.0)
    out.append(("hot nic", hot_nic_cluster(), config(**unreachable)))
    pair = RuleSettings(anti_affinity=[GroupRule(name="pair", vms=["101", "104"])])
    out.append(("broken pair", hot_nic_cluster(), config(pair, **unreachable)))
    group = RuleSettings(affinity=[GroupRule(name="app", vms=["101", "106"])])
    out.append(("split group", hot_nic_cluster(), config(group, **unreachable)))
    for seed in (3, 7):
        inst = random_cluster(seed, Shape(nodes=(3, 3), vms=(7, 7), rules=False))
        out.append((f"seed {seed}", inst.snapshot, inst.config))
    return out


CASES = small_clusters()


@pytest.mark.parametrize(("name", "snap", "cfg"), CASES, ids=[c[0] for c in CASES])
def test_each_point_is_the_exact_optimum_for_its_migrations(
    name: str, snap: Snapshot, cfg: Config
) -> None:
    result = plan_moves(snap, cfg)
    frontier = result.frontier
    assert frontier is not None and frontier.points, name
    truth = lowest_per_k(snap, cfg, frontier.points[-1].migrations)
    assert [p.migrations for p in frontier.points] == sorted(truth)
    for point in frontier.points:
        assert point.exact
        assert point.imbalance == pytest.approx(truth[point.migrations], abs=1e-7)
        assert point.lower_bound == pytest.approx(point.imbalance, abs=1e-7)


@pytest.mark.parametrize("seed", range(6))
def test_the_frontier_is_monotone_and_bounded(seed: int) -> None:
    inst = random_cluster(seed, Shape(nodes=(3, 5), vms=(10, 16)))
    result = plan_moves(inst.snapshot, inst.config)
    if result.frontier is None:
        assert not result.triggered
        return
    points = result.frontier.points
    ks = [p.migrations for p in points]
    assert ks == list(range(ks[0], ks[0] + len(ks)))
    values = [p.imbalance for p in points]
    assert all(b <= a + EPSILON for a, b in itertools.pairwise(values))
    assert all(p.lower_bound <= p.imbalance + EPSILON for p in points)
    bounds = [p.lower_bound for p in points]
    assert all(b <= a + EPSILON for a, b in itertools.pairwise(bounds))


@pytest.mark.parametrize(("name", "snap", "cfg"), CASES, ids=[c[0] for c in CASES])
def test_the_plan_is_on_the_frontier(name: str, snap: Snapshot, cfg: Config) -> None:
    result = plan_moves(snap, cfg)
    frontier = result.frontier
    assert frontier is not None
    if result.target_reached:
        # The fewest migrations that reach the target.
        assert result.frontier.at(result.migrations) is not None
        fewer = frontier.at(result.migrations - 1)
        assert fewer is None or fewer.imbalance > cfg.balance.target + EPSILON
        return
    point = frontier.at(frontier.knee)
    assert point is not None, name
    assert result.migrations == frontier.knee
    assert result.overall_after == pytest.approx(point.imbalance, abs=1e-9)


def test_the_knee_is_the_last_point_whose_gain_pays_for_the_copy() -> None:
    snap = hot_nic_cluster()
    unreachable = dict(target=0.005, trigger=0.01, min_gain_per_gib=0.0)
    cheap = plan_moves(snap, config(min_gain=0.0005, **unreachable)).frontier
    dear = plan_moves(snap, config(min_gain=0.05, **unreachable)).frontier
    assert cheap is not None and dear is not None
    assert 0 < dear.knee < cheap.knee
    problem = build_problem(snap, config())
    overall = problem.imbalance(State.initial(problem).node_load).overall
    values = {0: overall} | {p.migrations: p.imbalance for p in dear.points}
    assert values[dear.knee - 1] - values[dear.knee] >= 0.05
    assert all(values[k - 1] - values[k] < 0.05 for k in values if k > dear.knee)


@pytest.fixture
def asked(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The budgets the frontier's exact programs are asked for (a batch's in any order)."""
    seen: list[int] = []
    real = LinearModel.lowest

    def counted(self: LinearModel, weights: np.ndarray, migrations: int, **kw: Any) -> Any:
        seen.append(migrations)
        return real(self, weights, migrations, **kw)

    monkeypatch.setattr(LinearModel, "lowest", counted)
    return seen


def test_the_frontier_stops_asking_the_program_once_the_cluster_is_balanced(
    asked: list[int],
) -> None:
    # Two like VMs on one of two like nodes: one migration balances every resource.
    twins = {name: vm("pve1", net=0.3 * NIC, disk=0.3 * NIC, mem_gib=8) for name in ("a", "b")}
    snap = snapshot({"pve1": node(), "pve2": node()}, twins)
    result = plan_moves(snap, config())
    frontier = result.frontier
    assert frontier is not None
    ks = [p.migrations for p in frontier.points]
    assert len(ks) > 1 and ks == list(range(1, len(ks) + 1))
    assert all(p.exact and p.imbalance <= EPSILON for p in frontier.points)
    assert all(len(p.moves) == 1 for p in frontier.points)
    assert sorted(asked) == [1, 2]  # the first batch, no later one


def test_the_frontier_stops_asking_the_program_at_the_proven_floor(asked: list[int]) -> None:
    # A whale and two small VMs on one of three like nodes: once the two small ones are off
    # it, the whale's own NIC and disk share is the floor no number of migrations goes under.
    vms = {"w": vm("pve1", net=0.8 * NIC, disk=0.8 * NIC, mem_gib=8)}
    vms |= {name: vm("pve1", net=0.1 * NIC, disk=0.1 * NIC, mem_gib=8) for name in ("s1", "s2")}
    snap = snapshot({"pve1": node(), "pve2": node(), "pve3": node()}, vms)
    cfg = config()
    frontier = plan_moves(snap, cfg).frontier
    assert frontier is not None
    assert sorted(asked) == [1, 2]
    truth = lowest_per_k(snap, cfg, frontier.points[-1].migrations)
    assert [p.migrations for p in frontier.points] == sorted(truth)
    assert len(truth) > 2
    for point in frontier.points:
        assert point.exact
        assert point.imbalance == pytest.approx(truth[point.migrations], abs=1e-7)
    assert all(len(p.moves) == 2 for p in frontier.points[1:])


def test_the_frontier_shares_one_node_budget_among_its_points(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A cluster whose later points the program does not prove within a few hundred nodes.
    inst = random_cluster(45, Shape(nodes=(3, 6), vms=(10, 30)))
    monkeypatch.setattr(frontier_module, "FRONTIER_MAX_NODES", 150)
    monkeypatch.setattr(frontier_module, "FRONTIER_NODES", 400)
    runs: list[tuple[int, int, int, str]] = []
    real = LinearModel.lowest

    def counted(self: LinearModel, weights: Any, migrations: int, **kw: Any) -> Any:
        found = real(self, weights, migrations, **kw)
        runs.append((migrations, kw["max_nodes"], found.nodes, found.status))
        return found

    monkeypatch.setattr(LinearModel, "lowest", counted)
    frontier = plan_moves(inst.snapshot, inst.config).frontier
    assert frontier is not None and len(runs) == len(frontier.points) > 5
    runs.sort()
    batch = frontier_module.FRONTIER_BATCH
    left = 400
    for first in range(0, len(runs), batch):
        together = runs[first : first + batch]
        for _, asked, used, _ in together:
            # An equal share of what the batches before left, at most the point's limit.
            assert asked == max(1, min(150, left // len(together)))
            assert used <= asked + 1
        left -= sum(used for _, _, used, _ in together)
    assert sum(used for _, _, used, _ in runs) <= 400 + len(runs)
    assert runs[0][3] == "optimal" and runs[0][2] < 150  # the first point leaves nodes over
    assert runs[-1][1] == 1 and runs[-1][3] == "limit"  # the budget is spent by the end
    assert all(p.lower_bound <= p.imbalance + EPSILON for p in frontier.points)


def test_a_batch_of_points_is_solved_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each program of the first batch waits for the other to start: run one after the
    # other, the first would wait alone until the barrier gives up.
    batch = frontier_module.FRONTIER_BATCH
    assert batch == 2
    barrier = threading.Barrier(batch, timeout=60)
    real = LinearModel.lowest

    def together(self: LinearModel, weights: Any, migrations: int, **kw: Any) -> Any:
        if migrations <= batch:
            barrier.wait()
        return real(self, weights, migrations, **kw)

    monkeypatch.setattr(LinearModel, "lowest", together)
    inst = random_cluster(45, Shape(nodes=(3, 6), vms=(10, 30)))
    frontier = plan_moves(inst.snapshot, inst.config).frontier
    assert frontier is not None and len(frontier.points) > batch
    assert not barrier.broken


def test_the_frontier_does_not_depend_on_which_program_ends_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    inst = random_cluster(45, Shape(nodes=(3, 6), vms=(10, 30)))
    as_is = plan_moves(inst.snapshot, inst.config)
    real = LinearModel.lowest

    def first_last(self: LinearModel, weights: Any, migrations: int, **kw: Any) -> Any:
        found = real(self, weights, migrations, **kw)
        if migrations % frontier_module.FRONTIER_BATCH == 1:
            time.sleep(0.3)  # the first of each batch ends after the second
        return found

    monkeypatch.setattr(LinearModel, "lowest", first_last)
    reordered = plan_moves(inst.snapshot, inst.config)
    assert as_is.frontier is not None and reordered.frontier == as_is.frontier
    assert [m.vm for m in reordered.moves] == [m.vm for m in as_is.moves]


def test_the_frontier_reaches_the_optimum_where_the_solver_defaults_fall_short(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A cluster whose last point takes most of the frontier's nodes: with HiGHS's default
    # cut pool and 1,500 nodes a point of 3,000, its 10-migration point is 3.4 % above the
    # optimum; with the product's small pool and 2,000 of 4,000, at it.
    inst = random_cluster(135, Shape(nodes=(3, 6), vms=(10, 30)))
    result = plan_moves(inst.snapshot, inst.config)
    assert result.frontier is not None
    last = result.frontier.points[-1]
    assert last.migrations == 10
    problem = result.problem
    constraints = prepare_constraints(problem)
    start = State.initial(problem)
    units = np.flatnonzero(balance_movable(problem, constraints) & (start.unit_node >= 0))
    model = joint_model(problem, constraints, start, units, frozen_vms(constraints, problem.n_vms))
    monkeypatch.setattr(exact_module, "MAX_NODES", 50_000)
    best = model.lowest(problem.weights, last.migrations, max_nodes=50_000)
    assert best.status == "optimal"
    assert last.imbalance <= best.imbalance * 1.02


def test_a_target_the_frontier_reaches_is_reached_where_the_plans_program_stops_short(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The plan's own fewest-migrations program stopped at one node finds nothing; the
    # frontier's programs (their own node limits) find plans at or under the target.
    monkeypatch.setattr(exact_module, "MAX_NODES", 1)
    inst = random_cluster(187, Shape(nodes=(3, 6), vms=(10, 30)))
    result = plan_moves(inst.snapshot, inst.config)
    assert result.frontier is not None
    target = inst.config.balance.target
    first = next(p for p in result.frontier.points if p.imbalance <= target + EPSILON)
    assert result.target_reached
    assert result.migrations == first.migrations
    assert result.overall_after == pytest.approx(first.imbalance, abs=1e-9)


def searched(monkeypatch: pytest.MonkeyPatch, seed: int, heavy: bool) -> tuple[Any, ...]:
    """A small cluster's frontier by the search (exact mode off, as on large clusters), with
    the state it starts from (after forced moves), the units it may move, the rules and a
    scorer."""
    if heavy:
        base = Shape(nodes=(3, 5), vms=(10, 16), skew=0.8)
        inst = heavy_tailed_cluster(seed, HeavyShape(base=base))
    else:
        inst = random_cluster(seed, Shape(nodes=(3, 5), vms=(10, 16)))
    seen: dict[str, Any] = {}
    real = planner_module.search_frontier

    def spied(ctx: Any, start: Any, *args: Any) -> Any:
        seen.update(start=start.state, movable=ctx.movable, constraints=ctx.constraints)
        return real(ctx, start, *args)

    monkeypatch.setattr(planner_module, "search_frontier", spied)
    result = plan_moves(inst.snapshot, inst.config, exact=False)
    assert result.frontier is not None and seen
    return result, seen["start"], seen["movable"], seen["constraints"], Scorer(result.problem)


SEARCHED = [(seed, True) for seed in range(4)] + [(seed, False) for seed in (0, 3, 4)]


@pytest.mark.parametrize(("seed", "heavy"), SEARCHED)
def test_no_single_exchange_improves_a_point_of_the_searched_frontier(
    monkeypatch: pytest.MonkeyPatch, seed: int, heavy: bool
) -> None:
    result, start, movable, constraints, scorer = searched(monkeypatch, seed, heavy)
    points = result.frontier.points
    bounds = LowerBounds(result.problem, start, movable, points[-1].migrations)
    for point in points:
        plan = {m.unit: m.target for m in point.moves}
        room = point.migrations - start.migrations
        if point.imbalance * (1 - frontier_module.BOUND_GAP) <= bounds.at(room, -math.inf):
            continue  # within BOUND_GAP of the linear bound: left as the search found it
        for other, state in exchanges(result.problem, start, movable, plan, room):
            if scorer.view(state.node_load, 0.0).overall < point.imbalance - EPSILON:
                assert violations(constraints, state, final=True), (point.migrations, other)


@pytest.mark.parametrize(("seed", "heavy"), SEARCHED)
def test_a_point_of_the_searched_frontier_beats_the_longer_plans_less_a_move(
    monkeypatch: pytest.MonkeyPatch, seed: int, heavy: bool
) -> None:
    result, start, _, constraints, scorer = searched(monkeypatch, seed, heavy)
    points = result.frontier.points
    for point in points:
        for i in range(len(point.moves)):
            state = start.copy()
            for move in point.moves[:i] + point.moves[i + 1 :]:
                state.move_unit(result.problem, move.unit, move.target)
            at = next((p for p in points if p.migrations >= state.migrations), None)
            if at is None or violations(constraints, state, final=True):
                continue
            assert at.imbalance <= scorer.view(state.node_load, 0.0).overall + EPSILON


# Clusters of 70-120 VMs (past the exact program's limit) whose search stops short of the
# target; before the plan followed its searched frontier, each plan was worse than the
# frontier's point at its own number of migrations: seed 0 (6 migrations at 0.2405, the knee
# 4 at 0.2386), 2 (9 at 0.1745, the knee 10 at 0.1308), 3 (9 at 0.1572, the point for 9
# 0.1337, the knee 5 at 0.1909) and 7 (10 at 0.2168, the point for 10 0.1914, the knee 0).
PAST_EXACT = [0, 2, 3, 7]


def past_exact(seed: int) -> Any:
    """Even seeds heavy-tailed (skewed, whales, broken rules), odd seeds `random_cluster`."""
    if seed % 2 == 0:
        return heavy_tailed_cluster(
            seed, HeavyShape(base=Shape(nodes=(4, 8), vms=(70, 120), skew=0.8))
        )
    return random_cluster(seed, Shape(nodes=(4, 8), vms=(70, 120)))


@pytest.mark.parametrize("seed", PAST_EXACT)
def test_a_searched_plan_short_of_its_target_is_on_its_frontier(seed: int) -> None:
    """The plan is the frontier's point for its number of migrations, and no knee balances
    better: where the knee is lower in imbalance the plan is the knee (its extra migrations
    pay for their copy); where a knee of fewer migrations is higher, the plan keeps its
    moves, which each passed the gain threshold. Every step of it keeps every rule."""
    inst = past_exact(seed)
    result = plan_moves(inst.snapshot, inst.config)
    assert result.method == "heuristic" and result.triggered and not result.target_reached
    frontier = result.frontier
    assert frontier is not None
    point = frontier.at(result.migrations)
    assert point is not None
    assert result.overall_after == pytest.approx(point.imbalance, abs=1e-9)
    knee = frontier.at(frontier.knee)
    if knee is not None and knee.imbalance < result.overall_after - EPSILON:
        pytest.fail(f"the knee ({knee.migrations}) balances better than the plan")
    replay(inst.snapshot, inst.config, build_plan(inst.snapshot, inst.config, result))


def test_a_plan_reaching_its_target_takes_the_frontiers_fewer_migrations_that_reach_it() -> None:
    """Seed 22 of the plan-quality benchmark's clusters (bench/bench_engine_quality.py): the
    search and the plan's own fewest-migrations program, at its node limit, reach the target
    with 11 migrations; the frontier's program proves 8 reach it (0.0888), and the plan is
    those 8 (before: 11 at 0.0994)."""
    inst = random_cluster(
        22, Shape(balance={"min_gain": 0.0, "min_gain_per_gib": 0.0, "max_migrations": 40})
    )
    result = plan_moves(inst.snapshot, inst.config, exact=True)
    assert result.target_reached and result.method == "exact"
    frontier = result.frontier
    assert frontier is not None
    first = next(p for p in frontier.points if p.imbalance <= inst.config.balance.target + EPSILON)
    assert first.exact
    assert result.migrations == first.migrations == 8
    assert result.overall_after == pytest.approx(first.imbalance, abs=1e-9)
    replay(inst.snapshot, inst.config, build_plan(inst.snapshot, inst.config, result))
