"""The rolling queue: each migration starts as soon as the steps it waits for are done and its
two nodes have a free slot (`max_parallel_per_node`) and the cluster has one (`max_parallel`).

Failure: a failed migration stops every new start (the run ends non-zero once the running ones
have ended); with `continue_on_error` only the steps that wait for it or touch one of its
nodes are skipped, and the rest goes on. A skipped step (the live check found it stale, or the
backend found the VM elsewhere) skips the steps that wait for it. `stop()` — SIGINT or SIGTERM
— starts nothing more and waits for the running migrations: one in flight is never
abandoned. A migration running past `overdue_factor` times its estimate is reported once, and
cancelled only when `cancel_overdue` is set.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from recommender.apply.audit import AuditLog
from recommender.apply.backend import Backend, Outcome, Progress, Result
from recommender.apply.metrics import ApplyMetrics
from recommender.apply.steps import Step, dependencies
from recommender.config import ApplySettings
from recommender.text import one_line

# A live check: the reason to skip `step` now, or None; it is shown the steps already done
# and those in flight, whose effect the live state may not show yet.
LiveCheck = Callable[[Step, Sequence[Step], Sequence[Step]], str | None]
# What the queue tells the terminal: an event name, the step, a line of detail, and the
# migration's latest progress.
Report = Callable[[str, Step, str, Progress], None]


@dataclass
class StepState:
    step: Step
    result: Result | None = None  # None: pending or running
    reason: str = ""
    started: float | None = None  # monotonic seconds
    ended: float | None = None
    overdue: bool = False
    progress: Progress = field(default_factory=Progress)
    outcome: Outcome | None = None

    @property
    def running(self) -> bool:
        return self.started is not None and self.result is None


@dataclass
class QueueResult:
    states: list[StepState]
    stopped: str | None  # why new starts stopped (a failure or a signal), None if never

    def of(self, result: Result) -> list[StepState]:
        return [s for s in self.states if s.result == result]

    @property
    def ok(self) -> bool:
        """Everything that was not skipped ran and succeeded."""
        return self.stopped is None and not self.of("failed") and not self.of("not-started")


def _silent(event: str, step: Step, detail: str, progress: Progress) -> None:
    del event, step, detail, progress


class Queue:
    def __init__(
        self,
        steps: Sequence[Step],
        backend: Backend,
        settings: ApplySettings,
        *,
        check: LiveCheck | None = None,
        audit: AuditLog | None = None,
        metrics: ApplyMetrics | None = None,
        cluster: str = "",
        continue_on_error: bool = False,
        report: Report = _silent,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.states = [StepState(s) for s in sorted(steps, key=lambda s: s.step)]
        self._by_step = {s.step.step: s for s in self.states}
        self._deps = dependencies(steps)
        self._backend = backend
        self._settings = settings
        self._check = check
        self._audit = audit or AuditLog(None)
        self._metrics = metrics or ApplyMetrics()
        self._cluster = cluster
        self._metrics.cluster(cluster)
        self._continue = continue_on_error
        self._report = report
        self._clock = clock
        self._cond = threading.Condition(threading.RLock())
        self._stopped: str | None = None
        self._failed_nodes: set[str] = set()
        self._threads: list[threading.Thread] = []

    # --- control --------------------------------------------------------------------------

    def stop(self, why: str) -> None:
        """Start nothing more; the running migrations go on to their end. Safe to call from a
        signal handler."""
        with self._cond:
            if self._stopped is None:
                self._stopped = why
            self._cond.notify_all()

    def run(self) -> QueueResult:
        with self._cond:
            while True:
                self._skip_doomed()
                if self._stopped is None:
                    self._start_ready()
                running = [s for s in self.states if s.running]
                if not running and (self._stopped is not None or not self._pending()):
                    break
                self._watch_overdue(running)
                self._cond.wait(timeout=min(self._settings.poll_interval_seconds, 0.5))
            for state in self._pending():
                self._finish(state, "not-started", self._stopped or "not started")
        for thread in self._threads:
            thread.join()
        return QueueResult(self.states, self._stopped)

    # --- scheduling -----------------------------------------------------------------------

    def _pending(self) -> list[StepState]:
        return [s for s in self.states if s.result is None and s.started is None]

    def _skip_doomed(self) -> None:
        """Skip the pending steps that can no longer run: one they wait for did not succeed,
        or (with continue_on_error) one of their nodes had a failed migration."""
        for state in self._pending():
            waits = [self._by_step[n] for n in self._deps[state.step.step]]
            broken = [w for w in waits if w.result in ("failed", "skipped", "not-started")]
            if broken:
                first = broken[0]
                self._finish(
                    state,
                    "skipped",
                    f"waits for step {first.step.step} ({first.step.vm}), "
                    f"which {_verb(first.result)}",
                )
                continue
            hit = sorted(set(state.step.nodes) & self._failed_nodes)
            if hit:
                self._finish(state, "skipped", f"node {hit[0]} had a failed migration")

    def _start_ready(self) -> None:
        running = [s for s in self.states if s.running]
        per_node: Counter[str] = Counter(n for s in running for n in s.step.nodes)
        in_flight = len(running)
        for state in self._pending():
            if in_flight >= self._settings.max_parallel:
                return
            waits = [self._by_step[n] for n in self._deps[state.step.step]]
            if any(w.result != "done" for w in waits):
                continue
            if any(per_node[n] >= self._settings.max_parallel_per_node for n in state.step.nodes):
                continue
            self._start(state)
            in_flight += 1
            per_node.update(state.step.nodes)

    def _start(self, state: StepState) -> None:
        state.started = self._clock()
        done = [s.step for s in self.states if s.result == "done"]
        flying = [s.step for s in self.states if s.running and s is not state]
        thread = threading.Thread(
            target=self._work, args=(state, done, flying), name=f"migrate-{state.step.step}"
        )
        self._threads.append(thread)
        thread.start()

    # --- one migration --------------------------------------------------------------------

    def _work(self, state: StepState, done: list[Step], flying: list[Step]) -> None:
        step = state.step
        try:
            reason = self._check(step, done, flying) if self._check else None
        except Exception as exc:  # the live state could not be read: do not migrate blind
            reason = f"live check failed: {one_line(str(exc)) or type(exc).__name__}"
        if reason is not None:
            with self._cond:
                self._finish(state, "skipped", reason)
            return
        with self._cond:
            self._audit.record("started", step)
            self._metrics.in_flight.labels(self._cluster).inc()
            self._report("started", step, f"{step.source} → {step.target}", state.progress)
        try:
            outcome = self._backend.migrate(step, lambda p: self._progress(state, p))
        except Exception as exc:  # a backend bug or a lost connection: never "done"
            outcome = Outcome("failed", one_line(str(exc)) or type(exc).__name__)
        with self._cond:
            self._metrics.in_flight.labels(self._cluster).dec()
            state.outcome = outcome
            state.ended = self._clock()
            self._metrics.duration.labels(self._cluster).observe(
                state.ended - (state.started or state.ended)
            )
            self._finish(state, outcome.result, outcome.reason)

    def _progress(self, state: StepState, progress: Progress) -> None:
        with self._cond:
            state.progress = progress
            self._report("progress", state.step, "", progress)

    def _finish(self, state: StepState, result: Result, reason: str) -> None:
        """Record the end of a step (under the lock) and wake the scheduler."""
        state.result = result
        state.reason = reason
        outcome = state.outcome
        duration = None
        if state.started is not None and state.ended is not None:
            duration = state.ended - state.started
        self._audit.record(
            result,
            state.step,
            duration=duration,
            downtime=outcome.downtime_seconds if outcome else None,
            transferred=outcome.bytes_transferred if outcome else None,
            reason=reason,
        )
        self._metrics.migrations.labels(self._cluster, result).inc()
        self._report(result, state.step, reason, state.progress)
        if result == "failed":
            why = f"step {state.step.step} ({state.step.vm}) failed: {reason}"
            if self._continue:
                self._failed_nodes.update(state.step.nodes)
            elif self._stopped is None:
                self._stopped = why
        self._cond.notify_all()

    def _watch_overdue(self, running: list[StepState]) -> None:
        now = self._clock()
        for state in running:
            estimate = state.step.estimate_seconds(self._settings)
            limit = estimate * self._settings.overdue_factor
            if state.overdue or state.started is None or now - state.started <= limit:
                continue
            state.overdue = True
            elapsed = now - state.started
            reason = f"running {elapsed:.0f} s against an estimate of {estimate:.0f} s"
            self._audit.record("overdue", state.step, duration=elapsed, reason=reason)
            self._metrics.overdue.labels(self._cluster).inc()
            self._report("overdue", state.step, reason, state.progress)
            if self._settings.cancel_overdue:
                self._audit.record("cancel", state.step, duration=elapsed, reason=reason)
                self._report("cancel", state.step, reason, state.progress)
                self._backend.cancel(state.step)


def _verb(result: Result | None) -> str:
    return {"failed": "failed", "skipped": "was skipped"}.get(result or "", "did not start")
