"""`vmbalance report` time and peak RSS at fleet size: one cluster of N VMs (40 per node) with
a period of generated history (`devkit.simulate`, seeded, about 2 % of the VMs migrate),
backfilled into Prometheus with promtool (`devkit.servers.backfill`).

Per size: `vmbalance report --period P` end to end as a subprocess, `--runs` times (median
wall time, its own peak RSS: bench/child_rss.py), for the code of this tree and, with
`--baseline-tree DIR`, for the code of another checkout side by side against the same server (its
`recommender` package first on PYTHONPATH, same interpreter and libraries). `--profile`
adds, for the largest size, an in-process run of this tree's report under cProfile and
tracemalloc: the stages' wall time and the functions that took the most.

    .venv/bin/python bench/bench_report_scale.py [--sizes 500 2000 10000] [--period 1d]
        [--step 300] [--runs 3] [--baseline-tree DIR] [--keep-data DIR] [--profile] [--no-docs]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import math
import os
import platform
import pstats
import shutil
import statistics
import sys
import tempfile
import time
import tracemalloc
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path

import child_rss
from docs_section import replace_section

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from devkit.servers import PrometheusServer, backfill  # noqa: E402
from devkit.simulate import simulate_cluster, to_openmetrics_blocks  # noqa: E402

VMS_PER_NODE = 40
BLOCK = 7200.0
QUERY_TIMEOUT = 300.0
RUN = "import sys; from recommender.entry import main; sys.exit(main())"


@dataclass
class Measured:
    walls: list[float] = field(default_factory=list)
    rss: list[float] = field(default_factory=list)
    markdown_kb: float = math.nan
    failed: str = ""

    @property
    def wall(self) -> float:
        return statistics.median(self.walls) if self.walls else math.nan

    @property
    def peak(self) -> float:
        return statistics.median(self.rss) if self.rss else math.nan


def _duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    return float(text[:-1]) * units[text[-1]]


def report_once(tree: Path, url: str, at: float, period: str, out: Path) -> Measured:
    """One `vmbalance report` subprocess: wall seconds, peak RSS MiB, Markdown size."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    shutil.rmtree(out, ignore_errors=True)
    command = [
        sys.executable,
        "-c",
        RUN,
        "report",
        "--prometheus-url",
        url,
        "--timeout",
        str(QUERY_TIMEOUT),
        "--period",
        period,
        "--at",
        datetime.fromtimestamp(at, UTC).isoformat(),
        "--out",
        str(out),
    ]
    with tempfile.TemporaryFile() as errors:
        done = child_rss.run(command, QUERY_TIMEOUT * 20, stderr=errors, env=env, cwd=out.parent)
        errors.seek(0)
        error = errors.read().decode(errors="replace").strip()
    if done.code != 0:
        return Measured(failed=error.splitlines()[-1] if error else f"exit {done.code}")
    wall, usage_mib = done.wall, done.peak_rss_mib
    markdown = out / "report.md"
    return Measured([wall], [usage_mib], markdown.stat().st_size / 1024)


def measure(tree: Path, url: str, at: float, period: str, runs: int, tmp: Path) -> Measured:
    total = Measured()
    for _ in range(runs):
        one = report_once(tree, url, at, period, tmp / "report")
        if one.failed:
            print(f"    failed: {one.failed}", file=sys.stderr, flush=True)
            return one
        total.walls += one.walls
        total.rss += one.rss
        total.markdown_kb = one.markdown_kb
        print(f"    {one.walls[0]:.1f} s, {one.rss[0]:.0f} MiB", flush=True)
    return total


def profile(url: str, at: float, period: str, out: Path, top: int = 25) -> str:
    """The report in this process under cProfile and tracemalloc: the heaviest functions by
    cumulative time, and the peak of Python allocations."""
    from recommender.config import Config
    from recommender.faces.report import write_report

    config = Config.model_validate({"prometheus": {"url": url, "timeout_seconds": QUERY_TIMEOUT}})
    profiler = cProfile.Profile()
    tracemalloc.start()
    started = time.perf_counter()
    profiler.enable()
    write_report(config, period, out, datetime.fromtimestamp(at, UTC))
    profiler.disable()
    wall = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("cumulative").print_stats("recommender", top)
    return (
        f"in process under the profilers: {wall:.1f} s, peak Python allocations "
        f"{peak / 2**20:.0f} MiB\n" + text.getvalue()
    )


def load(vms: int, period: float, step: float, end: float, tmp: Path) -> tuple[int, int]:
    """Simulate and backfill; (nodes, migrations)."""
    nodes = max(2, vms // VMS_PER_NODE)
    history = simulate_cluster(
        7000 + vms,
        nodes=nodes,
        vms=vms,
        duration=period,
        step=step,
        end=end,
        migrations=max(3, vms // 50),
        hostile_names=0,
    )
    to_openmetrics_blocks(history, tmp / "om")
    backfill(tmp / "om", tmp / "prom-data")
    shutil.rmtree(tmp / "om")
    return nodes, len(history.migrations)


@dataclass
class Row:
    vms: int
    nodes: int
    migrations: int
    results: dict[str, Measured]


def loaded(vms: int, args: argparse.Namespace, tmp: Path) -> tuple[float, int, int]:
    """(end of the history, nodes, migrations): simulated and backfilled into `tmp`, or
    taken from `--keep-data` when an earlier run left them there."""
    period = _duration(args.period)
    kept = args.keep_data / f"{vms}-{args.period}-{args.step:.0f}" if args.keep_data else None
    if kept is not None and (kept / "done").is_file():
        end, nodes, migrations = (kept / "done").read_text().split()
        shutil.copytree(kept / "prom-data", tmp / "prom-data")
        return float(end), int(nodes), int(migrations)
    end = math.floor(time.time() / BLOCK) * BLOCK - 3600.0
    started = time.perf_counter()
    nodes, migrations = load(vms, period, args.step, end, tmp)
    print(f"{vms} VMs on {nodes} nodes: loaded in {time.perf_counter() - started:.0f} s")
    if kept is not None:
        shutil.copytree(tmp / "prom-data", kept / "prom-data", dirs_exist_ok=True)
        (kept / "done").write_text(f"{end} {nodes} {migrations}\n")
    return end, nodes, migrations


def run_size(vms: int, args: argparse.Namespace, trees: dict[str, Path]) -> Row:
    tmp = Path(tempfile.mkdtemp(prefix="vmbalance-report-scale-"))
    try:
        end, nodes, migrations = loaded(vms, args, tmp)
        results: dict[str, Measured] = {}
        with PrometheusServer(tmp, data_dir=tmp / "prom-data") as prometheus:
            for label, tree in trees.items():
                print(f"  {label}:", flush=True)
                results[label] = measure(tree, prometheus.url, end, args.period, args.runs, tmp)
            if args.profile and vms == max(args.sizes):
                print(profile(prometheus.url, end, args.period, tmp / "profiled"))
        return Row(vms, nodes, migrations, results)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _cell(value: float, fmt: str) -> str:
    return "failed" if math.isnan(value) else fmt.format(value)


def render(rows: list[Row], args: argparse.Namespace) -> str:
    sizes = " ".join(map(str, args.sizes))
    baseline = " --baseline-tree DIR" if args.baseline_tree else ""
    lines = [
        f"`vmbalance report --period {args.period}` against Prometheus (defaults) holding one "
        f"cluster of N VMs ({VMS_PER_NODE} per node) with {args.period} of history sampled every "
        f"{args.step:.0f} s (`devkit.simulate`, about 2 % of the VMs migrate), backfilled "
        "with promtool. End to end as a subprocess, median of "
        f"{args.runs} runs: wall time and its own peak RSS (bench/child_rss.py). "
        "The report's own step is "
        "the period over 336, at least 3 sample spacings.",
        "",
        f"- Command: `.venv/bin/python bench/bench_report_scale.py --sizes {sizes} "
        f"--period {args.period} --step {args.step:.0f} --runs {args.runs}{baseline}`",
        f"- Date: {date.today().isoformat()}",
        f"- Machine: {os.cpu_count()} cores, shared; Python {platform.python_version()}; "
        "Prometheus 2.42 (Debian package)",
        "",
        "| VMs | nodes | migrations in the period | code | report s | peak RSS MiB "
        "| report.md KB |",
        "| ---: | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    for row in rows:
        for label, measured in row.results.items():
            lines.append(
                f"| {row.vms:,} | {row.nodes} | {row.migrations} | {label} | "
                f"{_cell(measured.wall, '{:.1f}')} | {_cell(measured.peak, '{:.0f}')} | "
                f"{_cell(measured.markdown_kb, '{:.0f}')} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 2000, 10_000])
    parser.add_argument("--period", default="1d", help="report period, e.g. 1d (units s m h d)")
    parser.add_argument("--step", type=float, default=300.0, help="sample interval, seconds")
    parser.add_argument("--runs", type=int, default=3, help="report runs per size and code")
    parser.add_argument(
        "--baseline-tree", type=Path, help="a checkout whose report to measure beside this one"
    )
    parser.add_argument("--profile", action="store_true", help="profile the largest size")
    parser.add_argument(
        "--keep-data", type=Path, help="keep the backfilled blocks here and reuse them next time"
    )
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args()
    trees: dict[str, Path] = {}
    if args.baseline_tree is not None:
        trees["before"] = args.baseline_tree.resolve()
    trees["this tree" if args.baseline_tree is None else "after"] = ROOT
    rows = [run_size(vms, args, trees) for vms in args.sizes]
    body = render(rows, args)
    print(body)
    if not args.no_docs:
        replace_section("Recommender: report at fleet size", body)


if __name__ == "__main__":
    main()
