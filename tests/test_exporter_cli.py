"""The exporter as operators run it: a process on loopback, scraped over HTTP(S)."""

from __future__ import annotations

import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from base64 import b64encode
from pathlib import Path

import bcrypt
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import REPO, ExporterProcess

TEST_URI = "test:///default"


def fetch(url: str, *, auth: tuple[str, str] | None = None, cafile: Path | None = None):
    request = urllib.request.Request(url)
    if auth is not None:
        token = b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    context = ssl.create_default_context(cafile=str(cafile)) if cafile else None
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "exporter.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )


def test_landing_page_and_metrics(exporter_factory) -> None:
    exporter: ExporterProcess = exporter_factory(
        "--backend", "libvirt", "--libvirt-uri", TEST_URI, "--node-name", "lab1",
        "--cluster-name", "lab",
    )  # fmt: skip
    status, page = fetch(f"http://{exporter.address}/")
    assert status == 200 and "metrics" in page and "lab1" in page
    status, body = fetch(f"http://{exporter.address}/metrics")
    assert status == 200
    assert 'vmbalance_up{cluster="lab",node="lab1"} 1.0' in body
    (info,) = next(
        f for f in text_string_to_metric_families(body) if f.name == "vmbalance_vm_info"
    ).samples
    assert info.labels["name"] == "test" and info.labels["node"] == "lab1"
    assert info.labels["backend"] == "libvirt"
    assert fetch(f"http://{exporter.address}/nope")[0] == 404


def test_promtool_check_metrics_on_a_real_scrape(exporter_factory) -> None:
    exporter = exporter_factory("--backend", "libvirt", "--libvirt-uri", TEST_URI)
    _, body = fetch(f"http://{exporter.address}/metrics")
    checked = subprocess.run(
        ["promtool", "check", "metrics"], input=body, capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0
    assert checked.stdout == "" and checked.stderr == ""


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


def test_tls_and_basic_auth(exporter_factory, tmp_path: Path, tls_files) -> None:
    cert, key = tls_files
    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=6)).decode()
    hashed = "$2y$" + hashed[4:]  # htpasswd writes $2y$; accept it like exporter-toolkit does
    web_config = tmp_path / "web.yml"
    web_config.write_text(
        "tls_server_config:\n"
        f"  cert_file: {cert.name}\n"
        f"  key_file: {key.name}\n"
        "basic_auth_users:\n"
        f"  prometheus: '{hashed}'\n"
    )
    exporter = exporter_factory(
        "--backend", "libvirt", "--libvirt-uri", TEST_URI, "--web-config", str(web_config)
    )
    url = f"https://{exporter.address}/metrics"
    assert fetch(url, cafile=cert)[0] == 401
    assert fetch(url, auth=("prometheus", "wrong"), cafile=cert)[0] == 401
    assert fetch(url, auth=("nobody", "s3cret"), cafile=cert)[0] == 401
    status, body = fetch(url, auth=("prometheus", "s3cret"), cafile=cert)
    assert status == 200 and "vmbalance_up" in body
    # The cached credential must not let a wrong password in afterwards.
    assert fetch(url, auth=("prometheus", "s3cret!"), cafile=cert)[0] == 401
    status, body = fetch(f"http://{exporter.address}/metrics", auth=("prometheus", "s3cret"))
    assert status == 400 and "HTTP request to an HTTPS server" in body


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("tls_server_config:\n  cert_file: a.crt\n", "tls_server_config.key_file"),
        ("basic_auth_users:\n  admin: plaintext\n", "too short to be a bcrypted password"),
        ("tls_config: {}\n", "tls_config"),
        ("basic_auth_users: [\n", "web config"),
        (
            "tls_server_config:\n  cert_file: missing.crt\n  key_file: missing.key\n",
            "failed to load X509KeyPair",
        ),
    ],
)
def test_bad_web_config_is_one_line(tmp_path: Path, content: str, expected: str) -> None:
    web_config = tmp_path / "web.yml"
    web_config.write_text(content)
    result = run_cli("--backend", "libvirt", "--libvirt-uri", TEST_URI, "--web-config",
                     str(web_config), "--listen", "127.0.0.1:0")  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_bad_uri_and_unreadable_dirs_are_one_line(tmp_path: Path) -> None:
    for args in (
        ["--backend", "libvirt", "--libvirt-uri", "::not a uri"],
        [
            "--backend",
            "qmp",
            "--qmp-run-dir",
            str(tmp_path / "absent"),
            "--pve-conf-dir",
            str(tmp_path),
        ],
        ["--listen", "not-an-address", "--backend", "libvirt", "--libvirt-uri", TEST_URI],
        ["--backend", "libvirt", "--libvirt-uri", TEST_URI, "--shared-path", "mnt/ceph"],
    ):
        result = run_cli(*args)
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("vmbalance-exporter: "), result.stderr
        assert "Traceback" not in result.stderr


def test_the_exporter_imports_none_of_the_recommenders_stack() -> None:
    """It runs on every hypervisor: no data-frame, plotting, solver or validation stack."""
    heavy = ("pandas", "numpy", "matplotlib", "highspy", "pydantic", "jinja2", "requests")
    probe = (
        "import sys, exporter.cli, exporter.web, exporter.webconfig, exporter.tlsconfig, "
        "exporter.qmp, exporter.libvirt\n"
        "from exporter.webconfig import parse_web_config\n"
        "from pathlib import Path\n"
        "parse_web_config({'basic_auth_users': {'u': '$2y$10$' + 'a' * 53}}, Path('.'))\n"
        f"print(','.join(m for m in {heavy!r} if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, check=True
    )
    assert result.stdout.strip() == ""
