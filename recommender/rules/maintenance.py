"""Maintenance nodes are evacuated and receive nothing."""

from __future__ import annotations

import numpy as np

from recommender.problem import Problem, State
from recommender.rules.base import BaseConstraint, Movers, Violation


class Maintenance(BaseConstraint):
    name = "maintenance"

    @classmethod
    def prepare(cls, problem: Problem) -> Maintenance | None:
        return cls(problem) if problem.maintenance.any() else None

    def allowed_targets(self, state: State, movers: Movers) -> np.ndarray:
        return np.repeat(~self.problem.maintenance[None, :], len(movers), axis=0)

    def must_move(self, state: State, stuck: np.ndarray) -> dict[int, str]:
        placed = state.vm_node >= 0
        on_maintenance = np.zeros(self.problem.n_vms, dtype=bool)
        on_maintenance[placed] = self.problem.maintenance[state.vm_node[placed]]
        out: dict[int, str] = {}
        for vm in np.flatnonzero(on_maintenance):
            unit = int(self.problem.units.of_vm[vm])
            node = self.problem.nodes[state.vm_node[vm]]
            out.setdefault(unit, f"maintenance: {node} is being evacuated")
        return out

    def check(self, state: State, *, final: bool = False) -> list[Violation]:
        moved = self.moved_vms(state)
        bad = moved[self.problem.maintenance[state.vm_node[moved]]]
        return [
            Violation(self.name, self.problem.vms[v], "moved onto a maintenance node") for v in bad
        ]
