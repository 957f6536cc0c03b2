"""charnn serve against hostile and careless clients: a real server process,
raw sockets. Each test here is an attack that once broke the server (a 500, a
stream dropped with a message that blamed the client, ...)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from serve_helpers import REPO, http_request, parse_reply, raw_request, serve  # noqa: E402

pytestmark = pytest.mark.system


@pytest.fixture(scope="module")
def server(trained, tmp_path_factory):
    s = serve(tmp_path_factory.mktemp("log"), trained.best)
    yield s
    assert s.stop() == 0
    assert "Traceback" not in s.stderr()


def post(s, path: str, body: dict) -> tuple[int, bytes]:
    data = json.dumps(body).encode()
    reply = raw_request(s.host, s.port, http_request("POST", path, f"localhost:{s.port}", data,
                                                     {"Content-Type": "application/json", "Connection": "close"}),
                        timeout=60)
    head, _, payload = reply.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), payload


def read_stream(s, body: dict) -> bytes:
    """A client that reads a streamed reply as fast as the network lets it."""
    data = json.dumps(body).encode()
    with socket.create_connection((s.host, s.port), timeout=60) as sock:
        sock.sendall(http_request("POST", "/v1/generate", f"localhost:{s.port}", data,
                                  {"Content-Type": "application/json", "Connection": "close"}))
        chunks = []
        while chunk := sock.recv(1 << 20):
            chunks.append(chunk)
    return b"".join(chunks)


def test_a_client_that_reads_at_full_speed_gets_the_whole_stream(server):
    """The largest legal stream (n, num_samples and top at their limits) from a
    small fast model, read as fast as it comes: every character arrives and the
    stream ends with `done`. A tiny model makes text faster than the server
    sends it between two flushes, and the stream was dropped as if its client
    had stopped reading (408, "its client stopped reading")."""
    body = {"prime": "The ", "n": 2000, "num_samples": 8, "top": 10, "stream": True, "seed": 5}
    for _ in range(2):
        reply = read_stream(server, body)
        assert b"event: error" not in reply, reply[-400:]
        done = reply.split(b"event: done\ndata: ", 1)[1].split(b"\n", 1)[0]
        assert [len(x["text"]) for x in json.loads(done)["samples"]] == [2004] * 8


@pytest.mark.parametrize("temperature", [1e308, 3.5e38])
def test_a_temperature_above_what_float32_holds_is_a_400(server, temperature):
    """A finite temperature too large for the model's float32 numbers was a 500
    ("this is a bug in charnn")."""
    status, payload = post(server, "/v1/generate", {"n": 5, "seed": 1, "temperature": temperature})
    assert status == 400, payload
    err = json.loads(payload)["error"]
    assert err["field"] == "temperature" and "at most" in err["message"]


def test_a_server_stopped_and_continued_keeps_its_batch_process(trained, tmp_path):
    """Ctrl-Z then `fg` (SIGSTOP, SIGCONT) on the server while a stream runs,
    for longer than --batch-timeout. The batch process ran on meanwhile; the
    silence was the server's own. Its watchdog killed the healthy process: the
    stream ended with "it answered nothing ... so the server stopped it" and
    every later request got 503 until a restart."""
    s = serve(tmp_path, trained.best, "--batch-timeout", "2", "--max-n", "100000000")
    try:
        data = json.dumps({"prime": "The ", "n": 100_000_000, "stream": True, "seed": 1}).encode()
        sock = socket.create_connection((s.host, s.port), timeout=30)
        sock.sendall(http_request("POST", "/v1/generate", f"localhost:{s.port}", data,
                                  {"Content-Type": "application/json"}))
        first = b""
        while b"event: text" not in first:
            first += sock.recv(1 << 16)
        seen = b""
        for _ in range(3):  # after SIGCONT the watchdog may look before the results already sent are read
            os.kill(s.proc.pid, signal.SIGSTOP)
            time.sleep(3.5)
            os.kill(s.proc.pid, signal.SIGCONT)
            end = time.monotonic() + 1.5
            while time.monotonic() < end:  # the stream goes on
                seen = (seen + sock.recv(1 << 16))[-4096:]
                assert b"event: error" not in seen, seen
        sock.close()
        status, payload = post(s, "/v1/generate", {"prime": "The ", "n": 5, "seed": 1})
        assert status == 200, payload
    finally:
        os.kill(s.proc.pid, signal.SIGCONT)
        assert s.stop() == 0
    assert "Traceback" not in s.stderr()


GARBAGE_AFTER_HEADERS = [
    # a chunked body that turns invalid after the reply was sent
    (b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n", b"zz\r\nxx\r\n"),
    (b"POST /v1/generate HTTP/1.1\r\nHost: localhost\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n",
     b"zz\r\nxx\r\n"),
    # bytes that are no request at all, sent while a stream is being written
    (b"POST /v1/generate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 33\r\n\r\n"
     b'{"n":2000,"stream":true,"seed":1}', b"\x00\x01garbage\r\n\r\n"),
]


@pytest.mark.parametrize("first,later", GARBAGE_AFTER_HEADERS, ids=["models-chunked", "415-chunked", "stream"])
def test_a_malformed_request_after_a_reply_began_closes_the_connection_without_a_traceback(trained, tmp_path,
                                                                                          first, later):
    """uvicorn answers bytes h11 cannot parse with a 400; when a reply has
    begun (or was sent) there is no room for one: it printed an h11
    LocalProtocolError traceback, or wrote "Invalid HTTP request received."
    into the middle of a stream's body."""
    s = serve(tmp_path, trained.best)
    try:
        with socket.create_connection((s.host, s.port), timeout=15) as sock:
            sock.sendall(first)
            time.sleep(0.5)
            sock.sendall(later)
            reply = b""
            while chunk := sock.recv(1 << 20):
                reply += chunk
        assert reply.count(b"HTTP/1.1 ") == 1 and b"Invalid HTTP request" not in reply, reply[-300:]
        status, payload = post(s, "/v1/generate", {"n": 5, "seed": 1})
        assert status == 200, payload
    finally:
        assert s.stop() == 0
    assert "Traceback" not in s.stderr(), s.stderr()[-2000:]


def test_a_request_h11_cannot_parse_gets_a_json_400(server):
    raw = raw_request(server.host, server.port, b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n"
                                                b"Host: localhost\r\n\r\n")
    status, headers, body = parse_reply(raw)
    assert status == 400 and headers["content-type"] == "application/json", raw
    assert json.loads(body)["error"]["status"] == 400


def test_allow_host_with_a_port_allows_that_host(trained, tmp_path):
    """`--allow-host proxy.example:8080` -- the Host a proxy passes on -- was
    taken and never matched: every request got 421 telling the user to start
    the server with --allow-host proxy.example."""
    s = serve(tmp_path, trained.best, "--allow-host", "Proxy.Example:8080")
    try:
        for host in ("proxy.example:8080", "proxy.example"):
            status, _, _ = parse_reply(raw_request(s.host, s.port, http_request("GET", "/v1/models", host)))
            assert status == 200, host
    finally:
        assert s.stop() == 0


@pytest.mark.parametrize("value", ["*", "", "a b"])
def test_allow_host_that_is_no_host_name_is_refused_at_start(trained, tmp_path, value):
    """`--allow-host '*'` started a server that answered no such name."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "charnn", "serve", str(trained.best), "--port", "0",
                           "--allow-host", value], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 1, proc.stderr
    assert "--allow-host" in proc.stderr and "not a host name" in proc.stderr
    assert "Traceback" not in proc.stderr
