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


def report_window(period: float, at: float) -> Window:
    """At most TARGET_POINTS steps of whole minutes covering `period` up to `at`."""
    step = max(MIN_STEP, math.ceil(period / TARGET_POINTS / 60.0) * 60.0)
    return Window(end=float(math.floor(at)), step=step, points=int(period // step))


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

    @property
    def nodes(self) -> list[str]:
        return list(self.active.columns)

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
    )


__all__ = ["MIN_STEP", "TARGET_POINTS", "History", "Window", "history_of_nodes", "report_window"]
