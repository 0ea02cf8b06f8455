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
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(overall, smooth, distance) after each single move: `load` (P, R) from `source` to
        `target`. Sources may be inactive (maintenance): their VMs then join the cluster
        mean. Targets must be active nodes.

        The distance (to the region under `view.target`) is first taken at the allocation of
        the current state (an upper bound), then, on clusters of up to EXACT_DISTANCE_NODES
        active nodes, recomputed exactly for the `refine` most promising moves (all when
        None)."""
        out = np.empty((3, len(target)))
        step = max(1, BLOCK // max(1, len(self.resources)))
        for lo in range(0, len(target), step):
            hi = min(len(target), lo + step)
            block = slice(lo, hi)
            out[:, block] = self._evaluate(view, load[block], source[block], target[block], False)
        if len(self.active) <= self.EXACT_DISTANCE_NODES and len(target):
            pick = np.arange(len(target))
            if refine is not None and refine < len(target):
                pick = np.lexsort((np.round(out[0], 9), np.round(out[2], 9)))[:refine]
            step = max(1, BLOCK // (len(self.resources) * max(1, len(self.active))))
            for lo in range(0, len(pick), step):
                part = pick[lo : lo + step]
                out[2, part] = self._evaluate(view, load[part], source[part], target[part], True)[2]
        return out[0], out[1], out[2]

    def _evaluate(
        self,
        view: View,
        load: np.ndarray,
        source: np.ndarray,
        target: np.ndarray,
        exact: bool,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        w = self.weights
        moved = load[:, self.resources]
        ps = np.where(source >= 0, self.position[np.maximum(source, 0)], -1)
        pt = self.position[target]
        src_active = ps >= 0
        shifted = ~src_active
        mean = view.mean[None, :] + np.where(src_active[:, None], 0.0, moved / self.capacity_total)
        ut_old = view.util[pt]
        ut_new = ut_old + moved * self.inv_capacity[pt]
        psa = np.maximum(ps, 0)
        us_old = view.util[psa]
        us_new = np.where(src_active[:, None], us_old - moved * self.inv_capacity[psa], -np.inf)
        i1, i2 = view.top_index[0][None, :], view.top_index[1][None, :]
        v1, v2, v3 = view.top_value[0], view.top_value[1], view.top_value[2]
        ps_, pt_ = ps[:, None], pt[:, None]
        rest = np.where((i1 != ps_) & (i1 != pt_), v1, np.where((i2 != ps_) & (i2 != pt_), v2, v3))
        top = np.maximum(np.maximum(rest, ut_new), us_new)
        overall = np.maximum(top - mean, 0.0) @ w

        def above(x: np.ndarray, line: np.ndarray, power: int) -> np.ndarray:
            e = np.maximum(x - line, 0.0)
            excess: np.ndarray = (e * e if power == 2 else e) @ w
            return excess

        us_safe = np.where(src_active[:, None], us_new, 0.0)
        # Smooth: squared excess over the mean; only the two changed nodes differ, unless the
        # mean moved (VMs joining from an inactive node).
        smooth = np.full(len(target), view.smooth * self.weight_sum)
        if shifted.any():
            rows = np.flatnonzero(shifted)
            excess = np.maximum(view.util[None, :, :] - mean[rows][:, None, :], 0.0)
            smooth[rows] = (excess * excess).sum(axis=1) @ w
        smooth += above(ut_new, mean, 2) - above(ut_old, mean, 2)
        smooth += np.where(src_active, above(us_safe, mean, 2) - above(us_old, mean, 2), 0.0)

        if exact:
            util = np.repeat(view.util[None, :, :], len(target), axis=0)
            util[np.arange(len(target)), pt] = ut_new
            rows = np.flatnonzero(src_active)
            util[rows, ps[rows]] = us_new[rows]
            distance, _ = excess_distance(util, mean, w, view.target * self.weight_sum)
        else:
            line = mean + view.levels[None, :]
            distance = np.full(len(target), view.distance * self.weight_sum)
            if shifted.any():
                rows = np.flatnonzero(shifted)
                excess = np.maximum(view.util[None, :, :] - line[rows][:, None, :], 0.0)
                distance[rows] = excess.sum(axis=1) @ w
            distance += above(ut_new, line, 1) - above(ut_old, line, 1)
            distance += np.where(src_active, above(us_safe, line, 1) - above(us_old, line, 1), 0)
        scale = 1.0 / self.weight_sum
        return overall * scale, smooth * scale, distance * scale
