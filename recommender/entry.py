"""The `vmbalance` command's entry point: one line, not a traceback, without the recommender's
libraries.

`pip install vmbalance` installs the exporter alone (it goes on every hypervisor); the
recommender's libraries come with the `recommender` extra. This module imports none of them,
so it can say which are missing and how to install them.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata

DISTRIBUTION = "vmbalance"
EXTRA = "recommender"
INSTALL = f"pip install '{DISTRIBUTION}[{EXTRA}]'"
EXIT_ERROR = 2

_NAME = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)")
_OF_EXTRA = re.compile(rf"""extra\s*==\s*["']{EXTRA}["']""")


def missing_requirements() -> list[str]:
    """The recommender extra's requirements that are not installed (none when the package
    itself is not installed, e.g. run from a source tree: nothing to compare with then)."""
    try:
        requirements = metadata.requires(DISTRIBUTION) or []
    except metadata.PackageNotFoundError:
        return []
    missing = []
    for requirement in requirements:
        _, _, marker = requirement.partition(";")
        name = _NAME.match(requirement)
        if name is None or not _OF_EXTRA.search(marker):
            continue
        try:
            metadata.version(name.group(1))
        except metadata.PackageNotFoundError:
            missing.append(name.group(1))
    return missing


def main() -> int:
    try:
        from recommender.cli import main as run

        return run()
    except ModuleNotFoundError:
        missing = missing_requirements()
        if not missing:
            raise
        print(
            f"vmbalance: the recommender is not installed (missing {', '.join(missing)}): "
            f"{INSTALL}",
            file=sys.stderr,
        )
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
