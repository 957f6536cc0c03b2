"""A run's budget and its learning-rate schedule.

The budget is whichever of --max-steps, --epochs and --time-limit ends first;
``progress`` (0..1) is how far the run is through it. The learning rate warms
up linearly and then follows a cosine over that progress, so the schedule
spans the budget whatever its kind. Evaluation intervals and the evaluation
slice adapt to the budget when the user does not set them.
"""

from __future__ import annotations

import math
import re

from .config import TrainConfig
from ..errors import ConfigError, shell_arg

# Automatic warmup: AUTO_WARMUP_STEPS steps, or AUTO_WARMUP_SHARE of a budget
# too short for that. A short warmup leaves short runs on the first plateau: at
# 450 steps (2x256, the Chinese poems) 100 steps of warmup got three seeds of
# three off it (4.91-4.94 nats/char), 22 steps only two (benchmarks/warmup.py).
AUTO_WARMUP_STEPS = 100
AUTO_WARMUP_SHARE = 0.25
AUTO_EVALS = 8  # automatic --eval-every: about this many evaluations per run
MAX_EVAL_EVERY = 1000
AUTO_EVAL_CHARS = 200_000  # automatic evaluation slice: at most this many characters...
EVAL_BUDGET_SHARE = 0.02  # ...and, with --time-limit, one evaluation at most this share of it
MIN_EVAL_CHARS = 2_000
EVAL_SHARE = 0.05  # automatic --eval-every: evaluating each epoch may cost at most this share of training
SPEED_PROBE_STEPS = 20  # --time-limit with automatic --eval-every: steps timed before choosing it


def parse_duration(text: str | float | int | None) -> float:
    """'90' (seconds), '90s', '5m', '1.5h', '1h30m' -> seconds. 0 or empty = none."""
    if text is None or text == "":
        return 0.0
    if isinstance(text, (int, float)):
        seconds = float(text)
    else:
        s = text.strip().lower()
        parts = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?", s)
        if not s or not parts or not any(parts.groups()):
            raise ConfigError(f"cannot read time limit {text!r}; write it like 30s, 5m, 2h or 1h30m "
                              "(a bare number is seconds)")
        h, m, sec = (float(g) if g else 0.0 for g in parts.groups())
        seconds = h * 3600 + m * 60 + sec
    if not math.isfinite(seconds) or seconds < 0:
        raise ConfigError(f"time limit must be a positive duration, got {text!r}")
    return seconds


def warmup_factor(step: int, progress: float, warmup_steps: int | None) -> float:
    """0..1: how far the linear warmup is. ``None`` = automatic: done after
    AUTO_WARMUP_STEPS steps or AUTO_WARMUP_SHARE of the budget, whichever
    comes first."""
    if warmup_steps is None:
        return min(1.0, max((step + 1) / AUTO_WARMUP_STEPS, progress / AUTO_WARMUP_SHARE))
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    return 1.0


def lr_factor(step: int, progress: float, warmup_steps: int | None, min_ratio: float,
              warmup_progress: float | None = None) -> float:
    """The learning rate's multiplier: warmup times a cosine from 1 down to
    ``min_ratio`` as ``progress`` (0..1 of the budget) goes to 1. The product
    keeps it continuous even when a short budget ends inside the warmup.
    ``warmup_progress``: the share of the budget spent training (default
    ``progress``), for a budget part of which went before the first step."""
    progress = min(max(progress, 0.0), 1.0)
    cosine = min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    warm = progress if warmup_progress is None else min(max(warmup_progress, 0.0), 1.0)
    return warmup_factor(step, warm, warmup_steps) * cosine


def nice_interval(steps: float) -> int:
    """Round up to 1, 2 or 5 times a power of ten: intervals that read well."""
    if steps <= 1:
        return 1
    power = 10 ** math.floor(math.log10(steps))
    for m in (1, 2, 5, 10):
        if m * power >= steps:
            return int(m * power)
    return int(10 * power)


def nice_interval_below(steps: float) -> int:
    """Round down to 1, 2 or 5 times a power of ten (at least 1)."""
    if steps < 2:
        return 1
    power = 10 ** math.floor(math.log10(steps))
    return int(max(m * power for m in (1, 2, 5) if m * power <= steps))


def planned_steps(cfg: TrainConfig, chunks_per_epoch: int) -> int | None:
    """Steps the step/epoch budgets allow (None with only a time budget)."""
    bounds = []
    if cfg.max_steps:
        bounds.append(cfg.max_steps)
    if cfg.epochs:
        bounds.append(math.ceil(cfg.epochs * chunks_per_epoch))
    return min(bounds) if bounds else None


def auto_eval_every(total_steps: float, steps_per_epoch: float | None = None, eval_steps: float = 0.0) -> int:
    """About AUTO_EVALS evaluations over a run of ``total_steps``; in a run of
    more epochs than that, at least one per epoch instead: a small text overfits
    within a few epochs, and best.pt can only keep a point that was evaluated.
    The per-epoch interval is kept long enough that evaluating costs at most
    EVAL_SHARE of the training time (``eval_steps``: one evaluation's time, in
    training steps; 0 where it is not known)."""
    every = nice_interval(total_steps / AUTO_EVALS)
    if steps_per_epoch:
        every = min(every, max(nice_interval_below(steps_per_epoch), nice_interval(eval_steps / EVAL_SHARE)))
    return max(1, min(MAX_EVAL_EVERY, every))


def auto_eval_chars(val_chars: int, time_limit: float, seconds_per_char: float | None) -> int:
    """Characters each evaluation scores during training: the whole split up to
    AUTO_EVAL_CHARS, and with a time budget no more than one evaluation can do
    in EVAL_BUDGET_SHARE of it."""
    n = min(val_chars, AUTO_EVAL_CHARS)
    if time_limit and seconds_per_char:
        n = min(n, max(MIN_EVAL_CHARS, round(EVAL_BUDGET_SHARE * time_limit / seconds_per_char)))
    return max(2, min(n, val_chars))


class Budget:
    """Which budget ends the run and how far along it is. Reads the config
    live (a resume may change it) and the run's position as given."""

    def __init__(self, cfg: TrainConfig, chunks_per_epoch: int):
        self.cfg = cfg
        self.chunks_per_epoch = max(1, chunks_per_epoch)

    def progress(self, step: int, epochs_done: float, elapsed: float) -> float:
        """0..1 of whichever budget is nearest its end."""
        cfg = self.cfg
        fractions = [0.0]
        if cfg.max_steps:
            fractions.append(step / cfg.max_steps)
        if cfg.epochs:
            fractions.append(epochs_done / cfg.epochs)
        if cfg.time_limit:
            fractions.append(elapsed / cfg.time_limit)
        return max(fractions)

    def ended(self, step: int, epochs_done: float, elapsed: float, reserve: float = 0.0) -> str | None:
        """The budget that is used up (``reserve`` seconds kept for the final
        evaluation under --time-limit), or None."""
        cfg = self.cfg
        if cfg.max_steps and step >= cfg.max_steps:
            return "max_steps"
        if cfg.epochs and epochs_done >= cfg.epochs - 1e-9:
            return "epochs"
        if cfg.time_limit and elapsed + reserve >= cfg.time_limit:
            return "time_limit"
        return None

    def planned_steps(self) -> int | None:
        return planned_steps(self.cfg, self.chunks_per_epoch)

    def spent_message(self, why: str, step: int, elapsed: float, last: str, reserve: float = 0.0) -> str:
        """What to type when a resumed run's budget is already used up. A
        budget is the run's total (steps, epochs, training seconds), not what
        is added on resume."""
        cfg = self.cfg
        if why == "time_limit":
            left = f", and the final evaluation needs about {reserve:.0f}s" if elapsed < cfg.time_limit else ""
            spent = f"--time-limit {cfg.time_limit:g}s; it has trained {elapsed:.0f}s{left}"
            more = f"--time-limit {int(elapsed + reserve + max(60, cfg.time_limit))}s"
        elif why == "epochs":
            spent, more = f"--epochs {cfg.epochs:g}", f"--epochs {2 * cfg.epochs:g}"
        else:
            spent, more = f"--max-steps {cfg.max_steps}", f"--max-steps {max(2 * cfg.max_steps, step + 1)}"
        return (f"this run's budget is already spent ({spent}; it is at step {step:,}). A budget is the "
                f"run's total, so to train further give a larger one: charnn train --resume {shell_arg(last)} {more}")


def patience_note(cfg: TrainConfig, eval_every: int, total_steps: float | None, done_steps: int) -> str | None:
    """A warning when --patience cannot act in the evaluations this run has left."""
    if not cfg.patience or total_steps is None:
        return None
    evals_left = int((total_steps - done_steps) // max(1, eval_every))
    if evals_left > cfg.patience:
        return None
    return (f"--patience {cfg.patience} cannot stop this run: it has about {evals_left} evaluation"
            f"{'' if evals_left == 1 else 's'} left (every {eval_every} steps); "
            f"pass --eval-every {max(1, int((total_steps - done_steps) // (cfg.patience + 2)))} or lower")
