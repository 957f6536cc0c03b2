"""`charnn info`: what a checkpoint holds, the loss curve in the terminal,
--plot PNG and --json; and the chart helpers in charnn.analysis.report."""

from __future__ import annotations

import json
import math
import sys

import pytest
from typer.testing import CliRunner

from charnn.storage.checkpoint import build_payload, save
from charnn.cli import app
from charnn.model.config import ModelConfig
from charnn.model.rnn import CharRNN
from charnn.analysis.report import escape_vocab, loss_curves, text_chart
from charnn.text.tokenizer import CharTokenizer

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def assert_clean_error(result, *fragments: str):
    assert result.exit_code == 1, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    assert result.stderr.startswith("Error: "), result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)


def test_info_shows_the_run(trained):
    result = invoke("info", trained.best)
    assert result.exit_code == 0, result.output
    out = result.stdout
    data = json.loads(invoke("info", trained.best, "--json").stdout)
    params = data["parameters"]
    assert f"lstm 1x32, embedding 16, dropout 0.0, {params:,} parameters" in out
    assert "vocabulary" in out and "\\n" in out  # the newline is shown escaped
    assert "step 20," in out and "characters seen" in out
    best = data["train_state"]["best_val"]
    assert f"best val loss {best:.4f} nats/char ({best / math.log(2):.3f} bits/char)" in out
    assert "options" in out and "seq_len" in out and str(trained.corpus) in out
    assert "loss curve" in out and "· train loss" in out and "o validation loss" in out
    chart = out[out.index("loss curve"):]
    assert "o" in chart.replace("o validation", "") and "·" in chart


def test_info_json(trained):
    result = invoke("info", trained.best, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["model_config"]["cell"] == "lstm" and data["model_config"]["hidden_size"] == 32
    assert data["parameters"] == sum(p.numel() for p in CharRNN(ModelConfig(**data["model_config"])).parameters())
    assert data["train_state"]["step"] == 20 and data["train_state"]["chars_seen"] > 0
    assert data["best_val_bpc"] == pytest.approx(data["best_val_loss"] / math.log(2))
    assert [r["step"] for r in data["metrics"]["val"]] == [10, 20]
    assert len(data["metrics"]["train"]) == 4  # log every 5 steps
    assert data["train_config"]["max_steps"] == 20
    assert "\n" in data["vocab"]


def test_info_without_history(tmp_path):
    tok = CharTokenizer(list("ab\n\t"))
    model = CharRNN(ModelConfig(cell="gru", vocab_size=4, embedding_dim=3, hidden_size=5, num_layers=2))
    path = save(build_payload(model, tok), tmp_path / "bare.pt")
    result = invoke("info", path)
    assert result.exit_code == 0, result.output
    assert "gru 2x5" in result.stdout
    assert "no training state recorded" in result.stdout
    assert "loss curve  none recorded" in result.stdout
    assert "ab\\n\\t" in result.stdout
    if _has_matplotlib():
        assert_clean_error(invoke("info", path, "--plot", tmp_path / "x.png"), "no loss history")


def test_info_missing_checkpoint(tmp_path):
    assert_clean_error(invoke("info", tmp_path / "nope.pt"), "does not exist", "nope.pt")


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _has_matplotlib(), reason="matplotlib is not installed")
def test_info_plot_writes_png(trained, tmp_path):
    png = tmp_path / "plots" / "loss.png"
    result = invoke("info", trained.best, "--plot", png)
    assert result.exit_code == 0, result.output
    assert f"Wrote {png}" in result.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_info_plot_without_matplotlib(trained, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    png = tmp_path / "loss.png"
    assert_clean_error(invoke("info", trained.best, "--plot", png), "matplotlib", "pip install")
    assert not png.exists()


def test_text_chart_places_points():
    train = [(0, 4.0), (50, 3.0), (100, 2.0)]
    val = [(100, 2.0), (50, 3.5)]
    lines = text_chart(train, val, width=11, height=5)
    assert lines[0].startswith("4.000 |") and lines[4].startswith("2.000 |")
    assert lines[0].split("|", 1)[1][0] == "·"  # step 0, loss 4 at top left
    assert lines[4].split("|", 1)[1][10] == "@"  # train and val at step 100 share a cell
    assert lines[1].split("|", 1)[1][5] == "o"  # val 3.5 at step 50
    assert text_chart([], []) == []


def test_loss_curves_and_vocab_escaping():
    rows = [{"step": 10, "train_loss": 3.0}, {"step": 10, "val_loss": float("nan")},
            {"step": 20, "val_loss": 2.5, "val_bpc": 3.6}, {"step": 20, "train_loss": 2.7}]
    assert loss_curves(rows) == ([(10, 3.0), (20, 2.7)], [(20, 2.5)])
    assert escape_vocab(["a", "\n", "\\", "\x00", " "]) == "a\\n\\\\\\u0000 "


def test_info_fits_80_columns_and_says_what_none_means(tmp_path):
    """A vocabulary of thousands and a long size_reason are folded to the
    terminal's width (the vocabulary cut after a few lines, saying how many
    more --json holds); an automatic option (None) reads "auto"."""
    chars = sorted({chr(0x4E00 + i) for i in range(3000)} | set("\nab\\ \u200b"))
    tok = CharTokenizer(chars)
    model = CharRNN(ModelConfig(vocab_size=len(chars), embedding_dim=3, hidden_size=5, num_layers=1))
    reason = ("900k chars, 4.5 min = ~3,411 steps = 3.88 epochs -> 2x256 (2x320 would get 2,393 steps, "
              "it needs about 4,263), dropout 0.1")
    path = save(build_payload(model, tok, train_config={"warmup_steps": None, "size_reason": reason,
                                                        "corpus": ["/a/" + "long-folder-name/" * 8 + "t.txt"]},
                              train_state={"step": 3}), tmp_path / "wide.pt")
    result = CliRunner().invoke(app, ["info", str(path)], env={"COLUMNS": "80"}, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    from rich.cells import cell_len

    lines = result.stdout.splitlines()
    assert max(cell_len(line) for line in lines) <= 80, [line for line in lines if cell_len(line) > 80]
    vocab = [line for line in lines if line.startswith("vocabulary")]
    assert vocab and f"{len(chars):,} characters: \\n \\\\ab\\u200b" in vocab[0]
    block = lines[lines.index(vocab[0]):lines.index(vocab[0]) + 4]
    assert all(line.startswith(" " * 12) for line in block[1:])
    more = int(block[-1].split("… ")[1].split(" more")[0].replace(",", ""))
    shown = "".join(line[12:] for line in block).split(": ", 1)[1].split(" …")[0]
    assert shown.endswith(chars[len(chars) - more - 1])  # the count names exactly what is not shown
    assert "--json lists them all" in block[-1] and not lines[lines.index(vocab[0]) + 4].startswith(" ")
    assert "  warmup_steps     auto" in lines
    joined = " ".join(line.strip() for line in result.stdout.splitlines())
    assert reason in joined  # folded, not cut: every word is there
