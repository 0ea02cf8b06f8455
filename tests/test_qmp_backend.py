"""The Proxmox VE / QMP backend against fake QMP servers and against real QEMU guests."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
from fake_qmp import (
    FakeQmpServer,
    FakeVM,
    blockstats_entry,
    make_refusing_socket,
    proxmox_balloon,
)
from qemu.qmp import QMPClient

from devkit.qemu import (
    Disk,
    QemuLab,
    QemuVM,
    qemu_available,
    read_proc_usage,
    start_vm,
    write_blank_image,
    write_boot_image,
)
from exporter.pve_conf import Drive, VMConfig, parse_config
from exporter.qmp import QmpBackend
from exporter.qmp_replies import disk_name, disks_from_blockstats
from exporter.qmp_session import ALLOWED_COMMANDS, CommandNotAllowedError, execute
from exporter.samples import BackendError, DiskSample, InterfaceSample, NodeSample, VMSample

MIB = 1024 * 1024
GIB = 1024 * MIB


@dataclass
class Layout:
    """A Proxmox-like node in a temp dir: run dir, config dir, sysfs net root."""

    run: Path
    conf: Path
    net: Path

    def backend(self, **options: Any) -> QmpBackend:
        return QmpBackend(
            run_dir=str(self.run), conf_dir=str(self.conf), net_root=str(self.net), **options
        )

    def conf_file(self, vmid: str, text: str) -> None:
        (self.conf / f"{vmid}.conf").write_text(text)

    def pid_file(self, vmid: str, pid: int | str) -> None:
        (self.run / f"{vmid}.pid").write_text(f"{pid}\n")

    def tap(self, vmid: str, index: int, rx_bytes: int, tx_bytes: int) -> None:
        stats = self.net / f"tap{vmid}i{index}" / "statistics"
        stats.mkdir(parents=True)
        (stats / "rx_bytes").write_text(f"{rx_bytes}\n")
        (stats / "tx_bytes").write_text(f"{tx_bytes}\n")


def make_layout(root: Path) -> Layout:
    layout = Layout(run=root / "run", conf=root / "conf", net=root / "net")
    for path in (layout.run, layout.conf, layout.net):
        path.mkdir(parents=True)
    return layout


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    return make_layout(tmp_path)


def by_vm(vms: list[VMSample]) -> dict[str, VMSample]:
    return {vm.vm: vm for vm in vms}


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


# --------------------------------------------------------------------------- pure parsing


@pytest.mark.parametrize(
    ("device", "qdev", "expected"),
    [
        ("drive-scsi0", "scsi0", "scsi0"),
        ("drive-ide2", "ide2", "ide2"),
        ("drive-virtio1", "/machine/peripheral/virtio1/virtio-backend", "virtio1"),
        ("", "/machine/peripheral/virtio0/virtio-backend", "virtio0"),
        ("", "scsi3", "scsi3"),
        ("", "/machine/peripheral/sata1", "sata1"),
        ("", "/machine/system.flash1", "efidisk0"),
        ("", "", None),
        (None, None, None),
        ("", "/virtio-backend", None),
    ],
)
def test_disk_name(device: str | None, qdev: str | None, expected: str | None) -> None:
    assert disk_name(device, qdev) == expected


def test_disks_from_blockstats_skips_nameless_and_repeated_entries() -> None:
    entries = [
        blockstats_entry("drive-scsi0", "scsi0", 10, 20, 1, 2),
        blockstats_entry("", "", 99, 99, 9, 9),
        blockstats_entry("", "/machine/peripheral/virtio0/virtio-backend", 30, 40, 3, 4),
        blockstats_entry("", "scsi0", 77, 77, 7, 7),
        "not an entry",
    ]
    assert disks_from_blockstats(entries) == (
        DiskSample("scsi0", 10, 20, 1, 2),
        DiskSample("virtio0", 30, 40, 3, 4),
    )
    with pytest.raises(TypeError):
        disks_from_blockstats({"device": "drive-scsi0"})


PVE_CONF = """\
#Web front end%3A nginx
#name%3A not-this
agent: 1
boot: order=scsi0;net0
cores: 2
memory: 4096
meta: creation-qemu=8.1.5,ctime=1700000000
name: web-01
net0: virtio=BC:24:11:2A:3B:4C,bridge=vmbr0,firewall=1
net2: e1000=BC:24:11:2A:3B:4D,bridge=vmbr1,tag=20
numa: 0
scsi0: local-lvm:vm-100-disk-0,iothread=1,size=32G
scsihw: virtio-scsi-single
smbios1: uuid=5b0f9c4e-4d59-4a3c-9a51-2f8e3c1d7a10
sockets: 2
vmgenid: 0f2a0c7e-0000-4000-8000-000000000000

[PENDING]
memory: 8192

[before-upgrade]
cores: 8
memory: 16384
name: old-name
net5: virtio=BC:24:11:00:00:05,bridge=vmbr0
snaptime: 1699990000
"""


def test_parse_config_reads_only_the_main_section() -> None:
    conf = parse_config(PVE_CONF)
    assert conf == VMConfig(
        name="web-01",
        memory_bytes=4096 * MIB,
        vcpus=None,
        sockets=2,
        cores=2,
        uuid="5b0f9c4e-4d59-4a3c-9a51-2f8e3c1d7a10",
        nets=(0, 2),
        drives=(Drive("scsi0", "local-lvm:vm-100-disk-0", 32 * GIB, cdrom=False, shared=False),),
    )
    assert conf.cpu_count == 4


@pytest.mark.parametrize(
    ("text", "expected_memory", "expected_cpus"),
    [
        ("", None, 1),
        ("memory: current=2048\ncores: 4\n", 2048 * MIB, 4),
        ("memory: 1024\nsockets: 2\ncores: 4\nvcpus: 3\n", 1024 * MIB, 3),
        ("memory: lots\ncores: -1\nsockets: 0\n", None, 1),
        ("[snap]\nmemory: 512\ncores: 8\n", None, 1),
        ("garbage line\nname:\nmemory:   768  \n", 768 * MIB, 1),
    ],
)
def test_parse_config_missing_or_odd_fields(
    text: str, expected_memory: int | None, expected_cpus: int
) -> None:
    conf = parse_config(text)
    assert conf.memory_bytes == expected_memory
    assert conf.cpu_count == expected_cpus
    assert conf.name is None


# --------------------------------------------------------------------------- the allowlist


def test_allowlist_is_read_only_and_enforced() -> None:
    mutating = {"quit", "stop", "cont", "system_reset", "balloon", "qom-set", "migrate"}
    assert not ALLOWED_COMMANDS & (mutating | {"human-monitor-command", "device_del"})
    never_used = cast(QMPClient, object())  # refused before the client is touched
    for command in sorted(mutating):
        with pytest.raises(CommandNotAllowedError):
            asyncio.run(execute(never_used, command))


# --------------------------------------------------------------------------- set-up errors


def test_constructor_rejects_missing_directories(layout: Layout, tmp_path: Path) -> None:
    missing = str(tmp_path / "nope")
    cases = [
        {"run_dir": missing},
        {"conf_dir": missing},
        {"proc_root": missing},
        {"run_dir": str(tmp_path / "afile")},
    ]
    (tmp_path / "afile").write_text("")
    for override in cases:
        options = {"run_dir": str(layout.run), "conf_dir": str(layout.conf), **override}
        with pytest.raises(BackendError) as raised:
            QmpBackend(**options)
        message = str(raised.value)
        assert "\n" not in message
        assert next(iter(override.values())) in message
    with pytest.raises(BackendError):
        layout.backend(concurrency=0)


def test_run_dir_unreadable_at_scrape_time_is_down_not_an_exception(layout: Layout) -> None:
    backend = layout.backend()
    layout.run.rmdir()
    result = backend.scrape(timeout=1.0)
    assert result.up is False
    assert result.error is not None and str(layout.run) in result.error
    assert "\n" not in result.error
    layout.run.write_text("now a file")
    assert backend.scrape(timeout=1.0).up is False
    backend.close()
    backend.close()


def test_empty_node(layout: Layout) -> None:
    result = layout.backend().scrape(timeout=1.0)
    assert result.up is True and result.vms == [] and result.vm_errors == 0
    assert result.node is not None
    assert result.node.cpus == os.cpu_count()
    assert result.node.memory_bytes > 0
    assert result.node.version == "unknown"


# --------------------------------------------------------------------------- fake QMP servers


@pytest.fixture
def fake_server(layout: Layout) -> Iterator[list[FakeQmpServer]]:
    """Start servers with `servers.append(FakeQmpServer(...).start())`; all stop afterwards."""
    servers: list[FakeQmpServer] = []
    yield servers
    for server in servers:
        server.stop()


def test_values_commands_and_sessions_with_a_recording_server(
    layout: Layout, fake_server: list[FakeQmpServer]
) -> None:
    vms = [
        FakeVM("100", cpus=4, version=(8, 1, 5), name="ignored-conf-wins"),
        FakeVM(
            "101",
            balloon=None,
            cpus=1,
            version=(7, 2, 0),
            name="from-qemu",
            uuid="11111111-2222-3333-4444-555555555555",
            disks=[blockstats_entry("", "/machine/peripheral/virtio0/virtio-backend", 5, 6, 7, 8)],
        ),
    ]
    server = FakeQmpServer(layout.run, vms).start()
    fake_server.append(server)
    for vm in vms:
        layout.pid_file(vm.vmid, os.getpid())
    layout.conf_file(
        "100",
        "name: web\nmemory: 4096\ncores: 2\nsmbios1: uuid=aaaa-bbbb\n"
        "net0: virtio=BC:24:11:00:00:01,bridge=vmbr0\nnet1: virtio=BC:24:11:00:00:02\n",
    )
    layout.conf_file("101", "memory: 1024\nsockets: 2\ncores: 2\n[snap]\nname: old\n")
    layout.tap("100", 0, rx_bytes=1000, tx_bytes=2000)  # net1 has no tap: no sample

    backend = layout.backend()
    first = backend.scrape(timeout=5.0)
    second = backend.scrape(timeout=5.0)
    assert server.wait_idle()

    for result in (first, second):
        assert result.up and result.vm_errors == 0 and result.error is None
        assert result.node is not None and result.node.version == "8.1.5"
        vm100, vm101 = by_vm(result.vms)["100"], by_vm(result.vms)["101"]
        balloon = proxmox_balloon()
        assert (vm100.name, vm100.uuid, vm100.vcpus) == ("web", "aaaa-bbbb", 4)
        assert vm100.memory_max_bytes == balloon["max_mem"]
        assert vm100.memory_used_bytes == balloon["total_mem"] - balloon["free_mem"]
        assert vm100.memory_rss_bytes and vm100.memory_rss_bytes > 0
        assert vm100.cpu_seconds > 0
        assert [d.disk for d in vm100.disks] == ["scsi0", "virtio0"]
        assert vm100.disks[0] == DiskSample("scsi0", 10_000_000, 5_000_000, 900, 400)
        assert vm100.interfaces == (
            InterfaceSample("net0", receive_bytes=2000, transmit_bytes=1000),
        )
        assert (vm101.name, vm101.uuid, vm101.vcpus) == (
            "from-qemu",
            "11111111-2222-3333-4444-555555555555",
            1,
        )
        assert vm101.memory_max_bytes == 1024 * MIB  # no balloon: the config
        assert vm101.memory_used_bytes == vm101.memory_rss_bytes  # no balloon stats: RSS
        assert vm101.disks == (DiskSample("virtio0", 5, 6, 7, 8),)
        assert vm101.interfaces == ()

    for vmid, log in server.logs.items():
        assert log.connections == 2 and log.disconnections == 2, vmid
        assert set(log.commands) <= ALLOWED_COMMANDS, vmid
        assert log.commands.count("qmp_capabilities") == 2
        assert log.commands[0] == "qmp_capabilities"
        assert log.commands.count("query-status") == 2  # one per session, in the batch
    # Proxmox's balloon carries guest stats: no qom-get; the config had memory: no summary.
    assert "qom-get" not in server.logs["100"].commands
    assert "query-memory-size-summary" not in server.logs["100"].commands
    assert "query-name" in server.logs["101"].commands


@pytest.mark.parametrize("status", ["inmigrate", "postmigrate", "finish-migrate"])
def test_a_vm_migrating_in_or_away_is_not_published_nor_an_error(
    layout: Layout, fake_server: list[FakeQmpServer], status: str
) -> None:
    # 151 is paused by the user: still here, still published.
    vms = [FakeVM("150"), FakeVM("151", status="paused"), FakeVM("152", status=status)]
    server = FakeQmpServer(layout.run, vms).start()
    fake_server.append(server)
    for vm in vms:
        layout.pid_file(vm.vmid, os.getpid())

    result = layout.backend().scrape(timeout=5.0)
    assert result.up and result.vm_errors == 0
    assert sorted(by_vm(result.vms)) == ["150", "151"]
    assert server.wait_idle()
    for log in server.logs.values():
        assert set(log.commands) <= ALLOWED_COMMANDS
        assert log.commands.count("query-status") == 1


def test_upstream_qemu_balloon_guest_stats_and_memory_fallbacks(
    layout: Layout, fake_server: list[FakeQmpServer]
) -> None:
    unset = 2**64 - 1
    reported = {
        "last-update": 1_700_000_000,
        "stats": {"stat-total-memory": 900 * MIB, "stat-free-memory": 300 * MIB},
    }
    not_reported = {
        "last-update": 0,
        "stats": {"stat-total-memory": unset, "stat-free-memory": unset},
    }
    vms = [
        FakeVM("200", balloon={"actual": 768 * MIB}, guest_stats=reported, memory_bytes=GIB),
        FakeVM("201", balloon={"actual": 768 * MIB}, guest_stats=not_reported, memory_bytes=GIB),
        FakeVM("202", balloon={"actual": 768 * MIB}, guest_stats=None, memory_bytes=0),
    ]
    server = FakeQmpServer(layout.run, vms).start()
    fake_server.append(server)
    for vm in vms:
        layout.pid_file(vm.vmid, os.getpid())

    result = layout.backend().scrape(timeout=5.0)
    vms_by_id = by_vm(result.vms)
    assert result.vm_errors == 0
    assert vms_by_id["200"].memory_used_bytes == 600 * MIB
    assert vms_by_id["200"].memory_max_bytes == GIB  # no config: QEMU's RAM size
    assert vms_by_id["201"].memory_used_bytes == vms_by_id["201"].memory_rss_bytes
    assert vms_by_id["202"].memory_max_bytes == 768 * MIB  # nothing else: the balloon
    assert vms_by_id["202"].name == "VM 202"
    assert vms_by_id["202"].uuid == ""  # QEMU's all-zero default UUID is no UUID
    assert server.wait_idle()
    for log in server.logs.values():
        assert set(log.commands) <= ALLOWED_COMMANDS
        assert "qom-get" in log.commands


def test_a_vm_that_never_answers_is_skipped_within_the_timeout(
    layout: Layout, fake_server: list[FakeQmpServer]
) -> None:
    vms = [FakeVM("300"), FakeVM("301", silent=True), FakeVM("302")]
    server = FakeQmpServer(layout.run, vms).start()
    fake_server.append(server)
    for vm in vms:
        layout.pid_file(vm.vmid, os.getpid())

    started = time.monotonic()
    result = layout.backend(vm_timeout=30.0).scrape(timeout=1.0)
    elapsed = time.monotonic() - started

    assert elapsed < 1.5
    assert result.up and result.vm_errors == 1
    assert sorted(by_vm(result.vms)) == ["300", "302"]
    assert server.logs["301"].connections == 1
    assert server.wait_idle(), "the exporter must hang up on the silent VM too"


def test_stale_refusing_and_odd_pid_files(layout: Layout) -> None:
    layout.pid_file("400", dead_pid())  # QEMU killed: its pid file and socket stay behind
    make_refusing_socket(layout.run / "400.qmp")
    layout.pid_file("401", os.getpid())  # a live pid, but nobody listens on the socket
    make_refusing_socket(layout.run / "401.qmp")
    layout.pid_file("402", "not-a-pid")
    layout.pid_file("403", os.getpid())  # still starting: no socket yet, not an error
    layout.pid_file("-1", os.getpid())  # Proxmox's CPU-flag probe VM
    (layout.run / "404.swtpm.pid").write_text(f"{os.getpid()}\n")

    result = layout.backend().scrape(timeout=2.0)
    assert result.up and result.vms == []
    assert result.vm_errors == 3


@pytest.mark.parametrize("qemu_hangs_up", [True, False])
def test_a_vm_that_vanishes_mid_scrape(
    layout: Layout, fake_server: list[FakeQmpServer], qemu_hangs_up: bool
) -> None:
    victim = subprocess.Popen(["sleep", "60"])

    def shut_down(command: str) -> None:
        if command == "query-blockstats" and victim.poll() is None:
            (layout.run / "501.pid").unlink(missing_ok=True)
            victim.kill()
            victim.wait()

    vms = [
        FakeVM("500"),
        FakeVM(
            "501",
            on_command=shut_down,
            hangup_on="query-blockstats" if qemu_hangs_up else None,
        ),
    ]
    try:
        server = FakeQmpServer(layout.run, vms).start()
        fake_server.append(server)
        layout.pid_file("500", os.getpid())
        layout.pid_file("501", victim.pid)
        result = layout.backend().scrape(timeout=3.0)
    finally:
        victim.kill()
        victim.wait()
    assert result.up and result.vm_errors == 1
    assert list(by_vm(result.vms)) == ["500"]
    assert server.wait_idle()


def test_concurrency_is_bounded(layout: Layout, fake_server: list[FakeQmpServer]) -> None:
    vms = [FakeVM(str(vmid)) for vmid in range(600, 612)]
    server = FakeQmpServer(layout.run, vms).start()
    fake_server.append(server)
    for vm in vms:
        layout.pid_file(vm.vmid, os.getpid())
    result = layout.backend(concurrency=3).scrape(timeout=5.0)
    assert len(result.vms) == 12 and result.vm_errors == 0
    assert [vm.vm for vm in result.vms] == [str(vmid) for vmid in range(600, 612)]
    assert 1 <= server.gauge.peak <= 3


def test_process_figures_and_node_facts_from_proc_root(
    layout: Layout, tmp_path: Path, fake_server: list[FakeQmpServer]
) -> None:
    proc = tmp_path / "proc"
    (proc / "4242").mkdir(parents=True)
    # A command name with spaces and parentheses must not shift the fields.
    fields = ["S", *["0"] * 10, "250", "150", *["0"] * 30]
    (proc / "4242" / "stat").write_text(f"4242 (kvm (id) 7) {' '.join(fields)}\n")
    (proc / "4242" / "status").write_text("Name:\tkvm\nState:\tS (sleeping)\n")  # no VmRSS
    (proc / "4242" / "statm").write_text("5000 1234 300 1 0 900 0\n")
    (proc / "meminfo").write_text("MemTotal:       65843068 kB\nMemFree:  1 kB\n")
    server = FakeQmpServer(layout.run, [FakeVM("700")]).start()
    fake_server.append(server)
    layout.pid_file("700", 4242)

    result = layout.backend(proc_root=str(proc)).scrape(timeout=5.0)
    assert result.node == NodeSample(
        cpus=os.cpu_count() or 1, memory_bytes=65843068 * 1024, version="8.1.5"
    )
    (vm,) = result.vms
    assert vm.cpu_seconds == pytest.approx(400 / os.sysconf("SC_CLK_TCK"))
    assert vm.memory_rss_bytes == 1234 * os.sysconf("SC_PAGE_SIZE")

    fixed = NodeSample(cpus=64, memory_bytes=512 * GIB, version="pve-9")
    assert layout.backend(proc_root=str(proc), node_sample=fixed).scrape(1.0).node == fixed

    (proc / "4242" / "stat").write_text(f"4242 (kvm) Z {' '.join(fields[1:])}\n")
    zombie = layout.backend(proc_root=str(proc)).scrape(timeout=5.0)
    assert zombie.vms == [] and zombie.vm_errors == 1


# --------------------------------------------------------------------------- real QEMU

needs_qemu = pytest.mark.skipif(not qemu_available(), reason="qemu-system-x86_64 not installed")


@dataclass
class RealNode:
    layout: Layout
    lab: QemuLab

    @property
    def vms(self) -> dict[str, QemuVM]:
        return self.lab.vms


def _boot_disk_read(vm: QemuVM, disk: str) -> int:
    for entry in vm.qmp("query-blockstats"):
        names = {entry["device"].removeprefix("drive-"), *entry.get("qdev", "").split("/")}
        if disk in names:
            return int(entry["stats"]["rd_bytes"])
    return 0


@pytest.fixture(scope="module")
def real_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealNode]:
    """VM 101: scsi0 boots, virtio0 (-blockdev), no balloon. VM 102: the reverse, balloon."""
    root = tmp_path_factory.mktemp("pve")
    layout = make_layout(root)
    images = root / "images"
    images.mkdir()
    with QemuLab(layout.run) as lab:
        lab.start(
            "101",
            [
                Disk("scsi0", write_boot_image(images / "101-boot.raw"), bootindex=1),
                Disk("virtio0", write_blank_image(images / "101-data.raw"), legacy_drive=False),
            ],
        )
        lab.start(
            "102",
            [
                Disk("scsi0", write_blank_image(images / "102-data.raw")),
                Disk(
                    "virtio0",
                    write_boot_image(images / "102-boot.raw"),
                    legacy_drive=False,
                    bootindex=1,
                ),
            ],
            balloon=True,
        )
        layout.conf_file("101", "name: alpha\nmemory: 64\ncores: 1\nnet0: virtio=BC:24:11:0:0:1\n")
        layout.conf_file("102", "name: beta\ncores: 1\n[snap]\nmemory: 4096\nname: old\n")
        # SeaBIOS reads each boot sector, then the guest halts: counters settle.
        deadline = time.monotonic() + 15
        for vm, disk in ((lab.vms["101"], "scsi0"), (lab.vms["102"], "virtio0")):
            while _boot_disk_read(vm, disk) == 0:
                assert time.monotonic() < deadline, f"VM {vm.vmid} never read its boot disk"
                time.sleep(0.1)
        yield RealNode(layout=layout, lab=lab)


@pytest.mark.slow
@needs_qemu
def test_real_qemu_values_match_what_qemu_reports(real_node: RealNode) -> None:
    backend = real_node.layout.backend()
    before = {vmid: read_proc_usage(vm.pid) for vmid, vm in real_node.vms.items()}
    result = backend.scrape(timeout=5.0)
    after = {vmid: read_proc_usage(vm.pid) for vmid, vm in real_node.vms.items()}
    # The exporter hung up: QEMU serves the test's own session straight away.
    direct = {
        vmid: {
            "blockstats": vm.qmp("query-blockstats"),
            "cpus": vm.qmp("query-cpus-fast"),
            "version": vm.qmp("query-version"),
        }
        for vmid, vm in real_node.vms.items()
    }
    balloon = real_node.vms["102"].qmp("query-balloon")

    assert result.up and result.vm_errors == 0
    samples = by_vm(result.vms)
    assert sorted(samples) == ["101", "102"]
    for vmid, sample in samples.items():
        expected_disks = {
            disk_name(entry["device"], entry.get("qdev")): entry["stats"]
            for entry in direct[vmid]["blockstats"]
        }
        assert {d.disk for d in sample.disks} == {"scsi0", "virtio0"} == set(expected_disks)
        for disk in sample.disks:
            stats = expected_disks[disk.disk]
            assert (
                disk.read_bytes,
                disk.written_bytes,
                disk.reads_completed,
                disk.writes_completed,
            ) == (
                stats["rd_bytes"],
                stats["wr_bytes"],
                stats["rd_operations"],
                stats["wr_operations"],
            )
        assert sample.vcpus == len(direct[vmid]["cpus"]) == 1
        assert before[vmid][0] <= sample.cpu_seconds <= after[vmid][0]
        low, high = sorted((before[vmid][1], after[vmid][1]))
        assert sample.memory_rss_bytes is not None
        assert low - 4 * MIB <= sample.memory_rss_bytes <= high + 4 * MIB
        assert sample.interfaces == ()  # net0 configured, but no tap device on this host

    boot_reads = {"101": "scsi0", "102": "virtio0"}
    for vmid, disk in boot_reads.items():
        assert next(d for d in samples[vmid].disks if d.disk == disk).read_bytes >= 512

    alpha, beta = samples["101"], samples["102"]
    assert alpha.name == "alpha" and beta.name == "beta"
    assert alpha.memory_max_bytes == 64 * MIB  # no balloon device: the config's memory
    assert beta.memory_max_bytes == balloon["actual"] == 64 * MIB
    assert alpha.memory_used_bytes == alpha.memory_rss_bytes  # no guest stats: RSS
    assert beta.memory_used_bytes == beta.memory_rss_bytes
    qemu = direct["101"]["version"]["qemu"]
    assert result.node is not None
    assert result.node.version == f"{qemu['major']}.{qemu['minor']}.{qemu['micro']}"


@pytest.mark.slow
@needs_qemu
def test_real_qemu_next_to_a_hung_vm(real_node: RealNode, tmp_path: Path) -> None:
    # A second run dir: the real VMs linked in, plus a fake that accepts and never answers.
    layout = make_layout(tmp_path / "node")
    for vmid, vm in real_node.vms.items():
        (layout.run / f"{vmid}.qmp").symlink_to(vm.qmp_path)
        (layout.run / f"{vmid}.pid").symlink_to(vm.pid_path)
    with FakeQmpServer(layout.run, [FakeVM("199", silent=True)]) as hung:
        layout.pid_file("199", os.getpid())
        started = time.monotonic()
        result = layout.backend().scrape(timeout=1.0)
        elapsed = time.monotonic() - started
        assert hung.wait_idle()
    assert elapsed < 1.5
    assert result.up and result.vm_errors == 1
    assert sorted(by_vm(result.vms)) == ["101", "102"]


@pytest.mark.slow
@needs_qemu
def test_real_qemu_waiting_for_an_incoming_migration_is_not_published(tmp_path: Path) -> None:
    layout = make_layout(tmp_path)
    with QemuLab(layout.run) as lab:
        lab.start("111")
        lab.start("112", extra_args=["-incoming", "defer"])
        lab.start("113", paused=True, extra_args=["-incoming", "defer"])
        assert lab.vms["112"].qmp("query-status")["status"] == "inmigrate"
        result = layout.backend().scrape(timeout=5.0)
    assert result.up and result.vm_errors == 0
    assert sorted(by_vm(result.vms)) == ["111"]


@pytest.mark.slow
@needs_qemu
def test_real_qemu_live_migration_is_reported_by_one_node_at_a_time(tmp_path: Path) -> None:
    """A source and target QEMU, each in its own node's run dir; only one is ever published."""
    source_node, target_node = make_layout(tmp_path / "a"), make_layout(tmp_path / "b")
    channel = tmp_path / "migrate.sock"
    source = start_vm(source_node.run, "120")
    target = start_vm(target_node.run, "120", extra_args=["-incoming", f"unix:{channel}"])
    try:
        source_backend, target_backend = source_node.backend(), target_node.backend()
        before = (source_backend.scrape(timeout=5.0), target_backend.scrape(timeout=5.0))
        assert [len(r.vms) for r in before] == [1, 0]
        assert [r.vm_errors for r in before] == [0, 0]

        source.qmp("migrate", {"uri": f"unix:{channel}"})  # the test's own session, not ours
        deadline = time.monotonic() + 10
        while source.qmp("query-status")["status"] != "postmigrate":
            assert time.monotonic() < deadline, "the migration did not complete"
            time.sleep(0.02)
        after = (source_backend.scrape(timeout=5.0), target_backend.scrape(timeout=5.0))
        assert [len(r.vms) for r in after] == [0, 1]
        assert [r.vm_errors for r in after] == [0, 0]
    finally:
        source.stop()
        target.stop()
