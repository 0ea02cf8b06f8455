"""Migrations seen in the history of `vmbalance_vm_info`, and their measured effect on the
overall imbalance; pure functions over the presence frame."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

# Steps compared on each side of a migration to judge its effect on the imbalance.
EFFECT_POINTS = 2


def scrape_intervals(presence: pd.DataFrame, step: float) -> pd.Series:
    """Seconds between samples per node: the step over the mean number of samples of a VM in
    the steps it was on the node throughout (also there in the steps before and after)."""
    if presence.empty:
        return pd.Series(dtype=float)
    ordered = presence.sort_values(["vm", "node", "step"], kind="stable")
    pair = ordered.groupby(["vm", "node"], sort=False).ngroup()
    steps = ordered["step"]
    same_before = (pair == pair.shift(1)) & (steps - steps.shift(1) == 1)
    same_after = (pair == pair.shift(-1)) & (steps.shift(-1) - steps == 1)
    interior = ordered[same_before & same_after]
    return step / interior.groupby("node")["samples"].mean()


def arrival_time(end: float, samples: float, interval: float, step: float) -> float:
    """When the first of `samples` regularly spaced samples in the step (end - step, end]
    was taken: to within half a scrape interval; mid-step when the interval is unknown."""
    if not math.isfinite(interval) or interval <= 0:
        return end - step / 2
    return float(np.clip(end - (samples - 0.5) * interval, end - step, end))


@dataclass(frozen=True)
class ObservedMigration:
    vm: str
    name: str
    source: str
    target: str
    time: float  # first sample on the target, to within half a scrape interval
    before: float | None = None  # overall imbalance over the steps just before
    after: float | None = None  # ... and just after
    nearby: int = 0  # other migrations close enough to share the measured effect

    @property
    def change(self) -> float | None:
        if self.before is None or self.after is None:
            return None
        return self.after - self.before

    def effect(self, tolerance: float) -> str:
        change = self.change
        if change is None:
            return "n/a"
        if change <= -tolerance:
            return "reduced"
        if change >= tolerance:
            return "increased"
        return "no clear change"


def detect_migrations(presence: pd.DataFrame, step: float) -> list[ObservedMigration]:
    """Node changes in `vmbalance_vm_info` history: a VM that appears on a node in a step
    after it was on another node in the step before. The time is when its first sample on
    the new node was taken (`arrival_time`). A VM that reappears after a gap (stopped, then
    started elsewhere) is not a live migration and is left out."""
    out: list[ObservedMigration] = []
    if presence.empty:
        return out
    intervals = scrape_intervals(presence, step)
    fallback = float(intervals.median()) if len(intervals) else math.nan
    # Only a VM seen on more than one node can have moved: at fleet size a few in thousands.
    nodes_per_vm = presence.groupby("vm", sort=False)["node"].nunique()
    moved = presence[presence["vm"].isin(nodes_per_vm.index[nodes_per_vm > 1])]
    for vm, rows in moved.groupby("vm", sort=True):
        by_step: dict[int, dict[str, tuple[float, str]]] = {}
        for node, k, t, samples, name in rows[
            ["node", "step", "time", "samples", "name"]
        ].itertuples(index=False):
            interval = float(intervals.get(node, fallback))
            arrived = arrival_time(float(t), float(samples), interval, step)
            by_step.setdefault(int(k), {})[str(node)] = (arrived, str(name))
        steps = sorted(by_step)
        first = by_step[steps[0]]
        current = max(first, key=lambda n: (first[n][0], n))
        for k in steps[1:]:
            here = by_step[k]
            previous = by_step.get(k - 1, {})
            for node in sorted(here, key=lambda n: (here[n][0], n)):
                if node in previous:
                    continue
                arrived, name = here[node]
                if previous and node != current:
                    out.append(ObservedMigration(str(vm), name, current, node, arrived))
                current = node
    return sorted(out, key=lambda m: (m.time, m.vm))


def migration_effects(
    migrations: Sequence[ObservedMigration],
    overall: pd.Series,
    step: float,
    points: int = EFFECT_POINTS,
) -> list[ObservedMigration]:
    """Mean overall imbalance over the `points` steps that end before each migration and the
    `points` steps that start after it; the step containing the move is left out."""
    times = overall.index.to_numpy(dtype=float)
    values = overall.to_numpy(dtype=float)
    span = points * step
    out = []
    for m in migrations:
        before = values[times <= m.time][-points:]
        after = values[times - step >= m.time][:points]
        before = before[np.isfinite(before)]
        after = after[np.isfinite(after)]
        nearby = sum(1 for o in migrations if o is not m and abs(o.time - m.time) <= span)
        out.append(
            ObservedMigration(
                vm=m.vm,
                name=m.name,
                source=m.source,
                target=m.target,
                time=m.time,
                before=float(before.mean()) if len(before) else None,
                after=float(after.mean()) if len(after) else None,
                nearby=nearby,
            )
        )
    return out


__all__ = [
    "EFFECT_POINTS",
    "ObservedMigration",
    "arrival_time",
    "detect_migrations",
    "migration_effects",
    "scrape_intervals",
]
