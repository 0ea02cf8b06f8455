"""Install footprint: site-packages of the exporter's install against the full one.

Each install is a fresh venv with vmbalance installed from uv.lock as an operator's pip would
install it (the locked versions, the project as a wheel, `.pyc` files written as pip writes
them by default): the base install (the exporter, as on a Proxmox node), the base with the
`libvirt` extra (a plain libvirt host), and both extras (`libvirt` and `recommender`: what
every node got before the recommender had an extra of its own). Prints Markdown and rewrites
this benchmark's section of docs/benchmarks.md.

Run: .venv/bin/python bench/bench_install_footprint.py [--no-write]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import subprocess
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from docs_section import replace_section

from devkit.locked_venv import install, site_packages, tree_bytes

HEADING = "Install footprint: the exporter alone vs the full install"
GOAL_MB = 60.0
INSTALLS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("vmbalance (the exporter; Proxmox nodes)", ()),
    ("vmbalance[libvirt] (the exporter on a libvirt host)", ("libvirt",)),
    ("vmbalance[libvirt,recommender] (everything)", ("libvirt", "recommender")),
)


@dataclass(frozen=True)
class Footprint:
    label: str
    extras: tuple[str, ...]
    total: int  # bytes of site-packages
    by_top_level: dict[str, int]  # bytes per top-level entry of site-packages


def measure(work: Path, label: str, extras: tuple[str, ...]) -> Footprint:
    name = "-".join(extras) or "base"
    venv = work / name
    install(venv, extras, work / f"{name}-work", compile_bytecode=True)
    root = site_packages(venv)
    sizes: dict[str, int] = defaultdict(int)
    for entry in root.iterdir():
        key = entry.name.split("-")[0].removesuffix(".py").removesuffix(".libs")
        sizes[key] += tree_bytes(entry) if entry.is_dir() else entry.stat().st_size
    return Footprint(label, extras, tree_bytes(root), dict(sizes))


def plain_venv_bytes(venv: Path) -> int:
    """site-packages of an empty `python -m venv`: the pip (and setuptools) it brings."""
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    return tree_bytes(site_packages(venv))


def mb(size: int) -> str:
    return f"{size / 1e6:.1f}"


def _label(label: str) -> str:
    """`vmbalance[extra]` as code, the words after it as they are."""
    install, _, why = label.partition(" ")
    return f"`{install}` {why}"


def render(footprints: list[Footprint], installer: int) -> str:
    base, *_, full = footprints
    largest = sorted(base.by_top_level.items(), key=lambda item: -item[1])[:5]
    verdict = "met" if base.total / 1e6 <= GOAL_MB else "not met"
    lines = [
        "Bytes of the files in `site-packages` of a fresh venv per install, from uv.lock: the "
        "locked versions, hash-checked, the project installed as a wheel and `.pyc` files "
        "written as pip writes them by default. The venvs are made by uv and hold no installer; "
        "one made by `python -m venv` adds its own pip and setuptools to each "
        f"({mb(installer)} MB here). MB = 10^6 bytes.",
        "",
        "- Command: `.venv/bin/python bench/bench_install_footprint.py`",
        f"- Date: {datetime.datetime.now(datetime.UTC).date().isoformat()}",
        f"- Machine: Python {platform.python_version()}, {platform.machine()}",
        "",
        "| install | site-packages (MB) |",
        "| --- | ---: |",
        *(f"| {_label(f.label)} | {mb(f.total)} |" for f in footprints),
        "",
        f"- The exporter's install: {mb(base.total)} MB (goal ≤ {GOAL_MB:.0f} MB: {verdict}), "
        f"{base.total / full.total:.3f}× the full install's {mb(full.total)} MB: what "
        "`pip install 'vmbalance[libvirt]'` put on every libvirt host while the recommender's "
        "libraries were base dependencies.",
        "- Largest parts of the exporter's install: "
        + ", ".join(f"{name} {mb(size)} MB" for name, size in largest)
        + ".",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="vmbalance-footprint-") as tmp:
        footprints = [measure(Path(tmp), label, extras) for label, extras in INSTALLS]
        installer = plain_venv_bytes(Path(tmp) / "plain")
    text = render(footprints, installer)
    print(f"## {HEADING}\n\n{text}")
    if not args.no_write:
        replace_section(HEADING, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
