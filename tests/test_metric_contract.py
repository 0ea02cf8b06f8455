"""The metric names are the contract between the exporter and everything that reads it.

Every `vmbalance_*` series that the recommender's queries (the snapshot's and the report's),
the rules and the dashboards use must be documented in docs/metrics.md and actually emitted:
by the exporter's collector, or by `vmbalance serve`'s collector.
"""

from __future__ import annotations

import json
import re

import yaml
from prometheus_client import generate_latest
from prometheus_client.registry import CollectorRegistry

from exporter.collector import FAMILIES
from exporter.samples import BLOCKER_REASONS
from recommender.config import AutomationSettings, Config
from recommender.faces.automation import Automation
from recommender.faces.serve import Recommender, RecommenderCollector
from recommender.history import report_window
from recommender.snapshot import load_snapshot
from recommender.source.queries import ReportQueries, SnapshotQueries
from tests.conftest import REPO

NAME = re.compile(r"\bvmbalance_[a-z_]+\b")
SERVE_HEADING = "## Published by `vmbalance serve`"


def documented() -> tuple[set[str], set[str]]:
    text = (REPO / "docs" / "metrics.md").read_text(encoding="utf-8")
    exporter_part, serve_part = text.split(SERVE_HEADING)

    def names(part: str) -> set[str]:
        out = set()
        for line in part.splitlines():
            if line.startswith("| `vmbalance_"):
                name = line.split("`")[1]
                kind = line.split("|")[2].strip()
                if kind == "histogram":
                    name += "_count"
                out.add(name if kind != "counter" or name.endswith("_total") else name + "_total")
        return out

    return names(exporter_part), names(serve_part)


def serve_emitted() -> set[str]:
    snapshot, config = load_snapshot(REPO / "recommender" / "examples" / "snapshot.json")
    recommender = Recommender(config or Config(), snapshot_source=lambda _: snapshot)
    recommender.run_once()
    registry = CollectorRegistry()
    registry.register(RecommenderCollector(recommender))
    # At an automation level that executes, serve publishes the executed migrations too.
    executing = Config(automation=AutomationSettings(level="full", lock_file="unused.lock"))
    automation = Automation(executing, lambda plan, config: None, lambda: snapshot)  # type: ignore[arg-type,return-value]
    registry.register(automation.collector())
    automation.metrics.cluster("")  # the series of a cluster serve planned, as each run does
    text = generate_latest(registry).decode()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1] != "#"}


def recording_rule_names() -> set[str]:
    names = set()
    for path in (REPO / "alerts").glob("vmbalance*.yml"):
        for group in yaml.safe_load(path.read_text())["groups"]:
            names |= {rule["record"] for rule in group["rules"] if "record" in rule}
    return names


def queried() -> dict[str, set[str]]:
    sources: dict[str, set[str]] = {}
    for estimator in ("mean", "quantile"):
        config = Config.model_validate({"query": {"estimator": estimator}})
        queries = SnapshotQueries.for_config(config).queries
        sources[f"recommender ({estimator})"] = set(NAME.findall(" ".join(queries.values())))
    for memory_mode in ("assigned", "used"):
        config = Config.model_validate({"balance": {"memory_mode": memory_mode}})
        report = ReportQueries.for_config(config, report_window(7 * 86400, 1_800_000_000))
        sources[f"report (memory {memory_mode})"] = set(NAME.findall(" ".join(report.promql())))
    for path in (REPO / "alerts").glob("vmbalance*.yml"):
        exprs = [
            rule["expr"]
            for group in yaml.safe_load(path.read_text())["groups"]
            for rule in group["rules"]
        ]
        sources[path.name] = set(NAME.findall(" ".join(exprs)))
    for path in (REPO / "grafana" / "dashboards").glob("*.json"):
        text = json.dumps(json.loads(path.read_text()))
        sources[path.name] = set(NAME.findall(text))
    return sources


def test_exporter_emits_exactly_what_is_documented() -> None:
    exporter_docs, _ = documented()
    assert exporter_docs == {family.sample_name for family in FAMILIES}


def documented_labels() -> dict[str, tuple[str, ...]]:
    """Each exporter series with the labels its row in docs/metrics.md lists, in order."""
    text = (REPO / "docs" / "metrics.md").read_text(encoding="utf-8")
    exporter_part = text.split(SERVE_HEADING)[0]
    labels = {}
    for line in exporter_part.splitlines():
        if line.startswith("| `vmbalance_"):
            cells = [cell.strip() for cell in line.split("|")]
            labels[cells[1].strip("`")] = tuple(label.strip() for label in cells[3].split(","))
    return labels


def test_every_exporter_series_has_the_documented_labels_cluster_first() -> None:
    documented = documented_labels()
    for family in FAMILIES:
        assert documented[family.sample_name] == family.labels, family.name
        assert family.labels[:2] == ("cluster", "node"), family.name


def test_the_migration_contract() -> None:
    """The series the recommender plans migrations with, exactly as it expects them."""
    by_name = {family.sample_name: family for family in FAMILIES}
    expected = {
        "vmbalance_vm_migration_blocker": ("cluster", "node", "vm", "reason"),
        "vmbalance_vm_disk_info": ("cluster", "node", "vm", "disk", "storage", "shared"),
        "vmbalance_vm_disk_size_bytes": ("cluster", "node", "vm", "disk"),
        "vmbalance_vm_ha_managed": ("cluster", "node", "vm"),
        "vmbalance_vm_memory_dirty_rate_bytes_per_second": ("cluster", "node", "vm"),
    }
    for name, labels in expected.items():
        assert by_name[name].kind == "gauge" and by_name[name].labels == labels, name
    text = (REPO / "docs" / "metrics.md").read_text(encoding="utf-8")
    table = text.split("### Migration blockers")[1].split("\n\n")[1]
    reasons = {row.split("`")[1] for row in table.splitlines() if row.startswith("| `")}
    assert reasons == set(BLOCKER_REASONS) == {
        "pci_passthrough", "usb_passthrough", "hostdev", "local_media", "lock",
        "local_resources",
    }  # fmt: skip


def test_serve_emits_what_is_documented() -> None:
    _, serve_docs = documented()
    assert serve_docs <= serve_emitted()


def test_the_report_reads_what_the_snapshot_reads_and_its_own_history() -> None:
    """The report's queries name the same VM families as the snapshot's plus the node
    capacities over time and what vmbalance executed (its own apply metrics): nothing of its
    own that the contract would not see."""
    sources = queried()
    snapshot = sources["recommender (mean)"]
    report = sources["report (memory assigned)"] | sources["report (memory used)"]
    executed = {
        "vmbalance_apply_migrations_total",
        "vmbalance_apply_migration_duration_seconds_sum",
        "vmbalance_apply_migration_duration_seconds_count",
    }
    assert executed <= report
    own = {"vmbalance_node_cpus", "vmbalance_node_memory_bytes", *executed}
    assert report <= snapshot | own
    assert "vmbalance_vm_info" in report and "vmbalance_vm_memory_used_bytes" in report


def test_every_queried_series_is_emitted() -> None:
    exporter_docs, serve_docs = documented()
    emitted = {family.sample_name for family in FAMILIES} | serve_emitted()
    # A histogram's family name (`histogram_quantile` over its _bucket series, as read here).
    families = {n.removesuffix("_count") for n in emitted if n.endswith("_count")}
    known = emitted | families | recording_rule_names()
    sources = queried()
    assert all(sources.values()), "a source names no vmbalance_ series at all"
    for source, names in sources.items():
        series = {n for n in names if not _is_recording_part(n)}
        unknown = series - known
        assert not unknown, f"{source} queries series nobody emits: {sorted(unknown)}"
        # A histogram is documented by its family name (listed here as its _count series): its
        # _sum and _bucket series are documented with it.
        histogram_parts = {
            n for n in series if re.sub(r"_(sum|count|bucket)$", "", n) + "_count" in serve_docs
        }
        undocumented = (
            series - recording_rule_names() - exporter_docs - serve_docs - histogram_parts
        )
        assert not undocumented, f"{source} uses undocumented series: {sorted(undocumented)}"


def _is_recording_part(name: str) -> bool:
    """`node:vmbalance_disk_bytes:rate5m` matches `vmbalance_disk_bytes` as a word: the middle of
    a recording rule name, not a series of its own."""
    return any(f":{name}:" in rule for rule in recording_rule_names())
