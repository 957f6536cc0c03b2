"""Trainer features beyond the basic loop: exact resume, fine-tuning, time
budgets, early stopping, checkpoint rotation, the metrics log, precision."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

from charnn.storage import checkpoint
from charnn.training.config import TrainConfig
from charnn.errors import ConfigError, VocabError
from charnn.model.precision import autocast_precision
from charnn.training.trainer import Trainer, lr_factor, parse_duration, train

TEXT = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, "
    "it was the age of foolishness, it was the epoch of belief, it was the epoch of "
    "incredulity, it was the season of Light, it was the season of Darkness.\n"
) * 12
TINY = {"hidden_size": 16, "num_layers": 2, "dropout": 0.2, "embedding_dim": 8}


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("CHARNN_DATA_DIR", str(tmp_path / "data"))
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def cfg(corpus, out, **kw) -> TrainConfig:
    base = dict(corpus=[str(corpus)], out=str(out), batch_size=4, seq_len=16, precision="fp32",
                device="cpu", sample_every=0, warmup_steps=3, eval_every=5, log_every=1)
    base.update(kw)
    return TrainConfig(**base)


def weights(path):
    return checkpoint.load(path).data["model_state"]


def max_diff(a, b) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_resume_is_bit_exact(corpus, tmp_path):
    # 12 steps straight vs 5 steps + resume to 12: the same bits.
    train(cfg(corpus, tmp_path / "a", max_steps=12, keep=3), TINY, handle_sigint=False)
    train(cfg(corpus, tmp_path / "b", max_steps=12), TINY, resume=tmp_path / "a" / "step-0000005.pt",
          handle_sigint=False)
    straight, resumed = weights(tmp_path / "a" / "last.pt"), weights(tmp_path / "b" / "last.pt")
    assert max_diff(straight, resumed) == 0.0
    a, b = checkpoint.load(tmp_path / "a" / "last.pt"), checkpoint.load(tmp_path / "b" / "last.pt")
    assert a.train_state["step"] == b.train_state["step"] == 12
    assert a.train_state["chars_seen"] == b.train_state["chars_seen"]
    assert a.data["optimizer_state"]["state"][0]["step"] == b.data["optimizer_state"]["state"][0]["step"]


@pytest.mark.parametrize("shuffle", [True, False])
def test_resume_across_an_epoch_boundary_is_exact(corpus, tmp_path, shuffle):
    # Tiny text: one epoch is a few chunks, so the run crosses epoch resets
    # (shuffled: each epoch deals the blocks out in a new order).
    c = cfg(corpus, tmp_path / "a", max_steps=30, keep=6, batch_size=8, seq_len=32, shuffle=shuffle)
    Trainer(c, TINY, handle_sigint=False).run()
    epochs = checkpoint.load(tmp_path / "a" / "last.pt").train_state["epoch"]
    assert epochs >= 1
    train(cfg(corpus, tmp_path / "b", max_steps=30, batch_size=8, seq_len=32, shuffle=shuffle), TINY,
          resume=tmp_path / "a" / "step-0000015.pt", handle_sigint=False)
    assert max_diff(weights(tmp_path / "a" / "last.pt"), weights(tmp_path / "b" / "last.pt")) == 0.0


@pytest.mark.parametrize("shuffle", [True, False])
def test_the_state_is_carried_within_a_block_and_reset_where_one_starts(corpus, tmp_path, shuffle):
    """Shuffled, the next chunk of a row is the next stretch of text only
    within a block: the state is carried there and reset where every row
    starts a new block (in order: only at an epoch's start)."""
    t = Trainer(cfg(corpus, tmp_path / "a", max_steps=100, batch_size=4, seq_len=8, shuffle=shuffle), TINY,
                handle_sigint=False)
    seen = []
    original = t._train_step

    def spy(x, y, n):  # records what the real step is given; changes nothing
        seen.append((t.epoch, t.chunk, t.state is None))
        return original(x, y, n)

    t._train_step = spy
    t.run()
    assert len(seen) == 100 and len({e for e, _, _ in seen}) >= 2  # crosses an epoch
    if shuffle:
        assert 1 < t.batcher.block_chunks < len(t.batcher)
    for epoch, chunk, reset in seen:
        assert reset == (chunk % t.batcher.block_chunks == 0 if shuffle else chunk == 0), (epoch, chunk)


def test_resume_with_a_different_architecture_is_a_clear_error(corpus, tmp_path):
    train(cfg(corpus, tmp_path / "a", max_steps=5), TINY, handle_sigint=False)
    with pytest.raises(ConfigError, match=r"--hidden-size 32 \(checkpoint: 16\)"):
        Trainer(cfg(corpus, tmp_path / "b", max_steps=10), {**TINY, "hidden_size": 32},
                resume=tmp_path / "a" / "last.pt", handle_sigint=False)


def test_init_from_keeps_vocabulary_and_weights(corpus, tmp_path):
    train(cfg(corpus, tmp_path / "a", max_steps=5), TINY, handle_sigint=False)
    base = checkpoint.load(tmp_path / "a" / "last.pt")
    other = tmp_path / "other.txt"
    other.write_text("it was the age of the season of the best " * 20, encoding="utf-8")
    t = Trainer(cfg(other, tmp_path / "b", max_steps=3), None, init_from=tmp_path / "a" / "last.pt",
                handle_sigint=False)
    assert t.tokenizer.chars == base.tokenizer.chars
    assert t.step == 0  # a new run: fresh step count, optimizer and schedule
    assert max_diff(base.data["model_state"], {k: v.cpu() for k, v in t.model.state_dict().items()}) == 0.0
    t.run()
    assert checkpoint.load(tmp_path / "b" / "last.pt").tokenizer.chars == base.tokenizer.chars


def test_init_from_new_characters_needs_extend_vocab(corpus, tmp_path):
    train(cfg(corpus, tmp_path / "a", max_steps=3), TINY, handle_sigint=False)
    other = tmp_path / "other.txt"
    other.write_text("Zebra quartz € jumps! " * 30, encoding="utf-8")
    with pytest.raises(VocabError, match=r"'€' \(U\+20AC\)") as refused:
        Trainer(cfg(other, tmp_path / "b", max_steps=3), None, init_from=tmp_path / "a" / "last.pt",
                handle_sigint=False)
    # Only options `train` has are suggested (it has no --unknown).
    assert "--extend-vocab" in str(refused.value) and "--unknown" not in str(refused.value)
    t = Trainer(cfg(other, tmp_path / "b", max_steps=3), None, init_from=tmp_path / "a" / "last.pt",
                extend_vocab=True, handle_sigint=False)
    old = checkpoint.load(tmp_path / "a" / "last.pt")
    assert set(old.tokenizer.chars) < set(t.tokenizer.chars)
    assert "€" in t.tokenizer.chars and t.tokenizer.chars == sorted(t.tokenizer.chars)
    # The rows of the characters the model knew moved with them.
    for ch, i in old.tokenizer.stoi.items():
        j = t.tokenizer.stoi[ch]
        assert torch.equal(t.model.embedding.weight[j].cpu(), old.data["model_state"]["embedding.weight"][i])
        assert torch.equal(t.model.head.weight[j].cpu(), old.data["model_state"]["head.weight"][i])
    t.run()


def test_time_limit_ends_within_budget(corpus, tmp_path):
    limit = 3.0
    start = time.perf_counter()
    result = train(cfg(corpus, tmp_path / "a", time_limit=limit, eval_every=10**6), TINY,
                   handle_sigint=False)
    wall = time.perf_counter() - start
    assert result.stopped_because == "time_limit"
    assert result.train_state["elapsed"] <= limit + 0.5
    # Startup (reading, building) aside: the run itself, final evaluation and
    # checkpoint included, fits the budget.
    assert wall < limit + 2.0
    assert (tmp_path / "a" / "best.pt").exists() and result.step > 0


def test_patience_stops_early(corpus, tmp_path, monkeypatch):
    losses = iter([3.0, 2.0, 2.5, 2.6, 2.7, 2.8, 2.9])
    monkeypatch.setattr(Trainer, "evaluate", lambda self: next(losses))
    result = train(cfg(corpus, tmp_path / "a", max_steps=100, eval_every=2, patience=2), TINY,
                   handle_sigint=False)
    assert result.stopped_because == "patience"
    assert result.step == 8  # evals at 2, 4 (best), 6 and 8 (no better) -> stop
    assert result.best_val_loss == 2.0


def test_keep_rotates_step_checkpoints_and_log_has_eval_rows(corpus, tmp_path):
    out = tmp_path / "a"
    train(cfg(corpus, out, max_steps=20, eval_every=4, keep=2), TINY, handle_sigint=False)
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


def test_schedule_warms_up_then_decays():
    assert lr_factor(0, 0.0, 10, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 0.0, 10, 0.1) == pytest.approx(1.0)
    assert lr_factor(10, 0.0, 10, 0.1) == pytest.approx(1.0)
    assert lr_factor(50, 0.5, 10, 0.1) == pytest.approx(0.55)
    assert lr_factor(99, 1.0, 10, 0.1) == pytest.approx(0.1)


def test_learning_rate_follows_the_scheduler(corpus, tmp_path):
    rows = []
    train(cfg(corpus, tmp_path / "a", max_steps=10, warmup_steps=2, lr=1e-2, eval_every=100), TINY,
          callback=lambda e: rows.append(e) if e["kind"] == "log" else None, handle_sigint=False)
    lrs = [r["lr"] for r in rows]
    # After step 1 the LR for step 2: warmup done, times the cosine at 10% of the budget.
    assert lrs[0] == pytest.approx(1e-2 * lr_factor(1, 0.1, 2, 0.1))
    assert lrs[0] > 0.97e-2
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))  # then cosine: never rises
    assert lrs[-1] == pytest.approx(1e-3)  # ends at lr * min_lr_ratio


@pytest.mark.parametrize("text,seconds", [("30s", 30), ("5m", 300), ("2h", 7200), ("1h30m", 5400),
                                          ("90", 90), ("1.5m", 90)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["abc", "5x", "-3m", "m", "1h-2m"])
def test_parse_duration_rejects_garbage(text):
    with pytest.raises(ConfigError, match="30s, 5m, 2h"):
        parse_duration(text)


def test_precision_choices_on_cpu(corpus, tmp_path):
    cpu = torch.device("cpu")
    assert autocast_precision("fp32", cpu) == "fp32"
    assert autocast_precision("auto", cpu) in ("fp32", "bf16")
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        autocast_precision("fp16", cpu)
    result = train(cfg(corpus, tmp_path / "a", max_steps=6, precision="bf16"), TINY, handle_sigint=False)
    assert math.isfinite(result.best_val_loss)
    assert checkpoint.load(tmp_path / "a" / "last.pt").data["model_state"]["head.weight"].dtype == torch.float32


def test_resume_accepts_the_same_text_at_a_new_path(corpus, tmp_path):
    train(cfg(corpus, tmp_path / "a", max_steps=4), TINY, handle_sigint=False)
    moved = tmp_path / "moved.txt"
    moved.write_text(TEXT, encoding="utf-8")
    corpus.unlink()
    t = Trainer(cfg(moved, tmp_path / "b", max_steps=6), None, resume=tmp_path / "a" / "last.pt",
                handle_sigint=False)
    assert t.step == 4 and t.run().step == 6


def test_resume_refuses_other_text(corpus, tmp_path):
    from charnn.errors import DataError

    train(cfg(corpus, tmp_path / "a", max_steps=4), TINY, handle_sigint=False)
    other = tmp_path / "other.txt"
    other.write_text(TEXT.upper(), encoding="utf-8")
    with pytest.raises(DataError, match="--init-from"):
        Trainer(cfg(other, tmp_path / "b", max_steps=6), None, resume=tmp_path / "a" / "last.pt",
                handle_sigint=False)
