"""Training throughput: charnn's trainer against a bare PyTorch loop.

Both run in this process at the same shapes, interleaved, so machine noise
hits both alike. The bare loop is Embedding + nn.LSTM + Linear + AdamW +
clip_grad_norm_ on random ids; charnn is the whole trainer as `charnn train`
runs it (corpus, batching, the metrics log, the CLI's progress reporter),
timed between two step counts via its log events.

    python benchmarks/bench_train.py [--corpus FILE] [--steps 30] [--shapes 2x512,2x256]
    python benchmarks/bench_train.py --grid [--shapes 2x320]   # batch x context 8x32 .. 128x256

``--grid`` measures the first shape at every batch size and context length
from 8 x 32 to 128 x 256, in fp32 and bf16, and prints one table per
precision of charnn's speed as a share of the bare loop's. There the two
take turns every 10 steps (charnn logs every 10 steps, as a run does, and
the bare loop makes its 10 inside charnn's log callback), for about
``--grid-seconds`` each; the share is the median over the turns. On a
machine whose speed drifts from second to second (this project's VM: the
same cell measured 0.76-1.22 in 6-second runs one after the other), turns
this short see the same machine.
"""

from __future__ import annotations

import argparse
import io
import math
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rich.console import Console

from charnn.cli.progress import TrainReporter
from charnn.training.config import TrainConfig
from charnn.training.trainer import Trainer

EMBED = 64  # both sides use the same embedding width and vocabulary size
# The bare loop's optimizer: torch's default AdamW, as the plainest loop
# writes it (charnn uses the fused kernel); --bare-fused gives it that too,
# which leaves charnn's own overhead.
BARE_ADAMW: dict = {}
DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "war-and-peace.txt"


def bare_loop(layers: int, hidden: int, batch: int, seq: int, steps: int, warmup: int,
              precision: str, vocab: int, embed: int = 64) -> float:
    """chars/s of the plainest TBPTT loop at these shapes."""
    torch.manual_seed(0)
    emb, rnn, head = nn.Embedding(vocab, embed), nn.LSTM(embed, hidden, layers, batch_first=True), nn.Linear(hidden, vocab)
    params = [*emb.parameters(), *rnn.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3, **BARE_ADAMW)
    data = torch.randint(0, vocab, (batch, (steps + warmup) * seq + 1))
    state = None
    dtype = torch.bfloat16 if precision == "bf16" else None
    for i in range(steps + warmup):
        if i == warmup:
            t0 = time.perf_counter()
        x = data[:, i * seq : (i + 1) * seq]
        y = data[:, i * seq + 1 : (i + 1) * seq + 1]
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            out, state = rnn(emb(x), state)
            logits = head(out)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        state = tuple(s.detach() for s in state)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    return steps * batch * seq / (time.perf_counter() - t0)


class BareLoop:
    """The bare loop, run ``n`` steps at a time (:meth:`run`), its state kept."""

    def __init__(self, layers: int, hidden: int, batch: int, seq: int, precision: str, vocab: int):
        torch.manual_seed(0)
        self.emb, self.rnn = nn.Embedding(vocab, EMBED), nn.LSTM(EMBED, hidden, layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab)
        self.params = [*self.emb.parameters(), *self.rnn.parameters(), *self.head.parameters()]
        self.opt = torch.optim.AdamW(self.params, lr=1e-3, **BARE_ADAMW)
        self.data = torch.randint(0, vocab, (batch, 64 * seq + 1))
        self.seq, self.i, self.state = seq, 0, None
        self.dtype = torch.bfloat16 if precision == "bf16" else None

    def run(self, n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            j = (self.i % 64) * self.seq
            self.i += 1
            x, y = self.data[:, j: j + self.seq], self.data[:, j + 1: j + self.seq + 1]
            with torch.autocast("cpu", dtype=self.dtype, enabled=self.dtype is not None):
                out, state = self.rnn(self.emb(x), self.state)
                logits = self.head(out)
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
            self.state = tuple(s.detach() for s in state)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.opt.step()
        return time.perf_counter() - start


def turns(corpus: str, layers: int, hidden: int, batch: int, seq: int, steps: int, precision: str,
          vocab: int) -> tuple[float, float]:
    """(charnn's chars/s over bare chars/s, median over turns of 10 steps each; charnn's chars/s)
    over ``steps`` steps of each after a warmup of 20."""
    bare = BareLoop(layers, hidden, batch, seq, precision, vocab)
    bare.run(LOG_EVERY)
    pairs: list[tuple[float, float]] = []
    last: list[float] = []
    reporter = TrainReporter(sample_every=0, console=Console(file=io.StringIO(), width=120))

    def on_event(event: dict) -> None:
        if event["kind"] != "log":
            reporter(event)
            return
        now = time.perf_counter()
        mine = now - last[0] if last else None
        reporter(event)
        theirs = bare.run(LOG_EVERY)
        if mine is not None and event["step"] > 2 * LOG_EVERY:
            pairs.append((mine, theirs))
        last[:] = [time.perf_counter()]

    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(corpus=[corpus], max_steps=2 * LOG_EVERY + steps, eval_every=10**9, log_every=LOG_EVERY,
                          batch_size=batch, seq_len=seq, precision=precision, device="cpu",
                          sample_every=0, out=out, val_fraction=0.001)
        trainer = Trainer(cfg, {"hidden_size": hidden, "num_layers": layers, "dropout": 0.0, "embedding_dim": EMBED},
                          callback=on_event, handle_sigint=False)
        trainer.run()
    ratios = sorted(theirs / mine for mine, theirs in pairs)
    chars = LOG_EVERY * batch * seq
    return ratios[len(ratios) // 2], chars * len(pairs) / sum(mine for mine, _ in pairs)


def charnn_loop(corpus: str, layers: int, hidden: int, batch: int, seq: int, steps: int,
                warmup: int, precision: str, log_every: int | None = None) -> float:
    """chars/s of charnn's Trainer over ``steps`` steps after at least ``warmup``.
    It logs every ``log_every`` steps (default: ``steps``; a run logs every 10
    by default: a log row per step would charge charnn a metrics line and a
    progress render that real runs do not pay each step), so the warmup is
    rounded up to a multiple of it, and ``steps`` must be one."""
    log_every = log_every or steps
    assert steps % log_every == 0
    warmup = log_every * max(1, -(-warmup // log_every))
    marks: dict[int, float] = {}
    # The CLI's own reporter renders every event (into a buffer), so progress
    # and logging cost what they cost in `charnn train`.
    reporter = TrainReporter(sample_every=0, console=Console(file=io.StringIO(), width=120))

    def on_event(event: dict) -> None:
        if event["kind"] == "log":
            marks[event["step"]] = time.perf_counter()
        reporter(event)

    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(corpus=[corpus], max_steps=warmup + steps, eval_every=10**9, log_every=log_every,
                          batch_size=batch, seq_len=seq, precision=precision, device="cpu",
                          sample_every=0, out=out, val_fraction=0.001)
        trainer = Trainer(cfg, {"hidden_size": hidden, "num_layers": layers, "dropout": 0.0,
                                "embedding_dim": EMBED},
                          callback=on_event, handle_sigint=False)
        trainer.run()
    return steps * batch * seq / (marks[warmup + steps] - marks[warmup])


GRID_BATCHES = (8, 16, 32, 64, 128)
GRID_CONTEXTS = (32, 64, 128, 256)
LOG_EVERY = 10  # charnn train's default


def grid_steps(seconds: float, layers: int, hidden: int, batch: int, seq: int, precision: str, vocab: int) -> int:
    """Steps that take about ``seconds`` at this cell (timed from a few bare
    steps), in whole logging intervals, at least two."""
    rate = bare_loop(layers, hidden, batch, seq, 5, 2, precision, vocab=vocab, embed=EMBED)
    return LOG_EVERY * max(5, math.ceil(seconds * rate / (batch * seq) / LOG_EVERY))


def grid(args: argparse.Namespace, vocab: int) -> None:
    layers, hidden = (int(v) for v in args.shapes.split(",")[0].split("x"))
    print(f"{layers}x{hidden} LSTM, embedding {EMBED}, {vocab} characters; charnn chars/s / bare chars/s "
          f"(median of turns of {LOG_EVERY} steps, about {args.grid_seconds:g} s of each side)")
    for precision in ("fp32", "bf16"):
        rows = []
        for batch in (int(b) for b in args.grid_batches.split(",")):
            cells = []
            for seq in GRID_CONTEXTS:
                steps = grid_steps(args.grid_seconds, layers, hidden, batch, seq, precision, vocab)
                share, mine = turns(args.corpus, layers, hidden, batch, seq, steps, precision, vocab)
                cells.append(f"{share:.2f} ({mine / 1000:.1f}k)")
            rows.append(f"| {batch} | " + " | ".join(cells) + " |")
        print(f"\n{precision}: charnn / bare (charnn's thousands of chars/s)\n")
        print("| batch \\ context | " + " | ".join(map(str, GRID_CONTEXTS)) + " |")
        print("| ---: | " + " | ".join("---:" for _ in GRID_CONTEXTS) + " |")
        print("\n".join(rows), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=str(DEFAULT_CORPUS))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--shapes", default="2x512,2x256")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved repetitions; the best of each is kept")
    ap.add_argument("--grid", action="store_true", help="batch x context from 8x32 to 128x256, fp32 and bf16")
    ap.add_argument("--grid-seconds", type=float, default=3.0, help="seconds each side is timed per cell in --grid")
    ap.add_argument("--bare-fused", action="store_true", help="the bare loop uses torch's fused AdamW, as charnn does")
    ap.add_argument("--grid-batches", default=",".join(map(str, GRID_BATCHES)), help="the grid's rows (batch sizes)")
    args = ap.parse_args()
    if args.bare_fused:
        BARE_ADAMW["fused"] = True
    if args.grid:
        vocab = len(set(Path(args.corpus).read_text(encoding="utf-8-sig").replace("\r", "\n")))
        grid(args, vocab)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}, "
          f"seq-len {args.seq_len}, {args.steps} timed steps")
    print(f"{'shape':>6} {'prec':>5} {'bare chars/s':>13} {'charnn chars/s':>15} {'charnn/bare':>12}")
    vocab = len(set(Path(args.corpus).read_text(encoding="utf-8-sig").replace("\r", "\n")))
    fp32_charnn: dict[str, float] = {}
    for shape in args.shapes.split(","):
        layers, hidden = (int(v) for v in shape.split("x"))
        for precision in ("fp32", "bf16"):
            bare, mine = 0.0, 0.0
            for _ in range(args.rounds):
                common = (layers, hidden, args.batch_size, args.seq_len, args.steps, args.warmup, precision)
                bare = max(bare, bare_loop(*common, vocab=vocab, embed=EMBED))
                mine = max(mine, charnn_loop(args.corpus, *common))
            extra = ""
            if precision == "fp32":
                fp32_charnn[shape] = mine
            else:
                extra = f"   bf16/fp32 (charnn) {mine / fp32_charnn[shape]:.2f}x"
            print(f"{shape:>6} {precision:>5} {bare:>13,.0f} {mine:>15,.0f} {mine / bare:>11.2f}x{extra}")


if __name__ == "__main__":
    main()
