"""A rule is a plugin: one class with its own settings, registered in `RULES`, and honoured by
every stage — the search, the exact program, the sequencing and the config."""

from __future__ import annotations

from typing import Self

import numpy as np
import pytest
from pydantic import Field, ValidationError
from test_engine import config, hot_nic_cluster

from recommender.engine import rules
from recommender.engine.build import build_problem
from recommender.engine.exact import available as exact_available
from recommender.engine.exact import solve_exact
from recommender.engine.planner import balance_movable, plan_moves
from recommender.engine.problem import Problem, State
from recommender.engine.rules.base import (
    Constraint,
    Movers,
    Names,
    RulesPart,
    Violation,
    compose_settings,
)
from recommender.plan import build_plan

MODES = [
    pytest.param(False, id="heuristic"),
    pytest.param(
        True,
        id="exact",
        marks=pytest.mark.skipif(not exact_available(), reason="highspy not installed"),
    ),
]


class KeepOffSettings(RulesPart):
    # Nodes that receive no VM (their own VMs may stay).
    keep_off: Names = Field(default_factory=list)


class KeepOff(Constraint):
    """A rule the product does not have: some nodes receive nothing."""

    name = "keep_off"
    settings = KeepOffSettings

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem)
        names = set(KeepOffSettings.of(problem.rules).keep_off)
        self.closed = np.array([n in names for n in problem.nodes], dtype=bool)

    @classmethod
    def prepare(cls, problem: Problem) -> Self | None:
        return cls(problem) if KeepOffSettings.of(problem.rules).keep_off else None

    def allowed_targets(self, state: State, movers: Movers) -> np.ndarray:
        return np.repeat(~self.closed[None, :], len(movers), axis=0)

    def check(self, state: State, *, final: bool = False) -> list[Violation]:
        moved = self.moved_vms(state)
        onto = moved[self.closed[state.vm_node[moved]]]
        return [Violation(self.name, self.problem.vms[v], "moved onto a closed node") for v in onto]


@pytest.fixture
def registered(monkeypatch: pytest.MonkeyPatch) -> type[RulesPart]:
    """KeepOff registered after the product's rules; the `rules:` section that goes with it."""
    monkeypatch.setattr(rules, "RULES", (*rules.RULES, KeepOff))
    return compose_settings(rules.RULES)


def test_the_settings_of_a_registered_rule_join_the_rules_section(
    registered: type[RulesPart],
) -> None:
    section = registered.model_validate({"keep_off": ["pve2", 7], "exclude": ["101"]})
    assert KeepOffSettings.of(section).keep_off == ["pve2", "7"]
    assert list(registered.model_fields)[-1] == "keep_off"
    with pytest.raises(ValidationError, match="keep_of"):
        registered.model_validate({"keep_of": ["pve2"]})
    assert "keep_off" not in rules.RuleSettings.model_fields


@pytest.mark.parametrize("exact", MODES)
def test_the_engine_honours_a_registered_rule(registered: type[RulesPart], exact: bool) -> None:
    snap = hot_nic_cluster()
    cfg = config(min_gain_per_gib=0.0).model_copy(update={"rules": registered()})
    free = plan_moves(snap, cfg, exact=exact)
    assert "pve2" in {m.target for m in free.moves}

    closed = cfg.model_copy(update={"rules": registered(keep_off=["pve2"])})
    result = plan_moves(snap, closed, exact=exact)
    assert result.moves
    assert "pve2" not in {m.target for m in result.moves}
    assert result.overall_after < result.overall_before
    assert any(isinstance(c, KeepOff) for c in rules.prepare_constraints(result.problem))
    plan = build_plan(snap, closed, result)
    assert [(m.vm, m.target) for m in plan.migrations] == [(m.vm, m.target) for m in result.moves]
    assert plan.settings["rules"]["keep_off"] == ["pve2"]  # type: ignore[index]
    assert plan.settings["rule_counts"]["keep_off"] == 1  # type: ignore[index]


@pytest.mark.skipif(not exact_available(), reason="highspy not installed")
def test_the_exact_program_takes_the_rows_of_a_registered_rule(
    registered: type[RulesPart],
) -> None:
    snap = hot_nic_cluster()
    targets = {}
    for closed in ([], ["pve2"]):
        cfg = config(min_gain_per_gib=0.0).model_copy(update={"rules": registered(keep_off=closed)})
        problem = build_problem(snap, cfg)
        constraints = rules.prepare_constraints(problem)
        start = State.initial(problem)
        units = np.flatnonzero(balance_movable(problem, constraints) & (start.unit_node >= 0))
        found = solve_exact(problem, constraints, start, units, problem.balance.target)
        assert found.status == "optimal" and found.moves
        targets[tuple(closed)] = {problem.nodes[m.target] for m in found.moves}
    assert "pve2" in targets[()]
    assert "pve2" not in targets[("pve2",)]


def test_a_node_a_registered_rule_closes_is_named_when_nothing_fits(
    registered: type[RulesPart],
) -> None:
    # pve3 is evacuated; with pve1 and pve2 closed, its VM has nowhere to go.
    snap = hot_nic_cluster()
    cfg = config()
    nodes = snap.nodes.copy()
    nodes.loc["pve3", "maintenance"] = True
    closed = cfg.model_copy(update={"rules": registered(keep_off=["pve1", "pve2"])})
    result = plan_moves(type(snap)(nodes, snap.vms, taken_at=snap.taken_at), closed)
    reasons = {u.vm: u.reason for u in result.unplaceable}
    assert "keep_off (pve1, pve2)" in reasons["106"]
