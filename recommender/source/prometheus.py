"""`PrometheusSource`: the queries of `recommender.source.queries` sent to one PromQL API,
their answers checked and turned into a `Snapshot` or a `History`."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from recommender import __version__
from recommender.config import Config, PrometheusSettings
from recommender.history import History, Window
from recommender.model import Snapshot
from recommender.source.answers import Answer, quantiles
from recommender.source.cluster import assemble_snapshot
from recommender.source.clusters import per_cluster_config, qualify, unqualify
from recommender.source.grid import (
    LATEST_QUERY,
    SPACING_QUERY,
    SampleGrid,
    adapted_query,
    latest_sample,
    spacing_of,
)
from recommender.source.history import ReportError, assemble_history
from recommender.source.http import ClientSettings, PromQLClient, SourceError
from recommender.source.queries import ReportQueries, SnapshotQueries, seconds_text
from recommender.text import format_time


def _bearer_token(settings: PrometheusSettings) -> str | None:
    token = settings.bearer_token
    if token is None and settings.bearer_token_file is not None:
        try:
            token = Path(settings.bearer_token_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise SourceError(
                f"cannot read bearer_token_file {settings.bearer_token_file}: {reason}"
            ) from None
    return token or None


class PrometheusSource:
    """Reads snapshots and report history from a PromQL HTTP API.

    `queries_issued` counts the HTTP queries sent, so a test or benchmark can check that a
    snapshot or a report costs the same number of queries for 5 or 5,000 VMs.
    """

    def __init__(self, settings: PrometheusSettings) -> None:
        self.settings = settings
        self.queries_issued = 0
        self._client = PromQLClient(
            ClientSettings(
                url=settings.url,
                timeout_seconds=settings.timeout_seconds,
                bearer_token=_bearer_token(settings),
                username=settings.username,
                password=settings.password,
                ca_file=settings.ca_file,
                insecure_skip_verify=settings.insecure_skip_verify,
            ),
            user_agent=f"vmbalance/{__version__}",
        )
        self.display_url = self._client.display_url

    def _checked(self, result: Any, promql: str, values: str) -> Answer:
        if not isinstance(result, list) or not all(
            isinstance(item, dict) and "metric" in item and values in item for item in result
        ):
            raise SourceError(
                f"prometheus at {self.display_url}: unexpected answer shape (query: {promql})"
            )
        return result

    def query(self, promql: str, at: float) -> Answer:
        """One instant query evaluated at unix time `at`; raises SourceError on any failure."""
        self.queries_issued += 1
        return self._checked(self._client.query(promql, at), promql, "value")

    def query_range(self, promql: str, start: float, end: float, step: float) -> Answer:
        """One range query from `start` to `end` (unix seconds, whole seconds are sent) every
        `step` seconds; raises SourceError on any failure, like `query`."""
        self.queries_issued += 1
        result = self._client.query_range(promql, start, end, seconds_text(step))
        return self._checked(result, promql, "values")

    def sample_grid(self, at: float) -> SampleGrid:
        """The latest sample at or before `at` and the samples' spacing (two queries)."""
        answer = self.query(LATEST_QUERY, at)
        if not answer:
            return SampleGrid(at=at, requested=at)
        latest = latest_sample(answer, at)
        spacing = spacing_of(self.query(SPACING_QUERY, latest))
        return SampleGrid(at=latest, spacing=spacing, requested=at)

    def _snapshot_answer(
        self, plan: SnapshotQueries, name: str, promql: str, at: float, q: float
    ) -> Answer:
        if name not in plan.quantiles:
            return self.query(promql, at)
        self.queries_issued += 1
        return quantiles(self._checked(self._client.query(promql, at), promql, "values"), q)

    def build_snapshot(
        self, config: Config, at: datetime | None = None, grid: SampleGrid | None = None
    ) -> Snapshot:
        """The cluster at the latest sample at or before `at` (default now), every query
        evaluated at that time and laid on the data's spacing (`recommender.source.grid`)."""
        when = at if at is not None else datetime.now(UTC)
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        grid = grid if grid is not None else self.sample_grid(when.timestamp())
        query, notes = adapted_query(config.query, grid)
        config = config.model_copy(update={"query": query})
        plan = SnapshotQueries.for_config(config, grid)
        t = grid.at
        answers = {
            name: self._snapshot_answer(plan, name, promql, t, query.quantile)
            for name, promql in plan.queries.items()
        }
        moved = [item["metric"]["vm"] for item in answers["vm_moved"] if "vm" in item["metric"]]
        answers["vm_departed"] = [
            item for promql in plan.departures(moved) for item in self.query(promql, t)
        ]
        taken = datetime.fromtimestamp(t, UTC)
        apart = qualify(answers)
        within = per_cluster_config(config, apart) if apart.any else config
        assembled = assemble_snapshot(within, plan, apart.answers, taken, self.display_url)
        snapshot = unqualify(assembled, apart)
        snapshot.warnings[:0] = notes
        return snapshot

    def history(self, config: Config, window: Window, grid: SampleGrid | None = None) -> History:
        """The report's queries over `window`; ReportError when it holds no vmbalance data."""
        queries = ReportQueries.for_config(config, window, grid)
        start = round(window.start + queries.shift)
        end = round(window.end + queries.shift)
        ranges: dict[str, Answer] = {}
        for name, promql in queries.ranges.items():
            ranges[name] = self.query_range(promql, start, end, window.step)
            if name == "presence" and not ranges[name]:
                raise ReportError(
                    f"no vmbalance data between {format_time(window.begin)} and "
                    f"{format_time(window.end)} (no vmbalance_vm_info series at "
                    f"{self.display_url})"
                )
        instants = {
            name: self.query(promql, window.end) for name, promql in queries.instants.items()
        }
        return assemble_history(config, window, ranges, instants, queries.shift)


def build_snapshot(config: Config, at: datetime | None = None) -> Snapshot:
    """Snapshot from the server in `config.prometheus` (one-shot convenience)."""
    return PrometheusSource(config.prometheus).build_snapshot(config, at)


__all__ = ["PrometheusSource", "build_snapshot"]
