"""The checkpoint: one self-describing file shared by every command.

A ``torch.save`` of plain containers and tensors only, read back with
``torch.load(..., weights_only=True)`` so a malicious file cannot run code.
Writes are atomic: a temporary file in the same folder, then ``os.replace``.
See the README's "Checkpoint format" for the keys.
"""

from __future__ import annotations

import datetime as _dt
import io
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .config import ModelConfig
from .errors import CharnnError, CheckpointError
from .model import CharRNN
from .runfolder import TMP_PREFIX, serialize, write_atomic  # noqa: F401 (TMP_PREFIX re-exported)
from .tokenizer import CharTokenizer

FORMAT = "charnn-checkpoint"
FORMAT_VERSION = 1
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
        model = CharRNN(self.model_config)
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
        "vocab": tokenizer.to_list(),
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


def save(payload: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write atomically: temp file in the same folder, fsync, ``os.replace``,
    fsync of the folder (:func:`charnn.runfolder.write_atomic`).

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


def read_payload(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """``torch.load`` with ``weights_only=True``, every failure a CheckpointError."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir():
        hint = ""
        if (path / "best.pt").exists():
            hint = f"; did you mean {path / 'best.pt'}?"
        raise CheckpointError(f"{path} is a folder, not a checkpoint file{hint}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes); it was never written completely")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's first line is generic; the line naming the cause is the useful one.
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        cause = next((ln for ln in lines if "Unsupported global" in ln or "GLOBAL" in ln), "")
        if not cause:
            raise CheckpointError(
                f"{path} is not a readable checkpoint (corrupt, or not a charnn/torch file)"
            ) from None
        raise CheckpointError(
            f"refusing to load {path}: it holds Python objects beyond plain data and tensors, "
            "which could run code. charnn checkpoints never do; do not trust this file "
            f"({cause[:200]})"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, KeyError,
            AttributeError, TypeError, IndexError, UnicodeDecodeError, io.UnsupportedOperation) as e:
        raise CheckpointError(
            f"{path} is not a readable checkpoint (truncated, corrupt or not a torch file): "
            f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        ) from None
    except Exception as e:  # torch raises assorted types on garbage input
        raise CheckpointError(f"{path} is not a readable checkpoint: {type(e).__name__}") from None
    return data


def validate(data: Any, path: str | os.PathLike = "checkpoint") -> Checkpoint:
    """Check format, version, config vs weights, vocabulary vs sizes."""
    path = Path(path)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a charnn checkpoint (no 'format': '{FORMAT}' entry); "
            "it may come from another tool"
        )
    version = data.get("format_version")
    if not isinstance(version, int):
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
    if not isinstance(data["model_config"], dict):
        raise CheckpointError(f"{path}: model_config is not a mapping")
    try:
        config = ModelConfig.from_dict(data["model_config"])
    except (CharnnError, TypeError) as e:
        raise CheckpointError(f"{path}: invalid model_config: {e}") from None
    vocab = data["vocab"]
    if not isinstance(vocab, list):
        raise CheckpointError(f"{path}: vocab is not a list of characters")
    try:
        tokenizer = CharTokenizer(vocab)
    except (CharnnError, TypeError) as e:
        raise CheckpointError(f"{path}: invalid vocabulary: {e}") from None
    if tokenizer.vocab_size != config.vocab_size:
        raise CheckpointError(
            f"{path}: vocabulary has {tokenizer.vocab_size} characters but model_config "
            f"says vocab_size={config.vocab_size}"
        )
    state = data["model_state"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: model_state is not a mapping of tensors")
    expected = CharRNN(config).state_dict()
    missing_w = sorted(set(expected) - set(state))
    extra_w = sorted(set(state) - set(expected))
    if missing_w or extra_w:
        raise CheckpointError(
            f"{path}: weights do not match its model_config (missing: {missing_w[:5]}, "
            f"unexpected: {extra_w[:5]})"
        )
    for key, ref in expected.items():
        if tuple(state[key].shape) != tuple(ref.shape):
            raise CheckpointError(
                f"{path}: weight {key} has shape {tuple(state[key].shape)}, "
                f"model_config implies {tuple(ref.shape)}"
            )
        if state[key].is_floating_point() and not bool(torch.isfinite(state[key]).all()):
            # A damaged file (or a diverged run saved by another tool): NaN/inf
            # weights would only produce NaN losses and failed sampling later.
            raise CheckpointError(
                f"{path}: weight {key} holds NaN or infinite values; the file is damaged "
                "(use an earlier checkpoint)"
            )
    for key in ("train_config", "train_state"):
        if not isinstance(data.get(key, {}), dict):
            raise CheckpointError(f"{path}: {key} is not a mapping")
    metrics = data.get("metrics", [])
    if not isinstance(metrics, list):
        raise CheckpointError(f"{path}: metrics is not a list")
    return Checkpoint(
        path=path,
        data=data,
        model_config=config,
        tokenizer=tokenizer,
        train_config=data.get("train_config", {}),
        train_state=data.get("train_state", {}),
        metrics=metrics,
    )


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read and validate a checkpoint."""
    return validate(read_payload(path, map_location=map_location), path)


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[CharRNN, CharTokenizer, Checkpoint]:
    """The model (in eval mode, on ``device``), its tokenizer and the checkpoint."""
    ckpt = load(path, map_location="cpu")
    return ckpt.build_model(device), ckpt.tokenizer, ckpt
