"""The web config file Prometheus and its exporters read (`--web.config.file`), validated alike.

Every field exporter-toolkit documents is read with the same rules, so a file that Prometheus
refuses is refused here too, with a one-line reason:

    tls_server_config:
      cert_file: server.crt                          # relative to this file
      key_file: server.key
      client_auth_type: RequireAndVerifyClientCert   # default NoClientCert
      client_ca_file: ca.crt
      min_version: TLS12                             # TLS10 .. TLS13, default TLS12
      max_version: TLS13                             # default TLS13
      cipher_suites: [TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256]   # Go names, TLS 1.0-1.2 only
      curve_preferences: [X25519, CurveP256]
      prefer_server_cipher_suites: true              # accepted; has no effect (as in Go)
    http_server_config:
      http2: true                                    # accepted; HTTP/1.1 is served
      headers:
        Strict-Transport-Security: max-age=31536000
    basic_auth_users:
      prometheus: $2y$10$...                         # bcrypt (htpasswd -nBC 10 '' | tr -d ':')

What the TLS fields mean for OpenSSL is in `exporter.tlsconfig`; the bcrypt rules are in
`exporter.basicauth`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import yaml

TLS_VERSIONS = ("TLS10", "TLS11", "TLS12", "TLS13")

# Go's crypto/tls.CipherSuites() (the suites it does not call insecure): exporter-toolkit
# accepts exactly these names. The TLS 1.3 ones are accepted and, as in Go, change nothing.
CIPHER_SUITES = (
    "TLS_RSA_WITH_AES_128_CBC_SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA",
    "TLS_RSA_WITH_AES_128_GCM_SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384",
    "TLS_AES_128_GCM_SHA256",
    "TLS_AES_256_GCM_SHA384",
    "TLS_CHACHA20_POLY1305_SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
)
CURVES = ("CurveP256", "CurveP384", "CurveP521", "X25519")

# client_auth_type values and what they stand for; "RequireClientCert" is exporter-toolkit's
# old name for RequireAnyClientCert, "" means NoClientCert.
CLIENT_AUTH_TYPES = {
    "": "NoClientCert",
    "NoClientCert": "NoClientCert",
    "RequestClientCert": "RequestClientCert",
    "RequireAnyClientCert": "RequireAnyClientCert",
    "RequireClientCert": "RequireAnyClientCert",
    "VerifyClientCertIfGiven": "VerifyClientCertIfGiven",
    "RequireAndVerifyClientCert": "RequireAndVerifyClientCert",
}

# The only response headers exporter-toolkit lets a config set, with the values it allows
# (None: any value).
CONFIGURABLE_HEADERS: dict[str, tuple[str, ...] | None] = {
    "Strict-Transport-Security": None,
    "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-XSS-Protection": None,
    "Content-Security-Policy": None,
}

_TLS_KEYS = frozenset(
    {
        "cert_file",
        "key_file",
        "client_auth_type",
        "client_ca_file",
        "cipher_suites",
        "curve_preferences",
        "min_version",
        "max_version",
        "prefer_server_cipher_suites",
    }
)
_HTTP_KEYS = frozenset({"http2", "headers"})
_TOP_KEYS = frozenset({"tls_server_config", "http_server_config", "basic_auth_users"})


class WebConfigError(Exception):
    """The web config file is unreadable or invalid: a one-line reason."""


@dataclass(frozen=True)
class TLSConfig:
    """`tls_server_config` with paths resolved against the file's directory."""

    cert_file: Path
    key_file: Path
    client_auth_type: str = "NoClientCert"  # canonical name (see CLIENT_AUTH_TYPES)
    client_ca_file: Path | None = None
    min_version: str = "TLS12"
    max_version: str = "TLS13"
    cipher_suites: tuple[str, ...] = ()  # empty: Go's defaults
    curve_preferences: tuple[str, ...] = ()  # empty: Go's defaults
    prefer_server_cipher_suites: bool = True


@dataclass(frozen=True)
class WebConfig:
    """The whole file; the empty config serves plain HTTP without authentication."""

    tls: TLSConfig | None = None
    headers: tuple[tuple[str, str], ...] = ()
    basic_auth_users: dict[str, str] = field(default_factory=dict)
    source: str = "web config"


def load_web_config(path: str | Path) -> WebConfig:
    """Read and validate a web config file as exporter-toolkit does, TLS files included."""
    import yaml  # only when a web config is given

    path = Path(path)
    where = f"web config {path}"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise WebConfigError(f"{where}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise WebConfigError(f"{where}: not UTF-8 text") from None
    try:
        raw = yaml.load(text, Loader=_strict_loader())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise WebConfigError(f"{where}{line}: {problem}") from None
    config = parse_web_config(raw, path.parent, where)
    if config.tls is not None:
        from exporter.tlsconfig import make_ssl_context

        make_ssl_context(config.tls, where)  # fail now, as Prometheus does, not per connection
    return config


def parse_web_config(raw: object, base: Path, where: str = "web config") -> WebConfig:
    """The parsed YAML document as a WebConfig; WebConfigError names the first bad field."""
    from exporter.basicauth import validate_hash

    top = _mapping(raw, "", where, _TOP_KEYS)
    tls = _tls(top.get("tls_server_config"), base, where)
    http = _mapping(top.get("http_server_config"), "http_server_config", where, _HTTP_KEYS)
    if "http2" in http and not isinstance(http["http2"], bool):
        raise WebConfigError(f"{where}: http_server_config.http2: not a boolean")
    headers = _headers(http.get("headers"), where)
    users: dict[str, str] = {}
    for user, hashed in _mapping(top.get("basic_auth_users"), "basic_auth_users", where).items():
        if not isinstance(hashed, str):
            raise WebConfigError(f"{where}: basic_auth_users.{user}: not a string")
        problem = validate_hash(hashed)
        if problem is not None:
            raise WebConfigError(
                f"{where}: basic_auth_users.{user}: {problem} "
                "(create a hash with: htpasswd -nBC 10 '' | tr -d ':')"
            )
        users[str(user)] = hashed
    return WebConfig(tls=tls, headers=headers, basic_auth_users=users, source=where)


def _tls(raw: object, base: Path, where: str) -> TLSConfig | None:
    section = _mapping(raw, "tls_server_config", where, _TLS_KEYS)
    name = "tls_server_config."
    cert = _string(section.get("cert_file"), name + "cert_file", where)
    key = _string(section.get("key_file"), name + "key_file", where)
    auth = _string(section.get("client_auth_type"), name + "client_auth_type", where)
    ca = _string(section.get("client_ca_file"), name + "client_ca_file", where)
    ciphers = _names(section.get("cipher_suites"), name + "cipher_suites", where, CIPHER_SUITES)
    curves = _names(section.get("curve_preferences"), name + "curve_preferences", where, CURVES)
    versions = {
        key_name: _tls_version(section.get(key_name), default, name + key_name, where)
        for key_name, default in (("min_version", "TLS12"), ("max_version", "TLS13"))
    }
    prefer = section.get("prefer_server_cipher_suites", True)
    if not isinstance(prefer, bool):
        raise WebConfigError(f"{where}: {name}prefer_server_cipher_suites: not a boolean")
    if not cert and not key and not auth and not ca:
        return None  # exporter-toolkit: "TLS config is not present", plain HTTP
    if not cert:
        raise WebConfigError(f"{where}: {name}cert_file: missing cert_file")
    if not key:
        raise WebConfigError(f"{where}: {name}key_file: missing key_file")
    if auth not in CLIENT_AUTH_TYPES:
        raise WebConfigError(f"{where}: {name}client_auth_type: Invalid ClientAuth: {auth}")
    canonical = CLIENT_AUTH_TYPES[auth]
    if ca and canonical == "NoClientCert":
        raise WebConfigError(
            f"{where}: {name}client_ca_file: Client CA's have been configured without a "
            "Client Auth Policy"
        )

    def resolve(value: str) -> Path:
        candidate = Path(value)
        return candidate if candidate.is_absolute() else base / candidate

    return TLSConfig(
        cert_file=resolve(cert),
        key_file=resolve(key),
        client_auth_type=canonical,
        client_ca_file=resolve(ca) if ca else None,
        min_version=versions["min_version"],
        max_version=versions["max_version"],
        cipher_suites=ciphers,
        curve_preferences=curves,
        prefer_server_cipher_suites=prefer,
    )


def _tls_version(value: object, default: str, field: str, where: str) -> str:
    if value is None:
        return default
    if value not in TLS_VERSIONS:
        raise WebConfigError(f"{where}: {field}: unknown TLS version: {value}")
    return str(value)


def _headers(raw: object, where: str) -> tuple[tuple[str, str], ...]:
    headers = _mapping(raw, "http_server_config.headers", where)
    result = []
    for name, value in headers.items():
        if name not in CONFIGURABLE_HEADERS:
            raise WebConfigError(
                f"{where}: http_server_config.headers: HTTP header {name!r} can not be configured"
            )
        if not isinstance(value, str):
            raise WebConfigError(f"{where}: http_server_config.headers.{name}: not a string")
        allowed = CONFIGURABLE_HEADERS[name]
        if allowed is not None and value not in allowed:
            raise WebConfigError(
                f"{where}: http_server_config.headers.{name}: invalid value {value!r}, "
                f"expected one of {', '.join(allowed)}"
            )
        if any(ch in value for ch in "\r\n\0"):
            raise WebConfigError(f"{where}: http_server_config.headers.{name}: not one line")
        result.append((str(name), value))
    return tuple(result)


def _mapping(
    raw: object, name: str, where: str, allowed: frozenset[str] | None = None
) -> dict[Any, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise WebConfigError(f"{where}: {name or 'the file'}: not a mapping")
    for key in raw:
        if not isinstance(key, str):
            raise WebConfigError(f"{where}: {name or 'the file'}: key {key!r} is not a string")
        if allowed is not None and key not in allowed:
            prefix = f"{name}." if name else ""
            raise WebConfigError(f"{where}: {prefix}{key}: field not found in the web config")
    return raw


def _string(raw: object, name: str, where: str) -> str:
    if raw is None:
        return ""
    if not isinstance(raw, str):
        raise WebConfigError(f"{where}: {name}: not a string")
    return raw


def _names(raw: object, name: str, where: str, known: tuple[str, ...]) -> tuple[str, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise WebConfigError(f"{where}: {name}: not a list")
    what = "cipher" if name.endswith("cipher_suites") else "curve"
    for item in raw:
        if item not in known:
            raise WebConfigError(f"{where}: {name}: unknown {what}: {item}")
    return tuple(raw)


@functools.cache
def _strict_loader() -> type[yaml.SafeLoader]:
    """A SafeLoader that refuses a key given twice, as Go's yaml.UnmarshalStrict does; built
    on first use, so importing this module does not import yaml."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} given twice", key_node.start_mark
                    )
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return StrictLoader
