"""The Prometheus source: builds a Snapshot from the exporter's series over PromQL.

A snapshot uses only the standard instant-query API (`/api/v1/query` with `time=`), so the
same code reads Prometheus, VictoriaMetrics, Thanos and Mimir. It costs a fixed number of
queries (15 with the `mean` estimator, 18 with `quantile`) whatever the number of VMs: every
query is aggregated `by (node, vm)` or `by (vm)` and answered for all VMs at once. The weekly
report (`recommender.report`) also reads history through the standard range-query API
(`/api/v1/query_range`, `PrometheusSource.query_range`), with the same error handling.

Why `increase(x[w]) / w` and not `rate(x[w])`: the two servers disagree on `rate()` of a
series that starts or ends inside the window. Prometheus divides by the whole window
(extrapolating at most half a scrape interval past the first and last sample), so a VM that
migrated shows two partial series whose rates add up to its load; VictoriaMetrics divides
by the span the series covers, so the same two partial rates add up to about twice the load.
`increase()` is the work done inside the window on both servers (VictoriaMetrics counts a
counter that starts near zero from zero, which is what a migrated VM's counters do on the new
node), so `sum over the VM's node labels of increase / window` is the VM's mean load over the
window, wherever it ran, on either server. The work between the last sample on the old node
and the first on the new one (under one scrape interval) is not seen by VictoriaMetrics, and
Prometheus extrapolates half an interval for it: under 0.5 % of a 1 h window at 15 s scrapes.

A VM younger than the window (or an exporter added recently) would be under-counted by
dividing by the whole window, so its load is divided by the time since its first sample
instead (known to within the 1-minute step of the history subquery).

The `quantile` estimator takes `quantile_over_time` of the short-window rates, summed
`by (vm)` inside the subquery so that a VM that moved is one series, not two halves.

Server settings that matter: `timestamp(vmbalance_vm_info)` inside the history subqueries
sees a sample only within the lookback (Prometheus `--query.lookback-delta`, default 5m), so
the lookback must be at least the 1m subquery step. Every other selector has an explicit
range, so the lookback does not change the loads. VictoriaMetrics hides the newest
`-search.latencyOffset` (default 30s) of data from queries at "now": a VM is still present (its
presence is judged over the short window), only that last half minute is not in its load.
Both servers give the same answers to these queries (tests compare them against the
simulator's truth); the only difference left is the migration scrape gap above.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from recommender import __version__
from recommender.config import Config, PrometheusSettings, duration_seconds
from recommender.model import RESOURCES, Snapshot, make_nodes, make_vms
from recommender.promql_http import ClientSettings, PromQLClient, SourceError

# Counters behind each rate resource (summed).
RATE_COUNTERS: dict[str, tuple[str, ...]] = {
    "cpu": ("vmbalance_vm_cpu_seconds_total",),
    "disk_bytes": ("vmbalance_vm_disk_read_bytes_total", "vmbalance_vm_disk_written_bytes_total"),
    "disk_ops": (
        "vmbalance_vm_disk_reads_completed_total",
        "vmbalance_vm_disk_writes_completed_total",
    ),
    "network": (
        "vmbalance_vm_network_receive_bytes_total",
        "vmbalance_vm_network_transmit_bytes_total",
    ),
}

# Resources whose short-window rate is compared with the window rate to detect a burst.
BURST_RESOURCES: tuple[str, ...] = ("cpu", "disk_bytes", "network")

# Step of the subqueries over `vmbalance_vm_info` history; must not exceed the servers'
# lookback (Prometheus 5m by default) so every sample is seen by some step.
HISTORY_STEP = "1m"

# How many ids a grouped warning lists before "and N more".
_WARN_IDS = 8


def _seconds_text(seconds: float) -> str:
    return f"{seconds:g}"


def counter_sum(counters: Sequence[str], range_: str, by: str) -> str:
    """PromQL summing `increase()` of several counters per `by` labels.

    Each counter is aggregated on its own and the results are added; `(a + b) or a or b`
    keeps a VM that has only one of them. A `{__name__=~"a|b"}` selector would be shorter but
    Prometheus refuses it: `increase()` drops the name and two series would share labels.
    """
    parts = [f"sum by ({by}) (increase({c}[{range_}]))" for c in counters]
    if len(parts) == 1:
        return parts[0]
    return f"({' + '.join(parts)}) or " + " or ".join(parts)


@dataclass(frozen=True)
class SnapshotQueries:
    """The PromQL of one snapshot, derived from the config only."""

    queries: Mapping[str, str]
    window: float
    short: float
    history: float
    history_range: float

    @classmethod
    def for_config(cls, config: Config) -> SnapshotQueries:
        q = config.query
        window, short = q.window, q.short_window
        w_s, s_s = duration_seconds(window), duration_seconds(short)
        history_s = duration_seconds(q.history)
        # The history subquery also finds each VM's first sample inside the window.
        history_range_s = max(history_s, w_s)
        h_range = q.history if history_s >= w_s else window
        info = "vmbalance_vm_info"
        queries: dict[str, str] = {
            "vm_last_seen": (
                f"max by (node, vm, name) "
                f"(max_over_time(timestamp({info})[{h_range}:{HISTORY_STEP}]))"
            ),
            # The subquery's last step is the last whole minute: a VM whose samples all came
            # after it (a new VM, a new exporter) is seen only at the evaluation instant.
            "vm_seen_now": f"max by (node, vm, name) (timestamp({info}))",
            "vm_first_seen": (
                f"min by (node, vm) (min_over_time(timestamp({info})[{h_range}:{HISTORY_STEP}]))"
            ),
        }
        for resource, counters in RATE_COUNTERS.items():
            mean = f"({counter_sum(counters, window, 'node, vm')}) / {_seconds_text(w_s)}"
            if q.estimator == "mean":
                queries[f"load_{resource}"] = mean
            else:
                short_rate = f"({counter_sum(counters, short, 'vm')}) / {_seconds_text(s_s)}"
                queries[f"load_{resource}"] = (
                    f"quantile_over_time({q.quantile:g}, ({short_rate})[{window}:{short}])"
                )
                if resource in BURST_RESOURCES:
                    queries[f"mean_{resource}"] = mean
        for resource in BURST_RESOURCES:
            counters = RATE_COUNTERS[resource]
            queries[f"short_{resource}"] = (
                f"({counter_sum(counters, short, 'vm')}) / {_seconds_text(s_s)}"
            )
        used = "vmbalance_vm_memory_used_bytes"
        if q.estimator == "mean":
            queries["load_memory"] = f"max by (node, vm) (avg_over_time({used}[{window}]))"
        else:
            queries["load_memory"] = (
                f"max by (node, vm) (quantile_over_time({q.quantile:g}, {used}[{window}]))"
            )
        queries["memory_max"] = (
            f"max by (node, vm) (last_over_time(vmbalance_vm_memory_max_bytes[{window}]))"
        )
        queries["node_cpus"] = f"max by (node) (last_over_time(vmbalance_node_cpus[{window}]))"
        queries["node_memory"] = (
            f"max by (node) (last_over_time(vmbalance_node_memory_bytes[{window}]))"
        )
        queries["node_up"] = f"min by (node) (last_over_time(vmbalance_up[{short}]))"
        return cls(
            queries=queries,
            window=w_s,
            short=s_s,
            history=history_s,
            history_range=history_range_s,
        )


class PrometheusSource:
    """Reads snapshots from a PromQL HTTP API.

    `queries_issued` counts the HTTP queries sent, so a test or benchmark can check that a
    snapshot costs the same number of queries for 5 or 5,000 VMs.
    """

    def __init__(self, settings: PrometheusSettings) -> None:
        self.settings = settings
        self.queries_issued = 0
        token = settings.bearer_token
        if token is None and settings.bearer_token_file is not None:
            try:
                token = Path(settings.bearer_token_file).read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                reason = getattr(exc, "strerror", None) or str(exc)
                raise SourceError(
                    f"cannot read bearer_token_file {settings.bearer_token_file}: {reason}"
                ) from None
        self._client = PromQLClient(
            ClientSettings(
                url=settings.url,
                timeout_seconds=settings.timeout_seconds,
                bearer_token=token or None,
                username=settings.username,
                password=settings.password,
                ca_file=settings.ca_file,
                insecure_skip_verify=settings.insecure_skip_verify,
            ),
            user_agent=f"vmbalance/{__version__}",
        )
        self.display_url = self._client.display_url

    def _get(self, path: str, params: dict[str, str], promql: str) -> Any:
        """One HTTP query; every failure is a one-line SourceError."""
        self.queries_issued += 1
        data = self._client.get(path, params, context=f"query: {promql}")
        if not isinstance(data, dict) or not isinstance(data.get("result"), list):
            raise SourceError(
                f"prometheus at {self.display_url}: the answer is not a PromQL API response"
            )
        return data["result"]

    def query(self, promql: str, at: float) -> list[dict[str, Any]]:
        """One instant query evaluated at unix time `at`; raises SourceError on any failure."""
        result = self._get("/api/v1/query", {"query": promql, "time": f"{at:.3f}"}, promql)
        if not isinstance(result, list) or not all(
            isinstance(item, dict) and "metric" in item and "value" in item for item in result
        ):
            raise SourceError(
                f"prometheus at {self.display_url}: unexpected answer shape (query: {promql})"
            )
        return result

    def query_range(
        self, promql: str, start: float, end: float, step: float
    ) -> list[dict[str, Any]]:
        """One range query from `start` to `end` (unix seconds, whole seconds are sent) every
        `step` seconds: `[{"metric": {...}, "values": [[t, "v"], ...]}, ...]`; raises
        SourceError on any failure, like `query`."""
        params = {
            "query": promql,
            "start": f"{round(start)}",
            "end": f"{round(end)}",
            "step": _seconds_text(step),
        }
        result = self._get("/api/v1/query_range", params, promql)
        if not isinstance(result, list) or not all(
            isinstance(item, dict) and "metric" in item and "values" in item for item in result
        ):
            raise SourceError(
                f"prometheus at {self.display_url}: unexpected answer shape (query: {promql})"
            )
        return result

    def build_snapshot(self, config: Config, at: datetime | None = None) -> Snapshot:
        """The cluster at `at` (default now), every query evaluated at that time."""
        when = at if at is not None else datetime.now(UTC)
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        t = when.timestamp()
        plan = SnapshotQueries.for_config(config)
        answers = {name: self.query(promql, t) for name, promql in plan.queries.items()}
        return _assemble(config, plan, answers, when, self.display_url)


def build_snapshot(config: Config, at: datetime | None = None) -> Snapshot:
    """Snapshot from the server in `config.prometheus` (one-shot convenience)."""
    return PrometheusSource(config.prometheus).build_snapshot(config, at)


# --- turning answers into frames --------------------------------------------------------------


def _value(item: Mapping[str, Any]) -> float:
    try:
        return float(item["value"][1])
    except (TypeError, ValueError, IndexError):
        return math.nan


def _by_node_vm(result: list[dict[str, Any]]) -> dict[tuple[str, str], float]:
    out: dict[tuple[str, str], float] = {}
    for item in result:
        labels = item["metric"]
        if "node" in labels and "vm" in labels:
            out[(labels["node"], labels["vm"])] = _value(item)
    return out


def _by_label(result: list[dict[str, Any]], label: str) -> dict[str, float]:
    return {item["metric"][label]: _value(item) for item in result if label in item["metric"]}


def _ids(ids: Sequence[str]) -> str:
    """Ids as they are: every output escapes what it must (`recommender.quoting`)."""
    shown = ", ".join(sorted(ids)[:_WARN_IDS])
    more = len(ids) - _WARN_IDS
    return f"{shown} and {more} more" if more > 0 else shown


@dataclass
class _VMPlace:
    node: str
    name: str
    last_seen: float
    first_seen_anywhere: float
    last_migration: float


def _placements(
    last_seen: list[dict[str, Any]],
    first_seen: list[dict[str, Any]],
    at: float,
    plan: SnapshotQueries,
) -> dict[str, _VMPlace]:
    """Where each VM seen in the short window runs and when it last changed node.

    The node is the one with the VM's latest `vmbalance_vm_info` sample (a tie, as when both
    nodes report the VM during the move, goes to the node where it appeared last). The last
    migration is the last sample on any other node within `query.history`: the move
    happened within one scrape interval after it; this also holds for a VM that went
    A -> B -> A, where the first sample on its current node would be too old.
    """
    latest: dict[tuple[str, str], tuple[float, str]] = {}
    for item in last_seen:
        labels = item["metric"]
        if "node" not in labels or "vm" not in labels:
            continue
        key = (labels["node"], labels["vm"])
        seen = _value(item)
        if key not in latest or seen > latest[key][0]:
            latest[key] = (seen, labels.get("name", labels["vm"]))
    first = _by_node_vm(first_seen)
    per_vm: dict[str, dict[str, tuple[float, str]]] = {}
    for (node, vm), entry in latest.items():
        per_vm.setdefault(vm, {})[node] = entry
    presence = max(plan.short, 2 * duration_seconds(HISTORY_STEP))
    places: dict[str, _VMPlace] = {}
    for vm, nodes in per_vm.items():
        node = max(nodes, key=lambda n: (nodes[n][0], first.get((n, vm), -math.inf)))
        seen, name = nodes[node]
        if not seen >= at - presence:
            continue
        departures = [s for n, (s, _) in nodes.items() if n != node and s > at - plan.history]
        firsts = [first[(n, vm)] for n in nodes if (n, vm) in first]
        places[vm] = _VMPlace(
            node=node,
            name=name,
            last_seen=seen,
            first_seen_anywhere=min(firsts) if firsts else math.nan,
            last_migration=max(departures) if departures else math.nan,
        )
    return places


def burst_ratios(
    mean: pd.DataFrame,
    short: pd.DataFrame,
    nodes: pd.DataFrame,
    weights: Mapping[str, float],
    resources: Sequence[str] = BURST_RESOURCES,
) -> pd.Series:
    """Short-window rate / window rate of each VM's busiest resource.

    `mean` is indexed by vm with a `node` column and one column per resource (window
    rates); `short` holds the short-window rates. The busiest resource is the one with the
    largest weighted share of its node's capacity, so a VM's burst is judged on what it
    actually loads. NaN when no resource has a known capacity and a non-zero rate.
    """
    shares = []
    ratios = []
    node_of = mean["node"]
    for resource in resources:
        rate = pd.to_numeric(mean[resource], errors="coerce").to_numpy(dtype=float)
        capacity = nodes[resource].reindex(node_of).to_numpy(dtype=float)
        with np.errstate(divide="ignore", invalid="ignore"):
            share = float(weights.get(resource, 0.0)) * rate / capacity
            ratio = short[resource].reindex(mean.index).to_numpy(dtype=float) / rate
        share = np.where(np.isfinite(share) & (rate > 0), share, -np.inf)
        shares.append(share)
        ratios.append(np.where(rate > 0, ratio, np.nan))
    if not shares:
        return pd.Series(np.nan, index=mean.index, dtype=float)
    share_matrix = np.vstack(shares)
    ratio_matrix = np.vstack(ratios)
    best = np.argmax(share_matrix, axis=0)
    columns = np.arange(share_matrix.shape[1])
    chosen = ratio_matrix[best, columns]
    known = np.isfinite(share_matrix[best, columns])
    return pd.Series(np.where(known, chosen, np.nan), index=mean.index, dtype=float)


def _assemble(
    config: Config,
    plan: SnapshotQueries,
    answers: Mapping[str, list[dict[str, Any]]],
    when: datetime,
    source: str,
) -> Snapshot:
    at = when.timestamp()
    q = config.query
    warnings: list[str] = []
    places = _placements(
        answers["vm_last_seen"] + answers["vm_seen_now"], answers["vm_first_seen"], at, plan
    )
    if not places:
        raise SourceError(
            f"no VM has data in the last {q.short_window} at "
            f"{when.astimezone(UTC).isoformat(timespec='seconds')} "
            f"(no vmbalance_vm_info series at {source})"
        )

    # Nodes: those whose exporter answered in the short window, plus those hosting a VM.
    up = _by_label(answers["node_up"], "node")
    cpus = _by_label(answers["node_cpus"], "node")
    memory = _by_label(answers["node_memory"], "node")
    node_names = sorted(set(up) | {p.node for p in places.values()})
    maintenance = set(config.rules.maintenance)
    down = sorted(n for n in node_names if up.get(n) == 0)
    if down:
        warnings.append(
            f"nodes whose exporter cannot read the hypervisor (vmbalance_up 0), treated as in "
            f"maintenance: {_ids(down)}"
        )
    capacity = config.capacity
    node_rows: dict[str, dict[str, float | bool]] = {}
    for node in node_names:
        row: dict[str, float | bool] = {
            "cpu": cpus.get(node, math.nan),
            "memory": memory.get(node, math.nan),
            "disk_bytes": capacity.disk_bytes,
            "disk_ops": capacity.disk_ops,
            "network": capacity.network,
        }
        row.update({r: float(v) for r, v in capacity.per_node.get(node, {}).items()})
        row["maintenance"] = node in maintenance or node in down
        node_rows[node] = row
    for resource, family in (
        ("cpu", "vmbalance_node_cpus"),
        ("memory", "vmbalance_node_memory_bytes"),
    ):
        unknown = [n for n, row in node_rows.items() if not np.isfinite(float(row[resource]))]
        if unknown:
            warnings.append(
                f"nodes without {family} in the last {q.window} ({resource} capacity "
                f"unknown): {_ids(unknown)}"
            )
    stray = sorted(set(capacity.per_node) - set(node_names))
    if stray:
        warnings.append(f"capacity.per_node names nodes without data: {_ids(stray)}")
    nodes = make_nodes(node_rows)

    # VM loads.
    vm_ids = sorted(places)
    young_scale: dict[str, float] = {}
    step = duration_seconds(HISTORY_STEP)
    for vm, place in places.items():
        # The first sample is known to within one step: add half of it.
        age = at - place.first_seen_anywhere + step / 2
        young_scale[vm] = plan.window / max(age, step) if age < plan.window - 2 * step else 1.0

    def node_vm_sum(result: list[dict[str, Any]]) -> dict[str, float]:
        totals: dict[str, float] = {}
        for (_node, vm), value in _by_node_vm(result).items():
            if vm in places and np.isfinite(value):
                totals[vm] = totals.get(vm, 0.0) + value
        return {vm: value * young_scale[vm] for vm, value in totals.items()}

    mean_rates: dict[str, dict[str, float]] = {}
    loads: dict[str, dict[str, float]] = {}
    for resource in RATE_COUNTERS:
        answer = answers[f"load_{resource}"]
        if q.estimator == "mean":
            loads[resource] = node_vm_sum(answer)
            mean_rates[resource] = loads[resource]
        else:
            loads[resource] = {vm: v for vm, v in _by_label(answer, "vm").items() if vm in places}
            if resource in BURST_RESOURCES:
                mean_rates[resource] = node_vm_sum(answers[f"mean_{resource}"])

    def current_node_value(result: list[dict[str, Any]]) -> dict[str, float]:
        values = _by_node_vm(result)
        return {
            vm: values[(place.node, vm)]
            for vm, place in places.items()
            if (place.node, vm) in values and np.isfinite(values[(place.node, vm)])
        }

    memory_used = current_node_value(answers["load_memory"])
    memory_max = current_node_value(answers["memory_max"])

    rows: dict[str, dict[str, object]] = {}
    for vm in vm_ids:
        place = places[vm]
        row: dict[str, object] = {"name": place.name, "node": place.node}
        # No disk or NIC series means the VM has none: zero load, not unknown.
        row["cpu"] = loads["cpu"].get(vm, math.nan)
        for resource in ("disk_bytes", "disk_ops", "network"):
            row[resource] = loads[resource].get(vm, 0.0)
        row["memory"] = memory_used.get(vm, math.nan)
        row["memory_max_bytes"] = memory_max.get(vm, math.nan)
        row["last_migration"] = place.last_migration
        rows[vm] = row
    for label, family, mapping in (
        ("cpu", "vmbalance_vm_cpu_seconds_total", loads["cpu"]),
        ("memory", "vmbalance_vm_memory_used_bytes", memory_used),
        ("assigned memory", "vmbalance_vm_memory_max_bytes", memory_max),
    ):
        missing = [vm for vm in vm_ids if vm not in mapping]
        if missing:
            warnings.append(
                f"VMs without {family} in the last {q.window} ({label} unknown): {_ids(missing)}"
            )
    vms = make_vms(rows)

    mean_frame = pd.DataFrame(
        {r: pd.Series(mean_rates[r], dtype=float) for r in BURST_RESOURCES}
    ).reindex(vms.index)
    mean_frame["node"] = vms["node"]
    short_frame = pd.DataFrame(
        {r: pd.Series(_by_label(answers[f"short_{r}"], "vm"), dtype=float) for r in BURST_RESOURCES}
    ).reindex(vms.index)
    vms["burst_ratio"] = burst_ratios(
        mean_frame, short_frame, nodes, config.balance.weights
    ).to_numpy()

    estimator = "mean" if q.estimator == "mean" else f"quantile({q.quantile:g})"
    return Snapshot(
        nodes=nodes,
        vms=vms,
        taken_at=when.astimezone(UTC),
        source=source,
        window=q.window,
        estimator=estimator,
        warnings=warnings,
    )


__all__ = [
    "BURST_RESOURCES",
    "RATE_COUNTERS",
    "RESOURCES",
    "PrometheusSource",
    "SnapshotQueries",
    "SourceError",
    "build_snapshot",
    "burst_ratios",
]
