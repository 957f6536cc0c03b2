"""Crash safety: SIGKILL at random moments never leaves a checkpoint that does
not load, ``--resume`` continues from the latest one, no stray file looks like
a checkpoint; a full disk keeps the previous checkpoint and says so; Ctrl-C
saves last.pt and exits 130."""

from __future__ import annotations

import errno
import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import charnn.storage.checkpoint as ckpt_mod
from charnn.cli import app
from charnn.errors import CheckpointError
from charnn.storage.runfolder import LOCK_NAME, RUN_MARKER
from robust_helpers import TINY_TRAIN, popen, reaped, snapshot, train_tiny, wait_for_progress, write_corpus
from fs_faults import fill, tmpfs

TMP_FILE = re.compile(r"^\.charnn-tmp-.*\.tmp$")
KILL_SEED = 20240611
KILLS = 4


def _check_folder(out: Path) -> int:
    """Every *.pt loads; everything else is the log or a temp file no one
    mistakes for a checkpoint. Returns the step of last.pt."""
    steps = {}
    for p in sorted(out.iterdir()):
        if p.suffix == ".pt":
            ck = ckpt_mod.load(p)  # raises if torn
            steps[p.name] = ck.train_state["step"]
        else:
            assert p.name in ("metrics.jsonl", RUN_MARKER, LOCK_NAME) or TMP_FILE.match(p.name), \
                f"unexpected file {p.name}"
            assert not p.name.endswith(".pt")
    assert "last.pt" in steps, sorted(p.name for p in out.iterdir())
    numbered = [s for n, s in steps.items() if n.startswith("step-")]
    assert all(s <= steps["last.pt"] for s in numbered), steps
    assert len(numbered) <= 3 + 1, f"--keep 3 kept {len(numbered)} step files"
    return steps["last.pt"]


@pytest.mark.system
def test_sigkill_loop_leaves_only_loadable_checkpoints(tmp_path):
    rng = random.Random(KILL_SEED)
    corpus = write_corpus(tmp_path / "corpus.txt", n_words=1500)
    out = tmp_path / "out"
    data_dir = tmp_path / "data"
    base = ["--out", str(out), "--max-steps", "1000000", "--eval-every", "1", "--log-every", "1",
            "--keep", "3"]
    args = ["train", str(corpus), *TINY_TRAIN, *base]
    last_step = None
    for kill in range(KILLS):
        since = (out / "metrics.jsonl").stat().st_size if (out / "metrics.jsonl").exists() else 0
        proc = popen(args, data_dir, tmp_path, stdout=subprocess.DEVNULL)
        with reaped(proc):
            wait_for_progress(out, proc, since)
            time.sleep(rng.uniform(0.0, 0.6))
            proc.send_signal(signal.SIGKILL)
            _, err = proc.communicate(timeout=20)
        assert proc.returncode == -signal.SIGKILL
        text = err.decode(errors="replace")
        assert "Traceback" not in text, text
        if last_step is not None:
            assert f"resuming at step {last_step}" in text, (
                f"--resume did not continue from step {last_step}:\n{text}")
        step = _check_folder(out)
        assert last_step is None or step >= last_step
        last_step = step
        args = ["train", "--resume", str(out / "last.pt"), *base]

    # A final resume in-process finishes cleanly from the latest checkpoint.
    result = CliRunner().invoke(app, ["train", "--resume", str(out / "last.pt"), "--out", str(out),
                                      "--max-steps", str(last_step + 2), "--eval-every", "1"],
                                env={"CHARNN_DATA_DIR": str(data_dir)})
    assert result.exit_code == 0, result.output
    assert f"resuming at step {last_step}" in result.stderr
    assert ckpt_mod.load(out / "last.pt").train_state["step"] == last_step + 2
    assert _check_folder(out) == last_step + 2


@pytest.mark.system
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP],
                         ids=["SIGINT", "SIGTERM", "SIGHUP"])
def test_stop_signal_saves_last_and_exits_128_plus_signal(tmp_path, signum):
    """Ctrl-C, and what timeout/docker stop/Slurm (SIGTERM) and a closed
    terminal (SIGHUP) send: last.pt is saved and the exit code is 128+signal."""
    corpus = write_corpus(tmp_path / "corpus.txt", n_words=1500)
    out = tmp_path / "out"
    proc = popen(["train", str(corpus), *TINY_TRAIN, "--out", str(out), "--max-steps", "1000000",
                  "--eval-every", "5", "--log-every", "1"], tmp_path / "data", tmp_path)
    with reaped(proc):
        wait_for_progress(out, proc, 0)
        time.sleep(0.3)
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=30)
    err = " ".join(stderr.decode(errors="replace").split())
    assert proc.returncode == 128 + signum, err
    assert "Traceback" not in err
    assert "Interrupted by" in err and "--resume" in err, err
    saved = re.search(r"Interrupted by \S+ at step (\d+)", err)
    assert saved, err
    ck = ckpt_mod.load(out / "last.pt")
    assert ck.train_state["step"] == int(saved.group(1))
    assert "optimizer_state" in ck.data
    _check_folder(out)


# ---------------------------------------------------------------------------
# A full disk
# ---------------------------------------------------------------------------

@pytest.fixture
def trained(tmp_path, monkeypatch):
    monkeypatch.setenv("CHARNN_DATA_DIR", str(tmp_path / "data"))
    corpus = write_corpus(tmp_path / "corpus.txt", n_words=500)
    train_tiny(corpus, tmp_path / "run", max_steps=2, eval_every=2)
    return tmp_path / "run"


def _enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("where", ["fsync", "replace"])
def test_disk_full_keeps_previous_checkpoint(trained, monkeypatch, where):
    """ENOSPC at the fsync or the rename (network file systems report it
    there; this machine cannot make that fault, so it is injected). The write
    itself failing on a really full disk is the next test."""
    last = trained / "last.pt"
    before = snapshot(trained)
    payload = torch.load(last, weights_only=True)
    payload["train_state"]["step"] = 999
    target = {"fsync": (ckpt_mod.os, "fsync", _enospc),
              "replace": (ckpt_mod.os, "replace", _enospc)}[where]
    with monkeypatch.context() as mp:
        mp.setattr(*target)
        with pytest.raises(CheckpointError) as info:
            ckpt_mod.save(payload, last)
    message = str(info.value)
    assert "no space left" in message and "intact" in message, message
    assert str(last) in message
    assert snapshot(trained) == before, "the failed write changed the folder (or left a temp file)"
    assert ckpt_mod.load(last).train_state["step"] == 2


@pytest.mark.system
def test_really_full_disk_keeps_previous_checkpoint(trained, tmp_path):
    with tmpfs(tmp_path / "mnt", size="1m") as mnt:
        run = mnt / "run"
        run.mkdir()
        for p in trained.iterdir():
            (run / p.name).write_bytes(p.read_bytes())
        last = run / "last.pt"
        payload = torch.load(last, weights_only=True)
        payload["train_state"]["step"] = 999
        fill(mnt)
        before = snapshot(run)
        with pytest.raises(CheckpointError) as info:
            ckpt_mod.save(payload, last)
        message = str(info.value)
        assert "the disk is full" in message and "no space left" in message and "intact" in message, message
        assert str(last) in message
        assert snapshot(run) == before, "the failed write changed the folder (or left a temp file)"
        assert ckpt_mod.load(last).train_state["step"] == 2


@pytest.mark.system
def test_disk_full_during_training_cli(trained, tmp_path):
    """The trainer's periodic save hits a really full disk (a small tmpfs):
    Error + exit 1, last.pt intact, no temp file left."""
    with tmpfs(tmp_path / "mnt", size="1m") as mnt:
        run = mnt / "run"
        run.mkdir()
        for p in trained.iterdir():
            (run / p.name).write_bytes(p.read_bytes())
        last = run / "last.pt"
        before = last.read_bytes()
        fill(mnt, leave=8192)  # room for the run folder's lock record, not for a checkpoint
        result = CliRunner().invoke(app, ["train", "--resume", str(last), "--max-steps", "4",
                                          "--eval-every", "1"])
        assert "Traceback" not in result.output
        assert result.exit_code == 1, result.output
        assert "Error: " in result.stderr and "no space left" in result.stderr and "intact" in result.stderr
        assert last.read_bytes() == before
        assert not [p for p in run.iterdir() if TMP_FILE.match(p.name)]


@pytest.mark.system
def test_save_to_new_path_on_full_disk_does_not_claim_a_previous_one(trained, tmp_path):
    payload = torch.load(trained / "last.pt", weights_only=True)
    with tmpfs(tmp_path / "mnt", size="1m") as mnt:
        fill(mnt)
        with pytest.raises(CheckpointError) as info:
            ckpt_mod.save(payload, mnt / "fresh" / "new.pt")
        assert "no space left" in str(info.value) and "intact" not in str(info.value)
        assert not (mnt / "fresh" / "new.pt").exists()
        assert list((mnt / "fresh").iterdir()) == []


def test_stale_temp_file_is_never_taken_for_a_checkpoint(trained):
    """A temp file left by a SIGKILL mid-write does not end in .pt, so no glob
    for checkpoints (``*.pt``, ``step-*.pt``) picks it up."""
    stale = trained / ".charnn-tmp-abc123.tmp"
    stale.write_bytes((trained / "last.pt").read_bytes()[:100])
    assert stale not in set(trained.glob("*.pt")) | set(trained.glob("step-*.pt"))
    assert ckpt_mod.TMP_PREFIX == ".charnn-tmp-"


# ---------------------------------------------------------------------------
# Ctrl-C and a closed pipe in sample and eval
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("interrupt")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CHARNN_DATA_DIR", str(root / "data"))
        corpus = write_corpus(root / "corpus.txt", n_words=500)
        train_tiny(corpus, root / "run", max_steps=2, eval_every=2)
    return root, root / "run" / "last.pt"


def _quiet(stderr: bytes) -> str:
    text = stderr.decode(errors="replace")
    assert "Traceback" not in text, text
    assert "Exception ignored" not in text, text
    return text


@pytest.mark.system
def test_ctrl_c_in_sample_exits_130_quietly(small_model):
    root, ckpt = small_model
    proc = popen(["sample", str(ckpt), "-n", "10000000", "--seed", "1"], root / "data", root)
    with reaped(proc):
        first = proc.stdout.read(20)  # it is generating
        assert first
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr.decode(errors="replace")
    _quiet(stderr)


def _wait_for_torch(proc: subprocess.Popen, timeout: float = 60.0) -> None:
    maps = Path(f"/proc/{proc.pid}/maps")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if "libtorch" in maps.read_text():
                return
        except OSError:
            pass
        time.sleep(0.05)
    if not maps.parent.exists():
        time.sleep(4.0)  # no /proc: fall back to a generous start-up time


@pytest.mark.system
def test_ctrl_c_in_eval_exits_130_quietly(small_model):
    root, ckpt = small_model
    big = root / "big.txt"
    if not big.exists():
        big.write_text((root / "corpus.txt").read_text() * 2000)  # ~6.5 MB: many seconds to score
    proc = popen(["eval", str(ckpt), str(big)], root / "data", root)
    with reaped(proc):
        _wait_for_torch(proc)  # torch is imported inside the command body
        time.sleep(2.5)  # torch imported, checkpoint and text loaded: mid-evaluation
        assert proc.poll() is None, "evaluation finished before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=30)
    # 130, or death by SIGINT: CPython re-raises SIGINT at exit when the interrupt
    # landed inside code torch runs at import (a loaded machine may still be there);
    # a shell reports both as 130.
    assert proc.returncode in (130, -signal.SIGINT), stderr.decode(errors="replace")
    assert "Interrupted." in _quiet(stderr)
    assert stdout == b"", "an interrupted evaluation must not print a partial result"


@pytest.mark.system
def test_broken_pipe_in_sample_is_quiet(small_model):
    """``charnn sample CKPT -n 100000 | head -c 10``."""
    root, ckpt = small_model
    proc = popen(["sample", str(ckpt), "-n", "100000", "--seed", "1"], root / "data", root)
    with reaped(proc):
        head = proc.stdout.read(10)
        proc.stdout.close()  # head exits
        stderr = proc.stderr.read()
        proc.wait(timeout=30)
    assert len(head) == 10
    _quiet(stderr)
    assert stderr.strip() == b"", stderr
    assert proc.returncode == 0, proc.returncode


@pytest.mark.system
def test_broken_pipe_through_a_shell_pipeline(small_model):
    root, ckpt = small_model
    from robust_helpers import charnn_cmd, subprocess_env
    import shlex

    cmd = " ".join(shlex.quote(a) for a in charnn_cmd("sample", str(ckpt), "-n", "100000", "--seed", "2"))
    done = subprocess.run(["bash", "-c", f"set -o pipefail; {cmd} | head -c 10"], capture_output=True,
                          env=subprocess_env(root / "data"), cwd=root, timeout=60)
    assert len(done.stdout) == 10
    _quiet(done.stderr)
    assert done.returncode == 0, (done.returncode, done.stderr)
