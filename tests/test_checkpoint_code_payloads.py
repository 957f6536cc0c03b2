"""Safe loading: a checkpoint whose pickle would run code is refused with a
CheckpointError, through the library and through every command that reads a
checkpoint, and the payload never runs (it would create a marker file)."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import charnn.storage.checkpoint as ckpt_mod
from charnn.cli import app
from charnn.errors import CheckpointError
from robust_helpers import REPO, TINY_TRAIN, train_tiny, write_corpus


class SystemPayload:
    """Unpickling this calls os.system(...), which creates the marker."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


class ExecPayload:
    """Unpickling this calls builtins.exec(...), which creates the marker."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("safety")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CHARNN_DATA_DIR", str(root / "data"))
        corpus = write_corpus(root / "corpus.txt", n_words=500)
        train_tiny(corpus, root / "run", max_steps=2, eval_every=2)
    return root / "run" / "last.pt"


def _payload_files(good: Path, folder: Path, marker: Path) -> dict[str, Path]:
    """Malicious files in every shape: a torch zip, a charnn-looking checkpoint with
    the payload deep inside, the legacy torch format, and a raw pickle."""
    data = torch.load(good, weights_only=True)
    files = {}

    def save(name: str, obj, **kw) -> None:
        files[name] = folder / name
        torch.save(obj, files[name], **kw)

    save("plain-system.pt", SystemPayload(marker))
    save("plain-exec.pt", ExecPayload(marker))
    save("dict-system.pt", {"format": "charnn-checkpoint", "format_version": 1, "x": SystemPayload(marker)})
    # A real checkpoint with the payload hidden in its training state.
    save("charnn-hidden.pt", {**data, "train_state": {**data["train_state"], "note": SystemPayload(marker)}})
    save("charnn-in-weights.pt", {**data, "model_state": {**data["model_state"], "x": ExecPayload(marker)}})
    save("legacy-format.pt", {**data, "x": SystemPayload(marker)}, _use_new_zipfile_serialization=False)
    for proto in (2, 4):
        files[f"raw-pickle-{proto}.pt"] = folder / f"raw-pickle-{proto}.pt"
        with open(files[f"raw-pickle-{proto}.pt"], "wb") as f:
            pickle.dump({"format": "charnn-checkpoint", "x": SystemPayload(marker)}, f, protocol=proto)
    return files


@pytest.fixture
def payloads(good, tmp_path, monkeypatch):
    monkeypatch.setenv("CHARNN_DATA_DIR", str(tmp_path / "data"))
    # Even the environment switch that turns torch's safe loading off must not matter.
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "PWNED"
    files = _payload_files(good, tmp_path, marker)
    # Sanity: the payload is real -- an unsafe load would run it.
    pickle.loads(pickle.dumps(SystemPayload(tmp_path / "proof")))
    assert (tmp_path / "proof").exists(), "the test payload does not work"
    return files, marker


def _names():
    return ["plain-system.pt", "plain-exec.pt", "dict-system.pt", "charnn-hidden.pt",
            "charnn-in-weights.pt", "legacy-format.pt", "raw-pickle-2.pt", "raw-pickle-4.pt"]


REFUSED = re.compile(r"refusing to load|not a readable checkpoint|not a charnn checkpoint")


@pytest.mark.parametrize("name", _names())
def test_library_refuses_code_payload(payloads, name):
    files, marker = payloads
    for loader in (ckpt_mod.load, ckpt_mod.load_model, ckpt_mod.read_payload):
        with pytest.raises(CheckpointError) as info:
            loader(files[name])
        assert REFUSED.search(str(info.value)), str(info.value)
        assert not marker.exists(), f"{loader.__name__} ran the payload in {name}"


@pytest.mark.parametrize("name", ["plain-system.pt", "charnn-hidden.pt", "legacy-format.pt"])
def test_refusal_says_it_could_run_code(payloads, name):
    files, marker = payloads
    with pytest.raises(CheckpointError, match="could run code"):
        ckpt_mod.load(files[name])
    assert not marker.exists()


@pytest.mark.parametrize("name", ["plain-system.pt", "charnn-hidden.pt", "legacy-format.pt", "raw-pickle-2.pt"])
def test_cli_refuses_code_payload(payloads, name, tmp_path):
    files, marker = payloads
    corpus = write_corpus(tmp_path / "corpus.txt", n_words=400)
    p = str(files[name])
    runner = CliRunner()
    for args in (["info", p], ["info", p, "--json"], ["sample", p, "-n", "5"], ["eval", p, str(corpus)],
                 ["eval", p],
                 ["train", str(corpus), "--resume", p, "--out", str(tmp_path / "r"), "--max-steps", "1"],
                 ["train", str(corpus), "--init-from", p, "--out", str(tmp_path / "i"), *TINY_TRAIN,
                  "--max-steps", "1"]):
        result = runner.invoke(app, args)
        assert "Traceback" not in result.output
        assert result.exit_code == 1, (args, result.output)
        assert "Error: " in result.stderr and REFUSED.search(result.stderr), result.stderr
        assert not marker.exists(), f"{args[0]} ran the payload in {name}"
    assert not (tmp_path / "r").exists() and not (tmp_path / "i").exists()


def test_every_torch_load_in_charnn_is_weights_only():
    """Static guard: no code path loads a pickle without weights_only=True."""
    offenders = []
    for path in sorted((REPO / "charnn").glob("*.py")):
        text = path.read_text(encoding="utf-8")
        for m in re.finditer(r"torch\.load\(", text):
            depth, i = 1, m.end()
            while depth and i < len(text):
                depth += {"(": 1, ")": -1}.get(text[i], 0)
                i += 1
            call = text[m.start():i]
            if "weights_only=True" not in call:
                offenders.append(f"{path.name}: {call}")
        for bad in ("pickle.load(", "pickle.loads(", "np.load(", "numpy.load("):
            for m in re.finditer(re.escape(bad), text):
                line = text[text.rfind("\n", 0, m.start()) + 1: text.find("\n", m.end())]
                if bad.startswith("np") and "allow_pickle=True" not in line:
                    continue  # numpy refuses pickles by default
                offenders.append(f"{path.name}: {line.strip()}")
    assert not offenders, offenders


def test_good_checkpoint_still_loads(good):
    ck = ckpt_mod.load(good)
    assert ck.model_config.hidden_size == 16
