"""The audit log: one JSON Lines record per action and outcome of an apply run.

Each record: `time` (ISO-8601, UTC, microseconds), `event` (`started`, `done`, `failed`,
`skipped`, `not-started`, `overdue`, `cancel`), `step`, `vm`, `from`, `to`, `result`,
`duration_seconds`, `downtime_seconds`, `bytes`, `reason`. The file is appended to through
`recommender.output_file.append_output` (a symlink is followed, a FIFO or character device is
written in place, nothing is ever replaced), one whole record per write.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from datetime import UTC, datetime

from recommender.apply.steps import Step
from recommender.output_file import append_output


def _now() -> datetime:
    return datetime.now(UTC)


class AuditLog:
    def __init__(self, path: str | None, clock: Callable[[], datetime] = _now) -> None:
        self.path = path
        self._clock = clock
        self._lock = threading.Lock()
        self.records: list[dict[str, object]] = []

    def record(
        self,
        event: str,
        step: Step,
        *,
        duration: float | None = None,
        downtime: float | None = None,
        transferred: float | None = None,
        reason: str = "",
    ) -> dict[str, object]:
        record: dict[str, object] = {
            "time": self._clock().isoformat(timespec="microseconds"),
            "event": event,
            "step": step.step,
            "vm": step.vm,
            "from": step.source,
            "to": step.target,
            "result": event if event in ("done", "failed", "skipped", "not-started") else None,
            "duration_seconds": duration,
            "downtime_seconds": downtime,
            "bytes": transferred,
            "reason": reason,
        }
        line = json.dumps(record, ensure_ascii=True, allow_nan=False) + "\n"
        with self._lock:
            self.records.append(record)
            if self.path is not None:
                append_output(self.path, line)
        return record
