"""The exact program at its node limit: a plan it has not found is not reported as reached."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from devkit.instances import Shape, random_cluster
from recommender.engine import exact
from recommender.engine.build import build_problem
from recommender.engine.planner import balance_movable
from recommender.engine.problem import State
from recommender.engine.rules import prepare_constraints
from recommender.errors import CommandError
from tests.conftest import REPO

EXAMPLE = REPO / "recommender" / "examples" / "snapshot.json"

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


def test_every_option_the_programs_set_is_one_the_installed_highs_knows() -> None:
    # An option HiGHS does not know is refused with a status, not an exception: the program
    # would run with other limits and heuristics than the ones the benchmarks measured.
    exact.lp_solver()
    exact._solver()
    with pytest.raises(CommandError, match=r"mip_no_such_option=1: exact plans need highspy 1\.13"):
        exact.set_option(exact._solver(), "mip_no_such_option", 1)


# A HiGHS release older than the one pyproject.toml asks for: it refuses an option the
# program sets (as highspy 1.7-1.12 do mip_allow_cut_separation_at_nodes).
OLD_HIGHS = """
import sys, highspy
kept = highspy.Highs.setOptionValue
def refusing(self, name, value):
    if name == "mip_allow_cut_separation_at_nodes":
        return highspy.HighsStatus.kError
    return kept(self, name, value)
highspy.Highs.setOptionValue = refusing
from recommender.cli import main
sys.argv = ["vmbalance", *sys.argv[1:]]
sys.exit(main())
"""


def test_an_older_highs_is_one_line_naming_the_release_needed() -> None:
    result = subprocess.run(
        [sys.executable, "-c", OLD_HIGHS, "plan", "--input", str(EXAMPLE), "--output", "json"],
        capture_output=True, text=True, timeout=120, cwd=REPO, check=False,
    )  # fmt: skip
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "vmbalance: the installed highspy refuses the HiGHS option "
        "mip_allow_cut_separation_at_nodes=False: exact plans need highspy 1.13 or newer"
    ]
