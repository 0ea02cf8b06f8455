"""HTTP serving: landing page, /metrics, and the exporter-toolkit web config (TLS, basic auth).

The web config file has the format Prometheus's own exporters read (`--web.config.file`), so
an operator can reuse the file they already have:

    tls_server_config:
      cert_file: server.crt
      key_file: server.key
      client_auth_type: RequireAndVerifyClientCert   # optional
      client_ca_file: ca.crt                         # optional
      min_version: TLS12                             # optional
    basic_auth_users:
      prometheus: $2y$10$...                         # bcrypt hash (htpasswd -nBC 10)
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import ipaddress
import re
import socket
import ssl
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app
from prometheus_client.registry import CollectorRegistry

TEXT_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
CLIENT_AUTH_TYPES = {
    "NoClientCert": ssl.CERT_NONE,
    "RequestClientCert": ssl.CERT_OPTIONAL,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}


class WebConfigError(Exception):
    """The web config file is unreadable or invalid: a one-line reason."""


@dataclass(frozen=True)
class TLSConfig:
    cert_file: Path
    key_file: Path
    client_auth_type: str = "NoClientCert"
    client_ca_file: Path | None = None
    min_version: str = "TLS12"
    max_version: str | None = None


@dataclass(frozen=True)
class WebConfig:
    tls: TLSConfig | None = None
    basic_auth_users: dict[str, bytes] = field(default_factory=dict)


def load_web_config(path: str | Path) -> WebConfig:
    """Read and validate a web config file; relative paths are relative to the file."""
    import yaml  # only when a web config is given: keeps the plain exporter small
    from pydantic import BaseModel, ConfigDict, ValidationError

    class _TLS(BaseModel):
        model_config = ConfigDict(extra="forbid")
        cert_file: str
        key_file: str
        client_auth_type: str = "NoClientCert"
        client_ca_file: str | None = None
        min_version: str = "TLS12"
        max_version: str | None = None
        cipher_suites: list[str] | None = None
        prefer_server_cipher_suites: bool | None = None
        curve_preferences: list[str] | None = None

    class _HTTPServer(BaseModel):
        model_config = ConfigDict(extra="forbid")
        http2: bool | None = None
        headers: dict[str, str] | None = None

    class _File(BaseModel):
        model_config = ConfigDict(extra="forbid")
        tls_server_config: _TLS | None = None
        http_server_config: _HTTPServer | None = None
        basic_auth_users: dict[str, str] | None = None

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise WebConfigError(f"web config {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise WebConfigError(f"web config {path}{where}: {problem}") from None
    try:
        parsed = _File.model_validate(raw or {})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise WebConfigError(f"web config {path}: {where}: {first['msg']}") from None

    tls = None
    if parsed.tls_server_config is not None:
        tls = _tls_config(parsed.tls_server_config.model_dump(), path)
    users = {}
    for user, hashed in (parsed.basic_auth_users or {}).items():
        if not hashed.startswith(("$2a$", "$2b$", "$2y$")):
            raise WebConfigError(
                f"web config {path}: basic_auth_users.{user}: not a bcrypt hash "
                "(create one with: htpasswd -nBC 10 '' | tr -d ':')"
            )
        users[user] = hashed.encode()
    web = WebConfig(tls=tls, basic_auth_users=users)
    if tls is not None:
        make_ssl_context(web.tls, path)  # fail now, with a clear message, not at first scrape
    return web


def _tls_config(raw: dict[str, Any], path: Path) -> TLSConfig:
    base = path.parent

    def resolve(name: str) -> Path:
        candidate = Path(name)
        return candidate if candidate.is_absolute() else base / candidate

    if raw["client_auth_type"] not in CLIENT_AUTH_TYPES:
        raise WebConfigError(
            f"web config {path}: tls_server_config.client_auth_type: "
            f"{raw['client_auth_type']!r} is not one of {', '.join(CLIENT_AUTH_TYPES)}"
        )
    for key in ("min_version", "max_version"):
        if raw[key] is not None and raw[key] not in TLS_VERSIONS:
            raise WebConfigError(
                f"web config {path}: tls_server_config.{key}: {raw[key]!r} is not one of "
                f"{', '.join(TLS_VERSIONS)}"
            )
    if raw["client_auth_type"] == "RequireAndVerifyClientCert" and not raw["client_ca_file"]:
        raise WebConfigError(
            f"web config {path}: tls_server_config.client_ca_file is required with "
            "RequireAndVerifyClientCert"
        )
    return TLSConfig(
        cert_file=resolve(raw["cert_file"]),
        key_file=resolve(raw["key_file"]),
        client_auth_type=raw["client_auth_type"],
        client_ca_file=resolve(raw["client_ca_file"]) if raw["client_ca_file"] else None,
        min_version=raw["min_version"],
        max_version=raw["max_version"],
    )


def make_ssl_context(tls: TLSConfig, origin: Path | str = "web config") -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = TLS_VERSIONS[tls.min_version]
    if tls.max_version:
        context.maximum_version = TLS_VERSIONS[tls.max_version]
    try:
        context.load_cert_chain(tls.cert_file, tls.key_file)
        if tls.client_ca_file is not None:
            context.load_verify_locations(tls.client_ca_file)
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc)
        raise WebConfigError(
            f"web config {origin}: cannot load TLS files ({tls.cert_file}, {tls.key_file}): "
            f"{reason}"
        ) from None
    context.verify_mode = CLIENT_AUTH_TYPES[tls.client_auth_type]
    return context


class BasicAuth:
    """Checks HTTP basic credentials against bcrypt hashes.

    bcrypt is deliberately slow; a verified (user, password) pair is remembered as a salted
    SHA-256 so a Prometheus scraping every 15 s does not pay bcrypt each time.
    """

    def __init__(self, users: dict[str, bytes]) -> None:
        self._users = users
        self._verified: dict[str, bytes] = {}
        self._salt = hashlib.sha256(str(id(self)).encode() + socket.gethostname().encode())
        self._lock = threading.Lock()

    def check(self, header: str | None) -> bool:
        if not header or not header.startswith("Basic "):
            return False
        try:
            decoded = base64.b64decode(header[6:], validate=True).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            return False
        user, sep, password = decoded.partition(":")
        hashed = self._users.get(user)
        if not sep or hashed is None:
            return False
        digest = self._digest(user, password)
        with self._lock:
            known = self._verified.get(user)
        if known is not None and hmac.compare_digest(known, digest):
            return True
        import bcrypt

        if bcrypt.checkpw(password.encode(), b"$2b$" + hashed[4:]):
            with self._lock:
                self._verified[user] = digest
            return True
        return False

    def _digest(self, user: str, password: str) -> bytes:
        salted = self._salt.copy()
        salted.update(f"{user}\0{password}".encode())
        return salted.digest()


def landing_page(title: str, details: dict[str, str]) -> bytes:
    rows = "".join(
        f"<tr><th>{html.escape(key)}</th><td>{html.escape(value)}</td></tr>"
        for key, value in details.items()
    )
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title></head><body>"
        f"<h1>{html.escape(title)}</h1>"
        "<p><a href='metrics'>Metrics</a></p>"
        f"<table>{rows}</table></body></html>"
    ).encode()


def make_app(
    registry: CollectorRegistry,
    landing: bytes,
    web: WebConfig,
    text_exposition: Callable[[], bytes] | None = None,
) -> WSGIApp:
    """Route `/` to the landing page and `/metrics` to the exposition.

    `text_exposition`, when given, renders the classic text format directly; client_python's
    app still answers OpenMetrics requests, `name[]` filters and HEAD-less variants.
    """
    metrics_app = make_wsgi_app(registry)
    auth = BasicAuth(web.basic_auth_users) if web.basic_auth_users else None

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if auth is not None and not auth.check(environ.get("HTTP_AUTHORIZATION")):
            start_response(
                "401 Unauthorized",
                [("WWW-Authenticate", 'Basic realm="vmbalance"'), ("Content-Type", "text/plain")],
            )
            return [b"Unauthorized\n"]
        path = environ.get("PATH_INFO", "/")
        if path == "/metrics":
            if text_exposition is not None and _wants_plain_text(environ):
                body = text_exposition()
                start_response(
                    "200 OK",
                    [("Content-Type", TEXT_CONTENT_TYPE), ("Content-Length", str(len(body)))],
                )
                return [body]
            return metrics_app(environ, start_response)
        if path in ("/", ""):
            start_response("200 OK", [("Content-Type", "text/html; charset=utf-8")])
            return [landing]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"Not Found\n"]

    return app


def _wants_plain_text(environ: dict[str, Any]) -> bool:
    accept = environ.get("HTTP_ACCEPT", "")
    return "application/openmetrics-text" not in accept and not environ.get("QUERY_STRING")


class _QuietHandler(WSGIRequestHandler):
    """No access log on stderr: a scrape every 15 s is not news."""

    def log_message(self, format: str, *args: Any) -> None:
        return


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that drops mid-request or speaks plain HTTP to TLS is not our error."""
        return


_LISTEN_HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?")
_LISTEN_PORT = re.compile(r"[0-9]{1,5}")


def parse_listen(listen: str) -> tuple[str, int]:
    """`host:port`, `:port` (every IPv4 interface) or `[v6addr]:port`; an IPv6 address must be
    in brackets (`::1:9641` reads two ways). The recommender's `serve --listen` follows the
    same rules with its own parser (`recommender/listen.py`): the two share no code."""
    expected = f"--listen {listen!r}: expected HOST:PORT, :PORT or [IPV6]:PORT"
    host, sep, port = listen.rpartition(":")
    if not sep or not _LISTEN_PORT.fullmatch(port) or not 0 < int(port) < 65536:
        raise WebConfigError(f"{expected} (port 1-65535)")
    if host.startswith("[") and host.endswith("]"):
        try:
            return str(ipaddress.IPv6Address(host[1:-1])), int(port)
        except ValueError:
            raise WebConfigError(f"{expected}: {host} is not an IPv6 address") from None
    if ":" in host:
        raise WebConfigError(f"{expected}: write an IPv6 address in brackets")
    if host and not _LISTEN_HOST.fullmatch(host):
        raise WebConfigError(f"{expected}: {host!r} is not a host name or address")
    return host or "0.0.0.0", int(port)


def serve(listen: str, app: WSGIApp, web: WebConfig) -> tuple[WSGIServer, threading.Thread]:
    """Start serving in a daemon thread; the TLS handshake runs in each request's thread."""
    host, port = parse_listen(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server_class = type("Server", (_ThreadingServer,), {"address_family": family})
    try:
        httpd = make_server(host, port, app, server_class, handler_class=_QuietHandler)
    except OSError as exc:
        raise WebConfigError(f"cannot listen on {listen}: {exc.strerror or exc}") from None
    if web.tls is not None:
        context = make_ssl_context(web.tls)
        httpd.socket = context.wrap_socket(
            httpd.socket, server_side=True, do_handshake_on_connect=False
        )
    thread = threading.Thread(target=httpd.serve_forever, name="http", daemon=True)
    thread.start()
    return httpd, thread
