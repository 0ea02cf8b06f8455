"""Proxmox VE cluster files: the storages, the HA resources and the cluster's name.

`/etc/pve/storage.cfg` says which storage is shared between the nodes, `/etc/pve/ha/
resources.cfg` which VMs the HA stack manages, and `/etc/pve/corosync.conf` names the cluster.
Pure parsing plus one read of the three; the QMP backend runs the read under its scrape
deadline (pmxcfs blocks without quorum). `migration_facts` combines them with one VM's
`.conf` into what decides whether and how the VM can move.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from exporter.pve_conf import VMConfig
from exporter.samples import DiskInfo

# Storage types Proxmox treats as shared whatever `shared` says (PVE::Storage::Plugin's
# @SHARED_STORAGE): every node reaches the same volumes.
SHARED_TYPES: Final = frozenset(
    {"iscsi", "nfs", "cifs", "rbd", "cephfs", "iscsidirect", "glusterfs", "zfs", "drbd", "pbs"}
)
_SECTION = re.compile(r"^([a-z][a-z0-9]*)\s*:\s*(\S+)\s*$")
_CLUSTER_NAME = re.compile(r"^\s*cluster_name\s*:\s*(\S+)\s*$")
# A Proxmox cloud-init drive is rebuilt on the target: it does not pin the VM to the node.
_CLOUDINIT = re.compile(r"(^|/)vm-\d+-cloudinit(\.\w+)?$")


@dataclass(frozen=True, slots=True)
class ClusterFiles:
    """What the cluster-wide files say; empty when they are absent (a node outside a cluster)."""

    storages: Mapping[str, bool] = field(default_factory=dict)  # storage id: shared
    ha_vmids: frozenset[str] = frozenset()
    cluster: str | None = None


def _section_config(text: str) -> Iterator[tuple[str, str, dict[str, str]]]:
    """The sections of a Proxmox section config (`storage.cfg`, `ha/resources.cfg`): a
    `<type>: <id>` line, then indented `key value` properties; (type, id, properties) each.
    Lines that are neither are skipped, and so are the properties under them."""
    section: tuple[str, str, dict[str, str]] | None = None
    for raw in text.splitlines():
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        if not raw[0].isspace():
            if section is not None:
                yield section
            match = _SECTION.match(raw)
            section = (match.group(1), match.group(2), {}) if match is not None else None
            continue
        if section is not None:
            key, _, value = raw.strip().partition(" ")
            section[2][key] = value.strip()
    if section is not None:
        yield section


def parse_storage_cfg(text: str) -> dict[str, bool]:
    """Storage id: shared, from `storage.cfg`: a type that is always shared, or `shared 1`."""
    return {
        storage: kind in SHARED_TYPES or properties.get("shared") == "1"
        for kind, storage, properties in _section_config(text)
    }


def parse_ha_resources(text: str) -> frozenset[str]:
    """VMIDs of `vm: <id>` resources, except those in `state ignored` (HA leaves them be)."""
    return frozenset(
        vmid
        for kind, vmid, properties in _section_config(text)
        if kind == "vm" and vmid.isdigit() and properties.get("state") != "ignored"
    )


def parse_corosync_cluster_name(text: str) -> str | None:
    """`cluster_name` of the `totem { }` section of `corosync.conf`."""
    depth = 0
    in_totem = False
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if line.endswith("{"):
            depth += 1
            if depth == 1 and line[:-1].strip() == "totem":
                in_totem = True
            continue
        if line == "}":
            depth = max(depth - 1, 0)
            in_totem = in_totem and depth > 0
            continue
        match = _CLUSTER_NAME.match(line)
        if in_totem and depth == 1 and match is not None:
            return match.group(1)
    return None


def read_cluster_files(pve_dir: str) -> ClusterFiles:
    """Read the three files under `pve_dir`; a missing one says nothing."""

    def text(*parts: str) -> str:
        try:
            return Path(pve_dir, *parts).read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    return ClusterFiles(
        storages=parse_storage_cfg(text("storage.cfg")),
        ha_vmids=parse_ha_resources(text("ha", "resources.cfg")),
        cluster=parse_corosync_cluster_name(text("corosync.conf")),
    )


@dataclass(frozen=True, slots=True)
class MigrationFacts:
    """One VM's disks (where they live), migration blockers and HA management."""

    disk_infos: tuple[DiskInfo, ...]
    blockers: tuple[str, ...]
    ha_managed: int


def migration_facts(vmid: str, conf: VMConfig, files: ClusterFiles) -> MigrationFacts:
    """What the `.conf` and the cluster files say about moving VM `vmid`.

    A storage `storage.cfg` does not list counts as local (the safe side); a path volume is
    local unless the drive says `shared=1`.
    """
    infos: list[DiskInfo] = []
    blockers = set(conf.blockers)
    for drive in conf.drives:
        storage, sep, volume = drive.volume.partition(":")
        is_path = drive.volume.startswith("/")
        shared = drive.shared if is_path or not sep else files.storages.get(storage, False)
        if drive.cdrom:
            local_iso = sep and not is_path and not shared and not _CLOUDINIT.search(volume)
            if drive.volume == "cdrom" or is_path or local_iso:
                blockers.add("local_media")
            continue
        infos.append(DiskInfo(drive.key, "file" if is_path else storage, shared, drive.size_bytes))
    return MigrationFacts(
        disk_infos=tuple(infos),
        blockers=tuple(sorted(blockers)),
        ha_managed=1 if vmid in files.ha_vmids else 0,
    )
