"""The run folder's files (charnn/storage/runfolder.py): atomic saves,
rotation, temp cleanup, permissions and the metrics log — tested with real faults (a small
tmpfs that fills up, a read-only mount, ``ulimit -f``, a second process, a
SIGKILL, a umask), not mocks of them."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest
import torch

import charnn.storage.checkpoint as ckpt_mod
from charnn.errors import CheckpointError, RunFolderError
from charnn.storage.runfolder import (LOCK_NAME, RUN_MARKER, TMP_PREFIX, RunFolder, json_line, serialize,
                                     step_file_name, write_atomic)
from fs_faults import fill, remount_read_only, tmpfs
from robust_helpers import checkpoint_payload, python_script, snapshot

# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small():
    return checkpoint_payload(16)


@pytest.fixture(scope="module")
def big():
    return checkpoint_payload(128)


def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(TMP_PREFIX))


def _strict_rows(path: Path) -> list[dict]:
    """Every line is one strict JSON object: no NaN/Infinity tokens."""
    def no_constants(token):
        raise AssertionError(f"non-standard JSON token {token} in {path}")

    text = path.read_text(encoding="utf-8")
    assert text == "" or text.endswith("\n")
    return [json.loads(line, parse_constant=no_constants) for line in text.splitlines()]


# ---------------------------------------------------------------------------
# A real full disk
# ---------------------------------------------------------------------------

@pytest.mark.system
def test_disk_full_on_a_real_tmpfs_keeps_the_previous_checkpoint(tmp_path, small, big):
    with tmpfs(tmp_path / "mnt", size="2m") as mnt:
        with RunFolder(mnt / "run") as folder:
            last = folder.save(small, "last.pt")
            before = last.read_bytes()
            fill(mnt, leave=64 * 1024)  # less than the big checkpoint needs (~300 KB)
            with pytest.raises(CheckpointError) as info:
                folder.save(big, "last.pt")
            message = str(info.value)
            assert f"could not write {last}" in message
            assert "the disk is full" in message and "no space left" in message
            assert re.search(r"; \d+ kB needed, \d+ kB free\)", message), message
            assert "previous checkpoint there is intact" in message
            assert "choose another --out" in message
            assert last.read_bytes() == before
            assert ckpt_mod.load(last).train_state["step"] == 16
            assert _temps(folder.path) == []

            # A new file on the full disk: the same error, no claim of a previous one.
            with pytest.raises(CheckpointError, match="the disk is full") as info:
                ckpt_mod.save(big, folder.path / "best.pt")
            assert "intact" not in str(info.value)
            assert not (folder.path / "best.pt").exists()
            assert _temps(folder.path) == []


@pytest.mark.system
def test_metrics_log_on_a_full_disk_warns_once_and_stays_valid(tmp_path):
    with tmpfs(tmp_path / "mnt", size="1m") as mnt:
        with RunFolder(mnt / "run") as folder:
            assert folder.log({"step": 1, "train_loss": 3.0}) is None
            filler = fill(mnt)
            big_row = {"step": 2, "note": "x" * 20_000}  # needs new pages on the full disk
            warning = folder.log(big_row)
            assert warning and "metrics.jsonl" in warning and "the disk is full" in warning
            assert folder.log(big_row) is None  # once per spell of failures, not every row
            assert folder.log_failures == 2
            assert _strict_rows(folder.metrics_path) == [{"step": 1, "train_loss": 3.0}]
            filler.unlink()
            assert folder.log({"step": 3, "train_loss": 2.5}) is None
            assert [r["step"] for r in _strict_rows(folder.metrics_path)] == [1, 3]


@pytest.mark.system
def test_file_size_limit_is_a_clear_error(tmp_path, small, big):
    """``ulimit -f``: writes past the limit fail with EFBIG (Python ignores SIGXFSZ)."""
    out = tmp_path / "run"
    ckpt_mod.save(small, out / "last.pt")
    before = (out / "last.pt").read_bytes()
    (tmp_path / "big.pt").write_bytes(serialize(big))  # written here, without the limit
    import resource

    limit = 100_000  # above the small checkpoint (13 KB), below the big one (300 KB)
    # The child writes the big checkpoint's bytes (no torch import: seconds saved).
    proc = python_script("""
        import sys
        from pathlib import Path
        from charnn.errors import CharnnError
        from charnn.storage.runfolder import RunFolder
        data = Path(sys.argv[2]).read_bytes()
        with RunFolder(Path(sys.argv[1]), resuming_at_step=0) as folder:
            try:
                folder.save(data, "last.pt")
            except CharnnError as e:
                print("ERROR:", e)
        """, str(out), str(tmp_path / "big.pt"),
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY)))
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "ERROR: could not write" in stdout and "file size limit" in stdout, stdout
    assert "ulimit -f" in stdout and "intact" in stdout
    assert (out / "last.pt").read_bytes() == before
    assert _temps(out) == []


# ---------------------------------------------------------------------------
# A read-only folder is found at open(), before training
# ---------------------------------------------------------------------------

@pytest.mark.system
def test_read_only_folder_is_refused_at_open(tmp_path, small):
    with tmpfs(tmp_path / "mnt", size="1m") as mnt:
        run = mnt / "run"
        run.mkdir()
        (run / "notes.txt").write_text("mine\n")
        remount_read_only(mnt)
        before = snapshot(mnt)
        with pytest.raises(RunFolderError) as info:
            RunFolder(run).open()
        assert "read-only" in str(info.value) and "--out" in str(info.value)
        with pytest.raises(RunFolderError, match="cannot create the output folder .*read-only"):
            RunFolder(run / "sub").open()
        with pytest.raises(CheckpointError, match="read-only"):
            ckpt_mod.save(small, run / "best.pt")
        assert snapshot(mnt) == before
        assert sorted(os.listdir(run)) == ["notes.txt"]


@pytest.mark.system
def test_read_only_mount_root_is_refused_at_open(tmp_path):
    with tmpfs(tmp_path / "mnt", size="1m", read_only=True) as mnt:
        with pytest.raises(RunFolderError, match="read-only file system"):
            RunFolder(mnt).open()
        assert os.listdir(mnt) == []


def test_output_path_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(RunFolderError, match="is a file, not a folder; choose another --out"):
        RunFolder(tmp_path / "f").open()
    with pytest.raises(RunFolderError, match="part of that path is a file"):
        RunFolder(tmp_path / "f" / "run").open()


# ---------------------------------------------------------------------------
# Temp files, umask, atomic writes
# ---------------------------------------------------------------------------

def test_stale_temp_files_are_removed_by_open_and_save(tmp_path, small):
    out = tmp_path / "run"
    out.mkdir()
    (out / f"{TMP_PREFIX}dead1.tmp").write_bytes(b"PK half a checkpoint")
    (out / f"{TMP_PREFIX}dead2.tmp").write_bytes(b"")
    (out / "notes.txt").write_text("the user's own file\n")
    with RunFolder(out) as folder:
        assert _temps(out) == []
        assert any("2 unfinished temp file(s)" in n for n in folder.notes), folder.notes
        (out / f"{TMP_PREFIX}dead3.tmp").write_bytes(b"left by a killed save")
        folder.save(small, "last.pt")
        assert _temps(out) == []
    assert (out / "notes.txt").read_text() == "the user's own file\n"
    assert ckpt_mod.load(out / "last.pt").train_state["step"] == 16


@pytest.mark.system
def test_files_follow_the_umask(tmp_path, small):
    (tmp_path / "payload.pt").write_bytes(serialize(small))
    proc = python_script("""
        import os, sys
        from pathlib import Path
        from charnn.storage.runfolder import RunFolder, write_atomic
        os.umask(0o027)
        out = Path(sys.argv[1])
        data = (out / "payload.pt").read_bytes()
        with RunFolder(out / "run") as folder:
            folder.save(data, "last.pt")
            folder.save_step(data, 5, keep=2)
            folder.log({"step": 5})
        write_atomic(out / "best.pt", data)  # what checkpoint.save writes with
        """, str(tmp_path))
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    run = tmp_path / "run"
    for name in ("last.pt", step_file_name(5), "metrics.jsonl", RUN_MARKER, LOCK_NAME):
        assert oct((run / name).stat().st_mode & 0o777) == oct(0o640), name
    assert oct(run.stat().st_mode & 0o777) == oct(0o750)
    assert oct((tmp_path / "best.pt").stat().st_mode & 0o777) == oct(0o640)
    assert ckpt_mod.load(run / "last.pt").train_state["step"] == 16


def test_checkpoint_save_follows_the_umask(tmp_path, small):
    old = os.umask(0o027)
    try:
        ckpt_mod.save(small, tmp_path / "best.pt")
    finally:
        os.umask(old)
    assert oct((tmp_path / "best.pt").stat().st_mode & 0o777) == oct(0o640)


def test_write_atomic_replaces_and_leaves_nothing_else(tmp_path):
    target = tmp_path / "f.bin"
    write_atomic(target, b"one")
    write_atomic(target, b"two" * 100_000)
    assert target.read_bytes() == b"two" * 100_000
    assert os.listdir(tmp_path) == ["f.bin"]
    with pytest.raises(CheckpointError, match="it is a folder"):
        write_atomic(tmp_path, b"x")


def test_save_accepts_serialized_bytes_and_rejects_odd_names(tmp_path, small):
    with RunFolder(tmp_path / "run") as folder:
        data = serialize(small)
        a = folder.save(data, "last.pt")
        b = folder.save(data, "best.pt")
        assert a.read_bytes() == b.read_bytes() == data
        for bad in ("../x.pt", "sub/x.pt", f"{TMP_PREFIX}x.pt", LOCK_NAME, ""):
            with pytest.raises(ValueError):
                folder.save(data, bad)
    with pytest.raises(RuntimeError, match="not open"):
        folder.save(data, "last.pt")


# ---------------------------------------------------------------------------
# --keep rotates by step number
# ---------------------------------------------------------------------------

def test_keep_orders_by_step_number_not_by_name(tmp_path):
    with RunFolder(tmp_path / "run") as folder:
        out = folder.path
        for name in ("step-999.pt", "step-1000.pt", "step-0000998.pt", "step-5.pt"):
            (out / name).write_bytes(b"old")
        path = folder.save_step(b"new", 1001, keep=3)
        assert path.name == "step-0001001.pt"
        assert sorted(p.name for p in out.glob("step-*.pt")) == ["step-0001001.pt", "step-1000.pt", "step-999.pt"]


def test_keep_past_seven_digits(tmp_path):
    with RunFolder(tmp_path / "run") as folder:
        folder.save_step(b"a", 9_999_999, keep=2)
        folder.save_step(b"b", 10_000_000, keep=2)  # lexically before step-9999999.pt
        folder.save_step(b"c", 12_345_678, keep=2)
        assert sorted(p.name for p in folder.path.glob("step-*.pt")) == ["step-10000000.pt", "step-12345678.pt"]


def test_keep_leaves_step_files_beyond_the_current_step(tmp_path):
    """Resumed from an earlier checkpoint: later step files of the abandoned
    run are not mistaken for the newest ones (which would delete the new files)."""
    out = tmp_path / "run"
    out.mkdir()
    for step in (300, 400, 500):
        (out / step_file_name(step)).write_bytes(b"later")
    with RunFolder(out, resuming_at_step=200) as folder:
        assert any("are from after step 200" in n for n in folder.notes), folder.notes
        folder.save_step(b"x", 250, keep=1)
        assert (out / step_file_name(250)).exists()
        folder.save_step(b"y", 300, keep=2)  # overwrites the abandoned run's file of that name
        assert (out / step_file_name(300)).read_bytes() == b"y"
        assert sorted(p.name for p in out.glob("step-*.pt")) == [
            step_file_name(s) for s in (250, 300, 400, 500)]


# ---------------------------------------------------------------------------
# metrics.jsonl
# ---------------------------------------------------------------------------

def test_metrics_are_strict_json_with_null_for_nan_and_inf(tmp_path):
    rows = [{"step": 1, "train_loss": math.nan, "grad_norm": math.inf},
            {"step": 2, "val_loss": -math.inf, "nested": {"a": [1.5, math.nan]}},
            {"step": 3, "lr": torch.tensor(0.5), "big": torch.tensor([1.0, float("inf")]), "ok": True}]
    with RunFolder(tmp_path / "run") as folder:
        for row in rows:
            assert folder.log(row) is None
    got = _strict_rows(tmp_path / "run" / "metrics.jsonl")
    assert got == [{"step": 1, "train_loss": None, "grad_norm": None},
                   {"step": 2, "val_loss": None, "nested": {"a": [1.5, None]}},
                   {"step": 3, "lr": 0.5, "big": [1.0, None], "ok": True}]
    assert "NaN" not in json_line({"x": math.nan}) and "Infinity" not in json_line({"x": -math.inf})


def _write_log(path: Path, steps=range(1, 11), eval_every=5, tail: bytes = b"") -> None:
    lines = []
    for s in steps:
        lines.append(json.dumps({"step": s, "train_loss": 3.0 - s / 10}))
        if s % eval_every == 0:
            lines.append(json.dumps({"step": s, "val_loss": 2.0 - s / 10}))
    path.write_bytes(("\n".join(lines) + "\n").encode() + tail)


def test_resume_drops_rows_after_the_resumed_step(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    _write_log(out / "metrics.jsonl", tail=b'{"step": 11, "train_lo')  # kill -9 mid-write
    with RunFolder(out, resuming_at_step=5) as folder:
        assert any("removed 6 row(s) logged after step 5" in n for n in folder.notes), folder.notes
        assert any("1 unreadable line" in n for n in folder.notes), folder.notes
        rows = _strict_rows(folder.metrics_path)
        assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 5]
        assert rows[-1] == {"step": 5, "val_loss": 1.5}  # eval rows at or before the step stay
        folder.log({"step": 6, "train_loss": 1.0})
    assert [r["step"] for r in _strict_rows(out / "metrics.jsonl")] == [1, 2, 3, 4, 5, 5, 6]
    assert _temps(out) == []


def test_resume_at_the_last_step_keeps_the_log_as_is(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    _write_log(out / "metrics.jsonl")
    before = (out / "metrics.jsonl").read_bytes()
    with RunFolder(out, resuming_at_step=10) as folder:
        assert not any("metrics" in n for n in folder.notes)
    assert (out / "metrics.jsonl").read_bytes() == before


def test_a_cut_short_last_line_is_dropped_not_fatal(tmp_path):
    """A crashed run's log, resumed at its last step: the broken tail goes, so
    the next row does not glue onto it."""
    out = tmp_path / "run"
    out.mkdir()
    _write_log(out / "metrics.jsonl", steps=range(1, 4), tail=b'{"step": 4, "tr')
    with RunFolder(out, resuming_at_step=3) as folder:
        folder.log({"step": 4, "train_loss": 1.0})
    assert [r["step"] for r in _strict_rows(out / "metrics.jsonl")] == [1, 2, 3, 4]


def test_old_nan_tokens_are_rewritten_as_null_on_resume(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "train_loss": NaN}\n{"step": 2, "grad_norm": Infinity}\n')
    with RunFolder(out, resuming_at_step=2):
        pass
    assert _strict_rows(out / "metrics.jsonl") == [{"step": 1, "train_loss": None},
                                                   {"step": 2, "grad_norm": None}]


