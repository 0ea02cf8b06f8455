"""`vmbalance report`: the weekly Markdown report with charts, from Prometheus history.

What it reads: a fixed set of PromQL queries whatever the number of VMs (docs/report.md
lists them) — range queries at a step of about period/336 (30 min for a week, so every
series has at most 336 points), each aggregated `by (node)` or `by (node, vm)`, a few
instant queries over the whole period, and the recommender's own snapshot at the end of the
period for the plan.

Node load at each step is `sum by (node) (increase(counter[step])) / step`: the work done on
the node in that step, wherever the VM doing it ran before or after, so a migration moves the
load from one step to the next with no double counting. The imbalance at each step is
computed from those node loads and capacities by `recommender.engine.measure`, the
recommender's one definition. Migrations come from
`count_over_time(vmbalance_vm_info[step])` per (node, vm): a VM on a new node in one step
after another node in the step before; how many samples it has in that first step dates its
arrival to within a scrape interval, without a subquery (a `timestamp()` subquery at
one-minute resolution over a week costs 10,080 evaluations).
Names are untrusted: everything a tenant can choose goes through the escaping filters of
`recommender.markdown`.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import dates as mdates
from matplotlib.figure import Figure

from recommender.config import Config, QuerySettings, duration_seconds
from recommender.engine.measure import (
    imbalance_per_resource,
    needed_resources,
    overall_imbalance,
    weight_vector,
)
from recommender.forecast import (
    DAY,
    HORIZON,
    MIN_POINTS,
    Crossing,
    Forecast,
    Outcome,
    fit_line,
    forecast,
)
from recommender.markdown import environment
from recommender.model import RESOURCES, Snapshot
from recommender.output_file import write_output
from recommender.plan import Plan, build_plan
from recommender.preflight import SnapshotUnusable, check_snapshot
from recommender.prometheus import (
    RATE_COUNTERS,
    PrometheusSource,
    SnapshotQueries,
    SourceError,
    counter_sum,
)
from recommender.quoting import display
from recommender.render import commands_refusal, plan_commands, plan_document, render_commands
from recommender.text import in_gib

# Points per series: a week at 30-minute steps. The step is rounded up to whole minutes.
TARGET_POINTS = 336
MIN_STEP = 60.0
MIN_PERIOD = 3600.0
TOP_VMS = 5
# Steps compared on each side of a migration to judge its effect on the imbalance.
EFFECT_POINTS = 2
CHART_SIZE = (10.0, 6.0)  # inches; at CHART_DPI: 1000 x 600 px
CHART_DPI = 100

RESOURCE_LABELS: dict[str, str] = {
    "cpu": "CPU",
    "memory": "memory",
    "disk_bytes": "disk throughput",
    "disk_ops": "disk operations",
    "network": "network",
}
RESOURCE_TITLES: dict[str, str] = {
    r: label[:1].upper() + label[1:] for r, label in RESOURCE_LABELS.items()
}
# Order of the top-VM tables: what usually makes a node hot first.
TOP_ORDER: tuple[str, ...] = ("disk_bytes", "disk_ops", "network", "cpu", "memory")

CHARTS: dict[str, str] = {
    "imbalance": "imbalance.png",
    "utilisation": "utilisation.png",
    "plan": "plan.png",
    "forecast": "forecast.png",
}


class ReportError(SourceError):
    """The report cannot be made (no data in the period, a bad period); one line."""


# --- the time axis ---------------------------------------------------------------------------


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


def parse_period(period: str) -> float:
    try:
        seconds = duration_seconds(period)
    except ValueError as exc:
        raise ReportError(f"period: {exc}") from None
    if seconds < MIN_PERIOD:
        raise ReportError(f"period {period!r} is too short (at least 1h)")
    return seconds


# --- queries -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReportQueries:
    """The PromQL of one report: range queries (evaluated every step) and instant queries
    (evaluated once at the end, over the whole covered span). Fixed in number."""

    ranges: Mapping[str, str]
    instants: Mapping[str, str]

    @classmethod
    def for_config(cls, config: Config, window: Window) -> ReportQueries:
        step = f"{window.step:.0f}s"
        ranges: dict[str, str] = {
            # Samples of each (node, vm) in each step: where a VM was, and (from how many
            # samples it has in its first step on a node) when it arrived there.
            "presence": f"max by (node, vm, name) (count_over_time(vmbalance_vm_info[{step}]))",
        }
        for resource, counters in RATE_COUNTERS.items():
            ranges[f"load_{resource}"] = (
                f"({counter_sum(counters, step, 'node')}) / {window.step:.0f}"
            )
        memory = _memory_family(config)
        ranges["load_memory"] = f"sum by (node) ({memory})"
        ranges["capacity_cpu"] = f"max by (node) (max_over_time(vmbalance_node_cpus[{step}]))"
        ranges["capacity_memory"] = (
            f"max by (node) (max_over_time(vmbalance_node_memory_bytes[{step}]))"
        )
        ranges["up"] = f"min by (node) (last_over_time(vmbalance_up[{step}]))"
        # Per-VM loads over the whole span: the snapshot's own queries with the span as window.
        span_query = QuerySettings(window=f"{window.span:.0f}s", estimator="mean")
        span = SnapshotQueries.for_config(config.model_copy(update={"query": span_query}))
        instants = {f"vm_{r}": span.queries[f"load_{r}"] for r in RATE_COUNTERS}
        instants["vm_memory"] = span.queries[_MEMORY_QUERY[config.balance.memory_column]]
        return cls(ranges=ranges, instants=instants)

    def __len__(self) -> int:
        return len(self.ranges) + len(self.instants)


# The snapshot query and the metric family of each memory column of a VM.
_MEMORY_QUERY = {"memory_max_bytes": "memory_max", "memory": "load_memory"}
_MEMORY_FAMILY = {
    "memory_max_bytes": "vmbalance_vm_memory_max_bytes",
    "memory": "vmbalance_vm_memory_used_bytes",
}


def _memory_family(config: Config) -> str:
    """The memory a VM weighs, as the engine counts it (`balance.memory_column`)."""
    return _MEMORY_FAMILY[config.balance.memory_column]


# --- answers into frames -------------------------------------------------------------------


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def node_matrix(result: list[dict[str, Any]], times: np.ndarray) -> pd.DataFrame:
    """A range answer aggregated by node as a (time x node) frame; NaN where absent."""
    index = pd.Index(np.round(times, 3), name="time")
    columns: dict[str, pd.Series] = {}
    for item in result:
        node = item["metric"].get("node")
        if node is None or not item["values"]:
            continue
        stamps = np.round([_float(v[0]) for v in item["values"]], 3)
        values = [_float(v[1]) for v in item["values"]]
        series = pd.Series(values, index=stamps, dtype=float)
        series = series[~series.index.duplicated()].reindex(index)
        columns[node] = series if node not in columns else columns[node].fillna(series)
    return pd.DataFrame(columns, index=index, dtype=float)


def presence_frame(result: list[dict[str, Any]], times: np.ndarray) -> pd.DataFrame:
    """Rows (vm, node, step, time, samples, name) from the presence range answer: `step`
    indexes `times`, `time` is its value, `samples` the VM's samples on the node in that step
    (a rename inside a step adds up; the name is the latest seen)."""
    position = {t: i for i, t in enumerate(np.round(times, 3).tolist())}
    rows = []
    for item in result:
        labels = item["metric"]
        if "vm" not in labels or "node" not in labels:
            continue
        for stamp, value in item["values"]:
            k = position.get(round(_float(stamp), 3))
            samples = _float(value)
            if k is not None and math.isfinite(samples) and samples > 0:
                rows.append((labels["vm"], labels["node"], k, samples, labels.get("name", "")))
    columns = ["vm", "node", "step", "samples", "name"]
    frame = pd.DataFrame(rows, columns=columns).astype(
        {"vm": object, "node": object, "step": int, "samples": float, "name": object}
    )
    frame = frame.groupby(["vm", "node", "step"], as_index=False, sort=True).agg(
        samples=("samples", "sum"), name=("name", "last")
    )
    frame.insert(3, "time", np.asarray(times, dtype=float)[frame["step"].to_numpy(dtype=int)])
    return frame


def scrape_intervals(presence: pd.DataFrame, step: float) -> pd.Series:
    """Seconds between samples per node: the step over the mean number of samples of a VM in
    the steps it was on the node throughout (also there in the steps before and after)."""
    if presence.empty:
        return pd.Series(dtype=float)
    ordered = presence.sort_values(["vm", "node", "step"])
    pair = ordered["vm"].astype(str) + "\0" + ordered["node"].astype(str)
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


def pair_values(result: list[dict[str, Any]]) -> pd.Series:
    """An instant answer aggregated by (node, vm) as a Series indexed by (node, vm)."""
    data = {
        (item["metric"]["node"], item["metric"]["vm"]): _float(item["value"][1])
        for item in result
        if "node" in item["metric"] and "vm" in item["metric"]
    }
    index = pd.MultiIndex.from_tuples(list(data), names=["node", "vm"]) if data else None
    if index is None:
        return pd.Series(dtype=float, index=pd.MultiIndex.from_tuples([], names=["node", "vm"]))
    return pd.Series(list(data.values()), index=index, dtype=float)


# --- history -----------------------------------------------------------------------------------


@dataclass
class History:
    """Node loads and capacities per resource over the window, and VM presence."""

    window: Window
    load: dict[str, pd.DataFrame]  # resource -> (time x node), 0 where a node has no VM
    capacity: dict[str, pd.DataFrame]  # resource -> (time x node), NaN where unknown
    active: pd.DataFrame  # (time x node) bool: counts in the imbalance at that step
    has_data: pd.Series  # (time) bool: any load answered at that step
    presence: pd.DataFrame  # presence_frame rows
    pairs: pd.DataFrame  # (node, vm) x resource: load over the span on that node
    warnings: list[str] = field(default_factory=list)

    @property
    def nodes(self) -> list[str]:
        return list(self.active.columns)

    def utilisation(self, resource: str) -> pd.DataFrame:
        capacity = self.capacity[resource]
        return self.load[resource] / capacity.where(capacity > 0)


def configured_capacity(config: Config, node: str) -> dict[str, float]:
    """Disk and network capacity of a node from the config (the exporter cannot see them)."""
    capacity = config.capacity
    values = {
        "disk_bytes": capacity.disk_bytes,
        "disk_ops": capacity.disk_ops,
        "network": capacity.network,
    }
    values.update({r: float(v) for r, v in capacity.per_node.get(node, {}).items()})
    return values


def assemble_history(
    config: Config,
    window: Window,
    ranges: Mapping[str, list[dict[str, Any]]],
    instants: Mapping[str, list[dict[str, Any]]],
) -> History:
    """Frames from the answers. Pure: no server involved."""
    times = window.times
    presence = presence_frame(ranges["presence"], times)
    raw_load = {r: node_matrix(ranges[f"load_{r}"], times) for r in RESOURCES}
    raw_capacity = {r: node_matrix(ranges[f"capacity_{r}"], times) for r in ("cpu", "memory")}
    up = node_matrix(ranges["up"], times)
    nodes = sorted(
        set(presence["node"]).union(*(f.columns for f in (*raw_load.values(), up)))
        | set(raw_capacity["cpu"].columns)
        | set(raw_capacity["memory"].columns)
    )
    index = raw_load["cpu"].index
    has_data = pd.concat([raw_load[r] for r in RATE_COUNTERS], axis=1).notna().any(axis=1)
    load = {r: raw_load[r].reindex(columns=nodes).fillna(0.0) for r in RESOURCES}
    capacity: dict[str, pd.DataFrame] = {
        r: raw_capacity[r].reindex(columns=nodes) for r in ("cpu", "memory")
    }
    exists = capacity["cpu"].notna() | capacity["memory"].notna()
    for resource in ("disk_bytes", "disk_ops", "network"):
        values = {n: configured_capacity(config, n)[resource] for n in nodes}
        frame = pd.DataFrame(values, index=index, columns=nodes, dtype=float)
        capacity[resource] = frame.where(exists)
    maintenance = set(config.rules.maintenance)
    up_ok = up.reindex(columns=nodes).fillna(1.0) != 0
    known = pd.DataFrame(True, index=index, columns=nodes)
    for resource in needed_resources(config.balance.weights, RESOURCES):
        known &= capacity[resource] > 0
    active = known & up_ok & ~pd.Series({n: n in maintenance for n in nodes}, dtype=bool)
    warnings = []
    for resource, family in (
        ("cpu", "vmbalance_node_cpus"),
        ("memory", "vmbalance_node_memory_bytes"),
    ):
        blind = [n for n in nodes if capacity[resource][n].isna().all()]
        if blind:
            warnings.append(
                f"nodes without {family} in the period ({resource} capacity unknown, left out "
                f"of the imbalance): {', '.join(blind)}"
            )
    down = [n for n in nodes if (up.get(n, pd.Series(dtype=float)) == 0).any()]
    if down:
        warnings.append(
            "nodes whose exporter could not read the hypervisor (vmbalance_up 0) for part of "
            f"the period, left out of the imbalance then: {', '.join(down)}"
        )
    missing = int((~has_data).sum())
    if missing:
        warnings.append(
            f"{missing} of {window.points} steps have no load data (gaps in the history)"
        )
    pairs = pd.DataFrame({r: pair_values(instants[f"vm_{r}"]) for r in RESOURCES})
    pairs.index = pairs.index.set_names(["node", "vm"])
    return History(
        window=window,
        load=load,
        capacity=capacity,
        active=active,
        has_data=has_data,
        presence=presence,
        pairs=pairs,
        warnings=warnings,
    )


def collect_history(source: PrometheusSource, config: Config, window: Window) -> History:
    """Run the report's queries; ReportError when the period holds no vmbalance data."""
    queries = ReportQueries.for_config(config, window)
    ranges: dict[str, list[dict[str, Any]]] = {}
    for name, promql in queries.ranges.items():
        ranges[name] = source.query_range(promql, window.start, window.end, window.step)
        if name == "presence" and not ranges[name]:
            raise ReportError(
                f"no vmbalance data between {format_time(window.begin)} and "
                f"{format_time(window.end)} (no vmbalance_vm_info series at "
                f"{source.display_url})"
            )
    instants = {name: source.query(promql, window.end) for name, promql in queries.instants.items()}
    return assemble_history(config, window, ranges, instants)


# --- imbalance over time ---------------------------------------------------------------------


def imbalance_series(history: History, config: Config) -> pd.DataFrame:
    """(time x [*RESOURCES, "overall"]) imbalance, as `recommender.engine.measure` defines it, over
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
        util = load / cap.where(cap > 0)
        out[resource] = util.where(history.has_data)
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
    out = []
    for node in history.nodes:
        capacity = history.capacity[resource][node].dropna()
        series = util[node].to_numpy(dtype=float)
        fit = fit_line(times, series)
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
    """(node, vm) x resource: each VM's mean load over the period on each node. Rates are
    already that; memory (a level) is weighted by the share of the period spent there."""
    pairs = history.pairs.copy()
    presence = history.presence
    if presence.empty or pairs.empty:
        return pairs
    steps = presence.groupby(["node", "vm"])["step"].nunique() / history.window.points
    fraction = steps.reindex(pairs.index).fillna(0.0)
    pairs["memory"] = pairs["memory"] * fraction
    return pairs


def top_vms(history: History, resource: str, count: int = TOP_VMS) -> list[TopVM]:
    """The VMs with the largest mean load of `resource` over the period."""
    contributions = vm_contributions(history)
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
                moved=int(homes.at[vm, "nodes"]) > 1,
            )
        )
    return out


# --- migrations ------------------------------------------------------------------------------


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
    for vm, rows in presence.groupby("vm", sort=True):
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


# --- forecast --------------------------------------------------------------------------------


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


def describe_crossing(crossing: Crossing) -> str:
    """A table cell: the date and how far away, or why there is none."""
    outcome = crossing.outcome
    if outcome is Outcome.ALREADY:
        return "already reached"
    if outcome is Outcome.CROSSES and crossing.at is not None:
        days = crossing.days or 0.0
        return f"{format_date(crossing.at)} (in {days:.0f} days)"
    horizon = crossing.horizon / DAY
    if outcome is Outcome.NOT_ENOUGH_DATA:
        return f"not enough data ({MIN_POINTS} days needed)"
    if outcome is Outcome.NO_TREND:
        return "no clear trend"
    if outcome is Outcome.FALLING:
        return "no (falling)"
    return f"not within {horizon:.0f} days"


# --- formatting ------------------------------------------------------------------------------


def format_time(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M UTC")


def format_date(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d")


def format_duration(seconds: float) -> str:
    if seconds <= 0:
        return "0 h"
    if seconds >= 2 * DAY:
        return f"{seconds / DAY:.1f} d"
    return f"{seconds / 3600:.1f} h"


def quantity(value: float | None, resource: str) -> str:
    """A load or capacity in its unit, for a table cell."""
    if value is None or not math.isfinite(value):
        return "n/a"
    if resource == "cpu":
        return f"{value:.1f} cores"
    if resource == "memory":
        return in_gib(value)
    if resource == "disk_ops":
        return f"{value:,.0f} ops/s"
    for unit, size in (("GB/s", 1e9), ("MB/s", 1e6), ("kB/s", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value:.0f} B/s"


def ratio(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.3f}"


def signed_points(value: float | None) -> str:
    """A change of utilisation in percentage points."""
    if value is None or not math.isfinite(value):
        return "n/a"
    shown = round(100 * value, 1) or 0.0  # no "-0.0"
    return f"{shown:+.1f} pts"


# --- charts ----------------------------------------------------------------------------------


def chart_label(text: object) -> str:
    """Text safe as a matplotlib label: one line, no mathtext, not hidden from the legend."""
    flat = display(text)
    flat = flat.replace("$", r"\$")
    return "\u200b" + flat if flat.startswith("_") else flat


def _figure() -> Figure:
    return Figure(figsize=CHART_SIZE, dpi=CHART_DPI, layout="constrained")


def _dates(index: pd.Index) -> np.ndarray:
    return pd.to_datetime(index.to_numpy(dtype=float), unit="s", utc=True).tz_localize(None)


def _time_axis(ax: Any) -> None:
    locator = mdates.AutoDateLocator(minticks=3, maxticks=8)
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
    ax.tick_params(labelsize=7)


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
            pd.Timestamp(m.time, unit="s").to_datetime64(),
            color="grey",
            linewidth=0.8,
            alpha=0.6,
            label="migration" if i == 0 else None,
        )
    ax.set_ylabel("imbalance (max node utilisation − cluster mean)")
    ax.set_title("Imbalance over the period")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7, ncols=4, loc="upper left")
    _time_axis(ax)
    return _save(fig, path)


def chart_utilisation(history: History, cluster: pd.DataFrame, path: Path) -> Path:
    """One panel per resource: each node's utilisation and the cluster mean."""
    fig = _figure()
    axes = fig.subplots(2, 3, sharex=True)
    x = _dates(cluster.index)
    handles: dict[str, Any] = {}
    for ax, resource in zip(axes.flat, RESOURCES, strict=False):
        util = history.utilisation(resource).where(history.has_data, axis=0)
        for node in history.nodes:
            (line,) = ax.plot(x, 100 * util[node], linewidth=0.9)
            handles.setdefault(chart_label(node), line)
        (mean,) = ax.plot(x, 100 * cluster[resource], color="black", linestyle="--")
        handles.setdefault("cluster mean", mean)
        ax.set_title(f"{RESOURCE_LABELS[resource]} (% of capacity)", fontsize=9)
        ax.set_ylim(bottom=0)
        _time_axis(ax)
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
    nodes = [chart_label(n) for n in plan.nodes_before.index]
    x = np.arange(len(nodes))
    for ax, resource in zip(axes.flat, RESOURCES, strict=False):
        before = 100 * plan.nodes_before[f"{resource}_util"].to_numpy(dtype=float)
        after = 100 * plan.nodes_after[f"{resource}_util"].to_numpy(dtype=float)
        ax.bar(x - 0.2, np.nan_to_num(before), 0.4, label="before", color="tab:orange")
        ax.bar(x + 0.2, np.nan_to_num(after), 0.4, label="after", color="tab:blue")
        ax.set_xticks(x, nodes, fontsize=7, rotation=30 if len(nodes) > 6 else 0)
        ax.set_title(f"{RESOURCE_LABELS[resource]} (% of capacity)", fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
    summary = axes.flat[-1]
    labels = [*RESOURCES, "overall"]
    before = [plan.imbalance_before.get(r, 0.0) for r in RESOURCES] + [plan.overall_before]
    after = [plan.imbalance_after.get(r, 0.0) for r in RESOURCES] + [plan.overall_after]
    y = np.arange(len(labels))
    summary.bar(y - 0.2, before, 0.4, label="before", color="tab:orange")
    summary.bar(y + 0.2, after, 0.4, label="after", color="tab:blue")
    summary.set_xticks(y, [RESOURCE_LABELS.get(r, r) for r in labels], fontsize=7, rotation=30)
    summary.set_title("imbalance", fontsize=9)
    summary.tick_params(axis="y", labelsize=7)
    summary.legend(fontsize=7)
    fig.suptitle("The recommended plan: before and after", fontsize=11)
    return _save(fig, path)


def chart_forecast(
    cluster: pd.DataFrame, forecasts: Sequence[ResourceForecast], end: float, path: Path
) -> Path:
    """Per resource: cluster utilisation, its daily means, the fitted line to the horizon,
    and the planning limit and 100 %."""
    fig = _figure()
    axes = fig.subplots(2, 3)
    x = _dates(cluster.index)
    for ax, item in zip(axes.flat, forecasts, strict=False):
        result = item.forecast
        ax.plot(x, 100 * cluster[item.resource], color="lightgrey", linewidth=0.7)
        if len(result.day_times):
            ax.plot(
                _dates(pd.Index(result.day_times)),
                100 * result.day_means,
                "o",
                color="tab:blue",
                markersize=4,
            )
        if result.fit is not None:
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
        _time_axis(ax)
    key = axes.flat[-1]
    key.axis("off")
    key.plot([], [], color="lightgrey", label="cluster utilisation")
    key.plot([], [], "o", color="tab:blue", label="daily mean")
    key.plot([], [], color="tab:blue", linestyle="--", label="linear fit, extrapolated")
    key.plot([], [], color="grey", linestyle="--", label="linear fit, no clear trend")
    key.plot([], [], color="tab:orange", linestyle=":", label="planning limit")
    key.plot([], [], color="tab:red", label="capacity (100 %)")
    key.legend(fontsize=8, loc="center")
    fig.suptitle("Capacity forecast (least-squares line through the daily means)", fontsize=11)
    return _save(fig, path)


# --- the report ------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeldBackRow:
    vm: str
    name: str
    source: str
    target: str
    gain: float
    blocked_by: str


@dataclass
class ReportData:
    """Everything the template shows."""

    config: Config
    period: str
    window: Window
    source: str
    queries: int
    summary: list[ImbalanceSummary]
    recommendation: str
    nodes: dict[str, list[NodeStats]]
    edge_label: str
    top: dict[str, list[TopVM]]
    migrations: list[ObservedMigration]
    plan: Plan | None
    plan_error: str | None
    held_back: list[HeldBackRow]
    forecasts: list[ResourceForecast]
    charts: dict[str, str]
    warnings: list[str]
    generated_at: float


def recommendation(plan: Plan | None, plan_error: str | None, trigger: float) -> str:
    """Whether action is recommended, in one sentence."""
    if plan is None:
        return f"No recommendation: the current state could not be read ({plan_error})."
    if plan.migrations:
        return (
            f"Action recommended: {len(plan.migrations)} migration(s) in {len(plan.waves)} "
            f"wave(s) bring the overall imbalance from {plan.overall_before:.3f} to "
            f"{plan.overall_after:.3f} (trigger {trigger:.3f})."
        )
    if plan.triggered:
        return (
            f"The overall imbalance {plan.overall_before:.3f} is above the trigger "
            f"{trigger:.3f}, but no migration lowers it within the rules; see what blocked "
            "better balance."
        )
    return (
        f"No action needed: the overall imbalance {plan.overall_before:.3f} is under the "
        f"trigger {trigger:.3f}."
    )


def held_back_rows(plan: Plan | None, snapshot: Snapshot | None) -> list[HeldBackRow]:
    if plan is None:
        return []
    names = snapshot.vms["name"] if snapshot is not None else pd.Series(dtype=object)
    return [
        HeldBackRow(
            vm=h.vm,
            name=str(names.get(h.vm, h.vm)),
            source=h.source,
            target=h.target,
            gain=h.gain,
            blocked_by=", ".join(h.blocked_by),
        )
        for h in plan.held_back
    ]


def build_report(
    config: Config,
    period: str,
    at: datetime,
    out_dir: Path,
    source: PrometheusSource | None = None,
) -> ReportData:
    """Query, compute and draw the charts into `out_dir`; the Markdown is rendered from the
    result."""
    seconds = parse_period(period)
    window = report_window(seconds, at.timestamp())
    source = source if source is not None else PrometheusSource(config.prometheus)
    history = collect_history(source, config, window)

    snapshot: Snapshot | None = None
    plan: Plan | None = None
    plan_error: str | None = None
    try:
        snapshot = source.build_snapshot(config, at=datetime.fromtimestamp(window.end, UTC))
        check_snapshot(snapshot)
        plan = build_plan(snapshot, config)
    except (SourceError, SnapshotUnusable) as exc:
        plan_error = str(exc)

    series = imbalance_series(history, config)
    cluster = cluster_utilisation(history)
    now = None
    if plan is not None:
        now = {**plan.imbalance_before, "overall": plan.overall_before}
    summary = summarise_imbalance(series, config.balance.trigger, window.step, now)
    migrations = migration_effects(
        detect_migrations(history.presence, window.step), series["overall"], window.step
    )
    forecasts = capacity_forecasts(cluster, config, window.end)

    out_dir.mkdir(parents=True, exist_ok=True)
    charts = {
        "imbalance": chart_imbalance(series, migrations, config, out_dir / CHARTS["imbalance"]),
        "utilisation": chart_utilisation(history, cluster, out_dir / CHARTS["utilisation"]),
        "forecast": chart_forecast(cluster, forecasts, window.end, out_dir / CHARTS["forecast"]),
    }
    if plan is not None:
        charts["plan"] = chart_plan(plan, out_dir / CHARTS["plan"])
    for key, name in CHARTS.items():
        stale = out_dir / name
        if key not in charts and stale.is_file():  # left from an earlier report
            stale.unlink()

    warnings = list(history.warnings)
    if snapshot is not None:
        warnings += snapshot.warnings
    if plan is not None:
        warnings += [w for w in plan.warnings if w not in warnings]
    edge = edge_seconds(window)
    return ReportData(
        config=config,
        period=period,
        window=window,
        source=source.display_url,
        queries=source.queries_issued,
        summary=summary,
        recommendation=recommendation(plan, plan_error, config.balance.trigger),
        nodes={r: node_statistics(history, r) for r in RESOURCES},
        edge_label="day" if edge >= DAY else "half",
        top={r: top_vms(history, r) for r in TOP_ORDER},
        migrations=migrations,
        plan=plan,
        plan_error=plan_error,
        held_back=held_back_rows(plan, snapshot),
        forecasts=forecasts,
        charts={key: path.name for key, path in charts.items()},
        warnings=warnings,
        generated_at=datetime.now(UTC).timestamp(),
    )


def render_report(data: ReportData) -> str:
    """The Markdown of a report; every tenant-controlled value passes an escaping filter."""
    env = environment()
    env.filters.update(
        quantity=quantity,
        ratio=ratio,
        points=signed_points,
        when=format_time,
        duration=format_duration,
        crossing=describe_crossing,
    )
    plan = data.plan
    commands = plan_commands(plan, data.config) if plan is not None else None
    refusal = commands_refusal(commands) if commands is not None else None
    return env.get_template("report.md.j2").render(
        r=data,
        config=data.config,
        plan=plan,
        doc=plan_document(plan, data.config, commands) if plan is not None else None,
        commands=render_commands(plan, data.config, commands) if plan and not refusal else "",
        commands_refusal=str(refusal) if refusal is not None else None,
        labels=RESOURCE_LABELS,
        titles=RESOURCE_TITLES,
        resources=RESOURCES,
        top_order=TOP_ORDER,
        horizon_days=HORIZON / DAY,
        effect_points=EFFECT_POINTS,
    )


def write_report(
    config: Config,
    period: str = "7d",
    out_dir: Path = Path("report"),
    at: datetime | None = None,
) -> Path:
    """Write `report.md` and its PNG charts into `out_dir`; returns the Markdown's path.

    Raises ReportError (a SourceError) when the period holds no data or is not a duration,
    and SourceError when Prometheus cannot be queried.
    """
    when = at if at is not None else datetime.now(UTC)
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    out_dir = Path(out_dir)
    data = build_report(config, period, when, out_dir)
    text = render_report(data)
    target = out_dir / "report.md"
    # Written whole or not at all: a reader (or a mail job) never sees half a report.
    write_output(target, text)
    return target


__all__ = [
    "CHARTS",
    "ReportError",
    "ReportQueries",
    "Window",
    "build_report",
    "detect_migrations",
    "imbalance_series",
    "migration_effects",
    "render_report",
    "report_window",
    "write_report",
]
