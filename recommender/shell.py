"""Migration commands that stay one safe shell word per argument, whatever a tenant typed.

VM names and libvirt domain names are chosen by tenants. A command line built from them must
never run anything else: every argument is quoted, control characters are written with
bash's `$'…'` escapes so a newline cannot split a line, and values are passed as
`--option=value` so a name that starts with `-` cannot turn into an option.
"""

from __future__ import annotations

import re
import shlex

_PLAIN = re.compile(r"[A-Za-z0-9_./:@%+=,-]+")
_PROXMOX_NODE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?")


class UnsafeCommandError(ValueError):
    """A value cannot be expressed safely for this tool (a non-numeric Proxmox VMID, say)."""


def quote(value: str) -> str:
    """One bash word that expands to exactly `value`."""
    if value and _PLAIN.fullmatch(value):
        return value
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        escaped = []
        for ch in value:
            code = ord(ch)
            if ch in "\\'":
                escaped.append("\\" + ch)
            elif code < 0x20 or code == 0x7F:
                escaped.append(f"\\x{code:02x}")
            else:
                escaped.append(ch)
        return "$'" + "".join(escaped) + "'"
    return shlex.quote(value)


def proxmox_migrate(vmid: str, target: str) -> str:
    """`qm migrate <vmid> <node> --online` — Proxmox VMIDs are numbers, node names hostnames."""
    if not vmid.isdigit():
        raise UnsafeCommandError(f"Proxmox VMID must be a number, got {vmid!r}")
    if not _PROXMOX_NODE.fullmatch(target):
        raise UnsafeCommandError(f"Proxmox node name must be a hostname, got {target!r}")
    return f"qm migrate {vmid} {target} --online"


def libvirt_migrate(domain: str, target: str, uri_template: str) -> str:
    """`virsh migrate --live --persistent --undefinesource --domain=<vm> --desturi=<uri>`."""
    uri = uri_template.replace("{node}", target)
    return (
        "virsh migrate --live --persistent --undefinesource --verbose "
        f"--domain={quote(domain)} --desturi={quote(uri)}"
    )
