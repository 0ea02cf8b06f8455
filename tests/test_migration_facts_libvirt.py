"""What decides whether a libvirt domain can move, from its XML on a real test-driver node:
disk storages (network, file, shared path, pool), sizes, blockers, and when the XML is read."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import libvirt
import pytest
from prometheus_client.parser import text_string_to_metric_families

from devkit.libvirt_nodexml import vm_name, write_node_xml
from exporter.collector import VMCollector
from exporter.libvirt import LibvirtBackend
from exporter.libvirt_stats import SharedStorage, bulk_dirty_rate
from tests.test_libvirt_backend import SpyOpener, _libvirt_error

RBD_DISK = (
    "<disk type='network' device='disk'><driver name='qemu' type='raw'/>"
    "<source protocol='rbd' name='vms/{name}-rbd'><host name='127.0.0.1' port='6789'/></source>"
    "<target dev='vdc' bus='virtio'/></disk>"
)
PCI_HOSTDEV = (
    "<hostdev mode='subsystem' type='pci' managed='yes'><source>"
    "<address domain='0x0000' bus='0x03' slot='0x00' function='0x0'/></source></hostdev>"
)
USB_HOSTDEV = (
    "<hostdev mode='subsystem' type='usb'><source>"
    "<vendor id='0x1234'/><product id='0xbeef'/></source></hostdev>"
)
SCSI_HOSTDEV = (
    "<hostdev mode='subsystem' type='scsi'><source><adapter name='scsi_host0'/>"
    "<address bus='0' target='0' unit='0'/></source></hostdev>"
)
LOCAL_ISO = (
    "<disk type='file' device='cdrom'><source file='/var/lib/libvirt/iso/install.iso'/>"
    "<target dev='hdc' bus='ide'/><readonly/></disk>"
)
SHARED_ISO = (
    "<disk type='file' device='cdrom'><source file='/mnt/shared/iso/install.iso'/>"
    "<target dev='hdc' bus='ide'/><readonly/></disk>"
)
SHARED_FILE = (
    "<disk type='file' device='disk'><source file='/mnt/shared/images/{name}.qcow2'/>"
    "<target dev='vdd' bus='virtio'/></disk>"
)
SHMEM = "<shmem name='ivshmem0'><model type='ivshmem-plain'/><size unit='M'>4</size></shmem>"

# vm0000: an rbd disk beside its two file disks and a PCI device; vm0001: a USB device and a
# local ISO; vm0002: a SCSI host device, ivshmem, an ISO and a disk under a shared path;
# vm0003: nothing that blocks.
EXTRA = {
    vm_name(0): RBD_DISK.format(name=vm_name(0)) + PCI_HOSTDEV,
    vm_name(1): USB_HOSTDEV + LOCAL_ISO,
    vm_name(2): SCSI_HOSTDEV + SHMEM + SHARED_ISO + SHARED_FILE.format(name=vm_name(2)),
}
SHARED = SharedStorage.of(("/mnt/shared/",))


@pytest.fixture
def node_uri(tmp_path: Path) -> str:
    return write_node_xml(tmp_path / "node.xml", 4, extra_devices=EXTRA)


def families(text: bytes) -> dict[str, list[Any]]:
    return {f.name: f.samples for f in text_string_to_metric_families(text.decode())}


def test_the_series_name_exactly_the_blockers_and_disks(node_uri: str) -> None:
    backend = LibvirtBackend(node_uri, shared=SHARED)
    collector = VMCollector(backend, node="kvm1", timeout=10, cluster="east")
    try:
        text = collector.exposition()
    finally:
        backend.close()
    found = families(text)
    blockers = {
        (s.labels["vm"], s.labels["reason"]) for s in found["vmbalance_vm_migration_blocker"]
    }
    assert blockers == {
        (vm_name(0), "pci_passthrough"),
        (vm_name(1), "usb_passthrough"),
        (vm_name(1), "local_media"),
        (vm_name(2), "hostdev"),
        (vm_name(2), "local_resources"),
    }
    disks = {
        (s.labels["vm"], s.labels["disk"], s.labels["storage"], s.labels["shared"])
        for s in found["vmbalance_vm_disk_info"]
    }
    expected = {(vm_name(i), d, "file", "0") for i in range(4) for d in ("vda", "vdb")}
    expected |= {(vm_name(0), "vdc", "network:rbd", "1"), (vm_name(2), "vdd", "file", "1")}
    assert disks == expected  # no CD-ROM is a disk
    sizes = {
        (s.labels["vm"], s.labels["disk"]): s.value for s in found["vmbalance_vm_disk_size_bytes"]
    }
    assert sizes.keys() == {(vm, disk) for vm, disk, _, _ in expected}
    capacity = libvirt.openReadOnly(node_uri).lookupByName(vm_name(0)).blockInfo("vdc")[0]
    assert sizes[(vm_name(0), "vdc")] == capacity > 0
    assert {s.value for s in found["vmbalance_vm_ha_managed"]} == {0}
    assert "vmbalance_vm_memory_dirty_rate_bytes_per_second" not in {
        s.name for samples in found.values() for s in samples
    }  # the test driver measures no dirty rate
    every = [s for samples in found.values() for s in samples]
    assert every and all(s.labels.get("cluster") == "east" for s in every)
    checked = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, check=False
    )
    assert checked.returncode == 0 and not checked.stdout + checked.stderr, checked


def test_without_shared_paths_every_file_is_local(node_uri: str) -> None:
    backend = LibvirtBackend(node_uri)
    try:
        vms = {vm.vm: vm for vm in backend.scrape(10).vms}
    finally:
        backend.close()
    assert {(i.disk, i.shared) for i in vms[vm_name(2)].disk_infos} == {
        ("vda", False),
        ("vdb", False),
        ("vdd", False),
    }
    assert "local_media" in vms[vm_name(2)].blockers  # the ISO is not on shared storage


def test_the_xml_is_read_once_per_domain_run_and_again_after_a_change(node_uri: str) -> None:
    opener = SpyOpener()
    backend = LibvirtBackend(node_uri, opener=opener)
    try:
        backend.scrape(10)
        assert opener.spy.calls["XMLDesc"] == 4
        for _ in range(3):
            backend.scrape(10)
        assert opener.spy.calls["XMLDesc"] == 4 and opener.spy.calls["blockInfo"] == 10
        # A new definition takes effect at the next boot: a new ID, so the XML is read again.
        conn = opener.spy.conn
        domain = conn.lookupByName(vm_name(3))
        xml = domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        conn.defineXML(xml.replace("</devices>", PCI_HOSTDEV + "</devices>"))
        domain.destroy()
        domain.create()
        opener.spy.calls.clear()
        vms = {vm.vm: vm for vm in backend.scrape(10).vms}
        assert opener.spy.calls["XMLDesc"] == 1
        assert vms[vm_name(3)].blockers == ("pci_passthrough",)
    finally:
        backend.close()


def test_an_old_reading_is_refreshed(node_uri: str) -> None:
    opener = SpyOpener()
    backend = LibvirtBackend(node_uri, opener=opener, xml_refresh=0.0)
    try:
        backend.scrape(10)
        backend.scrape(10)
        assert opener.spy.calls["XMLDesc"] == 8
    finally:
        backend.close()


def _qemu_like_nics(nics: dict[str, int]) -> Any:
    def hook(domain: Any, stats: dict[str, Any]) -> dict[str, Any]:
        return stats | {"net.count": nics["count"]}

    return hook


def _measured(names: set[str], mib_per_second: int) -> Any:
    """What QEMU's dirty-rate group reports: a finished measurement for `names`, no
    measurement started for the others."""

    def hook(domain: Any, stats: dict[str, Any]) -> dict[str, Any]:
        if domain.name() in names:
            return stats | {"dirtyrate.calc_status": 2, "dirtyrate.calc_period": 1,
                            "dirtyrate.megabytes_per_second": mib_per_second}  # fmt: skip
        return stats | {"dirtyrate.calc_status": 0, "dirtyrate.calc_period": 0}

    return hook


def test_a_nic_count_change_in_the_bulk_stats_reads_the_xml_again(node_uri: str) -> None:
    opener = SpyOpener()
    backend = LibvirtBackend(node_uri, opener=opener, xml_refresh=3600)
    nics = {"count": 1}
    try:
        opener.spy.stats_hook = _qemu_like_nics(nics)
        backend.scrape(10)
        backend.scrape(10)
        assert opener.spy.calls["XMLDesc"] == 4
        nics["count"] = 2
        backend.scrape(10)
        assert opener.spy.calls["XMLDesc"] == 8
    finally:
        backend.close()


def test_the_dirty_rate_is_asked_only_where_a_measurement_was_started(node_uri: str) -> None:
    opener = SpyOpener()
    backend = LibvirtBackend(node_uri, opener=opener, dirty_rate_probe=3600)
    try:
        spy = opener.spy
        spy.stats_hook = _qemu_like_nics({"count": 1})
        spy.list_stats_hook = _measured({vm_name(1)}, 3)
        first = {vm.vm: vm.dirty_rate_bytes_per_second for vm in backend.scrape(10).vms}
        assert spy.calls["domainListGetStats domains"] == 4  # each domain asked at first sight
        for _ in range(3):
            again = {vm.vm: vm.dirty_rate_bytes_per_second for vm in backend.scrape(10).vms}
            assert again == first
        # From then on only the measured domain, in a call of its own.
        assert spy.calls["domainListGetStats"] == 4
        assert spy.calls["domainListGetStats domains"] == 4 + 3
        dirty_group = libvirt.VIR_DOMAIN_STATS_DIRTYRATE
        assert spy.stats_masks and not any(mask & dirty_group for mask in spy.stats_masks)
    finally:
        backend.close()
    assert first == {vm_name(i): (3 * 1024 * 1024 if i == 1 else None) for i in range(4)}


def test_a_measurement_started_later_shows_once_the_domain_is_due(node_uri: str) -> None:
    opener = SpyOpener()
    backend = LibvirtBackend(node_uri, opener=opener, dirty_rate_probe=0.0)
    try:
        spy = opener.spy
        spy.stats_hook = _qemu_like_nics({"count": 1})
        spy.list_stats_hook = _measured(set(), 0)
        backend.scrape(10)
        spy.list_stats_hook = _measured({vm_name(2)}, 7)
        rates = {vm.vm: vm.dirty_rate_bytes_per_second for vm in backend.scrape(10).vms}
    finally:
        backend.close()
    assert rates[vm_name(2)] == 7 * 1024 * 1024
    assert {rate for vm, rate in rates.items() if vm != vm_name(2)} == {None}


def test_a_driver_without_the_dirty_rate_group_is_not_asked_again(node_uri: str) -> None:
    opener = SpyOpener()
    backend = LibvirtBackend(node_uri, opener=opener, dirty_rate_probe=0.0)

    def refuse(domain: Any, stats: dict[str, Any]) -> dict[str, Any]:
        raise _libvirt_error(libvirt.VIR_ERR_NO_SUPPORT, "virDomainListGetStats")

    try:
        spy = opener.spy
        spy.stats_hook = _qemu_like_nics({"count": 1})
        spy.list_stats_hook = refuse
        results = [backend.scrape(10) for _ in range(3)]
    finally:
        backend.close()
    assert spy.calls["domainListGetStats"] == 1
    assert all(r.up and len(r.vms) == 4 for r in results)
    assert {vm.dirty_rate_bytes_per_second for r in results for vm in r.vms} == {None}


@pytest.mark.parametrize(
    ("stats", "expected"),
    [
        ({"dirtyrate.calc_status": 2, "dirtyrate.megabytes_per_second": 5}, 5 * 1024 * 1024),
        ({"dirtyrate.calc_status": 1, "dirtyrate.megabytes_per_second": 5}, None),
        ({"dirtyrate.calc_status": 0}, None),
        ({}, None),
    ],
)
def test_dirty_rate_only_from_a_finished_measurement(
    stats: dict[str, int], expected: float | None
) -> None:
    assert bulk_dirty_rate(stats) == expected


def test_shared_path_is_a_directory_prefix() -> None:
    shared = SharedStorage.of(("/mnt/pve/cephfs",))
    assert shared.has_path("/mnt/pve/cephfs/images/1.qcow2")
    assert shared.has_path("/mnt/pve/cephfs")
    assert not shared.has_path("/mnt/pve/cephfs-local/1.qcow2")
    assert not shared.has_path("/mnt/pve/cephfs/../local/1.qcow2")
