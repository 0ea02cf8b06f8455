"""The libvirt backend: every active domain of one libvirt URI.

One `getAllDomainStats` call lists the running domains with their state, balloon and
interface counters: the stat groups that cost next to nothing on QEMU (see `BULK_STATS`). CPU
time, vCPUs and each disk's counters are read per domain (`virDomainGetInfo`, one
`virDomainBlockStats` per disk) by a few worker threads at once, which on a node of tens of
VMs costs less than the bulk call's `VCPU` and `BLOCK` groups, each a monitor round trip (or
two) per domain plus work the metric contract does not need. A driver whose bulk stats carry
nothing but `state.*` (the test driver), or that has no bulk call at all, gains nothing from
it: the backend then lists domain IDs, keeps one handle per running domain, and reads each per
domain.

libvirt-python is imported on first use, never at module import, so the exporter runs on
hosts without it (Proxmox) as long as this backend is not chosen.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeVar

from exporter.libvirt_stats import (
    Devices,
    block_stats_skipped,
    bulk_balloon,
    bulk_disks,
    bulk_interfaces,
    memory_bytes,
    needs_memory_stats,
)
from exporter.samples import (
    BackendError,
    DiskSample,
    InterfaceSample,
    NodeSample,
    ScrapeResult,
    VMSample,
)

if TYPE_CHECKING:
    from libvirt import virConnect, virDomain

log = logging.getLogger(__name__)

_T = TypeVar("_T")
_KIB = 1024
_MIB = 1024 * 1024

# Domain states (virDomainState) and pause reasons (virDomainPausedReason); fixed by libvirt's ABI.
_SHUTOFF, _CRASHED, _PAUSED = 5, 6, 3
_NOT_RUNNING = frozenset({_SHUTOFF, _CRASHED})
# An incoming migration waits paused with reason MIGRATION (2) and a post-copy source stays
# paused with reason POSTCOPY (12): the VM runs on the other node, which reports it.
_PAUSED_ELSEWHERE = frozenset({2, 12})

# The stat groups the one bulk call asks for: those that cost next to nothing on QEMU. `VCPU`
# asks each domain's monitor for its vCPUs and reads every vCPU thread, `BLOCK` asks the
# monitor for the block graph besides the counters, and `CPU_TOTAL` cost more than
# `virDomainGetInfo` on the lab's node (bench/bench_exporter_lab_node.py), where the three
# were most of the scrape. CPU time and vCPUs come from `virDomainGetInfo` and each disk's
# counters from `virDomainBlockStats` instead, per domain on a few threads at once.
BULK_STATS: tuple[str, ...] = ("STATE", "BALLOON", "INTERFACE")
PER_DOMAIN_STATS: tuple[str, ...] = ("info", "blockStats")

# How often a scrape checks whether its per-domain workers wait rather than compute.
_WORKER_SLICE = 0.02
_NODE_FACTS_TTL = 60.0


def _ignore_libvirt_error(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr unless a handler takes it; the caller reports it."""


@functools.cache
def _libvirt() -> ModuleType:
    """Import libvirt-python once; raise BackendError where it is not installed."""
    try:
        import libvirt
    except ImportError as exc:
        raise BackendError(
            "libvirt-python is not installed; pip install 'vmbalance[libvirt]'"
        ) from exc
    libvirt.registerErrorHandler(_ignore_libvirt_error, None)
    return libvirt


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _format_version(number: int) -> str:
    """libvirt encodes versions as major * 1,000,000 + minor * 1,000 + release."""
    return f"{number // 1_000_000}.{number // 1_000 % 1_000}.{number % 1_000}"


@dataclass(slots=True)
class _Job:
    """A domain whose bulk stats miss fields, to complete with per-domain calls."""

    domain: virDomain
    stats: Mapping[str, Any]  # empty for a listed domain
    balloon: Mapping[str, int]  # `balloon.*` of `stats` under memoryStats() keys
    uuid: str
    domain_id: int | None = None  # known for a listed domain, else read when needed
    name: str | None = None

    def label(self) -> str:
        """The domain's name, the `vm` label (read from the handle, no round trip)."""
        return self.name if self.name is not None else self.domain.name()


@dataclass(frozen=True, slots=True)
class _Listed:
    """A running domain's handle, kept by domain ID while the backend lists IDs.

    An ID names one run of one domain: libvirt hands out a new one at every start and does
    not reuse them while the daemon runs, and a reconnect clears the table. The name cannot
    change while the domain runs (libvirt renames only inactive domains).
    """

    domain: virDomain
    uuid: str
    name: str


@dataclass(slots=True)
class _Batch:
    """Results of one scrape's per-domain calls; late workers may not add after `closed`."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    samples: list[VMSample] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # domain name: why it was skipped
    started: set[str] = field(default_factory=set)  # UUIDs
    finished: set[str] = field(default_factory=set)
    timeouts: int = 0  # domains whose call was still out at the deadline
    closed: bool = False


_NOT_REACHED = "not reached before the scrape deadline"
_ELSEWHERE = "runs on another node"  # paused here for a migration: neither sample nor error
_STILL_BUSY = "a libvirt call of an earlier scrape has not returned"


class _DeadlineExceeded(Exception):
    """A worker reached the scrape deadline before starting on a domain."""


def _read_disk(domain: virDomain, dev: str) -> DiskSample:
    read_reqs, read_bytes, write_reqs, write_bytes, _ = domain.blockStats(dev)
    return DiskSample(dev, read_bytes, write_bytes, read_reqs, write_reqs)


class _NotRunning(Exception):
    """A listed domain turned out shut off or crashed."""


class _RunsElsewhere(Exception):
    """A listed domain is paused for an incoming migration or after a post-copy one."""


class LibvirtBackend:
    """Reads the active domains of one libvirt URI over one persistent read-only connection.

    The constructor opens the connection, so a bad URI fails at startup with a one-line
    BackendError; once running, a lost connection is reported as `up=False` and reopened by
    the next scrape. Every libvirt call that can block runs in a daemon thread that the
    scrape waits for only until its deadline, so a hung libvirtd or QEMU monitor costs a scrape
    its late VMs, never the exporter its thread. (Domain name, UUID and ID are read from the
    handle the bulk call returned, without a round trip.)
    """

    name = "libvirt"
    read_sources = ("libvirt",)

    def __init__(
        self,
        uri: str = "qemu:///system",
        concurrency: int = 8,
        *,
        opener: Callable[[str], virConnect] | None = None,
        connect_timeout: float = 5.0,
    ) -> None:
        """Try `uri` now; BackendError (one line) when libvirt-python is missing or the URI
        cannot work (malformed, a driver file that does not parse).

        A daemon that is not running or does not answer yet is not an error: the exporter
        serves `vmbalance_up 0` and each scrape connects again until it answers.
        `opener(uri)` opens the connection: by default libvirt's `openReadOnly`, since an
        exporter never changes a domain; a caller needing credentials passes its own.
        """
        if concurrency < 1:
            raise BackendError(f"libvirt: concurrency must be at least 1, not {concurrency}")
        self._lv = _libvirt()
        self.uri = uri
        self.concurrency = concurrency
        self._opener: Callable[[str], virConnect] = opener or self._lv.openReadOnly
        self._lock = threading.Lock()
        self._conn: virConnect | None = None
        self._conn_dead = False
        self._version = ""
        self._bulk_flags = (
            self._lv.VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE
            | self._lv.VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT
        )
        self._bulk_stats = 0
        for group in BULK_STATS:
            self._bulk_stats |= getattr(self._lv, f"VIR_DOMAIN_STATS_{group}")
        self._devices: dict[str, Devices] = {}
        # Whether the bulk call is worth making on this connection: None until the first
        # scrape tells, False when it carries only `state.*` or is not supported at all.
        self._bulk_useful: bool | None = None
        self._listed: dict[int, _Listed] = {}
        # Whether the driver answers getMemoryStats(); found out again on each new connection.
        self._node_memory_stats = True
        self._busy: set[str] = set()  # UUIDs with a per-domain call still running
        # (connection, when, cpus, memory bytes) of the last node facts read
        self._node_cache: tuple[virConnect, float, int, int] | None = None
        self._pending: threading.Thread | None = None  # a bulk call that overran its scrape
        self._connection_errors = frozenset(
            {
                self._lv.VIR_ERR_SYSTEM_ERROR,
                self._lv.VIR_ERR_INVALID_CONN,
                self._lv.VIR_ERR_NO_CONNECT,
                self._lv.VIR_ERR_RPC,
            }
        )
        self._connection_error_domains = frozenset(
            {self._lv.VIR_FROM_RPC, self._lv.VIR_FROM_REMOTE}
        )
        self._try_first_connection(connect_timeout)

    # -- connection -----------------------------------------------------------------------

    def _connection(self) -> virConnect:
        """The open connection, (re)opened when missing or found dead."""
        with self._lock:
            conn, dead = self._conn, self._conn_dead
        if conn is not None and (dead or not self._alive(conn)):
            self._drop_connection(conn)
            conn = None
        if conn is None:
            try:
                conn = self._opener(self.uri)
            except self._lv.libvirtError as exc:
                raise BackendError(
                    f"libvirt: cannot connect to {self.uri!r}: {_one_line(exc)}"
                ) from exc
            version = self._read_version(conn)
            with self._lock:
                self._conn, self._conn_dead, self._version = conn, False, version
                self._devices.clear()
                self._listed.clear()
                self._bulk_useful = None
                self._node_memory_stats = True
        return conn

    def _try_first_connection(self, timeout: float) -> None:
        """Connect once at start, bounded; only an error of the URI itself is fatal."""
        try:
            self._call_by(time.monotonic() + timeout, self._connection)
        except TimeoutError:
            log.debug("libvirt: %r did not answer within %gs at start", self.uri, timeout)
        except BackendError as exc:
            cause = exc.__cause__
            if not self._is_connection_error(cause):  # type: ignore[arg-type]
                raise
            log.debug("libvirt: %s (at start)", exc)

    def _alive(self, conn: virConnect) -> bool:
        try:
            return bool(conn.isAlive())
        except self._lv.libvirtError:
            return False

    def _read_version(self, conn: virConnect) -> str:
        """Hypervisor version, else the library's; neither changes while connected."""
        for getter in (conn.getVersion, conn.getLibVersion):
            try:
                number = getter()
            except self._lv.libvirtError:
                continue
            if number:
                return _format_version(number)
        return "unknown"

    def _drop_connection(self, conn: virConnect) -> None:
        with self._lock:
            if self._conn is conn:
                self._conn, self._conn_dead = None, False
        # Already closed or broken: nothing is left to release.
        with contextlib.suppress(self._lv.libvirtError):
            conn.close()

    def _is_connection_error(self, exc: Exception) -> bool:
        """Whether a call failed because of the connection, not of one domain or driver."""
        return isinstance(exc, self._lv.libvirtError) and (
            exc.get_error_code() in self._connection_errors
            or exc.get_error_domain() in self._connection_error_domains
        )

    def _note_error(self, exc: Exception) -> None:
        """Mark the connection dead when a call failed because of it, not of one domain."""
        if self._is_connection_error(exc):
            with self._lock:
                self._conn_dead = True

    def close(self) -> None:
        """Close the connection; a later scrape would open a new one."""
        with self._lock:
            conn = self._conn
        if conn is not None:
            self._drop_connection(conn)

    # -- scrape ---------------------------------------------------------------------------

    def scrape(self, timeout: float) -> ScrapeResult:
        """Read every active domain; VMs not read by `timeout` seconds count in `vm_errors`."""
        deadline = time.monotonic() + max(timeout, 0.0)
        if self._pending is not None and self._pending.is_alive():
            return ScrapeResult(
                up=False,
                error=f"libvirt: a call of an earlier scrape to {self.uri!r} has not returned",
                read_timeouts={"libvirt": 1},
            )
        self._pending = None
        try:
            node, records, listed, errors = self._call_by(deadline, self._read_domains)
        except TimeoutError:
            return ScrapeResult(
                up=False,
                error=f"libvirt: no answer from {self.uri!r} within the scrape timeout",
                read_timeouts={"libvirt": 1},
            )
        except BackendError as exc:
            return ScrapeResult(up=False, error=str(exc))
        except self._lv.libvirtError as exc:
            self._note_error(exc)
            return ScrapeResult(up=False, error=f"libvirt: {_one_line(exc)}")

        vms: list[VMSample] = []
        jobs: list[_Job] = []
        seen: set[str] = set()
        skipped: dict[str, str] = {}
        with self._lock:
            busy = set(self._busy)
        for domain, stats in records:
            uuid = domain.UUIDString()
            seen.add(uuid)
            state = stats.get("state.state")
            if state in _NOT_RUNNING:
                skipped[domain.name()] = "stopped while it was read"
            elif state == _PAUSED and stats.get("state.reason") in _PAUSED_ELSEWHERE:
                continue
            elif uuid in busy:  # still hung from an earlier scrape: do not pile on
                skipped[domain.name()] = _STILL_BUSY
            elif self._complete(stats, balloon := bulk_balloon(stats)):
                vms.append(self._sample_from_bulk(domain, uuid, stats, balloon))
            else:
                jobs.append(_Job(domain, stats, balloon, uuid))
        for job in listed:
            seen.add(job.uuid)
            if job.uuid in busy:
                skipped[job.label()] = _STILL_BUSY
            else:
                jobs.append(job)
        timeouts = 0
        if jobs:
            # Jobs from the bulk call wait on libvirtd's RPC (and QEMU's monitors): read them
            # in parallel at once. Listed ones may be in-process calls (the test driver):
            # parallel only once the workers turn out to wait.
            outcome = self._run_jobs(jobs, deadline, at_once=self._bulk_useful is True)
            vms.extend(outcome.samples)
            skipped.update(outcome.failed)
            timeouts = outcome.timeouts
        with self._lock:
            for uuid in self._devices.keys() - seen:
                del self._devices[uuid]
        vms.sort(key=lambda vm: vm.vm)
        return ScrapeResult(
            up=True,
            node=node,
            vms=vms,
            vm_errors=errors + len(skipped),
            skipped=skipped,
            read_timeouts={"libvirt": timeouts} if timeouts else {},
        )

    def _call_by(self, deadline: float, func: Callable[[], _T]) -> _T:
        """`func()` in a daemon thread, abandoned (and remembered) if it overruns `deadline`."""
        box: list[Any] = []

        def run() -> None:
            try:
                box.append((True, func()))
            except BaseException as exc:
                box.append((False, exc))

        thread = threading.Thread(target=run, name="libvirt-bulk", daemon=True)
        thread.start()
        thread.join(max(deadline - time.monotonic(), 0.0))
        if not box:
            self._pending = thread
            raise TimeoutError
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def _read_domains(
        self,
    ) -> tuple[NodeSample, list[tuple[virDomain, dict[str, Any]]], list[_Job], int]:
        """The node, then either bulk records or listed domains to read one by one.

        Returns (node, bulk records, listed jobs, listed domains that vanished before their
        lookup); exactly one of records and jobs is used on a given connection.
        """
        conn = self._connection()
        try:
            cpus, memory = self._node_facts(conn)
            records: list[tuple[virDomain, dict[str, Any]]] = []
            jobs: list[_Job] = []
            lost = 0
            if self._bulk_useful is not False:
                records = self._bulk_records(conn)
            # Listing from this scrape on only when the bulk call is not supported at all; a
            # state-only one has listed the domains already.
            if self._bulk_useful is False and not records:
                jobs, lost = self._list_domains(conn)
        except self._lv.libvirtError as exc:
            self._note_error(exc)
            raise
        with self._lock:
            version = self._version
        node = NodeSample(cpus=cpus, memory_bytes=memory, version=version)
        return node, records, jobs, lost

    def _node_facts(self, conn: virConnect) -> tuple[int, int]:
        """The host's CPUs and memory, asked again once a minute (and on a new connection):
        two round trips a scrape for figures that change only with hardware."""
        now = time.monotonic()
        with self._lock:
            cached = self._node_cache
        if cached is not None and cached[0] is conn and now - cached[1] < _NODE_FACTS_TTL:
            return cached[2], cached[3]
        info = conn.getInfo()
        memory = self._node_memory(conn, info)
        with self._lock:
            self._node_cache = (conn, now, int(info[2]), memory)
        return int(info[2]), memory

    def _bulk_records(self, conn: virConnect) -> list[tuple[virDomain, dict[str, Any]]]:
        """`getAllDomainStats`, learning on the way whether it is worth calling again."""
        try:
            records = conn.getAllDomainStats(self._bulk_stats, self._bulk_flags)
        except self._lv.libvirtError as exc:
            code = exc.get_error_code()
            if code in (self._lv.VIR_ERR_NO_SUPPORT, self._lv.VIR_ERR_OPERATION_UNSUPPORTED):
                self._bulk_useful = False
                return []
            if code != self._lv.VIR_ERR_INVALID_ARG:
                raise
            # A libvirt older than 4.5 rejects NOWAIT; ask it without from now on.
            self._bulk_flags &= ~self._lv.VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT
            records = conn.getAllDomainStats(self._bulk_stats, self._bulk_flags)
        if records and self._bulk_useful is None:
            # Every group but `state` is the driver's to implement; one that implements none
            # makes the bulk call a listing that costs a handle per domain and scrape.
            self._bulk_useful = any(
                not key.startswith("state.") for _, stats in records for key in stats
            )
        return records

    def _list_domains(self, conn: virConnect) -> tuple[list[_Job], int]:
        """Jobs for the running domains by ID, reusing the handles of earlier scrapes."""
        listed: dict[int, _Listed] = {}
        jobs: list[_Job] = []
        lost = 0
        with self._lock:
            known = dict(self._listed)
        for domain_id in conn.listDomainsID():
            entry = known.get(domain_id)
            if entry is None:
                try:
                    domain = conn.lookupByID(domain_id)
                    entry = _Listed(domain, domain.UUIDString(), domain.name())
                except self._lv.libvirtError as exc:
                    if self._is_connection_error(exc):
                        raise
                    lost += 1  # stopped between the listing and the lookup
                    continue
            listed[domain_id] = entry
            jobs.append(_Job(entry.domain, {}, {}, entry.uuid, domain_id, entry.name))
        with self._lock:
            self._listed = listed
        return jobs, lost

    def _node_memory(self, conn: virConnect, info: list[Any]) -> int:
        """The host's memory in bytes: MemTotal, as the QMP backend reads it from /proc.

        `getInfo()` gives MiB summed over the NUMA cells libvirt knows, which can be far
        less than the host has, so it is only the fallback for drivers without
        `getMemoryStats()` (the test driver, for one).
        """
        if self._node_memory_stats:
            try:
                total = conn.getMemoryStats(self._lv.VIR_NODE_MEMORY_STATS_ALL_CELLS).get("total")
            except self._lv.libvirtError as exc:
                if self._is_connection_error(exc):
                    raise  # the scrape reports the connection down
                if exc.get_error_code() in (
                    self._lv.VIR_ERR_NO_SUPPORT,
                    self._lv.VIR_ERR_OPERATION_UNSUPPORTED,
                ):
                    self._node_memory_stats = False
                log.debug("libvirt: node memory from getInfo(): %s", _one_line(exc))
            else:
                if total:
                    return int(total) * _KIB
        return int(info[1]) * _MIB

    @staticmethod
    def _complete(stats: Mapping[str, Any], balloon: Mapping[str, int]) -> bool:
        """Whether bulk stats hold every field a VMSample needs."""
        return (
            "cpu.time" in stats
            and "vcpu.current" in stats
            and "balloon.maximum" in stats
            and "block.count" in stats
            and "net.count" in stats
            and not needs_memory_stats(balloon)
            and not block_stats_skipped(stats)
        )

    @staticmethod
    def _sample_from_bulk(
        domain: virDomain, uuid: str, stats: Mapping[str, Any], balloon: Mapping[str, int]
    ) -> VMSample:
        used, rss = memory_bytes(balloon, balloon.get("actual", balloon["maximum"]))
        name = domain.name()
        return VMSample(
            vm=name,
            name=name,
            uuid=uuid,
            cpu_seconds=stats["cpu.time"] / 1e9,
            vcpus=stats["vcpu.current"],
            memory_max_bytes=balloon["maximum"] * _KIB,
            memory_used_bytes=used,
            memory_rss_bytes=rss,
            disks=bulk_disks(stats),
            interfaces=bulk_interfaces(stats),
        )

    # -- per-domain completion ------------------------------------------------------------

    def _run_jobs(self, jobs: list[_Job], deadline: float, at_once: bool = False) -> _Batch:
        """Complete `jobs` with up to `concurrency` daemon threads.

        Returns the samples that finished in time, and the domains that failed, with why.
        Domains that turned out to run on another node (paused for a migration here) are
        neither samples nor errors.

        Workers pull from one shared queue, so a hung domain stalls one worker, not a share of
        the domains. The scrape starts one worker and adds another after each `_WORKER_SLICE`
        in which the process used less than half a CPU: the workers are then waiting on
        libvirtd or a hung call, and more of them help. When the calls are in-process and
        CPU-bound, extra threads would only contend for the GIL, which doubled scrape time in
        measurements against the test driver. `at_once` starts `concurrency` workers at the
        outset, for calls known to wait on libvirtd (and QEMU's monitors). Threads are started
        per scrape, so an abandoned, hung worker never takes a later scrape's slot.
        """
        queue = deque(jobs)
        batch = _Batch()

        def work() -> None:
            while queue and time.monotonic() < deadline:
                try:
                    job = queue.popleft()
                except IndexError:
                    return
                with self._lock:
                    self._busy.add(job.uuid)
                with batch.lock:
                    batch.started.add(job.uuid)
                failure: str | None = None
                try:
                    sample = self._sample_per_domain(job, deadline)
                except _RunsElsewhere:
                    failure = _ELSEWHERE
                except _DeadlineExceeded:
                    failure = _NOT_REACHED
                except _NotRunning:
                    failure = "stopped while it was read"
                except self._lv.libvirtError as exc:
                    # Vanished, stopped, or a device unplugged: its XML is read afresh next time.
                    self._note_error(exc)
                    with self._lock:
                        self._devices.pop(job.uuid, None)
                    failure = f"libvirt: {_one_line(exc)}"
                except Exception as exc:
                    log.debug("libvirt: domain %s failed", job.uuid, exc_info=True)
                    failure = _one_line(f"{type(exc).__name__}: {exc}")
                finally:
                    with self._lock:
                        self._busy.discard(job.uuid)
                with batch.lock:
                    batch.finished.add(job.uuid)
                    if batch.closed or failure is _ELSEWHERE:
                        continue
                    if failure is None:
                        batch.samples.append(sample)
                    else:
                        batch.failed[job.label()] = failure

        workers: list[threading.Thread] = []
        idle = True
        while True:
            alive = [thread for thread in workers if thread.is_alive()]
            if queue and (idle or not alive):
                wanted = len(queue) if at_once and not workers else 1
                for _ in range(min(wanted, self.concurrency - len(workers))):
                    thread = threading.Thread(target=work, name="libvirt-domain", daemon=True)
                    thread.start()
                    workers.append(thread)
                    alive.append(thread)
            remaining = deadline - time.monotonic()
            if not alive or remaining <= 0:
                break
            cpu, wall = time.process_time(), time.monotonic()
            alive[0].join(min(_WORKER_SLICE, remaining))
            idle = time.process_time() - cpu < 0.5 * (time.monotonic() - wall)
        with batch.lock:
            batch.closed = True
            for job in jobs:
                if job.uuid in batch.finished:
                    continue
                if job.uuid in batch.started:  # a call of this domain is still out
                    batch.failed[job.label()] = "a libvirt call did not answer in time"
                    batch.timeouts += 1
                else:
                    batch.failed[job.label()] = _NOT_REACHED
            return batch

    def _sample_per_domain(self, job: _Job, deadline: float) -> VMSample:
        """A VMSample from bulk fields where present and per-domain calls for the rest.

        The deadline is checked once per domain, before its first call: at 1000 domains a
        check per call cost more than some of the calls (the scrape stops waiting for its
        workers at the deadline either way).
        """
        if time.monotonic() >= deadline:
            raise _DeadlineExceeded
        domain, stats, balloon = job.domain, job.stats, job.balloon
        cpu_ns = stats.get("cpu.time")
        vcpus = stats.get("vcpu.current")
        max_kib = balloon.get("maximum")
        current_kib = balloon.get("actual")
        if cpu_ns is None or vcpus is None or max_kib is None or "state.state" not in stats:
            state, info_max, info_current, info_vcpus, info_cpu = domain.info()
            if state in _NOT_RUNNING:
                raise _NotRunning
            if (
                state == _PAUSED
                and "state.reason" not in stats
                and domain.state()[1] in _PAUSED_ELSEWHERE
            ):
                raise _RunsElsewhere
            if cpu_ns is None:
                cpu_ns = info_cpu
            if vcpus is None:
                vcpus = info_vcpus
            if max_kib is None:
                max_kib = info_max
            if current_kib is None:
                current_kib = info_current
        if needs_memory_stats(balloon):
            balloon = domain.memoryStats() | balloon
        used, rss = memory_bytes(balloon, max_kib if current_kib is None else current_kib)

        # Disks NOWAIT skipped are read here, within the deadline; if that fails or runs out,
        # the VM is skipped and counted rather than published without them.
        has_block, has_net = "block.count" in stats, "net.count" in stats
        devices = None if has_block and has_net else self._devices_of(job)
        if has_block:
            disks = bulk_disks(stats, functools.partial(_read_disk, domain))
        else:
            disks = tuple(_read_disk(domain, dev) for dev in devices.disks)  # type: ignore[union-attr]
        if has_net:
            interfaces = bulk_interfaces(stats)
        else:
            nics = []
            for dev in devices.interfaces:  # type: ignore[union-attr]
                counters = domain.interfaceStats(dev)
                nics.append(InterfaceSample(dev, counters[0], counters[4]))
            interfaces = tuple(nics)

        name = domain.name() if job.name is None else job.name
        return VMSample(
            vm=name,
            name=name,
            uuid=job.uuid,
            cpu_seconds=cpu_ns / 1e9,
            vcpus=vcpus,
            memory_max_bytes=max_kib * _KIB,
            memory_used_bytes=used,
            memory_rss_bytes=rss,
            disks=disks,
            interfaces=interfaces,
        )

    def _devices_of(self, job: _Job) -> Devices:
        """Cached disk and NIC targets, parsed again only when the domain ID changed."""
        domain_id = job.domain.ID() if job.domain_id is None else job.domain_id
        with self._lock:
            cached = self._devices.get(job.uuid)
        if cached is not None and cached.domain_id == domain_id:
            return cached
        devices = Devices.parse(domain_id, job.domain.XMLDesc(0))
        with self._lock:
            self._devices[job.uuid] = devices
        return devices
