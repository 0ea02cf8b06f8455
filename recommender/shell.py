"""Migration commands that stay one safe shell word per argument, whatever a tenant typed.

Every argument goes through `recommender.quoting.shell_word`; values are passed as
`--option=value` so a name that starts with `-` cannot turn into an option. What a tool cannot
take (a Proxmox VMID that is not ASCII digits, a node that is not a host name, a NUL byte)
raises `UnsafeCommandError` naming the VM: no command is better than a command for something
else.
"""

from __future__ import annotations

import re

from recommender.quoting import UnsafeValueError, display, shell_word

# A Proxmox VMID: ASCII digits only (str.isdigit() would take "١٠١" or "²").
_VMID = re.compile(r"[0-9]+")
# Proxmox node names are host names; libvirt nodes go into a URI's host part (ssh aliases may
# hold underscores). Neither may start with "-".
_PROXMOX_NODE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?")
_URI_HOST = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?")


class UnsafeCommandError(ValueError):
    """No safe command exists for this migration; the message names the VM."""


def is_proxmox_vmid(vm: str) -> bool:
    return _VMID.fullmatch(vm) is not None


def _word(vm: str, what: str, value: str) -> str:
    try:
        return shell_word(value)
    except UnsafeValueError as exc:
        raise UnsafeCommandError(f"VM {display(vm)}: its {what} {exc}") from None


def proxmox_migrate(vmid: str, target: str) -> str:
    """`qm migrate <vmid> <node> --online` — Proxmox VMIDs are numbers, node names hostnames."""
    _word(vmid, "id", vmid)
    if not is_proxmox_vmid(vmid):
        raise UnsafeCommandError(
            f"VM {display(vmid)}: a Proxmox VMID is ASCII digits only (set output.commands: "
            "libvirt for libvirt domain names)"
        )
    if not _PROXMOX_NODE.fullmatch(target):
        raise UnsafeCommandError(
            f"VM {display(vmid)}: target node {display(target)} is not a Proxmox node name "
            "(a host name)"
        )
    return f"qm migrate {vmid} {target} --online"


def libvirt_migrate(domain: str, target: str, uri_template: str) -> str:
    """`virsh migrate --live --persistent --undefinesource --domain=<vm> --desturi=<uri>`."""
    domain_word = _word(domain, "id", domain)
    if not _URI_HOST.fullmatch(target):
        raise UnsafeCommandError(
            f"VM {display(domain)}: target node {display(target)} is not a host name, so it "
            "cannot go into the migration URI"
        )
    uri = uri_template.replace("{node}", target)
    return (
        "virsh migrate --live --persistent --undefinesource --verbose "
        f"--domain={domain_word} --desturi={_word(domain, 'migration URI', uri)}"
    )


__all__ = ["UnsafeCommandError", "is_proxmox_vmid", "libvirt_migrate", "proxmox_migrate"]
