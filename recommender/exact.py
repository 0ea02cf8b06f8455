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

from dataclasses import dataclass

import numpy as np

from recommender.problem import Problem, State
from recommender.rules import Constraint, Movers
from recommender.search import UnitMove

try:  # optional: the product runs without it and plans heuristically
    import highspy
except ImportError:  # pragma: no cover - depends on the installation
    highspy = None

# HighsInfo.primal_solution_status of a feasible solution (kSolutionStatusFeasible).
_FEASIBLE_SOLUTION = 2

# Deterministic limits: a node limit, not a clock; the time limit only guards pathologies.
MAX_NODES = 5_000
TIME_LIMIT = 20.0


def available() -> bool:
    return highspy is not None


@dataclass(frozen=True)
class ExactResult:
    status: str  # optimal | infeasible | limit | unavailable
    moves: tuple[UnitMove, ...]
    reached: bool  # the target constraint held
    migrations: int
    memory: float
    imbalance: float = float("nan")  # the overall imbalance the program's z bound


class LinearModel:
    """The x[u, n] variables of the modelled units and the rows rules add to them."""

    def __init__(self, problem: Problem, start: State, units: np.ndarray) -> None:
        self.problem = problem
        self.start = start
        self.units = np.asarray(units, dtype=np.int64)
        self.movers = Movers.of_units(problem, start, self.units)
        k, n = len(self.units), problem.n_nodes
        source = self.movers.source
        self.allow = np.repeat(problem.receivable[None, :], k, axis=0)
        self.stay = np.zeros((k, n), dtype=bool)
        self.stay[np.arange(k), source] = True
        self.allow &= ~self.stay
        self.fixed_load = start.node_load.copy()
        np.subtract.at(self.fixed_load, source, self.movers.load)
        self.fixed_groups = start.group_count.copy()
        groups = problem.anti_affinity
        for vm, owner in zip(self.movers.vm, self.movers.owner, strict=True):
            for g in groups.of_vm(int(vm)):
                self.fixed_groups[g, source[owner]] -= 1
        self.node_rows: list[tuple[np.ndarray, np.ndarray, int | None]] = []
        self.budget: float | None = None
        # Break ties between plans of equal size by memory copied (much slower to prove).
        self.least_memory = False
        self.incumbent: dict[int, int] | None = None  # mover -> node of a known plan
        self.incumbent_levels = np.zeros(0)

    def suggest(self, moves: tuple[UnitMove, ...], per_resource: np.ndarray) -> None:
        """A known plan (e.g. the heuristic's) for the solver to start from: its moves and
        the per-resource imbalance of its end state (weighted resources only)."""
        position = {int(u): i for i, u in enumerate(self.units)}
        self.incumbent = {position[m.unit]: m.target for m in moves if m.unit in position}
        self.incumbent_levels = np.asarray(per_resource, dtype=float)

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

    # -- the program -------------------------------------------------------------------------

    def solve(self, target: float, weights: np.ndarray) -> ExactResult:
        if highspy is None:
            return ExactResult("unavailable", (), False, 0, 0.0)
        first = self._run(target, weights, objective="cost", imbalance_cap=None)
        if first.status != "infeasible":
            return first
        lowest = self._run(target, weights, objective="imbalance", imbalance_cap=None)
        if lowest.status != "optimal":
            return lowest
        fewest = self._run(target, weights, objective="cost", imbalance_cap=lowest.imbalance + 1e-7)
        return ExactResult(
            fewest.status, fewest.moves, False, fewest.migrations, fewest.memory, fewest.imbalance
        )

    def _run(
        self, target: float, weights: np.ndarray, *, objective: str, imbalance_cap: float | None
    ) -> ExactResult:
        problem = self.problem
        units = problem.units
        var_mover, var_node = np.nonzero(self.allow | self.stay)
        nv = len(var_mover)
        stays = self.stay[var_mover, var_node]
        moved_count = np.where(stays, 0, self.movers.count[var_mover]).astype(float)
        copy = np.where(stays, 0.0, units.copy_bytes[self.units[var_mover]])
        resources = np.flatnonzero(weights > 0)
        weight_sum = float(weights.sum())
        nz = len(resources)
        rows = _Rows()

        # Each unit ends on exactly one node.
        for owner in range(len(self.units)):
            cols = np.flatnonzero(var_mover == owner)
            rows.add(cols, np.ones(len(cols)), 1.0, 1.0)
        # Rule rows, per node.
        by_node = [np.flatnonzero(var_node == n) for n in range(problem.n_nodes)]
        for values, upper, column in self.node_rows:
            for n, cols in enumerate(by_node):
                if len(cols) == 0:
                    continue
                bound = upper[n] - (self.fixed_load[n, column] if column is not None else 0.0)
                coef = values[var_mover[cols]]
                if np.any(coef != 0):
                    rows.add(cols, coef, -np.inf, bound)
        if self.budget is not None:
            rows.add(np.arange(nv), moved_count, -np.inf, self.budget)
        # Balance rows: utilisation of every active node under mean + z.
        active = np.flatnonzero(problem.active)
        capacity = problem.capacity[np.ix_(active, resources)]
        end_load = self.fixed_load[np.ix_(active, resources)].sum(axis=0)
        end_load += self.movers.load[:, resources].sum(axis=0)
        mean = end_load / np.maximum(capacity.sum(axis=0), 1e-300)
        for i, n in enumerate(active):
            cols = by_node[n]
            for j, r in enumerate(resources):
                coef = np.concatenate([self.movers.load[var_mover[cols], r], [-capacity[i, j]]])
                index = np.concatenate([cols, [nv + j]])
                bound = mean[j] * capacity[i, j] - self.fixed_load[n, r]
                rows.add(index, coef, -np.inf, bound)
        z_weights = weights[resources]
        if objective == "cost" and imbalance_cap is None:
            rows.add(nv + np.arange(nz), z_weights, -np.inf, target * weight_sum)
        if imbalance_cap is not None:
            rows.add(nv + np.arange(nz), z_weights / weight_sum, -np.inf, imbalance_cap)

        highs = highspy.Highs()
        highs.setOptionValue("output_flag", False)
        highs.setOptionValue("random_seed", 0)
        highs.setOptionValue("threads", 1)
        highs.setOptionValue("mip_rel_gap", 1e-9)
        highs.setOptionValue("mip_abs_gap", 1e-9)
        highs.setOptionValue("mip_max_nodes", MAX_NODES)
        highs.setOptionValue("time_limit", TIME_LIMIT)
        lower = np.zeros(nv + nz)
        upper = np.concatenate([np.ones(nv), np.full(nz, np.inf)])
        highs.addVars(nv + nz, lower, upper)
        if nv:
            highs.changeColsIntegrality(
                nv, np.arange(nv, dtype=np.int32), np.ones(nv, dtype=np.uint8)
            )
        if objective == "cost":
            scale = 2.0 * (float(copy.sum()) + 1.0)
            tiebreak = copy / scale if self.least_memory else np.zeros(nv)
            cost = np.concatenate([moved_count + tiebreak, np.zeros(nz)])
        else:
            cost = np.concatenate([np.zeros(nv), z_weights / weight_sum])
        highs.changeColsCost(nv + nz, np.arange(nv + nz, dtype=np.int32), cost)
        rows.flush(highs)
        if self.incumbent is not None:
            start = np.zeros(nv + nz)
            start[:nv] = self.stay[var_mover, var_node]
            for owner, node in self.incumbent.items():
                pick = np.flatnonzero(var_mover == owner)
                start[pick] = var_node[pick] == node
            start[nv:] = self.incumbent_levels
            solution = highspy.HighsSolution()
            solution.col_value = start.tolist()
            solution.value_valid = True
            highs.setSolution(solution)
        highs.run()
        status = highs.getModelStatus()
        if status == highspy.HighsModelStatus.kInfeasible:
            return ExactResult("infeasible", (), False, 0, 0.0)
        solution = np.asarray(highs.getSolution().col_value)
        # At a limit HiGHS may hand back values that are no feasible plan (none found yet).
        feasible = highs.getInfo().primal_solution_status == _FEASIBLE_SOLUTION
        if len(solution) != nv + nz or not feasible:
            return ExactResult("limit", (), False, 0, 0.0)
        label = "optimal" if status == highspy.HighsModelStatus.kOptimal else "limit"
        value = float(solution[nv:] @ z_weights / weight_sum)
        if objective == "imbalance":
            return ExactResult(label, (), False, 0, 0.0, value)
        chosen = np.flatnonzero((solution[:nv] > 0.5) & ~stays)
        moves = tuple(
            UnitMove(
                int(self.units[var_mover[c]]),
                int(self.movers.source[var_mover[c]]),
                int(var_node[c]),
            )
            for c in chosen
        )
        return ExactResult(
            label,
            moves,
            imbalance_cap is None,
            int(moved_count[chosen].sum()),
            float(copy[chosen].sum()),
            value,
        )


class _Rows:
    def __init__(self) -> None:
        self.index: list[np.ndarray] = []
        self.value: list[np.ndarray] = []
        self.lower: list[float] = []
        self.upper: list[float] = []

    def add(self, index: np.ndarray, value: np.ndarray, lower: float, upper: float) -> None:
        self.index.append(np.asarray(index, dtype=np.int32))
        self.value.append(np.asarray(value, dtype=float))
        self.lower.append(lower)
        self.upper.append(upper)

    def flush(self, highs) -> None:
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
    constraints: list[Constraint],
    start: State,
    units: np.ndarray,
    target: float,
    *,
    least_memory: bool = False,
    hint: tuple[tuple[UnitMove, ...], np.ndarray] | None = None,
) -> ExactResult:
    """Fewest migrations of `units` (the others stay) from `start` reaching `target`; if the
    budget cannot reach it, the lowest imbalance with the fewest migrations. With
    `least_memory`, the plan of that size copying the least memory."""
    model = LinearModel(problem, start, units)
    model.least_memory = least_memory
    if hint is not None:
        model.suggest(*hint)
    for constraint in constraints:
        constraint.add_to_model(model)
    return model.solve(target, problem.weights)
