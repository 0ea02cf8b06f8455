"""Host faults that must cost one VM (or `vmbalance_up 0`), never the scrape.

The exporter runs as operators run it and is scraped over HTTP; each fault is the real thing
where it can be made here: a FIFO stands in for a `.conf` on a hung pmxcfs, a fake QEMU that
accepts and never speaks for a hung QMP monitor, a VM name with a lone surrogate as QMP can
send it, a libvirtd that is not running yet and then is.
"""

from __future__ import annotations

import os
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from exporter.qmp import QmpBackend
from tests.conftest import ExporterProcess, start_exporter
from tests.fake_qmp import FakeQmpServer, FakeVM

TIMEOUT = 2.0
MARGIN = 0.5


def scrape(exporter: ExporterProcess, openmetrics: bool = False) -> tuple[float, str]:
    request = urllib.request.Request(f"http://{exporter.address}/metrics")
    if openmetrics:
        request.add_header("Accept", "application/openmetrics-text; version=1.0.0")
    started = time.monotonic()
    with urllib.request.urlopen(request, timeout=30) as response:
        body = response.read()
        assert response.status == 200
    return time.monotonic() - started, body.decode("utf-8")


def samples(body: str) -> list:
    return [s for f in text_string_to_metric_families(body) for s in f.samples]


def value(body: str, name: str, **labels: str) -> float:
    for sample in samples(body):
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
            return sample.value
    raise AssertionError(f"no {name} {labels}")


def published_vms(body: str) -> dict[str, str]:
    return {
        s.labels["vm"]: s.labels["name"] for s in samples(body) if s.name == "vmbalance_vm_info"
    }


class PveNode:
    """A Proxmox-like node: run dir with pid files naming this live process, config dir."""

    def __init__(self, root: Path) -> None:
        self.run = root / "run"
        self.conf = root / "conf"
        for path in (self.run, self.conf):
            path.mkdir(parents=True)
        self.fifos: list[Path] = []

    def vm(self, vmid: str, conf: str | None = None) -> None:
        (self.run / f"{vmid}.pid").write_text(f"{os.getpid()}\n")
        if conf is not None:
            (self.conf / f"{vmid}.conf").write_text(conf)

    def hang_conf(self, vmid: str) -> None:
        """Replace the VM's `.conf` with a FIFO: opening it blocks like a hung pmxcfs read."""
        path = self.conf / f"{vmid}.conf"
        path.unlink(missing_ok=True)
        os.mkfifo(path)
        self.fifos.append(path)

    def release(self) -> None:
        """Let every read stuck on a FIFO finish."""
        for fifo in self.fifos:
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                continue
            os.close(fd)

    def exporter_args(self) -> list[str]:
        return ["--backend", "qmp", "--qmp-run-dir", str(self.run), "--pve-conf-dir",
                str(self.conf), "--timeout", str(TIMEOUT), "--node-name", "pve-test"]  # fmt: skip


@pytest.fixture
def pve(tmp_path: Path) -> Iterator[PveNode]:
    node = PveNode(tmp_path / "node")
    yield node
    node.release()


@pytest.fixture
def started(tmp_path: Path) -> Iterator[list]:
    """Fake QMP servers and exporters the test starts; all stopped afterwards."""
    things: list = []
    yield things
    for thing in reversed(things):
        thing.stop()


def log_lines(exporter: ExporterProcess, text: str) -> list[str]:
    return [line for line in exporter.log.read_text().splitlines() if text in line]


RUNBOOK = Path(__file__).resolve().parent.parent / "docs" / "runbook.md"


def assert_runbook_shows(exporter: ExporterProcess, before_id: str, after_id: str) -> None:
    """The runbook's example of a log line is the line the exporter writes, but for the time,
    the VM id and anything after the reason's first words."""

    def shape(line: str) -> str:
        message = line.split(" ", 2)[2]  # drop date and time
        head, _, rest = message.partition(before_id)
        _vm, _, tail = rest.partition(" ")
        return head + before_id + "<vm> " + tail

    logged = {shape(line) for line in exporter.log.read_text().splitlines() if after_id in line}
    shown = {shape(line) for line in RUNBOOK.read_text().splitlines() if after_id in line}
    assert logged and shown & logged, (shown, logged)


@pytest.mark.slow
def test_a_hung_conf_costs_its_vm_and_a_hung_qmp_socket_costs_its_vm(
    pve: PveNode, started: list, tmp_path: Path
) -> None:
    vms = [FakeVM("100"), FakeVM("101"), FakeVM("102"), FakeVM("103", silent=True)]
    started.append(FakeQmpServer(pve.run, vms).start())
    pve.vm("100", "name: web-1\nmemory: 2048\n")
    pve.vm("101", "name: db-1\nmemory: 2048\n")
    pve.vm("102", "name: db-2\nmemory: 2048\n")
    pve.vm("103", "name: stuck-1\nmemory: 2048\n")
    pve.hang_conf("101")  # hung from the start: nothing good to fall back on
    exporter = start_exporter(pve.exporter_args(), tmp_path / "exporter.log")
    started.append(exporter)

    elapsed, body = scrape(exporter)
    assert elapsed <= TIMEOUT + MARGIN
    assert published_vms(body) == {"100": "web-1", "102": "db-2"}
    assert value(body, "vmbalance_up") == 1
    assert value(body, "vmbalance_vm_scrape_errors_total") == 2
    assert value(body, "vmbalance_read_timeouts_total", source="conf") == 1
    assert value(body, "vmbalance_read_timeouts_total", source="qmp") == 1

    # A .conf that hangs after a good read: the VM stays, with its last good facts.
    pve.hang_conf("102")
    for _ in range(3):
        elapsed, body = scrape(exporter)
        assert elapsed <= TIMEOUT + MARGIN
        assert published_vms(body) == {"100": "web-1", "102": "db-2"}
    assert value(body, "vmbalance_vm_scrape_errors_total") == 2 * 4
    assert value(body, "vmbalance_read_timeouts_total", source="conf") == 4 + 3
    assert value(body, "vmbalance_read_timeouts_total", source="qmp") == 4

    # Each skipped VM is one WARNING with its id and reason, not one per scrape.
    assert len(log_lines(exporter, "VM 101 skipped: its .conf did not answer in time")) == 1
    assert len(log_lines(exporter, "VM 103 skipped: its QMP socket did not answer in time")) == 1
    assert all("WARNING" in line for line in log_lines(exporter, "skipped"))
    assert not log_lines(exporter, "Traceback")
    assert_runbook_shows(exporter, "WARNING exporter.qmp: VM ", " skipped: its QMP socket")
    assert_runbook_shows(exporter, "WARNING exporter.qmp: VM ", " skipped: its .conf")

    # Read again once the file answers: one INFO line.
    pve.release()
    (pve.conf / "101.conf").unlink()
    (pve.conf / "101.conf").write_text("name: db-1\nmemory: 2048\n")
    time.sleep(0.2)
    _, body = scrape(exporter)
    assert published_vms(body) == {"100": "web-1", "101": "db-1", "102": "db-2"}
    assert len(log_lines(exporter, "VM 101 read again")) == 1
    assert_runbook_shows(exporter, "INFO exporter.qmp: VM ", " read again")


@pytest.mark.slow
def test_a_lone_surrogate_in_a_vm_name_is_replaced_in_both_formats(
    pve: PveNode, started: list, tmp_path: Path
) -> None:
    vms = [FakeVM("200", name="bad\udc80name"), FakeVM("201")]
    started.append(FakeQmpServer(pve.run, vms).start())
    pve.vm("200", "memory: 1024\n")  # no name: QMP's query-name gives it
    pve.vm("201", "name: fine\nmemory: 1024\n")
    exporter = start_exporter(pve.exporter_args(), tmp_path / "exporter.log")
    started.append(exporter)

    elapsed, text = scrape(exporter)
    assert elapsed <= TIMEOUT + MARGIN
    assert published_vms(text) == {"200": "bad\ufffdname", "201": "fine"}
    _, openmetrics = scrape(exporter, openmetrics=True)
    info = next(f for f in openmetrics_families(openmetrics) if f.name == "vmbalance_vm_info")
    assert {s.labels["vm"]: s.labels["name"] for s in info.samples} == {
        "200": "bad\ufffdname",
        "201": "fine",
    }
    assert value(text, "vmbalance_vm_scrape_errors_total") == 0


def test_a_hung_config_tree_is_vmbalance_up_0_in_time(tmp_path: Path) -> None:
    """pmxcfs without quorum hangs every stat under /etc/pve; a stat cannot be made to hang
    here on demand, so the backend's probe of the tree is the part replaced."""
    node = PveNode(tmp_path)
    node.vm("300", "name: a\n")
    backend = QmpBackend(run_dir=str(node.run), conf_dir=str(node.conf))
    release = threading.Event()
    backend._probe_conf_dir = lambda: release.wait(30)  # type: ignore[method-assign]
    try:
        for _ in range(2):
            started = time.monotonic()
            result = backend.scrape(timeout=TIMEOUT)
            assert time.monotonic() - started <= TIMEOUT + MARGIN
            assert not result.up and "config tree" in (result.error or "")
            assert result.read_timeouts == {"conf": 1}
    finally:
        release.set()


@pytest.mark.slow
def test_libvirt_unreachable_at_start_then_started(tmp_path: Path, started: list) -> None:
    from lab.libvirt_node import PrivateLibvirtd

    link = tmp_path / "libvirt-sock"  # the daemon's socket, once there is one
    uri = f"qemu+unix:///session?socket={link}"
    exporter = start_exporter(
        ["--backend", "libvirt", "--libvirt-uri", uri, "--timeout", str(TIMEOUT)],
        tmp_path / "exporter.log",
    )
    started.append(exporter)
    for _ in range(2):
        elapsed, body = scrape(exporter)
        assert elapsed <= TIMEOUT + MARGIN
        assert value(body, "vmbalance_up") == 0
    assert exporter.process.poll() is None

    daemon = PrivateLibvirtd(tmp_path / "libvirtd-logs")
    (tmp_path / "libvirtd-logs").mkdir()
    daemon.start()
    started.append(daemon)
    link.symlink_to(daemon.socket)
    deadline = time.monotonic() + 30
    while True:
        elapsed, body = scrape(exporter)
        assert elapsed <= TIMEOUT + MARGIN
        if value(body, "vmbalance_up") == 1:
            break
        assert time.monotonic() < deadline, "the exporter never connected"
        time.sleep(0.5)
    # Down for the same reason over several scrapes: one WARNING (a daemon still starting
    # may add its own reason before it answers); back up: one INFO.
    assert len(log_lines(exporter, "backend down: libvirt: cannot connect")) == 1
    assert all("WARNING" in line for line in log_lines(exporter, "backend down:"))
    assert len(log_lines(exporter, "backend answers again")) == 1


def test_a_config_tree_hung_at_start_does_not_hang_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import exporter.qmp as qmp

    node = PveNode(tmp_path)
    release = threading.Event()
    real = qmp.can_list

    def hung_conf_dir(path: str) -> None:
        if path == str(node.conf):
            release.wait(30)
        real(path)

    monkeypatch.setattr(qmp, "can_list", hung_conf_dir)
    monkeypatch.setattr(qmp, "_START_PROBE", 0.3)
    try:
        started = time.monotonic()
        QmpBackend(run_dir=str(node.run), conf_dir=str(node.conf))
        assert time.monotonic() - started < 1.0
    finally:
        release.set()


def test_start_reads_of_a_hung_pve_tree_are_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/etc/pve/local and the config dir are read at start; a hung pmxcfs must not hang it."""
    import argparse
    import socket

    import exporter.cli as cli

    release = threading.Event()
    hung = str(tmp_path / "pve")
    real_readlink, real_isdir = os.readlink, os.path.isdir

    def readlink(path: str, *args: object, **kwargs: object) -> str:
        if str(path).startswith(hung):
            release.wait(30)
        return real_readlink(path, *args, **kwargs)

    def isdir(path: str) -> bool:
        if str(path).startswith(hung):
            release.wait(30)
        return real_isdir(path)

    monkeypatch.setattr(os, "readlink", readlink)
    monkeypatch.setattr(os.path, "isdir", isdir)
    monkeypatch.setattr(cli, "START_READ_TIMEOUT", 0.3)
    try:
        started = time.monotonic()
        assert cli.default_node_name(hung + "/local") == socket.gethostname().split(".")[0]
        args = argparse.Namespace(backend="auto", pve_conf_dir=hung + "/qemu-server")
        assert cli.choose_backend(args) == "qmp"
        assert time.monotonic() - started < 1.5
    finally:
        release.set()


def test_a_hung_sysfs_read_costs_its_vm_and_is_blamed_on_sysfs(
    pve: PveNode, started: list, tmp_path: Path
) -> None:
    net = tmp_path / "net"
    for vmid in ("400", "401"):
        stats = net / f"tap{vmid}i0" / "statistics"
        stats.mkdir(parents=True)
        (stats / "tx_bytes").write_text("7\n")
        if vmid == "401":
            os.mkfifo(stats / "rx_bytes")  # a counter file that never answers
            pve.fifos.append(stats / "rx_bytes")
        else:
            (stats / "rx_bytes").write_text("5\n")
    started.append(FakeQmpServer(pve.run, [FakeVM("400"), FakeVM("401")]).start())
    pve.vm("400", "name: a\nnet0: virtio=AA:BB:CC:DD:EE:00,bridge=vmbr0\n")
    pve.vm("401", "name: b\nnet0: virtio=AA:BB:CC:DD:EE:01,bridge=vmbr0\n")
    backend = QmpBackend(run_dir=str(pve.run), conf_dir=str(pve.conf), net_root=str(net))
    for _ in range(2):  # the second time the read is still stuck from the first
        began = time.monotonic()
        result = backend.scrape(timeout=TIMEOUT)
        assert time.monotonic() - began <= TIMEOUT + MARGIN
        assert [vm.vm for vm in result.vms] == ["400"]
        assert result.vms[0].interfaces[0].receive_bytes == 7  # the tap's tx is the guest's rx
        assert result.skipped == {"401": "its tap devices in sysfs did not answer in time"}
        assert result.read_timeouts == {"sysfs": 1}
