"""`vmbalance report`: read a period of history and the cluster now from Prometheus, plan,
analyse, draw, and write `report.md` with its charts.

The queries are fixed in number whatever the number of VMs (docs/report.md lists them):
range queries at a step of about period/336 (30 min for a week, so every series has at most
336 points), a few instant queries over the whole period, and the recommender's own snapshot
at the end of the period for the plan.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from recommender.config import Config, duration_seconds
from recommender.history import History, Window, history_of_nodes, report_window
from recommender.model import Snapshot
from recommender.output_file import write_output
from recommender.outputs.report.analysis import Analysis, analyse
from recommender.outputs.report.charts import (
    CHARTS,
    chart_forecast,
    chart_frontier,
    chart_imbalance,
    chart_plan,
    chart_utilisation,
)
from recommender.outputs.report.document import (
    ReportData,
    held_back_rows,
    render_report,
    report_warnings,
)
from recommender.plan import Plan, build_plan
from recommender.preflight import SnapshotUnusable, check_snapshot, select_cluster
from recommender.source.grid import SampleGrid
from recommender.source.history import ReportError
from recommender.source.http import SourceError
from recommender.source.prometheus import PrometheusSource

MIN_PERIOD = 3600.0


def parse_period(period: str) -> float:
    """Seconds of `--period`; ReportError (one line) when it is not a duration of 1h or more."""
    try:
        seconds = duration_seconds(period)
    except ValueError as exc:
        raise ReportError(f"period: {exc}") from None
    if seconds < MIN_PERIOD:
        raise ReportError(f"period {period!r} is too short (at least 1h)")
    return seconds


def plan_now(
    source: PrometheusSource,
    config: Config,
    window: Window,
    grid: SampleGrid | None = None,
    cluster: str | None = None,
) -> tuple[Snapshot | None, Plan | None, str | None]:
    """The snapshot and plan (of `cluster`, or of the only one) at the end of the period, or
    why there is none; ClusterChoice when the data holds several clusters and none is
    chosen."""
    snapshot: Snapshot | None = None
    try:
        at = datetime.fromtimestamp(window.end, UTC)
        snapshot = source.build_snapshot(config, at=at, grid=grid)
        snapshot = select_cluster(snapshot, cluster)
        check_snapshot(snapshot)
        return snapshot, build_plan(snapshot, config), None
    except (SourceError, SnapshotUnusable) as exc:
        return snapshot, None, str(exc)


def draw_charts(
    out_dir: Path, history: History, analysis: Analysis, plan: Plan | None, config: Config
) -> dict[str, str]:
    """Every chart into `out_dir` (a chart left from an earlier report that this one does not
    have is removed); chart key -> file name."""
    out_dir.mkdir(parents=True, exist_ok=True)
    end = history.window.end
    paths = {
        "imbalance": chart_imbalance(
            analysis.series, analysis.migrations, config, out_dir / CHARTS["imbalance"]
        ),
        "utilisation": chart_utilisation(
            history, analysis.cluster, out_dir / CHARTS["utilisation"]
        ),
        "forecast": chart_forecast(
            analysis.cluster, analysis.forecasts, end, out_dir / CHARTS["forecast"]
        ),
    }
    # An empty plan has no before and after to compare.
    if plan is not None and plan.migrations:
        paths["plan"] = chart_plan(plan, out_dir / CHARTS["plan"])
    # The trade-off curve exists only where balancing ran.
    if plan is not None and plan.frontier is not None and plan.frontier.points:
        paths["frontier"] = chart_frontier(plan, config, out_dir / CHARTS["frontier"])
    for key, name in CHARTS.items():
        stale = out_dir / name
        if key not in paths and stale.is_file():
            stale.unlink()
    return {key: path.name for key, path in paths.items()}


def build_report(
    config: Config,
    period: str,
    at: datetime,
    out_dir: Path,
    source: PrometheusSource | None = None,
    cluster: str | None = None,
) -> ReportData:
    """Query, plan, analyse and draw the charts into `out_dir`; the Markdown is rendered from
    the result."""
    period_s = parse_period(period)
    source = source if source is not None else PrometheusSource(config.prometheus)
    # The period ends at the latest sample at or before `at`, its steps on the data's grid.
    grid = source.sample_grid(at.timestamp(), cluster)
    window = report_window(period_s, grid.at, grid.spacing)
    # One cluster's report reads only its series: node names repeat across clusters.
    history = source.history(config, window, grid, cluster)
    snapshot, plan, plan_error = plan_now(source, config, window, grid, cluster)
    if cluster is not None and snapshot is not None:
        history = history_of_nodes(history, [str(n) for n in snapshot.nodes.index])
    now = None if plan is None else {**plan.imbalance_before, "overall": plan.overall_before}
    analysis = analyse(history, config, now)
    return ReportData(
        config=config,
        period=period,
        window=window,
        source=source.display_url,
        queries=source.queries_issued,
        analysis=analysis,
        plan=plan,
        plan_error=plan_error,
        held_back=held_back_rows(plan, snapshot),
        charts=draw_charts(out_dir, history, analysis, plan, config),
        warnings=report_warnings(history.warnings, snapshot, plan),
        generated_at=datetime.now(UTC).timestamp(),
        covered=history.covered,
        executed=history.executed,
    )


def write_report(
    config: Config,
    period: str = "7d",
    out_dir: Path = Path("report"),
    at: datetime | None = None,
    cluster: str | None = None,
) -> Path:
    """Write `report.md` and its PNG charts into `out_dir`; returns the Markdown's path.

    Raises ReportError (a SourceError) when the period holds no data or is not a duration,
    and SourceError when Prometheus cannot be queried.
    """
    when = at if at is not None else datetime.now(UTC)
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    out_dir = Path(out_dir)
    text = render_report(build_report(config, period, when, out_dir, cluster=cluster))
    target = out_dir / "report.md"
    # Written whole or not at all: a reader (or a mail job) never sees half a report.
    write_output(target, text)
    return target


__all__ = ["build_report", "parse_period", "write_report"]
