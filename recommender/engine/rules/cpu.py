"""CPU headroom: a node receiving a VM stays under `cpu_headroom` x its cores."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from recommender.engine.rules.base import CapacityFit
from recommender.resources import CPU

if TYPE_CHECKING:
    from recommender.config import BalanceSettings


class CpuHeadroom(CapacityFit):
    name = "cpu"
    column = CPU
    unit = "cores"

    @classmethod
    def node_limits(
        cls, balance: BalanceSettings, capacity: np.ndarray, start: np.ndarray
    ) -> dict[int, np.ndarray]:
        return {CPU: np.maximum(capacity[:, CPU] * balance.cpu_headroom, start[:, CPU])}
