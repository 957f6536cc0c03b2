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

from conftest import invoke

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


def sample_cli(ckpt: Path, prime: str, n: int, *, seed: int, temperature: float = 0.8, top_k: int = 0,
               top_p: float = 1.0, stop: str | None = None, num_samples: int = 1) -> list[str]:
    """Texts from ``charnn sample --json`` (the reference)."""
    args = ["sample", ckpt, "--prime", prime, "-n", n, "--seed", seed, "--temperature", temperature,
            "--top-k", top_k, "--top-p", top_p, "--num-samples", num_samples, "--json"]
    if stop is not None:
        args += ["--stop", stop]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return [s["text"] for s in json.loads(result.stdout)]


def sse_events(text: str) -> list[tuple[str, dict]]:
    out = []
    for block in text.strip().split("\n\n"):
        kind = re.search(r"^event: (.*)$", block, re.M).group(1)
        data = json.loads(re.search(r"^data: (.*)$", block, re.M).group(1))
        out.append((kind, data))
    return out


def streamed_texts(events: list[tuple[str, dict]], k: int) -> list[str]:
    start = events[0][1]
    texts = [start["prime"]] * k
    for kind, data in events:
        if kind == "text":
            texts[data["sample"]] += data["text"]
    return texts


def batch_processes(pid: int) -> list[int]:
    """The live batch processes of server ``pid``: its children running
    charnn.serve.worker. Linux /proc."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z" and b"charnn.serve.worker" in cmdline:
            kids.append(int(stat.parent.name))
    return kids


class Chromium:
    """Headless Chromium driven through --remote-debugging-pipe (fd 3 in, fd 4 out)."""

    def __init__(self, exe: str, profile: Path):
        to_r, self._to_w = os.pipe()
        self._from_r, from_w = os.pipe()

        def fds():
            a, b = os.dup(to_r), os.dup(from_w)  # move out of the way of 3 and 4 first
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen([exe, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
                                      "--no-first-run", f"--user-data-dir={profile}", "--window-size=1200,800"],
                                     preexec_fn=fds, pass_fds=(3, 4), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        os.close(to_r)
        os.close(from_w)
        self._buf = b""
        self._id = 0
        self.session = None
        self.events: list[dict] = []  # protocol events (Network.*, ...) met while waiting for answers

    def send(self, method: str, params: dict | None = None, session: bool = True, timeout: float = 30.0) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session and self.session:
            msg["sessionId"] = self.session
        os.write(self._to_w, json.dumps(msg).encode() + b"\0")
        end = time.monotonic() + timeout
        while True:
            while b"\0" not in self._buf:
                assert time.monotonic() < end, f"no answer to {method}"
                chunk = os.read(self._from_r, 1 << 16)
                assert chunk, "chromium closed the pipe"
                self._buf += chunk
            raw, self._buf = self._buf.split(b"\0", 1)
            reply = json.loads(raw)
            if "method" in reply:
                self.events.append(reply)
            if reply.get("id") == self._id:
                assert "error" not in reply, reply["error"]
                return reply["result"]

    def open_page(self, url: str) -> None:
        """A new tab on ``url``, attached, with page events on."""
        target = self.send("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True},
                                 session=False)["sessionId"]
        self.send("Page.enable")
        self.send("Page.navigate", {"url": url})

    def eval(self, expr: str):
        r = self.send("Runtime.evaluate", {"expression": expr, "returnByValue": True, "awaitPromise": True})
        assert "exceptionDetails" not in r, r["exceptionDetails"]
        return r["result"].get("value")

    def wait_for(self, expr: str, timeout: float = 30.0):
        end = time.monotonic() + timeout
        while not (value := self.eval(expr)):
            assert time.monotonic() < end, f"timed out waiting for {expr}"
            time.sleep(0.05)
        return value

    def close(self):
        try:
            self.send("Browser.close", session=False, timeout=5)
        except (AssertionError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_w)
        os.close(self._from_r)
