"""The trade-off frontier and joint repairs on seeded clusters, half of them heavy-tailed.

Even seeds: `devkit.instances.heavy_tailed_cluster` (a few whale VMs, skewed placement, an
anti-affinity group whose members already share a node, an affinity group already split);
odd seeds: `random_cluster`. Every plan is the default product path (`plan_moves`, exact mode
auto). Per instance:

* rule violations: the plan replayed migration by migration in its order, every rule checked
  after each and at the end;
* the frontier: how many points are proven optimal, and the largest gap between a point and
  its proven lower bound, (imbalance - bound) / imbalance, which bounds its distance from the
  optimum for that k;
* migrations against the exact minimum for the imbalance the plan reaches: the joint program
  (repairs and balance together, `recommender.engine.joint`) asked for the fewest migrations
  at or under the plan's final imbalance;
* plan time.

    .venv/bin/python bench/bench_engine_frontier.py [--instances 200] [--jobs N] [--no-docs]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
from docs_section import replace_section

from devkit.instances import HeavyShape, Shape, heavy_tailed_cluster, random_cluster
from recommender.engine.exact import available
from recommender.engine.forced import frozen_vms
from recommender.engine.joint import joint_model
from recommender.engine.planner import balance_movable, plan_moves
from recommender.engine.problem import State
from recommender.engine.rules import prepare_constraints, violations
from recommender.plan import build_plan

SHAPE = Shape(nodes=(3, 6), vms=(10, 30))
HEAVY = HeavyShape(base=Shape(nodes=(3, 6), vms=(10, 30), skew=0.8))


def instance(seed: int) -> Any:
    return heavy_tailed_cluster(seed, HEAVY) if seed % 2 == 0 else random_cluster(seed, SHAPE)


def evaluate(seed: int) -> dict[str, Any]:
    inst = instance(seed)
    snap, cfg = inst.snapshot, inst.config
    started = time.perf_counter()
    result = plan_moves(snap, cfg)
    seconds = time.perf_counter() - started
    problem = result.problem
    constraints = prepare_constraints(problem)
    row: dict[str, Any] = {
        "seed": seed,
        "heavy": seed % 2 == 0,
        "vms": problem.n_vms,
        "time": seconds,
        "triggered": result.triggered,
        "moves": result.migrations,
        "repairs": sum(m.kind == "repair" for m in result.moves),
        "reached": result.target_reached,
        "violations": _violations(snap, cfg, result, constraints),
    }
    frontier = result.frontier
    if frontier is not None and frontier.points:
        gaps = [
            (p.imbalance - p.lower_bound) / p.imbalance if p.imbalance > 0 else 0.0
            for p in frontier.points
        ]
        row.update(
            points=len(frontier.points),
            exact_points=sum(p.exact for p in frontier.points),
            within_2=sum(g <= 0.02 for g in gaps),
            max_gap=max(gaps),
        )
    if result.moves:
        start = State.initial(problem)
        frozen = frozen_vms(constraints, problem.n_vms)
        movable = balance_movable(problem, constraints)
        # What the planner may move: balancing units, and the units a rule forces.
        chosen = movable & (start.unit_node != -1)
        for constraint in constraints:
            for unit in constraint.must_move(start, frozen.vms):
                chosen[unit] = start.unit_node[unit] != -1
        units = np.flatnonzero(chosen)
        model = joint_model(problem, constraints, start, units, frozen)
        fewest = model.solve(result.overall_after + 1e-9, problem.weights)
        row.update(exact_status=fewest.status, exact_moves=fewest.migrations)
    return row


def _violations(snap: Any, cfg: Any, result: Any, constraints: Any) -> int:
    """Rule violations replaying the ordered plan one migration at a time."""
    problem = result.problem
    plan = build_plan(snap, cfg, result)
    state = State.initial(problem)
    vm_pos, node_pos = problem.vm_index(), problem.node_index()
    count = 0
    for m in plan.migrations:
        state.move_vm(problem, vm_pos[m.vm], node_pos[m.target])
        count += len(violations(constraints, state, final=False))
    return count + len(violations(constraints, state, final=True))


def _pct(part: int, whole: int) -> str:
    return f"{part}/{whole} ({100 * part / whole:.1f}%)" if whole else "0/0"


def _times(rows: list[dict[str, Any]]) -> str:
    times = sorted(r["time"] for r in rows)
    p90 = times[min(len(times) - 1, int(np.ceil(0.9 * len(times))) - 1)]
    return f"{statistics.median(times):.2f} s | {p90:.2f} s | {times[-1]:.2f} s"


def summarise(rows: list[dict[str, Any]], seconds: float) -> str:
    planned = [r for r in rows if r["triggered"] or r["moves"]]
    framed = [r for r in rows if "points" in r]
    compared = [r for r in rows if r.get("exact_status") == "optimal"]
    points = sum(r["points"] for r in framed)
    exact_points = _pct(sum(r["exact_points"] for r in framed), points)
    close = _pct(sum(r["within_2"] for r in framed), points)
    gap = max((r["max_gap"] for r in framed), default=0.0)
    equal = _pct(sum(r["moves"] <= r["exact_moves"] for r in compared), len(compared))
    one_more = _pct(sum(r["moves"] <= r["exact_moves"] + 1 for r in compared), len(compared))
    reached = _pct(sum(r["reached"] for r in planned), len(planned))
    heavy = [r for r in rows if r["heavy"]]
    lines = [
        f"{len(rows)} instances (seeds 0-{len(rows) - 1}; even seeds heavy-tailed with whales "
        "and an anti-affinity group and an affinity group broken at the start, odd seeds "
        f"`random_cluster`; 3-6 nodes, 10-30 VMs); {len(planned)} with migrations or a "
        "triggered plan.",
        "",
        "| measure | result |",
        "| --- | --- |",
        f"| rule violations, any step of any plan | {sum(r['violations'] for r in rows)} |",
        f"| frontier points proven optimal | {exact_points} |",
        f"| frontier points within 2% of their proven bound | {close} |",
        f"| largest gap of a point to its bound | {gap:.1%} |",
        f"| migrations equal to the exact minimum for the imbalance reached | {equal} |",
        f"| at most one more | {one_more} |",
        f"| target reached (triggered plans) | {reached} |",
        "",
        "Plan time (the default path: search, exact program, joint repairs, frontier):",
        "",
        "| instances | median | p90 | max |",
        "| --- | --- | --- | --- |",
        f"| all {len(rows)} | {_times(rows)} |",
        f"| heavy-tailed {len(heavy)} | {_times(heavy)} |",
        "",
        f"Run: `.venv/bin/python bench/bench_engine_frontier.py --instances {len(rows)}` on "
        f"{date.today().isoformat()}, {platform.machine()}, 2 cores (shared with other work), "
        f"Python {platform.python_version()}; {seconds / 60:.0f} min in total.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--no-docs", action="store_true", help="print only")
    args = parser.parse_args()
    if not available():
        raise SystemExit("highspy is needed for the exact comparison (pip install highspy)")
    started = time.perf_counter()
    rows = []
    with multiprocessing.Pool(max(args.jobs, 1)) as pool:
        for row in pool.imap(evaluate, range(args.instances)):
            rows.append(row)
            print(
                f"seed {row['seed']:3d}: {row['vms']} VMs moves {row['moves']} "
                f"(repairs {row['repairs']}) exact {row.get('exact_moves')} "
                f"points {row.get('exact_points')}/{row.get('points')} {row['time']:.2f}s",
                flush=True,
            )
    body = summarise(rows, time.perf_counter() - started)
    print(body)
    if not args.no_docs:
        replace_section("Recommender: frontier and joint repairs", body)


if __name__ == "__main__":
    main()
