"""The document alone on stdout, whatever a library writes to fd 1 from C or from Python."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO

CHILD = """
import ctypes, os, sys
from recommender.faces.stdout import document_stdout

libc = ctypes.CDLL(None)
with document_stdout() as out:
    # C's stdout is fully buffered (a pipe, no PYTHONUNBUFFERED): this waits in the buffer
    # and would go out at exit, onto the real stdout, unless flushed in time.
    libc.printf(b"buffered native chatter\\n")
    os.write(1, b"unbuffered native chatter\\n")
    print("python chatter")
    out.write("the document\\n")
libc.printf(b"")  # nothing pending any more
"""


def test_native_and_python_chatter_go_to_stderr() -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    done = subprocess.run(
        [sys.executable, "-c", CHILD], cwd=REPO, env=env, capture_output=True, timeout=60,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"the document\n"
    for chatter in (b"buffered native chatter", b"unbuffered native chatter", b"python chatter"):
        assert chatter in done.stderr
