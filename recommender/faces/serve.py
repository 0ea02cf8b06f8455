"""`vmbalance serve`: re-plan every interval, publish the result as metrics and as JSON.

The planning loop and the HTTP server share one `Latest` record under a lock; a scrape reads
whatever the last run left, so a slow Prometheus never slows `/metrics` down. Each run reads
one snapshot (a fixed number of queries, whatever the number of clusters) and plans every
cluster in it on its own, side by side in `serve.plan_workers` processes (started once from
a fork server, never forked from this threaded process); the plan metrics carry a `cluster`
label ("" for nodes of no named cluster), and `/plan?cluster=NAME` answers one cluster's
plan (`/plan` alone: the plan when there is one cluster, else every cluster's under
`plans`). A failing run keeps the previous plan, counts the error, sets
`vmbalance_recommender_up 0` and is retried at the next interval; the process does not exit.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import partial
from typing import Any, TextIO
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from recommender.config import Config
from recommender.engine.rules.maintenance import MaintenanceSettings
from recommender.errors import CommandError
from recommender.faces.errors import known_error
from recommender.listen import parse_listen
from recommender.model import (
    RESOURCES,
    Snapshot,
    cluster_snapshot,
    clusters_of,
    finite_or_none,
)
from recommender.outputs.document import json_document, plan_document
from recommender.plan import Plan, build_plan
from recommender.preflight import check_snapshot
from recommender.source.prometheus import PrometheusSource

log = logging.getLogger("vmbalance.serve")


@dataclass
class Latest:
    """What the last runs produced; read by the collector and the /plan endpoint."""

    plan: Plan | None = None  # the plan when the data holds one cluster
    plan_document: dict[str, Any] | None = None  # the JSON of `plan`, made when it was
    plans: dict[str, Plan] = field(default_factory=dict)  # by cluster
    plan_documents: dict[str, dict[str, Any]] = field(default_factory=dict)
    capacities: dict[tuple[str, str, str], float] = field(default_factory=dict)
    maintenance: dict[tuple[str, str], bool] = field(default_factory=dict)
    runs: int = 0
    errors: int = 0
    up: bool = False
    last_success: float | None = None
    last_error: str | None = None
    last_duration: float = 0.0


def node_facts(
    snapshot: Snapshot, config: Config, cluster: str = ""
) -> tuple[dict[tuple[str, str, str], float], dict[tuple[str, str], bool]]:
    """Known capacities per (cluster, node, resource), and the maintenance flag per (cluster,
    node) (the config's maintenance nodes included)."""
    capacities = {
        (cluster, str(node), resource): float(value)
        for node, row in snapshot.nodes.iterrows()
        for resource in RESOURCES
        if (value := finite_or_none(row[resource])) is not None
    }
    maintenance = {(cluster, str(n)): bool(m) for n, m in snapshot.nodes["maintenance"].items()}
    for node in MaintenanceSettings.of(config.rules).maintenance:
        if node in snapshot.nodes.index:
            maintenance[(cluster, node)] = True
    return capacities, maintenance


@dataclass
class _Run:
    plans: dict[str, Plan] = field(default_factory=dict)
    documents: dict[str, dict[str, Any]] = field(default_factory=dict)
    capacities: dict[tuple[str, str, str], float] = field(default_factory=dict)
    maintenance: dict[tuple[str, str], bool] = field(default_factory=dict)


def _plan_part(
    part: Snapshot, config: Config | dict[str, Any], cluster: str
) -> tuple[Plan, dict[str, Any], dict[tuple[str, str, str], float], dict[tuple[str, str], bool]]:
    """One cluster's plan, its document and node facts (run in a planning worker, which gets
    the config as its fields: the rules' settings model is composed at import time and is
    not picklable, or here)."""
    if not isinstance(config, Config):
        config = Config.model_validate(config)
    plan = build_plan(part, config)
    capacities, maintenance = node_facts(part, config, cluster)
    return plan, plan_document(plan, config), capacities, maintenance


def plan_workers(config: Config, clusters: int) -> int:
    """How many processes plan `clusters` clusters side by side (`serve.plan_workers`)."""
    wanted = config.serve.plan_workers or len(os.sched_getaffinity(0))
    return max(1, min(wanted, clusters))


def plan_clusters(snapshot: Snapshot, config: Config, pool: Executor | None = None) -> _Run:
    """Every cluster of the snapshot planned on its own (in `pool`'s processes when given and
    there are several); a cluster without usable data is skipped (logged), and a snapshot no
    cluster of which can be planned is refused. The engine is deterministic, so the plans
    are the same wherever they are made."""
    clusters = clusters_of(snapshot.nodes)
    run = _Run()
    problems: list[str] = []
    parts: list[tuple[str, Snapshot]] = []
    for cluster in clusters:
        part = snapshot if len(clusters) == 1 else cluster_snapshot(snapshot, cluster)
        try:
            check_snapshot(part)
        except CommandError as exc:
            problems.append(f"cluster {cluster!r}: {exc}" if len(clusters) > 1 else str(exc))
            continue
        parts.append((cluster, part))
    if pool is not None and len(parts) > 1:
        fields = config.model_dump()
        futures = [pool.submit(_plan_part, part, fields, cluster) for cluster, part in parts]
        results = [future.result() for future in futures]
    else:
        results = [_plan_part(part, config, cluster) for cluster, part in parts]
    for (cluster, _), (plan, document, capacities, maintenance) in zip(parts, results, strict=True):
        run.plans[cluster] = plan
        run.documents[cluster] = document
        run.capacities.update(capacities)
        run.maintenance.update(maintenance)
    if not run.plans:
        raise CommandError("; ".join(problems) or "no cluster in the data")
    for problem in problems:
        log.warning("not planned: %s", problem)
    return run


class Recommender:
    """One planning run per `run_once()`; the state it leaves is what serve publishes."""

    def __init__(
        self,
        config: Config,
        snapshot_source: Callable[[Config], Snapshot] | None = None,
        after_plan: Callable[[Plan, str], None] | None = None,
    ) -> None:
        self.config = config
        self._source = snapshot_source or _prometheus_snapshot
        self._after_plan = after_plan  # serve's automation (recommender.faces.automation)
        self._lock = threading.Lock()
        self._latest = Latest()
        self._pool: ProcessPoolExecutor | None = None
        self._pool_size = 0

    def _planning_pool(self, clusters: int) -> ProcessPoolExecutor | None:
        """The worker processes for a run of `clusters` clusters (None: plan here), started
        from a fork server (never forked from this threaded process) and kept across runs."""
        size = plan_workers(self.config, clusters)
        if size <= 1:
            return None
        if self._pool is not None and self._pool_size < size:
            self.close()
        if self._pool is None:
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(["recommender.faces.serve"])
            self._pool = ProcessPoolExecutor(size, mp_context=context)
            self._pool_size = size
        return self._pool

    def close(self) -> None:
        """Stop the planning workers (after the run in progress)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
            self._pool_size = 0

    def latest(self) -> Latest:
        with self._lock:
            return replace(self._latest)

    def run_once(self) -> bool:
        started = time.monotonic()
        try:
            snapshot = self._source(self.config)
            pool = self._planning_pool(len(clusters_of(snapshot.nodes)))
            run = plan_clusters(snapshot, self.config, pool)
        except Exception as exc:
            self._failed(exc, time.monotonic() - started)
            return False
        only = next(iter(run.plans)) if len(run.plans) == 1 else None
        with self._lock:
            self._latest = replace(
                self._latest,
                runs=self._latest.runs + 1,
                up=True,
                plan=run.plans[only] if only is not None else None,
                plan_document=run.documents[only] if only is not None else None,
                plans=run.plans,
                plan_documents=run.documents,
                capacities=run.capacities,
                maintenance=run.maintenance,
                last_success=time.time(),
                last_error=None,
                last_duration=time.monotonic() - started,
            )
        for cluster, plan in run.plans.items():
            log.info(
                "%splanned %d migration(s); imbalance %.3f -> %.3f",
                f"cluster {cluster}: " if cluster else "",
                len(plan.migrations),
                finite_or_none(plan.overall_before) or 0.0,
                finite_or_none(plan.overall_after) or 0.0,
            )
            if self._after_plan is not None:
                self._after_plan(plan, cluster)
        return True

    def _failed(self, exc: Exception, duration: float) -> None:
        message = known_error(exc)
        if message is None:
            log.exception("planning run failed")
            message = f"{type(exc).__name__}: {exc}"
        else:
            log.warning("planning run failed: %s", message)
        with self._lock:
            self._latest = replace(
                self._latest,
                runs=self._latest.runs + 1,
                errors=self._latest.errors + 1,
                up=False,
                last_error=message,
                last_duration=duration,
            )


def _prometheus_snapshot(config: Config, at: datetime | None = None) -> Snapshot:
    return PrometheusSource(config.prometheus).build_snapshot(config, at=at)


def _imbalance(plan: Plan, before: bool) -> dict[str, float | None]:
    """Per resource and overall, before or after the plan."""
    values = plan.imbalance_before if before else plan.imbalance_after
    overall = plan.overall_before if before else plan.overall_after
    return {**{r: finite_or_none(v) for r, v in values.items()}, "overall": finite_or_none(overall)}


def plan_families(plans: dict[str, Plan]) -> Iterator[Metric]:
    """The pending plan of each cluster: imbalance before and after, migrations, gain,
    unplaceable VMs, the estimated duration."""
    before = GaugeMetricFamily(
        "vmbalance_recommender_imbalance_ratio",
        "Imbalance per resource (and overall) before the pending plan.",
        labels=["cluster", "resource"],
    )
    after = GaugeMetricFamily(
        "vmbalance_recommender_imbalance_after_ratio",
        "Imbalance per resource (and overall) after the pending plan.",
        labels=["cluster", "resource"],
    )
    for cluster, plan in sorted(plans.items()):
        for family, is_before in ((before, True), (after, False)):
            for resource, value in _imbalance(plan, is_before).items():
                if value is not None:
                    family.add_metric([cluster, resource], value)
    yield before
    yield after
    if not plans:
        return
    per_cluster = (
        ("vmbalance_recommender_planned_migrations", "Migrations in the pending plan."),
        (
            "vmbalance_recommender_predicted_gain_ratio",
            "Overall imbalance before minus after the pending plan.",
        ),
        ("vmbalance_recommender_unplaceable_vms", "VMs that must move but fit on no node."),
        (
            "vmbalance_recommender_plan_duration_seconds",
            "Estimated duration of the pending plan, its waves one after the other.",
        ),
    )
    families = [GaugeMetricFamily(name, text, labels=["cluster"]) for name, text in per_cluster]
    for cluster, plan in sorted(plans.items()):
        overall = _imbalance(plan, True)["overall"] or 0.0
        gain = overall - (_imbalance(plan, False)["overall"] or 0.0)
        values = (len(plan.migrations), max(gain, 0.0), len(plan.unplaceable))
        for family, value in zip(families, (*values, plan.duration_seconds), strict=True):
            family.add_metric([cluster], float(value))
    yield from families
    yield from frontier_families(plans)


def frontier_families(plans: dict[str, Plan]) -> Iterator[Metric]:
    """The trade-off frontier of each cluster's plan: per number of migrations, the lowest
    overall imbalance known and its proven lower bound; the knee."""
    frontiers = {
        cluster: plan.frontier
        for cluster, plan in sorted(plans.items())
        if plan.frontier is not None and plan.frontier.points
    }
    if not frontiers:
        return
    best = GaugeMetricFamily(
        "vmbalance_recommender_frontier_imbalance_ratio",
        "Lowest overall imbalance known with at most this many migrations under every rule.",
        labels=["cluster", "migrations"],
    )
    bound = GaugeMetricFamily(
        "vmbalance_recommender_frontier_lower_bound_ratio",
        "Proven lower bound of the overall imbalance with at most this many migrations.",
        labels=["cluster", "migrations"],
    )
    knee = GaugeMetricFamily(
        "vmbalance_recommender_frontier_knee_migrations",
        "Migrations at the knee of the frontier: the last whose gain pays for its copy.",
        labels=["cluster"],
    )
    for cluster, frontier in frontiers.items():
        for point in frontier.points:
            best.add_metric([cluster, str(point.migrations)], point.imbalance)
            bound.add_metric([cluster, str(point.migrations)], point.lower_bound)
        knee.add_metric([cluster], frontier.knee)
    yield best
    yield bound
    yield knee


def setting_families(config: Config) -> Iterator[Metric]:
    """The thresholds and weights the plans are made with."""
    yield GaugeMetricFamily(
        "vmbalance_recommender_trigger_ratio",
        "Planning starts above this overall imbalance.",
        value=config.balance.trigger,
    )
    yield GaugeMetricFamily(
        "vmbalance_recommender_target_ratio",
        "Planning stops below this overall imbalance.",
        value=config.balance.target,
    )
    weights = GaugeMetricFamily(
        "vmbalance_recommender_weight",
        "Weight of each resource in the overall imbalance.",
        labels=["resource"],
    )
    for resource in RESOURCES:
        weights.add_metric([resource], float(config.balance.weights.get(resource, 0.0)))
    yield weights


def node_families(latest: Latest) -> Iterator[Metric]:
    """Capacities and maintenance flags of the nodes of the last successful run."""
    capacity = GaugeMetricFamily(
        "vmbalance_recommender_node_capacity",
        "Node capacity per resource in the resource's unit.",
        labels=["cluster", "node", "resource"],
    )
    for (cluster, node, resource), value in sorted(latest.capacities.items()):
        capacity.add_metric([cluster, node, resource], value)
    yield capacity
    maintenance = GaugeMetricFamily(
        "vmbalance_recommender_node_maintenance",
        "1 for a node being evacuated (maintenance), else 0.",
        labels=["cluster", "node"],
    )
    for (cluster, node), flag in sorted(latest.maintenance.items()):
        maintenance.add_metric([cluster, node], 1 if flag else 0)
    yield maintenance


def run_families(latest: Latest) -> Iterator[Metric]:
    """How the planning runs went."""
    if latest.last_success is not None:
        yield GaugeMetricFamily(
            "vmbalance_recommender_last_success_timestamp_seconds",
            "Unix time of the last successful planning run.",
            value=latest.last_success,
        )
    yield CounterMetricFamily("vmbalance_recommender_runs", "Planning runs.", value=latest.runs)
    yield CounterMetricFamily(
        "vmbalance_recommender_errors",
        "Planning runs that failed (Prometheus unreachable, no data).",
        value=latest.errors,
    )
    yield GaugeMetricFamily(
        "vmbalance_recommender_up",
        "1 when the last planning run succeeded.",
        value=1 if latest.up else 0,
    )
    yield GaugeMetricFamily(
        "vmbalance_recommender_run_duration_seconds",
        "Wall time of the last planning run.",
        value=latest.last_duration,
    )


class RecommenderCollector(Collector):
    """Publishes the recommender's view with the names in docs/metrics.md."""

    def __init__(self, recommender: Recommender) -> None:
        self._recommender = recommender

    def collect(self) -> Iterator[Metric]:
        latest = self._recommender.latest()
        yield from plan_families(latest.plans)
        yield from setting_families(self._recommender.config)
        yield from node_families(latest)
        yield from run_families(latest)


def _plan_answer(
    latest: Latest, environ: dict[str, Any], start_response: Callable[..., Any]
) -> Iterable[bytes]:
    """`/plan`: the plan (one cluster), every cluster's (several), or `?cluster=NAME`'s."""
    if not latest.plan_documents:
        body = json.dumps({"error": latest.last_error or "no successful planning run yet"})
        start_response("503 Service Unavailable", [("Content-Type", "application/json")])
        return [body.encode()]
    wanted = parse_qs(environ.get("QUERY_STRING", "")).get("cluster")
    document: dict[str, Any] | None
    if wanted is not None:
        document = latest.plan_documents.get(wanted[0])
    elif latest.plan_document is not None:
        document = latest.plan_document
    else:
        document = {
            "format": "vmbalance-plans",
            "version": 1,
            "plans": [latest.plan_documents[c] for c in sorted(latest.plan_documents)],
        }
    if document is None:
        start_response("404 Not Found", [("Content-Type", "application/json")])
        return [json_document({"error": "no plan for that cluster"}, indent=None).encode()]
    start_response("200 OK", [("Content-Type", "application/json; charset=utf-8")])
    return [json_document(document, indent=None).encode("utf-8")]


def make_app(
    recommender: Recommender,
    registry: CollectorRegistry,
    routes: dict[str, Callable[..., Iterable[bytes]]] | None = None,
) -> Callable[..., Any]:
    """`/metrics`, `/plan` (the latest plan as JSON), `/-/healthy`, a landing page, and the
    `routes` given (the automation's pause switch)."""
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if routes and path in routes:
            return routes[path](environ, start_response)
        if path == "/metrics":
            metrics: Iterable[bytes] = metrics_app(environ, start_response)
            return metrics
        if path == "/plan":
            return _plan_answer(recommender.latest(), environ, start_response)
        if path == "/-/healthy":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"ok\n"]
        if path in ("/", ""):
            start_response("200 OK", [("Content-Type", "text/html; charset=utf-8")])
            return [
                b"<!DOCTYPE html><html><head><meta charset='utf-8'><title>vmbalance</title>"
                b"</head><body><h1>vmbalance serve</h1><ul><li><a href='metrics'>metrics</a>"
                b"</li><li><a href='plan'>latest plan (JSON)</a></li></ul></body></html>"
            ]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"Not Found\n"]

    return app


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        return


def next_run(first: float, now: float, interval: float) -> float:
    """When the next run starts: the next of `first + k * interval` after `now`. Runs keep a
    fixed period whatever each takes; a run longer than the interval skips the slots it ran
    over instead of starting the next ones back to back."""
    return first + (math.floor((now - first) / interval) + 1) * interval


def _run_once(recommender: Recommender, registry: CollectorRegistry, out: TextIO) -> int:
    """One planning run, its metrics written to `out`; a failed run is a one-line error."""
    from prometheus_client import generate_latest

    ok = recommender.run_once()
    out.write(generate_latest(registry).decode())
    if not ok:
        raise CommandError(recommender.latest().last_error or "planning failed")
    return 0


def _listen(config: Config, app: Any) -> WSGIServer:
    """The HTTP server for /metrics, /plan and the automation switches, bound but not serving."""
    try:
        address = parse_listen(config.serve.listen)
    except ValueError as exc:
        raise CommandError(f"--listen {exc}") from None
    server_class = type("Server", (WSGIServer,), {"address_family": address.family})
    try:
        return make_server(
            address.host, address.port, app, server_class=server_class, handler_class=_QuietHandler
        )
    except OSError as exc:
        raise CommandError(f"cannot listen on {config.serve.listen}: {exc.strerror}") from None


def serve(
    config: Config,
    once: bool = False,
    out: TextIO | None = None,
    at: datetime | None = None,
) -> int:
    """Run until SIGTERM/SIGINT (or one run with `once`, its metrics written to `out`, the
    cluster read as it was at `at`, default now)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if at is not None and not once:
        raise CommandError("--at goes with --once: a serving loop plans the present")
    from recommender.faces.automation import PAUSE_PATHS, after_plan, automation_for

    # A replay of the past (--at) never executes.
    automation = (
        automation_for(config, partial(_prometheus_snapshot, config)) if at is None else None
    )
    hook = after_plan(automation) if automation else None
    recommender = Recommender(config, partial(_prometheus_snapshot, at=at), after_plan=hook)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RecommenderCollector(recommender))
    if automation is not None:
        registry.register(automation.collector())
    if once:
        try:
            return _run_once(recommender, registry, out or sys.stdout)
        finally:
            recommender.close()
    routes: dict[str, Callable[..., Iterable[bytes]]] | None = (
        dict.fromkeys(PAUSE_PATHS, automation.http) if automation else None
    )
    httpd = _listen(config, make_app(recommender, registry, routes))
    threading.Thread(target=httpd.serve_forever, name="http", daemon=True).start()
    stop = threading.Event()

    def on_signal(*_: object) -> None:
        stop.set()
        if automation is not None:  # migrations in flight finish; nothing new starts
            automation.stop("stopped by a signal")

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    log.info(
        "serving http://%s/metrics and /plan; planning every %.0fs",
        config.serve.listen,
        config.serve.interval_seconds,
    )
    interval = config.serve.interval_seconds
    first = time.monotonic()
    while not stop.is_set():
        recommender.run_once()
        stop.wait(max(0.0, next_run(first, time.monotonic(), interval) - time.monotonic()))
    httpd.shutdown()
    httpd.server_close()
    recommender.close()
    return 0
