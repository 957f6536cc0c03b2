"""A format-1 checkpoint (charnn 0.2.3) for a vocabulary of more than ~30k
characters keeps it in the object pickle, over the cap every file is read
under: it cannot be read, and the error says so and what to do instead of
calling it damaged or crafted (docs/checkpoints.md)."""

from __future__ import annotations

import time

import torch
from conftest import assert_clean_error, invoke

from charnn.model.config import ModelConfig
from charnn.model.rnn import CharRNN
from charnn.storage import checkpoint as ckpt_mod
from charnn.text.tokenizer import CharTokenizer


def _format_1_file(path, n_chars: int):
    """What charnn 0.2.3 wrote: the payload with the vocabulary as a list of characters."""
    tok = CharTokenizer([chr(0x20000 + i) for i in range(n_chars)])
    model = CharRNN(ModelConfig(cell="lstm", vocab_size=n_chars, embedding_dim=2, hidden_size=2, num_layers=1,
                                dropout=0.0))
    payload = ckpt_mod.build_payload(model, tok)
    torch.save({**payload, "format_version": 1, "vocab": list(tok.chars)}, path)


def test_a_wide_format_1_file_says_what_happened_and_what_to_do(tmp_path):
    path = tmp_path / "best.pt"
    _format_1_file(path, 100_000)
    t0 = time.perf_counter()
    for command in (("sample", path, "-n", "5"), ("info", path), ("train", "--resume", path, "--max-steps", "1")):
        r = invoke(*command)
        assert_clean_error(r, "format 1", "0.2.3", "train again")
        assert "do not trust" not in r.stderr and "damaged" not in r.stderr
    assert time.perf_counter() - t0 < 20  # refused from the zip's directory and 256 bytes, never unpickled


def test_an_oversized_pickle_that_is_not_format_1_is_still_untrusted(tmp_path):
    path = tmp_path / "big.pt"
    torch.save({"format": "charnn-checkpoint", "format_version": 2, "junk": [str(i) for i in range(100_000)]},
               path)
    r = invoke("info", path)
    assert_clean_error(r, "damaged or was crafted", "do not trust")
    assert "format 1" not in r.stderr
