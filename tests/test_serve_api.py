"""charnn serve: the API through Starlette's test client (same text as
``charnn sample``, same loss as ``charnn eval``, 4xx errors that say what to
change, batching, queue limits, disconnects), a real server process stopped by
real signals, and the page in a real headless Chromium."""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import torch  # noqa: E402

with warnings.catch_warnings():  # starlette asks for httpx2 in its test client; httpx works the same
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient  # noqa: E402

from charnn.storage import checkpoint as ckpt_mod  # noqa: E402
from charnn.model.config import ModelConfig  # noqa: E402
from charnn.model.rnn import CharRNN  # noqa: E402
from charnn.serve import Limits, create_app, load_models  # noqa: E402
from charnn.text.tokenizer import CharTokenizer  # noqa: E402
from conftest import invoke  # noqa: E402
from serve_helpers import Chromium, batch_processes, sample_cli, sse_events, streamed_texts  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # starlette's TestClient on httpx

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def gru_ckpt(tmp_path_factory) -> Path:
    """A second model (random GRU, another vocabulary) to pick by name."""
    torch.manual_seed(1)
    tok = CharTokenizer(list("abc \n"))
    model = CharRNN(ModelConfig(cell="gru", vocab_size=tok.vocab_size, embedding_dim=8, hidden_size=16,
                                num_layers=2, dropout=0.0))
    path = tmp_path_factory.mktemp("gru") / "tiny-gru.pt"
    ckpt_mod.save(ckpt_mod.build_payload(model, tok), path)
    return path


@pytest.fixture(scope="module")
def models(trained, gru_ckpt):
    return load_models([trained.best, gru_ckpt])


@pytest.fixture(scope="module", params=[pytest.param("batch-process", marks=pytest.mark.system), "batch-thread"])
def client(models, request):
    """Each API test runs against both designs: each model's batch in a child
    process (the default; a real process, so the system tier) and on a thread
    of the server (--batch-in-process)."""
    app = create_app(models, Limits(max_n=5000, max_prime=200, max_samples=8),
                     batch_process=request.param == "batch-process")
    with TestClient(app, base_url="http://localhost") as c:  # a Host the server answers
        c.app_state = app.state.server
        yield c


def generate(client, **body) -> dict:
    r = client.post("/v1/generate", json=body)
    assert r.status_code == 200, r.text
    return r.json()


# ---------------------------------------------------------------------------
# The API
# ---------------------------------------------------------------------------

@pytest.mark.system
def test_models_lists_checkpoints_with_config_and_training(client, trained, gru_ckpt):
    r = client.get("/v1/models")
    assert r.status_code == 200
    data = r.json()
    by_name = {m["name"]: m for m in data["models"]}
    assert set(by_name) == {"best", "tiny-gru"}
    best = by_name["best"]
    loaded = ckpt_mod.load(trained.best)
    assert best["file"] == str(trained.best)
    assert best["model_config"] == loaded.model_config.to_dict()
    assert best["vocab_size"] == loaded.tokenizer.vocab_size == len(best["vocab"])
    assert best["training"]["step"] == loaded.train_state["step"]
    assert best["training"]["best_val_loss"] == pytest.approx(loaded.train_state["best_val"])
    assert by_name["tiny-gru"]["model_config"]["cell"] == "gru"
    assert data["limits"]["max_n"] == 5000


SETTINGS = [
    dict(prime="The ", n=120, seed=11),
    dict(prime="A st", n=150, seed=3, temperature=1.3, top_k=5),
    dict(prime="", n=100, seed=5, temperature=0.9, top_p=0.7),
    dict(prime="She ", n=80, seed=0, temperature=0),
    dict(prime="How ", n=300, seed=21, temperature=1.0, stop="e "),
    dict(prime="Pe", n=90, seed=7, num_samples=3, temperature=1.1),
    dict(prime="All ", n=200, seed=40, num_samples=5, top_k=4, top_p=0.9, temperature=1.2, stop="e"),
    dict(prime="T", n=70, seed=2**40, num_samples=8, temperature=0.5),
]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_generate_equals_charnn_sample(client, trained, settings):
    body = dict(settings)
    cli = sample_cli(trained.best, body.pop("prime"), body.pop("n"), seed=body.pop("seed"), **body)
    got = generate(client, model="best", **settings)
    assert [s["text"] for s in got["samples"]] == cli
    assert [s["seed"] for s in got["samples"]] == [settings["seed"] + i for i in range(len(cli))]
    if "stop" in settings:  # the stop string ended at least one sample early, and is never included
        assert any(s["finish_reason"] == "stop" for s in got["samples"])
        assert all(settings["stop"] not in s["text"][len(settings["prime"]):] for s in got["samples"])


MAX_COPY_SETTINGS = [
    dict(prime="The ", n=200, seed=11, max_copy=4),
    dict(prime="She ", n=150, seed=0, temperature=0, max_copy=3),
    dict(prime="A st", n=150, seed=3, temperature=1.3, top_k=5, max_copy=3),
    dict(prime="How ", n=300, seed=21, temperature=1.0, stop="s.", max_copy=3),
    dict(prime="Pe", n=120, seed=7, num_samples=3, temperature=0.7, top_p=0.9, max_copy=3, copy_span=8),
]


@pytest.mark.parametrize("settings", MAX_COPY_SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_generate_with_max_copy_and_copy_reports_equals_charnn_sample(client, trained, settings):
    """max_copy masks exactly as charnn sample --max-copy does (same texts, same
    redirected steps), and each sample's copy report is the CLI's."""
    args = ["sample", trained.best, "--json", "--prime", settings["prime"], "-n", settings["n"],
            "--seed", settings["seed"], "--max-copy", settings["max_copy"]]
    for key in ("temperature", "top_k", "top_p", "stop", "num_samples", "copy_span"):
        if key in settings:
            args += ["--" + key.replace("_", "-"), settings[key]]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    cli = json.loads(result.stdout)
    got = generate(client, model="best", **settings)["samples"]
    assert [s["text"] for s in got] == [s["text"] for s in cli]
    assert [s["redirected"] for s in got] == [s["redirected"] for s in cli]
    assert [s["copies"] for s in got] == [s["copies"] for s in cli]
    assert sum(s["redirected"] for s in got) > 0  # the guard changed something
    for s in got:  # no generated character ends a copy longer than max_copy
        assert s["copies"]["longest"] <= settings["max_copy"] and s["max_copy"] == settings["max_copy"]
    plain = generate(client, model="best", **{k: v for k, v in settings.items() if k != "max_copy"})["samples"]
    assert "redirected" not in plain[0] and plain[0]["finish_reason"] != "copy"


def test_max_copy_without_the_training_text_is_a_400_naming_the_field(client):
    r = client.post("/v1/generate", json={"model": "tiny-gru", "prime": "ab", "n": 10, "max_copy": 5})
    assert r.status_code == 400 and r.json()["error"]["field"] == "max_copy"
    assert "training text" in r.json()["error"]["message"]
    r = client.post("/v1/generate", json={"model": "best", "n": 10, "max_copy": 0})
    assert r.status_code == 400 and r.json()["error"]["field"] == "max_copy"
    got = generate(client, model="tiny-gru", prime="ab", n=10, seed=1)["samples"][0]
    assert got["copies"] is None


@pytest.mark.parametrize("settings", [SETTINGS[0], SETTINGS[4], SETTINGS[6]], ids=["plain", "stop", "batch-stop"])
def test_stream_gives_the_same_text_as_json(client, settings):
    if "stop" in settings:  # a stop string met late in the text, so there is a stream to see before it
        free = generate(client, **{k: v for k, v in settings.items() if k != "stop"})["samples"][0]["text"]
        at = next(i for i in range(len(settings["prime"]) + 30, len(free) - 3) if free[i:i + 3] not in free[:i + 2])
        settings = {**settings, "stop": free[at:at + 3]}
    whole = generate(client, **settings)
    assert len(whole["samples"][0]["text"]) >= len(settings["prime"]) + 30
    r = client.post("/v1/generate", json={**settings, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[0][0] == "start" and events[0][1]["seed"] == settings["seed"]
    assert events[-1][0] == "done"
    k = settings.get("num_samples", 1)
    assert streamed_texts(events, k) == [s["text"] for s in whole["samples"]]
    assert events[-1][1]["samples"] == whole["samples"]
    # That the text goes out as it is made, not in one piece at the end, is
    # test_a_stream_arrives_in_pieces_while_it_is_made's job: a short request
    # here may be done before the response starts, on a busy machine.


def test_stream_with_probabilities(client, trained):
    r = client.post("/v1/generate", json={"prime": "The ", "n": 60, "seed": 9, "stream": True, "top": 3})
    events = sse_events(r.text)
    text, probs, tops = "", [], []
    for kind, data in events:
        if kind == "text":
            assert len(data["probs"]) == len(data["top"]) == len(data["text"])
            text += data["text"]
            probs += data["probs"]
            tops += data["top"]
    assert len(text) == 60
    # The probabilities are the model's own: the chosen character's, and the 3 best, sorted.
    tok = ckpt_mod.load(trained.best).tokenizer
    model, _, _ = ckpt_mod.load_model(trained.best)
    with torch.no_grad():
        logits, _ = model(torch.tensor([tok.encode("The " + text)]))
    expected = torch.softmax(logits[0, 3:-1], -1)  # the distribution each generated character was drawn from
    for j, ch in enumerate(text):
        assert probs[j] == pytest.approx(float(expected[j, tok.stoi[ch]]), abs=1e-5)
        assert [c for c, _ in tops[j]] == [tok.chars[int(i)] for i in expected[j].topk(3).indices]
        assert tops[j][0][1] >= tops[j][1][1] >= tops[j][2][1]


def test_no_seed_reports_one_that_repeats(client):
    first = generate(client, prime="The ", n=40)
    assert isinstance(first["seed"], int)
    again = generate(client, prime="The ", n=40, seed=first["seed"])
    assert again["samples"] == first["samples"]


def test_second_model_by_name_and_zero_length(client, gru_ckpt):
    got = generate(client, model="tiny-gru", prime="ab", n=30, seed=1)
    assert got["model"] == "tiny-gru"
    assert got["samples"][0]["text"] == sample_cli(gru_ckpt, "ab", 30, seed=1)[0]
    assert set(got["samples"][0]["text"]) <= set("abc \n")
    assert generate(client, prime="The ", n=0, seed=1)["samples"][0]["text"] == "The "


def test_unknown_skip_drops_characters_like_the_cli(client, trained):
    got = generate(client, prime="The \u00e9\u00e9x", n=50, seed=4, unknown="skip")
    result = invoke("sample", trained.best, "--prime", "The \u00e9\u00e9x", "-n", 50, "--seed", 4,
                    "--unknown", "skip", "--json")
    assert got["samples"][0]["text"] == json.loads(result.stdout)[0]["text"]
    assert got["samples"][0]["prime"] == "The x"


def test_concurrent_streams_are_batched_and_give_the_same_texts_as_alone(client):
    requests = [dict(prime=p, n=n, seed=s, temperature=t, num_samples=k, stream=True)
                for p, n, s, t, k in [("The ", 400, 1, 0.8, 1), ("A ", 300, 2, 1.2, 2), ("", 500, 3, 0.6, 1),
                                      ("She ", 250, 4, 1.0, 4), ("How ", 450, 5, 0, 1), ("P", 350, 6, 0.9, 1),
                                      ("All ", 400, 7, 1.5, 3), ("The q", 300, 8, 0.7, 1)]]
    alone = [streamed_texts(sse_events(client.post("/v1/generate", json=r).text), r["num_samples"])
             for r in requests]
    engine = client.app_state.engines["best"]
    engine.reset_stats()
    barrier = threading.Barrier(len(requests))

    def run(r):
        barrier.wait()
        return streamed_texts(sse_events(client.post("/v1/generate", json=r).text), r["num_samples"])

    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(run, requests))
    assert together == alone
    assert engine.max_rows > 4  # they really shared batched steps


def test_streams_sharing_a_temperature_are_picked_together_and_match_sample(client, trained):
    """One-stream requests with the same temperature share one batched pick
    (serve.engine._pick_plain); each must still be exactly its own ``charnn sample``."""
    from charnn.generation.sample import generate as sample_generate  # what charnn sample runs for one sample

    model, tok, _ = ckpt_mod.load_model(trained.best)
    primes = ["The ", "A ", "She ", "How ", "P", "All ", "T", ""] * 2
    requests = [dict(prime=p, n=300, seed=100 + i, temperature=0.9) for i, p in enumerate(primes)]
    expected = [r["prime"] + "".join(sample_generate(model, tok, r["prime"], r["n"], temperature=0.9,
                                                     seed=r["seed"])) for r in requests]
    engine = client.app_state.engines["best"]
    engine.reset_stats()
    barrier = threading.Barrier(len(requests))

    def run(r):
        barrier.wait()
        return generate(client, **r)["samples"][0]["text"]

    with ThreadPoolExecutor(len(requests)) as pool:
        got = list(pool.map(run, requests))
    assert got == expected
    assert engine.max_rows >= 8


def test_a_repeated_prime_is_read_once_and_still_gives_charnn_sample_text(client, trained):
    """serve.PrimeCache: a later request with the same prime copies the state
    after it instead of reading it again -- for any num_samples, bit for bit."""
    engine = client.app_state.engines["best"]
    prime = "The cache "
    reads = engine.prime_reads
    for seed, k in ((31, 1), (32, 3), (33, 1)):
        got = generate(client, model="best", prime=prime, n=60, seed=seed, num_samples=k, temperature=1.0)
        assert [s["text"] for s in got["samples"]] == sample_cli(trained.best, prime, 60, seed=seed,
                                                                  num_samples=k, temperature=1.0)
    assert engine.prime_reads == reads + 1


def test_stop_hold_back_matches_the_sampler():
    """Streamed pieces with a stop string: what ``sample._until`` yields, in order."""
    import random

    from charnn.generation.sample import _until
    from charnn.serve.engine import _StreamText

    rng = random.Random(0)
    for _ in range(2000):
        text = "".join(rng.choice("aab") for _ in range(rng.randint(0, 30)))
        stop = "".join(rng.choice("ab") for _ in range(rng.randint(1, 4)))
        s, sent = _StreamText(stop), ""
        for ch in text:
            sent += s.piece(*s.add(ch))
            assert stop not in sent
        sent += s.piece(*s.flush())
        assert sent == "".join(_until(iter(text), stop)) == s.final


def test_score_equals_charnn_eval(client, trained, tmp_path):
    text = trained.text[:3000]
    path = tmp_path / "score.txt"
    path.write_text(text, encoding="utf-8")
    result = invoke("eval", trained.best, path, "--json")
    assert result.exit_code == 0, result.output
    expected = json.loads(result.stdout)
    r = client.post("/v1/score", json={"model": "best", "text": text, "top": 3})
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["chars"] == expected["chars"] == len(text) - 1
    for key in ("loss", "bpc", "perplexity"):
        assert got[key] == pytest.approx(expected[key], abs=1e-5)
    chars = got["characters"]
    assert "".join(c["char"] for c in chars) == text[1:] and got["context"] == text[0]
    # Per character: probability = exp(-loss), and they average to the figure.
    assert sum(c["loss"] for c in chars) / len(chars) == pytest.approx(expected["loss"], abs=1e-5)
    assert all(abs(c["prob"] - torch.tensor(-c["loss"]).exp().item()) < 1e-5 for c in chars[:200])
    assert all(len(c["top"]) == 3 and c["top"][0][1] >= c["prob"] - 1e-6 for c in chars[:200])


def test_score_normalises_newlines_like_reading_a_file(client, trained, tmp_path):
    text = "The quick brown fox.\r\nA stitch in time.\r\n"
    path = tmp_path / "crlf.txt"
    path.write_bytes(text.encode())
    expected = json.loads(invoke("eval", trained.best, path, "--json").stdout)
    got = client.post("/v1/score", json={"text": text}).json()
    assert got["loss"] == pytest.approx(expected["loss"], abs=1e-5)
    assert got["chars"] == expected["chars"]


BAD = [
    ("/v1/generate", {"prime": "The \u00e9"}, 400, "prime", "'é' (U+00E9)"),
    ("/v1/generate", {"prime": "The \u00e9"}, 400, "prime", "\"unknown\": \"skip\""),
    ("/v1/generate", {"temperature": -1}, 400, "temperature", "0 (greedy) or a positive"),
    ("/v1/generate", {"temperature": "hot"}, 400, "temperature", "must be a number"),
    ("/v1/generate", {"top_p": 0}, 400, "top_p", "(0, 1]"),
    ("/v1/generate", {"top_p": 1.5}, 400, "top_p", "(0, 1]"),
    ("/v1/generate", {"top_k": -2}, 400, "top_k", "at least 0"),
    ("/v1/generate", {"n": 5001}, 400, "n", "from 0 to 5000"),
    ("/v1/generate", {"n": 2.5}, 400, "n", "whole number"),
    ("/v1/generate", {"n": True}, 400, "n", "whole number"),
    ("/v1/generate", {"num_samples": 9}, 400, "num_samples", "from 1 to 8"),
    ("/v1/generate", {"num_samples": 0}, 400, "num_samples", "from 1 to 8"),
    ("/v1/generate", {"seed": -1}, 400, "seed", "from 0"),
    ("/v1/generate", {"prime": "x" * 201}, 413, "prime", "at most 200"),
    ("/v1/generate", {"stop": ""}, 400, "stop", "must not be empty"),
    ("/v1/generate", {"stream": "yes"}, 400, "stream", "true or false"),
    ("/v1/generate", {"top": 11}, 400, "top", "from 0 to 10"),
    ("/v1/generate", {"unknown": "ignore"}, 400, "unknown", "\"error\" or \"skip\""),
    ("/v1/generate", {"model": "nope"}, 404, "model", "this server has: best, tiny-gru"),
    ("/v1/generate", {"length": 10}, 400, "length", "unknown field 'length'"),
    ("/v1/generate", {"model": "../../etc/passwd"}, 404, "model", "no model named"),
    ("/v1/generate", [1, 2], 400, None, "JSON object"),
    ("/v1/score", {}, 400, "text", "text is missing"),
    ("/v1/score", {"text": "T"}, 400, "text", "at least 2"),
    ("/v1/score", {"text": "Th\u00e9"}, 400, "text", "'é' (U+00E9)"),
    ("/v1/score", {"text": "The", "top": 50}, 400, "top", "from 0 to 10"),
]


@pytest.mark.parametrize("path,body,status,field,fragment", BAD, ids=[f"{p}-{f}-{i}" for i, (p, _, _, f, _) in enumerate(BAD)])
def test_bad_requests_get_a_4xx_json_error_naming_what_to_change(client, path, body, status, field, fragment):
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert fragment in err["message"], err["message"]
    assert err.get("field") == field
    assert err["status"] == status


def test_malformed_bodies_and_unknown_routes(client):
    r = client.post("/v1/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = client.post("/v1/generate", content=b"prime=x", headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 415 and "application/json" in r.json()["error"]["message"]
    r = client.post("/v1/generate", content=b"\xff\xfe", headers={"content-type": "application/json"})
    assert r.status_code == 400
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and "/v1/generate" in r.json()["error"]["message"]
    r = client.get("/v1/generate")
    assert r.status_code == 405 and "POST /v1/generate" in r.json()["error"]["message"]
    r = client.post("/v1/score", content=b"x" * (2 << 20), headers={"content-type": "application/json"})
    assert r.status_code == 413
    # ...and the server still works.
    assert generate(client, prime="The ", n=5, seed=1)["samples"][0]["text"].startswith("The ")


def test_page_is_one_self_contained_file(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    assert not re.search(r"https?://", page)  # no external requests: no absolute URL anywhere
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=", page)
    for control in ('id="prime"', 'id="temperature"', 'id="top_p"', 'id="top_k"', 'id="n"', 'id="seed"',
                    'id="model"', 'id="copy"'):
        assert control in page


# ---------------------------------------------------------------------------
# Limits: the queue, disconnects
# ---------------------------------------------------------------------------

# ---------------------------------------------------------------------------
# A real server process, real signals
# ---------------------------------------------------------------------------

def start_server(ckpt: Path, *args: str, session: bool = False) -> tuple[subprocess.Popen, str]:
    """``charnn serve`` on a free port; ``session``: in a process group of its own
    (as a terminal's foreground job, which Ctrl-C signals as a whole)."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "charnn", "serve", str(ckpt), "--port", "0", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=session)
    line = proc.stderr.readline()
    while line.startswith(("best: ", "tiny-gru: ")):  # a note on a model's copy report
        line = proc.stderr.readline()
    if "Serving" not in line:
        proc.kill()
        raise AssertionError(line + proc.stderr.read())
    return proc, re.search(r"(http://\S+/) ", line).group(1)


@pytest.fixture
def reap():
    procs = []
    yield procs.append
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


@pytest.mark.system
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_accepting_ends_streams_cleanly_and_exits_0(trained, reap, sig):
    proc, url = start_server(trained.best, "--max-n", "10000000", "--grace", "1")
    reap(proc)
    with httpx.Client(base_url=url, timeout=20) as http:
        assert http.get("v1/models").status_code == 200
        short = http.post("v1/generate", json={"prime": "The ", "n": 20, "seed": 3}).json()
        with http.stream("POST", "v1/generate", json={"prime": "The ", "n": 10**7, "seed": 1,
                                                      "stream": True}) as r:
            lines = r.iter_lines()
            assert next(lines) == "event: start"
            proc.send_signal(sig)
            time.sleep(0.3)
            # Not accepting any more, while the in-flight stream goes on...
            with pytest.raises(httpx.TransportError):
                httpx.get(url + "v1/models", timeout=2)
            # ...until the grace period ends it with an error event, not a cut connection.
            rest = "\n".join(lines)
        assert "event: error" in rest and "shutting down" in rest
    assert proc.wait(timeout=20) == 0
    err = proc.stderr.read()
    assert f"Stopped ({sig.name})" in err and "Traceback" not in err
    assert short["samples"][0]["text"] == sample_cli(trained.best, "The ", 20, seed=3)[0]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def cpu_ticks(pid: int) -> int:
    """User + system CPU time of ``pid`` so far, in clock ticks."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads child processes from /proc")


@pytest.mark.system
@needs_proc
def test_ctrl_c_in_the_terminal_stops_the_server_and_its_batch_processes(trained, gru_ckpt, reap):
    """A terminal's Ctrl-C signals the whole foreground process group: the
    server and each model's batch process get SIGINT at once. The batch
    processes must leave the stopping to the server: the stream in flight ends
    with an error event after the grace period, the server exits 0, and no
    batch process is left behind."""
    proc, url = start_server(trained.best, str(gru_ckpt), "--max-n", "10000000", "--grace", "1", session=True)
    reap(proc)
    workers = batch_processes(proc.pid)
    assert len(workers) == 2  # one batch process per model
    with httpx.Client(base_url=url, timeout=20) as http:
        with http.stream("POST", "v1/generate", json={"prime": "The ", "n": 10**7, "seed": 1,
                                                      "stream": True}) as r:
            lines = r.iter_lines()
            assert next(lines) == "event: start"
            os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does
            rest = "\n".join(lines)
        assert "event: text" in rest
        assert "event: error" in rest and "shutting down" in rest
    assert proc.wait(timeout=20) == 0
    err = proc.stderr.read()
    assert "Stopped (SIGINT)" in err and "Traceback" not in err
    wait_until(lambda: not any(alive(w) for w in workers), timeout=10)


@pytest.mark.system
@needs_proc
def test_a_killed_batch_process_ends_its_streams_and_later_requests_get_a_clear_503(trained, gru_ckpt, reap):
    """A batch process killed from outside (the out-of-memory killer, kill -9):
    its streams end with an error event that says to restart, new requests for
    that model get 503 saying the same, and the rest of the server goes on: the
    other model, /v1/models, /v1/score, and a clean exit on SIGTERM."""
    proc, url = start_server(trained.best, str(gru_ckpt), "--max-n", "10000000")
    reap(proc)
    with httpx.Client(base_url=url, timeout=20) as http:
        before = set(batch_processes(proc.pid))
        with http.stream("POST", "v1/generate", json={"model": "best", "prime": "The ", "n": 10**7, "seed": 1,
                                                      "stream": True}) as r:
            lines = r.iter_lines()
            assert next(lines) == "event: start"
            wait_until(lambda: http.get("v1/models").json()["models"][0]["streams"] == 1)
            # best's batch process is the one of the two using CPU while its stream runs
            ticks = {w: cpu_ticks(w) for w in before}
            time.sleep(0.5)
            victim = max(before, key=lambda w: cpu_ticks(w) - ticks[w])
            os.kill(victim, signal.SIGKILL)
            rest = "\n".join(lines)
        assert "event: error" in rest and "restart charnn serve" in rest and "signal 9" in rest
        r = http.post("v1/generate", json={"model": "best", "prime": "The ", "n": 5})
        assert r.status_code == 503 and "restart charnn serve" in r.json()["error"]["message"]
        other = http.post("v1/generate", json={"model": "tiny-gru", "prime": "ab", "n": 5, "seed": 1})
        assert other.status_code == 200 and len(other.json()["samples"][0]["text"]) == 7
        assert http.get("v1/models").status_code == 200
        score = http.post("v1/score", json={"model": "best", "text": "The cat"})
        assert score.status_code == 200
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    assert "Traceback" not in proc.stderr.read()


@pytest.mark.system
@needs_proc
def test_the_batch_process_does_not_outlive_a_server_killed_with_sigkill(trained, reap):
    proc, url = start_server(trained.best)
    reap(proc)
    workers = batch_processes(proc.pid)
    assert len(workers) == 1
    with httpx.Client(base_url=url, timeout=20) as http:
        assert http.post("v1/generate", json={"prime": "The ", "n": 20, "seed": 3}).status_code == 200
    proc.kill()
    proc.wait()
    wait_until(lambda: not alive(workers[0]), timeout=10)


@pytest.mark.system
def test_serve_without_the_extra_says_how_to_install(trained, tmp_path):
    # A shadow package that fails to import stands in for the missing extra.
    (tmp_path / "starlette").mkdir()
    (tmp_path / "starlette" / "__init__.py").write_text("raise ImportError('no starlette here')\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path) + os.pathsep + str(REPO))
    r = subprocess.run([sys.executable, "-m", "charnn", "serve", str(trained.best)], capture_output=True,
                       text=True, env=env, timeout=60)
    assert r.returncode == 1
    assert r.stderr.startswith("Error: ") and "pip install 'charnn[serve]'" in r.stderr
    assert "Traceback" not in r.stderr


def wait_until(cond, timeout=20.0):
    end = time.monotonic() + timeout
    while not (value := cond()):
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)
    return value


@pytest.mark.system
@pytest.mark.parametrize("mode,stop", [("batch-process", None), ("batch-in-process", "qxqxqxqx")],
                         ids=["batch-process-plain", "batch-in-process-stop"])
def test_a_stream_arrives_in_pieces_while_it_is_made(trained, reap, mode, stop):
    """An endless request (n 10 million) read through a real socket: its text
    arrives in several events long before it could be done, whatever the
    machine's load, and the pieces are ``charnn sample``'s text. Closing the
    connection frees the stream."""
    proc, url = start_server(trained.best, "--max-n", "10000000",
                             *(["--batch-in-process"] if mode == "batch-in-process" else []))
    reap(proc)
    body = {"prime": "The ", "n": 10**7, "seed": 4, "stream": True, **({"stop": stop} if stop else {})}
    with httpx.Client(base_url=url, timeout=20) as http:
        texts = []
        with http.stream("POST", "v1/generate", json=body) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            kind = None
            for line in r.iter_lines():
                if line.startswith("event: "):
                    kind = line[len("event: "):]
                    assert kind in ("start", "text"), line
                elif line.startswith("data: ") and kind == "text":
                    texts.append(json.loads(line[len("data: "):])["text"])
                    if len(texts) == 3:
                        break
        assert len(texts) == 3 and all(texts)
        made = "".join(texts)
        expected = sample_cli(trained.best, "The ", len(made), seed=4,
                              stop=stop)[0]
        assert "The " + made == expected
        wait_until(lambda: http.get("v1/models").json()["models"][0]["streams"] == 0)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0


@pytest.mark.system
def test_full_queue_gets_503_with_retry_after_and_a_disconnect_frees_the_slot(trained, reap):
    proc, url = start_server(trained.best, "--max-queue", "1", "--max-batch", "1", "--max-n", "10000000")
    reap(proc)
    with httpx.Client(base_url=url, timeout=30) as http, ThreadPoolExecutor(1) as pool:
        load = lambda: http.get("v1/models").json()["models"][0]  # noqa: E731
        # One endless stream takes the only place in the batch...
        with http.stream("POST", "v1/generate", json={"prime": "The ", "n": 10**7, "seed": 1,
                                                      "stream": True}) as first:
            lines = first.iter_lines()
            assert next(lines) == "event: start"
            wait_until(lambda: load()["streams"] == 1)
            # ...a second request waits in the queue (--max-queue 1)...
            second = pool.submit(httpx.post, url + "v1/generate", json={"prime": "A ", "n": 50, "seed": 2},
                                 timeout=30)
            wait_until(lambda: load()["queued"] == 1)
            # ...and a third is turned away at once.
            r = http.post("v1/generate", json={"prime": "A ", "n": 5})
            assert r.status_code == 503
            assert r.headers["retry-after"] == "1"
            assert "--max-queue" in r.json()["error"]["message"]
            time.sleep(0.3)
            assert not second.done()  # still waiting behind the endless stream
        # The first client went away: its place is free at the next step.
        got = second.result(timeout=20)
        assert got.status_code == 200 and len(got.json()["samples"][0]["text"]) == 52
        assert load()["queued"] == 0 and load()["streams"] == 0
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0


@pytest.mark.system
def test_sigterm_as_soon_as_the_address_is_announced_stops_cleanly(trained, reap):
    """A supervisor may stop the server the moment it says where it listens:
    the signal is already handled then (a graceful stop, exit 0), not
    SIGTERM's default action."""
    proc, _ = start_server(trained.best)
    reap(proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    assert "Stopped (SIGTERM)" in proc.stderr.read()


@pytest.mark.system
def test_address_in_use_is_a_clear_error(trained, reap):
    proc, url = start_server(trained.best)
    reap(proc)
    port = url.rsplit(":", 1)[1].strip("/")
    result = invoke("serve", trained.best, "--port", port)
    assert result.exit_code == 1
    assert "cannot listen on 127.0.0.1:" + port in result.stderr and "--port" in result.stderr
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0


# ---------------------------------------------------------------------------
# The page in a real browser (Chromium over the DevTools protocol on a pipe)
# ---------------------------------------------------------------------------


@pytest.mark.system
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_page_in_headless_chromium(trained, reap, tmp_path):
    proc, url = start_server(trained.best, "--max-n", "3000")
    reap(proc)
    browser = Chromium(shutil.which("chromium"), tmp_path / "profile")
    try:
        browser.open_page(url)
        browser.wait_for("document.readyState === 'complete' && document.querySelectorAll('#model option').length > 0")
        browser.eval("window.__mutations = 0; new MutationObserver((r) => { window.__mutations += r.length; })"
                     ".observe(document.getElementById('out'), {childList: true});")
        # Type a prime and a seed with the keyboard, set the length slider, press Ctrl+Enter.
        browser.eval("document.getElementById('prime').focus()")
        browser.send("Input.insertText", {"text": "The "})
        browser.eval("document.getElementById('seed').focus()")
        browser.send("Input.insertText", {"text": "42"})
        browser.eval("const n = document.getElementById('n'); n.value = 2000; n.dispatchEvent(new Event('input'));"
                     "document.getElementById('prime').focus()")
        for kind in ("keyDown", "keyUp"):
            browser.send("Input.dispatchKeyEvent", {"type": kind, "key": "Enter", "code": "Enter",
                                                    "windowsVirtualKeyCode": 13, "modifiers": 2})
        status = browser.wait_for("(s => s.startsWith('done') && s)(document.getElementById('status').textContent)")
        assert "2000 characters" in status and "seed 42" in status
        out = browser.eval("document.getElementById('out').textContent")
        shaded = browser.eval("[...document.querySelectorAll('#out span.c')].filter(s => s.style.background"
                              " && s.dataset.tip.includes('p(')).length")
        mutations = browser.eval("window.__mutations")
        command = browser.eval("document.getElementById('command').value")
        png = base64.b64decode(browser.send("Page.captureScreenshot", {"format": "png"})["data"])
    finally:
        browser.close()
    shot = tmp_path / "serve-page.png"
    shot.write_bytes(png)
    if os.environ.get("CHARNN_SCREENSHOT"):
        shutil.copy(shot, os.environ["CHARNN_SCREENSHOT"])
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert out.startswith("The ") and len(out) == 2004
    assert shaded == 2000  # every generated character shaded, with its alternatives
    assert mutations > 2  # the text arrived in pieces (streamed), not at once
    # "Copy as command" gives the charnn sample line that makes the same text.
    assert command.startswith("charnn sample ") and "--seed 42" in command and "-n 2000" in command
    result = invoke(*shlex.split(command)[1:])
    assert result.exit_code == 0, result.output
    assert result.stdout == out + "\n"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0


@pytest.mark.system
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_page_marks_copied_spans_and_sends_max_copy(trained, reap, tmp_path):
    """A prime copied from the training text is underlined character by
    character, escaped (the corpus holds '(' and '!'); with Max copy set the
    request carries max_copy and the command line gives the same text."""
    prime = trained.text[:45]
    proc, url = start_server(trained.best)
    reap(proc)
    browser = Chromium(shutil.which("chromium"), tmp_path / "profile")
    try:
        browser.open_page(url)
        browser.wait_for("document.readyState === 'complete' && document.querySelectorAll('#model option').length > 0")
        browser.eval(f"document.getElementById('prime').value = {json.dumps(prime)};"
                     "document.getElementById('seed').value = '9';"
                     "const n = document.getElementById('n'); n.value = 300; n.dispatchEvent(new Event('input'));"
                     "const m = document.getElementById('max_copy'); m.value = '3'; m.dispatchEvent(new Event('input'));")
        browser.eval("document.getElementById('go').click()")
        status = browser.wait_for("(s => s.startsWith('done') && s)(document.getElementById('status').textContent)")
        out = browser.eval("document.getElementById('out').textContent")
        copied = browser.eval("[...document.getElementById('out').children].map(s => s.classList.contains('copied')"
                              " ? '1' : '0').join('')")
        legend = browser.eval("document.querySelector('#legend span.copied').textContent")
        command = browser.eval("document.getElementById('command').value")
    finally:
        browser.close()
    assert "copied: longest 3;" in status and "max copy 3:" in status and "(against corpus.txt)" in status
    assert copied == "1" * len(prime) + "0" * (len(out) - len(prime))  # only the prime is copied (20+), all of it
    assert legend == "copied" and "--max-copy 3" in command
    result = invoke(*shlex.split(command)[1:])
    assert result.exit_code == 0, result.output
    assert result.stdout == out + "\n"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
