"""Proxmox VE VM configs (`/etc/pve/qemu-server/<vmid>.conf`): what the exporter reads there.

Pure parsing plus one read; the QMP backend runs the read under its scrape deadline, since
/etc/pve is pmxcfs and a read there blocks while the cluster has no quorum.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

_MIB: Final = 1024 * 1024
_CONF_LINE = re.compile(r"^([a-z][a-z0-9_-]*)\s*:\s*(.*?)\s*$")
_NET_KEY = re.compile(r"^net(\d+)$")
_DRIVE_KEY = re.compile(r"^(?:(?:ide|sata|scsi|virtio)\d+|efidisk0|tpmstate0)$")
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)([KMGT]?)$")
_SIZE_UNITS: Final = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
# Keys QEMU cannot live-migrate (PVE::QemuServer::check_local_resources): host PCI and USB
# devices, serial ports other than a socket, parallel ports, virtiofs shares and ivshmem.
_PCI_KEY = re.compile(r"^hostpci\d+$")
_USB_KEY = re.compile(r"^usb\d+$")
_LOCAL_KEY = re.compile(r"^(?:serial|parallel|virtiofs)\d+$")


@dataclass(frozen=True, slots=True)
class Drive:
    """One drive of the main section: `scsi0: local-lvm:vm-100-disk-0,size=32G`."""

    key: str
    volume: str  # `storage:volume`, an absolute path, or `cdrom` (the host's drive)
    size_bytes: int | None
    cdrom: bool
    shared: bool  # `shared=1`: a path volume the admin marked as present on every node


@dataclass(frozen=True, slots=True)
class VMConfig:
    """What the exporter uses from the main section of a Proxmox `<vmid>.conf`."""

    name: str | None = None
    memory_bytes: int | None = None
    vcpus: int | None = None
    sockets: int | None = None
    cores: int | None = None
    uuid: str | None = None
    nets: tuple[int, ...] = ()
    drives: tuple[Drive, ...] = ()
    blockers: tuple[str, ...] = ()  # what the keys alone rule out; local media needs storages

    @property
    def cpu_count(self) -> int:
        """vCPUs as Proxmox starts the VM: `vcpus:` when set, else sockets x cores."""
        if self.vcpus:
            return self.vcpus
        return (self.sockets or 1) * (self.cores or 1)


def parse_config(text: str) -> VMConfig:
    """Parse a Proxmox VM config; only the main section, which describes the running VM.

    Sections such as `[snapshot]`, `[PENDING]` or `[special:cloudinit]` follow the main
    section and describe other states, so parsing stops at the first one.
    """
    fields: dict[str, str] = {}
    nets: list[int] = []
    drives: list[Drive] = []
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("["):
            break
        if not line or line.startswith("#"):
            continue
        match = _CONF_LINE.match(line)
        if match is None:
            continue
        key, value = match.groups()
        fields[key] = value
        net = _NET_KEY.match(key)
        if net is not None:
            nets.append(int(net.group(1)))
        elif _DRIVE_KEY.match(key) and (drive := _drive(key, value)) is not None:
            drives.append(drive)
    memory_mib = _positive_int(_property_string(fields.get("memory", ""), "current").get("current"))
    return VMConfig(
        name=fields.get("name") or None,
        memory_bytes=memory_mib * _MIB if memory_mib else None,
        vcpus=_positive_int(fields.get("vcpus")),
        sockets=_positive_int(fields.get("sockets")),
        cores=_positive_int(fields.get("cores")),
        uuid=_property_string(fields.get("smbios1", "")).get("uuid") or None,
        nets=tuple(sorted(set(nets))),
        drives=tuple(drives),
        blockers=_key_blockers(fields),
    )


def _drive(key: str, value: str) -> Drive | None:
    """The drive of a `<bus><n>:` line; None for an empty CD-ROM drive (`none`)."""
    options = _property_string(value, "file")
    volume = options.get("file", "")
    if not volume or volume == "none":
        return None
    return Drive(
        key=key,
        volume=volume,
        size_bytes=_size(options.get("size")),
        cdrom=options.get("media") == "cdrom",
        shared=options.get("shared") == "1",
    )


def _size(value: str | None) -> int | None:
    """Bytes of a Proxmox size (`32G`, `512M`, `4096`: bytes without a unit)."""
    match = _SIZE.match(value or "")
    if match is None:
        return None
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])


def _key_blockers(fields: dict[str, str]) -> tuple[str, ...]:
    """Migration blockers the main section's keys alone show (see `_PCI_KEY`...)."""
    reasons: set[str] = set()
    if fields.get("lock"):
        reasons.add("lock")
    if fields.get("ivshmem"):
        reasons.add("local_resources")
    for key, value in fields.items():
        if _PCI_KEY.match(key):
            reasons.add("pci_passthrough")
        elif _USB_KEY.match(key):
            # SPICE USB redirection follows the client, not the host: it migrates.
            if _property_string(value, "host").get("host", "").lower() != "spice":
                reasons.add("usb_passthrough")
        elif _LOCAL_KEY.match(key) and not (key.startswith("serial") and value == "socket"):
            reasons.add("local_resources")
    return tuple(sorted(reasons))


def read_config(path: str | os.PathLike[str]) -> VMConfig:
    """Read a `.conf`; a missing or unreadable one (a VM mid-migration) gives defaults."""
    try:
        return parse_config(Path(path).read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return VMConfig()


def _property_string(value: str, default_key: str | None = None) -> dict[str, str]:
    """Split a Proxmox property string (`current=4096,foo=bar` or a bare default value)."""
    result: dict[str, str] = {}
    for part in value.split(","):
        key, sep, val = part.partition("=")
        if sep:
            result[key.strip()] = val.strip()
        elif default_key is not None and part.strip():
            result[default_key] = part.strip()
    return result


def _positive_int(value: object) -> int | None:
    try:
        number = int(str(value))
    except ValueError:
        return None
    return number if number > 0 else None
