"""The answers of the report's queries into a `History`; pure, so tested without a server."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from recommender.config import Config
from recommender.engine.rules.maintenance import MaintenanceSettings
from recommender.history import EXECUTED_RESULTS, Executed, History, Window
from recommender.model import RESOURCES
from recommender.source.answers import (
    Answer,
    node_matrix,
    pair_values,
    presence_frame,
    range_values,
    sample,
)
from recommender.source.http import SourceError
from recommender.source.queries import RATE_COUNTERS

# Capacities the exporter reports per node; the others come from the config.
MEASURED_CAPACITY = ("cpu", "memory")


class ReportError(SourceError):
    """The report cannot be made (no data in the period, a bad period); one line."""


def _capacity(
    config: Config, measured: Mapping[str, pd.DataFrame], nodes: list[str], index: pd.Index
) -> dict[str, pd.DataFrame]:
    """Per resource, (time x node) capacity: measured, or from the config for the steps a
    node reported any measured capacity."""
    capacity = {r: measured[r].reindex(columns=nodes) for r in MEASURED_CAPACITY}
    exists = capacity["cpu"].notna() | capacity["memory"].notna()
    for resource in RESOURCES:
        if resource in capacity:
            continue
        values = {n: config.capacity.of_node(n)[resource] for n in nodes}
        frame = pd.DataFrame(values, index=index, columns=nodes, dtype=float)
        capacity[resource] = frame.where(exists)
    return capacity


def _warnings(
    capacity: Mapping[str, pd.DataFrame],
    up: pd.DataFrame,
    nodes: list[str],
    has_data: pd.Series,
    window: Window,
) -> list[str]:
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
    return warnings


def executed_of(counts: Answer, durations: Answer) -> Executed:
    """`Executed` from the answers of `executed_queries` (`increase()` extrapolates, so the
    counts are rounded to whole migrations)."""
    by_result: dict[str, int] = {}
    for item in counts:
        value = sample(item)
        result = str(item.get("metric", {}).get("result", ""))
        if result in EXECUTED_RESULTS and math.isfinite(value) and round(value) > 0:
            by_result[result] = round(value)
    stats = {str(item.get("metric", {}).get("stat", "")): sample(item) for item in durations}
    ran = stats.get("count", math.nan)
    ran_count = round(ran) if math.isfinite(ran) and ran > 0 else 0
    seconds = stats.get("sum", math.nan)
    return Executed(
        by_result=by_result,
        ran=ran_count,
        seconds=seconds if ran_count and math.isfinite(seconds) and seconds >= 0 else math.nan,
    )


def moved_vms(presence: pd.DataFrame) -> list[str]:
    """The VMs of a presence frame seen on more than one node, or whose series start after
    the first step with data or end before the last: those with a series that starts or ends
    inside a step, where `increase()` differs between the servers."""
    if presence.empty:
        return []
    steps = presence["step"]
    spans = presence.groupby("vm", sort=True).agg(
        nodes=("node", "nunique"), first=("step", "min"), last=("step", "max")
    )
    inside = (spans["nodes"] > 1) | (spans["first"] > steps.min()) | (spans["last"] < steps.max())
    return [str(vm) for vm in spans.index[inside]]


def exact_loads(answers: Sequence[Answer], times: np.ndarray) -> pd.DataFrame:
    """(time x node) work per second in each step `(t - step, t]` of the raw counter samples
    in `answers` (range selectors' answers), summed over their series by `node`.

    Each sample adds its difference from the series' previous one to the step it falls in
    (the previous one may lie in the step before: a step's work starts from the sample on its
    left edge); a value below the previous one is a counter reset and adds itself, as PromQL
    counts it; a series' first sample, or one more than a step after the previous, starts the
    series and adds nothing. Both servers return the same samples, so the same loads. NaN where
    a node has no sample in a step."""
    index = pd.Index(np.round(times, 3), name="time")
    if len(times) == 0:
        return pd.DataFrame(index=index, dtype=float)
    step = float(times[1] - times[0]) if len(times) > 1 else 1.0
    work: dict[str, np.ndarray] = {}
    seen: dict[str, np.ndarray] = {}
    for answer in answers:
        for item in answer:
            node = item.get("metric", {}).get("node")
            if node is None:
                continue
            stamps, values = range_values(item)
            keep = np.isfinite(stamps) & np.isfinite(values)
            stamps, values = stamps[keep], values[keep]
            if not len(stamps):
                continue
            order = np.argsort(stamps, kind="stable")
            stamps, values = stamps[order], values[order]
            at = np.ceil((stamps - float(times[0])) / step - 1e-9).astype(int)
            added = np.diff(values)
            added = np.where(added < 0, values[1:], added)
            added = np.where(np.diff(stamps) <= step * (1 + 1e-9), added, 0.0)
            node_work = work.setdefault(str(node), np.zeros(len(times)))
            node_seen = seen.setdefault(str(node), np.zeros(len(times), dtype=bool))
            inside = (at >= 0) & (at < len(times))
            node_seen[at[inside]] = True
            later = at[1:]
            counted = (later >= 0) & (later < len(times))
            np.add.at(node_work, later[counted], added[counted])
    frame = pd.DataFrame(
        {node: np.where(seen[node], work[node] / step, np.nan) for node in work},
        index=index,
        dtype=float,
    )
    return frame


def assemble_history(
    config: Config,
    window: Window,
    ranges: Mapping[str, Answer],
    instants: Mapping[str, Answer],
    shift: float = 0.0,
    counted: Mapping[str, pd.DataFrame] | None = None,
    presence: pd.DataFrame | None = None,
) -> History:
    """Frames from the answers of `ReportQueries` (whose range answers are `shift` seconds
    later than the window's times, `ReportQueries.shift`): `counted` per counter the loads
    (`exact_loads`) of the raw samples of the VMs the load queries leave out
    (`ReportQueries.samples`), added to the loads; `presence` the frame of the presence
    answer when already made."""
    times = window.times
    if presence is None:
        presence = presence_frame(ranges["presence"], times, shift)
    raw_load = {r: node_matrix(ranges[f"load_{r}"], times, shift) for r in RESOURCES}
    for resource, counters in RATE_COUNTERS.items():
        for counter in counters:
            if counted and counter in counted:
                raw_load[resource] = raw_load[resource].add(counted[counter], fill_value=0.0)
    measured = {r: node_matrix(ranges[f"capacity_{r}"], times, shift) for r in MEASURED_CAPACITY}
    up = node_matrix(ranges["up"], times, shift)
    nodes = sorted(
        set(presence["node"]).union(*(f.columns for f in (*raw_load.values(), up)))
        | set(measured["cpu"].columns)
        | set(measured["memory"].columns)
    )
    index = raw_load["cpu"].index
    has_data = pd.concat([raw_load[r] for r in RATE_COUNTERS], axis=1).notna().any(axis=1)
    load = {r: raw_load[r].reindex(columns=nodes).fillna(0.0) for r in RESOURCES}
    capacity = _capacity(config, measured, nodes, index)
    maintenance = set(MaintenanceSettings.of(config.rules).maintenance)
    up_ok = up.reindex(columns=nodes).fillna(1.0) != 0
    known = pd.DataFrame(True, index=index, columns=nodes)
    for resource in config.balance.needed_resources:
        known &= capacity[resource] > 0
    active = known & up_ok & ~pd.Series({n: n in maintenance for n in nodes}, dtype=bool)
    pairs = pd.DataFrame({r: pair_values(instants[f"vm_{r}"]) for r in RESOURCES})
    pairs.index = pairs.index.set_names(["node", "vm"])
    executed = executed_of(instants.get("executed", []), instants.get("executed_duration", []))
    return History(
        window=window,
        load=load,
        capacity=capacity,
        active=active,
        has_data=has_data,
        presence=presence,
        pairs=pairs,
        warnings=_warnings(capacity, up, nodes, has_data, window),
        executed=executed,
    )


__all__ = [
    "MEASURED_CAPACITY",
    "ReportError",
    "assemble_history",
    "exact_loads",
    "executed_of",
    "moved_vms",
]
