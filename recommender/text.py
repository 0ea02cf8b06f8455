"""Small text chores every stage shares: one line of an error, a list cut short."""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime

# A host name (and a Proxmox node name): letters, digits, dots and dashes, not at either end.
HOST_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?")


def one_line(text: object, limit: int | None = None) -> str:
    """`text` on one line (runs of white space, newlines included, become one space), cut to
    `limit` characters with an ellipsis."""
    flat = " ".join(str(text).split())
    if limit is None or len(flat) <= limit:
        return flat
    return flat[: limit - 1] + "…"


def and_more(items: Sequence[str], limit: int) -> str:
    """The first `limit` items joined by commas, and "and N more" for the rest."""
    shown = ", ".join(items[:limit])
    rest = len(items) - limit
    return f"{shown} and {rest} more" if rest > 0 else shown


def format_time(t: float) -> str:
    """A unix time to the minute, in UTC."""
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M UTC")


__all__ = ["HOST_NAME", "and_more", "format_time", "one_line"]
