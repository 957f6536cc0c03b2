"""Data-parallel training under torchrun: 2 ranks (gloo, CPU) give the same
weights as one process with the same global batch and seed."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from charnn.storage import checkpoint
from charnn.training.config import TrainConfig
from charnn.errors import ConfigError
from charnn.training.trainer import Trainer, train

TEXT = ("Happy families are all alike; every unhappy family is unhappy in its own way. "
        "Everything was in confusion in the Oblonskys' house.\n") * 40
OPTS = ["--max-steps", "20", "--batch-size", "16", "--seq-len", "32", "--hidden-size", "32",
        "--num-layers", "2", "--dropout", "0", "--precision", "fp32", "--device", "cpu",
        "--eval-every", "10", "--sample-every", "0"]


@pytest.mark.system
@pytest.mark.skipif(shutil.which("torchrun") is None and not os.path.exists(
    os.path.join(os.path.dirname(sys.executable), "torchrun")), reason="torchrun not installed")
def test_two_ranks_match_one_process(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    env = {**os.environ, "CHARNN_DATA_DIR": str(tmp_path / "data"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "charnn", "train", str(corpus), "--out", str(tmp_path / "ddp"), *OPTS]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("Done: 20 steps") == 1  # only rank 0 reports

    monkeypatch.setenv("CHARNN_DATA_DIR", str(tmp_path / "data"))
    train(TrainConfig(corpus=[str(corpus)], out=str(tmp_path / "one"), max_steps=20, batch_size=16,
                      seq_len=32, precision="fp32", device="cpu", eval_every=10, sample_every=0),
          {"hidden_size": 32, "num_layers": 2, "dropout": 0.0}, handle_sigint=False)
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
    def train_losses(folder):
        rows = [json.loads(r) for r in (folder / "metrics.jsonl").read_text().splitlines()]
        return [r["train_loss"] for r in rows if "train_loss" in r]

    assert train_losses(tmp_path / "ddp") == pytest.approx(train_losses(tmp_path / "one"), rel=1e-4)
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == [
        ".charnn-run", ".charnn.lock", "best.pt", "last.pt", "metrics.jsonl"]  # rank 0 alone writes


@pytest.mark.system
@pytest.mark.skipif(shutil.which("torchrun") is None and not os.path.exists(
    os.path.join(os.path.dirname(sys.executable), "torchrun")), reason="torchrun not installed")
@pytest.mark.parametrize("omp", [None, ""], ids=["torchrun-sets-OMP_NUM_THREADS", "OMP_NUM_THREADS-empty"])
def test_ranks_share_the_cores_instead_of_stalling(tmp_path, omp):
    """Two ranks under torchrun with charnn's default threads and a time
    budget, as a user types it. Each rank once took every idle core: two
    ranks of two threads on 2 cores, whose OpenMP threads waited on each
    other for 3 s every few steps (85 steps in 20 s; 1,201 with one thread
    each). Now a rank takes OMP_NUM_THREADS (torchrun sets 1 when it is not
    set) or, with it empty, its share of the cores (LOCAL_WORLD_SIZE). The
    check is a ratio within the run: no five steps take ten times as long as
    five steps usually do."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT * 10, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["CHARNN_DATA_DIR"] = str(tmp_path / "data")
    if omp is not None:
        env["OMP_NUM_THREADS"] = omp
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "charnn",
           "train", str(corpus), "--out", str(out), "--time-limit", "6s", "--hidden-size", "64",
           "--num-layers", "2", "--size", "fixed", "--precision", "fp32", "--device", "cpu",
           "--sample-every", "0", "--log-every", "5"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    gaps = [b["elapsed"] - a["elapsed"] for a, b in zip(rows, rows[1:])
            if "train_loss" in a and "train_loss" in b]  # five steps, no evaluation between
    assert len(gaps) >= 10, proc.stderr[-2000:]
    typical = sorted(gaps)[len(gaps) // 2]
    assert max(gaps[1:]) < 10 * typical + 0.2, (typical, gaps)  # (the first five include warm-up)
    # The budget holds. The last row is the final evaluation's (its "elapsed" is
    # when it began) or, on a machine that got busier, the short_of_plan row
    # written after it.
    assert "elapsed" in rows[-1] and rows[-1]["elapsed"] <= 6.0 + 0.5, rows[-2:]


LATE_RANK = """
import os, sys, time
from pathlib import Path
import torch.distributed as dist
from charnn.training.config import TrainConfig
from charnn.training.trainer import train

corpus, out = sys.argv[1], Path(sys.argv[2])
dist.init_process_group("gloo")
rank = dist.get_rank()
if rank == 1:  # a busy machine: rank 1 reaches the folder after rank 0 has opened it
    deadline = time.monotonic() + 60
    while not (out / ".charnn-run").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
result = train(TrainConfig(corpus=[corpus], out=str(out), max_steps=10, batch_size=16, seq_len=32,
                           precision="fp32", device="cpu", eval_every=5, sample_every=0),
               {"hidden_size": 32, "num_layers": 1}, handle_sigint=False)
(out.parent / f"rank{rank}.txt").write_text(f"{result.step} {result.out_dir}")  # (the trainer left the group)
# As charnn's CLI does after a torchrun run: gloo's worker threads can abort the
# process while the interpreter tears down (pytorch/pytorch#190489; exit -6 seen
# once in CI here), so leave without the teardown.
os._exit(0)
"""


@pytest.mark.system
@pytest.mark.skipif(shutil.which("torchrun") is None and not os.path.exists(
    os.path.join(os.path.dirname(sys.executable), "torchrun")), reason="torchrun not installed")
def test_a_rank_that_reaches_the_folder_late_takes_rank_0s(tmp_path):
    """Every rank once checked the output folder itself. On a busy machine
    rank 1 got there after rank 0 had opened it, found "a training run" in
    it and quit (silently: only rank 0 speaks), and torchrun killed rank 0.
    Here rank 1 really is late (it waits for rank 0's folder before it
    starts); the ranks must agree on rank 0's folder and train."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    script = tmp_path / "late_rank.py"
    script.write_text(LATE_RANK, encoding="utf-8")
    out = tmp_path / "run"
    env = {**os.environ, "CHARNN_DATA_DIR": str(tmp_path / "data"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(corpus), str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)] == [f"10 {out}"] * 2
    assert checkpoint.load(out / "last.pt").train_state["step"] == 10


def test_batch_size_must_split_evenly(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    monkeypatch.setenv("CHARNN_DATA_DIR", str(tmp_path / "data"))
    import charnn.training.trainer as tr

    monkeypatch.setattr(tr, "setup_distributed", lambda device: tr.DistInfo(rank=0, world_size=3))
    with pytest.raises(ConfigError, match="--batch-size 16 must be divisible by the number of processes"):
        Trainer(TrainConfig(corpus=[str(corpus)], out=str(tmp_path / "o"), max_steps=2, batch_size=16,
                            seq_len=8), {"hidden_size": 8, "num_layers": 1}, handle_sigint=False)


def stdlib_text(chars: int) -> str:
    """Real text of ``chars`` characters: the running Python's standard library source."""
    import sysconfig
    parts, total = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        total += len(text)
        if total >= chars:
            break
    return "".join(parts)[:chars]


@pytest.mark.system
@pytest.mark.skipif(shutil.which("torchrun") is None and not os.path.exists(
    os.path.join(os.path.dirname(sys.executable), "torchrun")), reason="torchrun not installed")
def test_the_start_lines_agree_on_the_steps_the_budget_fits(tmp_path):
    """`--size auto` under torchrun, as a user types it: the size line's steps
    (from the probe, before training) and the evaluation line's (from the
    run's first steps) describe the same run. The probe times each rank's
    steps with the gradients averaged over the ranks, as the run's are, and
    pays torch's one-time set-up before it starts timing shapes. The two still
    differ: the probe times steps without the dropout the run may add (3-20%
    a step), a run's first steps are its slowest, and other work comes and
    goes (1.15-1.75x apart in ten runs on 2 cores, some beside one or two
    busy processes; with the set-up inside the probe's share, 10x, and 17x
    under load with a glance that scaled one small step by the rows)."""

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(stdlib_text(400_000), encoding="utf-8")
    env = {**os.environ, "CHARNN_DATA_DIR": str(tmp_path / "data")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "charnn",
           "train", str(corpus), "--out", str(tmp_path / "ddp"), "--time-limit", "30s", "--base", "none",
           "--sample-every", "0"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = " ".join(proc.stderr.split())  # rich wraps long lines
    planned = re.search(r"size: .*? = ~([\d,]+) steps", text)
    measured = re.search(r"about ([\d,]+) steps fit the budget", text)
    assert planned and measured, text[-3000:]
    planned_steps, measured_steps = (int(m.group(1).replace(",", "")) for m in (planned, measured))
    assert 1 / 2.5 <= planned_steps / measured_steps <= 2.5, text[-3000:]
