"""``--size auto``: the model's shape and dropout, chosen from the text and the budget.

A fixed shape cannot suit 50 KB of lyrics and 50 MB of source code, one
minute and two hours. The rule here picks from a ladder of shapes by two
limits, then sets dropout by how many times the run will see its text:

- **compute**: a shape is only worth its size if the budget buys enough
  steps to train it. A time budget is turned into steps per shape from a short
  throughput probe on this device (:func:`step_seconds`, done by the trainer);
  ``--max-steps`` and ``--epochs`` give the steps directly. A shape that would
  stop before reading the whole text once needs more steps per weight;
- **data**: more parameters than the text can support overfit; the largest
  shape allowed grows with the training characters;
- **dropout** rises with the epochs the budget buys.

The reading order (``--order auto``, :func:`choose_order`) follows the same
estimate: in order when the run reads its text at least once, shuffled
blocks when not.

The constants come from the measurement suite ``benchmarks/fit.py`` (results
in ``benchmarks/results/fit.csv``, tables in ``benchmarks/README.md``; the
rule explained: ``docs/training.md``, "Why this model size").
Options given explicitly always win: they replace the chosen values.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

SIZES = ("auto", "fixed")


@dataclass(frozen=True)
class Shape:
    hidden_size: int
    num_layers: int
    embedding_dim: int

    @property
    def name(self) -> str:
        return f"{self.num_layers}x{self.hidden_size}"


# Smallest to largest; each about twice the parameters of the one before.
LADDER = (
    Shape(128, 2, 64),
    Shape(192, 2, 64),
    Shape(256, 2, 96),
    Shape(320, 2, 128),  # --size fixed's shape
    Shape(448, 2, 128),
    Shape(512, 3, 128),
)

# The rule's constants; the runs behind each are benchmarks/fit.py's
# (benchmarks/results/fit.csv, tables in benchmarks/README.md).
#
# Compute: optimizer steps a shape needs per million recurrent parameters (a
# bigger model needs more steps before it overtakes a smaller one). At 1
# minute 2x192 with 1.2-1.4k steps lost to 2x128 with 1.8-2.4k on three of
# four texts; at 5 minutes the 2x192/2x256 crossover lies at 4-5k and differs
# by text, and the probe's estimate is off by 0.84-1.64x on a busy machine, so
# 3,000 keeps the choice clear of that edge (2x256 on the English texts at 5
# minutes, 2x128 on all four at 1).
STEPS_PER_MPARAM = 3000
# The same for a shape that would stop before one epoch: every step is on new
# text, so a smaller model's extra steps are worth more. At 5 minutes, reading
# shuffled blocks, 2x256 with ~4k per million lost to 2x192 with 10-12.6k on
# Python's docs (2.1%) and source (1.5%); 6,000 lies between with a margin.
STEPS_PER_MPARAM_PART = 6000
# Data: at most this many recurrent parameters per training character.
PARAMS_PER_CHAR = 2.0
# A text too small for every shape overfits within a few hundred steps
# whatever the size, and best.pt keeps the best evaluation; there a larger
# model learns faster (the Chinese poems, 35k characters, 1 minute, 3 seeds:
# 2x256 4.920, 2x320 4.928, 2x128 with dropout 0.2-0.3 4.97-4.98).
SMALL_TEXT_SHAPE = Shape(256, 2, 96)
# Dropout by epochs of the text the budget buys: (epochs below, dropout).
# Below 3 epochs dropout only slows learning (0.3 lost 0.1 nats/char on every
# text of 1 MB and more at 0.6-1.4 epochs); 0.1 won from about 3.6 epochs
# (the King James text) and 0.3 at 26-30 (the Chinese poems).
DROPOUT_BY_EPOCHS = ((3.0, 0.0), (10.0, 0.1), (25.0, 0.2), (math.inf, 0.3))


# Reading order (charnn.text.data): a run the budget lets read its text at
# least this many times reads each stream in order, a shorter one shuffled
# blocks. Short of an epoch, in order sees only the start of each stream's
# stretch, and shuffled blocks gained 4-8% (the code texts, 1 and 5 minutes);
# from one epoch on, order cost nothing beyond the seed spread, or cost the
# shuffled run 5-8% on the Jargon File (benchmarks/reading_order.py).
ORDER_EPOCHS = 1.0


def choose_order(epochs: float | None) -> tuple[bool, str]:
    """(shuffle, why) for a run whose budget buys ``epochs`` passes over its
    text (None: not known, read shuffled)."""
    if epochs is None:
        return True, "shuffled blocks (the epochs the budget buys are not known)"
    if epochs >= ORDER_EPOCHS:
        return False, f"each stream in order (the budget reads the text {epochs:.3g} times)"
    return True, f"shuffled blocks (the budget reads {epochs:.2g} of the text)"


def recurrent_params(shape: Shape, vocab_size: int, cell: str = "lstm") -> int:
    """Weights that cost compute each step: the recurrent layers and the head
    (the embedding is a lookup). The trainer's step time grows with this."""
    gates = {"lstm": 4, "gru": 3, "rnn": 1}.get(cell, 4)
    H, E = shape.hidden_size, shape.embedding_dim
    n = gates * H * (E + H + 2)
    n += (shape.num_layers - 1) * gates * H * (2 * H + 2)
    return n + (H + 1) * vocab_size


def dropout_for(epochs: float) -> float:
    for below, p in DROPOUT_BY_EPOCHS:
        if epochs < below:
            return p
    return DROPOUT_BY_EPOCHS[-1][1]


@dataclass
class SizeChoice:
    shape: Shape
    dropout: float
    steps: int | None  # the steps the budget buys at this shape (None: not known)
    epochs: float | None
    reason: str  # one line, printed at start and kept in train_config

    def overrides(self) -> dict[str, Any]:
        return {"hidden_size": self.shape.hidden_size, "num_layers": self.shape.num_layers,
                "embedding_dim": self.shape.embedding_dim, "dropout": self.dropout}


def _fmt_chars(n: int) -> str:
    for unit, div in (("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)


def _fmt_seconds(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:.3g} h"
    if s >= 60:
        return f"{s / 60:.3g} min"
    return f"{s:.3g} s"


def choose(*, train_chars: int, vocab_size: int, tokens_per_step: int, cell: str = "lstm",
           steps: int | None = None, seconds: float | None = None,
           step_time: Callable[[Shape], float] | None = None, given: dict[str, Any] | None = None) -> SizeChoice:
    """The shape and dropout for a run.

    ``steps``: the step budget (``--max-steps``, or ``--epochs`` turned into
    steps), if any; ``seconds``: the time budget left for training, with
    ``step_time(shape)`` the measured seconds per step. With both, the smaller
    number of steps counts. ``given``: explicitly chosen values
    (hidden_size, num_layers, embedding_dim, dropout) that replace the choice.
    """
    if train_chars < 1 or tokens_per_step < 1:
        raise ConfigError("choosing a model size needs some training text")
    given = {k: v for k, v in (given or {}).items() if v is not None}

    def budget_steps(shape: Shape) -> int | None:
        n = steps
        if seconds is not None and step_time is not None:
            t = step_time(shape)
            by_time = 0 if math.isinf(t) else int(seconds / max(t, 1e-6))
            n = by_time if n is None else min(n, by_time)
        return n

    data_cap = PARAMS_PER_CHAR * train_chars
    chosen, why = LADDER[0], "the largest charnn chooses"
    fully_given = all(k in given for k in ("hidden_size", "num_layers", "embedding_dim"))
    if fully_given and "dropout" in given:  # nothing to choose, nothing to time
        shape = Shape(int(given["hidden_size"]), int(given["num_layers"]), int(given["embedding_dim"]))
        return SizeChoice(shape, float(given["dropout"]), None, None,
                          f"{shape.name}, embedding {shape.embedding_dim}, dropout {given['dropout']:g}: all given")
    for i, shape in enumerate(() if fully_given else LADDER):
        p = recurrent_params(shape, vocab_size, cell)
        if p > data_cap:  # decided without timing it
            if i == 0:  # too little text for any shape: early stopping, not size, bounds overfitting
                chosen, why = SMALL_TEXT_SHAPE, "the text is small for any model; best.pt stops early"
            else:
                why = f"{shape.name} would overfit this text"
            break
        n = budget_steps(shape)
        if n is None:  # no budget: only the text limits the size
            chosen = shape
            continue
        passes = n * tokens_per_step / train_chars
        need = math.ceil((STEPS_PER_MPARAM if passes >= 1 else STEPS_PER_MPARAM_PART) * p / 1e6)
        if n < need:
            why = (f"{shape.name} would get {n:,} steps, it needs about {need:,}" if i else
                   "the smallest; the budget is short for any model")
            break
        chosen = shape
    shape = Shape(int(given.get("hidden_size", chosen.hidden_size)), int(given.get("num_layers", chosen.num_layers)),
                  int(given.get("embedding_dim", chosen.embedding_dim)))
    n = budget_steps(shape)
    epochs = None if n is None else n * tokens_per_step / train_chars
    dropout = float(given["dropout"]) if "dropout" in given else (dropout_for(epochs) if epochs is not None else 0.1)

    budget = []
    if seconds is not None and step_time is not None:
        budget.append(_fmt_seconds(seconds))
    if n is not None:
        budget.append(f"~{n:,} steps")
    if epochs is not None:
        budget.append(f"{epochs:.3g} epochs")
    head = f"{_fmt_chars(train_chars)} chars, " + (" = ".join(budget) if budget else "no step estimate")
    shape_part = f"{shape.name}" + (" (given)" if fully_given else f" ({why})" if shape == chosen
                                     else f" (given; auto chose {chosen.name})")
    if shape != chosen:
        shape_part += f", embedding {shape.embedding_dim}"
    tail = f"dropout {dropout:g}" + (" (given)" if "dropout" in given else "")
    reason = f"{head} -> {shape_part}, {tail}"
    return SizeChoice(shape, dropout, n, epochs, reason)


# Of a --time-limit, the share left for training steps: the evaluations
# during the run and the final one take the rest (each is capped at 2% of
# the budget; see schedule.auto_eval_chars).
TRAINING_SHARE = 0.9
# The timing probe stops measuring once it has used this share of a
# --time-limit; larger shapes are then estimated from the largest one timed.
PROBE_SHARE = 0.03


def training_seconds(time_limit: float) -> float:
    return TRAINING_SHARE * time_limit


def scaled_step_time(shape: Shape, timed: dict[Shape, float], vocab_size: int, cell: str = "lstm") -> float | None:
    """Seconds per step of ``shape``, estimated from the largest shape in
    ``timed`` (finite timings only) in proportion to the weights each step
    computes with; None when nothing was timed."""
    measured = [(s, t) for s, t in timed.items() if math.isfinite(t)]
    if not measured:
        return None
    s, t = max(measured, key=lambda st: recurrent_params(st[0], vocab_size, cell))
    return t * recurrent_params(shape, vocab_size, cell) / recurrent_params(s, vocab_size, cell)


def time_training_steps(model: Any, make_optimizer: Callable[[Any], Any], x: Any, y: Any,
                        device: Any, precision: str, *, steps: int = 3, warmup: int = 1,
                        sync: Callable[[Any], None] | None = None) -> float:
    """Seconds per training step of ``model`` (a throwaway CharRNN) on inputs
    ``x`` and targets ``y``: forward, backward, clipping and the optimizer's
    step, in the run's precision, as the trainer does them; ``sync(model)``
    after backward, where the run averages gradients over ranks. The global
    random state is left as it was."""
    import torch
    import torch.nn.functional as F

    from ..text.data import IGNORE_INDEX
    from .precision import autocast, kernels_for

    rng = torch.get_rng_state()
    model = model.to(device).train()
    optimizer = make_optimizer(model)
    x, y = x.to(device), y.to(device)

    def run_steps(n: int) -> None:
        for _ in range(n):
            with autocast(device, precision):
                logits, _ = model(x)
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX)
            optimizer.zero_grad(set_to_none=True)
            with kernels_for(device, precision):
                loss.backward()
            if sync is not None:
                sync(model)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
        if device.type == "cuda":  # GPU work is asynchronous: time it done
            torch.cuda.synchronize(device)
        elif device.type == "mps":
            torch.mps.synchronize()

    try:
        return step_seconds(run_steps, steps=steps, warmup=warmup)
    finally:
        torch.set_rng_state(rng)


def step_seconds(run_steps: Callable[[int], None], steps: int = 3, warmup: int = 1) -> float:
    """Seconds per step: ``run_steps(n)`` runs n training steps; the first
    ``warmup`` are not timed (kernel selection, allocation), the rest are
    timed one by one and the median counts (on a busy machine the run's steps
    will be slowed as the probe's are)."""
    run_steps(warmup)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        run_steps(1)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]
