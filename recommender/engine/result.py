"""What the engine hands on: VM moves, VMs it could not place, moves it held back, and the
imbalance before and after."""

from __future__ import annotations

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
    memory_bytes: float  # memory the migration copies (assigned memory)
    kind: MoveKind
    group: str | None = None  # name of the group of VMs moved as one unit


@dataclass(frozen=True)
class Unplaceable:
    vm: str
    name: str
    node: str
    reason: str


@dataclass(frozen=True)
class HeldBack:
    """A move that would have lowered the imbalance, and what stopped it."""

    vm: str
    source: str
    target: str
    gain: float
    blocked_by: tuple[str, ...]


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
