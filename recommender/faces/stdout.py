"""Stdout carries the requested document and nothing else.

A library may write to file descriptor 1 behind Python's back (HiGHS prints a banner from C
when a solver is created, whatever `output_flag` says). So for the length of a command fd 1
points at stderr, and the document is written to a private duplicate of the original stdout:
chatter from any library, Python or native, lands on stderr, and only the document reaches
whatever stdout was (a pipe, a file, a terminal).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from collections.abc import Iterator
from typing import TextIO


def _flush_c_stdio() -> None:
    """Flush the C library's stdio buffers: a native library's buffered printf must go out
    while fd 1 still points at stderr, not at exit onto the restored stdout."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).fflush(None)


@contextlib.contextmanager
def document_stdout() -> Iterator[TextIO]:
    """Yields the text stream for the document; inside, fd 1 and `sys.stdout` go to stderr."""
    sys.stdout.flush()
    _flush_c_stdio()
    saved = os.dup(1)
    document = open(saved, "w", encoding="utf-8", errors="strict", closefd=True)  # noqa: SIM115
    python_stdout = sys.stdout
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        yield document
        document.flush()
    finally:
        sys.stdout.flush()
        _flush_c_stdio()
        sys.stdout = python_stdout
        os.dup2(saved, 1)
        with contextlib.suppress(BrokenPipeError):
            document.close()


__all__ = ["document_stdout"]
