"""charnn serve's requests: the limits, the models loaded at start, and each
request checked and parsed, with an error that says what to change; and
scoring (the numbers of ``charnn eval``)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CharnnError, VocabError, describe_char
from ..analysis.evaluate import evaluate_ids, surprisal
from ..generation.sample import MAX_SEED, MAX_TEMPERATURE, check_prime, random_seed, validate_options

INSTALL_HINT = "pip install 'charnn[serve]'"
MAX_TOP = 10  # alternatives per character a request may ask for


class ServeError(CharnnError):
    """The server cannot start: the extra is missing, the address is taken, ..."""


class ApiError(CharnnError):
    """A request the server refuses: ``status`` is the HTTP code, ``field`` the
    JSON field to change (if one is to blame)."""

    def __init__(self, status: int, message: str, field: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.field = field
        self.headers = headers or {}

    def to_dict(self) -> dict[str, Any]:
        err: dict[str, Any] = {"message": str(self), "status": self.status}
        if self.field:
            err["field"] = self.field
        return {"error": err}


def require_extra() -> None:
    """Raise :class:`ServeError` naming the install command if Starlette or
    uvicorn is missing."""
    missing = []
    for name in ("starlette", "uvicorn"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ServeError(f"charnn serve needs the optional web server packages ({', '.join(missing)} "
                         f"missing); install them with: {INSTALL_HINT}")


# ---------------------------------------------------------------------------
# Limits and models
# ---------------------------------------------------------------------------

@dataclass
class Limits:
    max_queue: int = 64  # requests accepted but not yet in the batch; beyond this, 503 + Retry-After
    max_batch: int = 64  # streams stepped together per model; more wait in the queue
    max_n: int = 2000  # characters generated per sample
    max_prime: int = 4000  # characters of prime (read in one pass before the first character)
    max_samples: int = 8  # num_samples per request (charnn sample uses fp32 below 16, as the server does)
    max_text: int = 100_000  # characters /v1/score reads
    max_body: int = 1 << 20  # bytes of request body
    max_connections: int = 512  # open connections; more get 503 at once (fewer where the open-files limit is lower)
    client_timeout: int = 10  # seconds a client may take to send its headers, its body, or to take a piece of a reply
    stream_buffer: int = 16384  # characters (each with its alternatives) a stream may hold for a client not reading
    batch_timeout: int = 10  # seconds a batch process with work may go without answering before it is stopped

    def __post_init__(self) -> None:
        for name, value in self.__dict__.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ServeError(f"limit {name.replace('_', '-')} must be a positive whole number, got {value!r}")

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class ServedModel:
    name: str
    path: Path
    model: Any  # CharRNN, in eval mode
    tokenizer: Any  # CharTokenizer
    checkpoint: Any  # charnn.storage.checkpoint.Checkpoint
    copy_index: Any = None  # CopyIndex of the training text, when it is there and unchanged
    copy_label: str = ""  # the training text's name, for the reports
    copy_note: str = ""  # why there is no copy index

    def describe(self) -> dict[str, Any]:
        ts = self.checkpoint.train_state or {}
        best = ts.get("best_val")
        best = best if isinstance(best, (int, float)) and not isinstance(best, bool) and math.isfinite(best) else None
        # JSON has no NaN or infinity: a figure that is not finite is shown as null
        plain = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in ts.items()
                 if isinstance(v, (int, float, str, bool)) or v is None}
        return {
            "name": self.name,
            "file": str(self.path),
            "model_config": self.checkpoint.model_config.to_dict(),
            "vocab_size": self.tokenizer.vocab_size,
            "vocab": self.tokenizer.to_list(),
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "copies": {"against": self.copy_label} if self.copy_index is not None else {"note": self.copy_note},
            "training": {
                "step": plain.get("step"),
                "chars_seen": plain.get("chars_seen"),
                "elapsed": plain.get("elapsed"),
                "best_val_loss": best,
                "best_val_bpc": best / math.log(2) if best is not None else None,
            },
        }


def model_names(paths: list[Path]) -> list[str]:
    """A name per checkpoint: the file stem (``best``), and where stems clash,
    as many of the folders above as tell them apart (``run1/best``,
    ``run2/best``; ``a/run1/best``, ``b/run1/best``). The names depend only on
    the paths given, so a restart with the same command keeps them. The same
    file twice is a :class:`ServeError`."""
    resolved = [p.resolve() for p in paths]
    for i, r in enumerate(resolved):
        for j in range(i):
            if r == resolved[j] or (r.exists() and resolved[j].exists() and os.path.samefile(r, resolved[j])):
                raise ServeError(f"{paths[i]} and {paths[j]} are the same checkpoint; give each file once")
    # Parts from the resolved path, so that "best.pt" in the current folder gets that folder's name too.
    parts = [list(r.with_suffix("").parts[1:]) or [r.stem] for r in resolved]
    depth = [1] * len(paths)
    while True:
        names = ["/".join(p[-d:]) for p, d in zip(parts, depth)]
        clashing = {n for n in names if names.count(n) > 1}
        grow = [i for i, n in enumerate(names) if n in clashing and depth[i] < len(parts[i])]
        if not grow:
            break
        for i in grow:
            depth[i] += 1
    return names  # distinct: the resolved paths are, and a clash grows until the whole path is used


def load_models(paths: list[str | Path], progress: Any = None) -> list[ServedModel]:
    """Load each checkpoint once (CPU, eval mode), named by :func:`model_names`,
    with the copy index of its training text where that text is there and
    unchanged (``copy_note`` says why not; ``progress`` hears of index builds)."""
    from ..generation.copies import open_index, recorded_text
    from ..storage.checkpoint import load_model

    if not paths:
        raise ServeError("give at least one checkpoint to serve")
    paths = [Path(p) for p in paths]
    out = []
    for p, name in zip(paths, model_names(paths)):
        model, tokenizer, ckpt = load_model(p, device="cpu")
        served = ServedModel(name, p, model.eval(), tokenizer, ckpt)
        text, served.copy_note = recorded_text(ckpt.train_config, None)
        if text is not None:
            try:
                served.copy_index, served.copy_label = open_index(text, progress), text.label
            except CharnnError as e:
                served.copy_note = str(e)
        out.append(served)
    return out


def copy_reports(served: ServedModel, samples: list[dict[str, Any]], span: int) -> list[dict[str, Any]]:
    """Each finished sample with its copy report (``copies``; null where the
    training text is not available)."""
    from ..generation.copies import copy_report

    index = served.copy_index
    return [{**s, "copies": None if index is None else
             copy_report(index, s["text"], len(s["prime"]), span, served.copy_label).to_dict()} for s in samples]


# ---------------------------------------------------------------------------
# Requests: parsing and checking, every message says what to change
# ---------------------------------------------------------------------------

GENERATE_FIELDS = ("model", "prime", "n", "temperature", "top_k", "top_p", "seed", "stop", "num_samples",
                   "stream", "unknown", "top", "max_copy", "copy_span")
SCORE_FIELDS = ("model", "text", "unknown", "top")
DEFAULTS = {"prime": "", "n": 500, "temperature": 0.8, "top_k": 0, "top_p": 1.0, "seed": None, "stop": None,
            "num_samples": 1, "stream": False, "unknown": "error", "top": 0, "max_copy": None,
            "copy_span": 20}  # charnn sample's defaults


@dataclass
class GenerateSpec:
    model: str
    prime: str  # usable prime (unknown characters dropped under unknown=skip)
    n: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    stop: str | None
    num_samples: int
    stream: bool
    top: int
    dropped: list[str] = field(default_factory=list)
    max_copy: int | None = None  # the longest span of the training text a sample may repeat
    copy_span: int = 20  # the copy report counts spans of this many characters or more


def _no_constant(name: str) -> Any:
    raise ApiError(400, f"the request body holds {name}, which is not JSON; send numbers as plain decimals")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ApiError(400, f"field {json.dumps(k)[:80]} appears twice in one object; send it once", k)
        out[k] = v
    return out


def parse_json(raw: bytes) -> Any:
    """The request body as strict JSON (RFC 8259: no NaN or Infinity, no
    repeated keys), or a 400 :class:`ApiError` saying what is wrong."""
    try:
        return json.loads(raw.decode("utf-8") if raw else "null", parse_constant=_no_constant,
                          object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the request body is not UTF-8 ({e.reason} at byte {e.start}); send JSON in UTF-8") from None
    except RecursionError:
        raise ApiError(400, "the request body nests arrays or objects too deeply; send a flat JSON object") from None
    except json.JSONDecodeError as e:
        raise ApiError(400, f"the request body is not valid JSON ({e}); send a JSON object") from None
    except ValueError as e:  # an integer of thousands of digits (Python's int limit)
        raise ApiError(400, f"the request body holds a number too long to read ({e}); send a smaller one") from None


def _check_fields(body: Any, allowed: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object, like {\"prime\": \"The \", \"n\": 200}")
    unknown = [k for k in body if k not in allowed]
    if unknown:
        raise ApiError(400, f"unknown field {unknown[0]!r}; the fields are: {', '.join(allowed)}", unknown[0])
    return body


def _int(body: dict, name: str, lo: int, hi: int | None, default: Any, what: str = "") -> Any:
    v = body.get(name, default)
    if v is None and default is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise ApiError(400, f"{name} must be a whole number{what}, got {json.dumps(v)}", name)
    if v < lo or (hi is not None and v > hi):
        rng = f"from {lo} to {hi}" if hi is not None else f"at least {lo}"
        raise ApiError(400, f"{name} must be {rng}{what}, got {v}", name)
    return v


def _float(body: dict, name: str, default: float) -> float:
    v = body.get(name, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ApiError(400, f"{name} must be a number, got {json.dumps(v)}", name)
    return float(v)


def _str(body: dict, name: str, default: Any, limit: int | None = None) -> Any:
    v = body.get(name, default)
    if v is None and default is None:
        return None
    if not isinstance(v, str):
        raise ApiError(400, f"{name} must be a string, got {json.dumps(v)[:80]}", name)
    if limit is not None and len(v) > limit:
        raise ApiError(413, f"{name} has {len(v):,} characters; this server takes at most {limit:,} "
                            f"(send a shorter {name}, or start the server with a larger limit)", name)
    return v


def _model(body: dict, models: dict[str, ServedModel]) -> ServedModel:
    name = body.get("model")
    if name is None:
        return next(iter(models.values()))
    if not isinstance(name, str) or name not in models:
        raise ApiError(404, f"no model named {json.dumps(name)[:80]}; this server has: {', '.join(models)} "
                            "(GET /v1/models lists them)", "model")
    return models[name]


def _unknown(body: dict) -> str:
    v = body.get("unknown", "error")
    if v not in ("error", "skip"):
        raise ApiError(400, f"unknown must be \"error\" or \"skip\", got {json.dumps(v)[:80]}", "unknown")
    return v


def _vocab_error(e: VocabError, field_name: str) -> ApiError:
    chars = e.characters
    shown = ", ".join(describe_char(c) for c in chars[:20]) + (f" and {len(chars) - 20} more" if len(chars) > 20 else "")
    return ApiError(400, f"the {field_name} has {len(chars)} character(s) not in the model's vocabulary: {shown}. "
                         "Remove them, or send \"unknown\": \"skip\" to drop them", field_name)


def parse_generate(body: Any, models: dict[str, ServedModel], limits: Limits) -> GenerateSpec:
    body = _check_fields(body, GENERATE_FIELDS)
    served = _model(body, models)
    prime = _str(body, "prime", "", limits.max_prime)
    n = _int(body, "n", 0, limits.max_n, DEFAULTS["n"])
    temperature = _float(body, "temperature", DEFAULTS["temperature"])
    if temperature < 0:
        raise ApiError(400, f"temperature must be 0 (greedy) or a positive number, got {temperature}", "temperature")
    if temperature > MAX_TEMPERATURE:
        raise ApiError(400, f"temperature must be at most {MAX_TEMPERATURE:.4g} (float32's largest number), "
                            f"got {temperature:g}", "temperature")
    top_k = _int(body, "top_k", 0, None, 0, " (0 = off)")
    top_p = _float(body, "top_p", 1.0)
    if not 0 < top_p <= 1:
        raise ApiError(400, f"top_p must be in (0, 1], got {top_p}", "top_p")
    num_samples = _int(body, "num_samples", 1, limits.max_samples, 1)
    # charnn sample's range: every stream's seed + i is a 64-bit unsigned number
    seed = _int(body, "seed", 0, MAX_SEED - (num_samples - 1), None,
                f" (seed + i for each of the {num_samples} samples must be below 2**64)" if num_samples > 1 else "")
    stop = _str(body, "stop", None, limits.max_prime)
    if stop == "":
        raise ApiError(400, "stop must not be empty; leave it out (or null) for no stop string", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, f"stream must be true or false, got {json.dumps(stream)[:80]}", "stream")
    top = _int(body, "top", 0, MAX_TOP, 0, " (alternatives per character; 0 = none)")
    unknown = _unknown(body)
    max_copy = _int(body, "max_copy", 1, None, None, " (the longest span of the training text a sample may "
                    "repeat; null for no limit)")
    if max_copy is not None and served.copy_index is None:
        raise ApiError(400, f"max_copy needs the model's training text, and {served.copy_note}: this server "
                            "cannot check copies for this model; leave max_copy out", "max_copy")
    copy_span = _int(body, "copy_span", 1, None, 20)
    validate_options(temperature, top_k, top_p, n, num_samples, "fp32")  # the library's own checks, too
    try:
        usable, dropped = check_prime(served.tokenizer, prime, unknown)
    except VocabError as e:
        raise _vocab_error(e, "prime") from None
    return GenerateSpec(served.name, usable, n, temperature, top_k, top_p,
                        random_seed() if seed is None else seed, stop, num_samples, stream, top, dropped,
                        max_copy, copy_span)



class Busy(ApiError):
    def __init__(self, name: str, limit: int):
        super().__init__(503, f"model {name} has {limit} requests waiting already; retry in a second "
                              "(or start the server with a larger --max-queue)", headers={"Retry-After": "1"})



# ---------------------------------------------------------------------------
# Scoring (the numbers of charnn eval)
# ---------------------------------------------------------------------------

def score_text(served: ServedModel, text: str, unknown: str = "error", top: int = 5) -> dict[str, Any]:
    """Loss of ``text`` exactly as ``charnn eval`` computes it for a file with
    this content, and each character's probability and top alternatives."""
    from ..text.data import normalize_newlines

    tok = served.tokenizer
    text = normalize_newlines(text)  # as a file is read
    try:
        ids = tok.encode_array(text, unknown=unknown)
    except VocabError as e:
        raise _vocab_error(e, "text") from None
    if len(ids) < 2:
        raise ApiError(400, f"the text has {len(ids)} usable character(s); scoring needs at least 2 "
                            "(the first is only context)", "text")
    result = evaluate_ids(served.model, ids)
    s = surprisal(served.model, ids, top=max(1, top))
    chars = tok.decode(ids.tolist())
    per_char = []
    for j in range(len(ids) - 1):
        entry: dict[str, Any] = {"char": chars[j + 1], "prob": float(s.prob[j]), "loss": float(s.loss[j])}
        if top:
            entry["top"] = [[tok.chars[int(i)], float(p)] for i, p in zip(s.top_ids[j][:top], s.top_probs[j][:top])]
        per_char.append(entry)
    return {"model": served.name, **result.to_dict(), "unknown": len(text) - len(ids),
            "context": chars[0], "characters": per_char}


def parse_score(body: Any, models: dict[str, ServedModel], limits: Limits) -> tuple[ServedModel, str, str, int]:
    body = _check_fields(body, SCORE_FIELDS)
    served = _model(body, models)
    if "text" not in body:
        raise ApiError(400, "text is missing: send {\"text\": \"...\"} with the text to score", "text")
    text = _str(body, "text", None, limits.max_text)
    return served, text, _unknown(body), _int(body, "top", 0, MAX_TOP, 5)
