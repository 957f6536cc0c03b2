"""charnn info: what a checkpoint holds."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.cells import cell_len

from .arguments import CHECKPOINT_HELP, named_checkpoint
from .common import (app, dumps, err, escape_text, fmt_duration, fmt_loss, out_console, plural, run_command,
                     safe_display, stdout)

LABEL_W = 12  # "vocabulary  ": the first column of the header lines
KEY_W = 16  # an option's name, after two spaces of indent
VOCAB_LINES = 4  # a vocabulary of thousands (Chinese poems: 2,841) would fill the screen; --json lists it all

# ---------------------------------------------------------------------------
# info
# ---------------------------------------------------------------------------

@app.command()
def info(
    checkpoint: Annotated[Path, typer.Argument(metavar="CHECKPOINT", show_default=False, help=CHECKPOINT_HELP,
                                               callback=named_checkpoint)],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    plot: Annotated[Optional[Path], typer.Option(
        "--plot", metavar="FILE", show_default=False,
        help="Write the train and validation loss curves as a PNG image (needs matplotlib: "
             "pip install 'charnn[plot]').")] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Let --plot replace an existing file that is not a PNG image, or the checkpoint "
                            "itself (an earlier plot is replaced without it).")] = False,
) -> None:
    """Show what a checkpoint holds.

    The model, its vocabulary, the training state and options, and the loss
    curve."""

    def body() -> None:
        from ..analysis.report import escape_vocab, loss_curves, plot_png, text_chart
        from ..storage.outputs import check_output
        from ..storage.checkpoint import load

        if plot is not None:
            check_output(plot, "png", "--plot", inputs=[checkpoint], overwrite=overwrite)
        ckpt = load(checkpoint)
        mc = ckpt.model_config
        ts = {k: v for k, v in ckpt.train_state.items()
              if isinstance(v, (int, float, str, bool)) or v is None}
        params = sum(t.numel() for t in ckpt.data["model_state"].values())
        best = ts.get("best_val")
        train_curve, val_curve = loss_curves(ckpt.metrics)
        if plot is not None:
            plot_png(train_curve, val_curve, plot, title=f"{checkpoint}: {mc.cell} {mc.num_layers}x{mc.hidden_size}")
            err.print(f"Wrote {safe_display(plot, None)}.", markup=False)
        data = {"path": str(checkpoint), "format_version": ckpt.data["format_version"],
                "charnn_version": ckpt.data.get("charnn_version"), "created": ckpt.data.get("created"),
                "model_config": mc.to_dict(), "parameters": params, "vocab": ckpt.tokenizer.to_list(),
                "train_state": ts,
                "best_val_loss": best, "best_val_bpc": best / math.log(2) if isinstance(best, (int, float)) else None,
                "train_config": ckpt.train_config,
                "metrics": {"train": [{"step": s, "train_loss": v} for s, v in train_curve],
                            "val": [{"step": s, "val_loss": v} for s, v in val_curve]}}
        if as_json:
            stdout.write(dumps(data) + "\n")
            return
        out = out_console()
        lines = [_folded("checkpoint  ", escape_text(str(checkpoint)), out),
                 f"            format {data['format_version']}, charnn {escape_text(str(data['charnn_version']))}, "
                 f"created {escape_text(str(data['created']))}",
                 f"model       {mc.cell} {mc.num_layers}x{mc.hidden_size}, embedding {mc.embedding_dim}, "
                 f"dropout {mc.dropout}, {plural(params, 'parameter')}",
                 *_vocab_lines(ckpt.tokenizer.chars, plural(mc.vocab_size, "character"), out.width, escape_vocab)]
        if ts:
            # The metrics rows carry the fractional epoch; train_state counts whole ones.
            epoch = next((r["epoch"] for r in reversed(ckpt.metrics) if isinstance(r.get("epoch"), (int, float))),
                         ts.get("epoch") or 0)
            lines.append(f"training    step {ts.get('step', 0):,}, epoch {float(epoch):.2f}, "
                         f"{plural(ts.get('chars_seen', 0), 'character')} seen in "
                         f"{fmt_duration(ts.get('elapsed') or 0)}")
            lines.append(f"            best val loss {fmt_loss(best) if isinstance(best, (int, float)) else 'n/a'}")
            extra = [f"{k} {escape_text(str(ts[k]))}" for k in ("device", "precision") if ts.get(k)]
            extra += [plural(ts[k], word, many) + rest
                      for k, word, many, rest in (("clipped_steps", "clipped step", None, ""),
                                                  ("nonfinite_skipped", "non-finite step", None, " skipped"),
                                                  ("restores", "restore", None, "")) if ts.get(k)]
            if extra:
                lines.append("            " + ", ".join(extra))
        else:
            lines.append("training    no training state recorded")
        out.print("\n".join(lines), markup=False)
        if ckpt.train_config:
            out.print("options", markup=False)
            for k, v in ckpt.train_config.items():
                shown = ", ".join(map(str, v)) if isinstance(v, list) and k == "corpus" else v
                if k == "corpus" and not v:
                    shown = "(built-in corpus)"
                if k.endswith("_hash") and isinstance(v, str) and len(v) > 16:
                    shown = v[:16] + "…"  # enough to compare by eye; --json has it whole
                if v is None:
                    shown = "auto"  # an option left to the run (warmup_steps: the automatic warmup)
                out.print(_folded(f"  {escape_text(str(k)):<{KEY_W}} ", escape_text(str(shown)), out), markup=False)
        chart = text_chart(train_curve, val_curve)
        if chart:
            out.print("loss curve", markup=False)
            out.print("\n".join("  " + line for line in chart), markup=False)
        else:
            out.print("loss curve  none recorded", markup=False)

    run_command(body)


def _vocab_lines(chars: list[str], count: str, width: int, escape: Any) -> list[str]:
    """``vocabulary  N characters: abc...`` folded to the terminal's width
    (an escape such as ``\\n`` is never split), at most VOCAB_LINES lines: a
    longer vocabulary ends with how many characters are not shown."""
    room = max(30, width - LABEL_W)
    rows: list[list[str]] = [[f"{count}: "]]
    for c in chars:
        piece = escape([c])
        if cell_len("".join(rows[-1]) + piece) > room:
            rows.append([])
        rows[-1].append(piece)
    if len(rows) > VOCAB_LINES:
        rows = rows[:VOCAB_LINES]
        last = rows[-1]
        while True:
            hidden = len(chars) - sum(len(r) for r in rows) + 1  # the count is not a character
            tail = f" … {hidden:,} more (--json lists them all)"
            if cell_len("".join(last) + tail) <= room or len(last) <= 1:
                break
            last.pop()
        last.append(tail)
    return [("vocabulary  " if k == 0 else " " * LABEL_W) + "".join(r).rstrip() for k, r in enumerate(rows)]


def _folded(head: str, value: str, out: Any) -> str:
    """``head`` then ``value``, folded to the terminal's width under itself
    (size_reason, corpus lists and paths run to 170 columns)."""
    from rich.text import Text

    rows = [r.plain.rstrip() for r in Text(value).wrap(out, max(20, out.width - len(head)), overflow="fold")]
    return "\n".join((head if k == 0 else " " * len(head)) + row for k, row in enumerate(rows or [""])).rstrip()
