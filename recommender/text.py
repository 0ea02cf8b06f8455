"""Small text chores every stage shares: one line of an error, a list cut short, a memory size."""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime
from urllib.parse import urlsplit, urlunsplit

from recommender.resources import GIB

# A host name (and a Proxmox node name): letters, digits, dots and dashes, not at either end.
HOST_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?")


def one_line(text: object, limit: int | None = None) -> str:
    """`text` on one line (runs of white space, newlines included, become one space), cut to
    `limit` characters with an ellipsis."""
    flat = " ".join(str(text).split())
    if limit is None or len(flat) <= limit:
        return flat
    return flat[: limit - 1] + "…"


def and_more(items: Sequence[str], limit: int = 5) -> str:
    """The first `limit` items joined by commas, and "and N more" for the rest."""
    shown = ", ".join(items[:limit])
    rest = len(items) - limit
    return f"{shown} and {rest} more" if rest > 0 else shown


def in_gib(nbytes: float) -> str:
    """A memory size as `12.0 GiB`."""
    return f"{float(nbytes) / GIB:.1f} GiB"


def in_duration(seconds: float) -> str:
    """An estimated duration as `42 s`, `3 min 05 s` or `2 h 07 min`."""
    total = max(round(float(seconds)), 0)
    if total < 60:
        return f"{float(seconds):.0f} s" if seconds >= 1 or seconds == 0 else "<1 s"
    minutes, secs = divmod(total, 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def format_time(t: float) -> str:
    """A unix time to the minute, in UTC."""
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M UTC")


def netloc(host: str, port: int | None) -> str:
    """`host:port` as a URL writes it (an IPv6 address in brackets)."""
    shown = f"[{host}]" if ":" in host else host
    return f"{shown}:{port}" if port is not None else shown


def redact_url(url: str) -> str:
    """The URL without user:password@ (it ends up in snapshots, plans and messages)."""
    try:
        parts = urlsplit(url)
        if parts.username is None and parts.password is None:
            return url
        host = netloc(parts.hostname or "", parts.port)
    except ValueError:
        return "(an invalid URL)"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


__all__ = [
    "HOST_NAME",
    "and_more",
    "format_time",
    "in_duration",
    "in_gib",
    "netloc",
    "one_line",
    "redact_url",
]
