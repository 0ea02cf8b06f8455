"""`vmbalance report`: pure parts on hand-made frames, then the whole report from a simulated
history backfilled into a real Prometheus (one server for the module)."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from markdown_it import MarkdownIt
from markdown_it.token import Token

from devkit.servers import PrometheusServer, backfill
from devkit.service import free_port
from devkit.simulate import ClusterHistory, simulate_cluster, to_openmetrics_blocks
from recommender.config import Config
from recommender.engine.measure import imbalance_per_resource, overall_imbalance, weight_vector
from recommender.faces.cli import main
from recommender.faces.report import write_report
from recommender.history import TARGET_POINTS, History, Window, report_window
from recommender.model import RESOURCES
from recommender.outputs.report.analysis import cluster_utilisation, imbalance_series, top_vms
from recommender.outputs.report.charts import CHARTS, chart_label, chart_utilisation
from recommender.outputs.report.migrations import (
    ObservedMigration,
    arrival_time,
    detect_migrations,
    migration_effects,
)
from recommender.quoting import display
from recommender.source.grid import GRID_QUERIES
from recommender.source.history import ReportError, exact_loads, executed_of, moved_vms
from recommender.source.http import SourceError
from recommender.source.prometheus import PrometheusSource
from recommender.source.queries import (
    MOVED_QUERY_CHARS,
    ReportQueries,
    SnapshotQueries,
    executed_queries,
)

# --- pure parts ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("period", "step", "points"),
    [(7 * 86400, 1800, 336), (3 * 86400, 780, 332), (2 * 86400, 540, 320), (3600, 60, 60)],
)
def test_window_keeps_the_points_bounded(period: float, step: float, points: int) -> None:
    window = report_window(period, 1_800_000_000.5)
    assert (window.step, window.points) == (step, points)
    assert window.points <= TARGET_POINTS
    assert window.end == 1_800_000_000.0 and window.times[-1] == window.end
    assert window.span <= period and window.span > period - window.step


@pytest.mark.parametrize("period", ["", "7 days", "30m", "1x"])
def test_a_bad_or_short_period_is_a_clear_error(period: str, tmp_path: Path) -> None:
    with pytest.raises(ReportError) as caught:
        write_report(Config(), period=period, out_dir=tmp_path)
    assert "period" in str(caught.value) and "\n" not in str(caught.value)


def test_queries_are_fixed_and_aggregated() -> None:
    window = report_window(7 * 86400, 1_800_000_000)
    queries = ReportQueries.for_config(Config(), window)
    assert queries == ReportQueries.for_config(Config(), window)
    executed = executed_queries(window.span)
    assert {n: queries.instants[n] for n in executed} == executed
    for promql in queries.promql():
        if promql in executed.values():  # vmbalance's own apply metrics, not per node
            assert "vmbalance_apply_migration" in promql and f"[{window.span:.0f}s]" in promql
            continue
        assert re.search(r"\bby \((cluster, )?(node|node, vm|node, vm, name)\)", promql), promql
    assert "[1800s]" in queries.ranges["load_cpu"]
    # One cluster's report reads only its series, vmbalance's own apply metrics too.
    scoped = queries.for_cluster("east")
    for promql in scoped.promql():
        assert 'cluster="east"' in promql
    assert "vmbalance_vm_memory_max_bytes" in queries.ranges["load_memory"]
    used = Config.model_validate({"balance": {"memory_mode": "used"}})
    assert "memory_used" in ReportQueries.for_config(used, window).ranges["load_memory"]
    # The VMs that moved: left out of the load queries, their counters read raw, one query
    # per counter however many moved; as many as fit in a query, the others keep increase().
    assert not queries.samples
    rng = random.Random(3)
    scattered = [f"vm-{rng.getrandbits(40):010x}" for _ in range(5000)]
    numbered = [str(vm) for vm in range(101, 5000)]
    for moved in (["101"], numbered, scattered):
        raw = ReportQueries.for_config(Config(), window, moved=moved)
        assert len(raw) == len(queries) + len(raw.samples) and len(raw.samples) == 7
        assert raw.moved == tuple(sorted(moved))[: len(raw.moved)]
        assert min(len(moved), 500) <= len(raw.moved)
        assert all(len(q) < 16_384 for q in raw.promql())
        (left_out,) = re.findall(r'vm!~("(?:[^"\\]|\\.)*")', raw.ranges["load_cpu"])
        pattern = re.compile(json.loads(left_out))
        assert all(pattern.fullmatch(vm) for vm in raw.moved)
        assert not any(pattern.fullmatch(vm) for vm in set(moved) - set(raw.moved))
        for counter, promql in raw.samples.items():
            assert promql.startswith(f'{counter}{{vm=~"') and promql.endswith("[608400s]")
    # Shared prefixes are written once: about twice as many numbered ids fit as listed whole.
    listed = np.searchsorted(np.cumsum([len(v) + 1 for v in sorted(numbered)]), MOVED_QUERY_CHARS)
    fitted = len(ReportQueries.for_config(Config(), window, moved=numbered).moved)
    assert 1.8 * listed < fitted < len(numbered)
    assert 'cluster="east"' in raw.for_cluster("east").samples[counter]


def presence(rows: list[tuple[str, str, int, float]], step: float = 600.0) -> pd.DataFrame:
    """A presence frame from (vm, node, step index, samples) rows."""
    frame = pd.DataFrame(rows, columns=["vm", "node", "step", "samples"])
    frame["time"] = 1_000_000.0 + step * frame["step"]
    frame["name"] = "name of " + frame["vm"]
    return frame[["vm", "node", "step", "time", "samples", "name"]]


def test_migrations_are_node_changes_between_consecutive_steps() -> None:
    rows = []
    # vm a: pve1 for steps 0-4, pve2 from step 5 (arrives with 4 of 10 samples), back on
    # pve1 from step 8 (arrives with 10 of 10: right at the start of the step).
    rows += [("a", "pve1", k, 10) for k in range(5)]
    rows += [("a", "pve1", 5, 6), ("a", "pve2", 5, 4)]
    rows += [("a", "pve2", k, 10) for k in (6, 7)]
    rows += [("a", "pve1", k, 10) for k in range(8, 10)]
    # vm b: stopped after step 2, started on pve3 at step 6: not a live migration.
    rows += [("b", "pve1", k, 10) for k in range(3)] + [("b", "pve3", k, 10) for k in (6, 7, 8)]
    # vm c: pve1 only.
    rows += [("c", "pve1", k, 10) for k in range(10)]
    found = detect_migrations(presence(rows), 600.0)
    assert [(m.vm, m.source, m.target) for m in found] == [
        ("a", "pve1", "pve2"),
        ("a", "pve2", "pve1"),
    ]
    first, second = found
    # 4 samples at 60 s intervals in the step ending at t=1_003_000: the first at 3.5 intervals
    # before the end.
    assert first.time == pytest.approx(1_003_000 - 3.5 * 60)
    assert second.time == pytest.approx(1_004_800 - 600 + 30)
    assert first.name == "name of a"


def test_arrival_time_stays_inside_its_step() -> None:
    assert arrival_time(1000.0, 1, 60.0, 600.0) == 970.0
    assert arrival_time(1000.0, 50, 60.0, 600.0) == 400.0  # more samples than fit: clipped
    assert arrival_time(1000.0, 3, math.nan, 600.0) == 700.0  # interval unknown: mid-step


def tiny_history(config: Config) -> History:
    """Three nodes over four steps; pve3 is in maintenance at every step."""
    window = Window(end=4000.0, step=1000.0, points=4)
    index = pd.Index(window.times, name="time")
    nodes = ["pve1", "pve2", "pve3"]

    def frame(values: list[float]) -> pd.DataFrame:
        return pd.DataFrame([values] * 4, index=index, columns=nodes, dtype=float)

    load = {
        "cpu": frame([8.0, 2.0, 5.0]),
        "memory": frame([64.0, 32.0, 16.0]),
        "disk_bytes": frame([3e8, 1e8, 0.0]),
        "disk_ops": frame([100.0, 300.0, 0.0]),
        "network": frame([1e6, 1e6, 1e6]),
    }
    load["cpu"].iloc[3] = [4.0, 6.0, 5.0]
    capacity = {
        "cpu": frame([16.0, 16.0, 8.0]),
        "memory": frame([128.0, 128.0, 64.0]),
        "disk_bytes": frame([1e9, 1e9, 1e9]),
        "disk_ops": frame([1e4, 1e4, 1e4]),
        "network": frame([1e9, 1e9, 1e9]),
    }
    active = pd.DataFrame([[True, True, False]] * 4, index=index, columns=nodes)
    has_data = pd.Series([True, True, False, True], index=index)
    return History(
        window=window,
        load=load,
        capacity=capacity,
        active=active,
        has_data=has_data,
        presence=presence([]),
        pairs=pd.DataFrame(),
    )


def test_imbalance_over_time_is_the_measure_definition() -> None:
    config = Config()
    history = tiny_history(config)
    series = imbalance_series(history, config)
    weights = weight_vector(config.balance.weights, RESOURCES)
    for k in (0, 1, 3):
        load = np.array([[history.load[r].iloc[k, j] for r in RESOURCES] for j in range(2)])
        cap = np.array([[history.capacity[r].iloc[k, j] for r in RESOURCES] for j in range(2)])
        per = imbalance_per_resource(load, cap)
        assert series.iloc[k][list(RESOURCES)].to_numpy() == pytest.approx(per)
        assert series.iloc[k]["overall"] == pytest.approx(overall_imbalance(per, weights))
    assert series.iloc[2].isna().all()  # no data at that step
    # The node in maintenance does not count: cpu 8/16 vs mean 10/32.
    assert series.iloc[0]["cpu"] == pytest.approx(0.5 - 10 / 32)


def test_migration_effect_compares_the_steps_around_it() -> None:
    index = pd.Index(1000.0 * np.arange(1, 9), name="time")
    overall = pd.Series([0.3, 0.3, 0.3, 0.25, 0.1, 0.1, 0.1, 0.1], index=index)
    moved = ObservedMigration("a", "a", "pve1", "pve2", 3500.0)
    (result,) = migration_effects([moved], overall, 1000.0)
    # Before: steps ending at 2000 and 3000; after: steps starting at 4000 and later.
    assert result.before == pytest.approx(0.3) and result.after == pytest.approx(0.1)
    assert result.effect(0.005) == "reduced" and result.nearby == 0
    worse = migration_effects([moved], -overall + 1, 1000.0)[0]
    assert worse.effect(0.005) == "increased"


def test_top_vms_share_of_their_node() -> None:
    config = Config()
    history = tiny_history(config)
    history.presence = presence(
        [("a", "pve1", k, 10) for k in range(4)]
        + [("b", "pve1", k, 10) for k in range(2)]
        + [("b", "pve2", k, 10) for k in range(2, 4)]
    )
    index = pd.MultiIndex.from_tuples(
        [("pve1", "a"), ("pve1", "b"), ("pve2", "b")], names=["node", "vm"]
    )
    history.pairs = pd.DataFrame({r: [6.0, 1.0, 1.0] for r in RESOURCES}, index=index, dtype=float)
    top = top_vms(history, "cpu")
    assert [v.vm for v in top] == ["a", "b"]
    assert top[0].load == 6.0 and top[0].node_share == pytest.approx(6 / 7)
    assert top[0].capacity_share == pytest.approx(6 / 16) and not top[0].moved
    assert top[1].load == 2.0 and top[1].moved and top[1].node == "pve2"
    # Memory is a level: weighted by the share of the period spent on each node.
    memory = top_vms(history, "memory")
    assert [v.load for v in memory] == [6.0, 1.0]


def test_charts_survive_odd_node_names(tmp_path: Path) -> None:
    # `$...$` would be parsed as mathtext (and "$\\frac{" fails to parse); a leading "_"
    # hides a legend entry.
    config = Config()
    history = tiny_history(config)
    odd = {"pve1": "$\\frac{a}{$", "pve2": "_hidden", "pve3": "new\nline"}
    for frames in (history.load, history.capacity):
        for resource in frames:
            frames[resource] = frames[resource].rename(columns=odd)
    history.active = history.active.rename(columns=odd)
    path = chart_utilisation(history, cluster_utilisation(history), tmp_path / "u.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert chart_label("$x$") == "\\$x\\$" and chart_label("_a").endswith("_a")
    assert chart_label("_a") != "_a" and chart_label("a\nb") == "a\\nb"
    assert chart_label("rtl \u202eab") == "rtl \\u202eab"


def test_prometheus_down_is_a_clear_error(tmp_path: Path) -> None:
    config = Config.model_validate(
        {"prometheus": {"url": f"http://127.0.0.1:{free_port()}", "timeout_seconds": 5}}
    )
    started = time.monotonic()
    with pytest.raises(SourceError) as caught:
        write_report(config, period="1d", out_dir=tmp_path / "report")
    message = str(caught.value)
    assert "connection refused" in message and "\n" not in message
    assert time.monotonic() - started < 10
    assert not (tmp_path / "report" / "report.md").exists()


# --- the whole report against a real Prometheus ------------------------------------------------

SECTIONS = [
    "Summary",
    "Nodes",
    "Top VMs",
    "Migrations in the period",
    "Executed by vmbalance",
    "Recommended plan",
    "What blocked better balance",
    "Capacity forecast",
    "Data notes",
]
HOSTILE_SUFFIX = " | `tick` [link](http://evil.example) <script>x</script> ![p](p.png) *em*"
MIGRATION_OFFSETS = [0.5 * 86400, 1.3 * 86400, 2.2 * 86400, 2.9 * 86400]
RESOURCE_COUNTERS = {
    "cpu": ("cpu_seconds",),
    "disk_bytes": ("disk_read_bytes", "disk_written_bytes"),
    "disk_ops": ("disk_reads", "disk_writes"),
    "network": ("net_rx", "net_tx"),
}


@dataclass
class Reported:
    history: ClusterHistory
    prometheus: PrometheusServer
    config: Config
    path: Path
    markdown: str
    tokens: list[Token]

    @property
    def at(self) -> datetime:
        return datetime.fromtimestamp(self.history.end, UTC)


def hostile(history: ClusterHistory, plain_from: int) -> ClusterHistory:
    """Every VM past the simulator's own hostile names gets pipes, backticks, brackets, a
    link, an image and HTML in its name."""
    vms = tuple(
        dataclasses.replace(v, name=v.name + HOSTILE_SUFFIX) if i >= plain_from else v
        for i, v in enumerate(history.vms)
    )
    return dataclasses.replace(history, vms=vms)


def config_for(url: str, history: ClusterHistory) -> Config:
    """A low trigger so there is a plan, and rules that hold moves back: a pinned VM, an
    anti-affinity pair and a migration budget."""
    return Config.model_validate(
        {
            "prometheus": {"url": url},
            "capacity": history.capacity_settings(),
            "balance": {"trigger": 0.12, "target": 0.05, "max_migrations": 3},
            "rules": {
                "pin": {"105": "pve1"},
                "anti_affinity": [{"name": "queues", "vms": ["110", "112"]}],
            },
        }
    )


# What an executing instance published over the history's last day: 3 migrations done, 1
# failed (200 s between them), 1 skipped.
EXECUTED = {"done": 3, "failed": 1, "skipped": 1}
EXECUTED_SECONDS = 200.0


def write_apply_metrics(path: Path, history: ClusterHistory) -> None:
    """`vmbalance_apply_*` as serve's /metrics would have had them scraped: flat at 0, then
    each migration counted at its own time during the last day."""
    times = np.arange(history.end - 3 * 86400 + 600, history.end + 1, 600.0)
    done_at = [history.end - 20 * 3600, history.end - 12 * 3600, history.end - 3 * 3600]
    failed_at = [history.end - 8 * 3600]
    skipped_at = [history.end - 8 * 3600]

    def counted(events: list[float]) -> list[int]:
        return [sum(1 for e in events if e <= t) for t in times]

    ran = [d + f for d, f in zip(counted(done_at), counted(failed_at), strict=True)]
    lines = ["# TYPE vmbalance_apply_migrations counter"]
    for result, events in (("done", done_at), ("failed", failed_at), ("skipped", skipped_at)):
        lines += [
            f'vmbalance_apply_migrations_total{{result="{result}"}} {n} {t:.0f}'
            for n, t in zip(counted(events), times, strict=True)
        ]
    lines.append("# TYPE vmbalance_apply_migration_duration_seconds histogram")
    name = "vmbalance_apply_migration_duration_seconds"
    for n, t in zip(ran, times, strict=True):  # one histogram point's samples together
        lines += [f'{name}_bucket{{le="{le}"}} {n} {t:.0f}' for le in ("60.0", "+Inf")]
        lines += [f"{name}_count {n} {t:.0f}", f"{name}_sum {n * EXECUTED_SECONDS / 4} {t:.0f}"]
    path.write_text("\n".join([*lines, "# EOF", ""]), encoding="utf-8")


@pytest.fixture(scope="module")
def reported(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Reported]:
    tmp = tmp_path_factory.mktemp("report")
    end = math.floor(time.time() / 3600) * 3600 - 3600.0
    history = simulate_cluster(
        11,
        nodes=4,
        vms=30,
        duration=3 * 86400,
        step=120,
        end=end,
        migration_offsets=MIGRATION_OFFSETS,
        hostile_names=8,
    )
    history = hostile(history, plain_from=8)
    to_openmetrics_blocks(history, tmp / "blocks")
    write_apply_metrics(tmp / "blocks" / "zz-apply.om", history)
    backfill(tmp / "blocks", tmp / "prom-data")
    with PrometheusServer(tmp, data_dir=tmp / "prom-data") as prometheus:
        config = config_for(prometheus.url, history)
        at = datetime.fromtimestamp(history.end, UTC)
        path = write_report(config, period="3d", out_dir=tmp / "out", at=at)
        markdown = path.read_text(encoding="utf-8")
        tokens = parser().parse(markdown)
        yield Reported(history, prometheus, config, path, markdown, tokens)


def parser() -> MarkdownIt:
    return MarkdownIt("commonmark").enable("table")


def headings(tokens: list[Token], level: int) -> list[str]:
    return [
        tokens[i + 1].content
        for i, t in enumerate(tokens)
        if t.type == "heading_open" and t.tag == f"h{level}"
    ]


def tables(tokens: list[Token]) -> list[list[list[Token]]]:
    """Each table as rows of cells, each cell its inline token."""
    out: list[list[list[Token]]] = []
    for i, t in enumerate(tokens):
        if t.type == "table_open":
            out.append([])
        elif t.type == "tr_open":
            out[-1].append([])
        elif t.type in ("th_open", "td_open"):
            out[-1][-1].append(tokens[i + 1])
    return out


def text(cell: Token) -> str:
    return "".join(c.content for c in cell.children or [] if c.type == "text")


def table_with(tokens: list[Token], *header: str) -> list[list[list[Token]]]:
    return [t for t in tables(tokens) if [text(c) for c in t[0][: len(header)]] == list(header)]


def flat(name: str) -> str:
    """The name as a cell shows it: one line, active characters as visible escapes."""
    return " ".join(display(name).split())


@pytest.mark.slow
def moved_in(reported: Reported, window: Window) -> list[str]:
    """The VMs the simulator migrated within `window`."""
    moves = reported.history.migrations
    return [m.vm for m in moves if window.begin < m.time <= window.end]


def test_sections_tables_and_images(reported: Reported) -> None:
    tokens = reported.tokens
    assert len(headings(tokens, 1)) == 1
    assert headings(tokens, 2) == SECTIONS
    for table in tables(tokens):
        assert all(len(row) == len(table[0]) for row in table), [text(c) for c in table[0]]
    (summary,) = table_with(tokens, "imbalance", "now")
    assert [text(row[0]) for row in summary[1:]] == [
        "CPU",
        "memory",
        "disk throughput",
        "disk operations",
        "network",
        "overall",
    ]
    node_tables = table_with(tokens, "node", "capacity")
    assert len(node_tables) == len(RESOURCES)
    nodes = sorted(n.name for n in reported.history.nodes)
    assert all(sorted(text(row[0]) for row in t[1:]) == nodes for t in node_tables)
    top = table_with(tokens, "#", "vm", "name")
    assert len(top) == 5 and all(len(t) == 6 for t in top)
    (forecast,) = table_with(tokens, "resource", "last day")
    # A flat simulated load: no resource reaches capacity within the horizon.
    for row in forecast[1:]:
        assert text(row[5]) in ("no clear trend", "not within 90 days", "no (falling)")
    images = [
        c for t in tokens if t.type == "inline" for c in t.children or [] if c.type == "image"
    ]
    assert sorted(i.attrs["src"] for i in images) == sorted(CHARTS.values())
    for image in images:
        assert image.content and (reported.path.parent / str(image.attrs["src"])).is_file()
    window = report_window(3 * 86400, reported.history.end, reported.history.step)
    cost = len(ReportQueries.for_config(reported.config, window, moved=moved_in(reported, window)))
    snapshot_queries = SnapshotQueries.for_config(reported.config)
    cost += len(snapshot_queries.queries) + GRID_QUERIES
    # And when the VMs that moved within the snapshot's history were last seen where.
    end, history = reported.history.end, snapshot_queries.history_range
    moved = [m.vm for m in reported.history.migrations if m.time > end - history]
    cost += len(snapshot_queries.departures(moved))
    assert f"{cost} PromQL queries" in reported.markdown


def test_executed_counts_are_whole_migrations_by_result() -> None:
    counts = [
        {"metric": {"result": "done"}, "value": [0, "2.9999"]},
        {"metric": {"result": "failed"}, "value": [0, "1.04"]},
        {"metric": {"result": "not-started"}, "value": [0, "0"]},
        {"metric": {"result": "made-up"}, "value": [0, "5"]},
    ]
    durations = [
        {"metric": {"stat": "sum"}, "value": [0, "160"]},
        {"metric": {"stat": "count"}, "value": [0, "4.0001"]},
    ]
    executed = executed_of(counts, durations)
    assert executed.by_result == {"done": 3, "failed": 1}
    assert (executed.total, executed.ran, executed.mean_seconds) == (4, 4, 40.0)
    nothing = executed_of([], [])
    assert (nothing.total, nothing.ran) == (0, 0) and math.isnan(nothing.mean_seconds)


@pytest.mark.slow
def test_the_migrations_vmbalance_executed_are_reported(reported: Reported, tmp_path: Path) -> None:
    (table,) = table_with(reported.tokens, "result", "migrations")
    assert {text(row[0]): int(text(row[1])) for row in table[1:]} == EXECUTED
    total = sum(EXECUTED.values())
    assert f"{total} migration(s) of plans executed by" in reported.markdown
    assert "mean duration 50 s over the 4 that ran" in reported.markdown
    # A day before the first of them: nothing executed, and the report says so.
    before = datetime.fromtimestamp(reported.history.end - 1.5 * 86400, UTC)
    path = write_report(reported.config, period="1d", out_dir=tmp_path, at=before)
    markdown = path.read_text(encoding="utf-8")
    assert "No migration was executed by vmbalance in the period" in markdown
    assert not table_with(parser().parse(markdown), "result", "migrations")


@pytest.mark.slow
def test_charts_are_pngs_of_a_sensible_size(reported: Reported) -> None:
    for name in CHARTS.values():
        data = (reported.path.parent / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
        width, height = struct.unpack(">II", data[16:24])
        assert (width, height) == (1000, 600)
        assert 10_000 < len(data) < 1_000_000


@pytest.mark.slow
def test_hostile_names_render_as_plain_text(reported: Reported) -> None:
    html = parser().render(reported.markdown)
    # The report's own prose has code spans; a name's backticks must not make one.
    for tag in ("<script", "<a ", "<b>", "<em>", "<code>tick", "<i>"):
        assert tag not in html
    assert html.count("<img") == len(CHARTS)
    for table in tables(reported.tokens):
        for row in table:
            for cell in row:
                kinds = {c.type for c in cell.children or []}
                assert kinds <= {"text", "strong_open", "strong_close"}, kinds
    names = {v.vm: v.name for v in reported.history.vms}
    shown = [
        (text(row[1]), text(row[2]))
        for t in table_with(reported.tokens, "#", "vm", "name")
        for row in t[1:]
    ]
    assert shown
    for vm, name in shown:
        assert " ".join(name.split()) == flat(names[vm])
    assert any(HOSTILE_SUFFIX.strip() in name for _, name in shown)


@pytest.mark.slow
def test_migrations_match_the_simulator(reported: Reported) -> None:
    history = reported.history
    (table,) = table_with(reported.tokens, "time", "vm", "name", "from", "to")
    found = []
    for row in table[1:]:
        when = datetime.strptime(text(row[0]), "%Y-%m-%d %H:%M UTC").replace(tzinfo=UTC)
        found.append((when.timestamp(), text(row[1]), text(row[3]), text(row[4])))
        assert re.fullmatch(
            r"(reduced|increased|no clear change)( \(with \d+ more\))?", text(row[8])
        )
    expected = sorted((m.time, m.vm, m.source, m.target) for m in history.migrations)
    assert len(found) == len(expected) == len(MIGRATION_OFFSETS)
    for (t, vm, source, target), (true_t, true_vm, true_source, true_target) in zip(
        found, expected, strict=True
    ):
        assert (vm, source, target) == (true_vm, true_source, true_target)
        # The first sample on the target, to within a scrape; shown to the minute.
        assert abs(t - true_t) <= 2 * history.step + 60


def true_imbalance(history: ClusterHistory, window: Window, config: Config) -> pd.DataFrame:
    """The imbalance per step from the simulator's own work per sample and placement."""
    nodes = [n.name for n in history.nodes]
    position = {n: i for i, n in enumerate(nodes)}
    capacity = np.array(
        [[n.cpus, n.memory_bytes, n.disk_bytes, n.disk_ops, n.network] for n in history.nodes],
        dtype=float,
    )
    times = window.times
    load = np.zeros((len(times), len(nodes), len(RESOURCES)))
    lo = np.searchsorted(history.times, times - window.step, side="right")
    hi = np.searchsorted(history.times, times, side="right")
    for sim in history.vms:
        increments = history.increments(sim.vm)
        where = np.array([position[history.node_at(sim.vm, t)] for t in history.times])
        for j, resource in enumerate(RESOURCES):
            if resource == "memory":
                at = np.array([position[history.node_at(sim.vm, t)] for t in times])
                load[np.arange(len(times)), at, j] += sim.memory_max_bytes
                continue
            work = sum(increments[c] for c in RESOURCE_COUNTERS[resource])
            for n in range(len(nodes)):
                cumulative = np.concatenate([[0.0], np.cumsum(np.where(where == n, work, 0.0))])
                load[:, n, j] += (cumulative[hi] - cumulative[lo]) / window.step
    weights = weight_vector(config.balance.weights, RESOURCES)
    rows = []
    for k in range(len(times)):
        per = imbalance_per_resource(load[k], capacity)
        rows.append([*per, overall_imbalance(per, weights)])
    return pd.DataFrame(rows, index=np.round(times, 3), columns=[*RESOURCES, "overall"])


@pytest.mark.slow
def test_imbalance_over_time_agrees_with_the_truth(reported: Reported) -> None:
    history, config = reported.history, reported.config
    source = PrometheusSource(config.prometheus)
    window = report_window(3 * 86400, history.end, history.step)
    found = imbalance_series(source.history(config, window), config)
    # A fixed number of queries, whatever the number of VMs.
    moved = moved_in(reported, window)
    assert moved
    assert source.queries_issued == len(ReportQueries.for_config(config, window, moved=moved))
    truth = true_imbalance(history, window, config)
    assert list(found.index) == list(truth.index)
    # Each step's load is Prometheus' increase() over the step, extrapolated to its edges
    # from six or seven samples: close to the work done in it; over the period they agree.
    difference = (found - truth).abs()
    assert difference["overall"].median() < 0.02
    assert (found.mean() - truth.mean()).abs().max() < 0.005
    assert difference["memory"].median() < 1e-9


@pytest.mark.slow
def test_the_plan_its_commands_and_what_held_it_back(reported: Reported) -> None:
    tokens = reported.tokens
    assert "Action recommended: 3 migration(s)" in reported.markdown
    (moves,) = table_with(tokens, "step", "wave", "vm")
    assert len(moves) == 1 + 3
    fences = [t for t in tokens if t.type == "fence"]
    assert len(fences) == 1 and fences[0].content.count("qm migrate") == 3
    assert [text(row[2]) for row in moves[1:]] == re.findall(r"qm migrate (\d+)", fences[0].content)
    (held,) = table_with(tokens, "vm", "name", "from", "to", "gain", "blocked by")
    reasons = [text(row[5]) for row in held[1:]]
    assert any("max_migrations" in r for r in reasons)
    # The pinned VM, when a move of it would help, is held back by its pin.
    assert all("pin" in text(row[5]) for row in held[1:] if text(row[0]) == "105")
    (before_after,) = table_with(tokens, "node", "VMs")
    assert len(before_after) == 1 + len(reported.history.nodes)
    # The trade-off: a row per point of the frontier, the knee among them, and its chart.
    (frontier,) = table_with(tokens, "migrations", "overall imbalance", "proven lower bound")
    notes = {text(row[0]): text(row[3]).split(", ") for row in frontier[1:]}
    assert len(frontier) > 1 and any("knee" in n for n in notes.values())
    assert [k for k, n in notes.items() if "plan" in n] == [str(len(moves) - 1)]
    assert f"]({CHARTS['frontier']})" in reported.markdown


@pytest.mark.slow
def test_without_a_current_snapshot_the_report_says_so(reported: Reported, tmp_path: Path) -> None:
    # The period still holds data, but nothing was scraped in the last hour before `at`.
    later = datetime.fromtimestamp(reported.history.end + 3600, UTC)
    stale = tmp_path / CHARTS["plan"]
    stale.write_bytes(b"an old chart")
    (tmp_path / CHARTS["frontier"]).write_bytes(b"an old chart")
    path = write_report(reported.config, period="1d", out_dir=tmp_path, at=later)
    markdown = path.read_text(encoding="utf-8")
    tokens = parser().parse(markdown)
    assert headings(tokens, 2) == SECTIONS
    assert "No plan: no VM has data in the last 5m" in markdown
    assert "steps have no load data" in markdown
    assert not stale.exists() and not (tmp_path / CHARTS["frontier"]).exists()
    images = [
        c for t in tokens if t.type == "inline" for c in t.children or [] if c.type == "image"
    ]
    # No plan: neither its before and after nor its trade-off curve.
    assert len(images) == len(CHARTS) - 2


@pytest.mark.slow
def test_a_period_without_data_is_a_clear_error(reported: Reported, tmp_path: Path) -> None:
    long_before = datetime.fromtimestamp(reported.history.start - 20 * 86400, UTC)
    with pytest.raises(ReportError) as caught:
        write_report(reported.config, period="3d", out_dir=tmp_path, at=long_before)
    message = str(caught.value)
    assert message.startswith("no vmbalance data between") and "\n" not in message
    assert not (tmp_path / "report.md").exists()


@pytest.mark.slow
def test_cli_writes_the_report(
    reported: Reported, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    config_file = tmp_path / "vmbalance.yml"
    settings: dict[str, Any] = {"capacity": reported.history.capacity_settings()}
    config_file.write_text(yaml.safe_dump(settings), encoding="utf-8")
    out = tmp_path / "weekly"
    argv = ["report", "-c", str(config_file), "--prometheus-url", reported.prometheus.url]
    argv += ["--out", str(out), "--period", "1d", "--at", reported.at.isoformat()]
    assert main(argv) == 0
    assert capfd.readouterr().out.strip() == f"wrote {out / 'report.md'}"
    tokens = parser().parse((out / "report.md").read_text(encoding="utf-8"))
    assert headings(tokens, 2) == SECTIONS
    down = f"http://127.0.0.1:{free_port()}"
    assert main(["report", "--prometheus-url", down, "--out", str(tmp_path / "x")]) == 2
    error = capfd.readouterr().err.strip()
    assert error.startswith("vmbalance: prometheus at") and "connection refused" in error


def test_moved_vms_are_those_whose_series_start_or_end_inside_the_window() -> None:
    rows = [("a", "n1", k, 2.0) for k in range(4)]  # stays
    rows += [("b", "n1", 0, 2.0), ("b", "n1", 1, 1.0), ("b", "n2", 1, 1.0), ("b", "n2", 2, 2.0)]
    rows += [("b", "n2", 3, 2.0), ("c", "n2", 2, 1.0), ("c", "n2", 3, 2.0)]  # b moves, c new
    rows += [("d", "n1", 0, 2.0), ("d", "n1", 1, 2.0)]  # d gone
    assert moved_vms(presence(rows)) == ["b", "c", "d"]
    assert moved_vms(presence([r for r in rows if r[0] == "a"])) == []


def raw(node: str, points: list[tuple[float, float]]) -> dict[str, Any]:
    return {"metric": {"node": node, "vm": "x"}, "values": [[t, str(v)] for t, v in points]}


def test_exact_loads_are_each_series_sample_differences_per_step() -> None:
    times = np.array([1000.0, 1300.0, 1600.0])  # steps (700, 1000], (1000, 1300], ...
    old = raw("n1", [(700, 50), (800, 60), (900, 70), (1000, 80), (1100, 90)])
    # Starts at 1200 (its first sample adds nothing), resets at 1500 (adds its value).
    new = raw("n2", [(1200, 4), (1300, 10), (1400, 22), (1500, 3), (1600, 9)])
    found = exact_loads([[old], [new]], times)
    assert list(found.columns) == ["n1", "n2"]
    np.testing.assert_allclose(found["n1"].to_numpy(), [30 / 300, 10 / 300, np.nan])
    np.testing.assert_allclose(found["n2"].to_numpy(), [np.nan, 6 / 300, (12 + 3 + 6) / 300])
    # A sample more than a step after the previous one starts the series again.
    back = raw("n1", [(400, 10), (1000, 90), (1300, 120)])
    np.testing.assert_allclose(exact_loads([[back]], times)["n1"].to_numpy(), [0, 30 / 300, np.nan])
