"""Helpers for the tests that run ``charnn serve`` as a real process: start it
on a free port with its stderr in a file (a flood of log lines must not block
it on a full pipe), read its memory, talk to it over raw sockets."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent


class Served:
    def __init__(self, proc: subprocess.Popen, url: str, log: Path):
        self.proc = proc
        self.url = url
        self.log = log
        m = re.match(r"http://\[?([^\]]+?)\]?:(\d+)/", url)
        self.host, self.port = m.group(1), int(m.group(2))

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def rss_mb(self) -> float:
        """Resident memory of the server process (not its batch children), in MB."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(timeout=timeout)


def serve(tmp_path: Path, *args: Any, preexec_fn: Callable | None = None, session: bool = False,
          timeout: float = 120) -> Served:
    """``python3 -m charnn serve ARGS --port 0``, waiting for its "Serving" line."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    log = tmp_path / f"serve-{time.monotonic_ns()}.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "charnn", "serve", *map(str, args), "--port", "0"],
                                stdout=subprocess.DEVNULL, stderr=err, env=env, preexec_fn=preexec_fn,
                                start_new_session=session)
    end = time.monotonic() + timeout
    while True:
        text = log.read_text(errors="replace")
        m = re.search(r"Serving .* at (http://\S+/) ", text)
        if m:
            return Served(proc, m.group(1), log)
        if proc.poll() is not None or time.monotonic() > end:
            proc.kill()
            raise AssertionError(f"the server did not start: {text}")
        time.sleep(0.05)


def raw_request(host: str, port: int, data: bytes, timeout: float = 10) -> bytes:
    """Send ``data`` on a fresh connection and read until the server closes it
    (or ``timeout``)."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except (socket.timeout, ConnectionResetError):
            pass
    return b"".join(chunks)


def http_request(method: str, path: str, host: str, body: bytes | None = None, headers: dict | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Connection: close"]
    for k, v in (headers or {}).items():
        lines.append(f"{k}: {v}")
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


def parse_reply(raw: bytes) -> tuple[int, dict, bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, body


def json_error(raw: bytes) -> tuple[int, dict]:
    """Status and the ``error`` object of a JSON error reply (fails if it is not one)."""
    status, headers, body = parse_reply(raw)
    assert headers.get("content-type", "").startswith("application/json"), raw[:300]
    err = json.loads(body)["error"]
    assert err["status"] == status and err["message"]
    return status, err


def wait_until(cond: Callable, timeout: float = 20.0, every: float = 0.05) -> Any:
    end = time.monotonic() + timeout
    while not (value := cond()):
        assert time.monotonic() < end, "timed out"
        time.sleep(every)
    return value
