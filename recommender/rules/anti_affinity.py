"""Anti-affinity: never two VMs of one group on one node.

A node already holding two members at the start must not gain a third; the engine moves the
extra members away (keeping the VM that is most expensive to move) when it can.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from recommender.problem import Problem, State
from recommender.rules.base import BaseConstraint, Movers, Violation

if TYPE_CHECKING:
    from recommender.exact import LinearModel


class AntiAffinity(BaseConstraint):
    name = "anti_affinity"

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem)
        self.groups = problem.anti_affinity
        self.start_count = State.initial(problem).group_count
        self.allowed_count = np.maximum(self.start_count, 1)

    @classmethod
    def prepare(cls, problem: Problem) -> AntiAffinity | None:
        return cls(problem) if problem.anti_affinity.names else None

    def _pairs(self, movers: Movers) -> tuple[np.ndarray, np.ndarray]:
        """(mover, group) for every anti-affinity group a mover's VMs belong to."""
        ptr = self.groups.vm_ptr
        counts = ptr[movers.vm + 1] - ptr[movers.vm]
        starts = np.repeat(ptr[movers.vm], counts)
        offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        return np.repeat(movers.owner, counts), self.groups.vm_group[starts + offsets]

    def allowed_targets(self, state: State, movers: Movers) -> np.ndarray:
        mask = self.all_nodes(movers)
        owners, groups = self._pairs(movers)
        for owner, group in zip(owners, groups, strict=True):
            mask[owner] &= state.group_count[group] == 0
        return mask

    def must_move(self, state: State, stuck: np.ndarray) -> dict[int, str]:
        out: dict[int, str] = {}
        copy = self.problem.copy_bytes
        for g, members in enumerate(self.groups.members):
            for node in np.flatnonzero(state.group_count[g] >= 2):
                here = members[state.vm_node[members] == node]
                # Keep VMs that cannot move, then the one that costs most to copy.
                order = sorted(here, key=lambda v: (not stuck[v], -copy[v], v))
                keep = order[0]
                for vm in order[1:]:
                    unit = int(self.problem.units.of_vm[vm])
                    out.setdefault(
                        unit,
                        f"anti-affinity {self.groups.names[g]}: shares "
                        f"{self.problem.nodes[node]} with {self.problem.vms[keep]}",
                    )
        return out

    def check(self, state: State, *, final: bool = False) -> list[Violation]:
        out = []
        for g, node in zip(*np.nonzero(state.group_count > self.allowed_count), strict=True):
            out.append(
                Violation(
                    self.name,
                    self.groups.names[g],
                    f"{int(state.group_count[g, node])} members on {self.problem.nodes[node]}",
                )
            )
        return out

    def add_to_model(self, model: LinearModel) -> None:
        owners, groups = self._pairs(model.movers)
        for g in np.unique(groups):
            holders = np.unique(owners[groups == g])
            free = self.allowed_count[g] - model.fixed_groups[g]
            model.add_node_rows(
                np.isin(np.arange(len(model.movers)), holders).astype(float),
                free.astype(float),
                None,
            )
