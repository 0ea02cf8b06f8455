"""The layering contracts (pyproject's `[tool.importlinter]`, docs/architecture.md) hold, and
they would catch a break: each forbidden import, planted in a copy of the tree, fails them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
PACKAGES = ("exporter", "recommender", "devkit", "lab")


def _lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--config", str(root / "pyproject.toml")],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _copy_tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    root.mkdir()
    for package in PACKAGES:
        shutil.copytree(
            REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    return root


def test_the_tree_keeps_every_contract(tmp_path: Path) -> None:
    result = _lint_imports(_copy_tree(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "BROKEN" not in result.stdout


@pytest.mark.parametrize(
    ("module", "planted", "contract"),
    [
        ("exporter/cli.py", "import recommender.model", "separate deployables"),
        ("exporter/collector.py", "import pandas", "recommender's libraries"),
        ("recommender/engine/planner.py", "import recommender.source.queries", "snapshots only"),
        ("recommender/engine/scorer.py", "import recommender.plan", "data flow"),
        ("recommender/model.py", "import recommender.config", "resource names"),
        ("recommender/plan.py", "import devkit.simulate", "development kit"),
        ("recommender/source/cluster.py", "import recommender.outputs.table", "does not plan"),
        ("recommender/engine/search.py", "import recommender.apply.queue", "snapshots only"),
        ("recommender/apply/queue.py", "import recommender.outputs.document", "data flow"),
        ("recommender/outputs/table.py", "import recommender.apply.steps", "data flow"),
        ("recommender/apply/steps.py", "import recommender.faces.cli", "data flow"),
        ("recommender/source/history.py", "import recommender.apply.audit", "does not plan"),
        ("exporter/web.py", "import proxmoxer", "recommender's libraries"),
    ],
)
def test_a_planted_import_breaks_its_contract(
    tmp_path: Path, module: str, planted: str, contract: str
) -> None:
    root = _copy_tree(tmp_path)
    path = root / module
    path.write_text(path.read_text(encoding="utf-8") + f"\n{planted}  # planted\n")
    result = _lint_imports(root)
    assert result.returncode != 0, result.stdout
    broken = [line for line in result.stdout.splitlines() if line.endswith("BROKEN")]
    assert len(broken) >= 1 and any(contract in line for line in broken), result.stdout
