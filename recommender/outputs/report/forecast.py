"""Capacity forecast: a straight line through the daily means, and when it reaches a level.

The model is a least-squares line (degree 1) fitted to the cluster's *daily mean*
utilisation of a resource. Daily means take out the day/night cycle, so the fit follows the
growth rather than the time of day the period happened to start or end. A line extrapolates
the recent rate of growth and nothing more: a week of history cannot tell acceleration from
noise, and a higher-degree polynomial (some schedulers fit a cubic) turns a small bend in the
last days into a curve that runs off to ±infinity within weeks. A line stays as wrong as the
rate it measured.

A slope smaller than twice its standard error is reported as "no clear trend" rather than
extrapolated, so noise around a flat load never produces a crossing date.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import pandas as pd

from recommender.config import Config
from recommender.model import RESOURCES

DAY = 86400.0
# Fewer daily means than this cannot show a trend (two points always fit a line exactly).
MIN_POINTS = 3
# A slope must exceed this many standard errors to be extrapolated.
SIGNIFICANCE = 2.0
HORIZON = 90 * DAY


@dataclass(frozen=True)
class LinearFit:
    """value(t) = intercept + slope * (t - origin), t in unix seconds."""

    slope: float  # per second
    intercept: float  # value at `origin`
    origin: float  # mean time of the points
    points: int
    slope_stderr: float

    def at(self, t: float | np.ndarray) -> float | np.ndarray:
        return self.intercept + self.slope * (np.asarray(t, dtype=float) - self.origin)

    @property
    def per_day(self) -> float:
        return self.slope * DAY

    @property
    def significant(self) -> bool:
        """The slope stands out from the scatter of the points around the line."""
        if self.slope == 0:
            return False
        return abs(self.slope) > SIGNIFICANCE * self.slope_stderr


class Outcome(StrEnum):
    NOT_ENOUGH_DATA = "not enough data"
    ALREADY = "already reached"
    CROSSES = "crosses"
    NO_TREND = "no clear trend"
    FALLING = "falling"
    BEYOND_HORIZON = "not within the horizon"


@dataclass(frozen=True)
class Crossing:
    """When the fitted line reaches `threshold`, seen from `now`."""

    outcome: Outcome
    threshold: float
    now: float
    horizon: float
    at: float | None = None  # unix seconds, for ALREADY and CROSSES

    @property
    def days(self) -> float | None:
        return None if self.at is None else (self.at - self.now) / DAY

    @property
    def reached(self) -> bool:
        """Within the horizon (or already)."""
        return self.outcome in (Outcome.ALREADY, Outcome.CROSSES)


@dataclass(frozen=True)
class Forecast:
    """Daily means of one series, the line through them and its crossings."""

    day_times: np.ndarray  # mean time of the points of each day
    day_means: np.ndarray
    fit: LinearFit | None
    current: float  # the latest daily mean (NaN without data)
    crossings: tuple[Crossing, ...]


def daily_means(
    times: np.ndarray, values: np.ndarray, end: float, day: float = DAY
) -> tuple[np.ndarray, np.ndarray]:
    """Mean of the finite values in each `day`, counted back from `end` (so the last bucket
    ends at `end`); each bucket is placed at the mean time of its points, so a partly covered
    day sits where its data is. Buckets without data are left out."""
    t = np.asarray(times, dtype=float)
    v = np.asarray(values, dtype=float)
    keep = np.isfinite(t) & np.isfinite(v) & (t <= end)
    t, v = t[keep], v[keep]
    if len(t) == 0:
        return np.zeros(0), np.zeros(0)
    # Bucket 0 is (end - day, end]; a point exactly on a boundary belongs to the later day.
    bucket = np.floor((end - t) / day).astype(np.int64)
    order = np.unique(bucket)[::-1]  # oldest first
    centres = np.array([t[bucket == b].mean() for b in order])
    means = np.array([v[bucket == b].mean() for b in order])
    return centres, means


def fit_line(times: np.ndarray, values: np.ndarray) -> LinearFit | None:
    """Least-squares line through the finite points; None with fewer than MIN_POINTS or when
    all points share one time."""
    t = np.asarray(times, dtype=float)
    v = np.asarray(values, dtype=float)
    keep = np.isfinite(t) & np.isfinite(v)
    t, v = t[keep], v[keep]
    n = len(t)
    if n < MIN_POINTS:
        return None
    origin = float(t.mean())
    x = t - origin
    sxx = float((x * x).sum())
    if sxx <= 0:
        return None
    mean = float(v.mean())
    slope = float((x * (v - mean)).sum() / sxx)
    residuals = v - (mean + slope * x)
    sse = float((residuals * residuals).sum())
    stderr = math.sqrt(sse / (n - 2) / sxx)
    return LinearFit(slope=slope, intercept=mean, origin=origin, points=n, slope_stderr=stderr)


def crossing(
    fit: LinearFit | None,
    threshold: float,
    now: float,
    current: float,
    horizon: float = HORIZON,
) -> Crossing:
    """When the line reaches `threshold`: already (the latest daily mean `current` is at or
    above it), at a time within `horizon` of `now`, or not (no clear trend, falling, beyond the
    horizon, not enough data)."""

    def outcome(kind: Outcome, at: float | None = None) -> Crossing:
        return Crossing(outcome=kind, threshold=threshold, now=now, horizon=horizon, at=at)

    if fit is None or not math.isfinite(current):
        return outcome(Outcome.NOT_ENOUGH_DATA)
    if current >= threshold:
        return outcome(Outcome.ALREADY, now)
    if not fit.significant:
        return outcome(Outcome.NO_TREND)
    if fit.slope <= 0:
        return outcome(Outcome.FALLING)
    at = max(fit.origin + (threshold - fit.intercept) / fit.slope, now)
    if at - now > horizon:
        return outcome(Outcome.BEYOND_HORIZON)
    return outcome(Outcome.CROSSES, at)


def forecast(
    times: np.ndarray,
    values: np.ndarray,
    thresholds: Sequence[float],
    end: float,
    horizon: float = HORIZON,
) -> Forecast:
    """Daily means of `values` up to `end`, the line through them, and when it reaches each
    threshold (seen from `end`)."""
    day_times, day_means = daily_means(times, values, end)
    fit = fit_line(day_times, day_means)
    current = float(day_means[-1]) if len(day_means) else math.nan
    crossings = tuple(crossing(fit, float(x), end, current, horizon) for x in thresholds)
    return Forecast(
        day_times=day_times, day_means=day_means, fit=fit, current=current, crossings=crossings
    )


# --- the cluster's capacity -------------------------------------------------------------------


def planning_limit(config: Config, resource: str) -> float:
    """Cluster utilisation at which balancing runs out of room: the limits the planner packs
    nodes to (CPU headroom, memory less the reserve fraction), else full capacity."""
    balance = config.balance
    if resource == "cpu":
        return min(balance.cpu_headroom, 1.0)
    if resource == "memory":
        return 1.0 - balance.memory_reserve_fraction
    return 1.0


@dataclass(frozen=True)
class ResourceForecast:
    resource: str
    limit: float
    forecast: Forecast

    @property
    def to_limit(self) -> Crossing:
        return self.forecast.crossings[0]

    @property
    def to_full(self) -> Crossing:
        return self.forecast.crossings[1]


def capacity_forecasts(
    utilisation: pd.DataFrame, config: Config, end: float, horizon: float = HORIZON
) -> list[ResourceForecast]:
    """Per resource: the line through the daily means of cluster utilisation, and when it
    reaches the planning limit and 100 %."""
    times = utilisation.index.to_numpy(dtype=float)
    out = []
    for resource in RESOURCES:
        limit = planning_limit(config, resource)
        values = utilisation[resource].to_numpy(dtype=float)
        result = forecast(times, values, (limit, 1.0), end, horizon)
        out.append(ResourceForecast(resource=resource, limit=limit, forecast=result))
    return out


__all__ = [
    "DAY",
    "HORIZON",
    "MIN_POINTS",
    "SIGNIFICANCE",
    "Crossing",
    "Forecast",
    "LinearFit",
    "Outcome",
    "ResourceForecast",
    "capacity_forecasts",
    "crossing",
    "daily_means",
    "fit_line",
    "forecast",
    "planning_limit",
]
