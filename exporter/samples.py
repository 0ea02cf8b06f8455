"""Plain samples that backends yield and the collector turns into metric families.

Backends know how to read a hypervisor; they never see a metric name. Every value is in
base units (seconds, bytes, counts) so the collector has nothing to convert.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

# The per-VM and per-device samples are named tuples: a node with 1000 VMs builds thousands
# per scrape, and a tuple is built several times faster than a frozen dataclass.


class DiskSample(NamedTuple):
    """Cumulative counters of one virtual disk, named as the hypervisor's tooling names it."""

    disk: str
    read_bytes: int
    written_bytes: int
    reads_completed: int
    writes_completed: int


class InterfaceSample(NamedTuple):
    """Cumulative counters of one virtual NIC (from the guest's point of view)."""

    interface: str
    receive_bytes: int
    transmit_bytes: int


class DiskInfo(NamedTuple):
    """Where one virtual disk lives: what decides whether a live migration copies it.

    `storage` is the Proxmox storage id, or for libvirt the pool name, `network:<protocol>`
    for a network disk and `file` for a path; `size_bytes` is None when nothing says.
    """

    disk: str
    storage: str
    shared: bool
    size_bytes: int | None


#: Why a VM cannot be live-migrated: the `reason` label of `vmbalance_vm_migration_blocker`.
BLOCKER_REASONS: tuple[str, ...] = (
    "pci_passthrough",
    "usb_passthrough",
    "hostdev",
    "local_media",
    "lock",
    "local_resources",
)


class VMSample(NamedTuple):
    """One VM at one scrape.

    `vm` is the identity: the Proxmox VMID or the libvirt domain name. `name` is display
    only and may be anything a tenant typed.
    """

    vm: str
    name: str
    uuid: str
    cpu_seconds: float
    vcpus: int
    memory_max_bytes: int
    memory_used_bytes: int
    memory_rss_bytes: int | None = None
    disks: tuple[DiskSample, ...] = ()
    interfaces: tuple[InterfaceSample, ...] = ()
    disk_infos: tuple[DiskInfo, ...] = ()
    blockers: tuple[str, ...] = ()  # reasons from BLOCKER_REASONS, each once, sorted
    ha_managed: int = 0  # 1 when the Proxmox HA stack manages the VM
    dirty_rate_bytes_per_second: float | None = None


@dataclass(frozen=True, slots=True)
class NodeSample:
    """The hypervisor host itself."""

    cpus: int
    memory_bytes: int
    version: str


@dataclass(slots=True)
class ScrapeResult:
    """What one backend scrape produced.

    `up` is False when the backend itself could not be reached (libvirt down, QMP dir
    unreadable); `vm_errors` counts VMs skipped this scrape because they errored, hung or
    vanished while the rest were read. `skipped` names those it can (VM id: reason, worded
    the same from one scrape to the next so the log can say when it changes);
    `read_timeouts` counts host reads abandoned at their deadline, by source; `cluster` is
    the cluster the backend found the node in (Proxmox's corosync name), None when it does
    not know.
    """

    up: bool
    node: NodeSample | None = None
    vms: list[VMSample] = field(default_factory=list)
    vm_errors: int = 0
    error: str | None = None
    skipped: dict[str, str] = field(default_factory=dict)
    read_timeouts: dict[str, int] = field(default_factory=dict)
    cluster: str | None = None


class Backend(Protocol):
    """A source of samples: one per hypervisor technology."""

    name: str
    #: Where the backend's blocking reads go (`conf`, `proc`, `sysfs`, `qmp`, `libvirt`, ...):
    #: the `source` label of `vmbalance_read_timeouts_total`.
    read_sources: tuple[str, ...]

    def scrape(self, timeout: float) -> ScrapeResult:
        """Read every VM; return within `timeout` seconds plus a small margin."""
        ...

    def close(self) -> None:
        """Release connections; safe to call twice."""
        ...


class BackendError(Exception):
    """A backend cannot be set up (bad URI, unreadable directory): a one-line reason."""
