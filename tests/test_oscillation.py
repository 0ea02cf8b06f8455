"""A stationary cluster with noisy measurements, re-planned every 15 minutes for a day.

Every VM's load is its true load times lognormal noise (sigma 0.1) each round; the plan of
each round is applied (nodes changed, last_migration set). Hysteresis (trigger above target,
gain per GiB copied, cooldown) must keep later plans empty or tiny, and no VM may ever go
back to a node it left.
"""

from __future__ import annotations

from datetime import timedelta

import numpy as np

from devkit.instances import Shape, random_cluster
from recommender.engine.planner import plan_moves
from recommender.model import Snapshot

ROUNDS = 100
STEP = timedelta(minutes=15)
NOISY = ("cpu", "memory", "disk_bytes", "disk_ops", "network")


def _simulate(seed: int, sigma: float = 0.1) -> tuple[list[int], bool]:
    inst = random_cluster(seed, Shape(nodes=(6, 6), vms=(60, 60), rules=True, skew=1.0))
    truth = inst.snapshot.vms.copy()
    placement = truth["node"].copy()
    last = truth["last_migration"].copy()
    left: dict[str, set[str]] = {vm: set() for vm in truth.index}
    rng = np.random.default_rng(seed)
    now = inst.snapshot.taken_at
    counts: list[int] = []
    first_reached = False
    for round_ in range(ROUNDS):
        seen = truth.copy()
        for column in NOISY:
            seen[column] = truth[column] * rng.lognormal(0.0, sigma, len(truth))
        seen["memory"] = np.minimum(seen["memory"], seen["memory_max_bytes"])
        seen["node"] = placement
        seen["last_migration"] = last
        result = plan_moves(Snapshot(inst.snapshot.nodes, seen, taken_at=now), inst.config)
        for move in result.moves:
            assert move.target not in left[move.vm], f"{move.vm} back to {move.target}"
            left[move.vm].add(move.source)
            placement[move.vm] = move.target
            last[move.vm] = now.timestamp()
        if round_ == 0:
            first_reached = result.target_reached
        counts.append(len(result.moves))
        now += STEP
    return counts, first_reached


def test_noisy_stationary_cluster_settles_after_the_first_plan() -> None:
    # Seeds 5 and 10 reach the target with the first plan; seed 3's first plan stops at
    # max_migrations above the target, and the cluster must stay quiet there too.
    for seed in (5, 10, 3):
        counts, first_reached = _simulate(seed)
        assert counts[0] > 0, "the scenario starts imbalanced"
        later = counts[1:]
        assert sum(later) <= (2 if first_reached else 4), later
