"""The full lab: real QEMU guests on a private libvirtd and two Proxmox-like nodes, the whole
vmbalance chain on top, checked end to end (`python -m lab.run`).

1. Nine guests write and read their disks at their own rates: five on `lab-libvirt` (a
   private libvirtd), two on `lab-pve`, two on `lab-pve2` (plain QEMU laid out like
   Proxmox). `lab-libvirt` carries most of the I/O and is over its disk capacity, and so is
   the small `lab-pve2` with guest 103 on it.
2. One vmbalance-exporter per node and a Prometheus scraping them; Debian's
   prometheus-libvirt-exporter on the same libvirtd.
3. While the window fills: both libvirt exporters scraped in alternation; the counters must
   agree and the scrape times go to docs/benchmarks.md.
4. Once every guest has run a full window: `vmbalance snapshot` must measure each guest's
   disk rate within 20 % of what it was configured to do, and `vmbalance plan` must move
   I/O off `lab-libvirt`.
5. `vmbalance apply` executes the plan's migrations between the Proxmox-like nodes (the
   moves off `lab-libvirt` have no backend here: see `lab.execute`) through its Proxmox
   backend, against Proxmox VE's migration API served over the real QEMU nodes
   (`lab.pve_api`: each task a real live migration over QMP). The plan must move 103 off
   `lab-pve2`; afterwards a PromQL query must show the imbalance of the Proxmox-like nodes
   falling (printed before and after), the next snapshot must show 103 on `lab-pve` with its
   migration time and its rate still within 20 %, Prometheus must show its node label
   change, and the next plan must leave it there.

Results go to `lab-out/results/` (snapshots, plans, report.json), logs to `lab-out/logs/`.
The exit status is 0 only when every check passed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.docs_section import replace_section
from lab.cluster import REPO, Lab, LabGuest, LabSpec, RateCheck
from lab.execute import execute_plan
from lab.guest import GuestBuildError, GuestImage, GuestLoad, default_cache_dir, ensure_guest
from lab.scrape import PeerComparison, compare_with_peer, libvirt_call_costs

MIB = 1024 * 1024
RATE_TOLERANCE = 0.20
HEAVY_NODE = "lab-libvirt"
MIGRATED_VM = "103"
MIGRATION = ("lab-pve2", "lab-pve")
DOCS_HEADING = "Lab: real libvirtd, vmbalance-exporter vs prometheus-libvirt-exporter"
COMMAND = "make lab  # .venv/bin/python -m lab.run"


def full_spec(scrape_interval: int) -> LabSpec:
    """Nine guests, three nodes; `lab-pve2` is small, so guest 103 on it overloads it."""

    def guest(vm: str, node: str, write: int, read: int, name: str = "") -> LabGuest:
        return LabGuest(vm=vm, node=node, load=GuestLoad(write_kib=write, read_kib=read), name=name)

    guests = (
        guest("lab-db-1", HEAVY_NODE, 3072, 1024),
        guest("lab-db-2", HEAVY_NODE, 2048, 1024),
        guest("lab-files-1", HEAVY_NODE, 2560, 512),
        guest("lab-web-1", HEAVY_NODE, 1024, 512),
        guest("lab-cache-1", HEAVY_NODE, 512, 256),
        guest("101", "lab-pve", 512, 256, "app-101"),
        guest("102", "lab-pve", 256, 256, "app-102"),
        guest(MIGRATED_VM, "lab-pve2", 2048, 512, "batch-103"),
        guest("201", "lab-pve2", 256, 128, "mon-201"),
    )
    block = 64 * 1024
    config = {
        "query": {"window": "2m", "short_window": "30s", "history": "10m"},
        # 10 MiB/s per node: lab-libvirt's guests do 12.25. lab-pve2 takes 2 MiB/s only.
        "capacity": {
            "disk_bytes": 10 * MIB,
            "disk_ops": 10 * MIB / block,
            "network": 1.25e9,
            "per_node": {"lab-pve2": {"disk_bytes": 2 * MIB, "disk_ops": 2 * MIB / block}},
        },
        # Every node is the same host: its memory says nothing; its CPU is TCG's work.
        "balance": {
            "cooldown_seconds": 600,
            "weights": {
                "cpu": 1.0,
                "memory": 0.0,
                "disk_bytes": 2.0,
                "disk_ops": 1.0,
                "network": 0.0,
            },
        },
    }
    return LabSpec(
        guests=guests,
        pve_nodes=("lab-pve", "lab-pve2"),
        libvirt_node=HEAVY_NODE,
        scrape_interval=scrape_interval,
        config=config,
    )


@dataclass
class Report:
    """Checks and measurements of one run, printed as they come and saved as JSON."""

    started: float = field(default_factory=time.time)
    checks: list[dict[str, Any]] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    def log(self, message: str) -> None:
        print(f"[{time.time() - self.started:6.1f}s] {message}", flush=True)

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append({"check": name, "ok": ok, "detail": detail})
        self.log(f"{'PASS' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}")
        return ok

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c["ok"] for c in self.checks)

    def save(self, path: Path) -> None:
        body = {"passed": self.passed, "checks": self.checks, **self.data}
        path.write_text(json.dumps(body, indent=2, default=str) + "\n")


def rate_lines(checks: list[RateCheck]) -> list[str]:
    return [
        f"  {c.vm:>12} on {c.node:<11} configured {c.configured / 1024:7.0f} KiB/s  measured "
        + (
            f"{c.measured / 1024:7.0f} KiB/s ({c.ratio:.3f})"
            if c.measured is not None and c.ratio is not None
            else "none"
        )
        for c in checks
    ]


def wait(seconds: float, report: Report, why: str) -> None:
    if seconds > 0:
        report.log(f"waiting {seconds:.0f}s: {why}")
        time.sleep(seconds)


def first_plan_checks(plan: dict[str, Any], report: Report) -> None:
    moves = plan.get("migrations", [])
    off = [m for m in moves if m["source"] == HEAVY_NODE]
    report.check(
        "plan moves I/O off the heavy node",
        plan.get("triggered", False) and bool(off),
        ", ".join(f"{m['vm']} {m['source']}->{m['target']}" for m in moves) or "no migrations",
    )
    node = next((n for n in plan.get("nodes", []) if n["node"] == HEAVY_NODE), None)
    disk = (node or {}).get("resources", {}).get("disk_bytes", {})
    before, after = disk.get("utilisation_before"), disk.get("utilisation_after")
    report.check(
        f"{HEAVY_NODE} over its disk capacity before, less loaded after",
        before is not None and after is not None and before > 1.0 and after < before,
        f"disk_bytes utilisation {before} -> {after}",
    )


def migration_checks(
    lab: Lab, report: Report, plan: dict[str, Any], config: Path, since: float
) -> None:
    source, target = MIGRATION
    moves = {m["vm"]: (m["source"], m["target"]) for m in plan.get("migrations", [])}
    report.check(
        f"the plan moves {MIGRATED_VM} off the overloaded {source}",
        moves.get(MIGRATED_VM, ("", ""))[0] == source,
        f"{MIGRATED_VM}: {moves.get(MIGRATED_VM, 'not moved')}",
    )
    slept = lab.wait_history_step(lab.io_seen_at)
    if slept:
        report.log(f"waited {slept:.0f}s for a history step to see {MIGRATED_VM} on {source}")
    pve = lab.spec.config["capacity"]
    capacities = {
        node: float(pve.get("per_node", {}).get(node, {}).get("disk_bytes", pve["disk_bytes"]))
        for node in lab.pve
    }
    done = execute_plan(lab, plan, {}, capacities, report)
    target = next((r["to"] for r in done if r["vm"] == MIGRATED_VM), target)
    qemu = report.data.get("apply_qemu_migrations", [])
    report.data["migration"] = next((m for m in qemu if m["vm"] == MIGRATED_VM), None)
    snapshot_path, snapshot = lab.wait_placed(MIGRATED_VM, target, config, "after-migration")
    row = next(r for r in snapshot["vms"] if r["vm"] == MIGRATED_VM)
    report.check(
        "snapshot places the migrated VM on its new node with its migration time",
        row["node"] == target and row["last_migration"] is not None,
        f"node {row['node']}, last_migration {row['last_migration']}",
    )
    history = lab.node_history(MIGRATED_VM, since)
    report.data["node_history"] = history
    report.check(
        "Prometheus history shows the node label change",
        [h["node"] for h in history][-2:] == [source, target],
        " then ".join(f"{h['node']}" for h in history),
    )
    snapshot_path, snapshot = lab.snapshot("after-migration", config)
    rates = {c.vm: c for c in lab.rate_checks(snapshot)}
    moved = rates[MIGRATED_VM]
    report.data["rate_after_migration"] = moved.as_dict()
    report.check(
        "migrated VM's rate (window spanning the move) within 20 %",
        moved.within(RATE_TOLERANCE),
        rate_lines([moved])[0].strip(),
    )
    _, held = lab.plan("after-migration", config, snapshot_path)
    held_moves = [m["vm"] for m in held.get("migrations", [])]
    report.data["plan_after_migration"] = {
        "migrations": held_moves,
        "held_back": held.get("held_back", []),
    }
    report.check(
        "the next plan leaves the migrated VM where apply put it",
        MIGRATED_VM not in held_moves,
        f"migrations {held_moves}",
    )


def machine() -> dict[str, str]:
    """What the numbers were measured on."""
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

    def version(argv: list[str]) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        except OSError:
            return "unknown"
        return (
            (out.stdout or out.stderr).splitlines()[0].strip() if out.stdout or out.stderr else ""
        )

    return {
        "cores": str(os.cpu_count()),
        "cpu": cpu,
        "memory_gib": f"{memory / 1024**3:.0f}",
        "python": platform.python_version(),
        "qemu": version(["qemu-system-x86_64", "--version"]),
        "libvirtd": version([shutil.which("libvirtd") or "libvirtd", "--version"]),
        "peer": version(["dpkg-query", "-W", "-f=${Version}", "prometheus-libvirt-exporter"]),
    }


def docs_section(report: Report, peer: PeerComparison, rates: list[RateCheck]) -> str:
    """The benchmarks.md section: how it was run, scrape times, agreement, guest rates."""
    facts = report.data["machine"]
    result = peer.as_dict()
    migration = report.data.get("migration", {})
    guests = len(rates)
    lines = [
        f"The whole chain on real guests: {guests} QEMU guests under TCG (Debian's cloud kernel "
        "and a busybox initramfs that reads and writes its virtio disk with direct I/O at a rate "
        f"set on its kernel command line), {report.data['libvirt_domains']} of them on a private "
        "libvirtd (session mode, its own socket and state directory), the others on two "
        "Proxmox-like nodes of plain QEMU processes; one vmbalance-exporter per node, "
        f"Prometheus scraping every {report.data['scrape_interval']} s, and Debian's "
        "prometheus-libvirt-exporter on the same libvirtd.",
        "",
        f"- Command: `{COMMAND}`",
        f"- Date: {datetime.fromtimestamp(report.started, UTC).date().isoformat()}",
        f"- Machine: {facts['cores']} cores ({facts['cpu']}), {facts['memory_gib']} GiB RAM, "
        f"no KVM for the guests (TCG); {facts['qemu']}; {facts['libvirtd']}; "
        f"prometheus-libvirt-exporter {facts['peer']}; guest kernel {report.data['kernel']}",
        "",
        f"Scrape time over loopback HTTP with {report.data['libvirt_domains']} domains on the "
        "libvirtd, "
        f"{result['rounds']} rounds of three scrapes (ours, peer, ours or the reverse, "
        "alternating):",
        "",
        "| exporter | scrapes | median (ms) | p95 (ms) |",
        "| --- | ---: | ---: | ---: |",
        f"| vmbalance-exporter | {len(peer.ours_ms)} | {result['ours_median_ms']:.1f} | "
        f"{result['ours_p95_ms']:.1f} |",
        f"| prometheus-libvirt-exporter | {len(peer.peer_ms)} | {result['peer_median_ms']:.1f} | "
        f"{result['peer_p95_ms']:.1f} |",
        "",
        "Where the time goes: the libvirt calls behind each exporter's counters, timed alone "
        "over one connection (median ms):",
        "",
        "| call | median (ms) |",
        "| --- | ---: |",
        *(
            f"| `{name}` | {value:.1f} |"
            for name, value in report.data.get("libvirt_call_costs_ms", {}).items()
        ),
        "",
        "`bulk` is one `getAllDomainStats` call with every stat group that carries figures "
        "of the metric contract; `bulk:GROUP` is one group alone; the last row is "
        "`virDomainGetInfo` and `virDomainBlockStats` for every domain, where "
        "prometheus-libvirt-exporter's counters come from. `BLOCK` and `VCPU` also return what "
        "neither exporter needs (each disk's capacity and allocation, per-vCPU state and "
        "times), which on a node this small costs more than one round trip saves, so "
        "vmbalance-exporter asks the bulk call only for `STATE`, `BALLOON` and `INTERFACE` and "
        "reads CPU time and disks per domain, several domains at once.",
        "",
        "Counter agreement: in every round the middle exporter's value of each counter (bytes "
        "and requests written and read per disk, CPU seconds per domain) must lie between the "
        "outer exporter's two values, since counters only grow; that needs no tolerance for "
        f"the I/O done between scrapes. {result['checked']} checks over {result['counters']} "
        f"counters: {len(peer.violations)} outside. Adjacent scrapes (median "
        f"{result['median_gap_ms']:.0f} ms apart) gave identical values "
        f"{result['exact_adjacent']} of {result['adjacent']} times; the largest difference was "
        f"{result['worst_diff_seconds_of_io']:.2f} s of that counter's average rate (the guests "
        "write in bursts every 0.5 s).",
        "",
        "Disk rate of each guest (read + written) as configured and as `vmbalance snapshot` "
        "measured it over its 2-minute window:",
        "",
        "| guest | node | configured (KiB/s) | measured (KiB/s) | measured / configured |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for check in rates:
        measured = "–" if check.measured is None else f"{check.measured / 1024:.0f}"
        ratio = "–" if check.ratio is None else f"{check.ratio:.3f}"
        lines.append(
            f"| {check.vm} | {check.node} | {check.configured / 1024:.0f} | {measured} | {ratio} |"
        )
    if migration:
        after = report.data.get("rate_after_migration", {})
        ratio = after.get("ratio")
        lines += [
            "",
            f"Live migration of guest {migration['vm']} from {migration['source']} to "
            f"{migration['target']} by `vmbalance apply` (Proxmox API, QMP underneath): "
            f"{migration['total_time_ms']} ms, downtime "
            f"{migration['downtime_ms']} ms; its rate over a window spanning the move: "
            + (f"{ratio:.3f} of configured." if ratio is not None else "not measured."),
        ]
    passed = sum(1 for c in report.checks if c["ok"])
    lines += [
        "",
        f"Checks passed: {passed} of {len(report.checks)} (`lab-out/results/report.json`).",
    ]
    return "\n".join(lines)


@dataclass
class Observed:
    """What the run has measured so far, for the docs section."""

    peer: PeerComparison | None = None
    rates: list[RateCheck] = field(default_factory=list)


def run(args: argparse.Namespace) -> int:
    report = Report()
    out = Path(args.out).resolve()
    if out.exists():
        shutil.rmtree(out)
    (out / "results").mkdir(parents=True)
    report.log(f"guest kernel and initramfs (cache {args.cache_dir})")
    try:
        image = ensure_guest(Path(args.cache_dir), refresh=args.refresh_kernel)
    except GuestBuildError as exc:
        print(f"lab: {exc}", file=sys.stderr)
        return 2
    spec = full_spec(args.scrape_interval)
    describe_lab(report, spec, image)
    observed = Observed()
    try:
        report.log("starting libvirtd, guests, exporters and Prometheus")
        with Lab(spec, out, image) as lab:
            run_checks(lab, spec, args.peer_rounds, report, observed)
    except Exception as exc:
        report.check("lab ran to the end", False, f"{type(exc).__name__}: {exc}")
    finally:
        report.save(out / "results" / "report.json")
    if args.docs and observed.peer is not None and report.passed:
        replace_section(DOCS_HEADING, docs_section(report, observed.peer, observed.rates))
        report.log(f"wrote the '{DOCS_HEADING}' section of docs/benchmarks.md")
    elif args.docs:
        report.log("docs/benchmarks.md left alone: not every check passed")
    passed = sum(1 for c in report.checks if c["ok"])
    report.log(f"{passed} passed, {len(report.checks) - passed} failed")
    return 0 if report.passed else 1


def describe_lab(report: Report, spec: LabSpec, image: GuestImage) -> None:
    report.data.update(
        kernel=image.kernel_version,
        scrape_interval=spec.scrape_interval,
        libvirt_domains=sum(g.node == HEAVY_NODE for g in spec.guests),
        machine=machine(),
        guests=[
            {"vm": g.vm, "node": g.node, "write_kib": g.load.write_kib, "read_kib": g.load.read_kib}
            for g in spec.guests
        ],
    )


def run_checks(
    lab: Lab, spec: LabSpec, peer_rounds: int, report: Report, observed: Observed
) -> None:
    """Steps 3 to 5 of the module's description, on a started lab."""
    assert lab.libvirtd is not None and lab.peer_url is not None
    report.log(f"private libvirtd: {lab.libvirtd.uri}")
    since = time.time()
    lab.wait_for_io()
    report.log("every guest is writing")
    config = lab.write_config("lab")
    window_full = lab.io_seen_at + 120 + 3 * spec.scrape_interval

    observed.peer = exporter_checks(lab, peer_rounds, report)
    wait(window_full - time.time(), report, "until every guest has run a full window")
    observed.rates = rate_checks(lab, config, report)
    _, plan = lab.plan("before", config)
    report.data["plan_before"] = {
        "migrations": plan.get("migrations", []),
        "imbalance": plan.get("imbalance"),
    }
    first_plan_checks(plan, report)
    migration_checks(lab, report, plan, config, since)


def exporter_checks(lab: Lab, rounds: int, report: Report) -> PeerComparison:
    """Both libvirt exporters scraped in alternation, and what the libvirt calls cost."""
    assert lab.libvirtd is not None and lab.peer_url is not None
    report.log(f"comparing the exporters on the libvirtd ({rounds} rounds)")
    peer = compare_with_peer(lab.exporter_url(HEAVY_NODE), lab.peer_url, rounds)
    report.data["peer_comparison"] = peer.as_dict()
    report.check(
        "vmbalance-exporter and prometheus-libvirt-exporter report the same counters",
        peer.agree,
        f"{peer.checked} sandwich checks, {len(peer.violations)} outside; median scrape "
        f"ours {peer.as_dict()['ours_median_ms']:.1f} ms, peer "
        f"{peer.as_dict()['peer_median_ms']:.1f} ms",
    )

    costs = libvirt_call_costs(lab.libvirtd.uri)
    report.data["libvirt_call_costs_ms"] = costs
    report.log(
        "libvirt calls (median ms): "
        + ", ".join(f"{name} {value:.1f}" for name, value in costs.items())
    )
    return peer


def rate_checks(lab: Lab, config: Path, report: Report) -> list[RateCheck]:
    """Every guest's disk rate in the snapshot against the rate it was configured to do."""
    _, snapshot = lab.snapshot("before", config)
    rates = lab.rate_checks(snapshot)
    report.data["rates"] = [c.as_dict() for c in rates]
    print("\n".join(rate_lines(rates)), flush=True)
    report.check(
        "every guest's measured disk rate within 20 % of its configured rate",
        all(c.within(RATE_TOLERANCE) for c in rates),
        "ratios " + ", ".join(f"{c.vm} {c.ratio or 0:.3f}" for c in rates),
    )
    return rates


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lab.run", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "lab-out"), help="results and logs")
    parser.add_argument("--cache-dir", default=str(default_cache_dir()), help="kernel cache")
    parser.add_argument("--refresh-kernel", action="store_true", help="ask apt for a newer one")
    parser.add_argument("--scrape-interval", type=int, default=5, help="seconds (default 5)")
    parser.add_argument("--peer-rounds", type=int, default=30, help="exporter comparison rounds")
    parser.add_argument(
        "--no-docs", dest="docs", action="store_false", help="do not update docs/benchmarks.md"
    )
    return parser


def _exit_on_sigterm() -> Callable[[int, object], None]:
    def handler(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)  # unwinds through every finally: all is stopped

    return handler


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm())
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
