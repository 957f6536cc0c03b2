"""A run folder's file names, and choosing the folder a run writes to: a new
run never replaces another run's files."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

from ..errors import RunFolderError
from ..safe_files import RUN_MARKER

METRICS_NAME = "metrics.jsonl"
CHECKPOINT_NAMES = ("best.pt", "last.pt")
STEP_FILE = re.compile(r"^step-(\d+)\.pt$")


def step_file_name(step: int) -> str:
    """``step-0000123.pt``: seven digits, more when the step needs them."""
    return f"step-{step:07d}.pt"


def step_files(folder: Path) -> list[tuple[int, Path]]:
    """The ``step-N.pt`` files in ``folder`` as (N, path), ordered by N
    (``step-999.pt`` before ``step-1000.pt``), then by name."""
    found = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    for entry in entries:
        m = STEP_FILE.match(entry.name)
        if m:
            found.append((int(m.group(1)), entry.name))
    return [(n, folder / name) for n, name in sorted(found)]


# ---------------------------------------------------------------------------
# Choosing the folder
# ---------------------------------------------------------------------------

def folder_holds_run(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding (part of) a charnn run: a
    checkpoint, a step file, the metrics log or the run marker."""
    path = Path(path)
    if not path.is_dir():
        return False
    names = (*CHECKPOINT_NAMES, METRICS_NAME, RUN_MARKER)
    if any((path / n).exists() for n in names):
        return True
    return bool(step_files(path))


def _resumable(folder: Path) -> Path | None:
    """The checkpoint a run in ``folder`` would resume from: last.pt, else
    best.pt, else the newest step file."""
    for name in ("last.pt", "best.pt"):
        if (folder / name).is_file():
            return folder / name
    steps = step_files(folder)
    return steps[-1][1] if steps else None


def choose_out_dir(requested: Path | None, default: Path, *, resuming: bool,
                   overwrite: bool) -> tuple[Path, str | None]:
    """The folder a run writes to, and a note for the CLI to print (or None).

    - resuming: ``requested`` (or ``default``) as is.
    - a new run with an explicit ``--out`` holding a run: refused, naming
      ``--resume``, ``--out`` and ``--overwrite``; with ``overwrite`` it is
      used (its old files are removed when the new run first writes there,
      see :class:`RunFolder`).
    - a new run into the default folder holding a run: the first free
      ``DEFAULT-2``, ``DEFAULT-3``, ... and a note saying so.
    """
    if resuming:
        if overwrite:
            raise RunFolderError("--overwrite starts a new run and cannot be combined with --resume; "
                                 "drop one of them")
        return Path(requested if requested is not None else default), None
    target = Path(requested if requested is not None else default)
    if not folder_holds_run(target):
        return target, None
    if overwrite:
        return target, (f"{target} holds an earlier run; --overwrite: its checkpoints and metrics are replaced "
                        "when this run writes its first")
    if requested is not None:
        resumable = _resumable(target)
        if resumable is not None:
            cont = f"To continue it: charnn train --resume {shlex.quote(str(resumable))}; to"
        else:
            cont = "It has no checkpoint to resume. To"
        raise RunFolderError(
            f"{target} already holds a training run. {cont} start a new run elsewhere: --out OTHER; "
            "to replace it: --overwrite")
    if not target.name:  # "." or "/": number the folder's real name
        target = target.resolve()
    n = 2
    while True:
        candidate = target.with_name(f"{target.name}-{n}")
        if not candidate.exists() or (candidate.is_dir() and not folder_holds_run(candidate)):
            return candidate, f"{target} holds an earlier run; writing to {candidate}/"
        n += 1
