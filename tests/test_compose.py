"""compose.yaml and the per-node compose files in deploy/compose: valid for docker-compose,
every file they mount kept in the repository, and the configs they mount consistent with each
other (Prometheus's config checked by promtool with the rule files it loads)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from recommender.config import load_config

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "compose.yaml"
NODE_FILES = {
    REPO / "deploy" / "compose" / "exporter-libvirt.yaml": {"/var/run/libvirt"},
    REPO / "deploy" / "compose" / "exporter-proxmox.yaml": {"/var/run/qemu-server", "/etc/pve"},
}
DOCKER_COMPOSE = shutil.which("docker-compose")
PROMTOOL = shutil.which("promtool")

needs_compose = pytest.mark.skipif(DOCKER_COMPOSE is None, reason="docker-compose not installed")


def _compose_config(path: Path) -> dict[str, Any]:
    """`docker-compose config`: the file validated and resolved (absolute mount sources)."""
    assert DOCKER_COMPOSE is not None
    quiet = subprocess.run(
        [DOCKER_COMPOSE, "-f", str(path), "config", "-q"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr.strip() == "", quiet.stderr
    full = subprocess.run(
        [DOCKER_COMPOSE, "-f", str(path), "config"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return yaml.safe_load(full.stdout)


def _bind_sources(config: dict[str, Any]) -> list[tuple[str, Path, str]]:
    """(service, host path, container path) of every bind mount."""
    named = set(config.get("volumes") or {})
    mounts = []
    for service, spec in config["services"].items():
        for volume in spec.get("volumes", []):
            if isinstance(volume, dict):
                if volume.get("type") == "bind":
                    mounts.append((service, Path(volume["source"]), volume["target"]))
                continue
            source, target = volume.split(":")[:2]
            if source not in named:
                mounts.append((service, Path(source), target))
    return mounts


@needs_compose
def test_compose_file_is_valid_and_mounts_only_repository_files() -> None:
    config = _compose_config(COMPOSE)
    assert {"prometheus", "alertmanager", "grafana", "exporter", "serve"} <= set(config["services"])
    mounts = _bind_sources(config)
    assert mounts
    for service, source, _target in mounts:
        assert source.is_relative_to(REPO), f"{service} mounts {source}, outside the repo"
        assert source.exists(), f"{service} mounts {source}, which does not exist"
    for service in ("exporter", "serve"):
        build = config["services"][service]["build"]
        context = Path(build["context"] if isinstance(build, dict) else build)
        assert (context / "Dockerfile").is_file(), service


@needs_compose
@pytest.mark.parametrize("path", sorted(NODE_FILES), ids=lambda p: p.stem)
def test_node_compose_files_mount_only_the_hypervisor_paths(path: Path) -> None:
    config = _compose_config(path)
    (service,) = config["services"].values()
    assert service["network_mode"] == "host"
    assert Path(service["build"]["context"]) == REPO
    sources = {str(source) for _, source, _ in _bind_sources(config)}
    assert sources == NODE_FILES[path]
    if "qemu-server" in path.read_text():
        assert service["pid"] == "host"


def test_dockerfile_installs_the_locked_package_with_both_entry_points() -> None:
    text = (REPO / "Dockerfile").read_text(encoding="utf-8")
    assert len(re.findall(r"^FROM python:3\.11-slim", text, re.MULTILINE)) == 2
    # Both commands by default, each extra by name; the versions and hashes from uv.lock.
    assert re.search(r'^ARG EXTRAS="libvirt recommender"$', text, re.MULTILINE)
    assert "uv export --frozen --no-dev" in text
    assert re.search(r"pip wheel .*--require-hashes .*-r requirements.txt", text)
    assert "COPY pyproject.toml uv.lock" in text
    for package in ("libvirt-dev", "pkg-config", "gcc", "libvirt0"):
        assert package in text
    for line in text.splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            for source in line.split()[1:-1]:
                assert (REPO / source).exists(), line
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    assert 'vmbalance-exporter = "exporter.cli:main"' in pyproject
    assert 'vmbalance = "recommender.entry:main"' in pyproject
    ignored = (REPO / ".dockerignore").read_text(encoding="utf-8").split()
    assert ".venv" in ignored and ".git" in ignored


def test_prometheus_config_scrapes_the_exporter_and_serve() -> None:
    prometheus = yaml.safe_load((REPO / "deploy" / "compose" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    assert {"vmbalance-exporter", "vmbalance-serve"} <= set(jobs)
    compose = yaml.safe_load(COMPOSE.read_text())
    exporter_targets = jobs["vmbalance-exporter"]["static_configs"][0]["targets"]
    assert exporter_targets == ["exporter:9641"]
    assert "--listen=:9641" in compose["services"]["exporter"]["command"]
    serve_config = load_config(REPO / "deploy" / "compose" / "vmbalance.yml")
    port = serve_config.serve.listen.rsplit(":", 1)[1]
    assert jobs["vmbalance-serve"]["static_configs"][0]["targets"] == [f"serve:{port}"]
    assert f"127.0.0.1:{port}:{port}" in compose["services"]["serve"]["ports"]
    assert urlsplit(serve_config.prometheus.url).hostname == "prometheus"
    alertmanagers = prometheus["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    assert alertmanagers == ["alertmanager:9093"]
    # The rule files it loads are the ones compose mounts from alerts/.
    mount = next(
        v for v in compose["services"]["prometheus"]["volumes"] if v.startswith("./alerts:")
    )
    inside = mount.split(":")[1]
    for rule_file in prometheus["rule_files"]:
        assert rule_file.startswith(inside + "/")
        assert (REPO / "alerts" / Path(rule_file).name).is_file()


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed")
def test_promtool_checks_the_prometheus_config(tmp_path: Path) -> None:
    """promtool check config, with the rule files where compose mounts them rewritten to the
    repository's."""
    assert PROMTOOL is not None
    text = (REPO / "deploy" / "compose" / "prometheus.yml").read_text(encoding="utf-8")
    config = tmp_path / "prometheus.yml"
    config.write_text(text.replace("/etc/prometheus/alerts/", f"{REPO / 'alerts'}/"))
    result = subprocess.run(
        [PROMTOOL, "check", "config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "FAILED" not in output and "WARNING" not in output, output
