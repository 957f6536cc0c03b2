"""The bad-input matrix: every command, fed every kind of garbage a user can
type or point it at, answers with ``Error: ...`` (exit 1) or a usage error
(exit 2), never a traceback, and leaves the files already there untouched.

All cases share one folder (the "world") with a good corpus, a real tiny
checkpoint and damaged copies of it; the folder is hashed before and after
each case.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from typer.testing import CliRunner

from charnn.cli import app
from robust_helpers import (TINY_TRAIN, snapshot, train_tiny, write_checkpoint_variants,
                            write_corpus)


@dataclass
class World:
    root: Path
    corpus: Path
    ckpt: Path
    run: Path  # a --out folder that must never appear for a failing command
    v: dict[str, Path]  # damaged / foreign / too-new checkpoints
    f: dict[str, Path]  # bad text inputs and other files


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("world")
    data_dir = tmp_path_factory.mktemp("data-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CHARNN_DATA_DIR", str(data_dir))
        corpus = write_corpus(root / "corpus.txt", n_words=600)
        result = train_tiny(corpus, root / "trained", max_steps=3, eval_every=3)
    ckpt = root / "trained" / "last.pt"
    v = write_checkpoint_variants(ckpt, root / "bad-ckpts")
    data = torch.load(ckpt, weights_only=True)
    tc = data["train_config"]
    for name, train_config in {
        "noval.pt": {**tc, "val_fraction": 0.0},
        "moved.pt": {**tc, "corpus": [str(root / "gone" / "corpus.txt")]},
        "nocorpus.pt": {k: val for k, val in tc.items() if k != "corpus_hash"},
        "changed.pt": {**tc, "corpus_hash": "0" * 64},
    }.items():
        torch.save({**data, "train_config": train_config}, root / "bad-ckpts" / name)
        v[name] = root / "bad-ckpts" / name
    exported = {k: val for k, val in data.items() if k not in ("optimizer_state", "scheduler_state")}
    torch.save(exported, root / "bad-ckpts" / "exported.pt")
    v["exported.pt"] = root / "bad-ckpts" / "exported.pt"

    f: dict[str, Path] = {}
    files = root / "inputs"
    files.mkdir()

    def put(name: str, content: bytes) -> None:
        f[name] = files / name
        f[name].write_bytes(content)

    put("empty.txt", b"")
    put("binary.bin", bytes(range(256)) * 8)
    put("latin1.txt", ("caf\u00e9 cr\u00e8me br\u00fbl\u00e9e " * 40).encode("latin-1"))
    put("short.txt", b"the quick brown fox\n")  # too short for batch 4 x seq 16
    put("tiny.txt", b"ab")  # too short even to hold out validation
    put("one.txt", b"t")  # one character: nothing to score
    put("oov.txt", "the quick \u03a9 fox \U0001F600 jumps over\n".encode("utf-8") * 60)
    put("bom-only.txt", b"\xef\xbb\xbf")  # a byte-order mark and nothing else
    put("crlf-only.txt", b"\r\n")
    put("a-file", b"I am a file, not a folder\n")
    (files / "empty-dir").mkdir()
    (files / "binary-dir").mkdir()
    (files / "binary-dir" / "blob.bin").write_bytes(bytes(range(256)) * 8)
    (files / "hidden-only-dir").mkdir()
    (files / "hidden-only-dir" / ".notes.txt").write_text("hidden text is skipped\n")
    f["empty-dir"] = files / "empty-dir"
    f["binary-dir"] = files / "binary-dir"
    f["hidden-only-dir"] = files / "hidden-only-dir"
    assert result.last_path is not None and ckpt.exists()
    return World(root=root, corpus=corpus, ckpt=ckpt, run=root / "run", v=v, f=f)


@pytest.fixture
def runner(world, tmp_path, monkeypatch) -> CliRunner:
    monkeypatch.chdir(world.root)  # a default ./checkpoints/ would land in the hashed world
    monkeypatch.setenv("CHARNN_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("COLUMNS", "200")
    return CliRunner()


def flat(text: str) -> str:
    """Rich's error panel without its box and line wrapping."""
    return re.sub(r"\s+", " ", re.sub(r"[╭╮╰╯│─]", " ", text)).strip()


def has_option(command: str, option: str) -> bool:
    import typer.main

    cmd = typer.main.get_command(app).commands[command]
    return any(option in p.opts for p in cmd.params)


# ---------------------------------------------------------------------------
# The matrix
# ---------------------------------------------------------------------------

def T(W: World, *extra: str, corpus: str | None = None) -> list[str]:
    """A tiny training command that would succeed without ``extra``."""
    return ["train", corpus or str(W.corpus), "--out", str(W.run), *TINY_TRAIN,
            "--max-steps", "2", "--eval-every", "1", *extra]


def S(W: World, *extra: str, ckpt: str | None = None) -> list[str]:
    return ["sample", ckpt or str(W.ckpt), "-n", "5", "--seed", "1", *extra]


def E(W: World, *files: str, ckpt: str | None = None) -> list[str]:
    return ["eval", ckpt or str(W.ckpt), *(files or (str(W.corpus),))]


Case = tuple[str, Callable[[World], list[str]], int, str]

CORPUS_CASES: list[Case] = [
    ("missing", lambda W: T(W, corpus=str(W.root / "no-such.txt")), 1, "does not exist"),
    ("mistyped-dir", lambda W: T(W, corpus=str(W.root / "inputz")), 1, "does not exist"),
    ("empty", lambda W: T(W, corpus=str(W.f["empty.txt"])), 1, "empty"),
    ("bom-only", lambda W: T(W, corpus=str(W.f["bom-only.txt"])), 1, "empty"),
    ("binary", lambda W: T(W, corpus=str(W.f["binary.bin"])), 1, "binary"),
    ("checkpoint-as-corpus", lambda W: T(W, corpus=str(W.ckpt)), 1, "binary"),
    ("non-utf8", lambda W: T(W, corpus=str(W.f["latin1.txt"])), 1, "--encoding"),
    ("bad-encoding", lambda W: T(W, "--encoding", "utf-9"), 1, "encoding"),
    ("too-short", lambda W: T(W, corpus=str(W.f["short.txt"])), 1, "too short"),
    ("too-short-for-val", lambda W: T(W, corpus=str(W.f["tiny.txt"])), 1, "too few"),
    ("crlf-only", lambda W: T(W, corpus=str(W.f["crlf-only.txt"])), 1, ""),
    ("empty-dir", lambda W: T(W, corpus=str(W.f["empty-dir"])), 1, "no text files"),
    ("binary-dir", lambda W: T(W, corpus=str(W.f["binary-dir"])), 1, "no text files"),
    ("hidden-only-dir", lambda W: T(W, corpus=str(W.f["hidden-only-dir"])), 1, "no text files"),
    ("batch-bigger-than-text", lambda W: T(W, "--batch-size", "4096"), 1, "too short"),
]

NUMERIC_CASES: list[Case] = [
    (f"{opt}={val}", (lambda o, x: lambda W: T(W, o, x))(opt, val), 2, opt)
    for opt, val in [
        ("--hidden-size", "0"), ("--hidden-size", "-1"), ("--hidden-size", "abc"), ("--hidden-size", "1.5"),
        ("--num-layers", "0"), ("--num-layers", "-2"),
        ("--embedding-dim", "0"), ("--embedding-dim", "-8"),
        ("--dropout", "-0.1"), ("--dropout", "1"), ("--dropout", "nan"),
        ("--seq-len", "0"), ("--seq-len", "-5"),
        ("--batch-size", "0"), ("--batch-size", "-1"),
        ("--lr", "0"), ("--lr", "-0.001"), ("--lr", "nan"), ("--lr", "inf"), ("--lr", "abc"),
        ("--weight-decay", "-1"),
        ("--grad-clip", "-1"),
        ("--warmup-steps", "-1"),
        ("--max-steps", "-1"), ("--max-steps", "ten"),
        ("--epochs", "-1"),
        ("--time-limit", "abc"), ("--time-limit", "5x"), ("--time-limit", "-3m"), ("--time-limit", "m"),
        ("--time-limit", "1h-5m"), ("--time-limit", "nan"), ("--time-limit", "inf"),
        ("--eval-every", "0"), ("--eval-every", "-1"),
        ("--log-every", "0"),
        ("--val-fraction", "-0.1"), ("--val-fraction", "1"), ("--val-fraction", "0.95"),
        ("--patience", "-1"),
        ("--keep", "-1"),
        ("--sample-every", "-1"),
        ("--seed", "abc"),
        ("--cell", "transformer"),
        ("--device", "tpu"),
        ("--precision", "fp8"),
    ]
] + [
    (f"sample-{opt}={val}", (lambda o, x: lambda W: S(W, o, x))(opt, val), 2, opt)
    for opt, val in [
        ("--length", "-1"), ("--length", "many"),
        ("--temperature", "-0.5"), ("--temperature", "hot"),
        ("--top-k", "-1"), ("--top-k", "2.5"),
        ("--top-p", "0"), ("--top-p", "-0.1"), ("--top-p", "1.5"), ("--top-p", "nan"),
        ("--seed", "abc"),
    ]
] + [
    ("sample-temperature-nan", lambda W: S(W, "--temperature", "nan"), 2, "temperature"),
]

TRAIN_OPTION_CASES: list[Case] = [
    ("out-is-a-file", lambda W: T(W, "--out", str(W.f["a-file"])), 1, "is a file"),
    ("out-under-a-file", lambda W: T(W, "--out", str(W.f["a-file"] / "sub")), 1, "a-file"),
    ("no-budget", lambda W: T(W, "--max-steps", "0", "--time-limit", "0"), 1, "budget"),
    ("device-cuda-without-gpu", lambda W: T(W, "--device", "cuda"), 1, "cuda") if not torch.cuda.is_available()
    else ("device-mps", lambda W: T(W, "--device", "mps"), 1, "mps"),
    ("fp16-on-cpu", lambda W: T(W, "--precision", "fp16"), 1, "fp16"),
    ("patience-without-val", lambda W: T(W, "--patience", "2", "--val-fraction", "0"), 1, "validation"),
    ("resume-and-init-from", lambda W: T(W, "--resume", str(W.ckpt), "--init-from", str(W.ckpt)), 1,
     "exclude each other"),
    ("resume-hidden-size-mismatch", lambda W: T(W, "--resume", str(W.ckpt), "--hidden-size", "32"), 1,
     "--hidden-size 32"),
    ("resume-cell-mismatch", lambda W: T(W, "--resume", str(W.ckpt), "--cell", "gru"), 1, "--cell gru"),
    ("resume-layers-mismatch", lambda W: T(W, "--resume", str(W.ckpt), "--num-layers", "2"), 1,
     "--num-layers 2"),
    ("init-from-mismatch", lambda W: T(W, "--init-from", str(W.ckpt), "--hidden-size", "32"), 1,
     "architecture"),
    ("init-from-oov-corpus", lambda W: T(W, "--init-from", str(W.ckpt), corpus=str(W.f["oov.txt"])), 1,
     "--extend-vocab"),
    ("resume-changed-corpus", lambda W: T(W, "--resume", str(W.v["changed.pt"])), 1, "changed"),
    # The recorded corpus is gone and none is named: say so, and how to point at it.
    ("resume-moved-corpus", lambda W: ["train", "--out", str(W.run), "--max-steps", "2",
                                       "--resume", str(W.v["moved.pt"])], 1, "new location"),
    ("resume-exported-model", lambda W: T(W, "--resume", str(W.v["exported.pt"])), 1, "--init-from"),
    ("unknown-option", lambda W: T(W, "--hidden-sise", "16"), 2, "--hidden-sise"),
]

BAD_CHECKPOINTS = [
    ("missing", lambda W: str(W.root / "nope.pt"), "does not exist"),
    ("folder", lambda W: str(W.root / "trained"), "folder"),
    ("folder-named-pt", lambda W: str(W.v["a-folder.pt"]), "folder"),
    ("empty", lambda W: str(W.v["empty.pt"]), "empty"),
    ("random-bytes", lambda W: str(W.v["random.pt"]), "not a readable checkpoint"),
    ("text-file", lambda W: str(W.v["text.pt"]), "not a readable checkpoint"),
    ("corpus-as-checkpoint", lambda W: str(W.corpus), "not a readable checkpoint"),
    ("truncated", lambda W: str(W.v["truncated.pt"]), "not a readable checkpoint"),
    ("corrupt", lambda W: str(W.v["corrupt.pt"]), "not a readable checkpoint"),
    ("other-zip", lambda W: str(W.v["zip.pt"]), "not a readable checkpoint"),
    ("foreign-state-dict", lambda W: str(W.v["foreign.pt"]), "not a charnn checkpoint"),
    ("no-format-key", lambda W: str(W.v["noformat.pt"]), "not a charnn checkpoint"),
    ("newer-format", lambda W: str(W.v["newer.pt"]), "upgrade charnn"),
    ("wrong-shapes", lambda W: str(W.v["badshape.pt"]), "shape"),
    ("vocab-mismatch", lambda W: str(W.v["badvocab.pt"]), "vocab"),
    ("nan-weights", lambda W: str(W.v["nan.pt"]), "nan"),
]

CHECKPOINT_CASES: list[Case] = []
for _name, _path, _needle in BAD_CHECKPOINTS:
    CHECKPOINT_CASES += [
        (f"info-{_name}", (lambda p: lambda W: ["info", p(W)])(_path), 1, _needle),
        (f"info-json-{_name}", (lambda p: lambda W: ["info", p(W), "--json"])(_path), 1, _needle),
        (f"sample-{_name}", (lambda p: lambda W: S(W, ckpt=p(W)))(_path), 1, _needle),
        (f"eval-{_name}", (lambda p: lambda W: E(W, ckpt=p(W)))(_path), 1, _needle),
        (f"resume-{_name}", (lambda p: lambda W: T(W, "--resume", p(W)))(_path), 1, _needle),
        (f"init-from-{_name}", (lambda p: lambda W: T(W, "--init-from", p(W)))(_path), 1, _needle),
    ]

SAMPLE_CASES: list[Case] = [
    ("prime-oov", lambda W: S(W, "--prime", "the \u03a9 fox \U0001F600"), 1, "U+03A9"),
    ("prime-oov-control", lambda W: S(W, "--prime", "the\x07fox"), 1, "U+0007"),
    ("no-checkpoint-argument", lambda W: ["sample"], 2, "checkpoint"),
    ("unknown-option", lambda W: S(W, "--temprature", "1"), 2, "--temprature"),
]

EVAL_CASES: list[Case] = [
    ("file-missing", lambda W: E(W, str(W.root / "nope.txt")), 1, "does not exist"),
    ("file-empty", lambda W: E(W, str(W.f["empty.txt"])), 1, "empty"),
    ("file-bom-only", lambda W: E(W, str(W.f["bom-only.txt"])), 1, "empty"),
    ("file-binary", lambda W: E(W, str(W.f["binary.bin"])), 1, "binary"),
    ("file-is-checkpoint", lambda W: E(W, str(W.ckpt)), 1, "binary"),
    ("file-non-utf8", lambda W: E(W, str(W.f["latin1.txt"])), 1, "--encoding"),
    ("file-bad-encoding", lambda W: ["eval", str(W.ckpt), str(W.corpus), "--encoding", "klingon"], 1,
     "encoding"),
    ("file-oov", lambda W: E(W, str(W.f["oov.txt"])), 1, "U+03A9"),
    ("file-one-char", lambda W: E(W, str(W.f["one.txt"])), 1, "at least 2"),
    ("empty-dir", lambda W: E(W, str(W.f["empty-dir"])), 1, "no text files"),
    ("binary-dir", lambda W: E(W, str(W.f["binary-dir"])), 1, "no text files"),
    ("own-split-val-fraction-0", lambda W: ["eval", str(W.v["noval.pt"])], 1, "pass the files"),
    ("own-split-corpus-moved", lambda W: ["eval", str(W.v["moved.pt"])], 1, "pass the files"),
    ("own-split-corpus-changed", lambda W: ["eval", str(W.v["changed.pt"])], 1, "pass the files"),
    ("own-split-not-recorded", lambda W: ["eval", str(W.v["nocorpus.pt"])], 1, "pass the files"),
    ("no-checkpoint-argument", lambda W: ["eval"], 2, "checkpoint"),
    ("info-no-argument", lambda W: ["info"], 2, "checkpoint"),
    ("unknown-command", lambda W: ["trian", str(W.corpus)], 2, "trian"),
]

ALL_CASES = CORPUS_CASES + NUMERIC_CASES + TRAIN_OPTION_CASES + CHECKPOINT_CASES + SAMPLE_CASES + EVAL_CASES


def check_refusal(result, code: int, needle: str) -> None:
    out = result.output
    assert "Traceback" not in out, out
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == code, f"exit {result.exit_code}, expected {code}:\n{out}"
    err = flat(result.stderr)
    if code == 1:
        assert "Error: " in result.stderr, out
        assert result.stdout == "", "an error must not write results to stdout"
        message = result.stderr.split("Error: ", 1)[1]
        assert len(message.strip()) > 15, f"a bare error message: {message!r}"
    else:
        assert "Usage:" in result.stderr or "Error" in result.stderr, out
    assert needle.lower() in err.lower(), f"{needle!r} not in: {err}"


@pytest.mark.parametrize("args, code, needle", [c[1:] for c in ALL_CASES], ids=[c[0] for c in ALL_CASES])
def test_bad_input_is_refused_cleanly(world, runner, args, code, needle):
    before = snapshot(world.root)
    result = runner.invoke(app, args(world))
    after = snapshot(world.root)
    check_refusal(result, code, needle)
    assert after == before, "a refused command changed or created files: " + str(
        sorted(set(after.items()) ^ set(before.items())))
    assert not world.run.exists(), "a refused training run created its output folder"


def test_prime_file_missing(world, runner):
    if not has_option("sample", "--prime-file"):
        pytest.skip("sample has no --prime-file option yet")
    before = snapshot(world.root)
    result = runner.invoke(app, S(world, "--prime-file", str(world.root / "no-such-prime.txt")))
    assert result.exit_code in (1, 2), result.output
    assert "Traceback" not in result.output
    assert "no-such-prime.txt" in flat(result.stderr)
    assert snapshot(world.root) == before


def test_prime_file_binary(world, runner):
    if not has_option("sample", "--prime-file"):
        pytest.skip("sample has no --prime-file option yet")
    result = runner.invoke(app, S(world, "--prime-file", str(world.f["binary.bin"])))
    assert result.exit_code in (1, 2), result.output
    assert "Traceback" not in result.output


# ---------------------------------------------------------------------------
# The same commands with good inputs work: the matrix is not passing by accident
# ---------------------------------------------------------------------------

def test_good_inputs_succeed(world, runner, tmp_path):
    for args in (S(world), E(world), ["info", str(world.ckpt)], ["eval", str(world.ckpt)]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, (args, result.output)
        assert "Error" not in result.stderr
    result = runner.invoke(app, T(world, "--out", str(tmp_path / "ok")))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "ok" / "last.pt").exists()


def test_resume_with_a_different_corpus_is_not_silently_ignored(world, runner, tmp_path):
    """``train other.txt --resume run/last.pt``: the run continues on its own
    corpus; naming a different one must not be silently ignored."""
    other = write_corpus(tmp_path / "other.txt", n_words=600, seed=5)
    result = runner.invoke(app, ["train", str(other), "--resume", str(world.ckpt), "--out",
                                 str(tmp_path / "resumed"), "--max-steps", "4"])
    assert "Traceback" not in result.output
    if result.exit_code == 0:
        assert "other.txt" in flat(result.stderr) or "corpus" in flat(result.stderr).lower(), (
            "`train OTHER --resume CKPT` "
            "trains on the checkpoint's own corpus and silently ignores OTHER; it should refuse "
            "(ConfigError: drop the corpus or use --init-from) or at least warn:\n"
            + result.output)
    else:
        assert result.exit_code == 1 and "Error: " in result.stderr
