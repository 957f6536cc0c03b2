"""charnn serve: a page for people and a small HTTP API for programs, over
models loaded once at start. An optional extra: ``pip install 'charnn[serve]'``
(Starlette on uvicorn); nothing else in charnn needs it.

Three pieces:

- :class:`Engine` -- one worker thread per model that steps every active
  stream together. A request's streams (its ``num_samples``) are a *group*:
  the group's prime is read off the worker thread (or copied from a recent
  request with the same prime: :class:`PrimeCache`), then it joins the batch
  between two steps and leaves when its last stream ends::

      step:      1   2   3   4   5   6   7 ...
      request A  a0  a1  a2  a3                   (n=4)
      request B      b0  b1  b2  b3  b4  b5 ...   (joins at step 2)
      request C              c0  c1  ...          (joins when it was primed)

  Each step is one :meth:`PackedRNN.step` over all rows; each group then picks
  its next characters with exactly the arithmetic of :class:`charnn.sample.Sampler`
  (same seeds ``seed + i``, same Gumbel noise blocks, same pick on the same
  (k, V) rows), so a request's text is ``charnn sample``'s text. One caveat,
  below the text: MKL multiplies a batch of 1-3 rows by other kernels than a
  bigger batch (1 row: a matrix-vector product), so for a request of 1-3
  samples the logits may differ from ``charnn sample``'s in the last bit; a
  character changes only if its two best candidates tie to within ~1e-6
  (none in 38,400 characters measured). From 4 samples on, with one thread,
  the rows are bit-for-bit ``charnn sample``'s.
- :func:`create_app` -- the ASGI app: ``GET /`` (the page), ``GET /v1/models``,
  ``POST /v1/generate`` (JSON, or server-sent events with ``"stream": true``),
  ``POST /v1/score`` (the numbers of ``charnn eval``).
- :func:`run` -- uvicorn on a bound socket; Ctrl-C or SIGTERM stop accepting,
  let in-flight streams finish for ``grace`` seconds, end the rest with an
  ``error`` event, and return normally.

Library code: it prints nothing (uvicorn logs warnings through ``logging``).
"""

from __future__ import annotations

import asyncio
import json
import math
import signal
import socket
import sys
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .errors import CharnnError, VocabError, describe_char
from .evaluate import evaluate_ids, surprisal
from .fastrnn import PackedRNN
from .sample import NOISE_BLOCK, Sampler, check_prime, random_seed, start_ids, validate_options

INSTALL_HINT = "pip install 'charnn[serve]'"
PAGE_FILE = "serve_page.html"
FLUSH_INTERVAL = 0.05  # seconds between two sends of one stream (the first character goes at once)
PRIME_CACHE = 64  # primes per model whose state is kept for the next request with the same prime
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
    from .checkpoint import load_model

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


# ---------------------------------------------------------------------------
# The batching engine
# ---------------------------------------------------------------------------

class Busy(ApiError):
    def __init__(self, name: str, limit: int):
        super().__init__(503, f"model {name} has {limit} requests waiting already; retry in a second "
                              "(or start the server with a larger --max-queue)", headers={"Retry-After": "1"})


class Channel:
    """Items from the worker thread to one request's coroutine. The worker
    wakes the event loop only when the coroutine is waiting, so a busy stream
    costs one wake-up per send, not one per character."""

    def __init__(self, loop: asyncio.AbstractEventLoop, wake_on: tuple[str, ...] = ("text", "done", "error")):
        self.loop = loop
        self.wake_on = wake_on  # a JSON (not streamed) reply waits for "done" only
        self._items: deque = deque()
        self._lock = threading.Lock()
        self._waiter: asyncio.Future | None = None

    def put(self, item: Any) -> None:
        with self._lock:
            self._items.append(item)
            waiter = None
            if item[0] in self.wake_on:
                waiter, self._waiter = self._waiter, None
        if waiter is not None:
            self.loop.call_soon_threadsafe(_wake, waiter)

    async def get_all(self) -> list[Any]:
        while True:
            with self._lock:
                if self._items:
                    items = list(self._items)
                    self._items.clear()
                    return items
                self._waiter = waiter = self.loop.create_future()
            await waiter


def _wake(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


class _GroupSampler(Sampler):
    """Sampler's noise (``_noise``) and pick (``_pick``) -- the exact arithmetic
    ``charnn sample`` runs -- without packing the model again: the batch
    shares one PackedRNN, and Sampler.__init__ would pack a copy per request."""

    def __init__(self, tokenizer: Any, temperature: float, top_k: int, top_p: float, device: torch.device):
        self._set_options(tokenizer, temperature, top_k, top_p, device)


class _StreamText:
    """One sample's generated text, and how much of it is safe to send: with a
    stop string, characters that might begin it are held back (as
    ``sample.generate`` does), and the text ends before its first occurrence."""

    def __init__(self, stop: str | None):
        self.stop = stop
        self.chars: list[str] = []
        self.sent = 0
        self.cut = -1  # where stop was found

    def add(self, ch: str) -> tuple[int, int]:
        """Append one character; the span (start, end) of the text now safe to send."""
        if self.cut >= 0:
            return self.sent, self.sent
        chars, stop = self.chars, self.stop
        chars.append(ch)
        end = len(chars)
        if stop:
            tail = "".join(chars[-len(stop):])  # earlier positions were checked when their characters came
            if tail == stop:
                self.cut = end = end - len(stop)
            else:  # hold back the longest end that could still grow into stop
                end -= next((j for j in range(min(len(stop) - 1, end), 0, -1) if tail.endswith(stop[:j])), 0)
        start, self.sent = self.sent, max(self.sent, end)
        return start, self.sent

    def flush(self) -> tuple[int, int]:
        """At the end: everything not cut off."""
        start, self.sent = self.sent, (self.cut if self.cut >= 0 else len(self.chars))
        return start, max(start, self.sent)

    def piece(self, start: int, end: int) -> str:
        return "".join(self.chars[start:end])

    @property
    def final(self) -> str:
        return "".join(self.chars[: self.cut] if self.cut >= 0 else self.chars)


class PrimeCache:
    """The state after a prime, read once and reused by later requests with the
    same prime (a page's user trying settings, a program's fixed preamble, the
    benchmark's "The "). Exact: ``forward_prime`` reads the prime as one
    stream and only then repeats the result for the batch's rows, so a copy of
    an earlier read is bit for bit a new one. Used on the priming thread only."""

    def __init__(self, packed: PackedRNN, tokenizer: Any, size: int = PRIME_CACHE):
        self.packed = packed
        self.tokenizer = tokenizer
        self.size = size
        self._items: OrderedDict[str, tuple[Tensor, list[Tensor]]] = OrderedDict()  # prime -> (1, V), [(1, H)]
        self.reads = 0  # primes read by the model (the rest were copies)

    def get(self, prime: str, k: int) -> tuple[Tensor, list[Tensor]]:
        """Logits (k, V) and state after ``prime``, as new tensors."""
        item = self._items.get(prime)
        if item is None:
            item = self.packed.forward_prime(start_ids(self.tokenizer, prime), 1)  # the whole prime in one pass
            self.reads += 1
            self._items[prime] = item
            if len(self._items) > self.size:
                self._items.popitem(last=False)
        else:
            self._items.move_to_end(prime)
        logits, state = item
        return logits.repeat(k, 1), [part.repeat(k, 1) for part in state]


class Group:
    """One generation request: its ``num_samples`` streams, stepped together."""

    def __init__(self, spec: GenerateSpec, served: ServedModel, channel: Channel):
        self.spec = spec
        self.k = spec.num_samples
        self.vocab = served.tokenizer.chars
        self.sampler = _GroupSampler(served.tokenizer, spec.temperature, spec.top_k, spec.top_p,
                                     served.model.head.weight.device)
        self.seeds = [spec.seed + i for i in range(self.k)]
        self.generators: list[torch.Generator] | None = None
        self.noise: tuple[Tensor, ...] = ()  # this block's noise, one (k, V) row per step
        self.t = 0
        self.logits: Tensor | None = None  # (k, V) after the prime, until the group joins the batch
        self.state: list[Tensor] | None = None
        self.streams = [_StreamText(spec.stop) for _ in range(self.k)]
        self.infos: list[list[Any]] = [[] for _ in range(self.k)]  # per character: (prob, top) when top > 0
        self.channel = channel
        self.cancelled = False
        self.finished = False
        # Picks in the batch-wide add with its temperature's other groups, and needs no rows of
        # its own afterwards (no top alternatives to report): see Engine._run's common case.
        self.batchable = self.plain and not spec.top

    def prime(self, primes: PrimeCache) -> None:
        """Read the prime (off the worker thread): what ``Sampler.ids`` does first."""
        self.logits, self.state = primes.get(self.spec.prime, self.k)  # (k, V), state (k, H) per part
        if not self.sampler.greedy:
            self.generators = [torch.Generator(device=self.sampler.device) for _ in self.seeds]
            for g, s in zip(self.generators, self.seeds):
                g.manual_seed(int(s))

    @property
    def plain(self) -> bool:
        """One sampled stream without top-k/top-p: its pick can share a batched add (see _pick_plain)."""
        return self.k == 1 and not self.sampler.greedy and not self.sampler.filtered

    def step_noise(self) -> Tensor | None:
        """This step's Gumbel noise (k, V), drawing the next block every NOISE_BLOCK steps."""
        if self.generators is None:
            return None
        at = self.t % NOISE_BLOCK
        if at == 0:  # one tuple of row views per block: a step's lookup costs no tensor indexing
            self.noise = self.sampler._noise(self.generators).unbind(0)  # NOISE_BLOCK x (k, V)
        return self.noise[at]

    def pick(self, logits: Tensor) -> Tensor:
        """Next ids (k,) from this group's rows (k, V): Sampler.ids's loop body."""
        return self.sampler._pick(logits, self.step_noise())

    def advance(self, ids: list[int], nxt: Tensor, logits: Tensor) -> bool:
        """Record the picked ids (``nxt`` as a list); send what is safe to send.
        True when the group is done."""
        self.t += 1
        if not self.spec.top and self.spec.stop is None:  # the common case, kept short: every character goes out
            pieces = {}
            for b, i in enumerate(ids):
                s = self.streams[b]
                s.chars.append(self.vocab[i])
                s.sent = len(s.chars)
                pieces[b] = (self.vocab[i], ())
            self.channel.put(("text", pieces))
            if self.t >= self.spec.n:
                self.finish()
                return True
            return False
        info = None
        if self.spec.top:
            probs = torch.softmax(logits.float(), dim=-1)  # (k, V): the model's own distribution
            tp, ti = probs.topk(min(self.spec.top, probs.shape[-1]), dim=-1)
            chosen = probs.gather(1, nxt[:, None])[:, 0].tolist()
            info = [(chosen[b], [[self.vocab[i], p] for i, p in zip(ti[b].tolist(), tp[b].tolist())])
                    for b in range(self.k)]
        pieces: dict[int, tuple[str, list]] = {}
        for b, i in enumerate(ids):
            s = self.streams[b]
            if s.cut >= 0:
                continue
            if info is not None:
                self.infos[b].append(info[b])
            start, end = s.add(self.vocab[i])
            if end > start:
                pieces[b] = (s.piece(start, end), self.infos[b][start:end] if info is not None else [])
        if pieces:
            self.channel.put(("text", pieces))
        stopped = self.spec.stop is not None and all(s.cut >= 0 for s in self.streams)
        if self.t >= self.spec.n or stopped:
            self.finish()
            return True
        return False

    def finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        pieces = {}
        for b, s in enumerate(self.streams):
            start, end = s.flush()
            if end > start:
                pieces[b] = (s.piece(start, end), self.infos[b][start:end] if self.spec.top else [])
        if pieces:
            self.channel.put(("text", pieces))
        samples = [{"text": self.spec.prime + s.final, "prime": self.spec.prime, "seed": seed,
                    "finish_reason": "stop" if s.cut >= 0 else "length"}
                   for s, seed in zip(self.streams, self.seeds)]
        self.channel.put(("done", samples))

    def fail(self, message: str, status: int = 503) -> None:
        if not self.finished:
            self.finished = True
            self.channel.put(("error", (status, message)))


def _pick_plain(logits: Tensor, rows: list[int] | None, noise: list[Tensor], temperature: float) -> Tensor:
    """Next ids (G,) for G one-stream groups with the same temperature and no
    top-k/top-p: ``argmax(logits + T * noise)`` per row, as Sampler._pick does
    on each group's (1, V) row, in one call. ``rows`` None: every row of
    ``logits``, in order.

    Bit for bit: the rows sit in a buffer padded to V+1 columns, so the
    element-wise add cannot merge rows into one long vector and runs each row
    of V elements exactly as it runs a lone (1, V) row (the same split into
    SIMD blocks and a scalar tail). The argmax is exact either way."""
    V = logits.shape[1]
    G = len(noise)
    buf = torch.empty(2, G, V + 1)  # (2, G, V+1): logits, noise
    buf[0, :, :V] = logits if rows is None else logits.index_select(0, torch.tensor(rows))
    buf[1, :, :V] = torch.cat(noise)
    return torch.add(buf[0, :, :V], buf[1, :, :V], alpha=temperature).argmax(-1)  # (G,)


class Engine:
    """One model's worker: a thread that steps every active group together."""

    def __init__(self, served: ServedModel, limits: Limits):
        self.served = served
        self.limits = limits
        self.packed = PackedRNN(served.model)  # fp32: the numbers charnn sample uses below 16 samples
        self._cond = threading.Condition()
        self._pending: deque[Group] = deque()
        self._waiting = 0  # accepted, not yet in the batch (priming or queued)
        self._closing = False
        self._cancel_message: str | None = None
        self._prep = ThreadPoolExecutor(1, thread_name_prefix=f"charnn-prime-{served.name}")
        self.primes = PrimeCache(self.packed, served.tokenizer)
        self._thread = threading.Thread(target=self._run, name=f"charnn-batch-{served.name}", daemon=True)
        self.steps = 0  # batched steps run (for tests and the benchmark)
        self.rows = 0  # streams in the batch now
        self.max_rows = 0  # the largest batch seen

    def start(self) -> None:
        self._thread.start()

    # -- the request side (event loop thread) ---------------------------------
    def reserve(self) -> None:
        with self._cond:
            if self._closing:
                raise ApiError(503, "the server is shutting down; retry against a running server",
                               headers={"Retry-After": "1"})
            if self._waiting >= self.limits.max_queue:
                raise Busy(self.served.name, self.limits.max_queue)
            self._waiting += 1

    def unreserve(self) -> None:
        with self._cond:
            self._waiting -= 1

    async def submit(self, spec: GenerateSpec, channel: Channel) -> Group:
        """Reserve a place (503 when the queue is full), read the prime on the
        priming thread, queue the group for the batch."""
        self.reserve()
        group = Group(spec, self.served, channel)
        if spec.n == 0:  # nothing to generate: charnn sample prints the prime alone
            self.unreserve()
            group.finish()
            return group
        try:  # the prime is read on its own thread, so a long one does not stall the batch
            await asyncio.get_running_loop().run_in_executor(self._prep, group.prime, self.primes)
        except BaseException:
            self.unreserve()
            raise
        with self._cond:
            if self._closing:
                self._waiting -= 1
                group.fail(self._cancel_message or "the server is shutting down")
                return group
            self._pending.append(group)
            self._cond.notify()
        return group

    def queued(self) -> int:
        with self._cond:
            return self._waiting

    def cancel_all(self, message: str) -> None:
        """End every queued and active stream with ``message`` (shutdown)."""
        with self._cond:
            self._closing = True
            self._cancel_message = message
            self._cond.notify()

    def close(self) -> None:
        self.cancel_all("the server is shutting down")
        self._thread.join(timeout=10)
        self._prep.shutdown(wait=False, cancel_futures=True)

    # -- the worker thread ----------------------------------------------------
    def _admit(self, active: list[Group]) -> list[Group]:
        """Wait for work; take queued groups while the batch has room."""
        with self._cond:
            while not self._pending and not active and not self._closing:
                self._cond.wait()
            if self._closing:
                for g in list(self._pending) + active:
                    g.fail(self._cancel_message or "the server is shutting down")
                self._waiting -= len(self._pending)
                self._pending.clear()
                return []
            rows = sum(g.k for g in active)
            joining = []
            while self._pending and rows + self._pending[0].k <= self.limits.max_batch:
                g = self._pending.popleft()
                self._waiting -= 1
                if g.cancelled:
                    continue
                joining.append(g)
                rows += g.k
            return joining

    @staticmethod
    def _pick_each(active: list[Group], logits: Tensor) -> tuple[Tensor | None, list[tuple]]:
        """Next ids (B',) of the groups not cancelled, each picked from its own
        rows; and (group, first row, rows, ids) per such group."""
        live, plain, lo = [], {}, 0
        for g in active:
            if not g.cancelled:
                rows = logits[lo : lo + g.k]  # (k, V)
                if g.plain:
                    plain.setdefault(g.sampler.temperature, []).append(len(live))
                    live.append([g, lo, rows, None])
                else:
                    live.append([g, lo, rows, g.pick(rows)])  # (k,)
            lo += g.k
        for temperature, members in plain.items():
            picked = _pick_plain(logits, [live[i][1] for i in members],
                                 [live[i][0].step_noise() for i in members], temperature)
            for j, i in enumerate(members):
                live[i][3] = picked[j : j + 1]
        nxts = [x[3] for x in live]
        return (torch.cat(nxts) if nxts else None), live  # (B',)

    def _run(self) -> None:
        active: list[Group] = []
        state: list[Tensor] = []
        logits: Tensor | None = None
        while True:
            joining = self._admit(active)
            if self._closing:
                return
            try:
                with torch.inference_mode():
                    if joining:
                        parts = ([logits] if active else []) + [g.logits for g in joining]
                        logits = torch.cat(parts)  # (B, V)
                        state = [torch.cat(([state[i]] if active else []) + [g.state[i] for g in joining])
                                 for i in range(len(joining[0].state))]
                        for g in joining:
                            g.logits = g.state = None
                        active = active + joining
                    if not active:
                        continue
                    self.max_rows = max(self.max_rows, logits.shape[0])
                    # Each group picks from its own rows, exactly as charnn sample's batch of k would...
                    temperature = active[0].sampler.temperature
                    if all(g.batchable and not g.cancelled and g.sampler.temperature == temperature for g in active):
                        # The common case (one stream per request, the same temperature): one pick
                        # for the whole batch, no per-group tensors.
                        ids = _pick_plain(logits, None, [g.step_noise() for g in active], temperature)
                        live = [(g, b, None, None) for b, g in enumerate(active)]
                    else:
                        ids, live = self._pick_each(active, logits)
                    ids_list = ids.tolist() if ids is not None else []
                    # ...then takes its characters; finished and cancelled groups leave the batch.
                    keep_groups, keep_rows, at = [], [], 0
                    for g, lo, rows, nxt in live:
                        if not g.advance(ids_list[at : at + g.k], nxt, rows):
                            keep_groups.append(g)
                            keep_rows.append((lo, at))
                        at += g.k
                    if len(keep_groups) != len(active):
                        rows_at = [torch.arange(lo, lo + g.k) for g, (lo, _) in zip(keep_groups, keep_rows)]
                        ids_at = [torch.arange(a, a + g.k) for g, (_, a) in zip(keep_groups, keep_rows)]
                        if keep_groups:
                            index = torch.cat(rows_at)
                            state = [s.index_select(0, index) for s in state]
                            ids = ids.index_select(0, torch.cat(ids_at))
                        active = keep_groups
                    self.rows = sum(g.k for g in active)
                    if active:
                        logits = self.packed.step(ids, state)  # (B, V); state updated in place
                        self.steps += 1
            except Exception as e:  # a bug must not take the server down: end these streams, go on
                for g in active + joining:
                    g.fail(f"internal error while generating ({type(e).__name__}: {e}); this is a bug in charnn", 500)
                active, state, logits = [], [], None
                self.rows = 0


# ---------------------------------------------------------------------------
# Scoring (the numbers of charnn eval)
# ---------------------------------------------------------------------------

def score_text(served: ServedModel, text: str, unknown: str = "error", top: int = 5) -> dict[str, Any]:
    """Loss of ``text`` exactly as ``charnn eval`` computes it for a file with
    this content, and each character's probability and top alternatives."""
    from .data import normalize_newlines

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


# ---------------------------------------------------------------------------
# The ASGI app
# ---------------------------------------------------------------------------

def _sse(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


def page_html() -> str:
    from importlib.resources import files

    return files("charnn").joinpath(PAGE_FILE).read_text(encoding="utf-8")


class Server:
    """The engines, limits and scoring pool behind one app."""

    def __init__(self, models: list[ServedModel], limits: Limits | None = None):
        self.models = {m.name: m for m in models}
        self.limits = limits or Limits()
        self.engines = {m.name: Engine(m, self.limits) for m in models}
        self._score_pool = ThreadPoolExecutor(1, thread_name_prefix="charnn-score")
        self._scores_waiting = 0
        self.started = False

    def start(self) -> None:
        if not self.started:
            self.started = True
            for e in self.engines.values():
                e.start()

    def cancel_streams(self, message: str) -> None:
        for e in self.engines.values():
            e.cancel_all(message)

    def close(self) -> None:
        for e in self.engines.values():
            e.close()
        self._score_pool.shutdown(wait=False, cancel_futures=True)

    async def score(self, served: ServedModel, text: str, unknown: str, top: int) -> dict[str, Any]:
        if self._scores_waiting >= self.limits.max_queue:
            raise ApiError(503, f"{self._scores_waiting} scoring requests are waiting already; retry in a second",
                           headers={"Retry-After": "1"})
        self._scores_waiting += 1
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._score_pool, score_text, served, text, unknown, top)
        finally:
            self._scores_waiting -= 1


def create_app(models: list[ServedModel], limits: Limits | None = None) -> Any:
    """The Starlette app serving ``models``; its lifespan starts and stops the engines."""
    require_extra()
    import contextlib

    from starlette.applications import Starlette
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    server = Server(models, limits)
    page = page_html()

    def error_response(e: ApiError) -> JSONResponse:
        return JSONResponse(e.to_dict(), status_code=e.status, headers=e.headers)

    async def read_json(request: Request) -> Any:
        if request.headers.get("content-type", "application/json").split(";")[0].strip() not in (
                "application/json", ""):
            raise ApiError(415, "send the request body as JSON with Content-Type: application/json")
        size = 0
        chunks = []
        async for chunk in request.stream():
            size += len(chunk)
            if size > server.limits.max_body:
                raise ApiError(413, f"the request body is over {server.limits.max_body:,} bytes; send less text")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks) or b"null")
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e}); send a JSON object") from None

    def api(handler: Callable) -> Callable:
        async def wrapped(request: Request) -> Response:
            try:
                return await handler(request)
            except ApiError as e:
                return error_response(e)
            except CharnnError as e:  # a library check (ConfigError, ...): the request asked for it
                return error_response(ApiError(400, str(e)))
            except ClientDisconnect:
                return Response(status_code=499)
        return wrapped

    async def index(request: Request) -> Response:
        return HTMLResponse(page, headers={"Cache-Control": "no-cache"})

    async def list_models(request: Request) -> Response:
        return JSONResponse({"models": [{**m.describe(), "streams": server.engines[m.name].rows,
                                          "queued": server.engines[m.name].queued()}
                                         for m in server.models.values()],
                             "limits": server.limits.to_dict(), "defaults": DEFAULTS})

    async def generate(request: Request) -> Response:
        spec = parse_generate(await read_json(request), server.models, server.limits)
        engine = server.engines[spec.model]
        channel = Channel(asyncio.get_running_loop(), ("text", "done", "error") if spec.stream else ("done", "error"))
        group = await engine.submit(spec, channel)
        if spec.stream:
            return StreamingResponse(_events(spec, group, channel), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _collect(request, spec, group, channel)

    async def _events(spec: GenerateSpec, group: Group, channel: Channel):
        try:
            yield _sse("start", {"model": spec.model, "seed": spec.seed, "seeds": group.seeds, "prime": spec.prime,
                                 "num_samples": spec.num_samples, "dropped": spec.dropped})
            while True:
                texts: dict[int, list[str]] = {}
                infos: dict[int, list[Any]] = {}
                end = None
                for kind, payload in await channel.get_all():  # everything made since the last send
                    if kind == "text":
                        for b, (text, info) in payload.items():
                            texts.setdefault(b, []).append(text)
                            infos.setdefault(b, []).extend(info)
                    else:
                        end = (kind, payload)
                for b, parts in texts.items():  # one event per sample
                    data: dict[str, Any] = {"sample": b, "text": "".join(parts)}
                    if spec.top:
                        data["probs"] = [p for p, _ in infos[b]]
                        data["top"] = [t for _, t in infos[b]]
                    yield _sse("text", data)
                if end is not None:
                    kind, payload = end
                    if kind == "done":
                        yield _sse("done", {"model": spec.model, "seed": spec.seed, "samples": payload})
                    else:
                        yield _sse("error", {"error": {"message": payload[1], "status": payload[0]}})
                    return
                # Let characters gather: an event per sample every FLUSH_INTERVAL, not one per step.
                await asyncio.sleep(FLUSH_INTERVAL)
        finally:
            group.cancelled = True  # a client that went away frees its rows at the next step

    async def _collect(request: Request, spec: GenerateSpec, group: Group, channel: Channel) -> Response:
        async def disconnected() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        watcher = asyncio.ensure_future(disconnected())
        try:
            while True:
                getter = asyncio.ensure_future(channel.get_all())
                done, _ = await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    return Response(status_code=499)
                for kind, payload in getter.result():
                    if kind == "done":
                        return JSONResponse({"model": spec.model, "seed": spec.seed, "samples": payload})
                    if kind == "error":
                        raise ApiError(payload[0], payload[1], headers={"Retry-After": "1"} if payload[0] == 503 else None)
        finally:
            watcher.cancel()
            group.cancelled = True

    async def score(request: Request) -> Response:
        served, text, unknown, top = parse_score(await read_json(request), server.models, server.limits)
        return JSONResponse(await server.score(served, text, unknown, top))

    async def not_found(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        msg = ("no such endpoint; the API is GET /v1/models, POST /v1/generate, POST /v1/score (and the page at /)"
               if status == 404 else f"{request.method} is not allowed here; see GET /v1/models, "
               "POST /v1/generate, POST /v1/score")
        return JSONResponse(ApiError(status, msg).to_dict(), status_code=status)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any):
        server.start()
        try:
            yield
        finally:
            server.close()

    app = Starlette(routes=[
        Route("/", index, methods=["GET"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/generate", api(generate), methods=["POST"]),
        Route("/v1/score", api(score), methods=["POST"]),
    ], exception_handlers={404: not_found, 405: not_found}, lifespan=lifespan)
    app.state.server = server
    return app


# ---------------------------------------------------------------------------
# Running it
# ---------------------------------------------------------------------------

def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: a free one), or a :class:`ServeError` that says what to do."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ServeError(f"cannot use host {host!r} ({e.strerror}); pass --host 127.0.0.1 or an address "
                         "of this machine") from None
    family, kind, proto, _, addr = infos[0]
    # proto IPPROTO_TCP (not 0): asyncio then sets TCP_NODELAY on each
    # connection; without it each small SSE write waits for the client's
    # delayed ACK of the one before (40 ms on Linux).
    sock = socket.socket(family, kind, proto or socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port "
                         "(or stop what is using it)") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def run(app: Any, sock: socket.socket, grace: float = 10.0, log_level: str = "warning") -> str | None:
    """Serve ``app`` on ``sock`` until Ctrl-C or SIGTERM. Then: stop accepting,
    let in-flight streams finish for ``grace`` seconds, end the rest with an
    ``error`` event, and return the signal's name (None if it stopped otherwise)."""
    require_extra()
    import uvicorn

    server_state: Server = app.state.server
    received: list[int] = []

    class _Uvicorn(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            # uvicorn re-raises the signal after a graceful exit (killing the
            # process with SIGTERM's default action); here stopping *is* the
            # expected behaviour, so only record it.
            received.append(sig)
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            else:
                self.should_exit = True

        async def shutdown(self, sockets: Any = None) -> None:
            loop = asyncio.get_running_loop()
            timer = loop.call_later(grace, server_state.cancel_streams,
                                    "the server is shutting down; this stream was cut short")
            try:
                await super().shutdown(sockets)
            finally:
                timer.cancel()

    # The batch thread releases the GIL inside each torch op and needs it back
    # right after; a short switch interval keeps the HTTP thread from holding
    # it for the default 5 ms at a time (measured: steps ~2x slower under load).
    sys.setswitchinterval(0.0005)
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=grace + 5, lifespan="on",
                            access_log=False)
    _Uvicorn(config).run(sockets=[sock])
    return signal.Signals(received[-1]).name if received else None
