"""Settings and rules (pydantic models): every field has a default, so no config file is needed.

The YAML loader (`load_config`) reports a bad field by its dotted path and its line in the
file; `vmbalance config check FILE` runs just that.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from recommender.model import RESOURCES

GIB = 1024**3


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PrometheusSettings(StrictModel):
    """How to reach the PromQL HTTP API (Prometheus, VictoriaMetrics, Thanos, Mimir)."""

    url: str = "http://localhost:9090"
    bearer_token: str | None = None
    bearer_token_file: str | None = None
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    insecure_skip_verify: bool = False
    timeout_seconds: float = Field(30.0, gt=0)


class QuerySettings(StrictModel):
    """Which window of history the loads are estimated from."""

    window: str = Field("1h", pattern=r"^[0-9]+[smhdw]$")
    estimator: Literal["mean", "quantile"] = "mean"
    quantile: float = Field(0.95, gt=0, lt=1)
    # Step of the short rates inside the quantile subquery, and the short window of burst
    # detection.
    short_window: str = Field("5m", pattern=r"^[0-9]+[smhdw]$")
    # How far back migrations are looked for (cooldown evidence); at least the cooldown.
    history: str = Field("24h", pattern=r"^[0-9]+[smhdw]$")


class CapacitySettings(StrictModel):
    """Capacities the exporter cannot see. CPU and memory come from the exporter."""

    disk_bytes: float = Field(1.25e9, gt=0, description="bytes/s a node can move to storage")
    disk_ops: float = Field(50_000.0, gt=0, description="ops/s a node can sustain")
    network: float = Field(1.25e9, gt=0, description="bytes/s of the VM-facing NIC")
    per_node: dict[str, dict[str, float]] = Field(default_factory=dict)

    @field_validator("per_node")
    @classmethod
    def _known_resources(cls, value: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        for node, caps in value.items():
            for resource, amount in caps.items():
                if resource not in RESOURCES:
                    raise ValueError(f"{node}: unknown resource {resource!r}")
                if amount <= 0:
                    raise ValueError(f"{node}.{resource}: capacity must be > 0")
        return value


class BalanceSettings(StrictModel):
    """Thresholds (with hysteresis) and hard limits of the balance engine."""

    # Planning starts when the overall imbalance is above `trigger` and stops below `target`.
    trigger: float = Field(0.20, ge=0, le=1)
    target: float = Field(0.10, ge=0, le=1)
    weights: dict[str, float] = Field(
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
    min_gain_per_gib: float = Field(0.002, ge=0)
    min_gain: float = Field(0.005, ge=0)
    max_migrations: int = Field(10, ge=0)
    # Memory of a node that is never planned away: fraction of the node plus a fixed amount.
    memory_reserve_fraction: float = Field(0.10, ge=0, lt=1)
    memory_reserve_bytes: float = Field(2 * GIB, ge=0)
    # Memory counted for fit and balance: assigned (balloon maximum) or used.
    memory_mode: Literal["assigned", "used"] = "assigned"
    # A node's CPU load after the plan stays under this fraction of its cores.
    cpu_headroom: float = Field(0.85, gt=0, le=4)
    # A VM migrated within this many seconds (seen in history) is not moved again.
    cooldown_seconds: float = Field(6 * 3600, ge=0)
    # A VM whose short-window rate is this many times its window rate is bursting: not chosen.
    burst_ratio: float = Field(3.0, gt=1)
    # Waves: at most this many migrations touching one node (as source or target) at once.
    max_parallel_per_node: int = Field(1, ge=1)

    @field_validator("weights")
    @classmethod
    def _known_weights(cls, value: dict[str, float]) -> dict[str, float]:
        for resource, weight in value.items():
            if resource not in RESOURCES:
                raise ValueError(f"unknown resource {resource!r} (known: {', '.join(RESOURCES)})")
            if weight < 0:
                raise ValueError(f"{resource}: weight must be >= 0")
        if sum(value.values()) <= 0:
            raise ValueError("at least one weight must be > 0")
        return value

    @model_validator(mode="after")
    def _target_below_trigger(self) -> BalanceSettings:
        if self.target > self.trigger:
            raise ValueError(f"target ({self.target}) must not exceed trigger ({self.trigger})")
        return self


class GroupRule(StrictModel):
    """A named set of VMs for affinity / anti-affinity."""

    name: str
    vms: list[str] = Field(min_length=2)


class RuleSettings(StrictModel):
    """Per-VM and per-node rules; VMs are named by their `vm` label (VMID or domain name)."""

    node_groups: dict[str, list[str]] = Field(default_factory=dict)
    # vm -> node name or node-group name: the VM may only run there.
    pin: dict[str, str] = Field(default_factory=dict)
    exclude: list[str] = Field(default_factory=list)
    affinity: list[GroupRule] = Field(default_factory=list)
    anti_affinity: list[GroupRule] = Field(default_factory=list)
    maintenance: list[str] = Field(default_factory=list)

    @field_validator("pin", mode="before")
    @classmethod
    def _pin_keys_as_str(cls, value: object) -> object:
        if isinstance(value, dict):
            return {str(k): str(v) for k, v in value.items()}
        return value

    @field_validator("exclude", "maintenance", mode="before")
    @classmethod
    def _items_as_str(cls, value: object) -> object:
        if isinstance(value, list):
            return [str(v) for v in value]
        return value


class OutputSettings(StrictModel):
    commands: Literal["auto", "proxmox", "libvirt"] = "auto"
    # libvirt migration URI template; {node} is replaced by the target node (shell-quoted).
    libvirt_uri: str = "qemu+ssh://{node}/system"


class ServeSettings(StrictModel):
    listen: str = "127.0.0.1:9178"
    interval_seconds: float = Field(300.0, gt=0)


class Config(StrictModel):
    prometheus: PrometheusSettings = Field(default_factory=PrometheusSettings)
    query: QuerySettings = Field(default_factory=QuerySettings)
    capacity: CapacitySettings = Field(default_factory=CapacitySettings)
    balance: BalanceSettings = Field(default_factory=BalanceSettings)
    rules: RuleSettings = Field(default_factory=RuleSettings)
    output: OutputSettings = Field(default_factory=OutputSettings)
    serve: ServeSettings = Field(default_factory=ServeSettings)
