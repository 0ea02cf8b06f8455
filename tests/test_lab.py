"""The real hypervisor lab, CI-sized: two guests doing real disk I/O, the whole chain on them.

One guest on a private libvirtd (`lab-libvirt`), one on a Proxmox-like node (`lab-pve`) that
is live-migrated over QMP to a second one (`lab-pve2`); an exporter per node, Debian's
prometheus-libvirt-exporter beside ours, Prometheus scraping every 2 s, the `vmbalance` CLI on
top. One module fixture runs it (about two minutes, plus the kernel download the first time);
the tests check what it recorded. The fast tests at the top cover the guest builder's pieces.
The full lab with nine guests is `python -m lab.run` (`make lab`).
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from xml.etree import ElementTree

import pytest

from devkit.qemu import qemu_available
from exporter.pve_conf import parse_config
from lab.cluster import Lab, LabGuest, LabSpec, RateCheck
from lab.guest import (
    CpioEntry,
    GuestBuildError,
    GuestImage,
    GuestLoad,
    Kernel,
    cpio_newc,
    default_cache_dir,
    ensure_guest,
    initramfs_bytes,
    load_order,
    module_depends,
)
from lab.libvirt_node import DomainSpec, domain_xml
from lab.pve_node import Migration, PveGuestSpec, conf_text
from lab.scrape import PeerComparison, compare_with_peer, parse_counters

pytestmark = pytest.mark.timeout(420)

MIB = 1024 * 1024
RATE_TOLERANCE = 0.20
INTERVAL = 2
MIGRATED = "101"

# --------------------------------------------------------------------------- guest pieces


def test_guest_load_puts_its_rates_on_the_kernel_command_line() -> None:
    load = GuestLoad(write_kib=1536, read_kib=512, block_kib=32, period_ms=250)
    words = load.cmdline().split()
    assert "console=ttyS0" in words
    assert {
        "vmbalance.write_kib=1536",
        "vmbalance.read_kib=512",
        "vmbalance.block_kib=32",
        "vmbalance.period_ms=250",
    } <= set(words)
    assert load.disk_bytes == (1536 + 512) * 1024


def test_module_depends_reads_the_modinfo_section() -> None:
    blob = b"\x7fELF junk\x00license=GPL\x00depends=virtio,virtio-ring\x00retpoline=Y\x00"
    assert module_depends(blob) == ("virtio", "virtio_ring")
    assert module_depends(b"\x00depends=\x00name=virtio\x00") == ()


def test_load_order_loads_dependencies_first_and_skips_built_in_modules() -> None:
    depends = {
        "virtio_blk": ("virtio", "virtio_ring"),
        "virtio_pci": ("virtio_pci_modern_dev", "virtio", "virtio_ring"),
        "virtio_pci_modern_dev": (),
        "virtio": (),
    }
    order = load_order(("virtio_pci", "virtio_blk"), depends, frozenset({"virtio_ring"}))
    assert set(order) == {"virtio_pci_modern_dev", "virtio", "virtio_pci", "virtio_blk"}
    for module, needs in depends.items():
        for need in needs:
            if need in order:
                assert order.index(need) < order.index(module)


def test_load_order_names_a_module_the_kernel_package_lacks() -> None:
    with pytest.raises(GuestBuildError, match="virtio_blk"):
        load_order(("virtio_blk",), {}, frozenset())


@pytest.mark.skipif(shutil.which("cpio") is None, reason="cpio not installed")
def test_the_initramfs_is_a_cpio_archive_the_kernel_can_unpack(tmp_path: Path) -> None:
    module = tmp_path / "virtio_blk.ko"
    module.write_bytes(b"module")
    busybox = tmp_path / "busybox"
    busybox.write_bytes(b"not really busybox")
    kernel = Kernel(version="6.1-test", vmlinuz=tmp_path / "vmlinuz", modules=(module,))
    archive = gzip.decompress(initramfs_bytes(kernel, busybox))
    listing = subprocess.run(
        ["cpio", "-itv", "--quiet"], input=archive, capture_output=True, check=True
    ).stdout.decode()
    lines = {line.split()[-1]: line for line in listing.splitlines()}
    assert set(lines) >= {"init", "bin/busybox", "dev/console", "lib/modules/virtio_blk.ko"}
    assert lines["init"].startswith("-rwxr-xr-x")
    assert lines["dev/console"].startswith("crw-------")
    # Every entry is 4-byte aligned and the archive ends with the trailer.
    raw = cpio_newc([CpioEntry("a", 0o100644, b"xyz")])
    assert raw.startswith(b"070701") and b"TRAILER!!!" in raw and len(raw) % 4 == 0


def test_domain_xml_is_a_tcg_domain_booting_the_lab_kernel(tmp_path: Path) -> None:
    spec = DomainSpec("lab-<db>&1", GuestLoad(write_kib=100), memory_mib=96)
    root = ElementTree.fromstring(
        domain_xml(spec, tmp_path / "k", tmp_path / "i", tmp_path / "d.raw", tmp_path / "s")
    )
    assert root.get("type") == "qemu"
    assert root.findtext("name") == "lab-<db>&1"
    assert root.findtext("memory") == "96"
    assert root.findtext("os/cmdline") == spec.load.cmdline()
    target = root.find("devices/disk/target")
    assert target is not None and target.get("dev") == "vda" and target.get("bus") == "virtio"
    balloon = root.find("devices/memballoon")
    assert balloon is not None and balloon.get("model") == "none"


def test_conf_file_reads_back_through_the_exporters_parser() -> None:
    spec = PveGuestSpec("101", "app-101", GuestLoad(write_kib=1), memory_mib=96)
    conf = parse_config(conf_text(spec))
    assert conf.name == "app-101"
    assert conf.memory_bytes == 96 * MIB
    assert conf.cpu_count == 1
    assert conf.uuid


def test_both_exporters_counters_map_to_the_same_keys() -> None:
    ours = (
        'vmbalance_vm_disk_written_bytes_total{node="n",vm="a",disk="vda"} 10.0\n'
        'vmbalance_vm_cpu_seconds_total{node="n",vm="a"} 1.5\n'
    )
    peer = (
        "# TYPE libvirt_domain_block_stats_write_bytes_total counter\n"
        'libvirt_domain_block_stats_write_bytes_total{domain="a",source_file="/x",'
        'target_device="vda",uuid="u"} 10\n'
        "# TYPE libvirt_domain_info_cpu_time_seconds_total counter\n"
        'libvirt_domain_info_cpu_time_seconds_total{domain="a",uuid="u"} 1.5\n'
    )
    assert parse_counters(ours, "ours") == parse_counters(peer, "peer")
    assert len(parse_counters(ours, "ours")) == 2


# --------------------------------------------------------------------------- the lab itself

TOOLS = {
    "qemu-system-x86_64": "qemu-system-x86",
    "libvirtd": "libvirt-daemon libvirt-daemon-driver-qemu",
    "prometheus": "prometheus",
    "prometheus-libvirt-exporter": "prometheus-libvirt-exporter",
    "busybox": "busybox-static",
    "dpkg-deb": "dpkg",
}


def _missing_tools() -> list[str]:
    search = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/sbin"
    return [
        f"{tool} ({package})"
        for tool, package in TOOLS.items()
        if shutil.which(tool, path=search) is None
    ]


needs_lab = pytest.mark.skipif(
    bool(_missing_tools()) or not qemu_available(),
    reason=f"lab tools not installed: {', '.join(_missing_tools())}",
)


def ci_spec() -> LabSpec:
    block = 64 * 1024
    return LabSpec(
        guests=(
            LabGuest("lab-db-1", "lab-libvirt", GuestLoad(write_kib=1536, read_kib=512)),
            LabGuest(MIGRATED, "lab-pve", GuestLoad(write_kib=1024, read_kib=256), "app-101"),
        ),
        pve_nodes=("lab-pve", "lab-pve2"),
        libvirt_node="lab-libvirt",
        scrape_interval=INTERVAL,
        config={
            "query": {"window": "1m", "short_window": "15s", "history": "10m"},
            # lab-pve2 takes 1 MiB/s: the migrated guest (1.25 MiB/s) overloads it.
            "capacity": {
                "disk_bytes": 4 * MIB,
                "disk_ops": 4 * MIB / block,
                "per_node": {"lab-pve2": {"disk_bytes": 1 * MIB, "disk_ops": MIB / block}},
            },
            "balance": {
                "cooldown_seconds": 600,
                "weights": {
                    "cpu": 1.0,
                    "memory": 0.0,
                    "disk_bytes": 2.0,
                    "disk_ops": 1.0,
                    "network": 0.0,
                },
            },
        },
    )


@dataclass
class LabRun:
    """What the CI lab observed; the tests below assert on it."""

    peer: PeerComparison
    migration: Migration
    rates: list[RateCheck]
    snapshot: dict[str, Any]
    plan: dict[str, Any]
    plan_without_cooldown: dict[str, Any]
    history: list[dict[str, Any]]
    pids: list[int]
    libvirt_root: Path
    seconds: float


def _guest_image() -> GuestImage:
    try:
        return ensure_guest(default_cache_dir(), timeout=120)
    except GuestBuildError as exc:
        pytest.fail(f"cannot build the lab guest (Debian kernel package via apt): {exc}")


@pytest.fixture(scope="module")
def lab_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabRun]:
    started = time.monotonic()
    image = _guest_image()
    out = tmp_path_factory.mktemp("lab")
    with Lab(ci_spec(), out, image) as lab:
        assert lab.libvirtd is not None and lab.peer_url is not None
        lab.wait_for_io(timeout=120)
        peer = compare_with_peer(
            lab.exporter_url("lab-libvirt"), lab.peer_url, rounds=6, pause=0.2, warmup=1
        )
        # The recommender must have seen the guest on lab-pve before it moves.
        lab.wait_history_step(lab.io_seen_at)
        migration = lab.migrate(MIGRATED, "lab-pve", "lab-pve2")
        config = lab.write_config("ci")
        nocooldown = lab.write_config("ci-no-cooldown", {"balance": {"cooldown_seconds": 0}})
        lab.wait_placed(MIGRATED, "lab-pve2", config, "ci", timeout=150)
        # Every guest's I/O fills the 1m window.
        time.sleep(max(0.0, lab.io_seen_at + 60 + 3 * INTERVAL - time.time()))
        snapshot_path, snapshot = lab.snapshot("ci", config)
        _, plan = lab.plan("ci", config, snapshot_path)
        _, free = lab.plan("ci-no-cooldown", nocooldown, snapshot_path)
        history = lab.node_history(MIGRATED, lab.started_at)
        pids = lab.pids()
        libvirt_root = lab.libvirtd.root
        rates = lab.rate_checks(snapshot)
    yield LabRun(
        peer=peer,
        migration=migration,
        rates=rates,
        snapshot=snapshot,
        plan=plan,
        plan_without_cooldown=free,
        history=history,
        pids=pids,
        libvirt_root=libvirt_root,
        seconds=time.monotonic() - started,
    )


@pytest.mark.slow
@needs_lab
def test_each_guest_disk_rate_in_the_snapshot_is_within_20_percent(lab_run: LabRun) -> None:
    for check in lab_run.rates:
        assert check.within(RATE_TOLERANCE), check.as_dict()
    assert {c.vm for c in lab_run.rates} == {"lab-db-1", MIGRATED}


@pytest.mark.slow
@needs_lab
def test_ours_and_the_peer_exporter_report_the_same_libvirt_counters(lab_run: LabRun) -> None:
    peer = lab_run.peer
    assert peer.keys == 5  # one domain, one disk: bytes and requests both ways, CPU time
    assert peer.agree, peer.as_dict()["violations"]


@pytest.mark.slow
@needs_lab
def test_a_live_migration_shows_as_a_node_change(lab_run: LabRun) -> None:
    assert lab_run.migration.target == "lab-pve2"
    assert lab_run.migration.total_time_ms > 0
    row = next(r for r in lab_run.snapshot["vms"] if r["vm"] == MIGRATED)
    assert row["node"] == "lab-pve2"
    assert row["last_migration"] is not None
    assert [h["node"] for h in lab_run.history][-2:] == ["lab-pve", "lab-pve2"]


@pytest.mark.slow
@needs_lab
def test_the_cooldown_keeps_the_migrated_vm_on_its_new_node(lab_run: LabRun) -> None:
    assert lab_run.plan["triggered"]
    assert MIGRATED not in [m["vm"] for m in lab_run.plan["migrations"]]
    held = [h for h in lab_run.plan["held_back"] if h["vm"] == MIGRATED]
    assert held and "cooldown" in held[0]["blocked_by"]
    # The same snapshot without a cooldown moves it: the cooldown is what holds it.
    assert MIGRATED in [m["vm"] for m in lab_run.plan_without_cooldown["migrations"]]


@pytest.mark.slow
@needs_lab
def test_the_lab_stops_everything_it_started(lab_run: LabRun) -> None:
    assert len(lab_run.pids) >= 8  # 3 exporters, peer, Prometheus, libvirtd, 2 QEMUs
    assert [pid for pid in lab_run.pids if _alive(pid)] == []
    assert not lab_run.libvirt_root.exists()


@pytest.mark.slow
@needs_lab
def test_a_lab_that_fails_while_starting_stops_what_it_started(tmp_path: Path) -> None:
    image = _guest_image()
    spec = LabSpec(
        guests=(
            LabGuest("lab-ok", "lab-libvirt", GuestLoad(write_kib=64)),
            LabGuest("301", "lab-pve", GuestLoad(write_kib=64)),
            LabGuest("302", "no-such-node", GuestLoad(write_kib=64)),
        ),
        pve_nodes=("lab-pve",),
        libvirt_node="lab-libvirt",
    )
    lab = Lab(spec, tmp_path, image)
    with pytest.raises(ValueError, match="no-such-node"):
        lab.__enter__()
    assert lab.libvirtd is not None and lab.libvirtd.service is not None
    assert not lab.libvirtd.service.running()
    assert not lab.libvirtd.root.exists()
    qemu = lab.pve["lab-pve"].guests["301"].vm
    assert qemu.process.poll() is not None
    # libvirt's QEMU for lab-ok (its command line names the daemon's directory) is gone too.
    assert _processes_mentioning(str(lab.libvirtd.root)) == []


def _alive(pid: int) -> bool:
    """Whether a process exists and has not exited (a zombie waiting for init has)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2 :].split()[0] not in ("Z", "X")


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if text.encode() in cmdline and _alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def test_the_lab_api_migrates_between_its_own_proxmox_like_nodes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The migrate endpoint's task runs the live migration between the lab's nodes, which
    the fake API's own node table (what ProxLB reads) does not replace."""
    import lab.pve_api
    from lab.pve_api import LabPveApi

    calls: list[tuple[object, str, object]] = []

    class Done:
        transferred_bytes = 8 * MIB
        downtime_ms = 12

        def as_dict(self) -> dict[str, object]:
            return {"vmid": MIGRATED}

    def migrate(source: object, vmid: str, target: object, *_: object) -> Done:
        calls.append((source, vmid, target))
        return Done()

    monkeypatch.setattr(lab.pve_api, "live_migrate", migrate)
    nodes: Any = {
        "pve-a": SimpleNamespace(guests={MIGRATED: object()}),
        "pve-b": SimpleNamespace(guests={}),
    }
    api = LabPveApi(nodes, Any, "secret", tmp_path)
    with api.lock:
        upid = api.start_task("pve-a", int(MIGRATED), "pve-b")
    deadline = time.monotonic() + 10
    while not api.tasks[upid].stopped and time.monotonic() < deadline:
        time.sleep(0.05)
    assert api.tasks[upid].exitstatus == "OK", api.tasks[upid].log
    assert calls == [(nodes["pve-a"], MIGRATED, nodes["pve-b"])]
    assert api.vms[int(MIGRATED)].node == "pve-b"
