"""The snapshot file: a Snapshot (and optionally the settings and rules it was planned with) as
versioned JSON, so a plan can be replayed, reviewed or computed offline. Format: docs/snapshot.md.

Files are written as ASCII JSON (anything else as a `\\u` escape) so any VM name a tenant
typed, even one that is not valid UTF-8 text, survives the round trip. Unknown numbers (NaN)
are written as null.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import IO, Annotated, Any, Literal

import numpy as np
import pandas as pd
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    ValidationError,
    field_validator,
    model_validator,
)

from recommender.config import MAX_QUANTITY, Config, validation_problems
from recommender.model import (
    BACKGROUND_COLUMNS,
    PRESSURE_COLUMNS,
    RESOURCES,
    Disk,
    Snapshot,
    finite_or_none,
    make_nodes,
    make_vms,
)
from recommender.output_file import write_output
from recommender.text import one_line, redact_url

FORMAT = "vmbalance-snapshot"
VERSION = 1

# Never written into a snapshot file: they would leak with it.
_SECRET_FIELDS = {"prometheus": {"bearer_token", "password"}}
# No field of the format nests deeper than this; a deeper document is refused before parsing.
MAX_DEPTH = 32
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_JSON_BRACKET = re.compile(r"[\[\]{}]")

# A JSON number: `true` and `"0.5"` are not numbers here, and a value so large that sums of
# loads could overflow is refused with the field named.
Quantity = Annotated[StrictFloat, Field(ge=0, le=MAX_QUANTITY)]


class SnapshotError(Exception):
    """A snapshot file that cannot be used; the message is one line."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _check_resources(value: Mapping[str, float | None]) -> Mapping[str, float | None]:
    for resource, amount in value.items():
        if resource not in RESOURCES:
            raise ValueError(f"unknown resource {resource!r} (known: {', '.join(RESOURCES)})")
        if amount is not None and not 0 <= amount <= MAX_QUANTITY:
            raise ValueError(f"{resource}: must be >= 0 and <= 1e18")
    return value


class NodeEntry(_Model):
    name: str = Field(min_length=1)
    capacity: dict[str, StrictFloat | None] = Field(default_factory=dict)
    maintenance: StrictBool = False
    # Load besides the VMs (cpu, network); absent in files written before it existed: 0.
    background: dict[str, StrictFloat | None] = Field(default_factory=dict)
    # Pressure stall share per PSI kind (cpu, memory, io); absent: not read.
    pressure: dict[str, Annotated[StrictFloat, Field(ge=0, le=1e6)] | None] = Field(
        default_factory=dict
    )
    cluster: str = ""

    _resources = field_validator("capacity", "background")(_check_resources)

    @field_validator("background")
    @classmethod
    def _background_resources(cls, value: dict[str, float | None]) -> dict[str, float | None]:
        for resource in value:
            if resource not in BACKGROUND_COLUMNS:
                raise ValueError(
                    f"background: {resource!r} has none (known: {', '.join(BACKGROUND_COLUMNS)})"
                )
        return value

    @field_validator("pressure")
    @classmethod
    def _pressure_kinds(cls, value: dict[str, float | None]) -> dict[str, float | None]:
        for kind in value:
            if kind not in PRESSURE_COLUMNS:
                raise ValueError(f"{kind!r} is no PSI kind (known: {', '.join(PRESSURE_COLUMNS)})")
        return value


class DiskEntry(_Model):
    disk: str = Field(min_length=1)
    storage: str = ""
    shared: StrictBool
    size_bytes: Quantity | None = None


class VMEntry(_Model):
    vm: str = Field(min_length=1)
    name: str | None = None
    node: str = Field(min_length=1)
    load: dict[str, StrictFloat | None] = Field(default_factory=dict)
    memory_max_bytes: Quantity | None = None
    burst_ratio: Quantity | None = None
    last_migration: AwareDatetime | None = None
    blockers: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)
    disks: list[DiskEntry] = Field(default_factory=list)
    ha_managed: StrictBool = False
    dirty_rate_bytes_per_second: Quantity | None = None
    # The cluster of its node; written where a node name is in several clusters.
    cluster: str | None = None

    _resources = field_validator("load")(_check_resources)


class SnapshotFile(_Model):
    """The whole file (version 1)."""

    format: Literal["vmbalance-snapshot"]
    version: Literal[1]
    taken_at: AwareDatetime
    source: str = "unknown"
    window: str = "1h"
    estimator: str = "mean"
    warnings: list[str] = Field(default_factory=list)
    nodes: list[NodeEntry]
    vms: list[VMEntry]
    config: Config | None = None

    @model_validator(mode="after")
    def _consistent(self) -> SnapshotFile:
        """Nodes unique per cluster, each VM on a node (named by its cluster where the node's
        name is in several), VM ids unique per cluster."""
        keys = [(n.cluster, n.name) for n in self.nodes]
        if len(set(keys)) != len(keys):
            dup = next(k for k in keys if keys.count(k) > 1)
            where = f" in cluster {dup[0]!r}" if dup[0] else ""
            raise ValueError(f"nodes: duplicate node {dup[1]!r}{where}")
        clusters: dict[str, list[str]] = {}
        for cluster, name in keys:
            clusters.setdefault(name, []).append(cluster)
        vm_keys = []
        for i, entry in enumerate(self.vms):
            found = clusters.get(entry.node, [])
            if entry.cluster is not None and entry.cluster not in found:
                where = f" in cluster {entry.cluster!r}" if entry.cluster else ""
                raise ValueError(f"vms.{i}.node: {entry.node!r}{where} is not in nodes")
            if not found:
                raise ValueError(f"vms.{i}.node: {entry.node!r} is not in nodes")
            if entry.cluster is None and len(found) > 1:
                raise ValueError(
                    f"vms.{i}.cluster: node {entry.node!r} is in several clusters; name the VM's"
                )
            vm_keys.append((found[0] if entry.cluster is None else entry.cluster, entry.vm))
        if len(set(vm_keys)) != len(vm_keys):
            dup = next(k for k in vm_keys if vm_keys.count(k) > 1)
            raise ValueError(f"vms: duplicate vm {dup[1]!r}")
        return self

    def repeats_node_names(self) -> bool:
        names = [n.name for n in self.nodes]
        return len(set(names)) != len(names)


def _timestamp(value: float | None) -> datetime | None:
    number = finite_or_none(value)
    return None if number is None else datetime.fromtimestamp(number, UTC)


def _background_entry(row: pd.Series) -> dict[str, dict[str, float | None]]:
    """`{"background": {...}}` for a node whose frame has the background columns, else {}."""
    if not all(c in row.index for c in BACKGROUND_COLUMNS.values()):
        return {}
    return {"background": {r: finite_or_none(row[c]) for r, c in BACKGROUND_COLUMNS.items()}}


def _pressure_entry(row: pd.Series) -> dict[str, dict[str, float | None]]:
    """`{"pressure": {...}}` for a node whose frame has pressure columns, else {}."""
    kinds = {k: c for k, c in PRESSURE_COLUMNS.items() if c in row.index}
    return {"pressure": {k: finite_or_none(row[c]) for k, c in kinds.items()}} if kinds else {}


def _cluster_name(value: object) -> str:
    return value if isinstance(value, str) else ""


def _migration_fields(row: Any) -> dict[str, Any]:
    """What decides whether and how a VM moves, as the file writes it."""
    disks: tuple[Disk, ...] = tuple(row.get("disks", ()) or ())
    return {
        "blockers": list(row.get("blockers", ()) or ()),
        "disks": [
            {
                "disk": d.name,
                "storage": d.storage,
                "shared": d.shared,
                "size_bytes": finite_or_none(d.size_bytes),
            }
            for d in disks
        ],
        "ha_managed": bool(row.get("ha_managed", False)),
        "dirty_rate_bytes_per_second": finite_or_none(row.get("dirty_rate")),
    }


def _document(snapshot: Snapshot, config: Config | None) -> dict[str, Any]:
    nodes = [
        {
            "name": str(node),
            "capacity": {r: finite_or_none(row[r]) for r in RESOURCES},
            "maintenance": bool(row["maintenance"]),
            **_background_entry(row),
            **_pressure_entry(row),
            "cluster": _cluster_name(row.get("cluster", "")),
        }
        for node, row in snapshot.nodes.iterrows()
    ]
    vms = []
    for vm, row in snapshot.vms.iterrows():
        migrated = _timestamp(row["last_migration"])
        vms.append(
            {
                "vm": str(vm),
                "name": str(row["name"]),
                "node": str(row["node"]),
                "load": {r: finite_or_none(row[r]) for r in RESOURCES},
                "memory_max_bytes": finite_or_none(row["memory_max_bytes"]),
                "burst_ratio": finite_or_none(row["burst_ratio"]),
                "last_migration": migrated.isoformat() if migrated else None,
                **_migration_fields(row),
                **({"cluster": _cluster_name(row["cluster"])} if "cluster" in row.index else {}),
            }
        )
    taken_at = snapshot.taken_at
    if taken_at.tzinfo is None:
        taken_at = taken_at.replace(tzinfo=UTC)
    document: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "taken_at": taken_at.astimezone(UTC).isoformat(),
        "source": snapshot.source,
        "window": snapshot.window,
        "estimator": snapshot.estimator,
        "warnings": list(snapshot.warnings),
        "nodes": nodes,
        "vms": vms,
    }
    if config is not None:
        settings = config.model_dump(mode="json", exclude=_SECRET_FIELDS)
        settings["prometheus"]["url"] = redact_url(config.prometheus.url)
        document["config"] = settings
    return document


def snapshot_text(snapshot: Snapshot, config: Config | None = None) -> str:
    """The snapshot (and `config`, minus credentials) as the JSON text of the file."""
    text = json.dumps(_document(snapshot, config), indent=2, ensure_ascii=True, allow_nan=False)
    return text + "\n"


def save_snapshot(
    snapshot: Snapshot,
    path_or_file: str | os.PathLike[str] | IO[str],
    config: Config | None = None,
) -> None:
    """Write the snapshot (and `config`, minus credentials) as JSON: a path through
    `recommender.output_file` (atomic for a regular file), an open text file as is."""
    text = snapshot_text(snapshot, config)
    if isinstance(path_or_file, str | os.PathLike):
        write_output(path_or_file, text)
    else:
        path_or_file.write(text)


def _validation_message(name: str, exc: ValidationError) -> str:
    parts = []
    for loc, message in validation_problems(exc):
        where = ".".join(str(p) for p in loc)
        parts.append(f"{where}: {message}" if where else message)
    more = f" (and {len(parts) - 3} more)" if len(parts) > 3 else ""
    return one_line(f"{name}: {'; '.join(parts[:3])}{more}")


def _cluster_vms(parsed: SnapshotFile, cluster: str) -> list[VMEntry]:
    """The VMs of one cluster of a file whose node names repeat across clusters."""
    node_cluster = {n.name: n.cluster for n in parsed.nodes}
    return [
        v
        for v in parsed.vms
        if (v.cluster if v.cluster is not None else node_cluster[v.node]) == cluster
    ]


def _nodes_frame(entries: list[NodeEntry]) -> pd.DataFrame:
    return make_nodes(
        {
            entry.name: {
                **{r: np.nan if v is None else v for r, v in entry.capacity.items()},
                "maintenance": entry.maintenance,
                **{
                    BACKGROUND_COLUMNS[r]: 0.0 if v is None else v
                    for r, v in entry.background.items()
                },
                **{
                    PRESSURE_COLUMNS[k]: np.nan if v is None else v
                    for k, v in entry.pressure.items()
                },
                "cluster": entry.cluster,
            }
            for entry in entries
        }
    )


def _vms_frame(entries: list[VMEntry]) -> pd.DataFrame:
    return make_vms(
        {
            entry.vm: {
                "name": entry.vm if entry.name is None else entry.name,
                "node": entry.node,
                **entry.load,
                "memory_max_bytes": entry.memory_max_bytes,
                "burst_ratio": entry.burst_ratio,
                "last_migration": (
                    entry.last_migration.timestamp() if entry.last_migration else None
                ),
                "blockers": entry.blockers,
                "disks": [
                    Disk(
                        d.disk,
                        d.storage,
                        d.shared,
                        math.nan if d.size_bytes is None else d.size_bytes,
                    )
                    for d in entry.disks
                ],
                "ha_managed": entry.ha_managed,
                "dirty_rate": entry.dirty_rate_bytes_per_second,
            }
            for entry in entries
        }
    )


def parse_snapshot(document: Any, name: str = "snapshot") -> tuple[Snapshot, Config | None]:
    """Validate an already-decoded snapshot document (see `load_snapshot`)."""
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise SnapshotError(f'{name}: not a vmbalance snapshot (no "format": "{FORMAT}")')
    version = document.get("version")
    if version != VERSION:
        raise SnapshotError(
            f"{name}: snapshot version {version!r} is not supported (this vmbalance reads "
            f"version {VERSION})"
        )
    try:
        parsed = SnapshotFile.model_validate(document)
    except ValidationError as exc:
        raise SnapshotError(_validation_message(name, exc)) from None

    if parsed.repeats_node_names():
        parts = sorted({n.cluster for n in parsed.nodes})
        nodes = pd.concat(
            [_nodes_frame([n for n in parsed.nodes if n.cluster == c]) for c in parts]
        )
        vms = pd.concat([_vms_frame(_cluster_vms(parsed, c)) for c in parts])
        vms["cluster"] = [c for c in parts for _ in _cluster_vms(parsed, c)]
    else:
        nodes, vms = _nodes_frame(parsed.nodes), _vms_frame(parsed.vms)
    snapshot = Snapshot(
        nodes=nodes,
        vms=vms,
        taken_at=parsed.taken_at.astimezone(UTC),
        source=parsed.source,
        window=parsed.window,
        estimator=parsed.estimator,
        warnings=list(parsed.warnings),
    )
    return snapshot, parsed.config


def nesting_depth(text: str) -> int:
    """How deeply the JSON text nests arrays and objects (strings skipped), without parsing."""
    depth = deepest = 0
    for bracket in _JSON_BRACKET.findall(_JSON_STRING.sub("", text)):
        depth += 1 if bracket in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def load_snapshot(path: str | os.PathLike[str] | IO[str]) -> tuple[Snapshot, Config | None]:
    """Read a snapshot file (`-` or an open file: that stream); returns the snapshot and the
    config stored with it (or None).

    Raises SnapshotError with one line naming the file and the bad field.
    """
    raw: bytes | str
    if isinstance(path, str | os.PathLike):
        name = os.fspath(path)
        try:
            with open(path, "rb") as handle:
                raw = handle.read()
        except OSError as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise SnapshotError(f"{name}: cannot read: {one_line(reason)}") from None
    else:
        name = getattr(path, "name", "snapshot")
        stream = getattr(path, "buffer", None)
        raw = stream.read() if stream is not None else path.read()
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError as exc:
        raise SnapshotError(f"{name}: not UTF-8 text (byte {exc.start})") from None
    if nesting_depth(text) > MAX_DEPTH:
        raise SnapshotError(
            f"{name}: nested deeper than {MAX_DEPTH} levels; not a vmbalance snapshot"
        )
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SnapshotError(f"{name}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from None
    return parse_snapshot(document, name)


__all__ = [
    "FORMAT",
    "VERSION",
    "SnapshotError",
    "SnapshotFile",
    "load_snapshot",
    "parse_snapshot",
    "save_snapshot",
    "snapshot_text",
]
