"""The product stays readable in one sitting: no module over 600 lines, no function over 100.

ruff's complexity rules (C901, PLR0915) bound branches and statements; this bounds plain
length, which a long table or a long string can grow without either rule noticing.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PRODUCT = ("exporter", "recommender")
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 100


def oversized(root: Path) -> list[str]:
    """Every module under `root` longer than the limit, and every function (methods and
    nested functions included, decorators not) longer than its limit."""
    found: list[str] = []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        where = path.relative_to(root.parent)
        lines = len(text.splitlines())
        if lines > MAX_MODULE_LINES:
            found.append(f"{where}: {lines} lines")
        for node in ast.walk(ast.parse(text, filename=str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    found.append(f"{where}:{node.lineno} {node.name}: {length} lines")
    return found


@pytest.mark.parametrize("package", PRODUCT)
def test_no_product_module_or_function_is_over_its_length(package: str) -> None:
    root = REPO / package
    assert list(root.rglob("*.py")), f"no modules under {package}/"
    assert oversized(root) == []


def _function(name: str, lines: int, indent: str = "") -> str:
    """A function of exactly `lines` lines."""
    body = "".join(f"{indent}    x{i} = {i}\n" for i in range(lines - 2))
    return f"{indent}def {name}() -> int:\n{body}{indent}    return 0\n"


def test_a_function_or_module_over_its_length_is_found(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "at_limits.py").write_text(
        _function("fits", MAX_FUNCTION_LINES)
        + "\n" * (MAX_MODULE_LINES - MAX_FUNCTION_LINES - 1)
        + "VALUE = 1\n"
    )
    (package / "long_function.py").write_text(_function("too_long", MAX_FUNCTION_LINES + 1))
    (package / "long_method.py").write_text(
        "class Holder:\n" + _function("too_long_method", MAX_FUNCTION_LINES + 1, "    ")
    )
    (package / "long_module.py").write_text("VALUE = 1\n" * (MAX_MODULE_LINES + 1))
    assert len((package / "at_limits.py").read_text().splitlines()) == MAX_MODULE_LINES

    assert oversized(package) == [
        "pkg/long_function.py:1 too_long: 101 lines",
        "pkg/long_method.py:2 too_long_method: 101 lines",
        "pkg/long_module.py: 601 lines",
    ]
