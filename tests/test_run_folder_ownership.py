"""One run owns its folder: how the folder is chosen (a default name moves on
to a free numbered one, an explicit --out holding a run is refused unless
--overwrite), and the lock that keeps a second process out.

The commands are the ones a user types: the quick start twice, `charnn train .`
from a project folder, two live processes on one folder, a read-only --out.
The faults are real: real processes and locks, kill -9, a read-only tmpfs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from charnn.errors import CharnnError, RunFolderError
from charnn.storage import checkpoint
from charnn.storage.runfolder import LOCK_NAME, RUN_MARKER, TMP_PREFIX, RunFolder, choose_out_dir, folder_holds_run
from fs_faults import tmpfs
from robust_helpers import TINY_MODEL, TINY_TRAIN, checkpoint_payload, popen, python_script, reaped, wait_for_progress, write_corpus

from conftest import assert_clean_error, invoke

FAST = [*TINY_TRAIN, "--max-steps", "4", "--eval-every", "2"]


@pytest.fixture(scope="module")
def small():
    return checkpoint_payload(16)


HOLDER = """
    import sys, time
    from pathlib import Path
    from charnn.storage.runfolder import RunFolder
    folder = RunFolder(Path(sys.argv[1])).open()
    print("ready", flush=True)
    time.sleep(120)
"""


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
        wait_for_progress(out, proc, 0)
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


@pytest.mark.system
def test_second_process_is_refused_and_a_killed_holders_lock_is_taken_over(tmp_path):
    out = tmp_path / "run"
    holder = python_script(HOLDER, str(out))
    try:
        assert holder.stdout.readline().strip() == "ready", holder.stderr.read()
        with pytest.raises(RunFolderError) as info:
            RunFolder(out).open()
        message = str(info.value)
        assert f"another charnn train (pid {holder.pid}, started " in message, message
        assert str(out) in message and "wait for it to finish or choose another --out" in message

        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        record = json.loads((out / LOCK_NAME).read_text())
        assert record["pid"] == holder.pid  # the dead process's record is still there

        with RunFolder(out, resuming_at_step=0) as folder:  # the killed holder's run, resumed
            assert any("took over the lock" in n and f"pid {holder.pid}" in n for n in folder.notes), folder.notes
            assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    # A clean close empties the lock file (kept, see the module docstring): no takeover next time.
    assert (out / LOCK_NAME).read_text() == ""
    with RunFolder(out, resuming_at_step=0) as folder:
        assert not any("took over" in n for n in folder.notes)


def test_two_folders_in_one_process_conflict_and_close_releases(tmp_path):
    first = RunFolder(tmp_path / "run").open()
    with pytest.raises(RunFolderError, match=f"pid {os.getpid()}"):
        RunFolder(tmp_path / "run").open()
    first.close()
    first.close()  # twice is fine
    with pytest.raises(ZeroDivisionError):
        with RunFolder(tmp_path / "run", resuming_at_step=0):
            1 / 0
    RunFolder(tmp_path / "run", resuming_at_step=0).open().close()  # the with-block released it despite the error


@pytest.mark.parametrize("name", ["best.pt", "last.pt", "step-0000010.pt", "step-7.pt", "metrics.jsonl",
                                  RUN_MARKER])
def test_folder_holds_run(tmp_path, name):
    (tmp_path / name).write_text("x")
    assert folder_holds_run(tmp_path)


def test_folder_holds_no_run(tmp_path):
    assert not folder_holds_run(tmp_path / "missing")
    assert not folder_holds_run(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "model.pt.bak").write_text("x")
    (tmp_path / f"{TMP_PREFIX}x.tmp").write_text("x")
    assert not folder_holds_run(tmp_path)
    assert not folder_holds_run(tmp_path / "notes.txt")


def test_default_folder_moves_on_to_a_free_numbered_one(tmp_path):
    default = tmp_path / "checkpoints" / "foo"
    assert choose_out_dir(None, default, resuming=False, overwrite=False) == (default, None)
    RunFolder(default).open().close()  # a run (its marker) is there now
    path, note = choose_out_dir(None, default, resuming=False, overwrite=False)
    assert path == tmp_path / "checkpoints" / "foo-2"
    assert note == f"{default} holds an earlier run; writing to {path}/"
    RunFolder(path).open().close()
    (tmp_path / "checkpoints" / "foo-3").write_text("a file, not free")
    (tmp_path / "checkpoints" / "foo-4").mkdir()  # an empty folder is free
    path, note = choose_out_dir(None, default, resuming=False, overwrite=False)
    assert path == tmp_path / "checkpoints" / "foo-4" and "foo-4/" in note


def test_explicit_out_holding_a_run_is_refused(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "last.pt").write_bytes(b"x")
    with pytest.raises(RunFolderError) as info:
        choose_out_dir(out, tmp_path / "default", resuming=False, overwrite=False)
    message = str(info.value)
    assert f"charnn train --resume {out / 'last.pt'}" in message
    assert "--out OTHER" in message and "--overwrite" in message
    assert isinstance(info.value, CharnnError)
    (out / "last.pt").unlink()
    (out / "best.pt").write_bytes(b"x")
    with pytest.raises(RunFolderError, match=f"--resume {out / 'best.pt'}"):
        choose_out_dir(out, tmp_path / "default", resuming=False, overwrite=False)
    (out / "best.pt").unlink()
    (out / "metrics.jsonl").write_text("")
    with pytest.raises(RunFolderError, match="no checkpoint to resume.*--overwrite"):
        choose_out_dir(out, tmp_path / "default", resuming=False, overwrite=False)
    spaced = tmp_path / "my run"
    spaced.mkdir()
    (spaced / "last.pt").write_bytes(b"x")
    with pytest.raises(RunFolderError, match="--resume '"):
        choose_out_dir(spaced, tmp_path / "default", resuming=False, overwrite=False)


def test_explicit_out_with_overwrite_and_resume(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "last.pt").write_bytes(b"x")
    path, note = choose_out_dir(out, tmp_path / "default", resuming=False, overwrite=True)
    assert path == out and "--overwrite" in note
    assert choose_out_dir(out, tmp_path / "default", resuming=True, overwrite=False) == (out, None)
    assert choose_out_dir(None, out, resuming=True, overwrite=False) == (out, None)
    with pytest.raises(RunFolderError, match="cannot be combined with --resume"):
        choose_out_dir(out, tmp_path / "default", resuming=True, overwrite=True)
    assert choose_out_dir(tmp_path / "fresh", tmp_path / "default", resuming=False, overwrite=False) == (
        tmp_path / "fresh", None)


@pytest.mark.parametrize("first", ["save", "log"])
def test_overwrite_removes_the_old_run_at_the_first_write_and_nothing_else(tmp_path, small, first):
    out = tmp_path / "run"
    with RunFolder(out) as folder:
        folder.save(small, "last.pt")
        folder.save(small, "best.pt")
        folder.save_step(b"x", 10, keep=5)
        folder.save_step(b"x", 20, keep=5)
        folder.log({"step": 10})
        with (out / "metrics.jsonl").open("a") as log:
            log.write('{"step": 11, "train_lo')  # cut short by a crash
    (out / "notes.txt").write_text("mine\n")
    before = digest(out)
    with RunFolder(out, overwrite=True) as folder:
        # Opened, locked, checked: the old run is untouched until this run writes.
        assert {k: v for k, v in digest(out).items() if k != LOCK_NAME} == {
            k: v for k, v in before.items() if k != LOCK_NAME}
        if first == "save":
            folder.save(b"new", "last.pt")
        else:
            folder.log({"step": 1})
        assert any(n.startswith("--overwrite: removed the earlier run") for n in folder.notes), folder.notes
        written = "last.pt" if first == "save" else "metrics.jsonl"
        assert sorted(os.listdir(out)) == sorted([LOCK_NAME, RUN_MARKER, "notes.txt", written])
        folder.log({"step": 2})
    steps = [json.loads(r)["step"] for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == ([1, 2] if first == "log" else [2])  # no row of the old run's
    assert json.loads((out / RUN_MARKER).read_text())["charnn_version"]
    assert (out / "notes.txt").read_text() == "mine\n"
    with pytest.raises(RunFolderError, match="cannot be combined"):
        RunFolder(out, overwrite=True, resuming_at_step=3).open()


@pytest.mark.system
def test_overwrite_is_refused_while_another_process_writes_there(tmp_path):
    out = tmp_path / "run"
    holder = python_script(HOLDER, str(out))
    try:
        assert holder.stdout.readline().strip() == "ready", holder.stderr.read()
        (out / "last.pt").write_bytes(b"theirs")
        with pytest.raises(RunFolderError, match=f"pid {holder.pid}"):
            RunFolder(out, overwrite=True).open()
        assert (out / "last.pt").read_bytes() == b"theirs"
    finally:
        holder.kill()
        holder.wait()


@pytest.fixture(scope="module")
def old_run(tmp_path_factory):
    """A finished run (its own vocabulary: --base none) and a copy of its best.pt outside its folder."""
    root = tmp_path_factory.mktemp("old")
    done = invoke("train", write_corpus(root / "notes.txt"), *FAST, "--base", "none", "--out", root / "run")
    assert done.exit_code == 0, done.output
    shutil.copy(root / "run" / "best.pt", root / "start.pt")
    return root


def assert_old_run_intact(run: Path, before: dict[str, str]) -> None:
    """Byte for byte, no file of the new run beside it, and usable."""
    assert digest(run) == before
    assert sorted(os.listdir(run)) == sorted(before)
    info = invoke("info", run / "best.pt")
    assert info.exit_code == 0, info.output
    sample = invoke("sample", run / "best.pt", "-n", "20", "--seed", "1")
    assert sample.exit_code == 0 and sample.stdout.strip(), sample.output


SETUP_ARGS = [*TINY_TRAIN[len(TINY_MODEL):], "--max-steps", "2", "--eval-every", "1"]  # without the model options


@pytest.mark.parametrize("fault", ["too-short corpus", "init-from lacking characters", "base of another shape"])
def test_overwrite_that_fails_while_setting_up_keeps_the_old_run(old_run, tmp_path, fault):
    run = tmp_path / "run"
    shutil.copytree(old_run / "run", run)
    before = digest(run)
    corpus = write_corpus(tmp_path / "notes.txt")
    if fault == "too-short corpus":
        corpus.write_text("ab", encoding="utf-8")
        args, said = [corpus, *TINY_MODEL, "--base", "none"], "too few"
    elif fault == "init-from lacking characters":
        corpus.write_text(corpus.read_text(encoding="utf-8") + "\u00e9\u00e8\n", encoding="utf-8")
        args, said = [corpus, "--init-from", old_run / "start.pt"], "--extend-vocab"
    else:
        args, said = [corpus, "--base", old_run / "start.pt", "--hidden-size", "32"], "architecture differs"
    r = invoke("train", *args, *SETUP_ARGS, "--out", run, "--overwrite")
    assert_clean_error(r, said)
    assert_old_run_intact(run, before)


@pytest.mark.system
def test_ctrl_c_while_an_overwrite_sets_up_keeps_the_old_run(old_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(old_run / "run", run)
    before = digest(run)
    corpus = write_corpus(tmp_path / "big.txt", n_words=300_000)  # reading it takes a while
    proc = popen(["train", str(corpus), *TINY_TRAIN, "--base", "none", "--max-steps", "2", "--out", str(run),
                  "--overwrite"], tmp_path / "data", tmp_path, stdout=subprocess.DEVNULL)
    with reaped(proc):
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            # The folder is locked and checked: the run is setting up.
            if f'"pid": {proc.pid},' in (run / LOCK_NAME).read_text():
                break
            time.sleep(0.002)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    text = " ".join(err.decode().split())
    if "saved" in text or proc.returncode == 0:
        pytest.skip("the run was training, or done, before Ctrl-C reached it (the poll saw the lock late)")
    assert proc.returncode == 130 and "Interrupted." in text and "Traceback" not in text, text
    assert_old_run_intact(run, before)


def test_the_marker_is_kept_on_resume(tmp_path):
    out = tmp_path / "run"
    RunFolder(out).open().close()
    marker = (out / RUN_MARKER).read_bytes()
    assert set(json.loads(marker)) >= {"created", "charnn_version"}
    RunFolder(out, resuming_at_step=0).open().close()
    assert (out / RUN_MARKER).read_bytes() == marker


def test_a_new_run_is_refused_under_the_lock_when_another_took_the_folder(tmp_path):
    """The folder was free when chosen, but another new run opened it first:
    refused (FolderTakenError, so the trainer moves on to NAME-2), never shared."""
    from charnn.errors import FolderTakenError

    first = RunFolder(tmp_path / "run").open()
    first.close()  # it wrote its marker: the folder now holds a run
    with pytest.raises(FolderTakenError, match="already holds a training run"):
        RunFolder(tmp_path / "run").open()
