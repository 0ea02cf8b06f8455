"""Host load beside VM load: real prometheus-node-exporter (on a fake /proc whose CPU counters
the test advances) and vmbalance exporters on libvirt test-driver nodes, scraped by a real
Prometheus with the node_exporter job from docs/deploy.md, used verbatim."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from devkit.libvirt_nodexml import IMAGES, write_node_xml
from devkit.servers import PrometheusServer
from devkit.service import Service, accepts_tcp, free_port
from recommender.config import Config
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


class FakeProc:
    """A /proc/stat whose per-CPU counters advance as a host `busy` cores busy would."""

    def __init__(self, root: Path, busy: float) -> None:
        self.root, self.busy = root, busy
        (root / "proc").mkdir(parents=True)
        (root / "sys").mkdir()
        self.ticks = [[1000.0, 0.0, 500.0, 90000.0, 10.0] for _ in range(CPUS)]
        self.write()

    def advance(self, seconds: float) -> None:
        per_cpu_busy = self.busy / CPUS
        for cpu in self.ticks:
            cpu[0] += per_cpu_busy * seconds * USER_HZ
            cpu[3] += (1 - per_cpu_busy) * seconds * USER_HZ
        self.write()

    def write(self) -> None:
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
def hosts(tmp_path: Path) -> Iterator[dict[str, int]]:
    """One node_exporter per node on its fake /proc; node -> port."""
    procs = {node: FakeProc(tmp_path / f"host-{node}", busy) for node, busy in HOST_BUSY.items()}
    stop = threading.Event()

    def tick() -> None:
        last = time.monotonic()
        while not stop.wait(0.25):
            now = time.monotonic()
            for proc in procs.values():
                proc.advance(now - last)
            last = now

    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    services, ports = [], {}
    try:
        for node, proc in procs.items():
            port = free_port()
            argv = [
                NODE_EXPORTER,
                f"--path.procfs={proc.root / 'proc'}",
                f"--path.sysfs={proc.root / 'sys'}",
                f"--path.rootfs={proc.root}",
                "--collector.disable-defaults",
                "--collector.cpu",
                f"--web.listen-address=127.0.0.1:{port}",
            ]
            service = Service("node-exporter", argv, tmp_path / f"node-exporter-{node}.log")
            services.append(service.start())
            service.wait_ready(lambda p=port: accepts_tcp(p), 20)
            ports[node] = port
        yield ports
    finally:
        stop.set()
        ticker.join()
        for service in services:
            service.stop()


def _plan(config: Path, url: str) -> tuple[dict[str, Any], list[str]]:
    """The JSON plan and the stderr lines."""
    result = subprocess.run(
        [sys.executable, "-m", "recommender.cli", "plan", "-c", str(config),
         "--prometheus-url", url, "--output", "json"],
        capture_output=True, text=True, timeout=120, cwd=REPO, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout)), result.stderr.splitlines()


def test_a_node_busy_outside_its_vms_is_not_a_target(
    tmp_path: Path, exporter_factory: Any, hosts: dict[str, int]
) -> None:
    node_xml = {
        "kvm1": write_node_xml(tmp_path / "kvm1.xml", n_vms=6, node_cpus=CPUS),
        "kvm2": write_node_xml(tmp_path / "kvm2.xml", n_vms=0, node_cpus=CPUS),
        "kvm3": write_node_xml(tmp_path / "kvm3.xml", n_vms=0, node_cpus=CPUS),
    }
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
    node_job["static_configs"] = [{"targets": [f"{n}:{p}" for n, p in hosts.items()]}]
    node_job["relabel_configs"] = [
        *node_job["relabel_configs"],
        {
            "source_labels": ["__address__"],
            "regex": ".+:([0-9]+)",
            "target_label": "__address__",
            "replacement": "127.0.0.1:$1",
        },
    ]
    config = tmp_path / "vmbalance.yaml"
    config.write_text(CONFIG)
    vm_only = tmp_path / "vm-only.yaml"
    vm_only.write_text(CONFIG + "host:\n  cpu: false\n")
    with PrometheusServer(tmp_path, scrape_configs=[vmbalance, node_job]) as prometheus:
        prometheus.wait_for("up", lambda r: len(r) == 6 and all(s["value"][1] == "1" for s in r))
        time.sleep(WAIT_SECONDS)
        loaded = Config.model_validate(
            {**yaml.safe_load(CONFIG), "prometheus": {"url": prometheus.url}}
        )
        snapshot = PrometheusSource(loaded.prometheus).build_snapshot(loaded, datetime.now(UTC))
        plan, stderr = _plan(config, prometheus.url)
        plan_vm_only, stderr_vm_only = _plan(vm_only, prometheus.url)

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
