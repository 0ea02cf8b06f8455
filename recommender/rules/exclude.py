"""Excluded VMs are never moved automatically (on a maintenance node they are reported)."""

from __future__ import annotations

import numpy as np

from recommender.problem import Problem, State
from recommender.rules.base import BaseConstraint, Movers, Violation, rows_with_any


class Exclude(BaseConstraint):
    name = "exclude"

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem)
        vm_pos = problem.vm_index()
        self.excluded = np.zeros(problem.n_vms, dtype=bool)
        self.excluded[[vm_pos[v] for v in problem.rules.exclude if v in vm_pos]] = True

    @classmethod
    def prepare(cls, problem: Problem) -> Exclude | None:
        return cls(problem) if problem.rules.exclude else None

    def allowed_targets(self, state: State, movers: Movers) -> np.ndarray:
        mask = self.all_nodes(movers)
        mask[rows_with_any(movers, self.excluded)] = False
        return mask

    def frozen_vms(self) -> dict[int, str]:
        return {int(v): "excluded from automatic moves" for v in np.flatnonzero(self.excluded)}

    def check(self, state: State, *, final: bool = False) -> list[Violation]:
        moved = self.moved_vms(state)
        return [
            Violation(self.name, self.problem.vms[v], "excluded VM moved")
            for v in moved[self.excluded[moved]]
        ]
