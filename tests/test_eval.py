"""charnn.analysis.evaluate and `charnn eval`: per-file figures, unknown characters,
batch invariance, surprisal (--show, --html) and the gradient-flow analysis."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from charnn.storage.checkpoint import load_model
from charnn.model.config import ModelConfig
from charnn.analysis.evaluate import evaluate_ids, gradient_flow, surprisal, w_hh_singular_values
from charnn.model.scoring import _segments, token_losses
from charnn.model.rnn import CharRNN

from conftest import assert_clean_error, invoke, make_text, train_tiny





def single_stream_losses(model: CharRNN, ids: np.ndarray) -> torch.Tensor:
    """The definition: one stream from a zero state through the whole text."""
    x = torch.as_tensor(np.asarray(ids[:-1], dtype=np.int64))[None]
    y = torch.as_tensor(np.asarray(ids[1:], dtype=np.int64))
    with torch.no_grad():
        logits, _ = model(x)  # (1, N-1, V)
    return F.cross_entropy(logits[0].double(), y, reduction="none")


@pytest.fixture(scope="module")
def marked(tmp_path_factory):
    """A tiny model whose vocabulary has markup characters: [Exit], <b>, &, "."""
    root = tmp_path_factory.mktemp("marked")
    corpus = root / "play.txt"
    corpus.write_text(make_text(3000, seed=9) + '[Exit] The <b>fox</b> & "dog".\n' * 30, encoding="utf-8")
    return train_tiny(corpus, root / "out", max_steps=20)


@pytest.fixture(scope="module")
def model_and_tok(trained):
    model, tok, _ = load_model(trained.best)
    return model, tok


# ---------------------------------------------------------------------------
# The figure: batch-invariant, per file, unknown characters
# ---------------------------------------------------------------------------

def test_batched_eval_equals_single_stream(model_and_tok):
    model, tok = model_and_tok
    ids = tok.encode_array(make_text(20000, seed=3))
    assert len(_segments(len(ids) - 1, 64, 256)) > 1  # the batched path is really taken
    expected = float(single_stream_losses(model, ids).mean())
    for streams in (64, 4, 1):
        got = evaluate_ids(model, ids, max_streams=streams)
        assert got.chars == len(ids) - 1
        assert got.loss == pytest.approx(expected, rel=1e-3)
    # position by position, too (after each segment's burn-in the states agree)
    per_char = token_losses(model, ids).double()
    assert torch.allclose(per_char, single_stream_losses(model, ids), atol=2e-3)


def test_eval_per_file_and_total(trained, tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    ta, tb = make_text(3000, seed=5), make_text(800, seed=6)
    a.write_text(ta, encoding="utf-8")
    b.write_text(tb, encoding="utf-8")
    result = invoke("eval", trained.best, a, b, "--json")
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    assert {"chars", "loss", "bpc", "perplexity", "unknown", "files"} <= set(got)
    fa, fb = got["files"]
    assert (fa["name"], fb["name"]) == (str(a), str(b))
    assert (fa["chars"], fb["chars"]) == (len(ta) - 1, len(tb) - 1)
    assert got["chars"] == fa["chars"] + fb["chars"]
    assert got["loss"] == pytest.approx((fa["loss"] * fa["chars"] + fb["loss"] * fb["chars"]) / got["chars"])
    assert got["bpc"] == pytest.approx(got["loss"] / math.log(2))
    assert got["perplexity"] == pytest.approx(math.exp(got["loss"]))
    model, tok, _ = load_model(trained.best)
    assert fb["loss"] == pytest.approx(float(single_stream_losses(model, tok.encode_array(tb)).mean()), rel=1e-3)
    assert got["unknown"] == 0
    # plain output: a row per file and the total
    plain = invoke("eval", trained.best, a, b)
    assert plain.exit_code == 0, plain.output
    assert "a.txt" in plain.stdout and "b.txt" in plain.stdout and "total (2 files)" in plain.stdout
    assert f"{got['loss']:.4f} nats/char" in plain.stdout


def test_eval_unknown_characters_error_names_file_and_characters(trained, tmp_path):
    f = tmp_path / "greek.txt"
    f.write_text("The quick λ fox ß\n", encoding="utf-8")
    assert_clean_error(invoke("eval", trained.best, f), "greek.txt", "U+03BB", "U+00DF", "--unknown skip")


def test_eval_unknown_skip_counts_them(trained, tmp_path):
    f = tmp_path / "greek.txt"
    f.write_text("The quick λλ fox ß jumps\n", encoding="utf-8")
    result = invoke("eval", trained.best, f, "--unknown", "skip", "--json")
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    assert got["unknown"] == 3 and got["files"][0]["unknown"] == 3
    assert got["chars"] == len("The quick  fox  jumps\n") - 1
    plain = invoke("eval", trained.best, f, "--unknown", "skip")
    assert "unknown     3 characters outside the vocabulary" in plain.stdout
    assert_clean_error(invoke("eval", trained.best, f, "--unknown", "maybe"), code=2)


def test_eval_too_short_text(trained, tmp_path):
    f = tmp_path / "one.txt"
    f.write_text("λT", encoding="utf-8")
    assert_clean_error(invoke("eval", trained.best, f, "--unknown", "skip"), "one.txt", "at least 2")


def test_eval_validation_split_is_named(trained):
    result = invoke("eval", trained.best, "--json")
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    assert got["files"][0]["name"] == "validation split"
    assert got["loss"] == pytest.approx(torch.load(trained.best, weights_only=True)["train_state"]["best_val"], rel=1e-4)


# ---------------------------------------------------------------------------
# Surprisal: --show and --html
# ---------------------------------------------------------------------------

def test_surprisal_matches_eval_and_top_k(model_and_tok):
    model, tok = model_and_tok
    ids = tok.encode_array(make_text(1500, seed=8))
    s = surprisal(model, ids, top=5, chunk_len=100)  # several chunks: state carried across
    assert s.loss.shape == (len(ids) - 1,) and s.top_ids.shape == (len(ids) - 1, 5)
    assert torch.allclose(torch.as_tensor(s.loss).double(), single_stream_losses(model, ids), atol=1e-4)
    assert np.all(np.diff(s.top_probs, axis=1) <= 1e-7)  # sorted, most likely first
    assert np.allclose(s.prob, np.exp(-s.loss))
    top1 = s.top_ids[:, 0] == ids[1:]
    assert top1.any()
    assert np.allclose(s.prob[top1], s.top_probs[top1, 0], atol=1e-5)
    assert np.all(s.prob[~top1] <= s.top_probs[~top1, 0] + 1e-6)


def test_show_prints_coloured_text_with_legend_and_cap(marked, tmp_path):
    trained = marked
    f = tmp_path / "exit.txt"
    f.write_text("The fox [Exit] jumps over the lazy dog. " * 20, encoding="utf-8")
    result = invoke("eval", trained.best, f, "--show", "--max-chars", "60")
    assert result.exit_code == 0, result.output
    assert "surprisal:" in result.stdout and ">= 8 bits" in result.stdout
    assert "The fox [Exit] jumps" in result.stdout  # not eaten as rich markup
    assert "first 60 characters" in result.stdout
    assert "bits/char" in result.stdout
    assert_clean_error(invoke("eval", trained.best, f, "--show", "--json"), code=2)


class _Spans(HTMLParser):
    def __init__(self):
        super().__init__()
        self.chars: list[dict] = []
        self.text: list[str] = []
        self.external: list[str] = []
        self._in = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for key in ("src", "href"):
            if a.get(key):
                self.external.append(a[key])
        if tag == "link":
            self.external.append(str(a))
        if tag == "span" and "c" in (a.get("class") or "").split():
            self.chars.append(a)
            self._in = True

    def handle_data(self, data):
        if self._in:
            self.text.append(data)

    def handle_endtag(self, tag):
        if tag == "span":
            self._in = False


def _page(trained, tmp_path, text: str, *extra) -> tuple[Path, dict]:
    f = tmp_path / "page.txt"
    f.write_text(text, encoding="utf-8")
    page = tmp_path / "out" / "page.html"
    result = invoke("eval", trained.best, f, "--html", page, "--json", *extra)
    assert result.exit_code == 0, result.output
    assert "Wrote" in result.stderr
    return page, json.loads(result.stdout)


def test_html_has_an_element_per_character(marked, tmp_path):
    trained = marked
    text = "The <b>fox</b> & \"dog\" [Exit]\nThe quick brown fox jumps over the lazy dog.\n" * 5
    page, got = _page(trained, tmp_path, text)
    assert got["html"] == str(page)
    parser = _Spans()
    parser.feed(page.read_text(encoding="utf-8"))
    assert parser.external == []  # standalone: no external assets
    assert len(parser.chars) == len(text) - 1  # the first character is context only
    assert "".join(parser.text) == text[1:]
    model, tok, _ = load_model(trained.best)
    expected = single_stream_losses(model, tok.encode_array(text))
    for span, loss in zip(parser.chars, expected.tolist()):
        assert float(span["data-p"]) == pytest.approx(math.exp(-loss), rel=1e-3, abs=1e-6)
        top = json.loads(span["data-top"])
        assert len(top) == 5 and all(0 <= p <= 1 for _, p in top)
        assert "top:" in span["title"]
        assert span["style"].startswith("background:#")


def test_html_is_capped(trained, tmp_path):
    page, _ = _page(trained, tmp_path, make_text(3000, seed=1), "--max-chars", "500")
    parser = _Spans()
    parser.feed(page.read_text(encoding="utf-8"))
    assert len(parser.chars) == 499


def test_html_unwritable_path(trained, tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("The fox jumps.\n", encoding="utf-8")
    assert_clean_error(invoke("eval", trained.best, f, "--html", tmp_path), "cannot write", "folder")


@pytest.mark.system
@pytest.mark.skipif(shutil.which("chromium") is None and shutil.which("chromium-browser") is None,
                    reason="chromium is not installed")
def test_html_in_headless_chromium(marked, tmp_path):
    trained = marked
    text = "The fox [Exit] <b>jumps</b> & over.\n" * 3
    page, _ = _page(trained, tmp_path, text)
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
           "--dump-dom", page.as_uri()]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.skip("chromium did not finish in 60 s")
    dom = done.stdout
    # the page's script ran: it counted the character elements and bound hover handlers
    assert f'data-ready="{len(text) - 1}"' in dom, done.stderr[-2000:]
    parser = _Spans()
    parser.feed(dom)
    assert len(parser.chars) == len(text) - 1


# ---------------------------------------------------------------------------
# Gradient flow
# ---------------------------------------------------------------------------

def test_gradient_flow_equals_hand_derived_rnn_jacobians():
    """For a vanilla RNN, dl/dh_{t-1} = W_hh^T diag(1 - h_t^2) dl/dh_t, and
    dl/dh_L = W_hy^T (softmax - onehot): computed here by hand."""
    torch.manual_seed(1)
    model = CharRNN(ModelConfig(cell="rnn", vocab_size=7, embedding_dim=5, hidden_size=6, num_layers=1,
                                dropout=0.0)).double()
    ids = np.random.default_rng(0).integers(0, 7, size=21)
    flow = gradient_flow(model, ids, window=20, windows=1, burn_in=0)
    W_ih, W_hh = model.rnn.weight_ih_l0.detach(), model.rnn.weight_hh_l0.detach()
    b = (model.rnn.bias_ih_l0 + model.rnn.bias_hh_l0).detach()
    h, hs = torch.zeros(6, dtype=torch.double), []
    for t in range(20):
        h = torch.tanh(W_ih @ model.embedding.weight[ids[t]].detach() + W_hh @ h + b)
        hs.append(h)
    p = torch.softmax(model.head.weight.detach() @ h + model.head.bias.detach(), 0)
    g = model.head.weight.detach().T @ (p - F.one_hot(torch.tensor(int(ids[20])), 7).double())
    norms = [float(g.norm())]
    for t in range(19, 0, -1):
        g = W_hh.T @ ((1 - hs[t] ** 2) * g)
        norms.append(float(g.norm()))
    assert flow.distance == list(range(20))
    assert flow.relative_grad_norm[0] == 1.0
    assert np.allclose(flow.relative_grad_norm, np.array(norms) / norms[0], rtol=1e-8)
    assert flow.w_hh_max_singular_value[0]["matrix"] == pytest.approx(float(torch.linalg.matrix_norm(W_hh, 2)))


def test_singular_values_per_gate_block():
    for cell, gates in (("lstm", ["input", "forget", "cell", "output"]), ("gru", ["reset", "update", "new"]),
                        ("rnn", [])):
        model = CharRNN(ModelConfig(cell=cell, vocab_size=5, embedding_dim=4, hidden_size=8, num_layers=2))
        sv = w_hh_singular_values(model)
        assert [layer["layer"] for layer in sv] == [0, 1]
        assert list(sv[1]["gates"]) == gates
        w = model.rnn.weight_hh_l1.detach().double()
        for i, name in enumerate(gates):
            assert sv[1]["gates"][name] == pytest.approx(float(torch.linalg.svdvals(w[i * 8:(i + 1) * 8])[0]))
        assert all(v <= sv[1]["matrix"] + 1e-9 for v in sv[1]["gates"].values())


@pytest.fixture(scope="module")
def rnn_and_lstm(tmp_path_factory):
    """A tiny vanilla RNN and a tiny LSTM, trained the same way."""
    root = tmp_path_factory.mktemp("flow")
    corpus = root / "text.txt"
    corpus.write_text(make_text(8000, seed=4), encoding="utf-8")
    runs = {}
    for cell in ("rnn", "lstm"):
        runs[cell] = train_tiny(corpus, root / cell, model={"cell": cell}, max_steps=150, eval_every=150,
                                log_every=50, batch_size=16, seq_len=32, lr=2e-3, warmup_steps=20, seed=0)
    return corpus, runs


def test_rnn_gradient_vanishes_orders_of_magnitude_faster_than_lstm(rnn_and_lstm):
    corpus, runs = rnn_and_lstm
    got = {}
    for cell, run in runs.items():
        result = invoke("eval", run.last, corpus, "--gradient-flow", "--window", 60, "--windows", 16, "--json")
        assert result.exit_code == 0, result.output
        data = json.loads(result.stdout)
        flow = data["gradient_flow"]
        assert flow["distance"] == list(range(60))
        assert flow["relative_grad_norm"][0] == 1.0
        assert len(flow["w_hh_max_singular_value"]) == 1
        assert "chars" in data and "loss" in data
        got[cell] = flow["relative_grad_norm"]
    assert got["rnn"][50] < 1e-6  # the vanilla RNN's gradient has all but vanished
    assert got["lstm"][50] >= 1000 * got["rnn"][50]
    assert got["lstm"][30] >= 10 * got["rnn"][30]


def test_gradient_flow_table(rnn_and_lstm):
    corpus, runs = rnn_and_lstm
    result = invoke("eval", runs["lstm"].last, corpus, "--gradient-flow", "--window", 40, "--windows", 4)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "gradient flow (lstm)" in out and "top layer" in out
    assert "distance k" in out and "█" in out
    assert "forget gate" in out and "σ_max(W_hh)" in out
    rows = [line.split() for line in out.splitlines() if line.strip()[:2].strip().isdigit()]
    assert [r[0] for r in rows if len(r) >= 2 and "e" in r[1]][:3] == ["0", "1", "2"]


def test_gradient_flow_gru_and_too_short_text(rnn_and_lstm, tmp_path):
    corpus, _ = rnn_and_lstm
    model = CharRNN(ModelConfig(cell="gru", vocab_size=5, embedding_dim=4, hidden_size=8, num_layers=2))
    flow = gradient_flow(model, np.arange(200) % 5, window=30, windows=5)
    assert len(flow.relative_grad_norm) == 30 and flow.relative_grad_norm[0] == 1.0
    assert all(v > 0 and math.isfinite(v) for v in flow.relative_grad_norm)
    assert list(flow.w_hh_max_singular_value[0]["gates"]) == ["reset", "update", "new"]
    short = tmp_path / "short.txt"
    short.write_text(corpus.read_text(encoding="utf-8")[:50], encoding="utf-8")
    _, runs = rnn_and_lstm
    assert_clean_error(invoke("eval", runs["rnn"].last, short, "--gradient-flow"), "--window", "101")
