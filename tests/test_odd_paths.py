"""Checkpoint paths that are not a checkpoint file: a symlink loop, a link
to nothing, a run folder (resume wants its last.pt, sample and eval its best.pt)."""

from __future__ import annotations

import os
from pathlib import Path

from conftest import assert_clean_error, invoke


def test_a_symlink_loop_is_called_a_loop(tmp_path):
    a, b = tmp_path / "loop1", tmp_path / "loop2"
    os.symlink(b, a)
    os.symlink(a, b)
    for command in (("sample", a, "-n", "5"), ("info", a), ("train", "--resume", a, "--max-steps", "1")):
        r = invoke(*command)
        assert_clean_error(r, "symlink loop", str(a))
        assert "does not exist" not in r.stderr


def test_a_dangling_symlink_names_its_target(tmp_path):
    link = tmp_path / "ck.pt"
    os.symlink(tmp_path / "gone.pt", link)
    assert_clean_error(invoke("info", link), str(link), "gone.pt", "does not exist")


def test_a_run_folder_suggests_last_pt_to_resume_and_best_pt_to_sample(trained, tmp_path):
    run: Path = trained.out
    assert trained.best.exists() and trained.last.exists()
    r = invoke("train", "--resume", run, "--max-steps", "1")
    assert_clean_error(r, "is a folder", str(run / "last.pt"))
    assert "best.pt" not in r.stderr
    r = invoke("sample", run, "-n", "5")
    assert_clean_error(r, "is a folder", str(run / "best.pt"))
