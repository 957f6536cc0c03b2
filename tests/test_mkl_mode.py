"""Which MKL mode each command runs in: training needs MKL_CBWR=AUTO,STRICT for
bit-exact resumes; sample and serve never train and run without it (a
one-stream step is a third slower under it); a mode the user chose is kept.

Each case runs the command in a fresh interpreter (MKL reads the mode at its
first call) and then asks MKL itself which mode it ran in."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MKL_AUTO, MKL_COMPATIBLE, MKL_STRICT = 2, 3, 0x10000

PROBE = """
import ctypes, json, os, sys
from charnn.cli import app
try:
    app(sys.argv[1:], standalone_mode=False)
finally:
    import torch
    lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
    sys.stderr.write("\\nMKL_MODE " + json.dumps(lib.mkl_serv_cbwr_get(-1)) + "\\n")
"""


def mode_after(args: list[str], tmp_path: Path, env: dict[str, str] | None = None) -> int:
    full = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
    full.update(PYTHONPATH=str(REPO), CHARNN_DATA_DIR=str(tmp_path / "data"), **(env or {}))
    r = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path, env=full)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stderr.rsplit("MKL_MODE ", 1)[1])


@pytest.mark.system
def test_sample_runs_without_strict_mode_and_train_with_it(trained, session_corpus, tmp_path):
    assert mode_after(["sample", str(trained.best), "-n", "20", "--seed", "1"], tmp_path) == MKL_AUTO
    assert mode_after(["train", str(session_corpus), "-o", str(tmp_path / "run"), "--max-steps", "3",
                       "--size", "fixed", "--hidden-size", "16", "--embedding-dim", "8", "--num-layers", "1"],
                      tmp_path) == MKL_AUTO | MKL_STRICT


@pytest.mark.system
def test_a_mode_the_user_sets_is_kept(trained, tmp_path):
    got = mode_after(["sample", str(trained.best), "-n", "20", "--seed", "1"], tmp_path,
                     env={"MKL_CBWR": "COMPATIBLE"})
    assert got == MKL_COMPATIBLE
