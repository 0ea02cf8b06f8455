"""The rolling queue of `vmbalance apply`: dependencies, slots, failures, stops, overdue
migrations, and the audit log it writes. The backend here is a scripted double: the queue's
behaviour is what is under test (the Proxmox backend has its own tests against a fake API)."""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import pytest

from recommender.apply.audit import AuditLog
from recommender.apply.backend import Outcome, Progress, ProgressCallback
from recommender.apply.metrics import ApplyMetrics
from recommender.apply.queue import Queue
from recommender.apply.steps import Step, dependencies, steps_of_document
from recommender.config import ApplySettings
from recommender.errors import CommandError
from recommender.output_file import OutputFileError, append_output


def step(n: int, wave: int, vm: str, source: str, target: str, memory: float = 0.0) -> Step:
    return Step(n, wave, vm, vm, source, target, "balance", memory)


class ScriptedBackend:
    """Each VM's migration takes `seconds[vm]` (default 0.05), or waits for `gates[vm]`; the
    VMs in `failing` fail. Calls and cancels are recorded."""

    def __init__(
        self,
        seconds: dict[str, float] | None = None,
        failing: set[str] | None = None,
        gates: dict[str, threading.Event] | None = None,
    ) -> None:
        self.seconds = seconds or {}
        self.failing = failing or set()
        self.gates = gates or {}
        self.calls: list[str] = []
        self.cancelled: list[str] = []
        self.started = {vm: threading.Event() for vm in self.gates}
        self._lock = threading.Lock()

    def migrate(self, step: Step, progress: ProgressCallback) -> Outcome:
        with self._lock:
            self.calls.append(step.vm)
        if step.vm in self.gates:
            self.started[step.vm].set()
            if not self.gates[step.vm].wait(timeout=30):
                return Outcome("failed", "gate never opened")
            if step.vm in self.cancelled:
                return Outcome("failed", "cancelled")
        else:
            time.sleep(self.seconds.get(step.vm, 0.05))
        progress(Progress(bytes_transferred=1024.0, bytes_total=1024.0))
        if step.vm in self.failing:
            return Outcome("failed", "migration aborted: target refused", exit_status="ERROR")
        return Outcome("done", downtime_seconds=0.02, bytes_transferred=1024.0)

    def cancel(self, step: Step) -> None:
        self.cancelled.append(step.vm)
        self.gates[step.vm].set()


def fast(**changes: object) -> ApplySettings:
    return ApplySettings(**{"poll_interval_seconds": 0.01, **changes})  # type: ignore[arg-type]


def intervals(records: list[dict[str, object]]) -> dict[int, tuple[datetime, datetime, Step]]:
    """Step → (start, end) of every migration that ran, from the audit records alone."""
    starts: dict[int, datetime] = {}
    out = {}
    for r in records:
        at = datetime.fromisoformat(str(r["time"]))
        if r["event"] == "started":
            starts[int(str(r["step"]))] = at
        elif r["event"] in ("done", "failed") and int(str(r["step"])) in starts:
            n = int(str(r["step"]))
            s = Step(n, 1, str(r["vm"]), "", str(r["from"]), str(r["to"]), "", 0.0)
            out[n] = (starts[n], at, s)
    return out


def peaks(records: list[dict[str, object]]) -> tuple[int, int]:
    """Largest number of migrations in flight at once: in the cluster, and on any one node."""
    events = []
    for start, end, s in intervals(records).values():
        events.append((start, 1, s))
        events.append((end, -1, s))
    events.sort(key=lambda e: (e[0], e[1]))  # an end before a start at the same instant
    total, per_node = 0, Counter[str]()
    peak_total, peak_node = 0, 0
    for _, delta, s in events:
        total += delta
        for node in s.nodes:
            per_node[node] += delta
        peak_total = max(peak_total, total)
        peak_node = max(peak_node, *per_node.values())
    return peak_total, peak_node


def test_dependencies_are_earlier_waves_sharing_a_vm_or_node() -> None:
    steps = [
        step(1, 1, "a", "n1", "n2"),
        step(2, 1, "b", "n3", "n4"),
        step(3, 2, "c", "n3", "n5"),
        step(4, 2, "d", "n6", "n7"),
        step(5, 3, "a", "n2", "n8"),
    ]
    assert dependencies(steps) == {1: (), 2: (), 3: (2,), 4: (), 5: (1,)}


def test_a_step_starts_when_its_own_dependencies_are_done_not_its_wave() -> None:
    gate = threading.Event()
    backend = ScriptedBackend(gates={"a": gate})
    steps = [step(1, 1, "a", "n1", "n2"), step(2, 1, "b", "n3", "n4"), step(3, 2, "c", "n3", "n5")]
    queue = Queue(steps, backend, fast(max_parallel=4))
    runner = threading.Thread(target=queue.run)
    runner.start()
    deadline = time.monotonic() + 10
    while backend.calls.count("c") == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    a_running = not gate.is_set()
    gate.set()
    runner.join(timeout=10)
    assert a_running and "c" in backend.calls  # wave 2's c ran while wave 1's a was in flight
    assert [s.result for s in queue.states] == ["done", "done", "done"]


def test_parallel_limits_are_never_exceeded_and_reached(tmp_path: Path) -> None:
    nodes = [f"n{i}" for i in range(6)]
    steps = [
        step(i + 1, 1 + i // 6, f"vm{i}", nodes[i % 6], nodes[(i * 5 + 1) % 6]) for i in range(24)
    ]
    steps = [s for s in steps if s.source != s.target]
    backend = ScriptedBackend(seconds={s.vm: 0.02 + 0.03 * (s.step % 3) for s in steps})
    audit = AuditLog(str(tmp_path / "audit.jsonl"))
    result = Queue(steps, backend, fast(max_parallel=3, max_parallel_per_node=2), audit=audit).run()
    assert result.ok
    records = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert len(intervals(records)) == len(steps)
    total, per_node = peaks(records)
    assert total <= 3
    assert per_node <= 2


def test_the_cluster_limit_is_filled_and_the_next_start_waits_for_a_slot() -> None:
    gates = {f"vm{i}": threading.Event() for i in range(4)}
    backend = ScriptedBackend(gates=gates)
    steps = [step(i + 1, 1, f"vm{i}", f"a{i}", f"b{i}") for i in range(4)]
    queue = Queue(steps, backend, fast(max_parallel=3))
    runner = threading.Thread(target=queue.run)
    runner.start()
    for i in range(3):
        assert backend.started[f"vm{i}"].wait(timeout=10)
    time.sleep(0.2)
    assert not backend.started["vm3"].is_set()  # three in flight: the fourth waits
    gates["vm1"].set()
    assert backend.started["vm3"].wait(timeout=10)
    for gate in gates.values():
        gate.set()
    runner.join(timeout=10)
    assert [s.result for s in queue.states] == ["done"] * 4


def test_a_failed_migration_stops_new_starts_and_is_never_done(tmp_path: Path) -> None:
    steps = [step(1, 1, "a", "n1", "n2"), step(2, 2, "b", "n3", "n4"), step(3, 2, "c", "n1", "n3")]
    backend = ScriptedBackend(failing={"a"})
    metrics = ApplyMetrics()
    result = Queue(steps, backend, fast(max_parallel=1), metrics=metrics).run()
    assert not result.ok
    assert result.stopped == "step 1 (a) failed: migration aborted: target refused"
    assert [s.result for s in result.states] == ["failed", "not-started", "skipped"]
    assert backend.calls == ["a"]
    text = metrics.text().decode()
    assert 'vmbalance_apply_migrations_total{cluster="",result="failed"} 1.0' in text
    assert 'vmbalance_apply_migrations_total{cluster="",result="done"} 0.0' in text


def test_continue_on_error_keeps_going_on_unrelated_nodes() -> None:
    steps = [
        step(1, 1, "a", "n1", "n2"),
        step(2, 2, "b", "n3", "n4"),
        step(3, 2, "c", "n5", "n1"),
        step(4, 3, "d", "n4", "n6"),
    ]
    backend = ScriptedBackend(failing={"a"})
    result = Queue(steps, backend, fast(max_parallel=1), continue_on_error=True).run()
    assert [s.result for s in result.states] == ["failed", "done", "skipped", "done"]
    assert result.states[2].reason == "waits for step 1 (a), which failed"
    assert not result.ok  # the exit is still non-zero


def test_stop_waits_for_the_migration_in_flight_and_starts_nothing() -> None:
    gate = threading.Event()
    backend = ScriptedBackend(gates={"a": gate})
    steps = [step(1, 1, "a", "n1", "n2"), step(2, 1, "b", "n3", "n4")]
    queue = Queue(steps, backend, fast(max_parallel=1))
    out: list[object] = []
    runner = threading.Thread(target=lambda: out.append(queue.run()))
    runner.start()
    assert backend.started["a"].wait(timeout=10)
    queue.stop("stopped by SIGTERM")
    time.sleep(0.2)
    assert runner.is_alive()  # still waiting for a
    gate.set()
    runner.join(timeout=10)
    assert backend.calls == ["a"]
    assert [s.result for s in queue.states] == ["done", "not-started"]
    assert queue.states[1].reason == "stopped by SIGTERM"


def test_a_stale_step_is_skipped_with_its_dependants() -> None:
    steps = [step(1, 1, "a", "n1", "n2"), step(2, 2, "b", "n2", "n3"), step(3, 2, "c", "n4", "n5")]

    def check(s: Step, done: object, flying: object) -> str | None:
        return "a is on n9 now, not on n1" if s.vm == "a" else None

    result = Queue(steps, ScriptedBackend(), fast(), check=check).run()
    assert [(s.result, s.reason) for s in result.states] == [
        ("skipped", "a is on n9 now, not on n1"),
        ("skipped", "waits for step 1 (a), which was skipped"),
        ("done", ""),
    ]
    assert result.ok


def test_an_overdue_migration_is_reported_and_cancelled_only_when_configured() -> None:
    for cancel in (False, True):
        gate = threading.Event()
        backend = ScriptedBackend(gates={"a": gate})
        audit = AuditLog(None)
        settings = fast(startup_seconds=0.05, overdue_factor=2, cancel_overdue=cancel)
        queue = Queue([step(1, 1, "a", "n1", "n2")], backend, settings, audit=audit)
        runner = threading.Thread(target=queue.run)
        runner.start()
        deadline = time.monotonic() + 10
        while not any(r["event"] == "overdue" for r in audit.records):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.1)
        assert backend.cancelled == (["a"] if cancel else [])
        gate.set()
        runner.join(timeout=10)
        assert queue.states[0].result == ("failed" if cancel else "done")
        assert sum(r["event"] == "overdue" for r in audit.records) == 1


def test_audit_log_appends_and_replaces_nothing(tmp_path: Path) -> None:
    real = tmp_path / "real.jsonl"
    real.write_text("earlier\n")
    link = tmp_path / "audit.jsonl"
    link.symlink_to(real.name)
    AuditLog(str(link)).record("done", step(1, 1, "a", "n1", "n2"), duration=1.5)
    assert link.is_symlink()
    lines = real.read_text().splitlines()
    assert lines[0] == "earlier"
    record = json.loads(lines[1])
    assert (record["vm"], record["from"], record["to"], record["result"]) == (
        "a",
        "n1",
        "n2",
        "done",
    )
    assert record["duration_seconds"] == 1.5
    with pytest.raises(OutputFileError, match="is a directory"):
        append_output(tmp_path, "x\n")


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod needs root")
def test_audit_log_writes_a_character_device_in_place(tmp_path: Path) -> None:
    null = tmp_path / "null"
    os.mknod(null, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    append_output(null, "record\n")
    assert stat.S_ISCHR(os.stat(null).st_mode)
    block = tmp_path / "block"
    os.mknod(block, 0o600 | stat.S_IFBLK, os.makedev(7, 0))
    with pytest.raises(OutputFileError, match="block device"):
        append_output(block, "x\n")


def test_a_plan_document_is_read_or_refused_in_one_line() -> None:
    document = {
        "format": "vmbalance-plan",
        "version": 1,
        "commands": "proxmox",
        "migrations": [
            {
                "step": 1,
                "wave": 1,
                "vm": "101",
                "name": "web",
                "source": "pve1",
                "target": "pve2",
                "kind": "balance",
                "memory_bytes": 4e9,
            }
        ],
    }
    steps, flavour = steps_of_document(document, "plan.json")
    assert flavour == "proxmox"
    assert steps == [Step(1, 1, "101", "web", "pve1", "pve2", "balance", 4e9)]
    broken = {**document, "migrations": [{**document["migrations"][0], "step": "1"}]}  # type: ignore[dict-item]
    with pytest.raises(CommandError, match=r"plan.json: migrations\[0\]: 'step' is missing"):
        steps_of_document(broken, "plan.json")
    with pytest.raises(CommandError, match="not a vmbalance plan"):
        steps_of_document([], "plan.json")
