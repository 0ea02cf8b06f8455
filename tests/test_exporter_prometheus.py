"""A real Prometheus on loopback scrapes the exporter; the rates the recommender relies on move."""

from __future__ import annotations

from pathlib import Path

import pytest

from devkit.libvirt_nodexml import write_node_xml
from devkit.servers import PrometheusServer

pytestmark = pytest.mark.slow


def positive(result: list[dict]) -> bool:
    return bool(result) and all(float(series["value"][1]) > 0 for series in result)


def test_prometheus_rates_of_disk_and_cpu_counters_are_positive(
    tmp_path: Path, exporter_factory
) -> None:
    uri = write_node_xml(tmp_path / "node.xml", n_vms=3, shutoff_vms=1)
    exporter = exporter_factory("--backend", "libvirt", "--libvirt-uri", uri, "--node-name", "kvm1")
    scrape = {
        "job_name": "vmbalance",
        "scrape_interval": "1s",
        "static_configs": [{"targets": [exporter.address]}],
    }
    with PrometheusServer(tmp_path, scrape_configs=[scrape]) as prometheus:
        prometheus.wait_for('up{job="vmbalance"}', lambda r: bool(r) and r[0]["value"][1] == "1")
        disk = prometheus.wait_for(
            "sum by (node, vm) (rate(vmbalance_vm_disk_read_bytes_total[5s]))"
            " + sum by (node, vm) (rate(vmbalance_vm_disk_written_bytes_total[5s]))",
            lambda r: len(r) == 3 and positive(r),
        )
        assert {series["metric"]["node"] for series in disk} == {"kvm1"}
        prometheus.wait_for(
            "rate(vmbalance_vm_cpu_seconds_total[5s])", lambda r: len(r) == 3 and positive(r)
        )
        prometheus.wait_for(
            "sum by (vm) (rate(vmbalance_vm_network_receive_bytes_total[5s]))",
            lambda r: len(r) == 3 and positive(r),
        )
        up = prometheus.query("vmbalance_up")
        assert [series["value"][1] for series in up] == ["1"]
