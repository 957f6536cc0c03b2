"""What a sample copies from its training text: the report, and the guard
behind ``--max-copy``.

The report (:func:`copy_report`) looks at the whole printed text, the prime
followed by the generated characters, so a copy that runs on from a quoted
prime counts in full. A *copied span* is a stretch of that text that occurs
verbatim in the training text; the spans listed are the maximal ones (not
inside a longer copied span) of at least ``min_span`` characters, as offsets
into the printed text. ``longest`` is the longest copied span holding at least
one generated character, ``share`` the fraction of the generated characters
that lie in listed spans; ``prime_longest`` is the longest copied span inside
the prime alone, reported apart because the model did not write it.

The guard (:class:`CopyGuard`): before each pick, the characters that would
make the last ``max_copy + 1`` characters of the text a copy are masked
(set to -inf, probability zero) -- those that follow an occurrence of the last
``max_copy`` characters in the training text. The pick itself, and the uniform
of each step, are unchanged, so the output is as deterministic as without the
guard. A step whose unmasked pick was masked is *redirected*. If every
character of the vocabulary is masked, the stream ends there (``ended`` is
``"copy"``): no character could continue it within the limit.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from ..errors import ConfigError, DataError, format_bytes
from ..text.copyindex import BUILD_BYTES_PER_CHAR, MAX_INDEX_CHARS, CopyIndex, load_or_build
from ..text.reading import Progress, read_corpus, show_path
from ..text.tokenizer import CharTokenizer

DEFAULT_COPY_SPAN = 20  # spans of this many characters or more count as copied
MAX_REPORT_CHARS = 1_000_000  # characters one report checks, all samples together (about 10 s)


# ---------------------------------------------------------------------------
# The training text
# ---------------------------------------------------------------------------

@dataclass
class TrainingText:
    text: str
    sha256: str
    label: str  # how messages name it: the file's name, or "N files"


def _label(paths: list[str]) -> str:
    names = [Path(p).name or str(p) for p in paths]
    return names[0] if len(names) == 1 else f"{len(names)} files ({names[0]}, ...)"


def _too_large(what: str, size: int, unit: str) -> str:
    return (f"{what} has {size:,} {unit}; the copy index takes at most {MAX_INDEX_CHARS:,} "
            f"(charnn.text.copyindex.MAX_INDEX_CHARS)")


def read_against(path: str | os.PathLike, encoding: str = "utf-8") -> TrainingText:
    """The text named by ``--against``: a text file or a folder of them,
    read as a corpus is. A FIFO, a device or a file over the index's limit is
    a :class:`DataError` before anything is read."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DataError(f"--against {show_path(path)}: no such file or folder; give the text the model "
                        "was trained on") from None
    except OSError as e:
        raise DataError(f"--against {show_path(path)}: cannot read it ({e.strerror or e})") from None
    if not stat.S_ISDIR(st.st_mode):
        if not stat.S_ISREG(st.st_mode):
            kind = "a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode) else "not a regular file"
            raise DataError(f"--against {show_path(path)} is {kind}; give the training text as a file or folder")
        if st.st_size > MAX_INDEX_CHARS:
            raise DataError(f"--against {show_path(path)}: {_too_large('it', st.st_size, 'bytes')}; "
                            "give a smaller text, or pass --no-copy-report")
    # charnn sample has no --encoding: the text is read as the model's corpus was.
    hint = (f"--against is read in the encoding the model was trained with ({encoding}); give the "
            f"training text, converted to {encoding} if needed")
    corpus = read_corpus([path], encoding=encoding, encoding_hint=hint)
    if len(corpus.text) > MAX_INDEX_CHARS:
        raise DataError(f"--against {show_path(path)}: {_too_large('its text', len(corpus.text), 'characters')}; "
                        "give a smaller text, or pass --no-copy-report")
    return TrainingText(corpus.text, corpus.sha256, _label([str(path)]))


AGAINST_FIX = "pass --against FILE with the text it was trained on"


def recorded_text(train_config: dict, fix: str | None = AGAINST_FIX) -> tuple[TrainingText | None, str]:
    """The text a checkpoint records as its corpus, if it is still there and
    unchanged (its SHA-256 is the recorded one); else None and one line
    saying why (and ``fix``, what to do)."""
    fix = f"; {fix}" if fix else ""
    from ..text.data import builtin_corpus_path

    cfg = train_config if isinstance(train_config, dict) else {}
    expected = cfg.get("corpus_hash")
    paths = cfg.get("corpus") or []
    if not isinstance(expected, str) or not expected or not isinstance(paths, list):
        return None, f"the checkpoint does not record its training text{fix}"
    encoding = cfg.get("encoding") if isinstance(cfg.get("encoding"), str) else "utf-8"
    label = _label([str(p) for p in paths]) if paths else "the built-in corpus"
    try:
        sources = [Path(str(p)) for p in paths] or [builtin_corpus_path()]
        size = 0
        for p in sources:
            st = os.stat(p)
            size += st.st_size if stat.S_ISREG(st.st_mode) else 0
        if size > MAX_INDEX_CHARS:
            return None, f"{_too_large('the training text ' + label, size, 'bytes')}; pass --no-copy-report"
        corpus = read_corpus(sources, encoding=encoding)
    except FileNotFoundError:
        return None, f"the training text {label} is not on this machine (moved, deleted, or trained elsewhere){fix}"
    except (OSError, DataError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        return None, f"the training text {label} cannot be read ({reason}){fix}"
    if corpus.sha256 != expected:
        return None, f"the training text {label} changed since training (its SHA-256 differs){fix}"
    if len(corpus.text) > MAX_INDEX_CHARS:
        return None, f"{_too_large('the training text ' + label, len(corpus.text), 'characters')}; pass --no-copy-report"
    return TrainingText(corpus.text, corpus.sha256, label), ""


def open_index(text: TrainingText, progress: Progress | None = None, cache: bool = True) -> CopyIndex:
    """The copy index of ``text``, from the cache or built (``progress`` hears
    about a build that takes a second or more). Out of memory is a DataError."""
    try:
        return load_or_build(text.text, text.sha256, cache=cache, progress=progress, label=text.label)
    except MemoryError:
        raise DataError(f"not enough memory to index {text.label} for the copy report (about "
                        f"{format_bytes(BUILD_BYTES_PER_CHAR * len(text.text))}); pass --no-copy-report") from None


# ---------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------

def maximal_spans(lengths: list[int]) -> list[tuple[int, int]]:
    """The maximal copied spans (start, end) from the match lengths: the span
    from ``i`` is inside the one from ``i - 1`` exactly when it is one shorter."""
    spans = []
    for i, n in enumerate(lengths):
        if n > 0 and (i == 0 or n != lengths[i - 1] - 1):
            spans.append((i, i + n))
    return spans


@dataclass
class CopyReport:
    against: str  # the training text's name
    min_span: int
    longest: int  # the longest copied span with a generated character in it
    share: float  # of the generated characters, in spans of min_span or more
    spans: list[tuple[int, int]]  # maximal spans of min_span or more: offsets in the printed text
    prime_longest: int = 0  # the longest copied span inside the prime
    generated: int = 0  # generated characters looked at

    def to_dict(self) -> dict[str, object]:
        return {"against": self.against, "min_span": self.min_span, "longest": self.longest,
                "share": self.share, "spans": [list(s) for s in self.spans], "prime_longest": self.prime_longest}

    def footer(self) -> str:
        """One line: ``copied: longest 27 characters; 0.9% of characters in spans of 20+ (against X)``."""
        prime = (f"; the prime itself copies {self.prime_longest}" if self.prime_longest >= self.min_span else "")
        return (f"copied: longest {self.longest} character{'s' * (self.longest != 1)}; {100 * self.share:.1f}% "
                f"of characters in spans of {self.min_span}+{prime} (against {self.against})")


def copy_report(index: CopyIndex, text: str, prime_len: int = 0, min_span: int = DEFAULT_COPY_SPAN,
                against: str = "the training text") -> CopyReport:
    """What ``text`` (a prime of ``prime_len`` characters, then generated
    ones) copies from the index's text; see the module docstring."""
    if isinstance(min_span, bool) or not isinstance(min_span, int) or min_span < 1:
        raise ConfigError(f"the copy span must be a whole number of at least 1, got {min_span!r}")
    prime_len = max(0, min(prime_len, len(text)))
    spans = maximal_spans(index.match_lengths(text))
    longest = max((e - s for s, e in spans if e > prime_len), default=0)
    prime_longest = max((min(e, prime_len) - s for s, e in spans if s < prime_len), default=0)
    kept = [(s, e) for s, e in spans if e - s >= min_span]
    covered, reach = 0, prime_len  # generated characters in kept spans (they overlap: count each once)
    for s, e in kept:
        lo = max(s, reach)
        if e > lo:
            covered += e - lo
            reach = e
    generated = len(text) - prime_len
    return CopyReport(against, min_span, longest, covered / generated if generated else 0.0, kept,
                      prime_longest, generated)


# ---------------------------------------------------------------------------
# The guard
# ---------------------------------------------------------------------------

def check_max_copy(max_copy: object) -> int:
    if isinstance(max_copy, bool) or not isinstance(max_copy, int) or max_copy < 1:
        raise ConfigError(f"max-copy must be a whole number of at least 1, got {max_copy!r}: it is the longest "
                          "span of the training text a sample may repeat (every single character occurs in it, "
                          "so 0 cannot be met); leave it out for no limit")
    return max_copy


@dataclass
class CopyGuard:
    """Masks, per stream, the characters that would copy more than
    ``max_copy`` characters of the index's text (see the module docstring).
    :meth:`start` before a generation; then ``redirected[b]`` (the steps
    redirected) and ``ended[b]`` (the step at which every character was
    masked, or -1) tell what happened to stream ``b``."""

    index: CopyIndex
    tokenizer: CharTokenizer
    max_copy: int
    windows: list[str] = field(default_factory=list)
    redirected: list[list[int]] = field(default_factory=list)
    ended: list[int] = field(default_factory=list)
    t: int = 0

    def __post_init__(self) -> None:
        check_max_copy(self.max_copy)

    def start(self, prime: str, streams: int) -> "CopyGuard":
        tail = prime[len(prime) - self.max_copy:] if self.max_copy < len(prime) else prime
        self.windows = [tail] * streams
        self.redirected = [[] for _ in range(streams)]
        self.ended = [-1] * streams
        self.t = 0
        return self

    def redirected_before(self, b: int, steps: int) -> int:
        """Steps of stream ``b`` redirected among its first ``steps``."""
        return sum(1 for s in self.redirected[b] if s < steps)

    def _blocked(self, b: int) -> list[int]:
        w = self.windows[b]
        if self.ended[b] >= 0 or len(w) < self.max_copy:
            return []
        stoi = self.tokenizer.stoi
        return [stoi[c] for c in self.index.followers(w) if c in stoi]

    def pick(self, logits: Tensor, u: Tensor | None, pick: Callable[[Tensor, Tensor | None], Tensor]) -> Tensor:
        """``pick(logits, u)`` with each stream's masked characters removed
        first. logits (B, V), u (B,) or None (greedy) -> ids (B,)."""
        V = logits.shape[-1]
        masks = {b: ids for b in range(len(self.windows)) if (ids := self._blocked(b))}
        for b, ids in list(masks.items()):
            if len(set(ids)) >= V:  # nothing may follow: the stream ends here
                self.ended[b] = self.t
                del masks[b]
        if not masks:
            nxt = pick(logits, u)
        else:
            blocked = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
            for b, ids in masks.items():
                blocked[b, ids] = True
            nxt = pick(logits.masked_fill(blocked, float("-inf")), u)
            rows = list(masks)
            at = torch.tensor(rows, device=logits.device)
            free = pick(logits.index_select(0, at), None if u is None else u.index_select(0, at)).tolist()
            for b, f in zip(rows, free):
                if f in masks[b]:
                    self.redirected[b].append(self.t)
        chars = self.tokenizer.chars
        keep = self.max_copy
        for b, i in enumerate(nxt.tolist()):
            self.windows[b] = (self.windows[b] + chars[i])[-keep:]
        self.t += 1
        return nxt

    def wrap(self, pick: Callable[[Tensor, Tensor | None], Tensor]) -> Callable[[Tensor, Tensor | None], Tensor]:
        return lambda logits, u: self.pick(logits, u, pick)
