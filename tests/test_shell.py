"""Commands built from tenant-controlled names: real bash must see exactly the intended argv."""

from __future__ import annotations

import os
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recommender.outputs.commands import UnsafeCommandError, libvirt_migrate, proxmox_migrate
from recommender.quoting import UnsafeValueError, is_active, shell_word

# Everything but NUL, which no argv can hold.
names = st.text(st.characters(blacklist_characters="\x00", codec="utf-8"), max_size=40)
ACTIVE = ["\n", "\r", "\x1b", "\x7f", "\x85", "\x9b", "\u2028", "\u2029", "\u202e", "\u2066",
          "\u2069", "\u200b", "\ufeff"]  # fmt: skip


def bash_argv(command_line: str, locale: str = "C.UTF-8") -> list[str]:
    """Let bash parse the line and print each argument NUL-terminated."""
    script = f"args() {{ printf '%s\\0' \"$@\"; }}; args {command_line}"
    env = {**os.environ, "LC_ALL": locale}
    out = subprocess.run(["bash", "-c", script], capture_output=True, check=True, env=env).stdout
    return out.decode("utf-8", "surrogateescape").split("\0")[:-1]


@settings(max_examples=150, deadline=None)
@given(names)
def test_quote_round_trips_through_bash(value: str) -> None:
    assert bash_argv(shell_word(value)) == [value]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(ACTIVE), names), max_size=6).map("".join))
def test_active_characters_never_appear_raw_and_survive_any_locale(value: str) -> None:
    word = shell_word(value)
    assert not any(is_active(ch) for ch in word)
    for locale in ("C", "C.UTF-8"):
        assert bash_argv(word, locale) == [value]


@pytest.mark.parametrize("value", ["a\x00b", "\x00", "lone \udcff"])
def test_no_word_for_nul_or_a_lone_surrogate(value: str) -> None:
    with pytest.raises(UnsafeValueError):
        shell_word(value)


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
    ["; rm -rf /", "$(reboot)", "`id`", "a'b", "-h", "--help", "x\ny", "| cat", "名前 ☃",
     "r\u202eev", "c1\x85x", "ls\u2028x"],
)  # fmt: skip
def test_hostile_domain_names(hostile: str) -> None:
    argv = bash_argv(libvirt_migrate(hostile, "kvm2", "qemu+ssh://{node}/system"))
    assert argv.count(f"--domain={hostile}") == 1
    assert len(argv) == 8


def test_proxmox_command() -> None:
    assert proxmox_migrate("101", "pve2") == "qm migrate 101 pve2 --online"
    for vmid in ("101; reboot", "١٠١", "²", "101\n", " 101", "-101", "1\x00"):
        with pytest.raises(UnsafeCommandError, match="VM "):
            proxmox_migrate(vmid, "pve2")
    for node in ("pve2 && reboot", "-pve2", "pve\n2", "pve2\u202e", ""):
        with pytest.raises(UnsafeCommandError, match="VM 101"):
            proxmox_migrate("101", node)


def test_nul_is_refused_naming_the_vm() -> None:
    with pytest.raises(UnsafeCommandError) as caught:
        libvirt_migrate("web\x00other", "kvm2", "qemu+ssh://{node}/system")
    assert str(caught.value).startswith("VM web\\x00other: its id holds a NUL byte")


@pytest.mark.parametrize("node", ["kvm 2", "kvm2/system?x", "-kvm2", "kvm\n2", "$(id)", "k@h"])
def test_libvirt_target_must_be_a_host_name(node: str) -> None:
    with pytest.raises(UnsafeCommandError, match="not a host name"):
        libvirt_migrate("web", node, "qemu+ssh://{node}/system")
