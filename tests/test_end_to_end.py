"""The whole chain: exporters on libvirt test-driver nodes → real Prometheus → `vmbalance plan`."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from devkit.libvirt_nodexml import IMAGES, vm_name, write_node_xml
from devkit.servers import PrometheusServer
from tests.conftest import REPO

pytestmark = pytest.mark.slow

# The source's history subqueries step at 1 minute, so the short window (presence of a VM)
# must be longer than that; a VM younger than the window is measured over its age, so the
# test need not wait for the whole window.
WAIT_SECONDS = 20


def test_exporters_to_prometheus_to_plan(tmp_path: Path, exporter_factory) -> None:
    crowded = write_node_xml(tmp_path / "kvm1.xml", n_vms=6, node_cpus=16)
    quiet = write_node_xml(tmp_path / "kvm2.xml", n_vms=0, node_cpus=16)
    # The disk files stand for shared storage (a Ceph-backed cluster): they do not pin a VM.
    args = ("--backend", "libvirt", "--shared-path", IMAGES)
    exporters = {
        "kvm1": exporter_factory(*args, "--libvirt-uri", crowded, "--node-name", "kvm1"),
        "kvm2": exporter_factory(*args, "--libvirt-uri", quiet, "--node-name", "kvm2"),
    }
    scrape = {
        "job_name": "vmbalance",
        "scrape_interval": "1s",
        "static_configs": [{"targets": [e.address for e in exporters.values()]}],
    }
    config = tmp_path / "vmbalance.yaml"
    config.write_text("query:\n  window: 2m\n  short_window: 70s\n  history: 5m\n")
    with PrometheusServer(tmp_path, scrape_configs=[scrape]) as prometheus:
        prometheus.wait_for("up", lambda r: len(r) == 2 and all(s["value"][1] == "1" for s in r))
        time.sleep(WAIT_SECONDS)
        result = subprocess.run(
            [sys.executable, "-m", "recommender.cli", "plan", "-c", str(config),
             "--prometheus-url", prometheus.url, "--output", "json"],
            capture_output=True, text=True, timeout=120, cwd=REPO, check=False,
        )  # fmt: skip
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    nodes = {node["node"]: node for node in plan["nodes"]}
    assert set(nodes) == {"kvm1", "kvm2"}
    assert nodes["kvm1"]["vms_before"] == 6 and nodes["kvm2"]["vms_before"] == 0
    assert nodes["kvm1"]["resources"]["cpu"]["load_before"] > 0
    assert nodes["kvm1"]["resources"]["disk_bytes"]["load_before"] > 0
    assert plan["triggered"] is True
    moved = plan["migrations"]
    assert moved, plan
    assert all(m["source"] == "kvm1" and m["target"] == "kvm2" for m in moved)
    assert {m["vm"] for m in moved} <= {vm_name(i) for i in range(6)}
    assert all("virsh migrate --live" in m["command"] for m in moved)
    assert plan["imbalance"]["after"]["overall"] < plan["imbalance"]["before"]["overall"]
