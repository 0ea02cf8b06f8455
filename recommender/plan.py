"""The executable plan: migrations in an order where every intermediate state keeps every hard
rule, grouped into waves that may run in parallel.

Ordering (`recommender.engine.ordering`): a migration whose target lacks room waits until a
migration off that target has run; a cycle (full nodes swapping VMs) is broken by a detour
through a third node with room, or the migrations involved are reported as unsequenced.

Waves: each migration goes into the earliest wave (looking a few waves back) such that no node
is touched (as source or target) by more than `max_parallel_per_node` migrations of the wave,
and every wave is feasible while all its migrations run at once — conservatively, a VM in
flight counts on both its source and its target (memory, CPU, anti-affinity).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

from recommender.engine.measure import reaches
from recommender.engine.ordering import Request, Step, order_moves
from recommender.engine.planner import plan_moves
from recommender.engine.problem import Problem, State
from recommender.engine.result import (
    EngineResult,
    Frontier,
    HeldBack,
    Method,
    Move,
    MoveKind,
    Unplaceable,
)
from recommender.engine.rules import Constraint, prepare_constraints, violations
from recommender.engine.rules.migratable import immovable_on_busy_nodes
from recommender.model import PRESSURE_COLUMNS, Snapshot, clusters_of, utilisation
from recommender.pressure import PressuredNode, pressure_kinds, pressured_nodes

if TYPE_CHECKING:
    from recommender.config import Config

WAVE_LOOKBACK = 6

# Why a migration is in the plan: to balance, to empty a node in maintenance, to repair a
# broken rule (the engine's kinds), or as a step through a third node to break a cycle.
MigrationKind = MoveKind | Literal["detour"]
# How the moves were found: none (nothing to do), the heuristic search, or the exact solver.
PlanMethod = Method


@dataclass(frozen=True)
class Migration:
    """One migration of the plan, in execution order."""

    step: int  # 1-based position in the sequence
    wave: int  # 1-based wave; migrations of one wave may run at once
    vm: str
    name: str
    source: str
    target: str
    gain: float
    reason: str
    memory_bytes: float
    kind: MigrationKind
    group: str | None = None
    copy_bytes: float = 0.0  # estimated bytes transferred (memory pre-copy + local disks)
    duration_seconds: float = 0.0  # estimated, at migration.bandwidth_bytes_per_second
    local_disk_bytes: float = 0.0  # local disks copied along (0: shared storage only)
    ha_managed: bool = False


def wave_duration(wave: Sequence[Migration]) -> float:
    """Estimated duration of a wave whose migrations run at once: a node's link is shared by
    the migrations touching it, so the wave lasts as long as its busiest node's migrations
    take one after the other (with one migration per node: its longest migration)."""
    per_node: dict[str, float] = {}
    for migration in wave:
        for node in (migration.source, migration.target):
            per_node[node] = per_node.get(node, 0.0) + migration.duration_seconds
    return float(max(per_node.values(), default=0.0))


@dataclass
class Plan:
    migrations: list[Migration]
    waves: list[list[Migration]]
    nodes_before: pd.DataFrame
    nodes_after: pd.DataFrame
    imbalance_before: dict[str, float]
    imbalance_after: dict[str, float]
    overall_before: float
    overall_after: float
    triggered: bool
    target_reached: bool
    unplaceable: list[Unplaceable]
    held_back: list[HeldBack]
    unsequenced: list[Move]
    warnings: list[str]
    settings: dict[str, object]
    method: PlanMethod
    taken_at: datetime | None = None
    resources: tuple[str, ...] = field(default=())
    # How the loads were estimated: the snapshot's window and estimator.
    window: str | None = None
    estimator: str | None = None
    # VMs the hypervisor would not live-migrate, on the nodes balancing takes VMs from.
    immovable: list[Unplaceable] = field(default_factory=list)
    frontier: Frontier | None = None  # what k migrations could reach (engine.frontier)
    # Nodes over `host.pressure_trigger` (they made this run plan), and every node's pressure
    # stall share per PSI kind read (node x kind; no columns when the snapshot has none).
    pressured: list[PressuredNode] = field(default_factory=list)
    pressure: dict[str, dict[str, float]] = field(default_factory=dict)
    # The cluster the plan is for: the one its nodes name ("" where the data names none).
    cluster: str = ""

    @property
    def pressure_kinds(self) -> list[str]:
        """The PSI kinds the snapshot held (none: no pressure column in any output)."""
        return list(next(iter(self.pressure.values()), {}))

    @property
    def memory_bytes(self) -> float:
        return float(sum(m.memory_bytes for m in self.migrations))

    @property
    def copy_bytes(self) -> float:
        return float(sum(m.copy_bytes for m in self.migrations))

    @property
    def wave_durations(self) -> list[float]:
        return [wave_duration(wave) for wave in self.waves]

    @property
    def duration_seconds(self) -> float:
        """Estimated duration of the whole plan, wave after wave."""
        return float(sum(self.wave_durations))


def build_plan(snapshot: Snapshot, config: Config, result: EngineResult | None = None) -> Plan:
    """Sequence the engine's moves (planning them first when `result` is None)."""
    pressured = pressured_nodes(snapshot.nodes, config.host.pressure_trigger)
    if result is None:
        result = plan_moves(snapshot, _relieving(config) if pressured else config)
    problem = result.problem
    constraints = prepare_constraints(problem)
    start = State.initial(problem)
    vm_pos = problem.vm_index()
    node_pos = problem.node_index()
    moves = _merged(result.moves)
    requests = [Request(np.array([vm_pos[m.vm]]), node_pos[m.target]) for m in moves]
    ordering = order_moves(problem, constraints, start, requests, detours=True)
    warnings = list(result.warnings)
    unsequenced = [moves[i] for i in ordering.stuck]
    if unsequenced:
        warnings.append(
            f"{len(unsequenced)} migration(s) could not be ordered without breaking a rule "
            "and were left out: " + ", ".join(m.vm for m in unsequenced)
        )
    if ordering.detours:
        warnings.append(
            f"{len(ordering.detours)} migration(s) go through a third node to break a cycle"
        )
    waves = assign_waves(problem, constraints, start, ordering.steps)
    migrations = _migrations(problem, start, moves, ordering.steps, waves)
    # Run wave by wave: any order inside a wave is feasible, since each wave is feasible with
    # all its migrations in flight at once.
    migrations = [
        replace(m, step=i + 1)
        for i, m in enumerate(sorted(migrations, key=lambda m: (m.wave, m.step)))
    ]
    by_wave: list[list[Migration]] = [[] for _ in range(max(waves, default=0))]
    for migration in migrations:
        by_wave[migration.wave - 1].append(migration)
    before = problem.imbalance(start.node_load)
    after = problem.imbalance(ordering.state.node_load)
    return Plan(
        migrations=migrations,
        waves=by_wave,
        nodes_before=node_frame(problem, start),
        nodes_after=node_frame(problem, ordering.state),
        imbalance_before=before.per_resource,
        imbalance_after=after.per_resource,
        overall_before=before.overall,
        overall_after=after.overall,
        triggered=result.triggered,
        target_reached=reaches(after.overall, config.balance.target),
        unplaceable=list(result.unplaceable),
        held_back=list(result.held_back),
        unsequenced=unsequenced,
        warnings=warnings,
        settings=_settings(config, problem.rule_types),
        method=result.method,
        taken_at=snapshot.taken_at,
        resources=problem.resources,
        window=snapshot.window,
        estimator=snapshot.estimator,
        immovable=_immovable(problem),
        frontier=result.frontier,
        pressured=pressured,
        pressure=_node_pressure(snapshot),
        cluster=_cluster_of(snapshot),
    )


def _cluster_of(snapshot: Snapshot) -> str:
    clusters = clusters_of(snapshot.nodes)
    return clusters[0] if len(clusters) == 1 else ""


def _relieving(config: Config) -> Config:
    """The config a run over a pressure trigger plans with: triggered whatever the imbalance,
    and balancing as far as its moves pay (`min_gain`), not only down to the target."""
    balance = config.balance.model_copy(update={"trigger": 0.0, "target": 0.0})
    return config.model_copy(update={"balance": balance})


def _node_pressure(snapshot: Snapshot) -> dict[str, dict[str, float]]:
    kinds = pressure_kinds(snapshot.nodes)
    if not kinds:
        return {}
    columns = {kind: snapshot.nodes[PRESSURE_COLUMNS[kind]].to_numpy(float) for kind in kinds}
    return {
        str(node): {kind: float(columns[kind][i]) for kind in kinds}
        for i, node in enumerate(snapshot.nodes.index)
    }


def _immovable(problem: Problem) -> list[Unplaceable]:
    return [
        Unplaceable(
            problem.vms[vm], problem.vm_display[vm], problem.nodes[problem.vm_node[vm]], reason
        )
        for vm, reason in immovable_on_busy_nodes(problem)
    ]


def _merged(moves: list[Move]) -> list[Move]:
    """One move per VM: a VM listed twice goes from its first source to its last target."""
    first: dict[str, int] = {}
    out: list[Move] = []
    for move in moves:
        if move.vm in first:
            i = first[move.vm]
            out[i] = replace(move, source=out[i].source)
        else:
            first[move.vm] = len(out)
            out.append(move)
    return [m for m in out if m.source != m.target]


def _migrations(
    problem: Problem,
    start: State,
    moves: list[Move],
    steps: list[Step],
    waves: list[int],
) -> list[Migration]:
    position = start.vm_node.copy()
    out = []
    for number, (step, wave) in enumerate(zip(steps, waves, strict=True), start=1):
        move = moves[step.origin]
        vm = int(step.vms[0])
        source, target = int(position[vm]), step.target
        position[vm] = target
        final = problem.nodes[target] == move.target
        out.append(
            Migration(
                step=number,
                wave=wave,
                vm=move.vm,
                name=move.name,
                source=problem.nodes[source],
                target=problem.nodes[target],
                gain=move.gain if final else 0.0,
                reason=move.reason if final else f"detour on the way to {move.target}",
                memory_bytes=move.memory_bytes,
                kind=move.kind if final else "detour",
                group=move.group,
                copy_bytes=move.copy_bytes,
                duration_seconds=move.duration_seconds,
                local_disk_bytes=move.local_disk_bytes,
                ha_managed=move.ha_managed,
            )
        )
    return out


# --- waves ---------------------------------------------------------------------------------


def _wave_ok(
    problem: Problem,
    constraints: Sequence[Constraint],
    state: State,
    wave: list[Step],
) -> State | None:
    """The state after `wave` if it is feasible from `state` with all its migrations in
    flight at once (and with at most max_parallel_per_node per node), else None."""
    touches: Counter[int] = Counter()
    for step in wave:
        for vm in step.vms:
            touches[int(state.vm_node[vm])] += 1
            touches[step.target] += 1
    if touches and max(touches.values()) > problem.balance.max_parallel_per_node:
        return None
    flight = state.copy()
    for step in wave:
        for vm in step.vms:
            flight.add_presence(problem, int(vm), step.target)
    if violations(constraints, flight, final=False):
        return None
    done = state.copy()
    for step in wave:
        for vm in step.vms:
            done.move_vm(problem, int(vm), step.target)
    if violations(constraints, done, final=False):
        return None
    return done


def _schedule_ok(
    problem: Problem,
    constraints: Sequence[Constraint],
    state: State,
    waves: list[list[Step]],
) -> list[State] | None:
    """States at the start of each wave after the first, or None if a wave is infeasible."""
    states = []
    for wave in waves:
        after = _wave_ok(problem, constraints, state, wave)
        if after is None:
            return None
        states.append(after)
        state = after
    return states


def assign_waves(
    problem: Problem, constraints: Sequence[Constraint], start: State, steps: list[Step]
) -> list[int]:
    """1-based wave of each step: the earliest wave (within WAVE_LOOKBACK of the last one, and
    after any earlier step of the same VM) keeping the whole schedule feasible."""
    waves: list[list[Step]] = []
    starts: list[State] = [start]  # state at the start of each wave, plus the end state
    last_of_vm: dict[int, int] = {}
    for step in steps:
        vm = int(step.vms[0])
        lowest = max(len(waves) - WAVE_LOOKBACK, last_of_vm.get(vm, -1) + 1, 0)
        placed = None
        for w in range(lowest, len(waves)):
            trial = [*waves[w], step]
            rest = _schedule_ok(problem, constraints, starts[w], [trial, *waves[w + 1 :]])
            if rest is not None:
                waves[w] = trial
                starts[w + 1 :] = rest
                placed = w
                break
        if placed is None:
            after = _wave_ok(problem, constraints, starts[-1], [step])
            if after is None:  # cannot happen for an ordered step; keep it alone regardless
                after = starts[-1].copy()
                for v in step.vms:
                    after.move_vm(problem, int(v), step.target)
            waves.append([step])
            starts.append(after)
            placed = len(waves) - 1
        last_of_vm[vm] = placed
    order = {id(s): w + 1 for w, wave in enumerate(waves) for s in wave}
    return [order[id(s)] for s in steps]


# --- frames --------------------------------------------------------------------------------


def node_frame(problem: Problem, state: State) -> pd.DataFrame:
    """Per node: load, capacity and utilisation of each resource, VMs, maintenance, active."""
    data: dict[str, object] = {}
    for j, r in enumerate(problem.resources):
        capacity = problem.capacity[:, j]
        data[f"{r}_load"] = state.node_load[:, j]
        data[f"{r}_capacity"] = np.where(capacity > 0, capacity, np.nan)
        data[f"{r}_util"] = utilisation(state.node_load[:, j], capacity)
    placed = state.vm_node[state.vm_node >= 0]
    data["vms"] = np.bincount(placed, minlength=problem.n_nodes)
    data["maintenance"] = problem.maintenance
    data["active"] = problem.active
    return pd.DataFrame(data, index=pd.Index(problem.nodes, name="node"))


def _settings(config: Config, rule_types: Sequence[type[Constraint]]) -> dict[str, object]:
    rules: dict[str, object] = {}
    for rule in rule_types:
        if rule.settings is not None:
            rules.update(rule.settings.summarise(config.rules))
    # The rules themselves (names are data: every output escapes them), the counts beside them.
    return {
        "balance": config.balance.model_dump(),
        "rules": config.rules.model_dump(mode="json"),
        "rule_counts": rules,
        "query": config.query.model_dump(mode="json"),
        "host": config.host.model_dump(mode="json"),
    }
