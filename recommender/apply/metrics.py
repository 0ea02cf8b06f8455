"""Metrics of the executed migrations, for the dashboards and the weekly report.

`vmbalance_apply_migrations_total{cluster, result}` (done, failed, skipped, not-started),
`vmbalance_apply_migrations_in_flight{cluster}`,
`vmbalance_apply_migration_duration_seconds{cluster}` (a histogram of the migrations that ran)
and `vmbalance_apply_overdue_total{cluster}`; `cluster` is the executed plan's ("" where the
data names none). `vmbalance serve` registers them on its /metrics; `vmbalance apply
--metrics-file` writes them for node_exporter's textfile collector.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

RESULTS = ("done", "failed", "skipped", "not-started")
DURATION_BUCKETS = (5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


class ApplyMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.migrations = Counter(
            "vmbalance_apply_migrations",
            "Migrations of executed plans, by cluster and result.",
            ["cluster", "result"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "vmbalance_apply_migrations_in_flight",
            "Migrations running now, by cluster.",
            ["cluster"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "vmbalance_apply_migration_duration_seconds",
            "Duration of the migrations that ran (done or failed).",
            ["cluster"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.overdue = Counter(
            "vmbalance_apply_overdue",
            "Migrations that ran far past their estimate, by cluster.",
            ["cluster"],
            registry=self.registry,
        )

    def cluster(self, cluster: str) -> None:
        """Every series of `cluster`, at zero until something happens there."""
        for result in RESULTS:
            self.migrations.labels(cluster, result)
        self.in_flight.labels(cluster)
        self.duration.labels(cluster)
        self.overdue.labels(cluster)

    def text(self) -> bytes:
        return generate_latest(self.registry)
