"""No VM moves to a node of another cluster (a corosync domain, a libvirt site): the
hypervisor cannot migrate across them."""

from __future__ import annotations

from typing import Self

import numpy as np

from recommender.engine.problem import Problem, State
from recommender.engine.rules.base import Constraint, Movers, Violation


class SameCluster(Constraint):
    name = "same_cluster"

    def __init__(self, problem: Problem, clusters: tuple[str, ...]) -> None:
        super().__init__(problem)
        _, self.node_cluster = np.unique(np.array(clusters, dtype=object), return_inverse=True)
        start = problem.vm_node
        self.vm_cluster = np.where(start >= 0, self.node_cluster[np.maximum(start, 0)], -1)

    @classmethod
    def prepare(cls, problem: Problem) -> Self | None:
        facts = problem.migration
        if facts is None or len(set(facts.node_cluster)) < 2:
            return None
        return cls(problem, facts.node_cluster)

    def allowed_targets(self, state: State, movers: Movers) -> np.ndarray:
        home = self.vm_cluster[movers.vm[movers.ptr[:-1]]] if len(movers) else np.zeros(0, int)
        allowed: np.ndarray = home[:, None] == self.node_cluster[None, :]
        return allowed

    def check(self, state: State, *, final: bool = False) -> list[Violation]:
        moved = self.moved_vms(state)
        crossed = moved[self.node_cluster[state.vm_node[moved]] != self.vm_cluster[moved]]
        return [
            Violation(self.name, self.problem.vms[v], "moved to a node of another cluster")
            for v in crossed
        ]
