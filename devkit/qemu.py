"""Real QEMU guests for tests, laid out the way Proxmox VE runs them.

`start_vm` starts `qemu-system-x86_64` (TCG, no firmware display, no default devices) with
its QMP socket and pid file at `<run_dir>/<vmid>.qmp` / `.pid`, as a `devkit.service.Service`
(its own process group), so `QemuVM.stop` (and, as a last resort, interpreter exit) kills
QEMU and anything it spawned.
`qmp_command` is a deliberately independent, minimal QMP client so tests can compare the
exporter's figures with what QEMU itself answers. `QemuLab` holds several VMs and always
stops them.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devkit.service import Service

QEMU_BINARY = "qemu-system-x86_64"


def qemu_available() -> bool:
    return shutil.which(QEMU_BINARY) is not None


def write_boot_image(path: str | os.PathLike[str], size: int = 1024 * 1024) -> Path:
    """A raw disk whose boot sector halts the CPU: SeaBIOS reads it, so rd_bytes > 0."""
    image = bytearray(size)
    image[0:4] = bytes([0xFA, 0xF4, 0xEB, 0xFD])  # cli; hlt; jmp back to hlt
    image[510:512] = b"\x55\xaa"
    Path(path).write_bytes(image)
    return Path(path)


def write_blank_image(path: str | os.PathLike[str], size: int = 1024 * 1024) -> Path:
    Path(path).write_bytes(bytes(size))
    return Path(path)


@dataclass(frozen=True, slots=True)
class Disk:
    """A raw disk attached as Proxmox does it.

    `legacy_drive=True` gives `-drive id=drive-<id>` (blockstats `device: drive-scsi0`);
    False gives `-blockdev` (empty `device`, only the qdev names it), like newer Proxmox.
    `id` starting with `scsi` goes on a virtio-scsi controller, anything else is virtio-blk.
    """

    id: str
    image: Path
    legacy_drive: bool = True
    bootindex: int | None = None


def qemu_command(
    run_dir: Path,
    vmid: str,
    disks: Sequence[Disk] = (),
    *,
    balloon: bool = False,
    memory_mib: int = 64,
    paused: bool = False,
    extra_args: Sequence[str] = (),
) -> list[str]:
    args = [
        QEMU_BINARY,
        "-M",
        "pc",
        "-accel",
        "tcg",
        "-nodefaults",
        "-display",
        "none",
        "-m",
        str(memory_mib),
        "-name",
        f"vm{vmid}",
        "-qmp",
        f"unix:{run_dir / f'{vmid}.qmp'},server=on,wait=off",
        "-pidfile",
        str(run_dir / f"{vmid}.pid"),
    ]
    if paused:
        args.append("-S")
    if any(disk.id.startswith("scsi") for disk in disks):
        args += ["-device", "virtio-scsi-pci,id=scsihw0"]
    for index, disk in enumerate(disks):
        if disk.legacy_drive:
            backend = f"drive-{disk.id}"
            args += ["-drive", f"file={disk.image},format=raw,if=none,id={backend}"]
        else:
            backend = f"disk{index}"
            args += [
                "-blockdev",
                f"driver=raw,node-name={backend},file.driver=file,file.filename={disk.image}",
            ]
        model = "scsi-hd" if disk.id.startswith("scsi") else "virtio-blk-pci"
        device = f"{model},drive={backend},id={disk.id}"
        if disk.bootindex is not None:
            device += f",bootindex={disk.bootindex}"
        args += ["-device", device]
    if balloon:
        args += ["-device", "virtio-balloon-pci,id=balloon0"]
    return args + list(extra_args)


@dataclass
class QemuVM:
    """A running QEMU; `stop()` kills its whole process group (a guest has nothing to save)."""

    vmid: str
    service: Service
    qmp_path: Path
    pid_path: Path
    log_path: Path

    @property
    def process(self) -> subprocess.Popen[bytes]:
        assert self.service.process is not None
        return self.service.process

    @property
    def pid(self) -> int:
        return self.service.pid

    def qmp(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        return qmp_command(self.qmp_path, command, arguments)

    def stop(self) -> None:
        self.service.stop(grace=0)


def start_vm(
    run_dir: str | os.PathLike[str],
    vmid: str,
    disks: Sequence[Disk] = (),
    *,
    balloon: bool = False,
    memory_mib: int = 64,
    paused: bool = False,
    extra_args: Sequence[str] = (),
    timeout: float = 10.0,
) -> QemuVM:
    """Start QEMU and wait until its QMP socket accepts and its pid file is written."""
    run = Path(run_dir)
    log_path = run / f"{vmid}.log"
    args = qemu_command(
        run,
        vmid,
        disks,
        balloon=balloon,
        memory_mib=memory_mib,
        paused=paused,
        extra_args=extra_args,
    )
    log_path.unlink(missing_ok=True)
    service = Service(f"QEMU {vmid}", args, log_path).start()
    vm = QemuVM(
        vmid=vmid,
        service=service,
        qmp_path=run / f"{vmid}.qmp",
        pid_path=run / f"{vmid}.pid",
        log_path=log_path,
    )
    try:
        wait_for_socket(vm.qmp_path, vm.process, timeout)
        deadline = time.monotonic() + timeout
        while not vm.pid_path.exists() or not vm.pid_path.read_text().strip():
            if time.monotonic() > deadline:
                raise RuntimeError(f"QEMU {vmid} wrote no pid file")
            time.sleep(0.02)
    except BaseException:
        vm.stop()
        raise
    return vm


def wait_for_socket(
    path: Path, process: subprocess.Popen[bytes] | None = None, timeout: float = 10.0
) -> None:
    """Wait until a unix socket accepts connections; fail early if its process exited."""
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{path.name}: QEMU exited with {process.returncode}")
        if path.exists():
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                try:
                    probe.connect(os.fspath(path))
                    return
                except OSError:
                    pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not accept connections within {timeout}s")
        time.sleep(0.02)


class QmpCommandError(Exception):
    """QEMU answered a command with an error."""


def qmp_command(
    path: str | os.PathLike[str],
    command: str,
    arguments: dict[str, Any] | None = None,
    timeout: float = 5.0,
) -> Any:
    """One command over a fresh QMP session (QEMU serves one client at a time)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(os.fspath(path))
        stream = sock.makefile("rwb")

        def call(message: dict[str, Any]) -> Any:
            stream.write(json.dumps(message).encode() + b"\n")
            stream.flush()
            while True:
                reply = json.loads(stream.readline())
                if "event" in reply:
                    continue
                if "error" in reply:
                    raise QmpCommandError(f"{reply['error']['class']}: {reply['error']['desc']}")
                return reply["return"]

        greeting = json.loads(stream.readline())
        if "QMP" not in greeting:
            raise QmpCommandError(f"unexpected greeting {greeting!r}")
        call({"execute": "qmp_capabilities"})
        message: dict[str, Any] = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        return call(message)


def read_proc_usage(pid: int) -> tuple[float, int]:
    """(utime+stime seconds, VmRSS bytes) read straight from /proc, for comparisons."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    status = Path(f"/proc/{pid}/status").read_text()
    rss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    return cpu, rss * 1024


@dataclass
class QemuLab:
    """Several VMs in one Proxmox-like run directory; leaving the block stops them all."""

    run_dir: Path
    vms: dict[str, QemuVM] = field(default_factory=dict)

    def start(self, vmid: str, disks: Sequence[Disk] = (), **options: Any) -> QemuVM:
        vm = start_vm(self.run_dir, vmid, disks, **options)
        self.vms[vmid] = vm
        return vm

    def stop(self) -> None:
        for vm in self.vms.values():
            vm.stop()

    def __enter__(self) -> QemuLab:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
