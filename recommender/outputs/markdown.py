"""The plan as Markdown, and the escaping every Markdown output shares.

Markdown that tenant-chosen names cannot break: jinja2 filters for table cells and text.

A VM name can hold pipes, backticks, brackets, HTML and newlines. In a table cell each of
those would end the cell, open a code span, start a link or inject markup; so every name goes
through `md_cell` (or `md_text` outside tables): first the one-line form every output shares
(`recommender.quoting.display`: newlines, controls and bidi overrides as visible escapes),
then Markdown's own syntax escaped.
"""

from __future__ import annotations

import re
from pathlib import Path

import jinja2

from recommender.config import Config
from recommender.model import RESOURCE_UNITS, finite_or_none
from recommender.outputs.commands import commands_refusal, plan_commands, render_commands
from recommender.outputs.document import plan_document
from recommender.outputs.explain import SHOWN_HELD_BACK, basis, frontier_notes, pressure_cell
from recommender.plan import Plan
from recommender.quoting import display
from recommender.text import in_duration

# Characters with a meaning anywhere in CommonMark/GFM inline syntax ...
_INLINE = re.compile(r"([\\`*_\[\]<>|~!&])")
# ... and those that only mean something at the start of a block (headings, lists, quotes).
_LEADING = re.compile(r"^([#+\-=>])|^(\d+)([.)])")

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"


def md_text(value: object) -> str:
    """Inline text: one line with active characters escaped (`recommender.quoting.display`),
    then Markdown syntax escaped."""
    text = display(value).strip()
    # A backslash before a syntax character (`<` included) makes it literal text.
    escaped = _INLINE.sub(r"\\\1", text)
    return _LEADING.sub(lambda m: f"\\{m[1]}" if m[1] else f"{m[2]}\\{m[3]}", escaped)


def md_cell(value: object) -> str:
    """A GFM table cell: like md_text, and never empty (an empty cell shifts nothing, but
    reads as missing data)."""
    return md_text(value) or "—"


def md_fenced(block: str, info: str = "sh") -> str:
    """A fenced code block whose fence is longer than any backtick run inside it, so a name
    holding ``` cannot close it early."""
    longest = max((len(run) for run in re.findall(r"`+", block)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{info}\n{block.rstrip()}\n{fence}"


def md_alt(value: object) -> str:
    """Image alt text: no brackets or newlines that could close the image syntax."""
    return re.sub(r"[\[\]\\\n\r]", " ", str(value)).strip()


def percent(value: float | None, digits: int = 1) -> str:
    known = finite_or_none(value)
    return "n/a" if known is None else f"{100 * known:.{digits}f}%"


def environment() -> jinja2.Environment:
    """The jinja2 environment of every Markdown template, with the escaping filters."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        autoescape=False,  # Markdown, not HTML: escaping is explicit through the filters
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(md_text=md_text, md_cell=md_cell, md_fenced=md_fenced, md_alt=md_alt)
    env.filters["percent"] = percent
    env.filters["duration"] = in_duration
    env.globals["frontier_notes"] = frontier_notes
    return env


def render_markdown(plan: Plan, config: Config) -> str:
    template = environment().get_template("plan.md.j2")
    commands = plan_commands(plan, config)
    refusal = commands_refusal(commands)
    return template.render(
        plan=plan,
        doc=plan_document(plan, config, commands),
        commands=render_commands(plan, config, commands) if refusal is None else "",
        commands_refusal=str(refusal) if refusal is not None else None,
        units=RESOURCE_UNITS,
        basis=basis(plan),
        shown_held_back=SHOWN_HELD_BACK,
        pressure_kinds=plan.pressure_kinds,
        pressure_cell=pressure_cell,
    )


__all__ = ["environment", "md_alt", "md_cell", "md_fenced", "md_text", "percent", "render_markdown"]
