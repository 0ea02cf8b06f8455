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

Instances are independent and solved in parallel (`--jobs`, default one per core); plan times
are per instance, each on its own core.

    .venv/bin/python bench/bench_engine_quality.py [--instances 200] [--jobs N] [--no-docs]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
from baseline import greedy_repack
from docs_section import replace_section

from devkit.instances import Shape, random_cluster
from recommender.config import Config
from recommender.engine.build import build_problem
from recommender.engine.exact import ExactResult, Hint, available, solve_exact
from recommender.engine.ordering import Request, order_moves
from recommender.engine.planner import balance_movable, plan_moves
from recommender.engine.problem import Problem, State, UnitMove
from recommender.engine.result import EngineResult
from recommender.engine.rules import prepare_constraints
from recommender.engine.rules.base import Constraint
from recommender.engine.scorer import Scorer
from recommender.model import Snapshot

COMPARE = {"min_gain": 0.0, "min_gain_per_gib": 0.0, "max_migrations": 40}


def plan_hint(problem: Problem, start: State, moves: tuple[UnitMove, ...]) -> Hint:
    """A plan as the exact program takes it for a start: its moves and its end state's
    per-resource imbalance."""
    end = start.copy()
    for move in moves:
        end.move_unit(problem, move.unit, move.target)
    view = Scorer(problem).view(end.node_load, problem.balance.target)
    return Hint(moves, view.per_resource)


@dataclass(frozen=True)
class ExactProgram:
    """The exact program for one instance: its start and the units it may move."""

    problem: Problem
    constraints: tuple[Constraint, ...]
    start: State
    units: np.ndarray

    @classmethod
    def of(cls, problem: Problem) -> ExactProgram:
        constraints = prepare_constraints(problem)
        start = State.initial(problem)
        movable = balance_movable(problem, constraints) & (start.unit_node >= 0)
        units = np.flatnonzero(movable)
        units = units[problem.active[start.unit_node[units]]]
        return cls(problem, constraints, start, units)

    def hint(self, moves: tuple[UnitMove, ...]) -> Hint:
        return plan_hint(self.problem, self.start, moves)

    def solve(self, target: float, hint: Hint) -> ExactResult:
        return solve_exact(
            self.problem, self.constraints, self.start, self.units, target, hint=hint
        )

    def orderable(self, result: ExactResult) -> bool:
        """Whether the program's plan has an order in which every step is feasible."""
        requests = [Request(self.problem.units.members(m.unit), m.target) for m in result.moves]
        return not order_moves(self.problem, self.constraints, self.start, requests).stuck


def evaluate(seed: int) -> dict[str, object]:
    inst = random_cluster(seed, Shape(balance=COMPARE))
    snapshot, config = inst.snapshot, inst.config
    problem = build_problem(snapshot, config)
    row: dict[str, object] = {"seed": seed, "vms": problem.n_vms, "nodes": problem.n_nodes}
    _, row["greedy_moves"], row["greedy_imbalance"] = greedy_repack(problem)
    heuristic = _run_heuristic(row, snapshot, config)
    if not heuristic.triggered:
        return row
    program = ExactProgram.of(problem)
    _run_exact(row, program, heuristic, config.balance.target)
    _run_auto(row, snapshot, config)
    # The engine asked for the balance the re-pack reaches: the product path (exact mode on
    # these sizes) and the heuristic alone, and the exact minimum that reaches it.
    level = num(row, "greedy_imbalance")
    if level < heuristic.overall_before:
        _run_at_level(row, program, snapshot, config, level)
    return row


def _run_heuristic(row: dict[str, object], snapshot: Snapshot, config: Config) -> EngineResult:
    started = time.perf_counter()
    heuristic = plan_moves(snapshot, config, exact=False)
    row["time"] = time.perf_counter() - started
    row["triggered"] = heuristic.triggered
    row["before"] = heuristic.overall_before
    row["moves"] = heuristic.migrations
    row["memory"] = heuristic.memory_bytes
    row["after"] = heuristic.overall_after
    row["reached"] = heuristic.target_reached
    return heuristic


def _run_exact(
    row: dict[str, object], program: ExactProgram, heuristic: EngineResult, target: float
) -> None:
    """The exact minimum for the imbalance the heuristic reached, and for the target."""
    hint = program.hint(heuristic.unit_moves)
    same = target if heuristic.target_reached else heuristic.overall_after + 1e-9
    started = time.perf_counter()
    exact = program.solve(same, hint)
    row["exact_time"] = time.perf_counter() - started
    row["exact_status"] = exact.status
    row["exact_moves"] = exact.migrations if exact.reached else None
    # What the program makes of the target itself: the fewest migrations reaching it, else
    # the lowest imbalance within the budget with the fewest migrations.
    best = exact if heuristic.target_reached else program.solve(target, hint)
    row["best_status"] = best.status
    row["best_reached"] = best.reached
    row["best_moves"] = best.migrations
    row["best_imbalance"] = best.imbalance
    # The product keeps only plans with an order in which every step is feasible.
    row["best_orderable"] = program.orderable(best)


def _run_auto(row: dict[str, object], snapshot: Snapshot, config: Config) -> None:
    started = time.perf_counter()
    auto = plan_moves(snapshot, config, exact=True)
    row["auto_time"] = time.perf_counter() - started
    row["auto_moves"] = auto.migrations
    row["auto_reached"] = auto.target_reached
    row["auto_after"] = auto.overall_after


def _run_at_level(
    row: dict[str, object],
    program: ExactProgram,
    snapshot: Snapshot,
    config: Config,
    level: float,
) -> None:
    balance = config.balance.model_copy(update={"target": level, "trigger": level})
    level_config = config.model_copy(update={"balance": balance})
    level_heuristic = plan_moves(snapshot, level_config, exact=False)
    row["level_moves"] = level_heuristic.migrations
    row["level_after"] = level_heuristic.overall_after
    level_auto = plan_moves(snapshot, level_config, exact=True)
    row["level_auto_moves"] = level_auto.migrations
    row["level_auto_after"] = level_auto.overall_after
    floor = program.solve(level + 1e-9, program.hint(level_heuristic.unit_moves))
    row["level_exact"] = floor.migrations if floor.reached else None
    row["level_exact_status"] = floor.status


def pct(part: int, whole: int) -> str:
    return f"{part}/{whole} ({100.0 * part / whole:.1f}%)" if whole else "0/0"


def _gap_cells(gaps: list[float], whole: int) -> str:
    return (
        f"{pct(sum(g <= 0 for g in gaps), whole)} | {pct(sum(g < 0 for g in gaps), whole)} "
        f"| {pct(sum(g <= 1 for g in gaps), whole)} "
        f"| {max(gaps, default=0):.0f}"
    )


def _row(label: str, rows: list[dict[str, object]]) -> str:
    """The heuristic against the fewest migrations reaching the imbalance it reached."""
    gaps = [num(r, "moves") - num(r, "exact_moves") for r in rows]
    return f"| {label} | {_gap_cells(gaps, len(rows))} |"


def _same_outcome(row: dict[str, object]) -> bool:
    """Exact mode ends where the program does: under the target when the program reaches
    it, else at the program's lowest imbalance."""
    if row["best_reached"]:
        return bool(row["auto_reached"])
    return num(row, "auto_after") <= num(row, "best_imbalance") + 1e-6


def _auto_row(label: str, rows: list[dict[str, object]]) -> str:
    same = [r for r in rows if _same_outcome(r)]
    gaps = [num(r, "auto_moves") - num(r, "best_moves") for r in same]
    return f"| {label} | {pct(len(same), len(rows))} | {_gap_cells(gaps, len(rows))} |"


def num(row: dict[str, object], key: str) -> float:
    return float(row[key])  # type: ignore[arg-type]


def _level_cells(rows: list[dict[str, object]], key: str) -> str:
    """Reached / within 25% / median and pooled share of the re-pack's migrations."""
    reached = [r for r in rows if num(r, f"{key}_after") <= num(r, "greedy_imbalance") + 1e-9]
    shares = [num(r, f"{key}_moves") / num(r, "greedy_moves") for r in reached]
    quarter = sum(x <= 0.25 for x in shares)
    pooled = sum(num(r, f"{key}_moves") for r in reached) / max(
        sum(num(r, "greedy_moves") for r in reached), 1
    )
    median = statistics.median(shares) if shares else float("nan")
    return (
        f"{pct(len(reached), len(rows))} | {pct(quarter, len(rows))} | {median:.2f} | {pooled:.2f}"
    )


def summarise(rows: list[dict[str, object]], seconds: float) -> str:
    done = [r for r in rows if r["triggered"]]
    known = [r for r in done if r.get("exact_moves") is not None]
    optimal = sum(1 for r in known if r["exact_status"] == "optimal")
    reached = [r for r in known if r["reached"]]
    missed = [r for r in known if not r["reached"]]
    unordered = [r for r in done if not r["best_orderable"]]
    ordered = [r for r in done if r["best_orderable"]]
    reachable = [r for r in ordered if r["best_reached"]]
    beyond = [r for r in ordered if not r["best_reached"] and r["best_status"] == "optimal"]
    unknown = len(ordered) - len(reachable) - len(beyond)
    rescued = sum(1 for r in reachable if not r["reached"] and r["auto_reached"])
    below = sum(1 for r in known if num(r, "moves") < num(r, "exact_moves"))
    greedy = [r for r in done if num(r, "greedy_moves") > 0]
    ratio = [num(r, "moves") / num(r, "greedy_moves") for r in greedy]
    auto_ratio = [num(r, "auto_moves") / num(r, "greedy_moves") for r in greedy]
    lower = sum(1 for r in done if num(r, "auto_after") <= num(r, "greedy_imbalance") + 1e-9)
    level = [r for r in greedy if "level_moves" in r]
    floor = [r for r in level if r.get("level_exact") is not None]
    floor_quarter = sum(1 for r in floor if num(r, "level_exact") <= 0.25 * num(r, "greedy_moves"))
    floor_proved = sum(1 for r in floor if r["level_exact_status"] == "optimal")
    level_gap = [num(r, "level_auto_moves") - num(r, "level_exact") for r in floor]
    level_equal, level_near = sum(g == 0 for g in level_gap), sum(g <= 1 for g in level_gap)
    times = [num(r, "time") for r in done]
    exact_times = [num(r, "exact_time") for r in done]
    auto_times = [num(r, "auto_time") for r in done]

    def mean(key: str, rows: list[dict[str, object]] = done) -> float:
        return statistics.mean(num(r, key) for r in rows)

    lines = [
        f"{len(rows)} instances (seeds 0-{len(rows) - 1}); planning triggered on {len(done)} "
        "(on the others the imbalance is under the trigger and the engine plans nothing, by "
        f"design). The exact program proved its optimum on {optimal} of the {len(known)}; on "
        "the others it stopped at its node limit and its best plan stands in for the minimum.",
        "",
        "The heuristic alone against the exact minimum number of migrations reaching the "
        "imbalance the heuristic reached (the target 0.10 where it reached it; equal or fewer, "
        "of them fewer (where the program stops at its node limit above the minimum) / at most "
        "one more / largest excess):",
        "",
        "| instances | equal or fewer | ... fewer | ≤ +1 | max |",
        "| --- | --- | --- | --- | --- |",
        _row(f"all {len(known)}", known),
        _row(f"target 0.10 reached ({len(reached)})", reached),
        _row(f"target missed, same final imbalance ({len(missed)})", missed),
        "",
        "Exact mode (`balance.exact: auto`, the default when highspy is installed, up to "
        "`exact_max_vms` = 60 movable VMs, so on every instance here) runs the heuristic, then "
        "asks the program for the target itself, from the heuristic's plan. Its reference is "
        "the program's answer to the same question: the fewest migrations reaching 0.10, or, "
        "where no plan within the 40-migration budget reaches it, the lowest imbalance with "
        'the fewest migrations. "Same outcome" counts instances where exact mode ends under '
        "the target when the program reaches it, else at the program's lowest imbalance; the "
        "migration columns count those instances.",
        "",
        "| instances | same outcome | equal or fewer | ... fewer | ≤ +1 | max |",
        "| --- | --- | --- | --- | --- | --- |",
        _auto_row(f"all {len(reachable) + len(beyond)}", reachable + beyond),
        _auto_row(f"target reachable ({len(reachable)})", reachable),
        _auto_row(f"target out of reach, lowest imbalance ({len(beyond)})", beyond),
        "",
        f"On {rescued} instances the heuristic misses a target the program reaches, and exact "
        f"mode reaches it. On {len(unordered)} the program's plan has no order in which every "
        "intermediate state keeps the rules (it swaps VMs between full nodes), which the "
        "product requires, so exact mode falls back to a plan it can order; on "
        f"{unknown} more the program hit its node limit before proving whether the target can "
        "be reached. Both are left out of this table. The column checks that "
        "the product path keeps the program's optimum through ordering and hysteresis; it "
        "shares the program with its reference, so the independent check of the program is "
        "the heuristic: a plan it finds with fewer migrations than the program's minimum "
        f"would expose a program that is too strict. That happened on {below} instances.",
        "",
        f"Plan time per instance, heuristic alone: median {statistics.median(times):.2f} s, "
        f"p90 {np.percentile(times, 90):.2f} s, max {max(times):.2f} s; exact mode: median "
        f"{statistics.median(auto_times):.2f} s, p90 {np.percentile(auto_times, 90):.2f} s, "
        f"max {max(auto_times):.2f} s (the program alone, started from the heuristic's plan: "
        f"median {statistics.median(exact_times):.2f} s).",
        "",
        "Against the greedy re-pack from scratch (`bench/baseline.py`), at the engine's own "
        "target 0.10:",
        "",
        "| | greedy re-pack | engine, exact mode | engine, heuristic alone |",
        "| --- | --- | --- | --- |",
        f"| mean migrations | {mean('greedy_moves'):.1f} | {mean('auto_moves'):.1f} "
        f"| {mean('moves'):.1f} |",
        f"| mean final imbalance | {mean('greedy_imbalance'):.3f} | {mean('auto_after'):.3f} "
        f"| {mean('after'):.3f} |",
        "",
        f"- Final imbalance no worse than the re-pack's on {pct(lower, len(done))} (exact "
        "mode). The re-pack balances one weighted sum per node, so it leaves single resources "
        "(a NIC) hot.",
        f"- Migrations / the re-pack's: median {statistics.median(auto_ratio):.2f} in exact "
        f"mode, {statistics.median(ratio):.2f} for the heuristic alone. At 0.10 the engine "
        "balances much further than the re-pack does, so this is not the like-for-like count.",
        "",
        "Like for like: the engine asked for the re-pack's own final imbalance as its target "
        f"(trigger and target both set to it), on the {len(level)} instances where that is "
        'below the starting imbalance. "Within 25%" counts instances that reach the re-pack\'s '
        "imbalance with at most a quarter of its migrations; the pooled share is the total of "
        "the engine's migrations over the total of the re-pack's.",
        "",
        "| | reaches the re-pack's imbalance | within 25% of its migrations "
        "| median share | pooled share |",
        "| --- | --- | --- | --- | --- |",
        f"| engine, exact mode (the default) | {_level_cells(level, 'level_auto')} |",
        f"| engine, heuristic alone | {_level_cells(level, 'level')} |",
        "",
        f"- The exact minimum that reaches the re-pack's imbalance (proved optimal on "
        f"{floor_proved} of {len(floor)}) is within 25% of the re-pack's migrations on "
        f"{pct(floor_quarter, len(floor))}: on the other instances no plan at all meets the "
        "25% mark, because the re-pack's imbalance takes more moves than that to reach.",
        f"- Exact mode against that minimum: equal on {pct(level_equal, len(level_gap))}, "
        f"at most one more on {pct(level_near, len(level_gap))}.",
        "",
        f"Run: `.venv/bin/python bench/bench_engine_quality.py --instances {len(rows)}` on "
        f"{date.today().isoformat()}, {platform.machine()}, 2 cores (shared with other work), "
        f"Python {platform.python_version()}; {seconds / 60:.0f} min in total.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument(
        "--jobs", type=int, default=os.cpu_count() or 1, help="instances solved at once"
    )
    parser.add_argument("--no-docs", action="store_true", help="print only")
    args = parser.parse_args()
    if not available():
        raise SystemExit("highspy is needed for the exact comparison (pip install highspy)")
    started = time.perf_counter()
    rows = []
    with multiprocessing.Pool(max(args.jobs, 1)) as pool:
        for row in pool.imap(evaluate, range(args.instances)):
            rows.append(row)
            if row["triggered"]:
                print(
                    f"seed {row['seed']:3d}: {row['vms']} VMs/{row['nodes']} nodes "
                    f"heuristic {row['moves']} exact {row.get('exact_moves')} "
                    f"({row.get('exact_status')}) auto {row.get('auto_moves')} "
                    f"greedy {row['greedy_moves']} level {row.get('level_auto_moves')}"
                    f"/{row.get('level_exact')} {row['time']:.2f}s",
                    flush=True,
                )
    body = summarise(rows, time.perf_counter() - started)
    print(body)
    if not args.no_docs:
        replace_section("Recommender: plan quality", body)


if __name__ == "__main__":
    main()
