"""Shared fixtures: small corpora in temporary folders and tiny trained checkpoints.

Every test runs with ``CHARNN_DATA_DIR`` pointing at a temporary folder, so
nothing (built-in corpus, encoding cache) is ever written into the repository.
Training fixtures are session-scoped: a tiny model trains once (a second or
two) and many tests read its checkpoint.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

# Tiny models gain nothing from a second thread, and with other processes on a
# 2-core machine OpenMP's spinning threads make them many times slower.
torch.set_num_threads(1)
# The user's way of saying so, for every command run in this process and every
# child that inherits the environment: without it each command measures the
# idle cores for 0.25 s first (charnn.model.devices.default_threads). The tests
# of that measurement set or remove the variable themselves.
os.environ["OMP_NUM_THREADS"] = "1"


def _one_click_command_per_app() -> None:
    """Typer's CliRunner rebuilds the click command tree from the app on every
    invoke (about 70 ms for charnn's); the tree depends only on the app, which
    does not change during the run, so build it once per app."""
    import typer.testing

    built: dict[int, tuple[Any, Any]] = {}
    build = typer.testing._get_command

    def get_command(app: Any) -> Any:
        if id(app) not in built:
            built[id(app)] = (app, build(app))
        return built[id(app)][1]

    typer.testing._get_command = get_command


_one_click_command_per_app()

# A small deterministic English-like corpus: varied enough to have ~40
# characters, regular enough that a tiny model learns something in 40 steps.
_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A stitch in time saves nine, and a penny saved is a penny earned.",
    "She sells sea shells by the sea shore; the shells she sells are sea shells.",
    "How much wood would a woodchuck chuck if a woodchuck could chuck wood?",
    "Peter Piper picked a peck of pickled peppers (or so they say).",
    "All that glitters is not gold: 42 of 100 nuggets were brass!",
]


def make_text(n_chars: int = 6000, seed: int = 0) -> str:
    """Deterministic text of about ``n_chars`` characters, lines of sentences."""
    import random

    rng = random.Random(seed)
    lines, size = [], 0
    while size < n_chars:
        line = " ".join(rng.choice(_SENTENCES) for _ in range(rng.randint(1, 3)))
        lines.append(line)
        size += len(line) + 1
    return "\n".join(lines) + "\n"


TINY_MODEL = {"hidden_size": 32, "num_layers": 1, "embedding_dim": 16, "dropout": 0.0}


@dataclass
class Trained:
    """A tiny training run: its output folder, corpus and what the trainer reported."""

    out: Path
    corpus: Path
    text: str
    result: Any
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def best(self) -> Path:
        return self.out / "best.pt"

    @property
    def last(self) -> Path:
        return self.out / "last.pt"


def train_tiny(corpus: Path, out: Path, model: dict[str, Any] | None = None, **cfg: Any) -> Trained:
    """Train a tiny model quickly with the library (no CLI, no cache, fp32)."""
    from charnn.training.config import TrainConfig
    from charnn.training.trainer import train

    options = dict(corpus=[str(corpus)], max_steps=20, eval_every=10, log_every=5, batch_size=8,
                   seq_len=32, out=str(out), precision="fp32", device="cpu", sample_every=0,
                   warmup_steps=5, lr=1e-2)
    options.update(cfg)
    events: list[dict[str, Any]] = []
    result = train(TrainConfig(**options), {**TINY_MODEL, **(model or {})}, handle_sigint=False,
                   cache=False, callback=events.append)
    text = corpus.read_text(encoding="utf-8") if corpus.is_file() else ""
    return Trained(out=Path(out), corpus=corpus, text=text, result=result, events=events)


# -- The checkout is the user's: the suite must leave data/ and checkpoints/ as it found them.

_CHECKOUT = Path(__file__).resolve().parents[1]
_GUARDED = ("data", "checkpoints")


def _checkout_snapshot() -> dict[str, tuple[int, int]]:
    found = {}
    for name in _GUARDED:
        for root, _dirs, files in os.walk(_CHECKOUT / name):
            for f in files:
                p = Path(root) / f
                try:
                    st = p.lstat()
                except OSError:
                    continue
                found[str(p.relative_to(_CHECKOUT))] = (st.st_size, st.st_mtime_ns)
    return found


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config._charnn_checkout = _checkout_snapshot()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    before = getattr(session.config, "_charnn_checkout", None)
    if before is None or hasattr(session.config, "workerinput"):
        return
    after = _checkout_snapshot()
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    if changed:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line("FAILED: the test run changed the checkout's own files (tests must write only "
                                "into temporary folders): " + ", ".join(changed[:20]), red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session", autouse=True)
def _isolated_data_dir(tmp_path_factory: pytest.TempPathFactory):
    """Point charnn's data folder at a temporary one for the whole session."""
    old = os.environ.get("CHARNN_DATA_DIR")
    os.environ["CHARNN_DATA_DIR"] = str(tmp_path_factory.mktemp("charnn-data"))
    yield
    if old is None:
        os.environ.pop("CHARNN_DATA_DIR", None)
    else:
        os.environ["CHARNN_DATA_DIR"] = old


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh, private CHARNN_DATA_DIR for one test."""
    d = tmp_path / "data"
    d.mkdir()
    monkeypatch.setenv("CHARNN_DATA_DIR", str(d))
    return d


@pytest.fixture
def text() -> str:
    return make_text()


@pytest.fixture
def corpus_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def session_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A corpus file shared by the session's trained checkpoints. Never modify it."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(make_text(), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory, session_corpus: Path) -> Trained:
    """A tiny LSTM trained for 20 steps with evaluations at steps 10 and 20."""
    return train_tiny(session_corpus, tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="session")
def learned_repeat(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """A tiny LSTM trained to near-zero loss on a short repeated string."""
    root = tmp_path_factory.mktemp("repeat")
    corpus = root / "hello.txt"
    corpus.write_text("hello world! " * 200, encoding="utf-8")
    return train_tiny(corpus, root / "out", max_steps=150, eval_every=75, lr=1e-2, warmup_steps=10)


# -- CLI helpers shared by the CLI and eval tests ---------------------------------

def invoke(*args):
    """Run the CLI in-process (exceptions propagate: a traceback fails the test)."""
    from typer.testing import CliRunner

    from charnn.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def assert_clean_error(result, *fragments: str, code: int = 1):
    """Exit code, an ``Error: ...`` line on stderr naming ``fragments``, no traceback."""
    assert result.exit_code == code, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    if code == 1:
        assert result.stderr.startswith("Error: "), result.stderr
        assert "Error" not in result.stdout
        for fragment in fragments:
            assert fragment in result.stderr, (fragment, result.stderr)


# -- A short repeated text and a two-layer model for library-level training tests
# (resume, fine-tuning, schedules): a few steps train in well under a second.

TALE_TEXT = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, "
    "it was the age of foolishness, it was the epoch of belief, it was the epoch of "
    "incredulity, it was the season of Light, it was the season of Darkness.\n"
) * 12
TALE_MODEL = {"hidden_size": 16, "num_layers": 2, "dropout": 0.2, "embedding_dim": 8}


@pytest.fixture
def tale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """TALE_TEXT in a file, with a private CHARNN_DATA_DIR."""
    monkeypatch.setenv("CHARNN_DATA_DIR", str(tmp_path / "data"))
    path = tmp_path / "corpus.txt"
    path.write_text(TALE_TEXT, encoding="utf-8")
    return path


def tale_config(corpus: Path, out: Path, **kw: Any):
    """A TrainConfig for a tiny CPU fp32 run on ``corpus``; ``kw`` overrides."""
    from charnn.training.config import TrainConfig

    base = dict(corpus=[str(corpus)], out=str(out), batch_size=4, seq_len=16, precision="fp32",
                device="cpu", sample_every=0, warmup_steps=3, eval_every=5, log_every=1)
    base.update(kw)
    return TrainConfig(**base)
