"""Replace one `## ` section of docs/benchmarks.md, leaving the others alone."""

from __future__ import annotations

import platform
from datetime import date
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def replace_section(heading: str, body: str, path: Path = DOCS) -> None:
    """Write `## heading` followed by `body`, in place of the section of that name (or at
    the end). The file starts with `# Benchmarks` when it is created."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    lines = text.splitlines()
    title = f"## {heading}"
    section = [title, "", *body.strip("\n").splitlines(), ""]
    if title in lines:
        start = lines.index(title)
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines)
        )
        lines[start:end] = section
    else:
        if lines and lines[-1].strip():
            lines.append("")
        lines.extend(section)
    path.write_text("\n".join(lines).rstrip("\n") + "\n")


def run_line(command: str, load: str, seconds: float) -> str:
    """The line under a benchmark's table: the command, the day, the machine, its load at the
    start and the run's length."""
    return (
        f"Run: `{command}` on {date.today().isoformat()}, {platform.machine()}, 2 cores shared "
        f"with other work (load average {load} at the start), Python "
        f"{platform.python_version()}; {seconds / 60:.0f} min in total."
    )
