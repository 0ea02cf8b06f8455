"""Hostile VM ids, node names and group names in snapshots, through every output format.

The commands script is run by real bash with recording `qm` and `virsh` on PATH: nothing else
may run, and each call must be exactly the intended VM and target node — or the plan is
refused with one line naming the VM. JSON, the table and the Markdown must carry no active
character (newline, C1 control, bidi override, line separator) raw.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from markdown_it import MarkdownIt

from recommender.config import Config
from recommender.model import Snapshot, make_nodes, make_vms
from recommender.quoting import display, is_active
from recommender.snapshot import save_snapshot
from tests.conftest import REPO

pytestmark = pytest.mark.slow

GIB = 1024**3
HOSTILE = [
    "new\nline",
    "cr\rreturn",
    "$(touch pwned)",
    "`touch pwned`",
    'it\'s "quoted"',
    "c1\x85\x9bnext",
    "line\u2028sep\u2029",
    "bidi\u202eevil\u2066x\u2069",
    "\u0661\u0660\u0661",  # Arabic-Indic digits: not a VMID
    "\u00b2",
    "-rf",
    "--help",
    "tab\there ; rm -rf ~",
]
NUL = "web\x00other"
CAPS = {"cpu": 64, "memory": 512 * GIB, "disk_bytes": 1e9, "disk_ops": 5e4, "network": 1e9}
LOAD = {"cpu": 1.0, "memory": 2 * GIB, "memory_max_bytes": 2 * GIB, "disk_bytes": 1e7,
        "disk_ops": 100, "network": 1e6}  # fmt: skip


def write_snapshot(
    path: Path,
    nodes: dict[str, bool],
    vms: dict[str, str],
    config: dict[str, Any] | None = None,
) -> Path:
    """`nodes`: name -> in maintenance; `vms`: id -> node. Every VM on a maintenance node
    must move, so each hostile VM is in the plan."""
    frame = make_nodes({name: {**CAPS, "maintenance": flag} for name, flag in nodes.items()})
    rows = {vm: {**LOAD, "name": f"{vm} | display", "node": node} for vm, node in vms.items()}
    snapshot = Snapshot(nodes=frame, vms=make_vms(rows), source="test")
    settings = config or {"balance": {"max_migrations": 100}}
    save_snapshot(snapshot, path, Config.model_validate(settings))
    return path


def vmbalance(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "recommender.cli", *args],
        capture_output=True, timeout=300, cwd=REPO, check=False,
        env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip


def no_raw_active(text: str) -> bool:
    return not any(is_active(ch) for ch in text if ch != "\n")


def recorded_calls(script: str, tmp_path: Path) -> list[list[str]]:
    """Run the script with recording qm/virsh; every call's argv (tool name first)."""
    bin_dir, calls, work = tmp_path / "bin", tmp_path / "calls", tmp_path / "work"
    for directory in (bin_dir, calls, work):
        directory.mkdir()
    recorder = (
        "#!/bin/bash\n"
        f'out=$(mktemp "{calls}/call.XXXXXX")\n'
        'printf \'%s\\0\' "$(basename "$0")" "$@" > "$out"\n'
    )
    for tool in ("qm", "virsh"):
        (bin_dir / tool).write_text(recorder)
        (bin_dir / tool).chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "LC_ALL": "C"}
    done = subprocess.run(["bash", "-c", script], cwd=work, env=env, capture_output=True)
    assert done.returncode == 0, done.stderr
    assert list(work.iterdir()) == [], "the script ran something else"
    return [
        call.read_bytes().decode("utf-8", "surrogateescape").split("\0")[:-1]
        for call in calls.iterdir()
    ]


def intended(doc: dict[str, Any]) -> list[list[str]]:
    calls = []
    for m in doc["migrations"]:
        if doc["commands"] == "proxmox":
            calls.append(["qm", "migrate", m["vm"], m["target"], "--online"])
        else:
            calls.append(["virsh", "migrate", "--live", "--persistent", "--undefinesource",
                          "--verbose", f"--domain={m['vm']}",
                          f"--desturi=qemu+ssh://{m['target']}/system"])  # fmt: skip
    return calls


def check_documents(snapshot: Path, *extra: str) -> dict[str, Any]:
    """JSON, table and Markdown of the plan: strict parses, no raw active character."""
    as_json = vmbalance("plan", "-i", str(snapshot), "-o", "json", *extra)
    assert as_json.returncode == 0, as_json.stderr
    text = as_json.stdout.decode("utf-8")
    assert no_raw_active(text)
    doc = json.loads(text)
    table = vmbalance("plan", "-i", str(snapshot), *extra)
    assert table.returncode == 0, table.stderr
    assert no_raw_active(table.stdout.decode("utf-8"))
    markdown = vmbalance("plan", "-i", str(snapshot), "-o", "markdown", *extra)
    assert markdown.returncode == 0, markdown.stderr
    md_text = markdown.stdout.decode("utf-8")
    assert no_raw_active(md_text)
    html = MarkdownIt("commonmark").enable("table").render(md_text)
    assert "<script" not in html and "<a " not in html
    return doc


def run_plan_script(snapshot: Path, tmp_path: Path, *extra: str) -> dict[str, Any]:
    doc = check_documents(snapshot, *extra)
    commands = vmbalance("plan", "-i", str(snapshot), "-o", "commands", *extra)
    assert commands.returncode == 0, commands.stderr
    script = commands.stdout.decode("utf-8")
    assert script.startswith("#!/bin/bash\n") and no_raw_active(script)
    assert sorted(recorded_calls(script, tmp_path)) == sorted(intended(doc))
    return doc


def assert_refused(result: subprocess.CompletedProcess[bytes], vm: str) -> None:
    assert result.returncode == 2
    lines = result.stderr.decode("utf-8").strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("vmbalance: cannot write the commands: VM ")
    assert display(vm) in lines[0] and no_raw_active(lines[0])
    assert result.stdout == b""


def test_hostile_vm_ids_reach_virsh_as_exactly_one_domain(tmp_path: Path) -> None:
    vms = {vm: "kvm1" for vm in HOSTILE}
    snapshot = write_snapshot(tmp_path / "ids.json", {"kvm1": True, "kvm2": False,
                                                     "kvm3": False}, vms)  # fmt: skip
    doc = run_plan_script(snapshot, tmp_path)
    assert doc["commands"] == "libvirt"
    assert {m["vm"] for m in doc["migrations"]} == set(HOSTILE)


def test_a_nul_in_a_vm_id_refuses_the_script_naming_the_vm(tmp_path: Path) -> None:
    snapshot = write_snapshot(
        tmp_path / "nul.json", {"kvm1": True, "kvm2": False}, {NUL: "kvm1", "plain": "kvm1"}
    )
    assert_refused(vmbalance("plan", "-i", str(snapshot), "-o", "commands"), NUL)
    doc = check_documents(snapshot)
    by_vm = {m["vm"]: m["command"] for m in doc["migrations"]}
    assert by_vm[NUL] is None and by_vm["plain"].startswith("virsh migrate")
    markdown = vmbalance("plan", "-i", str(snapshot), "-o", "markdown").stdout.decode()
    assert "No commands: cannot write the commands: VM web\\\\x00other" in markdown
    assert "virsh migrate" not in markdown


def test_ids_that_are_not_ascii_digits_are_no_proxmox_vmids(tmp_path: Path) -> None:
    vms = {"101": "pve1", "\u0661\u0660\u0662": "pve1", "\u00b2": "pve1"}
    snapshot = write_snapshot(tmp_path / "digits.json", {"pve1": True, "pve2": False}, vms)
    doc = run_plan_script(snapshot, tmp_path)  # auto: libvirt, since not all are VMIDs
    assert doc["commands"] == "libvirt"
    forced = vmbalance("plan", "-i", str(snapshot), "-o", "commands", "--commands", "proxmox")
    assert_refused(forced, "\u0661\u0660\u0662" if "\u0661" in forced.stderr.decode() else "²")


def test_hostile_source_node_names_stay_in_their_comments(tmp_path: Path) -> None:
    nodes = {name: True for name in [*HOSTILE, "nul\x00node"]}
    nodes |= {"pve2": False, "pve3": False}
    vms = {str(101 + i): name for i, name in enumerate(n for n in nodes if nodes[n])}
    snapshot = write_snapshot(tmp_path / "nodes.json", nodes, vms)
    doc = run_plan_script(snapshot, tmp_path)
    assert doc["commands"] == "proxmox"
    assert {m["source"] for m in doc["migrations"]} == {n for n in nodes if nodes[n]}


@pytest.mark.parametrize("target", ["pve2\n$(touch pwned)", "-pve2", "pve\u202e2", "١"])
def test_a_hostile_target_node_refuses_the_script(tmp_path: Path, target: str) -> None:
    snapshot = write_snapshot(tmp_path / "target.json", {"pve1": True, target: False},
                              {"101": "pve1"})  # fmt: skip
    assert_refused(vmbalance("plan", "-i", str(snapshot), "-o", "commands"), "101")
    libvirt = vmbalance("plan", "-i", str(snapshot), "-o", "commands", "--commands", "libvirt")
    assert_refused(libvirt, "101")


def test_hostile_group_names_are_data(tmp_path: Path) -> None:
    """Anti-affinity groups named by an admin, already broken: the repairs name the group in
    their reason (table, Markdown, JSON); the script moves exactly the intended VMs."""
    groups = [{"name": name, "vms": [f"{200 + 2 * i}", f"{201 + 2 * i}"]}
              for i, name in enumerate(HOSTILE)]  # fmt: skip
    vms = {vm: "pve1" for group in groups for vm in group["vms"]}
    config = {"rules": {"anti_affinity": groups}, "balance": {"max_migrations": 100}}
    snapshot = write_snapshot(tmp_path / "groups.json", {"pve1": False, "pve2": False,
                                                        "pve3": False}, vms, config)  # fmt: skip
    doc = run_plan_script(snapshot, tmp_path)
    reasons = " ".join(m["reason"] for m in doc["migrations"])
    assert all(f"anti-affinity {name}" in reasons for name in HOSTILE)
