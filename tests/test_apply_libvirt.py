"""`vmbalance apply` live-migrates a real TCG guest between two libvirt daemons on this machine,
each a node of its own (its own runtime directories and host UUID); the node's exporters then
report the VM on the new node, and a Prometheus scraping both shows the node change in its
history: the VM's series under the old node, then under the new one.

The guest's disk is read-only and the guest reads it: libvirt 9 refuses to live-migrate a
writable disk on a local file system between two daemons ("migration without shared storage
is unsafe"), whatever its cache mode, and this machine has no shared file system to offer.
"""

from __future__ import annotations

import json
import tempfile
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from devkit.servers import ExporterProcess, PrometheusServer
from devkit.service import wait_until
from recommender.config import Config
from recommender.faces.cli import main
from recommender.model import Snapshot, make_nodes, make_vms
from recommender.snapshot import snapshot_text

pytestmark = pytest.mark.slow

MIB = 2**20


@pytest.fixture
def two_nodes(tmp_path: Path) -> Iterator[tuple[object, object, Path]]:
    pytest.importorskip("libvirt")
    from lab.libvirt_node import PrivateLibvirtd

    logs = tmp_path / "logs"
    daemons = []
    for name in ("node-a", "node-b"):
        (logs / name).mkdir(parents=True)
        daemons.append(PrivateLibvirtd(logs / name, host_uuid=str(uuid.uuid4())))
    # The daemons run as another account: the sockets' links must be where it can look.
    links = Path(tempfile.mkdtemp(prefix="vmb-apply-nodes-"))
    links.chmod(0o755)
    try:
        for name, daemon in zip(("node-a", "node-b"), daemons, strict=True):
            daemon.start()
            (links / f"{name}.sock").symlink_to(daemon.socket)
        yield daemons[0], daemons[1], links
    finally:
        for daemon in daemons:
            daemon.stop()
        for link in links.iterdir():
            link.unlink()
        links.rmdir()


def test_apply_live_migrates_a_guest_and_prometheus_sees_the_node_change(
    tmp_path: Path,
    two_nodes: tuple[object, object, Path],
    exporter_factory: Callable[..., ExporterProcess],
) -> None:
    from lab.guest import GuestLoad, ensure_guest
    from lab.libvirt_node import DomainSpec, PrivateLibvirtd

    source, target, links = two_nodes
    assert isinstance(source, PrivateLibvirtd) and isinstance(target, PrivateLibvirtd)
    spec = DomainSpec("guest-1", GuestLoad(write_kib=0, read_kib=256), disk_readonly=True)
    source.create_guest(spec, ensure_guest())
    serial = source.images / "guest-1.serial.log"
    # Migrate a booted guest doing its reads, not one in the middle of its kernel's start.
    wait_until(
        lambda: "vmbalance-guest: start" in serial.read_text(errors="replace"),
        120,
        "the guest's start line on its serial console",
    )

    exporters = {
        name: exporter_factory(
            "--backend", "libvirt", "--libvirt-uri", daemon.uri, "--node-name", name
        )
        for name, daemon in (("node-a", source), ("node-b", target))
    }
    targets = [e.address for e in exporters.values()]
    prometheus = PrometheusServer(
        tmp_path / "prometheus",
        [{"job_name": "vmbalance", "static_configs": [{"targets": targets}]}],
        interval="1s",
    )
    with prometheus:
        before = prometheus.wait_for(
            'vmbalance_vm_info{vm="guest-1"}', lambda r: len(r) == 1, timeout=60
        )
        assert before[0]["metric"]["node"] == "node-a"
        code, audit = apply_plan(tmp_path, links)
        assert code == 0
        after = prometheus.wait_for(
            'vmbalance_vm_info{vm="guest-1"}',
            lambda r: [s["metric"]["node"] for s in r] == ["node-b"],
            timeout=60,
        )
        assert after[0]["metric"]["instance"] == exporters["node-b"].address
        history = prometheus.query('vmbalance_vm_info{vm="guest-1"}[10m]')
    assert_migrated(audit, source, target)
    # The history: node-a's series first, node-b's after it, and only node-b's at the end.
    spans = {s["metric"]["node"]: [float(t) for t, _ in s["values"]] for s in history}
    assert set(spans) == {"node-a", "node-b"}
    assert min(spans["node-a"]) < min(spans["node-b"])
    assert max(spans["node-a"]) < max(spans["node-b"])
    with urllib.request.urlopen(
        f"http://127.0.0.1:{exporters['node-a'].port}/metrics", timeout=30
    ) as r:
        assert 'vm="guest-1"' not in r.read().decode()
    with urllib.request.urlopen(
        f"http://127.0.0.1:{exporters['node-b'].port}/metrics", timeout=30
    ) as r:
        body = r.read().decode()
    info = [line for line in body.splitlines() if line.startswith("vmbalance_vm_info{")]
    assert len(info) == 1 and 'vm="guest-1"' in info[0] and 'node="node-b"' in info[0]


def apply_plan(tmp_path: Path, links: Path) -> tuple[int, Path]:
    """`vmbalance apply` of a one-step plan moving guest-1 from node-a to node-b."""
    uri = f"qemu+unix:///session?socket={links}/{{node}}.sock"
    (tmp_path / "config.yaml").write_text(
        json.dumps(
            {
                "output": {"libvirt_uri": uri},
                "apply": {"poll_interval_seconds": 0.2},
            }
        )
    )
    node = {"cpu": 4, "memory": 4096 * MIB, "disk_bytes": 1e8, "disk_ops": 1e4, "network": 1e8}
    vm = {
        "node": "node-a",
        "cpu": 0.5,
        "memory": 64 * MIB,
        "memory_max_bytes": 96 * MIB,
        "disk_bytes": 2.6e5,
        "disk_ops": 4.0,
        "network": 0.0,
        "burst_ratio": 1.0,
    }
    snapshot = Snapshot(make_nodes({"node-a": node, "node-b": node}), make_vms({"guest-1": vm}))
    (tmp_path / "snap.json").write_text(snapshot_text(snapshot, Config()))
    plan = {
        "format": "vmbalance-plan",
        "version": 1,
        "commands": "libvirt",
        "migrations": [
            {
                "step": 1,
                "wave": 1,
                "vm": "guest-1",
                "name": "guest-1",
                "source": "node-a",
                "target": "node-b",
                "kind": "balance",
                "memory_bytes": 96 * MIB,
            }
        ],
    }
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    audit = tmp_path / "audit.jsonl"

    code = main(
        [
            "apply",
            "-c",
            str(tmp_path / "config.yaml"),
            "--plan",
            str(tmp_path / "plan.json"),
            "--input",
            str(tmp_path / "snap.json"),
            "--yes",
            "--audit-log",
            str(audit),
        ]
    )
    return code, audit


def assert_migrated(audit: Path, source: object, target: object) -> None:
    from lab.libvirt_node import PrivateLibvirtd

    assert isinstance(source, PrivateLibvirtd) and isinstance(target, PrivateLibvirtd)
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    done = [r for r in records if r["result"] == "done"]
    assert [(r["vm"], r["from"], r["to"]) for r in done] == [("guest-1", "node-a", "node-b")]
    assert done[0]["bytes"] > 10 * MIB  # the guest's memory went over the wire
    assert done[0]["downtime_seconds"] is not None
    assert [d.name() for d in target.conn.listAllDomains()] == ["guest-1"]
    assert source.conn.listAllDomains() == []
