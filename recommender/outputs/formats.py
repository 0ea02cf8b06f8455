"""One plan, in the format asked for: the list of formats, and the one dispatch."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from recommender.config import Config
    from recommender.plan import Plan

OutputFormat = Literal["table", "json", "markdown", "commands"]
FORMATS: tuple[OutputFormat, ...] = ("table", "json", "markdown", "commands")


def render(plan: Plan, fmt: OutputFormat, config: Config, width: int | None = None) -> str:
    """The plan as text in `fmt` (the table `width` columns wide). The renderers are imported
    here, so reading the list of formats costs nothing."""
    from rich.console import Console

    from recommender.outputs.commands import render_commands
    from recommender.outputs.document import render_json
    from recommender.outputs.markdown import render_markdown
    from recommender.outputs.table import render_table

    if fmt == "json":
        return render_json(plan, config)
    if fmt == "markdown":
        return render_markdown(plan, config)
    if fmt == "commands":
        return render_commands(plan, config)
    buffer = io.StringIO()
    render_table(plan, config, Console(file=buffer, width=width or 140, highlight=False))
    return buffer.getvalue()


__all__ = ["FORMATS", "OutputFormat", "render"]
