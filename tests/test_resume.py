"""Resume restores the run (issue 10, part 1).

The commands here are the ones a user types, including the one charnn prints
when a run is stopped ("Continue with: charnn train --resume DIR/last.pt"),
with nothing repeated. Runs are stopped by a real SIGTERM sent to the process
itself at a chosen step (from the progress callback, so the step is exact);
the trainer's own signal handler saves and exits 143.
"""

from __future__ import annotations

import os
import re
import shlex
import signal

import pytest
import torch

from charnn.storage import checkpoint
from charnn.cli.progress import TrainReporter
from charnn.training.config import RESUME_APPLIED, RESUME_CHANGEABLE, RESUME_FIXED, TrainConfig
from charnn.errors import ConfigError, VocabError
from charnn.model.devices import cpu_has_bf16
from charnn.training.trainer import Trainer, train

from conftest import TALE_MODEL, TALE_TEXT, invoke, make_text, tale_config

# Non-default values for every option that shapes a run (the defaults would
# hide a resume that silently falls back to them).
MODEL = ["--cell", "gru", "--hidden-size", "24", "--num-layers", "2", "--embedding-dim", "12",
         "--dropout", "0.2"]
RUN = ["--seq-len", "24", "--batch-size", "6", "--lr", "0.005", "--weight-decay", "0.05",
       "--grad-clip", "0.5", "--warmup-steps", "3", "--eval-every", "4", "--eval-chars", "600",
       "--log-every", "1", "--val-fraction", "0.15", "--patience", "50", "--keep", "2",
       "--sample-every", "0", "--seed", "7", "--device", "cpu", "--threads", "1"]
STEPS = 12
STOP_AT = 5


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("resume") / "corpus.txt"
    path.write_text(make_text(12000, seed=3), encoding="utf-8")
    return path


def weights(path):
    return checkpoint.load(path).data["model_state"]


def assert_same_bits(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def stop_at(monkeypatch, step: int, signum: int = signal.SIGTERM) -> None:
    """Send a real signal to this process when the run logs ``step``."""
    original = TrainReporter.on_log

    def on_log(self, e):
        original(self, e)
        if e["step"] == step:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(TrainReporter, "on_log", on_log)


def printed_resume(stderr: str) -> list[str]:
    """The command charnn printed after stopping, minus the leading `charnn`."""
    m = re.search(r"Continue with: charnn (train --resume \S+?)\)?\.?$", " ".join(stderr.split()))
    assert m, stderr
    return shlex.split(m.group(1))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_printed_resume_command_gives_the_same_bits(corpus, tmp_path, monkeypatch, precision):
    if precision == "bf16" and not cpu_has_bf16():
        # Still runs: torch's own kernels stand in for oneDNN's (see runtime.autocast).
        pass
    args = ["train", corpus, *MODEL, *RUN, "--precision", precision, "--max-steps", STEPS]
    straight = invoke(*args, "--out", tmp_path / "straight")
    assert straight.exit_code == 0, straight.output

    with monkeypatch.context() as m:
        stop_at(m, STOP_AT)
        stopped = invoke(*args, "--out", tmp_path / "stopped")
    assert stopped.exit_code == 128 + signal.SIGTERM, stopped.output
    assert "SIGTERM" in stopped.stderr and "Traceback" not in stopped.output
    assert checkpoint.load(tmp_path / "stopped" / "last.pt").train_state["step"] == STOP_AT

    resumed = invoke(*printed_resume(stopped.stderr))  # exactly what charnn printed
    assert resumed.exit_code == 0, resumed.output
    assert "changed on resume" not in resumed.stderr
    assert_same_bits(tmp_path / "straight" / "last.pt", tmp_path / "stopped" / "last.pt")
    saved = checkpoint.load(tmp_path / "stopped" / "last.pt")
    assert saved.train_state["step"] == STEPS and saved.train_state["precision"] == precision
    # The recorded options are the run's, not today's defaults.
    straight_cfg = checkpoint.load(tmp_path / "straight" / "last.pt").train_config
    for k, v in straight_cfg.items():
        if k != "out":
            assert saved.train_config[k] == v, k


def test_resume_with_only_the_budget_repeated_is_exact(corpus, tmp_path, monkeypatch):
    args = ["train", corpus, *MODEL, *RUN, "--precision", "fp32", "--max-steps", STEPS]
    assert invoke(*args, "--out", tmp_path / "a").exit_code == 0
    with monkeypatch.context() as m:
        stop_at(m, 7, signal.SIGINT)  # Ctrl-C this time
        stopped = invoke(*args, "--out", tmp_path / "b")
    assert stopped.exit_code == 130, stopped.output
    resumed = invoke("train", "--resume", tmp_path / "b" / "last.pt", "--max-steps", STEPS)
    assert resumed.exit_code == 0, resumed.output
    assert_same_bits(tmp_path / "a" / "last.pt", tmp_path / "b" / "last.pt")


@pytest.mark.system
def test_resume_after_kill_9_leaves_one_row_per_step(corpus, tmp_path):
    """A real SIGKILL (nothing saved at the end): the run continues from its
    last checkpoint, and the log keeps no rows from the steps that were lost."""
    import json
    import subprocess
    import time

    from robust_helpers import popen

    out = tmp_path / "run"
    proc = popen(["train", str(corpus), *MODEL, *RUN, "--precision", "fp32", "--max-steps", "100000",
                  "--out", str(out)], tmp_path / "data", tmp_path, stderr=subprocess.DEVNULL,
                 stdout=subprocess.DEVNULL)
    log = out / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # past a checkpoint (step 8), between two evaluations
            rows = [json.loads(r) for r in log.read_text().splitlines()] if log.exists() else []
            steps = [r["step"] for r in rows if "train_loss" in r]
            if steps and steps[-1] >= 10 and steps[-1] % 4 in (2, 3):
                break
            time.sleep(0.005)
        proc.kill()
    finally:
        proc.wait(30)
    saved = checkpoint.load(out / "last.pt").train_state["step"]
    logged = [json.loads(r)["step"] for r in log.read_text().splitlines() if r.strip()]
    assert max(logged) > saved  # rows of lost steps are there before the resume
    resumed = invoke("train", "--resume", out / "last.pt", "--max-steps", saved + 6)
    assert resumed.exit_code == 0, resumed.output
    rows = [json.loads(r) for r in log.read_text().splitlines()]
    train_steps = [r["step"] for r in rows if "train_loss" in r]
    eval_steps = [r["step"] for r in rows if "val_loss" in r]
    assert train_steps == list(range(1, saved + 7))
    assert eval_steps == sorted(set(eval_steps)) and eval_steps[-1] == saved + 6


# ---------------------------------------------------------------------------
# One test per option: refused, changed and listed, or applied and recorded
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stopped_run(corpus, tmp_path_factory):
    """A run stopped by SIGTERM at step 5 of 12 (shared; each test copies it)."""
    root = tmp_path_factory.mktemp("stopped")
    mp = pytest.MonkeyPatch()
    try:
        stop_at(mp, STOP_AT)
        result = invoke("train", corpus, *MODEL, *RUN, "--precision", "fp32", "--max-steps", STEPS,
                        "--out", root / "run")
    finally:
        mp.undo()
    assert result.exit_code == 143, result.output
    return root / "run"


@pytest.fixture
def run_copy(stopped_run, tmp_path):
    import shutil

    dest = tmp_path / "run"
    shutil.copytree(stopped_run, dest)
    return dest


# A value different from the run's, for each option, as the user would type it.
NEW_VALUES = {
    "seq_len": "32", "batch_size": "8", "val_fraction": "0.2", "seed": "8", "encoding": "latin-1",
    "lr": "0.004", "weight_decay": "0.1", "warmup_steps": "5", "size": "fixed",
    "max_steps": "14", "epochs": "0.2", "time_limit": "3s", "eval_every": "3", "eval_chars": "400",
    "log_every": "2", "patience": "40", "keep": "3", "sample_every": "2", "device": "cpu",
    "precision": "bf16", "grad_clip": "0.25",
}
# The same value in the form train_config records.
RECORDED = {"max_steps": 14, "epochs": 0.2, "time_limit": 3.0, "eval_every": 3, "eval_chars": 400,
            "log_every": 2, "patience": 40, "keep": 3, "sample_every": 2, "precision": "bf16",
            "grad_clip": 0.25}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def test_every_training_option_is_classified():
    from dataclasses import fields

    classified = set(RESUME_FIXED) | set(RESUME_CHANGEABLE) | set(RESUME_APPLIED)
    internal = {"corpus", "corpus_hash", "corpus_name", "betas", "min_lr_ratio", "nan_tolerance", "out",
                "size_reason", "setup_seconds", "base_reason"}
    assert {f.name for f in fields(TrainConfig)} - internal <= classified


@pytest.mark.parametrize("name", [n for n in RESUME_FIXED if n in NEW_VALUES])
def test_an_option_that_defines_the_run_is_refused(run_copy, name):
    result = invoke("train", "--resume", run_copy / "last.pt", flag(name), NEW_VALUES[name])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    text = " ".join(result.stderr.split())
    assert text.startswith("Error: ") and flag(name) in text and "--init-from" in text, text
    # Nothing was trained or written.
    assert checkpoint.load(run_copy / "last.pt").train_state["step"] == STOP_AT


@pytest.mark.parametrize("name", [n for n in RESUME_FIXED if n in NEW_VALUES and n != "encoding"])
def test_repeating_the_runs_own_value_is_accepted(run_copy, name):
    own = checkpoint.load(run_copy / "last.pt").train_config[name]
    result = invoke("train", "--resume", run_copy / "last.pt", flag(name), own)
    assert result.exit_code == 0, result.output
    assert "changed on resume" not in result.stderr


@pytest.mark.parametrize("name", [n for n in (*RESUME_CHANGEABLE, *RESUME_APPLIED)
                                  if n in RECORDED])
def test_an_option_that_may_change_is_applied_listed_and_recorded(run_copy, name):
    extra = [] if name in ("max_steps", "epochs", "time_limit") else ["--max-steps", STEPS]
    result = invoke("train", "--resume", run_copy / "last.pt", flag(name), NEW_VALUES[name], *extra)
    assert result.exit_code == 0, result.output
    text = " ".join(result.stderr.split())
    assert f"changed on resume: {name} " in text, text
    saved = checkpoint.load(run_copy / "last.pt")
    assert saved.train_config[name] == RECORDED[name]
    assert any(line.startswith(f"at step {STOP_AT}: {name} ") for line in saved.train_state["changed_on_resume"])
    if name in RESUME_APPLIED:
        assert "not bit-identical" in text
    if name == "precision":
        assert saved.train_state["precision"] == "bf16"  # applied for real, not only recorded
    if name in ("max_steps", "epochs", "time_limit"):
        others = {"max_steps", "epochs", "time_limit"} - {name}
        assert all(not saved.train_config[o] for o in others)  # a new budget replaces the old one


def test_a_new_output_folder_takes_the_run(run_copy, tmp_path):
    result = invoke("train", "--resume", run_copy / "last.pt", "--out", tmp_path / "moved")
    assert result.exit_code == 0, result.output
    assert "changed on resume: out" in " ".join(result.stderr.split())
    assert checkpoint.load(tmp_path / "moved" / "last.pt").train_state["step"] == STEPS


def test_the_reading_order_is_kept_on_resume(corpus, tmp_path, monkeypatch):
    """--order in-order (each stream in order) is part of the run: the printed
    resume command continues it in order, bit for bit; --order shuffled (or
    its old spelling --shuffle) on resume is refused, nothing written."""
    args = ["train", corpus, *MODEL, *RUN, "--precision", "fp32", "--max-steps", STEPS, "--order", "in-order"]
    straight = invoke(*args, "--out", tmp_path / "straight")
    assert straight.exit_code == 0, straight.output
    assert "each stream in order" in " ".join(straight.stderr.split())
    assert checkpoint.load(tmp_path / "straight" / "last.pt").train_config["shuffle"] is False
    with monkeypatch.context() as m:
        stop_at(m, 7)
        stopped = invoke(*args, "--out", tmp_path / "stopped")
    assert stopped.exit_code == 128 + signal.SIGTERM, stopped.output
    for flag in (["--order", "shuffled"], ["--shuffle"]):
        refused = invoke("train", "--resume", tmp_path / "stopped" / "last.pt", *flag)
        assert refused.exit_code == 1, refused.output
        text = " ".join(refused.stderr.split())
        assert "--order shuffled (this run: --order in-order)" in text and "--init-from" in text, text
    assert checkpoint.load(tmp_path / "stopped" / "last.pt").train_state["step"] == 7
    resumed = invoke(*printed_resume(stopped.stderr))
    assert resumed.exit_code == 0, resumed.output
    assert_same_bits(tmp_path / "straight" / "last.pt", tmp_path / "stopped" / "last.pt")
    # and in order is not the same training as shuffled
    shuffled = invoke("train", corpus, *MODEL, *RUN, "--precision", "fp32", "--max-steps", STEPS,
                      "--order", "shuffled", "--out", tmp_path / "shuffled")
    assert shuffled.exit_code == 0, shuffled.output
    assert checkpoint.load(tmp_path / "shuffled" / "last.pt").train_config["shuffle"] is True
    assert not all(torch.equal(a, b) for a, b in zip(weights(tmp_path / "shuffled" / "last.pt").values(),
                                                     weights(tmp_path / "straight" / "last.pt").values()))


@pytest.fixture(scope="module")
def short_corpus(tmp_path_factory):
    """A text of ~22 steps an epoch at RUN's shape, so budgets on both sides
    of one epoch train in seconds."""
    path = tmp_path_factory.mktemp("resume-short") / "corpus.txt"
    path.write_text(make_text(3500, seed=3), encoding="utf-8")
    return path


@pytest.mark.parametrize("budget,shuffled", [(["--max-steps", "9"], True), (["--max-steps", "27"], False),
                                             (["--epochs", "0.5"], True), (["--epochs", "1"], False)])
def test_the_order_is_chosen_from_the_budget_and_kept(short_corpus, tmp_path, monkeypatch, budget, shuffled):
    """With no --order, a run whose budget reads its text at least once reads
    it in order, a shorter one shuffled (this corpus: ~22 steps an epoch);
    it says which and why, records it, and its printed resume command keeps
    it, bit for bit, even with a budget on resume that would choose the other."""
    corpus = short_corpus
    args = ["train", corpus, *MODEL, *RUN, "--precision", "fp32", *budget]
    straight = invoke(*args, "--out", tmp_path / "straight")
    assert straight.exit_code == 0, straight.output
    said = " ".join(straight.stderr.split())
    assert ("reading: shuffled blocks (the budget reads 0." in said) == shuffled, said
    assert ("reading: each stream in order (the budget reads the text " in said) == (not shuffled), said
    assert checkpoint.load(tmp_path / "straight" / "last.pt").train_config["shuffle"] is shuffled
    with monkeypatch.context() as m:
        stop_at(m, 7)
        stopped = invoke(*args, "--out", tmp_path / "stopped")
    assert stopped.exit_code == 128 + signal.SIGTERM, stopped.output
    resumed = invoke(*printed_resume(stopped.stderr))
    assert resumed.exit_code == 0, resumed.output
    assert_same_bits(tmp_path / "straight" / "last.pt", tmp_path / "stopped" / "last.pt")
    longer = invoke("train", "--resume", tmp_path / "stopped" / "last.pt", "--max-steps", "60")
    assert longer.exit_code == 0, longer.output
    assert checkpoint.load(tmp_path / "stopped" / "last.pt").train_config["shuffle"] is shuffled


def test_a_time_budget_with_a_given_shape_reads_shuffled(corpus, tmp_path):
    """--size fixed and only --time-limit: the shape is not timed (a probe
    would eat a short budget), so the epochs are not known; it reads
    shuffled and says why."""
    result = invoke("train", corpus, *MODEL, *RUN, "--size", "fixed", "--time-limit", "3s",
                    "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert ("reading: shuffled blocks (the epochs the budget buys are not known)"
            in " ".join(result.stderr.split()))
    assert checkpoint.load(tmp_path / "run" / "last.pt").train_config["shuffle"] is True


def test_order_options_that_disagree_are_refused(corpus, tmp_path):
    result = invoke("train", corpus, *MODEL, *RUN, "--max-steps", "3", "--order", "in-order", "--shuffle",
                    "--out", tmp_path / "run")
    assert result.exit_code == 1, result.output
    assert "disagree" in result.stderr and not (tmp_path / "run").exists()


def test_a_run_from_before_shuffling_reads_in_order():
    """train_config of charnn 0.1 has no "shuffle": such a run was read in
    order, and resuming it must go on in order; a recorded choice is kept."""
    old = {k: v for k, v in TrainConfig().to_dict().items() if k != "shuffle"}
    assert TrainConfig.from_dict(old).shuffle is False
    assert TrainConfig().shuffle is None  # chosen at start
    for recorded in (True, False):
        assert TrainConfig.from_dict(TrainConfig(shuffle=recorded).to_dict()).shuffle is recorded


@pytest.mark.parametrize("option,value", [("--cell", "lstm"), ("--hidden-size", "32"), ("--num-layers", "1"),
                                          ("--embedding-dim", "8"), ("--dropout", "0.3")])
def test_a_model_option_is_refused(run_copy, option, value):
    result = invoke("train", "--resume", run_copy / "last.pt", option, value)
    assert result.exit_code == 1, result.output
    text = " ".join(result.stderr.split())
    assert option in text and "--init-from" in text, text


def test_resume_with_the_budget_spent_says_so(run_copy):
    assert invoke("train", "--resume", run_copy / "last.pt").exit_code == 0  # to step 12
    again = invoke("train", "--resume", run_copy / "last.pt")
    assert again.exit_code == 1, again.output
    text = " ".join(again.stderr.split())
    assert "budget is already spent" in text and "--max-steps 24" in text, text


def test_library_resume_with_a_mapping_of_given_options(run_copy):
    from charnn.training.trainer import Trainer

    t = Trainer({"eval_every": 2}, resume=run_copy / "last.pt", handle_sigint=False)
    try:
        assert t.cfg.eval_every == 2 and t.cfg.seq_len == 24 and t.cfg.lr == 0.005
        assert t.changed == ["eval_every 4 -> 2"]
    finally:
        t.close()


def test_a_spent_time_budget_says_it_is_the_runs_total(corpus, tmp_path):
    args = ["train", corpus, *MODEL, *RUN, "--precision", "fp32", "--time-limit", "3s", "--out", tmp_path / "run"]
    assert invoke(*args).exit_code == 0
    again = invoke("train", "--resume", tmp_path / "run" / "last.pt")
    assert again.exit_code == 1, again.output
    text = " ".join(again.stderr.split())
    assert "already spent" in text and "the run's total" in text, text
    bigger = re.search(r"--resume \S+ --time-limit (\d+)s", text)
    assert bigger and int(bigger.group(1)) > 3, text
    step = checkpoint.load(tmp_path / "run" / "last.pt").train_state["step"]
    more = invoke("train", "--resume", tmp_path / "run" / "last.pt", "--time-limit", bigger.group(1) + "s",
                  "--max-steps", step + 5)  # the suggested command trains (capped here by steps)
    assert more.exit_code == 0, more.output


def max_diff(a, b) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_resume_is_bit_exact(tale, tmp_path):
    # 12 steps straight vs 5 steps + resume to 12: the same bits.
    train(tale_config(tale, tmp_path / "a", max_steps=12, keep=3), TALE_MODEL, handle_sigint=False)
    train(tale_config(tale, tmp_path / "b", max_steps=12), TALE_MODEL, resume=tmp_path / "a" / "step-0000005.pt",
          handle_sigint=False)
    straight, resumed = weights(tmp_path / "a" / "last.pt"), weights(tmp_path / "b" / "last.pt")
    assert max_diff(straight, resumed) == 0.0
    a, b = checkpoint.load(tmp_path / "a" / "last.pt"), checkpoint.load(tmp_path / "b" / "last.pt")
    assert a.train_state["step"] == b.train_state["step"] == 12
    assert a.train_state["chars_seen"] == b.train_state["chars_seen"]
    assert a.data["optimizer_state"]["state"][0]["step"] == b.data["optimizer_state"]["state"][0]["step"]
    # torch's fused AdamW on a CPU (docs/training.md), and the resumed run kept it
    assert all(g["fused"] for c in (a, b) for g in c.data["optimizer_state"]["param_groups"])


def test_a_run_written_with_torchs_default_adamw_resumes_with_it_bit_for_bit(tale, tmp_path, monkeypatch):
    """Checkpoints from before the fused optimizer recorded the default one:
    such a run, resumed now, gives the same bits as when it ran straight."""
    plain = torch.optim.AdamW

    class DefaultAdamW(plain):  # the optimizer as charnn 0.2.3 built it
        def __init__(self, *args, fused=None, **kwargs):
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", DefaultAdamW)
    train(tale_config(tale, tmp_path / "a", max_steps=12, keep=3), TALE_MODEL, handle_sigint=False)
    monkeypatch.undo()
    train(tale_config(tale, tmp_path / "b", max_steps=12), TALE_MODEL, resume=tmp_path / "a" / "step-0000005.pt",
          handle_sigint=False)
    assert max_diff(weights(tmp_path / "a" / "last.pt"), weights(tmp_path / "b" / "last.pt")) == 0.0
    groups = checkpoint.load(tmp_path / "b" / "last.pt").data["optimizer_state"]["param_groups"]
    assert not any(g["fused"] for g in groups)


@pytest.mark.parametrize("shuffle", [True, False])
def test_resume_across_an_epoch_boundary_is_exact(tale, tmp_path, shuffle):
    # Tiny text: one epoch is a few chunks, so the run crosses epoch resets
    # (shuffled: each epoch deals the blocks out in a new order).
    c = tale_config(tale, tmp_path / "a", max_steps=30, keep=6, batch_size=8, seq_len=32, shuffle=shuffle)
    Trainer(c, TALE_MODEL, handle_sigint=False).run()
    epochs = checkpoint.load(tmp_path / "a" / "last.pt").train_state["epoch"]
    assert epochs >= 1
    train(tale_config(tale, tmp_path / "b", max_steps=30, batch_size=8, seq_len=32, shuffle=shuffle), TALE_MODEL,
          resume=tmp_path / "a" / "step-0000015.pt", handle_sigint=False)
    assert max_diff(weights(tmp_path / "a" / "last.pt"), weights(tmp_path / "b" / "last.pt")) == 0.0


@pytest.mark.parametrize("shuffle", [True, False])
def test_the_state_is_carried_within_a_block_and_reset_where_one_starts(tale, tmp_path, shuffle):
    """Shuffled, the next chunk of a row is the next stretch of text only
    within a block: the state is carried there and reset where every row
    starts a new block (in order: only at an epoch's start)."""
    t = Trainer(tale_config(tale, tmp_path / "a", max_steps=100, batch_size=4, seq_len=8, shuffle=shuffle), TALE_MODEL,
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


def test_resume_with_a_different_architecture_is_a_clear_error(tale, tmp_path):
    train(tale_config(tale, tmp_path / "a", max_steps=5), TALE_MODEL, handle_sigint=False)
    with pytest.raises(ConfigError, match=r"--hidden-size 32 \(checkpoint: 16\)"):
        Trainer(tale_config(tale, tmp_path / "b", max_steps=10), {**TALE_MODEL, "hidden_size": 32},
                resume=tmp_path / "a" / "last.pt", handle_sigint=False)


def test_init_from_keeps_vocabulary_and_weights(tale, tmp_path):
    train(tale_config(tale, tmp_path / "a", max_steps=5), TALE_MODEL, handle_sigint=False)
    base = checkpoint.load(tmp_path / "a" / "last.pt")
    other = tmp_path / "other.txt"
    other.write_text("it was the age of the season of the best " * 20, encoding="utf-8")
    t = Trainer(tale_config(other, tmp_path / "b", max_steps=3), None, init_from=tmp_path / "a" / "last.pt",
                handle_sigint=False)
    assert t.tokenizer.chars == base.tokenizer.chars
    assert t.step == 0  # a new run: fresh step count, optimizer and schedule
    assert max_diff(base.data["model_state"], {k: v.cpu() for k, v in t.model.state_dict().items()}) == 0.0
    t.run()
    assert checkpoint.load(tmp_path / "b" / "last.pt").tokenizer.chars == base.tokenizer.chars


def test_init_from_new_characters_needs_extend_vocab(tale, tmp_path):
    train(tale_config(tale, tmp_path / "a", max_steps=3), TALE_MODEL, handle_sigint=False)
    other = tmp_path / "other.txt"
    other.write_text("Zebra quartz € jumps! " * 30, encoding="utf-8")
    with pytest.raises(VocabError, match=r"'€' \(U\+20AC\)") as refused:
        Trainer(tale_config(other, tmp_path / "b", max_steps=3), None, init_from=tmp_path / "a" / "last.pt",
                handle_sigint=False)
    # Only options `train` has are suggested (it has no --unknown).
    assert "--extend-vocab" in str(refused.value) and "--unknown" not in str(refused.value)
    t = Trainer(tale_config(other, tmp_path / "b", max_steps=3), None, init_from=tmp_path / "a" / "last.pt",
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


def test_resume_accepts_the_same_text_at_a_new_path(tale, tmp_path):
    train(tale_config(tale, tmp_path / "a", max_steps=4), TALE_MODEL, handle_sigint=False)
    moved = tmp_path / "moved.txt"
    moved.write_text(TALE_TEXT, encoding="utf-8")
    tale.unlink()
    t = Trainer(tale_config(moved, tmp_path / "b", max_steps=6), None, resume=tmp_path / "a" / "last.pt",
                handle_sigint=False)
    assert t.step == 4 and t.run().step == 6


def test_resume_refuses_other_text(tale, tmp_path):
    from charnn.errors import DataError

    train(tale_config(tale, tmp_path / "a", max_steps=4), TALE_MODEL, handle_sigint=False)
    other = tmp_path / "other.txt"
    other.write_text(TALE_TEXT.upper(), encoding="utf-8")
    with pytest.raises(DataError, match="--init-from"):
        Trainer(tale_config(other, tmp_path / "b", max_steps=6), None, resume=tmp_path / "a" / "last.pt",
                handle_sigint=False)
