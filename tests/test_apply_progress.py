"""What `vmbalance apply` shows while it runs: a live table on a terminal, one plain line per
event anywhere else, and nothing of it on stdout."""

from __future__ import annotations

import io
import ssl
from pathlib import Path

import pytest
from rich.console import Console

from devkit.fake_pve import FakePVE, FakeVM
from recommender.apply.backend import Progress
from recommender.apply.steps import Step
from recommender.config import ApplySettings
from recommender.faces.apply_progress import LineProgress, LiveProgress, byte_size
from recommender.faces.cli import main
from tests.test_apply_proxmox import fake, setup, start, tls

__all__ = ["fake", "tls"]  # the fixtures, used by name

pytestmark = pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")

GIB = 2**30
SETTINGS = ApplySettings(bandwidth_bytes_per_second=GIB / 4, startup_seconds=10)


def step(number: int, vm: str, source: str, target: str, wave: int = 1) -> Step:
    return Step(number, wave, vm, vm, source, target, "balance", 2.0 * GIB)


def test_off_a_terminal_each_event_is_one_plain_line_on_stderr(
    tmp_path: Path, tls: ssl.SSLContext, fake: list[FakePVE], capfd: pytest.CaptureFixture[str]
) -> None:
    pve = start(tls, {101: FakeVM("pve1"), 102: FakeVM("pve2")})
    fake.append(pve)
    args = setup(tmp_path, pve, [(101, "pve1", "pve2", 1), (102, "pve2", "pve3", 2)])
    assert main(args) == 0
    printed = capfd.readouterr()
    assert printed.out == ""
    assert "\x1b[" not in printed.err  # no cursor movement, no colour
    events = [line for line in printed.err.splitlines() if line.startswith("step ")]
    kinds = [line.split(": ")[1].split(",")[0] for line in events]
    assert [k for k in kinds if k != "progress"] == ["started", "done", "started", "done"]
    assert events[0].startswith("step 1 101 pve1 → pve2: started, 0 s of ~")
    progress = [line for line in events if ": progress," in line]
    assert all(line.endswith(("GiB", "MiB", "KiB", " B", "?")) for line in progress)


def test_line_progress_shows_progress_at_most_every_ten_seconds() -> None:
    out = io.StringIO()
    now = [100.0]
    view = LineProgress(Console(file=out, width=200), SETTINGS, clock=lambda: now[0])
    s = step(1, "101", "pve1", "pve2")
    view("started", s, "pve1 → pve2", Progress())
    for _ in range(5):  # five reports within three seconds
        now[0] += 0.6
        view("progress", s, "", Progress(GIB, 2 * GIB))
    now[0] += 10
    view("progress", s, "", Progress(1.5 * GIB, 2 * GIB))
    view("done", s, "", Progress(2 * GIB, 2 * GIB))
    assert out.getvalue().splitlines() == [
        "step 1 101 pve1 → pve2: started, 0 s of ~18 s: pve1 → pve2",
        "step 1 101 pve1 → pve2: progress, 1 s of ~18 s: 1.0 GiB of 2.0 GiB",
        "step 1 101 pve1 → pve2: progress, 13 s of ~18 s: 1.5 GiB of 2.0 GiB",
        "step 1 101 pve1 → pve2: done, 13 s of ~18 s",
    ]


def test_the_live_table_has_a_row_per_migration_with_state_bytes_and_time() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120, color_system=None)
    now = [0.0]
    steps = [
        step(1, "101", "pve1", "pve2"),
        step(2, "102", "pve2", "pve3", 2),
        step(3, "103", "pve3", "pve1"),
    ]
    view = LiveProgress(console, SETTINGS, steps, clock=lambda: now[0], refresh_per_second=50)
    with view:
        view("started", steps[0], "pve1 → pve2", Progress())
        view("started", steps[2], "pve3 → pve1", Progress())
        now[0] = 75.0
        view("progress", steps[0], "", Progress(GIB, 2 * GIB))
        running = Console(width=120, record=True, color_system=None)
        running.print(view.table())
        text = running.export_text()
        view("done", steps[0], "", Progress(2 * GIB, 2 * GIB))
        view("failed", steps[2], "migration aborted", Progress())
        view("skipped", steps[1], "waits for step 1", Progress())
    rows = {line.split("│")[1].strip(): line for line in text.splitlines() if "│" in line}
    assert "running" in rows["1"] and "1.0 GiB of 2.0 GiB" in rows["1"]
    assert "1m15s / ~18s" in rows["1"]
    assert "waiting" in rows["2"] and "- / ~18s" in rows["2"]
    assert "running" in rows["3"] and "1m15s / ~18s" in rows["3"]
    # on the terminal: redrawn in place, the last frame final
    written = out.getvalue()
    assert "\x1b[" in written
    last = written[written.rindex("migrations") :]
    assert "done" in last and "failed: migration aborted" in last
    assert "skipped: waits for step 1" in last
    assert "running" not in last


def test_byte_sizes() -> None:
    assert [byte_size(v) for v in (None, 512, 1536, 3 * 2**20, 5.5 * GIB)] == [
        "?",
        "512 B",
        "1.5 KiB",
        "3.0 MiB",
        "5.5 GiB",
    ]
