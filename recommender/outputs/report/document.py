"""The weekly report as Markdown: what the period showed (`recommender.outputs.report.analysis`),
the plan for now, and the charts, through `report.md.j2`.

Names are untrusted: everything a tenant can choose goes through the escaping filters of
`recommender.outputs.markdown`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime

from recommender.config import Config
from recommender.history import EXECUTED_RESULTS, Executed, Window
from recommender.model import RESOURCES, Snapshot, finite_or_none
from recommender.outputs.commands import commands_refusal, plan_commands, render_commands
from recommender.outputs.document import plan_document
from recommender.outputs.explain import basis, held_kind, needed_text, no_migration_reason
from recommender.outputs.markdown import environment
from recommender.outputs.report.analysis import TOP_ORDER, Analysis
from recommender.outputs.report.charts import RESOURCE_LABELS
from recommender.outputs.report.forecast import DAY, HORIZON, MIN_POINTS, Crossing, Outcome
from recommender.outputs.report.migrations import EFFECT_POINTS
from recommender.plan import Plan
from recommender.resources import GIB
from recommender.text import format_time

RESOURCE_TITLES: dict[str, str] = {
    r: label[:1].upper() + label[1:] for r, label in RESOURCE_LABELS.items()
}


@dataclass(frozen=True)
class HeldBackRow:
    vm: str
    name: str
    source: str
    target: str
    gain: float
    blocked_by: str
    needed: str = "n/a"  # the gain hysteresis asked for
    kind: str = "rule"  # "rule" or "hysteresis"


@dataclass(frozen=True)
class ReportData:
    """Everything the template shows."""

    config: Config
    period: str
    window: Window
    source: str  # the server, as shown (no credentials)
    queries: int  # PromQL queries the report cost
    analysis: Analysis
    plan: Plan | None
    plan_error: str | None  # why there is no plan
    held_back: list[HeldBackRow]
    charts: dict[str, str]  # chart key -> file name next to report.md
    warnings: list[str]
    generated_at: float
    covered: float = math.nan  # seconds of the period the data covers
    executed: Executed = field(default_factory=Executed)  # what vmbalance itself migrated

    @property
    def executed_rows(self) -> list[tuple[str, int]]:
        """(result, migrations) in the metric's order, the results that occurred."""
        return [(r, self.executed.by_result[r]) for r in EXECUTED_RESULTS
                if r in self.executed.by_result]  # fmt: skip

    @property
    def coverage(self) -> str:
        """`Data covers 1.0 day(s) of the 7 requested.` when it covers less than the period."""
        span = self.window.span
        if not math.isfinite(self.covered) or self.covered >= span - self.window.step:
            return ""
        return (
            f"Data covers {self.covered / 86400:.1f} day(s) of the {span / 86400:g} requested: "
            "rates are over the covered time, no trend is drawn from less than 3 days."
        )

    @property
    def basis(self) -> str:
        """When and how the plan's loads were estimated."""
        return f"Plan loads {basis(self.plan)}." if self.plan is not None else ""

    @property
    def recommendation(self) -> str:
        return recommendation(self.plan, self.plan_error, self.config.balance.trigger)


def recommendation(plan: Plan | None, plan_error: str | None, trigger: float) -> str:
    """Whether action is recommended, in one sentence."""
    if plan is None:
        return f"No recommendation: the current state could not be read ({plan_error})."
    if plan.migrations:
        return (
            f"Action recommended: {len(plan.migrations)} migration(s) in {len(plan.waves)} "
            f"wave(s) bring the overall imbalance from {plan.overall_before:.3f} to "
            f"{plan.overall_after:.3f} (trigger {trigger:.3f})."
        )
    if plan.triggered:
        return (
            f"The overall imbalance {plan.overall_before:.3f} is above the trigger "
            f"{trigger:.3f}. {no_migration_reason(plan)} See what blocked better balance."
        )
    return (
        f"No action needed: the overall imbalance {plan.overall_before:.3f} is under the "
        f"trigger {trigger:.3f}."
    )


def held_back_rows(plan: Plan | None, snapshot: Snapshot | None) -> list[HeldBackRow]:
    """The moves the rules held back, with the VM's name from the snapshot."""
    if plan is None:
        return []
    names = snapshot.vms["name"] if snapshot is not None else None
    return [
        HeldBackRow(
            vm=h.vm,
            name=str(names.get(h.vm, h.vm)) if names is not None else h.vm,
            source=h.source,
            target=h.target,
            gain=h.gain,
            blocked_by=", ".join(h.blocked_by),
            needed=needed_text(h),
            kind=held_kind(h),
        )
        for h in plan.held_back
    ]


def report_warnings(
    history_warnings: list[str], snapshot: Snapshot | None, plan: Plan | None
) -> list[str]:
    """The history's warnings, then the snapshot's, then the plan's not said already."""
    warnings = list(history_warnings)
    if snapshot is not None:
        warnings += snapshot.warnings
    if plan is not None:
        warnings += [w for w in plan.warnings if w not in warnings]
    return warnings


# --- formatting ------------------------------------------------------------------------------


def format_date(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d")


def format_duration(seconds: float) -> str:
    if seconds <= 0:
        return "0 h"
    if seconds >= 2 * DAY:
        return f"{seconds / DAY:.1f} d"
    return f"{seconds / 3600:.1f} h"


def quantity(value: float | None, resource: str) -> str:
    """A load or capacity in its unit, for a table cell."""
    known = finite_or_none(value)
    if known is None:
        return "n/a"
    if resource == "cpu":
        return f"{known:.1f} cores"
    if resource == "memory":
        return f"{known / GIB:.1f} GiB"
    if resource == "disk_ops":
        return f"{known:,.0f} ops/s"
    for unit, size in (("GB/s", 1e9), ("MB/s", 1e6), ("kB/s", 1e3)):
        if abs(known) >= size:
            return f"{known / size:.1f} {unit}"
    return f"{known:.0f} B/s"


def ratio(value: float | None) -> str:
    known = finite_or_none(value)
    return "n/a" if known is None else f"{known:.3f}"


def signed_points(value: float | None) -> str:
    """A change of utilisation in percentage points."""
    known = finite_or_none(value)
    if known is None:
        return "n/a"
    shown = round(100 * known, 1) or 0.0  # no "-0.0"
    return f"{shown:+.1f} pts"


def describe_crossing(crossing: Crossing) -> str:
    """A table cell: the date and how far away, or why there is none."""
    outcome = crossing.outcome
    if outcome is Outcome.ALREADY:
        return "already reached"
    if outcome is Outcome.CROSSES and crossing.at is not None:
        days = crossing.days or 0.0
        return f"{format_date(crossing.at)} (in {days:.0f} days)"
    horizon = crossing.horizon / DAY
    if outcome is Outcome.NOT_ENOUGH_DATA:
        return f"not enough data ({MIN_POINTS} days needed)"
    if outcome is Outcome.NO_TREND:
        return "no clear trend"
    if outcome is Outcome.FALLING:
        return "no (falling)"
    return f"not within {horizon:.0f} days"


def render_report(data: ReportData) -> str:
    """The Markdown of a report; every tenant-controlled value passes an escaping filter."""
    env = environment()
    env.filters.update(
        quantity=quantity,
        ratio=ratio,
        points=signed_points,
        when=format_time,
        duration=format_duration,
        crossing=describe_crossing,
    )
    plan = data.plan
    commands = plan_commands(plan, data.config) if plan is not None else None
    refusal = commands_refusal(commands) if commands is not None else None
    return env.get_template("report.md.j2").render(
        r=data,
        a=data.analysis,
        config=data.config,
        plan=plan,
        doc=plan_document(plan, data.config, commands) if plan is not None else None,
        commands=render_commands(plan, data.config, commands) if plan and not refusal else "",
        commands_refusal=str(refusal) if refusal is not None else None,
        labels=RESOURCE_LABELS,
        titles=RESOURCE_TITLES,
        resources=RESOURCES,
        top_order=TOP_ORDER,
        horizon_days=HORIZON / DAY,
        effect_points=EFFECT_POINTS,
    )


__all__ = [
    "HeldBackRow",
    "ReportData",
    "held_back_rows",
    "recommendation",
    "render_report",
    "report_warnings",
]
