"""Loss, bits per character and perplexity of a model on any text; the
surprisal of every character; and the gradient-flow analysis. The loss itself
is :mod:`charnn.model.scoring`'s (training's validation uses it too).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..model.rnn import CharRNN
from ..model.scoring import EvalResult, _check_finite, evaluate_ids


def checkpoint_corpus_val(train_config: dict, tokenizer, encoding: str = "utf-8") -> np.ndarray:
    """The validation split of the corpus a checkpoint was trained on, if that
    corpus is still there and unchanged."""
    from ..text.data import builtin_corpus_path, read_corpus, split_ids
    from ..errors import DataError

    paths = list(train_config.get("corpus") or [])
    expected = train_config.get("corpus_hash")
    if not expected:
        raise DataError("this checkpoint does not record its training corpus; pass the files to evaluate")
    try:
        corpus = read_corpus(paths or [builtin_corpus_path()], encoding=train_config.get("encoding", encoding))
    except DataError as e:
        raise DataError(f"cannot read the checkpoint's training corpus ({e}); pass the files to evaluate") from None
    if corpus.sha256 != expected:
        raise DataError(f"the training corpus ({', '.join(paths) or 'built-in'}) changed since training, "
                        "so its validation split is not the one the model held out; pass the files to evaluate")
    val_fraction = float(train_config.get("val_fraction", 0.1))
    if val_fraction <= 0:
        raise DataError("this model was trained without a validation split (--val-fraction 0); "
                        "pass the files to evaluate")
    _, val = split_ids(tokenizer.encode_array(corpus.text), val_fraction)
    return val


@dataclass
class EvalText:
    """One text to score: a file (or the checkpoint's validation split)."""

    name: str
    ids: np.ndarray
    unknown: int = 0  # characters dropped because the vocabulary lacks them (--unknown skip)


@dataclass
class FileEval:
    name: str
    result: EvalResult
    unknown: int = 0

    def to_dict(self) -> dict:
        return {"name": self.name, **self.result.to_dict(), "unknown": self.unknown}


@dataclass
class EvalReport:
    """Per-file figures and the total (character-weighted over the files)."""

    files: list[FileEval] = field(default_factory=list)

    @property
    def total(self) -> EvalResult:
        chars = sum(f.result.chars for f in self.files)
        if chars == 0:
            return EvalResult(chars=0, loss=float("nan"))
        loss = sum(f.result.loss * f.result.chars for f in self.files if f.result.chars) / chars
        return EvalResult(chars=chars, loss=loss)

    @property
    def unknown(self) -> int:
        return sum(f.unknown for f in self.files)

    def to_dict(self) -> dict:
        return {**self.total.to_dict(), "unknown": self.unknown, "files": [f.to_dict() for f in self.files]}


def load_eval_texts(tokenizer, checkpoint, files: list[str], encoding: str = "utf-8",
                    unknown: str = "error", max_chars: int | None = None) -> list[EvalText]:
    """Each of ``files`` as its own text (a folder counts as one text, its files
    joined), or with no files the checkpoint's validation split.

    ``max_chars``: only the first ones (of all texts together) are wanted;
    files are then read incrementally and no further than that (folders and
    the validation split are read whole and cut).

    ``unknown="error"`` raises :class:`VocabError` naming the file and the
    characters the vocabulary lacks; ``"skip"`` drops them and counts them.
    """
    from ..text.data import read_corpus
    from ..errors import DataError, VocabError

    if not files:
        ids = checkpoint_corpus_val(checkpoint.train_config, tokenizer, encoding)
        texts = [EvalText("validation split", np.asarray(ids))]
    else:
        texts = []
        left = max_chars
        for f in files:
            if left is not None and left <= 0:
                break
            if left is not None and os.path.isfile(f):
                texts.append(_head_of(f, tokenizer, encoding, unknown, left))
                left -= len(texts[-1].ids)
                continue
            text = read_corpus([f], encoding=encoding).text
            try:
                ids = tokenizer.encode_array(text, unknown=unknown)
            except VocabError as e:
                raise VocabError(f"{f}: {e}", characters=e.characters) from None
            texts.append(EvalText(str(f), ids, unknown=len(text) - len(ids)))
            if left is not None:
                left -= len(ids)
    for t in texts:
        if len(t.ids) < 2:
            raise DataError(f"{t.name} has {len(t.ids)} usable character(s); scoring needs at least 2 "
                            "(the first is only context)")
    return texts


def _head_of(path: str, tokenizer, encoding: str, unknown: str, max_chars: int) -> EvalText:
    """The first ``max_chars`` usable characters of a file, read no further."""
    from ..errors import VocabError
    from ..text.head import iter_text

    pieces, have, skipped = [], 0, 0
    for text in iter_text(path, encoding):
        try:
            ids = tokenizer.encode_array(text, unknown=unknown)
        except VocabError as e:
            raise VocabError(f"{path}: {e}", characters=e.characters) from None
        skipped += len(text) - len(ids)
        pieces.append(ids[: max_chars - have])
        have += len(pieces[-1])
        if have >= max_chars:
            break
    ids = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    return EvalText(str(path), ids, unknown=skipped)


def evaluate_texts(model: CharRNN, texts: list[EvalText], **kwargs) -> EvalReport:
    """Score each text on its own (each from a zero state)."""
    return EvalReport([FileEval(t.name, evaluate_ids(model, t.ids, **kwargs), t.unknown) for t in texts])


def evaluate_checkpoint_text(model: CharRNN, tokenizer, checkpoint, files: list[str],
                             encoding: str = "utf-8", unknown: str = "error") -> EvalReport:
    """Score each of ``files``, or with no files the checkpoint's own
    validation split."""
    return evaluate_texts(model, load_eval_texts(tokenizer, checkpoint, files, encoding, unknown))


# ---------------------------------------------------------------------------
# Surprisal of every character
# ---------------------------------------------------------------------------

@dataclass
class Surprisal:
    """For ``ids[1:]``: the loss (nats) of each character, its probability, and
    the model's ``top`` most likely characters with their probabilities."""

    ids: np.ndarray  # (N,) the text, including the first (context-only) character
    loss: np.ndarray  # (N-1,) nats
    prob: np.ndarray  # (N-1,)
    top_ids: np.ndarray  # (N-1, K)
    top_probs: np.ndarray  # (N-1, K)


@torch.inference_mode()
def surprisal(model: CharRNN, ids: np.ndarray | torch.Tensor, top: int = 5, chunk_len: int = 512) -> Surprisal:
    """One stream from a zero state, carried through the text: the single-stream
    definition itself, so the mean of ``loss`` is the eval figure for this text."""
    ids_np = np.asarray(ids, dtype=np.int64)
    ids_t = torch.as_tensor(ids_np)
    device = model.head.weight.device
    n = len(ids_np) - 1
    top = max(1, min(top, model.config.vocab_size))
    loss = torch.zeros(max(n, 0))
    top_ids = torch.zeros(max(n, 0), top, dtype=torch.long)
    top_probs = torch.zeros(max(n, 0), top)
    was_training = model.training
    model.eval()
    try:
        state = None
        for lo in range(0, max(n, 0), chunk_len):
            x = ids_t[lo : min(lo + chunk_len, n)].to(device)[None]  # (1, T)
            y = ids_t[lo + 1 : min(lo + chunk_len, n) + 1].to(device)  # (T,)
            logits, state = model(x, state)  # (1, T, V)
            _check_finite(logits)
            logp = F.log_softmax(logits[0].float(), dim=-1)  # (T, V)
            loss[lo : lo + len(y)] = -logp.gather(1, y[:, None])[:, 0].cpu()
            tp, ti = logp.topk(top, dim=-1)  # (T, K)
            top_ids[lo : lo + len(y)] = ti.cpu()
            top_probs[lo : lo + len(y)] = tp.exp().cpu()
    finally:
        model.train(was_training)
    return Surprisal(ids=ids_np, loss=loss.numpy(), prob=np.exp(-loss.numpy()),
                     top_ids=top_ids.numpy(), top_probs=top_probs.numpy())


# ---------------------------------------------------------------------------
# Gradient flow: how far back the loss still reaches
# ---------------------------------------------------------------------------
#
# For a window of text x_1 .. x_L (read after a burn-in that gives the model a
# realistic state), the loss at the last position, l_L = -log p(x_{L+1} | ...),
# is differentiated with respect to the top layer's hidden state h_{L-k} for
# k = 0 .. L-1. For an LSTM this is h (the output state), not the cell c: the
# cell's additive path is what keeps ||dl/dh_{L-k}|| from vanishing. The figure
# is ||dl_L/dh_{L-k}|| / ||dl_L/dh_L||, averaged geometrically over windows.
# Everything runs in float64 so a vanilla RNN's 1e-20 does not underflow.

GATE_NAMES = {"lstm": ("input", "forget", "cell", "output"), "gru": ("reset", "update", "new"), "rnn": ()}


@dataclass
class GradientFlow:
    distance: list[int]
    relative_grad_norm: list[float]  # geometric mean over windows, 1.0 at distance 0
    w_hh_max_singular_value: list[dict]  # per layer: {"layer", "matrix", "gates": {name: value}}
    windows: int
    window: int
    hidden: str = "top layer h"

    def at(self, k: int) -> float:
        return self.relative_grad_norm[self.distance.index(k)]

    def to_dict(self) -> dict:
        return {"distance": self.distance, "relative_grad_norm": self.relative_grad_norm,
                "w_hh_max_singular_value": self.w_hh_max_singular_value,
                "windows": self.windows, "window": self.window, "hidden": self.hidden}


def w_hh_singular_values(model: CharRNN) -> list[dict]:
    """Each layer's largest singular value of W_hh, whole and per gate block."""
    cfg = model.config
    H = cfg.hidden_size
    out = []
    for layer in range(cfg.num_layers):
        w = getattr(model.rnn, f"weight_hh_l{layer}").detach().double().cpu()  # (G*H, H)
        gates = {name: float(torch.linalg.matrix_norm(w[i * H : (i + 1) * H], ord=2))
                 for i, name in enumerate(GATE_NAMES[cfg.cell])}
        out.append({"layer": layer, "matrix": float(torch.linalg.matrix_norm(w, ord=2)), "gates": gates})
    return out


def _window_starts(n: int, window: int, windows: int, burn_in: int) -> list[int]:
    """Window starts spread evenly over the text; each needs ``burn_in`` before
    it and ``window + 1`` characters (the last one is the target)."""
    first, last = burn_in, n - window - 1
    if last < first:
        first = last = max(0, n - window - 1)
    return sorted(set(np.linspace(first, last, windows).round().astype(int).tolist()))


def gradient_flow(model: CharRNN, ids: np.ndarray | torch.Tensor, window: int = 100, windows: int = 32,
                  burn_in: int = 100) -> GradientFlow:
    """See the comment above. ``ids`` needs at least ``window + 1`` characters."""
    import copy

    from ..errors import DataError

    ids_np = np.asarray(ids, dtype=np.int64)
    if window < 1 or windows < 1:
        raise DataError("the gradient-flow window and the number of windows must be at least 1")
    if len(ids_np) < window + 1:
        raise DataError(f"the text has {len(ids_np)} characters; --gradient-flow with a window of {window} "
                        f"needs at least {window + 1} (pass a longer text or a smaller --window)")
    starts = _window_starts(len(ids_np), window, windows, burn_in)
    # A float64 CPU copy; its weights keep requires_grad so autograd records
    # the graph, but only the hidden states' gradients are computed.
    m = copy.deepcopy(model).cpu().double().eval()
    B = len(starts)
    # The state at each window's start, from up to burn_in characters before it.
    pre = min(burn_in, min(starts))
    state = None
    if pre > 0:
        x_pre = torch.as_tensor(np.stack([ids_np[s - pre : s] for s in starts]))  # (B, pre)
        with torch.no_grad():
            _, state = m(x_pre)
    x = torch.as_tensor(np.stack([ids_np[s : s + window] for s in starts]))  # (B, L)
    y = torch.as_tensor(ids_np[[s + window for s in starts]])  # (B,)
    hs = []  # the top layer's hidden state after each step, each (B, H)
    with torch.enable_grad():
        emb = m.embedding(x)  # (B, L, E)
        for t in range(window):
            _, state = m.rnn(emb[:, t : t + 1], state)  # state: (layers, B, H), or (h, c) for LSTM
            h_all = state[0] if isinstance(state, tuple) else state
            top = h_all[-1]  # (B, H): the tensor we differentiate with respect to
            hs.append(top)
            # Route the next step through `top`, so every later use of h_t counts.
            h_all = torch.cat([h_all[:-1], top[None]], dim=0)
            state = (h_all, state[1]) if isinstance(state, tuple) else h_all
        logits = m.head(hs[-1])  # (B, V)
        loss = F.cross_entropy(logits, y, reduction="sum")  # windows are independent rows
        grads = torch.autograd.grad(loss, hs, allow_unused=True)
    tiny = np.finfo(np.float64).tiny
    norms = np.array([[0.0] * B if g is None else g.norm(dim=1).tolist() for g in grads])  # (L, B), k = L-1-t
    norms = norms[::-1]  # (L, B) by distance k
    rel = np.maximum(norms, tiny) / np.maximum(norms[0:1], tiny)
    geo = np.exp(np.log(np.maximum(rel, tiny)).mean(axis=1))
    return GradientFlow(distance=list(range(window)), relative_grad_norm=[float(v) for v in geo],
                        w_hh_max_singular_value=w_hh_singular_values(m), windows=B, window=window)
