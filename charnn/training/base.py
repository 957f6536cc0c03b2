"""Base models: a new run may start from a model that already knows the
language (``charnn train TEXT --base auto|none|NAME|PATH``).

charnn ships its bases inside the package (``charnn/bases/NAME.pt``, a
checkpoint with bf16 weights, and ``NAME.json``, its card: sources and their
licences, how it was built, the character bigrams of its training text).
``auto`` fine-tunes from the shipped base when the text is written mostly in
characters and character pairs the base has seen and the budget is short
for the text (see :func:`choose_base`); otherwise the run trains from
scratch, as ``none`` does.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

BASES_DIR = Path(__file__).resolve().parent.parent / "bases"
DEFAULT_BASE = "prose-en"

# The rule's thresholds (measured: docs/training.md#start-from-a-base-model).
# A text whose characters the base mostly lacks (another script) gains
# nothing: the new rows start from zero and most of the text is new.
MIN_CHAR_COVERAGE = 0.99  # share of the text's characters in the base's vocabulary
MIN_BIGRAM_COVERAGE = 0.97  # share of its character pairs seen in the base's training text


@dataclass
class BaseChoice:
    path: Path | None  # None: train from scratch
    name: str  # the base's name ("prose-en", a file name), or "none"
    reason: str  # one line: why


def shipped_bases() -> dict[str, Path]:
    """The bases in this installation: name -> checkpoint path."""
    if not BASES_DIR.is_dir():
        return {}
    return {p.stem: p for p in sorted(BASES_DIR.glob("*.pt")) if p.with_suffix(".json").is_file()}


def card(path: Path) -> dict:
    """A shipped base's card (its .json beside it); {} for any other checkpoint."""
    try:
        return json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def resolve(spec: str) -> tuple[Path | None, str]:
    """``--base`` as a path and a name: ``none`` -> (None, "none"); a shipped
    base's name; or the path of a charnn checkpoint (or a run folder)."""
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
    if path.exists():  # named as charnn names runs' checkpoints: the run folder shows which run
        return path, f"{path.parent.name}/{path.name}" if path.name in ("best.pt", "last.pt") else path.name
    names = ", ".join(bases) or "none shipped with this installation"
    raise ConfigError(f"--base {spec}: no such base or file. Give auto, none, a base's name ({names}) "
                      "or the path of a charnn checkpoint")


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


def choose_base(spec: str, text: str, vocab_of) -> BaseChoice:
    """What ``--base spec`` means for this text and budget. ``vocab_of(path)``
    returns a checkpoint's vocabulary (read only when needed).

    ``auto`` fine-tunes from the shipped base when the base knows the text's
    characters and character pairs.
    """
    path, name = resolve(spec)
    if path is None:
        if spec == "auto":
            return BaseChoice(None, "none", "no base model is installed")
        return BaseChoice(None, "none", "--base none")
    info = card(path)
    bigrams = set(info["bigrams"]) if isinstance(info.get("bigrams"), list) else None
    chars, pairs = coverage(text, set(vocab_of(path)), bigrams)
    known = f"it knows {chars:.1%} of the text's characters" + (
        f" and {pairs:.1%} of its character pairs" if pairs is not None else "")
    unfamiliar = chars < MIN_CHAR_COVERAGE or (pairs is not None and pairs < MIN_BIGRAM_COVERAGE)
    if spec != "auto":
        advice = "; it gains little on a text it does not know (--base none trains from scratch)" if unfamiliar else ""
        return BaseChoice(path, name, f"fine-tuning {name} (--base): {known}{advice}")
    if unfamiliar:
        return BaseChoice(None, "none", f"from scratch: {name} does not know this text well enough ({known})")
    return BaseChoice(path, name, f"fine-tuning {name}: {known}")
