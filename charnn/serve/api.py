"""charnn serve's requests: the limits, the models loaded at start, and each
request checked and parsed, with an error that says what to change; and
scoring (the numbers of ``charnn eval``)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CharnnError, VocabError, describe_char
from ..analysis.evaluate import evaluate_ids, surprisal
from ..generation.sample import check_prime, random_seed, validate_options

INSTALL_HINT = "pip install 'charnn[serve]'"
MAX_TOP = 10  # alternatives per character a request may ask for
SEED_LIMIT = 2**63  # torch.Generator.manual_seed takes 64-bit seeds; seed + i must stay below


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
    checkpoint: Any  # charnn.checkpoint.Checkpoint

    def describe(self) -> dict[str, Any]:
        ts = self.checkpoint.train_state or {}
        best = ts.get("best_val")
        plain = {k: v for k, v in ts.items() if isinstance(v, (int, float, str, bool)) or v is None}
        return {
            "name": self.name,
            "file": str(self.path),
            "model_config": self.checkpoint.model_config.to_dict(),
            "vocab_size": self.tokenizer.vocab_size,
            "vocab": self.tokenizer.to_list(),
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "training": {
                "step": plain.get("step"),
                "chars_seen": plain.get("chars_seen"),
                "elapsed": plain.get("elapsed"),
                "best_val_loss": best if isinstance(best, (int, float)) else None,
                "best_val_bpc": best / math.log(2) if isinstance(best, (int, float)) else None,
            },
        }


def load_models(paths: list[str | Path]) -> list[ServedModel]:
    """Load each checkpoint once (CPU, eval mode). Names are the file stems,
    made unique with the folder name (``run1/best``) when two stems clash."""
    from ..storage.checkpoint import load_model

    if not paths:
        raise ServeError("give at least one checkpoint to serve")
    paths = [Path(p) for p in paths]
    names = [p.stem for p in paths]
    for i, p in enumerate(paths):
        if names.count(p.stem) > 1:
            names[i] = f"{p.parent.name}/{p.stem}" if p.parent.name else p.stem
    seen: dict[str, int] = {}
    out = []
    for p, name in zip(paths, names):
        if name in seen:  # the same file twice, or the same folder/stem
            seen[name] += 1
            name = f"{name}-{seen[name]}"
        seen.setdefault(name, 1)
        model, tokenizer, ckpt = load_model(p, device="cpu")
        out.append(ServedModel(name, p, model.eval(), tokenizer, ckpt))
    return out


# ---------------------------------------------------------------------------
# Requests: parsing and checking, every message says what to change
# ---------------------------------------------------------------------------

GENERATE_FIELDS = ("model", "prime", "n", "temperature", "top_k", "top_p", "seed", "stop", "num_samples",
                   "stream", "unknown", "top")
SCORE_FIELDS = ("model", "text", "unknown", "top")
DEFAULTS = {"prime": "", "n": 500, "temperature": 0.8, "top_k": 0, "top_p": 1.0, "seed": None, "stop": None,
            "num_samples": 1, "stream": False, "unknown": "error", "top": 0}  # charnn sample's defaults


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
    top_k = _int(body, "top_k", 0, None, 0, " (0 = off)")
    top_p = _float(body, "top_p", 1.0)
    if not 0 < top_p <= 1:
        raise ApiError(400, f"top_p must be in (0, 1], got {top_p}", "top_p")
    num_samples = _int(body, "num_samples", 1, limits.max_samples, 1)
    seed = _int(body, "seed", 0, SEED_LIMIT - 1 - num_samples, None)
    stop = _str(body, "stop", None, limits.max_prime)
    if stop == "":
        raise ApiError(400, "stop must not be empty; leave it out (or null) for no stop string", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, f"stream must be true or false, got {json.dumps(stream)[:80]}", "stream")
    top = _int(body, "top", 0, MAX_TOP, 0, " (alternatives per character; 0 = none)")
    unknown = _unknown(body)
    validate_options(temperature, top_k, top_p, n, num_samples, "fp32")  # the library's own checks, too
    try:
        usable, dropped = check_prime(served.tokenizer, prime, unknown)
    except VocabError as e:
        raise _vocab_error(e, "prime") from None
    return GenerateSpec(served.name, usable, n, temperature, top_k, top_p,
                        random_seed() if seed is None else seed, stop, num_samples, stream, top, dropped)



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
