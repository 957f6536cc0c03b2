"""The training loop: checkpoints at every evaluation, the metrics log, step and
epoch budgets, the validation figure, early stopping, --keep rotation and
precision. (Resume: test_resume.py; time limits and the schedule:
test_schedule.py; NaN handling: test_training_nonfinite.py.)"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from charnn.model.devices import cpu_has_amx
from charnn.model.precision import autocast_precision
from charnn.storage import checkpoint
from charnn.storage.checkpoint import load, load_model
from charnn.training.trainer import Trainer, train
from charnn.text.data import StreamBatcher, read_corpus, split_ids
from charnn.errors import ConfigError, DataError
from charnn.analysis.evaluate import evaluate_ids

from conftest import TALE_MODEL, make_text, tale_config, train_tiny


def _eval_rows(path):
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    return rows, [r for r in rows if "val_loss" in r]


def test_checkpoints_written_at_every_eval_and_end(trained):
    assert trained.best.is_file() and trained.last.is_file()
    ckpt_events = [e for e in trained.events if e["kind"] == "checkpoint"]
    assert [e["step"] for e in ckpt_events] == [10, 20]
    for e in ckpt_events:
        assert str(trained.last) in e["paths"]
    assert load(trained.last).train_state["step"] == 20
    assert trained.result.last_path == trained.last
    assert trained.result.best_path == trained.best
    # No stray temp files in the output folder: the checkpoints, the log, and
    # the run folder's marker and (released) lock.
    assert sorted(p.name for p in trained.out.iterdir()) == [
        ".charnn-run", ".charnn.lock", "best.pt", "last.pt", "metrics.jsonl"]
    assert (trained.out / ".charnn.lock").stat().st_size == 0  # emptied: the run ended cleanly


def test_metrics_jsonl_has_eval_rows(trained):
    rows, evals = _eval_rows(trained.out)
    assert [r["step"] for r in evals] == [10, 20]
    for r in evals:
        assert math.isfinite(r["val_loss"]) and r["val_loss"] > 0
        assert r["val_bpc"] == pytest.approx(r["val_loss"] / math.log(2))
    logs = [r for r in rows if "train_loss" in r]
    assert [r["step"] for r in logs] == [5, 10, 15, 20]
    assert all({"lr", "grad_norm", "chars_per_sec"} <= set(r) for r in logs)


def test_events_and_no_printing(trained):
    kinds = [e["kind"] for e in trained.events]
    assert kinds[0] == "start" and kinds[-1] == "end"
    assert {"log", "eval", "checkpoint"} <= set(kinds)
    end = trained.events[-1]
    assert end["step"] == 20 and end["stopped_because"] == "max_steps"


def test_library_prints_nothing(tmp_path, corpus_file, capfd):
    train_tiny(corpus_file, tmp_path / "out", max_steps=2, eval_every=2)
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_loss_decreases(trained):
    logs = [e["train_loss"] for e in trained.events if e["kind"] == "log"]
    assert logs[-1] < logs[0] - 0.3, logs
    evals = [e["val_loss"] for e in trained.events if e["kind"] == "eval"]
    vocab = load(trained.best).model_config.vocab_size
    assert evals[-1] < evals[0] < math.log(vocab)


def test_best_is_lowest_validation_loss_and_equals_evaluate_ids(trained):
    _, evals = _eval_rows(trained.out)
    best_row = min(evals, key=lambda r: r["val_loss"])
    model, tok, ckpt = load_model(trained.best)
    assert ckpt.train_state["step"] == best_row["step"]
    assert ckpt.train_state["best_val"] == pytest.approx(best_row["val_loss"], abs=1e-9)
    assert trained.result.best_val_loss == pytest.approx(best_row["val_loss"], abs=1e-9)

    ids = tok.encode_array(read_corpus([trained.corpus]).text)
    _, val = split_ids(ids, 0.1)
    assert len(val) == round(len(ids) * 0.1)
    figure = evaluate_ids(model, val)
    assert figure.chars == len(val) - 1
    assert figure.loss == pytest.approx(best_row["val_loss"], rel=1e-5)
    # ... which is the single-stream figure: state carried through the whole split
    x = torch.as_tensor(np.asarray(val, dtype=np.int64))[None]
    with torch.no_grad():
        logits, _ = model(x[:, :-1])
    single = torch.nn.functional.cross_entropy(logits[0], x[0, 1:]).item()
    assert figure.loss == pytest.approx(single, rel=1e-4)


def test_final_eval_when_budget_ends_between_evals(tmp_path, corpus_file):
    run = train_tiny(corpus_file, tmp_path / "out", max_steps=7, eval_every=5, log_every=100)
    assert run.result.step == 7
    _, evals = _eval_rows(run.out)
    assert [r["step"] for r in evals] == [5, 7]
    assert load(run.last).train_state["step"] == 7


def test_epoch_budget(tmp_path):
    corpus = tmp_path / "small.txt"
    corpus.write_text(make_text(2000, seed=1), encoding="utf-8")
    text = read_corpus([corpus]).text
    train_ids, _ = split_ids(np.zeros(len(text)), 0.1)
    batcher = StreamBatcher(train_ids, 8, 32)
    one = train_tiny(corpus, tmp_path / "one", max_steps=0, epochs=1, eval_every=1000)
    assert one.result.step == len(batcher)
    assert one.result.stopped_because == "epochs"
    # every training target is seen exactly once in one epoch
    assert one.result.train_state["chars_seen"] == len(train_ids) - 1
    half = train_tiny(corpus, tmp_path / "half", max_steps=0, epochs=0.5, eval_every=1000)
    assert half.result.step == math.ceil(len(batcher) / 2)
    # the smaller of two budgets wins
    both = train_tiny(corpus, tmp_path / "both", max_steps=3, epochs=1, eval_every=1000)
    assert both.result.step == 3


def test_a_small_text_trained_for_many_epochs_is_evaluated_every_epoch(tmp_path):
    """The user's command on a small text, no --eval-every: with 40 epochs in
    the budget, best.pt must be able to keep a point within each epoch or so."""
    corpus = tmp_path / "small.txt"
    corpus.write_text(make_text(6000, seed=2), encoding="utf-8")
    text = read_corpus([corpus]).text
    train_ids, _ = split_ids(np.zeros(len(text)), 0.1)
    per_epoch = len(StreamBatcher(train_ids, 8, 32))
    run = train_tiny(corpus, tmp_path / "out", max_steps=0, epochs=40, eval_every=None)
    every = torch.load(run.last, weights_only=False)["train_config"]["eval_every"]
    assert every <= 2 * per_epoch < 40 * per_epoch // 8  # the old rule: 8 evaluations, 5 epochs apart
    evals = [e["step"] for e in run.events if e["kind"] == "eval"]
    assert len(evals) >= 20 and evals[0] <= 2 * per_epoch


def test_no_budget_is_config_error(tmp_path, corpus_file):
    with pytest.raises(ConfigError, match="budget"):
        train_tiny(corpus_file, tmp_path / "out", max_steps=0)


def test_too_short_corpus_is_data_error(tmp_path):
    corpus = tmp_path / "short.txt"
    corpus.write_text("just a few words\n", encoding="utf-8")
    with pytest.raises(DataError, match="too short"):
        train_tiny(corpus, tmp_path / "out")


def test_seeded_runs_are_identical(tmp_path, corpus_file):
    a = train_tiny(corpus_file, tmp_path / "a", max_steps=4, eval_every=4)
    b = train_tiny(corpus_file, tmp_path / "b", max_steps=4, eval_every=4)
    sa = load(a.last).data["model_state"]
    sb = load(b.last).data["model_state"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_patience_stops_early(tale, tmp_path, monkeypatch):
    losses = iter([3.0, 2.0, 2.5, 2.6, 2.7, 2.8, 2.9])
    monkeypatch.setattr(Trainer, "evaluate", lambda self: next(losses))
    result = train(tale_config(tale, tmp_path / "a", max_steps=100, eval_every=2, patience=2), TALE_MODEL,
                   handle_sigint=False)
    assert result.stopped_because == "patience"
    assert result.step == 8  # evals at 2, 4 (best), 6 and 8 (no better) -> stop
    assert result.best_val_loss == 2.0


def test_keep_rotates_step_checkpoints_and_log_has_eval_rows(tale, tmp_path):
    out = tmp_path / "a"
    train(tale_config(tale, out, max_steps=20, eval_every=4, keep=2), TALE_MODEL, handle_sigint=False)
    assert sorted(p.name for p in out.glob("step-*.pt")) == ["step-0000016.pt", "step-0000020.pt"]
    assert not list(out.glob(".charnn-tmp-*"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [4, 8, 12, 16, 20]
    assert all(math.isfinite(r["val_loss"]) and r["val_bpc"] == pytest.approx(r["val_loss"] / math.log(2))
               for r in evals)
    logs = [r for r in rows if "train_loss" in r]
    assert len(logs) == 20 and {"lr", "grad_norm", "chars_per_sec", "clipped_share"} <= set(logs[0])
    best = checkpoint.load(out / "best.pt")
    assert best.train_state["best_val"] == min(r["val_loss"] for r in evals)


def test_precision_choices_on_cpu(tale, tmp_path):
    cpu = torch.device("cpu")
    assert autocast_precision("fp32", cpu) == "fp32"
    assert autocast_precision("auto", cpu) == ("bf16" if cpu_has_amx() else "fp32")
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        autocast_precision("fp16", cpu)
    result = train(tale_config(tale, tmp_path / "a", max_steps=6, precision="bf16"), TALE_MODEL, handle_sigint=False)
    assert math.isfinite(result.best_val_loss)
    assert checkpoint.load(tmp_path / "a" / "last.pt").data["model_state"]["head.weight"].dtype == torch.float32
