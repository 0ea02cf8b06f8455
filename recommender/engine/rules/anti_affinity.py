"""Anti-affinity: never two VMs of one group on one node.

A node already holding two members at the start must not gain a third; the engine moves the
extra members away (keeping the VM that is most expensive to move) when it can. The members
are counted per node by every state (`CountedSets`).
"""

from __future__ import annotations

from typing import Self

import numpy as np
from pydantic import Field

from recommender.engine.problem import Problem, State, Units, VmGroup
from recommender.engine.rules.base import (
    Constraint,
    GroupRule,
    LinearModel,
    Movers,
    RulesPart,
    Violation,
    present,
)


class AntiAffinitySettings(RulesPart):
    anti_affinity: list[GroupRule] = Field(default_factory=list)


class AntiAffinity(Constraint):
    name = "anti_affinity"
    settings = AntiAffinitySettings

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem)
        self.groups = problem.counted
        self.start_count = State.initial(problem).set_count
        self.allowed_count = np.maximum(self.start_count, 1)

    @classmethod
    def counted_groups(
        cls, rules: RulesPart, vm_pos: dict[str, int], units: Units, warnings: list[str]
    ) -> list[VmGroup]:
        out = []
        for group in AntiAffinitySettings.of(rules).anti_affinity:
            members = np.unique(present(group.vms, vm_pos))
            if len(members) < 2:
                continue
            unit_ids, count = np.unique(units.of_vm[members], return_counts=True)
            if (count > 1).any():
                joined = units.labels[int(unit_ids[count > 1][0])]
                warnings.append(
                    f"anti-affinity {group.name} puts the VMs of {joined} apart; ignored"
                )
                continue
            out.append(VmGroup(group.name, members))
        return out

    @classmethod
    def named_vms(cls, rules: RulesPart) -> set[str]:
        return {vm for group in AntiAffinitySettings.of(rules).anti_affinity for vm in group.vms}

    @classmethod
    def prepare(cls, problem: Problem) -> Self | None:
        return cls(problem) if len(problem.counted) else None

    def _pairs(self, movers: Movers) -> tuple[np.ndarray, np.ndarray]:
        """(mover, group) for every anti-affinity group a mover's VMs belong to."""
        ptr = self.groups.vm_ptr
        counts = ptr[movers.vm + 1] - ptr[movers.vm]
        starts = np.repeat(ptr[movers.vm], counts)
        offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        return np.repeat(movers.owner, counts), self.groups.vm_set[starts + offsets]

    def allowed_targets(self, state: State, movers: Movers) -> np.ndarray:
        mask = self.all_nodes(movers)
        owners, groups = self._pairs(movers)
        for owner, group in zip(owners, groups, strict=True):
            mask[owner] &= state.set_count[group] == 0
        return mask

    def must_move(self, state: State, stuck: np.ndarray) -> dict[int, str]:
        out: dict[int, str] = {}
        copy = self.problem.copy_bytes
        for g, members in enumerate(self.groups.members):
            for node in np.flatnonzero(state.set_count[g] >= 2):
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

    def repair_units(self, state: State) -> dict[int, str]:
        """Every member sharing a node with another: any of them may be the one that moves."""
        out: dict[int, str] = {}
        for g, members in enumerate(self.groups.members):
            for node in np.flatnonzero(state.set_count[g] >= 2):
                for vm in members[state.vm_node[members] == node]:
                    out.setdefault(
                        int(self.problem.units.of_vm[vm]),
                        f"anti-affinity {self.groups.names[g]}: shares "
                        f"{self.problem.nodes[node]} with another member",
                    )
        return out

    def add_repair_to_model(self, model: LinearModel, stuck: np.ndarray) -> None:
        """No two members on a node at the end, except where members that stay already
        share it; which member moves is the program's choice."""
        owners, groups = self._pairs(model.movers)
        for g in np.unique(groups):
            holders = np.isin(np.arange(len(model.movers)), np.unique(owners[groups == g]))
            fixed = model.fixed_sets[g]
            model.add_node_rows(holders.astype(float), np.maximum(1 - fixed, 0).astype(float), None)

    def check(self, state: State, *, final: bool = False) -> list[Violation]:
        out = []
        for g, node in zip(*np.nonzero(state.set_count > self.allowed_count), strict=True):
            out.append(
                Violation(
                    self.name,
                    self.groups.names[g],
                    f"{int(state.set_count[g, node])} members on {self.problem.nodes[node]}",
                )
            )
        return out

    def add_to_model(self, model: LinearModel) -> None:
        owners, groups = self._pairs(model.movers)
        for g in np.unique(groups):
            holders = np.unique(owners[groups == g])
            free = self.allowed_count[g] - model.fixed_sets[g]
            model.add_node_rows(
                np.isin(np.arange(len(model.movers)), holders).astype(float),
                free.astype(float),
                None,
            )
