"""Plan quality on seeded random clusters (3-8 nodes of uneven size, 10-40 VMs with
heavy-tailed disk I/O, random pins, exclusions, affinity and anti-affinity groups).

Compares the engine with
  (a) the original greedy re-pack from scratch (bench/baseline.py), and
  (b) the exact minimum number of migrations reaching the same target, from a mixed-integer
      program (HiGHS): binary x[v, n], u[n, r] <= U[r] + z[r], sum w z / sum w <= target,
      memory, CPU and rule rows; minimise migrations.

The comparison turns the per-move gain thresholds off (min_gain = min_gain_per_gib = 0) and
allows 40 migrations: the exact program minimises migrations for a target, it cannot express
a gain threshold per move. "Same target" is the configured target when the engine reaches it,
else the imbalance the engine ends at.

    .venv/bin/python bench/bench_engine_quality.py [--instances 200] [--no-docs]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from datetime import date

import numpy as np
from baseline import greedy_repack
from docs_section import replace_section

from recommender.engine import balance_movable, plan_moves
from recommender.exact import available, solve_exact
from recommender.instances import Shape, random_cluster
from recommender.problem import State, build_problem
from recommender.rules import prepare_constraints
from recommender.search import Scorer

COMPARE = {"min_gain": 0.0, "min_gain_per_gib": 0.0, "max_migrations": 40}


def evaluate(seed: int) -> dict[str, object]:
    inst = random_cluster(seed, Shape(balance=COMPARE))
    snapshot, config = inst.snapshot, inst.config
    problem = build_problem(snapshot, config)
    row: dict[str, object] = {"seed": seed, "vms": problem.n_vms, "nodes": problem.n_nodes}
    _, row["greedy_moves"], row["greedy_imbalance"] = greedy_repack(problem)

    started = time.perf_counter()
    heuristic = plan_moves(snapshot, config, exact=False)
    row["time"] = time.perf_counter() - started
    row["triggered"] = heuristic.triggered
    row["before"] = heuristic.overall_before
    row["moves"] = heuristic.migrations
    row["memory"] = heuristic.memory_bytes
    row["after"] = heuristic.overall_after
    row["reached"] = heuristic.target_reached
    if not heuristic.triggered:
        return row

    constraints = prepare_constraints(problem)
    start = State.initial(problem)
    movable = balance_movable(problem, constraints) & (start.unit_node >= 0)
    units = np.flatnonzero(movable)
    units = units[problem.active[start.unit_node[units]]]
    end = start.copy()
    for move in heuristic.unit_moves:
        end.move_unit(problem, move.unit, move.target)
    hint = (heuristic.unit_moves, Scorer(problem).view(end.node_load).per_resource)
    same = config.balance.target if heuristic.target_reached else heuristic.overall_after + 1e-9
    started = time.perf_counter()
    exact = solve_exact(problem, constraints, start, units, same, hint=hint)
    row["exact_time"] = time.perf_counter() - started
    row["exact_status"] = exact.status
    row["exact_moves"] = exact.migrations if exact.reached else None
    if not heuristic.target_reached:
        reach = solve_exact(problem, constraints, start, units, config.balance.target)
        row["target_reachable"] = reach.reached

    started = time.perf_counter()
    auto = plan_moves(snapshot, config, exact=True)
    row["auto_time"] = time.perf_counter() - started
    row["auto_moves"] = auto.migrations
    row["auto_reached"] = auto.target_reached
    row["auto_after"] = auto.overall_after

    # The engine asked for the balance the re-pack reaches.
    level = float(row["greedy_imbalance"])  # type: ignore[arg-type]
    if level < heuristic.overall_before:
        balance = config.balance.model_copy(
            update={"target": level, "trigger": max(level, min(config.balance.trigger, level))}
        )
        same_level = plan_moves(
            snapshot, config.model_copy(update={"balance": balance}), exact=False
        )
        row["level_moves"] = same_level.migrations
        row["level_after"] = same_level.overall_after
    return row


def pct(part: int, whole: int) -> str:
    return f"{part}/{whole} ({100.0 * part / whole:.1f}%)" if whole else "0/0"


def _gaps(rows: list[dict[str, object]], key: str) -> list[int]:
    return [int(r[key]) - int(r["exact_moves"]) for r in rows]  # type: ignore[arg-type]


def _row(label: str, rows: list[dict[str, object]]) -> str:
    heuristic, auto = _gaps(rows, "moves"), _gaps(rows, "auto_moves")
    cells = []
    for gap in (heuristic, auto):
        cells.append(
            f"{pct(sum(g == 0 for g in gap), len(gap))} | "
            f"{pct(sum(g <= 1 for g in gap), len(gap))} | {max(gap, default=0)}"
        )
    return f"| {label} | {cells[0]} | {cells[1]} |"


def summarise(rows: list[dict[str, object]], seconds: float) -> str:
    done = [r for r in rows if r["triggered"]]
    known = [r for r in done if r.get("exact_moves") is not None]
    optimal = sum(1 for r in known if r["exact_status"] == "optimal")
    reached = [r for r in known if r["reached"]]
    missed = [r for r in known if not r["reached"]]
    reachable = [r for r in missed if r.get("target_reachable")]
    greedy = [r for r in done if int(r["greedy_moves"]) > 0]  # type: ignore[arg-type]
    ratio = [int(r["moves"]) / int(r["greedy_moves"]) for r in greedy]  # type: ignore[arg-type]
    no_worse = sum(
        1
        for r in done
        if float(r["after"]) <= max(float(r["greedy_imbalance"]), 0.10) + 1e-9  # type: ignore[arg-type]
    )
    lower = sum(1 for r in done if float(r["after"]) <= float(r["greedy_imbalance"]) + 1e-9)  # type: ignore[arg-type]
    level = [r for r in greedy if "level_moves" in r]
    level_ok = [r for r in level if float(r["level_after"]) <= float(r["greedy_imbalance"]) + 1e-9]  # type: ignore[arg-type]
    level_ratio = [int(r["level_moves"]) / int(r["greedy_moves"]) for r in level_ok]  # type: ignore[arg-type]
    times = [float(r["time"]) for r in done]  # type: ignore[arg-type]
    exact_times = [float(r["exact_time"]) for r in done]  # type: ignore[arg-type]
    auto_times = [float(r["auto_time"]) for r in done]  # type: ignore[arg-type]
    lines = [
        f"{len(rows)} instances (seeds 0-{len(rows) - 1}); planning triggered on {len(done)}. "
        f"The exact program proved its optimum on {optimal} of the {len(known)}; on the "
        "others it stopped at its node limit and its best plan stands in for the minimum.",
        "",
        "Migrations against the exact minimum reaching the same target (equal / at most one "
        "more / largest excess):",
        "",
        "| instances | heuristic alone: equal | ≤ +1 | max | exact mode: equal | ≤ +1 | max |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        _row(f"all {len(known)}", known),
        _row(f"target 0.10 reached ({len(reached)})", reached),
        _row(f"target out of reach, same final imbalance ({len(missed)})", missed),
        "",
        f"Exact mode (`balance.exact: auto`, the default when highspy is installed, up to "
        f"`exact_max_vms` = 60 movable VMs) runs the heuristic, then the program from its plan; "
        "its column matches by construction (the reference is the same program) and checks "
        "that the product path keeps the optimum through ordering and hysteresis. "
        f"Of the {len(missed)} instances where the heuristic misses the target, the program "
        f"reaches it within 40 migrations on {len(reachable)}; on the rest no plan does (a VM "
        "too large for every node, pins, exclusions).",
        "",
        f"Plan time per instance, heuristic alone: median {statistics.median(times):.2f} s, "
        f"p90 {np.percentile(times, 90):.2f} s, max {max(times):.2f} s; exact mode: median "
        f"{statistics.median(auto_times):.2f} s, p90 {np.percentile(auto_times, 90):.2f} s, "
        f"max {max(auto_times):.2f} s (the program alone, started from the heuristic's plan: "
        f"median {statistics.median(exact_times):.2f} s).",
        "",
        "Against the greedy re-pack from scratch:",
        "",
        "| | greedy re-pack | engine (heuristic) |",
        "| --- | --- | --- |",
        f"| mean migrations | "
        f"{statistics.mean(int(r['greedy_moves']) for r in done):.1f} "  # type: ignore[arg-type]
        f"| {statistics.mean(int(r['moves']) for r in done):.1f} |",  # type: ignore[arg-type]
        f"| mean final imbalance | "
        f"{statistics.mean(float(r['greedy_imbalance']) for r in done):.3f} "  # type: ignore[arg-type]
        f"| {statistics.mean(float(r['after']) for r in done):.3f} |",  # type: ignore[arg-type]
        "",
        f"- Final imbalance no worse than the re-pack's on {pct(lower, len(done))}; no worse "
        f"than max(re-pack, target) on {pct(no_worse, len(done))}. The re-pack balances one "
        "weighted sum per node, so it leaves single resources (a NIC) hot.",
        f"- Engine migrations / re-pack migrations: median {statistics.median(ratio):.2f}, "
        f"max {max(ratio):.2f}; at most 25% on {pct(sum(x <= 0.25 for x in ratio), len(ratio))}"
        ". The engine stops at the target 0.10 while the re-pack moves almost every VM.",
        f"- Asked for the re-pack's own final imbalance as its target, the engine reaches it on "
        f"{pct(len(level_ok), len(level))}, with a median of "
        f"{statistics.median(level_ratio) if level_ratio else float('nan'):.2f} of the "
        f"re-pack's migrations (at most 25% on "
        f"{pct(sum(x <= 0.25 for x in level_ratio), len(level_ratio))}).",
        "",
        f"Run: `.venv/bin/python bench/bench_engine_quality.py --instances {len(rows)}` on "
        f"{date.today().isoformat()}, {platform.machine()}, 2 cores (shared with other work), "
        f"Python {platform.python_version()}; {seconds / 60:.0f} min in total.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--no-docs", action="store_true", help="print only")
    args = parser.parse_args()
    if not available():
        raise SystemExit("highspy is needed for the exact comparison (pip install highspy)")
    started = time.perf_counter()
    rows = []
    for seed in range(args.instances):
        row = evaluate(seed)
        rows.append(row)
        if row["triggered"]:
            print(
                f"seed {seed:3d}: {row['vms']} VMs/{row['nodes']} nodes "
                f"heuristic {row['moves']} exact {row.get('exact_moves')} "
                f"({row.get('exact_status')}) auto {row.get('auto_moves')} "
                f"greedy {row['greedy_moves']} {row['time']:.2f}s",
                flush=True,
            )
    body = summarise(rows, time.perf_counter() - started)
    print(body)
    if not args.no_docs:
        replace_section("Recommender: plan quality", body)


if __name__ == "__main__":
    main()
