"""Snapshot, plan and serve time at fleet size: N clusters x 32 nodes x 40 VMs of generated
history in one store (Prometheus, VictoriaMetrics), and a single 10,000-VM cluster of 400 nodes
with a day of history.

Each cluster is `devkit.simulate` (seeded; about 2 % of its VMs migrate within the history)
with `cluster` on every series and node names and VM ids unique across the fleet.
`vmbalance_vm_info` is written for `--history` seconds in the fleets (a day in the single
cluster; that is what the history queries read), the other families only for the last
`--recent` seconds (a snapshot reads the last hour of them). The history goes to Prometheus
through `promtool tsdb create-blocks-from openmetrics` (one file per 2 h block) and to
VictoriaMetrics through `/api/v1/import/prometheus`; with `--data-dir` the stores are kept
and reused by the next run (`--build-only` only builds them).

Per size and server: the whole store's snapshot in process (`PrometheusSource.build_snapshot`,
wall time and PromQL queries sent), `vmbalance plan -o json` end to end as a subprocess
(`--cluster c00` in the fleets; wall time, its own peak RSS: bench/child_rss.py), one
`vmbalance serve --once`
over every cluster (wall time, peak RSS, the queries the server answered for it), the
server's peak RSS (VmHWM), and (`--old-up-to` VMs at most) the two 24-hour subqueries the
snapshot once sent.

    .venv/bin/python bench/bench_fleet_scale.py [--clusters 1 5 20 50] [--single 10000]
        [--runs 3] [--data-dir DIR] [--no-docs]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import IO, Any

import child_rss
import numpy as np
import requests
from docs_section import replace_section

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from devkit.servers import PrometheusServer, VictoriaMetricsServer, backfill  # noqa: E402
from devkit.simulate import FAMILIES, ClusterHistory, simulate_cluster  # noqa: E402
from recommender.config import Config  # noqa: E402
from recommender.source.prometheus import PARALLEL_QUERIES, PrometheusSource  # noqa: E402

NODES, VMS_PER_NODE = 32, 40
SINGLE_VMS_PER_NODE = 25  # the single 10,000-VM cluster: 400 nodes
DAY = 86400.0
BLOCK = 7200.0
INFO = "vmbalance_vm_info"
OLD_QUERIES = {
    "last seen (24h:1m)": (f"max by (node, vm, name) (max_over_time(timestamp({INFO})[24h:1m]))"),
    "first seen (24h:1m)": f"min by (node, vm) (min_over_time(timestamp({INFO})[24h:1m]))",
}
QUERY_TIMEOUT = 300.0


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


@dataclass
class Fleet:
    name: str
    clusters: int
    nodes: int
    vms: int
    migrations: int


def _cluster(k: int, nodes: int, vms: int, end: float, step: float, span: float) -> ClusterHistory:
    return simulate_cluster(
        1000 + k,
        nodes=nodes,
        vms=vms,
        duration=span,
        step=step,
        end=end,
        migrations=max(3, vms // 50),
        hostile_names=0,
    )


def _relabel(k: int, labels: tuple[tuple[str, str], ...]) -> str:
    out = [("cluster", f"c{k:02d}")]
    for key, value in labels:
        if key == "node":
            value = f"c{k:02d}-{value}"
        elif key == "vm":
            value = str(k * 100_000 + int(value))
        out.append((key, value))
    return ",".join(f'{key}="{_escape(value)}"' for key, value in out)


def _lines(
    history: ClusterHistory, k: int, recent_from: float
) -> Iterator[tuple[str, str, np.ndarray, np.ndarray, bool]]:
    """(family, label text, times, values, integer) of one cluster's series, the other
    families than `vmbalance_vm_info` cut to the recent part."""
    for s in history.series():
        keep = np.ones(len(s.times), dtype=bool) if s.family == INFO else s.times >= recent_from
        if keep.any():
            yield s.family, _relabel(k, s.labels), s.times[keep], s.values[keep], s.integer


def _values(values: np.ndarray, integer: bool) -> list[str]:
    return (
        [str(v) for v in values.astype(np.int64).tolist()]
        if integer
        else [repr(v) for v in values.tolist()]
    )


def write_fleet(
    histories: list[tuple[int, ClusterHistory]], recent_from: float, om_dir: Path, vm_file: Path
) -> int:
    """One OpenMetrics file per 2 h block (families grouped, as promtool wants) and one
    VictoriaMetrics import file; returns the number of samples."""
    om_dir.mkdir(parents=True, exist_ok=True)
    handles: dict[int, IO[str]] = {}
    families = {name: (om, kind) for name, om, kind in FAMILIES}
    samples = 0
    per_family: dict[str, list[tuple[str, np.ndarray, np.ndarray, bool]]] = {}
    for k, history in histories:
        for family, labels, times, values, integer in _lines(history, k, recent_from):
            per_family.setdefault(family, []).append((labels, times, values, integer))
    with vm_file.open("w", encoding="utf-8") as vm_out:
        for family, (om_name, kind) in families.items():
            typed: set[int] = set()
            for labels, times, values, integer in per_family.get(family, []):
                text = _values(values, integer)
                blocks = np.floor(times / BLOCK).astype(np.int64)
                prefix = f"{family}{{{labels}}} "
                stamps = times.astype(np.int64).tolist()
                vm_out.write(
                    "".join(f"{prefix}{v} {t * 1000}\n" for v, t in zip(text, stamps, strict=True))
                )
                for block in np.unique(blocks).tolist():
                    out = handles.get(block)
                    if out is None:
                        out = handles[block] = (om_dir / f"block-{block:012d}.om").open(
                            "w", encoding="utf-8"
                        )
                    if block not in typed:
                        out.write(f"# TYPE {om_name} {kind}\n")
                        typed.add(block)
                    idx = np.flatnonzero(blocks == block).tolist()
                    out.write("".join(f"{prefix}{text[i]} {stamps[i]}\n" for i in idx))
                samples += len(text)
    for out in handles.values():
        out.write("# EOF\n")
        out.close()
    return samples


def _hwm_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return math.nan


def _vmbalance(args: list[str], timeout: float) -> tuple[float, float, int]:
    """`vmbalance ARGS` as a subprocess: wall seconds, its own peak RSS MiB
    (`child_rss`: not this process's, which holds whole snapshots), exit code; its stdout
    dropped, its stderr shown when it fails."""
    command = [str(ROOT / ".venv" / "bin" / "vmbalance"), *args]
    with tempfile.TemporaryFile() as errors:
        done = child_rss.run(command, timeout, stderr=errors)
        if done.code != 0:
            errors.seek(0)
            tail = errors.read().decode(errors="replace").strip().splitlines()[-3:]
            said = " / ".join(tail)
            print(f"  {' '.join(args[:1])} failed ({done.code}): {said}", file=sys.stderr)
    return done.wall, done.peak_rss_mib, done.code


def _common(url: str, at: float) -> list[str]:
    return [
        "--prometheus-url",
        url,
        "--timeout",
        str(QUERY_TIMEOUT),
        "--at",
        datetime.fromtimestamp(at, UTC).isoformat(),
    ]


def _queries_answered(url: str) -> float:
    """Instant queries the server has answered so far (its own request counter)."""
    text = requests.get(url + "/metrics", timeout=30).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(("prometheus_http_requests_total{", "vm_http_requests_total{")) and (
            'handler="/api/v1/query"' in line or 'path="/api/v1/query"' in line
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _timed_query(url: str, promql: str, at: float) -> float | None:
    started = time.perf_counter()
    response = requests.get(
        url + "/api/v1/query",
        params={"query": promql, "time": f"{at:.3f}"},
        timeout=QUERY_TIMEOUT,
    )
    elapsed = time.perf_counter() - started
    return elapsed if response.status_code == 200 else None


class TimedSource(PrometheusSource):
    """A `PrometheusSource` that keeps the slowest query it sent."""

    slowest: tuple[float, str] = (0.0, "")
    seconds: float = 0.0  # all queries together

    def query(self, promql: str, at: float) -> list[dict[str, Any]]:
        started = time.perf_counter()
        answer = super().query(promql, at)
        elapsed = time.perf_counter() - started
        self.slowest = max(self.slowest, (elapsed, promql))
        self.seconds += elapsed
        return answer


def _median(values: list[float]) -> float:
    return float(np.median(values)) if values else math.nan


def _snapshot(url: str, at: float, cluster: str | None) -> tuple[float, TimedSource, int]:
    config = Config.model_validate({"prometheus": {"url": url, "timeout_seconds": QUERY_TIMEOUT}})
    source = TimedSource(config.prometheus)
    started = time.perf_counter()
    snapshot = source.build_snapshot(config, at=datetime.fromtimestamp(at, UTC), cluster=cluster)
    return time.perf_counter() - started, source, len(snapshot.vms)


def measure(
    url: str, pid: int, at: float, fleet: Fleet, args: argparse.Namespace, tmp: Path
) -> dict[str, Any]:
    """Medians over `args.runs`: the whole store's snapshot in process, one cluster's
    `vmbalance plan` and (up to `--serve-up-to` clusters) one `vmbalance serve --once`."""
    row: dict[str, Any] = {"old_s": None}
    times, vms_seen = [], 0
    for _ in range(args.runs):
        seconds, source, vms_seen = _snapshot(url, at, None)
        times.append(seconds)
    row.update(
        vms_seen=vms_seen,
        snapshot_s=_median(times),
        queries=source.queries_issued,
        slowest_s=source.slowest[0],
        slowest=source.slowest[1][:120],
        queries_s=source.seconds,
    )
    cluster = ["--cluster", "c00"] if fleet.clusters > 1 else []
    plans = [
        _vmbalance(
            [
                "plan",
                *_common(url, at),
                *cluster,
                "-o",
                "json",
                "--out-file",
                str(tmp / "plan.json"),
            ],
            QUERY_TIMEOUT,
        )
        for _ in range(args.runs)
    ]
    ok = [p for p in plans if p[2] == 0]
    row["plan_s"] = _median([p[0] for p in ok]) if ok else math.nan
    row["plan_rss"] = max((p[1] for p in plans), default=math.nan)
    row["serve_s"] = row["serve_rss"] = row["serve_queries"] = None
    if fleet.clusters > 1 and fleet.clusters <= args.serve_up_to:
        before = _queries_answered(url)
        wall, rss, code = _vmbalance(["serve", "--once", *_common(url, at)], args.serve_timeout)
        row["serve_queries"] = _queries_answered(url) - before
        row["serve_s"] = wall if code == 0 else math.nan
        row["serve_rss"] = rss
    if fleet.vms <= args.old_up_to:
        old = [_timed_query(url, promql, at) for promql in OLD_QUERIES.values()]
        row["old_s"] = None if None in old else sum(t for t in old if t is not None)
    row["server_rss"] = _hwm_mib(pid)
    return row


def build_store(fleet: Fleet, args: argparse.Namespace, where: Path) -> float:
    """Generate and backfill `fleet` into `where` (prom-data/ and vm.txt) unless a finished
    store is there already; returns the evaluation time (the history's end)."""
    done = where / "end"
    if done.exists():
        return float(done.read_text())
    shutil.rmtree(where, ignore_errors=True)
    where.mkdir(parents=True)
    end = math.floor(time.time() / BLOCK) * BLOCK - 3600.0
    span = DAY if fleet.clusters == 1 and fleet.vms > NODES * VMS_PER_NODE else args.history
    started = time.perf_counter()
    histories = [
        (
            k,
            _cluster(
                k, fleet.nodes // fleet.clusters, fleet.vms // fleet.clusters, end, args.step, span
            ),
        )
        for k in range(fleet.clusters)
    ]
    fleet.migrations = sum(len(h.migrations) for _, h in histories)
    samples = write_fleet(histories, end - args.recent, where / "om", where / "vm.txt")
    del histories
    generated = time.perf_counter() - started
    started = time.perf_counter()
    backfill(where / "om", where / "prom-data")
    shutil.rmtree(where / "om")
    print(
        f"{fleet.name}: {samples:,} samples ({span / 3600:g} h of {INFO}), generated "
        f"{generated:.0f} s, promtool {time.perf_counter() - started:.0f} s",
        flush=True,
    )
    done.write_text(repr(end))
    return end


def run_size(fleet: Fleet, args: argparse.Namespace, data: Path) -> dict[str, dict[str, Any]]:
    where = data / fleet.name.replace(" ", "")
    end = build_store(fleet, args, where)
    tmp = Path(tempfile.mkdtemp(prefix="vmbalance-fleet-"))
    try:
        rows: dict[str, dict[str, Any]] = {}
        with PrometheusServer(tmp, data_dir=where / "prom-data") as prometheus:
            assert prometheus.process is not None
            rows["Prometheus"] = measure(
                prometheus.url, prometheus.process.pid, end, fleet, args, tmp
            )
        with VictoriaMetricsServer(tmp) as victoria:
            assert victoria.process is not None
            victoria.import_prometheus(where / "vm.txt")
            rows["VictoriaMetrics"] = measure(
                victoria.url, victoria.process.pid, end, fleet, args, tmp
            )
        for server, row in rows.items():
            print(f"  {server}: {row}", flush=True)
        return rows
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _cell(value: float | None, fmt: str = "{:.2f}") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "failed"
    return fmt.format(value)


def render(results: list[tuple[Fleet, dict[str, dict[str, Any]]]], args: argparse.Namespace) -> str:
    clusters = " ".join(map(str, args.clusters))
    lines = [
        "One store per size holding N clusters x 32 nodes x 40 VMs, with "
        f"{args.history / 3600:g} h of `vmbalance_vm_info` history, and one 10,000-VM cluster "
        f"of {args.single // SINGLE_VMS_PER_NODE} nodes with a day of it; the other families "
        f"for the last {args.recent / 60:.0f} min (a snapshot reads 1 h of them), sampled "
        f"every {args.step:.0f} s; about 2 % of the VMs migrate within the history. "
        f"{f'Medians of {args.runs} runs' if args.runs > 1 else 'One run each'}: the snapshot "
        "of the whole store in process "
        "(`PrometheusSource.build_snapshot`, with the PromQL queries it sends, "
        f"{PARALLEL_QUERIES} at a time); `vmbalance plan -o json` end to end as a subprocess "
        "(`--cluster c00` in the fleets: one 32-node cluster; its own peak RSS, "
        "bench/child_rss.py); "
        "`vmbalance serve --once` (one run planning every cluster; once, its queries counted "
        "by the server's own request counter). The server's peak RSS is its VmHWM after all "
        'of them. "before" is the two 24-hour subqueries the snapshot once sent, summed; "-" '
        "where not measured. Prometheus and VictoriaMetrics with their default flags.",
        "",
        f"- Command: `.venv/bin/python bench/bench_fleet_scale.py --clusters {clusters} "
        f"--single {args.single} --step {args.step:.0f} --history {args.history:.0f} "
        f"--runs {args.runs} --serve-up-to {args.serve_up_to}`",
        f"- Date: {date.today().isoformat()}",
        f"- Machine: {os.cpu_count()} cores, shared; Python {platform.python_version()}; "
        "Prometheus 2.42 and VictoriaMetrics (Debian packages)",
        "",
        "| fleet | VMs | server | snapshot s | query times summed s | slowest query s | queries "
        "| plan s (end to end) | plan peak RSS MiB | serve run s | serve queries "
        "| serve peak RSS MiB | server peak RSS MiB | before: 2 history subqueries s |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: | ---: |",
    ]
    for fleet, rows in results:
        for server, row in rows.items():
            lines.append(
                f"| {fleet.name} | {fleet.vms:,} | {server} | {_cell(row['snapshot_s'])} | "
                f"{_cell(row['queries_s'])} | {_cell(row['slowest_s'])} | "
                f"{row['queries']} | {_cell(row['plan_s'])} | {_cell(row['plan_rss'], '{:.0f}')} | "
                f"{_cell(row['serve_s'], '{:.1f}')} | {_cell(row['serve_queries'], '{:.0f}')} | "
                f"{_cell(row['serve_rss'], '{:.0f}')} | "
                f"{_cell(row['server_rss'], '{:.0f}')} | {_cell(row['old_s'])} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clusters", type=int, nargs="*", default=[1, 5, 20, 50])
    parser.add_argument(
        "--single", type=int, default=10_000, help="VMs of the single cluster (0: none)"
    )
    parser.add_argument("--step", type=float, default=60.0, help="sample interval, seconds")
    parser.add_argument(
        "--history",
        type=float,
        default=4 * 3600.0,
        help="seconds of vmbalance_vm_info in the fleets (the single cluster has a day)",
    )
    parser.add_argument(
        "--recent", type=float, default=4200.0, help="seconds of the other families"
    )
    parser.add_argument("--runs", type=int, default=3, help="runs per measurement (median)")
    parser.add_argument(
        "--serve-up-to", type=int, default=50, help="run serve up to this many clusters"
    )
    parser.add_argument("--serve-timeout", type=float, default=1800.0)
    parser.add_argument(
        "--old-up-to", type=int, default=0, help="time the old subqueries up to this many VMs"
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="keep the generated stores here and reuse them (default: a temporary directory)",
    )
    parser.add_argument("--no-docs", action="store_true")
    parser.add_argument(
        "--build-only", action="store_true", help="only generate the stores (with --data-dir)"
    )
    args = parser.parse_args()
    fleets = [
        Fleet(f"{n} x 32 x 40", n, n * NODES, n * NODES * VMS_PER_NODE, 0) for n in args.clusters
    ]
    if args.single:
        nodes = args.single // SINGLE_VMS_PER_NODE
        fleets.append(Fleet(f"1 x {nodes} x {SINGLE_VMS_PER_NODE}", 1, nodes, args.single, 0))
    data = args.data_dir or Path(tempfile.mkdtemp(prefix="vmbalance-fleet-data-"))
    if args.build_only:
        for fleet in fleets:
            build_store(fleet, args, data / fleet.name.replace(" ", ""))
        return
    try:
        results = [(fleet, run_size(fleet, args, data)) for fleet in fleets]
    finally:
        if args.data_dir is None:
            shutil.rmtree(data, ignore_errors=True)
    body = render(results, args)
    print(body)
    if not args.no_docs:
        replace_section("Recommender: fleet-scale history", body)


if __name__ == "__main__":
    main()
