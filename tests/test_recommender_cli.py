"""`vmbalance` as operators run it: formats, exit codes, one-line errors, hostile names."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from markdown_it import MarkdownIt

from devkit.service import free_port
from recommender.model import Snapshot, make_nodes, make_vms
from recommender.snapshot import save_snapshot
from tests.conftest import REPO

EXAMPLE = REPO / "recommender" / "examples" / "snapshot.json"
GIB = 1024**3
HOSTILE_IDS = [
    "; rm -rf / #",
    "$(touch pwned)",
    "a|b`c`",
    "<b>x</b>\nsecond line",
    "[link](http://evil)",
    "-h",
]


def run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "recommender.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        check=False,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], expected: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vmbalance: "), result.stderr
    assert expected in lines[0]


@pytest.fixture
def hostile_snapshot(tmp_path: Path) -> Path:
    """One hot node whose VMs all have tenant-chosen, hostile libvirt domain names."""
    caps = {"cpu": 32, "memory": 256 * GIB, "disk_bytes": 1e9, "disk_ops": 5e4, "network": 1e9}
    nodes = make_nodes({"kvm1": caps, "kvm2": caps, "kvm3": caps})
    rows: dict[str, dict[str, object]] = {}
    for i, vm in enumerate(HOSTILE_IDS):
        rows[vm] = {
            "name": vm + " | name",
            "node": "kvm1",
            "cpu": 3.0,
            "memory": 8 * GIB,
            "memory_max_bytes": 8 * GIB,
            "disk_bytes": 1.2e8 + i,
            "disk_ops": 2000,
            "network": 5e7,
        }
    rows["quiet"] = {**rows[HOSTILE_IDS[0]], "name": "quiet", "node": "kvm2", "disk_bytes": 1e6}
    snapshot = Snapshot(nodes=nodes, vms=make_vms(rows), source="test")
    path = tmp_path / "hostile.json"
    save_snapshot(snapshot, path)
    return path


def test_plan_formats_from_the_example_snapshot(tmp_path: Path) -> None:
    table = run("plan", "--input", str(EXAMPLE))
    assert table.returncode == 0, table.stderr
    assert "Imbalance" in table.stdout and "overall" in table.stdout

    result = run("plan", "--input", str(EXAMPLE), "--output", "json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["format"] == "vmbalance-plan" and doc["version"] == 1
    assert doc["imbalance"]["after"]["overall"] <= doc["imbalance"]["before"]["overall"]
    steps = [m["step"] for m in doc["migrations"]]
    assert sorted(step for wave in doc["waves"] for step in wave) == steps
    assert all(m["command"].startswith("qm migrate ") for m in doc["migrations"])

    markdown = run("plan", "--input", str(EXAMPLE), "--output", "markdown")
    assert markdown.returncode == 0
    tokens = MarkdownIt("commonmark").enable("table").parse(markdown.stdout)
    headings = [tokens[i + 1].content for i, t in enumerate(tokens) if t.type == "heading_open"]
    assert "Migration plan" in headings and "Imbalance per resource" in headings

    out = tmp_path / "plan.sh"
    commands = run("plan", "--input", str(EXAMPLE), "--output", "commands", "--out-file", str(out))
    assert commands.returncode == 0
    assert subprocess.run(["bash", "-n", str(out)], check=False).returncode == 0


def test_hostile_names_stay_inert_in_every_format(hostile_snapshot: Path, tmp_path: Path) -> None:
    doc = json.loads(run("plan", "--input", str(hostile_snapshot), "-o", "json").stdout)
    moved = {m["vm"] for m in doc["migrations"]}
    assert moved & set(HOSTILE_IDS), doc
    assert doc["commands"] == "libvirt"

    script = run("plan", "--input", str(hostile_snapshot), "-o", "commands").stdout
    # Run the script with virsh replaced by a recorder: each migration must reach virsh as
    # exactly one --domain argument, and nothing else may run.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "argv"
    (bin_dir / "virsh").write_text(f"#!/bin/bash\nprintf '%s\\0' \"$@\" >> {record}\n")
    (bin_dir / "virsh").chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
    done = subprocess.run(["bash", "-c", script], cwd=work, env=env, capture_output=True)
    assert done.returncode == 0, done.stderr
    assert list(work.iterdir()) == []
    args = record.read_bytes().decode().split("\0")
    domains = {a.removeprefix("--domain=") for a in args if a.startswith("--domain=")}
    assert domains == moved

    markdown = run("plan", "--input", str(hostile_snapshot), "-o", "markdown").stdout
    md = MarkdownIt("commonmark").enable("table")
    rendered = md.render(markdown)
    assert "<b>" not in rendered and "<a " not in rendered
    rows = [t for t in md.parse(markdown) if t.type == "tr_open"]
    frontier = doc["frontier"]["points"] if doc["frontier"] else []
    trade_off = 1 + len(frontier) if frontier else 0
    # resources, nodes, migrations, the trade-off frontier
    assert len(rows) == (1 + 6) + (1 + 3) + (1 + len(moved)) + trade_off

    table = run("plan", "--input", str(hostile_snapshot))
    assert table.returncode == 0 and "Traceback" not in table.stderr


def test_balanced_cluster_gives_an_empty_plan_and_exit_zero(tmp_path: Path) -> None:
    caps = {"cpu": 16, "memory": 64 * GIB, "disk_bytes": 1e9, "disk_ops": 5e4, "network": 1e9}
    nodes = make_nodes({"a": caps, "b": caps})
    load = {"cpu": 2.0, "memory": 8 * GIB, "memory_max_bytes": 8 * GIB, "disk_bytes": 1e8,
            "disk_ops": 100, "network": 1e7}  # fmt: skip
    vms = make_vms({"1": {**load, "node": "a"}, "2": {**load, "node": "b"}})
    path = tmp_path / "balanced.json"
    save_snapshot(Snapshot(nodes=nodes, vms=vms), path)
    result = run("plan", "--input", str(path), "-o", "json")
    assert result.returncode == 0
    doc = json.loads(result.stdout)
    assert doc["migrations"] == [] and doc["triggered"] is False


def test_operator_errors_are_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("balance:\n  trigger: 5\n")
    assert_one_line_error(run("plan", "--input", str(EXAMPLE), "-c", str(bad)), "bad.yaml:2")
    assert_one_line_error(
        run("plan", "--prometheus-url", f"http://127.0.0.1:{free_port()}", "--timeout", "5"),
        "127.0.0.1",
    )
    broken = tmp_path / "snap.json"
    broken.write_text('{"format": "vmbalance-snapshot", "version": 99}')
    assert_one_line_error(run("plan", "--input", str(broken)), "version")
    assert_one_line_error(run("plan", "--input", str(tmp_path / "missing.json")), "missing.json")
    assert_one_line_error(run("plan", "--input", str(EXAMPLE), "--at", "yesterday"), "--at")


def test_config_check(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("balance:\n  trigger: 0.3\n  target: 0.1\nrules:\n  exclude: [101]\n")
    ok = run("config", "check", str(good))
    assert ok.returncode == 0 and "ok" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("balance:\n  trigger: 0.3\n  taget: 0.1\nquery:\n  window: soon\n")
    result = run("config", "check", str(bad))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2
    assert "bad.yaml:3" in lines[0] and "balance.taget" in lines[0]
    assert "bad.yaml:5" in lines[1] and "query.window" in lines[1]
    defaults = run("config", "defaults")
    assert defaults.returncode == 0 and "trigger: 0.2" in defaults.stdout
