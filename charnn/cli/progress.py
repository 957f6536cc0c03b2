"""Rendering the trainer's events: a rich progress bar, or plain log lines."""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console

from .common import err, fmt_duration

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
                  fmt_duration(cfg["time_limit"]) if cfg["time_limit"] else ""]
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
            self.print(f"{fmt_duration(e['elapsed'])} {e['progress']:6.1%}  " + self._status())

    def on_eval(self, e: dict[str, Any]) -> None:
        self.last_eval = e
        self.evals += 1
        if e.get("val_loss") is not None and math.isfinite(e["val_loss"]):
            mark = " (best)" if e["improved"] else ""
            self.print(f"step {e['step']}: validation loss {e['val_loss']:.4f} "
                       f"({e['val_bpc']:.3f} bits/char){mark}")
        if self.sample_every and self.evals % self.sample_every == 0:
            from ..sample import sample_text

            text = sample_text(e["model"], e["tokenizer"], "", 200, temperature=0.8, seed=e["step"])
            self.print("  sample: " + text.replace("\n", "\n          ")[:600])

    def on_warning(self, e: dict[str, Any]) -> None:
        self.print(f"warning: {e['message']}")


