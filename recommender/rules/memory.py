"""Memory fit: a node receiving a VM keeps its reserve (fraction of the node plus fixed bytes).

The memory counted is the `memory` column of the problem's load matrix, which `build_problem`
fills per `memory_mode` (assigned or used); `Problem.mem_limit` applies the reserve. A node
already above its limit at the start may not grow.
"""

from __future__ import annotations

from recommender.problem import MEM, Problem, gib
from recommender.rules.base import CapacityFit


class MemoryFit(CapacityFit):
    name = "memory"
    column = MEM

    @classmethod
    def prepare(cls, problem: Problem) -> MemoryFit:
        return cls(problem, problem.mem_limit)

    def amount(self, value: float) -> str:
        return f"{gib(value):.1f} GiB"
