"""Affinity: the VMs of a group always share a node, so they move as one unit.

Units are built in `build_problem`; this rule forces a split group back together and flags a
plan that would leave a group split.
"""

from __future__ import annotations

import numpy as np

from recommender.problem import SPLIT, Problem, State
from recommender.rules.base import BaseConstraint, Violation


class Affinity(BaseConstraint):
    name = "affinity"

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem)
        self.start_split = State.initial(problem).unit_node == SPLIT

    @classmethod
    def prepare(cls, problem: Problem) -> Affinity | None:
        return cls(problem) if problem.units.names else None

    def must_move(self, state: State, stuck: np.ndarray) -> dict[int, str]:
        out = {}
        for unit in np.flatnonzero(state.unit_node == SPLIT):
            nodes = sorted({self.problem.nodes[n] for n in state.vm_node[self.members(unit)]})
            out[int(unit)] = f"affinity {self.problem.units.names.get(int(unit), '')}: split " + (
                f"over {', '.join(nodes)}"
            )
        return out

    def members(self, unit: int) -> np.ndarray:
        return self.problem.units.members(int(unit))

    def check(self, state: State, *, final: bool = False) -> list[Violation]:
        if not final:
            return []
        split = np.flatnonzero((state.unit_node == SPLIT) & ~self.start_split)
        return [
            Violation(self.name, self.problem.units.names.get(int(u), str(u)), "group split")
            for u in split
        ]
