"""What a run does before its first step, besides opening its folder: settle
its options, read its text, and decide the model's size and the reading
order -- once, before the batcher and the budget are built from them."""

from __future__ import annotations

import os
import time
from pathlib import Path
from dataclasses import fields, replace
from typing import Any, Callable, Mapping

import numpy as np
import torch

from ..errors import CheckpointError, ConfigError, DataError, shell_arg
from ..model.config import ModelConfig
from ..model.devices import cpu_has_bf16, resolve_device
from ..model import sizing
from ..model.precision import autocast_precision, emulated_bf16
from ..model.rnn import TRAIN_MEMORY_FACTOR, CharRNN, check_memory
from ..storage import checkpoint as ckpt_mod
from ..storage.outdir import CHECKPOINT_NAMES, STEP_FILE
from ..text.data import BUILTIN_NAME, Corpus, builtin_corpus_path, encode_corpus, make_batcher, read_corpus, split_ids
from ..text.tokenizer import CharTokenizer
from . import base as base_mod, choices, state as train_state
from .config import TrainConfig, given_options, merge_resume
from .finetune import ARCH_FIELDS, check_arch, fine_tune_start
from .plan import RunPlan
from .runtime import DistInfo
from .schedule import planned_steps
from .step import make_optimizer


def run_options(cfg: TrainConfig | Mapping[str, Any] | None, resumed: ckpt_mod.Checkpoint | None,
                overrides: dict[str, Any], init_from: str | os.PathLike | None = None, overwrite: bool = False,
                ) -> tuple[TrainConfig, list[str]]:
    """The run's options, validated and frozen: a new run's, or the resumed
    run's with the given ones on top (and a line per option that changed).
    The caller's own TrainConfig stays as it was."""
    changed: list[str] = []
    if resumed is not None:
        resume = resumed.path
        given = given_options(cfg) if isinstance(cfg, TrainConfig) else dict(cfg or {})
        check_arch(overrides, resumed.model_config, Path(resume), "cannot resume from",
                   "A resumed run keeps its model; drop those options, or start a new run from its "
                   f"weights with --init-from {shell_arg(resume)}")
        try:
            saved = TrainConfig.from_dict(resumed.train_config)
        except (ConfigError, TypeError) as e:
            raise CheckpointError(f"{resume}: its training options are invalid ({e}); it cannot be resumed. "
                                  f"--init-from {shell_arg(resume)} starts a new run from its weights") from None
        cfg, changed = merge_resume(saved, given)
        if "out" not in given:
            cfg = replace(cfg, out=str(Path(resume).parent))  # the run's folder, wherever it is now
    elif isinstance(cfg, Mapping) or cfg is None:
        unknown = set(cfg or {}) - {f.name for f in fields(TrainConfig)}
        if unknown:
            raise ConfigError(f"unknown training option(s): {', '.join(sorted(map(str, unknown)))}; "
                              "TrainConfig's fields name them (model options go in model_overrides)")
        cfg = TrainConfig(**dict(cfg or {}))
    cfg = replace(cfg).validate()
    if init_from and cfg.base != "none":  # the checkpoint would record a start the run did not take
        raise ConfigError(f"base={cfg.base!r} and init_from exclude each other: init_from starts a new run "
                          "from a checkpoint's weights, base from a base model; give one of them")
    if overwrite and cfg.out and resumed is None:
        check_start_kept(cfg, init_from)
    return cfg, changed


def check_start_kept(cfg: TrainConfig, init_from: str | os.PathLike | None) -> None:
    """--overwrite removes the --out folder's run once the new run writes
    there: refuse when the checkpoint it starts from is one of the files it
    removes. (A bad start checkpoint fails while the run sets up, before that,
    with the old run kept.)"""
    if init_from:
        start, flag = Path(init_from), "--init-from"
    elif cfg.base in ("auto", "none"):
        return
    else:
        start, flag = base_mod.resolve(cfg.base)[0], "--base"
        if start is None or base_mod.is_shipped(start):
            return
    if start.name in CHECKPOINT_NAMES or STEP_FILE.match(start.name):
        try:
            inside = start.absolute().parent.resolve() == Path(cfg.out).resolve()
        except (OSError, RuntimeError):  # an unreadable path: loading it says what is wrong
            inside = False
        if inside:
            raise ConfigError(f"{flag} {shell_arg(start)} is in the --out folder that --overwrite empties: the "
                              "run would delete the checkpoint it starts from. Write to another --out, or copy "
                              "the checkpoint out of that folder first")


def left_open(cfg: TrainConfig | Mapping[str, Any] | None, resumed: ckpt_mod.Checkpoint | None) -> set[str]:
    """The options a new run may still choose for itself: those absent from a
    mapping of given options (the CLI's), or at their default in a whole
    TrainConfig (the Python API cannot say more). A resumed run keeps its own."""
    if resumed is not None:
        return set()
    if isinstance(cfg, TrainConfig):
        return {f.name for f in fields(TrainConfig) if getattr(cfg, f.name) == f.default}
    given = dict(cfg or {})
    return {f.name for f in fields(TrainConfig) if f.name not in given}


def load_text(cfg: TrainConfig, plan: RunPlan, resumed: ckpt_mod.Checkpoint | None,
              init_from: str | os.PathLike | None, overrides: dict[str, Any], extend_vocab: bool, cache: bool, *,
              left_open: set[str], world_size: int, exclude: list[Path], status: Callable[[str], None],
              warn: Callable[[str], None],
              ) -> tuple[TrainConfig, Corpus, CharTokenizer, CharRNN | None, np.ndarray, np.ndarray]:
    """The run's options (a run started from a base takes the fine-tuning
    recipe for those in ``left_open``), its text, its vocabulary (the resumed
    run's, the one started from, or the text's own), and its ids split into
    training and validation; with --init-from or a base also the model
    started from."""
    corpus = read_run_corpus(cfg, resumed.path if resumed is not None else None, exclude, status)
    plan.corpus_hash = corpus.sha256
    plan.corpus_name = plan.corpus_name or corpus.name
    for w in corpus.warnings:
        warn(w)
    model = None
    if resumed is not None:
        tokenizer = resumed.tokenizer
    elif init_from:
        tokenizer, model, notes = fine_tune_start(init_from, corpus.text, overrides, extend_vocab)
        plan.size_reason = f"the shape of {Path(init_from).name} (--init-from)" if cfg.size == "auto" else ""
        for message in notes:
            warn(message)
    else:
        choice = start_from(cfg, corpus.text, overrides)
        plan.base, plan.base_reason = choice.name, choice.reason
        if choice.path is None:
            tokenizer = CharTokenizer.from_text(corpus.text)
        else:
            dropout = overrides.get("dropout")
            if dropout is None:
                overrides = {**overrides, "dropout": base_mod.FINE_TUNE_DROPOUT}
            shown = choice.name if base_mod.is_shipped(choice.path) else str(choice.path)
            tokenizer, model, notes = fine_tune_start(choice.path, corpus.text, overrides, True, what="--base",
                                                      shown=shown, loaded=choice.checkpoint)
            plan.size_reason = f"the shape of {choice.name} (--base)"
            for message in notes:
                warn(message)
    ids = encode_corpus(corpus, tokenizer, cache=cache, progress=status)
    train_ids, val_ids = split_ids(ids, cfg.val_fraction)
    if cfg.val_fraction > 0 and len(val_ids) < 2:
        raise DataError(f"the corpus has {len(ids):,} characters: too few to hold out "
                        f"{cfg.val_fraction:.0%} for validation; add text or pass --val-fraction 0")
    if model is not None and resumed is None and not init_from:  # started from a base: its recipe
        chosen = base_mod.fine_tune_options(left_open, world_size, len(train_ids))
        cfg = replace(cfg, **chosen).validate() if chosen else cfg
        recipe = base_mod.describe_recipe(chosen, base_mod.FINE_TUNE_DROPOUT if dropout is None else None)
        plan.base_reason += (f" ({recipe})" if recipe else "") + choice.advice
    if resumed is not None and plan.shuffle is None:  # only a hand-made file: charnn records its choice
        plan.shuffle = False
    return cfg, corpus, tokenizer, model, train_ids, val_ids


def start_from(cfg: TrainConfig, text: str, overrides: dict[str, Any]) -> base_mod.BaseChoice:
    """A new run's base (see :mod:`charnn.training.base`). ``auto`` trains from
    scratch when the user chose the model's shape (--size fixed or a shape
    option): a base brings its own."""
    shape = [k for k in ARCH_FIELDS if k != "dropout" and overrides.get(k) is not None]
    if cfg.base == "auto" and (shape or cfg.size == "fixed"):
        why = "--size fixed" if cfg.size == "fixed" else ", ".join("--" + k.replace("_", "-") for k in shape)
        return base_mod.BaseChoice(None, "none", f"from scratch: {why} chooses the shape")

    def load(path: Path) -> ckpt_mod.Checkpoint:
        try:
            return ckpt_mod.load(path)
        except CheckpointError as e:
            raise CheckpointError(base_mod.unreadable(cfg.base, path, e)) from None

    return base_mod.choose_base(cfg.base, text, load)


def read_run_corpus(cfg: TrainConfig, resume: str | os.PathLike | None, exclude: list[Path],
                    status: Callable[[str], None]) -> Corpus:
    """The run's text; a resumed run's must be the text it was trained on."""
    if not cfg.corpus:
        corpus = read_corpus([builtin_corpus_path(status)], exclude=exclude, progress=status)
        corpus.name = BUILTIN_NAME
    else:
        try:
            corpus = read_corpus(cfg.corpus, encoding=cfg.encoding, exclude=exclude, progress=status)
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


def device_and_precision(cfg: TrainConfig, dist_info: DistInfo, notes: list[str],
                         resumed: ckpt_mod.Checkpoint | None = None) -> tuple[torch.device, str | None]:
    """Where this rank trains and in which precision (a note where it is
    slow). None: a new --time-limit run's --precision auto on a CPU with
    native bf16, which :func:`time_precision` decides (the run depends on
    the clock anyway; a run without one gives the same weights each time).
    A resumed run's ``auto`` keeps the precision it trained in where this
    device has it: an exact resume needs the same numbers."""
    recorded = train_state.recorded_precision(resumed) if resumed is not None else None
    device = resolve_device(cfg.device)
    if dist_info.enabled and device.type == "cuda":
        device = torch.device("cuda", dist_info.local_rank)
    precision = None
    if cfg.precision == "auto" and recorded is not None:
        try:
            precision = autocast_precision(recorded, device)
        except ConfigError:  # fp16 recorded on a GPU, resumed on a CPU: auto's choice here
            notes.append(f"this run trained in {recorded}, which {device.type} does not have: it resumes in "
                         f"{autocast_precision('auto', device)}, so not bit for bit")
    if precision is None:
        if (cfg.precision == "auto" and cfg.time_limit and resumed is None and device.type == "cpu"
                and cpu_has_bf16()):
            return device, None
        precision = autocast_precision(cfg.precision, device)
    if emulated_bf16(device, precision):
        notes.append("this CPU has no native bf16 (AVX512-BF16/AMX): bf16 is emulated and slower than fp32 here")
    return device, precision


def time_precision(overrides: dict[str, Any], start: CharRNN | None, vocab_size: int, probe: choices.ProbeSetup,
                   dist_info: DistInfo, status: Callable[[str], None], time_limit: float) -> tuple[str, str]:
    """--precision auto on a CPU with native bf16: (precision, why). The
    shape timed is the model started from, the shape given (its missing
    parts at --size fixed's), or --size fixed's: the middle of --size auto's
    ladder, which the probe then chooses from in the precision chosen here."""
    given = {k: v for k, v in overrides.items() if k in ModelConfig.__dataclass_fields__ and v is not None}
    mc = start.config if start is not None else ModelConfig(**{**given, "dropout": given.get("dropout", 0.0)})
    shape = sizing.Shape(mc.hidden_size, mc.num_layers, mc.embedding_dim)
    status(f"timing a {shape.name} model in fp32 and in bf16 (--precision auto)")
    return choices.choose_precision(shape, mc.cell, mc.dropout, vocab_size, probe, dist_info, time_limit)


def size_and_order(cfg: TrainConfig, plan: RunPlan, overrides: dict[str, Any], train_ids: np.ndarray, *,
                   start: CharRNN | None, vocab_size: int, rows: slice, device: torch.device,
                   precision: str | None, dist_info: DistInfo, status: Callable[[str], None],
                   ) -> tuple[Any, CharRNN | None, list[str], float, str]:
    """Decide what the options left open, into ``plan``: the precision where
    only timing tells (``precision`` None: :func:`time_precision`), a new
    run's model size (``--size auto`` times candidate shapes on the first
    batch) and its reading order (from the epochs its budget buys).
    ``start``: the model a run starts from (a base, --init-from, a resume),
    None for a new model. Returns the run's batcher, the new model (None
    where it started from one), the notes to show, the seconds the timings
    took (training time: under --time-limit also ``plan.setup_seconds``) and
    the precision. The layout it plans with (the order known so far, else in
    order) is the run's batcher unless the order chosen here is shuffled."""
    layout = make_batcher(train_ids, cfg.batch_size, cfg.seq_len, shuffle=bool(plan.shuffle), seed=cfg.seed)
    steps = planned_steps(cfg, len(layout))
    notes: list[str] = []
    model, auto_epochs = None, None  # auto_epochs: what --size auto estimated the budget buys
    x, y = layout.chunk(0)
    probe = choices.ProbeSetup(x[rows], y[rows], device, precision or "fp32", lambda m: make_optimizer(m, cfg))
    size_probe = start is None and cfg.size == "auto"
    timed = precision is None or size_probe
    if cfg.time_limit and timed:
        choices.warm_up(overrides, vocab_size, probe)
    started = time.perf_counter()
    if precision is None:
        precision, why = time_precision(overrides, start, vocab_size, probe, dist_info, status, cfg.time_limit)
        probe = replace(probe, precision=precision)
        notes.append(f"precision: {why}")
    choice = None
    if size_probe:
        choice = choices.choose_size(cfg, overrides, planned_steps=steps, train_chars=len(train_ids),
                                     vocab_size=vocab_size, probe=probe, dist_info=dist_info, status=status)
    probe_seconds = time.perf_counter() - started if timed else 0.0
    if cfg.time_limit and timed:  # the scheduler's first factor already skips it; the trainer adds the rest
        plan.setup_seconds = round(probe_seconds, 6)
    if start is None:
        if choice is not None:
            overrides = {**overrides, **choice.overrides()}
            plan.size_reason = choice.reason
            auto_epochs = choice.epochs
            notes.append(f"size: {choice.reason}")
        mc = ModelConfig(**{k: v for k, v in overrides.items() if k in ModelConfig.__dataclass_fields__})
        mc.vocab_size = vocab_size
        check_memory(mc.validate(), factor=TRAIN_MEMORY_FACTOR)  # before allocating anything
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        model = CharRNN(mc)
    else:  # a model started from: its dropout masks follow the seed too (a resume then restores its own state)
        torch.manual_seed(cfg.seed)
    if plan.shuffle is None:  # a new run: the reading order follows the epochs its budget buys
        plan.shuffle, why = choices.choose_order(cfg, epochs=auto_epochs, train_chars=len(train_ids),
                                                 planned_steps=steps)
        notes.append(f"reading: {why}")
        if plan.shuffle:
            layout = make_batcher(train_ids, cfg.batch_size, cfg.seq_len, shuffle=True, seed=cfg.seed)
    return layout, model, notes, probe_seconds, precision
