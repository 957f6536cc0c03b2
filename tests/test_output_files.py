"""Outputs never overwrite inputs (issue 25, breaks 2 and 7).

`inspect --html/--plot`, `eval --html` and `info --plot` refuse to write over
the checkpoint or a text they read (any spelling: a symlink, ./, another
name of the same inode) and over an existing file that is not their own kind
of output, unless --overwrite; an earlier page is replaced. Pages hold every
string escaped: a vocabulary and text with a lone surrogate (read with
--encoding utf-7, a real way in) give valid UTF-8 pages.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_text

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.system


def charnn(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "charnn", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300, check=False)


TINY = ("--max-steps", 3, "--hidden-size", 8, "--num-layers", 1, "--embedding-dim", 4, "--batch-size", 2,
        "--seq-len", 8, "--sample-every", 0)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("outputs")
    (folder / "t.txt").write_text(make_text(2000), encoding="utf-8")
    done = charnn("train", "t.txt", "--out", "o", *TINY, cwd=folder)
    assert done.returncode == 0, done.stderr
    return folder


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


CASES = [
    ("inspect", "o/best.pt", "t.txt", "--html", "o/best.pt"),
    ("inspect", "o/best.pt", "t.txt", "--html", "t.txt"),
    ("inspect", "o/best.pt", "t.txt", "--html", "./o/../t.txt"),
    ("inspect", "o/best.pt", "t.txt", "--html", "link.html"),  # a symlink to the checkpoint
    ("inspect", "o/best.pt", "t.txt", "--html", "hard.html"),  # a hard link to the checkpoint
    ("inspect", "o/best.pt", "t.txt", "--plot", "o/best.pt"),
    ("inspect", "o/best.pt", "t.txt", "--html", "notes.txt"),  # not an input, not a page
    ("eval", "o/best.pt", "t.txt", "--html", "t.txt"),
    ("eval", "o/best.pt", "t.txt", "--html", "link.html"),
    ("eval", "o/best.pt", "--html", "o/last.pt"),
    ("eval", "o/best.pt", "--html", "t.txt"),  # the checkpoint's own corpus
    ("info", "o/best.pt", "--plot", "o/best.pt"),
    ("info", "o/best.pt", "--plot", "notes.txt"),
]


@pytest.mark.parametrize("args", CASES, ids=[" ".join(c) for c in CASES])
def test_an_output_never_replaces_an_input_or_another_kind_of_file(run, args):
    pytest.importorskip("matplotlib") if "--plot" in args else None
    for name in ("link.html", "hard.html"):
        (run / name).unlink(missing_ok=True)
    (run / "link.html").symlink_to("o/best.pt")
    os.link(run / "o" / "best.pt", run / "hard.html")
    (run / "notes.txt").write_text("my notes\n", encoding="utf-8")
    files = [run / "o" / "best.pt", run / "o" / "last.pt", run / "t.txt", run / "notes.txt"]
    before = {f: _digest(f) for f in files}
    done = charnn(*args, cwd=run)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Error:" in done.stderr and "--overwrite" in done.stderr and "Traceback" not in done.stderr
    assert "choose another path" in done.stderr
    assert {f: _digest(f) for f in files} == before
    assert (run / "link.html").is_symlink()


def test_an_earlier_page_is_replaced_and_overwrite_is_explicit(run):
    page = run / "page.html"
    page.unlink(missing_ok=True)
    for _ in range(2):  # the second run replaces the first page without --overwrite
        done = charnn("eval", "o/best.pt", "t.txt", "--html", page, cwd=run)
        assert done.returncode == 0, done.stderr
    assert page.read_bytes().startswith(b"<!DOCTYPE html>")
    (run / "notes.txt").write_text("my notes\n", encoding="utf-8")
    done = charnn("eval", "o/best.pt", "t.txt", "--html", "notes.txt", "--overwrite", cwd=run)
    assert done.returncode == 0, done.stderr
    assert (run / "notes.txt").read_bytes().startswith(b"<!DOCTYPE html>")
    assert not [p for p in run.iterdir() if p.name.startswith(".") and "tmp" in p.name]  # no temp file left
    for command in ("eval", "inspect", "info"):
        assert "--overwrite" in charnn(command, "--help", cwd=run).stdout


def test_a_page_over_a_symlink_replaces_the_link_not_its_target(run):
    (run / "mine.html").unlink(missing_ok=True)
    (run / "target.html").write_text("<!DOCTYPE html><p>kept</p>", encoding="utf-8")
    (run / "mine.html").symlink_to("target.html")
    done = charnn("eval", "o/best.pt", "t.txt", "--html", "mine.html", cwd=run)
    assert done.returncode == 0, done.stderr
    assert not (run / "mine.html").is_symlink()
    assert (run / "target.html").read_text(encoding="utf-8") == "<!DOCTYPE html><p>kept</p>"


def test_pages_with_lone_surrogates_are_valid_utf8(tmp_path):
    """A text read with --encoding utf-7 can hold a lone surrogate ('+2AA-' is
    U+D800): it enters the vocabulary and the text. eval --html and inspect
    --html said "This is a bug in charnn"; the pages are now valid UTF-8 with
    the character shown as its escape."""
    text = ("abc def +2AA- ghi\n" * 200).encode("ascii")
    (tmp_path / "s.txt").write_bytes(text)
    done = charnn("train", "s.txt", "--out", "o", "--encoding", "utf-7", *TINY, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    for args in (("eval", "o/best.pt", "--html", "e.html"),
                 ("eval", "o/best.pt", "s.txt", "--encoding", "utf-7", "--html", "f.html"),
                 ("inspect", "o/best.pt", "--html", "i.html", "--max-chars", 300),
                 ("inspect", "o/best.pt", "s.txt", "--encoding", "utf-7", "--html", "j.html", "--max-chars", 300)):
        done = charnn(*args, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert "bug in charnn" not in done.stderr
        page = (tmp_path / args[-1 if args[-2] == "--html" else -3]).read_bytes().decode("utf-8")  # strict
        assert "\\ud800" in page
