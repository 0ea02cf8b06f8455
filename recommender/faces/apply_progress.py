"""What `vmbalance apply` shows on stderr while the queue runs.

On a terminal, a live table (rich) with one row per migration: its state, the bytes copied
so far against the total the hypervisor reports, and the time elapsed against the estimate;
it is redrawn in place and left on the screen, final, when the run ends. Anywhere else (a
pipe, a log file, a CI job) one plain line per event, progress at most every 10 s per
migration, so a log reads the same as it did while it was written. Stdout is never touched.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType

from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from recommender.apply.backend import Progress
from recommender.apply.steps import Step
from recommender.config import ApplySettings
from recommender.quoting import display

PROGRESS_LINE_SECONDS = 10.0
# How each state is shown in the table.
_STYLES = {
    "waiting": "dim",
    "started": "cyan",
    "running": "cyan",
    "overdue": "yellow",
    "cancel": "yellow",
    "done": "green",
    "failed": "bold red",
    "skipped": "magenta",
    "not-started": "dim",
}


def byte_size(value: float | None) -> str:
    if value is None:
        return "?"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value:.0f} B"


def _seconds(value: float) -> str:
    minutes, seconds = divmod(round(value), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


class LineProgress:
    """One line per event of the queue; progress at most every 10 s per migration."""

    def __init__(
        self,
        console: Console,
        settings: ApplySettings,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._console = console
        self._settings = settings
        self._clock = clock
        self._started: dict[int, float] = {}
        self._last_progress: dict[int, float] = {}

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        del exc

    def __call__(self, event: str, step: Step, detail: str, progress: Progress) -> None:
        now = self._clock()
        if event == "started":
            self._started[step.step] = now
        elif event == "progress":
            if now - self._last_progress.get(step.step, -PROGRESS_LINE_SECONDS) < (
                PROGRESS_LINE_SECONDS
            ):
                return
            self._last_progress[step.step] = now
            detail = f"{byte_size(progress.bytes_transferred)} of {byte_size(progress.bytes_total)}"
        elapsed = now - self._started.get(step.step, now)
        estimate = step.estimate_seconds(self._settings)
        text = (
            f"step {step.step} {display(step.vm)} {display(step.source)} → "
            f"{display(step.target)}: {event}, {elapsed:.0f} s of ~{estimate:.0f} s"
        )
        self._console.print(text + (f": {display(detail)}" if detail else ""), markup=False)


@dataclass
class _Row:
    step: Step
    state: str = "waiting"
    started: float | None = None
    ended: float | None = None
    progress: Progress = field(default_factory=Progress)
    detail: str = ""


class LiveProgress:
    """A live table of the run's migrations, one row each, redrawn in place on stderr."""

    def __init__(
        self,
        console: Console,
        settings: ApplySettings,
        steps: Sequence[Step],
        clock: Callable[[], float] = time.monotonic,
        refresh_per_second: float = 4.0,
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._rows = {s.step: _Row(s) for s in sorted(steps, key=lambda s: s.step)}
        self._lock = threading.Lock()
        self._live = Live(
            console=console,
            get_renderable=self.table,
            refresh_per_second=refresh_per_second,
            redirect_stdout=False,  # stdout carries the document only
            redirect_stderr=False,
        )

    def __enter__(self) -> LiveProgress:
        self._live.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._live.stop()  # the last frame stays on the screen

    def __call__(self, event: str, step: Step, detail: str, progress: Progress) -> None:
        with self._lock:
            row = self._rows.setdefault(step.step, _Row(step))
            now = self._clock()
            if event == "started":
                row.started = now
                row.state = "running"
            elif event == "progress":
                row.progress = progress
                return
            elif event in ("overdue", "cancel"):
                row.state = event
            else:  # a result: done, failed, skipped, not-started
                row.state = event
                row.ended = now if row.started is not None else None
            row.detail = detail if event != "started" else ""
        self._live.refresh()

    def table(self) -> Table:
        table = Table(title="migrations", title_justify="left", expand=False)
        for column in ("step", "vm", "from → to", "state", "copied", "elapsed / estimate"):
            table.add_column(column, no_wrap=column != "state")
        with self._lock:
            rows = list(self._rows.values())
            now = self._clock()
        for row in rows:
            table.add_row(*self._cells(row, now))
        return table

    def _cells(self, row: _Row, now: float) -> tuple[str | Text, ...]:
        step = row.step
        estimate = step.estimate_seconds(self._settings)
        if row.started is None:
            elapsed = "-"
        else:
            elapsed = _seconds((row.ended if row.ended is not None else now) - row.started)
        copied = "-"
        if row.progress.bytes_transferred is not None or row.progress.bytes_total is not None:
            copied = (
                f"{byte_size(row.progress.bytes_transferred)} of "
                f"{byte_size(row.progress.bytes_total)}"
            )
        state = Text(row.state, style=_STYLES.get(row.state, ""))
        if row.detail:
            state.append(f": {display(row.detail)}", style="dim")
        return (
            str(step.step),
            display(step.vm),
            f"{display(step.source)} → {display(step.target)}",
            state,
            copied,
            f"{elapsed} / ~{_seconds(estimate)}",
        )
