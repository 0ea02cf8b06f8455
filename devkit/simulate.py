"""A seeded cluster history: ground truth for tests, the demo and the report.

`simulate_cluster` draws a cluster (node sizes, VMs with heavy-tailed disk and network load,
one hot node, a few migrations at known times, optional bursts) and keeps everything needed to
regenerate every sample on demand, so a week of history never has to sit in memory.
`to_openmetrics` streams it as the exporter's metric families (names and labels exactly as in
docs/metrics.md) in OpenMetrics text for `promtool tsdb create-blocks-from openmetrics`;
`to_openmetrics_blocks` cuts long histories into one file per 2 h block, which promtool
backfills in linear time; `to_victoriametrics` streams the same samples as Prometheus text
with millisecond timestamps for VictoriaMetrics' `/api/v1/import/prometheus`.

Size: a week at 60 s for 60 VMs is about 8.3 M samples, 740 MB of text, ~10 s to write and
~45 s to backfill; a coarser `step` (up to the servers' 5 m lookback) shrinks it in
proportion.

The truth methods (`true_load`, `true_short_load`, `true_quantile_load`, `node_at`,
`last_migration`, `truth_snapshot`) say what a correct reader of those samples must find.
Values depend only on the seed and the shape arguments; the time axis ends at `end`.
"""

from __future__ import annotations

import io
import itertools
import math
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import IO

import numpy as np
import pandas as pd

from recommender.model import Disk, Snapshot, make_nodes, make_vms

GIB = 1024**3

# Counters of one VM, in the simulator's own names; each maps to one exporter family.
COUNTERS: tuple[str, ...] = (
    "cpu_seconds",
    "disk_read_bytes",
    "disk_written_bytes",
    "disk_reads",
    "disk_writes",
    "net_rx",
    "net_tx",
)

# Counter -> (family name, per-device label or None, which noise stream drives it).
_COUNTER_FAMILIES: dict[str, tuple[str, str | None, str]] = {
    "cpu_seconds": ("vmbalance_vm_cpu_seconds_total", None, "cpu"),
    "disk_read_bytes": ("vmbalance_vm_disk_read_bytes_total", "disk", "disk"),
    "disk_written_bytes": ("vmbalance_vm_disk_written_bytes_total", "disk", "disk"),
    "disk_reads": ("vmbalance_vm_disk_reads_completed_total", "disk", "disk"),
    "disk_writes": ("vmbalance_vm_disk_writes_completed_total", "disk", "disk"),
    "net_rx": ("vmbalance_vm_network_receive_bytes_total", "interface", "net"),
    "net_tx": ("vmbalance_vm_network_transmit_bytes_total", "interface", "net"),
}

# Which counters make up each rate resource of the snapshot.
_RESOURCE_COUNTERS: dict[str, tuple[str, ...]] = {
    "cpu": ("cpu_seconds",),
    "disk_bytes": ("disk_read_bytes", "disk_written_bytes"),
    "disk_ops": ("disk_reads", "disk_writes"),
    "network": ("net_rx", "net_tx"),
}

HOSTILE_NAMES: tuple[str, ...] = (
    'quo"te',
    "back\\slash",
    "new\nline",
    "émoji 🚀 ünïcödé",
    "rtl \u202emoc.evil\u202c",
    "<b>{{ name }}</b> ; rm -rf /",
    "日本語のなまえ",
    "tab\tand  trailing ",
)

_ROLES = ("web", "db", "cache", "ci", "mail", "files", "build", "backup", "app", "queue")


@dataclass(frozen=True)
class SimNode:
    """A hypervisor: what the exporter reports plus the capacities only the config knows."""

    name: str
    cpus: int
    memory_bytes: int
    disk_bytes: float = 4e8
    disk_ops: float = 20_000.0
    network: float = 1.25e9
    backend: str = "qmp"
    version: str = "8.1.5"


@dataclass(frozen=True)
class SimVM:
    """A VM and its long-run mean rates (per second); per-step noise is regenerated from
    `noise_seed`."""

    vm: str
    name: str
    uuid: str
    vcpus: int
    memory_max_bytes: int
    memory_used_fraction: float
    rates: Mapping[str, float]
    disks: tuple[str, ...]
    disk_split: tuple[float, ...]
    interfaces: tuple[str, ...]
    interface_split: tuple[float, ...]
    noise_seed: int
    initial_counter_seconds: float


@dataclass(frozen=True)
class Migration:
    vm: str
    time: float
    source: str
    target: str


@dataclass(frozen=True)
class Burst:
    """The VM's rates are multiplied by `factor` for samples in (start, end]."""

    vm: str
    start: float
    end: float
    factor: float


@dataclass(frozen=True)
class SimDisk:
    disk: str
    storage: str
    shared: bool
    size_bytes: int


@dataclass(frozen=True)
class SimFacts:
    """What decides whether and how a VM can move, as the exporter publishes it."""

    blockers: tuple[str, ...] = ()
    disks: tuple[SimDisk, ...] = ()
    ha_managed: bool = False
    dirty_rate: float | None = None  # bytes/s; None: the exporter publishes no series


@dataclass(frozen=True)
class Series:
    """One emitted series: its samples are `values` at `times` (seconds)."""

    family: str
    labels: tuple[tuple[str, str], ...]
    times: np.ndarray
    values: np.ndarray
    integer: bool


# Family -> (OpenMetrics family name, type). Order is the order of the output.
FAMILIES: tuple[tuple[str, str, str], ...] = (
    ("vmbalance_vm_info", "vmbalance_vm_info", "gauge"),
    ("vmbalance_vm_cpu_seconds_total", "vmbalance_vm_cpu_seconds", "counter"),
    ("vmbalance_vm_vcpus", "vmbalance_vm_vcpus", "gauge"),
    ("vmbalance_vm_memory_max_bytes", "vmbalance_vm_memory_max_bytes", "gauge"),
    ("vmbalance_vm_memory_used_bytes", "vmbalance_vm_memory_used_bytes", "gauge"),
    ("vmbalance_vm_memory_rss_bytes", "vmbalance_vm_memory_rss_bytes", "gauge"),
    ("vmbalance_vm_disk_read_bytes_total", "vmbalance_vm_disk_read_bytes", "counter"),
    ("vmbalance_vm_disk_written_bytes_total", "vmbalance_vm_disk_written_bytes", "counter"),
    ("vmbalance_vm_disk_reads_completed_total", "vmbalance_vm_disk_reads_completed", "counter"),
    (
        "vmbalance_vm_disk_writes_completed_total",
        "vmbalance_vm_disk_writes_completed",
        "counter",
    ),
    (
        "vmbalance_vm_network_receive_bytes_total",
        "vmbalance_vm_network_receive_bytes",
        "counter",
    ),
    (
        "vmbalance_vm_network_transmit_bytes_total",
        "vmbalance_vm_network_transmit_bytes",
        "counter",
    ),
    ("vmbalance_node_info", "vmbalance_node_info", "gauge"),
    ("vmbalance_node_cpus", "vmbalance_node_cpus", "gauge"),
    ("vmbalance_node_memory_bytes", "vmbalance_node_memory_bytes", "gauge"),
    ("vmbalance_up", "vmbalance_up", "gauge"),
    ("vmbalance_scrape_duration_seconds", "vmbalance_scrape_duration_seconds", "gauge"),
    ("vmbalance_vm_scrape_errors_total", "vmbalance_vm_scrape_errors", "counter"),
    ("vmbalance_vm_migration_blocker", "vmbalance_vm_migration_blocker", "gauge"),
    ("vmbalance_vm_disk_info", "vmbalance_vm_disk_info", "gauge"),
    ("vmbalance_vm_disk_size_bytes", "vmbalance_vm_disk_size_bytes", "gauge"),
    ("vmbalance_vm_ha_managed", "vmbalance_vm_ha_managed", "gauge"),
    (
        "vmbalance_vm_memory_dirty_rate_bytes_per_second",
        "vmbalance_vm_memory_dirty_rate_bytes_per_second",
        "gauge",
    ),
)


@dataclass
class ClusterHistory:
    """A simulated cluster over `[start, end]` sampled every `step` seconds."""

    seed: int
    start: float
    step: float
    samples: int
    nodes: tuple[SimNode, ...]
    vms: tuple[SimVM, ...]
    initial_node: Mapping[str, str]
    migrations: tuple[Migration, ...]
    bursts: tuple[Burst, ...]
    hot_node: str
    noise: float
    # The `cluster` label of every series ("": none); per VM, its migration facts (VMs not
    # named publish no blocker, disk info or dirty-rate series).
    cluster: str = ""
    facts: Mapping[str, SimFacts] = field(default_factory=dict)
    _vm_index: dict[str, SimVM] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._vm_index = {v.vm: v for v in self.vms}

    @property
    def end(self) -> float:
        return self.start + (self.samples - 1) * self.step

    @cached_property
    def times(self) -> np.ndarray:
        return self.start + self.step * np.arange(self.samples, dtype=float)

    def vm(self, vm: str) -> SimVM:
        return self._vm_index[vm]

    # --- placement -------------------------------------------------------------------------

    def segments(self, vm: str) -> list[tuple[float, str]]:
        """[(from_time, node), ...] in time order; the first starts before the history."""
        result = [(-math.inf, self.initial_node[vm])]
        for move in sorted((m for m in self.migrations if m.vm == vm), key=lambda m: m.time):
            result.append((move.time, move.target))
        return result

    def node_at(self, vm: str, t: float) -> str:
        """Where the VM runs at time t (a migration at T moves it for every t >= T)."""
        node = self.initial_node[vm]
        for since, target in self.segments(vm):
            if t >= since:
                node = target
        return node

    def last_migration(self, vm: str, at: float | None = None, history: float = 86400.0) -> float:
        """Time of the VM's last migration in (at - history, at], NaN if none."""
        at = self.end if at is None else at
        times = [m.time for m in self.migrations if m.vm == vm and at - history < m.time <= at]
        return max(times) if times else math.nan

    # --- samples ---------------------------------------------------------------------------

    def _multipliers(self, vm: SimVM) -> dict[str, np.ndarray]:
        """Per-sample load multipliers (mean 1) of the cpu, disk and net streams."""
        rng = np.random.default_rng(vm.noise_seed)
        sigma = self.noise
        result = {}
        for stream in ("cpu", "disk", "net"):
            noise = rng.lognormal(-0.5 * sigma * sigma, sigma, self.samples) if sigma else None
            result[stream] = noise if noise is not None else np.ones(self.samples)
        for burst in self.bursts:
            if burst.vm == vm.vm:
                mask = (self.times > burst.start) & (self.times <= burst.end)
                for stream in result:
                    result[stream] = np.where(mask, result[stream] * burst.factor, result[stream])
        return result

    def increments(self, vm: str) -> dict[str, np.ndarray]:
        """Work per counter in (t[k-1], t[k]] for every sample k (k = 0: nothing)."""
        sim = self.vm(vm)
        multipliers = self._multipliers(sim)
        result = {}
        for counter in COUNTERS:
            stream = _COUNTER_FAMILIES[counter][2]
            inc = sim.rates[counter] * self.step * multipliers[stream]
            inc[0] = 0.0
            result[counter] = inc
        return result

    def memory_used(self, vm: str) -> np.ndarray:
        sim = self.vm(vm)
        rng = np.random.default_rng(sim.noise_seed + 1)
        wobble = 1.0 + 0.03 * rng.standard_normal(self.samples)
        used = sim.memory_max_bytes * sim.memory_used_fraction * wobble
        return np.floor(np.clip(used, 0, sim.memory_max_bytes))

    def _counter_values(self, vm: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(node index per sample, cumulative value per counter per sample).

        On the first node a counter starts from the VM's uptime; after a migration at T it
        restarts from the work done since T, as the new QEMU process's counters do.
        """
        sim = self.vm(vm)
        inc = self.increments(vm)
        segs = self.segments(vm)
        seg_index = np.zeros(self.samples, dtype=int)
        for i, (since, _node) in enumerate(segs):
            seg_index[self.times >= since] = i
        values: dict[str, np.ndarray] = {}
        for counter, work in inc.items():
            total = np.cumsum(work)
            out = np.empty(self.samples)
            for i, (since, _node) in enumerate(segs):
                mask = seg_index == i
                if not mask.any():
                    continue
                first = int(np.argmax(mask))
                if i == 0:
                    base = sim.rates[counter] * sim.initial_counter_seconds
                    out[mask] = base + total[mask]
                else:
                    fraction = (self.times[first] - since) / self.step
                    out[mask] = total[mask] - total[first] + work[first] * fraction
            values[counter] = out
        return seg_index, values

    def series(self, vm_filter: Callable[[SimVM], bool] | None = None) -> Iterator[Series]:
        """Every series the exporters would have published, family by family, sorted by labels
        within a family, samples in time order."""
        per_family: dict[str, list[Series]] = {name: [] for name, _, _ in FAMILIES}
        for sim in self.vms:
            if vm_filter is not None and not vm_filter(sim):
                continue
            for s in self._vm_series(sim):
                per_family[s.family].append(s)
        for s in self._node_series():
            per_family[s.family].append(s)
        for name, _, _ in FAMILIES:
            for s in sorted(per_family[name], key=lambda s: s.labels):
                if self.cluster:
                    s = replace(s, labels=(("cluster", self.cluster), *s.labels))
                yield s

    def _vm_series(self, sim: SimVM) -> Iterator[Series]:
        seg_index, counters = self._counter_values(sim.vm)
        used = self.memory_used(sim.vm)
        segs = self.segments(sim.vm)
        for i, (_since, node) in enumerate(segs):
            mask = seg_index == i
            if not mask.any():
                continue
            t = self.times[mask]
            ones = np.ones(len(t))
            base = (("node", node), ("vm", sim.vm))
            info = (*base, ("name", sim.name), ("uuid", sim.uuid), ("backend", "qmp"))
            yield Series("vmbalance_vm_info", info, t, ones, True)
            yield Series("vmbalance_vm_vcpus", base, t, ones * sim.vcpus, True)
            yield Series(
                "vmbalance_vm_memory_max_bytes", base, t, ones * sim.memory_max_bytes, True
            )
            yield Series("vmbalance_vm_memory_used_bytes", base, t, used[mask], True)
            rss = np.floor(used[mask] * 1.05 + 200 * 1024**2)
            yield Series("vmbalance_vm_memory_rss_bytes", base, t, rss, True)
            yield from self._fact_series(sim.vm, base, t)
            for counter, (family, device_label, _stream) in _COUNTER_FAMILIES.items():
                value = counters[counter][mask]
                if device_label is None:
                    yield Series(family, base, t, np.round(value, 3), False)
                    continue
                devices, split = (
                    (sim.disks, sim.disk_split)
                    if device_label == "disk"
                    else (sim.interfaces, sim.interface_split)
                )
                for device, share in zip(devices, split, strict=True):
                    labels = (*base, (device_label, device))
                    yield Series(family, labels, t, np.floor(value * share), True)

    def _fact_series(
        self, vm: str, base: tuple[tuple[str, str], ...], t: np.ndarray
    ) -> Iterator[Series]:
        """The migration facts of one VM on one node (`base`) at times `t`."""
        if vm not in self.facts:
            return
        ones = np.ones(len(t))
        facts = self.facts[vm]
        for reason in facts.blockers:
            labels = (*base, ("reason", reason))
            yield Series("vmbalance_vm_migration_blocker", labels, t, ones, True)
        for disk in facts.disks:
            info = (
                *base,
                ("disk", disk.disk),
                ("storage", disk.storage),
                ("shared", "1" if disk.shared else "0"),
            )
            yield Series("vmbalance_vm_disk_info", info, t, ones, True)
            size = ones * disk.size_bytes
            yield Series(
                "vmbalance_vm_disk_size_bytes", (*base, ("disk", disk.disk)), t, size, True
            )
        yield Series("vmbalance_vm_ha_managed", base, t, ones * facts.ha_managed, True)
        if facts.dirty_rate is not None:
            family = "vmbalance_vm_memory_dirty_rate_bytes_per_second"
            yield Series(family, base, t, ones * facts.dirty_rate, False)

    def _fact_row(self, vm: str) -> dict[str, object]:
        facts = self.facts.get(vm, SimFacts())
        disks = [Disk(d.disk, d.storage, d.shared, float(d.size_bytes)) for d in facts.disks]
        return {
            "blockers": list(facts.blockers),
            "disks": disks,
            "ha_managed": facts.ha_managed,
            "dirty_rate": facts.dirty_rate,
        }

    def _node_series(self) -> Iterator[Series]:
        t = self.times
        ones = np.ones(len(t))
        for index, node in enumerate(self.nodes):
            base = (("node", node.name),)
            info = (*base, ("backend", node.backend), ("version", node.version))
            yield Series("vmbalance_node_info", info, t, ones, True)
            yield Series("vmbalance_node_cpus", base, t, ones * node.cpus, True)
            yield Series("vmbalance_node_memory_bytes", base, t, ones * node.memory_bytes, True)
            yield Series("vmbalance_up", base, t, ones, True)
            rng = np.random.default_rng((self.seed, index))
            duration = np.round(0.02 + 0.01 * rng.random(len(t)), 4)
            yield Series("vmbalance_scrape_duration_seconds", base, t, duration, False)
            yield Series("vmbalance_vm_scrape_errors_total", base, t, ones * 0, True)

    def capacity_settings(self) -> dict[str, object]:
        """The `capacity` config section that tells the source the simulated capacities."""
        return {
            "per_node": {
                n.name: {"disk_bytes": n.disk_bytes, "disk_ops": n.disk_ops, "network": n.network}
                for n in self.nodes
            }
        }

    # --- ground truth ----------------------------------------------------------------------

    def _window_mask(self, at: float, window: float) -> np.ndarray:
        return (self.times > at - window + 1e-9) & (self.times <= at + 1e-9)

    def _rates(self, inc: Mapping[str, np.ndarray], at: float, window: float) -> dict:
        mask = self._window_mask(at, window)
        return {
            resource: float(sum(inc[c][mask].sum() for c in counters)) / window
            for resource, counters in _RESOURCE_COUNTERS.items()
        }

    def true_load(
        self, vm: str, at: float | None = None, window: float = 3600.0
    ) -> dict[str, float]:
        """Mean load per resource over (at - window, at], whatever node the VM was on;
        `memory` is the mean of the used-memory samples in the window."""
        at = self.end if at is None else at
        result = self._rates(self.increments(vm), at, window)
        result["memory"] = float(self.memory_used(vm)[self._window_mask(at, window)].mean())
        return result

    def true_short_load(
        self, vm: str, at: float | None = None, short: float = 300.0
    ) -> dict[str, float]:
        """Mean rates over the last `short` seconds (what burst detection compares)."""
        at = self.end if at is None else at
        return self._rates(self.increments(vm), at, short)

    def true_quantile_load(
        self,
        vm: str,
        q: float,
        at: float | None = None,
        window: float = 3600.0,
        short: float = 300.0,
    ) -> dict[str, float]:
        """q-quantile of the short-window rates on the grid of multiples of `short` in
        (at - window, at] (what the `quantile` estimator's subquery evaluates)."""
        at = self.end if at is None else at
        inc = self.increments(vm)
        grid = np.arange(math.floor(at / short) * short, at - window, -short)
        per_step = [self._rates(inc, float(t), short) for t in grid]
        return {
            resource: float(np.quantile([r[resource] for r in per_step], q))
            for resource in _RESOURCE_COUNTERS
        }

    def truth_snapshot(
        self,
        at: float | None = None,
        window: float = 3600.0,
        short: float = 300.0,
        history: float = 86400.0,
        weights: Mapping[str, float] | None = None,
    ) -> Snapshot:
        """The snapshot a perfect source would build at `at` (no server involved)."""
        from recommender.config import BalanceSettings
        from recommender.source.cluster import burst_ratios

        at = self.end if at is None else at
        nodes = make_nodes(
            {
                n.name: {
                    "cpu": n.cpus,
                    "memory": n.memory_bytes,
                    "disk_bytes": n.disk_bytes,
                    "disk_ops": n.disk_ops,
                    "network": n.network,
                    "cluster": self.cluster,
                }
                for n in self.nodes
            }
        )
        rows: dict[str, dict[str, object]] = {}
        short_rows: dict[str, dict[str, float]] = {}
        for sim in self.vms:
            load = self.true_load(sim.vm, at, window)
            short_rows[sim.vm] = self.true_short_load(sim.vm, at, short)
            rows[sim.vm] = {
                "name": sim.name,
                "node": self.node_at(sim.vm, at),
                **load,
                "memory_max_bytes": sim.memory_max_bytes,
                "last_migration": self.last_migration(sim.vm, at, history),
                **self._fact_row(sim.vm),
            }
        vms = make_vms(rows)
        short_frame = pd.DataFrame.from_dict(short_rows, orient="index")
        vms["burst_ratio"] = burst_ratios(
            vms, short_frame, nodes, weights if weights is not None else BalanceSettings().weights
        )
        return Snapshot(
            nodes=nodes,
            vms=vms,
            taken_at=pd.Timestamp(at, unit="s", tz="UTC").to_pydatetime(),
            source=f"simulation seed {self.seed}",
            window=_duration_text(window),
        )


def _duration_text(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def _draw_vm(rng: np.random.Generator, i: int, hostile_names: int, first_vmid: int = 101) -> SimVM:
    """VM number `i`: its size and its mean rates, drawn from heavy-tailed distributions."""
    vmid = str(first_vmid + i)
    vcpus = int(rng.choice([1, 2, 2, 4, 4, 8]))
    memory_max = int(rng.choice([2, 4, 4, 8, 8, 16, 32])) * GIB
    cpu = vcpus * float(rng.beta(2, 5))
    disk_bytes = float(min(rng.lognormal(math.log(2e6), 1.6), 4e8))
    read_share = float(rng.beta(2, 2))
    io_size = float(rng.choice([4096, 16384, 65536, 262144]))
    network = float(min(rng.lognormal(math.log(3e6), 1.5), 6e8))
    rx_share = float(rng.beta(2, 2))
    n_disks = int(rng.choice([1, 1, 2]))
    disk_split = tuple(float(x) for x in rng.dirichlet([2.0] * n_disks))
    rates = {
        "cpu_seconds": cpu,
        "disk_read_bytes": disk_bytes * read_share,
        "disk_written_bytes": disk_bytes * (1 - read_share),
        "disk_reads": disk_bytes * read_share / io_size,
        "disk_writes": disk_bytes * (1 - read_share) / io_size,
        "net_rx": network * rx_share,
        "net_tx": network * (1 - rx_share),
    }
    name = HOSTILE_NAMES[i % len(HOSTILE_NAMES)] if i < hostile_names else ""
    return SimVM(
        vm=vmid,
        name=name or f"{_ROLES[i % len(_ROLES)]}-{i + 1:02d}",
        uuid=str(uuidlib.UUID(int=int(rng.integers(0, 2**63)) << 64 | i)),
        vcpus=vcpus,
        memory_max_bytes=memory_max,
        memory_used_fraction=float(rng.uniform(0.3, 0.9)),
        rates=rates,
        disks=("scsi0", "scsi1")[:n_disks],
        disk_split=disk_split,
        interfaces=("net0",),
        interface_split=(1.0,),
        noise_seed=int(rng.integers(0, 2**31)),
        initial_counter_seconds=float(rng.uniform(3600, 30 * 86400)),
    )


def _place(
    rng: np.random.Generator, sims: Sequence[SimVM], node_names: Sequence[str]
) -> dict[str, str]:
    """The hot node (the first) gets the heaviest VMs (disk and network relative to a node,
    plus CPU) on top of its even share of the rest."""

    def weight(v: SimVM) -> float:
        disk = (v.rates["disk_read_bytes"] + v.rates["disk_written_bytes"]) / 4e8
        net = (v.rates["net_rx"] + v.rates["net_tx"]) / 1.25e9
        return 2 * disk + 2 * net + v.rates["cpu_seconds"] / 32

    by_weight = sorted(sims, key=lambda v: -weight(v))
    heavy = max(1, len(sims) // (2 * len(node_names)))
    placement: dict[str, str] = {v.vm: node_names[0] for v in by_weight[:heavy]}
    rest = [v.vm for v in by_weight[heavy:]]
    rng.shuffle(rest)
    for i, vmid in enumerate(rest):
        placement[vmid] = node_names[i % len(node_names)]
    return placement


def _draw_nodes(
    rng: np.random.Generator,
    sims: Sequence[SimVM],
    placement: Mapping[str, str],
    node_names: Sequence[str],
    scales: Sequence[float],
) -> list[SimNode]:
    """Nodes sized for their share of the VMs (and the hot node like the others), each
    scaled by its factor."""
    fair_vcpus = sum(v.vcpus for v in sims) / len(node_names)
    fair_memory = sum(v.memory_max_bytes for v in sims) / len(node_names)
    sim_nodes = []
    for name, scale in zip(node_names, scales, strict=True):
        hosted = [v for v in sims if placement[v.vm] == name]
        cpus = max(int(rng.choice([16, 24, 32])), math.ceil(fair_vcpus / 2 / 8) * 8)
        cpus = max(8, round(cpus * scale / 8) * 8)
        needed = max(fair_memory * 1.6 * scale, sum(v.memory_max_bytes for v in hosted) * 1.1)
        memory = max(
            int(rng.choice([64, 96, 128]) * scale) * GIB,
            math.ceil(needed / (32 * GIB)) * 32 * GIB,
        )
        defaults = SimNode(name=name, cpus=cpus, memory_bytes=memory)
        sim_nodes.append(
            replace(
                defaults,
                disk_bytes=defaults.disk_bytes * scale,
                disk_ops=defaults.disk_ops * scale,
                network=defaults.network * scale,
            )
        )
    return sim_nodes


def _draw_migrations(
    rng: np.random.Generator,
    offsets: Sequence[float],
    movable: list[str],
    placement: Mapping[str, str],
    node_names: Sequence[str],
    start: float,
) -> list[Migration]:
    """One migration at each offset (seconds after `start`), of VMs drawn from `movable`,
    each to a node other than the one it is on then."""
    rng.shuffle(movable)
    moves = []
    current = dict(placement)
    for offset, vmid in zip(offsets, movable, strict=False):
        when = start + offset
        target = str(rng.choice([n for n in node_names if n != current[vmid]]))
        moves.append(Migration(vm=vmid, time=when, source=current[vmid], target=target))
        current[vmid] = target
    return moves


def simulate_cluster(
    seed: int,
    nodes: int = 4,
    vms: int = 60,
    duration: float = 86400.0,
    step: float = 60.0,
    *,
    end: float | None = None,
    migrations: int = 3,
    migration_offsets: Sequence[float] | None = None,
    bursts: int = 1,
    burst_seconds: float = 600.0,
    burst_factor: float = 10.0,
    hostile_names: int = 0,
    noise: float = 0.3,
    node_scales: Sequence[float] | None = None,
    cluster: str = "",
    node_prefix: str = "pve",
    first_vmid: int = 101,
    facts: Mapping[str, SimFacts] | None = None,
) -> ClusterHistory:
    """Draw a cluster and its history.

    `duration` and `step` in seconds; samples at `end - duration, ..., end` (default `end`:
    now rounded down to `step`). `migration_offsets` (seconds after the start) pins the
    migration times, else `migrations` are drawn in the history's second half. The `bursts`
    VMs run at `burst_factor` times their rate over the last `burst_seconds`. `node_scales`
    makes nodes unequal: node i's CPUs, memory and I/O capacities scale by its factor. The first
    `hostile_names` VMs get names full of quotes, newlines and unusual unicode. The hot
    node (the first one) hosts the heaviest disk users. `cluster` labels every series;
    nodes are `{node_prefix}1...`, VMIDs start at `first_vmid`; `facts` gives VMs blockers,
    disks, HA and a dirty rate.
    """
    if nodes < 2 or vms < 1 or step <= 0 or duration < step:
        raise ValueError("need nodes >= 2, vms >= 1 and duration >= step > 0")
    scales = list(node_scales) if node_scales is not None else [1.0] * nodes
    if len(scales) != nodes or min(scales) <= 0:
        raise ValueError("node_scales needs one positive factor per node")
    rng = np.random.default_rng(seed)
    samples = int(duration // step) + 1
    if end is None:
        end = math.floor(time.time() / step) * step
    start = end - (samples - 1) * step

    sims = [_draw_vm(rng, i, hostile_names, first_vmid) for i in range(vms)]
    node_names = [f"{node_prefix}{i + 1}" for i in range(nodes)]
    placement = _place(rng, sims, node_names)
    sim_nodes = _draw_nodes(rng, sims, placement, node_names, scales)

    burst_vms = [v.vm for v in sims[-bursts:]] if bursts else []
    burst_list = tuple(
        Burst(vm=b, start=end - burst_seconds, end=end, factor=burst_factor) for b in burst_vms
    )
    if migration_offsets is None:
        offsets = sorted(float(t) for t in rng.uniform(0.5, 0.95, migrations) * duration)
    else:
        offsets = sorted(float(t) for t in migration_offsets)
    movable = [v.vm for v in sims if v.vm not in burst_vms]
    moves = _draw_migrations(rng, offsets, movable, placement, node_names, start)

    return ClusterHistory(
        seed=seed,
        start=start,
        step=step,
        samples=samples,
        nodes=tuple(sim_nodes),
        vms=tuple(sims),
        initial_node=placement,
        migrations=tuple(moves),
        bursts=burst_list,
        hot_node=node_names[0],
        noise=noise,
        cluster=cluster,
        facts=dict(facts or {}),
    )


# --- writers -------------------------------------------------------------------------------


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _format_values(values: np.ndarray, integer: bool) -> list[str]:
    if integer:
        return [str(v) for v in values.astype(np.int64).tolist()]
    return [repr(v) for v in values.tolist()]


def _format_times(times: np.ndarray, millis: bool) -> list[str]:
    if millis:
        return [str(v) for v in np.round(times * 1000).astype(np.int64).tolist()]
    if np.all(times == np.floor(times)):
        return [str(v) for v in times.astype(np.int64).tolist()]
    return [f"{v:.3f}" for v in times.tolist()]


def _write(
    history: ClusterHistory,
    out: IO[str],
    *,
    openmetrics: bool,
    exclude: Callable[[str, Mapping[str, str]], bool] | None,
) -> None:
    family_meta = {name: (om_name, kind) for name, om_name, kind in FAMILIES}
    current = None
    for s in history.series():
        labels = dict(s.labels)
        if exclude is not None and exclude(s.family, labels):
            continue
        if openmetrics and s.family != current:
            om_name, kind = family_meta[s.family]
            out.write(f"# TYPE {om_name} {kind}\n")
            current = s.family
        label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in s.labels)
        prefix = f"{s.family}{{{label_text}}} "
        values = _format_values(s.values, s.integer)
        times = _format_times(s.times, millis=not openmetrics)
        out.write("".join(f"{prefix}{v} {t}\n" for v, t in zip(values, times, strict=True)))
    if openmetrics:
        out.write("# EOF\n")


def _to_target(
    history: ClusterHistory,
    path: str | Path | None,
    openmetrics: bool,
    exclude: Callable[[str, Mapping[str, str]], bool] | None,
) -> str | Path:
    if path is None:
        buffer = io.StringIO()
        _write(history, buffer, openmetrics=openmetrics, exclude=exclude)
        return buffer.getvalue()
    target = Path(path)
    with target.open("w", encoding="utf-8", newline="\n") as handle:
        _write(history, handle, openmetrics=openmetrics, exclude=exclude)
    return target


def to_openmetrics(
    history: ClusterHistory,
    path: str | Path | None = None,
    *,
    exclude: Callable[[str, Mapping[str, str]], bool] | None = None,
) -> str | Path:
    """The history as OpenMetrics text (timestamps in seconds, `# EOF` last) for
    `promtool tsdb create-blocks-from openmetrics`. With `path`, streams to that file and
    returns it; else returns the text. `exclude(family, labels)` drops series (to simulate
    partial data)."""
    return _to_target(history, path, True, exclude)


def to_openmetrics_blocks(
    history: ClusterHistory,
    directory: str | Path,
    *,
    block_seconds: float = 7200.0,
    exclude: Callable[[str, Mapping[str, str]], bool] | None = None,
) -> list[Path]:
    """The history as one OpenMetrics file per `block_seconds`-aligned time range.

    `promtool tsdb create-blocks-from openmetrics` re-reads its whole input for every 2 h
    block it writes, so one file holding a week takes minutes; files cut on promtool's own
    block boundaries are each read once (a week at 60 s for 60 VMs: about 20 s). Returns the
    files in time order; back them up one by one (`devkit.servers.backfill` takes the
    directory).
    """
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    family_meta = {name: (om_name, kind) for name, om_name, kind in FAMILIES}
    blocks = np.floor(history.times / block_seconds).astype(np.int64)
    handles: dict[int, IO[str]] = {}
    current: dict[int, str] = {}
    paths = [target / f"block-{int(b) * int(block_seconds)}.om" for b in np.unique(blocks)]
    try:
        for block, path in zip(np.unique(blocks).tolist(), paths, strict=True):
            handles[block] = path.open("w", encoding="utf-8", newline="\n")
        for s in history.series():
            labels = dict(s.labels)
            if exclude is not None and exclude(s.family, labels):
                continue
            label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in s.labels)
            prefix = f"{s.family}{{{label_text}}} "
            values = _format_values(s.values, s.integer)
            times = _format_times(s.times, millis=False)
            series_blocks = np.floor(s.times / block_seconds).astype(np.int64)
            edges = np.flatnonzero(np.diff(series_blocks)) + 1
            bounds = [0, *edges.tolist(), len(series_blocks)]
            for lo, hi in itertools.pairwise(bounds):
                block = int(series_blocks[lo])
                out = handles[block]
                if current.get(block) != s.family:
                    om_name, kind = family_meta[s.family]
                    out.write(f"# TYPE {om_name} {kind}\n")
                    current[block] = s.family
                out.write("".join(f"{prefix}{values[i]} {times[i]}\n" for i in range(lo, hi)))
        for out in handles.values():
            out.write("# EOF\n")
    finally:
        for out in handles.values():
            out.close()
    return paths


def to_victoriametrics(
    history: ClusterHistory,
    path: str | Path | None = None,
    *,
    exclude: Callable[[str, Mapping[str, str]], bool] | None = None,
) -> str | Path:
    """The same samples as Prometheus text with millisecond timestamps, the format of
    VictoriaMetrics' `/api/v1/import/prometheus`."""
    return _to_target(history, path, False, exclude)


__all__ = [
    "COUNTERS",
    "FAMILIES",
    "HOSTILE_NAMES",
    "Burst",
    "ClusterHistory",
    "Migration",
    "Series",
    "SimNode",
    "SimVM",
    "simulate_cluster",
    "to_openmetrics",
    "to_openmetrics_blocks",
    "to_victoriametrics",
]
