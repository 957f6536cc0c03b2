"""charnn serve against what a request can send: malformed bodies, limits that
must match ``charnn sample``'s, requests that cost far more than their size
(a long stop string, many long primes), and the names models get. Every
malformed input gets a 4xx JSON error, never a 500 and never a stream that
stops without an event. Real server processes, real sockets."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import torch  # noqa: E402

from charnn.storage import checkpoint as ckpt_mod  # noqa: E402
from charnn.model.config import ModelConfig  # noqa: E402
from charnn.errors import CharnnError  # noqa: E402
from charnn.model.rnn import CharRNN  # noqa: E402
from charnn.serve.api import model_names  # noqa: E402
from charnn.text.tokenizer import CharTokenizer  # noqa: E402
from conftest import invoke  # noqa: E402
from serve_helpers import REPO, serve, wait_until  # noqa: E402
from serve_helpers import Chromium, sample_cli, sse_events, streamed_texts  # noqa: E402

MAX_SEED = 2**64 - 1


@pytest.fixture(scope="module")
def surrogate_ckpt(trained, tmp_path_factory) -> Path:
    """The tiny model with a lone surrogate in its vocabulary, as a corpus
    read with errors=surrogateescape gives, and a NaN best loss."""
    data = torch.load(trained.best, map_location="cpu", weights_only=True)
    data["vocab"][-1] = 0xD800  # format 2: code points
    data["train_state"]["best_val"] = math.nan
    path = tmp_path_factory.mktemp("odd") / "odd.pt"
    torch.save(data, path)
    return path


@pytest.fixture(scope="module")
def server(trained, surrogate_ckpt, tmp_path_factory):
    s = serve(tmp_path_factory.mktemp("log"), trained.best, surrogate_ckpt, "--max-prime", "4000")
    yield s
    assert s.stop() == 0
    assert "Traceback" not in s.stderr()


def post(server, body: bytes, path: str = "v1/generate", ctype: str | None = "application/json", **kw):
    headers = {"content-type": ctype} if ctype is not None else {}
    return httpx.post(server.url + path, content=body, headers=headers, timeout=30, **kw)


MALFORMED = [
    ("deep-nesting", b"[" * 100_000, "too deeply"),  # RecursionError
    ("deep-object", b'{"a":' * 50_000, "too deeply"),
    ("huge-integer", b'{"n": ' + b"7" * 5000 + b"}", "number too long"),
    ("duplicate-key", b'{"n": 5, "n": 5000000}', "appears twice"),
    ("surrogate-key", b'{"\\ud800": 1}', "unknown field"),
    ("not-utf8", b'{"prime": "\xff"}', "not UTF-8"),
    ("utf16", '{"n": 1}'.encode("utf-16"), "not UTF-8"),
]


@pytest.mark.system
@pytest.mark.parametrize("body,fragment", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_body_is_a_4xx_json_error(server, body, fragment):
    path = "v1/score" if b'"text"' in body else "v1/generate"
    r = post(server, body, path)
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    err = r.json()["error"]
    assert fragment in err["message"], err["message"]
    # ...and the server goes on serving.
    assert post(server, b'{"prime": "The ", "n": 3}').status_code == 200


@pytest.mark.system
def test_a_lone_surrogate_in_a_streamed_prime_gives_a_whole_stream(server):
    body = json.dumps({"prime": "Th\ud800e ", "unknown": "skip", "stream": True, "n": 30, "seed": 5}).encode()
    r = post(server, body)
    assert r.status_code == 200
    events = sse_events(r.text)
    assert [k for k, _ in events][0] == "start" and events[-1][0] == "done", r.text[-300:]
    assert events[0][1]["dropped"] == ["\ud800"]
    assert len(streamed_texts(events, 1)[0]) == len("The ") + 30
    # Refused (not skipped): a 400 that names the character, not a cut stream.
    body = json.dumps({"prime": "\udfff", "stream": True, "n": 3}).encode()
    r = post(server, body)
    assert r.status_code == 400 and "U+DFFF" in r.json()["error"]["message"].upper()


@pytest.mark.system
def test_models_lists_a_vocabulary_with_a_lone_surrogate(server, surrogate_ckpt):
    r = httpx.get(server.url + "v1/models", timeout=10)
    assert r.status_code == 200
    data = json.loads(r.content, parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    odd = next(m for m in data["models"] if m["name"] == "odd")
    assert odd["vocab"][-1] == "\ud800" and odd["training"]["best_val_loss"] is None
    # The model generates its surrogate in JSON and in a stream.
    for stream in (False, True):
        r = post(server, json.dumps({"model": "odd", "prime": "\ud800", "n": 5, "seed": 1,
                                     "stream": stream}).encode())
        assert r.status_code == 200 and ("event: done" in r.text if stream else r.json()["samples"])


CONTENT_TYPES = [("APPLICATION/JSON", 200), ("Application/Json;charset=\"utf-8\"", 200),
                 ("application/json; charset=latin-1", 415), (None, 415)]


@pytest.mark.system
@pytest.mark.parametrize("ctype,status", CONTENT_TYPES, ids=[str(c) for c, _ in CONTENT_TYPES])
def test_content_type_must_be_json_in_any_case(server, ctype, status):
    r = post(server, b'{"prime": "The ", "n": 3, "seed": 1}', ctype=ctype)
    assert r.status_code == status, r.text
    if status != 200:
        assert "Content-Type: application/json" in r.json()["error"]["message"]


# ---------------------------------------------------------------------------
# The same limits as charnn sample
# ---------------------------------------------------------------------------

@pytest.mark.system
def test_seeds_up_to_2_64_minus_1_give_charnn_samples_text(server, trained):
    for seed, k in ((MAX_SEED, 1), (MAX_SEED - 2, 3), (2**63, 1)):
        r = post(server, json.dumps({"prime": "The ", "n": 40, "seed": seed, "num_samples": k}).encode())
        assert r.status_code == 200, r.text
        assert [s["text"] for s in r.json()["samples"]] == sample_cli(trained.best, "The ", 40, seed=seed,
                                                                     num_samples=k)
    for seed, k in ((MAX_SEED + 1, 1), (MAX_SEED, 2), (-1, 1)):
        r = post(server, json.dumps({"prime": "The ", "n": 4, "seed": seed, "num_samples": k}).encode())
        assert r.status_code == 400 and r.json()["error"]["field"] == "seed"
        cli = invoke("sample", trained.best, "-n", 4, "--seed", seed, "--num-samples", k)
        assert cli.exit_code != 0  # charnn sample refuses the same seeds


@pytest.mark.system
def test_stop_text_and_temperature_range_match_charnn_sample(server, trained):
    body = {"prime": "The ", "n": 300, "seed": 21, "temperature": 1.0, "stop": "e "}
    r = post(server, json.dumps(body).encode())
    assert r.json()["samples"][0]["text"] == sample_cli(trained.best, "The ", 300, seed=21, temperature=1.0,
                                                        stop="e ")[0]
    for bad in (-0.5, "inf"):
        r = post(server, json.dumps({"temperature": bad}).encode())
        assert r.status_code == 400 and r.json()["error"]["field"] == "temperature"
        assert invoke("sample", trained.best, "-n", 2, "--temperature", bad).exit_code != 0


# ---------------------------------------------------------------------------
# Cost inside the limits
# ---------------------------------------------------------------------------

@pytest.mark.system
def test_a_4000_character_stop_string_costs_no_more_than_none(server, trained):
    """The stop matcher is linear in the text: 7 concurrent requests for 2,000
    characters with a 4,000-character stop string that never occurs take
    about what they take without it (measured: 0.44 s each with it, 0.46 s
    without; before, 3.5-3.8 s with it), and text and finish_reason are
    ``charnn sample``'s."""
    stop = ("qz" * 2000)  # never generated

    def timed(body):
        t = time.monotonic()
        r = post(server, json.dumps(body).encode())
        assert r.status_code == 200, r.text
        return time.monotonic() - t, r.json()

    base = {"prime": "The ", "n": 2000, "seed": 3}
    with ThreadPoolExecutor(8) as pool:
        plain = max(t for t, _ in pool.map(timed, [base] * 7))
        jobs = [pool.submit(timed, {**base, "stop": stop}) for _ in range(7)]
        time.sleep(0.2)
        bystander, _ = timed({"prime": "A", "n": 20, "seed": 1})
        results = [j.result() for j in jobs]
    with_stop = max(t for t, _ in results)
    assert all(s["finish_reason"] == "length" for _, r in results for s in r["samples"])
    assert results[0][1]["samples"][0]["text"] == sample_cli(trained.best, "The ", 2000, seed=3, stop=stop)[0]
    assert with_stop < 1.5 * plain + 0.5, (with_stop, plain)
    assert bystander < 2, bystander


@pytest.fixture(scope="module")
def wide_ckpt(tmp_path_factory) -> Path:
    """A random 2-layer LSTM of 256 units: reading a 4,000-character prime
    takes a noticeable part of a second on one thread."""
    torch.manual_seed(0)
    tok = CharTokenizer([chr(c) for c in range(32, 127)] + ["\n"])
    model = CharRNN(ModelConfig(cell="lstm", vocab_size=tok.vocab_size, embedding_dim=32, hidden_size=256,
                                num_layers=2, dropout=0.0))
    path = tmp_path_factory.mktemp("wide") / "wide.pt"
    ckpt_mod.save(ckpt_mod.build_payload(model, tok), path)
    return path


@pytest.mark.system
@pytest.mark.parametrize("mode", ["batch-process", "batch-in-process"])
def test_sixty_long_primes_do_not_starve_a_short_request(wide_ckpt, tmp_path, mode):
    """60 requests with distinct 4,000-character primes are read one by one;
    a short request that arrives after them is read next, not last."""
    s = serve(tmp_path, wide_ckpt, "--max-queue", "100", *(["--batch-in-process"] if mode != "batch-process" else []))
    try:
        with ThreadPoolExecutor(61) as pool:
            t = time.monotonic()
            r = post(s, json.dumps({"prime": "x" * 4000, "n": 1, "seed": 1}).encode())
            one = time.monotonic() - t  # one long prime alone (the cache holds it now)
            assert r.status_code == 200
            longs = [pool.submit(post, s, json.dumps({"prime": f"{i:04d}" * 1000, "n": 1, "seed": 1}).encode())
                     for i in range(60)]
            wait_until(lambda: httpx.get(s.url + "v1/models", timeout=10).json()["models"][0]["queued"] >= 30)
            t = time.monotonic()
            short = post(s, json.dumps({"prime": "Hi", "n": 5, "seed": 2}).encode())
            waited = time.monotonic() - t
            assert short.status_code == 200
            pending = sum(not f.done() for f in longs)
            for f in longs:
                f.cancel()
            assert pending > 10  # the long ones were still queued when the short one finished
            assert waited < max(2.0, 4 * one), (waited, one)
    finally:
        s.proc.kill()
        s.proc.wait()


# ---------------------------------------------------------------------------
# Model names
# ---------------------------------------------------------------------------

def _ckpt(path: Path, src: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(src.read_bytes())
    return path


def test_model_names_are_run_folder_and_stem(trained, tmp_path, monkeypatch):
    a = _ckpt(tmp_path / "run1" / "best.pt", trained.best)
    b = _ckpt(tmp_path / "run2" / "best.pt", trained.best)
    c = _ckpt(tmp_path / "run2" / "last.pt", trained.best)
    assert model_names([a, b, c]) == ["run1/best", "run2/best", "last"]
    x = _ckpt(tmp_path / "x" / "run" / "best.pt", trained.best)
    y = _ckpt(tmp_path / "y" / "run" / "best.pt", trained.best)
    assert model_names([x, y, a]) == ["x/run/best", "y/run/best", "run1/best"]
    monkeypatch.chdir(tmp_path / "run1")
    assert model_names([Path("best.pt"), b]) == ["run1/best", "run2/best"]  # the current folder's name too
    # Stable: the same paths give the same names in any order.
    assert model_names([b, a]) == ["run2/best", "run1/best"]


def test_the_same_checkpoint_twice_is_refused(trained, tmp_path):
    a = _ckpt(tmp_path / "run1" / "best.pt", trained.best)
    link = tmp_path / "link.pt"
    link.symlink_to(a)
    for other in (a, tmp_path / "run1" / ".." / "run1" / "best.pt", link):
        with pytest.raises(CharnnError, match="same checkpoint"):
            model_names([a, other])
    result = invoke("serve", a, link, "--port", "0")
    assert result.exit_code == 1 and "same checkpoint" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.system
def test_serve_names_two_runs_best_as_the_readme_says(trained, tmp_path):
    a = _ckpt(tmp_path / "a" / "best.pt", trained.best)
    b = _ckpt(tmp_path / "b" / "best.pt", trained.best)
    s = serve(tmp_path, a, b)
    try:
        assert "Serving a/best, b/best at" in s.stderr()
        names = [m["name"] for m in httpx.get(s.url + "v1/models", timeout=10).json()["models"]]
        assert names == ["a/best", "b/best"]
        r = post(s, json.dumps({"model": "b/best", "prime": "The ", "n": 5, "seed": 1}).encode())
        assert r.status_code == 200 and r.json()["model"] == "b/best"
    finally:
        assert s.stop() == 0


# ---------------------------------------------------------------------------
# The page's "Copy as command", in a real browser and a real bash
# ---------------------------------------------------------------------------

@pytest.mark.system
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_copy_as_command_keeps_newlines_quotes_and_big_seeds(tmp_path):
    """A prime with newlines, quotes, $, backquotes and backslashes, and seed
    2**64-1, typed into the page: the command it shows, pasted into bash,
    prints exactly the page's text."""
    torch.manual_seed(2)
    tok = CharTokenizer(list("ab \n'\"$`\\!*;&|()-#~"))
    model = CharRNN(ModelConfig(cell="gru", vocab_size=tok.vocab_size, embedding_dim=8, hidden_size=16,
                                num_layers=1, dropout=0.0))
    ckpt = tmp_path / "my run" / "it's.pt"
    ckpt.parent.mkdir()
    ckpt_mod.save(ckpt_mod.build_payload(model, tok), ckpt)
    s = serve(tmp_path, ckpt)
    prime = "-a 'b'\n\"$a\" `b`\\\n\n!*;&|(#~) "
    browser = Chromium(shutil.which("chromium"), tmp_path / "profile")
    try:
        browser.open_page(s.url)
        browser.wait_for("document.readyState === 'complete' && document.querySelectorAll('#model option').length")
        browser.eval(f"const p = document.getElementById('prime'); p.value = {json.dumps(prime)};"
                     "p.dispatchEvent(new Event('input')); const s = document.getElementById('seed');"
                     "s.value = '18446744073709551615'; s.dispatchEvent(new Event('input'));"
                     "const n = document.getElementById('n'); n.value = 300; n.dispatchEvent(new Event('input'));"
                     "document.getElementById('go').click()")
        status = browser.wait_for("(s => s.startsWith('done') && s)(document.getElementById('status').textContent)")
        out = browser.eval("document.getElementById('out').textContent")
        command = browser.eval("document.getElementById('command').value")
        seed = browser.eval("document.getElementById('seed').value")
    finally:
        browser.close()
        assert s.stop() == 0
    assert "18446744073709551615" in status + seed and out.startswith(prime) and len(out) == len(prime) + 300
    assert "\n" in command and "--seed 18446744073709551615" in command
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run(["bash", "-c", 'charnn() { python3 -m charnn "$@"; }\n' + command], capture_output=True,
                          text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == out + "\n"
