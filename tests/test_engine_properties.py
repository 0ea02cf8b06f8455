"""Properties of every plan, over random clusters with random rules (hypothesis).

Each plan is replayed wave by wave: with a wave's migrations all in flight (a VM counted on
both nodes) and after every single migration, no hard rule may break.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devkit.instances import Instance, Shape, random_cluster
from recommender.engine.build import build_problem
from recommender.engine.exact import available as exact_available
from recommender.engine.planner import plan_moves
from recommender.engine.problem import Problem, State
from recommender.engine.result import EngineResult
from recommender.engine.rules import prepare_constraints, violations
from recommender.engine.rules.base import GroupRule
from recommender.plan import Plan, build_plan

EPS = 1e-9


@st.composite
def instances(draw: st.DrawFn) -> Instance:
    trigger = draw(st.sampled_from([0.1, 0.2, 0.3]))
    balance = {
        "trigger": trigger,
        "target": trigger / draw(st.sampled_from([1.0, 2.0, 3.0])),
        "max_migrations": draw(st.integers(0, 12)),
        "max_parallel_per_node": draw(st.integers(1, 3)),
        "min_gain": draw(st.sampled_from([0.0, 0.005])),
        "min_gain_per_gib": draw(st.sampled_from([0.0, 0.002])),
        "memory_mode": draw(st.sampled_from(["assigned", "used"])),
    }
    shape = Shape(
        nodes=(3, 6),
        vms=(6, 24),
        rules=True,
        maintenance=draw(st.sampled_from([0.0, 0.0, 1.0])),
        cooldown=draw(st.sampled_from([0.0, 0.15])),
        burst=draw(st.sampled_from([0.0, 0.1])),
        missing=draw(st.sampled_from([0.0, 0.0, 0.08])),
        skew=draw(st.sampled_from([0.5, 2.0])),
        balance=balance,
    )
    inst = random_cluster(draw(st.integers(0, 2**31 - 1)), shape)
    if draw(st.booleans()):
        inst = _break_rules(inst, draw(st.integers(0, 2**31 - 1)))
    return inst


def _break_rules(inst: Instance, seed: int) -> Instance:
    """Add rules the placement breaks: a pin elsewhere, an anti-affinity pair sharing a
    node, a split affinity pair."""
    rng = np.random.default_rng(seed)
    vms = inst.snapshot.vms
    nodes = list(inst.snapshot.nodes.index)
    rules = inst.config.rules
    used = set(rules.pin) | set(rules.exclude)
    for group in (*rules.affinity, *rules.anti_affinity):
        used |= set(group.vms)
    free = [v for v in vms.index if v not in used]
    rng.shuffle(free)
    pin = dict(rules.pin)
    anti = list(rules.anti_affinity)
    affinity = list(rules.affinity)
    if free:
        vm = free.pop()
        pin[vm] = str(rng.choice([n for n in nodes if n != vms.loc[vm, "node"]]))
    by_node: dict[str, list[str]] = {}
    for vm in free:
        by_node.setdefault(vms.loc[vm, "node"], []).append(vm)
    crowded = [members for members in by_node.values() if len(members) >= 2]
    if crowded:
        pair = crowded[0][:2]
        anti.append(GroupRule(name="clash", vms=pair))
        free = [v for v in free if v not in pair]
    apart = [v for v in free if vms.loc[v, "node"] != vms.loc[free[0], "node"]] if free else []
    if apart:
        affinity.append(GroupRule(name="apart", vms=[free[0], apart[0]]))
    new_rules = rules.model_copy(update={"pin": pin, "anti_affinity": anti, "affinity": affinity})
    return Instance(inst.snapshot, inst.config.model_copy(update={"rules": new_rules}), inst.seed)


def _replay(inst: Instance, plan: Plan) -> State:
    problem = build_problem(inst.snapshot, inst.config)
    constraints = prepare_constraints(problem)
    state = State.initial(problem)
    vm_pos, node_pos = problem.vm_index(), problem.node_index()
    for wave in plan.waves:
        touched: dict[str, int] = {}
        flight = state.copy()
        for m in wave:
            touched[m.source] = touched.get(m.source, 0) + 1
            touched[m.target] = touched.get(m.target, 0) + 1
            flight.add_presence(problem, vm_pos[m.vm], node_pos[m.target])
        assert max(touched.values()) <= problem.balance.max_parallel_per_node
        assert violations(constraints, flight, final=False) == []
        for m in wave:
            assert problem.nodes[state.vm_node[vm_pos[m.vm]]] == m.source
            state.move_vm(problem, vm_pos[m.vm], node_pos[m.target])
            assert violations(constraints, state, final=False) == []
    assert violations(constraints, state, final=True) == []
    return state


@dataclass(frozen=True)
class _Outcome:
    """Where every VM started and ended, as names."""

    start: pd.Series
    final: pd.Series
    moved: set[str]
    kinds: dict[str, str]  # kind of the migrations, by VM


def _check(inst: Instance, result: EngineResult, plan: Plan) -> None:
    end = _replay(inst, plan)
    problem = result.problem
    final = pd.Series([problem.nodes[n] for n in end.vm_node], index=list(problem.vms))
    start = inst.snapshot.vms["node"]
    moved = set(final.index[final != start.reindex(final.index)])
    outcome = _Outcome(start, final, moved, {m.vm: m.kind for m in plan.migrations})
    balance = inst.config.balance
    kinds = outcome.kinds

    assert plan.unsequenced == []
    assert len(plan.migrations) <= balance.max_migrations
    assert abs(plan.overall_after - result.overall_after) < EPS
    if not any(k != "balance" for k in kinds.values()):
        assert result.overall_after <= result.overall_before + EPS
    if not result.triggered:
        assert all(k != "balance" for k in kinds.values())
    _check_frozen(inst, problem, outcome)
    _check_groups(inst, result, outcome)
    # Maintenance: nodes end empty, or what stays is reported.
    reported = {u.vm for u in plan.unplaceable}
    unknown = set(problem.vms[v] for v in np.flatnonzero(~problem.known))
    nodes = inst.snapshot.nodes
    down = set(nodes.index[nodes["maintenance"]]) | set(inst.config.rules.maintenance)
    for vm in final.index[final.isin(down)]:
        assert vm in reported or vm in unknown


def _check_frozen(inst: Instance, problem: Problem, outcome: _Outcome) -> None:
    """Never moved: excluded, unknown load; cooldown and bursting VMs only when forced; a
    pinned VM that moved ends inside its pin."""
    balance, rules = inst.config.balance, inst.config.rules
    vms = inst.snapshot.vms
    assert not outcome.moved & set(rules.exclude)
    assert not outcome.moved & set(vms.index[~problem.known])
    now = inst.snapshot.taken_at.timestamp()
    cooling = set(vms.index[(now - vms["last_migration"]) < balance.cooldown_seconds])
    bursting = set(vms.index[vms["burst_ratio"] >= balance.burst_ratio])
    for vm in outcome.moved & (cooling | bursting):
        assert outcome.kinds[vm] != "balance"
    for vm, where in rules.pin.items():
        if vm in outcome.moved:
            assert outcome.final[vm] in rules.node_groups.get(where, [where])


def _check_groups(inst: Instance, result: EngineResult, outcome: _Outcome) -> None:
    """Affinity: groups that were together stay together; split groups come together or
    warn. Anti-affinity: no node gains a second member of a group."""
    problem, start, final = result.problem, outcome.start, outcome.final
    for unit, name in problem.units.names.items():
        members = [problem.vms[v] for v in problem.units.members(unit)]
        if start[members].nunique() == 1:
            assert final[members].nunique() == 1
        elif final[members].nunique() > 1:
            told = " ".join(result.warnings) + " ".join(u.reason for u in result.unplaceable)
            assert name in told
    for group in inst.config.rules.anti_affinity:
        present = [v for v in group.vms if v in final.index]
        before = start[present].value_counts()
        after = final[present].value_counts()
        for node, count in after.items():
            assert count <= max(1, before.get(node, 0))


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(instances())
def test_every_plan_keeps_every_rule_at_every_step(inst: Instance) -> None:
    result = plan_moves(inst.snapshot, inst.config, exact=False)
    plan = build_plan(inst.snapshot, inst.config, result)
    _check(inst, result, plan)


@pytest.mark.skipif(not exact_available(), reason="highspy not installed")
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instances())
def test_exact_plans_keep_every_rule_too(inst: Instance) -> None:
    result = plan_moves(inst.snapshot, inst.config, exact=True)
    plan = build_plan(inst.snapshot, inst.config, result)
    _check(inst, result, plan)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**31 - 1))
def test_under_the_trigger_nothing_moves(seed: int) -> None:
    inst = random_cluster(seed, Shape(nodes=(3, 6), vms=(6, 24), rules=True))
    problem = build_problem(inst.snapshot, inst.config)
    before = problem.imbalance(State.initial(problem).node_load).overall
    settings_ = inst.config.balance.model_copy(
        update={"trigger": min(1.0, before + 0.01), "target": min(1.0, before)}
    )
    quiet = inst.config.model_copy(update={"balance": settings_})
    result = plan_moves(inst.snapshot, quiet, exact=False)
    assert not result.triggered
    assert result.moves == []
