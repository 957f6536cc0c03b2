"""Non-finite values: the trainer's guard skips NaN steps, restores the last
good state (halving the LR) after ``nan_tolerance`` in a row, and after 3
restores stops with a TrainingError naming the last good checkpoint, which
stays intact and loadable."""

from __future__ import annotations

import math

import pytest
import torch
from typer.testing import CliRunner

import charnn.storage.checkpoint as ckpt_mod
from charnn.cli import app
from charnn.errors import TrainingError
from charnn.training.trainer import Trainer
from robust_helpers import TINY_OVERRIDES, TINY_TRAIN, snapshot, tiny_train_config, write_corpus


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("CHARNN_DATA_DIR", str(tmp_path / "data"))
    return write_corpus(tmp_path / "corpus.txt", n_words=600)


def _trainer(corpus, out, **kw):
    events: list[dict] = []
    cfg = tiny_train_config(corpus, out, **kw)
    trainer = Trainer(cfg, dict(TINY_OVERRIDES), callback=events.append, handle_sigint=False, cache=False)
    return trainer, events


def _poison(trainer: Trainer, bad_calls) -> list[int]:
    """Make the training forward pass return NaN logits on the given calls
    (counted from 0, training mode only: evaluation stays clean)."""
    model = trainer.model
    real_forward = model.forward
    calls = [0]

    def forward(ids, state=None):
        logits, new_state = real_forward(ids, state)
        if model.training:
            n = calls[0]
            calls[0] += 1
            if bad_calls(n):
                logits = logits * float("nan")
        return logits, new_state

    model.forward = forward
    return calls


def _all_finite(path) -> bool:
    data = torch.load(path, weights_only=True)
    return all(bool(torch.isfinite(t).all()) for t in data["model_state"].values())


def test_isolated_nan_steps_are_skipped_and_counted(corpus, tmp_path):
    trainer, events = _trainer(corpus, tmp_path / "out", max_steps=8, eval_every=4, nan_tolerance=3)
    _poison(trainer, lambda n: n in (2, 3, 6))  # never 3 in a row
    result = trainer.run()
    assert result.step == 8
    ts = ckpt_mod.load(tmp_path / "out" / "last.pt").train_state
    assert ts["nonfinite_skipped"] == 3
    assert ts["restores"] == 0 and ts["lr_scale"] == 1.0
    warnings = [e["message"] for e in events if e["kind"] == "warning"]
    assert sum("step skipped" in w for w in warnings) == 3
    assert _all_finite(tmp_path / "out" / "last.pt")
    assert math.isfinite(result.best_val_loss)


def test_a_run_of_nans_restores_and_halves_the_lr(corpus, tmp_path):
    trainer, events = _trainer(corpus, tmp_path / "out", max_steps=8, eval_every=2, nan_tolerance=3)
    _poison(trainer, lambda n: 3 <= n < 6)  # exactly nan_tolerance in a row
    result = trainer.run()
    assert result.step == 8 and result.stopped_because == "max_steps"
    ts = ckpt_mod.load(tmp_path / "out" / "last.pt").train_state
    assert ts["nonfinite_skipped"] == 3
    assert ts["restores"] == 1 and ts["lr_scale"] == 0.5
    assert any("restored the last good state" in e["message"] for e in events if e["kind"] == "warning")
    for p in (tmp_path / "out").glob("*.pt"):
        assert _all_finite(p)


def test_endless_nans_stop_with_the_last_good_checkpoint_intact(corpus, tmp_path):
    out = tmp_path / "out"
    trainer, events = _trainer(corpus, out, max_steps=50, eval_every=2, nan_tolerance=2)
    _poison(trainer, lambda n: n >= 5)  # steps 0-4 are fine; checkpoint at step 4
    with pytest.raises(TrainingError) as info:
        trainer.run()
    message = str(info.value)
    assert "diverged" in message and str(out / "last.pt") in message, message
    ck = ckpt_mod.load(out / "last.pt")
    assert ck.train_state["step"] == 4
    assert _all_finite(out / "last.pt")
    assert trainer.restores == 3
    restores = [e for e in events if e["kind"] == "warning" and "restored" in e["message"]]
    assert len(restores) == 3


def test_nan_before_any_checkpoint_says_so(corpus, tmp_path):
    trainer, _ = _trainer(corpus, tmp_path / "out", max_steps=50, eval_every=100, nan_tolerance=1)
    _poison(trainer, lambda n: True)
    with pytest.raises(TrainingError, match="no checkpoint was written yet"):
        trainer.run()
    assert not list((tmp_path / "out").glob("*.pt"))


def test_poisoned_parameter_is_recovered_from(corpus, tmp_path):
    """A NaN weight (e.g. a bit flip in memory) after a good snapshot: the
    guard restores the snapshot and training goes on."""
    trainer, _ = _trainer(corpus, tmp_path / "out", max_steps=6, eval_every=2, nan_tolerance=2)
    real_step = trainer._train_step
    calls = [0]

    def step(*args):
        calls[0] += 1
        if calls[0] == 4:
            with torch.no_grad():
                trainer.model.head.bias[0] = float("nan")
        return real_step(*args)

    trainer._train_step = step
    result = trainer.run()
    assert result.step == 6
    ts = ckpt_mod.load(tmp_path / "out" / "last.pt").train_state
    assert ts["restores"] == 1 and ts["nonfinite_skipped"] == 2
    assert _all_finite(tmp_path / "out" / "last.pt")


@pytest.mark.parametrize("lr", ["1e30", "1e38"])
def test_absurd_lr_via_cli_stops_cleanly_and_keeps_a_loadable_checkpoint(corpus, tmp_path, lr):
    """An absurd LR with clipping off: the run stops with ``Error:`` (or
    recovers); every checkpoint it leaves loads and holds finite weights."""
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["train", str(corpus), *TINY_TRAIN, "--out", str(out), "--lr", lr,
                                      "--grad-clip", "0", "--max-steps", "30", "--eval-every", "1"])
    assert "Traceback" not in result.output, result.output
    assert result.exit_code in (0, 1), result.output
    if result.exit_code == 1:
        assert "Error: training diverged" in result.stderr, result.stderr
        assert str(out / "last.pt") in result.stderr
    for p in out.glob("*.pt"):
        ckpt_mod.load(p)  # refuses NaN/inf weights
        assert _all_finite(p)
    if (out / "last.pt").exists():
        # The "last good checkpoint" really is usable: sample from it.
        sampled = CliRunner().invoke(app, ["sample", str(out / "last.pt"), "-n", "20", "--seed", "0"])
        assert sampled.exit_code == 0, sampled.output


def test_nan_guard_leaves_earlier_checkpoints_untouched(corpus, tmp_path):
    out = tmp_path / "out"
    trainer, _ = _trainer(corpus, out, max_steps=4, eval_every=2, keep=5)
    trainer.run()
    trainer.close()
    before = snapshot(out)
    # The run resumed with a larger budget diverges at once: it writes nothing.
    trainer2 = Trainer({"max_steps": 50, "nan_tolerance": 1}, resume=out / "last.pt", handle_sigint=False,
                       cache=False)
    _poison(trainer2, lambda n: True)
    with pytest.raises(TrainingError):
        trainer2.run()
    trainer2.close()
    after = snapshot(out)
    assert {k: v for k, v in after.items() if k.endswith(".pt")} == {
        k: v for k, v in before.items() if k.endswith(".pt")}
