"""Scratch virtualenvs installed as an operator's would be, from the lock.

The dependencies are `uv.lock` exported for the chosen extras (exact versions, hash-checked),
the project itself a built wheel, not an editable checkout. The files come from uv's cache
where `make venv` has put them; uv still asks the index for what a lock export does not carry
(a `requirements.txt` names versions, not file URLs), so these installs need the index that
`make venv` reached.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
UV = REPO / ".tools" / "bin" / "uv"
# What a wheel of the project is built from (the Dockerfile copies the same).
PROJECT_FILES = ("pyproject.toml", "README.md", "exporter", "recommender")


def _uv(*args: str, cwd: Path = REPO) -> str:
    if not UV.exists():
        raise RuntimeError(f"{UV} is missing: run `make venv` first")
    done = subprocess.run(
        [str(UV), *args], cwd=cwd, capture_output=True, text=True, check=False, timeout=300
    )
    if done.returncode != 0:
        raise RuntimeError(f"uv {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


def locked_requirements(extras: Sequence[str]) -> str:
    """uv.lock as a requirements file for the base install plus `extras`, with hashes."""
    flags = [arg for extra in extras for arg in ("--extra", extra)]
    return _uv("export", "--frozen", "--no-dev", "--no-emit-project", "--quiet", *flags)


def _build_constraints(work: Path) -> Path:
    """The build back-end pins of pyproject's `[tool.uv]`, for building the project's wheel."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    pins = pyproject["tool"]["uv"]["build-constraint-dependencies"]
    path = work / "build-constraints.txt"
    path.write_text("\n".join(pins) + "\n")
    return path


def install(
    venv: Path, extras: Sequence[str], work: Path, *, compile_bytecode: bool = False
) -> Path:
    """A fresh venv at `venv` with vmbalance installed for `extras`; returns its python.

    `compile_bytecode` writes the `.pyc` files as pip does by default (uv does not).
    """
    work.mkdir(parents=True, exist_ok=True)
    _uv("venv", "--quiet", "--python", sys.executable, str(venv))
    python = venv / "bin" / "python"
    requirements = work / "requirements.txt"
    requirements.write_text(locked_requirements(extras))
    common = ["--quiet", "--python", str(python)]
    if compile_bytecode:
        common.append("--compile-bytecode")
    _uv("pip", "install", *common, "--require-hashes", "-r", str(requirements))
    source = work / "src"
    shutil.rmtree(source, ignore_errors=True)
    source.mkdir()
    for name in PROJECT_FILES:
        if (REPO / name).is_dir():
            shutil.copytree(
                REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__")
            )
        else:
            shutil.copy2(REPO / name, source / name)
    constraints = _build_constraints(work)
    _uv("pip", "install", *common, "--no-deps", "--build-constraint", str(constraints),
        str(source))  # fmt: skip
    return python


def site_packages(venv: Path) -> Path:
    (path,) = (venv / "lib").glob("python3*/site-packages")
    return path


def tree_bytes(path: Path) -> int:
    """Bytes in the regular files under `path` (links not followed)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            stat = os.lstat(os.path.join(root, name))
            if not os.path.islink(os.path.join(root, name)):
                total += stat.st_size
    return total
