"""Every PromQL query the recommender sends: the snapshot's and the report's.

A snapshot uses only the standard instant-query API (`/api/v1/query` with `time=`), so the
same queries read Prometheus, VictoriaMetrics, Thanos and Mimir. Their number is fixed by the
config, whatever the number of VMs (plus the departures of the VMs that moved, below):
every query is aggregated `by (cluster, node, vm)` or `by (cluster, vm)` and answered for all
VMs at once (`recommender.source.clusters` keeps nodes and VMs of different clusters apart). The
report adds range queries (`/api/v1/query_range`) aggregated `by (node)` or `by (node, vm)`.

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

The `quantile` estimator takes the quantile of the short-window rates, summed `by (cluster, vm)`
inside the subquery so that a VM that moved is one series, not two halves.

Every query is laid on the data's own grid (`recommender.source.grid`): evaluated at the
latest sample, counters over windows that start on a sample, levels without the window's edge
sample, sub-windows and steps at least three scrape intervals wide. That is where Prometheus
and VictoriaMetrics (default flags) give the same numbers.

Where each VM runs and when it last moved is read without stepping through the whole
history: a subquery evaluates its expression at every step for every series, so
`max_over_time(timestamp(vmbalance_vm_info)[24h:1m])` costs 1,440 evaluations per VM (at
10,000 VMs with a day of history, longer than Prometheus's 2-minute query timeout). Instead
`vm_moved` reads the raw samples once (`last_over_time(...[24h])`, no steps) and answers only
the VMs seen on more than one node; their departures are then dated from the raw samples of
those VMs alone (`SnapshotQueries.departures`: `vmbalance_vm_info{vm=~...}[24h]`, one more
query; ids sharing a prefix share it in the regex, so 1,300 ids like `c07-vm01234` take 8 KB,
and a second query comes only past about 2,000 VMs that moved), the last sample of each
series being the last time the VM was on that node. Neither server steps through anything
for it, and a series that a staleness marker ended is dated by its last real sample, not by
the last step that saw it.
The current node comes from the short window (a few steps). Only a VM younger than the window
is scaled, so its first sample is read only where it can matter: `vm_settled` counts each
(node, vm)'s samples in the window's first two minutes (one raw pass over a slot, no
steps), and the VMs seen now without one there (new VMs, and those that arrived in the
window) have their raw samples over the window read (`SnapshotQueries.arrivals`, none when
every VM was in place); a subquery `min_over_time(timestamp(...)[1h:1m])` cost 60
evaluations per VM, the largest share of a 10,000-VM snapshot. Aggregations keep `cluster`
(`by (cluster, node, vm)`), so VMs of different clusters stay apart where the label is
present; `SnapshotQueries.for_cluster` puts `cluster="NAME"` on every selector, so one
cluster's snapshot reads only its own series from a store holding a whole fleet.

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

Except for the VMs that moved in the period (or whose series start or end inside it): in the
step a VM migrated in, its series on the old node ends and one on the new node starts, and
`increase()` of such a series differs between the servers (Prometheus extrapolates toward the
step's edges, VictoriaMetrics counts a new series from zero when its first value is small).
So the presence is read first, the load queries leave those VMs out (`vm!~...`), and their
raw counter samples over the period (`counter{vm=~...}[span]`, one instant query per counter)
give each step's work exactly, from each series' own sample differences
(`recommender.source.history.exact_loads`): both servers return the same samples. That costs
in proportion to the VMs that moved (about 2 % of a fleet in a day), not to the fleet, and the
number of queries stays fixed. The list is cut at `MOVED_QUERY_CHARS` (VictoriaMetrics refuses
a query longer than 16 KiB by default): VMs that moved beyond it keep `increase()`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from recommender.config import Config, HostSettings, QuerySettings, duration_seconds
from recommender.history import Window
from recommender.quoting import promql_regex_alternatives, promql_string, regex_batches
from recommender.source.grid import SampleGrid, rate_samples_query
from recommender.source.host import per_host_second, pressure_queries
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
_LOADS = tuple(f"load_{resource}" for resource in RATE_COUNTERS)

# The longest list of VM ids one departures query carries (its regex, in characters).
DEPARTURE_QUERY_CHARS = 12_000
# The longest list of VM ids the report's load queries leave out and read raw (its regex, in
# characters; a load query of two counters carries it twice, `counter_sum`).
MOVED_QUERY_CHARS = 7_000


# A selector of a family the recommender reads (the exporter's `vmbalance_*`, node_exporter's
# `node_*`; no label it aggregates by starts so) with its matchers, if any: quoted values may
# hold braces.
_SELECTOR = re.compile(r'\b((?:vmbalance|node)_[A-Za-z0-9_]*)(\{(?:[^}"]|"(?:[^"\\]|\\.)*")*\})?')


def in_cluster(promql: str, cluster: str) -> str:
    """`promql` with `cluster="<cluster>"` on every selector: the same answers for the series
    of that cluster, none of the others read (`cluster=""` is the series without the label)."""
    matcher = f"cluster={promql_string(cluster)}"

    def scoped(match: re.Match[str]) -> str:
        name, braces = match.group(1), match.group(2)
        if braces is None or braces == "{}":
            return f"{name}{{{matcher}}}"
        return f"{name}{{{matcher},{braces[1:]}"

    return _SELECTOR.sub(scoped, promql)


def seconds_text(seconds: float) -> str:
    return f"{seconds:g}"


def offset_text(seconds: float) -> str:
    """A selector's ` offset Ns` (nothing for 0)."""
    return f" offset {round(seconds * 1000):d}ms" if seconds > 0 else ""


# The label `counter_sum` tells each counter's series apart by, so that `or` keeps them all.
COUNTER_LABEL = "summand"


def counter_sum(counters: Sequence[str], range_: str, by: str, offset: float = 0.0) -> str:
    """PromQL summing `increase()` of several counters per `by` labels, each evaluated once.

    `increase()` drops the name, so the counters' series of one VM would share labels and `or`
    would keep only the first: each is labelled with its position first (`COUNTER_LABEL`), and
    the sum adds them, a VM with only one of them included. A `{__name__=~"a|b"}` selector
    would be shorter but Prometheus refuses it (two series with the same labels), and
    `(sum(a) + sum(b)) or sum(a) or sum(b)` evaluates every counter twice.
    """
    shift = offset_text(offset)
    if len(counters) == 1:
        return f"sum by ({by}) (increase({counters[0]}[{range_}]{shift}))"
    parts = [
        f'label_replace(increase({c}[{range_}]{shift}), "{COUNTER_LABEL}", "{i}", "", "")'
        for i, c in enumerate(counters)
    ]
    return f"sum by ({by}) ({' or '.join(parts)})"


def settled_slot(window_s: float, grid: SampleGrid) -> float:
    """Seconds at the window's start in which a VM's sample on a node shows it was there for
    the whole window (`vm_settled`): two history steps, or two sample spacings when samples
    are sparser, and at most half the window."""
    spacing = grid.spacing if grid.known else 0.0
    slot = max(2 * duration_seconds(HISTORY_STEP), 2 * spacing)
    return min(slot, window_s / 2)


def _presence_queries(
    window_s: float, presence: str, history_range: str, slot: float
) -> dict[str, str]:
    """Where each VM is, which VMs were on their node since the window's start, and which VMs
    changed node, from `vmbalance_vm_info`; none of them steps through the whole history
    (see `departures` and `arrivals`)."""
    return {
        # The subquery's last step is the last whole minute: a VM whose samples all came
        # after it (a new VM, a new exporter) is seen only at the evaluation instant.
        "vm_seen_now": f"max by (cluster, node, vm, name) (timestamp({INFO}))",
        "vm_seen_recently": (
            f"max by (cluster, node, vm, name) "
            f"(max_over_time(timestamp({INFO})[{presence}:{HISTORY_STEP}]))"
        ),
        # On the node since the window's start: a sample in its first `slot` seconds. Only
        # the VMs seen now but not so (the young, and those that arrived in the window) have
        # their first sample read raw (`arrivals`): the young are scaled.
        "vm_settled": (
            f"max by (cluster, node, vm) "
            f"(count_over_time({INFO}[{seconds_text(slot)}s]{offset_text(window_s - slot)}))"
        ),
        # VMs seen on more than one node within the history: one pass over the raw samples,
        # answered only for the few that moved.
        "vm_moved": (
            f"count by (cluster, vm) "
            f"(count by (cluster, node, vm) (last_over_time({INFO}[{history_range}]))) > 1"
        ),
    }


def _rate_queries(
    q: QuerySettings, window_s: float, short_s: float, grid: SampleGrid
) -> dict[str, str]:
    """Per-VM rates: the load estimate, the window mean and the short-window rate.

    The quantile estimator's queries are subqueries whose points (the short-window rates) the
    source takes as they are and whose quantile it computes itself (`answers.quantiles`): the
    two servers interpolate `quantile_over_time` differently. The subquery's steps are
    multiples of the short window on both servers; an offset moves each step's window back
    onto the data's grid (`SampleGrid.phase_offset`) and the subquery's range starts on its
    first step (`SampleGrid.subquery_range`)."""
    queries: dict[str, str] = {}
    window, short = q.window, q.short_window
    phase = grid.phase_offset(short_s)
    for resource, counters in RATE_COUNTERS.items():
        mean = f"({counter_sum(counters, window, 'cluster, node, vm')}) / {seconds_text(window_s)}"
        if q.estimator == "mean":
            queries[f"load_{resource}"] = mean
            continue
        short_rate = (
            f"({counter_sum(counters, short, 'cluster, vm', phase)}) / {seconds_text(short_s)}"
        )
        queries[f"load_{resource}"] = (
            f"({short_rate})[{grid.subquery_range(window_s, short_s)}:{short}]"
        )
        if resource in BURST_RESOURCES:
            queries[f"mean_{resource}"] = mean
    for resource in BURST_RESOURCES:
        counters = RATE_COUNTERS[resource]
        queries[f"short_{resource}"] = (
            f"({counter_sum(counters, short, 'cluster, vm')}) / {seconds_text(short_s)}"
        )
    return queries


def _level_queries(q: QuerySettings, window_s: float, grid: SampleGrid) -> dict[str, str]:
    """Per-VM memory and per-node capacities and exporter health; the memory over a range
    without the sample on the window's edge (`SampleGrid.level_range`)."""
    window, used = grid.level_range(window_s), MEMORY_FAMILIES["memory"]
    if q.estimator == "mean":
        memory = f"max by (cluster, node, vm) (avg_over_time({used}[{window}]))"
    else:
        # Sampled at the short window's steps, on the data's grid (see `_rate_queries`).
        short_s = duration_seconds(q.short_window)
        phase = offset_text(grid.phase_offset(short_s))
        points = grid.subquery_range(window_s, short_s)
        memory = f"(max by (cluster, node, vm) ({used}{phase}))[{points}:{q.short_window}]"
    assigned = MEMORY_FAMILIES["memory_max_bytes"]
    return {
        "load_memory": memory,
        "memory_max": f"max by (cluster, node, vm) (last_over_time({assigned}[{q.window}]))",
        "node_cpus": f"max by (cluster, node) (last_over_time(vmbalance_node_cpus[{q.window}]))",
        "node_memory": (
            f"max by (cluster, node) (last_over_time(vmbalance_node_memory_bytes[{q.window}]))"
        ),
        "node_up": f"min by (cluster, node) (last_over_time(vmbalance_up[{q.short_window}]))",
    }


# node_exporter's host totals, joined to `node` by the scrape relabelling in docs/deploy.md.
# CPU busy is every mode but idle, iowait (idle while waiting for I/O) and steal (time the
# layer below took): the work this host did, VMs and Ceph alike.
HOST_CPU = "node_cpu_seconds_total"
HOST_CPU_IDLE_MODES = "idle|iowait|steal"
HOST_NETWORK = ("node_network_receive_bytes_total", "node_network_transmit_bytes_total")


def _host_queries(host: HostSettings, window: str, window_s: float) -> dict[str, str]:
    """Per node, what the host did over the window: CPU cores busy, NIC bytes/s."""
    queries: dict[str, str] = {}
    if host.cpu:
        # Busy share of all CPU time times the CPUs: right also for a host series younger
        # than the window or with missed scrapes, where increase / window would be short.
        cpu = f'{HOST_CPU}{{node!=""}}'
        busy = f'{HOST_CPU}{{node!="",mode!~"{HOST_CPU_IDLE_MODES}"}}'
        idle = f'{HOST_CPU}{{node!="",mode="idle"}}'  # one series per CPU
        queries["host_cpu"] = (
            f"sum by (cluster, node) (increase({busy}[{window}])) "
            f"/ sum by (cluster, node) (increase({cpu}[{window}])) "
            f"* count by (cluster, node) (last_over_time({idle}[{window}]))"
        )
    if host.interfaces:
        devices = promql_regex_alternatives(host.interfaces)
        selectors = [f'{c}{{node!="",device=~{devices}}}' for c in HOST_NETWORK]
        queries["host_network"] = per_host_second(
            counter_sum(selectors, window, "cluster, node"), window, window_s
        )
    return queries


@dataclass(frozen=True)
class SnapshotQueries:
    """The PromQL of one snapshot, derived from the config only."""

    queries: Mapping[str, str]
    window: float
    short: float
    history: float
    history_range: float
    # Queries answered with the points of a subquery, of which the source takes the quantile.
    quantiles: frozenset[str] = frozenset()
    # Only this cluster's series are read (`in_cluster`); None: every cluster's.
    cluster: str | None = None
    # Seconds at the window's start that `vm_settled` looks at (`settled_slot`).
    slot: float = 2 * 60.0
    # The data's sample spacing (NaN when unknown).
    spacing: float = math.nan

    def for_cluster(self, cluster: str | None) -> SnapshotQueries:
        """The same queries reading only `cluster`'s series (all of them for None)."""
        if cluster is None:
            return self
        queries = {name: in_cluster(promql, cluster) for name, promql in self.queries.items()}
        return replace(self, queries=queries, cluster=cluster)

    @classmethod
    def for_config(cls, config: Config, grid: SampleGrid | None = None) -> SnapshotQueries:
        """The queries of `config`, laid on `grid` (the data's own time grid) when known."""
        q = config.query
        grid = grid if grid is not None else SampleGrid(at=0.0)
        window_s, short_s = duration_seconds(q.window), duration_seconds(q.short_window)
        history_s = duration_seconds(q.history)
        # The departures' raw samples also give a moved VM's first sample inside the window.
        history_range = q.history if history_s >= window_s else q.window
        presence = f"{max(short_s, 2 * duration_seconds(HISTORY_STEP)):.0f}s"
        slot = settled_slot(window_s, grid)
        queries = {
            **_presence_queries(window_s, presence, history_range, slot),
            **_rate_queries(q, window_s, short_s, grid),
            "rate_samples": rate_samples_query(RATE_COUNTERS, window_s, grid),
            **_level_queries(q, window_s, grid),
            **_host_queries(config.host, q.window, window_s),
            **pressure_queries(config.host, q.window, window_s),
            **migration_queries(q),
        }
        return cls(
            queries=queries,
            window=window_s,
            short=short_s,
            history=history_s,
            history_range=max(history_s, window_s),
            slot=slot,
            spacing=grid.spacing if grid.known else math.nan,
            quantiles=frozenset(
                name
                for name in queries
                if q.estimator == "quantile" and name in (*_LOADS, "load_memory")
            ),
        )

    def departures(self, moved: Sequence[str]) -> list[str]:
        """The raw `vmbalance_vm_info` samples within the history of the `moved` VMs (the
        `vm_moved` answer), whose last sample per series is when the VM was last on that
        node (`recommender.source.cluster.last_samples`), in queries of at most
        `DEPARTURE_QUERY_CHARS` (VictoriaMetrics refuses a query longer than 16 KiB by
        default), so one query in all unless thousands moved."""
        return self._raw_presence(moved, self.history_range)

    def arrivals(self, unsettled: Sequence[str]) -> list[str]:
        """The raw `vmbalance_vm_info` samples within the window of the VMs seen now but not
        on their node since the window's start (`vm_settled`), whose first sample per series
        is when the VM appeared there (`recommender.source.cluster.first_samples`): none
        when every VM was in place, batched like `departures`."""
        return self._raw_presence(unsettled, self.window)

    def _raw_presence(self, vms: Sequence[str], seconds: float) -> list[str]:
        batches = list(regex_batches(vms, DEPARTURE_QUERY_CHARS))
        queries = [
            f"{INFO}{{vm=~{promql_regex_alternatives(batch)}}}[{seconds:.0f}s]" for batch in batches
        ]
        return queries if self.cluster is None else [in_cluster(q, self.cluster) for q in queries]


def executed_queries(span: float) -> dict[str, str]:
    """The migrations vmbalance executed over the last `span` seconds, from its own apply
    metrics: counts by result, and the summed duration and count of those that ran."""
    window = f"[{span:.0f}s]"
    duration = "vmbalance_apply_migration_duration_seconds"
    return {
        "executed": f"sum by (result) (increase(vmbalance_apply_migrations_total{window}))",
        "executed_duration": " or ".join(
            f'label_replace(sum(increase({duration}_{stat}{window})), "stat", "{stat}", "", "")'
            for stat in ("sum", "count")
        ),
    }


@dataclass(frozen=True)
class ReportQueries:
    """The PromQL of one report: range queries (evaluated every step) and instant queries
    (evaluated once at the end, over the whole covered span). Fixed in number."""

    ranges: Mapping[str, str]
    instants: Mapping[str, str]
    # Seconds every range query is sent later than the window's times, its selectors offset
    # back by as much: the sent times are multiples of the step, which VictoriaMetrics would
    # otherwise round them to, and the windows still end on the data's samples.
    shift: float = 0.0
    # Per counter, the raw samples over the span of the VMs the load queries leave out
    # (instant queries at the window's end); empty when no VM moved.
    samples: Mapping[str, str] = field(default_factory=dict)
    # The VMs read raw: the moved VMs that fit in MOVED_QUERY_CHARS.
    moved: tuple[str, ...] = ()

    @classmethod
    def for_config(
        cls,
        config: Config,
        window: Window,
        grid: SampleGrid | None = None,
        moved: Sequence[str] = (),
    ) -> ReportQueries:
        """The report's queries; with `moved` (the VMs that moved in the window, from the
        presence answer, `recommender.source.history.moved_vms`), the load queries leave
        them out and `samples` reads their counters raw."""
        grid = grid if grid is not None else SampleGrid(at=window.end)
        shift = SampleGrid(at=window.end).shift(window.step)
        back = offset_text(shift)
        step = f"{window.step:.0f}s"
        counted = grid.level_range(window.step)
        ranges: dict[str, str] = {
            # Samples of each (node, vm) in each step: where a VM was, and (from how many
            # samples it has in its first step on a node) when it arrived there.
            "presence": f"max by (node, vm, name) (count_over_time({INFO}[{counted}]{back}))",
        }
        raw = _within(moved, MOVED_QUERY_CHARS)
        regex = promql_regex_alternatives(raw)
        samples: dict[str, str] = {}
        for resource, counters in RATE_COUNTERS.items():
            selectors = [f"{c}{{vm!~{regex}}}" for c in counters] if raw else list(counters)
            ranges[f"load_{resource}"] = (
                f"({counter_sum(selectors, step, 'node', shift)}) / {window.step:.0f}"
            )
            if raw:
                # Back to a step before the window: the sample each first step starts from.
                samples.update(
                    {
                        c: f"{c}{{vm=~{regex}}}[{window.span + 2 * window.step:.0f}s]"
                        for c in counters
                    }
                )
        memory_column = config.balance.memory_column
        # The sample at each step's time only: a series that ended (a VM that left) is not
        # carried on by either server's lookback.
        memory = MEMORY_FAMILIES[memory_column]
        ranges["load_memory"] = (
            f"sum by (node) (last_over_time({memory}[{grid.level_range(grid.spacing)}]{back}))"
            if grid.known
            else f"sum by (node) ({memory}{back})"
        )
        ranges["capacity_cpu"] = f"max by (node) (max_over_time(vmbalance_node_cpus[{step}]{back}))"
        ranges["capacity_memory"] = (
            f"max by (node) (max_over_time(vmbalance_node_memory_bytes[{step}]{back}))"
        )
        ranges["up"] = f"min by (node) (last_over_time(vmbalance_up[{step}]{back}))"
        # Per-VM loads over the whole span: the snapshot's own queries with the span as window.
        span_query = QuerySettings(window=f"{window.span:.0f}s", estimator="mean")
        span = SnapshotQueries.for_config(config.model_copy(update={"query": span_query}), grid)
        instants = {f"vm_{r}": span.queries[f"load_{r}"] for r in RATE_COUNTERS}
        instants["vm_memory"] = span.queries[
            "memory_max" if memory_column == "memory_max_bytes" else "load_memory"
        ]
        instants.update(executed_queries(window.span))
        return cls(ranges=ranges, instants=instants, shift=shift, samples=samples, moved=raw)

    def for_cluster(self, cluster: str | None) -> ReportQueries:
        """The same queries reading only `cluster`'s series (all of them for None), the
        executed migrations too (their metrics carry the executed plan's cluster)."""
        if cluster is None:
            return self
        return replace(
            self,
            ranges={n: in_cluster(q, cluster) for n, q in self.ranges.items()},
            instants={n: in_cluster(q, cluster) for n, q in self.instants.items()},
            samples={n: in_cluster(q, cluster) for n, q in self.samples.items()},
        )

    def __len__(self) -> int:
        return len(self.ranges) + len(self.instants) + len(self.samples)

    def promql(self) -> list[str]:
        """Every query, range and instant."""
        return [*self.ranges.values(), *self.instants.values(), *self.samples.values()]


def _within(vms: Sequence[str], chars: int) -> tuple[str, ...]:
    """The first of the sorted `vms` whose regex of alternatives fits in `chars`."""
    first = next(regex_batches(vms, chars), [])
    # A batch fits unless it is one value too long on its own.
    if len(first) == 1 and len(promql_regex_alternatives(first)) > chars:
        return ()
    return tuple(first)


__all__ = [
    "BURST_RESOURCES",
    "DEPARTURE_QUERY_CHARS",
    "HISTORY_STEP",
    "MEMORY_FAMILIES",
    "MOVED_QUERY_CHARS",
    "RATE_COUNTERS",
    "ReportQueries",
    "SnapshotQueries",
    "counter_sum",
    "executed_queries",
    "in_cluster",
    "settled_slot",
]
