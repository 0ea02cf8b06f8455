"""The steps of an executable plan, from a `Plan` or from its JSON document, and what each
step waits for.

The plan's waves are conservative batches; the queue runs them rolling. A step waits only for
the steps of earlier waves that touch the same VM or one of its two nodes: every rule the plan
keeps (memory, CPU, anti-affinity, maintenance) is a property of the nodes involved, so a
migration between other nodes cannot change whether this one fits. The live check before the
start catches whatever the plan could not foresee.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from recommender.errors import CommandError

if TYPE_CHECKING:
    from recommender.config import ApplySettings
    from recommender.plan import Plan

PLAN_FORMAT = "vmbalance-plan"
PLAN_VERSION = 1


@dataclass(frozen=True)
class Step:
    """One migration to execute."""

    step: int
    wave: int
    vm: str
    name: str
    source: str
    target: str
    kind: str
    memory_bytes: float

    @property
    def nodes(self) -> tuple[str, str]:
        return (self.source, self.target)

    def estimate_seconds(self, settings: ApplySettings) -> float:
        """How long the migration should take: its memory over the configured bandwidth."""
        memory = self.memory_bytes if math.isfinite(self.memory_bytes) else 0.0
        return settings.startup_seconds + memory / settings.bandwidth_bytes_per_second


def steps_of_plan(plan: Plan) -> list[Step]:
    return [
        Step(m.step, m.wave, m.vm, m.name, m.source, m.target, m.kind, float(m.memory_bytes))
        for m in plan.migrations
    ]


def _field(record: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
    value = record.get(key)
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    if kind is str and isinstance(value, str) and value and "\x00" not in value:
        return value
    raise CommandError(f"{where}: {key!r} is missing or not a valid {kind.__name__}")


def steps_of_document(document: object, shown: str) -> tuple[list[Step], str]:
    """The steps of a plan document (docs/plan-format.md) and its command flavour; a
    CommandError naming the problem when it is not one this version can execute."""
    if not isinstance(document, dict) or document.get("format") != PLAN_FORMAT:
        raise CommandError(f'{shown}: not a vmbalance plan (no "format": "{PLAN_FORMAT}")')
    if document.get("version") != PLAN_VERSION:
        raise CommandError(
            f"{shown}: plan version {document.get('version')!r} is not "
            f"{PLAN_VERSION}, the one this vmbalance executes"
        )
    flavour = document.get("commands")
    if flavour not in ("proxmox", "libvirt"):
        raise CommandError(f'{shown}: "commands" must be proxmox or libvirt')
    migrations = document.get("migrations")
    if not isinstance(migrations, list):
        raise CommandError(f'{shown}: "migrations" is not a list')
    steps = []
    for index, record in enumerate(migrations):
        where = f"{shown}: migrations[{index}]"
        if not isinstance(record, dict):
            raise CommandError(f"{where}: not an object")
        name = record.get("name")
        steps.append(
            Step(
                step=_field(record, "step", int, where),
                wave=_field(record, "wave", int, where),
                vm=_field(record, "vm", str, where),
                name=name if isinstance(name, str) else "",
                source=_field(record, "source", str, where),
                target=_field(record, "target", str, where),
                kind=_field(record, "kind", str, where),
                memory_bytes=_field(record, "memory_bytes", float, where),
            )
        )
    _check_order(steps, shown)
    return steps, str(flavour)


def cluster_of_document(document: dict[str, Any], shown: str) -> str:
    """The cluster a plan document is for ("" where it names none)."""
    cluster = document.get("cluster")
    if cluster is None:
        return ""
    if not isinstance(cluster, str) or "\x00" in cluster:
        raise CommandError(f'{shown}: "cluster" is not a cluster name')
    return cluster


def _check_order(steps: Sequence[Step], shown: str) -> None:
    numbers = [s.step for s in steps]
    if len(set(numbers)) != len(numbers):
        raise CommandError(f"{shown}: two migrations have the same step number")
    ordered = sorted(steps, key=lambda s: s.step)
    for earlier, later in itertools.pairwise(ordered):
        if later.wave < earlier.wave:
            raise CommandError(
                f"{shown}: step {later.step} is in an earlier wave than step {earlier.step}"
            )
    for step in steps:
        if step.source == step.target:
            raise CommandError(f"{shown}: step {step.step} moves VM to the node it is on")


def dependencies(steps: Sequence[Step]) -> dict[int, tuple[int, ...]]:
    """Step number → the step numbers it waits for (see the module docstring)."""
    ordered = sorted(steps, key=lambda s: s.step)
    out: dict[int, tuple[int, ...]] = {}
    for i, step in enumerate(ordered):
        out[step.step] = tuple(
            earlier.step
            for earlier in ordered[:i]
            if earlier.wave < step.wave
            and (earlier.vm == step.vm or set(earlier.nodes) & set(step.nodes))
        )
    return out
