"""--precision auto on a CPU: bf16 only where it is faster. With AMX it is
several times faster than fp32; with AVX512-BF16 alone it was slower at
every shape and batch measured, and charnn took it anyway. A --time-limit
run times both; a run without one follows the CPU's flags (the same
command, the same weights); a resumed run keeps what it trained in."""

from __future__ import annotations

import re

import pytest
import torch

from charnn.model.devices import cpu_has_amx, cpu_has_bf16
from charnn.storage import checkpoint
from charnn.training.choices import BF16_SHARE
from robust_helpers import write_corpus

from conftest import invoke

SHAPE = ["--hidden-size", "64", "--num-layers", "1", "--embedding-dim", "16", "--device", "cpu",
         "--sample-every", "0"]
NOTE = re.compile(r"precision: (fp32|bf16): a 1x64 step takes (\d+) ms in fp32 and (\d+) ms in bf16 on this CPU")

needs_bf16 = pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no native bf16: auto is fp32, untimed")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("prec") / "c.txt", n_words=4000)


@needs_bf16
def test_a_time_limit_run_times_both_and_trains_in_the_faster(corpus, tmp_path):
    out = tmp_path / "run"
    result = invoke("train", corpus, *SHAPE, "--time-limit", "10s", "--out", out)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    note = NOTE.search(text)
    assert note, text
    chosen, fp32, bf16 = note.group(1), int(note.group(2)), int(note.group(3))
    assert f"precision {chosen}" in text  # the start line says what it trains in
    assert checkpoint.load(out / "last.pt").train_state["precision"] == chosen
    # The rule, away from its edge (the note rounds to whole ms):
    if bf16 < 0.9 * BF16_SHARE * fp32:
        assert chosen == "bf16"
    elif bf16 > 1.1 * BF16_SHARE * fp32:
        assert chosen == "fp32"


def test_a_run_without_a_time_limit_follows_the_cpus_flags_untimed(corpus, tmp_path):
    out = tmp_path / "run"
    result = invoke("train", corpus, *SHAPE, "--max-steps", "3", "--out", out)
    assert result.exit_code == 0, result.output
    assert "fp32 and in bf16" not in result.output and "precision:" not in result.output
    expected = "bf16" if cpu_has_amx() else "fp32"
    assert checkpoint.load(out / "last.pt").train_state["precision"] == expected


@pytest.mark.parametrize("recorded", ["fp32", "bf16"])
def test_a_resumed_run_keeps_the_precision_it_trained_in(corpus, tmp_path, recorded):
    """The file says which precision its steps ran in; whatever auto would
    choose here now, the resumed steps run in that one (an exact resume needs
    the same numbers). The file is edited for real to say each in turn."""
    first = tmp_path / "first"
    result = invoke("train", corpus, *SHAPE, "--max-steps", "4", "--eval-every", "2", "--out", first)
    assert result.exit_code == 0, result.output
    data = torch.load(first / "last.pt", weights_only=True)
    data["train_state"]["precision"] = recorded
    edited = tmp_path / "edited" / "last.pt"
    edited.parent.mkdir()
    torch.save(data, edited)
    result = invoke("train", corpus, "--resume", edited, "--max-steps", "8", "--time-limit", "1m")
    assert result.exit_code == 0, result.output
    assert f"precision {recorded}" in " ".join(result.output.split())
    assert "fp32 and in bf16" not in result.output  # nothing timed
    assert checkpoint.load(edited).train_state["precision"] == recorded


@pytest.mark.parametrize("value", ["fp8", 3, ["bf16"]])
def test_a_resumed_run_whose_recorded_precision_is_damaged_is_refused(corpus, tmp_path, value):
    first = tmp_path / "first"
    assert invoke("train", corpus, *SHAPE, "--max-steps", "2", "--out", first).exit_code == 0
    data = torch.load(first / "last.pt", weights_only=True)
    data["train_state"]["precision"] = value
    bad = tmp_path / "bad.pt"
    torch.save(data, bad)
    result = invoke("train", corpus, "--resume", bad, "--max-steps", "4")
    assert result.exit_code == 1, result.output
    text = " ".join(result.stderr.split())
    assert "training state is damaged" in text and "precision" in text and "--init-from" in text, text
    assert "Traceback" not in result.output


def test_a_run_that_trained_in_fp16_resumes_on_a_cpu_saying_it_is_not_exact(corpus, tmp_path):
    """fp16 needs a GPU: a run recorded in it resumes here in auto's choice, and says so."""
    first = tmp_path / "first"
    assert invoke("train", corpus, *SHAPE, "--max-steps", "2", "--out", first).exit_code == 0
    data = torch.load(first / "last.pt", weights_only=True)
    data["train_state"]["precision"] = "fp16"
    edited = tmp_path / "edited" / "last.pt"
    edited.parent.mkdir()
    torch.save(data, edited)
    result = invoke("train", corpus, "--resume", edited, "--max-steps", "4")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    expected = "bf16" if cpu_has_amx() else "fp32"
    assert f"this run trained in fp16, which cpu does not have: it resumes in {expected}, so not bit for bit" in text
    assert checkpoint.load(edited).train_state["precision"] == expected
