"""The plan as commands: `qm migrate`, `ha-manager migrate` or `virsh migrate` lines, and the
bash script that runs them wave by wave.

A VM with disks on local storage (moved only with `migration.local_disks: allow`) carries
`--with-local-disks` (`qm`) or `--copy-storage-all` (`virsh`); a VM the Proxmox HA stack manages
is moved with `ha-manager migrate vm:<vmid> <node>` (a live migration through the HA stack).

Every argument stays one safe shell word, whatever a tenant typed.

Every argument goes through `recommender.quoting.shell_word`; values are passed as
`--option=value` so a name that starts with `-` cannot turn into an option. What a tool cannot
take (a Proxmox VMID that is not ASCII digits, a node that is not a host name, a NUL byte)
raises `UnsafeCommandError` naming the VM: no command is better than a command for something
else.
"""

from __future__ import annotations

import re
from typing import Literal

from recommender.config import Config
from recommender.plan import Migration, Plan
from recommender.quoting import UnsafeValueError, display, shell_word
from recommender.text import HOST_NAME, in_duration

# Which tool the commands are for.
Flavour = Literal["proxmox", "libvirt"]

# A Proxmox VMID: ASCII digits only (str.isdigit() would take "١٠١" or "²").
_VMID = re.compile(r"[0-9]+")
# Proxmox node names are host names; libvirt nodes go into a URI's host part (ssh aliases may
# hold underscores). Neither may start with "-".
_PROXMOX_NODE = HOST_NAME
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


def proxmox_migrate(
    vmid: str, target: str, *, local_disks: bool = False, ha_managed: bool = False
) -> str:
    """`qm migrate <vmid> <node> --online [--with-local-disks]`, or `ha-manager migrate
    vm:<vmid> <node>` — Proxmox VMIDs are numbers, node names hostnames."""
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
    vm_word, node_word = shell_word(vmid), shell_word(target)
    if ha_managed:
        return f"ha-manager migrate {shell_word('vm:' + vmid)} {node_word}"
    flags = " --with-local-disks" if local_disks else ""
    return f"qm migrate {vm_word} {node_word} --online{flags}"


def libvirt_migrate(
    domain: str, target: str, uri_template: str, *, local_disks: bool = False
) -> str:
    """`virsh migrate --live --persistent --undefinesource [--copy-storage-all] --domain=<vm>
    --desturi=<uri>`."""
    domain_word = _word(domain, "id", domain)
    if not _URI_HOST.fullmatch(target):
        raise UnsafeCommandError(
            f"VM {display(domain)}: target node {display(target)} is not a host name, so it "
            "cannot go into the migration URI"
        )
    uri = uri_template.replace("{node}", target)
    storage = "--copy-storage-all " if local_disks else ""
    return (
        f"virsh migrate --live --persistent --undefinesource --verbose {storage}"
        f"--domain={domain_word} --desturi={_word(domain, 'migration URI', uri)}"
    )


# --- the plan's commands ---------------------------------------------------------------------


def command_flavour(plan: Plan, config: Config) -> Flavour:
    """`auto`: Proxmox when every VM in the plan has a VMID (ASCII digits), else libvirt."""
    chosen = config.output.commands
    if chosen == "proxmox" or chosen == "libvirt":
        return chosen
    vms = [m.vm for m in plan.migrations] or ["0"]
    return "proxmox" if all(is_proxmox_vmid(vm) for vm in vms) else "libvirt"


def migration_command(migration: Migration, flavour: Flavour, config: Config) -> str:
    local = migration.local_disk_bytes > 0
    if flavour == "proxmox":
        return proxmox_migrate(
            migration.vm, migration.target, local_disks=local, ha_managed=migration.ha_managed
        )
    return libvirt_migrate(
        migration.vm, migration.target, config.output.libvirt_uri, local_disks=local
    )


# Each migration's command line by step, or why it has none.
Commands = dict[int, "str | UnsafeCommandError"]
# The flavour and the command lines of one plan, built once per rendering.
PlanCommands = tuple[Flavour, Commands]


def plan_commands(plan: Plan, config: Config) -> PlanCommands:
    """The command flavour and every migration's command line, built once per rendering."""
    flavour = command_flavour(plan, config)
    commands: Commands = {}
    for migration in plan.migrations:
        try:
            commands[migration.step] = migration_command(migration, flavour, config)
        except UnsafeCommandError as exc:
            commands[migration.step] = exc
    return flavour, commands


def commands_refusal(commands: PlanCommands) -> UnsafeCommandError | None:
    """The first migration no safe command exists for, if any: then no script is written."""
    for command in commands[1].values():
        if isinstance(command, UnsafeCommandError):
            return UnsafeCommandError(f"cannot write the commands: {command}")
    return None


def render_commands(plan: Plan, config: Config, commands: PlanCommands | None = None) -> str:
    """A bash script: waves in order, the migrations of a wave in parallel, stop on failure.

    Raises UnsafeCommandError when a migration has no safe command: a script that skipped it
    would run later waves that count on it."""
    commands = commands or plan_commands(plan, config)
    refusal = commands_refusal(commands)
    if refusal is not None:
        raise refusal
    _, by_step = commands
    lines = [
        "#!/bin/bash",
        f"# vmbalance plan: {len(plan.migrations)} migration(s) in {len(plan.waves)} wave(s); "
        f"imbalance {plan.overall_before:.3f} -> {plan.overall_after:.3f}; "
        f"estimated {in_duration(plan.duration_seconds)}",
        "set -uo pipefail",
        "",
        "run_wave() {",
        "    local failed=0 pid",
        '    for pid in "$@"; do wait "$pid" || failed=1; done',
        '    if [ "$failed" -ne 0 ]; then echo "a migration failed; stopping" >&2; exit 1; fi',
        "}",
    ]
    durations = plan.wave_durations
    for number, wave in enumerate(plan.waves, start=1):
        lines += ["", f"# wave {number}: estimated {in_duration(durations[number - 1])}", "pids=()"]
        for migration in wave:
            lines.append(
                f"# {display(migration.vm)} ({display(migration.name)}): "
                f"{display(migration.source)} -> {display(migration.target)}, "
                f"estimated {in_duration(migration.duration_seconds)}"
            )
            lines.append(f"{by_step[migration.step]} &")
            lines.append('pids+=("$!")')
        lines.append('run_wave "${pids[@]}"')
    if not plan.migrations:
        lines += ["", "# nothing to do"]
    return "\n".join(lines) + "\n"


__all__ = [
    "Commands",
    "Flavour",
    "PlanCommands",
    "UnsafeCommandError",
    "command_flavour",
    "commands_refusal",
    "is_proxmox_vmid",
    "libvirt_migrate",
    "plan_commands",
    "proxmox_migrate",
    "render_commands",
]
