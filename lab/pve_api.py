"""The migration part of Proxmox VE's HTTP API over the lab's Proxmox-like QEMU nodes, so that
`vmbalance apply` executes the lab's plan through its Proxmox backend (proxmoxer, API token,
the task's UPID polled) and the migration itself is real.

The endpoints, the answers and the task protocol are `devkit.fake_pve`'s (the documented
ones); what differs is the task: `POST /nodes/{node}/qemu/{vmid}/migrate` starts a real live
migration of the running QEMU guest to the target node over QMP (`lab.pve_node.live_migrate`,
as `qm migrate --online` does with shared storage), the task stays `running` until QEMU says
the migration completed or failed, and its log carries QEMU's own figures (bytes transferred,
downtime) in the lines Proxmox VE writes them in. `/cluster/resources` lists each guest on the
node its QEMU runs on.
"""

from __future__ import annotations

import math
import ssl
import threading
from pathlib import Path

from devkit.fake_pve import FakePVE, FakeVM, Task, self_signed_tls
from devkit.qemu import qmp_command
from devkit.service import wait_until
from lab.guest import GuestImage
from lab.pve_node import PveGuest, PveNode, live_migrate

TOKEN_ID = "vmbalance@pve!lab"
MIB = 2**20


def _listening(incoming: PveGuest) -> None:
    """Wait until the incoming QEMU answers QMP in state `inmigrate`: it sets up its
    `-incoming` listener before its main loop serves the monitor, so it is listening then
    (a probe of the port itself would take the one connection it accepts)."""

    def waiting() -> bool:
        try:
            status = qmp_command(incoming.vm.qmp_path, "query-status").get("status")
            return bool(status == "inmigrate")
        except Exception:
            return False

    wait_until(waiting, 30, f"the incoming QEMU of {incoming.spec.vmid}")


class LabPveApi(FakePVE):
    """Proxmox VE's migration API for `nodes`, on 127.0.0.1 over HTTPS (self-signed)."""

    def __init__(
        self, nodes: dict[str, PveNode], image: GuestImage, secret: str, tls_dir: Path
    ) -> None:
        self.pve_nodes = nodes
        self.image = image
        self.secret = secret
        vms = {int(vmid): FakeVM(name) for name, node in nodes.items() for vmid in node.guests}
        tls: ssl.SSLContext = self_signed_tls(tls_dir)
        super().__init__(vms, f"{TOKEN_ID}={secret}", tls)
        self.migrations: list[dict[str, object]] = []

    def __enter__(self) -> LabPveApi:
        super().__enter__()
        return self

    def start_task(self, node: str, vmid: int, target: str) -> str:
        """A `qmigrate` task that ends when the real migration has (called under the lock)."""
        upid = super().start_task(node, vmid, target)
        task = self.tasks[upid]
        task.ends = math.inf  # the fake's timer never ends it: the migration does
        threading.Thread(
            target=self._migrate, args=(task,), name=f"qmigrate-{vmid}", daemon=True
        ).start()
        return upid

    def _migrate(self, task: Task) -> None:
        vmid = str(task.vmid)
        try:
            migration = live_migrate(
                self.pve_nodes[task.node], vmid, self.pve_nodes[task.target], self.image, _listening
            )
        except Exception as exc:  # QEMU's reason, as Proxmox VE ends a failed task
            with self.lock:
                task.exitstatus = f"migration problems: {exc}"
                task.log.append(f"TASK ERROR: {task.exitstatus}")
                task.stopped = True
            return
        transferred = migration.transferred_bytes / MIB
        with self.lock:
            self.vms[task.vmid].node = task.target
            task.log += [
                f"migration active, transferred {transferred:.1f} MiB of "
                f"{transferred:.1f} MiB VM-state",
                f"average migration speed: n/a - downtime {migration.downtime_ms} ms",
                "migration status: completed",
                "TASK OK",
            ]
            task.exitstatus = "OK"
            task.stopped = True
            self.migrations.append(migration.as_dict())
