"""The one place that knows metric names: ScrapeResult in, metric families out.

A custom collector in client_python's pattern: `collect()` builds fresh families on every
scrape, `describe()` lists them without touching the backend, so registering the collector
does not open a libvirt connection or a QMP socket.

`exposition()` renders the same families straight to the Prometheus text format. A node with
1000 VMs publishes ~16k samples; client_python's generic path builds an object per sample and
spends ~10 µs on each, which made exposition cost more than reading libvirt. Both outputs come
from one family table and one walk over the samples, and a test checks they parse equal.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, Literal

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from exporter.labels import sanitise, valid_utf8
from exporter.samples import Backend, ScrapeResult, VMSample
from exporter.scrapelog import ScrapeLog


@dataclass(frozen=True)
class Family:
    """A metric family of the contract (docs/metrics.md); counters are named without _total."""

    name: str
    kind: Literal["gauge", "counter"]
    help: str
    labels: tuple[str, ...]

    @property
    def sample_name(self) -> str:
        return self.name + "_total" if self.kind == "counter" else self.name


# Every series carries the node's cluster first: one store holds many clusters.
VM = ("cluster", "node", "vm")
DISK = ("cluster", "node", "vm", "disk")
NIC = ("cluster", "node", "vm", "interface")
NODE = ("cluster", "node")

VM_INFO = Family(
    "vmbalance_vm_info",
    "gauge",
    "A running VM; a change of node between samples is a migration.",
    ("cluster", "node", "vm", "name", "uuid", "backend"),
)
# Per-VM gauges and counters: (family, VMSample attribute).
VM_VALUES = (
    (
        Family(
            "vmbalance_vm_cpu_seconds",
            "counter",
            "CPU time consumed by the VM's QEMU process (vCPUs and emulator).",
            VM,
        ),
        "cpu_seconds",
    ),
    (Family("vmbalance_vm_vcpus", "gauge", "Virtual CPUs.", VM), "vcpus"),
    (
        Family(
            "vmbalance_vm_memory_max_bytes",
            "gauge",
            "Memory assigned to the VM (balloon maximum).",
            VM,
        ),
        "memory_max_bytes",
    ),
    (
        Family(
            "vmbalance_vm_memory_used_bytes",
            "gauge",
            "Guest-visible memory use where the balloon reports it, else the QEMU RSS.",
            VM,
        ),
        "memory_used_bytes",
    ),
    (
        Family(
            "vmbalance_vm_memory_rss_bytes",
            "gauge",
            "Resident memory of the VM's QEMU process on the host.",
            VM,
        ),
        "memory_rss_bytes",
    ),
    (
        Family(
            "vmbalance_vm_ha_managed",
            "gauge",
            "1 when the Proxmox HA stack manages the VM (migrated with ha-manager), else 0.",
            VM,
        ),
        "ha_managed",
    ),
    (
        Family(
            "vmbalance_vm_memory_dirty_rate_bytes_per_second",
            "gauge",
            "Guest memory dirtied per second, as the hypervisor last measured it.",
            VM,
        ),
        "dirty_rate_bytes_per_second",
    ),
)
DISK_VALUES = (
    (
        Family(
            "vmbalance_vm_disk_read_bytes", "counter", "Bytes read from the virtual disk.", DISK
        ),
        "read_bytes",
    ),
    (
        Family(
            "vmbalance_vm_disk_written_bytes", "counter", "Bytes written to the virtual disk.", DISK
        ),
        "written_bytes",
    ),
    (
        Family(
            "vmbalance_vm_disk_reads_completed",
            "counter",
            "Read operations completed on the virtual disk.",
            DISK,
        ),
        "reads_completed",
    ),
    (
        Family(
            "vmbalance_vm_disk_writes_completed",
            "counter",
            "Write operations completed on the virtual disk.",
            DISK,
        ),
        "writes_completed",
    ),
)
NIC_VALUES = (
    (
        Family(
            "vmbalance_vm_network_receive_bytes", "counter", "Bytes received by the guest.", NIC
        ),
        "receive_bytes",
    ),
    (
        Family("vmbalance_vm_network_transmit_bytes", "counter", "Bytes sent by the guest.", NIC),
        "transmit_bytes",
    ),
)
DISK_INFO = Family(
    "vmbalance_vm_disk_info",
    "gauge",
    "A virtual disk's storage and whether that storage is shared between the nodes.",
    ("cluster", "node", "vm", "disk", "storage", "shared"),
)
DISK_SIZE = Family(
    "vmbalance_vm_disk_size_bytes", "gauge", "Size of the virtual disk (its capacity).", DISK
)
BLOCKER = Family(
    "vmbalance_vm_migration_blocker",
    "gauge",
    "A reason the VM cannot be live-migrated; one series per reason present.",
    ("cluster", "node", "vm", "reason"),
)
NODE_INFO = Family(
    "vmbalance_node_info",
    "gauge",
    "The hypervisor node this exporter runs on.",
    ("cluster", "node", "backend", "version"),
)
NODE_CPUS = Family("vmbalance_node_cpus", "gauge", "Logical CPUs of the host.", NODE)
NODE_MEMORY = Family("vmbalance_node_memory_bytes", "gauge", "Physical memory of the host.", NODE)
UP = Family("vmbalance_up", "gauge", "1 when the backend answered this scrape.", NODE)
DURATION = Family(
    "vmbalance_scrape_duration_seconds", "gauge", "Wall time of the last backend scrape.", NODE
)
ERRORS = Family(
    "vmbalance_vm_scrape_errors",
    "counter",
    "VMs skipped because they errored, hung or vanished during a scrape.",
    NODE,
)
READ_TIMEOUTS = Family(
    "vmbalance_read_timeouts",
    "counter",
    "Reads of the host that did not answer by the scrape deadline, by source.",
    ("cluster", "node", "source"),
)

FAMILIES: tuple[Family, ...] = (
    VM_INFO,
    *(family for family, _ in VM_VALUES),
    *(family for family, _ in DISK_VALUES),
    *(family for family, _ in NIC_VALUES),
    DISK_INFO,
    DISK_SIZE,
    BLOCKER,
    NODE_INFO,
    NODE_CPUS,
    NODE_MEMORY,
    UP,
    DURATION,
    ERRORS,
    READ_TIMEOUTS,
)

# One series: family, label values in the family's label order, value.
Series = tuple[Family, tuple[str, ...], float]


@dataclass(frozen=True, slots=True)
class Totals:
    """The exporter's own counters, summed over its scrapes."""

    vm_errors: int = 0
    read_timeouts: tuple[tuple[str, int], ...] = ()  # (source, count), every source listed


@dataclass(frozen=True, slots=True)
class Where:
    """The identity labels every series starts with, and the backend's name."""

    cluster: str
    node: str
    backend: str


def series(result: ScrapeResult, where: Where, totals: Totals, duration: float) -> Iterator[Series]:
    """Every sample of one scrape, family by family in FAMILIES order."""
    vms = result.vms
    cluster, node = where.cluster, where.node
    for vm in vms:
        yield VM_INFO, (cluster, node, vm.vm, vm.name, vm.uuid, where.backend), 1
    for family, attr in VM_VALUES:
        for vm in vms:
            value = getattr(vm, attr)
            if value is not None:
                yield family, (cluster, node, vm.vm), value
    disks = [((cluster, node, vm.vm, disk.disk), disk) for vm in vms for disk in vm.disks]
    nics = [((cluster, node, vm.vm, nic.interface), nic) for vm in vms for nic in vm.interfaces]
    for values, devices in ((DISK_VALUES, disks), (NIC_VALUES, nics)):
        for family, attr in values:
            for labels, device in devices:
                yield family, labels, getattr(device, attr)
    yield from migration_series(vms, where)
    yield from node_series(result, where, totals, duration)


def migration_series(vms: list[VMSample], where: Where) -> Iterator[Series]:
    """Disk info, disk sizes and blockers: what decides whether and how each VM can move."""
    cluster, node = where.cluster, where.node
    infos = [(vm.vm, info) for vm in vms for info in vm.disk_infos]
    for vm_id, info in infos:
        shared = "1" if info.shared else "0"
        yield DISK_INFO, (cluster, node, vm_id, info.disk, info.storage, shared), 1
    for vm_id, info in infos:
        if info.size_bytes is not None:
            yield DISK_SIZE, (cluster, node, vm_id, info.disk), info.size_bytes
    for vm in vms:
        for reason in vm.blockers:
            yield BLOCKER, (cluster, node, vm.vm, reason), 1


def node_series(
    result: ScrapeResult, where: Where, totals: Totals, duration: float
) -> Iterator[Series]:
    """The node's own samples and the exporter's health, which follow the per-VM ones."""
    ids = (where.cluster, where.node)
    if result.node is not None:
        yield NODE_INFO, (*ids, where.backend, result.node.version), 1
        yield NODE_CPUS, ids, result.node.cpus
        yield NODE_MEMORY, ids, result.node.memory_bytes
    yield UP, ids, 1 if result.up else 0
    yield DURATION, ids, duration
    yield ERRORS, ids, totals.vm_errors
    for source, count in totals.read_timeouts:
        yield READ_TIMEOUTS, (*ids, source), count


def escape_label(value: str) -> str:
    """Label-value escaping of the text format: backslash, double quote, newline."""
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return value


def format_value(value: float) -> str:
    """Go-style float formatting, as Prometheus and client_python write it."""
    if isinstance(value, int):
        return f"{value}.0" if abs(value) < 10**16 else repr(float(value))
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def render_text(result: ScrapeResult, where: Where, totals: Totals, duration: float) -> bytes:
    """Text exposition 0.0.4 of the same series `series()` yields, written directly.

    A VM's label set recurs in every per-VM family and a disk's in four, so each is escaped
    and joined once; the walk follows the same family tables as `series()`.
    """
    vms = result.vms
    out: list[str] = []
    node_label = f'cluster="{escape_label(where.cluster)}",node="{escape_label(where.node)}"'
    vm_labels = [f'{node_label},vm="{escape_label(vm.vm)}"' for vm in vms]

    out.append(_header(VM_INFO))
    backend_label = escape_label(where.backend)
    for vm, labels in zip(vms, vm_labels, strict=True):
        out.append(
            f'{VM_INFO.name}{{{labels},name="{escape_label(vm.name)}",'
            f'uuid="{escape_label(vm.uuid)}",backend="{backend_label}"}} 1.0\n'
        )
    vm_sets = [(vm, f"{{{labels}}} ") for vm, labels in zip(vms, vm_labels, strict=True)]
    for family, attr in VM_VALUES:
        out.append(_header(family))
        _append_samples(out, family.sample_name, attrgetter(attr), vm_sets)
    for values, device_sets in (
        (DISK_VALUES, [(d, f'{{{lb},disk="{escape_label(d.disk)}"}} ') for vm, lb in
                       zip(vms, vm_labels, strict=True) for d in vm.disks]),
        (NIC_VALUES, [(n, f'{{{lb},interface="{escape_label(n.interface)}"}} ') for vm, lb in
                      zip(vms, vm_labels, strict=True) for n in vm.interfaces]),
    ):  # fmt: skip
        for family, attr in values:
            out.append(_header(family))
            _append_samples(out, family.sample_name, attrgetter(attr), device_sets)
    _append_migration_facts(out, vms, vm_labels)
    current: Family | None = None
    for family, label_values, value in node_series(result, where, totals, duration):
        if family is not current:
            current = family
            out.append(_header(family))
        labels = ",".join(
            f'{n}="{escape_label(v)}"' for n, v in zip(family.labels, label_values, strict=True)
        )
        out.append(f"{family.sample_name}{{{labels}}} {format_value(value)}\n")
    for family in (NODE_INFO, NODE_CPUS, NODE_MEMORY):
        if result.node is None:
            out.append(_header(family))
    if not totals.read_timeouts:
        out.append(_header(READ_TIMEOUTS))
    return "".join(out).encode("utf-8")


def _append_migration_facts(out: list[str], vms: list[VMSample], vm_labels: list[str]) -> None:
    """Disk info and sizes, then blockers: what decides whether and how each VM can move."""
    infos = [
        (info, f'{labels},disk="{escape_label(info.disk)}"')
        for vm, labels in zip(vms, vm_labels, strict=True)
        for info in vm.disk_infos
    ]
    out.append(_header(DISK_INFO))
    out.extend([
        f'{DISK_INFO.name}{{{labels},storage="{escape_label(info.storage)}",'
        f'shared="{"1" if info.shared else "0"}"}} 1.0\n'
        for info, labels in infos
    ])  # fmt: skip
    out.append(_header(DISK_SIZE))
    _append_samples(
        out, DISK_SIZE.name, attrgetter("size_bytes"), [(i, f"{{{lb}}} ") for i, lb in infos]
    )
    out.append(_header(BLOCKER))
    out.extend([
        f'{BLOCKER.name}{{{labels},reason="{escape_label(reason)}"}} 1.0\n'
        for vm, labels in zip(vms, vm_labels, strict=True)
        for reason in vm.blockers
    ])  # fmt: skip


# Integers below this print exactly as "<int>.0"; larger ones go through float like Go's.
_EXACT_INT = 10**16


def _append_samples(
    out: list[str],
    name: str,
    value_of: Callable[[Any], int | float | None],
    rows: Iterable[tuple[Any, str]],
) -> None:
    """Append `name{labels} value` for each (object, label set) row whose value is not None;
    a label set is written with its braces and the space after them: `{node="n",vm="v"} `.

    The hot loop of a large scrape, so integers (most counters) are formatted inline rather
    than through `format_value`, and a list (not a generator) is built: each item of a
    generator costs a resumption.
    """
    out.extend([
        f"{name}{label_set}{value}.0\n"
        if value.__class__ is int and -_EXACT_INT < value < _EXACT_INT
        else f"{name}{label_set}{format_value(value)}\n"
        for item, label_set in rows
        if (value := value_of(item)) is not None
    ])  # fmt: skip


def _header(family: Family) -> str:
    help_text = family.help.replace("\\", "\\\\").replace("\n", "\\n")
    return f"# HELP {family.sample_name} {help_text}\n# TYPE {family.sample_name} {family.kind}\n"


class VMCollector(Collector):
    """Scrapes one backend per Prometheus scrape and publishes the metric contract.

    Scrapes are serialised: Proxmox's QEMU serves one QMP client at a time, and two
    overlapping scrapes would only fight over the same sockets.
    """

    def __init__(
        self, backend: Backend, node: str, timeout: float, cluster: str | None = None
    ) -> None:
        """`cluster` fixes the cluster label; None takes what the backend finds (Proxmox's
        corosync name), kept while a scrape does not say, and empty before any does."""
        self._backend = backend
        self._node = valid_utf8(node)
        self._fixed_cluster = None if cluster is None else valid_utf8(cluster)
        self._cluster = self._fixed_cluster or ""
        self._timeout = timeout
        self._lock = threading.Lock()
        self._vm_errors_total = 0
        self._read_timeouts = dict.fromkeys(getattr(backend, "read_sources", ()), 0)
        self._log = ScrapeLog(logging.getLogger(f"exporter.{backend.name}"))

    def describe(self) -> Iterator[Metric]:
        return iter([self._empty_family(family) for family in FAMILIES])

    def collect(self) -> Iterator[Metric]:
        families = {family.name: self._empty_family(family) for family in FAMILIES}
        for family, values, value in self._scrape_series():
            families[family.name].add_metric(list(values), value)
        return iter(families.values())

    def exposition(self) -> bytes:
        """Scrape and render the text format directly (the fast path for /metrics)."""
        return render_text(*self._scrape_once())

    def _scrape_series(self) -> Iterator[Series]:
        return series(*self._scrape_once())

    def _scrape_once(self) -> tuple[ScrapeResult, Where, Totals, float]:
        with self._lock:
            started = time.monotonic()
            result = sanitise(self._scrape())
            duration = time.monotonic() - started
            self._log.record(result)
            self._vm_errors_total += result.vm_errors
            for source, count in result.read_timeouts.items():
                self._read_timeouts[source] = self._read_timeouts.get(source, 0) + count
            totals = Totals(self._vm_errors_total, tuple(sorted(self._read_timeouts.items())))
            if self._fixed_cluster is None and result.cluster is not None:
                self._cluster = valid_utf8(result.cluster)
            where = Where(self._cluster, self._node, self._backend.name)
        return result, where, totals, duration

    def _scrape(self) -> ScrapeResult:
        """A backend must not raise; if one does anyway, report it as down, not as HTTP 500."""
        try:
            return self._backend.scrape(self._timeout)
        except Exception as exc:  # the scrape must still be served
            return ScrapeResult(up=False, error=f"{type(exc).__name__}: {exc}")

    @staticmethod
    def _empty_family(family: Family) -> CounterMetricFamily | GaugeMetricFamily:
        cls = CounterMetricFamily if family.kind == "counter" else GaugeMetricFamily
        return cls(family.name, family.help, labels=list(family.labels))
