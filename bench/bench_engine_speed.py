"""Planning time on large seeded random clusters: 1k VMs / 20 nodes, 10k / 200, 100k / 2000.

Times `plan_moves` (the engine: problem arrays, forced moves, search, hysteresis, held-back
analysis) and `build_plan` (ordering and waves) separately, median of a few runs; instance
generation is not timed. Default settings (max_migrations 10, hysteresis on), random rules,
5% of VMs in cooldown and 2% bursting.

    .venv/bin/python bench/bench_engine_speed.py [--runs 3] [--no-docs]
"""

from __future__ import annotations

import argparse
import itertools
import math
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from docs_section import replace_section

from devkit.instances import Shape, random_cluster
from recommender.engine.planner import plan_moves
from recommender.plan import build_plan

SIZES = ((1_000, 20), (10_000, 200), (100_000, 2_000))
LIMITS = {10_000: 2.0, 100_000: 30.0}
# A heavier search: up to 50 migrations and no gain threshold, so every step is searched.
STRESS = {"max_migrations": 50, "min_gain": 0.0, "min_gain_per_gib": 0.0}


def measure(vms: int, nodes: int, runs: int, balance: dict | None = None) -> dict[str, float]:
    shape = Shape(
        nodes=(nodes, nodes),
        vms=(vms, vms),
        rules=True,
        cooldown=0.05,
        burst=0.02,
        balance=balance or {},
    )
    inst = random_cluster(7, shape)
    engine, sequencing = [], []
    result = None
    for _ in range(runs):
        started = time.perf_counter()
        result = plan_moves(inst.snapshot, inst.config)
        engine.append(time.perf_counter() - started)
        started = time.perf_counter()
        build_plan(inst.snapshot, inst.config, result)
        sequencing.append(time.perf_counter() - started)
    assert result is not None
    return {
        "vms": vms,
        "nodes": nodes,
        "engine": statistics.median(engine),
        "plan": statistics.median(sequencing),
        "total": statistics.median(e + s for e, s in zip(engine, sequencing, strict=True)),
        "migrations": result.migrations,
        "before": result.overall_before,
        "after": result.overall_after,
    }


def _line(row: dict[str, float], limits: bool = True) -> str:
    limit = LIMITS.get(int(row["vms"])) if limits else None
    verdict = f"{limit:.0f} s {'✓' if row['total'] <= limit else '✗'}" if limit else "—"
    return (
        f"| {int(row['vms']):,} / {int(row['nodes']):,} | {row['engine']:.2f} s "
        f"| {row['plan']:.3f} s | {row['total']:.2f} s | {verdict} "
        f"| {int(row['migrations'])} | {row['before']:.3f} → {row['after']:.3f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-docs", action="store_true", help="print only")
    args = parser.parse_args()
    rows, stress = [], []
    for vms, nodes in SIZES:
        row = measure(vms, nodes, args.runs)
        rows.append(row)
        print(
            f"{vms} VMs / {nodes} nodes: engine {row['engine']:.2f} s, "
            f"sequencing {row['plan']:.3f} s",
            flush=True,
        )
        stress.append(measure(vms, nodes, 1, STRESS))
        print(f"  stressed: {stress[-1]['total']:.2f} s", flush=True)
    header = [
        "| VMs / nodes | engine (plan_moves) | sequencing (build_plan) | total | limit | "
        "migrations | imbalance before → after |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines = ["Default settings (max_migrations 10, hysteresis on):", "", *header]
    for row in rows:
        lines.append(_line(row))
    lines += [
        "",
        "Stressed: max_migrations 50, min_gain = min_gain_per_gib = 0 (one run; the limits "
        "apply to the default settings):",
        "",
        *header,
        *(_line(row, limits=False) for row in stress),
    ]
    growth = [
        math.log(b["total"] / a["total"]) / math.log(b["vms"] / a["vms"])
        for a, b in itertools.pairwise(rows)
    ]
    lines += [
        "",
        "Growth: time ~ size^k with k = "
        + ", ".join(
            f"{g:.2f} ({int(a['vms']):,} → {int(b['vms']):,})"
            for g, (a, b) in zip(growth, itertools.pairwise(rows), strict=True)
        )
        + " (default settings). Candidate moves are scored with numpy, only for VMs on the "
        "hottest nodes (every node up to 32 nodes) towards the coolest allowed targets, so a "
        "search step costs about the same at 2,000 nodes as at 200; what grows with the VM "
        "count is building the arrays from the frames and copying the state per step. The "
        "search effort is set by cluster size (small: wide beam, pilot method, long tabu "
        "search; up to 3,000 movable VMs: narrow beam; above: greedy with short repairs), "
        "which is why 1,000 VMs on 20 nodes take longer than 10,000 on 200.",
        "",
        "Few migrations on the large clusters: with hundreds of nodes, one migration lowers "
        "the max-based imbalance only down to the next-hottest node, which for most VMs is "
        "less than the gain threshold asks for their memory; the stressed rows show what the "
        "search does without that threshold.",
        "",
        f"Run: `.venv/bin/python bench/bench_engine_speed.py --runs {args.runs}` on "
        f"{date.today().isoformat()}, {platform.machine()}, 2 cores (shared with other "
        f"work), Python {platform.python_version()}; median of {args.runs} runs.",
    ]
    body = "\n".join(lines)
    print(body)
    if not args.no_docs:
        replace_section("Recommender: plan speed", body)


if __name__ == "__main__":
    main()
