"""Base models: a new run may start from a model that already knows the
language (``charnn train TEXT --base auto|none|NAME|PATH``).

charnn ships its bases inside the package (``charnn/bases/NAME.pt``, a
checkpoint with bf16 weights, and ``NAME.json``, its card: sources and their
licences, how it was built, the character bigrams of its training text).
``auto`` fine-tunes from the shipped base when the text is written mostly in
characters and character pairs the base has seen and is not larger than the
base's own text (see :func:`auto_takes_base`); otherwise the run trains from
scratch, as ``none`` does.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .config import TrainConfig

if TYPE_CHECKING:
    from ..storage.checkpoint import Checkpoint

BASES_DIR = Path(__file__).resolve().parent.parent / "bases"
DEFAULT_BASE = "prose-en"

# How well the base must know a text (measured against scratch:
# docs/training.md#start-from-a-base-model). The characters rule out another
# script; English with tabs and symbols the novels never use passes. How
# surprised the base is by the text, before any training, tells a language
# apart: the English texts it never read scored 1.45-2.26 times the base's
# loss on its own held-out text, and all gained from it; German and Python
# scored 2.99-3.63 times, and gained little or lost. The threshold lies
# midway. (Character pairs, shown too, leave too thin a margin: an English
# manual knew 95.4% of its pairs, Python's standard library 94.9%.)
MIN_CHAR_COVERAGE = 0.95  # share of the text's characters in the base's vocabulary
MAX_SURPRISE = 2.65  # the text's loss under the base, over the base's own validation loss
SURPRISE_WINDOWS = 16  # windows of the text the base scores, spread over it ...
SURPRISE_CHARS = 512  # ... each this long (a 2x512 base: about 0.3 s on 2 cores)

# Fine-tuning's recipe, for each of these the user left open (measured on
# 2-minute runs, docs/training.md#start-from-a-base-model): the peak rate of a
# run from scratch, as lower ones keep too much of the novels; 32 x 128
# batches use the larger shape's throughput; dropout 0.2 holds off copying a
# small text, which a model of this size memorises in minutes. Every layer
# trains: the steps a frozen lower half saves do not make up for what it
# cannot learn.
FINE_TUNE = {"batch_size": 32, "seq_len": 128, "lr": 7e-3}
FINE_TUNE_DROPOUT = 0.2
# How many epochs fine-tuning plans for, where neither --epochs nor
# --max-steps is given: its schedule ends there, or at the time limit if that
# comes first. A base overfits a small text within a few epochs, and a
# schedule planned over a long time budget keeps the learning rate high past
# that point. The epochs a text can take grow with its size: planned over
# 8 or 11 epochs, 270 kB texts scored alike and better than over 5 or 15-17;
# a 900 kB one was still gaining at 16 (docs/training.md#start-from-a-base-model).
EPOCHS_AT = (270_000, 10.0)  # (training characters, epochs) the rule passes through
EPOCHS_EXPONENT = 0.7  # epochs grow as the text's size to this power
MIN_EPOCHS = 3.0


@dataclass
class BaseChoice:
    path: Path | None  # None: train from scratch
    name: str  # the base's name ("prose-en", a file name), or "none"
    reason: str  # one line: why
    advice: str = ""  # said after the recipe: what to do if this start is a poor one
    checkpoint: Checkpoint | None = None  # the base as read to decide: fine-tuning starts from it, not from a second read


def fine_tune_options(left_open: set[str], world_size: int = 1, train_chars: int | None = None) -> dict[str, object]:
    """The fine-tuning recipe's values for the options the user left open
    (the batch split evenly over ``world_size`` processes). A training text
    too short for the recipe's batch keeps the usual batch and context."""
    chosen: dict[str, object] = {k: v for k, v in FINE_TUNE.items() if k in left_open}
    if train_chars and {"epochs", "max_steps"} <= left_open:
        chosen["epochs"] = fine_tune_epochs(train_chars)
    if "batch_size" in chosen:
        chosen["batch_size"] = -(-int(chosen["batch_size"]) // world_size) * world_size
    batch = int(chosen.get("batch_size", TrainConfig.batch_size))
    seq = int(chosen.get("seq_len", TrainConfig.seq_len))
    if train_chars is not None and train_chars <= batch * seq:
        chosen.pop("batch_size", None)
        chosen.pop("seq_len", None)
    return chosen


def fine_tune_epochs(train_chars: int) -> float:
    """The epochs fine-tuning plans for on a training text this long (to one decimal)."""
    chars, epochs = EPOCHS_AT
    return round(max(MIN_EPOCHS, epochs * (train_chars / chars) ** EPOCHS_EXPONENT), 1)


def describe_recipe(chosen: dict[str, object], dropout: float | None) -> str:
    """The fine-tuning settings charnn chose, for the start line ("" if none)."""
    parts = []
    if "batch_size" in chosen and "seq_len" in chosen:
        parts.append(f"batch {chosen['batch_size']} x {chosen['seq_len']}")
    elif "batch_size" in chosen:
        parts.append(f"batch {chosen['batch_size']}")
    elif "seq_len" in chosen:
        parts.append(f"{chosen['seq_len']}-character chunks")
    if "lr" in chosen:
        parts.append(f"lr {chosen['lr']:g}")
    if "epochs" in chosen:
        parts.append(f"at most {chosen['epochs']:g} epochs")
    if dropout is not None:
        parts.append(f"dropout {dropout:g}")
    return ", ".join(parts)


def shipped_bases() -> dict[str, Path]:
    """The bases in this installation: name -> checkpoint path."""
    if not BASES_DIR.is_dir():
        return {}
    return {p.stem: p for p in sorted(BASES_DIR.glob("*.pt")) if p.with_suffix(".json").is_file()}


def is_shipped(path: Path) -> bool:
    """Whether ``path`` is one of the bases installed with charnn (the file
    itself, not followed: it may be a link to nothing)."""
    return path.absolute().parent.resolve() == BASES_DIR.resolve()


def card(path: Path) -> dict:
    """A shipped base's card (its .json beside it); {} for any other
    checkpoint, and for a card that is not a JSON object."""
    if not is_shipped(path):
        return {}
    try:
        info = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def resolve(spec: str) -> tuple[Path | None, str]:
    """``--base`` as a path and a name: ``none`` -> (None, "none"); a shipped
    base's name; or the path of a charnn checkpoint (a run's best.pt)."""
    if not spec.strip():
        raise ConfigError("--base is empty. Give auto, none, a base's name or the path of a charnn checkpoint")
    if spec == "none":
        return None, "none"
    bases = shipped_bases()
    if spec == "auto":
        if DEFAULT_BASE not in bases:
            return None, "none"
        return bases[DEFAULT_BASE], DEFAULT_BASE
    if spec in bases:
        return bases[spec], spec
    path = Path(os.path.expanduser(spec))
    try:
        exists, link = path.exists(), path.is_symlink()
    except OSError as e:  # a name too long for the file system, a folder it may not search
        raise ConfigError(f"--base {spec}: {e.strerror or e}. Give auto, none, a base's name or the path "
                          "of a charnn checkpoint") from None
    if exists or link:  # a link to nothing: loading it says why. Named as charnn names runs' checkpoints
        return path, f"{path.parent.name}/{path.name}" if path.name in ("best.pt", "last.pt") else path.name
    names = ", ".join(bases) or "none shipped with this installation"
    raise ConfigError(f"--base {spec}: no such base or file. Give auto, none, a base's name ({names}) "
                      "or the path of a charnn checkpoint")


def unreadable(spec: str, path: Path, error: Exception) -> str:
    """The message for a base that cannot be loaded: a shipped one means a
    damaged installation, any other a file the user named."""
    error = str(error).rstrip(".")
    if is_shipped(path):
        return (f"the base {path.stem} shipped with charnn cannot be read, so this installation is damaged: "
                f"{error}. Reinstall charnn, or pass --base none to train from scratch")
    return f"--base {spec}: {error} (--base none trains from scratch)"


def coverage(text: str, vocab: set[str], bigrams: set[str] | None) -> tuple[float, float | None]:
    """The share of ``text``'s characters in ``vocab``, and of its character
    pairs in ``bigrams`` (None when the base's pairs are not known)."""
    if not text:
        return 1.0, 1.0
    counts = Counter(text)
    chars = sum(n for c, n in counts.items() if c in vocab) / len(text)
    if bigrams is None or len(text) < 2:
        return chars, None
    pairs = Counter(text[i:i + 2] for i in range(0, len(text) - 1))
    return chars, sum(n for p, n in pairs.items() if p in bigrams) / (len(text) - 1)


def surprise(base: Checkpoint, text: str) -> float | None:
    """How surprised ``base`` (a loaded checkpoint) is by ``text`` before any
    training: its mean loss on up to SURPRISE_WINDOWS windows of the text
    (characters it lacks left out), over its own validation loss. None where
    the checkpoint records no validation loss or the text has nothing to score."""
    own = base.train_state.get("best_val") if isinstance(base.train_state, dict) else None
    if not isinstance(own, (int, float)) or isinstance(own, bool) or not 0 < own < math.inf:
        return None
    stoi = base.tokenizer.stoi
    n = max(1, min(SURPRISE_WINDOWS, len(text) // SURPRISE_CHARS))
    width = min(SURPRISE_CHARS, len(text))
    starts = [round(i * (len(text) - width) / max(1, n - 1)) for i in range(n)]
    # Only the windows are read: encoding a whole large text would take seconds.
    windows = [[stoi[c] for c in text[s:s + width] if c in stoi] for s in starts]
    known = min(len(w) for w in windows)  # characters the base lacks leave a window shorter
    if known < 2:
        return None
    x = torch.tensor([w[:known] for w in windows], dtype=torch.long)  # (n, known)
    model = base.build_model("cpu").eval()
    with torch.inference_mode():
        logits, _ = model(x[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
    return float(loss) / own


def share(x: float) -> str:
    """``x`` as a percentage rounded down: "100.0%" only when it is all (one
    character the base lacks in 20,000 shows as 99.9%, beside the warning
    that grows the vocabulary for it)."""
    return f"{math.floor(x * 1000 + 1e-9) / 10:.1f}%"  # 1e-9: an exact k/1000 never shows as k-1 from float rounding


def knows(chars: float, surprised: float | None) -> bool:
    """Whether a base knows a text well enough to start from: the share of
    its characters in the base's vocabulary, and how surprised the base is
    by it (:func:`surprise`; None: not known, the characters decide)."""
    return chars >= MIN_CHAR_COVERAGE and (surprised is None or surprised <= MAX_SURPRISE)


def auto_takes_base(chars: float, surprised: float | None, text_chars: int, base_chars: int | None) -> bool:
    """``--base auto``'s rule: the base knows the text, and the text is not
    larger than the base's own training text (a larger one teaches more than
    the base knows). The budget does not enter: at every budget measured the
    base stayed ahead (docs/training.md#start-from-a-base-model)."""
    return knows(chars, surprised) and (base_chars is None or text_chars <= base_chars)


def choose_base(spec: str, text: str, load) -> BaseChoice:
    """What ``--base spec`` means for this text (see :func:`auto_takes_base`).
    ``load(path)`` returns a checkpoint (read only when needed)."""
    path, name = resolve(spec)
    if path is None:
        if spec == "auto":
            return BaseChoice(None, "none", "from scratch: no base model is installed")
        return BaseChoice(None, "none", "from scratch: --base none")
    info = card(path)
    base_chars = info.get("characters")
    base_chars = base_chars if isinstance(base_chars, int) and not isinstance(base_chars, bool) else None
    if spec == "auto" and base_chars is not None and len(text) > base_chars:  # decided without reading the base
        return BaseChoice(None, "none", f"from scratch: the text ({len(text):,} characters) is larger than "
                                        f"{name}'s own training text ({base_chars:,})")
    listed = info.get("bigrams")
    bigrams = set(listed) if isinstance(listed, list) and all(isinstance(p, str) for p in listed) else None
    base = load(path)
    chars, pairs = coverage(text, set(base.tokenizer.chars), bigrams)
    surprised = surprise(base, text) if chars >= MIN_CHAR_COVERAGE else None
    known = f"it knows {share(chars)} of the text's characters" + (
        f" and {share(pairs)} of its character pairs" if pairs is not None else "") + (
        f", and finds it {surprised:.1f}x as surprising as its own text" if surprised is not None else "")
    if spec != "auto":
        advice = "" if knows(chars, surprised) else \
            "; it gains little on a text it does not know (--base none trains from scratch)"
        return BaseChoice(path, name, f"fine-tuning {name} (--base): {known}", advice, base)
    if not auto_takes_base(chars, surprised, len(text), base_chars):
        return BaseChoice(None, "none", f"from scratch: {name} does not know this text well enough ({known})")
    return BaseChoice(path, name, f"fine-tuning {name}: {known}", checkpoint=base)
