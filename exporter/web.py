"""The exporter's HTTP answers: `/metrics`, the landing page, basic auth and configured headers.

Routing follows Prometheus 2.42 behind exporter-toolkit: configured headers on every answer,
401 with `WWW-Authenticate: Basic` before anything else, then for a path that exists: GET and
HEAD (without a body) served, OPTIONS answered with `Allow`, any other method 405 with
`Allow`. HEAD does not scrape: it says the exporter answers, at no cost to the hypervisor.

Scrapes that arrive while one is running wait for it and share its text, so twenty parallel
scrapers cost one backend read, not twenty queued ones.
"""

from __future__ import annotations

import asyncio
import html
import ipaddress
import logging
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import parse_qs

from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry

from exporter.basicauth import BasicAuth
from exporter.httpserver import HTTPServer, Request, Response, ServerLimits
from exporter.webconfig import WebConfig, WebConfigError

TEXT_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
ALLOW = "GET, HEAD, OPTIONS"

log = logging.getLogger("exporter.web")


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
    ).encode("utf-8", "replace")


class MetricsApp:
    """The request handler `HTTPServer` calls, on its event loop."""

    def __init__(
        self,
        registry: CollectorRegistry,
        landing: bytes,
        web: WebConfig,
        text_exposition: Callable[[], bytes],
    ) -> None:
        self._registry = registry
        self._landing = landing
        self._headers = list(web.headers)
        self._text_exposition = text_exposition
        self._auth = BasicAuth(web.basic_auth_users) if web.basic_auth_users else None
        # One thread scrapes (the collector serialises scrapes anyway), one more serves the
        # rare OpenMetrics or filtered request; bcrypt has its own so a flood of wrong
        # passwords never delays a scrape whose credentials are cached.
        self._scrapes = ThreadPoolExecutor(max_workers=2, thread_name_prefix="scrape")
        self._bcrypt = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bcrypt")
        self._inflight: asyncio.Future[bytes] | None = None

    def close(self) -> None:
        self._scrapes.shutdown(wait=False, cancel_futures=True)
        self._bcrypt.shutdown(wait=False, cancel_futures=True)

    async def __call__(self, request: Request) -> Response:
        response = Response(200, list(self._headers))
        if self._auth is not None and not await self._authorised(request):
            response.status = 401
            response.set_header("Content-Type", "text/plain; charset=utf-8")
            response.set_header("WWW-Authenticate", "Basic")
            response.set_header("X-Content-Type-Options", "nosniff")
            response.body = b"Unauthorized\n"
            return response
        if request.path not in ("/", "/metrics"):
            response.status = 404
            response.set_header("Content-Type", "text/plain; charset=utf-8")
            response.set_header("X-Content-Type-Options", "nosniff")
            response.body = b"404 page not found\n"
            return response
        if request.method == "OPTIONS":
            response.set_header("Allow", ALLOW)
            return response
        if request.method not in ("GET", "HEAD"):
            response.status = 405
            response.set_header("Allow", ALLOW)
            response.set_header("Content-Type", "text/plain; charset=utf-8")
            response.set_header("X-Content-Type-Options", "nosniff")
            response.body = b"Method Not Allowed\n"
            return response
        if request.path == "/":
            response.set_header("Content-Type", "text/html; charset=utf-8")
            if request.method == "GET":
                response.body = self._landing
            return response
        if request.method == "HEAD":
            response.set_header("Content-Type", TEXT_CONTENT_TYPE)
            return response
        return await self._metrics(request, response)

    async def _authorised(self, request: Request) -> bool:
        assert self._auth is not None
        header = request.headers.get("authorization")
        outcome = self._auth.cached(header)
        if outcome is None:
            loop = asyncio.get_running_loop()
            outcome = await loop.run_in_executor(self._bcrypt, self._auth.check, header)
        return outcome

    async def _metrics(self, request: Request, response: Response) -> Response:
        loop = asyncio.get_running_loop()
        accept = request.headers.get("accept", "")
        if "application/openmetrics-text" not in accept and not request.query:
            response.set_header("Content-Type", TEXT_CONTENT_TYPE)
            response.body = await self._shared_text()
            return response
        names = parse_qs(request.query).get("name[]")
        encoder, content_type = choose_encoder(accept)
        registry: Any = self._registry.restricted_registry(names) if names else self._registry
        response.set_header("Content-Type", content_type)
        response.body = await loop.run_in_executor(self._scrapes, encoder, registry)
        return response

    async def _shared_text(self) -> bytes:
        """The running scrape's text, or a new scrape when none runs."""
        if self._inflight is None:
            loop = asyncio.get_running_loop()
            future = loop.run_in_executor(self._scrapes, self._text_exposition)
            self._inflight = future

            def clear(_: object) -> None:
                if self._inflight is future:
                    self._inflight = None

            future.add_done_callback(clear)
        return await asyncio.shield(self._inflight)


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


def serve(
    listen: str, app: MetricsApp, web: WebConfig, limits: ServerLimits | None = None
) -> HTTPServer:
    """Listen on `listen` and serve `app` from a daemon thread; WebConfigError if it cannot."""
    context = None
    if web.tls is not None:
        from exporter.tlsconfig import make_ssl_context

        context = make_ssl_context(web.tls, web.source)
    server = HTTPServer(app, context, limits)
    host, port = parse_listen(listen)
    try:
        server.bind(host, port)
    except OSError as exc:
        raise WebConfigError(f"cannot listen on {listen}: {exc.strerror or exc}") from None
    server.start()
    return server
