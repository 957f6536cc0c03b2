"""charnn: character-level recurrent language models on your own text.

The public API is re-exported here lazily, so ``import charnn`` (and the
``charnn --help`` command) does not pay for importing torch.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

# Matrix products whose last bits do not depend on where the tensors happen to
# lie in memory: without this, MKL picks kernels by alignment, so a resumed run
# (its weights loaded into new tensors) drifts from an uninterrupted one by an
# ulp within a step. It must be set before MKL's first product, so here, before
# charnn imports torch; a value the user set is kept. It costs a few % of
# training speed and a third of one-stream sampling speed, so `charnn sample`
# and `charnn serve`, which never train, set it back (cli.common.inference_only).
MKL_CBWR_GIVEN = "MKL_CBWR" in os.environ
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

__version__ = "0.2.3"

_EXPORTS = {
    "CharnnError": "errors", "DataError": "errors", "VocabError": "errors",
    "CheckpointError": "errors", "ConfigError": "errors", "TrainingError": "errors",
    "CharTokenizer": "text.tokenizer",
    "ModelConfig": "model.config", "TrainConfig": "training.config",
    "CharRNN": "model.rnn",
    "read_corpus": "text.reading",
    "load": "storage.checkpoint", "load_model": "storage.checkpoint", "save": "storage.checkpoint",
    "Trainer": "training.trainer", "train": "training.trainer",
    "generate": "generation.sample", "generate_samples": "generation.sample", "sample_text": "generation.sample",
    "Sample": "generation.sample",
    "evaluate_ids": "analysis.evaluate", "EvalResult": "analysis.evaluate",
    "inspect": "analysis.inspection",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'charnn' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
