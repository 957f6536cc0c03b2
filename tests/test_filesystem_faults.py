"""The file system misbehaving under charnn, each fault created for real:
FIFOs where charnn keeps its own files, a tmpfs out of inodes, a symbolic
link into a place the process cannot read, CHARNN_DATA_DIR naming a file,
file names carrying ANSI escapes (the data side).

Whatever could hang (opening a FIFO) runs in a subprocess with a timeout, so
a regression fails the test instead of hanging the suite."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from charnn.text.data import builtin_corpus_path, encode_corpus, read_corpus
from charnn.errors import CheckpointError, DataError, RunFolderError
from charnn.storage.runfolder import RunFolder
from charnn.text.tokenizer import CharTokenizer
from conftest import make_text

REPO = Path(__file__).resolve().parent.parent
TINY = ["--hidden-size", "16", "--num-layers", "1", "--embedding-dim", "8", "--seq-len", "16",
        "--batch-size", "4", "--device", "cpu", "--precision", "fp32"]
HANG_LIMIT_S = 90  # generous for a loaded 2-core machine; a hang never ends


def charnn(*args: str, cwd: Path, timeout: float = HANG_LIMIT_S) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", NO_COLOR="1", COLUMNS="300")
    try:
        return subprocess.run([sys.executable, "-m", "charnn", *args], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        pytest.fail(f"charnn {' '.join(args)} hung (no answer in {timeout:.0f} s)")


def output(r: subprocess.CompletedProcess) -> str:
    return " ".join((r.stdout + r.stderr).split())  # rich may wrap long lines


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real run folder made by `charnn train`: last.pt, metrics.jsonl, .charnn-run, .charnn.lock."""
    where = tmp_path_factory.mktemp("run")
    (where / "c.txt").write_text(make_text(4000), encoding="utf-8")
    r = charnn("train", "c.txt", *TINY, "--max-steps", "5", "--out", "RUN", cwd=where, timeout=300)
    assert r.returncode == 0, output(r)
    run = where / "RUN"
    for name in ("last.pt", "metrics.jsonl", ".charnn-run", ".charnn.lock"):
        assert (run / name).is_file(), name
    return run


def copy_run(run: Path, dest: Path) -> Path:
    dest.mkdir()
    for f in run.iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    return dest


# ---------------------------------------------------------------------------
# #52 / #53: a FIFO (or any non-regular file) at one of charnn's own files
# ---------------------------------------------------------------------------

@pytest.mark.system
@pytest.mark.parametrize("name", ["metrics.jsonl", ".charnn-run", ".charnn.lock"])
def test_fifo_in_run_folder_is_an_error_not_a_hang(finished_run: Path, tmp_path: Path, name: str):
    folder = copy_run(finished_run, tmp_path / "f1")
    (folder / name).unlink()
    os.mkfifo(folder / name)
    r = charnn("train", "--resume", "f1/last.pt", "--max-steps", "9", cwd=tmp_path)
    text = output(r)
    assert r.returncode == 1, text
    assert f"f1/{name} is a FIFO, not a regular file; remove it" in text
    assert "This is a bug" not in text
    assert stat.S_ISFIFO(os.lstat(folder / name).st_mode)  # reported, not replaced behind the user's back
    assert (folder / "last.pt").read_bytes() == (finished_run / "last.pt").read_bytes()


@pytest.mark.system
def test_fifo_appearing_at_metrics_log_during_run_is_a_warning_not_a_hang(tmp_path: Path):
    """log() opens metrics.jsonl for append: O_WRONLY on a FIFO without reader
    blocks forever unless opened non-blocking."""
    script = f"""
import os
from charnn.storage.runfolder import RunFolder
with RunFolder({str(tmp_path / 'out')!r}) as folder:
    os.mkfifo(folder.metrics_path)
    msg = folder.log({{"step": 1, "train_loss": 2.0}})
    print("WARNING:", msg)
    print("AGAIN:", folder.log({{"step": 2, "train_loss": 1.5}}), folder.log_failures)
"""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    try:
        r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                           timeout=HANG_LIMIT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        pytest.fail("RunFolder.log hung opening a FIFO at metrics.jsonl")
    assert r.returncode == 0, r.stderr
    assert "metrics.jsonl is a FIFO, not a regular file; remove it" in r.stdout
    assert "AGAIN: None 2" in r.stdout  # said once per spell of failures, rows counted


@pytest.mark.parametrize("name", ["metrics.jsonl", ".charnn-run", ".charnn.lock"])
def test_folder_or_link_at_own_file_is_named(tmp_path: Path, name: str):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / name).mkdir()
    with pytest.raises(RunFolderError, match=rf"{name} is a folder, not a regular file; remove it"):
        RunFolder(folder, resuming_at_step=0).open()
    (folder / name).rmdir()
    os.symlink("/dev/zero", folder / name)  # a device behind a link: never opened
    with pytest.raises(RunFolderError, match=rf"{name} is a symbolic link, not a regular file"):
        RunFolder(folder, resuming_at_step=0).open()


# ---------------------------------------------------------------------------
# #13: out of inodes is not "the disk is full (... 0.9 MB free)"
# ---------------------------------------------------------------------------

def _mount_tmpfs(where: Path, options: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                           capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no mount command on this machine: cannot make a real file system without inodes")
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {r.stderr.strip()[:200]}")


def _umount(where: Path) -> None:
    if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.mark.system
def test_no_free_inodes_is_said_so(tmp_path: Path):
    mnt = tmp_path / "mnt"
    _mount_tmpfs(mnt, "size=1m,nr_inodes=6,mode=0755")
    try:
        with RunFolder(mnt / "out") as folder:
            n = 0
            while True:  # use up the inodes left (bytes stay free)
                try:
                    (mnt / f"filler-{n}").touch()
                except OSError:
                    break
                n += 1
            st = os.statvfs(mnt)
            assert st.f_favail == 0 and st.f_bavail * st.f_frsize > 500_000
            with pytest.raises(CheckpointError) as info:
                folder.save(b"x" * 20_000, "last.pt")
        message = str(info.value)
        assert "no free inodes" in message and "too many files" in message, message
        assert "disk is full" not in message and "B free" not in message, message
        assert "Remove files" in message
        assert not (mnt / "out" / "last.pt").exists()
    finally:
        _umount(mnt)


# ---------------------------------------------------------------------------
# #56: a symbolic link into a place this process cannot read
# ---------------------------------------------------------------------------

def _unreadable_link(folder: Path) -> Path:
    link = folder / "link"
    os.symlink("/proc/1/cwd/etc", link)
    try:
        os.path.realpath(link)
        os.stat(link)
    except PermissionError:
        return link
    except OSError as e:
        pytest.skip(f"/proc/1/cwd/etc gives {e!r} here, not PermissionError")
    pytest.skip("this process may read /proc/1/cwd (init's folder), so the link is readable")


def test_unreadable_link_in_corpus_folder_is_skipped(tmp_path: Path):
    pc = tmp_path / "pc"
    pc.mkdir()
    (pc / "a.txt").write_text(make_text(500), encoding="utf-8")
    link = _unreadable_link(pc)
    corpus = read_corpus([pc])
    assert [p for p, _ in corpus.files] == [str(pc / "a.txt")]
    assert corpus.skipped == [(str(link), "cannot follow the symbolic link: Permission denied")]
    assert corpus.warnings == [f"skipped {link}: cannot follow the symbolic link: Permission denied"]


@pytest.mark.system
def test_unreadable_link_named_is_a_clear_error(tmp_path: Path):
    pc = tmp_path / "pc"
    pc.mkdir()
    (pc / "a.txt").write_text(make_text(2000), encoding="utf-8")
    _unreadable_link(pc)
    with pytest.raises(DataError, match="cannot read .*link: Permission denied"):
        read_corpus([pc / "link"])
    # Through the CLI (the default output folder is named after the corpus
    # before it is read), in a folder and named.
    r = charnn("train", "pc", *TINY, "--max-steps", "1", "--out", "R1", cwd=tmp_path)
    assert r.returncode == 0, output(r)
    assert "skipped" in output(r) and "link: cannot follow the symbolic link: Permission denied" in output(r)
    r = charnn("train", "pc/link", *TINY, "--max-steps", "1", cwd=tmp_path)
    assert r.returncode == 1 and "Error: cannot read" in output(r) and "Permission denied" in output(r), output(r)
    assert "This is a bug" not in output(r)
    assert not (tmp_path / "checkpoints").exists()  # the refused run left no empty folders


# ---------------------------------------------------------------------------
# #17: CHARNN_DATA_DIR naming a file
# ---------------------------------------------------------------------------

def test_data_dir_that_is_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    afile = tmp_path / "afile"
    afile.write_text("not a folder\n")
    monkeypatch.setenv("CHARNN_DATA_DIR", str(afile))
    with pytest.raises(DataError) as info:
        builtin_corpus_path()
    message = str(info.value)
    assert f"CHARNN_DATA_DIR={afile} is a file, not a folder" in message
    assert "File exists" not in message
    monkeypatch.setenv("CHARNN_DATA_DIR", str(afile / "sub"))
    with pytest.raises(DataError, match=f"CHARNN_DATA_DIR={afile}/sub cannot be a folder: {afile} is a file"):
        builtin_corpus_path()
    # The encoding cache stays best effort: it is only skipped.
    corpus = read_corpus([_text_file(tmp_path)])
    tok = CharTokenizer.from_text(corpus.text)
    ids = encode_corpus(corpus, tok)
    assert isinstance(ids, np.ndarray) and len(ids) == len(corpus.text)
    assert afile.read_text() == "not a folder\n"


def _text_file(where: Path) -> Path:
    f = where / "t.txt"
    f.write_text(make_text(300), encoding="utf-8")
    return f


# ---------------------------------------------------------------------------
# #34: names with control characters reach messages escaped
# ---------------------------------------------------------------------------

BLINK = "\x1b[5mblink\x1b[0m"


def test_escape_sequences_in_file_names_are_shown_escaped(tmp_path: Path):
    books = tmp_path / "books"
    books.mkdir()
    (books / "a.txt").write_text(make_text(300), encoding="utf-8")
    binary = books / f"{BLINK}.bin"
    binary.write_bytes(bytes(range(256)) * 8)
    corpus = read_corpus([books])
    assert corpus.skipped == [(str(binary), "looks like a binary file, not text")]  # data: the real path
    assert len(corpus.warnings) == 1
    warning = corpus.warnings[0]
    assert "\x1b" not in warning
    assert "\\x1b[5mblink\\x1b[0m.bin" in warning

    # Errors too: a named binary file, a folder with nothing readable, a named FIFO.
    with pytest.raises(DataError) as info:
        read_corpus([binary])
    assert "\x1b" not in str(info.value) and "\\x1b[5mblink" in str(info.value)
    only = tmp_path / f"only{BLINK}"
    only.mkdir()
    (only / f"x{BLINK}.bin").write_bytes(b"\0" * 100)
    with pytest.raises(DataError) as info:
        read_corpus([only])
    assert "\x1b" not in str(info.value) and str(info.value).count("\\x1b[5mblink") == 3
    os.mkfifo(tmp_path / f"pipe{BLINK}")
    with pytest.raises(DataError) as info:
        read_corpus([tmp_path / f"pipe{BLINK}"])
    assert "\x1b" not in str(info.value) and "is a FIFO" in str(info.value)
    latin = tmp_path / f"latin{BLINK}.txt"
    latin.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError) as info:
        read_corpus([latin])
    assert "\x1b" not in str(info.value) and "not utf-8 text" in str(info.value)
