"""A training run's position in and out of a checkpoint's ``train_state``.

What an exact resume needs besides the weights: the step, the place in the
text, the counters, the random state, the hidden state carried between
chunks, and the optimizer's and scheduler's state. :func:`collect` writes
them; :func:`restore` reads them back into a :class:`~charnn.train.Trainer`
and checks everything a crafted or damaged checkpoint could put out of range,
so such a file is refused with a clear error instead of training on nonsense.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from ..storage import checkpoint as ckpt_mod
from ..errors import CheckpointError, safe_display, shell_arg
from ..model.rnn import State, select_streams

if TYPE_CHECKING:  # the trainer imports this module
    from .trainer import Trainer

# The trainer's attributes a checkpoint carries, restored with their own type.
POSITION = ("step", "epoch", "chunk", "chars_seen", "elapsed", "best_val", "evals_without_improvement",
            "nonfinite_skipped", "clipped_steps", "restores", "lr_scale")
COUNTS = ("step", "epoch", "chunk", "chars_seen", "evals_without_improvement", "nonfinite_skipped",
          "clipped_steps", "restores")


def collect(t: Trainer) -> dict[str, Any]:
    """The run's train_state, as the checkpoint stores it. Collective under
    DDP (every rank's share of the carried state is gathered)."""
    ts: dict[str, Any] = {
        "step": t.step, "epoch": t.epoch, "chunk": t.chunk,
        "chars_seen": t.chars_seen, "elapsed": t.elapsed,
        "best_val": None if math.isinf(t.best_val) else t.best_val,
        "evals_without_improvement": t.evals_without_improvement,
        "nonfinite_skipped": t.nonfinite_skipped, "clipped_steps": t.clipped_steps,
        "restores": t.restores, "lr_scale": t.lr_scale,
        "precision": t.precision, "device": str(t.device),
        "rng_cpu": torch.get_rng_state(),
    }
    if t.changed or t._earlier_changes:  # every resume's changes, oldest first
        ts["changed_on_resume"] = t._earlier_changes + [f"at step {t._resumed_at}: {c}" for c in t.changed]
    if t.device.type == "cuda":
        ts["rng_cuda"] = torch.cuda.get_rng_state(t.device)
    if t.state is not None:
        ts["carried_state"] = gather_carried(t)
    return ts


def gather_carried(t: Trainer) -> Any:
    """The carried state of all streams (every rank's share), on the CPU."""
    parts = t.state if isinstance(t.state, tuple) else (t.state,)
    out = []
    for x in parts:
        x = x.detach().float()
        if t.dist.enabled:
            pieces = [torch.empty_like(x) for _ in range(t.dist.world_size)]
            dist.all_gather(pieces, x.contiguous())
            x = torch.cat(pieces, dim=1)
        out.append(x.cpu())
    return tuple(out) if isinstance(t.state, tuple) else out[0]


def restore(t: Trainer, resumed: ckpt_mod.Checkpoint) -> None:
    """Put ``resumed``'s position, counters, optimizer and scheduler state,
    random state and carried hidden state back into ``t``; a CheckpointError
    that says what to do when the file cannot be resumed."""
    ts = resumed.train_state
    data = resumed.data
    if "optimizer_state" not in data or "step" not in ts:
        last = Path(resumed.path).with_name("last.pt")
        hint = (f"resume from {last}, which carries it" if last.exists() and last != Path(resumed.path)
                else f"use --init-from {shell_arg(resumed.path)} to start a new run from its weights")
        raise CheckpointError(f"{resumed.path} holds the model for sampling and evaluation, without the "
                              f"optimizer state an exact resume needs; {hint}")
    try:
        t.optimizer.load_state_dict(data["optimizer_state"])
        if "scheduler_state" in data:
            t.scheduler.load_state_dict(data["scheduler_state"])
        for key in POSITION:
            if ts.get(key) is not None:
                setattr(t, key, type(getattr(t, key))(ts[key]))
        check(t, ts.get("carried_state"))
        if "rng_cpu" in ts:
            torch.set_rng_state(ts["rng_cpu"])
    except (ValueError, TypeError, KeyError, RuntimeError, IndexError, OverflowError, AttributeError) as e:
        why = str(e).splitlines()[0][:160] if isinstance(e, ValueError) and str(e) else type(e).__name__
        raise CheckpointError(f"{safe_display(resumed.path, None)}: its training state is damaged ({why}); "
                              f"it cannot be resumed. --init-from {shell_arg(resumed.path)} starts a new run "
                              "from its weights") from None
    t.metrics = list(resumed.metrics)
    if "rng_cuda" in ts and torch.cuda.is_available() and t.device.type == "cuda":
        torch.cuda.set_rng_state(ts["rng_cuda"].cpu(), t.device)
    carried = ts.get("carried_state")
    if carried is not None and t.chunk > 0:
        if isinstance(carried, (list, tuple)):
            full: State = tuple(x.to(t.device) for x in carried)  # type: ignore[assignment]
        else:
            full = carried.to(t.device)
        t.state = select_streams(full, t.rows)


def check(t: Trainer, carried: Any) -> None:
    """What a crafted or damaged checkpoint could put out of range: the
    position, the counters, the optimizer's and scheduler's state, the
    carried hidden state. A ValueError names the first problem."""
    for key in COUNTS:
        if not 0 <= getattr(t, key) < 2 ** 62:
            raise ValueError(f"train_state.{key} is out of range")
    if t.chunk > len(t.batcher):
        raise ValueError("train_state.chunk lies beyond the data")
    if not (math.isfinite(t.elapsed) and t.elapsed >= 0):
        raise ValueError("train_state.elapsed is not a finite number of seconds")
    if not (math.isinf(t.best_val) or math.isfinite(t.best_val)) or t.best_val == -math.inf:
        raise ValueError("train_state.best_val is not a finite loss")
    if not (math.isfinite(t.lr_scale) and 0 < t.lr_scale <= 1):
        raise ValueError("train_state.lr_scale is out of range")
    for group in t.optimizer.param_groups:
        for key in ("lr", "weight_decay", "eps"):
            value = group.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0:
                raise ValueError(f"optimizer_state: {key} is not a non-negative number")
        for p in group["params"]:
            for key, value in t.optimizer.state.get(p, {}).items():
                if key in ("exp_avg", "exp_avg_sq") and (not torch.is_tensor(value) or value.shape != p.shape):
                    raise ValueError(f"optimizer_state: {key} does not match the model's weights")
    lrs = t.scheduler.base_lrs
    if len(lrs) != len(t.optimizer.param_groups) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in lrs):
        raise ValueError("scheduler_state: base_lrs are not numbers")
    if carried is None:
        return
    mc = t.model.config
    expected = (mc.num_layers, t.cfg.batch_size, mc.hidden_size)
    parts = carried if isinstance(carried, (list, tuple)) else (carried,)
    if len(parts) != (2 if mc.cell == "lstm" else 1) or any(
            not torch.is_tensor(x) or tuple(x.shape) != expected or not x.is_floating_point()
            or not bool(torch.isfinite(x).all()) for x in parts):
        raise ValueError(f"train_state.carried_state is not the hidden state of this model "
                         f"({len(parts)} x {[tuple(getattr(x, 'shape', ())) for x in parts][:2]}, "
                         f"expected {expected})")
