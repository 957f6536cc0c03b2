"""Starting from a checkpoint: its model checked against the options given,
and (for --init-from) its weights carried over to a new text, the vocabulary
grown where the new text has characters the old one lacked."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch

from ..storage import checkpoint as ckpt_mod
from ..model.config import ModelConfig
from ..errors import ConfigError, VocabError, describe_char
from ..model.rnn import CharRNN
from ..text.tokenizer import CharTokenizer

ARCH_FIELDS = ("cell", "embedding_dim", "hidden_size", "num_layers", "dropout")


def check_arch(overrides: dict[str, Any], config: ModelConfig, source: Path | str, what: str, hint: str) -> None:
    """A ConfigError naming every model option given that differs from ``config``."""
    clash = [f"--{k.replace('_', '-')} {overrides[k]} (checkpoint: {getattr(config, k)})"
             for k in ARCH_FIELDS if overrides.get(k) is not None and overrides[k] != getattr(config, k)]
    if clash:
        raise ConfigError(f"{what} {source}: its architecture differs from the model options given: "
                          + "; ".join(clash) + f". {hint}")


def extend_vocab(model: CharRNN, old: CharTokenizer, new: CharTokenizer) -> CharRNN:
    """A copy of ``model`` whose embedding and head rows follow ``new`` (a
    superset of ``old``); rows for new characters start fresh."""
    config = copy.deepcopy(model.config)
    config.vocab_size = new.vocab_size
    grown = CharRNN(config)
    grown.rnn.load_state_dict(model.rnn.state_dict())
    with torch.no_grad():
        grown.head.weight.mul_(0.0)
        grown.head.bias.fill_(float(model.head.bias.min()))
        for ch, old_id in old.stoi.items():
            new_id = new.stoi[ch]
            grown.embedding.weight[new_id] = model.embedding.weight[old_id]
            grown.head.weight[new_id] = model.head.weight[old_id]
            grown.head.bias[new_id] = model.head.bias[old_id]
    return grown


def fine_tune_start(init_from: str | os.PathLike, text: str, overrides: dict[str, Any],
                    grow_vocab: bool, what: str = "--init-from", shown: str | None = None,
                    loaded: ckpt_mod.Checkpoint | None = None) -> tuple[CharTokenizer, CharRNN, list[str]]:
    """The tokenizer and model a new run on ``text`` starts from, and the
    warnings to report. The architecture must match (only dropout may change);
    characters outside the checkpoint's vocabulary are an error unless
    ``grow_vocab``. ``shown``: how messages name the checkpoint (its path
    unless given); ``loaded``: the checkpoint, where the caller has read it."""
    base = loaded if loaded is not None else ckpt_mod.load(init_from)
    arch = {k: v for k, v in overrides.items() if k != "dropout"}  # dropout may change when fine-tuning
    hint = "Drop those options or start a new run" + (" with --base none" if what == "--base" else "")
    check_arch(arch, base.model_config, shown or init_from,
               "cannot fine-tune from" if what == "--init-from" else "cannot start from the base", hint)
    tokenizer, model = base.tokenizer, base.build_model("cpu")
    warnings = []
    unknown = tokenizer.unknown_chars(text)
    listed = ", ".join(describe_char(c) for c in unknown[:20]) + (
        f" and {len(unknown) - 20:,} more" if len(unknown) > 20 else "")
    if unknown and not grow_vocab:
        raise VocabError(f"the text has {len(unknown):,} character{'' if len(unknown) == 1 else 's'} that "
                         f"{init_from}'s vocabulary lacks: {listed}. Pass --extend-vocab to grow the "
                         "vocabulary (their rows start fresh), or remove them from the text",
                         characters=unknown)
    if unknown:
        new_tok = CharTokenizer(sorted(set(tokenizer.chars) | set(unknown)))
        model = extend_vocab(model, tokenizer, new_tok)
        tokenizer = new_tok
        warnings.append(f"vocabulary extended by {len(unknown):,} character{'' if len(unknown) == 1 else 's'} "
                        f"the checkpoint lacks (new rows start fresh): {listed}")
    if overrides.get("dropout") is not None:
        model.config.dropout = overrides["dropout"]
        rebuilt = CharRNN(model.config)
        rebuilt.load_state_dict(model.state_dict())
        model = rebuilt
    return tokenizer, model, warnings
