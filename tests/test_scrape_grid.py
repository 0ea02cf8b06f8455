"""Scrape intervals, evaluation times and the two servers: the same simulated history at a
5-minute and at a 15-second spacing, backfilled into Prometheus (promtool) and imported into
VictoriaMetrics run with its default flags, read by every estimator and by the report."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from devkit.servers import PrometheusServer, VictoriaMetricsServer, backfill
from devkit.simulate import (
    FAMILIES,
    ClusterHistory,
    simulate_cluster,
    to_openmetrics_blocks,
    to_victoriametrics,
)
from recommender.config import Config
from recommender.faces.report import write_report
from recommender.history import History, report_window
from recommender.model import RESOURCES, Snapshot
from recommender.outputs.document import plan_document
from recommender.outputs.report.analysis import imbalance_series, node_statistics, vm_contributions
from recommender.plan import build_plan
from recommender.snapshot import snapshot_text
from recommender.source.answers import quantiles, step_positions
from recommender.source.grid import (
    SPACING_QUERY,
    SPACING_RANGE,
    SampleGrid,
    adapted_query,
    latest_sample,
    rate_samples_query,
    spacing_of,
    wide_enough,
)
from recommender.source.prometheus import PrometheusSource
from recommender.source.queries import SnapshotQueries

RATES = ("cpu", "disk_bytes", "disk_ops", "network")

# --- pure parts ------------------------------------------------------------------------------


def counted(**by_range: float) -> list[dict[str, object]]:
    """A spacing answer: the median count per range (`r3599=12` is 12 samples in 3599 s)."""
    return [
        {"metric": {"range": name.removeprefix("r")}, "value": [0, str(count)]}
        for name, count in by_range.items()
    ]


@pytest.mark.parametrize(
    ("counts", "spacing"),
    [
        ({"r3599": 12, "r899": 3}, 300.0),  # 5-minute scrapes, an hour of data and more
        ({"r3599": 240, "r899": 60, "r239": 16, "r59": 4}, 15.0),
        ({"r3599": 30, "r899": 15, "r239": 4, "r59": 1}, 60.0),  # half an hour of 60 s data
        ({"r3599": 30, "r899": 30, "r239": 30, "r59": 29}, 2.0),  # a minute of 2 s data
    ],
)
def test_the_spacing_is_read_from_the_longest_range_the_data_fills(
    counts: dict[str, float], spacing: float
) -> None:
    assert spacing_of(counted(**counts)) == spacing
    assert f"count_over_time(vmbalance_vm_info[{int(SPACING_RANGE)}s])" in SPACING_QUERY


def test_the_spacing_is_counted_over_one_second_short_of_an_hour() -> None:
    answer = [{"metric": {}, "value": [0, "12"]}]
    assert spacing_of(answer) == 300.0
    assert spacing_of([{"metric": {}, "value": [0, "240"]}]) == 15.0
    assert math.isnan(spacing_of([]))
    latest = [{"metric": {}, "value": [1000, "950.5"]}]
    assert latest_sample(latest, 1000.0) == 950.5
    assert latest_sample([], 1000.0) == 1000.0


def test_sub_windows_hold_at_least_three_samples() -> None:
    five_minutes = SampleGrid(at=1_800_000_150.0, spacing=300.0)
    assert wide_enough(300.0, five_minutes) == 900.0
    assert wide_enough(1800.0, five_minutes) == 1800.0
    query, warnings = adapted_query(Config().query, five_minutes)
    assert query.short_window == "900s"
    (warning,) = warnings
    assert "short_window 5m" in warning and "300s spacing" in warning and "900s" in warning
    fifteen = SampleGrid(at=1_800_000_150.0, spacing=15.0)
    assert adapted_query(Config().query, fifteen) == (Config().query, [])
    # Unknown spacing (no data): the config as it is.
    assert adapted_query(Config().query, SampleGrid(at=0.0)) == (Config().query, [])


def test_levels_leave_out_the_window_edge_and_subqueries_land_on_samples() -> None:
    grid = SampleGrid(at=1_800_000_150.0, spacing=300.0)
    config = Config.model_validate({"query": {"estimator": "quantile", "short_window": "15m"}})
    queries = SnapshotQueries.for_config(config, grid).queries
    # Subquery steps are multiples of 900 s; 150 s back puts each on the data's grid, and the
    # range starts on the earliest of the four steps at or before `at` (150 s + 3 x 900 s).
    assert (1_800_000_150 - 1_800_000_150 % 900 - 150) % 300 == 1_800_000_150 % 300
    for name in ("load_cpu", "load_memory"):
        assert "offset 150000ms" in queries[name] and queries[name].endswith("[2850000ms:15m]")
    # The mean: counters over the whole window, which starts on a sample; the used memory
    # over half a spacing less, without the edge sample only Prometheus would count.
    mean = SnapshotQueries.for_config(Config(), grid).queries
    assert "[1h])" in mean["load_cpu"] and "offset" not in mean["load_cpu"]
    assert "[3450000ms]" in mean["load_memory"]


def test_report_steps_are_multiples_of_the_spacing() -> None:
    at = 1_800_000_150.0
    assert report_window(86400, at, 300.0).step == 900.0
    assert report_window(7 * 86400, at, 300.0).step == 1800.0
    assert report_window(86400, at, 15.0).step == 300.0
    assert report_window(86400, at, 45.0).step == 360.0
    assert report_window(86400, at, 300.0).end == at


def test_rate_samples_are_counted_per_resource_without_the_edge_sample() -> None:
    grid = SampleGrid(at=1_800_000_150.0, spacing=300.0)
    counted = rate_samples_query({"cpu": ("a",), "network": ("b", "c")}, 3600.0, grid)
    # Over every node a VM ran on: a VM that just migrated has a rate; only the few under two
    # samples are answered.
    assert counted.count("max by (cluster, vm) (") == 2 and counted.count(") < 2") == 2
    # One counter of each resource (its counters come from one scrape).
    assert counted.count("count_over_time(") == 2 and '"resource", "network"' in counted
    assert "count_over_time(c[" not in counted
    assert "[3450000ms]" in counted


# --- both servers ------------------------------------------------------------------------------


@dataclass
class Servers:
    history: ClusterHistory
    prometheus: PrometheusServer
    victoria: VictoriaMetricsServer

    def urls(self) -> dict[str, str]:
        return {"prometheus": self.prometheus.url, "victoriametrics": self.victoria.url}


def _serve(tmp: Path, history: ClusterHistory) -> Iterator[Servers]:
    to_openmetrics_blocks(history, tmp / "blocks")
    backfill(tmp / "blocks", tmp / "prom-data")
    with (
        PrometheusServer(tmp, data_dir=tmp / "prom-data") as prometheus,
        VictoriaMetricsServer(tmp) as victoria,
    ):
        victoria.import_prometheus(Path(to_victoriametrics(history, tmp / "history.txt")))
        yield Servers(history, prometheus, victoria)


@pytest.fixture(scope="module")
def five_minutes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    # Eight days at 5 min; the last sample 150 s off the 5 min and the 15 min grids.
    end = math.floor(time.time() / 900) * 900 - 900 - 150.0
    history = simulate_cluster(
        21, nodes=3, vms=12, duration=8 * 86400, step=300, end=end, migrations=2
    )
    yield from _serve(tmp_path_factory.mktemp("five-minutes"), history)


@pytest.fixture(scope="module")
def fifteen_seconds(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    end = math.floor(time.time() / 300) * 300 - 300 - 105.0
    history = simulate_cluster(
        22, nodes=3, vms=8, duration=25 * 3600, step=15, end=end, migrations=2
    )
    yield from _serve(tmp_path_factory.mktemp("fifteen-seconds"), history)


def _config(url: str, history: ClusterHistory, estimator: str) -> Config:
    return Config.model_validate(
        {
            "prometheus": {"url": url},
            "capacity": history.capacity_settings(),
            "query": {"estimator": estimator, "quantile": 0.9},
        }
    )


def _snapshot(url: str, history: ClusterHistory, estimator: str, at: float) -> Snapshot:
    config = _config(url, history, estimator)
    return PrometheusSource(config.prometheus).build_snapshot(
        config, at=datetime.fromtimestamp(at, UTC)
    )


def _assert_same_vms(a: Snapshot, b: Snapshot, rtol: float) -> None:
    assert sorted(a.vms.index) == sorted(b.vms.index)
    left, right = a.vms.sort_index(), b.vms.loc[sorted(a.vms.index)]
    assert list(left["node"]) == list(right["node"])
    for column in (*RATES, "memory", "memory_max_bytes"):
        np.testing.assert_allclose(left[column], right[column], rtol=rtol, err_msg=column)
    np.testing.assert_allclose(left["burst_ratio"], right["burst_ratio"], rtol=rtol)


@pytest.mark.slow
@pytest.mark.parametrize("spacing", ["five_minutes", "fifteen_seconds"])
@pytest.mark.parametrize("estimator", ["mean", "quantile"])
def test_every_estimator_agrees_on_both_servers_at_any_time_between_samples(
    spacing: str, estimator: str, request: pytest.FixtureRequest
) -> None:
    servers: Servers = request.getfixturevalue(spacing)
    history = servers.history
    found: dict[str, Snapshot] = {}
    for server, url in servers.urls().items():
        on_grid = _snapshot(url, history, estimator, history.end)
        # Between two samples: the same answers as at the sample before.
        for between in (history.end + history.step / 2, history.end + history.step - 1):
            off_grid = _snapshot(url, history, estimator, between)
            assert off_grid.taken_at == on_grid.taken_at
            _assert_same_vms(on_grid, off_grid, rtol=1e-9)
        found[server] = on_grid
        vms = on_grid.vms
        # Nothing unknown, nothing silently zero: every VM has disk and network load.
        assert vms[list(RATES)].notna().all().all() and (vms[list(RATES)] > 0).all().all()
        assert vms["burst_ratio"].notna().all()
        if estimator == "mean":
            truth = history.truth_snapshot().vms.loc[vms.index]
            for resource in RATES:
                np.testing.assert_allclose(vms[resource], truth[resource], rtol=0.01)
            np.testing.assert_allclose(vms["memory"], truth["memory"], rtol=1e-6)
            # The burst (the last 10 minutes) is seen, even by a 15-minute short window.
            (burst,) = history.bursts
            assert vms["burst_ratio"].idxmax() == burst.vm
            assert vms.loc[burst.vm, "burst_ratio"] > 2
    _assert_same_vms(found["prometheus"], found["victoriametrics"], rtol=0.01)
    warned = [w for w in found["prometheus"].warnings if "short_window" in w]
    assert len(warned) == (1 if history.step == 300 else 0)


def _history(url: str, servers: Servers, period: float, at: float) -> History:
    config = _config(url, servers.history, "mean")
    source = PrometheusSource(config.prometheus)
    grid = source.sample_grid(at)
    window = report_window(period, grid.at, grid.spacing)
    return source.history(config, window, grid)


REPORTS = [("five_minutes", 86400.0), ("five_minutes", 7 * 86400.0)]
REPORTS += [("fifteen_seconds", 86400.0)]


@pytest.mark.slow
@pytest.mark.parametrize(("spacing", "period"), REPORTS)
def test_reports_agree_on_both_servers_at_any_time_between_samples(
    spacing: str, period: float, request: pytest.FixtureRequest
) -> None:
    servers: Servers = request.getfixturevalue(spacing)
    history = servers.history
    config = _config(servers.prometheus.url, history, "mean")
    found: dict[str, History] = {}
    for server, url in servers.urls().items():
        on_grid = _history(url, servers, period, history.end)
        off_grid = _history(url, servers, period, history.end + history.step / 2)
        assert on_grid.window == off_grid.window
        assert on_grid.has_data.all(), f"{server}: steps without data"
        for resource in RESOURCES:
            pd.testing.assert_frame_equal(on_grid.load[resource], off_grid.load[resource])
        found[server] = on_grid
    prometheus, victoria = found["prometheus"], found["victoriametrics"]
    assert len(prometheus.presence) == len(victoria.presence) > 0
    assert (prometheus.presence["samples"] == victoria.presence["samples"]).all()
    # A step in which a VM moved holds a series that starts and one that ends inside it, where
    # the servers' increase() differ: the moved VMs' loads are their raw samples' differences
    # (docs/imbalance.md), so those steps agree to 1 % like every other step and the totals.
    times = prometheus.load["cpu"].index.to_numpy()
    step = prometheus.window.step
    moving = np.zeros(len(times), dtype=bool)
    for move in history.migrations:
        moving |= (times - step < move.time + history.step) & (times >= move.time)
    assert moving.sum() <= 2 * len(history.migrations)
    begin = prometheus.window.begin
    assert moving.any() == any(begin < m.time <= times[-1] for m in history.migrations)
    for resource in RESOURCES:
        load, other = prometheus.load[resource], victoria.load[resource]
        assert (load.sum(axis=1) > 0).all()
        np.testing.assert_allclose(load[~moving], other[~moving], rtol=0.01, err_msg=resource)
        np.testing.assert_allclose(load[moving], other[moving], rtol=0.01, err_msg=resource)
        np.testing.assert_allclose(load.sum(), other.sum(), rtol=0.01, err_msg=resource)
    pairs = prometheus.pairs.sort_index()
    np.testing.assert_allclose(pairs, victoria.pairs.loc[pairs.index], rtol=0.01)
    imbalance = imbalance_series(prometheus, config)
    np.testing.assert_allclose(imbalance, imbalance_series(victoria, config), rtol=0.01)


def test_quantiles_interpolate_as_prometheus_does() -> None:
    answer = [
        {
            "metric": {"vm": "a"},
            "values": [[1, "0.5176"], [2, "0.8748"], [3, "0.5772"], [4, "0.659"]],
        },
        {"metric": {"vm": "b"}, "values": [[1, "NaN"]]},
    ]
    (only,) = quantiles(answer, 0.9)
    assert only["metric"] == {"vm": "a"}
    # Rank 0.9 * 3 = 2.7 of the sorted values: 0.659 + 0.7 * (0.8748 - 0.659).
    assert float(only["value"][1]) == pytest.approx(0.659 + 0.7 * (0.8748 - 0.659))


def test_range_answers_land_on_their_step_whatever_the_server_rounds() -> None:
    times = 1000.0 + 300.0 * np.arange(4)
    stamps = [1150.0, 1450.0, 1750.0, 2050.0, 2400.0, 999.0]
    assert step_positions(stamps, times, shift=150.0).tolist() == [0, 1, 2, 3, -1, -1]


@pytest.mark.slow
@pytest.mark.parametrize("server", ["prometheus", "victoriametrics"])
def test_a_week_report_over_one_day_of_data(
    fifteen_seconds: Servers, server: str, tmp_path: Path
) -> None:
    """25 hours of data, a 7-day report: the rates are over the covered time (not diluted
    over seven days), the summary names the covered span, and no trend is drawn."""
    history = fifteen_seconds.history
    url = fifteen_seconds.urls()[server]
    config = _config(url, history, "mean")
    found = _history(url, fifteen_seconds, 7 * 86400, history.end)
    assert found.covered == pytest.approx(history.end - history.start, abs=60)
    per_vm = vm_contributions(found).groupby(level="vm").sum()
    for sim in history.vms:
        truth = history.true_load(sim.vm, history.end, history.end - history.start)
        for resource in RATES:
            assert per_vm.loc[sim.vm, resource] == pytest.approx(truth[resource], rel=0.02)
    assert all(math.isnan(n.trend_per_day) for n in node_statistics(found, "cpu"))

    at = datetime.fromtimestamp(history.end, UTC)
    markdown = write_report(config, "7d", tmp_path / "out", at).read_text(encoding="utf-8")
    assert "Data covers 1.0 day(s) of the 7 requested" in markdown
    assert "steps have no load data" in markdown


# --- samples but no computable rate: unknown, never 0 --------------------------------------------

# VM 9001 has one sample of everything, at the evaluation time; VM 9002 has run on pve1 for
# the whole window, but its counters (two disks, one NIC, CPU) all come from one scrape.
LONE, ONE_SCRAPE = "9001", "9002"
COUNTER_FAMILIES = {
    "vmbalance_vm_cpu_seconds_total": None,
    "vmbalance_vm_disk_read_bytes_total": "disk",
    "vmbalance_vm_disk_written_bytes_total": "disk",
    "vmbalance_vm_disk_reads_completed_total": "disk",
    "vmbalance_vm_disk_writes_completed_total": "disk",
    "vmbalance_vm_network_receive_bytes_total": "interface",
    "vmbalance_vm_network_transmit_bytes_total": "interface",
}


def _sparse_series(history: ClusterHistory) -> list[tuple[str, str, np.ndarray, float]]:
    """(family, label text, times, value) of the two VMs; counters far from zero, as a VM's
    are after it has run a while."""
    end, hour = history.end, history.times[history.times > history.end - 3600]
    out = []
    for vm, seen in ((LONE, np.array([end])), (ONE_SCRAPE, hour)):
        base = f'node="pve1",vm="{vm}"'
        out.append(("vmbalance_vm_info", f'{base},name="sparse-{vm}",backend="qmp"', seen, 1.0))
        out.append(("vmbalance_vm_memory_used_bytes", base, seen, 2.0 * 1024**3))
        out.append(("vmbalance_vm_memory_max_bytes", base, seen, 4.0 * 1024**3))
        for family, device in COUNTER_FAMILIES.items():
            devices = [""] if device is None else (["sda", "sdb"] if device == "disk" else ["n0"])
            for name in devices:
                labels = base + (f',{device}="{name}"' if device else "")
                out.append((family, labels, np.array([end]), 7.5e9))
    return out


def _write_sparse(history: ClusterHistory, om: Path, vm_text: Path) -> None:
    kinds = {name: (om_name, kind) for name, om_name, kind in FAMILIES}
    series = _sparse_series(history)
    with om.open("w") as out:
        for family in dict.fromkeys(f for f, *_ in series):
            om_name, kind = kinds[family]
            out.write(f"# TYPE {om_name} {kind}\n")
            for _, labels, times, value in (s for s in series if s[0] == family):
                out.writelines(f"{family}{{{labels}}} {value!r} {t:.0f}\n" for t in times)
        out.write("# EOF\n")
    with vm_text.open("w") as out:
        for family, labels, times, value in series:
            out.writelines(f"{family}{{{labels}}} {value!r} {t * 1000:.0f}\n" for t in times)


@pytest.fixture(scope="module")
def sparse(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    tmp = tmp_path_factory.mktemp("sparse")
    end = math.floor(time.time() / 300) * 300 - 600.0
    history = simulate_cluster(23, nodes=3, vms=6, duration=3 * 3600, step=60, end=end)
    to_openmetrics_blocks(history, tmp / "blocks")
    _write_sparse(history, tmp / "blocks" / "sparse.om", tmp / "sparse.txt")
    backfill(tmp / "blocks", tmp / "prom-data")
    with (
        PrometheusServer(tmp, data_dir=tmp / "prom-data") as prometheus,
        VictoriaMetricsServer(tmp) as victoria,
    ):
        victoria.import_prometheus(Path(to_victoriametrics(history, tmp / "history.txt")))
        victoria.import_prometheus(tmp / "sparse.txt")
        yield Servers(history, prometheus, victoria)


@pytest.mark.parametrize("server", ["prometheus", "victoriametrics"])
def test_a_vm_with_samples_but_no_computable_rate_is_unknown_never_zero(
    server: str, sparse: Servers
) -> None:
    config = _config(sparse.urls()[server], sparse.history, "mean")
    snapshot = _snapshot(sparse.urls()[server], sparse.history, "mean", sparse.history.end)
    vms = snapshot.vms
    # Both VMs are there, with their memory; every rate of theirs is unknown.
    assert {LONE, ONE_SCRAPE} <= set(vms.index)
    for vm in (LONE, ONE_SCRAPE):
        assert vms.loc[vm, "memory"] == 2.0 * 1024**3
        assert vms.loc[vm, list(RATES)].isna().all(), vms.loc[vm, list(RATES)]
    others = vms.drop(index=[LONE, ONE_SCRAPE])
    assert (others[list(RATES)] > 0).all().all()
    document = json.loads(snapshot_text(snapshot, config))
    entries = {vm["vm"]: vm for vm in document["vms"]}
    for vm in (LONE, ONE_SCRAPE):
        assert all(entries[vm]["load"][r] is None for r in RATES)
    for resource in RATES:
        (said,) = [w for w in document["warnings"] if f"({resource} rate unknown)" in w]
        assert LONE in said and ONE_SCRAPE in said
    # Not also told as VMs without the CPU counter: they have one.
    assert not [w for w in document["warnings"] if "without vmbalance_vm_cpu_seconds_total" in w]
    # The plan leaves them where they are, and says why.
    plan = plan_document(build_plan(snapshot, config), config)
    (left,) = [w for w in plan["warnings"] if "unknown load" in w]
    assert LONE in left and ONE_SCRAPE in left
    assert not {m["vm"] for m in plan["migrations"]} & {LONE, ONE_SCRAPE}
