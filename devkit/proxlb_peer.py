"""ProxLB, the open-source Proxmox balancer, run on a seeded cluster for the side-by-side
benchmark: its own code, installed in a scratch venv from `requirements/proxlb.txt` (pinned,
hash-checked), reading the cluster from the loopback fake of the Proxmox VE API
(`devkit.fake_pve`), in its dry-run JSON mode so it migrates nothing.

A cluster of `devkit.instances` becomes the fake's nodes and VMs: capacity, CPU, memory (used
and assigned), disk and network rates; the rules become ProxLB's tags, as its documentation
describes them: `plb_pin_<node>` (one per allowed node of a pin), `plb_ignore` (excluded),
`plb_affinity_<group>` and `plb_anti_affinity_<group>`. The snapshot has no vCPU count, so a
VM's vCPUs are its CPU load over 0.6 (the busiest share per vCPU the generator draws),
rounded up.

One ProxLB run gives both of its plans: the greedy one (each guest's `node_target` in the JSON
it prints) and, with its optional CP-SAT solver enabled in shadow mode, the solver's plan (the
`plan_step` events of the run log the solver writes). The greedy plan is computed before the
solver runs and does not depend on it.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devkit.fake_pve import FakeNode, FakePVE, FakeVM
from devkit.instances import Instance
from devkit.locked_venv import REPO, _uv

LOCK = REPO / "requirements" / "proxlb.txt"
VENV = REPO / ".tools" / "proxlb"
USER, TOKEN_ID, SECRET = "root@pam", "bench", "0d6f5c8e-proxlb-bench-token"
CPU_PER_VCPU = 0.6


def installed_python(venv: Path = VENV) -> Path:
    """The scratch venv's python with ProxLB installed from the lock; installed when the venv
    is missing or was installed from another lock."""
    digest = hashlib.sha256(LOCK.read_bytes()).hexdigest()
    stamp = venv / ".lock-sha256"
    python = venv / "bin" / "python"
    if stamp.exists() and stamp.read_text() == digest and python.exists():
        return python
    shutil.rmtree(venv, ignore_errors=True)
    _uv("venv", "--quiet", "--python", sys.executable, str(venv))
    _uv("pip", "install", "--quiet", "--python", str(python), "--compile-bytecode",
        "--require-hashes", "-r", str(LOCK))  # fmt: skip
    stamp.write_text(digest)
    return python


def proxlb_version(python: Path) -> str:
    done = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('proxlb'), "
         "m.version('proxlb-solver'))"],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    proxlb, solver = done.stdout.split()
    return f"proxlb {proxlb}, proxlb-solver {solver}"


@dataclass
class FakeCluster:
    """An instance as the fake serves it."""

    nodes: dict[str, FakeNode]
    vms: dict[int, FakeVM]
    maintenance: list[str]
    vm_of_name: dict[str, str] = field(default_factory=dict)  # guest name -> snapshot VM id


def _finite(value: object) -> float:
    number = float(value)  # type: ignore[arg-type]
    return number if math.isfinite(number) else 0.0


def _tags(instance: Instance) -> dict[str, list[str]]:
    rules = instance.config.rules
    groups = rules.node_groups
    tags: dict[str, list[str]] = {}
    for vm, where in rules.pin.items():
        tags.setdefault(vm, []).extend(f"plb_pin_{node}" for node in groups.get(where, [where]))
    for vm in rules.exclude:
        tags.setdefault(vm, []).append("plb_ignore")
    for group in rules.affinity:
        for vm in group.vms:
            tags.setdefault(vm, []).append(f"plb_affinity_{group.name}")
    for group in rules.anti_affinity:
        for vm in group.vms:
            tags.setdefault(vm, []).append(f"plb_anti_affinity_{group.name}")
    return tags


def fake_cluster(instance: Instance) -> FakeCluster:
    snapshot = instance.snapshot
    nodes = {
        str(name): FakeNode(maxcpu=int(row["cpu"]), maxmem=int(row["memory"]))
        for name, row in snapshot.nodes.iterrows()
    }
    tags = _tags(instance)
    vms: dict[int, FakeVM] = {}
    names: dict[str, str] = {}
    for vm_id, row in snapshot.vms.iterrows():
        cores = _finite(row["cpu"])
        name = str(row["name"])
        vms[int(str(vm_id))] = FakeVM(
            node=str(row["node"]),
            name=name,
            cpus=max(1, math.ceil(cores / CPU_PER_VCPU)),
            cpu_cores=cores,
            mem=int(_finite(row["memory"])),
            maxmem=int(_finite(row["memory_max_bytes"])),
            maxdisk=32 * 2**30,
            diskread=_finite(row["disk_bytes"]) / 2,
            diskwrite=_finite(row["disk_bytes"]) / 2,
            netin=_finite(row["network"]) / 2,
            netout=_finite(row["network"]) / 2,
            tags=tuple(tags.get(str(vm_id), ())),
        )
        names[name] = str(vm_id)
    down = [str(n) for n in snapshot.nodes.index[snapshot.nodes["maintenance"].to_numpy(bool)]]
    return FakeCluster(nodes, vms, down, names)


@dataclass(frozen=True)
class ProxlbPlan:
    """One of ProxLB's plans: its migrations in order, (VM id, target node)."""

    moves: tuple[tuple[str, str], ...]
    status: str = ""  # the solver's status (OPTIMAL, FEASIBLE, INFEASIBLE, ...)
    seconds: float = 0.0  # the solver's wall time

    def final_nodes(self) -> dict[str, str]:
        return dict(self.moves)


@dataclass(frozen=True)
class ProxlbRun:
    greedy: ProxlbPlan
    solver: ProxlbPlan
    seconds: float  # the whole run: reading the cluster, greedy, solver
    requests: int  # API requests ProxLB made


def _config(url: str, work: Path, maintenance: list[str], solver: bool) -> dict[str, Any]:
    """ProxLB's config: its defaults, except what a one-shot dry run against the fake needs."""
    return {
        "proxmox_api": {
            "hosts": [url.removeprefix("https://")],
            "user": USER,
            "token_id": TOKEN_ID,
            "token_secret": SECRET,
            "ssl_verification": False,  # the fake's certificate is self-signed, without SAN
            "timeout": 10,
        },
        "proxmox_cluster": {"maintenance_nodes": maintenance},
        "balancing": {"enable": True},
        "service": {"daemon": False, "log_level": "WARNING"},
        "solver": {"enable": solver, "mode": "shadow", "log_dir": str(work / "solver")},
    }


def _printed_json(stdout: str) -> dict[str, Any]:
    """The JSON document ProxLB prints with --json, among its log lines."""
    lines = stdout.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.rstrip("\n") == "{":
            document, _ = json.JSONDecoder().raw_decode("".join(lines[i:]))
            return dict(document)
    raise RuntimeError(f"ProxLB printed no JSON document: {stdout[-2000:]}")


def _solver_plan(work: Path, vm_of_name: dict[str, str]) -> ProxlbPlan:
    runs = sorted((work / "solver").glob("solver_run_*.jsonl"))
    if not runs:
        raise RuntimeError("the ProxLB solver wrote no run log")
    events = [json.loads(line) for line in runs[-1].read_text().splitlines() if line.strip()]
    status, seconds, moves = "no run", 0.0, []
    for event in events:
        if event["event"] == "solver_run":
            status, seconds = str(event["status"]), float(event["wall_time_ms"]) / 1000
        elif event["event"] == "plan_step":
            moves.append((vm_of_name[event["vm"]], str(event["target"])))
        elif event["event"] == "error":
            status = f"error: {event['message']}"
    return ProxlbPlan(tuple(moves), status, seconds)


def run_proxlb(
    python: Path, instance: Instance, work: Path, tls: ssl.SSLContext, timeout: float = 600
) -> ProxlbRun:
    """ProxLB's greedy and solver plans for `instance`, read from the fake over HTTPS."""
    cluster = fake_cluster(instance)
    work.mkdir(parents=True, exist_ok=True)
    with FakePVE(cluster.vms, f"{USER}!{TOKEN_ID}={SECRET}", tls, nodes=cluster.nodes) as pve:
        config = work / "proxlb.yaml"
        config.write_text(json.dumps(_config(pve.url, work, cluster.maintenance, solver=True)))
        started = time.perf_counter()
        done = subprocess.run(
            [str(python), "-m", "proxlb", "--config", str(config), "--dry-run", "--json"],
            capture_output=True, text=True, timeout=timeout, cwd=work, check=False,
        )  # fmt: skip
        seconds = time.perf_counter() - started
        requests = len(pve.calls)
        migrations = pve.posts("/migrate")
    (work / "proxlb.out").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(
            f"ProxLB exited {done.returncode}: {(done.stdout + done.stderr)[-2000:]}"
        )
    if migrations:
        raise RuntimeError(f"ProxLB asked for {len(migrations)} migrations in a dry run")
    guests = _printed_json(done.stdout)["guests"]
    greedy = tuple(
        (cluster.vm_of_name[name], str(guest["node_target"]))
        for name, guest in sorted(guests.items(), key=lambda item: int(item[1]["id"]))
        if guest["node_target"] != guest["node_current"]
    )
    return ProxlbRun(ProxlbPlan(greedy), _solver_plan(work, cluster.vm_of_name), seconds, requests)
