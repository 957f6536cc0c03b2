"""charnn eval: scores, the surprisal view and page, gradient flow."""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Iterator, Optional

import typer
from rich.console import Console

from .arguments import CHECKPOINT_HELP, named_checkpoint
from .common import (DEVICE_HELP, escape_text, THREADS_HELP, Unknown, _quiet_rank, app, at_least, between, dumps, err,
                     out_console, parse_device, plural, run_command, safe_display, stdout)

# ---------------------------------------------------------------------------
# eval
# ---------------------------------------------------------------------------

SHOW_DEFAULT_CHARS = 2000  # --show: a screenful or two
HTML_DEFAULT_CHARS = 20000  # --html: one element per character; a browser copes with this many
GRADIENT_FLOW_ROWS = (0, 1, 2, 3, 5, 10, 15, 20, 30, 40, 50, 60, 70, 80, 90, 99)


@app.command("eval")
def evaluate(
    checkpoint: Annotated[Path, typer.Argument(metavar="CHECKPOINT", show_default=False, help=CHECKPOINT_HELP,
                                               callback=named_checkpoint)],
    files: Annotated[Optional[list[Path]], typer.Argument(
        metavar="FILE", show_default=False,
        help="Text files to score, each on its own.  [default: the validation split of the "
             "checkpoint's corpus]")] = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print one JSON object: totals at the top level, one entry per file under "
                       "\"files\".")] = False,
    encoding: Annotated[str, typer.Option(metavar="NAME", help="Text encoding of the files.")] = "utf-8",
    unknown: Annotated[Unknown, typer.Option(
        metavar="[error|skip]",
        help="Characters outside the model's vocabulary: error (name them) or skip (drop and "
             "count them).")] = Unknown.error,
    show: Annotated[bool, typer.Option(
        "--show", help="Print the text coloured by each character's surprisal.")] = False,
    html: Annotated[Optional[Path], typer.Option(
        "--html", metavar="FILE", show_default=False,
        help="Write a standalone HTML page: every character coloured by its loss; hover for its "
             "probability and the 5 likeliest alternatives.")] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Let --html replace an existing file that is not an HTML page, or one this "
                            "command reads (an earlier page is replaced without it).")] = False,
    max_chars: Annotated[Optional[int], typer.Option(
        metavar="N", callback=at_least(2), show_default=False,
        help=f"Characters shown by --show and --html, from the start of the text.  [default: "
             f"{SHOW_DEFAULT_CHARS:,} for --show, {HTML_DEFAULT_CHARS:,} for --html]")] = None,
    gradient_flow: Annotated[bool, typer.Option(
        "--gradient-flow", help="Measure how far back the loss's gradient reaches (vanishing "
                                "gradients), and W_hh's largest singular values.")] = False,
    window: Annotated[int, typer.Option(
        metavar="N", callback=between(2, 2000),
        help="--gradient-flow: window length in characters (largest distance + 1), 2 to "
             "2,000.")] = 100,
    windows: Annotated[int, typer.Option(
        metavar="N", callback=between(1, 1024),
        help="--gradient-flow: windows averaged over, 1 to 1,024.")] = 32,
    device: Annotated[str, typer.Option(metavar="DEVICE", callback=parse_device, help=DEVICE_HELP)] = "cpu",
    threads: Annotated[Optional[int], typer.Option(
        metavar="N", callback=at_least(1), show_default=False, help=THREADS_HELP)] = None,
) -> None:
    """Score a model on text: loss, bits per character, perplexity.

    Each file is scored on its own, then in total; with no files, the part of
    the training corpus the model held out. Optionally shows the surprisal of
    every character (--show, --html) and the gradient flow."""
    if show and as_json:
        raise typer.BadParameter("--show and --json both write to stdout; use one of them (or --html PAGE with --json)",
                                 param_hint="--show")

    def body() -> None:
        import numpy as np

        from ..storage.checkpoint import load_model
        from ..model.devices import resolve_device, set_threads
        from ..analysis.evaluate import evaluate_texts, load_eval_texts

        from ..storage.outputs import check_output, corpus_inputs

        if html is not None:
            check_output(html, "html", "--html", inputs=[checkpoint, *(files or [])], overwrite=overwrite)
        set_threads(threads)
        model, tokenizer, ckpt = load_model(checkpoint, device=resolve_device(device))
        if html is not None and not files:  # the validation split is read from the training corpus
            check_output(html, "html", "--html", inputs=corpus_inputs(ckpt.train_config), overwrite=overwrite)
        with _working(f"reading {plural(len(files), 'file')}" if files else "reading the training corpus"):
            texts = load_eval_texts(tokenizer, ckpt, [str(f) for f in files or []], encoding=encoding,
                                    unknown=unknown.value)
        # The first character is only context, so the split's length less one
        # is what the table below counts as scored.
        scored = describe_split(ckpt.train_config, max(0, len(texts[0].ids) - 1)) if not files else None
        with _working(f"scoring {scored or plural(sum(len(t.ids) for t in texts), 'character')}"):
            report = evaluate_texts(model, texts)
        data: dict[str, Any] = report.to_dict()
        if scored:
            data["scored"] = scored
        if html is not None:
            with _working("writing the surprisal page"):
                path, shown = _write_surprisal_page(model, tokenizer, texts, report, html,
                                                    max_chars or HTML_DEFAULT_CHARS, str(checkpoint))
            err.print(f"Wrote {safe_display(path, None)} ({plural(shown, 'character')}).", markup=False)
            data["html"] = str(path)
        flow = None
        if gradient_flow:
            from ..analysis.evaluate import gradient_flow as measure

            ids = np.concatenate([np.asarray(t.ids, dtype=np.int64) for t in texts])
            with _working("measuring the gradient flow"):
                flow = measure(model.to("cpu"), ids, window=window, windows=windows)
            data["gradient_flow"] = flow.to_dict()
        if as_json:
            stdout.write(dumps(data) + "\n")
            return
        out = out_console()
        if show:
            _print_surprisal(out, model, tokenizer, texts, max_chars or SHOW_DEFAULT_CHARS)
        _print_eval(out, report, scored)
        if flow is not None:
            _print_gradient_flow(out, flow, ckpt.model_config.cell)

    run_command(body)


def describe_split(train_config: dict, chars: int) -> str:
    """What ``eval`` scores without files: "validation split of stdlib
    (last 10%, 40,000 characters)", ``chars`` being the characters scored."""
    cfg = train_config if isinstance(train_config, dict) else {}
    name = cfg.get("corpus_name")
    paths = cfg.get("corpus") or []
    if not isinstance(name, str) or not name:
        if isinstance(paths, list) and paths:
            name = ", ".join(Path(str(p)).name for p in paths[:3]) + (", ..." if len(paths) > 3 else "")
        else:
            name = "the built-in corpus"
    try:
        share = f"last {float(cfg.get('val_fraction', 0.1)):.0%}, "
    except (TypeError, ValueError):
        share = ""
    return f"validation split of {escape_text(name)} ({share}{plural(chars, 'character')})"


@contextmanager
def _working(what: str) -> Iterator[None]:
    """A transient spinner on stderr while something slow runs (a terminal
    only: piped stderr stays clean)."""
    if not err.is_terminal or _quiet_rank():
        yield
        return
    with err.status(what + "...", spinner="dots"):
        yield


def _print_eval(out: Console, report: Any, scored: Optional[str] = None) -> None:
    if scored or len(report.files) == 1:
        out.print(f"scored      {escape_text(scored or report.files[0].name)}", markup=False)
    if len(report.files) > 1:
        # Plain columns (not a rich table): file names are never cut short.
        name_w = max(4, *(len(escape_text(f.name)) for f in report.files))
        out.print(f"{'file':<{name_w}}  {'characters':>10}  {'loss':>7}  {'bits/char':>9}  {'perplexity':>10}  "
                  f"{'unknown':>7}", markup=False)
        for f in report.files:
            d = f.to_dict()
            out.print(f"{escape_text(f.name):<{name_w}}  {d['chars']:>10,}  {d['loss']:>7.4f}  {d['bpc']:>9.4f}  "
                      f"{d['perplexity']:>10.3f}  {f.unknown:>7,}", markup=False)
        out.print(f"total ({plural(len(report.files), 'file')})", markup=False)
    d = report.total.to_dict()
    out.print(f"characters  {d['chars']:,}\nloss        {d['loss']:.4f} nats/char\n"
              f"bits/char   {d['bpc']:.4f}\nperplexity  {d['perplexity']:.3f}", markup=False)
    if report.unknown:
        out.print(f"unknown     {plural(report.unknown, 'character')} outside the vocabulary (skipped)", markup=False)


def _surprisal_of(model: Any, texts: list, limit: int) -> list[tuple[Any, Any, bool]]:
    """(text, Surprisal of its first part, cut?) for as many texts as ``limit``
    characters reach."""
    from ..analysis.evaluate import surprisal

    out, left = [], limit
    for t in texts:
        if left < 2:
            break
        ids = t.ids[:left]
        out.append((t, surprisal(model, ids), len(ids) < len(t.ids)))
        left -= len(ids)
    return out


def band_styles(color_system: Optional[str]) -> list[str]:
    """One rich style per surprisal band, distinct on this terminal: the
    page's colours at 256 and true colour, named ANSI colours at 16."""
    from ..analysis.report import BANDS, BANDS_16

    if color_system in ("standard", "windows"):
        return [f"black on {c}" for c in BANDS_16]
    return [f"black on {colour}" for _, colour, _ in BANDS]


def surprisal_legend(styles: list[str]) -> Any:
    from rich.text import Text

    from ..analysis.report import BANDS

    legend = Text("surprisal: ")
    for style, (_, _, label) in zip(styles, BANDS):
        legend.append(f" {label} ", style=style)
        legend.append(" ")
    return legend


def surprisal_line(chars: str, losses: Any, styles: list[str]) -> Any:
    """The text with each character coloured by its band; the first character
    (only context, not scored) dim. Built from an unstyled Text: a style given
    to ``Text(...)`` would be the base of every span appended after it."""
    from rich.text import Text

    from ..analysis.report import LN2, band

    line = Text()
    # The text's own control characters (ESC, bidi overrides) are shown as
    # escapes: they would drive the terminal, not appear in it.
    line.append(escape_text(chars[:1]) if chars[:1] != "\n" else "\n", style="dim")
    for ch, loss in zip(chars[1:], losses):
        line.append(ch if ch == "\n" else escape_text(ch), style=styles[band(float(loss) / LN2)] if ch != "\n" else None)
    return line


def _print_surprisal(out: Console, model: Any, tokenizer: Any, texts: list, limit: int) -> None:
    from rich.text import Text

    styles = band_styles(out.color_system)
    out.print(surprisal_legend(styles))
    for t, s, cut in _surprisal_of(model, texts, limit):
        out.print(Text(f"── {escape_text(t.name)}" + (f" (first {plural(len(s.ids), 'character')})" if cut else ""), style="bold"))
        out.print(surprisal_line(tokenizer.decode(s.ids), s.loss, styles))
    out.print()


def _write_surprisal_page(model: Any, tokenizer: Any, texts: list, report: Any, path: Path, limit: int,
                          name: str) -> tuple[Path, int]:
    from ..analysis.report import surprisal_page, surprisal_section, write_text

    sections, shown = [], 0
    for t, s, cut in _surprisal_of(model, texts, limit):
        chars = tokenizer.decode(s.ids)
        top = [[(tokenizer.chars[int(i)], float(p)) for i, p in zip(ti, tp)]
               for ti, tp in zip(s.top_ids, s.top_probs)]
        note = (f"the first {len(s.ids):,} of {plural(len(t.ids), 'character')}" if cut else "") + \
            (f"; {plural(t.unknown, 'character')} outside the vocabulary "
             f"{'was' if t.unknown == 1 else 'were'} skipped" if t.unknown else "")
        sections.append(surprisal_section(t.name, chars, s.loss.tolist(), s.prob.tolist(), top, note.lstrip("; ")))
        shown += len(s.ids)
    d = report.total.to_dict()
    summary = (f"{plural(d['chars'], 'character')} scored: loss {d['loss']:.4f} nats/char, {d['bpc']:.4f} bits/char, "
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
              f"hidden state; geometric mean over {plural(flow.windows, 'window')} of "
              f"{plural(flow.window, 'character')}", markup=False, soft_wrap=False)
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
              "in a vanilla RNN, below 1 means the gradient must vanish", markup=False, soft_wrap=False)
    out.print(sv)


