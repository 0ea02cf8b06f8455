"""What the queue asks of a backend, and what a backend answers.

A backend migrates one VM and blocks until the migration has ended — succeeded, failed, or in
a state it cannot tell (which is a failure: a migration is never reported done unless the
hypervisor said so). It raises nothing for an outcome; an exception is a failure too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

from recommender.apply.steps import Step

# What became of one step: migrated, failed, skipped (checked and left alone, with a reason),
# or never started (the run stopped first).
Result = Literal["done", "failed", "skipped", "not-started"]


@dataclass(frozen=True)
class Progress:
    """A running migration's latest figures, as far as the backend knows them."""

    bytes_transferred: float | None = None
    bytes_total: float | None = None


@dataclass(frozen=True)
class Outcome:
    result: Result
    reason: str = ""
    downtime_seconds: float | None = None
    bytes_transferred: float | None = None
    # The end of the hypervisor's own log of the migration (a Proxmox task log, ...).
    log_tail: tuple[str, ...] = field(default=())
    exit_status: str | None = None


ProgressCallback = Callable[[Progress], None]


class Backend(Protocol):
    def migrate(self, step: Step, progress: ProgressCallback) -> Outcome:
        """Migrate `step.vm` from `step.source` to `step.target`; return when it has ended."""
        ...

    def cancel(self, step: Step) -> None:
        """Ask the hypervisor to abort the running migration of `step` (it then ends as
        failed); returns at once."""
        ...
