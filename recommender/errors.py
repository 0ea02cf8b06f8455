"""`CommandError`: a one-line reason to stop, raised wherever an operator's input cannot be
used (the faces turn it and the other errors an operator can cause into one line:
`recommender.faces.errors`)."""

from __future__ import annotations


class CommandError(Exception):
    """A one-line reason to stop with exit status 2."""
