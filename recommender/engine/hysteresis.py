"""Hysteresis: when planning starts and stops, and which moves are worth their cost.

* Planning starts when the overall imbalance is above `trigger` (or a rule forces moves) and
  stops once it is at or below `target`; the gap between the two keeps a cluster hovering
  around one value from being re-planned every run.
* A balancing move is kept only when its gain — how much worse the plan's final imbalance
  would be without it — is at least `min_gain + min_gain_per_gib x GiB copied`.
* A VM migrated within `cooldown_seconds` of the snapshot, or bursting (short-window rate at
  least `burst_ratio` x its window rate), is not chosen for balancing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from recommender.engine.measure import EPSILON
from recommender.resources import GIB

if TYPE_CHECKING:
    from recommender.config import BalanceSettings


def should_plan(overall: float, settings: BalanceSettings) -> bool:
    """True when the imbalance is above the trigger."""
    return overall > settings.trigger + EPSILON


def gain_threshold(copy_bytes: np.ndarray | float, settings: BalanceSettings) -> np.ndarray:
    """The gain a move copying `copy_bytes` must bring to be kept."""
    return settings.min_gain + settings.min_gain_per_gib * np.asarray(copy_bytes, float) / GIB


def in_cooldown(last_migration: np.ndarray, now: float, cooldown_seconds: float) -> np.ndarray:
    """VMs whose last migration is less than `cooldown_seconds` before `now` (NaN: never)."""
    last = np.asarray(last_migration, dtype=float)
    with np.errstate(invalid="ignore"):
        cooling: np.ndarray = np.isfinite(last) & (now - last < cooldown_seconds)
    return cooling


def is_bursting(burst_ratio: np.ndarray, limit: float) -> np.ndarray:
    """VMs whose burst ratio is at or above `limit` (NaN: unknown, not bursting)."""
    ratio = np.asarray(burst_ratio, dtype=float)
    with np.errstate(invalid="ignore"):
        bursting: np.ndarray = np.isfinite(ratio) & (ratio >= limit)
    return bursting


def weakest_move(gains: np.ndarray, thresholds: np.ndarray) -> int | None:
    """Index of the move that falls furthest below its threshold, or None if all pass."""
    if len(gains) == 0:
        return None
    margin = np.asarray(gains) - np.asarray(thresholds)
    worst = int(np.argmin(margin))
    return worst if margin[worst] < -EPSILON else None
