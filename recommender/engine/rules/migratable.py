"""VMs the hypervisor would refuse to live-migrate (or never finish) stay where they are.

A VM is held when the exporter names a blocker (passthrough, local media, a lock, local
resources), when it has disks on local storage and `migration.local_disks` is `refuse` (or
their size is unknown, or HA manages it), or when its dirty rate means pre-copy would not
converge (`recommender.engine.migration_cost`). On a node being evacuated such a VM is
reported as unplaceable with this reason; `immovable_on_busy_nodes` lists the ones on the
nodes balancing would take VMs from.
"""

from __future__ import annotations

from typing import Self

import numpy as np

from recommender.engine.measure import cluster_mean, node_utilisation
from recommender.engine.problem import Problem, State
from recommender.engine.rules.base import Constraint, Movers, Violation, rows_with_any


def immovable_vms(problem: Problem) -> dict[int, str]:
    """{VM index: why it cannot move} for every VM the hypervisor would not live-migrate."""
    facts = problem.migration
    if facts is None:
        return {}
    # Here, not at the top: the cost model reads the data frames, and the rules' settings are
    # loaded by `config check`, which must not import pandas.
    from recommender.engine.migration_cost import immovable_reason

    blocked = np.fromiter((bool(b) for b in facts.blockers), dtype=bool, count=problem.n_vms)
    suspect = blocked | (facts.local_disk_bytes != 0) | ~facts.converges
    out: dict[int, str] = {}
    for vm in np.flatnonzero(suspect).tolist():
        reason = immovable_reason(facts, vm)
        if reason is not None:
            out[vm] = reason
    return out


class Migratable(Constraint):
    name = "migratable"

    def __init__(self, problem: Problem, reasons: dict[int, str]) -> None:
        super().__init__(problem)
        self.reasons = reasons
        self.held = np.zeros(problem.n_vms, dtype=bool)
        self.held[list(reasons)] = True

    @classmethod
    def prepare(cls, problem: Problem) -> Self | None:
        reasons = immovable_vms(problem)
        return cls(problem, reasons) if reasons else None

    def allowed_targets(self, state: State, movers: Movers) -> np.ndarray:
        mask = self.all_nodes(movers)
        mask[rows_with_any(movers, self.held)] = False
        return mask

    def frozen_vms(self) -> dict[int, str]:
        return dict(self.reasons)

    def check(self, state: State, *, final: bool = False) -> list[Violation]:
        moved = self.moved_vms(state)
        return [
            Violation(self.name, self.problem.vms[v], self.reasons[int(v)])
            for v in moved[self.held[moved]]
        ]


def immovable_on_busy_nodes(problem: Problem) -> list[tuple[int, str]]:
    """(VM, reason) of the immovable VMs on active nodes whose utilisation of a weighted
    resource is above the cluster mean by more than the target: the nodes balancing takes VMs
    from, where these VMs would otherwise be candidates. Sorted by node, then VM."""
    reasons = immovable_vms(problem)
    if not reasons:
        return []
    start = State.initial(problem)
    active = np.flatnonzero(problem.active)
    weighted = problem.weights > 0
    util = node_utilisation(start.node_load[active], problem.capacity[active])
    mean = cluster_mean(start.node_load[active], problem.capacity[active])
    busy_active = np.any((util - mean > problem.balance.target) & weighted, axis=1)
    busy = np.zeros(problem.n_nodes, dtype=bool)
    busy[active[busy_active]] = True
    hits = [
        (vm, why)
        for vm, why in reasons.items()
        if problem.vm_node[vm] >= 0 and busy[problem.vm_node[vm]]
    ]
    return sorted(hits, key=lambda hit: (int(problem.vm_node[hit[0]]), problem.vms[hit[0]]))
