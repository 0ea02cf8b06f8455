"""Every benchmark starts as docs/benchmarks.md runs it: `python bench/NAME.py`, from any
directory, with nothing on PYTHONPATH (it finds the development kit and its neighbours itself)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
SCRIPTS = sorted(BENCH.glob("bench_*.py"))


def test_there_are_benchmarks() -> None:
    assert SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_the_benchmark_starts_from_anywhere(script: Path, tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, str(script), "--help"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage:")


def test_a_commands_peak_rss_is_its_own_not_the_benchmarks(tmp_path: Path) -> None:
    """A child forked from a process holding 400 MiB reports that in its ru_maxrss even after
    exec; through `child_rss` a small command reports its own few MiB."""
    sys.path.insert(0, str(BENCH))
    try:
        import child_rss
    finally:
        sys.path.remove(str(BENCH))
    held = bytearray(400 * 1024 * 1024)
    held[::4096] = b"x" * len(range(0, len(held), 4096))  # touch every page
    small = [sys.executable, "-c", "pass"]
    direct = subprocess.Popen(small)
    _, _, usage = os.wait4(direct.pid, 0)
    assert usage.ru_maxrss / 1024 > 300  # the quirk the launcher is for
    done = child_rss.run(small, timeout=60)
    assert done.code == 0 and 0 < done.peak_rss_mib < 100
    failing = child_rss.run([sys.executable, "-c", "raise SystemExit(3)"], timeout=60)
    assert failing.code == 3
    del held
