"""What decides whether a Proxmox VM can move: a Proxmox-like tree (storage.cfg with shared and
local storages, HA resources, corosync.conf) and VM configs with passthrough, a local ISO and
a lock, read by the QMP backend against fake QMP servers and published by the collector."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fake_qmp import FakeQmpServer, FakeVM
from prometheus_client.parser import text_string_to_metric_families

from exporter.collector import VMCollector
from exporter.pve_cluster import (
    parse_corosync_cluster_name,
    parse_ha_resources,
    parse_storage_cfg,
)
from tests.test_qmp_backend import Layout, make_layout

GIB = 1024**3

STORAGE_CFG = """\
dir: local
\tpath /var/lib/vz
\tcontent iso,vztmpl,backup

lvmthin: local-lvm
\tthinpool data
\tvgname pve
\tcontent rootdir,images

rbd: ceph-vm
\tcontent images
\tkrbd 0
\tpool vm

nfs: nas
\texport /export/pve
\tpath /mnt/pve/nas
\tserver 192.0.2.10
\tcontent iso,images

# a directory on a cluster file system, declared shared by the admin
dir: shared-dir
\tpath /mnt/shared
\tcontent images
\tshared 1

zfspool: local-zfs
\tpool rpool/data
\tcontent images,rootdir
"""

HA_RESOURCES = """\
vm: 100
\tgroup prefer-a
\tstate started

vm: 103
\tstate ignored

ct: 104
\tstate started
"""

COROSYNC = """\
logging {
  debug: off
  to_syslog: yes
}

nodelist {
  node {
    name: pve1
    nodeid: 1
    quorum_votes: 1
    ring0_addr: 192.0.2.1
  }
}

quorum {
  provider: corosync_votequorum
}

totem {
  cluster_name: pve-east
  config_version: 3
  interface {
    linknumber: 0
  }
  ip_version: ipv4-6
  secauth: on
  version: 2
}
"""

CONFS = {
    # Shared rbd and local lvm-thin disks, HA-managed, nothing that blocks.
    "100": "memory: 2048\nscsi0: ceph-vm:vm-100-disk-0,iothread=1,size=32G\n"
    "virtio0: local-lvm:vm-100-disk-1,size=8G\nide2: none,media=cdrom\n",
    # PCI and USB passthrough and a local ISO.
    "101": "memory: 2048\nhostpci0: 0000:01:00.0,pcie=1\nusb0: host=1234:5678\n"
    "ide2: local:iso/debian-12.iso,media=cdrom,size=628M\n"
    "scsi0: local-zfs:vm-101-disk-0,size=4096M\n",
    # A lock; an ISO on NFS, SPICE USB and a serial socket, which all migrate.
    "102": "memory: 2048\nlock: backup\nide2: nas:iso/debian-12.iso,media=cdrom\n"
    "usb0: host=spice,usb3=1\nserial0: socket\n"
    "sata0: shared-dir:102/vm-102-disk-0.qcow2,size=10G\n",
    # Local resources (ivshmem, a host serial port), a cloud-init drive, a host block
    # device; HA-listed but ignored.
    "103": "memory: 2048\nivshmem: size=32,name=foo\nserial1: /dev/ttyS0\n"
    "ide0: local-lvm:vm-103-cloudinit,media=cdrom\n"
    "scsi1: /dev/disk/by-id/ata-DISK1,size=100G\n"
    "[snap1]\nhostpci0: 0000:02:00.0\n",
}


@pytest.fixture
def pve_node(tmp_path: Path) -> Iterator[Layout]:
    layout = make_layout(tmp_path)
    (tmp_path / "storage.cfg").write_text(STORAGE_CFG)
    (tmp_path / "ha").mkdir()
    (tmp_path / "ha" / "resources.cfg").write_text(HA_RESOURCES)
    (tmp_path / "corosync.conf").write_text(COROSYNC)
    for vmid, text in CONFS.items():
        layout.conf_file(vmid, text)
        layout.pid_file(vmid, os.getpid())
    measured = {"status": "measured", "dirty-rate": 12, "start-time": 1, "calc-time": 1}
    vms = [FakeVM(vmid, dirty_rate=measured if vmid == "100" else None) for vmid in CONFS]
    server = FakeQmpServer(layout.run, vms).start()
    yield layout
    server.stop()


def families(text: bytes) -> dict[str, list[Any]]:
    return {f.name: f.samples for f in text_string_to_metric_families(text.decode())}


def test_the_series_name_exactly_the_blockers_disks_and_ha(pve_node: Layout) -> None:
    collector = VMCollector(pve_node.backend(), node="pve1", timeout=5)
    text = collector.exposition()
    found = families(text)
    blockers = {
        (s.labels["vm"], s.labels["reason"]) for s in found["vmbalance_vm_migration_blocker"]
    }
    assert blockers == {
        ("101", "pci_passthrough"),
        ("101", "usb_passthrough"),
        ("101", "local_media"),
        ("102", "lock"),
        ("103", "local_resources"),
    }
    disks = {
        (s.labels["vm"], s.labels["disk"], s.labels["storage"], s.labels["shared"])
        for s in found["vmbalance_vm_disk_info"]
    }
    assert disks == {
        ("100", "scsi0", "ceph-vm", "1"),
        ("100", "virtio0", "local-lvm", "0"),
        ("101", "scsi0", "local-zfs", "0"),
        ("102", "sata0", "shared-dir", "1"),
        ("103", "scsi1", "file", "0"),
    }
    sizes = {
        (s.labels["vm"], s.labels["disk"]): s.value for s in found["vmbalance_vm_disk_size_bytes"]
    }
    assert sizes == {
        ("100", "scsi0"): 32 * GIB,
        ("100", "virtio0"): 8 * GIB,
        ("101", "scsi0"): 4 * GIB,
        ("102", "sata0"): 10 * GIB,
        ("103", "scsi1"): 100 * GIB,
    }
    ha = {s.labels["vm"]: s.value for s in found["vmbalance_vm_ha_managed"]}
    assert ha == {"100": 1, "101": 0, "102": 0, "103": 0}
    dirty = found["vmbalance_vm_memory_dirty_rate_bytes_per_second"]
    assert [(s.labels["vm"], s.value) for s in dirty] == [("100", 12 * 1024 * 1024)]
    every = [s for samples in found.values() for s in samples]
    assert all(s.labels.get("cluster") == "pve-east" for s in every)
    assert {s.labels["node"] for s in every} == {"pve1"}
    checked = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, check=False
    )
    assert checked.returncode == 0 and not checked.stdout + checked.stderr, checked


def test_a_cluster_name_given_overrides_corosync(pve_node: Layout) -> None:
    collector = VMCollector(pve_node.backend(), node="pve1", timeout=5, cluster="fleet-a")
    found = families(collector.exposition())
    assert {s.labels["cluster"] for f in found.values() for s in f} == {"fleet-a"}


def test_cluster_files_that_hang_cost_a_timeout_not_the_scrape(
    pve_node: Layout, tmp_path: Path
) -> None:
    backend = pve_node.backend()
    first = backend.scrape(timeout=5)
    assert first.cluster == "pve-east"
    storage = tmp_path / "storage.cfg"
    storage.unlink()
    os.mkfifo(storage)  # opening it blocks, as a read of a pmxcfs without quorum does
    try:
        started = time.monotonic()
        second = backend.scrape(timeout=3)
        assert time.monotonic() - started < 3.5
        assert second.up and second.read_timeouts.get("conf") == 1
        assert second.cluster == "pve-east"  # the last good reading stands in
        shared = {(vm.vm, i.disk): i.shared for vm in second.vms for i in vm.disk_infos}
        assert shared[("100", "scsi0")] is True
    finally:
        fd = os.open(storage, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)


def test_without_cluster_files_storages_are_local_and_the_cluster_unknown(
    pve_node: Layout, tmp_path: Path
) -> None:
    for name in ("storage.cfg", "corosync.conf", "ha/resources.cfg"):
        (tmp_path / name).unlink()
    result = pve_node.backend().scrape(timeout=5)
    assert result.up and result.cluster is None
    vm100 = {vm.vm: vm for vm in result.vms}["100"]
    assert [(i.storage, i.shared) for i in vm100.disk_infos] == [
        ("ceph-vm", False),
        ("local-lvm", False),
    ]
    assert vm100.ha_managed == 0


def test_storage_types_shared_by_nature_and_by_flag() -> None:
    assert parse_storage_cfg(STORAGE_CFG) == {
        "local": False,
        "local-lvm": False,
        "ceph-vm": True,
        "nas": True,
        "shared-dir": True,
        "local-zfs": False,
    }
    assert parse_storage_cfg("lvm: san\n\tvgname san\n\tshared 1\nzfs: over-iscsi\n") == {
        "san": True,
        "over-iscsi": True,
    }


def test_ha_resources_and_the_corosync_cluster_name() -> None:
    assert parse_ha_resources(HA_RESOURCES) == frozenset({"100"})
    assert parse_corosync_cluster_name(COROSYNC) == "pve-east"
    nested = "nodelist {\n  node {\n    cluster_name: wrong\n  }\n}\n"
    assert parse_corosync_cluster_name(nested) is None
    inner = "totem {\n  interface {\n    cluster_name: x\n  }\n}\n"
    assert parse_corosync_cluster_name(inner) is None
