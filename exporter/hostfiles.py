"""The host files the QMP backend reads: a QEMU process in /proc, tap devices in sysfs.

Plain blocking reads; the backend runs each under its scrape deadline (`exporter.hostio`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from exporter.samples import InterfaceSample


@dataclass(frozen=True, slots=True)
class ProcessUsage:
    """CPU time and resident memory of one QEMU process."""

    cpu_seconds: float
    rss_bytes: int


def read_process_usage(proc_root: str, pid: int) -> ProcessUsage:
    """utime+stime and RSS of a process; FileNotFoundError when it is gone (or a zombie)."""
    stat = Path(proc_root, str(pid), "stat").read_text()
    # The command name may contain spaces and parentheses: fields start after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        raise FileNotFoundError(f"process {pid} has exited")
    ticks = int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of stat(5)
    cpu_seconds = ticks / os.sysconf("SC_CLK_TCK")
    rss: int | None = None
    for line in Path(proc_root, str(pid), "status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
            break
    if rss is None:
        statm = Path(proc_root, str(pid), "statm").read_text().split()
        rss = int(statm[1]) * os.sysconf("SC_PAGE_SIZE")
    return ProcessUsage(cpu_seconds=cpu_seconds, rss_bytes=rss)


def read_tap_counters(
    net_root: str, vmid: str, nets: tuple[int, ...]
) -> tuple[InterfaceSample, ...]:
    """Counters of the VM's Proxmox tap devices (`tap<vmid>i<N>`), labelled `net<N>`.

    A tap counts from the host side: what it receives the guest sent, so rx and tx swap.
    A missing tap (link down, not yet plugged) gives no sample.
    """
    samples = []
    for index in nets:
        base = Path(net_root, f"tap{vmid}i{index}", "statistics")
        try:
            host_rx = int((base / "rx_bytes").read_text())
            host_tx = int((base / "tx_bytes").read_text())
        except (OSError, ValueError):
            continue
        samples.append(
            InterfaceSample(interface=f"net{index}", receive_bytes=host_tx, transmit_bytes=host_rx)
        )
    return tuple(samples)


def can_list(path: str) -> None:
    with os.scandir(path):
        pass


def mem_total(proc_root: str) -> int:
    for line in Path(proc_root, "meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise OSError(f"no MemTotal in {proc_root}/meminfo")
