"""Metrics of the executed migrations, for the dashboards and the weekly report.

`vmbalance_apply_migrations_total{result}` (done, failed, skipped, not-started),
`vmbalance_apply_migrations_in_flight`, `vmbalance_apply_migration_duration_seconds` (a
histogram of the migrations that ran) and `vmbalance_apply_overdue_total`. `vmbalance serve`
registers them on its /metrics; `vmbalance apply --metrics-file` writes them for
node_exporter's textfile collector.
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
            "Migrations of executed plans, by result.",
            ["result"],
            registry=self.registry,
        )
        for result in RESULTS:
            self.migrations.labels(result)
        self.in_flight = Gauge(
            "vmbalance_apply_migrations_in_flight",
            "Migrations running now.",
            registry=self.registry,
        )
        self.duration = Histogram(
            "vmbalance_apply_migration_duration_seconds",
            "Duration of the migrations that ran (done or failed).",
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.overdue = Counter(
            "vmbalance_apply_overdue",
            "Migrations that ran far past their estimate.",
            registry=self.registry,
        )

    def text(self) -> bytes:
        return generate_latest(self.registry)
