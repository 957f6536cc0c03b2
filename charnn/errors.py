"""The one exception family charnn raises.

Every message is written for the person at the keyboard: what went wrong and
what to do about it. The CLI prints ``Error: <message>`` and exits 1.
"""

from __future__ import annotations

import unicodedata


class CharnnError(Exception):
    """Base class of every error charnn raises on purpose."""


class DataError(CharnnError):
    """A corpus or input text cannot be used (missing, empty, not UTF-8, ...)."""


class VocabError(CharnnError):
    """Text holds characters the model's vocabulary does not have."""

    def __init__(self, message: str, characters: list[str] | None = None):
        super().__init__(message)
        self.characters = characters or []


class CheckpointError(CharnnError):
    """A checkpoint file is missing, damaged, foreign, too new or inconsistent."""


class ConfigError(CharnnError):
    """Options that contradict each other or the checkpoint."""


class RunFolderError(CharnnError):
    """The output folder cannot be used: a file, read-only, locked by another
    run, or holding an earlier run that a new one would replace."""


class FolderLockedError(RunFolderError):
    """Another live process is writing to the output folder."""


class FolderTakenError(RunFolderError):
    """The folder holds a run, and a new run (not --overwrite) would replace it."""


class TrainingError(CharnnError):
    """Training cannot go on (for example, the loss keeps turning NaN)."""


def describe_char(ch: str) -> str:
    """A printable description of one character: ``'é' (U+00E9)``."""
    return f"{ch!r} (U+{ord(ch):04X})"


class NonFiniteError(CharnnError):
    """A model produced inf/NaN outputs from finite inputs: its weights are out of range."""


def safe_display(s: object, limit: int | None = 200, keep: str = "") -> str:
    """``s`` made harmless to print: every non-printable character -- control
    characters (ESC of ANSI sequences, C1 controls such as CSI), bidi
    overrides and other format characters, line separators, lone surrogates,
    unassigned code points -- becomes a visible escape (``\\x1b``,
    ``\\u202e``, ``\\ud800``), except the characters in ``keep`` (e.g.
    ``"\\n\\t"`` for multi-line text). Spaces of every kind stay. Backslashes
    are not doubled, so the result is for reading, not for parsing back. With
    ``limit``, at most that many characters are kept and the cut is said.
    For strings from checkpoints or any other untrusted file before they
    reach a terminal or an error message."""
    s = s if isinstance(s, str) else str(s)
    cut = 0
    if limit is not None and len(s) > limit:
        s, cut = s[:limit], len(s) - limit
    if not s.isprintable():
        out = []
        for ch in s:
            if ch.isprintable() or ch in keep or unicodedata.category(ch) == "Zs":
                out.append(ch)
            else:
                o = ord(ch)
                out.append(f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}")
        s = "".join(out)
    if cut:
        s += f"... ({cut:,} more characters)"
    return s


def shell_arg(value: object) -> str:
    """``value`` (a path) as it must be typed in a POSIX shell in a command
    charnn prints: quoted when it needs to be, unprintable characters escaped."""
    import shlex

    return safe_display(shlex.quote(str(value)), limit=None)


def plural(n: int | float, word: str, many: str | None = None) -> str:
    """``1 step``, ``2 steps``, ``1,000 characters``; ``many`` for irregular plurals."""
    shown = f"{n:,}" if isinstance(n, int) else f"{n:,g}"
    return f"{shown} {word if n == 1 else (many or word + 's')}"


def format_bytes(n: float) -> str:
    """1.3 TB, 23 GB, 512 kB: decimal units, two significant figures."""
    for unit in ("B", "kB", "MB", "GB", "TB", "PB", "EB"):
        if n < 1000 or unit == "EB":
            return f"{n:.0f} {unit}" if unit == "B" or n >= 10 else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.0f} EB"  # pragma: no cover
