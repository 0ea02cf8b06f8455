"""Memory fit: a node receiving a VM keeps its reserve (fraction of the node plus fixed bytes).

The memory counted is the `memory` column of the problem's load matrix, which
`build_problem` fills per `balance.memory_mode` (assigned or used). A node already above its
limit at the start may not grow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from recommender.engine.rules.base import CapacityFit
from recommender.resources import MEM
from recommender.text import in_gib

if TYPE_CHECKING:
    from recommender.config import BalanceSettings


class MemoryFit(CapacityFit):
    name = "memory"
    column = MEM

    @classmethod
    def node_limits(
        cls, balance: BalanceSettings, capacity: np.ndarray, start: np.ndarray
    ) -> dict[int, np.ndarray]:
        memory = capacity[:, MEM]
        limit = memory * (1.0 - balance.memory_reserve_fraction)
        limit = np.where(memory > 0, limit - balance.memory_reserve_bytes, 0.0)
        return {MEM: np.maximum(limit, start[:, MEM])}

    def amount(self, value: float) -> str:
        return in_gib(value)
