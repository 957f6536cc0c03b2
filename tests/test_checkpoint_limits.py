"""Whatever charnn writes, charnn reads (issue 25, break 1).

The caps that keep crafted checkpoints cheap to refuse (charnn.storage.checkpoint)
must hold everything a legal run can write: the largest vocabulary (every
Unicode code point), the longest metric history (--log-every 1 and
--eval-every 1 for more steps than the checkpoint keeps rows). Files of the
previous format still load; a file of a newer format is refused clearly.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import make_text, train_tiny

import charnn.storage.checkpoint as ckpt_mod
from charnn.model.config import ModelConfig
from charnn.errors import CheckpointError
from charnn.model.rnn import CharRNN
from charnn.text.tokenizer import CharTokenizer

REPO = Path(__file__).resolve().parent.parent


def charnn(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "charnn", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout)


def _pickle_bytes(path: Path) -> int:
    with zipfile.ZipFile(path) as z:
        return next(i.file_size for i in z.infolist() if i.filename.endswith("/data.pkl"))


def _payload(chars: list[str], **extra):
    tok = CharTokenizer(chars)
    model = CharRNN(ModelConfig(cell="lstm", vocab_size=tok.vocab_size, embedding_dim=2, hidden_size=2,
                                num_layers=1, dropout=0.0))
    return tok, ckpt_mod.build_payload(model, tok, **extra)


def test_every_code_point_as_vocabulary_loads(tmp_path):
    """The largest vocabulary a text can have: all 1,114,112 code points, lone
    surrogates included. Format 1 kept it in the object pickle (~15 MB,
    refused by the 512 kB cap)."""
    chars = [chr(c) for c in range(ckpt_mod.MAX_VOCAB)]
    _, payload = _payload(chars, metrics=[{"step": 1, "train_loss": 1.0}])
    path = ckpt_mod.save(payload, tmp_path / "all.pt")
    assert _pickle_bytes(path) < 8 << 10  # the vocabulary is a tensor, not pickled strings
    loaded = ckpt_mod.load(path)
    assert loaded.tokenizer.chars == chars and loaded.model_config.vocab_size == ckpt_mod.MAX_VOCAB


def _worst_rows(n: int) -> list[dict]:
    """Rows as the trainer writes them, every value at its longest pickled form."""
    rows = []
    for step in range(1, n + 1):
        x = 1.0 + random.random()
        rows.append({"step": step + (1 << 40), "epoch": x, "train_loss": x, "lr": x, "grad_norm": x,
                     "clipped_share": x, "chars_per_sec": x, "elapsed": x})
        rows.append({"step": step + (1 << 40), "epoch": x, "val_loss": x, "val_bpc": x, "best_val_loss": x,
                     "elapsed": x})
    return rows


def test_metric_history_is_bounded_by_the_trainer(tmp_path):
    """--log-every 1 --eval-every 1: every other row is an eval row, and the
    trainer kept every eval row when thinning, so the history grew without
    bound. It stays at most MAX_METRIC_ROWS, and the longest history the
    trainer keeps, with the longest values, fits the object-pickle cap."""
    from charnn.training.output import RunOutput
    from charnn.training.runtime import DistInfo

    trainer = RunOutput(DistInfo(rank=0, world_size=1))  # the metrics bookkeeping, no folder
    for row in _worst_rows(3 * ckpt_mod.MAX_METRIC_ROWS):
        trainer.log(row)
        assert len(trainer.metrics) <= ckpt_mod.MAX_METRIC_ROWS
    steps = [r["step"] for r in trainer.metrics]
    assert steps == sorted(steps) and trainer.metrics[-1]["step"] == (1 << 40) + 3 * ckpt_mod.MAX_METRIC_ROWS
    _, payload = _payload(list("ab"), metrics=trainer.metrics,
                            train_config={"corpus": ["/" + "p" * 4000], "corpus_name": "x" * 4000},
                            train_state={"step": 1, "changed_on_resume": ["c" * 300] * 120})
    path = ckpt_mod.save(payload, tmp_path / "long.pt")
    size = _pickle_bytes(path)
    assert size < ckpt_mod.MAX_PICKLE_BYTES * 0.6, size  # a margin, not a knife edge
    assert len(ckpt_mod.load(path).metrics) == len(trainer.metrics)


@pytest.mark.system
def test_longest_metric_history_of_a_real_run_reads_back(tmp_path):
    """A real run with --log-every 1 --eval-every 1 past MAX_METRIC_ROWS steps:
    the checkpoint it writes loads, and info reads its curve."""
    corpus = tmp_path / "t.txt"
    corpus.write_text(make_text(3000), encoding="utf-8")
    steps = ckpt_mod.MAX_METRIC_ROWS // 2 + 50  # two rows a step
    run = train_tiny(corpus, tmp_path / "o", max_steps=steps, log_every=1, eval_every=1, eval_chars=64,
                     batch_size=2, seq_len=8, model={"hidden_size": 4, "embedding_dim": 2})
    loaded = ckpt_mod.load(run.last)
    assert len(loaded.metrics) <= ckpt_mod.MAX_METRIC_ROWS
    assert loaded.train_state["step"] == steps
    done = charnn("info", run.last, "--json")
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def wide_run(tmp_path_factory) -> Path:
    """The issue's repro: 100,000 distinct code points, trained by the CLI
    (a small model, so the test takes seconds; the vocabulary is the point)."""
    folder = tmp_path_factory.mktemp("wide")
    chars = [chr(x) for x in range(0x20000, 0x20000 + 100_000)]
    random.Random(0).shuffle(chars)
    (folder / "u.txt").write_text("".join(chars) * 2, encoding="utf-8")
    done = charnn("train", folder / "u.txt", "--out", folder / "u", "--max-steps", 2, "--hidden-size", 8,
                  "--num-layers", 1, "--embedding-dim", 4, "--batch-size", 2, "--seq-len", 8,
                  "--eval-chars", 200, "--sample-every", 0, "--log-every", 1)
    assert done.returncode == 0, done.stderr
    return folder


@pytest.mark.system
def test_a_run_over_100k_characters_samples_evaluates_and_resumes(wide_run):
    out = wide_run / "u"
    for name in ("best.pt", "last.pt"):
        assert ckpt_mod.load(out / name).tokenizer.vocab_size == 100_000
    sample = charnn("sample", out / "best.pt", "-n", 5, "--seed", 1)
    assert sample.returncode == 0, sample.stderr
    assert len(sample.stdout.rstrip("\n")) >= 5 and "not a readable checkpoint" not in sample.stderr
    info = charnn("info", out / "best.pt")
    assert info.returncode == 0 and "100,000 characters" in info.stdout, info.stderr
    part = wide_run / "part.txt"  # scoring 200k characters over 100k outputs each takes minutes
    part.write_text((wide_run / "u.txt").read_text(encoding="utf-8")[:300], encoding="utf-8")
    ev = charnn("eval", out / "best.pt", part, "--json")
    assert ev.returncode == 0, ev.stderr
    resumed = charnn("train", "--resume", out / "last.pt", "--max-steps", 3)
    assert resumed.returncode == 0, resumed.stderr
    assert ckpt_mod.load(out / "last.pt").train_state["step"] == 3


def _as_format_1(payload: dict) -> dict:
    return {**payload, "format_version": 1, "vocab": [chr(c) for c in payload["vocab"].tolist()]}


@pytest.mark.system
def test_format_1_files_still_load_and_resume(tmp_path):
    """A file charnn 0.2.3 wrote (format 1, the vocabulary as a list of
    characters) samples and resumes; the run's next save is format 2."""
    corpus = tmp_path / "t.txt"
    corpus.write_text(make_text(2000), encoding="utf-8")
    run = train_tiny(corpus, tmp_path / "o", max_steps=4, eval_every=2)
    old = torch.load(run.last, weights_only=True)
    torch.save(_as_format_1(old), run.last)
    assert torch.load(run.last, weights_only=True)["format_version"] == 1
    loaded = ckpt_mod.load(run.last)
    assert loaded.tokenizer.chars == [chr(c) for c in old["vocab"].tolist()]
    done = charnn("train", "--resume", run.last, "--max-steps", 6)
    assert done.returncode == 0, done.stderr
    new = torch.load(run.last, weights_only=True)
    assert new["format_version"] == ckpt_mod.FORMAT_VERSION == 2 and torch.equal(new["vocab"], old["vocab"])


@pytest.mark.parametrize("vocab, needle", [
    (torch.tensor([97, 98, 0x110000], dtype=torch.int32), "not a Unicode code point"),
    (torch.tensor([97, -1, 99], dtype=torch.int32), "not a Unicode code point"),
    (torch.tensor([97, 98, 99], dtype=torch.int64), "int64"),
    (torch.tensor([[97, 98, 99]], dtype=torch.int32), "shape"),
    (torch.tensor([97], dtype=torch.int32).expand(3), "stores fewer"),
    (torch.tensor([97, 97, 98], dtype=torch.int32), "repeated"),
    (["a", "b", "c"], "not a tensor"),
])
def test_crafted_format_2_vocabularies_are_refused(tmp_path, vocab, needle):
    _, payload = _payload(list("abc"))
    path = tmp_path / "v.pt"
    torch.save({**payload, "vocab": vocab}, path)
    with pytest.raises(CheckpointError, match=needle):
        ckpt_mod.load(path)


def test_hostile_format_1_vocabularies_stay_cheap(tmp_path):
    """Format 1's list is still read: a memo bomb in it or escape sequences
    are refused without walking or printing them."""
    _, payload = _payload(list("abc"))
    bomb: list = []
    for _ in range(30):
        bomb = [bomb, bomb]
    for name, vocab, needle in (("bomb", [bomb] * 3, "single characters"),
                                ("esc", ["\x1b", "b", "c"], None)):
        path = tmp_path / f"{name}.pt"
        torch.save({**_as_format_1(payload), "vocab": vocab}, path)
        t0 = time.perf_counter()
        if needle:
            with pytest.raises(CheckpointError, match=needle):
                ckpt_mod.load(path)
        else:
            assert ckpt_mod.load(path).tokenizer.chars[0] == "\x1b"
        assert time.perf_counter() - t0 < 1.0


@pytest.mark.system
def test_a_crafted_huge_vocabulary_costs_little(tmp_path):
    """A vocabulary tensor declaring 10^12 code points over 4 bytes of data is
    refused by the zip and storage checks, in a child whose peak memory and
    time are measured."""
    script = f"""
import resource, sys, time, torch
sys.path.insert(0, {str(REPO)!r})
import charnn.storage.checkpoint as c
from charnn.model.config import ModelConfig
from charnn.model.rnn import CharRNN
from charnn.text.tokenizer import CharTokenizer
tok = CharTokenizer(list("abc"))
m = CharRNN(ModelConfig(cell="lstm", vocab_size=3, embedding_dim=2, hidden_size=2, num_layers=1, dropout=0.0))
p = c.build_payload(m, tok)
p["vocab"] = torch.zeros(1, dtype=torch.int32).expand(10**12)
torch.save(p, sys.argv[1])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
try:
    c.load(sys.argv[1])
except c.CheckpointError as e:
    print("refused", time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before, e)
"""
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "huge.pt")], capture_output=True,
                          text=True, timeout=120)
    assert done.stdout.startswith("refused"), done.stdout + done.stderr
    _, seconds, grown_kb, *_ = done.stdout.split(" ", 3)
    assert float(seconds) < 1.0 and int(grown_kb) < 50_000, done.stdout
