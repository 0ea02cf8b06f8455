"""The one place that knows metric names: ScrapeResult in, metric families out.

A custom collector in client_python's pattern: `collect()` builds fresh families on every
scrape, `describe()` lists them without touching the backend, so registering the collector
does not open a libvirt connection or a QMP socket.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from exporter.samples import Backend, ScrapeResult

VM_LABELS = ["node", "vm"]
DISK_LABELS = ["node", "vm", "disk"]
NIC_LABELS = ["node", "vm", "interface"]

# (name without _total, help, sample attribute) — counters per disk and per interface.
DISK_COUNTERS = (
    ("vmbalance_vm_disk_read_bytes", "Bytes read from the virtual disk.", "read_bytes"),
    ("vmbalance_vm_disk_written_bytes", "Bytes written to the virtual disk.", "written_bytes"),
    (
        "vmbalance_vm_disk_reads_completed",
        "Read operations completed on the virtual disk.",
        "reads_completed",
    ),
    (
        "vmbalance_vm_disk_writes_completed",
        "Write operations completed on the virtual disk.",
        "writes_completed",
    ),
)
NIC_COUNTERS = (
    ("vmbalance_vm_network_receive_bytes", "Bytes received by the guest.", "receive_bytes"),
    ("vmbalance_vm_network_transmit_bytes", "Bytes sent by the guest.", "transmit_bytes"),
)


class VMCollector(Collector):
    """Scrapes one backend per Prometheus scrape and publishes the metric contract.

    Scrapes are serialised: Proxmox's QEMU serves one QMP client at a time, and two
    overlapping scrapes would only fight over the same sockets.
    """

    def __init__(self, backend: Backend, node: str, timeout: float) -> None:
        self._backend = backend
        self._node = node
        self._timeout = timeout
        self._lock = threading.Lock()
        self._vm_errors_total = 0

    def describe(self) -> Iterator[Metric]:
        return iter(self._families())

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            started = time.monotonic()
            result = self._scrape()
            duration = time.monotonic() - started
            self._vm_errors_total += result.vm_errors
            families = self._families()
            self._fill(families, result, duration)
        return iter(families)

    def _scrape(self) -> ScrapeResult:
        """A backend must not raise; if one does anyway, report it as down, not as HTTP 500."""
        try:
            return self._backend.scrape(self._timeout)
        except Exception as exc:  # the scrape must still be served
            return ScrapeResult(up=False, error=f"{type(exc).__name__}: {exc}")

    def _families(self) -> list[Metric]:
        families: list[Metric] = [
            GaugeMetricFamily(
                "vmbalance_vm_info",
                "A running VM; a change of node between samples is a migration.",
                labels=["node", "vm", "name", "uuid", "backend"],
            ),
            CounterMetricFamily(
                "vmbalance_vm_cpu_seconds",
                "CPU time consumed by the VM's QEMU process (vCPUs and emulator).",
                labels=VM_LABELS,
            ),
            GaugeMetricFamily("vmbalance_vm_vcpus", "Virtual CPUs.", labels=VM_LABELS),
            GaugeMetricFamily(
                "vmbalance_vm_memory_max_bytes",
                "Memory assigned to the VM (balloon maximum).",
                labels=VM_LABELS,
            ),
            GaugeMetricFamily(
                "vmbalance_vm_memory_used_bytes",
                "Guest-visible memory use where the balloon reports it, else the QEMU RSS.",
                labels=VM_LABELS,
            ),
            GaugeMetricFamily(
                "vmbalance_vm_memory_rss_bytes",
                "Resident memory of the VM's QEMU process on the host.",
                labels=VM_LABELS,
            ),
        ]
        families += [CounterMetricFamily(n, h, labels=DISK_LABELS) for n, h, _ in DISK_COUNTERS]
        families += [CounterMetricFamily(n, h, labels=NIC_LABELS) for n, h, _ in NIC_COUNTERS]
        families += [
            GaugeMetricFamily(
                "vmbalance_node_info",
                "The hypervisor node this exporter runs on.",
                labels=["node", "backend", "version"],
            ),
            GaugeMetricFamily("vmbalance_node_cpus", "Logical CPUs of the host.", labels=["node"]),
            GaugeMetricFamily(
                "vmbalance_node_memory_bytes", "Physical memory of the host.", labels=["node"]
            ),
            GaugeMetricFamily(
                "vmbalance_up", "1 when the backend answered this scrape.", labels=["node"]
            ),
            GaugeMetricFamily(
                "vmbalance_scrape_duration_seconds",
                "Wall time of the last backend scrape.",
                labels=["node"],
            ),
            CounterMetricFamily(
                "vmbalance_vm_scrape_errors",
                "VMs skipped because they errored, hung or vanished during a scrape.",
                labels=["node"],
            ),
        ]
        return families

    def _fill(self, families: list[Metric], result: ScrapeResult, duration: float) -> None:
        by_name = {family.name: family for family in families}
        node = self._node
        backend = self._backend.name
        info = by_name["vmbalance_vm_info"]
        cpu = by_name["vmbalance_vm_cpu_seconds"]
        vcpus = by_name["vmbalance_vm_vcpus"]
        mem_max = by_name["vmbalance_vm_memory_max_bytes"]
        mem_used = by_name["vmbalance_vm_memory_used_bytes"]
        mem_rss = by_name["vmbalance_vm_memory_rss_bytes"]
        disk_families = [(by_name[n], attr) for n, _, attr in DISK_COUNTERS]
        nic_families = [(by_name[n], attr) for n, _, attr in NIC_COUNTERS]

        for vm in result.vms:
            labels = [node, vm.vm]
            info.add_metric([node, vm.vm, vm.name, vm.uuid, backend], 1)
            cpu.add_metric(labels, vm.cpu_seconds)
            vcpus.add_metric(labels, vm.vcpus)
            mem_max.add_metric(labels, vm.memory_max_bytes)
            mem_used.add_metric(labels, vm.memory_used_bytes)
            if vm.memory_rss_bytes is not None:
                mem_rss.add_metric(labels, vm.memory_rss_bytes)
            for disk in vm.disks:
                disk_labels = [node, vm.vm, disk.disk]
                for family, attr in disk_families:
                    family.add_metric(disk_labels, getattr(disk, attr))
            for nic in vm.interfaces:
                nic_labels = [node, vm.vm, nic.interface]
                for family, attr in nic_families:
                    family.add_metric(nic_labels, getattr(nic, attr))

        if result.node is not None:
            by_name["vmbalance_node_info"].add_metric([node, backend, result.node.version], 1)
            by_name["vmbalance_node_cpus"].add_metric([node], result.node.cpus)
            by_name["vmbalance_node_memory_bytes"].add_metric([node], result.node.memory_bytes)
        by_name["vmbalance_up"].add_metric([node], 1 if result.up else 0)
        by_name["vmbalance_scrape_duration_seconds"].add_metric([node], duration)
        by_name["vmbalance_vm_scrape_errors"].add_metric([node], self._vm_errors_total)
