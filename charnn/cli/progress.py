"""Rendering the trainer's events: a rich progress bar, or plain log lines.

Both fit the console's width (80 columns and up): the fields that matter come
first (the bar and its percentage and time left, the step, the training loss,
the validation loss) and the rest (speed, learning rate, gradient norm,
clipping) only where there is room for them.
"""

from __future__ import annotations

import math
import re
import time
from typing import Any

from rich.cells import cell_len, set_cell_size
from rich.console import Console
from rich.progress import ProgressColumn, Task
from rich.table import Column
from rich.text import Text

from ..errors import safe_display
from .common import err, escape_text, fmt_duration, fmt_span, plural

LABEL = "train"
# The bar's fixed neighbours: label, percentage "100%", "ETA 0:00:00", and
# the spaces between the five columns.
_FIXED = len(LABEL) + 4 + 11 + 4
_CORE_STATUS = 38  # "step 12,345 loss 1.234  val 1.234" or "... evaluating"


class _TimeLeft(ProgressColumn):
    """``ETA 1:23`` (``ETA -:--`` until the speed is known)."""

    def render(self, task: Task) -> Text:
        left = 0.0 if task.finished else task.time_remaining
        shown = "-:--" if left is None or task.completed <= 0 else fmt_duration(left)
        return Text(f"ETA {shown}", style="progress.remaining")


def fit(parts: list[str], optional: list[str], width: int, sep: str = "  ") -> str:
    """``parts`` joined, then as many of ``optional`` (in order) as fit in
    ``width`` terminal cells; cut with an ellipsis if even ``parts`` do not."""
    text = sep.join(p for p in parts if p)
    for extra in optional:  # in order of importance: stop at the first that does not fit
        if not extra:
            continue
        if cell_len(text) + len(sep) + cell_len(extra) > width:
            break
        text = text + sep + extra if text else extra
    if cell_len(text) > width:
        text = set_cell_size(text, max(0, width - 1)).rstrip() + "…"
    return text


SAMPLE_SPACING = 0.1  # without --sample-every: a sample per tenth of the budget at most
PREVIEW_SECONDS = 1.0  # the most a sample shown during training may take to generate


class TrainReporter:
    """Renders the trainer's events: a rich progress bar on a terminal, plain
    log lines otherwise; everything on stderr."""

    def __init__(self, sample_every: int | None = 1, console: Console | None = None, verbose: bool = False):
        self.console = console or err
        self.verbose = verbose  # list every corpus file read and skipped
        self.live = self.console.is_terminal
        # None (not given): a sample at the first evaluation, then at the first one
        # SAMPLE_SPACING of the budget later -- about as many as in a run of ~8
        # evaluations, however often a run of many epochs is evaluated.
        self.sample_every = 1 if sample_every is None else sample_every
        self.sample_spacing = SAMPLE_SPACING if sample_every is None else 0.0
        self._sampled_at: float | None = None  # the run's progress at the last sample
        self.evals = 0
        self.last_log: dict[str, Any] = {}
        self.last_eval: dict[str, Any] = {}
        self.message = "starting"  # what the trainer is doing before/between steps (status events)
        self.progress: Any = None
        self.task: Any = None

    # -- the live bar ---------------------------------------------------------------
    def _bar_width(self) -> int:
        return max(10, min(40, self.console.width - _FIXED - _CORE_STATUS))

    def _status_width(self) -> int:
        return max(10, self.console.width - _FIXED - self._bar_width() - 1)

    def __enter__(self) -> "TrainReporter":
        if self.live:
            from rich.progress import BarColumn, Progress, TextColumn

            self.progress = Progress(
                TextColumn(f"[bold]{LABEL}[/]", table_column=Column(no_wrap=True)),
                BarColumn(bar_width=self._bar_width()),
                TextColumn("{task.percentage:>3.0f}%", table_column=Column(no_wrap=True)),
                _TimeLeft(table_column=Column(no_wrap=True)),
                TextColumn("{task.fields[status]}", markup=False,
                           table_column=Column(no_wrap=True, overflow="ellipsis")),
                console=self.console, transient=False, refresh_per_second=4)
            self.progress.__enter__()
            self.task = self.progress.add_task(LABEL, total=1.0, status=self.message)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)
            self.progress = None

    def _refresh(self) -> None:
        if self.progress is not None:
            done = self.last_log.get("progress", 0.0) if self.last_log else 0.0
            self.progress.update(self.task, completed=min(1.0, max(0.0, float(done))),
                                 status=self.status(self._status_width()))

    # -- text ---------------------------------------------------------------------
    def print(self, text: str, wrap: bool = False) -> None:
        """A line above the bar (or a log line). ``wrap``: prose, folded at
        the console's width at spaces; otherwise printed as it is. File names
        and checkpoint strings in it are escaped; a stderr that is full or
        closed loses the line, never the run (training goes on and saves)."""
        try:
            self.console.print(safe_display(text, limit=None, keep="\n"), markup=False, highlight=False,
                               soft_wrap=not wrap)
        except OSError:
            pass

    def status(self, width: int) -> str:
        """The fields after the bar (or after the time in a log line), the most
        important first, cut to ``width``."""
        lg, ev = self.last_log, self.last_eval
        core, extras = [], []
        if lg:
            loss = lg.get("train_loss")
            finite = isinstance(loss, (int, float)) and math.isfinite(loss)
            core.append(f"step {lg.get('step', 0):,}" + (f" loss {loss:.3f}" if finite else ""))
        val = ev.get("val_loss") if ev else None
        if isinstance(val, (int, float)) and math.isfinite(val):
            # while a status message shows (evaluating...), the last val is less news
            (extras if self.message else core).append(f"val {val:.3f}")
            if isinstance(ev.get("val_bpc"), (int, float)):
                extras.append(f"({ev['val_bpc']:.2f} bpc)")
        if self.message:
            # the bar shows the step already: "evaluating at step 1,000" -> "evaluating"
            message = re.sub(r" at step [\d,]+$", "", self.message) if lg else self.message
            core.insert(1 if lg else 0, message)
        for key, shown in (("chars_per_sec", "{:,.0f} chars/s"), ("lr", "lr {:.2e}"), ("grad_norm", "|g| {:.2f}"),
                           ("clipped_share", "clipped {:.0%}")):
            if isinstance(lg.get(key), (int, float)):
                extras.append(shown.format(lg[key]))
        return fit(core, extras, width)

    # -- events -------------------------------------------------------------------
    def __call__(self, event: dict[str, Any]) -> None:
        handler = getattr(self, "on_" + event["kind"], None)
        if handler:
            handler(event)

    def on_status(self, e: dict[str, Any]) -> None:
        """``{"kind": "status", "message": "reading corpus"}``: what the trainer
        is doing now (reading, encoding, calibrating, evaluating); an empty
        message clears it. Shown in the bar, or as a log line."""
        message = str(e.get("message") or "").strip()
        self.message = message
        if self.progress is not None:
            self._refresh()
        elif message:
            self.print(message, wrap=True)

    def on_start(self, e: dict[str, Any]) -> None:
        mc, cfg = e["model_config"], e["config"]
        self.message = ""
        self.print(f"model: {mc['cell']} {mc['num_layers']}x{mc['hidden_size']}, embedding {mc['embedding_dim']}, "
                   f"dropout {mc['dropout']}, {plural(e['parameters'], 'parameter')}", wrap=True)
        files, skipped = e.get("files") or [], e.get("skipped") or []
        if files:
            self.print(f"read {plural(len(files), 'file')}, {plural(sum(n for _, n in files), 'character')}"
                       + (f"; skipped {plural(len(skipped), 'file')}" if skipped else "")
                       + (" (--verbose lists them)" if skipped and not self.verbose else ""), wrap=True)
        if self.verbose:
            for path, n in files:
                self.print(f"  read {path} ({plural(n, 'character')})")  # print() escapes
            for path, why in skipped:
                self.print(f"  skipped {path}: {why}")
        self.print(f"data: {e['train_chars']:,} training + {e['val_chars']:,} validation characters, "
                   f"vocabulary {e['vocab_size']}", wrap=True)
        if e.get("eval_chars") and e["eval_chars"] < e["val_chars"]:
            self.print(f"each evaluation scores the first {e['eval_chars']:,} validation characters "
                       "(charnn eval scores them all)", wrap=True)
        budget = [plural(cfg["max_steps"], "step") if cfg.get("max_steps") else "",
                  plural(cfg["epochs"], "epoch") if cfg.get("epochs") else "",
                  fmt_span(cfg["time_limit"]) if cfg.get("time_limit") else ""]
        self.print(f"batch {cfg['batch_size']} x {cfg['seq_len']} characters"
                   + (", shuffled blocks" if cfg.get("shuffle") else ", each stream in order")
                   + f", lr {cfg['lr']:g}, budget "
                   f"{' or '.join(b for b in budget if b) or 'none'}", wrap=True)
        self.print(f"device {e['device']}, precision {e['precision']}"
                   + (f", {e['world_size']} processes" if e.get("world_size", 1) > 1 else "")
                   + (f"; resuming at step {e['resumed_at']:,}" if e.get("resumed_at") else ""), wrap=True)
        where = f"writing to {e['out_dir']}/"
        if not any(where in str(note) for note in e.get("notes") or []):  # said by the note that moved on to NAME-2/
            self.print(where)
        for line in e.get("changed") or []:
            self.print(f"changed on resume: {line}", wrap=True)
        self._refresh()

    def note(self, text: str) -> None:
        """A line to read once: where the run writes, what changed, a choice made."""
        self.print(text, wrap=True)

    def on_note(self, e: dict[str, Any]) -> None:
        self.note(e["message"])

    def on_end(self, e: dict[str, Any]) -> None:
        """The run stopped: the bar shows the last step (and 100% unless it was
        interrupted)."""
        self.message = ""
        if self.last_log or e.get("step"):
            done = 1.0 if e.get("stopped_because") != "interrupted" else self.last_log.get("progress", 0.0)
            self.last_log = {**self.last_log, "step": e.get("step", 0), "progress": done}
            self.last_log.setdefault("train_loss", math.nan)
            if self.progress is not None:
                self._refresh()

    def on_log(self, e: dict[str, Any]) -> None:
        self.last_log = e
        self.message = ""
        if self.progress is not None:
            self._refresh()
        else:
            head = f"{fmt_duration(e['elapsed'])} {e['progress']:6.1%}  "
            self.print(head + self.status(self.console.width - len(head)))

    def on_eval(self, e: dict[str, Any]) -> None:
        self.last_eval = e
        self.evals += 1
        self.message = ""
        if e.get("val_loss") is not None and math.isfinite(e["val_loss"]):
            mark = " (best)" if e["improved"] else ""
            self.print(f"step {e['step']:,}: validation loss {e['val_loss']:.4f} "
                       f"({e['val_bpc']:.3f} bits/char){mark}")
        self._refresh()
        if self.sample_every and self.evals % self.sample_every == 0 and e.get("model") is not None:
            progress = self.last_log.get("progress")
            if self.sample_spacing and self._sampled_at is not None and progress is not None \
                    and progress - self._sampled_at < self.sample_spacing:
                return
            self._sampled_at = progress
            from ..generation.sample import generate

            # Bounded in time as well as length: it is not part of the training
            # budget, and one character of a 100,000-character vocabulary costs
            # about 40 ms on a CPU.
            deadline = time.perf_counter() + PREVIEW_SECONDS
            chars = []
            for ch in generate(e["model"], e["tokenizer"], "", 200, temperature=0.8, seed=e["step"]):
                chars.append(ch)
                if time.perf_counter() > deadline:
                    break
            self.print(self.preview("".join(chars)))

    def preview(self, text: str, lines: int = 4) -> str:
        """A sample as a few indented lines, each cut to the console's width."""
        width = self.console.width - 10
        rows = [fit([escape_text(row.replace("\t", " "))], [], width) for row in text.split("\n")[:lines]]
        return "  sample: " + "\n          ".join(rows)

    def on_warning(self, e: dict[str, Any]) -> None:
        self.print(f"warning: {e['message']}", wrap=True)
