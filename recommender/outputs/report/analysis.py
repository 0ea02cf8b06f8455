"""The report's analysis: pure functions over a `History` (no server, no drawing).

The imbalance at each step is `recommender.measure`'s definition over the nodes active at
that step; node statistics, the top VMs and the cluster utilisation come from the same
frames.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from recommender.config import Config
from recommender.engine.measure import imbalance_per_resource, overall_imbalance, weight_vector
from recommender.history import History, Window
from recommender.model import RESOURCES, utilisation
from recommender.outputs.report.forecast import (
    DAY,
    ResourceForecast,
    capacity_forecasts,
    fit_line,
)
from recommender.outputs.report.migrations import (
    ObservedMigration,
    detect_migrations,
    migration_effects,
)

TOP_VMS = 5
# Order of the top-VM tables: what usually makes a node hot first.
TOP_ORDER: tuple[str, ...] = ("disk_bytes", "disk_ops", "network", "cpu", "memory")


# --- imbalance over time ---------------------------------------------------------------------


def imbalance_series(history: History, config: Config) -> pd.DataFrame:
    """(time x [*RESOURCES, "overall"]) imbalance, as `recommender.measure` defines it, over
    the nodes active at each step; NaN at steps without data or without an active node."""
    weights = weight_vector(config.balance.weights, RESOURCES)
    load = np.stack([history.load[r].to_numpy(dtype=float) for r in RESOURCES], axis=2)
    cap = np.stack([history.capacity[r].to_numpy(dtype=float) for r in RESOURCES], axis=2)
    cap = np.where(np.isfinite(cap) & (cap > 0), cap, 0.0)
    active = history.active.to_numpy(dtype=bool)
    has_data = history.has_data.to_numpy(dtype=bool)
    rows = np.full((len(history.active.index), len(RESOURCES) + 1), np.nan)
    for k in range(rows.shape[0]):
        if not has_data[k] or not active[k].any():
            continue
        per = imbalance_per_resource(load[k][active[k]], cap[k][active[k]])
        rows[k, :-1] = per
        rows[k, -1] = overall_imbalance(np.where(weights > 0, per, 0.0), weights)
    return pd.DataFrame(rows, index=history.active.index, columns=[*RESOURCES, "overall"])


def cluster_utilisation(history: History) -> pd.DataFrame:
    """(time x resource) total load over total capacity of the active nodes (the cluster mean
    U[r] of the imbalance definition)."""
    out = {}
    for resource in RESOURCES:
        active = history.active
        load = history.load[resource].where(active).sum(axis=1, min_count=1)
        cap = history.capacity[resource].where(active).sum(axis=1, min_count=1)
        out[resource] = utilisation(load, cap).where(history.has_data)
    return pd.DataFrame(out)


@dataclass(frozen=True)
class ImbalanceSummary:
    resource: str
    now: float | None
    minimum: float | None
    mean: float | None
    maximum: float | None
    above_seconds: float
    above_fraction: float | None


def summarise_imbalance(
    series: pd.DataFrame, trigger: float, step: float, now: Mapping[str, float] | None
) -> list[ImbalanceSummary]:
    """Min / mean / max over the period and time spent above the trigger, per column."""
    out = []
    for column in series.columns:
        values = series[column].dropna()
        above = int((values > trigger).sum())
        current = None if now is None else now.get(column)
        if current is None and len(values):
            current = float(values.iloc[-1])
        out.append(
            ImbalanceSummary(
                resource=column,
                now=current,
                minimum=float(values.min()) if len(values) else None,
                mean=float(values.mean()) if len(values) else None,
                maximum=float(values.max()) if len(values) else None,
                above_seconds=above * step,
                above_fraction=above / len(values) if len(values) else None,
            )
        )
    return out


# --- nodes -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeStats:
    node: str
    capacity: float
    mean_load: float
    peak_load: float
    mean_util: float
    peak_util: float
    first_util: float
    last_util: float
    trend_per_day: float  # utilisation points (as a fraction) per day, least squares


# A trend per day is shown only from this much data: one day's line is its daily cycle.
MIN_TREND_SECONDS = 3 * DAY


def edge_seconds(window: Window) -> float:
    """How much of each end of the period "first/last day" compares: a day, or half of a
    shorter period."""
    return min(DAY, window.span / 2)


def node_statistics(history: History, resource: str) -> list[NodeStats]:
    """Capacity, mean and peak load and utilisation, first vs last day, and the trend."""
    window = history.window
    load = history.load[resource].where(history.has_data, axis=0)
    util = history.utilisation(resource).where(history.has_data, axis=0)
    times = util.index.to_numpy(dtype=float)
    edge = edge_seconds(window)
    first = times - window.begin <= edge + 1e-6
    last = times > window.end - edge + 1e-6
    # Read once: it groups every presence row (a million at 10,000 VMs over a day).
    trend = history.covered >= MIN_TREND_SECONDS
    out = []
    for node in history.nodes:
        capacity = history.capacity[resource][node].dropna()
        series = util[node].to_numpy(dtype=float)
        fit = fit_line(times, series) if trend else None
        out.append(
            NodeStats(
                node=node,
                capacity=float(capacity.iloc[-1]) if len(capacity) else math.nan,
                mean_load=_nanmean(load[node].to_numpy(dtype=float)),
                peak_load=_nanmax(load[node].to_numpy(dtype=float)),
                mean_util=_nanmean(series),
                peak_util=_nanmax(series),
                first_util=_nanmean(series[first]),
                last_util=_nanmean(series[last]),
                trend_per_day=fit.per_day if fit is not None else math.nan,
            )
        )
    return out


# Nodes each per-resource table lists one by one; the others are summarised in one row.
TABLE_NODES = 20


def busiest_nodes(stats: list[NodeStats], count: int = TABLE_NODES) -> list[NodeStats]:
    """The `count` nodes with the highest peak utilisation, then one row for the others
    (the mean of each column, capacity and loads summed): a table of 400 nodes is unread."""
    if len(stats) <= count:
        return stats
    ranked = sorted(stats, key=lambda n: (-np.nan_to_num(n.peak_util, nan=-1.0), n.node))
    shown, rest = ranked[:count], ranked[count:]

    def mean(field: str) -> float:
        return _nanmean(np.array([getattr(n, field) for n in rest], dtype=float))

    def total(field: str) -> float:
        return float(np.nansum([getattr(n, field) for n in rest]))

    summary = NodeStats(
        node=f"{len(rest)} other nodes (mean per node)",
        capacity=total("capacity") / len(rest),
        mean_load=mean("mean_load"),
        peak_load=mean("peak_load"),
        mean_util=mean("mean_util"),
        peak_util=mean("peak_util"),
        first_util=mean("first_util"),
        last_util=mean("last_util"),
        trend_per_day=mean("trend_per_day"),
    )
    return [*shown, summary]


def _nanmean(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if len(finite) else math.nan


def _nanmax(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.max()) if len(finite) else math.nan


# --- VMs -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TopVM:
    vm: str
    name: str
    node: str  # where it spent most of the period
    load: float  # mean over the period, wherever it ran
    capacity_share: float  # load / capacity of `node`
    node_share: float  # its part of the load `node` carried in the period
    moved: bool  # ran on more than one node in the period


def vm_homes(presence: pd.DataFrame) -> pd.DataFrame:
    """Per VM: the node it spent most steps on (ties: the one seen last), its latest name,
    and how many nodes it ran on."""
    if presence.empty:
        return pd.DataFrame(columns=["node", "name", "nodes"])
    per_pair = presence.groupby(["vm", "node"]).agg(steps=("step", "nunique"), last=("step", "max"))
    per_pair = per_pair.reset_index().sort_values(["vm", "steps", "last"])
    home = per_pair.groupby("vm").tail(1).set_index("vm")["node"]
    latest = presence.sort_values("step", kind="stable").groupby("vm").tail(1)
    names = latest.set_index("vm")["name"]
    count = per_pair.groupby("vm")["node"].nunique()
    return pd.DataFrame({"node": home, "name": names, "nodes": count})


def vm_contributions(history: History) -> pd.DataFrame:
    """(node, vm) x resource: each VM's mean load over the time the data covers, on each node.
    The queries divide the rates by the whole period; a period only partly covered by data
    (a 7-day report over 1 day) divides by the covered time instead. Memory (a level) is
    weighted by the share of the covered steps spent there."""
    pairs = history.pairs.copy()
    presence = history.presence
    if presence.empty or pairs.empty:
        return pairs
    window, covered = history.window, history.covered
    if 0 < covered < window.span:
        rates = [r for r in pairs.columns if r != "memory"]
        pairs[rates] = pairs[rates] * (window.span / covered)
    data = np.flatnonzero(history.has_data.to_numpy(dtype=bool))
    covered_steps = window.points - int(data[0]) if len(data) else window.points
    steps = presence.groupby(["node", "vm"])["step"].nunique() / covered_steps
    fraction = steps.reindex(pairs.index).fillna(0.0)
    pairs["memory"] = pairs["memory"] * fraction
    return pairs


def top_vms(
    history: History,
    resource: str,
    count: int = TOP_VMS,
    contributions: pd.DataFrame | None = None,
    homes: pd.DataFrame | None = None,
) -> list[TopVM]:
    """The VMs with the largest mean load of `resource` over the period (`contributions`
    and `homes`: `vm_contributions` and `vm_homes` of the history, when already known)."""
    if contributions is None:
        contributions = vm_contributions(history)
    if homes is None:
        homes = vm_homes(history.presence)
    if contributions.empty or homes.empty:
        return []
    column = contributions[resource].dropna()
    per_vm = column.groupby(level="vm").sum()
    per_node = column.groupby(level="node").sum()
    per_vm = per_vm[per_vm.index.isin(homes.index)]
    ranked = per_vm.sort_values(ascending=False, kind="stable").head(count)
    capacity = history.capacity[resource].mean(axis=0)
    out = []
    for vm, load in ranked.items():
        node = str(homes.at[vm, "node"])
        on_node = float(column.get((node, vm), 0.0))
        node_total = float(per_node.get(node, math.nan))
        node_capacity = float(capacity.get(node, math.nan))
        out.append(
            TopVM(
                vm=str(vm),
                name=str(homes.at[vm, "name"]),
                node=node,
                load=float(load),
                capacity_share=load / node_capacity if node_capacity > 0 else math.nan,
                node_share=on_node / node_total if node_total > 0 else math.nan,
                moved=int(str(homes.at[vm, "nodes"])) > 1,
            )
        )
    return out


# --- the whole period ------------------------------------------------------------------------


@dataclass(frozen=True)
class Analysis:
    """What the period shows, as the report's sections and charts need it."""

    series: pd.DataFrame  # (time x [*RESOURCES, "overall"]) imbalance
    cluster: pd.DataFrame  # (time x resource) cluster utilisation
    summary: list[ImbalanceSummary]
    nodes: dict[str, list[NodeStats]]
    edge_label: str  # "day" or "half": what first/last compare
    top: dict[str, list[TopVM]]
    migrations: list[ObservedMigration]
    forecasts: list[ResourceForecast]


def analyse(history: History, config: Config, now: Mapping[str, float] | None) -> Analysis:
    """Every section's figures from the history; `now` is the current imbalance per
    resource and overall (the plan's), when there is one."""
    window = history.window
    series = imbalance_series(history, config)
    cluster = cluster_utilisation(history)
    observed = detect_migrations(history.presence, window.step)
    contributions, homes = vm_contributions(history), vm_homes(history.presence)
    return Analysis(
        series=series,
        cluster=cluster,
        summary=summarise_imbalance(series, config.balance.trigger, window.step, now),
        nodes={r: busiest_nodes(node_statistics(history, r)) for r in RESOURCES},
        edge_label="day" if edge_seconds(window) >= DAY else "half",
        top={r: top_vms(history, r, TOP_VMS, contributions, homes) for r in TOP_ORDER},
        migrations=migration_effects(observed, series["overall"], window.step),
        forecasts=capacity_forecasts(cluster, config, window.end),
    )


__all__ = [
    "TOP_ORDER",
    "Analysis",
    "ImbalanceSummary",
    "NodeStats",
    "TopVM",
    "analyse",
    "busiest_nodes",
    "cluster_utilisation",
    "edge_seconds",
    "imbalance_series",
    "node_statistics",
    "summarise_imbalance",
    "top_vms",
    "vm_contributions",
    "vm_homes",
]
