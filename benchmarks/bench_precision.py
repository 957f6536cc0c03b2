"""Training precision on this CPU: one training step (forward, backward,
clipping, fused AdamW, as charnn's trainer and its size probe take them) in
fp32 and in bf16 autocast, by shape and batch x context, timed in turns so
that the machine's drift hits both alike. The figure is the median over
``--rounds`` of each precision's mean step time, and fp32's time over bf16's
(above 1: bf16 is faster).

What `--precision auto` decides from it: docs/training.md, "Devices,
precision, threads".

    python benchmarks/bench_precision.py [--shapes 2x128,2x256,2x320,2x512] [--batches 16x64,32x128,64x128]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from charnn.model.config import ModelConfig
from charnn.model.devices import cpu_has_amx, cpu_has_bf16, set_threads
from charnn.model.rnn import CharRNN
from charnn.model.sizing import LADDER, time_training_steps
from charnn.training.config import TrainConfig
from charnn.training.step import make_optimizer

EMBEDDING = {s.hidden_size: s.embedding_dim for s in LADDER}


def pairs(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in part.split("x")) for part in text.split(",")]  # type: ignore[misc]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="2x128,2x256,2x320,2x512", help="LAYERSxHIDDEN, comma-separated")
    ap.add_argument("--batches", default="16x64,32x128,64x128", help="STREAMSxCONTEXT, comma-separated")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per precision and round")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: charnn's choice)")
    args = ap.parse_args()
    threads = set_threads(args.threads)
    print(f"torch {torch.__version__}, {threads} threads, native bf16: {cpu_has_bf16()}, AMX: {cpu_has_amx()}; "
          f"median of {args.rounds} rounds of {args.steps} steps")
    print("| shape | batch | fp32 ms | bf16 ms | fp32 / bf16 |")
    print("| --- | --- | ---: | ---: | ---: |")
    vocab = 100
    for layers, hidden in pairs(args.shapes):
        mc = ModelConfig(vocab_size=vocab, hidden_size=hidden, num_layers=layers,
                         embedding_dim=EMBEDDING.get(hidden, 128), dropout=0.0)
        for rows, context in pairs(args.batches):
            x = torch.randint(0, vocab, (rows, context))
            y = torch.randint(0, vocab, (rows, context))
            times: dict[str, list[float]] = {"fp32": [], "bf16": []}
            for _ in range(args.rounds):
                for precision, seen in times.items():
                    seen.append(time_training_steps(CharRNN(mc), lambda m: make_optimizer(m, TrainConfig()), x, y,
                                                    torch.device("cpu"), precision, steps=args.steps, warmup=1))
            fp32, bf16 = statistics.median(times["fp32"]), statistics.median(times["bf16"])
            print(f"| {layers}x{hidden} | {rows} x {context} | {fp32 * 1000:.1f} | {bf16 * 1000:.1f} | "
                  f"{fp32 / bf16:.2f} |", flush=True)


if __name__ == "__main__":
    main()
