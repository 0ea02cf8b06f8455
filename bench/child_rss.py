"""Peak RSS of a command, its own and not its caller's.

A forked child starts with a copy of its parent's memory map, and on exec Linux keeps that
copy's high-water mark in the child's `ru_maxrss`: a command started from a benchmark that
holds a large store in memory would report the benchmark's RSS. `Measured.run` therefore
starts this module as a small launcher process (`python -m`-style, by path) that forks the
command from its own small map, waits for it with wait4 and writes the command's usage to a
file: the number is the command's.

Used as a script: `child_rss.py OUT_FILE COMMAND [ARGS...]`; exits with the command's code.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO


@dataclass(frozen=True)
class ChildRun:
    wall: float  # seconds
    peak_rss_mib: float
    code: int


def run(
    command: list[str],
    timeout: float,
    stdout: int | IO[bytes] = subprocess.DEVNULL,
    stderr: int | IO[bytes] = subprocess.DEVNULL,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> ChildRun:
    """`command` through the launcher: wall time, its peak RSS (MiB) and exit code; the
    launcher's process group is killed after `timeout` seconds."""
    with tempfile.TemporaryDirectory(prefix="vmbalance-rss-") as tmp:
        report = Path(tmp) / "usage.json"
        started = time.perf_counter()
        process = subprocess.Popen(
            [sys.executable, __file__, str(report), *command],
            stdout=stdout,
            stderr=stderr,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            code = process.wait()
        wall = time.perf_counter() - started
        peak = json.loads(report.read_text())["maxrss_kib"] / 1024 if report.exists() else 0.0
    return ChildRun(wall, peak, code)


def _launch(report: str, command: list[str]) -> int:
    pid = os.fork()
    if pid == 0:  # the command, forked from this small process
        try:
            os.execvp(command[0], command)
        finally:
            os._exit(127)
    _, status, usage = os.wait4(pid, 0)
    Path(report).write_text(json.dumps({"maxrss_kib": usage.ru_maxrss}))
    return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    sys.exit(_launch(sys.argv[1], sys.argv[2:]))
