"""Threads that follow the machine's load while a run trains.

OpenMP's threads wait for each other at every operation, so a run whose
threads outnumber the cores left to it stalls on every step: one busy
process started beside a 2-thread run on 2 cores made its steps 11x slower
(31 -> 347 ms; 2x256, bf16). The count chosen at start (the idle cores,
:func:`charnn.model.devices.default_threads`) is right only while the load
stays as it was. So a run that was not told its threads watches the time of
its steps: when they grow it tries fewer threads, and now and then it tries
more; it keeps the count whose steps are faster.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from ..model.devices import most_auto_threads

# Steps whose mean time is a thread count's speed (the mean, not the median:
# a stalling count's steps are mostly a little slower, now and then seconds
# slower, and both cost). The first step after a change is not counted
# (OpenMP starts or parks its threads in it).
WINDOW = 8
# A mean this many times the count's settled one: the machine got busier (the
# next window confirms it before fewer threads are tried).
SLOWER = 1.5
# A trial of more threads is kept only where its mean is below this share of
# the count it left (a second thread gains 1.2-1.5x on a quiet 2-core machine).
FASTER = 0.9
# A trial step this many times the mean of the count it left ends the trial
# at once: the trial count is stalling.
STALL = 2.0
# Seconds between trials of more threads; each trial that fails doubles the
# wait, up to the last (two steps lost per failed trial).
RETRY_SECONDS = (10.0, 20.0, 40.0, 60.0)


class ThreadTuner:
    """Chooses the run's thread count from its own step times.

    ``after_step(seconds)`` with each training step's time; it returns a note
    when it changed the count (the caller shows it). ``most``: the largest
    count to try (the cores this process may use, at most what
    :func:`~charnn.model.devices.default_threads` would choose on an idle
    machine)."""

    def __init__(self, threads: int, most: int, set_threads: Callable[[int], None] = torch.set_num_threads,
                 clock: Callable[[], float] = time.perf_counter):
        self.threads, self.most = threads, max(1, most)
        self._set, self._clock = set_threads, clock
        self._steps: list[float] = []  # the current window's step times
        self._settled: float | None = None  # the current count's best window mean since it was chosen
        self._confirming = False  # a slow window seen: the next one decides whether to try fewer threads
        self._trial: tuple[int, float] | None = None  # (count left, its mean)
        self._skip = 1  # steps not to count after a change of count
        self._wait = 0
        self._next_up = clock() + RETRY_SECONDS[0]

    @classmethod
    def for_run(cls, adapt: bool, device: torch.device, distributed: bool) -> "ThreadTuner | None":
        """The tuner of a run told to ``adapt`` its threads, where it can: on a
        CPU, in one process (torchrun's ranks share the cores by their own rule)."""
        if not adapt or device.type != "cpu" or distributed:
            return None
        return cls(torch.get_num_threads(), most_auto_threads())

    def after_step(self, seconds: float) -> str | None:
        if self._skip:
            self._skip -= 1
            return None
        self._steps.append(seconds)
        if self._trial is not None:
            return self._judge_trial(seconds)
        if len(self._steps) < WINDOW:
            return None
        mean = sum(self._steps) / len(self._steps)
        self._steps = []
        slow = self._settled is not None and mean > SLOWER * self._settled
        if slow and self.threads > 1:
            if self._confirming:
                self._confirming = False
                self._start_trial(max(1, self.threads // 2), mean)
            else:
                self._confirming = True
            return None
        self._confirming = False
        if self._settled is None or mean < self._settled:
            self._settled = mean
        if self.threads < self.most and self._clock() >= self._next_up:
            self._start_trial(min(self.most, self.threads * 2), mean)
        return None

    def _start_trial(self, count: int, mean: float) -> None:
        self._trial = (self.threads, mean)
        self._change(count)

    def _change(self, count: int) -> None:
        self.threads = count
        self._set(count)
        self._steps = []
        self._skip = 1

    def _judge_trial(self, seconds: float) -> str | None:
        left, before = self._trial
        if seconds > STALL * before:  # stalling: back at once
            return self._end_trial(kept=False)
        if len(self._steps) < WINDOW:
            return None
        mean = sum(self._steps) / len(self._steps)
        kept = mean < before if self.threads < left else mean < FASTER * before
        return self._end_trial(kept, mean)

    def _end_trial(self, kept: bool, mean: float | None = None) -> str | None:
        left, before = self._trial
        self._trial = None
        tried = self.threads
        if kept:
            self._settled = mean
            self._steps = []
            self._wait = 0
            self._next_up = self._clock() + RETRY_SECONDS[0]
            why = "the machine got busier" if tried < left else "cores came free"
            return (f"training on {tried} thread{'s' if tried > 1 else ''} instead of {left}: {why} "
                    f"({before * 1000:.0f} -> {mean * 1000:.0f} ms a step)")
        self._change(left)
        if tried < left:  # fewer threads did not help: the slower steps are the new normal
            self._settled = None
        else:
            self._wait = min(self._wait + 1, len(RETRY_SECONDS) - 1)
            self._next_up = self._clock() + RETRY_SECONDS[self._wait]
        return None
