"""The libvirt backend: live, peer-to-peer migrations through libvirt-python.

The source node's daemon is reached at `output.libvirt_uri` with `{node}` the source (the URI
the plan's `virsh migrate` commands use for the target); `virDomain.migrateToURI3` is called
with that URI for the target and `VIR_MIGRATE_LIVE | VIR_MIGRATE_PEER2PEER`, so the source
daemon talks to the target daemon itself. It blocks until the migration has ended; meanwhile
the job's statistics (`jobStats`) give the progress, and afterwards the completed job's
statistics the downtime and the bytes copied. A cancel is `abortJob`.
"""

from __future__ import annotations

import contextlib
import re
import threading
from typing import Any

from recommender.apply.backend import Outcome, Progress, ProgressCallback
from recommender.apply.steps import Step
from recommender.config import ApplySettings
from recommender.text import one_line

_HOST = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,252})$")


def _libvirt() -> Any:
    try:
        import libvirt
    except ImportError:
        from recommender.errors import CommandError

        raise CommandError(
            "the libvirt backend needs libvirt-python (pip install 'vmbalance[libvirt]')"
        ) from None
    return libvirt


class LibvirtBackend:
    def __init__(self, settings: ApplySettings, uri_template: str) -> None:
        self._settings = settings
        self._template = uri_template
        self._libvirt = _libvirt()
        self._running: dict[int, Any] = {}
        self._lock = threading.Lock()

    def uri(self, node: str) -> str:
        return self._template.replace("{node}", node)

    def cancel(self, step: Step) -> None:
        with self._lock:
            domain = self._running.get(step.step)
        if domain is not None:  # a job already ended raises; its outcome says how it ended
            with contextlib.suppress(self._libvirt.libvirtError):
                domain.abortJob()

    def migrate(self, step: Step, progress: ProgressCallback) -> Outcome:
        lv = self._libvirt
        for node in step.nodes:
            if not _HOST.match(node):
                return Outcome("skipped", f"node {node!r} is not a host name")
        try:
            source = lv.open(self.uri(step.source))
        except lv.libvirtError as exc:
            return Outcome("failed", f"cannot connect to {step.source}: {_error(exc)}")
        try:
            return self._migrate_from(source, step, progress)
        finally:
            source.close()

    def _migrate_from(self, source: Any, step: Step, progress: ProgressCallback) -> Outcome:
        lv = self._libvirt
        try:
            domain = source.lookupByName(step.vm)
        except lv.libvirtError:
            return Outcome("skipped", f"VM {step.vm} is not on {step.source} now")
        if not domain.isActive():
            return Outcome("skipped", f"VM {step.vm} is not running: no live migration")
        with self._lock:
            self._running[step.step] = domain
        done = threading.Event()
        seen: list[Progress] = []

        def report(figures: Progress) -> None:
            seen.append(figures)
            progress(figures)

        watcher = threading.Thread(
            target=self._watch,
            args=(domain, done, report),
            name=f"jobstats-{step.step}",
            daemon=True,
        )
        watcher.start()
        flags = lv.VIR_MIGRATE_LIVE | lv.VIR_MIGRATE_PEER2PEER
        try:
            domain.migrateToURI3(self.uri(step.target), {}, flags)
        except lv.libvirtError as exc:
            return Outcome("failed", _error(exc))
        finally:
            done.set()
            watcher.join()
            with self._lock:
                self._running.pop(step.step, None)
        return self._completed(step, seen[-1] if seen else Progress())

    def _watch(self, domain: Any, done: threading.Event, progress: ProgressCallback) -> None:
        while not done.wait(self._settings.poll_interval_seconds):
            try:
                stats = domain.jobStats()
            except self._libvirt.libvirtError:
                continue
            progress(Progress(_number(stats, "data_processed"), _number(stats, "data_total")))

    def _completed(self, step: Step, last: Progress) -> Outcome:
        """Done only when the target runs the VM; downtime and bytes from the target's record
        of the completed job (the source forgets a transient domain that left)."""
        lv = self._libvirt
        try:
            target = lv.open(self.uri(step.target))
        except lv.libvirtError as exc:
            return Outcome("failed", f"cannot confirm on {step.target}: {_error(exc)}")
        try:
            domain = target.lookupByName(step.vm)
            if not domain.isActive():
                return Outcome("failed", f"VM {step.vm} is not running on {step.target}")
            try:
                stats = domain.jobStats(lv.VIR_DOMAIN_JOB_STATS_COMPLETED)
            except lv.libvirtError:
                stats = {}
        except lv.libvirtError as exc:
            return Outcome("failed", f"VM {step.vm} is not on {step.target}: {_error(exc)}")
        finally:
            target.close()
        downtime = _number(stats, "downtime")
        transferred = _number(stats, "data_processed") or last.bytes_transferred
        return Outcome(
            "done",
            downtime_seconds=downtime / 1000 if downtime is not None else None,
            bytes_transferred=transferred,
            exit_status="OK",
        )


def _number(stats: dict[str, Any], key: str) -> float | None:
    value = stats.get(key)
    return float(value) if isinstance(value, int | float) else None


def _error(exc: Exception) -> str:
    get = getattr(exc, "get_error_message", None)
    return one_line(str(get() if get else exc)) or type(exc).__name__
