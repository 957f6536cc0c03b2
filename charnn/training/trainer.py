"""The truncated-BPTT training loop.

It prints nothing: it reports through a callback that receives plain event
dicts (``kind`` = status | start | note | log | eval | checkpoint | warning |
end), which the CLI renders with rich and tests inspect directly. It is
DDP-aware: under ``torchrun`` each rank trains its own share of the streams
and rank 0 alone evaluates, writes and reports. The budget and schedule live
in ``schedule``, the output folder in ``runfolder``, the run's position in
and out of a checkpoint in ``train_state``, resume's option merging next to
``TrainConfig``, the model size rule in ``sizing`` (fed this run's facts by
``choices``), and what evaluating costs and when it happens in ``validation``.
"""

from __future__ import annotations

import copy
import math
import os
import signal
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..storage import checkpoint as ckpt_mod
from . import choices
from . import state as train_state
from .state import LoopPosition
from ..model.config import ModelConfig
from .config import TrainConfig, given_options, merge_resume
from ..text.data import (BUILTIN_NAME, IGNORE_INDEX, Corpus, builtin_corpus_path, cache_dir,
                   corpus_name, encode_corpus, make_batcher, read_corpus, split_ids)
from ..model.devices import resolve_device
from ..errors import (CharnnError, CheckpointError, ConfigError, DataError, FolderLockedError, FolderTakenError,
                     RunFolderError, TrainingError, safe_display, shell_arg)
from .finetune import check_arch, fine_tune_start
from ..model.rnn import TRAIN_MEMORY_FACTOR, CharRNN, State, check_memory, detach_state, select_streams
from ..storage.runfolder import RunFolder, choose_out_dir
from ..safe_files import serialize
# DistInfo, parse_duration and lr_factor are re-exported for the API and the tests.
from ..model.precision import autocast, autocast_precision, emulated_bf16, kernels_for
from .runtime import DistInfo, StopSignals, setup_distributed  # noqa: F401
from .schedule import SPEED_PROBE_STEPS, Budget, lr_factor, parse_duration  # noqa: F401
from ..text.tokenizer import CharTokenizer
from .validation import Validation

Callback = Callable[[dict[str, Any]], None]
MAX_METRIC_ROWS = 2000  # the checkpoint keeps a short history; the JSONL log keeps all
TRAINING_ONLY_KEYS = ("optimizer_state", "scheduler_state")  # in last.pt and step files, not best.pt


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


def _make_optimizer(model: CharRNN, cfg: TrainConfig) -> torch.optim.AdamW:
    # Decay the weight matrices; leave biases and the embedding alone.
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and not name.startswith("embedding") else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))


class Trainer:
    """One training run: set up in ``__init__`` (data, model, resume, output
    folder), trained by :meth:`run`.

    ``cfg`` is a :class:`TrainConfig`. With ``resume``, the run's own options
    come from the checkpoint and ``cfg`` gives only what should change: a
    mapping of the options the user passed (what the CLI hands over), or a
    whole TrainConfig whose every field counts as given (see
    :func:`charnn.config.merge_resume`: changing what defines the run is
    refused). ``handle_sigint``: SIGINT, SIGTERM and SIGHUP save and stop.
    ``overwrite``: a new run may replace the run in an explicit ``out`` folder.
    """

    def __init__(self, cfg: TrainConfig | Mapping[str, Any] | None = None,
                 model_overrides: dict[str, Any] | None = None, *,
                 resume: str | os.PathLike | None = None, init_from: str | os.PathLike | None = None,
                 extend_vocab: bool = False, callback: Callback | None = None,
                 handle_sigint: bool = True, cache: bool = True, overwrite: bool = False):
        if resume and init_from:
            raise ConfigError("--resume and --init-from exclude each other; --resume continues a run, "
                              "--init-from starts a new one from its weights")
        self.callback = callback or (lambda event: None)
        self.handle_sigint = handle_sigint
        self.notes: list[str] = []  # said once at start: where it writes, what changed on resume
        self.changed: list[str] = []
        self.pos = LoopPosition()
        self.folder: RunFolder | None = None
        overrides = {k: v for k, v in (model_overrides or {}).items() if v is not None}
        ModelConfig(**{"vocab_size": 1, **{k: v for k, v in overrides.items()
                                           if k in ModelConfig.__dataclass_fields__}}).validate()

        # -- options: a new run's, or the resumed run's with the given ones on top
        resumed = ckpt_mod.load(resume) if resume else None
        if resumed is not None:
            given = given_options(cfg) if isinstance(cfg, TrainConfig) else dict(cfg or {})
            check_arch(overrides, resumed.model_config, Path(resume), "cannot resume from",
                        "A resumed run keeps its model; drop those options, or start a new run from its "
                        f"weights with --init-from {shell_arg(resume)}")
            try:
                saved = TrainConfig.from_dict(resumed.train_config)
            except (ConfigError, TypeError) as e:
                raise CheckpointError(f"{resume}: its training options are invalid ({e}); it cannot be "
                                      f"resumed. --init-from {shell_arg(resume)} starts a new run from its weights") from None
            cfg, self.changed = merge_resume(saved, given)
            self.pos.resumed(resumed.train_state, self.changed)
            if "out" not in given:
                cfg.out = str(Path(resume).parent)  # the run's folder, wherever it is now
        elif isinstance(cfg, Mapping) or cfg is None:
            cfg = TrainConfig(**dict(cfg or {}))
        self.cfg = cfg.validate()
        if not (cfg.max_steps or cfg.epochs or cfg.time_limit):
            raise ConfigError("no training budget: pass --max-steps, --epochs or --time-limit")
        self.dist = setup_distributed(cfg.device)
        if cfg.batch_size % self.dist.world_size:
            raise ConfigError(f"--batch-size {cfg.batch_size} must be divisible by the number of "
                              f"processes ({self.dist.world_size}); each takes an equal share of streams")

        # -- where it writes: chosen, locked and checked before reading (so the
        # corpus never includes it and no other run can take it meanwhile)
        self._resumed = resumed is not None
        self._saved = False  # a checkpoint was written by this run
        self._open_folder(resumed, overwrite)
        try:
            self._setup(resumed, init_from, overrides, extend_vocab, cache)
        except BaseException:
            self.close()  # a new run that failed here leaves no trace in its folder
            raise

    def _open_folder(self, resumed: ckpt_mod.Checkpoint | None, overwrite: bool) -> None:
        """Rank 0 chooses, locks and checks the output folder; under torchrun
        the other ranks take its choice (or its error). Checking the folder
        themselves raced with rank 0's opening it: a busy machine made rank 1
        find the folder rank 0 had just taken, and it refused ("already holds
        a training run") or, for the default folder, chose the next one."""
        cfg = self.cfg
        failure: BaseException | None = None
        if self.dist.is_main:
            try:
                self._open_main_folder(resumed, overwrite)
            except BaseException as e:  # the other ranks must hear of it, not wait for the folder
                failure = e
        if self.dist.enabled:
            shared: list[str | None] = [None, None]
            if self.dist.is_main:
                shared = [None, str(failure)] if failure is not None else [str(self.out_dir), None]
            dist.broadcast_object_list(shared, src=0)
            if not self.dist.is_main:
                if shared[1] is not None:
                    raise RunFolderError(shared[1])  # (rank 0 says it)
                self.out_dir = Path(shared[0])
        if failure is not None:
            raise failure
        cfg.out = str(self.out_dir)

    def _open_main_folder(self, resumed: ckpt_mod.Checkpoint | None, overwrite: bool) -> None:
        cfg = self.cfg
        requested = Path(cfg.out) if cfg.out else None
        default = Path("checkpoints") / (cfg.corpus_name or (corpus_name(cfg.corpus) if cfg.corpus else BUILTIN_NAME))
        for _ in range(100):
            self.out_dir, note = choose_out_dir(requested, default, resuming=resumed is not None,
                                                overwrite=overwrite)
            step = int(resumed.train_state.get("step", 0)) if resumed is not None else None
            try:
                self.folder = RunFolder(self.out_dir, resuming_at_step=step, overwrite=overwrite).open()
            except (FolderTakenError, FolderLockedError):
                if requested is not None or resumed is not None:
                    raise
                continue  # another new run took the default folder a moment ago: the next one
            self.notes.extend([note] if note else [])
            self.notes.extend(self.folder.notes)
            return
        raise RunFolderError(f"could not find a free output folder next to {default}; pass --out")

    def _setup(self, resumed: ckpt_mod.Checkpoint | None, init_from: str | os.PathLike | None,
               overrides: dict[str, Any], extend_vocab: bool, cache: bool) -> None:
        cfg = self.cfg
        resume = resumed.path if resumed is not None else None
        # -- data ------------------------------------------------------------
        self.corpus = self._read_corpus(resume if resumed is not None else None)
        cfg.corpus_hash = self.corpus.sha256
        cfg.corpus_name = cfg.corpus_name or self.corpus.name
        for w in self.corpus.warnings:
            self._emit("warning", message=w)

        # -- vocabulary and data --------------------------------------------
        if resumed is not None:
            tokenizer = resumed.tokenizer
        elif init_from:
            tokenizer, model, notes = fine_tune_start(init_from, self.corpus.text, overrides, extend_vocab)
            cfg.size_reason = f"the shape of {Path(init_from).name} (--init-from)" if cfg.size == "auto" else ""
            for message in notes:
                self._emit("warning", message=message)
        else:
            tokenizer = CharTokenizer.from_text(self.corpus.text)
        self.tokenizer = tokenizer
        ids = encode_corpus(self.corpus, tokenizer, cache=cache, progress=self._status)
        self.train_ids, self.val_ids = split_ids(ids, cfg.val_fraction)
        if cfg.val_fraction > 0 and len(self.val_ids) < 2:
            raise DataError(f"the corpus has {len(ids):,} characters: too few to hold out "
                            f"{cfg.val_fraction:.0%} for validation; add text or pass --val-fraction 0")
        if resumed is not None and cfg.shuffle is None:  # only a hand-made file: charnn records its choice
            cfg.shuffle = False
        # With the order still to choose (below), the first batch and the
        # budget's epochs come from the in-order batcher until then.
        self.batcher = make_batcher(self.train_ids, cfg.batch_size, cfg.seq_len, shuffle=bool(cfg.shuffle),
                                    seed=cfg.seed)
        self.budget = Budget(cfg, len(self.batcher))
        per_rank = cfg.batch_size // self.dist.world_size
        self.rows = slice(self.dist.rank * per_rank, (self.dist.rank + 1) * per_rank)

        # -- device, precision ------------------------------------------------
        self.device = resolve_device(cfg.device)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        self.precision = autocast_precision(cfg.precision, self.device)
        if emulated_bf16(self.device, self.precision):
            self.notes.append("this CPU has no native bf16 (AVX512-BF16/AMX): bf16 is emulated and slower "
                              "than fp32 here")

        # -- the model: the run's own, the one started from, or a new one ----
        probe_seconds = 0.0
        auto_epochs = None  # the epochs --size auto estimated its budget buys
        if resumed is not None:
            model = resumed.build_model("cpu")
        elif not init_from:
            if cfg.size == "auto":
                started = time.perf_counter()
                x, y = self.batcher.chunk(0)
                probe = choices.ProbeSetup(x[self.rows], y[self.rows], self.device, self.precision,
                                           lambda m: _make_optimizer(m, cfg))
                choice = choices.choose_size(cfg, overrides, planned_steps=self.budget.planned_steps(),
                                             train_chars=len(self.train_ids), vocab_size=tokenizer.vocab_size,
                                             probe=probe, dist_info=self.dist, status=self._status)
                probe_seconds = time.perf_counter() - started
                if cfg.time_limit:  # the scheduler's first factor (below) already skips it; run() adds the rest
                    cfg.setup_seconds = round(probe_seconds, 6)
                overrides = {**overrides, **choice.overrides()}
                cfg.size_reason = choice.reason
                auto_epochs = choice.epochs
                self.notes.append(f"size: {choice.reason}")
            mc = ModelConfig(**{k: v for k, v in overrides.items() if k in ModelConfig.__dataclass_fields__})
            mc.vocab_size = tokenizer.vocab_size
            check_memory(mc.validate(), factor=TRAIN_MEMORY_FACTOR)  # before allocating anything
            torch.manual_seed(cfg.seed)  # identical initial weights on every rank
            model = CharRNN(mc)
        if cfg.shuffle is None:  # a new run: the reading order follows the epochs its budget buys
            cfg.shuffle, why = choices.choose_order(cfg, epochs=auto_epochs, train_chars=len(self.train_ids),
                                                    planned_steps=self.budget.planned_steps())
            self.notes.append(f"reading: {why}")
            self.batcher = make_batcher(self.train_ids, cfg.batch_size, cfg.seq_len, shuffle=cfg.shuffle,
                                        seed=cfg.seed)
            self.budget = Budget(cfg, len(self.batcher))
        self.model = model.to(self.device).train()
        self.ddp_model: nn.Module = self.model
        if self.dist.enabled:
            self.ddp_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        # -- position ---------------------------------------------------------
        self.pos.elapsed = probe_seconds
        self.metrics: list[dict[str, Any]] = []
        self.state: State | None = None
        self.optimizer = _make_optimizer(self.model, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_lambda)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")
        if resumed is not None:
            carried = train_state.restore(resumed, self.pos, self.optimizer, self.scheduler, chunks=len(self.batcher),
                                          batch_size=cfg.batch_size, device=self.device)
            self.metrics = list(resumed.metrics)
            self.state = None if carried is None else select_streams(carried, self.rows)
        self._good: dict[str, Any] | None = None  # last good in-memory state (non-finite guard)
        self._last_eval_step = -1
        self.validation = Validation(cfg, self.val_ids, self.dist, self.device, self.precision)

    def __getattr__(self, name: str) -> Any:
        """The position's fields read as the trainer's own (``t.step``, ``t.epoch``, ...)."""
        pos = self.__dict__.get("pos")
        if pos is not None and name in LoopPosition.__dataclass_fields__:
            return getattr(pos, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # -- setup helpers ---------------------------------------------------------
    def _read_corpus(self, resume: str | os.PathLike | None) -> Corpus:
        cfg = self.cfg
        exclude = [self.out_dir, cache_dir()]
        if not cfg.corpus:
            corpus = read_corpus([builtin_corpus_path(self._status)], exclude=exclude, progress=self._status)
            corpus.name = BUILTIN_NAME
        else:
            try:
                corpus = read_corpus(cfg.corpus, encoding=cfg.encoding, exclude=exclude, progress=self._status)
            except DataError as e:
                if resume is None:
                    raise
                raise DataError(f"{e}. To resume, pass the run's corpus at its new location: "
                                f"charnn train PATH --resume {shell_arg(resume)}") from None
        if resume is not None and cfg.corpus_hash and corpus.sha256 != cfg.corpus_hash:
            raise DataError(f"the corpus {', '.join(cfg.corpus) or '(built-in)'} is not the text this run was "
                            "trained on (it changed, or is another text); an exact resume needs the same text. "
                            f"To train on this text from the checkpoint's weights, use --init-from {shell_arg(resume)}")
        return corpus

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
        if self.cfg.setup_seconds:
            warm = self.budget.progress(self.pos.step, self.epochs_done(),
                                        max(0.0, self.pos.elapsed - self.cfg.setup_seconds))
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
        """Append to the checkpoint's short history and the JSONL log."""
        self.metrics.append(row)
        if len(self.metrics) > MAX_METRIC_ROWS:
            # Thin the older half of the train rows; keep every eval row.
            head, tail = self.metrics[: MAX_METRIC_ROWS // 2], self.metrics[MAX_METRIC_ROWS // 2 :]
            head = [r for i, r in enumerate(head) if "val_loss" in r or i % 2 == 0]
            self.metrics = head + tail
        if self.folder is not None:
            problem = self.folder.log(row)
            if problem:
                self._emit("warning", message=problem)

    # -- checkpoints ------------------------------------------------------------------
    def train_state(self) -> dict[str, Any]:
        """The run's position for the checkpoint (see :mod:`charnn.train_state`)."""
        carried = train_state.gather_carried(self.state, self.dist)
        return train_state.collect(self.pos, self.precision, self.device, carried)

    def _payload(self) -> dict[str, Any]:
        return ckpt_mod.build_payload(
            self.model, self.tokenizer, train_config=self.cfg.to_dict(), train_state=self.train_state(),
            metrics=self.metrics, optimizer_state=self.optimizer.state_dict(),
            scheduler_state=self.scheduler.state_dict())

    def save(self, improved: bool) -> Path | None:
        """last.pt always, best.pt when validation improved, step-N.pt with --keep.
        Collective under DDP (the carried state is gathered); rank 0 writes."""
        payload = self._payload()
        if self.folder is None:
            return None
        self._saved = True
        data = serialize(payload)  # once, for last.pt and the step file
        written = [self.folder.save(data, "last.pt")]
        if improved or self.cfg.val_fraction == 0:
            # best.pt is for sampling and evaluation: without the optimizer's
            # moments it is a third of the size. Runs resume from last.pt.
            model_only = {k: v for k, v in payload.items() if k not in TRAINING_ONLY_KEYS}
            written.append(self.folder.save(serialize(model_only), "best.pt"))
        if self.cfg.keep:
            written.append(self.folder.save_step(data, self.pos.step, self.cfg.keep))
        self._emit("checkpoint", step=self.pos.step, paths=[str(p) for p in written])
        return written[0]

    # -- evaluation -----------------------------------------------------------------------
    def evaluate(self) -> float:
        """Validation loss over the evaluation slice, state carried; agreed by all ranks."""
        return self.validation.evaluate(self.model)

    def _evaluate_and_save(self) -> Path | None:
        self._last_eval_step = self.pos.step
        if self.validation.seconds() > 1.0:
            self._status(f"evaluating at step {self.pos.step:,}")  # only when it takes a while
        val = self.evaluate() if self.cfg.val_fraction > 0 else math.nan
        improved = math.isfinite(val) and val < self.pos.best_val
        if improved:
            self.pos.best_val = val
            self.pos.evals_without_improvement = 0
        elif math.isfinite(val):
            self.pos.evals_without_improvement += 1
        row = {"step": self.pos.step, "epoch": self.epochs_done(),
               "val_loss": val, "val_bpc": val / math.log(2) if math.isfinite(val) else None,
               "best_val_loss": None if math.isinf(self.pos.best_val) else self.pos.best_val,
               "elapsed": self.pos.elapsed}
        self._log_row(row)
        path = self.save(improved)
        self._snapshot_good()
        self._emit("eval", **row, improved=improved, model=self.model, tokenizer=self.tokenizer,
                   device=self.device)
        return path

    # -- the loop ---------------------------------------------------------------------------
    def _budget_left(self, reserve: float) -> str | None:
        return self.budget.ended(self.pos.step, self.epochs_done(), self.pos.elapsed, reserve)

    def _agree(self, flag: bool) -> bool:
        """Every rank takes the same decision (stop, time up, Ctrl-C)."""
        if not self.dist.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def _snapshot_good(self) -> None:
        self._good = {"model": copy.deepcopy(self.model.state_dict()),
                      "optimizer": copy.deepcopy(self.optimizer.state_dict())}

    def _recover(self) -> None:
        """Repeated non-finite steps: back to the last good state, half the LR."""
        last = self.out_dir / "last.pt"
        if self._good is None or self.pos.restores >= 3:
            where = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was written yet"
            raise TrainingError(
                f"training diverged: the loss or gradients stayed NaN/inf at step {self.pos.step} even "
                f"after {self.pos.restores} restore(s) with a lower learning rate; {where}. "
                "Try a lower --lr or a smaller --grad-clip")
        self.model.load_state_dict(self._good["model"])
        self.optimizer.load_state_dict(self._good["optimizer"])
        self.pos.restores += 1
        self.pos.lr_scale *= 0.5
        self.state = None
        with warnings.catch_warnings():  # no optimizer step since the restore: expected here
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
            self.scheduler.step()  # apply the lower learning rate now
        self._emit("warning", message=f"non-finite loss at step {self.pos.step}: restored the last good "
                                      f"state and halved the learning rate (x{self.pos.lr_scale:g})")

    def _train_step(self, x: torch.Tensor, y: torch.Tensor, n_valid_global: int) -> tuple[float, float, bool]:
        """One TBPTT chunk: forward, backward, clip, step. Returns (loss, grad norm, finite)."""
        cfg = self.cfg
        x = x[self.rows].to(self.device, non_blocking=True)
        y = y[self.rows].to(self.device, non_blocking=True)
        with autocast(self.device, self.precision):
            logits, state = self.ddp_model(x, self.state)  # (b, T, V)
        # Sum over this rank's characters, divided by the global count (times
        # the world size, which DDP's gradient average divides back out): the
        # same loss as one process over the whole batch, padding excluded.
        nll = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX,
                              reduction="sum")
        loss = nll * (self.dist.world_size / max(1, n_valid_global))
        self.state = detach_state(state)  # TBPTT: carry the values, cut the graph
        self.optimizer.zero_grad(set_to_none=True)
        with kernels_for(self.device, self.precision):
            self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        # Clip after backward and before the step: one global L2 norm over all
        # gradients, so a rare exploding step cannot wreck the weights.
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))
        finite = math.isfinite(norm) and bool(torch.isfinite(loss))
        if self.dist.enabled:
            finite = not self._agree(not finite)
        if finite:
            # An absurd --lr can turn a finite gradient into inf weights, or
            # overflow the update itself: count that step as non-finite too, so
            # the guard restores the last good state before anything is saved.
            try:
                self.scaler.step(self.optimizer)
            except RuntimeError as e:
                if "overflow" not in str(e):
                    raise
                finite = False
            else:
                finite = bool(torch.stack([torch.isfinite(p).all() for p in self.model.parameters()]).all())
        self.scaler.update()
        # The mean loss over the whole batch: each rank holds its share of it.
        reported = loss.detach() / self.dist.world_size
        if self.dist.enabled:
            dist.all_reduce(reported)
        return float(reported), norm, finite

    def close(self) -> None:
        """Release the output folder and leave the process group (under torchrun).
        A run that wrote no checkpoint leaves no trace of itself in the folder."""
        if self.folder is not None:
            if self._saved:
                self.folder.close()
            else:  # undoes only what opening it added (a resumed run's folder keeps its files)
                self.folder.abandon()
        if self.dist.enabled and dist.is_initialized():
            dist.barrier()  # no rank tears down gloo while another still talks to it
            dist.destroy_process_group()

    def run(self) -> TrainResult:
        cfg = self.cfg  # (a budget is checked in __init__, before the folder is opened)
        run_start, elapsed_base = time.perf_counter(), self.pos.elapsed
        self.validation.calibrate(self.model)
        guessed_reserve, notes = self.validation.plan(self.budget, self.pos.step, self.pos.elapsed)
        self.notes.extend(notes)
        spent = self._budget_left(guessed_reserve)  # a resumed run's budget may be used up
        if spent:
            raise TrainingError(self.budget.spent_message(spent, self.pos.step, self.pos.elapsed,
                                                          str(self.out_dir / "last.pt"), guessed_reserve))
        self._emit("start", config=cfg.to_dict(), model_config=self.model.config.to_dict(),
                   parameters=self.model.num_parameters(), device=str(self.device),
                   precision=self.precision, train_chars=len(self.train_ids), val_chars=len(self.val_ids),
                   eval_chars=self.validation.chars(),
                   files=list(self.corpus.files), skipped=list(self.corpus.skipped),
                   vocab_size=self.tokenizer.vocab_size, out_dir=str(self.out_dir),
                   resumed_at=self.pos.step, world_size=self.dist.world_size,
                   chunks_per_epoch=len(self.batcher), changed=list(self.changed), notes=list(self.notes))
        for message in self.notes:
            self._emit("note", message=message)
        self._snapshot_good()
        start_step = self.pos.step
        if start_step == 0 and cfg.time_limit:  # a new run: its warmup starts now
            cfg.setup_seconds = round(elapsed_base + time.perf_counter() - run_start, 6)
        eval_time = None  # seconds one evaluation + save takes, measured
        consecutive_bad = 0
        window_loss, window_steps, window_chars = 0.0, 0, 0
        window_start = loop_start = time.perf_counter()
        # --time-limit with automatic --eval-every: the interval is chosen from the
        # median time of the first steps, and may grow at each evaluation.
        auto_every = cfg.eval_every is None
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
                if self._agree(signals is not None and signals.hit):
                    stopped = "interrupted"
                if self._agree(stopped is not None):
                    stopped = stopped or "another rank's budget"
                    break
                if self.pos.chunk >= len(self.batcher):  # epoch boundary: reset the carried state
                    self.pos.epoch += 1
                    self.pos.chunk = 0
                    self.state = None
                    continue
                t_step = time.perf_counter()
                x, y = self.batcher.chunk(self.pos.chunk, self.pos.epoch)
                n_valid = int((y != IGNORE_INDEX).sum())
                if self.batcher.starts_block(self.pos.chunk):  # new text in every row
                    self.state = None
                loss, norm, finite = self._train_step(x, y, n_valid)
                self.pos.chunk += 1
                self.pos.elapsed = elapsed_base + time.perf_counter() - run_start
                if cfg.eval_every is None:
                    step_times.append(time.perf_counter() - t_step)
                if not finite:
                    self.pos.nonfinite_skipped += 1
                    consecutive_bad += 1
                    self.state = None  # a NaN state would poison every later chunk
                    self._emit("warning", message=f"step {self.pos.step}: non-finite loss or gradient; step skipped")
                    if consecutive_bad >= cfg.nan_tolerance:
                        consecutive_bad = 0
                        self._recover()
                    continue
                consecutive_bad = 0
                self.pos.step += 1
                self.scheduler.step()
                if cfg.grad_clip and norm > cfg.grad_clip:
                    self.pos.clipped_steps += 1
                self.pos.chars_seen += n_valid
                window_loss += loss
                window_steps += 1
                window_chars += n_valid
                if cfg.eval_every is None and self.pos.step - start_step >= SPEED_PROBE_STEPS:
                    for message in self.validation.choose_every(self.budget, self.pos.step, self.pos.elapsed,
                                                                statistics.median(step_times), reserve):
                        self._emit("note", message=message)
                if self.pos.step % cfg.log_every == 0:
                    now = time.perf_counter()
                    row = {"step": self.pos.step, "epoch": self.epochs_done(),
                           "train_loss": window_loss / window_steps,
                           "lr": self.optimizer.param_groups[0]["lr"], "grad_norm": norm,
                           "clipped_share": self.pos.clipped_steps / max(1, self.pos.step),
                           "chars_per_sec": window_chars / max(1e-9, now - window_start),
                           "elapsed": self.pos.elapsed}
                    self._log_row(row)
                    self._emit("log", **row, progress=self.progress(), nonfinite=self.pos.nonfinite_skipped)
                    window_loss, window_steps, window_chars = 0.0, 0, 0
                    window_start = now
                if cfg.eval_every and self.pos.step % cfg.eval_every == 0:
                    t_eval = time.perf_counter()
                    last_path = self._evaluate_and_save()
                    eval_time = time.perf_counter() - t_eval
                    self.pos.elapsed = elapsed_base + time.perf_counter() - run_start
                    window_start += eval_time
                    eval_seconds += eval_time
                    if auto_every:
                        per_step = (time.perf_counter() - loop_start - eval_seconds) / (self.pos.step - start_step)
                        for message in self.validation.grow_every(self.budget, self.pos.step, self.pos.elapsed,
                                                                  per_step, eval_time):
                            self._emit("note", message=message)
                    if cfg.patience and self.pos.evals_without_improvement >= cfg.patience:
                        stopped = "patience"
                        break
            if self.pos.step == start_step and stopped != "interrupted":
                hint = f", for example --time-limit {int(2 * cfg.time_limit + 30)}s" if cfg.time_limit else ""
                raise TrainingError(f"no training step fit in the budget; nothing was written. Give a larger "
                                    f"budget{hint}.")
            if stopped == "interrupted":
                last_path = self.save(improved=False)  # quickly: no evaluation after a stop signal
            elif self._last_eval_step != self.pos.step:  # (-1 until this run evaluates)
                # Final evaluation and checkpoint, unless the last step just had one.
                last_path = self._evaluate_and_save()
        finally:
            if signals:
                signals.__exit__()
        self.pos.elapsed = elapsed_base + time.perf_counter() - run_start
        best = self.out_dir / "best.pt"
        result = TrainResult(out_dir=self.out_dir, best_path=best if best.exists() else None,
                             last_path=last_path, step=self.pos.step, best_val_loss=self.pos.best_val,
                             stopped_because=stopped or "budget", train_state=self.train_state())
        self._emit("end", step=self.pos.step, best_val_loss=self.pos.best_val, stopped_because=result.stopped_because,
                   out_dir=str(self.out_dir), elapsed=self.pos.elapsed, chars_seen=self.pos.chars_seen,
                   nonfinite=self.pos.nonfinite_skipped, steps_this_run=self.pos.step - start_step)
        if stopped == "interrupted" or (signals is not None and signals.hit):
            signum = signals.signum if signals is not None and signals.signum else signal.SIGINT
            name = signal.Signals(signum).name
            last = self.out_dir / "last.pt"
            raise TrainingInterrupted(
                f"interrupted by {'Ctrl-C' if name == 'SIGINT' else name} at step {self.pos.step}; saved "
                f"{safe_display(last, None)}.\nContinue with: charnn train --resume {shell_arg(last)}", last, signum)
        return result


def train(cfg: TrainConfig | Mapping[str, Any] | None = None, model_overrides: dict[str, Any] | None = None,
          **kwargs: Any) -> TrainResult:
    """Build a :class:`Trainer` and run it (and release its folder). See
    ``Trainer`` for the options."""
    trainer = Trainer(cfg, model_overrides, **kwargs)
    try:
        return trainer.run()
    finally:
        trainer.close()
