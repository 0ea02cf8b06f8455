"""Probing an HTTP(S) server as a client would, and a real Prometheus as the reference.

`probe()` reduces one request to what the comparison needs: whether TLS came up (and which
version and, up to TLS 1.2, which suite), the status, the configured headers that came back,
and `Allow`. Prometheus runs with `--web.config.file` on loopback, started and stopped here.
"""

from __future__ import annotations

import http.client
import shutil
import socket
import ssl
import subprocess
import time
from base64 import b64encode
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from devkit.service import Service, accepts_tcp, free_port, tail

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"


@dataclass(frozen=True)
class Pki:
    """A CA, a server certificate for 127.0.0.1 it signed, and a client certificate."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path  # self-signed: no CA vouches for it
    stranger_key: Path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_pki(directory: Path) -> Pki:
    d = directory
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test CA",
             "-keyout", str(d / "ca.key"), "-out", str(d / "ca.crt"))  # fmt: skip
    for name, subject, ext in (
        ("server", "/CN=127.0.0.1", "subjectAltName=IP:127.0.0.1"),
        ("client", "/CN=prometheus", "extendedKeyUsage=clientAuth"),
    ):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", subject,
                 "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.csr"))  # fmt: skip
        (d / f"{name}.ext").write_text(ext + "\n")
        _openssl("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.crt"),
                 "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-days", "2",
                 "-extfile", str(d / f"{name}.ext"), "-out", str(d / f"{name}.crt"))  # fmt: skip
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
             "/CN=stranger", "-keyout", str(d / "stranger.key"), "-out",
             str(d / "stranger.crt"))  # fmt: skip
    return Pki(d / "ca.crt", d / "server.crt", d / "server.key", d / "client.crt",
               d / "client.key", d / "stranger.crt", d / "stranger.key")  # fmt: skip


@dataclass(frozen=True)
class Client:
    """How the probing client speaks TLS (None: plain HTTP)."""

    tls: bool = True
    version: ssl.TLSVersion | None = None  # pinned; None lets the versions negotiate
    ciphers: str | None = None  # OpenSSL list for TLS 1.2 and below
    curve: str | None = None  # the one group the client offers
    cert: tuple[Path, Path] | None = None


@dataclass(frozen=True)
class Outcome:
    tls: str  # "ok", "failed" or "plain"
    version: str | None = None
    cipher: str | None = None  # TLS 1.2 and below only
    status: int | None = None
    headers: frozenset[tuple[str, str]] = frozenset()  # the configured ones that came back
    allow: str | None = None


def basic(user: str | bytes, password: str | bytes) -> str:
    raw = (user if isinstance(user, bytes) else user.encode()) + b":"
    raw += password if isinstance(password, bytes) else password.encode()
    return "Basic " + b64encode(raw).decode()


def client_context(client: Client, ca: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=ca)
    old = client.version is not None and client.version < ssl.TLSVersion.TLSv1_2
    if client.version is not None:
        context.minimum_version = context.maximum_version = client.version
    if client.ciphers is not None or old:
        context.set_ciphers((client.ciphers or "DEFAULT") + (":@SECLEVEL=0" if old else ""))
    if client.curve is not None:
        context.set_ecdh_curve(client.curve)
    if client.cert is not None:
        context.load_cert_chain(*client.cert)
    return context


def probe(
    port: int,
    *,
    method: str = "GET",
    path: str = "/metrics",
    authorization: str | None = None,
    client: Client = Client(),
    ca: Path | None = None,
    configured: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> Outcome:
    """One request; a TLS or connection failure anywhere before the status line is `failed`."""
    headers = {} if authorization is None else {"Authorization": authorization}
    if client.tls:
        assert ca is not None
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            "127.0.0.1", port, timeout=timeout, context=client_context(client, ca)
        )
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    version = cipher = None
    try:
        conn.connect()
        if client.tls:
            assert isinstance(conn.sock, ssl.SSLSocket)
            version = conn.sock.version()
            suite = conn.sock.cipher()
            cipher = suite[0] if suite and version != "TLSv1.3" else None
        conn.request(method, path, headers=headers)
        response = conn.getresponse()
        response.read()
    except (ssl.SSLError, ConnectionError, http.client.HTTPException, OSError):
        return Outcome(tls="failed" if client.tls else "closed")
    finally:
        conn.close()
    wanted = configured or {}
    present = frozenset(
        (name, response.getheader(name)) for name in wanted if response.getheader(name) is not None
    )
    return Outcome(
        tls="ok" if client.tls else "plain",
        version=version,
        cipher=cipher,
        status=response.status,
        headers=present,
        allow=response.getheader("Allow"),
    )


def raw_exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send `data` on a plain TCP connection and read until the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        with suppress(OSError):
            while chunk := sock.recv(65536):
                chunks.append(chunk)
    return b"".join(chunks)


def prometheus_command(directory: Path, port: int, web_config: Path) -> list[str]:
    config = directory / "prometheus.yml"
    if not config.exists():
        config.write_text("global: {}\n")
    return [
        PROMETHEUS,
        f"--config.file={config}",
        f"--storage.tsdb.path={directory / f'data-{port}'}",
        f"--web.listen-address=127.0.0.1:{port}",
        f"--web.config.file={web_config}",
    ]


def launch_prometheus(directory: Path, web_config: Path) -> tuple[int, Service]:
    """Start Prometheus (its own process group); its port and service."""
    port = free_port()
    log = directory / f"prometheus-{port}.log"
    command = prometheus_command(directory, port, web_config)
    return port, Service("prometheus", command, log).start()


@contextmanager
def prometheus(directory: Path, web_config: Path) -> Iterator[int]:
    """A real Prometheus serving with `web_config`; yields its port."""
    port, service = launch_prometheus(directory, web_config)
    try:
        service.wait_ready(lambda: accepts_tcp(port), 30.0, interval=0.05)
        yield port
    finally:
        service.stop()


def prometheus_refuses(directory: Path, web_config: Path, timeout: float = 30.0) -> bool:
    """Whether Prometheus exits with an error instead of serving with this web config."""
    port, service = launch_prometheus(directory, web_config)
    process = service.process
    assert process is not None
    try:
        # Prometheus listens before it validates the web config, so a listening socket proves
        # nothing yet: it serves if it is still running a while after it started listening.
        deadline = time.monotonic() + timeout
        listening_since: float | None = None
        while time.monotonic() < deadline:
            if process.poll() is not None:
                return process.returncode != 0
            if listening_since is None:
                if accepts_tcp(port):
                    listening_since = time.monotonic()
            elif time.monotonic() - listening_since > 3.0:
                return False
            time.sleep(0.05)
        raise RuntimeError(f"Prometheus neither served nor exited: {tail(service.log_path)}")
    finally:
        service.stop()
