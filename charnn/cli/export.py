"""charnn export: a checkpoint as a web page or an ONNX model."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from .arguments import CHECKPOINT_HELP, named_checkpoint
from .common import app, err, run_command


class Format(str, Enum):
    web = "web"
    onnx = "onnx"


class Weights(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    int16 = "int16"
    int8 = "int8"


@app.command()
def export(
    checkpoint: Annotated[Path, typer.Argument(metavar="CHECKPOINT", show_default=False, help=CHECKPOINT_HELP,
                                               callback=named_checkpoint)],
    fmt: Annotated[Format, typer.Option(
        "--format", "-f", metavar="[web|onnx]",
        help="web: one HTML file that generates text offline in a browser; onnx: the model for "
             "onnxruntime and other runtimes (one step or a chunk of text per call).")] = Format.web,
    out: Annotated[Optional[Path], typer.Option(
        "--out", "-o", metavar="FILE", show_default=False,
        help="The file to write.  [default: the checkpoint's name with .html or .onnx]")] = None,
    weights: Annotated[Weights, typer.Option(
        metavar="[auto|fp32|int16|int8]",
        help="How the web page stores the weights: auto is fp32 when that page is at most "
             "4 MB, else int16 (per-row scales) when that keeps the validation loss within "
             "0.5% of fp32's, else fp32. int8: a quarter of fp32's size.")] = Weights.auto,
    note: Annotated[Optional[str], typer.Option(
        metavar="TEXT", show_default=False,
        help="A note shown on the web page (licence, author, what the model was trained on).")] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite",
        help="Replace an existing file that is not an export of this format (never the checkpoint being "
             "exported).")] = False,
) -> None:
    """Export a checkpoint: a self-contained web page (no network, opens from
    disk) or an ONNX model. Nothing is written unless the whole file is."""

    def body() -> None:
        from ..export import SUFFIXES, export as export_file
        from ..errors import format_bytes, safe_display

        target = out if out is not None else checkpoint.with_suffix(SUFFIXES[fmt.value])
        result = export_file(checkpoint, fmt.value, target, weights=weights.value, note=note, overwrite=overwrite)
        shown = ", ".join(f"{k} {v}" for k, v in result.details.items())
        err.print(f"wrote {safe_display(result.path)} ({format_bytes(result.bytes)}{', ' + shown if shown else ''})",
                  markup=False)

    run_command(body)
