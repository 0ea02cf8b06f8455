"""serve's automation levels: what is executed, when, and by which instance."""

from __future__ import annotations

import fcntl
import io
import json
import os
import stat
import threading
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from prometheus_client import CollectorRegistry

from recommender.apply.backend import Backend, Outcome, ProgressCallback
from recommender.apply.steps import Step
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


# --- what survives a restart ------------------------------------------------------------------


def test_a_restart_does_not_reset_the_budget_or_the_time_between_plans(tmp_path: Path) -> None:
    cfg = config(tmp_path, daily_migration_budget=1, min_seconds_between_plans=600)
    snap = hot_nic_cluster()
    plan = build_plan(snap, cfg)
    backend = ScriptedBackend()
    assert automation(cfg, snap, backend).consider(plan).executed == 1
    # a new process: the same config, nothing in memory
    restarted = automation(cfg, snap, backend, at=MONDAY_NOON + 60)
    assert restarted.consider(plan).reason == "too soon after the last executed plan"
    restarted.clock[0] += 3600  # type: ignore[attr-defined]
    assert restarted.consider(plan).reason == "daily migration budget spent"
    again = automation(cfg, snap, backend, at=MONDAY_NOON + 86400)  # the next day
    assert again.consider(plan).executed == 1
    assert len(backend.calls) == 2
    document = json.loads((tmp_path / "apply.lock.state").read_text())
    assert document["format"] == "vmbalance-automation-state"
    assert [p["migrations"] for p in document["plans"]] == [1, 1]


def test_the_cooldown_holds_across_a_restart(tmp_path: Path) -> None:
    cfg = config(tmp_path, min_seconds_between_plans=0)
    snap = evacuation()
    plan = build_plan(snap, cfg)
    backend = ScriptedBackend()
    assert automation(cfg, snap, backend).consider(plan).executed == 1
    target = plan.migrations[0].target
    back = snapshot(
        {"pve1": node(), "pve2": node(), "pve3": node()},
        {"101": vm(target), "102": vm("pve2"), "103": vm("pve3")},
    )
    reverse = build_plan(back, cfg)
    reverse.migrations = [replace(plan.migrations[0], source=target, target="pve1", kind="balance")]
    cooldown = cfg.balance.cooldown_seconds
    restarted = automation(cfg, back, backend, at=MONDAY_NOON + cooldown / 2)
    decision = restarted.consider(reverse)
    assert decision.executed == 0
    assert "would move a VM back within its cooldown" in decision.reason
    # the same VM id in another cluster is another VM
    assert restarted.consider(reverse, "other").executed == 1
    assert backend.calls == ["101", "101"]
    later = automation(cfg, back, backend, at=MONDAY_NOON + cooldown + 1)
    assert later.consider(reverse).executed == 1


def test_the_budget_and_the_interval_per_cluster_or_global(tmp_path: Path) -> None:
    snap = hot_nic_cluster()
    per_cluster = config(tmp_path / "a", daily_migration_budget=1, min_seconds_between_plans=600)
    (tmp_path / "a").mkdir()
    plan = build_plan(snap, per_cluster)
    backend = ScriptedBackend()
    auto = automation(per_cluster, snap, backend)
    assert auto.consider(plan, "east").executed == 1
    assert auto.consider(plan, "west").executed == 1  # its own budget and interval
    assert auto.consider(plan, "east").reason == "too soon after the last executed plan"

    (tmp_path / "b").mkdir()
    interval = config(tmp_path / "b", min_seconds_between_plans=600, interval_scope="global")
    auto = automation(interval, snap, backend)
    assert auto.consider(plan, "east").executed == len(plan.migrations)
    assert auto.consider(plan, "west").reason == "too soon after the last executed plan"

    (tmp_path / "c").mkdir()
    budget = config(
        tmp_path / "c",
        daily_migration_budget=1,
        min_seconds_between_plans=0,
        budget_scope="global",
    )
    auto = automation(budget, snap, backend)
    assert auto.consider(plan, "east").executed == 1
    assert auto.consider(plan, "west").reason == "daily migration budget spent"


def test_the_state_file_is_only_ever_a_regular_file(tmp_path: Path) -> None:
    snap = evacuation()
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text("{}")
    link = tmp_path / "state-link"
    link.symlink_to(elsewhere)
    fifo = tmp_path / "state-fifo"
    os.mkfifo(fifo)
    for path, kind in ((link, "a symbolic link"), (fifo, "a FIFO"), (tmp_path, "a directory")):
        cfg = config(tmp_path, state_file=str(path))
        backend = ScriptedBackend()
        decision = automation(cfg, snap, backend).consider(build_plan(snap, cfg))
        assert decision.executed == 0 and f"is {kind}" in decision.reason
        assert backend.calls == []
    assert elsewhere.read_text() == "{}" and link.is_symlink()
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_an_unreadable_state_file_executes_nothing(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    state.write_text("{not json")
    cfg = config(tmp_path, state_file=str(state))
    snap = evacuation()
    backend = ScriptedBackend()
    decision = automation(cfg, snap, backend).consider(build_plan(snap, cfg))
    assert decision.executed == 0 and decision.reason.startswith(f"state file: {state}: not JSON")
    assert backend.calls == []


def test_a_state_file_that_cannot_be_written_stops_execution_until_it_can(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state.json"
    cfg = config(tmp_path, state_file=str(state), min_seconds_between_plans=0)
    snap = hot_nic_cluster()
    plan = build_plan(snap, cfg)

    class Obstructing(ScriptedBackend):
        """Someone puts a directory where the state file goes while the plan executes."""

        obstruct = True

        def migrate(self, step: Step, progress: ProgressCallback) -> Outcome:
            if self.obstruct:
                state.mkdir(exist_ok=True)
            return super().migrate(step, progress)

    backend = Obstructing()
    first = automation(cfg, snap, backend)
    decision = first.consider(plan)
    assert decision.executed == len(plan.migrations)
    assert f"state file: {state}: is a directory" in decision.reason
    assert "state file:" in first.consider(plan).reason  # nothing more until it is written
    assert len(backend.calls) == len(plan.migrations)
    state.rmdir()
    backend.obstruct = False
    assert first.consider(plan).reason == ""
    document = json.loads(state.read_text())
    assert len(document["plans"]) == 2
