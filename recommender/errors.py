"""Errors an operator can cause, and their one-line messages.

Shared by the command line and `vmbalance serve`: the CLI prints the message and exits 2, serve
publishes it in its metrics and retries.
"""

from __future__ import annotations

from recommender.config import ConfigError


class CommandError(Exception):
    """A one-line reason to stop with exit status 2."""


def known_error(exc: Exception) -> str | None:
    """The one-line message of an error an operator can cause; None for a bug."""
    from recommender.prometheus import SourceError
    from recommender.snapshot import SnapshotError

    if isinstance(exc, ConfigError):
        problems = getattr(exc, "problems", None) or [str(exc)]
        return "; ".join(str(p) for p in problems) if len(problems) > 1 else str(problems[0])
    if isinstance(exc, CommandError | SourceError | SnapshotError):
        return str(exc)
    if isinstance(exc, OSError):
        return f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": ")
    return None
