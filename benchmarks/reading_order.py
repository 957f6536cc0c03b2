"""How the order the text is read in changes what a fixed number of steps learns.

Each run trains a fresh model for exactly ``--steps`` optimizer steps (not a
time budget, so a busy machine changes how long it takes but not the figure),
then scores the whole held-out last 10% with ``charnn eval``. Only the order
of the training chunks differs between the variants:

- ``in-order``: each of the 16 rows reads one stretch of the text
  (``--no-shuffle``);
- ``in-order-resets``: the same, with the state reset every 32 chunks, as the
  shuffled blocks reset it;
- ``shuffled``: blocks of 32 chunks dealt to the rows in a new random order
  each epoch (``--shuffle``);
- ``shuffled-no-reset``: the same, with the state carried across blocks;
- ``blocks-in-text-order``: the same blocks, dealt round robin in text order
  (row r reads blocks r, r+16, r+32, ...);
- ``rows-permuted``: each row reads one whole stretch in order, the rows'
  stretches permuted each epoch (no jump inside an epoch).

The corpora are benchmarks/corpora/NAME.txt (``python benchmarks/fit.py
corpora`` builds them). Run one variant per process, one run at a time:

    python benchmarks/reading_order.py --corpus jargon --steps 300 --seeds 1,2,3,4,5,1337
    python benchmarks/reading_order.py --corpus jargon --steps 1500 --seeds 1337,2

It prints one line per run (variant, seed, validation loss in nats/char) and
the mean per variant.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
VARIANTS = ("in-order", "in-order-resets", "shuffled", "shuffled-no-reset", "blocks-in-text-order",
            "rows-permuted")

WORKER = r"""
import json, sys
import numpy as np
import charnn.text.data as d
variant, corpus, steps, seed, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
hidden, layers, emb = (int(v) for v in sys.argv[6].split(","))
shuffle = not variant.startswith("in-order")
if variant == "in-order-resets":
    d.StreamBatcher.starts_block = lambda self, i: i % d.BLOCK_CHUNKS == 0
elif variant == "shuffled-no-reset":
    d.BlockBatcher.starts_block = lambda self, i: i == 0
elif variant in ("blocks-in-text-order", "rows-permuted"):
    def layout(self, epoch):
        order = np.full(self.batch_size * self.blocks_per_row, -1, dtype=np.int64)
        order[: self.n_blocks] = np.arange(self.n_blocks)
        if variant == "blocks-in-text-order":
            return order.reshape(self.blocks_per_row, self.batch_size).T.copy()
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch])))
        return order.reshape(self.batch_size, self.blocks_per_row)[rng.permutation(self.batch_size)].copy()
    d.BlockBatcher.layout = layout
    if variant == "rows-permuted":
        d.BlockBatcher.starts_block = lambda self, i: i == 0
from charnn.training.config import TrainConfig
from charnn.model.devices import set_threads
from charnn.training.trainer import train
set_threads(2)
cfg = TrainConfig(corpus=[corpus], max_steps=steps, out=out, seed=seed, size="fixed", shuffle=shuffle,
                  sample_every=0, eval_every=steps)
train(cfg, {"hidden_size": hidden, "num_layers": layers, "embedding_dim": emb, "dropout": 0.0},
      handle_sigint=False)
"""


def run(variant: str, corpus: Path, steps: int, seed: int, shape: str) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        subprocess.run([sys.executable, "-c", WORKER, variant, str(corpus), str(steps), str(seed), str(out),
                        shape], check=True, capture_output=True, text=True)
        score = subprocess.run([sys.executable, "-m", "charnn", "eval", str(out / "best.pt"), "--json",
                                "--threads", "2"], check=True, capture_output=True, text=True)
        return json.loads(score.stdout)["loss"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", default="jargon",
                   help="a name under benchmarks/corpora, or a text file's path (default: jargon)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seeds", default="1337")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--shape", default="128,2,64", help="hidden,layers,embedding (default: 2x128, embedding 64)")
    args = p.parse_args()
    corpus = Path(args.corpus) if Path(args.corpus).is_file() else HERE / "corpora" / f"{args.corpus}.txt"
    if not corpus.is_file():
        sys.exit(f"Error: {corpus} not found; build it with: python benchmarks/fit.py corpora")
    variants = args.variants.split(",")
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        sys.exit(f"Error: unknown variant(s) {', '.join(sorted(unknown))}; choose from {', '.join(VARIANTS)}")
    losses: dict[str, list[float]] = {v: [] for v in variants}
    for seed in (int(s) for s in args.seeds.split(",")):
        for v in variants:
            loss = run(v, corpus, args.steps, seed, args.shape)
            losses[v].append(loss)
            print(f"{corpus.stem} {args.steps} steps  {v:22s} seed {seed:<5d} {loss:.4f}", flush=True)
    print()
    for v, ls in losses.items():
        print(f"{v:22s} mean {statistics.fmean(ls):.4f}  ({', '.join(f'{x:.4f}' for x in ls)})")


if __name__ == "__main__":
    main()
