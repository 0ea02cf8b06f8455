"""`vmbalance apply` on Proxmox VE: proxmoxer against a loopback fake of the documented API
(devkit/fake_pve.py), the run's calls, outcomes, audit log and exit status asserted."""

from __future__ import annotations

import json
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devkit.fake_pve import FakePVE, FakeVM, self_signed_tls
from recommender.config import Config
from recommender.faces.cli import main
from recommender.model import GIB, Snapshot, make_nodes, make_vms
from recommender.snapshot import snapshot_text

# The fake's certificate is self-signed without a subject alternative name: not verified.
pytestmark = pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")

SECRET = "5f0c9e1e-secret-of-the-token"
TOKEN_ID = "vmbalance@pve!apply"
NODE = {"cpu": 32, "memory": 256 * GIB, "disk_bytes": 1e9, "disk_ops": 1e4, "network": 1e9}


def vm_row(node: str) -> dict[str, object]:
    return {
        "node": node,
        "cpu": 1.0,
        "memory": 2 * GIB,
        "memory_max_bytes": 4 * GIB,
        "disk_bytes": 1e6,
        "disk_ops": 10.0,
        "network": 1e6,
        "burst_ratio": 1.0,
    }


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> ssl.SSLContext:
    return self_signed_tls(tmp_path_factory.mktemp("tls"))


def start(tls: ssl.SSLContext, vms: dict[int, FakeVM]) -> FakePVE:
    return FakePVE(vms, f"{TOKEN_ID}={SECRET}", tls).__enter__()


@pytest.fixture
def fake(tls: ssl.SSLContext) -> Iterator[list[FakePVE]]:
    started: list[FakePVE] = []
    yield started
    for server in started:
        server.__exit__()


def setup(
    tmp: Path, pve: FakePVE, moves: list[tuple[int, str, str, int]], **apply: object
) -> list[str]:
    """Config, snapshot (the live state: where the plan expects the VMs) and plan files;
    the apply arguments that use them."""
    (tmp / "secret").write_text(SECRET + "\n")
    settings = {
        "poll_interval_seconds": 0.05,
        "max_parallel": 1,
        **apply,
        "proxmox": {
            "url": pve.url,
            "token_id": TOKEN_ID,
            "verify_tls": False,
            "token_secret_file": str(tmp / "secret"),
            "timeout_seconds": 1,
            "poll_retries": 3,
        },
    }
    (tmp / "config.yaml").write_text(json.dumps({"apply": settings}))
    nodes = make_nodes({n: NODE for n in ("pve1", "pve2", "pve3")})
    vms = make_vms({str(vmid): vm_row(source) for vmid, source, _, _ in moves})
    (tmp / "snap.json").write_text(snapshot_text(Snapshot(nodes, vms), Config()))
    migrations = [
        {
            "step": i + 1,
            "wave": wave,
            "vm": str(vmid),
            "name": f"vm{vmid}",
            "source": source,
            "target": target,
            "kind": "balance",
            "memory_bytes": 4 * GIB,
        }
        for i, (vmid, source, target, wave) in enumerate(moves)
    ]
    plan = {
        "format": "vmbalance-plan",
        "version": 1,
        "commands": "proxmox",
        "migrations": migrations,
    }
    (tmp / "plan.json").write_text(json.dumps(plan))
    return [
        "apply",
        "-c",
        str(tmp / "config.yaml"),
        "--plan",
        str(tmp / "plan.json"),
        "--input",
        str(tmp / "snap.json"),
        "--yes",
        "--audit-log",
        str(tmp / "audit.jsonl"),
        "--metrics-file",
        str(tmp / "apply.prom"),
    ]


def audit(tmp: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (tmp / "audit.jsonl").read_text().splitlines()]


def outcomes(tmp: Path) -> dict[str, tuple[object, object]]:
    return {str(r["vm"]): (r["result"], r["reason"]) for r in audit(tmp) if r["result"]}


def test_a_migration_runs_as_a_task_and_is_done(
    tmp_path: Path, tls: ssl.SSLContext, fake: list[FakePVE], capfd: pytest.CaptureFixture[str]
) -> None:
    pve = start(tls, {101: FakeVM("pve1"), 102: FakeVM("pve2", local_disks=True)})
    fake.append(pve)
    args = setup(tmp_path, pve, [(101, "pve1", "pve2", 1), (102, "pve2", "pve3", 2)])
    assert main(args) == 0
    assert pve.posts("/nodes/pve1/qemu/101/migrate") == [{"target": "pve2", "online": "1"}]
    assert pve.posts("/nodes/pve2/qemu/102/migrate") == [
        {"target": "pve3", "online": "1", "with-local-disks": "1"}
    ]
    assert (pve.vms[101].node, pve.vms[102].node) == ("pve2", "pve3")
    assert any(path.endswith("/status") and "UPID:pve1:" in path for _, path, _ in pve.calls)
    done = [r for r in audit(tmp_path) if r["result"] == "done"]
    assert [(r["vm"], r["from"], r["to"]) for r in done] == [
        ("101", "pve1", "pve2"),
        ("102", "pve2", "pve3"),
    ]
    assert done[0]["downtime_seconds"] == 0.042 and done[0]["bytes"] == GIB
    assert pve.unauthorised == 0
    printed = capfd.readouterr()
    written = [(tmp_path / f).read_text() for f in ("audit.jsonl", "apply.prom")]
    for text in (*written, printed.out, printed.err):
        assert SECRET not in text
    assert 'vmbalance_apply_migrations_total{cluster="",result="done"} 2.0' in written[1]


def test_a_failed_task_stops_the_queue_and_exits_non_zero(
    tmp_path: Path, tls: ssl.SSLContext, fake: list[FakePVE], capfd: pytest.CaptureFixture[str]
) -> None:
    pve = start(tls, {101: FakeVM("pve1", fail="migration problems"), 102: FakeVM("pve3")})
    fake.append(pve)
    args = setup(tmp_path, pve, [(101, "pve1", "pve2", 1), (102, "pve3", "pve2", 2)])
    assert main(args) == 1
    result, reason = outcomes(tmp_path)["101"]
    assert result == "failed" and str(reason).endswith(": migration problems")
    assert outcomes(tmp_path)["102"][0] in ("not-started", "skipped")
    assert pve.posts("/qemu/102/") == []
    err = capfd.readouterr().err
    assert "vmbalance: apply: 1 failed" in err and "Traceback" not in err


def test_a_locked_vm_fails_with_the_api_message(
    tmp_path: Path, tls: ssl.SSLContext, fake: list[FakePVE]
) -> None:
    pve = start(tls, {101: FakeVM("pve1", locked="backup")})
    fake.append(pve)
    assert main(setup(tmp_path, pve, [(101, "pve1", "pve2", 1)])) == 1
    assert outcomes(tmp_path)["101"] == ("failed", "migrate: 500 VM is locked (backup)")
    assert pve.vms[101].node == "pve1"


def test_an_api_timeout_while_polling_is_retried(
    tmp_path: Path, tls: ssl.SSLContext, fake: list[FakePVE]
) -> None:
    pve = start(tls, {101: FakeVM("pve1", hang_status_once=2.5)})
    fake.append(pve)
    assert main(setup(tmp_path, pve, [(101, "pve1", "pve2", 1)])) == 0
    assert outcomes(tmp_path)["101"] == ("done", "")
    statuses = [p for m, p, _ in pve.calls if p.endswith("/status")]
    assert len(statuses) >= 2  # the one that timed out, then the ones after it


def test_an_ha_managed_vm_goes_through_the_ha_stack(
    tmp_path: Path, tls: ssl.SSLContext, fake: list[FakePVE]
) -> None:
    pve = start(tls, {103: FakeVM("pve1", ha=True)})
    fake.append(pve)
    assert main(setup(tmp_path, pve, [(103, "pve1", "pve3", 1)])) == 0
    assert pve.posts("/cluster/ha/resources/vm:103/migrate") == [{"node": "pve3"}]
    assert pve.posts("/qemu/103/migrate") == []
    assert pve.vms[103].node == "pve3"
    assert outcomes(tmp_path)["103"] == ("done", "")


def test_a_vm_someone_else_moved_is_skipped_with_its_dependants(
    tmp_path: Path, tls: ssl.SSLContext, fake: list[FakePVE]
) -> None:
    pve = start(tls, {101: FakeVM("pve3"), 102: FakeVM("pve2")})
    fake.append(pve)
    # The snapshot (the metrics) still shows 101 on pve1; the API knows better.
    args = setup(tmp_path, pve, [(101, "pve1", "pve2", 1), (102, "pve2", "pve1", 2)])
    assert main(args) == 0
    assert outcomes(tmp_path) == {
        "101": ("skipped", "VM 101 is on pve3 now, not on pve1"),
        "102": ("skipped", "waits for step 1 (101), which was skipped"),
    }
    assert pve.posts("/migrate") == []


def test_sigterm_waits_for_the_migration_in_flight_and_starts_nothing_new(
    tmp_path: Path, tls: ssl.SSLContext, fake: list[FakePVE]
) -> None:
    pve = start(tls, {101: FakeVM("pve1", seconds=2.0), 102: FakeVM("pve3")})
    fake.append(pve)
    args = setup(tmp_path, pve, [(101, "pve1", "pve2", 1), (102, "pve3", "pve1", 1)])
    code = "import sys; from recommender.faces.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not pve.posts("/qemu/101/migrate"):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err
    assert pve.vms[101].node == "pve2"  # the migration in flight ran to its end
    assert outcomes(tmp_path) == {"101": ("done", ""), "102": ("not-started", "stopped by SIGTERM")}
    assert pve.posts("/qemu/102/") == []
    assert "Traceback" not in err


def test_the_token_secret_comes_from_the_environment_or_the_run_stops(
    tmp_path: Path,
    tls: ssl.SSLContext,
    fake: list[FakePVE],
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    pve = start(tls, {101: FakeVM("pve1")})
    fake.append(pve)
    args = setup(tmp_path, pve, [(101, "pve1", "pve2", 1)])
    config = json.loads((tmp_path / "config.yaml").read_text())
    del config["apply"]["proxmox"]["token_secret_file"]
    (tmp_path / "config.yaml").write_text(json.dumps(config))
    monkeypatch.delenv("VMBALANCE_PVE_TOKEN_SECRET", raising=False)
    assert main(args) == 2
    err = capfd.readouterr().err.splitlines()
    assert err[-1].startswith("vmbalance: no Proxmox API token secret") and "Traceback" not in err
    assert pve.calls == []
    monkeypatch.setenv("VMBALANCE_PVE_TOKEN_SECRET", SECRET)
    assert main(args) == 0
    assert pve.vms[101].node == "pve2"
    assert SECRET not in (tmp_path / "audit.jsonl").read_text()


def test_dry_run_prints_the_steps_and_migrates_nothing(
    tmp_path: Path, tls: ssl.SSLContext, fake: list[FakePVE], capfd: pytest.CaptureFixture[str]
) -> None:
    pve = start(tls, {101: FakeVM("pve1"), 102: FakeVM("pve2")})
    fake.append(pve)
    args = setup(tmp_path, pve, [(101, "pve1", "pve2", 1), (102, "pve2", "pve3", 2)])
    assert main([*args, "--dry-run"]) == 0
    assert capfd.readouterr().out == (
        "step 1: migrate 101 from pve1 to pve2 (balance); waits for nothing\n"
        "step 2: migrate 102 from pve2 to pve3 (balance); waits for 1\n"
    )
    assert pve.calls == []


def test_a_fresh_plan_evacuates_a_node_in_maintenance(
    tmp_path: Path, tls: ssl.SSLContext, fake: list[FakePVE]
) -> None:
    pve = start(tls, {101: FakeVM("pve1"), 102: FakeVM("pve2")})
    fake.append(pve)
    args = setup(tmp_path, pve, [(101, "pve1", "pve2", 1), (102, "pve2", "pve3", 1)])
    plan_at = args.index("--plan")
    fresh = [*args[:plan_at], *args[plan_at + 2 :], "--maintenance", "pve1"]
    assert main(fresh) == 0
    assert [p["target"] for p in pve.posts("/nodes/pve1/qemu/101/migrate")] in (["pve2"], ["pve3"])
    assert pve.vms[101].node != "pve1"
    assert [(r["vm"], r["result"]) for r in audit(tmp_path) if r["result"]] == [("101", "done")]


def test_bad_settings_and_outputs_stop_the_run_in_one_line_before_anything_moves(
    tmp_path: Path, tls: ssl.SSLContext, fake: list[FakePVE], capfd: pytest.CaptureFixture[str]
) -> None:
    pve = start(tls, {101: FakeVM("pve1")})
    fake.append(pve)
    args = setup(tmp_path, pve, [(101, "pve1", "pve2", 1)])
    (tmp_path / "logdir").mkdir()
    bad_log = [*args, "--audit-log", str(tmp_path / "logdir")]
    assert main(bad_log) == 2
    assert main([*args, "--max-parallel", "0"]) == 2
    (tmp_path / "bad.yaml").write_text("apply:\n  max_parallel_per_node: 0\n")
    config_at = args.index("-c") + 1
    assert main([*args[:config_at], str(tmp_path / "bad.yaml"), *args[config_at + 1 :]]) == 2
    err = [line for line in capfd.readouterr().err.splitlines() if line.startswith("vmbalance:")]
    assert err == [
        f"vmbalance: {tmp_path / 'logdir'}: is a directory; not writing there",
        "vmbalance: --max-parallel: apply.max_parallel: Input should be greater than or equal to 1",
        f"vmbalance: {tmp_path / 'bad.yaml'}:2: apply.max_parallel_per_node: Input should be "
        "greater than or equal to 1",
    ]
    assert pve.posts("/migrate") == []


def _in_clusters(tmp: Path, clusters: dict[str, str], plan_cluster: str | None) -> None:
    """The setup's snapshot with its nodes in `clusters`, and its plan for `plan_cluster`."""
    snap = json.loads((tmp / "snap.json").read_text())
    for node in snap["nodes"]:
        node["cluster"] = clusters[node["name"]]
    (tmp / "snap.json").write_text(json.dumps(snap))
    plan = json.loads((tmp / "plan.json").read_text())
    plan["cluster"] = plan_cluster
    (tmp / "plan.json").write_text(json.dumps(plan))


def test_a_plan_runs_in_its_own_cluster_and_its_metrics_say_which(
    tmp_path: Path, tls: ssl.SSLContext, fake: list[FakePVE]
) -> None:
    pve = start(tls, {101: FakeVM("pve1")})
    fake.append(pve)
    args = setup(tmp_path, pve, [(101, "pve1", "pve2", 1)])
    _in_clusters(tmp_path, {"pve1": "east", "pve2": "east", "pve3": "west"}, "east")
    assert main(args) == 0
    assert pve.vms[101].node == "pve2"
    metrics = (tmp_path / "apply.prom").read_text()
    assert 'vmbalance_apply_migrations_total{cluster="east",result="done"} 1.0' in metrics
    assert 'vmbalance_apply_migration_duration_seconds_count{cluster="east"} 1.0' in metrics


def test_apply_keeps_to_one_cluster_or_refuses_in_one_line(
    tmp_path: Path, tls: ssl.SSLContext, fake: list[FakePVE], capfd: pytest.CaptureFixture[str]
) -> None:
    pve = start(tls, {101: FakeVM("pve1"), 102: FakeVM("pve3")})
    fake.append(pve)
    args = setup(tmp_path, pve, [(101, "pve1", "pve2", 1), (102, "pve3", "pve1", 1)])
    _in_clusters(tmp_path, {"pve1": "east", "pve2": "east", "pve3": "west"}, "east")
    plan_at = args.index("--plan")
    fresh = [*args[:plan_at], *args[plan_at + 2 :]]
    refusals = {
        # A plan for east is not executed as west's.
        "is for cluster east, not west": [*args, "--cluster", "west"],
        # A fresh plan over data of two clusters is for one of them, chosen.
        "the data holds 2 clusters (east, west); choose one with --cluster NAME": fresh,
        "no cluster north in the data": [*fresh, "--cluster", "north"],
    }
    for message, argv in refusals.items():
        assert main(argv) == 2
        err = capfd.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert not [path for method, path, _ in pve.calls if method == "POST"]
    assert (pve.vms[101].node, pve.vms[102].node) == ("pve1", "pve3")
