"""Partial data: a VM of unknown load stays put, a node of unknown capacity receives nothing."""

from __future__ import annotations

import numpy as np

from recommender.engine.problem import Problem, State
from recommender.engine.rules.base import Constraint, Movers, Violation, rows_with_any


class NodeData(Constraint):
    name = "node_data"

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem)
        on_unknown_node = problem.vm_node < 0
        node_ok = problem.active | problem.maintenance
        on_blind_node = np.zeros(problem.n_vms, dtype=bool)
        on_blind_node[~on_unknown_node] = ~node_ok[problem.vm_node[~on_unknown_node]]
        self.stuck = ~problem.known | on_unknown_node | on_blind_node
        self.reasons = np.where(
            on_unknown_node,
            "its node is not in the snapshot",
            np.where(on_blind_node, "its node's capacity is unknown", "its load is unknown"),
        )

    def allowed_targets(self, state: State, movers: Movers) -> np.ndarray:
        mask = np.repeat(self.problem.node_data_ok[None, :], len(movers), axis=0)
        mask[rows_with_any(movers, self.stuck)] = False
        return mask

    def frozen_vms(self) -> dict[int, str]:
        return {int(v): str(self.reasons[v]) for v in np.flatnonzero(self.stuck)}

    def check(self, state: State, *, final: bool = False) -> list[Violation]:
        moved = self.moved_vms(state)
        bad = moved[~self.problem.node_data_ok[state.vm_node[moved]] | self.stuck[moved]]
        return [
            Violation(self.name, self.problem.vms[v], "moved although its data is incomplete")
            for v in bad
        ]
