"""The libvirt backend's per-domain reads, on a few daemon threads, until the scrape deadline.

Workers pull from one shared queue, so a hung domain stalls one worker, not a share of the
domains. A scrape starts one worker and adds another after each `WORKER_SLICE` in which the
process used less than half a CPU: the workers are then waiting on libvirtd or a hung call,
and more of them help. When the calls are in-process and CPU-bound, extra threads would only
contend for the GIL, which doubled scrape time in measurements against the test driver.
Threads are started per scrape, so an abandoned, hung worker never takes a later scrape's
slot, and a domain whose call is still out from an earlier scrape is `busy()`.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from exporter.libvirt_domain import DomainJob
from exporter.samples import VMSample

# How often a scrape checks whether its per-domain workers wait rather than compute.
WORKER_SLICE = 0.02

NOT_REACHED = "not reached before the scrape deadline"
CALL_LATE = "a libvirt call did not answer in time"

# What reading one domain gave: its sample, why it was skipped, or None for a domain that is
# neither (paused here while it runs on another node).
Outcome = VMSample | str | None


@dataclass(slots=True)
class Batch:
    """What one scrape's per-domain reads gave by its deadline."""

    samples: list[VMSample]
    failed: dict[str, str]  # domain name: why it was skipped
    timeouts: int  # domains whose call was still out at the deadline


@dataclass(slots=True)
class _Round:
    """One scrape's queue and results; late workers may not add after `closed`."""

    queue: deque[DomainJob]
    samples: list[VMSample] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    started: set[str] = field(default_factory=set)  # UUIDs
    finished: set[str] = field(default_factory=set)
    closed: bool = False


class DomainWorkers:
    """Runs `read(job, deadline)` for each job with up to `concurrency` threads at once."""

    def __init__(self, concurrency: int, read: Callable[[DomainJob, float], Outcome]) -> None:
        self.concurrency = concurrency
        self._read = read
        self._lock = threading.Lock()  # guards `_busy` and every round's sets
        self._busy: set[str] = set()  # UUIDs with a call still running, of any scrape

    def busy(self) -> frozenset[str]:
        """Domains (UUIDs) with a call still running, from this scrape or an earlier one."""
        with self._lock:
            return frozenset(self._busy)

    def run(self, jobs: list[DomainJob], deadline: float, at_once: bool = False) -> Batch:
        """Read `jobs` until `deadline`; `at_once` starts `concurrency` workers at the outset,
        for calls known to wait on libvirtd (and QEMU's monitors)."""
        round_ = _Round(deque(jobs))
        self._supervise(round_, deadline, at_once)
        with self._lock:
            round_.closed = True
            for job in jobs:
                if job.uuid in round_.finished:
                    continue
                if job.uuid in round_.started:  # a call of this domain is still out
                    round_.failed[job.label()] = CALL_LATE
                else:
                    round_.failed[job.label()] = NOT_REACHED
            late = len(round_.started - round_.finished)
            return Batch(list(round_.samples), dict(round_.failed), late)

    def _supervise(self, round_: _Round, deadline: float, at_once: bool) -> None:
        """Start workers (more while they wait rather than compute) until done or `deadline`."""
        workers: list[threading.Thread] = []
        idle = True
        while True:
            alive = [thread for thread in workers if thread.is_alive()]
            if round_.queue and (idle or not alive):
                wanted = len(round_.queue) if at_once and not workers else 1
                for _ in range(min(wanted, self.concurrency - len(workers))):
                    thread = threading.Thread(
                        target=self._work, args=(round_, deadline), name="libvirt-domain",
                        daemon=True,
                    )  # fmt: skip
                    thread.start()
                    workers.append(thread)
                    alive.append(thread)
            remaining = deadline - time.monotonic()
            if not alive or remaining <= 0:
                return
            cpu, wall = time.process_time(), time.monotonic()
            alive[0].join(min(WORKER_SLICE, remaining))
            idle = time.process_time() - cpu < 0.5 * (time.monotonic() - wall)

    def _work(self, round_: _Round, deadline: float) -> None:
        queue = round_.queue
        while queue and time.monotonic() < deadline:
            try:
                job = queue.popleft()
            except IndexError:
                return
            with self._lock:
                self._busy.add(job.uuid)
                round_.started.add(job.uuid)
            try:
                outcome = self._read(job, deadline)
            except BaseException:
                # `read` reports failures as outcomes; this one is left "still out".
                with self._lock:
                    self._busy.discard(job.uuid)
                raise
            with self._lock:
                self._busy.discard(job.uuid)
                round_.finished.add(job.uuid)
                if round_.closed or outcome is None:
                    continue
                if isinstance(outcome, str):
                    round_.failed[job.label()] = outcome
                else:
                    round_.samples.append(outcome)
