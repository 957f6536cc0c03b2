"""The files inspect, eval and info write, under faults: each test creates
the fault for real (a page that is the training corpus, a
page inside a folder being scored, an escape sequence in a file name, SIGTERM
while a page is written, a full disk, a crafted vocabulary) and runs the
command a user types."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from charnn.errors import CheckpointError
import charnn.storage.checkpoint as ckpt_mod

from conftest import make_text, train_tiny

REPO = Path(__file__).resolve().parent.parent
PAGE = "<!doctype html><html><body><pre>\n{}</pre></body></html>\n"


def charnn(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "charnn", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=120)


@pytest.fixture(scope="module")
def html_run(tmp_path_factory):
    """A model trained on an HTML page: with no FILE, eval and inspect read that page."""
    root = tmp_path_factory.mktemp("htmlcorpus")
    corpus = root / "corpus.html"
    corpus.write_text(PAGE.format(make_text(3000)), encoding="utf-8")
    return train_tiny(corpus, root / "run", max_steps=4, eval_every=2)


@pytest.mark.system
@pytest.mark.parametrize("command", ["eval", "inspect"])
def test_html_never_replaces_the_training_corpus_it_scores(html_run, command):
    before = html_run.corpus.read_bytes()
    done = charnn(command, html_run.best, "--html", html_run.corpus)
    assert done.returncode == 1, done.stderr
    assert "which this command reads" in done.stderr and "--overwrite" in done.stderr
    assert "Traceback" not in done.stderr
    assert html_run.corpus.read_bytes() == before


@pytest.mark.system
def test_html_never_replaces_a_file_of_a_folder_it_scores(trained, tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "a.txt").write_text(trained.text, encoding="utf-8")
    page = folder / "b.html"
    page.write_text(PAGE.format(trained.text[:2000]), encoding="utf-8")
    before = page.read_bytes()
    for command in ("eval", "inspect"):
        done = charnn(command, trained.best, folder, "--unknown", "skip", "--html", page)
        assert done.returncode == 1, done.stderr
        assert "a folder this command reads" in done.stderr
        assert page.read_bytes() == before
    outside = tmp_path / "out.html"
    assert charnn("eval", trained.best, folder, "--unknown", "skip", "--html", outside).returncode == 0
    assert outside.read_bytes().lower().startswith(b"<!doctype html")


@pytest.mark.system
def test_written_file_names_reach_the_terminal_escaped(trained, tmp_path):
    name = "\x1b[2J\x1b[31mred.html"
    done = charnn("eval", trained.best, trained.corpus, "--html", name, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / name).exists()
    assert "\x1b" not in done.stderr and "\\x1b[31mred.html" in done.stderr


@pytest.mark.system
def test_sigterm_while_a_page_is_written_leaves_the_old_page_and_no_temp_file(tmp_path):
    """The process gets a real SIGTERM halfway through writing the new page's bytes."""
    page = tmp_path / "page.html"
    page.write_text("<!doctype html><p>the old page</p>", encoding="utf-8")
    script = textwrap.dedent(f"""
        import io, os, signal, sys
        sys.path.insert(0, {str(REPO)!r})
        import charnn.safe_files as sf
        from charnn.storage.outputs import write_output
        real = sf.replace_atomically
        def half_then_term(path, write):
            def halves(f):
                whole = io.BytesIO()
                write(whole)
                data = whole.getvalue()
                f.write(data[: len(data) // 2])
                f.flush()
                os.kill(os.getpid(), signal.SIGTERM)
                f.write(data[len(data) // 2:])
            real(path, halves)
        sf.replace_atomically = half_then_term
        write_output({str(page)!r}, "<!doctype html>" + "x" * 1_000_000)
        print("not stopped")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 128 + signal.SIGTERM, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr
    assert page.read_text(encoding="utf-8") == "<!doctype html><p>the old page</p>"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["page.html"]


@pytest.mark.system
def test_full_disk_message_names_no_checkpoint_option(trained, tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(mnt)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        page = mnt / "p.html"
        page.write_text("<!doctype html>old", encoding="utf-8")
        done = charnn("eval", trained.best, trained.corpus, "--html", page)
        assert done.returncode == 1, done.stderr
        assert "disk is full" in done.stderr and "previous file there is intact" in done.stderr
        assert "--out" not in done.stderr
        assert page.read_text(encoding="utf-8") == "<!doctype html>old"
    finally:
        subprocess.run(["umount", str(mnt)])


def test_a_vocabulary_of_the_wrong_integer_type_names_the_right_one(trained, tmp_path):
    payload = torch.load(trained.best, weights_only=True)
    path = tmp_path / "v.pt"
    torch.save({**payload, "vocab": payload["vocab"].to(torch.int64)}, path)
    with pytest.raises(CheckpointError) as e:
        ckpt_mod.load(path)
    assert "torch.int64" in str(e.value) and "int32" in str(e.value).split("expects")[1]


@pytest.mark.system
def test_control_characters_in_names_and_text_never_reach_the_terminal_raw(trained, tmp_path):
    """A file named with an escape sequence, holding ESC and a bidi override,
    scored by a model whose vocabulary has both: eval's table, --show and
    inspect's progress line show them as escapes."""
    payload = torch.load(trained.best, weights_only=True)
    vocab = payload["vocab"].clone()
    vocab[-1], vocab[-2] = 0x1B, 0x202E
    model = tmp_path / "m.pt"
    torch.save({**payload, "vocab": vocab}, model)
    name = tmp_path / "a\x1b[31mb.txt"
    name.write_text("the cat \x1b sat \u202e on it\n", encoding="utf-8")
    for args in (("eval", model, name, "--unknown", "skip", "--show"),
                 ("eval", model, name, trained.corpus, "--unknown", "skip"),
                 ("inspect", model, name, "--unknown", "skip")):
        done = charnn(*args)
        assert done.returncode == 0, done.stderr
        both = done.stdout + done.stderr
        assert "\x1b" not in both and "\u202e" not in both, args
        assert "\\u001b[31mb.txt" in both or "\\x1b[31mb.txt" in both
