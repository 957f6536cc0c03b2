"""--size auto: the rule (charnn.model.sizing) and what a run records and says."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import pytest

from charnn.storage import checkpoint as ckpt_mod
from charnn.model import sizing
from charnn.training.config import TrainConfig
from charnn.errors import ConfigError
from charnn.training.trainer import Trainer

from conftest import invoke, make_text


def test_recurrent_params_match_a_real_model():
    from charnn.model.config import ModelConfig
    from charnn.model.rnn import CharRNN

    for shape in sizing.LADDER[:3]:
        for cell in ("lstm", "gru", "rnn"):
            model = CharRNN(ModelConfig(cell=cell, vocab_size=77, hidden_size=shape.hidden_size,
                                        num_layers=shape.num_layers, embedding_dim=shape.embedding_dim))
            embedding = model.embedding.weight.numel()
            assert sizing.recurrent_params(shape, 77, cell) == model.num_parameters() - embedding


def test_the_ladder_grows_and_holds_the_old_default():
    params = [sizing.recurrent_params(s, 100) for s in sizing.LADDER]
    assert params == sorted(params) and len(set(params)) == len(params)
    assert sizing.Shape(320, 2, 128) in sizing.LADDER


def test_more_steps_never_choose_a_smaller_model():
    last = -1
    for steps in (50, 200, 1000, 3000, 10_000, 50_000, 10 ** 6):
        c = sizing.choose(train_chars=50_000_000, vocab_size=100, tokens_per_step=1024, steps=steps)
        size = sizing.LADDER.index(c.shape)
        assert size >= last
        last = size
    assert last == len(sizing.LADDER) - 1  # a big text and a long budget reach the top


def _measured(steps_by_shape):
    """A step_time that gives each ladder shape the steps a real run made in
    the budget (benchmarks/results/fit.csv), scaled to ``seconds=1.0``."""
    return lambda shape: 1.0 / steps_by_shape[shape.name]


# Steps that real 1-, 5- and 20-minute runs made per shape (fit.csv, seed
# 1337; shapes not run there estimated in proportion to their weights), the
# training characters and alphabet of each text, how the run read it, and the
# shape that won. Left out: Python's source at 20 minutes, where read in order
# 2x192 won (the batcher's doing, see sizing's comment) and the rule now
# chooses 2x320.
SUITE_CELLS = [
    # corpus, budget, train chars, vocab, order, steps per shape, the best shape
    ("python-src", "5m", 18_916_421, 353, "in order",
     {"2x128": 9883, "2x192": 6000, "2x256": 4000, "2x320": 2500, "2x448": 1347, "3x512": 663}, "2x192"),
    ("python-src", "5m", 18_916_421, 353, "shuffled",
     {"2x128": 9883, "2x192": 6001, "2x256": 4175, "2x320": 2500, "2x448": 1347, "3x512": 663}, "2x192"),
    ("python-docs", "5m", 9_959_135, 203, "shuffled",
     {"2x128": 10849, "2x192": 6551, "2x256": 3973, "2x320": 2400, "2x448": 1300, "3x512": 600}, "2x192"),
    ("war-and-peace", "5m", 2_876_592, 82, "in order",
     {"2x128": 14711, "2x192": 6765, "2x256": 4279, "2x320": 2500, "2x448": 1328, "3x512": 640}, "2x256"),
    ("war-and-peace", "20m", 2_876_592, 82, "in order",
     {"2x128": 69603, "2x192": 33000, "2x256": 14510, "2x320": 11828, "2x448": 6281, "3x512": 3030}, "2x320"),
    ("jargon", "5m", 1_456_881, 155, "in order",
     {"2x128": 10264, "2x192": 7041, "2x256": 4432, "2x320": 2811, "2x448": 1499, "3x512": 727}, "2x256"),
    ("jargon", "1m", 1_456_881, 155, "shuffled",
     {"2x128": 2182, "2x192": 1326, "2x256": 688, "2x320": 459, "2x448": 250, "3x512": 114}, "2x128"),
]


@pytest.mark.parametrize("corpus,budget,chars,vocab,order,steps,best", SUITE_CELLS,
                         ids=[f"{c[0]}-{c[1]}-{c[4].replace(' ', '-')}" for c in SUITE_CELLS])
def test_the_rule_picks_the_measured_best_shape_from_the_steps_real_runs_made(corpus, budget, chars, vocab,
                                                                               order, steps, best):
    c = sizing.choose(train_chars=chars, vocab_size=vocab, tokens_per_step=1024, seconds=1.0,
                      step_time=_measured(steps))
    assert c.shape.name == best, c.reason


def test_reading_the_text_once_is_not_a_reason_for_a_smaller_shape():
    # Read in shuffled blocks, a run short of one epoch has read from all over
    # its text: 2x192 at 0.8 epochs with steps to spare is chosen over 2x128
    # at 1.2 (read in order, charnn 0.1 refused it; see sizing's comment).
    chars = 10_000_000
    steps = {"2x128": int(1.2 * chars / 1024), "2x192": math.ceil(0.8 * chars / 1024)}
    steps.update({s.name: 10 for s in sizing.LADDER[2:]})
    c = sizing.choose(train_chars=chars, vocab_size=100, tokens_per_step=1024, seconds=1.0,
                      step_time=_measured(steps))
    assert sizing.recurrent_params(sizing.LADDER[1], 100) * sizing.STEPS_PER_MPARAM_PART / 1e6 < steps["2x192"]
    assert c.shape == sizing.LADDER[1] and "2x256 would get 10 steps" in c.reason


def test_a_shape_short_of_one_epoch_needs_more_steps_per_weight():
    p = sizing.recurrent_params(sizing.LADDER[1], 100)
    steps = math.ceil(sizing.STEPS_PER_MPARAM * p / 1e6) + 10  # enough if it reads its text once
    assert steps < sizing.STEPS_PER_MPARAM_PART * p / 1e6
    once = sizing.choose(train_chars=steps * 1024 // 2, vocab_size=100, tokens_per_step=1024, steps=steps)
    part = sizing.choose(train_chars=steps * 1024 * 2, vocab_size=100, tokens_per_step=1024, steps=steps)
    assert once.shape == sizing.LADDER[1] and once.epochs == pytest.approx(2, rel=0.01)
    assert part.shape == sizing.LADDER[0] and "needs about" in part.reason


def test_a_text_too_small_for_any_shape_gets_the_small_text_shape_and_more_dropout():
    small = sizing.choose(train_chars=30_000, vocab_size=2600, tokens_per_step=1024, steps=1000)
    large = sizing.choose(train_chars=30_000_000, vocab_size=100, tokens_per_step=1024, steps=1000)
    assert small.shape == sizing.SMALL_TEXT_SHAPE and "small for any model" in small.reason
    assert small.epochs > 30 and small.dropout > large.dropout
    # a text the smallest shape fits, but not the next: the smallest
    fits = sizing.choose(train_chars=200_000, vocab_size=80, tokens_per_step=1024, steps=10 ** 6)
    assert fits.shape == sizing.LADDER[0] and "would overfit" in fits.reason


def test_dropout_rises_with_epochs():
    values = [sizing.dropout_for(e) for e in (0.1, 1, 3, 10, 100, math.inf)]
    assert values == sorted(values) and values[0] < values[-1]


def test_a_time_budget_is_turned_into_steps_per_shape():
    timed = []

    def step_time(shape):
        timed.append(shape)
        return 1e-7 * sizing.recurrent_params(shape, 100)  # bigger is slower

    c = sizing.choose(train_chars=10_000_000, vocab_size=100, tokens_per_step=1024, seconds=300.0,
                      step_time=step_time)
    assert c.steps == int(300.0 / step_time(c.shape))
    # shapes are timed smallest first, and no further than one past the choice
    assert timed[: len(set(timed))] == list(sizing.LADDER[: len(set(timed))])
    assert len(set(timed)) <= sizing.LADDER.index(c.shape) + 2
    # a step budget that is smaller than what the time buys wins
    d = sizing.choose(train_chars=10_000_000, vocab_size=100, tokens_per_step=1024, seconds=300.0,
                      step_time=step_time, steps=100)
    assert d.steps <= 100


def test_given_values_win_and_are_said():
    c = sizing.choose(train_chars=3_000_000, vocab_size=80, tokens_per_step=1024, steps=3000,
                      given={"hidden_size": 700, "dropout": 0.3})
    assert c.shape.hidden_size == 700 and c.dropout == 0.3
    assert "given" in c.reason and "auto chose" in c.reason
    full = sizing.choose(train_chars=3_000_000, vocab_size=80, tokens_per_step=1024, seconds=60.0,
                         step_time=lambda s: pytest.fail("nothing to time when everything is given"),
                         given={"hidden_size": 64, "num_layers": 1, "embedding_dim": 8, "dropout": 0.0})
    assert full.overrides() == {"hidden_size": 64, "num_layers": 1, "embedding_dim": 8, "dropout": 0.0}


def test_no_text_is_a_clear_error():
    with pytest.raises(ConfigError):
        sizing.choose(train_chars=0, vocab_size=10, tokens_per_step=1024, steps=10)


def test_step_seconds_takes_the_median_of_real_timings():
    import time

    calls = []

    def run(n):
        calls.append(n)
        time.sleep(0.01 * n)

    t = sizing.step_seconds(run, steps=3, warmup=1)
    assert calls == [1, 1, 1, 1]
    assert 0.009 <= t < 0.2


# -- through the trainer and the CLI -------------------------------------------

@pytest.fixture()
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(make_text(30_000), encoding="utf-8")
    return path


def _train(text_file, out, **options):
    cfg = TrainConfig(corpus=[str(text_file)], out=str(out), sample_every=0, **options)
    trainer = Trainer(cfg, {})
    try:
        trainer.run()
    finally:
        trainer.close()
    return ckpt_mod.load(out / "last.pt")


def test_a_new_run_records_its_choice_and_the_reason(text_file, tmp_path):
    ck = _train(text_file, tmp_path / "auto", max_steps=3)
    tc = ck.train_config
    assert tc["size"] == "auto"
    assert "->" in tc["size_reason"] and "steps" in tc["size_reason"]
    shape = sizing.Shape(ck.model_config.hidden_size, ck.model_config.num_layers, ck.model_config.embedding_dim)
    assert shape in sizing.LADDER
    assert f"dropout {ck.model_config.dropout:g}" in tc["size_reason"]


def test_size_fixed_is_the_old_default(text_file, tmp_path):
    ck = _train(text_file, tmp_path / "fixed", max_steps=2, size="fixed")
    mc = ck.model_config
    assert (mc.hidden_size, mc.num_layers, mc.embedding_dim, mc.dropout) == (320, 2, 128, 0.1)
    assert ck.train_config["size_reason"] == ""


def test_a_time_budget_times_real_models_and_counts_the_time(text_file, tmp_path):
    rows = []
    cfg = TrainConfig(corpus=[str(text_file)], out=str(tmp_path / "timed"), sample_every=0, time_limit=6.0,
                      log_every=1)
    trainer = Trainer(cfg, {}, callback=lambda e: rows.append(e) if e["kind"] == "log" else None)
    try:
        trainer.run()
    finally:
        trainer.close()
    ck = ckpt_mod.load(tmp_path / "timed" / "last.pt")
    reason = ck.train_config["size_reason"]
    assert " s = ~" in reason  # "... 5.1 s = ~N steps = E epochs -> ..."
    assert ck.train_state["elapsed"] <= 6.0 + 1.0
    setup = ck.train_config["setup_seconds"]
    assert 0 < setup < ck.train_state["elapsed"]
    # The probe's share of the budget does not count as warmup: the learning
    # rate still rises from a low start (the warmup once counted the probe's
    # seconds, and a probe past 5% of the budget meant no warmup at all).
    lrs = [r["lr"] for r in rows]
    assert lrs[0] < 0.5 * max(lrs) and lrs.index(max(lrs)) > 0


@pytest.mark.parametrize("given,probed", [({}, 0.0), ({"dropout": 0.25}, 0.25)])
def test_the_probe_times_the_dropout_the_run_will_use(tmp_path, monkeypatch, given, probed):
    # A spy, not a mock: the real timing runs; only the models it is handed are
    # recorded. (A dropout-0.1 step is slower than a dropout-0 one, so timing
    # 0.1 for a run that trains with 0 under-counted its steps.)
    seen = []
    real = sizing.time_training_steps

    def spy(model, *args, **kwargs):
        seen.append(model.config.dropout)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(sizing, "time_training_steps", spy)
    big = tmp_path / "big.txt"  # enough text for the smallest shape: it is timed
    big.write_text(make_text(200_000), encoding="utf-8")
    cfg = TrainConfig(corpus=[str(big)], out=str(tmp_path / "probe"), sample_every=0, time_limit=4.0)
    trainer = Trainer(cfg, dict(given))
    trainer.close()
    assert seen and set(seen) == {probed}


def test_the_cli_says_the_choice_and_given_options_win(text_file, tmp_path):
    out = tmp_path / "cli"
    r = invoke("train", str(text_file), "--max-steps", "2", "-o", str(out), "--hidden-size", "48",
               "--sample-every", "0")
    assert r.exit_code == 0, r.output
    line = next(ln for ln in r.output.splitlines() if ln.startswith("size:"))
    assert "2x48" in line or "x48" in line
    ck = ckpt_mod.load(out / "best.pt")
    assert ck.model_config.hidden_size == 48


def test_resume_keeps_the_choice_and_refuses_another_size(text_file, tmp_path):
    out = tmp_path / "resume"
    r = invoke("train", str(text_file), "--max-steps", "2", "-o", str(out), "--sample-every", "0")
    assert r.exit_code == 0, r.output
    first = ckpt_mod.load(out / "last.pt")
    r = invoke("train", "--resume", str(out / "last.pt"), "--max-steps", "4")
    assert r.exit_code == 0, r.output
    again = ckpt_mod.load(out / "last.pt")
    assert again.model_config == first.model_config
    assert again.train_config["size_reason"] == first.train_config["size_reason"]
    r = invoke("train", "--resume", str(out / "last.pt"), "--max-steps", "6", "--size", "fixed")
    assert r.exit_code != 0 and "--size" in r.output and "--init-from" in r.output


def test_a_checkpoint_from_before_size_auto_reads_as_fixed(text_file, tmp_path):
    cfg = TrainConfig.from_dict({k: v for k, v in TrainConfig().to_dict().items() if k not in ("size", "size_reason")})
    assert cfg.size == "fixed"
    with pytest.raises(ConfigError, match="--size"):
        TrainConfig(size="huge").validate()


def test_a_shape_that_does_not_fit_in_memory_buys_no_steps():
    # The trainer's probe answers math.inf for a shape check_memory refuses.
    too_big = sizing.LADDER[2]

    def step_time(shape):
        return math.inf if sizing.recurrent_params(shape, 100) >= sizing.recurrent_params(too_big, 100) else 1e-4

    c = sizing.choose(train_chars=50_000_000, vocab_size=100, tokens_per_step=1024, seconds=3600.0,
                      step_time=step_time)
    assert c.shape == sizing.LADDER[1] and "0 steps" in c.reason


def test_an_untimed_shape_is_estimated_from_the_largest_timed_one():
    small, mid, big = sizing.LADDER[0], sizing.LADDER[1], sizing.LADDER[3]
    assert sizing.scaled_step_time(big, {}, 80) is None
    t = sizing.scaled_step_time(big, {small: 0.01, mid: 0.02, sizing.LADDER[5]: math.inf}, 80, "gru")
    assert t == pytest.approx(0.02 * sizing.recurrent_params(big, 80, "gru") / sizing.recurrent_params(mid, 80, "gru"))


@pytest.mark.system
def test_a_short_budget_plans_the_steps_its_run_makes(tmp_path):
    """A fresh `charnn train` with a 20 s budget, as a user types it: torch's
    one-time set-up (about 0.9 s, in a new process's first step) is paid
    before the probe times shapes, so it neither inflates the first shape's
    step nor uses up the probe's 3% of the budget. With it inside, the size
    line promised a tenth of the steps the run made and chose the smallest
    shape ("the budget is short for any model")."""
    text = tmp_path / "text.txt"
    text.write_text(make_text(400_000), encoding="utf-8")
    env = {**os.environ, "CHARNN_DATA_DIR": str(tmp_path / "data")}
    proc = subprocess.run([sys.executable, "-m", "charnn", "train", str(text), "-o", str(tmp_path / "run"),
                           "--time-limit", "20s", "--base", "none", "--sample-every", "0"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = " ".join(proc.stderr.split())  # rich wraps long lines
    planned = re.search(r"size: .*? = ~([\d,]+) steps", said)
    measured = re.search(r"about ([\d,]+) steps fit the budget", said)
    assert planned and measured, said[-3000:]
    ratio = int(planned.group(1).replace(",", "")) / int(measured.group(1).replace(",", ""))
    assert 1 / 2 <= ratio <= 2, said[-3000:]
