"""Errors an operator can cause, and their one-line messages.

Shared by the command line and `vmbalance serve`: the CLI prints the message and exits 2, serve
publishes it in its metrics and retries.
"""

from __future__ import annotations

from recommender.config import ConfigError
from recommender.errors import CommandError
from recommender.quoting import display


def known_error(exc: Exception) -> str | None:
    """The one-line message of an error an operator can cause; None for a bug. Names in it
    are escaped (`recommender.quoting.display`): it goes to a terminal, a log or a metric.

    The stages' error types are imported here, when an error happened, so that starting the
    command line does not import every stage."""
    from recommender.output_file import OutputFileError
    from recommender.outputs.commands import UnsafeCommandError
    from recommender.snapshot import SnapshotError
    from recommender.source.http import SourceError

    if isinstance(exc, ConfigError):
        problems = getattr(exc, "problems", None) or [str(exc)]
        message = "; ".join(str(p) for p in problems)
    elif isinstance(
        exc, CommandError | SourceError | SnapshotError | OutputFileError | UnsafeCommandError
    ):
        message = str(exc)
    elif isinstance(exc, OSError):
        message = f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": ")
    else:
        return None
    return display(message)


__all__ = ["known_error"]
