"""The frontier's lower bound on large clusters (`recommender.engine.bound`): never above
the true optimum for k migrations, never below the per-node shedding bound it replaced."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devkit.instances import HeavyShape, Shape, heavy_tailed_cluster, random_cluster
from devkit.simulate import simulate_cluster
from recommender.config import Config
from recommender.engine.bound import LowerBounds, _whale_floor, lower_bound, per_resource_bounds
from recommender.engine.build import build_problem
from recommender.engine.candidates import SearchLimits
from recommender.engine.exact import available as exact_available
from recommender.engine.measure import cluster_mean
from recommender.engine.planner import balance_movable, plan_moves
from recommender.engine.problem import SPLIT, Problem, State
from recommender.engine.rules import RuleSettings, prepare_constraints, violations
from recommender.engine.rules.base import GroupRule
from recommender.engine.scorer import Scorer
from tests.test_engine import NIC, config, node, snapshot, vm

LARGE = HeavyShape(base=Shape(nodes=(20, 40), vms=(500, 2000), skew=0.8))


def per_node_shedding(problem: Problem, state: State, movable: np.ndarray, k: int) -> float:
    """The bound it replaced: every active node keeps its load minus its k largest movable
    unit loads (as if every node could shed k units at once)."""
    active = problem.active
    resources = np.flatnonzero(problem.weights > 0)
    load = state.node_load[np.ix_(active, resources)]
    capacity = problem.capacity[np.ix_(active, resources)]
    mean = cluster_mean(load, capacity)
    keep = np.array(load)
    for i, n in enumerate(np.flatnonzero(active)):
        units = np.flatnonzero((state.unit_node == n) & movable)
        if len(units):
            top = -np.sort(-problem.units.load[np.ix_(units, resources)], axis=0)[:k]
            keep[i] = np.maximum(load[i] - top.sum(axis=0), 0.0)
    util = np.where(capacity > 0, keep / np.where(capacity > 0, capacity, 1.0), 0.0)
    per = np.maximum(util.max(axis=0) - mean, 0.0)
    return float(per @ problem.weights[resources] / problem.weights.sum())


def lowest(problem: Problem, state: State, movable: np.ndarray, k: int) -> float:
    """The lowest overall imbalance of any end state within k VM migrations, rules
    ignored, by enumeration: movable units go whole to any active node, the VMs of a split
    movable unit one by one."""
    units = problem.units
    whole = [int(u) for u in np.flatnonzero(movable & (state.unit_node >= 0))]
    split = [
        int(v)
        for u in np.flatnonzero(movable & (state.unit_node == SPLIT))
        for v in units.members(int(u))
    ]
    nodes = [int(n) for n in np.flatnonzero(problem.active)]
    best = np.inf
    for where in itertools.product(nodes, repeat=len(whole) + len(split)):
        end = state.copy()
        for u, n in zip(whole, where, strict=False):
            end.move_unit(problem, u, n)
        for v, n in zip(split, where[len(whole) :], strict=True):
            end.move_vm(problem, v, n)
        if end.migrations - state.migrations <= k:
            best = min(best, problem.imbalance(end.node_load).overall)
    return best


def _tiny(seed: int, affinity: bool) -> Problem:
    inst = random_cluster(seed, Shape(nodes=(2, 3), vms=(3, 6), rules=False, skew=0.5))
    cfg = inst.config
    if affinity:
        names = [str(v) for v in inst.snapshot.vms.index[:2]]
        cfg = cfg.model_copy(
            update={"rules": RuleSettings(affinity=[GroupRule(name="pair", vms=names)])}
        )
    return build_problem(inst.snapshot, cfg)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000),
    k=st.integers(0, 4),
    affinity=st.booleans(),
    frozen=st.integers(0, 5),
)
def test_the_bound_is_at_most_the_optimum_and_at_least_the_old_bound(
    seed: int, k: int, affinity: bool, frozen: int
) -> None:
    problem = _tiny(seed, affinity)
    state = State.initial(problem)
    movable = np.ones(len(problem.units), dtype=bool)
    movable[frozen % len(movable)] = frozen == 0
    bound = lower_bound(problem, state, movable, k)
    assert bound <= lowest(problem, state, movable, k) + 1e-9
    # The old bound left split units' VMs where they were (it was no bound there).
    if not (movable & (state.unit_node == SPLIT)).any():
        assert bound >= per_node_shedding(problem, state, movable, k) - 1e-12


def _two_hot_nodes() -> Problem:
    """pve1 and pve2 each carry eight VMs of a tenth of a NIC, pve3 nothing."""
    vms = {f"{1 + n}{i:02d}": vm(f"pve{1 + n}", net=0.1 * NIC) for n in range(2) for i in range(8)}
    nodes = {"pve1": node(), "pve2": node(), "pve3": node()}
    return build_problem(snapshot(nodes, vms), config(weights={"network": 1.0}))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_every_node_cannot_shed_k_at_once(k: int) -> None:
    problem = _two_hot_nodes()
    state = State.initial(problem)
    movable = np.ones(len(problem.units), dtype=bool)
    truth = lowest_by_counting(k)
    old = per_node_shedding(problem, state, movable, k)
    new = lower_bound(problem, state, movable, k)
    assert old < truth - 0.05
    assert new == pytest.approx(truth, abs=1e-9)


def lowest_by_counting(k: int) -> float:
    """The optimum of `_two_hot_nodes` for k moves (to pve3, split as evenly as may be):
    the hotter of the two nodes keeps 8 - floor(k / 2) VMs, against a mean of 16 / 30."""
    return (8 - k // 2) / 10 - 16 / 30


def test_a_whale_is_hot_wherever_it_goes() -> None:
    """One VM alone fills most of a NIC: no number of moves brings the max below it."""
    vms = {"101": vm("pve1", net=0.9 * NIC), "102": vm("pve2", net=0.1 * NIC)}
    nodes = {"pve1": node(), "pve2": node(), "pve3": node()}
    problem = build_problem(snapshot(nodes, vms), config(weights={"network": 1.0}))
    state = State.initial(problem)
    movable = np.ones(len(problem.units), dtype=bool)
    assert lower_bound(problem, state, movable, 5) == pytest.approx(0.9 - 1 / 3, abs=1e-9)
    assert per_node_shedding(problem, state, movable, 5) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.skipif(not exact_available(), reason="needs highspy")
def test_one_budget_serves_every_resource() -> None:
    """pve1 carries four VMs of a fifth of a NIC in network and four of a fifth in disk:
    two migrations relieve the two resources by two fifths together, not each."""
    vms = {f"10{i}": vm("pve1", net=0.2 * NIC) for i in range(4)}
    vms |= {f"20{i}": vm("pve1", disk=0.2 * NIC) for i in range(4)}
    nodes = {"pve1": node(), "pve2": node(), "pve3": node()}
    weights = {"network": 1.0, "disk_bytes": 1.0}
    problem = build_problem(snapshot(nodes, vms), config(weights=weights))
    state = State.initial(problem)
    movable = np.ones(len(problem.units), dtype=bool)
    apart = per_resource_bounds(problem, state, movable, 2)
    resources = np.flatnonzero(problem.weights > 0)
    assert float(apart @ problem.weights[resources]) / 2 == pytest.approx(0.4 - 0.8 / 3)
    truth = lowest(problem, state, movable, 2)
    assert truth == pytest.approx(0.6 - 0.8 / 3)
    assert lower_bound(problem, state, movable, 2) == pytest.approx(truth, abs=1e-6)


@pytest.mark.skipif(not exact_available(), reason="needs highspy")
def test_the_large_frontier_has_the_best_single_move() -> None:
    """On a large heavy-tailed cluster, the point one migration past the forced moves is no
    worse than the best single move that keeps every rule (found by scoring them all)."""
    inst = heavy_tailed_cluster(10_001, LARGE)
    result = plan_moves(inst.snapshot, inst.config)
    assert result.frontier is not None
    problem = result.problem
    first = result.frontier.points[0]
    start = State.initial(problem)
    for move in first.moves:
        start.move_unit(problem, move.unit, move.target)
    nxt = result.frontier.at(first.migrations + 1)
    assert nxt is not None
    constraints = prepare_constraints(problem)
    movable = balance_movable(problem, constraints)
    movable[[m.unit for m in first.moves]] = False
    scorer = Scorer(problem)
    units = np.flatnonzero(movable & (start.unit_node >= 0) & (problem.units.size == 1))
    unit = np.repeat(units, len(scorer.active))
    target = np.tile(scorer.active, len(units))
    keep = start.unit_node[unit] != target
    unit, target = unit[keep], target[keep]
    view = scorer.view(start.node_load, 0.0)
    overall, _, _ = scorer.evaluate(view, problem.units.load[unit], start.unit_node[unit], target)
    for i in np.argsort(overall, kind="stable"):
        end = start.copy()
        end.move_unit(problem, int(unit[i]), int(target[i]))
        if not violations(constraints, end, final=True):
            assert nxt.imbalance <= float(overall[i]) + 1e-9
            return
    raise AssertionError("no single move keeps every rule")


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(0, 100), min_size=1, max_size=6),
    st.lists(st.floats(0, 50), min_size=1, max_size=12),
    st.integers(0, 2**32 - 1),
)
def test_the_whale_floor_is_the_heaviest_things_least_landing(
    fixed: list[float], loads: list[float], seed: int
) -> None:
    """The floor read from the heaviest thing alone is its definition: the largest, over
    every thing that lands whole, of the least utilisation of a node holding it (a node
    without capacity counts as 0)."""
    rng = np.random.default_rng(seed)
    capacity = rng.choice([0.0, 1.0, 4.0, 32.0], size=len(fixed))
    things = np.array(loads)
    node = rng.integers(0, len(fixed), size=len(things))
    utilisation = [
        min((f + load) / c if c > 0 else 0.0 for f, c in zip(fixed, capacity, strict=True))
        for load in things
    ]
    found = _whale_floor(np.array(fixed), capacity, node, things)
    assert found == pytest.approx(max(utilisation), rel=1e-12, abs=1e-12)


@pytest.mark.skipif(not exact_available(), reason="needs highspy")
def test_whole_pieces_tighten_the_bound_where_a_fraction_would_stop_at_the_floor() -> None:
    """pve1 carries a NIC whale (a), a small NIC VM, a disk whale (b) and a small disk VM.
    No move brings either resource under its whale (0.5), so one migration buys 0.1 of one
    resource at most: 0.35. The linear program sends a fifth of each whale away instead and
    reaches both floors (0.30); with whole pieces the bound is the optimum."""
    vms = {
        "a": vm("pve1", net=0.5 * NIC),
        "a2": vm("pve1", net=0.1 * NIC),
        "b": vm("pve1", disk=0.5 * NIC),
        "b2": vm("pve1", disk=0.1 * NIC),
    }
    nodes = {"pve1": node(), "pve2": node(), "pve3": node()}
    problem = build_problem(snapshot(nodes, vms), config(weights={"network": 1, "disk_bytes": 1}))
    state = State.initial(problem)
    movable = np.ones(len(problem.units), dtype=bool)
    truth = lowest(problem, state, movable, 1)
    assert truth == pytest.approx(0.35, abs=1e-6)
    assert lower_bound(problem, state, movable, 1, enough=0.0) == pytest.approx(0.30, abs=1e-6)
    assert lower_bound(problem, state, movable, 1) == pytest.approx(truth, abs=1e-6)
    # The largest clusters' frontier asks for the linear program's bound alone.
    linear = LowerBounds(problem, state, movable, 1, whole_pieces=False)
    assert linear.at(1) == pytest.approx(0.30, abs=1e-6)
    assert LowerBounds(problem, state, movable, 1).at(1) == pytest.approx(truth, abs=1e-6)


def test_the_largest_clusters_search_and_bound_their_frontier_with_less() -> None:
    """Above 3,000 movable units the frontier's points stay as the search found them and
    its bound is the linear program's: both cost more than the plan itself there."""
    small = SearchLimits.for_size(1_000, 20)
    largest = SearchLimits.for_size(10_000, 200)
    assert small.frontier_passes > 0 and small.whole_piece_bound
    assert largest.frontier_passes == 0 and not largest.whole_piece_bound


@pytest.mark.skipif(not exact_available(), reason="needs highspy")
def test_the_large_frontier_is_no_worse_than_the_plans_own_first_moves() -> None:
    """Every point of a fleet-sized cluster's frontier is at most what the chosen plan's
    first moves reach with as many migrations (the beam keeps few plans a level; on this
    cluster it kept worse ones for 8 and 9 migrations than the plan's first 8 and 9)."""
    simulated = simulate_cluster(
        1002, nodes=32, vms=1280, duration=14_400.0, step=60.0, end=1.8e9, migrations=25
    )
    result = plan_moves(simulated.truth_snapshot(), Config())
    assert result.frontier is not None
    problem = result.problem
    scorer = Scorer(problem)
    state = State.initial(problem)
    checked = 0
    for move in result.unit_moves:
        state.move_unit(problem, move.unit, move.target)
        point = result.frontier.at(state.migrations)
        if point is not None:
            assert point.imbalance <= scorer.view(state.node_load, 0.0).overall + 1e-9
            checked += 1
    assert checked >= 3
