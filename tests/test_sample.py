"""Generation: the fast cells against torch's own, every sampling control, and
``charnn sample`` end to end (exit codes and messages)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from charnn.storage import checkpoint as ckpt_mod
from charnn.cli import SAMPLE_DIVIDER, app
from charnn.model.config import ModelConfig
from charnn.errors import ConfigError, DataError, VocabError
from charnn.model.fastrnn import PackedRNN
from charnn.model.rnn import CharRNN
from charnn.generation.sample import (Sample, _until, check_prime, filter_logits, generate, generate_samples,
                           read_prime_file, sample_text)
from charnn.text.tokenizer import CharTokenizer

runner = CliRunner()
VOCAB = sorted(set("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,;:!?'()\n0123456789"))


def random_model(cell: str, num_layers: int = 1, hidden: int = 24, seed: int = 0) -> tuple[CharRNN, CharTokenizer]:
    torch.manual_seed(seed)
    tok = CharTokenizer(VOCAB)
    cfg = ModelConfig(cell=cell, vocab_size=tok.vocab_size, embedding_dim=16, hidden_size=hidden,
                      num_layers=num_layers, dropout=0.0)
    return CharRNN(cfg).eval(), tok


def plain_torch_greedy(model: CharRNN, tok: CharTokenizer, prime: str, n: int) -> str:
    """The reference: a bare nn.LSTM/GRU/RNN loaded from the model's weights,
    called one character at a time, argmax each step."""
    cfg = model.config
    cls = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[cfg.cell]
    rnn = cls(cfg.embedding_dim, cfg.hidden_size, num_layers=cfg.num_layers, batch_first=True)
    rnn.load_state_dict(model.rnn.state_dict())
    out = []
    with torch.no_grad():
        h, state = rnn(model.embedding(torch.tensor([tok.encode(prime)])))
        logits = model.head(h[:, -1])
        for _ in range(n):
            nxt = int(logits.argmax())
            out.append(tok.chars[nxt])
            h, state = rnn(model.embedding(torch.tensor([[nxt]])), state)
            logits = model.head(h[:, -1])
    return "".join(out)


@pytest.fixture(scope="module")
def trained2(tmp_path_factory, session_corpus) -> Path:
    """A tiny 2-layer LSTM trained long enough (~2 s) to write word-like text."""
    from conftest import train_tiny

    out = tmp_path_factory.mktemp("sample-run")
    train_tiny(session_corpus, out, model={"num_layers": 2}, max_steps=200, eval_every=200, lr=2e-2,
               warmup_steps=10)
    return out / "best.pt"


@pytest.fixture(scope="module")
def trained_model(trained2):
    model, tok, _ = ckpt_mod.load_model(trained2)
    return model, tok


# ---------------------------------------------------------------------------
# The fast cells
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("num_layers", [1, 2])
def test_packed_step_matches_torch_logits(cell, num_layers):
    model, tok = random_model(cell, num_layers)
    packed = PackedRNN(model)
    ids = tok.encode("Hello there")
    with torch.inference_mode():
        ref_logits, ref_state = model(torch.tensor([ids[:3]]))
        logits, state = packed.forward_prime(ids[:3], 1)
        assert torch.allclose(logits, ref_logits[:, -1], atol=1e-6)
        for i in ids[3:]:
            ref_logits, ref_state = model(torch.tensor([[i]]), ref_state)
            logits = packed.step(torch.tensor([i]), state)
            assert torch.allclose(logits, ref_logits[:, -1], atol=1e-5), (cell, num_layers)


def test_greedy_matches_plain_lstm_for_500_characters(trained_model):
    model, tok = trained_model
    seen = set()
    for prime in ("The quick", "A stitch", "Peter"):
        ours = "".join(generate(model, tok, prime, 500, temperature=0))
        assert ours == plain_torch_greedy(model, tok, prime, 500)
        seen |= set(ours)
    assert len(seen) >= 5  # real, non-degenerate sequences were compared


@pytest.mark.parametrize("cell", ["gru", "rnn", "lstm"])
def test_greedy_matches_plain_torch_cells_2_layers(cell):
    model, tok = random_model(cell, num_layers=2, hidden=32, seed=3)
    ours = "".join(generate(model, tok, "Once upon", 500, temperature=0))
    assert ours == plain_torch_greedy(model, tok, "Once upon", 500)


def test_bf16_weights_run_and_stay_close():
    model, tok = random_model("lstm", 2, hidden=32)
    fp32, bf16 = PackedRNN(model), PackedRNN(model, torch.bfloat16)
    with torch.inference_mode():
        _, s1 = fp32.forward_prime([1, 2, 3], 2)
        _, s2 = bf16.forward_prime([1, 2, 3], 2)
        ids = torch.tensor([4, 5])
        a, b = fp32.step(ids, s1), bf16.step(ids, s2)
    assert b.dtype == torch.float32 and (a - b).abs().max() < 0.05
    text = generate_samples(model, tok, "a", 30, num_samples=2, seed=1, precision="bf16")
    assert all(len(s.text) == 31 for s in text)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_bf16_weights_laid_out_for_onednn_give_the_numbers_of_torchs_own_layout(cell, monkeypatch):
    from charnn.model import fastrnn

    if not fastrnn.prepacking_works(torch.bfloat16):
        pytest.skip("this torch cannot lay bf16 weights out for oneDNN")
    model, _ = random_model(cell, 2, hidden=64)
    packed = PackedRNN(model, torch.bfloat16, batch_size=16)
    monkeypatch.setitem(fastrnn._PREPACKING, torch.bfloat16, False)
    plain = PackedRNN(model, torch.bfloat16, batch_size=16)
    assert packed.prepacked and not plain.prepacked
    with torch.inference_mode():
        _, s1 = packed.forward_prime([1, 2, 3], 16)
        _, s2 = plain.forward_prime([1, 2, 3], 16)
        ids = torch.arange(16) % model.config.vocab_size
        for _ in range(5):
            a, b = packed.step(ids, s1), plain.step(ids, s2)
            assert torch.equal(a, b)
            ids = a.argmax(-1)


# ---------------------------------------------------------------------------
# Sampling controls (library)
# ---------------------------------------------------------------------------

def test_top_k_1_equals_greedy(trained_model):
    model, tok = trained_model
    greedy = sample_text(model, tok, "The ", 120, temperature=0)
    assert sample_text(model, tok, "The ", 120, temperature=1.7, top_k=1, seed=9) == greedy
    # and a non-greedy setting really samples something else
    assert sample_text(model, tok, "The ", 120, temperature=1.5, seed=9) != greedy


def test_same_seed_same_text_other_seed_other_text(trained_model):
    model, tok = trained_model
    a = sample_text(model, tok, "A", 200, temperature=1.0, top_p=0.9, seed=11)
    b = sample_text(model, tok, "A", 200, temperature=1.0, top_p=0.9, seed=11)
    c = sample_text(model, tok, "A", 200, temperature=1.0, top_p=0.9, seed=12)
    assert a == b != c


def test_shorter_length_is_a_prefix_of_longer(trained_model):
    model, tok = trained_model
    long = sample_text(model, tok, "x", 150, temperature=1.0, seed=4)
    assert long.startswith(sample_text(model, tok, "x", 70, temperature=1.0, seed=4))


def test_batch_sample_i_uses_seed_plus_i(trained_model):
    model, tok = trained_model
    batch = generate_samples(model, tok, "The ", 60, num_samples=3, temperature=1.0, seed=20)
    assert [s.seed for s in batch] == [20, 21, 22]
    assert len({s.text for s in batch}) == 3
    # the same sample alone, with its own seed (tiny model: rounding cannot flip a pick)
    assert sample_text(model, tok, "The ", 60, temperature=1.0, seed=21) == batch[1].text


def test_sampling_follows_the_distribution():
    """The inverse-CDF pick chooses each id with probability softmax(logits / T)."""
    model, tok = random_model("lstm", 1)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(torch.linspace(-3, 3, tok.vocab_size))
    n = 400
    samples = generate_samples(model, tok, "a", 1, num_samples=n, temperature=2.0, seed=0)
    counts = torch.bincount(torch.tensor([tok.stoi[s.generated] for s in samples]), minlength=tok.vocab_size)
    probs = torch.softmax(model.head.bias / 2.0, 0)
    expected_top = probs[-10:].sum().item() * n
    assert abs(counts[-10:].sum().item() - expected_top) < 4 * (expected_top ** 0.5) + 5


def test_top_k_and_top_p_restrict_choices():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    assert torch.isfinite(filter_logits(logits, top_k=2)).sum() == 2
    probs = torch.softmax(logits, -1)[0]  # 0.64, 0.24, 0.09, ...
    kept = torch.isfinite(filter_logits(logits, top_p=0.7))[0]
    assert kept.tolist() == [True, True, False, False, False] and probs[0] < 0.7
    assert torch.isfinite(filter_logits(logits, top_p=0.5)).sum() == 1

    model, tok = random_model("lstm", 1)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(torch.linspace(0, 1, tok.vocab_size))  # nearly flat: any char possible
    top3 = set(tok.chars[-3:])
    for s in generate_samples(model, tok, "a", 40, num_samples=4, temperature=1.0, top_k=3, seed=1):
        assert set(s.generated) <= top3
    nucleus = generate_samples(model, tok, "a", 40, num_samples=4, temperature=1.0, top_p=0.05, seed=1)
    assert len(set("".join(s.generated for s in nucleus))) <= 5


def test_stop_ends_before_the_stop_string(trained_model):
    model, tok = trained_model
    full = sample_text(model, tok, "The ", 300, temperature=1.0, seed=5)
    gen = full[4:]
    stop = gen[40:42]  # a string the sample certainly contains
    cut = gen.find(stop)
    streamed = "".join(generate(model, tok, "The ", 300, temperature=1.0, seed=5, stop=stop))
    assert streamed == gen[:cut]
    batch = generate_samples(model, tok, "The ", 300, num_samples=2, temperature=1.0, seed=5, stop=stop)
    assert batch[0].text == "The " + gen[:cut]
    assert stop not in batch[1].generated


def test_stop_holds_back_only_what_may_begin_it():
    assert "".join(_until(iter("abcabd"), "abd")) == "abc"
    assert "".join(_until(iter("aXaab"), "ab")) == "aXa"
    assert "".join(_until(iter("hello"), "xyz")) == "hello"
    assert "".join(_until(iter("aaa"), "aab")) == "aaa"  # the held-back tail comes out at the end

    # the prime is never searched: a stop string inside it does not end anything
    model, tok = random_model("lstm", 1)
    greedy = "".join(generate(model, tok, "The end", 20, temperature=0))
    assert "end" not in greedy
    assert "".join(generate(model, tok, "The end", 20, temperature=0, stop="end")) == greedy


def test_unknown_prime_characters():
    tok = CharTokenizer(VOCAB)
    with pytest.raises(VocabError) as e:
        check_prime(tok, "héllo ☃ é")
    assert "'é' (U+00E9)" in str(e.value) and "'☃' (U+2603)" in str(e.value)
    assert "--unknown skip" in str(e.value)
    assert e.value.characters == ["é", "☃"]
    assert check_prime(tok, "héllo ☃", "skip") == ("hllo ", ["é", "☃"])
    model, _ = random_model("lstm", 1)
    with pytest.raises(VocabError):
        generate(model, tok, "é")  # raised at the call, before any character


@pytest.mark.parametrize("kwargs, needle", [
    ({"temperature": -0.1}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"top_k": -1}, "top-k"), ({"top_p": 0.0}, "top-p"), ({"top_p": 1.5}, "top-p"),
    ({"length": -1}, "length"), ({"num_samples": 0}, "num-samples"), ({"precision": "fp8"}, "precision"),
])
def test_bad_options_raise_config_error(kwargs, needle):
    model, tok = random_model("lstm", 1)
    with pytest.raises(ConfigError, match=needle):
        generate_samples(model, tok, "a", **{"length": 5, **kwargs})


def test_empty_prime_length_zero_and_sample_dict():
    model, tok = random_model("gru", 1)
    assert list(generate(model, tok, "", 0)) == []
    s = generate_samples(model, tok, "", 5, num_samples=2, seed=3)
    assert [len(x.text) for x in s] == [5, 5]
    assert Sample("ab", "a", 1).to_dict() == {"text": "ab", "prime": "a", "seed": 1}
    assert Sample("ab", "a", 1).generated == "b"


def test_training_preview_call_still_works(trained_model):
    model, tok = trained_model
    model.train()
    text = sample_text(model, tok, "", 200, temperature=0.8, seed=3)
    assert len(text) == 200 and model.training  # mode restored
    model.eval()


def test_read_prime_file(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("Once upon\n", encoding="utf-8")
    assert read_prime_file(f) == "Once upon\n"
    with pytest.raises(DataError, match="does not exist"):
        read_prime_file(tmp_path / "none.txt")
    (tmp_path / "bin").write_bytes(b"ab\xffcd")
    with pytest.raises(DataError, match="0xff at offset 2"):
        read_prime_file(tmp_path / "bin")


# ---------------------------------------------------------------------------
# charnn sample, end to end
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ckpt(trained2) -> Path:
    return trained2


def invoke(*args):
    return runner.invoke(app, ["sample", *[str(a) for a in args]])


def ok(result):
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    return result


def test_cli_top_k_1_equals_temperature_0(ckpt, trained_model):
    greedy = ok(invoke(ckpt, "-p", "The ", "-n", 200, "-t", 0))
    topk = ok(invoke(ckpt, "-p", "The ", "-n", 200, "-t", 1.3, "--top-k", 1, "--seed", 3))
    assert greedy.stdout == topk.stdout
    model, tok = trained_model
    assert greedy.stdout == "The " + plain_torch_greedy(model, tok, "The ", 200) + "\n"


def test_cli_num_samples_json(ckpt):
    r = ok(invoke(ckpt, "--num-samples", 4, "--json", "-n", 30, "-p", "A", "--seed", 7))
    data = json.loads(r.stdout)
    assert len(data) == 4
    assert [d["seed"] for d in data] == [7, 8, 9, 10]
    for d in data:
        assert set(d) == {"text", "prime", "seed", "copies"} and d["prime"] == "A"
        assert d["text"].startswith("A") and len(d["text"]) == 31
    assert r.stdout == ok(invoke(ckpt, "--num-samples", 4, "--json", "-n", 30, "-p", "A", "--seed", 7)).stdout


def test_cli_several_samples_plain_with_dividers(ckpt):
    r = ok(invoke(ckpt, "-m", 3, "-n", 20, "-p", "Hi", "--seed", 1))
    parts = r.stdout.split("\n" + SAMPLE_DIVIDER + "\n")
    assert len(parts) == 4 and parts[-1] == ""
    assert all(p.startswith("Hi") and len(p) == 22 for p in parts[:3])


def test_cli_stop(ckpt):
    full = ok(invoke(ckpt, "-p", "The ", "-n", 300, "-t", 1, "--seed", 2)).stdout[:-1]
    gen = full[4:]
    stop = gen[30:33]
    r = ok(invoke(ckpt, "-p", "The ", "-n", 300, "-t", 1, "--seed", 2, "--stop", stop))
    assert r.stdout == "The " + gen[: gen.find(stop)] + "\n"
    j = ok(invoke(ckpt, "-p", "The ", "-n", 300, "-t", 1, "--seed", 2, "--stop", stop, "--json"))
    assert json.loads(j.stdout)[0]["text"] == "The " + gen[: gen.find(stop)]


def test_cli_unknown_prime_character_is_named(ckpt):
    r = invoke(ckpt, "-p", "caf\u00e9 \u2603", "-n", 5)
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.stderr.startswith("Error: ")
    assert "'é' (U+00E9)" in r.stderr and "'☃' (U+2603)" in r.stderr and "--unknown skip" in r.stderr
    assert r.stdout == ""


def test_cli_unknown_skip(ckpt):
    r = ok(invoke(ckpt, "-p", "Th\u00e9e ", "-n", 10, "--unknown", "skip", "--seed", 1))
    assert r.stdout.startswith("The ") and len(r.stdout) == len("The ") + 10 + 1
    assert "Skipping 1 prime character" in r.stderr and "U+00E9" in r.stderr
    assert "U+00E9" not in r.stdout


def test_cli_prime_file(ckpt, tmp_path):
    f = tmp_path / "prime.txt"
    f.write_text("The quick", encoding="utf-8")
    a = ok(invoke(ckpt, "--prime-file", f, "-n", 40, "-t", 0))
    b = ok(invoke(ckpt, "-p", "The quick", "-n", 40, "-t", 0))
    assert a.stdout == b.stdout and a.stdout.startswith("The quick")
    r = invoke(ckpt, "--prime-file", tmp_path / "missing.txt")
    assert r.exit_code == 1 and "missing.txt" in r.stderr and "does not exist" in r.stderr
    r = invoke(ckpt, "--prime-file", f, "-p", "x")
    assert r.exit_code == 2 and "not both" in r.stderr


def test_cli_random_seed_reported_on_stderr_and_repeatable(ckpt):
    r = ok(invoke(ckpt, "-n", 40, "-t", 1))
    assert r.stderr.startswith("seed ") and "--seed" in r.stderr
    seed = r.stderr.split()[1]
    again = ok(invoke(ckpt, "-n", 40, "-t", 1, "--seed", seed))
    assert again.stdout == r.stdout and again.stderr.startswith("copied: ") and "seed" not in again.stderr


@pytest.mark.parametrize("args, needle", [
    (("-t", "-1"), "temperature"), (("-t", "nan"), "temperature"), (("--top-p", "0"), "top-p"),
    (("--top-p", "1.01"), "top-p"), (("-n", "-3"), "length"), (("--top-k", "-1"), "top-k"),
    (("--num-samples", "0"), "num-samples"), (("--stop", ""), "stop"), (("--unknown", "keep"), "unknown"),
])
def test_cli_out_of_range_exits_2(ckpt, args, needle):
    r = invoke(ckpt, *args)
    assert r.exit_code == 2, r.output
    assert needle in r.stderr and "Traceback" not in r.output and r.stdout == ""


def test_cli_batched_greedy_equals_single_greedy(ckpt):
    single = ok(invoke(ckpt, "-p", "The ", "-n", 80, "-t", 0)).stdout[:-1]
    batch = json.loads(ok(invoke(ckpt, "-p", "The ", "-n", 80, "-t", 0, "-m", 16, "--json")).stdout)
    assert [d["text"] for d in batch] == [single] * 16
    bf16 = json.loads(ok(invoke(ckpt, "-n", 40, "-m", 16, "--precision", "bf16", "--json", "--seed", 1)).stdout)
    assert len(bf16) == 16 and all(len(d["text"]) == 40 for d in bf16)
    r = invoke(ckpt, "--precision", "fp16")
    assert r.exit_code == 2 and "precision" in r.stderr


def test_auto_samples_a_big_batch_in_bf16_only_on_a_cpu_with_amx():
    """With AVX512-BF16 alone bf16 weights were slower than fp32 (64 streams
    at 2x512: 13,457 against 19,721 characters/s); with AMX about twice as fast."""
    from charnn.generation.sample import sampling_precision
    from charnn.model.devices import cpu_has_amx

    cpu = torch.device("cpu")
    assert sampling_precision("auto", cpu, 64, greedy=False) == ("bf16" if cpu_has_amx() else "fp32")
    assert sampling_precision("auto", cpu, 64, greedy=True) == "fp32"  # greedy: torch's exact numbers
    assert sampling_precision("auto", cpu, 1, greedy=False) == "fp32"
    assert sampling_precision("bf16", cpu, 1, greedy=False) == "bf16"
