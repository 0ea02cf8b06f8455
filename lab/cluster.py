"""The whole chain on real hypervisors: guests on a private libvirtd and on Proxmox-like QEMU
nodes, one vmbalance-exporter per node, prometheus-libvirt-exporter beside ours on the libvirt
node, a Prometheus scraping our exporters, and the `vmbalance` CLI reading that Prometheus.

`Lab` is a context manager: everything it starts is stopped when the block is left, however
it is left (the helpers also stop themselves at interpreter exit as a last resort). The full
lab (`lab/run.py`) and the CI-sized test (`tests/test_lab.py`) are two `LabSpec`s.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
import yaml

from devkit.servers import ExporterProcess, PrometheusServer, start_exporter
from devkit.service import Service, free_port, http_ok, wait_until
from lab.guest import GuestImage, GuestLoad
from lab.libvirt_node import DomainSpec, PrivateLibvirtd
from lab.pve_node import Migration, PveGuest, PveGuestSpec, PveNode, live_migrate
from recommender.config import duration_seconds
from recommender.source.queries import HISTORY_STEP

REPO = Path(__file__).resolve().parent.parent
PEER_EXPORTER = "prometheus-libvirt-exporter"
CLI_TIMEOUT = 120.0


@dataclass(frozen=True, slots=True)
class LabGuest:
    """One guest: `vm` is its `vm` label (libvirt domain name or Proxmox VMID)."""

    vm: str
    node: str
    load: GuestLoad
    name: str = ""
    memory_mib: int = 96
    disk_mib: int = 4

    @property
    def display_name(self) -> str:
        return self.name or self.vm


@dataclass(frozen=True, slots=True)
class LabSpec:
    """Nodes, guests, scrape interval and the recommender config of one lab."""

    guests: tuple[LabGuest, ...]
    pve_nodes: tuple[str, ...] = ()
    libvirt_node: str | None = None
    scrape_interval: int = 5
    peer_exporter: bool = True
    config: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RateCheck:
    """A guest's configured disk rate against what the snapshot measured."""

    vm: str
    node: str
    configured: float  # bytes/s, read + written
    measured: float | None

    @property
    def ratio(self) -> float | None:
        if self.measured is None or self.configured <= 0:
            return None
        return self.measured / self.configured

    def within(self, tolerance: float) -> bool:
        return self.ratio is not None and abs(self.ratio - 1) <= tolerance

    def as_dict(self) -> dict[str, Any]:
        return {
            "vm": self.vm,
            "node": self.node,
            "configured_bytes": self.configured,
            "measured_bytes": self.measured,
            "ratio": self.ratio,
        }


class CommandFailed(RuntimeError):
    """A `vmbalance` command exited non-zero; the message has its stderr."""


class Lab:
    """Starts a `LabSpec` on entry, stops all of it on exit."""

    def __init__(self, spec: LabSpec, out_dir: Path, image: GuestImage) -> None:
        self.spec = spec
        self.out = out_dir
        self.image = image
        self.logs = out_dir / "logs"
        self.results = out_dir / "results"
        self.libvirtd: PrivateLibvirtd | None = None
        self.pve: dict[str, PveNode] = {}
        self.exporters: dict[str, ExporterProcess] = {}
        self.peer: Service | None = None
        self.peer_url: str | None = None
        self.prometheus: PrometheusServer | None = None
        self.started_at = 0.0
        self.io_seen_at = 0.0
        self._stack = contextlib.ExitStack()

    # ------------------------------------------------------------------ start and stop

    def __enter__(self) -> Lab:
        self.started_at = time.time()
        for directory in (self.logs, self.results):
            directory.mkdir(parents=True, exist_ok=True)
        try:
            self._start()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _start(self) -> None:
        spec = self.spec
        if spec.libvirt_node is not None:
            self.libvirtd = self._stack.enter_context(PrivateLibvirtd(self.logs))
        shared = self.out / "nodes" / "shared-storage"
        for name in spec.pve_nodes:
            node = PveNode(name, self.out / "nodes" / name, shared)
            self.pve[name] = self._stack.enter_context(node)
        for guest in spec.guests:
            self._start_guest(guest)
        if self.libvirtd is not None and spec.libvirt_node is not None:
            self._start_exporter(
                spec.libvirt_node,
                ["--backend", "libvirt", "--libvirt-uri", self.libvirtd.uri,
                 "--node-name", spec.libvirt_node,
                 # The guests' disk files stand for shared storage, as the Proxmox-like
                 # nodes' do: they do not pin a guest to the node.
                 "--shared-path", str(self.libvirtd.images)],
            )  # fmt: skip
            if spec.peer_exporter:
                self._start_peer(self.libvirtd.uri)
        for name, node in self.pve.items():
            self._start_exporter(name, node.exporter_args())
        interval = f"{spec.scrape_interval}s"
        targets = [exporter.address for exporter in self.exporters.values()]
        self.prometheus = self._stack.enter_context(
            PrometheusServer(
                self.out / "prometheus",
                scrape_configs=[
                    {
                        "job_name": "vmbalance",
                        "scrape_interval": interval,
                        "scrape_timeout": interval,
                        "static_configs": [{"targets": targets}],
                    }
                ],
            )
        )

    def _start_guest(self, guest: LabGuest) -> None:
        if guest.node == self.spec.libvirt_node:
            assert self.libvirtd is not None
            self.libvirtd.create_guest(
                DomainSpec(guest.vm, guest.load, guest.memory_mib, guest.disk_mib), self.image
            )
        elif guest.node in self.pve:
            self.pve[guest.node].start_guest(
                PveGuestSpec(
                    guest.vm, guest.display_name, guest.load, guest.memory_mib, guest.disk_mib
                ),
                self.image,
            )
        else:
            raise ValueError(f"guest {guest.vm}: no node {guest.node!r} in this lab")

    def _start_exporter(self, node: str, args: list[str]) -> None:
        exporter = start_exporter(args, self.logs / f"exporter-{node}.log")
        self._stack.callback(exporter.stop)
        self.exporters[node] = exporter

    def _start_peer(self, uri: str) -> None:
        binary = shutil.which(PEER_EXPORTER)
        if binary is None:
            raise RuntimeError(f"{PEER_EXPORTER} is not installed (Debian: {PEER_EXPORTER})")
        port = free_port()
        self.peer = self._stack.enter_context(
            Service(
                PEER_EXPORTER,
                [binary, f"--libvirt.uri={uri}", f"--web.listen-address=127.0.0.1:{port}"],
                self.logs / f"{PEER_EXPORTER}.log",
            )
        )
        self.peer_url = f"http://127.0.0.1:{port}/metrics"
        wait_until(lambda: http_ok(self.peer_url or ""), 30, PEER_EXPORTER, self.peer.check_running)

    # ------------------------------------------------------------------ observing

    def pids(self) -> list[int]:
        """Every process the lab started and runs now (for checking they all stop)."""
        pids = [exporter.process.pid for exporter in self.exporters.values()]
        if self.prometheus is not None and self.prometheus.process is not None:
            pids.append(self.prometheus.process.pid)
        if self.peer is not None:
            pids.append(self.peer.pid)
        if self.libvirtd is not None:
            if self.libvirtd.service is not None:
                pids.append(self.libvirtd.service.pid)
            pids += self.libvirtd.qemu_pids()
        for node in self.pve.values():
            pids += [guest.vm.pid for guest in node.guests.values()]
        return pids

    def exporter_url(self, node: str) -> str:
        return f"http://{self.exporters[node].address}/metrics"

    def query(self, promql: str) -> list[dict[str, Any]]:
        assert self.prometheus is not None
        return self.prometheus.query(promql)

    def wait_for_io(self, timeout: float = 180.0) -> float:
        """Wait until Prometheus has seen every guest write; returns the time that happened."""
        writers = {g.vm for g in self.spec.guests if g.load.write_kib > 0}

        def all_writing() -> bool:
            try:
                result = self.query("vmbalance_vm_disk_written_bytes_total > 0")
            except (RuntimeError, requests.RequestException, ValueError):
                return False
            return writers <= {item["metric"].get("vm") for item in result}

        wait_until(all_writing, timeout, "disk writes of every guest in Prometheus", interval=1)
        self.io_seen_at = time.time()
        return self.io_seen_at

    def wait_history_step(self, since: float) -> float:
        """Sleep until a step of the recommender's history subqueries has passed after `since`
        (plus a scrape); returns the seconds slept.

        Those subqueries sample `vmbalance_vm_info` at whole multiples of `HISTORY_STEP`, and
        a series that stopped is stale at the next step, so a VM is seen on a node only if it
        was there at one of those instants: a guest migrated before the first step after it
        appeared would leave no trace of its old node.
        """
        step = duration_seconds(HISTORY_STEP)
        boundary = math.floor(since / step) * step + step
        pause = max(0.0, boundary + self.spec.scrape_interval - time.time())
        time.sleep(pause)
        return pause

    def rate_checks(self, snapshot: Mapping[str, Any]) -> list[RateCheck]:
        """Every guest's configured read+write rate next to the snapshot's `disk_bytes`."""
        measured = {row["vm"]: row for row in snapshot["vms"]}
        checks = []
        for guest in self.spec.guests:
            row = measured.get(guest.vm)
            value = row["load"].get("disk_bytes") if row else None
            checks.append(
                RateCheck(
                    vm=guest.vm,
                    node=row["node"] if row else "(missing)",
                    configured=guest.load.disk_bytes,
                    measured=float(value) if value is not None else None,
                )
            )
        return checks

    def node_history(self, vm: str, since: float) -> list[dict[str, Any]]:
        """The nodes `vmbalance_vm_info{vm=...}` had since `since`, in order, with the first
        and last step each was seen at."""
        assert self.prometheus is not None
        response = requests.get(
            self.prometheus.url + "/api/v1/query_range",
            params={
                "query": f'vmbalance_vm_info{{vm="{vm}"}}',
                "start": f"{since:.3f}",
                # A step past now, so the newest samples are in the last step's lookback.
                "end": f"{time.time() + self.spec.scrape_interval:.3f}",
                "step": f"{self.spec.scrape_interval}s",
            },
            timeout=30,
        )
        response.raise_for_status()
        # One entry per node: a series also changes when a label such as `name` does.
        spans: dict[str, dict[str, Any]] = {}
        for item in response.json()["data"]["result"]:
            if not item["values"]:
                continue
            node = str(item["metric"].get("node"))
            first, last = float(item["values"][0][0]), float(item["values"][-1][0])
            span = spans.setdefault(node, {"node": node, "first": first, "last": last})
            span["first"], span["last"] = min(span["first"], first), max(span["last"], last)
        return sorted(spans.values(), key=lambda entry: entry["first"])

    # ------------------------------------------------------------------ the recommender

    def write_config(self, tag: str, overrides: Mapping[str, Any] | None = None) -> Path:
        """The lab's recommender config (with `overrides` merged per section) as YAML."""
        assert self.prometheus is not None
        config: dict[str, Any] = {k: dict(v) for k, v in self.spec.config.items()}
        for section, values in (overrides or {}).items():
            config.setdefault(section, {}).update(values)
        config.setdefault("prometheus", {})["url"] = self.prometheus.url
        path = self.results / f"config-{tag}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def vmbalance(self, *args: str) -> str:
        """Run the `vmbalance` CLI; its stdout, or CommandFailed with its stderr."""
        result = subprocess.run(
            [sys.executable, "-m", "recommender.cli", *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT,
            check=False,
        )
        if result.returncode != 0:
            raise CommandFailed(f"vmbalance {args[0]} exited {result.returncode}: {result.stderr}")
        return result.stdout

    def snapshot(self, tag: str, config: Path) -> tuple[Path, dict[str, Any]]:
        """`vmbalance snapshot -c CONFIG -o results/snapshot-TAG.json`."""
        path = self.results / f"snapshot-{tag}.json"
        self.vmbalance("snapshot", "-c", str(config), "-o", str(path))
        return path, json.loads(path.read_text())

    def plan(
        self, tag: str, config: Path, snapshot: Path | None = None
    ) -> tuple[Path, dict[str, Any]]:
        """`vmbalance plan -o json`, from Prometheus or from a snapshot file."""
        path = self.results / f"plan-{tag}.json"
        source = ["-i", str(snapshot)] if snapshot is not None else []
        self.vmbalance("plan", "-c", str(config), *source, "-o", "json", "--out-file", str(path))
        return path, json.loads(path.read_text())

    def wait_placed(
        self, vm: str, node: str, config: Path, tag: str, timeout: float = 180.0
    ) -> tuple[Path, dict[str, Any]]:
        """Take snapshots until one places `vm` on `node` (the history subqueries step by a
        minute, so a move shows within about a minute and a scrape)."""
        deadline = time.monotonic() + timeout
        while True:
            where = "nowhere"
            try:
                path, snapshot = self.snapshot(tag, config)
            except CommandFailed as exc:
                # Right after start no minute step of the history subqueries has data yet.
                if time.monotonic() > deadline:
                    raise
                where = f"nowhere ({exc})"
            else:
                row = next((r for r in snapshot["vms"] if r["vm"] == vm), None)
                if row is not None and row["node"] == node:
                    return path, snapshot
                where = row["node"] if row else where
            if time.monotonic() > deadline:
                raise TimeoutError(f"{vm} still on {where}, not {node}, after {timeout:.0f}s")
            time.sleep(self.spec.scrape_interval)

    # ------------------------------------------------------------------ migration

    def migrate(self, vm: str, source: str, target: str) -> Migration:
        """Live-migrate a Proxmox-like guest to another Proxmox-like node, recording whether
        the target's exporter already lists it while the incoming QEMU waits."""
        target_url = self.exporter_url(target)

        def listed(_incoming: PveGuest) -> bool:
            text = requests.get(target_url, timeout=30).text
            return f'vmbalance_vm_info{{node="{target}",vm="{vm}"' in text

        return live_migrate(self.pve[source], vm, self.pve[target], self.image, listed)
