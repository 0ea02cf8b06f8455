"""Pinning: a VM may only run on one node or on the nodes of one node group."""

from __future__ import annotations

import numpy as np

from recommender.problem import Problem, State
from recommender.rules.base import BaseConstraint, Movers, Violation


class Pin(BaseConstraint):
    name = "pin"

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem)
        node_pos = problem.node_index()
        vm_pos = problem.vm_index()
        self.masks: dict[int, np.ndarray] = {}
        self.labels: dict[int, str] = {}
        self.stuck: dict[int, str] = {}
        for vm_name, where in sorted(problem.rules.pin.items()):
            if vm_name not in vm_pos:
                continue
            vm = vm_pos[vm_name]
            mask = np.zeros(problem.n_nodes, dtype=bool)
            if where in problem.node_groups:
                mask[list(problem.node_groups[where])] = True
                self.labels[vm] = f"node group {where}"
            elif where in node_pos:
                mask[node_pos[where]] = True
                self.labels[vm] = where
            else:
                self._warnings.append(f"pin {vm_name}: no node or node group {where!r}; not moved")
                self.stuck[vm] = f"pinned to unknown {where!r}"
                continue
            self.masks[vm] = mask
        self.pinned = np.zeros(problem.n_vms, dtype=bool)
        self.pinned[list(self.masks)] = True
        units = problem.units
        for unit in np.unique(units.of_vm[self.pinned]):
            members = [int(v) for v in units.members(unit) if v in self.masks]
            joint = np.logical_and.reduce([self.masks[v] for v in members])
            if not joint.any():
                group = units.names.get(int(unit), "")
                self._warnings.append(f"affinity {group}: its members are pinned apart; not moved")
                for vm in units.members(unit):
                    self.stuck[int(vm)] = f"affinity {group} pinned apart"

    @classmethod
    def prepare(cls, problem: Problem) -> Pin | None:
        return cls(problem) if problem.rules.pin else None

    def allowed_targets(self, state: State, movers: Movers) -> np.ndarray:
        mask = self.all_nodes(movers)
        hit = np.flatnonzero(self.pinned[movers.vm])
        owners = movers.owner[hit]
        for owner, vm in zip(owners, movers.vm[hit], strict=True):
            mask[owner] &= self.masks[int(vm)]
        return mask

    def frozen_vms(self) -> dict[int, str]:
        return dict(self.stuck)

    def must_move(self, state: State, stuck: np.ndarray) -> dict[int, str]:
        out: dict[int, str] = {}
        for vm, mask in self.masks.items():
            node = int(state.vm_node[vm])
            if node >= 0 and not mask[node]:
                out.setdefault(int(self.problem.units.of_vm[vm]), f"pinned to {self.labels[vm]}")
        return out

    def check(self, state: State, *, final: bool = False) -> list[Violation]:
        out = []
        for vm in self.moved_vms(state):
            vm = int(vm)
            if vm in self.stuck or (vm in self.masks and not self.masks[vm][state.vm_node[vm]]):
                out.append(Violation(self.name, self.problem.vms[vm], "moved off its pin"))
        return out
