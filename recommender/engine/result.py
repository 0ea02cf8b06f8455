"""What the engine hands on: VM moves, VMs it could not place, moves it held back, and the
imbalance before and after."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from recommender.engine.problem import Problem, UnitMove

# Why a VM moves: to balance, to empty a node going into maintenance, to repair a broken rule.
MoveKind = Literal["balance", "evacuate", "repair"]
# How the balancing moves were found: no balancing, the search, the exact program.
Method = Literal["none", "heuristic", "exact"]


@dataclass(frozen=True)
class Move:
    """One VM migration."""

    vm: str
    name: str
    source: str
    target: str
    gain: float  # how much higher the plan's overall imbalance would end without this move
    reason: str
    memory_bytes: float  # the VM's assigned memory
    kind: MoveKind
    group: str | None = None  # name of the group of VMs moved as one unit
    copy_bytes: float = 0.0  # estimated bytes transferred: memory pre-copy + local disks
    duration_seconds: float = 0.0  # estimated duration at migration.bandwidth
    local_disk_bytes: float = 0.0  # local disks copied with it (--with-local-disks)
    ha_managed: bool = False  # moved through the HA stack (ha-manager migrate)


@dataclass(frozen=True)
class Unplaceable:
    vm: str
    name: str
    node: str
    reason: str


# What hysteresis (not a rule) holds a move back for.
HYSTERESIS_REASONS = frozenset({"min_gain", "cooldown", "burst"})


@dataclass(frozen=True)
class HeldBack:
    """A move that would have lowered the imbalance, and what stopped it."""

    vm: str
    source: str
    target: str
    gain: float
    blocked_by: tuple[str, ...]
    # The gain the move needed to pass hysteresis (`min_gain` + `min_gain_per_gib` x GiB).
    needed: float = math.nan

    @property
    def by_rule(self) -> bool:
        """Stopped by a rule or a node's room, not only by hysteresis."""
        return any(reason not in HYSTERESIS_REASONS for reason in self.blocked_by)


@dataclass(frozen=True)
class FrontierPoint:
    """The best plan known with at most `migrations` VM migrations."""

    migrations: int
    imbalance: float  # its overall imbalance
    lower_bound: float  # no plan of this many migrations does better (proven)
    memory_bytes: float  # memory its migrations copy
    exact: bool  # imbalance == lower_bound: the optimum for this many migrations
    moves: tuple[UnitMove, ...] = field(default=(), repr=False)  # from the frontier's start


@dataclass(frozen=True)
class Frontier:
    points: tuple[FrontierPoint, ...]
    knee: int  # migrations of the knee point (0: no migration pays)

    def at(self, migrations: int) -> FrontierPoint | None:
        """The point for exactly `migrations` (points may start above 1 where repairs need
        more migrations than that)."""
        return next((p for p in self.points if p.migrations == migrations), None)


@dataclass
class EngineResult:
    moves: list[Move]
    unplaceable: list[Unplaceable]
    held_back: list[HeldBack]
    imbalance_before: dict[str, float]
    imbalance_after: dict[str, float]
    overall_before: float
    overall_after: float
    triggered: bool  # the imbalance was above the trigger, so balancing ran
    target_reached: bool
    warnings: list[str]
    method: Method
    problem: Problem = field(repr=False)
    unit_moves: tuple[UnitMove, ...] = field(default=(), repr=False)
    # What k migrations could reach, k = 1, 2, ... (`recommender.engine.frontier`).
    frontier: Frontier | None = None

    @property
    def migrations(self) -> int:
        return len(self.moves)

    @property
    def memory_bytes(self) -> float:
        return float(sum(m.memory_bytes for m in self.moves))
