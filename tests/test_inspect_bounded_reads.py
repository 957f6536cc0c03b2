"""inspect reads only what it inspects (issue 25, break 8).

`inspect --max-chars 2000` on a 1 GB file read the whole file (66 s and
16.8 GB in the issue). Files are now read incrementally and no further than
--max-chars: a real 1 GB sparse file (text, then a hole of NUL bytes that
--unknown skip drops) costs what a small file costs. Peak memory is the
child's own (ru_maxrss of a fresh wrapper's only child).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_text

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.system

# Runs the command as its only child and prints its peak memory and time.
_MEASURE = """
import json, resource, subprocess, sys, time
t = time.perf_counter()
done = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(json.dumps({"rc": done.returncode, "seconds": time.perf_counter() - t, "stderr": done.stderr,
                  "stdout": done.stdout, "peak_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def measured(*args, cwd: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _MEASURE, sys.executable, "-m", "charnn", *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=600, check=False)
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bounded")
    text = make_text(20_000)
    (folder / "t.txt").write_text(text, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "charnn", "train", "t.txt", "--out", "o", "--max-steps", "2",
                           "--hidden-size", "8", "--num-layers", "1", "--embedding-dim", "4", "--batch-size", "2",
                           "--seq-len", "8", "--sample-every", "0"], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    with open(folder / "big.txt", "wb") as f:  # 1 GB, sparse: no disk space, real reads
        f.write(text.encode("utf-8"))
        f.truncate(1 << 30)
    return folder


def test_inspect_max_chars_reads_only_the_start_of_a_huge_file(folder):
    small = measured("inspect", "o/best.pt", "t.txt", "--max-chars", 2000, "--json", cwd=folder)
    big = measured("inspect", "o/best.pt", "big.txt", "--max-chars", 2000, "--unknown", "skip", "--json",
                   cwd=folder)
    assert small["rc"] == 0 and big["rc"] == 0, big["stderr"]
    assert json.loads(big["stdout"])["chars"] == json.loads(small["stdout"])["chars"] == 2000
    # The same work as on the small file: what 1 GB would cost is gigabytes and tens of seconds.
    assert big["peak_kb"] - small["peak_kb"] < 100_000, (small, big)
    assert big["seconds"] < small["seconds"] + 10, (small, big)


def test_streamed_text_is_the_text(folder, tmp_path):
    """CRLF split across read chunks, a byte-order mark, a multi-byte
    character across a chunk boundary: the bounded read gives what a whole
    read gives."""
    from charnn.text.reading import read_corpus
    from charnn.text.head import iter_text

    body = ("é" * 3 + "ab\r\n" + "x\r" + "€") * 5000
    raw = b"\xef\xbb\xbf" + body.encode("utf-8")
    p = tmp_path / "crlf.txt"
    p.write_bytes(raw)
    whole = read_corpus([p]).text
    for chunk in (1, 2, 3, 7, 4096):
        assert "".join(iter_text(p, chunk=chunk)) == whole


def test_bad_bytes_far_into_the_file_name_their_offset(tmp_path):
    from charnn.errors import DataError
    from charnn.text.head import iter_text

    p = tmp_path / "bad.txt"
    p.write_bytes(b"a" * 100_000 + b"\xff" + b"b" * 10)
    with pytest.raises(DataError, match="offset 100000"):
        list(iter_text(p))


def test_truncating_the_encoding_cache_during_training_does_not_kill_the_run(tmp_path):
    """The encoded-corpus cache (charnn.text.data) was memory-mapped: truncating
    its .npy while a run trained on it ended the run with SIGBUS and no
    message. A real run, a real truncation mid-run; the run finishes."""
    import signal
    import time

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CHARNN_DATA_DIR": str(tmp_path / "d")}
    (tmp_path / "t.txt").write_text(make_text(400_000), encoding="utf-8")
    args = [sys.executable, "-m", "charnn", "train", "t.txt", "--hidden-size", "8", "--num-layers", "1",
            "--embedding-dim", "4", "--batch-size", "64", "--seq-len", "64", "--sample-every", "0",
            "--eval-every", "100000"]
    first = subprocess.run([*args, "--out", "a", "--max-steps", "1"], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=300, check=False)
    assert first.returncode == 0, first.stderr
    (entry,) = (tmp_path / "d").rglob("*.npy")
    run = subprocess.Popen([*args, "--out", "b", "--max-steps", "300", "--log-every", "1"], cwd=tmp_path,
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "b" / "metrics.jsonl").exists() or not (tmp_path / "b" / "metrics.jsonl").stat().st_size:
            assert run.poll() is None and time.monotonic() < deadline, run.communicate()
            time.sleep(0.1)
        os.truncate(entry, 128)  # what `cp other.npy entry` or a full disk leaves
        _, err = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode != -signal.SIGBUS, "killed by SIGBUS"
    assert run.returncode == 0, err
