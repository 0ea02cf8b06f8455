"""serve's automation levels: what is executed, when, and by which instance."""

from __future__ import annotations

import fcntl
import io
import threading
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from prometheus_client import CollectorRegistry

from recommender.apply.backend import Backend
from recommender.config import AutomationSettings, BalanceSettings, Config
from recommender.engine.rules import RuleSettings
from recommender.faces.automation import Automation, in_windows
from recommender.faces.serve import Recommender, make_app
from recommender.model import Snapshot
from recommender.plan import Plan, build_plan
from tests.test_apply_queue import ScriptedBackend
from tests.test_engine import NOW, hot_nic_cluster, node, snapshot, vm

# Monday 2024-06-03 12:00 UTC
MONDAY_NOON = NOW.timestamp()


def evacuation() -> Snapshot:
    return snapshot(
        {"pve1": node(maintenance=True), "pve2": node(), "pve3": node()},
        {"101": vm("pve1"), "102": vm("pve2"), "103": vm("pve3")},
    )


def config(tmp: Path, **automation: object) -> Config:
    settings = {"level": "full", "lock_file": str(tmp / "apply.lock"), **automation}
    return Config(
        automation=AutomationSettings.model_validate(settings),
        balance=BalanceSettings(),
        rules=RuleSettings(),
        apply={"poll_interval_seconds": 0.01, "max_parallel": 4},  # type: ignore[arg-type]
    )


def automation(
    cfg: Config, snap: Snapshot, backend: ScriptedBackend, at: float = MONDAY_NOON
) -> Automation:
    clock = [at]

    def factory(plan: Plan, config: Config) -> Backend:
        return backend

    auto = Automation(cfg, factory, lambda: snap, wall=lambda: clock[0])
    auto.clock = clock  # type: ignore[attr-defined]
    return auto


def test_partial_executes_an_evacuation_and_not_a_balancing_plan(tmp_path: Path) -> None:
    cfg = config(tmp_path, level="partial")
    evac, hot = evacuation(), hot_nic_cluster()
    evac_plan, hot_plan = build_plan(evac, cfg), build_plan(hot, cfg)
    assert {m.kind for m in evac_plan.migrations} == {"evacuate"}
    assert hot_plan.migrations and {m.kind for m in hot_plan.migrations} == {"balance"}
    backend = ScriptedBackend()
    assert automation(cfg, hot, backend).consider(hot_plan).reason == (
        "nothing to execute at this level"
    )
    assert backend.calls == []
    decision = automation(cfg, evac, backend).consider(evac_plan)
    assert (decision.executed, decision.reason) == (1, "")
    assert backend.calls == ["101"]


def test_manual_executes_nothing(tmp_path: Path) -> None:
    cfg = config(tmp_path, level="manual")
    backend = ScriptedBackend()
    decision = automation(cfg, evacuation(), backend).consider(build_plan(evacuation(), cfg))
    assert decision.reason == "automation level manual" and backend.calls == []


def test_full_respects_the_window(tmp_path: Path) -> None:
    cfg = config(tmp_path, windows=["mon-fri 22:00-05:00", "sat,sun 02:00-04:00"])
    snap = hot_nic_cluster()
    plan = build_plan(snap, cfg)
    backend = ScriptedBackend()
    auto = automation(cfg, snap, backend)  # Monday noon: outside
    assert auto.consider(plan).reason == "outside the maintenance windows"
    assert backend.calls == []
    auto.clock[0] = datetime(2024, 6, 4, 3, 0, tzinfo=UTC).timestamp()  # type: ignore[attr-defined]
    assert auto.consider(plan).executed == len(plan.migrations)
    assert sorted(backend.calls) == sorted(m.vm for m in plan.migrations)


def test_windows_run_past_midnight_and_honour_the_zone() -> None:
    berlin = "Europe/Berlin"

    def at(text: str) -> datetime:
        return datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(berlin))

    windows = ["fri 22:00-02:00"]
    assert in_windows(windows, at("2024-06-07T23:30"))  # Friday
    assert in_windows(windows, at("2024-06-08T01:59"))  # Saturday morning, from Friday
    assert not in_windows(windows, at("2024-06-08T02:00"))
    assert not in_windows(windows, at("2024-06-08T23:00"))  # Saturday evening
    assert in_windows([], at("2024-06-08T23:00"))


def test_full_respects_the_budget_and_the_time_between_plans(tmp_path: Path) -> None:
    cfg = config(tmp_path, daily_migration_budget=1, min_seconds_between_plans=600)
    snap = hot_nic_cluster()
    plan = build_plan(snap, cfg)
    assert len(plan.migrations) >= 2
    backend = ScriptedBackend()
    auto = automation(cfg, snap, backend)
    first = auto.consider(plan)
    assert first.executed == 1 and f"budget: 1 of {len(plan.migrations)}" in first.reason
    auto.clock[0] += 60  # type: ignore[attr-defined]
    assert auto.consider(plan).reason == "too soon after the last executed plan"
    auto.clock[0] += 3600  # type: ignore[attr-defined]
    assert auto.consider(plan).reason == "daily migration budget spent"
    auto.clock[0] += 86400  # type: ignore[attr-defined]
    assert auto.consider(plan).executed == 1
    assert len(backend.calls) == 2


def test_full_respects_the_pause_file_and_endpoint(tmp_path: Path) -> None:
    pause = tmp_path / "pause"
    cfg = config(tmp_path, pause_file=str(pause))
    snap = hot_nic_cluster()
    plan = build_plan(snap, cfg)
    backend = ScriptedBackend()
    auto = automation(cfg, snap, backend)
    pause.touch()
    assert auto.consider(plan).reason == "paused"
    pause.unlink()

    routes = {"/-/pause": auto.http, "/-/resume": auto.http}
    app = make_app(Recommender(cfg, lambda c: snap), CollectorRegistry(), routes)

    def call(method: str, path: str) -> str:
        status: list[str] = []
        environ = {"REQUEST_METHOD": method, "PATH_INFO": path, "wsgi.input": io.BytesIO()}
        body = b"".join(app(environ, lambda s, h: status.append(s)))
        return f"{status[0]} {body.decode().strip()}"

    assert call("GET", "/-/pause") == "405 Method Not Allowed POST only"
    assert not auto.paused()
    assert call("POST", "/-/pause") == "200 OK paused"
    assert auto.consider(plan).reason == "paused"
    assert call("POST", "/-/resume") == "200 OK resumed"
    assert auto.consider(plan).executed == len(plan.migrations)
    assert len(backend.calls) == len(plan.migrations)


def test_a_second_instance_does_not_execute_while_the_first_holds_the_lock(
    tmp_path: Path,
) -> None:
    cfg = config(tmp_path)
    snap = evacuation()
    plan = build_plan(snap, cfg)
    gate = threading.Event()
    first_backend = ScriptedBackend(gates={"101": gate})
    first = automation(cfg, snap, first_backend)
    runner = threading.Thread(target=first.consider, args=(plan,))
    runner.start()
    assert first_backend.started["101"].wait(timeout=10)
    second_backend = ScriptedBackend()
    second = automation(cfg, snap, second_backend)
    assert second.consider(plan).reason == "another instance holds the lock"
    # an instance in another process, holding the same file: flock excludes it as well
    gate.set()
    runner.join(timeout=10)
    with open(tmp_path / "apply.lock", "ab") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        assert second.consider(plan).reason == "another instance holds the lock"
    assert second_backend.calls == []
    assert first_backend.calls == ["101"]


def test_a_vm_is_never_moved_back_within_its_cooldown(tmp_path: Path) -> None:
    cfg = config(tmp_path, min_seconds_between_plans=0)
    snap = evacuation()
    plan = build_plan(snap, cfg)
    backend = ScriptedBackend()
    auto = automation(cfg, snap, backend)
    assert auto.consider(plan).executed == 1
    target = plan.migrations[0].target
    back = snapshot(
        {"pve1": node(), "pve2": node(), "pve3": node()},
        {"101": vm(target), "102": vm("pve2"), "103": vm("pve3")},
    )
    reverse = build_plan(back, cfg)
    reverse.migrations = [replace(plan.migrations[0], source=target, target="pve1", kind="balance")]
    auto.clock[0] += 60  # type: ignore[attr-defined]
    decision = auto.consider(reverse)
    assert decision.executed == 0
    assert "would move a VM back within its cooldown" in decision.reason
    assert backend.calls == ["101"]
