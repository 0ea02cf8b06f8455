"""From a snapshot, the config and the rules to a `Problem`.

The frames become arrays indexed by node and by VM; unknown values become zeros plus flags
(and warnings), so later stages never see a NaN. This is the one place where
`balance.memory_mode` picks the memory column (through `BalanceSettings.memory_column`):
every later stage (the fit rules, the imbalance, the exact program, the sequencing) reads
`Problem.load`. What a migration copies (`Problem.copy_bytes`) is the estimate of
`recommender.engine.migration_cost`: memory over its pre-copy rounds plus local disks. The
rules shape the problem through the hooks of their `Constraint` class: nodes to evacuate, VMs
that move together, VMs counted per node, per-node limits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from recommender.engine import rules as registry
from recommender.engine.hysteresis import in_cooldown, is_bursting
from recommender.engine.measure import needed_resources, weight_vector
from recommender.engine.migration_cost import migration_facts
from recommender.engine.problem import CountedSets, Problem, Units
from recommender.engine.rules.base import Constraint, RulesPart
from recommender.model import BACKGROUND_COLUMNS, MEM, VM_LOAD_ONLY, Snapshot
from recommender.pressure import PRESSURE_BACKGROUND, pressure_frames
from recommender.resources import PRESSURE, balanced_resources
from recommender.text import and_more

if TYPE_CHECKING:
    from recommender.config import BalanceSettings, Config


@dataclass(frozen=True)
class _Nodes:
    names: tuple[str, ...]
    capacity: np.ndarray  # (N, R), 0 where unknown
    maintenance: np.ndarray  # (N,)
    known: np.ndarray  # (N,) every needed capacity known
    active: np.ndarray  # (N,)
    background: np.ndarray  # (N, R) load besides the VMs, 0 where unknown


@dataclass(frozen=True)
class _Vms:
    names: tuple[str, ...]
    display: tuple[str, ...]
    node: np.ndarray  # (V,) node index, NO_NODE when unknown
    load: np.ndarray  # (V, R), 0 where unknown
    copy_bytes: np.ndarray  # (V,)
    known: np.ndarray  # (V,)
    memory_blind: np.ndarray  # (V,) neither memory column known


def build_problem(
    snapshot: Snapshot, config: Config, rule_types: Sequence[type[Constraint]] | None = None
) -> Problem:
    """Arrays, units and warnings for one snapshot, shaped by `rule_types` (the registered
    `RULES` when None). Pure: the inputs are not modified."""
    kinds = tuple(registry.RULES if rule_types is None else rule_types)
    balance, settings = config.balance, config.rules
    warnings: list[str] = [w for w in snapshot.warnings if w == VM_LOAD_ONLY]
    resources = balanced_resources(balance.weights)
    weights = weight_vector(balance.weights, resources)
    needed = np.isin(resources, needed_resources(balance.weights, resources))
    node_frame, vm_frame = snapshot.nodes, snapshot.vms
    if PRESSURE in resources:
        node_frame, vm_frame = pressure_frames(node_frame, vm_frame, balance.memory_column)
    nodes = _nodes(node_frame, settings, kinds, (resources, needed), warnings)
    vms = _vms(vm_frame, nodes.names, balance, (resources, needed), warnings)
    node_data_ok = _node_data_ok(nodes, vms, warnings)

    taken_at = snapshot.taken_at.timestamp()
    last_migration = snapshot.vms["last_migration"].to_numpy(dtype=float)
    burst_ratio = snapshot.vms["burst_ratio"].to_numpy(dtype=float)

    facts = migration_facts(snapshot.vms, snapshot.nodes, vms.copy_bytes, config.migration)
    vm_pos = {name: i for i, name in enumerate(vms.names)}
    joined = [(rule.name, group) for rule in kinds for group in rule.joined_vms(settings, vm_pos)]
    units = Units.from_groups(joined, vms.load, facts.copy_bytes)
    counted = [
        group for rule in kinds for group in rule.counted_groups(settings, vm_pos, units, warnings)
    ]
    _warn_unknown_rule_vms(kinds, settings, vm_pos, warnings)

    return Problem(
        balance=balance,
        rules=settings,
        rule_types=kinds,
        taken_at=taken_at,
        resources=resources,
        weights=weights,
        nodes=nodes.names,
        capacity=nodes.capacity,
        maintenance=nodes.maintenance,
        active=nodes.active,
        node_data_ok=node_data_ok,
        receivable=node_data_ok & ~nodes.maintenance,
        vms=vms.names,
        vm_display=vms.display,
        vm_node=vms.node,
        load=vms.load,
        copy_bytes=facts.copy_bytes,
        known=vms.known,
        cooldown=in_cooldown(last_migration, taken_at, balance.cooldown_seconds),
        bursting=is_bursting(burst_ratio, balance.burst_ratio),
        limits=_limits(kinds, balance, nodes.capacity, nodes.background, vms),
        background=nodes.background,
        units=units,
        counted=CountedSets.from_groups(counted, len(vms.names)),
        warnings=tuple(warnings),
        migration=facts,
    )


def _nodes(
    frame: pd.DataFrame,
    settings: RulesPart,
    kinds: tuple[type[Constraint], ...],
    measured: tuple[tuple[str, ...], np.ndarray],
    warnings: list[str],
) -> _Nodes:
    """Capacity, maintenance (the snapshot's flag or a rule's), which nodes count."""
    names = tuple(str(n) for n in frame.index)
    node_pos = {name: i for i, name in enumerate(names)}
    resources, needed = measured
    raw = frame[list(resources)].to_numpy(dtype=float).reshape(-1, len(resources))
    maintenance = frame["maintenance"].fillna(False).to_numpy(dtype=bool).copy()
    for rule in kinds:
        maintenance[rule.evacuated_nodes(settings, node_pos, warnings)] = True
    capacity_ok = np.isfinite(raw) & (raw > 0)
    known = np.all(capacity_ok | ~needed, axis=1)
    for i in np.flatnonzero(~known & ~maintenance):
        missing = [r for j, r in enumerate(resources) if needed[j] and not capacity_ok[i, j]]
        warnings.append(
            f"node {names[i]}: capacity unknown ({', '.join(missing)}); its VMs are left "
            "where they are and it receives none"
        )
    capacity = np.where(capacity_ok, raw, 0.0)
    return _Nodes(
        names, capacity, maintenance, known, known & ~maintenance, _background(frame, resources)
    )


def _background(frame: pd.DataFrame, resources: tuple[str, ...]) -> np.ndarray:
    """(N, R) load each node carries besides its VMs: the snapshot's `background_*` columns
    (a frame built without them, or a NaN, counts 0; never negative)."""
    background = np.zeros((len(frame.index), len(resources)))
    columns = {**BACKGROUND_COLUMNS, PRESSURE: PRESSURE_BACKGROUND}
    for resource, column in columns.items():
        if column in frame.columns and resource in resources:
            values = frame[column].to_numpy(dtype=float)
            background[:, resources.index(resource)] = np.where(
                np.isfinite(values) & (values > 0), values, 0.0
            )
    return background


def _vms(
    frame: pd.DataFrame,
    node_names: tuple[str, ...],
    balance: BalanceSettings,
    measured: tuple[tuple[str, ...], np.ndarray],
    warnings: list[str],
) -> _Vms:
    """Where the VMs are, what they weigh, what is unknown."""
    names = tuple(str(v) for v in frame.index)
    display = tuple(str(v) for v in frame["name"].fillna("").to_numpy()) if names else ()
    node = (
        pd.Index(node_names, dtype=object).get_indexer(pd.Index(frame["node"].astype(str)))
        if names
        else np.zeros(0, dtype=np.int64)
    ).astype(np.int64)
    lost = np.flatnonzero(node < 0)
    if len(lost):
        warnings.append(
            f"{len(lost)} VM(s) on nodes missing from the snapshot are ignored: "
            f"{and_more([names[i] for i in lost])}"
        )
    resources, needed = measured
    load = frame[list(resources)].to_numpy(dtype=float).reshape(-1, len(resources)).copy()
    memory_column = balance.memory_column
    other_column = "memory" if memory_column == "memory_max_bytes" else "memory_max_bytes"
    memory = frame[memory_column].to_numpy(dtype=float)
    memory_fallback = frame[other_column].to_numpy(dtype=float)
    load[:, MEM] = memory
    known = np.all(np.isfinite(load[:, needed]), axis=1)
    copy_bytes = frame["memory_max_bytes"].to_numpy(dtype=float).copy()
    copy_bytes = np.where(np.isfinite(copy_bytes), copy_bytes, frame["memory"].to_numpy(float))
    known &= np.isfinite(copy_bytes)
    # A VM of unknown memory still holds memory: count the other column if it is known, and
    # let its node receive nothing when neither is.
    memory_unknown = ~np.isfinite(memory)
    load[:, MEM] = np.where(memory_unknown, memory_fallback, memory)
    memory_blind = memory_unknown & ~np.isfinite(memory_fallback)
    load = np.where(np.isfinite(load), load, 0.0)
    copy_bytes = np.where(np.isfinite(copy_bytes), copy_bytes, 0.0)
    unknown = np.flatnonzero(~known & (node >= 0))
    if len(unknown):
        warnings.append(
            f"{len(unknown)} VM(s) with unknown load or memory are left where they are: "
            f"{and_more([names[i] for i in unknown])}"
        )
    return _Vms(names, display, node, load, copy_bytes, known, memory_blind)


def _node_data_ok(nodes: _Nodes, vms: _Vms, warnings: list[str]) -> np.ndarray:
    """Nodes whose capacity is known and that host no VM of unknown memory."""
    ok = nodes.known.copy()
    for i in np.unique(vms.node[vms.memory_blind & (vms.node >= 0)]):
        if nodes.active[i]:
            warnings.append(
                f"node {nodes.names[i]}: hosts a VM of unknown memory, so it receives no VM"
            )
        ok[i] = False
    return ok


def _limits(
    kinds: tuple[type[Constraint], ...],
    balance: BalanceSettings,
    capacity: np.ndarray,
    background: np.ndarray,
    vms: _Vms,
) -> np.ndarray:
    """(N, R) per-node limits the rules set (inf elsewhere); a rule's limit is never below
    where the node starts, so an over-full node may not grow but need not shrink."""
    start = background.copy()
    placed = vms.node >= 0
    np.add.at(start, vms.node[placed], vms.load[placed])
    limits = np.full(capacity.shape, np.inf)
    for rule in kinds:
        for column, limit in rule.node_limits(balance, capacity, start).items():
            limits[:, column] = np.minimum(limits[:, column], limit)
    return limits


def _warn_unknown_rule_vms(
    kinds: tuple[type[Constraint], ...],
    settings: RulesPart,
    vm_pos: dict[str, int],
    warnings: list[str],
) -> None:
    named: set[str] = set()
    for rule in kinds:
        named |= rule.named_vms(settings)
    missing = sorted(v for v in named if v not in vm_pos)
    if missing:
        warnings.append(
            f"rules name {len(missing)} VM(s) not in the snapshot (stopped or misspelled): "
            f"{and_more(missing)}"
        )
