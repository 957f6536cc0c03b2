"""What a new run chooses before its first step where the user left it open:
the model's shape and dropout (``--size auto``) and the reading order (in
order, or shuffled blocks).

The rules themselves are in :mod:`charnn.model.sizing`; this module feeds them this
run's facts. A time budget is turned into steps per candidate shape by timing
a few training steps of each on this device. Under torchrun rank 0's size
choice holds for every rank; the order follows from it, so all ranks agree.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from ..model import sizing
from ..model.config import ModelConfig
from ..model.precision import autocast_precision
from .config import TrainConfig
from ..errors import ConfigError
from ..model.rnn import TRAIN_MEMORY_FACTOR, CharRNN, check_memory
from .runtime import DistInfo, rank0_values
from .step import agree


@dataclass
class ProbeSetup:
    """What timing a candidate shape needs: this rank's share of the first
    batch, where and how training runs, and how the run builds its optimizer."""

    x: torch.Tensor
    y: torch.Tensor
    device: torch.device
    precision: str
    make_optimizer: Callable[[torch.nn.Module], Any]


# Before a shape's full timing (a warmup step and three timed ones), a glance:
# a warm step on this fraction of the batch's rows and one on twice as many,
# extended along the line through them to the whole batch (a small model's
# step costs about the same at any number of rows, so scaling one small step
# by the rows would count it several times over). Cheap enough that a
# 100,000-character head cannot spend the budget on the probe itself.
GLANCE_ROWS = 8
PROBE_TIMINGS = ({"warmup": 1, "steps": 3}, {"warmup": 1, "steps": 1})  # full, then short


def glance_step_time(shape: sizing.Shape, cell: str, dropout: float, vocab_size: int, probe: ProbeSetup) -> float:
    """A quick estimate of the seconds per full-batch step of ``shape``."""
    rows = probe.x.shape[0]
    r = max(1, rows // GLANCE_ROWS)

    def step(n: int) -> float:
        part = ProbeSetup(probe.x[:n], probe.y[:n], probe.device, probe.precision, probe.make_optimizer)
        return probe_step_time(shape, cell, dropout, vocab_size, part, steps=1, warmup=1)

    if 2 * r >= rows:
        return step(rows)
    one, two = step(r), step(2 * r)
    return two + max(0.0, two - one) * (rows - 2 * r) / r


def probe_step_time(shape: sizing.Shape, cell: str, dropout: float, vocab_size: int, probe: ProbeSetup,
                    **timing: Any) -> float:
    """Seconds per training step of a throwaway model of ``shape``. ``dropout``:
    the one given, else 0, the rule's choice wherever the shape is in doubt
    (under 3 epochs); a step with dropout 0.1 takes 3-13% longer (measured on
    2x128 and 2x192), so timing with it would under-count the steps of a
    run without it."""
    mc = ModelConfig(cell=cell, vocab_size=vocab_size, hidden_size=shape.hidden_size,
                     num_layers=shape.num_layers, embedding_dim=shape.embedding_dim, dropout=dropout)
    check_memory(mc.validate(), factor=TRAIN_MEMORY_FACTOR)
    return sizing.time_training_steps(CharRNN(mc), probe.make_optimizer, probe.x, probe.y, probe.device,
                                      probe.precision, **timing)


def average_gradients(model: torch.nn.Module, world_size: int) -> None:
    """What DDP does each step: the gradients copied into one buffer, summed
    over the ranks (which waits for the slowest) and copied back."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()


def warm_up(overrides: dict[str, Any], vocab_size: int, probe: ProbeSetup) -> None:
    """A process's first training step sets torch up (thread pools, kernels,
    the compiler's modules its first optimizer loads: about 2 s on a 2-core
    CPU), whatever the model's size. Paid on a tiny model before the clock of
    the timings (precision, --size auto) starts, it neither inflates the first
    timing nor counts against --time-limit, which does not cover starting torch."""
    cell = overrides.get("cell") or ModelConfig.cell
    tiny = ProbeSetup(probe.x[:1, :4], probe.y[:1, :4], probe.device, probe.precision, probe.make_optimizer)
    probe_step_time(sizing.Shape(8, 2, 8), cell, overrides.get("dropout") or 0.0, vocab_size, tiny,
                    steps=1, warmup=0)


# bf16 autocast on a CPU with native bf16 products: with AMX a 2x512 step at
# 64 x 128 ran 3.2x as fast as in fp32; with AVX512-BF16 alone (a Xeon without
# AMX) a step took 0.99-2.0x fp32's time, slower in 11 of 12 shapes and
# batches from 2x128 to 2x512 and 16 x 64 to 64 x 128 (bench_precision.py).
# The CPU's flags are a guess, so a --time-limit run that leaves --precision
# open there times both, and takes bf16 only when it is clearly faster:
# fp32's numbers are the exact ones.
BF16_SHARE = 0.95  # bf16 when its step takes at most this share of fp32's
PRECISION_TIMING = {"warmup": 1, "steps": 1}  # per precision and round
CLOSE_CALL = 1.25  # a second round where the two are within this factor
# The timing may take this share of a --time-limit; where a glance says it
# would take more (a huge vocabulary, a short budget), the CPU's flags decide.
PRECISION_SHARE = 0.03


def choose_precision(shape: sizing.Shape, cell: str, dropout: float, vocab_size: int, probe: ProbeSetup,
                     dist_info: DistInfo, time_limit: float) -> tuple[str, str]:
    """(precision, why) for a run on a CPU with native bf16: a step of
    ``shape`` timed in fp32 and in bf16 on the run's first batch, in at most
    :data:`PRECISION_SHARE` of ``time_limit`` (else the CPU's flags decide),
    rank 0's figures deciding under torchrun."""
    def rank0(*values: float) -> list[float]:
        return rank0_values(dist_info, probe.device, *values)

    started, share = time.perf_counter(), PRECISION_SHARE * time_limit

    def too_long(step: float) -> bool:  # what is spent, and two more steps in each precision (and a margin)
        return rank0(time.perf_counter() - started + 5 * step)[0] > share

    def by_flags(seen: str) -> tuple[str, str]:
        chosen = autocast_precision("auto", probe.device)
        return chosen, (f"{chosen}, by the CPU's flags: timing a {shape.name} step in both precisions would "
                        f"take more than {PRECISION_SHARE:.0%} of the budget ({seen})")

    # A glance in two parts, each cheap enough to stop after: one cold step on
    # a slice of the rows (a huge vocabulary makes even that slow), then the
    # probe's estimate of the whole batch.
    fp32_probe = ProbeSetup(probe.x, probe.y, probe.device, "fp32", probe.make_optimizer)
    part = max(1, probe.x.shape[0] // GLANCE_ROWS)
    first = probe_step_time(shape, cell, dropout, vocab_size,
                            ProbeSetup(probe.x[:part], probe.y[:part], probe.device, "fp32", probe.make_optimizer),
                            steps=1, warmup=0)
    if too_long(first):
        return by_flags(f"one step on {part} of its {probe.x.shape[0]} rows took {rank0(first)[0] * 1000:.0f} ms")
    estimate = rank0(glance_step_time(shape, cell, dropout, vocab_size, fp32_probe))[0]
    if too_long(estimate):
        return by_flags(f"a step takes about {estimate * 1000:.0f} ms here")
    best = {"fp32": math.inf, "bf16": math.inf}
    for _ in range(2):
        for precision in best:
            setup = ProbeSetup(probe.x, probe.y, probe.device, precision, probe.make_optimizer)
            best[precision] = min(best[precision],
                                  probe_step_time(shape, cell, dropout, vocab_size, setup, **PRECISION_TIMING))
        fp32, bf16 = rank0(best["fp32"], best["bf16"])
        if max(fp32, bf16) > CLOSE_CALL * min(fp32, bf16) or too_long((fp32 + bf16) / 2):
            break
    chosen = "bf16" if bf16 <= BF16_SHARE * fp32 else "fp32"
    return chosen, (f"{chosen}: a {shape.name} step takes {fp32 * 1000:.0f} ms in fp32 and {bf16 * 1000:.0f} ms "
                    "in bf16 on this CPU")


def choose_size(cfg: TrainConfig, overrides: dict[str, Any], *, planned_steps: int | None, train_chars: int,
                vocab_size: int, probe: ProbeSetup, dist_info: DistInfo,
                status: Callable[[str], None]) -> sizing.SizeChoice:
    """``--size auto``: the shape and dropout for this text and budget.
    ``planned_steps``: what --max-steps and --epochs allow (None: only time)."""
    cell = overrides.get("cell") or ModelConfig.cell
    given = {k: overrides.get(k) for k in ("hidden_size", "num_layers", "embedding_dim", "dropout")}
    timings: dict[sizing.Shape, float] = {}
    # Under torchrun the ranks must time the same shapes in the same order (a
    # full timing averages gradients, a collective) and plan with the same
    # figures: rank 0's decide, and a shape too big for any rank's memory is out.
    def rank0(value: float) -> float:
        return rank0_values(dist_info, probe.device, value)[0]

    def on_every_rank(flag: bool) -> bool:
        return not agree(dist_info, not flag, probe.device)

    sync = (lambda m: average_gradients(m, dist_info.world_size)) if dist_info.enabled else None
    dropout = given["dropout"] or 0.0
    started = time.perf_counter()
    share = sizing.PROBE_SHARE * cfg.time_limit

    def step_time(shape: sizing.Shape) -> float:
        if shape not in timings:
            status(f"timing a {shape.name} model on this device (--size auto)")
            timings[shape] = rank0(measure(shape))
        return timings[shape]

    def measure(shape: sizing.Shape) -> float:
        mc = ModelConfig(cell=cell, vocab_size=vocab_size, hidden_size=shape.hidden_size,
                         num_layers=shape.num_layers, embedding_dim=shape.embedding_dim, dropout=dropout)
        try:
            check_memory(mc.validate(), factor=TRAIN_MEMORY_FACTOR)
            fits = True
        except ConfigError:
            fits = False
        if not on_every_rank(fits):  # too big for this machine's memory: it buys no steps
            return math.inf
        estimate = sizing.scaled_step_time(shape, timings, vocab_size, cell)
        if estimate is None:
            estimate = glance_step_time(shape, cell, dropout, vocab_size, probe)
        # The full timing runs where its predicted cost fits what is left of
        # the probe's share, else a short one (a warm-up step and one timed,
        # for a machine busy enough to slow the glance); where neither fits,
        # the estimate stands.
        left = share - (time.perf_counter() - started)
        timing = next((t for t in PROBE_TIMINGS if rank0(sum(t.values()) * estimate <= left)), None)
        if timing is None:
            return estimate
        return probe_step_time(shape, cell, dropout, vocab_size, probe, sync=sync, **timing)

    seconds = sizing.training_seconds(cfg.time_limit) if cfg.time_limit else None
    choice = sizing.choose(train_chars=train_chars, vocab_size=vocab_size,
                           tokens_per_step=cfg.batch_size * cfg.seq_len, cell=cell, steps=planned_steps,
                           seconds=seconds, step_time=step_time if seconds else None, given=given)
    if seconds and choice.steps == 0 and math.isfinite(timings.get(choice.shape, math.inf)):
        step = timings[choice.shape]
        tokens = cfg.batch_size * cfg.seq_len
        raise ConfigError(
            f"--time-limit {cfg.time_limit:g}s is too short to train: one training step of the smallest model "
            f"({choice.shape.name}) on {vocab_size:,} distinct characters takes about {step:.1f}s here, "
            f"with {cfg.batch_size} x {cfg.seq_len} = {tokens:,} characters per step; give at least "
            f"{math.ceil(10 * step / sizing.TRAINING_SHARE + cfg.time_limit)}s, or make each step "
            f"smaller with --batch-size or --seq-len")
    if dist_info.enabled:
        shared = [choice]
        dist.broadcast_object_list(shared, src=0)
        choice = shared[0]
    return choice


def choose_order(cfg: TrainConfig, *, epochs: float | None, planned_steps: int | None,
                 train_chars: int) -> tuple[bool, str]:
    """Whether a new run reads shuffled blocks (:func:`charnn.model.sizing.choose_order`),
    and why. ``epochs`` is what --size auto estimated; for a shape given (or
    --init-from) it comes from ``planned_steps`` (--max-steps/--epochs). A
    given shape with only a time budget is not timed for this (the probe
    would eat a short budget), so its epochs are not known and it reads
    shuffled."""
    if epochs is None and planned_steps is not None:
        epochs = planned_steps * cfg.batch_size * cfg.seq_len / max(train_chars, 1)
    return sizing.choose_order(epochs)
