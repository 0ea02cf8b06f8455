"""`vmbalance serve`: metrics and the latest plan; a failing Prometheus is reported, not fatal."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from devkit.servers import PrometheusServer, backfill
from devkit.service import free_port
from devkit.simulate import simulate_cluster, to_openmetrics
from recommender.config import Config
from recommender.faces.serve import Recommender, RecommenderCollector
from recommender.snapshot import load_snapshot
from recommender.source.http import SourceError
from tests.conftest import REPO

EXAMPLE = REPO / "recommender" / "examples" / "snapshot.json"


def metrics_of(text: str) -> dict[str, float]:
    """Samples by name and labels; an empty label is no label, as in PromQL (a snapshot of no
    named cluster publishes `cluster=""`)."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sorted((k, v) for k, v in sample.labels.items() if v != "")
            key = sample.name + "".join(f"{{{k}={v}}}" for k, v in labels)
            values[key] = sample.value
    return values


def scrape(recommender: Recommender) -> dict[str, float]:
    registry = CollectorRegistry()
    registry.register(RecommenderCollector(recommender))
    return metrics_of(generate_latest(registry).decode())


def test_failed_run_keeps_the_last_plan_and_counts_the_error() -> None:
    snapshot, config = load_snapshot(EXAMPLE)
    config = config or Config()
    answers: list[object] = [snapshot, SourceError("prometheus at http://x: connection refused")]

    def source(_: Config):
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    recommender = Recommender(config, snapshot_source=source)
    assert recommender.run_once() is True
    first = scrape(recommender)
    assert first["vmbalance_recommender_up"] == 1
    assert first["vmbalance_recommender_planned_migrations"] >= 1
    assert first["vmbalance_recommender_imbalance_ratio{resource=overall}"] > 0
    assert first["vmbalance_recommender_node_capacity{node=pve1}{resource=cpu}"] > 0
    assert first["vmbalance_recommender_trigger_ratio"] == config.balance.trigger

    assert recommender.run_once() is False
    second = scrape(recommender)
    assert second["vmbalance_recommender_up"] == 0
    assert second["vmbalance_recommender_errors_total"] == 1
    assert second["vmbalance_recommender_runs_total"] == 2
    assert (
        second["vmbalance_recommender_last_success_timestamp_seconds"]
        == first["vmbalance_recommender_last_success_timestamp_seconds"]
    )
    assert recommender.latest().plan_document is not None
    assert "connection refused" in (recommender.latest().last_error or "")


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def wait_until(predicate, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except OSError:
            value = None
        if value:
            return value
        time.sleep(0.3)
    raise TimeoutError("condition not met")


@pytest.mark.slow
def test_serve_process_against_real_prometheus(tmp_path: Path) -> None:
    end = math.floor(time.time() / 15) * 15
    history = simulate_cluster(3, nodes=4, vms=24, duration=2 * 3600, step=15, end=end)
    to_openmetrics(history, tmp_path / "history.om")
    backfill(tmp_path / "history.om", tmp_path / "prom-data")
    port = free_port()
    with PrometheusServer(tmp_path, data_dir=tmp_path / "prom-data") as prometheus:
        config = tmp_path / "vmbalance.yaml"
        config.write_text(
            json.dumps(
                {
                    "prometheus": {"url": prometheus.url, "timeout_seconds": 5},
                    "capacity": history.capacity_settings(),
                    "serve": {"listen": f"127.0.0.1:{port}", "interval_seconds": 1},
                }
            )
        )
        log = (tmp_path / "serve.log").open("wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "recommender.cli", "serve", "-c", str(config)],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            base = f"http://127.0.0.1:{port}"
            metrics = wait_until(
                lambda: (
                    (m := metrics_of(get(base + "/metrics")[1]))
                    and m.get("vmbalance_recommender_up") == 1
                    and m
                )
            )
            assert metrics["vmbalance_recommender_imbalance_ratio{resource=overall}"] > 0
            assert "vmbalance_recommender_last_success_timestamp_seconds" in metrics
            status, body = get(base + "/plan")
            assert status == 200
            plan = json.loads(body)
            assert plan["format"] == "vmbalance-plan"
            assert len(plan["nodes"]) == 4
            prometheus.stop()
            failing = wait_until(
                lambda: (
                    (m := metrics_of(get(base + "/metrics")[1]))
                    and m.get("vmbalance_recommender_errors_total", 0) >= 1
                    and m
                )
            )
            assert failing["vmbalance_recommender_up"] == 0
            assert process.poll() is None
            assert get(base + "/plan")[0] == 200
        finally:
            process.terminate()
            process.wait(timeout=10)
    assert process.returncode == 0


def test_runs_keep_a_fixed_period_whatever_each_takes() -> None:
    from recommender.faces.serve import next_run

    # Every 20 s from t=100: a run of 3.5 s still starts the next at 120, not at 123.5.
    assert next_run(100.0, 103.5, 20.0) == 120.0
    assert next_run(100.0, 120.0, 20.0) == 140.0
    # A run longer than the interval skips the slots it ran over.
    assert next_run(100.0, 147.0, 20.0) == 160.0
