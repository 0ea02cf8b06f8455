"""`tls_server_config` as an OpenSSL context that negotiates what Go's crypto/tls would.

Prometheus 2.42 is built with Go 1.19; these are its rules, and where OpenSSL (through
Python's ssl module) cannot say the same thing, the closest safe reading:

- Versions: `min_version`/`max_version` as given. OpenSSL 3 refuses TLS 1.0 and 1.1 at its
  default security level, so a config that allows them lowers the level to 0, as Go has none.
- Cipher suites apply to TLS 1.0-1.2 only, as in Go: TLS 1.3 suites are not configurable and
  TLS 1.3 names in the list change nothing. The server picks in Go's preference order whatever
  order the list has (Go 1.17+ ignores both the order and `prefer_server_cipher_suites`).
  Without a list, Go's default suites (no DHE; 3DES, which Go 1.19 still offers last, is not
  built into OpenSSL 3). A list with no TLS 1.0-1.2 suite leaves TLS 1.2 clients without a
  common suite in Go; here TLS 1.3 becomes the minimum, which fails them the same way.
- Curves: one curve is exact. Python can set only one curve, so with several the most
  preferred one is the only one offered (a client that supports only a later one connects to
  Prometheus but not here). Without a list OpenSSL's defaults apply, which add X448 and
  (TLS 1.3) FFDHE groups to Go's X25519, P-256, P-384, P-521.
- Client certificates: NoClientCert, VerifyClientCertIfGiven and RequireAndVerifyClientCert
  are exact (without `client_ca_file` the system CAs verify, as in Go). RequestClientCert
  accepts every client in Go, with or without a certificate, and so it does here (the
  certificate is not asked for). RequireAnyClientCert cannot skip verification in OpenSSL:
  a certificate is required and must verify against `client_ca_file` (or the system CAs),
  which is stricter than Go, where any certificate will do.
"""

from __future__ import annotations

import ssl

from exporter.webconfig import TLSConfig, WebConfigError

_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}

# Go's names for TLS 1.0-1.2 suites and OpenSSL's, in Go 1.19's server preference order (with
# AES hardware, as on every x86 hypervisor): AEAD with ECDHE, CBC with ECDHE, AEAD with RSA key
# exchange, CBC with RSA key exchange.
_GO_TO_OPENSSL = {
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_RSA_WITH_AES_128_GCM_SHA256": "AES128-GCM-SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384": "AES256-GCM-SHA384",
    "TLS_RSA_WITH_AES_128_CBC_SHA": "AES128-SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA": "AES256-SHA",
}
_PREFERENCE = list(_GO_TO_OPENSSL)

_CURVES = {
    "CurveP256": "prime256v1",
    "CurveP384": "secp384r1",
    "CurveP521": "secp521r1",
    "X25519": "X25519",
}


def openssl_cipher_list(go_names: tuple[str, ...]) -> list[str]:
    """OpenSSL names of the configured (else Go's default) TLS 1.0-1.2 suites, Go's order."""
    chosen = set(go_names) if go_names else set(_PREFERENCE)
    return [_GO_TO_OPENSSL[name] for name in _PREFERENCE if name in chosen]


def make_ssl_context(tls: TLSConfig, where: str = "web config") -> ssl.SSLContext:
    """A server context for `tls`; WebConfigError (one line) when its files do not load."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    minimum, maximum = _VERSIONS[tls.min_version], _VERSIONS[tls.max_version]
    ciphers = openssl_cipher_list(tls.cipher_suites)
    if not ciphers:
        minimum = ssl.TLSVersion.TLSv1_3  # no suite for TLS 1.2 and below, as in Go
    if minimum > maximum:
        raise WebConfigError(
            f"{where}: tls_server_config: no TLS version satisfies min_version "
            f"{tls.min_version} and max_version {tls.max_version}"
        )
    level = "@SECLEVEL=0" if minimum < ssl.TLSVersion.TLSv1_2 else ""
    if ciphers:
        context.set_ciphers(":".join(ciphers) + level)
    context.minimum_version = minimum
    context.maximum_version = maximum
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
    if tls.curve_preferences:
        context.set_ecdh_curve(_CURVES[tls.curve_preferences[0]])
    try:
        context.load_cert_chain(tls.cert_file, tls.key_file)
    except (OSError, ssl.SSLError) as exc:
        raise WebConfigError(
            f"{where}: tls_server_config: failed to load X509KeyPair ({tls.cert_file}, "
            f"{tls.key_file}): {_reason(exc)}"
        ) from None
    _client_auth(context, tls, where)
    return context


def _client_auth(context: ssl.SSLContext, tls: TLSConfig, where: str) -> None:
    """Client certificates as `client_auth_type` asks, verified against `client_ca_file`."""
    auth = tls.client_auth_type
    if auth in ("VerifyClientCertIfGiven", "RequireAndVerifyClientCert", "RequireAnyClientCert"):
        try:
            if tls.client_ca_file is not None:
                context.load_verify_locations(cafile=tls.client_ca_file)
            else:
                context.load_default_certs(ssl.Purpose.CLIENT_AUTH)
        except (OSError, ssl.SSLError) as exc:
            raise WebConfigError(
                f"{where}: tls_server_config.client_ca_file {tls.client_ca_file}: {_reason(exc)}"
            ) from None
        context.verify_mode = (
            ssl.CERT_OPTIONAL if auth == "VerifyClientCertIfGiven" else ssl.CERT_REQUIRED
        )
    elif tls.client_ca_file is not None:
        # RequestClientCert: Go reads the CA file although it verifies nothing with it.
        try:
            tls.client_ca_file.read_bytes()
        except OSError as exc:
            raise WebConfigError(
                f"{where}: tls_server_config.client_ca_file {tls.client_ca_file}: {_reason(exc)}"
            ) from None


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc)
    return " ".join(str(reason).split())
