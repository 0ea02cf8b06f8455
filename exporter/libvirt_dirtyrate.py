"""The dirty-page rate of the domains where libvirt has a measurement, at little cost.

libvirt reports a domain's rate (`dirtyrate.*` stats, libvirt >= 7.2) only once someone has
started a measurement (`virsh domdirtyrate-calc`, `virDomainStartDirtyRateCalc`); asking for
it costs a QEMU monitor round trip per domain, which in the one bulk call made the lab node's
scrape as slow as the peer exporter's (bench/bench_exporter_lab_node.py). So the group has a
call of its own (`virDomainListGetStats`) for the domains that had a measurement when last
asked, every scrape, and for the others only when they are due: at first sight and then every
`probe` seconds (spread per domain), so a measurement started later shows within that time.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Callable
from types import ModuleType
from typing import Any

from exporter.libvirt_connection import Connection, Domain, one_line

log = logging.getLogger(__name__)

#: Seconds between two asks of a domain that had no measurement when last asked.
DIRTY_RATE_PROBE = 120.0
_PREFIX = "dirtyrate."
_UNSTARTED = 0  # virDomainDirtyRateStatus VIR_DOMAIN_DIRTYRATE_UNSTARTED

Record = tuple[Domain, dict[str, Any]]


class DirtyRates:
    """Adds `dirtyrate.*` to the bulk records of the domains worth asking; one per backend.

    Used inside the backend's bounded call only, one scrape at a time.
    """

    def __init__(
        self,
        libvirt: ModuleType,
        is_connection_error: Callable[[BaseException], bool],
        probe: float = DIRTY_RATE_PROBE,
    ) -> None:
        self._lv = libvirt
        self._is_connection_error = is_connection_error
        self._probe = probe
        self._group: int = getattr(libvirt, "VIR_DOMAIN_STATS_DIRTYRATE", 0)
        self._flags: int = libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT
        self._supported = bool(self._group)
        self._measured: set[str] = set()  # UUIDs
        self._due: dict[str, float] = {}  # UUID: when an unmeasured domain is asked again

    def reset(self) -> None:
        """A new connection: its daemon may support the group where the old one did not."""
        self._supported = bool(self._group)
        self._flags = self._lv.VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT
        self._measured.clear()
        self._due.clear()

    def add_to(self, conn: Connection, records: list[Record]) -> None:
        """Ask for the dirty rate of the records' domains that are worth asking; merge it in."""
        if not self._supported:
            return
        now = time.monotonic()
        uuids = {domain.UUIDString(): stats for domain, stats in records}
        for uuid in self._due.keys() - uuids.keys():
            del self._due[uuid]
        self._measured &= uuids.keys()
        wanted = [
            domain
            for domain, _ in records
            if (uuid := domain.UUIDString()) in self._measured or self._due.get(uuid, 0.0) <= now
        ]
        if not wanted:
            return
        for domain, answer in self._ask(conn, wanted):
            uuid = domain.UUIDString()
            rate = {key: value for key, value in answer.items() if key.startswith(_PREFIX)}
            stats = uuids.get(uuid)
            if stats is None:
                continue
            stats.update(rate)
            if rate.get(_PREFIX + "calc_status", _UNSTARTED) != _UNSTARTED:
                self._measured.add(uuid)
                self._due.pop(uuid, None)
            elif uuid not in self._measured or rate:
                # Unmeasured, or libvirt now says so; a measured domain whose answer NOWAIT
                # left empty (busy) stays measured and is asked again next scrape.
                self._measured.discard(uuid)
                spread = 0.75 + 0.5 * (zlib.crc32(uuid.encode()) / 2**32)
                self._due[uuid] = now + self._probe * spread

    def _ask(self, conn: Connection, domains: list[Domain]) -> list[Record]:
        """`virDomainListGetStats` for the group; [] where it fails for other than the
        connection (the group unsupported: not asked again on this connection)."""
        try:
            return conn.domainListGetStats(domains, self._group, self._flags)
        except self._lv.libvirtError as exc:
            if self._is_connection_error(exc):
                raise
            code = exc.get_error_code()
            if code == self._lv.VIR_ERR_INVALID_ARG and self._flags:
                self._flags = 0  # a libvirt older than 4.5 rejects NOWAIT
                return self._ask(conn, domains)
            if code in (
                self._lv.VIR_ERR_NO_SUPPORT,
                self._lv.VIR_ERR_OPERATION_UNSUPPORTED,
                self._lv.VIR_ERR_ARGUMENT_UNSUPPORTED,
                self._lv.VIR_ERR_INVALID_ARG,
            ):
                self._supported = False
            # Otherwise a domain stopped between the two calls, say: asked again next scrape.
            log.debug("libvirt: no dirty rates this scrape: %s", one_line(exc))
            return []
