"""Real servers on loopback: Prometheus (also with rule files and Alertmanagers),
VictoriaMetrics, Alertmanager, and vmbalance-exporter itself.

Plain context managers (not fixtures) so tests, the demo, the lab and the benchmarks can use
them; each runs as a `devkit.service.Service`, logs to a file under the given directory and
shows the log's tail when it fails to start.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import requests
import yaml

from devkit.service import Service, accepts_tcp, free_port, http_ok

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
VICTORIA_METRICS = shutil.which("victoria-metrics") or "/usr/bin/victoria-metrics"

START_TIMEOUT = 30.0


def backfill(openmetrics_path: str | os.PathLike[str], data_dir: str | os.PathLike[str]) -> None:
    """Write TSDB blocks for an OpenMetrics file into `data_dir` (promtool's backfill).

    A directory means every `*.om` file in it, in name order (what
    `devkit.simulate.to_openmetrics_blocks` writes for long histories).
    """
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    source = Path(openmetrics_path)
    files = sorted(source.glob("*.om")) if source.is_dir() else [source]
    for path in files:
        result = subprocess.run(
            [PROMTOOL, "tsdb", "create-blocks-from", "openmetrics", "-q", str(path), str(data_dir)],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if result.returncode != 0:
            tail = "\n".join((result.stdout + result.stderr).splitlines()[-20:])
            raise RuntimeError(f"promtool backfill of {path} failed ({result.returncode}):\n{tail}")


class _Server(ABC):
    """A server on 127.0.0.1:<free port>, run as a `Service`: started and waited for until
    `ready_path` answers 200 on entry, stopped on exit."""

    name = "server"
    ready_path = "/"

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = Path(tmp_path)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.tmp_path / f"{self.name}-{self.port}.log"
        self.service: Service | None = None
        # Basic-auth credentials the readiness check sends (a server with auth answers 401).
        self.auth: tuple[str, str] | None = None

    @abstractmethod
    def command(self) -> list[str]:
        """The server's argv."""

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        return self.service.process if self.service is not None else None

    def __enter__(self) -> Self:
        self.tmp_path.mkdir(parents=True, exist_ok=True)
        self.service = Service(self.name, self.command(), self.log_path).start()
        self.service.wait_ready(
            lambda: http_ok(self.url + self.ready_path, auth=self.auth, timeout=1),
            START_TIMEOUT,
        )
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self) -> None:
        if self.service is not None:
            self.service.stop()

    def query(self, promql: str, time: float | None = None) -> list[dict[str, Any]]:
        """Instant query; returns the `result` list (raises on a non-success answer)."""
        params: dict[str, str | float] = {"query": promql}
        if time is not None:
            params["time"] = time
        response = requests.get(self.url + "/api/v1/query", params=params, timeout=30)
        body = response.json()
        if response.status_code != 200 or body.get("status") != "success":
            raise RuntimeError(f"{promql!r}: HTTP {response.status_code}: {body.get('error')}")
        return list(body["data"]["result"])

    def wait_for(
        self,
        promql: str,
        predicate: Callable[[list[dict[str, Any]]], bool],
        timeout: float = 30.0,
    ) -> list[dict[str, Any]]:
        """Poll `promql` until `predicate(result)` holds; returns that result."""
        deadline = time.monotonic() + timeout
        result: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            try:
                result = self.query(promql)
            except (RuntimeError, requests.RequestException, ValueError):
                result = []
            if predicate(result):
                return result
            time.sleep(0.2)
        raise TimeoutError(f"{promql!r} did not satisfy the predicate in {timeout}s: {result}")


class PrometheusServer(_Server):
    """`prometheus` on 127.0.0.1:<free port> with a generated config.

    `data_dir` lets a test start on blocks written by `backfill`; `scrape_configs` and
    `rule_files` go into the generated prometheus.yml as given; `interval` is the scrape and
    rule evaluation interval (and scrape timeout), `alertmanagers` the ones to notify.
    """

    name = "prometheus"
    ready_path = "/-/ready"

    def __init__(
        self,
        tmp_path: Path,
        scrape_configs: list[dict[str, Any]] | None = None,
        rule_files: Iterable[str | os.PathLike[str]] = (),
        data_dir: str | os.PathLike[str] | None = None,
        extra_args: Sequence[str] = (),
        *,
        interval: str = "15s",
        alertmanagers: Sequence[str] = (),
    ) -> None:
        super().__init__(tmp_path)
        self.interval = interval
        self.alertmanagers = list(alertmanagers)
        self.scrape_configs = list(scrape_configs or [])
        self.rule_files = [str(p) for p in rule_files]
        self.data_dir = Path(data_dir) if data_dir is not None else self.tmp_path / "prom-data"
        self.extra_args = list(extra_args)
        self.config_path = self.tmp_path / f"prometheus-{self.port}.yml"

    def command(self) -> list[str]:
        scrape: dict[str, str] = {"scrape_interval": self.interval}
        if self.interval != "15s":  # a shorter interval needs a timeout no longer than it
            scrape["scrape_timeout"] = self.interval
        config: dict[str, Any] = {
            "global": {**scrape, "evaluation_interval": self.interval},
            "scrape_configs": self.scrape_configs,
        }
        if self.rule_files:
            config["rule_files"] = self.rule_files
        if self.alertmanagers:
            config["alerting"] = {
                "alertmanagers": [{"static_configs": [{"targets": self.alertmanagers}]}]
            }
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        return [
            PROMETHEUS,
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.data_dir}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--storage.tsdb.retention.time=30d",
            *self.extra_args,
        ]


class VictoriaMetricsServer(_Server):
    """Single-node `victoria-metrics` on 127.0.0.1:<free port>, with its default flags (as an
    operator runs it: range timestamps aligned to the step, results cached, the newest 30 s
    hidden from queries at "now"); `extra_args` add flags.
    """

    name = "victoria-metrics"
    ready_path = "/health"

    def __init__(self, tmp_path: Path, extra_args: Sequence[str] = ()) -> None:
        super().__init__(tmp_path)
        self.data_dir = self.tmp_path / f"vm-data-{self.port}"
        self.extra_args = list(extra_args)

    def command(self) -> list[str]:
        return [
            VICTORIA_METRICS,
            f"-httpListenAddr=127.0.0.1:{self.port}",
            f"-storageDataPath={self.data_dir}",
            "-retentionPeriod=1y",
            *self.extra_args,
        ]

    def import_prometheus(self, data: str | os.PathLike[str] | Path) -> None:
        """POST Prometheus text (millisecond timestamps) to `/api/v1/import/prometheus`; a
        `Path` is streamed from disk. Flushes so the samples are searchable at once."""
        url = self.url + "/api/v1/import/prometheus"
        if isinstance(data, str) and not isinstance(data, os.PathLike):
            response = requests.post(url, data=data.encode("utf-8"), timeout=300)
        else:
            with open(data, "rb") as handle:
                response = requests.post(url, data=handle, timeout=300)
        if response.status_code not in (200, 204):
            raise RuntimeError(f"import failed: HTTP {response.status_code}: {response.text}")
        self.flush()

    def flush(self) -> None:
        response = requests.get(self.url + "/internal/force_flush", timeout=60)
        response.raise_for_status()


ALERTMANAGER = (
    shutil.which("prometheus-alertmanager")
    or shutil.which("alertmanager")
    or "/usr/bin/prometheus-alertmanager"
)


class AlertmanagerServer(_Server):
    """`prometheus-alertmanager` on 127.0.0.1:<free port>, clustering off."""

    name = "alertmanager"
    ready_path = "/-/ready"

    def __init__(self, tmp_path: Path, config: dict[str, Any]) -> None:
        super().__init__(tmp_path)
        self.config_path = self.tmp_path / f"alertmanager-{self.port}.yml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        self.data_dir = self.tmp_path / f"alertmanager-data-{self.port}"

    def command(self) -> list[str]:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        return [
            ALERTMANAGER,
            f"--config.file={self.config_path}",
            f"--storage.path={self.data_dir}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--cluster.listen-address=",
            "--log.level=debug",
        ]


# --- vmbalance-exporter ----------------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent


@dataclass
class ExporterProcess:
    """`vmbalance-exporter` on 127.0.0.1:`port`."""

    service: Service
    port: int
    log: Path

    @property
    def process(self) -> subprocess.Popen[bytes]:
        assert self.service.process is not None
        return self.service.process

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.service.stop()


def start_exporter(args: list[str], log: Path, ready_timeout: float = 20.0) -> ExporterProcess:
    """Run `vmbalance-exporter ARGS --listen 127.0.0.1:<free port>` until it accepts TCP."""
    port = free_port()
    argv = [sys.executable, "-m", "exporter.cli", *args, "--listen", f"127.0.0.1:{port}"]
    service = Service("vmbalance-exporter", argv, log, cwd=REPO).start()
    service.wait_ready(lambda: accepts_tcp(port), ready_timeout, interval=0.05)
    return ExporterProcess(service, port, log)
