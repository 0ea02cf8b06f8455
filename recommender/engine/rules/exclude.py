"""Excluded VMs are never moved automatically (on a maintenance node they are reported)."""

from __future__ import annotations

from typing import Self

import numpy as np
from pydantic import Field

from recommender.engine.problem import Problem, State
from recommender.engine.rules.base import (
    Constraint,
    Movers,
    Names,
    RulesPart,
    Violation,
    present,
    rows_with_any,
)


class ExcludeSettings(RulesPart):
    exclude: Names = Field(default_factory=list)


class Exclude(Constraint):
    name = "exclude"
    settings = ExcludeSettings

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem)
        names = ExcludeSettings.of(problem.rules).exclude
        self.excluded = np.zeros(problem.n_vms, dtype=bool)
        self.excluded[present(names, problem.vm_index())] = True

    @classmethod
    def named_vms(cls, rules: RulesPart) -> set[str]:
        return set(ExcludeSettings.of(rules).exclude)

    @classmethod
    def prepare(cls, problem: Problem) -> Self | None:
        return cls(problem) if ExcludeSettings.of(problem.rules).exclude else None

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
