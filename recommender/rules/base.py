"""The constraint interface every rule implements, and the batch of moving VMs it judges.

A constraint is prepared once per problem (`prepare`), then answers four questions:

* `allowed_targets(state, movers)` — a (movers x nodes) mask: may each mover go to each node
  *now*, in this state? The engine ANDs the masks of all constraints.
* `check(state, final=...)` — the violations a state has (replays and tests use it).
* `frozen_vms()` / `must_move(state, stuck)` — VMs never moved automatically, units that have
  to move whatever the imbalance (evacuation, repair of a broken rule).
* `add_to_model(model)` — the same rule as linear rows for the exact solver.

Adding a rule means adding a module with one such class and listing it in the registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol

import numpy as np

from recommender.problem import SPLIT, Problem, State

if TYPE_CHECKING:
    from recommender.exact import LinearModel


@dataclass(frozen=True)
class Violation:
    rule: str
    subject: str  # the node, VM or group concerned
    detail: str


@dataclass(frozen=True)
class Movers:
    """A batch of things that move as one: whole units, single VMs or parts of a unit."""

    ptr: np.ndarray  # (k+1,) offsets into `vm`
    vm: np.ndarray  # VMs of every mover, concatenated
    load: np.ndarray  # (k, R) summed load
    source: np.ndarray  # (k,) the node it leaves (SPLIT / NO_NODE possible for units)
    count: np.ndarray  # (k,) VM migrations the move costs
    units: np.ndarray  # (k,) unit of each mover

    def __len__(self) -> int:
        return len(self.count)

    @property
    def owner(self) -> np.ndarray:
        """Mover index of every entry of `vm`."""
        return np.repeat(np.arange(len(self)), np.diff(self.ptr))

    @classmethod
    def of_units(cls, problem: Problem, state: State, units: np.ndarray) -> Movers:
        units = np.asarray(units, dtype=np.int64)
        table = problem.units
        sizes = table.size[units]
        ptr = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        offsets = np.arange(ptr[-1]) - np.repeat(ptr[:-1], sizes)
        vm = table.vm[np.repeat(table.ptr[units], sizes) + offsets]
        return cls(
            ptr, vm, table.load[units], state.unit_node[units], sizes.astype(np.int64), units
        )

    @classmethod
    def of_groups(cls, problem: Problem, state: State, groups: list[np.ndarray]) -> Movers:
        """One mover per group of VMs (each group part of one unit, e.g. joining the rest)."""
        sizes = np.array([len(g) for g in groups], dtype=np.int64)
        ptr = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        vm = np.concatenate(groups).astype(np.int64) if groups else np.zeros(0, np.int64)
        load = np.zeros((len(groups), problem.load.shape[1]))
        owner = np.repeat(np.arange(len(groups)), sizes)
        np.add.at(load, owner, problem.load[vm])
        nodes = state.vm_node[vm]
        lo = np.full(len(groups), np.iinfo(np.int64).max)
        hi = np.full(len(groups), np.iinfo(np.int64).min)
        np.minimum.at(lo, owner, nodes)
        np.maximum.at(hi, owner, nodes)
        source = np.where(lo == hi, lo, SPLIT)
        first = problem.units.of_vm[vm[ptr[:-1]]] if len(vm) else np.zeros(0, np.int64)
        return cls(ptr, vm, load, source, sizes, first)


class Constraint(Protocol):
    name: ClassVar[str]

    @classmethod
    def prepare(cls, problem: Problem) -> Constraint | None: ...

    def allowed_targets(self, state: State, movers: Movers) -> np.ndarray: ...

    def check(self, state: State, *, final: bool = False) -> list[Violation]: ...

    def frozen_vms(self) -> dict[int, str]: ...

    def must_move(self, state: State, stuck: np.ndarray) -> dict[int, str]: ...

    def add_to_model(self, model: LinearModel) -> None: ...

    @property
    def warnings(self) -> list[str]: ...


class BaseConstraint:
    """Defaults: allows everything, freezes nothing, forces nothing; static rules get
    `add_to_model` for free by forbidding what `allowed_targets` forbids at the start."""

    name: ClassVar[str] = "rule"

    def __init__(self, problem: Problem) -> None:
        self.problem = problem
        self._warnings: list[str] = []

    @property
    def warnings(self) -> list[str]:
        return self._warnings

    def all_nodes(self, movers: Movers) -> np.ndarray:
        return np.ones((len(movers), self.problem.n_nodes), dtype=bool)

    def allowed_targets(self, state: State, movers: Movers) -> np.ndarray:
        return self.all_nodes(movers)

    def check(self, state: State, *, final: bool = False) -> list[Violation]:
        return []

    def frozen_vms(self) -> dict[int, str]:
        return {}

    def must_move(self, state: State, stuck: np.ndarray) -> dict[int, str]:
        """Units that have to move, with the reason; `stuck` (V,) marks VMs that cannot."""
        return {}

    def add_to_model(self, model: LinearModel) -> None:
        model.forbid_outside(self.allowed_targets(model.start, model.movers))

    def moved_vms(self, state: State) -> np.ndarray:
        """VMs no longer on the node they started on."""
        return np.flatnonzero(state.vm_node != self.problem.vm_node)


def rows_with_any(movers: Movers, flagged: np.ndarray) -> np.ndarray:
    """(k,) bool: movers holding at least one VM where `flagged` (V,) is true."""
    hit = flagged[movers.vm]
    out = np.zeros(len(movers), dtype=bool)
    if hit.any():
        out[movers.owner[hit]] = True
    return out


class CapacityFit(BaseConstraint):
    """A node receiving VMs stays under a per-node limit of one resource column."""

    column: ClassVar[int] = 0
    unit: ClassVar[str] = ""
    tolerance: ClassVar[float] = 1e-9

    def __init__(self, problem: Problem, limit: np.ndarray) -> None:
        super().__init__(problem)
        self.limit = limit

    def amount(self, value: float) -> str:
        return f"{value:.1f} {self.unit}"

    def slack(self) -> np.ndarray:
        return self.tolerance * np.maximum(np.abs(self.limit), 1.0)

    def allowed_targets(self, state: State, movers: Movers) -> np.ndarray:
        after = state.node_load[None, :, self.column] + movers.load[:, self.column, None]
        return after <= (self.limit + self.slack())[None, :]

    def check(self, state: State, *, final: bool = False) -> list[Violation]:
        over = np.flatnonzero(state.node_load[:, self.column] > self.limit + self.slack())
        return [
            Violation(
                self.name,
                self.problem.nodes[n],
                f"holds {self.amount(state.node_load[n, self.column])}, "
                f"more than the {self.amount(self.limit[n])} allowed",
            )
            for n in over
        ]

    def add_to_model(self, model: LinearModel) -> None:
        model.add_node_rows(
            model.movers.load[:, self.column], self.limit + self.slack(), self.column
        )
