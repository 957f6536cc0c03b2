"""The truncated-BPTT training loop.

It prints nothing: it reports through a callback that receives plain event
dicts (``kind`` = status | start | note | log | eval | checkpoint | warning |
end), which the CLI renders with rich and tests inspect directly. It is
DDP-aware: under ``torchrun`` each rank trains its own share of the streams
and rank 0 alone evaluates, writes and reports.

The loop is here; around it: the options (``config``, frozen once validated)
and what the run decides for itself (``plan``), the setup before the first
step (``setup``: the text, size and order, fed to the rules in
``model.sizing`` by ``choices``), one step and the non-finite guard
(``step``), the position in and out of a checkpoint (``state``), the budget
and learning-rate schedule (``schedule``), evaluating and its timing
(``validation``), and the run folder it owns (``output``).
"""

from __future__ import annotations

import math
import os
import signal
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist

from ..errors import CharnnError, ConfigError, TrainingError, safe_display, shell_arg
from ..model.config import ModelConfig
from ..model.rnn import State, select_streams
from ..storage import checkpoint as ckpt_mod
from ..text.data import BUILTIN_NAME, IGNORE_INDEX, cache_dir, corpus_name
from . import state as train_state
from .config import TrainConfig
from .output import RunOutput
from .plan import RunPlan
# DistInfo, parse_duration and lr_factor are re-exported for the API and the tests.
from .runtime import DistInfo, StopSignals, setup_distributed  # noqa: F401
from .schedule import SPEED_PROBE_STEPS, Budget, lr_factor, parse_duration  # noqa: F401
from .setup import device_and_precision, left_open, load_text, run_options, size_and_order
from .state import LoopPosition
from .step import Stepper, agree
from .threads import ThreadTuner
from .validation import Validation

Callback = Callable[[dict[str, Any]], None]


class TrainingInterrupted(CharnnError):
    """Ctrl-C, SIGTERM or SIGHUP: the run saved ``last.pt`` and stopped. The
    CLI exits 128 + the signal's number (130 for Ctrl-C)."""

    def __init__(self, message: str, path: Path | None, signum: int = signal.SIGINT):
        super().__init__(message)
        self.path = path
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


@dataclass
class TrainResult:
    out_dir: Path
    best_path: Path | None
    last_path: Path | None
    step: int
    best_val_loss: float
    stopped_because: str
    train_state: dict[str, Any] = field(default_factory=dict)


class Trainer:
    """One training run: set up in ``__init__`` (data, model, resume, output
    folder), trained by :meth:`run`.

    ``cfg``: a mapping of the options the user passed (what the CLI hands
    over; a run from a base chooses the rest) or a whole :class:`TrainConfig`
    (a new run treats its default values as left open; a resume, every field
    as given). With ``resume`` the run's own options come from the checkpoint
    and ``cfg`` gives what should change (see :func:`.config.merge_resume`).
    ``handle_sigint``: SIGINT, SIGTERM and SIGHUP save and stop; ``adapt_threads``: see :mod:`.threads`.
    ``overwrite``: a new run replaces the run in an explicit ``out`` folder once it first writes there.
    """

    def __init__(self, cfg: TrainConfig | Mapping[str, Any] | None = None,
                 model_overrides: dict[str, Any] | None = None, *,
                 resume: str | os.PathLike | None = None, init_from: str | os.PathLike | None = None,
                 extend_vocab: bool = False, callback: Callback | None = None,
                 handle_sigint: bool = True, cache: bool = True, overwrite: bool = False, adapt_threads: bool = False):
        if resume and init_from:
            raise ConfigError("--resume and --init-from exclude each other; --resume continues a run, "
                              "--init-from starts a new one from its weights")
        self.callback, self.handle_sigint = callback or (lambda event: None), handle_sigint
        self.notes: list[str] = []  # said once at start: where it writes, what changed on resume
        self.pos = LoopPosition()
        overrides = {k: v for k, v in (model_overrides or {}).items() if v is not None}
        ModelConfig(**{"vocab_size": 1, **{k: v for k, v in overrides.items()
                                           if k in ModelConfig.__dataclass_fields__}}).validate()

        # -- options: a new run's, or the resumed run's with the given ones on top
        resumed = ckpt_mod.load(resume, prefer="last.pt") if resume else None
        self.cfg, self.changed = run_options(cfg, resumed, overrides, init_from, overwrite)
        cfg, self.left_open = self.cfg, left_open(cfg, resumed)
        if resumed is not None:
            self.pos.resumed(resumed.train_state, self.changed)
        self.plan = RunPlan.of(cfg)
        if not (cfg.max_steps or cfg.epochs or cfg.time_limit):
            raise ConfigError("no training budget: pass --max-steps, --epochs or --time-limit")
        self.dist = setup_distributed(cfg.device)
        if cfg.batch_size % self.dist.world_size:
            raise ConfigError(f"--batch-size {cfg.batch_size} must be divisible by the number of "
                              f"processes ({self.dist.world_size}); each takes an equal share of streams")

        # -- where it writes: chosen, locked and checked before reading (so the
        # corpus never includes it and no other run can take it meanwhile)
        self.output = RunOutput(self.dist)
        default = Path("checkpoints") / (cfg.corpus_name or (corpus_name(cfg.corpus) if cfg.corpus else BUILTIN_NAME))
        try:
            self.out_dir = self.output.open(Path(cfg.out) if cfg.out else None, default, resumed, overwrite)
            self.plan.out = str(self.out_dir)
            self.notes.extend(self.output.notes)
            self._setup(resumed, init_from, overrides, extend_vocab, cache, adapt_threads)
        except BaseException:
            self.close()  # a new run that failed here leaves no trace in its folder
            raise

    def _setup(self, resumed: ckpt_mod.Checkpoint | None, init_from: str | os.PathLike | None,
               overrides: dict[str, Any], extend_vocab: bool, cache: bool, adapt_threads: bool) -> None:
        cfg, plan = self.cfg, self.plan
        # -- the text, its vocabulary (and the model started from, with --init-from)
        self.cfg, self.corpus, tokenizer, model, self.train_ids, self.val_ids = load_text(
            cfg, plan, resumed, init_from, overrides, extend_vocab, cache, left_open=self.left_open,
            world_size=self.dist.world_size, exclude=[self.out_dir, cache_dir()], status=self._status,
            warn=lambda message: self._emit("warning", message=message))
        cfg, self.tokenizer = self.cfg, tokenizer
        self.notes.extend([f"start: {plan.base_reason}"] if plan.base_reason and resumed is None else [])
        per_rank = cfg.batch_size // self.dist.world_size
        self.rows = slice(self.dist.rank * per_rank, (self.dist.rank + 1) * per_rank)

        self.device, precision = device_and_precision(cfg, self.dist, self.notes, resumed)
        self.tuner = ThreadTuner.for_run(adapt_threads, self.device, self.dist.enabled)

        # -- size and order, then the batcher and budget they make; the model
        if resumed is not None:
            model = resumed.build_model("cpu")
        self.batcher, new, notes, probe_seconds, self.precision = size_and_order(
            cfg, plan, overrides, self.train_ids, start=model, vocab_size=tokenizer.vocab_size,
            rows=self.rows, device=self.device, precision=precision, dist_info=self.dist, status=self._status)
        self.notes.extend(notes)
        self.budget = Budget(cfg, len(self.batcher))
        self.model = (model or new).to(self.device).train()
        self.pos.elapsed = probe_seconds  # training seconds, across resumes (a new run's timings count)
        self.state: State | None = None
        self.steps = Stepper(self.model, cfg, self._lr_lambda, self.dist, self.device, self.precision, self.rows)
        self.ddp_model, self.optimizer = self.steps.ddp_model, self.steps.optimizer
        self.scheduler = self.steps.scheduler
        if resumed is not None:
            carried = train_state.restore(resumed, self.pos, self.optimizer, self.scheduler, chunks=len(self.batcher),
                                          batch_size=cfg.batch_size, device=self.device)
            self.output.metrics = list(resumed.metrics)
            self.state = None if carried is None else select_streams(carried, self.rows)
        self._last_eval_step = -1
        self.validation = Validation(cfg, plan, self.val_ids, self.dist, self.device, self.precision)

    def __getattr__(self, name: str) -> Any:
        """The position's fields read as the trainer's own (``t.step``, ``t.epoch``, ...)."""
        pos = self.__dict__.get("pos")
        if pos is not None and name in LoopPosition.__dataclass_fields__:
            return getattr(pos, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # -- schedule ------------------------------------------------------------------
    def epochs_done(self) -> float:
        """Passes over the training text so far, fractional."""
        return self.pos.epoch + self.pos.chunk / len(self.batcher)

    def progress(self) -> float:
        """0..1 of whichever budget is nearest its end."""
        return self.budget.progress(self.pos.step, self.epochs_done(), self.pos.elapsed)

    def _lr_lambda(self, _: int) -> float:
        # LambdaLR calls this after every optimizer step; the factor depends on
        # our own step count and on the progress through the budget (which,
        # for --time-limit, is wall-clock time). The time spent before the
        # first step counts for the cosine but not for the warmup.
        warm = None
        if self.plan.setup_seconds:
            warm = self.budget.progress(self.pos.step, self.epochs_done(),
                                        max(0.0, self.pos.elapsed - self.plan.setup_seconds))
        return self.pos.lr_scale * lr_factor(self.pos.step, self.progress(), self.cfg.warmup_steps,
                                             self.cfg.min_lr_ratio, warm)

    # -- events ----------------------------------------------------------------------
    def _emit(self, kind: str, **payload: Any) -> None:
        if self.dist.is_main:
            self.callback({"kind": kind, **payload})

    def _status(self, message: str) -> None:
        """What the run is doing now (before the first step, and while evaluating)."""
        self._emit("status", message=message)

    def _log_row(self, row: dict[str, Any]) -> None:
        problem = self.output.log(row)
        if problem:
            self._emit("warning", message=problem)

    # -- checkpoints ------------------------------------------------------------------
    @property
    def metrics(self) -> list[dict[str, Any]]:
        return self.output.metrics

    def train_state(self) -> dict[str, Any]:
        """The run's position for the checkpoint (see :mod:`charnn.training.state`).
        Collective under DDP (every rank's share of the carried state is gathered)."""
        carried = train_state.gather_carried(self.state, self.dist)
        return train_state.collect(self.pos, self.precision, self.device, carried)

    def save(self, improved: bool) -> Path | None:
        """last.pt always, best.pt when validation improved, step-N.pt with --keep.
        Collective under DDP (the carried state is gathered); rank 0 writes."""
        payload = ckpt_mod.build_payload(
            self.model, self.tokenizer, train_config=self.plan.record(self.cfg), train_state=self.train_state(),
            metrics=self.metrics, optimizer_state=self.optimizer.state_dict(),
            scheduler_state=self.scheduler.state_dict())
        written = self.output.save(payload, self.pos.step, best=improved or self.cfg.val_fraction == 0,
                                   keep=self.cfg.keep)
        if written is None:
            return None
        self._emit("checkpoint", step=self.pos.step, paths=[str(p) for p in written])
        return written[0]

    # -- evaluation -----------------------------------------------------------------------
    def evaluate(self) -> float:
        """Validation loss over the evaluation slice, state carried; agreed by all ranks."""
        return self.validation.evaluate(self.model)

    def _evaluate_and_save(self) -> Path | None:
        pos = self.pos
        self._last_eval_step = pos.step
        if self.validation.seconds() > 1.0:
            self._status(f"evaluating at step {pos.step:,}")  # only when it takes a while
        val = self.evaluate() if self.cfg.val_fraction > 0 else math.nan
        improved = math.isfinite(val) and val < pos.best_val
        if improved:
            pos.best_val = val
            pos.evals_without_improvement = 0
        elif math.isfinite(val):
            pos.evals_without_improvement += 1
        row = {"step": pos.step, "epoch": self.epochs_done(),
               "val_loss": val, "val_bpc": val / math.log(2) if math.isfinite(val) else None,
               "best_val_loss": None if math.isinf(pos.best_val) else pos.best_val,
               "elapsed": pos.elapsed}
        self._log_row(row)
        path = self.save(improved)
        self.steps.snapshot_good()
        self._emit("eval", **row, improved=improved, model=self.model, tokenizer=self.tokenizer,
                   device=self.device)
        return path

    # -- the loop ---------------------------------------------------------------------------
    def _budget_left(self, reserve: float) -> str | None:
        return self.budget.ended(self.pos.step, self.epochs_done(), self.pos.elapsed, reserve)

    def _train_step(self, x: torch.Tensor, y: torch.Tensor, n_valid_global: int) -> tuple[float, float, bool]:
        """One TBPTT chunk: forward, backward, clip, step. Returns (loss, grad norm, finite)."""
        loss, norm, finite, self.state = self.steps.step(x, y, n_valid_global, self.state)
        return loss, norm, finite

    def close(self) -> None:
        """Release the output folder and leave the process group (under torchrun).
        A run that wrote no checkpoint leaves no trace of itself in the folder."""
        self.output.close()
        if self.dist.enabled and dist.is_initialized():
            dist.barrier()  # no rank tears down gloo while another still talks to it
            dist.destroy_process_group()

    def run(self) -> TrainResult:
        cfg, plan, pos = self.cfg, self.plan, self.pos  # (a budget is checked in __init__)
        run_start, elapsed_base = time.perf_counter(), pos.elapsed
        self.validation.calibrate(self.model)
        guessed_reserve, notes = self.validation.before_first_step(self.budget, pos.step, pos.elapsed)
        self.notes.extend(notes)
        spent = self._budget_left(guessed_reserve)  # a resumed run's budget may be used up
        if spent:
            raise TrainingError(self.budget.spent_message(spent, pos.step, pos.elapsed,
                                                          str(self.out_dir / "last.pt"), guessed_reserve))
        self._emit("start", config=plan.record(cfg), model_config=self.model.config.to_dict(),
                   parameters=self.model.num_parameters(), device=str(self.device),
                   precision=self.precision, train_chars=len(self.train_ids), val_chars=len(self.val_ids),
                   eval_chars=self.validation.chars(),
                   files=list(self.corpus.files), skipped=list(self.corpus.skipped),
                   vocab_size=self.tokenizer.vocab_size, out_dir=str(self.out_dir),
                   resumed_at=pos.step, world_size=self.dist.world_size,
                   chunks_per_epoch=len(self.batcher), changed=list(self.changed), notes=list(self.notes))
        for message in self.notes:
            self._emit("note", message=message)
        self.steps.snapshot_good()
        start_step = pos.step
        if start_step == 0 and cfg.time_limit:  # a new run: its warmup starts now
            plan.setup_seconds = round(elapsed_base + time.perf_counter() - run_start, 6)
        eval_time = None  # seconds one evaluation + save takes, measured
        consecutive_bad = 0
        window = _Window()
        loop_start = window.start
        # --time-limit with automatic --eval-every: the interval is chosen from the
        # median time of the first steps, and may grow at each evaluation.
        auto_every = plan.eval_every is None
        step_times: list[float] = []
        eval_seconds = 0.0  # evaluations and saves in this loop, all told
        last_path: Path | None = None
        stopped = None
        signals = StopSignals() if self.handle_sigint else None
        if signals:
            signals.__enter__()
        try:
            while True:
                reserve = eval_time if eval_time is not None else guessed_reserve
                stopped = self._budget_left(reserve)
                if agree(self.dist, signals is not None and signals.hit, self.device):
                    stopped = "interrupted"
                if agree(self.dist, stopped is not None, self.device):
                    stopped = stopped or "another rank's budget"
                    break
                if pos.chunk >= len(self.batcher):  # epoch boundary: reset the carried state
                    pos.epoch += 1
                    pos.chunk = 0
                    self.state = None
                    continue
                t_step = time.perf_counter()
                x, y = self.batcher.chunk(pos.chunk, pos.epoch)
                n_valid = int((y != IGNORE_INDEX).sum())
                if self.batcher.starts_block(pos.chunk):  # new text in every row
                    self.state = None
                loss, norm, finite = self._train_step(x, y, n_valid)
                if self.tuner and (message := self.tuner.after_step(time.perf_counter() - t_step)):
                    self._emit("note", message=message)
                pos.chunk += 1
                pos.elapsed = elapsed_base + time.perf_counter() - run_start
                if plan.eval_every is None:
                    step_times.append(time.perf_counter() - t_step)
                if not finite:
                    pos.nonfinite_skipped += 1
                    consecutive_bad += 1
                    self.state = None  # a NaN state would poison every later chunk
                    self._emit("warning", message=f"step {pos.step}: non-finite loss or gradient; step skipped")
                    if consecutive_bad >= cfg.nan_tolerance:
                        consecutive_bad = 0
                        self._emit("warning", message=self.steps.recover(pos, self.out_dir / "last.pt"))
                        self.state = None
                    continue
                consecutive_bad = 0
                pos.step += 1
                self.scheduler.step()
                if cfg.grad_clip and norm > cfg.grad_clip:
                    pos.clipped_steps += 1
                pos.chars_seen += n_valid
                window.add(loss, n_valid)
                if plan.eval_every is None and pos.step - start_step >= SPEED_PROBE_STEPS:
                    for message in self.validation.choose_every(self.budget, pos.step, pos.elapsed,
                                                                statistics.median(step_times), reserve):
                        self._emit("note", message=message)
                if pos.step % cfg.log_every == 0:
                    row = window.row(pos, self.epochs_done(), self.optimizer.param_groups[0]["lr"], norm)
                    self._log_row(row)
                    self._emit("log", **row, progress=self.progress(), nonfinite=pos.nonfinite_skipped)
                if plan.eval_every and pos.step % plan.eval_every == 0:
                    t_eval = time.perf_counter()
                    last_path = self._evaluate_and_save()
                    eval_time = time.perf_counter() - t_eval
                    pos.elapsed = elapsed_base + time.perf_counter() - run_start
                    window.start += eval_time
                    eval_seconds += eval_time
                    if auto_every:
                        per_step = (time.perf_counter() - loop_start - eval_seconds) / (pos.step - start_step)
                        for message in self.validation.grow_every(self.budget, pos.step, pos.elapsed,
                                                                  per_step, eval_time):
                            self._emit("note", message=message)
                    if cfg.patience and pos.evals_without_improvement >= cfg.patience:
                        stopped = "patience"
                        break
            if pos.step == start_step and stopped != "interrupted":
                hint = f", for example --time-limit {int(2 * cfg.time_limit + 30)}s" if cfg.time_limit else ""
                raise TrainingError(f"no training step fit in the budget; nothing was written. Give a larger "
                                    f"budget{hint}.")
            if stopped == "interrupted":
                last_path = self.save(improved=False)  # quickly: no evaluation after a stop signal
            elif self._last_eval_step != pos.step:  # (-1 until this run evaluates)
                # Final evaluation and checkpoint, unless the last step just had one.
                last_path = self._evaluate_and_save()
            if stopped == "time_limit":  # the time budget ended it: was that the plan?
                per_step = (time.perf_counter() - loop_start - eval_seconds) / (pos.step - start_step)
                short = self.validation.shortfall(pos.step, per_step, elapsed_base + time.perf_counter() - run_start)
                if short is not None:
                    self._log_row(short)
                    self._emit("warning", message=short["message"])
        finally:
            if signals:
                signals.__exit__()
        pos.elapsed = elapsed_base + time.perf_counter() - run_start
        return self._finish(stopped, last_path, start_step, signals)

    def _finish(self, stopped: str | None, last_path: Path | None, start_step: int,
                signals: StopSignals | None) -> TrainResult:
        """The run's result and its "end" event; a TrainingInterrupted after a stop signal."""
        pos = self.pos
        best = self.out_dir / "best.pt"
        result = TrainResult(out_dir=self.out_dir, best_path=best if best.exists() else None,
                             last_path=last_path, step=pos.step, best_val_loss=pos.best_val,
                             stopped_because=stopped or "budget", train_state=self.train_state())
        self._emit("end", step=pos.step, best_val_loss=pos.best_val, stopped_because=result.stopped_because,
                   out_dir=str(self.out_dir), elapsed=pos.elapsed, chars_seen=pos.chars_seen,
                   nonfinite=pos.nonfinite_skipped, steps_this_run=pos.step - start_step)
        if stopped == "interrupted" or (signals is not None and signals.hit):
            signum = signals.signum if signals is not None and signals.signum else signal.SIGINT
            name = signal.Signals(signum).name
            last = self.out_dir / "last.pt"
            raise TrainingInterrupted(
                f"interrupted by {'Ctrl-C' if name == 'SIGINT' else name} at step {pos.step}; saved "
                f"{safe_display(last, None)}.\nContinue with: charnn train --resume {shell_arg(last)}", last, signum)
        return result


class _Window:
    """The steps since the last log row: their mean loss and speed."""

    def __init__(self) -> None:
        self.loss, self.steps, self.chars = 0.0, 0, 0
        self.start = time.perf_counter()

    def add(self, loss: float, chars: int) -> None:
        self.loss += loss
        self.steps += 1
        self.chars += chars

    def row(self, pos: LoopPosition, epochs_done: float, lr: float, norm: float) -> dict[str, Any]:
        """The log row, and a new window from now."""
        now = time.perf_counter()
        row = {"step": pos.step, "epoch": epochs_done, "train_loss": self.loss / self.steps,
               "lr": lr, "grad_norm": norm, "clipped_share": pos.clipped_steps / max(1, pos.step),
               "chars_per_sec": self.chars / max(1e-9, now - self.start), "elapsed": pos.elapsed}
        self.loss, self.steps, self.chars, self.start = 0.0, 0, 0, now
        return row


def train(cfg: TrainConfig | Mapping[str, Any] | None = None, model_overrides: dict[str, Any] | None = None,
          **kwargs: Any) -> TrainResult:
    """Build a :class:`Trainer` and run it (and release its folder). See
    ``Trainer`` for the options."""
    trainer = Trainer(cfg, model_overrides, **kwargs)
    try:
        return trainer.run()
    finally:
        trainer.close()
