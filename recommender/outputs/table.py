"""The plan as terminal tables (rich): imbalance, node utilisation before and after, moves.

Names are untrusted: they reach rich as `Text` (never as markup), on one line with active
characters escaped (`recommender.quoting.display`).
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from recommender.config import Config
from recommender.model import finite_or_none
from recommender.outputs.explain import (
    SHOWN_HELD_BACK,
    basis,
    frontier_notes,
    held_kind,
    needed_text,
    no_migration_reason,
    pressure_cell,
    pressure_trigger_text,
)
from recommender.plan import Plan
from recommender.quoting import display
from recommender.resources import GIB
from recommender.text import in_duration


def _text(value: object) -> Text:
    """Untrusted text for rich: never markup, one line, active characters escaped."""
    return Text(display(value))


def _pct(value: float | None) -> str:
    known = finite_or_none(value)
    return "n/a" if known is None else f"{100 * known:.0f}%"


def _imbalance_table(plan: Plan) -> Table:
    summary = Table(title="Imbalance")
    summary.add_column("resource")
    summary.add_column("before", justify="right")
    summary.add_column("after", justify="right")
    for resource in plan.resources:
        summary.add_row(
            resource,
            f"{plan.imbalance_before.get(resource, 0.0):.3f}",
            f"{plan.imbalance_after.get(resource, 0.0):.3f}",
        )
    summary.add_row(
        Text("overall", style="bold"),
        Text(f"{plan.overall_before:.3f}", style="bold"),
        Text(f"{plan.overall_after:.3f}", style="bold"),
    )
    return summary


def _node_table(plan: Plan) -> Table:
    nodes = Table(title="Node utilisation before → after")
    nodes.add_column("node")
    nodes.add_column("VMs", justify="right")
    for resource in plan.resources:
        nodes.add_column(resource, justify="right")
    with_pressure = bool(plan.pressure)
    if with_pressure:
        nodes.add_column("pressure (PSI some)", justify="right")
    for node in plan.nodes_before.index:
        before = plan.nodes_before.loc[node]
        after = plan.nodes_after.loc[node]
        label = _text(node)
        if bool(before["maintenance"]):
            label.append(" (maintenance)", style="yellow")
        cells = [
            f"{_pct(before[f'{r}_util'])} → {_pct(after[f'{r}_util'])}" for r in plan.resources
        ]
        if with_pressure:
            cells.append(pressure_cell(plan, str(node)))
        nodes.add_row(label, f"{int(before['vms'])} → {int(after['vms'])}", *cells)
    return nodes


def _moves_table(plan: Plan) -> Table:
    waves = ", ".join(f"{n}: {in_duration(d)}" for n, d in enumerate(plan.wave_durations, start=1))
    moves = Table(
        title=f"{len(plan.migrations)} migration(s) in {len(plan.waves)} wave(s), "
        f"about {in_duration(plan.duration_seconds)} (waves {waves})"
    )
    numbers = ("gain", "memory", "copied", "duration")
    for column in ("wave", "vm", "name", "from", "to", "reason", *numbers):
        moves.add_column(column, justify="right" if column in numbers else "left")
    for m in plan.migrations:
        moves.add_row(
            str(m.wave),
            _text(m.vm),
            _text(m.name),
            _text(m.source),
            _text(m.target),
            _text(m.reason),
            f"{m.gain:.3f}",
            f"{m.memory_bytes / GIB:.1f} GiB",
            f"{m.copy_bytes / GIB:.1f} GiB",
            in_duration(m.duration_seconds),
        )
    return moves


def _held_back_table(plan: Plan) -> Table:
    shown = plan.held_back[:SHOWN_HELD_BACK]
    title = f"{len(plan.held_back)} move(s) held back"
    if len(plan.held_back) > len(shown):
        title += f", the best {len(shown)}"
    held = Table(title=title)
    for column in ("vm", "from", "to", "gain", "needed", "held back by"):
        held.add_column(column, justify="right" if column in ("gain", "needed") else "left")
    for h in shown:
        held.add_row(
            _text(h.vm),
            _text(h.source),
            _text(h.target),
            f"{h.gain:.4f}",
            needed_text(h),
            _text(f"{held_kind(h)}: {', '.join(h.blocked_by)}"),
        )
    return held


def _frontier_table(plan: Plan) -> Table | None:
    """What k migrations could reach, with the plan's row and the knee."""
    frontier = plan.frontier
    if frontier is None or not frontier.points:
        return None
    table = Table(title="Trade-off: lowest overall imbalance with k migrations")
    for column in ("migrations", "imbalance", "lower bound", ""):
        table.add_column(column, justify="left" if column == "" else "right")
    for p in frontier.points:
        notes = frontier_notes(p.migrations, p.exact, frontier.knee, len(plan.migrations))
        table.add_row(str(p.migrations), f"{p.imbalance:.3f}", f"{p.lower_bound:.3f}", notes)
    return table


def render_table(plan: Plan, config: Config, console: Console) -> None:
    """Node utilisation before → after per resource, then each move with reason and gain,
    and the best moves held back with the gain they needed."""
    console.print(_text(f"Loads {basis(plan)}."))
    console.print(_imbalance_table(plan))
    console.print(_node_table(plan))
    pressure = pressure_trigger_text(plan)
    if pressure is not None:
        console.print(Text("pressure ", style="bold yellow") + _text(pressure))
    if plan.migrations:
        console.print(_moves_table(plan))
    elif not plan.triggered:
        console.print(
            f"Balanced: overall imbalance {plan.overall_before:.3f} is under the trigger "
            f"{config.balance.trigger:.3f}; nothing to do."
        )
    else:
        console.print(_text(no_migration_reason(plan)))
    if plan.held_back:
        console.print(_held_back_table(plan))
    frontier = _frontier_table(plan)
    if frontier is not None:
        console.print(frontier)
    for item in plan.unplaceable:
        console.print(
            Text("cannot place ", style="bold red")
            + _text(f"{item.vm} ({item.name}) on {item.node}: {item.reason}")
        )
    for item in plan.immovable:
        console.print(
            Text("not movable ", style="bold yellow")
            + _text(f"{item.vm} ({item.name}) on {item.node}: {item.reason}")
        )
    for warning in plan.warnings:
        console.print(Text("warning: ", style="yellow") + _text(warning))


__all__ = ["render_table"]
