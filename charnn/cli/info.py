"""charnn info: what a checkpoint holds."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import app, dumps, err, escape_text, fmt_duration, fmt_loss, out_console, plural, run_command, stdout

# ---------------------------------------------------------------------------
# info
# ---------------------------------------------------------------------------

@app.command()
def info(
    checkpoint: Annotated[Path, typer.Argument(metavar="CHECKPOINT", show_default=False,
                                               help="A checkpoint written by charnn train.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    plot: Annotated[Optional[Path], typer.Option(
        "--plot", metavar="FILE", show_default=False,
        help="Write the train and validation loss curves as a PNG image (needs matplotlib: "
             "pip install 'charnn[plot]').")] = None,
) -> None:
    """Show what a checkpoint holds.

    The model, its vocabulary, the training state and options, and the loss
    curve."""

    def body() -> None:
        from ..storage.checkpoint import load
        from ..analysis.report import escape_vocab, loss_curves, plot_png, text_chart

        ckpt = load(checkpoint)
        mc = ckpt.model_config
        ts = {k: v for k, v in ckpt.train_state.items()
              if isinstance(v, (int, float, str, bool)) or v is None}
        params = sum(t.numel() for t in ckpt.data["model_state"].values())
        best = ts.get("best_val")
        train_curve, val_curve = loss_curves(ckpt.metrics)
        if plot is not None:
            plot_png(train_curve, val_curve, plot, title=f"{checkpoint}: {mc.cell} {mc.num_layers}x{mc.hidden_size}")
            err.print(f"Wrote {plot}.", markup=False)
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
        lines = [f"checkpoint  {escape_text(str(checkpoint))}",
                 f"            format {data['format_version']}, charnn {escape_text(str(data['charnn_version']))}, "
                 f"created {escape_text(str(data['created']))}",
                 f"model       {mc.cell} {mc.num_layers}x{mc.hidden_size}, embedding {mc.embedding_dim}, "
                 f"dropout {mc.dropout}, {plural(params, 'parameter')}",
                 f"vocabulary  {plural(mc.vocab_size, 'character')}: {escape_vocab(ckpt.tokenizer.chars)}"]
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
                out.print(f"  {escape_text(str(k)):<16} {escape_text(str(shown))}", markup=False)
        chart = text_chart(train_curve, val_curve)
        if chart:
            out.print("loss curve", markup=False)
            out.print("\n".join("  " + line for line in chart), markup=False)
        else:
            out.print("loss curve  none recorded", markup=False)

    run_command(body)
