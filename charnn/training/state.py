"""A training run's position in and out of a checkpoint's ``train_state``.

What an exact resume needs besides the weights: the step, the place in the
text, the counters (a :class:`LoopPosition`), the random state, the hidden
state carried between chunks, and the optimizer's and scheduler's state.
:func:`collect` writes them; :func:`restore` reads them back and checks
everything a crafted or damaged checkpoint could put out of range, so such a
file is refused with a clear error instead of training on nonsense.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..errors import CheckpointError, safe_display, shell_arg
from ..model.config import ModelConfig
from ..model.rnn import State
from ..storage import checkpoint as ckpt_mod
from .runtime import DistInfo


@dataclass
class LoopPosition:
    """Where the loop is and what it counted: all a checkpoint carries of it
    besides tensors and the optimizer."""
    step: int = 0
    epoch: int = 0
    chunk: int = 0  # next chunk of the current epoch
    chars_seen: int = 0
    elapsed: float = 0.0  # training seconds, across resumes (a new run's size probe counts)
    best_val: float = math.inf
    evals_without_improvement: int = 0
    nonfinite_skipped: int = 0
    clipped_steps: int = 0
    restores: int = 0
    lr_scale: float = 1.0
    changes: list[str] = field(default_factory=list)  # what each resume changed, oldest first

    def resumed(self, train_state: dict[str, Any], changed: list[str]) -> None:
        """Take a checkpoint's record of earlier resumes and add this one's."""
        earlier = train_state.get("changed_on_resume")
        self.changes = [str(c)[:300] for c in earlier[:100]] if isinstance(earlier, list) else []
        self.changes += [f"at step {train_state.get('step')}: {c}" for c in changed]


POSITION = tuple(f.name for f in fields(LoopPosition) if f.name != "changes")
COUNTS = ("step", "epoch", "chunk", "chars_seen", "evals_without_improvement", "nonfinite_skipped",
          "clipped_steps", "restores")


def collect(pos: LoopPosition, precision: str, device: torch.device, carried: Any) -> dict[str, Any]:
    """The run's train_state, as the checkpoint stores it; ``carried`` is
    :func:`gather_carried`'s."""
    ts: dict[str, Any] = {key: getattr(pos, key) for key in POSITION}
    ts["best_val"] = None if math.isinf(pos.best_val) else pos.best_val
    ts.update({"precision": precision, "device": str(device), "rng_cpu": torch.get_rng_state()})
    if pos.changes:
        ts["changed_on_resume"] = list(pos.changes)
    if device.type == "cuda":
        ts["rng_cuda"] = torch.cuda.get_rng_state(device)
    if carried is not None:
        ts["carried_state"] = carried
    return ts


def gather_carried(state: State | None, dist_info: DistInfo) -> Any:
    """The carried state of all streams (every rank's share), on the CPU.
    Collective under DDP."""
    if state is None:
        return None
    parts = state if isinstance(state, tuple) else (state,)
    out = []
    for x in parts:
        x = x.detach().float()
        if dist_info.enabled:
            pieces = [torch.empty_like(x) for _ in range(dist_info.world_size)]
            dist.all_gather(pieces, x.contiguous())
            x = torch.cat(pieces, dim=1)
        out.append(x.cpu())
    return tuple(out) if isinstance(state, tuple) else out[0]


def damaged(resumed: ckpt_mod.Checkpoint, why: str) -> CheckpointError:
    """The error for a checkpoint whose training state cannot be resumed."""
    return CheckpointError(f"{safe_display(resumed.path, None)}: its training state is damaged ({why}); it cannot "
                           f"be resumed. --init-from {shell_arg(resumed.path)} starts a new run from its weights")


def recorded_precision(resumed: ckpt_mod.Checkpoint) -> str | None:
    """The precision a resumed run's steps ran in (None in a file that does
    not say); a CheckpointError where the file says something else."""
    recorded = resumed.train_state.get("precision")
    if recorded is not None and not (isinstance(recorded, str) and recorded in ("fp32", "bf16", "fp16")):
        raise damaged(resumed, "train_state.precision is not fp32, bf16 or fp16")
    return recorded


def restore(resumed: ckpt_mod.Checkpoint, pos: LoopPosition, optimizer: torch.optim.Optimizer,
            scheduler: Any, *, chunks: int, batch_size: int, device: torch.device) -> State | None:
    """Put ``resumed``'s position and counters into ``pos``, its optimizer
    and scheduler state into those, and its random state back; a
    CheckpointError that says what to do when the file cannot be resumed.
    Returns the carried hidden state of all streams (on ``device``) where the
    run stopped inside an epoch. ``chunks``: the batcher's chunks per epoch."""
    ts = resumed.train_state
    data = resumed.data
    if "optimizer_state" not in data or "step" not in ts:
        last = Path(resumed.path).with_name("last.pt")
        hint = (f"resume from {last}, which carries it" if last.exists() and last != Path(resumed.path)
                else f"use --init-from {shell_arg(resumed.path)} to start a new run from its weights")
        raise CheckpointError(f"{resumed.path} holds the model for sampling and evaluation, without the "
                              f"optimizer state an exact resume needs; {hint}")
    try:
        optimizer.load_state_dict(data["optimizer_state"])
        if "scheduler_state" in data:
            scheduler.load_state_dict(data["scheduler_state"])
        for key in POSITION:
            if ts.get(key) is not None:
                setattr(pos, key, type(getattr(pos, key))(ts[key]))
        check(pos, optimizer, scheduler, ts.get("carried_state"), chunks=chunks, batch_size=batch_size,
              model_config=resumed.model_config)
        if "rng_cpu" in ts:
            torch.set_rng_state(ts["rng_cpu"])
    except (ValueError, TypeError, KeyError, RuntimeError, IndexError, OverflowError, AttributeError) as e:
        why = str(e).splitlines()[0][:160] if isinstance(e, ValueError) and str(e) else type(e).__name__
        raise damaged(resumed, why) from None
    if "rng_cuda" in ts and torch.cuda.is_available() and device.type == "cuda":
        torch.cuda.set_rng_state(ts["rng_cuda"].cpu(), device)
    carried = ts.get("carried_state")
    if carried is None or pos.chunk == 0:
        return None
    if isinstance(carried, (list, tuple)):
        return tuple(x.to(device) for x in carried)  # type: ignore[return-value]
    return carried.to(device)


# AdamW's switches a checkpoint records; a resumed run keeps them.
FLAGS = ("fused", "foreach", "capturable", "differentiable", "maximize", "amsgrad", "decoupled_weight_decay")


def check(pos: LoopPosition, optimizer: torch.optim.Optimizer, scheduler: Any, carried: Any, *,
          chunks: int, batch_size: int, model_config: ModelConfig) -> None:
    """What a crafted or damaged checkpoint could put out of range: the
    position, the counters, the optimizer's and scheduler's state, the
    carried hidden state. A ValueError names the first problem."""
    for key in COUNTS:
        if not 0 <= getattr(pos, key) < 2 ** 62:
            raise ValueError(f"train_state.{key} is out of range")
    if pos.chunk > chunks:
        raise ValueError("train_state.chunk lies beyond the data")
    if not (math.isfinite(pos.elapsed) and pos.elapsed >= 0):
        raise ValueError("train_state.elapsed is not a finite number of seconds")
    if not (math.isinf(pos.best_val) or math.isfinite(pos.best_val)) or pos.best_val == -math.inf:
        raise ValueError("train_state.best_val is not a finite loss")
    if not (math.isfinite(pos.lr_scale) and 0 < pos.lr_scale <= 1):
        raise ValueError("train_state.lr_scale is out of range")
    for group in optimizer.param_groups:
        for key in ("lr", "weight_decay", "eps"):
            value = group.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0:
                raise ValueError(f"optimizer_state: {key} is not a non-negative number")
        for key in FLAGS:
            if group.get(key) is not None and not isinstance(group[key], bool):
                raise ValueError(f"optimizer_state: {key} is not true or false")
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if key in ("exp_avg", "exp_avg_sq") and (not torch.is_tensor(value) or value.shape != p.shape):
                    raise ValueError(f"optimizer_state: {key} does not match the model's weights")
    lrs = scheduler.base_lrs
    if len(lrs) != len(optimizer.param_groups) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in lrs):
        raise ValueError("scheduler_state: base_lrs are not numbers")
    if carried is None:
        return
    mc = model_config
    expected = (mc.num_layers, batch_size, mc.hidden_size)
    parts = carried if isinstance(carried, (list, tuple)) else (carried,)
    if len(parts) != (2 if mc.cell == "lstm" else 1) or any(
            not torch.is_tensor(x) or tuple(x.shape) != expected or not x.is_floating_point()
            or not bool(torch.isfinite(x).all()) for x in parts):
        raise ValueError(f"train_state.carried_state is not the hidden state of this model "
                         f"({len(parts)} x {[tuple(getattr(x, 'shape', ())) for x in parts][:2]}, "
                         f"expected {expected})")
