"""Node XML for libvirt's test driver: a synthetic hypervisor with as many domains as asked.

`test:///<absolute path>` opens such a file as an in-process fake hypervisor, no daemon
needed: the node's CPUs and memory come from `<cpu>` and `<memory>` (KiB), and each
`<domain type='test'>` is defined on it, running unless its `test:runstate` (from the test
driver's XML namespace) says 5, shut off. Its block, interface and CPU counters grow with wall
time, so two scrapes see counters move. The tests and the benchmark share this generator.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from pathlib import Path
from xml.sax.saxutils import quoteattr

# Where the generated domains' disk files are (nothing is created there: the test driver
# only names them). A test that wants them on shared storage passes `--shared-path IMAGES`.
IMAGES = "/var/lib/libvirt/images"

TEST_NAMESPACE = "http://libvirt.org/schemas/domain/test/1.0"
SHUTOFF = 5  # virDomainState VIR_DOMAIN_SHUTOFF
_GIB = 1024**3


def vm_name(index: int) -> str:
    """Name (and vmbalance `vm` label) of the running domain number `index`."""
    return f"vm{index:04d}"


def shutoff_vm_name(index: int) -> str:
    """Name of the shut-off domain number `index`."""
    return f"off{index:04d}"


def vm_uuid(name: str) -> str:
    """Stable UUID per name, so runs and scrapes agree on identities."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"vmbalance-test-domain/{name}"))


def disk_target(index: int) -> str:
    """virtio target names as libvirt assigns them: vda, vdb, …, vdz."""
    if not 0 <= index < 26:
        raise ValueError(f"disk index {index} out of vda..vdz")
    return "vd" + chr(ord("a") + index)


def nic_target(vm_index: int, nic_index: int) -> str:
    """Host-side tap name; libvirt drops `vnet*` targets from XML as reserved, so not those."""
    return f"tap{vm_index}n{nic_index}"


def _domain_xml(
    name: str,
    index: int,
    *,
    disks: int,
    nics: int,
    running: bool,
    memory_kib: int,
    vcpus: int,
    extra_devices: str = "",
) -> str:
    devices = [
        f"<disk type='file' device='disk'>"
        f"<source file={quoteattr(f'{IMAGES}/{name}-{d}.qcow2')}/>"
        f"<target dev='{disk_target(d)}' bus='virtio'/></disk>"
        for d in range(disks)
    ]
    for n in range(nics):
        mac_number = index * max(nics, 1) + n
        mac = ":".join(f"{b:02x}" for b in (0x52, 0x54, 0x00, *mac_number.to_bytes(3, "big")))
        devices.append(
            f"<interface type='bridge'><mac address='{mac}'/><source bridge='br0'/>"
            f"<target dev='{nic_target(index, n)}'/><model type='virtio'/></interface>"
        )
    devices.append(extra_devices)
    devices.append("<memballoon model='virtio'/>")
    runstate = "" if running else f"<test:runstate>{SHUTOFF}</test:runstate>"
    return (
        f"<domain type='test' xmlns:test='{TEST_NAMESPACE}'>"
        f"<name>{name}</name><uuid>{vm_uuid(name)}</uuid>"
        f"<memory unit='KiB'>{memory_kib}</memory>"
        f"<currentMemory unit='KiB'>{memory_kib}</currentMemory>"
        f"<vcpu>{vcpus}</vcpu><os><type>hvm</type></os>"
        f"<devices>{''.join(devices)}</devices>{runstate}</domain>\n"
    )


def write_node_xml(
    path: str | Path,
    n_vms: int,
    disks_per_vm: int = 2,
    nics_per_vm: int = 1,
    running: bool = True,
    *,
    shutoff_vms: int = 0,
    node_cpus: int = 64,
    node_memory_bytes: int = 256 * _GIB,
    vm_memory_bytes: int = 4 * _GIB,
    vcpus: int = 2,
    extra_devices: Mapping[str, str] | None = None,
) -> str:
    """Write a node of `n_vms` domains (running unless `running=False`) plus `shutoff_vms`
    shut-off ones to `path`; return the `test:///…` URI that opens it.

    Domain `i` is named `vm_name(i)`, has disks `vda`… and NICs `nic_target(i, n)`;
    `extra_devices` adds device XML (a network disk, a hostdev, …) to the domains it names.
    """
    extras = extra_devices or {}
    path = Path(path).resolve()

    def domain(name: str, index: int, is_running: bool) -> str:
        return _domain_xml(
            name,
            index,
            disks=disks_per_vm,
            nics=nics_per_vm,
            running=is_running,
            memory_kib=vm_memory_bytes // 1024,
            vcpus=vcpus,
            extra_devices=extras.get(name, ""),
        )

    parts = [
        "<node>\n<cpu><nodes>1</nodes><sockets>1</sockets>"
        f"<cores>{node_cpus}</cores><threads>1</threads><active>{node_cpus}</active>"
        "<mhz>2400</mhz><model>x86_64</model></cpu>\n"
        f"<memory>{node_memory_bytes // 1024}</memory>\n"
    ]
    parts += [domain(vm_name(i), i, running) for i in range(n_vms)]
    parts += [domain(shutoff_vm_name(i), n_vms + i, False) for i in range(shutoff_vms)]
    parts.append("</node>\n")
    path.write_text("".join(parts))
    return f"test://{path}"
