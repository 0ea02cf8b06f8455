"""The engine's numeric view of a snapshot, and the mutable cluster state it plans on.

A `Problem` holds arrays indexed by node and by VM (`recommender.engine.build` makes one from
the snapshot, the config and the rules). VMs that must share a node form a *unit*; most units
hold one VM. The search moves units, the plan sequences the VMs of a unit one by one. Sets of
VMs whose members must be counted per node (for rules that limit how many share a node) are
`CountedSets`, and every `State` keeps their counts up to date.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from recommender.engine.measure import Imbalance, imbalance_per_resource, overall_imbalance

if TYPE_CHECKING:
    from recommender.config import BalanceSettings
    from recommender.engine.migration_cost import MigrationFacts
    from recommender.engine.rules.base import Constraint, RulesPart

# Units of VMs that sit on no known node, and units whose members are on different nodes.
NO_NODE = -1
SPLIT = -2


@dataclass(frozen=True)
class VmGroup:
    """VMs a rule names together (by index), under the rule's name for the group."""

    name: str
    vms: np.ndarray


@dataclass(frozen=True)
class Units:
    """VMs grouped into units that move as one, stored as a CSR over the VM indices."""

    of_vm: np.ndarray  # (V,) unit of each VM
    ptr: np.ndarray  # (U+1,) offsets into `vm`
    vm: np.ndarray  # VM indices sorted by unit
    size: np.ndarray  # (U,) members per unit
    load: np.ndarray  # (U, R) summed load
    copy_bytes: np.ndarray  # (U,) bytes a migration of the whole unit transfers
    names: dict[int, str]  # group name(s) of units with more than one VM
    labels: dict[int, str]  # the same, with the rule that joined them ("affinity db")

    def __len__(self) -> int:
        return len(self.size)

    def members(self, unit: int) -> np.ndarray:
        return self.vm[self.ptr[unit] : self.ptr[unit + 1]]

    @classmethod
    def from_groups(
        cls,
        groups: list[tuple[str, VmGroup]],
        load: np.ndarray,
        copy_bytes: np.ndarray,
    ) -> Units:
        """Units from (rule name, group) pairs: overlapping groups merge into one unit; every
        VM in no group is a unit of its own."""
        n_vms = len(load)
        finder = _UnionFind(n_vms)
        joined: list[tuple[str, VmGroup]] = []
        for rule, group in groups:
            for other in group.vms[1:]:
                finder.union(int(group.vms[0]), int(other))
            if len(group.vms) > 1:
                joined.append((rule, group))
        for _, group in joined:
            for vm in group.vms:
                finder.find(int(vm))
        _, of_vm = np.unique(finder.parent, return_inverse=True)
        of_vm = of_vm.astype(np.int64)
        n_units = int(of_vm.max()) + 1 if n_vms else 0
        order = np.argsort(of_vm, kind="stable")
        size = np.bincount(of_vm, minlength=n_units)
        ptr = np.concatenate([[0], np.cumsum(size)]).astype(np.int64)
        unit_load = np.zeros((n_units, load.shape[1]))
        np.add.at(unit_load, of_vm, load)
        unit_copy = np.bincount(of_vm, weights=copy_bytes, minlength=n_units)
        names: dict[int, set[str]] = {}
        rules: dict[int, set[str]] = {}
        for rule, group in joined:
            unit = int(of_vm[group.vms[0]])
            names.setdefault(unit, set()).add(group.name)
            rules.setdefault(unit, set()).add(rule)
        joint = {unit: "+".join(sorted(found)) for unit, found in names.items()}
        labels = {unit: f"{'+'.join(sorted(rules[unit]))} {joint[unit]}" for unit in joint}
        return cls(of_vm, ptr, order.astype(np.int64), size, unit_load, unit_copy, joint, labels)


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = np.arange(n)

    def find(self, a: int) -> int:
        root = a
        while self.parent[root] != root:
            root = int(self.parent[root])
        while self.parent[a] != root:
            self.parent[a], a = root, int(self.parent[a])
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


@dataclass(frozen=True)
class CountedSets:
    """Sets of VMs whose members a `State` counts per node, plus a VM -> sets CSR."""

    names: tuple[str, ...]
    members: tuple[np.ndarray, ...]
    vm_ptr: np.ndarray  # (V+1,)
    vm_set: np.ndarray  # set ids, by VM

    def __len__(self) -> int:
        return len(self.names)

    def of_vm(self, vm: int) -> np.ndarray:
        return self.vm_set[self.vm_ptr[vm] : self.vm_ptr[vm + 1]]

    @classmethod
    def from_groups(cls, groups: list[VmGroup], n_vms: int) -> CountedSets:
        members = [np.array(sorted({int(v) for v in g.vms}), dtype=np.int64) for g in groups]
        pairs = sorted((int(vm), s) for s, vms in enumerate(members) for vm in vms)
        counts = np.bincount([vm for vm, _ in pairs], minlength=n_vms) if pairs else np.zeros(n_vms)
        ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        vm_set = np.array([s for _, s in pairs], dtype=np.int64)
        return cls(tuple(g.name for g in groups), tuple(members), ptr, vm_set)


@dataclass(frozen=True)
class Problem:
    """Everything the engine plans with, as arrays. Built once per snapshot, never mutated."""

    balance: BalanceSettings
    rules: RulesPart  # the `rules:` section (`RuleSettings`)
    rule_types: tuple[type[Constraint], ...]  # the rules it was shaped by and is planned with
    taken_at: float  # unix seconds
    resources: tuple[str, ...]
    weights: np.ndarray  # (R,)
    nodes: tuple[str, ...]
    capacity: np.ndarray  # (N, R); 0 where unknown
    maintenance: np.ndarray  # (N,) bool: being evacuated (snapshot flag or a rule)
    active: np.ndarray  # (N,) bool: counts in the imbalance (known capacity, not maintenance)
    node_data_ok: np.ndarray  # (N,) bool: capacity known and no VM of unknown memory on it
    receivable: np.ndarray  # (N,) bool: may receive VMs (data ok, not maintenance)
    vms: tuple[str, ...]
    vm_display: tuple[str, ...]
    vm_node: np.ndarray  # (V,) initial node, NO_NODE when the VM's node is not in the snapshot
    load: np.ndarray  # (V, R) load, memory per memory_mode; unknown values are 0
    copy_bytes: np.ndarray  # (V,) bytes a migration transfers (`migration_cost`)
    known: np.ndarray  # (V,) bool: every load the engine needs is known
    cooldown: np.ndarray  # (V,) bool: migrated within cooldown_seconds
    bursting: np.ndarray  # (V,) bool: burst_ratio at or above the setting
    limits: np.ndarray  # (N, R) most a node may hold (inf: no limit), never below its start
    background: np.ndarray  # (N, R) load besides the VMs (host total minus VMs), counted first
    units: Units
    counted: CountedSets
    warnings: tuple[str, ...] = field(default=())
    migration: MigrationFacts | None = None  # blockers, disks, HA, the cost of each move

    @property
    def n_nodes(self) -> int:
        return len(self.nodes)

    @property
    def n_vms(self) -> int:
        return len(self.vms)

    def vm_index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.vms)}

    def node_index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.nodes)}

    def imbalance(self, node_load: np.ndarray) -> Imbalance:
        """Per-resource and overall imbalance of a node-load matrix, over the active nodes,
        exactly as `recommender.engine.measure` defines it."""
        active = self.active
        per = imbalance_per_resource(node_load[active], self.capacity[active])
        overall = overall_imbalance(np.where(self.weights > 0, per, 0.0), self.weights)
        per_resource = {r: float(v) for r, v in zip(self.resources, per, strict=True)}
        return Imbalance(per_resource, overall)

    def unit_flags(self, per_vm: np.ndarray) -> np.ndarray:
        """(U,) true where any member VM is flagged in `per_vm` (V,)."""
        hits = np.bincount(
            self.units.of_vm, weights=per_vm.astype(float), minlength=len(self.units)
        )
        return hits > 0


@dataclass(frozen=True)
class UnitMove:
    """A unit going from `source` (SPLIT for a split unit rejoining) to `target`."""

    unit: int
    source: int
    target: int


@dataclass
class State:
    """Where every VM is, and the per-node sums the rules and the measure need.

    `node_load` counts a VM on every node it is present on: a VM in flight during a wave is
    added to its target with `add_presence` while it still counts on its source.
    """

    vm_node: np.ndarray  # (V,) int
    unit_node: np.ndarray  # (U,) int, SPLIT when members are on different nodes
    node_load: np.ndarray  # (N, R)
    set_count: np.ndarray  # (S, N) members of each counted set present per node
    migrations: int = 0

    @classmethod
    def initial(cls, problem: Problem) -> State:
        n, r = problem.n_nodes, len(problem.resources)
        vm_node = problem.vm_node.astype(np.int64, copy=True)
        placed = vm_node >= 0
        node_load = problem.background.astype(float, copy=True).reshape(n, r)
        np.add.at(node_load, vm_node[placed], problem.load[placed])
        sets = problem.counted
        set_count = np.zeros((len(sets), n), dtype=np.int64)
        for s, members in enumerate(sets.members):
            where = vm_node[members]
            np.add.at(set_count[s], where[where >= 0], 1)
        return cls(vm_node, _unit_nodes(problem.units, vm_node), node_load, set_count)

    def copy(self) -> State:
        return State(
            self.vm_node.copy(),
            self.unit_node.copy(),
            self.node_load.copy(),
            self.set_count.copy(),
            self.migrations,
        )

    def move_vm(self, problem: Problem, vm: int, target: int, *, undo: bool = False) -> None:
        """Move one VM; `undo` takes back an earlier migration (the count goes down)."""
        source = int(self.vm_node[vm])
        if source == target:
            return
        if source >= 0:
            self.node_load[source] -= problem.load[vm]
        self.node_load[target] += problem.load[vm]
        for s in problem.counted.of_vm(vm):
            if source >= 0:
                self.set_count[s, source] -= 1
            self.set_count[s, target] += 1
        self.vm_node[vm] = target
        self.migrations += -1 if undo else 1
        unit = int(problem.units.of_vm[vm])
        members = problem.units.members(unit)
        nodes = self.vm_node[members]
        self.unit_node[unit] = nodes[0] if np.all(nodes == nodes[0]) else SPLIT

    def move_unit(self, problem: Problem, unit: int, target: int, *, undo: bool = False) -> int:
        """Move every member of `unit` to `target`; returns the number of VM migrations."""
        moved = 0
        for vm in problem.units.members(unit):
            if self.vm_node[vm] != target:
                self.move_vm(problem, int(vm), target, undo=undo)
                moved += 1
        return moved

    def add_presence(self, problem: Problem, vm: int, target: int) -> None:
        """Count `vm` on `target` too (a migration in flight), without leaving its source."""
        self.node_load[target] += problem.load[vm]
        for s in problem.counted.of_vm(vm):
            self.set_count[s, target] += 1


def _unit_nodes(units: Units, vm_node: np.ndarray) -> np.ndarray:
    first = vm_node[units.vm[units.ptr[:-1]]]
    lo = np.minimum.reduceat(vm_node[units.vm], units.ptr[:-1]) if len(units) else first
    hi = np.maximum.reduceat(vm_node[units.vm], units.ptr[:-1]) if len(units) else first
    return np.where(lo == hi, first, SPLIT).astype(np.int64)
