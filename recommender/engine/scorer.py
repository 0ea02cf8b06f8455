"""The imbalance of a node-load matrix, and of many candidate single moves at once.

`Scorer` computes the imbalance of `recommender.engine.measure` (same definition, restricted
to the resources with a weight) with numpy: a move changes only its source and its target,
so the new maximum per resource is the largest of the two changed utilisations and the best
of the three top nodes that are neither. Utilisation is load times the reciprocal capacity
here, so that a move's change is one multiplication.

Besides the imbalance, a `View` holds the *distance to the target region* (`excess_distance`:
the total utilisation above U[r] + z[r] over all nodes, for the best split z of the allowed
imbalance; zero exactly when the imbalance is under the target), which ranks moves across
the plateaus of the max-based measure, and a smooth objective (the weighted sum of squared
utilisation above the cluster mean). The target is a parameter of every view; moves scored
from a view are measured against the same target.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from recommender.engine.measure import cluster_mean
from recommender.engine.problem import Problem

# Largest (pairs x resources) block evaluated at once.
BLOCK = 1_500_000
# Movers x nodes x resources per block of the grid: two buffers of it stay in the cache.
GRID_BLOCK = 32_768


@dataclass(frozen=True)
class View:
    """Utilisation of the active nodes and the measure, for one node-load matrix."""

    util: np.ndarray  # (Na, Rw)
    mean: np.ndarray  # (Rw,)
    per_resource: np.ndarray  # (Rw,)
    overall: float
    smooth: float
    top_value: np.ndarray  # (3, Rw)
    top_index: np.ndarray  # (3, Rw) active positions, -9 for padding
    distance: float  # excess above the target line, minimised over allocations (0: reached)
    levels: np.ndarray  # (Rw,) the allocation z achieving it
    target: float  # the overall imbalance `distance` measures against


def excess_distance(
    util: np.ndarray, mean: np.ndarray, weights: np.ndarray, budget: float
) -> tuple[np.ndarray, np.ndarray]:
    """min over z >= 0 with sum(w z) <= budget of sum_r w_r sum_n (u[n,r] - U[r] - z[r])+.

    `util` is (..., Na, Rw), `mean` (..., Rw). Zero exactly when the overall imbalance is at
    most budget / sum(w). Each resource's excess is convex and piecewise linear in z[r], with
    slope -(nodes above z[r]); spending the budget where most nodes are above the line
    (water-filling) is optimal. Returns (distance (...), levels z (..., Rw))."""
    excess = np.maximum(util - mean[..., None, :], 0.0)
    ordered = -np.sort(-excess, axis=-2)  # descending per resource
    n = ordered.shape[-2]
    if n == 0:  # no active node: nothing is above any line
        return np.zeros(util.shape[:-2]), np.zeros(mean.shape)
    below = np.concatenate([ordered[..., 1:, :], np.zeros_like(ordered[..., :1, :])], axis=-2)
    length = ordered - below  # segment k: count k+1 nodes above the line
    counts = np.arange(1, n + 1, dtype=float)[:, None]
    cost = length * weights
    total = (ordered * weights).sum(axis=(-2, -1))
    # Largest counts first: segment index descending; ties across resources are equivalent.
    cost_f = cost[..., ::-1, :].reshape(*cost.shape[:-2], -1)
    count_f = np.broadcast_to(counts[::-1], cost.shape[-2:]).reshape(-1)
    spent_before = np.cumsum(cost_f, axis=-1) - cost_f
    with np.errstate(divide="ignore", invalid="ignore"):
        take = np.clip((budget - spent_before) / cost_f, 0.0, 1.0)
    take = np.where(cost_f > 0, take, 0.0)
    distance = total - (cost_f * take * count_f).sum(axis=-1)
    lengths_f = length[..., ::-1, :].reshape(cost_f.shape)
    levels = (lengths_f * take).reshape(*cost.shape[:-2], n, -1).sum(axis=-2)
    return np.maximum(distance, 0.0), levels


class Scorer:
    """Scores node-load matrices and single moves of one problem (immutable)."""

    # Up to this many active nodes, each candidate's distance is computed exactly; above it,
    # at the allocation of the state the move starts from (an upper bound).
    EXACT_DISTANCE_NODES = 48

    def __init__(self, problem: Problem) -> None:
        self.problem = problem
        self.active = np.flatnonzero(problem.active)
        self.resources = np.flatnonzero(problem.weights > 0)
        self.weights = problem.weights[self.resources]
        self.weight_sum = float(problem.weights.sum())
        capacity = problem.capacity[np.ix_(self.active, self.resources)]
        self.capacity = capacity
        self.inv_capacity = 1.0 / np.where(capacity > 0, capacity, np.inf)
        self.capacity_total = np.maximum(capacity.sum(axis=0), 1e-300)
        self.position = np.full(problem.n_nodes, -1, dtype=np.int64)
        self.position[self.active] = np.arange(len(self.active))

    def view(self, node_load: np.ndarray, target: float) -> View:
        """The measure of `node_load`, and its distance to the region under `target`."""
        load = node_load[np.ix_(self.active, self.resources)]
        util = load * self.inv_capacity
        mean = cluster_mean(load, self.capacity)
        n = len(self.active)
        rw = len(self.resources)
        top_value = np.full((3, rw), -np.inf)
        top_index = np.full((3, rw), -9, dtype=np.int64)
        if n:
            k = min(3, n)
            part = np.argpartition(-util, k - 1, axis=0)[:k] if n > k else np.argsort(-util, 0)
            values = np.take_along_axis(util, part, axis=0)
            order = np.lexsort((part, -values), axis=0)
            top_index[:k] = np.take_along_axis(part, order, axis=0)
            top_value[:k] = np.take_along_axis(values, order, axis=0)
        per_resource = np.maximum(top_value[0] - mean, 0.0) if n else np.zeros(rw)
        overall = float(per_resource @ self.weights / self.weight_sum)
        excess = np.maximum(util - mean, 0.0)
        smooth = float((excess * excess).sum(axis=0) @ self.weights / self.weight_sum)
        distance, levels = excess_distance(util, mean, self.weights, target * self.weight_sum)
        return View(
            util,
            mean,
            per_resource,
            overall,
            smooth,
            top_value,
            top_index,
            float(distance) / self.weight_sum,
            levels,
            target,
        )

    def evaluate(
        self,
        view: View,
        load: np.ndarray,
        source: np.ndarray,
        target: np.ndarray,
        refine: int | None = None,
        rows: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(overall, smooth, distance) after each single move: `load` (P, R) from `source` to
        `target`. Sources may be inactive (maintenance): their VMs then join the cluster
        mean. Targets must be active nodes. With `rows`, `load` (M, R) and `source` (M,) are
        per mover and move i is mover `rows[i]` to `target[i]` (the same scores as
        `evaluate(view, load[rows], source[rows], target)`, with what depends on the mover
        alone computed once per mover).

        The distance (to the region under `view.target`) is first taken at the allocation of
        the current state (an upper bound), then, on clusters of up to EXACT_DISTANCE_NODES
        active nodes, recomputed exactly for the `refine` most promising moves (all when
        None)."""
        if rows is None:
            rows = np.arange(len(target))
        movers = self._movers(view, load, source)
        out = np.empty((3, len(target)))
        n_movers, cells = len(load), max(1, len(self.resources) * len(self.active))
        if len(target) * 2 >= n_movers * len(self.active) and bool(np.all(rows[1:] >= rows[:-1])):
            # Most (mover, node) pairs are asked for: score them all on the grid and pick.
            step = max(1, GRID_BLOCK // cells)
            for lo in range(0, n_movers, step):
                a, b = np.searchsorted(rows, [lo, lo + step])
                out[:, a:b] = self._grid(view, movers, lo, rows[a:b], target[a:b], step)
        else:
            step = max(1, BLOCK // max(1, len(self.resources)))
            for lo in range(0, len(target), step):
                block = slice(lo, min(len(target), lo + step))
                out[:, block] = self._pairs(view, movers, rows[block], target[block])
        if len(self.active) <= self.EXACT_DISTANCE_NODES and len(target):
            pick = np.arange(len(target))
            if refine is not None and refine < len(target):
                pick = _first_by(np.round(out[2], 9), np.round(out[0], 9), refine)
            step = max(1, BLOCK // (len(self.resources) * max(1, len(self.active))))
            for lo in range(0, len(pick), step):
                part = pick[lo : lo + step]
                out[2, part] = self._exact_distance(view, movers, rows[part], target[part])
        return out[0], out[1], out[2]

    def _movers(self, view: View, load: np.ndarray, source: np.ndarray) -> _Movers:
        """What a move's score takes from its mover alone: the load, the source's new
        utilisation, the cluster mean, the top utilisations besides the source, and the
        source's share of the smooth objective and of the distance."""
        w = self.weights
        moved = load[:, self.resources]
        ps = np.where(source >= 0, self.position[np.maximum(source, 0)], -1)
        src_active = ps >= 0
        shifted = ~src_active
        mean = view.mean[None, :] + np.where(src_active[:, None], 0.0, moved / self.capacity_total)
        psa = np.maximum(ps, 0)
        us_old = view.util[psa]
        us_new = np.where(src_active[:, None], us_old - moved * self.inv_capacity[psa], -np.inf)
        i1, i2 = view.top_index[0][None, :], view.top_index[1][None, :]
        v1, v2, v3 = view.top_value[0], view.top_value[1], view.top_value[2]
        ps_ = ps[:, None]
        # The highest utilisation besides the source. A target among the top two is left out
        # too only where the load moved may be negative: otherwise the target's new
        # utilisation is at least its old one, which is at least the value left out.
        rest = np.where(i1 != ps_, v1, np.where(i2 != ps_, v2, v3))
        us_safe = np.where(src_active[:, None], us_new, 0.0)
        smooth_base = np.full(len(ps), view.smooth * self.weight_sum)
        line = mean + view.levels[None, :]
        distance_base = np.full(len(ps), view.distance * self.weight_sum)
        if shifted.any():
            rows = np.flatnonzero(shifted)
            excess = np.maximum(view.util[None, :, :] - mean[rows][:, None, :], 0.0)
            smooth_base[rows] = (excess * excess).sum(axis=1) @ w
            excess = np.maximum(view.util[None, :, :] - line[rows][:, None, :], 0.0)
            distance_base[rows] = excess.sum(axis=1) @ w
        smooth_source = np.where(
            src_active, _above(us_safe, mean, w, 2) - _above(us_old, mean, w, 2), 0.0
        )
        distance_source = np.where(
            src_active, _above(us_safe, line, w, 1) - _above(us_old, line, w, 1), 0
        )
        shared = None
        if not shifted.any():
            # Every mover leaves an active node: one mean, and the targets' old shares.
            shared_line = view.mean[None, :] + view.levels[None, :]
            shared = (
                _above(view.util, view.mean[None, :], w, 2),
                _above(view.util, shared_line, w, 1),
            )
        return _Movers(
            moved,
            ps,
            src_active,
            mean,
            line,
            us_new,
            rest,
            bool((moved >= 0).all()),
            smooth_base,
            smooth_source,
            distance_base,
            distance_source,
            shared,
        )

    def _pairs(
        self, view: View, movers: _Movers, rows: np.ndarray, target: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        w = self.weights
        pt = self.position[target]
        moved = movers.moved[rows]
        ut_old = view.util[pt]
        ut_new = ut_old + moved * self.inv_capacity[pt]
        if movers.nonnegative:
            rest = movers.rest[rows]
        else:
            i1, i2 = view.top_index[0][None, :], view.top_index[1][None, :]
            v1, v2, v3 = view.top_value[0], view.top_value[1], view.top_value[2]
            ps_, pt_ = movers.ps[rows][:, None], pt[:, None]
            rest = np.where(
                (i1 != ps_) & (i1 != pt_), v1, np.where((i2 != ps_) & (i2 != pt_), v2, v3)
            )
        top = np.maximum(np.maximum(rest, ut_new), movers.us_new[rows])
        if movers.shared is None:
            mean, line = movers.mean[rows], movers.line[rows]
            smooth_old = _above(ut_old, mean, w, 2)
            distance_old = _above(ut_old, line, w, 1)
        else:
            mean, line = movers.mean[:1], movers.line[:1]
            smooth_old = movers.shared[0][pt]
            distance_old = movers.shared[1][pt]
        overall = np.maximum(top - mean, 0.0) @ w
        # Smooth: squared excess over the mean; only the two changed nodes differ, unless the
        # mean moved (VMs joining from an inactive node).
        smooth = movers.smooth_base[rows]
        smooth += _above(ut_new, mean, w, 2) - smooth_old
        smooth += movers.smooth_source[rows]
        distance = movers.distance_base[rows]
        distance += _above(ut_new, line, w, 1) - distance_old
        distance += movers.distance_source[rows]
        scale = 1.0 / self.weight_sum
        return overall * scale, smooth * scale, distance * scale

    def _grid(
        self, view: View, movers: _Movers, lo: int, rows: np.ndarray, target: np.ndarray, step: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The moves of movers lo .. lo + step - 1 (`rows`, sorted) scored on the grid of
        those movers and every active node, into two reused buffers; the same numbers as
        `_pairs`."""
        w = self.weights
        part = slice(lo, lo + step)
        moved = movers.moved[part]
        shape = (len(moved), len(self.active), len(w))
        new = np.empty(shape)
        work = np.empty(shape)
        np.multiply(moved[:, None, :], self.inv_capacity[None, :, :], out=new)
        np.add(view.util[None, :, :], new, out=new)
        if movers.shared is None:
            mean, line = movers.mean[part][:, None, :], movers.line[part][:, None, :]
        else:
            mean, line = movers.mean[:1][:, None, :], movers.line[:1][:, None, :]
        np.maximum(self._grid_rest(view, movers, part), new, out=work)
        np.maximum(work, movers.us_new[part][:, None, :], out=work)
        overall = _excess_into(work, mean, w, 1, work)
        smooth_new = _excess_into(new, mean, w, 2, work)
        distance_new = _excess_into(new, line, w, 1, work)
        pt = self.position[target]
        local = rows - lo
        if movers.shared is None:
            smooth_old = _excess_into(view.util[None, :, :], mean, w, 2, work)[local, pt]
            distance_old = _excess_into(view.util[None, :, :], line, w, 1, work)[local, pt]
        else:
            smooth_old = movers.shared[0][pt]
            distance_old = movers.shared[1][pt]
        smooth = movers.smooth_base[rows]
        smooth += smooth_new[local, pt] - smooth_old
        smooth += movers.smooth_source[rows]
        distance = movers.distance_base[rows]
        distance += distance_new[local, pt] - distance_old
        distance += movers.distance_source[rows]
        scale = 1.0 / self.weight_sum
        return overall[local, pt] * scale, smooth * scale, distance * scale

    def _grid_rest(self, view: View, movers: _Movers, part: slice) -> np.ndarray:
        """(M, 1 or Na, Rw) the highest utilisation besides the source (and the target,
        where the load moved may be negative; see `_movers`)."""
        if movers.nonnegative:
            rest: np.ndarray = movers.rest[part][:, None, :]
            return rest
        i1, i2 = view.top_index[0], view.top_index[1]
        v1, v2, v3 = view.top_value[0], view.top_value[1], view.top_value[2]
        ps_ = movers.ps[part][:, None, None]
        pt_ = np.arange(len(self.active))[None, :, None]
        rest = np.where((i1 != ps_) & (i1 != pt_), v1, np.where((i2 != ps_) & (i2 != pt_), v2, v3))
        return rest

    def _exact_distance(
        self, view: View, movers: _Movers, rows: np.ndarray, target: np.ndarray
    ) -> np.ndarray:
        """The distance after each move, at the best allocation of the state it leads to."""
        pt = self.position[target]
        ut_new = view.util[pt] + movers.moved[rows] * self.inv_capacity[pt]
        util = np.repeat(view.util[None, :, :], len(target), axis=0)
        util[np.arange(len(target)), pt] = ut_new
        active = np.flatnonzero(movers.active[rows])
        util[active, movers.ps[rows[active]]] = movers.us_new[rows[active]]
        distance, _ = excess_distance(
            util, movers.mean[rows], self.weights, view.target * self.weight_sum
        )
        return distance * (1.0 / self.weight_sum)


@dataclass(frozen=True)
class _Movers:
    """The parts of a move's score that depend on its mover only (`Scorer._movers`)."""

    moved: np.ndarray  # (M, Rw) load moved
    ps: np.ndarray  # (M,) active position of the source, -1 where inactive
    active: np.ndarray  # (M,) source active
    mean: np.ndarray  # (M, Rw) cluster mean after the move
    line: np.ndarray  # (M, Rw) mean plus the allocation of the state's distance
    us_new: np.ndarray  # (M, Rw) the source's new utilisation, -inf where inactive
    rest: np.ndarray  # (M, Rw) highest utilisation of the other nodes (`Scorer._movers`)
    nonnegative: bool  # no load moved is negative
    smooth_base: np.ndarray  # (M,) smooth objective before (with the mover's mean)
    smooth_source: np.ndarray  # (M,) its change on the source
    distance_base: np.ndarray  # (M,) the state's distance (with the mover's mean)
    distance_source: np.ndarray  # (M,) its change on the source
    # Where every source is active: each target's squared excess and excess (Na,) before.
    shared: tuple[np.ndarray, np.ndarray] | None


def _above(x: np.ndarray, line: np.ndarray, w: np.ndarray, power: int) -> np.ndarray:
    """Weighted excess of each row of `x` over `line` (squared with power 2)."""
    e = np.maximum(x - line, 0.0)
    excess: np.ndarray = (e * e if power == 2 else e) @ w
    return excess


def _weighted(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x (M, Na, Rw) @ w as (M, Na), summed as the rows of a matrix (as `_above` sums)."""
    out: np.ndarray = (x.reshape(-1, x.shape[-1]) @ w).reshape(x.shape[:-1])
    return out


def _excess_into(
    x: np.ndarray, line: np.ndarray, w: np.ndarray, power: int, work: np.ndarray
) -> np.ndarray:
    """`_above` of the grid `x` (M, Na, Rw) over `line`, computed in the buffer `work`."""
    np.subtract(x, line, out=work)
    np.maximum(work, 0.0, out=work)
    if power == 2:
        np.multiply(work, work, out=work)
    return _weighted(work, w)


def _first_by(primary: np.ndarray, secondary: np.ndarray, count: int) -> np.ndarray:
    """Indices of the `count` smallest by (primary, secondary, index), in that order."""
    cut = np.partition(primary, count - 1)[count - 1]
    keep = np.flatnonzero(primary <= cut)
    order = np.lexsort((secondary[keep], primary[keep]))
    return keep[order][:count]
