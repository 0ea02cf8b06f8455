"""Every input the command line reads is checked up front: one line naming the field, exit 2,
never a traceback."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from devkit.service import free_port
from exporter.web import WebConfigError
from exporter.web import parse_listen as exporter_parse_listen
from recommender.config import Config
from recommender.faces.cli import build_parser
from recommender.listen import parse_listen
from recommender.model import Snapshot, make_nodes, make_vms
from recommender.plan import build_plan
from recommender.snapshot import save_snapshot
from tests.conftest import REPO

EXAMPLE = REPO / "recommender" / "examples" / "snapshot.json"
GIB = 1024**3


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "recommender.cli", *args],
        input=stdin, capture_output=True, text=True, timeout=120, cwd=REPO, check=False,
    )  # fmt: skip


def one_line_error(result: subprocess.CompletedProcess[str], *expected: str) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vmbalance: "), result.stderr
    for part in expected:
        assert part in lines[0], lines[0]
    return lines[0]


def example() -> dict[str, Any]:
    return json.loads(EXAMPLE.read_text())


def write(tmp_path: Path, document: Any, name: str = "snap.json") -> Path:
    path = tmp_path / name
    path.write_text(document if isinstance(document, str) else json.dumps(document))
    return path


@pytest.mark.parametrize("command", ["plan", "snapshot", "report"])
def test_a_broken_url_is_one_line_in_every_command(command: str, tmp_path: Path) -> None:
    extra = {"plan": [], "snapshot": ["-o", str(tmp_path / "s.json")],
             "report": ["--out", str(tmp_path / "r")]}[command]  # fmt: skip
    for url in ("http://[::1", "ftp://prometheus:9090", "http://host:port", "prometheus:9090"):
        one_line_error(run(command, "--prometheus-url", url, *extra), "--prometheus-url")


def test_config_check_rejects_a_broken_url_and_listen_address(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text('prometheus:\n  url: "http://[::1"\nserve:\n  listen: "::1:9643"\n')
    result = run("config", "check", str(bad))
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert lines[0] == f"vmbalance: {bad}:2: prometheus.url: not a valid URL: Invalid IPv6 URL"
    assert lines[1].startswith(f"vmbalance: {bad}:4: serve.listen: ")


def test_a_deeply_nested_snapshot_is_refused(tmp_path: Path) -> None:
    deep = write(tmp_path, "[" * 100_000 + "]" * 100_000)
    one_line_error(run("plan", "--input", str(deep)), "nested deeper than 32 levels")
    document = example()
    document["warnings"] = [json.loads("[" * 40 + "]" * 40)]
    one_line_error(run("plan", "--input", str(write(tmp_path, document))), "nested")


def test_a_deeply_nested_config_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "deep.yaml"
    config.write_text("rules: " + "[" * 50_000 + "]" * 50_000 + "\n")
    one_line_error(run("config", "check", str(config)), "nested too deeply")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (True, "vms.0.load.cpu: Input should be a valid number"),
        ("0.5", "vms.0.load.cpu: Input should be a valid number"),
        (1e308, "vms.0.load: cpu: must be >= 0 and <= 1e18"),
    ],
)
def test_loads_are_strict_numbers(value: Any, expected: str, tmp_path: Path) -> None:
    document = example()
    document["vms"][0]["load"]["cpu"] = value
    one_line_error(run("plan", "--input", str(write(tmp_path, document))), expected)


def test_maintenance_is_a_json_boolean(tmp_path: Path) -> None:
    document = example()
    document["nodes"][0]["maintenance"] = 1
    one_line_error(run("plan", "--input", str(write(tmp_path, document))), "nodes.0.maintenance")


def test_a_capacity_too_small_for_its_load_gives_no_infinite_numbers(tmp_path: Path) -> None:
    document = example()
    document["nodes"][0]["capacity"]["cpu"] = 1e-300
    one_line_error(
        run("plan", "--input", str(write(tmp_path, document)), "-o", "json"),
        "node pve1: its cpu load is",
        "times its capacity",
    )


def test_config_booleans_are_not_numbers(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        "balance:\n  trigger: yes\n  max_migrations: true\ncapacity:\n  disk_bytes: 1.25e9\n"
    )
    result = run("config", "check", str(config))
    assert result.returncode == 2
    assert [line.split(": ", 2)[1:] for line in result.stderr.splitlines()] == [
        [f"{config}:2", "balance.trigger: must be a number, not true/false"],
        [f"{config}:3", "balance.max_migrations: must be a number, not true/false"],
    ]


def test_input_dash_reads_stdin() -> None:
    result = run("plan", "-i", "-", "-o", "json", stdin=EXAMPLE.read_text())
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["format"] == "vmbalance-plan"
    one_line_error(run("plan", "-i", "-", stdin="{not json"), "<stdin>:1:2: invalid JSON")


def test_at_is_for_one_serve_run_only() -> None:
    one_line_error(run("serve", "--at", "2026-01-01T00:00:00Z"), "--at goes with --once")


def test_a_missing_password_file_names_the_option() -> None:
    line = one_line_error(run("plan", "--password-file", "/nonexistent/password"))
    assert line == (
        "vmbalance: --password-file /nonexistent/password: cannot read: No such file or directory"
    )


@pytest.mark.parametrize(
    "vms",
    [{}, {"101": {"node": "pve1"}, "102": {"node": "pve2"}}],
    ids=["no VMs", "every load unknown"],
)
def test_no_vm_with_data_is_exit_2(vms: dict[str, Any], tmp_path: Path) -> None:
    caps = {"cpu": 16, "memory": 64 * GIB, "disk_bytes": 1e9, "disk_ops": 5e4, "network": 1e9}
    nodes = make_nodes({"pve1": caps, "pve2": caps})
    path = tmp_path / "empty.json"
    save_snapshot(Snapshot(nodes=nodes, vms=make_vms(vms)), path)
    for fmt in ("table", "json"):
        one_line_error(run("plan", "--input", str(path), "-o", fmt), "no VM has data")


def test_triggered_means_balancing_ran_and_evacuations_do_not_need_it() -> None:
    """A balanced cluster with a node in maintenance: the node is evacuated, `triggered` stays
    false (docs/plan-format.md says so)."""
    caps = {"cpu": 32, "memory": 256 * GIB, "disk_bytes": 1e9, "disk_ops": 5e4, "network": 1e9}
    nodes = make_nodes({"a": caps, "b": caps, "c": {**caps, "maintenance": True}})
    load = {"cpu": 2.0, "memory": 8 * GIB, "memory_max_bytes": 8 * GIB, "disk_bytes": 1e8,
            "disk_ops": 100, "network": 1e7}  # fmt: skip
    vms = make_vms({"1": {**load, "node": "a"}, "2": {**load, "node": "b"},
                    "3": {**load, "node": "c"}})  # fmt: skip
    plan = build_plan(Snapshot(nodes=nodes, vms=vms), Config())
    assert not plan.triggered
    assert [(m.vm, m.kind) for m in plan.migrations] == [("3", "evacuate")]
    row = next(
        line for line in (REPO / "docs" / "plan-format.md").read_text().splitlines()
        if line.startswith("| `triggered` |")
    )  # fmt: skip
    assert "or a node is in maintenance" not in row
    assert "Evacuations (`kind: evacuate`)" in row and "`triggered: false`" in row


def all_parsers(parser: argparse.ArgumentParser, name: str = "vmbalance") -> list[tuple[str, Any]]:
    found = [(name, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                found += all_parsers(sub, f"{name} {sub_name}")
    return found


def test_every_command_and_flag_has_help() -> None:
    for name, parser in all_parsers(build_parser()):
        assert parser.description, f"{name} has no description"
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:
                    assert choice.help, f"{name} {choice.dest} has no help"
                continue
            assert action.help and action.help != argparse.SUPPRESS, (name, action.dest)
    plan_help = run("plan", "--help")
    assert plan_help.returncode == 0
    assert "Read the cluster" in plan_help.stdout and "--out-file FILE" in plan_help.stdout


LISTEN_CASES = [
    ("127.0.0.1:9643", ("127.0.0.1", 9643)),
    (":9643", ("0.0.0.0", 9643)),
    ("[::1]:9643", ("::1", 9643)),
    ("[::]:9643", ("::", 9643)),
    ("localhost:1", ("localhost", 1)),
    ("::1:9643", None),
    ("[::1:9643", None),
    ("[nope]:9643", None),
    ("host:0", None),
    ("host:65536", None),
    ("host:９６", None),
    ("host", None),
    ("a b:80", None),
    ("-h:80", None),
]


@pytest.mark.parametrize(("listen", "expected"), LISTEN_CASES)
def test_exporter_and_recommender_read_listen_alike(listen: str, expected: Any) -> None:
    if expected is None:
        with pytest.raises(ValueError):
            parse_listen(listen)
        with pytest.raises(WebConfigError):
            exporter_parse_listen(listen)
        return
    address = parse_listen(listen)
    assert (address.host, address.port) == expected == exporter_parse_listen(listen)


def test_serve_listens_on_ipv6(tmp_path: Path) -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "recommender.cli", "serve", "--listen", f"[::1]:{port}",
         "--prometheus-url", f"http://127.0.0.1:{free_port()}", "--interval", "60"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        answer = None
        while time.monotonic() < deadline and answer is None:
            try:
                answer = requests.get(f"http://[::1]:{port}/-/healthy", timeout=2)
            except requests.RequestException:
                if process.poll() is not None:
                    break
                time.sleep(0.2)
        assert answer is not None and answer.text == "ok\n", process.poll()
    finally:
        process.terminate()
        _, log = process.communicate(timeout=30)
    assert "Traceback" not in log
