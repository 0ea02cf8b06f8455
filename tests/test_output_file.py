"""The one writer of every file the product writes: atomic over regular files only; devices,
FIFOs and `/dev/stdout` written in place; symlinks followed, never replaced."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from recommender.output_file import OutputFileError, write_output
from tests.conftest import REPO

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="mknod needs root")


def null_device(directory: Path) -> Path:
    """A character device node with the null device's numbers, inside the test's directory."""
    path = directory / "null"
    os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    return path


class FifoReader:
    """Reads a FIFO to its end in a thread (opening a FIFO for writing waits for a reader)."""

    def __init__(self, path: Path) -> None:
        os.mkfifo(path)
        self.path = path
        self.data = b""
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        with open(self.path, "rb") as handle:
            self.data = handle.read()

    def result(self) -> bytes:
        self._thread.join(timeout=30)
        assert not self._thread.is_alive(), "nothing was written to the FIFO"
        return self.data


def test_regular_file_is_replaced_atomically_keeping_its_mode(tmp_path: Path) -> None:
    target = tmp_path / "plan.json"
    target.write_text("old")
    target.chmod(0o640)
    before = target.stat().st_ino
    write_output(target, "new\n")
    assert target.read_text() == "new\n"
    assert target.stat().st_ino != before  # a new file renamed over the old one
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]


def test_new_file_follows_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        write_output(tmp_path / "new.json", b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "new.json").stat().st_mode) == 0o640


def test_symlink_target_is_replaced_and_the_link_kept(tmp_path: Path) -> None:
    real = tmp_path / "data" / "plan.json"
    real.parent.mkdir()
    real.write_text("old")
    link = tmp_path / "current.json"
    link.symlink_to("data/plan.json")
    chain = tmp_path / "chain.json"
    chain.symlink_to(link)
    write_output(chain, "new")
    assert chain.is_symlink() and os.readlink(chain) == str(link)
    assert link.is_symlink() and os.readlink(link) == "data/plan.json"
    assert real.read_text() == "new"
    dangling = tmp_path / "later.json"
    dangling.symlink_to("data/not-yet.json")
    write_output(dangling, "created")
    assert dangling.is_symlink() and (tmp_path / "data" / "not-yet.json").read_text() == "created"


def test_fifo_receives_the_document(tmp_path: Path) -> None:
    reader = FifoReader(tmp_path / "fifo")
    write_output(reader.path, "document\n")
    assert reader.result() == b"document\n"
    assert stat.S_ISFIFO(os.lstat(reader.path).st_mode)


@needs_root
def test_character_device_stays_a_device(tmp_path: Path) -> None:
    device = null_device(tmp_path)
    write_output(device, "into the void\n")
    assert stat.S_ISCHR(os.lstat(device).st_mode)
    assert os.lstat(device).st_rdev == os.makedev(1, 3)
    link = tmp_path / "out"
    link.symlink_to(device)
    write_output(link, "again")
    assert link.is_symlink() and stat.S_ISCHR(os.lstat(device).st_mode)


@needs_root
def test_block_device_directory_and_socket_are_refused(tmp_path: Path) -> None:
    block = tmp_path / "disk"
    os.mknod(block, 0o600 | stat.S_IFBLK, os.makedev(7, 0))
    with pytest.raises(OutputFileError, match="is a block device"):
        write_output(block, "x")
    with pytest.raises(OutputFileError, match="is a directory"):
        write_output(tmp_path, "x")
    assert stat.S_ISBLK(os.lstat(block).st_mode)


def test_missing_directory_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(OutputFileError) as caught:
        write_output(tmp_path / "no" / "such" / "plan.json", "x")
    assert "\n" not in str(caught.value) and "no/such/plan.json" in str(caught.value)


def test_dev_stdout_is_the_stream_not_a_file(tmp_path: Path) -> None:
    """In a child whose stdout is our pipe: the document arrives on the pipe."""
    code = (
        "from recommender.output_file import write_output; "
        "write_output('/dev/stdout', 'on the pipe\\n'); write_output('/dev/fd/1', 'again\\n')"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"on the pipe\nagain\n"


def test_proc_is_refused_except_a_processes_own_descriptors() -> None:
    with pytest.raises(OutputFileError, match="is under /proc; not writing there"):
        write_output("/proc/self/cmdline", "x")
