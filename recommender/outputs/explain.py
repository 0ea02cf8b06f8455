"""What every plan output says about itself: what the loads were read from, and why moves
that would lower the imbalance are not in the plan.

Hysteresis (a gain below `balance.min_gain` plus `balance.min_gain_per_gib` per GiB copied, a
VM moved recently, a VM bursting) is told apart from a rule (pin, affinity, maintenance, a
node's room, the migration budget): the first is a setting that keeps small moves out, the
second a constraint the operator wrote.
"""

from __future__ import annotations

import math

from recommender.engine.result import HeldBack
from recommender.plan import Plan

# Held-back moves the table and the Markdown list (the JSON holds them all).
SHOWN_HELD_BACK = 5


def basis(plan: Plan) -> str:
    """`taken at …, window …, estimator …`: when and how the loads were estimated."""
    taken = plan.taken_at.isoformat(timespec="seconds") if plan.taken_at else "unknown"
    return (
        f"taken at {taken}, window {plan.window or 'unknown'}, "
        f"estimator {plan.estimator or 'unknown'}"
    )


def frontier_notes(migrations: int, exact: bool, knee: int, planned: int) -> str:
    """The notes of a trade-off row: `plan` (the plan makes that many migrations), `knee`,
    `optimal` (its imbalance is proven the lowest for that many)."""
    notes = ["plan"] if migrations == planned else []
    notes += ["knee"] if migrations == knee else []
    notes += ["optimal"] if exact else []
    return ", ".join(notes)


def held_kind(held: HeldBack) -> str:
    return "rule" if held.by_rule else "hysteresis"


def needed_text(held: HeldBack) -> str:
    return f"{held.needed:.4f}" if math.isfinite(held.needed) else "n/a"


def no_migration_reason(plan: Plan) -> str:
    """Why a plan above the trigger has no migration, in one sentence."""
    by_hysteresis = [h for h in plan.held_back if not h.by_rule]
    by_rule = [h for h in plan.held_back if h.by_rule]
    if by_hysteresis:
        best = max(h.gain for h in by_hysteresis)
        text = (
            f"No migration recommended: {len(by_hysteresis)} move(s) that would lower the "
            "imbalance were held back by hysteresis (balance.min_gain + "
            f"balance.min_gain_per_gib per GiB copied, cooldown, burst); the best gains "
            f"{best:.4f}"
        )
        if by_rule:
            text += f", and {len(by_rule)} more are blocked by a rule"
        return text + "."
    if by_rule:
        return (
            f"No migration recommended: the {len(by_rule)} move(s) that would lower the "
            "imbalance are blocked by a rule."
        )
    return "No migration lowers the imbalance."


def pressure_trigger_text(plan: Plan) -> str | None:
    """Which nodes' pressure made this run plan, in one sentence (None: none did)."""
    if not plan.pressured:
        return None
    over = ", ".join(
        f"{p.node} {p.kind} {100 * p.share:.0f}% > {100 * p.threshold:.0f}%" for p in plan.pressured
    )
    return (
        f"Pressure over host.pressure_trigger ({over}): planned whatever the imbalance, as far "
        "as each move pays for itself."
    )


def pressure_cell(plan: Plan, node: str) -> str:
    """A node's pressure stall share per PSI kind read, e.g. `cpu 12% memory 0% io 40%`."""
    shares = plan.pressure.get(node, {})
    return " ".join(
        f"{kind} {100 * shares[kind]:.0f}%" if math.isfinite(shares.get(kind, math.nan))
        else f"{kind} n/a"
        for kind in plan.pressure_kinds
    )  # fmt: skip


__all__ = [
    "SHOWN_HELD_BACK",
    "basis",
    "held_kind",
    "needed_text",
    "no_migration_reason",
    "pressure_cell",
    "pressure_trigger_text",
]
