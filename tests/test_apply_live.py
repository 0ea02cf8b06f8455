"""The live check before each migration: a stale step is skipped with a reason."""

from __future__ import annotations

from datetime import UTC, datetime

from recommender.apply.live import live_check, stale_reason
from recommender.apply.steps import Step
from recommender.config import Config
from recommender.engine.rules import RuleSettings
from recommender.model import GIB, Snapshot, make_nodes, make_vms

NOW = datetime(2024, 6, 3, 12, 0, tzinfo=UTC)


def node(memory_gib: float = 64, maintenance: bool = False) -> dict[str, float | bool]:
    return {
        "cpu": 16,
        "memory": memory_gib * GIB,
        "disk_bytes": 1e9,
        "disk_ops": 1e4,
        "network": 1e9,
        "maintenance": maintenance,
    }


def vm(where: str, mem_gib: float = 4) -> dict[str, object]:
    return {
        "node": where,
        "cpu": 1.0,
        "memory": mem_gib * GIB / 2,
        "memory_max_bytes": mem_gib * GIB,
        "disk_bytes": 1e6,
        "disk_ops": 10.0,
        "network": 1e6,
        "burst_ratio": 1.0,
    }


def cluster(vms: dict[str, dict[str, object]], **nodes: dict[str, float | bool]) -> Snapshot:
    return Snapshot(nodes=make_nodes(nodes), vms=make_vms(vms), taken_at=NOW)


def move(vm: str, source: str, target: str, n: int = 1) -> Step:
    return Step(n, 1, vm, vm, source, target, "balance", 4 * GIB)


def test_a_step_that_still_fits_may_run() -> None:
    snap = cluster({"101": vm("a")}, a=node(), b=node())
    assert stale_reason(snap, Config(), move("101", "a", "b")) is None


def test_a_vm_someone_else_moved_is_skipped() -> None:
    snap = cluster({"101": vm("c")}, a=node(), b=node(), c=node())
    assert stale_reason(snap, Config(), move("101", "a", "b")) == "VM 101 is on c now, not on a"
    gone = cluster({}, a=node(), b=node())
    assert stale_reason(gone, Config(), move("101", "a", "b")) == "VM 101 is not in the live state"


def test_a_target_that_filled_up_is_skipped() -> None:
    # b has 24 GiB; 2 GiB + 10 % are reserved; a 16 GiB VM arrived there since the plan
    snap = cluster({"101": vm("a", 8), "200": vm("b", 16)}, a=node(), b=node(24))
    reason = stale_reason(snap, Config(), move("101", "a", "b"))
    assert reason == "the rules refuse VM 101 on b now (memory)"
    roomy = cluster({"101": vm("a", 8)}, a=node(), b=node(24))
    assert stale_reason(roomy, Config(), move("101", "a", "b")) is None


def test_a_migration_in_flight_counts_on_its_target() -> None:
    snap = cluster({"101": vm("a", 8), "102": vm("c", 12)}, a=node(), b=node(24), c=node())
    assert stale_reason(snap, Config(), move("101", "a", "b")) is None
    reason = stale_reason(snap, Config(), move("101", "a", "b"), flying=[move("102", "c", "b", 2)])
    assert reason == "the rules refuse VM 101 on b now (memory)"


def test_a_vm_a_rule_now_keeps_in_place_is_skipped() -> None:
    snap = cluster({"101": vm("a")}, a=node(), b=node())
    config = Config(rules=RuleSettings(exclude=["101"]))
    reason = stale_reason(snap, config, move("101", "a", "b"))
    assert reason is not None and reason.startswith("the rules refuse VM 101 on b now (")
    assert "memory" not in reason


def test_a_finished_migration_the_live_state_does_not_show_yet_is_applied() -> None:
    # The snapshot lags: 102 still shows on b although this run moved it to c already.
    snap = cluster({"101": vm("a", 8), "102": vm("b", 16)}, a=node(), b=node(24), c=node())
    assert stale_reason(snap, Config(), move("101", "a", "b")) is not None
    done = [move("102", "b", "c", 1)]
    assert stale_reason(snap, Config(), move("101", "a", "b", 2), done=done) is None


def test_live_check_reads_a_fresh_snapshot_each_time() -> None:
    snaps = [
        cluster({"101": vm("a")}, a=node(), b=node()),
        cluster({"101": vm("b")}, a=node(), b=node()),
    ]
    check = live_check(lambda: snaps.pop(0), Config())
    assert check(move("101", "a", "b"), [], []) is None
    assert check(move("101", "a", "b"), [], []) == "VM 101 is on b now, not on a"
