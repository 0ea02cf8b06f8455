"""`PrometheusSource`: the queries of `recommender.source.queries` sent to one PromQL API,
their answers checked and turned into a `Snapshot` or a `History`."""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from recommender import __version__
from recommender.config import Config, PrometheusSettings
from recommender.history import History, Window
from recommender.model import Snapshot
from recommender.source.answers import Answer, presence_frame, quantiles
from recommender.source.cluster import assemble_snapshot, first_seen, last_samples, unsettled
from recommender.source.clusters import per_cluster_config, qualify, unqualify
from recommender.source.grid import (
    LATEST_QUERY,
    SPACING_QUERY,
    SampleGrid,
    adapted_query,
    latest_sample,
    spacing_of,
)
from recommender.source.history import (
    ReportError,
    assemble_history,
    exact_loads,
    moved_vms,
)
from recommender.source.http import ClientSettings, PromQLClient, SourceError
from recommender.source.queries import ReportQueries, SnapshotQueries, in_cluster, seconds_text
from recommender.text import format_time

# Snapshot queries in flight at once: a server evaluates each on one core, so a few side by
# side finish together in about the time of the slowest (Prometheus runs up to
# `--query.max-concurrency`, default 20, at a time; VictoriaMetrics twice its cores).
PARALLEL_QUERIES = 4
# The presence answers the raw reads of `_answers` wait for.
PRESENCE = ("vm_moved", "vm_settled", "vm_seen_now", "vm_seen_recently")


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
    snapshot or a report costs the same number of queries for 5 or 5,000 VMs. A snapshot's
    queries are sent `PARALLEL_QUERIES` at a time.
    """

    def __init__(self, settings: PrometheusSettings) -> None:
        self.settings = settings
        self.queries_issued = 0
        self._count_lock = threading.Lock()
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

    def _count(self) -> None:
        with self._count_lock:
            self.queries_issued += 1

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
        self._count()
        return self._checked(self._client.query(promql, at), promql, "value")

    def query_range(self, promql: str, start: float, end: float, step: float) -> Answer:
        """One range query from `start` to `end` (unix seconds, whole seconds are sent) every
        `step` seconds; raises SourceError on any failure, like `query`."""
        self._count()
        result = self._client.query_range(promql, start, end, seconds_text(step))
        return self._checked(result, promql, "values")

    def _counted_query(self, promql: str, at: float) -> Any:
        self._count()
        return self._client.query(promql, at)

    def sample_grid(self, at: float, cluster: str | None = None) -> SampleGrid:
        """The latest sample at or before `at` and the samples' spacing (two queries); with
        `cluster`, of that cluster's series only (its exporters' scrape interval, and no
        reading of a whole fleet's series for one cluster's plan)."""
        latest_query, spacing_query = LATEST_QUERY, SPACING_QUERY
        if cluster is not None:
            latest_query, spacing_query = (
                in_cluster(latest_query, cluster),
                in_cluster(spacing_query, cluster),
            )
        answer = self.query(latest_query, at)
        if not answer:
            return SampleGrid(at=at, requested=at)
        latest = latest_sample(answer, at)
        spacing = spacing_of(self.query(spacing_query, latest))
        return SampleGrid(at=latest, spacing=spacing, requested=at)

    def _snapshot_answer(
        self, plan: SnapshotQueries, name: str, promql: str, at: float, q: float
    ) -> Answer:
        if name not in plan.quantiles:
            return self.query(promql, at)
        return quantiles(self.raw(promql, at), q)

    def raw(self, promql: str, at: float) -> Answer:
        """An instant query answering a range per series: raw samples
        (`SnapshotQueries.departures`, `arrivals`), or a subquery's points."""
        self._count()
        return self._checked(self._client.query(promql, at), promql, "values")

    def _answers(self, plan: SnapshotQueries, at: float, q: float) -> dict[str, Answer]:
        """Every answer of `plan` at `at`, and from the raw samples of the VMs that moved
        (`departures`) or are not settled on their node (`arrivals`) when they left a node
        (`vm_departed`) and when they appeared on one (`vm_first_seen`); the queries sent
        `PARALLEL_QUERIES` at a time. The first failure, in the order of `plan.queries`, is
        raised and what is not yet sent is not sent."""
        with ThreadPoolExecutor(PARALLEL_QUERIES, thread_name_prefix="snapshot") as pool:
            try:
                # The presence first: the raw reads wait for it, the other queries do not.
                names = sorted(plan.queries, key=lambda name: name not in PRESENCE)
                pending: dict[str, Future[Answer]] = {
                    name: pool.submit(self._snapshot_answer, plan, name, plan.queries[name], at, q)
                    for name in names
                }
                departures: list[Future[Answer]] = []
                arrivals: list[Future[Answer]] = []
                if all(pending[name].exception() is None for name in PRESENCE):
                    moved = sorted(
                        {
                            item["metric"]["vm"]
                            for item in pending["vm_moved"].result()
                            if "vm" in item["metric"]
                        }
                    )
                    seen = pending["vm_seen_now"].result() + pending["vm_seen_recently"].result()
                    young = set(unsettled(seen, pending["vm_settled"].result())) - set(moved)
                    departures = [pool.submit(self.raw, p, at) for p in plan.departures(moved)]
                    arrivals = [pool.submit(self.raw, p, at) for p in plan.arrivals(sorted(young))]
                answers = {name: pending[name].result() for name in plan.queries}
                left = [item for f in departures for item in f.result()]
                came = [item for f in arrivals for item in f.result()]
                answers["vm_departed"] = last_samples(left, at)
                answers["vm_first_seen"] = first_seen(
                    answers["vm_settled"], left + came, at - plan.window, at
                )
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
        return answers

    def build_snapshot(
        self,
        config: Config,
        at: datetime | None = None,
        grid: SampleGrid | None = None,
        cluster: str | None = None,
    ) -> Snapshot:
        """The cluster at the latest sample at or before `at` (default now), every query
        evaluated at that time and laid on the data's spacing (`recommender.source.grid`);
        with `cluster`, only the series of that cluster are read."""
        when = at if at is not None else datetime.now(UTC)
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        grid = grid if grid is not None else self.sample_grid(when.timestamp(), cluster)
        query, notes = adapted_query(config.query, grid)
        config = config.model_copy(update={"query": query})
        plan = SnapshotQueries.for_config(config, grid).for_cluster(cluster)
        t = grid.at
        answers = self._answers(plan, t, query.quantile)
        taken = datetime.fromtimestamp(t, UTC)
        apart = qualify(answers)
        within = per_cluster_config(config, apart) if apart.any else config
        assembled = assemble_snapshot(within, plan, apart.answers, taken, self.display_url)
        snapshot = unqualify(assembled, apart)
        snapshot.warnings[:0] = notes
        return snapshot

    def history(
        self,
        config: Config,
        window: Window,
        grid: SampleGrid | None = None,
        cluster: str | None = None,
    ) -> History:
        """The report's queries over `window`; ReportError when it holds no vmbalance data.

        The presence first: the VMs that moved in the window (`moved_vms`) are left out of the
        load queries and their counters read raw (`ReportQueries.samples`)."""
        queries = ReportQueries.for_config(config, window, grid).for_cluster(cluster)
        start = round(window.start + queries.shift)
        end = round(window.end + queries.shift)
        ranges = {"presence": self.query_range(queries.ranges["presence"], start, end, window.step)}
        if not ranges["presence"]:
            raise ReportError(
                f"no vmbalance data between {format_time(window.begin)} and "
                f"{format_time(window.end)} (no vmbalance_vm_info series at "
                f"{self.display_url})"
            )
        presence = presence_frame(ranges["presence"], window.times, queries.shift)
        moved = moved_vms(presence)
        if moved:
            queries = ReportQueries.for_config(config, window, grid, moved).for_cluster(cluster)
        for name, promql in queries.ranges.items():
            if name not in ranges:
                ranges[name] = self.query_range(promql, start, end, window.step)
        instants = {
            name: self.query(promql, window.end) for name, promql in queries.instants.items()
        }
        # Each counter's raw samples reduced to loads before the next is asked for.
        counted = {
            name: exact_loads(
                [self._checked(self._counted_query(promql, window.end), promql, "values")],
                window.times,
            )
            for name, promql in queries.samples.items()
        }
        return assemble_history(config, window, ranges, instants, queries.shift, counted, presence)


def build_snapshot(config: Config, at: datetime | None = None) -> Snapshot:
    """Snapshot from the server in `config.prometheus` (one-shot convenience)."""
    return PrometheusSource(config.prometheus).build_snapshot(config, at)


__all__ = ["PrometheusSource", "build_snapshot"]
