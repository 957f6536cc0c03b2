"""CharRNN: shapes, the forward contract, parameter names, plain-torch equivalence, learning."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from charnn.model.config import ModelConfig
from charnn.errors import ConfigError
from charnn.model.rnn import CharRNN, build_rnn, detach_state, select_streams

CELLS = ["lstm", "gru", "rnn"]


def tiny(cell="lstm", vocab_size=11, num_layers=1, dropout=0.0, hidden_size=16, embedding_dim=8):
    return CharRNN(ModelConfig(cell=cell, vocab_size=vocab_size, embedding_dim=embedding_dim,
                               hidden_size=hidden_size, num_layers=num_layers, dropout=dropout))


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("num_layers", [1, 2])
def test_shapes(cell, num_layers):
    model = tiny(cell, num_layers=num_layers)
    ids = torch.randint(0, 11, (3, 7))
    logits, state = model(ids)
    assert logits.shape == (3, 7, 11)
    expected = (num_layers, 3, 16)
    if cell == "lstm":
        assert isinstance(state, tuple) and len(state) == 2
        assert state[0].shape == expected and state[1].shape == expected
    else:
        assert isinstance(state, torch.Tensor) and state.shape == expected
    # forward(ids, state) accepts the state it returned
    logits2, _ = model(ids[:, :1], state)
    assert logits2.shape == (3, 1, 11)


@pytest.mark.parametrize("cell", CELLS)
def test_init_state_is_zero_state(cell):
    model = tiny(cell, num_layers=2).eval()
    ids = torch.randint(0, 11, (2, 5))
    zero = model.init_state(2)
    a, _ = model(ids)
    b, _ = model(ids, zero)
    assert torch.equal(a, b)
    first = zero[0] if isinstance(zero, tuple) else zero
    assert first.shape == (2, 2, 16) and not first.any()


@pytest.mark.parametrize("cell", CELLS)
def test_chunked_forward_with_carried_state_equals_one_pass(cell):
    model = tiny(cell, num_layers=2, dropout=0.3).eval()  # eval: dropout off
    ids = torch.randint(0, 11, (2, 30))
    whole, _ = model(ids)
    state, pieces = None, []
    for lo in range(0, 30, 7):
        logits, state = model(ids[:, lo : lo + 7], state)
        state = detach_state(state)
        pieces.append(logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, rtol=1e-5, atol=1e-6)
    # one character at a time (the generation path) gives the same, too
    state, steps = None, []
    for t in range(30):
        logits, state = model(ids[:, t : t + 1], state)
        steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), whole, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cell", CELLS)
def test_parameter_names_are_the_contract(cell):
    model = tiny(cell, num_layers=2)
    names = list(model.state_dict())
    suffixes = ["weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0",
                "weight_ih_l1", "weight_hh_l1", "bias_ih_l1", "bias_hh_l1"]
    assert names == ["embedding.weight"] + [f"rnn.{s}" for s in suffixes] + ["head.weight", "head.bias"]
    # ... and exactly the names of a plain torch recurrent module
    plain = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[cell](8, 16, num_layers=2)
    assert [n[len("rnn."):] for n in names if n.startswith("rnn.")] == list(plain.state_dict())


def _plain_modules(model: CharRNN):
    """An independent nn.Embedding + nn.<cell> + nn.Linear holding the model's weights."""
    cfg = model.config
    sd = model.state_dict()
    emb = nn.Embedding(cfg.vocab_size, cfg.embedding_dim)
    emb.load_state_dict({"weight": sd["embedding.weight"]})
    rnn = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[cfg.cell](
        cfg.embedding_dim, cfg.hidden_size, num_layers=cfg.num_layers, batch_first=True)
    rnn.load_state_dict({k[len("rnn."):]: v for k, v in sd.items() if k.startswith("rnn.")})
    head = nn.Linear(cfg.hidden_size, cfg.vocab_size)
    head.load_state_dict({"weight": sd["head.weight"], "bias": sd["head.bias"]})
    return emb, rnn, head


@pytest.mark.parametrize("cell", CELLS)
def test_weights_load_into_plain_torch_modules(cell):
    model = tiny(cell, num_layers=2, dropout=0.2).eval()
    emb, rnn, head = _plain_modules(model)
    rnn.eval()
    ids = torch.randint(0, 11, (4, 13))
    with torch.no_grad():
        expected = head(rnn(emb(ids))[0])
        got, _ = model(ids)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_build_rnn_is_the_plain_module():
    cfg = ModelConfig(cell="gru", vocab_size=5, embedding_dim=4, hidden_size=6, num_layers=2, dropout=0.5)
    rnn = build_rnn(cfg)
    assert type(rnn) is nn.GRU and rnn.batch_first and rnn.dropout == 0.5
    single = build_rnn(ModelConfig(vocab_size=5, num_layers=1, dropout=0.5))
    assert single.dropout == 0.0  # torch warns on dropout with one layer
    assert build_rnn(ModelConfig(cell="rnn", vocab_size=5)).nonlinearity == "tanh"


def test_lstm_forget_gate_bias_starts_at_one():
    model = tiny("lstm", hidden_size=4)
    b = model.rnn.bias_ih_l0 + model.rnn.bias_hh_l0
    torch.testing.assert_close(b[4:8], torch.ones(4))


@pytest.mark.parametrize("cell", CELLS)
def test_initial_loss_is_about_ln_vocab(cell):
    torch.manual_seed(0)
    vocab = 60
    model = tiny(cell, vocab_size=vocab, hidden_size=32, embedding_dim=16).eval()
    ids = torch.randint(0, vocab, (8, 65))
    with torch.no_grad():
        logits, _ = model(ids[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).item()
    assert abs(loss - math.log(vocab)) < 0.1, (loss, math.log(vocab))


def test_dropout_active_in_train_mode_only():
    model = tiny(dropout=0.5)
    ids = torch.randint(0, 11, (2, 9))
    model.train()
    a, _ = model(ids)
    b, _ = model(ids)
    assert not torch.equal(a, b)
    model.eval()
    c, _ = model(ids)
    d, _ = model(ids)
    assert torch.equal(c, d)


def test_backward_through_carried_state_is_cut_by_detach():
    model = tiny()
    ids = torch.randint(0, 11, (2, 6))
    _, state = model(ids)
    detached = detach_state(state)
    assert all(not s.requires_grad for s in detached)
    assert detach_state(None) is None
    logits, _ = model(ids, detached)
    logits.sum().backward()  # no "backward through the graph a second time" error


def test_select_streams():
    model = tiny("lstm")
    state = model.init_state(4)
    h, c = select_streams(state, slice(1, 3))
    assert h.shape == (1, 2, 16) and c.shape == (1, 2, 16)
    g = select_streams(tiny("gru").init_state(4), torch.tensor([0, 3]))
    assert g.shape == (1, 2, 16)


@pytest.mark.parametrize("bad", [dict(cell="transformer"), dict(vocab_size=0), dict(hidden_size=-1),
                                 dict(num_layers=0), dict(dropout=1.0), dict(dropout=-0.1),
                                 dict(dropout="0.1"), dict(hidden_size=2.5)])
def test_bad_config_is_config_error(bad):
    with pytest.raises(ConfigError):
        CharRNN(ModelConfig(**{"vocab_size": 5, **bad}))


def test_learns_repeated_string_and_greedy_sampling_reproduces_it(learned_repeat):
    from charnn.storage.checkpoint import load_model
    from charnn.text.data import read_corpus, split_ids
    from charnn.analysis.evaluate import evaluate_ids
    from charnn.generation.sample import sample_text

    result = learned_repeat.result
    assert result.step == 150
    assert result.best_val_loss < 0.05, result.best_val_loss
    logs = [e["train_loss"] for e in learned_repeat.events if e["kind"] == "log"]
    assert logs[-1] < 0.05 and logs[0] > 1.0

    model, tok, _ = load_model(learned_repeat.best)
    ids = tok.encode_array(read_corpus([learned_repeat.corpus]).text)
    _, val = split_ids(ids, 0.1)
    assert evaluate_ids(model, val).loss < 0.05

    out = sample_text(model, tok, "hello", 60, temperature=0)
    assert out == ("hello world! " * 6)[:65]
    # top_k=1 is greedy too
    assert sample_text(model, tok, "hello", 60, temperature=1.0, top_k=1, seed=3) == out
