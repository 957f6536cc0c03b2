"""Generation speed: charnn's sampler against the loop most char-rnn ports run.

Measures, in ONE process, characters per second of

- baseline: a loop that calls ``nn.Embedding -> nn.LSTM -> nn.Linear`` one step
  at a time, then ``softmax`` + ``torch.multinomial`` (what most char-rnn
  ports do), on the same weights;
- charnn: ``charnn.generation.sample.generate`` (one streaming sample, the path
  ``charnn sample`` prints from) and ``generate_samples`` (a batch),

for LSTMs of 2x512 and 2x256, one stream and 64 streams, both sides on the
same number of threads (one by default; see --threads and --batch-threads),
on a quiet machine or beside ``--busy N`` processes that each keep a core
busy. Each measurement is repeated ``--repeats`` times, baseline and charnn
interleaved so that load from other processes hits both alike; the median is
reported. It prints the figures and the two ratios issue 28 asks for:

- single stream: charnn / baseline >= 12
- 64 streams: charnn 64-stream chars/s / charnn single-stream chars/s >= 30

Run it alone (the machine's cores are shared):

    flock /tmp/charnn-bench.lock python benchmarks/bench_sample.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

# The MKL mode `charnn sample` runs in (cli.common.inference_only): set before
# torch's first matrix product; both sides of the comparison share it.
os.environ.setdefault("MKL_CBWR", "AUTO")

import torch  # noqa: E402


from charnn.model.config import ModelConfig
from charnn.model.rnn import CharRNN
from charnn.generation.sample import generate, generate_samples, sampling_precision
from charnn.text.tokenizer import CharTokenizer

SINGLE_GOAL, BATCH_GOAL = 12, 30
BUSY = "while True: pass"
VOCAB = [chr(i) for i in range(32, 127)] + ["\n", "\t"]  # 97 characters, like source code or prose


@torch.inference_mode()
def baseline_loop(model: CharRNN, streams: int, steps: int, temperature: float = 1.0) -> float:
    """Seconds for ``steps`` characters in each of ``streams`` streams, one
    ``nn.LSTM`` call per character."""
    emb, lstm, head = model.embedding, model.rnn, model.head
    x = torch.zeros(streams, 1, dtype=torch.long)  # (B, 1)
    state = None
    out = []
    start = time.perf_counter()
    for _ in range(steps):
        h, state = lstm(emb(x), state)  # (B, 1, H)
        probs = torch.softmax(head(h[:, -1]) / temperature, dim=-1)  # (B, V)
        x = torch.multinomial(probs, 1)  # (B, 1)
        out.append(x.view(-1).tolist())  # decode as it goes, as a streaming port would
    return time.perf_counter() - start


def charnn_stream(model: CharRNN, tok: CharTokenizer, steps: int, precision: str) -> float:
    start = time.perf_counter()
    n = sum(1 for _ in generate(model, tok, "", steps, temperature=1.0, seed=1, precision=precision))
    assert n == steps
    return time.perf_counter() - start


def charnn_batch(model: CharRNN, tok: CharTokenizer, streams: int, steps: int, precision: str) -> float:
    start = time.perf_counter()
    samples = generate_samples(model, tok, "", steps, num_samples=streams, temperature=1.0, seed=1,
                               precision=precision)
    assert len(samples) == streams and all(len(s.text) == steps for s in samples)
    return time.perf_counter() - start


def rate(chars: int, seconds: list[float]) -> float:
    return chars / statistics.median(seconds)


def bench_size(hidden: int, args: argparse.Namespace) -> dict[str, float]:
    torch.manual_seed(0)
    tok = CharTokenizer(sorted(VOCAB))
    model = CharRNN(ModelConfig(cell="lstm", vocab_size=tok.vocab_size, hidden_size=hidden,
                                num_layers=2, embedding_dim=64, dropout=0.0)).eval()
    s1, sb, B = args.steps_single, args.steps_batch, args.streams
    # Warm up every path once (allocator, oneDNN primitives, caches).
    torch.set_num_threads(args.threads)
    baseline_loop(model, 1, 20), baseline_loop(model, B, 5)
    charnn_stream(model, tok, 50, args.precision), charnn_batch(model, tok, B, 20, args.precision)
    t: dict[str, list[float]] = {k: [] for k in ("base1", "baseB", "ch1", "chB")}
    for _ in range(args.repeats):
        torch.set_num_threads(args.threads)
        t["base1"].append(baseline_loop(model, 1, s1))
        t["ch1"].append(charnn_stream(model, tok, s1, args.precision))
        torch.set_num_threads(args.batch_threads)
        t["baseB"].append(baseline_loop(model, B, sb))
        t["chB"].append(charnn_batch(model, tok, B, sb, args.precision))
    return {
        "base1": rate(s1, t["base1"]), "baseB": rate(B * sb, t["baseB"]),
        "ch1": rate(s1, t["ch1"]), "chB": rate(B * sb, t["chB"]),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="512,256", help="hidden sizes of the 2-layer LSTMs")
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--steps-single", type=int, default=500, help="characters per single-stream run (charnn sample's default length)")
    p.add_argument("--steps-batch", type=int, default=500, help="characters per stream, batched runs")
    p.add_argument("--repeats", type=int, default=3)
    # One thread by default on both sides: a step of one stream is too little
    # work to split, and on a shared machine a second OpenMP thread that must
    # wait for a busy core makes any step many times slower. `charnn sample`
    # itself uses one thread below 16 samples and torch's default above; pass
    # --batch-threads 2 (or more) to measure batches that way.
    p.add_argument("--threads", type=int, default=1, help="torch threads, both sides, single-stream runs")
    p.add_argument("--batch-threads", type=int, default=1, help="torch threads, both sides, batched runs")
    p.add_argument("--busy", type=int, default=0, help="processes that keep a core busy during the measurement")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="charnn's weight precision (auto: what charnn sample uses)")
    args = p.parse_args()
    hogs = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(args.busy)]
    try:
        measure(args)
    finally:
        for h in hogs:
            h.kill()


def measure(args: argparse.Namespace) -> None:
    cpu = torch.device("cpu")
    print(f"torch {torch.__version__}, threads (both sides): {args.threads} single stream, {args.batch_threads} "
          f"batched; CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}; charnn precision {args.precision}: single stream "
          f"{sampling_precision(args.precision, cpu, 1, False)}, {args.streams} streams "
          f"{sampling_precision(args.precision, cpu, args.streams, False)}; median of {args.repeats}; "
          f"{args.busy} busy process{'' if args.busy == 1 else 'es'}")
    print(f"{'model':<10}{'streams':>8}{'baseline ch/s':>15}{'charnn ch/s':>13}{'charnn/base':>13}")
    ok = True
    for hidden in (int(s) for s in args.sizes.split(",")):
        r = bench_size(hidden, args)
        name = f"2x{hidden}"
        print(f"{name:<10}{1:>8}{r['base1']:>15,.0f}{r['ch1']:>13,.0f}{r['ch1'] / r['base1']:>12.1f}x")
        print(f"{name:<10}{args.streams:>8}{r['baseB']:>15,.0f}{r['chB']:>13,.0f}{r['chB'] / r['baseB']:>12.1f}x")
        single, batch = r["ch1"] / r["base1"], r["chB"] / r["ch1"]
        ok &= single >= SINGLE_GOAL and batch >= BATCH_GOAL
        print(f"  {name}: single stream charnn/baseline = {single:.1f}x (goal >= {SINGLE_GOAL}x); "
              f"{args.streams} streams / single stream (charnn) = {batch:.1f}x (goal >= {BATCH_GOAL}x)")
    print("goals met" if ok else "goals NOT met")


if __name__ == "__main__":
    main()
