"""A libvirtd of the lab's own: the QEMU driver in session mode, under a private directory.

A root libvirtd is always the "system" daemon, with its state in /run/libvirt, /etc/libvirt
and /var/lib/libvirt, shared with any libvirtd the host runs. An unprivileged libvirtd is a
"session" daemon that keeps everything under `$XDG_CONFIG_HOME`, `$XDG_CACHE_HOME` and
`$XDG_RUNTIME_DIR`; pointing those at a fresh directory gives a daemon that touches nothing
outside it. Started by root, the lab runs it as `nobody` (anyone else runs it as themselves),
and every client (the lab, vmbalance-exporter, prometheus-libvirt-exporter) reaches the same
daemon through its socket: `qemu+unix:///session?socket=<dir>/run/libvirt/libvirt-sock`.

Guests are transient domains of type `qemu` (TCG: `nobody` cannot open /dev/kvm, and the
lab's rates must not depend on the host having KVM) booting the lab kernel directly. QEMU
logs go to files (`stdio_handler = "file"`), so no virtlogd is spawned. Stopping destroys
the domains, stops the daemon and, should a QEMU outlive it, kills it by the pid libvirt
recorded for it.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING
from xml.etree import ElementTree

from devkit.service import Service, kill_pid_if, wait_until
from lab.guest import GuestImage, GuestLoad

if TYPE_CHECKING:
    from libvirt import virConnect

#: The account a root-started daemon runs under.
DAEMON_USER = "nobody"
START_TIMEOUT = 60.0


@dataclass(frozen=True, slots=True)
class DomainSpec:
    """A lab guest on the libvirt node: its domain name is its `vm` label."""

    name: str
    load: GuestLoad
    memory_mib: int = 96
    disk_mib: int = 4
    # A read-only disk is one libvirt lets migrate between two daemons of one machine: for a
    # writable disk on a local file system it refuses ("migration without shared storage is
    # unsafe", whatever the cache mode, in libvirt 9).
    disk_readonly: bool = False


def domain_uuid(name: str) -> str:
    """A stable UUID per guest name, so reruns report the same identities."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"vmbalance-lab/{name}"))


def domain_xml(spec: DomainSpec, kernel: Path, initrd: Path, disk: Path, serial: Path) -> str:
    """Transient TCG domain: direct kernel boot, one raw virtio disk, serial console to a
    file, nothing else (no USB, no balloon, no NIC)."""
    domain = ElementTree.Element("domain", type="qemu")
    ElementTree.SubElement(domain, "name").text = spec.name
    ElementTree.SubElement(domain, "uuid").text = domain_uuid(spec.name)
    ElementTree.SubElement(domain, "memory", unit="MiB").text = str(spec.memory_mib)
    ElementTree.SubElement(domain, "vcpu").text = "1"
    os_ = ElementTree.SubElement(domain, "os")
    ElementTree.SubElement(os_, "type", arch="x86_64", machine="pc").text = "hvm"
    ElementTree.SubElement(os_, "kernel").text = str(kernel)
    ElementTree.SubElement(os_, "initrd").text = str(initrd)
    ElementTree.SubElement(os_, "cmdline").text = spec.load.cmdline()
    features = ElementTree.SubElement(domain, "features")
    ElementTree.SubElement(features, "acpi")
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        ElementTree.SubElement(domain, event).text = "destroy"
    devices = ElementTree.SubElement(domain, "devices")
    disk_el = ElementTree.SubElement(devices, "disk", type="file", device="disk")
    ElementTree.SubElement(disk_el, "driver", name="qemu", type="raw")
    ElementTree.SubElement(disk_el, "source", file=str(disk))
    ElementTree.SubElement(disk_el, "target", dev="vda", bus="virtio")
    if spec.disk_readonly:
        ElementTree.SubElement(disk_el, "readonly")
    serial_el = ElementTree.SubElement(devices, "serial", type="file")
    ElementTree.SubElement(serial_el, "source", path=str(serial))
    ElementTree.SubElement(serial_el, "target", port="0")
    ElementTree.SubElement(devices, "controller", type="usb", model="none")
    ElementTree.SubElement(devices, "memballoon", model="none")
    return ElementTree.tostring(domain, encoding="unicode")


def _ignore_error(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr unless a handler takes it; callers report them."""


def _open(uri: str) -> virConnect:
    import libvirt

    libvirt.registerErrorHandler(_ignore_error, None)
    return libvirt.open(uri)


class PrivateLibvirtd:
    """A session-mode libvirtd in a temporary directory; a context manager.

    The directory is made by `start()` under the system temp dir (not the caller's, which may
    be private to root) because the daemon's account must reach it, and removed by `stop()`,
    which first copies the daemon's and the guests' logs to `logs_dir`.
    """

    def __init__(
        self, logs_dir: Path, user: str | None = None, host_uuid: str | None = None
    ) -> None:
        self.logs_dir = logs_dir
        # Two daemons on one machine are two nodes only with their own host UUIDs: libvirt
        # refuses a migration to a daemon reporting its own.
        self.host_uuid = host_uuid
        self.user = user if user is not None else (DAEMON_USER if os.geteuid() == 0 else None)
        self.root = Path(tempfile.gettempdir()) / "vmb-libvirtd-unstarted"
        self._made_root = False
        self.service: Service | None = None
        self._conn: virConnect | None = None

    @property
    def config_home(self) -> Path:
        return self.root / "config"

    @property
    def cache_home(self) -> Path:
        return self.root / "cache"

    @property
    def runtime_dir(self) -> Path:
        return self.root / "run"

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def socket(self) -> Path:
        return self.runtime_dir / "libvirt" / "libvirt-sock"

    @property
    def uri(self) -> str:
        return f"qemu+unix:///session?socket={self.socket}"

    def _chown(self, path: Path) -> None:
        if self.user is None:
            return
        account = pwd.getpwnam(self.user)
        os.chown(path, account.pw_uid, account.pw_gid)

    def start(self, timeout: float = START_TIMEOUT) -> PrivateLibvirtd:
        """Start the daemon and wait until it answers on its socket."""
        binary = shutil.which("libvirtd") or next(
            (p for p in ("/usr/sbin/libvirtd", "/sbin/libvirtd") if os.access(p, os.X_OK)), None
        )
        if binary is None:
            raise RuntimeError(
                "libvirtd is not installed (Debian: libvirt-daemon libvirt-daemon-driver-qemu)"
            )
        self.root = Path(tempfile.mkdtemp(prefix="vmb-libvirtd-"))
        self._made_root = True
        try:
            self._launch(binary)
            assert self.service is not None
            wait_until(self._answers, timeout, "private libvirtd", self.service.check_running)
        except BaseException:
            self.stop()
            raise
        return self

    def _launch(self, binary: str) -> None:
        """Lay out the private directory, owned by the daemon's account, and start libvirtd."""
        for directory in (
            self.config_home / "libvirt",
            self.cache_home,
            self.runtime_dir,
            self.root / "data",
            self.images,
        ):
            directory.mkdir(parents=True, exist_ok=True)
        # Logs to files: no virtlogd. No lock manager, no network: nothing else is spawned.
        (self.config_home / "libvirt" / "qemu.conf").write_text('stdio_handler = "file"\n')
        daemon_conf = 'log_outputs = "3:stderr"\n'
        if self.host_uuid is not None:
            daemon_conf += f'host_uuid = "{self.host_uuid}"\n'
        (self.config_home / "libvirt" / "libvirtd.conf").write_text(daemon_conf)
        self.runtime_dir.chmod(0o700)
        for path in [self.root, *self.root.rglob("*")]:
            self._chown(path)
        self.root.chmod(0o755)
        env = {
            "HOME": str(self.root),
            "XDG_CONFIG_HOME": str(self.config_home),
            "XDG_CACHE_HOME": str(self.cache_home),
            "XDG_RUNTIME_DIR": str(self.runtime_dir),
            "XDG_DATA_HOME": str(self.root / "data"),
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "LC_ALL": "C",
        }
        account = pwd.getpwnam(self.user) if self.user is not None else None
        self.service = Service(
            "libvirtd",
            [binary],
            self.logs_dir / "libvirtd.log",
            env=env,
            cwd=self.root,
            user=account.pw_uid if account else None,
            group=account.pw_gid if account else None,
        ).start()

    def _answers(self) -> bool:
        if not self.socket.exists():
            return False
        try:
            self._conn = _open(self.uri)
        except Exception:  # libvirtError while the daemon is still starting
            return False
        return True

    @property
    def conn(self) -> virConnect:
        if self._conn is None:
            self._conn = _open(self.uri)
        return self._conn

    def create_guest(self, spec: DomainSpec, image: GuestImage) -> Path:
        """Start a transient domain for `spec`; returns its disk image (owned by the daemon)."""
        kernel = self.images / "vmlinuz"
        initrd = self.images / "initrd.gz"
        for source, copy in ((image.kernel, kernel), (image.initrd, initrd)):
            if not copy.exists():
                shutil.copyfile(source, copy)
                self._chown(copy)
        disk = self.images / f"{spec.name}.raw"
        with disk.open("wb") as handle:
            handle.truncate(spec.disk_mib * 1024 * 1024)
        serial = self.images / f"{spec.name}.serial.log"
        serial.touch()
        for path in (disk, serial):
            self._chown(path)
        self.conn.createXML(domain_xml(spec, kernel, initrd, disk, serial), 0)
        return disk

    def qemu_pids(self) -> list[int]:
        """The QEMU processes libvirt started, from the pid files it keeps for them."""
        pids = []
        for path in (self.runtime_dir / "libvirt" / "qemu" / "run").glob("*.pid"):
            if path.stem == "driver":
                continue
            with contextlib.suppress(OSError, ValueError):
                pids.append(int(path.read_text().strip()))
        return pids

    def collect_logs(self) -> None:
        """Copy the guests' serial consoles and QEMU logs next to the daemon's log."""
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        sources = [
            *self.images.glob("*.serial.log"),
            *(self.cache_home / "libvirt" / "qemu" / "log").glob("*.log"),
        ]
        for path in sources:
            with contextlib.suppress(OSError):
                shutil.copyfile(path, self.logs_dir / f"libvirt-{path.name}")

    def stop(self) -> None:
        """Destroy every domain, stop the daemon, kill any QEMU left, remove the directory."""
        pids = self.qemu_pids()
        if self._conn is not None:
            with contextlib.suppress(Exception):
                for domain in self._conn.listAllDomains():
                    with contextlib.suppress(Exception):
                        domain.destroy()
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None
        if self.service is not None:
            self.service.stop()
        deadline = time.monotonic() + 5
        for pid in pids:
            while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
                time.sleep(0.05)
            kill_pid_if(pid, b"qemu-system")
        with contextlib.suppress(OSError):
            self.collect_logs()
        if self._made_root:
            shutil.rmtree(self.root, ignore_errors=True)
            self._made_root = False

    def __enter__(self) -> PrivateLibvirtd:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
