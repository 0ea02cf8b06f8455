"""One total deadline per PromQL request, and failures in words.

Fakes here are what a real Prometheus cannot be made to do on demand: a server that drips its
answer one byte a second, one that never answers, one that speaks TLS with a certificate
nobody trusts.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from devkit.fake_pve import self_signed_tls
from devkit.service import free_port
from recommender.config import Config
from recommender.faces.serve import Recommender
from recommender.source.http import SourceError
from recommender.source.prometheus import PrometheusSource
from tests.conftest import REPO

MARGIN = 3.0  # seconds a command may take past its deadline (start-up, planning, exit)


class TrickleServer:
    """Loopback HTTP server: `mode` "drip" sends headers then one body byte a second; "headers"
    drips the status line itself; "silent" accepts and says nothing."""

    def __init__(self, mode: str, tls: ssl.SSLContext | None = None) -> None:
        self.mode = mode
        self.tls = tls
        self.sock = socket.create_server(("127.0.0.1", 0))
        scheme = "https" if tls is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> TrickleServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.sock.close()
        self._thread.join(timeout=5)

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                client, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            threading.Thread(target=self._answer, args=(client,), daemon=True).start()

    def _answer(self, client: socket.socket) -> None:
        if self.tls is not None:
            try:
                client = self.tls.wrap_socket(client, server_side=True)
            except (OSError, ssl.SSLError):
                client.close()
                return
        with client:
            try:
                client.recv(65536)
                if self.mode == "silent":
                    self._stop.wait(120)
                    return
                head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                body = b'{"status":"success","data":{"resultType":"vector","result":[]}}'
                head += f"Content-Length: {len(body)}\r\n\r\n".encode()
                dripped = head + body if self.mode == "headers" else body
                if self.mode == "drip":
                    client.sendall(head)
                for byte in dripped:
                    if self._stop.wait(1.0):
                        return
                    client.sendall(bytes([byte]))
            except OSError:
                return


@pytest.fixture(params=["drip", "headers", "silent"])
def trickle(request: pytest.FixtureRequest) -> Iterator[TrickleServer]:
    with TrickleServer(request.param) as server:
        yield server


def run(*args: str, timeout: float = 120) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "recommender.cli", *args],
        capture_output=True, text=True, timeout=timeout, cwd=REPO, check=False,
    )  # fmt: skip
    return result, time.monotonic() - started


def startup_seconds() -> float:
    """How long the command line takes to fail on its own, with no server involved."""
    _, elapsed = run("plan", "--input", "/nonexistent/snapshot.json")
    return elapsed


def test_one_query_is_cut_off_at_its_deadline(trickle: TrickleServer) -> None:
    config = Config.model_validate({"prometheus": {"url": trickle.url, "timeout_seconds": 2}})
    source = PrometheusSource(config.prometheus)
    started = time.monotonic()
    with pytest.raises(SourceError) as caught:
        source.query("up", time.time())
    elapsed = time.monotonic() - started
    assert 1.9 <= elapsed < 2.5, elapsed
    assert str(caught.value) == f"no answer from {trickle.url} within 2 s"


@pytest.mark.parametrize("command", ["plan", "snapshot", "report"])
def test_every_command_honours_the_deadline(command: str, tmp_path: Path) -> None:
    base = startup_seconds()
    with TrickleServer("drip") as server:
        args = ["--prometheus-url", server.url, "--timeout", "2"]
        extra = {"plan": ["-o", "json"], "snapshot": ["-o", str(tmp_path / "s.json")],
                 "report": ["--out", str(tmp_path / "report")]}[command]  # fmt: skip
        result, elapsed = run(command, *args, *extra)
    assert result.returncode == 2, result.stderr
    assert result.stderr == f"vmbalance: no answer from {server.url} within 2 s\n"
    assert result.stdout == ""
    assert elapsed < base + 2 + MARGIN, (elapsed, base)


def test_serve_counts_a_run_past_its_deadline_and_goes_on() -> None:
    with TrickleServer("drip") as server:
        config = Config.model_validate({"prometheus": {"url": server.url, "timeout_seconds": 1}})
        recommender = Recommender(config)
        started = time.monotonic()
        assert recommender.run_once() is False
        assert recommender.run_once() is False
        assert time.monotonic() - started < 2 * 1 + MARGIN
        latest = recommender.latest()
        assert (latest.runs, latest.errors, latest.up) == (2, 2, False)
        assert latest.last_error == f"no answer from {server.url} within 1 s"


def test_serve_process_keeps_its_loop_against_a_dripping_server(tmp_path: Path) -> None:
    port = free_port()
    with TrickleServer("drip") as server:
        process = subprocess.Popen(
            [sys.executable, "-m", "recommender.cli", "serve", "--prometheus-url", server.url,
             "--timeout", "1", "--interval", "0.5", "--listen", f"127.0.0.1:{port}"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            errors = 0.0
            while time.monotonic() < deadline and errors < 3:
                try:
                    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
                except requests.RequestException:
                    time.sleep(0.2)
                    continue
                values = dict(
                    line.rsplit(" ", 1) for line in text.splitlines() if line[:1] not in "#"
                )
                errors = float(values.get("vmbalance_recommender_errors_total", 0))
                time.sleep(0.2)
            assert errors >= 3
            assert values["vmbalance_recommender_up"] == "0.0"
            plan = requests.get(f"http://127.0.0.1:{port}/plan", timeout=5)
            assert plan.status_code == 503
            assert plan.json()["error"] == f"no answer from {server.url} within 1 s"
        finally:
            process.terminate()
            _, log = process.communicate(timeout=30)
    assert process.returncode == 0
    assert f"planning run failed: no answer from {server.url} within 1 s" in log
    assert "Traceback" not in log


def test_refused_connection_in_words() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result, _ = run("plan", "--prometheus-url", url, "--timeout", "5")
    assert result.returncode == 2
    assert result.stderr == f"vmbalance: prometheus at {url}: connection refused\n"


def test_a_dripping_tls_answer_is_cut_and_its_worker_ends(tmp_path: Path) -> None:
    with TrickleServer("drip", tls=self_signed_tls(tmp_path)) as server:
        config = Config.model_validate(
            {"prometheus": {"url": server.url, "timeout_seconds": 1, "insecure_skip_verify": True}}
        )
        started = time.monotonic()
        with pytest.raises(SourceError, match="no answer from https://"):
            PrometheusSource(config.prometheus).query("up", time.time())
        assert time.monotonic() - started < 1.5
        # The request's thread does not go on reading the drip in the background.
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and any(
            t.name == "promql-request" for t in threading.enumerate()
        ):
            time.sleep(0.05)
        assert not [t for t in threading.enumerate() if t.name == "promql-request"]


@pytest.fixture
def untrusted_tls(tmp_path: Path) -> Iterator[str]:
    """An HTTPS server with a self-signed certificate the client does not trust."""
    context = self_signed_tls(tmp_path)
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except OSError:
                continue
            try:
                with context.wrap_socket(client, server_side=True):
                    pass
            except (OSError, ssl.SSLError):
                client.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        listener.close()
        thread.join(timeout=5)


def test_tls_failures_in_words(untrusted_tls: str) -> None:
    result, _ = run("plan", "--prometheus-url", untrusted_tls, "--timeout", "5")
    assert result.returncode == 2
    assert result.stderr.startswith(
        f"vmbalance: prometheus at {untrusted_tls}: TLS: certificate verify failed: "
    )
    assert "self-signed" in result.stderr and result.stderr.count("\n") == 1
    # https:// to a plain HTTP port
    with TrickleServer("drip") as plain:
        url = plain.url.replace("http://", "https://")
        result, _ = run("plan", "--prometheus-url", url, "--timeout", "5")
    assert result.returncode == 2
    assert result.stderr.startswith(f"vmbalance: prometheus at {url}: TLS: ")
    assert result.stderr.count("\n") == 1 and "urllib3" not in result.stderr
