"""Real servers the tests, the demo, the lab and the benchmarks start: one `Service` each.

A `Service` is one long-running process in its own process group with its output in a log
file. `wait_ready` polls a check until it holds, failing at once (with the log's tail) when
the process exits; `stop` sends SIGTERM to the whole group, SIGKILL after a grace period, and
reaps the leader. Whoever starts a service stops it (context manager or `stop()`); as a last
resort the interpreter's exit stops every service still running, so a failed or interrupted
run does not leave daemons behind.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import requests

_LIVE: set[Service] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tail(path: Path, lines: int = 30) -> str:
    """The last lines of a log, for error messages."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_until(
    ready: Callable[[], bool],
    timeout: float,
    what: str,
    alive: Callable[[], None] | None = None,
    interval: float = 0.2,
) -> None:
    """Poll `ready()` until true; `alive()` raises when the process being waited on died."""
    deadline = time.monotonic() + timeout
    while True:
        if alive is not None:
            alive()
        if ready():
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready within {timeout:.0f}s")
        time.sleep(interval)


def http_ok(url: str, auth: tuple[str, str] | None = None, timeout: float = 5.0) -> bool:
    """Whether `url` answers 200 now."""
    try:
        return requests.get(url, timeout=timeout, auth=auth).status_code == 200
    except requests.RequestException:
        return False


def accepts_tcp(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something listens on `host:port` now."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


@dataclass(eq=False)
class Service:
    """One long-running process with its output in `log_path`.

    `user`/`group` run it under another account (only root can); `env` replaces the
    environment when given.
    """

    name: str
    argv: Sequence[str]
    log_path: Path
    env: Mapping[str, str] | None = None
    cwd: Path | None = None
    user: int | None = None
    group: int | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def start(self) -> Service:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                list(self.argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(self.env) if self.env is not None else None,
                cwd=self.cwd,
                start_new_session=True,
                user=self.user,
                group=self.group,
                extra_groups=[] if self.user is not None else None,
            )
        _LIVE.add(self)
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def check_running(self) -> None:
        """Raise with the log's tail when the process has exited."""
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(
                f"{self.name} exited {self.process.returncode}; log tail:\n{tail(self.log_path)}"
            )

    def wait_ready(
        self, ready: Callable[[], bool], timeout: float, interval: float = 0.1
    ) -> Service:
        """Wait until `ready()` holds; on failure stop the service and raise with the log's
        tail (the process exited, or it was not ready within `timeout` seconds)."""
        try:
            wait_until(ready, timeout, self.name, self.check_running, interval)
        except TimeoutError:
            self.stop()
            raise TimeoutError(
                f"{self.name} not ready after {timeout:.0f}s; log tail:\n{tail(self.log_path)}"
            ) from None
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the process group (none when `grace` is 0), SIGKILL it after `grace`
        seconds, reap the leader."""
        _LIVE.discard(self)
        if self.process is None or self.process.returncode is not None:
            return
        signals = ((signal.SIGTERM, grace),) if grace > 0 else ()
        for signum, wait in (*signals, (signal.SIGKILL, 10.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signum)
            try:
                self.process.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # Whatever else is left in the group (children that ignored SIGTERM).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)

    def __enter__(self) -> Service:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@atexit.register
def _stop_leftovers() -> None:
    for service in list(_LIVE):
        service.stop(grace=2.0)


def kill_pid_if(pid: int, command_contains: bytes) -> bool:
    """SIGKILL `pid` if its command line contains `command_contains` (so a recycled pid is
    never hit); True when a signal was sent."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    if command_contains not in cmdline:
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
        return True
    return False


__all__ = [
    "Service",
    "accepts_tcp",
    "free_port",
    "http_ok",
    "kill_pid_if",
    "tail",
    "wait_until",
]
