"""Corpus folders as they really are: FIFOs, sockets, devices, symlink loops,
run folders, mixed encodings; and the encoded-corpus cache under damage and
at its bounds. Every fault here is the real thing (a real FIFO, a real socket,
real crafted files), not a patched function."""

from __future__ import annotations

import multiprocessing
import os
import socket
from pathlib import Path

import numpy as np
import pytest

from charnn.text import data
from charnn.text import reading
from charnn.text.data import encode_corpus, read_corpus
from charnn.errors import DataError
from charnn.text.tokenizer import CharTokenizer

TIMEOUT_S = 30  # a read that blocks on a FIFO would otherwise hang the suite

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX FIFOs and sockets")


def _read_in_child(paths, kwargs, queue):
    try:
        corpus = read_corpus(paths, **kwargs)
        queue.put(("ok", corpus.text, corpus.files, corpus.skipped, corpus.warnings))
    except DataError as e:
        queue.put(("error", str(e)))
    except BaseException as e:  # noqa: BLE001 - report anything else to the test
        queue.put(("crash", repr(e)))


def read_with_timeout(paths, **kwargs):
    """``read_corpus`` in a child process: a hang fails the test instead of
    blocking it. Returns ("ok", text, files, skipped, warnings) or ("error", message)."""
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_read_in_child, args=([str(p) for p in paths], kwargs, queue))
    child.start()
    child.join(TIMEOUT_S)
    if child.is_alive():
        child.kill()
        child.join()
        pytest.fail(f"read_corpus({paths}) hung for {TIMEOUT_S} s")
    result = queue.get(timeout=5)
    assert result[0] != "crash", result
    return result


def _text_folder(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "a.txt").write_text("alpha\n", encoding="utf-8")
    (root / "b.txt").write_text("beta\n", encoding="utf-8")
    return root


# ---------------------------------------------------------------------------
# FIFOs, sockets, devices
# ---------------------------------------------------------------------------

@pytest.mark.system
def test_fifo_inside_folder_is_skipped_with_warning_not_opened(tmp_path):
    root = _text_folder(tmp_path / "corpus")
    os.mkfifo(root / "pipe.txt")  # named like text; nobody ever writes to it
    status, text, files, skipped, warnings = read_with_timeout([root])
    assert status == "ok"
    assert text == "alpha\nbeta\n"
    assert [Path(f).name for f, _ in files] == ["a.txt", "b.txt"]
    assert skipped == [(str(root / "pipe.txt"), "a FIFO")]
    assert any("pipe.txt" in w and "FIFO" in w for w in warnings)


@pytest.mark.system
def test_fifo_named_directly_is_a_clear_error(tmp_path):
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    result = read_with_timeout([fifo])
    assert result == ("error", f"{fifo} is a FIFO, not a regular file; pass a text file")


@pytest.mark.system
def test_symlink_to_fifo_is_refused_too(tmp_path):
    root = _text_folder(tmp_path / "corpus")
    os.mkfifo(tmp_path / "pipe")
    (root / "link.txt").symlink_to(tmp_path / "pipe")
    status, text, _, skipped, _ = read_with_timeout([root])
    assert status == "ok" and text == "alpha\nbeta\n"
    assert skipped == [(str(root / "link.txt"), "a FIFO")]
    status, message = read_with_timeout([root / "link.txt"])
    assert status == "error" and "is a FIFO, not a regular file" in message


@pytest.mark.system
def test_unix_socket_inside_folder_is_skipped(tmp_path):
    root = _text_folder(tmp_path / "c")  # short path: AF_UNIX names are limited to ~100 bytes
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(root / "s.sock"))
        sock.listen(1)
        status, text, _, skipped, warnings = read_with_timeout([root])
        assert status == "ok" and text == "alpha\nbeta\n"
        assert skipped == [(str(root / "s.sock"), "a socket")]
        assert warnings == [f"skipped {root / 's.sock'}: a socket"]
        status, message = read_with_timeout([root / "s.sock"])
        assert status == "error" and message.startswith(f"{root / 's.sock'} is a socket, not a regular file")
    finally:
        sock.close()


@pytest.mark.system
def test_dev_null_named_directly_is_a_clear_error():
    status, message = read_with_timeout(["/dev/null"])
    assert status == "error"
    assert message == "/dev/null is a character device, not a regular file; pass a text file"


@pytest.mark.system
def test_device_reached_through_a_folder_link_is_skipped(tmp_path):
    root = _text_folder(tmp_path / "corpus")
    (root / "null.txt").symlink_to("/dev/null")
    (root / "zero.txt").symlink_to("/dev/zero")  # would never end if read
    status, text, _, skipped, _ = read_with_timeout([root])
    assert status == "ok" and text == "alpha\nbeta\n"
    assert sorted(skipped) == [(str(root / "null.txt"), "a character device"),
                               (str(root / "zero.txt"), "a character device")]


# ---------------------------------------------------------------------------
# Symbolic links
# ---------------------------------------------------------------------------

@pytest.mark.system
def test_symlinked_folder_cycle_ends_and_reads_each_file_once(tmp_path):
    root = _text_folder(tmp_path / "corpus")
    sub = root / "sub"
    sub.mkdir()
    (sub / "c.txt").write_text("gamma\n", encoding="utf-8")
    (sub / "up").symlink_to(root, target_is_directory=True)  # sub/up -> corpus: a cycle
    (root / "self").symlink_to(".", target_is_directory=True)
    (root / "again.txt").symlink_to(root / "a.txt")  # the same file twice
    status, text, files, skipped, _ = read_with_timeout([root])
    assert status == "ok"
    assert text == "alpha\nbeta\ngamma\n"
    assert [Path(f).relative_to(root).as_posix() for f, _ in files] == ["a.txt", "b.txt", "sub/c.txt"]
    reasons = dict(skipped)
    assert reasons[f"{root / 'self'}/"] == "a symbolic link to a folder already read"
    assert reasons[f"{sub / 'up'}/"] == "a symbolic link to a folder already read"
    assert reasons[str(root / "again.txt")] == f"the same file as {root / 'a.txt'}"


def test_symlinked_folder_outside_is_followed_and_broken_link_skipped(tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "x.txt").write_text("outside\n", encoding="utf-8")
    root = _text_folder(tmp_path / "corpus")
    (root / "more").symlink_to(outside, target_is_directory=True)
    (root / "dead.txt").symlink_to(tmp_path / "missing.txt")
    corpus = read_corpus([root])
    assert corpus.text == "alpha\nbeta\noutside\n"
    assert corpus.skipped == [(str(root / "dead.txt"), "a broken symbolic link")]
    with pytest.raises(DataError, match="broken symbolic link"):
        read_corpus([root / "dead.txt"])


def test_symlink_loop_named_directly_is_a_clear_error(tmp_path):
    loop = tmp_path / "loop.txt"
    loop.symlink_to(loop)
    with pytest.raises(DataError, match="loop.txt"):
        read_corpus([loop])
    root = _text_folder(tmp_path / "corpus")
    (root / "loop.txt").symlink_to(root / "loop.txt")
    corpus = read_corpus([root])
    assert corpus.text == "alpha\nbeta\n"
    assert [p for p, _ in corpus.skipped] == [str(root / "loop.txt")]


# ---------------------------------------------------------------------------
# Mixed encodings, binary files
# ---------------------------------------------------------------------------

def test_latin1_file_among_utf8_files_is_skipped_with_reason(tmp_path):
    root = _text_folder(tmp_path / "notes")
    old = root / "old.txt"
    old.write_bytes(b"caf\xe9 au lait\n")  # Latin-1
    corpus = read_corpus([root])
    assert corpus.text == "alpha\nbeta\n"
    assert corpus.skipped == [(str(old), "not UTF-8 text (invalid byte 0xe9 at offset 3)")]
    assert corpus.warnings == [f"skipped {old}: not UTF-8 text (invalid byte 0xe9 at offset 3)"]
    assert [f for f, _ in corpus.files] == [str(root / "a.txt"), str(root / "b.txt")]
    # Named directly it is an error that suggests an option train and eval have.
    with pytest.raises(DataError) as info:
        read_corpus([old])
    assert str(info.value) == (f"{old} is not utf-8 text (invalid byte 0xe9 at offset 3); "
                               f"{data.ENCODING_HINT}")
    # Read as Latin-1, the UTF-8 files that are not ASCII would be garbled, but
    # these are ASCII: everything is read.
    assert read_corpus([root], encoding="latin-1").text == "alpha\nbeta\ncafé au lait\n"


def test_binary_file_among_text_is_skipped(tmp_path):
    root = _text_folder(tmp_path / "c")
    (root / "model.pt").write_bytes(b"PK\x03\x04" + bytes(range(256)) * 4)
    corpus = read_corpus([root])
    assert corpus.text == "alpha\nbeta\n"
    assert corpus.skipped == [(str(root / "model.pt"), "looks like a binary file, not text")]


def test_utf16_file_in_utf8_folder_names_the_encoding(tmp_path):
    root = _text_folder(tmp_path / "c")
    (root / "wide.txt").write_bytes("wide\n".encode("utf-16"))
    corpus = read_corpus([root])
    ((path, reason),) = corpus.skipped
    assert path == str(root / "wide.txt") and "UTF-16 byte-order mark" in reason and "--encoding utf-16" in reason


def test_folder_with_nothing_readable_lists_why(tmp_path):
    root = tmp_path / "c"
    root.mkdir()
    (root / "old.txt").write_bytes(b"na\xefve\n")
    (root / "blob.bin").write_bytes(b"\0\1\2" * 50)
    with pytest.raises(DataError) as info:
        read_corpus([root])
    msg = str(info.value)
    assert msg.startswith(f"folder {root} holds no text files charnn can read (skipped ")
    assert f"{root / 'blob.bin'}: looks like a binary file, not text" in msg
    assert f"{root / 'old.txt'}: not UTF-8 text (invalid byte 0xef at offset 2)" in msg
    assert msg.endswith(f"if the files are in another encoding, {data.ENCODING_HINT}")


def test_folder_with_many_bad_files_lists_five_and_counts_the_rest(tmp_path):
    root = tmp_path / "c"
    root.mkdir()
    for i in range(8):
        (root / f"{i}.bin").write_bytes(b"\0" * 10)
    with pytest.raises(DataError, match=r"; and 3 more\); point charnn at your text$"):
        read_corpus([root])


@pytest.mark.parametrize("encoding", ["utf-9", "no such codec", "hex", "rot13", "base64"])
def test_unknown_or_non_text_encoding_is_a_data_error(tmp_path, encoding):
    root = _text_folder(tmp_path / "c")
    with pytest.raises(DataError) as info:
        read_corpus([root], encoding=encoding)
    assert repr(encoding) in str(info.value) and "utf-8" in str(info.value)
    with pytest.raises(DataError):
        data.decode_bytes(b"abc", "prime", encoding)


# ---------------------------------------------------------------------------
# charnn's own files: run folders, the cache, exclude
# ---------------------------------------------------------------------------

def _run_folder(path: Path, marker: bool = True) -> Path:
    path.mkdir(parents=True)
    if marker:
        (path / ".charnn-run").write_text("", encoding="utf-8")
    (path / "metrics.jsonl").write_text('{"step": 1, "train_loss": 2.5}\n', encoding="utf-8")
    (path / "last.pt").write_bytes(b"PK\x03\x04" + b"\0" * 100)
    (path / ".charnn-lock").write_text("12345\n", encoding="utf-8")
    (path / "notes.txt").write_text("text inside a run folder\n", encoding="utf-8")
    return path


def test_run_folder_inside_corpus_is_skipped_with_one_warning(tmp_path):
    root = _text_folder(tmp_path / "c")
    run = _run_folder(root / "checkpoints" / "foo")
    corpus = read_corpus([root])
    assert corpus.text == "alpha\nbeta\n"
    assert corpus.skipped == [(f"{run}/", "a charnn run folder")]
    assert corpus.warnings == [f"skipping {run}/: a charnn run folder"]


def test_older_run_folder_without_marker_is_recognised(tmp_path):
    root = _text_folder(tmp_path / "c")
    run = _run_folder(root / "old-run", marker=False)
    corpus = read_corpus([root])
    assert corpus.text == "alpha\nbeta\n"
    assert corpus.skipped == [(f"{run}/", "a charnn run folder")]


def test_run_folder_or_charnn_file_named_directly_is_refused(tmp_path):
    run = _run_folder(tmp_path / "run")
    with pytest.raises(DataError, match="is a charnn run folder"):
        read_corpus([run])
    with pytest.raises(DataError, match="one of charnn's own files"):
        read_corpus([run / ".charnn-lock"])


def test_exclude_paths_are_never_read(tmp_path):
    root = _text_folder(tmp_path / "c")
    out = root / "out"  # the trainer's output folder, before it has a marker
    out.mkdir()
    (out / "log.txt").write_text("not corpus\n", encoding="utf-8")
    (root / "skipme.txt").write_text("nor this\n", encoding="utf-8")
    not_yet = root / "future"  # an exclude path that does not exist yet
    corpus = read_corpus([root], exclude=[out, root / "skipme.txt", not_yet])
    assert corpus.text == "alpha\nbeta\n"
    assert corpus.skipped == []  # charnn's own output is left out silently
    # Reached through a symlink, still excluded.
    (root / "link").symlink_to(out, target_is_directory=True)
    assert read_corpus([root], exclude=[out]).text == "alpha\nbeta\nnor this\n"
    # An exclude path named as the corpus is refused.
    with pytest.raises(DataError, match="where charnn writes this run") as info:
        read_corpus([out], exclude=[out])
    assert "another --out" in str(info.value)


def test_text_inside_an_exclude_folder_can_still_be_named(tmp_path, monkeypatch):
    """`charnn train notes.txt --out .` and `charnn train books/ --out .`:
    the output folder holds the corpus, and the corpus is still read."""
    monkeypatch.chdir(tmp_path)
    Path("notes.txt").write_text("my notes\n", encoding="utf-8")
    _text_folder(tmp_path / "books")
    _run_folder(tmp_path / "books" / "run")  # a run folder inside is still skipped
    assert read_corpus(["notes.txt"], exclude=["."]).text == "my notes\n"
    corpus = read_corpus(["books"], exclude=["."])
    assert corpus.text == "alpha\nbeta\n"
    assert corpus.skipped == [("books/run/", "a charnn run folder")]


def test_train_dot_reads_only_the_text(tmp_path, monkeypatch):
    """`charnn train .` from a project root: text, a checkpoints/ folder with
    runs (one being written now, one older), and data/ with its cache."""
    project = tmp_path / "project"
    _text_folder(project)
    (project / "src").mkdir()
    (project / "src" / "code.py").write_text("print('hi')\n", encoding="utf-8")
    _run_folder(project / "checkpoints" / "project")
    _run_folder(project / "checkpoints" / "older")
    (project / "checkpoints" / ".gitkeep").write_text("", encoding="utf-8")
    cache = project / "data" / ".cache"
    cache.mkdir(parents=True)
    np.save(cache / "0123-4567-89ab.npy", np.arange(100, dtype=np.uint8))
    (cache / "notes.txt").write_text("cache text\n", encoding="utf-8")
    monkeypatch.setenv("CHARNN_DATA_DIR", str(project / "data"))
    monkeypatch.chdir(project)
    corpus = read_corpus(["."], exclude=[Path("checkpoints/project"), data.cache_dir()])
    assert corpus.text == "alpha\nbeta\nprint('hi')\n"
    assert [f for f, _ in corpus.files] == ["a.txt", "b.txt", "src/code.py"]
    assert corpus.skipped == [("checkpoints/older/", "a charnn run folder")]
    assert corpus.warnings == ["skipping checkpoints/older/: a charnn run folder"]


def test_progress_reports_long_reads_and_never_prints(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(reading, "READ_STATUS_FILES", 3)
    root = _text_folder(tmp_path / "c")
    (root / "c.txt").write_text("gamma\n", encoding="utf-8")
    seen: list[str] = []
    corpus = read_corpus([root], progress=seen.append)
    assert seen == ["reading 3 files (17B)"]
    assert len(corpus.files) == 3
    monkeypatch.setattr(data, "ENCODE_STATUS_CHARS", 10)
    encode_corpus(corpus, CharTokenizer.from_text(corpus.text), cache=False, progress=seen.append)
    assert seen[-1] == "encoding 17 characters"
    assert capsys.readouterr() == ("", "")


# ---------------------------------------------------------------------------
# The encoded-corpus cache: verified, bounded, atomic
# ---------------------------------------------------------------------------

def _corpus(tmp_path: Path, text: str, name: str = "c.txt"):
    f = tmp_path / name
    f.write_text(text, encoding="utf-8")
    return read_corpus([f])


def _entries(data_dir: Path) -> list[Path]:
    return sorted((data_dir / ".cache").glob("*.npy"))


def _forge(entry: Path, ids: np.ndarray) -> None:
    """Replace an entry's content, keeping its name (and so its claimed checksum)."""
    entry.unlink()
    with open(entry, "wb") as f:
        np.save(f, ids)


def test_cache_entry_with_wrong_content_is_rebuilt(tmp_path, data_dir):
    corpus = _corpus(tmp_path, "abcabc" * 100)
    tok = CharTokenizer.from_text(corpus.text)
    good = encode_corpus(corpus, tok).copy()
    (entry,) = _entries(data_dir)
    bad_contents = [
        good[:-1],  # wrong length
        good.astype(np.uint16),  # wrong dtype
        good.reshape(2, -1),  # wrong shape
        np.where(np.arange(len(good)) == 7, 200, good).astype(np.uint8),  # an id >= vocab size
        np.roll(good, 1),  # in range, right shape, but other content: the checksum differs
    ]
    for bad in bad_contents:
        _forge(entry, bad)
        ids = encode_corpus(corpus, tok)
        assert ids.dtype == np.uint8 and np.array_equal(ids, good), bad
        assert _entries(data_dir) == [entry]
        assert np.array_equal(np.load(entry), good)  # the entry itself was rebuilt


def test_cache_entry_with_forged_checksum_is_caught_by_spot_check(tmp_path, data_dir):
    corpus = _corpus(tmp_path, "abcabc" * 100)
    tok = CharTokenizer.from_text(corpus.text)
    good = encode_corpus(corpus, tok).copy()
    (entry,) = _entries(data_dir)
    forged = np.roll(good, 1)
    key = entry.name.rsplit("-", 1)[0]
    entry.unlink()
    forged_entry = entry.with_name(f"{key}-{data._ids_digest(forged)}.npy")  # a consistent lie
    np.save(forged_entry, forged)
    assert np.array_equal(encode_corpus(corpus, tok), good)
    assert not forged_entry.exists()
    assert [p.name for p in _entries(data_dir)] == [entry.name]


def test_cache_entries_that_are_not_arrays_are_rebuilt(tmp_path, data_dir):
    corpus = _corpus(tmp_path, "hello")
    tok = CharTokenizer.from_text(corpus.text)
    good = encode_corpus(corpus, tok).copy()
    (entry,) = _entries(data_dir)
    import pickle
    for junk in [b"", b"\x93NUMPY\x01\x00", pickle.dumps({"a": 1}), b"\x93NUMPY" + b"\xff" * 200]:
        entry.unlink()
        entry.write_bytes(junk)
        assert np.array_equal(encode_corpus(corpus, tok), good)
    entry.unlink()
    entry.mkdir()  # not even a file: not trusted, and not our business to remove
    assert np.array_equal(encode_corpus(corpus, tok), good)


def test_cache_prunes_to_entry_bound_least_recently_used_first(tmp_path, data_dir):
    tok = CharTokenizer.from_text("abcdefghij\n")
    corpora = [_corpus(tmp_path, "abcdefghij"[: i + 1] * 20 + "\n", name=f"{i}.txt") for i in range(10)]
    for i, c in enumerate(corpora[: data.CACHE_MAX_ENTRIES]):
        encode_corpus(c, tok)
        (entry,) = [p for p in _entries(data_dir) if p.name.startswith(c.sha256[:24])]
        os.utime(entry, ns=(10**18 + i * 10**9,) * 2)  # distinct, ordered mtimes
    assert len(_entries(data_dir)) == data.CACHE_MAX_ENTRIES
    encode_corpus(corpora[0], tok)  # a use: corpus 0 becomes the most recent
    encode_corpus(corpora[8], tok)  # a write over the bound: the least recent (corpus 1) goes
    names = {p.name[:24] for p in _entries(data_dir)}
    assert len(names) == data.CACHE_MAX_ENTRIES
    assert corpora[0].sha256[:24] in names and corpora[8].sha256[:24] in names
    assert corpora[1].sha256[:24] not in names


def test_cache_prunes_to_size_bound_but_keeps_the_new_entry(tmp_path, data_dir, monkeypatch):
    tok = CharTokenizer.from_text("ab\n")
    a = _corpus(tmp_path, "ab" * 300 + "\n", name="a.txt")
    b = _corpus(tmp_path, "ba" * 300 + "\n", name="b.txt")
    encode_corpus(a, tok)
    (first,) = _entries(data_dir)
    os.utime(first, ns=(10**18, 10**18))
    monkeypatch.setattr(data, "CACHE_MAX_BYTES", first.stat().st_size + 10)  # room for one entry
    encode_corpus(b, tok)
    (only,) = _entries(data_dir)
    assert only.name.startswith(b.sha256[:24])
    monkeypatch.setattr(data, "CACHE_MAX_BYTES", 1)  # even alone too big: the newest stays
    assert np.array_equal(encode_corpus(a, tok), tok.encode_array(a.text))
    (only,) = _entries(data_dir)
    assert only.name.startswith(a.sha256[:24])


def test_cache_prune_removes_stale_temp_files_only(tmp_path, data_dir):
    cache = data_dir / ".cache"
    cache.mkdir()
    stale, fresh, other = cache / ".charnn-tmp-old.npy", cache / ".charnn-tmp-new.npy", cache / "README"
    for p in (stale, fresh, other):
        p.write_bytes(b"x")
    os.utime(stale, (1, 1))
    corpus = _corpus(tmp_path, "xyz")
    encode_corpus(corpus, CharTokenizer.from_text("xyz"))
    assert not stale.exists() and fresh.exists() and other.exists()


def _encode_many(data_dir: str, corpus_file: str, rounds: int, queue) -> None:
    os.environ["CHARNN_DATA_DIR"] = data_dir
    corpus = read_corpus([corpus_file])
    tok = CharTokenizer.from_text(corpus.text)
    ok = True
    for _ in range(rounds):
        ok &= bool(np.array_equal(encode_corpus(corpus, tok), tok.encode_array(corpus.text)))
    queue.put(ok)


@pytest.mark.system
def test_concurrent_writers_never_corrupt_an_entry(tmp_path, data_dir):
    f = tmp_path / "c.txt"
    f.write_text("the same text in four processes\n" * 2000, encoding="utf-8")
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_encode_many, args=(str(data_dir), str(f), 15, queue)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(TIMEOUT_S)
        assert not p.is_alive()
    assert [queue.get(timeout=5) for _ in procs] == [True] * 4
    (entry,) = _entries(data_dir)
    assert not list((data_dir / ".cache").glob(".charnn-tmp-*"))
    corpus = read_corpus([f])
    tok = CharTokenizer.from_text(corpus.text)
    assert np.array_equal(np.load(entry), tok.encode_array(corpus.text))
