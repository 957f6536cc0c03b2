"""The one exception family charnn raises.

Every message is written for the person at the keyboard: what went wrong and
what to do about it. The CLI prints ``Error: <message>`` and exits 1.
"""

from __future__ import annotations


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


class TrainingError(CharnnError):
    """Training cannot go on (for example, the loss keeps turning NaN)."""


def describe_char(ch: str) -> str:
    """A printable description of one character: ``'é' (U+00E9)``."""
    return f"{ch!r} (U+{ord(ch):04X})"
