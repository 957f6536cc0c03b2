"""charnn eval: scores, the surprisal view and page, gradient flow."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from .common import Unknown, app, err, run_command

# ---------------------------------------------------------------------------
# eval
# ---------------------------------------------------------------------------

SHOW_DEFAULT_CHARS = 2000  # --show: a screenful or two
HTML_DEFAULT_CHARS = 20000  # --html: one element per character; a browser copes with this many
GRADIENT_FLOW_ROWS = (0, 1, 2, 3, 5, 10, 15, 20, 30, 40, 50, 60, 70, 80, 90, 99)


@app.command("eval")
def evaluate(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint written by charnn train.", show_default=False)],
    files: Annotated[Optional[list[Path]], typer.Argument(help="Text files to score, each on its own. None: the checkpoint's own validation split.", show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (totals at the top level, per-file entries under 'files').")] = False,
    encoding: Annotated[str, typer.Option(help="Text encoding of the files.")] = "utf-8",
    unknown: Annotated[Unknown, typer.Option(help="Characters outside the model's vocabulary: error (name them) or skip (drop and count them).")] = Unknown.error,
    show: Annotated[bool, typer.Option("--show", help="Print the text coloured by each character's surprisal.")] = False,
    html: Annotated[Optional[Path], typer.Option("--html", help="Write a standalone HTML page: every character coloured by its loss; hover for its probability and the top 5 alternatives.", show_default=False)] = None,
    max_chars: Annotated[Optional[int], typer.Option(min=2, help=f"Characters shown by --show / --html, from the start of the text (default {SHOW_DEFAULT_CHARS:,} for --show, {HTML_DEFAULT_CHARS:,} for --html).", show_default=False)] = None,
    gradient_flow: Annotated[bool, typer.Option("--gradient-flow", help="Measure how far back the loss's gradient reaches (vanishing gradients), and W_hh's largest singular values.")] = False,
    window: Annotated[int, typer.Option(min=2, max=2000, help="--gradient-flow: window length (largest distance + 1).")] = 100,
    windows: Annotated[int, typer.Option(min=1, max=1024, help="--gradient-flow: windows averaged over.")] = 32,
) -> None:
    """Loss, bits per character and perplexity of a model on text, per file and in total;
    optionally the surprisal of every character and the gradient flow."""
    if show and as_json:
        raise typer.BadParameter("--show and --json both write to stdout; use one of them (or --html PAGE with --json)",
                                 param_hint="--show")

    def body() -> None:
        import numpy as np

        from ..checkpoint import load_model
        from ..evaluate import evaluate_texts, load_eval_texts

        model, tokenizer, ckpt = load_model(checkpoint)
        texts = load_eval_texts(tokenizer, ckpt, [str(f) for f in files or []], encoding=encoding,
                                unknown=unknown.value)
        report = evaluate_texts(model, texts)
        data: dict[str, Any] = report.to_dict()
        if html is not None:
            path, shown = _write_surprisal_page(model, tokenizer, texts, report, html,
                                                max_chars or HTML_DEFAULT_CHARS, str(checkpoint))
            err.print(f"Wrote {path} ({shown:,} characters).", markup=False)
            data["html"] = str(path)
        flow = None
        if gradient_flow:
            from ..evaluate import gradient_flow as measure

            ids = np.concatenate([np.asarray(t.ids, dtype=np.int64) for t in texts])
            flow = measure(model, ids, window=window, windows=windows)
            data["gradient_flow"] = flow.to_dict()
        if as_json:
            sys.stdout.write(json.dumps(data) + "\n")
            return
        out = Console(highlight=False, soft_wrap=True)
        if show:
            _print_surprisal(out, model, tokenizer, texts, max_chars or SHOW_DEFAULT_CHARS)
        _print_eval(out, report)
        if flow is not None:
            _print_gradient_flow(out, flow, ckpt.model_config.cell)

    run_command(body)


def _print_eval(out: Console, report: Any) -> None:
    if len(report.files) > 1:
        # Plain columns (not a rich table): file names are never cut short.
        name_w = max(4, *(len(f.name) for f in report.files))
        out.print(f"{'file':<{name_w}}  {'characters':>10}  {'loss':>7}  {'bits/char':>9}  {'perplexity':>10}  "
                  f"{'unknown':>7}", markup=False)
        for f in report.files:
            d = f.to_dict()
            out.print(f"{f.name:<{name_w}}  {d['chars']:>10,}  {d['loss']:>7.4f}  {d['bpc']:>9.4f}  "
                      f"{d['perplexity']:>10.3f}  {f.unknown:>7,}", markup=False)
        out.print(f"total ({len(report.files)} files)", markup=False)
    d = report.total.to_dict()
    out.print(f"characters  {d['chars']:,}\nloss        {d['loss']:.4f} nats/char\n"
              f"bits/char   {d['bpc']:.4f}\nperplexity  {d['perplexity']:.3f}", markup=False)
    if report.unknown:
        out.print(f"unknown     {report.unknown:,} characters outside the vocabulary (skipped)", markup=False)


def _surprisal_of(model: Any, texts: list, limit: int) -> list[tuple[Any, Any, bool]]:
    """(text, Surprisal of its first part, cut?) for as many texts as ``limit``
    characters reach."""
    from ..evaluate import surprisal

    out, left = [], limit
    for t in texts:
        if left < 2:
            break
        ids = t.ids[:left]
        out.append((t, surprisal(model, ids), len(ids) < len(t.ids)))
        left -= len(ids)
    return out


def _print_surprisal(out: Console, model: Any, tokenizer: Any, texts: list, limit: int) -> None:
    from rich.text import Text

    from ..report import BANDS, LN2, band

    legend = Text("surprisal: ")
    for _, colour, label in BANDS:
        legend.append(f" {label} ", style=f"black on {colour}")
        legend.append(" ")
    out.print(legend)
    for t, s, cut in _surprisal_of(model, texts, limit):
        out.print(Text(f"── {t.name}" + (f" (first {len(s.ids):,} characters)" if cut else ""), style="bold"))
        chars = tokenizer.decode(s.ids)
        line = Text(chars[0], style="dim")  # the first character is only context
        for ch, loss in zip(chars[1:], s.loss):
            line.append(ch, style=f"black on {BANDS[band(float(loss) / LN2)][1]}" if ch != "\n" else "")
        out.print(line)
    out.print()


def _write_surprisal_page(model: Any, tokenizer: Any, texts: list, report: Any, path: Path, limit: int,
                          name: str) -> tuple[Path, int]:
    from ..report import surprisal_page, surprisal_section, write_text

    sections, shown = [], 0
    for t, s, cut in _surprisal_of(model, texts, limit):
        chars = tokenizer.decode(s.ids)
        top = [[(tokenizer.chars[int(i)], float(p)) for i, p in zip(ti, tp)]
               for ti, tp in zip(s.top_ids, s.top_probs)]
        note = (f"the first {len(s.ids):,} of {len(t.ids):,} characters" if cut else "") + \
            (f"; {t.unknown:,} characters outside the vocabulary were skipped" if t.unknown else "")
        sections.append(surprisal_section(t.name, chars, s.loss.tolist(), s.prob.tolist(), top, note.lstrip("; ")))
        shown += len(s.ids)
    d = report.total.to_dict()
    summary = (f"{d['chars']:,} characters scored: loss {d['loss']:.4f} nats/char, {d['bpc']:.4f} bits/char, "
               f"perplexity {d['perplexity']:.3f}")
    return write_text(path, surprisal_page(f"charnn surprisal: {name}", summary, sections)), shown


def _log_bar(value: float, floor: float, width: int = 40) -> str:
    """A bar whose length is linear in log10(value), from ``floor`` (empty) to 1 (full)."""
    if not value > 0:
        return ""
    frac = (math.log10(value) - math.log10(floor)) / -math.log10(floor)
    n = max(0.0, min(1.0, frac)) * width
    return "█" * int(n) + ("▌" if n - int(n) >= 0.5 else "")


def _print_gradient_flow(out: Console, flow: Any, cell: str) -> None:
    from rich.table import Table

    rows = [k for k in GRADIENT_FLOW_ROWS if k < flow.window]
    if flow.window - 1 not in rows:
        rows.append(flow.window - 1)
    positive = [v for v in flow.relative_grad_norm if v > 0]
    floor = 10.0 ** math.floor(math.log10(min(positive + [1e-3])))
    out.print()
    out.print(f"gradient flow ({cell}): ||d loss_t / d h_(t-k)|| / ||d loss_t / d h_t||, h = the top layer's "
              f"hidden state; geometric mean over {flow.windows} windows of {flow.window} characters", markup=False)
    table = Table(box=None, header_style="bold", pad_edge=False)
    table.add_column("distance k", justify="right")
    table.add_column("relative grad norm", justify="right")
    table.add_column(f"log scale, 1e{int(math.log10(floor))} .. 1", justify="left")
    for k in rows:
        v = flow.at(k)
        table.add_row(str(k), f"{v:.2e}", _log_bar(v, floor))
    out.print(table)
    out.print()
    sv = Table(box=None, header_style="bold", pad_edge=False, title_justify="left")
    sv.add_column("layer", justify="right")
    sv.add_column("σ_max(W_hh)", justify="right")
    gate_names = list(flow.w_hh_max_singular_value[0]["gates"]) if flow.w_hh_max_singular_value else []
    for g in gate_names:
        sv.add_column(f"{g} gate", justify="right")
    for layer in flow.w_hh_max_singular_value:
        sv.add_row(str(layer["layer"]), f"{layer['matrix']:.3f}", *[f"{layer['gates'][g]:.3f}" for g in gate_names])
    out.print("largest singular value of each layer's recurrent weights (per gate block for gated cells); "
              "in a vanilla RNN, below 1 means the gradient must vanish", markup=False)
    out.print(sv)


