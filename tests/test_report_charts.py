"""The report's charts at fleet size and without data: the busiest nodes drawn one by one and
the rest as one band, time axes in UTC over the period, "no data" rather than 1970; the
trade-off frontier with its knee and proven lower bound."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import matplotlib.dates as mdates
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from recommender.config import Config
from recommender.engine.exact import available as exact_available
from recommender.faces.report import draw_charts
from recommender.history import History, Window
from recommender.model import RESOURCES
from recommender.outputs.report.analysis import (
    TABLE_NODES,
    analyse,
    busiest_nodes,
    node_statistics,
)
from recommender.outputs.report.charts import (
    CHART_NODES,
    CHARTS,
    _dates,
    _time_axis,
    chart_nodes,
    draw_frontier,
)
from recommender.plan import Plan


def fleet(nodes: int) -> History:
    window = Window(end=1_800_000_000.0, step=1800.0, points=48)
    index = pd.Index(window.times, name="time")
    names = [f"pve{i:03d}" for i in range(nodes)]
    # Node i is loaded in proportion to i: the last ones are the busiest.
    load = {
        r: pd.DataFrame({n: float(i) for i, n in enumerate(names)}, index=index) for r in RESOURCES
    }
    capacity = {r: pd.DataFrame(float(nodes), index=index, columns=names) for r in RESOURCES}
    active = pd.DataFrame(True, index=index, columns=names)
    presence = pd.DataFrame(columns=["vm", "node", "step", "time", "samples", "name"])
    return History(
        window=window,
        load=load,
        capacity=capacity,
        active=active,
        has_data=pd.Series(True, index=index),
        presence=presence,
        pairs=pd.DataFrame(),
    )


def test_at_fleet_size_only_the_busiest_nodes_are_drawn_one_by_one() -> None:
    history = fleet(400)
    shown = chart_nodes(history, CHART_NODES)
    assert shown == [f"pve{i:03d}" for i in range(399, 399 - CHART_NODES, -1)]
    small = fleet(5)
    assert chart_nodes(small, CHART_NODES) == small.nodes


def test_a_panel_without_data_says_so_over_the_period_in_utc() -> None:
    window = Window(end=1_800_000_000.0, step=1800.0, points=48)
    x = _dates(pd.Index(window.times))
    ax = Figure().add_subplot()
    ax.plot(x, np.full(len(x), np.nan))
    _time_axis(ax, x, [np.full(len(x), np.nan)])
    assert [t.get_text() for t in ax.texts] == ["no data"]
    assert "UTC" in ax.get_xlabel()
    low, high = ax.get_xlim()
    assert mdates.num2date(low).year == 2027 and mdates.num2date(high).year == 2027
    drawn = Figure().add_subplot()
    _time_axis(drawn, x, [np.ones(len(x))])
    assert len(drawn.texts) == 0


def test_node_tables_list_the_busiest_and_summarise_the_rest() -> None:
    stats = node_statistics(fleet(400), "cpu")
    rows = busiest_nodes(stats)
    assert len(rows) == TABLE_NODES + 1
    assert [r.node for r in rows[:3]] == ["pve399", "pve398", "pve397"]
    rest = rows[-1]
    assert rest.node == f"{400 - TABLE_NODES} other nodes (mean per node)"
    # Nodes 0..379 carry load i on capacity 400: the mean of the others is 189.5 / 400.
    assert rest.mean_util == pytest.approx(189.5 / 400)
    assert busiest_nodes(stats[:5]) == stats[:5]


# --- the trade-off frontier --------------------------------------------------------------------


def _frontier_plan() -> tuple[Plan, Config]:
    from tests.test_frontier_outputs import planned

    _, cfg, plan = planned()
    return plan, cfg


def _line(ax: Any, label: str) -> Any:
    found = [line for line in ax.get_lines() if line.get_label().startswith(label)]
    assert len(found) == 1, [line.get_label() for line in ax.get_lines()]
    return found[0]


@pytest.mark.skipif(not exact_available(), reason="needs highspy")
def test_the_frontier_chart_draws_the_curve_from_now_and_marks_the_knee() -> None:
    plan, cfg = _frontier_plan()
    assert plan.frontier is not None
    ax = Figure().add_subplot()
    draw_frontier(ax, plan, cfg)
    curve = _line(ax, "lowest imbalance found")
    points = plan.frontier.points
    assert list(curve.get_xdata()) == [0, *(p.migrations for p in points)]
    assert list(curve.get_ydata()) == pytest.approx(
        [plan.overall_before, *(p.imbalance for p in points)]
    )
    knee = _line(ax, "knee")
    at = plan.frontier.at(plan.frontier.knee)
    assert at is not None
    assert (list(knee.get_xdata()), list(knee.get_ydata())) == (
        [plan.frontier.knee],
        pytest.approx([at.imbalance]),
    )
    assert list(_line(ax, "the plan").get_xdata()) == [len(plan.migrations)]
    assert ax.get_xlabel() == "migrations (k)"
    assert not ax.texts


@pytest.mark.skipif(not exact_available(), reason="needs highspy")
def test_the_frontier_chart_draws_a_lower_bound_only_where_one_is_proven_and_not_reached() -> None:
    plan, cfg = _frontier_plan()
    assert plan.frontier is not None
    first, *rest = plan.frontier.points
    # A point the search did not prove: its bound lies below it and is drawn.
    loose = replace(first, exact=False, lower_bound=first.imbalance / 2)
    plan.frontier = replace(plan.frontier, points=(loose, *(replace(p, exact=True) for p in rest)))
    ax = Figure().add_subplot()
    draw_frontier(ax, plan, cfg)
    bound = _line(ax, "proven lower bound")
    assert list(bound.get_xdata()) == [loose.migrations]
    assert list(bound.get_ydata()) == pytest.approx([loose.imbalance / 2])
    assert list(_line(ax, "best found").get_xdata()) == [loose.migrations]
    # Every point proven optimal: nothing to bound, no bound drawn.
    plan.frontier = replace(
        plan.frontier, points=tuple(replace(p, exact=True) for p in (first, *rest))
    )
    proven = Figure().add_subplot()
    draw_frontier(proven, plan, cfg)
    assert not [line for line in proven.get_lines() if line.get_label() == "proven lower bound"]


@pytest.mark.skipif(not exact_available(), reason="needs highspy")
def test_a_frontier_without_numbers_says_no_data() -> None:
    plan, cfg = _frontier_plan()
    assert plan.frontier is not None
    blank = tuple(replace(p, imbalance=math.nan) for p in plan.frontier.points)
    plan.frontier = replace(plan.frontier, points=blank)
    ax = Figure().add_subplot()
    draw_frontier(ax, plan, cfg)
    assert [t.get_text() for t in ax.texts] == ["no data"]


@pytest.mark.skipif(not exact_available(), reason="needs highspy")
def test_the_report_draws_the_frontier_only_where_balancing_ran(tmp_path: Path) -> None:
    plan, cfg = _frontier_plan()
    history = fleet(4)
    analysis = analyse(history, cfg, None)
    charts = draw_charts(tmp_path, history, analysis, plan, cfg)
    assert charts["frontier"] == CHARTS["frontier"]
    assert (tmp_path / CHARTS["frontier"]).read_bytes().startswith(b"\x89PNG")
    plan.frontier = None
    again = draw_charts(tmp_path, history, analysis, plan, cfg)
    assert "frontier" not in again
    assert not (tmp_path / CHARTS["frontier"]).exists()
