"""The plan as the versioned JSON document (docs/plan-format.md), for programs.

The exact values go here, names included; `json_document` escapes only the characters a
terminal would act on (`recommender.quoting.json_text`).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from recommender import __version__
from recommender.config import Config
from recommender.model import finite_or_none
from recommender.outputs.commands import PlanCommands, plan_commands
from recommender.outputs.explain import held_kind, no_migration_reason, pressure_trigger_text
from recommender.plan import Plan
from recommender.quoting import json_text

PLAN_FORMAT = "vmbalance-plan"
PLAN_VERSION = 1


def plan_document(
    plan: Plan, config: Config, commands: PlanCommands | None = None
) -> dict[str, Any]:
    """The versioned JSON plan (docs/plan-format.md)."""
    flavour, by_step = commands or plan_commands(plan, config)
    nodes = _node_entries(plan)
    migrations = _migration_entries(plan, by_step)
    return {
        "format": PLAN_FORMAT,
        "version": PLAN_VERSION,
        "generator": f"vmbalance {__version__}",
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "taken_at": plan.taken_at.isoformat(timespec="seconds") if plan.taken_at else None,
        "cluster": plan.cluster or None,
        "window": plan.window,
        "estimator": plan.estimator,
        "method": plan.method,
        "triggered": plan.triggered,
        "target_reached": plan.target_reached,
        "thresholds": {"trigger": config.balance.trigger, "target": config.balance.target},
        "imbalance": {
            "before": {
                **_clean(plan.imbalance_before),
                "overall": finite_or_none(plan.overall_before),
            },
            "after": {
                **_clean(plan.imbalance_after),
                "overall": finite_or_none(plan.overall_after),
            },
        },
        "commands": flavour,
        "nodes": nodes,
        "migrations": migrations,
        "waves": [[m.step for m in wave] for wave in plan.waves],
        "memory_to_copy_bytes": finite_or_none(plan.memory_bytes),
        "copy_bytes": finite_or_none(plan.copy_bytes),
        "wave_durations_seconds": [finite_or_none(d) for d in plan.wave_durations],
        "duration_seconds": finite_or_none(plan.duration_seconds),
        "immovable": [
            {"vm": u.vm, "name": u.name, "node": u.node, "reason": u.reason} for u in plan.immovable
        ],
        "unplaceable": [
            {"vm": u.vm, "name": u.name, "node": u.node, "reason": u.reason}
            for u in plan.unplaceable
        ],
        "held_back": _held_back_entries(plan),
        "unsequenced": [
            {"vm": m.vm, "name": m.name, "source": m.source, "target": m.target}
            for m in plan.unsequenced
        ],
        "frontier": frontier_document(plan),
        "pressure_trigger": [
            {"node": p.node, "kind": p.kind, "share": p.share, "threshold": p.threshold}
            for p in plan.pressured
        ],
        "pressure_reason": pressure_trigger_text(plan),
        "warnings": list(plan.warnings),
        "explanation": None if plan.migrations or not plan.triggered else no_migration_reason(plan),
        "settings": plan.settings,
    }


def _node_entries(plan: Plan) -> list[dict[str, Any]]:
    """Each node before and after the plan, per resource."""
    nodes = []
    for node in plan.nodes_before.index:
        before = plan.nodes_before.loc[node]
        after = plan.nodes_after.loc[node]
        resources = {
            r: {
                "capacity": finite_or_none(before[f"{r}_capacity"]),
                "load_before": finite_or_none(before[f"{r}_load"]),
                "load_after": finite_or_none(after[f"{r}_load"]),
                "utilisation_before": finite_or_none(before[f"{r}_util"]),
                "utilisation_after": finite_or_none(after[f"{r}_util"]),
            }
            for r in plan.resources
        }
        entry = {
            "node": str(node),
            "maintenance": bool(before["maintenance"]),
            "active": bool(before["active"]),
            "vms_before": int(before["vms"]),
            "vms_after": int(after["vms"]),
            "resources": resources,
        }
        if plan.pressure:
            shares = plan.pressure.get(str(node), {})
            entry["pressure"] = {k: finite_or_none(shares.get(k)) for k in plan.pressure_kinds}
        nodes.append(entry)
    return nodes


def _migration_entries(plan: Plan, by_step: dict[int, Any]) -> list[dict[str, Any]]:
    """Each migration with its estimated cost and its command (None where refused)."""
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
                "gain": finite_or_none(m.gain),
                "memory_bytes": finite_or_none(m.memory_bytes),
                "copy_bytes": finite_or_none(m.copy_bytes),
                "duration_seconds": finite_or_none(m.duration_seconds),
                "local_disk_bytes": finite_or_none(m.local_disk_bytes),
                "ha_managed": m.ha_managed,
                "command": command if isinstance(command, str) else None,
            }
        )
    return migrations


def _held_back_entries(plan: Plan) -> list[dict[str, Any]]:
    """Moves that would have gained but were held back, with what held each back."""
    return [
        {
            "vm": h.vm,
            "source": h.source,
            "target": h.target,
            "gain": finite_or_none(h.gain),
            "needed_gain": finite_or_none(h.needed),
            "held_by": held_kind(h),
            "blocked_by": list(h.blocked_by),
        }
        for h in plan.held_back
    ]


def frontier_document(plan: Plan) -> dict[str, Any] | None:
    """The trade-off frontier: per number of migrations the lowest overall imbalance known,
    its proven lower bound, and the knee; null when balancing did not run."""
    frontier = plan.frontier
    if frontier is None:
        return None
    return {
        "knee": frontier.knee,
        "points": [
            {
                "migrations": p.migrations,
                "imbalance": finite_or_none(p.imbalance),
                "lower_bound": finite_or_none(p.lower_bound),
                "exact": p.exact,
                "memory_bytes": finite_or_none(p.memory_bytes),
            }
            for p in frontier.points
        ],
    }


def _clean(values: dict[str, float]) -> dict[str, float | None]:
    return {key: finite_or_none(value) for key, value in values.items()}


def json_document(document: dict[str, Any], indent: int | None = 2) -> str:
    """JSON for people and programs: UTF-8 names as they are, active characters escaped."""
    return json_text(json.dumps(document, indent=indent, ensure_ascii=False))


def render_json(plan: Plan, config: Config) -> str:
    return json_document(plan_document(plan, config)) + "\n"


__all__ = [
    "PLAN_FORMAT",
    "PLAN_VERSION",
    "frontier_document",
    "json_document",
    "plan_document",
    "render_json",
]
