"""The truncated-BPTT training loop.

It prints nothing: it reports through a callback that receives plain event
dicts (``kind`` = start | log | eval | checkpoint | warning | end), which the
CLI renders with rich and tests inspect directly. It is DDP-aware: under
``torchrun`` each rank trains its own share of the streams and rank 0 alone
evaluates, writes and reports.
"""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import checkpoint as ckpt_mod
from .config import ModelConfig, TrainConfig
from .data import (IGNORE_INDEX, Corpus, StreamBatcher, builtin_corpus_path, encode_corpus,
                   read_corpus, split_ids)
from .devices import cpu_has_bf16, resolve_device
from .errors import CharnnError, CheckpointError, ConfigError, DataError, TrainingError
from .evaluate import evaluate_ids
from .model import CharRNN, State, detach_state, select_streams
from .tokenizer import CharTokenizer

Callback = Callable[[dict[str, Any]], None]
ARCH_FIELDS = ("cell", "embedding_dim", "hidden_size", "num_layers")
MAX_METRIC_ROWS = 2000  # the checkpoint keeps a short history; the JSONL log keeps all


class TrainingInterrupted(CharnnError):
    """Ctrl-C: the run saved ``last.pt`` and stopped. The CLI exits 130."""

    def __init__(self, message: str, path: Path | None):
        super().__init__(message)
        self.path = path


# ---------------------------------------------------------------------------
# Devices, precision, distributed
# ---------------------------------------------------------------------------

def resolve_precision(name: str, device: torch.device) -> str:
    """fp32 | bf16 | fp16 for this device; ``auto`` picks the fastest that
    trains as well as fp32 (see the README's benchmark)."""
    if name == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        if device.type == "cpu" and cpu_has_bf16():
            return "bf16"
        return "fp32"
    if name not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"unknown precision {name!r}; choose auto, fp32, bf16 or fp16")
    if name == "fp16" and device.type != "cuda":
        raise ConfigError("--precision fp16 needs a CUDA GPU; use bf16 or fp32 on this device")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("this GPU does not support bf16; use --precision fp16 or fp32")
    return name


_AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup_distributed(device_name: str) -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name in ("auto", "cuda") and torch.cuda.is_available()
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank)


# ---------------------------------------------------------------------------
# Budgets and the learning-rate schedule
# ---------------------------------------------------------------------------

def parse_duration(text: str | float | int | None) -> float:
    """'90', '90s', '5m', '1.5h', '1h30m' -> seconds. 0 or empty = none."""
    if text is None or text == "":
        return 0.0
    if isinstance(text, (int, float)):
        seconds = float(text)
    else:
        import re

        s = text.strip().lower()
        parts = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?", s)
        if not s or not parts or not any(parts.groups()):
            raise ConfigError(f"cannot read time limit {text!r}; write it like 30s, 5m, 2h or 1h30m")
        h, m, sec = (float(g) if g else 0.0 for g in parts.groups())
        seconds = h * 3600 + m * 60 + sec
    if not math.isfinite(seconds) or seconds < 0:
        raise ConfigError(f"time limit must be a positive duration, got {text!r}")
    return seconds


def lr_factor(step: int, progress: float, warmup_steps: int, min_ratio: float) -> float:
    """Linear warmup over ``warmup_steps``, then cosine decay to ``min_ratio``
    as ``progress`` (0..1 of whichever budget is nearest its end) goes to 1."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(max(progress, 0.0), 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------

@dataclass
class TrainResult:
    out_dir: Path
    best_path: Path | None
    last_path: Path | None
    step: int
    best_val_loss: float
    stopped_because: str
    train_state: dict[str, Any] = field(default_factory=dict)


class _SigintFlag:
    """First Ctrl-C asks the loop to save and stop at the next step boundary;
    a second one interrupts at once."""

    def __init__(self) -> None:
        self.hit = False
        self._old: Any = None

    def __enter__(self) -> "_SigintFlag":
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.hit:
            raise KeyboardInterrupt
        self.hit = True

    def __exit__(self, *exc: Any) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def _make_optimizer(model: CharRNN, cfg: TrainConfig) -> torch.optim.AdamW:
    # Decay the weight matrices; leave biases and the embedding alone.
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and not name.startswith("embedding") else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))


def _extend_vocab(model: CharRNN, old: CharTokenizer, new: CharTokenizer) -> CharRNN:
    """A copy of ``model`` whose embedding and head rows follow ``new`` (a
    superset of ``old``); rows for new characters start fresh."""
    config = copy.deepcopy(model.config)
    config.vocab_size = new.vocab_size
    grown = CharRNN(config)
    grown.rnn.load_state_dict(model.rnn.state_dict())
    with torch.no_grad():
        grown.head.weight.mul_(0.0)
        grown.head.bias.fill_(float(model.head.bias.min()))
        for ch, old_id in old.stoi.items():
            new_id = new.stoi[ch]
            grown.embedding.weight[new_id] = model.embedding.weight[old_id]
            grown.head.weight[new_id] = model.head.weight[old_id]
            grown.head.bias[new_id] = model.head.bias[old_id]
    return grown


def _check_arch(overrides: dict[str, Any], config: ModelConfig, source: Path, what: str) -> None:
    clash = [f"--{k.replace('_', '-')} {overrides[k]} (checkpoint: {getattr(config, k)})"
             for k in ARCH_FIELDS if overrides.get(k) is not None and overrides[k] != getattr(config, k)]
    if clash:
        raise ConfigError(
            f"{what} {source}: its architecture differs from the options given: "
            + "; ".join(clash) + ". Drop those options or start a new run"
        )


class Trainer:
    def __init__(self, cfg: TrainConfig, model_overrides: dict[str, Any] | None = None, *,
                 resume: str | os.PathLike | None = None, init_from: str | os.PathLike | None = None,
                 extend_vocab: bool = False, callback: Callback | None = None,
                 handle_sigint: bool = True, cache: bool = True):
        if resume and init_from:
            raise ConfigError("--resume and --init-from exclude each other; --resume continues a run, "
                              "--init-from starts a new one from its weights")
        self.callback = callback or (lambda event: None)
        self.handle_sigint = handle_sigint
        self.dist = setup_distributed(cfg.device)
        overrides = {k: v for k, v in (model_overrides or {}).items() if v is not None}
        self._validate(cfg, overrides)

        resumed = ckpt_mod.load(resume) if resume else None
        if resumed is not None:
            _check_arch(overrides, resumed.model_config, Path(resume), "cannot resume from")
            saved = TrainConfig.from_dict(resumed.train_config)
            # A corpus named with --resume must be the run's own text (it may have
            # moved: the content hash decides); with none, the recorded paths.
            given_corpus = list(cfg.corpus)
            # Options that shape the data or the model stay as they were; budgets,
            # intervals and the output folder may change.
            for name in ("seq_len", "batch_size", "val_fraction", "seed", "corpus", "encoding",
                         "corpus_hash", "corpus_name"):
                setattr(cfg, name, getattr(saved, name))
            if given_corpus:
                cfg.corpus = given_corpus
            if not (cfg.max_steps or cfg.epochs or cfg.time_limit):  # no new budget: the old one
                cfg.max_steps, cfg.epochs, cfg.time_limit = saved.max_steps, saved.epochs, saved.time_limit
            if not cfg.out:
                cfg.out = str(Path(resume).parent)
        self.cfg = cfg

        # -- data ------------------------------------------------------------
        if cfg.corpus:
            try:
                corpus = read_corpus(cfg.corpus, encoding=cfg.encoding)
            except DataError as e:
                if resumed is None:
                    raise
                raise DataError(f"{e}. To resume, pass the run's corpus at its new location: "
                                f"charnn train PATH --resume {resume}") from None
        else:
            corpus = read_corpus([builtin_corpus_path()])
            corpus.name = "python-stdlib"
        if resumed is not None and cfg.corpus_hash and corpus.sha256 != cfg.corpus_hash:
            raise DataError(f"the corpus {', '.join(cfg.corpus)} is not the text this run was trained on "
                            "(it changed, or is another text); an exact resume needs the same text. "
                            f"To train on this text from the checkpoint's weights, use --init-from {resume}")
        self.corpus: Corpus = corpus
        cfg.corpus_hash = corpus.sha256
        cfg.corpus_name = cfg.corpus_name or corpus.name
        for w in corpus.warnings:
            self._emit("warning", message=w)

        # -- model and vocabulary -------------------------------------------
        if resumed is not None:
            tokenizer = resumed.tokenizer
            model = resumed.build_model("cpu")
        elif init_from:
            base = ckpt_mod.load(init_from)
            _check_arch(overrides, base.model_config, Path(init_from), "cannot fine-tune from")
            tokenizer, model = base.tokenizer, base.build_model("cpu")
            unknown = tokenizer.unknown_chars(corpus.text)
            if unknown and not extend_vocab:
                tokenizer.encode_array(corpus.text)  # raises the VocabError that names them
            if unknown:
                new_tok = CharTokenizer(sorted(set(tokenizer.chars) | set(unknown)))
                model = _extend_vocab(model, tokenizer, new_tok)
                tokenizer = new_tok
                self._emit("warning", message=f"vocabulary extended by {len(unknown)} characters")
            if overrides.get("dropout") is not None:
                model.config.dropout = overrides["dropout"]
                model = self._rebuild_with_dropout(model)
        else:
            tokenizer = CharTokenizer.from_text(corpus.text)
            mc = ModelConfig(**{k: v for k, v in overrides.items() if k in ModelConfig.__dataclass_fields__})
            mc.vocab_size = tokenizer.vocab_size
            torch.manual_seed(cfg.seed)  # identical initial weights on every rank
            model = CharRNN(mc.validate())
        self.tokenizer = tokenizer
        ids = encode_corpus(corpus, tokenizer, cache=cache)
        self.train_ids, self.val_ids = split_ids(ids, cfg.val_fraction)
        if cfg.val_fraction > 0 and len(self.val_ids) < 2:
            raise DataError(f"the corpus has {len(ids):,} characters: too few to hold out "
                            f"{cfg.val_fraction:.0%} for validation; add text or pass --val-fraction 0")
        if cfg.batch_size % self.dist.world_size:
            raise ConfigError(f"--batch-size {cfg.batch_size} must be divisible by the number of "
                              f"processes ({self.dist.world_size}); each takes an equal share of streams")
        self.batcher = StreamBatcher(self.train_ids, cfg.batch_size, cfg.seq_len)
        per_rank = cfg.batch_size // self.dist.world_size
        self.rows = slice(self.dist.rank * per_rank, (self.dist.rank + 1) * per_rank)

        # -- device, precision, optimizer, schedule -------------------------
        self.device = resolve_device(cfg.device)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        self.precision = resolve_precision(cfg.precision, self.device)
        self.model = model.to(self.device).train()
        self.ddp_model: nn.Module = self.model
        if self.dist.enabled:
            self.ddp_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        # -- position ---------------------------------------------------------
        self.step = 0
        self.epoch = 0
        self.chunk = 0  # next chunk of the current epoch
        self.chars_seen = 0
        self.elapsed = 0.0  # training seconds, across resumes
        self.best_val = math.inf
        self.evals_without_improvement = 0
        self.nonfinite_skipped = 0
        self.clipped_steps = 0
        self.restores = 0
        self.lr_scale = 1.0
        self.metrics: list[dict[str, Any]] = []
        self.state: State | None = None
        self.optimizer = _make_optimizer(self.model, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_lambda)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")
        if resumed is not None:
            self._restore(resumed)
        self.out_dir = Path(cfg.out) if cfg.out else Path("checkpoints") / cfg.corpus_name
        self._check_out_dir()
        self._good: dict[str, Any] | None = None  # last good in-memory state (non-finite guard)
        self._last_eval_step = -1

    # -- setup helpers ---------------------------------------------------------
    @staticmethod
    def _validate(cfg: TrainConfig, overrides: dict[str, Any]) -> None:
        for name in ("seq_len", "batch_size", "eval_every", "log_every"):
            if getattr(cfg, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if cfg.lr <= 0 or not math.isfinite(cfg.lr):
            raise ConfigError(f"--lr must be a positive number, got {cfg.lr}")
        if cfg.grad_clip < 0:
            raise ConfigError("--grad-clip must be 0 (off) or positive")
        for name in ("max_steps", "epochs", "time_limit", "patience", "keep", "sample_every", "warmup_steps"):
            if getattr(cfg, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must not be negative")
        if not 0.0 <= cfg.val_fraction < 1.0:
            raise ConfigError(f"--val-fraction must be in [0, 1), got {cfg.val_fraction}")
        if cfg.patience and cfg.val_fraction == 0:
            raise ConfigError("--patience needs a validation split; drop --val-fraction 0")
        ModelConfig(**{**{"vocab_size": 1}, **{k: v for k, v in overrides.items()
                                               if k in ModelConfig.__dataclass_fields__}}).validate()

    def _rebuild_with_dropout(self, model: CharRNN) -> CharRNN:
        rebuilt = CharRNN(model.config)
        rebuilt.load_state_dict(model.state_dict())
        return rebuilt

    def _check_out_dir(self) -> None:
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise ConfigError(f"--out {self.out_dir} is a file; give a folder for the checkpoints")

    def _restore(self, resumed: ckpt_mod.Checkpoint) -> None:
        ts = resumed.train_state
        data = resumed.data
        if "optimizer_state" not in data or "step" not in ts:
            raise CheckpointError(f"{resumed.path} has no training state to resume from (it may be an "
                                  "exported model); use --init-from to start a new run from its weights")
        self.optimizer.load_state_dict(data["optimizer_state"])
        if "scheduler_state" in data:
            self.scheduler.load_state_dict(data["scheduler_state"])
        for key in ("step", "epoch", "chunk", "chars_seen", "elapsed", "best_val",
                    "evals_without_improvement", "nonfinite_skipped", "clipped_steps",
                    "restores", "lr_scale"):
            if ts.get(key) is not None:
                setattr(self, key, type(getattr(self, key))(ts[key]))
        self.metrics = list(resumed.metrics)
        if "rng_cpu" in ts:
            torch.set_rng_state(ts["rng_cpu"])
        if "rng_cuda" in ts and torch.cuda.is_available() and self.device.type == "cuda":
            torch.cuda.set_rng_state(ts["rng_cuda"].cpu(), self.device)
        carried = ts.get("carried_state")
        if carried is not None and self.chunk > 0:
            if isinstance(carried, (list, tuple)):
                full: State = tuple(t.to(self.device) for t in carried)  # type: ignore[assignment]
            else:
                full = carried.to(self.device)
            self.state = select_streams(full, self.rows)

    # -- schedule ------------------------------------------------------------------
    def progress(self) -> float:
        cfg = self.cfg
        fractions = [0.0]
        if cfg.max_steps:
            fractions.append(self.step / cfg.max_steps)
        if cfg.epochs:
            fractions.append((self.epoch + self.chunk / len(self.batcher)) / cfg.epochs)
        if cfg.time_limit:
            fractions.append(self.elapsed / cfg.time_limit)
        return max(fractions)

    def _lr_lambda(self, _: int) -> float:
        # LambdaLR calls this after every optimizer step; the factor depends on
        # our own step count and on the progress through the budget (which,
        # for --time-limit, is wall-clock time).
        return self.lr_scale * lr_factor(self.step, self.progress(), self.cfg.warmup_steps,
                                         self.cfg.min_lr_ratio)

    # -- events ----------------------------------------------------------------------
    def _emit(self, kind: str, **payload: Any) -> None:
        if self.dist.is_main:
            self.callback({"kind": kind, **payload})

    def _log_row(self, row: dict[str, Any]) -> None:
        """Append to the checkpoint's short history and the JSONL log."""
        self.metrics.append(row)
        if len(self.metrics) > MAX_METRIC_ROWS:
            # Thin the older half of the train rows; keep every eval row.
            head, tail = self.metrics[: MAX_METRIC_ROWS // 2], self.metrics[MAX_METRIC_ROWS // 2 :]
            head = [r for i, r in enumerate(head) if "val_loss" in r or i % 2 == 0]
            self.metrics = head + tail
        if self.dist.is_main:
            try:
                with open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")
            except OSError as e:
                self._emit("warning", message=f"could not append to the metrics log: {e.strerror or e}")

    # -- checkpoints ------------------------------------------------------------------
    def train_state(self) -> dict[str, Any]:
        ts: dict[str, Any] = {
            "step": self.step, "epoch": self.epoch, "chunk": self.chunk,
            "chars_seen": self.chars_seen, "elapsed": self.elapsed,
            "best_val": None if math.isinf(self.best_val) else self.best_val,
            "evals_without_improvement": self.evals_without_improvement,
            "nonfinite_skipped": self.nonfinite_skipped, "clipped_steps": self.clipped_steps,
            "restores": self.restores, "lr_scale": self.lr_scale,
            "precision": self.precision, "device": str(self.device),
            "rng_cpu": torch.get_rng_state(),
        }
        if self.device.type == "cuda":
            ts["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        if self.state is not None:
            ts["carried_state"] = self._gather_state()
        return ts

    def _gather_state(self) -> Any:
        """The carried state of all streams (every rank's share), on the CPU."""
        parts = self.state if isinstance(self.state, tuple) else (self.state,)
        out = []
        for t in parts:
            t = t.detach().float()
            if self.dist.enabled:
                pieces = [torch.empty_like(t) for _ in range(self.dist.world_size)]
                dist.all_gather(pieces, t.contiguous())
                t = torch.cat(pieces, dim=1)
            out.append(t.cpu())
        return tuple(out) if isinstance(self.state, tuple) else out[0]

    def _payload(self) -> dict[str, Any]:
        return ckpt_mod.build_payload(
            self.model, self.tokenizer, train_config=self.cfg.to_dict(), train_state=self.train_state(),
            metrics=self.metrics, optimizer_state=self.optimizer.state_dict(),
            scheduler_state=self.scheduler.state_dict())

    def save(self, improved: bool) -> Path | None:
        """last.pt always, best.pt when validation improved, step-N.pt with --keep.
        Collective under DDP (the carried state is gathered); rank 0 writes."""
        payload = self._payload()
        if not self.dist.is_main:
            return None
        last = ckpt_mod.save(payload, self.out_dir / "last.pt")
        written = [last]
        if improved or self.cfg.val_fraction == 0:
            written.append(ckpt_mod.save(payload, self.out_dir / "best.pt"))
        if self.cfg.keep:
            written.append(ckpt_mod.save(payload, self.out_dir / f"step-{self.step:07d}.pt"))
            kept = sorted(self.out_dir.glob("step-*.pt"))
            for old in kept[: -self.cfg.keep]:
                old.unlink(missing_ok=True)
        self._emit("checkpoint", step=self.step, paths=[str(p) for p in written])
        return last

    # -- evaluation -----------------------------------------------------------------------
    def evaluate(self) -> float:
        """Validation loss over the whole split, state carried; agreed by all ranks."""
        loss = torch.tensor(math.nan)
        if self.dist.is_main and len(self.val_ids) >= 2:
            loss = torch.tensor(evaluate_ids(self.model, self.val_ids, device=self.device,
                                             autocast_dtype=_AUTOCAST[self.precision]).loss)
        if self.dist.enabled:
            loss = loss.to(self.device)
            dist.broadcast(loss, src=0)
        return float(loss)

    # -- the loop ---------------------------------------------------------------------------
    def _budget_left(self, reserve: float) -> str | None:
        cfg = self.cfg
        if cfg.max_steps and self.step >= cfg.max_steps:
            return "max_steps"
        if cfg.epochs and self.epoch + self.chunk / len(self.batcher) >= cfg.epochs - 1e-9:
            return "epochs"
        if cfg.time_limit and self.elapsed + reserve >= cfg.time_limit:
            return "time_limit"
        return None

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
        if self._good is None or self.restores >= 3:
            where = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was written yet"
            raise TrainingError(
                f"training diverged: the loss or gradients stayed NaN/inf at step {self.step} even "
                f"after {self.restores} restore(s) with a lower learning rate; {where}. "
                "Try a lower --lr or a smaller --grad-clip")
        self.model.load_state_dict(self._good["model"])
        self.optimizer.load_state_dict(self._good["optimizer"])
        self.restores += 1
        self.lr_scale *= 0.5
        self.state = None
        with warnings.catch_warnings():  # no optimizer step since the restore: expected here
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
            self.scheduler.step()  # apply the lower learning rate now
        self._emit("warning", message=f"non-finite loss at step {self.step}: restored the last good "
                                      f"state and halved the learning rate (x{self.lr_scale:g})")

    def _train_step(self, x: torch.Tensor, y: torch.Tensor, n_valid_global: int) -> tuple[float, float, bool]:
        """One TBPTT chunk: forward, backward, clip, step. Returns (loss, grad norm, finite)."""
        cfg = self.cfg
        x = x[self.rows].to(self.device, non_blocking=True)
        y = y[self.rows].to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=_AUTOCAST[self.precision],
                            enabled=self.precision != "fp32"):
            logits, state = self.ddp_model(x, self.state)  # (b, T, V)
        # Sum over this rank's characters, divided by the global count (times
        # the world size, which DDP's gradient average divides back out): the
        # same loss as one process over the whole batch, padding excluded.
        nll = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX,
                              reduction="sum")
        loss = nll * (self.dist.world_size / max(1, n_valid_global))
        self.state = detach_state(state)  # TBPTT: carry the values, cut the graph
        self.optimizer.zero_grad(set_to_none=True)
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
        return float(loss.detach()) / self.dist.world_size, norm, finite

    def close(self) -> None:
        """Leave the process group (under torchrun), once training is over."""
        if self.dist.enabled and dist.is_initialized():
            dist.barrier()  # no rank tears down gloo while another still talks to it
            dist.destroy_process_group()

    def run(self) -> TrainResult:
        cfg = self.cfg
        if not (cfg.max_steps or cfg.epochs or cfg.time_limit):
            raise ConfigError("no training budget: pass --max-steps, --epochs or --time-limit")
        if self.dist.is_main:
            try:
                self.out_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ConfigError(f"cannot create output folder {self.out_dir}: {e.strerror or e}") from None
        self._emit("start", config=cfg.to_dict(), model_config=self.model.config.to_dict(),
                   parameters=self.model.num_parameters(), device=str(self.device),
                   precision=self.precision, train_chars=len(self.train_ids), val_chars=len(self.val_ids),
                   vocab_size=self.tokenizer.vocab_size, out_dir=str(self.out_dir),
                   resumed_at=self.step, world_size=self.dist.world_size,
                   chunks_per_epoch=len(self.batcher))
        run_start, elapsed_base = time.perf_counter(), self.elapsed
        self._snapshot_good()
        guessed_eval_time = self._calibrate_eval()
        eval_time = None  # seconds one evaluation + save takes, measured
        consecutive_bad = 0
        window_loss, window_steps, window_chars = 0.0, 0, 0
        window_start = time.perf_counter()
        last_path: Path | None = None
        stopped = None
        flag = _SigintFlag() if self.handle_sigint else None
        if flag:
            flag.__enter__()
        try:
            while True:
                reserve = eval_time if eval_time is not None else guessed_eval_time
                stopped = self._budget_left(reserve)
                if self._agree(flag is not None and flag.hit):
                    stopped = "interrupted"
                if self._agree(stopped is not None):
                    stopped = stopped or "another rank's budget"
                    break
                if self.chunk >= len(self.batcher):  # epoch boundary: reset the carried state
                    self.epoch += 1
                    self.chunk = 0
                    self.state = None
                    continue
                x, y = self.batcher.chunk(self.chunk)
                n_valid = int((y != IGNORE_INDEX).sum())
                if self.chunk == 0:
                    self.state = None
                loss, norm, finite = self._train_step(x, y, n_valid)
                self.chunk += 1
                self.elapsed = elapsed_base + time.perf_counter() - run_start
                if not finite:
                    self.nonfinite_skipped += 1
                    consecutive_bad += 1
                    self.state = None  # a NaN state would poison every later chunk
                    self._emit("warning", message=f"step {self.step}: non-finite loss or gradient; step skipped")
                    if consecutive_bad >= cfg.nan_tolerance:
                        consecutive_bad = 0
                        self._recover()
                    continue
                consecutive_bad = 0
                self.step += 1
                self.scheduler.step()
                if cfg.grad_clip and norm > cfg.grad_clip:
                    self.clipped_steps += 1
                self.chars_seen += n_valid
                window_loss += loss
                window_steps += 1
                window_chars += n_valid
                if self.step % cfg.log_every == 0:
                    now = time.perf_counter()
                    row = {"step": self.step, "epoch": self.epoch + self.chunk / len(self.batcher),
                           "train_loss": window_loss / window_steps,
                           "lr": self.optimizer.param_groups[0]["lr"], "grad_norm": norm,
                           "clipped_share": self.clipped_steps / max(1, self.step),
                           "chars_per_sec": window_chars / max(1e-9, now - window_start),
                           "elapsed": self.elapsed}
                    self._log_row(row)
                    self._emit("log", **row, progress=self.progress(), nonfinite=self.nonfinite_skipped)
                    window_loss, window_steps, window_chars = 0.0, 0, 0
                    window_start = now
                if self.step % cfg.eval_every == 0:
                    t_eval = time.perf_counter()
                    last_path = self._evaluate_and_save()
                    eval_time = time.perf_counter() - t_eval
                    self.elapsed = elapsed_base + time.perf_counter() - run_start
                    window_start += eval_time
                    if cfg.patience and self.evals_without_improvement >= cfg.patience:
                        stopped = "patience"
                        break
        finally:
            if flag:
                flag.__exit__()
        if stopped == "interrupted":
            last_path = self.save(improved=False)  # quickly: no evaluation after Ctrl-C
        elif self._last_eval_step != self.step:  # (-1 until this run evaluates)
            # Final evaluation and checkpoint, unless the last step just had one.
            last_path = self._evaluate_and_save()
        self.elapsed = elapsed_base + time.perf_counter() - run_start
        best = self.out_dir / "best.pt"
        result = TrainResult(out_dir=self.out_dir, best_path=best if best.exists() else None,
                             last_path=last_path, step=self.step, best_val_loss=self.best_val,
                             stopped_because=stopped or "budget", train_state=self.train_state())
        self._emit("end", step=self.step, best_val_loss=self.best_val, stopped_because=result.stopped_because,
                   out_dir=str(self.out_dir), elapsed=self.elapsed, chars_seen=self.chars_seen,
                   nonfinite=self.nonfinite_skipped)
        if stopped == "interrupted":
            raise TrainingInterrupted(f"interrupted at step {self.step}; saved {self.out_dir / 'last.pt'} "
                                      f"(continue with --resume {self.out_dir / 'last.pt'})",
                                      self.out_dir / "last.pt")
        return result

    def _calibrate_eval(self) -> float:
        """Seconds the final evaluation + save will take, from timing the
        evaluation of a slice of the validation text (for --time-limit)."""
        if not self.cfg.time_limit or len(self.val_ids) < 2:
            return 1.0
        n = min(len(self.val_ids), 32_768)
        t0 = time.perf_counter()
        if self.dist.is_main:
            evaluate_ids(self.model, self.val_ids[:n], device=self.device,
                         autocast_dtype=_AUTOCAST[self.precision])
        seconds = (time.perf_counter() - t0) * len(self.val_ids) / n
        return 1.2 * seconds + 1.0  # margin for noise and the checkpoint write

    def _evaluate_and_save(self) -> Path | None:
        self._last_eval_step = self.step
        val = self.evaluate() if self.cfg.val_fraction > 0 else math.nan
        improved = math.isfinite(val) and val < self.best_val
        if improved:
            self.best_val = val
            self.evals_without_improvement = 0
        elif math.isfinite(val):
            self.evals_without_improvement += 1
        row = {"step": self.step, "epoch": self.epoch + self.chunk / len(self.batcher),
               "val_loss": val, "val_bpc": val / math.log(2) if math.isfinite(val) else None,
               "best_val_loss": None if math.isinf(self.best_val) else self.best_val,
               "elapsed": self.elapsed}
        self._log_row(row)
        path = self.save(improved)
        self._snapshot_good()
        self._emit("eval", **row, improved=improved, model=self.model, tokenizer=self.tokenizer,
                   device=self.device)
        return path


def train(cfg: TrainConfig, model_overrides: dict[str, Any] | None = None, **kwargs: Any) -> TrainResult:
    """Build a :class:`Trainer` and run it. See ``Trainer`` for the options."""
    return Trainer(cfg, model_overrides, **kwargs).run()
