"""The rolling queue's own cost: from one migration's end to the next one's start, and the
peak number in flight against the configured limits.

The real Proxmox backend (proxmoxer over HTTPS) against the loopback fake API
(devkit/fake_pve.py) with instant tasks, and the live check against an in-memory snapshot,
so what is measured is the queue, the check and the API calls around each migration — not a
migration. The gaps and the peaks are read from the audit log's timestamps.

Run: .venv/bin/python bench/bench_apply_queue.py [--migrations 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import warnings
from collections import Counter
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from devkit.fake_pve import FakePVE, FakeVM, self_signed_tls  # noqa: E402
from recommender.apply.audit import AuditLog  # noqa: E402
from recommender.apply.live import live_check  # noqa: E402
from recommender.apply.proxmox import ProxmoxBackend  # noqa: E402
from recommender.apply.queue import Queue  # noqa: E402
from recommender.apply.steps import Step  # noqa: E402
from recommender.config import Config  # noqa: E402
from recommender.model import GIB, Snapshot, make_nodes, make_vms  # noqa: E402

SECRET = "bench-secret"
NODE = {"cpu": 64, "memory": 512 * GIB, "disk_bytes": 1e9, "disk_ops": 1e4, "network": 1e9}


def vm_row(node: str) -> dict[str, object]:
    return {
        "node": node,
        "cpu": 1.0,
        "memory": GIB,
        "memory_max_bytes": 2 * GIB,
        "disk_bytes": 1e6,
        "disk_ops": 10.0,
        "network": 1e6,
        "burst_ratio": 1.0,
    }


def run(
    directory: Path, count: int, nodes: int, seconds: float, total: int, per_node: int
) -> list[dict[str, object]]:
    names = [f"pve{i + 1}" for i in range(nodes)]
    steps = [
        Step(
            i + 1,
            1 if total > 1 else i + 1,
            str(100 + i),
            f"vm{i}",
            names[i % nodes],
            names[(i + 1) % nodes],
            "balance",
            2 * GIB,
        )
        for i in range(count)
    ]
    vms = {100 + i: FakeVM(s.source, seconds=seconds) for i, s in enumerate(steps)}
    snapshot = Snapshot(
        make_nodes({n: NODE for n in names}), make_vms({s.vm: vm_row(s.source) for s in steps})
    )
    (directory / "secret").write_text(SECRET)
    with FakePVE(vms, f"bench@pve!apply={SECRET}", self_signed_tls(directory)) as pve:
        config = Config.model_validate(
            {
                "apply": {
                    "max_parallel": total,
                    "max_parallel_per_node": per_node,
                    "poll_interval_seconds": 0.05,
                    "proxmox": {
                        "url": pve.url,
                        "token_id": "bench@pve!apply",
                        "verify_tls": False,
                        "token_secret_file": str(directory / "secret"),
                    },
                }
            }
        )
        audit = AuditLog(None)
        queue = Queue(
            steps,
            ProxmoxBackend(config.apply),
            config.apply,
            check=live_check(lambda: snapshot, config),
            audit=audit,
        )
        result = queue.run()
    if not result.ok:
        raise SystemExit(f"the run failed: {result.stopped}")
    return audit.records


def gaps(records: list[dict[str, object]]) -> list[float]:
    """Seconds from each migration's end to the next one's start (a queue of one at a time)."""
    times = [(datetime.fromisoformat(str(r["time"])), r["event"]) for r in records]
    ends = [t for t, e in times if e == "done"]
    starts = [t for t, e in times if e == "started"]
    return [(s - e).total_seconds() for e, s in zip(ends, starts[1:], strict=False)]


def peaks(records: list[dict[str, object]]) -> tuple[int, int]:
    running: dict[object, tuple[str, str]] = {}
    per_node: Counter[str] = Counter()
    peak_total = peak_node = 0
    for r in records:
        nodes = (str(r["from"]), str(r["to"]))
        if r["event"] == "started":
            running[r["step"]] = nodes
            per_node.update(nodes)
        elif r["event"] == "done":
            running.pop(r["step"])
            per_node.subtract(nodes)
        peak_total = max(peak_total, len(running))
        peak_node = max(peak_node, *per_node.values(), 0)
    return peak_total, peak_node


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--migrations", type=int, default=20)
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # the fake's certificate is not verified
    with tempfile.TemporaryDirectory() as tmp:
        serial = run(Path(tmp), args.migrations, 2, 0.0, 1, 1)
        overhead = gaps(serial)
        print(
            f"end → next start over {len(overhead)} gaps ({args.migrations} migrations, "
            f"instant tasks, one at a time): median {statistics.median(overhead) * 1000:.1f} "
            f"ms, max {max(overhead) * 1000:.1f} ms"
        )
        for total, per_node, nodes in ((3, 1, 6), (4, 2, 4), (2, 1, 4)):
            records = run(Path(tmp), args.migrations, nodes, 0.3, total, per_node)
            peak_total, peak_node = peaks(records)
            print(
                f"limits max_parallel={total} max_parallel_per_node={per_node} on {nodes} "
                f"nodes: peak in flight {peak_total}, peak per node {peak_node}"
            )
    print(json.dumps({"median_gap_seconds": statistics.median(overhead)}))


if __name__ == "__main__":
    main()
