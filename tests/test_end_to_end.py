"""End to end through the command line (CliRunner), checked against an
independent plain-PyTorch model built from the checkpoint's weights."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from charnn import __version__
from charnn.training.config import TrainConfig

from conftest import assert_clean_error, invoke, make_text, train_tiny





# ---------------------------------------------------------------------------
# An independent model: nn.Embedding + nn.LSTM + nn.Linear, no charnn code
# ---------------------------------------------------------------------------

class Independent:
    def __init__(self, path: Path):
        data = torch.load(path, map_location="cpu", weights_only=True)
        mc, sd = data["model_config"], data["model_state"]
        self.vocab: list[str] = [chr(c) for c in data["vocab"].tolist()]  # code points
        self.stoi = {c: i for i, c in enumerate(self.vocab)}
        self.emb = nn.Embedding(mc["vocab_size"], mc["embedding_dim"])
        self.emb.load_state_dict({"weight": sd["embedding.weight"]})
        self.lstm = nn.LSTM(mc["embedding_dim"], mc["hidden_size"], num_layers=mc["num_layers"],
                            batch_first=True)
        self.lstm.load_state_dict({k[4:]: v for k, v in sd.items() if k.startswith("rnn.")})
        self.head = nn.Linear(mc["hidden_size"], mc["vocab_size"])
        self.head.load_state_dict({"weight": sd["head.weight"], "bias": sd["head.bias"]})
        for m in (self.emb, self.lstm, self.head):
            m.eval()

    @torch.no_grad()
    def forward(self, ids: list[int], state=None):
        x = torch.tensor([ids])
        out, state = self.lstm(self.emb(x), state)
        return self.head(out)[0], state  # (T, V)

    def loss(self, text: str) -> float:
        """Mean NLL of text[1:] in one stream, state carried through the whole text."""
        ids = [self.stoi[c] for c in text]
        logits, _ = self.forward(ids[:-1])
        return F.cross_entropy(logits.double(), torch.tensor(ids[1:])).item()

    def greedy(self, prime: str, n: int) -> str:
        logits, state = self.forward([self.stoi[c] for c in prime])
        out = []
        for _ in range(n):
            nxt = int(logits[-1].argmax())
            out.append(self.vocab[nxt])
            logits, state = self.forward([nxt], state)
        return prime + "".join(out)


# ---------------------------------------------------------------------------
# One CLI training run shared by the module (the exact command)
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    corpus = root / "corpus.txt"
    corpus.write_text(make_text(8000, seed=3), encoding="utf-8")
    out = root / "D"
    result = invoke("train", corpus, "--out", out, "--max-steps", 60, "--hidden-size", 64,
                    "--num-layers", 1, "--seq-len", 32, "--batch-size", 16, "--precision", "fp32")
    return root, corpus, out, result


def test_train_writes_contract_checkpoint(cli_run):
    _, corpus, out, result = cli_run
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    assert result.stdout == ""  # progress and status go to stderr
    assert "Done: 60 steps" in result.stderr
    for name in ("best.pt", "last.pt"):
        data = torch.load(out / name, map_location="cpu", weights_only=True)
        assert data["format"] == "charnn-checkpoint" and data["format_version"] == 2
        # Options given on the command line win; --size auto (the default) chose the others.
        mc = data["model_config"]
        assert {k: mc[k] for k in ("cell", "vocab_size", "hidden_size", "num_layers")} == {
            "cell": "lstm", "vocab_size": data["vocab"].numel(), "hidden_size": 64, "num_layers": 1}
        assert data["train_config"]["size"] == "auto"
        reason = data["train_config"]["size_reason"]
        assert f"embedding {mc['embedding_dim']}" in reason and f"dropout {mc['dropout']:g}" in reason
        assert [chr(c) for c in data["vocab"].tolist()] == sorted(set(corpus.read_text(encoding="utf-8")))
        assert data["train_state"]["step"] == 60
        assert data["train_config"]["corpus"] == [str(corpus)]
        assert {"metrics", "charnn_version", "created"} <= set(data)
        # last.pt resumes; best.pt is for sampling and evaluation (no optimizer state)
        assert ({"optimizer_state", "scheduler_state"} <= set(data)) == (name == "last.pt")
    # loads through charnn, too
    from charnn.storage.checkpoint import load
    assert load(out / "best.pt").model_config.hidden_size == 64


def test_eval_json_equals_independent_single_stream(cli_run, tmp_path):
    _, _, out, _ = cli_run
    text = make_text(12000, seed=11)  # long enough that eval may split it into segments
    f = tmp_path / "held.txt"
    f.write_text(text, encoding="utf-8")
    result = invoke("eval", out / "best.pt", f, "--json")
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    assert set(got) >= {"chars", "loss", "bpc", "perplexity"}
    expected = Independent(out / "best.pt").loss(text)
    assert got["chars"] == len(text) - 1
    assert got["loss"] == pytest.approx(expected, rel=1e-3)
    assert got["bpc"] == pytest.approx(got["loss"] / math.log(2), rel=1e-9)
    assert got["perplexity"] == pytest.approx(math.exp(got["loss"]), rel=1e-9)


def test_eval_equals_single_stream_on_a_context_hungry_model(learned_repeat, tmp_path):
    # A model that has learned "hello world! " needs its context: any segment or
    # chunk that restarts from a zero state costs it dearly, so this pins that
    # eval's internal batching really gives the single-stream figure.
    text = "hello world! " * 800
    f = tmp_path / "hello.txt"
    f.write_text(text, encoding="utf-8")
    result = invoke("eval", learned_repeat.best, f, "--json")
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    expected = Independent(learned_repeat.best).loss(text)
    assert got["chars"] == len(text) - 1
    assert got["loss"] == pytest.approx(expected, rel=1e-3), (got["loss"], expected)


def test_eval_plain_output(cli_run):
    _, corpus, out, _ = cli_run
    result = invoke("eval", out / "best.pt", corpus)
    assert result.exit_code == 0, result.output
    for word in ("loss", "bits/char", "perplexity"):
        assert word in result.stdout


def test_eval_without_files_uses_recorded_validation_split(cli_run):
    _, corpus, out, _ = cli_run
    result = invoke("eval", out / "best.pt", "--json")
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    text = corpus.read_text(encoding="utf-8")
    n_val = round(len(text) * 0.1)
    val = text[len(text) - n_val:]
    assert got["chars"] == n_val - 1
    assert got["loss"] == pytest.approx(Independent(out / "best.pt").loss(val), rel=1e-3)
    # the same figure the trainer recorded for best.pt
    data = torch.load(out / "best.pt", weights_only=True)
    assert got["loss"] == pytest.approx(data["train_state"]["best_val"], rel=1e-4)


def test_eval_without_files_errors_if_corpus_changed(tmp_path):
    corpus = tmp_path / "mine.txt"
    corpus.write_text(make_text(3000, seed=2), encoding="utf-8")
    run = train_tiny(corpus, tmp_path / "out", max_steps=2, eval_every=2)
    corpus.write_text(make_text(3000, seed=2) + "one more line\n", encoding="utf-8")
    assert_clean_error(invoke("eval", run.best), "changed", "pass the files")
    corpus.unlink()
    assert_clean_error(invoke("eval", run.best), "mine.txt")


def test_eval_without_files_from_another_folder(tmp_path, monkeypatch):
    # The recorded corpus must still be found when eval runs elsewhere: a
    # relative path given to train is only meaningful in train's folder.
    work = tmp_path / "work"
    work.mkdir()
    (work / "mine.txt").write_text(make_text(3000, seed=4), encoding="utf-8")
    monkeypatch.chdir(work)
    result = invoke("train", "mine.txt", "--out", "D", "--max-steps", 2, "--hidden-size", 16,
                    "--num-layers", 1, "--batch-size", 4, "--seq-len", 16, "--sample-every", 0)
    assert result.exit_code == 0, result.output
    monkeypatch.chdir(tmp_path)
    ev = invoke("eval", "work/D/best.pt", "--json")
    assert ev.exit_code == 0, (
        "BUG (train.py/cli.py): train records the corpus path as typed (relative), so `eval` with no "
        f"files fails from any other folder: {ev.output}")


def test_sample_same_seed_same_text(cli_run):
    _, _, out, _ = cli_run
    args = ("sample", out / "best.pt", "-p", "The ", "-n", 80, "-t", 1.0, "--seed", 7)
    a, b = invoke(*args), invoke(*args)
    assert a.exit_code == 0 and b.exit_code == 0, a.output
    assert a.stdout == b.stdout
    assert a.stdout.startswith("The ")
    assert len(a.stdout) == len("The ") + 80 + 1 and a.stdout.endswith("\n")
    c = invoke("sample", out / "best.pt", "-p", "The ", "-n", 80, "-t", 1.0, "--seed", 8)
    assert c.stdout != a.stdout
    assert "Traceback" not in a.output


def test_sample_greedy_equals_independent_greedy(cli_run):
    _, _, out, _ = cli_run
    prime = "The quick"
    result = invoke("sample", out / "best.pt", "--prime", prime, "--length", 60, "--temperature", 0)
    assert result.exit_code == 0, result.output
    expected = Independent(out / "best.pt").greedy(prime, 60)
    assert result.stdout == expected + "\n"
    # top-k 1 is greedy as well, whatever the temperature and seed
    topk = invoke("sample", out / "best.pt", "-p", prime, "-n", 60, "-t", 1.5, "--top-k", 1, "--seed", 1)
    assert topk.stdout == result.stdout


def test_sample_top_k_stays_within_vocab_and_seeded(cli_run):
    _, _, out, _ = cli_run
    args = ("sample", out / "best.pt", "-n", 50, "--top-k", 3, "--seed", 5)
    a, b = invoke(*args), invoke(*args)
    assert a.exit_code == 0, a.output
    assert a.stdout == b.stdout
    vocab = {chr(c) for c in torch.load(out / "best.pt", weights_only=True)["vocab"].tolist()}
    assert set(a.stdout[:-1]) <= vocab


def test_info_json(cli_run):
    _, _, out, _ = cli_run
    result = invoke("info", out / "best.pt", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["model_config"]["hidden_size"] == 64


def test_train_on_builtin_corpus_then_eval_its_split(tmp_path, data_dir):
    out = tmp_path / "D"
    result = invoke("train", "--out", out, "--max-steps", 2, "--hidden-size", 16, "--num-layers", 1,
                    "--batch-size", 4, "--seq-len", 16, "--val-fraction", 0.01, "--precision", "fp32",
                    "--sample-every", 0)
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert list(data_dir.glob("python-stdlib-*.txt"))  # assembled under the data folder
    data = torch.load(out / "best.pt", weights_only=True)
    assert data["train_config"]["corpus"] == []
    assert data["train_config"]["corpus_name"] == "python-stdlib"
    assert set("def():_=#\n") <= {chr(c) for c in data["vocab"].tolist()}  # it learns Python
    ev = invoke("eval", out / "best.pt", "--json")
    assert ev.exit_code == 0, ev.output
    assert json.loads(ev.stdout)["loss"] == pytest.approx(data["train_state"]["best_val"], rel=1e-4)


def test_train_with_encoding_latin1(tmp_path):
    f = tmp_path / "latin.txt"
    f.write_bytes(("Ça a été un café très élégant. " * 40).encode("latin-1"))
    args = ("train", f, "--out", tmp_path / "o", "--max-steps", 1, "--hidden-size", 16,
            "--num-layers", 1, "--batch-size", 4, "--seq-len", 16, "--sample-every", 0)
    assert_clean_error(invoke(*args), "latin.txt", "--encoding latin-1")
    result = invoke(*args, "--encoding", "latin-1")
    assert result.exit_code == 0, result.output
    data = torch.load(tmp_path / "o" / "best.pt", weights_only=True)
    assert ord("é") in data["vocab"].tolist() and data["train_config"]["encoding"] == "latin-1"
    ev = invoke("eval", tmp_path / "o" / "best.pt", "--json")  # reads it back with its encoding
    assert ev.exit_code == 0, ev.output


# ---------------------------------------------------------------------------
# Error paths: Error: ... on stderr, exit 1, no traceback
# ---------------------------------------------------------------------------

def test_sample_missing_checkpoint(tmp_path):
    assert_clean_error(invoke("sample", tmp_path / "nope.pt"), "does not exist", "nope.pt")


def test_sample_folder_suggests_best(cli_run):
    _, _, out, _ = cli_run
    assert_clean_error(invoke("sample", out), "folder", "best.pt")


def test_sample_not_a_checkpoint(tmp_path):
    f = tmp_path / "notes.pt"
    f.write_text("just some notes\n")
    assert_clean_error(invoke("sample", f), "not a readable checkpoint")


def test_sample_newer_format(cli_run, tmp_path):
    _, _, out, _ = cli_run
    data = torch.load(out / "best.pt", weights_only=True)
    data["format_version"] = 99
    torch.save(data, tmp_path / "future.pt")
    assert_clean_error(invoke("sample", tmp_path / "future.pt"), "newer", "upgrade")


def test_sample_prime_with_unknown_characters(cli_run):
    _, _, out, _ = cli_run
    result = invoke("sample", out / "best.pt", "-p", "hi 😀", "-n", 5)
    assert_clean_error(result, "U+1F600")
    assert result.stdout == ""  # nothing printed before the prime was validated


def test_eval_not_utf8(cli_run, tmp_path):
    _, _, out, _ = cli_run
    f = tmp_path / "bad.txt"
    f.write_bytes(b"The quick \xff brown")
    assert_clean_error(invoke("eval", out / "best.pt", f), "bad.txt", "0xff", "offset 10")


def test_eval_unknown_characters(cli_run, tmp_path):
    _, _, out, _ = cli_run
    f = tmp_path / "greek.txt"
    f.write_text("The quick λ fox\n", encoding="utf-8")
    assert_clean_error(invoke("eval", out / "best.pt", f), "U+03BB")


def test_eval_empty_and_one_character_files(cli_run, tmp_path):
    _, _, out, _ = cli_run
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert_clean_error(invoke("eval", out / "best.pt", empty), "empty")
    one = tmp_path / "one.txt"
    one.write_text("T")
    assert_clean_error(invoke("eval", out / "best.pt", one), "at least 2")


def test_sample_length_zero_prints_the_prime(cli_run):
    _, _, out, _ = cli_run
    result = invoke("sample", out / "best.pt", "-p", "The", "-n", 0)
    assert result.exit_code == 0, result.output
    assert result.stdout == "The\n"


def test_train_folder_with_binary_file_warns(tmp_path):
    d = tmp_path / "texts"
    d.mkdir()
    (d / "a.txt").write_text(make_text(2000, seed=6), encoding="utf-8")
    (d / "photo.jpg").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(200))
    result = invoke("train", d, "--out", tmp_path / "o", "--max-steps", 1, "--hidden-size", 16,
                    "--num-layers", 1, "--batch-size", 4, "--seq-len", 16, "--sample-every", 0)
    assert result.exit_code == 0, result.output
    warning = "".join(result.stderr.split())  # folded at 80 columns, inside a long path too
    assert "warning:skipped" in warning and "photo.jpg:lookslikeabinaryfile" in warning
    assert 0xFFFD not in torch.load(tmp_path / "o" / "best.pt", weights_only=True)["vocab"].tolist()


def test_train_missing_corpus(tmp_path):
    assert_clean_error(invoke("train", tmp_path / "missing.txt", "--out", tmp_path / "o", "--max-steps", 1),
                       "missing.txt", "does not exist")


def test_train_too_short_corpus(tmp_path):
    f = tmp_path / "short.txt"
    f.write_text("hello there\n" * 25, encoding="utf-8")  # fine for validation, short for the batch
    d = TrainConfig()
    assert d.batch_size * d.seq_len > 300
    assert_clean_error(invoke("train", f, "--out", tmp_path / "o", "--max-steps", 1), "too short",
                       f"--batch-size {d.batch_size}", f"--seq-len {d.seq_len}")
    f.write_text("hello there\n", encoding="utf-8")
    assert_clean_error(invoke("train", f, "--out", tmp_path / "o", "--max-steps", 1), "--val-fraction 0")


def test_train_binary_corpus(tmp_path):
    f = tmp_path / "blob.bin"
    f.write_bytes(bytes(range(256)) * 4)
    assert_clean_error(invoke("train", f, "--out", tmp_path / "o", "--max-steps", 1), "binary")


def test_train_out_is_a_file(tmp_path, corpus_file):
    (tmp_path / "taken").write_text("x")
    assert_clean_error(invoke("train", corpus_file, "--out", tmp_path / "taken", "--max-steps", 1,
                              "--hidden-size", 16, "--num-layers", 1), "taken")


@pytest.mark.parametrize("args", [
    ("sample", "X.pt", "-t", "-1"),
    ("sample", "X.pt", "--top-k", "-2"),
    ("sample", "X.pt", "-n", "-5"),
    ("sample", "X.pt", "--length", "many"),
    ("sample", "X.pt", "--no-such-option"),
    ("train", "--cell", "transformer"),
    ("train", "--batch-size", "0"),
    ("train", "--seq-len", "0"),
    ("train", "--hidden-size", "0"),
    ("train", "--lr", "0"),
    ("train", "--precision", "fp64"),
    ("train", "--time-limit", "soon"),
    ("eval",),
])
def test_bad_option_values_exit_2(args):
    result = invoke(*args)
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output


# ---------------------------------------------------------------------------
# As real processes
# ---------------------------------------------------------------------------

@pytest.mark.system
def test_python_m_charnn_help():
    proc = subprocess.run([sys.executable, "-m", "charnn", "--help"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    for command in ("train", "sample", "eval"):
        assert command in proc.stdout
    assert "Traceback" not in proc.stderr


@pytest.mark.system
def test_charnn_version():
    exe = shutil.which("charnn")
    cmd = [exe, "--version"] if exe else [sys.executable, "-m", "charnn", "--version"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"charnn {__version__}"


@pytest.mark.system
def test_help_does_not_import_torch():
    code = "import sys, charnn.cli; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_a_small_text_for_many_epochs_is_evaluated_often_but_sampled_a_few_times(tmp_path):
    """The user's command on a small text: evaluated about once an epoch (so
    best.pt can catch the early optimum), yet the log shows only a handful of
    samples; --sample-every 1 still shows one at every evaluation."""
    corpus = tmp_path / "small.txt"
    corpus.write_text(make_text(6000, seed=4), encoding="utf-8")
    tiny = ("--hidden-size", "32", "--num-layers", "1", "--embedding-dim", "16", "--dropout", "0")
    result = invoke("train", corpus, "--epochs", "30", *tiny, "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    evals = result.stderr.count(": validation loss")  # "step N: validation loss ..."
    samples = result.stderr.count("sample:")
    assert evals >= 20 and 2 <= samples <= 11, (evals, samples)
    result = invoke("train", corpus, "--epochs", "30", *tiny, "--out", tmp_path / "run", "--overwrite",
                    "--sample-every", "1")
    assert result.exit_code == 0, result.output
    assert result.stderr.count("sample:") == result.stderr.count(": validation loss") >= 20
