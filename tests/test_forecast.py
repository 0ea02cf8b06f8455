"""The capacity forecast: a line through daily means, and when it reaches a level."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recommender.outputs.report.forecast import (
    DAY,
    HORIZON,
    MIN_POINTS,
    Outcome,
    crossing,
    daily_means,
    fit_line,
    forecast,
)

END = 1_800_000_000.0  # a fixed "now"
STEP = 1800.0  # a week at 30 min, like the report


def week(level: float, per_day: float, noise: float = 0.0, days: int = 7, seed: int = 0):
    """Step-level utilisation ending at END: a daily cycle of ±5 points around a line."""
    times = END - STEP * np.arange(int(days * DAY / STEP))[::-1]
    rng = np.random.default_rng(seed)
    cycle = 0.05 * np.sin(2 * np.pi * (times % DAY) / DAY)
    values = level + per_day * (times - END) / DAY + cycle + noise * rng.standard_normal(len(times))
    return times, values


def test_a_flat_series_never_crosses() -> None:
    times, values = week(0.5, 0.0)
    result = forecast(times, values, (0.9, 1.0), END)
    assert result.fit is not None and abs(result.fit.per_day) < 1e-6
    assert [c.outcome for c in result.crossings] == [Outcome.NO_TREND, Outcome.NO_TREND]
    assert all(c.at is None and not c.reached for c in result.crossings)


def test_a_rising_series_crosses_on_the_right_day() -> None:
    # 50 % today, +1 point a day: 90 % in 40 days, 100 % in 50.
    times, values = week(0.5, 0.01)
    result = forecast(times, values, (0.9, 1.0), END)
    assert result.fit is not None
    assert result.fit.per_day == pytest.approx(0.01, abs=1e-4)
    limit, full = result.crossings
    assert limit.outcome is Outcome.CROSSES and full.outcome is Outcome.CROSSES
    # Daily means are placed at their points' mean time, so the fit is exact up to the
    # cycle's residue: within a couple of hours of the true date.
    assert limit.days == pytest.approx(40.0, abs=0.1)
    assert full.days == pytest.approx(50.0, abs=0.1)
    assert limit.at == pytest.approx(END + 40 * DAY, abs=0.1 * DAY)


def test_noisy_rising_series_still_finds_the_date() -> None:
    times, values = week(0.6, 0.005, noise=0.05, seed=3)
    result = forecast(times, values, (0.9,), END)
    (limit,) = result.crossings
    assert limit.outcome is Outcome.CROSSES
    # True: 60 days. Seven noisy days pin the slope to about ±10 %.
    assert limit.days == pytest.approx(60.0, rel=0.15)


@pytest.mark.parametrize("seed", range(10))
def test_noise_around_a_flat_level_gives_no_date(seed: int) -> None:
    times, values = week(0.8, 0.0, noise=0.05, seed=seed)
    result = forecast(times, values, (0.9, 1.0), END)
    assert not any(c.outcome is Outcome.CROSSES and (c.days or 0) < 30 for c in result.crossings)


def test_too_few_days_is_not_enough_data() -> None:
    times, values = week(0.5, 0.05, days=2)
    result = forecast(times, values, (0.9,), END)
    assert len(result.day_means) == 2
    assert result.fit is None
    assert result.crossings[0].outcome is Outcome.NOT_ENOUGH_DATA
    assert forecast(np.zeros(0), np.zeros(0), (0.9,), END).crossings[0].outcome is (
        Outcome.NOT_ENOUGH_DATA
    )
    assert fit_line(np.array([1.0, 2.0]), np.array([0.1, 0.2])) is None
    assert fit_line(np.full(5, 7.0), np.arange(5.0)) is None  # one time: no line


def test_a_falling_series_does_not_cross() -> None:
    times, values = week(0.7, -0.02)
    assert forecast(times, values, (0.9,), END).crossings[0].outcome is Outcome.FALLING


def test_already_above_the_level() -> None:
    times, values = week(0.95, 0.0)
    (limit, full) = forecast(times, values, (0.9, 1.0), END).crossings
    assert limit.outcome is Outcome.ALREADY and limit.at == END and limit.reached
    assert full.outcome is Outcome.NO_TREND


def test_a_slow_rise_is_beyond_the_horizon() -> None:
    # +0.1 point a day from 50 %: 400 days to 90 %.
    times, values = week(0.5, 0.001)
    result = forecast(times, values, (0.9,), END)
    assert result.crossings[0].outcome is Outcome.BEYOND_HORIZON
    longer = forecast(times, values, (0.9,), END, horizon=500 * DAY)
    assert longer.crossings[0].days == pytest.approx(400, rel=0.01)


def test_daily_means_count_back_from_the_end() -> None:
    times = END - 3600.0 * np.arange(72)[::-1]  # three days, hourly, last point at END
    values = np.repeat([1.0, 2.0, 3.0], 24)
    centres, means = daily_means(times, values, END)
    assert means.tolist() == [1.0, 2.0, 3.0]
    assert np.all(np.diff(centres) == DAY)
    assert centres[-1] == pytest.approx(END - 11.5 * 3600)
    # Gaps and NaN are left out; a partly covered day sits where its data is.
    values[30:48] = np.nan
    centres, means = daily_means(times, values, END)
    assert means[1] == 2.0 and centres[1] == pytest.approx(times[24:30].mean())


def test_a_cubic_would_explode_where_the_line_does_not() -> None:
    # A week with a small bend at the end: the line extrapolates the measured rate, a cubic
    # through the same daily means leaves the range of utilisation within weeks.
    days = np.arange(7.0)
    means = 0.5 + 0.002 * days + np.array([0, 0, 0, 0, 0, 0.005, 0.02])
    fit = fit_line(END + days * DAY, means)
    assert fit is not None
    in_90_days = float(fit.at(END + 96 * DAY))
    cubic = np.polyval(np.polyfit(days, means, 3), 96.0)
    assert 0.5 < in_90_days < 1.0
    assert cubic > 5.0 or cubic < -5.0


@settings(max_examples=100, deadline=None)
@given(
    level=st.floats(0.0, 0.85),
    per_day=st.floats(0.001, 0.05),
    threshold=st.floats(0.86, 1.0),
)
def test_an_exact_line_crosses_where_algebra_says(
    level: float, per_day: float, threshold: float
) -> None:
    days = np.arange(MIN_POINTS + 4, dtype=float)
    times = END - (days[::-1]) * DAY
    values = level + per_day * (times - END) / DAY
    fit = fit_line(times, values)
    assert fit is not None and fit.significant
    result = crossing(fit, threshold, END, float(values[-1]))
    expected = (threshold - level) / per_day
    if expected * DAY > HORIZON:
        assert result.outcome is Outcome.BEYOND_HORIZON
    else:
        assert result.outcome is Outcome.CROSSES
        assert result.days is not None and math.isclose(result.days, expected, rel_tol=1e-6)
