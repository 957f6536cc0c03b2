"""An index of a training text that finds what a sample copies from it.

The index is the text's suffix array: the start of every suffix, in the
order of the suffixes (characters compared by code point, a shorter suffix
before a longer one it begins). Every substring's occurrences are then one
contiguous interval of it, found by binary search. Two questions use it:

- :meth:`CopyIndex.match_lengths` -- for each position of a sample, the
  longest stretch from there that occurs somewhere in the text (the copy
  report is built from these);
- :meth:`CopyIndex.followers` -- the characters that follow the occurrences
  of a string in the text (``charnn sample --max-copy`` masks them).

Building: prefix doubling in numpy (Manber and Myers' idea, with Larsson and
Sadakane's refinement): suffixes are first sorted by their first few
characters packed into one 64-bit key, then repeatedly by (rank of the
first h characters, rank of the next h) -- only the suffixes whose group is
not yet unique take part in a round, so a text with little repetition is done
after a few rounds. Peak memory is about :data:`BUILD_BYTES_PER_CHAR` bytes per
character; the finished index keeps the text and 4 bytes per character.

The index cache
---------------
An index is kept as a ``.npy`` of int32 under ``data_dir()/.cache/copies``
(beside the encoded corpora), named by the text's SHA-256 and a checksum of
the array. An entry is used only if its header says int32 and the text's
length, its checksum matches and it *is* the text's suffix array, checked in
full in linear time: a permutation whose neighbours are in order by (first
character, rank of the rest). A damaged or crafted file is therefore a miss
(deleted and rebuilt), never a wrong answer. Entries are written atomically;
the folder keeps at most :data:`CACHE_MAX_ENTRIES` entries and
:data:`CACHE_MAX_BYTES` bytes, least recently used first out.
"""

from __future__ import annotations

import bisect
import hashlib
import os
import stat
from pathlib import Path

import numpy as np

from .data import atomic_write, prune_cache, cache_dir, cache_lookup
from .reading import Progress, Status, count_text

MAX_INDEX_CHARS = 1 << 25  # texts of up to 33,554,432 characters are indexed (about 1.8 GB to build)
BUILD_BYTES_PER_CHAR = 54  # measured peak of suffix_array (see docs/sampling.md, "What is copied")
BUILD_STATUS_CHARS = 1_000_000  # building for this many characters takes about a second: say so
CACHE_MAX_ENTRIES = 4  # indexes kept under cache_dir()/copies ...
CACHE_MAX_BYTES = 1 << 30  # ... and their total size; least recently used go first


def text_codes(text: str) -> np.ndarray:
    """The text's code points as uint32 (a lone surrogate keeps its own)."""
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")


def suffix_array(codes: np.ndarray) -> np.ndarray:
    """The suffix array (int32) of a sequence of code points, by prefix doubling."""
    n = len(codes)
    if n == 0:
        return np.zeros(0, dtype=np.int32)
    if n >= 1 << 31:
        raise ValueError("a suffix array of int32 holds fewer than 2**31 suffixes")
    alphabet, dense = np.unique(codes, return_inverse=True)
    dense = dense.astype(np.int64) + 1  # 0 stands for "past the end": the shorter suffix sorts first
    bits = int(len(alphabet)).bit_length()
    h = max(1, min(62 // bits, n))  # characters packed into the first key
    key = np.zeros(n, dtype=np.int64)
    for j in range(h):
        key <<= bits
        key[: n - j] |= dense[j:]
    del dense
    sa = np.argsort(key, kind="stable")  # (n,) int64, by the first h characters
    key = key[sa]
    first = np.empty(n, dtype=bool)  # a new group starts at this position of sa
    first[0] = True
    np.not_equal(key[1:], key[:-1], out=first[1:])
    del key
    positions = np.arange(n, dtype=np.int64)
    rank = np.empty(n, dtype=np.int64)  # a suffix's rank: where its group starts in sa
    rank[sa] = np.maximum.accumulate(np.where(first, positions, 0))
    active = positions[~(first & np.append(first[1:], True))]  # positions in groups of two or more
    del first, positions
    while active.size:
        idx = sa[active]
        after = idx + h
        second = np.full(len(idx), -1, dtype=np.int64)
        inside = after < n
        second[inside] = rank[after[inside]]
        del after, inside
        pair = rank[idx] * (n + 1) + (second + 1)  # (group, rank of the next h characters); fits int64
        del second
        order = np.argsort(pair)  # ties are suffixes of one group still: any order
        pair = pair[order]
        idx = idx[order]
        del order
        # Groups are contiguous and keyed by their start, so the sorted pairs
        # fill the active positions in ascending order.
        sa[active] = idx
        first = np.empty(len(pair), dtype=bool)
        first[0] = True
        np.not_equal(pair[1:], pair[:-1], out=first[1:])
        del pair
        rank[idx] = np.maximum.accumulate(np.where(first, active, 0))
        active = active[~(first & np.append(first[1:], True))]
        h *= 2
    return sa.astype(np.int32)


def is_suffix_array(codes: np.ndarray, sa: np.ndarray) -> bool:
    """Whether ``sa`` is the suffix array of ``codes``, checked in linear time:
    a permutation of the positions in which each neighbour pair is ordered
    by (first character, rank of the suffix that follows it)."""
    n = len(codes)
    if not isinstance(sa, np.ndarray) or sa.shape != (n,) or sa.dtype != np.int32:
        return False
    if n == 0:
        return True
    if int(sa.min()) < 0 or int(sa.max()) >= n:
        return False
    rank = np.empty(n + 1, dtype=np.int32)
    rank[n] = -1  # the empty suffix, before every other
    rank[sa] = np.arange(n, dtype=np.int32)
    if not np.array_equal(sa[rank[:n]], np.arange(n, dtype=np.int32)):
        return False  # a position appears twice (and another not at all)
    c = codes[sa]
    r = rank[sa + 1]  # rank of each suffix without its first character
    del rank
    return bool(((c[:-1] < c[1:]) | ((c[:-1] == c[1:]) & (r[:-1] < r[1:]))).all())


class CopyIndex:
    """A text and its suffix array, answering what a string shares with it."""

    def __init__(self, text: str, sa: np.ndarray):
        self.text = text
        self.sa = sa
        self._sa = memoryview(sa)  # indexing gives Python ints: cheaper in the binary searches

    @classmethod
    def from_bytes(cls, text: str, sa: bytes) -> "CopyIndex":
        """An index sent as its text and the suffix array's bytes (``sa.tobytes()``)."""
        return cls(text, np.frombuffer(sa, dtype=np.int32))

    @property
    def nbytes(self) -> int:
        """Memory the index holds: the suffix array and the text."""
        width = 1 if not self.text or max(self.text) < "\x80" else 4  # Python's compact strings, roughly
        return self.sa.nbytes + width * len(self.text)

    def _interval(self, w: str, lo: int = 0, hi: int | None = None) -> tuple[int, int]:
        """The suffixes (positions lo..hi of the suffix array) that begin with ``w``."""
        text, m = self.text, len(w)
        hi = len(self._sa) if hi is None else hi
        key = (lambda j: text[j : j + m])  # noqa: E731
        lo = bisect.bisect_left(self._sa, w, lo, hi, key=key)
        return lo, bisect.bisect_right(self._sa, w, lo, hi, key=key)

    def followers(self, w: str) -> list[str]:
        """The distinct characters ``c`` such that ``w + c`` occurs in the
        text: one binary search per character, however often ``w`` occurs."""
        lo, hi = self._interval(w)
        text, sa, m, n = self.text, self._sa, len(w), len(self.text)
        out = []
        if lo < hi and sa[lo] + m == n:  # the text ends with w: nothing follows that occurrence
            lo += 1
        while lo < hi:
            c = text[sa[lo] + m]
            out.append(c)
            lo = self._interval(w + c, lo, hi)[1]
        return out

    def match_lengths(self, s: str) -> list[int]:
        """For each position i of ``s``: the length of the longest prefix of
        ``s[i:]`` that occurs in the text. The longest is shared with one of the
        two suffixes next to where ``s[i:]`` would sort among them."""
        text, sa, n = self.text, self._sa, len(self._sa)
        out = []
        cap = 64
        for i in range(len(s)):
            while True:
                p = s[i : i + cap]
                m = len(p)
                at = bisect.bisect_left(sa, p, 0, n, key=lambda j: text[j : j + m])
                best = 0
                for k in (at - 1, at):
                    if 0 <= k < n:
                        best = max(best, _common_prefix(text, sa[k], p, best))
                if best < cap or i + cap >= len(s):
                    break
                cap *= 4  # the match may go on past the window: look again with a wider one
            out.append(best)
            cap = max(64, 2 * best)
        return out


def _common_prefix(text: str, j: int, p: str, known: int = 0) -> int:
    """Length of the common prefix of ``text[j:]`` and ``p``, if it is more
    than ``known`` (else ``known``)."""
    lo, hi = known, min(len(p), len(text) - j)
    if lo >= hi or not text.startswith(p[: lo + 1], j):
        return known
    lo += 1
    while lo < hi:  # text[j:] starts with p[:lo]
        mid = (lo + hi + 1) // 2
        if text.startswith(p[:mid], j):
            lo = mid
        else:
            hi = mid - 1
    return lo


# ---------------------------------------------------------------------------
# Building once, the cache
# ---------------------------------------------------------------------------

def index_cache_dir() -> Path:
    return cache_dir() / "copies"


def _digest(sa: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(sa).data).hexdigest()[:16]


def load_or_build(text: str, sha256: str, *, cache: bool = True, progress: Progress | None = None,
                  label: str = "the text") -> CopyIndex:
    """The index of ``text`` (whose SHA-256 is ``sha256``): from the cache
    when a verified entry is there, else built (and stored, with ``cache``).
    ``progress`` hears when a build will take a second or more."""
    if len(text) > MAX_INDEX_CHARS:
        raise ValueError(f"text of {len(text):,} characters is over MAX_INDEX_CHARS")
    codes = text_codes(text)
    folder = index_cache_dir()
    key = sha256[:24]
    if cache:
        hit = _lookup(folder, key, codes)
        if hit is not None:
            return CopyIndex(text, hit)
    if len(text) >= BUILD_STATUS_CHARS:
        Status(progress).say(f"indexing {label} ({count_text(len(text))} characters) for the copy report; "
                             "once, then cached")
    sa = suffix_array(codes)
    if cache:
        path = folder / f"{key}-{_digest(sa)}.npy"
        try:
            atomic_write(path, lambda f: np.save(f, sa))
            prune_cache(folder, keep=path, max_entries=CACHE_MAX_ENTRIES, max_bytes=CACHE_MAX_BYTES)
        except (OSError, ValueError):
            pass  # a read-only or full disk only costs the cache
    return CopyIndex(text, sa)


def _lookup(folder: Path, key: str, codes: np.ndarray) -> np.ndarray | None:
    def verified(path: Path) -> np.ndarray | None:
        sa = _read_entry(path, len(codes))
        if sa is None or _digest(sa) != path.stem.rsplit("-", 1)[-1] or not is_suffix_array(codes, sa):
            return None
        return sa

    return cache_lookup(folder, key, verified)


def _read_entry(path: Path, n: int) -> np.ndarray | None:
    """The int32 array of ``n`` items a cache file holds, or None for anything
    else (a header claiming another shape is refused before any data is read)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
                     | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    try:
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return None
            version = np.lib.format.read_magic(f)
            if version != (1, 0):
                return None
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            if shape != (n,) or fortran or dtype != np.dtype("<i4"):
                return None
            sa = np.fromfile(f, dtype="<i4", count=n)
            if len(sa) != n or f.read(1):
                return None
            return sa.astype(np.int32, copy=False)
    except Exception:  # noqa: BLE001 - any unreadable or crafted file is just a cache miss
        return None
