"""The lab's guest: Debian's cloud kernel and a busybox initramfs that writes (and reads) its
disk at a rate given on the kernel command line.

Nothing is installed on the host: the kernel package is fetched with `apt-get download` and
only the kernel and the virtio modules are taken out of it (`dpkg-deb --fsys-tarfile`). The
initramfs is written here (cpio "newc", gzip) from the host's static busybox, the modules and
an `/init` script, so it needs no root, no `cpio` and no device nodes on the host. Both are
cached: a rerun neither downloads nor rebuilds anything.

The guest's `/init` keeps a running total against its own clock (`/proc/uptime`) and issues
`dd ... oflag=direct` / `iflag=direct` for whatever is due, so every byte reaches QEMU's block
layer and the rate over any window is the configured one, however slowly TCG runs a single
`dd`. Every `report` seconds it prints its totals on the serial console.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import shutil
import struct
import subprocess
import tarfile
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

#: The smallest Debian kernel that boots a virtio-blk guest: the cloud flavour.
DEFAULT_KERNEL_PACKAGE = "linux-image-cloud-amd64"
#: Modules the guest loads, with their dependencies (found in the modules themselves).
GUEST_MODULES: tuple[str, ...] = ("virtio_pci", "virtio_blk")
#: How long one `apt-get download` may take before the lab gives up with a message.
APT_TIMEOUT = 300.0

_MODULE_DIRS = ("kernel/drivers/virtio/", "kernel/drivers/block/")
_DEPENDS = re.compile(rb"(?:^|\x00)depends=([^\x00]*)\x00")
_VMLINUZ = re.compile(r"^\./boot/vmlinuz-(.+)$")
_UNKNOWN_PACKAGE = re.compile(
    r"Unable to locate package|Can't select|has no installation candidate"
)

INIT_SCRIPT = r"""#!/bin/busybox sh
# vmbalance lab guest: load the virtio modules, then do disk I/O at the configured rate.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t devtmpfs devtmpfs /dev
mount -t proc proc /proc
mount -t sysfs sysfs /sys
exec </dev/console >/dev/console 2>&1
for module in @MODULES@; do
    insmod "/lib/modules/$module.ko" || echo "vmbalance-guest: insmod $module failed"
done

write_kib=0
read_kib=0
block_kib=64
period_ms=500
report=10
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        vmbalance.write_kib=*) write_kib=${arg#*=} ;;
        vmbalance.read_kib=*) read_kib=${arg#*=} ;;
        vmbalance.block_kib=*) block_kib=${arg#*=} ;;
        vmbalance.period_ms=*) period_ms=${arg#*=} ;;
        vmbalance.report=*) report=${arg#*=} ;;
    esac
done

waited=0
while [ ! -b /dev/vda ]; do
    waited=$((waited + 1))
    if [ "$waited" -gt 300 ]; then
        echo "vmbalance-guest: no /dev/vda"
        poweroff -f
    fi
    usleep 100000
done
blocks=$(( $(cat /sys/block/vda/size) * 512 / (block_kib * 1024) ))

# Centiseconds since boot; /proc/uptime always has two decimals ("1${frac}" avoids octal).
now_cs() {
    read -r up _ < /proc/uptime
    echo $(( ${up%.*} * 100 + 1${up#*.} - 100 ))
}

# do_io KIND DONE_BLOCKS DUE_BLOCKS OFFSET -> prints the new DONE and OFFSET.
do_io() {
    n=$(( $3 - $2 ))
    offset=$4
    if [ "$n" -gt 0 ]; then
        [ "$n" -gt $(( blocks - offset )) ] && n=$(( blocks - offset ))
        if [ "$1" = write ]; then
            dd if=/dev/zero of=/dev/vda bs=${block_kib}k count=$n seek=$offset \
                oflag=direct conv=notrunc 2>/dev/null
        else
            dd if=/dev/vda of=/dev/null bs=${block_kib}k count=$n skip=$offset \
                iflag=direct 2>/dev/null
        fi
        offset=$(( (offset + n) % blocks ))
        echo "$(( $2 + n )) $offset"
    else
        echo "$2 $offset"
    fi
}

echo "vmbalance-guest: start write_kib=$write_kib read_kib=$read_kib block_kib=$block_kib" \
    "disk_blocks=$blocks"
start=$(now_cs)
written=0
read_blocks=0
woff=0
roff=0
next_report=$report
while true; do
    elapsed=$(( $(now_cs) - start ))
    set -- $(do_io write $written $(( elapsed * write_kib / block_kib / 100 )) $woff)
    written=$1 woff=$2
    set -- $(do_io read $read_blocks $(( elapsed * read_kib / block_kib / 100 )) $roff)
    read_blocks=$1 roff=$2
    if [ $(( elapsed / 100 )) -ge "$next_report" ]; then
        echo "vmbalance-guest: t=$(( elapsed / 100 ))s written_kib=$(( written * block_kib ))" \
            "read_kib=$(( read_blocks * block_kib ))"
        next_report=$(( next_report + report ))
    fi
    usleep $(( period_ms * 1000 ))
done
"""


class GuestBuildError(RuntimeError):
    """The guest's kernel or initramfs could not be obtained; the message says why."""


@dataclass(frozen=True, slots=True)
class Kernel:
    """A kernel taken out of a Debian package: the image and the modules the guest loads."""

    version: str
    vmlinuz: Path
    modules: tuple[Path, ...]  # in load order

    @property
    def module_names(self) -> tuple[str, ...]:
        return tuple(path.stem for path in self.modules)


@dataclass(frozen=True, slots=True)
class GuestImage:
    """What a guest boots: `-kernel`, `-initrd`, and the kernel's version for the record."""

    kernel: Path
    initrd: Path
    kernel_version: str


@dataclass(frozen=True, slots=True)
class GuestLoad:
    """The I/O a guest does, in KiB/s, in direct `dd` requests of `block_kib`."""

    write_kib: int
    read_kib: int = 0
    block_kib: int = 64
    period_ms: int = 500
    report_seconds: int = 10

    @property
    def disk_bytes(self) -> float:
        """Read plus written bytes/s: what the recommender calls the VM's `disk_bytes`."""
        return (self.write_kib + self.read_kib) * 1024.0

    def cmdline(self) -> str:
        """The kernel command line: serial console, no reboot loop, and the rates."""
        return (
            "console=ttyS0 panic=-1 loglevel=4 "
            f"vmbalance.write_kib={self.write_kib} vmbalance.read_kib={self.read_kib} "
            f"vmbalance.block_kib={self.block_kib} vmbalance.period_ms={self.period_ms} "
            f"vmbalance.report={self.report_seconds}"
        )


def default_cache_dir() -> Path:
    """`$VMBALANCE_LAB_CACHE`, else `$XDG_CACHE_HOME/vmbalance-lab` (`~/.cache/...`)."""
    explicit = os.environ.get("VMBALANCE_LAB_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "vmbalance-lab"


# --------------------------------------------------------------------------- the kernel


def _run(args: list[str], cwd: Path, timeout: float, what: str) -> str:
    try:
        result = subprocess.run(
            args, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
        )
    except FileNotFoundError:
        raise GuestBuildError(f"{what}: {args[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise GuestBuildError(
            f"{what}: no result within {timeout:.0f}s ({' '.join(args)})"
        ) from None
    if result.returncode != 0:
        tail = " ".join((result.stderr or result.stdout).split())[-400:]
        error = PackageUnknownError if _UNKNOWN_PACKAGE.search(tail) else GuestBuildError
        raise error(f"{what} failed ({result.returncode}): {tail}")
    return result.stdout


class PackageUnknownError(GuestBuildError):
    """apt does not know the package: its package lists are missing or stale."""


def _apt_download(package: str, directory: Path, timeout: float) -> Path:
    """`apt-get download PACKAGE` into `directory`; the path of the .deb it wrote.

    Package lists are often absent on a fresh machine or container: as root, an unknown
    package gets one `apt-get update` and a second try.
    """
    before = set(directory.glob("*.deb"))
    download = ["apt-get", "-q", "-o", "APT::Sandbox::User=root", "download", package]
    try:
        _run(download, directory, timeout, f"downloading {package}")
    except PackageUnknownError as exc:
        if os.geteuid() != 0:
            raise GuestBuildError(f"{exc} (run apt-get update as root first)") from None
        _run(["apt-get", "-q", "update"], directory, timeout, "apt-get update")
        _run(download, directory, timeout, f"downloading {package}")
    new = sorted(set(directory.glob("*.deb")) - before)
    if not new:
        found = sorted(directory.glob(f"{package}_*.deb"))
        if not found:
            raise GuestBuildError(f"apt-get download {package} wrote no .deb")
        return found[-1]
    return new[0]


def _image_package(meta_deb: Path, timeout: float) -> str:
    """The versioned image package a metapackage (`linux-image-cloud-amd64`) depends on."""
    depends = _run(
        ["dpkg-deb", "-f", str(meta_deb), "Depends"], meta_deb.parent, timeout, "reading Depends"
    )
    for alternative in re.split(r"[,|]", depends):
        name = alternative.strip().split(" ")[0]
        if name.startswith("linux-image-"):
            return name
    # Not a metapackage: the image itself.
    return meta_deb.name.split("_")[0]


def module_depends(data: bytes) -> tuple[str, ...]:
    """The `depends=` of a kernel module's .modinfo section (module names, `_` spelled)."""
    match = _DEPENDS.search(data)
    if match is None or not match.group(1):
        return ()
    return tuple(name.replace("-", "_") for name in match.group(1).decode().split(","))


def load_order(
    wanted: Iterable[str], depends: Mapping[str, tuple[str, ...]], builtin: frozenset[str]
) -> tuple[str, ...]:
    """Modules to insmod, dependencies first; built-in ones need no loading."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order or name in builtin:
            return
        if name not in depends:
            raise GuestBuildError(f"kernel module {name} is neither in the package nor built in")
        if name in visiting:
            raise GuestBuildError(f"kernel modules depend on each other in a cycle at {name}")
        visiting.add(name)
        for dependency in depends[name]:
            visit(dependency)
        visiting.discard(name)
        order.append(name)

    for name in wanted:
        visit(name)
    return tuple(order)


def extract_kernel(deb: Path, dest: Path, timeout: float = APT_TIMEOUT) -> Kernel:
    """Take the kernel image and the guest's modules out of a linux-image .deb into `dest`."""
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest.parent))
    try:
        contents = _read_deb(deb, tmp, timeout)
        _write_kernel_dir(tmp, deb.name, contents)
        if (dest / "kernel.json").exists():
            return read_kernel(dest)  # another run extracted the same package meanwhile
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return read_kernel(dest)


@dataclass
class _DebContents:
    """What `extract_kernel` keeps of a linux-image package (the image goes to a file)."""

    version: str | None = None
    modules: dict[str, bytes] = field(default_factory=dict)  # name (`_` spelled) -> .ko
    builtin: set[str] = field(default_factory=set)

    def take(self, archive: tarfile.TarFile, member: tarfile.TarInfo, tmp: Path) -> None:
        """Keeps `member` if it is the kernel image, the built-in module list or a module
        the guest may need."""
        name = member.name
        match = _VMLINUZ.match(name)
        if match is not None:
            self.version = match.group(1)
            (tmp / "vmlinuz").write_bytes(_member_bytes(archive, member))
        elif name.endswith("/modules.builtin"):
            for line in _member_bytes(archive, member).decode().splitlines():
                self.builtin.add(Path(line).name.removesuffix(".ko").replace("-", "_"))
        elif name.endswith(".ko") and any(d in name for d in _MODULE_DIRS):
            self.modules[Path(name).stem.replace("-", "_")] = _member_bytes(archive, member)


def _member_bytes(archive: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    handle = archive.extractfile(member)
    assert handle is not None
    return handle.read()


def _read_deb(deb: Path, tmp: Path, timeout: float) -> _DebContents:
    """Streams the package's files through dpkg-deb, keeping what the guest needs."""
    process = subprocess.Popen(
        ["dpkg-deb", "--fsys-tarfile", str(deb)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None
    contents = _DebContents()
    with tarfile.open(fileobj=process.stdout, mode="r|") as archive:
        for member in archive:
            if member.isfile():
                contents.take(archive, member, tmp)
    _, stderr = process.communicate(timeout=timeout)
    if process.returncode != 0:
        raise GuestBuildError(f"dpkg-deb cannot read {deb.name}: {stderr.decode().strip()}")
    if contents.version is None:
        raise GuestBuildError(f"{deb.name} holds no /boot/vmlinuz-*")
    return contents


def _write_kernel_dir(tmp: Path, package: str, contents: _DebContents) -> None:
    """The guest's modules in load order and `kernel.json` beside the image in `tmp`."""
    depends = {name: module_depends(data) for name, data in contents.modules.items()}
    order = load_order(GUEST_MODULES, depends, frozenset(contents.builtin))
    (tmp / "modules").mkdir()
    for name in order:
        (tmp / "modules" / f"{name}.ko").write_bytes(contents.modules[name])
    (tmp / "kernel.json").write_text(
        json.dumps({"version": contents.version, "package": package, "load_order": order}, indent=1)
    )
    tmp.chmod(0o755)


def read_kernel(directory: Path) -> Kernel:
    """A kernel extracted earlier by `extract_kernel`."""
    meta = json.loads((directory / "kernel.json").read_text())
    return Kernel(
        version=str(meta["version"]),
        vmlinuz=directory / "vmlinuz",
        modules=tuple(directory / "modules" / f"{name}.ko" for name in meta["load_order"]),
    )


def cached_kernel(cache_dir: Path) -> Kernel | None:
    """The most recently extracted kernel in the cache, if any."""
    found = sorted(
        (path for path in (cache_dir / "kernels").glob("*/kernel.json")),
        key=lambda path: path.stat().st_mtime,
    )
    return read_kernel(found[-1].parent) if found else None


def fetch_kernel(
    cache_dir: Path,
    package: str = DEFAULT_KERNEL_PACKAGE,
    timeout: float = APT_TIMEOUT,
    refresh: bool = False,
) -> Kernel:
    """The guest kernel: from the cache, else downloaded with apt and extracted.

    `refresh` asks apt again even when a kernel is cached (a newer one may be out).
    """
    if not refresh and (kernel := cached_kernel(cache_dir)) is not None:
        return kernel
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise GuestBuildError("apt-get and dpkg-deb are needed to fetch the guest kernel")
    kernels = cache_dir / "kernels"
    kernels.mkdir(parents=True, exist_ok=True)
    # A directory of this run's own, so concurrent runs never see each other's downloads;
    # only the extracted files are kept.
    downloads = Path(tempfile.mkdtemp(prefix=".download-", dir=cache_dir))
    try:
        meta = _apt_download(package, downloads, timeout)
        image = _image_package(meta, timeout)
        is_image = image == meta.name.split("_")[0]
        deb = meta if is_image else _apt_download(image, downloads, timeout)
        return extract_kernel(deb, kernels / deb.stem, timeout)
    finally:
        shutil.rmtree(downloads, ignore_errors=True)


# --------------------------------------------------------------------------- the initramfs


def _is_static_elf(path: Path) -> bool:
    """Whether an x86-64 ELF has no program interpreter (so runs without a libc beside it)."""
    with path.open("rb") as handle:
        header = handle.read(64)
        if header[:4] != b"\x7fELF" or header[4] != 2:
            return False
        (phoff,) = struct.unpack_from("<Q", header, 32)
        phentsize, phnum = struct.unpack_from("<HH", header, 54)
        handle.seek(phoff)
        table = handle.read(phentsize * phnum)
    return all(
        struct.unpack_from("<I", table, i * phentsize)[0] != 3  # PT_INTERP
        for i in range(phnum)
    )


def find_busybox() -> Path:
    """The host's static busybox (Debian's busybox-static); the guest has no libc."""
    found = shutil.which("busybox")
    if found is None:
        raise GuestBuildError("busybox is not installed (Debian package busybox-static)")
    path = Path(found).resolve()
    if not _is_static_elf(path):
        raise GuestBuildError(f"{path} is not statically linked (install busybox-static)")
    return path


@dataclass(frozen=True, slots=True)
class CpioEntry:
    """One file, directory or device node of an initramfs."""

    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def cpio_newc(entries: Iterable[CpioEntry]) -> bytes:
    """A cpio archive in the "newc" format the kernel unpacks, owned by root, mtime 0."""
    out = io.BytesIO()

    def pad() -> None:
        out.write(b"\x00" * (-out.tell() % 4))

    for ino, entry in enumerate([*entries, CpioEntry("TRAILER!!!", 0)], start=1):
        name = entry.name.encode() + b"\x00"
        fields = (
            ino, entry.mode, 0, 0, 1, 0, len(entry.data), 0, 0, *entry.rdev, len(name), 0,
        )  # fmt: skip
        out.write(b"070701" + b"".join(b"%08X" % value for value in fields))
        out.write(name)
        pad()
        out.write(entry.data)
        pad()
    return out.getvalue()


def initramfs_bytes(kernel: Kernel, busybox: Path) -> bytes:
    """The gzip'd initramfs: busybox, the modules, /init and a /dev/console node."""
    directory, regular, char = 0o040755, 0o100644, 0o020600
    init = INIT_SCRIPT.replace("@MODULES@", " ".join(kernel.module_names))
    entries = [
        CpioEntry(name, directory) for name in ("bin", "dev", "proc", "sys", "lib", "lib/modules")
    ]
    entries += [
        CpioEntry("dev/console", char, rdev=(5, 1)),
        CpioEntry("bin/busybox", 0o100755, busybox.read_bytes()),
        CpioEntry("init", 0o100755, init.encode()),
    ]
    entries += [
        CpioEntry(f"lib/modules/{path.name}", regular, path.read_bytes()) for path in kernel.modules
    ]
    return gzip.compress(cpio_newc(entries), compresslevel=6, mtime=0)


def build_initramfs(kernel: Kernel, cache_dir: Path, busybox: Path | None = None) -> Path:
    """The initramfs for `kernel`, built once per (kernel, busybox, /init) and cached."""
    box = busybox or find_busybox()
    digest = hashlib.sha256()
    digest.update(INIT_SCRIPT.encode())
    digest.update(box.read_bytes())
    for path in kernel.modules:
        digest.update(path.name.encode() + path.read_bytes())
    target = cache_dir / "initramfs" / f"initramfs-{kernel.version}-{digest.hexdigest()[:16]}.gz"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    partial.write_bytes(initramfs_bytes(kernel, box))
    partial.rename(target)
    return target


def ensure_guest(
    cache_dir: Path | None = None,
    package: str = DEFAULT_KERNEL_PACKAGE,
    refresh: bool = False,
    timeout: float = APT_TIMEOUT,
) -> GuestImage:
    """Kernel and initramfs ready to boot, fetched and built only when not cached.

    `timeout` bounds each apt and dpkg-deb step, so an unreachable mirror fails with a
    GuestBuildError instead of hanging.
    """
    cache = cache_dir or default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    kernel = fetch_kernel(cache, package, timeout=timeout, refresh=refresh)
    initrd = build_initramfs(kernel, cache)
    return GuestImage(kernel=kernel.vmlinuz, initrd=initrd, kernel_version=kernel.version)
