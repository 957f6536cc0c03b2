"""The command line: parse options, call the library, render with rich.

The only module that imports typer or rich. torch is imported inside the
command bodies so that ``charnn --help`` is instant. Results go to stdout,
progress and status to stderr.
"""

from __future__ import annotations

import json
import math
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from rich.console import Console

from .config import ModelConfig, TrainConfig

app = typer.Typer(
    name="charnn",
    help="Train character-level recurrent language models on your own text, and generate from them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

err = Console(stderr=True, highlight=False, soft_wrap=True)


class Cell(str, Enum):
    lstm = "lstm"
    gru = "gru"
    rnn = "rnn"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"
    mps = "mps"


class Precision(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class Unknown(str, Enum):
    error = "error"
    skip = "skip"


def version_callback(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"charnn {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=version_callback, is_eager=True,
                                          help="Show the version and exit.")] = False,
) -> None:
    """charnn: a model of your text, on your laptop, in minutes."""


def run_command(body: Callable[[], Any]) -> Any:
    """Turn charnn's errors into ``Error: ...`` + exit 1, Ctrl-C into exit 130,
    and a closed pipe into a quiet exit. No traceback reaches the user."""
    from .errors import CharnnError

    try:
        return body()
    except CharnnError as e:
        from .train import TrainingInterrupted

        if isinstance(e, TrainingInterrupted):
            err.print(f"[yellow]Interrupted.[/] {e}", markup=True)
            raise typer.Exit(130)
        err.print(f"Error: {e}", markup=False)
        raise typer.Exit(1)
    except KeyboardInterrupt:
        err.print("Interrupted.", markup=False)
        raise typer.Exit(130)
    except BrokenPipeError:
        _quiet_broken_pipe()
        raise typer.Exit(0)
    except (typer.Exit, typer.Abort, SystemExit):
        raise
    except Exception as e:  # a bug: say so plainly; CHARNN_DEBUG=1 shows the traceback
        if os.environ.get("CHARNN_DEBUG"):
            raise
        err.print(f"Error: unexpected {type(e).__name__}: {e}. This is a bug in charnn; "
                  "rerun with CHARNN_DEBUG=1 for the traceback and report it.", markup=False)
        raise typer.Exit(1)


def _quiet_broken_pipe() -> None:
    # The reader went away (`charnn sample ... | head`): point stdout at
    # /dev/null so the interpreter's final flush does not complain.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass


def parse_time_limit(value: Optional[str]) -> Optional[str]:
    if value is None:
        return None
    if not value.strip():
        raise typer.BadParameter("is empty; write it like 30s, 5m, 2h or 1h30m")
    from .errors import ConfigError
    from .train import parse_duration

    try:
        parse_duration(value)
    except ConfigError as e:
        raise typer.BadParameter(str(e)) from None
    return value


def positive(value: float) -> float:
    if not (value > 0 and math.isfinite(value)):
        raise typer.BadParameter(f"must be a positive number, got {value}")
    return value


def unit_interval(value: float) -> float:
    if not 0 < value <= 1:
        raise typer.BadParameter(f"must be in (0, 1], got {value}")
    return value


# ---------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------

DEFAULT_TIME_LIMIT = "5m"
# The defaults live in one place, the config dataclasses (chosen by measurement:
# see the README); the options below show and use them.
_TD = TrainConfig()
_MD = ModelConfig()


@app.command()
def train(
    corpus: Annotated[Optional[list[Path]], typer.Argument(
        help="Text files or folders to train on. None: the built-in corpus (this Python's standard library source).",
        show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder. Default: checkpoints/<corpus name>/")] = None,
    cell: Annotated[Optional[Cell], typer.Option(help=f"Recurrent cell.  (default: {_MD.cell})", show_default=False)] = None,
    hidden_size: Annotated[Optional[int], typer.Option(min=1, help=f"Units per recurrent layer.  (default: {_MD.hidden_size})", show_default=False)] = None,
    num_layers: Annotated[Optional[int], typer.Option(min=1, help=f"Stacked recurrent layers.  (default: {_MD.num_layers})", show_default=False)] = None,
    embedding_dim: Annotated[Optional[int], typer.Option(min=1, help=f"Character embedding size.  (default: {_MD.embedding_dim})", show_default=False)] = None,
    dropout: Annotated[Optional[float], typer.Option(min=0.0, max=0.99, help=f"Dropout between layers and before the head.  (default: {_MD.dropout})", show_default=False)] = None,
    seq_len: Annotated[int, typer.Option(min=1, help="Characters per TBPTT chunk.")] = _TD.seq_len,
    batch_size: Annotated[int, typer.Option(min=1, help="Contiguous streams trained side by side.")] = _TD.batch_size,
    lr: Annotated[float, typer.Option(callback=positive, help="Peak learning rate (AdamW).")] = _TD.lr,
    weight_decay: Annotated[float, typer.Option(min=0.0, help="AdamW weight decay on weight matrices.")] = _TD.weight_decay,
    grad_clip: Annotated[float, typer.Option(min=0.0, help="Clip gradients to this global L2 norm (0 = off).")] = _TD.grad_clip,
    warmup_steps: Annotated[int, typer.Option(min=0, help="Linear warmup steps before cosine decay.")] = _TD.warmup_steps,
    max_steps: Annotated[int, typer.Option(min=0, help="Stop after this many steps (0 = no step budget).")] = 0,
    epochs: Annotated[float, typer.Option(min=0.0, help="Stop after this many passes over the text (0 = none).")] = 0.0,
    time_limit: Annotated[Optional[str], typer.Option(callback=parse_time_limit, help=f"Wall-clock budget: 30s, 5m, 2h. Default {DEFAULT_TIME_LIMIT} when no other budget is given.", show_default=False)] = None,
    eval_every: Annotated[int, typer.Option(min=1, help="Evaluate and save every N steps.")] = _TD.eval_every,
    log_every: Annotated[int, typer.Option(min=1, help="Progress / log row every N steps.")] = _TD.log_every,
    val_fraction: Annotated[float, typer.Option(min=0.0, max=0.9, help="Last part of the text held out for validation.")] = _TD.val_fraction,
    patience: Annotated[int, typer.Option(min=0, help="Stop after N evaluations without improvement (0 = off).")] = 0,
    keep: Annotated[int, typer.Option(min=0, help="Also keep the last N step-numbered checkpoints.")] = 0,
    sample_every: Annotated[int, typer.Option(min=0, help="Show a sample preview every N evaluations (0 = off).")] = _TD.sample_every,
    seed: Annotated[int, typer.Option(help="Random seed.")] = _TD.seed,
    device: Annotated[Device, typer.Option(help="Where to train.")] = Device.auto,
    precision: Annotated[Precision, typer.Option(help="Numeric precision (auto picks the fastest that trains as well).")] = Precision.auto,
    resume: Annotated[Optional[Path], typer.Option(help="Continue a run exactly from its checkpoint.")] = None,
    init_from: Annotated[Optional[Path], typer.Option(help="Start a new run from a checkpoint's weights and vocabulary.")] = None,
    extend_vocab: Annotated[bool, typer.Option(help="With --init-from: grow the vocabulary for new characters.")] = False,
    encoding: Annotated[str, typer.Option(help="Text encoding of the corpus files.")] = "utf-8",
) -> None:
    """Train a model on your text (or on the built-in corpus) and write best.pt and last.pt."""

    def body() -> None:
        from .config import TrainConfig
        from .train import Trainer, parse_duration

        budget_given = max_steps or epochs or time_limit
        limit = time_limit if budget_given else (None if resume else DEFAULT_TIME_LIMIT)
        cfg = TrainConfig(
            corpus=[os.path.abspath(p) for p in (corpus or [])], val_fraction=val_fraction, seq_len=seq_len,
            batch_size=batch_size, lr=lr, weight_decay=weight_decay, grad_clip=grad_clip,
            warmup_steps=warmup_steps, max_steps=max_steps, epochs=epochs,
            time_limit=parse_duration(limit), eval_every=eval_every, log_every=log_every,
            patience=patience, keep=keep, sample_every=sample_every, seed=seed, device=device.value,
            precision=precision.value, encoding=encoding, out=str(out) if out else "",
        )
        overrides = {"cell": cell.value if cell else None, "hidden_size": hidden_size,
                     "num_layers": num_layers, "embedding_dim": embedding_dim, "dropout": dropout}
        reporter = TrainReporter(sample_every=sample_every)
        trainer = Trainer(cfg, overrides, resume=resume, init_from=init_from, extend_vocab=extend_vocab,
                          callback=reporter)
        if not budget_given and not resume and trainer.dist.is_main:
            err.print(f"No budget given: training for {DEFAULT_TIME_LIMIT} (set --time-limit, "
                      "--max-steps or --epochs).", markup=False)
        try:
            with reporter:
                result = trainer.run()
        finally:
            trainer.close()
        if trainer.dist.is_main:
            best = result.best_path or result.last_path
            err.print(f"Done: {result.step} steps, best validation loss "
                      f"{_fmt_loss(result.best_val_loss)}. Checkpoints in {result.out_dir}/", markup=False)
            err.print(f"Next: charnn sample {best} -n 500", markup=False)

    run_command(body)


def _fmt_loss(loss: float) -> str:
    if loss is None or not math.isfinite(loss):
        return "n/a"
    return f"{loss:.4f} nats/char ({loss / math.log(2):.3f} bits/char)"


def _fmt_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class TrainReporter:
    """Renders the trainer's events: a rich progress bar on a terminal, plain
    log lines otherwise; everything on stderr."""

    def __init__(self, sample_every: int = 1, console: Console | None = None):
        self.console = console or err
        self.live = self.console.is_terminal
        self.sample_every = sample_every
        self.evals = 0
        self.last_log: dict[str, Any] = {}
        self.last_eval: dict[str, Any] = {}
        self.progress = None
        self.task = None

    def __enter__(self) -> "TrainReporter":
        if self.live:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("[bold]train[/]"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
                console=self.console, transient=False, refresh_per_second=4)
            self.progress.__enter__()
            self.task = self.progress.add_task("train", total=1.0, status="starting")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)
            self.progress = None

    def print(self, text: str, markup: bool = False) -> None:
        self.console.print(text, markup=markup, highlight=False)

    def __call__(self, event: dict[str, Any]) -> None:
        handler = getattr(self, "on_" + event["kind"], None)
        if handler:
            handler(event)

    def on_start(self, e: dict[str, Any]) -> None:
        mc, cfg = e["model_config"], e["config"]
        self.print(f"charnn: {mc['cell']} {mc['num_layers']}x{mc['hidden_size']} (embedding "
                   f"{mc['embedding_dim']}, dropout {mc['dropout']}), {e['parameters']:,} parameters, "
                   f"vocabulary {e['vocab_size']}")
        budget = [f"{cfg['max_steps']} steps" if cfg["max_steps"] else "",
                  f"{cfg['epochs']:g} epochs" if cfg["epochs"] else "",
                  _fmt_duration(cfg["time_limit"]) if cfg["time_limit"] else ""]
        self.print(f"data: {e['train_chars']:,} training + {e['val_chars']:,} validation characters; "
                   f"batch {cfg['batch_size']} x seq {cfg['seq_len']}; lr {cfg['lr']:g}; budget "
                   f"{', '.join(b for b in budget if b)}")
        self.print(f"device {e['device']}, precision {e['precision']}"
                   + (f", {e['world_size']} processes" if e["world_size"] > 1 else "")
                   + f"; writing to {e['out_dir']}/"
                   + (f"; resuming at step {e['resumed_at']}" if e["resumed_at"] else ""))

    def _status(self) -> str:
        lg, ev = self.last_log, self.last_eval
        parts = []
        if lg:
            parts.append(f"step {lg['step']} loss {lg['train_loss']:.3f}")
        if ev and ev.get("val_loss") is not None and math.isfinite(ev["val_loss"]):
            parts.append(f"val {ev['val_loss']:.3f} ({ev['val_bpc']:.2f} bpc)")
        if lg:
            parts.append(f"{lg['chars_per_sec']:,.0f} chars/s lr {lg['lr']:.2e} "
                         f"|g| {lg['grad_norm']:.2f} clipped {lg['clipped_share']:.0%}")
        return "  ".join(parts)

    def on_log(self, e: dict[str, Any]) -> None:
        self.last_log = e
        if self.progress is not None:
            self.progress.update(self.task, completed=min(1.0, e["progress"]), status=self._status())
        else:
            self.print(f"{_fmt_duration(e['elapsed'])} {e['progress']:6.1%}  " + self._status())

    def on_eval(self, e: dict[str, Any]) -> None:
        self.last_eval = e
        self.evals += 1
        if e.get("val_loss") is not None and math.isfinite(e["val_loss"]):
            mark = " (best)" if e["improved"] else ""
            self.print(f"step {e['step']}: validation loss {e['val_loss']:.4f} "
                       f"({e['val_bpc']:.3f} bits/char){mark}")
        if self.sample_every and self.evals % self.sample_every == 0:
            from .sample import sample_text

            text = sample_text(e["model"], e["tokenizer"], "", 200, temperature=0.8, seed=e["step"])
            self.print("  sample: " + text.replace("\n", "\n          ")[:600])

    def on_warning(self, e: dict[str, Any]) -> None:
        self.print(f"warning: {e['message']}")


# ---------------------------------------------------------------------------
# sample
# ---------------------------------------------------------------------------

SAMPLE_DIVIDER = "-" * 40  # printed after each of several samples
SMALL_BATCH = 16  # below this many samples a step is too little work to split across threads


class SamplePrecision(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"


def _temperature(value: float) -> float:
    if not (value >= 0 and math.isfinite(value)):
        raise typer.BadParameter(f"must be 0 (greedy) or a positive number, got {value}")
    return value


def _stop_string(value: Optional[str]) -> Optional[str]:
    if value == "":
        raise typer.BadParameter("must not be empty")
    return value


@app.command()
def sample(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint written by charnn train.", show_default=False)],
    prime: Annotated[Optional[str], typer.Option("--prime", "-p", help="Text to start from (printed first).", show_default=False)] = None,
    prime_file: Annotated[Optional[Path], typer.Option(help="Read the prime from this UTF-8 file instead.", show_default=False)] = None,
    length: Annotated[int, typer.Option("--length", "-n", min=0, help="Characters to generate after the prime (at most, with --stop).")] = 500,
    temperature: Annotated[float, typer.Option("--temperature", "-t", callback=_temperature, help="Sampling temperature; 0 = greedy (always the most likely character).")] = 0.8,
    top_k: Annotated[int, typer.Option(min=0, help="Sample only from the K most likely characters (0 = off, 1 = greedy).")] = 0,
    top_p: Annotated[float, typer.Option(callback=unit_interval, help="Nucleus sampling: smallest set of characters with this much probability, in (0, 1].")] = 1.0,
    num_samples: Annotated[int, typer.Option("--num-samples", "-m", min=1, help="Samples to generate, together as one batch.")] = 1,
    seed: Annotated[Optional[int], typer.Option(help="Random seed: the same seed, checkpoint and options give the same text. Sample i uses seed+i. Default: a random seed, shown on stderr.", show_default=False)] = None,
    stop: Annotated[Optional[str], typer.Option(callback=_stop_string, help="End each sample just before the first occurrence of this text after the prime (not printed).", show_default=False)] = None,
    unknown: Annotated[Unknown, typer.Option(help="Prime characters outside the model's vocabulary: error (name them) or skip (drop them).")] = Unknown.error,
    device: Annotated[Device, typer.Option(help="Where to run the model.")] = Device.cpu,
    precision: Annotated[SamplePrecision, typer.Option(help="Weights in fp32 (exact) or bf16; auto: bf16 only for 16+ sampled streams on a CPU with native bf16.")] = SamplePrecision.auto,
    as_json: Annotated[bool, typer.Option("--json", help='Print a JSON list of {"text", "prime", "seed"} objects instead of plain text.')] = False,
) -> None:
    """Generate text from a checkpoint. One sample streams to stdout as it is
    generated; several print one after another, each followed by a divider line."""
    if prime is not None and prime_file is not None:
        raise typer.BadParameter("give --prime or --prime-file, not both", param_hint="'--prime-file'")

    def body() -> None:
        import torch

        from .checkpoint import load_model
        from .errors import describe_char
        from .sample import check_prime, generate, generate_samples, random_seed, read_prime_file
        from .devices import resolve_device

        text = read_prime_file(prime_file) if prime_file is not None else (prime or "")
        model, tokenizer, _ = load_model(checkpoint, device=resolve_device(device.value))
        usable, dropped = check_prime(tokenizer, text, unknown.value)
        if dropped:
            err.print(f"Skipping {len(dropped)} prime character(s) not in the model's vocabulary: "
                      + ", ".join(describe_char(c) for c in dropped), markup=False)
        chosen = random_seed() if seed is None else seed
        options = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=chosen, stop=stop,
                       precision=precision.value)
        if num_samples < SMALL_BATCH:
            # One step of a few streams is microseconds of work: a second thread
            # only adds synchronisation (and on a busy machine, waiting for a core).
            torch.set_num_threads(1)
        out = sys.stdout
        if num_samples == 1 and not as_json:
            stream = generate(model, tokenizer, usable, length, **options)
            out.write(usable)
            out.flush()
            for ch in stream:
                out.write(ch)
                out.flush()
            out.write("\n")
        else:
            samples = generate_samples(model, tokenizer, usable, length, num_samples=num_samples, **options)
            if as_json:
                out.write(json.dumps([s.to_dict() for s in samples], ensure_ascii=False) + "\n")
            else:
                for s in samples:
                    out.write(s.text + "\n" + SAMPLE_DIVIDER + "\n")
        out.flush()
        if seed is None:
            err.print(f"seed {chosen} (pass --seed {chosen} to repeat)", markup=False)

    run_command(body)


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

        from .checkpoint import load_model
        from .evaluate import evaluate_texts, load_eval_texts

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
            from .evaluate import gradient_flow as measure

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
    from .evaluate import surprisal

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

    from .report import BANDS, LN2, band

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
    from .report import surprisal_page, surprisal_section, write_text

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


# ---------------------------------------------------------------------------
# info
# ---------------------------------------------------------------------------

@app.command()
def info(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint written by charnn train.", show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write the train/validation loss curves as a PNG (needs matplotlib: pip install 'charnn[plot]').", show_default=False)] = None,
) -> None:
    """What a checkpoint holds: model, vocabulary, training state and options, and the loss curve."""

    def body() -> None:
        from .checkpoint import load
        from .report import escape_vocab, loss_curves, plot_png, text_chart

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
            sys.stdout.write(json.dumps(data, default=str) + "\n")
            return
        out = Console(highlight=False, soft_wrap=True)
        lines = [f"checkpoint  {checkpoint} (format {data['format_version']}, charnn {data['charnn_version']}, {data['created']})",
                 f"model       {mc.cell} {mc.num_layers}x{mc.hidden_size}, embedding {mc.embedding_dim}, dropout {mc.dropout}, {params:,} parameters",
                 f"vocabulary  {mc.vocab_size} characters: {escape_vocab(ckpt.tokenizer.chars)}"]
        if ts:
            # The metrics rows carry the fractional epoch; train_state counts whole ones.
            epoch = next((r["epoch"] for r in reversed(ckpt.metrics) if isinstance(r.get("epoch"), (int, float))),
                         ts.get("epoch") or 0)
            lines.append(f"training    step {ts.get('step', 0):,}, epoch {float(epoch):.2f}, "
                         f"{ts.get('chars_seen', 0):,} characters seen, {_fmt_duration(ts.get('elapsed') or 0)}, "
                         f"best val loss {_fmt_loss(best) if isinstance(best, (int, float)) else 'n/a'}")
            extra = [f"{k} {ts[k]}" for k in ("device", "precision") if ts.get(k)]
            extra += [f"{ts[k]:,} {label}" for k, label in (("clipped_steps", "clipped steps"),
                                                            ("nonfinite_skipped", "non-finite steps skipped"),
                                                            ("restores", "restores")) if ts.get(k)]
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
                out.print(f"  {k:<16} {shown}", markup=False)
        chart = text_chart(train_curve, val_curve)
        if chart:
            out.print("loss curve", markup=False)
            out.print("\n".join("  " + line for line in chart), markup=False)
        else:
            out.print("loss curve  none recorded", markup=False)

    run_command(body)
