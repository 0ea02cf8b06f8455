"""A proven lower bound of the overall imbalance after at most k more VM migrations.

The bound relaxes every rule and every target choice; it keeps only what a migration is:
one VM leaves one node. From a state where every placed VM sits on an active node (so the
cluster mean U[r] cannot change: VMs only move between active nodes, capacities are fixed),
take any plan of at most k migrations and its end state, with max utilisation M[r] of
resource r. Per node n, let D_n be the VMs on n at the start and not at the end. Each left n
by a migration whose source is n, and a migration has one source, so sum_n |D_n| <= k.
Loads are non-negative, so the end load of n is at least L[n,r] minus the load of D_n;
as it is at most M[r] * C[n,r], D_n carries at least L[n,r] - M[r] * C[n,r].

For a threshold t, needed_n(t) is a lower bound of the VMs that must leave n to bring it to
t or below: n's movable units are cut into *pieces*, a unit of s VMs into s pieces of a
load s-th each (a whole unit is s migrations and sheds its whole load, so any set of
leaving units is matched by as many pieces carrying as much), and needed_n(t) is the fewest
of n's largest pieces that carry L[n,r] - t * C[n,r] (infinite if all of them do not). A
unit of more than k VMs cannot move at all, and a split unit's VMs are pieces of their own.
By the above, sum_n needed_n(M[r]) <= k, so M[r] >= T[r], the least t with
sum_n needed_n(t) <= k. With pieces p_1 >= p_2 >= ... of n and prefix sums S_j, n needs
more than j pieces exactly when t < t[n,j] = (L[n,r] - S_j) / C[n,r]; so T[r] is the larger
of every node's floor t[n,m_n] (all its pieces gone) and the (k+1)-th largest t[n,j] over
all nodes and j < m_n (at most k of those may lie above t).

Two more floors hold for any k: every movable unit ends on some active node, with at least
that node's immovable load, so M[r] >= min_n (fixed[n,r] + load[u,r]) / C[n,r] for each
unit u (a whale stays a whale wherever it goes); and M[r] >= U[r]. The imbalance of r is
then at least max(T[r], floors) - U[r] (and 0), and the overall imbalance, a weighted sum of
the per-resource imbalances, at least the same weighted sum of these bounds.

That sum gives every resource all k migrations, where one plan's k moves must serve them
all. Where HiGHS is installed, a linear program shares them: piece i leaves a fraction x_i
in [0, 1] with sum x <= k, M[r] >= (L[n,r] - sum_(i on n) x_i l[i,r]) / C[n,r] for every
node, M[r] - U[r] at least the bound above; minimise sum_r w[r] M[r]. A plan's leaving units
give a 0/1 x meeting every row (by the argument above), so the program's optimum, less the
solver's tolerance, is a lower bound too, and never below the sum above. Where that bound is
still short of what the caller needs (the frontier: within `BOUND_GAP` of its point), the
same program with whole pieces (each leaves or stays, as a plan's pieces do) is solved to a
node limit; the solver's proven dual bound holds wherever it stops, and is never below the
linear one.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from recommender.engine import exact
from recommender.engine.measure import cluster_mean
from recommender.engine.problem import SPLIT, Problem, State

# Branch-and-bound nodes of the program with whole pieces (`_shared`, integral); its dual
# bound holds wherever it stops.
BOUND_MIP_NODES = 200


def lower_bound(
    problem: Problem, state: State, movable: np.ndarray, k: int, enough: float = math.inf
) -> float:
    """A lower bound of the overall imbalance after at most `k` more VM migrations from
    `state`, moving only `movable` units (the module docstring has the proof); 0 where VMs
    off the active nodes would change the cluster mean. The program with whole pieces is
    solved only where the linear one's bound is under `enough` (the bound a caller needs)."""
    return LowerBounds(problem, state, movable, k).at(k, enough)


class LowerBounds:
    """`lower_bound` for every k up to `most` from one state: the shared programs are built
    once, and each k changes only their budget, the pieces too large for it and the
    per-resource floors."""

    def __init__(
        self,
        problem: Problem,
        state: State,
        movable: np.ndarray,
        most: int,
        *,
        whole_pieces: bool = True,
    ) -> None:
        self.problem, self.state, self.movable = problem, state, movable
        self.most = max(int(most), 0)
        # Without `whole_pieces` the bound is the linear program's alone.
        self.whole_pieces = whole_pieces
        self._programs: dict[bool, _SharedProgram] = {}
        self._linear: dict[int, tuple[float, np.ndarray]] = {}  # k -> (bound, per resource)

    def at(self, k: int, enough: float = math.inf) -> float:
        """The bound after at most `k` (at most `most`) more migrations."""
        problem = self.problem
        if not (problem.weights > 0).any():
            return 0.0
        linear, per = self._linear_at(k)
        if linear >= enough or not self.whole_pieces:
            return linear
        return max(linear, self._program(integral=True).solve(k, per))

    def _linear_at(self, k: int) -> tuple[float, np.ndarray]:
        """The linear bound for `k` and the per-resource bounds under it, once per k."""
        if k not in self._linear:
            problem = self.problem
            resources = np.flatnonzero(problem.weights > 0)
            per = per_resource_bounds(problem, self.state, self.movable, k)
            apart = float(per @ problem.weights[resources] / problem.weights.sum())
            linear = max(apart, self._program(integral=False).solve(k, per))
            self._linear[k] = linear, per
        return self._linear[k]

    def _program(self, *, integral: bool) -> _SharedProgram:
        if integral not in self._programs:
            self._programs[integral] = _SharedProgram(
                self.problem, self.state, self.movable, self.most, integral
            )
        return self._programs[integral]


class _SharedProgram:
    """The relaxation with one budget for every resource: piece i leaves its node a
    fraction x_i in [0, 1], sum x <= k, and M[r] >= u[n,r] - sum_(i on n) x_i l[i,r] / C[n,r]
    for every node; M[r] - U[r] is at least the per-resource bound. Every plan gives a 0/1 x
    (its leaving units' pieces), so the optimum bounds the plan's imbalance; with
    `integral`, x is 0/1 (a piece leaves whole or stays), and the solver's proven dual bound
    is taken where its node limit stops it first. Built for budgets up to `most`: a piece of
    a unit larger than the k asked for is held at 0."""

    def __init__(
        self, problem: Problem, state: State, movable: np.ndarray, most: int, integral: bool
    ) -> None:
        self.problem, self.integral = problem, integral
        self.highs: Any = None
        active = problem.active
        if not exact.available() or most <= 0:
            return
        if (state.vm_node >= 0)[~active[np.maximum(state.vm_node, 0)]].any():
            return
        self.resources = resources = np.flatnonzero(problem.weights > 0)
        positions, load, capacity, self.mean, where = _active(problem, state, resources)
        piece_node, piece_load, _, _, self.sizes = _pieces(problem, state, movable, most)
        pos = where[piece_node]
        self.n_pieces, n_res = len(pos), len(resources)
        highs = exact.lp_solver()
        self.w = problem.weights[resources]
        lower = np.concatenate([np.zeros(self.n_pieces), self.mean])
        upper = np.concatenate([np.ones(self.n_pieces), np.full(n_res, np.inf)])
        highs.addVars(self.n_pieces + n_res, lower, upper)
        if integral:
            whole = np.arange(self.n_pieces, dtype=np.int32)
            highs.changeColsIntegrality(self.n_pieces, whole, np.ones(self.n_pieces, np.uint8))
            exact.set_option(highs, "mip_max_nodes", BOUND_MIP_NODES)
        cols = np.arange(self.n_pieces + n_res, dtype=np.int32)
        highs.changeColsCost(len(cols), cols, np.concatenate([np.zeros(self.n_pieces), self.w]))
        rows = exact.Rows()
        rows.add(np.arange(self.n_pieces), np.ones(self.n_pieces), -np.inf, float(most))
        for n in range(len(positions)):
            own = np.flatnonzero(pos == n)
            for j in range(n_res):
                c = capacity[n, j]
                if c <= 0:
                    continue
                index = np.concatenate([[self.n_pieces + j], own])
                value = np.concatenate([[1.0], piece_load[own, resources[j]] / c])
                rows.add(index, value, load[n, j] / c, np.inf)
        rows.flush(highs)
        self.highs = highs

    def solve(self, k: int, per: np.ndarray) -> float:
        highs = self.highs
        if highs is None or k <= 0 or not per.any():
            return 0.0
        n, n_res = self.n_pieces, len(self.resources)
        pieces = np.arange(n, dtype=np.int32)
        upper = (self.sizes <= k).astype(float)
        highs.changeColsBounds(n, pieces, np.zeros(n), upper)
        levels = np.arange(n, n + n_res, dtype=np.int32)
        floors = self.mean + per
        highs.changeColsBounds(n_res, levels, floors, np.full(n_res, np.inf))
        highs.changeRowBounds(0, -np.inf, float(k))  # the budget: row 0, coefficients 1
        highs.run()
        info = highs.getInfo()
        if self.integral:
            proven = float(info.mip_dual_bound)
            if not np.isfinite(proven):
                return 0.0
        elif highs.getModelStatus() == exact.optimal_status():
            proven = float(info.objective_function_value)
        else:
            return 0.0
        found = proven - float(self.w @ self.mean)
        # Less the solver's tolerances, so that a rounding never lifts the bound over the truth.
        return max(found - 1e-7 * float(self.w.sum()), 0.0) / float(self.problem.weights.sum())


def _active(
    problem: Problem, state: State, resources: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The active nodes' positions, their loads and capacities of `resources`, the cluster
    mean, and each node's row among them (-1 for the others)."""
    positions = np.flatnonzero(problem.active)
    load = state.node_load[np.ix_(positions, resources)]
    capacity = problem.capacity[np.ix_(positions, resources)]
    where = np.full(problem.n_nodes, -1, dtype=np.int64)
    where[positions] = np.arange(len(positions))
    return positions, load, capacity, cluster_mean(load, capacity), where


def per_resource_bounds(problem: Problem, state: State, movable: np.ndarray, k: int) -> np.ndarray:
    """The bound of I[r] for each weighted resource r (in `problem.weights > 0` order)."""
    resources = np.flatnonzero(problem.weights > 0)
    active = problem.active
    if not active.any() or (state.vm_node >= 0)[~active[np.maximum(state.vm_node, 0)]].any():
        return np.zeros(len(resources))
    k = max(int(k), 0)
    positions, load, capacity, mean, where = _active(problem, state, resources)
    piece_node, piece_load, whole_node, whole_load, _ = _pieces(problem, state, movable, k)
    piece_pos, whole_pos = where[piece_node], where[whole_node]
    per = np.zeros(len(resources))
    for j, r in enumerate(resources):
        top = _threshold(load[:, j], capacity[:, j], piece_pos, piece_load[:, r], k)
        fixed = load[:, j] - np.bincount(piece_pos, piece_load[:, r], len(positions))
        floor = _whale_floor(fixed, capacity[:, j], whole_pos, whole_load[:, r])
        per[j] = max(top, floor, float(mean[j])) - float(mean[j])
    return np.maximum(per, 0.0)


def _pieces(
    problem: Problem, state: State, movable: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(node, load) of every piece a migration can take off a node, (node, load) of the
    things that land somewhere whole (units on one node, VMs of split units), and the size
    of the unit each piece is of (1 for a split unit's VM)."""
    units = problem.units
    where = state.unit_node
    whole = np.flatnonzero(movable & (where >= 0) & (units.size <= k))
    size = units.size[whole]
    piece_unit = np.repeat(whole, size)
    piece_node = where[piece_unit]
    piece_load = units.load[piece_unit] / np.repeat(size, size)[:, None]
    split = np.flatnonzero(movable & (where == SPLIT))
    vms = np.concatenate([units.members(int(u)) for u in split]) if len(split) else np.zeros(0)
    vms = vms.astype(np.int64)
    vms = vms[state.vm_node[vms] >= 0] if k > 0 else vms[:0]
    nodes = np.concatenate([piece_node, state.vm_node[vms]])
    loads = np.concatenate([piece_load, problem.load[vms]])
    sizes = np.concatenate([units.size[piece_unit], np.ones(len(vms), dtype=np.int64)])
    whole_node = np.concatenate([where[whole], state.vm_node[vms]])
    whole_load = np.concatenate([units.load[whole], problem.load[vms]])
    return nodes, loads, whole_node, whole_load, sizes


def _threshold(
    load: np.ndarray, capacity: np.ndarray, node: np.ndarray, piece: np.ndarray, k: int
) -> float:
    """T: the least utilisation every node (with capacity) can be brought to when at most
    k pieces leave in all."""
    has = capacity > 0
    if not has.any():
        return 0.0
    # The pieces by node, largest first within each: one sort, then a slice per node.
    order = np.lexsort((-piece, node))
    node, piece = node[order], piece[order]
    starts = np.searchsorted(node, np.arange(len(load) + 1))
    breaks: list[np.ndarray] = []
    floor = -np.inf
    for n in np.flatnonzero(has):
        own = piece[starts[n] : starts[n + 1]]
        shed = np.concatenate([[0.0], np.cumsum(own)])
        t = (load[n] - shed) / capacity[n]
        floor = max(floor, float(t[-1]))
        breaks.append(t[:-1])
    candidates = np.concatenate(breaks)
    if len(candidates) > k:
        floor = max(floor, float(np.partition(-candidates, k)[k] * -1))
    return floor


def _whale_floor(
    fixed: np.ndarray, capacity: np.ndarray, node: np.ndarray, load: np.ndarray
) -> float:
    """The largest, over things that land whole, of the least utilisation of any active
    node holding it on top of that node's immovable load (a node without capacity of the
    resource counts as utilisation 0, as the scorer does)."""
    if len(node) == 0:
        return -np.inf
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(capacity > 0, 1.0 / np.where(capacity > 0, capacity, 1.0), 0.0)
    fixed = np.maximum(fixed, 0.0)
    # Each node's utilisation with the thing on it grows with the thing's load (inv >= 0), so
    # the least over the nodes does too: the largest thing gives the largest floor.
    heaviest = float(np.max(load))
    return float(((fixed + heaviest) * inv).min())
