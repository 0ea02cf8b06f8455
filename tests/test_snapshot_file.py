"""The snapshot file: exact round trip (hostile names included) and one-line errors."""

from __future__ import annotations

import io
import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from devkit.simulate import HOSTILE_NAMES, simulate_cluster
from recommender.config import Config
from recommender.model import Snapshot, make_nodes, make_vms
from recommender.snapshot import SnapshotError, load_snapshot, save_snapshot

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "recommender" / "examples" / "snapshot.json"

NASTY = [
    *HOSTILE_NAMES,
    "nul \x00 byte",
    "lone surrogate \udcff",
    "zero\u200bwidth",
    "",
    " ",
    '{"json": "inside"}',
    "\\u0041 not an escape",
]


def nasty_snapshot() -> Snapshot:
    nodes = make_nodes(
        {
            "pve1": {
                "cpu": 32,
                "memory": 256e9,
                "disk_bytes": 1e9,
                "disk_ops": 5e4,
                "network": 1e9,
            },
            "nøde-ß \u202e": {"cpu": 16, "memory": np.nan, "maintenance": True},
        }
    )
    rows: dict[str, dict[str, object]] = {}
    for i, name in enumerate(NASTY):
        rows[f"vm-{i}" if i % 3 else f"{100 + i}"] = {
            "name": name,
            "node": "pve1" if i % 2 else "nøde-ß \u202e",
            "cpu": 0.5 * i,
            "memory": np.nan if i == 3 else 1e9 + i,
            "disk_bytes": 1e6 / (i + 1),
            "disk_ops": 0.0,
            "network": 123.456789e3,
            "memory_max_bytes": 4 * 1024**3,
            "burst_ratio": np.nan if i == 1 else 1.0 + i / 7,
            "last_migration": 1_790_000_000.123456 if i == 3 else np.nan,
        }
    return Snapshot(
        nodes=nodes,
        vms=make_vms(rows),
        taken_at=datetime(2026, 9, 21, 14, 13, 20, tzinfo=UTC),
        source="http://127.0.0.1:9090",
        window="1h",
        estimator="quantile(0.95)",
        warnings=["VMs without vmbalance_vm_memory_used_bytes in the last 1h: vm-3"],
    )


def assert_same(a: Snapshot, b: Snapshot) -> None:
    pd.testing.assert_frame_equal(a.nodes, b.nodes)
    pd.testing.assert_frame_equal(a.vms, b.vms)
    assert (a.taken_at, a.source, a.window, a.estimator, a.warnings) == (
        b.taken_at,
        b.source,
        b.window,
        b.estimator,
        b.warnings,
    )


def test_round_trip_with_hostile_names(tmp_path: Path) -> None:
    snapshot = nasty_snapshot()
    config = Config.model_validate(
        {
            "prometheus": {"bearer_token": "secret-token", "password": "hunter2", "username": "u"},
            "rules": {"pin": {"101": "pve1"}, "anti_affinity": [{"name": "x", "vms": ["a", "b"]}]},
        }
    )
    path = tmp_path / "snap.json"
    save_snapshot(snapshot, path, config)
    text = path.read_text(encoding="ascii")
    assert "secret-token" not in text and "hunter2" not in text
    loaded, loaded_config = load_snapshot(path)
    assert_same(snapshot, loaded)
    assert loaded.vms.loc["103", "last_migration"] == pytest.approx(1_790_000_000.123456)
    assert loaded_config is not None
    assert loaded_config.rules == config.rules
    assert loaded_config.prometheus.bearer_token is None
    assert loaded_config.prometheus.username == "u"
    # Names come back exactly, in order.
    assert list(loaded.vms["name"]) == NASTY


def test_round_trip_without_config_through_an_open_file() -> None:
    snapshot = simulate_cluster(
        5, nodes=3, vms=9, duration=7200, step=60, end=1.8e9
    ).truth_snapshot()
    buffer = io.StringIO()
    save_snapshot(snapshot, buffer, None)
    document = json.loads(buffer.getvalue())
    assert document["format"] == "vmbalance-snapshot" and document["version"] == 1
    assert "config" not in document
    loaded, config = load_snapshot(io.StringIO(buffer.getvalue()))
    assert config is None
    assert_same(snapshot, loaded)


def test_example_loads() -> None:
    snapshot, config = load_snapshot(EXAMPLE)
    assert list(snapshot.nodes.index) == ["pve1", "pve2", "pve3"]
    assert len(snapshot.vms) == 12
    assert set(snapshot.vms["node"]) <= set(snapshot.nodes.index)
    assert config is not None and config.rules.anti_affinity and config.rules.pin
    utilisation = snapshot.vms.groupby("node")["disk_bytes"].sum() / snapshot.nodes["disk_bytes"]
    assert (
        utilisation.idxmax() == "pve1" and utilisation["pve1"] > 3 * utilisation.drop("pve1").max()
    )


def test_example_in_the_docs_loads() -> None:
    text = (ROOT / "docs" / "snapshot.md").read_text(encoding="utf-8")
    block = re.search(r"```json\n(.*?)```", text, re.DOTALL)
    assert block is not None
    snapshot, config = load_snapshot(io.StringIO(block.group(1)))
    assert np.isnan(snapshot.nodes.loc["pve2", "disk_bytes"])
    assert config is not None and config.rules.anti_affinity[0].vms == ["101", "111"]


def example_document() -> dict[str, Any]:
    return json.loads(EXAMPLE.read_text(encoding="utf-8"))


def error_of(document: Any, tmp_path: Path) -> str:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(document) if not isinstance(document, str) else document)
    with pytest.raises(SnapshotError) as caught:
        load_snapshot(path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path}:")
    return message[len(str(path)) :]


def broken(change: str) -> dict[str, Any]:
    document = example_document()
    if change == "load type":
        document["vms"][3]["load"]["cpu"] = "lots"
    elif change == "unknown resource":
        document["nodes"][1]["capacity"]["gpu"] = 4
    elif change == "negative":
        document["vms"][0]["load"]["disk_bytes"] = -1
    elif change == "unknown node":
        document["vms"][5]["node"] = "pve9"
    elif change == "duplicate vm":
        document["vms"][1]["vm"] = document["vms"][0]["vm"]
    elif change == "extra field":
        document["vms"][2]["colour"] = "red"
    elif change == "naive time":
        document["taken_at"] = "2026-09-21T14:13:20"
    elif change == "bad config":
        document["config"]["balance"]["trigger"] = 7
    elif change == "missing nodes":
        del document["nodes"]
    return document


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ("load type", ": vms.3.load.cpu: Input should be a valid number"),
        ("unknown resource", ": nodes.1.capacity: unknown resource 'gpu'"),
        ("negative", ": vms.0.load: disk_bytes: must be >= 0"),
        ("unknown node", ": vms.5.node: 'pve9' is not in nodes"),
        ("duplicate vm", ": vms: duplicate vm '101'"),
        ("extra field", ": vms.2.colour: Extra inputs are not permitted"),
        ("naive time", ": taken_at: Input should have timezone info"),
        ("bad config", ": config.balance.trigger: Input should be less than or equal to 1"),
        ("missing nodes", ": nodes: Field required"),
    ],
)
def test_bad_fields_are_named(change: str, expected: str, tmp_path: Path) -> None:
    assert error_of(broken(change), tmp_path).startswith(expected)


def test_wrong_format_version_and_json(tmp_path: Path) -> None:
    assert "not a vmbalance snapshot" in error_of({"nodes": []}, tmp_path)
    assert "not a vmbalance snapshot" in error_of([1, 2], tmp_path)
    document = example_document()
    document["version"] = 2
    assert error_of(document, tmp_path) == (
        ": snapshot version 2 is not supported (this vmbalance reads version 1)"
    )
    assert error_of('{"format": "vmbalance-snapshot",\n "version": 1,,}', tmp_path).startswith(
        ":2:15: invalid JSON:"
    )
    document = example_document()
    document["vms"][0]["load"]["cpu"] = float("nan")
    assert "vms.0.load.cpu" in error_of(json.dumps(document), tmp_path)


def test_missing_file() -> None:
    with pytest.raises(SnapshotError, match=r"nope\.json: cannot read: No such file"):
        load_snapshot("nope.json")
