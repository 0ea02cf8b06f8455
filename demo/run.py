"""`make demo`: a simulated cluster's week in a real Prometheus, then `vmbalance plan` and the
weekly report on it.

Five nodes of uneven size, 72 VMs with heavy-tailed disk I/O, one hot node, a few rules. The
history is backfilled with promtool into a Prometheus on loopback that runs the project's
recording and alerting rules; everything started here is stopped here, and a rerun starts
from scratch.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import yaml
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from devkit.servers import PrometheusServer, backfill  # noqa: E402
from devkit.simulate import simulate_cluster, to_openmetrics_blocks  # noqa: E402
from recommender import cli  # noqa: E402

OUT = REPO / "demo-out"
SEED = 42
STEP_SECONDS = 300
NODE_SCALES = (1.5, 1.0, 1.0, 0.75, 0.5)


def main() -> int:
    console = Console(highlight=False)
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir()
    work = OUT / "work"
    end = math.floor(time.time() / STEP_SECONDS) * STEP_SECONDS
    at = datetime.fromtimestamp(end, UTC).isoformat()

    progress = Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console
    )
    with progress:
        task = progress.add_task("simulating a week of a 5-node, 72-VM cluster", total=None)
        history = simulate_cluster(
            SEED,
            nodes=len(NODE_SCALES),
            vms=72,
            duration=7 * 86400,
            step=STEP_SECONDS,
            end=end,
            migrations=4,
            hostile_names=3,
            node_scales=NODE_SCALES,
        )
        to_openmetrics_blocks(history, work / "openmetrics")
        progress.update(task, completed=1, total=1)
        task = progress.add_task("backfilling the history with promtool", total=None)
        backfill(work / "openmetrics", work / "prometheus-data")
        shutil.rmtree(work / "openmetrics")
        progress.update(task, completed=1, total=1)

    config_path = OUT / "vmbalance.yaml"
    settings = yaml.safe_load((REPO / "demo" / "vmbalance.yaml").read_text())
    settings["capacity"] = history.capacity_settings()
    rule_files = sorted(str(p) for p in (REPO / "alerts").glob("vmbalance*.yml"))
    with PrometheusServer(
        work, rule_files=rule_files, data_dir=work / "prometheus-data"
    ) as prometheus:
        settings["prometheus"] = {"url": prometheus.url}
        config_path.write_text(yaml.safe_dump(settings, sort_keys=False))
        base = ["-c", str(config_path), "--at", at]
        console.rule(f"vmbalance plan  (Prometheus {prometheus.url}, at {at})")
        status = cli.main(["plan", *base])
        for fmt, name in (("json", "plan.json"), ("markdown", "plan.md"),
                          ("commands", "plan.sh")):  # fmt: skip
            status = status or cli.main(["plan", *base, "-o", fmt, "--out-file", str(OUT / name)])
        console.rule("weekly report")
        report = ["report", *base, "--period", "7d", "--out", str(OUT / "report")]
        status = status or cli.main(report)
    shutil.rmtree(work)
    if status:
        return status
    console.rule("files")
    for path in sorted(OUT.rglob("*")):
        if path.is_file():
            console.print(f"  {path.relative_to(REPO)}")
    console.print(
        "Prometheus is stopped. Rerun with `make demo`; plan from the saved config with "
        "`vmbalance plan -c demo-out/vmbalance.yaml --prometheus-url URL`."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
