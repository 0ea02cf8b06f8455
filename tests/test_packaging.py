"""Two deployables from one distribution: the exporter alone is `pip install vmbalance` (plus the
`libvirt` extra on plain libvirt hosts), the recommender is the `recommender` extra.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from devkit.locked_venv import install, site_packages, tree_bytes
from tests.conftest import REPO

# The recommender's stack, by distribution name: none of it belongs on a hypervisor.
HEAVY = frozenset(
    {
        "pandas",
        "numpy",
        "matplotlib",
        "highspy",
        "jinja2",
        "rich",
        "pydantic",
        "pydantic-core",
        "prometheus-api-client",
        "requests",
        "pillow",
        "contourpy",
        "fonttools",
    }
)
FOOTPRINT_LIMIT = 60 * 2**20  # site-packages of the exporter's install, bytes


def _canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _lock() -> dict[str, dict[str, Any]]:
    lock = tomllib.loads((REPO / "uv.lock").read_text(encoding="utf-8"))
    return {_canonical(package["name"]): package for package in lock["package"]}


def _closure(extras: tuple[str, ...]) -> set[str]:
    """Every locked distribution that installing vmbalance with `extras` may bring in.

    Markers are not evaluated, so a package needed on any platform or Python counts: the set
    is what the lock allows, never less than one machine gets.
    """
    packages = _lock()
    root = packages["vmbalance"]
    wanted = list(root.get("dependencies", []))
    for extra in extras:
        wanted += root["optional-dependencies"][extra]
    seen: set[str] = set()
    while wanted:
        dependency = wanted.pop()
        name = _canonical(dependency["name"])
        package = packages[name]
        for extra in dependency.get("extra", []):
            wanted += package.get("optional-dependencies", {})[extra]
        if name not in seen:
            seen.add(name)
            wanted += package.get("dependencies", [])
    return seen


def _recommender_requirements() -> set[str]:
    """The distributions pyproject.toml lists for the `recommender` extra."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    base = {_canonical(_name_of(r)) for r in project["dependencies"]}
    extra = {_canonical(_name_of(r)) for r in project["optional-dependencies"]["recommender"]}
    return extra - base


def _name_of(requirement: str) -> str:
    for i, char in enumerate(requirement):
        if not (char.isalnum() or char in "-_."):
            return requirement[:i]
    return requirement


def test_the_exporters_install_brings_none_of_the_recommenders_stack() -> None:
    exporter = _closure(("libvirt",))
    assert {"prometheus-client", "qemu-qmp", "bcrypt", "pyyaml", "libvirt-python"} <= exporter
    assert not exporter & HEAVY, sorted(exporter & HEAVY)
    assert not exporter & _recommender_requirements()
    # ... while the recommender's extra does bring it.
    recommender = _closure(("recommender",))
    assert {"pandas", "numpy", "matplotlib", "highspy", "pydantic"} <= recommender


def test_config_check_imports_no_data_frames(tmp_path: Path) -> None:
    """`vmbalance config check` validates a file: no data frames, solver, plotting or
    templates. (numpy comes with the rules, whose settings models live beside their checks.)"""
    config = tmp_path / "vmbalance.yml"
    config.write_text("balance:\n  trigger: 0.2\n  target: 0.1\n")
    probe = (
        "import sys\n"
        "from recommender.cli import main\n"
        f"status = main(['config', 'check', {str(config)!r}])\n"
        "heavy = ('pandas', 'matplotlib', 'highspy', 'jinja2', 'rich')\n"
        "print(status, ','.join(m for m in heavy if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, check=True
    )
    assert done.stdout.splitlines()[-1] == "0 ", done.stdout


@pytest.fixture(scope="module")
def exporter_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv with the base install only, from the lock, as on a Proxmox node."""
    work = tmp_path_factory.mktemp("exporter-install")
    install(work / "venv", (), work / "work")
    return work / "venv"


@pytest.mark.slow
def test_vmbalance_without_the_recommender_says_what_to_install(exporter_venv: Path) -> None:
    for args in (["plan", "--input", "snapshot.json"], ["--help"], ["config", "defaults"]):
        done = subprocess.run(
            [str(exporter_venv / "bin" / "vmbalance"), *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2, (args, done.stderr)
        assert done.stdout == ""
        lines = done.stderr.splitlines()
        assert len(lines) == 1, done.stderr
        assert lines[0].startswith("vmbalance: the recommender is not installed (missing ")
        assert lines[0].endswith("pip install 'vmbalance[recommender]'")
        assert "pandas" in lines[0]


@pytest.mark.slow
def test_the_exporter_runs_from_the_base_install(exporter_venv: Path) -> None:
    installed = {
        _canonical(path.name.split("-")[0])
        for path in site_packages(exporter_venv).glob("*.dist-info")
    }
    assert installed == {"bcrypt", "prometheus-client", "pyyaml", "qemu-qmp", "vmbalance"}
    done = subprocess.run(
        [str(exporter_venv / "bin" / "vmbalance-exporter"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and "--backend" in done.stdout, done.stderr
    # Without the libvirt extra, that backend says what to install, in one line.
    done = subprocess.run(
        [str(exporter_venv / "bin" / "vmbalance-exporter"), "--backend", "libvirt"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "vmbalance-exporter: libvirt-python is not installed; pip install 'vmbalance[libvirt]'"
    ]


@pytest.mark.slow
def test_the_exporters_install_is_small(exporter_venv: Path) -> None:
    size = tree_bytes(site_packages(exporter_venv))
    assert size <= FOOTPRINT_LIMIT, f"{size / 2**20:.1f} MiB"
