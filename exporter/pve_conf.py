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
    memory_mib = _positive_int(_property_string(fields.get("memory", ""), "current").get("current"))
    return VMConfig(
        name=fields.get("name") or None,
        memory_bytes=memory_mib * _MIB if memory_mib else None,
        vcpus=_positive_int(fields.get("vcpus")),
        sockets=_positive_int(fields.get("sockets")),
        cores=_positive_int(fields.get("cores")),
        uuid=_property_string(fields.get("smbios1", "")).get("uuid") or None,
        nets=tuple(sorted(set(nets))),
    )


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
