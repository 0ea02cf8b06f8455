"""PromQL answers into plain values and frames; pure, so tested without a server.

An instant answer is `[{"metric": {...}, "value": [t, "v"]}, ...]`, a range answer
`[{"metric": {...}, "values": [[t, "v"], ...]}, ...]`; a value that is not a number is NaN.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

Answer = list[dict[str, Any]]


def number(value: Any) -> float:
    """A sample's value (PromQL sends numbers as strings); NaN when it is not one."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def sample(item: Mapping[str, Any]) -> float:
    """The value of one series of an instant answer."""
    try:
        return number(item["value"][1])
    except (TypeError, IndexError, KeyError):
        return math.nan


def by_node_vm(answer: Answer) -> dict[tuple[str, str], float]:
    """An instant answer aggregated by (node, vm)."""
    out: dict[tuple[str, str], float] = {}
    for item in answer:
        labels = item["metric"]
        if "node" in labels and "vm" in labels:
            out[(labels["node"], labels["vm"])] = sample(item)
    return out


def by_label(answer: Answer, label: str) -> dict[str, float]:
    """An instant answer aggregated by one label."""
    return {item["metric"][label]: sample(item) for item in answer if label in item["metric"]}


def pair_values(answer: Answer) -> pd.Series:
    """An instant answer aggregated by (node, vm) as a Series indexed by (node, vm)."""
    data = by_node_vm(answer)
    if not data:
        return pd.Series(dtype=float, index=pd.MultiIndex.from_tuples([], names=["node", "vm"]))
    index = pd.MultiIndex.from_tuples(list(data), names=["node", "vm"])
    return pd.Series(list(data.values()), index=index, dtype=float)


def quantiles(answer: Answer, q: float) -> Answer:
    """A subquery's answer (`values` per series) as an instant answer holding each series'
    q-quantile, interpolated linearly between the closest ranks as Prometheus'
    `quantile_over_time` does; a series without a number is left out."""
    out: Answer = []
    for item in answer:
        values = np.array([number(v[1]) for v in item.get("values", [])], dtype=float)
        values = values[np.isfinite(values)]
        if len(values):
            stamp = item["values"][-1][0]
            out.append(
                {"metric": item["metric"], "value": [stamp, repr(float(np.quantile(values, q)))]}
            )
    return out


def step_positions(
    stamps: Sequence[float] | np.ndarray, times: np.ndarray, shift: float = 0.0
) -> np.ndarray:
    """The index into `times` of each answered timestamp less `shift`, -1 where it is not
    within a hundredth of a step of one: a server that rounds or shifts the times of a range
    answer still lands each value on its step."""
    if len(times) == 0:
        return np.full(len(stamps), -1, dtype=int)
    step = float(times[1] - times[0]) if len(times) > 1 else 1.0
    offsets = (np.asarray(stamps, dtype=float) - shift - float(times[0])) / step
    nearest = np.rint(offsets)
    ok = (np.abs(offsets - nearest) < 0.01) & (nearest >= 0) & (nearest < len(times))
    return np.where(ok, nearest, -1).astype(int)


def node_matrix(answer: Answer, times: np.ndarray, shift: float = 0.0) -> pd.DataFrame:
    """A range answer aggregated by node as a (time x node) frame; NaN where absent."""
    index = pd.Index(np.round(times, 3), name="time")
    columns: dict[str, pd.Series] = {}
    for item in answer:
        node = item["metric"].get("node")
        if node is None or not item["values"]:
            continue
        at = step_positions([number(v[0]) for v in item["values"]], times, shift)
        values = np.array([number(v[1]) for v in item["values"]], dtype=float)
        keep = at >= 0
        series = pd.Series(values[keep], index=index[at[keep]], dtype=float)
        series = series[~series.index.duplicated()].reindex(index)
        columns[node] = series if node not in columns else columns[node].fillna(series)
    return pd.DataFrame(columns, index=index, dtype=float)


def range_values(item: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(timestamps, values) of one series of a range answer, as floats (NaN: not a number)."""
    pairs = item.get("values") or []
    try:
        table = np.array(pairs, dtype=float).reshape(-1, 2)
    except (TypeError, ValueError):
        table = np.array([[number(t), number(v)] for t, v in pairs], dtype=float).reshape(-1, 2)
    return table[:, 0], table[:, 1]


PRESENCE_COLUMNS = ["vm", "node", "step", "time", "samples", "name"]


def presence_frame(answer: Answer, times: np.ndarray, shift: float = 0.0) -> pd.DataFrame:
    """Rows (vm, node, step, time, samples, name) from the presence range answer, sorted by
    (vm, node, step): `step` indexes `times`, `time` is its value, `samples` the VM's samples
    on the node in that step (a rename inside a step adds up; the name is the latest seen).

    Built from one array per series: at fleet size the answer holds a point per VM and step,
    and a Python tuple per point would cost more than the rest of the report."""
    series = []
    for item in answer:
        labels = item["metric"]
        if "vm" not in labels or "node" not in labels:
            continue
        stamps, values = range_values(item)
        at = step_positions(stamps, times, shift)
        keep = (at >= 0) & np.isfinite(values) & (values > 0)
        if keep.any():
            key = (str(labels["vm"]), str(labels["node"]))
            series.append((key, str(labels.get("name", "")), at[keep], values[keep]))
    if not series:
        return pd.DataFrame(
            {
                "vm": pd.Series(dtype=object),
                "node": pd.Series(dtype=object),
                "step": pd.Series(dtype=int),
                "time": pd.Series(dtype=float),
                "samples": pd.Series(dtype=float),
                "name": pd.Series(dtype=object),
            }
        )
    series.sort(key=lambda s: s[0])
    lengths = [len(s[2]) for s in series]
    frame = pd.DataFrame(
        {
            "vm": np.repeat(np.array([s[0][0] for s in series], dtype=object), lengths),
            "node": np.repeat(np.array([s[0][1] for s in series], dtype=object), lengths),
            "step": np.concatenate([s[2] for s in series]).astype(int),
            "samples": np.concatenate([s[3] for s in series]),
            "name": np.repeat(np.array([s[1] for s in series], dtype=object), lengths),
        }
    )
    keys = [s[0] for s in series]
    # Sorted already (series by key, each series' points in time order), unless a VM was
    # renamed on a node in the period: then several series share its (vm, node).
    if len(set(keys)) < len(keys):
        frame = frame.groupby(["vm", "node", "step"], as_index=False, sort=True).agg(
            samples=("samples", "sum"), name=("name", "last")
        )
    frame.insert(3, "time", np.asarray(times, dtype=float)[frame["step"].to_numpy(dtype=int)])
    return frame[PRESENCE_COLUMNS]


__all__ = [
    "Answer",
    "by_label",
    "by_node_vm",
    "node_matrix",
    "number",
    "pair_values",
    "presence_frame",
    "quantiles",
    "range_values",
    "sample",
    "step_positions",
]
