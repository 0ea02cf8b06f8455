"""The report's charts (matplotlib, PNG): imbalance over the period, node utilisation, the
plan before and after, the trade-off frontier, the capacity forecast.

Every label a tenant or an admin chose goes through `chart_label`: one line, no mathtext.
Each chart is written through `recommender.output_file`, like every file the product writes.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import dates as mdates
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from recommender.config import Config
from recommender.history import History
from recommender.model import RESOURCES
from recommender.output_file import write_output
from recommender.outputs.report.forecast import ResourceForecast
from recommender.outputs.report.migrations import ObservedMigration
from recommender.plan import Plan
from recommender.quoting import display

CHART_SIZE = (10.0, 6.0)  # inches; at CHART_DPI: 1000 x 600 px
CHART_DPI = 100
# Nodes drawn one by one in the utilisation and plan charts; the rest as one band.
CHART_NODES = 12

RESOURCE_LABELS: dict[str, str] = {
    "cpu": "CPU",
    "memory": "memory",
    "disk_bytes": "disk throughput",
    "disk_ops": "disk operations",
    "network": "network",
}

# The chart files of a report, by what they show.
CHARTS: dict[str, str] = {
    "imbalance": "imbalance.png",
    "utilisation": "utilisation.png",
    "plan": "plan.png",
    "frontier": "frontier.png",
    "forecast": "forecast.png",
}


def chart_label(text: object) -> str:
    """Text safe as a matplotlib label: one line, no mathtext, not hidden from the legend."""
    flat = display(text)
    flat = flat.replace("$", r"\$")
    return "\u200b" + flat if flat.startswith("_") else flat


def _figure() -> Figure:
    return Figure(figsize=CHART_SIZE, dpi=CHART_DPI, layout="constrained")


def _dates(index: pd.Index) -> pd.DatetimeIndex:
    return pd.to_datetime(index.to_numpy(dtype=float), unit="s", utc=True).tz_localize(None)


def _time_axis(ax: Any, x: pd.DatetimeIndex, values: Sequence[Any] = ()) -> None:
    """Dates in UTC over the period itself (not matplotlib's 1970 default when nothing was
    drawn), with "no data" written on a panel whose series hold no number."""
    locator = mdates.AutoDateLocator(minticks=3, maxticks=8)
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
    ax.tick_params(labelsize=7)
    ax.set_xlabel("time (UTC)", fontsize=7)
    if len(x) > 1:
        ax.set_xlim(x[0], x[-1])
    if values and not any(np.isfinite(np.asarray(v, dtype=float)).any() for v in values):
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center")


def _save(fig: Figure, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=CHART_DPI, format="png")
    write_output(path, buffer.getvalue())
    return path


def chart_imbalance(
    series: pd.DataFrame,
    migrations: Sequence[ObservedMigration],
    config: Config,
    path: Path,
) -> Path:
    """Imbalance per resource and overall over the period, with trigger, target and the
    migrations that happened."""
    fig = _figure()
    ax = fig.add_subplot()
    x = _dates(series.index)
    for resource in RESOURCES:
        ax.plot(x, series[resource], linewidth=0.8, alpha=0.7, label=RESOURCE_LABELS[resource])
    ax.plot(x, series["overall"], color="black", linewidth=2.0, label="overall")
    ax.axhline(config.balance.trigger, color="tab:red", linestyle="--", label="trigger")
    ax.axhline(config.balance.target, color="tab:green", linestyle=":", label="target")
    for i, m in enumerate(migrations):
        ax.axvline(
            mdates.date2num(datetime.fromtimestamp(m.time, tz=UTC)),
            color="grey",
            linewidth=0.8,
            alpha=0.6,
            label="migration" if i == 0 else None,
        )
    ax.set_ylabel("imbalance (max node utilisation − cluster mean)")
    ax.set_title("Imbalance over the period")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7, ncols=4, loc="upper left")
    _time_axis(ax, x, [series["overall"].to_numpy(dtype=float)])
    return _save(fig, path)


def chart_nodes(history: History, count: int) -> list[str]:
    """The `count` nodes drawn one line each: the highest mean utilisation over every
    resource; the others are drawn as one band."""
    if len(history.nodes) <= count:
        return list(history.nodes)
    means = pd.concat(
        [history.utilisation(r).where(history.has_data, axis=0).mean() for r in RESOURCES],
        axis=1,
    ).mean(axis=1)
    return list(means.sort_values(ascending=False, kind="stable").index[:count])


def chart_utilisation(history: History, cluster: pd.DataFrame, path: Path) -> Path:
    """One panel per resource: the busiest nodes' utilisation one line each, the range of
    the others as a band, and the cluster mean; readable at hundreds of nodes."""
    fig = _figure()
    axes = fig.subplots(2, 3, sharex=True)
    x = _dates(cluster.index)
    handles: dict[str, Any] = {}
    shown = chart_nodes(history, CHART_NODES)
    rest = [n for n in history.nodes if n not in shown]
    for ax, resource in zip(axes.flat, RESOURCES, strict=False):
        util = history.utilisation(resource).where(history.has_data, axis=0)
        for node in shown:
            (line,) = ax.plot(x, 100 * util[node], linewidth=0.9)
            handles.setdefault(chart_label(node), line)
        if rest:
            others = 100 * util[rest]
            band = ax.fill_between(
                x, others.min(axis=1), others.max(axis=1), color="lightgrey", alpha=0.7
            )
            handles.setdefault(f"{len(rest)} other nodes (range)", band)
        (mean,) = ax.plot(x, 100 * cluster[resource], color="black", linestyle="--")
        handles.setdefault("cluster mean", mean)
        ax.set_title(f"{RESOURCE_LABELS[resource]} (% of capacity)", fontsize=9)
        ax.set_ylim(bottom=0)
        _time_axis(ax, x, [cluster[resource].to_numpy(dtype=float)])
    legend = axes.flat[-1]
    legend.axis("off")
    legend.legend(list(handles.values()), list(handles), fontsize=8, loc="center", ncols=2)
    fig.suptitle("Node utilisation over the period", fontsize=11)
    return _save(fig, path)


def chart_plan(plan: Plan, path: Path) -> Path:
    """Per resource, each node's utilisation before and after the plan; last panel the
    imbalance per resource before and after."""
    fig = _figure()
    axes = fig.subplots(2, 3)
    # At fleet size, the nodes the plan changes most (the table lists them all).
    change = pd.concat(
        [
            (plan.nodes_after[f"{r}_util"] - plan.nodes_before[f"{r}_util"]).abs().fillna(0.0)
            for r in RESOURCES
        ],
        axis=1,
    ).sum(axis=1)
    picked = change.sort_values(ascending=False, kind="stable").index[:CHART_NODES]
    order = [n for n in plan.nodes_before.index if n in set(picked)]
    nodes = [chart_label(n) for n in order]
    x = np.arange(len(nodes))
    for ax, resource in zip(axes.flat, RESOURCES, strict=False):
        before = 100 * plan.nodes_before.loc[order, f"{resource}_util"].to_numpy(dtype=float)
        after = 100 * plan.nodes_after.loc[order, f"{resource}_util"].to_numpy(dtype=float)
        ax.bar(x - 0.2, np.nan_to_num(before), 0.4, label="before", color="tab:orange")
        ax.bar(x + 0.2, np.nan_to_num(after), 0.4, label="after", color="tab:blue")
        ax.set_xticks(x, nodes, fontsize=7, rotation=30 if len(nodes) > 6 else 0)
        ax.set_title(f"{RESOURCE_LABELS[resource]} (% of capacity)", fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
    summary = axes.flat[-1]
    labels = [*RESOURCES, "overall"]
    imbalance_before = [plan.imbalance_before.get(r, 0.0) for r in RESOURCES]
    imbalance_after = [plan.imbalance_after.get(r, 0.0) for r in RESOURCES]
    before = np.array([*imbalance_before, plan.overall_before])
    after = np.array([*imbalance_after, plan.overall_after])
    y = np.arange(len(labels))
    summary.bar(y - 0.2, before, 0.4, label="before", color="tab:orange")
    summary.bar(y + 0.2, after, 0.4, label="after", color="tab:blue")
    summary.set_xticks(y, [RESOURCE_LABELS.get(r, r) for r in labels], fontsize=7, rotation=30)
    summary.set_title("imbalance", fontsize=9)
    summary.tick_params(axis="y", labelsize=7)
    summary.legend(fontsize=7)
    fig.suptitle("The recommended plan: before and after", fontsize=11)
    return _save(fig, path)


def chart_frontier(plan: Plan, config: Config, path: Path) -> Path:
    """The trade-off curve (`draw_frontier`) as a PNG."""
    fig = _figure()
    draw_frontier(fig.add_subplot(), plan, config)
    return _save(fig, path)


def draw_frontier(ax: Any, plan: Plan, config: Config) -> None:
    """Per number of migrations the lowest overall imbalance known (filled where proven
    optimal), its proven lower bound where one is above zero and not reached, the knee, the
    plan itself, and the trigger and target; k = 0 is the cluster now."""
    frontier = plan.frontier
    points = frontier.points if frontier is not None else ()
    k = np.array([p.migrations for p in points], dtype=float)
    imbalance = np.array([p.imbalance for p in points], dtype=float)
    exact = np.array([p.exact for p in points], dtype=bool)
    bound = np.array([p.lower_bound for p in points], dtype=float)
    ax.plot(
        np.r_[0.0, k],
        np.r_[plan.overall_before, imbalance],
        color="black",
        linewidth=1.5,
        label="lowest imbalance found",
    )
    ax.plot([0.0], [plan.overall_before], "s", color="tab:grey", label="now (no migration)")
    if exact.any():
        ax.plot(k[exact], imbalance[exact], "o", color="black", label="proven optimal")
    if (~exact).any():
        ax.plot(k[~exact], imbalance[~exact], "o", mfc="white", color="black", label="best found")
    proven = np.isfinite(bound) & (bound > 0) & ~exact
    if proven.any():
        ax.plot(k[proven], bound[proven], "v--", color="tab:purple", label="proven lower bound")
    if frontier is not None:
        knee = frontier.at(frontier.knee)
        at = plan.overall_before if knee is None else knee.imbalance
        label = f"knee ({frontier.knee} migrations)"
        ax.plot([frontier.knee], [at], "*", color="tab:red", ms=16, label=label)
    if plan.migrations:
        label = f"the plan ({len(plan.migrations)} migrations)"
        ax.plot(
            [len(plan.migrations)],
            [plan.overall_after],
            "D",
            mfc="none",
            color="tab:blue",
            ms=11,
            label=label,
        )
    ax.axhline(config.balance.trigger, color="tab:red", linestyle="--", label="trigger")
    ax.axhline(config.balance.target, color="tab:green", linestyle=":", label="target")
    ax.set_xlabel("migrations (k)")
    ax.set_ylabel("overall imbalance (max node utilisation − cluster mean)")
    ax.set_title("Trade-off: the lowest overall imbalance reachable with k migrations")
    ax.set_xlim(-0.5, float(np.r_[1.0, k].max()) + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(bottom=0)
    if not np.isfinite(imbalance).any():
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center")
    ax.legend(fontsize=8, loc="upper right")


def chart_forecast(
    cluster: pd.DataFrame, forecasts: Sequence[ResourceForecast], end: float, path: Path
) -> Path:
    """Per resource: cluster utilisation, its daily means, the fitted line to the horizon,
    and the planning limit and 100 %."""
    fig = _figure()
    axes = fig.subplots(2, 3)
    x = _dates(cluster.index)
    drawn: set[str] = set()
    for ax, item in zip(axes.flat, forecasts, strict=False):
        result = item.forecast
        drawn.add("utilisation")
        ax.plot(x, 100 * cluster[item.resource], color="lightgrey", linewidth=0.7)
        if len(result.day_times):
            ax.plot(
                _dates(pd.Index(result.day_times)),
                100 * result.day_means,
                "o",
                color="tab:blue",
                markersize=4,
            )
            drawn.add("daily")
        if result.fit is not None:
            drawn.add("trend" if result.fit.significant else "flat")
            horizon = end + item.to_limit.horizon
            line_t = np.array([float(result.day_times[0]), horizon])
            ax.plot(
                _dates(pd.Index(line_t)),
                100 * np.asarray(result.fit.at(line_t)),
                color="tab:blue" if result.fit.significant else "grey",
                linestyle="--",
            )
        ax.axhline(100 * item.limit, color="tab:orange", linestyle=":", linewidth=1)
        ax.axhline(100, color="tab:red", linestyle="-", linewidth=1)
        ax.set_ylim(0, 110)
        ax.set_title(f"{RESOURCE_LABELS[item.resource]} (% of cluster)", fontsize=9)
        _time_axis(ax, x, [cluster[item.resource].to_numpy(dtype=float)])
    key = axes.flat[-1]
    key.axis("off")
    key.plot([], [], color="lightgrey", label="cluster utilisation")
    if "daily" in drawn:
        key.plot([], [], "o", color="tab:blue", label="daily mean")
    if "trend" in drawn:
        key.plot([], [], color="tab:blue", linestyle="--", label="linear fit, extrapolated")
    if "flat" in drawn:
        key.plot([], [], color="grey", linestyle="--", label="linear fit, no clear trend")
    key.plot([], [], color="tab:orange", linestyle=":", label="planning limit")
    key.plot([], [], color="tab:red", label="capacity (100 %)")
    key.legend(fontsize=8, loc="center")
    fig.suptitle("Capacity forecast (least-squares line through the daily means)", fontsize=11)
    return _save(fig, path)


__all__ = [
    "CHARTS",
    "RESOURCE_LABELS",
    "chart_forecast",
    "chart_frontier",
    "chart_imbalance",
    "chart_label",
    "chart_nodes",
    "chart_plan",
    "chart_utilisation",
    "draw_frontier",
]
