"""How the learning-rate warmup decides whether a run leaves the first plateau.

A character model first learns the characters' overall frequencies (the
unigram, ~6.3 nats/char on the Chinese poems, ~3.1-3.2 on English) and then
has to learn to use its input. Some runs never do: they sit on that plateau
to the end. Each run here trains a fresh model for exactly ``--steps``
optimizer steps (not a time budget, so a busy machine changes how long it
takes but not the figure), then scores the whole held-out last 10% with
``charnn eval``. Only ``--warmup-steps`` differs between the variants
(``auto`` is charnn's automatic warmup, whatever this checkout's rule is).

The corpora are benchmarks/corpora/NAME.txt (``python benchmarks/fit.py
corpora`` builds them). One run at a time; a run of 450 steps of 2x256 takes
about a minute on 2 cores:

    python benchmarks/warmup.py --corpus tang-song --steps 450 --seeds 2,1,3 \\
        --warmups 22,100 --shape 256,2,96 --dropout 0.2

It prints one line per run (warmup, seed, validation loss in nats/char) and
the mean and worst per warmup.
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

WORKER = r"""
import sys
from charnn.training.config import TrainConfig
from charnn.model.devices import set_threads
from charnn.training.trainer import train
corpus, steps, seed, out, warmup, order = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6]
hidden, layers, emb = (int(v) for v in sys.argv[7].split(","))
dropout = float(sys.argv[8])
set_threads(2)
cfg = TrainConfig(corpus=[corpus], max_steps=steps, out=out, seed=seed, size="fixed", shuffle=order == "shuffled",
                  sample_every=0, eval_every=steps, warmup_steps=None if warmup == "auto" else int(warmup))
train(cfg, {"hidden_size": hidden, "num_layers": layers, "embedding_dim": emb, "dropout": dropout},
      handle_sigint=False)
"""


def run(corpus: Path, steps: int, seed: int, warmup: str, order: str, shape: str, dropout: float) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        subprocess.run([sys.executable, "-c", WORKER, str(corpus), str(steps), str(seed), str(out), warmup, order,
                        shape, str(dropout)], check=True, capture_output=True, text=True)
        score = subprocess.run([sys.executable, "-m", "charnn", "eval", str(out / "last.pt"), "--json",
                                "--threads", "2"], check=True, capture_output=True, text=True)
        return json.loads(score.stdout)["loss"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", default="tang-song",
                   help="a name under benchmarks/corpora, or a text file's path (default: tang-song)")
    p.add_argument("--steps", type=int, default=450)
    p.add_argument("--seeds", default="2,1,3")
    p.add_argument("--warmups", default="auto,100", help="comma-separated --warmup-steps values; auto = charnn's rule")
    p.add_argument("--order", choices=("in-order", "shuffled"), default="in-order")
    p.add_argument("--shape", default="256,2,96", help="hidden,layers,embedding (default: 2x256, embedding 96)")
    p.add_argument("--dropout", type=float, default=0.2)
    args = p.parse_args()
    corpus = Path(args.corpus) if Path(args.corpus).is_file() else HERE / "corpora" / f"{args.corpus}.txt"
    if not corpus.is_file():
        sys.exit(f"Error: {corpus} not found; build it with: python benchmarks/fit.py corpora")
    warmups = args.warmups.split(",")
    bad = [w for w in warmups if w != "auto" and not w.isdigit()]
    if bad:
        sys.exit(f"Error: --warmups takes step counts or auto, not {', '.join(bad)}")
    losses: dict[str, list[float]] = {w: [] for w in warmups}
    for seed in (int(s) for s in args.seeds.split(",")):
        for w in warmups:
            loss = run(corpus, args.steps, seed, w, args.order, args.shape, args.dropout)
            losses[w].append(loss)
            print(f"{corpus.stem} {args.steps} steps {args.order} warmup {w:>5s}  seed {seed:<5d} {loss:.4f}",
                  flush=True)
    print()
    for w, ls in losses.items():
        print(f"warmup {w:>5s}  mean {statistics.fmean(ls):.4f}  worst {max(ls):.4f}  "
              f"({', '.join(f'{x:.4f}' for x in ls)})")


if __name__ == "__main__":
    main()
