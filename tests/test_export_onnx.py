"""charnn export --format onnx: the model onnxruntime runs computes charnn's
logits (step by step with the state carried, and in chunks), the documented
onnxruntime-only snippet samples with torch made impossible to import, the
command a user types writes the file, and bad input (a damaged checkpoint, a
folder, a full or read-only disk, an unknown format, a file of another kind,
missing packages) is a clear error that leaves no file and no temp file."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

import charnn
from charnn.errors import CharnnError, ConfigError
from charnn.export import export
from charnn.safe_files import TMP_PREFIX
from charnn.storage.checkpoint import load_model

from conftest import assert_clean_error, invoke, make_text, train_tiny
from fs_faults import tmpfs

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs" / "export.md"
TOLERANCE = 1e-4
STEPS = 1000
# Characters outside ASCII and the Basic Multilingual Plane travel through the metadata's JSON.
EXTRA_TEXT = "naïve café, Ελλάδα 🙂 ok\n" * 20
CELLS = {"lstm": 2, "gru": 1, "rnn": 2}  # cell: layers


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("onnx-runs")
    corpus = root / "corpus.txt"
    corpus.write_text(make_text(3000) + EXTRA_TEXT, encoding="utf-8")
    return {cell: train_tiny(corpus, root / cell, model={"cell": cell, "num_layers": layers},
                             max_steps=6, eval_every=6).best
            for cell, layers in CELLS.items()}


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def state_feed(state) -> dict[str, np.ndarray]:
    parts = state if isinstance(state, tuple) else (state,)
    return dict(zip(("h", "c"), (s.numpy() for s in parts)))


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(TMP_PREFIX))


@pytest.mark.parametrize("cell", CELLS)
def test_onnxruntime_computes_charnns_logits_step_by_step_and_in_chunks(checkpoints, tmp_path, cell):
    result = export(checkpoints[cell], "onnx", tmp_path / "m.onnx")
    assert result.path.read_bytes()[:1] == b"\x08" and result.bytes == result.path.stat().st_size
    model, tokenizer, _ = load_model(checkpoints[cell])
    L, H, V = model.config.num_layers, model.config.hidden_size, tokenizer.vocab_size
    s = session(result.path)
    names = ["ids", "h", "c"] if cell == "lstm" else ["ids", "h"]
    assert [i.name for i in s.get_inputs()] == names
    assert s.get_inputs()[0].shape == ["batch", "time"] and s.get_inputs()[1].shape == [L, "batch", H]
    assert [o.name for o in s.get_outputs()] == ["logits"] + [f"{n}_out" for n in names[1:]]
    assert s.get_outputs()[0].shape == ["batch", "time", V]

    batch = 3
    ids = torch.randint(V, (batch, STEPS), generator=torch.Generator().manual_seed(7))
    state = model.init_state(batch)
    feed = state_feed(state)
    worst = 0.0
    with torch.no_grad():
        for t in range(STEPS):  # the one-step model: one id per stream, the state carried
            logits, state = model(ids[:, t : t + 1], state)
            got, *new = s.run(None, {"ids": ids[:, t : t + 1].numpy(), **feed})
            feed = dict(zip(feed, new))
            worst = max(worst, float(np.abs(got - logits.numpy()).max()))
        for key, value in state_feed(state).items():
            assert np.abs(feed[key] - value).max() <= TOLERANCE, key
        assert worst <= TOLERANCE, worst

        state, feed = model.init_state(batch), state_feed(model.init_state(batch))
        for start in range(0, STEPS, 250):  # chunks of 250 ids, the state carried between them
            logits, state = model(ids[:, start : start + 250], state)
            got, *new = s.run(None, {"ids": ids[:, start : start + 250].numpy(), **feed})
            feed = dict(zip(feed, new))
            assert got.shape == (batch, 250, V)
            assert np.abs(got - logits.numpy()).max() <= TOLERANCE


def test_the_metadata_carries_what_a_runtime_needs(checkpoints, tmp_path):
    export(checkpoints["gru"], "onnx", tmp_path / "m.onnx")
    _, tokenizer, _ = load_model(checkpoints["gru"])
    meta = session(tmp_path / "m.onnx").get_modelmeta().custom_metadata_map
    assert json.loads(meta["vocab"]) == tokenizer.to_list()
    assert "🙂" in json.loads(meta["vocab"])
    assert (meta["cell"], meta["num_layers"], meta["hidden_size"]) == ("gru", "1", "32")
    assert float(meta["temperature"]) == 0.8
    assert meta["charnn_version"] == charnn.__version__
    assert meta["checkpoint"] == "gru/best.pt"


def docs_snippet() -> str:
    """The onnxruntime-only Python example of docs/export.md's ONNX section."""
    section = DOCS.read_text(encoding="utf-8").split("\n## ONNX\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the ONNX section has one Python example"
    return blocks[0]


@pytest.mark.system
def test_the_documented_snippet_samples_with_onnxruntime_alone(checkpoints, tmp_path):
    snippet = docs_snippet()
    assert "torch" not in snippet and "charnn" not in snippet
    export(checkpoints["lstm"], "onnx", tmp_path / "mytext.onnx")  # the file name the snippet opens
    # torch cannot be imported at all in the child: the snippet needs only onnxruntime and numpy.
    prelude = "import sys; sys.modules['torch'] = None; sys.modules['charnn'] = None\n"
    done = subprocess.run([sys.executable, "-c", prelude + snippet], cwd=tmp_path, capture_output=True,
                          text=True, encoding="utf-8", timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert done.returncode == 0, done.stderr
    text = done.stdout.removesuffix("\n")
    _, tokenizer, _ = load_model(checkpoints["lstm"])
    n = int(re.search(r"range\((\d+)\)", snippet).group(1))
    assert text.startswith("The ") and len(text) == len("The ") + n
    assert set(text) <= set(tokenizer.to_list())
    refused = subprocess.run([sys.executable, "-c", prelude + "import torch"], capture_output=True, text=True)
    assert refused.returncode != 0 and "ModuleNotFoundError" in refused.stderr  # the prelude does bar torch


@pytest.mark.system
def test_the_command_writes_a_model_onnxruntime_runs(checkpoints, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "charnn", "export", str(checkpoints["rnn"]), "--format", "onnx",
                           "-o", "x.onnx"], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.startswith("wrote x.onnx (") and "onnxruntime" in done.stderr, done.stderr
    assert "Warning" not in done.stderr and done.stdout == ""
    s = session(tmp_path / "x.onnx")
    logits, h = s.run(None, {"ids": np.array([[1], [2]], np.int64), "h": np.zeros((2, 2, 32), np.float32)})
    assert logits.shape == (2, 1, len(json.loads(s.get_modelmeta().custom_metadata_map["vocab"])))
    assert sorted(os.listdir(tmp_path)) == ["x.onnx"]


def test_exporting_again_over_its_own_file_needs_no_overwrite(checkpoints, tmp_path):
    out = tmp_path / "m.onnx"
    assert invoke("export", checkpoints["gru"], "--format", "onnx", "-o", out).exit_code == 0
    first = out.read_bytes()
    out.write_bytes(b"")  # an empty file is not a model: refused
    assert_clean_error(invoke("export", checkpoints["gru"], "-f", "onnx", "-o", out), "is not an ONNX model")
    out.write_bytes(first)
    again = invoke("export", checkpoints["lstm"], "-f", "onnx", "-o", out)
    assert again.exit_code == 0, again.output
    assert out.read_bytes() != first and session(out).get_inputs()[2].name == "c"


def test_a_file_of_another_kind_is_kept_unless_overwrite(checkpoints, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n", encoding="utf-8")
    result = invoke("export", checkpoints["gru"], "-f", "onnx", "-o", notes)
    assert_clean_error(result, "notes.txt", "is not an ONNX model", "--overwrite")
    assert notes.read_text(encoding="utf-8") == "my notes\n"
    result = invoke("export", checkpoints["gru"], "-f", "onnx", "-o", checkpoints["gru"])  # the checkpoint itself
    assert_clean_error(result, "is the checkpoint being exported", "choose another path")
    assert load_model(checkpoints["gru"])
    assert invoke("export", checkpoints["gru"], "-f", "onnx", "-o", notes, "--overwrite").exit_code == 0
    assert session(notes).get_outputs()[0].name == "logits"
    assert leftovers(tmp_path) == []


def test_a_damaged_checkpoint_is_a_clear_error_and_writes_nothing(checkpoints, tmp_path):
    data = checkpoints["lstm"].read_bytes()
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(data[: len(data) // 2] + bytes(64))  # cut off mid-archive, padded with zeros
    result = invoke("export", damaged, "-f", "onnx", "-o", tmp_path / "m.onnx")
    assert_clean_error(result, "damaged.pt")
    assert sorted(os.listdir(tmp_path)) == ["damaged.pt"]


def test_a_folder_without_a_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    result = invoke("export", tmp_path / "empty", "-f", "onnx", "-o", tmp_path / "m.onnx")
    assert_clean_error(result, "is a folder, not a checkpoint file")
    assert sorted(os.listdir(tmp_path)) == ["empty"]


def test_an_unknown_format_is_a_clear_error(checkpoints, tmp_path):
    result = invoke("export", checkpoints["lstm"], "--format", "tflite", "-o", tmp_path / "m.tflite")
    assert_clean_error(result, code=2)
    assert "tflite" in result.stderr and "onnx" in result.stderr
    with pytest.raises(ConfigError, match="unknown export format 'tflite'"):
        export(checkpoints["lstm"], "tflite", tmp_path / "m.tflite")
    assert os.listdir(tmp_path) == []


def test_a_full_disk_leaves_the_previous_file_and_no_temp_file(checkpoints, tmp_path):
    with tmpfs(tmp_path / "disk", size="64k") as disk:
        old = disk / "m.onnx"
        old.write_bytes(b"\x08\x08\x12\x06charnn")  # an earlier export's first bytes: replacing it needs no --overwrite
        result = invoke("export", checkpoints["lstm"], "-f", "onnx", "-o", old)
        assert_clean_error(result, "m.onnx")
        assert "space" in result.stderr or "full" in result.stderr, result.stderr
        assert old.read_bytes() == b"\x08\x08\x12\x06charnn"
        assert sorted(os.listdir(disk)) == ["m.onnx"]


def test_a_read_only_folder_is_a_clear_error(checkpoints, tmp_path):
    with tmpfs(tmp_path / "ro", size="1m", read_only=True) as folder:
        result = invoke("export", checkpoints["rnn"], "-f", "onnx", "-o", folder / "m.onnx")
        assert_clean_error(result, "m.onnx", "read-only")
        assert os.listdir(folder) == []


def test_without_onnx_installed_the_error_says_how_to_install_it(checkpoints, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # what `import onnx` meets where it is not installed
    result = invoke("export", checkpoints["lstm"], "-f", "onnx", "-o", tmp_path / "m.onnx")
    assert_clean_error(result, "pip install 'charnn[export]'")
    assert os.listdir(tmp_path) == []


def test_without_onnxruntime_the_file_is_written_unchecked(checkpoints, tmp_path, monkeypatch):
    checked = export(checkpoints["gru"], "onnx", tmp_path / "checked.onnx")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    result = export(checkpoints["gru"], "onnx", tmp_path / "unchecked.onnx")
    assert result.details.get("not checked") == "onnxruntime is not installed"
    assert "checked in onnxruntime" in checked.details
    assert result.path.read_bytes() == checked.path.read_bytes()


def test_the_library_refuses_before_loading_anything(tmp_path):
    (tmp_path / "page.html").write_text("<!doctype html>", encoding="utf-8")
    with pytest.raises(CharnnError, match="is not an ONNX model"):
        export(tmp_path / "missing.pt", "onnx", tmp_path / "page.html")


def test_a_confident_model_is_not_refused_for_float32_rounding(tmp_path):
    """A trained model's logits reach 100 or more (a 2x128 after 150 s on a
    novel: 101), where float32 rounding alone moves them by about 1e-4: export
    writes the file, and onnxruntime's logits match torch's to float32's
    relative precision."""
    from web_helpers import build_checkpoint

    ckpt = build_checkpoint(tmp_path / "sure.pt", make_text(), layers=2, hidden=128, embedding=16)
    model, tok, _ = load_model(ckpt)
    with torch.no_grad():
        model.head.weight.mul_(40)
        model.head.bias.mul_(40)
    from charnn.storage.checkpoint import build_payload, save

    save(build_payload(model, tok), ckpt)
    out = tmp_path / "sure.onnx"
    result = invoke("export", ckpt, "--format", "onnx", "-o", out)
    assert result.exit_code == 0, result.output
    ids = torch.randint(tok.vocab_size, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids)[0].numpy()
    shape = (2, 1, 128)
    got = session(out).run(["logits"], {"ids": ids.numpy(), "h": np.zeros(shape, np.float32),
                                        "c": np.zeros(shape, np.float32)})[0]
    scale = float(np.abs(want).max())
    assert scale > 100, scale
    assert float(np.abs(got - want).max()) <= 1e-5 * scale
