"""charnn export --format web: what it writes (weights, size, the page's
header) and how it refuses bad input -- each a clear error, no file, no half
file. The page itself runs in a browser in test_export_web.py."""

from __future__ import annotations

import html
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_clean_error, invoke, make_text
from fs_faults import tmpfs
from web_helpers import build_checkpoint

from charnn.errors import format_bytes
from charnn.export.web import AUTO_TOLERANCE, round_tensor


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("small") / "small.pt", make_text(), hidden=24, embedding=8)


def leftovers(folder: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


def test_export_writes_a_page_and_reports_size_weights_and_loss(tmp_path: Path, small: Path):
    out = tmp_path / "page.html"
    result = invoke("export", small, "-o", out, "--note", "CC-BY <b>me</b> & co")
    assert result.exit_code == 0, result.output
    size = out.stat().st_size
    # Its fp32 page is far under 4 MB: auto keeps the checkpoint's own weights, nothing to measure.
    assert result.stderr == (f"wrote {out} ({format_bytes(out.stat().st_size)}, weights fp32, loss unchanged (the "
                             "checkpoint's own weights; auto keeps fp32 for a page of at most 4.0 MB))\n")
    page = out.read_text(encoding="utf-8")
    assert len(page.encode()) == size
    # The note is text, never markup; no address outside the file anywhere.
    assert "CC-BY &lt;b&gt;me&lt;/b&gt; &amp; co" in page and "<b>me</b>" not in page
    assert not re.search(r"https?://|\bfetch\(|\bimport\(|<link\b|\bsrc=", page), "the page may reach the network"
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    # A shared page names the checkpoint without the author's folders.
    assert str(small.parent) not in page and '"file": "' + small.parent.name + "/small.pt" + '"' in page.replace('":"', '": "')


def test_weights_storages_round_as_the_page_decodes(tmp_path: Path):
    w = torch.randn(7, 33) * torch.logspace(-3, 1, 7)[:, None]
    for storage, worst in (("fp32", 0.0), ("int16", 1 / 65534 + 1e-7), ("int8", 1 / 254 + 1e-6)):
        data, spec, decoded = round_tensor(w, storage)
        err = ((decoded - w).abs() / w.abs().amax(1, keepdim=True)).max().item()
        assert err <= worst, (storage, err)
    # int16: q = round(w / s) with s = max|row| / 32767, then the fp32 scales, 4-byte aligned.
    data, spec, decoded = round_tensor(w, "int16")
    assert spec == {"dtype": "i16", "scales": 7 * 33 * 2 + 2} and len(data) == 7 * 33 * 2 + 2 + 7 * 4
    q = torch.from_numpy(np.frombuffer(data[: 7 * 33 * 2], "<i2").astype(np.float32)).reshape(7, 33)
    scales = torch.from_numpy(np.frombuffer(data[spec["scales"]:], "<f4").copy())
    assert torch.equal(scales, w.abs().amax(1) / 32767)
    assert torch.equal(q, torch.round(w / scales[:, None])) and torch.equal(q.abs().amax(1), torch.full((7,), 32767.0))
    assert torch.equal(decoded, q * scales[:, None])
    data, spec, decoded = round_tensor(w, "int8")
    assert spec == {"dtype": "i8", "scales": 7 * 33 + 1} and len(data) == 7 * 33 + 1 + 7 * 4
    b = torch.randn(9)
    assert round_tensor(b, "int8")[1] == round_tensor(b, "int16")[1] == {"dtype": "f32"}  # biases stay fp32


@pytest.mark.parametrize("weights", ["fp32", "int16", "int8"])
def test_forced_storage_reports_its_measured_loss(tmp_path: Path, small: Path, weights: str):
    out = tmp_path / "page.html"
    result = invoke("export", small, "-o", out, "--weights", weights)
    assert result.exit_code == 0, result.output
    assert f"weights {weights}," in result.stderr
    if weights == "fp32":
        assert result.stderr.endswith("loss unchanged (the checkpoint's own weights))\n"), result.stderr
    else:
        change = float(re.search(r"loss ([+-]\d+\.\d\d)% vs fp32", result.stderr).group(1))
        if weights == "int8":
            assert change != 0  # int8 moves a model with 24 hidden units measurably


def wide_checkpoint(path: Path, outlier: float = 0.0) -> Path:
    """An LSTM 1x512 (an fp32 page of about 5.9 MB); with ``outlier``, one
    embedding dimension set to ``outlier`` and layer 0's input weights for it
    zeroed: the same function in fp32, but each embedding row's int16 scale
    so large that the row's other numbers round to 0 (the model goes blind)."""
    from charnn.storage.checkpoint import load, save

    build_checkpoint(path, make_text(), hidden=512, embedding=16, scale=3.0 if outlier else 1.0)
    if outlier:
        data = load(path).data
        data["model_state"]["embedding.weight"][:, 0] = outlier
        data["model_state"]["rnn.weight_ih_l0"][:, 0] = 0
        save(data, path)
    return path


def test_auto_picks_int16_above_4_mb_and_fp32_when_int16_costs_too_much(tmp_path: Path):
    out = tmp_path / "page.html"
    result = invoke("export", wide_checkpoint(tmp_path / "wide.pt"), "-o", out)
    assert result.exit_code == 0, result.output
    m = re.search(r"weights int16, loss ([+-]\d+\.\d\d)% vs fp32 on .*; an fp32 page would be 5\.\d MB, over 4\.0 MB",
                  result.stderr)
    assert m and abs(float(m.group(1))) <= AUTO_TOLERANCE * 100, result.stderr
    assert out.stat().st_size < 3_100_000
    result = invoke("export", wide_checkpoint(tmp_path / "outlier.pt", 1e6), "-o", out)
    assert result.exit_code == 0, result.output
    m = re.search(r"weights fp32, loss unchanged \(the checkpoint's own weights; int16 would change it by "
                  r"([+-]\d+\.\d\d)% vs fp32 on .*, more than the 0\.5% auto allows\)", result.stderr)
    assert m and abs(float(m.group(1))) > AUTO_TOLERANCE * 100, result.stderr
    assert out.stat().st_size > 4_000_000
    assert leftovers(tmp_path, {"wide.pt", "outlier.pt", "page.html"}) == []


def test_a_trained_checkpoint_is_measured_on_its_validation_split(tmp_path: Path, trained):
    result = invoke("export", trained.best, "-o", tmp_path / "page.html", "--weights", "int16")
    assert result.exit_code == 0, result.output
    assert "characters of the validation split)" in result.stderr, result.stderr
    assert "the model wrote" not in result.stderr


def test_default_size_model_page_is_at_most_4_mb(tmp_path: Path):
    # 2x320 LSTM, embedding 128 (charnn's default shape) with a 96-character vocabulary.
    chars = "".join(chr(c) for c in range(32, 127)) + "\n"
    ckpt = build_checkpoint(tmp_path / "default.pt", chars, layers=2, hidden=320, embedding=128, scale=1.0)
    out = tmp_path / "default.html"
    result = invoke("export", ckpt, "-o", out)
    assert result.exit_code == 0, result.output
    assert "weights int16" in result.stderr and "an fp32 page would be 7.7 MB" in result.stderr, result.stderr
    assert out.stat().st_size <= 4_000_000, out.stat().st_size


# -- bad input: a clear error, nothing written ----------------------------------------

def test_damaged_checkpoint(tmp_path: Path, small: Path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(small.read_bytes()[:3000])
    out = tmp_path / "page.html"
    assert_clean_error(invoke("export", bad, "-o", out), "bad.pt")
    assert leftovers(tmp_path, {"bad.pt"}) == []


def test_folder_without_a_checkpoint(tmp_path: Path):
    folder = tmp_path / "empty"
    folder.mkdir()
    assert_clean_error(invoke("export", folder, "-o", tmp_path / "page.html"), "empty")
    assert leftovers(tmp_path, {"empty"}) == []


def test_output_is_a_folder(tmp_path: Path, small: Path):
    assert_clean_error(invoke("export", small, "-o", tmp_path), "it is a folder")


def test_unknown_format_is_a_usage_error(tmp_path: Path, small: Path):
    result = invoke("export", small, "--format", "pdf", "-o", tmp_path / "x.pdf")
    assert_clean_error(result, code=2)
    assert "pdf" in result.stderr and "web" in result.stderr
    assert leftovers(tmp_path, set()) == []


def test_refuses_to_replace_a_file_that_is_not_html(tmp_path: Path, small: Path):
    notes = tmp_path / "notes.html"
    notes.write_text("my notes, not a page\n")
    assert_clean_error(invoke("export", small, "-o", notes), "--overwrite")
    assert notes.read_text() == "my notes, not a page\n"
    assert invoke("export", small, "-o", notes, "--overwrite").exit_code == 0
    assert notes.read_text().startswith("<!doctype html>")
    # An earlier page is replaced without --overwrite.
    assert invoke("export", small, "-o", notes, "--note", "second").exit_code == 0
    assert "second" in notes.read_text()


def test_refuses_to_write_over_the_checkpoint(tmp_path: Path, small: Path):
    copy = tmp_path / "m.pt"
    copy.write_bytes(small.read_bytes())
    assert_clean_error(invoke("export", copy, "-o", copy), "the checkpoint being exported")
    # --overwrite lets an export replace other files, never the weights it reads (nor a run's, named by its folder).
    assert_clean_error(invoke("export", copy, "-o", copy, "--overwrite"), "never replaces its checkpoint")
    assert_clean_error(invoke("export", copy, "--format", "onnx", "-o", copy, "--overwrite"), "never replaces")
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.pt").write_bytes(small.read_bytes())
    assert_clean_error(invoke("export", run, "-o", run / "best.pt", "--overwrite"), "never replaces its checkpoint")
    assert copy.read_bytes() == small.read_bytes() == (run / "best.pt").read_bytes()


def test_full_disk_leaves_no_half_file(tmp_path: Path, small: Path):
    with tmpfs(tmp_path / "disk", size="16k") as disk:
        out = disk / "page.html"
        result = invoke("export", small, "-o", out)
        assert_clean_error(result, "page.html")
        assert list(disk.iterdir()) == []


def test_read_only_folder_leaves_nothing(tmp_path: Path, small: Path):
    with tmpfs(tmp_path / "ro", size="1m", read_only=True) as ro:
        result = invoke("export", small, "-o", ro / "page.html")
        assert_clean_error(result, "page.html")
        assert list(ro.iterdir()) == []


def test_header_shows_training_figures_and_escaped_vocabulary(tmp_path: Path, trained):
    out = tmp_path / "page.html"
    assert invoke("export", trained.best, "-o", out).exit_code == 0
    page = out.read_text(encoding="utf-8")
    ts = torch.load(trained.best, weights_only=True)["train_state"]
    assert f"{ts['step']:,} training steps" in page and f"{ts['chars_seen']:,} characters seen" in page
    assert f"best validation loss {ts['best_val']:.4f}" in page
    assert "LSTM 1x32" in page
    assert html.escape("\\n") in page  # the newline shown as \n in the vocabulary
