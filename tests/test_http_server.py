"""The exporter's HTTP server under clients that are slow, many, rude or gone."""

from __future__ import annotations

import contextlib
import http.client
import logging
import re
import socket
import ssl
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from exporter.httpserver import HTTPServer, Request, Response, ServerLimits
from tests.conftest import start_exporter
from tests.webprobe import make_pki


async def hello(request: Request) -> Response:
    return Response(200, [("Content-Type", "text/plain")], f"hello {request.path}\n".encode())


@pytest.fixture
def server_for() -> Iterator:
    started: list[HTTPServer] = []

    def start(limits: ServerLimits, context: ssl.SSLContext | None = None) -> HTTPServer:
        server = HTTPServer(hello, context, limits)
        server.bind("127.0.0.1", 0)
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def get(port: int, path: str = "/", timeout: float = 5.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_a_slow_request_head_is_cut_off_at_the_header_timeout(server_for) -> None:
    server = server_for(ServerLimits(header_timeout=0.5))
    with socket.create_connection(("127.0.0.1", server.port)) as slow:
        slow.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        slow.settimeout(3)
        while True:  # keep the head incomplete; the server must hang up anyway
            try:
                slow.sendall(b"X-Slow: 1\r\n")
                if slow.recv(1, socket.MSG_DONTWAIT) == b"":
                    break
            except BlockingIOError:
                pass
            except OSError:
                break
            if time.monotonic() - started > 3:
                pytest.fail("the server kept a dribbling request head open past its timeout")
            time.sleep(0.1)
        assert 0.4 < time.monotonic() - started < 1.5


def test_an_idle_kept_alive_connection_is_closed(server_for) -> None:
    server = server_for(ServerLimits(idle_timeout=0.5))
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    conn.request("GET", "/a")
    assert conn.getresponse().read() == b"hello /a\n"
    assert conn.sock is not None
    started = time.monotonic()
    assert conn.sock.recv(1) == b""  # the server's FIN
    assert 0.4 < time.monotonic() - started < 2.0
    conn.close()


def test_connections_beyond_the_limit_wait_for_a_free_slot(server_for) -> None:
    server = server_for(ServerLimits(max_connections=2, idle_timeout=30))
    holders = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(2)]
    time.sleep(0.2)
    waiting = http.client.HTTPConnection("127.0.0.1", server.port, timeout=0.5)
    waiting.request("GET", "/w")  # connects (kernel backlog) but is not served
    with pytest.raises(TimeoutError):
        waiting.getresponse()
    waiting.close()
    holders[0].close()
    assert get(server.port, "/after") == (200, b"hello /after\n")
    holders[1].close()


def test_the_listen_backlog_is_at_least_128(server_for) -> None:
    server = server_for(ServerLimits())
    listing = subprocess.run(
        ["ss", "-ltnH", f"sport = :{server.port}"], capture_output=True, text=True, check=True
    )
    (line,) = listing.stdout.splitlines()
    backlog = int(line.split()[2])  # Send-Q of a listening socket is its backlog
    assert backlog >= 128


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n\r\n", 400),  # no Host
        (b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505),
        (b"GET / HTTP/1.1\r\nHost: x\r\nbad header\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 70000 + b"\r\n\r\n", 431),
    ],
)
def test_malformed_requests_get_a_clear_status(server_for, request_bytes, status) -> None:
    server = server_for(ServerLimits())
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(request_bytes)
        reply = sock.recv(4096)
    assert reply.startswith(f"HTTP/1.1 {status} ".encode()), reply


def test_client_hang_ups_are_one_debug_line(server_for, tmp_path: Path, caplog) -> None:
    pki = make_pki(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    server = server_for(ServerLimits(header_timeout=1.0), context)
    client = ssl.create_default_context(cafile=str(pki.ca))
    caplog.set_level(logging.DEBUG, logger="exporter.http")
    for _ in range(5):
        # Hang up mid-handshake, right after it, and mid-request.
        with socket.create_connection(("127.0.0.1", server.port)) as raw:
            raw.sendall(b"\x16\x03\x01\x00\x05hello")
        with socket.create_connection(("127.0.0.1", server.port)) as raw:
            tls = client.wrap_socket(raw, server_hostname="127.0.0.1")
            tls.sendall(b"GET / HTTP/1.1\r\nHost")
            tls.close()
    conn = http.client.HTTPSConnection("127.0.0.1", server.port, context=client, timeout=5)
    conn.request("GET", "/still")
    assert conn.getresponse().read() == b"hello /still\n"
    conn.close()
    time.sleep(1.5)
    records = [r for r in caplog.records if r.name == "exporter.http"]
    assert len(records) >= 10
    assert all(r.levelno == logging.DEBUG for r in records), [r.getMessage() for r in records]
    assert all(r.exc_info is None and "\n" not in r.getMessage() for r in records)
    assert any("SSL" in r.getMessage() or "EOF" in r.getMessage() for r in records)


def threads_of(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^Threads:\s+(\d+)", status, re.M)
    assert match is not None
    return int(match.group(1))


def scrape_seconds(port: int) -> float:
    started = time.perf_counter()
    status, body = get(port, "/metrics", timeout=10)
    elapsed = time.perf_counter() - started
    assert status == 200 and b"vmbalance_up" in body
    return elapsed


@pytest.mark.slow
def test_200_slow_clients_do_not_delay_a_scrape(tmp_path: Path) -> None:
    exporter = start_exporter(
        ["--backend", "libvirt", "--libvirt-uri", "test:///default"], tmp_path / "exporter.log"
    )
    try:
        for _ in range(3):
            scrape_seconds(exporter.port)  # warm up
        usual = statistics.median(scrape_seconds(exporter.port) for _ in range(15))
        idle_threads = threads_of(exporter.process.pid)

        slow = [socket.create_connection(("127.0.0.1", exporter.port)) for _ in range(200)]
        stop = threading.Event()

        def dribble() -> None:
            payload = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "
            offset = 0
            while not stop.is_set():
                for sock in slow:
                    with contextlib.suppress(OSError):
                        sock.send(payload[offset % len(payload) : offset % len(payload) + 1])
                offset += 1
                stop.wait(0.2)

        sender = threading.Thread(target=dribble, daemon=True)
        sender.start()
        try:
            time.sleep(1.0)
            loaded = [scrape_seconds(exporter.port) for _ in range(15)]
            busy_threads = threads_of(exporter.process.pid)
        finally:
            stop.set()
            sender.join()
            for sock in slow:
                sock.close()
        assert statistics.median(loaded) <= usual + 0.1, (usual, loaded)
        assert max(loaded) <= usual + 0.5, (usual, loaded)
        assert busy_threads <= idle_threads + 2, (idle_threads, busy_threads)
        assert busy_threads < 30
    finally:
        exporter.stop()


@pytest.mark.slow
def test_20_parallel_scrapes_connect_at_once_and_share_a_read(tmp_path: Path) -> None:
    exporter = start_exporter(
        ["--backend", "libvirt", "--libvirt-uri", "test:///default"], tmp_path / "exporter.log"
    )
    try:
        scrape_seconds(exporter.port)
        connect_times: list[float] = []
        statuses: list[int] = []
        lock = threading.Lock()

        def scrape() -> None:
            started = time.perf_counter()
            sock = socket.create_connection(("127.0.0.1", exporter.port), timeout=10)
            connected = time.perf_counter() - started
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
            sock.close()
            with lock:
                connect_times.append(connected)
                statuses.append(int(reply.split(b" ", 2)[1]))

        threads = [threading.Thread(target=scrape) for _ in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert statuses == [200] * 20
        assert max(connect_times) < 0.5, connect_times
    finally:
        exporter.stop()


def test_head_gets_the_headers_without_the_body(server_for) -> None:
    server = server_for(ServerLimits())
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"HEAD /x HTTP/1.1\r\nHost: x\r\n\r\nGET /y HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = b""
        while b"hello /y" not in reply:
            chunk = sock.recv(4096)
            assert chunk, reply
            reply += chunk
    head, _, rest = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and b"Content-Length: 9" in head
    # The next bytes are the second response: the first sent no body.
    assert rest.startswith(b"HTTP/1.1 200 OK") and rest.endswith(b"hello /y\n")
