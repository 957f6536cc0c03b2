"""What a training run decides for itself, kept apart from the user's options.

:class:`~charnn.training.config.TrainConfig` holds the options as given (or as
a resumed run recorded them) and is frozen once validated. A :class:`RunPlan`
holds what the run works out: where it writes, which text it read, why the
model has its size, the reading order, the evaluation interval and slice, and
the time spent before the first step. It starts from the options (a value
given, or recorded by an earlier part of the run, stands) and the checkpoint
records it in ``train_config`` -- the options with the plan filled in, the
keys they have always had -- so a resumed run reads it back as its options.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from .config import TrainConfig


@dataclass
class RunPlan:
    out: str = ""  # the output folder
    corpus_hash: str = ""  # sha256 of the normalised text
    corpus_name: str = ""  # short name of the text, for the default output folder
    size_reason: str = ""  # --size auto's one-line why ("" for a shape given)
    shuffle: bool | None = None  # the reading order: shuffled blocks, or each stream in order
    eval_every: int | None = None  # steps between evaluations (None: still to choose)
    eval_chars: int | None = None  # validation characters each evaluation scores (None: still to choose)
    # The part of a --time-limit a new run spent before its first step (the
    # size probe, timing the evaluation): the budget includes it, the warmup
    # counts from after it.
    setup_seconds: float = 0.0
    base: str = "none"  # what a new run started from: a base's name, a checkpoint's file name, or "none"
    base_reason: str = ""  # --base's one-line why

    @classmethod
    def of(cls, cfg: TrainConfig) -> "RunPlan":
        """The plan as the options leave it: what they fix is decided."""
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls)})

    def record(self, cfg: TrainConfig) -> dict[str, Any]:
        """The checkpoint's ``train_config``: the options with the plan filled in."""
        return {**cfg.to_dict(), **asdict(self)}
