"""The Proxmox VE backend: live migrations through the cluster's HTTP API (proxmoxer), with an
API token.

A migration: `GET /cluster/resources?type=vm` (where the VM is now, and whether HA manages
it); for a VM HA does not manage, `GET /nodes/{source}/qemu/{vmid}/migrate` (may it go to the
target, has it local disks), `POST` the same path with `target`, `online=1` and
`with-local-disks=1` where allowed, then the task's UPID is polled through
`/nodes/{source}/tasks/{upid}/status` until it has stopped; its `exitstatus` (`OK` or the
error) and the tail of `/tasks/{upid}/log` are kept, downtime and bytes read from that log.
An HA-managed VM is migrated by the HA stack: `POST /cluster/ha/resources/vm:{vmid}/migrate`
with `node`, then the VM's node is watched until it is the target. A migration is done only
when the task said OK and the VM is on the target.
"""

from __future__ import annotations

import os
import re
import threading
import time
from typing import Any
from urllib.parse import urlsplit

import requests
from proxmoxer import ProxmoxAPI, ResourceException

from recommender.apply.backend import Outcome, Progress, ProgressCallback
from recommender.apply.steps import Step
from recommender.config import ApplySettings, ProxmoxApiSettings
from recommender.errors import CommandError
from recommender.text import one_line

LOG_TAIL_LINES = 20
_DOWNTIME = re.compile(r"downtime ([0-9]+) ms")
_TRANSFERRED = re.compile(r"transferred ([0-9.]+) ([KMGT]?i?B) of")
_UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


def token_secret(settings: ProxmoxApiSettings) -> str:
    """The API token's secret, from its file or the environment; kept in memory only."""
    if settings.token_secret_file:
        try:
            with open(settings.token_secret_file, encoding="utf-8") as handle:
                secret = handle.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise CommandError(
                f"apply.proxmox.token_secret_file {settings.token_secret_file}: cannot read: "
                f"{reason}"
            ) from None
    else:
        secret = os.environ.get(settings.token_secret_env, "").strip()
    if not secret:
        raise CommandError(
            "no Proxmox API token secret: set apply.proxmox.token_secret_file "
            f"or ${settings.token_secret_env}"
        )
    return secret


def connect(settings: ProxmoxApiSettings) -> Any:
    """A proxmoxer client for the configured API and token."""
    user, sep, token_name = settings.token_id.partition("!")
    if not sep or "@" not in user or not token_name:
        raise CommandError("apply.proxmox.token_id: must be USER@REALM!TOKENID")
    parts = urlsplit(settings.url)
    verify: bool | str = settings.ca_file or settings.verify_tls
    return ProxmoxAPI(
        parts.hostname if ":" not in (parts.hostname or "") else f"[{parts.hostname}]",
        port=parts.port or 8006,
        user=user,
        token_name=token_name,
        token_value=token_secret(settings),
        verify_ssl=verify,
        timeout=settings.timeout_seconds,
        path_prefix=parts.path.strip("/") or None,
    )


def _api_error(exc: Exception) -> str:
    """One line for a failed API call: the status and Proxmox's message (its reason phrase),
    and the parameter errors when there are any."""
    if isinstance(exc, ResourceException):
        message = str(exc.content or exc.status_message)
        errors = f": {exc.errors}" if exc.errors else ""
        return one_line(f"{exc.status_code} {message}{errors}")
    if isinstance(exc, requests.Timeout):
        return "API timeout"
    return one_line(str(exc)) or type(exc).__name__


def _log_figures(lines: list[str]) -> tuple[float | None, float | None]:
    """Downtime (seconds) and bytes copied, as the migration task logged them."""
    downtime = transferred = None
    for line in lines:
        if match := _DOWNTIME.search(line):
            downtime = int(match.group(1)) / 1000
        if match := _TRANSFERRED.search(line):
            unit = _UNITS.get(match.group(2).replace("iB", "iB"), 1)
            transferred = float(match.group(1)) * unit
    return downtime, transferred


class ProxmoxBackend:
    def __init__(self, settings: ApplySettings, api: Any = None) -> None:
        self._settings = settings
        self._api = api if api is not None else connect(settings.proxmox)
        self._cancelled: set[int] = set()
        self._lock = threading.Lock()

    def cancel(self, step: Step) -> None:
        with self._lock:
            self._cancelled.add(step.step)

    def _where(self, vmid: int) -> dict[str, Any] | None:
        for entry in self._api.cluster.resources.get(type="vm"):
            if int(entry.get("vmid", -1)) == vmid:
                return dict(entry)
        return None

    def migrate(self, step: Step, progress: ProgressCallback) -> Outcome:
        if not step.vm.isascii() or not step.vm.isdigit():
            return Outcome("skipped", f"{step.vm!r} is not a Proxmox VMID")
        vmid = int(step.vm)
        try:
            entry = self._where(vmid)
        except Exception as exc:
            return Outcome("failed", f"cannot read the cluster: {_api_error(exc)}")
        if entry is None:
            return Outcome("skipped", f"VM {vmid} is not in the cluster")
        if entry.get("node") != step.source:
            return Outcome(
                "skipped", f"VM {vmid} is on {entry.get('node')} now, not on {step.source}"
            )
        if entry.get("hastate"):
            return self._migrate_ha(step, vmid)
        return self._migrate_task(step, vmid, entry, progress)

    def _migrate_task(
        self, step: Step, vmid: int, entry: dict[str, Any], progress: ProgressCallback
    ) -> Outcome:
        qemu = self._api.nodes(step.source).qemu(vmid)
        try:
            check = qemu.migrate.get(target=step.target) or {}
        except Exception as exc:
            return Outcome("failed", f"migration check: {_api_error(exc)}")
        refused = (check.get("not_allowed_nodes") or {}).get(step.target)
        if refused is not None:
            return Outcome("skipped", f"Proxmox refuses {step.target}: {one_line(str(refused))}")
        params: dict[str, Any] = {"target": step.target}
        if entry.get("status") == "running" or check.get("running"):
            params["online"] = 1
        if check.get("local_disks"):
            if not self._settings.proxmox.with_local_disks:
                return Outcome(
                    "skipped", "VM has local disks and apply.proxmox.with_local_disks is off"
                )
            params["with-local-disks"] = 1
        try:
            upid = str(qemu.migrate.post(**params))
        except Exception as exc:
            return Outcome("failed", f"migrate: {_api_error(exc)}")
        return self._follow(step, vmid, upid, progress)

    def _follow(self, step: Step, vmid: int, upid: str, progress: ProgressCallback) -> Outcome:
        task = self._api.nodes(step.source).tasks(upid)
        misses = 0
        status: dict[str, Any] = {}
        while True:
            with self._lock:
                cancel = step.step in self._cancelled
                self._cancelled.discard(step.step)
            try:
                if cancel:
                    task.delete()
                status = dict(task.status.get())
                misses = 0
            except Exception as exc:
                misses += 1
                if misses > self._settings.proxmox.poll_retries:
                    return Outcome("failed", f"task {upid}: state unknown: {_api_error(exc)}")
            if status.get("status") == "stopped":
                break
            progress(Progress())
            time.sleep(self._settings.poll_interval_seconds)
        tail = self._log_tail(task)
        downtime, transferred = _log_figures(tail)
        exit_status = str(status.get("exitstatus", ""))
        if exit_status != "OK":
            return Outcome(
                "failed",
                f"task {upid}: {one_line(exit_status) or 'no exit status'}",
                downtime,
                transferred,
                tuple(tail),
                exit_status,
            )
        return self._confirm(
            step, vmid, Outcome("done", "", downtime, transferred, tuple(tail), exit_status)
        )

    def _log_tail(self, task: Any) -> list[str]:
        try:
            lines = task.log.get(start=0, limit=100000) or []
        except Exception as exc:
            return [f"task log unavailable: {_api_error(exc)}"]
        return [str(line.get("t", "")) for line in lines][-LOG_TAIL_LINES:]

    def _confirm(self, step: Step, vmid: int, outcome: Outcome) -> Outcome:
        """Done only when the cluster shows the VM on the target."""
        try:
            entry = self._where(vmid)
        except Exception as exc:
            return _as_failed(outcome, f"cannot confirm the VM's node: {_api_error(exc)}")
        node = entry.get("node") if entry else None
        if node != step.target:
            return _as_failed(outcome, f"task ended OK but VM {vmid} is on {node}")
        return outcome

    def _migrate_ha(self, step: Step, vmid: int) -> Outcome:
        sid = f"vm:{vmid}"
        try:
            self._api.cluster.ha.resources(sid).migrate.post(node=step.target)
        except Exception as exc:
            return Outcome("failed", f"HA migrate {sid}: {_api_error(exc)}")
        misses = 0
        while True:
            try:
                entry = self._where(vmid) or {}
                misses = 0
            except Exception as exc:
                misses += 1
                if misses > self._settings.proxmox.poll_retries:
                    return Outcome("failed", f"HA migrate {sid}: state unknown: {_api_error(exc)}")
                entry = {}
            if entry.get("hastate") == "error":
                return Outcome("failed", f"HA migrate {sid}: the HA resource is in error state")
            if entry.get("node") == step.target and entry.get("status") == "running":
                return Outcome("done", exit_status="OK")
            time.sleep(self._settings.poll_interval_seconds)


def _as_failed(outcome: Outcome, reason: str) -> Outcome:
    return Outcome(
        "failed",
        reason,
        outcome.downtime_seconds,
        outcome.bytes_transferred,
        outcome.log_tail,
        outcome.exit_status,
    )
