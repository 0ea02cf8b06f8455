"""QMP replies as samples: pure functions of the JSON a VM's QEMU answered.

Everything that turns `query-*` replies, a VM's `.conf` and its /proc figures into a VMSample
is here; the session that asks is `exporter.qmp_session`, the scrape `exporter.qmp`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from qemu.qmp import ExecuteError

from exporter.hostfiles import ProcessUsage
from exporter.pve_conf import VMConfig
from exporter.samples import DiskSample, InterfaceSample, VMSample

# QEMU reports a guest statistic it has not received as -1 in an unsigned 64-bit field.
_STAT_UNSET: Final = 2**63
_MIB: Final = 1024 * 1024
# Block devices whose qdev path is not the Proxmox drive name (OVMF code and vars).
_QDEV_ALIASES: Final = {"/machine/system.flash0": "pflash0", "/machine/system.flash1": "efidisk0"}


@dataclass(frozen=True, slots=True)
class Session:
    """What one VM's QEMU answered in its session.

    `replies` holds each query's reply, or the ExecuteError QEMU gave instead (a command it
    refuses: no balloon device, say); `elsewhere` is the run state when the guest runs on
    another node; `guest_stats` the balloon's QOM property where it was needed.
    """

    replies: Mapping[str, object]
    elsewhere: str | None
    guest_stats: object = None

    def required(self, command: str) -> object:
        """A reply the sample cannot do without: QEMU's refusal is raised."""
        reply = self.replies[command]
        if isinstance(reply, ExecuteError):
            raise reply
        return reply

    def mapping(self, command: str) -> Mapping[str, object] | None:
        """A reply that is a JSON object, else None (refused, not asked, or odd)."""
        reply = self.replies.get(command)
        return reply if isinstance(reply, dict) else None


def disk_name(device: str | None, qdev: str | None) -> str | None:
    """The disk as Proxmox names it, from a `query-blockstats` entry.

    `-drive` disks carry `device: drive-scsi0`; `-blockdev` disks have an empty `device` and
    only the qdev: a bare id (`scsi0`) for SCSI/SATA/IDE, a QOM path for virtio-blk
    (`/machine/peripheral/virtio0/virtio-backend`). None when there is no name at all.
    """
    if device:
        return device.removeprefix("drive-")
    if not qdev:
        return None
    if qdev in _QDEV_ALIASES:
        return _QDEV_ALIASES[qdev]
    parts = [part for part in qdev.split("/") if part and part != "virtio-backend"]
    return parts[-1] if parts else None


def disks_from_blockstats(entries: object) -> tuple[DiskSample, ...]:
    """Disk counters from a `query-blockstats` reply; nameless or repeated entries dropped."""
    if not isinstance(entries, list):
        raise TypeError("query-blockstats did not return a list")
    disks: dict[str, DiskSample] = {}
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        name = disk_name(entry.get("device"), entry.get("qdev"))
        stats = entry.get("stats")
        if not name or name in disks or not isinstance(stats, dict):
            continue
        disks[name] = DiskSample(
            disk=name,
            read_bytes=int(stats.get("rd_bytes", 0)),
            written_bytes=int(stats.get("wr_bytes", 0)),
            reads_completed=int(stats.get("rd_operations", 0)),
            writes_completed=int(stats.get("wr_operations", 0)),
        )
    return tuple(disks.values())


def _stat(value: object) -> int | None:
    """A guest memory figure, or None when the guest has not reported it."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < _STAT_UNSET:
        return value
    return None


def _used(total: object, free: object) -> int | None:
    total_bytes, free_bytes = _stat(total), _stat(free)
    if not total_bytes or free_bytes is None or free_bytes > total_bytes:
        return None
    return total_bytes - free_bytes


def guest_memory_used(balloon: Mapping[str, object] | None, guest_stats: object) -> int | None:
    """Guest-visible memory in use (total - free), as Proxmox computes it.

    Proxmox's QEMU adds `total_mem`/`free_mem` to `query-balloon`; an upstream QEMU has the
    same figures in the balloon's `guest-stats` QOM property once the guest reports them.
    """
    if balloon is not None:
        used = _used(balloon.get("total_mem"), balloon.get("free_mem"))
        if used is not None:
            return used
    if isinstance(guest_stats, dict) and guest_stats.get("last-update"):
        stats = guest_stats.get("stats")
        if isinstance(stats, dict):
            return _used(stats.get("stat-total-memory"), stats.get("stat-free-memory"))
    return None


def memory_max(conf: VMConfig, balloon: Mapping[str, object] | None, summary: object) -> int:
    """Memory assigned to the VM: QEMU's balloon maximum, else the config, else QEMU's RAM."""
    if balloon is not None and (max_mem := _stat(balloon.get("max_mem"))):
        return max_mem
    if conf.memory_bytes:
        return conf.memory_bytes
    if isinstance(summary, dict):
        base = _stat(summary.get("base-memory")) or 0
        plugged = _stat(summary.get("plugged-memory")) or 0
        if base + plugged:
            return base + plugged
    if balloon is not None and (actual := _stat(balloon.get("actual"))):
        return actual
    return 0


def qemu_version(reply: object) -> tuple[int, int, int] | None:
    """(major, minor, micro) from a `query-version` reply; None when it is refused or odd."""
    if not isinstance(reply, dict) or not isinstance(reply.get("qemu"), dict):
        return None
    qemu = reply["qemu"]
    try:
        return int(qemu["major"]), int(qemu["minor"]), int(qemu["micro"])
    except (KeyError, TypeError, ValueError):
        return None


def _identity(
    vmid: str, conf: VMConfig, name_reply: Mapping[str, object] | None,
    uuid_reply: Mapping[str, object] | None,
) -> tuple[str, str]:  # fmt: skip
    """(display name, UUID): the `.conf`'s where it has them, else QEMU's, else placeholders."""
    qmp_name = name_reply.get("name") if name_reply is not None else None
    qmp_uuid = uuid_reply.get("UUID") if uuid_reply is not None else None
    if qmp_uuid and not str(qmp_uuid).strip("0-"):
        qmp_uuid = None  # QEMU's default all-zero UUID says nothing
    name = conf.name or (str(qmp_name) if qmp_name else f"VM {vmid}")
    return name, conf.uuid or (str(qmp_uuid) if qmp_uuid else "")


def dirty_rate(reply: Mapping[str, object] | None) -> float | None:
    """Bytes dirtied per second from `query-dirty-rate`: only a finished measurement
    (`status: measured`) counts; QEMU gives MiB/s (`dirty-rate`)."""
    if reply is None or reply.get("status") != "measured":
        return None
    rate = reply.get("dirty-rate")
    if not isinstance(rate, int) or isinstance(rate, bool) or rate < 0:
        return None
    return float(rate * _MIB)


def vm_sample(
    vmid: str,
    conf: VMConfig,
    session: Session,
    usage: ProcessUsage,
    disks: tuple[DiskSample, ...],
    interfaces: tuple[InterfaceSample, ...],
) -> VMSample:
    """One VM's sample from its `.conf`, its session's replies and its host figures."""
    balloon = session.mapping("query-balloon")
    name, uuid = _identity(vmid, conf, session.mapping("query-name"), session.mapping("query-uuid"))
    cpus = session.replies.get("query-cpus-fast")
    used = guest_memory_used(balloon, session.guest_stats)
    return VMSample(
        vm=vmid,
        name=name,
        uuid=uuid,
        cpu_seconds=usage.cpu_seconds,
        vcpus=len(cpus) if isinstance(cpus, list) and cpus else conf.cpu_count,
        memory_max_bytes=memory_max(
            conf, balloon, session.replies.get("query-memory-size-summary")
        ),
        memory_used_bytes=used if used is not None else usage.rss_bytes,
        memory_rss_bytes=usage.rss_bytes,
        disks=disks,
        interfaces=interfaces,
        dirty_rate_bytes_per_second=dirty_rate(session.mapping("query-dirty-rate")),
    )
