"""Commands built from tenant-controlled names: real bash must see exactly the intended argv."""

from __future__ import annotations

import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recommender.shell import UnsafeCommandError, libvirt_migrate, proxmox_migrate, quote

# Everything but NUL, which no argv can hold.
names = st.text(st.characters(blacklist_characters="\x00", codec="utf-8"), max_size=40)


def bash_argv(command_line: str) -> list[str]:
    """Let bash parse the line and print each argument NUL-terminated."""
    script = f"args() {{ printf '%s\\0' \"$@\"; }}; args {command_line}"
    out = subprocess.run(["bash", "-c", script], capture_output=True, check=True).stdout
    return out.decode("utf-8", "surrogateescape").split("\0")[:-1]


@settings(max_examples=150, deadline=None)
@given(names)
def test_quote_round_trips_through_bash(value: str) -> None:
    assert bash_argv(quote(value)) == [value]


@settings(max_examples=100, deadline=None)
@given(names)
def test_libvirt_command_keeps_the_domain_one_argument(domain: str) -> None:
    command = libvirt_migrate(domain, "kvm2", "qemu+ssh://{node}/system")
    assert "\n" not in command
    argv = bash_argv(command)
    assert argv[0] == "virsh" and argv[1] == "migrate"
    assert f"--domain={domain}" in argv
    assert "--desturi=qemu+ssh://kvm2/system" in argv


@pytest.mark.parametrize(
    "hostile",
    ["; rm -rf /", "$(reboot)", "`id`", "a'b", "-h", "--help", "x\ny", "| cat", "名前 ☃"],
)
def test_hostile_domain_names(hostile: str) -> None:
    argv = bash_argv(libvirt_migrate(hostile, "kvm2", "qemu+ssh://{node}/system"))
    assert argv.count(f"--domain={hostile}") == 1
    assert len(argv) == 8


def test_proxmox_command() -> None:
    assert proxmox_migrate("101", "pve2") == "qm migrate 101 pve2 --online"
    with pytest.raises(UnsafeCommandError):
        proxmox_migrate("101; reboot", "pve2")
    with pytest.raises(UnsafeCommandError):
        proxmox_migrate("101", "pve2 && reboot")
