"""The data's own time grid: when the latest sample was taken and how far apart samples are.

Two instant queries, whatever the number of VMs, before a snapshot or a report:

- `max(timestamp(vmbalance_vm_info))` at the requested time is the latest sample at or before
  it. Every later query is evaluated there, so any requested time between two samples gives
  the same answers, and a counter's window `[T - W, T]` starts on a sample when `W` is a
  multiple of the spacing. That is where Prometheus (which counts the sample at `T - W`, and
  otherwise extrapolates to the window's edges) and VictoriaMetrics (which leaves the sample
  at `T - W` out of the window but takes it as the base of `increase()`) read the same samples.
- `quantile(0.5, count_over_time(vmbalance_vm_info[1h - 1s]))` there gives the spacing (the
  scrape interval): the range stops one second short of a sample at `T - 1h`, so both
  servers count the same samples. The same count over 15 min, 4 min and 1 min (one second
  short each, in the same query) covers data younger than an hour: the longest range the data
  fills is the one counted.

Levels (`avg_over_time` of used memory, counts of samples) are read over ranges half a spacing
shorter than the window, so the sample at the window's edge, which only Prometheus includes,
is inside neither server's range. Sub-windows and report steps are kept at least
`MIN_SPACINGS` spacings wide: an `increase()` needs two samples, and three leave room for one
missed scrape.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from recommender.config import QuerySettings, duration_seconds
from recommender.source.answers import Answer, sample

INFO = "vmbalance_vm_info"
# Seconds over which the spacing is counted, longest first (each one second short of a whole
# number of minutes, see above): the longest the data fills gives the spacing, so data younger
# than an hour (a new Prometheus, a lab) is not read as sparse.
SPACING_RANGES = (3599.0, 899.0, 239.0, 59.0)
SPACING_RANGE = SPACING_RANGES[0]
# A range is filled when it holds at least this share of the samples the next shorter one's
# rate implies.
FILLED = 0.8
MIN_SPACINGS = 3

# The queries of `PrometheusSource.sample_grid` (the spacing query only when there is data).
GRID_QUERIES = 2
LATEST_QUERY = f"max(timestamp({INFO}))"
SPACING_QUERY = " or ".join(
    f'label_replace(quantile(0.5, count_over_time({INFO}[{r:.0f}s])), "range", "{r:.0f}", "", "")'
    for r in SPACING_RANGES
)


@dataclass(frozen=True)
class SampleGrid:
    """`at`: the evaluation time (the latest sample at or before the requested time, or the
    requested time when there is none); `spacing`: seconds between samples, NaN if unknown."""

    at: float
    spacing: float = math.nan
    requested: float = math.nan

    @property
    def known(self) -> bool:
        return math.isfinite(self.spacing) and self.spacing > 0

    def edge_margin(self) -> float:
        """Seconds a level's range is shortened by: half a spacing (0 when unknown)."""
        return self.spacing / 2 if self.known else 0.0

    def level_range(self, window: float) -> str:
        """The range of a level over `window`, without the sample on the window's edge."""
        return f"{round((window - self.edge_margin()) * 1000):d}ms"

    def subquery_range(self, window: float, step: float) -> str:
        """The range of a `[range:step]` subquery at `at` whose points are the `window / step`
        multiples of `step` at or before `at`, on both servers: Prometheus takes the
        multiples of the step inside the range, VictoriaMetrics steps from the range's start,
        so the range starts on the earliest of them."""
        points = max(1, math.floor(window / step + 1e-9))
        behind = round((self.at % step) * 1000) % round(step * 1000)
        return f"{behind + round((points - 1) * step * 1000):d}ms"

    def shift(self, step: float) -> float:
        """Seconds from this grid's `at` up to the next multiple of `step` (0 when on it)."""
        return round((-self.at) % step, 3) % step if step > 0 else 0.0

    def phase_offset(self, step: float) -> float:
        """Seconds that move the multiples of `step` at or before `at` back onto the data's
        grid, so a subquery's steps (aligned by both servers to multiples of their step) read
        windows that end on a sample."""
        if not self.known:
            return 0.0
        return (-(self.at % step)) % self.spacing


def _offset(seconds: float) -> str:
    return f" offset {round(seconds * 1000):d}ms" if seconds > 0 else ""


# A rate needs two samples of one series; a VM with fewer has a rate nobody can compute.
MIN_RATE_SAMPLES = 2


def rate_samples_query(
    counters: Mapping[str, Sequence[str]], window: float, grid: SampleGrid
) -> str:
    """The (vm, resource) pairs whose counters have samples in the window (without its edge
    sample, so both servers count alike) but no series, on any node, with MIN_RATE_SAMPLES of
    them (one sample; several series all from one scrape): that rate is unknown, not zero.
    Prometheus answers no `increase()` for it and VictoriaMetrics answers 0.

    Only the first counter of each resource is counted: a resource's counters (read and
    written bytes) come from the same scrape of the same device, so they have the same
    samples. Each resource's maximum per VM is taken and compared first, and only the few
    under the minimum are labelled and joined: labelling every VM's series would be most of
    the query's cost."""
    parts = []
    for resource, names in counters.items():
        counts = f"count_over_time({names[0]}[{grid.level_range(window)}])"
        under = f"max by (cluster, vm) ({counts}) < {MIN_RATE_SAMPLES}"
        parts.append(f'label_replace({under}, "resource", "{resource}", "", "")')
    return " or ".join(parts)


def latest_sample(answer: Answer, requested: float) -> float:
    values = [sample(item) for item in answer]
    finite = [v for v in values if math.isfinite(v) and v <= requested + 1e-3]
    return max(finite) if finite else requested


def spacing_of(answer: Answer) -> float:
    """Whole seconds between samples from the spacing query's answer; NaN when unknown.

    The median count of samples per VM over each of SPACING_RANGES: the longest range that
    holds about as many samples as the next shorter one's rate implies is filled by the data,
    and its length over its count is the spacing (an answer without range labels is a count
    over SPACING_RANGE)."""
    counts: dict[float, float] = {}
    for item in answer:
        value = sample(item)
        label = item.get("metric", {}).get("range")
        length = float(label) if label is not None else SPACING_RANGE
        if math.isfinite(value) and value >= 1:
            counts[length] = value
    if not counts:
        return math.nan
    ranges = sorted(counts, reverse=True)
    for longer, shorter in itertools.pairwise(ranges):
        if counts[longer] >= FILLED * counts[shorter] * longer / shorter:
            return float(max(1, round(longer / counts[longer])))
    shortest = ranges[-1]
    return float(max(1, round(shortest / counts[shortest])))


def wide_enough(seconds: float, grid: SampleGrid) -> float:
    """`seconds`, or the smallest multiple of the spacing at least MIN_SPACINGS spacings wide."""
    if not grid.known:
        return seconds
    least = MIN_SPACINGS * grid.spacing
    if seconds >= least:
        return seconds
    return least


def adapted_query(query: QuerySettings, grid: SampleGrid) -> tuple[QuerySettings, list[str]]:
    """The query settings with a short window at least MIN_SPACINGS spacings wide; one warning
    line when the config asks for less."""
    short = duration_seconds(query.short_window)
    wide = wide_enough(short, grid)
    if wide == short:
        return query, []
    window = duration_seconds(query.window)
    if wide >= window:
        return query, [
            f"query.short_window {query.short_window} holds fewer than {MIN_SPACINGS} samples "
            f"at the data's {grid.spacing:g}s spacing, and window {query.window} is too short "
            "to widen it: short-window rates may be unknown"
        ]
    widened = f"{wide:.0f}s"
    warning = (
        f"query.short_window {query.short_window} is shorter than {MIN_SPACINGS} samples at "
        f"the data's {grid.spacing:g}s spacing; using {widened}"
    )
    return query.model_copy(update={"short_window": widened}), [warning]


__all__ = [
    "GRID_QUERIES",
    "LATEST_QUERY",
    "MIN_RATE_SAMPLES",
    "MIN_SPACINGS",
    "SPACING_QUERY",
    "SampleGrid",
    "adapted_query",
    "latest_sample",
    "rate_samples_query",
    "spacing_of",
    "wide_enough",
]
