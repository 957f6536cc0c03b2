"""A training run's thread count follows the machine's load (charnn.training.threads)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from charnn.training import threads as threads_mod
from charnn.training.threads import ThreadTuner


class Machine:
    """Step times as a function of the thread count and the load, on a clock
    that advances by each step's time."""

    def __init__(self, quiet: dict[int, float], busy: dict[int, float]):
        self.quiet, self.busy, self.is_busy, self.now = quiet, busy, False, 0.0

    def clock(self) -> float:
        return self.now

    def run(self, tuner: ThreadTuner, steps: int) -> list[str]:
        notes = []
        for _ in range(steps):
            t = (self.busy if self.is_busy else self.quiet)[tuner.threads]
            self.now += t
            note = tuner.after_step(t)
            if note:
                notes.append(note)
        return notes


def make(machine: Machine, threads: int, most: int = 2) -> tuple[ThreadTuner, list[int]]:
    calls: list[int] = []
    return ThreadTuner(threads, most, set_threads=calls.append, clock=machine.clock), calls


def test_a_busy_core_moves_the_run_to_fewer_threads_and_back_when_it_frees():
    m = Machine(quiet={1: 0.045, 2: 0.031}, busy={1: 0.06, 2: 0.347})
    tuner, calls = make(m, 2)
    assert m.run(tuner, 50) == [] and calls == []  # quiet at the best count: nothing to try
    m.is_busy = True
    notes = m.run(tuner, 4 * threads_mod.WINDOW)
    assert tuner.threads == 1 and calls == [1]
    assert notes == ["training on 1 thread instead of 2: the machine got busier (347 -> 60 ms a step)"]
    m.run(tuner, 2000)  # still busy: trials of 2 threads fail fast and back off
    assert tuner.threads == 1
    stalled = calls.count(2)
    assert 1 <= stalled <= 2000 * 0.06 / threads_mod.RETRY_SECONDS[0]
    m.is_busy = False
    notes = m.run(tuner, int(threads_mod.RETRY_SECONDS[-1] / 0.045) + 20)
    assert tuner.threads == 2 and notes[-1].startswith("training on 2 threads instead of 1: cores came free")


def test_a_failed_trial_of_more_threads_costs_at_most_two_steps():
    m = Machine(quiet={1: 0.05, 2: 0.5}, busy={})
    tuner, calls = make(m, 1)
    m.now = threads_mod.RETRY_SECONDS[0]
    for _ in range(threads_mod.WINDOW + 1):  # the tuner's first step is not counted
        tuner.after_step(0.05)
    assert calls == [2]
    slow = 0
    while tuner.threads == 2:
        tuner.after_step(0.5)
        slow += 1
    assert calls == [2, 1] and slow == 2  # the step after the change, then the one that shows the stall


def test_slower_steps_that_fewer_threads_cannot_help_become_the_new_normal():
    m = Machine(quiet={1: 0.06, 2: 0.03}, busy={1: 0.12, 2: 0.09})  # e.g. a slower clock: both counts slow
    tuner, calls = make(m, 2)
    m.run(tuner, 20)
    m.is_busy = True
    m.run(tuner, 200)
    assert tuner.threads == 2 and calls == [1, 2]  # tried once, kept 2, then left alone


def test_noise_below_the_threshold_changes_nothing():
    tuner, calls = ThreadTuner(2, 2, set_threads=lambda n: calls.append(n)), []
    for i in range(500):
        tuner.after_step(0.030 * (1.2 if i % 3 == 0 else 1.0))
    assert calls == []


SWITCH_SCRIPT = textwrap.dedent("""
    import json, os, subprocess, sys, torch
    from charnn.training.trainer import Trainer
    torch.set_num_threads(2)
    hogs, notes = [], []
    def callback(event):
        if event["kind"] == "note":
            notes.append(event["message"])
        if event["kind"] == "log" and event["step"] >= 20 and not hogs:
            hogs.extend(subprocess.Popen([sys.executable, "-c", "while True: pass"])
                        for _ in range(int(sys.argv[2])))
    try:
        trainer = Trainer({"corpus": [sys.argv[1]], "max_steps": 70, "out": sys.argv[3], "size": "fixed",
                           "eval_every": 1000, "seed": 1, "base": "none"},
                          {"hidden_size": 256}, callback=callback, adapt_threads=True, handle_sigint=False)
        trainer.run()
        trainer.close()
    finally:
        for h in hogs:
            h.kill()
    print(json.dumps({"threads": torch.get_num_threads(), "notes": notes, "hogs": len(hogs)}))
""")


@pytest.mark.system
def test_a_real_busy_process_started_mid_run_moves_it_to_one_thread(tmp_path, corpus_file):
    """A real run on 2 threads, with real busy processes started at step 20
    (two per core): its steps stall until it trains on one thread, and it says so."""
    cores = len(os.sched_getaffinity(0))
    if cores < 2:
        pytest.skip("needs two cores")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE")}
    # The rest of the suite runs beside this test, so the load before the hogs
    # is not ours to set: a run that began while another test was busy settles
    # on slow steps and may see too little change when the hogs start. Up to
    # three runs, each on a fresh folder; a tuner that never moves fails all.
    tries = []
    for attempt in range(3):
        out = subprocess.run([sys.executable, "-c", SWITCH_SCRIPT, str(corpus_file), str(min(2 * cores, 8)),
                              str(tmp_path / f"run{attempt}")], capture_output=True, text=True, env=env, timeout=300)
        assert out.returncode == 0, out.stderr
        result = json.loads(out.stdout.strip().splitlines()[-1])
        assert result["hogs"] >= 1
        tries.append(result)
        if result["threads"] == 1:
            break
    assert result["threads"] == 1, tries
    assert any(n.startswith("training on 1 thread instead of 2: the machine got busier") for n in result["notes"])


def test_only_a_count_charnn_chose_follows_the_load(monkeypatch):
    """`charnn train` passes adapt_threads=threads_left_open(--threads): a
    count the user gave (--threads, OMP_NUM_THREADS) or torchrun's share stays."""
    from charnn.model.devices import threads_left_open

    for name in ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert threads_left_open(None)
    assert not threads_left_open(2)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert not threads_left_open(None)
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert not threads_left_open(None)


def test_a_tuner_exists_only_for_one_cpu_process():
    import torch

    assert ThreadTuner.for_run(True, torch.device("cpu"), False) is not None
    assert ThreadTuner.for_run(False, torch.device("cpu"), False) is None
    assert ThreadTuner.for_run(True, torch.device("cpu"), True) is None
    assert ThreadTuner.for_run(True, torch.device("meta"), False) is None
