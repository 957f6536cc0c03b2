"""Data-parallel training under torchrun: 2 ranks (gloo, CPU) give the same
weights as one process with the same global batch and seed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from charnn import checkpoint
from charnn.config import TrainConfig
from charnn.errors import ConfigError
from charnn.train import Trainer, train

TEXT = ("Happy families are all alike; every unhappy family is unhappy in its own way. "
        "Everything was in confusion in the Oblonskys' house.\n") * 40
OPTS = ["--max-steps", "20", "--batch-size", "16", "--seq-len", "32", "--hidden-size", "32",
        "--num-layers", "2", "--dropout", "0", "--precision", "fp32", "--device", "cpu",
        "--eval-every", "10", "--sample-every", "0"]


@pytest.mark.skipif(shutil.which("torchrun") is None and not os.path.exists(
    os.path.join(os.path.dirname(sys.executable), "torchrun")), reason="torchrun not installed")
def test_two_ranks_match_one_process(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    env = {**os.environ, "CHARNN_DATA_DIR": str(tmp_path / "data"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "charnn", "train", str(corpus), "--out", str(tmp_path / "ddp"), *OPTS]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("Done: 20 steps") == 1  # only rank 0 reports

    os.environ["CHARNN_DATA_DIR"] = str(tmp_path / "data")
    try:
        train(TrainConfig(corpus=[str(corpus)], out=str(tmp_path / "one"), max_steps=20, batch_size=16,
                          seq_len=32, precision="fp32", device="cpu", eval_every=10, sample_every=0),
              {"hidden_size": 32, "num_layers": 2, "dropout": 0.0}, handle_sigint=False)
    finally:
        del os.environ["CHARNN_DATA_DIR"]
    ddp = checkpoint.load(tmp_path / "ddp" / "last.pt")
    one = checkpoint.load(tmp_path / "one" / "last.pt")
    diff = max((ddp.data["model_state"][k] - one.data["model_state"][k]).abs().max().item()
               for k in one.data["model_state"])
    assert diff <= 1e-4
    assert ddp.train_state["step"] == 20
    assert ddp.train_state["best_val"] == pytest.approx(one.train_state["best_val"], rel=1e-5)
    # The carried state of all 16 streams is saved, not one rank's share.
    assert ddp.train_state["carried_state"][0].shape == (2, 16, 32)
    # The logged training loss is the whole batch's, not rank 0's share of it.
    import json

    def train_losses(folder):
        rows = [json.loads(r) for r in (folder / "metrics.jsonl").read_text().splitlines()]
        return [r["train_loss"] for r in rows if "train_loss" in r]

    assert train_losses(tmp_path / "ddp") == pytest.approx(train_losses(tmp_path / "one"), rel=1e-4)
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == [
        ".charnn-run", ".charnn.lock", "best.pt", "last.pt", "metrics.jsonl"]  # rank 0 alone writes


def test_batch_size_must_split_evenly(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    monkeypatch.setenv("CHARNN_DATA_DIR", str(tmp_path / "data"))
    import charnn.train as tr

    monkeypatch.setattr(tr, "setup_distributed", lambda device: tr.DistInfo(rank=0, world_size=3))
    with pytest.raises(ConfigError, match="--batch-size 16 must be divisible by the number of processes"):
        Trainer(TrainConfig(corpus=[str(corpus)], out=str(tmp_path / "o"), max_steps=2, batch_size=16,
                            seq_len=8), {"hidden_size": 8, "num_layers": 1}, handle_sigint=False)
