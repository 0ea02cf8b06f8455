"""Maintenance nodes are evacuated and receive nothing.

A node is in maintenance when the snapshot says so or when `rules.maintenance` names it.
"""

from __future__ import annotations

from typing import Self

import numpy as np
from pydantic import Field

from recommender.engine.problem import Problem, State
from recommender.engine.rules.base import Constraint, Movers, Names, RulesPart, Violation
from recommender.text import and_more


class MaintenanceSettings(RulesPart):
    maintenance: Names = Field(default_factory=list)

    @classmethod
    def summarise(cls, rules: RulesPart) -> dict[str, object]:
        return {"maintenance": list(cls.of(rules).maintenance)}


class Maintenance(Constraint):
    name = "maintenance"
    settings = MaintenanceSettings
    forced_kind = "evacuate"

    @classmethod
    def evacuated_nodes(
        cls, rules: RulesPart, node_pos: dict[str, int], warnings: list[str]
    ) -> list[int]:
        names = MaintenanceSettings.of(rules).maintenance
        unknown = [n for n in names if n not in node_pos]
        if unknown:
            warnings.append(f"maintenance names unknown nodes: {and_more(unknown)}")
        return [node_pos[n] for n in names if n in node_pos]

    @classmethod
    def prepare(cls, problem: Problem) -> Self | None:
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
