"""The exporter's web security against Prometheus 2.42's own, on the same web config file.

Each table row sends one request to the exporter and to a real Prometheus started with
`--web.config.file` on the same file, and both must come out alike: TLS up or not (and the
version, and the suite up to TLS 1.2), the status, the configured headers, `Allow`.

Prometheus routes `/metrics` for GET alone and `/-/healthy` for GET and HEAD, the methods the
exporter's `/metrics` serves; so method rows other than GET ask Prometheus's `/-/healthy`.
"""

from __future__ import annotations

import ssl
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bcrypt
import pytest

from tests.conftest import ExporterProcess, start_exporter
from tests.webprobe import (
    Client,
    Outcome,
    Pki,
    basic,
    make_pki,
    probe,
    prometheus,
    prometheus_refuses,
    raw_exchange,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning"),
]

USER = "prometheus"
LONG = "L" * 72  # the password the hash was made from: bcrypt's longest
HEADERS = {
    "Strict-Transport-Security": "max-age=31536000",
    "X-Frame-Options": "deny",
    "Content-Security-Policy": "default-src 'none'",
}
TLS12, TLS13 = ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3


@dataclass(frozen=True)
class Row:
    name: str
    method: str = "GET"
    authorization: str | None = None
    client: Client = field(default_factory=Client)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def long_hash() -> str:
    return bcrypt.hashpw(LONG.encode(), bcrypt.gensalt(rounds=10)).decode()


def write_config(directory: Path, pki: Pki, body: str) -> Path:
    path = directory / "web.yml"
    path.write_text(
        f"tls_server_config:\n  cert_file: {pki.server_cert}\n  key_file: {pki.server_key}\n" + body
    )
    return path


@dataclass
class Pair:
    ours: ExporterProcess
    theirs: int
    pki: Pki

    def both(self, row: Row) -> tuple[Outcome, Outcome]:
        options: dict[str, Any] = {
            "method": row.method,
            "authorization": row.authorization,
            "client": row.client,
            "ca": self.pki.ca,
            "configured": HEADERS,
        }
        prometheus_path = "/metrics" if row.method == "GET" else "/-/healthy"
        return (
            probe(self.ours.port, path="/metrics", **options),
            probe(self.theirs, path=prometheus_path, **options),
        )


@pytest.fixture
def pair_for(tmp_path: Path, pki: Pki) -> Iterator[Any]:
    started: list[Any] = []

    def start(config_body: str) -> Pair:
        web = write_config(tmp_path, pki, config_body)
        context = prometheus(tmp_path, web)
        theirs = context.__enter__()
        started.append(context)
        ours = start_exporter(
            ["--backend", "libvirt", "--libvirt-uri", "test:///default", "--web-config", str(web)],
            tmp_path / "exporter.log",
        )
        started.append(ours)
        return Pair(ours, theirs, pki)

    yield start
    for item in reversed(started):
        if isinstance(item, ExporterProcess):
            item.stop()
        else:
            item.__exit__(None, None, None)


def compare(pair: Pair, rows: list[Row]) -> None:
    differences = []
    for row in rows:
        ours, theirs = pair.both(row)
        if ours != theirs:
            differences.append(f"{row.name}:\n  ours:       {ours}\n  Prometheus: {theirs}")
    assert not differences, "\n".join(differences)


def headers_block() -> str:
    lines = "".join(f'    {name}: "{value}"\n' for name, value in HEADERS.items())
    return "http_server_config:\n  headers:\n" + lines


def test_basic_auth_methods_and_ciphers_match_prometheus(pair_for: Any, long_hash: str) -> None:
    pair: Pair = pair_for(
        "  cipher_suites:\n"
        "    - TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256\n"
        "    - TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA\n"
        "    - TLS_AES_256_GCM_SHA384\n"
        "  prefer_server_cipher_suites: false\n"
        + headers_block()
        + f"basic_auth_users:\n  {USER}: '{long_hash}'\n"
    )
    good = basic(USER, LONG)
    rows = [
        Row("no credentials"),
        Row("right password", authorization=good),
        Row("wrong password", authorization=basic(USER, "wrong")),
        Row("71 bytes of the 72", authorization=basic(USER, LONG[:71])),
        Row("100 bytes, first 72 right", authorization=basic(USER, "L" * 100)),
        Row("100 bytes, wrong beyond 72", authorization=basic(USER, LONG + "M" * 28)),
        Row("100 bytes, wrong within 72", authorization=basic(USER, "L" * 71 + "M" * 29)),
        Row("unknown user", authorization=basic("nobody", LONG)),
        Row("empty user and password", authorization=basic("", "")),
        Row("malformed base64", authorization="Basic !!not base64!!"),
        Row("base64 without padding", authorization=good.rstrip("=")),
        Row("no colon", authorization="Basic cHJvbWV0aGV1cw=="),
        Row("lower-case scheme", authorization="basic " + good[6:]),
        Row("bearer scheme", authorization="Bearer " + good[6:]),
        Row("non-UTF-8 user", authorization=basic(b"\xff\xfe", LONG)),
        Row("HEAD", method="HEAD", authorization=good),
        Row("HEAD without credentials", method="HEAD"),
        Row("POST", method="POST", authorization=good),
        Row("POST without credentials", method="POST"),
        Row("OPTIONS", method="OPTIONS", authorization=good),
        Row("DELETE", method="DELETE", authorization=good),
        Row("TLS 1.0", authorization=good, client=Client(version=ssl.TLSVersion.TLSv1)),
        Row("TLS 1.1", authorization=good, client=Client(version=ssl.TLSVersion.TLSv1_1)),
        Row("TLS 1.2", authorization=good, client=Client(version=TLS12)),
        Row("TLS 1.3", authorization=good, client=Client(version=TLS13)),
        Row("configured suite", authorization=good,
            client=Client(version=TLS12, ciphers="ECDHE-RSA-AES256-SHA")),
        Row("suite outside the list", authorization=good,
            client=Client(version=TLS12, ciphers="ECDHE-RSA-AES256-GCM-SHA384")),
        Row("RSA key exchange outside the list", authorization=good,
            client=Client(version=TLS12, ciphers="AES128-GCM-SHA256")),
        Row("plain HTTP client", authorization=good, client=Client(tls=False)),
    ]  # fmt: skip
    compare(pair, rows)
    # The configured headers really are on the answers (not absent from both alike).
    ours, theirs = pair.both(Row("right password", authorization=good))
    assert ours.status == 200 and dict(ours.headers) == HEADERS == dict(theirs.headers)
    assert pair.both(Row("no credentials"))[0].status == 401


def test_plain_http_on_the_tls_port_gets_the_same_400(pair_for: Any) -> None:
    pair: Pair = pair_for("")
    request = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    ours = raw_exchange(pair.ours.port, request)
    theirs = raw_exchange(pair.theirs, request)
    assert ours == theirs
    assert ours.startswith(b"HTTP/1.0 400 Bad Request\r\n")
    assert ours.endswith(b"Client sent an HTTP request to an HTTPS server.\n")
    # Bytes that are neither TLS nor HTTP: both just hang up.
    assert raw_exchange(pair.ours.port, b"\x00\x01garbage\r\n\r\n") == b""
    assert raw_exchange(pair.theirs, b"\x00\x01garbage\r\n\r\n") == b""


def test_versions_and_default_suites_match_prometheus(pair_for: Any) -> None:
    pair: Pair = pair_for("  min_version: TLS10\n  max_version: TLS12\n")
    rows = [
        Row("TLS 1.0", client=Client(version=ssl.TLSVersion.TLSv1)),
        Row("TLS 1.1", client=Client(version=ssl.TLSVersion.TLSv1_1)),
        Row("TLS 1.2", client=Client(version=TLS12)),
        Row("TLS 1.3 only", client=Client(version=TLS13)),
        Row("any version", client=Client()),
        Row("Go's default AES-CBC suite", client=Client(version=TLS12, ciphers="AES128-SHA")),
        Row("DHE, not in Go's defaults",
            client=Client(version=TLS12, ciphers="DHE-RSA-AES128-GCM-SHA256")),
        Row("CBC-SHA256, not in Go's defaults",
            client=Client(version=TLS12, ciphers="ECDHE-RSA-AES128-SHA256")),
    ]  # fmt: skip
    compare(pair, rows)


def test_one_curve_preference_matches_prometheus(pair_for: Any) -> None:
    pair: Pair = pair_for("  curve_preferences: [CurveP384]\n")
    rows = [
        Row(f"{curve} over TLS {label}", client=Client(version=version, curve=curve))
        for curve in ("secp384r1", "prime256v1", "X25519")
        for label, version in (("1.2", TLS12), ("1.3", TLS13))
    ]
    compare(pair, rows)


@pytest.mark.parametrize(
    ("auth_type", "certs"),
    [
        ("RequireAndVerifyClientCert", ("none", "signed", "stranger")),
        ("VerifyClientCertIfGiven", ("none", "signed", "stranger")),
        ("RequestClientCert", ("none", "signed", "stranger")),
    ],
)
def test_client_certificates_match_prometheus(
    pair_for: Any, pki: Pki, auth_type: str, certs: tuple[str, ...]
) -> None:
    pair: Pair = pair_for(f"  client_auth_type: {auth_type}\n  client_ca_file: {pki.ca}\n")
    chosen = {
        "none": None,
        "signed": (pki.client_cert, pki.client_key),
        "stranger": (pki.stranger_cert, pki.stranger_key),
    }
    rows = [
        Row(f"{cert} certificate, TLS {label}", client=Client(version=version, cert=chosen[cert]))
        for cert in certs
        for label, version in (("1.2", TLS12), ("1.3", TLS13))
    ]
    compare(pair, rows)


BAD_CONFIGS = {
    "unknown top-level field": "tls_config: {{}}\n",
    "unknown TLS field": "tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n  ca: x\n",
    "missing key_file": "tls_server_config:\n  cert_file: {cert}\n",
    "missing cert_file": "tls_server_config:\n  key_file: {key}\n",
    "unreadable cert": "tls_server_config:\n  cert_file: nope.crt\n  key_file: {key}\n",
    "unknown cipher": "tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
    "  cipher_suites: [TLS_RSA_WITH_RC4_128_SHA]\n",
    "OpenSSL cipher name": "tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
    "  cipher_suites: [ECDHE-RSA-AES128-GCM-SHA256]\n",
    "unknown curve": "tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
    "  curve_preferences: [CurveP224]\n",
    "unknown TLS version": "tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
    "  min_version: TLS14\n",
    "unknown client auth": "tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
    "  client_auth_type: Sometimes\n",
    "CA without client auth": "tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
    "  client_ca_file: {ca}\n",
    "header not configurable": "http_server_config:\n  headers:\n    Server: vmbalance\n",
    "header in lower case": "http_server_config:\n  headers:\n    x-frame-options: deny\n",
    "bad X-Frame-Options": "http_server_config:\n  headers:\n    X-Frame-Options: allow\n",
    "short hash": "basic_auth_users:\n  u: $2b$10$short\n",
    "plaintext password": "basic_auth_users:\n  u: " + "s3cret" * 10 + "\n",
    "cost 3": "basic_auth_users:\n  u: $2b$03$" + "a" * 53 + "\n",
    "version 3": "basic_auth_users:\n  u: $3b$10$" + "a" * 53 + "\n",
}
GOOD_CONFIGS = {
    "empty file": "",
    "tls section without files": "tls_server_config:\n  min_version: TLS13\n",
    "2y hash from htpasswd": "basic_auth_users:\n  u: $2y$10$" + "a" * 53 + "\n",
    "hash without minor version": "basic_auth_users:\n  u: $2$10$" + "a" * 53 + "\n",
    "RequireClientCert alias": "tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
    "  client_auth_type: RequireClientCert\n  client_ca_file: {ca}\n",
}


@pytest.mark.parametrize("name", [*BAD_CONFIGS, *GOOD_CONFIGS])
def test_validation_at_start_matches_prometheus(tmp_path: Path, pki: Pki, name: str) -> None:
    body = {**BAD_CONFIGS, **GOOD_CONFIGS}[name]
    web = tmp_path / "web.yml"
    web.write_text(body.format(cert=pki.server_cert, key=pki.server_key, ca=pki.ca))
    refused_by_prometheus = prometheus_refuses(tmp_path, web)
    assert refused_by_prometheus is (name in BAD_CONFIGS)
    try:
        exporter = start_exporter(
            ["--backend", "libvirt", "--libvirt-uri", "test:///default", "--web-config", str(web)],
            tmp_path / "exporter.log",
        )
    except RuntimeError as exc:
        assert refused_by_prometheus, f"refused a file Prometheus serves with: {exc}"
        lines = (tmp_path / "exporter.log").read_text().strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("vmbalance-exporter: web config ")
        assert "exited 2" in str(exc)
    else:
        exporter.stop()
        assert not refused_by_prometheus, "served with a file Prometheus refuses"


def test_unknown_user_costs_what_a_known_user_costs(pair_for: Any, long_hash: str) -> None:
    pair: Pair = pair_for(f"basic_auth_users:\n  {USER}: '{long_hash}'\n")
    import http.client

    from tests.webprobe import client_context

    conn = http.client.HTTPSConnection(
        "127.0.0.1", pair.ours.port, timeout=10, context=client_context(Client(), pair.pki.ca)
    )
    costs: dict[str, list[float]] = {"known": [], "unknown": []}
    try:
        for attempt in range(12):
            for kind, user in (("known", USER), ("unknown", "intruder")):
                # A new password each time: a remembered outcome would cost nothing.
                header = basic(user, f"guess-{attempt}-{kind}")
                started = time.perf_counter()
                conn.request("GET", "/metrics", headers={"Authorization": header})
                response = conn.getresponse()
                response.read()
                costs[kind].append(time.perf_counter() - started)
                assert response.status == 401
        known, unknown = (statistics.median(costs[k]) for k in ("known", "unknown"))
        assert known > 0.01, f"a wrong password cost {known * 1000:.1f} ms: bcrypt did not run"
        assert 0.5 <= known / unknown <= 2.0, (known, unknown)
        # A right password is checked once, then remembered.
        good = {"Authorization": basic(USER, LONG)}
        repeated = []
        for _ in range(8):
            started = time.perf_counter()
            conn.request("HEAD", "/metrics", headers=good)
            response = conn.getresponse()
            response.read()
            repeated.append(time.perf_counter() - started)
            assert response.status == 200
        assert statistics.median(repeated[1:]) < known / 3, (repeated, known)
    finally:
        conn.close()


def test_a_version_range_that_cannot_work_is_refused_at_start_unlike_prometheus(
    tmp_path: Path, pki: Pki
) -> None:
    """A documented difference (docs/deploy.md): Go starts and fails every handshake."""
    web = write_config(tmp_path, pki, "  min_version: TLS13\n  max_version: TLS12\n")
    assert not prometheus_refuses(tmp_path, web)
    with pytest.raises(RuntimeError, match="exited 2"):
        start_exporter(
            ["--backend", "libvirt", "--libvirt-uri", "test:///default", "--web-config", str(web)],
            tmp_path / "exporter.log",
        )
    assert "no TLS version satisfies" in (tmp_path / "exporter.log").read_text()


def test_several_curve_preferences_offer_only_the_first_unlike_prometheus(pair_for: Any) -> None:
    """A documented difference (docs/deploy.md): Python's ssl sets one curve only."""
    pair: Pair = pair_for("  curve_preferences: [CurveP384, CurveP256]\n")
    first = Row("P-384", client=Client(version=TLS13, curve="secp384r1"))
    second = Row("P-256", client=Client(version=TLS13, curve="prime256v1"))
    ours, theirs = pair.both(first)
    assert ours == theirs and ours.tls == "ok"
    ours, theirs = pair.both(second)
    assert theirs.tls == "ok" and ours.tls == "failed"
