"""`vmbalance serve`: re-plan every interval, publish the result as metrics and as JSON.

The planning loop and the HTTP server share one `Latest` record under a lock; a scrape reads
whatever the last run left, so a slow Prometheus never slows `/metrics` down. A failing run
keeps the previous plan, counts the error, sets `vmbalance_recommender_up 0` and is retried at
the next interval; the process does not exit.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import partial
from typing import Any, TextIO
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from recommender.config import Config
from recommender.engine.rules.maintenance import MaintenanceSettings
from recommender.errors import CommandError
from recommender.faces.errors import known_error
from recommender.listen import parse_listen
from recommender.model import RESOURCES, Snapshot, finite_or_none
from recommender.outputs.document import json_document, plan_document
from recommender.plan import Plan, build_plan
from recommender.preflight import check_snapshot
from recommender.source.prometheus import PrometheusSource

log = logging.getLogger("vmbalance.serve")


@dataclass
class Latest:
    """What the last runs produced; read by the collector and the /plan endpoint."""

    plan: Plan | None = None
    plan_document: dict[str, Any] | None = None  # the JSON of `plan`, made when it was
    capacities: dict[tuple[str, str], float] = field(default_factory=dict)
    maintenance: dict[str, bool] = field(default_factory=dict)
    runs: int = 0
    errors: int = 0
    up: bool = False
    last_success: float | None = None
    last_error: str | None = None
    last_duration: float = 0.0


def node_facts(
    snapshot: Snapshot, config: Config
) -> tuple[dict[tuple[str, str], float], dict[str, bool]]:
    """Known capacities per (node, resource), and the maintenance flag per node (the config's
    maintenance nodes included)."""
    capacities = {
        (str(node), resource): float(value)
        for node, row in snapshot.nodes.iterrows()
        for resource in RESOURCES
        if (value := finite_or_none(row[resource])) is not None
    }
    maintenance = {str(n): bool(m) for n, m in snapshot.nodes["maintenance"].items()}
    for node in MaintenanceSettings.of(config.rules).maintenance:
        maintenance[node] = True
    return capacities, maintenance


class Recommender:
    """One planning run per `run_once()`; the state it leaves is what serve publishes."""

    def __init__(
        self,
        config: Config,
        snapshot_source: Callable[[Config], Snapshot] | None = None,
    ) -> None:
        self.config = config
        self._source = snapshot_source or _prometheus_snapshot
        self._lock = threading.Lock()
        self._latest = Latest()

    def latest(self) -> Latest:
        with self._lock:
            return replace(self._latest)

    def run_once(self) -> bool:
        started = time.monotonic()
        try:
            snapshot = self._source(self.config)
            check_snapshot(snapshot)
            plan = build_plan(snapshot, self.config)
            document = plan_document(plan, self.config)
        except Exception as exc:
            self._failed(exc, time.monotonic() - started)
            return False
        capacities, maintenance = node_facts(snapshot, self.config)
        with self._lock:
            self._latest = replace(
                self._latest,
                runs=self._latest.runs + 1,
                up=True,
                plan=plan,
                plan_document=document,
                capacities=capacities,
                maintenance=maintenance,
                last_success=time.time(),
                last_error=None,
                last_duration=time.monotonic() - started,
            )
        log.info(
            "planned %d migration(s); imbalance %.3f -> %.3f",
            len(plan.migrations),
            finite_or_none(plan.overall_before) or 0.0,
            finite_or_none(plan.overall_after) or 0.0,
        )
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


def plan_families(plan: Plan | None) -> Iterator[Metric]:
    """The pending plan: imbalance before and after, migrations, gain, unplaceable VMs."""
    before = GaugeMetricFamily(
        "vmbalance_recommender_imbalance_ratio",
        "Imbalance per resource (and overall) before the pending plan.",
        labels=["resource"],
    )
    after = GaugeMetricFamily(
        "vmbalance_recommender_imbalance_after_ratio",
        "Imbalance per resource (and overall) after the pending plan.",
        labels=["resource"],
    )
    if plan is not None:
        for family, is_before in ((before, True), (after, False)):
            for resource, value in _imbalance(plan, is_before).items():
                if value is not None:
                    family.add_metric([resource], value)
    yield before
    yield after
    if plan is None:
        return
    yield GaugeMetricFamily(
        "vmbalance_recommender_planned_migrations",
        "Migrations in the pending plan.",
        value=len(plan.migrations),
    )
    overall = _imbalance(plan, True)["overall"] or 0.0
    gain = overall - (_imbalance(plan, False)["overall"] or 0.0)
    yield GaugeMetricFamily(
        "vmbalance_recommender_predicted_gain_ratio",
        "Overall imbalance before minus after the pending plan.",
        value=max(gain, 0.0),
    )
    yield GaugeMetricFamily(
        "vmbalance_recommender_unplaceable_vms",
        "VMs that must move but fit on no node.",
        value=len(plan.unplaceable),
    )
    yield from frontier_families(plan)


def frontier_families(plan: Plan) -> Iterator[Metric]:
    """The trade-off frontier: per number of migrations, the lowest overall imbalance known
    and its proven lower bound; the knee."""
    frontier = plan.frontier
    if frontier is None or not frontier.points:
        return
    best = GaugeMetricFamily(
        "vmbalance_recommender_frontier_imbalance_ratio",
        "Lowest overall imbalance known with at most this many migrations under every rule.",
        labels=["migrations"],
    )
    bound = GaugeMetricFamily(
        "vmbalance_recommender_frontier_lower_bound_ratio",
        "Proven lower bound of the overall imbalance with at most this many migrations.",
        labels=["migrations"],
    )
    for point in frontier.points:
        best.add_metric([str(point.migrations)], point.imbalance)
        bound.add_metric([str(point.migrations)], point.lower_bound)
    yield best
    yield bound
    yield GaugeMetricFamily(
        "vmbalance_recommender_frontier_knee_migrations",
        "Migrations at the knee of the frontier: the last whose gain pays for its copy.",
        value=frontier.knee,
    )


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
        labels=["node", "resource"],
    )
    for (node, resource), value in sorted(latest.capacities.items()):
        capacity.add_metric([node, resource], value)
    yield capacity
    maintenance = GaugeMetricFamily(
        "vmbalance_recommender_node_maintenance",
        "1 for a node being evacuated (maintenance), else 0.",
        labels=["node"],
    )
    for node, flag in sorted(latest.maintenance.items()):
        maintenance.add_metric([node], 1 if flag else 0)
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
        yield from plan_families(latest.plan)
        yield from setting_families(self._recommender.config)
        yield from node_families(latest)
        yield from run_families(latest)


def make_app(recommender: Recommender, registry: CollectorRegistry) -> Callable[..., Any]:
    """`/metrics`, `/plan` (the latest plan as JSON), `/-/healthy`, and a landing page."""
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/metrics":
            metrics: Iterable[bytes] = metrics_app(environ, start_response)
            return metrics
        if path == "/plan":
            latest = recommender.latest()
            if latest.plan_document is None:
                body = json.dumps(
                    {"error": latest.last_error or "no successful planning run yet"}
                ).encode()
                start_response("503 Service Unavailable", [("Content-Type", "application/json")])
                return [body]
            body = json_document(latest.plan_document, indent=None).encode("utf-8")
            start_response("200 OK", [("Content-Type", "application/json; charset=utf-8")])
            return [body]
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
    recommender = Recommender(config, partial(_prometheus_snapshot, at=at))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RecommenderCollector(recommender))
    if once:
        from prometheus_client import generate_latest

        ok = recommender.run_once()
        (out or sys.stdout).write(generate_latest(registry).decode())
        if not ok:
            raise CommandError(recommender.latest().last_error or "planning failed")
        return 0

    try:
        address = parse_listen(config.serve.listen)
    except ValueError as exc:
        raise CommandError(f"--listen {exc}") from None
    server_class = type("Server", (WSGIServer,), {"address_family": address.family})
    try:
        httpd: WSGIServer = make_server(
            address.host,
            address.port,
            make_app(recommender, registry),
            server_class=server_class,
            handler_class=_QuietHandler,
        )
    except OSError as exc:
        raise CommandError(f"cannot listen on {config.serve.listen}: {exc.strerror}") from None
    threading.Thread(target=httpd.serve_forever, name="http", daemon=True).start()
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    log.info(
        "serving http://%s/metrics and /plan; planning every %.0fs",
        config.serve.listen,
        config.serve.interval_seconds,
    )
    while not stop.is_set():
        recommender.run_once()
        stop.wait(config.serve.interval_seconds)
    httpd.shutdown()
    httpd.server_close()
    return 0
