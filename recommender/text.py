"""Small helpers for what the product prints: lists cut short, sizes, unknown numbers.

Shared by the engine's warnings and reasons and by the renderers, so a list of names or a
memory size reads the same everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from recommender.model import GIB


def listing(items: Sequence[str], limit: int = 5) -> str:
    """`a, b, c and 4 more`: the first `limit` items, then how many were left out."""
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def in_gib(nbytes: float) -> str:
    """A memory size as `12.0 GiB`."""
    return f"{float(nbytes) / GIB:.1f} GiB"


def finite_or_none(value: float | None) -> float | None:
    """A finite float, or None for a missing, NaN or infinite value (JSON has no NaN)."""
    if value is None:
        return None
    number = float(value)
    return number if math.isfinite(number) else None
