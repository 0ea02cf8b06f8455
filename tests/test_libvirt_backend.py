"""The libvirt backend against libvirt's in-process test driver: real libvirt-python, no daemon.

Failures are staged at the narrowest point: a thin spy around the real connection hands out
real domains whose one call first destroys the domain, or blocks, and otherwise delegates.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import libvirt
import pytest

from devkit.libvirt_nodexml import (
    disk_target,
    nic_target,
    shutoff_vm_name,
    vm_name,
    vm_uuid,
    write_node_xml,
)
from exporter.libvirt import LibvirtBackend
from exporter.libvirt_stats import memory_bytes
from exporter.samples import BackendError, ScrapeResult, VMSample
from tests.conftest import REPO

GIB = 1024**3
N_VMS = 30

# A stats hook may rewrite what the real driver's bulk call returned for one domain.
StatsHook = Callable[[Any, dict[str, Any]], dict[str, Any]]


class SpyDomain:
    """A real virDomain whose calls are counted and may be preceded by a hook."""

    def __init__(self, domain: Any, spy: SpyConnection) -> None:
        self._domain = domain
        self._spy = spy

    def __getattr__(self, attr: str) -> Any:
        method = getattr(self._domain, attr)

        def call(*args: Any) -> Any:
            self._spy.calls[attr] += 1
            hook = self._spy.before.get((self._domain.name(), attr))
            if hook is not None:
                hook(self._domain)
            result = method(*args)
            replace = self._spy.results.get((self._domain.name(), attr))
            return result if replace is None else replace(result)

        return call


def _libvirt_error(code: int, what: str) -> libvirt.libvirtError:
    """A libvirtError carrying `code`, as libvirt-python raises them."""
    error = libvirt.libvirtError(f"this function is not supported by the driver: {what}")
    error.err = (code, libvirt.VIR_FROM_NONE, str(error), libvirt.VIR_ERR_ERROR, "", "", "", 0, 0)
    return error


class SpyConnection:
    """A real read-write test-driver connection whose bulk call hands out SpyDomains."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.calls: Counter[str] = Counter()
        self.before: dict[tuple[str, str], Callable[[Any], None]] = {}
        # (domain, call) -> what to make of the real call's result
        self.results: dict[tuple[str, str], Callable[[Any], Any]] = {}
        self.extra_ids: list[int] = []  # IDs listDomainsID adds, as if they had just stopped
        self.bulk_supported = True
        self.stats_hook: StatsHook | None = None
        self.list_stats_hook: StatsHook | None = None  # for domainListGetStats
        self.stats_masks: list[int] = []  # the groups each bulk call asked for
        self.bulk_hook: Callable[[], None] | None = None

    def getAllDomainStats(self, stats: int, flags: int) -> list[tuple[Any, dict[str, Any]]]:
        if self.bulk_hook is not None:
            self.bulk_hook()
        self.calls["getAllDomainStats"] += 1
        self.stats_masks.append(stats)
        if not self.bulk_supported:  # as raised by drivers without the bulk call
            raise _libvirt_error(libvirt.VIR_ERR_NO_SUPPORT, "getAllDomainStats")
        records = []
        for domain, values in self.conn.getAllDomainStats(stats, flags):
            if self.stats_hook is not None:
                values = self.stats_hook(domain, dict(values))
            records.append((SpyDomain(domain, self), values))
        return records

    def domainListGetStats(
        self, doms: list[Any], stats: int, flags: int = 0
    ) -> list[tuple[Any, dict[str, Any]]]:
        self.calls["domainListGetStats"] += 1
        self.calls["domainListGetStats domains"] += len(doms)
        real = [dom._domain if isinstance(dom, SpyDomain) else dom for dom in doms]
        records = []
        for domain, values in self.conn.domainListGetStats(real, stats, flags):
            if self.list_stats_hook is not None:
                values = self.list_stats_hook(domain, dict(values))
            records.append((SpyDomain(domain, self), values))
        return records

    def domainEventRegisterAny(self, *args: Any) -> int:
        self.calls["domainEventRegisterAny"] += 1
        callback_id: int = self.conn.domainEventRegisterAny(*args)
        return callback_id

    def domainEventDeregisterAny(self, callback_id: int) -> int:
        self.calls["domainEventDeregisterAny"] += 1
        result: int = self.conn.domainEventDeregisterAny(callback_id)
        return result

    def listDomainsID(self) -> list[int]:
        if self.bulk_hook is not None:
            self.bulk_hook()
        self.calls["listDomainsID"] += 1
        return self.conn.listDomainsID() + self.extra_ids

    def lookupByID(self, domain_id: int) -> SpyDomain:
        return SpyDomain(self.conn.lookupByID(domain_id), self)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.conn, attr)


class SpyOpener:
    """Opens read-write (so a test can destroy domains) and keeps the spies it made."""

    def __init__(self) -> None:
        self.spies: list[SpyConnection] = []
        self.fail: bool = False

    def __call__(self, uri: str) -> SpyConnection:
        if self.fail:
            # A real libvirtError, as an unreachable daemon would raise.
            return libvirt.open("nosuchdriver:///nowhere")
        spy = SpyConnection(libvirt.open(uri))
        self.spies.append(spy)
        return spy

    @property
    def spy(self) -> SpyConnection:
        return self.spies[-1]


@pytest.fixture(scope="module")
def node_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("libvirt") / "node.xml"
    return write_node_xml(path, N_VMS, disks_per_vm=2, nics_per_vm=1, shutoff_vms=4)


@pytest.fixture
def spied(node_uri: str) -> Iterator[tuple[LibvirtBackend, SpyOpener]]:
    opener = SpyOpener()
    backend = LibvirtBackend(node_uri, concurrency=4, opener=opener)
    yield backend, opener
    backend.close()


def by_vm(result: ScrapeResult) -> dict[str, VMSample]:
    return {vm.vm: vm for vm in result.vms}


def test_default_test_driver() -> None:
    backend = LibvirtBackend("test:///default")
    try:
        result = backend.scrape(timeout=5)
    finally:
        backend.close()
    assert result.up and result.error is None and result.vm_errors == 0
    assert result.node is not None
    assert result.node.cpus == 16 and result.node.memory_bytes == 3 * GIB
    assert re.fullmatch(r"\d+\.\d+\.\d+", result.node.version)
    (vm,) = result.vms
    assert (vm.vm, vm.name, vm.uuid) == ("test", "test", "6695eb01-f6a4-8304-79aa-97f2502e193f")
    assert vm.vcpus == 2 and vm.memory_max_bytes == 8 * GIB
    # The test driver's balloon: available 2 GiB, unused 1 GiB, RSS 1 GiB (all in KiB).
    assert vm.memory_used_bytes == 1 * GIB and vm.memory_rss_bytes == 1 * GIB
    assert vm.cpu_seconds > 0
    assert [d.disk for d in vm.disks] == ["vda"]
    assert [i.interface for i in vm.interfaces] == ["testnet0"]


def test_generated_node_lists_running_domains_only(node_uri: str) -> None:
    backend = LibvirtBackend(node_uri)
    try:
        result = backend.scrape(timeout=10)
    finally:
        backend.close()
    assert result.up and result.vm_errors == 0
    assert result.node is not None
    assert result.node.cpus == 64 and result.node.memory_bytes == 256 * GIB
    vms = by_vm(result)
    assert sorted(vms) == [vm_name(i) for i in range(N_VMS)]
    assert not {shutoff_vm_name(i) for i in range(4)} & vms.keys()
    for i in range(N_VMS):
        vm = vms[vm_name(i)]
        assert vm.uuid == vm_uuid(vm.vm) and vm.memory_max_bytes == 4 * GIB
        assert [d.disk for d in vm.disks] == [disk_target(0), disk_target(1)]
        assert [n.interface for n in vm.interfaces] == [nic_target(i, 0)]


def test_counters_grow_between_scrapes(node_uri: str) -> None:
    backend = LibvirtBackend(node_uri)
    try:
        first = by_vm(backend.scrape(timeout=10))
        time.sleep(0.05)
        second = by_vm(backend.scrape(timeout=10))
    finally:
        backend.close()
    assert first.keys() == second.keys()
    for name, before in first.items():
        after = second[name]
        assert after.cpu_seconds > before.cpu_seconds
        for old, new in zip(before.disks, after.disks, strict=True):
            assert new.read_bytes > old.read_bytes and new.writes_completed > old.writes_completed
        for old_nic, new_nic in zip(before.interfaces, after.interfaces, strict=True):
            assert new_nic.receive_bytes > old_nic.receive_bytes


@pytest.mark.parametrize("undefine", [True, False], ids=["vanishes", "shuts-off"])
def test_domain_gone_mid_scrape_is_skipped_and_counted(
    spied: tuple[LibvirtBackend, SpyOpener], undefine: bool
) -> None:
    backend, opener = spied
    victim = vm_name(7)

    def destroy(domain: Any) -> None:
        domain.destroy()
        if undefine:
            domain.undefine()

    # Listed by the bulk call, gone by the time its own stats are read.
    opener.spy.before[(victim, "info")] = destroy
    result = backend.scrape(timeout=10)
    assert result.up and result.vm_errors == 1
    assert victim not in by_vm(result) and len(result.vms) == N_VMS - 1
    # Next scrape: the domain is simply not listed any more.
    again = backend.scrape(timeout=10)
    assert again.vm_errors == 0 and len(again.vms) == N_VMS - 1


def test_hung_domain_costs_only_itself(spied: tuple[LibvirtBackend, SpyOpener]) -> None:
    backend, opener = spied
    release = threading.Event()
    victim = vm_name(3)
    opener.spy.before[(victim, "info")] = lambda _domain: release.wait(10)
    timeout = 0.5
    try:
        started = time.monotonic()
        result = backend.scrape(timeout=timeout)
        elapsed = time.monotonic() - started
        assert elapsed < timeout + 0.25, elapsed
        assert result.up and result.vm_errors == 1
        assert victim not in by_vm(result) and len(result.vms) == N_VMS - 1
        # Still hung: the next scrape skips it at once instead of piling up another call.
        calls = opener.spy.calls["info"]
        again = backend.scrape(timeout=timeout)
        assert again.vm_errors == 1 and len(again.vms) == N_VMS - 1
        assert opener.spy.calls["info"] == calls + N_VMS - 1
    finally:
        release.set()
    time.sleep(0.1)
    del opener.spy.before[(victim, "info")]
    healed = backend.scrape(timeout=5)
    assert healed.vm_errors == 0 and len(healed.vms) == N_VMS


def test_hung_bulk_call_reports_down_and_recovers(
    spied: tuple[LibvirtBackend, SpyOpener],
) -> None:
    backend, opener = spied
    release = threading.Event()
    opener.spy.bulk_hook = lambda: release.wait(10)
    try:
        started = time.monotonic()
        result = backend.scrape(timeout=0.3)
        assert time.monotonic() - started < 0.55
        assert not result.up and result.error and "no answer" in result.error
        still = backend.scrape(timeout=0.3)
        assert not still.up and still.error and "not returned" in still.error
    finally:
        opener.spy.bulk_hook = None
        release.set()
    time.sleep(0.1)
    assert backend.scrape(timeout=5).up


def test_static_facts_are_parsed_once_per_boot(spied: tuple[LibvirtBackend, SpyOpener]) -> None:
    backend, opener = spied
    for _ in range(3):
        assert len(backend.scrape(timeout=10).vms) == N_VMS
    assert opener.spy.calls["XMLDesc"] == N_VMS
    # A restart gives the domain a new ID: only its XML is read again.
    restarted = opener.spy.conn.lookupByName(vm_name(5))
    restarted.destroy()
    restarted.create()
    assert len(backend.scrape(timeout=10).vms) == N_VMS
    assert opener.spy.calls["XMLDesc"] == N_VMS + 1


def test_node_memory_is_the_hosts_total_from_memory_stats(
    spied: tuple[LibvirtBackend, SpyOpener],
) -> None:
    backend, opener = spied
    asked: list[int] = []

    def memory_stats(cell: int) -> dict[str, int]:
        asked.append(cell)
        # What the QEMU host answers (KiB): MemTotal, not getInfo()'s NUMA-cell sum.
        return {"total": 24_641_536, "free": 1_000_000, "buffers": 1, "cached": 2}

    opener.spy.getMemoryStats = memory_stats
    result = backend.scrape(timeout=10)
    assert result.up and result.node is not None
    assert result.node.memory_bytes == 24_641_536 * 1024
    assert asked == [libvirt.VIR_NODE_MEMORY_STATS_ALL_CELLS]


def test_node_memory_falls_back_to_get_info_where_unsupported(
    spied: tuple[LibvirtBackend, SpyOpener],
) -> None:
    backend, opener = spied
    real = opener.spy.conn.getMemoryStats
    asked: list[int] = []

    def memory_stats(cell: int) -> dict[str, int]:
        asked.append(cell)
        return real(cell)  # the test driver raises VIR_ERR_NO_SUPPORT

    opener.spy.getMemoryStats = memory_stats
    with pytest.raises(libvirt.libvirtError) as caught:
        real(libvirt.VIR_NODE_MEMORY_STATS_ALL_CELLS)
    assert caught.value.get_error_code() == libvirt.VIR_ERR_NO_SUPPORT
    for _ in range(2):
        result = backend.scrape(timeout=10)
        assert result.up and result.node is not None
        assert result.node.memory_bytes == 256 * GIB  # getInfo()'s MiB
        assert len(result.vms) == N_VMS
    assert asked == [libvirt.VIR_NODE_MEMORY_STATS_ALL_CELLS]  # not asked again


def test_bad_uri_is_one_line_backend_error() -> None:
    with pytest.raises(BackendError) as caught:
        LibvirtBackend("::not a uri")
    message = str(caught.value)
    assert message.startswith("libvirt: cannot connect to '::not a uri': ")
    assert "\n" not in message


def test_dropped_connection_is_reopened(spied: tuple[LibvirtBackend, SpyOpener]) -> None:
    backend, opener = spied
    assert backend.scrape(timeout=10).up
    opener.spy.conn.close()  # the daemon went away under us
    result = backend.scrape(timeout=10)
    assert result.up and len(result.vms) == N_VMS
    assert len(opener.spies) == 2


def test_unreachable_libvirt_is_down_not_an_exception(
    spied: tuple[LibvirtBackend, SpyOpener],
) -> None:
    backend, opener = spied
    opener.spy.conn.close()
    opener.fail = True
    result = backend.scrape(timeout=10)
    assert not result.up and result.vms == []
    assert result.error and result.error.startswith("libvirt: cannot connect to ")
    opener.fail = False
    assert backend.scrape(timeout=10).up


def _qemu_like(domain: Any, stats: dict[str, Any]) -> dict[str, Any]:
    """Bulk stats shaped as the QEMU driver returns them (the test driver gives only state)."""
    index = int(domain.name()[2:])
    stats |= {
        "cpu.time": 5_000_000_000 + index,
        "vcpu.current": 4,
        "balloon.current": 4 * 1024 * 1024,
        "balloon.maximum": 8 * 1024 * 1024,
        "balloon.available": 3 * 1024 * 1024,
        "balloon.unused": 1024 * 1024,
        "balloon.usable": 512 * 1024,
        "balloon.rss": 3 * 1024 * 1024 + 1,
        "block.count": 2,
        "block.0.name": "sda",
        "block.0.path": "/var/lib/libvirt/images/sda.qcow2",
        "block.0.rd.reqs": 10,
        "block.0.rd.bytes": 4096,
        "block.0.wr.reqs": 20,
        "block.0.wr.bytes": 8192,
        "block.1.name": "hdc",  # an empty CD-ROM: listed, without counters
        "net.count": 1,
        "net.0.name": f"vnet{index}",
        "net.0.rx.bytes": 100,
        "net.0.tx.bytes": 200,
    }
    return stats


def test_complete_bulk_stats_need_no_per_domain_call(
    spied: tuple[LibvirtBackend, SpyOpener],
) -> None:
    backend, opener = spied
    opener.spy.stats_hook = _qemu_like
    result = backend.scrape(timeout=10)
    assert result.up and len(result.vms) == N_VMS
    per_domain = {"info", "memoryStats", "blockStats", "interfaceStats"}
    assert not per_domain & opener.spy.calls.keys(), opener.spy.calls
    # The XML (and disk sizes) once per domain for the migration facts, then from the cache.
    assert opener.spy.calls["XMLDesc"] == N_VMS
    assert backend.scrape(timeout=10).up
    assert opener.spy.calls["XMLDesc"] == N_VMS
    assert not per_domain & opener.spy.calls.keys(), opener.spy.calls
    vm = by_vm(result)[vm_name(2)]
    assert vm.cpu_seconds == pytest.approx(5.000000002)
    assert vm.vcpus == 4 and vm.memory_max_bytes == 8 * GIB
    assert vm.memory_used_bytes == 2 * GIB  # available - unused
    assert vm.memory_rss_bytes == 3 * GIB + 1024
    assert [(d.disk, d.read_bytes, d.written_bytes) for d in vm.disks] == [("sda", 4096, 8192)]
    assert [(d.reads_completed, d.writes_completed) for d in vm.disks] == [(10, 20)]
    assert [(n.interface, n.receive_bytes, n.transmit_bytes) for n in vm.interfaces] == [
        ("vnet2", 100, 200)
    ]


def test_missing_fields_are_read_per_domain_and_only_those(
    spied: tuple[LibvirtBackend, SpyOpener],
) -> None:
    backend, opener = spied

    def no_balloon(domain: Any, stats: dict[str, Any]) -> dict[str, Any]:
        stats = _qemu_like(domain, stats)
        return {key: value for key, value in stats.items() if not key.startswith("balloon.")}

    opener.spy.stats_hook = no_balloon
    result = backend.scrape(timeout=10)
    assert len(result.vms) == N_VMS and result.vm_errors == 0
    # Max memory comes from info(), used and RSS from memoryStats(); disks stay bulk.
    assert opener.spy.calls["info"] == N_VMS and opener.spy.calls["memoryStats"] == N_VMS
    # The XML once per domain, for the migration facts.
    assert opener.spy.calls["blockStats"] == 0 and opener.spy.calls["XMLDesc"] == N_VMS
    vm = by_vm(result)[vm_name(0)]
    assert vm.cpu_seconds == pytest.approx(5.0) and vm.vcpus == 4
    assert vm.memory_max_bytes == 4 * GIB and vm.memory_used_bytes == 2 * GIB
    assert [d.disk for d in vm.disks] == ["sda"]


def _nowait_skipped(busy: str, disk: str = disk_target(0)) -> StatsHook:
    """Bulk stats where NOWAIT skipped `busy`: balloon figures and disk counters gone.

    The busy domain's first disk is named as the test driver knows it (`disk`), with the
    name and path libvirt still lists; the empty CD-ROM (`block.1`) stays as it is.
    """

    def hook(domain: Any, stats: dict[str, Any]) -> dict[str, Any]:
        stats = _qemu_like(domain, stats)
        if domain.name() == busy:  # NOWAIT keeps only what needs no monitor call
            for key in ("available", "unused", "usable", "rss"):
                del stats[f"balloon.{key}"]
            for key in ("rd.reqs", "rd.bytes", "wr.reqs", "wr.bytes"):
                del stats[f"block.0.{key}"]
            stats["block.0.name"] = disk
            stats["block.0.path"] = f"/var/lib/libvirt/images/{busy}-0.qcow2"
        return stats

    return hook


def test_busy_domain_without_balloon_figures_is_not_waited_for(
    spied: tuple[LibvirtBackend, SpyOpener],
) -> None:
    backend, opener = spied
    busy = vm_name(4)
    opener.spy.stats_hook = _nowait_skipped(busy)
    result = backend.scrape(timeout=10)
    assert len(result.vms) == N_VMS and result.vm_errors == 0
    assert opener.spy.calls["memoryStats"] == 0
    vm = by_vm(result)[busy]
    assert vm.memory_used_bytes == 4 * GIB and vm.memory_rss_bytes is None
    assert [n.interface for n in vm.interfaces] == ["vnet4"]


def test_disk_counters_skipped_by_nowait_are_read_per_domain(
    spied: tuple[LibvirtBackend, SpyOpener],
) -> None:
    backend, opener = spied
    busy = vm_name(4)
    opener.spy.stats_hook = _nowait_skipped(busy)
    result = backend.scrape(timeout=10)
    assert len(result.vms) == N_VMS and result.vm_errors == 0
    # Only the busy domain's skipped disk: not the CD-ROM, not any other domain's disks.
    assert opener.spy.calls["blockStats"] == 1 and opener.spy.calls["XMLDesc"] == N_VMS
    (disk,) = by_vm(result)[busy].disks
    read_reqs, read_bytes, write_reqs, write_bytes, _ = opener.spy.conn.lookupByName(
        busy
    ).blockStats(disk_target(0))
    assert disk.disk == disk_target(0)
    # The test driver's counters grow with wall time: the figures are blockStats', not zeros.
    assert 0 < disk.read_bytes <= read_bytes and 0 < disk.reads_completed <= read_reqs
    assert 0 < disk.written_bytes <= write_bytes and 0 < disk.writes_completed <= write_reqs
    assert by_vm(result)[vm_name(5)].disks[0].disk == "sda"  # everyone else: bulk


def test_skipped_disk_counters_that_cannot_be_read_cost_the_vm(
    spied: tuple[LibvirtBackend, SpyOpener],
) -> None:
    backend, opener = spied
    unplugged, hung = vm_name(4), vm_name(6)
    release = threading.Event()

    # One disk is gone by the time blockStats asks for it; the other domain's call hangs.
    hooks = {unplugged: _nowait_skipped(unplugged, disk="vdz"), hung: _nowait_skipped(hung)}
    opener.spy.stats_hook = lambda domain, stats: hooks.get(domain.name(), _qemu_like)(
        domain, stats
    )
    opener.spy.before[(hung, "blockStats")] = lambda _domain: release.wait(10)
    try:
        started = time.monotonic()
        result = backend.scrape(timeout=0.5)
        assert time.monotonic() - started < 0.75
    finally:
        release.set()
    assert result.up and result.vm_errors == 2
    assert unplugged not in by_vm(result) and hung not in by_vm(result)
    assert len(result.vms) == N_VMS - 2


def test_states_other_than_running(spied: tuple[LibvirtBackend, SpyOpener]) -> None:
    backend, opener = spied
    states = {
        vm_name(0): (3, 2),  # paused: incoming migration, reported by the other node
        vm_name(1): (3, 1),  # paused by the user: still here, still listed
        vm_name(2): (5, 1),  # shut off between listing and stats: counted
    }

    def with_state(domain: Any, stats: dict[str, Any]) -> dict[str, Any]:
        stats = _qemu_like(domain, stats)
        state, reason = states.get(domain.name(), (1, 1))
        return stats | {"state.state": state, "state.reason": reason}

    opener.spy.stats_hook = with_state
    result = backend.scrape(timeout=10)
    vms = by_vm(result)
    assert vm_name(0) not in vms and vm_name(1) in vms and vm_name(2) not in vms
    assert result.vm_errors == 1 and len(vms) == N_VMS - 2


@pytest.mark.parametrize(
    ("balloon", "current", "expected"),
    [
        ({"available": 300, "unused": 100, "actual": 400, "usable": 50, "rss": 7}, 0, (200, 7)),
        ({"actual": 400, "usable": 150}, 0, (250, None)),
        ({"actual": 400, "rss": 90}, 0, (90, 90)),
        ({}, 64, (64, None)),
        ({"available": 100, "unused": 120}, 0, (0, None)),
    ],
)
def test_memory_definition(
    balloon: dict[str, int], current: int, expected: tuple[int, int | None]
) -> None:
    used, rss = memory_bytes(balloon, current)
    assert (used // 1024, None if rss is None else rss // 1024) == expected


def test_module_imports_without_libvirt() -> None:
    code = (
        "import sys; sys.modules['libvirt'] = None\n"
        "import exporter.libvirt as m\n"
        "from exporter.samples import BackendError\n"
        "try:\n    m.LibvirtBackend('test:///default')\n"
        "except BackendError as exc:\n    print(exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True
    )
    assert done.stdout.strip() == (
        "libvirt-python is not installed; pip install 'vmbalance[libvirt]'"
    )


def test_libvirt_errors_stay_off_stderr() -> None:
    code = (
        "from exporter.libvirt import LibvirtBackend\n"
        "from exporter.samples import BackendError\n"
        "try:\n    LibvirtBackend('nosuchdriver:///nowhere')\n"
        "except BackendError:\n    pass\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True
    )
    assert done.stderr == ""


# -- drivers whose bulk stats carry only `state.*` (the test driver) or nothing ---------------


def test_state_only_bulk_stats_switch_to_listing_with_kept_handles(
    spied: tuple[LibvirtBackend, SpyOpener],
) -> None:
    backend, opener = spied
    first = backend.scrape(timeout=10)
    assert opener.spy.calls["getAllDomainStats"] == 1 and opener.spy.calls["listDomainsID"] == 0
    opener.spy.calls.clear()
    second = backend.scrape(timeout=10)
    third = backend.scrape(timeout=10)
    # The bulk call told nothing beyond state: the IDs are listed instead, and the handles,
    # names, UUIDs and device lists of the first listing serve every later scrape.
    assert opener.spy.calls["getAllDomainStats"] == 0 and opener.spy.calls["listDomainsID"] == 2
    for call in ("UUIDString", "name", "ID", "XMLDesc"):
        assert opener.spy.calls[call] == (N_VMS if call in ("UUIDString", "name") else 0), call
    for result in (second, third):
        assert result.up and result.vm_errors == 0
        assert [
            (vm.vm, vm.uuid, vm.vcpus, vm.memory_max_bytes, [d.disk for d in vm.disks])
            for vm in result.vms
        ] == [
            (vm.vm, vm.uuid, vm.vcpus, vm.memory_max_bytes, [d.disk for d in vm.disks])
            for vm in first.vms
        ]
        assert [[n.interface for n in vm.interfaces] for vm in result.vms] == [
            [n.interface for n in vm.interfaces] for vm in first.vms
        ]
    later = by_vm(third)
    assert all(later[vm.vm].cpu_seconds > vm.cpu_seconds for vm in first.vms)
    # A restart is a new ID: one new lookup and one XML parse, for that domain only.
    restarted = opener.spy.conn.lookupByName(vm_name(5))
    restarted.destroy()
    restarted.create()
    opener.spy.calls.clear()
    assert len(backend.scrape(timeout=10).vms) == N_VMS
    assert opener.spy.calls["UUIDString"] == 1 and opener.spy.calls["XMLDesc"] == 1


def test_driver_without_bulk_call_is_listed_not_down(node_uri: str) -> None:
    opener = SpyOpener()
    backend = LibvirtBackend(node_uri, concurrency=4, opener=opener)
    try:
        opener.spy.bulk_supported = False
        result = backend.scrape(timeout=10)
        assert result.up and result.vm_errors == 0 and len(result.vms) == N_VMS
        assert opener.spy.calls["listDomainsID"] == 1
        assert backend.scrape(timeout=10).up
        assert opener.spy.calls["getAllDomainStats"] == 1  # asked once per connection
    finally:
        backend.close()


def test_listed_domain_gone_before_its_lookup_is_counted(
    spied: tuple[LibvirtBackend, SpyOpener],
) -> None:
    backend, opener = spied
    backend.scrape(timeout=10)
    opener.spy.extra_ids = [999_999]  # listed, then gone before lookupByID
    result = backend.scrape(timeout=10)
    assert result.up and result.vm_errors == 1 and len(result.vms) == N_VMS


def test_listed_paused_domains_by_reason(spied: tuple[LibvirtBackend, SpyOpener]) -> None:
    backend, opener = spied
    backend.scrape(timeout=10)  # from here on the domains are listed
    user_paused, incoming = vm_name(1), vm_name(2)
    opener.spy.conn.lookupByName(user_paused).suspend()
    opener.spy.conn.lookupByName(incoming).suspend()
    # The test driver pauses for the user (reason 1); make one look like an incoming
    # migration waiting here (VIR_DOMAIN_PAUSED_MIGRATION), which the other node reports.
    opener.spy.results[(incoming, "state")] = lambda state: [
        state[0],
        libvirt.VIR_DOMAIN_PAUSED_MIGRATION,
    ]
    try:
        result = backend.scrape(timeout=10)
    finally:
        for name in (user_paused, incoming):
            opener.spy.conn.lookupByName(name).resume()
    assert result.up and result.vm_errors == 0
    assert user_paused in by_vm(result) and incoming not in by_vm(result)
    assert len(result.vms) == N_VMS - 1
