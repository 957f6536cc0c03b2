"""One run owns its folder, as a user meets it (issue 10, parts 2-4).

The commands are the ones a user types: the quick start twice, `charnn train .`
from a project folder, two live processes on one folder, a read-only --out.
The faults are real: real processes and locks, kill -9, a read-only tmpfs.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from charnn.storage import checkpoint
from fs_faults import tmpfs
from robust_helpers import TINY_TRAIN, popen, write_corpus
from test_crash_safety import _wait_for_progress, reaped

from conftest import invoke

FAST = [*TINY_TRAIN, "--max-steps", "4", "--eval-every", "2"]


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_the_same_command_twice_never_replaces_the_first_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    corpus = write_corpus(tmp_path / "notes.txt")
    first = invoke("train", corpus, *FAST)
    assert first.exit_code == 0, first.output
    before = digest(tmp_path / "checkpoints" / "notes")
    second = invoke("train", corpus, *FAST)
    assert second.exit_code == 0, second.output
    text = " ".join(second.stderr.split())
    assert "checkpoints/notes holds an earlier run; writing to checkpoints/notes-2/" in text, text
    assert text.count("writing to checkpoints/notes-2/") == 1, text  # the folder is named once
    assert "Next: charnn sample checkpoints/notes-2/best.pt" in text
    assert digest(tmp_path / "checkpoints" / "notes") == before  # untouched, metrics.jsonl included
    assert (tmp_path / "checkpoints" / "notes-2" / "best.pt").is_file()


def test_an_explicit_out_holding_a_run_is_refused_unless_overwrite(tmp_path):
    corpus = write_corpus(tmp_path / "notes.txt")
    assert invoke("train", corpus, *FAST, "--out", tmp_path / "run").exit_code == 0
    before = digest(tmp_path / "run")
    again = invoke("train", corpus, *FAST, "--out", tmp_path / "run")
    assert again.exit_code == 1, again.output
    text = " ".join(again.stderr.split())
    assert f"--resume {tmp_path / 'run' / 'last.pt'}" in text and "--overwrite" in text, text
    assert digest(tmp_path / "run") == before
    replaced = invoke("train", corpus, *FAST, "--seed", "5", "--out", tmp_path / "run", "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert checkpoint.load(tmp_path / "run" / "last.pt").train_config["seed"] == 5
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert sum("\"val_loss\"" in r for r in rows) == 2  # steps 2 and 4 of the new run only


def test_train_dot_never_reads_its_own_output(tmp_path, monkeypatch):
    """`charnn train .` from a project folder: the run folders under
    checkpoints/ and the encoding cache under data/ are not corpus."""
    project = tmp_path / "project"
    project.mkdir()
    write_corpus(project / "notes.txt", n_words=1500)
    monkeypatch.chdir(project)
    monkeypatch.setenv("CHARNN_DATA_DIR", str(project / "data"))
    first = invoke("train", ".", *FAST)
    assert first.exit_code == 0, first.output
    second = invoke("train", ".", *FAST)  # now checkpoints/project/ and data/.cache exist
    assert second.exit_code == 0, second.output
    a = checkpoint.load(project / "checkpoints" / "project" / "last.pt")
    b = checkpoint.load(project / "checkpoints" / "project-2" / "last.pt")
    assert a.train_config["corpus_hash"] == b.train_config["corpus_hash"]  # the same text both times
    # ...so the runs stay usable: eval on the recorded validation split, and resume.
    ev = invoke("eval", project / "checkpoints" / "project" / "best.pt", "--json")
    assert ev.exit_code == 0, ev.output
    res = invoke("train", "--resume", project / "checkpoints" / "project" / "last.pt", "--max-steps", "6")
    assert res.exit_code == 0, res.output


@pytest.mark.system
def test_a_live_run_locks_its_folder_and_a_killed_one_does_not(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt", n_words=1500)
    out = tmp_path / "run"
    proc = popen(["train", str(corpus), *TINY_TRAIN, "--out", str(out), "--max-steps", "1000000",
                  "--eval-every", "5", "--log-every", "1"], tmp_path / "data", tmp_path,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with reaped(proc):
        _wait_for_progress(out, proc, 0)
        # The command charnn would print, while the first process still writes:
        second = invoke("train", "--resume", out / "last.pt", "--max-steps", "3")
        assert second.exit_code == 1, second.output
        text = " ".join(second.stderr.split())
        assert f"pid {proc.pid}" in text and "is writing to" in text, text
        overwrite = invoke("train", corpus, *FAST, "--out", out, "--overwrite")
        assert overwrite.exit_code == 1 and f"pid {proc.pid}" in " ".join(overwrite.stderr.split())
        proc.kill()  # kill -9: the lock file stays behind, its flock is released
        proc.wait()
    step = checkpoint.load(out / "last.pt").train_state["step"]
    after = invoke("train", "--resume", out / "last.pt", "--max-steps", step + 2)
    assert after.exit_code == 0, after.output
    assert f"pid {proc.pid}" in " ".join(after.stderr.split())  # the stale lock was taken over, and said so


@pytest.mark.system
def test_a_read_only_out_is_found_before_training(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    with tmpfs(tmp_path / "ro", size="1m", read_only=True) as ro:
        t0 = time.monotonic()
        result = invoke("train", corpus, *TINY_TRAIN, "--max-steps", "100000", "--out", ro / "run")
        elapsed = time.monotonic() - t0
    assert result.exit_code == 1, result.output
    text = " ".join(result.stderr.split())
    assert text.startswith("Error: ") and "read-only" in text, text
    assert "step" not in text.split("Error:")[0]  # no training line before the error
    assert elapsed < 30


@pytest.mark.parametrize("budget", [["--time-limit", "1s"], ["--time-limit", "0.2"]])
def test_a_budget_too_short_to_train_is_an_error_not_success(tmp_path, budget):
    corpus = write_corpus(tmp_path / "corpus.txt", n_words=3000)
    result = invoke("train", corpus, *TINY_TRAIN, *budget, "--out", tmp_path / "run")
    assert result.exit_code == 1, result.output
    text = " ".join(result.stderr.split())
    assert "too short" in text or "no training step" in text, text
    assert "Done:" not in text
    assert not (tmp_path / "run" / "best.pt").exists()


@pytest.mark.system
@pytest.mark.parametrize("shape", ["given", "auto"])
def test_the_time_limit_a_too_short_budget_suggests_trains(tmp_path, shape):
    """The command the error asks for works: the same run with the suggested
    --time-limit trains and finishes. With --size auto the suggestion counts
    the time the size probe took (it once suggested 3s for a refused 3s)."""
    corpus = write_corpus(tmp_path / "corpus.txt", n_words=3000)
    options = (list(TINY_TRAIN) if shape == "given"
               else ["--device", "cpu", "--precision", "fp32", "--sample-every", "0"])
    def charnn_train(limit: str) -> subprocess.CompletedProcess:
        # A fresh process, as the user runs it: its first model build and
        # kernel selection are part of what the probe costs.
        return subprocess.run([sys.executable, "-m", "charnn", "train", str(corpus), *options,
                               "--time-limit", limit, "--out", str(tmp_path / "run")],
                              capture_output=True, text=True, timeout=120)

    first = charnn_train("0.5s")
    assert first.returncode == 1, first.stdout + first.stderr
    text = " ".join(first.stderr.split())
    suggested = re.search(r"give at least (\d+)s", text)
    assert "too short" in text and suggested and "Traceback" not in text, text
    seconds = int(suggested.group(1))
    assert seconds > 0.5
    second = charnn_train(f"{seconds}s")
    assert second.returncode == 0, second.stdout + second.stderr
    assert "Done:" in second.stdout + second.stderr and (tmp_path / "run" / "best.pt").is_file()


@pytest.mark.system
def test_a_run_still_reading_its_corpus_already_owns_its_folder(tmp_path, monkeypatch):
    """Run A is stopped (a real SIGSTOP) while it reads its text; run B, same
    corpus name, starts and finishes meanwhile: B goes to NAME-2, and A, once
    continued, finds its folder as it left it."""
    import json
    import os
    import signal

    monkeypatch.chdir(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write_corpus(tmp_path / "a" / "t.txt", n_words=1500)
    write_corpus(tmp_path / "b" / "t.txt", n_words=800, seed=1)
    proc = popen(["train", str(tmp_path / "a" / "t.txt"), *FAST], tmp_path / "data-a", tmp_path,
                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    with reaped(proc):
        marker = tmp_path / "checkpoints" / "t" / ".charnn-run"
        deadline = time.monotonic() + 60
        while not marker.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            if (tmp_path / "checkpoints" / "t" / "last.pt").exists():
                pytest.skip("run A finished its first checkpoint before it could be stopped (machine too fast)")
            b = invoke("train", tmp_path / "b" / "t.txt", *FAST)
            assert b.exit_code == 0, b.output
            assert "writing to checkpoints/t-2/" in " ".join(b.stderr.split())
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()
    rows = [json.loads(r) for r in (tmp_path / "checkpoints" / "t" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "train_loss" in r]
    assert steps == sorted(set(steps))  # one run's rows only
    a_hash = checkpoint.load(tmp_path / "checkpoints" / "t" / "last.pt").train_config["corpus_hash"]
    b_hash = checkpoint.load(tmp_path / "checkpoints" / "t-2" / "last.pt").train_config["corpus_hash"]
    assert a_hash != b_hash
