"""Which VMs moved and when they left each node: the departures query, asked only for the VMs
that moved, finds exactly them on a real Prometheus and VictoriaMetrics, whatever their ids."""

from __future__ import annotations

import json
import math
import random
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devkit.servers import PrometheusServer, VictoriaMetricsServer, backfill
from recommender.config import Config
from recommender.quoting import promql_regex_alternatives, promql_string, regex_batches
from recommender.source.cluster import first_samples, last_samples, unsettled
from recommender.source.grid import GRID_QUERIES
from recommender.source.prometheus import PrometheusSource
from recommender.source.queries import DEPARTURE_QUERY_CHARS, SnapshotQueries

pytestmark = pytest.mark.slow

STEP = 60
SAMPLES = 120
# Ids full of regex and string syntax; each decoy matches an id's characters read as a regex.
MOVED = ["a.b", "x|y", 'q"uote', "back\\slash", "(p)", "[c]", "s*", "new\nline", "\u202eb"]
DECOYS = ["aXb", "x", "y", "p", "c", "sss", "new"]
# VMs that started 20 minutes before the end: the only ones not settled on their node.
YOUNG = ["young.1", "young|2"]
YOUNG_SAMPLES = 20


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _history(end: float) -> str:
    """Every VM on pve1 for the first half, then the moved ones on pve2, decoys stay."""
    lines = ["# TYPE vmbalance_vm_info gauge"]
    half = SAMPLES // 2
    for vm in MOVED + DECOYS:
        for k in range(SAMPLES):
            t = end - (SAMPLES - 1 - k) * STEP
            node = "pve2" if vm in MOVED and k >= half else "pve1"
            labels = f'node="{node}",vm="{_escape(vm)}",name="n"'
            lines.append(f"vmbalance_vm_info{{{labels}}} 1 {t:.0f}")
    for vm in YOUNG:
        for k in range(SAMPLES - YOUNG_SAMPLES, SAMPLES):
            t = end - (SAMPLES - 1 - k) * STEP
            lines.append(f'vmbalance_vm_info{{node="pve1",vm="{_escape(vm)}",name="n"}} 1 {t:.0f}')
    lines.append("# EOF")
    return "\n".join(lines) + "\n"


def _vm_text(om: str) -> str:
    """The same samples with millisecond timestamps for VictoriaMetrics."""
    out = []
    for line in om.splitlines():
        if line.startswith("#"):
            continue
        head, stamp = line.rsplit(" ", 1)
        out.append(f"{head} {int(stamp) * 1000}")
    return "\n".join(out) + "\n"


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[float, dict[str, str]]]:
    tmp: Path = tmp_path_factory.mktemp("departures")
    end = math.floor(time.time() / 3600) * 3600 - 7200.0
    om = _history(end)
    (tmp / "h.om").write_text(om, encoding="utf-8")
    backfill(tmp / "h.om", tmp / "prom-data")
    with (
        PrometheusServer(tmp, data_dir=tmp / "prom-data") as prometheus,
        VictoriaMetricsServer(tmp) as victoria,
    ):
        victoria.import_prometheus(_vm_text(om))
        yield end, {"prometheus": prometheus.url, "victoriametrics": victoria.url}


@pytest.mark.parametrize("server", ["prometheus", "victoriametrics"])
def test_moved_vms_and_their_departures(servers: tuple[float, dict[str, str]], server: str) -> None:
    end, urls = servers
    config = Config.model_validate({"prometheus": {"url": urls[server]}})
    plan = SnapshotQueries.for_config(config)
    source = PrometheusSource(config.prometheus)
    moved = source.query(plan.queries["vm_moved"], end)
    assert sorted(item["metric"]["vm"] for item in moved) == sorted(MOVED)

    (departures,) = plan.departures([item["metric"]["vm"] for item in moved])
    answer = last_samples(source.raw(departures, end), end)
    seen = {(item["metric"]["vm"], item["metric"]["node"]) for item in answer}
    assert seen == {(vm, node) for vm in MOVED for node in ("pve1", "pve2")}
    left = end - (SAMPLES - SAMPLES // 2) * STEP
    for item in answer:
        if item["metric"]["node"] == "pve1":
            assert float(item["value"][1]) == left


@pytest.mark.parametrize("server", ["prometheus", "victoriametrics"])
def test_snapshot_places_and_dates_the_moves(
    servers: tuple[float, dict[str, str]], server: str
) -> None:
    end, urls = servers
    config = Config.model_validate({"prometheus": {"url": urls[server]}})
    source = PrometheusSource(config.prometheus)
    snapshot = source.build_snapshot(config, at=datetime.fromtimestamp(end, UTC))
    left = end - (SAMPLES - SAMPLES // 2) * STEP
    for vm in MOVED:
        assert snapshot.vms.loc[vm, "node"] == "pve2"
        assert snapshot.vms.loc[vm, "last_migration"] == left
    for vm in DECOYS:
        assert snapshot.vms.loc[vm, "node"] == "pve1"
        assert math.isnan(snapshot.vms.loc[vm, "last_migration"])
    # The data's grid, the fixed queries, the departures of the VMs that moved and the
    # arrivals of the young.
    assert (
        source.queries_issued == GRID_QUERIES + len(SnapshotQueries.for_config(config).queries) + 2
    )
    for vm in YOUNG:
        assert snapshot.vms.loc[vm, "node"] == "pve1"


@pytest.mark.parametrize("server", ["prometheus", "victoriametrics"])
def test_only_the_vms_not_settled_have_their_first_sample_read(
    servers: tuple[float, dict[str, str]], server: str
) -> None:
    end, urls = servers
    config = Config.model_validate({"prometheus": {"url": urls[server]}})
    plan = SnapshotQueries.for_config(config)
    source = PrometheusSource(config.prometheus)
    seen = source.query(plan.queries["vm_seen_now"], end)
    settled = source.query(plan.queries["vm_settled"], end)
    # The moved VMs arrived on pve2 at the window's start: settled there, as the decoys.
    young = unsettled(seen, settled)
    assert young == sorted(YOUNG)
    (arrivals,) = plan.arrivals(young)
    firsts = first_samples(source.raw(arrivals, end), end - plan.window, end)
    first = end - (YOUNG_SAMPLES - 1) * STEP
    assert {item["metric"]["vm"]: float(item["value"][1]) for item in firsts} == dict.fromkeys(
        YOUNG, first
    )
    assert plan.arrivals([]) == []


def _matcher(promql: str) -> re.Pattern[str]:
    """The regex of the one `vm=~"..."` in `promql` (both servers anchor it at both ends)."""
    (literal,) = re.findall(r'vm=~("(?:[^"\\\\]|\\\\.)*")', promql)
    return re.compile(json.loads(literal))


def test_departures_are_split_to_stay_under_the_query_length() -> None:
    plan = SnapshotQueries.for_config(Config())
    assert plan.departures([]) == []
    rng = random.Random(5)
    many = sorted({f"c{rng.randrange(50):02d}-vm{rng.randrange(10**6):06d}" for _ in range(8000)})
    queries = plan.departures(many)
    assert len(queries) > 1
    assert all(len(q) < DEPARTURE_QUERY_CHARS + 200 for q in queries)
    matchers = [_matcher(q) for q in queries]
    assert all(sum(bool(m.fullmatch(vm)) for m in matchers) == 1 for vm in many)
    # Shared prefixes written once: far more ids per query than listed whole.
    listed = len(promql_regex_alternatives(many[:1])) * len(many)
    assert len(queries) < listed / DEPARTURE_QUERY_CHARS / 1.5


def test_regex_alternatives_are_literal() -> None:
    assert promql_string('a"b\\c\nd') == '"a\\"b\\\\c\\nd"'
    assert promql_regex_alternatives(["a.b", "x|y"]) == '"a\\\\.b|x\\\\|y"'
    assert promql_regex_alternatives(["vm-1001", "vm-1002", "vm-1003"]) == '"vm-100(?:1|2|3)"'


NAME_CHARACTERS = st.sampled_from([*'ab1-.|()[]{}*+?^$\\"\n', "\u202e", "é"])
NAMES = st.text(NAME_CHARACTERS, max_size=8)


@settings(max_examples=300, deadline=None)
@given(st.sets(NAMES, max_size=25), st.sets(NAMES, max_size=25), st.integers(20, 400))
def test_regex_batches_match_exactly_the_values_and_fit(
    values: set[str], others: set[str], chars: int
) -> None:
    batches = list(regex_batches(values, chars))
    assert [v for batch in batches for v in batch] == sorted(values)
    for batch in batches:
        literal = promql_regex_alternatives(batch)
        assert len(literal) <= chars or len(batch) == 1
        pattern = re.compile(json.loads(literal))
        assert all(pattern.fullmatch(v) for v in batch)
        assert not any(pattern.fullmatch(v) for v in others - set(batch))
        whole = ("".join("\\" + c if c in "\\.+*?()|[]{}^$" else c for c in v) for v in batch)
        assert len(literal) <= len(promql_string("|".join(whole)))
