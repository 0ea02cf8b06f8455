"""ProxLB side by side: the open-source Proxmox balancer's own code and vmbalance's plan on
the same heavy-tailed clusters, judged by one judge.

Clusters: `devkit.instances.heavy_tailed_cluster` (3-8 nodes of uneven size, 10-40 VMs, a few
whale VMs, an anti-affinity group whose members already share a node, an affinity group
already split, random pins and exclusions), seeds 0 to N-1.

ProxLB (`requirements/proxlb.txt`, in a scratch venv) reads each cluster over HTTPS from the
loopback fake of the Proxmox VE API (`devkit.fake_pve`), the rules as its tags
(`devkit.proxlb_peer`), and runs once in its dry-run JSON mode with its defaults (memory,
used, balanciness 10) and its optional CP-SAT solver in shadow mode (default 30 s limit): the
greedy plan is the JSON it prints, the solver's plan the run log it writes. vmbalance plans
through its engine API (`recommender.plan.build_plan`: the search, the exact program, joint
repairs, the frontier) with the cluster's config, and three times more with the weights set to
memory alone (ProxLB's default resource; vmbalance's `memory_mode: assigned`, the VMs'
assigned memory over the node's, the measure ProxLB's solver balances):

* "memory only": the cluster's config otherwise (trigger 0.20, target 0.10, the default
  hysteresis);
* "memory, aggressive": asked what ProxLB's balanciness 10 asks its solver (the most
  aggressive profile: no gap threshold, 100 to 1 balance over stickiness): trigger 0 and
  target 0 (plan whatever the imbalance, and stop at none), `min_gain` 0 and
  `min_gain_per_gib` at ProxLB's own price of a copied GiB (`PROXLB_GAIN_PER_GIB`), no
  migration cap (`max_migrations` the number of VMs);
* "memory, 1 point a move": the same, but a migration must lower the imbalance by a point
  (`min_gain` 0.01, nothing per GiB): the operator's trade-off of balance for migrations.

The judge, the same for every plan, on the placement after it: vmbalance's rule checks
(pins, exclusions, affinity, anti-affinity, maintenance, the memory fit with its reserve, the
CPU headroom; the migration budget is vmbalance's own setting and not judged), the affinity
and anti-affinity groups still broken at the end (whether or not the plan broke them), the
max utilisation of each resource over the nodes (memory both as assigned, what vmbalance and
ProxLB's solver weigh, and as used, what ProxLB's greedy weighs), and vmbalance's overall
imbalance with its default weights.

    .venv/bin/python bench/bench_proxlb.py [--clusters 40] [--jobs N] [--no-docs]
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from datetime import date
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from docs_section import replace_section

from devkit.fake_pve import self_signed_tls
from devkit.instances import HeavyShape, Instance, Shape, heavy_tailed_cluster
from devkit.proxlb_peer import installed_python, proxlb_version, run_proxlb
from recommender.config import BalanceSettings, Config
from recommender.engine.build import build_problem
from recommender.engine.problem import SPLIT, Problem, State
from recommender.engine.rules import prepare_constraints, violations
from recommender.engine.rules.max_migrations import MaxMigrations
from recommender.plan import Plan, build_plan

SMALL = HeavyShape(base=Shape(nodes=(3, 3), vms=(10, 12), skew=0.8))
# ProxLB's most aggressive solver profile weighs its load gap (in units of 1/10,000 of a
# node's utilisation) 100 times and the memory a plan copies (in 256 MiB units) once, so a
# copied GiB (4 units) is worth a gap of 4 / (100 x 10,000) of utilisation.
PROXLB_GAIN_PER_GIB = 4 / (100 * 10_000)
AGGRESSIVE: dict[str, float] = {
    "trigger": 0.0,
    "target": 0.0,
    "min_gain": 0.0,
    "min_gain_per_gib": PROXLB_GAIN_PER_GIB,
}
ONE_POINT: dict[str, float] = {**AGGRESSIVE, "min_gain": 0.01, "min_gain_per_gib": 0.0}
# The memory-only plans: name -> balance settings over the cluster's own.
MEMORY_PLANS: dict[str, dict[str, float]] = {
    "vmbalance memory only": {},
    "vmbalance memory, aggressive": AGGRESSIVE,
    "vmbalance memory, 1 point a move": ONE_POINT,
}
PLANNERS = ("proxlb greedy", "proxlb solver", "vmbalance", *MEMORY_PLANS)
# The memory-only plan whose frontier bounds what any rule-keeping plan can reach.
FLOOR_PLAN = "vmbalance memory, aggressive"
# Max utilisation columns: (label, VM column, node column).
UTILISATION = (
    ("cpu", "cpu", "cpu"),
    ("memory assigned", "memory_max_bytes", "memory"),
    ("memory used", "memory", "memory"),
    ("disk bytes", "disk_bytes", "disk_bytes"),
    ("disk ops", "disk_ops", "disk_ops"),
    ("network", "network", "network"),
)


def instance(seed: int, small: bool) -> Instance:
    return heavy_tailed_cluster(seed, SMALL if small else None)


def memory_only(config: Config, overrides: dict[str, float], vms: int) -> Config:
    """`config` with the weights set to memory alone (assigned memory) and `overrides` on
    its balance settings; an override's zero trigger also lifts the migration cap (to `vms`,
    every VM once: ProxLB's solver has none)."""
    settings: dict[str, Any] = {
        **config.balance.model_dump(),
        "weights": {"memory": 1.0},
        "memory_mode": "assigned",
        **overrides,
    }
    if overrides:
        settings["max_migrations"] = max(vms, config.balance.max_migrations)
    return Config(balance=BalanceSettings(**settings), rules=config.rules)


def vmbalance_plan(inst: Instance, config: Config) -> tuple[Plan, float]:
    started = time.perf_counter()
    plan = build_plan(inst.snapshot, config)
    return plan, time.perf_counter() - started


def moves_of(plan: Plan) -> list[tuple[str, str]]:
    return [(m.vm, m.target) for m in plan.migrations]


def memory_floors(
    plan: Plan, judged: dict[str, Any], before: dict[str, Any]
) -> list[tuple[int, float]] | None:
    """(k, least max assigned-memory utilisation any plan of at most k migrations that ends
    with every vmbalance rule kept can reach) from a memory-only plan's frontier: memory
    alone, the overall imbalance is the max utilisation less the cluster mean, which no
    migration between active nodes changes, so the mean is the plan's max less its
    imbalance, and each point's proven lower bound plus the mean bounds the max. `judged`
    and `before` are the judge's verdicts on the plan and on the start: no migration is an
    option only where the start keeps every rule. The last entry is one migration past the
    frontier, at the mean (no plan gets below it). None where the plan has no frontier (it
    did not plan)."""
    if plan.frontier is None or not plan.frontier.points:
        return None
    mean = judged["utilisation"]["memory assigned"] - plan.overall_after
    floors = [(p.migrations, p.lower_bound + mean) for p in plan.frontier.points]
    if not before["violations"] and not before["still_broken"]:
        floors.insert(0, (0, before["utilisation"]["memory assigned"]))
    floors.append((floors[-1][0] + 1, mean))
    return floors


def fewest_for_mean(floors: list[list[tuple[int, float]]], level: float) -> int | None:
    """The fewest migrations in all over the clusters for which the mean of the clusters'
    floors can be at most `level` (each cluster takes one of its (k, floor) options): a
    lower bound of the migrations any set of rule-keeping plans needs for a mean max
    utilisation of `level`. Dynamic programming over the total; None where no choice does."""
    best = {0: 0.0}  # total migrations -> least sum of floors
    for options in floors:
        step: dict[int, float] = {}
        for total, sum_floor in best.items():
            for k, floor in options:
                key = total + k
                step[key] = min(step.get(key, math.inf), sum_floor + floor)
        best = step
    room = level * len(floors) + 1e-9
    return min((total for total, value in best.items() if value <= room), default=None)


def judge(inst: Instance, problem: Problem, moves: list[tuple[str, str]]) -> dict[str, Any]:
    """What a plan's final placement is worth, the same measure for every planner."""
    state = State.initial(problem)
    vm_pos, node_pos = problem.vm_index(), problem.node_index()
    for vm, target in moves:
        state.move_vm(problem, vm_pos[vm], node_pos[target])
    constraints = [c for c in prepare_constraints(problem) if not isinstance(c, MaxMigrations)]
    broken = Counter(v.rule for v in violations(constraints, state, final=True))
    named = list(problem.units.names)
    split = int((state.unit_node[named] == SPLIT).sum()) if named else 0
    crowded = int((state.set_count >= 2).any(axis=1).sum()) if len(problem.counted) else 0
    final = dict(zip(problem.vms, (problem.nodes[n] for n in state.vm_node), strict=True))
    return {
        "migrations": len(moves),
        "violations": dict(broken),
        "still_broken": split + crowded,
        "utilisation": _utilisation(inst, final),
        "imbalance": problem.imbalance(state.node_load).overall,
    }


def _utilisation(inst: Instance, final: dict[str, str]) -> dict[str, float]:
    vms, nodes = inst.snapshot.vms, inst.snapshot.nodes
    where = vms.index.map(final)
    up = nodes.index[~nodes["maintenance"].to_numpy(bool)]
    out = {}
    for label, vm_column, node_column in UTILISATION:
        load = vms[vm_column].fillna(0.0).groupby(where).sum().reindex(up, fill_value=0.0)
        out[label] = float((load / nodes.loc[up, node_column]).max())
    return out


def evaluate(job: tuple[int, bool, str]) -> dict[str, Any]:
    seed, small, python = job
    inst = instance(seed, small)
    problem = build_problem(inst.snapshot, inst.config)
    with tempfile.TemporaryDirectory(prefix="bench-proxlb-") as tmp:
        work = Path(tmp)
        run = run_proxlb(Path(python), inst, work / "run", self_signed_tls(work))
    default_plan, default_seconds = vmbalance_plan(inst, inst.config)
    plans = {
        "proxlb greedy": list(run.greedy.moves),
        "proxlb solver": list(run.solver.moves),
        "vmbalance": moves_of(default_plan),
    }
    memory_seconds, memory_plans = {}, {}
    for name, overrides in MEMORY_PLANS.items():
        config = memory_only(inst.config, overrides, len(inst.snapshot.vms))
        memory_plans[name], memory_seconds[name] = vmbalance_plan(inst, config)
        plans[name] = moves_of(memory_plans[name])
    judged = {name: judge(inst, problem, moves) for name, moves in plans.items()}
    before = judge(inst, problem, [])
    return {
        "seed": seed,
        "nodes": len(inst.snapshot.nodes),
        "vms": len(inst.snapshot.vms),
        "before": before,
        **judged,
        "memory_floors": memory_floors(memory_plans[FLOOR_PLAN], judged[FLOOR_PLAN], before),
        "solver_status": run.solver.status,
        "solver_seconds": run.solver.seconds,
        "proxlb_seconds": run.seconds,
        "proxlb_requests": run.requests,
        "vmbalance_seconds": default_seconds,
        "vmbalance_memory_seconds": memory_seconds,
    }


def _mean(rows: list[dict[str, Any]], name: str, key: str) -> float:
    return statistics.fmean(r[name]["utilisation"][key] for r in rows)


def _row(rows: list[dict[str, Any]], name: str) -> str:
    migrations = [r[name]["migrations"] for r in rows]
    broken = sum(sum(r[name]["violations"].values()) for r in rows)
    still = sum(r[name]["still_broken"] for r in rows)
    utils = " | ".join(f"{_mean(rows, name, label):.3f}" for label, _, _ in UTILISATION)
    imbalance = statistics.fmean(r[name]["imbalance"] for r in rows)
    plan = (
        "- | - | -"
        if name == "before"
        else f"{sum(migrations)} | {statistics.median(migrations):g} | {broken}"
    )
    return f"| {name} | {plan} | {still} | {utils} | {imbalance:.3f} |"


def _violation_kinds(rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    for name in ("before", *PLANNERS):
        kinds: Counter[str] = Counter()
        for r in rows:
            kinds.update(r[name]["violations"])
        text = ", ".join(f"{kind} {count}" for kind, count in sorted(kinds.items())) or "none"
        lines.append(f"| {name} | {text} |")
    return lines


def _target(rows: list[dict[str, Any]]) -> list[str]:
    """Each memory-only plan against ProxLB's solver: judged on assigned memory (what both
    balance), used memory beside it."""
    moves_s = sum(r["proxlb solver"]["migrations"] for r in rows)
    assigned_s = _mean(rows, "proxlb solver", "memory assigned")
    used_s = _mean(rows, "proxlb solver", "memory used")
    lines = [f"| proxlb solver | {moves_s} | {assigned_s:.3f} | {used_s:.3f} | - |"]
    for name in MEMORY_PLANS:
        moves = sum(r[name]["migrations"] for r in rows)
        assigned = _mean(rows, name, "memory assigned")
        met = assigned <= assigned_s and 2 * moves <= moves_s
        lines.append(
            f"| {name} | {moves} | {assigned:.3f} | {_mean(rows, name, 'memory used'):.3f} | "
            f"{'met' if met else 'not met'} |"
        )
    return lines


def _floor_line(rows: list[dict[str, Any]]) -> str:
    """What the memory half of the target needs at the least, by the frontiers' bounds."""
    moves_s = sum(r["proxlb solver"]["migrations"] for r in rows)
    floors = [r.get("memory_floors") for r in rows]
    if not floors or any(f is None for f in floors):
        return "The frontiers' bound: not measured (a memory-only plan without a frontier)."
    need = fewest_for_mean(floors, _mean(rows, "proxlb solver", "memory assigned"))
    verdict = (
        "no choice of plans reaches it"
        if need is None
        else f"at least {need} migrations in all"
        + (", more than" if 2 * need > moves_s else ", within")
        + f" the {moves_s // 2} allowed (half the solver's {moves_s})"
    )
    return (
        "The least any plans ending with every vmbalance rule kept need for the solver's "
        "mean max assigned-memory utilisation, by the proven lower bounds of the frontiers "
        f"of the {FLOOR_PLAN!r} plans (each cluster at its cheapest point, the mean "
        f"taken over the clusters): {verdict}."
    )


def _seconds(values: list[float]) -> str:
    return f"median {statistics.median(values):.1f} s, max {max(values):.1f} s"


def summarise(rows: list[dict[str, Any]], seconds: float, version: str, small: bool) -> str:
    header = " | ".join(label for label, _, _ in UTILISATION)
    statuses = Counter(r["solver_status"] for r in rows)
    sizes = f"{min(r['vms'] for r in rows)}-{max(r['vms'] for r in rows)} VMs on " + (
        f"{min(r['nodes'] for r in rows)}-{max(r['nodes'] for r in rows)} nodes"
    )
    flags = f" --clusters {len(rows)}" + (" --small" if small else "")
    lines = [
        f"{len(rows)} heavy-tailed clusters (`heavy_tailed_cluster`, seeds 0-{len(rows) - 1}; "
        f"{sizes}), {version} in its dry-run JSON mode against the loopback fake of the "
        "Proxmox VE API; vmbalance through `build_plan`. Migrations are totals over the "
        "clusters; utilisations and imbalance are means over the clusters of each cluster's "
        "max node utilisation (and of vmbalance's overall imbalance, default weights).",
        "",
        f"| plan | migrations | median per cluster | rules broken by the plan | groups still "
        f"broken after | max util: {header} | imbalance |",
        "| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in UTILISATION) + " | --- |",
        *(_row(rows, name) for name in ("before", *PLANNERS)),
        "",
        "Rules broken by the plan, by rule (vmbalance's checks on the final placement; "
        "affinity counts groups the plan split, anti-affinity nodes where the plan added "
        "members; the groups broken at the start and left so are the column above):",
        "",
        "| plan | broken rules |",
        "| --- | --- |",
        *_violation_kinds(rows),
        "",
        "Memory alone (vmbalance's weights `{memory: 1}`) against ProxLB's solver: mean max "
        "assigned-memory utilisation (what both balance) no higher, with at most half the "
        'migrations; used memory beside it. "aggressive": trigger 0, target 0, min_gain 0, '
        f"min_gain_per_gib {PROXLB_GAIN_PER_GIB:g} (ProxLB's price of a copied GiB), no "
        'migration cap; "1 point a move": the same with min_gain 0.01, min_gain_per_gib 0:',
        "",
        "| plan | migrations | max util: memory assigned | memory used | target |",
        "| --- | --- | --- | --- | --- |",
        *_target(rows),
        "",
        _floor_line(rows),
        "",
        "ProxLB solver status: "
        + ", ".join(f"{status} {count}" for status, count in sorted(statuses.items()))
        + f"; solver time {_seconds([r['solver_seconds'] for r in rows])}; a whole ProxLB run "
        f"(reading the cluster, {statistics.median(r['proxlb_requests'] for r in rows):g} API "
        f"requests median, greedy and solver) {_seconds([r['proxlb_seconds'] for r in rows])}; "
        f"vmbalance plan {_seconds([r['vmbalance_seconds'] for r in rows])}; memory, "
        "aggressive "
        + _seconds([r["vmbalance_memory_seconds"]["vmbalance memory, aggressive"] for r in rows])
        + ".",
        "",
        f"Run: `.venv/bin/python bench/bench_proxlb.py{flags}` on {date.today().isoformat()}, "
        f"{platform.machine()}, 2 cores (shared with other work), Python "
        f"{platform.python_version()}; {seconds / 60:.0f} min in total.",
    ]
    return "\n".join(lines)


def progress(row: dict[str, Any]) -> str:
    """One cluster's line: each plan's migrations and max assigned-memory utilisation."""
    plans = ", ".join(
        f"{name} {row[name]['migrations']} ({row[name]['utilisation']['memory assigned']:.3f})"
        for name in PLANNERS
    )
    return (
        f"seed {row['seed']:3d}: {row['vms']} VMs, migrations (max memory assigned) {plans}; "
        f"solver {row['solver_status']} {row['solver_seconds']:.1f}s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clusters", type=int, default=40)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--small", action="store_true", help="3 nodes, 10-12 VMs per cluster")
    parser.add_argument("--rows", type=Path, help="also write the per-cluster rows (JSON)")
    parser.add_argument("--no-docs", action="store_true", help="print only")
    args = parser.parse_args()
    if args.clusters < 1:
        raise SystemExit("--clusters must be at least 1")
    started = time.perf_counter()
    try:
        python = installed_python()
        version = proxlb_version(python)
    except RuntimeError as error:
        raise SystemExit(f"ProxLB could not be installed: {error}") from None
    rows = []
    jobs = [(seed, args.small, str(python)) for seed in range(args.clusters)]
    with multiprocessing.Pool(max(args.jobs, 1)) as pool:
        for row in pool.imap(evaluate, jobs):
            rows.append(row)
            print(progress(row), file=sys.stderr, flush=True)
            if args.rows:  # after every cluster, so a cut-short run keeps what it measured
                args.rows.write_text(json.dumps(rows, indent=1))
    body = summarise(rows, time.perf_counter() - started, version, args.small)
    print(body)
    if not args.no_docs:
        replace_section("ProxLB side by side", body)


if __name__ == "__main__":
    main()
