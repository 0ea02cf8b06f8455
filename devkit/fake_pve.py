"""A loopback fake of the parts of Proxmox VE's HTTP API that `vmbalance apply` uses (Proxmox
VE itself cannot run here), answering as the API viewer documents them: every answer is
`{"data": ...}`, errors are an HTTP status whose reason phrase carries the message, a
migration is a `qmigrate` task named by its UPID, a task's status is `running` until it is
`stopped` with an `exitstatus` (`OK` or the error), and its log is a list of `{n, t}` lines.

Each VM can be scripted: how long its migration runs, that its task fails, that it is locked,
that HA manages it, that one status request hangs past the client's timeout.

The fake also answers what a balancer reads of a cluster (ProxLB, for the side-by-side
benchmark): the nodes with their capacity and use, each node's VMs, a VM's config (its tags)
and the RRD series of nodes and VMs, resource pools, HA rules and HA status, and the token's
permissions. A node's use is what its VMs use plus what its host adds, so it follows the VMs
when they migrate.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit


def self_signed_tls(directory: Path) -> ssl.SSLContext:
    """A server context with a fresh self-signed certificate (Proxmox VE's API is HTTPS)."""
    key, cert = directory / "key.pem", directory / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


# Minutes in the RRD series of the `hour` timeframe (Proxmox keeps one point a minute).
RRD_POINTS = 70
# What the token may do, as GET /access/permissions lists it for the path "/".
PERMISSIONS = ("Datastore.Audit", "Sys.Audit", "VM.Audit", "VM.Migrate", "VM.Monitor")


@dataclass
class FakeVM:
    node: str
    seconds: float = 0.05  # how long a migration task runs
    fail: str | None = None  # the task's exitstatus when it should fail
    locked: str | None = None  # "backup": the migrate call is refused
    ha: bool = False
    hang_status_once: float = 0.0  # the first status request sleeps this long
    local_disks: bool = False
    status: str = "running"
    # What a balancer reads: size, use and rates (bytes, cores busy, bytes/s), tags.
    name: str = ""
    cpus: int = 1
    cpu_cores: float = 0.0  # cores busy; Proxmox reports it as a fraction of `cpus`
    mem: int = 0
    maxmem: int = 0
    disk: int = 0  # bytes used of its disks (0 for a VM: QEMU does not report it)
    maxdisk: int = 0
    diskread: float = 0.0
    diskwrite: float = 0.0
    netin: float = 0.0
    netout: float = 0.0
    tags: tuple[str, ...] = ()
    uptime: int = 86_400

    def listing(self, vmid: int) -> dict[str, Any]:
        """The VM as GET /nodes/{node}/qemu lists it: counters are totals since its start."""
        return {
            "vmid": vmid,
            "name": self.name or f"vm{vmid}",
            "status": self.status,
            "cpus": self.cpus,
            "cpu": self.cpu_cores / self.cpus if self.cpus else 0.0,
            "mem": self.mem,
            "maxmem": self.maxmem,
            "disk": self.disk,
            "maxdisk": self.maxdisk,
            "diskread": int(self.diskread * self.uptime),
            "diskwrite": int(self.diskwrite * self.uptime),
            "netin": int(self.netin * self.uptime),
            "netout": int(self.netout * self.uptime),
            "uptime": self.uptime,
            "tags": ";".join(self.tags),
        }

    def rrd_point(self) -> dict[str, float]:
        """One minute of the VM's RRD series: rates per second, no pressure stalls."""
        point = {
            "cpu": self.cpu_cores / self.cpus if self.cpus else 0.0,
            "maxcpu": float(self.cpus),
            "mem": float(self.mem),
            "maxmem": float(self.maxmem),
            "disk": float(self.disk),
            "maxdisk": float(self.maxdisk),
            "diskread": self.diskread,
            "diskwrite": self.diskwrite,
            "netin": self.netin,
            "netout": self.netout,
        }
        return point | dict.fromkeys(_PRESSURES, 0.0)


@dataclass
class FakeNode:
    """A node of the cluster: its capacity, and the load of its host beyond its VMs."""

    maxcpu: int
    maxmem: int
    maxdisk: int = 100 * 2**30  # its root file system
    disk: int = 10 * 2**30
    host_cpu_cores: float = 0.0
    host_mem: int = 0
    version: str = "9.0.3"
    status: str = "online"


_PRESSURES = tuple(
    f"pressure{kind}{level}"
    for kind, levels in (("cpu", ("some", "full")), ("io", ("some", "full")),
                         ("memory", ("some", "full")))
    for level in levels
)  # fmt: skip


@dataclass
class Task:
    upid: str
    node: str
    vmid: int
    target: str
    ends: float
    exitstatus: str
    log: list[str] = field(default_factory=list)
    stopped: bool = False


class FakePVE:
    def __init__(
        self,
        vms: dict[int, FakeVM],
        token: str,
        tls: ssl.SSLContext,
        nodes: dict[str, FakeNode] | None = None,
        pools: dict[str, list[int]] | None = None,
        ha_rules: list[dict[str, Any]] | None = None,
    ) -> None:
        self.vms = vms
        self.token = token  # the whole "USER@REALM!TOKENID=SECRET"
        self.nodes = nodes or {}
        self.pools = pools or {}  # pool id -> its VMs
        self.ha_rules = ha_rules or []  # as GET /cluster/ha/rules lists them
        self.tasks: dict[str, Task] = {}
        self.calls: list[tuple[str, str, dict[str, str]]] = []
        self.unauthorised = 0
        self.lock = threading.Lock()
        self._pid = 1000
        handler = type("Handler", (_Handler,), {"fake": self})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def __enter__(self) -> FakePVE:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def posts(self, path_part: str) -> list[dict[str, str]]:
        return [p for m, path, p in self.calls if m == "POST" and path_part in path]

    # --- the API ---------------------------------------------------------------------------

    def _finish_tasks(self) -> None:
        now = time.monotonic()
        for task in self.tasks.values():
            if not task.stopped and now >= task.ends:
                task.stopped = True
                vm = self.vms[task.vmid]
                if task.exitstatus == "OK":
                    vm.node = task.target
                    task.log += [
                        "migration active, transferred 1.0 GiB of 4.0 GiB VM-state",
                        "average migration speed: 1.0 GiB/s - downtime 42 ms",
                        "migration status: completed",
                        "TASK OK",
                    ]
                else:
                    task.log.append(f"TASK ERROR: {task.exitstatus}")

    def resources(self) -> list[dict[str, Any]]:
        out = []
        for vmid, vm in self.vms.items():
            entry: dict[str, Any] = {
                "id": f"qemu/{vmid}",
                "type": "qemu",
                "vmid": vmid,
                "node": vm.node,
                "status": vm.status,
            }
            if vm.ha:
                entry["hastate"] = "started"
            out.append(entry)
        return out

    def node_listing(self, name: str) -> dict[str, Any]:
        """A node as GET /nodes lists it: its VMs' use plus its host's."""
        node = self.nodes[name]
        mine = [vm for vm in self.vms.values() if vm.node == name and vm.status == "running"]
        cores = node.host_cpu_cores + sum(vm.cpu_cores for vm in mine)
        return {
            "node": name,
            "status": node.status,
            "cpu": cores / node.maxcpu,
            "maxcpu": node.maxcpu,
            "mem": node.host_mem + sum(vm.mem for vm in mine),
            "maxmem": node.maxmem,
            "disk": node.disk,
            "maxdisk": node.maxdisk,
            "uptime": 864_000,
            "level": "",
            "type": "node",
            "id": f"node/{name}",
        }

    def node_rrd_point(self, name: str) -> dict[str, float]:
        listed = self.node_listing(name)
        mine = [vm for vm in self.vms.values() if vm.node == name and vm.status == "running"]
        point = {
            "cpu": listed["cpu"],
            "maxcpu": float(listed["maxcpu"]),
            "memused": float(listed["mem"]),
            "memtotal": float(listed["maxmem"]),
            "rootused": float(listed["disk"]),
            "roottotal": float(listed["maxdisk"]),
            "netin": sum(vm.netin for vm in mine),
            "netout": sum(vm.netout for vm in mine),
            "iowait": 0.0,
            "loadavg": listed["cpu"] * listed["maxcpu"],
        }
        return point | dict.fromkeys(_PRESSURES, 0.0)

    def pool_detail(self, poolid: str) -> dict[str, Any]:
        members = [
            {"id": f"qemu/{vmid}", "type": "qemu", "vmid": vmid, "node": self.vms[vmid].node,
             "name": self.vms[vmid].name or f"vm{vmid}", "status": self.vms[vmid].status}
            for vmid in self.pools[poolid]
        ]  # fmt: skip
        return {"poolid": poolid, "comment": "", "members": members}

    def start_task(self, node: str, vmid: int, target: str) -> str:
        vm = self.vms[vmid]
        self._pid += 1
        start = int(time.time())
        upid = (
            f"UPID:{node}:{self._pid:08X}:{self._pid * 7:08X}:{start:08X}:qmigrate:{vmid}:root@pam:"
        )
        self.tasks[upid] = Task(
            upid,
            node,
            vmid,
            target,
            time.monotonic() + vm.seconds,
            vm.fail or "OK",
            [f"starting migration of VM {vmid} to node '{target}'"],
        )
        return upid


def _series(point: dict[str, float]) -> list[dict[str, float]]:
    """An RRD series of the `hour` timeframe: the same point every minute up to now."""
    now = int(time.time()) // 60 * 60
    return [{"time": now - 60 * (RRD_POINTS - 1 - i), **point} for i in range(RRD_POINTS)]


class _Handler(BaseHTTPRequestHandler):
    fake: FakePVE
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, code: int, data: Any, reason: str | None = None) -> None:
        body = json.dumps({"data": data}).encode()
        self.send_response(code, reason)
        self.send_header("Content-Type", "application/json;charset=UTF-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _params(self) -> dict[str, str]:
        query = {k: v[0] for k, v in parse_qs(urlsplit(self.path).query).items()}
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            body = self.rfile.read(length).decode()
            query.update({k: v[0] for k, v in parse_qs(body).items()})
        return query

    def _handle(self, method: str) -> None:
        fake = self.fake
        params = self._params()
        path = unquote(urlsplit(self.path).path)
        if self.headers.get("Authorization") != f"PVEAPIToken={fake.token}":
            fake.unauthorised += 1
            self._send(401, None, "authentication failure")
            return
        if not path.startswith("/api2/json/"):
            self._send(404, None, "Not Found")
            return
        parts = path[len("/api2/json/") :].split("/")
        with fake.lock:
            fake.calls.append((method, path, params))
            fake._finish_tasks()
            answer = self._route(method, parts, params)
        if answer is None:
            self._send(501, None, f"Method '{method} /{'/'.join(parts)}' not implemented")
            return
        code, data, reason, delay = answer
        if delay:
            time.sleep(delay)
        self._send(code, data, reason)

    def _route(
        self, method: str, parts: list[str], params: dict[str, str]
    ) -> tuple[int, Any, str | None, float] | None:
        match method, parts:
            case "GET", ["cluster", "resources"]:
                return 200, self.fake.resources(), None, 0.0
            case "GET", _ if (read := self._read(parts)) is not None:
                return 200, read, None, 0.0
            case "GET", ["nodes", _, "qemu", vmid, "migrate"]:
                return self._migrate_preconditions(int(vmid))
            case "POST", ["nodes", node, "qemu", vmid, "migrate"]:
                return self._migrate(node, int(vmid), params)
            case "GET", ["nodes", node, "tasks", upid, "status"]:
                return self._task_status(node, upid)
            case "GET", ["nodes", _, "tasks", upid, "log"]:
                lines = [{"n": i + 1, "t": t} for i, t in enumerate(self.fake.tasks[upid].log)]
                return 200, lines, None, 0.0
            case "DELETE", ["nodes", _, "tasks", upid]:
                task = self.fake.tasks[upid]
                task.exitstatus, task.ends = "interrupted by signal", 0.0
                return 200, None, None, 0.0
            case "POST", ["cluster", "ha", "resources", sid, "migrate"]:
                return self._ha_migrate(sid, params)
        return None

    def _read(self, parts: list[str]) -> Any:
        """The answer to a read of the cluster's state, or None when the path is not one."""
        fake = self.fake
        match parts:
            case ["nodes"]:
                return [fake.node_listing(name) for name in fake.nodes]
            case ["nodes", node, *rest] if node in fake.nodes:
                return self._read_node(node, rest)
            case ["access", "permissions"]:
                return {"/": dict.fromkeys(PERMISSIONS, 1)}
            case ["pools"]:
                return [{"poolid": p, "comment": ""} for p in fake.pools]
            case ["pools", poolid] if poolid in fake.pools:
                return fake.pool_detail(poolid)
            case ["cluster", "ha", *rest]:
                return self._read_ha(rest)
        return None

    def _read_node(self, node: str, rest: list[str]) -> Any:
        fake = self.fake
        match rest:
            case ["version"]:
                version = fake.nodes[node].version
                return {"version": version, "release": version.rsplit(".", 1)[0], "repoid": "0"}
            case ["rrddata"]:
                return _series(fake.node_rrd_point(node))
            case ["qemu"]:
                return [vm.listing(i) for i, vm in fake.vms.items() if vm.node == node]
            case ["lxc"]:
                return []
            case ["qemu", vmid, "config"] if self._here(node, vmid):
                vm = fake.vms[int(vmid)]
                config = {"name": vm.name or f"vm{vmid}", "memory": str(vm.maxmem // 2**20),
                          "cores": vm.cpus, "digest": f"{int(vmid):040x}"}  # fmt: skip
                return config | ({"tags": ";".join(vm.tags)} if vm.tags else {})
            case ["qemu", vmid, "rrddata"] if self._here(node, vmid):
                return _series(fake.vms[int(vmid)].rrd_point())
        return None

    def _read_ha(self, rest: list[str]) -> Any:
        match rest:
            case ["rules"]:
                return self.fake.ha_rules
            case ["status", "current"]:
                first = next(iter(self.fake.nodes), "")
                return [{"id": "quorum", "type": "quorum", "node": first, "status": "OK",
                         "quorate": 1}]  # fmt: skip
            case ["status", "manager_status"]:
                return {"manager_status": {}, "quorum": {"quorate": "1"}}
        return None

    def _here(self, node: str, vmid: str) -> bool:
        vms = self.fake.vms
        return vmid.isdigit() and int(vmid) in vms and vms[int(vmid)].node == node

    def _migrate_preconditions(self, vmid: int) -> tuple[int, Any, str | None, float]:
        vm = self.fake.vms[vmid]
        local = [{"volid": "local:101/vm-disk-0.qcow2"}] if vm.local_disks else []
        data = {
            "running": vm.status == "running",
            "allowed_nodes": [],
            "not_allowed_nodes": {},
            "local_disks": local,
            "local_resources": [],
        }
        return 200, data, None, 0.0

    def _migrate(
        self, node: str, vmid: int, params: dict[str, str]
    ) -> tuple[int, Any, str | None, float]:
        vm = self.fake.vms[vmid]
        if vm.node != node:
            return 500, None, f"VM {vmid} is not on node '{node}'", 0.0
        if vm.locked:
            return 500, None, f"VM is locked ({vm.locked})", 0.0
        return 200, self.fake.start_task(node, vmid, params["target"]), None, 0.0

    def _task_status(self, node: str, upid: str) -> tuple[int, Any, str | None, float]:
        task = self.fake.tasks[upid]
        vm = self.fake.vms[task.vmid]
        delay, vm.hang_status_once = vm.hang_status_once, 0.0
        data = {
            "upid": upid,
            "node": node,
            "type": "qmigrate",
            "id": str(task.vmid),
            "user": "root@pam",
            "status": "stopped" if task.stopped else "running",
        }
        if task.stopped:
            data["exitstatus"] = task.exitstatus
        return 200, data, None, delay

    def _ha_migrate(self, sid: str, params: dict[str, str]) -> tuple[int, Any, str | None, float]:
        vm = self.fake.vms[int(sid.removeprefix("vm:"))]
        if not vm.ha:
            return 500, None, f"service '{sid}' not defined", 0.0
        threading.Timer(vm.seconds, lambda: setattr(vm, "node", params["node"])).start()
        return 200, {"sid": sid, "requested-node": params["node"]}, None, 0.0

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_DELETE(self) -> None:
        self._handle("DELETE")
