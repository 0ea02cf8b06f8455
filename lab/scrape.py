"""vmbalance-exporter against prometheus-libvirt-exporter on the same libvirtd.

Both read the same QEMU counters through libvirt, so they must agree. Comparing two scrapes
taken one after the other needs a tolerance for the I/O done in between, and a guest's I/O
comes in bursts (one `dd` every half second), so an average rate times the gap is not a
bound. The check used instead needs no tolerance: scrape A, then B, then A again. Counters
only grow, so when both exporters report the same counter, B's value lies between A's two
(`first <= B <= second`). Rounds alternate which exporter is in the middle, so each is
checked against the other, and every scrape is timed (HTTP request wall time) for the
benchmark. The largest plain difference between adjacent scrapes is reported too, as seconds
of that counter's average rate.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import requests
from prometheus_client.parser import text_string_to_metric_families

Key = tuple[str, str, str]  # (counter, vm, disk or "")


@dataclass(frozen=True, slots=True)
class CounterPair:
    """One counter as each exporter names it; `per_disk` counters carry a disk label."""

    ours: str
    peer: str
    per_disk: bool


PAIRS: tuple[CounterPair, ...] = (
    CounterPair(
        "vmbalance_vm_disk_written_bytes_total",
        "libvirt_domain_block_stats_write_bytes_total",
        True,
    ),
    CounterPair(
        "vmbalance_vm_disk_read_bytes_total", "libvirt_domain_block_stats_read_bytes_total", True
    ),
    CounterPair(
        "vmbalance_vm_disk_writes_completed_total",
        "libvirt_domain_block_stats_write_requests_total",
        True,
    ),
    CounterPair(
        "vmbalance_vm_disk_reads_completed_total",
        "libvirt_domain_block_stats_read_requests_total",
        True,
    ),
    CounterPair(
        "vmbalance_vm_cpu_seconds_total", "libvirt_domain_info_cpu_time_seconds_total", False
    ),
)


@dataclass(frozen=True, slots=True)
class Scrape:
    """One timed scrape, reduced to the compared counters (keyed by our metric names)."""

    exporter: str  # "ours" or "peer"
    started: float  # perf_counter seconds
    finished: float
    values: Mapping[Key, float]

    @property
    def seconds(self) -> float:
        return self.finished - self.started

    @property
    def middle(self) -> float:
        return (self.started + self.finished) / 2


def parse_counters(text: str, exporter: str) -> dict[Key, float]:
    """The compared counters of one exposition, under our names and label values."""
    wanted = {pair.ours if exporter == "ours" else pair.peer: pair for pair in PAIRS}
    vm_label, disk_label = ("vm", "disk") if exporter == "ours" else ("domain", "target_device")
    values: dict[Key, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            pair = wanted.get(sample.name)
            if pair is None:
                continue
            disk = sample.labels.get(disk_label, "") if pair.per_disk else ""
            values[(pair.ours, sample.labels.get(vm_label, ""), disk)] = float(sample.value)
    return values


def scrape(url: str, exporter: str, timeout: float = 30.0) -> Scrape:
    started = time.perf_counter()
    response = requests.get(url, timeout=timeout)
    finished = time.perf_counter()
    response.raise_for_status()
    return Scrape(exporter, started, finished, parse_counters(response.text, exporter))


@dataclass(frozen=True, slots=True)
class Violation:
    """A middle scrape's value outside its neighbours' (or a counter only one side has)."""

    round: int
    key: Key
    low: float | None
    middle: float | None
    high: float | None


@dataclass
class PeerComparison:
    """Outcome of the sandwiched scrapes: agreement, differences and scrape times."""

    rounds: int = 0
    checked: int = 0  # (round, counter) pairs checked
    violations: list[Violation] = field(default_factory=list)
    keys: int = 0
    ours_ms: list[float] = field(default_factory=list)
    peer_ms: list[float] = field(default_factory=list)
    exact: int = 0  # adjacent pairs with identical values
    adjacent: int = 0
    worst_diff_seconds: float = 0.0  # largest |ours - peer| / rate over adjacent scrapes
    median_gap_ms: float = 0.0  # median time between adjacent scrapes' middles

    @property
    def agree(self) -> bool:
        return self.checked > 0 and not self.violations

    def as_dict(self) -> dict[str, Any]:
        return {
            "rounds": self.rounds,
            "counters": self.keys,
            "checked": self.checked,
            "violations": [
                {
                    "round": v.round,
                    "counter": list(v.key),
                    "low": v.low,
                    "middle": v.middle,
                    "high": v.high,
                }
                for v in self.violations[:20]
            ],
            "exact_adjacent": self.exact,
            "adjacent": self.adjacent,
            "worst_diff_seconds_of_io": self.worst_diff_seconds,
            "median_gap_ms": self.median_gap_ms,
            "ours_median_ms": median(self.ours_ms),
            "peer_median_ms": median(self.peer_ms),
            "ours_p95_ms": p95(self.ours_ms),
            "peer_p95_ms": p95(self.peer_ms),
            "agree": self.agree,
        }


def median(values: Iterable[float]) -> float:
    data = list(values)
    return statistics.median(data) if data else float("nan")


def p95(values: Iterable[float]) -> float:
    data = sorted(values)
    if not data:
        return float("nan")
    return data[min(len(data) - 1, round(0.95 * (len(data) - 1)))]


def _rates(scrapes: list[Scrape]) -> dict[Key, float]:
    """Average rate of every counter over all scrapes of one exporter (per second)."""
    first, last = scrapes[0], scrapes[-1]
    span = last.middle - first.middle
    if span <= 0:
        return {}
    return {
        key: (last.values[key] - value) / span
        for key, value in first.values.items()
        if key in last.values
    }


Sandwich = tuple[Scrape, Scrape, Scrape]  # (outer, inner, outer) in the order taken


def compare_with_peer(
    ours_url: str, peer_url: str, rounds: int = 30, pause: float = 0.5, warmup: int = 3
) -> PeerComparison:
    """`rounds` sandwiches (A B A), alternating which exporter is in the middle."""
    for _ in range(warmup):
        scrape(ours_url, "ours")
        scrape(peer_url, "peer")
    result = PeerComparison(rounds=rounds)
    sandwiches = _scrape_sandwiches({"ours": ours_url, "peer": peer_url}, rounds, pause)
    taken = [item for sandwich in sandwiches for item in sandwich]
    result.ours_ms = [item.seconds * 1000 for item in taken if item.exporter == "ours"]
    result.peer_ms = [item.seconds * 1000 for item in taken if item.exporter == "peer"]
    rates = _rates([item for item in taken if item.exporter == "ours"])
    gaps: list[float] = []
    keys: set[Key] = set()
    for index, (low, middle, high) in enumerate(sandwiches):
        keys |= _check_between(result, index, (low, middle, high))
        for left, right in ((low, middle), (middle, high)):
            gaps.append(abs(right.middle - left.middle) * 1000)
            _compare_adjacent(result, left, right, rates)
    result.keys = len(keys)
    result.median_gap_ms = median(gaps)
    return result


def _scrape_sandwiches(urls: Mapping[str, str], rounds: int, pause: float) -> list[Sandwich]:
    sandwiches: list[Sandwich] = []
    for index in range(rounds):
        outer, inner = ("ours", "peer") if index % 2 == 0 else ("peer", "ours")
        sandwiches.append(
            (
                scrape(urls[outer], outer),
                scrape(urls[inner], inner),
                scrape(urls[outer], outer),
            )
        )
        time.sleep(pause)
    return sandwiches


def _check_between(result: PeerComparison, index: int, sandwich: Sandwich) -> set[Key]:
    """Records every counter of round `index` whose middle value is not between its
    neighbours' (or that a scrape lacks); the counters the round saw."""
    low, middle, high = sandwich
    all_keys = set(low.values) | set(middle.values) | set(high.values)
    for key in sorted(all_keys):
        a, b, c = low.values.get(key), middle.values.get(key), high.values.get(key)
        result.checked += 1
        if a is None or b is None or c is None or not a <= b <= c:
            result.violations.append(Violation(index, key, a, b, c))
    return all_keys


def _compare_adjacent(
    result: PeerComparison, left: Scrape, right: Scrape, rates: Mapping[Key, float]
) -> None:
    """Counts the counters two adjacent scrapes agree on exactly and keeps the largest
    difference, in seconds of the counter's rate."""
    for key in set(left.values) & set(right.values):
        result.adjacent += 1
        diff = abs(left.values[key] - right.values[key])
        if diff == 0:
            result.exact += 1
        elif rates.get(key, 0) > 0:
            result.worst_diff_seconds = max(result.worst_diff_seconds, diff / rates[key])


# Every `getAllDomainStats` group that carries figures of the metric contract; the libvirt
# backend asks only for the cheap ones (`exporter.libvirt.BULK_STATS`).
BULK_GROUPS: tuple[str, ...] = ("STATE", "CPU_TOTAL", "BALLOON", "VCPU", "INTERFACE", "BLOCK")


def libvirt_call_costs(uri: str, rounds: int = 20) -> dict[str, float]:
    """Median milliseconds of the libvirt calls behind each exporter's counters.

    `bulk` is the one `getAllDomainStats` call of vmbalance-exporter (every group it asks
    for, NOWAIT), `bulk:<GROUP>` each group alone, and `per-domain info+blockStats` the
    `virDomainGetInfo` and `virDomainBlockStats` (of `vda`, a lab guest's one disk) calls for
    every running domain that prometheus-libvirt-exporter's counters come from. All over one
    read-only connection.
    """
    import libvirt

    conn = libvirt.openReadOnly(uri)
    try:
        flags = (
            libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE
            | libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT
        )
        groups = {name: getattr(libvirt, f"VIR_DOMAIN_STATS_{name}") for name in BULK_GROUPS}
        everything = 0
        for value in groups.values():
            everything |= value
        domains = conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)

        def per_domain() -> None:
            for domain in domains:
                domain.info()
                domain.blockStats("vda")

        calls: dict[str, Callable[[], object]] = {
            "bulk": lambda: conn.getAllDomainStats(everything, flags),
            **{
                f"bulk:{name}": partial(conn.getAllDomainStats, value, flags)
                for name, value in groups.items()
            },
            "per-domain info+blockStats": per_domain,
        }
        costs: dict[str, float] = {}
        for name, call in calls.items():
            times = []
            for _ in range(rounds):
                started = time.perf_counter()
                call()
                times.append((time.perf_counter() - started) * 1000)
            costs[name] = median(times)
        return costs
    finally:
        conn.close()
