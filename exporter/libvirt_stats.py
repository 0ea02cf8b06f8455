"""libvirt's stat records as samples: pure functions of the dicts libvirt returns.

The bulk call (`getAllDomainStats`) and the per-domain calls name the same figures
differently; everything that turns either into `DiskSample`s, `InterfaceSample`s and memory
figures is here, apart from the connection and thread handling of `exporter.libvirt`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from xml.etree import ElementTree

from exporter.samples import DiskInfo, DiskSample, InterfaceSample

_KIB = 1024
_MIB = 1024 * 1024
_BALLOON_PREFIX = "balloon."


def memory_bytes(balloon: Mapping[str, int], current_kib: int) -> tuple[int, int | None]:
    """(used, rss) in bytes from balloon statistics in KiB, keyed as `virDomainMemoryStats` does.

    Bulk `balloon.*` stats and `dom.memoryStats()` both pass through here so a VM's memory
    means the same whichever path read it: guest-visible use (`available - unused`, else
    `actual - usable`) where the guest's balloon driver reports it, else the QEMU process RSS,
    else the current balloon size (all a busy domain has when NOWAIT skipped its figures).
    """
    rss = balloon.get("rss")
    available, unused = balloon.get("available"), balloon.get("unused")
    actual, usable = balloon.get("actual"), balloon.get("usable")
    if available is not None and unused is not None:
        used = available - unused
    elif actual is not None and usable is not None:
        used = actual - usable
    elif rss is not None:
        used = rss
    else:
        used = current_kib
    return max(used, 0) * _KIB, None if rss is None else rss * _KIB


def needs_memory_stats(balloon: Mapping[str, int]) -> bool:
    """Whether to ask `memoryStats()`: only when the bulk call has no balloon group at all.

    Bulk `balloon.*` and `memoryStats()` come from the same source. Where the group is there
    but lacks the guest figures, NOWAIT skipped them because the domain was busy, and
    `memoryStats()` would block on that same busy domain.
    """
    return not balloon


def bulk_balloon(stats: Mapping[str, Any]) -> dict[str, int]:
    """`balloon.*` bulk stats renamed to `memoryStats()` keys (`current` is `actual` there)."""
    balloon = {
        key[len(_BALLOON_PREFIX) :]: value
        for key, value in stats.items()
        if key.startswith(_BALLOON_PREFIX)
    }
    if "current" in balloon:
        balloon["actual"] = balloon.pop("current")
    return balloon


def bulk_dirty_rate(stats: Mapping[str, Any]) -> float | None:
    """Bytes dirtied per second from bulk `dirtyrate.*`: only a finished measurement
    (`calc_status` 2, VIR_DOMAIN_DIRTYRATE_MEASURED) counts; libvirt gives MiB/s."""
    rate = stats.get("dirtyrate.megabytes_per_second")
    if stats.get("dirtyrate.calc_status") != 2 or not isinstance(rate, int) or rate < 0:
        return None
    return float(rate * _MIB)


class BlockStatsSkipped(Exception):
    """Bulk stats lack a disk's counters and nothing was given to read them per domain."""


def bulk_disks(
    stats: Mapping[str, Any], read_skipped: Callable[[str], DiskSample] | None = None
) -> tuple[DiskSample, ...]:
    """Disks from bulk `block.*`; `read_skipped(name)` reads those whose counters NOWAIT skipped.

    Without `read_skipped` such a disk raises rather than vanish from the VM's series.
    """
    disks = []
    for i in range(stats["block.count"]):
        prefix = f"block.{i}."
        name = stats.get(prefix + "name")
        read_bytes = stats.get(prefix + "rd.bytes")
        if name is None:
            continue
        if read_bytes is None:
            if prefix + "path" not in stats:  # an empty CD-ROM drive has no counters
                continue
            if read_skipped is None:
                raise BlockStatsSkipped(name)
            disks.append(read_skipped(name))
            continue
        disks.append(
            DiskSample(
                disk=name,
                read_bytes=read_bytes,
                written_bytes=stats.get(prefix + "wr.bytes", 0),
                reads_completed=stats.get(prefix + "rd.reqs", 0),
                writes_completed=stats.get(prefix + "wr.reqs", 0),
            )
        )
    return tuple(disks)


def bulk_interfaces(stats: Mapping[str, Any]) -> tuple[InterfaceSample, ...]:
    interfaces = []
    for i in range(stats["net.count"]):
        prefix = f"net.{i}."
        name = stats.get(prefix + "name")
        if name is None or prefix + "rx.bytes" not in stats:
            continue
        interfaces.append(
            InterfaceSample(
                interface=name,
                receive_bytes=stats[prefix + "rx.bytes"],
                transmit_bytes=stats.get(prefix + "tx.bytes", 0),
            )
        )
    return tuple(interfaces)


@dataclass(frozen=True, slots=True)
class SharedStorage:
    """What the operator declared shared for libvirt: file paths (and what lies under them)
    and storage pool names. Network disks are shared by nature."""

    paths: tuple[str, ...] = ()
    pools: frozenset[str] = frozenset()

    def has_path(self, path: str) -> bool:
        path = os.path.normpath(path)
        return any(path == root or path.startswith(root.rstrip("/") + "/") for root in self.paths)

    @classmethod
    def of(cls, paths: tuple[str, ...] = (), pools: tuple[str, ...] = ()) -> SharedStorage:
        return cls(tuple(os.path.normpath(p) for p in paths), frozenset(pools))


@dataclass(frozen=True, slots=True)
class Devices:
    """What the backend reads from a domain's XML: disk and NIC targets, where each disk
    lives and what keeps the domain from a live migration.

    Kept per domain UUID (see `DeviceCache` for when an entry is read again). A hot-unplugged
    device makes its stats call fail, which drops the entry so the next scrape parses again.
    `disk_infos` carry no size: the cache fills it in from `blockInfo`.
    """

    domain_id: int
    disks: tuple[str, ...]
    interfaces: tuple[str, ...]
    disk_infos: tuple[DiskInfo, ...] = ()
    blockers: tuple[str, ...] = ()

    @classmethod
    def parse(cls, domain_id: int, xml: str, shared: SharedStorage | None = None) -> Devices:
        devices = ElementTree.fromstring(xml).find("devices")
        if devices is None:
            return cls(domain_id, (), ())
        shared = shared or SharedStorage()
        disks = tuple(
            target.get("dev", "")
            for disk in devices.iterfind("disk")
            # A drive without a medium (empty CD-ROM) has no block stats to ask for.
            if disk.find("source") is not None
            and (target := disk.find("target")) is not None
            and target.get("dev")
        )
        interfaces = tuple(
            target.get("dev", "")
            for target in devices.iterfind("interface/target")
            if target.get("dev")
        )
        infos, media = _disk_facts(devices, shared)
        blockers = _device_blockers(devices)
        if media:
            blockers.add("local_media")
        return cls(domain_id, disks, interfaces, infos, tuple(sorted(blockers)))


def _disk_facts(
    devices: ElementTree.Element, shared: SharedStorage
) -> tuple[tuple[DiskInfo, ...], bool]:
    """Each disk's storage and sharing, and whether a CD-ROM or floppy holds local media."""
    infos: list[DiskInfo] = []
    local_media = False
    for disk in devices.iterfind("disk"):
        source, target = disk.find("source"), disk.find("target")
        if source is None or target is None or not target.get("dev"):
            continue
        kind = disk.get("type", "file")
        path = source.get("file") or source.get("dev") or source.get("dir")
        if kind == "network":
            storage, is_shared = f"network:{source.get('protocol', '')}", True
        elif kind == "volume":
            storage = source.get("pool", "")
            is_shared = storage in shared.pools
        elif path is not None:
            storage, is_shared = "file", shared.has_path(path)
        else:
            storage, is_shared = kind, False
        if disk.get("device") in ("cdrom", "floppy"):
            local_media = local_media or not is_shared
            continue
        infos.append(DiskInfo(target.get("dev", ""), storage, is_shared, None))
    return tuple(infos), local_media


def _device_blockers(devices: ElementTree.Element) -> set[str]:
    """Devices libvirt refuses to live-migrate (qemuMigrationSrcIsAllowed): host devices
    (an SR-IOV `<interface type='hostdev'>` is a PCI one), shared memory and virtiofs."""
    reasons: set[str] = set()
    for hostdev in devices.iterfind("hostdev"):
        kind = hostdev.get("type") if hostdev.get("mode", "subsystem") == "subsystem" else None
        reasons.add({"pci": "pci_passthrough", "usb": "usb_passthrough"}.get(kind or "", "hostdev"))
    if any(nic.get("type") == "hostdev" for nic in devices.iterfind("interface")):
        reasons.add("pci_passthrough")
    if devices.find("shmem") is not None:
        reasons.add("local_resources")
    for filesystem in devices.iterfind("filesystem"):
        driver = filesystem.find("driver")
        if driver is not None and driver.get("type") == "virtiofs":
            reasons.add("local_resources")
    return reasons
