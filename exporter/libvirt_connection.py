"""The libvirt backend's one connection: opened on demand, reopened when lost, calls bounded.

libvirt-python is imported on first use, never at module import, so the exporter runs on
hosts without it (Proxmox) as long as the libvirt backend is not chosen. `Connection` and
`Domain` name the calls the backend makes, so the type checker sees every use of libvirt even
though libvirt-python ships no type information.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import threading
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any, Protocol, TypeVar

from exporter.libvirt_events import DomainWatch
from exporter.samples import BackendError

_T = TypeVar("_T")


class Domain(Protocol):
    """The calls made on a `virDomain`; name, UUID and ID are read without a round trip."""

    def name(self) -> str: ...
    def UUIDString(self) -> str: ...
    def ID(self) -> int: ...
    def info(self) -> list[int]: ...
    def state(self) -> list[int]: ...
    def memoryStats(self) -> dict[str, int]: ...
    def blockStats(self, path: str) -> tuple[int, int, int, int, int]: ...
    def blockInfo(self, path: str, flags: int = 0) -> list[int]: ...
    def interfaceStats(self, path: str) -> tuple[int, int, int, int, int, int, int, int]: ...
    def XMLDesc(self, flags: int = 0) -> str: ...


class Connection(Protocol):
    """The calls made on a `virConnect`."""

    def isAlive(self) -> int: ...
    def close(self) -> int: ...
    def getVersion(self) -> int: ...
    def getLibVersion(self) -> int: ...
    def getInfo(self) -> list[Any]: ...
    def getMemoryStats(self, cellNum: int, flags: int = 0) -> dict[str, int]: ...
    def getAllDomainStats(self, stats: int, flags: int) -> list[tuple[Domain, dict[str, Any]]]: ...
    def domainListGetStats(
        self, doms: list[Domain], stats: int, flags: int = 0
    ) -> list[tuple[Domain, dict[str, Any]]]: ...
    def listDomainsID(self) -> list[int]: ...
    def lookupByID(self, id: int) -> Domain: ...


def _ignore_libvirt_error(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr unless a handler takes it; the caller reports it."""


@functools.cache
def load_libvirt() -> ModuleType:
    """Import libvirt-python once; raise BackendError where it is not installed."""
    try:
        libvirt = importlib.import_module("libvirt")
    except ImportError as exc:
        raise BackendError(
            "libvirt-python is not installed; pip install 'vmbalance[libvirt]'"
        ) from exc
    libvirt.registerErrorHandler(_ignore_libvirt_error, None)
    return libvirt


def one_line(text: object) -> str:
    return " ".join(str(text).split())


def format_version(number: int) -> str:
    """libvirt encodes versions as major * 1,000,000 + minor * 1,000 + release."""
    return f"{number // 1_000_000}.{number // 1_000 % 1_000}.{number % 1_000}"


class LibvirtConnection:
    """One persistent connection to `uri`, shared by every scrape and its worker threads.

    A call that failed because of the connection (not of one domain) marks it dead; the next
    `get()` closes it and opens a new one, then calls `on_open` so that what the backend learnt
    about the old one (device lists, kept handles, what the driver supports) starts afresh.
    With a `watch`, each connection is subscribed to domain events as it opens (before
    `on_open`, so no change falls between the two) and unsubscribed before it is closed.
    """

    def __init__(
        self,
        libvirt: ModuleType,
        uri: str,
        opener: Callable[[str], Connection],
        on_open: Callable[[], None],
        watch: DomainWatch | None = None,
    ) -> None:
        self.uri = uri
        self._watch = watch
        self._events = False
        self._lv = libvirt
        self._opener = opener
        self._on_open = on_open
        self._lock = threading.Lock()
        self._conn: Connection | None = None
        self._dead = False
        self._version = ""
        self._connection_errors = frozenset(
            {
                libvirt.VIR_ERR_SYSTEM_ERROR,
                libvirt.VIR_ERR_INVALID_CONN,
                libvirt.VIR_ERR_NO_CONNECT,
                libvirt.VIR_ERR_RPC,
            }
        )
        self._connection_error_domains = frozenset({libvirt.VIR_FROM_RPC, libvirt.VIR_FROM_REMOTE})

    @property
    def version(self) -> str:
        """The hypervisor's version as read when the current connection opened."""
        with self._lock:
            return self._version

    @property
    def events(self) -> bool:
        """Whether the current connection reports domain changes as events."""
        with self._lock:
            return self._conn is not None and self._events

    def get(self) -> Connection:
        """The open connection, (re)opened when missing or found dead."""
        with self._lock:
            conn, dead = self._conn, self._dead
        if conn is not None and (dead or not self._alive(conn)):
            self._drop(conn)
            conn = None
        if conn is None:
            try:
                conn = self._opener(self.uri)
            except self._lv.libvirtError as exc:
                raise BackendError(
                    f"libvirt: cannot connect to {self.uri!r}: {one_line(exc)}"
                ) from exc
            version = self._read_version(conn)
            events = self._watch is not None and self._watch.attach(conn)
            with self._lock:
                self._conn, self._dead, self._version = conn, False, version
                self._events = events
            self._on_open()
        return conn

    def is_connection_error(self, exc: BaseException | None) -> bool:
        """Whether a call failed because of the connection, not of one domain or driver."""
        return isinstance(exc, self._lv.libvirtError) and (
            exc.get_error_code() in self._connection_errors
            or exc.get_error_domain() in self._connection_error_domains
        )

    def note_error(self, exc: Exception) -> None:
        """Mark the connection dead when a call failed because of it, not of one domain."""
        if self.is_connection_error(exc):
            with self._lock:
                self._dead = True

    def close(self) -> None:
        """Close the connection; a later `get()` would open a new one."""
        with self._lock:
            conn = self._conn
        if conn is not None:
            self._drop(conn)

    def _alive(self, conn: Connection) -> bool:
        try:
            return bool(conn.isAlive())
        except self._lv.libvirtError:
            return False

    def _read_version(self, conn: Connection) -> str:
        """Hypervisor version, else the library's; neither changes while connected."""
        for getter in (conn.getVersion, conn.getLibVersion):
            try:
                number = getter()
            except self._lv.libvirtError:
                continue
            if number:
                return format_version(number)
        return "unknown"

    def _drop(self, conn: Connection) -> None:
        with self._lock:
            if self._conn is conn:
                self._conn, self._dead, self._events = None, False, False
        if self._watch is not None:
            self._watch.detach(conn)
        # Already closed or broken: nothing is left to release.
        with contextlib.suppress(self._lv.libvirtError):
            conn.close()


class BoundedCall:
    """Runs one call at a time on a daemon thread and waits for it only until a deadline.

    A call that overran is abandoned but remembered: until it returns, `busy()` is true, so a
    hung libvirtd costs one thread, not one per scrape.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._pending: threading.Thread | None = None

    def busy(self) -> bool:
        """Whether a call abandoned at an earlier deadline is still running."""
        if self._pending is not None and self._pending.is_alive():
            return True
        self._pending = None
        return False

    def __call__(self, deadline: float, func: Callable[[], _T]) -> _T:
        """`func()`, or TimeoutError once `deadline` (time.monotonic) passes without an answer."""
        box: list[tuple[bool, Any]] = []

        def run() -> None:
            try:
                box.append((True, func()))
            except BaseException as exc:
                box.append((False, exc))

        thread = threading.Thread(target=run, name=self._name, daemon=True)
        thread.start()
        thread.join(max(deadline - time.monotonic(), 0.0))
        if not box:
            self._pending = thread
            raise TimeoutError
        ok, value = box[0]
        if not ok:
            raise value
        result: _T = value
        return result
