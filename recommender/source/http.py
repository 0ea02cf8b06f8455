"""The PromQL HTTP API through `prometheus-api-client`, with one total deadline per request and
failures told in words.

`PrometheusConnect` sends the queries over a `requests.Session` of ours. A socket timeout
bounds each read, not the request: a server that sends its headers and then one byte a second
never trips it. So each request runs in a worker thread that the caller waits for until the
deadline (`prometheus.timeout_seconds`, which covers name resolution, connect, TLS, headers,
body, retries and redirects). Every socket the request uses is registered with the attempt
(our urllib3 connection classes do that when they open or reuse one); at the deadline the
caller shuts them down through a duplicate of the descriptor, which ends the worker's blocked
read at once without touching TLS state from another thread, and reports "no answer from URL
within N s".

What an operator reads is "connection refused" or "TLS: certificate verify failed: ...",
never a client library's internals: the cause is found in the exception chain. Answers of
502, 503 and 504 and refused connections are asked again while the deadline allows.
Redirects are followed (at most 5); `requests` drops the credentials when one leads to
another host. Proxies are those of the environment, as `requests` reads them (`https_proxy`,
`http_proxy`, `no_proxy`; lower or upper case).
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import math
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import requests
import urllib3
from prometheus_api_client.exceptions import PrometheusApiClientException
from prometheus_api_client.prometheus_connect import PrometheusConnect
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from recommender.text import netloc, one_line, redact_url

# Answers worth asking again (a restarting server, a load balancer without a backend), and
# how long to wait before each new try; every try stays inside the one deadline.
RETRY_STATUS = frozenset({502, 503, 504})
BACKOFF = (0.2, 0.4)
MAX_REDIRECTS = 5
ERROR_DETAIL = 200
WORKER_NAME = "promql-request"


class SourceError(Exception):
    """The metrics server could not give a usable answer; the message is one line."""


def _detail(text: str) -> str:
    return one_line(text, limit=ERROR_DETAIL)


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


# --- the sockets of one request ----------------------------------------------------------------


@dataclass
class _Attempt:
    """One request (with its retries and redirects); `cancel` cuts every socket it uses.

    A socket is watched through a duplicate of its descriptor: `shutdown` acts on the
    connection, so it ends a read blocked on the original (plain or TLS) without using the
    original object from this thread."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    watched: list[socket.socket] = field(default_factory=list)
    cancelled: bool = False
    response: requests.Response | None = None

    def watch(self, sock: socket.socket) -> None:
        duplicate = socket.socket(fileno=os.dup(sock.fileno()))
        with self.lock:
            self.watched.append(duplicate)
            cancelled = self.cancelled
        if cancelled:
            self.cancel()

    def cancel(self) -> None:
        with self.lock:
            self.cancelled = True
            for duplicate in self.watched:
                with contextlib.suppress(OSError):
                    duplicate.shutdown(socket.SHUT_RDWR)

    def release(self) -> None:
        with self.lock:
            watched, self.watched = self.watched, []
        for duplicate in watched:
            duplicate.close()


_current = threading.local()


def _watch(sock: socket.socket | None) -> None:
    """Register a socket with the request the calling worker thread runs, if any."""
    attempt: _Attempt | None = getattr(_current, "attempt", None)
    if attempt is not None and sock is not None:
        attempt.watch(sock)


class _WatchedHTTPConnection(HTTPConnection):
    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        _watch(sock)
        return sock


class _WatchedHTTPSConnection(HTTPSConnection):
    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        _watch(sock)
        return sock


class _WatchedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection

    def _get_conn(self, timeout: float | None = None) -> Any:
        conn = super()._get_conn(timeout)
        # A kept-alive connection; a new one registers when it connects.
        _watch(getattr(conn, "sock", None))
        return conn


class _WatchedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection

    def _get_conn(self, timeout: float | None = None) -> Any:
        conn = super()._get_conn(timeout)
        _watch(getattr(conn, "sock", None))
        return conn


_POOLS = {"http": _WatchedHTTPPool, "https": _WatchedHTTPSPool}


class _WatchedAdapter(HTTPAdapter):
    """An HTTPAdapter whose connections (direct or through an HTTP proxy) register their
    sockets, and which never retries by itself (the client does, against its deadline)."""

    def __init__(self) -> None:
        super().__init__(max_retries=0)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _POOLS

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if not proxy.lower().startswith("socks"):
            manager.pool_classes_by_scheme = _POOLS
        return manager


# --- the client --------------------------------------------------------------------------------


class PromQLClient:
    """Instant and range queries against one PromQL API base URL."""

    def __init__(self, settings: ClientSettings, user_agent: str) -> None:
        self.settings = settings
        self.display_url = redact_url(settings.url)
        self.where = f"prometheus at {self.display_url}"
        parts = urlsplit(settings.url)
        base = urlunsplit(
            (parts.scheme, netloc(parts.hostname or "", parts.port), parts.path.rstrip("/"),
             "", "")
        )  # fmt: skip
        username, password = settings.username, settings.password
        if username is None and parts.username is not None:
            username, password = unquote(parts.username), unquote(parts.password or "")
        headers = {"Accept": "application/json"}
        credentials: dict[str, Any] = {}
        if settings.bearer_token:
            headers["Authorization"] = f"Bearer {settings.bearer_token}"
        elif username is not None:
            credentials["auth"] = (username, password or "")
        self._session = requests.Session()
        self._session.headers["User-Agent"] = user_agent
        self._session.max_redirects = MAX_REDIRECTS
        self._session.verify = _verify(settings)
        adapter = _WatchedAdapter()
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        self._connect = PrometheusConnect(
            url=base, headers=headers, session=self._session, **credentials
        )
        # PrometheusConnect mounts a plain adapter on its URL; ours takes that place again.
        self._session.mount(base, adapter)
        self._session.hooks["response"].append(_keep_response)

    def query(self, promql: str, at: float) -> Any:
        """The `result` of an instant query evaluated at unix time `at`."""
        return self._ask(
            promql, lambda timeout: self._connect.custom_query(
                promql, params={"time": f"{at:.3f}"}, timeout=timeout
            )
        )  # fmt: skip

    def query_range(self, promql: str, start: float, end: float, step: str) -> Any:
        """The `result` of a range query (whole seconds are sent for `start` and `end`)."""
        first, last = datetime.fromtimestamp(start, UTC), datetime.fromtimestamp(end, UTC)
        return self._ask(
            promql, lambda timeout: self._connect.custom_query_range(
                promql, start_time=first, end_time=last, step=step, timeout=timeout
            )
        )  # fmt: skip

    def _ask(self, promql: str, send: Callable[[int], Any]) -> Any:
        """`send(timeout)` in a worker, tried again on a busy answer, all within the deadline;
        its result, or SourceError with one line."""
        timeout = self.settings.timeout_seconds
        deadline = time.monotonic() + timeout
        for pause in (*BACKOFF, None):
            outcome = self._exchange(send, deadline)
            if outcome.timed_out:
                raise SourceError(f"no answer from {self.display_url} within {timeout:g} s")
            if outcome.error is None:
                return outcome.result
            retry = _retryable(outcome.error, outcome.response)
            if pause is None or not retry or time.monotonic() + pause >= deadline:
                break
            time.sleep(pause)
        raise SourceError(self._failure(outcome, promql))

    def _exchange(self, send: Callable[[int], Any], deadline: float) -> _Outcome:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return _Outcome(timed_out=True)
        attempt = _Attempt()
        outcome = _Outcome()

        def work() -> None:
            _current.attempt = attempt
            try:
                # Whole seconds for each socket operation; the deadline itself is ours.
                outcome.result = send(math.ceil(remaining))
            except BaseException as exc:  # reported by the caller, in words
                outcome.error = exc
            finally:
                _current.attempt = None
                attempt.release()

        worker = threading.Thread(target=work, daemon=True, name=WORKER_NAME)
        worker.start()
        worker.join(max(deadline - time.monotonic(), 0.0))
        if worker.is_alive():
            attempt.cancel()
            return _Outcome(timed_out=True)
        outcome.response = attempt.response
        if attempt.cancelled or isinstance(outcome.error, requests.Timeout):
            outcome.timed_out = True
        return outcome

    def _failure(self, outcome: _Outcome, promql: str) -> str:
        """The one line for a failed request: the server's answer, or what went wrong."""
        error, response = outcome.error, outcome.response
        answered = PrometheusApiClientException | ValueError | KeyError | TypeError
        if isinstance(error, answered) and response is not None:
            return f"{self.where}: {describe_answer(response, f'query: {promql}')}"
        if isinstance(error, requests.exceptions.ContentDecodingError):
            return f"{self.where}: the answer is not valid gzip"
        if isinstance(error, requests.TooManyRedirects):
            return f"{self.where}: more than {MAX_REDIRECTS} redirects"
        assert error is not None
        return f"{self.where}: {describe_failure(error)}"


@dataclass
class _Outcome:
    result: Any = None
    error: BaseException | None = None
    response: requests.Response | None = None
    timed_out: bool = False


def _keep_response(response: requests.Response, *args: Any, **kwargs: Any) -> None:
    """Session hook: the last answer of the running request, for error messages."""
    attempt: _Attempt | None = getattr(_current, "attempt", None)
    if attempt is not None:
        attempt.response = response


def _verify(settings: ClientSettings) -> bool | str:
    """What `requests` verifies the server with; a CA file that does not load is an error
    now, not at the first query."""
    if settings.insecure_skip_verify:
        urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
        return False
    if settings.ca_file is None:
        return True
    try:
        ssl.create_default_context(cafile=settings.ca_file)
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc)
        raise SourceError(f"cannot load ca_file {settings.ca_file}: {_detail(reason)}") from None
    return settings.ca_file


def _retryable(error: BaseException, response: requests.Response | None) -> bool:
    if isinstance(error, PrometheusApiClientException):
        return response is not None and response.status_code in RETRY_STATUS
    return any(isinstance(cause, ConnectionRefusedError) for cause in causes(error))


def describe_answer(response: requests.Response, context: str = "") -> str:
    """What is wrong with an answer that came back: its HTTP status and the server's own
    error, or why it is not a PromQL API answer."""
    suffix = f" ({context})" if context else ""
    try:
        document = response.json()
    except (ValueError, RecursionError):
        document = None
    status = response.status_code
    if status != 200:
        detail = response.content.decode("utf-8", errors="replace")
        if isinstance(document, dict) and document.get("error"):
            detail = str(document["error"])
        hint = " (check bearer_token / username and password)" if status in (401, 403) else ""
        return f"HTTP {status}{hint}: {_detail(detail) or '(empty body)'}{suffix}"
    if document is None:
        return "the answer is not JSON (is this a PromQL API?)"
    if isinstance(document, dict) and document.get("status") == "error":
        shown = _detail(str(document.get("error") or document.get("errorType")))
        return f"the server reported an error: {shown}{suffix}"
    return "the answer is not a PromQL API response"


def causes(error: BaseException) -> Iterator[BaseException]:
    """`error` and everything behind it: causes, contexts, urllib3's `reason`, wrapped
    exceptions in `args` — depth first, each once."""
    seen: set[int] = set()
    stack = [error]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        behind = [getattr(current, "reason", None), current.__context__, current.__cause__]
        behind += list(reversed(current.args))
        stack += [item for item in reversed(behind) if isinstance(item, BaseException)]


_OS_WORDS = {
    errno.EHOSTUNREACH: "no route to host",
    errno.ENETUNREACH: "network is unreachable",
    errno.ECONNABORTED: "connection aborted",
}


def _in_words(error: BaseException) -> str | None:
    """Words for one exception of the chain, or None when a deeper one says more."""
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, socket.gaierror):
        return "cannot resolve the host name"
    if isinstance(error, ssl.SSLCertVerificationError):
        reason = error.verify_message or error.reason or "certificate verify failed"
        return f"TLS: certificate verify failed: {_detail(reason)} (set prometheus.ca_file)"
    if isinstance(error, ssl.SSLError):
        reason = (error.reason or str(error)).replace("_", " ").lower()
        return f"TLS: {_detail(reason)}"
    if isinstance(error, http.client.RemoteDisconnected | ConnectionResetError):
        return "the server closed the connection without an answer"
    if isinstance(error, http.client.IncompleteRead):
        return "the server closed the connection in the middle of its answer"
    if isinstance(error, http.client.HTTPException):
        return "the answer is not HTTP"
    if isinstance(error, OSError) and error.errno is not None:
        return _OS_WORDS.get(error.errno) or f"cannot connect: {_detail(error.strerror or '')}"
    return None


def describe_failure(error: BaseException) -> str:
    """What went wrong with a request, in words."""
    for cause in causes(error):
        words = _in_words(cause)
        if words is not None:
            return words
    if isinstance(error, requests.exceptions.ChunkedEncodingError):
        return "the server closed the connection in the middle of its answer"
    if isinstance(error, requests.ConnectionError):
        return "the server closed the connection without an answer"
    return f"request failed: {_detail(str(error) or type(error).__name__)}"


__all__ = [
    "ClientSettings",
    "PromQLClient",
    "SourceError",
    "describe_answer",
    "describe_failure",
    "redact_url",
]
