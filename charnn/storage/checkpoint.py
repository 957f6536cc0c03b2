"""The checkpoint: one self-describing file shared by every command.

A ``torch.save`` of plain containers and tensors only, read back with
``torch.load(..., weights_only=True)`` so a malicious file cannot run code.
Writes are atomic: a temporary file in the same folder, then ``os.replace``.
See docs/checkpoints.md for the keys; reading an untrusted file is untrusted.py's job.
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..errors import CharnnError, CheckpointError, ConfigError, safe_display
from ..model.config import ModelConfig
from ..model.rnn import CharRNN, parameter_shapes
from ..safe_files import TMP_PREFIX, serialize, write_atomic  # noqa: F401 (TMP_PREFIX re-exported)
from ..text.tokenizer import CharTokenizer
from .untrusted import (  # noqa: F401
    FLOAT_DTYPES,
    MAX_KEY_CHARS,
    MAX_METRIC_ROWS,
    MAX_PICKLE_BYTES,
    MAX_VOCAB,
    VOCAB_DTYPE,
    WalkBudget,
    check_plain,
    check_tensor,
    read_payload,
    untrusted,
)

FORMAT = "charnn-checkpoint"
# 2: the vocabulary is an int32 tensor of code points (1: a list of one-character
# strings, which put 100k characters past the object-pickle cap); files of
# format 1 load through _vocab_chars. A charnn that reads only format 1 refuses
# format 2 by its version check, so an older charnn never resumes a newer run
# (its reading order, for one) with part of the run ignored.
FORMAT_VERSION = 2
REQUIRED_KEYS = ("format", "format_version", "model_config", "vocab", "model_state")


@dataclass
class Checkpoint:
    """A loaded, validated checkpoint."""

    path: Path
    data: dict[str, Any]
    model_config: ModelConfig
    tokenizer: CharTokenizer
    train_config: dict[str, Any] = field(default_factory=dict)
    train_state: dict[str, Any] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)

    def build_model(self, device: torch.device | str = "cpu") -> CharRNN:
        try:
            model = CharRNN(self.model_config)  # checks free memory before allocating
        except ConfigError as e:
            raise CheckpointError(f"cannot load the model in {self.path}: {e}") from None
        model.load_state_dict(self.data["model_state"])
        return model.to(device).eval()


def build_payload(
    model: CharRNN,
    tokenizer: CharTokenizer,
    train_config: dict[str, Any] | None = None,
    train_state: dict[str, Any] | None = None,
    metrics: list[dict[str, Any]] | None = None,
    optimizer_state: dict[str, Any] | None = None,
    scheduler_state: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The checkpoint as plain data. Weights are copied to the CPU in fp32."""
    model_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    payload: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "charnn_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model_config": model.config.to_dict(),
        "vocab": vocab_tensor(tokenizer),
        "model_state": model_state,
        "train_config": dict(train_config or {}),
        "train_state": dict(train_state or {}),
        "metrics": list(metrics or []),
    }
    if optimizer_state is not None:
        payload["optimizer_state"] = optimizer_state
    if scheduler_state is not None:
        payload["scheduler_state"] = scheduler_state
    return payload


def vocab_tensor(tokenizer: CharTokenizer) -> torch.Tensor:
    """The vocabulary as the checkpoint stores it: code points, index = token id.

    A tensor, not a list of strings: its bytes go to a storage member (4 per
    character, bounded by the file's size) instead of the object pickle, whose
    cap keeps crafted files cheap to refuse."""
    return torch.tensor([ord(c) for c in tokenizer.chars], dtype=VOCAB_DTYPE)


def save(payload: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write atomically: temp file in the same folder, fsync, ``os.replace``,
    fsync of the folder (:func:`charnn.safe_files.write_atomic`).

    On failure (disk full, file size limit, read-only, ...) the previous file
    at ``path`` is untouched, no temp file is left, and a
    :class:`CheckpointError` says what happened and what to do.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"cannot write checkpoint {path}: it is a directory")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise CheckpointError(
            f"cannot write checkpoint {path}: {path.parent} exists and is not a folder; "
            "choose another --out"
        ) from None
    except OSError as e:
        raise CheckpointError(f"cannot create folder {path.parent}: {e.strerror or e}") from None
    # Serialize in memory, then write the bytes with plain file I/O: a full
    # disk is then a real OSError (torch's zip writer would raise a vague
    # RuntimeError from inside torch.save).
    return write_atomic(path, serialize(payload))


def _vocab_chars(vocab: Any, version: int, path: Path) -> list[str]:
    """The vocabulary's characters, checked before anything prints an entry:
    format 2's tensor of code points, or format 1's list of characters."""
    if version >= 2:
        if not isinstance(vocab, torch.Tensor):
            raise CheckpointError(f"{path}: vocab is not a tensor of code points")
        check_tensor(vocab, "vocab", path, (VOCAB_DTYPE,))
        if vocab.dim() != 1:
            raise CheckpointError(f"{path}: vocab has shape {tuple(vocab.shape)}; it must be a list of code points")
        if vocab.numel() > MAX_VOCAB:
            raise untrusted(path, f"a vocabulary of {vocab.numel():,} entries; Unicode has {MAX_VOCAB:,} code points")
        if vocab.numel() and (int(vocab.min()) < 0 or int(vocab.max()) >= MAX_VOCAB):
            raise CheckpointError(f"{path}: invalid vocabulary: an entry is not a Unicode code point "
                                  f"(0 to {MAX_VOCAB - 1:#x})")
        return [chr(p) for p in vocab.tolist()]
    if not isinstance(vocab, list):
        raise CheckpointError(f"{path}: vocab is not a list of characters")
    if len(vocab) > MAX_VOCAB:
        raise untrusted(path, f"a vocabulary of {len(vocab):,} entries; Unicode has {MAX_VOCAB:,} code points")
    for i, ch in enumerate(vocab):
        if not isinstance(ch, str) or len(ch) != 1:
            shown = repr(ch) if isinstance(ch, str) else f"a {type(ch).__name__}"
            raise CheckpointError(f"{path}: invalid vocabulary: entry {i} is {safe_display(shown, 40)}; "
                                  "vocab entries must be single characters")
    return list(vocab)


def _check_model_config(mc: Any, path: Path) -> ModelConfig:
    if not isinstance(mc, dict):
        raise CheckpointError(f"{path}: model_config is not a mapping")
    if len(mc) > 64 or not all(isinstance(k, str) and len(k) <= 64 for k in mc) or not all(
            v is None or isinstance(v, (bool, int, float)) or (isinstance(v, str) and len(v) <= 64)
            for v in mc.values()):
        raise CheckpointError(f"{path}: invalid model_config: its entries must be short names with "
                              "numbers or short strings")
    try:
        return ModelConfig.from_dict(mc)
    except (CharnnError, TypeError, ValueError, OverflowError) as e:
        raise CheckpointError(f"{path}: invalid model_config: {safe_display(e)}") from None


def _check_weights(state: Any, config: ModelConfig, path: Path) -> None:
    """Step 4: names and shapes from the config's arithmetic, dtypes and data."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: model_state is not a mapping of tensors")
    if not all(isinstance(k, str) and len(k) <= MAX_KEY_CHARS for k in state):
        raise CheckpointError(f"{path}: model_state has weight names that are not short strings")
    n_expected = 3 + 4 * config.num_layers
    if n_expected > len(state) + 64:  # never list the names of a billion layers
        raise CheckpointError(
            f"{path}: weights do not match its model_config: num_layers={config.num_layers} needs "
            f"{n_expected:,} weight tensors, the file holds {len(state)} (missing weights)")
    expected = parameter_shapes(config)
    missing_w = sorted(set(expected) - set(state))
    extra_w = sorted(set(state) - set(expected))
    if missing_w or extra_w:
        raise CheckpointError(
            f"{path}: weights do not match its model_config (missing: {missing_w[:5]}, "
            f"unexpected: {safe_display(extra_w[:5])})"
        )
    for key, shape in expected.items():
        t = state[key]
        if tuple(t.shape) != shape:
            raise CheckpointError(
                f"{path}: weight {key} has shape {tuple(t.shape)}, model_config implies {shape}"
            )
        check_tensor(t, f"weight {key}", path, FLOAT_DTYPES)
    for key in expected:
        if not bool(torch.isfinite(state[key]).all()):
            # A damaged file (or a diverged run saved by another tool): NaN/inf
            # weights would only produce NaN losses and failed sampling later.
            raise CheckpointError(
                f"{path}: weight {key} holds NaN or infinite values; the file is damaged "
                "(use an earlier checkpoint)"
            )


def validate(data: Any, path: str | os.PathLike = "checkpoint") -> Checkpoint:
    """Check format, version, every entry's type and size, config vs weights,
    vocabulary vs sizes -- without building a model."""
    path = Path(path)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a charnn checkpoint (no 'format': '{FORMAT}' entry); "
            "it may come from another tool"
        )
    version = data.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"{path} has no valid format_version")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format version {version}, newer than this charnn "
            f"({__version__}) reads (up to {FORMAT_VERSION}); upgrade charnn"
        )
    if version < 1:
        raise CheckpointError(f"{path} has an invalid format_version {version}")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise CheckpointError(f"{path} lacks required entries: {', '.join(missing)}")
    if not all(isinstance(k, str) for k in data) or len(data) > 64:
        raise untrusted(path, "unexpected top-level entries")
    config = _check_model_config(data["model_config"], path)
    chars = _vocab_chars(data["vocab"], version, path)
    budget = WalkBudget()
    for key, value in data.items():
        if key in ("vocab", "model_state"):
            continue
        check_plain(value, safe_display(key, 40), path, budget, tensors=key not in ("train_config", "metrics"))
    for key in ("charnn_version", "created"):
        if not isinstance(data.get(key, ""), str) or len(data.get(key, "")) > 100:
            raise CheckpointError(f"{path}: {key} is not a short string")
    for key in ("train_config", "train_state"):
        if not isinstance(data.get(key, {}), dict):
            raise CheckpointError(f"{path}: {key} is not a mapping")
    metrics = data.get("metrics", [])
    if not isinstance(metrics, list):
        raise CheckpointError(f"{path}: metrics is not a list")
    for row in metrics:
        if not isinstance(row, dict) or not all(v is None or isinstance(v, (bool, int, float, str))
                                                for v in row.values()):
            raise CheckpointError(f"{path}: metrics must be a list of flat rows of numbers")
    try:
        tokenizer = CharTokenizer(chars)
    except (CharnnError, TypeError) as e:
        raise CheckpointError(f"{path}: invalid vocabulary: {safe_display(e)}") from None
    if tokenizer.vocab_size != config.vocab_size:
        raise CheckpointError(
            f"{path}: vocabulary has {tokenizer.vocab_size} characters but model_config "
            f"says vocab_size={config.vocab_size}"
        )
    _check_weights(data["model_state"], config, path)
    return Checkpoint(
        path=path,
        data=data,
        model_config=config,
        tokenizer=tokenizer,
        train_config=data.get("train_config", {}),
        train_state=data.get("train_state", {}),
        metrics=metrics,
    )


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu", prefer: str = "best.pt") -> Checkpoint:
    """Read and validate a checkpoint."""
    return validate(read_payload(path, map_location=map_location, prefer=prefer), path)


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[CharRNN, CharTokenizer, Checkpoint]:
    """The model (in eval mode, on ``device``), its tokenizer and the checkpoint."""
    ckpt = load(path, map_location="cpu")
    return ckpt.build_model(device), ckpt.tokenizer, ckpt
