"""A CHECKPOINT argument, shared by the commands that read one."""

from __future__ import annotations

import os
from pathlib import Path


def named_checkpoint(path: Path) -> Path:
    """A CHECKPOINT argument: a file, or the name of a base shipped with
    charnn (``prose-en``) where no file in the current folder has that name."""
    if path.parent == Path(".") and not os.path.lexists(path):
        from ..training.base import shipped_bases

        return shipped_bases().get(str(path), path)
    return path


CHECKPOINT_HELP = "A checkpoint written by charnn train, or a shipped base's name (prose-en)."
