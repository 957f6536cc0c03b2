"""The user's options and what a run decides for itself are kept apart: the
options (TrainConfig) are frozen once validated, the run's own decisions (its
folder, the text's hash, the size and order, the evaluation interval and
slice, its setup time) live in its RunPlan, which the checkpoint records in
train_config; size and order are decided once, before the batcher and the
budget are built."""

from __future__ import annotations

import dataclasses

import pytest

from charnn.storage import checkpoint
from charnn.text import data
from charnn.training import schedule
from charnn.training.config import TrainConfig
from charnn.training.trainer import Trainer

@pytest.fixture
def corpus(corpus_file, data_dir):
    return corpus_file


def options(corpus, out, **kw) -> TrainConfig:
    base = dict(corpus=[str(corpus)], out=str(out), batch_size=4, seq_len=16, precision="fp32", device="cpu",
                sample_every=0, max_steps=4, log_every=1)
    base.update(kw)
    return TrainConfig(**base)


def test_train_config_is_frozen_once_validated():
    cfg = TrainConfig(max_steps=3)
    cfg.eval_every = 2  # before validation: still the user's to fill in
    cfg.validate()
    with pytest.raises(AttributeError, match="frozen once validated"):
        cfg.shuffle = True
    changed = dataclasses.replace(cfg, eval_every=4)
    assert changed.eval_every == 4 and cfg.eval_every == 2


def test_a_run_leaves_the_options_as_given_and_records_its_plan(corpus, tmp_path):
    given = options(corpus, tmp_path / "run")
    t = Trainer(given, handle_sigint=False)
    result = t.run()
    t.close()
    # The options are what the user gave, on the trainer as on the caller's object.
    for cfg in (given, t.cfg):
        assert (cfg.size_reason, cfg.shuffle, cfg.eval_every, cfg.eval_chars, cfg.corpus_hash) == ("", None, None,
                                                                                                   None, "")
    assert t.plan.size_reason and isinstance(t.plan.shuffle, bool) and t.plan.eval_every >= 1
    assert t.plan.corpus_hash == t.corpus.sha256 and t.plan.out == str(tmp_path / "run")
    # The checkpoint records the plan in train_config, under the keys it always had.
    recorded = checkpoint.load(result.last_path).train_config
    assert set(recorded) == set(given.to_dict())
    for key, value in dataclasses.asdict(t.plan).items():
        assert recorded[key] == value, key
    assert TrainConfig.from_dict(recorded).shuffle is t.plan.shuffle


def test_size_and_order_are_decided_once_before_the_batcher_and_budget(corpus, tmp_path, monkeypatch):
    built = {"budget": 0, "stream": 0, "block": 0}

    def counting(cls, key):
        original = cls.__init__

        def init(self, *args, **kwargs):
            built[key] += 1
            original(self, *args, **kwargs)
        monkeypatch.setattr(cls, "__init__", init)

    counting(schedule.Budget, "budget")
    counting(data.StreamBatcher, "stream")
    counting(data.BlockBatcher, "block")
    t = Trainer(options(corpus, tmp_path / "run"), handle_sigint=False)
    t.close()
    assert built["budget"] == 1
    assert t.cfg.size == "auto" and t.cfg.shuffle is None  # both were the run's to decide
    if t.plan.shuffle:  # a BlockBatcher checks its limits with a StreamBatcher of its own
        assert (built["stream"], built["block"]) == (2, 1)
    else:
        assert (built["stream"], built["block"]) == (1, 0)
    assert isinstance(t.batcher, data.BlockBatcher if t.plan.shuffle else data.StreamBatcher)
