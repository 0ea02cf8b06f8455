"""What a migration can be and costs: blockers, local disks, HA, the pre-copy cost model, and
clusters no move crosses — on hand-made snapshots, through the engine, the plan, every
output and the commands script run with recording qm, virsh and ha-manager."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from recommender.config import Config, MigrationSettings
from recommender.engine.migration_cost import precopy
from recommender.engine.planner import plan_moves
from recommender.model import GIB, Disk, Snapshot, make_nodes, make_vms
from recommender.outputs.commands import UnsafeCommandError, proxmox_migrate, render_commands
from recommender.outputs.document import plan_document
from recommender.outputs.markdown import render_markdown
from recommender.plan import build_plan
from recommender.snapshot import load_snapshot, save_snapshot

REPO = Path(__file__).resolve().parent.parent
NOW = datetime(2024, 6, 3, 12, 0, tzinfo=UTC)
NIC = 1.25e9


def node(cluster: str = "", maintenance: bool = False) -> dict[str, Any]:
    return {
        "cpu": 32,
        "memory": 256 * GIB,
        "disk_bytes": NIC,
        "disk_ops": 50_000.0,
        "network": NIC,
        "maintenance": maintenance,
        "cluster": cluster,
    }


def vm(where: str, net: float, mem_gib: float = 4, **extra: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "node": where,
        "cpu": 1.0,
        "memory": mem_gib * GIB * 0.5,
        "memory_max_bytes": mem_gib * GIB,
        "disk_bytes": net,
        "disk_ops": 0.0,
        "network": net,
        "burst_ratio": 1.0,
    }
    row.update(extra)
    return row


def snapshot(nodes: dict[str, Any], vms: dict[str, Any]) -> Snapshot:
    return Snapshot(nodes=make_nodes(nodes), vms=make_vms(vms), taken_at=NOW)


def hot(**extra: Any) -> Snapshot:
    """pve1 carries the network load of 101 and 102; moving either balances it, 101 (4 GiB)
    copies less than 102 (64 GiB), so 101 is the move; `extra` goes on VM 101."""
    return snapshot(
        {"pve1": node(), "pve2": node(), "pve3": node()},
        {
            "101": vm("pve1", 0.3 * NIC, **extra),
            "102": vm("pve1", 0.3 * NIC, mem_gib=64),
            "103": vm("pve2", 0.01 * NIC),
            "104": vm("pve3", 0.01 * NIC),
        },
    )


def config(**migration: Any) -> Config:
    return Config(migration=MigrationSettings(**migration))


LOCAL = (Disk("scsi0", "local-lvm", False, 32 * GIB), Disk("scsi1", "ceph", True, 100 * GIB))


# --- the cost model on known inputs ----------------------------------------------------------


def test_precopy_is_a_geometric_series_until_the_rest_fits_the_downtime() -> None:
    settings = MigrationSettings(bandwidth_bytes_per_second=GIB, downtime_seconds=0.3)
    # r = 1/4: rounds copy 8, 2, 0.5, 0.125 GiB; 0.125 <= 0.3 GiB stops after 3 more rounds.
    estimate = precopy(np.array([8 * GIB]), np.array([GIB / 4]), settings)
    assert estimate.rounds.tolist() == [3]
    assert estimate.memory_bytes[0] == pytest.approx(8 * GIB * (1 - 0.25**4) / 0.75)
    assert estimate.memory_bytes[0] == pytest.approx(10.625 * GIB)
    assert estimate.converges.tolist() == [True]


def test_unknown_or_zero_dirty_rate_copies_memory_once() -> None:
    settings = MigrationSettings(bandwidth_bytes_per_second=GIB)
    estimate = precopy(np.array([4 * GIB, 4 * GIB]), np.array([np.nan, 0.0]), settings)
    assert estimate.memory_bytes.tolist() == [4 * GIB, 4 * GIB]
    assert estimate.rounds.tolist() == [0, 0]


def test_a_guest_dirtying_at_the_fraction_of_bandwidth_does_not_converge() -> None:
    settings = MigrationSettings(bandwidth_bytes_per_second=GIB, max_dirty_fraction=0.5)
    estimate = precopy(np.array([4 * GIB] * 3), np.array([0.49, 0.5, 2.0]) * GIB, settings)
    assert estimate.converges.tolist() == [True, False, False]


def test_each_migration_wave_and_plan_has_its_duration() -> None:
    # 8 GiB at 1 GiB/s dirtied at 1/4: 10.625 GiB transferred, plus 32 GiB of local disk.
    snap = hot(dirty_rate=GIB / 4, disks=LOCAL)
    settings = config(local_disks="allow", bandwidth_bytes_per_second=GIB)
    settings = settings.model_copy(update={"balance": settings.balance.model_copy(
        update={"min_gain_per_gib": 0.0})})  # fmt: skip
    snap.vms.loc["101", "memory_max_bytes"] = 8 * GIB
    plan = build_plan(snap, settings)
    (move,) = plan.migrations
    assert move.vm == "101"
    assert move.copy_bytes == pytest.approx((10.625 + 32) * GIB)
    assert move.duration_seconds == pytest.approx(42.625)
    assert move.local_disk_bytes == 32 * GIB
    assert plan.wave_durations == [pytest.approx(42.625)]
    assert plan.duration_seconds == pytest.approx(42.625)
    doc = plan_document(plan, settings)
    assert doc["migrations"][0]["duration_seconds"] == pytest.approx(42.625)
    assert doc["wave_durations_seconds"] == [pytest.approx(42.625)]
    assert doc["duration_seconds"] == pytest.approx(42.625)
    assert "estimated 43 s" in render_commands(plan, settings)
    markdown = render_markdown(plan, settings)
    assert "| 42.6 GiB | 43 s |" in markdown and "in about 43 s (wave 1: 43 s)" in markdown


def test_gain_is_weighed_against_what_a_move_transfers() -> None:
    """The same move pays for its memory but not for 2 TiB of local disk on top (102, the
    other candidate, is excluded)."""
    settings = Config.model_validate(
        {"migration": {"local_disks": "allow"}, "rules": {"exclude": ["102"]}}
    )
    assert [m.vm for m in plan_moves(hot(), settings).moves] == ["101"]
    huge = (Disk("scsi0", "local-lvm", False, 2048 * GIB),)
    result = plan_moves(hot(disks=huge), settings)
    assert result.moves == []
    assert any(h.vm == "101" and "min_gain" in h.blocked_by for h in result.held_back)


# --- what the hypervisor refuses -------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "why"),
    [
        ({"blockers": ["pci_passthrough"]}, "cannot be live-migrated: pci_passthrough"),
        ({"blockers": ["lock", "local_media"]}, "cannot be live-migrated: local_media, lock"),
        ({"disks": LOCAL}, "has disks on local storage (migration.local_disks: refuse)"),
        ({"dirty_rate": 0.9 * NIC}, "would not converge"),
        ({"disks": LOCAL, "ha_managed": True}, "HA-managed with disks on local storage"),
    ],
)
def test_a_vm_the_hypervisor_would_refuse_is_never_moved_and_listed(
    extra: dict[str, Any], why: str
) -> None:
    settings = config(local_disks="allow") if "ha_managed" in extra else config()
    plan = build_plan(hot(**extra), settings)
    assert [m.vm for m in plan.migrations] == ["102"]
    assert [(u.vm, u.node) for u in plan.immovable] == [("101", "pve1")]
    assert why in plan.immovable[0].reason
    assert why in json.dumps(plan_document(plan, settings)["immovable"])


def test_without_blockers_the_same_vm_is_the_move() -> None:
    plan = build_plan(hot(), config())
    assert [m.vm for m in plan.migrations] == ["101"] and plan.immovable == []


def test_a_blocked_vm_on_a_node_in_maintenance_is_unplaceable_with_its_reason() -> None:
    snap = snapshot(
        {"pve1": node(maintenance=True), "pve2": node()},
        {"101": vm("pve1", 1e6, blockers=["usb_passthrough"]), "102": vm("pve1", 1e6)},
    )
    plan = build_plan(snap, config())
    assert [m.vm for m in plan.migrations] == ["102"]
    (stuck,) = plan.unplaceable
    assert stuck.vm == "101" and "usb_passthrough" in stuck.reason


# --- commands ---------------------------------------------------------------------------------


def recorded(script: str, tmp_path: Path) -> list[list[str]]:
    """Run the script with recording qm, virsh and ha-manager; each call's argv."""
    bin_dir, calls, work = tmp_path / "bin", tmp_path / "calls", tmp_path / "work"
    for directory in (bin_dir, calls, work):
        directory.mkdir()
    recorder = (
        "#!/bin/bash\n"
        f'out=$(mktemp "{calls}/call.XXXXXX")\n'
        'printf \'%s\\0\' "$(basename "$0")" "$@" > "$out"\n'
    )
    for tool in ("qm", "virsh", "ha-manager"):
        (bin_dir / tool).write_text(recorder)
        (bin_dir / tool).chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "LC_ALL": "C"}
    done = subprocess.run(["bash", "-c", script], cwd=work, env=env, capture_output=True)
    assert done.returncode == 0, done.stderr
    assert list(work.iterdir()) == []
    return sorted(c.read_bytes().decode().split("\0")[:-1] for c in calls.iterdir())


def commands_of(snap: Snapshot, tmp_path: Path, settings: dict[str, Any]) -> str:
    path = tmp_path / "snap.json"
    save_snapshot(snap, path, Config.model_validate(settings))
    done = subprocess.run(
        [sys.executable, "-m", "recommender.cli", "plan", "-i", str(path), "-o", "commands"],
        capture_output=True, cwd=REPO, timeout=300, check=False, env=dict(os.environ),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout.decode()


def evacuation() -> Snapshot:
    return snapshot(
        {"pve1": node(maintenance=True), "pve2": node()},
        {
            "101": vm("pve1", 1e6, disks=LOCAL),
            "102": vm("pve1", 1e6, ha_managed=True),
            "103": vm("pve1", 1e6, disks=(Disk("virtio0", "ceph", True, 8 * GIB),)),
        },
    )


def test_proxmox_commands_carry_local_disks_and_ha(tmp_path: Path) -> None:
    script = commands_of(evacuation(), tmp_path, {"migration": {"local_disks": "allow"}})
    assert recorded(script, tmp_path) == [
        ["ha-manager", "migrate", "vm:102", "pve2"],
        ["qm", "migrate", "101", "pve2", "--online", "--with-local-disks"],
        ["qm", "migrate", "103", "pve2", "--online"],
    ]


def test_local_disks_refused_by_default_leave_the_vm(tmp_path: Path) -> None:
    script = commands_of(evacuation(), tmp_path, {})
    calls = recorded(script, tmp_path)
    assert calls == [["ha-manager", "migrate", "vm:102", "pve2"], ["qm", "migrate", "103",
                     "pve2", "--online"]]  # fmt: skip


def test_libvirt_commands_copy_local_storage(tmp_path: Path) -> None:
    snap = snapshot(
        {"kvm1": node(maintenance=True), "kvm2": node()},
        {"web-1": vm("kvm1", 1e6, disks=LOCAL), "db-1": vm("kvm1", 1e6)},
    )
    script = commands_of(snap, tmp_path, {"migration": {"local_disks": "allow"}})
    common = ["virsh", "migrate", "--live", "--persistent", "--undefinesource", "--verbose"]
    assert recorded(script, tmp_path) == [
        [*common, "--copy-storage-all", "--domain=web-1", "--desturi=qemu+ssh://kvm2/system"],
        [*common, "--domain=db-1", "--desturi=qemu+ssh://kvm2/system"],
    ]


# --- the snapshot file -----------------------------------------------------------------------


def test_the_snapshot_file_keeps_blockers_disks_ha_dirty_rate_and_cluster(tmp_path: Path) -> None:
    snap = snapshot(
        {"pve1": node("west"), "pve2": node("west")},
        {"101": vm("pve1", 1.0, blockers=["lock"], disks=LOCAL, ha_managed=True,
                   dirty_rate=5e6), "102": vm("pve2", 1.0)},
    )  # fmt: skip
    save_snapshot(snap, tmp_path / "s.json")
    loaded, _ = load_snapshot(tmp_path / "s.json")
    row = loaded.vms.loc["101"]
    assert row["blockers"] == ("lock",) and row["disks"] == LOCAL
    assert bool(row["ha_managed"]) and row["dirty_rate"] == 5e6
    assert loaded.nodes["cluster"].tolist() == ["west", "west"]
    other = loaded.vms.loc["102"]
    assert other["blockers"] == () and other["disks"] == () and not other["ha_managed"]
    assert np.isnan(other["dirty_rate"])


def test_an_old_snapshot_without_the_fields_still_loads() -> None:
    loaded, _ = load_snapshot(REPO / "recommender" / "examples" / "snapshot.json")
    assert set(loaded.nodes["cluster"]) == {""}
    assert all(b == () for b in loaded.vms["blockers"])
    assert build_plan(loaded, Config()).immovable == []


# --- clusters ---------------------------------------------------------------------------------


def test_no_move_crosses_clusters() -> None:
    """West is hot and east idle: without clusters east would take west's load."""
    nodes = {"w1": node("west"), "w2": node("west"), "e1": node("east"), "e2": node("east")}
    vms = {
        "1": vm("w1", 0.4 * NIC),
        "2": vm("w1", 0.4 * NIC),
        "3": vm("w2", 0.3 * NIC),
        "4": vm("w2", 0.3 * NIC),
        "5": vm("e1", 0.01 * NIC),
        "6": vm("e2", 0.01 * NIC),
    }
    plain = {n: {**caps, "cluster": ""} for n, caps in nodes.items()}
    crossing = build_plan(snapshot(plain, vms), Config())
    assert any(m.target.startswith("e") for m in crossing.migrations)
    plan = build_plan(snapshot(nodes, vms), Config())
    assert all(m.source[0] == m.target[0] for m in plan.migrations)


@pytest.mark.parametrize("target", ["$(touch pwned)", "-rf", "pve2;reboot", "new\nline"])
def test_ha_and_local_disk_commands_refuse_a_hostile_target(target: str) -> None:
    for options in ({"ha_managed": True}, {"local_disks": True}):
        with pytest.raises(UnsafeCommandError, match="is not a Proxmox node name"):
            proxmox_migrate("101", target, **options)
    with pytest.raises(UnsafeCommandError, match="Proxmox VMID"):
        proxmox_migrate("$(id)", "pve2", ha_managed=True)
