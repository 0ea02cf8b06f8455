"""Node pressure (PSI) in a plan, on known inputs: the trigger, the weighted resource and
what every output shows of it."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from recommender.config import Config
from recommender.model import GIB, Snapshot, make_nodes, make_vms
from recommender.outputs.formats import render
from recommender.outputs.table import render_table
from recommender.plan import build_plan
from recommender.pressure import PRESSURE_BACKGROUND, pressure_frames, pressured_nodes
from recommender.snapshot import parse_snapshot, snapshot_text

NODE = {"cpu": 16.0, "memory": 64.0 * GIB, "disk_bytes": 1e9, "disk_ops": 5e4, "network": 1e9}
PSI = {"a": (0.45, 0.0, 0.20), "b": (0.02, 0.0, 0.0), "c": (0.01, 0.0, 0.0)}


def snapshot() -> Snapshot:
    nodes = make_nodes(
        {
            node: {**NODE, "pressure_cpu": cpu, "pressure_memory": memory, "pressure_io": disk}
            for node, (cpu, memory, disk) in PSI.items()
        }
    )
    vms = make_vms(
        {
            f"v{i}": {"node": "a" if i < 4 else ("b" if i < 6 else "c"), "cpu": 1.0 + i % 2,
                      "memory": 4.0 * GIB, "memory_max_bytes": 4.0 * GIB, "disk_bytes": 0.0,
                      "disk_ops": 0.0, "network": 0.0}
            for i in range(8)
        }
    )  # fmt: skip
    return Snapshot(nodes=nodes, vms=vms)


CHEAP = {"min_gain": 0.0, "min_gain_per_gib": 0.0}


def test_each_kind_is_laid_on_the_vms_by_the_load_that_stalls_on_it() -> None:
    shot = snapshot()
    nodes, vms = pressure_frames(shot.nodes, shot.vms, "memory_max_bytes")
    on_a = vms[vms["node"] == "a"]
    # cpu 0.45 by CPU share (1, 2, 1, 2 cores), memory 0 by memory; io 0.20 has no VM I/O to
    # explain it, so it is the node's own.
    assert on_a["pressure"].tolist() == pytest.approx([0.075, 0.15, 0.075, 0.15])
    assert nodes.loc["a", PRESSURE_BACKGROUND] == pytest.approx(0.20)
    assert nodes.loc["a", "pressure"] == 3.0
    assert on_a["pressure"].sum() + nodes.loc["a", PRESSURE_BACKGROUND] == pytest.approx(0.65)


def test_only_nodes_in_service_over_a_listed_kind_trigger() -> None:
    nodes = snapshot().nodes
    assert [(p.node, p.kind) for p in pressured_nodes(nodes, {"cpu": 0.3, "io": 0.1})] == [
        ("a", "cpu"),
        ("a", "io"),
    ]
    assert pressured_nodes(nodes, {"cpu": 0.5}) == []
    nodes.loc["a", "maintenance"] = True
    assert pressured_nodes(nodes, {"cpu": 0.3}) == []


def test_pressure_triggers_a_plan_under_the_trigger_and_says_so_everywhere() -> None:
    shot = snapshot()
    quiet = Config.model_validate({"balance": CHEAP})
    assert not build_plan(shot, quiet).triggered
    config = Config.model_validate({"balance": CHEAP, "host": {"pressure_trigger": {"cpu": 0.3}}})
    plan = build_plan(shot, config)
    assert plan.triggered and plan.overall_before < config.balance.target
    assert plan.migrations and plan.target_reached
    assert "pressure" not in plan.resources
    doc = json.loads(render(plan, "json", config))
    assert doc["pressure_trigger"] == [
        {"node": "a", "kind": "cpu", "share": 0.45, "threshold": 0.3}
    ]
    assert doc["settings"]["host"]["pressure_trigger"] == {"cpu": 0.3}
    assert doc["thresholds"] == {"trigger": 0.2, "target": 0.1}
    assert doc["nodes"][0]["pressure"] == {"cpu": 0.45, "memory": 0.0, "io": 0.2}
    markdown = render(plan, "markdown", config)
    assert "Pressure over host.pressure\\_trigger (a cpu 45% \\> 30%)" in markdown
    assert "| pressure (PSI some) |" in markdown and "cpu 45% memory 0% io 20%" in markdown
    out = io.StringIO()
    render_table(plan, config, Console(file=out, width=220, highlight=False))
    assert "Pressure over host.pressure_trigger (a cpu 45% > 30%)" in out.getvalue()
    assert "cpu 45% memory 0% io 20%" in out.getvalue()


def test_a_pressure_weight_moves_vms_off_the_pressured_node() -> None:
    shot = snapshot()
    weights = {"cpu": 1.0, "memory": 1.0, "pressure": 8.0}
    balance = {**CHEAP, "weights": weights, "trigger": 0.1, "target": 0.05}
    config = Config.model_validate({"balance": balance})
    plan = build_plan(shot, config)
    assert plan.triggered and plan.resources[-1] == "pressure"
    assert plan.migrations and all(m.source == "a" for m in plan.migrations)
    before, after = plan.nodes_before.loc["a"], plan.nodes_after.loc["a"]
    assert before["pressure_load"] == pytest.approx(0.65)
    assert after["pressure_load"] < before["pressure_load"]
    doc = json.loads(render(plan, "json", config))
    assert doc["nodes"][0]["resources"]["pressure"]["capacity"] == 3.0
    assert "pressure" in doc["imbalance"]["before"]


def test_without_psi_a_pressure_weight_leaves_the_nodes_out() -> None:
    shot = snapshot()
    shot.nodes = shot.nodes.drop(columns=["pressure_cpu", "pressure_memory", "pressure_io"])
    config = Config.model_validate({"balance": {"weights": {"cpu": 1, "pressure": 1}}})
    plan = build_plan(shot, config)
    assert not plan.migrations and plan.pressure == {}
    assert any("capacity unknown (pressure)" in w for w in plan.warnings)


def test_the_snapshot_file_keeps_the_pressure_of_each_node() -> None:
    shot = snapshot()
    shot.nodes.loc["c", "pressure_io"] = float("nan")
    document = json.loads(snapshot_text(shot))
    assert document["nodes"][2]["pressure"] == {"cpu": 0.01, "memory": 0.0, "io": None}
    again, _ = parse_snapshot(document)
    assert json.loads(snapshot_text(again)) == document
    del document["nodes"][0]["pressure"]["io"]
    document["nodes"][1]["pressure"] = {"disk": 0.1}
    with pytest.raises(Exception, match="'disk' is no PSI kind"):
        parse_snapshot(document)


@pytest.mark.parametrize(
    ("host", "message"),
    [
        ({"pressure_trigger": {"cpu": 0}}, "greater than 0"),
        ({"pressure_trigger": {"cpu": 1.5}}, "less than or equal to 1"),
        ({"pressure": ["cpu"], "pressure_trigger": {"io": 0.3}}, "io is not in host.pressure"),
        ({"pressure": ["cpu", "cpu"]}, "lists a pressure kind twice"),
        ({"pressure": ["disk"]}, "'cpu', 'memory' or 'io'"),
    ],
)
def test_bad_pressure_settings_are_refused(host: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Config.model_validate({"host": host})
