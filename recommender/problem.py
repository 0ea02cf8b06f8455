"""The engine's numeric view of a snapshot, and the mutable cluster state it plans on.

`build_problem` turns the two pandas frames and the config into arrays indexed by node and by
VM. It is the one place where `memory_mode` picks the memory column: every later stage (the
fit rules, the imbalance, the exact solver, the sequencing) reads `Problem.load`.

VMs that must move together (affinity groups, merged when they overlap) form a *unit*; most
units hold one VM. The search moves units, the plan sequences the VMs of a unit one by one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from recommender.config import GIB, BalanceSettings, Config, RuleSettings
from recommender.hysteresis import in_cooldown, is_bursting
from recommender.measure import weight_vector
from recommender.model import RESOURCES, Snapshot

CPU = RESOURCES.index("cpu")
MEM = RESOURCES.index("memory")

# Units of VMs that sit on no known node, and units whose members are on different nodes.
NO_NODE = -1
SPLIT = -2


@dataclass(frozen=True)
class Units:
    """VMs grouped into units that move as one, stored as a CSR over the VM indices."""

    of_vm: np.ndarray  # (V,) unit of each VM
    ptr: np.ndarray  # (U+1,) offsets into `vm`
    vm: np.ndarray  # VM indices sorted by unit
    size: np.ndarray  # (U,) members per unit
    load: np.ndarray  # (U, R) summed load
    copy_bytes: np.ndarray  # (U,) memory a migration of the whole unit copies
    names: dict[int, str]  # affinity group name(s) of units with more than one VM

    def __len__(self) -> int:
        return len(self.size)

    def members(self, unit: int) -> np.ndarray:
        return self.vm[self.ptr[unit] : self.ptr[unit + 1]]


@dataclass(frozen=True)
class AntiAffinityGroups:
    """Anti-affinity groups as index arrays plus a VM -> groups CSR."""

    names: tuple[str, ...]
    members: tuple[np.ndarray, ...]
    vm_ptr: np.ndarray  # (V+1,)
    vm_group: np.ndarray  # group ids, by VM

    def of_vm(self, vm: int) -> np.ndarray:
        return self.vm_group[self.vm_ptr[vm] : self.vm_ptr[vm + 1]]


@dataclass(frozen=True)
class Problem:
    """Everything the engine plans with, as arrays. Built once per snapshot, never mutated."""

    balance: BalanceSettings
    rules: RuleSettings
    taken_at: float  # unix seconds
    resources: tuple[str, ...]
    weights: np.ndarray  # (R,)
    nodes: tuple[str, ...]
    capacity: np.ndarray  # (N, R); 0 where unknown
    maintenance: np.ndarray  # (N,) bool
    active: np.ndarray  # (N,) bool: counts in the imbalance (known capacity, not maintenance)
    node_data_ok: np.ndarray  # (N,) bool: capacity known and no VM of unknown memory on it
    receivable: np.ndarray  # (N,) bool: may receive VMs (data ok, not maintenance)
    vms: tuple[str, ...]
    vm_display: tuple[str, ...]
    vm_node: np.ndarray  # (V,) initial node, NO_NODE when the VM's node is not in the snapshot
    load: np.ndarray  # (V, R) load, memory per memory_mode; unknown values are 0
    copy_bytes: np.ndarray  # (V,) memory a migration copies (assigned memory)
    known: np.ndarray  # (V,) bool: every load the engine needs is known
    cooldown: np.ndarray  # (V,) bool: migrated within cooldown_seconds
    bursting: np.ndarray  # (V,) bool: burst_ratio at or above the setting
    mem_limit: np.ndarray  # (N,) memory a node may hold (reserve applied, at least its start)
    cpu_limit: np.ndarray  # (N,) cores a node may run (headroom applied, at least its start)
    node_groups: dict[str, tuple[int, ...]]
    units: Units
    anti_affinity: AntiAffinityGroups
    warnings: tuple[str, ...] = field(default=())

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


@dataclass
class State:
    """Where every VM is, and the per-node sums the rules and the measure need.

    `node_load` counts a VM on every node it is present on: a VM in flight during a wave is
    added to its target with `add_presence` while it still counts on its source.
    """

    vm_node: np.ndarray  # (V,) int
    unit_node: np.ndarray  # (U,) int, SPLIT when members are on different nodes
    node_load: np.ndarray  # (N, R)
    group_count: np.ndarray  # (G, N) anti-affinity members present per node
    migrations: int = 0

    @classmethod
    def initial(cls, problem: Problem) -> State:
        n, r = problem.n_nodes, len(problem.resources)
        vm_node = problem.vm_node.astype(np.int64, copy=True)
        placed = vm_node >= 0
        node_load = np.zeros((n, r))
        np.add.at(node_load, vm_node[placed], problem.load[placed])
        groups = problem.anti_affinity
        group_count = np.zeros((len(groups.names), n), dtype=np.int64)
        for g, members in enumerate(groups.members):
            where = vm_node[members]
            np.add.at(group_count[g], where[where >= 0], 1)
        return cls(vm_node, _unit_nodes(problem.units, vm_node), node_load, group_count)

    def copy(self) -> State:
        return State(
            self.vm_node.copy(),
            self.unit_node.copy(),
            self.node_load.copy(),
            self.group_count.copy(),
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
        for g in problem.anti_affinity.of_vm(vm):
            if source >= 0:
                self.group_count[g, source] -= 1
            self.group_count[g, target] += 1
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
        for g in problem.anti_affinity.of_vm(vm):
            self.group_count[g, target] += 1


def _unit_nodes(units: Units, vm_node: np.ndarray) -> np.ndarray:
    first = vm_node[units.vm[units.ptr[:-1]]]
    lo = np.minimum.reduceat(vm_node[units.vm], units.ptr[:-1]) if len(units) else first
    hi = np.maximum.reduceat(vm_node[units.vm], units.ptr[:-1]) if len(units) else first
    return np.where(lo == hi, first, SPLIT).astype(np.int64)


# --- building ----------------------------------------------------------------------------


def _memory_columns(vms: pd.DataFrame, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """(memory counted for fit and balance, fallback) — the only place memory_mode is read."""
    used = vms["memory"].to_numpy(dtype=float)
    assigned = vms["memory_max_bytes"].to_numpy(dtype=float)
    return (assigned, used) if mode == "assigned" else (used, assigned)


def _names(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


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


def build_problem(snapshot: Snapshot, config: Config) -> Problem:
    """Arrays, units and warnings for one snapshot. Pure: the inputs are not modified."""
    balance, rules = config.balance, config.rules
    warnings: list[str] = []
    nodes_frame, vms_frame = snapshot.nodes, snapshot.vms
    resources = RESOURCES
    weights = weight_vector(balance.weights, resources)
    needed = (weights > 0) | np.isin(np.arange(len(resources)), [CPU, MEM])

    # Nodes: capacity, maintenance, which ones count and may receive VMs.
    node_names = tuple(str(n) for n in nodes_frame.index)
    node_pos = {name: i for i, name in enumerate(node_names)}
    raw_capacity = nodes_frame[list(resources)].to_numpy(dtype=float).reshape(-1, len(resources))
    maintenance = nodes_frame["maintenance"].fillna(False).to_numpy(dtype=bool).copy()
    unknown_maintenance = [n for n in rules.maintenance if n not in node_pos]
    if unknown_maintenance:
        warnings.append(f"maintenance names unknown nodes: {_names(unknown_maintenance)}")
    for name in rules.maintenance:
        if name in node_pos:
            maintenance[node_pos[name]] = True
    capacity_ok = np.isfinite(raw_capacity) & (raw_capacity > 0)
    node_known = np.all(capacity_ok | ~needed, axis=1)
    for i in np.flatnonzero(~node_known & ~maintenance):
        missing = [r for j, r in enumerate(resources) if needed[j] and not capacity_ok[i, j]]
        warnings.append(
            f"node {node_names[i]}: capacity unknown ({', '.join(missing)}); its VMs are left "
            "where they are and it receives none"
        )
    capacity = np.where(capacity_ok, raw_capacity, 0.0)
    active = node_known & ~maintenance

    # VMs: where they are, what they weigh, what is unknown.
    vm_names = tuple(str(v) for v in vms_frame.index)
    n_vms = len(vm_names)
    display = tuple(str(v) for v in vms_frame["name"].fillna("").to_numpy()) if n_vms else ()
    vm_node = (
        pd.Index(node_names, dtype=object).get_indexer(vms_frame["node"].astype(str))
        if n_vms
        else np.zeros(0, dtype=np.int64)
    ).astype(np.int64)
    lost = np.flatnonzero(vm_node < 0)
    if len(lost):
        warnings.append(
            f"{len(lost)} VM(s) on nodes missing from the snapshot are ignored: "
            f"{_names([vm_names[i] for i in lost])}"
        )
    load = vms_frame[list(resources)].to_numpy(dtype=float).reshape(-1, len(resources)).copy()
    memory, memory_fallback = _memory_columns(vms_frame, balance.memory_mode)
    load[:, MEM] = memory
    known = np.all(np.isfinite(load[:, needed]), axis=1)
    copy_bytes = vms_frame["memory_max_bytes"].to_numpy(dtype=float).copy()
    copy_bytes = np.where(np.isfinite(copy_bytes), copy_bytes, vms_frame["memory"].to_numpy(float))
    known &= np.isfinite(copy_bytes)
    # A VM of unknown memory still holds memory: count the other column if it is known, and
    # let its node receive nothing when neither is.
    memory_unknown = ~np.isfinite(memory)
    load[:, MEM] = np.where(memory_unknown, memory_fallback, memory)
    memory_blind = memory_unknown & ~np.isfinite(memory_fallback)
    load = np.where(np.isfinite(load), load, 0.0)
    copy_bytes = np.where(np.isfinite(copy_bytes), copy_bytes, 0.0)
    unknown_vms = np.flatnonzero(~known & (vm_node >= 0))
    if len(unknown_vms):
        warnings.append(
            f"{len(unknown_vms)} VM(s) with unknown load or memory are left where they are: "
            f"{_names([vm_names[i] for i in unknown_vms])}"
        )
    node_data_ok = node_known.copy()
    blind_nodes = np.unique(vm_node[memory_blind & (vm_node >= 0)])
    for i in blind_nodes:
        if active[i]:
            warnings.append(
                f"node {node_names[i]}: hosts a VM of unknown memory, so it receives no VM"
            )
        node_data_ok[i] = False
    receivable = node_data_ok & ~maintenance

    # Hysteresis inputs.
    taken_at = snapshot.taken_at.timestamp()
    cooldown = in_cooldown(
        vms_frame["last_migration"].to_numpy(dtype=float), taken_at, balance.cooldown_seconds
    )
    bursting = is_bursting(vms_frame["burst_ratio"].to_numpy(dtype=float), balance.burst_ratio)

    # Node limits, never below where the node starts (an over-full node may not grow).
    start = np.zeros((len(node_names), len(resources)))
    placed = vm_node >= 0
    np.add.at(start, vm_node[placed], load[placed])
    mem_limit = capacity[:, MEM] * (1.0 - balance.memory_reserve_fraction)
    mem_limit = np.where(capacity[:, MEM] > 0, mem_limit - balance.memory_reserve_bytes, 0.0)
    mem_limit = np.maximum(mem_limit, start[:, MEM])
    cpu_limit = np.maximum(capacity[:, CPU] * balance.cpu_headroom, start[:, CPU])

    node_groups: dict[str, tuple[int, ...]] = {}
    for group, members in rules.node_groups.items():
        missing = [m for m in members if m not in node_pos]
        if missing:
            warnings.append(f"node group {group}: unknown nodes {_names(missing)}")
        node_groups[group] = tuple(node_pos[m] for m in members if m in node_pos)

    vm_pos = {name: i for i, name in enumerate(vm_names)}
    units = _build_units(rules, vm_pos, load, copy_bytes, n_vms)
    anti = _build_anti_affinity(rules, vm_pos, units, n_vms, warnings)
    _warn_unknown_rule_vms(rules, vm_pos, warnings)

    return Problem(
        balance=balance,
        rules=rules,
        taken_at=taken_at,
        resources=resources,
        weights=weights,
        nodes=node_names,
        capacity=capacity,
        maintenance=maintenance,
        active=active,
        node_data_ok=node_data_ok,
        receivable=receivable,
        vms=vm_names,
        vm_display=display,
        vm_node=vm_node,
        load=load,
        copy_bytes=copy_bytes,
        known=known,
        cooldown=cooldown,
        bursting=bursting,
        mem_limit=mem_limit,
        cpu_limit=cpu_limit,
        node_groups=node_groups,
        units=units,
        anti_affinity=anti,
        warnings=tuple(warnings),
    )


def _build_units(
    rules: RuleSettings,
    vm_pos: dict[str, int],
    load: np.ndarray,
    copy_bytes: np.ndarray,
    n_vms: int,
) -> Units:
    finder = _UnionFind(n_vms)
    groups_present: list[tuple[str, list[int]]] = []
    for group in rules.affinity:
        present = [vm_pos[v] for v in group.vms if v in vm_pos]
        for other in present[1:]:
            finder.union(present[0], other)
        if len(present) > 1:
            groups_present.append((group.name, present))
    for _, present in groups_present:
        for vm in present:
            finder.find(vm)
    roots = finder.parent
    _, of_vm = np.unique(roots, return_inverse=True)
    of_vm = of_vm.astype(np.int64)
    n_units = int(of_vm.max()) + 1 if n_vms else 0
    order = np.argsort(of_vm, kind="stable")
    size = np.bincount(of_vm, minlength=n_units)
    ptr = np.concatenate([[0], np.cumsum(size)]).astype(np.int64)
    unit_load = np.zeros((n_units, load.shape[1]))
    np.add.at(unit_load, of_vm, load)
    unit_copy = np.bincount(of_vm, weights=copy_bytes, minlength=n_units)
    group_names: dict[int, set[str]] = {}
    for name, present in groups_present:
        group_names.setdefault(int(of_vm[present[0]]), set()).add(name)
    names = {unit: "+".join(sorted(found)) for unit, found in group_names.items()}
    return Units(of_vm, ptr, order.astype(np.int64), size, unit_load, unit_copy, names)


def _build_anti_affinity(
    rules: RuleSettings,
    vm_pos: dict[str, int],
    units: Units,
    n_vms: int,
    warnings: list[str],
) -> AntiAffinityGroups:
    names: list[str] = []
    members: list[np.ndarray] = []
    for group in rules.anti_affinity:
        present = sorted({vm_pos[v] for v in group.vms if v in vm_pos})
        if len(present) < 2:
            continue
        unit_ids = units.of_vm[present]
        if len(np.unique(unit_ids)) < len(unit_ids):
            warnings.append(
                f"anti-affinity {group.name} puts VMs of one affinity group apart; ignored"
            )
            continue
        names.append(group.name)
        members.append(np.array(present, dtype=np.int64))
    pairs = sorted((int(vm), g) for g, vms in enumerate(members) for vm in vms)
    counts = np.bincount([vm for vm, _ in pairs], minlength=n_vms) if pairs else np.zeros(n_vms)
    ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    vm_group = np.array([g for _, g in pairs], dtype=np.int64)
    return AntiAffinityGroups(tuple(names), tuple(members), ptr, vm_group)


def _warn_unknown_rule_vms(
    rules: RuleSettings, vm_pos: dict[str, int], warnings: list[str]
) -> None:
    named = set(rules.pin) | set(rules.exclude)
    for group in (*rules.affinity, *rules.anti_affinity):
        named |= set(group.vms)
    missing = sorted(v for v in named if v not in vm_pos)
    if missing:
        warnings.append(
            f"rules name {len(missing)} VM(s) not in the snapshot (stopped or misspelled): "
            f"{_names(missing)}"
        )


def gib(nbytes: float) -> float:
    return float(nbytes) / GIB
