"""charnn train: the options the user gave -> Trainer, rendered by TrainReporter.

Every option defaults to None, meaning "not given": a new run fills it from
TrainConfig/ModelConfig (the one place defaults live), a resumed run from the
run's own checkpoint. So ``charnn train --resume DIR/last.pt`` continues the
run as it was, whatever today's defaults are.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ..model.config import ModelConfig
from ..training.config import TrainConfig
from ..errors import ConfigError, safe_display, shell_arg
from ..training.schedule import AUTO_EVAL_CHARS, AUTO_EVALS, AUTO_WARMUP_SHARE, AUTO_WARMUP_STEPS, MAX_EVAL_EVERY
from .common import (DEVICE_HELP, THREADS_HELP, Cell, Order, Precision, Size, app, at_least, between, fmt_loss,
                     fmt_span, parse_device, parse_time_limit, plural, positive, run_command, say)
from .progress import TrainReporter

DEFAULT_TIME_LIMIT = "5m"
_TD = TrainConfig()
_MD = ModelConfig()


def _auto(value: Any) -> str:
    return f"chosen by --size auto; {value} with --size fixed"


def _d(value: Any) -> str:
    """The ``[default: X]`` suffix, written out because these options default
    to None ("not given"), so click cannot show the real default itself."""
    return f"  [default: {value}]"


Int = Optional[int]
Float = Optional[float]


@app.command()
def train(
    corpus: Annotated[Optional[list[Path]], typer.Argument(
        metavar="CORPUS", show_default=False,
        help="Text files or folders to train on.  [default: the built-in corpus, this Python's "
             "standard library source]")] = None,
    out: Annotated[Optional[Path], typer.Option(
        "--out", "-o", metavar="DIR", show_default=False,
        help="Output folder. A new run never replaces another run's files: the default folder moves on "
             "to NAME-2/, NAME-3/...; a folder you name that holds a run is refused unless --overwrite."
             + _d("checkpoints/<corpus name>/"))] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Start a new run in an --out folder that holds a run, replacing its "
                            "checkpoints and metrics when the new run writes its first; one that fails "
                            "before then leaves them.")] = False,
    time_limit: Annotated[Optional[str], typer.Option(
        metavar="DURATION", callback=parse_time_limit, show_default=False,
        help="Wall-clock budget for training: 90 (seconds), 30s, 5m, 2h or 1h30m."
             + _d(f"{DEFAULT_TIME_LIMIT} when no budget is given"))] = None,
    max_steps: Annotated[Int, typer.Option(
        metavar="N", callback=at_least(0), show_default=False,
        help="Stop after N optimizer steps; 0 is no step budget.")] = None,
    epochs: Annotated[Float, typer.Option(
        metavar="N", callback=at_least(0), show_default=False,
        help="Stop after N passes over the text (may be fractional); 0 is none. A run from a base given "
             "neither this nor --max-steps plans its own from the text's size.")] = None,
    resume: Annotated[Optional[Path], typer.Option(
        metavar="CHECKPOINT", show_default=False,
        help="Continue a run exactly from its checkpoint, with the run's own options; options given "
             "here change budgets, intervals and output, and are listed at start.")] = None,
    init_from: Annotated[Optional[Path], typer.Option(
        metavar="CHECKPOINT", show_default=False,
        help="Start a new run from a checkpoint's weights and vocabulary.")] = None,
    extend_vocab: Annotated[bool, typer.Option(
        "--extend-vocab", help="With --init-from: grow the vocabulary for new characters.")] = False,
    base: Annotated[Optional[str], typer.Option(
        metavar="auto|none|NAME|PATH", show_default=False,
        help="What a new run starts from: auto fine-tunes the English prose base shipped with charnn "
             "when it knows your text (says why at start), none trains from scratch, or give a base's "
             "name (prose-en) or any checkpoint." + _d("auto"))] = None,
    size: Annotated[Optional[Size], typer.Option(
        metavar="[auto|fixed]", show_default=False,
        help="Model shape and dropout: auto chooses them from your text and budget (says why at start; "
             "the options below, when given, win); fixed uses their listed defaults." + _d("auto"))] = None,
    cell: Annotated[Optional[Cell], typer.Option(
        metavar="[lstm|gru|rnn]", show_default=False, help="Recurrent cell." + _d(_MD.cell))] = None,
    hidden_size: Annotated[Int, typer.Option(
        metavar="N", callback=at_least(1), show_default=False,
        help="Units per recurrent layer." + _d(_auto(_MD.hidden_size)))] = None,
    num_layers: Annotated[Int, typer.Option(
        metavar="N", callback=at_least(1), show_default=False,
        help="Stacked recurrent layers." + _d(_auto(_MD.num_layers)))] = None,
    embedding_dim: Annotated[Int, typer.Option(
        metavar="N", callback=at_least(1), show_default=False,
        help="Size of each character's embedding vector." + _d(_auto(_MD.embedding_dim)))] = None,
    dropout: Annotated[Float, typer.Option(
        metavar="P", callback=between(0.0, 0.99), show_default=False,
        help="Dropout between layers and before the head, 0 to 0.99." + _d(_auto(_MD.dropout)))] = None,
    seq_len: Annotated[Int, typer.Option(
        metavar="N", callback=at_least(1), show_default=False,
        help="Characters per truncated-BPTT chunk." + _d(_TD.seq_len))] = None,
    batch_size: Annotated[Int, typer.Option(
        metavar="N", callback=at_least(1), show_default=False,
        help="Contiguous streams of text trained side by side." + _d(_TD.batch_size))] = None,
    order: Annotated[Optional[Order], typer.Option(
        metavar="[auto|shuffled|in-order]", show_default=False,
        help="How the text is read: shuffled cuts it into blocks of up to 32 chunks (2,048 characters at "
             "--seq-len 64) dealt to the streams in a new random order each epoch; in-order gives each "
             "stream one stretch, read in order (charnn 0.1); auto reads in order when the budget reads "
             "the text at least once, shuffled when not (says which at start)." + _d("auto"))] = None,
    shuffle: Annotated[Optional[bool], typer.Option(
        "--shuffle/--no-shuffle", hidden=True, help="The same as --order shuffled / --order in-order.")] = None,
    lr: Annotated[Float, typer.Option(
        metavar="LR", callback=lambda v: v if v is None else positive(v), show_default=False,
        help="Peak learning rate (AdamW)." + _d(_TD.lr))] = None,
    weight_decay: Annotated[Float, typer.Option(
        metavar="W", callback=at_least(0), show_default=False,
        help="AdamW weight decay on the weight matrices." + _d(_TD.weight_decay))] = None,
    grad_clip: Annotated[Float, typer.Option(
        metavar="NORM", callback=at_least(0), show_default=False,
        help="Clip the gradients' global L2 norm to NORM; 0 is off." + _d(_TD.grad_clip))] = None,
    warmup_steps: Annotated[Int, typer.Option(
        metavar="N", callback=at_least(0), show_default=False,
        help="Steps of linear learning-rate warmup before the cosine decay."
             + _d(f"{AUTO_WARMUP_STEPS} steps or {AUTO_WARMUP_SHARE:.0%} of the budget, whichever is shorter"))] = None,
    eval_every: Annotated[Int, typer.Option(
        metavar="N", callback=at_least(1), show_default=False,
        help="Evaluate and save every N steps."
             + _d(f"about {AUTO_EVALS} times per run, at most every {MAX_EVAL_EVERY:,} steps"))] = None,
    eval_chars: Annotated[Int, typer.Option(
        metavar="N", callback=at_least(0), show_default=False,
        help="Validation characters each evaluation scores (the start of the split; charnn eval scores "
             "it all); 0 is the whole split." + _d(f"up to {AUTO_EVAL_CHARS:,}, fewer if a --time-limit is short"))] = None,
    log_every: Annotated[Int, typer.Option(
        metavar="N", callback=at_least(1), show_default=False,
        help="Progress update and metrics row every N steps." + _d(_TD.log_every))] = None,
    val_fraction: Annotated[Float, typer.Option(
        metavar="F", callback=between(0.0, 0.9), show_default=False,
        help="Share of the text, at its end, held out for validation, 0 to 0.9." + _d(_TD.val_fraction))] = None,
    patience: Annotated[Int, typer.Option(
        metavar="N", callback=at_least(0), show_default=False,
        help="Stop after N evaluations without improvement; 0 is off.")] = None,
    keep: Annotated[Int, typer.Option(
        metavar="N", callback=at_least(0), show_default=False,
        help="Also keep the last N step-numbered checkpoints; 0 is none.")] = None,
    sample_every: Annotated[Int, typer.Option(
        metavar="N", callback=at_least(0), show_default=False,
        help="Show a sample preview every N evaluations (not steps); 0 is off.  [default: at the first "
             "evaluation, then at most one per tenth of the budget]")] = None,
    seed: Annotated[Int, typer.Option(
        metavar="N", callback=between(0, 2 ** 64 - 1), show_default=False,
        help="Random seed (weights, dropout), 0 to 2^64-1." + _d(_TD.seed))] = None,
    device: Annotated[Optional[str], typer.Option(
        metavar="DEVICE", callback=parse_device, show_default=False, help=DEVICE_HELP + _d("auto"))] = None,
    precision: Annotated[Optional[Precision], typer.Option(
        metavar="[auto|fp32|bf16|fp16]", show_default=False,
        help="Numeric precision; auto picks the fastest that trains as well as fp32 on this device "
             "(on a CPU with native bf16, a --time-limit run times both)."
             + _d("auto"))] = None,
    threads: Annotated[Int, typer.Option(
        metavar="N", callback=at_least(1), show_default=False, help=THREADS_HELP)] = None,
    encoding: Annotated[Optional[str], typer.Option(
        metavar="CODEC", show_default=False,
        help="Text encoding of the corpus files; files in folders that do not decode are skipped."
             + _d("utf-8"))] = None,
    verbose: Annotated[bool, typer.Option(
        "--verbose", "-v", help="List every file read and skipped.")] = False,
) -> None:
    """Train a model on your text or the built-in corpus.

    Writes best.pt (for sampling and evaluation) and last.pt (to resume) to
    the output folder, and prints the command that continues the run if it is
    stopped."""

    def body() -> None:
        from ..model.devices import set_threads, threads_left_open
        from ..training.schedule import parse_duration
        from ..training.trainer import Trainer

        ordered = None if order in (None, Order.auto) else order == Order.shuffled
        if order is not None and shuffle is not None and ordered != shuffle:
            raise ConfigError(f"--order {order.value} and {'--shuffle' if shuffle else '--no-shuffle'} disagree; "
                              "pass one of them")
        if shuffle is not None:
            ordered = shuffle
        given: dict[str, Any] = {
            "corpus": [os.path.abspath(p) for p in corpus] if corpus else None,
            "out": str(out) if out is not None else None,
            "max_steps": max_steps, "epochs": epochs,
            "time_limit": parse_duration(time_limit) if time_limit is not None else None,
            "seq_len": seq_len, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
            "grad_clip": grad_clip, "warmup_steps": warmup_steps, "eval_every": eval_every,
            "eval_chars": eval_chars, "log_every": log_every, "val_fraction": val_fraction,
            "patience": patience, "keep": keep, "sample_every": sample_every, "seed": seed,
            "device": device, "precision": precision.value if precision else None, "encoding": encoding,
            "size": size.value if size else None, "shuffle": ordered, "base": base,
        }
        given = {k: v for k, v in given.items() if v is not None}
        if base is not None and (resume is not None or init_from is not None):
            raise ConfigError("--base starts a new run: " + ("a resumed run keeps its start; drop --base"
                                                             if resume is not None else
                                                             "give --base or --init-from, not both"))
        if resume is None and init_from is None:
            given.setdefault("base", "auto")
        budget_given = any(k in given for k in ("max_steps", "epochs", "time_limit"))
        default_budget = not budget_given and resume is None
        if default_budget:
            given["time_limit"] = parse_duration(DEFAULT_TIME_LIMIT)
        overrides = {"cell": cell.value if cell else None, "hidden_size": hidden_size,
                     "num_layers": num_layers, "embedding_dim": embedding_dim, "dropout": dropout}
        set_threads(threads)
        reporter = TrainReporter(sample_every=sample_every, verbose=verbose)  # None: spaced over the budget
        with reporter:
            if default_budget:
                reporter.note(f"No budget given: training for {DEFAULT_TIME_LIMIT} (set --time-limit, "
                              "--max-steps or --epochs).")
            trainer = Trainer(given, overrides, resume=resume,
                              init_from=init_from, extend_vocab=extend_vocab, callback=reporter,
                              overwrite=overwrite, adapt_threads=threads_left_open(threads))
            if resume is not None and sample_every is None and trainer.cfg.sample_every != _TD.sample_every:
                reporter.sample_every = trainer.cfg.sample_every  # the run's own --sample-every
                reporter.sample_spacing = 0.0
            try:
                result = trainer.run()
            finally:
                trainer.close()
        if trainer.dist.is_main:
            best = result.best_path or result.last_path
            cfg = trainer.cfg
            early = (f" ({cfg.epochs:g} epochs, {fmt_span(trainer.pos.elapsed)} of the "
                     f"{fmt_span(cfg.time_limit)} allowed)"
                     if result.stopped_because == "epochs" and cfg.time_limit else "")
            say(f"Done: {plural(result.step, 'step')}{early}, best validation loss {fmt_loss(result.best_val_loss)}.")
            say(f"Checkpoints in {safe_display(result.out_dir, None)}/")
            say(f"Next: charnn sample {shell_arg(best)} -n 500")
        return trainer.dist.enabled

    if run_command(body):  # a finished torchrun rank, its output flushed (and checked) by run_command
        # The process group is destroyed and every file is closed. Exit now:
        # gloo's worker threads can abort the process while the interpreter
        # tears down (pytorch/pytorch#190489), turning a finished run into
        # exit -6 (it happened in this project's tests).
        sys.stderr.flush()
        os._exit(0)
