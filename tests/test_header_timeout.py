"""Slow request heads are timed out (issue 14: a connection sending half a header stayed open 130 s).

uvicorn never times out a request head (serving.header_timeout says why and what it changes);
these tests run a real uvicorn server on 127.0.0.1 in a subprocess, with the protocol installed
the way a BentoML worker gets it (http="auto"), and a plain one as the control. Timeouts are 1 s
and every socket wait is bounded."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ncguard.client import free_port

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 1.0

SERVER = """
import sys
sys.path.insert(0, sys.argv[1])
import uvicorn
if sys.argv[3] == "install":
    from serving.header_timeout import install
    install(float(sys.argv[4]))

async def app(scope, receive, send):
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    payload = b"ok %d" % len(body)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})

uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning", lifespan="off")).run()
"""


@contextlib.contextmanager
def uvicorn_server(install: bool):
    port = free_port("127.0.0.1")
    process = subprocess.Popen([sys.executable, "-c", SERVER, str(ROOT), str(port), "install" if install else "plain", str(TIMEOUT_S)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, "the test server did not start"
            time.sleep(0.05)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def guarded():
    with uvicorn_server(install=True) as port:
        yield port


def seconds_until_closed(sock: socket.socket, limit: float) -> float | None:
    """Seconds until the server closes `sock` (recv returns b"" or the connection resets), None if still open after `limit`."""
    start = time.monotonic()
    sock.settimeout(limit)
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return time.monotonic() - start
    except socket.timeout:
        return None
    except ConnectionResetError:
        return time.monotonic() - start


def request(path: str = "/", body: bytes = b"") -> bytes:
    return b"POST %s HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s" % (path.encode(), len(body), body)


def read_response(sock: socket.socket) -> bytes:
    """One whole response (head and Content-Length body) from `sock`."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, "the server closed the connection"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        chunk = sock.recv(4096)
        assert chunk, "the server closed the connection"
        body += chunk
    return head + b"\r\n\r\n" + body


def test_half_a_header_is_closed_within_the_timeout(guarded):
    with socket.create_connection(("127.0.0.1", guarded), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nX-Slow: ")
        closed = seconds_until_closed(sock, TIMEOUT_S + 5)
    assert closed is not None and closed < TIMEOUT_S + 2, closed


def test_a_silent_connection_is_closed_within_the_timeout(guarded):
    with socket.create_connection(("127.0.0.1", guarded), timeout=5) as sock:
        closed = seconds_until_closed(sock, TIMEOUT_S + 5)
    assert closed is not None and closed < TIMEOUT_S + 2, closed


def test_a_trickled_header_is_closed_though_bytes_keep_coming(guarded):
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", guarded), timeout=5) as sock:
        try:
            for byte in b"GET / HTTP/1.1\r\nHost: t\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa":
                sock.sendall(bytes([byte]))
                time.sleep(0.1)
                assert time.monotonic() - start < TIMEOUT_S + 3, "the trickling connection was not closed"
        except (BrokenPipeError, ConnectionResetError):
            pass
        else:
            assert seconds_until_closed(sock, 1.0) is not None, "still open after trickling for longer than the timeout"
    assert time.monotonic() - start < TIMEOUT_S + 3


def test_complete_requests_keep_alive_and_slow_bodies_are_not_cut(guarded):
    with socket.create_connection(("127.0.0.1", guarded), timeout=10) as sock:
        sock.sendall(request(body=b"abc"))
        assert read_response(sock).startswith(b"HTTP/1.1 200")
        time.sleep(TIMEOUT_S * 0.6)  # idle between requests: uvicorn's keep-alive timeout (5 s) governs that
        sock.sendall(request(body=b"abcd"))
        assert read_response(sock).endswith(b"ok 4")
        head = b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\n"
        sock.sendall(head)
        time.sleep(TIMEOUT_S * 1.5)  # the head is complete: its deadline no longer applies
        sock.sendall(b"12345")
        assert read_response(sock).endswith(b"ok 5")


def test_without_the_protocol_uvicorn_keeps_half_a_header_open():
    """The control: what the issue saw, so the tests above measure the fix and not the test."""
    with uvicorn_server(install=False) as port, socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nX-Slow: ")
        assert seconds_until_closed(sock, TIMEOUT_S + 1.5) is None


@pytest.mark.skipif("header_timeout" not in (ROOT / "serving" / "service.py").read_text(),
                    reason="serving/service.py does not install serving.header_timeout yet")
def test_ncguard_serve_closes_slow_heads(served_model_path, tmp_path):
    """The real service; active once serving.service installs the protocol (see serving.header_timeout)."""
    from ncguard.client import local_server

    env = {"BENTOML_HOME": str(tmp_path / "bentoml"), "NCGUARD_HEADER_TIMEOUT_S": "2"}
    with local_server(served_model_path, env=env, ready_timeout=120) as client:
        host, port = client.url.removeprefix("http://").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(b"POST /predict HTTP/1.1\r\nHost: t\r\nContent-")
            closed = seconds_until_closed(sock, 10)
        assert closed is not None and closed < 5, closed
        assert client.model_info()["name"]  # and the server still serves
