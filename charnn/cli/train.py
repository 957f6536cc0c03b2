"""charnn train: options -> TrainConfig -> Trainer, rendered by TrainReporter."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..config import ModelConfig, TrainConfig
from .progress import TrainReporter
from .common import Cell, Device, Precision, app, err, fmt_loss, parse_time_limit, positive, run_command

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
        from ..config import TrainConfig
        from ..train import Trainer, parse_duration

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
                      f"{fmt_loss(result.best_val_loss)}. Checkpoints in {result.out_dir}/", markup=False)
            err.print(f"Next: charnn sample {best} -n 500", markup=False)

    run_command(body)


