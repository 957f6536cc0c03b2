"""charnn inspect: the units that track the text, gate saturation, the page."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, Optional

import typer
from rich.console import Console

from .arguments import CHECKPOINT_HELP, named_checkpoint
from .common import THREADS_HELP, Unknown, app, at_least, between, err, run_command, safe_display

MAX_CHARS_DEFAULT = 100_000  # characters inspected (correlations, saturation)
HTML_CHARS_DEFAULT = 2_000  # characters shown on the --html page (its size grows with them)
PER_LINE = 4  # units per terminal line: 13 + 2 + 4 x 13 ("L1 c511 +0.87") + 3 x 2 = 73 columns


def _check_features(values: Optional[list[str]]) -> Optional[list[str]]:
    """--feature NAME=REGEX, checked before the model loads (bad ones exit 2)."""
    if not values:
        return values
    from ..errors import ConfigError
    from ..analysis.features import parse_feature

    seen: set[str] = set()
    for v in values:
        try:
            name = parse_feature(v).name
        except ConfigError as e:
            raise typer.BadParameter(str(e)) from None
        if name in seen:
            raise typer.BadParameter(f"feature {name!r} is given twice; give each feature once")
        seen.add(name)
    return values


@app.command("inspect")
def inspect_command(
    checkpoint: Annotated[Path, typer.Argument(metavar="CHECKPOINT", show_default=False, help=CHECKPOINT_HELP,
                                               callback=named_checkpoint)],
    files: Annotated[Optional[list[Path]], typer.Argument(
        metavar="FILE", show_default=False,
        help="Text files to run the model over, read one after another.  [default: the validation "
             "split of the checkpoint's corpus]")] = None,
    max_chars: Annotated[int, typer.Option(
        metavar="N", callback=at_least(2),
        help="Characters inspected, from the start of the text.")] = MAX_CHARS_DEFAULT,
    feature: Annotated[Optional[list[str]], typer.Option(
        "--feature", metavar="NAME=REGEX", callback=_check_features, show_default=False,
        help="Your own feature: 1 on the characters inside a match of REGEX (^ and $ match at line "
             "breaks). Repeatable.")] = None,
    top: Annotated[int, typer.Option(
        metavar="N", callback=between(1, 100),
        help="Units listed per feature, 1 to 100 (each unit once, with h or c, whichever tracks it "
             "better).")] = 4,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print one JSON object: chars, features with their top units, gate saturation.")] = False,
    plot: Annotated[Optional[Path], typer.Option(
        "--plot", metavar="FILE", show_default=False,
        help="Write the gate saturation scatter as a PNG image (needs matplotlib: "
             "pip install 'charnn[plot]').")] = None,
    html: Annotated[Optional[Path], typer.Option(
        "--html", metavar="FILE", show_default=False,
        help="Write a standalone HTML page: the text coloured by any unit's activation, the top units "
             "per feature, the saturation scatter.")] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite",
        help="Let --html and --plot replace an existing file of another kind (not an HTML page, not a PNG "
             "image) or one this command reads (an earlier page or plot is replaced without it).")] = False,
    html_chars: Annotated[int, typer.Option(
        metavar="N", callback=at_least(1),
        help="Characters shown on the --html page, from the start (its size grows with them: about "
             "10 MB for 2,000 characters of a 2x320 LSTM).")] = HTML_CHARS_DEFAULT,
    threads: Annotated[Optional[int], typer.Option(
        metavar="N", callback=at_least(1), show_default=False, help=THREADS_HELP)] = None,
    encoding: Annotated[str, typer.Option(metavar="NAME", help="Text encoding of the files.")] = "utf-8",
    unknown: Annotated[Unknown, typer.Option(
        metavar="[error|skip]",
        help="Characters outside the model's vocabulary: error (name them) or skip (drop "
             "them).")] = Unknown.error,
) -> None:
    """What the model's units do: for each feature of the text (position in the line, inside a
    string, bracket depth, indent, inside a comment, inside a word, your own regexes) the units
    whose h or c follows it most closely (Pearson r), and how often each gate is saturated."""

    def run() -> None:
        import numpy as np

        from ..storage.checkpoint import load_model
        from ..model.devices import set_threads
        from ..analysis.evaluate import load_eval_texts
        from ..errors import CharnnError
        from ..analysis.inspect_page import inspect_page, pyplot, saturation_png
        from ..analysis.inspection import inspect
        from ..analysis.report import write_text

        from ..storage.outputs import check_output, corpus_inputs

        inputs = [checkpoint, *(files or [])]
        if plot is not None:
            check_output(plot, "png", "--plot", inputs=inputs, overwrite=overwrite)
        if html is not None:
            check_output(html, "html", "--html", inputs=inputs, overwrite=overwrite)
        if plot is not None and html is not None and plot.resolve() == html.resolve():
            raise CharnnError("--plot and --html name the same file; give each its own")
        n_threads = set_threads(threads)
        model, tokenizer, ckpt = load_model(checkpoint)
        if not files:  # the validation split is read from the training corpus
            for kind, given, option in (("png", plot, "--plot"), ("html", html, "--html")):
                if given is not None:
                    check_output(given, kind, option, inputs=corpus_inputs(ckpt.train_config), overwrite=overwrite)
        if plot is not None:
            if ckpt.model_config.cell == "rnn":
                raise CharnnError("a vanilla RNN has no gates, so there is no saturation plot; "
                                  "--plot applies to LSTM and GRU models")
            pyplot()  # fail now, not after the run, when matplotlib is missing
        texts = load_eval_texts(tokenizer, ckpt, [str(f) for f in files or []], encoding=encoding,
                                unknown=unknown.value, max_chars=max_chars)
        ids = np.concatenate([np.asarray(t.ids, dtype=np.int64) for t in texts])[:max_chars]
        source = ", ".join(t.name for t in texts)
        mc = ckpt.model_config
        err.print(f"Inspecting {len(ids):,} characters of {safe_display(source, None)} ({mc.cell} {mc.num_layers}x{mc.hidden_size}, "
                  f"{n_threads} thread{'s' if n_threads > 1 else ''})...", markup=False)
        with _progress() as update:
            result = inspect(model, ids, tokenizer, features=[*_builtins(), *(feature or [])], max_chars=max_chars,
                             keep_chars=html_chars if html is not None else 0, progress=update)
        err.print(f"Done in {result.seconds:.1f} s ({result.chars / max(result.seconds, 1e-9):,.0f} characters/s).",
                  markup=False)
        data: dict[str, Any] = result.to_dict(top=top)
        if plot is not None:
            saturation_png(result, plot, title=f"{checkpoint}: gate saturation ({result.chars:,} characters)")
            err.print(f"Wrote {safe_display(plot, None)}.", markup=False)
            data["plot"] = str(plot)
        if html is not None:
            page = inspect_page(result, title=f"charnn inspect: {checkpoint}", top=top, chars=html_chars)
            path = write_text(html, page)
            err.print(f"Wrote {safe_display(path, None)} ({min(html_chars, result.chars):,} characters shown, "
                      f"{path.stat().st_size / 1e6:.1f} MB).", markup=False)
            data["html"] = str(path)
        if as_json:
            sys.stdout.write(json.dumps(data) + "\n")
            return
        out = Console(highlight=False, soft_wrap=True)
        _print_features(out, result, top)
        _print_saturation(out, result)

    run_command(run)


@contextmanager
def _progress(console: Console | None = None) -> Iterator[Callable[[int, int], None]]:
    """A transient progress bar on stderr (shown only on a terminal)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("inspecting"), BarColumn(), TextColumn("{task.fields[count]}"),
                  TimeRemainingColumn(), console=console or err, transient=True,
                  disable=not (console or err).is_terminal) as bar:
        task = bar.add_task("inspect", total=None, count="")  # the total is known at the first update

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total, count=f"{done:,}/{total:,} characters")

        yield update


def _builtins() -> list[str]:
    from ..analysis.features import BUILTIN_FEATURES

    return list(BUILTIN_FEATURES)


def _print_features(out: Console, result: Any, top: int) -> None:
    c = ", c its cell" if result.cell == "lstm" else ""
    out.print(f"Units that track the text: Pearson r with each feature over {result.chars:,} characters\n"
              f"(L1 h42: layer 1, unit 42, h its hidden state{c}); largest |r| first.", markup=False)
    name_w = max(13, *(len(f.name) for f in result.features))
    unit_w = len(f"L{result.num_layers - 1} c{result.hidden_size - 1}")
    for f in result.features:
        if f.constant:
            out.print(f"{f.name:<{name_w}}  constant over this text: r undefined", markup=False)
            continue
        cells = [f"{'L%d %s%d' % (u.layer, u.state, u.unit):<{unit_w}} {u.r:+.2f}" for u in f.top(top)]
        for k in range(0, len(cells), PER_LINE):
            label = f.name if k == 0 else ""
            out.print(f"{label:<{name_w}}  " + "  ".join(cells[k : k + PER_LINE]), markup=False)


def _print_saturation(out: Console, result: Any) -> None:
    out.print()
    if not result.saturation:
        out.print("gate saturation: a vanilla RNN has no gates", markup=False)
        return
    gates = list(result.gates)
    tanh = [g for g in gates if g in ("g", "n")]
    out.print("Gate saturation: share of (unit, character) pairs with the gate < 0.1 (left)\n"
              "and > 0.9 (right)" + (f"; {' and '.join(tanh)} (tanh-valued): < -0.8 and > 0.8." if tanh else "."),
              markup=False)
    out.print("layer  " + "".join(f"{g + ' left/right':>16}" for g in gates), markup=False)
    for layer in range(result.num_layers):
        row = {s.gate: s for s in result.saturation if s.layer == layer}
        line = f"{layer:>5}  " + "".join(f"{row[g].left:>9.3f}/{row[g].right:<6.3f}" for g in gates)
        out.print(line.rstrip(), markup=False)
