"""charnn sample's copy report and --max-copy as the user types them: real
processes, a real FIFO, a real sparse huge file, a corpus edited after
training, a cache file truncated between runs."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from charnn.generation.copies import copy_report
from charnn.text.copyindex import MAX_INDEX_CHARS, CopyIndex, suffix_array, text_codes
from conftest import make_text, train_tiny

pytestmark = pytest.mark.system

REPO = Path(__file__).resolve().parent.parent
WAR_AND_PEACE = Path("/work/shared/data/war-and-peace.txt")
if not WAR_AND_PEACE.is_file():
    WAR_AND_PEACE = REPO.parent.parent / "shared" / "data" / "war-and-peace.txt"
FOOTER = re.compile(r"^copied: longest \d+ characters?; \d+\.\d% of characters in spans of \d+\+(; the prime itself copies \d+)? \(against .+\)$")


def sample(*args, data_dir: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), CHARNN_DATA_DIR=str(data_dir), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "charnn", "sample", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=timeout)


def index_of(text: str) -> CopyIndex:
    return CopyIndex(text, suffix_array(text_codes(text)))


def test_the_footer_reports_what_the_printed_sample_copies(trained, data_dir):
    r = sample(trained.best, "-n", 300, "--seed", 3, "-t", 0.5, "-p", "The ", data_dir=data_dir)
    assert r.returncode == 0, r.stderr
    printed = r.stdout[:-1]
    footer = r.stderr.strip().splitlines()[-1]
    assert FOOTER.match(footer) and footer.endswith("(against corpus.txt)")
    assert footer == copy_report(index_of(trained.text), printed, 4, 20, "corpus.txt").footer()


def test_json_gains_the_spans_and_figures_of_each_sample(trained, data_dir):
    r = sample(trained.best, "-n", 200, "--seed", 8, "-m", 3, "--json", "--copy-span", 3, "-p", "She ",
               data_dir=data_dir)
    assert r.returncode == 0, r.stderr
    index = index_of(trained.text)
    data = json.loads(r.stdout)
    for d in data:
        want = copy_report(index, d["text"], 4, 3, "corpus.txt").to_dict()
        assert d["copies"] == want and want["spans"]  # spans of 3+ exist in these texts
        for a, b in d["copies"]["spans"]:
            assert d["text"][a:b] in trained.text
    lines = r.stderr.strip().splitlines()
    assert [line.split(": ", 1)[0] for line in lines] == ["sample 1", "sample 2", "sample 3"]
    assert all(FOOTER.match(line.split(": ", 1)[1]) for line in lines)


def test_max_copy_holds_and_says_how_many_steps_it_redirected(trained, data_dir):
    r = sample(trained.best, "-n", 300, "--seed", 1, "-m", 4, "--json", "--max-copy", 3, "-t", 0.6,
               data_dir=data_dir)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    for d in data:
        text = d["text"]
        assert not any(text[i : i + 4] in trained.text for i in range(len(text) - 3))
        assert d["max_copy"] == 3 and d["copies"]["longest"] <= 3
    assert sum(d["redirected"] for d in data) > 0
    lines = r.stderr.strip().splitlines()
    assert [int(re.search(r"max-copy 3: (\d+) steps? redirected", line).group(1)) for line in lines] == \
        [d["redirected"] for d in data]


def test_max_copy_0_is_a_clear_usage_error(trained, data_dir):
    r = sample(trained.best, "--max-copy", 0, data_dir=data_dir)
    assert r.returncode == 2 and r.stdout == ""
    assert "must be at least 1" in r.stderr and "Leave --max-copy out" in r.stderr and "Traceback" not in r.stderr


def test_against_a_missing_file_a_fifo_or_a_huge_file_is_an_error_before_any_sample(trained, data_dir, tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    huge = tmp_path / "huge.txt"
    with open(huge, "wb") as f:  # sparse: no disk used, no time spent
        f.truncate(MAX_INDEX_CHARS + 1)
    for path, needle in ((tmp_path / "nope.txt", "no such file"), (fifo, "is a FIFO (named pipe)"),
                         (huge, f"at most {MAX_INDEX_CHARS:,}")):
        r = sample(trained.best, "-n", 50, "--against", path, data_dir=data_dir, timeout=60)
        assert r.returncode == 1 and r.stdout == "", r.stderr
        assert r.stderr.startswith("Error: --against ") and needle in r.stderr and "Traceback" not in r.stderr


def test_against_in_another_encoding_names_the_fix_charnn_sample_has(trained, data_dir, tmp_path):
    """charnn sample has no --encoding: --against is read in the checkpoint's
    training encoding, and the error says so instead of pointing at an option
    that does not exist here."""
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_bytes(latin.read_bytes())
    for path in (latin, folder):
        r = sample(trained.best, "-n", 50, "--against", path, data_dir=data_dir, timeout=60)
        assert r.returncode == 1 and r.stdout == "", r.stderr
        assert "not utf-8 text" in r.stderr.lower() and "--encoding" not in r.stderr, r.stderr
        assert "the model was trained with (utf-8)" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_corpus_edited_after_training_gets_a_note_never_a_lost_sample(tmp_path, data_dir):
    corpus = tmp_path / "corpus.txt"
    original = make_text(3000, seed=4)
    corpus.write_text(original, encoding="utf-8")
    run = train_tiny(corpus, tmp_path / "run")
    corpus.write_text(original + "An added line.\n", encoding="utf-8")
    r = sample(run.best, "-n", 80, "--seed", 2, data_dir=data_dir)
    assert r.returncode == 0 and len(r.stdout) == 81
    assert r.stderr.strip() == ("copied: not checked -- the training text corpus.txt changed since training (its "
                                "SHA-256 differs); pass --against FILE with the text it was trained on")
    r = sample(run.best, "-n", 80, "--seed", 2, "--max-copy", 5, data_dir=data_dir)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith("Error: --max-copy needs the training text, and the training text corpus.txt "
                               "changed since training")
    kept = tmp_path / "as-trained.txt"
    kept.write_text(original, encoding="utf-8")
    r = sample(run.best, "-n", 80, "--seed", 2, "--max-copy", 5, "--against", kept, data_dir=data_dir)
    assert r.returncode == 0 and FOOTER.match(r.stderr.strip().split("; max-copy")[0])
    assert "(against as-trained.txt); max-copy 5: " in r.stderr
    corpus.unlink()
    r = sample(run.best, "-n", 80, "--seed", 2, data_dir=data_dir)
    assert r.returncode == 0 and len(r.stdout) == 81 and "corpus.txt is not on this machine" in r.stderr
    r = sample(run.best, "-n", 80, "--seed", 2, "--no-copy-report", data_dir=data_dir)
    assert r.returncode == 0 and r.stderr == ""


def test_the_index_is_built_once_and_a_truncated_cache_file_is_rebuilt(trained, data_dir):
    if not WAR_AND_PEACE.is_file():
        pytest.skip("War and Peace is not in ../shared/data")
    args = (trained.best, "-n", 200, "--seed", 5, "--against", WAR_AND_PEACE)
    first = sample(*args, data_dir=data_dir)
    assert first.returncode == 0, first.stderr
    assert "indexing war-and-peace.txt (3.2M characters) for the copy report; once, then cached" in first.stderr
    second = sample(*args, data_dir=data_dir)
    assert second.returncode == 0 and "indexing" not in second.stderr
    footer = second.stderr.strip().splitlines()[-1]
    assert FOOTER.match(footer) and footer == first.stderr.strip().splitlines()[-1]
    [entry] = (data_dir / ".cache" / "copies").glob("*.npy")
    os.truncate(entry, entry.stat().st_size - 1000)
    third = sample(*args, data_dir=data_dir)
    assert third.returncode == 0 and "indexing" in third.stderr
    assert third.stderr.strip().splitlines()[-1] == footer
    shutil.rmtree(data_dir / ".cache")


def test_samples_too_long_to_check_get_a_note_and_are_printed_whole(trained, data_dir, tmp_path):
    prime = (trained.text * (1_000_000 // len(trained.text) + 1))[:999_990]
    (tmp_path / "prime.txt").write_text(prime, encoding="utf-8")
    r = sample(trained.best, "--prime-file", tmp_path / "prime.txt", "-n", 20, "--seed", 1, data_dir=data_dir)
    assert r.returncode == 0 and len(r.stdout) == 1_000_011 and r.stdout.startswith(prime)
    assert r.stderr.strip() == ("copied: not checked -- the samples hold 1,000,010 characters; the report checks "
                                "at most 1,000,000 (about 10 s); pass --no-copy-report to skip this note")
