"""charnn.inspect and `charnn inspect`: states and gates equal torch's,
correlations equal numpy's, a planted line-position unit is found, the
features follow their rules, JSON/terminal/PNG/HTML outputs, CLI errors."""

from __future__ import annotations

import base64
import json
import random
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser

import numpy as np
import pytest
import torch

from charnn.storage.checkpoint import load_model
from charnn.model.config import ModelConfig
from charnn.errors import ConfigError, DataError
from charnn.analysis.evaluate import load_eval_texts
from charnn.analysis.features import BUILTIN_FEATURES, parse_feature, text_features
from charnn.analysis.inspect_page import inspect_page
from charnn.analysis.inspection import inspect
from charnn.model.rnn import CharRNN
from charnn.analysis.report import show_char
from charnn.text.tokenizer import CharTokenizer
from conftest import assert_clean_error, invoke

CODE = '''import os  # the "os" module
def f(a, b=[1, (2, 3)]):
    s = 'it\\'s {x}'  /* c */
    return """doc (
not a bracket""" + a // b
'''


def _model(cell: str, vocab: int, hidden: int = 12, layers: int = 2, seed: int = 0) -> CharRNN:
    torch.manual_seed(seed)
    model = CharRNN(ModelConfig(cell=cell, vocab_size=vocab, embedding_dim=6, hidden_size=hidden,
                                num_layers=layers, dropout=0.0)).eval()
    with torch.no_grad():  # larger weights than the init, so gates reach saturation too
        for name, p in model.rnn.named_parameters():
            if name.startswith("weight"):
                p.mul_(3.0)
    return model


def _torch_states(model: CharRNN, ids: np.ndarray):
    """Every layer's h (and c) after every character, from torch's own module
    run one character at a time: (L, T, H) arrays."""
    x = model.embedding(torch.as_tensor(ids)[None])  # (1, T, E)
    state, hs, cs = None, [], []
    with torch.no_grad():
        for t in range(len(ids)):
            _, state = model.rnn(x[:, t : t + 1], state)
            h = state[0] if isinstance(state, tuple) else state
            hs.append(h[:, 0].clone())
            if isinstance(state, tuple):
                cs.append(state[1][:, 0].clone())
    return torch.stack(hs, 1).numpy(), (torch.stack(cs, 1).numpy() if cs else None)


@pytest.fixture(scope="module")
def code_text() -> str:
    return CODE * 6


# -- the recurrent implementation ------------------------------------------------

@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_states_equal_torch_modules(cell, code_text):
    tok = CharTokenizer.from_text(code_text)
    model = _model(cell, tok.vocab_size)
    # A chunk length that does not divide the text: the state is carried across chunks.
    result = inspect(model, code_text, tok, chunk_len=37)
    h, c = _torch_states(model, result.ids)
    assert result.chars == len(code_text) == result.kept
    for layer in range(2):
        np.testing.assert_allclose(result.layers[layer].h, h[layer], atol=1e-5, rtol=0)
        if cell == "lstm":
            np.testing.assert_allclose(result.layers[layer].c, c[layer], atol=1e-5, rtol=0)
        else:
            assert result.layers[layer].c is None
    assert list(result.layers[0].gates) == {"lstm": ["i", "f", "o", "g"], "gru": ["r", "z", "n"], "rnn": []}[cell]


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_gates_equal_an_independent_computation(cell, code_text):
    tok = CharTokenizer.from_text(code_text)
    model = _model(cell, tok.vocab_size, seed=1)
    result = inspect(model, code_text, tok, chunk_len=50)
    h_all, _ = _torch_states(model, result.ids)
    H = model.config.hidden_size
    x = model.embedding.weight.detach().double().numpy()[result.ids]  # (T, E)
    for layer in range(2):
        p = {n: getattr(model.rnn, f"{n}_l{layer}").detach().double().numpy()
             for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
        h_prev = np.vstack([np.zeros((1, H)), h_all[layer][:-1]])  # (T, H)
        a = x @ p["weight_ih"].T + p["bias_ih"]  # (T, G*H) torch's gate order
        b = h_prev @ p["weight_hh"].T + p["bias_hh"]
        blocks = lambda m: [m[:, k * H : (k + 1) * H] for k in range(m.shape[1] // H)]  # noqa: E731
        if cell == "lstm":
            (ai, af, ag, ao), (bi, bf, bg, bo) = blocks(a), blocks(b)
            expect = {"i": _sigmoid(ai + bi), "f": _sigmoid(af + bf), "g": np.tanh(ag + bg), "o": _sigmoid(ao + bo)}
        else:
            (ar, az, an), (br, bz, bn) = blocks(a), blocks(b)
            r = _sigmoid(ar + br)
            expect = {"r": r, "z": _sigmoid(az + bz), "n": np.tanh(an + r * bn)}
        for name, want in expect.items():
            np.testing.assert_allclose(result.layers[layer].gates[name], want, atol=1e-5, rtol=0, err_msg=name)
        # Saturation: the fractions counted from the gates themselves.
        for name, want in expect.items():
            sat = next(s for s in result.saturation if s.layer == layer and s.gate == name)
            lo, hi = (-0.8, 0.8) if name in ("g", "n") else (0.1, 0.9)
            got = result.layers[layer].gates[name]
            np.testing.assert_allclose(sat.unit_left, (got < lo).mean(0))
            np.testing.assert_allclose(sat.unit_right, (got > hi).mean(0))
            assert sat.left == pytest.approx((got < lo).mean()) and sat.right == pytest.approx((got > hi).mean())
        x = h_all[layer].astype(np.float64)
    # The weights were scaled up, so some gates do saturate: the counts are not trivially zero.
    assert any(s.left > 0.01 for s in result.saturation) and any(s.right > 0.01 for s in result.saturation)


# -- correlations -----------------------------------------------------------------

def test_correlations_equal_numpy_on_a_trained_model(trained):
    model, tok, _ = load_model(trained.best)
    text = trained.text[:3000]
    result = inspect(model, text, tok, chunk_len=256, features=[*BUILTIN_FEATURES, "vowel=[aeiou]"])
    assert result.cell == "lstm" and result.states == ("h", "c")
    checked = 0
    for f in result.features:
        if f.constant:
            assert np.ptp(f.values) == 0
            continue
        for layer, trace in enumerate(result.layers):
            for s, name in enumerate(f.states):
                x = trace.state(name).astype(np.float64)
                want = np.array([np.corrcoef(f.values, x[:, u])[0, 1] for u in range(x.shape[1])])
                np.testing.assert_allclose(f.r[layer, s], want, atol=1e-6)
                checked += 1
        # top(): distinct units by their largest |r| over h and c, in order, with its sign.
        per_unit = [max((abs(f.r[l, s, u]), l, f.states[s], u) for s in range(f.r.shape[1]))
                    for l in range(f.r.shape[0]) for u in range(f.r.shape[2])]
        best = sorted(per_unit, key=lambda t: -t[0])[:5]
        assert [(u.layer, u.state, u.unit) for u in f.top(5)] == [(l, s, u) for _, l, s, u in best]
        assert all(abs(u.r - f.r[u.layer, f.states.index(u.state), u.unit]) < 1e-12 for u in f.top(5))
    assert checked >= 4  # line_position, bracket_depth, indent?, in_word, vowel


def test_statistics_do_not_depend_on_what_is_kept(trained):
    model, tok, _ = load_model(trained.best)
    text = trained.text[:2000]
    full = inspect(model, text, tok, chunk_len=300)
    bare = inspect(model, text, tok, keep_chars=0, chunk_len=1024)
    assert bare.kept == 0 and bare.layers[0].h.shape == (0, 32)
    for a, b in zip(full.features, bare.features):
        assert a.constant == b.constant
        if not a.constant:
            np.testing.assert_allclose(a.r, b.r, atol=1e-9)
    assert full.to_dict() == bare.to_dict()


def _planted_model(tok: CharTokenizer, hidden: int = 8) -> CharRNN:
    """Unit 0's cell state counts the characters since the last newline: input
    gate saturated open, forget gate closed on '\\n' and open otherwise, g = +1."""
    model = _model("lstm", tok.vocab_size, hidden=hidden, layers=1, seed=3)
    H, nl = hidden, tok.stoi["\n"]
    with torch.no_grad():
        model.embedding.weight[:, 0] = 0.0
        model.embedding.weight[nl, 0] = 1.0  # embedding dimension 0: "this is a newline"
        w_ih, w_hh = model.rnn.weight_ih_l0, model.rnn.weight_hh_l0
        b_ih, b_hh = model.rnn.bias_ih_l0, model.rnn.bias_hh_l0
        for gate in range(4):  # torch's rows: i, f, g, o
            row = gate * H  # unit 0 of this gate
            w_ih[row].zero_()
            w_hh[row].zero_()
            b_ih[row], b_hh[row] = 20.0, 0.0
        w_ih[H, 0] = -40.0  # forget gate: sigmoid(20 - 40) ~ 0 on a newline, sigmoid(20) ~ 1 otherwise
    return model


def test_a_planted_line_position_unit_is_found():
    rng = random.Random(5)
    lines = ["".join(rng.choice("abcdefgh ()'#") for _ in range(rng.randint(0, 70))) for _ in range(150)]
    text = "\n".join(lines) + "\n"
    tok = CharTokenizer.from_text(text)
    result = inspect(_planted_model(tok), text, tok, chunk_len=200)
    lp = result.feature("line_position")
    best = lp.top(1)[0]
    assert (best.layer, best.unit, best.state) == (0, 0, "c")
    assert best.r > 0.99
    # The cell really counts: c = characters since the newline, + 1.
    np.testing.assert_allclose(result.layers[0].c[:, 0], lp.values + (lp.values != np.arange(1, len(text) + 1)),
                               atol=1e-4)


# -- features ---------------------------------------------------------------------

def test_builtin_features_follow_their_rules():
    text = "ab(c[d])\n  x = 'p(q' # r's\n\t/* (z */ \"\"\"t\nu\"\"\" w\n"
    f = text_features(text)
    at = lambda name: dict(zip(range(len(text)), f[name]))  # noqa: E731
    lines = text.split("\n")
    # line_position: characters since the last newline, 0 on the newline.
    assert f["line_position"][: len(lines[0]) + 2].tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 0, 1]
    # indent: the line's leading whitespace, the newline included in its line.
    second = len(lines[0]) + 1
    assert f["indent"][second : second + len(lines[1]) + 1].tolist() == [2] * (len(lines[1]) + 1)
    assert at("indent")[text.index("\t")] == 1
    # in_string: quotes included; a bracket in a string does not count; '#' in a comment; triple quotes span lines.
    s = text.index("'p(q'")
    assert f["in_string"][s : s + 5].tolist() == [1] * 5 and f["in_string"][s - 1] == 0 and f["in_string"][s + 5] == 0
    assert f["bracket_depth"][s + 2] == 0
    t3 = text.index('"""t')
    assert f["in_string"][t3 : t3 + 9].tolist() == [1] * 9 and f["in_string"][t3 + 9] == 0
    # in_comment: '#' to the end of the line (the apostrophe inside opens no string), /* */ inclusive.
    h = text.index("# r's")
    assert f["in_comment"][h : h + 5].tolist() == [1] * 5 and f["in_comment"][h + 5] == 0
    assert f["in_string"][h + 3] == 0
    c = text.index("/* (z */")
    assert f["in_comment"][c : c + 8].tolist() == [1] * 8 and f["in_comment"][c + 8] == 0
    assert f["bracket_depth"][c + 3] == 0  # the '(' inside the comment
    # bracket_depth: after reading the character.
    assert f["bracket_depth"][:9].tolist() == [0, 0, 1, 1, 2, 2, 1, 0, 0]
    # in_word: letters, digits, underscore.
    assert f["in_word"][:4].tolist() == [1, 1, 0, 1]


def test_unterminated_single_quote_stops_at_the_line_end():
    f = text_features("don't stop\nnow (x)\n", ["in_string", "bracket_depth"])
    assert f["in_string"].tolist() == [0, 0, 0] + [1] * 7 + [0] * 9
    assert f["bracket_depth"][-3] == 1


def test_regex_features_and_their_errors():
    f = text_features("def a():\n    def b(): pass\n", ["defs=^\\s*def ", "empty=x*"])
    assert f["defs"][:4].tolist() == [1, 1, 1, 1] and f["defs"][4] == 0
    assert f["defs"][9:17].tolist() == [1] * 8
    assert not f["empty"].any()  # empty matches cover nothing
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        parse_feature("bad=(unclosed")
    with pytest.raises(ConfigError, match="taken by a built-in"):
        parse_feature("indent=x")
    with pytest.raises(ConfigError, match="neither a built-in"):
        parse_feature("nonsense")
    with pytest.raises(ConfigError, match="given twice"):
        text_features("abc", ["x=a", "x=b"])
    with pytest.raises(ConfigError, match="one value per character"):
        text_features("abc", [("mine", [1, 2])])


def test_constant_features_are_reported_never_nan(trained):
    model, tok, _ = load_model(trained.best)
    text = "the cat sat on the mat\n" * 20  # no quotes, comments or brackets
    result = inspect(model, text, tok, features=[*BUILTIN_FEATURES, ("count", np.arange(len(text)))])
    d = result.to_dict(top=3)
    json.dumps(d, allow_nan=False)  # raises on NaN / inf
    by_name = {f["name"]: f for f in d["features"]}
    for name in ("in_string", "in_comment", "bracket_depth"):
        assert by_name[name] == {"name": name, "constant": True, "top": []}
    assert not by_name["line_position"]["constant"] and len(by_name["line_position"]["top"]) == 3
    assert not by_name["count"]["constant"]


@pytest.mark.system
def test_errors_and_the_package_export(trained):
    import charnn

    model, tok, _ = load_model(trained.best)
    with pytest.raises(ConfigError, match="tokenizer"):
        inspect(model, "hello")
    with pytest.raises(DataError, match="at least 2"):
        inspect(model, "h", tok)
    # charnn.inspect is the function (the library lives in charnn.analysis.inspection, so no
    # submodule of that name shadows it), before and after the module is imported.
    assert charnn.inspect(model, "hello hello", tok, max_chars=5).chars == 5
    code = ("import charnn, types; f = charnn.inspect; import charnn.analysis.inspection, charnn.analysis.inspect_page; "
            "print(isinstance(f, types.FunctionType), charnn.inspect is f)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["True", "True"], out.stderr


def test_json_shape(trained):
    model, tok, _ = load_model(trained.best)
    d = inspect(model, trained.text[:1500], tok).to_dict(top=4)
    assert set(d) >= {"chars", "features", "gates"} and d["chars"] == 1500
    assert [f["name"] for f in d["features"]] == list(BUILTIN_FEATURES)
    for f in d["features"]:
        assert set(f) == {"name", "constant", "top"}
        for u in f["top"]:
            assert set(u) == {"layer", "unit", "state", "r"}
            assert u["state"] in ("h", "c") and 0 <= u["unit"] < 32 and -1 <= u["r"] <= 1
    assert [(g["layer"], g["gate"]) for g in d["gates"]] == [(0, "i"), (0, "f"), (0, "o"), (0, "g")]
    assert all(0 <= g["left"] <= 1 and 0 <= g["right"] <= 1 for g in d["gates"])


# -- the command --------------------------------------------------------------------

def test_cli_table_on_the_validation_split(trained):
    result = invoke("inspect", trained.best, "--top", "6", "--feature", "vowel=[aeiou]")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "Inspecting" in result.stderr and "validation split" in result.stderr
    for name in [*BUILTIN_FEATURES, "vowel"]:
        assert re.search(rf"^{name}\s", out, re.M), name
    assert "constant over this text" in out  # no quotes in the tiny corpus
    assert re.search(r"^line_position\s+L0 [hc]\d+\s+[+-]0\.\d\d", out, re.M)
    assert "Gate saturation" in out and re.search(r"^\s+0\s+\d\.\d{3}/\d\.\d{3}", out, re.M)
    assert max(len(line) for line in out.splitlines()) <= 80
    data = json.loads(invoke("inspect", trained.best, "--json", "--top", "2").stdout)
    lp = next(f for f in data["features"] if f["name"] == "line_position")
    top = lp["top"][0]
    assert f"L{top['layer']} {top['state']}{top['unit']}" in out


def test_cli_json_files_and_max_chars(trained, tmp_path):
    f = tmp_path / "a.txt"
    f.write_text(trained.text[:900], encoding="utf-8")
    result = invoke("inspect", trained.best, f, "--json", "--max-chars", "500", "--threads", "1",
                    "--feature", "the=the")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["chars"] == 500 and data["features"][-1]["name"] == "the"
    assert len(data["features"][0]["top"]) == 4  # the default --top


def test_cli_errors(trained, tmp_path):
    for bad, fragment in [("x=(unclosed", "not a valid regular expression"), ("indent=x", "taken by a built-in"),
                          ("=abc", "feature name"), ("junk", "neither a built-in")]:
        result = invoke("inspect", trained.best, "--feature", bad)
        assert result.exit_code == 2, (bad, result.output)
        assert fragment in result.output and "Traceback" not in result.output
    assert_clean_error(invoke("inspect", tmp_path / "missing.pt"), "missing.pt")
    other = tmp_path / "greek.txt"
    other.write_text("λλλ", encoding="utf-8")
    assert_clean_error(invoke("inspect", trained.best, other), "greek.txt")
    result = invoke("inspect", trained.best, "--threads", "0")
    assert result.exit_code == 2


def test_cli_plot(trained, tmp_path, monkeypatch):
    png = tmp_path / "sat.png"
    result = invoke("inspect", trained.best, "--plot", png, "--max-chars", "800")
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    assert_clean_error(invoke("inspect", trained.best, "--plot", tmp_path / "b.png", "--max-chars", "300"),
                       "pip install 'charnn[plot]'")


# -- the page ---------------------------------------------------------------------

class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.blobs, self.spans, self.urls, self.circles = [], {}, 0, [], 0
        self._blob = None
        self.meta = ""
        self._meta = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        self.spans += tag == "span" and "c" in (a.get("class") or "").split()
        self.circles += tag == "circle"
        self.urls += [v for k, v in attrs if k in ("src", "href") and v]
        if tag == "script" and a.get("type") == "application/octet-stream":
            self._blob = a["id"]
            self.blobs[self._blob] = ""
        self._meta = tag == "script" and a.get("id") == "meta"

    def handle_endtag(self, tag):
        if tag == "script":
            self._blob, self._meta = None, False

    def handle_data(self, data):
        if self._blob:
            self.blobs[self._blob] += data
        if self._meta:
            self.meta += data


def _page(trained, tmp_path, chars: int = 400):
    path = tmp_path / "inspect.html"
    result = invoke("inspect", trained.best, "--html", path, "--html-chars", chars, "--max-chars", "1500", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["html"] == str(path)
    return path


def test_html_page_parses_and_holds_the_activations(trained, tmp_path):
    path = _page(trained, tmp_path)
    page = path.read_text(encoding="utf-8")
    p = _Page()
    p.feed(page)
    assert p.urls == []  # standalone: nothing fetched
    assert p.spans == 400
    assert set(p.blobs) == {f"q-0-{s}" for s in ("h", "c", "i", "f", "o", "g")}
    assert p.circles == 4 * 32  # one dot per unit and gate
    meta = json.loads(p.meta)
    assert meta["shown"] == 400 and meta["hidden"] == 32
    # The stored activations are the model's, to int8 precision.
    model, tok, ckpt = load_model(trained.best)
    val = load_eval_texts(tok, ckpt, [])[0].ids  # the page shows the validation split
    res = inspect(model, val, tok, max_chars=1500, keep_chars=400)
    assert meta["chars"][:50] == [show_char(c) for c in res.text[:50]]
    for state, decode in [("h", lambda s, u: s), ("f", lambda s, u: (s + 1) / 2),
                          ("c", lambda s, u: s * meta["cscale"][0][u])]:
        q = np.frombuffer(base64.b64decode(p.blobs[f"q-0-{state}"]), dtype=np.int8).reshape(32, 400)
        want = res.layers[0].state(state)  # (400, 32)
        for u in (0, 7, 31):
            got = decode(q[u] / 127.0, u)
            tol = (meta["cscale"][0][u] if state == "c" else 1.0) / 127.0
            np.testing.assert_allclose(got, want[:, u], atol=tol)
    # The picker lists the top units per feature.
    top = res.feature("line_position").top(5)[0]
    assert f'value="{top.layer}:{top.state}:{top.unit}"' in page
    assert "constant over the text" in page  # e.g. in_string on this corpus


def test_html_page_needs_kept_states(trained):
    model, tok, _ = load_model(trained.best)
    res = inspect(model, trained.text[:100], tok, keep_chars=0)
    with pytest.raises(ConfigError, match="keep_chars"):
        inspect_page(res)


@pytest.mark.system
@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_html_page_renders_in_headless_chromium(trained, tmp_path):
    path = _page(trained, tmp_path, chars=600)
    shot = tmp_path / "shot.png"
    proc = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--screenshot={shot}", "--window-size=1200,900", "--virtual-time-budget=5000",
                           path.as_uri()], capture_output=True, text=True, timeout=120)
    assert shot.exists(), proc.stderr[-2000:]
    dom = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                          "--virtual-time-budget=5000", path.as_uri()], capture_output=True, text=True, timeout=120)
    assert 'data-ready="600"' in dom.stdout  # the script ran to its end
    assert "background: rgb(" in dom.stdout  # and coloured the characters
    from PIL import Image

    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert img.std() > 10  # not blank
    # Coloured characters: many pixels that are neither grey nor white.
    saturation = img.max(axis=2) - img.min(axis=2)
    assert (saturation > 40).mean() > 0.01


@pytest.mark.parametrize("cell", ["gru", "rnn"])
def test_pages_of_other_cells(cell, code_text, tmp_path):
    tok = CharTokenizer.from_text(code_text)
    result = inspect(_model(cell, tok.vocab_size, hidden=8), code_text, tok, features=["indent", "q=['\"]"])
    page = inspect_page(result, chars=100)
    p = _Page()
    p.feed(page)
    states = ["h"] + (["r", "z", "n"] if cell == "gru" else [])
    assert set(p.blobs) == {f"q-{layer}-{s}" for layer in range(2) for s in states}
    assert p.spans == 100 and p.circles == (2 * 3 * 8 if cell == "gru" else 0)
    assert ("A vanilla RNN has no gates" in page) == (cell == "rnn")
    d = result.to_dict()
    assert [f["name"] for f in d["features"]] == ["indent", "q"]
    assert all(u["state"] == "h" for f in d["features"] for u in f["top"])
    assert len(d["gates"]) == (6 if cell == "gru" else 0)
    assert inspect(_model(cell, tok.vocab_size, hidden=8), code_text, tok, features=[]).features == []


def test_the_progress_bar_draws_on_a_terminal():
    """On a terminal rich draws the bar at once, before the total is known
    (it crashed there, and only there)."""
    import io

    from rich.console import Console

    from charnn.cli.inspect import _progress

    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=80)
    with _progress(console) as update:
        update(500, 2000)
        update(2000, 2000)
    assert "inspecting" in buf.getvalue()
