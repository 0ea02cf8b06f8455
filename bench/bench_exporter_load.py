"""Scrape latency under load: vmbalance-exporter and prometheus-libvirt-exporter side by side.

Both exporters read the same libvirt test-driver node of 1000 running domains. Unloaded, one
client scrapes them in turn (several scrapes of ours to each of the peer's, which is ten times
slower). Loaded, each exporter in turn gets 50 slow clients (connections that send a request
head one byte every 200 ms) and 20 parallel scrapers on kept-alive connections, for a fixed
time; every scrape's latency counts. Reported: p50/p99 per exporter and phase, and the two
targets: ours / peer unloaded p50 at most 0.1, our loaded p99 at most 2x our unloaded p99.
Each run starts fresh processes; the verdicts use the median over the runs.

Run: .venv/bin/python bench/bench_exporter_load.py [--runs N] [--seconds S] [--no-write]
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import math
import multiprocessing
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_exporter_libvirt import PEER, Command, machine, ours, peer, started
from docs_section import replace_section

from devkit.libvirt_nodexml import write_node_xml

HEADING = "Exporter: scrape latency under load, vs prometheus-libvirt-exporter"
DOMAINS = 1000
SLOW_CLIENTS = 50
SCRAPERS = 20
RATIO_TARGET = 0.1
LOADED_TARGET = 2.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


@dataclass(frozen=True)
class Latencies:
    p50: float
    p99: float
    count: int

    @classmethod
    def of(cls, values: list[float]) -> Latencies:
        return cls(percentile(values, 0.5), percentile(values, 0.99), len(values))


class Scraper:
    """A kept-alive connection that scrapes /metrics and times each scrape."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def scrape(self) -> float:
        started_at = time.perf_counter()
        try:
            self.conn.request("GET", "/metrics")
            response = self.conn.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException):
            self.conn.close()
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
            raise
        if response.status != 200 or (b"domain" not in body[:200_000] and b"vm" not in body):
            raise RuntimeError(f"port {self.port}: HTTP {response.status}")
        return time.perf_counter() - started_at

    def close(self) -> None:
        self.conn.close()


def unloaded(mine: Command, theirs: Command, rounds: int, ours_per_round: int) -> tuple:
    """Scrape in turn: `ours_per_round` scrapes of ours, then one of the peer's, `rounds` times."""
    a, b = Scraper(mine.port), Scraper(theirs.port)
    for _ in range(2):
        a.scrape()
        b.scrape()
    ours_times: list[float] = []
    peer_times: list[float] = []
    for _ in range(rounds):
        for _ in range(ours_per_round):
            ours_times.append(a.scrape())
        peer_times.append(b.scrape())
    a.close()
    b.close()
    return Latencies.of(ours_times), Latencies.of(peer_times)


def slow_clients(port: int, count: int, stop: threading.Event) -> threading.Thread:
    """`count` connections that send a request head one byte at a time, every 200 ms."""
    payload = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: slow" + b"w" * 4096

    def run() -> None:
        socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(count)]
        offset = 0
        while not stop.is_set():
            for i, sock in enumerate(socks):
                try:
                    sock.send(payload[offset % len(payload) : offset % len(payload) + 1])
                except OSError:  # cut off (header timeout): come back as a new slow client
                    sock.close()
                    socks[i] = socket.create_connection(("127.0.0.1", port))
            offset += 1
            stop.wait(0.2)
        for sock in socks:
            sock.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def scrape_for(port: int, end: float) -> list[float]:
    """One scraper: scrape until the monotonic clock passes `end`; each scrape's latency."""
    scraper = Scraper(port)
    times = []
    try:
        while time.monotonic() < end:
            times.append(scraper.scrape())
    finally:
        scraper.close()
    return times


def loaded(command: Command, seconds: float) -> Latencies:
    """20 parallel scrapers for `seconds` next to 50 slow clients; every scrape's latency.

    Each scraper is a process of its own, so the client side measures the server, not its
    own global interpreter lock.
    """
    stop = threading.Event()
    slow = slow_clients(command.port, SLOW_CLIENTS, stop)
    time.sleep(0.5)
    context = multiprocessing.get_context("fork")
    with context.Pool(SCRAPERS) as pool:
        end = time.monotonic() + seconds
        results = pool.starmap(scrape_for, [(command.port, end)] * SCRAPERS)
    stop.set()
    slow.join(10)
    return Latencies.of([t for times in results for t in times])


@dataclass(frozen=True)
class Run:
    ours_unloaded: Latencies
    peer_unloaded: Latencies
    ours_loaded: Latencies
    peer_loaded: Latencies


def one_run(work: Path, uri: str, seconds: float, rounds: int, tag: str) -> Run:
    mine, theirs = ours(uri), peer(uri)
    with (
        started("vmbalance-exporter", mine, work / f"ours-{tag}.log"),
        started(PEER, theirs, work / f"peer-{tag}.log"),
    ):
        ours_unloaded, peer_unloaded = unloaded(mine, theirs, rounds, ours_per_round=8)
        ours_loaded = loaded(mine, seconds)
        peer_loaded = loaded(theirs, seconds * 2)
    return Run(ours_unloaded, peer_unloaded, ours_loaded, peer_loaded)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs with fresh processes")
    parser.add_argument("--seconds", type=float, default=15.0, help="loaded phase of ours")
    parser.add_argument("--rounds", type=int, default=20, help="unloaded rounds")
    parser.add_argument("--no-write", action="store_true", help="print only, keep the doc")
    args = parser.parse_args(argv)
    if shutil.which(PEER) is None:
        print(f"{PEER} is not installed (Debian package {PEER})", file=sys.stderr)
        return 2
    if args.runs < 1 or args.seconds <= 0 or args.rounds < 1:
        print("--runs, --seconds and --rounds must be positive", file=sys.stderr)
        return 2
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="vmbalance-bench-load-") as tmp:
        work = Path(tmp)
        uri = write_node_xml(work / "node.xml", DOMAINS, disks_per_vm=2, nics_per_vm=1)
        for index in range(args.runs):
            print(f"== run {index + 1} of {args.runs}", flush=True)
            runs.append(one_run(work, uri, args.seconds, args.rounds, str(index)))

    rows = [
        "| run | exporter | unloaded p50 (ms) | unloaded p99 (ms) | loaded p50 (ms) "
        "| loaded p99 (ms) | scrapes unloaded / loaded |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for index, run in enumerate(runs, 1):
        for label, quiet, busy in (
            ("vmbalance-exporter", run.ours_unloaded, run.ours_loaded),
            (PEER, run.peer_unloaded, run.peer_loaded),
        ):
            rows.append(
                f"| {index} | {label} | {ms(quiet.p50)} | {ms(quiet.p99)} | {ms(busy.p50)} "
                f"| {ms(busy.p99)} | {quiet.count} / {busy.count} |"
            )
    ratio = [r.ours_unloaded.p50 / r.peer_unloaded.p50 for r in runs]
    ratio_p99 = [r.ours_unloaded.p99 / r.peer_unloaded.p99 for r in runs]
    loaded_ratio = [r.ours_loaded.p99 / r.ours_unloaded.p99 for r in runs]
    loaded_vs_peer = [r.ours_loaded.p99 / r.peer_loaded.p99 for r in runs]

    def verdict(values: list[float], target: float) -> str:
        median = statistics.median(values)
        met = "met" if median <= target else "not met"
        spread = ", ".join(f"{v:.3f}" for v in values)
        return f"{median:.3f}× (target ≤ {target}×: {met}); per run: {spread}"

    body = "\n".join(
        [
            f"Both exporters read the same libvirt test-driver node of {DOMAINS} running domains "
            "(two disks and one NIC each) over loopback HTTP. Unloaded: one client, eight "
            "scrapes of ours to each one of the peer's, "
            f"{args.rounds} rounds. Loaded: {SLOW_CLIENTS} slow clients (a request head sent "
            f"one byte every 200 ms) and {SCRAPERS} parallel scrapers on kept-alive "
            f"connections (one process each), {args.seconds:g} s for ours and "
            f"{args.seconds * 2:g} s for the peer (its scrapes take longer); every scrape's "
            "latency counts. Fresh processes "
            f"per run, {args.runs} runs; verdicts on the median of the runs.",
            "",
            f"- Command: `.venv/bin/python bench/bench_exporter_load.py --runs {args.runs}` "
            "(part of `make bench`)",
            f"- Date: {datetime.date.today().isoformat()}",
            f"- Machine: {machine()}",
            "",
            *rows,
            "",
            f"- unloaded p50, ours / peer: {verdict(ratio, RATIO_TARGET)}",
            f"- unloaded p99, ours / peer: {statistics.median(ratio_p99):.3f}×",
            f"- loaded p99 / unloaded p99, ours: {verdict(loaded_ratio, LOADED_TARGET)}",
            f"- loaded p99, ours / peer: {statistics.median(loaded_vs_peer):.3f}×",
            "",
            "Scrapes that arrive while one runs wait for it and share its text, so twenty "
            "scrapers cost one libvirt read at a time; slow clients hold a connection each "
            "on the event loop, no thread. The peer serves every scrape with its own libvirt "
            "connection and read, so parallel scrapes share the CPU.",
        ]
    )
    print()
    print(f"## {HEADING}\n\n{body}")
    if not args.no_write:
        replace_section(HEADING, body)
        print("wrote the section to docs/benchmarks.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
