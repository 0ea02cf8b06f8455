"""libvirt's stat records as samples: pure functions of the dicts libvirt returns.

The bulk call (`getAllDomainStats`) and the per-domain calls name the same figures
differently; everything that turns either into `DiskSample`s, `InterfaceSample`s and memory
figures is here, apart from the connection and thread handling of `exporter.libvirt`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from xml.etree import ElementTree

from exporter.samples import DiskSample, InterfaceSample

_KIB = 1024
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


def block_stats_skipped(stats: Mapping[str, Any]) -> bool:
    """Whether NOWAIT skipped a busy domain's block counters.

    libvirt then lists each disk with its `name` and `path` only. A disk with a source has a
    path and normally counters; one with a path but no `rd.bytes` had them skipped. (An empty
    CD-ROM drive has neither path nor counters, and has nothing to read.)
    """
    return any(
        f"block.{i}.path" in stats and f"block.{i}.rd.bytes" not in stats
        for i in range(stats.get("block.count", 0))
    )


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
class Devices:
    """A domain's disk and NIC target names, parsed from its XML.

    Only drivers whose bulk stats lack `block.*`/`net.*` need this (QEMU's list the devices
    themselves). Kept per domain UUID and trusted while the domain ID is unchanged: a restart
    gives the domain a new ID, so the XML is parsed once per boot rather than once per scrape.
    A hot-unplugged device makes its stats call fail, which drops the entry so the next scrape
    parses again; a hot-plugged one shows from the domain's next boot.
    """

    domain_id: int
    disks: tuple[str, ...]
    interfaces: tuple[str, ...]

    @classmethod
    def parse(cls, domain_id: int, xml: str) -> Devices:
        devices = ElementTree.fromstring(xml).find("devices")
        if devices is None:
            return cls(domain_id, (), ())
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
        return cls(domain_id, disks, interfaces)
