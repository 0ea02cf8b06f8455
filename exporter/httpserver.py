"""A small HTTP/1.1 server on asyncio, built for an exporter that faces the network.

Why not `http.server` / `wsgiref` (which client_python's `start_http_server` uses): one thread
per connection, no header timeout and a listen backlog of 5, so a few hundred half-sent
requests hold as many threads and parallel scrapers wait to connect. Why not cheroot: its
bounded pool reads each request head in a worker thread, so as many slow clients as workers
stop every scrape. Here one event-loop thread reads every connection, the TLS handshake and
request heads included, each under a deadline; only complete requests reach the handler, and
the handler runs blocking work (a scrape, a bcrypt check) on a few threads of its own. The
standard library is all it needs, which keeps the exporter's install small.

- at most `max_connections` connections at once; more wait in the kernel's backlog, as with
  Prometheus's `--web.max-connections` (backlog `backlog`, at least 128)
- a request head must arrive within `header_timeout`; a kept-alive connection is closed after
  `idle_timeout` without a request; a response must drain within `write_timeout`
- plain HTTP to the TLS port gets Go's answer, `400 Client sent an HTTP request to an HTTPS
  server.`; other bytes that are not TLS fail the handshake
- a client that hangs up, times out or fails the handshake is one DEBUG line, never a
  traceback
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus

log = logging.getLogger("exporter.http")

# The five bytes Go's net/http takes for plain HTTP when a TLS record header was expected.
PLAIN_HTTP_PREFIXES = frozenset({b"GET /", b"HEAD ", b"POST ", b"PUT /", b"OPTIO"})
PLAIN_HTTP_ON_TLS = (
    b"HTTP/1.0 400 Bad Request\r\n\r\nClient sent an HTTP request to an HTTPS server.\n"
)
_PEEK_PAUSE = 0.01  # a partial TLS record header is waited for in these steps
_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


@dataclass(frozen=True)
class ServerLimits:
    """How much a client may take: connections, time, header size."""

    max_connections: int = 512
    backlog: int = 1024
    header_timeout: float = 10.0
    idle_timeout: float = 120.0
    write_timeout: float = 30.0
    max_header_bytes: int = 64 * 1024


@dataclass(frozen=True)
class Request:
    """A request head; header names are lower case, each with its first value."""

    method: str
    target: str
    path: str
    query: str
    version: str
    headers: dict[str, str]
    peer: str


@dataclass
class Response:
    """What a handler answers; `Content-Length` and `Date` are added by the server."""

    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""

    def set_header(self, name: str, value: str) -> None:
        """Replace any header of that name (case-insensitive), as Go's Header.Set does."""
        lower = name.lower()
        self.headers = [(n, v) for n, v in self.headers if n.lower() != lower]
        self.headers.append((name, value))


Handler = Callable[[Request], Awaitable[Response]]


class _BadRequest(Exception):
    """The head cannot be parsed: answer with `status` and close."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


class HTTPServer:
    """Serve `handler` on one listening socket from an event loop in a daemon thread."""

    def __init__(
        self,
        handler: Handler,
        ssl_context: ssl.SSLContext | None = None,
        limits: ServerLimits | None = None,
    ) -> None:
        self._handler = handler
        self._ssl = ssl_context
        self.limits = limits or ServerLimits()
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopped = threading.Event()

    def bind(self, host: str, port: int) -> None:
        """Listen now, in the caller's thread, so a busy port fails at start (OSError)."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind((host, port))
            sock.listen(max(self.limits.backlog, 128))
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._sock = sock

    @property
    def port(self) -> int:
        assert self._sock is not None
        return int(self._sock.getsockname()[1])

    def start(self) -> None:
        """Run the event loop in a daemon thread until `stop()`."""
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            loop.set_exception_handler(_log_loop_exception)
            self._loop = loop
            accept = loop.create_task(self._accept_loop())
            ready.set()
            try:
                loop.run_until_complete(accept)
            except asyncio.CancelledError:
                pass
            finally:
                for task in list(self._tasks):
                    task.cancel()
                if self._tasks:
                    loop.run_until_complete(asyncio.wait(list(self._tasks), timeout=1.0))
                loop.close()
                self._stopped.set()

        self._thread = threading.Thread(target=run, name="http", daemon=True)
        self._thread.start()
        ready.wait()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, close every connection, close the socket."""
        loop = self._loop
        if loop is not None and not self._stopped.is_set():

            def cancel_all() -> None:
                for task in asyncio.all_tasks(loop):
                    task.cancel()

            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(cancel_all)
            self._stopped.wait(timeout)
        if self._sock is not None:
            self._sock.close()

    # ------------------------------------------------------------------ connections

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._sock is not None
        slots = asyncio.Semaphore(self.limits.max_connections)
        while True:
            await slots.acquire()
            try:
                conn, address = await loop.sock_accept(self._sock)
            except OSError as exc:  # EMFILE and the like: wait rather than spin
                slots.release()
                log.warning("accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            task = loop.create_task(self._connection(conn, _peer(address)))
            self._tasks.add(task)

            def done(finished: asyncio.Task[None]) -> None:
                self._tasks.discard(finished)
                slots.release()

            task.add_done_callback(done)

    async def _connection(self, conn: socket.socket, peer: str) -> None:
        loop = asyncio.get_running_loop()
        writer: asyncio.StreamWriter | None = None
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            deadline = loop.time() + self.limits.header_timeout
            if self._ssl is not None:
                if not await self._looks_like_tls(conn, peer, deadline):
                    return
                reader = asyncio.StreamReader(limit=self.limits.max_header_bytes)
                protocol = asyncio.StreamReaderProtocol(reader)
                transport, _ = await loop.connect_accepted_socket(
                    lambda: protocol,
                    conn,
                    ssl=self._ssl,
                    ssl_handshake_timeout=max(deadline - loop.time(), 0.1),
                )
                writer = asyncio.StreamWriter(transport, protocol, reader, loop)
            else:
                reader = asyncio.StreamReader(limit=self.limits.max_header_bytes)
                protocol = asyncio.StreamReaderProtocol(reader)
                transport, _ = await loop.connect_accepted_socket(lambda: protocol, conn)
                writer = asyncio.StreamWriter(transport, protocol, reader, loop)
            await self._serve(reader, writer, peer, deadline)
        except asyncio.CancelledError:
            raise
        except (OSError, EOFError, TimeoutError, asyncio.IncompleteReadError) as exc:
            log.debug("client %s: connection ended: %s", peer, _describe(exc))
        except Exception as exc:  # never let one client's fault reach the loop's log as a trace
            log.warning("client %s: connection failed: %s", peer, _describe(exc))
        finally:
            if writer is not None:
                await _close(writer, self.limits.write_timeout)
            else:
                conn.close()

    async def _looks_like_tls(self, conn: socket.socket, peer: str, deadline: float) -> bool:
        """Peek at the first record header; answer plain HTTP as Go does."""
        head = await _peek(conn, 5, deadline)
        if not head:
            log.debug("client %s: closed before sending anything", peer)
            return False
        if head in PLAIN_HTTP_PREFIXES:
            with contextlib.suppress(OSError):
                # Take what the client sent first: closing on unread bytes would reset the
                # connection before the client reads the answer.
                with contextlib.suppress(BlockingIOError):
                    conn.recv(self.limits.max_header_bytes)
                conn.send(PLAIN_HTTP_ON_TLS)
                conn.shutdown(socket.SHUT_WR)
            log.debug("client %s: plain HTTP on the TLS port", peer)
            return False
        return True

    async def _serve(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: str,
        deadline: float,
    ) -> None:
        """Requests one after another on one connection while both sides keep it open."""
        loop = asyncio.get_running_loop()
        first = True
        while True:
            try:
                line = None
                if not first:
                    # Idle: wait for the next request's first line, then its head in full.
                    line = await asyncio.wait_for(_readline(reader), self.limits.idle_timeout)
                    deadline = loop.time() + self.limits.header_timeout
                request = await asyncio.wait_for(
                    self._read_head(reader, peer, line), max(deadline - loop.time(), 0.0)
                )
            except TimeoutError:
                log.debug("client %s: no complete request in time", peer)
                return
            except _BadRequest as exc:
                await self._write(writer, _plain_error(exc.status, str(exc)), b"GET", close=True)
                log.debug("client %s: bad request: %s", peer, exc)
                return
            if request is None:
                return  # closed between requests
            first = False
            keep_alive = _keeps_alive(request)
            try:
                response = await self._handler(request)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("%s %s from %s failed: %s", request.method, request.path, peer,
                            _describe(exc))  # fmt: skip
                response = _plain_error(500, "Internal Server Error")
                keep_alive = False
            await self._write(writer, response, request.method.encode(), close=not keep_alive)
            if not keep_alive:
                return

    async def _read_head(
        self, reader: asyncio.StreamReader, peer: str, first_line: bytes | None
    ) -> Request | None:
        line = first_line
        while True:  # a client may send empty lines before the request line (RFC 9112 2.2)
            if line is None:
                line = await _readline(reader)
            if not line:
                return None
            if line not in (b"\r\n", b"\n"):
                break
            line = None
        method, target, version = _request_line(line)
        headers = await self._read_headers(reader, len(line))
        if version == "HTTP/1.1" and "host" not in headers:
            raise _BadRequest(400, "missing required Host header")
        path, _, query = target.partition("?")
        return Request(method, target, path, query, version, headers, peer)

    async def _read_headers(self, reader: asyncio.StreamReader, size: int) -> dict[str, str]:
        """Header fields up to the blank line (the first of a repeated name wins); `size` is
        what the head used so far, counted against `max_header_bytes`."""
        headers: dict[str, str] = {}
        while True:
            raw = await _readline(reader)
            if not raw:
                raise asyncio.IncompleteReadError(b"", None)
            size += len(raw)
            if size > self.limits.max_header_bytes:
                raise _BadRequest(431, "Request Header Fields Too Large")
            if raw in (b"\r\n", b"\n"):
                return headers
            name, sep, value = raw.partition(b":")
            if not sep or not name or not set(name) <= _TOKEN:
                raise _BadRequest(400, "malformed MIME header line")
            key = name.decode("ascii").lower()
            if key not in headers:
                headers[key] = value.strip(b" \t\r\n").decode("latin-1")

    async def _write(
        self, writer: asyncio.StreamWriter, response: Response, method: bytes, *, close: bool
    ) -> None:
        status = HTTPStatus(response.status)
        lines = [f"HTTP/1.1 {status.value} {status.phrase}"]
        lines += [f"{name}: {value}" for name, value in response.headers]
        lines.append(f"Date: {formatdate(usegmt=True)}")
        if response.body or method != b"HEAD":
            lines.append(f"Content-Length: {len(response.body)}")
        if close:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        writer.write(head if method == b"HEAD" else head + response.body)
        await asyncio.wait_for(writer.drain(), self.limits.write_timeout)


async def _close(writer: asyncio.StreamWriter, timeout: float) -> None:
    """Flush what is buffered and close; a peer that does not take it is cut off."""
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), timeout)
    except (OSError, TimeoutError, asyncio.CancelledError):
        writer.transport.abort()
    except Exception:  # an SSL shutdown the peer broke off: nothing more to do
        writer.transport.abort()


async def _readline(reader: asyncio.StreamReader) -> bytes:
    try:
        return await reader.readline()
    except ValueError:  # a line longer than the reader's limit
        raise _BadRequest(431, "Request Header Fields Too Large") from None


def _request_line(line: bytes) -> tuple[str, str, str]:
    parts = line.rstrip(b"\r\n").split(b" ")
    if len(parts) != 3 or not parts[0] or not set(parts[0]) <= _TOKEN or not parts[1]:
        raise _BadRequest(400, "malformed request line")
    method, target, version = (part.decode("latin-1") for part in parts)
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        if version.startswith("HTTP/"):
            raise _BadRequest(505, "HTTP Version Not Supported")
        raise _BadRequest(400, "malformed HTTP version")
    if not (target.startswith("/") or target == "*"):
        raise _BadRequest(400, "invalid request target")
    return method, target, version


def _keeps_alive(request: Request) -> bool:
    """HTTP/1.1 keeps the connection unless told not to; a request body ends it (none is read)."""
    if "transfer-encoding" in request.headers:
        return False
    if request.headers.get("content-length", "0").strip() not in ("", "0"):
        return False
    tokens = {t.strip().lower() for t in request.headers.get("connection", "").split(",")}
    if request.version == "HTTP/1.1":
        return "close" not in tokens
    return "keep-alive" in tokens


def _plain_error(status: int, reason: str) -> Response:
    text = f"{status} {HTTPStatus(status).phrase}" if status != 500 else reason
    return Response(status, [("Content-Type", "text/plain; charset=utf-8")], text.encode())


async def _peek(conn: socket.socket, size: int, deadline: float) -> bytes:
    """Up to `size` bytes without taking them from the socket; b"" on EOF; waits to deadline."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            data = conn.recv(size, socket.MSG_PEEK)
        except BlockingIOError:
            data = None
        if data is not None and (len(data) >= size or not data):
            return data
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise TimeoutError("no TLS record header in time")
        if data:  # part of a header: readable stays true, so pause rather than spin
            await asyncio.sleep(min(_PEEK_PAUSE, remaining))
            continue
        readable: asyncio.Future[None] = loop.create_future()
        loop.add_reader(conn.fileno(), _resolve, readable)
        try:
            await asyncio.wait_for(readable, remaining)
        finally:
            loop.remove_reader(conn.fileno())


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _peer(address: object) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(address)


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _log_loop_exception(loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
    """asyncio reports transport faults (a TLS peer gone mid-write) here: one line, DEBUG."""
    exc = context.get("exception")
    detail = _describe(exc) if isinstance(exc, BaseException) else ""
    log.debug("connection fault: %s %s", context.get("message", ""), detail)
