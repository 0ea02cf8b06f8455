"""One short QMP session per VM and scrape: connect, negotiate, one pipelined batch, hang up.

Proxmox's QEMU serves one QMP client at a time and pvestatd polls it too, so nothing is kept
open between scrapes and the exporter never starves `qm` or pvestatd.

Only commands in `ALLOWED_COMMANDS` ever reach a VM: `execute` is the one path every command
(negotiation included) goes through, and it refuses anything else before a byte is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import Final

from qemu.qmp import ExecuteError, Message, QMPClient, Runstate

from exporter.pve_conf import VMConfig
from exporter.qmp_replies import Session, guest_memory_used

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
        "query-dirty-rate",
        "qom-get",
    }
)

#: Where Proxmox puts its balloon device (`-device virtio-balloon-pci,id=balloon0`); its
#: `guest-stats` property holds the guest's own memory figures on an unpatched QEMU.
BALLOON_QOM_PATH: Final = "/machine/peripheral/balloon0"

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


def queries_for(conf: VMConfig) -> dict[str, Mapping[str, object] | None]:
    """The queries of one session: what the `.conf` already says is not asked again."""
    queries: dict[str, Mapping[str, object] | None] = {
        "query-status": None,
        "query-blockstats": None,
        "query-balloon": None,
        "query-cpus-fast": None,
        "query-version": None,
        # The result of the last dirty-rate measurement, if anyone started one; asking
        # starts nothing (`calc-dirty-rate` would, and is not allowed).
        "query-dirty-rate": None,
    }
    if conf.name is None:
        queries["query-name"] = None
    if conf.uuid is None:
        queries["query-uuid"] = None
    if conf.memory_bytes is None:
        queries["query-memory-size-summary"] = None
    return queries


async def read_session(vmid: str, socket: str, conf: VMConfig) -> Session:
    """One session on `socket`; a lost connection raises, the socket is closed either way."""
    client = _Client(f"vm{vmid}")
    client.negotiate = False  # negotiated below, through execute(), like every command
    try:
        await client.connect(socket)
        await execute(client, "qmp_capabilities")
        replies = await _batch(client, queries_for(conf))
        elsewhere = _runs_elsewhere(replies["query-status"])
        session = Session(replies, elsewhere)
        balloon = session.mapping("query-balloon")
        if elsewhere or balloon is None or guest_memory_used(balloon, None) is not None:
            return session
        guest_stats: object = None
        with contextlib.suppress(ExecuteError):
            guest_stats = await execute(
                client, "qom-get", {"path": BALLOON_QOM_PATH, "property": "guest-stats"}
            )
        return Session(replies, elsewhere, guest_stats)
    finally:
        await _hang_up(client)


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
