"""A loopback fake of the parts of Proxmox VE's HTTP API that `vmbalance apply` uses (Proxmox
VE itself cannot run here), answering as the API viewer documents them: every answer is
`{"data": ...}`, errors are an HTTP status whose reason phrase carries the message, a
migration is a `qmigrate` task named by its UPID, a task's status is `running` until it is
`stopped` with an `exitstatus` (`OK` or the error), and its log is a list of `{n, t}` lines.

Each VM can be scripted: how long its migration runs, that its task fails, that it is locked,
that HA manages it, that one status request hangs past the client's timeout.
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
    def __init__(self, vms: dict[int, FakeVM], token: str, tls: ssl.SSLContext) -> None:
        self.vms = vms
        self.token = token  # the whole "USER@REALM!TOKENID=SECRET"
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
