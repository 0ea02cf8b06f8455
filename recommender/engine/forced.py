"""Forced moves: what the rules make move whatever the imbalance.

Each rule names the units that must move (`Constraint.must_move`: a node being evacuated, a
VM outside its pin, group members sharing a node, a group split over nodes). Largest first,
each goes to the allowed node that leaves the lowest imbalance; a split unit comes together
on the node needing the least copying. One that cannot go anywhere is reported as
unplaceable, with the rules that stopped it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from recommender.engine.problem import SPLIT, Problem, State, UnitMove
from recommender.engine.result import Unplaceable
from recommender.engine.rules import Constraint, Movers, allowed_targets
from recommender.engine.rules.base import FORCED_KINDS, ForcedKind
from recommender.engine.scorer import Scorer
from recommender.text import and_more


@dataclass(frozen=True)
class Frozen:
    """VMs no rule lets move automatically, and the first rule's reason for each."""

    vms: np.ndarray  # (V,) bool
    reasons: dict[int, str]


def frozen_vms(constraints: Sequence[Constraint], n_vms: int) -> Frozen:
    stuck = np.zeros(n_vms, dtype=bool)
    reasons: dict[int, str] = {}
    for constraint in constraints:
        for vm, why in constraint.frozen_vms().items():
            stuck[vm] = True
            reasons.setdefault(vm, why)
    return Frozen(stuck, reasons)


@dataclass(frozen=True)
class ForcedMove:
    move: UnitMove
    reason: str
    kind: ForcedKind


@dataclass(frozen=True)
class Rejoined:
    """One VM of a split unit moving to where the unit comes together."""

    vm: int
    source: int
    target: int


@dataclass
class Forced:
    moves: list[ForcedMove] = field(default_factory=list)
    rejoined: list[Rejoined] = field(default_factory=list)
    unplaceable: list[Unplaceable] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Reason:
    text: str
    kind: ForcedKind


def forced_moves(
    problem: Problem,
    constraints: Sequence[Constraint],
    scorer: Scorer,
    state: State,
    frozen: Frozen,
) -> Forced:
    """Carry out (on `state`) the moves the rules force, largest unit first."""
    units = problem.units
    out = Forced()
    handled: set[int] = set()
    while True:
        must: dict[int, list[_Reason]] = {}
        for constraint in constraints:
            for unit, why in constraint.must_move(state, frozen.vms).items():
                if unit not in handled:
                    must.setdefault(unit, []).append(_Reason(why, constraint.forced_kind))
        if not must:
            break
        unit = min(must, key=lambda u: (-units.copy_bytes[u], u))
        handled.add(unit)
        why = "; ".join(reason.text for reason in must[unit])
        kind = min((reason.kind for reason in must[unit]), key=FORCED_KINDS.index)
        _force(problem, constraints, scorer, state, frozen, unit, why, kind, out)
    return out


def _force(
    problem: Problem,
    constraints: Sequence[Constraint],
    scorer: Scorer,
    state: State,
    frozen: Frozen,
    unit: int,
    why: str,
    kind: ForcedKind,
    out: Forced,
) -> None:
    """Move one unit the rules force, or report it as unplaceable."""
    members = problem.units.members(unit)
    blocked = [int(v) for v in members if frozen.vms[v]]
    if blocked:
        because = frozen.reasons.get(blocked[0], "frozen")
        out.unplaceable.extend(
            _unplaceable(problem, state, members, f"{why}; not moved: {because}")
        )
        return
    if (problem.cooldown | problem.bursting)[members].any():
        why += "; moved despite " + ("cooldown" if problem.cooldown[members].any() else "a burst")
    if state.unit_node[unit] == SPLIT:
        _rejoin(problem, constraints, scorer, state, unit, why, out)
        return
    movers = Movers.of_units(problem, state, np.array([unit]))
    mask = allowed_targets(constraints, state, movers)[0] & problem.receivable
    targets = np.flatnonzero(mask)
    if len(targets) == 0:
        reason = f"{why}; {_diagnose(problem, constraints, state, movers)}"
        out.unplaceable.extend(_unplaceable(problem, state, members, reason))
        return
    view = scorer.view(state.node_load, problem.balance.target)
    k = len(targets)
    overall, smooth, _ = scorer.evaluate(
        view, np.repeat(movers.load, k, axis=0), np.repeat(movers.source, k), targets
    )
    best = int(targets[np.lexsort((targets, smooth, np.round(overall, 9)))[0]])
    source = int(state.unit_node[unit])
    state.move_unit(problem, unit, best)
    out.moves.append(ForcedMove(UnitMove(unit, source, best), why, kind))


@dataclass(frozen=True)
class _Anchor:
    key: tuple[float, float, float, int]  # memory copied, imbalance, smooth, node
    node: int
    part: np.ndarray  # the members not on `node`


def _rejoin(
    problem: Problem,
    constraints: Sequence[Constraint],
    scorer: Scorer,
    state: State,
    unit: int,
    why: str,
    out: Forced,
) -> None:
    """Bring a split unit together on the node needing the least copying."""
    members = problem.units.members(unit)
    best: _Anchor | None = None
    for anchor in sorted({int(n) for n in state.vm_node[members]}):
        if not problem.receivable[anchor]:
            continue
        part = members[state.vm_node[members] != anchor]
        movers = Movers.of_groups(problem, state, [part])
        if not allowed_targets(constraints, state, movers)[0, anchor]:
            continue
        trial = state.copy()
        for vm in part:
            trial.move_vm(problem, int(vm), anchor)
        view = scorer.view(trial.node_load, problem.balance.target)
        key = (float(problem.copy_bytes[part].sum()), round(view.overall, 9), view.smooth, anchor)
        if best is None or key < best.key:
            best = _Anchor(key, anchor, part)
    if best is None:
        nodes = ", ".join(sorted({problem.nodes[n] for n in state.vm_node[members]}))
        label = problem.units.labels.get(unit, "")
        out.warnings.append(f"{label} cannot be brought together (on {nodes}); {why}")
        stranded = members[problem.maintenance[state.vm_node[members]]]
        reason = f"{why}; {label} cannot be brought together"
        out.unplaceable.extend(_unplaceable(problem, state, stranded, reason))
        return
    for vm in best.part:
        source = int(state.vm_node[vm])
        state.move_vm(problem, int(vm), best.node)
        out.rejoined.append(Rejoined(int(vm), source, best.node))
    out.moves.append(ForcedMove(UnitMove(unit, SPLIT, best.node), why, "repair"))


def _diagnose(
    problem: Problem, constraints: Sequence[Constraint], state: State, movers: Movers
) -> str:
    """Which rules rule out which nodes for a single mover."""
    blocked: dict[str, list[str]] = {}
    source = int(movers.source[0])
    seen = np.zeros(problem.n_nodes, dtype=bool)
    if source >= 0:
        seen[source] = True
    for constraint in constraints:
        mask = constraint.allowed_targets(state, movers)[0]
        newly = ~mask & ~seen
        if newly.any():
            blocked[constraint.name] = [problem.nodes[n] for n in np.flatnonzero(newly)]
        seen |= ~mask
    if not blocked:
        return "no node to go to"
    parts = [f"{name} ({and_more(nodes, limit=4)})" for name, nodes in blocked.items()]
    return "no node can take it: " + "; ".join(parts)


def _unplaceable(
    problem: Problem, state: State, members: np.ndarray, reason: str
) -> list[Unplaceable]:
    return [
        Unplaceable(problem.vms[v], problem.vm_display[v], problem.nodes[state.vm_node[v]], reason)
        for v in members
    ]
