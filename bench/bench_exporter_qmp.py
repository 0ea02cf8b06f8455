"""Benchmark: wall time of `QmpBackend.scrape()` against 50 to 200 fake Proxmox VMs.

Each size gets a Proxmox-like temp layout: one fake QMP server process serving every
`<vmid>.qmp` (two disks each, Proxmox's balloon with guest statistics), pid files naming that
live process, `.conf` files and tap counters in a fake sysfs. The scrape itself runs for
real: one QMP session per VM, /proc reads, config parsing. Results replace the
`## Exporter: qmp backend` section of docs/benchmarks.md.

Run: .venv/bin/python bench/bench_exporter_qmp.py [--runs 20]
"""

from __future__ import annotations

import argparse
import datetime as dt
import inspect
import math
import os
import platform
import statistics
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from devkit.service import Service  # noqa: E402
from exporter.qmp import QmpBackend  # noqa: E402

FAKE_SERVER = REPO / "tests" / "fake_qmp.py"
DOC = REPO / "docs" / "benchmarks.md"
SECTION = "## Exporter: qmp backend"
SIZES = (50, 100, 150, 200)
CONCURRENCIES = (1, 4, 16, 64)
FIRST_VMID = 100
SCRAPE_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class Timing:
    vms: int
    concurrency: int
    runs: list[float]
    cpu: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    @property
    def cpu_median(self) -> float:
        """CPU time of the exporter's process: less sensitive to a busy shared machine."""
        return statistics.median(self.cpu)

    @property
    def p95(self) -> float:
        ordered = sorted(self.runs)
        return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


class FakeNode:
    """A temp Proxmox layout whose VMs are served by a fake QMP server subprocess."""

    def __init__(self, count: int) -> None:
        self.count = count
        self._tmp = tempfile.TemporaryDirectory(prefix="vmbalance-bench-qmp-")
        root = Path(self._tmp.name)
        self.run, self.conf, self.net = root / "run", root / "conf", root / "net"
        for path in (self.run, self.conf, self.net):
            path.mkdir()
        self.server: Service | None = None

    def __enter__(self) -> FakeNode:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> None:
        argv = [sys.executable, str(FAKE_SERVER), "--run-dir", str(self.run),
                "--first", str(FIRST_VMID), "--count", str(self.count)]  # fmt: skip
        log = Path(self._tmp.name) / "fake-qmp.log"
        self.server = Service("fake QMP server", argv, log).start()
        self.server.wait_ready(lambda: "ready" in log.read_text(errors="replace"), 60)
        for vmid in range(FIRST_VMID, FIRST_VMID + self.count):
            (self.run / f"{vmid}.pid").write_text(f"{self.server.pid}\n")
            (self.conf / f"{vmid}.conf").write_text(
                f"boot: order=scsi0\ncores: 2\nmemory: 2048\nname: bench-{vmid}\n"
                f"net0: virtio=BC:24:11:00:{vmid // 256:02X}:{vmid % 256:02X},bridge=vmbr0\n"
                f"scsi0: local-lvm:vm-{vmid}-disk-0,size=32G\n"
                f"virtio0: local-lvm:vm-{vmid}-disk-1,size=8G\nsockets: 1\n"
                f"smbios1: uuid=00000000-0000-4000-8000-{vmid:012d}\n"
                f"\n[daily]\nmemory: 1024\nsnaptime: 1700000000\n"
            )
            stats = self.net / f"tap{vmid}i0" / "statistics"
            stats.mkdir(parents=True)
            (stats / "rx_bytes").write_text(f"{vmid * 1000}\n")
            (stats / "tx_bytes").write_text(f"{vmid * 3000}\n")

    def backend(self, concurrency: int) -> QmpBackend:
        return QmpBackend(
            run_dir=str(self.run),
            conf_dir=str(self.conf),
            net_root=str(self.net),
            concurrency=concurrency,
        )

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
        self._tmp.cleanup()


def measure(node: FakeNode, concurrency: int, runs: int, warmup: int = 2) -> Timing:
    backend = node.backend(concurrency)
    times: list[float] = []
    cpu: list[float] = []
    for index in range(warmup + runs):
        started, started_cpu = time.perf_counter(), time.process_time()
        result = backend.scrape(SCRAPE_TIMEOUT)
        elapsed, used_cpu = time.perf_counter() - started, time.process_time() - started_cpu
        if not result.up or len(result.vms) != node.count or result.vm_errors:
            raise RuntimeError(f"bad scrape: up={result.up} vms={len(result.vms)} {result}")
        if index >= warmup:
            times.append(elapsed)
            cpu.append(used_cpu)
    backend.close()
    return Timing(vms=node.count, concurrency=concurrency, runs=times, cpu=cpu)


def slope_ms_per_vm(timings: list[Timing]) -> float:
    """Least-squares ms of median scrape time per additional VM."""
    xs = [t.vms for t in timings]
    ys = [t.median * 1000 for t in timings]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    num = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True))
    den = sum((x - mean_x) ** 2 for x in xs)
    return num / den


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def render(by_size: list[Timing], by_concurrency: list[Timing], runs: int) -> str:
    default = by_size[0].concurrency
    smallest, largest = by_size[0], by_size[-1]
    intro = (
        "Wall time of one `QmpBackend.scrape()` against fake Proxmox VMs: one fake QMP server "
        "process serving every `<vmid>.qmp` (two disks each, Proxmox's balloon with guest "
        "statistics), pid files naming that live process, `.conf` files with a snapshot "
        "section, and a tap device per VM. Each scrape opens, negotiates, queries and closes "
        "one QMP session per VM and reads /proc and sysfs. "
        f"{runs} measured runs per row after 2 warm-up scrapes."
    )
    lines = [
        SECTION,
        "",
        *textwrap.wrap(intro, width=98),
        "",
        f"- Command: `.venv/bin/python bench/bench_exporter_qmp.py --runs {runs}`",
        f"- Date: {dt.datetime.now(dt.UTC).date().isoformat()}",
        f"- Machine: {os.cpu_count()} cores ({cpu_model()}), shared; Python "
        f"{platform.python_version()}; the fake server runs in its own process",
        "",
        f"Scaling, concurrency {default} (the default):",
        "",
        "| VMs | median ms | p95 ms | median ms per VM | exporter CPU ms (median) |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for t in by_size:
        lines.append(
            f"| {t.vms} | {t.median * 1000:.1f} | {t.p95 * 1000:.1f} | "
            f"{t.median * 1000 / t.vms:.2f} | {t.cpu_median * 1000:.1f} |"
        )
    growth = (
        f"Growth from {smallest.vms} to {largest.vms} VMs: "
        f"{largest.median / smallest.median:.2f}x the time for "
        f"{largest.vms / smallest.vms:.0f}x the VMs; least-squares slope "
        f"{slope_ms_per_vm(by_size):.2f} ms per additional VM; the exporter spends "
        f"{largest.cpu_median * 1000 / largest.vms:.2f} ms of CPU per VM at {largest.vms}."
    )
    lines += [
        "",
        *textwrap.wrap(growth, width=98),
        "",
        f"Concurrency at {largest.vms} VMs ({max(5, runs // 2)} runs for the non-default rows):",
        "",
        "| concurrency | median ms | p95 ms | exporter CPU ms (median) |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for t in by_concurrency:
        lines.append(
            f"| {t.concurrency} | {t.median * 1000:.1f} | {t.p95 * 1000:.1f} | "
            f"{t.cpu_median * 1000:.1f} |"
        )
    return "\n".join(lines) + "\n"


def write_section(section: str) -> None:
    """Replace (or append) only this benchmark's section of docs/benchmarks.md."""
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    start = text.find(SECTION + "\n")
    if start == -1:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(SECTION))
        rest = text[end + 1 :] if end != -1 else ""
        text = text[:start] + section + ("\n" + rest if rest else "")
    DOC.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="measured scrapes per row")
    parser.add_argument("--no-write", action="store_true", help="print only, leave the doc")
    args = parser.parse_args(argv)
    default_concurrency = int(inspect.signature(QmpBackend).parameters["concurrency"].default)

    by_size: list[Timing] = []
    by_concurrency: list[Timing] = []
    for count in SIZES:
        with FakeNode(count) as node:
            timing = measure(node, default_concurrency, args.runs)
            by_size.append(timing)
            print(
                f"{count:4d} VMs  median {timing.median * 1000:7.1f} ms  "
                f"p95 {timing.p95 * 1000:7.1f} ms  {timing.median * 1000 / count:.2f} ms/VM  "
                f"cpu {timing.cpu_median * 1000:7.1f} ms",
                flush=True,
            )
            if count == SIZES[-1]:
                for concurrency in CONCURRENCIES:
                    if concurrency == default_concurrency:
                        by_concurrency.append(timing)
                        continue
                    extra = measure(node, concurrency, max(5, args.runs // 2))
                    by_concurrency.append(extra)
                    print(
                        f"{count:4d} VMs  concurrency {concurrency:3d}  "
                        f"median {extra.median * 1000:7.1f} ms",
                        flush=True,
                    )
    section = render(by_size, by_concurrency, args.runs)
    print()
    print(section)
    if not args.no_write:
        write_section(section)
        print(f"updated {DOC.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
