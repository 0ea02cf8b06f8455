"""One libvirt domain as a VMSample: from its bulk stats, completed by per-domain calls.

`sample_per_domain` takes what the domain's bulk record holds and reads what it lacks
(everything, for a domain the backend listed by ID) with the domain's own calls; its XML
(devices, disk storages, migration blockers) comes from the `DeviceCache`. Which thread
runs them, and until when, is `exporter.libvirt_workers`'.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import time
import zlib
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

from exporter.libvirt_connection import Domain
from exporter.libvirt_stats import (
    Devices,
    SharedStorage,
    bulk_dirty_rate,
    bulk_disks,
    bulk_interfaces,
    memory_bytes,
    needs_memory_stats,
)
from exporter.samples import DiskSample, InterfaceSample, VMSample

_KIB = 1024
#: Seconds a domain's parsed XML is trusted without a change signal (see DeviceCache).
XML_REFRESH = 300.0

# Domain states (virDomainState) and pause reasons (virDomainPausedReason); fixed by libvirt's ABI.
SHUTOFF, CRASHED, PAUSED = 5, 6, 3
NOT_RUNNING = frozenset({SHUTOFF, CRASHED})
# An incoming migration waits paused with reason MIGRATION (2) and a post-copy source stays
# paused with reason POSTCOPY (12): the VM runs on the other node, which reports it.
PAUSED_ELSEWHERE = frozenset({2, 12})


@dataclass(slots=True)
class DomainJob:
    """A domain whose bulk stats miss fields, to complete with per-domain calls (all of them,
    for a listed domain). Never changed once made: a listed domain's job serves every scrape
    of its run."""

    domain: Domain
    stats: Mapping[str, Any]  # empty for a listed domain
    balloon: Mapping[str, int]  # `balloon.*` of `stats` under memoryStats() keys
    uuid: str
    domain_id: int | None = None  # known for a listed domain, else read when needed
    name: str | None = None

    def label(self) -> str:
        """The domain's name, the `vm` label (read from the handle, no round trip)."""
        return self.name if self.name is not None else self.domain.name()


class NotRunning(Exception):
    """A listed domain turned out shut off or crashed."""


class RunsElsewhere(Exception):
    """A listed domain is paused for an incoming migration or after a post-copy one."""


class DeadlineExceeded(Exception):
    """A worker reached the scrape deadline before starting on a domain."""


class DeviceCache:
    """Each domain's `Devices` by UUID, so its XML is not read at every scrape.

    An entry is read again when something says the domain changed: a domain event
    (`changed`, from `exporter.libvirt_events`: a device added or removed, a media change, a
    block job's pivot, a start, stop or migration), its ID (a new one at every start), its NIC
    count in the bulk stats, a failed call of the domain (`forget`) or a new connection; and
    otherwise once it is older than `refresh` seconds (spread over 0.75-1.25 times that per
    domain, so a node's domains do not all come due in one scrape). The refresh is all there
    is where events are not delivered, and it also catches what libvirt announces with no
    event, such as a disk's new size (`blockInfo` capacity, read with the XML). Shared by a
    scrape's workers and the event thread.
    """

    def __init__(self, shared: SharedStorage | None = None, refresh: float = XML_REFRESH) -> None:
        self._lock = threading.Lock()
        self._shared = shared or SharedStorage()
        self._refresh = refresh
        # UUID: (devices, NIC count in the bulk stats, monotonic time it is due again,
        # the change count when its XML was read)
        self._devices: dict[str, tuple[Devices, int | None, float, int]] = {}
        # A count of change notices, and the count at each domain's latest: an entry read
        # before its domain's latest notice is stale, even when the notice arrived while the
        # XML was being read.
        self._changes = 0
        self._changed: dict[str, int] = {}

    def of(self, job: DomainJob) -> Devices:
        domain_id = job.domain.ID() if job.domain_id is None else job.domain_id
        nic_count = job.stats.get("net.count")
        now = time.monotonic()
        with self._lock:
            cached = self._devices.get(job.uuid)
            changes, changed = self._changes, self._changed.get(job.uuid, 0)
        if (
            cached is not None
            and cached[0].domain_id == domain_id
            and cached[1] == nic_count
            and now < cached[2]
            and changed <= cached[3]
        ):
            return cached[0]
        devices = _with_sizes(
            job.domain, Devices.parse(domain_id, job.domain.XMLDesc(0), self._shared)
        )
        spread = 0.75 + 0.5 * (zlib.crc32(job.uuid.encode()) / 2**32)
        with self._lock:
            self._devices[job.uuid] = (devices, nic_count, now + self._refresh * spread, changes)
        return devices

    def changed(self, uuid: str) -> None:
        """A domain event: the domain's XML is read again at its next scrape."""
        with self._lock:
            self._changes += 1
            self._changed[uuid] = self._changes

    def forget(self, uuid: str) -> None:
        """Drop one domain's entry: a call failed, so its XML is read afresh next time."""
        with self._lock:
            self._devices.pop(uuid, None)

    def keep_only(self, uuids: Collection[str]) -> None:
        """Drop the entries (and change notices) of domains no longer running."""
        with self._lock:
            for uuid in self._devices.keys() - uuids:
                del self._devices[uuid]
            for uuid in self._changed.keys() - uuids:
                del self._changed[uuid]

    def clear(self) -> None:
        with self._lock:
            self._devices.clear()
            self._changed.clear()


def _with_sizes(domain: Domain, devices: Devices) -> Devices:
    """`devices` with each disk's capacity from `blockInfo`; None where libvirt cannot say."""
    infos = []
    for info in devices.disk_infos:
        try:
            capacity: int | None = int(domain.blockInfo(info.disk)[0])
        except Exception:  # libvirtError (no such disk, unsupported): the size is unknown
            capacity = None
        infos.append(info._replace(size_bytes=capacity))
    return dataclasses.replace(devices, disk_infos=tuple(infos))


def sample_per_domain(
    job: DomainJob, deadline: float, devices_of: Callable[[DomainJob], Devices]
) -> VMSample:
    """A VMSample from bulk fields where present and per-domain calls for the rest.

    The deadline is checked once per domain, before its first call: at 1000 domains a check
    per call cost more than some of the calls (the scrape stops waiting for its workers at
    the deadline either way).
    """
    if time.monotonic() >= deadline:
        raise DeadlineExceeded
    domain, stats, balloon = job.domain, job.stats, job.balloon
    cpu_ns, vcpus, max_kib, current_kib = _cpu_and_memory(job)
    if needs_memory_stats(balloon):
        balloon = {**domain.memoryStats(), **balloon}
    used, rss = memory_bytes(balloon, max_kib if current_kib is None else current_kib)
    # Disks NOWAIT skipped are read here, within the deadline; if that fails or runs out, the
    # VM is skipped and counted rather than published without them.
    has_block, has_net = "block.count" in stats, "net.count" in stats
    read_skipped = functools.partial(_read_disk, domain)
    devices = devices_of(job)
    if has_block and has_net:
        disks, interfaces = bulk_disks(stats, read_skipped), bulk_interfaces(stats)
    else:
        disks = (
            bulk_disks(stats, read_skipped)
            if has_block
            else tuple([_read_disk(domain, dev) for dev in devices.disks])
        )
        interfaces = (
            bulk_interfaces(stats)
            if has_net
            else tuple([_read_interface(domain, dev) for dev in devices.interfaces])
        )
    name = domain.name() if job.name is None else job.name
    return VMSample(
        vm=name,
        name=name,
        uuid=job.uuid,
        cpu_seconds=cpu_ns / 1e9,
        vcpus=vcpus,
        memory_max_bytes=max_kib * _KIB,
        memory_used_bytes=used,
        memory_rss_bytes=rss,
        disks=disks,
        interfaces=interfaces,
        disk_infos=devices.disk_infos,
        blockers=devices.blockers,
        dirty_rate_bytes_per_second=bulk_dirty_rate(stats),
    )


def _cpu_and_memory(job: DomainJob) -> tuple[int, int, int, int | None]:
    """(CPU ns, vCPUs, maximum KiB, current KiB or None) from bulk stats, else `info()`.

    `info()` also tells a listed domain that stopped, or that waits here paused for a
    migration while it runs on the other node.
    """
    stats, balloon = job.stats, job.balloon
    cpu_ns = stats.get("cpu.time")
    vcpus = stats.get("vcpu.current")
    max_kib = balloon.get("maximum")
    current_kib = balloon.get("actual")
    if cpu_ns is not None and vcpus is not None and max_kib is not None and "state.state" in stats:
        return cpu_ns, vcpus, max_kib, current_kib
    state, info_max, info_current, info_vcpus, info_cpu = job.domain.info()
    if state in NOT_RUNNING:
        raise NotRunning
    if (
        state == PAUSED
        and "state.reason" not in stats
        and job.domain.state()[1] in PAUSED_ELSEWHERE
    ):
        raise RunsElsewhere
    return (
        info_cpu if cpu_ns is None else cpu_ns,
        info_vcpus if vcpus is None else vcpus,
        info_max if max_kib is None else max_kib,
        info_current if current_kib is None else current_kib,
    )


def _read_disk(domain: Domain, dev: str) -> DiskSample:
    read_reqs, read_bytes, write_reqs, write_bytes, _ = domain.blockStats(dev)
    return DiskSample(dev, read_bytes, write_bytes, read_reqs, write_reqs)


def _read_interface(domain: Domain, dev: str) -> InterfaceSample:
    counters = domain.interfaceStats(dev)
    return InterfaceSample(dev, counters[0], counters[4])
