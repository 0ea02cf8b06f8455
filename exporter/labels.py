"""Label values as valid UTF-8, whatever a guest or an admin typed.

A VM name comes from a tenant (QMP `query-name`), a `.conf` or a libvirt domain; JSON and
argv can carry lone surrogates, which no UTF-8 encoder accepts, so one such name would fail
the whole exposition. Each is replaced by U+FFFD here, once per scrape, before either format
is written. Everything else a label may hold (quotes, backslashes, newlines) is the
exposition's own escaping.
"""

from __future__ import annotations

import re

from exporter.samples import (
    DiskInfo,
    DiskSample,
    InterfaceSample,
    NodeSample,
    ScrapeResult,
    VMSample,
)

_SURROGATE = re.compile("[\ud800-\udfff]")
REPLACEMENT = "\ufffd"


def valid_utf8(text: str) -> str:
    """`text` with every lone surrogate replaced; the same object when there is none."""
    if text.isascii():
        return text
    return _SURROGATE.sub(REPLACEMENT, text)


def _clean_vm(vm: VMSample) -> VMSample:
    strings = (vm.vm, vm.name, vm.uuid)
    devices = [d.disk for d in vm.disks] + [n.interface for n in vm.interfaces]
    devices += [s for info in vm.disk_infos for s in (info.disk, info.storage)]
    if all(s.isascii() for s in strings) and all(d.isascii() for d in devices):
        return vm
    return vm._replace(
        vm=valid_utf8(vm.vm),
        name=valid_utf8(vm.name),
        uuid=valid_utf8(vm.uuid),
        disks=tuple(
            d if d.disk.isascii() else DiskSample(valid_utf8(d.disk), *d[1:]) for d in vm.disks
        ),
        interfaces=tuple(
            n if n.interface.isascii() else InterfaceSample(valid_utf8(n.interface), *n[1:])
            for n in vm.interfaces
        ),
        disk_infos=tuple(
            DiskInfo(valid_utf8(i.disk), valid_utf8(i.storage), i.shared, i.size_bytes)
            for i in vm.disk_infos
        ),
    )


def sanitise(result: ScrapeResult) -> ScrapeResult:
    """The result with every label value valid UTF-8 (in place: the result is the scrape's)."""
    # Nearly always all ASCII: one check over every string first, VM by VM only if not.
    strings = [s for vm in result.vms for s in (vm.vm, vm.name, vm.uuid)]
    strings += [d.disk for vm in result.vms for d in vm.disks]
    strings += [n.interface for vm in result.vms for n in vm.interfaces]
    strings += [s for vm in result.vms for i in vm.disk_infos for s in (i.disk, i.storage)]
    if not "".join(strings).isascii():
        result.vms = [_clean_vm(vm) for vm in result.vms]
    if result.node is not None and not result.node.version.isascii():
        node = result.node
        result.node = NodeSample(node.cpus, node.memory_bytes, valid_utf8(node.version))
    if result.cluster is not None:
        result.cluster = valid_utf8(result.cluster)
    return result
