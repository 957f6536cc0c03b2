"""Serving under load: a real ``charnn serve`` process on 127.0.0.1 and real
HTTP clients (one keep-alive connection each, all on one asyncio thread of this
process, parsing the chunked SSE body by hand so the client side is cheap: it
shares the machine's cores with the server), streaming generation.

For 1, 8 and 32 concurrent streaming clients it sends the same set of
requests (``--requests`` of them, ``--length`` characters each, prime "The ",
temperature 0.8, seeds 0..R-1) and measures

- aggregate characters per second: generated characters / wall time;
- time to first character (TTFC), request sent -> first ``text`` event,
  p50 and p95 over the requests;

and compares each with serving the same requests one at a time (the 1-client
run). It also prints the CPU seconds the server process (HTTP), its batch process and this client used
per level. The levels run ``--repeat`` times, interleaved (1, 8, 32, 1, 8,
32, ...), so a change in what else the machine does hits every level alike;
each round's ratio is its own 32-client figure over its own 1-client figure,
and the summary gives the median and range of those ratios. ``--busy N``
runs N busy-looping processes alongside (a real busy CPU, as on a laptop
doing other work). The model is a randomly initialised default-size model (2x320 LSTM,
embedding 128, 97 characters): for throughput its weights do not matter.
Goal (issue 14): 32 clients >= 5x the one-at-a-time throughput, p95 TTFC <
250 ms, on a 2-core machine. The machine's load average is printed with the
figures (other processes on the same cores slow both sides).

    python benchmarks/bench_serve.py            # needs: pip install 'charnn[serve]'
    python benchmarks/bench_serve.py --busy 1   # the same with one other process spinning
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from charnn.storage import checkpoint
from charnn.model.config import ModelConfig
from charnn.model.rnn import CharRNN
from charnn.text.tokenizer import CharTokenizer

VOCAB = [chr(i) for i in range(32, 127)] + ["\n", "\t"]  # 97 characters, like bench_sample


def make_checkpoint(folder: Path) -> Path:
    torch.manual_seed(0)
    tok = CharTokenizer(sorted(VOCAB))
    model = CharRNN(ModelConfig(vocab_size=tok.vocab_size))  # the defaults: 2x320 LSTM, embedding 128
    return checkpoint.save(checkpoint.build_payload(model, tok), folder / "default-size.pt")


def start_server(ckpt: Path, threads: int, extra: list[str]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "charnn", "serve", str(ckpt), "--port", "0",
                             "--threads", str(threads), "--max-queue", "256", *extra],
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    line = proc.stderr.readline()
    m = re.search(r"(http://\S+/) ", line)
    if not m:
        proc.kill()
        raise SystemExit(f"the server did not start: {line}{proc.stderr.read()}")
    return proc, m.group(1)


async def one_request(host: str, port: int, conn: list, seed: int, length: int) -> tuple[float, int, float]:
    """(seconds to first character, characters, seconds in all) of one streamed
    request on the keep-alive connection ``conn`` ([reader, writer], opened on
    first use): plain HTTP/1.1 with a chunked SSE body read by hand, so the
    client side costs little CPU (it shares the machine with the server)."""
    body = json.dumps({"prime": "The ", "n": length, "seed": seed, "temperature": 0.8, "stream": True}).encode()
    start = time.perf_counter()
    if not conn:
        reader, writer = await asyncio.open_connection(host, port)
        # TCP_NODELAY as browsers and curl set it: without it the request body
        # waits for the server's delayed ACK of the headers (40 ms on Linux).
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn[:] = [reader, writer]
    reader, writer = conn
    writer.write(b"POST /v1/generate HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (host.encode(), len(body), body))
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200") or b"chunked" not in head.lower():
        raise RuntimeError(f"unexpected response: {head[:200]!r}")
    first = None
    chars = 0
    buf = b""
    while True:  # chunked transfer encoding: size line, data, CRLF; size 0 ends the body
        size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
        data = await reader.readexactly(size + 2)
        if size == 0:
            break
        buf += data[:-2]
        *events, buf = buf.split(b"\n\n")
        for ev in events:
            if ev.startswith(b"event: text\n"):
                if first is None:
                    first = time.perf_counter() - start
                chars += len(json.loads(ev[ev.index(b"data: ") + 6:])["text"])
            elif ev.startswith(b"event: error"):
                raise RuntimeError(ev.decode())
    return first if first is not None else float("nan"), chars, time.perf_counter() - start


def run_level(url: str, clients: int, requests: int, length: int, budget: float) -> dict:
    """``requests`` requests, at most ``clients`` in flight at once: each client
    is a coroutine (all in this one thread) with its own keep-alive
    connection, taking the next request when its last one is done."""
    m = re.match(r"http://([^/:]+):(\d+)/", url)
    host, port = m.group(1), int(m.group(2))
    seeds = list(range(requests))
    results: list[tuple[float, int, float]] = []

    async def client() -> None:
        conn: list = []
        try:
            while seeds:
                results.append(await one_request(host, port, conn, seeds.pop(0), length))
        finally:
            if conn:
                conn[1].close()

    async def level() -> None:
        await asyncio.wait_for(asyncio.gather(*(client() for _ in range(clients))), budget)

    cpu = time.process_time()
    start = time.perf_counter()
    asyncio.run(level())
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu
    ttfc = sorted(r[0] for r in results)
    chars = sum(r[1] for r in results)
    if chars != requests * length:
        raise SystemExit(f"only {chars} of {requests * length} characters came back within {budget} s")
    return {"clients": clients, "requests": requests, "chars": chars, "wall": wall, "chars_per_s": chars / wall,
            "ttfc_p50": statistics.median(ttfc), "ttfc_p95": ttfc[min(len(ttfc) - 1, int(0.95 * len(ttfc)))],
            "client_cpu": cpu}


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) the process ``pid`` has used (Linux /proc; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def server_cpu(pid: int) -> tuple[float, float]:
    """CPU seconds of the server process ``pid`` and of its batch processes
    (its children running charnn.serve.worker), Linux /proc."""
    batch = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if (int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid
                    and b"charnn.serve.worker" in (stat.parent / "cmdline").read_bytes()):
                batch += process_cpu(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return process_cpu(pid), batch


def spin() -> None:
    while True:
        pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=128, help="requests per level (the same set at every level)")
    p.add_argument("--length", type=int, default=200, help="characters generated per request")
    p.add_argument("--levels", default="1,8,32", help="concurrent clients per level; 1 = one at a time")
    p.add_argument("--repeat", type=int, default=3, help="rounds of all levels, interleaved")
    p.add_argument("--threads", type=int, default=1, help="the server's --threads")
    p.add_argument("--batch-in-process", action="store_true",
                   help="the server's --batch-in-process (the batch on a thread of the server, not a child process)")
    p.add_argument("--busy", type=int, default=0, help="busy-looping processes running alongside")
    p.add_argument("--budget", type=float, default=300.0, help="seconds allowed per level")
    args = p.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    import multiprocessing

    spinners = [multiprocessing.Process(target=spin, daemon=True) for _ in range(args.busy)]
    for sp in spinners:
        sp.start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = make_checkpoint(Path(tmp))
            proc, url = start_server(ckpt, args.threads, ["--batch-in-process"] if args.batch_in_process else [])
            try:
                run_level(url, 4, 8, 50, args.budget)  # warm up both sides
                load_before = os.getloadavg()
                rounds = []
                for _ in range(args.repeat):
                    rows = []
                    for c in levels:
                        http0, batch0 = server_cpu(proc.pid)
                        rows.append(run_level(url, c, args.requests, args.length, args.budget))
                        http1, batch1 = server_cpu(proc.pid)
                        rows[-1]["server_cpu"], rows[-1]["batch_cpu"] = http1 - http0, batch1 - batch0
                    rounds.append(rows)
                load_after = os.getloadavg()
            finally:
                proc.terminate()
                code = proc.wait(timeout=60)
    finally:
        for sp in spinners:
            sp.terminate()
    print(f"charnn serve, default-size model (2x320 LSTM, 97 chars), server --threads {args.threads}"
          f"{' --batch-in-process' if args.batch_in_process else ' (batch in a child process)'}, "
          f"{os.cpu_count()} CPUs, {args.busy} busy process(es) alongside; {args.requests} streamed requests "
          f"x {args.length} chars per level, {args.repeat} rounds")
    print(f"load average (1, 5, 15 min): before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}, "
          f"after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    print(f"{'round':>5}  {'clients':>7}  {'chars/s':>8}  {'vs one at a time':>16}  {'TTFC p50':>9}  {'TTFC p95':>9}  "
          f"{'wall':>6}  {'CPU: HTTP':>9}  {'batch':>6}  {'client':>6}")
    for i, rows in enumerate(rounds, 1):
        base = next((r for r in rows if r["clients"] == 1), rows[0])
        for r in rows:
            print(f"{i:>5}  {r['clients']:>7}  {r['chars_per_s']:>8.0f}  {r['chars_per_s'] / base['chars_per_s']:>15.2f}x  "
                  f"{r['ttfc_p50'] * 1e3:>7.0f}ms  {r['ttfc_p95'] * 1e3:>7.0f}ms  {r['wall']:>5.1f}s  "
                  f"{r['server_cpu']:>8.1f}s  {r['batch_cpu']:>5.1f}s  {r['client_cpu']:>5.1f}s")
    top_clients = levels[-1]
    ratios = sorted(rows[-1]["chars_per_s"] / next((r for r in rows if r["clients"] == 1), rows[0])["chars_per_s"]
                    for rows in rounds)
    p95 = max(rows[-1]["ttfc_p95"] for rows in rounds)
    ratio = statistics.median(ratios)
    print(f"goal: {top_clients} clients >= 5x one at a time: median {ratio:.2f}x over {len(ratios)} rounds "
          f"(range {ratios[0]:.2f}x-{ratios[-1]:.2f}x; {'met' if ratio >= 5 else 'NOT met'}); "
          f"p95 TTFC < 250 ms: worst round {p95 * 1e3:.0f} ms ({'met' if p95 < 0.25 else 'NOT met'}); "
          f"server exit code {code}")


if __name__ == "__main__":
    main()
