"""The floor every model should beat: a smoothed character bigram model,
scored on exactly the validation split that ``charnn eval`` scores.

    P(b | a) = lam * c(a, b) / c(a)  +  (1 - lam) * P_uni(b)
    P_uni(b) = (c(b) + 1) / (N + V)          (add-one over charnn's vocabulary)

Counts come from the training part only; a context never seen there falls back
to P_uni. ``lam`` is chosen on the last tenth of the training part, with counts
from the rest of it -- never on validation -- then the counts are taken from
the whole training part. Like ``charnn eval``, the first validation character
is only context: the loss is the mean over the other ``len(val) - 1``.
"""

from __future__ import annotations

import math
import time

import numpy as np

from charnn.text.data import split_ids
from charnn.text.tokenizer import CharTokenizer

VAL_FRACTION = 0.1  # charnn train's default --val-fraction
TUNE_FRACTION = 0.1  # share of the training part that chooses lam


def val_count(n: int, val_fraction: float = VAL_FRACTION) -> int:
    """Characters charnn holds out of ``n``: its own ``split_ids``."""
    return len(split_ids(range(n), val_fraction)[1])


def split_text(text, val_fraction: float = VAL_FRACTION):
    """(train, validation): charnn's own split, the last ``val_fraction``, contiguous."""
    return split_ids(text, val_fraction)


class Bigram:
    """Counts of one training text over a fixed vocabulary of ``V`` ids."""

    def __init__(self, ids: np.ndarray, V: int):
        self.V = V
        self.uni = np.bincount(ids, minlength=V).astype(np.float64)  # c(b)
        self.ctx = np.bincount(ids[:-1], minlength=V).astype(np.float64)  # c(a) as a context
        # Pairs as sorted codes a * V + b, so a vocabulary of thousands of
        # characters (Chinese) needs no V x V table.
        self.keys, counts = np.unique(ids[:-1].astype(np.int64) * V + ids[1:], return_counts=True)
        self.counts = counts.astype(np.float64)

    def parts(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each target ``ids[1:]``: (bigram estimate, unigram estimate)."""
        a, b = ids[:-1].astype(np.int64), ids[1:].astype(np.int64)
        codes = a * self.V + b
        pair = np.zeros(len(codes))
        if len(self.keys):
            at = np.minimum(np.searchsorted(self.keys, codes), len(self.keys) - 1)
            pair = np.where(self.keys[at] == codes, self.counts[at], 0.0)
        ctx = self.ctx[a]
        p_bi = np.divide(pair, ctx, out=np.zeros_like(pair), where=ctx > 0)
        p_uni = (self.uni[b] + 1.0) / (self.uni.sum() + self.V)
        return np.where(ctx > 0, p_bi, p_uni), p_uni  # unseen context: all unigram

    def loss(self, ids: np.ndarray, lam: float) -> float:
        """Mean negative log-likelihood (nats) of ``ids[1:]``."""
        p_bi, p_uni = self.parts(ids)
        return float(-np.log(lam * p_bi + (1.0 - lam) * p_uni).mean())


def choose_lambda(model: Bigram, ids: np.ndarray, tol: float = 1e-5) -> float:
    """The ``lam`` in [0, 1) with the lowest loss on ``ids`` (golden-section
    search: the loss, -mean log of a mix linear in lam, is convex)."""
    p_bi, p_uni = model.parts(ids)
    f = lambda lam: -np.log(lam * p_bi + (1.0 - lam) * p_uni).mean()  # noqa: E731
    lo, hi = 0.0, 1.0 - 1e-9
    g = (math.sqrt(5) - 1) / 2
    x1, x2 = hi - g * (hi - lo), lo + g * (hi - lo)
    f1, f2 = f(x1), f(x2)
    while hi - lo > tol:
        if f1 <= f2:
            hi, x2, f2 = x2, x1, f1
            x1 = hi - g * (hi - lo)
            f1 = f(x1)
        else:
            lo, x1, f1 = x1, x2, f2
            x2 = lo + g * (hi - lo)
            f2 = f(x2)
    return (lo + hi) / 2


def encode(text: str) -> tuple[np.ndarray, int]:
    """Ids over charnn's vocabulary of the whole text (its own tokenizer)."""
    tok = CharTokenizer.from_text(text)
    return tok.encode_array(text).astype(np.int32), tok.vocab_size


def bigram_result(text: str, val_fraction: float = VAL_FRACTION) -> dict:
    """The bigram baseline on charnn's split of ``text``: loss, lam, sizes, seconds."""
    t0 = time.perf_counter()
    ids, V = encode(text)
    train, val = split_text(ids, val_fraction)
    fit, tune = split_text(train, TUNE_FRACTION)
    lam = choose_lambda(Bigram(fit, V), tune)
    loss = Bigram(train, V).loss(val, lam)
    return {"val_loss": loss, "val_chars": len(val) - 1, "train_chars": len(train), "lambda": lam,
            "seconds": time.perf_counter() - t0}
