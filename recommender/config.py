"""Settings and rules (pydantic models): every field has a default, so no config file is needed.

The `rules:` section is composed from the rules' own settings models
(`recommender.engine.rules.RuleSettings`).

The YAML loader (`load_config`) reports a bad field by its dotted path and its line in the
file; `vmbalance config check FILE` runs just that.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Literal, get_args
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BeforeValidator,
    Field,
    Strict,
    ValidationError,
    field_validator,
    model_validator,
)

from recommender.engine.measure import needed_resources
from recommender.engine.rules import RuleSettings
from recommender.engine.rules.base import RulesPart
from recommender.listen import parse_listen
from recommender.resources import BALANCED_RESOURCES, GIB, RESOURCES
from recommender.strict_model import StrictModel
from recommender.text import one_line

_DURATION = re.compile(r"^([0-9]+)([smhdw])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def duration_seconds(text: str) -> float:
    """Seconds of a PromQL-style duration with one unit ("90s", "5m", "1h", "7d")."""
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"not a duration: {text!r} (use e.g. 30s, 5m, 1h, 7d)")
    return float(int(match.group(1)) * _UNIT_SECONDS[match.group(2)])


def _not_a_boolean(value: object) -> object:
    if isinstance(value, bool):
        raise ValueError("must be a number, not true/false")
    return value


# A number in the config: YAML 1.1 reads `1.25e9` as a string, so numeric text is taken, but
# `true` is not 1. Infinite and NaN values are refused by the models (allow_inf_nan=False).
Number = Annotated[float, BeforeValidator(_not_a_boolean)]
Count = Annotated[int, BeforeValidator(_not_a_boolean)]
Flag = Annotated[bool, Strict()]
# The largest load or capacity taken: sums over any fleet stay far from overflowing.
MAX_QUANTITY = 1e18


def check_url(url: str) -> str:
    """An http(s) URL with a host; ValueError saying what is wrong with it."""
    if any(ch.isspace() or not ch.isprintable() for ch in url):
        raise ValueError("must not contain spaces or control characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError as exc:
        raise ValueError(f"not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError("must start with http:// or https://")
    if not parts.hostname:
        raise ValueError("has no host")
    if parts.query or parts.fragment:
        raise ValueError("must not have a query (?...) or fragment (#...)")
    return url


class PrometheusSettings(StrictModel):
    """How to reach the PromQL HTTP API (Prometheus, VictoriaMetrics, Thanos, Mimir)."""

    url: str = "http://localhost:9090"
    bearer_token: str | None = None
    bearer_token_file: str | None = None
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    insecure_skip_verify: Flag = False
    # The whole of one query: connect, TLS, headers and body, retries included.
    timeout_seconds: Number = Field(30.0, gt=0, le=86400)

    @field_validator("url")
    @classmethod
    def _valid_url(cls, value: str) -> str:
        return check_url(value)


class QuerySettings(StrictModel):
    """Which window of history the loads are estimated from."""

    window: str = Field("1h", pattern=r"^[0-9]+[smhdw]$")
    estimator: Literal["mean", "quantile"] = "mean"
    quantile: Number = Field(0.95, gt=0, lt=1)
    # Step of the short rates inside the quantile subquery, and the short window of burst
    # detection.
    short_window: str = Field("5m", pattern=r"^[0-9]+[smhdw]$")
    # How far back migrations are looked for (cooldown evidence); at least the cooldown.
    history: str = Field("24h", pattern=r"^[0-9]+[smhdw]$")

    @field_validator("window", "short_window", "history")
    @classmethod
    def _positive(cls, value: str) -> str:
        if duration_seconds(value) <= 0:
            raise ValueError("must be longer than 0s")
        return value

    @model_validator(mode="after")
    def _short_inside_window(self) -> QuerySettings:
        if duration_seconds(self.short_window) >= duration_seconds(self.window):
            raise ValueError(
                f"short_window ({self.short_window}) must be shorter than window ({self.window})"
            )
        return self


class CapacitySettings(StrictModel):
    """Capacities the exporter cannot see. CPU and memory come from the exporter."""

    disk_bytes: Number = Field(
        1.25e9, gt=0, le=MAX_QUANTITY, description="bytes/s a node can move to storage"
    )
    disk_ops: Number = Field(
        50_000.0, gt=0, le=MAX_QUANTITY, description="ops/s a node can sustain"
    )
    network: Number = Field(
        1.25e9, gt=0, le=MAX_QUANTITY, description="bytes/s of the VM-facing NIC"
    )
    per_node: dict[str, dict[str, Number]] = Field(default_factory=dict)

    @field_validator("per_node")
    @classmethod
    def _known_resources(cls, value: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        for node, caps in value.items():
            for resource, amount in caps.items():
                if resource not in RESOURCES:
                    raise ValueError(f"{node}: unknown resource {resource!r}")
                if not 0 < amount <= MAX_QUANTITY:
                    raise ValueError(f"{node}.{resource}: capacity must be > 0 and <= 1e18")
        return value

    def of_node(self, node: str) -> dict[str, float]:
        """Disk and network capacity of `node`: the defaults with its `per_node` entries on
        top (the exporter sees CPU and memory; a `per_node` entry for them wins too)."""
        values = {"disk_bytes": self.disk_bytes, "disk_ops": self.disk_ops, "network": self.network}
        values.update({r: float(v) for r, v in self.per_node.get(node, {}).items()})
        return values


class BalanceSettings(StrictModel):
    """Thresholds (with hysteresis) and hard limits of the balance engine."""

    # Planning starts when the overall imbalance is above `trigger` and stops below `target`.
    trigger: Number = Field(0.20, ge=0, le=1)
    target: Number = Field(0.10, ge=0, le=1)
    weights: dict[str, Number] = Field(
        default_factory=lambda: {
            "cpu": 1.0,
            "memory": 1.0,
            "disk_bytes": 2.0,
            "disk_ops": 1.0,
            "network": 2.0,
        }
    )
    # A move is kept only when it lowers the overall imbalance by at least this much per GiB
    # of memory it copies (plus a fixed floor), so tiny gains do not cost a migration.
    min_gain_per_gib: Number = Field(0.002, ge=0, le=1)
    min_gain: Number = Field(0.005, ge=0, le=1)
    max_migrations: Count = Field(10, ge=0)
    # Memory of a node that is never planned away: fraction of the node plus a fixed amount.
    memory_reserve_fraction: Number = Field(0.10, ge=0, lt=1)
    memory_reserve_bytes: Number = Field(2 * GIB, ge=0, le=MAX_QUANTITY)
    # Memory counted for fit and balance: assigned (balloon maximum) or used.
    memory_mode: Literal["assigned", "used"] = "assigned"
    # A node's CPU load after the plan stays under this fraction of its cores.
    cpu_headroom: Number = Field(0.85, gt=0, le=4)
    # A VM migrated within this many seconds (seen in history) is not moved again.
    cooldown_seconds: Number = Field(6 * 3600, ge=0, le=MAX_QUANTITY)
    # A VM whose short-window rate is this many times its window rate is bursting: not chosen.
    burst_ratio: Number = Field(3.0, gt=1, le=MAX_QUANTITY)
    # Waves: at most this many migrations touching one node (as source or target) at once.
    max_parallel_per_node: Count = Field(1, ge=1)
    # Exact minimum-migration plans (mixed-integer program, needs highspy) for clusters with
    # at most `exact_max_vms` movable VMs; larger clusters are planned heuristically.
    exact: Literal["auto", "off"] = "auto"
    exact_max_vms: Count = Field(60, ge=0)

    @field_validator("weights")
    @classmethod
    def _known_weights(cls, value: dict[str, float]) -> dict[str, float]:
        for resource, weight in value.items():
            if resource not in BALANCED_RESOURCES:
                known = ", ".join(BALANCED_RESOURCES)
                raise ValueError(f"unknown resource {resource!r} (known: {known})")
            if not 0 <= weight <= 1e6:
                raise ValueError(f"{resource}: weight must be >= 0 and <= 1e6")
        if sum(value.values()) <= 0:
            raise ValueError("at least one weight must be > 0")
        return value

    @property
    def memory_column(self) -> Literal["memory_max_bytes", "memory"]:
        """The snapshot column of the memory a VM weighs for fit and balance — the one place
        `memory_mode` is read."""
        return "memory_max_bytes" if self.memory_mode == "assigned" else "memory"

    @property
    def needed_resources(self) -> tuple[str, ...]:
        """Resources a node's capacity must be known of for it to count: the weighted ones,
        and CPU and memory (which the fit rules check) always."""
        return tuple(needed_resources(self.weights, BALANCED_RESOURCES))

    @model_validator(mode="after")
    def _target_below_trigger(self) -> BalanceSettings:
        if self.target > self.trigger:
            raise ValueError(f"target ({self.target}) must not exceed trigger ({self.trigger})")
        return self


class MigrationSettings(StrictModel):
    """What a live migration costs and which ones the hypervisor is asked for."""

    # A VM with a disk on local storage moves only with `allow` (its disks are copied:
    # `qm migrate --with-local-disks`, `virsh migrate --copy-storage-all`).
    local_disks: Literal["allow", "refuse"] = "refuse"
    # What one migration copies per second (default: a 10 Gbit/s link).
    bandwidth_bytes_per_second: Number = Field(1.25e9, gt=0, le=MAX_QUANTITY)
    # A guest dirtying memory at this fraction of the bandwidth or faster never converges:
    # it is not chosen, and the plan says so.
    max_dirty_fraction: Number = Field(0.5, gt=0, le=1)
    # Pre-copy rounds stop when what is left copies within this pause (QEMU's default
    # downtime limit), or after `max_rounds` rounds.
    downtime_seconds: Number = Field(0.3, gt=0, le=3600)
    max_rounds: Count = Field(30, ge=1, le=1000)


class OutputSettings(StrictModel):
    commands: Literal["auto", "proxmox", "libvirt"] = "auto"
    # libvirt migration URI template; {node} is replaced by the target node (shell-quoted).
    libvirt_uri: str = "qemu+ssh://{node}/system"


PressureKind = Literal["cpu", "memory", "io"]


class HostSettings(StrictModel):
    """Host load beside VM load, from node_exporter (docs/deploy.md joins its series to the
    `node` label). `interfaces`: the NIC devices whose bytes count as the node's network load
    (e.g. the bond that carries Ceph and VM traffic); empty: host NIC load is not read."""

    cpu: bool = True
    interfaces: list[str] = Field(default_factory=list)
    # Pressure stall information (node_exporter's pressure collector, /proc/pressure): the
    # "some" share of each kind read over the window (seconds per second some task waited).
    pressure: list[PressureKind] = Field(default_factory=lambda: list(get_args(PressureKind)))
    # A node whose share of a kind exceeds its threshold here triggers a plan even when the
    # imbalance is under the trigger (empty: pressure triggers nothing).
    pressure_trigger: dict[PressureKind, Annotated[Number, Field(gt=0, le=1)]] = Field(
        default_factory=dict
    )

    @field_validator("interfaces")
    @classmethod
    def _device_names(cls, value: list[str]) -> list[str]:
        for device in value:
            if not device or len(device) > 64 or any(c.isspace() or c == "/" for c in device):
                raise ValueError(f"{device!r} is not a network device name")
        return value

    @field_validator("pressure")
    @classmethod
    def _distinct_kinds(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("lists a pressure kind twice")
        return value

    @model_validator(mode="after")
    def _trigger_kinds_read(self) -> HostSettings:
        unread = sorted(set(self.pressure_trigger) - set(self.pressure))
        if unread:
            raise ValueError(f"pressure_trigger: {', '.join(unread)} is not in host.pressure")
        return self


class ServeSettings(StrictModel):
    listen: str = "127.0.0.1:9643"
    interval_seconds: Number = Field(300.0, gt=0, le=MAX_QUANTITY)
    # Processes that plan the clusters of a run side by side (each cluster is planned on its
    # own); 0: one per CPU this process may use, 1: every cluster in the serving process.
    plan_workers: Count = Field(0, ge=0, le=256)

    @field_validator("listen")
    @classmethod
    def _listen_address(cls, value: str) -> str:
        parse_listen(value)
        return value


class ProxmoxApiSettings(StrictModel):
    """Proxmox VE's HTTP API, with an API token (`USER@REALM!TOKENID`). The token's secret is
    read from `token_secret_file`, else from the environment variable `token_secret_env`, when
    a run starts; it is never written anywhere."""

    url: str = "https://localhost:8006"
    token_id: str = ""
    token_secret_file: str | None = None
    token_secret_env: str = "VMBALANCE_PVE_TOKEN_SECRET"
    verify_tls: Flag = True
    ca_file: str | None = None
    timeout_seconds: Number = Field(30.0, gt=0, le=3600)
    # Copy a VM's local disks with it (`with-local-disks`) where Proxmox allows that; when
    # false, a VM with local disks is skipped.
    with_local_disks: Flag = True
    # Consecutive failed looks at a running task before its migration counts as failed.
    poll_retries: Count = Field(5, ge=0, le=1000)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if urlsplit(check_url(value)).scheme != "https":
            raise ValueError("Proxmox VE's API is https://")
        return value


class ApplySettings(StrictModel):
    """How `vmbalance apply` (and serve's automatic levels) execute a plan."""

    # The rolling queue: at most this many migrations touching one node (as source or
    # target) at once, and at most `max_parallel` in the whole cluster.
    max_parallel_per_node: Count = Field(1, ge=1, le=64)
    max_parallel: Count = Field(2, ge=1, le=1024)
    # A migration's estimate: its memory over this bandwidth, plus a fixed start-up time.
    bandwidth_bytes_per_second: Number = Field(1.0e9, gt=0, le=MAX_QUANTITY)
    startup_seconds: Number = Field(10.0, ge=0, le=86400)
    # A migration running longer than `overdue_factor` times its estimate is reported, and
    # cancelled only when `cancel_overdue` is true.
    overdue_factor: Number = Field(3.0, gt=1, le=1000)
    cancel_overdue: Flag = False
    # Seconds between two looks at a running migration (task status, job stats).
    poll_interval_seconds: Number = Field(1.0, gt=0, le=600)
    # JSON Lines audit log, appended to (none when unset).
    audit_log: str | None = None
    proxmox: ProxmoxApiSettings = Field(default_factory=ProxmoxApiSettings)


_WINDOW = re.compile(
    r"^(?P<days>daily|[a-z]{3}(?:-[a-z]{3})?(?:,[a-z]{3}(?:-[a-z]{3})?)*) "
    r"(?P<start>[0-9]{2}:[0-9]{2})-(?P<end>[0-9]{2}:[0-9]{2})$"
)
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def parse_window(text: str) -> tuple[frozenset[int], int, int]:
    """`DAYS HH:MM-HH:MM` (DAYS: `daily`, or `mon-fri`, `sat,sun`, ...) as (weekdays, start
    minute, end minute); a window whose end is before its start runs past midnight and
    belongs to the day it starts on."""
    match = _WINDOW.match(text.strip().lower())
    if match is None:
        raise ValueError(
            f"not a window: {text!r} (use e.g. 'mon-fri 22:00-05:00', 'daily 01:00-04:00')"
        )
    days: set[int] = set()
    for part in match.group("days").split(","):
        if part == "daily":
            days.update(range(7))
            continue
        first, _, last = part.partition("-")
        if first not in WEEKDAYS or (last and last not in WEEKDAYS):
            raise ValueError(f"{text!r}: unknown day in {part!r} (mon ... sun)")
        a, b = WEEKDAYS.index(first), WEEKDAYS.index(last or first)
        days.update(range(a, b + 1) if a <= b else [*range(a, 7), *range(0, b + 1)])
    minutes = []
    for clock in (match.group("start"), match.group("end")):
        hour, minute = int(clock[:2]), int(clock[3:])
        if hour > 24 or minute > 59 or (hour == 24 and minute):
            raise ValueError(f"{text!r}: {clock} is not a time of day")
        minutes.append(hour * 60 + minute)
    if minutes[0] == minutes[1]:
        raise ValueError(f"{text!r}: the window is empty")
    return frozenset(days), minutes[0], minutes[1]


class AutomationSettings(StrictModel):
    """What `vmbalance serve` executes by itself (docs/automation.md)."""

    # manual: recommend only; partial: execute evacuations of nodes in maintenance and
    # repairs of broken rules; full: execute balancing plans too.
    level: Literal["manual", "partial", "full"] = "manual"
    # When plans may be executed, in `timezone`; none: at any time.
    windows: list[str] = Field(default_factory=list)
    timezone: str = "UTC"
    min_seconds_between_plans: Number = Field(3600.0, ge=0, le=MAX_QUANTITY)
    # Migrations executed per day (in `timezone`), all plans of a cluster (or of every
    # cluster, `budget_scope: global`) together.
    daily_migration_budget: Count = Field(20, ge=0, le=1_000_000)
    # While this file exists, nothing is executed (as after POST /-/pause).
    pause_file: str | None = None
    # flock()ed while a plan executes, so one instance executes per cluster at a time: every
    # instance serving the cluster must name the same file (on a shared file system when
    # they run on different hosts).
    lock_file: str | None = None
    # What survives a restart: the executed plans and moves (budget, interval, cooldown), a
    # JSON file replaced atomically under the lock; none: `<lock_file>.state`.
    state_file: str | None = None
    # Whether the daily budget and the time between plans count each cluster on its own
    # (`cluster`) or every cluster this instance serves together (`global`).
    budget_scope: Literal["cluster", "global"] = "cluster"
    interval_scope: Literal["cluster", "global"] = "cluster"

    @field_validator("windows")
    @classmethod
    def _windows(cls, value: list[str]) -> list[str]:
        for window in value:
            parse_window(window)
        return value

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo

        try:
            ZoneInfo(value)
        except (ValueError, KeyError, OSError):
            raise ValueError(f"unknown time zone {value!r}") from None
        return value

    @model_validator(mode="after")
    def _lock_when_executing(self) -> AutomationSettings:
        if self.level != "manual" and not self.lock_file:
            raise ValueError(f"level {self.level} needs lock_file (one instance executes)")
        return self


if TYPE_CHECKING:  # composed at import time from the rules' own settings models
    RulesSection = RulesPart
else:
    RulesSection = RuleSettings


class Config(StrictModel):
    prometheus: PrometheusSettings = Field(default_factory=PrometheusSettings)
    query: QuerySettings = Field(default_factory=QuerySettings)
    capacity: CapacitySettings = Field(default_factory=CapacitySettings)
    balance: BalanceSettings = Field(default_factory=BalanceSettings)
    rules: RulesSection = Field(default_factory=RuleSettings)
    migration: MigrationSettings = Field(default_factory=MigrationSettings)
    output: OutputSettings = Field(default_factory=OutputSettings)
    serve: ServeSettings = Field(default_factory=ServeSettings)
    apply: ApplySettings = Field(default_factory=ApplySettings)
    automation: AutomationSettings = Field(default_factory=AutomationSettings)
    host: HostSettings = Field(default_factory=HostSettings)


# --- loading ---------------------------------------------------------------------------------


class ConfigError(Exception):
    """A config file that cannot be used; `str()` is one line per problem, `file:line: ...`."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[object, object]:
        seen: dict[object, int] = {}
        for key_node, _value_node in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r}", key_node.start_mark
                    )
                seen[key] = key_node.start_mark.line
            except TypeError:
                continue
        return super().construct_mapping(node, deep=deep)


def _line_of(root: yaml.Node | None, loc: Sequence[int | str]) -> int:
    """1-based line of the YAML node a pydantic error path points at (the deepest that
    exists: a missing field points at its parent; a mapping entry at its key)."""
    if root is None:
        return 1
    node: yaml.Node = root
    line = node.start_mark.line + 1
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.value == str(part):
                    line = key_node.start_mark.line + 1
                    node = value_node
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if not 0 <= part < len(node.value):
                return line
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def validation_problems(exc: ValidationError) -> list[tuple[tuple[int | str, ...], str]]:
    """Each problem pydantic found, as (location, message on one line) — pydantic's own
    "Value error, " prefix left out."""
    return [
        (tuple(error["loc"]), one_line(str(error["msg"]).removeprefix("Value error, ")))
        for error in exc.errors(include_url=False)
    ]


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read a YAML config; an empty file gives the defaults.

    Raises ConfigError listing every problem as `file:line: dotted.path: message`.
    """
    name = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError([f"{name}: cannot read: {one_line(reason)}"]) from None
    loader = _LineLoader(text)
    try:
        root = loader.get_single_node()
        data = loader.construct_document(root) if root is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        problem = exc.problem or exc.context or "invalid YAML"
        raise ConfigError([f"{name}:{line}: {one_line(problem)}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{name}: {one_line(str(exc))}"]) from None
    except RecursionError:
        raise ConfigError([f"{name}: nested too deeply to be a vmbalance config"]) from None
    finally:
        loader.dispose()
    if data is None:
        return Config()
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise ConfigError([f"{name}:1: expected a mapping of sections, got {kind}"])
    # A section written with nothing under it (`balance:`) means its defaults.
    data = {key: value for key, value in data.items() if value is not None}
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        found: list[tuple[int, str]] = []
        for loc, message in validation_problems(exc):
            where = ".".join(str(p) for p in loc) or "(top level)"
            line = _line_of(root, loc)
            found.append((line, f"{name}:{line}: {where}: {message}"))
        raise ConfigError([text for _, text in sorted(found, key=lambda item: item[0])]) from None
