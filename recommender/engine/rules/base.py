"""The interface every rule implements, the batch of moving VMs it judges, and its settings.

A rule is one module with one `Constraint` subclass (and, if it reads the `rules:` section
of the config, its own settings model, a `RulesPart`). It is listed once, in `RULES`
(`recommender.engine.rules`); nothing else in the engine names it.

Before the problem exists, a rule may shape it (class methods; the defaults do nothing):

* `evacuated_nodes` — nodes to empty and never fill (besides those the snapshot flags);
* `joined_vms` — groups of VMs that must share a node, so they move as one unit;
* `counted_groups` — groups whose members every state counts per node;
* `node_limits` — per node, the most of one resource it may hold;
* `named_vms` — the VMs its settings name, so unknown ones are reported once for all rules.

Then it is prepared once per problem (`prepare`, None when it does not apply) and answers:

* `allowed_targets(state, movers)` — a (movers x nodes) mask: may each mover go to each node
  *now*, in this state? The engine ANDs the masks of all constraints.
* `check(state, final=...)` — the violations a state has (replays and tests use it).
* `frozen_vms()` / `must_move(state, stuck)` — VMs never moved automatically, units that have
  to move whatever the imbalance; `forced_kind` says what such a move is.
* `migration_budget()` — the most VM migrations a plan may have, if the rule limits it (the
  search never looks further).
* `add_to_model(model)` — the same rule as linear rows for the exact program.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, ClassVar, Literal, Protocol, Self

import numpy as np
from pydantic import BeforeValidator, Field, create_model

from recommender.engine.problem import SPLIT, Problem, State, Units, VmGroup
from recommender.strict_model import StrictModel

if TYPE_CHECKING:
    from recommender.config import BalanceSettings

# What a forced move is: an evacuation (its node goes into maintenance) or the repair of a
# broken rule. A unit several rules force is of the kind listed first here.
ForcedKind = Literal["evacuate", "repair"]
FORCED_KINDS: tuple[ForcedKind, ...] = ("evacuate", "repair")


# --- settings ------------------------------------------------------------------------------


def _as_strings(value: object) -> object:
    if isinstance(value, list):
        return [str(v) for v in value]
    return value


# VMIDs and node names, however YAML typed them (101, yes, 1.5 are names too).
Names = Annotated[list[str], BeforeValidator(_as_strings)]


class GroupRule(StrictModel):
    """A named set of VMs that a rule treats together."""

    name: str
    vms: list[str] = Field(min_length=2)


class RulesPart(StrictModel):
    """A rule's own keys of the `rules:` section; `RuleSettings` derives from every part."""

    @classmethod
    def of(cls, rules: RulesPart) -> Self:
        """This part of the whole `rules:` section."""
        if not isinstance(rules, cls):
            raise TypeError(f"{type(rules).__name__} has no {cls.__name__}")
        return rules

    @classmethod
    def summarise(cls, rules: RulesPart) -> dict[str, object]:
        """What a plan's settings show of this part: the number of entries of each key."""
        part = cls.of(rules)
        return {key: len(getattr(part, key)) for key in cls.model_fields}


def compose_settings(rules: Sequence[type[Constraint]]) -> type[RulesPart]:
    """The `rules:` section: every rule's part, side by side, keys in the order of `rules`."""
    parts = [rule.settings for rule in rules if rule.settings is not None]
    # pydantic lists the fields of the last base first.
    return create_model(
        "RuleSettings",
        __base__=tuple(reversed(parts)) or (RulesPart,),
        __module__=__name__,
        __doc__="Per-VM and per-node rules; VMs are named by their `vm` label (VMID or "
        "domain name).",
    )


# --- the interface -------------------------------------------------------------------------


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


class LinearModel(Protocol):
    """What a rule adds to the exact program (`recommender.engine.exact.LinearModel`): the
    program places `movers`, starting from `start`; `fixed_sets` counts, per counted set and
    node, the members that are not movers."""

    start: State
    movers: Movers
    fixed_sets: np.ndarray

    def forbid_outside(self, mask: np.ndarray) -> None:
        """Remove the moves `mask` (movers x nodes) does not allow; staying stays allowed."""

    def add_node_rows(self, values: np.ndarray, upper: np.ndarray, column: int | None) -> None:
        """Per node n: sum of values[mover] x[mover, n] <= upper[n] minus what the node holds
        of resource `column` besides the movers."""

    def add_budget_row(self, limit: float) -> None:
        """At most `limit` VM migrations in the plan, counting those already made."""

    def require_move(self, movers: np.ndarray) -> None:
        """The movers flagged (bool, movers) may not stay where they are."""


class Constraint:
    """A hard rule. Defaults: shapes nothing, allows everything, freezes and forces nothing;
    `add_to_model` forbids what `allowed_targets` forbids at the start, which is the whole
    rule for static rules."""

    name: ClassVar[str] = "rule"
    settings: ClassVar[type[RulesPart] | None] = None
    forced_kind: ClassVar[ForcedKind] = "repair"

    def __init__(self, problem: Problem) -> None:
        self.problem = problem
        self._warnings: list[str] = []

    # -- shaping the problem -----------------------------------------------------------------

    @classmethod
    def evacuated_nodes(
        cls, rules: RulesPart, node_pos: dict[str, int], warnings: list[str]
    ) -> list[int]:
        return []

    @classmethod
    def joined_vms(cls, rules: RulesPart, vm_pos: dict[str, int]) -> list[VmGroup]:
        return []

    @classmethod
    def counted_groups(
        cls, rules: RulesPart, vm_pos: dict[str, int], units: Units, warnings: list[str]
    ) -> list[VmGroup]:
        return []

    @classmethod
    def node_limits(
        cls, balance: BalanceSettings, capacity: np.ndarray, start: np.ndarray
    ) -> dict[int, np.ndarray]:
        """{resource column: (N,) limit}; `start` (N, R) is what each node holds now."""
        return {}

    @classmethod
    def named_vms(cls, rules: RulesPart) -> set[str]:
        return set()

    # -- the prepared rule -------------------------------------------------------------------

    @classmethod
    def prepare(cls, problem: Problem) -> Self | None:
        return cls(problem)

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

    def migration_budget(self) -> int | None:
        return None

    def add_to_model(self, model: LinearModel) -> None:
        model.forbid_outside(self.allowed_targets(model.start, model.movers))

    def repair_units(self, state: State) -> dict[int, str]:
        """Units whose move may repair this rule where `state` breaks it, with the reason:
        those it forces (`must_move`), and any other unit that could go instead."""
        return self.must_move(state, np.zeros(self.problem.n_vms, dtype=bool))

    def add_repair_to_model(self, model: LinearModel, stuck: np.ndarray) -> None:
        """Rows that make the program's end state keep this rule where `model.start` breaks
        it, so repairs and balancing are chosen together. By default the units the rule
        forces may not stay."""
        must = self.must_move(model.start, stuck)
        if must:
            model.require_move(np.isin(model.movers.units, list(must)))

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


def present(names: Sequence[str], vm_pos: dict[str, int]) -> np.ndarray:
    """Indices of the named VMs that are in the snapshot, in the order named."""
    return np.array([vm_pos[v] for v in names if v in vm_pos], dtype=np.int64)


class CapacityFit(Constraint):
    """A node receiving VMs stays under its limit (`Problem.limits`) of one resource."""

    column: ClassVar[int] = 0
    unit: ClassVar[str] = ""
    tolerance: ClassVar[float] = 1e-9

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem)
        self.limit = problem.limits[:, self.column]

    def amount(self, value: float) -> str:
        return f"{value:.1f} {self.unit}"

    def slack(self) -> np.ndarray:
        slack: np.ndarray = self.tolerance * np.maximum(np.abs(self.limit), 1.0)
        return slack

    def allowed_targets(self, state: State, movers: Movers) -> np.ndarray:
        after = state.node_load[None, :, self.column] + movers.load[:, self.column, None]
        allowed: np.ndarray = after <= (self.limit + self.slack())[None, :]
        return allowed

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
