"""The exact program at its node limit: a plan it has not found is not reported as reached."""

from __future__ import annotations

import numpy as np
import pytest

from devkit.instances import Shape, random_cluster
from recommender.engine import exact
from recommender.engine.build import build_problem
from recommender.engine.planner import balance_movable
from recommender.engine.problem import State
from recommender.engine.rules import prepare_constraints

pytestmark = pytest.mark.skipif(not exact.available(), reason="highspy not installed")


def test_program_stopped_before_any_plan_claims_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    # A seeded cluster whose program needs many nodes to find any plan reaching 0.10; at one
    # node HiGHS stops with values that are no feasible plan.
    inst = random_cluster(
        56, Shape(balance={"min_gain": 0.0, "min_gain_per_gib": 0.0, "max_migrations": 40})
    )
    problem = build_problem(inst.snapshot, inst.config)
    constraints = prepare_constraints(problem)
    start = State.initial(problem)
    units = np.flatnonzero(balance_movable(problem, constraints) & (start.unit_node >= 0))
    target = inst.config.balance.target
    assert problem.imbalance(start.node_load).overall > target

    # With its usual node limit the program does find a plan, and that plan reaches 0.10.
    found = exact.solve_exact(problem, constraints, start, units, target)
    assert found.reached and found.moves
    end = start.copy()
    for move in found.moves:
        end.move_unit(problem, move.unit, move.target)
    assert problem.imbalance(end.node_load).overall <= target + 1e-6

    monkeypatch.setattr(exact, "MAX_NODES", 1)
    stopped = exact.solve_exact(problem, constraints, start, units, target)
    assert stopped.status == "limit"
    assert not stopped.reached and stopped.moves == ()
