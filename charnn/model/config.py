"""The model's shape: cell, vocabulary, widths, depth, dropout.

Field names are PyTorch's own; CLI flags are the same names in kebab-case.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from ..errors import ConfigError

CELLS = ("lstm", "gru", "rnn")


@dataclass
class ModelConfig:
    cell: str = "lstm"  # lstm | gru | rnn (tanh)
    vocab_size: int = 0  # set from the tokenizer
    # --size fixed's shape: in 5-minute races on War and Peace (2 CPU cores;
    # docs/training.md, "Why this model size") 2x320 beat 2x256, 2x384, 2x512.
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
