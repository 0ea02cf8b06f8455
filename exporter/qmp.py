"""Proxmox VE backend: each running VM read over its own QMP socket, plus /proc and sysfs.

A scrape lists the VMs of the run directory, then reads each (its `.conf`, one short QMP
session, its process in /proc and its tap devices in sysfs) on one event loop, a few at a time,
each within its own share of the scrape deadline. The parts: `qmp_session` (the session and
the gate that keeps it read-only), `qmp_replies` (replies as samples), `pve_conf` (the
`.conf` files), `hostfiles` and `hostio` (the host reads and their deadlines).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Final

from exporter.hostfiles import (
    ProcessUsage,
    can_list,
    mem_total,
    read_process_usage,
    read_tap_counters,
)
from exporter.hostio import HostReader, ReadTimeout
from exporter.pve_cluster import ClusterFiles, migration_facts, read_cluster_files
from exporter.pve_conf import VMConfig, read_config
from exporter.qmp_replies import disks_from_blockstats, qemu_version, vm_sample
from exporter.qmp_session import read_session
from exporter.samples import (
    BackendError,
    InterfaceSample,
    NodeSample,
    ScrapeResult,
    VMSample,
)

logger = logging.getLogger(__name__)

# A config tree that does not answer a stat within this is taken as hung (pmxcfs without
# quorum); one `.conf` may take this share of its VM's time, the rest is for the VM itself.
_CONF_TREE_PROBE: Final = 1.0
_START_PROBE = 5.0  # how long the start-up check waits for a directory
_CONF_SHARE: Final = 0.5
_STAGE_WORDS: Final = {
    "conf": "its .conf",
    "qmp": "its QMP socket",
    "proc": "its process in /proc",
    "sysfs": "its tap devices in sysfs",
}
# How long cancelled VM sessions get to hang up before the scrape returns without them.
_CANCEL_GRACE: Final = 0.2


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return _one_line(f"{type(exc).__name__}: {exc}")


# --------------------------------------------------------------------------- the backend


@dataclass(frozen=True, slots=True)
class _Target:
    """A VM found in the run directory: its pid names a live process and its socket exists."""

    vmid: str
    pid: int
    socket: str


@dataclass(slots=True)
class _Stage:
    """Where one VM's reading is: the source to blame if its time runs out there."""

    source: str = "conf"
    timeouts: dict[str, int] = field(default_factory=dict)


class _DeadlinePassed(Exception):
    """The scrape's deadline passed before this VM's turn came."""


@dataclass(frozen=True, slots=True)
class _Reading:
    """One VM's session; `sample` is None for a VM whose guest runs on another node."""

    sample: VMSample | None
    version: tuple[int, int, int] | None


class QmpBackend:
    """Reads the VMs Proxmox VE runs on this node, over QMP, /proc and sysfs."""

    name = "qmp"
    read_sources: tuple[str, ...] = ("conf", "qmp", "proc", "sysfs", "run")

    def __init__(
        self,
        run_dir: str = "/var/run/qemu-server",
        conf_dir: str = "/etc/pve/qemu-server",
        proc_root: str = "/proc",
        concurrency: int = 16,
        node_sample: NodeSample | None = None,
        net_root: str = "/sys/class/net",
        vm_timeout: float = 2.0,
        pve_dir: str | None = None,
    ) -> None:
        """Check the directories now so a wrong path fails at start, not at every scrape.

        `pve_dir` holds `storage.cfg`, `ha/resources.cfg` and `corosync.conf` (default: the
        parent of `conf_dir`, as `/etc/pve` is of `/etc/pve/qemu-server`).
        `node_sample` fixes the node facts instead of reading `proc_root` and QEMU's version;
        `vm_timeout` caps one VM's session so a hung VM holds a slot only that long.
        """
        self.run_dir = run_dir
        self.conf_dir = conf_dir
        self.proc_root = proc_root
        self.net_root = net_root
        self.concurrency = concurrency
        self.vm_timeout = vm_timeout
        self.pve_dir = pve_dir if pve_dir is not None else os.path.dirname(conf_dir.rstrip("/"))
        self._cluster_files = ClusterFiles()  # the last good reading
        self._node_sample = node_sample
        self._last_version: str | None = None
        self._configs: dict[str, VMConfig] = {}  # last good `.conf` per VMID
        self._stuck_at: dict[str, str] = {}  # VMID: the source its last timed-out read hung in
        self._memory_bytes: int | None = None
        self._reader = HostReader()
        self.validate()

    def validate(self) -> None:
        """Raise BackendError (one line) unless the directories the backend reads are usable."""
        if self.concurrency < 1:
            raise BackendError(f"QMP concurrency must be at least 1, got {self.concurrency}")
        if self.vm_timeout <= 0:
            raise BackendError(f"QMP per-VM timeout must be positive, got {self.vm_timeout}")
        for what, path in (
            ("QMP run directory", self.run_dir),
            ("Proxmox VM config directory", self.conf_dir),
            ("proc root", self.proc_root),
        ):
            try:
                # Bounded: a hung pmxcfs at start is a backend that is down, not a hung start.
                self._reader.call(
                    "conf",
                    f"start:{path}",
                    partial(can_list, path),
                    time.monotonic() + _START_PROBE,
                )
            except ReadTimeout:
                logger.debug("%s %s does not answer at start", what, path)
            except OSError as exc:
                raise BackendError(
                    _one_line(f"{what} {path} is not readable: {exc.strerror or exc}")
                ) from None

    def scrape(self, timeout: float) -> ScrapeResult:
        """Read every running VM; return within `timeout` plus a fraction of a second."""
        deadline = time.monotonic() + max(0.0, timeout)
        try:
            return self._scrape(deadline)
        except Exception as exc:  # the Backend contract: report trouble, never raise
            logger.exception("QMP scrape failed")
            return ScrapeResult(up=False, error=_one_line(f"QMP scrape failed: {exc}"))

    def close(self) -> None:
        """Nothing to release: every QMP session is closed within the scrape that opened it."""

    # ------------------------------------------------------------------ internals

    def _scrape(self, deadline: float) -> ScrapeResult:
        listing = self._list_or_fail(deadline)
        if isinstance(listing, ScrapeResult):
            return listing
        targets, listing_skipped = listing
        try:
            memory = self._memory(min(deadline, time.monotonic() + _CONF_TREE_PROBE))
        except (OSError, ValueError) as exc:
            return ScrapeResult(up=False, error=_one_line(f"cannot read node facts: {exc}"))
        files_timeouts = self._read_cluster_files(deadline)
        readings, skipped, timeouts = self._read_all(targets, deadline)
        if files_timeouts:
            timeouts["conf"] = timeouts.get("conf", 0) + files_timeouts
        skipped = listing_skipped | skipped
        versions = [r.version for r in readings if r.version is not None]
        if versions:
            self._last_version = ".".join(map(str, max(versions)))
        node = self._node_sample or NodeSample(
            cpus=os.cpu_count() or 1, memory_bytes=memory, version=self._last_version or "unknown"
        )
        return ScrapeResult(
            up=True,
            node=node,
            vms=[r.sample for r in readings if r.sample is not None],
            vm_errors=len(skipped),
            skipped=skipped,
            read_timeouts=timeouts,
            cluster=self._cluster_files.cluster,
        )

    def _read_cluster_files(self, deadline: float) -> int:
        """Storages, HA resources and the cluster name, once per scrape; 1 on a timeout,
        when the last good reading stands in."""
        try:
            self._cluster_files = self._reader.call(
                "conf",
                "cluster-files",
                partial(read_cluster_files, self.pve_dir),
                min(deadline, time.monotonic() + _CONF_TREE_PROBE),
            )
        except ReadTimeout:
            return 1
        except OSError as exc:
            logger.debug("cluster files under %s: %s", self.pve_dir, exc)
        return 0

    def _list_or_fail(self, deadline: float) -> tuple[list[_Target], dict[str, str]] | ScrapeResult:
        """The VMs to read and the broken ones, or the backend down when its trees hang."""
        # /etc/pve is pmxcfs: when it hangs, every .conf read would; find out once, quickly.
        probe_deadline = min(deadline, time.monotonic() + _CONF_TREE_PROBE)
        try:
            self._reader.call("conf", "conf-dir", self._probe_conf_dir, probe_deadline)
        except ReadTimeout:
            return ScrapeResult(
                up=False,
                error=f"Proxmox config tree {self.conf_dir} does not answer",
                read_timeouts={"conf": 1},
            )
        except OSError:
            pass  # unreadable now (the constructor checked it once): .conf reads say more
        try:
            return self._reader.call("run", "run-dir", self._list_vms, deadline)
        except ReadTimeout:
            return ScrapeResult(
                up=False,
                error=f"QMP run directory {self.run_dir} does not answer",
                read_timeouts={"run": 1},
            )
        except OSError as exc:
            return ScrapeResult(
                up=False,
                error=_one_line(
                    f"cannot list QMP run directory {self.run_dir}: {exc.strerror or exc}"
                ),
            )

    def _probe_conf_dir(self) -> None:
        os.stat(self.conf_dir)

    def _memory(self, deadline: float) -> int:
        """The host's memory, read each scrape; the last value stands in while /proc hangs."""
        if self._node_sample is not None:
            return self._node_sample.memory_bytes
        try:
            self._memory_bytes = self._reader.call(
                "proc", "meminfo", partial(mem_total, self.proc_root), deadline
            )
        except ReadTimeout:
            if self._memory_bytes is None:
                raise OSError(f"{self.proc_root}/meminfo does not answer") from None
        return self._memory_bytes

    def _list_vms(self) -> tuple[list[_Target], dict[str, str]]:
        """VMs with a pid file naming a live process and a QMP socket, and the broken ones.

        A pid file whose process is dead is a VM that crashed (QEMU removes the file when it
        exits cleanly): it counts as an error. A live process without a socket yet is a VM
        still starting and is left for the next scrape.
        """
        with os.scandir(self.run_dir) as entries:
            names = [entry.name for entry in entries]
        # Only `<vmid>.pid`: Proxmox also keeps swtpm pid files and `-1.pid` for probes.
        stems = (stem for stem, _, ext in (n.partition(".") for n in names) if ext == "pid")
        vmids = sorted((stem for stem in stems if stem.isdigit()), key=int)
        targets: list[_Target] = []
        skipped: dict[str, str] = {}
        for vmid in vmids:
            try:
                pid = int(Path(self.run_dir, f"{vmid}.pid").read_text().strip())
            except FileNotFoundError:
                continue  # stopped between listing and reading
            except (OSError, ValueError) as exc:
                skipped[vmid] = f"unusable pid file: {_describe(exc)}"
                continue
            if not os.path.exists(os.path.join(self.proc_root, str(pid), "stat")):
                skipped[vmid] = "stale pid file, its process is gone"
                continue
            socket = os.path.join(self.run_dir, f"{vmid}.qmp")
            if not os.path.exists(socket):
                continue
            targets.append(_Target(vmid=vmid, pid=pid, socket=socket))
        return targets, skipped

    def _read_all(
        self, targets: list[_Target], deadline: float
    ) -> tuple[list[_Reading], dict[str, str], dict[str, int]]:
        """One event loop per scrape; a loop left over from an earlier scrape can't leak in."""
        if not targets:
            return [], {}, {}
        loop = asyncio.new_event_loop()
        try:
            return loop.run_until_complete(self._gather(targets, deadline))
        finally:
            loop.close()

    async def _gather(
        self, targets: list[_Target], deadline: float
    ) -> tuple[list[_Reading], dict[str, str], dict[str, int]]:
        semaphore = asyncio.Semaphore(self.concurrency)
        stages = {target.vmid: _Stage() for target in targets}

        async def bounded(target: _Target) -> _Reading:
            async with semaphore:
                budget = min(self.vm_timeout, deadline - time.monotonic())
                if budget <= 0:
                    raise _DeadlinePassed
                vm_deadline = time.monotonic() + budget
                return await asyncio.wait_for(
                    self._read_vm(target, stages[target.vmid], vm_deadline), budget
                )

        tasks = [asyncio.create_task(bounded(t), name=f"qmp-{t.vmid}") for t in targets]
        # wait_for already bounds each VM; this is the backstop for the scrape as a whole.
        _, pending = await asyncio.wait(
            tasks, timeout=max(0.0, deadline - time.monotonic()) + _CANCEL_GRACE
        )
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=_CANCEL_GRACE)
        return self._tally(targets, tasks, stages)

    def _tally(
        self,
        targets: list[_Target],
        tasks: list[asyncio.Task[_Reading]],
        stages: dict[str, _Stage],
    ) -> tuple[list[_Reading], dict[str, str], dict[str, int]]:
        """The readings that finished, why the others did not, and the reads that timed out."""
        readings: list[_Reading] = []
        skipped: dict[str, str] = {}
        timeouts: dict[str, int] = {}
        for target, task in zip(targets, tasks, strict=True):
            stage = stages[target.vmid]
            exc = None if not task.done() or task.cancelled() else task.exception()
            if task.done() and not task.cancelled() and exc is None:
                readings.append(task.result())
            elif isinstance(exc, _DeadlinePassed):
                skipped[target.vmid] = "not reached before the scrape deadline"
                continue
            else:
                skipped[target.vmid] = self._failure(target.vmid, exc, stage)
            for source, count in stage.timeouts.items():
                timeouts[source] = timeouts.get(source, 0) + count
        return readings, skipped, timeouts

    def _failure(self, vmid: str, exc: BaseException | None, stage: _Stage) -> str:
        """Why a VM was skipped; a timeout (`exc` None: cancelled) counts where it hung."""
        if not isinstance(exc, TimeoutError) and exc is not None:  # ReadTimeout is one too
            return _describe(exc)
        # Where this VM's reading was when its time ran out; a read still stuck from an
        # earlier scrape was where it was then.
        if isinstance(exc, ReadTimeout) and exc.earlier:
            source = self._stuck_at.get(vmid, stage.source)
        else:
            source = stage.source
            self._stuck_at[vmid] = source
        stage.timeouts[source] = stage.timeouts.get(source, 0) + 1
        return f"{_STAGE_WORDS[source]} did not answer in time"

    async def _config(self, target: _Target, stage: _Stage, vm_deadline: float) -> VMConfig:
        """The VM's `.conf`, or its last good reading while the file does not answer."""
        stage.source = "conf"
        path = os.path.join(self.conf_dir, f"{target.vmid}.conf")
        budget = max(vm_deadline - time.monotonic(), 0.0) * _CONF_SHARE
        try:
            conf = await self._reader.read(
                "conf", f"conf:{target.vmid}", partial(read_config, path), time.monotonic() + budget
            )
        except ReadTimeout:
            last = self._configs.get(target.vmid)
            if last is None:
                raise
            stage.timeouts["conf"] = stage.timeouts.get("conf", 0) + 1
            return last
        self._configs[target.vmid] = conf
        return conf

    def _host_figures(
        self, target: _Target, nets: tuple[int, ...], stage: _Stage
    ) -> tuple[ProcessUsage, tuple[InterfaceSample, ...]]:
        usage = read_process_usage(self.proc_root, target.pid)
        stage.source = "sysfs"
        return usage, read_tap_counters(self.net_root, target.vmid, nets)

    async def _read_vm(self, target: _Target, stage: _Stage, vm_deadline: float) -> _Reading:
        conf = await self._config(target, stage, vm_deadline)
        stage.source = "qmp"
        session = await read_session(target.vmid, target.socket, conf)
        version = qemu_version(session.replies["query-version"])
        if session.elsewhere:
            logger.debug("VM %s not published: migrating (%s)", target.vmid, session.elsewhere)
            return _Reading(sample=None, version=version)
        disks = disks_from_blockstats(session.required("query-blockstats"))
        # Read /proc after the session: it also proves the process outlived the queries.
        # /proc, then sysfs, in one trip to a reader thread; `stage` says which one hung.
        stage.source = "proc"
        usage, interfaces = await self._reader.read(
            "proc",
            f"host:{target.vmid}",
            partial(self._host_figures, target, conf.nets, stage),
            vm_deadline,
        )
        sample = vm_sample(target.vmid, conf, session, usage, disks, interfaces)
        facts = migration_facts(target.vmid, conf, self._cluster_files)
        sample = sample._replace(
            disk_infos=facts.disk_infos, blockers=facts.blockers, ha_managed=facts.ha_managed
        )
        return _Reading(sample=sample, version=version)
