"""What a plan says about the moves it leaves out: held back by hysteresis (`min_gain`) told
apart from blocked by a rule, the best of them listed with the gain they needed, in the
table, the Markdown and the JSON, each stating when and how the loads were estimated."""

from __future__ import annotations

import io
import json

from rich.console import Console

from recommender.config import Config
from recommender.engine.held_back import merge_held_back
from recommender.engine.result import HeldBack
from recommender.engine.rules import RuleSettings
from recommender.outputs.document import render_json
from recommender.outputs.markdown import render_markdown
from recommender.outputs.table import render_table
from recommender.plan import Plan, build_plan
from tests.test_engine import config, hot_nic_cluster

BASIS = "taken at 2024-06-03T12:00:00+00:00, window 1h, estimator mean"


def outputs(plan: Plan, settings: Config) -> tuple[str, str, dict]:
    console = Console(file=io.StringIO(), width=200, record=True, color_system=None)
    render_table(plan, settings, console)
    return (
        console.export_text(),
        render_markdown(plan, settings),
        json.loads(render_json(plan, settings)),
    )


def test_moves_held_back_by_min_gain_are_said_and_listed() -> None:
    settings = config(min_gain=0.9)
    plan = build_plan(hot_nic_cluster(), settings)
    assert plan.triggered and not plan.migrations
    assert plan.held_back and all(not h.by_rule for h in plan.held_back)
    assert all("min_gain" in h.blocked_by and h.gain > 0 for h in plan.held_back)
    assert all(h.needed >= 0.9 > h.gain for h in plan.held_back)
    keys = [(h.vm, h.target) for h in plan.held_back]
    assert len(keys) == len(set(keys))
    best = plan.held_back[0]
    assert best.gain == max(h.gain for h in plan.held_back)

    table, markdown, document = outputs(plan, settings)
    for text in (table, markdown):
        assert "held back by hysteresis" in text
        assert BASIS in text
        assert f"{best.gain:.4f}" in text and f"{best.needed:.4f}" in text
    assert "No migration improves the balance within the rules" not in table + markdown
    assert "### Moves held back" in markdown
    row = f"| {best.vm} | {best.source} | {best.target} | {best.gain:.4f} | {best.needed:.4f} |"
    assert row in markdown
    assert "hysteresis" in document["explanation"]
    assert (document["taken_at"], document["window"], document["estimator"]) == (
        "2024-06-03T12:00:00+00:00",
        "1h",
        "mean",
    )
    first = document["held_back"][0]
    assert first["held_by"] == "hysteresis" and first["needed_gain"] >= 0.9


def test_a_rule_is_told_apart_from_hysteresis_and_the_json_holds_the_rules() -> None:
    rules = RuleSettings(pin={"101": "pve1", "102": "pve1", "103": "pve1"})
    settings = config(rules, min_gain=0.9)
    plan = build_plan(hot_nic_cluster(), settings)
    kinds = {h.vm: h.by_rule for h in plan.held_back}
    assert kinds["101"] and kinds["102"]
    _, _, document = outputs(plan, settings)
    by_vm = {h["vm"]: h for h in document["held_back"]}
    assert by_vm["101"]["held_by"] == "rule" and "pin" in by_vm["101"]["blocked_by"]
    # The rules themselves and the query settings, not counts.
    assert document["settings"]["rules"]["pin"] == {"101": "pve1", "102": "pve1", "103": "pve1"}
    assert document["settings"]["query"]["window"] == "1h"
    assert document["settings"]["query"]["estimator"] == "mean"


def test_held_back_is_one_entry_per_vm_and_target_with_a_positive_gain() -> None:
    held = [
        HeldBack("101", "pve1", "pve2", 0.02, ("min_gain",), 0.03),
        HeldBack("101", "pve1", "pve2", 0.05, ("max_migrations",), 0.03),
        HeldBack("101", "pve1", "pve3", 0.0, ("sequencing",)),
        HeldBack("102", "pve1", "pve3", -0.01, ("pin",)),
        HeldBack("103", "pve1", "pve3", 0.01, ("burst",)),
    ]
    merged = merge_held_back(held)
    assert [(h.vm, h.target) for h in merged] == [("101", "pve2"), ("103", "pve3")]
    assert merged[0].gain == 0.05 and set(merged[0].blocked_by) == {"min_gain", "max_migrations"}
    assert merged[0].by_rule and not merged[1].by_rule
