"""The exact program at its node limit: a plan it has not found is not reported as reached."""

from __future__ import annotations

import numpy as np
import pytest

from devkit.instances import Shape, random_cluster
from recommender import exact
from recommender.engine import balance_movable, measure_state
from recommender.problem import State, build_problem
from recommender.rules import prepare_constraints

pytestmark = pytest.mark.skipif(not exact.available(), reason="highspy not installed")


def test_program_stopped_before_any_plan_claims_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    # A seeded cluster whose program needs many nodes to find any plan reaching 0.10; at one
    # node HiGHS stops with values that are no feasible plan.
    monkeypatch.setattr(exact, "MAX_NODES", 1)
    inst = random_cluster(
        56, Shape(balance={"min_gain": 0.0, "min_gain_per_gib": 0.0, "max_migrations": 40})
    )
    problem = build_problem(inst.snapshot, inst.config)
    constraints = prepare_constraints(problem)
    start = State.initial(problem)
    units = np.flatnonzero(balance_movable(problem, constraints) & (start.unit_node >= 0))
    target = inst.config.balance.target
    result = exact.solve_exact(problem, constraints, start, units, target)
    assert measure_state(problem, start.node_load)[1] > target
    if result.reached:  # only with a plan that does reach it
        assert result.moves
        end = start.copy()
        for move in result.moves:
            end.move_unit(problem, move.unit, move.target)
        assert measure_state(problem, end.node_load)[1] <= target + 1e-6
    else:
        assert result.status in ("limit", "infeasible") and not result.moves
