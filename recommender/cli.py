"""The `vmbalance` console script; the command line itself is `recommender.faces.cli`."""

from __future__ import annotations

import sys

from recommender.faces.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
