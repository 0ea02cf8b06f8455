"""Shared fixtures: processes the tests start are always stopped by the test that started them."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from devkit.servers import ExporterProcess, start_exporter

REPO = Path(__file__).resolve().parent.parent

# Headless charts everywhere, and no stray user config leaking into the tests.
os.environ.setdefault("MPLBACKEND", "Agg")


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
