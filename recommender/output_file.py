"""Every file the product writes goes through `write_output`: plans (`--out-file`), snapshots
(`snapshot -o`), the report and its charts.

A regular file (or a new path) is replaced atomically — a temporary file in the same
directory, then a rename — so a reader never sees half a document. Anything else is not ours
to replace: renaming over `/dev/null` would turn the host's null device into a plain file, and
over a FIFO would leave its reader waiting for ever. So a character device or a FIFO is
opened and written in place, as is anything reached through `/dev/stdout`, `/dev/fd/N` or
`/proc/<pid>/fd/N` (the stream a caller handed over). A symlink is followed: its target is
replaced and the link kept. A block device, a directory, a socket or any other file under
`/proc` is refused.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

_MAX_LINKS = 40
# Where a process's open descriptors are: /proc/<pid>/fd (and a thread's, under task/).
_FD_DIRECTORY = re.compile(r"/proc/[0-9]+(/task/[0-9]+)?/fd")


class OutputFileError(Exception):
    """The output cannot be written there; the message is one line naming the path."""


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def resolve(path: str | os.PathLike[str]) -> tuple[Path, bool]:
    """The path with every symlink followed, and whether a `/proc` fd link was crossed
    (`/dev/stdout` is `/proc/self/fd/1`): such a path names an open stream, not a file."""
    current = Path(os.path.abspath(path))
    for _ in range(_MAX_LINKS):
        parent = Path(os.path.realpath(current.parent))
        current = parent / current.name
        if parent.parts[:2] == ("/", "proc"):
            if _FD_DIRECTORY.fullmatch(str(parent)):
                return current, True
            raise OutputFileError(f"{os.fspath(path)}: is under /proc; not writing there")
        if not current.is_symlink():
            return current, False
        current = parent / os.readlink(current)
    raise OutputFileError(f"{os.fspath(path)}: too many levels of symbolic links")


def _own_fd(target: Path) -> int | None:
    """N when `target` is `/proc/<this process>/fd/N`: one of our own open descriptors."""
    parts = target.parts
    if len(parts) == 5 and parts[2] == str(os.getpid()) and parts[3] == "fd":
        return int(parts[4]) if parts[4].isdigit() else None
    return None


def _write_all(fd: int, data: bytes, shown: str) -> None:
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
    except OSError as exc:
        raise OutputFileError(f"{shown}: cannot write: {_reason(exc)}") from None


def _write_in_place(path: Path, data: bytes, shown: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise OutputFileError(f"{shown}: cannot open: {_reason(exc)}") from None
    try:
        _write_all(fd, data, shown)
    finally:
        os.close(fd)


def replace_file(
    target: Path,
    data: bytes,
    mode: int,
    shown: str,
    *,
    durable: bool = False,
    before_rename: Callable[[], object] | None = None,
) -> None:
    """Replace `target` atomically: a temporary file in its directory, then a rename.

    `durable` syncs the data and the rename to disk (state that must survive a crash);
    `before_rename` runs just before the rename and may raise to keep `target` as it is."""
    try:
        fd, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    except OSError as exc:
        raise OutputFileError(f"{shown}: cannot create a file in {target.parent}: "
                              f"{_reason(exc)}") from None  # fmt: skip
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fchmod(handle.fileno(), mode)
            if durable:
                os.fsync(handle.fileno())
        if before_rename is not None:
            before_rename()
        os.replace(temporary, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise OutputFileError(f"{shown}: cannot write: {_reason(exc)}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    if durable:
        _sync_directory(target.parent)


def _sync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):  # where a directory cannot be synced, the rename stands
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _new_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_output(
    path: str | os.PathLike[str],
    data: str | bytes,
    fd_aliases: Mapping[int, int] | None = None,
) -> None:
    """Write `data` (text is UTF-8) to `path` as described in the module docstring.

    A path naming one of this process's own descriptors (`/dev/stdout`) is written to that
    descriptor, or to `fd_aliases[N]` where the caller moved it (`recommender.stdout` points
    fd 1 at stderr while a command runs and keeps the real stdout elsewhere)."""
    shown = os.fspath(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    target, stream = resolve(path)
    own = _own_fd(target) if stream else None
    if own is not None:
        _write_all((fd_aliases or {}).get(own, own), payload, shown)
        return
    try:
        status = os.stat(target)
    except FileNotFoundError:
        if stream:
            raise OutputFileError(f"{shown}: no such open file") from None
        replace_file(target, payload, _new_file_mode(), shown)
        return
    except OSError as exc:
        raise OutputFileError(f"{shown}: {_reason(exc)}") from None
    kind = status.st_mode
    if stream or stat.S_ISCHR(kind) or stat.S_ISFIFO(kind):
        _write_in_place(Path(shown) if stream else target, payload, shown)
    elif stat.S_ISREG(kind):
        replace_file(target, payload, stat.S_IMODE(kind), shown)
    else:
        what = "a directory" if stat.S_ISDIR(kind) else "a block device"
        if stat.S_ISSOCK(kind):
            what = "a socket"
        raise OutputFileError(f"{shown}: is {what}; not writing there")


def append_output(path: str | os.PathLike[str], data: str | bytes) -> None:
    """Append `data` to `path` (created with the umask's mode when missing): a log.

    Nothing is replaced: a symlink is followed to its target, a regular file, a FIFO or a
    character device is opened with O_APPEND and written in place; a block device, a
    directory, a socket or a file under `/proc` is refused, as by `write_output`."""
    shown = os.fspath(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    target, stream = resolve(path)
    if stream:
        raise OutputFileError(f"{shown}: is an open stream, not a log file")
    try:
        status = os.stat(target)
    except FileNotFoundError:
        status = None
    except OSError as exc:
        raise OutputFileError(f"{shown}: {_reason(exc)}") from None
    if status is not None and not (
        stat.S_ISREG(status.st_mode) or stat.S_ISCHR(status.st_mode)
        or stat.S_ISFIFO(status.st_mode)
    ):  # fmt: skip
        what = "a directory" if stat.S_ISDIR(status.st_mode) else "a block device"
        if stat.S_ISSOCK(status.st_mode):
            what = "a socket"
        raise OutputFileError(f"{shown}: is {what}; not writing there")
    flags = os.O_WRONLY | os.O_APPEND | os.O_NOCTTY | os.O_CLOEXEC | os.O_CREAT
    try:
        fd = os.open(target, flags, 0o666)
    except OSError as exc:
        raise OutputFileError(f"{shown}: cannot open: {_reason(exc)}") from None
    try:
        _write_all(fd, payload, shown)
    finally:
        os.close(fd)


__all__ = ["OutputFileError", "append_output", "replace_file", "resolve", "write_output"]
