"""The collector alone: samples in, the metric contract out (private registry, no server)."""

from __future__ import annotations

import subprocess

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from exporter.collector import VMCollector
from exporter.samples import (
    DiskInfo,
    DiskSample,
    InterfaceSample,
    NodeSample,
    ScrapeResult,
    VMSample,
)
from tests.conftest import REPO

HOSTILE = 'evil"} 1\nvmbalance_up{node="x"} 0 # \\ {{ | `x` <b>'


class StaticBackend:
    """Serves prepared results in order; counts scrapes. Not a hypervisor stand-in: the
    collector's input is plain data by design, so plain data is what the test feeds it."""

    name = "libvirt"

    def __init__(self, *results: ScrapeResult) -> None:
        self.results = list(results)
        self.scrapes = 0

    def scrape(self, timeout: float) -> ScrapeResult:
        self.scrapes += 1
        return self.results[min(self.scrapes, len(self.results)) - 1]

    def close(self) -> None:
        return


class RaisingBackend(StaticBackend):
    def scrape(self, timeout: float) -> ScrapeResult:
        raise RuntimeError("driver exploded")


def vm(vm_id: str, name: str = "web", errors: int = 0) -> VMSample:
    return VMSample(
        vm=vm_id,
        name=name,
        uuid="6695eb01-f6a4-8304-79aa-97f2502e193f",
        cpu_seconds=12.5,
        vcpus=2,
        memory_max_bytes=2 * 1024**3,
        memory_used_bytes=1024**3,
        memory_rss_bytes=1100 * 1024**2,
        disks=(DiskSample("vda", 10, 20, 1, 2), DiskSample("vdb", 30, 40, 3, 4)),
        interfaces=(InterfaceSample("vnet0", 500, 600),),
        disk_infos=(
            DiskInfo("vda", "network:rbd", True, 32 * 1024**3),
            DiskInfo("vdb", name, False, None),  # a storage id someone chose
        ),
        blockers=("local_media", "pci_passthrough"),
        ha_managed=1,
        dirty_rate_bytes_per_second=1.5e6,
    )


def result(*vms: VMSample, vm_errors: int = 0) -> ScrapeResult:
    return ScrapeResult(
        up=True,
        node=NodeSample(cpus=16, memory_bytes=64 * 1024**3, version="9.0.0"),
        vms=list(vms),
        vm_errors=vm_errors,
    )


def scrape(collector: VMCollector) -> dict[str, list]:
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def test_every_contract_family_is_published() -> None:
    families = scrape(VMCollector(StaticBackend(result(vm("101"))), node="pve1", timeout=1))
    text = (REPO / "docs" / "metrics.md").read_text(encoding="utf-8")
    exporter_part = text.split("## Published by `vmbalance serve`")[0]
    documented = {
        line.split("`")[1].removesuffix("_total")
        for line in exporter_part.splitlines()
        if line.startswith("| `vmbalance_")
    }
    assert documented == set(families)


def test_values_and_labels() -> None:
    families = scrape(VMCollector(StaticBackend(result(vm("101"))), node="pve1", timeout=1))
    reads = {
        s.labels["disk"]: s.value
        for s in families["vmbalance_vm_disk_read_bytes"]
        if s.name.endswith("_total")
    }
    assert reads == {"vda": 10, "vdb": 30}
    (info,) = families["vmbalance_vm_info"]
    assert info.labels == {
        "cluster": "",
        "node": "pve1",
        "vm": "101",
        "name": "web",
        "uuid": "6695eb01-f6a4-8304-79aa-97f2502e193f",
        "backend": "libvirt",
    }
    (rx,) = [s for s in families["vmbalance_vm_network_receive_bytes"] if s.name.endswith("total")]
    assert rx.labels["interface"] == "vnet0" and rx.value == 500
    assert families["vmbalance_up"][0].value == 1
    assert families["vmbalance_node_cpus"][0].value == 16
    infos = families["vmbalance_vm_disk_info"]
    assert {(s.labels["disk"], s.labels["storage"], s.labels["shared"]) for s in infos} == {
        ("vda", "network:rbd", "1"),
        ("vdb", "web", "0"),
    }
    assert [(s.labels["disk"], s.value) for s in families["vmbalance_vm_disk_size_bytes"]] == [
        ("vda", 32 * 1024**3)
    ]
    blockers = families["vmbalance_vm_migration_blocker"]
    assert sorted(s.labels["reason"] for s in blockers) == ["local_media", "pci_passthrough"]
    assert families["vmbalance_vm_ha_managed"][0].value == 1
    assert families["vmbalance_vm_memory_dirty_rate_bytes_per_second"][0].value == 1.5e6


def test_the_cluster_label_is_given_found_or_kept() -> None:
    found = result(vm("101"))
    found.cluster = "pve-east"
    silent = result(vm("101"))  # a scrape that could not read the cluster's name
    collector = VMCollector(StaticBackend(found, silent), node="pve1", timeout=1)
    for _ in range(2):
        labels = {s.labels["cluster"] for f in scrape(collector).values() for s in f}
        assert labels == {"pve-east"}
    given = VMCollector(StaticBackend(found), node="pve1", timeout=1, cluster="fleet")
    assert {s.labels["cluster"] for f in scrape(given).values() for s in f} == {"fleet"}
    unknown = VMCollector(StaticBackend(silent), node="pve1", timeout=1)
    assert {s.labels["cluster"] for f in scrape(unknown).values() for s in f} == {""}


def test_hostile_vm_name_stays_inside_its_label() -> None:
    families = scrape(
        VMCollector(StaticBackend(result(vm("101", name=HOSTILE))), node="pve1", timeout=1)
    )
    (info,) = families["vmbalance_vm_info"]
    assert info.labels["name"] == HOSTILE
    assert len(families["vmbalance_up"]) == 1 and families["vmbalance_up"][0].value == 1


def test_scrape_errors_accumulate_as_a_counter() -> None:
    backend = StaticBackend(result(vm("1"), vm_errors=2), result(vm("1"), vm_errors=1))
    collector = VMCollector(backend, node="n", timeout=1)
    scrape(collector)
    families = scrape(collector)
    (total,) = [s for s in families["vmbalance_vm_scrape_errors"] if s.name.endswith("_total")]
    assert total.value == 3


def test_backend_down_is_up_zero_not_an_error() -> None:
    down = ScrapeResult(up=False, error="cannot connect")
    families = scrape(VMCollector(StaticBackend(down), node="n", timeout=1))
    assert families["vmbalance_up"][0].value == 0
    assert families["vmbalance_vm_info"] == []


def test_backend_that_raises_is_reported_down() -> None:
    families = scrape(VMCollector(RaisingBackend(), node="n", timeout=1))
    assert families["vmbalance_up"][0].value == 0


def test_registering_does_not_scrape() -> None:
    backend = StaticBackend(result(vm("1")))
    registry = CollectorRegistry(auto_describe=True)
    registry.register(VMCollector(backend, node="n", timeout=1))
    assert backend.scrapes == 0


def test_promtool_accepts_exposition() -> None:
    registry = CollectorRegistry()
    registry.register(
        VMCollector(StaticBackend(result(vm("101", HOSTILE), vm("102"))), node="pve1", timeout=1)
    )
    checked = subprocess.run(
        ["promtool", "check", "metrics"],
        input=generate_latest(registry),
        capture_output=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout == b"" and checked.stderr == b""


def parsed(text: str) -> dict[str, set]:
    return {
        family.name: {
            (sample.name, tuple(sorted(sample.labels.items())), sample.value)
            for sample in family.samples
        }
        for family in text_string_to_metric_families(text)
    }


def test_fast_text_exposition_equals_client_python() -> None:
    no_rss = VMSample(
        vm="7", name="", uuid="u", cpu_seconds=0.5, vcpus=1,
        memory_max_bytes=10**17, memory_used_bytes=1, memory_rss_bytes=None,
    )  # fmt: skip
    for outcome in (
        result(vm("101", HOSTILE), vm('1"0\\2\n'), no_rss, vm_errors=1),
        ScrapeResult(up=False, error="down"),
    ):
        slow = VMCollector(StaticBackend(outcome), node='pve"1', timeout=1)
        fast = VMCollector(StaticBackend(outcome), node='pve"1', timeout=1)
        registry = CollectorRegistry()
        registry.register(slow)
        expected = parsed(generate_latest(registry).decode())
        got = parsed(fast.exposition().decode())
        expected.pop("vmbalance_scrape_duration_seconds")
        got.pop("vmbalance_scrape_duration_seconds")
        assert got == expected


def test_fast_exposition_passes_promtool() -> None:
    fast = VMCollector(StaticBackend(result(vm("101", HOSTILE))), node="pve1", timeout=1)
    checked = subprocess.run(
        ["promtool", "check", "metrics"], input=fast.exposition(), capture_output=True, check=False
    )
    assert checked.returncode == 0 and checked.stdout == b"" and checked.stderr == b""
