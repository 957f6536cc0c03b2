"""Shared helpers for the robustness tests (bad inputs, safety, crashes, NaN).

Tiny models only (hidden 16, one layer), text in temporary folders, CPU, fp32.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent

# Options that make a CLI training run tiny and fast.
TINY_MODEL = ["--hidden-size", "16", "--num-layers", "1", "--embedding-dim", "8"]
TINY_TRAIN = [*TINY_MODEL, "--seq-len", "16", "--batch-size", "4", "--device", "cpu",
              "--precision", "fp32", "--sample-every", "0", "--warmup-steps", "0"]

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards "
         "hum and juggle bright quartz boxes near the river bank").split()


def make_text(n_words: int = 800, seed: int = 0) -> str:
    rng = random.Random(seed)
    lines, line = [], []
    for _ in range(n_words):
        line.append(rng.choice(WORDS))
        if len(line) == 10:
            lines.append(" ".join(line).capitalize() + ".")
            line = []
    return "\n".join(lines) + "\n"


def write_corpus(path: Path, n_words: int = 800, seed: int = 0) -> Path:
    path.write_text(make_text(n_words, seed), encoding="utf-8")
    return path


def tiny_train_config(corpus: Path, out: Path, **kw: Any):
    from charnn.training.config import TrainConfig

    opts = dict(corpus=[str(corpus)], out=str(out), seq_len=16, batch_size=4, device="cpu",
                precision="fp32", sample_every=0, warmup_steps=0, max_steps=6, eval_every=3,
                log_every=1, val_fraction=0.1)
    opts.update(kw)
    return TrainConfig(**opts)


TINY_OVERRIDES = {"hidden_size": 16, "num_layers": 1, "embedding_dim": 8, "dropout": 0.0}


def train_tiny(corpus: Path, out: Path, **kw: Any):
    """Train a tiny model in-process; returns the TrainResult."""
    from charnn.training.trainer import Trainer

    cfg = tiny_train_config(corpus, out, **kw)
    return Trainer(cfg, dict(TINY_OVERRIDES), handle_sigint=False, cache=False).run()


# ---------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------

def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (relative path -> digest)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[p.relative_to(root).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def flip_bytes(raw: bytes, positions: list[int]) -> bytes:
    b = bytearray(raw)
    for p in positions:
        b[p] ^= 0xFF
    return bytes(b)


def write_checkpoint_variants(good: Path, folder: Path) -> dict[str, Path]:
    """Damaged, foreign and too-new checkpoints derived from a real one."""
    raw = good.read_bytes()
    folder.mkdir(parents=True, exist_ok=True)
    v: dict[str, Path] = {}

    def put(name: str, data: bytes) -> None:
        v[name] = folder / name
        v[name].write_bytes(data)

    put("empty.pt", b"")
    put("random.pt", random.Random(1).randbytes(4096))
    put("text.pt", b"This is just a text file someone renamed to .pt\n" * 20)
    put("truncated.pt", raw[: len(raw) // 2])
    # Overwrite the zip's central directory (at the end) and the pickle header.
    put("corrupt.pt", flip_bytes(raw, [10, 20, 30, 40] + list(range(len(raw) - 60, len(raw) - 20))))
    put("zip.pt", _a_zip())

    data = torch.load(good, weights_only=True)
    foreign = folder / "foreign.pt"  # another tool's torch.save of a plain state_dict
    torch.save(data["model_state"], foreign)
    v["foreign.pt"] = foreign
    noformat = folder / "noformat.pt"
    torch.save({k: val for k, val in data.items() if k != "format"}, noformat)
    v["noformat.pt"] = noformat
    newer = folder / "newer.pt"
    torch.save({**data, "format_version": 999}, newer)
    v["newer.pt"] = newer
    badshape = folder / "badshape.pt"
    state = dict(data["model_state"])
    state["head.bias"] = torch.zeros(3)
    torch.save({**data, "model_state": state}, badshape)
    v["badshape.pt"] = badshape
    badvocab = folder / "badvocab.pt"
    torch.save({**data, "vocab": data["vocab"][:-1]}, badvocab)
    v["badvocab.pt"] = badvocab
    nan = folder / "nan.pt"
    state = dict(data["model_state"])
    state["head.weight"] = torch.full_like(state["head.weight"], float("nan"))
    torch.save({**data, "model_state": state}, nan)
    v["nan.pt"] = nan
    v["a-folder.pt"] = folder / "a-folder.pt"
    v["a-folder.pt"].mkdir(exist_ok=True)
    return v


def _a_zip() -> bytes:
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("hello.txt", "not a checkpoint")
    return buf.getvalue()


# ---------------------------------------------------------------------------
# Subprocesses
# ---------------------------------------------------------------------------

def subprocess_env(data_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["CHARNN_DATA_DIR"] = str(data_dir)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env["OMP_NUM_THREADS"] = "1"
    env.pop("COLUMNS", None)
    return env


def charnn_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "charnn", *args]


def _interruptible() -> None:
    # A shell without job control starts background commands (`pytest &`) with
    # SIGINT ignored, and a child inherits that; a terminal's Ctrl-C reaches a
    # charnn whose SIGINT is at its default, so that is what these tests start.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def popen(args: list[str], data_dir: Path, cwd: Path, **kw: Any) -> subprocess.Popen:
    return subprocess.Popen(charnn_cmd(*args), env=subprocess_env(data_dir), cwd=cwd,
                            stdout=kw.pop("stdout", subprocess.PIPE),
                            stderr=kw.pop("stderr", subprocess.PIPE), preexec_fn=kw.pop("preexec_fn", _interruptible),
                            **kw)


def python_script(script: str, *args: str, **kw) -> subprocess.Popen:
    """Run a Python script in a child process of this checkout (unbuffered, one thread)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@contextlib.contextmanager
def reaped(proc: subprocess.Popen):
    """Whatever the block does or raises, the process does not outlive it."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def wait_for_progress(out: Path, proc: subprocess.Popen, since: int, timeout: float = 40.0) -> None:
    """Until the run has logged past ``since`` bytes of metrics (it is training)."""
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            _, err = proc.communicate()
            raise AssertionError(f"training exited early ({proc.returncode}):\n{err.decode()}")
        if metrics.exists() and metrics.stat().st_size > since and (out / "last.pt").exists():
            return
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("training made no progress in time")


def checkpoint_payload(hidden: int = 16) -> dict:
    """A real checkpoint payload: ~13 KB at hidden 16, ~300 KB at hidden 128."""
    from charnn.model.config import ModelConfig
    from charnn.model.rnn import CharRNN
    from charnn.storage.checkpoint import build_payload
    from charnn.text.tokenizer import CharTokenizer

    torch.manual_seed(0)
    tok = CharTokenizer.from_text("hello world, the quick brown fox")
    model = CharRNN(ModelConfig(vocab_size=tok.vocab_size, embedding_dim=8, hidden_size=hidden,
                                num_layers=1, dropout=0.0))
    return build_payload(model, tok, train_state={"step": hidden})
