"""The test environment is the locked one: every package uv.lock pins for this platform is
installed at exactly that version, so a green suite speaks for the versions a fresh machine gets.
"""

from __future__ import annotations

import runpy
import sysconfig
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import Marker

REPO = Path(__file__).resolve().parent.parent


def _canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _installed() -> dict[str, str]:
    return {_canonical(d.metadata["Name"]): d.version for d in metadata.distributions()}


def test_every_installed_package_has_the_locked_version() -> None:
    lock = tomllib.loads((REPO / "uv.lock").read_text(encoding="utf-8"))
    locked = {}
    for package in lock["package"]:
        if "version" not in package or "editable" in package.get("source", {}):
            continue
        # A package locked at different versions per Python has a marker on each entry.
        markers = package.get("resolution-markers")
        if markers and not any(Marker(m).evaluate() for m in markers):
            continue
        locked[_canonical(package["name"])] = package["version"]
    installed = _installed()
    if "prometheus-client" not in installed:
        pytest.fail("the suite is not running in the project's environment")
    wrong = {
        name: (installed[name], version)
        for name, version in locked.items()
        if name in installed and installed[name] != version
    }
    assert not wrong, f"installed versions differ from uv.lock (installed, locked): {wrong}"
    # The packages the product imports are all there, from the lock.
    for name in ("prometheus-client", "pandas", "highspy", "pydantic", "rich", "hypothesis"):
        assert installed.get(name) == locked[name]


def test_pyproject_keeps_lower_bounds_not_pins() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    requirements = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        requirements += extra
    pinned = [r for r in requirements if "==" in r]
    assert not pinned, f"exact versions belong in uv.lock, not pyproject.toml: {pinned}"
    assert isinstance(project["license"], str), "license is an SPDX expression string"


def test_only_the_product_is_installed() -> None:
    """The development kit (simulator, instance generators, test servers) is not part of the
    distribution: the installed `vmbalance` holds the two product packages alone."""
    # The installed distribution, not a build's egg-info the working tree may hold.
    site = sysconfig.get_paths()["purelib"]
    (installed,) = [d for d in metadata.distributions(path=[site]) if d.name == "vmbalance"]
    files = installed.files or []
    finder = next(
        (f for f in files if f.name.startswith("__editable__") and f.name.endswith("finder.py")),
        None,
    )
    if finder is not None:  # an editable install maps each packaged top-level name
        packaged = set(runpy.run_path(str(finder.locate()))["MAPPING"])
    else:
        packaged = {
            f.parts[0] for f in files if len(f.parts) > 1 and not f.parts[0].endswith("-info")
        }
    assert packaged == {"exporter", "recommender"}
