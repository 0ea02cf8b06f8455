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

The parts: `libvirt_connection` (the connection and its bounded calls), `libvirt_domain` (one
domain as a sample, its XML cached), `libvirt_events` (domain events that void a cached XML),
`libvirt_dirtyrate` (the dirty-rate group, asked only of the domains that have a measurement),
`libvirt_workers` (the per-domain threads), `libvirt_stats` (libvirt's stat records as
samples). This module decides what to read and puts the scrape together.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from exporter.libvirt_connection import (
    BoundedCall,
    Connection,
    Domain,
    LibvirtConnection,
    load_libvirt,
    one_line,
)
from exporter.libvirt_dirtyrate import DIRTY_RATE_PROBE, DirtyRates
from exporter.libvirt_domain import (
    NOT_RUNNING,
    PAUSED,
    PAUSED_ELSEWHERE,
    XML_REFRESH,
    DeadlineExceeded,
    DeviceCache,
    DomainJob,
    NotRunning,
    RunsElsewhere,
    sample_per_domain,
)
from exporter.libvirt_events import DomainWatch, start_event_loop
from exporter.libvirt_stats import SharedStorage, bulk_balloon
from exporter.libvirt_workers import NOT_REACHED, DomainWorkers, Outcome
from exporter.samples import BackendError, NodeSample, ScrapeResult, VMSample

log = logging.getLogger(__name__)

_KIB = 1024
_MIB = 1024 * 1024

# The stat groups the one bulk call asks for: those that cost next to nothing on QEMU. `VCPU`
# asks each domain's monitor for its vCPUs and reads every vCPU thread, `BLOCK` asks the
# monitor for the block graph besides the counters, and `CPU_TOTAL` cost more than
# `virDomainGetInfo` on the lab's node (bench/bench_exporter_lab_node.py), where the three
# were most of the scrape. CPU time and vCPUs come from `virDomainGetInfo` and each disk's
# counters from `virDomainBlockStats` instead, per domain on a few threads at once.
# `DIRTYRATE`, a monitor round trip per domain, has a call of its own (`DirtyRates`).
BULK_STATS: tuple[str, ...] = ("STATE", "BALLOON", "INTERFACE")
PER_DOMAIN_STATS: tuple[str, ...] = ("info", "blockStats")

_NODE_FACTS_TTL = 60.0
_STOPPED = "stopped while it was read"
_STILL_BUSY = "a libvirt call of an earlier scrape has not returned"

Record = tuple[Domain, dict[str, Any]]


@dataclass(frozen=True, slots=True)
class _Found:
    """What the listing part of a scrape found: exactly one of `records` and `listed` is used
    on a given connection; `lost` counts listed domains that stopped before their lookup."""

    node: NodeSample
    records: list[Record]
    listed: list[DomainJob]
    lost: int


@dataclass(slots=True)
class _Sorted:
    """The domains of one scrape: complete samples, domains to read per domain, skipped ones."""

    vms: list[VMSample]
    jobs: list[DomainJob]
    skipped: dict[str, str]  # domain name: why
    seen: set[str]  # UUIDs of every running domain


class LibvirtBackend:
    """Reads the active domains of one libvirt URI over one persistent read-only connection.

    The constructor opens the connection, so a bad URI fails at startup with a one-line
    BackendError; once running, a lost connection is reported as `up=False` and reopened by
    the next scrape. Every libvirt call that can block runs in a daemon thread that the
    scrape waits for only until its deadline, so a hung libvirtd or QEMU monitor costs a scrape
    its late VMs, never the exporter its thread. The listing state below (`_listed`,
    `_bulk_useful`, ...) is touched only inside that one bounded call, one at a time.
    """

    name = "libvirt"
    read_sources: tuple[str, ...] = ("libvirt",)

    def __init__(
        self,
        uri: str = "qemu:///system",
        concurrency: int = 8,
        *,
        opener: Callable[[str], Connection] | None = None,
        connect_timeout: float = 5.0,
        shared: SharedStorage | None = None,
        xml_refresh: float = XML_REFRESH,
        dirty_rate_probe: float = DIRTY_RATE_PROBE,
    ) -> None:
        """Try `uri` now; BackendError (one line) when libvirt-python is missing or the URI
        cannot work (malformed, a driver file that does not parse). `shared` lists the file
        paths and pools whose disks every node reaches; `xml_refresh` how long a domain's parsed
        XML is trusted without a change signal (`DeviceCache`); `dirty_rate_probe` how often a
        domain without a dirty-rate measurement is asked whether it has one (`DirtyRates`).

        A daemon that is not running or does not answer yet is not an error: the exporter
        serves `vmbalance_up 0` and each scrape connects again until it answers.
        `opener(uri)` opens the connection: by default libvirt's `openReadOnly`, since an
        exporter never changes a domain; a caller needing credentials passes its own.
        """
        if concurrency < 1:
            raise BackendError(f"libvirt: concurrency must be at least 1, not {concurrency}")
        self._lv = lv = load_libvirt()
        self.uri = uri
        self._devices = DeviceCache(shared, xml_refresh)
        # Before the first connection opens: libvirt delivers events only to connections
        # opened once the process has an event loop.
        start_event_loop(lv)
        self._conn = LibvirtConnection(
            lv,
            uri,
            opener or lv.openReadOnly,
            on_open=self._forget_connection,
            watch=DomainWatch(lv, self._devices.changed),
        )
        self._dirty = DirtyRates(lv, self._conn.is_connection_error, dirty_rate_probe)
        self._bounded = BoundedCall("libvirt-bulk")
        self._workers = DomainWorkers(concurrency, self._read_domain)
        self._bulk_flags = (
            lv.VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE
            | lv.VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT
        )
        self._bulk_stats = 0
        for group in BULK_STATS:
            self._bulk_stats |= getattr(lv, f"VIR_DOMAIN_STATS_{group}")
        # Whether the bulk call is worth making on this connection: None until the first
        # scrape tells, False when it carries only `state.*` or is not supported at all.
        self._bulk_useful: bool | None = None
        # The job of each running domain by domain ID while the backend lists IDs, made once
        # per domain run: an ID names one run of one domain (libvirt hands out a new one at
        # every start and does not reuse them while the daemon runs; a reconnect clears the
        # table), and the name cannot change while the domain runs.
        self._listed: dict[int, DomainJob] = {}
        # Whether the driver answers getMemoryStats(); found out again on each new connection.
        self._node_memory_stats = True
        # (connection, when, cpus, memory bytes) of the last node facts read
        self._node_cache: tuple[Connection, float, int, int] | None = None
        self._try_first_connection(connect_timeout)

    @property
    def concurrency(self) -> int:
        return self._workers.concurrency

    @property
    def events(self) -> bool:
        """Whether the open connection reports domain changes as they happen (else the
        domains' XML is trusted until its periodic refresh)."""
        return self._conn.events

    def close(self) -> None:
        """Close the connection; a later scrape would open a new one."""
        self._conn.close()

    def scrape(self, timeout: float) -> ScrapeResult:
        """Read every active domain; VMs not read by `timeout` seconds count in `vm_errors`."""
        deadline = time.monotonic() + max(timeout, 0.0)
        if self._bounded.busy():
            return ScrapeResult(
                up=False,
                error=f"libvirt: a call of an earlier scrape to {self.uri!r} has not returned",
                read_timeouts={"libvirt": 1},
            )
        try:
            found = self._bounded(deadline, self._find_domains)
        except TimeoutError:
            return ScrapeResult(
                up=False,
                error=f"libvirt: no answer from {self.uri!r} within the scrape timeout",
                read_timeouts={"libvirt": 1},
            )
        except BackendError as exc:
            return ScrapeResult(up=False, error=str(exc))
        except self._lv.libvirtError as exc:
            self._conn.note_error(exc)
            return ScrapeResult(up=False, error=f"libvirt: {one_line(exc)}")

        domains = self._sort(found)
        timeouts = 0
        if domains.jobs:
            # Jobs from the bulk call wait on libvirtd's RPC (and QEMU's monitors): read them
            # in parallel at once. Listed ones may be in-process calls (the test driver):
            # parallel only once the workers turn out to wait.
            batch = self._workers.run(domains.jobs, deadline, at_once=self._bulk_useful is True)
            domains.vms.extend(batch.samples)
            domains.skipped.update(batch.failed)
            timeouts = batch.timeouts
        self._devices.keep_only(domains.seen)
        domains.vms.sort(key=lambda vm: vm.vm)
        return ScrapeResult(
            up=True,
            node=found.node,
            vms=domains.vms,
            vm_errors=found.lost + len(domains.skipped),
            skipped=domains.skipped,
            read_timeouts={"libvirt": timeouts} if timeouts else {},
        )

    # -- connection -----------------------------------------------------------------------

    def _try_first_connection(self, timeout: float) -> None:
        """Connect once at start, bounded; only an error of the URI itself is fatal."""
        try:
            self._bounded(time.monotonic() + timeout, self._conn.get)
        except TimeoutError:
            log.debug("libvirt: %r did not answer within %gs at start", self.uri, timeout)
        except BackendError as exc:
            if not self._conn.is_connection_error(exc.__cause__):
                raise
            log.debug("libvirt: %s (at start)", exc)

    def _forget_connection(self) -> None:
        """A new connection: what the old one taught about domains and the driver is void."""
        self._devices.clear()
        self._dirty.reset()
        self._listed = {}
        self._bulk_useful = None
        self._node_memory_stats = True

    # -- finding the domains (inside the bounded call) --------------------------------------

    def _find_domains(self) -> _Found:
        """The node, then either bulk records or listed domains to read one by one."""
        conn = self._conn.get()
        try:
            cpus, memory = self._node_facts(conn)
            records: list[Record] = []
            listed: list[DomainJob] = []
            lost = 0
            if self._bulk_useful is not False:
                records = self._bulk_records(conn)
            if records and self._bulk_useful:
                self._dirty.add_to(conn, records)
            # Listing from this scrape on only when the bulk call is not supported at all; a
            # state-only one has listed the domains already.
            if self._bulk_useful is False and not records:
                listed, lost = self._list_domains(conn)
        except self._lv.libvirtError as exc:
            self._conn.note_error(exc)
            raise
        node = NodeSample(cpus=cpus, memory_bytes=memory, version=self._conn.version)
        return _Found(node, records, listed, lost)

    def _node_facts(self, conn: Connection) -> tuple[int, int]:
        """The host's CPUs and memory, asked again once a minute (and on a new connection):
        two round trips a scrape for figures that change only with hardware."""
        now = time.monotonic()
        cached = self._node_cache
        if cached is not None and cached[0] is conn and now - cached[1] < _NODE_FACTS_TTL:
            return cached[2], cached[3]
        info = conn.getInfo()
        memory = self._node_memory(conn, info)
        self._node_cache = (conn, now, int(info[2]), memory)
        return int(info[2]), memory

    def _node_memory(self, conn: Connection, info: list[Any]) -> int:
        """The host's memory in bytes: MemTotal, as the QMP backend reads it from /proc.

        `getInfo()` gives MiB summed over the NUMA cells libvirt knows, which can be far
        less than the host has, so it is only the fallback for drivers without
        `getMemoryStats()` (the test driver, for one).
        """
        if self._node_memory_stats:
            try:
                total = conn.getMemoryStats(self._lv.VIR_NODE_MEMORY_STATS_ALL_CELLS).get("total")
            except self._lv.libvirtError as exc:
                if self._conn.is_connection_error(exc):
                    raise  # the scrape reports the connection down
                if exc.get_error_code() in (
                    self._lv.VIR_ERR_NO_SUPPORT,
                    self._lv.VIR_ERR_OPERATION_UNSUPPORTED,
                ):
                    self._node_memory_stats = False
                log.debug("libvirt: node memory from getInfo(): %s", one_line(exc))
            else:
                if total:
                    return int(total) * _KIB
        return int(info[1]) * _MIB

    def _bulk_records(self, conn: Connection) -> list[Record]:
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

    def _list_domains(self, conn: Connection) -> tuple[list[DomainJob], int]:
        """Jobs for the running domains by ID, those of earlier scrapes kept as they were."""
        listed: dict[int, DomainJob] = {}
        jobs: list[DomainJob] = []
        lost = 0
        known = self._listed
        for domain_id in conn.listDomainsID():
            job = known.get(domain_id)
            if job is None:
                try:
                    domain = conn.lookupByID(domain_id)
                    job = DomainJob(domain, {}, {}, domain.UUIDString(), domain_id, domain.name())
                except self._lv.libvirtError as exc:
                    if self._conn.is_connection_error(exc):
                        raise
                    lost += 1  # stopped between the listing and the lookup
                    continue
            listed[domain_id] = job
            jobs.append(job)
        self._listed = listed
        return jobs, lost

    # -- reading the domains ----------------------------------------------------------------

    def _sort(self, found: _Found) -> _Sorted:
        """Samples for bulk records that hold everything; jobs for the rest."""
        domains = _Sorted([], [], {}, set())
        busy = self._workers.busy()
        for domain, stats in found.records:
            uuid = domain.UUIDString()
            domains.seen.add(uuid)
            state = stats.get("state.state")
            if state in NOT_RUNNING:
                domains.skipped[domain.name()] = _STOPPED
            elif state == PAUSED and stats.get("state.reason") in PAUSED_ELSEWHERE:
                continue  # runs on the other node, which reports it
            elif uuid in busy:  # still hung from an earlier scrape: do not pile on
                domains.skipped[domain.name()] = _STILL_BUSY
            else:  # even a complete record needs the domain's XML (DeviceCache)
                domains.jobs.append(DomainJob(domain, stats, bulk_balloon(stats), uuid))
        for job in found.listed:
            domains.seen.add(job.uuid)
            if job.uuid in busy:
                domains.skipped[job.label()] = _STILL_BUSY
            else:
                domains.jobs.append(job)
        return domains

    def _read_domain(self, job: DomainJob, deadline: float) -> Outcome:
        """One domain's sample, or why it was skipped: what a worker thread runs."""
        try:
            return sample_per_domain(job, deadline, self._devices.of)
        except RunsElsewhere:
            return None
        except DeadlineExceeded:
            return NOT_REACHED
        except NotRunning:
            return _STOPPED
        except self._lv.libvirtError as exc:
            # Vanished, stopped, or a device unplugged: its XML is read afresh next time.
            self._conn.note_error(exc)
            self._devices.forget(job.uuid)
            return f"libvirt: {one_line(exc)}"
        except Exception as exc:
            log.debug("libvirt: domain %s failed", job.uuid, exc_info=True)
            return one_line(f"{type(exc).__name__}: {exc}")
