"""The trade-off frontier and joint repairs on seeded clusters, half of them heavy-tailed.

Even seeds: `devkit.instances.heavy_tailed_cluster` (a few whale VMs, skewed placement, an
anti-affinity group whose members already share a node, an affinity group already split);
odd seeds: `random_cluster`. Every plan is the default product path (`plan_moves`, exact mode
auto). Per instance:

* rule violations: the plan replayed migration by migration in its order, every rule checked
  after each and at the end;
* the frontier: for every k, the point against the exact optimum for k (the joint program
  again, with a node limit of `REFERENCE_NODES` instead of the product's, warm-started from
  the point, and where that does not prove it, `REFERENCE_RETRY_NODES`; where even that is
  not proven, against its dual bound, which overstates the gap); on the large clusters,
  against the engine's proven lower bound, and where the point is more than 5 % above it,
  against the better of that and the same joint program's (over every movable VM, warm-
  started from the point, `LARGE_REFERENCE_NODES` nodes or `LARGE_REFERENCE_SECONDS`): its
  optimum where it proves one, else its dual bound;
* migrations against the exact minimum for the imbalance the plan reaches: the joint program
  (repairs and balance together, `recommender.engine.joint`) asked for the fewest migrations
  at or under the plan's final imbalance;
* plan time, p50/p90/max per size: each instance planned again alone, one after the other
  (nothing else of the benchmark running, so a plan's threads have the machine's cores),
  its wall clock (what the operator waits), the CPU time of its process over all threads,
  and the branch-and-bound nodes of its programs (the same on any machine).

    .venv/bin/python bench/bench_engine_frontier.py [--instances 200] [--large 4] [--jobs N]
        [--quick] [--no-docs]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
from docs_section import replace_section, run_line

from devkit.instances import HeavyShape, Shape, heavy_tailed_cluster, random_cluster
from recommender.engine import exact, planner
from recommender.engine.exact import Hint, LinearModel, available
from recommender.engine.forced import frozen_vms
from recommender.engine.joint import joint_model
from recommender.engine.planner import balance_movable, plan_moves
from recommender.engine.problem import State, UnitMove
from recommender.engine.rules import prepare_constraints, violations
from recommender.engine.scorer import Scorer
from recommender.plan import build_plan

SHAPE = Shape(nodes=(3, 6), vms=(10, 30))
HEAVY = HeavyShape(base=Shape(nodes=(3, 6), vms=(10, 30), skew=0.8))
LARGE = HeavyShape(base=Shape(nodes=(20, 40), vms=(500, 2000), skew=0.8))
# Large instances' seeds start here (apart from the small ones').
LARGE_SEED = 10_000
# Branch-and-bound nodes of the reference programs (the product's limits are far lower), and
# of the second try where the first does not prove its point (with its time limit).
REFERENCE_NODES = 5_000
REFERENCE_RETRY_NODES = 50_000
REFERENCE_RETRY_SECONDS = 300.0
# The joint program on a large cluster: its root alone takes tens of seconds there. With 20
# nodes, 6 of the 21 points it was asked about (seeds 10020 and 10026) stayed more than 5 %
# above its bound; with 2,000 it proves the optimum for all 21 within these limits.
LARGE_REFERENCE_NODES = 2_000
LARGE_REFERENCE_SECONDS = 240.0


def instance(seed: int) -> Any:
    if seed >= LARGE_SEED:
        return heavy_tailed_cluster(seed, LARGE)
    return heavy_tailed_cluster(seed, HEAVY) if seed % 2 == 0 else random_cluster(seed, SHAPE)


def timed(seed: int) -> dict[str, Any]:
    """Wall clock, CPU time (every thread of the process) and branch-and-bound nodes of the
    product's plan for one instance."""
    inst = instance(seed)
    started, cpu = time.perf_counter(), time.process_time()
    with _counted_nodes() as counted:
        plan_moves(inst.snapshot, inst.config)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    return {"time": seconds, "cpu": cpu, "nodes": counted.total}


def evaluate(seed: int) -> dict[str, Any]:
    inst = instance(seed)
    snap, cfg = inst.snapshot, inst.config
    with _search_start() as searched:
        result = plan_moves(snap, cfg)
    problem = result.problem
    constraints = prepare_constraints(problem)
    row: dict[str, Any] = {
        "seed": seed,
        "heavy": seed % 2 == 0 or seed >= LARGE_SEED,
        "large": seed >= LARGE_SEED,
        "vms": problem.n_vms,
        "triggered": result.triggered,
        "moves": result.migrations,
        "repairs": sum(m.kind == "repair" for m in result.moves),
        "reached": result.target_reached,
        "violations": _violations(snap, cfg, result, constraints),
    }
    start = State.initial(problem)
    frozen = frozen_vms(constraints, problem.n_vms)
    large = seed >= LARGE_SEED
    model = None if large else _reference_model(problem, constraints, start, frozen)
    frontier = result.frontier
    if frontier is not None and frontier.points:
        if large:
            reference = _LargeReference(problem, constraints, start, frozen, searched.start)
            gaps = [reference.gap(p) for p in frontier.points]
            row.update(asked=reference.asked, asked_optimal=reference.optimal)
        else:
            gaps = [_gap(model, problem, p) for p in frontier.points]
        row.update(
            points=len(frontier.points),
            exact_points=sum(p.exact for p in frontier.points),
            within=sum(g <= (0.05 if large else 0.02) for g, _ in gaps),
            proven=sum(proven for _, proven in gaps),
            max_gap=max(g for g, _ in gaps),
        )
    if result.moves and model is not None:
        with _reference_limit():
            fewest = model.solve(result.overall_after + 1e-9, problem.weights)
        row.update(exact_status=fewest.status, exact_moves=fewest.migrations)
    return row


def _reference_model(problem: Any, constraints: Any, start: State, frozen: Any) -> Any:
    """The joint program over what the planner may move: balancing units and the units a
    rule forces."""
    movable = balance_movable(problem, constraints)
    chosen = movable & (start.unit_node != -1)
    for constraint in constraints:
        for unit in constraint.must_move(start, frozen.vms):
            chosen[unit] = start.unit_node[unit] != -1
    return joint_model(problem, constraints, start, np.flatnonzero(chosen), frozen)


class _search_start:
    """The state the search's frontier starts from (after forced moves), for a `with`
    block: its points' moves are from there."""

    def __enter__(self) -> _search_start:
        self.start: State | None = None
        self.kept = planner.search_frontier

        def spied(ctx: Any, start: Any, *args: Any) -> Any:
            self.start = start.state
            return self.kept(ctx, start, *args)

        planner.search_frontier = spied
        return self

    def __exit__(self, *_: object) -> None:
        planner.search_frontier = self.kept


class _LargeReference:
    """A large cluster's points against the engine's lower bound, and where that leaves
    more than 5 %, against the joint program's dual bound (or optimum) too."""

    def __init__(
        self, problem: Any, constraints: Any, start: State, frozen: Any, searched: State | None
    ) -> None:
        self.problem, self.constraints, self.start, self.frozen = (
            problem,
            constraints,
            start,
            frozen,
        )
        self.searched = searched
        self.model: Any = None
        self.asked = 0  # points measured by the joint program
        self.optimal = 0  # ... and of them, against its proven optimum

    def gap(self, point: Any) -> tuple[float, bool]:
        if point.exact or point.imbalance <= 0:
            return 0.0, True
        engine = (point.imbalance - point.lower_bound) / point.imbalance
        if engine <= 0.05 or self.searched is None:
            return engine, False
        self.asked += 1
        if self.model is None:
            self.model = _reference_model(self.problem, self.constraints, self.start, self.frozen)
        state = self.searched.copy()
        for move in point.moves:
            state.move_unit(self.problem, move.unit, move.target)
        moved = np.flatnonzero(state.unit_node != self.start.unit_node)
        moves = tuple(
            UnitMove(int(u), int(self.start.unit_node[u]), int(state.unit_node[u])) for u in moved
        )
        per = Scorer(self.problem).view(state.node_load, 0.0).per_resource
        with _reference_limit(seconds=LARGE_REFERENCE_SECONDS):
            found = self.model.lowest(
                self.problem.weights,
                point.migrations,
                max_nodes=LARGE_REFERENCE_NODES,
                hint=Hint(moves, per),
            )
        if found.status == "optimal":
            self.optimal += 1
            best = min(found.imbalance, point.imbalance)
            return (point.imbalance - best) / point.imbalance, True
        if found.status != "limit" or not np.isfinite(found.bound):
            return engine, False
        bound = min(max(found.bound, point.lower_bound), point.imbalance)
        return (point.imbalance - bound) / point.imbalance, False


class _counted_nodes:
    """The branch-and-bound nodes of every program the planner runs in a `with` block (a
    machine's speed aside, what its time is made of)."""

    def __enter__(self) -> _counted_nodes:
        self.total = 0
        self.kept = LinearModel._run
        kept = self.kept

        lock = threading.Lock()

        def counted(model: LinearModel, *args: Any, **kwargs: Any) -> Any:
            found = kept(model, *args, **kwargs)
            with lock:  # the frontier's programs run in threads
                self.total += found.nodes
            return found

        LinearModel._run = counted  # type: ignore[method-assign]
        return self

    def __exit__(self, *_: object) -> None:
        LinearModel._run = self.kept  # type: ignore[method-assign]


class _reference_limit:
    """The reference programs' node limit (and with `seconds`, time limit), for the time of a
    `with` block."""

    def __init__(self, seconds: float | None = None) -> None:
        self.seconds = seconds

    def __enter__(self) -> None:
        self.kept = exact.MAX_NODES, exact.TIME_LIMIT
        exact.MAX_NODES = REFERENCE_NODES
        if self.seconds is not None:
            exact.TIME_LIMIT = self.seconds

    def __exit__(self, *_: object) -> None:
        exact.MAX_NODES, exact.TIME_LIMIT = self.kept


def _gap(model: Any, problem: Any, point: Any) -> tuple[float, bool]:
    """(imbalance - optimum) / imbalance of a frontier point, and whether the optimum it is
    measured against is proven (else it is a lower bound, and the gap an upper one)."""
    if point.exact or point.imbalance <= 0:
        return 0.0, True
    if model is None:
        return (point.imbalance - point.lower_bound) / point.imbalance, False
    state = State.initial(problem)
    for move in point.moves:
        state.move_unit(problem, move.unit, move.target)
    per = Scorer(problem).view(state.node_load, 0.0).per_resource
    model.suggest(Hint(point.moves, per))
    found = model.lowest(problem.weights, point.migrations, max_nodes=REFERENCE_NODES)
    if found.status != "optimal":
        with _reference_limit(seconds=REFERENCE_RETRY_SECONDS):
            retry = model.lowest(problem.weights, point.migrations, max_nodes=REFERENCE_RETRY_NODES)
        found = retry if retry.status in ("optimal", "limit") and retry.moves else found
    model.hint = None
    if found.status == "optimal":
        best = min(found.imbalance, point.imbalance)
        return (point.imbalance - best) / point.imbalance, True
    bound = min(max(found.bound, 0.0), point.imbalance) if np.isfinite(found.bound) else 0.0
    return (point.imbalance - bound) / point.imbalance, False


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


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(np.ceil(q * len(ordered))) - 1)]


def _times(label: str, rows: list[dict[str, Any]]) -> str:
    if not rows:
        return f"| {label} | 0 | - | - | - | - | - | - | - | - | - |"
    wall = [r["time"] for r in rows]
    cpu = [r["cpu"] for r in rows]
    nodes = [float(r["nodes"]) for r in rows]
    cells = [statistics.median(cpu), _p(cpu, 0.9), max(cpu)]
    cells += [statistics.median(wall), _p(wall, 0.9), max(wall)]
    counts = [statistics.median(nodes), _p(nodes, 0.9), max(nodes)]
    return (
        f"| {label} | {len(rows)} | "
        + " | ".join(f"{c:.2f} s" for c in cells)
        + " | "
        + " | ".join(f"{c:,.0f}" for c in counts)
        + " |"
    )


def _sizes(rows: list[dict[str, Any]]) -> list[str]:
    small = [r for r in rows if not r["large"]]
    return [
        _times("10-19 VMs", [r for r in small if r["vms"] < 20]),
        _times("20-30 VMs", [r for r in small if r["vms"] >= 20]),
        _times(f"all {len(small)} small", small),
        _times("500-2,000 VMs", [r for r in rows if r["large"]]),
    ]


def summarise(rows: list[dict[str, Any]], seconds: float, load: str) -> str:
    small = [r for r in rows if not r["large"]]
    large = [r for r in rows if r["large"]]
    planned = [r for r in small if r["triggered"] or r["moves"]]
    framed = [r for r in small if "points" in r]
    compared = [r for r in small if r.get("exact_status") == "optimal"]
    points = sum(r["points"] for r in framed)
    big_points = sum(r.get("points", 0) for r in large)
    equal = _pct(sum(r["moves"] <= r["exact_moves"] for r in compared), len(compared))
    one_more = _pct(sum(r["moves"] <= r["exact_moves"] + 1 for r in compared), len(compared))
    worst = max((r["moves"] - r["exact_moves"] for r in compared), default=0)
    lines = [
        f"{len(small)} small instances (seeds 0-{len(small) - 1}; even seeds heavy-tailed with "
        "whales and an anti-affinity group and an affinity group broken at the start, odd seeds "
        f"`random_cluster`; 3-6 nodes, 10-30 VMs, all movable VMs in the exact program); "
        f"{len(planned)} with migrations or a triggered plan. {len(large)} large heavy-tailed "
        "instances (20-40 nodes, 500-2,000 VMs; the search's frontier).",
        "",
        "| measure | result |",
        "| --- | --- |",
        f"| rule violations, any step of any plan | {sum(r['violations'] for r in rows)} |",
        "| small: frontier points within 2% of the exact optimum for their k | "
        f"{_pct(sum(r['within'] for r in framed), points)} |",
        "| small: ... of which measured against a proven optimum | "
        f"{_pct(sum(r['proven'] for r in framed), points)} |",
        "| small: frontier points the product proves optimal itself | "
        f"{_pct(sum(r['exact_points'] for r in framed), points)} |",
        "| small: largest gap of a point to the optimum (or its bound) | "
        f"{max((r['max_gap'] for r in framed), default=0.0):.1%} |",
        "| large: frontier points within 5% of a proven lower bound (the engine's; where "
        "that leaves more, the joint program's optimum, or its bound at its node or time "
        "limit) | "
        f"{_pct(sum(r.get('within', 0) for r in large), big_points)} |",
        "| large: ... points more than 5% above the engine's bound, measured by the joint "
        "program, and of them against its proven optimum | "
        f"{sum(r.get('asked', 0) for r in large)}, "
        f"{sum(r.get('asked_optimal', 0) for r in large)} |",
        "| large: largest gap of a point to its bound | "
        f"{max((r.get('max_gap', 0.0) for r in large), default=0.0):.1%} |",
        f"| migrations equal to the exact minimum for the imbalance reached | {equal} |",
        f"| at most one more | {one_more} (worst: {worst} more) |",
        "| target reached (triggered small plans) | "
        f"{_pct(sum(r['reached'] for r in planned), len(planned))} |",
        "",
        "Plan time (the default path: search, exact program, joint repairs, frontier; each "
        "instance planned alone, one after the other), CPU time of the planning process (all "
        "its threads: the frontier solves two points at once) and wall clock, and the "
        "branch-and-bound nodes of the plan's exact programs (HiGHS's count, the same on any "
        "machine; the large clusters' bound programs are not counted):",
        "",
        "| size | instances | CPU p50 | CPU p90 | CPU max | wall p50 | wall p90 | wall max | "
        "nodes p50 | nodes p90 | nodes max |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *_sizes(rows),
        "",
        run_line(
            f".venv/bin/python bench/bench_engine_frontier.py --instances {len(small)} "
            f"--large {len(large)}",
            load,
            seconds,
        ),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=200, help="small instances")
    parser.add_argument("--large", type=int, default=4, help="500-2,000-VM instances")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--quick", action="store_true", help="20 small, 1 large, print only")
    parser.add_argument("--no-docs", action="store_true", help="print only")
    args = parser.parse_args()
    if args.instances < 0 or args.large < 0:
        raise SystemExit("--instances and --large must not be negative")
    if not available():
        raise SystemExit("highspy is needed for the exact comparison (pip install highspy)")
    if args.quick:
        args.instances, args.large, args.no_docs = 20, 1, True
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    started = time.perf_counter()
    seeds = [*range(LARGE_SEED, LARGE_SEED + args.large), *range(args.instances)]
    rows = []
    with multiprocessing.Pool(max(args.jobs, 1)) as pool:
        for row in pool.imap_unordered(evaluate, seeds):
            rows.append(row)
            print(
                f"seed {row['seed']:5d}: {row['vms']} VMs moves {row['moves']} "
                f"(repairs {row['repairs']}) exact {row.get('exact_moves')} "
                f"points {row.get('within')}/{row.get('points')}",
                file=sys.stderr,
                flush=True,
            )
    rows.sort(key=lambda r: r["seed"])
    for row in rows:
        row.update(timed(row["seed"]))
        print(
            f"seed {row['seed']:5d} alone: {row['cpu']:.2f}s cpu {row['time']:.2f}s wall",
            file=sys.stderr,
            flush=True,
        )
    body = summarise(rows, time.perf_counter() - started, load)
    print(body)
    if not args.no_docs:
        replace_section("Recommender: frontier and joint repairs", body)


if __name__ == "__main__":
    main()
