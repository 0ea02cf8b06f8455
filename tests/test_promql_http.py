"""The PromQL HTTP client's own behaviour against scripted loopback servers: retries within
the deadline, redirects (credentials stay with their host), gzip, error answers, proxies
from the environment."""

from __future__ import annotations

import gzip
import json
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from recommender.source.http import ClientSettings, PromQLClient, SourceError

RESULT = [{"metric": {"node": "pve1"}, "value": [0, "1"]}]
SUCCESS = {"status": "success", "data": {"resultType": "vector", "result": RESULT}}
Reply = tuple[int, dict[str, str], bytes]


class Scripted(ThreadingHTTPServer):
    """Answers the n-th request with `replies[n]` (the last one repeats); records requests."""

    def __init__(self, replies: list[Reply | Callable[[Scripted], Reply]]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.replies = replies
        self.requests: list[tuple[str, dict[str, str]]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        server: Scripted = self.server  # type: ignore[assignment]
        server.requests.append((self.path, dict(self.headers)))
        reply = server.replies[min(len(server.requests), len(server.replies)) - 1]
        status, headers, body = reply(server) if callable(reply) else reply
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Requests are recorded instead."""


def ok_json(document: Any = SUCCESS) -> Reply:
    return 200, {"Content-Type": "application/json"}, json.dumps(document).encode()


@pytest.fixture
def serve() -> Iterator[Callable[..., Scripted]]:
    started: list[tuple[Scripted, threading.Thread]] = []

    def start(*replies: Reply | Callable[[Scripted], Reply]) -> Scripted:
        server = Scripted(list(replies))
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        started.append((server, thread))
        return server

    yield start
    for server, thread in started:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def client(url: str, timeout: float = 5, **auth: str) -> PromQLClient:
    return PromQLClient(ClientSettings(url=url, timeout_seconds=timeout, **auth), "test/1")


def test_a_busy_server_is_asked_again_within_the_deadline(serve) -> None:
    server = serve((503, {}, b"busy"), (502, {}, b"gateway"), ok_json())
    assert client(server.url).query("up", 0) == RESULT
    assert len(server.requests) == 3
    stubborn = serve((503, {}, b"still busy"))
    with pytest.raises(SourceError, match=r"HTTP 503: still busy \(query: up\)$"):
        client(stubborn.url).query("up", 0)
    assert len(stubborn.requests) == 3


def test_no_retry_that_would_pass_the_deadline(serve) -> None:
    server = serve((503, {}, b"busy"))
    started = time.monotonic()
    with pytest.raises(SourceError, match="HTTP 503"):
        client(server.url, timeout=0.3).query("up", 0)
    assert time.monotonic() - started < 0.6 and len(server.requests) <= 2


def test_redirects_are_followed_and_credentials_stay_with_their_host(serve) -> None:
    other = serve(ok_json())
    moved = f"{other.url}/prometheus/api/v1/query?query=up"
    server = serve((307, {"Location": "/prefix/api/v1/query?query=up"}, b""),
                   (302, {"Location": moved}, b""))  # fmt: skip
    assert client(server.url, username="u", password="p").query("up", 0) == RESULT
    assert [path for path, _ in server.requests] == [
        "/api/v1/query?query=up&time=0.000",
        "/prefix/api/v1/query?query=up",
    ]
    assert all(headers["Authorization"] == "Basic dTpw" for _, headers in server.requests)
    assert other.requests[0][0] == "/prometheus/api/v1/query?query=up"
    assert "Authorization" not in other.requests[0][1]


def test_gzip_answers_are_read_and_asked_for(serve) -> None:
    body = gzip.compress(json.dumps(SUCCESS).encode())
    server = serve((200, {"Content-Encoding": "gzip"}, body))
    assert client(server.url).query("up", 0) == RESULT
    assert "gzip" in server.requests[0][1]["Accept-Encoding"]
    broken = serve((200, {"Content-Encoding": "gzip"}, b"not gzip"))
    with pytest.raises(SourceError, match="the answer is not valid gzip"):
        client(broken.url).query("up", 0)


def test_error_answers_in_one_line(serve) -> None:
    failed = serve(ok_json({"status": "error", "errorType": "bad_data", "error": "parse\nerror"}))
    with pytest.raises(SourceError) as caught:
        client(failed.url).query("x", 0)
    assert str(caught.value) == (
        f"prometheus at {failed.url}: the server reported an error: parse error (query: x)"
    )


def test_credentials_in_the_url_are_used_and_never_shown(serve) -> None:
    server = serve((401, {}, b"Unauthorized"))
    url = server.url.replace("http://", "http://us%40er:s3cr%3At@")
    with pytest.raises(SourceError) as caught:
        client(url).query("up", 0)
    assert server.requests[0][1]["Authorization"] == "Basic dXNAZXI6czNjcjp0"  # us@er:s3cr:t
    assert str(caught.value).startswith(f"prometheus at {server.url}: HTTP 401 (check ")
    assert "s3cr" not in str(caught.value)


def test_a_refused_connection_is_tried_again(serve) -> None:
    """A server that starts listening a moment late (a restart) is reached on a retry."""
    probe = Scripted([ok_json()])
    port = probe.server_address[1]
    probe.server_close()
    late: list[Scripted] = []

    def start_late() -> None:
        time.sleep(0.1)
        server = Scripted.__new__(Scripted)
        ThreadingHTTPServer.__init__(server, ("127.0.0.1", port), _Handler)
        server.replies, server.requests = [ok_json()], []
        late.append(server)
        server.serve_forever()

    threading.Thread(target=start_late, daemon=True).start()
    try:
        assert client(f"http://127.0.0.1:{port}").query("up", 0) == RESULT
        assert len(late[0].requests) == 1
    finally:
        if late:
            late[0].shutdown()
            late[0].server_close()


class ForwardProxy(ThreadingHTTPServer):
    """A plain HTTP forward proxy on loopback: GETs with an absolute URL are fetched from
    their server and answered as they came; `silent` holds every request unanswered."""

    def __init__(self, silent: bool = False) -> None:
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.silent = silent
        self.release = threading.Event()
        self.forwarded: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _ProxyHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        proxy: ForwardProxy = self.server  # type: ignore[assignment]
        proxy.forwarded.append(self.path)
        if proxy.silent:
            proxy.release.wait(30)
            return
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with direct.open(self.path, timeout=5) as answer:
            body = answer.read()
            status = answer.status
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Requests are recorded instead."""


@pytest.fixture
def proxy() -> Iterator[Callable[..., ForwardProxy]]:
    started: list[tuple[ForwardProxy, threading.Thread]] = []

    def start(silent: bool = False) -> ForwardProxy:
        server = ForwardProxy(silent)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        started.append((server, thread))
        return server

    yield start
    for server, thread in started:
        server.release.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def no_proxy_settings(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    return monkeypatch


def test_the_proxy_of_the_environment_is_used_and_no_proxy_honoured(
    serve, proxy, no_proxy_settings: pytest.MonkeyPatch
) -> None:
    server = serve(ok_json())
    forward = proxy()
    no_proxy_settings.setenv("http_proxy", forward.url)
    assert client(server.url).query("up", 0) == RESULT
    assert forward.forwarded == [f"{server.url}/api/v1/query?query=up&time=0.000"]
    assert len(server.requests) == 1
    no_proxy_settings.setenv("no_proxy", "127.0.0.1")
    assert client(server.url).query("up", 0) == RESULT
    assert len(forward.forwarded) == 1 and len(server.requests) == 2


def test_the_deadline_holds_through_a_proxy(
    serve, proxy, no_proxy_settings: pytest.MonkeyPatch
) -> None:
    server = serve(ok_json())
    stuck = proxy(silent=True)
    no_proxy_settings.setenv("HTTP_PROXY", stuck.url)
    started = time.monotonic()
    with pytest.raises(SourceError, match=rf"^no answer from {server.url} within 1 s$"):
        client(server.url, timeout=1).query("up", 0)
    assert time.monotonic() - started < 1.5
    assert stuck.forwarded and not server.requests
