"""Proxmox-like nodes made of plain QEMU processes, and live migration between them.

Each node has its own run directory (`<vmid>.qmp`, `<vmid>.pid`) and config directory
(`<vmid>.conf`), which is all the exporter's qmp backend reads. Disks live in one shared
directory, as on shared storage, so a live migration copies only memory.

`live_migrate` is the lab playing `qm migrate --online`: it starts the target QEMU with the
same machine on the target node with `-incoming`, sends `migrate` to the source over the
lab's own QMP client, waits for completion, moves the `.conf` and stops the source. The
exporter never sends these commands: its qmp backend is read-only.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from devkit.qemu import Disk, QemuVM, qmp_command, start_vm
from devkit.service import free_port
from lab.guest import GuestImage, GuestLoad
from lab.libvirt_node import domain_uuid

MIGRATION_TIMEOUT = 120.0


@dataclass(frozen=True, slots=True)
class PveGuestSpec:
    """A lab guest on a Proxmox-like node: its VMID is its `vm` label."""

    vmid: str
    name: str
    load: GuestLoad
    memory_mib: int = 96
    disk_mib: int = 4


@dataclass
class PveGuest:
    spec: PveGuestSpec
    disk: Path
    vm: QemuVM


def conf_text(spec: PveGuestSpec) -> str:
    """The guest's `<vmid>.conf` as Proxmox writes it (the fields the exporter reads)."""
    return (
        f"boot: order=virtio0\ncores: 1\nmemory: {spec.memory_mib}\nname: {spec.name}\n"
        f"smbios1: uuid={domain_uuid(spec.name)}\nsockets: 1\n"
        f"virtio0: shared:{spec.vmid}/vm-{spec.vmid}-disk-0.raw,size={spec.disk_mib}M\n"
    )


@dataclass
class PveNode:
    """One Proxmox-like node under `root`; a context manager that stops its guests."""

    name: str
    root: Path
    disks: Path
    guests: dict[str, PveGuest] = field(default_factory=dict)

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def conf_dir(self) -> Path:
        return self.root / "conf"

    def exporter_args(self) -> list[str]:
        return [
            "--backend", "qmp",
            "--qmp-run-dir", str(self.run_dir),
            "--pve-conf-dir", str(self.conf_dir),
            "--node-name", self.name,
        ]  # fmt: skip

    def __enter__(self) -> PveNode:
        for directory in (self.run_dir, self.conf_dir, self.disks, self.root / "logs"):
            directory.mkdir(parents=True, exist_ok=True)
        # The guests' `shared:` storage, declared as Proxmox declares a directory every node
        # mounts (the exporter reads storage.cfg beside the configs): their disks do not pin
        # them to a node.
        (self.root / "storage.cfg").write_text(
            f"dir: shared\n\tpath {self.disks}\n\tcontent images\n\tshared 1\n"
        )
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _qemu_args(self, spec: PveGuestSpec, image: GuestImage, serial: Path) -> list[str]:
        return [
            "-kernel", str(image.kernel),
            "-initrd", str(image.initrd),
            "-append", spec.load.cmdline(),
            "-serial", f"file:{serial}",
            "-no-reboot",
        ]  # fmt: skip

    def start_guest(
        self,
        spec: PveGuestSpec,
        image: GuestImage,
        disk: Path | None = None,
        incoming_port: int | None = None,
    ) -> PveGuest:
        """Start QEMU for `spec`; a new blank disk unless `disk` (a migration's) is given."""
        if disk is None:
            disk = self.disks / f"vm-{spec.vmid}-disk-0.raw"
            with disk.open("wb") as handle:
                handle.truncate(spec.disk_mib * 1024 * 1024)
        serial = self.root / "logs" / f"{spec.vmid}.serial.log"
        extra = self._qemu_args(spec, image, serial)
        if incoming_port is not None:
            extra += ["-incoming", f"tcp:127.0.0.1:{incoming_port}"]
        vm = start_vm(
            self.run_dir,
            spec.vmid,
            [Disk(id="virtio0", image=disk)],
            memory_mib=spec.memory_mib,
            extra_args=extra,
        )
        guest = PveGuest(spec=spec, disk=disk, vm=vm)
        self.guests[spec.vmid] = guest
        if incoming_port is None:
            self.write_conf(spec)
        return guest

    def write_conf(self, spec: PveGuestSpec) -> None:
        (self.conf_dir / f"{spec.vmid}.conf").write_text(conf_text(spec))

    def remove(self, vmid: str) -> None:
        """Forget a guest that left: its conf and whatever QEMU left in the run dir."""
        self.guests.pop(vmid, None)
        for path in (
            self.conf_dir / f"{vmid}.conf",
            self.run_dir / f"{vmid}.pid",
            self.run_dir / f"{vmid}.qmp",
        ):
            path.unlink(missing_ok=True)

    def stop(self) -> None:
        for guest in list(self.guests.values()):
            guest.vm.stop()


@dataclass(frozen=True, slots=True)
class Migration:
    """What one live migration did, in QEMU's own figures."""

    vm: str
    source: str
    target: str
    started_at: float  # unix time `migrate` was sent
    completed_at: float  # unix time completion was seen
    total_time_ms: int
    downtime_ms: int
    transferred_bytes: int
    target_reported_while_incoming: bool | None = None

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


def live_migrate(
    source: PveNode,
    vmid: str,
    target: PveNode,
    image: GuestImage,
    before_migrate: Callable[[PveGuest], bool | None] | None = None,
    timeout: float = MIGRATION_TIMEOUT,
) -> Migration:
    """Move guest `vmid` from `source` to `target` while it runs.

    `before_migrate(target_guest)` runs once the incoming QEMU waits (the lab uses it to see
    what the target's exporter reports at that moment); its result is recorded.
    """
    guest = source.guests[vmid]
    port = free_port()
    incoming = target.start_guest(guest.spec, image, disk=guest.disk, incoming_port=port)
    observed = None
    try:
        if before_migrate is not None:
            observed = before_migrate(incoming)
        started = time.time()
        qmp_command(guest.vm.qmp_path, "migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        deadline = time.monotonic() + timeout
        while True:
            status = qmp_command(guest.vm.qmp_path, "query-migrate")
            state = status.get("status")
            if state == "completed":
                break
            if state in ("failed", "cancelled") or time.monotonic() > deadline:
                raise RuntimeError(
                    f"migration of {vmid} {source.name} -> {target.name}: {state}: "
                    f"{status.get('error-desc', 'timed out')}"
                )
            time.sleep(0.1)
        completed = time.time()
        running = qmp_command(incoming.vm.qmp_path, "query-status")
        if not running.get("running"):
            raise RuntimeError(f"{vmid} is {running.get('status')} on {target.name}")
    except BaseException:
        incoming.vm.stop()
        target.remove(vmid)
        raise
    # As qm migrate does: the config moves to the target, the paused source goes away.
    target.write_conf(guest.spec)
    with contextlib.suppress(Exception):  # QEMU may hang up before it answers `quit`
        qmp_command(guest.vm.qmp_path, "quit")
    with contextlib.suppress(Exception):
        guest.vm.process.wait(timeout=10)
    guest.vm.stop()
    source.remove(vmid)
    return Migration(
        vm=vmid,
        source=source.name,
        target=target.name,
        started_at=started,
        completed_at=completed,
        # QEMU's own count; the wall clock around it where QEMU leaves it out of the answer.
        total_time_ms=int(status.get("total-time") or round((completed - started) * 1000)),
        downtime_ms=int(status.get("downtime", 0)),
        transferred_bytes=int(status.get("ram", {}).get("transferred", 0)),
        target_reported_while_incoming=observed,
    )
