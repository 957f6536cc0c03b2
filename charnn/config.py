"""Typed configuration: the model's shape and the training options.

Field names are PyTorch's own; CLI flags are the same names in kebab-case.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .errors import ConfigError

CELLS = ("lstm", "gru", "rnn")


@dataclass
class ModelConfig:
    cell: str = "lstm"  # lstm | gru | rnn (tanh)
    vocab_size: int = 0  # set from the tokenizer
    # Defaults chosen by measurement for a laptop's budget (5 minutes on 2 CPU
    # cores; see the README): on War and Peace 2x320 beat 2x256, 2x384 and 2x512.
    embedding_dim: int = 128  # beat 64 (1.85 vs 1.95 nats after 400 steps)
    hidden_size: int = 320  # width of each recurrent layer
    num_layers: int = 2  # stacked recurrent layers
    dropout: float = 0.1  # between layers and before the head

    def validate(self) -> "ModelConfig":
        if self.cell not in CELLS:
            raise ConfigError(f"unknown cell {self.cell!r}; choose one of {', '.join(CELLS)}")
        for name in ("vocab_size", "embedding_dim", "hidden_size", "num_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        dropout = self.dropout
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout must be a number in [0, 1), got {dropout!r}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        missing = known - set(data)
        if missing:
            raise ConfigError(f"model config lacks {', '.join(sorted(missing))}")
        return cls(**{k: data[k] for k in known}).validate()


@dataclass
class TrainConfig:
    corpus: list[str] = field(default_factory=list)  # files/dirs; empty = built-in corpus
    corpus_hash: str = ""  # sha256 of the normalised text, filled in by the trainer
    corpus_name: str = ""  # short name, used for the default output folder
    val_fraction: float = 0.1  # the last part of the text held out, contiguous
    # Many small steps beat few big ones at this budget: 16 x 64 reached 1.273
    # nats/char in 5 minutes where 32 x 128 reached 1.341 (2x256: 1.291 vs 1.341).
    seq_len: int = 64  # TBPTT chunk length
    batch_size: int = 16  # contiguous streams trained side by side
    lr: float = 7e-3  # AdamW peak learning rate (2e-3 .. 1.2e-2 tried; 7e-3 .. 1e-2 best)
    weight_decay: float = 0.01  # AdamW decoupled weight decay (not on biases/embeddings)
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0  # max global L2 norm of the gradients (0 = off)
    warmup_steps: int = 100  # linear warmup before cosine decay
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    max_steps: int = 0  # 0 = no step budget
    epochs: float = 0.0  # 0 = no epoch budget
    time_limit: float = 0.0  # seconds of training, 0 = no time budget
    eval_every: int = 1000  # steps between evaluations and checkpoints
    log_every: int = 10  # steps between progress updates / log rows
    patience: int = 0  # stop after this many evaluations without improvement (0 = off)
    keep: int = 0  # also keep the last N step-numbered checkpoints (0 = none)
    sample_every: int = 1  # preview a sample at every Nth evaluation (0 = off)
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | mps
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    nan_tolerance: int = 3  # consecutive non-finite steps before restoring the last good state
    encoding: str = "utf-8"  # of the corpus files
    out: str = ""  # output folder

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["betas"] = list(self.betas)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        if "betas" in kwargs:
            kwargs["betas"] = tuple(kwargs["betas"])
        return cls(**kwargs)
