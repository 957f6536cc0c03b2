"""A model's loss on a stream of token ids: what training's validation and
``charnn eval`` both report.

The figure is defined as what a single stream gives when it reads the whole
text from a zero state and carries its state to the end. For speed the text is
scored as S segments side by side; each segment's stream first reads the
``burn_in`` characters before it (unscored) so its state is what the single
stream would have there -- an LSTM's memory of text that far back is
negligible, which the tests check against the single-stream figure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import NonFiniteError
from ..text.data import IGNORE_INDEX
from .rnn import CharRNN, detach_state

LN2 = math.log(2.0)
NONFINITE_MESSAGE = ("the model produced non-finite values (inf or NaN) while scoring the text; the "
                     "checkpoint's weights are out of range -- use an earlier checkpoint")


def _check_finite(logits: torch.Tensor) -> None:
    """One reduction per chunk: finite weights can still overflow to inf and
    then NaN, which would otherwise come out as a NaN score."""
    if not bool(torch.isfinite(logits).all()):
        raise NonFiniteError(NONFINITE_MESSAGE)


@dataclass
class EvalResult:
    chars: int  # characters scored (every character after the first)
    loss: float  # mean negative log-likelihood, nats per character

    @property
    def bpc(self) -> float:
        return self.loss / LN2

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0))

    def to_dict(self) -> dict[str, float | int]:
        return {"chars": self.chars, "loss": self.loss, "bpc": self.bpc, "perplexity": self.perplexity}


def _segments(n_targets: int, max_streams: int, burn_in: int) -> list[tuple[int, int, int]]:
    """(read_from, score_from, end) per stream, in target positions."""
    streams = max(1, min(max_streams, n_targets // max(1, 8 * burn_in)))
    bounds = np.linspace(0, n_targets, streams + 1).round().astype(int)
    return [(max(0, a - burn_in), a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


@torch.inference_mode()
def token_losses(model: CharRNN, ids: np.ndarray | torch.Tensor, *, max_streams: int = 64,
                 burn_in: int = 256, chunk_len: int = 256, device: str | torch.device | None = None,
                 autocast_dtype: torch.dtype | None = None, check_finite: bool = True) -> torch.Tensor:
    """Per-character negative log-likelihood (nats) of ``ids[1:]`` given the
    characters before each, as a float32 CPU tensor of length ``len(ids) - 1``.

    Logits that overflow to inf/NaN raise :class:`NonFiniteError`; with
    ``check_finite=False`` (a trainer with its own NaN guard) they give NaN losses."""
    ids = torch.as_tensor(np.asarray(ids, dtype=np.int64))
    n_targets = len(ids) - 1
    if n_targets < 1:
        return torch.zeros(0)
    device = torch.device(device) if device is not None else model.head.weight.device
    was_training = model.training
    model.eval()
    try:
        segs = _segments(n_targets, max_streams, burn_in)
        S = len(segs)
        width = max(end - start for start, _, end in segs)
        x = torch.zeros(S, width, dtype=torch.long)  # (S, W) inputs
        y = torch.full((S, width), IGNORE_INDEX, dtype=torch.long)  # (S, W) scored targets
        where = torch.full((S, width), -1, dtype=torch.long)  # target position of each slot
        for s, (start, score_from, end) in enumerate(segs):
            n = end - start
            x[s, :n] = ids[start:end]
            skip = score_from - start
            y[s, skip:n] = ids[score_from + 1 : end + 1]
            where[s, skip:n] = torch.arange(score_from, end)
        out = torch.zeros(n_targets, dtype=torch.float32)
        state = None
        for lo in range(0, width, chunk_len):
            xb = x[:, lo : lo + chunk_len].to(device)
            yb = y[:, lo : lo + chunk_len].to(device)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                logits, state = model(xb, state)  # (S, T, V)
            if check_finite:
                _check_finite(logits)
            # Flattened, not transposed: with the classes strided the loss took
            # 4x longer on a 100,000-character vocabulary.
            nll = F.cross_entropy(logits.float().flatten(0, 1), yb.flatten(), ignore_index=IGNORE_INDEX,
                                  reduction="none").view(yb.shape)  # (S, T)
            w = where[:, lo : lo + chunk_len]
            mask = w >= 0
            out[w[mask]] = nll.cpu()[mask]
            state = detach_state(state)
        return out
    finally:
        model.train(was_training)


def evaluate_ids(model: CharRNN, ids: np.ndarray | torch.Tensor, **kwargs) -> EvalResult:
    """Mean loss over every character of ``ids`` after the first."""
    losses = token_losses(model, ids, **kwargs)
    if len(losses) == 0:
        return EvalResult(chars=0, loss=float("nan"))
    return EvalResult(chars=len(losses), loss=float(losses.double().mean()))
