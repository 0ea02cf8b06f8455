"""Domain events void a domain's cached XML, so a change shows at the next scrape without a
signal and without waiting for the periodic refresh: on the test driver (lifecycle events)
and on a real libvirtd running a QEMU guest (devices hot-plugged, a CD-ROM's medium changed),
where the dirty rate QEMU measured is published too."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import libvirt
import pytest

from devkit.libvirt_nodexml import vm_name, write_node_xml
from devkit.service import wait_until
from exporter.collector import VMCollector
from exporter.libvirt import LibvirtBackend
from exporter.libvirt_stats import SharedStorage
from exporter.samples import VMSample
from tests.conftest import REPO
from tests.test_libvirt_backend import SpyOpener
from tests.test_migration_facts_libvirt import families

HOUR = 3600.0


@pytest.fixture
def node_uri(tmp_path: Path) -> str:
    return write_node_xml(tmp_path / "node.xml", 3)


def _scrape_until(
    backend: LibvirtBackend, done: Callable[[dict[str, VMSample]], bool], what: str
) -> dict[str, VMSample]:
    """Scrape until `done` holds: events arrive asynchronously, but within milliseconds."""
    found: dict[str, VMSample] = {}

    def ready() -> bool:
        found.clear()
        found.update({vm.vm: vm for vm in backend.scrape(10).vms})
        return done(found)

    wait_until(ready, 10, what, interval=0.05)
    return found


def test_a_lifecycle_event_reads_that_domains_xml_again(node_uri: str) -> None:
    opener = SpyOpener()
    backend = LibvirtBackend(node_uri, opener=opener, xml_refresh=HOUR)
    try:
        assert backend.events
        backend.scrape(10)
        spy = opener.spy
        assert spy.calls["XMLDesc"] == 3
        backend.scrape(10)
        assert spy.calls["XMLDesc"] == 3
        domain = spy.conn.lookupByName(vm_name(1))
        domain.suspend()  # same ID, same NIC count: only the event tells
        domain.resume()
        wait_until(lambda: backend.scrape(10).up and spy.calls["XMLDesc"] > 3, 10, "a re-read")
        # Two events (suspended, resumed): one re-read of that domain, or two when a scrape
        # ran between their deliveries; the other domains' XML is not read again.
        time.sleep(0.5)
        backend.scrape(10)
        settled = spy.calls["XMLDesc"]
        assert settled in (4, 5)
        for _ in range(3):
            backend.scrape(10)
        assert spy.calls["XMLDesc"] == settled
    finally:
        backend.close()


def test_one_event_thread_for_every_backend_and_callbacks_dropped_on_close(
    node_uri: str,
) -> None:
    openers = [SpyOpener() for _ in range(3)]
    backends = [LibvirtBackend(node_uri, opener=opener) for opener in openers]
    try:
        for backend in backends:
            backend.scrape(10)
        loops = [t for t in threading.enumerate() if t.name == "libvirt-events"]
        assert len(loops) == 1 and loops[0].daemon
    finally:
        for backend in backends:
            backend.close()
    for opener in openers:
        registered = opener.spy.calls["domainEventRegisterAny"]
        assert registered > 0
        assert opener.spy.calls["domainEventDeregisterAny"] == registered


def test_the_event_thread_does_not_hold_up_exit(node_uri: str) -> None:
    script = (
        "from exporter.libvirt import LibvirtBackend\n"
        f"backend = LibvirtBackend({node_uri!r})\n"
        "assert backend.events and backend.scrape(10).up\n"
    )
    began = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - began < 20
    assert not done.stdout and not done.stderr


# -- a real libvirtd and QEMU guest -------------------------------------------------------


@pytest.fixture
def qemu_guest(tmp_path: Path) -> Iterator[tuple[Any, Path]]:
    """A private session libvirtd running one lab guest: (daemon, a directory declared
    shared, which the daemon's account can read)."""
    from lab.guest import GuestLoad, ensure_guest
    from lab.libvirt_node import DomainSpec, PrivateLibvirtd

    (tmp_path / "logs").mkdir()
    with PrivateLibvirtd(tmp_path / "logs", host_uuid=str(uuid.uuid4())) as daemon:
        spec = DomainSpec("guest-1", GuestLoad(write_kib=0, read_kib=0))
        daemon.create_guest(spec, ensure_guest())
        shared = daemon.images / "shared"
        shared.mkdir()
        daemon._chown(shared)
        yield daemon, shared


def _file(daemon: Any, path: Path, size: int = 1024 * 1024) -> Path:
    with path.open("wb") as handle:
        handle.truncate(size)
    daemon._chown(path)
    return path


def _copied(domain: Any, disk: str) -> bool:
    """The copy is ready to pivot: libvirt marks its mirror ready once QEMU says so, which can
    come after the job's counters first meet."""
    info = domain.blockJobInfo(disk, 0)
    if not (info and info["end"] > 0 and info["cur"] == info["end"]):
        return False
    for element in ElementTree.fromstring(domain.XMLDesc(0)).iter("disk"):
        target = element.find("target")
        mirror = element.find("mirror")
        if target is not None and target.get("dev") == disk and mirror is not None:
            return mirror.get("ready") == "yes"
    return False


def test_hot_plugged_devices_and_a_new_disk_source_show_at_the_next_scrape(
    qemu_guest: tuple[Any, Path],
) -> None:
    daemon, shared = qemu_guest
    backend = LibvirtBackend(
        daemon.uri, shared=SharedStorage.of((str(shared),)), xml_refresh=HOUR,
        dirty_rate_probe=HOUR,
    )  # fmt: skip
    domain = daemon.conn.lookupByName("guest-1")
    live = libvirt.VIR_DOMAIN_AFFECT_LIVE
    try:
        assert backend.events
        vm = _scrape_until(backend, lambda vms: "guest-1" in vms, "the guest")["guest-1"]
        assert vm.blockers == () and [i.disk for i in vm.disk_infos] == ["vda"]

        # Shared memory pins a guest to its host as a passed-through device does: both are
        # devices libvirt refuses to live-migrate, parsed from the same live XML (a PCI or USB
        # device cannot be hot-plugged on a machine without one to pass through).
        domain.attachDeviceFlags(
            "<shmem name='pinned'><model type='ivshmem-plain'/><size unit='M'>4</size></shmem>",
            live,
        )
        vm = _scrape_until(backend, lambda vms: vms["guest-1"].blockers != (), "a blocker")[
            "guest-1"
        ]
        assert vm.blockers == ("local_resources",)

        # A disk hot-plugged on a local file, then copied to the shared directory and
        # pivoted there: the same target, a new source.
        disk = _file(daemon, daemon.images / "data.raw")
        domain.attachDeviceFlags(
            f"<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
            f"<source file='{disk}'/><target dev='vdb' bus='virtio'/></disk>",
            live,
        )
        vm = _scrape_until(backend, lambda vms: len(vms["guest-1"].disk_infos) == 2, "vdb")[
            "guest-1"
        ]
        vdb = next(i for i in vm.disk_infos if i.disk == "vdb")
        assert (vdb.storage, vdb.shared, vdb.size_bytes) == ("file", False, 1024 * 1024)
        copy = shared / "data.raw"
        domain.blockCopy(
            "vdb",
            f"<disk type='file'><driver type='raw'/><source file='{copy}'/></disk>",
            flags=libvirt.VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB,
        )
        wait_until(lambda: _copied(domain, "vdb"), 60, "the copy of vdb")
        domain.blockJobAbort("vdb", libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)
        vm = _scrape_until(
            backend,
            lambda vms: all(i.shared for i in vms["guest-1"].disk_infos if i.disk == "vdb"),
            "vdb on shared storage",
        )["guest-1"]

        # A CD-ROM whose medium is a local ISO.
        iso = _file(daemon, daemon.images / "local.iso")
        domain.attachDeviceFlags(
            "<disk type='file' device='cdrom'><driver name='qemu' type='raw'/>"
            f"<source file='{iso}'/><target dev='sda' bus='scsi'/><readonly/></disk>",
            live,
        )
        vm = _scrape_until(
            backend, lambda vms: "local_media" in vms["guest-1"].blockers, "local media"
        )["guest-1"]
        assert vm.blockers == ("local_media", "local_resources")

        # The same as series, through the collector.
        collector = VMCollector(backend, node="lab", timeout=10)
        found = families(collector.exposition())
        assert {s.labels["reason"] for s in found["vmbalance_vm_migration_blocker"]} == {
            "local_media",
            "local_resources",
        }
        assert {
            (s.labels["disk"], s.labels["shared"]) for s in found["vmbalance_vm_disk_info"]
        } == {("vda", "0"), ("vdb", "1")}
    finally:
        backend.close()


def test_the_dirty_rate_qemu_measured_is_published(qemu_guest: tuple[Any, Path]) -> None:
    daemon, _ = qemu_guest
    domain = daemon.conn.lookupByName("guest-1")
    domain.startDirtyRateCalc(1, 0)
    wait_until(
        lambda: (
            daemon.conn.domainListGetStats([domain], libvirt.VIR_DOMAIN_STATS_DIRTYRATE)[0][1].get(
                "dirtyrate.calc_status"
            )
            == 2
        ),
        30,
        "QEMU's dirty-rate measurement",
    )
    measured = daemon.conn.domainListGetStats([domain], libvirt.VIR_DOMAIN_STATS_DIRTYRATE)[0][1]
    backend = LibvirtBackend(daemon.uri)
    try:
        found = families(VMCollector(backend, node="lab", timeout=10).exposition())
    finally:
        backend.close()
    rates = found["vmbalance_vm_memory_dirty_rate_bytes_per_second"]
    assert [(s.labels["vm"], s.value) for s in rates] == [
        ("guest-1", measured["dirtyrate.megabytes_per_second"] * 1024 * 1024)
    ]
