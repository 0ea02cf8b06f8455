"""Every command against a real Prometheus (with basic auth), as an operator's scripts use it:
stdout parsed by strict consumers with the exact solver on, files written through devices,
FIFOs and symlinks, and no credential anywhere the product writes."""

from __future__ import annotations

import json
import math
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import bcrypt
import pytest
import requests
import yaml
from markdown_it import MarkdownIt
from prometheus_client.parser import text_string_to_metric_families

from devkit.servers import PrometheusServer, backfill
from devkit.service import free_port
from devkit.simulate import simulate_cluster, to_openmetrics
from tests.conftest import REPO
from tests.test_output_file import FifoReader, needs_root, null_device

pytestmark = pytest.mark.slow

USER = "planner"
PASSWORD = "pw-Hunter2-4711"
TOKEN = "tok-Bearer-0815"


def solver_is_chatty() -> bool:
    """Whether the installed HiGHS prints on stdout when a solver is created (1.16 does)."""
    code = "import highspy; highspy.Highs()"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    return bool(done.stdout.strip())


@dataclass
class Stack:
    tmp: Path
    prometheus: PrometheusServer
    open_data: Path
    config: Path
    password_file: Path
    at: str

    def args(self, *extra: str) -> list[str]:
        return [
            "-c", str(self.config), "--prometheus-url", self.prometheus.url,
            "--username", USER, "--password-file", str(self.password_file), "--at", self.at,
            *extra,
        ]  # fmt: skip


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("outputs")
    # Older than the short window: every command finds the data only through --at.
    end = math.floor(time.time() / 60) * 60 - 900.0
    history = simulate_cluster(5, nodes=3, vms=12, duration=3 * 3600, step=30, end=end,
                               hostile_names=4)  # fmt: skip
    to_openmetrics(history, tmp / "history.om")
    backfill(tmp / "history.om", tmp / "prom-data")
    shutil.copytree(tmp / "prom-data", tmp / "prom-data-open")
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
    web = tmp / "web.yml"
    web.write_text(yaml.safe_dump({"basic_auth_users": {USER: hashed}}))
    config = tmp / "vmbalance.yaml"
    settings = {
        "capacity": history.capacity_settings(),
        # Low thresholds so there is a plan, and the exact solver on for these 12 VMs.
        "balance": {"trigger": 0.02, "target": 0.01, "exact": "auto", "exact_max_vms": 60},
    }
    config.write_text(yaml.safe_dump(settings))
    password_file = tmp / "password"
    password_file.write_text(PASSWORD + "\n")
    at = datetime.fromtimestamp(end, UTC).isoformat()
    server = PrometheusServer(
        tmp, data_dir=tmp / "prom-data", extra_args=[f"--web.config.file={web}"]
    )
    server.auth = (USER, PASSWORD)
    with server as prometheus:
        yield Stack(tmp, prometheus, tmp / "prom-data-open", config, password_file, at)


def vmbalance(
    *args: str, stdin: bytes | None = None, cwd: Path = REPO
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "recommender.cli", *args],
        input=stdin,
        capture_output=True,
        timeout=300,
        cwd=cwd,
        env={**os.environ, "COLUMNS": "160"},
        check=False,
    )


def ok(result: subprocess.CompletedProcess[bytes]) -> str:
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert b"Traceback" not in result.stderr
    return result.stdout.decode("utf-8")


def bash_accepts(script: str) -> bool:
    return subprocess.run(["bash", "-n"], input=script.encode(), check=False).returncode == 0


def markdown_headings(text: str) -> list[str]:
    tokens = MarkdownIt("commonmark").enable("table").parse(text)
    return [tokens[i + 1].content for i, t in enumerate(tokens) if t.type == "heading_open"]


def test_every_command_prints_only_its_document(stack: Stack, tmp_path: Path) -> None:
    chatty = solver_is_chatty()

    planned = vmbalance("plan", *stack.args("-o", "json"))
    doc = json.loads(ok(planned))
    assert doc["format"] == "vmbalance-plan" and doc["migrations"], doc
    assert doc["triggered"] and doc["method"] in ("exact", "heuristic")
    if chatty:  # the solver's banner reaches neither the document nor stderr
        assert b"HiGHS" not in planned.stderr

    script = ok(vmbalance("plan", *stack.args("-o", "commands")))
    assert script.splitlines()[0] == "#!/bin/bash" and bash_accepts(script)

    markdown = ok(vmbalance("plan", *stack.args("-o", "markdown")))
    assert markdown.startswith("## Migration plan\n")
    assert "Imbalance per resource" in markdown_headings(markdown)

    table = ok(vmbalance("plan", *stack.args()))
    # The table first says when and how the loads were read, then the imbalance.
    assert table.lstrip().startswith("Loads taken at ") and "HiGHS" not in table
    assert table.splitlines()[1].strip() == "Imbalance"

    snapshot = ok(vmbalance("snapshot", *stack.args("-o", "-")))
    assert json.loads(snapshot)["format"] == "vmbalance-snapshot"
    from_stdin = ok(vmbalance("plan", "-i", "-", "-o", "json", stdin=snapshot.encode()))
    assert json.loads(from_stdin)["migrations"] == doc["migrations"]

    metrics = ok(vmbalance("serve", *stack.args("--once")))
    families = {f.name: f for f in text_string_to_metric_families(metrics)}
    assert families["vmbalance_recommender_up"].samples[0].value == 1
    assert metrics.startswith("# HELP ")

    out = tmp_path / "report"
    assert ok(vmbalance("report", *stack.args("--out", str(out), "--period", "2h"))) == (
        f"wrote {out / 'report.md'}\n"
    )
    assert "Recommended plan" in markdown_headings((out / "report.md").read_text())

    defaults = ok(vmbalance("config", "defaults"))
    assert set(yaml.safe_load(defaults)) >= {"prometheus", "balance", "rules", "serve"}
    assert ok(vmbalance("config", "check", str(stack.config))) == f"{stack.config}: ok\n"

    # A document asked for on /dev/stdout arrives there too (the child's stdout is our pipe).
    again = ok(vmbalance("plan", *stack.args("-o", "json", "--out-file", "/dev/stdout")))
    assert json.loads(again)["format"] == "vmbalance-plan"


def writers(stack: Stack, target: Path, out_dir: Path) -> dict[str, tuple[list[str], Path]]:
    """Each command that writes a file, and the path it writes when pointed at `target`."""
    report_md = out_dir / "report.md"
    return {
        "plan": (["plan", *stack.args("-o", "json", "--out-file", str(target))], target),
        "snapshot": (["snapshot", *stack.args("-o", str(target))], target),
        "report": (["report", *stack.args("--out", str(out_dir), "--period", "2h")], report_md),
    }


def check_document(command: str, data: bytes) -> None:
    text = data.decode("utf-8")
    if command == "report":
        assert text.startswith("# vmbalance report")
    else:
        assert json.loads(text)["format"] in ("vmbalance-plan", "vmbalance-snapshot")


@pytest.mark.parametrize("command", ["plan", "snapshot", "report"])
def test_a_fifo_receives_the_document(stack: Stack, tmp_path: Path, command: str) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    args, path = writers(stack, tmp_path / "fifo", out_dir)[command]
    reader = FifoReader(path)
    ok(vmbalance(*args))
    check_document(command, reader.result())
    assert stat.S_ISFIFO(os.lstat(path).st_mode)


@needs_root
@pytest.mark.parametrize("command", ["plan", "snapshot", "report"])
def test_a_device_stays_a_device(stack: Stack, tmp_path: Path, command: str) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    device = null_device(out_dir)
    args, path = writers(stack, device, out_dir)[command]
    if path != device:
        path.symlink_to(device)  # the report's file name, pointing at the device
    ok(vmbalance(*args))
    assert stat.S_ISCHR(os.lstat(device).st_mode)
    assert os.lstat(device).st_rdev == os.makedev(1, 3)


@pytest.mark.parametrize("command", ["plan", "snapshot", "report"])
def test_a_symlink_keeps_pointing_where_it_did(stack: Stack, tmp_path: Path, command: str) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    real = tmp_path / "published" / "document"
    real.parent.mkdir()
    real.write_text("old")
    args, path = writers(stack, tmp_path / "link", out_dir)[command]
    path.symlink_to(real)
    ok(vmbalance(*args))
    assert path.is_symlink() and Path(os.readlink(path)) == real
    check_document(command, real.read_bytes())


def leaks(secret: str, root: Path, outputs: list[bytes]) -> list[str]:
    """Where `secret` appears: files under `root` and the captured outputs."""
    found = [f"output {i}" for i, text in enumerate(outputs) if secret.encode() in text]
    for path in root.rglob("*"):
        if path.is_file() and secret.encode() in path.read_bytes():
            found.append(str(path))
    return found


def run_serve(args: list[str], listen: str, wait_runs: int = 1) -> tuple[bytes, bytes, bytes]:
    """`vmbalance serve` until it has run `wait_runs` times: its /metrics, /plan and log.
    A serving loop plans the present, so `--at` is left out (the runs may find no data)."""
    if "--at" in args:
        where = args.index("--at")
        args = args[:where] + args[where + 2 :]
    process = subprocess.Popen(
        [sys.executable, "-m", "recommender.cli", "serve", *args, "--listen", listen,
         "--interval", "1"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        base = f"http://{listen}"
        deadline = time.monotonic() + 120
        metrics = b""
        while time.monotonic() < deadline:
            try:
                metrics = requests.get(base + "/metrics", timeout=5).content
            except requests.RequestException:
                metrics = b""
            runs = [
                line
                for line in metrics.splitlines()
                if line.startswith(b"vmbalance_recommender_runs_total")
            ]
            if runs and float(runs[0].split()[-1]) >= wait_runs:
                break
            time.sleep(0.3)
        plan = requests.get(base + "/plan", timeout=5).content
    finally:
        process.terminate()
        stdout, stderr = process.communicate(timeout=30)
    return metrics + stdout, plan, stderr


def test_no_credential_is_written_anywhere(stack: Stack, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    outputs: list[bytes] = []

    def record(result: subprocess.CompletedProcess[bytes]) -> subprocess.CompletedProcess[bytes]:
        outputs.extend((result.stdout, result.stderr))
        return result

    prometheus = stack.prometheus
    with_userinfo = prometheus.url.replace("http://", f"http://{USER}:{PASSWORD}@")
    by_url = ["-c", str(stack.config), "--prometheus-url", with_userinfo, "--at", stack.at]
    for args in (stack.args(), by_url):
        ok(record(vmbalance("snapshot", *args, "-o", str(work / "snapshot.json"))))
        snapshot = json.loads((work / "snapshot.json").read_text())
        assert snapshot["config"]["prometheus"]["url"] == prometheus.url
        assert snapshot["source"] == prometheus.url
        for fmt in ("json", "markdown", "commands", "table"):
            ok(record(vmbalance("plan", *args, "-o", fmt, "--out-file", str(work / f"p.{fmt}"))))
        ok(record(vmbalance("report", *args, "--out", str(work / "report"), "--period", "2h")))
        ok(record(vmbalance("serve", *args, "--once")))
        outputs.extend(run_serve(args, f"127.0.0.1:{free_port()}"))
    # Failures name the server too, and must not name the password with it.
    wrong = prometheus.url.replace("http://", f"http://{USER}:not-{PASSWORD}@")
    refused = f"http://{USER}:{PASSWORD}@127.0.0.1:{free_port()}"
    for url in (wrong, refused):
        failed = record(vmbalance("plan", "--prometheus-url", url, "--timeout", "5"))
        assert failed.returncode == 2 and failed.stderr.startswith(b"vmbalance: ")
    assert not leaks(PASSWORD, work, outputs)


def test_no_bearer_token_is_written_anywhere(stack: Stack, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    config = tmp_path / "with-token.yaml"
    settings = yaml.safe_load(stack.config.read_text())
    settings["prometheus"] = {"bearer_token": TOKEN}
    config.write_text(yaml.safe_dump(settings))
    outputs: list[bytes] = []
    with PrometheusServer(tmp_path / "open", data_dir=stack.open_data) as prometheus:
        for extra in (["-c", str(config)], ["-c", str(stack.config), "--bearer-token-file",
                                            str(token_file)]):  # fmt: skip
            args = [*extra, "--prometheus-url", prometheus.url, "--at", stack.at]
            for command in (
                ["snapshot", "-o", str(work / "snapshot.json")],
                ["plan", "-o", "json", "--out-file", str(work / "plan.json")],
                ["plan", "-o", "markdown"],
                ["report", "--out", str(work / "report"), "--period", "2h"],
                ["serve", "--once"],
            ):
                result = vmbalance(*command, *args)
                outputs.extend((result.stdout, result.stderr))
                ok(result)
            outputs.extend(run_serve(args, f"127.0.0.1:{free_port()}"))
    assert (
        "bearer_token"
        not in json.loads((work / "snapshot.json").read_text())["config"]["prometheus"]
    )
    assert not leaks(TOKEN, work, outputs)
