"""The recording rules' imbalance is the recommender's (recommender/engine/measure.py).

A simulated cluster history is backfilled into a real Prometheus together with what
`vmbalance serve` would publish, in three phases: serve with the simulator's capacities and
the default weights; serve with one node in maintenance, other weights and another trigger;
no serve at all (the rules fall back to the exporter's CPUs and memory and the default
config). Recording rules are not evaluated on backfilled data, so each rule's `expr` is read
from alerts/vmbalance.rules.yml with the recording rules it uses inlined, and evaluated as an
instant query at sample times. The reference is measure.py on the loads the simulator knows
are true over the same 5-minute window.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml

from devkit.servers import PrometheusServer, backfill
from devkit.simulate import ClusterHistory, simulate_cluster, to_openmetrics
from recommender.config import BalanceSettings, CapacitySettings
from recommender.engine.measure import imbalance_per_resource, overall_imbalance, weight_vector
from recommender.model import RESOURCES

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "alerts" / "vmbalance.rules.yml"

STEP = 60.0
RATE_WINDOW = 300.0  # the rules' rate(...[5m])
MINUTE = 60.0
# The simulator writes CPU counters rounded to 1 ms and byte and op counters floored to whole
# units; over a 5-minute window that moves a utilisation by at most a few 1e-6.
TOLERANCE = 1e-5

# Phases, in minutes after the history's start.
PHASE_A = (20, 70)  # serve: simulator capacities, default weights and trigger
PHASE_B = (70, 120)  # serve: pve2 in maintenance, other weights, trigger 0.15
# After 120 min: no serve.
MIGRATIONS = (48, 92, 140)
EVAL_MINUTES = (40, 56, 65, 80, 100, 116, 128, 150, 178)

PHASE_B_WEIGHTS = {"cpu": 0.5, "memory": 1.0, "disk_bytes": 3.0, "disk_ops": 0.0, "network": 1.0}
PHASE_B_MAINTENANCE = "pve2"
PHASE_B_TRIGGER = 0.15


# --- inlining recording rules ------------------------------------------------------------


def load_records(path: Path = RULES) -> dict[str, str]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    return {
        rule["record"]: str(rule["expr"])
        for group in data["groups"]
        for rule in group["rules"]
        if "record" in rule
    }


def inline(expr: str, records: Mapping[str, str]) -> str:
    """`expr` with every recording rule it reads replaced by that rule's (inlined) expr.

    A recorded series read with a label matcher or a range cannot be replaced by an
    expression; the rules never do that (checked here)."""
    names = sorted(records, key=len, reverse=True)
    pattern = re.compile(r"(?<![\w:])(" + "|".join(map(re.escape, names)) + r")(?![\w:])")

    def replace(match: re.Match[str]) -> str:
        following = expr[match.end() :].lstrip()
        assert not following.startswith(("{", "[")), f"{match.group(1)} is read with {{ or ["
        return "(" + inline(records[match.group(1)], records) + ")"

    return pattern.sub(replace, expr)


def test_inline_expands_nested_rules() -> None:
    records = {"a:b:c": "sum(x)", "d:e:f": "a:b:c * 2", "g:h:i": "d:e:f / a:b:c"}
    assert inline("g:h:i + 1", records) == "(((sum(x)) * 2) / (sum(x))) + 1"
    with pytest.raises(AssertionError):
        inline("a:b:c{node='x'}", records)


# --- serve's series ----------------------------------------------------------------------


def _serve_openmetrics(history: ClusterHistory) -> str:
    """The gauges vmbalance serve publishes for the rules, phase by phase."""
    start = history.start
    times_a = start + MINUTE * np.arange(PHASE_A[0], PHASE_A[1])
    times_b = start + MINUTE * np.arange(PHASE_B[0], PHASE_B[1])
    both = np.concatenate([times_a, times_b])
    defaults = BalanceSettings().weights
    lines: list[str] = []

    def family(name: str, rows: Sequence[tuple[str, np.ndarray, Sequence[float]]]) -> None:
        lines.append(f"# TYPE {name} gauge")
        for labels, times, values in rows:
            lines.extend(
                f"{name}{{{labels}}} {v!r} {int(t)}" for t, v in zip(times, values, strict=True)
            )

    capacities = []
    for node in history.nodes:
        caps = {
            "cpu": node.cpus,
            "memory": node.memory_bytes,
            "disk_bytes": node.disk_bytes,
            "disk_ops": node.disk_ops,
            "network": node.network,
        }
        for resource in RESOURCES:
            labels = f'node="{node.name}",resource="{resource}"'
            capacities.append((labels, both, [float(caps[resource])] * len(both)))
    family("vmbalance_recommender_node_capacity", capacities)
    maintenance = []
    for node in history.nodes:
        flag_b = 1.0 if node.name == PHASE_B_MAINTENANCE else 0.0
        values = [0.0] * len(times_a) + [flag_b] * len(times_b)
        maintenance.append((f'node="{node.name}"', both, values))
    family("vmbalance_recommender_node_maintenance", maintenance)
    weights = []
    for resource in RESOURCES:
        values = [defaults.get(resource, 0.0)] * len(times_a) + [PHASE_B_WEIGHTS[resource]] * len(
            times_b
        )
        weights.append((f'resource="{resource}"', both, values))
    family("vmbalance_recommender_weight", weights)
    trigger = [BalanceSettings().trigger] * len(times_a) + [PHASE_B_TRIGGER] * len(times_b)
    family("vmbalance_recommender_trigger_ratio", [("", both, trigger)])
    lines.append("# EOF")
    return "\n".join(lines).replace("{}", "") + "\n"


# --- the reference -----------------------------------------------------------------------


@dataclass(frozen=True)
class Expected:
    per_resource: dict[str, float]
    overall: float
    utilisation: dict[tuple[str, str], float]
    trigger: float


def expected_at(history: ClusterHistory, t: float) -> Expected:
    """measure.py on the true 5-minute loads at t, with what the rules know at t."""
    minute = (t - history.start) / MINUTE
    in_a = PHASE_A[0] <= minute < PHASE_A[1]
    in_b = PHASE_B[0] <= minute < PHASE_B[1]
    defaults_cap = CapacitySettings()
    balance = BalanceSettings()
    weights = PHASE_B_WEIGHTS if in_b else balance.weights
    trigger = PHASE_B_TRIGGER if in_b else balance.trigger
    maintenance = {PHASE_B_MAINTENANCE} if in_b else set()
    snapshot = history.truth_snapshot(at=t, window=RATE_WINDOW)
    nodes = snapshot.nodes.copy()
    if not (in_a or in_b):
        for resource in ("disk_bytes", "disk_ops", "network"):
            nodes[resource] = float(getattr(defaults_cap, resource))
    names = list(nodes.index)
    capacity = nodes[list(RESOURCES)].to_numpy(dtype=float)
    vms = snapshot.vms.copy()
    # balance.memory_mode "assigned": the memory load is the assigned memory.
    vms["memory"] = vms["memory_max_bytes"]
    load = np.zeros_like(capacity)
    for _vm, row in vms.iterrows():
        load[names.index(row["node"])] += row[list(RESOURCES)].to_numpy(dtype=float)
    active = np.array([n not in maintenance for n in names])
    per = imbalance_per_resource(load[active], capacity[active])
    w = weight_vector(weights, RESOURCES)
    overall = overall_imbalance(np.where(w > 0, per, 0.0), w)
    utilisation = {
        (node, resource): load[i, j] / capacity[i, j]
        for i, node in enumerate(names)
        for j, resource in enumerate(RESOURCES)
    }
    return Expected(dict(zip(RESOURCES, per.tolist(), strict=True)), overall, utilisation, trigger)


# --- the server --------------------------------------------------------------------------


@dataclass
class Backfilled:
    history: ClusterHistory
    prometheus: PrometheusServer


@pytest.fixture(scope="module")
def backfilled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backfilled]:
    tmp = tmp_path_factory.mktemp("imbalance-rules")
    end = math.floor(time.time() / 3600) * 3600 - 3600.0
    history = simulate_cluster(
        11,
        nodes=4,
        vms=24,
        duration=3 * 3600,
        step=STEP,
        end=end,
        migration_offsets=[m * MINUTE for m in MIGRATIONS],
    )
    data = tmp / "om"
    data.mkdir()
    to_openmetrics(history, data / "history.om")
    (data / "serve.om").write_text(_serve_openmetrics(history), encoding="utf-8")
    backfill(data, tmp / "prom-data")
    with PrometheusServer(tmp, data_dir=tmp / "prom-data") as prometheus:
        yield Backfilled(history, prometheus)


def _query(prometheus: PrometheusServer, promql: str, at: float) -> list[dict]:
    """Instant query by POST (the inlined expressions are long)."""
    response = requests.post(
        prometheus.url + "/api/v1/query", data={"query": promql, "time": f"{at:.3f}"}, timeout=60
    )
    body = response.json()
    assert response.status_code == 200 and body["status"] == "success", body
    return list(body["data"]["result"])


def _eval_times(history: ClusterHistory) -> list[float]:
    times = [history.start + m * MINUTE for m in EVAL_MINUTES]
    for t in times:
        # On the sample grid, and no migration in the last 6 minutes (a VM that just moved is
        # split between two nodes' 5m rates, and its old node's gauges linger in the lookback).
        assert (t - history.start) % STEP == 0
        assert all(not (0 <= t - m.time < 360) for m in history.migrations)
    return times


def test_imbalance_rules_equal_measure(backfilled: Backfilled) -> None:
    history, prometheus = backfilled.history, backfilled.prometheus
    records = load_records()
    per_resource_q = inline("resource:vmbalance_imbalance:ratio", records)
    overall_q = inline("cluster:vmbalance_imbalance:ratio", records)
    trigger_q = inline("cluster:vmbalance_imbalance_trigger:ratio", records)
    utilisation_q = inline("node_resource:vmbalance_utilisation:ratio", records)
    checked = 0
    for t in _eval_times(history):
        expected = expected_at(history, t)
        got = {
            r["metric"]["resource"]: float(r["value"][1])
            for r in _query(prometheus, per_resource_q, t)
        }
        assert set(got) == set(RESOURCES)
        for resource in RESOURCES:
            assert got[resource] == pytest.approx(expected.per_resource[resource], abs=TOLERANCE), (
                t,
                resource,
            )
        (overall,) = _query(prometheus, overall_q, t)
        assert float(overall["value"][1]) == pytest.approx(expected.overall, abs=TOLERANCE), t
        (trigger,) = _query(prometheus, trigger_q, t)
        assert float(trigger["value"][1]) == pytest.approx(expected.trigger), t
        utilisation = {
            (r["metric"]["node"], r["metric"]["resource"]): float(r["value"][1])
            for r in _query(prometheus, utilisation_q, t)
        }
        assert utilisation.keys() == expected.utilisation.keys()
        for key, value in expected.utilisation.items():
            assert utilisation[key] == pytest.approx(value, abs=TOLERANCE), (t, key)
        checked += 1
    assert checked == len(EVAL_MINUTES)


def test_phases_make_a_difference(backfilled: Backfilled) -> None:
    """The three phases give different answers, so the comparison above would notice a rule
    that ignored serve's capacities, maintenance or weights."""
    history = backfilled.history
    a, b, c = (expected_at(history, history.start + m * MINUTE) for m in (65, 100, 150))
    assert len({round(a.overall, 6), round(b.overall, 6), round(c.overall, 6)}) == 3
    # In phase B the rules must leave pve2 out: counting it changes the answer.
    t = history.start + 100 * MINUTE
    records = load_records()
    without_maintenance = inline("resource:vmbalance_imbalance:ratio", records).replace(
        "vmbalance_recommender_node_maintenance", "vmbalance_recommender_node_maintenance_absent"
    )
    got = {
        r["metric"]["resource"]: float(r["value"][1])
        for r in _query(backfilled.prometheus, without_maintenance, t)
    }
    assert any(
        got[r] != pytest.approx(expected_at(history, t).per_resource[r], abs=100 * TOLERANCE)
        for r in RESOURCES
    )
