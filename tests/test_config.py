"""load_config: defaults, and one `file:line: path: message` line per problem."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from recommender.config import Config, ConfigError, duration_seconds, load_config


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    lines = str(caught.value).splitlines()
    assert lines == caught.value.problems
    return lines


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")) == Config()
    assert load_config(write(tmp_path, "# only a comment\n", "c.yaml")) == Config()


def test_empty_section_means_its_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "balance:\nrules:\n")) == Config()


def test_values_are_read(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        prometheus:
          url: https://vm.example:8428/select/0/prometheus
          bearer_token_file: token
          timeout_seconds: 5
        query:
          window: 2h
          estimator: quantile
          quantile: .9
        capacity:
          disk_bytes: 5e8
          per_node:
            pve1: {network: 2.5e9}
        balance:
          trigger: 0.3
        rules:
          pin: {101: pve1}
          exclude: [102, dev-vm]
          anti_affinity:
            - name: db
              vms: [201, 202]
        """,
    )
    config = load_config(path)
    assert config.prometheus.timeout_seconds == 5.0
    assert config.query.estimator == "quantile" and config.query.quantile == 0.9
    assert config.capacity.per_node == {"pve1": {"network": 2.5e9}}
    assert config.balance.trigger == 0.3
    # Bare numbers are VM ids, read as strings.
    assert config.rules.pin == {"101": "pve1"}
    assert config.rules.exclude == ["102", "dev-vm"]
    assert config.rules.anti_affinity[0].vms == ["201", "202"]


def test_bad_value_names_file_line_and_path(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        prometheus:
          url: http://localhost:9090
        balance:
          target: 0.1
          trigger: 2
        """,
    )
    assert problems(path) == [
        f"{path}:5: balance.trigger: Input should be less than or equal to 1",
    ]


def test_every_error_is_listed_in_line_order(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        query:
          window: 1h
          short_window: 2h
        balance:
          weights:
            cpu: 1
            gpu: 3
          bogus: 1
        capacity:
          per_node:
            pve1: {disk_bytes: -5}
        rules:
          affinity:
            - name: lonely
        """,
    )
    assert problems(path) == [
        f"{path}:1: query: short_window (2h) must be shorter than window (1h)",
        f"{path}:5: balance.weights: unknown resource 'gpu' "
        "(known: cpu, memory, disk_bytes, disk_ops, network, pressure)",
        f"{path}:8: balance.bogus: Extra inputs are not permitted",
        f"{path}:10: capacity.per_node: pve1.disk_bytes: capacity must be > 0 and <= 1e18",
        f"{path}:14: rules.affinity.0.vms: Field required",
    ]


def test_unknown_section_and_field(tmp_path: Path) -> None:
    path = write(tmp_path, "promethus:\n  url: x\nquery:\n  windw: 1h\n")
    assert problems(path) == [
        f"{path}:1: promethus: Extra inputs are not permitted",
        f"{path}:4: query.windw: Extra inputs are not permitted",
    ]


def test_bad_duration(tmp_path: Path) -> None:
    path = write(tmp_path, "query:\n  window: 1 hour\n  history: 0s\n")
    lines = problems(path)
    assert lines[0].startswith(f"{path}:2: query.window: String should match pattern")
    assert lines[1] == f"{path}:3: query.history: must be longer than 0s"


def test_yaml_syntax_error_has_a_line(tmp_path: Path) -> None:
    path = write(tmp_path, "balance:\n  trigger: 0.2\n  weights: {cpu: 1\nrules: {}\n")
    (line,) = problems(path)
    assert line.startswith(f"{path}:4: ")


def test_duplicate_key_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "balance:\n  trigger: 0.2\n  trigger: 0.5\n")
    assert problems(path) == [f"{path}:3: duplicate key 'trigger'"]


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, "- a\n- b\n")
    assert problems(path) == [f"{path}:1: expected a mapping of sections, got list"]


def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.yaml"
    assert problems(path) == [f"{path}: cannot read: No such file or directory"]
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00bad")
    (line,) = problems(binary)
    assert line.startswith(f"{binary}: cannot read:")


def test_duration_seconds() -> None:
    assert duration_seconds("90s") == 90
    assert duration_seconds("5m") == 300
    assert duration_seconds("1h") == 3600
    assert duration_seconds("7d") == 7 * 86400
    assert duration_seconds("2w") == 14 * 86400
    with pytest.raises(ValueError):
        duration_seconds("1h30m")
