"""Threads on a quiet and on a busy machine: training speed of the default
model (2x320 LSTM, batch 16 x seq 64, fp32) with 1 and 2 torch threads and
with charnn's automatic choice, while 0, 1 or 2 other processes keep cores busy.

Each configuration runs in a fresh process (torch's thread pool is set once
per process), training on random ids for a fixed number of steps; the busy
processes are plain Python loops started before it. The figure is the median
milliseconds per step over the timed steps, and the ratio to 1 thread in the
same load.

    python benchmarks/bench_threads.py [--steps 40] [--busy 0,1,2] [--threads 1,2,auto]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

WORKER = r"""
import json, statistics, sys, time
import torch, torch.nn.functional as F
from charnn.model.config import ModelConfig
from charnn.training.config import TrainConfig
from charnn.model.devices import set_threads
from charnn.model.rnn import CharRNN
threads = None if sys.argv[1] == "auto" else int(sys.argv[1])
steps, warmup = int(sys.argv[2]), int(sys.argv[3])
n = set_threads(threads)
cfg, tc = ModelConfig(vocab_size=100), TrainConfig()
torch.manual_seed(0)
model = CharRNN(cfg)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
data = torch.randint(0, 100, (tc.batch_size, (steps + warmup) * tc.seq_len + 1))
state, times = None, []
for i in range(steps + warmup):
    t0 = time.perf_counter()
    x = data[:, i * tc.seq_len:(i + 1) * tc.seq_len]
    y = data[:, i * tc.seq_len + 1:(i + 1) * tc.seq_len + 1]
    logits, state = model(x, state)
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    state = tuple(s.detach() for s in state)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    if i >= warmup:
        times.append(time.perf_counter() - t0)
print(json.dumps({"threads": n, "ms": 1000 * statistics.median(times)}))
"""

BUSY = "import time\nwhile True:\n    pass\n"


def run_worker(threads: str, steps: int, warmup: int) -> dict:
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    out = subprocess.run([sys.executable, "-c", WORKER, threads, str(steps), str(warmup)],
                         capture_output=True, text=True, env=env, timeout=1800)
    if out.returncode != 0:
        raise SystemExit(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--busy", default="0,1,2", help="numbers of busy processes to run beside it")
    ap.add_argument("--threads", default="1,2,auto")
    ap.add_argument("--settle", type=float, default=3.0, help="seconds the busy processes run first")
    args = ap.parse_args()
    print(f"{os.cpu_count()} cores; default model 2x320 LSTM, batch 16 x seq 64, fp32; "
          f"median ms/step over {args.steps} steps")
    print(f"{'busy':>4} {'threads':>8} {'used':>5} {'ms/step':>8} {'vs 1 thread':>12}")
    for busy in (int(b) for b in args.busy.split(",")):
        hogs = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(busy)]
        try:
            time.sleep(args.settle if busy else 0)
            one = None
            for threads in args.threads.split(","):
                r = run_worker(threads, args.steps, args.warmup)
                if threads == "1":
                    one = r["ms"]
                ratio = f"{one / r['ms']:.2f}x" if one else ""
                print(f"{busy:>4} {threads:>8} {r['threads']:>5} {r['ms']:>8.1f} {ratio:>12}", flush=True)
        finally:
            for h in hogs:
                h.kill()
                h.wait()


if __name__ == "__main__":
    main()
