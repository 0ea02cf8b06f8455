"""The PromQL HTTP API, with one total deadline per request and failures told in words.

A socket timeout bounds each read, not the request: a server that sends its headers and then
one byte a second never trips it. So each request runs in a worker thread that the caller
waits for until the deadline (`prometheus.timeout_seconds`, which covers name resolution,
connect, TLS, headers, body, retries and redirects); at the deadline the socket is shut down,
which ends the worker's blocked read at once, and the caller reports "no answer from URL
within N s".

Only the standard library speaks HTTP here (`http.client`, `ssl`), so what an operator reads is
"connection refused" or "TLS: certificate verify failed: ...", never a client library's
internals. The server is reached directly: proxy environment variables are not used.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import gzip
import http.client
import json
import socket
import ssl
import threading
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlencode, urljoin, urlsplit, urlunsplit

# Answers worth asking again (a restarting server, a load balancer without a backend), and
# how long to wait before each new try; every try stays inside the one deadline.
_RETRY_STATUS = frozenset({502, 503, 504})
_BACKOFF = (0.2, 0.4)
_MAX_REDIRECTS = 5
_ERROR_DETAIL = 200


class SourceError(Exception):
    """The metrics server could not give a usable answer; the message is one line."""


def redact_url(url: str) -> str:
    """The URL without user:password@ (it ends up in snapshots, plans and messages)."""
    try:
        parts = urlsplit(url)
        if parts.username is None and parts.password is None:
            return url
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        if parts.port is not None:
            host = f"{host}:{parts.port}"
    except ValueError:
        return "(an invalid URL)"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def _one_line(text: str, limit: int = _ERROR_DETAIL) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


@dataclass(frozen=True)
class ClientSettings:
    """What the client needs from `prometheus` settings (kept apart so this module does not
    depend on the config's layout)."""

    url: str
    timeout_seconds: float
    bearer_token: str | None = None
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    insecure_skip_verify: bool = False


class _Attempt:
    """One HTTP exchange; `cancel` shuts its socket so a blocked read returns at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self.connection: http.client.HTTPConnection | None = None
        self.cancelled = False

    def create_connection(
        self, address: tuple[str, int], timeout: float, source_address: Any = None
    ) -> socket.socket:
        sock = socket.create_connection(address, timeout, source_address)
        with self._lock:
            if self.cancelled:
                sock.close()
                raise TimeoutError("cancelled")
            self._sockets.append(sock)
        return sock

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            sockets = list(self._sockets)
            # TLS wraps the plain socket into a new object that owns the descriptor.
            wrapped = self.connection.sock if self.connection is not None else None
            if wrapped is not None:
                sockets.append(wrapped)
            for sock in sockets:
                with contextlib.suppress(OSError):
                    # shutdown, not close: the worker still owns the descriptor; the plain
                    # socket call, so a TLS socket's state is not touched from this thread.
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)


@dataclass
class _Answer:
    status: int = 0
    headers: http.client.HTTPMessage | None = None
    body: bytes = b""
    error: BaseException | None = None


class PromQLClient:
    """GETs against one PromQL API base URL; `get` returns the answer's `data`."""

    def __init__(self, settings: ClientSettings, user_agent: str) -> None:
        self.settings = settings
        self.display_url = redact_url(settings.url)
        self.where = f"prometheus at {self.display_url}"
        parts = urlsplit(settings.url)
        self._base = urlunsplit(
            (parts.scheme, _netloc(parts.hostname or "", parts.port), parts.path.rstrip("/"),
             "", "")
        )  # fmt: skip
        self._headers = {
            "User-Agent": user_agent,
            "Accept": "application/json",
            "Accept-Encoding": "gzip",
        }
        username = settings.username
        password = settings.password
        if username is None and parts.username is not None:
            username, password = unquote(parts.username), unquote(parts.password or "")
        if settings.bearer_token:
            self._headers["Authorization"] = f"Bearer {settings.bearer_token}"
        elif username is not None:
            pair = f"{username}:{password or ''}".encode()
            self._headers["Authorization"] = "Basic " + base64.b64encode(pair).decode("ascii")
        self._tls = _tls_context(settings) if parts.scheme == "https" else None

    def get(self, path: str, params: Mapping[str, str], context: str = "") -> Any:
        """The `data` of a successful answer; raises SourceError with one line otherwise.
        `context` (e.g. the query) is added to errors the server itself reported."""
        timeout = self.settings.timeout_seconds
        deadline = time.monotonic() + timeout
        url = f"{self._base}{path}?{urlencode(params)}"
        headers = dict(self._headers)
        tries = 0
        redirects = 0
        while True:
            answer = self._exchange(url, headers, deadline)
            error = answer.error
            if error is None and answer.status in (301, 302, 303, 307, 308):
                location = answer.headers.get("Location") if answer.headers else None
                if location and redirects < _MAX_REDIRECTS:
                    redirects += 1
                    following = urljoin(url, location)
                    if urlsplit(following).netloc != urlsplit(url).netloc:
                        headers.pop("Authorization", None)  # credentials stay with their host
                    url = following
                    continue
            retry = isinstance(error, ConnectionRefusedError) or (
                error is None and answer.status in _RETRY_STATUS
            )
            if retry and tries < len(_BACKOFF):
                pause = _BACKOFF[tries]
                if time.monotonic() + pause < deadline:
                    tries += 1
                    time.sleep(pause)
                    continue
            if error is not None:
                raise SourceError(self._failure(error, timeout)) from None
            return self._data(answer, context)

    def _exchange(self, url: str, headers: Mapping[str, str], deadline: float) -> _Answer:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return _Answer(error=TimeoutError())
        attempt = _Attempt()
        answer = _Answer()
        worker = threading.Thread(
            target=self._run, args=(attempt, answer, url, headers, remaining), daemon=True,
            name="promql-request",
        )  # fmt: skip
        worker.start()
        worker.join(max(deadline - time.monotonic(), 0.0))
        if worker.is_alive():
            attempt.cancel()
            return _Answer(error=TimeoutError())
        if attempt.cancelled and answer.error is not None:
            answer.error = TimeoutError()
        return answer

    def _run(
        self,
        attempt: _Attempt,
        answer: _Answer,
        url: str,
        headers: Mapping[str, str],
        timeout: float,
    ) -> None:
        try:
            connection, target = self._connection(url, timeout)
            # Every socket the connection opens is known to the attempt, so it can be cut.
            connection._create_connection = attempt.create_connection  # type: ignore[attr-defined]
            attempt.connection = connection
            try:
                connection.request("GET", target, headers=dict(headers))
                response = connection.getresponse()
                answer.body = response.read()
                answer.status = response.status
                answer.headers = response.msg
            finally:
                connection.close()
        except BaseException as exc:  # reported by the caller, in words
            answer.error = exc

    def _connection(self, url: str, timeout: float) -> tuple[http.client.HTTPConnection, str]:
        """The connection to open and the request target."""
        parts = urlsplit(url)
        host = parts.hostname or ""
        target = urlunsplit(("", "", parts.path or "/", parts.query, ""))
        if parts.scheme == "https":
            port = parts.port or 443
            return http.client.HTTPSConnection(
                host, port, timeout=timeout, context=self._tls
            ), target
        return http.client.HTTPConnection(host, parts.port or 80, timeout=timeout), target

    def _failure(self, error: BaseException, timeout: float) -> str:
        if isinstance(error, TimeoutError | socket.timeout):
            return f"no answer from {self.display_url} within {timeout:g} s"
        return f"{self.where}: {describe_failure(error)}"

    def _data(self, answer: _Answer, context: str) -> Any:
        body = answer.body
        encoding = (answer.headers.get("Content-Encoding", "") if answer.headers else "").lower()
        if encoding == "gzip":
            try:
                body = gzip.decompress(body)
            except (OSError, EOFError, zlib.error):
                raise SourceError(f"{self.where}: the answer is not valid gzip") from None
        try:
            document = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            document = None
        suffix = f" ({context})" if context else ""
        if answer.status != 200:
            detail = body.decode("utf-8", errors="replace")
            if isinstance(document, dict) and document.get("error"):
                detail = str(document["error"])
            hint = ""
            if answer.status in (401, 403):
                hint = " (check bearer_token / username and password)"
            shown = _one_line(detail) or "(empty body)"
            raise SourceError(f"{self.where}: HTTP {answer.status}{hint}: {shown}{suffix}")
        if document is None:
            raise SourceError(f"{self.where}: the answer is not JSON (is this a PromQL API?)")
        if isinstance(document, dict) and document.get("status") == "error":
            shown = _one_line(str(document.get("error") or document.get("errorType")))
            raise SourceError(f"{self.where}: the server reported an error: {shown}{suffix}")
        if (
            not isinstance(document, dict)
            or document.get("status") != "success"
            or ("data" not in document)
        ):
            raise SourceError(f"{self.where}: the answer is not a PromQL API response")
        return document["data"]


def _netloc(host: str, port: int | None) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"{shown}:{port}" if port is not None else shown


def _tls_context(settings: ClientSettings) -> ssl.SSLContext:
    if settings.insecure_skip_verify:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    try:
        return ssl.create_default_context(cafile=settings.ca_file)
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc)
        raise SourceError(f"cannot load ca_file {settings.ca_file}: {_one_line(reason)}") from None


def describe_failure(error: BaseException) -> str:
    """What went wrong with a request, in words."""
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, socket.gaierror):
        return "cannot resolve the host name"
    if isinstance(error, ssl.SSLCertVerificationError):
        reason = error.verify_message or error.reason or "certificate verify failed"
        return f"TLS: certificate verify failed: {_one_line(reason)} (set prometheus.ca_file)"
    if isinstance(error, ssl.SSLError):
        reason = (error.reason or str(error)).replace("_", " ").lower()
        return f"TLS: {_one_line(reason)}"
    if isinstance(error, http.client.RemoteDisconnected | ConnectionResetError):
        return "the server closed the connection without an answer"
    if isinstance(error, http.client.IncompleteRead):
        return "the server closed the connection in the middle of its answer"
    if isinstance(error, http.client.HTTPException):
        return "the answer is not HTTP"
    if isinstance(error, OSError):
        words = {
            errno.EHOSTUNREACH: "no route to host",
            errno.ENETUNREACH: "network is unreachable",
            errno.ECONNABORTED: "connection aborted",
        }
        if error.errno in words:
            return words[error.errno]
        return f"cannot connect: {_one_line(error.strerror or str(error))}"
    return f"request failed: {_one_line(str(error) or type(error).__name__)}"


__all__ = [
    "ClientSettings",
    "PromQLClient",
    "SourceError",
    "describe_failure",
    "redact_url",
]
