"""Prometheus with rule files, a short evaluation interval and Alertmanager targets, a real
Alertmanager, and small HTTP servers (a scrape target, a webhook receiver) — all on loopback,
all context managers that stop what they started.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Callable, Iterable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from tests.servers import PrometheusServer, _Server

ALERTMANAGER = (
    shutil.which("prometheus-alertmanager")
    or shutil.which("alertmanager")
    or "/usr/bin/prometheus-alertmanager"
)


class RulePrometheus(PrometheusServer):
    """PrometheusServer whose generated config also sets the scrape and rule evaluation
    intervals and the Alertmanagers to notify."""

    def __init__(
        self,
        tmp_path: Path,
        scrape_configs: list[dict[str, Any]] | None = None,
        rule_files: Iterable[str | os.PathLike[str]] = (),
        data_dir: str | os.PathLike[str] | None = None,
        extra_args: Sequence[str] = (),
        *,
        interval: str = "1s",
        alertmanagers: Sequence[str] = (),
    ) -> None:
        super().__init__(tmp_path, scrape_configs, rule_files, data_dir, extra_args)
        self.interval = interval
        self.alertmanagers = list(alertmanagers)

    def command(self) -> list[str]:
        argv = super().command()
        config = yaml.safe_load(self.config_path.read_text(encoding="utf-8"))
        config["global"] = {
            "scrape_interval": self.interval,
            "scrape_timeout": self.interval,
            "evaluation_interval": self.interval,
        }
        if self.alertmanagers:
            config["alerting"] = {
                "alertmanagers": [{"static_configs": [{"targets": self.alertmanagers}]}]
            }
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        return argv

    def __enter__(self) -> RulePrometheus:
        super().__enter__()
        return self


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

    def __enter__(self) -> AlertmanagerServer:
        super().__enter__()
        return self


class HTTPEndpoint:
    """A ThreadingHTTPServer on 127.0.0.1:<free port> in a daemon thread.

    `on_get(path) -> (status, content type, body)` answers GETs; POST bodies are parsed as
    JSON and appended to `posts` as (path, body)."""

    def __init__(self, on_get: Callable[[str], tuple[int, str, bytes]] | None = None) -> None:
        self.posts: list[tuple[str, Any]] = []
        self.received = threading.Condition()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if on_get is None:
                    self.send_error(404)
                    return
                status, content_type, body = on_get(self.path)
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length) or b"null")
                with endpoint.received:
                    endpoint.posts.append((self.path, body))
                    endpoint.received.notify_all()
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> HTTPEndpoint:
        self.thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)

    def wait_for_post(
        self, predicate: Callable[[str, Any], bool], timeout: float
    ) -> tuple[str, Any]:
        """The first POST (received so far or within `timeout` s) that satisfies `predicate`."""
        with self.received:
            found = self.received.wait_for(
                lambda: next((p for p in self.posts if predicate(*p)), None), timeout=timeout
            )
        if found is None:
            raise TimeoutError(f"no matching POST within {timeout}s; got {self.posts!r}")
        return found
