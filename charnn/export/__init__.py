"""Exporting a checkpoint for use without charnn: a web page, ONNX.

:func:`export` checks the output path (never a file of another kind, never
the checkpoint itself, unless ``overwrite``), builds the file in memory and
writes it atomically: a failure leaves no file and no half file.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import CharnnError, ConfigError, safe_display
from .result import ExportResult

__all__ = ["FORMATS", "SUFFIXES", "WEIGHTS", "ExportResult", "export"]

FORMATS = ("web", "onnx")
SUFFIXES = {"web": ".html", "onnx": ".onnx"}
WEIGHTS = ("auto", "fp32", "int16", "int8")


def refuse_the_checkpoint(checkpoint: Path, out: Path) -> None:
    """An export never replaces the checkpoint it reads, even with
    ``overwrite`` (which lets it replace other files): the page or graph would
    take the place of the only copy of the weights."""
    read = [checkpoint / name for name in ("best.pt", "last.pt")] if checkpoint.is_dir() else [checkpoint]
    for path in read:
        try:
            same = os.path.samefile(path, out)
        except OSError:  # either does not exist (yet): not the same file
            continue
        if same:
            raise CharnnError(f"--out {safe_display(out)} is the checkpoint being exported ({safe_display(path)}); "
                              "an export never replaces its checkpoint: choose another path")


def export(checkpoint: str | os.PathLike, fmt: str, out: str | os.PathLike, *, weights: str = "auto",
           note: str | None = None, overwrite: bool = False) -> ExportResult:
    """Export ``checkpoint`` as ``fmt`` ("web" or "onnx") to ``out``."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    if weights not in WEIGHTS:
        raise ConfigError(f"unknown weights {weights!r}; choose one of: {', '.join(WEIGHTS)}")
    refuse_the_checkpoint(Path(checkpoint), Path(out))
    if fmt == "web":
        from .web import export_web

        return export_web(checkpoint, out, weights=weights, note=note, overwrite=overwrite)
    if weights != "auto":
        raise ConfigError("--weights applies to --format web only; ONNX keeps the checkpoint's fp32 weights")
    if note:
        raise ConfigError("--note applies to --format web only")
    from .onnx import export_onnx

    return export_onnx(checkpoint, out, overwrite=overwrite)
