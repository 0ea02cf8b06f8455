"""The trade-off frontier in every output: the plan JSON's `frontier`, a small table in the
terminal and Markdown plans, and `vmbalance serve`'s metric with a `migrations` label."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from recommender.config import Config
from recommender.engine.exact import available as exact_available
from recommender.faces.serve import Recommender
from recommender.model import Snapshot
from recommender.outputs.document import plan_document
from recommender.outputs.markdown import render_markdown
from recommender.outputs.table import render_table
from recommender.plan import Plan, build_plan
from tests.test_engine import config, hot_nic_cluster
from tests.test_serve import scrape

pytestmark = pytest.mark.skipif(not exact_available(), reason="needs highspy")

# The target is out of reach, so the plan stops at the knee and the frontier matters.
OUT_OF_REACH = {"target": 0.005, "trigger": 0.01, "min_gain": 0.01, "min_gain_per_gib": 0.0}


def planned() -> tuple[Snapshot, Config, Plan]:
    snap, cfg = hot_nic_cluster(), config(**OUT_OF_REACH)
    return snap, cfg, build_plan(snap, cfg)


def test_the_plan_document_carries_the_frontier() -> None:
    _, cfg, plan = planned()
    assert plan.frontier is not None and len(plan.frontier.points) >= 3
    doc = plan_document(plan, cfg)["frontier"]
    assert doc["knee"] == plan.frontier.knee == len(plan.migrations)
    assert [p["migrations"] for p in doc["points"]] == [p.migrations for p in plan.frontier.points]
    for row, point in zip(doc["points"], plan.frontier.points, strict=True):
        assert row["imbalance"] == pytest.approx(point.imbalance)
        assert row["lower_bound"] <= row["imbalance"] + 1e-9
        assert row["exact"] is point.exact
    knee = next(p for p in doc["points"] if p["migrations"] == doc["knee"])
    assert knee["imbalance"] == pytest.approx(plan.overall_after)


def test_a_balanced_cluster_has_no_frontier() -> None:
    snap = hot_nic_cluster()
    cfg = config(trigger=0.95, target=0.9)
    assert plan_document(build_plan(snap, cfg), cfg)["frontier"] is None


def test_terminal_and_markdown_show_the_frontier_table() -> None:
    _, cfg, plan = planned()
    assert plan.frontier is not None
    out = io.StringIO()
    render_table(plan, cfg, Console(file=out, width=200, color_system=None))
    text = out.getvalue()
    assert "Trade-off" in text
    markdown = render_markdown(plan, cfg)
    section = markdown.split("### Trade-off", 1)[1]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 1 + len(plan.frontier.points)
    for point, row in zip(plan.frontier.points, rows[1:], strict=True):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[0] == str(point.migrations)
        assert cells[1] == f"{point.imbalance:.3f}"
        assert ("knee" in cells[3]) is (point.migrations == plan.frontier.knee)
        assert ("plan" in cells[3]) is (point.migrations == len(plan.migrations))
        assert f"{point.imbalance:.3f}" in text
    assert f"this plan makes {len(plan.migrations)}." in section
    assert len([line for line in text.splitlines() if " plan" in line and "knee" in line]) == 1


def test_serve_publishes_the_frontier_by_migrations() -> None:
    snap, cfg, plan = planned()
    assert plan.frontier is not None
    recommender = Recommender(cfg, snapshot_source=lambda _: snap)
    assert recommender.run_once() is True
    metrics = scrape(recommender)
    for point in plan.frontier.points:
        key = f"vmbalance_recommender_frontier_imbalance_ratio{{migrations={point.migrations}}}"
        assert metrics[key] == pytest.approx(point.imbalance)
        bound = f"vmbalance_recommender_frontier_lower_bound_ratio{{migrations={point.migrations}}}"
        assert metrics[bound] <= metrics[key] + 1e-9
    assert metrics["vmbalance_recommender_frontier_knee_migrations"] == plan.frontier.knee
