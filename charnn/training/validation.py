"""A training run's validation: the held-out slice each evaluation scores,
what one evaluation costs on this device, how often to evaluate, and the
seconds a --time-limit keeps back for the final evaluation and save.

The trainer owns the loop and decides *when* an evaluation happens; this
module knows what one costs and scores it. Under torchrun rank 0 alone
evaluates and every measurement is broadcast, so all ranks plan alike.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from ..model import sizing
from .config import TrainConfig
from .plan import RunPlan
from ..errors import ConfigError, plural
from ..model.scoring import evaluate_ids
from ..model.precision import AUTOCAST_DTYPE, kernels_for
from .runtime import DistInfo, rank0_values
from .schedule import Budget, auto_eval_chars, auto_eval_every, patience_note

CALIBRATION_CHARS = 8192  # validation characters timed at start to predict an evaluation's cost
GLANCE_CHARS = 512  # under --time-limit, timed first: the full calibration only runs if it fits the probe's share
SAVE_SECONDS = 0.5  # a checkpoint write, in the final reserve
# A suggested --time-limit must still train when the machine is busier on the
# next try: choosing the size took 3.9 s under the test suite's load, 2 s quiet.
SETUP_MARGIN = 2.0
RESERVE_MARGIN = 1.2  # the final evaluation's predicted time, with a margin for load
# A --time-limit run that makes less than this share of the steps its first
# steps promised says so at its end: the machine slowed down after the model's
# size and the schedule were planned.
SHORT_OF_PLAN = 0.6


class Validation:
    """The validation side of one run. ``val_ids`` is the held-out part of
    the text; ``plan.eval_chars`` and ``plan.eval_every`` None mean the slice
    and the interval are chosen here (into the plan, which a checkpoint
    records)."""

    def __init__(self, cfg: TrainConfig, plan: RunPlan, val_ids: Any, dist_info: DistInfo, device: torch.device,
                 precision: str):
        self.cfg = cfg
        self.run_plan = plan
        self.val_ids = val_ids
        self.dist = dist_info
        self.device = device
        self.precision = precision
        self.seconds_per_char = 0.0  # measured by calibrate()
        self.auto_chars = plan.eval_chars is None  # before calibrate() chooses it
        self.planned: tuple[float, float] | None = None  # (steps, seconds a step) the first steps promised

    @property
    def enabled(self) -> bool:
        return self.cfg.val_fraction > 0

    def slice(self) -> Any:
        """What each evaluation scores: the first ``eval_chars`` of the split."""
        n = self.run_plan.eval_chars
        return self.val_ids if not n or n >= len(self.val_ids) else self.val_ids[:n]

    def chars(self) -> int:
        return len(self.slice()) if self.enabled else 0

    def seconds(self) -> float:
        """One evaluation's predicted time (after calibrate)."""
        return self.seconds_per_char * self.chars()

    def final_reserve(self) -> float:
        """Seconds kept back from a --time-limit for the final evaluation and save."""
        return RESERVE_MARGIN * self.seconds() + SAVE_SECONDS

    def _run(self, model: torch.nn.Module, ids: Any) -> float:
        with kernels_for(self.device, self.precision):
            # A NaN here is the divergence guard's to handle, not an error.
            return evaluate_ids(model, ids, device=self.device, autocast_dtype=AUTOCAST_DTYPE[self.precision],
                                check_finite=False).loss

    def _shared(self, *values: float, dtype: torch.dtype = torch.float32) -> list[float]:
        """Rank 0's ``values`` on every rank."""
        return rank0_values(self.dist, self.device, *values, dtype=dtype)

    def evaluate(self, model: torch.nn.Module) -> float:
        """Validation loss over the slice, state carried; agreed by all ranks."""
        loss = math.nan
        if self.dist.is_main and len(self.val_ids) >= 2:
            loss = self._run(model, self.slice())
        [loss] = self._shared(loss)
        return loss

    def calibrate(self, model: torch.nn.Module) -> float:
        """Seconds per validation character, from timing a short slice; sets
        the automatic evaluation slice. Agreed by all ranks."""
        cfg = self.cfg
        spc = 0.0
        auto = self.run_plan.eval_chars is None
        if self.dist.is_main and len(self.val_ids) >= 2 and (cfg.time_limit or auto):
            n = min(len(self.val_ids), CALIBRATION_CHARS)
            if cfg.time_limit and n > GLANCE_CHARS:
                # A short slice first: on a large vocabulary the full slice
                # alone could take longer than the budget.
                t0 = time.perf_counter()
                self._run(model, self.val_ids[:GLANCE_CHARS])
                spc = (time.perf_counter() - t0) / GLANCE_CHARS
                if spc * n > sizing.PROBE_SHARE * cfg.time_limit:
                    n = 0
            if n:
                t0 = time.perf_counter()
                self._run(model, self.val_ids[:n])
                spc = (time.perf_counter() - t0) / n
        [spc] = self._shared(spc)
        if auto:
            self.run_plan.eval_chars = auto_eval_chars(len(self.val_ids), cfg.time_limit, spc)
        self.seconds_per_char = spc
        return spc

    def before_first_step(self, budget: Budget, step: int, elapsed: float) -> tuple[float, list[str]]:
        """Before the first step: the automatic evaluation interval where the
        budget tells the number of steps, and the reserve for the final
        evaluation under --time-limit (a clear error when no step can fit).
        Returns the reserve and the notes to show."""
        cfg = self.cfg
        total = budget.planned_steps()
        if self.run_plan.eval_every is None and total is not None:
            self.run_plan.eval_every = auto_eval_every(total, budget.chunks_per_epoch)
        reserve = 0.0
        if cfg.time_limit:
            reserve = self.final_reserve()
            if step == 0 and reserve >= 0.5 * (cfg.time_limit - elapsed):
                raise ConfigError(
                    f"--time-limit {cfg.time_limit:g}s is too short to train: the final evaluation and save "
                    f"alone take about {reserve:.1f}s here"
                    + (f" and choosing the model took {elapsed:.1f}s" if elapsed >= 0.1 else "")
                    + f"; give at least {self.shortest_time_limit(elapsed)}s")
        every = self.run_plan.eval_every
        note = patience_note(cfg, every, total, step) if every is not None else None
        return reserve, [note] if note else []

    def shortest_time_limit(self, setup_seconds: float) -> int:
        """A --time-limit this run would train under, with a margin: the time
        before the first step (``setup_seconds``, doubled: the next run may
        find the machine busier; a size probe grows with the budget, up to
        PROBE_SHARE of it) plus four times the final evaluation and save, whose
        automatic slice also grows with the budget."""
        cfg = self.cfg
        val = len(self.val_ids) if self.enabled else 0
        limit = cfg.time_limit
        for _ in range(20):  # a fixed point: each term grows by at most a few % of the limit
            chars = (auto_eval_chars(val, limit, self.seconds_per_char) if self.auto_chars
                     else self.chars()) if val else 0
            reserve = RESERVE_MARGIN * self.seconds_per_char * chars + SAVE_SECONDS
            probe = sizing.PROBE_SHARE * limit if setup_seconds else 0.0  # a size probe ran
            limit = max(limit, SETUP_MARGIN * setup_seconds + probe + 4 * reserve)
        return math.ceil(limit)

    def _interval(self, budget: Budget, step: int, elapsed: float, per_step: float,
                  reserve: float) -> tuple[int, float]:
        """The automatic interval for a run at ``step`` that takes ``per_step``
        seconds a step, and the steps its --time-limit fits in all."""
        cfg = self.cfg
        total = step + max(0.0, cfg.time_limit - elapsed - reserve) / max(per_step, 1e-9)
        if cfg.max_steps:
            total = min(total, cfg.max_steps)
        every = auto_eval_every(total, budget.chunks_per_epoch, self.seconds() / max(per_step, 1e-9))
        # Rank 0's measurement decides: evaluations are collective, and every
        # rank must evaluate at the same steps (each rank's own per_step once
        # gave the ranks different intervals, and a run hung in its evaluation).
        every, total = self._shared(every, total, dtype=torch.float64)
        return int(every), total

    def choose_every(self, budget: Budget, step: int, elapsed: float, per_step: float,
                     reserve: float) -> list[str]:
        """--time-limit with automatic --eval-every: after the first steps,
        from their speed (``per_step``: the median of their times, so a pause
        or a burst of other work in them does not multiply the evaluations).
        The choice goes into the plan and so into the checkpoint.
        Returns the notes to show."""
        cfg = self.cfg
        self.run_plan.eval_every, total = self._interval(budget, step, elapsed, per_step, reserve)
        self.planned = (total, per_step)
        notes = [f"evaluating every {plural(self.run_plan.eval_every, 'step')} (about {plural(int(total), 'step')} fit "
                 f"the budget at {per_step * 1000:.0f} ms/step)"]
        note = patience_note(cfg, self.run_plan.eval_every, total, step)
        return notes + ([note] if note else [])

    def grow_every(self, budget: Budget, step: int, elapsed: float, per_step: float,
                   reserve: float) -> list[str]:
        """At an evaluation of a run whose interval was chosen automatically:
        where the steps so far (``per_step``: their mean time, evaluations
        excluded) say the budget fits more steps than the first ones did --
        the machine was busier at the start -- the interval grows to match.
        It never shrinks: fewer evaluations than planned cost no training time.
        Returns the note to show, if it grew."""
        every, total = self._interval(budget, step, elapsed, per_step, reserve)
        if every <= self.run_plan.eval_every:
            return []
        self.run_plan.eval_every = every
        return [f"evaluating every {plural(every, 'step')} from here: the run is faster than its first steps "
                f"said (about {plural(int(total), 'step')} fit the budget at {per_step * 1000:.0f} ms/step)"]

    def shortfall(self, step: int, per_step: float, elapsed: float) -> dict[str, Any] | None:
        """At the end of a run stopped by its --time-limit: when it made less
        than :data:`SHORT_OF_PLAN` of the steps its first steps promised, the
        metrics row that says so (``message`` is the line to show; ``elapsed``,
        like every row's, is the run's seconds so far)."""
        if self.planned is None:
            return None
        planned, first = self.planned
        if step >= SHORT_OF_PLAN * planned:
            return None
        message = (f"the run made {step:,} of the ~{int(planned):,} steps its first steps promised "
                   f"({step / planned:.0%}): steps took {per_step * 1000:.0f} ms on average, {first * 1000:.0f} ms "
                   "at the start. The machine got busier after the model's size and schedule were planned; "
                   "on a quieter machine (or with a longer --time-limit) the same command trains more")
        return {"step": step, "event": "short_of_plan", "planned_steps": int(planned), "steps": step,
                "ms_per_step_planned": round(first * 1000, 3), "ms_per_step": round(per_step * 1000, 3),
                "message": message, "elapsed": elapsed}
