"""The checkpoint contract (DESIGN.md), safe loading, atomic writes, validation errors."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from charnn import __version__
from charnn.storage.checkpoint import build_payload, load, load_model, read_payload, save, validate
from charnn.model.config import ModelConfig
from charnn.training.config import TrainConfig
from charnn.errors import CharnnError, CheckpointError
from charnn.model.rnn import CharRNN
from charnn.text.tokenizer import CharTokenizer

MODEL_CONFIG_KEYS = {"cell", "vocab_size", "embedding_dim", "hidden_size", "num_layers", "dropout"}
TOP_LEVEL_KEYS = {"format", "format_version", "charnn_version", "created", "model_config", "vocab",
                  "model_state", "train_config", "train_state", "optimizer_state", "scheduler_state",
                  "metrics"}


def _tiny_payload(cell="lstm", **extra):
    tok = CharTokenizer.from_text("hello world")
    model = CharRNN(ModelConfig(cell=cell, vocab_size=tok.vocab_size, embedding_dim=8, hidden_size=12,
                                num_layers=2, dropout=0.0))
    return model, tok, build_payload(model, tok, **extra)


@pytest.fixture
def payload():
    return _tiny_payload()[2]


def _is_plain(obj) -> bool:
    """Plain Python containers, scalars and tensors only."""
    if isinstance(obj, torch.Tensor) or obj is None or isinstance(obj, (bool, int, float, str)):
        return True
    if isinstance(obj, (list, tuple)):
        return all(_is_plain(v) for v in obj)
    if isinstance(obj, dict):
        return all(isinstance(k, (str, int)) and _is_plain(v) for k, v in obj.items())
    return False


def test_trained_checkpoint_satisfies_the_contract(trained):
    for path in (trained.best, trained.last):
        data = torch.load(path, map_location="cpu", weights_only=True)
        # last.pt resumes (optimizer and scheduler state); best.pt is for
        # sampling and evaluation and leaves them out.
        training = path == trained.last
        assert set(data) == (TOP_LEVEL_KEYS if training else TOP_LEVEL_KEYS - {"optimizer_state", "scheduler_state"})
        assert _is_plain(data)
        assert data["format"] == "charnn-checkpoint"
        assert type(data["format_version"]) is int and data["format_version"] == 2
        assert data["charnn_version"] == __version__
        assert isinstance(data["created"], str) and data["created"][:2] == "20"

        mc = data["model_config"]
        assert set(mc) == MODEL_CONFIG_KEYS
        assert mc["cell"] == "lstm"
        assert (mc["hidden_size"], mc["num_layers"], mc["embedding_dim"]) == (32, 1, 16)
        assert all(type(mc[k]) is int for k in ("vocab_size", "embedding_dim", "hidden_size", "num_layers"))
        assert isinstance(mc["dropout"], float)

        assert data["vocab"].dtype == torch.int32 and data["vocab"].dim() == 1
        vocab = [chr(c) for c in data["vocab"].tolist()]  # code points, index = token id
        assert vocab == sorted(set(trained.text))
        assert mc["vocab_size"] == len(vocab)

        state = data["model_state"]
        assert list(state) == ["embedding.weight", "rnn.weight_ih_l0", "rnn.weight_hh_l0",
                               "rnn.bias_ih_l0", "rnn.bias_hh_l0", "head.weight", "head.bias"]
        assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in state.values())
        assert state["embedding.weight"].shape == (len(vocab), 16)
        assert state["rnn.weight_ih_l0"].shape == (4 * 32, 16)
        assert state["head.weight"].shape == (len(vocab), 32)

        tc = data["train_config"]
        assert isinstance(tc, dict)
        assert tc["corpus"] == [str(trained.corpus)]
        import hashlib
        assert tc["corpus_hash"] == hashlib.sha256(trained.text.encode("utf-8")).hexdigest()
        assert tc["val_fraction"] == 0.1 and tc["seq_len"] == 32 and tc["batch_size"] == 8
        assert TrainConfig.from_dict(tc).to_dict() == tc  # round-trips as plain data

        ts = data["train_state"]
        for key in ("step", "epoch", "chars_seen", "best_val", "elapsed"):
            assert key in ts, key
        assert ts["step"] == 20
        assert any(k.startswith("rng") for k in ts)
        if training:
            assert isinstance(data["optimizer_state"], dict) and "state" in data["optimizer_state"]
            assert isinstance(data["scheduler_state"], dict)

        metrics = data["metrics"]
        assert isinstance(metrics, list) and metrics
        assert any("train_loss" in r and "lr" in r and "grad_norm" in r for r in metrics)
        assert any("val_loss" in r for r in metrics)
        assert all("step" in r for r in metrics)


def test_loads_with_weights_only_and_on_cpu(trained):
    ckpt = load(trained.best, map_location="cpu")
    assert ckpt.model_config.vocab_size == ckpt.tokenizer.vocab_size
    assert ckpt.train_state["step"] in (10, 20)
    model = ckpt.build_model()
    assert not model.training


def test_save_load_identical_logits(tmp_path):
    model, tok, payload = _tiny_payload("gru")
    model.eval()
    path = save(payload, tmp_path / "sub" / "m.pt")  # creates the folder
    assert path == tmp_path / "sub" / "m.pt"
    loaded, tok2, ckpt = load_model(path)
    assert tok2 == tok
    ids = torch.tensor([tok.encode("hello world")])
    with torch.no_grad():
        a, _ = model(ids)
        b, _ = loaded(ids)
    assert torch.equal(a, b)
    assert ckpt.model_config == model.config


def test_payload_is_a_copy(payload):
    model, tok, p = _tiny_payload()
    with torch.no_grad():
        model.head.bias.add_(1.0)
    assert not torch.equal(p["model_state"]["head.bias"], model.head.bias)


def test_atomic_write_leaves_no_temp_files(tmp_path, payload):
    target = tmp_path / "best.pt"
    save(payload, target)
    save(payload, target)  # overwrite
    assert sorted(os.listdir(tmp_path)) == ["best.pt"]
    assert oct(target.stat().st_mode & 0o777) == oct(0o644)


@pytest.mark.system
def test_failed_write_keeps_previous_file(tmp_path, payload):
    """A real full disk (a small tmpfs), not a mocked OSError."""
    from fs_faults import fill, tmpfs

    with tmpfs(tmp_path / "mnt", size="1m") as mnt:
        target = mnt / "last.pt"
        save(payload, target)
        before = target.read_bytes()
        fill(mnt)
        with pytest.raises(CheckpointError, match="no space left") as info:
            save({**payload, "padding": torch.zeros(100_000)}, target)
        assert "the disk is full" in str(info.value) and "intact" in str(info.value)
        assert target.read_bytes() == before
        assert sorted(os.listdir(mnt)) == ["filler.bin", "last.pt"]


def test_save_onto_a_directory_is_error(tmp_path, payload):
    (tmp_path / "d.pt").mkdir()
    with pytest.raises(CheckpointError):
        save(payload, tmp_path / "d.pt")


# ---------------------------------------------------------------------------
# Loading errors: every failure is a CheckpointError with a clear message
# ---------------------------------------------------------------------------

def _expect_error(path, match):
    with pytest.raises(CheckpointError, match=match) as info:
        load(path)
    assert isinstance(info.value, CharnnError)
    return str(info.value)


def test_missing_file(tmp_path):
    _expect_error(tmp_path / "nope.pt", "does not exist")


def test_empty_file(tmp_path):
    p = tmp_path / "empty.pt"
    p.write_bytes(b"")
    _expect_error(p, "empty")


def test_folder_suggests_best(tmp_path, payload):
    save(payload, tmp_path / "best.pt")
    msg = _expect_error(tmp_path, "folder")
    assert "best.pt" in msg


@pytest.mark.parametrize("content", [b"hello, this is plain text\n", b"\x89PNG\r\n\x1a\n" + bytes(100)])
def test_not_a_checkpoint(tmp_path, content):
    p = tmp_path / "x.pt"
    p.write_bytes(content)
    _expect_error(p, "not a readable checkpoint")


def test_truncated_file(tmp_path, payload):
    p = tmp_path / "t.pt"
    save(payload, p)
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 2])
    _expect_error(p, "not a readable checkpoint")


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickled_code_is_refused(tmp_path):
    p = tmp_path / "evil.pt"
    torch.save({"format": "charnn-checkpoint", "x": Evil()}, p)
    _expect_error(p, "refusing to load")


@pytest.mark.parametrize("obj", [{"state_dict": {"w": torch.zeros(2)}}, [1, 2, 3], {"format": "other"}])
def test_foreign_file(tmp_path, obj):
    p = tmp_path / "foreign.pt"
    torch.save(obj, p)
    _expect_error(p, "not a charnn checkpoint")


def _mutated(tmp_path, payload, mutate):
    data = copy.deepcopy(payload)
    mutate(data)
    p = tmp_path / "m.pt"
    torch.save(data, p)
    return p


def test_newer_format_version(tmp_path, payload):
    p = _mutated(tmp_path, payload, lambda d: d.__setitem__("format_version", 3))
    msg = _expect_error(p, "newer")
    assert "upgrade charnn" in msg


@pytest.mark.parametrize("version", [0, "1", None])
def test_invalid_format_version(tmp_path, payload, version):
    p = _mutated(tmp_path, payload, lambda d: d.__setitem__("format_version", version))
    _expect_error(p, "format_version")


@pytest.mark.parametrize("key", ["model_config", "vocab", "model_state"])
def test_missing_required_entry(tmp_path, payload, key):
    p = _mutated(tmp_path, payload, lambda d: d.pop(key))
    _expect_error(p, key)


@pytest.mark.parametrize("change, match", [
    (("hidden_size", 16), "rnn.weight_ih_l0"),
    (("cell", "gru"), "shape"),
    (("num_layers", 1), "unexpected"),
    (("num_layers", 3), "missing"),
    (("embedding_dim", 4), "embedding.weight"),
])
def test_config_weights_mismatch(tmp_path, payload, change, match):
    key, value = change
    p = _mutated(tmp_path, payload, lambda d: d["model_config"].__setitem__(key, value))
    _expect_error(p, match)


@pytest.mark.parametrize("mutate", [
    lambda d: d["model_config"].__setitem__("cell", "transformer"),
    lambda d: d["model_config"].__setitem__("dropout", "lots"),
    lambda d: d["model_config"].pop("hidden_size"),
    lambda d: d.__setitem__("model_config", "lstm"),
])
def test_invalid_model_config(tmp_path, payload, mutate):
    _expect_error(_mutated(tmp_path, payload, mutate), "model_config")


def test_vocab_size_mismatch(tmp_path, payload):
    p = _mutated(tmp_path, payload, lambda d: d.__setitem__("vocab", d["vocab"][:-1]))
    msg = _expect_error(p, "vocab")
    assert "vocab_size" in msg


@pytest.mark.parametrize("vocab", [["a", "a", "b", "c", "d", "e", "f", "g"], "helo wrd", None])
def test_invalid_vocab(tmp_path, payload, vocab):
    p = _mutated(tmp_path, payload, lambda d: d.__setitem__("vocab", vocab))
    _expect_error(p, "vocab")


def test_model_state_not_tensors(tmp_path, payload):
    p = _mutated(tmp_path, payload, lambda d: d["model_state"].__setitem__("head.bias", [0.0]))
    _expect_error(p, "model_state")


def test_validate_in_memory(payload):
    ckpt = validate(payload, "mem.pt")
    assert ckpt.model_config.num_layers == 2
    with pytest.raises(CheckpointError):
        validate({"format": "charnn-checkpoint"}, "mem.pt")


def test_checkpoint_pickles_no_charnn_classes(tmp_path, payload):
    # Only torch's tensor-rebuild helpers and builtins are referenced, never a
    # charnn class: any torch can read the file without charnn's code.
    import pickletools
    import zipfile

    p = save(payload, tmp_path / "m.pt")
    with zipfile.ZipFile(p) as z:
        raw = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    globals_ = [arg for op, arg, _ in pickletools.genops(raw) if op.name == "GLOBAL"]
    assert globals_, "expected torch's tensor rebuild helpers"
    assert all(g.split()[0].split(".")[0] in ("torch", "collections", "builtins") for g in globals_), globals_
    assert read_payload(p)["format"] == "charnn-checkpoint"


@pytest.mark.system
def test_unwritable_folder_is_checkpoint_error(tmp_path, payload):
    """A real read-only folder (root ignores chmod, so a read-only tmpfs)."""
    from fs_faults import tmpfs

    with tmpfs(tmp_path / "mnt", size="1m", read_only=True) as mnt:
        with pytest.raises(CheckpointError, match="read-only file system"):
            save(payload, mnt / "best.pt")
        assert os.listdir(mnt) == []


def test_best_is_a_third_of_last_and_resume_points_to_last(trained, tmp_path):
    """best.pt carries no optimizer moments (Adam keeps two per weight)."""
    from charnn.errors import CheckpointError
    from charnn.training.trainer import Trainer

    assert trained.best.stat().st_size < 0.45 * trained.last.stat().st_size
    with pytest.raises(CheckpointError, match=f"resume from {trained.last}"):
        Trainer({"max_steps": 30}, resume=trained.best, handle_sigint=False)
