"""Blocking reads of the host, each bounded by the scrape's deadline.

A read of `/etc/pve` blocks for as long as pmxcfs hangs (a Proxmox cluster that lost quorum),
and a read under `/proc` or sysfs can block behind a stuck process or driver. Python cannot
interrupt such a read, so each runs on a daemon thread while the scrape waits only until its
deadline. A read that overran is remembered by its key until it returns: asking for the same
key again fails at once instead of stacking another stuck thread behind it, so one hung file
costs one thread, not one per scrape. Healthy reads share a few threads; stuck ones may add
threads up to a fixed cap, after which further reads wait (and time out) rather than start more.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

_T = TypeVar("_T")
_IDLE_EXIT = 30.0  # an idle reader thread exits after this many seconds


class ReadTimeout(TimeoutError):
    """A host read did not answer by the deadline (or is still stuck from an earlier scrape)."""

    def __init__(self, source: str, key: str, earlier: bool = False) -> None:
        what = "still not answering from an earlier scrape" if earlier else "did not answer in time"
        super().__init__(f"{source} read {key} {what}")
        self.source = source
        self.key = key
        self.earlier = earlier


class HostReader:
    """Runs blocking reads on daemon threads; callers wait at most until their deadline."""

    def __init__(self, threads: int = 4, max_threads: int = 32) -> None:
        self._threads = threads
        self._max_threads = max_threads
        self._queue: queue.SimpleQueue[tuple[Future[Any], Callable[[], Any], str] | None] = (
            queue.SimpleQueue()
        )
        self._lock = threading.Lock()
        self._started = 0
        self._idle = 0
        self._overdue: set[str] = set()  # keys whose read overran a deadline and still runs
        self._running: set[str] = set()

    def stuck(self) -> frozenset[str]:
        """Keys of reads that overran their deadline and have not returned yet."""
        with self._lock:
            return frozenset(self._overdue)

    def call(self, source: str, key: str, func: Callable[[], _T], deadline: float) -> _T:
        """`func()` if it returns by `deadline` (time.monotonic); else ReadTimeout."""
        future = self._submit(source, key, func)
        try:
            return future.result(timeout=max(deadline - time.monotonic(), 0.0))
        except TimeoutError:
            self._mark_overdue(key, future)
            raise ReadTimeout(source, key) from None

    async def read(self, source: str, key: str, func: Callable[[], _T], deadline: float) -> _T:
        """`call()` for a coroutine: the event loop keeps running while the read runs."""
        future = self._submit(source, key, func)
        try:
            return await asyncio.wait_for(
                asyncio.wrap_future(future), max(deadline - time.monotonic(), 0.0)
            )
        except TimeoutError:
            self._mark_overdue(key, future)
            raise ReadTimeout(source, key) from None

    def _submit(self, source: str, key: str, func: Callable[[], _T]) -> Future[_T]:
        future: Future[_T] = Future()
        with self._lock:
            if key in self._overdue:
                raise ReadTimeout(source, key, earlier=True)
            self._running.add(key)
            healthy = self._started - len(self._overdue)
            start = (
                self._idle == 0 and healthy < self._threads and self._started < self._max_threads
            )
            if start:
                self._started += 1
            else:
                self._idle = max(self._idle - 1, 0)
        self._queue.put((future, func, key))
        if start:
            threading.Thread(target=self._work, name="host-read", daemon=True).start()
        return future

    def _mark_overdue(self, key: str, future: Future[Any]) -> None:
        with self._lock:
            if not future.done() and key in self._running:
                self._overdue.add(key)

    def _work(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=_IDLE_EXIT)
            except queue.Empty:
                with self._lock:
                    if self._idle > 0:
                        self._idle -= 1
                        self._started -= 1
                        return
                continue
            if item is None:
                return
            future, func, key = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(func())
                except BaseException as exc:
                    future.set_exception(exc)
            with self._lock:
                self._running.discard(key)
                self._overdue.discard(key)
                self._idle += 1
