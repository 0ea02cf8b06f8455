"""A fake QMP server: enough of QEMU's monitor protocol to test and benchmark the qmp backend.

Each fake VM listens on its own unix socket, greets like QEMU, insists on `qmp_capabilities`
first, answers the query commands with canned data shaped like QEMU 7/8's (Proxmox's
`query-balloon` extras included) and records every session and command, so tests can check
what the exporter sent and that it hung up. It runs in a background thread (`FakeQmpServer`)
or as its own process (`python tests/fake_qmp.py --run-dir DIR --first 100 --count 200`).
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GIB = 1024**3
BALLOON_PATH = "/machine/peripheral/balloon0"
GREETING_VERSION = (8, 1, 5)


def blockstats_entry(
    device: str,
    qdev: str,
    rd_bytes: int,
    wr_bytes: int,
    rd_operations: int,
    wr_operations: int,
    node_name: str = "#block100",
) -> dict[str, Any]:
    """One `query-blockstats` entry with every field QEMU 7.2 sends, for realistic payloads."""

    def stats(rd: int, wr: int, rd_ops: int, wr_ops: int) -> dict[str, Any]:
        return {
            "unmap_operations": 0,
            "unmap_merged": 0,
            "flush_total_time_ns": 1_200_000,
            "wr_highest_offset": wr * 3,
            "wr_total_time_ns": wr_ops * 90_000,
            "failed_wr_operations": 0,
            "failed_rd_operations": 0,
            "wr_merged": 0,
            "wr_bytes": wr,
            "timed_stats": [],
            "failed_unmap_operations": 0,
            "failed_flush_operations": 0,
            "account_invalid": True,
            "rd_total_time_ns": rd_ops * 110_000,
            "invalid_unmap_operations": 0,
            "flush_operations": wr_ops // 8,
            "wr_operations": wr_ops,
            "unmap_bytes": 0,
            "rd_merged": 0,
            "rd_bytes": rd,
            "unmap_total_time_ns": 0,
            "invalid_flush_operations": 0,
            "account_failed": True,
            "idle_time_ns": 1_009_401_988,
            "rd_operations": rd_ops,
            "invalid_wr_operations": 0,
            "invalid_rd_operations": 0,
        }

    return {
        "device": device,
        "parent": {
            "stats": stats(0, 0, 0, 0),
            "node-name": f"{node_name}-file",
            "driver-specific": {
                "discard-bytes-ok": 0,
                "discard-nb-ok": 0,
                "driver": "file",
                "discard-nb-failed": 0,
            },
        },
        "stats": stats(rd_bytes, wr_bytes, rd_operations, wr_operations),
        "node-name": node_name,
        "qdev": qdev,
    }


def default_disks(seed: int = 0) -> list[dict[str, Any]]:
    """Two disks the way Proxmox starts them: a `-drive` scsi0 and a `-blockdev` virtio0."""
    return [
        blockstats_entry("drive-scsi0", "scsi0", 10_000_000 + seed, 5_000_000 + seed, 900, 400),
        blockstats_entry(
            "",
            "/machine/peripheral/virtio0/virtio-backend",
            2_000_000 + seed,
            1_000_000 + seed,
            300,
            100,
            node_name="#block200",
        ),
    ]


def proxmox_balloon(max_mem: int = 2 * GIB, free_mem: int = GIB // 2) -> dict[str, Any]:
    """`query-balloon` as Proxmox's patched QEMU answers it, guest statistics included."""
    return {
        "actual": max_mem,
        "max_mem": max_mem,
        "total_mem": max_mem - 64 * 1024 * 1024,
        "free_mem": free_mem,
        "mem_swapped_in": 0,
        "mem_swapped_out": 0,
        "major_page_faults": 120,
        "minor_page_faults": 45_000,
        "last_update": 1_700_000_000,
    }


@dataclass
class FakeVM:
    """What one fake QEMU answers; `balloon=None` means no balloon device."""

    vmid: str
    disks: list[dict[str, Any]] = field(default_factory=default_disks)
    balloon: dict[str, Any] | None = field(default_factory=proxmox_balloon)
    guest_stats: dict[str, Any] | None = None
    cpus: int = 2
    version: tuple[int, int, int] = GREETING_VERSION
    name: str | None = None
    uuid: str = "00000000-0000-0000-0000-000000000000"
    memory_bytes: int = 2 * GIB
    status: str = "running"
    """The run state `query-status` reports (`inmigrate`, `postmigrate`, `paused`, ...)."""
    silent: bool = False
    """Accept connections and never say a word (QEMU busy with another client)."""
    hangup_on: str | None = None
    """Drop the connection when this command arrives (QEMU died mid-session)."""
    on_command: Callable[[str], None] | None = None
    """Called in the server thread with each command name before it is answered."""
    dirty_rate: dict[str, Any] | None = None
    """The `query-dirty-rate` reply; None: no measurement was ever started."""


@dataclass
class SessionLog:
    """Sessions and commands one fake VM saw."""

    connections: int = 0
    disconnections: int = 0
    commands: list[str] = field(default_factory=list)


def _error(error_class: str, desc: str) -> dict[str, Any]:
    return {"error": {"class": error_class, "desc": desc}}


def answer(vm: FakeVM, command: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """The reply QEMU would give to one command after negotiation."""
    reply = _ANSWERS.get(command)
    if reply is None:
        return _error("CommandNotFound", f"The command {command} has not been found")
    return reply(vm, arguments)


def _capabilities_again(vm: FakeVM, arguments: dict[str, Any]) -> dict[str, Any]:
    return _error("CommandNotFound", "Capabilities negotiation is already complete")


def _blockstats(vm: FakeVM, arguments: dict[str, Any]) -> dict[str, Any]:
    return {"return": vm.disks}


def _balloon(vm: FakeVM, arguments: dict[str, Any]) -> dict[str, Any]:
    if vm.balloon is None:
        return _error("DeviceNotActive", "No balloon device has been activated")
    return {"return": vm.balloon}


def _qom_get(vm: FakeVM, arguments: dict[str, Any]) -> dict[str, Any]:
    """Only the balloon's `guest-stats` property exists."""
    path = arguments.get("path")
    if path != BALLOON_PATH or vm.balloon is None:
        return _error("DeviceNotFound", f"Device '{path}' not found")
    if arguments.get("property") != "guest-stats" or vm.guest_stats is None:
        return _error("GenericError", "Property not found")
    return {"return": vm.guest_stats}


def _cpus_fast(vm: FakeVM, arguments: dict[str, Any]) -> dict[str, Any]:
    return {
        "return": [
            {
                "thread-id": 4000 + index,
                "props": {"core-id": index, "thread-id": 0, "socket-id": 0},
                "qom-path": f"/machine/unattached/device[{index}]",
                "cpu-index": index,
                "target": "x86_64",
            }
            for index in range(vm.cpus)
        ]
    }


def _version(vm: FakeVM, arguments: dict[str, Any]) -> dict[str, Any]:
    major, minor, micro = vm.version
    return {
        "return": {
            "qemu": {"major": major, "minor": minor, "micro": micro},
            "package": f"pve-qemu-kvm_{major}.{minor}.{micro}-1",
        }
    }


def _name(vm: FakeVM, arguments: dict[str, Any]) -> dict[str, Any]:
    return {"return": {"name": vm.name} if vm.name else {}}


def _uuid(vm: FakeVM, arguments: dict[str, Any]) -> dict[str, Any]:
    return {"return": {"UUID": vm.uuid}}


def _status(vm: FakeVM, arguments: dict[str, Any]) -> dict[str, Any]:
    return {"return": {"status": vm.status, "singlestep": False, "running": vm.status == "running"}}


def _memory_size(vm: FakeVM, arguments: dict[str, Any]) -> dict[str, Any]:
    return {"return": {"base-memory": vm.memory_bytes, "plugged-memory": 0}}


def _dirty_rate(vm: FakeVM, arguments: dict[str, Any]) -> dict[str, Any]:
    unstarted = {"status": "unstarted", "start-time": 0, "calc-time": 0, "sample-pages": 0}
    return {"return": vm.dirty_rate or unstarted}


_ANSWERS: dict[str, Callable[[FakeVM, dict[str, Any]], dict[str, Any]]] = {
    "qmp_capabilities": _capabilities_again,
    "query-blockstats": _blockstats,
    "query-balloon": _balloon,
    "qom-get": _qom_get,
    "query-cpus-fast": _cpus_fast,
    "query-version": _version,
    "query-name": _name,
    "query-uuid": _uuid,
    "query-status": _status,
    "query-memory-size-summary": _memory_size,
    "query-dirty-rate": _dirty_rate,
}


@dataclass
class SessionGauge:
    """Sessions open right now across all fake VMs, and the most ever open at once."""

    open: int = 0
    peak: int = 0


class FakeQmpServer:
    """Serves fake VMs on `<run_dir>/<vmid>.qmp` from an event loop in a background thread."""

    def __init__(self, run_dir: str | os.PathLike[str], vms: Iterable[FakeVM]) -> None:
        self.run_dir = Path(run_dir)
        self.vms = {vm.vmid: vm for vm in vms}
        self.logs = {vmid: SessionLog() for vmid in self.vms}
        self.gauge = SessionGauge()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None

    def socket_path(self, vmid: str) -> Path:
        return self.run_dir / f"{vmid}.qmp"

    def start(self) -> FakeQmpServer:
        self._thread = threading.Thread(target=self._run, name="fake-qmp", daemon=True)
        self._thread.start()
        if not self._ready.wait(10) or self._failure is not None:
            raise RuntimeError(f"fake QMP server did not start: {self._failure}")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stopping is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                self._loop.call_soon_threadsafe(self._stopping.set)
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        for vmid in self.vms:
            with contextlib.suppress(FileNotFoundError):
                self.socket_path(vmid).unlink()

    def __enter__(self) -> FakeQmpServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_idle(self, timeout: float = 2.0) -> bool:
        """Wait until every session the server accepted has been closed."""
        deadline = time.monotonic() + timeout
        while self.gauge.open and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.gauge.open == 0

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:
            self._failure = exc
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        servers = await serve(self.run_dir, self.vms.values(), self.logs, self.gauge)
        self._ready.set()
        try:
            await self._stopping.wait()
        finally:
            for server in servers:
                server.close()


async def serve(
    run_dir: Path,
    vms: Iterable[FakeVM],
    logs: dict[str, SessionLog],
    gauge: SessionGauge | None = None,
) -> list[asyncio.AbstractServer]:
    """Start one unix-socket server per fake VM in the running loop."""
    gauge = gauge if gauge is not None else SessionGauge()
    servers = []
    for vm in vms:

        async def handle(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter, vm: FakeVM = vm
        ) -> None:
            gauge.open += 1
            gauge.peak = max(gauge.peak, gauge.open)
            try:
                await _session(vm, logs[vm.vmid], reader, writer)
            finally:
                gauge.open -= 1

        servers.append(await asyncio.start_unix_server(handle, path=run_dir / f"{vm.vmid}.qmp"))
    return servers


async def _session(
    vm: FakeVM, log: SessionLog, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    log.connections += 1
    try:
        if vm.silent:
            await reader.read()  # until the client gives up
            return
        major, minor, micro = vm.version
        greeting = {
            "QMP": {
                "version": {
                    "qemu": {"micro": micro, "minor": minor, "major": major},
                    "package": f"pve-qemu-kvm_{major}.{minor}.{micro}-1",
                },
                "capabilities": ["oob"],
            }
        }
        await _send(writer, greeting)
        negotiated = False
        async for message in _messages(reader):
            try:
                command = str(message["execute"])
            except (KeyError, TypeError):
                await _send(writer, _error("GenericError", "QMP input lacks member 'execute'"))
                continue
            log.commands.append(command)
            if vm.on_command is not None:
                vm.on_command(command)
            if command == vm.hangup_on:
                return
            if not negotiated:
                if command == "qmp_capabilities":
                    negotiated = True
                    reply: dict[str, Any] = {"return": {}}
                else:
                    reply = _error(
                        "CommandNotFound",
                        "Expecting capabilities negotiation with 'qmp_capabilities'",
                    )
            else:
                reply = answer(vm, command, message.get("arguments") or {})
            if "id" in message:
                reply["id"] = message["id"]
            await _send(writer, reply)
    except ConnectionError:
        pass
    finally:
        log.disconnections += 1
        writer.close()


async def _messages(reader: asyncio.StreamReader) -> AsyncIterator[Any]:
    """JSON values as they arrive: like QEMU's parser, no newline needed between them."""
    decoder = json.JSONDecoder()
    text = codecs.getincrementaldecoder("utf-8")(errors="replace")
    buffer = ""
    while chunk := await reader.read(65536):
        buffer += text.decode(chunk)
        while True:
            buffer = buffer.lstrip()
            if not buffer:
                break
            try:
                message, end = decoder.raw_decode(buffer)
            except ValueError:
                break  # incomplete: wait for more bytes
            buffer = buffer[end:]
            yield message


async def _send(writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
    writer.write(json.dumps(message).encode() + b"\r\n")
    await writer.drain()


def make_refusing_socket(path: str | os.PathLike[str]) -> Path:
    """A socket file nobody listens on: what a QEMU killed with SIGKILL leaves behind."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(os.fspath(path))
    sock.close()
    return Path(path)


def main(argv: list[str] | None = None) -> int:
    """Serve `--count` standard fake VMs from its own process until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--first", type=int, default=100, help="first VMID")
    parser.add_argument("--count", type=int, required=True, help="number of fake VMs")
    args = parser.parse_args(argv)
    vms = [
        FakeVM(vmid=str(vmid), disks=default_disks(seed=vmid))
        for vmid in range(args.first, args.first + args.count)
    ]

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        servers = await serve(args.run_dir, vms, {vm.vmid: SessionLog() for vm in vms})
        print("ready", flush=True)
        await stop.wait()
        for server in servers:
            server.close()
        for vm in vms:
            with contextlib.suppress(FileNotFoundError):
                (args.run_dir / f"{vm.vmid}.qmp").unlink()

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
