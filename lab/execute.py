"""Step 5 of the lab: the plan executed by `vmbalance apply`, and the imbalance falling in
Prometheus.

Which of the plan's migrations a product backend can carry out here: those between the
Proxmox-like nodes, through the Proxmox backend against `lab.pve_api` (real QEMU live
migrations behind Proxmox VE's migration API). A move off `lab-libvirt` cannot be: the lab
has one libvirt daemon, and a libvirt domain cannot live-migrate into a QEMU that libvirt does
not manage. Those steps are listed as not executable and left out of the plan document
`apply` is given (no step of the Proxmox-like nodes waits for them: `apply` computes what each
step waits for from the steps it is given).
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

from lab.cluster import REPO, Lab
from lab.pve_api import TOKEN_ID, LabPveApi

APPLY_TIMEOUT = 300.0


class Checks(Protocol):
    data: dict[str, Any]

    def log(self, message: str) -> None: ...

    def check(self, name: str, ok: bool, detail: str = "") -> bool: ...


def imbalance_query(capacities: Mapping[str, float], window: str = "1m") -> str:
    """The disk_bytes imbalance of `capacities`' nodes as the recommender defines it
    (max_n u[n] - sum_n load[n] / sum_n capacity[n]), over `window` rates, in PromQL."""
    nodes = "|".join(capacities)
    load = (
        f'sum by (node) (rate(vmbalance_vm_disk_read_bytes_total{{node=~"{nodes}"}}[{window}]))'
        f' + sum by (node) (rate(vmbalance_vm_disk_written_bytes_total{{node=~"{nodes}"}}'
        f"[{window}]))"
    )
    capacity = " or ".join(
        f'label_replace(vector({value:.0f}), "node", "{node}", "", "")'
        for node, value in capacities.items()
    )
    return f"max(({load}) / on (node) ({capacity})) - on () (sum({load}) / on () sum({capacity}))"


def executable(plan: Mapping[str, Any], nodes: Iterable[str]) -> tuple[list[Any], list[Any]]:
    """The plan's migrations between `nodes`, and the others."""
    inside = set(nodes)
    moves = list(plan.get("migrations", []))
    ours = [m for m in moves if m["source"] in inside and m["target"] in inside]
    return ours, [m for m in moves if m not in ours]


def run_apply(lab: Lab, config: Path, plan_path: Path, audit: Path) -> tuple[int, str]:
    """`vmbalance apply --plan PLAN --yes`: its exit status and its stderr."""
    result = subprocess.run(
        [sys.executable, "-m", "recommender.cli", "apply", "-c", str(config),
         "--plan", str(plan_path), "--yes", "--audit-log", str(audit)],
        cwd=REPO, capture_output=True, text=True, timeout=APPLY_TIMEOUT, check=False,
    )  # fmt: skip
    return result.returncode, result.stderr


def imbalance_after(lab: Lab, query: str, seconds: float) -> float | None:
    """`query` once the rates' window holds only samples taken after the move."""
    time.sleep(seconds)
    result = lab.query(query)
    return float(result[0]["value"][1]) if result else None


def execute_plan(
    lab: Lab,
    plan: Mapping[str, Any],
    config_overrides: Mapping[str, Any],
    capacities: Mapping[str, float],
    report: Checks,
) -> list[Any]:
    """Execute what the lab can of `plan` with `vmbalance apply`; the migrations executed."""
    ours, others = executable(plan, lab.pve)
    for move in others:
        report.log(
            f"not executable here: {move['vm']} {move['source']} -> {move['target']} "
            "(no second libvirt daemon; a libvirt domain cannot move into a plain QEMU node)"
        )
    report.data["apply_not_executable"] = others
    if not report.check(
        "the plan has migrations between the Proxmox-like nodes to execute",
        bool(ours),
        ", ".join(f"{m['vm']} {m['source']}->{m['target']}" for m in ours) or "none",
    ):
        return []
    query = imbalance_query(capacities)
    before = lab.query(query)
    before_value = float(before[0]["value"][1]) if before else float("nan")
    results = lab.results
    secret = secrets.token_hex(16)
    (results / "pve-token").write_text(secret + "\n")
    (results / "pve-token").chmod(0o600)
    tls_dir = lab.out / "pve-api-tls"
    tls_dir.mkdir(parents=True, exist_ok=True)
    with LabPveApi(lab.pve, lab.image, secret, tls_dir) as api:
        config = lab.write_config(
            "apply",
            {
                **config_overrides,
                "apply": {
                    "poll_interval_seconds": 0.5,
                    "max_parallel": 2,
                    "proxmox": {
                        "url": api.url,
                        "token_id": TOKEN_ID,
                        "token_secret_file": str(results / "pve-token"),
                        "verify_tls": False,
                    },
                },
            },
        )
        document = {**plan, "migrations": ours, "commands": "proxmox"}
        plan_path = results / "plan-apply.json"
        plan_path.write_text(json.dumps(document, indent=1) + "\n")
        audit = results / "apply-audit.jsonl"
        report.log(f"vmbalance apply --plan {plan_path.name}: {len(ours)} migration(s)")
        started = time.time()
        code, stderr = run_apply(lab, config, plan_path, audit)
        for line in stderr.splitlines():
            if line.startswith(("step ", "vmbalance:")) or " done" in line:
                report.log(f"  apply: {line}")
        report.data["apply_seconds"] = time.time() - started
        report.data["apply_qemu_migrations"] = api.migrations
        api_posts = api.posts("/migrate")
    records = (
        [json.loads(line) for line in audit.read_text().splitlines()] if audit.exists() else []
    )
    done = [r for r in records if r["result"] == "done"]
    report.data["apply_audit"] = records
    report.check(
        "vmbalance apply executed every step through the Proxmox API, exit 0",
        code == 0 and len(done) == len(ours) and len(api_posts) == len(ours),
        f"exit {code}; done {[(r['vm'], r['from'], r['to']) for r in done]}; "
        f"{len(api_posts)} migrate call(s); last stderr line: "
        f"{(stderr.strip().splitlines() or [''])[-1]}",
    )
    report.log(f"imbalance (disk_bytes, Proxmox-like nodes) before: {before_value:.3f}")
    # The 1m rates hold only samples from after the move a minute and two scrapes later.
    report.log("waiting for a 1m rate window after the move")
    after = imbalance_after(lab, query, 60 + 2 * lab.spec.scrape_interval)
    report.data["imbalance_promql"] = {"query": query, "before": before_value, "after": after}
    shown = "none" if after is None else f"{after:.3f}"
    print(f"  PromQL: {query}", flush=True)
    report.check(
        "Prometheus shows the imbalance falling after apply",
        after is not None and after < before_value,
        f"disk_bytes imbalance of the Proxmox-like nodes {before_value:.3f} -> {shown}",
    )
    return done
