"""Proxmox VE backend: each running VM read over its own QMP socket, plus /proc and sysfs.

Proxmox's QEMU serves one QMP client at a time and pvestatd polls it too, so every VM gets a
short session per scrape: connect, negotiate, one pipelined batch of read-only queries, hang
up. Nothing is kept open between scrapes, so the exporter never starves `qm` or pvestatd.

Only commands in `ALLOWED_COMMANDS` ever reach a VM: `execute` is the one path every command
(negotiation included) goes through, and it refuses anything else before a byte is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Final

from qemu.qmp import ExecuteError, Message, QMPClient, Runstate

from exporter.hostfiles import (
    ProcessUsage,
    can_list,
    mem_total,
    read_process_usage,
    read_tap_counters,
)
from exporter.hostio import HostReader, ReadTimeout
from exporter.pve_conf import VMConfig, read_config
from exporter.samples import (
    BackendError,
    DiskSample,
    InterfaceSample,
    NodeSample,
    ScrapeResult,
    VMSample,
)

logger = logging.getLogger(__name__)

#: Every QMP command the exporter may send: all of them only read state.
ALLOWED_COMMANDS: Final[frozenset[str]] = frozenset(
    {
        "qmp_capabilities",
        "query-blockstats",
        "query-balloon",
        "query-cpus-fast",
        "query-version",
        "query-name",
        "query-status",
        "query-uuid",
        "query-memory-size-summary",
        "qom-get",
    }
)

#: Where Proxmox puts its balloon device (`-device virtio-balloon-pci,id=balloon0`); its
#: `guest-stats` property holds the guest's own memory figures on an unpatched QEMU.
BALLOON_QOM_PATH: Final = "/machine/peripheral/balloon0"

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
# QEMU reports a guest statistic it has not received as -1 in an unsigned 64-bit field.
_STAT_UNSET: Final = 2**63
# Block devices whose qdev path is not the Proxmox drive name (OVMF code and vars).
_QDEV_ALIASES: Final = {"/machine/system.flash0": "pflash0", "/machine/system.flash1": "efidisk0"}
# Run states (`query-status`) of a QEMU whose guest runs on another node: a target waiting for
# or receiving an incoming migration, a source finishing or done migrating away. That node
# reports the VM; publishing it here too would count it twice (and a failed migration would
# look like a VM that moved). Not an error either: the VM is simply not here.
_RUNNING_ELSEWHERE: Final = frozenset({"inmigrate", "postmigrate", "finish-migrate"})


class CommandNotAllowedError(Exception):
    """A QMP command outside `ALLOWED_COMMANDS` was about to be sent."""


async def execute(
    client: QMPClient, command: str, arguments: Mapping[str, object] | None = None
) -> object:
    """Send one QMP command; the single gate that keeps the exporter read-only."""
    if command not in ALLOWED_COMMANDS:
        raise CommandNotAllowedError(f"QMP command {command!r} is not in ALLOWED_COMMANDS")
    return await client.execute(command, arguments)


class _Client(QMPClient):
    """QMPClient that formats messages for its debug log only when that log is on.

    The library's message hooks pretty-print every message with `json.dumps(indent=2)`
    before the logger decides to drop it; at 200 VMs that was most of a scrape's CPU time.
    """

    def _cb_outbound(self, msg: Message) -> Message:
        return super()._cb_outbound(msg) if self.logger.isEnabledFor(logging.DEBUG) else msg

    def _cb_inbound(self, msg: Message) -> Message:
        return super()._cb_inbound(msg) if self.logger.isEnabledFor(logging.DEBUG) else msg


# --------------------------------------------------------------------------- QMP replies


def disk_name(device: str | None, qdev: str | None) -> str | None:
    """The disk as Proxmox names it, from a `query-blockstats` entry.

    `-drive` disks carry `device: drive-scsi0`; `-blockdev` disks have an empty `device` and
    only the qdev: a bare id (`scsi0`) for SCSI/SATA/IDE, a QOM path for virtio-blk
    (`/machine/peripheral/virtio0/virtio-backend`). None when there is no name at all.
    """
    if device:
        return device.removeprefix("drive-")
    if not qdev:
        return None
    if qdev in _QDEV_ALIASES:
        return _QDEV_ALIASES[qdev]
    parts = [part for part in qdev.split("/") if part and part != "virtio-backend"]
    return parts[-1] if parts else None


def disks_from_blockstats(entries: object) -> tuple[DiskSample, ...]:
    """Disk counters from a `query-blockstats` reply; nameless or repeated entries dropped."""
    if not isinstance(entries, list):
        raise TypeError("query-blockstats did not return a list")
    disks: dict[str, DiskSample] = {}
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        name = disk_name(entry.get("device"), entry.get("qdev"))
        stats = entry.get("stats")
        if not name or name in disks or not isinstance(stats, dict):
            continue
        disks[name] = DiskSample(
            disk=name,
            read_bytes=int(stats.get("rd_bytes", 0)),
            written_bytes=int(stats.get("wr_bytes", 0)),
            reads_completed=int(stats.get("rd_operations", 0)),
            writes_completed=int(stats.get("wr_operations", 0)),
        )
    return tuple(disks.values())


def _stat(value: object) -> int | None:
    """A guest memory figure, or None when the guest has not reported it."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < _STAT_UNSET:
        return value
    return None


def _used(total: object, free: object) -> int | None:
    total_bytes, free_bytes = _stat(total), _stat(free)
    if not total_bytes or free_bytes is None or free_bytes > total_bytes:
        return None
    return total_bytes - free_bytes


def guest_memory_used(balloon: Mapping[str, object] | None, guest_stats: object) -> int | None:
    """Guest-visible memory in use (total - free), as Proxmox computes it.

    Proxmox's QEMU adds `total_mem`/`free_mem` to `query-balloon`; an upstream QEMU has the
    same figures in the balloon's `guest-stats` QOM property once the guest reports them.
    """
    if balloon is not None:
        used = _used(balloon.get("total_mem"), balloon.get("free_mem"))
        if used is not None:
            return used
    if isinstance(guest_stats, dict) and guest_stats.get("last-update"):
        stats = guest_stats.get("stats")
        if isinstance(stats, dict):
            return _used(stats.get("stat-total-memory"), stats.get("stat-free-memory"))
    return None


def memory_max(conf: VMConfig, balloon: Mapping[str, object] | None, summary: object) -> int:
    """Memory assigned to the VM: QEMU's balloon maximum, else the config, else QEMU's RAM."""
    if balloon is not None and (max_mem := _stat(balloon.get("max_mem"))):
        return max_mem
    if conf.memory_bytes:
        return conf.memory_bytes
    if isinstance(summary, dict):
        base = _stat(summary.get("base-memory")) or 0
        plugged = _stat(summary.get("plugged-memory")) or 0
        if base + plugged:
            return base + plugged
    if balloon is not None and (actual := _stat(balloon.get("actual"))):
        return actual
    return 0


def _qemu_version(reply: object) -> tuple[int, int, int] | None:
    if not isinstance(reply, dict) or not isinstance(reply.get("qemu"), dict):
        return None
    qemu = reply["qemu"]
    try:
        return int(qemu["major"]), int(qemu["minor"]), int(qemu["micro"])
    except (KeyError, TypeError, ValueError):
        return None


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
    read_sources = ("conf", "qmp", "proc", "sysfs", "run")

    def __init__(
        self,
        run_dir: str = "/var/run/qemu-server",
        conf_dir: str = "/etc/pve/qemu-server",
        proc_root: str = "/proc",
        concurrency: int = 16,
        node_sample: NodeSample | None = None,
        net_root: str = "/sys/class/net",
        vm_timeout: float = 2.0,
    ) -> None:
        """Check the directories now so a wrong path fails at start, not at every scrape.

        `node_sample` fixes the node facts instead of reading `proc_root` and QEMU's version;
        `vm_timeout` caps one VM's session so a hung VM holds a slot only that long.
        """
        self.run_dir = run_dir
        self.conf_dir = conf_dir
        self.proc_root = proc_root
        self.net_root = net_root
        self.concurrency = concurrency
        self.vm_timeout = vm_timeout
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
            targets, listing_skipped = self._reader.call("run", "run-dir", self._list_vms, deadline)
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
        try:
            memory = self._memory(min(deadline, time.monotonic() + _CONF_TREE_PROBE))
        except (OSError, ValueError) as exc:
            return ScrapeResult(up=False, error=_one_line(f"cannot read node facts: {exc}"))
        readings, skipped, timeouts = self._read_all(targets, deadline)
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
        readings: list[_Reading] = []
        skipped: dict[str, str] = {}
        timeouts: dict[str, int] = {}
        for target, task in zip(targets, tasks, strict=True):
            stage = stages[target.vmid]
            exc = None if not task.done() or task.cancelled() else task.exception()
            if task.done() and not task.cancelled() and exc is None:
                readings.append(task.result())
                timeouts.update(
                    {src: timeouts.get(src, 0) + n for src, n in stage.timeouts.items()}
                )
                continue
            if isinstance(exc, _DeadlinePassed):
                skipped[target.vmid] = "not reached before the scrape deadline"
                continue
            if isinstance(exc, TimeoutError) or exc is None:  # ReadTimeout is one too
                # Where this VM's reading was when its time ran out; a read still stuck from an
                # earlier scrape was where it was then.
                if isinstance(exc, ReadTimeout) and exc.earlier:
                    source = self._stuck_at.get(target.vmid, stage.source)
                else:
                    source = stage.source
                    self._stuck_at[target.vmid] = source
                stage.timeouts[source] = stage.timeouts.get(source, 0) + 1
                skipped[target.vmid] = f"{_STAGE_WORDS[source]} did not answer in time"
            else:
                skipped[target.vmid] = _describe(exc)
            timeouts.update({src: timeouts.get(src, 0) + n for src, n in stage.timeouts.items()})
        return readings, skipped, timeouts

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
        queries: dict[str, Mapping[str, object] | None] = {
            "query-status": None,
            "query-blockstats": None,
            "query-balloon": None,
            "query-cpus-fast": None,
            "query-version": None,
        }
        if conf.name is None:
            queries["query-name"] = None
        if conf.uuid is None:
            queries["query-uuid"] = None
        if conf.memory_bytes is None:
            queries["query-memory-size-summary"] = None

        client = _Client(f"vm{target.vmid}")
        client.negotiate = False  # negotiated below, through execute(), like every command
        try:
            await client.connect(target.socket)
            await execute(client, "qmp_capabilities")
            replies = await _batch(client, queries)
            elsewhere = _runs_elsewhere(replies["query-status"])
            balloon = replies["query-balloon"]
            balloon_info = balloon if isinstance(balloon, dict) else None
            guest_stats: object = None
            if (
                not elsewhere
                and balloon_info is not None
                and guest_memory_used(balloon_info, None) is None
            ):
                with contextlib.suppress(ExecuteError):
                    guest_stats = await execute(
                        client, "qom-get", {"path": BALLOON_QOM_PATH, "property": "guest-stats"}
                    )
        finally:
            await _hang_up(client)

        version = _qemu_version(replies["query-version"])
        if elsewhere:
            logger.debug("VM %s not published: migrating (%s)", target.vmid, elsewhere)
            return _Reading(sample=None, version=version)
        blockstats = replies["query-blockstats"]
        if isinstance(blockstats, ExecuteError):
            raise blockstats
        disks = disks_from_blockstats(blockstats)
        # Read /proc after the session: it also proves the process outlived the queries.
        # /proc, then sysfs, in one trip to a reader thread; `stage` says which one hung.
        stage.source = "proc"
        usage, interfaces = await self._reader.read(
            "proc",
            f"host:{target.vmid}",
            partial(self._host_figures, target, conf.nets, stage),
            vm_deadline,
        )
        cpus = replies["query-cpus-fast"]
        name_reply = replies.get("query-name")
        uuid_reply = replies.get("query-uuid")
        qmp_name = name_reply.get("name") if isinstance(name_reply, dict) else None
        qmp_uuid = uuid_reply.get("UUID") if isinstance(uuid_reply, dict) else None
        if qmp_uuid and not str(qmp_uuid).strip("0-"):
            qmp_uuid = None  # QEMU's default all-zero UUID says nothing
        used = guest_memory_used(balloon_info, guest_stats)
        sample = VMSample(
            vm=target.vmid,
            name=conf.name or (str(qmp_name) if qmp_name else f"VM {target.vmid}"),
            uuid=conf.uuid or (str(qmp_uuid) if qmp_uuid else ""),
            cpu_seconds=usage.cpu_seconds,
            vcpus=len(cpus) if isinstance(cpus, list) and cpus else conf.cpu_count,
            memory_max_bytes=memory_max(
                conf, balloon_info, replies.get("query-memory-size-summary")
            ),
            memory_used_bytes=used if used is not None else usage.rss_bytes,
            memory_rss_bytes=usage.rss_bytes,
            disks=disks,
            interfaces=interfaces,
        )
        return _Reading(sample=sample, version=version)


def _runs_elsewhere(status: object) -> str | None:
    """The run state from a `query-status` reply when it means the guest runs on another node.

    A refused or odd reply gives None: the VM is read as before rather than hidden.
    """
    if isinstance(status, dict) and status.get("status") in _RUNNING_ELSEWHERE:
        return str(status["status"])
    return None


async def _batch(
    client: QMPClient, queries: Mapping[str, Mapping[str, object] | None]
) -> dict[str, object]:
    """Send all queries at once (QEMU answers in order) to keep the session short.

    A command QEMU refuses (no balloon device, say) yields its ExecuteError in place of a
    reply; a lost connection raises.
    """
    names = list(queries)
    results = await asyncio.gather(
        *(execute(client, name, queries[name]) for name in names), return_exceptions=True
    )
    replies: dict[str, object] = {}
    for name, result in zip(names, results, strict=True):
        if isinstance(result, BaseException) and not isinstance(result, ExecuteError):
            raise result
        replies[name] = result
    return replies


async def _hang_up(client: QMPClient) -> None:
    """Close the session at once so the socket is free for pvestatd and `qm`."""
    if client.runstate == Runstate.IDLE:
        return
    with contextlib.suppress(Exception):
        await client.disconnect()
