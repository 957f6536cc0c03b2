"""The web export: one HTML file that runs a checkpoint in any browser, offline.

The page (``web_page.html``) embeds the model's weights (base64) and its
JavaScript (``web_model.js``: the cell equations, Philox4x32-10 and the
inverse-CDF pick of :mod:`charnn.generation.sample`, in float64), so the same
checkpoint, prime, options and seed give ``charnn sample``'s text up to the
near-tie condition docs/export.md states.

Weights are stored as fp32, int16 or int8 (symmetric, one fp32 scale per
row); biases are always fp32 (they are a few hundred numbers). ``auto`` keeps
fp32 whenever that page is at most :data:`MAX_FP32_PAGE` bytes (the text
closest to ``charnn sample``'s); above, it picks int16 when the loss on the
model's validation text with int16-rounded weights is within
:data:`AUTO_TOLERANCE` of the fp32 loss, else fp32. int16 rather than fp16:
the same size, and 6 to 17 times closer to fp32 on the models measured in
docs/export.md. Each tensor is stored as the checkpoint names it; the page folds layer 0's input weights
with the embedding in float64 when it first meets a character.
"""

from __future__ import annotations

import base64
import copy
import html
import json
import math
import os
import re
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from ..errors import CharnnError, NonFiniteError
from ..generation.sample import DEFAULT_TEMPERATURE, MAX_TEMPERATURE, START_CANDIDATES, generate_samples
from ..model.rnn import CharRNN
from ..model.scoring import evaluate_ids
from ..storage.checkpoint import Checkpoint, load_model
from ..storage.outputs import check_output, corpus_inputs, write_output
from .result import ExportResult

MAX_FP32_PAGE = 4_000_000  # auto keeps fp32 (the closest to charnn sample) for a page up to this size
COMPACT = "int16"  # auto's storage for larger models ...
AUTO_TOLERANCE = 0.005  # ... when it costs at most 0.5% of the fp32 loss
MAX_VAL_CHARS = 50_000  # characters of the validation split scored per storage
SELF_SAMPLES, SELF_LENGTH = 4, 500  # without a readable corpus: the model's own samples, scored
SELF_SEED = 0
INTEGER_STORAGES = {"int16": (32767, torch.int16, "i16", "<i2"), "int8": (127, torch.int8, "i8", "i1")}
_PLACEHOLDER = re.compile(r"@@(TITLE|INFO|META|WEIGHTS|MODEL_JS)@@")


def export_web(checkpoint: str | os.PathLike, out: str | os.PathLike, *, weights: str = "auto",
               note: str | None = None, overwrite: bool = False) -> ExportResult:
    """Write ``checkpoint`` as a self-contained web page at ``out``."""
    from ..errors import format_bytes

    out = Path(out)
    check_output(out, "html", "--out", inputs=[checkpoint], overwrite=overwrite)
    model, tokenizer, ckpt = load_model(checkpoint)
    check_output(out, "html", "--out", inputs=corpus_inputs(ckpt.train_config), overwrite=overwrite)
    page, storage, loss = None, weights, "unchanged (the checkpoint's own weights)"
    if weights in ("fp32", "auto"):
        page = build_page(ckpt, Path(checkpoint), *pack_weights(model, "fp32"), note)
        fp32_bytes = len(page.encode("utf-8"))
        if weights == "auto" and fp32_bytes <= MAX_FP32_PAGE:
            storage, loss = "fp32", f"{loss[:-1]}; auto keeps fp32 for a page of at most {format_bytes(MAX_FP32_PAGE)})"
        elif weights == "auto":
            page = None
            why = f"an fp32 page would be {format_bytes(fp32_bytes)}, over {format_bytes(MAX_FP32_PAGE)}"
    if page is None:
        texts, source = validation_texts(model, tokenizer, ckpt)
        storage, change = choose_storage(model, texts, text_loss(model, texts), weights)
        measured = f"{change:+.2%} vs fp32 on {source}"
        if weights != "auto":
            loss = measured
        elif storage == COMPACT:
            loss = f"{measured}; {why}"
        else:
            loss = (f"{loss[:-1]}; {COMPACT} would change it by {measured}, more than the "
                    f"{AUTO_TOLERANCE:.1%} auto allows)")
        page = build_page(ckpt, Path(checkpoint), *pack_weights(model, storage), note)
    path = write_output(out, page)
    return ExportResult(path, len(page.encode("utf-8")), "web", {"weights": storage, "loss": loss})


# ---------------------------------------------------------------------------
# Storage and its loss
# ---------------------------------------------------------------------------

def validation_texts(model: CharRNN, tokenizer, ckpt: Checkpoint) -> tuple[list[np.ndarray], str]:
    """Ids to measure the storage's loss on, and what they are: the
    checkpoint's validation split (its first :data:`MAX_VAL_CHARS`) when the
    training corpus is still there and unchanged, else text the model writes
    itself (seeded, so an export is repeatable)."""
    from ..analysis.evaluate import checkpoint_corpus_val

    try:
        val = np.asarray(checkpoint_corpus_val(ckpt.train_config, tokenizer))[: MAX_VAL_CHARS + 1]
    except CharnnError:
        val = np.zeros(0)
    if len(val) >= 2:
        return [val], f"{len(val) - 1:,} characters of the validation split"
    samples = generate_samples(model, tokenizer, "", SELF_LENGTH, num_samples=SELF_SAMPLES, temperature=1.0,
                               seed=SELF_SEED, precision="fp32")
    texts = [tokenizer.encode_array(s.text) for s in samples]
    texts = [t for t in texts if len(t) >= 2]
    return texts, f"{sum(len(t) - 1 for t in texts):,} characters the model wrote (its corpus is not readable)"


def text_loss(model: CharRNN, texts: list[np.ndarray]) -> float:
    total = sum(evaluate_ids(model, t).loss * (len(t) - 1) for t in texts)
    return total / max(1, sum(len(t) - 1 for t in texts))


def round_tensor(t: torch.Tensor, storage: str) -> tuple[bytes, dict, torch.Tensor]:
    """A weight as the page stores it: its bytes, its spec (dtype, and the
    row scales' place for int16/int8, relative to the bytes) and the float32
    values the page decodes. Vectors (biases) are always fp32."""
    t = t.detach().float().cpu().contiguous()
    if storage == "fp32" or t.dim() == 1:
        return t.numpy().astype("<f4").tobytes(), {"dtype": "f32"}, t
    # Symmetric integers with one fp32 scale per row: q = round(w / s),
    # s = max|row| / qmax; the page decodes q * s in float32, as torch does here.
    qmax, dtype, code, little = INTEGER_STORAGES[storage]
    rows = t.reshape(t.shape[0], -1)
    scale = rows.abs().amax(1) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(rows / scale[:, None]).clamp_(-qmax, qmax).to(dtype)
    decoded = (q.float() * scale[:, None]).reshape(t.shape)
    qb = q.numpy().astype(little).tobytes()
    pad = -len(qb) % 4
    return qb + b"\0" * pad + scale.numpy().astype("<f4").tobytes(), {"dtype": code, "scales": len(qb) + pad}, decoded


def rounded_model(model: CharRNN, storage: str) -> CharRNN:
    """A copy of ``model`` with the weights the page would use."""
    if storage == "fp32":
        return model
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.copy_(round_tensor(p, storage)[2])
    return twin


def choose_storage(model: CharRNN, texts: list[np.ndarray], base: float, weights: str) -> tuple[str, float]:
    """The storage and the relative loss change of ``weights`` (for auto,
    of int16, whether picked or not) against fp32: inf where the rounded
    model's values overflow."""
    def change(storage: str) -> float:
        if storage == "fp32":
            return 0.0
        twin = rounded_model(model, storage)
        try:
            loss = text_loss(twin, texts)
        except NonFiniteError:
            return math.inf
        return (loss - base) / base if base > 0 else (0.0 if loss == base else math.inf)

    if weights != "auto":
        return weights, change(weights)
    compact = change(COMPACT)
    return (COMPACT, compact) if compact <= AUTO_TOLERANCE else ("fp32", compact)


def pack_weights(model: CharRNN, storage: str) -> tuple[bytes, list[dict]]:
    """Every tensor of the state dict, each at a 4-byte aligned offset."""
    parts, specs, offset = [], [], 0
    for name, t in model.state_dict().items():
        data, spec, _ = round_tensor(t, storage)
        if "scales" in spec:
            spec["scales"] += offset
        specs.append({"name": name, "shape": list(t.shape), "offset": offset, **spec})
        data += b"\0" * (-len(data) % 4)
        parts.append(data)
        offset += len(data)
    return b"".join(parts), specs


# ---------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------

def model_name(path: Path) -> str:
    """The run folder's name for ``runs/x/best.pt`` (or a folder), else the file's stem."""
    if path.is_dir():
        return path.resolve().name
    return path.resolve().parent.name if path.name in ("best.pt", "last.pt") else path.stem


def shown_path(path: Path) -> str:
    """The checkpoint as the page's sample command names it: as given when
    relative; an absolute path only by its last two parts (the run folder and
    the file), so a shared page does not carry the author's folders."""
    return str(path) if not path.is_absolute() else str(Path(*path.parts[-2:]))


def _script_json(data: object) -> str:
    """JSON that cannot end its <script> element (or open a comment) early."""
    text = json.dumps(data, ensure_ascii=True, allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def info_html(ckpt: Checkpoint, name: str, note: str | None) -> str:
    """The header: name, shape, training figures, vocabulary and note, escaped
    (shown with JavaScript off too)."""
    from ..analysis.report import escape_vocab

    mc, ts = ckpt.model_config, ckpt.train_state
    params = sum(t.numel() for t in ckpt.data["model_state"].values())
    e = html.escape
    lines = [f"<h1>{e(name)}</h1>",
             f'<p class="info">{e(mc.cell.upper())} {mc.num_layers}x{mc.hidden_size}, embedding {mc.embedding_dim}, '
             f"{params:,} parameters, {mc.vocab_size:,} characters · made with charnn</p>"]
    figures = []
    if isinstance(ts.get("step"), int):
        figures.append(f"{ts['step']:,} training steps")
    if isinstance(ts.get("chars_seen"), int):
        figures.append(f"{ts['chars_seen']:,} characters seen")
    best = ts.get("best_val")
    if isinstance(best, (int, float)) and math.isfinite(best):
        figures.append(f"best validation loss {best:.4f} nats ({best / math.log(2):.3f} bits/char)")
    if figures:
        lines.append(f'<p class="info">{e(", ".join(figures))}</p>')
    lines.append(f'<p class="info">vocabulary: <code>{e(escape_vocab(ckpt.tokenizer.chars))}</code></p>')
    if note:
        lines.append(f'<p class="note">{e(note)}</p>')
    return "\n".join(lines)


def start_id(tokenizer) -> int:
    """sample.start_ids for the empty prime."""
    return next((tokenizer.stoi[c] for c in START_CANDIDATES if c in tokenizer), 0)


def build_page(ckpt: Checkpoint, checkpoint: Path, blob: bytes, specs: list[dict], note: str | None) -> str:
    mc = ckpt.model_config
    name = model_name(checkpoint)
    meta = {"name": name, "file": shown_path(checkpoint), "cell": mc.cell, "num_layers": mc.num_layers,
            "hidden_size": mc.hidden_size, "embedding_dim": mc.embedding_dim,
            "vocab": list(ckpt.tokenizer.chars), "start_id": start_id(ckpt.tokenizer),
            "default_temperature": DEFAULT_TEMPERATURE,
            "max_temperature": MAX_TEMPERATURE, "tensors": specs}
    pkg = resources.files(__package__)
    values = {"TITLE": html.escape(f"{name} · charnn"), "INFO": info_html(ckpt, name, note), "META": _script_json(meta),
              "WEIGHTS": base64.b64encode(blob).decode("ascii"),
              "MODEL_JS": pkg.joinpath("web_model.js").read_text(encoding="utf-8")}
    template = pkg.joinpath("web_page.html").read_text(encoding="utf-8")
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)

