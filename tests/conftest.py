"""Shared fixtures: processes the tests start are always stopped by the test that started them."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.servers import free_port

REPO = Path(__file__).resolve().parent.parent

# Headless charts everywhere, and no stray user config leaking into the tests.
os.environ.setdefault("MPLBACKEND", "Agg")


@dataclass
class ExporterProcess:
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_exporter(args: list[str], log: Path, ready_timeout: float = 20.0) -> ExporterProcess:
    """Run `vmbalance-exporter ARGS --listen 127.0.0.1:<free port>` until it accepts TCP."""
    port = free_port()
    handle = log.open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "exporter.cli", *args, "--listen", f"127.0.0.1:{port}"],
        stdout=handle,
        stderr=subprocess.STDOUT,
        cwd=REPO,
    )
    exporter = ExporterProcess(process, port, log)
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"exporter exited {process.returncode}: {log.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return exporter
        except OSError:
            time.sleep(0.05)
    exporter.stop()
    raise RuntimeError(f"exporter did not listen within {ready_timeout}s: {log.read_text()}")


@pytest.fixture
def exporter_factory(tmp_path: Path) -> Iterator[Callable[..., ExporterProcess]]:
    started: list[ExporterProcess] = []

    def factory(*args: str) -> ExporterProcess:
        exporter = start_exporter(list(args), tmp_path / f"exporter-{len(started)}.log")
        started.append(exporter)
        return exporter

    yield factory
    for exporter in started:
        exporter.stop()
