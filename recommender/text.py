"""Small helpers for what the product prints: lists cut short, memory sizes.

Shared by the engine's warnings and reasons and by the renderers, so a list of names or a
memory size reads the same everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

from recommender.model import GIB


def listing(items: Sequence[str], limit: int = 5) -> str:
    """`a, b, c and 4 more`: the first `limit` items, then how many were left out."""
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def in_gib(nbytes: float) -> str:
    """A memory size as `12.0 GiB`."""
    return f"{float(nbytes) / GIB:.1f} GiB"
