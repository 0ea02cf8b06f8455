"""Pinning: a VM may only run on one node or on the nodes of one node group."""

from __future__ import annotations

from typing import Annotated, Self

import numpy as np
from pydantic import BeforeValidator, Field

from recommender.engine.problem import Problem, State
from recommender.engine.rules.base import Constraint, Movers, RulesPart, Violation
from recommender.text import and_more


def _keys_and_values_as_strings(value: object) -> object:
    if isinstance(value, dict):
        return {str(k): str(v) for k, v in value.items()}
    return value


class PinSettings(RulesPart):
    node_groups: dict[str, list[str]] = Field(default_factory=dict)
    # vm -> node name or node-group name: the VM may only run there.
    pin: Annotated[dict[str, str], BeforeValidator(_keys_and_values_as_strings)] = Field(
        default_factory=dict
    )


class Pin(Constraint):
    name = "pin"
    settings = PinSettings

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem)
        settings = PinSettings.of(problem.rules)
        node_pos = problem.node_index()
        vm_pos = problem.vm_index()
        groups = self._node_groups(settings, node_pos)
        self.masks: dict[int, np.ndarray] = {}
        self.labels: dict[int, str] = {}
        self.stuck: dict[int, str] = {}
        for vm_name, where in sorted(settings.pin.items()):
            if vm_name not in vm_pos:
                continue
            vm = vm_pos[vm_name]
            mask = np.zeros(problem.n_nodes, dtype=bool)
            if where in groups:
                mask[list(groups[where])] = True
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
        self._freeze_units_pinned_apart()

    def _node_groups(
        self, settings: PinSettings, node_pos: dict[str, int]
    ) -> dict[str, tuple[int, ...]]:
        groups: dict[str, tuple[int, ...]] = {}
        for group, members in settings.node_groups.items():
            missing = [m for m in members if m not in node_pos]
            if missing:
                self._warnings.append(f"node group {group}: unknown nodes {and_more(missing)}")
            groups[group] = tuple(node_pos[m] for m in members if m in node_pos)
        return groups

    def _freeze_units_pinned_apart(self) -> None:
        """A unit whose members' pins share no node cannot move anywhere."""
        units = self.problem.units
        for unit in np.unique(units.of_vm[self.pinned]):
            members = [int(v) for v in units.members(unit) if v in self.masks]
            joint = np.logical_and.reduce([self.masks[v] for v in members])
            if not joint.any():
                label = units.labels.get(int(unit), f"pin {self.problem.vms[members[0]]}")
                self._warnings.append(f"{label}: its members are pinned apart; not moved")
                for vm in units.members(unit):
                    self.stuck[int(vm)] = f"{label} pinned apart"

    @classmethod
    def named_vms(cls, rules: RulesPart) -> set[str]:
        return set(PinSettings.of(rules).pin)

    @classmethod
    def prepare(cls, problem: Problem) -> Self | None:
        settings = PinSettings.of(problem.rules)
        return cls(problem) if settings.pin or settings.node_groups else None

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
