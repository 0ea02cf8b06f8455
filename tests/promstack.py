"""Small HTTP servers of the tests' own (a scrape target, a webhook receiver), in a thread on
loopback; context managers that stop what they started."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any


class HTTPEndpoint:
    """A ThreadingHTTPServer on 127.0.0.1:<free port> in a daemon thread.

    `on_get(path) -> (status, content type, body)` answers GETs; POST bodies are parsed as
    JSON and appended to `posts` as (path, body)."""

    def __init__(self, on_get: Callable[[str], tuple[int, str, bytes]] | None = None) -> None:
        self.posts: list[tuple[str, Any]] = []
        self.received = threading.Condition()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if on_get is None:
                    self.send_error(404)
                    return
                status, content_type, body = on_get(self.path)
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length) or b"null")
                with endpoint.received:
                    endpoint.posts.append((self.path, body))
                    endpoint.received.notify_all()
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> HTTPEndpoint:
        self.thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)

    def wait_for_post(
        self, predicate: Callable[[str, Any], bool], timeout: float
    ) -> tuple[str, Any]:
        """The first POST (received so far or within `timeout` s) that satisfies `predicate`."""
        with self.received:
            found = self.received.wait_for(
                lambda: next((p for p in self.posts if predicate(*p)), None), timeout=timeout
            )
        if found is None:
            raise TimeoutError(f"no matching POST within {timeout}s; got {self.posts!r}")
        return found
