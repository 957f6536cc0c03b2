"""CharRNN: embedding -> stacked recurrent cells -> linear head.

Parameter names are the checkpoint contract: ``embedding.weight``,
``rnn.<torch.nn.LSTM/GRU/RNN names>`` (``rnn.weight_ih_l0`` ...),
``head.weight``, ``head.bias`` -- so the recurrent weights load into a plain
``torch.nn.LSTM`` (or GRU/RNN) unchanged.
"""

from __future__ import annotations

import os
from typing import Union

import torch
from torch import Tensor, nn

from .config import ModelConfig
from ..errors import ConfigError, format_bytes

# LSTM state is (h, c), each (num_layers, B, H); GRU/RNN state is h alone.
State = Union[Tensor, tuple[Tensor, Tensor]]

_CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}
GATE_ROWS = {"lstm": 4, "gru": 3, "rnn": 1}  # rows of W_ih / W_hh per hidden unit
TRAIN_MEMORY_FACTOR = 4  # weights + gradients + AdamW's two moments


# ---------------------------------------------------------------------------
# Sizes from the config alone (nothing allocated)
# ---------------------------------------------------------------------------

def parameter_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The state-dict names and shapes a config implies, computed arithmetically
    (torch's nn.LSTM/GRU/RNN layout), so a checkpoint's declared sizes can be
    checked before any model is built. Call only for a sane ``num_layers``."""
    V, E, H, G = config.vocab_size, config.embedding_dim, config.hidden_size, GATE_ROWS[config.cell]
    shapes: dict[str, tuple[int, ...]] = {"embedding.weight": (V, E)}
    for k in range(config.num_layers):
        shapes[f"rnn.weight_ih_l{k}"] = (G * H, E if k == 0 else H)
        shapes[f"rnn.weight_hh_l{k}"] = (G * H, H)
        shapes[f"rnn.bias_ih_l{k}"] = (G * H,)
        shapes[f"rnn.bias_hh_l{k}"] = (G * H,)
    shapes["head.weight"] = (V, H)
    shapes["head.bias"] = (V,)
    return shapes


def parameter_count(config: ModelConfig) -> int:
    """Number of weights of a CharRNN with this config, without building it."""
    V, E, H, G, L = (config.vocab_size, config.embedding_dim, config.hidden_size, GATE_ROWS[config.cell],
                     config.num_layers)
    per_layer_rest = G * H * (H + H + 2)  # W_ih (input H), W_hh, two biases
    return V * E + G * H * (E + H + 2) + (L - 1) * per_layer_rest + V * H + V


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux MemAvailable, else
    the free physical pages), or None when the system does not say."""
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def describe(config: ModelConfig) -> str:
    """'a 2x320 LSTM'."""
    return f"a {config.num_layers}x{config.hidden_size} {config.cell.upper()}"


def check_memory(config: ModelConfig, factor: int = 1) -> int:
    """The bytes a CharRNN's fp32 weights need; :class:`ConfigError` when
    ``factor`` times that (1 to load, :data:`TRAIN_MEMORY_FACTOR` to train)
    exceeds the memory this machine has free."""
    need = parameter_count(config) * 4
    free = available_memory()
    if free is not None and need * factor > free:
        train = f" (about {TRAIN_MEMORY_FACTOR}x that to train)" if factor == 1 else \
            f", about {format_bytes(need * factor)} to train"
        raise ConfigError(
            f"{describe(config)} needs {format_bytes(need)} for its weights{train}; this machine has "
            f"{format_bytes(free)} free. Choose a smaller --hidden-size, --num-layers or --embedding-dim"
        )
    return need


def build_rnn(config: ModelConfig) -> nn.RNNBase:
    """The bare torch recurrent module a checkpoint's ``rnn.*`` weights fit."""
    kwargs = dict(
        input_size=config.embedding_dim,
        hidden_size=config.hidden_size,
        num_layers=config.num_layers,
        batch_first=True,
        # torch applies this dropout between layers only, never after the last.
        dropout=config.dropout if config.num_layers > 1 else 0.0,
    )
    if config.cell == "rnn":
        kwargs["nonlinearity"] = "tanh"
    return _CELLS[config.cell](**kwargs)


class CharRNN(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config.validate()
        check_memory(config)  # before allocating: a typo'd --hidden-size must not swap the machine to death
        try:
            self.embedding = nn.Embedding(config.vocab_size, config.embedding_dim)
            self.rnn = build_rnn(config)
            self.drop = nn.Dropout(config.dropout)
            self.head = nn.Linear(config.hidden_size, config.vocab_size)
        except RuntimeError as e:  # the allocator's "can't allocate memory" (free memory changed)
            raise ConfigError(
                f"cannot allocate {describe(config)} ({format_bytes(parameter_count(config) * 4)} of "
                f"weights): {str(e).splitlines()[0][:200]}. Choose a smaller model"
            ) from None
        self._init_weights()

    def _init_weights(self) -> None:
        # The embedding keeps torch's N(0, 1) init: a smaller one starves the
        # first layer of input and training sits on the unigram plateau for
        # hundreds of steps (measured: loss 2.22 vs 1.95 after 400 steps).
        if self.config.cell == "lstm":
            # Forget-gate bias 1: start by remembering (Jozefowicz et al. 2015).
            # torch orders the LSTM gates i, f, g, o; both bias vectors add up.
            h = self.config.hidden_size
            for name, param in self.rnn.named_parameters():
                if name.startswith("bias_ih"):
                    with torch.no_grad():
                        param[h : 2 * h].fill_(1.0)
                elif name.startswith("bias_hh"):
                    with torch.no_grad():
                        param[h : 2 * h].zero_()

    @property
    def is_lstm(self) -> bool:
        return self.config.cell == "lstm"

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def init_state(self, batch_size: int, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> State:
        """The all-zero state for ``batch_size`` streams."""
        ref = self.head.weight
        shape = (self.config.num_layers, batch_size, self.config.hidden_size)
        device = ref.device if device is None else device
        dtype = ref.dtype if dtype is None else dtype
        h = torch.zeros(shape, device=device, dtype=dtype)
        return (h, torch.zeros_like(h)) if self.is_lstm else h

    def forward(self, ids: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """ids (B, T) int -> logits (B, T, V), new state."""
        x = self.embedding(ids)  # (B, T, E)
        out, state = self.rnn(x, state)  # (B, T, H)
        logits = self.head(self.drop(out))  # (B, T, V)
        return logits, state


def detach_state(state: State | None) -> State | None:
    """Cut the graph at a chunk boundary (TBPTT): keep the values, drop history."""
    if state is None:
        return None
    if isinstance(state, tuple):
        return tuple(s.detach() for s in state)  # type: ignore[return-value]
    return state.detach()


def select_streams(state: State, index: Tensor | slice) -> State:
    """The state of some streams (dimension 1 of every state tensor)."""
    if isinstance(state, tuple):
        return tuple(s[:, index] for s in state)  # type: ignore[return-value]
    return state[:, index]
