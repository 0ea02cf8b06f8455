"""Seeded random clusters for tests and benchmarks.

Nodes of uneven size (16 to 96 cores, 128 to 768 GiB, 10 or 25 GbE), VMs with heavy-tailed
disk I/O (a Pareto tail: a few VMs do most of the Ceph traffic), a skewed initial placement
that respects memory and CPU limits, and optionally random rules that the placement already
satisfies (pins, exclusions, affinity and anti-affinity groups, a maintenance node), VMs in
cooldown or bursting, and missing data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import pandas as pd

from recommender.config import BalanceSettings, Config
from recommender.engine.rules import RuleSettings
from recommender.engine.rules.base import GroupRule
from recommender.model import GIB, RESOURCES, Snapshot, empty_nodes

# cores, memory GiB, NIC bytes/s (also the storage path), disk ops/s
NODE_TYPES = (
    (16, 128, 1.25e9, 40_000.0),
    (32, 256, 1.25e9, 60_000.0),
    (48, 384, 3.125e9, 80_000.0),
    (64, 512, 3.125e9, 100_000.0),
    (96, 768, 3.125e9, 120_000.0),
)
VM_MEMORY_GIB = np.array([2, 4, 8, 16, 32])
VM_MEMORY_P = np.array([0.25, 0.3, 0.25, 0.15, 0.05])
TAKEN_AT = datetime(2024, 6, 3, 12, 0, tzinfo=UTC)


@dataclass(frozen=True)
class Instance:
    snapshot: Snapshot
    config: Config
    seed: int
    notes: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Shape:
    """What to generate; every count is a (low, high) range drawn per instance."""

    nodes: tuple[int, int] = (3, 8)
    vms: tuple[int, int] = (10, 40)
    rules: bool = True
    maintenance: float = 0.0  # probability of one maintenance node
    cooldown: float = 0.0  # fraction of VMs migrated within the cooldown
    burst: float = 0.0  # fraction of VMs bursting
    missing: float = 0.0  # fraction of VMs with an unknown load
    skew: float = 2.0  # Dirichlet concentration of the placement (lower: more skewed)
    memory_fill: float = 0.5  # assigned memory over usable memory, cluster-wide
    balance: dict[str, object] = field(default_factory=dict)


def random_cluster(seed: int, shape: Shape | None = None) -> Instance:
    shape = shape or Shape()
    rng = np.random.default_rng(seed)
    n_nodes = int(rng.integers(shape.nodes[0], shape.nodes[1] + 1))
    n_vms = int(rng.integers(shape.vms[0], shape.vms[1] + 1))
    balance = BalanceSettings(**shape.balance)  # type: ignore[arg-type]

    names, capacity = _node_capacities(rng, n_nodes)
    # VMs: memory first (what must fit), then loads, rescaled to a random cluster utilisation.
    usable = capacity[:, 1] * (1 - balance.memory_reserve_fraction) - balance.memory_reserve_bytes
    assigned, used = _vm_memory(rng, n_vms, usable, shape.memory_fill)
    loads = _vm_loads(rng, n_vms, capacity)

    # Placement: skewed by a Dirichlet draw, within memory and CPU limits.
    share = rng.dirichlet(np.full(n_nodes, shape.skew)) * capacity[:, 1]
    share = share / share.sum()
    node_of = _place(rng, share, assigned, loads["cpu"], usable, capacity[:, 0] * 0.85)
    loads = _fit_rates(rng, loads, node_of, capacity)
    vms = _vm_frame(rng, names, node_of, loads, used, assigned)
    nodes = _node_frame(names, capacity)

    notes = _perturb(rng, vms, shape, balance)
    rules = _rules(rng, names, vms) if shape.rules else RuleSettings()
    if shape.maintenance > 0 and rng.random() < shape.maintenance and n_nodes > 2:
        down = names[int(rng.integers(n_nodes))]
        nodes.loc[down, "maintenance"] = True
        notes["maintenance"] = 1
    config = Config(balance=balance, rules=rules)
    snapshot = Snapshot(nodes=nodes, vms=vms, taken_at=TAKEN_AT, source="instances")
    return Instance(snapshot, config, seed, notes)


def _node_capacities(rng: np.random.Generator, n_nodes: int) -> tuple[list[str], np.ndarray]:
    """Node names and their capacities (one column per resource): uneven sizes."""
    kinds = rng.integers(0, len(NODE_TYPES), size=n_nodes)
    spec = np.array([NODE_TYPES[k] for k in kinds], dtype=float)
    names = [f"pve{i + 1}" for i in range(n_nodes)]
    capacity = np.column_stack([spec[:, 0], spec[:, 1] * GIB, spec[:, 2], spec[:, 3], spec[:, 2]])
    return names, capacity


def _vm_memory(
    rng: np.random.Generator, n_vms: int, usable: np.ndarray, memory_fill: float
) -> tuple[np.ndarray, np.ndarray]:
    """Assigned and used memory of each VM, the assigned total near `memory_fill` of `usable`."""
    assigned = rng.choice(VM_MEMORY_GIB, size=n_vms, p=VM_MEMORY_P) * float(GIB)
    scale = memory_fill * usable.sum() / assigned.sum()
    if scale < 1:  # too many VMs for the memory: shrink them (keeps the count)
        assigned = np.maximum(np.round(assigned * scale / GIB), 1) * GIB
    used = assigned * rng.uniform(0.3, 0.95, size=n_vms)
    return assigned, used


def _vm_loads(rng: np.random.Generator, n_vms: int, capacity: np.ndarray) -> dict[str, np.ndarray]:
    """CPU, disk and network load of each VM, rescaled to a random cluster utilisation."""
    vcpus = rng.choice([1, 2, 4, 8], size=n_vms, p=[0.3, 0.35, 0.25, 0.1])
    cpu = vcpus * rng.uniform(0.05, 0.6, size=n_vms)
    disk_bytes = 2e6 * (rng.pareto(2.0, size=n_vms) + 0.3)
    disk_ops = disk_bytes / rng.uniform(8e3, 64e3, size=n_vms)
    network = rng.lognormal(np.log(4e6), 0.9, size=n_vms)
    loads = {"cpu": cpu, "disk_bytes": disk_bytes, "disk_ops": disk_ops, "network": network}
    for j, r in enumerate(RESOURCES):
        if r in loads:
            target = rng.uniform(0.2, 0.55) if r != "cpu" else rng.uniform(0.15, 0.4)
            loads[r] = loads[r] * target * capacity[:, j].sum() / loads[r].sum()
    return loads


def _fit_rates(
    rng: np.random.Generator,
    loads: dict[str, np.ndarray],
    node_of: np.ndarray,
    capacity: np.ndarray,
) -> dict[str, np.ndarray]:
    """Measured rates cannot exceed what a node moves: scale each rate so the busiest node
    runs at 60-97% of it (the cluster mean follows from the placement)."""
    keep = node_of >= 0
    fitted = dict(loads)
    for j, r in enumerate(RESOURCES):
        if r in fitted and r != "cpu":
            per_node = np.bincount(node_of[keep], weights=fitted[r][keep], minlength=len(capacity))
            peak = (per_node / capacity[:, j]).max()
            if peak > 0:
                fitted[r] = fitted[r] * rng.uniform(0.6, 0.97) / peak
    return fitted


def _vm_frame(
    rng: np.random.Generator,
    names: list[str],
    node_of: np.ndarray,
    loads: dict[str, np.ndarray],
    used: np.ndarray,
    assigned: np.ndarray,
) -> pd.DataFrame:
    """The VM frame of the placed VMs (those `_place` found no node for are left out)."""
    n_vms = len(node_of)
    vm_names = [str(100 + i) for i in range(n_vms)]
    frame = pd.DataFrame(
        {
            "name": [f"vm-{v}" for v in vm_names],
            "node": [names[n] if n >= 0 else "" for n in node_of],
            "cpu": loads["cpu"],
            "memory": used,
            "disk_bytes": loads["disk_bytes"],
            "disk_ops": loads["disk_ops"],
            "network": loads["network"],
            "memory_max_bytes": assigned,
            "burst_ratio": rng.uniform(0.8, 1.6, size=n_vms),
            "last_migration": np.nan,
        },
        index=pd.Index(vm_names, name="vm"),
    )[node_of >= 0]
    return frame.copy()


def _node_frame(names: list[str], capacity: np.ndarray) -> pd.DataFrame:
    nodes = empty_nodes()
    for i, name in enumerate(names):
        nodes.loc[name] = [*capacity[i], False, ""]
    nodes["maintenance"] = nodes["maintenance"].astype(bool)
    return nodes


def _perturb(
    rng: np.random.Generator, vms: pd.DataFrame, shape: Shape, balance: BalanceSettings
) -> dict[str, int]:
    """Marks VMs in cooldown, bursting or without data, in place; how many of each."""
    marks = (
        ("cooldown", shape.cooldown, _mark_cooldown),
        ("burst", shape.burst, _mark_burst),
        ("missing", shape.missing, _mark_missing),
    )
    notes: dict[str, int] = {}
    for note, fraction, mark in marks:
        if fraction > 0:
            notes[note] = mark(rng, vms, fraction, balance)
    return notes


def _mark_cooldown(
    rng: np.random.Generator, vms: pd.DataFrame, fraction: float, balance: BalanceSettings
) -> int:
    """Some VMs migrated within the cooldown, some others longer ago."""
    taken = TAKEN_AT.timestamp()
    hit = rng.random(len(vms)) < fraction
    vms.loc[hit, "last_migration"] = taken - rng.uniform(0, balance.cooldown_seconds, hit.sum())
    old = ~hit & (rng.random(len(vms)) < 0.3)
    vms.loc[old, "last_migration"] = taken - balance.cooldown_seconds * rng.uniform(
        1.5, 4, old.sum()
    )
    return int(hit.sum())


def _mark_burst(
    rng: np.random.Generator, vms: pd.DataFrame, fraction: float, balance: BalanceSettings
) -> int:
    hit = rng.random(len(vms)) < fraction
    vms.loc[hit, "burst_ratio"] = rng.uniform(balance.burst_ratio, 8.0, hit.sum())
    return int(hit.sum())


def _mark_missing(
    rng: np.random.Generator, vms: pd.DataFrame, fraction: float, balance: BalanceSettings
) -> int:
    """One column unknown for some VMs."""
    hit = rng.random(len(vms)) < fraction
    column = rng.choice(["disk_bytes", "network", "memory_max_bytes"])
    vms.loc[hit, column] = np.nan
    return int(hit.sum())


def _place(
    rng: np.random.Generator,
    share: np.ndarray,
    memory: np.ndarray,
    cpu: np.ndarray,
    memory_limit: np.ndarray,
    cpu_limit: np.ndarray,
) -> np.ndarray:
    """Node of each VM drawn from `share`; VMs that do not fit go to the node with the most
    free memory that takes them, or nowhere (-1)."""
    n = len(memory)
    node_of = rng.choice(len(share), size=n, p=share)
    order = rng.permutation(n)
    mem_used = np.zeros(len(share))
    cpu_used = np.zeros(len(share))
    # Fast path: VMs whose drawn node still fits, in a random order.
    sorted_vms = order[np.argsort(node_of[order], kind="stable")]
    out = np.full(n, -1)
    leftovers = []
    for node in range(len(share)):
        mine = sorted_vms[node_of[sorted_vms] == node]
        fits = (np.cumsum(memory[mine]) <= memory_limit[node]) & (
            np.cumsum(cpu[mine]) <= cpu_limit[node]
        )
        ok = mine[fits]
        out[ok] = node
        mem_used[node] = memory[ok].sum()
        cpu_used[node] = cpu[ok].sum()
        leftovers.extend(mine[~fits].tolist())
    for vm in sorted(leftovers):
        free = memory_limit - mem_used
        room = (free >= memory[vm]) & (cpu_limit - cpu_used >= cpu[vm])
        if room.any():
            node = int(np.flatnonzero(room)[np.argmax(free[room])])
            out[vm] = node
            mem_used[node] += memory[vm]
            cpu_used[node] += cpu[vm]
    return out


@dataclass
class _Draw:
    """Draws VMs for random rules, each VM for one rule at most."""

    rng: np.random.Generator
    ids: list[str]
    where: dict[str, str]
    taken: set[str] = field(default_factory=set)

    def free(self) -> list[str]:
        return [v for v in self.ids if v not in self.taken]

    def pick(self, count: int) -> list[str]:
        """Up to `count` free VMs, anywhere."""
        free = self.free()
        if not free or count <= 0:
            return []
        chosen = self.rng.choice(len(free), size=min(count, len(free)), replace=False)
        members = [free[i] for i in chosen]
        self.taken.update(members)
        return members

    def apart(self, size: int) -> list[str]:
        """Up to `size` free VMs on distinct nodes; taken only if there are two or more."""
        free = self.free()
        self.rng.shuffle(free)
        members: list[str] = []
        used_nodes: set[str] = set()
        for vm in free:
            node = self.where[vm]
            if node not in used_nodes:
                members.append(vm)
                used_nodes.add(node)
            if len(members) == size:
                break
        if len(members) < 2:
            return []
        self.taken.update(members)
        return members

    def together(self) -> list[str]:
        """Two free VMs on one node, or none when no node has two."""
        by_node: dict[str, list[str]] = {}
        for vm in self.free():
            by_node.setdefault(self.where[vm], []).append(vm)
        pairs = [members for members in by_node.values() if len(members) >= 2]
        if not pairs:
            return []
        members = pairs[int(self.rng.integers(len(pairs)))][:2]
        self.taken.update(members)
        return members


def _rules(rng: np.random.Generator, names: list[str], vms: pd.DataFrame) -> RuleSettings:
    """Random rules the placement already satisfies."""
    ids = list(vms.index)
    half = max(1, len(names) // 2)
    groups = {"rack-a": names[:half], "rack-b": names[half:] or names[:1]}
    rack = {node: ("rack-a" if node in groups["rack-a"] else "rack-b") for node in names}
    scale = max(1, min(len(ids) // 40, 25))
    draw = _Draw(rng, ids, dict(zip(ids, vms["node"].to_numpy(), strict=True)))

    pin: dict[str, str] = {}
    for vm in draw.pick(int(rng.integers(0, 2 * scale + 1))):
        node = draw.where[vm]
        pin[vm] = node if rng.random() < 0.4 else rack[node]
    exclude = draw.pick(int(rng.integers(0, scale + 1)))
    anti: list[GroupRule] = []
    for g in range(int(rng.integers(0, scale + 2))):
        members = draw.apart(int(rng.integers(2, 4)))
        if members:
            anti.append(GroupRule(name=f"anti{g}", vms=members))
    affinity: list[GroupRule] = []
    for g in range(int(rng.integers(0, scale + 1))):
        members = draw.together()
        if not members:
            break
        affinity.append(GroupRule(name=f"aff{g}", vms=members))
    return RuleSettings(
        node_groups=groups, pin=pin, exclude=exclude, affinity=affinity, anti_affinity=anti
    )


@dataclass(frozen=True)
class HeavyShape:
    """Heavy-tailed clusters: a few whale VMs that dominate I/O and CPU, uneven nodes (as
    `Shape`), and rules already broken at the start."""

    base: Shape = field(default_factory=lambda: Shape(skew=0.8, rules=True))
    whales: tuple[int, int] = (1, 4)  # whale VMs per instance
    whale_factor: tuple[float, float] = (8.0, 30.0)  # their load over a typical VM's
    broken_anti_affinity: int = 1  # groups whose members already share a node
    broken_affinity: int = 1  # groups already split over two nodes


def heavy_tailed_cluster(seed: int, shape: HeavyShape | None = None) -> Instance:
    """`random_cluster(seed, shape.base)` with whales and broken rules added on top (its own
    random stream, so the base generator's output for a seed is unchanged)."""
    shape = shape or HeavyShape()
    base = random_cluster(seed, shape.base)
    rng = np.random.default_rng([seed, 0x48454156])
    vms = base.snapshot.vms.copy()
    notes = dict(base.notes)
    whales = _whales(rng, vms, shape)
    _cap_rates(rng, vms, base.snapshot.nodes)
    notes["whales"] = len(whales)
    rules = base.config.rules
    named = _named_vms(rules)
    anti = list(rules.anti_affinity) + _broken_anti_affinity(rng, vms, named, shape)
    named |= {vm for group in anti for vm in group.vms}
    affinity = list(rules.affinity) + _broken_affinity(rng, vms, named, shape)
    notes["broken_anti_affinity"] = len(anti) - len(rules.anti_affinity)
    notes["broken_affinity"] = len(affinity) - len(rules.affinity)
    broken = rules.model_copy(update={"anti_affinity": anti, "affinity": affinity})
    config = Config(balance=base.config.balance, rules=broken)
    snapshot = Snapshot(nodes=base.snapshot.nodes, vms=vms, taken_at=TAKEN_AT, source="instances")
    return Instance(snapshot, config, seed, notes)


def _whales(rng: np.random.Generator, vms: pd.DataFrame, shape: HeavyShape) -> list[str]:
    """Scale the I/O, network and CPU of a few VMs up to whale size (in place)."""
    count = min(int(rng.integers(shape.whales[0], shape.whales[1] + 1)), len(vms))
    chosen = [str(v) for v in rng.choice(vms.index.to_numpy(), size=count, replace=False)]
    for column in ("disk_bytes", "disk_ops", "network", "cpu"):
        typical = float(vms[column].median())
        factor = rng.uniform(*shape.whale_factor, size=count)
        vms.loc[chosen, column] = np.maximum(vms.loc[chosen, column].to_numpy(), typical * factor)
    return chosen


def _cap_rates(rng: np.random.Generator, vms: pd.DataFrame, nodes: pd.DataFrame) -> None:
    """Measured rates cannot exceed what a node moves: scale each down (in place) so the
    busiest node runs at 60-97% of it."""
    for column in ("disk_bytes", "disk_ops", "network", "cpu"):
        per_node = vms.groupby("node")[column].sum()
        peak = float((per_node / nodes.loc[per_node.index, column]).max())
        ceiling = rng.uniform(0.6, 0.97)
        if peak > ceiling:
            vms[column] = vms[column] * ceiling / peak


def _named_vms(rules: RuleSettings) -> set[str]:
    named = set(rules.pin) | set(rules.exclude)
    for group in [*rules.anti_affinity, *rules.affinity]:
        named |= set(group.vms)
    return named


def _broken_anti_affinity(
    rng: np.random.Generator, vms: pd.DataFrame, named: set[str], shape: HeavyShape
) -> list[GroupRule]:
    """Groups of two free VMs that already share a node."""
    out: list[GroupRule] = []
    for g in range(shape.broken_anti_affinity):
        free = vms[~vms.index.isin(list(named))]
        crowded = [n for n, count in free["node"].value_counts().items() if count >= 2]
        if not crowded:
            break
        node = crowded[int(rng.integers(len(crowded)))]
        here = free.index[free["node"] == node].to_numpy()
        members = [str(v) for v in rng.choice(here, size=2, replace=False)]
        named.update(members)
        out.append(GroupRule(name=f"broken-anti{g}", vms=members))
    return out


def _broken_affinity(
    rng: np.random.Generator, vms: pd.DataFrame, named: set[str], shape: HeavyShape
) -> list[GroupRule]:
    """Groups of two free VMs on different nodes."""
    out: list[GroupRule] = []
    for g in range(shape.broken_affinity):
        free = vms[~vms.index.isin(list(named))]
        if free["node"].nunique() < 2:
            break
        first = str(free.index[int(rng.integers(len(free)))])
        others = free.index[free["node"] != free.loc[first, "node"]].to_numpy()
        second = str(others[int(rng.integers(len(others)))])
        named.update((first, second))
        out.append(GroupRule(name=f"broken-aff{g}", vms=[first, second]))
    return out
