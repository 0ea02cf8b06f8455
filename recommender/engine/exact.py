"""Exact plans: the fewest migrations (then the least memory) reaching the target, as a
mixed-integer program solved with HiGHS (`highspy`, optional).

Variables: binary x[u, n] (unit u ends on node n; staying is x[u, source]) and z[r] >= 0.
"Under the target" is linear because the imbalance is a maximum:

    sum_u load[u, r] x[u, n] + fixed[n, r] <= (U[r] + z[r]) C[n, r]   for active n, weighted r
    sum_r w[r] z[r] <= target * sum_r w[r]

Each rule adds its own rows (`Constraint.add_to_model`): memory and CPU limits per node,
anti-affinity per group and node, the migration budget; static rules remove variables.
When the target cannot be reached within the budget, the program first minimises the
imbalance, then the migrations at that imbalance.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal

import numpy as np

from recommender.engine.measure import cluster_mean
from recommender.engine.problem import Problem, State, UnitMove
from recommender.engine.rules import Constraint, Movers
from recommender.errors import CommandError


def _load_highspy() -> ModuleType | None:
    """HiGHS when installed: without it the product plans heuristically."""
    try:
        module = importlib.import_module("highspy")
    except ImportError:  # pragma: no cover - depends on the installation
        return None
    _first_solver_quietly(module)
    return module


def _first_solver_quietly(module: ModuleType) -> None:
    """HiGHS prints a banner on fd 1, from C, when a process makes its first solver, before
    any option can turn it off. The first solver is made here with fd 1 on a scratch file,
    so the banner reaches neither the document nor the operator's error stream."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 1)
            module.Highs()
            with contextlib.suppress(OSError, AttributeError):
                ctypes.CDLL(None).fflush(None)
    finally:
        os.dup2(saved, 1)
        os.close(saved)


highspy: ModuleType | None = _load_highspy()


def _highs() -> ModuleType:
    if highspy is None:  # callers check `available()` first
        raise RuntimeError("highspy is not installed")
    return highspy


# The first highspy release that has every option `_solver` sets (the older ones refuse
# mip_allow_cut_separation_at_nodes, and before 1.11 the RINS and RENS switches).
HIGHSPY_NEEDED = "1.13"

# HighsInfo.primal_solution_status of a feasible solution (kSolutionStatusFeasible).
_FEASIBLE_SOLUTION = 2

# Deterministic limits: a node limit, not a clock; the time limit only guards pathologies.
MAX_NODES = 400
TIME_LIMIT = 20.0
# HiGHS's soft limit on the rows of its cut pool (default 10,000) for the frontier's
# programs: above it, cuts the LPs do not use age out sooner and some separators add no
# more. On 200 seeded small clusters (bench/bench_engine_frontier.py, side by side in one
# process) a pool of 100 for every program cut the plans' CPU time p90 by 6 % at the same
# frontier nodes, which the frontier spends on more nodes (`recommender.engine.frontier`);
# the fewest-migrations programs keep HiGHS's pool: with the small one, at their node
# limit, 3 of the 200 plans found no plan reaching the target that the default pool finds.
CUT_POOL = 100

ExactStatus = Literal["optimal", "infeasible", "limit", "unavailable"]
# What a run of the program minimises: migrations (then memory), or the imbalance.
Objective = Literal["cost", "imbalance"]


def available() -> bool:
    return highspy is not None


@dataclass(frozen=True)
class ExactResult:
    status: ExactStatus
    moves: tuple[UnitMove, ...]
    reached: bool  # the target constraint held
    migrations: int
    memory: float
    imbalance: float = float("nan")  # the overall imbalance the program's z bound
    bound: float = float("nan")  # proven lower bound of the objective (imbalance runs)
    nodes: int = 0  # branch-and-bound nodes the run took


@dataclass(frozen=True)
class Hint:
    """A known plan (e.g. the heuristic's): its moves and the per-resource imbalance of its end
    state (weighted resources only, as `View.per_resource`)."""

    moves: tuple[UnitMove, ...]
    per_resource: np.ndarray


@dataclass(frozen=True)
class _Columns:
    """The program's columns: a binary per allowed (mover, node), then z per weighted
    resource."""

    mover: np.ndarray  # (nv,) mover of each binary
    node: np.ndarray  # (nv,) node of each binary
    stays: np.ndarray  # (nv,) the binary is "stay where it is"
    moved_count: np.ndarray  # (nv,) VM migrations if the binary is 1
    copy: np.ndarray  # (nv,) memory copied if the binary is 1
    by_node: tuple[np.ndarray, ...]  # (N,) the binaries of each node
    resources: np.ndarray  # (nz,) the weighted resources
    z_weights: np.ndarray  # (nz,)
    weight_sum: float

    @property
    def nv(self) -> int:
        return len(self.mover)

    @property
    def nz(self) -> int:
        return len(self.resources)


class LinearModel:
    """The x[u, n] variables of the modelled units and the rows rules add to them."""

    def __init__(self, problem: Problem, start: State, units: np.ndarray) -> None:
        self.problem = problem
        self.start = start
        self.units = np.asarray(units, dtype=np.int64)
        self.movers = Movers.of_units(problem, start, self.units)
        k, n = len(self.units), problem.n_nodes
        source = self.movers.source
        owner = self.movers.owner
        vm_node = start.vm_node[self.movers.vm]
        self.allow = np.repeat(problem.receivable[None, :], k, axis=0)
        # A unit split over nodes has no "stay": every column brings it together somewhere.
        self.stay = np.zeros((k, n), dtype=bool)
        whole = np.flatnonzero(source >= 0)
        self.stay[whole, source[whole]] = True
        self.allow &= ~self.stay
        # VM migrations and memory copied if mover i ends on node n: its VMs not yet there.
        away = vm_node[:, None] != np.arange(n)[None, :]
        self.cost = np.zeros((k, n))
        np.add.at(self.cost, owner, away.astype(float))
        self.copy_cost = np.zeros((k, n))
        np.add.at(self.copy_cost, owner, away * problem.copy_bytes[self.movers.vm][:, None])
        self.fixed_load = start.node_load.copy()
        np.subtract.at(self.fixed_load, vm_node, problem.load[self.movers.vm])
        self.fixed_sets = start.set_count.copy()
        sets = problem.counted
        for vm, node in zip(self.movers.vm, vm_node, strict=True):
            for s in sets.of_vm(int(vm)):
                self.fixed_sets[s, node] -= 1
        self.node_rows: list[tuple[np.ndarray, np.ndarray, int | None]] = []
        self.budget: float | None = None
        # Break ties between plans of equal size by memory copied (much slower to prove).
        self.least_memory = False
        self.hint: Hint | None = None  # a known plan to start from (`suggest`)
        # Plans the program may not answer again (`exclude`): their moves, not all at once.
        self.excluded: list[tuple[UnitMove, ...]] = []

    def suggest(self, hint: Hint) -> None:
        """A known plan for the solver to start from."""
        self.hint = hint

    # -- what rules call ---------------------------------------------------------------------

    def forbid_outside(self, mask: np.ndarray) -> None:
        """Remove the moves `mask` (units x nodes) does not allow; staying stays allowed."""
        self.allow &= mask

    def add_node_rows(self, values: np.ndarray, upper: np.ndarray, column: int | None) -> None:
        """Per node n: sum of values[u] x[u, n] <= upper[n] (minus the fixed load of `column`)."""
        self.node_rows.append((np.asarray(values, float), np.asarray(upper, float), column))

    def add_budget_row(self, limit: float) -> None:
        remaining = limit - self.start.migrations
        self.budget = remaining if self.budget is None else min(self.budget, remaining)

    def exclude(self, moves: Sequence[UnitMove]) -> None:
        """No answer makes every one of `moves` again (a plan that proved to have no order of
        migrations keeping every rule on the way)."""
        self.excluded.append(tuple(moves))

    def require_move(self, movers: np.ndarray) -> None:
        """The movers `movers` (bool, movers) may not stay where they are (a broken rule
        makes them leave)."""
        self.stay[np.asarray(movers, dtype=bool)] = False

    # -- the program -------------------------------------------------------------------------

    def lowest(
        self,
        weights: np.ndarray,
        migrations: int,
        *,
        max_nodes: int,
        restart: bool = True,
        hint: Hint | None = None,
        cut_pool: int | None = None,
    ) -> ExactResult:
        """The lowest imbalance with at most `migrations` VM migrations (and the rule's
        budget), its plan and the proven lower bound; `max_nodes` limits the branching, and
        `hint` (else the suggested plan) is where the solver starts. Without `restart`,
        HiGHS keeps its first root (no second presolve and root after fixing columns at the
        root), which on these programs costs more than it saves; `cut_pool` is HiGHS's soft
        limit on its cut pool (`CUT_POOL`; else HiGHS's default). The model is only read, so
        runs for different budgets may go on at once in threads (HiGHS lets go of the
        interpreter while it solves)."""
        if highspy is None:
            return ExactResult("unavailable", (), False, 0, 0.0)
        budget = migrations if self.budget is None else min(self.budget, migrations)
        return self._run(
            0.0,
            weights,
            objective="imbalance",
            max_nodes=max_nodes,
            restart=restart,
            budget=budget,
            hint=hint,
            cut_pool=cut_pool,
        )

    def solve(self, target: float, weights: np.ndarray, *, reach_only: bool = False) -> ExactResult:
        """The fewest migrations reaching `target`; where none does, the lowest imbalance in
        the fewest migrations, unless `reach_only` (the frontier answers that instead)."""
        if highspy is None:
            return ExactResult("unavailable", (), False, 0, 0.0)
        first = self._run(target, weights, objective="cost", imbalance_cap=None)
        if first.status != "infeasible" or reach_only:
            return first
        lowest = self._run(target, weights, objective="imbalance", imbalance_cap=None)
        if lowest.status != "optimal":
            return lowest
        fewest = self._run(target, weights, objective="cost", imbalance_cap=lowest.imbalance + 1e-7)
        return ExactResult(
            fewest.status, fewest.moves, False, fewest.migrations, fewest.memory, fewest.imbalance
        )

    def _run(
        self,
        target: float,
        weights: np.ndarray,
        *,
        objective: Objective,
        imbalance_cap: float | None = None,
        max_nodes: int = 0,
        restart: bool = True,
        budget: float | None = None,
        hint: Hint | None = None,
        cut_pool: int | None = None,
    ) -> ExactResult:
        """One program: `budget` (else the rules') caps the migrations, `hint` (else the
        suggested plan) starts the solver."""
        budget = self.budget if budget is None else budget
        cols = self._columns(weights)
        rows = Rows()
        self._assignment_rows(cols, rows)
        self._rule_rows(cols, rows)
        self._excluded_rows(cols, rows)
        if budget is not None:
            rows.add(np.arange(cols.nv), cols.moved_count, -np.inf, budget)
        self._balance_rows(cols, rows)
        z = cols.nv + np.arange(cols.nz)
        if objective == "cost" and imbalance_cap is None:
            rows.add(z, cols.z_weights, -np.inf, target * cols.weight_sum)
        if imbalance_cap is not None:
            rows.add(z, cols.z_weights / cols.weight_sum, -np.inf, imbalance_cap)
        highs = _solver()
        if max_nodes:
            set_option(highs, "mip_max_nodes", max_nodes)
        if not restart:
            set_option(highs, "mip_allow_restart", False)
        if cut_pool is not None:
            set_option(highs, "mip_pool_soft_limit", cut_pool)
        self._add_columns(highs, cols, objective)
        rows.flush(highs)
        hint = self.hint if hint is None else hint
        if hint is not None:
            self._warm_start(highs, cols, hint)
        highs.run()
        return self._result(highs, cols, objective, imbalance_cap)

    def _columns(self, weights: np.ndarray) -> _Columns:
        mover, node = np.nonzero(self.allow | self.stay)
        stays = self.stay[mover, node]
        moved_count = np.where(stays, 0.0, self.cost[mover, node])
        copy = np.where(stays, 0.0, self.copy_cost[mover, node])
        by_node = tuple(np.flatnonzero(node == n) for n in range(self.problem.n_nodes))
        resources = np.flatnonzero(weights > 0)
        return _Columns(
            mover,
            node,
            stays,
            moved_count,
            copy,
            by_node,
            resources,
            weights[resources],
            float(weights.sum()),
        )

    def _assignment_rows(self, cols: _Columns, rows: Rows) -> None:
        """Each unit ends on exactly one node."""
        for owner in range(len(self.units)):
            index = np.flatnonzero(cols.mover == owner)
            rows.add(index, np.ones(len(index)), 1.0, 1.0)

    def _rule_rows(self, cols: _Columns, rows: Rows) -> None:
        for values, upper, column in self.node_rows:
            for n, index in enumerate(cols.by_node):
                if len(index) == 0:
                    continue
                bound = upper[n] - (self.fixed_load[n, column] if column is not None else 0.0)
                coef = values[cols.mover[index]]
                if np.any(coef != 0):
                    rows.add(index, coef, -np.inf, bound)

    def _excluded_rows(self, cols: _Columns, rows: Rows) -> None:
        """Per excluded plan: at most all but one of its moves' columns."""
        position = {int(u): i for i, u in enumerate(self.units)}
        for moves in self.excluded:
            index = [
                np.flatnonzero((cols.mover == position[m.unit]) & (cols.node == m.target))
                for m in moves
                if m.unit in position
            ]
            if index and all(len(i) for i in index):
                taken = np.concatenate(index)
                rows.add(taken, np.ones(len(taken)), -np.inf, float(len(taken) - 1))

    def _balance_rows(self, cols: _Columns, rows: Rows) -> None:
        """Utilisation of every active node under mean + z; the mean is that of the end
        state, which every plan of these units shares."""
        active = np.flatnonzero(self.problem.active)
        capacity = self.problem.capacity[np.ix_(active, cols.resources)]
        end_load = self.fixed_load[np.ix_(active, cols.resources)].sum(axis=0)
        end_load += self.movers.load[:, cols.resources].sum(axis=0)
        mean = cluster_mean(end_load[None, :], capacity.sum(axis=0)[None, :])
        for i, n in enumerate(active):
            index = cols.by_node[n]
            for j, r in enumerate(cols.resources):
                coef = np.concatenate([self.movers.load[cols.mover[index], r], [-capacity[i, j]]])
                bound = mean[j] * capacity[i, j] - self.fixed_load[n, r]
                rows.add(np.concatenate([index, [cols.nv + j]]), coef, -np.inf, bound)

    def _add_columns(self, highs: Any, cols: _Columns, objective: Objective) -> None:
        nv, nz = cols.nv, cols.nz
        lower = np.zeros(nv + nz)
        upper = np.concatenate([np.ones(nv), np.full(nz, np.inf)])
        highs.addVars(nv + nz, lower, upper)
        if nv:
            highs.changeColsIntegrality(
                nv, np.arange(nv, dtype=np.int32), np.ones(nv, dtype=np.uint8)
            )
        if objective == "cost":
            scale = 2.0 * (float(cols.copy.sum()) + 1.0)
            tiebreak = cols.copy / scale if self.least_memory else np.zeros(nv)
            cost = np.concatenate([cols.moved_count + tiebreak, np.zeros(nz)])
        else:
            cost = np.concatenate([np.zeros(nv), cols.z_weights / cols.weight_sum])
        highs.changeColsCost(nv + nz, np.arange(nv + nz, dtype=np.int32), cost)

    def _warm_start(self, highs: Any, cols: _Columns, hint: Hint) -> None:
        position = {int(u): i for i, u in enumerate(self.units)}
        start = np.zeros(cols.nv + cols.nz)
        start[: cols.nv] = cols.stays
        for move in hint.moves:
            if move.unit in position:
                pick = np.flatnonzero(cols.mover == position[move.unit])
                start[pick] = cols.node[pick] == move.target
        start[cols.nv :] = np.asarray(hint.per_resource, dtype=float)
        solution = _highs().HighsSolution()
        solution.col_value = start.tolist()
        solution.value_valid = True
        highs.setSolution(solution)

    def _result(
        self, highs: Any, cols: _Columns, objective: Objective, imbalance_cap: float | None
    ) -> ExactResult:
        status = highs.getModelStatus()
        nodes = int(highs.getInfo().mip_node_count)
        if status == _highs().HighsModelStatus.kInfeasible:
            return ExactResult("infeasible", (), False, 0, 0.0, nodes=nodes)
        solution = np.asarray(highs.getSolution().col_value)
        # At a limit HiGHS may hand back values that are no feasible plan (none found yet).
        feasible = highs.getInfo().primal_solution_status == _FEASIBLE_SOLUTION
        if len(solution) != cols.nv + cols.nz or not feasible:
            return ExactResult("limit", (), False, 0, 0.0, nodes=nodes)
        optimal = status == _highs().HighsModelStatus.kOptimal
        label: ExactStatus = "optimal" if optimal else "limit"
        value = float(solution[cols.nv :] @ cols.z_weights / cols.weight_sum)
        chosen = np.flatnonzero((solution[: cols.nv] > 0.5) & ~cols.stays)
        moves = tuple(
            UnitMove(
                int(self.units[cols.mover[c]]),
                int(self.movers.source[cols.mover[c]]),
                int(cols.node[c]),
            )
            for c in chosen
        )
        bound = value if optimal else float(highs.getInfo().mip_dual_bound)
        return ExactResult(
            label,
            moves,
            objective == "cost" and imbalance_cap is None,
            int(cols.moved_count[chosen].sum()),
            float(cols.copy[chosen].sum()),
            value,
            bound if objective == "imbalance" else float("nan"),
            nodes,
        )


def set_option(highs: Any, name: str, value: bool | int | float | str) -> None:
    """One HiGHS option, refused loudly: HiGHS answers an option it does not know (an older
    release) with an error status and goes on without it, which would plan with other limits
    and heuristics than the ones the product is measured with."""
    if highs.setOptionValue(name, value) != _highs().HighsStatus.kOk:
        raise CommandError(
            f"the installed highspy refuses the HiGHS option {name}={value!r}: "
            f"exact plans need highspy {HIGHSPY_NEEDED} or newer"
        )


def _solver() -> Any:
    highs = _highs().Highs()
    set_option(highs, "output_flag", False)
    set_option(highs, "random_seed", 0)
    set_option(highs, "threads", 1)
    set_option(highs, "mip_rel_gap", 1e-9)
    set_option(highs, "mip_abs_gap", 1e-9)
    set_option(highs, "mip_max_nodes", MAX_NODES)
    set_option(highs, "time_limit", TIME_LIMIT)
    # On these small programs HiGHS's sub-MIP heuristics and cut rounds at every node cost
    # more than the branching they save; the search's plan is a warm start instead.
    set_option(highs, "mip_heuristic_run_rins", False)
    set_option(highs, "mip_heuristic_run_rens", False)
    set_option(highs, "mip_allow_cut_separation_at_nodes", False)
    return highs


def lp_solver() -> Any:
    """A quiet, single-threaded, deterministic HiGHS for a linear program."""
    highs = _highs().Highs()
    set_option(highs, "output_flag", False)
    set_option(highs, "random_seed", 0)
    set_option(highs, "threads", 1)
    set_option(highs, "time_limit", TIME_LIMIT)
    return highs


def optimal_status() -> Any:
    return _highs().HighsModelStatus.kOptimal


class Rows:
    def __init__(self) -> None:
        self.index: list[np.ndarray] = []
        self.value: list[np.ndarray] = []
        self.lower: list[float] = []
        self.upper: list[float] = []

    def add(self, index: np.ndarray, value: np.ndarray, lower: float, upper: float) -> None:
        """One row, scaled so its largest coefficient is 1 (loads in bytes would otherwise
        put coefficients of 1e11 beside ones of 1, which slows HiGHS's simplex down)."""
        value = np.asarray(value, dtype=float)
        scale = float(np.abs(value).max()) if len(value) else 1.0
        scale = scale if scale > 0 else 1.0
        self.index.append(np.asarray(index, dtype=np.int32))
        self.value.append(value / scale)
        self.lower.append(lower / scale)
        self.upper.append(upper / scale)

    def flush(self, highs: Any) -> None:
        if not self.index:
            return
        starts = np.concatenate([[0], np.cumsum([len(i) for i in self.index])[:-1]])
        highs.addRows(
            len(self.index),
            np.array(self.lower),
            np.array(self.upper),
            int(sum(len(i) for i in self.index)),
            starts.astype(np.int32),
            np.concatenate(self.index).astype(np.int32),
            np.concatenate(self.value),
        )


def solve_exact(
    problem: Problem,
    constraints: Sequence[Constraint],
    start: State,
    units: np.ndarray,
    target: float,
    *,
    least_memory: bool = False,
    hint: Hint | None = None,
    reach_only: bool = False,
) -> ExactResult:
    """Fewest migrations of `units` (the others stay) from `start` reaching `target`; if the
    budget cannot reach it, the lowest imbalance with the fewest migrations. With
    `least_memory`, the plan of that size copying the least memory; with `reach_only`, only
    the first (nothing where the target is out of reach)."""
    model = LinearModel(problem, start, units)
    model.least_memory = least_memory
    if hint is not None:
        model.suggest(hint)
    for constraint in constraints:
        constraint.add_to_model(model)
    return model.solve(target, problem.weights, reach_only=reach_only)
