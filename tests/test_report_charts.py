"""The report's charts at fleet size and without data: the busiest nodes drawn one by one and
the rest as one band, time axes in UTC over the period, "no data" rather than 1970."""

from __future__ import annotations

import matplotlib.dates as mdates
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from recommender.history import History, Window
from recommender.model import RESOURCES
from recommender.outputs.report.analysis import TABLE_NODES, busiest_nodes, node_statistics
from recommender.outputs.report.charts import CHART_NODES, _dates, _time_axis, chart_nodes


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
