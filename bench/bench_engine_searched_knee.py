"""Plans past the exact program's limit that miss their target: the search's own plan against
the plan that follows its searched frontier (`recommender.engine.planner._searched_knee`).

Past `exact_max_vms` movable VMs the plan is the search's, and where it misses its target the
frontier is searched too. The product takes the frontier's knee where that balances better
than the search's plan, else the frontier's point for the plan's own migrations where that
does; the baseline is the search's plan as it was (that step left out, in the same process,
each cluster planned both ways in turn). Per cluster: migrations, final overall imbalance,
whether the target is reached, the engine's CPU time, and rule violations of the plan replayed
wave by wave (every rule with each wave in flight, after each migration and at the end).

Clusters: `--instances` of 70-120 VMs on 4-8 nodes (even seeds `heavy_tailed_cluster`, odd
`random_cluster`), and `--large` of the frontier benchmark's 500-2,000-VM heavy-tailed ones.

    .venv/bin/python bench/bench_engine_searched_knee.py [--instances 100] [--large 28]
        [--no-docs]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_engine_frontier import LARGE_SEED
from bench_engine_frontier import instance as large_instance
from docs_section import replace_section, run_line

from devkit.instances import HeavyShape, Shape, heavy_tailed_cluster, random_cluster
from recommender.engine import planner
from recommender.engine.problem import State
from recommender.engine.rules import prepare_constraints, violations
from recommender.plan import build_plan

MID = Shape(nodes=(4, 8), vms=(70, 120))
MID_HEAVY = HeavyShape(base=Shape(nodes=(4, 8), vms=(70, 120), skew=0.8))
FOLLOWED = planner._searched_knee


def _own_plan(_search: Any, _frontier: Any, chosen: Any) -> Any:
    return chosen


VARIANTS: dict[str, Callable[..., Any]] = {"search's plan": _own_plan, "follows": FOLLOWED}


def instance(seed: int) -> Any:
    if seed >= LARGE_SEED:
        return large_instance(seed)
    return heavy_tailed_cluster(seed, MID_HEAVY) if seed % 2 == 0 else random_cluster(seed, MID)


def _violations(snap: Any, cfg: Any, result: Any) -> int:
    plan = build_plan(snap, cfg, result)
    problem = result.problem
    constraints = prepare_constraints(problem)
    state = State.initial(problem)
    vm_pos, node_pos = problem.vm_index(), problem.node_index()
    broken = 0
    for wave in plan.waves:
        flight = state.copy()
        for m in wave:
            flight.add_presence(problem, vm_pos[m.vm], node_pos[m.target])
        broken += bool(violations(constraints, flight, final=False))
        for m in wave:
            state.move_vm(problem, vm_pos[m.vm], node_pos[m.target])
            broken += bool(violations(constraints, state, final=False))
    return broken + bool(violations(constraints, state, final=True))


def evaluate(seed: int) -> dict[str, Any]:
    inst = instance(seed)
    row: dict[str, Any] = {"seed": seed, "large": seed >= LARGE_SEED}
    try:
        for name, step in VARIANTS.items():
            planner._searched_knee = step  # type: ignore[assignment]
            cpu = time.process_time()
            result = planner.plan_moves(inst.snapshot, inst.config)
            cpu = time.process_time() - cpu
            row[name] = {
                "migrations": result.migrations,
                "imbalance": result.overall_after,
                "reached": result.target_reached,
                "short": result.triggered and not result.target_reached,
                "method": result.method,
                "cpu": cpu,
                "violations": _violations(inst.snapshot, inst.config, result),
            }
    finally:
        planner._searched_knee = FOLLOWED  # type: ignore[assignment]
    return row


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


def _line(label: str, rows: list[dict[str, Any]]) -> str:
    old, new = VARIANTS
    short = [r for r in rows if r[old]["short"]]
    changed = [
        r
        for r in rows
        if (r[old]["migrations"], round(r[old]["imbalance"], 9))
        != (r[new]["migrations"], round(r[new]["imbalance"], 9))
    ]
    better = sum(r[new]["imbalance"] < r[old]["imbalance"] - 1e-9 for r in changed)
    fewer = sum(r[new]["migrations"] < r[old]["migrations"] for r in changed)
    more = sum(r[new]["migrations"] > r[old]["migrations"] for r in changed)

    def mean(key: str, which: str, of: list[dict[str, Any]]) -> str:
        return f"{statistics.mean(r[which][key] for r in of):.4f}" if of else "-"

    def cpu(which: str) -> str:
        values = [r[which]["cpu"] for r in rows]
        return f"{_p(values, 0.5):.2f} / {_p(values, 0.9):.2f} / {max(values):.2f} s"

    return (
        f"| {label} | {len(rows)} | {len(short)} | {len(changed)} ({better} lower; {fewer} "
        f"with fewer migrations, {more} with more) | "
        f"{sum(r[old]['migrations'] for r in rows)} → {sum(r[new]['migrations'] for r in rows)} | "
        f"{mean('imbalance', old, short)} → {mean('imbalance', new, short)} | "
        f"{sum(r[old]['reached'] for r in rows)} → {sum(r[new]['reached'] for r in rows)} | "
        f"{sum(r[old]['violations'] for r in rows)} → {sum(r[new]['violations'] for r in rows)} | "
        f"{cpu(old)} → {cpu(new)} |"
    )


def summarise(rows: list[dict[str, Any]], seconds: float, load: str, small: int, large: int) -> str:
    methods = Counter(r[name]["method"] for r in rows for name in VARIANTS)
    how = ", ".join(f"{m} {n // len(VARIANTS)}" for m, n in sorted(methods.items()))
    lines = [
        "Each cluster planned with the search's own plan and with the plan that follows the "
        f"searched frontier, in turn, in one process (default settings; the plans' method: {how}; "
        '"none" where the cluster is under the trigger). "Short": triggered plans missing '
        "their target with the search's own plan; the imbalance column is their mean final "
        "overall imbalance; "
        "CPU time is the engine's, p50 / p90 / max.",
        "",
        "| clusters | planned | short of target | plans changed | migrations in all | "
        "imbalance of the short ones | target reached | rule violations | engine CPU |",
        "| --- | ---: | ---: | --- | --- | --- | --- | --- | --- |",
    ]
    mid = [r for r in rows if not r["large"]]
    big = [r for r in rows if r["large"]]
    if mid:
        lines.append(_line("70-120 VMs, 4-8 nodes", mid))
    if big:
        lines.append(_line("500-2,000 VMs, 20-40 nodes", big))
    lines += [
        "",
        run_line(
            f".venv/bin/python bench/bench_engine_searched_knee.py --instances {small} "
            f"--large {large}",
            load,
            seconds,
        ),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=100, help="70-120-VM clusters")
    parser.add_argument("--large", type=int, default=28, help="500-2,000-VM clusters")
    parser.add_argument("--no-docs", action="store_true", help="print only")
    args = parser.parse_args()
    if args.instances < 0 or args.large < 0:
        raise SystemExit("--instances and --large must not be negative")
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    started = time.perf_counter()
    seeds = [*range(args.instances), *range(LARGE_SEED, LARGE_SEED + args.large)]
    rows = []
    for seed in seeds:
        rows.append(evaluate(seed))
        print(f"seed {seed}", file=sys.stderr, flush=True)
    body = summarise(rows, time.perf_counter() - started, load, args.instances, args.large)
    print(body)
    if not args.no_docs:
        replace_section("Recommender: plans past the exact limit, side by side", body)


if __name__ == "__main__":
    main()
