"""The training options (:class:`TrainConfig`) and how a resumed run merges
the options given again with those it recorded. (The model's shape:
:class:`charnn.model.config.ModelConfig`.)

Field names are PyTorch's own; CLI flags are the same names in kebab-case.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from ..errors import ConfigError


@dataclass
class TrainConfig:
    corpus: list[str] = field(default_factory=list)  # files/dirs; empty = built-in corpus
    corpus_hash: str = ""  # sha256 of the normalised text (the run records it: RunPlan)
    corpus_name: str = ""  # short name, used for the default output folder
    val_fraction: float = 0.1  # the last part of the text held out, contiguous
    # Many small steps beat few big ones: 16 x 64 reached 1.273 nats/char in 5
    # minutes on War and Peace where 32 x 128 reached 1.341 (docs/training.md).
    seq_len: int = 64  # TBPTT chunk length
    batch_size: int = 16  # contiguous streams trained side by side
    lr: float = 7e-3  # AdamW peak learning rate (7e-3 .. 1e-2 best of 2e-3 .. 1.2e-2)
    weight_decay: float = 0.01  # AdamW decoupled weight decay (not on biases/embeddings)
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0  # max global L2 norm of the gradients (0 = off)
    # Linear warmup before the cosine decay. None = automatic: it ends at 100
    # steps or a quarter of the budget, whichever comes first, so a short
    # budget still reaches the set learning rate.
    warmup_steps: int | None = None
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    max_steps: int = 0  # 0 = no step budget
    epochs: float = 0.0  # 0 = no epoch budget
    time_limit: float = 0.0  # seconds of training, 0 = no time budget
    # Steps between evaluations and checkpoints. None = automatic: about
    # schedule.AUTO_EVALS (8) evaluations per run, at most MAX_EVAL_EVERY (1000)
    # steps apart; for --time-limit it is set from the measured speed after the
    # first steps.
    eval_every: int | None = None
    # Validation characters scored by each evaluation during training (the
    # start of the split; `charnn eval` scores all of it). None = automatic:
    # at most 200k, and for --time-limit no more than one evaluation can score
    # in schedule.EVAL_BUDGET_SHARE (2%) of the budget.
    eval_chars: int | None = None
    log_every: int = 10  # steps between progress updates / log rows
    patience: int = 0  # stop after this many evaluations without improvement (0 = off)
    keep: int = 0  # also keep the last N step-numbered checkpoints (0 = none)
    sample_every: int = 1  # preview a sample at every Nth evaluation (0 = off)
    seed: int = 1337  # 0 .. 2**64-1
    device: str = "auto"  # auto | cpu | cuda | mps
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    nan_tolerance: int = 3  # consecutive non-finite steps before restoring the last good state
    encoding: str = "utf-8"  # of the corpus files
    out: str = ""  # output folder
    # The model's shape and dropout: "auto" chooses them from the text and the
    # budget (charnn.model.sizing; options given explicitly win), "fixed" takes
    # ModelConfig's defaults. size_reason is the auto choice's one-line why.
    size: str = "auto"
    size_reason: str = ""
    setup_seconds: float = 0.0  # recorded from the run's RunPlan (charnn.training.plan)
    # Read the text in blocks dealt to the batch rows in a new random order
    # each epoch (charnn.text.data.BlockBatcher); False: each row reads one
    # stretch of the text in order (--no-shuffle). None = chosen
    # by the trainer at start from the epochs the budget buys
    # (charnn.model.sizing.choose_order); the checkpoint records the choice.
    shuffle: bool | None = None
    # A new run's start: "auto" (the shipped base when it knows the text, see
    # charnn.training.base), "none" (from scratch), a shipped base's name or a
    # checkpoint's path. The checkpoint records what the run started from.
    base: str = "none"
    base_reason: str = ""

    def __setattr__(self, name: str, value: Any) -> None:
        if self.__dict__.get("_frozen"):
            raise AttributeError(f"TrainConfig is frozen once validated: it holds the user's options; what a "
                                 f"run decides is its RunPlan's. dataclasses.replace(cfg, {name}=...) makes a "
                                 "changed copy")
        super().__setattr__(name, value)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["betas"] = list(self.betas)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """From a checkpoint's train_config: unknown keys are ignored, missing
        ones take their defaults, and the result is validated."""
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        if isinstance(kwargs.get("betas"), (list, tuple)):
            kwargs["betas"] = tuple(kwargs["betas"])
        if "eval_chars" not in data:
            kwargs["eval_chars"] = 0  # a file without it scored the whole validation split
        if "size" not in data:
            kwargs["size"] = "fixed"  # a file without it had the fixed default shape
        if "shuffle" not in data:
            kwargs["shuffle"] = False  # a file without it read its text in order
        return cls(**kwargs).validate()

    def validate(self) -> "TrainConfig":
        """Types and ranges of every option; a ConfigError names the option."""
        def check(name: str, kind: tuple[type, ...], low: float | None = None, *, optional: bool = False,
                  below: float | None = None, at_most: float | None = None) -> None:
            value = getattr(self, name)
            if value is None and optional:
                return
            flag = "--" + name.replace("_", "-")
            if isinstance(value, bool) or not isinstance(value, kind) or (
                    isinstance(value, float) and not math.isfinite(value)):
                raise ConfigError(f"{flag} must be a {'whole ' if kind == (int,) else ''}number, got {value!r}")
            if low is not None and value < low:
                raise ConfigError(f"{flag} must be at least {low:g}, got {value!r}")
            if below is not None and value >= below:
                raise ConfigError(f"{flag} must be below {below:g}, got {value!r}")
            if at_most is not None and value > at_most:
                raise ConfigError(f"{flag} must be at most {at_most:g}, got {value!r}")

        num = (int, float)
        for name in ("seq_len", "batch_size", "log_every"):
            check(name, (int,), 1)
        check("eval_every", (int,), 1, optional=True)
        check("warmup_steps", (int,), 0, optional=True)
        check("eval_chars", (int,), 0, optional=True)
        for name in ("max_steps", "patience", "keep", "sample_every", "nan_tolerance"):
            check(name, (int,), 0)
        check("nan_tolerance", (int,), 1)
        for name in ("epochs", "time_limit", "weight_decay", "grad_clip"):
            check(name, num, 0)
        check("lr", num, 0)
        if not self.lr > 0:
            raise ConfigError(f"--lr must be a positive number, got {self.lr}")
        check("val_fraction", num, 0, below=1)
        if self.size not in ("auto", "fixed"):
            raise ConfigError(f"--size must be auto or fixed, got {self.size!r}")
        if not isinstance(self.size_reason, str):
            raise ConfigError(f"size_reason must be text, got {type(self.size_reason).__name__}")
        check("setup_seconds", num, 0)
        if self.shuffle is not None and not isinstance(self.shuffle, bool):
            raise ConfigError(f"shuffle must be true, false or null (chosen at start), got {self.shuffle!r}")
        check("min_lr_ratio", num, 0, at_most=1)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2 ** 64:
            raise ConfigError(f"--seed must be a whole number from 0 to {2 ** 64 - 1} (64 bits), got {self.seed!r}")
        if (not isinstance(self.betas, tuple) or len(self.betas) != 2
                or not all(isinstance(b, num) and not isinstance(b, bool) and 0 <= b < 1 for b in self.betas)):
            raise ConfigError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        for name in ("corpus_hash", "corpus_name", "device", "precision", "encoding", "out", "base", "base_reason"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"{name} must be a string, got {type(getattr(self, name)).__name__}")
        if not isinstance(self.corpus, list) or not all(isinstance(c, str) for c in self.corpus):
            raise ConfigError("corpus must be a list of paths")
        if self.patience and self.val_fraction == 0:
            raise ConfigError("--patience needs a validation split; drop --val-fraction 0")
        object.__setattr__(self, "_frozen", True)
        return self


# ---------------------------------------------------------------------------
# Resume: the saved run's options, with what the user gave on top
# ---------------------------------------------------------------------------

# May change when a run is resumed: they decide when it stops, how often it
# reports and where it writes, not what it computes at each step...
RESUME_CHANGEABLE = ("max_steps", "epochs", "time_limit", "eval_every", "eval_chars", "log_every",
                     "patience", "keep", "sample_every", "nan_tolerance", "device", "out")
# ...these change what it computes but can be applied for real (the run is then
# not bit-identical to an uninterrupted one, and the checkpoint says so)...
RESUME_APPLIED = ("precision", "grad_clip")
# ...and these cannot change without making it another run: the data layout,
# the randomness, the optimizer and its schedule.
RESUME_FIXED = ("seq_len", "batch_size", "val_fraction", "seed", "encoding", "lr", "weight_decay",
                "betas", "warmup_steps", "min_lr_ratio", "size", "shuffle", "base")
BUDGETS = ("max_steps", "epochs", "time_limit")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def given_options(cfg: TrainConfig) -> dict[str, Any]:
    """A whole TrainConfig handed to a resume (the Python API): every field
    counts as given, except empty ones that mean "not set" (no corpus, no
    output folder, no budget at all) and what the trainer fills in itself."""
    given = {k: v for k, v in cfg.to_dict().items() if k not in ("corpus_hash", "corpus_name", "size", "size_reason",
                                                              "setup_seconds", "base", "base_reason")}
    if not given["corpus"]:
        del given["corpus"]
    if not given["out"]:
        del given["out"]
    if not any(given[b] for b in BUDGETS):
        for b in BUDGETS:
            del given[b]
    return {k: v for k, v in given.items() if v is not None}


def merge_resume(saved: TrainConfig, given: dict[str, Any]) -> tuple[TrainConfig, list[str]]:
    """The run's own options, with the ones the user passed on top.

    ``given`` holds only what the user passed (the CLI knows: its options
    default to None). Returns the merged config and a line per changed option
    ("eval_every 1000 -> 200"). An option that would make it another run is
    refused with a :class:`ConfigError` that says what to do instead.
    """
    unknown = set(given) - {f.name for f in fields(TrainConfig)}
    if unknown:
        raise ConfigError(f"unknown training option(s): {', '.join(sorted(unknown))}")
    values = dict(given)
    if "betas" in values:
        values["betas"] = tuple(values["betas"])
    clashes = [_clash(k, values[k], getattr(saved, k))
               for k in RESUME_FIXED if k in values and values[k] != getattr(saved, k)]
    if clashes:
        raise ConfigError(
            "a resumed run keeps the options that define it; these differ: " + "; ".join(clashes)
            + ". Drop them to continue the run exactly, or start a new run from its weights with "
              "--init-from (which takes new values)")
    if any(b in values for b in BUDGETS):  # a new budget replaces the old one as a whole
        for b in BUDGETS:
            values.setdefault(b, 0 if b == "max_steps" else 0.0)
    changed, updates = [], {}
    for k in (*BUDGETS, *RESUME_CHANGEABLE[3:], *RESUME_APPLIED):
        if k in values and values[k] != getattr(saved, k):
            note = ""
            if k in BUDGETS:
                note = " (the learning-rate schedule follows the new budget)"
            elif k in RESUME_APPLIED:
                note = " (applied from here on; not bit-identical to an uninterrupted run)"
            changed.append(f"{k} {_show(getattr(saved, k), k)} -> {_show(values[k], k)}{note}")
            updates[k] = values[k]
    if "corpus" in values:
        updates["corpus"] = list(values["corpus"])
    return replace(saved, **updates), changed


def _clash(name: str, given: Any, saved: Any) -> str:
    if name == "shuffle":  # --order
        def order(v: bool) -> str:
            return "--order shuffled" if v else "--order in-order"
        return f"{order(given)} (this run: {order(saved)})"
    if isinstance(given, bool):  # a --flag/--no-flag pair
        def spell(v: bool) -> str:
            return _flag(name) if v else "--no-" + name.replace("_", "-")
        return f"{spell(given)} (this run: {spell(saved)})"
    return f"{_flag(name)} {_show(given, name)} (this run: {_show(saved, name)})"


def _show(value: Any, name: str = "") -> str:
    if value in (0, 0.0, "", None):
        return "off" if value in (0, 0.0) else "auto"
    if name == "time_limit":
        return f"{value:g}s"
    return f"{value:g}" if isinstance(value, float) else str(value)
