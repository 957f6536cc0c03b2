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


@app.command()
def train(
    corpus: Annotated[Optional[list[Path]], typer.Argument(
        help="Text files or folders to train on. None: the built-in corpus (this Python's standard library source).",
        show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder. Default: checkpoints/<corpus name>/")] = None,
    cell: Annotated[Optional[Cell], typer.Option(help="Recurrent cell.  [default: lstm]", show_default=False)] = None,
    hidden_size: Annotated[Optional[int], typer.Option(min=1, help="Units per recurrent layer.  [default: 512]", show_default=False)] = None,
    num_layers: Annotated[Optional[int], typer.Option(min=1, help="Stacked recurrent layers.  [default: 2]", show_default=False)] = None,
    embedding_dim: Annotated[Optional[int], typer.Option(min=1, help="Character embedding size.  [default: 64]", show_default=False)] = None,
    dropout: Annotated[Optional[float], typer.Option(min=0.0, max=0.99, help="Dropout between layers and before the head.  [default: 0.1]", show_default=False)] = None,
    seq_len: Annotated[int, typer.Option(min=1, help="Characters per TBPTT chunk.")] = 128,
    batch_size: Annotated[int, typer.Option(min=1, help="Contiguous streams trained side by side.")] = 32,
    lr: Annotated[float, typer.Option(callback=positive, help="Peak learning rate (AdamW).")] = 2e-3,
    weight_decay: Annotated[float, typer.Option(min=0.0, help="AdamW weight decay on weight matrices.")] = 0.01,
    grad_clip: Annotated[float, typer.Option(min=0.0, help="Clip gradients to this global L2 norm (0 = off).")] = 1.0,
    warmup_steps: Annotated[int, typer.Option(min=0, help="Linear warmup steps before cosine decay.")] = 100,
    max_steps: Annotated[int, typer.Option(min=0, help="Stop after this many steps (0 = no step budget).")] = 0,
    epochs: Annotated[float, typer.Option(min=0.0, help="Stop after this many passes over the text (0 = none).")] = 0.0,
    time_limit: Annotated[Optional[str], typer.Option(callback=parse_time_limit, help=f"Wall-clock budget: 30s, 5m, 2h. Default {DEFAULT_TIME_LIMIT} when no other budget is given.", show_default=False)] = None,
    eval_every: Annotated[int, typer.Option(min=1, help="Evaluate and save every N steps.")] = 500,
    log_every: Annotated[int, typer.Option(min=1, help="Progress / log row every N steps.")] = 10,
    val_fraction: Annotated[float, typer.Option(min=0.0, max=0.9, help="Last part of the text held out for validation.")] = 0.1,
    patience: Annotated[int, typer.Option(min=0, help="Stop after N evaluations without improvement (0 = off).")] = 0,
    keep: Annotated[int, typer.Option(min=0, help="Also keep the last N step-numbered checkpoints.")] = 0,
    sample_every: Annotated[int, typer.Option(min=0, help="Show a sample preview every N evaluations (0 = off).")] = 1,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 1337,
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
            corpus=[str(p) for p in (corpus or [])], val_fraction=val_fraction, seq_len=seq_len,
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
        if not budget_given and not resume:
            err.print(f"No budget given: training for {DEFAULT_TIME_LIMIT} (set --time-limit, "
                      "--max-steps or --epochs).", markup=False)
        with reporter:
            result = trainer.run()
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

@app.command()
def sample(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint written by charnn train.", show_default=False)],
    prime: Annotated[str, typer.Option("--prime", "-p", help="Text to start from (printed first).")] = "",
    length: Annotated[int, typer.Option("--length", "-n", min=0, help="Characters to generate after the prime.")] = 500,
    temperature: Annotated[float, typer.Option("--temperature", "-t", min=0.0, help="Sampling temperature; 0 = greedy.")] = 0.8,
    top_k: Annotated[int, typer.Option(min=0, help="Sample only from the K most likely characters (0 = off).")] = 0,
    top_p: Annotated[float, typer.Option(callback=unit_interval, help="Nucleus sampling: smallest set of characters with this much probability, in (0, 1].")] = 1.0,
    seed: Annotated[Optional[int], typer.Option(help="Random seed; the same seed gives the same text.")] = None,
) -> None:
    """Generate text from a checkpoint, streaming it to stdout."""

    def body() -> None:
        from .checkpoint import load_model
        from .sample import generate

        model, tokenizer, _ = load_model(checkpoint)
        stream = generate(model, tokenizer, prime, length, temperature=temperature, top_k=top_k,
                          top_p=top_p, seed=seed)
        first = next(stream, "")  # validates the prime before anything is printed
        out = sys.stdout
        out.write(prime + first)
        out.flush()
        for ch in stream:
            out.write(ch)
            out.flush()
        out.write("\n")
        out.flush()

    run_command(body)


# ---------------------------------------------------------------------------
# eval
# ---------------------------------------------------------------------------

@app.command("eval")
def evaluate(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint written by charnn train.", show_default=False)],
    files: Annotated[Optional[list[Path]], typer.Argument(help="Text files to score. None: the checkpoint's own validation split.", show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    encoding: Annotated[str, typer.Option(help="Text encoding of the files.")] = "utf-8",
) -> None:
    """Loss, bits per character and perplexity of a model on text."""

    def body() -> None:
        from .checkpoint import load_model
        from .evaluate import evaluate_checkpoint_text

        model, tokenizer, ckpt = load_model(checkpoint)
        result = evaluate_checkpoint_text(model, tokenizer, ckpt, [str(f) for f in files or []], encoding=encoding)
        if as_json:
            sys.stdout.write(json.dumps(result.to_dict()) + "\n")
        else:
            d = result.to_dict()
            sys.stdout.write(f"characters  {d['chars']:,}\nloss        {d['loss']:.4f} nats/char\n"
                             f"bits/char   {d['bpc']:.4f}\nperplexity  {d['perplexity']:.3f}\n")

    run_command(body)


# ---------------------------------------------------------------------------
# info
# ---------------------------------------------------------------------------

@app.command()
def info(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint written by charnn train.", show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """What a checkpoint holds: model, vocabulary, training state and options."""

    def body() -> None:
        from .checkpoint import load

        ckpt = load(checkpoint)
        mc = ckpt.model_config
        ts = {k: v for k, v in ckpt.train_state.items()
              if isinstance(v, (int, float, str)) or v is None}
        params = sum(t.numel() for t in ckpt.data["model_state"].values())
        data = {"path": str(checkpoint), "format_version": ckpt.data["format_version"],
                "charnn_version": ckpt.data.get("charnn_version"), "created": ckpt.data.get("created"),
                "model_config": mc.to_dict(), "parameters": params, "vocab": ckpt.tokenizer.to_list(),
                "train_state": ts, "train_config": ckpt.train_config}
        if as_json:
            sys.stdout.write(json.dumps(data) + "\n")
            return
        vocab = "".join(json.dumps(c)[1:-1] for c in ckpt.tokenizer.chars)
        lines = [f"checkpoint  {checkpoint} (format {data['format_version']}, charnn {data['charnn_version']}, {data['created']})",
                 f"model       {mc.cell} {mc.num_layers}x{mc.hidden_size}, embedding {mc.embedding_dim}, dropout {mc.dropout}, {params:,} parameters",
                 f"vocabulary  {mc.vocab_size} characters: {vocab}"]
        if ts:
            best = ts.get("best_val")
            lines.append(f"training    step {ts.get('step')}, {ts.get('chars_seen', 0):,} characters seen, "
                         f"{_fmt_duration(ts.get('elapsed', 0))}, best val loss {_fmt_loss(best) if best is not None else 'n/a'}")
        sys.stdout.write("\n".join(lines) + "\n")

    run_command(body)
