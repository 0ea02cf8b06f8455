"""Every PromQL query the recommender sends: the snapshot's and the report's.

A snapshot uses only the standard instant-query API (`/api/v1/query` with `time=`), so the
same queries read Prometheus, VictoriaMetrics, Thanos and Mimir. Their number is fixed by the
config, whatever the number of VMs: every query is aggregated `by (node, vm)` or `by (vm)`
and answered for all VMs at once. The report adds range queries (`/api/v1/query_range`)
aggregated `by (node)` or `by (node, vm)`.

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

The `quantile` estimator takes `quantile_over_time` of the short-window rates, summed
`by (vm)` inside the subquery so that a VM that moved is one series, not two halves.

Server settings that matter: `timestamp(vmbalance_vm_info)` inside the history subqueries
sees a sample only within the lookback (Prometheus `--query.lookback-delta`, default 5m), so
the lookback must be at least the 1m subquery step. Every other selector has an explicit
range, so the lookback does not change the loads. VictoriaMetrics hides the newest
`-search.latencyOffset` (default 30s) of data from queries at "now": a VM is still present (its
presence is judged over the short window), only that last half minute is not in its load.

The report's node load at each step is `sum by (node) (increase(counter[step])) / step`: the
work done on the node in that step, wherever the VM doing it ran before or after, so a
migration moves the load from one step to the next with no double counting. Migrations come
from `count_over_time(vmbalance_vm_info[step])` per (node, vm): how many samples a VM has in
its first step on a node dates its arrival to within a scrape interval, without a subquery
(a `timestamp()` subquery at one-minute resolution over a week costs 10,080 evaluations).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from recommender.config import Config, QuerySettings, duration_seconds
from recommender.history import Window
from recommender.source.migration import migration_queries

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

# The memory a VM weighs, by the column the engine counts (`BalanceSettings.memory_column`).
MEMORY_FAMILIES: dict[str, str] = {
    "memory": "vmbalance_vm_memory_used_bytes",
    "memory_max_bytes": "vmbalance_vm_memory_max_bytes",
}
INFO = "vmbalance_vm_info"


def seconds_text(seconds: float) -> str:
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


def _presence_queries(history_range: str) -> dict[str, str]:
    """Where each VM was seen and when it first appeared, from `vmbalance_vm_info`."""
    return {
        "vm_last_seen": (
            f"max by (node, vm, name) "
            f"(max_over_time(timestamp({INFO})[{history_range}:{HISTORY_STEP}]))"
        ),
        # The subquery's last step is the last whole minute: a VM whose samples all came
        # after it (a new VM, a new exporter) is seen only at the evaluation instant.
        "vm_seen_now": f"max by (node, vm, name) (timestamp({INFO}))",
        "vm_first_seen": (
            f"min by (node, vm) (min_over_time(timestamp({INFO})[{history_range}:{HISTORY_STEP}]))"
        ),
    }


def _rate_queries(q: QuerySettings, window_s: float, short_s: float) -> dict[str, str]:
    """Per-VM rates: the load estimate, the window mean and the short-window rate."""
    queries: dict[str, str] = {}
    window, short = q.window, q.short_window
    for resource, counters in RATE_COUNTERS.items():
        mean = f"({counter_sum(counters, window, 'node, vm')}) / {seconds_text(window_s)}"
        if q.estimator == "mean":
            queries[f"load_{resource}"] = mean
            continue
        short_rate = f"({counter_sum(counters, short, 'vm')}) / {seconds_text(short_s)}"
        queries[f"load_{resource}"] = (
            f"quantile_over_time({q.quantile:g}, ({short_rate})[{window}:{short}])"
        )
        if resource in BURST_RESOURCES:
            queries[f"mean_{resource}"] = mean
    for resource in BURST_RESOURCES:
        counters = RATE_COUNTERS[resource]
        queries[f"short_{resource}"] = (
            f"({counter_sum(counters, short, 'vm')}) / {seconds_text(short_s)}"
        )
    return queries


def _level_queries(q: QuerySettings) -> dict[str, str]:
    """Per-VM memory and per-node capacities and exporter health."""
    window, used = q.window, MEMORY_FAMILIES["memory"]
    if q.estimator == "mean":
        memory = f"max by (node, vm) (avg_over_time({used}[{window}]))"
    else:
        memory = f"max by (node, vm) (quantile_over_time({q.quantile:g}, {used}[{window}]))"
    assigned = MEMORY_FAMILIES["memory_max_bytes"]
    return {
        "load_memory": memory,
        "memory_max": f"max by (node, vm) (last_over_time({assigned}[{window}]))",
        "node_cpus": f"max by (node) (last_over_time(vmbalance_node_cpus[{window}]))",
        "node_memory": f"max by (node) (last_over_time(vmbalance_node_memory_bytes[{window}]))",
        "node_up": f"min by (node) (last_over_time(vmbalance_up[{q.short_window}]))",
    }


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
        window_s, short_s = duration_seconds(q.window), duration_seconds(q.short_window)
        history_s = duration_seconds(q.history)
        # The history subquery also finds each VM's first sample inside the window.
        history_range = q.history if history_s >= window_s else q.window
        queries = {
            **_presence_queries(history_range),
            **_rate_queries(q, window_s, short_s),
            **_level_queries(q),
            **migration_queries(q),
        }
        return cls(
            queries=queries,
            window=window_s,
            short=short_s,
            history=history_s,
            history_range=max(history_s, window_s),
        )


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
            "presence": f"max by (node, vm, name) (count_over_time({INFO}[{step}]))",
        }
        for resource, counters in RATE_COUNTERS.items():
            ranges[f"load_{resource}"] = (
                f"({counter_sum(counters, step, 'node')}) / {window.step:.0f}"
            )
        memory_column = config.balance.memory_column
        ranges["load_memory"] = f"sum by (node) ({MEMORY_FAMILIES[memory_column]})"
        ranges["capacity_cpu"] = f"max by (node) (max_over_time(vmbalance_node_cpus[{step}]))"
        ranges["capacity_memory"] = (
            f"max by (node) (max_over_time(vmbalance_node_memory_bytes[{step}]))"
        )
        ranges["up"] = f"min by (node) (last_over_time(vmbalance_up[{step}]))"
        # Per-VM loads over the whole span: the snapshot's own queries with the span as window.
        span_query = QuerySettings(window=f"{window.span:.0f}s", estimator="mean")
        span = SnapshotQueries.for_config(config.model_copy(update={"query": span_query}))
        instants = {f"vm_{r}": span.queries[f"load_{r}"] for r in RATE_COUNTERS}
        instants["vm_memory"] = span.queries[
            "memory_max" if memory_column == "memory_max_bytes" else "load_memory"
        ]
        return cls(ranges=ranges, instants=instants)

    def __len__(self) -> int:
        return len(self.ranges) + len(self.instants)

    def promql(self) -> list[str]:
        """Every query, range and instant."""
        return [*self.ranges.values(), *self.instants.values()]


__all__ = [
    "BURST_RESOURCES",
    "HISTORY_STEP",
    "MEMORY_FAMILIES",
    "RATE_COUNTERS",
    "ReportQueries",
    "SnapshotQueries",
    "counter_sum",
]
