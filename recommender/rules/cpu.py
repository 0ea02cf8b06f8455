"""CPU headroom: a node receiving a VM stays under `cpu_headroom` x its cores."""

from __future__ import annotations

from recommender.problem import CPU, Problem
from recommender.rules.base import CapacityFit


class CpuHeadroom(CapacityFit):
    name = "cpu"
    column = CPU
    unit = "cores"

    @classmethod
    def prepare(cls, problem: Problem) -> CpuHeadroom:
        return cls(problem, problem.cpu_limit)
