"""libvirt's domain events, so a domain's cached XML is read again as soon as it changes.

libvirt delivers events only to a process that runs an event loop: `virEventRegisterDefaultImpl`
before the first connection opens, and a thread that keeps calling `virEventRunDefaultImpl`.
`start_event_loop` starts that one thread per process (a daemon thread, so it never holds up
the exporter's exit); `DomainWatch` subscribes one connection to the events that mean a
domain's live XML may differ from what was parsed (`WATCHED_EVENTS`) and hands the domain's
UUID to a callback, which runs on the event thread and must only take a lock and note it.
A scrape never waits for that thread: it reads what the callbacks noted.

Where the loop cannot start or a driver refuses the subscription, nothing breaks: the
backend relies on its periodic refresh alone (`exporter.libvirt_domain.DeviceCache`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)

# The events after which a running domain's live XML may hold other devices or sources:
# lifecycle (started, stopped, defined, undefined, migrated, ...), a device added, removed or
# whose removal failed, a CD-ROM tray opened or closed (a media change), a block job ended
# (a copy or commit pivots a disk to another source), a disk dropped by its startup policy.
WATCHED_EVENTS: tuple[str, ...] = (
    "LIFECYCLE",
    "DEVICE_ADDED",
    "DEVICE_REMOVED",
    "DEVICE_REMOVAL_FAILED",
    "TRAY_CHANGE",
    "BLOCK_JOB_2",
    "DISK_CHANGE",
)


class _EventLoop:
    """The process's one event loop thread, started on first use."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None
        self.failed = False


_LOOP = _EventLoop()


def start_event_loop(libvirt: ModuleType) -> bool:
    """Register libvirt's default event loop and run it on a daemon thread, once per process.

    Call before the connections that should receive events are opened. False when the loop
    could not be registered or has stopped; events are then not delivered.
    """
    with _LOOP.lock:
        if _LOOP.thread is None and not _LOOP.failed:
            try:
                libvirt.virEventRegisterDefaultImpl()
            except libvirt.libvirtError as exc:
                log.debug("libvirt: no event loop: %s", exc)
                _LOOP.failed = True
                return False
            _LOOP.thread = threading.Thread(
                target=_run_loop, args=(libvirt,), name="libvirt-events", daemon=True
            )
            _LOOP.thread.start()
    return event_loop_running()


def event_loop_running() -> bool:
    """Whether the process's event loop thread is running."""
    thread = _LOOP.thread
    return thread is not None and thread.is_alive()


def _run_loop(libvirt: ModuleType) -> None:
    """Dispatch libvirt's events until the process exits or the loop fails."""
    try:
        while True:
            libvirt.virEventRunDefaultImpl()
    except libvirt.libvirtError as exc:
        log.warning("libvirt: the event loop stopped: %s", exc)


class DomainWatch:
    """Subscribes connections to `WATCHED_EVENTS`, reporting each event's domain UUID.

    `attach(conn)` subscribes a newly opened connection and says whether it will report
    changes; `detach(conn)` unsubscribes it before it is closed, since a subscription holds
    a reference that would keep the connection (and its socket) open.
    """

    def __init__(self, libvirt: ModuleType, on_change: Callable[[str], None]) -> None:
        self._lv = libvirt
        self._on_change = on_change
        self._lock = threading.Lock()
        self._callbacks: dict[int, list[int]] = {}  # id(connection): its callback IDs

    def attach(self, conn: Any) -> bool:
        """Subscribe `conn`; False (and nothing subscribed) where events cannot be had."""
        if not event_loop_running():
            return False
        ids: list[int] = []
        try:
            for name in WATCHED_EVENTS:
                event = getattr(self._lv, f"VIR_DOMAIN_EVENT_ID_{name}", None)
                if event is not None:
                    ids.append(conn.domainEventRegisterAny(None, event, self._notify, None))
        except self._lv.libvirtError as exc:
            log.debug("libvirt: no domain events on this connection: %s", exc)
            self._deregister(conn, ids)
            return False
        with self._lock:
            self._callbacks[id(conn)] = ids
        return True

    def detach(self, conn: Any) -> None:
        """Unsubscribe `conn`, if it was subscribed."""
        with self._lock:
            ids = self._callbacks.pop(id(conn), [])
        self._deregister(conn, ids)

    def _deregister(self, conn: Any, ids: list[int]) -> None:
        for callback_id in ids:
            # A connection already broken has dropped its callbacks with it.
            with contextlib.suppress(self._lv.libvirtError):
                conn.domainEventDeregisterAny(callback_id)

    def _notify(self, _conn: Any, domain: Any, *_details: Any) -> None:
        """Every watched event's callback (their argument lists differ after the domain).

        Runs on the event thread; the UUID is read from the handle, without a round trip."""
        try:
            uuid = domain.UUIDString()
        except Exception:  # an exception must not escape into libvirt's event dispatch
            log.debug("libvirt: event for a domain without a UUID", exc_info=True)
            return
        self._on_change(uuid)
