"""A period of cluster history as frames: what the report is made of.

The Prometheus source fills a `History` from range queries (`recommender.source.history`);
the report's analysis (`recommender.outputs.report`) reads only this, so it is tested without
any server. Like the snapshot, it is plain pandas frames and imports nothing of the package
but the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from recommender.model import utilisation

# Points per series: a week at 30-minute steps. The step is rounded up to whole minutes.
TARGET_POINTS = 336
MIN_STEP = 60.0


@dataclass(frozen=True)
class Window:
    """Evaluation times `end - (points - 1) * step, ..., end`; the value at t covers
    (t - step, t], so together they cover (end - points * step, end]."""

    end: float
    step: float
    points: int

    @property
    def start(self) -> float:
        return self.end - (self.points - 1) * self.step

    @property
    def begin(self) -> float:
        return self.end - self.points * self.step

    @property
    def span(self) -> float:
        return self.points * self.step

    @property
    def times(self) -> np.ndarray:
        return self.start + self.step * np.arange(self.points, dtype=float)


# A step holds at least this many of the data's sample spacings.
MIN_STEP_SPACINGS = 3


def report_window(period: float, at: float, spacing: float = math.nan) -> Window:
    """At most TARGET_POINTS steps of whole minutes covering `period` up to `at`.

    With the data's `spacing` known (`at` is then a sample's time), a step is also a multiple
    of the spacing at least MIN_STEP_SPACINGS spacings wide, so every step's window starts and
    ends on a sample."""
    unit = MIN_STEP
    least = MIN_STEP
    if math.isfinite(spacing) and spacing >= 1:
        unit = float(math.lcm(int(MIN_STEP), round(spacing)))
        least = max(least, MIN_STEP_SPACINGS * spacing)
    step = max(least, period / TARGET_POINTS)
    step = math.ceil(step / unit - 1e-9) * unit
    end = at if math.isfinite(spacing) else float(math.floor(at))
    return Window(end=end, step=step, points=max(1, int(period // step)))


# Results of executed migrations as `vmbalance_apply_migrations_total` counts them.
EXECUTED_RESULTS = ("done", "failed", "skipped", "not-started")


@dataclass(frozen=True)
class Executed:
    """The migrations vmbalance itself executed in the period (`vmbalance apply`, serve's
    automation), from its `vmbalance_apply_*` metrics: counts by result, and the total
    duration of those that ran. Empty where no instance published them."""

    by_result: dict[str, int] = field(default_factory=dict)
    ran: int = 0  # migrations with a measured duration (done or failed)
    seconds: float = math.nan  # their total duration

    @property
    def total(self) -> int:
        return sum(self.by_result.values())

    @property
    def mean_seconds(self) -> float:
        return self.seconds / self.ran if self.ran and math.isfinite(self.seconds) else math.nan


@dataclass
class History:
    """Node loads and capacities per resource over the window, and VM presence."""

    window: Window
    load: dict[str, pd.DataFrame]  # resource -> (time x node), 0 where a node has no VM
    capacity: dict[str, pd.DataFrame]  # resource -> (time x node), NaN where unknown
    active: pd.DataFrame  # (time x node) bool: counts in the imbalance at that step
    has_data: pd.Series  # (time) bool: any load answered at that step
    # Rows (vm, node, step, time, samples, name): `step` indexes the window's times, `samples`
    # the VM's samples on the node in that step.
    presence: pd.DataFrame
    pairs: pd.DataFrame  # (node, vm) x resource: load over the span on that node
    warnings: list[str] = field(default_factory=list)
    executed: Executed = field(default_factory=Executed)

    @property
    def nodes(self) -> list[str]:
        return list(self.active.columns)

    @property
    def covered(self) -> float:
        """Seconds of the window the data covers: from the first sample to the end. The first
        step with data counts by the share of a full step's samples it holds."""
        data = np.flatnonzero(self.has_data.to_numpy(dtype=bool))
        if not len(data):
            return 0.0
        first = int(data[0])
        share = 1.0
        samples = self.presence.groupby("step")["samples"].max()
        if len(samples) and first in samples.index and samples.max() > 0:
            share = float(samples[first] / samples.max())
        return float(self.window.end - self.window.times[first] + share * self.window.step)

    def utilisation(self, resource: str) -> pd.DataFrame:
        return utilisation(self.load[resource], self.capacity[resource])


def history_of_nodes(history: History, nodes: list[str]) -> History:
    """The part of `history` on `nodes` (one cluster's)."""
    keep = [n for n in history.nodes if n in set(nodes)]
    presence = history.presence[history.presence["node"].isin(keep)]
    pairs = history.pairs
    if isinstance(pairs.index, pd.MultiIndex) and "node" in pairs.index.names:
        pairs = pairs[pairs.index.get_level_values("node").isin(keep)]
    return History(
        window=history.window,
        load={r: frame.reindex(columns=keep) for r, frame in history.load.items()},
        capacity={r: frame.reindex(columns=keep) for r, frame in history.capacity.items()},
        active=history.active.reindex(columns=keep, fill_value=False),
        has_data=history.has_data,
        presence=presence.reset_index(drop=True),
        pairs=pairs,
        warnings=list(history.warnings),
        executed=history.executed,
    )


__all__ = [
    "EXECUTED_RESULTS",
    "MIN_STEP",
    "TARGET_POINTS",
    "Executed",
    "History",
    "Window",
    "history_of_nodes",
    "report_window",
]
