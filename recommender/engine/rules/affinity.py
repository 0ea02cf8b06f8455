"""Affinity: the VMs of a group always share a node, so they move as one unit.

Groups that overlap merge into one unit (`Units.from_groups`). This rule forces a split group
back together and flags a plan that would leave a group split.
"""

from __future__ import annotations

from typing import Self

import numpy as np
from pydantic import Field

from recommender.engine.problem import SPLIT, Problem, State, VmGroup
from recommender.engine.rules.base import (
    Constraint,
    GroupRule,
    LinearModel,
    RulesPart,
    Violation,
    present,
)


class AffinitySettings(RulesPart):
    affinity: list[GroupRule] = Field(default_factory=list)


class Affinity(Constraint):
    name = "affinity"
    settings = AffinitySettings

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem)
        self.start_split = State.initial(problem).unit_node == SPLIT

    @classmethod
    def joined_vms(cls, rules: RulesPart, vm_pos: dict[str, int]) -> list[VmGroup]:
        groups = AffinitySettings.of(rules).affinity
        return [VmGroup(group.name, present(group.vms, vm_pos)) for group in groups]

    @classmethod
    def named_vms(cls, rules: RulesPart) -> set[str]:
        return {vm for group in AffinitySettings.of(rules).affinity for vm in group.vms}

    @classmethod
    def prepare(cls, problem: Problem) -> Self | None:
        return cls(problem) if problem.units.names else None

    def must_move(self, state: State, stuck: np.ndarray) -> dict[int, str]:
        out = {}
        units = self.problem.units
        for unit in np.flatnonzero(state.unit_node == SPLIT):
            members = units.members(int(unit))
            nodes = sorted({self.problem.nodes[n] for n in state.vm_node[members]})
            out[int(unit)] = f"affinity {units.names.get(int(unit), '')}: split " + (
                f"over {', '.join(nodes)}"
            )
        return out

    def add_repair_to_model(self, model: LinearModel, stuck: np.ndarray) -> None:
        """A split unit has no column that leaves it split: nothing to add."""

    def check(self, state: State, *, final: bool = False) -> list[Violation]:
        if not final:
            return []
        split = np.flatnonzero((state.unit_node == SPLIT) & ~self.start_split)
        return [
            Violation(self.name, self.problem.units.names.get(int(u), str(u)), "group split")
            for u in split
        ]
