"""What serve's automation remembers across restarts: the plans it executed (for the daily
budget and the time between plans) and the moves it made (for the cooldown), in one small
JSON file.

The file is read and replaced while the automation's lock is held, so every instance that
shares the lock shares this memory too. It is replaced atomically (a temporary file in the
same directory, fsync, rename), and only ever over a regular file: a symlink, a FIFO, a
device or a directory at its path is refused, never followed or replaced. Records older than
the longest span any check looks back over are dropped on each write, so the file stays small.
"""

from __future__ import annotations

import json
import math
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from recommender.output_file import OutputFileError, replace_file

STATE_FORMAT = "vmbalance-automation-state"
STATE_VERSION = 1
_MAX_BYTES = 16 * 2**20
# A day's budget looks back at most a day and a bit (a day in a zone with a DST shift).
_DAY_SECONDS = 2 * 86400


class StateFileError(Exception):
    """The state file cannot be read or written; the message is one line naming the path."""


@dataclass(frozen=True)
class ExecutedPlan:
    time: float  # wall-clock seconds when it ended
    cluster: str
    migrations: int  # migrations started (budget spent)


@dataclass(frozen=True)
class Move:
    time: float  # when the migration ended
    cluster: str
    vm: str
    source: str  # the node the VM left
    target: str


@dataclass
class AutomationState:
    plans: list[ExecutedPlan] = field(default_factory=list)
    moves: list[Move] = field(default_factory=list)

    def last_executed(self, cluster: str | None) -> float | None:
        """When the last plan of `cluster` (None: of any cluster) ended."""
        times = [p.time for p in self.plans if cluster is None or p.cluster == cluster]
        return max(times, default=None)

    def spent(self, cluster: str | None, day: str, zone: ZoneInfo) -> int:
        """Migrations started on `day` (ISO date in `zone`) for `cluster` (None: all)."""
        return sum(
            p.migrations
            for p in self.plans
            if (cluster is None or p.cluster == cluster)
            and datetime.fromtimestamp(p.time, zone).date().isoformat() == day
        )

    def left_recently(self, cluster: str, vm: str, now: float, cooldown: float) -> set[str]:
        """The nodes `vm` of `cluster` was moved off within `cooldown` seconds of `now`."""
        return {
            m.source
            for m in self.moves
            if m.cluster == cluster and m.vm == vm and now - m.time < cooldown
        }

    def add(self, plan: ExecutedPlan, moves: Iterable[Move]) -> None:
        self.plans.append(plan)
        self.moves.extend(moves)

    def pruned(self, now: float, keep_seconds: float) -> AutomationState:
        """Only the records some check can still look at."""
        horizon = now - max(keep_seconds, _DAY_SECONDS)
        return AutomationState(
            [p for p in self.plans if p.time >= horizon],
            [m for m in self.moves if m.time >= horizon],
        )

    def document(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "plans": [
                {"time": p.time, "cluster": p.cluster, "migrations": p.migrations}
                for p in self.plans
            ],
            "moves": [
                {"time": m.time, "cluster": m.cluster, "vm": m.vm, "from": m.source, "to": m.target}
                for m in self.moves
            ],
        }


def _refuse_unless_regular(path: Path, shown: str) -> bool:
    """Whether a regular file is at `path` (False: nothing is); anything else is refused."""
    try:
        status = os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise StateFileError(f"{shown}: {exc.strerror or exc}") from None
    if stat.S_ISREG(status.st_mode):
        return True
    kinds = (
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISSOCK, "a socket"),
    )
    what = next((name for test, name in kinds if test(status.st_mode)), "not a regular file")
    raise StateFileError(f"{shown}: is {what}; the state file must be a regular file")


def _number(value: object, where: str) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    raise StateFileError(f"{where}: not a finite number")


def _text(value: object, where: str) -> str:
    if isinstance(value, str):
        return value
    raise StateFileError(f"{where}: not a string")


def _records(document: dict[str, Any], key: str, shown: str) -> list[dict[str, Any]]:
    records = document.get(key, [])
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise StateFileError(f"{shown}: {key!r} is not a list of objects")
    return records


def _parse(document: object, shown: str) -> AutomationState:
    if not isinstance(document, dict) or document.get("format") != STATE_FORMAT:
        raise StateFileError(f'{shown}: not a vmbalance state file (no "format": "{STATE_FORMAT}")')
    if document.get("version") != STATE_VERSION:
        raise StateFileError(f"{shown}: state version {document.get('version')!r} is unknown")
    plans = []
    for i, r in enumerate(_records(document, "plans", shown)):
        where = f"{shown}: plans[{i}]"
        count = _number(r.get("migrations"), f"{where}.migrations")
        time = _number(r.get("time"), f"{where}.time")
        plans.append(ExecutedPlan(time, _text(r.get("cluster"), f"{where}.cluster"), int(count)))
    moves = []
    for i, r in enumerate(_records(document, "moves", shown)):
        where = f"{shown}: moves[{i}]"
        moves.append(
            Move(
                _number(r.get("time"), f"{where}.time"),
                _text(r.get("cluster"), f"{where}.cluster"),
                _text(r.get("vm"), f"{where}.vm"),
                _text(r.get("from"), f"{where}.from"),
                _text(r.get("to"), f"{where}.to"),
            )
        )
    return AutomationState(plans, moves)


def load_state(path: str) -> AutomationState:
    """The state in `path`; an empty state when there is no file yet."""
    target = Path(path)
    if not _refuse_unless_regular(target, path):
        return AutomationState()
    try:
        fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise StateFileError(f"{path}: cannot open: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):  # swapped since the lstat
            raise StateFileError(f"{path}: is not a regular file")
        data = handle.read(_MAX_BYTES + 1)
    if len(data) > _MAX_BYTES:
        raise StateFileError(f"{path}: larger than {_MAX_BYTES // 2**20} MiB; not a state file")
    try:
        document = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StateFileError(f"{path}: not JSON: {exc}") from None
    return _parse(document, path)


def save_state(path: str, state: AutomationState) -> None:
    """Replace `path` with `state`, atomically, over a regular file or nothing only."""
    target = Path(path)
    existed = _refuse_unless_regular(target, path)
    mode = stat.S_IMODE(os.lstat(target).st_mode) if existed else 0o600
    payload = (json.dumps(state.document(), indent=1, allow_nan=False) + "\n").encode()
    try:
        replace_file(
            target,
            payload,
            mode,
            path,
            durable=True,
            # nothing else appeared there meanwhile
            before_rename=lambda: _refuse_unless_regular(target, path),
        )
    except OutputFileError as exc:
        raise StateFileError(str(exc)) from None
