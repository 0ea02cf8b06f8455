"""A plan for people and for programs: terminal table, JSON, Markdown, commands.

Names are untrusted: the table passes them to rich as `Text` (never as markup), the Markdown
goes through the escaping filters of `recommender.markdown`, and commands through
`recommender.shell`.
"""

from __future__ import annotations

import io
import json
import math
from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from recommender import __version__
from recommender.config import Config
from recommender.markdown import environment
from recommender.model import RESOURCE_UNITS
from recommender.plan import Migration, Plan
from recommender.quoting import display, json_text
from recommender.shell import (
    UnsafeCommandError,
    is_proxmox_vmid,
    libvirt_migrate,
    proxmox_migrate,
)

PLAN_FORMAT = "vmbalance-plan"
PLAN_VERSION = 1


def command_flavour(plan: Plan, config: Config) -> str:
    """`auto`: Proxmox when every VM in the plan has a VMID (ASCII digits), else libvirt."""
    flavour = config.output.commands
    if flavour != "auto":
        return flavour
    vms = [m.vm for m in plan.migrations] or ["0"]
    return "proxmox" if all(is_proxmox_vmid(vm) for vm in vms) else "libvirt"


def migration_command(migration: Migration, flavour: str, config: Config) -> str:
    if flavour == "proxmox":
        return proxmox_migrate(migration.vm, migration.target)
    return libvirt_migrate(migration.vm, migration.target, config.output.libvirt_uri)


def _number(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) or math.isinf(value) else value


# Each migration's command line by step, or why it has none.
Commands = dict[int, "str | UnsafeCommandError"]


def plan_commands(plan: Plan, config: Config) -> tuple[str, Commands]:
    """The command flavour and every migration's command line, built once per rendering."""
    flavour = command_flavour(plan, config)
    commands: Commands = {}
    for migration in plan.migrations:
        try:
            commands[migration.step] = migration_command(migration, flavour, config)
        except UnsafeCommandError as exc:
            commands[migration.step] = exc
    return flavour, commands


def plan_document(
    plan: Plan, config: Config, commands: tuple[str, Commands] | None = None
) -> dict[str, Any]:
    """The versioned JSON plan (docs/plan-format.md)."""
    flavour, by_step = commands or plan_commands(plan, config)
    nodes = []
    for node in plan.nodes_before.index:
        before = plan.nodes_before.loc[node]
        after = plan.nodes_after.loc[node]
        resources = {
            r: {
                "capacity": _number(before[f"{r}_capacity"]),
                "load_before": _number(before[f"{r}_load"]),
                "load_after": _number(after[f"{r}_load"]),
                "utilisation_before": _number(before[f"{r}_util"]),
                "utilisation_after": _number(after[f"{r}_util"]),
            }
            for r in plan.resources
        }
        nodes.append(
            {
                "node": str(node),
                "maintenance": bool(before["maintenance"]),
                "active": bool(before["active"]),
                "vms_before": int(before["vms"]),
                "vms_after": int(after["vms"]),
                "resources": resources,
            }
        )
    migrations = []
    for m in plan.migrations:
        command = by_step[m.step]
        migrations.append(
            {
                "step": m.step,
                "wave": m.wave,
                "vm": m.vm,
                "name": m.name,
                "source": m.source,
                "target": m.target,
                "kind": m.kind,
                "group": m.group,
                "reason": m.reason,
                "gain": _number(m.gain),
                "memory_bytes": _number(m.memory_bytes),
                "command": command if isinstance(command, str) else None,
            }
        )
    return {
        "format": PLAN_FORMAT,
        "version": PLAN_VERSION,
        "generator": f"vmbalance {__version__}",
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "taken_at": plan.taken_at.isoformat(timespec="seconds") if plan.taken_at else None,
        "method": plan.method,
        "triggered": plan.triggered,
        "target_reached": plan.target_reached,
        "thresholds": {"trigger": config.balance.trigger, "target": config.balance.target},
        "imbalance": {
            "before": {**_clean(plan.imbalance_before), "overall": _number(plan.overall_before)},
            "after": {**_clean(plan.imbalance_after), "overall": _number(plan.overall_after)},
        },
        "commands": flavour,
        "nodes": nodes,
        "migrations": migrations,
        "waves": [[m.step for m in wave] for wave in plan.waves],
        "memory_to_copy_bytes": _number(plan.memory_bytes),
        "unplaceable": [
            {"vm": u.vm, "name": u.name, "node": u.node, "reason": u.reason}
            for u in plan.unplaceable
        ],
        "held_back": [
            {
                "vm": h.vm,
                "source": h.source,
                "target": h.target,
                "gain": _number(h.gain),
                "blocked_by": list(h.blocked_by),
            }
            for h in plan.held_back
        ],
        "unsequenced": [
            {"vm": m.vm, "name": m.name, "source": m.source, "target": m.target}
            for m in plan.unsequenced
        ],
        "warnings": list(plan.warnings),
        "settings": plan.settings,
    }


def _clean(values: dict[str, float]) -> dict[str, float | None]:
    return {key: _number(value) for key, value in values.items()}


def json_document(document: dict[str, Any], indent: int | None = 2) -> str:
    """JSON for people and programs: UTF-8 names as they are, active characters escaped."""
    return json_text(json.dumps(document, indent=indent, ensure_ascii=False))


def render_json(plan: Plan, config: Config) -> str:
    return json_document(plan_document(plan, config)) + "\n"


def commands_refusal(commands: tuple[str, Commands]) -> UnsafeCommandError | None:
    """The first migration no safe command exists for, if any: then no script is written."""
    for command in commands[1].values():
        if isinstance(command, UnsafeCommandError):
            return UnsafeCommandError(f"cannot write the commands: {command}")
    return None


def render_commands(
    plan: Plan, config: Config, commands: tuple[str, Commands] | None = None
) -> str:
    """A bash script: waves in order, the migrations of a wave in parallel, stop on failure.

    Raises UnsafeCommandError when a migration has no safe command: a script that skipped it
    would run later waves that count on it."""
    commands = commands or plan_commands(plan, config)
    refusal = commands_refusal(commands)
    if refusal is not None:
        raise refusal
    _, by_step = commands
    lines = [
        "#!/bin/bash",
        f"# vmbalance plan: {len(plan.migrations)} migration(s) in {len(plan.waves)} wave(s); "
        f"imbalance {plan.overall_before:.3f} -> {plan.overall_after:.3f}",
        "set -uo pipefail",
        "",
        "run_wave() {",
        "    local failed=0 pid",
        '    for pid in "$@"; do wait "$pid" || failed=1; done',
        '    if [ "$failed" -ne 0 ]; then echo "a migration failed; stopping" >&2; exit 1; fi',
        "}",
    ]
    for number, wave in enumerate(plan.waves, start=1):
        lines += ["", f"# wave {number}", "pids=()"]
        for migration in wave:
            lines.append(
                f"# {display(migration.vm)} ({display(migration.name)}): "
                f"{display(migration.source)} -> {display(migration.target)}"
            )
            lines.append(f"{by_step[migration.step]} &")
            lines.append('pids+=("$!")')
        lines.append('run_wave "${pids[@]}"')
    if not plan.migrations:
        lines += ["", "# nothing to do"]
    return "\n".join(lines) + "\n"


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
    )


def _text(value: object) -> Text:
    """Untrusted text for rich: never markup, one line, active characters escaped."""
    return Text(display(value))


def _pct(value: float | None) -> str:
    return "n/a" if value is None or value != value else f"{100 * value:.0f}%"


def render_table(plan: Plan, config: Config, console: Console) -> None:
    """Node utilisation before → after per resource, then each move with reason and gain."""
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
    console.print(summary)

    nodes = Table(title="Node utilisation before → after")
    nodes.add_column("node")
    nodes.add_column("VMs", justify="right")
    for resource in plan.resources:
        nodes.add_column(resource, justify="right")
    for node in plan.nodes_before.index:
        before = plan.nodes_before.loc[node]
        after = plan.nodes_after.loc[node]
        label = _text(node)
        if bool(before["maintenance"]):
            label.append(" (maintenance)", style="yellow")
        cells = [
            f"{_pct(_number(before[f'{r}_util']))} → {_pct(_number(after[f'{r}_util']))}"
            for r in plan.resources
        ]
        nodes.add_row(label, f"{int(before['vms'])} → {int(after['vms'])}", *cells)
    console.print(nodes)

    if plan.migrations:
        moves = Table(title=f"{len(plan.migrations)} migration(s) in {len(plan.waves)} wave(s)")
        for column in ("wave", "vm", "name", "from", "to", "reason", "gain", "memory"):
            moves.add_column(column, justify="right" if column in ("gain", "memory") else "left")
        for m in plan.migrations:
            moves.add_row(
                str(m.wave),
                _text(m.vm),
                _text(m.name),
                _text(m.source),
                _text(m.target),
                _text(m.reason),
                f"{m.gain:.3f}",
                f"{m.memory_bytes / 1024**3:.1f} GiB",
            )
        console.print(moves)
    elif not plan.triggered:
        console.print(
            f"Balanced: overall imbalance {plan.overall_before:.3f} is under the trigger "
            f"{config.balance.trigger:.3f}; nothing to do."
        )
    else:
        console.print("No migration improves the balance within the rules.")
    for item in plan.unplaceable:
        console.print(
            Text("cannot place ", style="bold red")
            + _text(f"{item.vm} ({item.name}) on {item.node}: {item.reason}")
        )
    for warning in plan.warnings:
        console.print(Text("warning: ", style="yellow") + _text(warning))


def render(plan: Plan, fmt: str, config: Config, width: int | None = None) -> str:
    if fmt == "json":
        return render_json(plan, config)
    if fmt == "markdown":
        return render_markdown(plan, config)
    if fmt == "commands":
        return render_commands(plan, config)
    buffer = io.StringIO()
    render_table(plan, config, Console(file=buffer, width=width or 140, highlight=False))
    return buffer.getvalue()
