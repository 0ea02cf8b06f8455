"""serve's automation levels: after each planning run, decide whether to execute the plan, and
execute it through the same rolling queue as `vmbalance apply`.

`manual` executes nothing. `partial` executes only the migrations that evacuate nodes in
maintenance and repair broken rules; `full` executes balancing plans too. Both execute only
inside the maintenance windows, at least `min_seconds_between_plans` after the last executed
plan, within the daily migration budget, while not paused (the pause file, or POST
/-/pause on serve's port), and while holding the lock file (flock), so that one instance
executes for a cluster at a time. A migration that would take a VM back to a node it was
moved off within the cooldown is dropped from the plan.

The budget, the time of the last plan and the moves are kept in the state file
(`recommender.apply.state`), read and written under the lock: a restart, or another
instance sharing the lock, sees what was executed before.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import IO, Any
from zoneinfo import ZoneInfo

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from recommender.apply.audit import AuditLog
from recommender.apply.backend import Backend
from recommender.apply.live import live_check
from recommender.apply.metrics import ApplyMetrics
from recommender.apply.queue import Queue, QueueResult
from recommender.apply.state import (
    AutomationState,
    ExecutedPlan,
    Move,
    StateFileError,
    load_state,
    save_state,
)
from recommender.apply.steps import Step, steps_of_plan
from recommender.config import Config, parse_window
from recommender.faces.errors import known_error
from recommender.model import Snapshot
from recommender.plan import Plan

log = logging.getLogger("vmbalance.automation")

# The kinds `partial` executes: emptying a node in maintenance, repairing a broken rule.
FORCED_KINDS = ("evacuate", "repair")
BackendFactory = Callable[[Plan, Config], Backend]


@dataclass(frozen=True)
class Decision:
    executed: int  # migrations handed to the queue
    reason: str  # why nothing (or not everything) was executed; "" when all was


def in_windows(windows: Iterable[str], now: datetime) -> bool:
    """Whether `now` (aware, in the schedule's zone) is inside one of the windows."""
    windows = list(windows)
    if not windows:
        return True
    minute = now.hour * 60 + now.minute
    for text in windows:
        days, start, end = parse_window(text)
        if start < end and now.weekday() in days and start <= minute < end:
            return True
        if start > end:  # past midnight: from `start` on its day to `end` the next morning
            if now.weekday() in days and minute >= start:
                return True
            if (now.weekday() - 1) % 7 in days and minute < end:
                return True
    return False


@contextlib.contextmanager
def execution_lock(path: str) -> Iterator[bool]:
    """flock(LOCK_EX | LOCK_NB) on `path` for the block; yields whether it was obtained."""
    handle: IO[bytes] = open(path, "ab")  # noqa: SIM115 - held for the block
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    finally:
        handle.close()


class Automation:
    def __init__(
        self,
        config: Config,
        backend_factory: BackendFactory,
        snapshot_source: Callable[[], Snapshot],
        *,
        wall: Callable[[], float] = time.time,
        metrics: ApplyMetrics | None = None,
    ) -> None:
        self.config = config
        self.settings = config.automation
        self._backend_factory = backend_factory
        self._snapshot_source = snapshot_source
        self._wall = wall
        self.metrics = metrics or ApplyMetrics()
        self._audit = AuditLog(config.apply.audit_log)
        self._lock = threading.Lock()
        self._paused_by_http = False
        self._queue: Queue | None = None
        lock = self.settings.lock_file or ""
        self.state_file = self.settings.state_file or f"{lock}.state"
        self._unsaved: AutomationState | None = None
        self.decisions = 0
        self.last_reason = ""

    # --- the pause switch -----------------------------------------------------------------

    def paused(self) -> bool:
        path = self.settings.pause_file
        return self._paused_by_http or bool(path and os.path.lexists(path))

    def set_paused(self, paused: bool) -> None:
        with self._lock:
            self._paused_by_http = paused
            queue = self._queue
        if paused and queue is not None:
            queue.stop("paused")

    def stop(self, why: str) -> None:
        """serve is ending: start nothing more; the running migrations finish."""
        with self._lock:
            queue = self._queue
        if queue is not None:
            queue.stop(why)

    # --- one decision ---------------------------------------------------------------------

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._wall(), ZoneInfo(self.settings.timezone))

    def _eligible(self, plan: Plan) -> list[Step]:
        steps = steps_of_plan(plan)
        if self.settings.level == "partial":
            steps = [s for s in steps if s.kind in FORCED_KINDS]
        return steps

    def _refusal(self, steps: list[Step]) -> str | None:
        """Why nothing may execute now, from what needs no state."""
        if self.settings.level == "manual":
            return "automation level manual"
        if not steps:
            return "nothing to execute at this level"
        if self.paused():
            return "paused"
        if not in_windows(self.settings.windows, self._now()):
            return "outside the maintenance windows"
        return None

    def _scope(self, scope: str, cluster: str) -> str | None:
        return None if scope == "global" else cluster

    def _state_refusal(self, state: AutomationState, cluster: str) -> str | None:
        last = state.last_executed(self._scope(self.settings.interval_scope, cluster))
        if last is not None and self._wall() - last < self.settings.min_seconds_between_plans:
            return "too soon after the last executed plan"
        if self._budget_left(state, cluster) <= 0:
            return "daily migration budget spent"
        return None

    def _budget_left(self, state: AutomationState, cluster: str) -> int:
        zone = ZoneInfo(self.settings.timezone)
        scope = self._scope(self.settings.budget_scope, cluster)
        return self.settings.daily_migration_budget - state.spent(scope, self._day(), zone)

    def _day(self) -> str:
        return self._now().date().isoformat()

    def _not_back(
        self, steps: list[Step], state: AutomationState, cluster: str
    ) -> tuple[list[Step], str]:
        """The steps that take no VM back to a node it left within its cooldown."""
        now, cooldown = self._wall(), self.config.balance.cooldown_seconds
        kept = [
            s for s in steps if s.target not in state.left_recently(cluster, s.vm, now, cooldown)
        ]
        dropped = len(steps) - len(kept)
        note = f"{dropped} migration(s) would move a VM back within its cooldown" if dropped else ""
        return kept, note

    def consider(self, plan: Plan, cluster: str = "") -> Decision:
        """Execute what this level allows of `plan` (of `cluster`) now, and say what was done
        and why not."""
        self.metrics.cluster(cluster)
        steps = self._eligible(plan)
        refusal = self._refusal(steps)
        if refusal is not None:
            return self._decided(0, refusal)
        assert self.settings.lock_file is not None  # checked by AutomationSettings
        with execution_lock(self.settings.lock_file) as held:
            if not held:
                return self._decided(0, "another instance holds the lock")
            try:
                state = self._load_state()
            except StateFileError as exc:  # what was executed is unknown: execute nothing
                return self._decided(0, f"state file: {exc}")
            steps, note = self._not_back(steps, state, cluster)
            refusal = self._state_refusal(state, cluster) if steps else None
            if not steps or refusal is not None:
                reason = refusal or "nothing to execute at this level"
                return self._decided(0, "; ".join(r for r in (reason, note) if r))
            budget = self._budget_left(state, cluster)
            if len(steps) > budget:
                note = "; ".join(n for n in (note, f"budget: {budget} of {len(steps)}") if n)
                steps = steps[:budget]
            result = self._execute(plan, steps, cluster)
            return self._remember(state, cluster, result, note)

    def _load_state(self) -> AutomationState:
        """The state file's memory; one this instance could not write yet is written first,
        and until it is, nothing executes."""
        unsaved = self._unsaved
        if unsaved is None:
            return load_state(self.state_file)
        save_state(self.state_file, unsaved)
        self._unsaved = None
        return unsaved

    def _execute(self, plan: Plan, steps: list[Step], cluster: str) -> QueueResult:
        queue = Queue(
            steps,
            self._backend_factory(plan, self.config),
            self.config.apply,
            check=live_check(self._snapshot_source, self.config),
            audit=self._audit,
            metrics=self.metrics,
            cluster=cluster,
        )
        with self._lock:
            self._queue = queue
        if self.paused():
            queue.stop("paused")
        try:
            return queue.run()
        finally:
            with self._lock:
                self._queue = None

    def _remember(
        self, state: AutomationState, cluster: str, result: QueueResult, note: str
    ) -> Decision:
        """Write down what was executed (under the lock), then say so."""
        started = [s for s in result.states if s.started is not None and s.result != "skipped"]
        now = self._wall()
        moves = [
            Move(now, cluster, s.step.vm, s.step.source, s.step.target) for s in result.of("done")
        ]
        state.add(ExecutedPlan(now, cluster, len(started)), moves)
        keep = max(self.config.balance.cooldown_seconds, self.settings.min_seconds_between_plans)
        reasons = [result.stopped or "", note]
        state = state.pruned(now, keep)
        try:
            save_state(self.state_file, state)
        except StateFileError as exc:  # kept in memory, written before anything else executes
            self._unsaved = state
            log.error("automation: %s", exc)
            reasons.append(f"state file: {exc}")
        return self._decided(len(started), "; ".join(r for r in reasons if r))

    def _decided(self, executed: int, reason: str) -> Decision:
        self.decisions += 1
        self.last_reason = reason
        if reason:
            log.info("automation: executed %d migration(s); %s", executed, reason)
        return Decision(executed, reason)

    # --- serve's port and metrics ---------------------------------------------------------

    def http(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        """POST /-/pause and POST /-/resume; any other method is 405."""
        if environ.get("REQUEST_METHOD") != "POST":
            start_response(
                "405 Method Not Allowed", [("Allow", "POST"), ("Content-Type", "text/plain")]
            )
            return [b"POST only\n"]
        pause = environ.get("PATH_INFO") == "/-/pause"
        self.set_paused(pause)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"paused\n" if pause else b"resumed\n"]

    def collector(self) -> Collector:
        return _AutomationCollector(self)


class _AutomationCollector(Collector):
    def __init__(self, automation: Automation) -> None:
        self._automation = automation

    def collect(self) -> Iterator[Metric]:
        a = self._automation
        yield GaugeMetricFamily(
            "vmbalance_automation_paused", "1 while execution is paused.", value=float(a.paused())
        )
        yield CounterMetricFamily(
            "vmbalance_automation_decisions", "Plans considered for execution.", value=a.decisions
        )
        yield from a.metrics.registry.collect()


PAUSE_PATHS = ("/-/pause", "/-/resume")


def automation_for(config: Config, snapshot_source: Callable[[], Snapshot]) -> Automation | None:
    """serve's automation, or None at level manual."""
    if config.automation.level == "manual":
        return None
    from recommender.faces.apply import make_backend
    from recommender.outputs.commands import command_flavour

    def backend(plan: Plan, config: Config) -> Backend:
        return make_backend(command_flavour(plan, config), config)

    return Automation(config, backend, snapshot_source)


def after_plan(automation: Automation) -> Callable[[Plan, str], None]:
    """The hook serve calls after each successful planning run; a failure to execute is
    logged and counted, never the end of serve."""

    def hook(plan: Plan, cluster: str = "") -> None:
        try:
            automation.consider(plan, cluster)
        except Exception as exc:
            message = known_error(exc)
            if message is None:
                log.exception("automation failed")
                message = f"{type(exc).__name__}: {exc}"
            else:
                log.warning("automation failed: %s", message)
            automation.last_reason = message

    return hook
