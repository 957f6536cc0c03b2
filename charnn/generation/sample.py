"""Generation: prime, temperature, top-k, top-p, stop strings, batches, streaming.

Two entry points:

- :func:`generate` -- an iterator over the characters of one sample, so a
  caller can print them as they come;
- :func:`generate_samples` -- several samples generated together as one batch,
  returned finished as :class:`Sample` objects (what ``charnn sample`` uses).

Both run on :class:`~charnn.model.fastrnn.PackedRNN`: the prime is consumed in one
sequence pass of the model, then each character is one step of written-out
cell equations (see :mod:`charnn.model.fastrnn`).

Randomness: sample ``i`` of a batch with seed ``S`` uses seed ``S + i``; at
step ``t`` it draws one uniform ``u`` from :mod:`charnn.generation.rng`, a
counter-based generator (Philox4x32-10) that any program can reproduce. The
next id is then picked by inverse CDF in float64 (:func:`pick_ids`): the
first id whose cumulative probability under ``softmax(logits / T)`` (after
top-k/top-p) exceeds ``u``. The same seed, checkpoint and options give the
same text on every run, in ``charnn serve``, and in an exported web page up
to the rounding condition its docs state.
"""

from __future__ import annotations

import os
import random
import stat
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..errors import ConfigError, DataError, NonFiniteError, VocabError, describe_char, format_bytes
from ..text.reading import decode_bytes, normalize_newlines
from ..model.devices import cpu_has_amx
from ..model.fastrnn import SAFE_MAGNITUDE, PackedRNN
from ..model.rnn import GATE_ROWS, CharRNN, available_memory
from ..text.tokenizer import CharTokenizer
from . import rng
from .copies import CopyGuard

START_CANDIDATES = ("\n", " ")  # what an empty prime is conditioned on
NOISE_BLOCK = 64  # steps of uniforms drawn per call, per stream
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}
BF16_MIN_BATCH = 16  # "auto" uses bf16 weights from this many samples on (see sampling_precision)
DEFAULT_TEMPERATURE = 0.8  # the one default of the library and the CLI: livelier than greedy, fewer typos than 1.0

# Bounds on what one call may ask for (each error names its limit):
MAX_PRIME_FILE_BYTES = 4 << 20  # a prime file of at most 4 MiB ...
MAX_PRIME_CHARS = 1 << 20  # ... and a prime of at most 1,048,576 characters (the model remembers a few hundred)
MAX_SAMPLE_MEMORY = 2 << 30  # generate_samples: 2 GiB for all samples' texts and working tensors
MAX_SEED = (1 << 64) - 1  # the generator's key is 64 bits (see rng)
# Logits are divided by the temperature in float32; a larger one does not convert.
MAX_TEMPERATURE = float(torch.finfo(torch.float32).max)
SAMPLING_NONFINITE = ("the model produced non-finite values (inf or NaN) while sampling; the checkpoint's "
                     "weights are out of range -- use an earlier checkpoint")


@dataclass
class Sample:
    """One finished sample: ``text`` is the prime followed by the generated
    characters (cut before the stop string, if one was found)."""

    text: str
    prime: str
    seed: int
    max_copy: int | None = None  # with a copy guard: its limit, the steps it redirected, whether it ended the sample
    redirected: int | None = None
    copy_ended: bool | None = None

    @property
    def generated(self) -> str:
        return self.text[len(self.prime):]

    def to_dict(self) -> dict[str, object]:
        return {k: v for k, v in asdict(self).items() if v is not None}


# ---------------------------------------------------------------------------
# Options and the prime
# ---------------------------------------------------------------------------

def validate_options(temperature: float, top_k: int, top_p: float, length: int,
                     num_samples: int = 1, precision: str = "fp32") -> None:
    if not (temperature >= 0 and temperature != float("inf")):
        raise ConfigError(f"temperature must be 0 (greedy) or a positive number, got {temperature}")
    if temperature > MAX_TEMPERATURE:
        raise ConfigError(f"temperature must be at most {MAX_TEMPERATURE:.4g} (float32's largest number), "
                          f"got {temperature:g}")
    if top_k < 0:
        raise ConfigError(f"top-k must be 0 (off) or positive, got {top_k}")
    if not 0 < top_p <= 1:
        raise ConfigError(f"top-p must be in (0, 1], got {top_p}")
    if length < 0:
        raise ConfigError(f"length must not be negative, got {length}")
    if num_samples < 1:
        raise ConfigError(f"num-samples must be at least 1, got {num_samples}")
    if precision != "auto" and precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose auto, fp32 or bf16")


def validate_seed(seed: int | None, num_samples: int = 1) -> None:
    """``seed`` None (random) or an integer such that every stream's seed
    ``seed + i`` is a 64-bit unsigned number."""
    if seed is None:
        return
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be a whole number, got {type(seed).__name__}")
    last = seed + num_samples - 1
    if seed < 0 or last > MAX_SEED:
        shown = f"{seed}" if abs(seed) < 10 ** 30 else f"a {seed.bit_length()}-bit number"
        streams = f" (with {num_samples} samples, seed+{num_samples - 1} must fit too)" if num_samples > 1 else ""
        raise ConfigError(f"seed must be between 0 and 2**64-1 = {MAX_SEED}{streams}, got {shown}")


def sample_memory(model: CharRNN, tokenizer: CharTokenizer, prime: str, length: int, num_samples: int) -> int:
    """Bytes :func:`generate_samples` needs, about: per stream, the text (prime
    + generated, in Python's width for this vocabulary, plus a copy while
    joining), a block of uniforms and ids, logits, the pick's float64 rows and the cell state."""
    cfg = model.config
    top = max(map(ord, tokenizer.chars))
    width = 1 if top < 0x100 else 2 if top < 0x10000 else 4
    V, H, L, G = cfg.vocab_size, cfg.hidden_size, cfg.num_layers, GATE_ROWS[cfg.cell]
    work = 4 * (4 * V + 3 * L * H + 2 * G * H) + 8 * 4 * V + 52 * NOISE_BLOCK
    return num_samples * (work + 2 * width * (len(prime) + length))


def check_sample_memory(model: CharRNN, tokenizer: CharTokenizer, prime: str, length: int,
                        num_samples: int) -> None:
    """:class:`ConfigError` when a batch would need more than
    :data:`MAX_SAMPLE_MEMORY` (or more than this machine has free)."""
    need = sample_memory(model, tokenizer, prime, length, num_samples)
    free = available_memory()
    if need > MAX_SAMPLE_MEMORY or (free is not None and need > free):
        if need > MAX_SAMPLE_MEMORY:
            limit = f"the limit is {format_bytes(MAX_SAMPLE_MEMORY)} (charnn.generation.sample.MAX_SAMPLE_MEMORY)"
        else:
            limit = f"this machine has {format_bytes(free)} free"
        raise ConfigError(
            f"{num_samples:,} samples of {length:,} characters need about {format_bytes(need)} of memory; "
            f"{limit}. Ask for fewer --num-samples or a shorter --length, or run several times "
            "(--seed S, then S+N, ... gives the same samples)"
        )


def check_prime(tokenizer: CharTokenizer, prime: str, unknown: str = "error") -> tuple[str, list[str]]:
    """The prime as the model can read it, and the distinct characters dropped.

    ``unknown="error"`` raises :class:`VocabError` naming every character
    outside the vocabulary; ``"skip"`` drops them (the caller may report the
    second return value).
    """
    if unknown not in ("error", "skip"):
        raise ConfigError(f"unknown must be 'error' or 'skip', not {unknown!r}")
    if len(prime) > MAX_PRIME_CHARS:
        raise ConfigError(
            f"the prime has {len(prime):,} characters; at most {MAX_PRIME_CHARS:,} are read "
            "(charnn.generation.sample.MAX_PRIME_CHARS) -- the model's memory reaches back a few hundred, "
            "so pass the last part of the text"
        )
    bad = tokenizer.unknown_chars(prime)
    if not bad:
        return prime, []
    if unknown == "error":
        shown = ", ".join(describe_char(c) for c in bad[:20])
        more = f" and {len(bad) - 20} more" if len(bad) > 20 else ""
        raise VocabError(
            f"the prime has {len(bad)} character(s) not in the model's vocabulary: {shown}{more}. "
            "Remove them, or pass --unknown skip to drop them",
            characters=bad,
        )
    drop = set(bad)
    return "".join(c for c in prime if c not in drop), bad


def read_prime_file(path: str | os.PathLike, encoding: str = "utf-8") -> str:
    """The text of a prime file, every failure a :class:`DataError` naming it.

    Only a regular file of at most :data:`MAX_PRIME_FILE_BYTES` is read: a
    FIFO, socket or device (``/dev/zero``, ``/dev/stdin`` of a terminal) is
    refused at once, never waited on."""
    path = Path(path)
    try:
        # O_NONBLOCK: opening a FIFO with no writer returns at once instead of waiting.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise DataError(f"prime file {path} does not exist") from None
    except IsADirectoryError:
        raise DataError(f"prime file {path} is a folder; give a text file") from None
    except OSError as e:
        raise DataError(f"cannot read prime file {path}: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise DataError(f"prime file {path} is a folder; give a text file")
        if not stat.S_ISREG(st.st_mode):
            kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
                    else "a device")
            raise DataError(f"prime file {path} is {kind}, not a regular file; save the prime to a file "
                            "or pass it with --prime")
        if st.st_size > MAX_PRIME_FILE_BYTES:
            raise DataError(f"prime file {path} is {format_bytes(st.st_size)}; a prime file may be at most "
                            f"{format_bytes(MAX_PRIME_FILE_BYTES)} (charnn.generation.sample.MAX_PRIME_FILE_BYTES) -- "
                            "pass the last part of the text")
        with os.fdopen(fd, "rb") as f:
            fd = -1
            data = f.read(MAX_PRIME_FILE_BYTES + 1)  # the file may have grown since fstat
    except OSError as e:
        raise DataError(f"cannot read prime file {path}: {e.strerror or e}") from None
    finally:
        if fd >= 0:
            os.close(fd)
    if len(data) > MAX_PRIME_FILE_BYTES:
        raise DataError(f"prime file {path} is larger than {format_bytes(MAX_PRIME_FILE_BYTES)} "
                        "(charnn.generation.sample.MAX_PRIME_FILE_BYTES); pass the last part of the text")
    # The same reading rules as a corpus, so the prime looks like the training text.
    return normalize_newlines(decode_bytes(data, f"prime file {path}", encoding, hint="convert it to UTF-8"))


def start_ids(tokenizer: CharTokenizer, prime: str):
    """Ids the model reads before generating (an array for a prime, a list
    otherwise): the prime, or for an empty prime a newline (or space) so the
    first character starts a line."""
    if prime:
        return tokenizer.encode_array(prime)  # 1-4 bytes per character, not a list of Python ints
    for ch in START_CANDIDATES:
        if ch in tokenizer:
            return [tokenizer.stoi[ch]]
    return [0]


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Mask all but the ``top_k`` most likely and the smallest set whose
    probability reaches ``top_p`` (nucleus). logits (B, V) -> (B, V)."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)  # ties: lower id first
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens before it already reach top_p.
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        drop[..., 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def pick_ids(logits: Tensor, u: Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Next ids (B,) from logits (B, V) and one uniform ``u`` (B,) in [0, 1)
    per row: inverse CDF in float64, so the same arithmetic is easy to repeat
    in another language (an exported web page does).

    With ``z = (logits - max) / T`` filtered by top-k/top-p (masked entries
    -inf), ``e = exp(z)`` and ``c`` its running sum, the pick is the number
    of entries with ``c <= u * c[-1]``: the first id whose cumulative
    probability exceeds ``u``. Each row is computed on its own, so a row
    picks the same id alone or in any batch."""
    z = logits.double()
    z = (z - z.amax(-1, keepdim=True)) / temperature  # <= 0; the maximum is exactly 0, so exp never overflows
    if top_k or top_p < 1.0:
        z = filter_logits(z, top_k, top_p)
    e = z.exp_()
    c = e.cumsum(-1)  # (B, V)
    ids = (c <= u.reshape(-1, 1) * c[:, -1:]).sum(-1)
    V = logits.shape[-1]
    over = ids >= V  # u * total rounded up to total: the last id with any probability
    if bool(over.any()):
        last = V - 1 - (e > 0).flip(-1).int().argmax(-1)
        ids = torch.where(over, last, ids)
    return ids


def sampling_precision(precision: str, device: torch.device, num_samples: int, greedy: bool) -> str:
    """The precision of the sampling kernels' weights. ``auto``: fp32 --
    exactly torch's numbers, so greedy output matches the
    plain ``nn.LSTM`` loop -- except for a batch of at least BF16_MIN_BATCH
    *sampled* streams on a CPU with AMX, where the matrix products are
    compute-bound and bf16 weights run them about twice as fast (the samples
    are then draws from a model rounded to bf16, not bit-for-bit fp32 ones).
    With AVX512-BF16 alone bf16 weights are slower: 64 streams at 2x512 made
    13,457 characters/s against fp32's 19,721."""
    if precision != "auto":
        return precision
    if (not greedy and num_samples >= BF16_MIN_BATCH and torch.device(device).type == "cpu"
            and cpu_has_amx()):
        return "bf16"
    return "fp32"


def random_seed() -> int:
    """A fresh seed for when the caller gives none (reported back, so a
    good sample can be repeated)."""
    return random.SystemRandom().randrange(1 << 31)


# ---------------------------------------------------------------------------
# The sampler
# ---------------------------------------------------------------------------

class Sampler:
    """A model packed for generation with fixed sampling options.

    Packing costs a few matrix products; reuse one Sampler for many calls.
    """

    def __init__(self, model: CharRNN, tokenizer: CharTokenizer, temperature: float = DEFAULT_TEMPERATURE,
                 top_k: int = 0, top_p: float = 1.0, precision: str = "fp32", batch_size: int = 1):
        validate_options(temperature, top_k, top_p, 0, 1, precision)
        if precision == "auto":
            precision = "fp32"
        self._set_options(tokenizer, temperature, top_k, top_p, model.head.weight.device)
        self.packed = PackedRNN(model, PRECISIONS[precision], batch_size)
        # Overflow is impossible for sane weights (see PackedRNN._value_bound):
        # only a model whose bound is absurd pays for a check of every step.
        # (pick_ids works in float64 on logits minus their maximum: no overflow beyond the logits'.)
        self.check_every_step = not self.packed.value_bound < SAFE_MAGNITUDE

    def _set_options(self, tokenizer: CharTokenizer, temperature: float, top_k: int, top_p: float,
                     device: torch.device) -> None:
        """What the pick reads (shared with the server's batched sampler)."""
        self.tokenizer = tokenizer
        self.temperature = float(temperature)
        self.top_k = int(top_k)
        self.top_p = float(top_p)
        self.greedy = temperature == 0 or top_k == 1
        self.filtered = not self.greedy and ((0 < top_k < tokenizer.vocab_size) or top_p < 1.0)
        self.device = device

    def _uniforms(self, seeds: Sequence[int], t: int) -> Tensor:
        """The uniforms of steps t .. t + NOISE_BLOCK - 1: (B, NOISE_BLOCK) float64."""
        return torch.from_numpy(rng.uniforms(seeds, t, NOISE_BLOCK)).to(self.device)

    def _pick(self, logits: Tensor, u: Tensor | None) -> Tensor:
        """Next ids (B,) from logits (B, V) and one uniform per row (B,)."""
        if u is None:
            return logits.argmax(-1)
        return pick_ids(logits, u, self.temperature, self.top_k if self.filtered else 0,
                        self.top_p if self.filtered else 1.0)

    @torch.inference_mode()
    def ids(self, prime_ids: Sequence[int], length: int, seeds: Sequence[int],
            guard: CopyGuard | None = None) -> Iterator[Tensor]:
        """Yield ``length`` tensors of next ids (B,), one per step, for
        ``len(seeds)`` streams that all start from ``prime_ids``; ``guard``
        (started for these streams) masks characters before each pick."""
        if length <= 0:
            return
        for s in seeds:
            validate_seed(s)
        packed, pick = self.packed, (self._pick if guard is None else guard.wrap(self._pick))
        logits, state = packed.forward_prime(prime_ids, len(seeds))  # the whole prime, in chunks
        if not bool(torch.isfinite(logits).all()):
            raise NonFiniteError(SAMPLING_NONFINITE)
        step, check = packed.step, self.check_every_step
        t = 0
        while True:
            block = None if self.greedy else self._uniforms(seeds, t)  # (B, NOISE_BLOCK)
            for k in range(NOISE_BLOCK):
                if check and not bool(torch.isfinite(logits).all()):
                    raise NonFiniteError(SAMPLING_NONFINITE)
                nxt = pick(logits, None if block is None else block[:, k])  # (B,)
                yield nxt
                t += 1
                if t == length:
                    return
                logits = step(nxt, state)  # (B, V)


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------

def generate(model: CharRNN, tokenizer: CharTokenizer, prime: str = "", length: int = 500,
             temperature: float = DEFAULT_TEMPERATURE, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
             stop: str | None = None, unknown: str = "error", precision: str = "auto",
             guard: CopyGuard | None = None) -> Iterator[str]:
    """An iterator over up to ``length`` generated characters after ``prime``
    (the prime itself is not yielded).

    Options are checked when this is called, not at the first character: a
    prime character outside the vocabulary raises :class:`VocabError` here
    (unless ``unknown="skip"``). With ``stop``, the iterator ends just before
    the first occurrence of ``stop`` in the generated text, which is never
    yielded (characters that might begin it are held back until they don't).
    ``seed`` None draws a random one; ``precision`` "auto" is fp32 for one
    stream (see :func:`sampling_precision`). ``guard`` (:mod:`.copies`) keeps
    the sample from copying more than its limit; it ends the sample early
    where every character is masked.
    """
    validate_options(temperature, top_k, top_p, length, 1, precision)
    validate_seed(seed)
    prime, _ = check_prime(tokenizer, prime, unknown)
    sampler = Sampler(model, tokenizer, temperature, top_k, top_p, precision)
    seed = random_seed() if seed is None else seed
    if guard is not None:
        guard.start(prime, 1)
    chars = _chars(sampler, start_ids(tokenizer, prime), length, seed, guard)
    return _until(chars, stop) if stop else chars


def _chars(sampler: Sampler, prime_ids: list[int], length: int, seed: int,
           guard: CopyGuard | None = None) -> Iterator[str]:
    vocab = sampler.tokenizer.chars
    for nxt in sampler.ids(prime_ids, length, [seed], guard):
        if guard is not None and guard.ended[0] >= 0:
            return
        yield vocab[int(nxt)]


def _until(chars: Iterator[str], stop: str) -> Iterator[str]:
    """Pass characters through, ending before the first ``stop``."""
    pending = ""
    for ch in chars:
        pending += ch
        found = pending.find(stop)
        if found >= 0:
            yield from pending[:found]
            return
        # Keep the longest tail of `pending` that could still grow into `stop`.
        keep = next((j for j in range(min(len(stop) - 1, len(pending)), 0, -1)
                     if pending.endswith(stop[:j])), 0)
        yield from pending[: len(pending) - keep]
        pending = pending[len(pending) - keep:]
    yield from pending


def generate_samples(model: CharRNN, tokenizer: CharTokenizer, prime: str = "", length: int = 500,
                     num_samples: int = 1, temperature: float = DEFAULT_TEMPERATURE, top_k: int = 0, top_p: float = 1.0,
                     seed: int | None = None, stop: str | None = None, unknown: str = "error",
                     precision: str = "auto", guard: CopyGuard | None = None) -> list[Sample]:
    """``num_samples`` samples generated together as one batch.

    Sample ``i`` uses seed ``seed + i`` (``seed`` drawn at random when None);
    each is the prime followed by up to ``length`` characters, ending before
    the first ``stop`` in its generated part. Generation ends early once every
    sample has met ``stop``. ``guard`` (:mod:`.copies`): as for :func:`generate`,
    per sample.
    """
    validate_options(temperature, top_k, top_p, length, num_samples, precision)
    validate_seed(seed, num_samples)
    prime, _ = check_prime(tokenizer, prime, unknown)
    check_sample_memory(model, tokenizer, prime, length, num_samples)
    greedy = temperature == 0 or top_k == 1
    precision = sampling_precision(precision, model.head.weight.device, num_samples, greedy)
    sampler = Sampler(model, tokenizer, temperature, top_k, top_p, precision, num_samples)
    seed = random_seed() if seed is None else seed
    seeds = [seed + i for i in range(num_samples)]
    vocab = tokenizer.chars
    texts = [""] * num_samples
    cut = [-1] * num_samples  # where stop was found, per sample
    block: list[Tensor] = []
    if guard is not None:
        guard.start(prime, num_samples)
    ended = guard.ended if guard is not None else [-1] * num_samples

    def flush() -> bool:
        """Decode the ids gathered so far; True once every sample has stopped."""
        rows = torch.stack(block, 1).tolist()  # (B, n)
        block.clear()
        for b, row in enumerate(rows):
            if cut[b] >= 0:
                continue
            start = max(0, len(texts[b]) - len(stop) + 1) if stop else 0
            texts[b] += "".join([vocab[i] for i in row])
            if stop:
                cut[b] = texts[b].find(stop, start)
        return all(c >= 0 or 0 <= e <= len(t) for c, e, t in zip(cut, ended, texts)) if stop or guard else False

    for nxt in sampler.ids(start_ids(tokenizer, prime), length, seeds, guard):
        block.append(nxt)
        if len(block) == NOISE_BLOCK and flush():
            break
    if block:
        flush()
    samples = []
    for b, (t, c, s) in enumerate(zip(texts, cut, seeds)):
        if ended[b] >= 0:  # what came after is not part of the sample; a stop string must lie before it
            t = t[: ended[b]]
            c = t.find(stop) if stop else -1
        text = t[:c] if c >= 0 else t
        extra = {} if guard is None else dict(max_copy=guard.max_copy, redirected=guard.redirected_before(b, len(text)),
                                              copy_ended=c < 0 and ended[b] >= 0)
        samples.append(Sample(prime + text, prime, s, **extra))
    return samples


def sample_text(model: CharRNN, tokenizer: CharTokenizer, prime: str = "", length: int = 500, **kwargs) -> str:
    """The prime followed by ``length`` generated characters (temperature
    :data:`DEFAULT_TEMPERATURE` unless given, as for :func:`generate`)."""
    return prime + "".join(generate(model, tokenizer, prime, length, **kwargs))
