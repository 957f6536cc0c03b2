"""Characters <-> integer ids.

The vocabulary is the sorted set of the corpus's Unicode code points (not
bytes), so id order is code-point order and the tokenizer is fully described by
a plain list of one-character strings. A character outside the vocabulary is an
error that names it -- never a silent mapping to another id -- unless the
caller asks to skip such characters.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from ..errors import VocabError, describe_char

# Encoding goes through a UTF-32 view in chunks, so the peak extra memory is a
# few bytes per character of one chunk, not of the whole corpus.
_CHUNK = 1 << 22


def dtype_for(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type that holds every id."""
    if vocab_size <= 1 << 8:
        return np.dtype(np.uint8)
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


def _code_points(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


class CharTokenizer:
    """A character-level tokenizer over a fixed, sorted vocabulary."""

    def __init__(self, chars: Sequence[str]):
        chars = list(chars)
        for ch in chars:
            if not isinstance(ch, str) or len(ch) != 1:
                raise VocabError(f"vocabulary entries must be single characters, got {ch!r}")
        if len(set(chars)) != len(chars):
            raise VocabError("vocabulary has repeated characters")
        if not chars:
            raise VocabError("vocabulary is empty")
        self.chars: list[str] = chars
        self.stoi: dict[str, int] = {ch: i for i, ch in enumerate(chars)}
        points = np.array([ord(c) for c in chars], dtype=np.uint32)
        self._order = np.argsort(points, kind="stable")
        self._sorted_points = points[self._order]

    # -- construction / plain data ---------------------------------------
    @classmethod
    def from_text(cls, text: str | Iterable[str]) -> "CharTokenizer":
        if isinstance(text, str):
            found: set[str] = set()
            for start in range(0, len(text), _CHUNK):
                found.update(np.unique(_code_points(text[start : start + _CHUNK])).tolist())
            return cls([chr(p) for p in sorted(found)])
        chars: set[str] = set()
        for piece in text:
            chars.update(piece)
        return cls(sorted(chars))

    def to_list(self) -> list[str]:
        return list(self.chars)

    @classmethod
    def from_list(cls, chars: Sequence[str]) -> "CharTokenizer":
        return cls(chars)

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def __len__(self) -> int:
        return len(self.chars)

    def __contains__(self, ch: object) -> bool:
        return ch in self.stoi

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharTokenizer) and other.chars == self.chars

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"

    # -- encode / decode -------------------------------------------------
    def unknown_chars(self, text: str) -> list[str]:
        """The distinct characters of ``text`` outside the vocabulary, sorted."""
        return sorted(set(text) - self.stoi.keys())

    def encode_array(self, text: str, unknown: str = "error") -> np.ndarray:
        """Encode to a compact numpy array (uint8/uint16/int32 by vocab size).

        ``unknown`` is ``"error"`` (raise :class:`VocabError` naming the
        characters) or ``"skip"`` (drop them).
        """
        if unknown not in ("error", "skip"):
            raise ValueError(f"unknown must be 'error' or 'skip', not {unknown!r}")
        out_dtype = dtype_for(self.vocab_size)
        pieces = []
        for start in range(0, len(text), _CHUNK):
            points = _code_points(text[start : start + _CHUNK])
            pos = np.searchsorted(self._sorted_points, points)
            pos_clipped = np.minimum(pos, len(self._sorted_points) - 1)
            known = self._sorted_points[pos_clipped] == points
            if not known.all():
                if unknown == "error":
                    self._raise_unknown(text)
                pos_clipped = pos_clipped[known]
            pieces.append(self._order[pos_clipped].astype(out_dtype))
        if not pieces:
            return np.zeros(0, dtype=out_dtype)
        return np.concatenate(pieces) if len(pieces) > 1 else pieces[0]

    def encode(self, text: str, unknown: str = "error") -> list[int]:
        return self.encode_array(text, unknown=unknown).tolist()

    def decode(self, ids: Iterable[int]) -> str:
        chars = self.chars
        try:
            return "".join(chars[int(i)] for i in ids)
        except IndexError:
            raise VocabError(f"token id out of range for a vocabulary of {self.vocab_size}") from None

    def _raise_unknown(self, text: str) -> None:
        bad = self.unknown_chars(text)
        shown = ", ".join(describe_char(c) for c in bad[:20])
        more = f" and {len(bad) - 20} more" if len(bad) > 20 else ""
        raise VocabError(
            f"the text has {len(bad)} character(s) the model's vocabulary lacks: {shown}{more}. "
            "Remove them, or pass --unknown skip to drop them"
            " (for training, --extend-vocab grows the vocabulary)",
            characters=bad,
        )
