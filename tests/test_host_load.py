"""Host load beside VM load: real prometheus-node-exporter (on a fake /proc whose CPU, NIC and
pressure counters the test advances: node_exporter's own parsers on controlled input) and
vmbalance exporters on libvirt test-driver nodes, scraped by a real Prometheus with the
node_exporter job from docs/deploy.md, used verbatim."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from devkit.libvirt_nodexml import IMAGES, write_node_xml
from devkit.servers import PrometheusServer
from devkit.service import Service, accepts_tcp, free_port
from recommender.config import Config
from recommender.model import Snapshot
from recommender.source.host import VM_LOAD_ONLY
from recommender.source.prometheus import PrometheusSource
from tests.conftest import REPO

pytestmark = pytest.mark.slow

NODE_EXPORTER = shutil.which("prometheus-node-exporter") or "/usr/bin/prometheus-node-exporter"
CPUS = 16
USER_HZ = 100
# Cores busy outside any VM on each node: kvm2 runs "Ceph" past the CPU headroom (85 %).
HOST_BUSY = {"kvm1": 0.0, "kvm2": 14.0, "kvm3": 0.0}
WAIT_SECONDS = 20
CONFIG = "query:\n  window: 2m\n  short_window: 70s\n  history: 5m\n"


def node_job_from_docs() -> dict[str, Any]:
    """The `job_name: node` scrape job of docs/deploy.md, as the doc writes it."""
    text = (REPO / "docs" / "deploy.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```yaml\n(.*?)```", text, re.DOTALL)
    jobs = [yaml.safe_load(b) for b in blocks if "job_name: node\n" in b]
    assert len(jobs) == 1, "docs/deploy.md must show one node_exporter job"
    (job,) = jobs[0]
    assert job["relabel_configs"], "the job joins node_exporter to the node label"
    return dict(job)


@dataclass(frozen=True)
class HostLoad:
    """What a fake host does besides its VMs: cores busy, bytes/s on eth0 (received and sent
    alike) and the "some" stall share of each PSI kind."""

    busy: float = 0.0
    nic_bytes_per_second: float = 0.0
    pressure: Mapping[str, float] = field(default_factory=dict)


class FakeProc:
    """A /proc whose per-CPU counters, `net/dev` bytes and `pressure/*` stall totals advance
    as the host's `HostLoad` says."""

    def __init__(self, root: Path, load: HostLoad | float) -> None:
        self.root = root
        self.load = load if isinstance(load, HostLoad) else HostLoad(busy=load)
        self.busy = self.load.busy
        (root / "proc" / "pressure").mkdir(parents=True)
        (root / "proc" / "net").mkdir()
        (root / "sys").mkdir()
        self.ticks = [[1000.0, 0.0, 500.0, 90000.0, 10.0] for _ in range(CPUS)]
        self.nic_bytes = 1e9
        self.stalled_us = dict.fromkeys(("cpu", "memory", "io"), 5e6)
        self.write()

    def advance(self, seconds: float) -> None:
        per_cpu_busy = self.busy / CPUS
        for cpu in self.ticks:
            cpu[0] += per_cpu_busy * seconds * USER_HZ
            cpu[3] += (1 - per_cpu_busy) * seconds * USER_HZ
        self.nic_bytes += self.load.nic_bytes_per_second * seconds
        for kind in self.stalled_us:
            self.stalled_us[kind] += self.load.pressure.get(kind, 0.0) * seconds * 1e6
        self.write()

    def _replace(self, relative: str, text: str) -> None:
        path = self.root / "proc" / relative
        path.with_suffix(".new").write_text(text)
        path.with_suffix(".new").replace(path)

    def write(self) -> None:
        self._write_stat()
        nic = int(self.nic_bytes)
        self._replace(
            "net/dev",
            "Inter-|   Receive                            |  Transmit\n"
            " face |bytes packets errs drop fifo frame compressed multicast|bytes packets errs "
            "drop fifo colls carrier compressed\n"
            f"  eth0: {nic} {nic // 1500} 0 0 0 0 0 0 {nic} {nic // 1500} 0 0 0 0 0 0\n"
            "    lo: 1000 10 0 0 0 0 0 0 1000 10 0 0 0 0 0 0\n",
        )
        for kind, total in self.stalled_us.items():
            some = "some avg10=0.00 avg60=0.00 avg300=0.00"
            full = "full avg10=0.00 avg60=0.00 avg300=0.00 total=0"
            self._replace(f"pressure/{kind}", f"{some} total={int(total)}\n{full}\n")

    def _write_stat(self) -> None:
        def line(name: str, t: list[float]) -> str:
            user, nice, system, idle, iowait = (int(v) for v in t)
            return f"{name} {user} {nice} {system} {idle} {iowait} 0 0 0 0 0"

        total = [sum(col) for col in zip(*self.ticks, strict=True)]
        lines = [line("cpu ", total), *(line(f"cpu{i}", t) for i, t in enumerate(self.ticks))]
        lines += ["intr 0", "ctxt 0", "btime 1700000000", "processes 1", "procs_running 1"]
        path = self.root / "proc" / "stat"
        path.with_suffix(".new").write_text("\n".join(lines) + "\n")
        path.with_suffix(".new").replace(path)


@pytest.fixture
def node_exporters(tmp_path: Path) -> Iterator[Callable[[Mapping[str, HostLoad]], dict[str, int]]]:
    """Starts one node_exporter per node on its fake /proc (cpu, netdev read from /proc/net/dev,
    pressure collectors); node -> port. All are stopped at the end."""
    procs: dict[str, FakeProc] = {}
    stop = threading.Event()
    services: list[Service] = []

    def tick() -> None:
        last = time.monotonic()
        while not stop.wait(0.25):
            now = time.monotonic()
            for proc in list(procs.values()):
                proc.advance(now - last)
            last = now

    ticker = threading.Thread(target=tick, daemon=True)

    def start(loads: Mapping[str, HostLoad]) -> dict[str, int]:
        ports = {}
        for node, load in loads.items():
            proc = procs[node] = FakeProc(tmp_path / f"host-{node}", load)
            port = free_port()
            argv = [
                NODE_EXPORTER,
                f"--path.procfs={proc.root / 'proc'}",
                f"--path.sysfs={proc.root / 'sys'}",
                f"--path.rootfs={proc.root}",
                "--collector.disable-defaults",
                "--collector.cpu",
                "--collector.netdev",
                "--no-collector.netdev.netlink",
                "--collector.pressure",
                f"--web.listen-address=127.0.0.1:{port}",
            ]
            service = Service("node-exporter", argv, tmp_path / f"node-exporter-{node}.log")
            services.append(service.start())
            service.wait_ready(lambda p=port: accepts_tcp(p), 20)
            ports[node] = port
        if not ticker.is_alive():
            ticker.start()
        return ports

    try:
        yield start
    finally:
        stop.set()
        if ticker.is_alive():
            ticker.join()
        for service in services:
            service.stop()


@pytest.fixture
def hosts(node_exporters: Callable[[Mapping[str, HostLoad]], dict[str, int]]) -> dict[str, int]:
    """One node_exporter per node of `HOST_BUSY`; node -> port."""
    return node_exporters({node: HostLoad(busy=busy) for node, busy in HOST_BUSY.items()})


def _plan(config: Path, url: str) -> tuple[dict[str, Any], list[str]]:
    """The JSON plan and the stderr lines."""
    result = subprocess.run(
        [sys.executable, "-m", "recommender.cli", "plan", "-c", str(config),
         "--prometheus-url", url, "--output", "json"],
        capture_output=True, text=True, timeout=120, cwd=REPO, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout)), result.stderr.splitlines()


def _node_xml(tmp_path: Path, node: str, n_vms: int) -> str:
    """A test-driver node of `n_vms` domains named `<node>-vm0000`…, so no two nodes share a
    VM id; the `test:///` URI."""
    uri = write_node_xml(tmp_path / f"{node}.xml", n_vms=n_vms, node_cpus=CPUS)
    path = tmp_path / f"{node}.xml"
    path.write_text(path.read_text().replace("<name>vm", f"<name>{node}-vm"))
    return uri


@dataclass
class Scraped:
    snapshot: Snapshot
    plans: dict[str, tuple[dict[str, Any], list[str]]]


def _scrape_and_plan(
    tmp_path: Path,
    exporter_factory: Any,
    node_xml: Mapping[str, str],
    ports: Mapping[str, int],
    configs: Mapping[str, str],
) -> Scraped:
    """vmbalance exporters on the nodes and the node_exporters at `ports`, scraped by a real
    Prometheus with the documented node job; after `WAIT_SECONDS` the snapshot of the first
    config and a JSON plan per config."""
    # The test driver's disk files stand for shared storage, as on a Ceph-backed cluster.
    args = ("--backend", "libvirt", "--shared-path", IMAGES)
    exporters = [
        exporter_factory(*args, "--libvirt-uri", uri, "--node-name", node)
        for node, uri in node_xml.items()
    ]
    vmbalance = {
        "job_name": "vmbalance",
        "scrape_interval": "1s",
        "static_configs": [{"targets": [e.address for e in exporters]}],
    }
    # The documented job, its targets named as the doc names them ("<node>:<port>"); only
    # then the address is pointed at loopback, after the documented relabelling ran.
    node_job = node_job_from_docs()
    node_job["scrape_interval"] = "1s"
    node_job["static_configs"] = [{"targets": [f"{n}:{p}" for n, p in ports.items()]}]
    node_job["relabel_configs"] = [
        *node_job["relabel_configs"],
        {
            "source_labels": ["__address__"],
            "regex": ".+:([0-9]+)",
            "target_label": "__address__",
            "replacement": "127.0.0.1:$1",
        },
    ]
    paths = {}
    for name, text in configs.items():
        paths[name] = tmp_path / f"{name}.yaml"
        paths[name].write_text(text)
    targets = len(node_xml) + len(ports)
    with PrometheusServer(tmp_path, scrape_configs=[vmbalance, node_job]) as prometheus:
        prometheus.wait_for(
            "up", lambda r: len(r) == targets and all(s["value"][1] == "1" for s in r)
        )
        time.sleep(WAIT_SECONDS)
        first = next(iter(configs.values()))
        loaded = Config.model_validate(
            {**yaml.safe_load(first), "prometheus": {"url": prometheus.url}}
        )
        snapshot = PrometheusSource(loaded.prometheus).build_snapshot(loaded, datetime.now(UTC))
        plans = {name: _plan(path, prometheus.url) for name, path in paths.items()}
    return Scraped(snapshot, plans)


def test_a_node_busy_outside_its_vms_is_not_a_target(
    tmp_path: Path, exporter_factory: Any, hosts: dict[str, int]
) -> None:
    node_xml = {
        "kvm1": write_node_xml(tmp_path / "kvm1.xml", n_vms=6, node_cpus=CPUS),
        "kvm2": write_node_xml(tmp_path / "kvm2.xml", n_vms=0, node_cpus=CPUS),
        "kvm3": write_node_xml(tmp_path / "kvm3.xml", n_vms=0, node_cpus=CPUS),
    }
    configs = {"vmbalance": CONFIG, "vm-only": CONFIG + "host:\n  cpu: false\n"}
    scraped = _scrape_and_plan(tmp_path, exporter_factory, node_xml, hosts, configs)
    snapshot = scraped.snapshot
    plan, stderr = scraped.plans["vmbalance"]
    plan_vm_only, stderr_vm_only = scraped.plans["vm-only"]

    background = snapshot.nodes["background_cpu"]
    assert background["kvm2"] == pytest.approx(HOST_BUSY["kvm2"], rel=0.1)
    assert background["kvm3"] == pytest.approx(0.0, abs=0.2)
    assert background.min() >= 0.0
    assert VM_LOAD_ONLY not in snapshot.warnings

    moved = plan["migrations"]
    why = ("explanation", "immovable", "held_back", "unplaceable", "warnings", "frontier")
    assert moved, {key: plan.get(key) for key in why}
    assert all(m["source"] == "kvm1" and m["target"] == "kvm3" for m in moved)
    nodes = {node["node"]: node for node in plan["nodes"]}
    assert nodes["kvm2"]["resources"]["cpu"]["load_before"] == pytest.approx(14.0, rel=0.1)
    # The same cluster planned on VM load alone sends VMs to the busy node too, and says so.
    assert any(m["target"] == "kvm2" for m in plan_vm_only["migrations"]), plan_vm_only
    assert f"warning: {VM_LOAD_ONLY}" in stderr_vm_only
    assert f"warning: {VM_LOAD_ONLY}" not in stderr


# kvm2's eth0 carries Ceph replication, 1 MB/s each way: far more than its one VM (the test
# driver's NIC counters grow by about 0.2 MB/s), and 80 % of the 2.5 MB/s the config gives a
# node's NIC, so that the VMs' traffic counts too.
CEPH_NIC = 1.0e6
NIC_CONFIG = CONFIG + "capacity:\n  network: 2.5e6\n"


def test_nic_traffic_beyond_the_vms_is_background_and_keeps_the_node_from_being_a_target(
    tmp_path: Path,
    exporter_factory: Any,
    node_exporters: Callable[[Mapping[str, HostLoad]], dict[str, int]],
) -> None:
    ports = node_exporters(
        {"kvm1": HostLoad(), "kvm2": HostLoad(nic_bytes_per_second=CEPH_NIC), "kvm3": HostLoad()}
    )
    node_xml = {node: _node_xml(tmp_path, node, n) for node, n in (("kvm1", 6), ("kvm2", 1),
                                                                   ("kvm3", 0))}  # fmt: skip
    nic = NIC_CONFIG + "host:\n  interfaces: [eth0]\n"
    configs = {"nic": nic, "vm-nic-only": NIC_CONFIG}
    scraped = _scrape_and_plan(tmp_path, exporter_factory, node_xml, ports, configs)
    nodes, vms = scraped.snapshot.nodes, scraped.snapshot.vms

    vm_network = vms.groupby("node")["network"].sum()
    assert 0 < vm_network["kvm2"] < CEPH_NIC / 2, "the VM sends a little"
    # Host bytes (received + sent) less what its VM sent and received.
    expected = 2 * CEPH_NIC - vm_network["kvm2"]
    assert nodes.loc["kvm2", "background_network"] == pytest.approx(expected, rel=0.05)
    assert nodes.loc["kvm1", "background_network"] == 0.0  # its NIC carried less than its VMs
    assert nodes.loc["kvm3", "background_network"] == 0.0

    plan, _ = scraped.plans["nic"]
    moved = plan["migrations"]
    assert moved, plan
    shown = [(m["vm"], m["source"], m["target"], m["reason"]) for m in moved]
    assert all(m["target"] == "kvm3" for m in moved), (shown, plan["nodes"])
    assert any(m["source"] == "kvm1" for m in moved), moved
    by_node = {node["node"]: node for node in plan["nodes"]}
    network = by_node["kvm2"]["resources"]["network"]
    assert network["load_before"] == pytest.approx(2 * CEPH_NIC, rel=0.05)
    # Without the interface the same cluster sends VMs to the node whose NIC is busy.
    plan_vm_only, _ = scraped.plans["vm-nic-only"]
    assert any(m["target"] == "kvm2" for m in plan_vm_only["migrations"]), plan_vm_only


PSI = {"kvm1": {"cpu": 0.45, "memory": 0.02, "io": 0.10}, "kvm2": {"cpu": 0.02}, "kvm3": {}}


def test_node_pressure_is_in_the_snapshot_triggers_a_plan_and_weighs_when_asked(
    tmp_path: Path,
    exporter_factory: Any,
    node_exporters: Callable[[Mapping[str, HostLoad]], dict[str, int]],
) -> None:
    ports = node_exporters({node: HostLoad(pressure=psi) for node, psi in PSI.items()})
    # Two VMs on every node: balanced, so only pressure can make the run plan.
    node_xml = {node: _node_xml(tmp_path, node, 2) for node in PSI}
    trigger = CONFIG + "host:\n  pressure_trigger: {cpu: 0.30}\n"
    weighted = trigger + "balance:\n  weights: {cpu: 1, memory: 1, network: 1, pressure: 8}\n"
    configs = {"quiet": CONFIG, "trigger": trigger, "weighted": weighted}
    scraped = _scrape_and_plan(tmp_path, exporter_factory, node_xml, ports, configs)
    nodes = scraped.snapshot.nodes

    for node, psi in PSI.items():
        for kind in ("cpu", "memory", "io"):
            assert nodes.loc[node, f"pressure_{kind}"] == pytest.approx(
                psi.get(kind, 0.0), abs=0.01
            ), (node, kind)

    quiet, _ = scraped.plans["quiet"]
    assert not quiet["triggered"] and quiet["pressure_trigger"] == []
    assert {n["node"]: n["pressure"]["cpu"] for n in quiet["nodes"]}["kvm1"] == pytest.approx(
        0.45, abs=0.01
    )
    assert quiet["settings"]["host"]["pressure"] == ["cpu", "memory", "io"]
    assert "pressure" not in quiet["nodes"][0]["resources"]  # not weighed by default

    triggered, _ = scraped.plans["trigger"]
    assert triggered["triggered"]
    (over,) = triggered["pressure_trigger"]
    assert (over["node"], over["kind"], over["threshold"]) == ("kvm1", "cpu", 0.3)
    assert over["share"] == pytest.approx(0.45, abs=0.01)
    assert triggered["settings"]["host"]["pressure_trigger"] == {"cpu": 0.3}

    plan, _ = scraped.plans["weighted"]
    assert plan["triggered"] and plan["settings"]["balance"]["weights"]["pressure"] == 8
    by_node = {n["node"]: n for n in plan["nodes"]}
    pressure = by_node["kvm1"]["resources"]["pressure"]
    assert pressure["capacity"] == 3.0
    assert pressure["load_before"] == pytest.approx(0.57, abs=0.03)
    assert plan["migrations"], plan
    assert all(m["source"] == "kvm1" for m in plan["migrations"]), plan["migrations"]
    assert pressure["load_after"] < pressure["load_before"]


def _stalled_seconds() -> dict[str, float]:
    """The "some" stall totals of this machine's /proc/pressure, in seconds."""
    totals = {}
    for kind in ("cpu", "memory", "io"):
        some = Path(f"/proc/pressure/{kind}").read_text().splitlines()[0]
        totals[kind] = int(some.rsplit("total=", 1)[1]) / 1e6
    return totals


@pytest.mark.skipif(not Path("/proc/pressure/cpu").exists(), reason="kernel without PSI")
def test_pressure_from_a_node_exporter_on_this_machines_own_proc(
    tmp_path: Path, exporter_factory: Any
) -> None:
    """node_exporter with its default collectors on the real /proc: the snapshot's pressure
    is the share of time this machine's own /proc/pressure counted as stalled meanwhile."""
    port = free_port()
    argv = [NODE_EXPORTER, f"--web.listen-address=127.0.0.1:{port}"]
    service = Service("node-exporter", argv, tmp_path / "node-exporter.log").start()
    try:
        service.wait_ready(lambda: accepts_tcp(port), 20)
        before, started = _stalled_seconds(), time.monotonic()
        scraped = _scrape_and_plan(
            tmp_path, exporter_factory, {"kvm1": _node_xml(tmp_path, "kvm1", 2)},
            {"kvm1": port}, {"quiet": CONFIG},
        )  # fmt: skip
        after, seconds = _stalled_seconds(), time.monotonic() - started
    finally:
        service.stop()
    nodes = scraped.snapshot.nodes
    for kind in ("cpu", "memory", "io"):
        share = nodes.loc["kvm1", f"pressure_{kind}"]
        assert 0.0 <= share <= 1.0, (kind, share)
        assert share == pytest.approx((after[kind] - before[kind]) / seconds, abs=0.1), kind
    plan, _ = scraped.plans["quiet"]
    assert plan["nodes"][0]["pressure"]["cpu"] == pytest.approx(
        nodes.loc["kvm1", "pressure_cpu"], abs=0.1
    )
