"""The ProxLB side-by-side benchmark, end to end on small clusters: ProxLB (installed from
requirements/proxlb.txt into its scratch venv) reads the loopback fake of the Proxmox VE API,
sees the cluster's rules as its tags, plans without migrating, and the bench judges its plans
and vmbalance's."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
from pathlib import Path

import proxmoxer
import pytest

from devkit.fake_pve import FakePVE, self_signed_tls
from devkit.instances import HeavyShape, Instance, Shape, heavy_tailed_cluster
from devkit.proxlb_peer import SECRET, TOKEN_ID, USER, fake_cluster, installed_python, run_proxlb

pytestmark = pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_proxlb.py"
SMALL = HeavyShape(base=Shape(nodes=(3, 3), vms=(10, 12), skew=0.8))
# What uv says when the index cannot be reached: the one reason the peer is not to be had.
OFFLINE = ("failed to fetch", "network", "connect", "dns error", "offline")


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> ssl.SSLContext:
    return self_signed_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def proxlb() -> Path:
    try:
        return installed_python()
    except RuntimeError as error:
        if any(word in str(error).lower() for word in OFFLINE):
            pytest.skip(f"ProxLB cannot be installed from requirements/proxlb.txt: {error}")
        raise


def test_the_fake_serves_the_cluster_as_proxmox_lists_it(tls: ssl.SSLContext) -> None:
    inst = heavy_tailed_cluster(3, SMALL)
    cluster = fake_cluster(inst)
    token = f"{USER}!{TOKEN_ID}={SECRET}"
    with FakePVE(cluster.vms, token, tls, nodes=cluster.nodes) as pve:
        api = proxmoxer.ProxmoxAPI(
            "127.0.0.1", port=pve.port, user=USER, token_name=TOKEN_ID, token_value=SECRET,
            verify_ssl=False,
        )  # fmt: skip
        nodes = {n["node"]: n for n in api.nodes.get()}
        assert set(nodes) == set(inst.snapshot.nodes.index)
        for name, node in nodes.items():
            mine = inst.snapshot.vms[inst.snapshot.vms["node"] == name]
            assert node["mem"] == sum(int(m) for m in mine["memory"])
            assert node["maxmem"] == int(inst.snapshot.nodes.loc[name, "memory"])
            listed = api.nodes(name).qemu.get()
            assert sorted(str(vm["vmid"]) for vm in listed) == sorted(mine.index)
        vm_id, vm = next(iter(cluster.vms.items()))
        rrd = api.nodes(vm.node).qemu(vm_id).rrddata.get(timeframe="hour", cf="AVERAGE")
        assert rrd[-1]["diskread"] + rrd[-1]["diskwrite"] == pytest.approx(
            float(inst.snapshot.vms.loc[str(vm_id), "disk_bytes"])
        )
        tagged = {i: v for i, v in cluster.vms.items() if v.tags}
        for vm_id, vm in tagged.items():
            assert api.nodes(vm.node).qemu(vm_id).config.get()["tags"] == ";".join(vm.tags)
        migrate = api.nodes(vm.node).qemu(vm_id).migrate.get()
        assert migrate["local_disks"] == []


def small_cluster(seed: int) -> Instance:
    return heavy_tailed_cluster(seed, SMALL)


def has_every_rule(inst: Instance) -> bool:
    rules = inst.config.rules
    return bool(rules.affinity and rules.anti_affinity and rules.pin and rules.exclude)


@pytest.mark.slow
def test_proxlb_reads_the_rules_and_plans_without_migrating(
    proxlb: Path, tls: ssl.SSLContext, tmp_path: Path
) -> None:
    # The first small cluster with every kind of rule ProxLB has a tag for.
    inst = next(i for i in map(small_cluster, range(100)) if has_every_rule(i))
    rules = inst.config.rules
    run = run_proxlb(proxlb, inst, tmp_path, tls)  # raises if it asked for a migration
    (log,) = (tmp_path / "solver").glob("solver_run_*.jsonl")
    events = [json.loads(line) for line in log.read_text().splitlines()]
    seen = {(e["type"], e.get("name", e.get("vm"))) for e in events if e["event"] == "constraint"}
    names = dict(zip(inst.snapshot.vms.index, inst.snapshot.vms["name"], strict=True))
    expected = {("affinity", f"plb_affinity_{g.name}") for g in rules.affinity}
    expected |= {("anti_affinity", f"plb_anti_affinity_{g.name}") for g in rules.anti_affinity}
    expected |= {("pin", names[vm]) for vm in rules.pin}
    expected |= {("ignore", names[vm]) for vm in rules.exclude}
    assert seen == expected
    nodes = set(inst.snapshot.nodes.index)
    for plan in (run.greedy, run.solver):
        assert all(vm in names and target in nodes for vm, target in plan.moves)
    assert run.solver.status in {"OPTIMAL", "FEASIBLE"}
    assert run.greedy.moves or run.solver.moves


@pytest.mark.slow
def test_the_bench_runs_end_to_end(proxlb: Path, tmp_path: Path) -> None:
    rows_file = tmp_path / "rows.json"
    done = subprocess.run(
        [sys.executable, str(BENCH), "--small", "--clusters", "2", "--jobs", "1", "--no-docs",
         "--rows", str(rows_file)],
        cwd=tmp_path, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("2 heavy-tailed clusters")
    for plan in ("before", "proxlb greedy", "proxlb solver", "vmbalance", "vmbalance memory only"):
        assert f"\n| {plan} |" in done.stdout
    rows = json.loads(rows_file.read_text())
    assert [r["seed"] for r in rows] == [0, 1]
    for row in rows:
        assert row["before"]["still_broken"] >= 1  # the generator breaks rules at the start
        assert sum(row["vmbalance"]["violations"].values()) == 0
        for plan in ("proxlb greedy", "proxlb solver", "vmbalance", "vmbalance memory only"):
            judged = row[plan]
            assert judged["migrations"] >= 0
            assert set(judged["utilisation"]) >= {"cpu", "memory assigned", "disk bytes"}
            assert all(0 <= u < 10 for u in judged["utilisation"].values())
